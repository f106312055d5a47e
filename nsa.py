"""Native Sparse Attention (NSA, arXiv 2502.11089) for BAGEL's packed, mixed-mask sequences.

Each query mixes three branches with per-token sigmoid gates (XunhaoLai/native-sparse-attention-triton
native_sparse_attention/module/native_sparse_attention.py):
  cmp  attention over compressed keys/values: one token per window of `kernel_size` tokens, every
       `kernel_stride` tokens (learned pooling + intra-window position term);
  slc  attention over the `topk` blocks of `block_size` tokens that the cmp probabilities rank
       highest (summed over each GQA group), the first and the local blocks always included;
  swa  a sliding window: the query and the `window_size` tokens before it.
For causal text this is the library's algorithm. It is generalised to BAGEL's mask so that no branch
sees a token `packing.allowed` forbids: a compressed token is visible iff all its tokens are
allowed, blocks without an allowed token are never selected, and selected tokens are filtered by
`allowed`. An image (full/noise) query sees, in each branch:
  cmp  the compressed tokens that lie wholly in what it may see (its image, the text and clean
       images before it), in both directions inside its image;
  swa  its whole image plus the `window_size` tokens before the image's first token (an image has
       no order: every token of it gets the same context), so the window is dense attention within
       the image (any query also sees, in its window, the later tokens a changed rule allows);
  slc  init and local blocks as text, then its free slots on the best-scored blocks outside its
       image (the prompt, a source image), since swa already covers the image; blocks holding
       nothing but its own image only fill slots left once every other block is taken.

The pure-PyTorch path runs on any device, one chunk of queries at a time and recomputed in the
backward (checkpoint), so memory is O(tokens), never tokens x tokens. On CUDA, packs whose mask is
plain causal attention per sample (`attention_layout`'s causal_only) go to the library's Triton ops
when it is importable; everything else falls back, logging why.
`python bench.py --what nsa` measures one attention against dense sdpa.
"""
import bisect
import itertools
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import packing

log = logging.getLogger(__name__)

CHUNK_ELEMS = 2 ** 24  # per-chunk budget for the largest temporary (64 MB in fp32), at any length
GATE_BIAS = (-2.0, 0.0, 0.0)  # initial gate logits (cmp, slc, swa): sigmoid = (0.12, 0.5, 0.5)


@dataclass
class NSAConfig:
    """NSA hyper-parameters: the names and defaults of LMMS Engine's NSA patch (`patch_type: ["nsa"]`)."""
    block_size: int = 64
    """tokens per selection block (the CUDA kernels need 32, 64, 128 or 256)"""
    compress_type: Literal["weightedpool", "linear", "avgpool"] = "weightedpool"
    """how a window of keys/values becomes one compressed token"""
    kernel_size: int = 32
    """tokens per compressed token (the CUDA kernels need 16, 32, 64 or 128)"""
    kernel_stride: int = 16
    """tokens between compressed tokens; must divide kernel_size and block_size"""
    topk: int = 16
    """blocks each query attends to in the selected branch, init and local blocks included"""
    init_blocks: int = 1
    """first blocks of each sample that every query selects"""
    local_blocks: int = 2
    """the query's own block and the ones just before it, always selected"""
    window_size: int = 512
    """sliding window: a text query sees itself and the window_size tokens before it"""
    compress_rope: bool = True
    """rotate each compressed key by the RoPE id of its window's first token (the library's module);
    False leaves them unrotated (LMMS Engine)"""

    def __post_init__(self):
        c, bad = self, []
        if min(c.block_size, c.kernel_size, c.kernel_stride, c.topk) < 1 or min(c.init_blocks, c.local_blocks, c.window_size) < 0:
            bad.append("block_size, kernel_size, kernel_stride, topk must be >= 1 and init_blocks, local_blocks, window_size >= 0")
        elif c.kernel_size % c.kernel_stride or c.block_size % c.kernel_stride:
            bad.append(f"kernel_stride {c.kernel_stride} must divide kernel_size {c.kernel_size} and block_size {c.block_size}")
        if c.topk < c.init_blocks + c.local_blocks:
            bad.append(f"topk {c.topk} < init_blocks {c.init_blocks} + local_blocks {c.local_blocks}")
        if c.compress_type not in ("weightedpool", "linear", "avgpool"):
            bad.append(f"compress_type {c.compress_type!r} is not weightedpool, linear or avgpool")
        if bad:
            raise ValueError("nsa: " + "; ".join(bad))


