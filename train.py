"""Train BAGEL with FSDP2, from a CPU demo to many nodes.

    python train.py                                     # CPU demo: tiny random BAGEL, generated shapes
    torchrun --nproc-per-node 8 train.py --model BAGEL-7B-MoT --data x.parquet

One step: packs -> VAE encode (frozen, no grad) -> forward -> CE and MSE each divided by its GLOBAL
token count (all ranks, all accumulation micro-steps) -> backward -> clip -> non-finite check ->
optimizer -> EMA. Checkpoints are DCP folders output_dir/step-NNNNNNN/ that resume at any world
size. Bug ids (P1, L1, D1...) are the table in DESIGN.md#bugs.
"""
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import pickle
import resource
import sys
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
import tyro

import data as data_lib
import demo
import fsdp
import packing
from data import DataConfig
from packing import UserError
from nsa import NSAConfig
from model import (POS_TABLES, TOP_LEVEL, AutoEncoder, Bagel, BagelConfig, CheckpointReader, add_lora,
                   checkpoint_index, is_lora, lora_target, read_config, resolve)
from sample import Context, generate_image, generate_text, latent_to_pil

# -------------------------------------------------------------------------------------------------
# arguments


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """optimizer; sgd (momentum betas[0]) is for exact parity tests: Adam hides a scaled gradient"""
    lr: float = 2e-5
    """peak learning rate (BAGEL's fine-tuning recipe: 2e-5)"""
    schedule: Literal["constant", "cosine"] = "constant"
    """after the linear warmup: stay at lr, or cosine-decay to min_lr at max_steps"""
    warmup_steps: int = 100
    """linear warmup from lr/warmup_steps to lr"""
    min_lr: float = 1e-7
    """end of the cosine schedule (upstream: 1e-7)"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (upstream BAGEL: 0.9, 0.95)"""
    eps: float = 1e-15
    """AdamW epsilon (upstream BAGEL: 1e-15)"""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping; the norm is logged either way)"""
    grad_accum: int = 1
    """micro-batches (packs) per rank per optimizer step"""
    ema_decay: float = 0.0
    """EMA of the weights, kept as fp32 shards (0: off; upstream pre-training used 0.9999)"""


@dataclass
class CkptConfig:
    every: int = 500
    """save a DCP checkpoint every this many steps (and always at max_steps)"""
    keep_last: int = 3
    """keep only the newest this many checkpoints (0: keep all)"""
    resume: str = "auto"
    """'auto': the newest complete checkpoint in output_dir that verifies and loads (a damaged one is
    skipped with a line naming its file), if any; 'none': start from --model; or a step-NNNNNNN path"""
    verify: Literal["size", "hash"] = "size"
    """what meta.json records of every checkpoint file and a resume checks: its size (free), or also its
    CRC-32 (reads every byte at save and at resume, at disk speed; the only check that sees bytes garbled
    inside a tensor)"""
    async_: Annotated[bool, tyro.conf.arg(name="async")] = False
    """copy the state to host memory and write it in the background (DCP async_save); the next save and
    the end of training wait for it. Costs a second copy of the trained state in host memory"""


@dataclass
class EvalConfig:
    every: int = 500
    """validate and write samples every this many steps (0: never); also at max_steps"""
    data: tuple[str, ...] = ()
    """held-out data for val_ce / val_mse (same formats as --data; the demo holds out part of its set)"""
    packs: int = 8
    """validate on the first this many packs of --eval.data (built once, split over the ranks)"""
    prompts: tuple[str, ...] = ("A photo of a red apple on a wooden table.",)
    """text-to-image prompts"""
    image: tuple[str, ...] = ()
    """images for the understanding sample, the k-th eval asks about the k-th in turn (none: a drawn
    test pattern; the demo: its held-out images)"""
    question: str = "What is in this image?"
    size: int = 512
    """side of the generated images (pixels)"""
    steps: int = 30
    """flow sampling steps"""
    cfg_text_scale: float = 4.0
    """text classifier-free guidance scale"""


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank (0: off, full fine-tuning). On: every weight outside the adapters is frozen in the
    compute dtype; only the adapters train (fp32 masters, optimizer state, EMA, checkpoints)"""
    alpha: float | None = None
    """scale numerator, the update is B A alpha/rank (None: 2 * rank, so the scale stays 2 whatever the
    rank and a learning rate found at one rank carries over to another)"""
    dropout: float = 0.0
    """dropout on the adapters' input (training only)"""
    targets: Literal["gen", "und", "all"] = "gen"
    """decoder q/k/v/o and MLP projections of the generation expert (*_moe_gen), the understanding
    expert, or both"""
    vit: bool = False
    """also adapt the ViT's attention and MLP projections and the connector"""


@dataclass
class Args:
    """Fine-tune BAGEL with FSDP2. Without --model: the CPU demo (demo.py: a tiny random BAGEL,
    generated data, its own settings before the command line's)."""
    model: str = ""
    """BAGEL checkpoint directory (official or HF layout); '' builds the tiny demo model"""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "out"
    """checkpoints, metrics.jsonl, loss.png and samples go here"""
    max_steps: int = 1000
    """optimizer steps; training stops exactly here and saves"""
    ce_weight: float = 1.0
    """weight of the text loss (a token mean over the global batch)"""
    mse_weight: float = 1.0
    """weight of the flow-matching loss (a token mean over the global batch, channels averaged)"""
    timestep_shift: float | None = None
    """training timestep shift (None: the checkpoint's, 1.0 for the released model, DESIGN.md#flow)"""
    freeze: tuple[Literal["und", "vit", "llm", "connector"], ...] = ()
    """frozen parts: und (upstream's freeze_und: no gradient through text/ViT tokens, so only the
    generation path and lm_head train), vit, llm, connector. The VAE is always frozen"""
    visual_und: bool | None = None
    """build the ViT path (None: as the checkpoint says)"""
    visual_gen: bool | None = None
    """build the generation path (None: as the checkpoint says)"""
    attn: Literal["auto", "sdpa", "flex", "nsa"] = "auto"
    """attention backend (auto: nsa if the checkpoint has NSA weights, else flex on CUDA, sdpa on CPU)"""
    nsa: NSAConfig = field(default_factory=NSAConfig)
    """Native Sparse Attention settings, used with --attn nsa on a dense checkpoint (LMMS Engine's names)"""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """compute dtype, also of frozen weights; trained weights' masters, gradients' reduction, optimizer
    state and EMA are always fp32"""
    activation_checkpointing: bool = True
    """recompute each LLM/ViT layer in backward instead of storing its activations"""
    compile: bool = False
    """torch.compile each LLM/ViT layer: one compile per layer kind, dynamic over pack lengths and mixes"""
    float8: Literal["off", "tensorwise", "rowwise"] = "off"
    """float8 matmuls (torchao, optional: pip install torchao) in the LLM decoder projections of both
    experts, with this scaling; weights stay high precision. Needs a GPU of compute capability 8.9+"""
    float8_emulate: bool = False
    """run --float8 emulated (high-precision matmuls): CPU and older GPUs, for checks only"""
    cpu_offload: bool = False
    """keep sharded parameters, gradients and optimizer state in host memory"""
    reshard_after_forward: bool = True
    """free each layer's gathered weights after forward (FULL_SHARD); False keeps them until backward"""
    shard_size: int = -1
    """ranks per shard group: -1 = ranks per node (HSDP across nodes), 0 = all ranks (FSDP)"""
    seed: int = 0
    """noise and VAE posterior samples come from generators seeded by (seed, step, rank, micro-step); the
    data's shuffle, mixture, CFG dropout and timesteps from (seed, shard, ...)"""
    log_every: int = 10
    """print one line and append to metrics.jsonl every this many steps"""
    wandb: str = ""
    """also log the metrics and eval images to this Weights & Biases project ('': off; pip install wandb)"""
    tensorboard: bool = False
    """also log the metrics and eval images to output_dir/tb/ (pip install tensorboard)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available (nccl), else cpu (gloo)"""
    timeout_min: float = 30
    """collective timeout (minutes)"""
    debug: bool = False
    """show the traceback of user errors too (bad paths, options, records), not just their `error:` line"""


