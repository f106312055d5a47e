"""train.py / fsdp.py tests on CPU with gloo: `python -m pytest -q test_train.py` (about a minute).

The distributed test spawns 2 processes and compares FSDP2 (and HSDP) training against an
independent single-process loop with SGD: Adam would hide a gradient scaled by the world size."""
import base64
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import random
import shlex
import shutil
import socket
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from PIL import Image

import data
import demo
import fsdp
import model as model_lib
import packing
import train
from model import AutoEncoder, Bagel
from test_smoke import tiny_ae, tiny_bagel, write_official

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_DIR = os.path.join(HERE, "testdata", "golden", "tokenizer")
STEPS, SAVE_AT, EMA = 3, 2, 0.75  # 3 optimizer steps; checkpoint after 2; EMA decay (far from 1: visible; != 1 - decay)
TOL = 1e-5


def _img(h: int, w: int, seed: int) -> dict:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return {"type": "image", "image": buf.getvalue()}


RECORDS = {
    "vqa": {"messages": [{"role": "user", "content": [_img(28, 42, 1), {"type": "text", "text": "What is this?"}]},
                         {"role": "assistant", "content": "A boat on the sea."}]},
    "text": {"messages": [{"role": "user", "content": "Say hello."},
                          {"role": "assistant", "content": "Hello there, friend."}]},
    "t2i": {"messages": [{"role": "user", "content": "two yellow birds"},
                         {"role": "assistant", "content": [_img(32, 48, 2)]}]},
    "edit": {"messages": [{"role": "user", "content": [_img(28, 56, 3), {"type": "text", "text": "make it red"}]},
                          {"role": "assistant", "content": [_img(32, 64, 4)]}]},
}
# PACKS[rank][micro] of steps 0 and 1: rank 0 never has a VAE image, rank 1 never has a CE token (the
# modality-hang case). Step 2: both ranks have both losses, with other token counts per rank
# and micro-step (per-rank or per-micro-step means would differ from the global mean).
PACKS = [[["vqa", "text"], ["vqa"]],
         [["t2i"], ["edit", "t2i"]]]
PACKS_LAST = [[["vqa", "t2i"], ["text"]],
              [["edit", "vqa", "text"], ["t2i"]]]


def data_config(**kw) -> data.DataConfig:
    base = dict(model=TOK_DIR, vit_min_size=14, vit_max_size=112, vae_min_size=16, vae_max_size=128,
                vit_max_num_patch_per_side=8, max_latent_size=8, text_cond_dropout=0.0,
                vit_cond_dropout=0.0, vae_cond_dropout=0.0, num_workers=0)
    return data.DataConfig(**{**base, **kw})


def make_batches(step: int) -> list[list[dict]]:
    """batches[rank][micro] of a step: packed batches as PackLoader yields them (padded_images)."""
    cfg = data_config()
    tok = data.load_tokenizer(TOK_DIR)
    sp = data.special_tokens(tok)
    lay = {k: packing.layout_sample(data.record_to_items(r, k, "", cfg, tok, random.Random(0)), sp, cfg.geometry())
           for k, r in RECORDS.items()}
    return [[packing.collate([lay[k] for k in pack], packing.step_generator(0, r, m), geo=cfg.geometry())
             for m, pack in enumerate(packs)] for r, packs in enumerate(PACKS_LAST if step == 2 else PACKS)]


def parity_args(ckpt: str, accum: int, **kw) -> train.Args:
    """SGD with momentum (linear in the gradient, and has state to reshard), clipping that bites,
    activation checkpointing, fp32 compute so that 1e-5 is meaningful."""
    optim = train.OptimConfig(name="sgd", lr=0.05, warmup_steps=0, grad_clip=1.0, grad_accum=accum, ema_decay=EMA)
    ev = train.EvalConfig(prompts=("two birds",), question="What is this?", size=32, steps=2)
    return train.Args(model=ckpt, dtype="fp32", activation_checkpointing=True, optim=optim, eval=ev,
                      data=data_config(), **kw)


