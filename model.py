"""BAGEL, hand-written: Qwen2 Mixture-of-Transformers LLM + SigLIP NaViT + FLUX VAE.

Module and parameter names are exactly those of the released `ema.safetensors` / `ae.safetensors`
(ByteDance-Seed/BAGEL-7B-MoT), so checkpoints load strictly with no key surgery. `DESIGN.md#...`
points at the repo's design notes, where the facts this file relies on are written down. This file
holds modules, configs and the reading of BAGEL's released checkpoint layouts (how its weights exist
on disk); no optimizer, no distributed code, no logging. Inference (the KV-cached Context, text
decoding, flow sampling) lives in sample.py.
"""
import json
import math
import os
import re
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import flex_attention

import nsa
import packing
from nsa import NSAConfig

# -------------------------------------------------------------------------------------------------
# configs

@dataclass
class LLMConfig:
    """Qwen2.5 fields read from `llm_config.json` (defaults: BAGEL-7B-MoT, DESIGN.md#model)."""
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ViTConfig:
    """SigLIP fields read from `vit_config.json`. `num_hidden_layers` is the number of layers BUILT:
    the official json says 27 and BAGEL drops the last one (DESIGN.md#model), so the reader subtracts one."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    layer_norm_eps: float = 1e-6


@dataclass
class AEConfig:
    """FLUX autoencoder; optional `ae_config.json` uses these keys (defaults: the FLUX.1 ae, DESIGN.md#model)."""
    resolution: int = 256  # unused by the forward (BFL uses it only for attn_resolutions)
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611  # FLUX latent scaling, applied after the posterior sample
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class BagelConfig:
    """The BAGEL fields (optional `bagel_config.json`; defaults: released 7B-MoT values, DESIGN.md#checkpoints)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: AEConfig = field(default_factory=AEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64  # 64 for the released weights (1024 px); the class default upstream is 32
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0  # training shift; inference passes its own (3.0)
    visual_und: bool = True
    visual_gen: bool = True
    nsa: NSAConfig | None = None  # Native Sparse Attention parameters per LLM layer (nsa.py); None: dense

    @property
    def latent_channels(self) -> int:  # 64 = 2*2 patch of 16 channels
        return self.latent_patch_size ** 2 * self.vae.z_channels


def _pick(cls, d: dict, **overrides):
    """Build dataclass `cls` from the known keys of `d` (HF configs carry many we do not use)."""
    names = {f.name for f in fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    kw.update(overrides)
    return cls(**kw)


# -------------------------------------------------------------------------------------------------
# shared building blocks

class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype BEFORE the weight (DESIGN.md#model)."""
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Frozen 2D sin-cos table [grid*grid, dim] (DESIGN.md#model): row r*grid+c = [S(c), S(r)], the COLUMN half
    first (MAE's meshgrid(w, h) quirk), each half sin block then cos block. float64 then float32."""
    def s(pos, d):
        w = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos, w)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    r, c = np.divmod(np.arange(grid * grid), grid)
    return torch.from_numpy(np.concatenate([s(c, dim // 2), s(r, dim // 2)], axis=1)).float()


class PositionEmbedding(nn.Module):
    """2D sin-cos table; a persistent buffer so it is saved under `<name>.pos_embed` like upstream,
    yet never trained or sharded. Recomputed at load time (upstream's trainer drops it from checkpoints too)."""
    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid, self.dim = grid, dim
        self.register_buffer("pos_embed", sincos_2d(grid, dim))

    def forward(self, ids):
        return self.pos_embed[ids]


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding: 256 frequencies -> MLP. Note the order COS then SIN (DESIGN.md#flow), the
    opposite of the position tables, and t in [0, 1] (not x1000)."""
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t: [n] float
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class MLPconnector(nn.Module):
    """ViT -> LLM projection: fc1 -> gelu(tanh) -> fc2."""
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# -------------------------------------------------------------------------------------------------
# attention over a packed sequence

def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype):
    """HF default RoPE, NeoX rotate-half layout; computed in fp32, cast to the hidden dtype (DESIGN.md#model)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=pos.device).float() / head_dim)
    freqs = pos.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # broadcast over heads


@dataclass
class AttnPlan:
    """How to attend over one pack; built once per forward (not per layer) by `plan_attention`.

    sdpa: one SDPA call per split over the keys `packing.attention_layout` derives from the rule
    (`packing.allowed`), its own split last and causal if `causal`: no mask tensor at all except the
    lazy lower-right causal bias. flex: one BlockMask over the padded pack.
    Only tensors vary from pack to pack (their shapes are dynamic under --compile), so a compiled
    block traces once whatever the pack: no Python list or int here that torch.compile would guard on.
    """
    kind: str
    jobs: torch.Tensor | None = None   # sdpa: host int64 [6 * n_splits]: (q0, q1, k0, k1, gathered, causal) each
    keys: torch.Tensor | None = None   # sdpa: gathered key positions [K]
    block_mask: object = None          # flex
    nsa: object = None                 # nsa: nsa.Layout


def sdpa_plan(jobs: list[tuple], keys: torch.Tensor, device) -> AttnPlan:
    """An sdpa plan from (q0, q1, k0, k1, gathered, causal) tuples and the gathered key positions."""
    table = torch.tensor([x for job in jobs for x in job], dtype=torch.long)  # flat: not a view of a [J, 6]
    keys = keys if keys.numel() else keys.new_empty(0)  # numpy's empty arrays have stride 0: one guard less
    return AttnPlan("sdpa", jobs=table, keys=keys.to(device, non_blocking=True))


def plan_attention(kind: str, sample_lens: list[int], split_lens: list[int], attn_modes: list[str],
                   device, layout: dict | None = None) -> AttnPlan:
    """`layout`: the batch's `packing.attention_layout` (built by the data workers); None builds it
    here, on the host, as for an upstream batch. Either way nothing is read back from the device."""
    if kind not in ("sdpa", "flex", "nsa"):
        raise ValueError(f"attn must be 'sdpa', 'flex' or 'nsa', got {kind!r}")
    lay = layout or packing.attention_layout(sample_lens, split_lens, attn_modes)
    if len(lay["sample"]) != sum(sample_lens) + -sum(sample_lens) % lay["block"]:
        raise ValueError(f"attention_layout covers {len(lay['sample'])} tokens, the pack has {sum(sample_lens)}")
    if kind == "nsa":
        return AttnPlan("nsa", nsa=nsa.plan(sample_lens, split_lens, attn_modes, device, lay))
    if kind == "flex":
        return AttnPlan("flex", block_mask=packing.flex_block_mask(lay, device))
    return sdpa_plan(lay["sdpa_jobs"], lay["sdpa_keys"], device)


def vit_plan(seqlens: list[int], device) -> AttnPlan:
    """The ViT's sdpa plan: each image attends to itself, whole, never to another image of the pack."""
    # no image: one empty job still, so k and v get (zero) gradients on every rank (see `Route`)
    ends = np.cumsum([0] + [int(s) for s in seqlens or [0]]).tolist()
    return sdpa_plan([(s, e, s, e, 0, 0) for s, e in zip(ends, ends[1:])], torch.zeros(0, dtype=torch.long), device)


def any_rows(block: nn.Module, args: tuple):
    """Forward pre-hook of a compiled block: marks dim 0 of its tensor arguments (tokens, routed rows,
    sdpa jobs and keys) as any size, 0 and 1 included, so the block compiles once for all packs. As
    plain dynamic sizes they would specialise on 0 and 1 (a pack without images) and on the size
    thresholds of inductor's CPU reductions. A block's argument structure never varies: a missing
    modality is an empty tensor, never a missing argument."""
    for a in args:
        for t in a if isinstance(a, tuple) else (a.jobs, a.keys) if isinstance(a, AttnPlan) else (a,):
            if isinstance(t, torch.Tensor):
                torch._dynamo.decorators.mark_unbacked(t, 0)


def packed_attention(plan: AttnPlan, q, k, v, extra: "nsa.NSAInputs | None" = None):
    """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D] under the pack's mask. `extra`: what a layer with
    NSA parameters passes (gates, pre-RoPE keys, RoPE table); only the nsa plan uses it."""
    if plan.kind == "nsa":
        # NSA's branches loop over host-side block tables: under --compile they run eager
        return torch.compiler.disable(nsa.attention)(plan.nsa, q, k, v, extra)
    if plan.kind == "flex":
        n, pad = q.shape[0], plan.block_mask.seq_lengths[0] - q.shape[0]
        qh, kh, vh = (F.pad(x.transpose(0, 1)[None], (0, 0, 0, pad)) for x in (q, k, v))  # [1, H, padded, D]
        # always compiled: eager flex materialises the [heads, N, N] scores (7 GiB at 8k tokens on CPU);
        # inside a compiled block flex_attention is traced into the block's graph
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        if not torch.compiler.is_compiling():  # the padded length is any size, as the BlockMask's
            for x in (qh, kh, vh):
                torch._dynamo.maybe_mark_dynamic(x, 2)
        return flex(qh, kh, vh, block_mask=plan.block_mask, enable_gqa=True)[0].transpose(0, 1)[:n]
    if torch.compiler.is_compiling():  # an opaque op: the per-split loop is host work on the job table
        return torch.ops.bagel.packed_sdpa(q, k, v, plan.jobs, plan.keys)[0]
    return sdpa_jobs(q, k, v, plan.jobs, plan.keys)


def sdpa_jobs(q, k, v, jobs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The sdpa plan's loop: one SDPA call per split, its keys a slice of the pack or gathered."""
    out = torch.empty_like(q)
    for qs, qe, k0, k1, gathered, causal in jobs.view(-1, 6).tolist():
        ks = keys[k0:k1] if gathered else slice(k0, k1)
        qh = q[qs:qe].transpose(0, 1)[None]
        kh, vh = k[ks].transpose(0, 1)[None], v[ks].transpose(0, 1)[None]
        lq, lk = qe - qs, kh.shape[2]
        mask = causal_lower_right(lq, lk) if causal and lq > 1 else None  # see all keys, own split causally
        out[qs:qe] = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    return out


# `sdpa_jobs` as one opaque op for torch.compile: its loop depends on the pack, so tracing it would
# specialise the block's graph to one pack. On CPU the op also returns each row's logsumexp and its
# backward calls the SDPA backward kernel per split, as eager autograd does; elsewhere (no kernel
# wired here yet) the backward recomputes the attention forward, since an op keeps no autograd graph.
def _split(q, k, v, keys, job):
    """One job's q/k/v as [1, H, L, D] views and its float mask (None: none, or `is_causal`)."""
    qs, qe, k0, k1, gathered, causal = job
    ks = keys[k0:k1] if gathered else slice(k0, k1)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks], v[ks]))
    lq, lk = qh.shape[2], kh.shape[2]
    upper = bool(causal) and lq > 1 and lq == lk  # lower right = upper left: the kernel's own causal flag
    # F.sdpa turns the lower-right bias into this additive mask before the same kernel
    mask = (torch.zeros(lq, lk, dtype=q.dtype, device=q.device).masked_fill(
        ~causal_lower_right(lq, lk)._materialize(q.device), float("-inf"))
        if causal and lq > 1 and not upper else None)
    return qh, kh, vh, ks, mask, upper


@torch.library.custom_op("bagel::packed_sdpa", mutates_args=())
def _packed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, jobs: torch.Tensor,
                 keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type != "cpu":
        return sdpa_jobs(q, k, v, jobs, keys), q.new_empty(0, dtype=torch.float32)
    out, lse = torch.empty_like(q), q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)  # lse [Hq, N]
    for job in jobs.view(-1, 6).tolist():
        if job[1] > job[0]:
            qh, kh, vh, _, mask, upper = _split(q, k, v, keys, job)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, upper, attn_mask=mask)
            out[job[0]:job[1]], lse[:, job[0]:job[1]] = o[0].transpose(0, 1), l[0]
    return out, lse


@torch.library.custom_op("bagel::packed_sdpa_backward", mutates_args=())
def _packed_sdpa_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, jobs: torch.Tensor,
                          keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.device.type != "cpu":
        # an op's body runs with autograd dispatch excluded: switch it back on for the recompute
        with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), \
                torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return torch.autograd.grad(sdpa_jobs(q, k, v, jobs, keys), (q, k, v), g)
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
    for job in jobs.view(-1, 6).tolist():
        qs, qe = job[:2]
        if qe > qs:
            qh, kh, vh, ks, mask, upper = _split(q, k, v, keys, job)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g[qs:qe].transpose(0, 1)[None], qh, kh, vh, out[qs:qe].transpose(0, 1)[None],
                lse[None, :, qs:qe].contiguous(), 0.0, upper, attn_mask=mask)
            dq[qs:qe] = gq[0].transpose(0, 1)
            if isinstance(ks, slice):  # splits may share keys: accumulate
                dk[ks] += gk[0].transpose(0, 1)
                dv[ks] += gv[0].transpose(0, 1)
            else:
                dk.index_add_(0, ks, gk[0].transpose(0, 1))
                dv.index_add_(0, ks, gv[0].transpose(0, 1))
    return dq, dk, dv


_packed_sdpa.register_fake(lambda q, k, v, jobs, keys: (
    torch.empty_like(q),
    q.new_empty((q.shape[1], q.shape[0]) if q.device.type == "cpu" else (0,), dtype=torch.float32)))
_packed_sdpa_backward.register_fake(
    lambda g, q, k, v, out, lse, jobs, keys: tuple(torch.empty_like(t) for t in (q, k, v)))


def _save(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs[:3], *output, *inputs[3:])


_packed_sdpa.register_autograd(lambda ctx, g, _: (*_packed_sdpa_backward(g, *ctx.saved_tensors), None, None),
                               setup_context=_save)


@lru_cache(maxsize=None)
def _compiled_flex():
    # FlexAttention is only fast (and memory-light) compiled; compile once per process, lazily
    return torch.compile(flex_attention)


# -------------------------------------------------------------------------------------------------
# language model: Qwen2 with Mixture-of-Transformers layers (DESIGN.md#model)

class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Route(NamedTuple):
    """The MoT routing of one pack. The LLM runs on its tokens permuted once, understanding rows (text,
    ViT) first and generation rows (VAE latents) after, so each expert reads one contiguous slice
    instead of gathering its rows again for every projection. Only attention needs pack order."""
    perm: torch.Tensor  # [N] pack position of each routed row (N + 2 with `pad`)
    inv: torch.Tensor  # [N] routed row of each pack position
    und: torch.Tensor  # [n_und] pack positions of the und rows: rows [:n_und] use the understanding weights,
    # [n_und:] the `_moe_gen` ones (a tensor, so n_und is a shape: a compiled block need not guard on it)
    detach_und: bool = False  # upstream's freeze_und (see Bagel.freeze_und)
    pad: bool = False  # one zero row more per expert (pack position N), so that no expert's input is empty

    @classmethod
    def of(cls, und: torch.Tensor, gen: torch.Tensor, detach_und: bool = False, pad: bool = False) -> "Route":
        n = len(und) + len(gen)
        if pad:
            und, gen = (torch.cat([t, t.new_full((1,), n)]) for t in (und, gen))
        perm = torch.cat([und, gen])
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(len(perm), device=perm.device))
        inv = inv[:n].clone() if pad else inv  # not a view: torch.compile would guard on its base's size
        return cls(perm, inv, und, detach_und, pad)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x [N, ...] from pack order to routed order (the pad rows zero)."""
        return (F.pad(x, (0, 0) * (x.dim() - 1) + (0, 1)) if self.pad else x).index_select(0, self.perm)

    def __call__(self, x, f_und, f_gen):
        """f_und on the und rows of x (routed order), f_gen on the rest. Both experts always run, on
        empty slices too, so every rank touches every parameter (FSDP reduce-scatter). With
        `detach_und` the und output carries no gradient: every routed call of the LLM (q/k/v after
        their norms, the NSA gate, o_proj, the MLP, the final norm) is one of upstream's freeze_und
        detach points, plus the input norms, which changes no gradient and skips their backward."""
        n_und = self.und.shape[0]  # a shape, not a read of device memory
        yu = f_und(x[:n_und])
        return torch.cat([yu.detach() if self.detach_und else yu, f_gen(x[n_und:])])


class MoTAttention(nn.Module):
    """One attention over all tokens, two parameter sets: und (text, ViT) and `_moe_gen` (VAE)."""
    def __init__(self, c: LLMConfig):
        super().__init__()
        h, d, nq, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.nq, self.nkv, self.d = nq, nkv, d
        for sfx in ("", "_moe_gen"):
            setattr(self, "q_proj" + sfx, nn.Linear(h, nq * d))
            setattr(self, "k_proj" + sfx, nn.Linear(h, nkv * d))
            setattr(self, "v_proj" + sfx, nn.Linear(h, nkv * d))
            setattr(self, "o_proj" + sfx, nn.Linear(nq * d, h, bias=False))
            setattr(self, "q_norm" + sfx, RMSNorm(d, c.rms_norm_eps))  # QK-norm per head, new in BAGEL
            setattr(self, "k_norm" + sfx, RMSNorm(d, c.rms_norm_eps))
        self.nsa: nsa.NSA | None = None  # set by Bagel when config.nsa is set

    def forward(self, x, cos, sin, route: Route, attend):
        n = route.inv.shape[0]  # tokens of the pack (x has Route.pad's rows too)
        # projections and QK-norm per expert (routed order), THEN RoPE and attention in pack order (DESIGN.md#model)
        q = route(x, lambda t: self.q_norm(self.q_proj(t).view(-1, self.nq, self.d)),
                  lambda t: self.q_norm_moe_gen(self.q_proj_moe_gen(t).view(-1, self.nq, self.d)))
        k = route(x, lambda t: self.k_norm(self.k_proj(t).view(-1, self.nkv, self.d)),
                  lambda t: self.k_norm_moe_gen(self.k_proj_moe_gen(t).view(-1, self.nkv, self.d)))
        v = route(x, self.v_proj, self.v_proj_moe_gen).view(-1, self.nkv, self.d)
        q, k, v = (t.index_select(0, route.inv) for t in (q, k, v))
        extra = None
        if self.nsa is not None:  # NSA also needs per-expert gates and the keys before RoPE (nsa.py)
            g = route(x, self.nsa.g_proj, self.nsa.g_proj_moe_gen).index_select(0, route.inv)
            extra = nsa.NSAInputs(self.nsa, g.view(n, self.nq, 3).sigmoid(), k, cos, sin)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if isinstance(attend, AttnPlan):  # training: the pack's plan (a compiled block traces this)
            a = packed_attention(attend, q, k, v, extra)
        else:  # a callable: inference's KV cache (sample.py)
            a = attend(q, k, v) if extra is None else attend(q, k, v, extra)
        a = a.reshape(n, self.nq * self.d)
        return route(route.routed(a), self.o_proj, self.o_proj_moe_gen)


class Qwen2MoTDecoderLayer(nn.Module):
    def __init__(self, c: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(c)
        self.mlp, self.mlp_moe_gen = MLP(c.hidden_size, c.intermediate_size), MLP(c.hidden_size, c.intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(c.hidden_size, c.rms_norm_eps))
            setattr(self, name + "_moe_gen", RMSNorm(c.hidden_size, c.rms_norm_eps))

    def forward(self, x, cos, sin, route: Route, attend):  # x: [N, hidden] in routed order
        h = route(x, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, cos, sin, route, attend)
        mlp_und = lambda t: self.mlp(self.post_attention_layernorm(t))
        mlp_gen = lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t))
        return x + route(x, mlp_und, mlp_gen)


class Qwen2Model(nn.Module):
    def __init__(self, c: LLMConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Qwen2MoTDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm, self.norm_moe_gen = RMSNorm(c.hidden_size, c.rms_norm_eps), RMSNorm(c.hidden_size, c.rms_norm_eps)
        # each expert gets a zero row more (Route.pad): float8 linears scale by an amax over their
        # input's rows, which an empty slice (a pack without VAE latents) does not have
        self.pad_experts = False

    def forward(self, x, pos, und, gen, attend, freeze_und: bool = False):
        """x [N, hidden]; pos [N] RoPE ids; und / gen: the rows of each expert; attend: the pack's
        AttnPlan, or attend(layer_index, q, k, v) -> attention output (pack order). Returns the final hidden state in pack order, normed
        per expert (`norm` / `norm_moe_gen`). `freeze_und`: no gradient through und rows (Route)."""
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        route = Route.of(und, gen, freeze_und, self.pad_experts)
        x = route.routed(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, route, attend if isinstance(attend, AttnPlan) else partial(attend, i))
        return route(x, self.norm, self.norm_moe_gen).index_select(0, route.inv)


CE_CHUNK = 1024  # rows of logits alive at once in the training loss (152k vocab: 0.6 GB in fp32)


class LMHead(nn.Linear):
    """The untied output projection. Given labels it returns the per-token cross-entropy instead of
    logits, CE_CHUNK rows at a time, each chunk recomputed in the backward: the [n, vocab] logits
    (10 bytes per token and vocab entry with their fp32 copy and softmax) never exist whole. One
    module call, so an FSDP unit around it gathers its weight once."""

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        ce = lambda hc, lc: F.cross_entropy(F.linear(hc, self.weight).float(), lc, reduction="none")
        grad = torch.is_grad_enabled()
        return torch.cat([checkpoint(ce, hc, lc, use_reentrant=False) if grad else ce(hc, lc)
                          for hc, lc in zip(h.split(CE_CHUNK), labels.split(CE_CHUNK))])


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, c: LLMConfig):
        super().__init__()
        self.model = Qwen2Model(c)
        self.lm_head = LMHead(c.hidden_size, c.vocab_size, bias=False)  # untied in BAGEL


# -------------------------------------------------------------------------------------------------
# vision encoder: SigLIP NaViT (DESIGN.md#model)

class SiglipAttention(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x, plan: AttnPlan):  # plan: `vit_plan`, bidirectional within each image
        n, d = x.shape
        q, k, v = (p(x).view(n, self.heads, d // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(packed_attention(plan, q, k, v).reshape(n, d))


class SiglipMLP(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x, plan: AttnPlan):
        x = x + self.self_attn(self.layer_norm1(x), plan)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        # stored as a Linear [hidden, 3*p*p] with (py, px, c) input order, not a conv (DESIGN.md#model)
        self.patch_embedding = nn.Linear(3 * c.patch_size ** 2, c.hidden_size)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2, c.hidden_size)

    def forward(self, pixels, pos_ids):
        return self.patch_embedding(pixels) + self.position_embedding(pos_ids)


class SiglipEncoder(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(c) for _ in range(c.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels, pos_ids, seqlens: list[int]):
        """pixels [n_patches, 3*p*p] in [-1, 1]; pos_ids [n_patches] = r*side + c; seqlens per image."""
        x = self.embeddings(pixels, pos_ids)
        plan = vit_plan(seqlens, x.device)
        for layer in self.encoder.layers:
            x = layer(x, plan)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(c)


# -------------------------------------------------------------------------------------------------
# FLUX autoencoder (DESIGN.md#model): frozen, outside the trained model, BFL key names

GN_GROUPS, GN_EPS = 32, 1e-6  # every GroupNorm in the ae (so channel counts are multiples of 32)


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, c, eps=GN_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:  # the checkpoint only has nin_shortcut where the width changes
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; q/k/v/proj_out are 1x1 convs in the checkpoint."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))  # [b, 1, hw, c]
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad (right/bottom only), as in BFL/LDM


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(c: int) -> nn.Module:
    mid = nn.Module()  # plain container: only its attribute names matter (`mid.block_1`, ...)
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


def run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks))
            if i != len(widths) - 1:  # no downsample after the last level: total stride 2**(levels-1) = 8
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = mid_block(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(run_mid(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = mid_block(cin)
        # `up.{i}` is indexed like `down.{i}` (i=0 is the full-resolution level) but runs in reverse
        levels = []
        for i in reversed(range(len(widths))):
            level = nn.Module()
            cout = widths[i]
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1))
            if i != 0:
                level.upsample = Upsample(cout)
            levels.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents [B, z_channels, H/8, W/8]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean
        if sample:  # the reference samples the posterior, for targets and conditioning images alike (DESIGN.md#flow)
            if generator is None:
                raise ValueError("AutoEncoder.encode(sample=True) needs a torch.Generator (on x's device), "
                                 "or pass sample=False for the posterior mean")
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps  # no logvar clamp, unlike diffusers (BFL has none)
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> image in about [-1, 1] (not clamped: callers map to [0, 1] and clamp)."""
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu") -> "AutoEncoder":
        """Strictly load the frozen VAE: `ae.safetensors` (+ optional `ae_config.json`; absent: FLUX's)
        of the official layout, or the `vae_model.*` tensors and `vae_config` of the HF layout."""
        ae_file = os.path.join(path, "ae.safetensors")
        if os.path.exists(ae_file):
            cfg_file = os.path.join(path, "ae_config.json")
            cfg = _pick(AEConfig, _json(cfg_file)) if os.path.exists(cfg_file) else AEConfig()
            index = {k: (ae_file, k) for k in safetensors_keys(ae_file)}
        else:
            cfg, index = read_config(path).vae, checkpoint_index(path)[1]
        with torch.device("meta"):
            model = cls(cfg)
        load_weights(model, index, path, dtype, device)
        return model.eval().requires_grad_(False)  # the VAE is always frozen (DESIGN.md#model)


# -------------------------------------------------------------------------------------------------
# BAGEL

def patchify_latent(z: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
    """[C, >=p*h, >=p*w] latent -> [h*w, p*p*C] tokens, row-major, features in (py, px, c) order (DESIGN.md#model);
    the crop drops latent rows/columns that came from the pack's zero padding (DESIGN.md#packing)."""
    return packing.patchify(z[:, :p * h, :p * w], p)


def unpatchify_latent(x: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
    """Inverse of `patchify_latent`: [h*w, p*p*C] -> [C, p*h, p*w]."""
    c = x.shape[1] // (p * p)
    return torch.einsum("hwpqc->chpwq", x.reshape(h, w, p, p, c)).reshape(c, p * h, p * w)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift s*t / (1 + (s-1)*t): s > 1 spends more steps at high noise (DESIGN.md#flow, DESIGN.md#inference)."""
    return shift * t / (1 + (shift - 1) * t)


class Bagel(nn.Module):
    def __init__(self, config: BagelConfig):
        super().__init__()
        self.config = c = config
        self.attn: Literal["sdpa", "flex", "nsa"] | None = None  # None: nsa if config.nsa, else flex on CUDA, sdpa elsewhere
        # upstream's freeze_und (ByteDance-Seed/Bagel modeling/bagel/qwen2_navit.py forward_train):
        # the und rows (text, ViT) are detached at the LLM input (here: built without autograd),
        # after v_proj and after the q/k norms, after o_proj and the MLP, and after the final norm. Their hidden states are then
        # constants: no gradient reaches the und expert, embeddings, ViT or connector, and none flows
        # from und tokens into the generation expert (e.g. through an edit's clean latents). lm_head
        # still learns from the CE on those constants.
        self.freeze_und = False
        d = c.llm.hidden_size
        self.language_model = Qwen2ForCausalLM(c.llm)
        if c.nsa is not None:  # `language_model.model.layers.{i}.self_attn.nsa.*`
            for layer in self.language_model.model.layers:
                layer.self_attn.nsa = nsa.NSA(c.nsa, d, c.llm.num_attention_heads, c.llm.num_key_value_heads, c.llm.head_dim)
        if c.visual_und:
            self.vit_model = SiglipVisionModel(c.vit)
            self.connector = MLPconnector(c.vit.hidden_size, d)
            self.vit_pos_embed = PositionEmbedding(c.vit_max_num_patch_per_side, d)
        if c.visual_gen:
            self.time_embedder = TimestepEmbedder(d)
            self.vae2llm = nn.Linear(c.latent_channels, d)
            self.llm2vae = nn.Linear(d, c.latent_channels)
            self.latent_pos_embed = PositionEmbedding(c.max_latent_size, d)

    def init_weights(self):
        """Fresh-model init: PyTorch defaults, plus the upstream quirk that `llm2vae` starts at zero
        (DESIGN.md#flow) so a new generation head predicts v = 0. Loading a checkpoint overwrites all of it."""
        if self.config.visual_gen:
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)

    def forward(self, sequence_length: int, packed_text_ids, packed_text_indexes, sample_lens,
                packed_position_ids, split_lens, attn_modes, ce_loss_indexes=None, packed_label_ids=None,
                packed_vit_tokens=None, packed_vit_token_indexes=None, packed_vit_position_ids=None,
                vit_token_seqlens=None, padded_latent=None, patchified_vae_latent_shapes=None,
                packed_latent_position_ids=None, packed_vae_token_indexes=None, packed_timesteps=None,
                mse_loss_indexes=None, packed_noise=None, generator: torch.Generator | None = None,
                attention_layout: dict | None = None, **unused) -> dict[str, torch.Tensor]:
        """Packed training forward (upstream batch keys, DESIGN.md#packing). Returns unreduced losses
        {"ce": [n_ce], "mse": [n_mse, 64]} so the trainer can normalise by global token counts, plus
        "mse_t": [n_mse], the (shifted) timestep of each MSE row, for logging.

        Every branch runs on every call, on empty inputs when the pack lacks a modality, so all
        parameters get a (zero) gradient on every rank. Randomness is an input: `packed_noise`, or
        noise drawn from `generator` (required then): never the global RNG.

        Nothing here reads device memory back to the host (no .item(), boolean masks or nonzero: each
        is a sync that stalls a GPU): sizes come from shapes and host lists, and what depends on the
        layout comes from `attention_layout` (packing.collate ships it; built here when absent)."""
        c, emb = self.config, self.language_model.model.embed_tokens
        dev, dtype, n = emb.weight.device, emb.weight.dtype, int(sequence_length)
        long = lambda x: (torch.empty(0, dtype=torch.long) if x is None else torch.as_tensor(x)).to(dev, torch.long)
        text_idx, vit_idx, vae_idx = long(packed_text_indexes), long(packed_vit_token_indexes), long(packed_vae_token_indexes)
        ce_idx, mse_idx = long(ce_loss_indexes), long(mse_loss_indexes)
        sample_lens, split_lens = [int(s) for s in sample_lens], [int(s) for s in split_lens]
        lay = attention_layout or packing.attention_layout(
            sample_lens, split_lens, list(attn_modes), [] if vit_token_seqlens is None else [int(s) for s in vit_token_seqlens])
        if sum(sample_lens) != n or text_idx.numel() + vit_idx.numel() + vae_idx.numel() != n:
            raise ValueError(f"inconsistent pack: sequence_length {n}, sum(sample_lens) {sum(sample_lens)}, "
                             f"{text_idx.numel()} text + {vit_idx.numel()} ViT + {vae_idx.numel()} VAE token indexes")

        seq = torch.zeros(n, c.llm.hidden_size, device=dev, dtype=dtype)
        # freeze_und detaches the und rows at the LLM input: build them without autograd at all, or
        # the backward would still run through the ViT, only to carry zeros
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_und):
            seq[text_idx] = emb(long(packed_text_ids))
            if c.visual_und:
                vit = self.vit_model.vision_model
                pix = (torch.zeros(0, vit.embeddings.patch_embedding.in_features) if packed_vit_tokens is None
                       else packed_vit_tokens).to(dev, dtype)
                vpos = long(packed_vit_position_ids)
                x = vit(pix, vpos, lay["vit_seqlens"])
                seq[vit_idx] = (self.connector(x) + self.vit_pos_embed(vpos).to(dtype)).to(dtype)
            elif vit_idx.numel():  # never silently attend to zero vectors
                raise ValueError("the pack has ViT tokens but the model was built with visual_und=False")

        mse_target = None
        if c.visual_gen:
            shapes = [] if patchified_vae_latent_shapes is None else [tuple(map(int, s)) for s in patchified_vae_latent_shapes]
            if shapes and padded_latent is None:
                raise ValueError("the pack has VAE images but no padded_latent: encode batch['padded_images'] "
                                 "with AutoEncoder.encode first (the VAE stays outside the trained model)")
            x0 = (torch.cat([patchify_latent(z, h, w, c.latent_patch_size) for z, (h, w) in zip(padded_latent, shapes)])
                  if shapes else torch.zeros(0, c.latent_channels)).to(dev, torch.float32)
            t = torch.sigmoid(torch.as_tensor([] if packed_timesteps is None else packed_timesteps).to(dev, torch.float32))
            t = shift_timesteps(t, c.timestep_shift)  # clean latents: sigmoid(-inf) = 0 exactly
            if packed_noise is None:
                if generator is None and x0.numel():
                    raise ValueError("pass packed_noise or a torch.Generator: the model never uses the global RNG")
                packed_noise = torch.randn(x0.shape, generator=generator, device=dev) if x0.numel() else torch.zeros_like(x0)
            eps = packed_noise.to(dev, torch.float32)
            xt = (1 - t[:, None]) * x0 + t[:, None] * eps  # rectified flow: t=1 noise, t=0 data (DESIGN.md#flow)
            seq[vae_idx] = (self.vae2llm(xt.to(dtype)) + self.time_embedder(t).to(dtype)
                            + self.latent_pos_embed(long(packed_latent_position_ids)).to(dtype)).to(dtype)
            # the VAE row of each MSE token, by position (a boolean mask t > 0 would sync): the
            # velocity target is ordered like mse_loss_indexes (DESIGN.md#layout)
            row = torch.full((n,), -1, dtype=torch.long, device=dev)
            row[vae_idx] = torch.arange(len(vae_idx), device=dev)
            noisy = row[mse_idx]
            ok = (noisy >= 0).all() & (t[noisy.clamp(min=0)] > 0).all() & ((t > 0).sum() == len(mse_idx))
            torch._assert_async(ok, "mse_loss_indexes must be exactly the noisy VAE tokens (t > 0)")  # no sync
            mse_target = (eps - x0)[noisy]
        elif vae_idx.numel():
            raise ValueError("the pack has VAE tokens but the model was built with visual_gen=False")

        attn = self.attn or ("nsa" if c.nsa else "flex" if dev.type == "cuda" else "sdpa")
        if attn == "nsa" and c.nsa is None:
            raise ValueError("attn='nsa' needs NSA parameters: build the model with BagelConfig(nsa=NSAConfig(...))")
        if attn == "flex" and dev.type == "cpu" and torch.is_grad_enabled():
            raise ValueError("attn='flex' has no backward on CPU (torch 2.13): train with attn='sdpa' there")
        plan = plan_attention(attn, sample_lens, split_lens, list(attn_modes), dev, lay)
        und = torch.cat([text_idx, vit_idx])
        h = self.language_model.model(seq, long(packed_position_ids), und, vae_idx, plan, self.freeze_und)

        out = {"ce": self.language_model.lm_head(h[ce_idx], long(packed_label_ids))}
        if c.visual_gen:
            out["mse"] = (self.llm2vae(h[mse_idx]).float() - mse_target) ** 2
            out["mse_t"] = t[noisy]
        return out

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu", **overrides) -> "Bagel":
        """Load a checkpoint directory, official or HF layout (see `read_config`), strictly.
        `overrides` replace BAGEL fields (e.g. visual_und=False); keys of switched-off parts are skipped."""
        config = read_config(path, **overrides)
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, checkpoint_index(path)[0], path, dtype, device)
        return model


# -------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters on frozen linears (Hu et al. 2021; torchtune's LoRALinear)

LORA_PREFIX = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj(_moe_gen)?|"
                         r"mlp(_moe_gen)?\.(gate|up|down)_proj)$")  # a decoder layer's q/k/v/o and MLP
