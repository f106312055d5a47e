"""One attention rule: change `packing.allowed` (as a fork would) and every backend follows it.
sdpa, flex (block tables and the compiled forward), NSA and the KV-cached inference Context are
checked against a dense softmax whose mask is the rule itself, evaluated token by token."""
import math
import random

import pytest
import torch

import nsa
import packing
from model import packed_attention, plan_attention
from nsa import NSAConfig, NSAInputs
from packing import CAUSAL, FULL, NOISE
from sample import Context, generate_text
from test_smoke import TOKENS, hidden, patchify_image, tiny_bagel

BASE = packing.allowed
# who sees whom, changed in ways a researcher would try (each on top of the default rule)
RULES = {
    "default": lambda q, k, sample, split, mode: BASE(q, k, sample, split, mode),
    # a noisy target is generated from the images alone: it may not see any text
    "noise_blind_to_text": lambda q, k, sample, split, mode:
        BASE(q, k, sample, split, mode) & ~((mode[q] == NOISE) & (mode[k] == CAUSAL)),
    # text may look ahead at the clean images of its sample (a later image included)
    "text_sees_later_images": lambda q, k, sample, split, mode:
        BASE(q, k, sample, split, mode) | ((sample[q] == sample[k]) & (mode[q] == CAUSAL) & (mode[k] == FULL)),
    # images attend in raster order inside themselves, not bidirectionally
    "causal_images": lambda q, k, sample, split, mode: BASE(q, k, sample, split, mode) & (q >= k),
}
# text sees the images of its sample and its own item, not earlier text (only for the decoding test)
TEXT_BLIND_TO_EARLIER_TEXT = lambda q, k, sample, split, mode: \
    BASE(q, k, sample, split, mode) & ~((mode[q] == CAUSAL) & (mode[k] == CAUSAL) & (split[q] != split[k]))
# an edit sample (prompt, clean VAE source, ViT source, instruction, noisy target, clean copy, text),
# a T2I sample (caption, noisy target) and an understanding sample (ViT image, question, answer)
PACK = ([64, 29, 33], [7, 10, 9, 6, 12, 12, 8, 9, 20, 14, 11, 8],
        ["causal", "full", "full", "causal", "noise", "full", "causal", "causal", "noise", "full", "causal", "causal"])


def dense_reference(q, k, v, sample_lens, split_lens, attn_modes):
    """Softmax over the keys `packing.allowed` (whatever it is now) lets each query see."""
    lay = packing.token_layout(sample_lens, split_lens, attn_modes)
    i = torch.arange(len(lay[0]))
    mask = packing.allowed(i[:, None], i[None, :], *lay)
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(g, 1)) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v.repeat_interleave(g, 1)), mask


def qkv(n, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, h, d, generator=g, dtype=dtype) for h in (4, 2, 2)]


