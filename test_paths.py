"""Paths of train.py, data.py and the NSA model that no other test takes: --freeze vit|llm|connector,
training with visual_und / visual_gen off, the loss weights, --timestep-shift, data running out,
an explicit --ckpt.resume, CFG dropout between 0 and 1, NSA gates per expert and NSA training.
Each test names the bug it catches. Tiny model, 1-3 steps, one process (gloo world of 1)."""
import base64
import json
import os
import time

import pytest
import torch

import data
import fsdp
import train
from model import AutoEncoder, Bagel
from test_flow import shifted
from test_nsa import SMALL, TINY_NSA
from test_smoke import golden_batch, hidden, tiny_bagel
from test_train import (RECORDS, _all_modalities, ckpt, data_config, one_thread,  # noqa: F401 (fixtures)
                        random_demo_vae, read_dcp, world1)


def params(model) -> dict[str, torch.Tensor]:
    """Full copies of the parameters under their official names (sharded or not)."""
    return {fsdp.fqn(k): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


def one_step(args: train.Args, d) -> tuple[dict, dict, torch.nn.Module]:
    """Build as train.py does, one train_step on a pack with every modality: (before, after, model)."""
    model = train.build_model(args, d, fsdp.make_mesh(d, 0))
    opt, _ = train.make_optimizer(model, args.optim, 10)
    before = params(model)
    train.train_step(model, AutoEncoder.from_pretrained(args.model), opt, [_all_modalities()], 0, args, d)
    return before, params(model), model


def tiny_args(ckpt: str, **kw) -> train.Args:
    optim = kw.pop("optim", train.OptimConfig(lr=1e-3, warmup_steps=0))
    return train.Args(model=ckpt, dtype="fp32", activation_checkpointing=False, optim=optim, **kw)


# -------------------------------------------------------------------------------------------------
# train_step paths

@pytest.mark.parametrize("part,prefix", [("vit", "vit_model."), ("llm", "language_model."), ("connector", "connector.")])
def test_freeze_a_part_keeps_it_and_trains_the_rest(ckpt, world1, part, prefix):
    """Catches a --freeze pattern that misses part of its module or catches another module's
    parameters (planted: "vit" matching only the encoder layers; "llm" leaving lm_head trainable)."""
    before, after, model = one_step(tiny_args(ckpt, freeze=(part,)), world1)
    grad = {fsdp.fqn(k): p.requires_grad for k, p in model.named_parameters()}
    for k, v in before.items():
        frozen = k.startswith(prefix)
        assert grad[k] != frozen, k
        assert torch.equal(after[k], v) == frozen, f"{k}: {'moved although frozen' if frozen else 'did not train'}"


def test_loss_weights_scale_only_their_own_term(ckpt, world1):
    """SGD's first step is -lr * gradient: doubling ce_weight doubles lm_head's step (only the CE
    reaches it) and halving mse_weight halves llm2vae's (only the MSE reaches it). Catches the
    weights swapped, ignored, or both applied to one term."""
    sgd = train.OptimConfig(name="sgd", lr=0.5, warmup_steps=0, grad_clip=0.0)
    steps = []
    for ce_w, mse_w in ((1.0, 1.0), (2.0, 0.5)):
        before, after, _ = one_step(tiny_args(ckpt, optim=sgd, ce_weight=ce_w, mse_weight=mse_w), world1)
        steps.append({k: after[k] - before[k] for k in ("language_model.lm_head.weight", "llm2vae.weight")})
    for k, factor in (("language_model.lm_head.weight", 2.0), ("llm2vae.weight", 0.5)):
        ref = factor * steps[0][k]
        assert ref.abs().max() > 1e-4, k  # a step big enough to compare
        torch.testing.assert_close(steps[1][k], ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


@torch.no_grad()
def test_timestep_shift_flag_reaches_the_forward(ckpt, world1):
    """`--timestep-shift 3` on the command line: the built model's training timesteps are
    3t / (1 + 2t). Catches the flag parsed but not passed to the model config (shift stays 1)."""
    args = train.parse_args(["--model", ckpt, "--timestep-shift", "3", "--dtype", "fp32",
                             "--no-activation-checkpointing"])
    model = train.build_model(args, world1, fsdp.make_mesh(world1, 0))
    b = golden_batch("case3_t2i")
    raw = b["packed_timesteps"]
    torch.testing.assert_close(model(**b)["mse_t"].double(), shifted(raw, 3.0), rtol=1e-6, atol=1e-6)


def test_nsa_parameters_move_in_training(ckpt, world1):
    """--attn nsa on a dense checkpoint: one AdamW step through train.py's path (freshly created NSA
    parameters, FSDP, optimizer) changes every NSA tensor. Catches them left out of the optimizer,
    frozen, or cut off from the loss."""
    before, after, _ = one_step(tiny_args(ckpt, attn="nsa", nsa=SMALL), world1)
    keys = [k for k in before if ".self_attn.nsa." in k]
    assert len(keys) == 2 * 7  # 2 layers x (g_proj, g_proj_moe_gen: weight, bias; compress k, v; pe)
    for k in keys:
        assert not torch.equal(after[k], before[k]), k


@torch.no_grad()
def test_nsa_gates_are_per_expert():
    """Changing the generation expert's gate (g_proj_moe_gen) changes the VAE tokens' outputs and
    leaves every text/ViT token that cannot see a VAE token bit-identical. Catches the two gate
    projections swapped, or one of them used for both experts."""
    model = tiny_bagel(config=TINY_NSA)
    b = golden_batch("case6_pack")  # [0,52) understanding; [52,78) T2I: caption [52,70), target; then an edit
    h0 = hidden(model, b)
    for layer in model.language_model.model.layers:
        layer.self_attn.nsa.g_proj_moe_gen.bias += 1.0
    h1 = hidden(model, b)
    assert torch.equal(h1[:70], h0[:70])
    gen = b["packed_vae_token_indexes"]
    assert not torch.isclose(h1[gen], h0[gen]).all(-1).any()  # every VAE token's output moved


# -------------------------------------------------------------------------------------------------
# train.main paths: a tiny checkpoint and a jsonl of chat records

def write_jsonl(path, records: list[dict]) -> str:
    """Records with image bytes as data: URIs (json has no bytes)."""
    def enc(x):
        if isinstance(x, bytes):
            return "data:image/png;base64," + base64.b64encode(x).decode()
        if isinstance(x, dict):
            return {k: enc(v) for k, v in x.items()}
        return [enc(v) for v in x] if isinstance(x, list) else x
    with open(path, "w") as f:
        f.writelines(json.dumps(enc(r)) + "\n" for r in records)
    return str(path)


def run_main(ckpt: str, out, records: list[str], *extra: str) -> None:
    cfg = data_config()
    sizes = [f"--data.{k.replace('_', '-')}={getattr(cfg, k)}" for k in
             ("vit_min_size", "vit_max_size", "vae_min_size", "vae_max_size", "text_cond_dropout",
              "vit_cond_dropout", "vae_cond_dropout", "num_workers")]
    os.makedirs(out, exist_ok=True)
    path = write_jsonl(os.path.join(out, "data.jsonl"), [RECORDS[k] for k in records])
    train.main(["--model", ckpt, "--data", path, "--output-dir", str(out), "--dtype", "fp32",
                "--no-activation-checkpointing", "--optim.warmup-steps", "0", "--optim.lr", "1e-3",
                "--log-every", "1", "--eval.every", "0", "--data.packing-length", "160", *sizes, *extra])


def last_model(out) -> dict:
    steps = sorted(n for n in os.listdir(out) if n.startswith("step-"))
    return read_dcp(os.path.join(out, steps[-1]), os.path.join(out, "last.pt"))["model"]


@pytest.mark.parametrize("flag,records,absent,trained", [
    ("--visual-und", ["t2i", "edit", "text"], "vit_model.", "llm2vae.weight"),
    ("--visual-gen", ["vqa", "text"], "llm2vae.", "connector.fc1.weight")])
def test_training_with_a_visual_part_off(ckpt, tmp_path, capsys, flag, records, absent, trained):
    """train.py with --visual-und False (edits condition on the clean VAE latent only) or
    --visual-gen False on a checkpoint that has both parts: the data, model and checkpoint all
    drop the part, and the rest trains. Catches the flag reaching the model but not the data (a
    pack with tokens the model has no module for), a missing MSE term breaking train_step, and the
    dropped part's keys written to the checkpoint."""
    run_main(ckpt, tmp_path, records, flag, "False", "--max-steps", "1")
    assert "step 1/1" in capsys.readouterr().out
    sd, base = last_model(tmp_path), Bagel.from_pretrained(ckpt).state_dict()
    assert sd and not any(k.startswith(absent) for k in sd)
    assert not torch.equal(sd[trained], base[trained])
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert all((r["mse"] > 0) == (flag == "--visual-und") and r["ce"] > 0 for r in rows)


def test_data_running_out_saves_and_stops(ckpt, tmp_path, capsys):
    """--data.epochs 1 ends the data long before --max-steps: the run saves the step it reached
    (between two --ckpt.every saves) and stops; where that step was just saved, it is not written
    again over the complete checkpoint (a kill during that rewrite would corrupt the newest one).
    Catches a run that crashes or hangs at the end of the data, stops without saving, or rewrites."""
    records = ["vqa", "t2i", "edit", "text", "vqa", "t2i"]
    for every in (50, 1):
        out = tmp_path / str(every)
        run_main(ckpt, out, records, "--data.epochs", "1", "--max-steps", "50", "--ckpt.every", str(every))
        rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
        last = rows[-1]["step"]
        assert 2 <= last < 50 and [r["step"] for r in rows] == list(range(1, last + 1))
        log = capsys.readouterr().out
        assert f"step {last}: the data ran out" in log and log.count(f"saved {out}/step-{last:07d}") == 1
        assert json.load(open(out / f"step-{last:07d}" / "meta.json"))["step"] == last


def test_data_wait_is_counted_in_the_window_it_was_spent_in(ckpt, tmp_path, monkeypatch):
    """Packs are taken a step ahead, so the wait for step 2's packs happens during step 1: the log line's
    data share counts it there (a wait of 0.5 s while step 1 ran), never as more than the whole of a
    window. Catches the wait booked to the step that uses the packs (step 2: a share far above 1)."""
    padded = data.PackLoader.padded

    def slow_second(self):
        for i, pack in enumerate(padded(self)):
            if i == 1:
                time.sleep(0.5)
            yield pack
    monkeypatch.setattr(data.PackLoader, "padded", slow_second)
    run_main(ckpt, tmp_path, ["vqa", "t2i", "text"], "--max-steps", "3", "--ckpt.every", "0")
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert all(0 <= r["data_wait"] <= 1 for r in rows), [r["data_wait"] for r in rows]
    dt = [b - a for a, b in zip([0] + [r["time"] for r in rows], [r["time"] for r in rows])]
    assert rows[0]["data_wait"] * dt[0] >= 0.5, (rows[0], dt)


def test_explicit_resume_path_and_its_errors(ckpt, tmp_path, capsys):
    """--ckpt.resume PATH into another output dir continues from PATH exactly: step 2 resumed from
    run a's step 1 gives run a's step-2 weights. Catches an explicit path ignored (training restarts
    from the base model) or the wrong step resumed; a path that is not a complete checkpoint (or a
    save that died before meta.json) stops with a message naming it."""
    records = ["vqa", "t2i", "edit", "text"]
    run_main(ckpt, tmp_path / "a", records, "--max-steps", "2", "--ckpt.every", "1")
    src = str(tmp_path / "a" / "step-0000001")
    run_main(ckpt, tmp_path / "b", records, "--max-steps", "2", "--ckpt.resume", src)
    assert f"resumed from {src} at step 1" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")] == [2]
    got, want = last_model(tmp_path / "b"), last_model(tmp_path / "a")
    assert all(torch.equal(got[k], want[k]) for k in want)
    os.makedirs(tmp_path / "partial" / "step-0000001")  # a save that died before meta.json
    for bad in (str(tmp_path / "nowhere"), str(tmp_path / "partial" / "step-0000001")):
        with pytest.raises(SystemExit) as e:  # a user error: one line, exit code 2 (test_cli.py)
            run_main(ckpt, tmp_path / "c", records, "--ckpt.resume", bad)
        assert e.value.code == 2
        assert f"error: --ckpt.resume {bad}: not a complete checkpoint" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# CFG dropout

def test_cfg_dropout_between_0_and_1_through_the_dataset(tmp_path):
    """Text, ViT and clean-VAE conditions of edit samples are dropped at their own rates (0.2, 0.5,
    0.8 over 150 samples), independently, and VQA inputs never. Catches the three probabilities
    mixed up, dropout only at p = 1 (or at 1 - p), one draw shared by the three conditions, and
    understanding inputs dropped."""
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["edit"]] * 150 + [RECORDS["vqa"]] * 30)
    cfg = data_config(data=(path,), packing_length=4096, epochs=1, text_cond_dropout=0.2,
                      vit_cond_dropout=0.5, vae_cond_dropout=0.8)
    edits, vqa = [], []
    for b in data.PackLoader(cfg):  # the packed batches the trainer gets, read sample by sample
        modes = iter(zip(b["split_lens"], b["attn_modes"]))
        vit, clean = set(b["packed_vit_token_indexes"].tolist()), set(b["packed_vae_token_indexes"].tolist())
        clean -= set(b["mse_loss_indexes"].tolist())
        start = 0
        for n in b["sample_lens"]:
            mine, used = [], 0
            while used < n:
                ln, mode = next(modes)
                mine, used = mine + [mode], used + ln
            span = range(start, start + n)
            row = ["causal" in mine, any(i in vit for i in span), any(i in clean for i in span)]
            (edits if "noise" in mine else vqa).append(row if "noise" in mine else mine)
            start += n
    assert len(edits) == 150 and len(vqa) == 30
    kept = torch.tensor(edits)  # [sample, (text, ViT, clean VAE) kept]
    dropped = 1 - kept.float().mean(0)
    print(f"CFG dropout over 150 edits (text, ViT, clean VAE): {[round(x, 3) for x in dropped.tolist()]}")
    assert dropped.tolist() == pytest.approx([0.2, 0.5, 0.8], abs=0.12)  # ~3 standard deviations
    assert (~kept[:, 0] & kept[:, 2]).any() and (kept[:, 0] & ~kept[:, 2]).any()  # not one shared draw
    assert all(m == ["full", "causal", "causal"] for m in vqa)