def parse_args(argv: list[str] | None = None) -> Args:
    """Args from the command line. Without --model it is the demo: demo.FLAGS go first, so the
    command line's own flags override them and every other option keeps its default above."""
    argv = sys.argv[1:] if argv is None else argv
    console = int(os.environ.get("RANK", 0)) == 0
    args = tyro.cli(Args, args=argv, console_outputs=console)
    return tyro.cli(Args, args=[*demo.FLAGS, *argv], console_outputs=console) if not args.model else args


# -------------------------------------------------------------------------------------------------
# model, freezing, optimizer, schedule

FREEZE = {  # --freeze part -> which official keys it covers
    # und: what gets no gradient once und activations are detached (Bagel.freeze_und): the und expert,
    # embeddings, ViT, connector. Upstream keeps their requires_grad, but they get no gradient and never
    # change; freezing them also drops their fp32 masters and optimizer state. lm_head, the generation
    # expert (*_moe_gen) and NSA's shared compression weights still get gradients, so they train.
    "und": lambda k: (k.startswith(("vit_model.", "connector.")) or k.startswith("language_model.") and
                      not k.startswith("language_model.lm_head.") and "moe_gen" not in k and
                      not (".nsa." in k and "g_proj" not in k)),
    "llm": lambda k: k.startswith("language_model."),
    "vit": lambda k: k.startswith("vit_model."),
    "connector": lambda k: k.startswith("connector."),
}


def config_overrides(args: Args) -> dict:
    """The config fields these args set over the checkpoint's (read_config), for `check_args` and `build_model` alike."""
    return {k: v for k, v in (("visual_und", args.visual_und), ("visual_gen", args.visual_gen),
                              ("timestep_shift", args.timestep_shift)) if v is not None}


def build_model(args: Args, d: fsdp.Dist, mesh, load: bool = True) -> Bagel:
    """Meta build -> freeze (frozen weights in the compute dtype) -> shard -> allocate this rank's
    shards -> rank-0 load + broadcast: everything, or when resuming (load=False) only the frozen
    weights, which checkpoints do not store. `model.frozen_crc32` identifies them (meta.json)."""
    over = config_overrides(args)
    if args.attn == "nsa" and read_config(args.model).nsa is None:
        over["nsa"] = args.nsa  # NSA parameters on a dense checkpoint: created fresh at load
    with torch.device("meta"):
        model = Bagel(read_config(args.model, **over))
    model.attn = None if args.attn == "auto" else args.attn
    model.freeze_und = "und" in args.freeze
    lo = args.lora
    if lo.rank:  # adapters added on the meta device; their init comes with the load (model.fresh_tensors)
        add_lora(model, lo.rank, lo.alpha or 2 * lo.rank, lo.dropout, lo.targets, lo.vit)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    for name, p in model.named_parameters():
        frozen = any(FREEZE[part](name) for part in args.freeze)
        if lo.rank:  # only the adapters train, and NSA's weights when they are new (a dense base), unless --freeze'd
            frozen = frozen or not (is_lora(name) or ("nsa" in over and ".self_attn.nsa." in name))
        p.requires_grad_(not frozen)
        if not p.requires_grad and dtype:  # never updated: no fp32 master needed (half the bytes)
            p.data = p.data.to(dtype)
    fsdp.shard_model(model, mesh, dtype, args.activation_checkpointing, args.compile, args.cpu_offload,
                     args.reshard_after_forward, "" if args.float8 == "off" else args.float8, args.float8_emulate)
    model.to_empty(device="cpu" if args.cpu_offload else d.device)
    frozen = {fsdp.fqn(n) for n, p in model.named_parameters() if not p.requires_grad}
    model.frozen_crc32 = fsdp.load_pretrained(model, args.model, d, None if load else frozen)
    return model


def param_table(model: Bagel, ae: AutoEncoder) -> str:
    groups = {"llm und": lambda k: k.startswith("language_model.") and "moe_gen" not in k,
              "llm gen (moe_gen)": lambda k: "moe_gen" in k,
              "vit": FREEZE["vit"], "connector": FREEZE["connector"],
              "time/vae2llm/llm2vae": lambda k: k.startswith(("time_embedder", "vae2llm", "llm2vae"))}
    rows = ["params               total    trainable  of which LoRA"]
    named = [(fsdp.fqn(n), p) for n, p in model.named_parameters()]
    for g, pick in groups.items():
        ps = [(n, p) for n, p in named if pick(n)]
        if ps:
            count = lambda keep: sum(p.numel() for n, p in ps if keep(n, p)) / 1e6
            rows.append(f"{g:20s} {count(lambda n, p: True):8.2f}M {count(lambda n, p: p.requires_grad):8.2f}M "
                        f"{count(lambda n, p: is_lora(n)):8.3f}M")
    rows.append(f"{'vae (always frozen)':20s} {sum(p.numel() for p in ae.parameters()) / 1e6:8.2f}M {0:8.2f}M {0:8.3f}M")
    return "\n".join(rows)


