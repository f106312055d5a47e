"""Flow matching written from the formulas, and image inference against the training forward.

The references here share no helper with model.py's flow code: timesteps, shift, interpolation,
velocity target, the DiT timestep features and the latent sin-cos positions are written out below
(float64). What they reuse is the model's weights and its LLM trunk: the hand-built LLM input is
compared with the input the trunk receives, and the hand-computed loss uses the trunk's output.
CPU, tiny shapes, seconds."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import packing
from sample import Context, generate_image
from test_smoke import TINY, TOKENS, golden_batch, patchify_image, tiny_bagel

SHIFT = 3.0  # s != 1, so the shift formula is not the identity
TOL = 1e-5  # fp32 model against a float64 reference


def shifted(raw: torch.Tensor, s: float) -> torch.Tensor:
    """Training timesteps: logit-normal t = sigmoid(raw), then t -> s*t / (1 + (s-1)*t).
    Clean latents carry raw = -inf, so t = 0."""
    t = 1 / (1 + torch.exp(-raw.double()))
    return s * t / (1 + (s - 1) * t)


def dit_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """DiT timestep features of t in [0, 1] (not x1000): frequencies 10000^(-k/half), k < half;
    the COS block first, then the SIN block."""
    half = dim // 2
    f = torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=torch.float64)
    a = t.double()[:, None] * f[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


def sincos_pos(r: int, c: int, dim: int) -> torch.Tensor:
    """MAE 2D sin-cos position of grid cell (row r, column c): the column's half first, each half
    sines then cosines at frequencies 10000^(-k/(dim/4))."""
    def half(x):
        w = torch.tensor([10000.0 ** (-k / (dim // 4)) for k in range(dim // 4)], dtype=torch.float64)
        return torch.cat([torch.sin(x * w), torch.cos(x * w)])
    return torch.cat([half(c), half(r)])


def linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return x.double() @ lin.weight.double().T + lin.bias.double()


def llm_io(model, run):
    """Call run(); return (what the LLM trunk received, what it returned, run's result)."""
    got = {}
    hooks = [model.language_model.model.register_forward_pre_hook(lambda m, a: got.update(x=a[0])),
             model.language_model.model.register_forward_hook(lambda m, a, o: got.update(h=o))]
    try:
        res = run()
    finally:
        for h in hooks:
            h.remove()
    return got["x"], got["h"], res


@torch.no_grad()
def test_flow_matching_loss_from_the_formulas():
    """Bagel.forward's per-token MSE on a pack with a T2I target, an edit's clean condition and its
    target, at a timestep shift of 3: the LLM input of every VAE token and the loss equal the
    formulas. Catches a flipped velocity sign (x0 - eps), sin/cos swapped in the timestep
    features, and an inverted shift (each planted alone failed it)."""
    cfg = dataclasses.replace(TINY, timestep_shift=SHIFT)
    model = tiny_bagel(config=cfg)
    b = golden_batch("case6_pack")  # VAE images: T2I target 2x3, edit clean 2x4, edit target 2x4
    shapes = [tuple(s) for s in b["patchified_vae_latent_shapes"]]
    raw_per_image = [0.4, -math.inf, -1.1]
    raw = torch.cat([torch.full((h * w,), r) for r, (h, w) in zip(raw_per_image, shapes)])
    b["packed_timesteps"] = raw
    x_in, h_out, out = llm_io(model, lambda: model(**b))

    x0 = torch.cat([patchify_image(z[:, :2 * h, :2 * w], 2) for z, (h, w) in zip(b["padded_latent"], shapes)]).double()
    eps = b["packed_noise"].double()
    t = shifted(raw, SHIFT)[:, None]
    assert t[0, 0] != 1 / (1 + math.exp(-0.4))  # the shift is not the identity here
    xt = (1 - t) * x0 + t * eps
    te = model.time_embedder.mlp
    temb = linear(F.silu(linear(dit_features(t[:, 0]), te[0])), te[2])
    side, d = cfg.max_latent_size, cfg.llm.hidden_size
    pos = torch.stack([sincos_pos(r, c, d) for h, w in shapes for r in range(h) for c in range(w)])
    want_in = linear(xt, model.vae2llm) + temb + pos
    torch.testing.assert_close(x_in[b["packed_vae_token_indexes"]].double(), want_in, rtol=TOL, atol=TOL)
    assert b["packed_latent_position_ids"].tolist() == [r * side + c for h, w in shapes for r in range(h) for c in range(w)]

    noisy = t[:, 0] > 0
    target = (eps - x0)[noisy]  # the velocity d x_t / d t: towards the noise
    pred = linear(h_out[b["mse_loss_indexes"]], model.llm2vae)
    err_in = (x_in[b["packed_vae_token_indexes"]].double() - want_in).abs().max().item()
    print(f"flow from the formulas: max |err| LLM input {err_in:.1e}, MSE {(out['mse'] - (pred - target) ** 2).abs().max():.1e}")
    torch.testing.assert_close(out["mse"].double(), (pred - target) ** 2, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out["mse_t"].double(), t[noisy, 0], rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# image inference = training

GEO = packing.Geometry(vit_patch=14, vit_side=TINY.vit_max_num_patch_per_side, latent_down=16,
                       max_latent=TINY.max_latent_size)


def record_velocities(model, run) -> list[tuple[torch.Tensor, float, torch.Tensor]]:
    """Call run(); for each latent block the generation head sees: (latent tokens entering vae2llm,
    its timestep, the velocity leaving llm2vae for its tokens)."""
    xs, ts, vs = [], [], []
    hooks = [model.vae2llm.register_forward_pre_hook(lambda m, a: xs.append(a[0].clone())),
             model.time_embedder.register_forward_pre_hook(lambda m, a: ts.append(float(a[0][0]))),
             model.llm2vae.register_forward_hook(lambda m, a, o: vs.append(o.clone()))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return list(zip(xs, ts, vs))


def unpatchify(x: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
    """Inverse of patchify_image: [h*w, p*p*C] tokens in (py, px, c) order -> latent [C, p*h, p*w]."""
    return x.reshape(h, w, p, p, -1).permute(4, 0, 2, 1, 3).reshape(-1, p * h, p * w)


@torch.no_grad()
def test_image_inference_equals_the_training_forward():
    """For a T2I prompt and for an edit (clean VAE latent + ViT image + instruction), the velocity
    generate_image computes for its noisy latent at t = 1 and at t = shift(0.5) equals the packed
    training forward's prediction for the same tokens (both samples in one pack, laid out by
    packing.layout_sample as the data pipeline does). Catches a wrong latent position id, timestep,
    RoPE id, marker or expert routing in Context's latent block."""
    model = tiny_bagel()
    g = torch.Generator().manual_seed(0)
    caption, instruction = [70, 71, 72], [73, 74]
    clean = torch.randn(16, 4, 4, generator=g)  # the edit's input image, as a VAE latent (32x32 px)
    vit_img = torch.rand(3, 28, 42, generator=g) * 2 - 1

    t2i = Context(model, TOKENS)
    t2i.add_text(caption)
    edit = Context(model, TOKENS)
    edit.add_vae_image(clean)
    edit.add_vit_image(*packing.vit_tokens(vit_img, 14, GEO.vit_side))
    edit.add_text(instruction)
    calls = []
    for ctx, (hh, ww) in ((t2i, (32, 48)), (edit, (32, 32))):
        calls.append(record_velocities(model, lambda: generate_image(
            ctx, None, hh, ww, steps=3, timestep_shift=2.0, generator=torch.Generator().manual_seed(1))))
    assert [[t for _, t, _ in c] for c in calls] == [pytest.approx([1.0, 2 / 3])] * 2  # shift(0.5) = 2*0.5 / 1.5

    text = lambda ids: dict(type="text", ids=ids, loss=0, enable_cfg=1)
    vae = lambda h, w, loss: dict(type="vae_image", image=torch.zeros(3, 16 * h, 16 * w), loss=loss, enable_cfg=1 - loss)
    samples = [[text(caption), vae(2, 3, 1)],
               [vae(2, 2, 0), dict(type="vit_image", image=vit_img, loss=0, enable_cfg=1), text(instruction), vae(2, 2, 1)]]
    lays = [packing.layout_sample(s, packing.SpecialTokens(**TOKENS), GEO) for s in samples]
    for step in range(2):
        (x1, t, v1), (x2, _, v2) = calls[0][step], calls[1][step]
        # train at the same t with x0 = eps = the sampler's latent, so x_t is that latent
        raw = torch.tensor([math.log(t / (1 - t)) if t < 1 else math.inf] * 2)
        b = packing.collate(lays, timesteps=raw, geo=GEO)
        b.pop("padded_images")
        b["padded_latent"] = torch.zeros(3, 16, 4, 6)
        for i, lat in enumerate([unpatchify(x1, 2, 3), clean, unpatchify(x2, 2, 2)]):
            b["padded_latent"][i, :, :lat.shape[1], :lat.shape[2]] = lat
        b["packed_noise"] = torch.cat([x1, torch.zeros(4, 64), x2])
        (_, _, pred), = record_velocities(model, lambda: model(**b))
        want = torch.cat([v1, v2])
        assert not torch.allclose(v1[:4], v2)  # the two samples differ: a mix-up would show
        print(f"inference vs training at t={t:.3f}: max |velocity err| {(pred - want).abs().max():.1e}")
        torch.testing.assert_close(pred, want, rtol=TOL, atol=TOL)


@torch.no_grad()
def test_bf16_model_keeps_latents_noise_and_timesteps_fp32():
    """A bf16 model: t, x_t and the velocity target are computed in fp32 from the fp32 latents and
    noise; only x_t's projection input is cast. Catches latents, noise or timesteps cast to the
    model dtype first (t off by ~1e-3, the target by a bf16 rounding)."""
    model = tiny_bagel().to(torch.bfloat16)
    b = golden_batch("case3_t2i")
    shapes = [tuple(s) for s in b["patchified_vae_latent_shapes"]]
    got = {}
    hooks = [model.vae2llm.register_forward_pre_hook(lambda m, a: got.update(x=a[0])),
             model.llm2vae.register_forward_hook(lambda m, a, o: got.update(v=o))]
    out = model(**b)
    for h in hooks:
        h.remove()
    x0 = torch.cat([patchify_image(z[:, :2 * h, :2 * w], 2) for z, (h, w) in zip(b["padded_latent"], shapes)])
    eps = b["packed_noise"]
    t = torch.sigmoid(b["packed_timesteps"])  # fp32, shift 1
    target = eps - x0
    assert out["mse"].dtype == out["mse_t"].dtype == torch.float32
    torch.testing.assert_close(out["mse_t"], t, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["x"].float(), ((1 - t[:, None]) * x0 + t[:, None] * eps).bfloat16().float(),
                               rtol=2 ** -8, atol=0)  # at most one bf16 rounding step apart
    want = (got["v"].float() - target) ** 2
    torch.testing.assert_close(out["mse"], want, rtol=1e-6, atol=1e-6)
    rounded = (got["v"].float() - target.bfloat16().float()) ** 2
    assert not torch.allclose(rounded, want, rtol=1e-6, atol=1e-6)  # the check can tell the two apart
