"""LoRA tests (CPU, the tiny checkpoint of test_train.py): `python -m pytest -q test_lora.py`.

References are written here from the formula y = x W^T + b + x A^T B^T alpha/r: the base model
alone (step 0), W + B A alpha/r folded by hand (the merged export), adapters by hand inside upstream's
freeze_und forward (test_train's), and a single-process run (FSDP)."""
import dataclasses
import functools
import json
import os
import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule

import bench
import convert_weights
import fsdp
import model as model_lib
import packing
import sample
import train
from model import POS_TABLES, AutoEncoder, Bagel, LLMConfig, add_lora, is_lora
from test_smoke import TINY, golden_batch
from test_nsa import SMALL
from test_train import (EMA, _all_modalities, ckpt, full_state, grads, one_thread, params_full, random_demo_vae,  # noqa: F401 (fixtures)
                        start_run, step_run, upstream_freeze_und_llm, world1)

RANK = 4


def lora_args(ckpt: str, **lora) -> train.Args:
    return train.Args(model=ckpt, activation_checkpointing=False, lora=train.LoRAConfig(rank=RANK, **lora),
                      optim=train.OptimConfig(lr=1e-2, warmup_steps=0, ema_decay=EMA))


def test_targets_follow_the_expert_names():
    """gen: the 7 *_moe_gen projections of every decoder layer; und: the other 7; all: 14; --lora.vit
    adds the ViT's 6 per layer and the connector's 2. Written out by name, not by the regexes."""
    layers, vit_layers = TINY.llm.num_hidden_layers, TINY.vit.num_hidden_layers
    attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    expert = lambda sfx: {f"language_model.model.layers.{i}.{n}" for i in range(layers) for n in
                          [f"self_attn.{p}{sfx}" for p in attn] + [f"mlp{sfx}.{p}" for p in mlp]}
    vit = {f"vit_model.vision_model.encoder.layers.{i}.{n}" for i in range(vit_layers) for n in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    vit |= {"connector.fc1", "connector.fc2"}
    for targets, want in (("gen", expert("_moe_gen")), ("und", expert("")), ("all", expert("") | expert("_moe_gen"))):
        for with_vit in (False, True):
            with torch.device("meta"):
                model = Bagel(TINY)
            assert set(add_lora(model, RANK, 2 * RANK, 0.0, targets, with_vit)) == want | (vit if with_vit else set())


def build_and_forward(args: train.Args, d) -> tuple[Bagel, tuple[torch.Tensor, torch.Tensor]]:
    """train.build_model(args) and its per-token CE and MSE on the all-modalities pack (no grad)."""
    model = train.build_model(args, d, fsdp.make_mesh(d, 0))
    b = _all_modalities()
    with torch.no_grad():
        b["padded_latent"] = AutoEncoder.from_pretrained(args.model).encode(b.pop("padded_images"),
                                                                            generator=torch.Generator().manual_seed(0))
        out = model(**b, generator=torch.Generator().manual_seed(1))
    for m in model.modules():  # a no-grad forward leaves the root unit gathered
        if isinstance(m, FSDPModule):
            m.reshard()
    return model, (out["ce"], out["mse"])


def test_step_0_equals_the_base_and_only_adapters_train(ckpt, world1):
    """bf16 compute: with B = 0 the LoRA model's losses equal the base model's bit for bit; every base
    weight is frozen in bf16 (no grad, no optimizer state, no EMA), the adapters are fp32 masters
    with state; A starts non-zero (Kaiming) and identical on a rebuild (every rank's init agrees)."""
    args = lora_args(ckpt, targets="all", vit=True)
    _, base = build_and_forward(dataclasses.replace(args, lora=train.LoRAConfig()), world1)
    model, lora = build_and_forward(args, world1)
    assert torch.equal(base[0], lora[0]) and torch.equal(base[1], lora[1])

    ae = AutoEncoder.from_pretrained(ckpt)
    opt, _ = train.make_optimizer(model, args.optim, 10)
    ema = fsdp.ema_init(model)
    first = params_full(model)
    train.train_step(model, ae, opt, [_all_modalities()], 0, args, world1)
    one = params_full(model)  # B = 0 gives A a zero gradient on the first step: only B moves
    assert all(torch.equal(one[k], v) == k.endswith(".lora_a") for k, v in first.items() if is_lora(k))
    train.train_step(model, ae, opt, [_all_modalities()], 1, args, world1)
    official = Bagel.from_pretrained(ckpt).state_dict()
    names = {fsdp.fqn(n) for n, _ in model.named_parameters()}
    assert {k for k in names if is_lora(k)} and names - {k for k in names if is_lora(k)} == set(official) - {
        "vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed"}
    after = params_full(model)
    for n, p in model.named_parameters():
        k, lora = fsdp.fqn(n), is_lora(fsdp.fqn(n))
        assert p.requires_grad == lora and p.dtype == (torch.float32 if lora else torch.bfloat16), k
        assert (p in opt.state) == lora and (k in ema) == lora, k
        if lora:
            assert not torch.equal(after[k], first[k]), f"{k} did not train"
            assert first[k].any() == k.endswith(".lora_a"), k  # A Kaiming, B zero
        else:
            assert torch.equal(after[k], official[k].to(torch.bfloat16)), k
    again = params_full(train.build_model(args, world1, fsdp.make_mesh(world1, 0)))
    assert all(torch.equal(again[k], v) for k, v in first.items())


class LoRAByHand(torch.nn.Module):
    """y = x W^T + b + x A^T B^T scale, straight from the formula (the reference for LoRALinear)."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, torch.nn.Parameter(a), torch.nn.Parameter(b), scale

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T * self.scale


def test_freeze_und_with_lora_gives_upstreams_gradients_to_the_gen_adapters(ckpt, world1):
    """--freeze und --lora.targets gen (fp32, one SGD step at lr 1: the update is the gradient)
    against upstream's freeze_und forward (test_train's reference, und activations detached) on the
    base with the adapters written by hand, B random so that A gets a gradient too: every gen adapter
    moves by the reference's gradient (1e-6), nothing else is trainable or moves."""
    optim = train.OptimConfig(name="sgd", lr=1.0, betas=(0.0, 0.95), warmup_steps=0, grad_clip=0)
    args = train.Args(model=ckpt, dtype="fp32", freeze=("und",), optim=optim, lora=train.LoRAConfig(rank=RANK))
    model = train.build_model(args, world1, fsdp.make_mesh(world1, 0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_b"):
                p.to_local().normal_(std=0.1, generator=g)  # one rank: its shard is the whole tensor
    before = params_full(model)
    opt, _ = train.make_optimizer(model, args.optim, 10)
    train.train_step(model, AutoEncoder.from_pretrained(ckpt), opt, [_all_modalities()], 0, args, world1)
    after = params_full(model)

    ref = Bagel.from_pretrained(ckpt)
    adapted = {k[:-len(".lora_a")] for k in before if k.endswith(".lora_a")}
    assert adapted and all("_moe_gen." in m + "." for m in adapted)
    for m in adapted:  # alpha defaults to 2 * rank: scale 2
        parent, _, child = m.rpartition(".")
        setattr(ref.get_submodule(parent), child, LoRAByHand(ref.get_submodule(m), before[m + ".lora_a"].clone(),
                                                             before[m + ".lora_b"].clone(), 2.0))
    ref.language_model.model.forward = functools.partial(upstream_freeze_und_llm, ref.language_model.model)
    want = grads(ref, ckpt, _all_modalities())
    for n, p in model.named_parameters():
        k = fsdp.fqn(n)
        assert p.requires_grad == is_lora(k), k
        if is_lora(k):
            ref_grad = want[k[:-len(".lora_a")] + "." + k[-1]]
            assert ref_grad.abs().max() > 0 and (before[k] - after[k] - ref_grad).abs().max() <= 1e-6, k
        else:
            assert torch.equal(before[k], after[k]), k


def test_nsa_with_lora_trains_adapters_and_nsa_and_resumes(ckpt, world1, tmp_path):
    """--attn nsa on a dense base with LoRA (bf16, AdamW, EMA): step 0 equals the same model without
    adapters bit for bit; the adapters and NSA's new weights (fp32) are all that train and all the
    checkpoint holds; a resume is bit-exact."""
    args = dataclasses.replace(lora_args(ckpt), attn="nsa", nsa=SMALL)
    _, base = build_and_forward(dataclasses.replace(args, lora=train.LoRAConfig()), world1)
    _, lora = build_and_forward(args, world1)
    assert torch.equal(base[0], lora[0]) and torch.equal(base[1], lora[1])

    mesh, ae, path = fsdp.make_mesh(world1, 0), AutoEncoder.from_pretrained(ckpt), str(tmp_path / "step-0000001")
    model, opt, ema = start_run(args, world1, mesh, True)
    first = params_full(model)
    step_run(model, ae, opt, ema, 0, args, world1)
    fsdp.save_checkpoint(path, model, opt, ema, {"step": 1}, {}, world1, dataclasses.asdict(args),
                         {"step": 1, "base": ckpt, "frozen_crc32": model.frozen_crc32})
    step_run(model, ae, opt, ema, 1, args, world1)
    after, want = params_full(model), full_state(model, ema)
    trained = {k for k in first if is_lora(k) or ".self_attn.nsa." in k}
    assert any(".self_attn.nsa." in k for k in trained)
    for n, p in model.named_parameters():
        k = fsdp.fqn(n)
        assert p.requires_grad == (k in trained) and (p in opt.state) == (k in trained), k
        assert p.dtype == (torch.float32 if k in trained else torch.bfloat16), k
        assert torch.equal(after[k], first[k]) == (k not in trained), k
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    assert {k[len("model."):] for k in saved if k.startswith("model.")} == trained | set(POS_TABLES)
    # with --freeze und too, NSA's und gate gets no gradient (und rows detached): frozen, as without LoRA
    frozen = {fsdp.fqn(n) for n, p in train.build_model(dataclasses.replace(args, freeze=("und",)), world1, mesh)
              .named_parameters() if not p.requires_grad}
    assert trained & frozen == {k for k in trained if k.endswith((".nsa.g_proj.weight", ".nsa.g_proj.bias"))} != set()

    model, opt, ema = start_run(args, world1, mesh, False)
    fsdp.load_checkpoint(path, model, opt, ema, world1, model.frozen_crc32)
    step_run(model, ae, opt, ema, 1, args, world1)
    for w, g in zip(want, full_state(model, ema)):
        assert w.keys() == g.keys() and all(torch.equal(v, g[k]) for k, v in w.items())


def merged_by_hand(base: dict, lora: dict, scale: float) -> dict:
    """W + B A scale for every adapted weight, in fp32: the reference for the merged export."""
    out = dict(base)
    for k in lora:
        if k.endswith(".lora_a"):
            m = k[:-len(".lora_a")]
            out[m + ".weight"] = base[m + ".weight"].float() + (lora[m + ".lora_b"] @ lora[k]) * scale
    return out


def test_checkpoint_resume_merged_export_and_adapter(ckpt, world1, tmp_path):
    """A LoRA run (bf16 compute, AdamW, EMA, dropout under activation checkpointing: the same update
    as without checkpointing) stores only the
    adapters (model, EMA) and resumes bit-exactly; the merged export equals W + B A alpha/r by hand
    with every other key bit-identical to the base, and gives the unmerged model's CE and MSE on the
    golden pack (1e-5, fp32); the --lora-only adapter gives the same through sample.py --adapter."""
    args = dataclasses.replace(lora_args(ckpt, targets="all", alpha=3.0, dropout=0.1), activation_checkpointing=True)
    mesh, ae, path = fsdp.make_mesh(world1, 0), AutoEncoder.from_pretrained(ckpt), str(tmp_path / "step-0000001")

    start = lambda load: start_run(args, world1, mesh, load)
    step = lambda model, opt, ema, s: step_run(model, ae, opt, ema, s, args, world1)

    # dropout draws from the global RNG (saved per rank in checkpoints); the activation-checkpoint
    # recompute must replay its masks: the same step without checkpointing gives the same adapters
    no_ac = dataclasses.replace(args, activation_checkpointing=False)
    torch.manual_seed(0)
    model = train.build_model(no_ac, world1, mesh)
    opt, _ = train.make_optimizer(model, args.optim, 10)
    train.train_step(model, ae, opt, [_all_modalities()], 0, no_ac, world1)
    ref = params_full(model)
    torch.manual_seed(0)
    model, opt, ema = start(True)
    step(model, opt, ema, 0)
    got = params_full(model)
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    fsdp.save_checkpoint(path, model, opt, ema, {"step": 1}, {}, world1, dataclasses.asdict(args),
                         {"step": 1, "base": ckpt, "frozen_crc32": model.frozen_crc32})
    step(model, opt, ema, 1)
    want = full_state(model, ema)
    model, opt, ema = start(False)
    fsdp.load_checkpoint(path, model, opt, ema, world1, model.frozen_crc32)
    step(model, opt, ema, 1)
    for w, g in zip(want, full_state(model, ema)):
        assert w.keys() == g.keys() and all(torch.equal(v, g[k]) for k, v in w.items())
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    lora_keys = {fsdp.fqn(n) for n, _ in model.named_parameters() if is_lora(n)}
    for part in ("model", "ema"):
        assert {k[len(part) + 1:] for k in saved if k.startswith(part + ".")} == lora_keys | set(POS_TABLES), part

    # merged export (fp32) against the formula; the saved EMA is what it exports
    exp = convert_weights.convert(convert_weights.Args(model=path, output_dir=str(tmp_path / "merged"), dtype="fp32"))
    adapter = convert_weights.convert(convert_weights.Args(model=path, output_dir=str(tmp_path / "adapter"), lora_only=True))
    lora = load_file(os.path.join(adapter, "adapter.safetensors"))
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert set(lora) == lora_keys and all(v.dtype == torch.float32 for v in lora.values())
    assert cfg["rank"] == RANK and cfg["alpha"] == 3.0 and cfg["targets"] == "all" and cfg["base_frozen_crc32"] == model.frozen_crc32
    assert cfg["visual_und"] is None and cfg["visual_gen"] is None  # the run's parts: the base's own
    base = Bagel.from_pretrained(ckpt).state_dict()
    ref = merged_by_hand(base, lora, 3.0 / RANK)
    merged = Bagel.from_pretrained(exp)
    got = merged.state_dict()
    assert set(got) == set(base)
    for k, v in ref.items():
        if "pos_embed" not in k:
            assert (torch.equal(got[k], v) if k in base and v is base[k] else (got[k] - v).abs().max() < 1e-6), k
    assert sum(not torch.equal(got[k], base[k]) for k in base) == len(lora) // 2

    # merged == unmerged on the golden pack: Bagel + LoRALinear carrying the adapter (fp32, eval)
    unmerged = Bagel.from_pretrained(ckpt)
    sample.load_adapter(unmerged, adapter, ckpt)
    outs = []
    for m in (merged, unmerged):
        with torch.no_grad():
            outs.append(m(**golden_batch("case6_pack"), generator=torch.Generator().manual_seed(0)))
    for key in ("ce", "mse"):  # per token (the tiny random model's MSE reaches ~40), and the loss itself
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-5)
        assert abs(outs[0][key].mean() - outs[1][key].mean()) <= 1e-5 * outs[1][key].mean(), key
    assert not torch.allclose(outs[0]["ce"], Bagel.from_pretrained(ckpt)(**golden_batch("case6_pack"),
                              generator=torch.Generator().manual_seed(0))["ce"].detach(), atol=1e-4)

    # sample.py: --model BASE --adapter DIR answers and draws as the merged export does
    common = ["--steps", "2", "--size", "32", "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "4"]
    outs = [sample.main(["--model", m, *extra, "--question", "What is this?", *common])
            for m, extra in ((exp, []), (ckpt, ["--adapter", adapter]))]
    assert outs[0]["text"] == outs[1]["text"]
    with pytest.raises(SystemExit, match="not a LoRA adapter folder"):
        sample.main(["--model", ckpt, "--adapter", str(tmp_path), "--question", "hi", *common])

    # the base is checked by its bytes, not its path: a moved copy passes, a changed weight stops
    moved, changed = tmp_path / "moved", tmp_path / "changed"
    shutil.copytree(ckpt, moved)
    sample.load_adapter(Bagel.from_pretrained(str(moved)), adapter, str(moved))
    shutil.copytree(ckpt, changed)
    weights = load_file(str(changed / "ema.safetensors"))
    weights["connector.fc1.weight"][3, 2] += 1e-2
    save_file(weights, str(changed / "ema.safetensors"))
    with pytest.raises(SystemExit, match=re.escape(f"--adapter {adapter} was trained on {ckpt}, whose weights have CRC-32 "
                                                   f"{model.frozen_crc32}, but the weights of --model {changed} have ")):
        sample.main(["--model", str(changed), "--adapter", adapter, "--question", "hi", *common])
    sample.load_adapter(Bagel.from_pretrained(str(changed)), adapter, str(changed), check_base=False)


def test_demo_lora_lowers_both_losses_and_resumes_only_with_its_options(tmp_path, capsys):
    """`python train.py --lora.rank 4` (16 steps, not 300): both losses fall clearly. Its checkpoint
    resumes only with the same rank, alpha, targets and --lora.vit: otherwise an error line naming
    both, before anything loads (not DCP's shape error)."""
    out = str(tmp_path / "demo")
    argv = ["--output-dir", out, "--max-steps", "16", "--log-every", "8", "--eval.every", "0", "--ckpt.every", "0",
            "--data.packing-length", "160"]
    train.main(["--lora.rank", "4", *argv])
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    # margins: measured 4.06 -> 3.19 and 1.42 -> 1.26; with the adapters not updating, the data alone
    # moved them by under 2% (4.14 -> 4.12, 1.45 -> 1.42)
    assert rows[-1]["ce"] < 0.9 * rows[0]["ce"] and rows[-1]["mse"] < 0.95 * rows[0]["mse"], rows

    step = os.path.join(out, "step-0000016")
    with pytest.raises(SystemExit):
        train.main(["--lora.rank", "8", *argv, "--max-steps", "17"])
    assert (f"error: {step}: saved by a run with --lora.rank 4 --lora.alpha 8 --lora.targets all, but this run has "
            f"--lora.rank 8 --lora.alpha 16 --lora.targets all: the checkpoint is fine") in capsys.readouterr().err
    args = train.parse_args(["--lora.rank", "4", "--lora.dropout", "0.1", *argv])
    args = dataclasses.replace(args, model=os.path.join(out, "base"))  # the demo's base, as the run resolved it
    fsdp.check_options(step, dataclasses.asdict(args))  # the same adapters (dropout may change)
    for lora, this_run in ((train.LoRAConfig(4, targets="gen"), "--lora.targets gen"),
                           (train.LoRAConfig(4, targets="all", vit=True), "--lora.targets all --lora.vit"),
                           (train.LoRAConfig(4, alpha=4.0, targets="all"), "--lora.alpha 4 "),
                           (train.LoRAConfig(0), "no LoRA")):
        with pytest.raises(packing.UserError, match=f"step-0000016: saved by a run with --lora.rank 4 .*this run has .*{this_run}"):
            fsdp.check_options(step, dataclasses.asdict(dataclasses.replace(args, lora=lora)))


def test_base_check_covers_the_weights_the_run_built(ckpt, world1):
    """A LoRA run with --visual-und False (or --visual-gen False) builds no ViT (no generation part),
    so its recorded base CRC covers fewer weights: sample.py's check must cover the same ones, from the
    parts recorded in adapter_config.json, or it refuses the right base. Reference: the training
    run's own CRC (fsdp.load_pretrained)."""
    full = Bagel.from_pretrained(ckpt)
    for und, gen in ((False, None), (None, False)):
        args = dataclasses.replace(lora_args(ckpt, targets="gen"), visual_und=und, visual_gen=gen)
        crc = train.build_model(args, world1, fsdp.make_mesh(world1, 0)).frozen_crc32
        assert sample.base_crc32(full, ckpt, {"visual_und": und, "visual_gen": gen}) == crc
        assert sample.base_crc32(full, ckpt) != crc  # all of the base's weights: the check's old false alarm


def test_memory_table_counts_adapters_by_the_formula(monkeypatch):
    """`bench.py --what memory`, the rank-16 gen row: r (in + out) per adapted linear, written out from
    BAGEL-7B-MoT's LLM config: per decoder layer q and o (h -> h), k and v (h -> kv), gate and up
    (h -> f), down (f -> h); 16 bytes each (fp32 master, gradient, AdamW's two moments)."""
    c, r = LLMConfig(), 16
    h, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    lora = c.num_hidden_layers * r * (2 * (h + h) + 2 * (h + kv) + 2 * (h + f) + (f + h))
    # the sin-cos tables are buffers, not parameters: 80% of the build time on the meta device, skipped
    monkeypatch.setattr(model_lib, "sincos_2d", lambda grid, dim: torch.zeros(grid * grid, dim))
    row = bench.bench_memory([("gen", False, r)])[2].split()
    assert row[:6] == ["gen", "16", str(7 * c.num_hidden_layers), f"{lora / 1e6:.2f}M", f"{16 * lora / 1e9:.2f}", "GB"], row


@pytest.mark.parametrize("flags, message", [
    (["--lora.rank", "-1"], "--lora.rank -1 .*need a rank >= 0"),
    (["--lora.rank", "4", "--lora.dropout", "1.0"], "dropout in \\[0, 1\\)"),
    (["--lora.rank", "4", "--lora.targets", "all", "--freeze", "und"],
     "--lora.targets all with --freeze und: 14 adapted linears .*layers.0.self_attn.q_proj.* would never train"),
    (["--lora.rank", "4", "--lora.vit", "--freeze", "und"], "--lora.vit with --freeze und: 14 adapted linears .*vit_model"),
    (["--lora.rank", "4", "--lora.targets", "und", "--lora.vit", "--freeze", "vit"], "--freeze vit: 12 adapted"),
])
def test_bad_lora_options_are_user_errors(flags, message, ckpt, world1):
    with pytest.raises(packing.UserError, match=message):
        train.check_args(train.parse_args(flags + ["--model", ckpt]), world1)
