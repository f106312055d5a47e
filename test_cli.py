"""train.py's start-up, as a user meets it: `python -m pytest -q test_cli.py` (about 15 s).

A user error (bad path, option, record or checkpoint) ends the run with exit code 2 and one line,
`error: ...`, that names the thing, and no traceback; the checks run on rank 0 before any weight is
read. A Hugging Face Hub id as --model is downloaded once, by rank 0, and every rank uses the folder.
huggingface_hub is always stubbed here: the tests never touch the network."""
import json
import os
import shutil
import socket
import subprocess
import sys
import types
from collections import Counter

import pytest

import convert_weights
import data
import sample
import train
from test_train import ckpt, world1  # noqa: F401 (fixtures: the tiny checkpoint with the golden tokenizer, one rank)

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_DIR = os.path.join(HERE, "testdata", "golden", "tokenizer")
# the tiny model's geometry (8 ViT patches and 8 latents per side), one CPU step, no samples
SMALL = ["--data.vit-min-size", "14", "--data.vit-max-size", "112", "--data.vae-min-size", "16",
         "--data.vae-max-size", "128", "--data.num-workers", "0", "--eval.every", "0", "--max-steps", "1",
         "--dtype", "fp32", "--no-activation-checkpointing", "--attn", "sdpa"]
GOOD = {"messages": [{"role": "user", "content": "Say hello."},
                     {"role": "assistant", "content": "Hello there, friend."}]}
NO_IMAGE = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "gone.png"}},
                                                      {"type": "text", "text": "What is this?"}]},
                         {"role": "assistant", "content": "A boat."}]}


def jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def hub_stub(monkeypatch, fn):
    """huggingface_hub with `fn` as snapshot_download (None: not installed)."""
    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        None if fn is None else types.SimpleNamespace(snapshot_download=fn))


def user_error(capsys, argv: list[str]) -> str:
    """Run train.main in this process; it must stop with exit code 2 and one `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """Start-up checks run before any weight is read: building or loading a model fails the test."""
    def boom(*a, **k):
        pytest.fail("the model was built before the start-up checks stopped the run")
    monkeypatch.setattr(train, "build_model", boom)
    monkeypatch.setattr(train.AutoEncoder, "from_pretrained", boom)


def test_bad_model_folders_name_the_file(ckpt, tmp_path, capsys, no_load):
    run = lambda model: user_error(capsys, ["--model", model, "--data", jsonl(tmp_path / "d.jsonl", [GOOD]),
                                            "--output-dir", str(tmp_path / "out"), *SMALL])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a BAGEL checkpoint: expected llm_config.json" in run(str(empty))
    assert "--model /no/such/folder: no such directory" in run("/no/such/folder")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "ae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a truncated header
    line = run(str(broken))
    assert "ae.safetensors: not a readable safetensors file" in line
    (broken / "ae.safetensors").unlink()
    assert "ae.safetensors: missing" in run(str(broken))
    shutil.copy(os.path.join(ckpt, "ae.safetensors"), broken)
    cfg = json.loads((broken / "llm_config.json").read_text())
    (broken / "llm_config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    line = run(str(broken))  # configs that do not match the weights: found from the headers alone
    assert "checkpoint does not match the model config: missing" in line and "layers.2." in line


def test_bad_data_stops_before_the_model_loads(ckpt, tmp_path, capsys, no_load):
    run = lambda *argv: user_error(capsys, ["--model", ckpt, "--output-dir", str(tmp_path / "out"), *SMALL, *argv])
    assert "no data: pass --data PATH" in run()
    assert "/no/such.parquet: no such file or directory" in run("--data", "/no/such.parquet")
    assert "unknown data file type" in run("--data", jsonl(tmp_path / "d.csv", [GOOD]))
    bad = jsonl(tmp_path / "bad.jsonl", [NO_IMAGE])
    assert f"{bad}: line 1: messages[0].content[0]: image file not found" in run("--data", bad)
    good = jsonl(tmp_path / "good.jsonl", [GOOD])
    assert f"{good}: line 1: sample has" in run("--data", good, "--data.packing-length", "8")  # too small
    assert f"{bad}: line 1" in run("--data", good, bad)  # the first record of every source


@pytest.mark.parametrize("argv, says", [
    (["--cpu-offload"], "--cpu-offload moves GPU shards"),
    (["--attn", "flex"], "--attn flex has no backward on CPU"),
    (["--visual-gen", "False", "--freeze", "llm", "vit", "connector"],
     "--freeze llm vit connector leaves nothing to train"),
    (["--shard-size", "3"], "--shard-size 3 does not divide the world size 1"),
    (["--ckpt.resume", "/no/step-0000100"], "--ckpt.resume /no/step-0000100: not a complete checkpoint"),
    (["--eval.every", "5", "--eval.size", "64", "--eval.image", "/no/cat.jpg"], "--eval.image /no/cat.jpg: cannot read the image"),
    (["--eval.every", "5", "--eval.size", "100"], "--eval.size 100: must be a multiple of 16 (the model's latent stride) and at most 128 px"),
    (["--output-dir", "FILE/out"], "--output-dir FILE/out: cannot write there (Not a directory)"),
])
def test_bad_options_name_the_option(ckpt, tmp_path, capsys, monkeypatch, no_load, argv, says):
    (tmp_path / "FILE").write_text("")  # a file where --output-dir needs a folder (root may write anywhere)
    monkeypatch.chdir(tmp_path)
    line = user_error(capsys, ["--model", ckpt, "--data", jsonl(tmp_path / "d.jsonl", [GOOD]),
                               "--output-dir", str(tmp_path / "out"), *SMALL, *argv])
    assert says in line, line


def test_bugs_keep_their_traceback_and_debug_shows_user_errors_whole(ckpt, tmp_path, monkeypatch):
    argv = ["--model", ckpt, "--output-dir", str(tmp_path / "out"), *SMALL]
    with pytest.raises(train.packing.UserError, match="no data"):
        train.main(argv + ["--debug"])
    monkeypatch.setattr(train.data_lib, "PackedDataset", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(argv + ["--data", jsonl(tmp_path / "d.jsonl", [GOOD])])


def test_every_option_conflict_in_one_error(ckpt, tmp_path, capsys, no_load):
    """BAGEL-7B-MoT's image sizes on the tiny model, a bad --shard-size and a missing data file: one error
    lists them all, each with the flag as typed and a value that works."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--model", ckpt, "--data", str(tmp_path / "gone.jsonl"), "--output-dir", str(tmp_path / "out"),
                    "--dtype", "fp32", "--attn", "sdpa", "--shard-size", "3", "--eval.every", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines() == [
        "error: 6 problems:",
        "  --shard-size 3 does not divide the world size 1: use a divisor of it, e.g. the ranks per node (HSDP: "
        "shard within a node, replicate across nodes), or 0 to shard over all ranks",
        "  --data.vit-max-size 980 gives 70 tokens per side, more than the model's vit_max_num_patch_per_side=8: "
        "set --data.vit-max-size 112 or less",
        "  --data.vit-min-size 378 is larger than --data.vit-max-size 112: set --data.vit-min-size 112 or less",
        "  --data.vae-max-size 1024 gives 64 tokens per side, more than the model's max_latent_size=8: "
        "set --data.vae-max-size 128 or less",
        "  --data.vae-min-size 512 is larger than --data.vae-max-size 128: set --data.vae-min-size 128 or less",
        f"  {tmp_path}/gone.jsonl: no such file or directory"]