def lora_parity_args(ckpt: str, accum: int) -> train.Args:
    """LoRA on every expert, the ViT and the connector (test_lora.py tests the adapters themselves)."""
    return dataclasses.replace(parity_args(ckpt, accum), lora=train.LoRAConfig(rank=4, targets="all", vit=True))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A tiny random BAGEL in the official layout, with the golden tiny tokenizer."""
    path = str(tmp_path_factory.mktemp("tiny"))
    write_official(path, tiny_bagel(), tiny_ae())
    for f in os.listdir(TOK_DIR):
        shutil.copy(os.path.join(TOK_DIR, f), path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: threads only wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def world1():
    """A one-process gloo group in this process (what `python train.py` runs with)."""
    d = fsdp.init_distributed("cpu")
    yield d
    dist.destroy_process_group()


def full_state(model, ema) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in sd.items()}, {k: v.full_tensor().clone() for k, v in ema.items()}


def params_full(model) -> dict:
    return {fsdp.fqn(k): v.full_tensor().clone() for k, v in model.named_parameters()}


def run_steps(args, d, mesh, batches_of, steps, resume: str | None = None, save: str | None = None,
              sample: bool = False):
    model = train.build_model(args, d, mesh, load=resume is None)
    ae = AutoEncoder.from_pretrained(args.model)
    opt, sched = train.make_optimizer(model, args.optim, STEPS)
    ema = fsdp.ema_init(model)
    if resume:
        trainer, _ = fsdp.load_checkpoint(resume, model, opt, ema, d)
        sched.load_state_dict(trainer["sched"])
    norms = []
    for step in steps:
        if save and step == SAVE_AT:
            fsdp.save_checkpoint(save, model, opt, ema, dict(step=step, sched=sched.state_dict()), {}, d,
                                 {"model": args.model}, {"step": step})
        norms.append(train.train_step(model, ae, opt, batches_of(step), step, args, d)["gnorm"])
        sched.step()
        fsdp.ema_update(ema, model, EMA)
    if sample:  # every rank runs the inference helpers on the sharded model
        train.evaluate(model, ae, data.load_tokenizer(TOK_DIR), args, STEPS, d)
    return (*full_state(model, ema), norms)


def _worker(rank: int, port: int, ckpt: str, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model_lib.CE_CHUNK = 4  # several checkpointed CE chunks inside the one lm_head FSDP unit (the reference: one)
    d = fsdp.init_distributed("cpu", timeout_min=2)
    try:
        batches = lambda step: make_batches(step)[rank]
        args = parity_args(ckpt, accum=2, output_dir=out)
        # HSDP's all-reduce between replicas runs once per step, after the last micro-step's backward
        results = {"fsdp": run_steps(args, d, fsdp.make_mesh(d, 0), batches, range(STEPS),
                                     save=os.path.join(out, "step-0000002"), sample=True),
                   "hsdp": run_steps(args, d, fsdp.make_mesh(d, 1), batches, range(STEPS)),  # 2 replicas x 1 shard
                   "lora": run_steps(lora_parity_args(ckpt, 2), d, fsdp.make_mesh(d, 0), batches, range(STEPS))}
        # rank 1's --output-dir lacks the checkpoint rank 0 finds: both stop with an error, no hang
        try:
            fsdp.resume_point(out if rank == 0 else os.path.join(out, "empty"), "auto", d)
            error = None
        except packing.UserError as e:
            error = str(e)
        results["val"] = validation(val_args(args, out), d)
        results["resume_errors"] = [None] * 2
        dist.all_gather_object(results["resume_errors"], error)
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
        dist.barrier()  # tear gloo down together: a rank closing its pairs while the other still works can abort
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's exit. Once FSDP2 has sharded a model, the gloo groups' threads outlive
    # destroy_process_group (DTensor's caches keep the mesh), so interpreter finalization tears them
    # down, which can abort a process (pytorch/pytorch#179291). Everything this worker makes is written
    # and closed by now; an error above skips this and reaches the parent with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_val_data(folder: str):
    """RECORDS twice as val.jsonl (images as data: URIs): 5 packs at packing length 64."""
    with open(os.path.join(folder, "val.jsonl"), "w") as f:
        for r in [*RECORDS.values()] * 2:
            f.write(json.dumps(r, default=lambda b: "data:image/png;base64," + base64.b64encode(b).decode()) + "\n")


def val_args(args: train.Args, folder: str) -> train.Args:
    """Validation on the first 3 packs of val.jsonl: on 2 ranks, rank 1 adds an uncounted filler."""
    return dataclasses.replace(args, data=dataclasses.replace(args.data, packing_length=64),
                               eval=dataclasses.replace(args.eval, data=(os.path.join(folder, "val.jsonl"),), packs=3))


def validation(args: train.Args, d) -> dict:
    """val_ce / val_mse / val_mse_by_t of the base weights, on the FSDP-sharded model as train.train runs it."""
    model = train.build_model(args, d, fsdp.make_mesh(d, 0))
    return train.validate(model, train.build_val_packs(args, AutoEncoder.from_pretrained(args.model), d), args, d)


def reference(ckpt: str, args: train.Args) -> tuple[dict, dict, list]:
    """Plain single-process training written from the spec (DESIGN.md#losses): CE and MSE are token means over
    the whole global batch. Same keyed noise; no FSDP, no train_step."""
    model, ae = Bagel.from_pretrained(ckpt), AutoEncoder.from_pretrained(ckpt)
    opt = torch.optim.SGD(model.parameters(), lr=args.optim.lr, momentum=args.optim.betas[0])
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    norms = []
    for step in range(STEPS):
        ce, mse = [], []
        for r, packs in enumerate(make_batches(step)):
            for m, b in enumerate(packs):
                pack = r * len(packs) + m
                b = dict(b)
                with torch.no_grad():
                    g = train.keyed_generator(args.seed, step, pack, train.POSTERIOR, "cpu")
                    b["padded_latent"] = ae.encode(b.pop("padded_images"), generator=g)
                out = model(**b, generator=train.keyed_generator(args.seed, step, pack, train.NOISE, "cpu"))
                ce.append(out["ce"])
                mse.append(out["mse"].mean(-1))
        (torch.cat(ce).mean() + torch.cat(mse).mean()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.optim.grad_clip)))
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for k, p in model.named_parameters():
                ema[k].mul_(EMA).add_(p, alpha=1 - EMA)
    return model.state_dict(), ema, norms


def assert_close(got: dict, want: dict, tol: float = TOL):
    for k, v in want.items():
        if "pos_embed" in k:
            continue
        err = (got[k].float() - v.float()).abs().max().item()
        assert err <= tol, f"{k}: max abs diff {err:.3g}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_to(path: str):
    """In a rank forked by the forkserver: print (stdout and stderr) into `path`, for the test to read.
    The forkserver is shared by every test, and its children print where it does, not where this test's
    capture listens."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def test_two_ranks_match_one_process_and_resume_on_one_rank(ckpt, tmp_path):
    """2-rank FSDP2 and HSDP == a plain 1-process loop after 3 SGD steps (grad accumulation, clipping,
    one rank without VAE images and the other without CE tokens: no hang, run under a timeout), with
    HSDP's all-reduce deferred to the last micro-step; the 2-rank checkpoint of step 2 resumed on ONE rank
    (accumulating all 4 packs) gives the same step 3; ranks that see different checkpoints stop;
    validation on 2 ranks gives 1 rank's val_ce / val_mse / val_mse_by_t."""
    for attempt in (1, 2):
        write_val_data(str(tmp_path))
        # forked from a fresh server that imported this file once (as test_shards' 4 ranks)
        multiprocessing.set_forkserver_preload(["test_train"])
        ctx = mp.start_processes(_worker, args=(free_port(), ckpt, str(tmp_path)), nprocs=2, join=False,
                                 start_method="forkserver")
        deadline = time.time() + 240
        try:
            while not ctx.join(timeout=5):
                if time.time() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail("2-rank FSDP training did not finish in 240 s: a collective hangs")
            break
        except mp.ProcessExitedException as e:
            # a rank died of SIGABRT ("terminate called without an active exception") inside gloo's
            # C++ threads, never with a Python error, about 1 run in 20 on a 2-core CI machine before
            # the workers met at a barrier and skipped the interpreter's exit; not seen since, but not
            # understood either, so one more try. An assertion error or a hang still fails at once.
            if e.signal_name != "SIGABRT" or attempt == 2:
                raise
            print(f"2-rank run aborted in gloo ({e}); trying once more")
            for name in os.listdir(tmp_path):
                shutil.rmtree(tmp_path / name, ignore_errors=True)
    want_model, want_ema, want_norms = reference(ckpt, parity_args(ckpt, 2))
    got = torch.load(tmp_path / "results.pt")
    assert min(want_norms) > 1.0  # clipping bites, so compare the norms too: they show a scaled gradient
    for mode in ("fsdp", "hsdp"):
        assert_close(got[mode][0], want_model)
        assert_close(got[mode][1], want_ema)
        assert got[mode][2] == pytest.approx(want_norms, rel=1e-5)
    for error in got["resume_errors"]:
        assert error and "step-0000002" in error and "rank 1 cannot read" in error, error
    assert not torch.equal(got["fsdp"][0]["llm2vae.weight"], torch.zeros_like(want_model["llm2vae.weight"]))
    saved = dcp.FileSystemReader(str(tmp_path / "step-0000002")).read_metadata().state_dict_metadata
    official = set(Bagel.from_pretrained(ckpt).state_dict())  # no FSDP / checkpoint-wrapper prefixes
    assert {k[6:] for k in saved if k.startswith("model.")} == official
    assert {k[4:] for k in saved if k.startswith("ema.")} == official
    samples = tmp_path / "samples" / "step-0000003"
    assert (samples / "prompt-0.png").exists() and "A: " in (samples / "samples.txt").read_text()

    d = fsdp.init_distributed("cpu")  # resume the 2-rank checkpoint on 1 rank
    try:
        model, ema, norms = run_steps(parity_args(ckpt, accum=4), d, fsdp.make_mesh(d, 0), lambda s: sum(make_batches(s), []),
                                      range(SAVE_AT, STEPS), resume=str(tmp_path / "step-0000002"))
        lora = run_steps(lora_parity_args(ckpt, 4), d, fsdp.make_mesh(d, 0), lambda s: sum(make_batches(s), []), range(STEPS))
        val = validation(val_args(parity_args(ckpt, 2), str(tmp_path)), d)
    finally:
        dist.destroy_process_group()
    assert_close(model, got["fsdp"][0], 1e-6)
    assert_close(ema, got["fsdp"][1], 1e-6)
    assert norms == pytest.approx(want_norms[SAVE_AT:], rel=1e-5)
    # LoRA: 2-rank FSDP == 1 rank accumulating all 4 packs, adapters and (untouched) base alike
    assert_close(got["lora"][0], lora[0], 1e-6)
    assert_close(got["lora"][1], lora[1], 1e-6)
    assert got["lora"][2] == pytest.approx(lora[2], rel=1e-6) and min(lora[2]) > 0
    assert sum(k.endswith(".lora_b") and bool(v.any()) for k, v in lora[0].items()) > 10  # the adapters trained
    # validation on 2 ranks == on 1 (rank 1 validates pack 1 and an uncounted filler). A pack's
    # per-token MSE is bit-identical (the same fp32 weights, gathered whole; keyed noise), so only
    # the float64 summation order differs; its CE is fp32 rounding apart, as the ranks compute it in
    # other chunks (CE_CHUNK = 4 there)
    flat = train.flat_scalars(val)
    assert flat["val_ce"] > 0 and flat["val_mse"] > 0 and len(flat) > 3  # and at least 2 quarters of t
    got_val = train.flat_scalars(got["val"])
    assert got_val.pop("val_ce") == pytest.approx(flat.pop("val_ce"), rel=1e-6)
    assert got_val == pytest.approx(flat, rel=1e-12, abs=0)


def test_bf16_compute_keeps_fp32_masters_that_move_at_lr_1e_6(ckpt, world1):
    """AdamW at lr 1e-6 over bf16 compute changes (nearly) every fp32 master weight (with bf16
    masters ~2% move); the VAE gets no gradient and does not change; the global RNG is
    never used."""
    optim = train.OptimConfig(lr=1e-6, warmup_steps=0)
    args = train.Args(model=ckpt, dtype="bf16", activation_checkpointing=False, optim=optim)
    model = train.build_model(args, world1, fsdp.make_mesh(world1, 0))
    ae = AutoEncoder.from_pretrained(ckpt)
    opt, _ = train.make_optimizer(model, args.optim, 10)
    before = params_full(model)
    ae_before = {k: v.clone() for k, v in ae.state_dict().items()}
    rng = torch.get_rng_state()
    train.train_step(model, ae, opt, [_all_modalities()], 0, args, world1)
    assert torch.equal(rng, torch.get_rng_state())
    moved, total = 0, 0
    for k, v in model.named_parameters():
        assert v.dtype == torch.float32, k
        if "embed" in k:  # rows of tokens / positions absent from the pack get no gradient
            continue
        diff = v.full_tensor() != before[k]
        moved, total = moved + int(diff.sum()), total + diff.numel()
    assert moved / total > 0.99, f"only {moved / total:.1%} of the master weights moved"
    assert all(p.grad is None and not p.requires_grad for p in ae.parameters())
    assert all(torch.equal(v, ae_before[k]) for k, v in ae.state_dict().items())


def _layout(kind: str):
    cfg, tok = data_config(), data.load_tokenizer(TOK_DIR)
    return packing.layout_sample(data.record_to_items(RECORDS[kind], kind, "", cfg, tok), data.special_tokens(tok), cfg.geometry())


def _all_modalities() -> dict:
    """One pack with text CE, ViT images, clean and noisy VAE latents."""
    return packing.collate([_layout(k) for k in ("vqa", "edit", "t2i")], packing.step_generator(0, 0, 0),
                           geo=data_config().geometry())


def upstream_freeze_und_llm(llm, x, pos, und, gen, attend, *_):
    """ByteDance-Seed/Bagel modeling/bagel/qwen2_navit.py, Qwen2Model / Qwen2MoTDecoderLayer /
    PackedAttentionMoT forward_train with freeze_und=True, written the way upstream writes it: zero
    buffers filled per expert, then the und rows overwritten by their detached selves, at the LLM
    input, after v_proj, after q_norm and k_norm, after the attention block (o_proj), after the MLP
    and after the final norm."""
    c, n = llm.config, x.shape[0]

    def per_expert(src, f_und, f_gen, detach_und=False):
        yu, yg = f_und(src[und]), f_gen(src[gen])
        out = yu.new_zeros((n,) + yu.shape[1:])
        out[und] = yu
        if detach_und:
            out[und] = out[und].detach()
        out[gen] = yg
        return out

    x = x.clone()
    x[und] = x[und].detach()
    cos, sin = model_lib.rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
    heads = lambda t, h: t.view(-1, h, c.head_dim)
    for i, layer in enumerate(llm.layers):
        a = layer.self_attn
        h = per_expert(x, layer.input_layernorm, layer.input_layernorm_moe_gen)
        q = per_expert(h, a.q_proj, a.q_proj_moe_gen)
        k = per_expert(h, a.k_proj, a.k_proj_moe_gen)
        v = heads(per_expert(h, a.v_proj, a.v_proj_moe_gen), c.num_key_value_heads)
        v[und] = v[und].detach()
        q = per_expert(heads(q, c.num_attention_heads), a.q_norm, a.q_norm_moe_gen, True)
        k = per_expert(heads(k, c.num_key_value_heads), a.k_norm, a.k_norm_moe_gen, True)
        q, k = q * cos + model_lib.rotate_half(q) * sin, k * cos + model_lib.rotate_half(k) * sin
        o = (model_lib.packed_attention(attend, q, k, v) if isinstance(attend, model_lib.AttnPlan)
             else attend(i, q, k, v)).reshape(n, -1)
        x = x + per_expert(o, a.o_proj, a.o_proj_moe_gen, True)
        x = x + per_expert(x, lambda t: layer.mlp(layer.post_attention_layernorm(t)),
                           lambda t: layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(t)), True)
    return per_expert(x, llm.norm, llm.norm_moe_gen, True)


