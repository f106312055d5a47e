"""Start-up of the data pipeline on one node, up to each rank's first pack (a developer's benchmark):

    python train.py --output-dir out/demo --max-steps 1      # once: the demo model and data
    python dev/bench_start.py --model out/demo/base --data big.jsonl --ranks 4

Each rank is a process that does what train.py does with the data before the first step: rank 0
builds its dataset and checks a record of each source (train.check_args), the other ranks start when
it is done (they wait for its preflight), then every rank builds its PackLoader (rank 0 with the
checked dataset) and takes its first pack from its DataLoader workers. Run twice: with no line index
on the node (a fresh $TMPDIR: cold) and with the one the first run left (warm). `--lines N` first
writes a jsonl of N lines, the demo's records over and over (image paths relative to the demo's data).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python dev/...py`: the repo's modules are one folder up


@dataclass
class Args:
    model: str
    """the demo's base checkpoint (out/demo/base): its tokenizer and geometry"""
    data: str
    """a .jsonl file (written first with --lines)"""
    lines: int = 0
    """write `data` first with this many lines of the demo's records (0: use it as it is)"""
    ranks: int = 4
    workers: int = 2
    """DataLoader workers per rank (--data.num-workers)"""


# the demo's data flags (demo.FLAGS)
DEMO = dict(packing_length=384, vae_max_size=32, vae_min_size=16, vit_max_size=56, vit_min_size=56)


def rank_main(a: Args, rank: int, tmp: str):
    """One rank, in its own process as under torchrun; prints (start after imports, loader from, first
    pack, the jsonl index passes it made)."""
    import data
    passes, index_lines = [], data.index_lines
    data.index_lines = lambda path: passes.append(path) or index_lines(path)  # counted: line_index calls it
    from model import read_config
    cfg = data.match_model(data.DataConfig(data=(a.data,), model=a.model, num_workers=a.workers, **DEMO),
                           read_config(a.model))
    t0, ds, checked = time.time(), None, os.path.join(tmp, "checked")
    if rank == 0:
        ds = data.PackedDataset(cfg, 0, a.ranks)
        ds.check_records()
        open(checked, "w").close()
    while not os.path.exists(checked):  # the others wait for rank 0's preflight
        time.sleep(0.01)
    t1 = time.time()
    next(iter(data.PackLoader(cfg, rank, a.ranks, ds)))
    print(json.dumps([t0, t1, time.time(), len(passes)]))


def run(a: Args, tmp: str) -> str:
    if os.path.exists(os.path.join(tmp, "checked")):
        os.remove(os.path.join(tmp, "checked"))
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, TMPDIR=tmp, BENCH_RANK=str(r))) for r in range(a.ranks)]
    got = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    start = got[0][0]
    firsts = ", ".join(f"{t - start:.1f}" for _, _, t, _ in got)
    return (f"rank 0's check {got[0][1] - start:.1f}s | first pack of ranks 0-{a.ranks - 1} at {firsts}s | "
            f"loader to first pack, slowest rank {max(t - b for _, b, t, _ in got):.1f}s | "
            f"index passes {sum(n for *_, n in got)} | (imports before: {start - t0:.1f}s)")


def main():
    a = tyro.cli(Args)
    if "BENCH_RANK" in os.environ:
        return rank_main(a, int(os.environ["BENCH_RANK"]), os.environ["TMPDIR"])
    if a.lines:
        src = os.path.join(os.path.dirname(a.model), "demo_data", "train.jsonl")
        with open(src, "rb") as f:
            recs = f.read().splitlines(keepends=True)
        with open(a.data, "wb") as f:
            for s in range(0, a.lines, len(recs)):
                f.writelines(recs[:min(len(recs), a.lines - s)])
        if os.path.dirname(os.path.abspath(a.data)) != os.path.dirname(os.path.abspath(src)):
            shutil.copytree(os.path.join(os.path.dirname(src), "images"),
                            os.path.join(os.path.dirname(os.path.abspath(a.data)), "images"), dirs_exist_ok=True)
    size = os.path.getsize(a.data)
    print(f"{a.data}: {size / 2**30:.2f} GB | {a.ranks} ranks x {a.workers} workers | load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:  # the node's $TMPDIR: no index in it yet
        print("cold:", run(a, tmp))
        print("warm:", run(a, tmp))


if __name__ == "__main__":
    main()