def test_a_bad_record_in_a_dataloader_worker_is_one_line(ckpt, tmp_path, capsys):
    """The record read first (checked at start-up) is good; the next one, read by a DataLoader worker
    during training, names its missing image in one line, not inside the worker's traceback."""
    path = tmp_path / "d.jsonl"
    jsonl(path, [NO_IMAGE] * 4)
    where = data.find_sources([str(path)])[0].read((0, 0, 0, 0))[0]  # the record start-up checks
    first = int(where.rsplit("line ", 1)[1]) - 1
    jsonl(path, [GOOD if i == first else NO_IMAGE for i in range(4)])
    line = user_error(capsys, ["--model", ckpt, "--data", str(path), "--output-dir", str(tmp_path / "out"), *SMALL,
                               "--data.num-workers", "1", "--data.packing-length", "512"])
    assert line.startswith(f"error: {path}: line ") and "messages[0].content[0]: image file not found" in line
    assert f"line {first + 1}:" not in line and "DataLoader worker" not in line


def test_hub_id_errors_say_how_to_get_it(ckpt, tmp_path, capsys, monkeypatch):
    argv = ["--model", "someorg/bagel-tiny", "--data", jsonl(tmp_path / "d.jsonl", [GOOD]),
            "--output-dir", str(tmp_path / "out"), *SMALL]
    monkeypatch.chdir(tmp_path)  # no folder someorg/bagel-tiny here
    hub_stub(monkeypatch, None)
    assert "someorg/bagel-tiny: no such directory; as a Hugging Face Hub id it is downloaded by huggingface_hub: " \
           "pip install huggingface_hub" in user_error(capsys, argv)

    def offline(repo, **kw):
        raise OSError("no network\n(twice)")
    hub_stub(monkeypatch, offline)
    # a path that does not exist is no hub id: ./x, ~/x, or x/y where the folder x exists here
    for path in ("./bagel/export", "~/bagel", "out/export"):
        assert user_error(capsys, [*argv[:1], path, *argv[2:]]) == f"error: --model {path}: no such directory"
    assert "downloading it from the Hugging Face Hub failed: OSError: no network (twice)" in user_error(capsys, argv)


