"""Sequence packing for BAGEL: first-fit packs and the packed batch (DESIGN.md#packing).

Who attends to whom (DESIGN.md#mask) is one function, `allowed`: to change who sees what, edit this
function. Everything else derives from it: `split_pairs` evaluates it per (query split, key split)
as none / all / causal, and `attention_layout` turns those pairs into the sdpa jobs, the flex block
tables and NSA's key bounds; the flex mask_mod, NSA's masks and `sample_masks` call it per token;
sample.Context (KV-cached inference) reads the same pairs (`split_table`). test_rule.py changes the
rule and checks every backend against a dense softmax under it.
"""
import random
from dataclasses import dataclass, field

import numpy as np
import torch

# split modes, as small ints so the mask predicate is pure tensor algebra (works inside flex's mask_mod)
CAUSAL, FULL, NOISE = 0, 1, 2
MODE_IDS = {"causal": CAUSAL, "full": FULL, "noise": NOISE}
# how a query split sees a key split (`split_pairs`): not at all, every token, or the keys k <= q
SEE_NONE, SEE_ALL, SEE_CAUSAL = 0, 1, 2


class UserError(Exception):
    """A mistake the user can fix (a flag, a path, a record): the CLIs print it as one `error:` line.
    Anything else is a bug and keeps its traceback. Lives here because every file imports packing."""


def check_splits(sample_lens: list[int], split_lens: list[int], attn_modes: list[str]):
    """The three lists of a pack's split table agree with each other."""
    if sum(sample_lens) != sum(split_lens):
        raise ValueError(f"sample_lens sum to {sum(sample_lens)} but split_lens to {sum(split_lens)}")
    if len(split_lens) != len(attn_modes):
        raise ValueError(f"{len(split_lens)} split_lens but {len(attn_modes)} attn_modes")
    bad = sorted(set(attn_modes) - set(MODE_IDS))
    if bad:
        raise ValueError(f"unknown attn_modes {bad}; expected one of {list(MODE_IDS)}")


