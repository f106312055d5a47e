"""model.py tests: strict loading, parity with independent implementations (transformers' Qwen3 and
SigLIP, diffusers' VAE), mask semantics, expert routing, inference helpers. CPU, tiny shapes, seconds."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import packing
from model import (AutoEncoder, Bagel, packed_attention, patchify_latent, plan_attention, read_config, config_files,
                   save_pretrained, sincos_2d, unpatchify_latent)
from golden import CASES, GOLDEN, TINY, TINY_AE, golden_batch, tiny_bagel  # noqa: F401 (other test files import them from here)
from sample import Context, generate_image, generate_text, latent_to_pil

PARITY_TOL = 1e-4  # fp32, two implementations of the same ops in a different order
TOKENS = {"bos": 281, "eos": 282, "vision_start": 289, "vision_end": 290}  # the golden tiny tokenizer's ids


def tiny_ae(seed: int = 0) -> AutoEncoder:
    """Random tiny VAE with GroupNorm weights and conv biases moved off their init, so a skipped one shows."""
    torch.manual_seed(seed)
    ae = AutoEncoder(TINY_AE)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if p.ndim == 1:
                p.copy_(float("norm" in name and name.endswith("weight")) + 0.2 * torch.randn_like(p))
    return ae.eval()


def write_official(path, model: Bagel, ae: AutoEncoder):
    """A checkpoint directory in the official BAGEL-7B-MoT layout (+ our two optional config files)."""
    save_pretrained(str(path), model, ae)


def hidden(model: Bagel, batch: dict) -> torch.Tensor:
    """Final LLM hidden state [N, hidden] of a packed forward (captured with a hook)."""
    out = {}
    h = model.language_model.model.register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    try:
        model(**batch)
    finally:
        h.remove()
    return out["h"]


# -------------------------------------------------------------------------------------------------
# loading

def test_checkpoint_round_trip_is_strict_and_exact(tmp_path):
    model, ae = tiny_bagel(), tiny_ae()
    write_official(tmp_path, model, ae)
    assert read_config(str(tmp_path)) == TINY  # vit_config.json says 3 layers, 2 are built (DESIGN.md#model)
    loaded = Bagel.from_pretrained(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    loaded_ae = AutoEncoder.from_pretrained(str(tmp_path))
    assert not any(p.requires_grad for p in loaded_ae.parameters())
    for k, v in ae.state_dict().items():
        assert torch.equal(v, loaded_ae.state_dict()[k]), k
    half = Bagel.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    und_only = Bagel.from_pretrained(str(tmp_path), visual_gen=False)  # gen-part keys skipped on purpose
    assert not hasattr(und_only, "llm2vae")


def _save_bagel(tmp_path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp_path, "ema.safetensors"))


def test_corrupted_checkpoints_name_the_problem(tmp_path):
    model, ae = tiny_bagel(), tiny_ae()
    write_official(tmp_path, model, ae)
    state = model.state_dict()
    key = "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"
    _save_bagel(tmp_path, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=rf"ema.safetensors.*missing \(1\).*{key}"):
        Bagel.from_pretrained(str(tmp_path))
    _save_bagel(tmp_path, {**state, "connector.fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"wrong shape.*connector\.fc1\.weight"):
        Bagel.from_pretrained(str(tmp_path))
    _save_bagel(tmp_path, {**state, "vit_model.vision_model.encoder.layers.2.mlp.fc1.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"unexpected.*layers\.2\.mlp\.fc1\.bias"):
        Bagel.from_pretrained(str(tmp_path))  # the 27th SigLIP layer must not be there (DESIGN.md#model)
    with open(os.path.join(tmp_path, "ema.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="ema.safetensors.*not a readable safetensors"):
        Bagel.from_pretrained(str(tmp_path))
    os.remove(os.path.join(tmp_path, "ema.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Bagel.from_pretrained(str(tmp_path))
    ae_state = ae.state_dict()
    save_file({k: v.contiguous() for k, v in ae_state.items() if k != "decoder.conv_out.bias"},
              os.path.join(tmp_path, "ae.safetensors"))
    with pytest.raises(ValueError, match=r"ae.safetensors.*missing.*decoder\.conv_out\.bias"):
        AutoEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a BAGEL checkpoint"):
        Bagel.from_pretrained(str(tmp_path / "nowhere"))


def test_hf_layout_loads_the_same_model(tmp_path):
    """LMMS Engine's ver.LE layout as we assume it: config.json with nested configs, sharded
    safetensors + index, VAE under vae_model., `model.` prefixes tolerated, conv patch embedding."""
    model, ae = tiny_bagel(), tiny_ae()
    files = config_files(TINY)
    cfg = {"model_type": "bagel", "llm_config": files["llm_config.json"], "vit_config": files["vit_config.json"],
           "vae_config": files["ae_config.json"], **files["bagel_config.json"]}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    state = {("model." + k if "vit" in k else k): v for k, v in model.state_dict().items()}
    w = state.pop("model.vit_model.vision_model.embeddings.patch_embedding.weight")
    state["model.vit_model.vision_model.embeddings.patch_embedding.weight"] = w.reshape(32, 14, 14, 3).permute(0, 3, 1, 2)
    state.update({"vae_model." + k: v for k, v in ae.state_dict().items()})
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, tmp_path / name)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    loaded, loaded_ae = Bagel.from_pretrained(str(tmp_path)), AutoEncoder.from_pretrained(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    for k, v in ae.state_dict().items():
        assert torch.equal(v, loaded_ae.state_dict()[k]), k


def test_sincos_tables_match_spec():
    t = sincos_2d(8, 16)  # each coordinate gets 8 dims: 4 sines then 4 cosines, w_k = 10000^(-k/4)
    w = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    s = lambda x: torch.cat([torch.sin(x * w), torch.cos(x * w)])
    torch.testing.assert_close(t[2 * 8 + 5], torch.cat([s(5), s(2)]).float())  # (r, c) = (2, 5): COLUMN first
    assert torch.equal(sincos_2d(4, 16)[1 * 4 + 3], t[1 * 8 + 3])  # a value does not depend on the grid


# -------------------------------------------------------------------------------------------------
# parity with independent implementations

def qwen3_twin(model: Bagel, expert: str = ""):
    """transformers' Qwen3ForCausalLM (same per-head QK-norm before RoPE) holding one expert's weights;
    Qwen3 with attention_bias=True has an o_proj bias that BAGEL lacks: set to zero."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    c = model.config.llm
    ref = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, attention_bias=True, tie_word_embeddings=False,
        max_position_embeddings=512)).eval()
    ours = model.language_model.state_dict()
    sd = {}
    for k in ref.state_dict():
        if k.endswith("o_proj.bias"):
            sd[k] = torch.zeros_like(ref.state_dict()[k])
            continue
        name = k
        if expert and ".mlp." in k:  # mlp.gate_proj -> mlp_moe_gen.gate_proj
            name = k.replace(".mlp.", f".mlp{expert}.")
        elif expert and ".layers." in k:  # self_attn.q_proj.weight -> self_attn.q_proj_moe_gen.weight
            mod, param = k.rsplit(".", 1)
            name = f"{mod}{expert}.{param}"
        elif expert and k == "model.norm.weight":
            name = "model.norm" + expert + ".weight"
        sd[k] = ours[name]
    ref.load_state_dict(sd, strict=True)
    return ref