def test_sample_and_convert_take_hub_ids(ckpt, tmp_path, monkeypatch):
    calls = []
    hub_stub(monkeypatch, lambda repo, **kw: calls.append(repo) or ckpt)
    monkeypatch.chdir(tmp_path)
    out = convert_weights.convert(convert_weights.Args(model="someorg/bagel-tiny", output_dir=str(tmp_path / "exp")))
    assert os.path.exists(os.path.join(out, "ema.safetensors"))
    assert "text" in sample.main(["--model", "someorg/bagel-tiny", "--question", "hi", "--max-new-tokens", "2",
                                  "--device", "cpu", "--dtype", "fp32"])
    assert calls == ["someorg/bagel-tiny"] * 2


def test_sample_with_defaults_sizes_images_as_training(ckpt, tmp_path, capsys, monkeypatch):
    """sample.py on the tiny checkpoint with no --size draws the largest it holds; with an export's record of
    its run's sizes (a demo-like export), it draws at the run's largest and feeds the ViT what training did,
    through data.resize_shape (changing that rule changes sample.py's input); user mistakes are `error:` lines."""
    from PIL import Image
    common = ["--steps", "2", "--max-new-tokens", "2", "--dtype", "fp32", "--device", "cpu"]
    out = sample.main(["--model", ckpt, "--prompt", "a red circle", "--output", str(tmp_path / "a.png"), *common])
    assert Image.open(out["image"]).size == (128, 128)  # 8 latents x stride 16
    demo = tmp_path / "demo"
    shutil.copytree(ckpt, demo)
    (demo / data.IMAGE_SIZES).write_text(json.dumps({"vit_max_size": 56, "vit_min_size": 28, "vae_max_size": 32,
                                                     "vae_min_size": 16}))
    out = sample.main(["--model", str(demo), "--prompt", "a red circle", "--output", str(tmp_path / "b.png"), *common])
    assert Image.open(out["image"]).size == (32, 32)
    Image.new("RGB", (32, 32), (40, 80, 220)).save(tmp_path / "in.png")
    seen = []
    monkeypatch.setattr(sample.Context, "add_vit_image", lambda self, patches, pos: seen.append(len(patches)))
    ask = ["--image", str(tmp_path / "in.png"), "--question", "what shape is this ?", *common]
    sample.main(["--model", str(demo), *ask])
    assert seen == [4]  # 32 px -> 28 px, as training resized it: 2x2 patches of 14 (the fixture alone: 112 px, 64)
    monkeypatch.setattr(data, "resize_shape", lambda w, h, *a, **k: (14, 14))  # another rule: sample.py follows
    sample.main(["--model", str(demo), *ask])
    assert seen == [4, 1]
    monkeypatch.undo()
    for argv, says in ((["--model", ckpt, "--image", str(tmp_path / "gone.png"), "--question", "hi"],
                        f"error: --image {tmp_path}/gone.png: cannot read the image (No such file or directory)"),
                       (["--model", str(tmp_path / "gone"), "--question", "hi"],
                        f"error: --model {tmp_path}/gone: no such directory"),
                       (["--model", ckpt, "--prompt", "x", "--size", "100"],
                        "error: --size 100: must be a multiple of 16 (the model's latent stride) and at most 128 px "
                        "(max_latent_size 8 strides)")):
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        assert str(e.value) == says
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    assert "a multiple of the model's latent stride" in " ".join(capsys.readouterr().out.replace("│", " ").split())


# one rank of the hub test, as its own process: huggingface_hub is a stub that logs its calls and
# "downloads" a copy of the tiny checkpoint, the first time slower than the process group's timeout
HUB_RANK = """
import json, os, shutil, sys, time, types
rank, port, ckpt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port)

def download(repo, **kw):
    if not os.path.exists(os.path.join(out, "calls")):
        time.sleep(6)  # rank 1 waits longer than timeout_min below: never inside a collective
    with open(os.path.join(out, "calls"), "a") as f:
        f.write(f"{rank} {repo}\\n")
    return shutil.copytree(ckpt, os.path.join(out, "cache", repo), dirs_exist_ok=True)

sys.modules["huggingface_hub"] = types.SimpleNamespace(snapshot_download=download)
import torch.distributed as dist
import fsdp, train
d = fsdp.init_distributed("cpu", timeout_min=0.05)
args, _ = train.preflight(train.parse_args(["--model", "someorg/bagel-tiny", "--data", os.path.join(out, "d.jsonl"),
                                         "--output-dir", out, *sys.argv[5:]]), d)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(dict(model=args.model, files=sorted(os.listdir(args.model))), f)
dist.destroy_process_group()
if rank == 1:  # a node without the filesystem of rank 0's cache
    os.path.exists = lambda p, exists=os.path.exists: exists(p) and "cache" not in p
train.main(["--model", "someorg/bagel-tiny", "--data", os.path.join(out, "d.jsonl"), "--output-dir", out,
            *sys.argv[5:]])  # exits 2
"""


