"""nsa.py tests: a straight, dense transcription of NSA (native-sparse-attention-triton's algorithm,
plus the rules nsa.py's docstring states for BAGEL's mask) for causal and mixed samples; BAGEL's mask
(dense equivalence, isolation by perturbation, bidirectionality, packs = samples alone); where image
queries spend their selection budget; edge cases; the model integration (names, init, checkpoints,
KV-cache inference, training). CPU, fp64 for the exact comparisons, tiny shapes."""
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import nsa
import packing
from model import Bagel, read_config, rope_cos_sin, rotate_half
from sample import Context, generate_text
from nsa import NSAConfig, NSAInputs
from test_smoke import GOLDEN, TINY, TOKENS, golden_batch, hidden, patchify_image, tiny_ae, tiny_bagel, write_official

F64 = torch.float64
THETA = 10000.0
# every feature at toy size: 2 windows per block, windows overlapping by half, a 6-token window
SMALL = NSAConfig(block_size=4, kernel_size=4, kernel_stride=2, topk=3, init_blocks=1, local_blocks=1, window_size=5)
TINY_NSA = dataclasses.replace(TINY, nsa=SMALL)
# a pack in BAGEL's shapes: an edit sample (text, ViT image, text, noisy target, clean copy, text),
# a T2I sample (caption, noisy target) and a text sample
MIXED = ([53, 36, 30], [10, 12, 6, 11, 9, 5, 20, 16, 30],
         ["causal", "full", "causal", "noise", "full", "causal", "causal", "noise", "causal"])


# -------------------------------------------------------------------------------------------------
# an independent reference: dense masks, loops, no chunking

def rope_ref(x, pos):
    """HF rotate-half RoPE written out on the two halves; angles in fp32 as HF computes them."""
    half = x.shape[-1] // 2
    inv = 1.0 / THETA ** (torch.arange(0, 2 * half, 2).float() / (2 * half))
    ang = pos[:, None].float() * inv[None]
    c, s = ang.cos().to(F64)[:, None], ang.sin().to(F64)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def compress_ref(x, w, pe, kind, K, S):
    out = []
    for j in range((x.shape[0] - K) // S + 1 if x.shape[0] >= K else 0):
        win = x[j * S:j * S + K]  # [K, H, D]
        if pe is not None:
            win = win + pe.transpose(0, 1)
        if kind == "avgpool":
            out.append(win.mean(0))
        elif kind == "weightedpool":
            out.append((w.T[:, :, None] * win).sum(0))
        else:
            out.append(torch.stack([win[:, h].reshape(-1) @ w[h] for h in range(x.shape[1])]))
    return torch.stack(out) if out else x.new_zeros(0, *x.shape[1:])


def softmax_ref(s, mask):
    empty = ~mask.any(-1, keepdim=True)
    p = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0).softmax(-1)
    return p * ~empty  # no visible key: output 0, as the library


def bagel_mask(splits):
    """BAGEL's dense mask of one sample from its (length, mode) splits, written from the rule: a key
    is visible if it is not later than the query or in the query's own full/noise split, and a noise
    split is visible only to itself. Also each token's split start and whether it is an image token."""
    split = torch.cat([torch.full((n,), i) for i, (n, _) in enumerate(splits)])
    mode = [splits[i][1] for i in split.tolist()]
    first = torch.tensor([sum(n for n, _ in splits[:i]) for i in split.tolist()])
    image, noise = torch.tensor([m != "causal" for m in mode]), torch.tensor([m == "noise" for m in mode])
    i, j = torch.arange(len(mode))[:, None], torch.arange(len(mode))[None]
    same = split[:, None] == split[None]
    mask = ((j <= i) | (same & image[:, None])) & (~noise[None] | same)
    return mask, first, image, split


