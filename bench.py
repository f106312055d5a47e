"""Benchmark the packed BAGEL forward/backward on a synthetic mixed pack (understanding + T2I + edit).

    python bench.py                                   # CPU: 4 layers, width 512, 8k tokens, sdpa + flex table
    python bench.py --layers 28 --width 3584 --heads 28 --kv-heads 4 --ffn 18944 --device cuda --dtype bf16
    python bench.py --tokens 32768 --only fwdbwd --attn flex --device cuda
    python bench.py --what nsa --tokens 4096 16384    # one NSA attention vs dense sdpa, fwd+bwd
    python bench.py --what nsa --device cuda --dtype bf16 --tokens 8192 32768 65536  # + flex, library
    python bench.py --what gpu --tokens 8192 16384 32768    # the prepared GPU check (README)
    python bench.py --what memory                     # BAGEL-7B-MoT GPU memory, LoRA and full (computed)

Each (attention, mode) runs in a fresh subprocess so that peak memory (CUDA: max allocated; CPU:
peak RSS growth over the process's baseline) is its own. Prints tokens/s and, on CUDA, MFU.
Benchmarks of the code rather than of a user's run (data pipeline, video, host time) are in dev/.
"""
import copy
import dataclasses
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import packing
from model import AEConfig, AutoEncoder, Bagel, BagelConfig, LLMConfig, ViTConfig, add_lora, is_lora
from train import peak_flops, step_flops


@dataclass
class Args:
    what: Literal["model", "nsa", "gpu", "memory"] = "model"
    """model: the packed forward/backward; nsa: one NSA attention vs dense sdpa on a causal sample
    (Hq=7, Hkv=1, D=128: one KV group of BAGEL-7B); gpu: the prepared GPU check (golden-pack parity,
    7B-shape table, NSA), see the README; memory: BAGEL-7B-MoT's GPU memory for LoRA and full
    fine-tuning, computed from its shapes (the README's table)"""
    layers: int = 4
    """LLM decoder layers (BAGEL-7B: 28)"""
    width: int = 512
    """LLM hidden size (BAGEL-7B: 3584)"""
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 1536
    vocab: int = 152064
    """the real vocabulary: lm_head cost on CE tokens is part of the picture"""
    vit_layers: int = 2
    vit_width: int = 384
    tokens: tuple[int, ...] = (8192,)
    """pack size (the packing budget); several values with --what nsa"""
    device: str = "cpu"
    dtype: Literal["fp32", "bf16"] = "fp32"
    attn: tuple[str, ...] = ("sdpa", "flex")
    only: Literal["fwd", "fwdbwd", "all"] = "all"
    """fwd: no-grad forward; fwdbwd: forward + backward (not for flex on CPU: no backward there)"""
    repeats: int = 3
    seed: int = 0
    backend: str = "inductor"
    """--what gpu: the torch.compile backend of all it compiles, the compiled blocks and flex outside them
    (the suite's CPU run: eager, dynamo's tracing without code generation)"""
    child: str = ""
    """internal: run one measurement (attn,mode) and print JSON"""