def make_optimizer(model: Bagel, o: OptimConfig, max_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.betas[0], weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if getattr(model, "float8_all_gather", False):
        opt.register_step_post_hook(lambda *_: fsdp.float8_scales(model))

    def factor(step: int) -> float:  # multiplies lr; `step` = optimizer steps taken so far
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
        return (o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / o.lr
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -------------------------------------------------------------------------------------------------
# one optimizer step

NOISE, POSTERIOR, SAMPLE = 1, 2, 3  # streams of keyed randomness (timesteps: packing.step_generator)
GLOBAL_RNG = 6  # the seed stream of the global RNGs (seed_rng); 4 and 5 are validation's
T_BUCKETS = 4  # the MSE is also logged per quarter of t: an edit model that copies its input shows a
#               small loss at low t and a large one at high t (Bagel #140)


def keyed_generator(seed: int, step: int, pack: int, stream: int, device) -> torch.Generator:
    """A generator that is a function of (seed, step, pack, stream) only: fresh noise every step and
    rank (a fixed reseed would draw the same noise everywhere), identical after a resume, never the
    global RNG. `pack` is
    the global index of a micro-batch in its step, rank * grad_accum + micro, so one rank
    accumulating packs 0..3 draws exactly what two ranks accumulating two each draw."""
    s = np.random.SeedSequence([seed, step, pack, stream]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed((int(s[0]) << 31 | int(s[1])) & (2**63 - 1))


def to_device(batch: dict, device, used_on=None) -> dict:
    """Tensors (the attention layout's too) to `device`. From the loader's pinned memory the copies
    do not block the host, which runs on and queues the next kernels. `used_on`: the CUDA
    stream that will read the tensors when they are copied on another one (record_stream, so the
    allocator does not hand their memory out while that stream may still read it)."""
    def move(v):
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if used_on is not None:
                v.record_stream(used_on)
            return v
        return {k: move(x) for k, x in v.items()} if isinstance(v, dict) else v
    return move(batch)


@functools.lru_cache(maxsize=None)
def copy_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device)


def take(it, n: int, loader, device: torch.device) -> tuple[list[dict], dict, float, object]:
    """One step's packs, taken a step ahead so that their host -> device copies overlap the step
    before: the next `n` packs of `it` (fewer when the data ran out), the loader state once
    they are consumed (what a checkpoint of their step must hold, not the state after the packs
    prefetched behind them, or a resume would skip those), the seconds waited for them, and on CUDA
    the event after their copies (which ran on a side stream) that the compute stream must wait for.
    On CPU there is nothing to overlap: the packs are just taken early."""
    t, batches = time.time(), []
    for _ in range(n):
        try:
            batches.append(next(it))
        except StopIteration:
            break
    state, wait = loader.state_dict(), time.time() - t
    if device.type != "cuda":
        return batches, state, wait, None
    compute, side = torch.cuda.current_stream(device), copy_stream(device)
    with torch.cuda.stream(side):
        batches = [to_device(b, device, compute) for b in batches]
    return batches, state, wait, side.record_event()


def train_step(model: Bagel, ae: AutoEncoder, opt, batches: list[dict], step: int, args: Args,
               d: fsdp.Dist) -> dict | None:
    """Forward/backward over this rank's micro-batches, clip, check, optimizer step. Returns None
    (on every rank) when some rank ran out of data; raises FloatingPointError on a non-finite norm."""
    dev = d.device
    # the global token counts are known before any backward: each micro-batch's loss is its share of
    # one big-batch token mean, whatever the split over ranks and micro-steps (DESIGN.md#losses)
    counts = torch.tensor([sum(len(b["ce_loss_indexes"]) for b in batches),
                           sum(len(b["mse_loss_indexes"]) for b in batches),
                           int(len(batches) < args.optim.grad_accum), int(all(map(data_lib.idle, batches)))],
                          dtype=torch.float64, device=dev)
    dist.all_reduce(counts)
    if counts[2] > 0 or counts[3] == d.world_size:  # no rank has a pack to train (data.PackLoader.padded)
        return None
    n_ce, n_mse = counts[0].clamp(min=1).float(), counts[1].clamp(min=1).float()
    # every micro-batch's copy is queued now (pinned, non-blocking; already done by `take` in train):
    # the host runs on to queue the kernels, and nothing in the micro-steps below waits for the device
    batches = [data_lib.to_float(to_device(b, dev)) for b in batches]  # pixels come as uint8 (data.to_uint8)
    sums = torch.zeros(2, device=dev)
    by_t = torch.zeros(2, T_BUCKETS, device=dev)  # MSE sum and token count per timestep bucket
    for micro, b in enumerate(batches):
        pack = d.rank * args.optim.grad_accum + micro
        # gradients are reduce-scattered within a shard group every micro-step (they stay sharded), and
        # all-reduced across HSDP replicas (between nodes) once per step, after the last backward
        model.set_requires_all_reduce(micro == len(batches) - 1)
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            # frozen VAE outside the sharded model and outside autograd (no gradient, no sharding); the posterior
            # is sampled as upstream does (DESIGN.md#flow), from a keyed generator
            g = keyed_generator(args.seed, step, pack, POSTERIOR, dev)
            b["padded_latent"] = ae.encode(b.pop("padded_images"), generator=g).float()
        out = model(**b, generator=keyed_generator(args.seed, step, pack, NOISE, dev))
        # both terms always enter the loss, even empty, so every parameter gets a gradient on every
        # rank and the reduce-scatters match (a rank without images would otherwise hang the others)
        ce = out["ce"].sum()
        mse = out["mse"].mean(-1).sum() if "mse" in out else ce * 0
        # FSDP averages gradients over ranks; the world size turns that average back into the sum
        loss = (args.ce_weight * ce / n_ce + args.mse_weight * mse / n_mse) * d.world_size
        loss.backward()
        sums += torch.stack([ce.detach(), mse.detach()]).float()
        if "mse" in out:  # t in (0, 1]: bucket 0 = nearly clean, the last = nearly noise
            bucket = (out["mse_t"] * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)
            by_t[0].index_add_(0, bucket, out["mse"].detach().mean(-1))
            by_t[1].index_add_(0, bucket, torch.ones_like(out["mse_t"]))
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, args.optim.grad_clip or float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(norm):  # every rank sees the same global norm, so all stop together
        dist.all_reduce(sums)
        raise FloatingPointError(f"step {step}: gradient norm {norm} (ce {float(sums[0] / n_ce):.4g}, mse "
                                 f"{float(sums[1] / n_mse):.4g}): stopped before the optimizer step; resume "
                                 f"from the last checkpoint with a lower --optim.lr")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(ce=sums[0], mse=sums[1], n_ce=n_ce, n_mse=n_mse, gnorm=norm, by_t=by_t.flatten())


# -------------------------------------------------------------------------------------------------
# throughput: tokens/s and MFU

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12,
              "A800": 312e12, "B200": 2250e12, "L40S": 362e12, "A6000": 155e12}  # dense bf16


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def step_flops(c: BagelConfig, batches: list[dict]) -> float:
    """Training FLOPs of some packs (forward + backward = 3 x forward), from host-side numbers only:
    shapes and host lists, never a device tensor's values (each read would stall the GPU every step).
    Counted: the LLM at 6 * N_active per token (one MoT expert per token: q/k/v/o and the MLP), lm_head
    on CE tokens only, the ViT on its patches, and attention at 12 * layers * heads * head_dim * len^2
    per sample (per image in the ViT), as upstream but with per-sample lengths (LMMS Engine counts a
    pack as one sequence, F7). Not counted: the VAE encoder (frozen and outside the trained model, no
    backward), embeddings, connector, vae2llm/llm2vae, time embedder and norms (< 1% at BAGEL-7B).
    bench.py's MFU uses this function too."""
    l, v = c.llm, c.vit
    hd = l.head_dim
    layer = l.hidden_size * hd * (2 * l.num_attention_heads + 2 * l.num_key_value_heads) + 3 * l.hidden_size * l.intermediate_size
    vit_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
    f = 0.0
    for b in batches:
        lay = b.get("attention_layout")  # packing.collate's host copy; a hand-built batch may lack it
        vit_lens = lay["vit_seqlens"] if lay else [int(s) for s in b.get("vit_token_seqlens", ())]
        f += 6 * (layer * l.num_hidden_layers * b["sequence_length"] + l.hidden_size * l.vocab_size * len(b["ce_loss_indexes"])
                  + vit_layer * v.num_hidden_layers * sum(vit_lens))
        f += 12 * l.num_hidden_layers * l.num_attention_heads * hd * sum(int(s) ** 2 for s in b["sample_lens"])
        f += 12 * v.num_hidden_layers * v.hidden_size * sum(s ** 2 for s in vit_lens)
    return f


def peak_mem_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS (Linux: KiB)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# -------------------------------------------------------------------------------------------------
# validation: fixed held-out packs, timesteps and noise, so the numbers move only with the weights

VAL_NOISE, VAL_POSTERIOR = 4, 5  # keyed streams of the validation packs (step 0, pack = global index)


def build_val_packs(args: Args, ae: AutoEncoder, d: fsdp.Dist) -> list[tuple[int, dict, bool]]:
    """The first --eval.packs packs of --eval.data, built once: no CFG dropout, VAE latents encoded
    once from a keyed posterior sample, and the timesteps of all noisy images on one stratified grid
    t = (i + 0.5) / n over (0, 1), shuffled by the seed, after the model's timestep shift. A training
    pack's MSE depends on its random timesteps (one demo step spans 0.24-0.62 over the quarters of
    t); this one does not. Every rank reads the same packs and keeps every world_size-th; a rank left
    short of packs repeats one without counting it, so that all ranks run as many forwards."""
    cfg = dataclasses.replace(args.data, data=args.eval.data, epochs=1, text_cond_dropout=0.0,
                              vit_cond_dropout=0.0, vae_cond_dropout=0.0)
    ds = data_lib.PackedDataset(cfg)  # rank 0 of 1: the same packs whatever the world size
    packs = [[s.layout for s in pack] for pack, _, _ in itertools.islice(ds.stream(), args.eval.packs)]
    if not packs:
        raise UserError(f"--eval.data {' '.join(args.eval.data)}: no pack could be built")
    first = np.cumsum([0] + [sum(sum(l.vae_noisy) for l in p) for p in packs]).tolist()
    n = first[-1]
    t = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))]
    s = read_config(args.model).timestep_shift if args.timestep_shift is None else args.timestep_shift
    t = t / (s - (s - 1) * t)  # the inverse of model.shift_timesteps: the model sees t on the grid
    raw = torch.log(t / (1 - t)).float()  # collate takes logits (the model applies the sigmoid)
    out = []
    for j in range(d.rank, -(-len(packs) // d.world_size) * d.world_size, d.world_size):
        i = j % len(packs)  # j >= len(packs): a filler that repeats a pack and does not count
        b = to_device(packing.collate(packs[i], timesteps=raw[first[i]:first[i + 1]], geo=ds.geo), d.device)
        with torch.no_grad(), torch.autocast(d.device.type, torch.bfloat16, enabled=d.device.type == "cuda"):
            g = keyed_generator(args.seed, 0, i, VAL_POSTERIOR, d.device)
            b["padded_latent"] = ae.encode(b.pop("padded_images"), generator=g).float()
        out.append((i, b, j < len(packs)))
    return out


@torch.no_grad()
def validate(model: Bagel, packs: list[tuple[int, dict, bool]], args: Args, d: fsdp.Dist) -> dict:
    """val_ce, val_mse: token means over the validation packs of all ranks; val_mse_by_t per quarter
    of t. A function of the weights only: bit-identical across calls and across a resume."""
    sums = torch.zeros(4 + 2 * T_BUCKETS, dtype=torch.float64, device=d.device)  # ce, n_ce, mse, n_mse, by t
    for i, b, counts in packs:
        out = model(**b, generator=keyed_generator(args.seed, 0, i, VAL_NOISE, d.device))
        if not counts:
            continue
        sums[0] += out["ce"].double().sum()
        sums[1] += out["ce"].numel()
        if "mse" in out:
            mse = out["mse"].double().mean(-1)
            sums[2] += mse.sum()
            sums[3] += mse.numel()
            bucket = (out["mse_t"] * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)
            sums[4:4 + T_BUCKETS].index_add_(0, bucket, mse)
            sums[4 + T_BUCKETS:].index_add_(0, bucket, torch.ones_like(mse))
    reshard(model)
    dist.all_reduce(sums)
    ce, n_ce, mse, n_mse = sums[:4].tolist()
    t_sum, t_n = sums[4:].view(2, T_BUCKETS).tolist()
    return dict(val_ce=ce / n_ce if n_ce else None, val_mse=mse / n_mse if n_mse else None,
                val_mse_by_t=[a / n if n else None for a, n in zip(t_sum, t_n)])


def reshard(model: Bagel):
    """Free the gathered weights a no_grad forward leaves behind (the root unit keeps them for a
    backward that never comes)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# -------------------------------------------------------------------------------------------------
# samples and plots

@torch.no_grad()
def evaluate(model: Bagel, ae: AutoEncoder, tok, args: Args, step: int, d: fsdp.Dist):
    """Answer the question about an image (the next of --eval.image) and draw the prompts, with
    model.py's inference helpers. Every rank runs the same calls (the sharded layers gather their weights collectively);
    rank 0 writes output_dir/samples/step-N/: the images, samples.txt, and grid.png with all of
    them captioned."""
    from PIL import Image
    out = os.path.join(args.output_dir, "samples", f"step-{step:07d}")
    tokens = dataclasses.asdict(data_lib.special_tokens(tok))
    c, lines, tiles = model.config, [], []  # tiles: (image, caption) for grid.png
    model.unshard()  # the root unit's weights (embedding, connector, heads) for the direct calls below
    try:
        if c.visual_und:
            images = args.eval.image
            img = (Image.open(images[step // max(args.eval.every, 1) % len(images)]).convert("RGB") if images
                   else demo.draw_shape("square", "blue"))
            x = data_lib.transform(img, "vit", args.data, 1, "eval image")
            ctx = Context(model, tokens)
            ctx.add_vit_image(*packing.vit_tokens(x, args.data.vit_patch_size, c.vit_max_num_patch_per_side))
            ctx.add_text(data_lib.encode(tok, args.eval.question))
            answer = tok.decode(generate_text(ctx, max_new_tokens=32))
            lines.append(f"Q: {args.eval.question}\nA: {answer}")
            tiles.append((img, lines[-1]))
            if d.rank == 0:
                os.makedirs(out, exist_ok=True)
                img.save(os.path.join(out, "question.png"))
        if c.visual_gen:
            for i, prompt in enumerate(args.eval.prompts):
                ctx, uncond = Context(model, tokens), Context(model, tokens)
                ctx.add_text(data_lib.encode(tok, prompt))
                g = keyed_generator(args.seed, step, i, SAMPLE, d.device)
                lat = generate_image(ctx, uncond, args.eval.size, args.eval.size, args.eval.steps,
                                     cfg_text_scale=args.eval.cfg_text_scale, generator=g)
                if d.rank == 0:
                    os.makedirs(out, exist_ok=True)
                    tiles.append((latent_to_pil(ae, lat.float()), prompt))
                    tiles[-1][0].save(os.path.join(out, f"prompt-{i}.png"))
                    lines.append(f"prompt-{i}.png: {prompt}")
    finally:
        reshard(model)
    if d.rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "samples.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        if tiles:
            draw_grid(tiles, os.path.join(out, "grid.png"))
    return lines


GRID_TILE = 2.5  # inches per image in grid.png (250 px at its 100 dpi)


def draw_grid(tiles: list, png: str):
    """The eval images side by side, each with its caption above it (a prompt, or Q and A)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    fig = Figure(figsize=(GRID_TILE * len(tiles), GRID_TILE + 0.6), dpi=100, layout="constrained")
    for ax, (img, caption) in zip(fig.subplots(1, len(tiles), squeeze=False)[0], tiles):
        ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
        ax.set_title(caption, fontsize=9, wrap=True)
        ax.axis("off")
    fig.savefig(png)


# -------------------------------------------------------------------------------------------------
# metrics: metrics.jsonl always; wandb and TensorBoard when asked (imported only then)

def open_loggers(args: Args, config: dict, rank: int) -> list:
    """--wandb / --tensorboard, each as (scalars(row), image(tag, png, step)). Imported on every
    rank, so a missing package stops all ranks at start-up; only rank 0 logs. Both flush as they go
    (wandb finishes its run at exit), so there is nothing to close."""
    loggers = []
    if args.wandb:
        try:
            import wandb
        except ImportError:
            raise UserError(f"--wandb {args.wandb}: the wandb package is not installed (pip install wandb)") from None
        if rank == 0:
            run = wandb.init(project=args.wandb, config=config, dir=args.output_dir)
            loggers.append((lambda row: run.log(flat_scalars(row), step=row["step"]),
                            lambda tag, png, step: run.log({tag: wandb.Image(png)}, step=step)))
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)") from None
        if rank == 0:
            from PIL import Image
            tb = SummaryWriter(os.path.join(args.output_dir, "tb"))

            def scalars(row):
                for k, v in flat_scalars(row).items():
                    tb.add_scalar(k, v, row["step"])
                tb.flush()

            def image(tag, png, step):
                tb.add_image(tag, np.array(Image.open(png).convert("RGB")), step, dataformats="HWC")
                tb.flush()
            loggers.append((scalars, image))
    return loggers


def flat_scalars(row: dict) -> dict:
    """{'mse_by_t': [a, b], 'skipped': {'too_long': 3}} -> {'mse_by_t/0': a, 'mse_by_t/1': b,
    'skipped/too_long': 3}: what wandb and TensorBoard plot. None (no tokens in that bucket) is left out."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict | list):
            items = v.items() if isinstance(v, dict) else enumerate(v)
            out.update({f"{k}/{i}": float(x) for i, x in items if x is not None})
        elif v is not None and k != "step":
            out[k] = float(v)
    return out


def write_metrics(row: dict, path: str, loggers: list):
    """One row of metrics.jsonl, also sent to every logger (rank 0 only calls this)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    for scalars, _ in loggers:
        scalars(row)


def val_text(val: dict) -> str:
    if not val:
        return ""
    by_t = "/".join("-" if v is None else f"{v:.4f}" for v in val["val_mse_by_t"])
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    return f" | val_ce {fmt(val['val_ce'])} | val_mse {fmt(val['val_mse'])} (t quarters {by_t})"


def plot_losses(metrics: str, png: str):
    """loss.png (800 x 400 px): train and val cross-entropy (left) and flow MSE (right) against
    step; a log y axis where a panel spans more than a decade. Returns the figure (None: < 2 rows)."""
    from matplotlib.figure import Figure
    rows = [json.loads(x) for x in open(metrics)] if os.path.exists(metrics) else []
    if len(rows) < 2:
        return
    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    for ax, key, name in zip(fig.subplots(1, 2), ("ce", "mse"), ("text cross-entropy", "flow-matching MSE")):
        vals = []
        for k, style, label in ((key, "-", "train"), (f"val_{key}", "o-", "val (held out)")):
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=3)
                vals += [v for _, v in pts]
        if vals and min(vals) > 0 and max(vals) / min(vals) > 10:
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=f"{name} (token mean)", title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(png)
    return fig