LORA_VIT = re.compile(r"(vit_model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|"
                      r"connector\.fc[12])$")


def is_lora(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))


def lora_target(name: str, targets: Literal["gen", "und", "all"], vit: bool = False) -> bool:
    """Whether linear `name` gets an adapter. gen: the generation expert (`*_moe_gen`, what UniRL's
    BAGEL LoRA adapts); und: the understanding expert; all: both. vit adds the ViT and connector."""
    if LORA_PREFIX.match(name):
        return targets == "all" or (targets == "gen") == ("_moe_gen" in name)
    return vit and bool(LORA_VIT.match(name))


class LoRALinear(nn.Linear):
    """y = x W^T + b + dropout(x) A^T B^T * alpha / rank. W and b stay under their official names
    (frozen); A [rank, in] starts Kaiming-uniform like nn.Linear, B [out, rank] at zero, so before
    the first update the output is the base layer's bit for bit (the update adds exact zeros)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        dev = base.weight.device  # fp32 masters, whatever the base's dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=dev))

    def initial(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) before training, on the CPU: A Kaiming-uniform like nn.Linear's weight, drawn from
        `lora_generator(name)`; B zero."""
        a = torch.empty(self.lora_a.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=lora_generator(name))
        return a, torch.zeros(self.lora_b.shape)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.dropout and self.training and torch.is_grad_enabled():  # never while sampling
            x = F.dropout(x, self.dropout)
        a = self.lora_a
        return y + (F.linear(F.linear(x.to(a.dtype), a), self.lora_b) * self.scale).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + B A alpha/r, computed in fp32 (convert_weights.py does the same from a checkpoint)."""
        return self.weight.float() + self.lora_b.float() @ self.lora_a.float() * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Literal["gen", "und", "all"] = "gen", vit: bool = False) -> list[str]:
    """Replace the targeted nn.Linear modules by LoRALinear, in place (meta device or not, before
    sharding); the forward code is untouched since it calls the modules by attribute. Their adapters
    are initialised by `fresh_tensors` (meta) or here (real tensors). Returns the names adapted."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and lora_target(n, targets, vit)]
    for name in names:
        parent, _, child = name.rpartition(".")
        lin = LoRALinear(model.get_submodule(parent).get_submodule(child), rank, alpha, dropout)
        if not lin.weight.is_meta:
            with torch.no_grad():
                for p, v in zip((lin.lora_a, lin.lora_b), lin.initial(name)):
                    p.copy_(v)
        setattr(model.get_submodule(parent), child, lin)
    return names