def build(a: Args) -> Bagel:
    """A random BAGEL of the given shapes, made directly in its dtype on the device (28 BAGEL-7B
    layers are 26 GB in bf16: an fp32 copy first would not fit beside them). Values only need to be
    finite: weights N(0, 0.02), norms 1, biases 0."""
    c = BagelConfig(llm=LLMConfig(a.width, a.ffn, a.layers, a.heads, a.kv_heads, a.vocab),
                    vit=ViTConfig(a.vit_width, 4 * a.vit_width, a.vit_layers, a.vit_width // 64),
                    vae=AEConfig())
    from fsdp import reset_pos_tables
    with torch.device("meta"):
        model = Bagel(c)
    model = model.to(torch.bfloat16 if a.dtype == "bf16" else torch.float32).to_empty(device=a.device)
    g = torch.Generator(a.device).manual_seed(a.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(float("norm" in name and name.endswith("weight")))
    reset_pos_tables(model, a.device)
    return model


def mixed_pack(a: Args) -> dict:
    """~`tokens` tokens of understanding (224px ViT + Q + A), T2I (caption + 512px target) and edit
    (512px clean VAE + 224px ViT + instruction + 512px target) samples, in random order."""
    rng = random.Random(a.seed)
    tok = packing.SpecialTokens(*range(a.vocab - 4, a.vocab))  # ids only matter for their count
    img = lambda s: torch.zeros(3, s, s)
    text = lambda n, loss, cfg=0: {"type": "text", "ids": [rng.randrange(a.vocab - 4) for _ in range(n)], "loss": loss, "enable_cfg": cfg}
    kinds = {
        "und": lambda: [{"type": "vit_image", "image": img(224), "loss": 0}, text(40, 0), text(rng.randrange(30, 200), 1)],
        "t2i": lambda: [text(rng.randrange(20, 80), 0, 1), {"type": "vae_image", "image": img(512), "loss": 1}],
        "edit": lambda: [{"type": "vae_image", "image": img(512), "loss": 0, "enable_cfg": 1},
                         {"type": "vit_image", "image": img(224), "loss": 0, "enable_cfg": 1},
                         text(30, 0, 1), {"type": "vae_image", "image": img(512), "loss": 1}],
    }
    layouts, n = [], 0
    while True:
        lay = packing.layout_sample(kinds[rng.choice(list(kinds))](), tok)
        if n + lay.n > a.tokens[0]:
            break
        layouts.append(lay)
        n += lay.n
    batch = packing.collate(layouts, generator=torch.Generator().manual_seed(a.seed))
    imgs = batch.pop("padded_images")
    g = torch.Generator().manual_seed(a.seed)
    batch["padded_latent"] = torch.randn(imgs.shape[0], 16, imgs.shape[2] // 8, imgs.shape[3] // 8, generator=g)
    batch["packed_noise"] = torch.randn(len(batch["packed_vae_token_indexes"]), 64, generator=g)
    return {k: (v.to(a.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def child(a: Args):
    attn, mode = a.child.split(",", 1)
    if a.what == "nsa":
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        return print(json.dumps(measure_nsa(attn, int(mode), dtype, a.device)))
    model = build(a)
    model.attn = attn
    print(json.dumps(time_step(model, mixed_pack(a), mode, a.repeats, a.device)))


def time_step(model: Bagel, batch: dict, mode: str, repeats: int, device: str) -> dict:
    """Median time of `repeats` forwards (+ backwards) after one untimed run (which compiles what is
    compiled), tokens/s, the FLOPs counted (`train.step_flops`, the training log's count), MFU where
    the device's peak is known, peak memory (CUDA: max allocated; CPU: RSS growth over the process's
    baseline)."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        with torch.set_grad_enabled(mode == "fwdbwd"):
            out = model(**batch)
            if mode == "fwdbwd":
                (out["ce"].float().sum() + out["mse"].float().mean()).backward()
        sync()
        times.append(time.perf_counter() - t)
    dt = sorted(times[1:])[len(times[1:]) // 2] if repeats else times[0]
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    flops = step_flops(model.config, [batch]) / (1 if mode == "fwdbwd" else 3)  # training = 3x forward
    peak_fl = peak_flops(torch.device(device))
    res = {"attn": model.attn, "mode": mode, "tokens": batch["sequence_length"], "samples": len(batch["sample_lens"]),
           "seconds": dt, "tok_s": batch["sequence_length"] / dt, "peak_gb": peak / 2**30, "flops": flops,
           "mfu": flops / dt / peak_fl if peak_fl else None}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name()
    return res


SEVEN_B = dict(width=3584, heads=28, kv_heads=4, ffn=18944, vit_width=1152, vit_layers=1, dtype="bf16")  # BAGEL-7B layers
GPU_LAYERS = (1, 4, 28)  # LLM layers of the 7B-shape rows (CPU: 1 and --layers)
NSA_TOKENS = (8192, 32768)
# Seconds of each part's timed rows. A part is a process of its own, killed at its budget (a clean
# stop even inside a kernel); the rows it printed by then count, the rest are reported as cut. Its
# warm-up (the compiles, one per block kind) comes first, capped at WARMUP_CAP and reported apart.
# Estimated on one H100 (not yet run there): about 6 x 60 s of compiles (all six table processes
# together: the eager ones compile flex) + 6 x 45 + 40 + 30 s of rows + start-ups < GPU_TOTAL.
GPU_BUDGET = {f"{mode},{attn}": 45 for mode in ("eager", "compile", "compile+float8") for attn in ("sdpa", "flex")}
GPU_BUDGET.update({"parity": 40, "one attention": 30})
WARMUP_CAP = 100
GPU_TOTAL = 570  # the whole check stops starting parts past this: under 10 minutes in all


def gpu_part(a: Args, part: str, send):
    """One part of the GPU check (a child process of `bench_gpu`): sends {"warm": seconds} once its
    warm-up is done, then {"row": [what, result, ok]} as each row finishes. A row that raises is a
    failed row, not a crash."""
    from golden import CASES, golden_batch, tiny_bagel  # the golden packs and the tiny BAGEL they fit
    dev = a.device
    cuda = dev.startswith("cuda")
    torch.compiler.set_stance(force_backend=a.backend)  # also for the flex kernel the eager model compiles

    def run(what: str, fn):
        try:
            text, ok = fn()
        except Exception as e:  # noqa: BLE001  report and go on: the other rows still count
            text, ok = one_line(e), False
        if cuda:
            torch.cuda.empty_cache()
        send({"row": [what, text, ok]})

    def parity(model, b, tol):
        got = {}
        for attn in ("sdpa", "flex"):
            model.attn = attn
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(cuda):  # CPU: no flex backward, forward only
                out = model(**b)
                if cuda:
                    (out["ce"].float().sum() + out["mse"].float().sum()).backward()
            got[attn] = [out["ce"], out["mse"]] + [p.grad for p in model.parameters() if p.grad is not None]
        err = max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp(min=1e-6)).item()
                  for x, y in zip(got["flex"], got["sdpa"]) if y.numel())
        return f"losses + {len(got['sdpa']) - 2} grads: max err {err:.1e} of the largest value", \
            err < tol and len(got["flex"]) == len(got["sdpa"])

    def one(kind, n):
        r = measure_nsa(kind, n, torch.bfloat16 if cuda else torch.float32, dev)
        return f"fwd+bwd {r['seconds'] * 1e3:.1f} ms | peak {r['peak_gb']:.2f} GiB", True

    if part == "parity":  # bf16 first: its tolerance is the open question
        send({"warm": 0.0})
        for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float32, 1e-3)):  # tol: of the largest |value|
            model = tiny_bagel().to(dev, dtype)
            for case in CASES:
                b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in golden_batch(case).items()}
                run(f"flex vs sdpa {str(dtype)[6:]} {case}", lambda: parity(model, b, tol))
    elif part == "one attention":
        send({"warm": 0.0})
        for n in NSA_TOKENS if cuda else a.tokens:
            for kind in ("sdpa", "flex", "nsa", "nsa-torch") if cuda else ("sdpa", "nsa"):
                run(f"Hq=7 Hkv=1 D=128, {n} tok, {kind}", lambda: one(kind, n))
    else:
        mode, attn = part.split(",")
        table(a, mode, attn, run, send)


def one_line(e: Exception) -> str:
    """An error as a summary row shows it: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"


def table(a: Args, mode: str, attn: str, run, send):
    """Rows of the 7B-shape table for one (mode, attention): mode eager, compile or compile+float8
    (tensorwise; emulated off CUDA), through fsdp.shard_model on one rank as train.py builds its
    model (FSDP, activation checkpointing, compiled blocks, float8 linears), forward + backward in
    bf16 at GPU_LAYERS x --tokens. The warm-up step on the smallest model compiles each block kind
    once; the compiled code is dynamic over lengths, so the timed rows do not compile again."""
    import fsdp
    cuda = a.device.startswith("cuda")
    shapes = dataclasses.replace(a, **SEVEN_B) if cuda else a  # CPU: the given (small) sizes
    d = fsdp.init_distributed("cuda" if cuda else "cpu")
    mesh = fsdp.make_mesh(d, 0)
    how = "fwdbwd" if cuda or attn == "sdpa" else "fwd"  # torch 2.13: no flex backward on CPU

    def make(layers: int, n: int):
        c = dataclasses.replace(shapes, layers=layers, tokens=(n,))
        model = fsdp.shard_model(build(c), mesh, None, ac=True, compile=mode != "eager",
                                 float8="tensorwise" if "float8" in mode else "", float8_emulate=not cuda)
        model.attn = attn
        return model, mixed_pack(c)

    t = time.perf_counter()
    model, batch = make(1, min(a.tokens))
    time_step(model, batch, how, 0, a.device)
    del model, batch
    send({"warm": time.perf_counter() - t})

    def step(layers, n):
        model, batch = make(layers, n)
        r = time_step(model, batch, how, 2, a.device)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "- (peak FLOPs unknown)"
        return (f"{r['mode']} {r['tokens']} tok, {r['samples']} samples | {r['seconds'] * 1e3:.1f} ms | "
                f"{r['tok_s']:,.0f} tok/s/GPU | {r['flops'] / 1e12:.3g} TFLOP (LLM + ViT + lm_head on CE "
                f"tokens + attention; no VAE) | mfu {mfu} | peak {r['peak_gb']:.1f} GiB"), True

    for layers in GPU_LAYERS if cuda else sorted({1, a.layers}):
        for n in a.tokens:
            run(f"{mode} {attn}, {layers} layer(s), {n} tok", lambda: step(layers, n))


# What the forkserver imports once for all parts (torch, dynamo, the model, FSDP, the golden packs), so
# that a part starts in a fork, not a fresh interpreter. Not bench itself: it imports train and so sample,
# whose import asks torch.cuda.is_available(), which initialises CUDA, and a fork of that process cannot use CUDA.
PRELOAD = ["fsdp", "golden"]


def run_part(a: Args, part: str, conn):
    """A part's process (forked by the forkserver): `gpu_part`, its messages sent to `bench_gpu`; an
    error outside a row ends the part, its line sent first (the traceback goes to stderr)."""
    warnings.simplefilter("ignore")
    try:
        gpu_part(a, part, conn.send)
    except Exception as e:
        conn.send({"error": one_line(e)})
        raise


def bench_gpu(a: Args, target=run_part):
    """The prepared GPU check: one command, < 10 minutes on one H100 (GPU_TOTAL), rows printed as
    they finish and a summary table at the end: (1) BAGEL-7B layer shapes on 1, 4 and 28 LLM layers at
    the --tokens sizes, eager vs --compile vs --compile --float8, sdpa vs flex: time, tokens/s/GPU,
    the FLOPs counted, MFU, peak memory, each part's compile warm-up reported apart; (2) sdpa vs flex
    on the golden packs, outputs and every gradient, bf16 and fp32; (3) one attention, sdpa / flex /
    NSA library / NSA PyTorch. `--device cpu` runs the same code with the command line's (small)
    model sizes in place of the 7B shapes and NSA_TOKENS, float8 emulated, forward only for flex.
    `target`: what a part's process runs, `run_part` (tests plant parts that fail or hang)."""
    import multiprocessing
    cuda = a.device.startswith("cuda")
    print(f"GPU check on {torch.cuda.get_device_name(a.device) if cuda else a.device}, torch {torch.__version__}, "
          f"timed budget per part (s) {GPU_BUDGET}, warm-up cap {WARMUP_CAP} s, total {GPU_TOTAL} s", flush=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    rows, t_all = [], time.time()
    for part, budget in GPU_BUDGET.items():
        t, left = time.time(), GPU_TOTAL - (time.time() - t_all)
        if left < 15:
            rows.append((part, "(all its rows)", "cut", f"not started: {GPU_TOTAL} s in all ran out"))
            continue
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(a, part, send), daemon=True)
        proc.start()
        send.close()  # the part holds the only writer now: its exit ends the reads below
        end, warm, error, killed = time.time() + min(WARMUP_CAP + budget, left), None, None, False
        while True:
            if not recv.poll(max(0.0, end - time.time())):
                proc.kill()  # a clean stop even inside a kernel; the rows it sent by now count
                killed = True
                break
            try:
                msg = recv.recv()
            except EOFError:
                break
            if "warm" in msg:  # the budget counts from here: it bounds the timed rows only
                warm = msg["warm"]
                end = time.time() + min(budget, GPU_TOTAL - (time.time() - t_all))
                print(f"{part} | warm-up (compiles) {warm:.1f} s", flush=True)
            elif "error" in msg:
                error = msg["error"]
            else:
                what, text, ok = msg["row"]
                rows.append((part, what, "ok" if ok else "FAIL", text))
                print(f"{part} | {what} | {rows[-1][2]} | {text}", flush=True)
        proc.join()
        recv.close()
        if proc.exitcode:  # killed by us: cut; any other end (an error, the OOM killer): failed
            why = ("cut in its warm-up" if killed and warm is None else f"cut at its {budget} s budget" if killed
                   else error or f"exited with code {proc.exitcode}")
            rows.append((part, "(the rows after the last above)", "cut" if killed else "FAIL", why))
        print(f"{part}: {time.time() - t:.0f} s" + (f" ({warm:.0f} s warm-up, {time.time() - t - warm:.0f} s of "
                                                    f"{budget} s timed)" if warm else ""), flush=True)
    w = max((len(r[1]) for r in rows), default=0)
    print(f"\nsummary ({time.time() - t_all:.0f} s)")
    for part, what, status, text in rows:
        print(f"{part:19s} | {what:{w}s} | {status:4s} | {text}")
    fails = [f"{part}: {what}" for part, what, status, _ in rows if status == "FAIL"]
    cut = sorted({part for part, _, status, _ in rows if status == "cut"})
    print("GPU check: " + (f"FAILED: {fails}" if fails else "no failures") + (f"; cut by the budget: {cut}" if cut else ""))


def measure_nsa(kind: str, n: int, dtype: torch.dtype, device: str, hq: int = 7, hkv: int = 1, d: int = 128) -> dict:
    """Forward + backward of one attention over a single causal sample of n tokens. kind: sdpa, flex,
    nsa (the Triton kernels on CUDA when importable, else the pure-PyTorch path) or nsa-torch (always
    the pure-PyTorch path). On CUDA one untimed warm-up step first (compilation, autotuning)."""
    import nsa
    from model import packed_attention, plan_attention, rope_cos_sin
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv))
    cuda = device.startswith("cuda")
    if kind.startswith("nsa"):
        params = nsa.NSA(nsa.NSAConfig(), 64, hq, hkv, d).to(device, dtype)
        gates = torch.rand(n, hq, 3, generator=g).to(device, dtype).requires_grad_()
        cos, sin = rope_cos_sin(torch.arange(n, device=device), d, 1e6, dtype)
        lay, x = nsa.plan([n], [n], ["causal"], device), nsa.NSAInputs(params, gates, k, cos, sin)
        fn = lambda: nsa.attention(lay, q, k, v, x, library=False if kind == "nsa-torch" else None)
    else:
        plan = plan_attention(kind, [n], [n], ["causal"], device)
        fn = lambda: packed_attention(plan, q, k, v)
    if cuda:
        fn().float().square().mean().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    fn().float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"attn": kind, "tokens": n, "seconds": time.perf_counter() - t, "peak_gb": peak / 2**30}


GB = 1e9
MEMORY_ROWS = [(t, False, r) for t in ("gen", "all") for r in (1, 8, 16, 64)] + [("all", True, 16), ("all", True, 64)]


def activation_gb(c: LLMConfig, tokens: int) -> float:
    """bf16 activations of one pack under activation checkpointing, estimated from the shapes: every
    decoder layer's input (kept for the recompute), plus the one layer recomputed in backward, per
    token: its norms' inputs and outputs (4h), q, k and v after projection, norm and RoPE (3(h + 2kv)),
    the attention output (h), the MLP's gate, up, act(gate) and product (4f), and the gradient through
    it (2h). Leaves out the ViT's, the CE logits (fp32, vocab x CE tokens) and LoRA's rank-wide tensors."""
    h, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    per_token = c.num_hidden_layers * h + 4 * h + 3 * (h + 2 * kv) + h + 4 * f + 2 * h
    return 2 * tokens * per_token / GB


def bench_memory(rows=MEMORY_ROWS) -> list[str]:
    """Computed, not measured: GPU memory of a BAGEL-7B-MoT fine-tune from its shapes on the meta
    device. A LoRA run holds the base in bf16 (2 bytes a parameter) and 16 bytes per adapter
    parameter (fp32 master, gradient, AdamW's two moments); a full fine-tune 16 bytes per parameter;
    the fp32 VAE comes on top, whole on every GPU. Per GPU on 8: the rest sharded 8 ways."""
    with torch.device("meta"):
        base, ae = Bagel(BagelConfig()), AutoEncoder(AEConfig())
    n_base = sum(p.numel() for p in base.parameters())
    bf16, vae = 2 * n_base / GB, 4 * sum(p.numel() for p in ae.parameters()) / GB
    lines = [f"BAGEL-7B-MoT: {n_base / 1e9:.3f}B parameters, {bf16:.2f} GB in bf16; the VAE {vae:.2f} GB in fp32",
             "targets     rank  adapted linears  LoRA params  LoRA state   1 GPU  per GPU on 8"]
    for targets, vit, rank in rows:  # (und equals gen: the two experts have the same shapes)
        model = copy.deepcopy(base)
        n = len(add_lora(model, rank, 2 * rank, 0.0, targets, vit))
        state = 16 * sum(p.numel() for k, p in model.named_parameters() if is_lora(k)) / GB
        lines.append(f"{targets + ' + vit' * vit:10s} {rank:5d} {n:16d} {state / 16 * 1e3:11.2f}M {state:7.2f} GB "
                     f"{bf16 + state + vae:5.1f} GB {(bf16 + state) / 8 + vae:9.1f} GB")
    lines.append(f"full fine-tune: {8 * bf16 + vae:.1f} GB on 1 GPU, {bf16 + vae:.1f} GB per GPU on 8")
    # FSDP holds gathered bf16 copies: the root unit and lm_head for the whole step, and a layer
    # with the next one prefetched
    unit = lambda k: (re.match(r"(language_model\.model\.layers\.\d+|vit_model\.vision_model\.encoder\.layers\.\d+|"
                               r"language_model\.lm_head)\.", k) or [None, "root"])[1]
    units = {}
    for k, p in base.named_parameters():
        units[unit(k)] = units.get(unit(k), 0) + p.numel()
    held = 2 * (units.pop("root") + units.pop("language_model.lm_head")) / GB
    layers = 2 * 2 * max(units.values()) / GB
    acts = {t: activation_gb(base.config.llm, t) for t in (4096, 8192, 16384)}
    lines.append("activations per pack with checkpointing (bf16, estimated): " +
                 ", ".join(f"{t // 1024}k tokens {v:.1f} GB" for t, v in acts.items()) +
                 f"; FSDP's gathered copies: {held:.2f} GB root + lm_head, {layers:.2f} GB two layers")
    for line in lines:
        print(line)
    return lines


def main():
    a = tyro.cli(Args)
    if a.what == "memory":
        return bench_memory()
    if a.child:
        return child(a)
    if a.what == "gpu":
        return bench_gpu(a)
    if a.what == "nsa":
        print(f"one attention, fwd+bwd, {a.dtype}, {a.device}, Hq=7 Hkv=1 D=128 (one KV group of BAGEL-7B), NSA defaults")
        # nsa = the Triton kernels when they apply (CUDA, bf16, library importable), else = nsa-torch
        kinds = ("sdpa", "flex", "nsa", "nsa-torch") if a.device.startswith("cuda") else ("sdpa", "nsa")
        for n in a.tokens:
            for attn in kinds:  # a process each, so each peak is its own
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", f"{attn},{n}"],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(f"{attn:9s} {n:6d} failed: {out.stderr.strip().splitlines()[-1]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{attn:9s} {n:6d} tokens | {r['seconds']:8.2f} s | peak {r['peak_gb']:.2f} GiB")
        return
    modes = ["fwd", "fwdbwd"] if a.only == "all" else [a.only]
    print(f"BAGEL bench: {a.layers} layers, width {a.width}, {a.tokens[0]} token pack, {a.device} {a.dtype}")
    for attn in a.attn:
        for mode in modes:
            if attn == "flex" and mode == "fwdbwd" and not a.device.startswith("cuda"):
                continue  # torch 2.13: no FlexAttention backward on CPU
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{attn},{mode}"]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                print(f"{attn:5s} {mode:7s} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            mfu = f" | mfu {r['mfu']:.1%}" if r.get("mfu") else ""
            print(f"{attn:5s} {mode:7s} | {r['tokens']} tok, {r['samples']} samples | {r['seconds'] * 1e3:8.1f} ms | "
                  f"{r['tok_s']:10,.0f} tok/s | peak {r['peak_gb']:.2f} GiB{mfu}")


if __name__ == "__main__":
    main()