def nsa_ref(q, k, v, gates, params, c: NSAConfig, max_len: int, splits=None):
    """One sample at positions 0..L-1, its (length, mode) splits (default: one causal split); q/k
    before RoPE. Returns out [L, Hq, D], idx [Hkv, L, k]. Image rows: their window counts from the
    image's first token plus the whole image; their free top-k slots go to blocks holding some token
    they may see outside their image before any block holding only their image."""
    L, hq, d = q.shape
    mask, first, image, split = bagel_mask(splits or [(L, "causal")])
    hkv = k.shape[1]
    g, K, S, B = hq // hkv, c.kernel_size, c.kernel_stride, c.block_size
    t = torch.arange(L)
    qr, kr = rope_ref(q, t), rope_ref(k, t)
    ck = compress_ref(k, params.compress_key, params.intra_block_pe, c.compress_type, K, S)
    cv = compress_ref(v, params.compress_value, None, c.compress_type, K, S)
    M = ck.shape[0]
    ckr = rope_ref(ck, torch.arange(M) * S)  # at the window's first position
    vis_c = torch.stack([mask[:, j * S:j * S + K].all(-1) for j in range(M)], 1) if M else torch.zeros(L, 0, dtype=torch.bool)
    nb = math.ceil(max_len / B)
    # exact overlap of window j and block b, in units of the stride (the library's transform_score)
    W = torch.tensor([[max(0, min(j * S + K, (b + 1) * B) - max(j * S, b * B)) / S for b in range(nb)] for j in range(M)], dtype=F64)
    k_eff = min(c.topk, nb)
    blk = torch.arange(L) // B  # block of each key
    any_ok = torch.stack([mask[:, blk == b].any(-1) for b in range(nb)], 1)  # [L, nb]
    outside = torch.stack([(mask & (split[None] != split[:, None]))[:, blk == b].any(-1) for b in range(nb)], 1)
    own = image[:, None] & any_ok & ~outside
    out = torch.zeros(L, hq, d, dtype=F64)
    idx = torch.zeros(hkv, L, k_eff, dtype=torch.long)
    for hk in range(hkv):
        P = torch.zeros(L, M, dtype=F64)
        o_cmp = []
        for h in range(hk * g, hk * g + g):
            p = softmax_ref(qr[:, h] @ ckr[:, hk].T / math.sqrt(d), vis_c)
            P = P + p.detach()
            o_cmp.append(p @ cv[:, hk])
        s = P @ W if M else torch.zeros(L, nb, dtype=F64)
        for i in range(L):  # forced blocks first, then by (own image last, score), never one with nothing visible
            qi, si, oi = i // B, s[i].tolist(), own[i].tolist()
            forced = lambda b: b < c.init_blocks or qi - c.local_blocks < b <= qi
            order = sorted((b for b in range(nb) if any_ok[i, b]), key=lambda b: (not forced(b), oi[b], -si[b]))
            sel = sorted(order[:k_eff])
            idx[hk, i] = torch.tensor(sel + [-1] * (k_eff - len(sel)))
        vis_s = mask & (blk[None, :, None] == idx[hk][:, None, :]).any(-1)
        anchor = torch.where(image, first, t)[:, None]
        r = torch.arange(L)[None]
        vis_w = mask & (((r >= anchor - c.window_size) & (r <= anchor)) | (image[:, None] & (split[None] == split[:, None])))
        for i, h in enumerate(range(hk * g, hk * g + g)):
            logits = qr[:, h] @ kr[:, hk].T / math.sqrt(d)
            o_slc = softmax_ref(logits, vis_s) @ v[:, hk]
            o_swa = softmax_ref(logits, vis_w) @ v[:, hk]
            out[:, h] = gates[:, h, 0, None] * o_cmp[i] + gates[:, h, 1, None] * o_slc + gates[:, h, 2, None] * o_swa
    return out, idx


# -------------------------------------------------------------------------------------------------
# helpers

def rand_params(c: NSAConfig, hq: int, hkv: int, d: int, seed: int = 0) -> nsa.NSA:
    """NSA params with random (not mean-pooling) compressors, fp64."""
    torch.manual_seed(seed)
    p = nsa.NSA(c, 8, hq, hkv, d).to(F64)
    with torch.no_grad():
        for t in (p.compress_key, p.compress_value, p.intra_block_pe):
            if t is not None:
                t.copy_(0.5 * torch.randn_like(t))
    return p


def inputs(n, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g, dtype=F64).requires_grad_() for h in (hq, hkv, hkv)] + \
           [torch.rand(n, hq, 3, generator=g, dtype=F64).requires_grad_()]


def run(params, q0, k0, v, gates, sample_lens, split_lens=None, modes=None, pos=None):
    """nsa.attention on pre-RoPE q0/k0, rotated with model.py's RoPE at BAGEL-style position ids."""
    split_lens = split_lens or sample_lens
    modes = modes or ["causal"] * len(split_lens)
    if pos is None:
        pos = torch.cat([torch.arange(n) for n in sample_lens])
    cos, sin = rope_cos_sin(pos, q0.shape[-1], THETA, q0.dtype)
    q, k = q0 * cos + rotate_half(q0) * sin, k0 * cos + rotate_half(k0) * sin
    lay = nsa.plan(sample_lens, split_lens, modes)
    return nsa.attention(lay, q, k, v, NSAInputs(params, gates, k0, cos, sin), return_idx=True)


def ref_per_sample(q, k, v, gates, params, c, lens, splits=None):
    """`nsa_ref` run sample by sample over a pack: (output [N, H, D], selected blocks, samples joined)."""
    outs, idxs, s0 = [], [], 0
    for n, sp in zip(lens, splits or [None] * len(lens)):
        o, i = nsa_ref(q[s0:s0 + n], k[s0:s0 + n], v[s0:s0 + n], gates[s0:s0 + n], params, c, max(lens), sp)
        outs.append(o)
        idxs.append(i)
        s0 += n
    return torch.cat(outs), torch.cat(idxs, 1)


def grads(tensors, params=None):
    ts = list(tensors) + ([p for p in params.parameters()] if params is not None else [])
    return [None if t.grad is None else t.grad.clone() for t in ts]