# -------------------------------------------------------------------------------------------------

# errors: a `packing.UserError` (a bad path, option, record or checkpoint: its message says what and
# where) ends the run with one `error:` line and exit code 2; anything else is a bug and keeps its
# traceback (exit code 1). With several ranks, the first error of any rank reaches rank 0's output.

def main(argv: list[str] | None = None):
    args = parse_args(argv)
    d = fsdp.init_distributed(args.device, args.timeout_min)
    relay = Relay(d, args.debug) if d.world_size > 1 else None
    try:
        train(args, d)
    except Exception as e:
        if relay:
            relay.fail(e)  # does not return: reported once on rank 0, every rank leaves
        if args.debug or not isinstance(e, UserError):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        dist.destroy_process_group()


RELAY_GRACE_S = 0.5  # after the first error, rank 0 waits this long for errors raised at the same moment
RELAY_WAIT_S = 30  # the longest a rank waits on the store for the others while leaving


class Relay:
    """Reports the first error of any rank on rank 0's output, once, and ends every rank promptly.

    The error travels on the launcher's key-value store, not a collective: the failing rank is often
    the one the others wait for in a collective, which would run on until its timeout (30 minutes by
    default, on NCCL), and a rank on another node prints where the user may never look. A watcher
    thread on every rank waits for an error key; the failing rank's own thread writes it. Rank 0
    prints the lowest rank's error among those raised within RELAY_GRACE_S of the first (an error
    that all ranks raise alike, such as a path one rank cannot see, is then rank 0's own), then every
    rank exits with its code, DataLoader workers first."""

    def __init__(self, d: fsdp.Dist, debug: bool):
        self.d, self.debug, self.once = d, debug, threading.Lock()
        threading.Thread(target=self.watch, args=(d.store.clone(),), daemon=True).start()

    def watch(self, store):
        try:
            while not store.check(["errors"]):
                try:
                    store.wait(["errors"], timedelta(minutes=10))
                except dist.DistStoreError:  # a timeout (or the store's end: then `check` raises)
                    pass
        except Exception:  # the store is gone: the run is over
            return
        self.leave(store, None)

    def fail(self, e: Exception):
        """This rank's error: write it to the store and leave (printed by rank 0)."""
        user = isinstance(e, UserError)
        error = dict(rank=self.d.rank, host=socket.gethostname(), code=2 if user else 1,
                     message=str(e) if user else f"{type(e).__name__}: {e}",
                     trace="" if user and not self.debug else traceback.format_exc())
        try:
            self.d.store.set(f"error{self.d.rank}", json.dumps(error))
            self.d.store.add("errors", 1)
        except Exception:  # no store (the launcher died): this rank says it itself
            self.print(error)
            self.exit(error["code"])
        self.leave(self.d.store, error)

    def leave(self, store, own: dict | None):
        with self.once:  # the second thread to get here waits until the first one ends the process
            d = self.d
            if d.rank == 0:
                time.sleep(RELAY_GRACE_S)
                first = next(json.loads(store.get(f"error{r}")) for r in range(d.world_size)
                             if store.check([f"error{r}"]))
                self.print(first)
                store.set("printed", str(first["code"]))
                deadline = time.time() + RELAY_WAIT_S  # rank 0 may host the store: keep it until all have read
                while store.add("left", 0) < d.world_size - 1 and time.time() < deadline:
                    time.sleep(0.05)
                self.exit(first["code"])
            code = own["code"] if own else 1
            try:
                store.wait(["printed"], timedelta(seconds=RELAY_WAIT_S))
                code = own["code"] if own else int(store.get("printed"))
                store.add("left", 1)
            except Exception:  # rank 0 is gone: this rank's error would be lost, so it says it itself
                if own:
                    self.print(own)
            self.exit(code)

    def print(self, error: dict):
        where = "" if error["rank"] == 0 and self.d.rank == 0 else f"rank {error['rank']} ({error['host']}): "
        print(f"{error['trace']}error: {where}{error['message']}", file=sys.stderr, flush=True)

    @staticmethod
    def exit(code: int):
        """Leave now, from either thread: the main one may be inside a collective that never ends."""
        for p in multiprocessing.active_children():  # DataLoader workers would wait for their parent
            p.kill()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def preflight(args: Args, d: fsdp.Dist) -> tuple[Args, "data_lib.PackedDataset | None"]:
    """Rank 0 runs `check_args` and every rank gets the args it returns (an error of rank 0 reaches
    the others through `Relay`); rank 0 also gets the dataset it checked (None on the others). So a
    typo in a data path costs seconds, not the minutes of loading 29 GB. The others wait on the
    launcher's store, not in a collective: a hub download on rank 0 may take longer than the process
    group's timeout (--timeout-min)."""
    dataset = None
    if d.rank == 0:
        args, dataset = check_args(args, d)
    if d.store is not None:  # several ranks
        if d.rank == 0:
            d.store.set("preflight", pickle.dumps(args))
        else:
            while True:
                try:
                    d.store.wait(["preflight"], timedelta(minutes=10))
                    break
                except dist.DistStoreError:  # still checking (or downloading); rank 0's error ends this rank
                    continue
            args = pickle.loads(d.store.get("preflight"))
    # every rank must see what rank 0 checked: not so for a node-local disk (or hub cache) on several nodes
    seen = lambda p: data_lib.is_remote(p) or os.path.exists(p) or os.path.exists(p.rpartition(":")[0])  # path:weight
    missing = [p for p in (args.model, *args.data.data) if not seen(p)]
    unseen = [None] * d.world_size
    dist.all_gather_object(unseen, missing)
    for rank, paths in enumerate(unseen):
        if paths:
            raise UserError(f"{paths[0]}: rank {rank} cannot see it, rank 0 can: put it on a filesystem every node "
                            f"shares (for a hub id: HF_HOME)")
    return args, dataset