def _text_pack(lens, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    n = sum(lens)
    return ids, {"sequence_length": n, "sample_lens": lens, "split_lens": lens, "attn_modes": ["causal"] * len(lens),
                 "packed_text_ids": torch.cat(ids), "packed_text_indexes": torch.arange(n),
                 "packed_position_ids": torch.cat([torch.arange(k) for k in lens])}


@torch.no_grad()
def test_und_path_matches_transformers_qwen3():
    """Text-only pack of two samples: logits equal Qwen3's on each sample alone (block-diagonal mask,
    RoPE restart); the CE of Bagel.forward equals Qwen3's next-token CE."""
    model = tiny_bagel()
    ref = qwen3_twin(model)
    ids, batch = _text_pack([11, 7])
    h = hidden(model, batch)
    logits = model.language_model.lm_head(h)
    errs = []
    for s, x in zip(torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor([11])]), ids):
        want = ref(input_ids=x[None]).logits[0]
        errs.append((logits[s:s + len(x)] - want).abs().max().item())
    print(f"und path vs Qwen3: max |logit err| {max(errs):.2e}")
    assert max(errs) < PARITY_TOL
    # CE wiring: position i of the first sample predicts token i+1
    ce = model(**batch, ce_loss_indexes=torch.arange(10), packed_label_ids=ids[0][1:])["ce"]
    want = F.cross_entropy(ref(input_ids=ids[0][None]).logits[0, :10], ids[0][1:], reduction="none")
    torch.testing.assert_close(ce, want, atol=PARITY_TOL, rtol=0)