# -------------------------------------------------------------------------------------------------
# the reference

@pytest.mark.parametrize("compress_type,hq,hkv,cfg", [
    ("weightedpool", 4, 2, SMALL),
    ("linear", 7, 1, SMALL),  # GQA group of 7
    ("avgpool", 2, 2, dataclasses.replace(SMALL, topk=2)),  # GQA group 1, init + local == topk
    ("weightedpool", 4, 1, NSAConfig(block_size=8, kernel_size=4, kernel_stride=2, topk=20, init_blocks=2,
                                     local_blocks=2, window_size=3)),  # topk > every sample's block count
    ("linear", 2, 1, NSAConfig(block_size=8, kernel_size=8, kernel_stride=4, topk=4, init_blocks=0,
                               local_blocks=2, window_size=9, compress_type="linear")),
])
def test_causal_pack_matches_reference(compress_type, hq, hkv, cfg):
    """Outputs, selected blocks and every gradient equal the reference, per sample of a causal pack
    with a sample shorter than the kernel (no compressed tokens)."""
    c = dataclasses.replace(cfg, compress_type=compress_type)
    lens, d = [37, 3, 64, 21], 8
    params = rand_params(c, hq, hkv, d)
    q, k, v, gates = inputs(sum(lens), hq, hkv, d)
    out, idx = run(params, q, k, v, gates, lens)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    mine = grads((q, k, v, gates), params)
    for t in [q, k, v, gates, *params.parameters()]:
        t.grad = None
    ref, ref_idx = ref_per_sample(q, k, v, gates, params, c, lens)
    (ref * w).sum().backward()
    assert torch.equal(idx.long(), ref_idx)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert not out[37:40, :, :].eq(0).all()  # the short sample still gets slc + swa
    for a, b in zip(mine, grads((q, k, v, gates), params)):
        if a is None or b is None:  # g_proj: unused here (gates are given)
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_bf16_stays_close_to_fp64():
    lens, d = [50, 30], 16
    params = rand_params(SMALL, 4, 2, d)
    q, k, v, gates = inputs(sum(lens), 4, 2, d)
    ref, idx = run(params, q, k, v, gates, lens)
    low, _ = run(params.to(torch.bfloat16), *(t.detach().bfloat16() for t in (q, k, v, gates)), lens)
    assert low.dtype == torch.bfloat16
    assert (low.double() - ref).abs().max() < 5e-2


# -------------------------------------------------------------------------------------------------
# BAGEL's mask

def golden_layout(case):
    with open(os.path.join(GOLDEN, case + ".json")) as f:
        e = json.load(f)["expected"]
    return e["sample_lens"], e["split_lens"], e["attn_modes"], torch.tensor(e["packed_position_ids"])


@pytest.mark.parametrize("case", ["mixed", "case6_pack", "case5_edit_chain"])
def test_selected_and_window_equal_dense_attention_when_they_cover_everything(case):
    sl, spl, modes, pos = (*MIXED, None) if case == "mixed" else golden_layout(case)
    c = dataclasses.replace(SMALL, topk=100, window_size=1000)
    n, d = sum(sl), 8
    params = rand_params(c, 4, 2, d)
    q0, k0, v, _ = inputs(n, 4, 2, d)
    mask = torch.block_diag(*packing.sample_masks(sl, spl, modes))
    if pos is None:
        pos = torch.cat([torch.arange(m) for m in sl])
    cos, sin = rope_cos_sin(pos, d, THETA, F64)
    q, k = q0 * cos + rotate_half(q0) * sin, k0 * cos + rotate_half(k0) * sin
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) / math.sqrt(d)
    dense = torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v.repeat_interleave(2, 1))
    for branch in (1, 2):
        gates = torch.zeros(n, 4, 3, dtype=F64)
        gates[..., branch] = 1
        out, _ = run(params, q0, k0, v, gates, sl, spl, modes, pos)
        torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def _sample_splits(sl, spl, modes):
    """Per sample of a pack, its (length, mode) splits."""
    out, j = [], 0
    for n in sl:
        out.append([])
        while sum(m for m, _ in out[-1]) < n:
            out[-1].append((spl[j], modes[j]))
            j += 1
    return out