SHARED_TOKEN = ".rank0-token"  # written into --output-dir at start-up by rank 0, read back by every rank


def check_output_dir(path: str, d: fsdp.Dist):
    """Every rank must see the one --output-dir: all ranks write each checkpoint into one folder, and
    read it back to resume. Rank 0 writes a token there that every rank reads back; a rank that finds
    another (a node-local disk mounted at the same path) stops the run, before anything is built."""
    token = [f"{socket.gethostname()} {os.getpid()} {time.time_ns()}"]  # rank 0's is new at every start
    if d.rank == 0:
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, SHARED_TOKEN), "w") as f:
                f.write(token[0])
        except OSError as e:
            raise UserError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None
    dist.broadcast_object_list(token, src=0)
    for attempt in range(3):  # a network filesystem may show a new file to other nodes a moment later
        try:
            with open(os.path.join(path, SHARED_TOKEN)) as f:
                seen = f.read() == token[0]
        except OSError:
            seen = False
        if seen or attempt == 2:
            break
        time.sleep(1)
    blind = [None] * d.world_size
    dist.all_gather_object(blind, None if seen else f"rank {d.rank} ({socket.gethostname()})")
    if d.rank == 0:
        os.remove(os.path.join(path, SHARED_TOKEN))
    if any(blind):
        raise UserError(f"--output-dir {path}: {', '.join(b for b in blind if b)} do not see the files rank 0 "
                        f"({token[0].split()[0]}) writes there: every rank writes checkpoints into one folder and "
                        f"reads them back to resume, so --output-dir must be on a filesystem all nodes share")