def sgd_update(ckpt, world1, batch, freeze=(), detach_only=False) -> dict:
    """One train_step with plain SGD at lr 1 and no clipping: before - after is the gradient."""
    optim = train.OptimConfig(name="sgd", lr=1.0, betas=(0.0, 0.95), warmup_steps=0, grad_clip=0)
    args = train.Args(model=ckpt, dtype="fp32", activation_checkpointing=True, freeze=freeze, optim=optim)
    model = train.build_model(args, world1, fsdp.make_mesh(world1, 0))
    model.freeze_und = model.freeze_und or detach_only  # upstream: detached, but every parameter trainable
    opt, _ = train.make_optimizer(model, args.optim, 10)
    before = params_full(model)
    train.train_step(model, AutoEncoder.from_pretrained(ckpt), opt, [dict(batch)], 0, args, world1)
    after = params_full(model)
    return {k: before[k] - after[k] for k in before}, {fsdp.fqn(k) for k, p in model.named_parameters() if p.requires_grad}


def grads(model: Bagel, ckpt: str, batch: dict) -> dict:
    """Gradients (None where backward never reached) of train_step's loss, token means, in one process."""
    ae = AutoEncoder.from_pretrained(ckpt)
    b = dict(batch)
    with torch.no_grad():
        b["padded_latent"] = ae.encode(b.pop("padded_images"), generator=train.keyed_generator(0, 0, 0, train.POSTERIOR, "cpu"))
    out = model(**b, generator=train.keyed_generator(0, 0, 0, train.NOISE, "cpu"))
    (out["ce"].mean() + out["mse"].mean()).backward()
    return {k: p.grad for k, p in model.named_parameters()}


