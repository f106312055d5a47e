"""bench.py --what gpu, the prepared GPU check, whole on CPU at tiny shapes: the code and orchestration a
GPU runs (a process per part, warm-up and budgets, the summary), with the eager backend in place of
inductor: dynamo traces every compiled block, without code generation (AOT autograd is test_compile's)."""
import time

import pytest
import torch

import bench
from golden import CASES

TINY = bench.Args(what="gpu", device="cpu", tokens=(1200,), layers=1, width=64, heads=4, kv_heads=2, ffn=128,
                  vocab=400, vit_width=64, vit_layers=1, backend="eager")


def planted(a: bench.Args, part: str, conn):
    """A part's process as `bench.run_part`, on one thread (tiny ops: threads only wait on each other),
    plus planted parts: `hangs` after its warm-up and a row, `hangs in warm-up` at once, `rows fail`
    is "one attention" with each row raising."""
    torch.set_num_threads(1)
    if part == "rows fail":
        bench.measure_nsa = lambda *args: 1 / 0  # in this part's process only
        part = "one attention"
    if part.startswith("hangs"):
        if part == "hangs":
            conn.send({"warm": 0.0})
            conn.send({"row": ["before the hang", "fine", True]})
        time.sleep(30)  # longer than any budget below: only a kill ends it in time
        return
    bench.run_part(a, part, conn)


def summary(out: str) -> list[list[str]]:
    """The summary table's rows as [part, what, status, result]."""
    lines = out.split("\nsummary (")[1].splitlines()[1:-1]
    return [[x.strip() for x in line.split(" | ", 3)] for line in lines]


def test_gpu_check_runs_whole_on_cpu(monkeypatch, capsys):
    """Every part in order, each with its rows; a row that raises is a FAIL row and its part goes on; a
    part that raises outside a row is a FAIL row naming the error, one that hangs past its budget is cut
    (its rows sent by then kept); and the run goes on after each."""
    pytest.importorskip("torchao")  # compile+float8, emulated
    parts = list(bench.GPU_BUDGET)
    # "bad part" is no part name: gpu_part fails to read it, outside any row
    monkeypatch.setattr(bench, "GPU_BUDGET", {parts[0]: 60, "bad part": 60, "hangs": 1, "rows fail": 60,
                                              **{p: 60 for p in parts[1:]}})
    bench.bench_gpu(TINY, target=planted)
    out = capsys.readouterr().out
    rows = summary(out)
    want = [[f"{mode},{attn}", f"{mode} {attn}, 1 layer(s), 1200 tok"] for mode, attn in
            (p.split(",") for p in parts if "," in p)]
    want += [["parity", f"flex vs sdpa {dtype} {case}"] for dtype in ("bfloat16", "float32") for case in CASES]
    want += [["one attention", f"Hq=7 Hkv=1 D=128, 1200 tok, {kind}"] for kind in ("sdpa", "nsa")]
    assert [r[:2] for r in rows if r[0] in parts] == want
    assert all(r[2] == "ok" for r in rows if r[0] in parts), [r for r in rows if r[2] != "ok"]
    table = [r for r in rows if "," in r[0]]
    assert all("tok/s/GPU" in r[3] and "mfu" in r[3] and "peak" in r[3] for r in table), table
    assert all(r[3].startswith("fwdbwd " if r[0].endswith("sdpa") else "fwd ") for r in table), table  # CPU: no flex backward
    for p in parts:
        if "," in p:
            assert f"\n{p} | warm-up (compiles) " in out, p
    assert rows[1] == ["bad part", "(the rows after the last above)", "FAIL",
                       "ValueError: not enough values to unpack (expected 2, got 1)"]
    assert rows[2:4] == [["hangs", "before the hang", "ok", "fine"],
                         ["hangs", "(the rows after the last above)", "cut", "cut at its 1 s budget"]]
    failed = [["rows fail", f"Hq=7 Hkv=1 D=128, 1200 tok, {kind}", "FAIL", "ZeroDivisionError: division by zero"]
              for kind in ("sdpa", "nsa")]
    assert rows[4:6] == failed
    assert out.splitlines()[-1] == ("GPU check: FAILED: ['bad part: (the rows after the last above)', "
                                    f"'rows fail: {failed[0][1]}', 'rows fail: {failed[1][1]}']; "
                                    "cut by the budget: ['hangs']")


def test_gpu_check_caps_warm_up_and_total(monkeypatch, capsys):
    """A part still in its warm-up at WARMUP_CAP + its budget is cut; once GPU_TOTAL runs out, the
    parts left are not started, each said so in the summary."""
    monkeypatch.setattr(bench, "GPU_BUDGET", {"hangs in warm-up": 1, "eager,sdpa": 60})
    monkeypatch.setattr(bench, "WARMUP_CAP", 1)
    monkeypatch.setattr(bench, "GPU_TOTAL", 16)  # 2 s spent: 14 s left, under the 15 s a part needs to start
    bench.bench_gpu(TINY, target=planted)
    assert summary(capsys.readouterr().out) == [
        ["hangs in warm-up", "(the rows after the last above)", "cut", "cut in its warm-up"],
        ["eager,sdpa", "(all its rows)", "cut", "not started: 16 s in all ran out"]]