def test_mixed_pack_matches_reference():
    """Outputs, selected blocks and gradients equal the reference on a pack of an edit sample (prompt,
    ViT source, text, noisy target, clean copy, text), a T2I sample and a text sample: the BAGEL mask
    in every branch, image windows from the image's start, own-image blocks after all others."""
    sl, spl, modes = MIXED
    c = dataclasses.replace(SMALL, topk=4)  # 2 free slots
    params = rand_params(c, 4, 2, 8)
    q, k, v, gates = inputs(sum(sl), 4, 2, 8)
    out, idx = run(params, q, k, v, gates, sl, spl, modes)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    mine = grads((q, k, v, gates), params)
    for t in [q, k, v, gates, *params.parameters()]:
        t.grad = None
    ref, ref_idx = ref_per_sample(q, k, v, gates, params, c, sl, _sample_splits(*MIXED))
    (ref * w).sum().backward()
    assert torch.equal(idx.long(), ref_idx)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(mine, grads((q, k, v, gates), params)):
        if a is None or b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_image_queries_spend_free_slots_outside_their_image():
    """A T2I sample (24-token prompt, 42-token noisy image; block 8) and an edit sample
    (source VAE and ViT images, instruction, noisy target): every image row's free top-k slots go to
    blocks holding something it may see outside its own image (the prompt, the source images) while
    such blocks remain; only then to blocks of its own image."""
    sl = [66, 72]
    spl = [24, 42, 20, 18, 10, 24]
    modes = ["causal", "noise", "full", "full", "causal", "noise"]
    c = NSAConfig(block_size=8, kernel_size=8, kernel_stride=4, topk=5, init_blocks=1, local_blocks=2, window_size=16)
    params = rand_params(c, 4, 2, 8)
    q, k, v, gates = inputs(sum(sl), 4, 2, 8)
    _, idx = run(params, q, k, v, gates, sl, spl, modes)
    checked, reached, s0 = 0, set(), 0
    for j, (n, splits) in enumerate(zip(sl, _sample_splits(sl, spl, modes))):
        mask, _, image, split = bagel_mask(splits)
        blk = torch.arange(n) // c.block_size
        for i in image.nonzero().flatten().tolist():
            seen = mask[i] & (split != split[i])  # what the row may see outside its image
            outside = {b for b in blk[seen].tolist()}
            inside = set(blk[mask[i]].tolist()) - outside
            qb = i // c.block_size
            forced = {b for b in range(qb + 1) if b < c.init_blocks or b > qb - c.local_blocks}
            for h in range(idx.shape[0]):
                sel = set(idx[h, s0 + i].tolist()) - {-1}
                free = sel - forced
                want_out = outside - forced
                if len(want_out) >= c.topk - len(forced):
                    assert free <= want_out, (s0 + i, h, sorted(sel))
                    checked += bool(inside - forced)  # own blocks were there to take, and were not
                else:
                    assert want_out <= free, (s0 + i, h, sorted(sel))
                reached |= {(j, sp) for b in free for sp in split[(blk == b) & seen].tolist()}
        s0 += n
    assert checked > 100  # rows that had own blocks to take
    assert {(0, 0), (1, 0), (1, 1), (1, 2)} <= reached  # the prompt; the source VAE and ViT images, the instruction


def test_image_window_counts_from_the_image_start():
    """swa: every token of the T2I sample's noisy image [73, 89) sees the window_size caption tokens
    before the image's first token, and none before those (an image has no order)."""
    sl, spl, modes = MIXED
    params = rand_params(SMALL, 4, 2, 8)
    q, k, v, _ = inputs(sum(sl), 4, 2, 8)
    gates = torch.zeros(sum(sl), 4, 3, dtype=F64)
    gates[..., 2] = 1
    o0, _ = run(params, q, k, v, gates, sl, spl, modes)
    for key, seen in ((73 - SMALL.window_size, True), (72 - SMALL.window_size, False)):
        v2 = v.detach().clone()
        v2[key] += 1.0
        o1, _ = run(params, q, k, v2, gates, sl, spl, modes)
        changed = (o1[73:89] != o0[73:89]).flatten(1).any(-1)
        assert changed.all() if seen else not changed.any(), key


def plain_sdpa(q, k, v, attn_mask, enable_gqa=False):
    """Softmax attention written out: an all-masked row gives NaN, as some CUDA bf16 SDPA backends."""
    g = q.shape[-3] // k.shape[-3]
    s = q @ k.repeat_interleave(g, -3).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.masked_fill(~attn_mask, float("-inf")).softmax(-1) @ v.repeat_interleave(g, -3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "nan_on_empty"])
def test_rows_without_compressed_tokens_give_zero_and_finite_grads(monkeypatch, dtype, backend):
    """The first K-1 tokens of a sample see no compressed token: their cmp output is 0 and every
    gradient finite, even on an SDPA backend that returns NaN for an all-masked row."""
    if backend == "nan_on_empty":
        monkeypatch.setattr(F, "scaled_dot_product_attention", plain_sdpa)
    n, d = 14, 8
    params = rand_params(SMALL, 4, 2, d).to(dtype)
    q, k, v, _ = (t.detach().to(dtype).requires_grad_() for t in inputs(n, 4, 2, d))
    gates = torch.zeros(n, 4, 3, dtype=dtype)
    gates[..., 0] = 1  # cmp only
    out, _ = run(params, q, k, v, gates, [n])
    out.float().square().sum().backward()
    K = SMALL.kernel_size
    assert out[:K - 1].eq(0).all() and out[K - 1:].ne(0).any(-1).all()
    for t in (q, k, v, *params.parameters()):
        assert t.grad is None or t.grad.isfinite().all()
    assert not q.grad[:K - 1].any() and q.grad[K - 1:].any()