def test_freeze_und_gives_upstreams_gradients(ckpt, world1):
    """--freeze und == upstream's freeze_und on a mixed VQA + edit + T2I pack, every parameter, 1e-6:
    first with the detaches alone (every parameter trainable, as upstream), then with the flag,
    which also freezes exactly the parameters upstream gives no gradient. The backward never runs
    through an und activation: those parameters' gradients are None, not zeros."""
    batch = _all_modalities()
    ref = Bagel.from_pretrained(ckpt)
    ref.language_model.model.forward = functools.partial(upstream_freeze_und_llm, ref.language_model.model)
    want = {k: torch.zeros_like(v) if g is None else g for (k, g), v in zip(grads(ref, ckpt, batch).items(), ref.parameters())}
    no_grad = {k for k, g in want.items() if not g.any()}
    assert any(k.startswith("vit_model.") for k in no_grad) and "language_model.lm_head.weight" not in no_grad
    got, _ = sgd_update(ckpt, world1, batch, detach_only=True)
    for k, g in want.items():
        assert (got[k] - g).abs().max() <= 1e-6, k
    got, trainable = sgd_update(ckpt, world1, batch, freeze=("und",))
    assert trainable == set(want) - no_grad
    for k, g in want.items():
        assert (got[k] - g).abs().max() <= 1e-6, k
    plain = Bagel.from_pretrained(ckpt)
    plain.freeze_und = True
    assert {k for k, g in grads(plain, ckpt, batch).items() if g is not None} == trainable
    # upstream cuts more than the und parameters' gradient: in a T2I pack the <|vision_start|> and
    # <|vision_end|> markers are und tokens inside the image's full-attention split, so the gradient
    # that reaches the generation expert through them in an unfrozen run is cut too