class NSA(nn.Module):
    """The NSA parameters of one MoT attention layer (`language_model.model.layers.{i}.self_attn.nsa.*`).

    Names follow LMMS Engine's patch (`g_proj`, `compress_key`, `compress_value`, `intra_block_pe`)
    under an `nsa.` prefix, plus `g_proj_moe_gen`: like every other projection in a MoT layer, the
    gate has one copy per expert. The compressors act on the mixed sequence and are shared."""

    def __init__(self, c: NSAConfig, hidden: int, nq: int, nkv: int, d: int):
        super().__init__()
        self.config, self.nq, self.nkv, self.d = c, nq, nkv, d
        self.g_proj = nn.Linear(hidden, 3 * nq)  # column 3h+c: gate c (cmp, slc, swa) of q head h
        self.g_proj_moe_gen = nn.Linear(hidden, 3 * nq)
        k = c.kernel_size
        shape = {"weightedpool": (nkv, k), "linear": (nkv, k * d, d), "avgpool": None}[c.compress_type]
        self.compress_key = nn.Parameter(torch.empty(shape)) if shape else None
        self.compress_value = nn.Parameter(torch.empty(shape)) if shape else None
        self.intra_block_pe = nn.Parameter(torch.empty(nkv, k, d))  # added to key i of each window
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Start close to the dense layer NSA is added to. LMMS Engine leaves the compressors at zero,
        so every compressed key is 0, the cmp branch outputs 0 and the top-k is a tie (EvolvingLMMs-Lab/
        lmms-engine src/lmms_engine/models/bagel/monkey_patch.py add_g_proj_to_attention_layers);
        the library's xavier makes compressed keys random mixtures. Here pooling starts as the
        window's mean (q . mean(k) = mean of the logits, so block scores mean something at step 0),
        the position term a small deterministic code, and every gate at sigmoid(GATE_BIAS): slc and
        swa at 0.5 each, so while they cover a whole sample the layer is dense attention + 0.12 x cmp.
        No RNG: the same fresh tensors on every rank."""
        if self.intra_block_pe.is_meta:  # built on the meta device: load_weights calls us again
            return
        k = self.config.kernel_size
        for g in (self.g_proj, self.g_proj_moe_gen):
            g.weight.zero_()  # learns from step 1: its gradient is x times the gate's
            g.bias.copy_(torch.tensor(GATE_BIAS).repeat(self.nq))
        for w in (self.compress_key, self.compress_value):
            if w is not None and w.dim() == 2:
                w.fill_(1.0 / k)
            elif w is not None:  # linear: [K*D, D] = K stacked identities / K (input index i*D + d)
                w.copy_(torch.eye(self.d).repeat(k, 1).expand(self.nkv, -1, -1) / k)
        # a small sin-cos code of the position inside the window: deterministic, so every rank of a
        # sharded model can build the same fresh tensors (no RNG)
        i = torch.arange(k, dtype=torch.float32)[:, None]
        f = 1.0 / 10000 ** (torch.arange(self.d // 2, dtype=torch.float32) / max(self.d // 2, 1))
        pe = 0.02 * torch.cat([torch.sin(i * f), torch.cos(i * f)], -1)  # [K, D]
        self.intra_block_pe.copy_(pe.expand(self.nkv, -1, -1))


class NSAInputs(NamedTuple):
    """What NSA needs besides q, k, v (rows of the pack; k_raw/cos/sin cover every key row)."""
    params: NSA
    gates: torch.Tensor  # [n_q, Hq, 3] sigmoid gates (cmp, slc, swa) of the query rows
    k_raw: torch.Tensor  # [N, Hkv, D] keys after QK-norm, before RoPE: what gets compressed
    cos: torch.Tensor  # [N, 1, D] RoPE table rows, for the compressed keys
    sin: torch.Tensor


@dataclass
class Layout:
    """Per-token facts of one pack (`plan`): device tensors for the masks, host ints for sizes."""
    bounds: list  # [n_samples + 1] cumulative sample starts (LMMS Engine passed [0, l1, l2, ...])
    sample: torch.Tensor  # [Np] long, as packing.attention_layout (padded past the pack's N tokens)
    split: torch.Tensor
    mode: torch.Tensor
    start: torch.Tensor  # [Np] first token of the token's split
    end: torch.Tensor  # [Np] one past its last token
    image: torch.Tensor  # [Np] bool: the token's split sees itself whole (no order: an image)
    splits: list  # host, per split in pack order: (first token, one past the last, image?, reach, causal?)
    all_causal: bool  # the rule is plain causal attention within each sample: the kernels' mask

    def reach(self, t: int) -> tuple[int, int]:
        """Host ints for token t: one past the last key it may see, and the last token of its sliding
        window. Both only grow along a sample (reach is a running maximum, an image's start is at
        most the next split's), so a chunk of queries t0..t1-1 reaches keys up to reach(t1 - 1) and
        windows from reach(t0)."""
        a, b, image, reach, causal = self.splits[bisect.bisect_right(self.splits, (t, math.inf)) - 1]
        return (max(reach, t + 1) if causal else reach), (a if image else t)


def plan(sample_lens: list[int], split_lens: list[int], attn_modes: list[str], device=None,
         layout: dict | None = None) -> Layout:
    """From the batch's `packing.attention_layout` (built by the data workers), or built here on the
    host: device tensors are copied in, every size stays a host int, nothing is read back. Key
    bounds come from the layout's `reach`, that is from `packing.allowed`."""
    lay = layout or packing.attention_layout(sample_lens, split_lens, attn_modes)
    to = lambda k: lay[k].to(device, non_blocking=True)
    bounds, splits, reach = list(itertools.accumulate(sample_lens, initial=0)), [], 0
    firsts = set(bounds)
    for (r, own), e, n in zip(lay["reach"], itertools.accumulate(split_lens), split_lens):
        if e - n in firsts:  # a new sample: the running maximum restarts
            reach = 0
        reach = max(reach, r)
        splits.append((e - n, e, own == packing.SEE_ALL, reach, own == packing.SEE_CAUSAL))
    image = torch.tensor([own == packing.SEE_ALL for _, own in lay["reach"]] + [False], dtype=torch.bool)
    return Layout(bounds, *map(to, ("sample", "split", "mode", "start", "end")),
                  image[torch.clamp(lay["split"], max=len(split_lens))].to(device, non_blocking=True),
                  splits, lay["causal_only"])


def _rotate(x, cos, sin):
    h = x.shape[-1] // 2  # NeoX rotate-half, as model.rope (not imported: model imports this file)
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


def compress(x: torch.Tensor, w: torch.Tensor | None, pe: torch.Tensor | None, c: NSAConfig) -> torch.Tensor:
    """One sample's [L, H, D] -> [M, H, D], M = (L - K) // S + 1 windows (a short tail is dropped, as
    the library's compressors do).
    `pe[h, i]` is added to the i-th token of every window before pooling."""
    k, s = c.kernel_size, c.kernel_stride
    if x.shape[0] < k:
        return x.new_zeros(0, *x.shape[1:])
    win = x.unfold(0, k, s)  # [M, H, D, K], a view
    if pe is not None:
        win = win + pe.transpose(1, 2).to(x.dtype)
    if c.compress_type == "avgpool":
        return win.mean(-1)
    if c.compress_type == "weightedpool":
        return torch.einsum("mhdk,hk->mhd", win, w.to(x.dtype))
    return torch.einsum("mhf,hfe->mhe", win.transpose(2, 3).flatten(2), w.to(x.dtype))  # f = i*D + d


def _probs(s, mask):
    """Softmax over the last axis where mask, in place (no grad); a row with nothing allowed -> 0."""
    s.masked_fill_(~mask, float("-inf"))
    s.sub_(s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)).exp_()
    return s.div_(s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny))