@pytest.mark.parametrize("rule", list(RULES))
def test_every_backend_follows_the_rule(rule, monkeypatch):
    monkeypatch.setattr(packing, "allowed", RULES[rule])
    sl, spl, modes = PACK
    n = sum(sl)
    q, k, v = qkv(n)
    want, mask = dense_reference(q, k, v, sl, spl, modes)
    if rule != "default":  # the rule really changes the mask
        with monkeypatch.context() as m:
            m.setattr(packing, "allowed", BASE)
            assert not torch.equal(dense_reference(q, k, v, sl, spl, modes)[1], mask)
    errs = {}
    # flex at block 16 has full tiles (the tables alone decide) and partial ones (mask_mod decides), so a
    # bigger block adds nothing but a compile; forward only (no backward on CPU)
    for kind, block in (("sdpa", 128), ("flex", 16)):
        plan = plan_attention(kind, sl, spl, modes, "cpu", packing.attention_layout(sl, spl, modes, block=block))
        errs[f"{kind} block {block}"] = (packed_attention(plan, q, k, v) - want).abs().max().item()
    # NSA with top-k and window covering everything: its selected and window branches are dense attention;
    # 8-query chunks, so that each chunk's key bounds come from its own rows
    monkeypatch.setattr(nsa, "CHUNK_ELEMS", 1)
    c = NSAConfig(block_size=8, kernel_size=8, kernel_stride=4, topk=100, window_size=1000)
    q, k, v = qkv(n, dtype=torch.float64)
    want = dense_reference(q, k, v, sl, spl, modes)[0]
    params = nsa.NSA(c, 16, 4, 2, 8).double()
    cos, sin = torch.ones(n, 1, 8, dtype=torch.float64), torch.zeros(n, 1, 8, dtype=torch.float64)
    for branch in (1, 2):
        gates = torch.zeros(n, 4, 3, dtype=torch.float64)
        gates[..., branch] = 1
        out = nsa.attention(nsa.plan(sl, spl, modes), q, k, v, NSAInputs(params, gates, k, cos, sin))
        errs[f"nsa branch {branch}"] = (out - want).abs().max().item()
    print(rule, {key: f"{e:.2e}" for key, e in errs.items()})
    assert max(errs.values()) < 1e-5, errs
    # flex's block tables at a block size that cuts splits: partial and full tiles = any / all of the rule
    for block in (8, 16):
        lay = packing.attention_layout(sl, spl, modes, block=block)
        pad = -n % block
        padded = torch.block_diag(mask, torch.tril(torch.ones(pad, pad, dtype=torch.bool)))
        nb = padded.shape[0] // block
        tiles = padded.view(nb, block, nb, block)
        full, any_ = tiles.all(3).all(1), tiles.any(3).any(1)
        for name, ref in (("full_kv", full), ("kv", any_ & ~full), ("full_q", full.T), ("q", (any_ & ~full).T)):
            got = torch.zeros(nb, nb, dtype=torch.bool)
            for r in range(nb):
                got[r, lay[name + "_indices"][r, :lay[name + "_num_blocks"][r]].long()] = True
            assert torch.equal(got, ref), (rule, block, name)


@torch.no_grad()
def test_inference_context_follows_the_rule(monkeypatch):
    """A noisy image generated after [ViT image, text]: under "noise_blind_to_text" the text cannot
    change it, under the default rule it does; a rule that lets text see later images cannot be kept
    in a KV cache, and says so."""
    model = tiny_bagel()
    img = torch.rand(3, 28, 42, generator=torch.Generator().manual_seed(0)) * 2 - 1
    patches, ids = patchify_image(img), torch.tensor(packing.grid_ids(2, 3, 8))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))

    def noisy_hidden(text):
        ctx = Context(model, TOKENS)
        ctx.add_vit_image(patches, ids)
        ctx.add_text(text)
        return ctx.run(ctx._latent_block(x, 1.0, 2, 2), torch.full((6,), ctx.rope), [1, 2, 3, 4], "noise", update=False)

    assert not torch.allclose(noisy_hidden([70, 71]), noisy_hidden([72, 73]))
    monkeypatch.setattr(packing, "allowed", RULES["noise_blind_to_text"])
    torch.testing.assert_close(noisy_hidden([70, 71]), noisy_hidden([72, 73]), rtol=0, atol=1e-6)
    monkeypatch.setattr(packing, "allowed", RULES["text_sees_later_images"])
    ctx = Context(model, TOKENS)
    ctx.add_text([70, 71])
    with pytest.raises(ValueError, match="KV cache"):
        ctx.add_vit_image(patches, ids)


def random_pack(rng):
    sample_lens, split_lens, modes = [], [], []
    for _ in range(rng.randint(1, 4)):
        lens = [rng.randint(1, 30) for _ in range(rng.randint(1, 4))]
        sample_lens.append(sum(lens))
        split_lens += lens
        modes += [rng.choice(["causal", "full", "noise"]) for _ in lens]
    return sample_lens, split_lens, modes