def test_frozen_weights_are_bf16_without_grad_optimizer_state_or_ema(ckpt, world1):
    args = train.Args(model=ckpt, activation_checkpointing=False, freeze=("und",),
                      optim=train.OptimConfig(warmup_steps=0))
    model = train.build_model(args, world1, fsdp.make_mesh(world1, 0))
    ae = AutoEncoder.from_pretrained(ckpt)
    opt, _ = train.make_optimizer(model, args.optim, 10)
    ema = fsdp.ema_init(model)
    table = train.param_table(model, ae)
    assert "llm gen (moe_gen)" in table and "vae (always frozen)" in table
    train.train_step(model, ae, opt, [_all_modalities()], 0, args, world1)
    official = Bagel.from_pretrained(ckpt).state_dict()
    for k, p in model.named_parameters():
        k = fsdp.fqn(k)
        frozen = train.FREEZE["und"](k)
        assert p.requires_grad != frozen and p.dtype == (torch.bfloat16 if frozen else torch.float32), k
        assert (p in opt.state) != frozen and (k in ema) != frozen and p.grad is None, k
        if frozen:  # loaded from the base, rounded once to bf16
            assert torch.equal(p.full_tensor(), official[k].to(torch.bfloat16)), k


def start_run(args, d, mesh, load: bool):
    """Model, optimizer and EMA of a one-process run, as train.train builds them."""
    model = train.build_model(args, d, mesh, load=load)
    opt, _ = train.make_optimizer(model, args.optim, 10)
    return model, opt, fsdp.ema_init(model)


def step_run(model, ae, opt, ema, s: int, args, d):
    """Optimizer step `s` on the all-modalities pack, then the EMA update."""
    train.train_step(model, ae, opt, [_all_modalities()], s, args, d)
    fsdp.ema_update(ema, model, EMA)