@torch.no_grad()
def test_gen_expert_matches_transformers_qwen3():
    """All tokens routed to the _moe_gen expert (causal, for the comparison) equal Qwen3 holding the
    gen weights: every gen parameter (projections, QK-norms, layer norms, final norm) is wired."""
    model = tiny_bagel()
    ref = qwen3_twin(model, "_moe_gen")
    x = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(3))
    lm = model.language_model
    plan = plan_attention("sdpa", [13], [13], ["causal"], "cpu")
    h = lm.model(lm.model.embed_tokens(x), torch.arange(13), torch.empty(0, dtype=torch.long), torch.arange(13),
                 lambda i, q, k, v: packed_attention(plan, q, k, v))
    err = (lm.lm_head(h) - ref(input_ids=x[None]).logits[0]).abs().max().item()
    print(f"gen expert vs Qwen3: max |logit err| {err:.2e}")
    assert err < PARITY_TOL


def siglip_twin(model: Bagel):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    c = model.config.vit
    ref = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, patch_size=c.patch_size, image_size=c.image_size,
        layer_norm_eps=c.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)).eval()
    sd = {k: v for k, v in model.vit_model.state_dict().items()}
    w = sd["vision_model.embeddings.patch_embedding.weight"]  # linear (py, px, c) -> conv [out, c, py, px]
    p = c.patch_size
    sd["vision_model.embeddings.patch_embedding.weight"] = w.reshape(-1, p, p, 3).permute(0, 3, 1, 2)
    if not any(k.startswith("vision_model.") for k in ref.state_dict()):  # transformers 5 drops the prefix
        sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    ref.load_state_dict(sd, strict=True)
    return ref