def lora_generator(name: str) -> torch.Generator:
    """lora_a's init is a function of the module's official name only (not of the activation
    checkpoint or compile wrappers around it): the same on every rank, in every run."""
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))

# -------------------------------------------------------------------------------------------------
# checkpoint layouts
#
# official (ByteDance-Seed/BAGEL-7B-MoT): llm_config.json, vit_config.json, ema.safetensors (or
#   model.safetensors), ae.safetensors, tokenizer files; our optional bagel_config.json, ae_config.json.
# hf (lmms-lab/BAGEL-7B-MoT-ver.LE): config.json {llm_config, vit_config, vae_config, BAGEL fields},
#   model.safetensors or sharded model-*.safetensors + model.safetensors.index.json; the VAE inside,
#   under `vae_model.`. We could not read that repo, so we are tolerant: a leading `model.` is
#   stripped, the ViT depth is taken from the weights, a conv-layout patch embedding is converted.

TOP_LEVEL = ("language_model", "vit_model", "connector", "vit_pos_embed", "latent_pos_embed",
             "time_embedder", "vae2llm", "llm2vae")
POS_TABLES = ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")  # recomputed, never loaded


class CheckpointError(packing.UserError, ValueError):
    """A checkpoint folder that cannot be used as given: the message names the file and what is wrong."""