def check_args(args: Args, d: fsdp.Dist) -> tuple[Args, "data_lib.PackedDataset"]:
    """Everything that can be checked without reading a weight: options, the model folder
    (configs, weight files' headers, names and shapes against the config), every --data source and its
    first record under these options. Every option conflict is collected and reported in one error.
    Returns args with the model path resolved (hub id -> cache folder), the data geometry taken from
    the model and the data seeded by --seed, and the PackedDataset checked: rank 0's, for its loader."""
    bad = []
    if args.cpu_offload and d.device.type != "cuda":
        bad.append("--cpu-offload moves GPU shards to host memory: on CPU they are there already")
    if args.attn == "flex" and d.device.type != "cuda":
        bad.append("--attn flex has no backward on CPU: use --attn sdpa (or auto)")
    try:
        fsdp.mesh_shape(d.world_size, d.local_world_size if args.shard_size < 0 else args.shard_size)
    except UserError as e:
        bad.append(str(e))
    lo = args.lora
    if lo.rank < 0 or not 0 <= lo.dropout < 1 or (lo.alpha is not None and lo.alpha <= 0):
        bad.append(f"--lora.rank {lo.rank} --lora.alpha {lo.alpha} --lora.dropout {lo.dropout}: need a rank >= 0 "
                   f"(0: off), alpha > 0 and dropout in [0, 1)")
    for path in args.eval.image if args.eval.every else ():  # read at the eval steps, possibly hours in
        from PIL import Image
        try:
            Image.open(path).verify()
        except OSError as e:
            bad.append(f"--eval.image {path}: cannot read the image ({e})")

    cfg = model = None
    try:
        model = os.path.abspath(resolve(args.model))  # args.json tells convert_weights.py
        if not os.path.isdir(model):
            raise UserError(f"--model {args.model}: not a directory")
        cfg = read_config(model, **config_overrides(args))
        bagel_index, ae_index = checkpoint_index(model)  # every weight file present, its header readable
        with torch.device("meta"):
            net, ae = Bagel(cfg), AutoEncoder(cfg.vae)
        off = tuple(p + "." for p in TOP_LEVEL if not hasattr(net, p))  # parts switched off are not loaded
        for m, index, skip in ((net, bagel_index, off), (ae, ae_index, ())):
            reader = CheckpointReader({k: tuple(v.shape) for k, v in m.state_dict().items() if k not in POS_TABLES},
                                      index, model, skip)
            reader.close()
            if reader.error:
                raise UserError(reader.error)
    except UserError as e:  # the model's problem: options that need it wait
        bad.append(str(e))
        cfg = None
    if cfg is not None:
        if cfg.nsa is not None and args.nsa != NSAConfig() and args.nsa != cfg.nsa:  # its weights fix them
            bad.append(f"--nsa.*: {args.model} has NSA weights trained with its own settings ({cfg.nsa}): "
                       f"drop the --nsa.* options")
        names = [n for n, _ in net.named_parameters()]
        if all(any(FREEZE[part](n) for part in args.freeze) for n in names):
            bad.append(f"--freeze {' '.join(args.freeze)} leaves nothing to train")
        # an adapter in a frozen part would never change (--freeze und cuts the gradient of the und expert,
        # the ViT and the connector): refused rather than carried along at zero
        lost = [n[:-len(".weight")] for n in names if lo.rank and n.endswith(".weight") and
                lora_target(n[:-len(".weight")], lo.targets, lo.vit) and any(FREEZE[part](n) for part in args.freeze)]
        if lost:
            bad.append(f"--lora.targets {lo.targets}{' --lora.vit' if lo.vit else ''} with --freeze {' '.join(args.freeze)}: "
                       f"{len(lost)} adapted linears (e.g. {lost[0]}) are in a frozen part and would never train: "
                       f"adapt only parts that train (with --freeze und: --lora.targets gen, no --lora.vit)")
        if args.eval.every and cfg.visual_gen and (why := data_lib.draw_size_problem("--eval.size", args.eval.size, cfg)):
            bad.append(why)
        # the data must match the model: geometry, tokenizer and switched-off parts come from its config
        data = data_lib.match_model(dataclasses.replace(args.data, model=args.data.model or model, seed=args.seed), cfg)
        bad += data.problems()
    if bad:
        try:  # a missing data file is worth knowing in the same round
            data_lib.find_sources(args.data.data)
        except UserError as e:
            bad.append(str(e))
        raise UserError(bad[0] if len(bad) == 1 else
                                f"{len(bad)} problems:\n  " + "\n  ".join(bad))

    print(f"data: {data_lib.geometry_line(data)}, from {model}", flush=True)
    # options, tokenizer, every source found, known and readable: rank 0's dataset, which its loader reuses
    dataset = data_lib.PackedDataset(data, 0, d.world_size)
    if not data.skip_bad:  # a record of each source's first unit parses and fits --data.packing-length
        dataset.check_records()
    return dataclasses.replace(args, model=model, data=data), dataset