def token_layout(sample_lens: list[int], split_lens: list[int], attn_modes: list[str],
                 device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (sample id, split id, split mode) for a pack; each [N] long. Split ids are global."""
    check_splits(sample_lens, split_lens, attn_modes)
    sample = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens))
    split = torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens))
    modes = torch.tensor([MODE_IDS[m] for m in attn_modes], dtype=torch.long)
    # a split must not straddle two samples: check that each split's first and last token agree
    ends = torch.tensor(split_lens).cumsum(0)
    if len(ends) and not torch.equal(sample[ends - torch.tensor(split_lens)], sample[ends - 1]):
        raise ValueError("a split crosses a sample boundary: split_lens must subdivide sample_lens")
    return sample.to(device), split.to(device), modes[split].to(device)


def allowed(q: torch.Tensor, k: torch.Tensor, sample: torch.Tensor, split: torch.Tensor,
            mode: torch.Tensor) -> torch.Tensor:
    """True where query position q may attend to key position k (DESIGN.md#mask), elementwise.
    The one place the rule is written: to change who sees what, edit this function.

      same sample, and
      (k not later than q, or same split whose mode is full/noise), and
      (k is not in a noise split, unless it is q's own split).

    q, k: broadcastable index tensors into the per-token layout of `token_layout`. A changed rule may
    look at the tokens' samples, splits and modes and at their order (q >= k), must keep samples
    apart, and must let a split see itself wholly, causally or not at all (what `split_pairs` reads).
    """
    same_split = split[q] == split[k]
    return ((sample[q] == sample[k])
            & ((q >= k) | (same_split & (mode[q] != CAUSAL)))
            & ((mode[k] != NOISE) | same_split))


def sample_masks(sample_lens: list[int], split_lens: list[int], attn_modes: list[str],
                 device=None) -> list[torch.Tensor]:
    """Dense boolean mask per sample ([L_i, L_i] each, True = may attend); never one over the pack."""
    sample, split, mode = token_layout(sample_lens, split_lens, attn_modes, device)
    masks, start = [], 0
    for n in sample_lens:
        idx = torch.arange(start, start + n, device=sample.device)
        masks.append(allowed(idx[:, None], idx[None, :], sample, split, mode))
        start += n
    return masks


# --------------------------------------------------------------------------------------------------
# One sample → tokens. A sample is a "sequence plan" as in upstream `pack_sequence` (DESIGN.md#layout): a list
# of items, each a dict
#   {"type": "text", "ids": [int], "loss": 0|1, "enable_cfg": 0|1,
#    "special_token_loss": 0|1, "special_token_label": int|None, "desc": str}
#   {"type": "vit_image" | "vae_image", "image": float [3, H, W] in [-1, 1], "loss", "enable_cfg", ...}
# data.py builds these from chat records; the golden tests build them from the golden JSON.

@dataclass
class SpecialTokens:
    """Ids of the four tokens BAGEL wraps things in; looked up by name in the tokenizer (data.py)."""
    bos: int  # <|im_start|>, opens every text item
    eos: int  # <|im_end|>, closes every text item
    vision_start: int  # <|vision_start|>, opens every image (ViT or VAE)
    vision_end: int  # <|vision_end|>, closes it


@dataclass
class Geometry:
    """Model-side constants the data must agree with (defaults: released BAGEL-7B-MoT)."""
    vit_patch: int = 14  # SigLIP patch size
    vit_side: int = 70  # vit_max_num_patch_per_side: ViT position id = r * vit_side + c
    latent_down: int = 16  # VAE /8 times the 2x2 latent patch: one latent token per 16x16 pixels
    max_latent: int = 64  # max_latent_size: latent position id = r * max_latent + c


@dataclass
class Layout:
    """One sample as tokens. Positions are local (0..n-1); `collate` shifts them into the pack."""
    n: int = 0
    text_ids: list = field(default_factory=list)  # vocabulary tokens (text, BOS/EOS, image markers)
    text_idx: list = field(default_factory=list)
    rope: list = field(default_factory=list)  # [n] RoPE ids, restart at 0 per sample
    split_lens: list = field(default_factory=list)
    attn_modes: list = field(default_factory=list)
    split_desc: list = field(default_factory=list)  # human text per split (for --inspect)
    vit_tokens: list = field(default_factory=list)  # per ViT image: float [n_patches, 3*p*p]
    vit_idx: list = field(default_factory=list)
    vit_pos: list = field(default_factory=list)
    vae_images: list = field(default_factory=list)  # per VAE image: float [3, H, W]
    vae_noisy: list = field(default_factory=list)  # per VAE image: True for a generation target
    vae_idx: list = field(default_factory=list)
    vae_pos: list = field(default_factory=list)
    mse_idx: list = field(default_factory=list)
    ce_idx: list = field(default_factory=list)
    labels: list = field(default_factory=list)


def patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """[3, H, W] → [H/p * W/p, p*p*3], patches row-major, features in (py, px, c) order (DESIGN.md#image-sizes),
    which is the order of the linear patch embedding in the checkpoint."""
    c, h, w = image.shape
    x = image.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0)
    return x.reshape((h // p) * (w // p), p * p * c)


def grid_ids(h: int, w: int, side: int) -> list[int]:
    """Flattened 2-D position ids r * side + c of an h x w grid ("extrapolate", interpolate_pos=False)."""
    return [r * side + c for r in range(h) for c in range(w)]


def vit_tokens(image: torch.Tensor, p: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ViT image for inference (sample.Context.add_vit_image): its patches and position ids."""
    return patchify(image, p), torch.tensor(grid_ids(image.shape[1] // p, image.shape[2] // p, side))


def layout_sample(items: list[dict], tok: SpecialTokens, geo: Geometry = Geometry(),
                  dropout: tuple[float, float, float] = (0.0, 0.0, 0.0),
                  rng: random.Random | None = None) -> Layout:
    """Lay out one sequence plan exactly as upstream `PackedDataset.pack_sequence` (DESIGN.md#layout, DESIGN.md#cfg-dropout).

    dropout = (text, vit, vae) CFG dropout probabilities, applied only to items with enable_cfg=1
    (the conditions of generation and editing, never VQA inputs: a dropped question trains an answer
    to nothing). A dropped text
    does not advance the RoPE id; a dropped image does (by 1), as upstream.
    """
    out, rope = Layout(), 0
    rng = rng or random.Random(0)

    def add_split(n, mode, desc):
        out.split_lens.append(n)
        out.attn_modes.append(mode)
        out.split_desc.append(desc)

    def add_text(ids, pos):
        out.text_ids += ids
        out.text_idx += [out.n + i for i in pos]

    def add_image(item, kind):
        # <|vision_start|> + image tokens + <|vision_end|>, all on one RoPE id (DESIGN.md#positions)
        c, h, w = item["image"].shape
        stride = geo.vit_patch if kind == "vit" else geo.latent_down
        gh, gw = h // stride, w // stride
        if h % stride or w % stride:
            raise ValueError(f"{item.get('desc', kind)}: image {h}x{w} is not a multiple of {stride}")
        k = gh * gw
        add_text([tok.vision_start, tok.vision_end], [0, k + 1])
        tokens = list(range(out.n + 1, out.n + 1 + k))
        if kind == "vit":
            side = geo.vit_side
            out.vit_tokens.append(patchify(item["image"], geo.vit_patch))
            out.vit_idx += tokens
            out.vit_pos += grid_ids(gh, gw, side)
        else:
            side = geo.max_latent
            out.vae_images.append(item["image"])
            out.vae_noisy.append(bool(item["loss"]))
            out.vae_idx += tokens
            out.vae_pos += grid_ids(gh, gw, side)
            if item["loss"]:
                out.mse_idx += tokens
        if gh > side or gw > side:
            raise ValueError(f"{item.get('desc', kind)}: {gh}x{gw} {kind} tokens exceed the "
                             f"{side}x{side} position table of the model")
        if item.get("special_token_loss"):  # upstream: <|vision_end|> predicts the given label
            out.ce_idx.append(out.n + k + 1)
            out.labels.append(item["special_token_label"])
        out.rope += [rope] * (k + 2)
        out.n += k + 2
        return k + 2

    p_text, p_vit, p_vae = dropout
    for item in items:
        t, cfg = item["type"], item.get("enable_cfg", 0)
        desc = item.get("desc", t)
        if t == "text":
            if cfg and rng.random() < p_text:
                continue  # dropped text: nothing, and the RoPE id does not move
            ids = list(item["ids"])
            n = len(ids) + 2
            add_text([tok.bos] + ids + [tok.eos], range(n))
            if item["loss"]:
                # next-token labels inside the item: BOS..last id predict ids..EOS (DESIGN.md#layout)
                out.ce_idx += list(range(out.n, out.n + n - 1))
                out.labels += ids + [tok.eos]
            if item.get("special_token_loss"):  # the item's own <|im_end|> predicts e.g. <|vision_start|>
                out.ce_idx.append(out.n + n - 1)
                out.labels.append(item["special_token_label"])
            out.rope += list(range(rope, rope + n))
            rope += n
            out.n += n
            add_split(n, "causal", desc)
        elif t == "vit_image":
            if cfg and rng.random() < p_vit:
                rope += 1  # a dropped image still takes its RoPE id
                continue
            add_split(add_image(item, "vit"), "full", desc)
            rope += 1
        elif t == "vae_image":
            if item["loss"]:
                # noisy target: its own "noise" split, which nobody else may see; the RoPE id is not
                # advanced, so a clean copy that follows (edit chains) sits on the same id
                add_split(add_image(item, "vae"), "noise", desc)
            else:
                if cfg and rng.random() < p_vae:
                    rope += 1
                    continue
                add_split(add_image(item, "vae"), "full", desc)
                rope += 1
        else:
            raise ValueError(f"unknown sequence-plan item type {t!r}")
    return out


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator for the random draws of one pack: a function of (seed, rank, step) only, so
    resumed runs draw the same and no code touches the global RNG (a fixed reseed would repeat the
    same draws on every rank and step)."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63)
    return g


def _long(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)  # empty lists give empty Long tensors, never float (indexing needs Long)


def collate(layouts: list[Layout], generator: torch.Generator | None = None,
            timesteps: torch.Tensor | None = None, geo: Geometry = Geometry()) -> dict:
    """Concatenate sample layouts into the packed batch of DESIGN.md#packing (upstream key names).

    One raw timestep per noisy VAE image (standard normal, DESIGN.md#flow) is drawn from `generator` in
    pack order, unless `timesteps` gives them. Clean VAE images get -inf (sigmoid → t = 0).
    """
    n_noisy = sum(sum(l.vae_noisy) for l in layouts)
    if timesteps is None:
        timesteps = torch.randn(n_noisy, generator=generator)
    if len(timesteps) != n_noisy:
        raise ValueError(f"{len(timesteps)} timesteps given for {n_noisy} noisy images")
    b = {k: [] for k in ("text_ids", "text_idx", "rope", "split_lens", "attn_modes", "vit_idx",
                         "vit_pos", "vae_idx", "vae_pos", "mse_idx", "ce_idx", "labels", "t", "vit_tokens",
                         "vit_lens", "vae_images", "vae_shapes")}
    off, ti = 0, 0
    for l in layouts:
        for k in ("text_idx", "vit_idx", "vae_idx", "mse_idx", "ce_idx"):
            b[k] += [i + off for i in getattr(l, k)]
        for k in ("text_ids", "rope", "split_lens", "attn_modes", "vit_pos", "vae_pos", "labels",
                  "vit_tokens", "vae_images"):
            b[k] += getattr(l, k)
        b["vit_lens"] += [len(v) for v in l.vit_tokens]
        for img, noisy in zip(l.vae_images, l.vae_noisy):
            h, w = img.shape[1] // geo.latent_down, img.shape[2] // geo.latent_down
            b["vae_shapes"].append((h, w))
            b["t"] += [float(timesteps[ti]) if noisy else float("-inf")] * (h * w)
            ti += noisy
        off += l.n
    # VAE inputs are encoded as one zero-padded batch (DESIGN.md#model); an empty pack still has a valid
    # spatial size so that the encoder runs on a [0, 3, s, s] batch without special cases
    imgs = b["vae_images"]
    hmax = max([i.shape[1] for i in imgs], default=geo.latent_down)
    wmax = max([i.shape[2] for i in imgs], default=geo.latent_down)
    padded = torch.zeros(len(imgs), 3, hmax, wmax)
    for i, img in enumerate(imgs):
        padded[i, :, :img.shape[1], :img.shape[2]] = img
    dim = 3 * geo.vit_patch ** 2
    return dict(
        sequence_length=off,
        sample_lens=[l.n for l in layouts],
        packed_text_ids=_long(b["text_ids"]),
        packed_text_indexes=_long(b["text_idx"]),
        packed_position_ids=_long(b["rope"]),
        split_lens=b["split_lens"],
        attn_modes=b["attn_modes"],
        packed_vit_tokens=torch.cat(b["vit_tokens"]) if b["vit_tokens"] else torch.zeros(0, dim),
        packed_vit_token_indexes=_long(b["vit_idx"]),
        packed_vit_position_ids=_long(b["vit_pos"]),
        vit_token_seqlens=_long(b["vit_lens"]),
        padded_images=padded,
        patchified_vae_latent_shapes=b["vae_shapes"],
        packed_latent_position_ids=_long(b["vae_pos"]),
        packed_vae_token_indexes=_long(b["vae_idx"]),
        packed_timesteps=torch.tensor(b["t"], dtype=torch.float32),
        mse_loss_indexes=_long(b["mse_idx"]),
        packed_label_ids=_long(b["labels"]),
        ce_loss_indexes=_long(b["ce_idx"]),
        attention_layout=attention_layout([l.n for l in layouts], b["split_lens"], b["attn_modes"], b["vit_lens"]),
    )


# --------------------------------------------------------------------------------------------------
# First-fit packing. Upstream packs next-fit with an overflow buffer and silently drops samples that
# do not fit (DESIGN.md#packing). We keep a few packs open and put each
# sample into the first one with room, which fills packs to ~98% on mixed lengths.

class FirstFitPacker:
    """Online first-fit over at most `max_open` open packs of `budget` tokens each.

    `add` returns the packs completed by adding one sample (0 or 1): a pack is emitted when it is at
    least `min_fill` full, or, when a new pack has to be opened and too many are open, the fullest.
    Items are opaque; `size(item)` gives their token count.
    """

    def __init__(self, budget: int, max_open: int = 8, min_fill: float = 0.99, size=lambda s: s.n):
        self.budget, self.max_open, self.min_fill, self.size = budget, max_open, min_fill, size
        self.open: list[list] = []  # the open packs, oldest first
        self.used: list[int] = []

    def add(self, item) -> list[list]:
        n = self.size(item)
        if n > self.budget:
            raise ValueError(f"sample of {n} tokens is longer than the packing budget {self.budget}")
        for i, used in enumerate(self.used):
            if used + n <= self.budget:
                self.open[i].append(item)
                self.used[i] += n
                return [self.pop(i)] if self.used[i] >= self.min_fill * self.budget else []
        self.open.append([item])
        self.used.append(n)
        if len(self.open) > self.max_open:
            return [self.pop(max(range(len(self.used)), key=self.used.__getitem__))]
        return []

    def flush(self) -> list[list]:
        """Emit every open pack (end of a finite stream)."""
        packs = list(self.open)
        self.open, self.used = [], []
        return packs

    def pop(self, i: int) -> list:
        self.used.pop(i)
        return self.open.pop(i)


FLEX_BLOCK = 128  # tokens per FlexAttention BlockMask tile (flex's default block size)


def _see(q, k, sample, mode) -> np.ndarray:
    """`allowed` on a stand-in pack of two tokens per split (split i: tokens 2i, 2i+1), as numpy."""
    split = torch.arange(len(sample)).repeat_interleave(2)
    twice = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64)).repeat_interleave(2)
    return allowed(torch.as_tensor(q), torch.as_tensor(k), twice(sample), split, twice(mode)).numpy()


def split_pairs(split_sample, split_mode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How each query split p sees each key split r of its sample: (p, r, how) over all such pairs,
    sorted by p then r, how in SEE_NONE / SEE_ALL / SEE_CAUSAL. Read off `allowed` on a stand-in
    pack of two tokens per split with the same sample and mode ids: exact for any rule that, like
    the default one, looks at the tokens' samples, splits and modes and at their order only.
    `split_sample`, `split_mode`: [S] ints, the splits of each sample contiguous."""
    split_sample, split_mode = np.asarray(split_sample, dtype=np.int64), np.asarray(split_mode, dtype=np.int64)
    # samples never see each other: check the rule on two samples holding a split of every mode
    probe = np.arange(12)
    cross = _see(probe[:, None], probe[None, :], [0, 0, 0, 1, 1, 1], [CAUSAL, FULL, NOISE] * 2)
    if cross[:6, 6:].any() or cross[6:, :6].any():
        raise ValueError("packing.allowed lets a sample see another sample of its pack: packing assumes they never do")
    first = np.flatnonzero(np.r_[True, split_sample[1:] != split_sample[:-1]])  # first split of each sample
    count = np.diff(np.r_[first, len(split_sample)])
    per = np.repeat(count, count)  # per query split: the splits of its sample
    p = np.repeat(np.arange(len(split_sample)), per)
    r = np.repeat(np.repeat(first, count), per) + np.arange(len(p)) - np.repeat(np.cumsum(per) - per, per)
    see = lambda q, k: _see(q, k, split_sample, split_mode)
    how = see(2 * p, 2 * r).astype(np.int8)  # SEE_ALL or SEE_NONE between two splits
    own, s = p == r, 2 * np.arange(len(split_sample))
    diag, below, above = how[own].astype(bool), see(s + 1, s), see(s, s + 1)  # a split and itself
    odd = ~((diag & below) | ~(diag | below | above))  # e.g. only k < q, or only k > q
    if odd.any():
        i = int(np.argmax(odd))
        raise ValueError(f"packing.allowed lets split {i} ({list(MODE_IDS)[split_mode[i]]}) see itself neither wholly, "
                         "causally (k <= q) nor not at all: the attention backends cannot express that")
    how[own] = np.where(above, SEE_ALL, np.where(diag, SEE_CAUSAL, SEE_NONE))
    return p, r, how


def split_table(split_sample, split_mode) -> np.ndarray:
    """`split_pairs` as a dense [S, S] int8 table (SEE_NONE across samples)."""
    p, r, how = split_pairs(split_sample, split_mode)
    table = np.zeros((len(split_sample),) * 2, dtype=np.int8)
    table[p, r] = how
    return table


def _causal_pairs(q0, q1, k0, k1):
    """Number of (q, k) with q in [q0, q1), k in [k0, k1), k <= q (elementwise over arrays)."""
    n = k1 - k0
    # sum over q of clip(q + 1 - k0, 0, n) = F(q1 - k0) - F(q0 - k0), F(x) = sum of clip(y, 0, n), y = 1..x
    f = lambda x: np.where(x <= n, np.maximum(x, 0) * (np.maximum(x, 0) + 1) // 2, n * (n + 1) // 2 + (x - n) * n)
    return f(q1 - k0) - f(q0 - k0)


def attention_layout(sample_lens: list[int], split_lens: list[int], attn_modes: list[str],
                     vit_seqlens: list[int] = (), block: int = FLEX_BLOCK) -> dict:
    """Everything the attention needs that depends only on the pack's layout, as host data: built on
    the CPU by `collate` (so in the DataLoader worker) and shipped with the batch, so the training
    process does no host work and no host-device sync for it. The model builds it itself
    for a batch without it (upstream batches, inference). Every part is derived from `split_pairs`,
    that is from `allowed`:

      sample, split, mode: int64 [Np], per token of the pack padded to a multiple of `block` (the
                  pad is one more causal sample): what the flex mask_mod reads
      kv_num_blocks / kv_indices, full_kv_num_blocks / full_kv_indices: int32 [nb] / [nb, nb], the
                  FlexAttention block tables (partial and full tiles of each query-block row), and
                  q_* / full_q_* the same per key-block column (what flex's backward reads)
      sdpa_jobs   one (q0, q1, k0, k1, gathered, causal) per split: its queries see keys [k0, k1) of
                  the pack, or sdpa_keys[k0:k1] when gathered; causal: they see their own split, the
                  last keys, causally
      sdpa_keys   int64 [K]: the gathered key positions
      vit_seqlens patches per ViT image (host ints: the ViT attention splits by them)
      start, end  int64 [Np]: per token, its split's first and one-past-last token (for nsa.py)
      reach       host (int, int) per split: one past the last token of the splits it sees whole (0 if
                  none), and how it sees itself (SEE_*); nsa.py's key bounds
      causal_only True when the rule is plain causal attention within each sample (nsa.py's kernels)
    """
    check_splits(sample_lens, split_lens, attn_modes)
    n = sum(sample_lens)
    if n == 0:  # the loader never makes one: every record has an assistant item of >= 2 tokens
        raise ValueError(f"a pack of zero tokens (sample_lens {list(sample_lens)}): nothing to attend over "
                         "(flex cannot run on it); build packs from at least one sample")
    pad = -n % block
    # the split table, pad included: start, end, mode and sample of every split
    lens = np.array(list(split_lens) + ([pad] if pad else []), dtype=np.int64)
    mode = np.array([MODE_IDS[m] for m in attn_modes] + [CAUSAL] * (pad > 0), dtype=np.int64)
    bounds = np.cumsum([0] + list(sample_lens) + ([pad] if pad else []))
    end = np.cumsum(lens)
    start = end - lens
    sample = np.searchsorted(bounds, start, side="right") - 1
    if (lens <= 0).any():
        raise ValueError(f"split_lens has an empty split at index {int(np.argmax(lens <= 0))}")
    if not np.array_equal(sample, np.searchsorted(bounds, end - 1, side="right") - 1):
        raise ValueError("a split crosses a sample boundary: split_lens must subdivide sample_lens")
    total, S = n + pad, len(split_lens)
    split_of = np.repeat(np.arange(len(lens)), lens)
    p, r, how = split_pairs(sample, mode)
    rows = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # each query split's first pair
    stop = np.r_[rows[1:], len(p)]
    seen = how != SEE_NONE
    if not np.logical_or.reduceat(seen, rows).all():
        i = int(np.argmin(np.logical_or.reduceat(seen, rows)))
        raise ValueError(f"packing.allowed lets split {i} see no token at all: its attention is undefined")

    # Block tables: each seen (query split, key split) pair covers a rectangle of (query, key) token
    # pairs (its lower triangle when causal), and the rectangles do not overlap, so a tile is full
    # when their areas inside it add up to block x block and partial when they add up to more than 0.
    # A query split's wholly seen key splits that follow each other make one rectangle.
    nb = total // block
    sp, sr, causal = p[seen], r[seen], how[seen] == SEE_CAUSAL
    joins = np.r_[False, (sp[1:] == sp[:-1]) & (sr[1:] == sr[:-1] + 1) & ~causal[1:] & ~causal[:-1]]
    head, tail = np.flatnonzero(~joins), np.r_[np.flatnonzero(~joins)[1:], len(sp)] - 1
    sp, a, b, causal = sp[head], start[sr[head]], end[sr[tail]], causal[head]  # keys [a, b)
    qb0, qb1 = start[sp] // block, (end[sp] - 1) // block + 1  # the query blocks of each rectangle
    kb0, kb1 = a // block, (b - 1) // block + 1
    tiles = (qb1 - qb0) * (kb1 - kb0)
    i = np.repeat(np.arange(len(sp)), tiles)  # one row per (rectangle, tile it touches)
    j = np.arange(len(i)) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    qb, kb = qb0[i] + j // (kb1 - kb0)[i], kb0[i] + j % (kb1 - kb0)[i]
    q0, q1 = np.maximum(start[sp][i], qb * block), np.minimum(end[sp][i], qb * block + block)
    k0, k1 = np.maximum(a[i], kb * block), np.minimum(b[i], kb * block + block)
    area = np.where(causal[i], _causal_pairs(q0, q1, k0, k1), (q1 - q0) * (k1 - k0))
    area = np.bincount(qb * nb + kb, weights=area, minlength=nb * nb).reshape(nb, nb)
    full, part = area == block * block, (area > 0) & (area < block * block)
    tables = {}  # each row's blocks, ascending; the q-side tables (for the backward) are the transposes
    for name, m in (("kv", part), ("full_kv", full), ("q", part.T), ("full_q", full.T)):
        tables[name + "_num_blocks"] = torch.from_numpy(m.sum(1).astype(np.int32))
        tables[name + "_indices"] = torch.from_numpy(np.argsort(~m, axis=1, kind="stable").astype(np.int32))

    # sdpa: one call per split over the keys of the splits it sees, its own split last when it sees
    # itself causally (the lower-right causal mask); keys that are one run of splits are a slice
    own = how[p == r][:S]
    big = np.iinfo(np.int64).max
    lo = np.minimum.reduceat(np.where(seen, r, big), rows)[:S]
    hi = np.maximum.reduceat(np.where(seen, r, -1), rows)[:S]
    one_run = np.add.reduceat(seen, rows)[:S] == hi - lo + 1
    jobs, keys, off = [], [], 0
    for q in range(S):
        c = bool(own[q] == SEE_CAUSAL)
        if one_run[q] and (not c or hi[q] == q):
            jobs.append((int(start[q]), int(end[q]), int(start[lo[q]]), int(end[hi[q]]), False, c))
            continue
        order = [x for x in r[rows[q]:stop[q]][seen[rows[q]:stop[q]]] if not (c and x == q)] + ([q] if c else [])
        keys.append(np.concatenate([np.arange(start[x], end[x]) for x in order]))
        jobs.append((int(start[q]), int(end[q]), off, off + len(keys[-1]), True, c))
        off += len(keys[-1])
    # NSA: the splits each query split sees whole end at `reach`
    reach = np.maximum.reduceat(np.where(how == SEE_ALL, end[r], 0), rows)[:S]
    plain = np.where(r < p, SEE_ALL, np.where(r == p, SEE_CAUSAL, SEE_NONE))
    # three separate int64 tensors: views into one [3, Np] tensor or int32 break the CPU flex codegen
    per_token = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                 (("sample", sample[split_of]), ("split", split_of), ("mode", mode[split_of]),
                  ("start", start[split_of]), ("end", end[split_of]))}
    return dict(**per_token, **tables, block=block, sdpa_jobs=jobs,
                sdpa_keys=torch.from_numpy(np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)),
                vit_seqlens=[int(s) for s in vit_seqlens], reach=[(int(x), int(o)) for x, o in zip(reach, own)],
                causal_only=bool(np.array_equal(how[p < S], plain[p < S])))


def flex_block_mask(layout: dict, device):
    """The FlexAttention BlockMask of an `attention_layout` on `device`: tables copied in, nothing
    computed (`BlockMask.from_kv_blocks` would transpose the kv tables on the device: 210 ms of
    host time at 32k tokens on CPU, a vmap and a dozen launches on a GPU)."""
    from torch.fx.experimental.sym_node import DynamicInt
    from torch.nn.attention.flex_attention import BlockMask
    to = lambda k: layout[k].to(device, non_blocking=True)
    sample, split, mode = to("sample"), to("split"), to("mode")
    tables = [to(k + s)[None, None] for k in ("kv", "full_kv", "q", "full_q") for s in ("_num_blocks", "_indices")]
    # every size dynamic from the first compile, flex in a compiled block or alone: one compile for all packs
    # of two blocks or more (a size of 1 specialises)
    for t in (sample, split, mode):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    for t in tables:
        for dim in range(2, t.ndim):
            torch._dynamo.maybe_mark_dynamic(t, dim)
    n = DynamicInt(len(sample))
    return BlockMask((n, n), *tables, BLOCK_SIZE=(layout["block"], layout["block"]),
                     mask_mod=lambda b, h, q, k: allowed(q, k, sample, split, mode))
