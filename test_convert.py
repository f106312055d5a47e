"""convert_weights.py tests: bit-exact round trips official -> hf -> official and training checkpoint (DCP)
-> official, exported weights that give the training model's losses, clear errors that leave no
destination behind, and a synthetic 3 GB checkpoint converted with bounded memory. CPU."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import packing
from convert_weights import Args, Source, convert, parse_size, write_safetensors
from model import POS_TABLES, AutoEncoder, Bagel, LLMConfig, config_files, read_config
from test_smoke import GOLDEN, TINY, golden_batch, tiny_ae, tiny_bagel, write_official

HERE = os.path.dirname(os.path.abspath(__file__))
NSA_KEY = "language_model.model.layers.0.self_attn.nsa.gate.weight"  # an extra parameter, as NSA adds


def base_checkpoint(path, model=None, ae=None) -> str:
    """A tiny official-layout checkpoint with the golden tokenizer's files."""
    write_official(path, model or tiny_bagel(), ae or tiny_ae())
    for name in os.listdir(os.path.join(GOLDEN, "tokenizer")):
        shutil.copy(os.path.join(GOLDEN, "tokenizer", name), path)
    return str(path)


def training_checkpoint(path, base: str, model: dict, ema: dict | None = None, args: bool = True) -> str:
    """`output_dir/step-N/` as fsdp.py writes it: DCP {model, ema, optim, ...} + args.json + meta.json."""
    state = {"model": model, "optim": {"state": {"lr": torch.tensor(1e-5)}, "param_groups": [{"lr": 1e-5}]},
             "data": {"epoch": 0}}
    if ema is not None:
        state["ema"] = ema
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # single-process save
        dcp.save(state, checkpoint_id=str(path))
    if args:
        with open(os.path.join(path, "args.json"), "w") as f:
            json.dump({"model": base, "lr": 1e-5}, f)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": 7}, f)
    return str(path)


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def no_leftovers(parent):
    assert not [n for n in os.listdir(parent) if ".tmp-" in n]


# -------------------------------------------------------------------------------------------------