def _perturbed(rows, cfg=SMALL, layout=MIXED, seed=0):
    """(out, idx, grads of a loss on every row NOT in `rows`) before and after changing q/k/v at `rows`."""
    sl, spl, modes = layout
    n, d = sum(sl), 8
    params = rand_params(cfg, 4, 2, d)
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    res = []
    for bump in (0.0, 1.0):
        q, k, v, gates = inputs(n, 4, 2, d, seed)
        with torch.no_grad():
            for t in (q, k, v):
                t[rows] += bump * torch.randn_like(t[rows])
        out, idx = run(params, q, k, v, gates, sl, spl, modes)
        (out[keep] * torch.linspace(-1, 1, out[keep].numel(), dtype=F64).view_as(out[keep])).sum().backward()
        res.append((out.detach(), idx, [t.grad for t in (q, k, v, gates)] + [p.grad.clone() for p in params.parameters() if p.grad is not None]))
        params.zero_grad()
    return keep, res


def _assert_isolated(keep, res, rows):
    (o0, i0, g0), (o1, i1, g1) = res
    assert torch.equal(o0[keep], o1[keep]) and torch.equal(i0[:, keep], i1[:, keep])
    assert not torch.equal(o0[rows], o1[rows])
    for a, b in zip(g0[:3], g1[:3]):  # q, k, v: unchanged where kept, and nothing flows to `rows`
        assert torch.equal(a[keep], b[keep]) and not a[rows].any() and not b[rows].any()
    for a, b in zip(g0[3:], g1[3:]):  # gates, compressors
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_other_samples_are_invisible():
    rows = torch.arange(53, 89)  # the T2I sample
    _assert_isolated(*_perturbed(rows), rows)


def test_later_text_is_invisible():
    rows = torch.arange(48, 53)  # the edit sample's last text split (after its images)
    keep, res = _perturbed(rows)
    _assert_isolated(keep & (torch.arange(119) < 53), res, rows)  # the other samples are covered above
    rows = torch.arange(100, 119)  # the text sample after its 11th token
    keep, res = _perturbed(rows)
    _assert_isolated(keep, res, rows)


@pytest.mark.parametrize("rows", [torch.arange(28, 39), torch.arange(73, 89)], ids=["edit_target", "t2i_target"])
def test_noisy_latents_are_invisible(rows):
    """Nobody outside a noise split sees it: not later text, not the clean copy after it, not even
    through compressed tokens or block scores (the top-k indices are unchanged too)."""
    _assert_isolated(*_perturbed(rows), rows)


@pytest.mark.parametrize("split", [(10, 22), (28, 39), (39, 48)], ids=["vit", "noise", "clean_vae"])
def test_images_are_bidirectional_in_every_branch(split):
    """The first token of an image sees the last one through slc and swa, and through cmp the last
    one that a compressed window inside the image covers (windows sit on a grid from the sample start)."""
    a, b = split
    sl, spl, modes = MIXED
    c = dataclasses.replace(SMALL, topk=100)  # every block: own-image blocks come after all others
    params = rand_params(c, 4, 2, 8)
    q, k, v, _ = inputs(sum(sl), 4, 2, 8)
    for branch in range(3):
        gates = torch.zeros(sum(sl), 4, 3, dtype=F64)
        gates[..., branch] = 1
        o0, _ = run(params, q, k, v, gates, sl, spl, modes)
        last = b - 1
        if branch == 0:  # the end of the last window [jS, jS+K) inside [a, b)
            last = (b - c.kernel_size) // c.kernel_stride * c.kernel_stride + c.kernel_size - 1
            assert a <= last - c.kernel_size + 1
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[last] += 1.0
        v2[last] += 1.0
        o1, _ = run(params, q, k2, v2, gates, sl, spl, modes)
        assert not torch.allclose(o0[a], o1[a]), branch
        assert torch.equal(o0[:a], o1[:a])


def test_a_pack_equals_its_samples_alone():
    sl, spl, modes = MIXED
    params = rand_params(SMALL, 4, 2, 8)
    q, k, v, gates = inputs(sum(sl), 4, 2, 8)
    out, idx = run(params, q, k, v, gates, sl, spl, modes)
    s0, j = 0, 0
    for n in sl:
        sub_spl, sub_modes = [], []
        while sum(sub_spl) < n:  # this sample's splits
            sub_spl.append(spl[j])
            sub_modes.append(modes[j])
            j += 1
        r = slice(s0, s0 + n)
        o, i = run(params, q[r], k[r], v[r], gates[r], [n], sub_spl, sub_modes)
        torch.testing.assert_close(o, out[r], rtol=0, atol=1e-12)
        assert torch.equal(i, idx[:, r, :i.shape[-1]]) and (idx[:, r, i.shape[-1]:] == -1).all()
        s0 += n


