"""2 ranks started as torchrun starts them (gloo, one process each, train.main): the start-up check
that every rank sees one --output-dir, and the first error of any rank reported once on rank 0's
output, after which every rank leaves within seconds. `python -m pytest -q test_ranks.py`."""
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

import data as data_lib
from test_paths import write_jsonl
from test_train import RECORDS, ckpt, data_config  # noqa: F401 (a fixture: the tiny checkpoint with the golden tokenizer)

HERE = os.path.dirname(os.path.abspath(__file__))
# the tiny model's geometry, CPU, a few steps, no samples; a collective would wait 5 minutes
SMALL = ["--data.vit-min-size", "14", "--data.vit-max-size", "112", "--data.vae-min-size", "16",
         "--data.vae-max-size", "128", "--eval.every", "0", "--dtype", "fp32", "--no-activation-checkpointing",
         "--attn", "sdpa", "--data.packing-length", "160", "--log-every", "1", "--timeout-min", "5"]
RANK = """
import json, os, sys, time
rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import torch
torch.set_num_threads(1)
import train
if rank == 1 and sys.argv[3] == "bug":  # a bug that only rank 1 meets, at its first step
    def train_step(*a, **k):
        return {}["no such key"]
    train.train_step = train_step
train.main(json.loads(sys.argv[4]))
"""


def run_ranks(argvs: list[list[str]], hook: str = "", wrap=lambda rank: []) -> tuple[list, float]:
    """Both ranks' (exit code, stdout, stderr) and the seconds until both had exited. `wrap(rank)`: a
    command line that the rank's python runs under (a private mount namespace)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    t = time.time()
    ranks = [subprocess.Popen([*wrap(r), sys.executable, "-c", RANK, str(r), str(port), hook or "-", json.dumps(argvs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=240) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    return [(p.returncode, *o) for p, o in zip(ranks, outs)], time.time() - t


def private_mounts() -> bool:
    """Whether this machine lets a user create a mount namespace (unshare -rm)."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_ranks_that_see_another_output_dir_stop_before_anything_is_built(ckpt, tmp_path):
    """Each rank sees its own disk at the same --output-dir path (a bind mount per rank in a private
    mount namespace; where the machine allows none, each rank is given its own path, which is the same
    to the check): both stop at start-up, and rank 0's one `error:` line names rank 1, its host and
    what to do. Catches checkpoints split between node-local disks that report success."""
    data = write_jsonl(tmp_path / "d.jsonl", [RECORDS["text"]] * 4)
    own = [tmp_path / "disk0", tmp_path / "disk1"]
    for p in (*own, tmp_path / "out"):
        p.mkdir()
    argv = lambda out: ["--model", ckpt, "--data", data, "--output-dir", str(out), "--max-steps", "1", *SMALL]
    if private_mounts():
        wrap = lambda r: ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"',
                          str(own[r]), str(tmp_path / "out")]
        ranks, _ = run_ranks([argv(tmp_path / "out")] * 2, wrap=wrap)
    else:
        ranks, _ = run_ranks([argv(own[0]), argv(own[1])])
    (code0, out0, err0), (code1, out1, err1) = ranks
    assert (code0, code1) == (2, 2) and err1 == "", err0 + err1
    host = socket.gethostname()
    assert err0.startswith(f"error: --output-dir {tmp_path / 'out' if private_mounts() else own[0]}: rank 1 ({host}) do "
                           f"not see the files rank 0 ({host}) writes there: ") and "a filesystem all nodes share" in err0
    assert err0.count("\n") == 1 and "bagel-train |" not in out0  # one line, before the model


def test_a_corrupt_file_only_rank_1_reads_reaches_rank_0_and_every_rank_leaves(ckpt, tmp_path):
    """A parquet file whose footer reads, with one row group garbled that only rank 1's DataLoader
    worker reads: rank 0, which waits for rank 1 in a collective, prints the error once, naming rank 1,
    its host, the file and the rows, and both exit with code 2 within seconds, not after the
    collective's 5-minute timeout. Catches an error printed on a rank the user does not watch (or
    inside a worker's traceback), and survivors hanging."""
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"messages": [json.dumps(RECORDS["text"]["messages"])] * 512}), path,
                   row_group_size=64, compression="none", use_dictionary=False)
    # 8 row groups, 4 per rank; rank 0 checks the first row of group 0 at start-up (train.check_args)
    stream = data_lib.PackedDataset(data_config(data=(path,), packing_length=160), 1, 2).stream()
    unit = next(u for u in (stream.next_key()[2] for _ in range(256)) if u != 0)
    with open(path, "r+b") as f:
        f.seek(pq.ParquetFile(path).metadata.row_group(unit).column(0).data_page_offset + 40)
        f.write(b"\xab" * 400)
    argv = ["--model", ckpt, "--data", path, "--output-dir", str(tmp_path), "--max-steps", "20", "--data.num-workers", "1",
            *SMALL]
    ranks, seconds = run_ranks([argv, argv])
    (code0, out0, err0), (code1, out1, err1) = ranks
    assert (code0, code1) == (2, 2) and err1 == "", err0 + err1
    lines = [line for line in err0.splitlines() if not line.startswith("data: ")]  # data.py's note on the units
    assert len(lines) == 1, err0
    assert lines[0].startswith(f"error: rank 1 ({socket.gethostname()}): {path}: row group {unit} (rows {64 * unit}-"
                               f"{64 * unit + 63}): field 'messages': cannot read ("), err0
    assert seconds < 200, seconds  # a guard against waiting out the timeout, not a speed test
    print(f"rank 1's data error: both ranks exited {seconds:.1f}s after the start")


def test_a_bug_on_one_rank_reaches_rank_0_with_its_traceback(ckpt, tmp_path):
    """A bug (a KeyError, no user error) on rank 1 only: rank 0 prints rank 1's traceback and an `error:`
    line naming the rank, and both exit with code 1. Catches a bug's traceback lost on another node,
    or a bug shown as a one-line user error."""
    data = write_jsonl(tmp_path / "d.jsonl", [RECORDS["text"]] * 16)
    argv = ["--model", ckpt, "--data", data, "--output-dir", str(tmp_path), "--max-steps", "3", "--data.num-workers", "0",
            *SMALL]
    (code0, out0, err0), (code1, out1, err1) = run_ranks([argv, argv], hook="bug")[0]
    assert (code0, code1) == (1, 1) and err1 == "", err0 + err1
    err0 = "".join(line for line in err0.splitlines(keepends=True) if not line.startswith("data: "))
    assert err0.startswith("Traceback (most recent call last):") and "in train_step\nKeyError: 'no such key'\n" in err0
    assert err0.endswith(f"error: rank 1 ({socket.gethostname()}): KeyError: 'no such key'\n"), err0


def test_a_start_up_error_that_rank_0_finds_stops_rank_1_waiting_for_it(ckpt, tmp_path):
    """Rank 0 alone runs the start-up checks while rank 1 waits for their outcome in a collective: a bad
    --data path is one line on rank 0, and rank 1 leaves with it. Catches rank 1 waiting out the timeout."""
    argv = ["--model", ckpt, "--data", str(tmp_path / "nowhere.jsonl"), "--output-dir", str(tmp_path), *SMALL]
    (code0, out0, err0), (code1, out1, err1) = run_ranks([argv, argv])[0]
    assert (code0, code1) == (2, 2) and err1 == "", err0 + err1
    assert err0 == f"error: {tmp_path / 'nowhere.jsonl'}: no such file or directory\n"
