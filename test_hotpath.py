"""The GPU hot path: attention structures built by the data workers, exact against a
dense mask written from the rule; no op that waits for the device in a training micro-step."""
import json
import random
from collections import Counter

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import nsa
import packing
from model import Bagel
from test_smoke import TINY

aten = torch.ops.aten


def dense_mask(sample_lens, split_lens, attn_modes):
    """The BAGEL mask token by token, written from the rule (not packing.allowed): same sample, and the
    key is not later than the query or in the query's own full/noise split, and the key is not in a
    noise split unless it is the query's own split."""
    sample = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens))
    split = torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens))
    mode = [m for n, m in zip(split_lens, attn_modes) for _ in range(n)]
    causal = torch.tensor([m == "causal" for m in mode])
    noise = torch.tensor([m == "noise" for m in mode])
    q, k = torch.arange(len(sample))[:, None], torch.arange(len(sample))[None, :]
    own = split[q] == split[k]
    return (sample[q] == sample[k]) & ((k <= q) | (own & ~causal[q])) & (~noise[k] | own)


def random_layout(rng: random.Random):
    sample_lens, split_lens, modes = [], [], []
    for _ in range(rng.randint(1, 4)):
        n = 0
        for _ in range(rng.randint(1, 4)):
            split_lens.append(rng.randint(1, 30))
            modes.append(rng.choice(["causal", "full", "noise"]))
            n += split_lens[-1]
        sample_lens.append(n)
    return sample_lens, split_lens, modes


def table(num, idx, nb):
    out = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        out[i, idx[i, :num[i]].long()] = True
    return out


def test_block_tables_equal_the_dense_mask():
    """Partial and full tiles of the numpy tables = any / all of the dense mask over each tile, on
    random packs (all three modes, several samples, pad) and block sizes that cut splits anywhere."""
    rng = random.Random(0)
    for _ in range(40):
        lens, split_lens, modes = random_layout(rng)
        block = rng.choice([4, 8, 16])
        lay = packing.attention_layout(lens, split_lens, modes, block=block)
        pad = -sum(lens) % block
        mask = torch.block_diag(dense_mask(lens, split_lens, modes), torch.tril(torch.ones(pad, pad, dtype=torch.bool)))
        nb = mask.shape[0] // block
        tiles = mask.view(nb, block, nb, block)
        full, any_ = tiles.all(3).all(1), tiles.any(3).any(1)
        assert torch.equal(table(lay["full_kv_num_blocks"], lay["full_kv_indices"], nb), full), (lens, split_lens, modes, block)
        assert torch.equal(table(lay["kv_num_blocks"], lay["kv_indices"], nb), any_ & ~full), (lens, split_lens, modes, block)
        # the q-side tables flex's backward reads: as BlockMask.from_kv_blocks transposes them
        ref = BlockMask.from_kv_blocks(*(lay[k][None, None] for k in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                                                                       "full_kv_indices")), BLOCK_SIZE=block)
        for k in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(lay[k][None, None], getattr(ref, k)), k
        # NSA's chunk bounds: one past the last key a query sees
        n, nsa_lay = sum(lens), nsa.plan(lens, split_lens, modes, layout=lay)
        assert [nsa_lay.reach(t)[0] for t in range(n)] == (n - mask[:n, :n].flip(1).int().argmax(1)).tolist()
        # the per-token rows the mask_mod reads, and the sdpa plan: each split's keys are its dense row
        assert torch.equal(lay["split"][:sum(lens)], torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens)))
        for q0, q1, k0, k1, gathered, causal in lay["sdpa_jobs"]:
            keys = lay["sdpa_keys"][k0:k1] if gathered else torch.arange(k0, k1)
            want = mask[q0:q1].any(0).nonzero().squeeze(1)
            own = torch.ones(q1 - q0, q1 - q0, dtype=torch.bool)
            assert torch.equal(keys, want) and torch.equal(mask[q0:q1, q0:q1], own.tril() if causal else own)


def test_bad_layout_is_a_clear_error():
    from model import plan_attention
    with pytest.raises(ValueError, match="crosses a sample boundary"):
        packing.attention_layout([5, 5], [3, 7], ["causal", "causal"])
    with pytest.raises(ValueError, match="unknown attn_modes"):
        packing.attention_layout([5], [5], ["bidirectional"])
    # an empty pack, from collate (the data workers) or a hand-built batch without a layout
    for make in (lambda: packing.collate([]), lambda: plan_attention("flex", [], [], [], "cpu")):
        with pytest.raises(ValueError, match="a pack of zero tokens"):
            make()
    lay = packing.attention_layout([200], [200], ["causal"])
    with pytest.raises(ValueError, match="attention_layout covers 256 tokens, the pack has 300"):
        plan_attention("sdpa", [300], [300], ["causal"], "cpu", lay)