def test_hub_id_is_downloaded_once_by_rank_0_for_every_rank(ckpt, tmp_path):
    """2 gloo ranks: rank 0 downloads (for longer than the process group's 3 s timeout: rank 1 waits on
    the store, not in a collective), both get its folder. Then train.main, where rank 1 cannot see that
    folder: both exit with code 2, and rank 0 alone says why, in one line (2 rows: no note on a small source)."""
    jsonl(tmp_path / "d.jsonl", [GOOD] * 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    ranks = [subprocess.Popen([sys.executable, "-c", HUB_RANK, str(r), str(port), ckpt, str(tmp_path), *SMALL],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    (out0, err0), (out1, err1) = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], err0 + err1
    want = str(tmp_path / "cache" / "someorg" / "bagel-tiny")
    assert err0 == f"error: {want}: rank 1 cannot see it, rank 0 can: put it on a filesystem every node shares " \
                   f"(for a hub id: HF_HOME)\n" and err1 == "", err0 + err1
    assert (tmp_path / "calls").read_text() == "0 someorg/bagel-tiny\n" * 2
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == dict(model=want, files=sorted(os.listdir(ckpt))), rank


def test_each_note_prints_once(ckpt, tmp_path, capfd, world1):
    """The checkpoint's geometry line and the data's note on a small source (here: 1 row for 2 worker
    shards) each print once, with the shard count of the run: the start-up checks and then the run's loader."""
    args, checked = train.check_args(train.parse_args(["--model", ckpt, "--data", jsonl(tmp_path / "d.jsonl", [GOOD]),
                                              "--output-dir", str(tmp_path / "out"), *SMALL, "--data.num-workers", "2"]),
                            world1)
    data.PackLoader(args.data, world1.rank, world1.world_size, checked)  # what train() builds
    out, err = capfd.readouterr()
    assert (out + err).count("model geometry: ViT patch 14, 8 patches per side; latent stride 16, 8 latents") == 1
    notes = [line for line in (out + err).splitlines() if "rows for" in line]
    assert len(notes) == 1 and "d.jsonl has 1 rows for 2 shards (ranks x workers)" in notes[0], notes


def test_start_up_opens_each_data_file_and_the_tokenizer_once(ckpt, tmp_path, monkeypatch):
    """Rank 0 checks the data at start-up (train.check_args) and its loader reuses the checked dataset:
    from the start to the first step each data file is opened (parquet footer, jsonl line index) once
    and the tokenizer is loaded once. Catches a loader that builds its sources again."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    calls = Counter()
    real_init, real_tok = data.DataFile.__init__, data.load_tokenizer

    def init(self, path):
        calls[os.path.basename(path)] += 1
        real_init(self, path)
    monkeypatch.setattr(data.DataFile, "__init__", init)
    monkeypatch.setattr(data, "load_tokenizer", lambda model: calls.update(["tokenizer"]) or real_tok(model))
    pq.write_table(pa.table({"messages": [json.dumps(GOOD["messages"])] * 4}), tmp_path / "b.parquet")
    train.main(["--model", ckpt, "--data", jsonl(tmp_path / "a.jsonl", [GOOD] * 4), str(tmp_path / "b.parquet"),
                "--output-dir", str(tmp_path / "out"), "--ckpt.every", "0", *SMALL])
    assert calls == {"a.jsonl": 1, "b.parquet": 1, "tokenizer": 1}, calls


def test_nsa_options_on_an_nsa_checkpoint_are_refused(tmp_path, capsys, no_load):
    """An NSA checkpoint's settings are its own (its weights were trained with them): --nsa.* that differ
    would be silently overwritten, so they are an error."""
    from test_nsa import TINY_NSA
    from test_smoke import tiny_ae, tiny_bagel, write_official
    path = tmp_path / "nsa"
    write_official(path, tiny_bagel(config=TINY_NSA), tiny_ae())
    for f in os.listdir(TOK_DIR):
        shutil.copy(os.path.join(TOK_DIR, f), path)
    argv = ["--model", str(path), "--data", jsonl(tmp_path / "d.jsonl", [GOOD]), "--output-dir", str(tmp_path / "out"),
            *SMALL[:-2]]  # (attn auto: nsa)
    line = user_error(capsys, argv + ["--nsa.topk", str(TINY_NSA.nsa.topk + 1)])
    assert line.startswith(f"error: --nsa.*: {path} has NSA weights trained with its own settings (NSAConfig(")
    assert line.endswith("drop the --nsa.* options")