class CheckpointMissing(packing.UserError, FileNotFoundError):
    """A checkpoint folder or file that is not there."""


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def layout(path: str) -> Literal["official", "hf"]:
    if os.path.exists(os.path.join(path, "llm_config.json")):
        return "official"
    cfg = os.path.join(path, "config.json")
    if os.path.exists(cfg):
        try:
            if "llm_config" in _json(cfg):
                return "hf"
        except ValueError:
            pass  # the official repo's config.json is a 39-byte placeholder that is not valid JSON
    raise CheckpointMissing(f"{path}: not a BAGEL checkpoint: expected llm_config.json (official layout) "
                            "or a config.json with an 'llm_config' entry (HF layout)")


HUB_FILES = ["*.json", "*.safetensors", "*.txt"]  # configs, weights, tokenizer (upstream README's download, minus code)


def resolve(path: str, flag: str = "--model") -> str:
    """A checkpoint directory: `path` itself, or, for a Hugging Face Hub id (ORG/NAME that is no
    local path), its snapshot in the hub cache, downloaded when needed. huggingface_hub is optional.
    `flag` names the option in errors."""
    if os.path.exists(path):
        return path
    # a path is what does not look like ORG/NAME, or starts like one (./x, ~/x), or sits in a folder that exists here
    if (not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) or path.startswith((".", "~"))
            or os.path.isdir(path.split("/")[0])):
        raise CheckpointMissing(f"{flag} {path}: no such directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointMissing(f"{flag} {path}: no such directory; as a Hugging Face Hub id it is downloaded by "
                                f"huggingface_hub: pip install huggingface_hub") from None
    try:
        return snapshot_download(path, allow_patterns=HUB_FILES)
    except Exception as e:  # no network, no such repo, gated, disk full: the hub raises many types
        raise CheckpointMissing(f"{flag} {path}: no such directory, and downloading it from the Hugging Face Hub "
                                f"failed: {type(e).__name__}: {' '.join(str(e).split())}") from None


