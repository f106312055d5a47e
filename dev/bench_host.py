"""Host time per micro-step, outside the kernels (a developer's benchmark: where our Python and the
data worker's layout cost time; bench.py measures the model). The model flags are bench.py's:

    python dev/bench_host.py --tokens 8192 16384 32768 --layers 1 --width 3584 --heads 28 --kv-heads 4 --ffn 18944

"""
import dataclasses
import os
import sys
import time

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python dev/...py`: the repo's modules are one folder up

import packing  # noqa: E402
from bench import Args, build, mixed_pack  # noqa: E402
from model import plan_attention  # noqa: E402
from train import to_device  # noqa: E402


def main():
    """Host time per pack of `tokens`: the worker's `packing.attention_layout`, the training process's
    attention structures from it (`plan_attention`), and one sdpa micro-step (forward + backward) of
    the model on the meta device, where no kernel runs: what is left is Python, dispatch and our
    host work, plus PyTorch's meta shape functions (Python, slower than CUDA's), so an upper bound."""
    a = tyro.cli(Args)

    def ms(fn, repeats=5):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times)[repeats // 2] * 1e3

    with torch.device("meta"):
        model = build(dataclasses.replace(a, device="meta")).to("meta")  # (the sin-cos tables too)
    model.attn = "sdpa"
    print(f"host time per micro-step: {a.layers} layers, width {a.width}, ffn {a.ffn}, heads {a.heads}/{a.kv_heads}")
    for n in a.tokens:
        batch = mixed_pack(dataclasses.replace(a, tokens=(n,), device="cpu"))
        lay, sl, spl, modes = batch["attention_layout"], batch["sample_lens"], batch["split_lens"], batch["attn_modes"]
        worker = ms(lambda: packing.attention_layout(sl, spl, modes, lay["vit_seqlens"]))
        plans = {k: ms(lambda: plan_attention(k, sl, spl, modes, a.device, lay)) for k in ("sdpa", "flex")}
        meta = to_device(batch, "meta")

        def step():
            out = model(**meta)
            (out["ce"].mean() + out["mse"].mean()).backward()
        step_ms = ms(step, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()  # top-level aten ops: each is at least one kernel launch on a GPU
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
        print(f"{batch['sequence_length']:6d} tokens, {len(sl):2d} samples, {len(spl):3d} splits | worker layout "
              f"{worker:6.1f} ms | training process: sdpa plan {plans['sdpa']:5.2f} ms, flex BlockMask "
              f"{plans['flex']:5.2f} ms ({a.device}) | meta sdpa fwd+bwd {step_ms:6.0f} ms, {ops} aten ops")


if __name__ == "__main__":
    main()