@pytest.mark.parametrize("rule", list(RULES))
def test_layout_follows_the_rule_on_random_packs(rule, monkeypatch):
    """The structures of `attention_layout` equal the rule token by token on random packs (all modes,
    several samples, blocks that cut splits anywhere): flex tiles are full / partial where the rule
    allows every / some pair, each sdpa job's keys are what its queries may see, and NSA's key bound
    is one past the last key a query (or one before it in its sample: chunks need a bound that only
    grows) may see."""
    monkeypatch.setattr(packing, "allowed", RULES[rule])
    rng = random.Random(1)
    for _ in range(20):
        sl, spl, modes = random_pack(rng)
        n, block = sum(sl), rng.choice([4, 8, 16])
        lay = packing.attention_layout(sl, spl, modes, block=block)
        i = torch.arange(n)
        mask = packing.allowed(i[:, None], i[None, :], *packing.token_layout(sl, spl, modes))
        pad = -n % block
        tiles = torch.block_diag(mask, torch.ones(pad, pad, dtype=torch.bool).tril()).view((n + pad) // block, block, -1, block)
        full, some = tiles.all(3).all(1), tiles.any(3).any(1)
        for name, ref in (("full_kv", full), ("kv", some & ~full)):
            got = torch.zeros_like(ref)
            for row in range(len(ref)):
                got[row, lay[name + "_indices"][row, :lay[name + "_num_blocks"][row]].long()] = True
            assert torch.equal(got, ref), (rule, sl, spl, modes, block, name)
        for q0, q1, k0, k1, gathered, causal in lay["sdpa_jobs"]:
            keys = lay["sdpa_keys"][k0:k1] if gathered else torch.arange(k0, k1)
            lk = len(keys)
            sub = torch.ones(q1 - q0, lk, dtype=torch.bool).tril(lk - (q1 - q0)) if causal else torch.ones(q1 - q0, lk, dtype=torch.bool)
            want = torch.zeros(q1 - q0, n, dtype=torch.bool)
            want[:, keys] = sub
            assert torch.equal(want, mask[q0:q1]), (rule, sl, spl, modes, q0)
        reach = [nsa.plan(sl, spl, modes, layout=lay).reach(t)[0] for t in range(n)]
        last = (n - mask.flip(1).int().argmax(1)).split(sl)  # one past the last key each query sees
        assert reach == torch.cat([x.cummax(0).values for x in last]).tolist(), (rule, sl, spl, modes)


def test_rules_the_backends_cannot_express_are_clear_errors(monkeypatch):
    sl, spl, modes = PACK
    monkeypatch.setattr(packing, "allowed", lambda q, k, sample, split, mode: (sample[q] == sample[k]) & (q > k))
    with pytest.raises(ValueError, match=r"split 0 \(causal\) see itself neither wholly, causally"):
        packing.attention_layout(sl, spl, modes)
    monkeypatch.setattr(packing, "allowed", lambda q, k, sample, split, mode: q >= k)
    with pytest.raises(ValueError, match="lets a sample see another sample"):
        packing.attention_layout(sl, spl, modes)


@torch.no_grad()
@pytest.mark.parametrize("rule", ["default", "text_blind_to_earlier_text"])
def test_kv_cache_decoding_follows_the_rule(rule, monkeypatch):
    """Greedy decoding after [ViT image, question] equals the packed forward over the same sample
    under the rule; the answer is one split there, so the decoded tokens must extend one split in
    the cache too (else, under this rule, each would be blind to the ones before it)."""
    if rule != "default":
        monkeypatch.setattr(packing, "allowed", TEXT_BLIND_TO_EARLIER_TEXT)
    model = tiny_bagel()
    img = torch.rand(3, 56, 42, generator=torch.Generator().manual_seed(0)) * 2 - 1
    patches, ids = patchify_image(img), torch.tensor(packing.grid_ids(4, 3, 8))
    ctx = Context(model, TOKENS)
    ctx.add_vit_image(patches, ids)
    ctx.add_text([70, 71, 72, 73])
    answer = generate_text(ctx, max_new_tokens=6)
    n = 14 + 6 + 1 + len(answer)
    text = [TOKENS["vision_start"], TOKENS["vision_end"], TOKENS["bos"], 70, 71, 72, 73, TOKENS["eos"], TOKENS["bos"], *answer]
    batch = {"sequence_length": n, "sample_lens": [n], "split_lens": [14, 6, 1 + len(answer)],
             "attn_modes": ["full", "causal", "causal"], "packed_text_ids": torch.tensor(text),
             "packed_text_indexes": torch.tensor([0, 13] + list(range(14, n))),
             "packed_position_ids": torch.tensor([0] * 14 + list(range(1, n - 13))),
             "packed_vit_tokens": patches, "packed_vit_token_indexes": torch.arange(1, 13),
             "packed_vit_position_ids": ids, "vit_token_seqlens": torch.tensor([12])}
    greedy = model.language_model.lm_head(hidden(model, batch)[20:]).argmax(-1).tolist()
    assert len(answer) >= 3 and greedy[:len(answer)] == answer