def read_config(path: str, **overrides) -> BagelConfig:
    """BagelConfig of a checkpoint directory; `overrides` set BAGEL fields (visual_und, ...)."""
    if layout(path) == "official":
        llm = _json(os.path.join(path, "llm_config.json"))
        vit = _json(os.path.join(path, "vit_config.json"))
        vit_layers = vit["num_hidden_layers"] - 1  # BAGEL drops SigLIP's last layer (DESIGN.md#model)
        extra = os.path.join(path, "bagel_config.json")
        bagel = _json(extra) if os.path.exists(extra) else {}
        ae_file = os.path.join(path, "ae_config.json")
        ae = _json(ae_file) if os.path.exists(ae_file) else {}
    else:
        bagel = _json(os.path.join(path, "config.json"))
        llm, vit, ae = bagel["llm_config"], bagel["vit_config"], bagel.get("vae_config") or {}
        # the saved depth may be SigLIP's 27 or the truncated 26: trust the weights
        n = {int(k.split(".")[4]) for k in checkpoint_index(path)[0] if k.startswith("vit_model.vision_model.encoder.layers.")}
        vit_layers = max(n) + 1 if n else vit["num_hidden_layers"]
    cfg = _pick(BagelConfig, {k: v for k, v in bagel.items() if k not in ("llm", "vit", "vae", "nsa")},
                llm=_pick(LLMConfig, llm), vit=_pick(ViTConfig, vit, num_hidden_layers=vit_layers),
                vae=_pick(AEConfig, ae), nsa=_pick(NSAConfig, bagel["nsa"]) if bagel.get("nsa") else None)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise CheckpointError(f"unknown BAGEL config field {k!r}")
        setattr(cfg, k, v)
    return cfg