def test_freeze_und_checkpoint_stores_only_trained_weights_resumes_and_exports(ckpt, world1, tmp_path):
    """A --freeze und checkpoint (bf16 compute, AdamW, EMA) lacks the frozen weights, resumes bit-exactly
    (they come from the base), refuses a base whose frozen weights changed, and exports the full key
    set with the frozen weights bit-exact from the base."""
    import convert_weights
    from safetensors.torch import load_file, save_file
    args = train.Args(model=ckpt, activation_checkpointing=False, freeze=("und",),
                      optim=train.OptimConfig(lr=1e-3, warmup_steps=0, ema_decay=EMA))
    mesh, ae, path = fsdp.make_mesh(world1, 0), AutoEncoder.from_pretrained(ckpt), str(tmp_path / "step-0000001")

    start = lambda args, load: start_run(args, world1, mesh, load)
    step = lambda model, opt, ema, s: step_run(model, ae, opt, ema, s, args, world1)

    model, opt, ema = start(args, True)
    step(model, opt, ema, 0)
    fsdp.save_checkpoint(path, model, opt, ema, {"step": 1}, {}, world1, {"model": ckpt},
                         {"step": 1, "base": ckpt, "frozen_crc32": model.frozen_crc32})
    step(model, opt, ema, 1)
    want = full_state(model, ema)
    model, opt, ema = start(args, False)
    fsdp.load_checkpoint(path, model, opt, ema, world1, model.frozen_crc32)
    step(model, opt, ema, 1)
    for w, g in zip(want, full_state(model, ema)):
        assert w.keys() == g.keys() and all(torch.equal(v, g[k]) for k, v in w.items())

    base = Bagel.from_pretrained(ckpt).state_dict()
    frozen = {k for k in base if train.FREEZE["und"](k)}
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for part in ("model", "ema"):
        keys = {k[len(part) + 1:] for k in saved if k.startswith(part + ".")}
        assert keys == set(base) - frozen, part
    exported = Bagel.from_pretrained(convert_weights.convert(convert_weights.Args(model=path, output_dir=str(tmp_path / "exp"), dtype="fp32")))
    assert set(exported.state_dict()) == set(base)
    assert all(torch.equal(exported.state_dict()[k], base[k]) for k in frozen)

    changed = tmp_path / "changed"
    shutil.copytree(ckpt, changed)
    weights = load_file(str(changed / "ema.safetensors"))
    weights["connector.fc1.weight"][0, 0] += 1
    save_file(weights, str(changed / "ema.safetensors"))
    model, opt, ema = start(dataclasses.replace(args, model=str(changed)), False)
    with pytest.raises(packing.UserError, match="step-0000001: saved by a run whose frozen weights had CRC-32"):
        fsdp.load_checkpoint(path, model, opt, ema, world1, model.frozen_crc32)


