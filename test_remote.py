"""Data in an object store: a real S3 server on 127.0.0.1 (moto's standalone server), a yaml mixture,
an upstream `unified_edit` parquet and a LLaVA jsonl whose image paths resolve in the same bucket,
read through pyarrow's S3 filesystem with the endpoint and keys only in the standard AWS variables.
train.py trains on it on 2 gloo ranks and resumes exactly."""
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from test_train import TOK_DIR, ckpt, data_config, read_dcp  # noqa: F401 (fixture)

moto_server = pytest.importorskip("moto.server")
HERE = os.path.dirname(os.path.abspath(__file__))


def png(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server in a thread; the AWS variables point at it (for this process and its children)."""
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    env = dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{srv._server.server_address[1]}", AWS_ACCESS_KEY_ID="test",
               AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir("bkt")
    yield fs
    srv.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def put(fs, key: str, body: bytes):
    with fs.open_output_stream(f"bkt/{key}") as f:
        f.write(body)


def upload(fs) -> str:
    """s3://bkt/mix.yaml: edit chains (parquet, 2 row groups, images as bytes) and LLaVA VQA (jsonl,
    image paths relative to a data_folder in the bucket)."""
    chains = [[png(32, 48, 10 * i + j) for j in range(3)] for i in range(4)]
    table = pa.table({"image_list": chains, "instruction_list": [[["make it red"], ["now blue", "blue it"]]] * 4})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    put(fs, "edit/part-0.parquet", buf.getvalue())
    for i in range(3):
        put(fs, f"images/vqa/{i}.png", png(28, 42, 100 + i))
    rows = [{"image": f"vqa/{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                          {"from": "gpt", "value": f"Picture number {i}."}]}
            for i in range(3)]
    put(fs, "sft/llava.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    put(fs, "mix.yaml", b"datasets:\n  - {path: edit, format: unified_edit}\n"
                        b"  - {path: sft/llava.jsonl, data_folder: images, weight: 2}\n")
    return "s3://bkt/mix.yaml"


def test_s3_sources_read_like_local_files(s3, tmp_path):
    """The same mixture read from S3 and from a local copy gives the same packs (the unit sharding,
    row-group reads and keyed draws do not depend on where the files are), and a relative image
    path resolves in the bucket. Catches a remote path read through the local filesystem, images
    looked up next to the process instead of the data, and a data_folder dropped for remote paths."""
    url = upload(s3)
    local = tmp_path / "copy"
    for info in s3.get_file_info(pafs.FileSelector("bkt", recursive=True)):
        if info.is_file:
            dst = local / info.path[len("bkt/"):]
            dst.parent.mkdir(parents=True, exist_ok=True)
            with s3.open_input_stream(info.path) as f:
                dst.write_bytes(f.read())
    cfg = data_config(packing_length=256, epochs=1)
    packs = {}
    for where in (url, str(local / "mix.yaml")):
        cfg.data = (where,)
        packs[where] = [(sorted(s.key for s in p), b["packed_text_ids"].tolist(), b["padded_images"].sum().item())
                        for p, b, _ in data.PackedDataset(cfg).stream()]
    assert packs[url] == packs[str(local / "mix.yaml")]
    assert sum(len(p[0]) for p in packs[url]) == 7  # 4 chains + 3 VQA rows
    assert [len(f.unit_rows) for s in data.find_sources([url]) for f in s.files] == [2, 1]
    assert data.find_sources(["s3://bkt/sft/llava.jsonl:3"])[0].weight == 3  # path:weight
    cfg.data = ("s3://bkt/sft/*.jsonl",)  # a glob
    assert len(data.PackedDataset(cfg).sources[0].files) == 1
    put(s3, "sft/bad.jsonl", json.dumps({"image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}).encode())
    cfg.data = ("s3://bkt/sft/bad.jsonl",)
    with pytest.raises(data.BadSample, match=r"s3://bkt/sft/bad.jsonl: line 1: .*cannot read image s3://bkt/sft/nope.png"):
        list(data.PackedDataset(cfg).stream())


RANK = """
import os, sys
rank, ports, out, argv = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4:]
os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
import train
os.environ["MASTER_PORT"] = ports[0]
train.main(argv + ["--output-dir", out + "/a", "--max-steps", "2", "--ckpt.every", "1"])
os.environ["MASTER_PORT"] = ports[1]
train.main(argv + ["--output-dir", out + "/b", "--max-steps", "2", "--ckpt.resume", out + "/a/step-0000001"])
sys.stdout.flush()
os._exit(0)  # see test_train._worker: gloo threads can abort interpreter exit
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_from_s3_on_two_ranks_and_resume(s3, ckpt, tmp_path):
    """train.py on 2 ranks (one data worker each) with --data s3://.../mix.yaml: 2 steps, then a run
    resumed from step 1 gives bit-identical step-2 weights. Catches remote sources that cannot be
    reopened in DataLoader workers or after a resume, and a data state that does not round-trip."""
    url = upload(s3)
    cfg = data_config()
    sizes = [f"--data.{k.replace('_', '-')}={getattr(cfg, k)}" for k in
             ("vit_min_size", "vit_max_size", "vae_min_size", "vae_max_size", "text_cond_dropout",
              "vit_cond_dropout", "vae_cond_dropout")]
    argv = ["--model", ckpt, "--data", url, "--dtype", "fp32", "--no-activation-checkpointing",
            "--optim.warmup-steps", "0", "--optim.lr", "1e-3", "--log-every", "1", "--eval.every", "0",
            "--data.packing-length", "200", "--data.num-workers", "1", *sizes]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    ports = f"{free_port()},{free_port()}"
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(r), ports, str(tmp_path), *argv], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=240) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "resumed from" in outs[0][0] and "step 2/2" in outs[0][0], outs[0][0]
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert any(r["ce"] > 0 for r in rows) and any(r["mse"] > 0 for r in rows)  # both sources reach the packs
    a = read_dcp(str(tmp_path / "a" / "step-0000002"), str(tmp_path / "a.pt"))["model"]
    b = read_dcp(str(tmp_path / "b" / "step-0000002"), str(tmp_path / "b.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