def test_chunking_changes_nothing(monkeypatch):
    """Chunks of 8 query rows (each gathering the union of its own selected blocks) give the same
    outputs, selected blocks and gradients as one chunk for the whole sample."""
    sl, spl, modes = MIXED
    params = rand_params(SMALL, 4, 2, 8)
    res = []
    for budget in (nsa.CHUNK_ELEMS, 1):
        monkeypatch.setattr(nsa, "CHUNK_ELEMS", budget)
        q, k, v, gates = inputs(sum(sl), 4, 2, 8)
        out, idx = run(params, q, k, v, gates, sl, spl, modes)
        out.square().sum().backward()
        res.append([out, idx] + grads((q, k, v, gates), params))
        params.zero_grad(set_to_none=True)
    for a, b in zip(*res):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_config_errors_are_readable():
    with pytest.raises(ValueError, match="kernel_stride 3 must divide kernel_size 32"):
        NSAConfig(kernel_stride=3)
    with pytest.raises(ValueError, match="topk 2 < init_blocks 1 \\+ local_blocks 2"):
        NSAConfig(topk=2)
    with pytest.raises(ValueError, match="compress_type 'conv'"):
        NSAConfig(compress_type="conv")


def test_long_sample_keeps_memory_linear():
    """2k tokens at BAGEL's defaults run chunked: no temporary is tokens x tokens (checked by
    bounding the rows per chunk), and gradients come back through the checkpointed chunks."""
    n, d = 2048, 32
    params = nsa.NSA(NSAConfig(), 64, 2, 1, d)
    q, k, v = (torch.randn(n, h, d, requires_grad=True) for h in (2, 1, 1))
    gates = torch.rand(n, 2, 3)
    cos, sin = rope_cos_sin(torch.arange(n), d, THETA, torch.float32)
    calls = []
    orig = nsa._branches
    nsa._branches = lambda *a: calls.append(a[0].shape[0]) or orig(*a)
    try:
        out = nsa.attention(nsa.plan([n], [n], ["causal"]), q, k, v, NSAInputs(params, gates, k, cos, sin))
        out.sum().backward()
    finally:
        nsa._branches = orig
    assert max(calls) <= 256 and sum(calls) >= 2 * n  # chunked, and each chunk recomputed in the backward
    assert q.grad.abs().sum() > 0 and params.compress_key.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------
# the model

def test_parameters_are_per_layer_and_start_non_trivial():
    model = Bagel(TINY_NSA)
    names = {n for n, _ in model.named_parameters() if ".nsa." in n}
    assert names == {f"language_model.model.layers.{i}.self_attn.nsa.{p}" for i in range(2) for p in
                     ("g_proj.weight", "g_proj.bias", "g_proj_moe_gen.weight", "g_proj_moe_gen.bias",
                      "compress_key", "compress_value", "intra_block_pe")}
    p = model.language_model.model.layers[0].self_attn.nsa
    assert torch.equal(p.compress_key, torch.full((2, 4), 0.25))  # mean pooling, not LMMS Engine's zeros
    assert torch.sigmoid(p.g_proj.bias[:3]).tolist() == pytest.approx([0.1192, 0.5, 0.5], abs=1e-4)
    assert p.intra_block_pe.abs().sum() > 0
    assert not any(".nsa." in n for n, _ in Bagel(TINY).named_parameters())  # off by default


def test_checkpoints_round_trip_and_dense_checkpoints_gain_fresh_nsa(tmp_path):
    model, ae = tiny_bagel(config=TINY_NSA), tiny_ae()
    write_official(tmp_path / "nsa", model, ae)
    assert read_config(str(tmp_path / "nsa")) == TINY_NSA
    loaded = Bagel.from_pretrained(str(tmp_path / "nsa"))
    for key, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[key]), key
    dense = tiny_bagel()
    write_official(tmp_path / "dense", dense, ae)
    grown = Bagel.from_pretrained(str(tmp_path / "dense"), nsa=SMALL)  # fine-tune a dense BAGEL with NSA
    fresh = Bagel(TINY_NSA).state_dict()
    for key, t in grown.state_dict().items():
        if ".nsa." in key:  # fresh and deterministic
            assert torch.equal(t, fresh[key]), key
        elif ".nsa." not in key:
            assert torch.equal(t, dense.state_dict()[key]), key


def test_model_forward_backward_reaches_every_nsa_parameter():
    model = tiny_bagel(config=TINY_NSA)
    b = golden_batch("case6_pack")
    out = model(**b)  # attn defaults to "nsa" when the config has NSA
    (out["ce"].mean() + out["mse"].mean()).backward()
    for name, p in model.named_parameters():
        if ".nsa." in name:
            assert p.grad is not None and p.grad.any(), name
    model.attn = "sdpa"  # dense attention over the same weights: different, but runs
    assert not torch.allclose(model(**b)["ce"], out["ce"])
    dense = tiny_bagel()
    dense.attn = "nsa"
    with pytest.raises(ValueError, match="attn='nsa' needs"):
        dense(**b)