class Masks(NamedTuple):
    """What the rows of one chunk may see in each branch (built once, no grad, by `_select`)."""
    cmp: torch.Tensor  # [C, m] compressed tokens 0..m-1 whose K tokens are all allowed
    slc: torch.Tensor  # [C, Hkv, hi] the tokens of its selected blocks that the row may see
    lo: int  # window keys are sample positions lo..hi-1
    hi: int  # no row sees a key at or past hi: slc reads keys 0..hi-1
    swa: torch.Tensor  # [C, hi-lo]


def _select(qc, ck, t, s0, s1, lay, c: NSAConfig, k_eff: int, lo: int, hi: int):
    """No grad. For query rows t (global) of the sample [s0, s1), whose keys lie in [0, hi) and
    windows in [lo, hi) of the sample (host ints from the layout): the selected blocks [Hkv, C, k_eff]
    (sorted, -1 padded on the right, as the library) and the Masks of the three branches, all from
    one evaluation of packing.allowed over the sample's keys."""
    L, C, M = s1 - s0, t.shape[0], ck.shape[0]
    hkv, g = ck.shape[1], qc.shape[1] // ck.shape[1]
    K, S, B, w = c.kernel_size, c.kernel_stride, c.block_size, c.window_size
    nb = -(-L // B)
    tl = t - s0
    img = lay.image[t]
    start, end = lay.start[t] - s0, lay.end[t] - s0
    # no key at or past hi is allowed to these rows (the layout's reach, from the rule): evaluate
    # `allowed` on [0, hi) only (half the work on causal text) and only score windows inside it
    r = torch.arange(hi, device=t.device)
    ok = packing.allowed(t[:, None], s0 + r[None], lay.sample, lay.split, lay.mode)  # [C, hi]
    m_in = min(M, (hi - K) // S + 1 if hi >= K else 0)  # windows that end before hi
    vis = ok.unfold(1, K, S)[:, :m_in].all(-1) if m_in else ok.new_zeros(C, 0)
    mine = img[:, None] & (r >= start[:, None]) & (r < end[:, None])  # [C, hi] the row's own image
    per_block = lambda m: F.pad(m, (0, nb * B - hi)).view(C, nb, B).any(-1)  # [C, hi] -> [C, nb]
    any_ok = per_block(ok)
    own = any_ok & ~per_block(ok & ~mine)  # all the row may see in the block is its own image
    # importance = cmp probabilities summed over the GQA group (the library's compressed_attention) ...
    dt = torch.promote_types(qc.dtype, torch.float32)
    logits = torch.einsum("chgd,mhd->hgcm", qc.view(C, hkv, g, -1).to(dt) / math.sqrt(qc.shape[-1]), ck[:m_in].to(dt))
    p = _probs(logits, vis).sum(1) if m_in else logits.sum(1)  # [Hkv, C, m_in]
    # ... mapped to blocks by overlap: score[b] = sum_j p[j] |window j & block b| / S (its transform_score).
    # In stride units: window j covers [j, j+K'), block b covers [b B', (b+1) B')
    k1, b1 = K // S, B // S
    per_unit = F.pad(p, (k1 - 1, nb * b1 - m_in)).unfold(-1, k1, 1).sum(-1)  # [Hkv, C, nb*B']
    score = per_unit.view(hkv, C, nb, b1).sum(-1)
    b = torch.arange(nb, device=t.device)
    qb = tl[:, None] // B
    forced = (b < c.init_blocks) | ((b <= qb) & (b > qb - c.local_blocks))  # counted in topk, own image or not
    # an image query's free slots go to blocks outside its image first: the window already covers
    # the image, so own blocks would repeat it while the prompt or a source image is out of reach.
    # Own blocks rank below every other (a score lies in [0, g*K']: the group's probability mass
    # times a window's K' units), so with topk >= blocks slc is still dense attention
    score = torch.where(own, score - (g * k1 + 1), score)
    score = torch.where(forced, float("inf"), score)
    score = torch.where(any_ok, score, float("-inf"))  # never a block with nothing allowed
    val, idx = score.topk(min(k_eff, nb), dim=-1)
    idx = torch.where(val == float("-inf"), nb, idx).sort(-1).values
    idx = torch.where(idx == nb, -1, idx)
    idx = F.pad(idx, (0, k_eff - idx.shape[-1]), value=-1)  # [Hkv, C, k_eff]
    # slc: per row and KV head the allowed tokens of the blocks it selected (token granularity), as
    # a mask over keys [0, hi). Gathering only the chunk's selected blocks would need their number on
    # the host: a sync per chunk and layer (torch.unique); this mask has a size the layout gives
    sel = torch.where(idx < 0, nb, idx).transpose(0, 1)  # [C, Hkv, k]
    hit = ok.new_zeros(C, hkv, nb + 1).scatter_(-1, sel, True)[..., :nb]  # [C, Hkv, nb]
    slc = hit[..., None].expand(-1, -1, -1, B).flatten(2)[..., :hi] & ok[:, None]
    # swa: the last w+1 allowed tokens; an image query counts them from its image's first token (the
    # same context for every token of an order-free image) and also sees all of its image, as dense BAGEL
    anchor = torch.where(img, start, tl)[:, None]
    near = r[lo:] >= anchor - w  # and after the anchor whatever `ok` allows (BAGEL: the own image only)
    return idx, Masks(vis, slc, lo, hi, ok[:, lo:] & near)


def _branches(qc, gc, ck, cv, ks, vs, m: Masks):
    """Gated sum of the three branches for a chunk of query rows qc [C, Hq, D] of one sample;
    ks/vs [L, Hkv, D] the sample's rotated keys and values, ck/cv [M, Hkv, D] its compressed ones.
    Each branch is one fused SDPA call. A row with no allowed key gives 0, as in the library; only
    cmp has such rows (a selected block holds an allowed token, the window the query itself)."""
    C, hq, _ = qc.shape
    hkv = ks.shape[1]
    sdpa = F.scaled_dot_product_attention
    q1 = qc.transpose(0, 1)[None]  # [1, Hq, C, D]
    n = m.cmp.shape[1]  # later compressed tokens are invisible to every row of the chunk
    if n:
        # rows with no visible compressed token (e.g. the first K-1 tokens of a sample) attend to every one
        # and are zeroed: some CUDA bf16 SDPA backends return NaN for an all-masked row, in the
        # forward or the backward. The where also stops their gradient.
        empty = ~m.cmp.any(-1)[:, None]  # [C, 1]
        o_cmp = sdpa(q1, ck[:n].transpose(0, 1)[None], cv[:n].transpose(0, 1)[None], attn_mask=(m.cmp | empty)[None, None],
                     enable_gqa=True)[0]
        o_cmp = torch.where(empty, 0, o_cmp)
    else:  # e.g. a sample shorter than kernel_size: no compressed tokens
        o_cmp = q1.new_zeros(q1.shape[1:])
    # slc: keys [0, hi), each row masked to the blocks it selected
    kh, vh = (x[:m.hi].transpose(0, 1)[None] for x in (ks, vs))
    mask = m.slc.permute(1, 0, 2)[:, None].expand(hkv, hq // hkv, C, -1).reshape(1, hq, C, -1)
    o_slc = sdpa(q1, kh, vh, attn_mask=mask, enable_gqa=True)[0]
    kw, vw = (x[m.lo:m.hi].transpose(0, 1)[None] for x in (ks, vs))
    o_swa = sdpa(q1, kw, vw, attn_mask=m.swa[None, None], enable_gqa=True)[0]
    gc = gc.to(qc.dtype)
    return (gc[..., 0, None] * o_cmp.transpose(0, 1) + gc[..., 1, None] * o_slc.transpose(0, 1)
            + gc[..., 2, None] * o_swa.transpose(0, 1))


def attention(lay: Layout, q, k, v, x: NSAInputs, q_start: int = 0, return_idx: bool = False,
              library: bool | None = None):
    """NSA over a pack. q [n, Hq, D] are rows q_start.. of the pack (0 in training; the new block at
    inference), k/v [N, Hkv, D] every row, all after QK-norm and RoPE. Returns [n, Hq, D] and, with
    return_idx, the selected blocks [Hkv, n, k_eff] int32 (sample-relative, sorted, -1 padded).
    `library`: None = the Triton kernels on CUDA when they apply, False = never, True = also off
    CUDA (the Triton interpreter, TRITON_INTERPRET=1: how test_nsa.py checks them without a GPU)."""
    c = x.params.config
    if x.params.nkv != k.shape[1]:
        raise ValueError(f"NSA params are for {x.params.nkv} KV heads, keys have {k.shape[1]}")
    if (q.is_cuda if library is None else library) and q_start == 0:
        res = _library_attention(lay, q, k, v, x)
        if res is not None:
            return res if return_idx else res[0]
    n, hq, d = q.shape
    hkv, B = k.shape[1], c.block_size
    lens = [b - a for a, b in zip(lay.bounds, lay.bounds[1:])]
    k_eff = min(c.topk, -(-max(lens) // B))
    grad = torch.is_grad_enabled()
    outs, idxs = [], []
    for s0, s1 in zip(lay.bounds, lay.bounds[1:]):
        if s1 <= q_start:
            continue
        L, p = s1 - s0, x.params
        ck = compress(x.k_raw[s0:s1], p.compress_key, p.intra_block_pe, c)
        cv = compress(v[s0:s1], p.compress_value, None, c)
        if c.compress_rope and ck.shape[0]:
            first = s0 + torch.arange(ck.shape[0], device=k.device) * c.kernel_stride
            ck = _rotate(ck, x.cos[first], x.sin[first])
        # rows per chunk: keep the largest temporary in budget: the slc mask (bool, over at most the
        # whole sample), the cmp probabilities, the window (an image query's spans its whole image)
        span = max([b - a for a, b, image, *_ in lay.splits if image and s0 <= a < s1], default=0)
        per_row = max(hq * L // 4, 2 * hq * ck.shape[0], hq * (c.window_size + span + 64))
        rows = max(8, min(256, CHUNK_ELEMS // per_row))
        for t0 in range(max(s0, q_start), s1, rows):
            t = torch.arange(t0, min(t0 + rows, s1), device=q.device)
            qc, gc = q[t0 - q_start:t0 - q_start + len(t)], x.gates[t0 - q_start:t0 - q_start + len(t)]
            t1 = t0 + len(t)  # this chunk's keys lie in [0, hi) of the sample, its windows in [lo, hi)
            hi = lay.reach(t1 - 1)[0] - s0
            lo = max(0, lay.reach(t0)[1] - s0 - c.window_size)
            with torch.no_grad():
                idx, masks = _select(qc.detach(), ck.detach(), t, s0, s1, lay, c, k_eff, lo, hi)
            args = (qc, gc, ck, cv, k[s0:s1], v[s0:s1], masks)
            # recompute each chunk in the backward: keeps its masks, scores and probabilities out of memory
            outs.append(checkpoint(_branches, *args, use_reentrant=False) if grad else _branches(*args))
            idxs.append(idx)
    out = torch.cat(outs) if outs else q.new_zeros(0, hq, d)
    if return_idx:
        return out, (torch.cat(idxs, 1) if idxs else torch.zeros(hkv, 0, k_eff, dtype=torch.long)).int()
    return out


def attend_context(q, cache: tuple, x: NSAInputs, lay: Layout):
    """Inference (sample.Context): q [n, Hq, D] is the newest block, `cache` = (k, v, k_raw, cos, sin)
    over the whole context including it, `lay` the context's plan (one context = one sample)."""
    k, v, k_raw, cos, sin = cache
    return attention(lay, q, k, v, x._replace(k_raw=k_raw, cos=cos, sin=sin), q_start=k.shape[0] - q.shape[0])


# -------------------------------------------------------------------------------------------------
# CUDA: native-sparse-attention-triton (its ops package). test_nsa.py checks this glue against
# the path above, on CUDA or on CPU under the Triton interpreter.

@lru_cache(maxsize=None)
def _library():
    """(ops, flash_attn_varlen_func) or the reason they are unusable. Only `ops` is imported: the
    `module` package evaluates torch.cuda.current_device() at import and raises a non-ImportError."""
    try:
        from flash_attn import flash_attn_varlen_func
        from native_sparse_attention import ops
        return ops, flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001  a broken CUDA install must not crash a run
        return f"native_sparse_attention/flash_attn not importable ({type(e).__name__}: {e})"


@lru_cache(maxsize=None)
def _say_once(reason: str):
    log.warning("nsa: pure-PyTorch path (%s)", reason)


def _library_attention(lay: Layout, q, k, v, x: NSAInputs):
    """(output, selected blocks) from the Triton kernels when the pack and config allow them; None
    (and one log line) otherwise."""
    c, lib = x.params.config, _library()
    reason = (lib if isinstance(lib, str) else
              "the pack's mask is not plain causal (full/noise splits), which the kernels cannot express" if not lay.all_causal else
              f"dtype {q.dtype} (kernels need fp16/bf16)" if q.dtype not in (torch.float16, torch.bfloat16) else
              f"kernel_size {c.kernel_size} not in 16/32/64/128" if c.kernel_size not in (16, 32, 64, 128) else
              f"block_size {c.block_size} not in 32/64/128/256" if c.block_size not in (32, 64, 128, 256) else
              f"head_dim {q.shape[-1]} (needs a multiple of 8, at most 256)" if q.shape[-1] % 8 or q.shape[-1] > 256 else
              None)
    if reason:
        _say_once(reason)
        return None
    ops, flash = lib
    fn = {"weightedpool": ops.weightedpool_compress, "linear": ops.linear_compress, "avgpool": ops.avgpool_compress}[c.compress_type]
    p, dt = x.params, q.dtype
    cast = lambda t: None if t is None else t.to(dt)
    cu = torch.tensor(lay.bounds, dtype=torch.int32, device=q.device)  # cumulative: sample lengths would cut every pack of 2+ samples wrongly
    ck, ccu = fn(x.k_raw, cast(p.compress_key), cu, c.kernel_size, c.kernel_stride, cast(p.intra_block_pe))
    cv, _ = fn(v, cast(p.compress_value), cu, c.kernel_size, c.kernel_stride, None)
    if c.compress_rope:  # BAGEL's position id of each window's first token, not the library's j*S
        first = torch.cat([a + torch.arange(int(m), device=q.device) * c.kernel_stride
                           for a, m in zip(lay.bounds, (ccu[1:] - ccu[:-1]).tolist())])
        ck = _rotate(ck, x.cos[first], x.sin[first])
    lens = [b - a for a, b in zip(lay.bounds, lay.bounds[1:])]
    mx, mcx = max(lens), int((ccu[1:] - ccu[:-1]).max())
    o_cmp, idx = ops.compressed_attention(q, ck, cv, c.kernel_size, c.kernel_stride, c.block_size, c.topk, cu, ccu,
                                          mx, mcx, None, c.init_blocks, c.local_blocks)
    o_slc = ops.topk_sparse_attention(q, k, v, idx, c.block_size, cu, None)
    o_swa = flash(q, k, v, cu, cu, mx, mx, causal=True, window_size=(c.window_size, -1))
    g = x.gates.to(dt)  # outputs are token-major [N, H, D]: a transpose would mix tokens and heads
    return g[..., 0, None] * o_cmp + g[..., 1, None] * o_slc + g[..., 2, None] * o_swa, idx