def test_non_finite_gradient_stops_before_the_optimizer_step(ckpt, world1):
    args = train.Args(model=ckpt, dtype="fp32", activation_checkpointing=False)
    model = train.build_model(args, world1, fsdp.make_mesh(world1, 0))
    ae = AutoEncoder.from_pretrained(ckpt)
    opt, _ = train.make_optimizer(model, args.optim, 10)
    before = params_full(model)
    batch = _all_modalities()
    batch["padded_images"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 7: gradient norm nan \(ce .*, mse nan\)"):
        train.train_step(model, ae, opt, [batch], 7, args, world1)
    assert all(torch.equal(v, before[k]) for k, v in params_full(model).items())


# -------------------------------------------------------------------------------------------------
# the demo, end to end: checkpoints, exact resume, samples, metrics

DEMO = ["--log-every", "1", "--data.packing-length", "160", "--optim.schedule", "constant",
        "--optim.warmup-steps", "2", "--optim.ema-decay", "0.9", "--ckpt.every", "2", "--ckpt.keep-last", "1",
        "--eval.every", "4", "--eval.steps", "2", "--eval.size", "32"]


@pytest.fixture(autouse=True)
def random_demo_vae(monkeypatch):
    monkeypatch.setattr(demo, "VAE_STEPS", 0)  # fitting the demo VAE takes seconds; not what these tests test


def read_dcp(path: str, out: str) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def test_demo_trains_resumes_bit_exactly_and_writes_the_checkpoint_contract(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(DEMO + ["--output-dir", a, "--max-steps", "4"])
    log = capsys.readouterr().out
    assert "step 4/4 | ce " in log and "saved" in log and "sample @ 4" in log
    train.main(DEMO + ["--output-dir", b, "--max-steps", "2"])
    train.main(DEMO + ["--output-dir", b, "--max-steps", "4"])  # --ckpt.resume auto
    assert "resumed from" in capsys.readouterr().out
    ca = read_dcp(os.path.join(a, "step-0000004"), str(tmp_path / "a.pt"))
    cb = read_dcp(os.path.join(b, "step-0000004"), str(tmp_path / "b.pt"))
    assert sorted(ca) == sorted(cb)
    for key in ("model", "ema", "optim"):
        flat_a, flat_b = _flatten(ca[key]), _flatten(cb[key])
        assert flat_a.keys() == flat_b.keys()
        for k, v in flat_a.items():
            same = torch.equal(v, flat_b[k]) if torch.is_tensor(v) else v == flat_b[k]
            assert same, f"{key}.{k} differs after resume"
    assert ca["trainer"] == cb["trainer"] and ca["rank0"] == cb["rank0"]

    # the contract with convert_weights.py
    assert sorted(os.listdir(a)) == ["args.json", "base", "demo_data", "loss.png", "metrics.jsonl", "samples",
                                     "step-0000004"]  # keep_last 1 pruned step-0000002
    step = os.path.join(a, "step-0000004")
    args_json = json.load(open(os.path.join(step, "args.json")))
    meta = json.load(open(os.path.join(step, "meta.json")))
    assert args_json["model"] == os.path.abspath(os.path.join(a, "base")) and meta["step"] == 4 and meta["git"]
    official = Bagel.from_pretrained(args_json["model"]).state_dict()
    assert set(ca["model"]) == set(official) and set(ca["ema"]) == set(official)
    for k, v in ca["model"].items():
        assert v.dtype == torch.float32 and v.shape == official[k].shape and ca["ema"][k].dtype == torch.float32, k
    assert not torch.equal(ca["ema"]["llm2vae.weight"], ca["model"]["llm2vae.weight"])
    rows = [json.loads(x) for x in open(os.path.join(a, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["ce"]) for r in rows)
    for r in rows:  # the per-quarter MSEs are a split of the MSE: their token-weighted mean is it
        n = r["mse_t_tokens"]
        assert len(n) == train.T_BUCKETS and sum(n) > 0 and 0 <= r["data_wait"] <= 1
        assert math.isclose(sum(v * k for v, k in zip(r["mse_by_t"], n) if k) / sum(n), r["mse"], rel_tol=1e-5)
    samples = os.path.join(a, "samples", "step-0000004")
    assert {"question.png", "prompt-0.png", "samples.txt"} <= set(os.listdir(samples))
    assert Image.open(os.path.join(samples, "prompt-0.png")).size == (32, 32)


def _flatten(x, prefix=""):
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: x}


# -------------------------------------------------------------------------------------------------
# small pieces

def test_mesh_shape_from_world_size():
    assert fsdp.mesh_shape(8, 0) == (1, 8) and fsdp.mesh_shape(16, 8) == (2, 8) and fsdp.mesh_shape(4, 1) == (4, 1)
    for world, shard in ((12, 8), (8, 16), (8, -3)):
        with pytest.raises(packing.UserError, match="does not divide the world size"):
            fsdp.mesh_shape(world, shard)


def test_noise_is_keyed_by_seed_step_and_pack_never_the_global_rng():
    state = torch.get_rng_state()
    draw = lambda *key: torch.randn(64, generator=train.keyed_generator(*key, "cpu"))
    base = draw(0, 5, 1, train.NOISE)
    assert torch.equal(base, draw(0, 5, 1, train.NOISE))
    for other in ((0, 6, 1, train.NOISE), (0, 5, 3, train.NOISE), (1, 5, 1, train.NOISE), (0, 5, 1, train.POSTERIOR)):
        assert not torch.allclose(base, draw(*other)), other
    # rank 1's first pack (pack = 1 * grad_accum + 0) differs from rank 0's, and from the data's timesteps
    assert not torch.allclose(draw(0, 5, 0, train.NOISE), draw(0, 5, 2, train.NOISE))
    assert not torch.allclose(base, torch.randn(64, generator=packing.step_generator(0, 0, 5)))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                       reason="no GPU"))])
def test_global_rngs_are_seeded_per_rank_and_restored_by_a_resume(device, world1, tmp_path):
    """The global RNGs (LoRA dropout draws from them, on the CPU or the GPU) are seeded per rank, and a
    checkpoint restores both: draws after a resume are the draws after the save. Catches every rank
    dropping the same units, and a resumed run that drops others than the uninterrupted one did."""
    d = dataclasses.replace(world1, device=torch.device(device))
    draws = lambda: (torch.rand(4).tolist(), torch.rand(4, device=d.device).tolist())
    firsts = []
    for rank in (0, 1, 0):
        train.seed_rng(7, dataclasses.replace(d, rank=rank))
        firsts.append(draws())
    assert firsts[0] == firsts[2] and firsts[0][0] != firsts[1][0] and firsts[0][1] != firsts[1][1]
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = str(tmp_path / "step-0000001")
    fsdp.save_checkpoint(path, model, opt, None, {"step": 1}, {}, d, {}, {"step": 1})
    want = draws()
    train.seed_rng(8, d)  # what a fresh process does before it resumes
    fsdp.load_checkpoint(path, model, opt, None, d)
    assert draws() == want


def test_ema_math_and_frozen_keys():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    ema = fsdp.ema_init(model)
    assert set(ema) == {"0.weight", "0.bias", "1.bias"}
    p0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fsdp.ema_update(ema, model, 0.9)
    for k, v in ema.items():
        torch.testing.assert_close(v, 0.9 * p0[k] + 0.1 * (p0[k] + 1), rtol=0, atol=1e-6)
    # the exported EMA has exactly the model's keys (an extra or a missing key would break the strict
    # load of a converted checkpoint); the frozen weight is the parameter itself, the trained ones the EMA
    sd = fsdp.ema_state_dict(ema, model.state_dict())
    assert set(sd) == set(model.state_dict())
    assert torch.equal(sd["1.weight"], model[1].weight)
    assert all(torch.equal(sd[k], ema[k]) and not torch.equal(sd[k], model.state_dict()[k]) for k in ema)