def patchify_image(img: torch.Tensor, p: int = 14) -> torch.Tensor:
    """[3, H, W] -> [n, p*p*3] patches, row-major, (py, px, c) features (DESIGN.md#image-sizes), written independently."""
    c, hh, ww = img.shape
    return img.reshape(c, hh // p, p, ww // p, p).permute(1, 3, 2, 4, 0).reshape(-1, p * p * c)


@torch.no_grad()
def test_vit_matches_transformers_siglip():
    model = tiny_bagel()
    ref = siglip_twin(model)
    g = torch.Generator().manual_seed(4)
    imgs = [torch.rand(3, 112, 112, generator=g) * 2 - 1 for _ in range(2)]
    vit = model.vit_model.vision_model
    pix = torch.cat([patchify_image(i) for i in imgs])
    ids = torch.arange(64).repeat(2)  # full 8x8 images: r*8 + c = 0..63
    ours = vit(pix, ids, [64, 64])  # two images in one pack must not see each other
    want = torch.cat([ref(pixel_values=i[None]).last_hidden_state[0] for i in imgs])
    err = (ours - want).abs().max().item()
    print(f"ViT vs SigLIP: max abs err {err:.2e}")
    assert err < PARITY_TOL


def diffusers_twin(ae: AutoEncoder):
    """diffusers' AutoencoderKL in the FLUX layout, loaded from our FLUX-named weights by diffusers'
    own converter (which also reverses the up-block order and reshapes the attention convs)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    c = ae.config
    n = len(c.ch_mult)
    ref = AutoencoderKL(in_channels=c.in_channels, out_channels=c.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(c.ch * m for m in c.ch_mult),
                        layers_per_block=c.num_res_blocks, latent_channels=c.z_channels, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    ref.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), ref.config), strict=True)
    return ref.eval()


@torch.no_grad()
def test_vae_matches_diffusers():
    ae = tiny_ae()
    ref = diffusers_twin(ae)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = ae.encoder(x).chunk(2, dim=1)
    dist = ref.encode(x).latent_dist
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    dec = ae.decode(TINY_AE.scale_factor * (z - TINY_AE.shift_factor))  # decode undoes the FLUX scaling
    errs = [(mean - dist.mean).abs().max().item(), (logvar - dist.logvar).abs().max().item(),
            (dec - ref.decode(z).sample).abs().max().item()]
    print("VAE vs diffusers: max abs err encoder mean {:.2e}, logvar {:.2e}, decoder {:.2e}".format(*errs))
    assert max(errs) < PARITY_TOL


@torch.no_grad()
def test_vae_sampling_uses_only_the_generator():
    ae = tiny_ae()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    state = torch.get_rng_state()
    z1, z2 = ae.encode(x, torch.Generator().manual_seed(7)), ae.encode(x, torch.Generator().manual_seed(7))
    z3 = ae.encode(x, torch.Generator().manual_seed(8))
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert torch.equal(z1, z2) and not torch.allclose(z1, z3)
    mean = ae.encoder(x).chunk(2, dim=1)[0]
    torch.testing.assert_close(ae.encode(x, sample=False), TINY_AE.scale_factor * (mean - TINY_AE.shift_factor))
    with pytest.raises(ValueError, match="Generator"):
        ae.encode(x)


def test_latent_patchify_order_and_inverse():
    c, h, w = 16, 2, 3
    z = torch.arange(c * 5 * 7, dtype=torch.float32).reshape(c, 5, 7)  # odd sizes: last row/col cropped
    tokens = patchify_latent(z, h, w)
    for r in range(h):
        for col in range(w):
            for py in range(2):
                for px in range(2):  # token r*w + col, feature (py*2 + px)*16 + c (DESIGN.md#model)
                    assert torch.equal(tokens[r * w + col, (py * 2 + px) * c:(py * 2 + px + 1) * c], z[:, 2 * r + py, 2 * col + px])
    assert torch.equal(unpatchify_latent(tokens, h, w), z[:, :2 * h, :2 * w])


# -------------------------------------------------------------------------------------------------
# masks and attention

def _golden_mask(case):
    import ast
    with open(os.path.join(GOLDEN, case + ".json")) as f:
        rows = json.load(f)["attention_mask"]
    rows = ast.literal_eval(rows) if isinstance(rows, str) else rows
    return torch.tensor([[ch == "1" for ch in r] for r in rows])


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_dense_golden_mask(case):
    """sdpa (per-split, no mask tensor) and flex equal a naive dense softmax under the golden mask of
    the original BAGEL code; the shared predicate reproduces that mask."""
    b = golden_batch(case)
    mask = _golden_mask(case)
    assert torch.equal(torch.block_diag(*packing.sample_masks(b["sample_lens"], b["split_lens"], b["attn_modes"])), mask)
    n = b["sequence_length"]
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(n, 4, 16, generator=g), torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # query head h uses kv head h // 2
    scores = torch.einsum("qhd,khd->hqk", q, kk) / 4.0
    want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vv)
    for kind in ("sdpa", "flex"):
        got = packed_attention(plan_attention(kind, b["sample_lens"], b["split_lens"], b["attn_modes"], "cpu"), q, k, v)
        assert (got - want).abs().max() < 1e-5, kind


@torch.no_grad()
def test_sdpa_and_flex_agree_on_the_model():
    model = tiny_bagel()
    b = golden_batch("case6_pack")
    h_s, out_s = hidden(model, b), model(**b)
    model.attn = "flex"
    h_f, out_f = hidden(model, b), model(**b)
    err = (h_s - h_f).abs().max().item()
    print(f"sdpa vs flex: max |hidden err| {err:.2e}")
    assert err < 1e-5
    for key in ("ce", "mse"):
        torch.testing.assert_close(out_s[key], out_f[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no backward on CPU"):
        with torch.enable_grad():
            model(**b)


@torch.no_grad()
def test_mask_semantics_by_perturbation():
    """What a token may not see cannot change it: later text, another sample, a noisy image."""
    model = tiny_bagel()
    b = golden_batch("case6_pack")  # samples: case1 [0,52) understanding, case3 [52,78) T2I, case4 [78,130) edit
    h0 = hidden(model, b)
    # a later text token of sample 0 (its last answer token) changes nothing before it
    later = dict(b, packed_text_ids=b["packed_text_ids"].clone())
    pos = int(b["packed_text_indexes"][b["packed_text_indexes"] < 52].max()) - 1
    later["packed_text_ids"][b["packed_text_indexes"] == pos] += 1
    h1 = hidden(model, later)
    assert torch.equal(h1[:pos], h0[:pos]) and not torch.allclose(h1[pos], h0[pos])
    # another sample's tokens change nothing in sample 0 or sample 2
    other = dict(b, packed_text_ids=b["packed_text_ids"].clone())
    other["packed_text_ids"][(b["packed_text_indexes"] >= 52) & (b["packed_text_indexes"] < 78)] += 1
    h2 = hidden(model, other)
    assert torch.equal(h2[:52], h0[:52]) and torch.equal(h2[78:], h0[78:]) and not torch.allclose(h2[52:78], h0[52:78])
    # the noisy target of the edit (split [120,130)) is invisible to everyone else, bidirectional inside
    noisy = dict(b, packed_noise=b["packed_noise"].clone())
    last = b["packed_vae_token_indexes"] == 128  # the last noisy latent token
    noisy["packed_noise"][last] += 1.0
    h3 = hidden(model, noisy)
    assert torch.equal(h3[:120], h0[:120]) and not torch.allclose(h3[121], h0[121])  # first latent sees the last
    # bidirectional inside a ViT image: the first patch sees the last patch of its image
    vit = dict(b, packed_vit_tokens=b["packed_vit_tokens"].clone())
    vit["packed_vit_tokens"][b["vit_token_seqlens"][0] - 1] += 1.0
    h4 = hidden(model, vit)
    first = int(b["packed_vit_token_indexes"][0])
    assert first == 1 and not torch.allclose(h4[1], h0[1]) and torch.equal(h4[52:], h0[52:])
    assert not torch.allclose(h4[0], h0[0])  # even the image's <|vision_start|> marker sees its last patch


def test_no_pack_wide_mask_is_built():
    """A 32k-token pack of 8 samples: the sdpa plan holds index slices, the flex plan a BlockMask of
    megabytes (N*N bools would be 1 GiB)."""
    lens = [4096] * 8
    split_lens, modes = [], []
    for _ in lens:
        split_lens += [100, 1024, 2972]
        modes += ["causal", "noise", "causal"]
    sdpa = plan_attention("sdpa", lens, split_lens, modes, "cpu")
    assert sum(t.numel() * t.element_size() for t in (sdpa.jobs, sdpa.keys)) < 2**20
    flex = plan_attention("flex", lens, split_lens, modes, "cpu")
    size = sum(t.numel() * t.element_size() for t in flex.block_mask.as_tuple() if isinstance(t, torch.Tensor))
    assert size < 16 * 2**20


# -------------------------------------------------------------------------------------------------
# routing, gradients, randomness

def test_routing_and_gradients_per_expert():
    model = tiny_bagel()
    b = golden_batch("case6_pack")
    seen = {}
    hooks = [model.language_model.model.layers[0].input_layernorm.register_forward_hook(lambda m, i, o: seen.update(und=i[0])),
             model.language_model.model.layers[0].input_layernorm_moe_gen.register_forward_hook(lambda m, i, o: seen.update(gen=i[0]))]
    emb = {}
    h = model.language_model.model.register_forward_pre_hook(lambda m, a: emb.update(x=a[0]))
    model(**b)
    for x in hooks + [h]:
        x.remove()
    und = torch.cat([b["packed_text_indexes"], b["packed_vit_token_indexes"]])
    assert torch.equal(seen["und"], emb["x"][und]) and torch.equal(seen["gen"], emb["x"][b["packed_vae_token_indexes"]])

    # a pack without VAE tokens: every _moe_gen weight gets an exactly-zero (not None) gradient
    model.zero_grad()
    out = model(**golden_batch("case1_two_images"))
    (out["ce"].sum() + out["mse"].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # every rank touches every parameter (FSDP reduce-scatter)
        if "moe_gen" in name or name.startswith(("llm2vae", "vae2llm", "time_embedder")):
            assert not p.grad.any(), name
        elif name.startswith("language_model.model.layers") or name.startswith("vit_model"):
            assert p.grad.any(), name


def test_t2i_pack_without_ce_or_vit_tokens_runs_backward():
    model = tiny_bagel()
    b = golden_batch("case3_t2i")  # caption without loss, no ViT: empty CE and empty ViT branch
    out = model(**b)
    assert out["ce"].numel() == 0 and out["mse"].shape == (len(b["mse_loss_indexes"]), 64)
    (out["ce"].sum() + out["mse"].mean()).backward()  # the trainer always sums both terms
    assert all(p.grad is not None for p in model.parameters())
    assert not model.vit_model.vision_model.embeddings.patch_embedding.weight.grad.any()


def test_noise_comes_from_the_batch_or_a_generator():
    model = tiny_bagel()
    b = golden_batch("case3_t2i")
    b.pop("packed_noise")
    with pytest.raises(ValueError, match="Generator"):
        model(**b)
    with pytest.raises(ValueError, match="inconsistent pack"):
        model(**dict(b, sequence_length=b["sequence_length"] + 1))
    with pytest.raises(ValueError, match="padded_latent"):
        model(**{k: v for k, v in b.items() if k != "padded_latent"})
    state = torch.get_rng_state()
    m1 = model(**b, generator=torch.Generator().manual_seed(1))["mse"]
    m2 = model(**b, generator=torch.Generator().manual_seed(1))["mse"]
    m3 = model(**b, generator=torch.Generator().manual_seed(2))["mse"]
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(m1, m2) and not torch.allclose(m1, m3)


def test_activation_checkpointing_per_layer_gives_the_same_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    b = golden_batch("case6_pack")
    grads = []
    for wrap in (False, True):
        model = tiny_bagel()
        if wrap:
            layers = model.language_model.model.layers
            for i in range(len(layers)):
                layers[i] = checkpoint_wrapper(layers[i])
        out = model(**b)
        (out["ce"].mean() + out["mse"].mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# -------------------------------------------------------------------------------------------------
# inference helpers

@torch.no_grad()
def test_kv_cache_text_decoding_matches_the_packed_forward():
    """Greedy decoding with the KV cache after an image + question equals re-running the packed
    training forward on the whole sequence and taking the argmax at the last position. It stops
    after max_new_tokens, or before that exactly where the packed forward's next token is
    <|im_end|>, which is not part of the answer (second run: <|im_end|> made likely)."""
    model = tiny_bagel()
    img = torch.rand(3, 56, 42, generator=torch.Generator().manual_seed(0)) * 2 - 1
    patches, ids = patchify_image(img), torch.tensor([r * 8 + c for r in range(4) for c in range(3)])
    question = [70, 71, 72, 73]

    def decode():
        ctx = Context(model, TOKENS)
        ctx.add_vit_image(patches, ids)
        ctx.add_text(question)
        return generate_text(ctx, max_new_tokens=5)

    for run in range(2):
        answer = decode()
        assert decode() == answer and TOKENS["eos"] not in answer  # deterministic
        # the same sequence as one packed sample: [vs, 12 patches, ve] [bos q eos] [bos answer...]
        text = [TOKENS["vision_start"], TOKENS["vision_end"], TOKENS["bos"], *question, TOKENS["eos"], TOKENS["bos"], *answer]
        n = 14 + 6 + 1 + len(answer)
        batch = {"sequence_length": n, "sample_lens": [n], "split_lens": [14, 6, 1 + len(answer)],
                 "attn_modes": ["full", "causal", "causal"], "packed_text_ids": torch.tensor(text),
                 "packed_text_indexes": torch.tensor([0, 13] + list(range(14, n))),
                 "packed_position_ids": torch.tensor([0] * 14 + list(range(1, 1 + 6 + 1 + len(answer)))),
                 "packed_vit_tokens": patches, "packed_vit_token_indexes": torch.arange(1, 13),
                 "packed_vit_position_ids": ids, "vit_token_seqlens": torch.tensor([12])}
        h = hidden(model, batch)
        greedy = model.language_model.lm_head(h[20:]).argmax(-1).tolist()  # from the answer's <|im_start|> on
        assert greedy[:len(answer)] == answer
        assert len(answer) == (5 if run == 0 else greedy.index(TOKENS["eos"]))
        if run == 0:  # <|im_end|>'s output row becomes 3x the third answer token's: run 1 stops early
            model.language_model.lm_head.weight[TOKENS["eos"]] = 3 * model.language_model.lm_head.weight[answer[2]]


@torch.no_grad()
def test_image_generation_runs_and_is_deterministic():
    model, ae = tiny_bagel(), tiny_ae()
    runs = []
    for _ in range(2):
        ctx, uncond = Context(model, TOKENS), Context(model, TOKENS)
        ctx.add_text([70, 71, 72])
        lat = generate_image(ctx, uncond, 32, 48, steps=4, cfg_interval=(0.0, 1.0),
                             generator=torch.Generator().manual_seed(0))
        runs.append(lat)
    assert runs[0].shape == (16, 4, 6) and torch.equal(runs[0], runs[1])
    img = latent_to_pil(ae, runs[0])
    assert img.size == (48, 32) and img.mode == "RGB"
    with pytest.raises(ValueError, match="multiples of 16"):
        generate_image(ctx, uncond, 30, 48, steps=2, generator=torch.Generator())
    edit = Context(model, TOKENS)  # editing context: clean VAE latent of an input image, then text
    edit.add_vae_image(ae.encode(torch.zeros(1, 3, 32, 32), sample=False)[0])
    edit.add_text([70])
    assert generate_image(edit, None, 32, 32, steps=3, generator=torch.Generator().manual_seed(0)).shape == (16, 4, 4)


def edit_contexts(model, ae):
    """An editing conversation (clean VAE image, ViT image, instruction) and its two CFG branches:
    without the instruction (text CFG) and without the images (image CFG)."""
    full = Context(model, TOKENS)
    img_free = full.fork()
    full.add_vae_image(ae.encode(torch.rand(1, 3, 32, 32) * 2 - 1, sample=False)[0])
    x = torch.rand(3, 28, 42) * 2 - 1
    full.add_vit_image(patchify_image(x, 14), torch.tensor(packing.grid_ids(2, 3, 8)))
    text_free = full.fork()
    for c in (full, img_free):
        c.add_text([70, 71, 72])
    return full, text_free, img_free


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("s_txt,s_img,interval", [(4.0, 2.0, (0.0, 1.0)), (3.0, 1.0, (0.0, 1.0)),
                                                  (1.0, 2.0, (0.0, 1.0)), (4.0, 2.0, (0.0, 0.5))])
def test_guidance_matches_the_reference_formula(renorm, s_txt, s_img, interval):
    """One Euler step of generate_image equals x - v dt with v combined as written in DESIGN.md#inference
    (text CFG, image CFG, global / channel / text_channel renorm, the interval, and the reference's
    quirk that image CFG only acts with text CFG), from velocities computed here directly."""
    model, ae = tiny_bagel(), tiny_ae()
    full, text_free, img_free = edit_contexts(model, ae)
    lat = generate_image(full, text_free, 32, 32, steps=2, timestep_shift=1.0, cfg_text_scale=s_txt, cfg_interval=interval,
                         cfg_renorm_min=0.0, generator=torch.Generator().manual_seed(3), cfg_img_ctx=img_free,
                         cfg_img_scale=s_img, cfg_renorm_type=renorm)
    x = torch.randn(4, TINY.latent_channels, generator=torch.Generator().manual_seed(3))  # the draw at t = 1; dt = 1

    def vel(c):
        hid = c.run(c._latent_block(x, 1.0, 2, 2), torch.full((6,), c.rope), [1, 2, 3, 4], "noise", update=False)
        return model.llm2vae(hid[1:-1]).float()

    with torch.no_grad():
        vc, vt, vi = vel(full), vel(text_free), vel(img_free)
    if s_txt > 1 and interval[0] < 1.0 <= interval[1]:
        if renorm == "text_channel":
            v1 = vt + s_txt * (vc - vt)
            v1 = v1 * (vc.norm(dim=1, keepdim=True) / (v1.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
            v = vi + s_img * (v1 - vi) if s_img > 1 else v1
        else:
            v1 = vt + s_txt * (vc - vt)
            v2 = vi + s_img * (v1 - vi) if s_img > 1 else v1
            n = (lambda a: a.norm()) if renorm == "global" else (lambda a: a.norm(dim=1, keepdim=True))
            v = v2 * (n(vc) / (n(v2) + 1e-8)).clamp(0, 1)
    else:
        v = vc
    assert not torch.allclose(vc, vi) and not torch.allclose(vc, vt)  # the branches differ: the test can fail
    torch.testing.assert_close(lat, unpatchify_latent(x - v, 2, 2, 2), rtol=1e-5, atol=1e-5)


def test_sample_cli_draws_edits_and_answers(tmp_path, capsys):
    """sample.py on a checkpoint directory: text-to-image at the asked size, an edit at the input's
    (resized) size, an answer about an image, think-then-draw; a training checkpoint is refused."""
    import sample
    ckpt = str(tmp_path / "ckpt")
    write_official(ckpt, tiny_bagel(), tiny_ae())
    for f in os.listdir(os.path.join(GOLDEN, "tokenizer")):
        shutil.copy(os.path.join(GOLDEN, "tokenizer", f), ckpt)
    Image.fromarray((np.random.default_rng(0).random((40, 72, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    common = ["--model", ckpt, "--steps", "3", "--max-new-tokens", "4"]
    out = sample.main(common + ["--prompt", "a red circle", "--size", "64", "--output", str(tmp_path / "t2i.png")])
    assert Image.open(out["image"]).size == (64, 64)
    out = sample.main(common + ["--image", str(tmp_path / "in.png"), "--prompt", "make it blue", "--output", str(tmp_path / "e.png")])
    assert Image.open(out["image"]).size == (128, 80)  # DESIGN.md#image-sizes rule, capped at the model's 128 px: 72x40 -> 224x128 -> 128x80
    out = sample.main(common + ["--image", str(tmp_path / "in.png"), "--question", "what is this?"])
    assert isinstance(out["text"], str) and "image" not in out
    out = sample.main(common + ["--prompt", "a red circle", "--think", "--size", "32", "--output", str(tmp_path / "th.png")])
    assert "text" in out and Image.open(out["image"]).size == (32, 32)
    open(os.path.join(tmp_path, "meta.json"), "w").write("{}")
    with pytest.raises(SystemExit, match="training checkpoint"):
        sample.main(["--model", str(tmp_path), "--prompt", "x"])


def test_chunked_cross_entropy_equals_the_plain_one(monkeypatch):
    """LMHead(h, labels) = cross_entropy(lm_head(h)) per token, values and gradients, across chunk
    boundaries; no rows still gives the weight a (zero) gradient, as FSDP needs on every rank."""
    import model as model_lib
    monkeypatch.setattr(model_lib, "CE_CHUNK", 3)
    head = model_lib.LMHead(16, 50, bias=False)
    h = torch.randn(8, 16, requires_grad=True)
    labels = torch.randint(0, 50, (8,))
    w = torch.rand(8)
    (head(h, labels) * w).sum().backward()
    got = (head(h, labels).detach(), h.grad.clone(), head.weight.grad.clone())
    h.grad = head.weight.grad = None
    ref = F.cross_entropy(head(h), labels, reduction="none")
    (ref * w).sum().backward()
    for a, b in zip(got, (ref.detach(), h.grad, head.weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    head.weight.grad = None
    head(torch.zeros(0, 16, requires_grad=True), labels[:0]).sum().backward()
    assert head.weight.grad is not None and not head.weight.grad.any()