def config_files(config: BagelConfig) -> dict[str, dict]:
    """The JSON files of the official layout (+ our two optional ones) that `read_config` reads back."""
    vit = {**vars(config.vit), "num_hidden_layers": config.vit.num_hidden_layers + 1,
           "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "num_channels": 3}
    llm = {**vars(config.llm), "model_type": "qwen2", "hidden_act": "silu", "tie_word_embeddings": False}
    bagel = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("llm", "vit", "vae", "nsa")}
    bagel["nsa"] = config.nsa and vars(config.nsa)  # null, or the NSAConfig fields
    ae = {**vars(config.vae), "ch_mult": list(config.vae.ch_mult)}
    return {"llm_config.json": llm, "vit_config.json": vit, "bagel_config.json": bagel, "ae_config.json": ae}


def save_pretrained(path: str, model: "Bagel", ae: "AutoEncoder"):
    """Write a checkpoint directory in the official layout (+ bagel_config.json, ae_config.json) that
    `from_pretrained` reads: the demo's base model and the tests' tiny checkpoints. Real exports of
    trained weights stream through convert_weights.py instead."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    for name, cfg in config_files(model.config).items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(cfg, f, indent=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, os.path.join(path, "ae.safetensors"))


def safetensors_keys(file: str) -> list[str]:
    from safetensors import safe_open
    if not os.path.exists(file):
        raise CheckpointMissing(f"{file}: missing")
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def checkpoint_index(path: str) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """Map our key -> (file, key in file), for the BAGEL model and for the VAE. Reads only headers."""
    keys = safetensors_keys
    bagel, ae = {}, {}
    if layout(path) == "official":
        name = "ema.safetensors" if os.path.exists(os.path.join(path, "ema.safetensors")) else "model.safetensors"
        bagel = {k: (os.path.join(path, name), k) for k in keys(os.path.join(path, name))}
        ae_file = os.path.join(path, "ae.safetensors")
        ae = {k: (ae_file, k) for k in keys(ae_file)}
        return bagel, ae
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_json(index)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        for k in keys(os.path.join(path, name)):
            ours = k[len("model."):] if k.startswith("model.") and k.split(".")[1] in TOP_LEVEL + ("vae_model",) else k
            if ours.startswith("vae_model."):
                ae[ours[len("vae_model."):]] = (os.path.join(path, name), k)
            else:
                bagel[ours] = (os.path.join(path, name), k)
    return bagel, ae


class CheckpointReader:
    """Strict access to the tensors of a checkpoint index, shared by `load_weights` and
    fsdp.load_pretrained. `want` maps our key -> shape (the model's tensors, without the sin-cos
    tables). Names and shapes are checked from the file headers before any data is read.

    Skipped on purpose: keys of parts switched off (visual_und/visual_gen False), and NSA parameters
    when the checkpoint has none (a dense model fine-tuned with attn="nsa": they start fresh)."""

    def __init__(self, want: dict[str, tuple], index: dict[str, tuple[str, str]], path: str, off: tuple[str, ...] = ()):
        from safetensors import safe_open
        self.fresh_nsa = not any(".self_attn.nsa." in k for k in index)
        self.want = {k: s for k, s in want.items() if not (self.fresh_nsa and ".self_attn.nsa." in k)
                     and not is_lora(k)}  # adapters start fresh (`fresh_tensors`)
        self.index = {k: v for k, v in index.items() if k not in POS_TABLES and not k.startswith(off)}
        self.stack = ExitStack()
        self.files = {f: self.stack.enter_context(safe_open(f, "pt", device="cpu")) for f in {f for f, _ in self.index.values()}}
        names = ", ".join(sorted(os.path.basename(f) for f in self.files))
        missing, unexpected = sorted(set(self.want) - set(self.index)), sorted(set(self.index) - set(self.want))
        wrong = [f"{k}: file {self.shape(k)} vs model {self.want[k]}" for k in sorted(set(self.want) & set(self.index))
                 if self.shape(k) != self.want[k]]
        parts = [f"{name} ({len(ks)}): {ks[:10]}" for name, ks in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if ks]
        self.error = f"{path} ({names}): checkpoint does not match the model config: " + "; ".join(parts) if parts else None

    def _slice(self, k):
        f, raw = self.index[k]
        return self.files[f].get_slice(raw)

    def shape(self, k) -> tuple:
        s = tuple(self._slice(k).get_shape())
        conv = k.endswith("patch_embedding.weight") and len(s) == 4  # conv layout -> linear (py, px, c)
        return (s[0], s[1] * s[2] * s[3]) if conv else s

    def dtype(self, k) -> torch.dtype:
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(self._slice(k).get_dtype(), torch.float32)

    def read(self, k) -> torch.Tensor:
        f, raw = self.index[k]
        t = self.files[f].get_tensor(raw)
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) if t.dim() == 4 and k.endswith("patch_embedding.weight") else t

    def close(self):
        self.stack.close()


def fresh_tensors(model: nn.Module, device, fresh_nsa: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint does not hold: the sin-cos tables (recomputed, like upstream), LoRA adapters
    and, for NSA added to a dense checkpoint, the NSA parameters: deterministic inits, the same on
    every rank."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PositionEmbedding):
            out[name + ".pos_embed"] = sincos_2d(mod.grid, mod.dim).to(device)
        elif fresh_nsa and isinstance(mod, nsa.NSA):
            twin = nsa.NSA(mod.config, mod.g_proj.in_features, mod.nq, mod.nkv, mod.d)
            out.update({f"{name}.{k}": v.to(device) for k, v in twin.state_dict().items()})
        elif isinstance(mod, LoRALinear):
            a, b = mod.initial(name)
            out.update({name + ".lora_a": a.to(device), name + ".lora_b": b.to(device)})
    return out


def load_weights(model: nn.Module, index: dict[str, tuple[str, str]], path: str, dtype, device):
    """Strict, streaming load into a model built on the meta device: each tensor is read, cast and
    assigned once, so peak memory is the model in `dtype` plus one tensor, never a second copy."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in POS_TABLES}
    reader = CheckpointReader(want, index, path, tuple(p + "." for p in TOP_LEVEL if not hasattr(model, p)))
    try:
        if reader.error:
            raise CheckpointError(reader.error)
        sd = {k: reader.read(k).to(device=device, dtype=dtype) for k in reader.want}
    finally:
        reader.close()
    fresh = fresh_tensors(model, device, reader.fresh_nsa)
    sd.update({k: v if k.endswith("pos_embed") else v.to(dtype) for k, v in fresh.items()})
    model.load_state_dict(sd, strict=True, assign=True)