def seed_rng(seed: int, d: fsdp.Dist):
    """Seed the global RNGs of the CPU and the device, per rank (LoRA dropout draws from them; noise and
    timesteps do not, they are keyed). Checkpoints save and restore both (fsdp.rng_state)."""
    s = np.random.SeedSequence([seed, d.rank, GLOBAL_RNG]).generate_state(2, np.uint32)
    torch.manual_seed((int(s[0]) << 31 | int(s[1])) & (2**63 - 1))


def train(args: Args, d: fsdp.Dist):
    log = functools.partial(print, flush=True) if d.rank == 0 else (lambda *a, **k: None)
    check_output_dir(args.output_dir, d)  # before anything is written there
    if not args.model:  # the demo: rank 0 writes a base checkpoint and data, then it is a normal run
        args = demo.setup(args, d)
    args, dataset = preflight(args, d)  # every user error that is cheap to find, before any weight is read
    args_json = dataclasses.asdict(args)
    if d.rank == 0:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(args_json, f, indent=1)
    loggers = open_loggers(args, args_json, d.rank)  # before the model: a missing package fails fast
    mesh = fsdp.make_mesh(d, args.shard_size)
    log(f"bagel-train | {d.world_size} ranks, mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))} | {d.device} | "
        f"{args.dtype} compute, fp32 master | torch {torch.__version__} | git {fsdp.git_rev()}")

    resume = fsdp.resume_point(args.output_dir, args.ckpt.resume, d)
    if resume:
        fsdp.check_options(resume, args_json)  # before anything is built: a mismatch is a shape error deep in DCP

    t0 = time.time()
    model = build_model(args, d, mesh, load=resume is None)
    ae = AutoEncoder.from_pretrained(args.model, device=d.device)  # frozen, eval, requires_grad False
    rss = [None] * d.world_size
    dist.all_gather_object(rss, round(peak_mem_gb(torch.device("cpu")), 2))
    log(f"built {args.model} in {time.time() - t0:.1f}s | peak host RSS per rank (GB): {rss}")
    log(param_table(model, ae))
    opt, sched = make_optimizer(model, args.optim, args.max_steps)
    ema = fsdp.ema_init(model) if args.optim.ema_decay > 0 else None
    loader = data_lib.PackLoader(args.data, d.rank, d.world_size, dataset)  # rank 0: the checked sources
    val_packs = build_val_packs(args, ae, d) if args.eval.data and args.eval.every else []
    step = resume_from(resume, args, d, model, opt, sched, ema, loader, log) if resume else 0
    if step >= args.max_steps:
        return log(f"already at step {step} >= max_steps {args.max_steps}: nothing to do "
                   f"(--ckpt.resume none starts over)")

    saver, meter = Saver(args, d, args_json, model, opt, sched, ema), Meter(args, d, loader, loggers, step)
    it = loader.padded()  # a rank whose data ran out steps along with idle packs
    ahead = take(it, args.optim.grad_accum, loader, d.device)
    meter.waited(ahead[2])
    while step < args.max_steps:
        batches, data_state, _, copied = ahead
        if copied is not None:
            torch.cuda.current_stream(d.device).wait_event(copied)
        ahead = take(it, args.optim.grad_accum, loader, d.device)  # copies overlap this step
        meter.waited(ahead[2])
        lr = sched.get_last_lr()[0]
        s = train_step(model, ae, opt, batches, step, args, d)
        if s is None:  # every rank's data ran out (--data.epochs): ranks step together, so all stop here
            log(out_of_data(step, loader, batches + ahead[0], d))
            log(loader.log_line())  # rank 0's shards: skips, cuts and the images its resize treated badly
            saver.save(step, data_state, again=False)
            break
        sched.step()
        if ema is not None:
            fsdp.ema_update(ema, model, args.optim.ema_decay)
        step += 1
        meter.add(s, batches, model.config)
        eval_now = args.eval.every and (step % args.eval.every == 0 or step == args.max_steps)
        meter.log(step, lr, s["gnorm"], validate(model, val_packs, args, d) if val_packs and eval_now else {})
        if (args.ckpt.every and step % args.ckpt.every == 0) or step == args.max_steps:
            saver.save(step, data_state)
        if eval_now:
            write_samples(model, ae, loader.dataset.tok, args, step, d, loggers, log)
    saver.wait()  # the run ends when its last checkpoint is complete


def resume_from(path: str, args: Args, d: fsdp.Dist, model, opt, sched, ema, loader, log) -> int:
    """Load the checkpoint at `path` into model, optimizer and EMA, then the schedule and the data position;
    returns its step. With --ckpt.resume auto, a checkpoint that verified but fails to load is skipped
    for the one before it (fsdp.Damaged: bytes that do not read, never a checkpoint of other options)."""
    while True:
        try:
            trainer, ranks = fsdp.load_checkpoint(path, model, opt, ema, d, model.frozen_crc32)
            break
        except fsdp.Damaged as e:
            if args.ckpt.resume != "auto":
                raise UserError(f"--ckpt.resume {path}: damaged checkpoint: {e}") from None
            log(f"checkpoint {path} is damaged, skipped: {e}")
            path = fsdp.resume_point(args.output_dir, "auto", d, before=os.path.basename(path))
            fsdp.check_options(path, dataclasses.asdict(args))  # never None: resume_point stops when no older one is left
    sched.load_state_dict(trainer["sched"])
    states = [r["data"] for r in ranks]
    if len(states) == d.world_size and states[0]["num_workers"] == args.data.num_workers:
        loader.load_state_dict(states[d.rank])  # exact: the same packs as an uninterrupted run
    else:  # which rank reads which record depends on world size and workers
        loader.continue_from(states)
        log(f"data: saved by {len(states)} ranks, resumed on {d.world_size}: the stream continues from the "
            f"first record any old rank had not used (none skipped, a few read twice)")
    log(f"resumed from {path} at step {trainer['step']}")
    return trainer["step"]