@torch.no_grad()
def test_model_mask_semantics_by_perturbation():
    model = tiny_bagel(config=TINY_NSA)
    b = golden_batch("case6_pack")  # samples [0,52) understanding, [52,78) T2I, [78,130) edit
    h0 = hidden(model, b)
    other = dict(b, packed_text_ids=b["packed_text_ids"].clone())
    other["packed_text_ids"][(b["packed_text_indexes"] >= 52) & (b["packed_text_indexes"] < 78)] += 1
    h2 = hidden(model, other)
    assert torch.equal(h2[:52], h0[:52]) and torch.equal(h2[78:], h0[78:]) and not torch.allclose(h2[52:78], h0[52:78])
    noisy = dict(b, packed_noise=b["packed_noise"].clone())
    noisy["packed_noise"][b["packed_vae_token_indexes"] == 128] += 1.0  # edit target, split [120,130)
    h3 = hidden(model, noisy)
    assert torch.equal(h3[:120], h0[:120]) and not torch.allclose(h3[121], h0[121])


@torch.no_grad()
def test_kv_cache_inference_uses_the_same_nsa_as_training():
    """Hidden states of image prefill, question and greedy decoding through Context equal the packed
    training forward over the same sequence (the layout is the same sample, split by split)."""
    model = tiny_bagel(config=TINY_NSA)
    img = torch.rand(3, 56, 42, generator=torch.Generator().manual_seed(0)) * 2 - 1
    patches, ids = patchify_image(img), torch.tensor([r * 8 + c for r in range(4) for c in range(3)])
    question = [70, 71, 72, 73, 74, 75, 76]
    ctx = Context(model, TOKENS)
    ctx.add_vit_image(patches, ids)
    ctx.add_text(question)
    answer = generate_text(ctx, max_new_tokens=8)
    n = 14 + 9 + 1 + len(answer)
    text = [TOKENS["vision_start"], TOKENS["vision_end"], TOKENS["bos"], *question, TOKENS["eos"], TOKENS["bos"], *answer]
    batch = {"sequence_length": n, "sample_lens": [n], "split_lens": [14, 9, 1 + len(answer)],
             "attn_modes": ["full", "causal", "causal"], "packed_text_ids": torch.tensor(text),
             "packed_text_indexes": torch.tensor([0, 13] + list(range(14, n))),
             "packed_position_ids": torch.tensor([0] * 14 + list(range(1, n - 13))),
             "packed_vit_tokens": patches, "packed_vit_token_indexes": torch.arange(1, 13),
             "packed_vit_position_ids": ids, "vit_token_seqlens": torch.tensor([12])}
    assert n > 3 * SMALL.topk * SMALL.block_size // 2  # long enough for the sparsity to matter
    h = hidden(model, batch)
    greedy = model.language_model.lm_head(h[23:]).argmax(-1).tolist()  # from the answer's <|im_start|> on
    assert greedy[:len(answer)] == answer
    again = Context(model, TOKENS)
    again.add_vit_image(patches, ids)
    again.add_text(question)
    step = again.run(again._embed([TOKENS["bos"]]), torch.tensor([again.rope]), [], "causal")
    torch.testing.assert_close(step[0], h[23], rtol=1e-5, atol=1e-5)


def test_tiny_training_run_lowers_both_losses():
    torch.manual_seed(0)
    model = tiny_bagel(config=TINY_NSA)
    model.attn = "nsa"
    b = golden_batch("case6_pack")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    hist = []
    for _ in range(20):
        out = model(**b)
        ce, mse = out["ce"].mean(), out["mse"].mean()
        (ce + mse).backward()
        opt.step()
        opt.zero_grad()
        hist.append((ce.item(), mse.item()))
    print(f"nsa training: ce {hist[0][0]:.3f} -> {hist[-1][0]:.3f}, mse {hist[0][1]:.3f} -> {hist[-1][1]:.3f}")
    assert hist[-1][0] < 0.7 * hist[0][0] and hist[-1][1] < 0.9 * hist[0][1]


# -------------------------------------------------------------------------------------------------
# native-sparse-attention-triton (not on PyPI: skipped unless importable). On a GPU:
#   PYTHONPATH=/path/to/native-sparse-attention-triton pytest test_nsa.py -k library
# without one, the same kernels run on the CPU in Triton's interpreter (pip install triton==3.5.0):
#   TRITON_INTERPRET=1 PYTHONPATH=... pytest test_nsa.py -k library        (~1 min)