# -------------------------------------------------------------------------------------------------
# host syncs

class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device: reading a value (.item(), int(),
    bool(), .tolist() of a device tensor), outputs whose size depends on values (nonzero, boolean-mask
    indexing, masked_select, repeat_interleave without output_size), equal, and device -> host copies.
    Ops on tensors of `host` are not syncs (None: count every tensor, for a CPU stand-in run)."""

    VALUE_OPS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.masked_select,
                 aten.equal, aten.unique_consecutive, aten._unique2, aten.argwhere}

    def __init__(self, host: torch.device | None = None):
        super().__init__()
        self.host, self.ops = host, []

    def on_device(self, t):
        return isinstance(t, torch.Tensor) and (self.host is None or t.device != self.host)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and len(args) > 1:
            tensors += [i for i in args[1] if isinstance(i, torch.Tensor)]
        name = str(func.overloadpacket)
        if any(self.on_device(t) for t in tensors):
            if func.overloadpacket in self.VALUE_OPS:
                self.ops.append(name)
            elif func.overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None:
                self.ops.append(name)
            elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                self.ops.append(name + "[bool mask]")
        out = func(*args, **kwargs)
        if func.overloadpacket in (aten._to_copy, aten.copy_) and self.host is not None:  # device -> host
            src, dst = (args[0], out) if func.overloadpacket is aten._to_copy else (args[1], args[0])
            if src.device != self.host and dst.device == self.host:
                self.ops.append(name + " to host")
        return out


def micro_batch(device) -> dict:
    """A collated pack (as the DataLoader workers make it) of an understanding, a T2I and an edit
    sample, with latents in place of the VAE encode, moved to `device` as train.to_device does."""
    import train
    tok = packing.SpecialTokens(281, 282, 289, 290)
    g = torch.Generator().manual_seed(0)
    img = lambda s: torch.rand(3, s, s, generator=g) * 2 - 1
    text = lambda n, loss, cfg=0: {"type": "text", "ids": list(range(3, 3 + n)), "loss": loss, "enable_cfg": cfg}
    plans = [[{"type": "vit_image", "image": img(56), "loss": 0}, text(5, 0), text(7, 1)],
             [text(6, 0, 1), {"type": "vae_image", "image": img(64), "loss": 1}],
             [{"type": "vae_image", "image": img(32), "loss": 0, "enable_cfg": 1},
              {"type": "vit_image", "image": img(28), "loss": 0, "enable_cfg": 1}, text(4, 0, 1),
              {"type": "vae_image", "image": img(48), "loss": 1}]]
    geo = packing.Geometry(vit_side=TINY.vit_max_num_patch_per_side, max_latent=TINY.max_latent_size)
    batch = packing.collate([packing.layout_sample(p, tok, geo) for p in plans], generator=g, geo=geo)
    imgs = batch.pop("padded_images")
    batch["padded_latent"] = torch.randn(imgs.shape[0], 16, imgs.shape[2] // 8, imgs.shape[3] // 8, generator=g)
    batch["packed_noise"] = torch.randn(len(batch["packed_vae_token_indexes"]), 64, generator=g)
    return train.to_device(batch, device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_a_micro_step_has_no_host_sync(device, monkeypatch):
    """Forward + backward with sdpa (training), and the flex forward: no op that syncs. On CPU every
    tensor stands in for a device tensor, so any value read back at all is counted. The trainer's
    own syncs (the all-reduced global token counts, the logged values) are outside the micro-step."""
    import model as model_py

    def outside_counter(f):
        def run(*a, **k):
            with _disable_current_modes():
                return f(*a, **k)
        return run
    # built outside the counter: a CausalBias (a host-only tensor subclass) cannot be created while a
    # Python dispatch mode is active, and the flex kernel (one fused kernel on a GPU; here eager,
    # since torch.compile stands aside under a dispatch mode) is not our code
    monkeypatch.setattr(model_py, "causal_lower_right", outside_counter(model_py.causal_lower_right))
    monkeypatch.setattr(model_py, "_compiled_flex", lambda: outside_counter(flex_attention))
    torch.manual_seed(0)
    model = Bagel(TINY).to(device)
    batch = micro_batch(device)
    host = torch.device("cpu") if device != "cpu" else None
    with SyncCounter(host) as fwd_bwd:
        out = model(**batch)
        (out["ce"].mean() + out["mse"].mean()).backward()
    assert out["ce"].numel() == 7 + 1 and out["mse"].shape == (16 + 9, 64)  # the pack really has both losses
    model.attn = "flex"
    with torch.no_grad(), SyncCounter(host) as flex:
        model(**batch)
    print(f"sync ops: sdpa fwd+bwd {Counter(fwd_bwd.ops)}, flex fwd {Counter(flex.ops)}")
    assert fwd_bwd.ops == [] and flex.ops == []


@pytest.mark.parametrize("device", DEVICES)
def test_an_nsa_micro_step_has_no_host_sync(device):
    """The same micro-step with --attn nsa (the pure-PyTorch path, forward + backward through its
    checkpointed chunks): its layout comes from the batch, every size from host ints."""
    import dataclasses
    from nsa import NSAConfig
    cfg = dataclasses.replace(TINY, nsa=NSAConfig(block_size=4, kernel_size=4, kernel_stride=2, topk=3, window_size=5))
    torch.manual_seed(0)
    model = Bagel(cfg).to(device)
    batch = micro_batch(device)
    with SyncCounter(torch.device("cpu") if device != "cpu" else None) as fwd_bwd:
        out = model(**batch)
        (out["ce"].mean() + out["mse"].mean()).backward()
    print(f"sync ops: nsa fwd+bwd {Counter(fwd_bwd.ops)}")
    assert model.language_model.model.layers[0].self_attn.nsa.g_proj.weight.grad.any()  # NSA really ran
    assert fwd_bwd.ops == []
    if device != "cpu":  # on a GPU the counter sees every device -> host copy
        return
    # the counter cannot see .tolist() or .cpu() of a CPU tensor; on the meta device, which holds no
    # values, each of them raises: the same micro-step runs there with nothing read back
    model, batch = model.to("meta"), micro_batch("meta")
    out = model(**batch)
    (out["ce"].mean() + out["mse"].mean()).backward()


@pytest.mark.parametrize("device", DEVICES)
def test_a_logging_step_reads_back_one_vector_and_other_steps_nothing(device, tmp_path):
    """What the training loop adds up at every step (train.Meter.add: losses, tokens, FLOPs of the
    packs) reads nothing back from the device; a log step reads the all-reduced window once. On CPU
    every tensor stands in for a device tensor, except that a .tolist() of a CPU tensor (the window's
    one read) is not seen; a GPU counts it."""
    import dataclasses
    import types

    import torch.distributed as dist

    import fsdp
    import train
    d = fsdp.init_distributed(device)
    try:
        d = dataclasses.replace(d, device=torch.device(device, 0) if device == "cuda" else torch.device(device))
        meter = train.Meter(train.Args(output_dir=str(tmp_path), max_steps=4, log_every=2), d,
                            types.SimpleNamespace(stats=lambda: {"padding": 0.0, "skipped": {}}), [], 0)
        one = lambda x: torch.tensor(x, device=d.device)
        s = dict(ce=one(2.0), mse=one(0.5), n_ce=one(8.0), n_mse=one(25.0),
                 by_t=torch.ones(2 * train.T_BUCKETS, device=d.device))
        batch, host = micro_batch(d.device), torch.device("cpu") if device != "cpu" else None
        for step in (1, 2):
            with SyncCounter(host) as add:
                meter.waited(0.01)
                meter.add(s, [batch], TINY)
            with SyncCounter(host) as log:
                meter.log(step, 1e-3, 0.5, {})
            print(f"sync ops at step {step}: add {Counter(add.ops)}, log {Counter(log.ops)}")
            assert add.ops == [] and len(log.ops) == (step == 2 and device != "cpu")
        row = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
        assert [r["step"] for r in row] == [2] and row[0]["ce"] == pytest.approx(0.25)  # 2 steps of 2.0 over 2 x 8 tokens
    finally:
        dist.destroy_process_group()


def test_take_keeps_the_data_state_of_its_own_packs(tmp_path):
    """The training loop takes a step's packs one step ahead (train.take), so when it saves step s
    the loader has already given out the packs of s + 1. The state saved must be the one taken with
    the packs of s: a loader resumed from it yields exactly the prefetched packs of s + 1."""
    import data
    import train
    from test_data import same_batch, small_cfg, text_data
    cfg = small_cfg(data=(text_data(tmp_path, 30),), packing_length=128, epochs=None)
    loader, cpu = data.PackLoader(cfg), torch.device("cpu")
    it = iter(loader)
    packs, state, _, copied = train.take(it, 2, loader, cpu)
    ahead = train.take(it, 2, loader, cpu)[0]  # prefetched while the step of `packs` runs
    assert len(packs) == 2 and copied is None and state["consumed"] == 2 and loader.state_dict()["consumed"] == 4
    fresh = data.PackLoader(cfg)
    fresh.load_state_dict(state)
    it2 = iter(fresh)
    for want in ahead:
        same_batch(next(it2), want)