def test_official_hf_official_round_trip_is_bit_exact(tmp_path):
    model, ae = tiny_bagel(), tiny_ae()
    base = base_checkpoint(tmp_path / "base", model, ae)
    # default flags: a change of layout keeps every tensor's dtype (the base is fp32)
    hf = convert(Args(base, str(tmp_path / "hf"), to="hf", max_shard_size="600KB", check=True))
    names = sorted(os.listdir(hf))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert "llm_config.json" not in names and {"config.json", "tokenizer.json", "vocab.json", "merges.txt"} <= set(names)
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert index["weight_map"]["vae_model.decoder.conv_out.bias"] in shards  # the VAE inside, LMMS Engine style
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in {**model.state_dict(), **ae.state_dict()}.values())
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["vit_config"]["num_hidden_layers"] == 2 and cfg["llm_config"]["qk_norm"] is True
    assert cfg["torch_dtype"] == "float32"
    assert read_config(hf) == TINY
    assert_same_tensors(Bagel.from_pretrained(hf).state_dict(), model.state_dict())

    back = convert(Args(hf, str(tmp_path / "back"), check=True))
    assert read_config(back) == TINY
    assert_same_tensors(load_file(os.path.join(back, "ema.safetensors")), load_file(os.path.join(base, "ema.safetensors")))
    assert_same_tensors(load_file(os.path.join(back, "ae.safetensors")), load_file(os.path.join(base, "ae.safetensors")))
    with open(os.path.join(back, "vit_config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 3  # upstream drops the last layer again (DESIGN.md#model)
    assert "config.json" not in os.listdir(back) and "tokenizer.json" in os.listdir(back)

    half = convert(Args(base, str(tmp_path / "bf16"), to="hf", dtype="bf16"))  # asked: bf16 BAGEL, VAE as stored
    loaded = Bagel.from_pretrained(half, dtype=torch.bfloat16)
    skip = lambda sd: {k: v for k, v in sd.items() if k not in POS_TABLES}  # recomputed in fp32 at load
    assert_same_tensors(skip(loaded.state_dict()), skip(model.to(torch.bfloat16).state_dict()))
    assert_same_tensors(AutoEncoder.from_pretrained(half).state_dict(), ae.state_dict())
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    no_leftovers(tmp_path)


def sgd_step(model: Bagel, batch: dict, lr: float = 0.1):
    out = model(**batch)
    (out["ce"].mean() + out["mse"].mean()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def test_training_checkpoint_exports_bit_exact_and_gives_the_same_losses(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    model, batch = tiny_bagel(), golden_batch("case6_pack")
    sgd_step(model, batch)
    trained = {k: v for k, v in model.state_dict().items() if k not in POS_TABLES}  # tables may be absent
    ema = {k: (v * 0.5).contiguous() for k, v in trained.items()}
    ckpt = training_checkpoint(tmp_path / "run" / "step-0000007", base, trained, ema)

    out = convert(Args(ckpt, str(tmp_path / "ema"), dtype="fp32", check=True))
    written = load_file(os.path.join(out, "ema.safetensors"))
    base_sd = load_file(os.path.join(base, "ema.safetensors"))
    assert_same_tensors(written, {**ema, **{k: base_sd[k] for k in POS_TABLES}})  # full key set, tables from base
    assert_same_tensors(load_file(os.path.join(out, "ae.safetensors")), load_file(os.path.join(base, "ae.safetensors")))
    assert read_config(out) == TINY and "tokenizer.json" in os.listdir(out)

    out = convert(Args(ckpt, str(tmp_path / "model"), weights="model", dtype="fp32", check=True))
    assert os.listdir(out).count("ema.safetensors") == 0
    exported = Bagel.from_pretrained(out)  # strict
    with torch.no_grad():
        want, got = model(**batch), exported(**batch)
    for k in ("ce", "mse"):
        assert torch.equal(want[k], got[k]), k
    no_leftovers(tmp_path)


def test_t2i_run_exports_the_vit_from_the_base(tmp_path):
    base_model = tiny_bagel()
    base = base_checkpoint(tmp_path / "base", base_model)
    model = tiny_bagel(seed=1, config=dataclasses.replace(TINY, visual_und=False))  # no ViT, no EMA
    ckpt = training_checkpoint(tmp_path / "step-0000001", base, model.state_dict(), args=False)
    with pytest.raises(FileNotFoundError, match="args.json: missing.*--base"):
        convert(Args(ckpt, str(tmp_path / "out")))
    out = convert(Args(ckpt, str(tmp_path / "out"), base=base, dtype="fp32", check=True))
    written = load_file(os.path.join(out, "ema.safetensors"))  # the model, since the run kept no EMA
    assert sorted(written) == sorted(base_model.state_dict())
    for k, v in written.items():
        src = model.state_dict()[k] if k in model.state_dict() else base_model.state_dict()[k]
        assert torch.equal(v, src), k
    assert any(k.startswith("vit_model.") for k in written) and read_config(out).visual_und


def test_extra_parameters_are_exported_unless_plain(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    sd = {**tiny_bagel(seed=2).state_dict(), NSA_KEY: torch.randn(4, 64)}
    ckpt = training_checkpoint(tmp_path / "step-0000002", base, sd)
    out = convert(Args(ckpt, str(tmp_path / "nsa"), dtype="fp32", check=True))
    assert torch.equal(load_file(os.path.join(out, "ema.safetensors"))[NSA_KEY], sd[NSA_KEY])
    hf = convert(Args(out, str(tmp_path / "nsa-hf"), to="hf", dtype="fp32", check=True))  # kept through layouts
    back = convert(Args(hf, str(tmp_path / "nsa-back"), dtype="fp32"))
    assert_same_tensors(load_file(os.path.join(back, "ema.safetensors")), load_file(os.path.join(out, "ema.safetensors")))
    plain = convert(Args(ckpt, str(tmp_path / "plain"), dtype="fp32", plain=True, check=True))
    assert NSA_KEY not in load_file(os.path.join(plain, "ema.safetensors"))
    Bagel.from_pretrained(plain)  # strict


def test_bad_inputs_give_clear_errors_and_leave_no_destination(tmp_path):
    model = tiny_bagel()
    base = base_checkpoint(tmp_path / "base", model)
    dst = str(tmp_path / "out")

    def fails(exc, match, **kw):
        with pytest.raises(exc, match=match):
            convert(Args(kw.pop("src", base), dst, **kw))
        assert not os.path.exists(dst)
        no_leftovers(tmp_path)

    os.makedirs(tmp_path / "empty")
    fails(FileNotFoundError, "not a BAGEL checkpoint", src=str(tmp_path / "empty"))
    fails(packing.UserError, "--model .*nowhere: no such directory", src=str(tmp_path / "nowhere"))
    fails(ValueError, "--max-shard-size", to="hf", max_shard_size="five")
    # a training checkpoint whose tensor does not fit the base's config
    sd = {**model.state_dict(), "connector.fc1.weight": torch.zeros(3, 3)}
    ckpt = training_checkpoint(tmp_path / "bad" / "step-0000003", base, sd)
    fails(ValueError, r"step-0000003.*wrong shape.*connector\.fc1\.weight.*\[3, 3\].*\[64, 32\]", src=ckpt)
    fails(ValueError, "a training output directory.*step-0000003", src=str(tmp_path / "bad"))
    os.remove(os.path.join(ckpt, "meta.json"))  # fsdp.py writes it last
    fails(ValueError, "without .metadata or meta.json: its save did not finish", src=ckpt)
    # DCP data cut short (found before writing), or damaged (found while writing: no output left)
    good = training_checkpoint(tmp_path / "step-0000004", base, model.state_dict())
    data = os.path.join(good, "__0_0.distcp")
    with open(data, "rb") as f:
        blob = f.read()
    with open(data, "wb") as f:
        f.write(blob[:len(blob) // 2])
    fails(ValueError, r"__0_0.distcp: missing or truncated", src=good)
    meta = dcp.FileSystemReader(good).read_metadata()
    last = max((i for k, i in meta.storage_data.items() if k.fqn.startswith("model.")), key=lambda i: i.offset)
    with open(data, "wb") as f:
        f.write(blob[:last.offset] + bytes(last.length) + blob[last.offset + last.length:])
    fails(ValueError, "step-0000004: reading .* failed, the checkpoint is damaged", src=good)
    # a truncated shard, a missing VAE, an existing destination
    ema = os.path.join(base, "ema.safetensors")
    with open(ema, "r+b") as f:
        f.truncate(os.path.getsize(ema) - 100)
    fails(ValueError, "ema.safetensors.*(truncated|not a readable)")
    write_official(base, model, tiny_ae())
    os.remove(os.path.join(base, "ae.safetensors"))
    fails(FileNotFoundError, "ae.safetensors: missing")
    write_official(base, model, tiny_ae())
    with pytest.raises(ValueError, match="is the checkpoint being read"):
        convert(Args(base, base, overwrite=True))
    os.makedirs(dst)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(Args(base, dst))
    convert(Args(base, dst, overwrite=True))
    assert "ema.safetensors" in os.listdir(dst)


# -------------------------------------------------------------------------------------------------
# memory: a synthetic 3 GB checkpoint converts with peak RSS far below its size

BIG = dataclasses.replace(TINY, llm=LLMConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                              num_attention_heads=8, num_key_value_heads=2, vocab_size=8000))


def peak_rss(*argv: str) -> int:
    """Run convert_weights.py in a fresh process; return how far its peak RSS rose above its RSS before
    the conversion (torch imported), in bytes. VmHWM, not ru_maxrss: ru_maxrss survives exec, so it
    would include the forked pytest process's RSS."""
    code = ("import sys, convert_weights; sys.argv = ['convert_weights.py'] + sys.argv[1:]; "
            "kb = lambda key: [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)][0]; "
            "start = kb('VmRSS'); convert_weights.main(); print('growth_kb', kb('VmHWM') - start)")
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=HERE)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split("growth_kb")[-1]) * 1024


def make_big_checkpoints(root: str):
    """`root`/big: an official checkpoint of ~1 GB of random fp32 tensors, written one tensor at a time;
    `root`/step-0000001: a training checkpoint of the same size (DCP saves from memory: ~1 GB here). Run
    in a subprocess: glibc keeps freed heap memory, so the pytest process would stay at ~1 GB after."""
    base = os.path.join(root, "big")
    os.makedirs(base)
    for name, cfg in config_files(BIG).items():
        with open(os.path.join(base, name), "w") as f:
            json.dump(cfg, f)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Bagel(BIG).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rand = lambda shape: torch.rand(shape, generator=g)
    write_safetensors(os.path.join(base, "ema.safetensors"),
                      [(k, Source("random", s, torch.float32, lambda s=s: rand(s)), torch.float32) for k, s in shapes.items()])
    save_file({k: v.contiguous() for k, v in tiny_ae().state_dict().items()}, os.path.join(base, "ae.safetensors"))
    training_checkpoint(os.path.join(root, "step-0000001"), base, {k: rand(s) for k, s in shapes.items()})


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
def test_big_checkpoint_converts_with_bounded_memory(tmp_path):
    """official -> hf and training checkpoint -> official, each from ~1 GB of fp32 tensors whose largest
    is 33 MB: the RSS a conversion adds stays a small fraction of the checkpoint (loading it whole
    would add at least its size)."""
    root = str(tmp_path)
    try:
        run = subprocess.run([sys.executable, "-c", f"import test_convert; test_convert.make_big_checkpoints({root!r})"],
                             capture_output=True, text=True, cwd=HERE)
        assert run.returncode == 0, run.stderr
        size = os.path.getsize(tmp_path / "big" / "ema.safetensors")
        assert size > 1e9

        peak = peak_rss("--model", str(tmp_path / "big"), "--output-dir", str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16", "--max-shard-size", "400MB")
        print(f"\nofficial {size / 1e9:.2f} GB fp32 -> hf bf16: peak RSS +{peak / 1e9:.2f} GB")
        assert peak < 0.25 * size
        assert len([n for n in os.listdir(tmp_path / "hf") if n.startswith("model-")]) == 2  # 0.5 GB in 400 MB shards
        assert read_config(str(tmp_path / "hf")) == BIG
        shutil.rmtree(tmp_path / "hf")

        peak = peak_rss("--model", str(tmp_path / "step-0000001"), "--output-dir", str(tmp_path / "out"))
        print(f"training checkpoint {size / 1e9:.2f} GB fp32 -> official bf16: peak RSS +{peak / 1e9:.2f} GB")
        assert peak < 0.25 * size
        assert os.path.getsize(tmp_path / "out" / "ema.safetensors") < size / 2 + 1e6
    finally:
        for name in ("big", "step-0000001", "hf", "out"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)


# -------------------------------------------------------------------------------------------------
# a new BAGEL from its parts (Qwen2 + SigLIP + FLUX VAE)

def randomize(module: torch.nn.Module, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return module.eval()


def test_build_from_parts(tmp_path):
    """Qwen2 (tied embeddings, as the small Qwen2.5s) + SigLIP (3 layers) + a VAE -> an official-layout
    BAGEL that model.py loads strictly: both experts hold the LLM's weights (QK-norms at 1), lm_head the
    tied embedding, the ViT equals SigLIP without its last layer, llm2vae is zero, and it trains."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from test_smoke import PARITY_TOL, _text_pack, hidden, patchify_image, qwen3_twin
    llm_dir, vit_dir, vae_dir = (str(tmp_path / n) for n in ("qwen", "siglip", "vae"))
    qwen = randomize(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)), 0)
    qwen.save_pretrained(llm_dir)
    for name in os.listdir(os.path.join(GOLDEN, "tokenizer")):
        shutil.copy(os.path.join(GOLDEN, "tokenizer", name), llm_dir)
    siglip = randomize(SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=14,
        image_size=112, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")), 1)
    siglip.save_pretrained(vit_dir)
    os.makedirs(vae_dir)
    ae = tiny_ae()
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, os.path.join(vae_dir, "ae.safetensors"))
    json.dump(config_files(TINY)["ae_config.json"], open(os.path.join(vae_dir, "ae_config.json"), "w"))

    out = convert(Args(model=llm_dir, output_dir=str(tmp_path / "bagel"), vit_model=vit_dir, vae_model=vae_dir, max_latent_size=8,
                       dtype="fp32", check=True))
    model = Bagel.from_pretrained(out)
    c = model.config
    assert c.vit.num_hidden_layers == 2 and c.vit_max_num_patch_per_side == 8 and c.llm.vocab_size == 300
    sd, q = model.state_dict(), qwen.state_dict()
    for k, v in q.items():  # both experts = the LLM
        ours = "language_model." + k
        assert torch.equal(sd[ours], v), k
        gen = ours.replace(".mlp.", ".mlp_moe_gen.") if ".mlp." in ours else \
            ours.rsplit(".", 1)[0] + "_moe_gen." + ours.rsplit(".", 1)[1] if ".layers." in ours or "model.norm" in ours else None
        if gen:
            assert torch.equal(sd[gen], v), gen
    assert torch.equal(sd["language_model.lm_head.weight"], q["model.embed_tokens.weight"])  # tied in Qwen2
    norms = [k for k in sd if k.endswith(("q_norm.weight", "k_norm.weight", "q_norm_moe_gen.weight", "k_norm_moe_gen.weight"))]
    assert len(norms) == 8 and all(torch.equal(sd[k], torch.ones(16)) for k in norms)
    assert not sd["llm2vae.weight"].any() and sd["connector.fc1.weight"].std() > 0
    # the und path is Qwen2 with QK-norm added: Qwen3 holding the same weights and unit QK-norms
    ids, batch = _text_pack([9])
    with torch.no_grad():
        err = (model.language_model.lm_head(hidden(model, batch)) - qwen3_twin(model)(input_ids=ids[0][None]).logits[0]).abs().max()
    assert err < PARITY_TOL
    # the ViT is SigLIP without its last layer, then its post-layernorm
    img = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        hs = siglip(pixel_values=img[None], output_hidden_states=True).hidden_states[-2]
        want = siglip.vision_model.post_layernorm(hs)[0] if hasattr(siglip, "vision_model") else siglip.post_layernorm(hs)[0]
        got = model.vit_model.vision_model(patchify_image(img), torch.arange(64), [64])
    assert (got - want).abs().max() < PARITY_TOL
    # and it trains: the golden mixed pack gives finite losses and gradients everywhere
    out_ = model(**golden_batch("case6_pack"), generator=torch.Generator().manual_seed(0))
    (out_["ce"].mean() + out_["mse"].mean()).backward()
    assert torch.isfinite(out_["ce"]).all() and model.connector.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs --vit-model"):
        convert(Args(model=llm_dir, output_dir=str(tmp_path / "x"), vae_model=vae_dir))
    assert not os.path.exists(tmp_path / "x")


def test_merged_lora_export_keeps_a_small_update(tmp_path, capsys):
    """A LoRA update 1e-3 the size of its weight survives the default export (merged tensors in fp32, the
    rest bf16): rounding W + B A to bf16 would keep it with an error of the size of the update itself."""
    model = tiny_bagel()
    base = base_checkpoint(tmp_path / "base", model)
    name, rank, alpha = "language_model.model.layers.0.self_attn.q_proj_moe_gen", 4, 8.0
    w = model.state_dict()[name + ".weight"].double()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
    b *= 1e-3 * w.norm() / (b.double() @ a.double() * alpha / rank).norm()
    step = training_checkpoint(tmp_path / "run" / "step-0000007", base, {name + ".lora_a": a, name + ".lora_b": b},
                               args=False)
    with open(os.path.join(step, "args.json"), "w") as f:
        json.dump({"model": base, "lora": {"rank": rank, "alpha": alpha, "targets": "gen", "vit": False}}, f)
    out = convert(Args(step, str(tmp_path / "export"), check=True))
    assert "1 merged LoRA tensors written in fp32, the rest in bf16" in capsys.readouterr().out
    got = load_file(os.path.join(out, "ema.safetensors"))
    delta = b.double() @ a.double() * alpha / rank
    assert ((got[name + ".weight"].double() - w) - delta).norm() < 1e-4 * delta.norm()  # the update, kept
    assert got[name + ".weight"].dtype == torch.float32
    assert got[name.replace("q_proj", "k_proj") + ".weight"].dtype == torch.bfloat16  # the rest as the release
    half = convert(Args(step, str(tmp_path / "half"), dtype="bf16"))  # asked for: rounded, and said so
    assert "rounded to bf16 (--dtype bf16)" in capsys.readouterr().out
    lost = (load_file(os.path.join(half, "ema.safetensors"))[name + ".weight"].double() - w - delta).norm()
    assert lost > 0.3 * delta.norm()  # what the default avoids