def window_attention(q, k, v, cu, _cu, _mx, _mx2, causal=True, window_size=(-1, -1)):
    """flash_attn_varlen_func's causal sliding window, written out (flash-attn needs CUDA)."""
    out, w = [], window_size[0]
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        i = torch.arange(b - a, device=q.device)
        mask = (i[None] <= i[:, None]) & (i[None] >= i[:, None] - w)
        out.append(F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), attn_mask=mask,
                                                  enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def library(monkeypatch):
    """(device, dtype) for the library's kernels with nsa._library() pointing at them, or skip."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpret):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    ops = pytest.importorskip("native_sparse_attention.ops")
    try:
        from flash_attn import flash_attn_varlen_func as window
    except ImportError:
        window = window_attention
    monkeypatch.setattr(nsa, "_library", lambda: (ops, window))
    if torch.cuda.is_available():
        yield "cuda", torch.bfloat16
        return
    # CPU shims, none of them in the attention math: histc on int (CUDA-only in torch), a device
    # switch, and two interpreter bugs: its histogram returns int64 data typed int32 (its stores then
    # write 8 bytes per 4-byte slot: heap corruption), and int() of a scalar fails on NumPy 2.
    # The interpreter's bf16 gives NaNs: fp16.
    import numpy as np
    from triton.runtime import interpreter
    histc = torch.histc
    monkeypatch.setattr(torch, "histc", lambda x, bins=100, min=0, max=0: histc(x.float(), int(bins), float(min), float(max)).to(x.dtype))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    hist = interpreter.InterpreterBuilder.create_histogram
    def hist32(self, *a, **kw):
        h = hist(self, *a, **kw)
        return interpreter.TensorHandle(h.data.astype(np.int32), h.dtype)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_histogram", hist32)
    patch_tensor = interpreter._patch_lang_tensor
    def patch_tensor_index(tensor):
        patch_tensor(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.item())
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_tensor_index)
    with np.errstate(over="ignore", invalid="ignore"):  # exp2 of -inf - -inf inside the kernels, as on a GPU
        yield "cpu", torch.float16


@pytest.mark.parametrize("compress_type,hq,hkv,cfg,lens", [
    ("weightedpool", 4, 2, NSAConfig(block_size=32, kernel_size=16, kernel_stride=8, topk=4, window_size=40), [150, 260, 96]),
    ("avgpool", 7, 1, NSAConfig(block_size=32, kernel_size=32, kernel_stride=16, topk=3, local_blocks=1, window_size=20,
                                compress_type="avgpool", compress_rope=False), [20, 300, 45]),  # a sample < kernel
    ("linear", 2, 2, NSAConfig(block_size=64, kernel_size=16, kernel_stride=16, topk=16, init_blocks=2, local_blocks=1,
                               window_size=70, compress_type="linear"), [200, 130]),  # topk > blocks
])
def test_library_matches_ours_on_causal_packs(library, compress_type, hq, hkv, cfg, lens):
    """The Triton path (compressors, compressed + top-k attention, flash window, our RoPE and gates)
    equals the pure-PyTorch path: outputs and every gradient within 1e-2 (relative to the largest
    value), selected blocks >= 95% the same. On CUDA the pack is 16x longer and the heads are 128 wide."""
    device, dt = library
    scale, d = (16, 128) if device == "cuda" else (1, 32)
    lens = [n * scale for n in lens]
    torch.manual_seed(0)
    params = nsa.NSA(cfg, 64, hq, hkv, d)
    with torch.no_grad():  # random compressors and gates: no ties in the block scores
        for t in params.parameters():
            t.add_(0.3 * torch.randn_like(t))
    params = params.to(device, dt)
    q, k0, v = (torch.randn(sum(lens), h, d, dtype=dt, device=device).requires_grad_() for h in (hq, hkv, hkv))
    gates = torch.rand(sum(lens), hq, 3, dtype=dt, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    cos, sin = rope_cos_sin(pos, d, THETA, dt)
    lay = nsa.plan(lens, lens, ["causal"] * len(lens), device)
    res = []
    for use_library in (True, False):
        k = k0 * cos + rotate_half(k0) * sin
        out, idx = nsa.attention(lay, q, k, v, NSAInputs(params, gates, k0, cos, sin), return_idx=True, library=use_library)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        named = {"out": out, "q": q.grad, "k": k0.grad, "v": v.grad} | {n: t.grad for n, t in params.named_parameters()}
        res.append(({n: t for n, t in named.items() if t is not None}, idx.long()))
        params.zero_grad(set_to_none=True)
        q.grad = k0.grad = v.grad = None
    (lib, lib_idx), (ours, our_idx) = res
    want = {"out", "q", "k", "v", "intra_block_pe"} | ({"compress_key", "compress_value"} if compress_type != "avgpool" else set())
    assert lib.keys() == ours.keys() == want
    for n in want:
        err, top = (lib[n].float() - ours[n].float()).abs().max().item(), ours[n].float().abs().max().item()
        print(f"  {n}: max |library - ours| {err:.2e} (largest value {top:.2f})")
        assert err <= 1e-2 * top + 1e-3, n  # (+1e-3: with avgpool and no RoPE the pe gradient is 0 in exact math)
    assert lib_idx.shape == our_idx.shape
    real = our_idx >= 0
    same = (lib_idx[..., :, None] == our_idx[..., None, :]).any(-1) & real
    overlap = same.sum().item() / real.sum().item()
    print(f"library vs ours ({device}, {dt}, {sum(lens)} tokens): top-k overlap {overlap:.4f}")
    assert overlap >= 0.95