def test_lr_schedules():
    model = torch.nn.Linear(2, 2)
    o = train.OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr=0.1)
    opt, sched = train.make_optimizer(model, o, 14)
    lrs = []
    for _ in range(16):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    opt, sched = train.make_optimizer(model, train.OptimConfig(lr=1.0, warmup_steps=0), 14)
    assert sched.get_last_lr()[0] == 1.0


# the commands of the README's training section (also every train.py command found in README.md)
README_COMMANDS = [
    "python train.py",
    "python train.py --max-steps 600 --optim.lr 2e-3",
    "torchrun --nproc-per-node 8 train.py --model /data/BAGEL-7B-MoT --data train.parquet --output-dir out/ft",
    "torchrun --nproc-per-node 8 train.py --model /data/BAGEL-7B-MoT --data t2i.parquet edit.jsonl:2 "
    "--data.packing-length 10240 --optim.lr 2e-5 --optim.grad-accum 2 --optim.ema-decay 0.9999 "
    "--max-steps 5000 --ckpt.every 500 --ckpt.keep-last 2 --eval.every 500",
    "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 train.py "
    "--model /data/BAGEL-7B-MoT --data mix.yaml --shard-size 8",
    "torchrun --nproc-per-node 8 train.py --model /data/BAGEL-7B-MoT --data t2i.parquet --freeze und "
    "--visual-und False",
    "torchrun --nproc-per-node 8 train.py --model /data/BAGEL-7B-MoT --data vqa.jsonl --visual-gen False --freeze vit",
    "torchrun --nproc-per-node 8 train.py --model /data/BAGEL-7B-MoT --data train.parquet --ckpt.resume out/step-0001000",
    "python train.py --model /data/BAGEL-7B-MoT --data x.parquet --cpu-offload --no-activation-checkpointing --compile",
]


def readme_commands() -> list[str]:
    path = os.path.join(HERE, "README.md")
    text = open(path).read().replace("\\\n", " ") if os.path.exists(path) else ""
    return [line.strip() for line in text.splitlines() if line.strip().startswith(("python train.py", "torchrun"))]


@pytest.mark.parametrize("cmd", sorted(set(README_COMMANDS + readme_commands())))
def test_readme_commands_parse(cmd):
    argv = shlex.split(cmd.split("#")[0])
    args = train.parse_args(argv[argv.index("train.py") + 1:])
    assert isinstance(args, train.Args)
    if "--model" not in cmd:
        assert args.model == "" and args.optim.lr > 1e-4  # the demo's defaults
    else:
        assert args.model == argv[argv.index("--model") + 1] and args.data.data
    if "--freeze und" in cmd:
        assert args.freeze == ("und",) and args.visual_und is False


def test_the_demo_settings_live_in_demo_py_and_stay_out_of_real_runs(monkeypatch):
    real = train.parse_args(["--model", "m", "--max-steps", "7"])
    assert real == dataclasses.replace(train.Args(), model="m", max_steps=7)  # Args's defaults, nothing of the demo's
    monkeypatch.setattr(demo, "FLAGS", [*demo.FLAGS, "--optim.lr", "1e-3"])  # a fork edits the demo's settings
    run = train.parse_args(["--max-steps", "7"])
    assert run.model == "" and run.max_steps == 7 and run.optim.lr == 1e-3 and run.eval.prompts == demo.PROMPTS
    assert train.parse_args(["--model", "m", "--max-steps", "7"]) == real


def test_nsa_on_a_dense_checkpoint_trains_and_exports(tmp_path):
    """--attn nsa on the dense demo base: the NSA parameters start from their deterministic init on
    every rank (fsdp.load_pretrained), train, and the DCP -> official export carries them and the
    NSA config, so it loads strictly with model.py (and --plain drops them again)."""
    import convert_weights
    out = str(tmp_path / "run")
    train.main(DEMO + ["--output-dir", out, "--max-steps", "2", "--attn", "nsa", "--nsa.block-size", "32",
                       "--nsa.topk", "4", "--nsa.window-size", "64"])
    step = os.path.join(out, "step-0000002")
    ckpt = read_dcp(step, str(tmp_path / "c.pt"))
    nsa_keys = [k for k in ckpt["model"] if ".self_attn.nsa." in k]
    assert nsa_keys and all(torch.isfinite(ckpt["model"][k]).all() for k in nsa_keys)
    exported = convert_weights.convert(convert_weights.Args(model=step, output_dir=str(tmp_path / "exp"), dtype="fp32", check=True))
    model = Bagel.from_pretrained(exported)
    assert model.config.nsa is not None and model.config.nsa.block_size == 32
    for k in nsa_keys:
        assert torch.equal(model.state_dict()[k], ckpt["ema"][k]), k
    plain = convert_weights.convert(convert_weights.Args(model=step, output_dir=str(tmp_path / "plain"), plain=True, check=True))
    assert Bagel.from_pretrained(plain).config.nsa is None
    # sample.py with its defaults on the demo's export: drawn at the run's largest size, which the export records
    import sample
    assert json.load(open(os.path.join(exported, data.IMAGE_SIZES)))["vae_max_size"] == 32
    out = sample.main(["--model", exported, "--prompt", "a red circle", "--steps", "2", "--output", str(tmp_path / "s.png")])
    assert Image.open(out["image"]).size == (32, 32)