def out_of_data(step: int, loader, untrained: list[dict], d: fsdp.Dist) -> str:
    """The line saying the data ran out. `untrained`: the packs of this step and those taken for the
    next (the loader counts them as consumed); with the rows the ranks still hold, they go untrained."""
    untrained = [b for b in untrained if not data_lib.idle(b)]  # idle packs carry no records
    left = torch.tensor(loader.rows_left() + sum(len(b["sample_lens"]) for b in untrained), device=d.device)
    dist.all_reduce(left)
    return (f"step {step}: the data ran out (--data.epochs): every rank trained all its records"
            + (f" but {int(left):,}" if left else "") + "; saving and stopping")


class Saver:
    """Checkpoints of the run, synchronous or (--ckpt.async) written in the background."""

    def __init__(self, args: Args, d: fsdp.Dist, args_json: dict, model, opt, sched, ema):
        self.args, self.d, self.args_json, self.state = args, d, args_json, (model, opt, sched, ema)
        self.pending = None  # the async save still being written
        self.saver = fsdp.async_saver(d) if args.ckpt.async_ else None  # the background writer's group and buffers

    def save(self, step: int, data_state: dict, again: bool = True):
        """Save step `step` (after the previous async save is complete). `data_state`: the loader's state
        after the packs of `step`, not after those prefetched (`take`). again=False: not over a complete
        checkpoint of this step (a kill during that rewrite would corrupt the newest one)."""
        args, d, (model, opt, sched, ema) = self.args, self.d, self.state
        t = time.time()
        self.wait()
        t_wait, path = time.time() - t, fsdp.step_dir(args.output_dir, step)
        if not again and os.path.exists(os.path.join(path, "meta.json")):
            return
        self.pending = fsdp.save_checkpoint(path, model, opt, ema, dict(step=step, sched=sched.state_dict()),
                                            dict(data=data_state), d, self.args_json,
                                            dict(step=step, base=args.model, frozen_crc32=model.frozen_crc32),
                                            args.ckpt.verify, args.ckpt.keep_last, self.saver)
        if d.rank == 0:
            how = "staged" if self.pending else "saved"  # the stall training sees: waiting for the last one + this one
            print(f"{how} {path}: training stalled {time.time() - t:.2f}s (waiting for the previous save {t_wait:.2f}s)",
                  flush=True)
            plot_losses(os.path.join(args.output_dir, "metrics.jsonl"), os.path.join(args.output_dir, "loss.png"))

    def wait(self):
        self.pending = fsdp.wait_saved(self.pending, self.d)


class Meter:
    """Sums the steps of a log window on the device and writes one line per --log-every steps (and at
    the end): the only host sync for logging is one all-reduce of a small vector per log step."""

    def __init__(self, args: Args, d: fsdp.Dist, loader, loggers: list, step: int):
        self.args, self.d, self.loader, self.loggers = args, d, loader, loggers
        self.path, self.peak = os.path.join(args.output_dir, "metrics.jsonl"), peak_flops(d.device)
        self.bar = d.rank == 0 and sys.stdout.isatty()
        # ce, mse, n_ce, n_mse, tokens, flops, data-wait seconds, then MSE sums and counts per t bucket
        self.window = torch.zeros(7 + 2 * T_BUCKETS, dtype=torch.float64, device=d.device)
        self.t_log, self.t_start, self.start = time.time(), time.time(), step

    def add(self, s: dict, batches: list[dict], config: BagelConfig):
        """One step's numbers, from train_step (device tensors) and the host: nothing is read back."""
        w = self.window
        w[:4] += torch.stack([s["ce"], s["mse"], s["n_ce"], s["n_mse"]]).double()
        w[4] += sum(b["sequence_length"] for b in batches)
        w[5] += step_flops(config, batches)
        w[7:] += s["by_t"].double()

    def waited(self, seconds: float):
        """Seconds spent waiting for packs, counted in the window they were spent in (packs are taken a
        step ahead: the wait for step k + 1's packs happens during step k)."""
        self.window[6] += seconds

    def log(self, step: int, lr: float, gnorm: float, val: dict):
        args, d = self.args, self.d
        if not (step % max(1, args.log_every) == 0 or step == args.max_steps):
            if val and d.rank == 0:  # an eval step that is no log step
                print(f"step {step}/{args.max_steps}" + val_text(val), flush=True)
                write_metrics(dict(step=step, **val), self.path, self.loggers)
            elif self.bar:
                done = int(30 * step / args.max_steps)
                print(f"\rstep {step}/{args.max_steps} [{'#' * done}{'.' * (30 - done)}]", end="", flush=True)
            return
        dist.all_reduce(self.window)
        window = self.window.tolist()  # the one read back
        self.window.zero_()
        ce, mse, n_ce, n_mse, tokens, flops, wait = window[:7]
        n_ce, n_mse = n_ce / d.world_size, n_mse / d.world_size  # counts were already global
        t_sum, t_n = window[7:7 + T_BUCKETS], window[7 + T_BUCKETS:]
        now, stats = time.time(), self.loader.stats()
        dt, eta = now - self.t_log, (now - self.t_start) / (step - self.start) * (args.max_steps - step)
        self.t_log = now
        row = dict(step=step, ce=ce / max(n_ce, 1), mse=mse / max(n_mse, 1), lr=lr, gnorm=gnorm,
                   tok_s=tokens / dt, mfu=flops / dt / (self.peak * d.world_size) if self.peak else None,
                   mem_gb=peak_mem_gb(d.device), padding=stats["padding"], skipped=stats["skipped"],
                   time=now - self.t_start, data_wait=wait / d.world_size / dt,
                   mse_by_t=[a / n if n else None for a, n in zip(t_sum, t_n)], mse_t_tokens=t_n, **val)
        if d.rank != 0:
            return
        mfu = f"{100 * row['mfu']:.1f}%" if self.peak else "-"
        by_t = "/".join("-" if v is None else f"{v:.3f}" for v in row["mse_by_t"])
        print(("\r" if self.bar else "") + f"step {step}/{args.max_steps} | ce {row['ce']:.4f} | mse {row['mse']:.4f} "
              f"(t quarters {by_t}) | lr {lr:.2e} | gnorm {gnorm:.3g} | {row['tok_s']:,.0f} tok/s | mfu {mfu} | "
              f"data {100 * row['data_wait']:.0f}% | mem {row['mem_gb']:.1f}G | pad {100 * row['padding']:.1f}% | "
              f"skipped {sum(stats['skipped'].values())} | eta {fmt_time(eta)}" + val_text(val), flush=True)
        write_metrics(row, self.path, self.loggers)


def write_samples(model: Bagel, ae: AutoEncoder, tok, args: Args, step: int, d: fsdp.Dist, loggers: list, log):
    """The eval samples of `step` (`evaluate`), printed and sent to the loggers."""
    for line in evaluate(model, ae, tok, args, step, d):
        log(f"sample @ {step}: " + line.replace("\n", " | "))
    for _, image in loggers:
        image("samples", os.path.join(args.output_dir, "samples", f"step-{step:07d}", "grid.png"), step)


if __name__ == "__main__":
    main()
