"""The CPU demo that `python train.py` runs when --model is empty: a tiny random BAGEL written in the
official checkpoint layout, and a generated dataset of coloured shapes to fine-tune it on.

train.py knows two things about it: `FLAGS`, the demo's settings, which `train.parse_args` puts before
the command line's own flags (so `python train.py --max-steps 600` overrides one of them), and
`setup`, which writes the checkpoint and the data and points the run at them. From there on the demo
is a normal run: rank-0 load, FSDP2, both losses, DCP checkpoints, samples.
"""
import dataclasses
import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from model import AEConfig, AutoEncoder, Bagel, BagelConfig, LLMConfig, ViTConfig, save_pretrained
from packing import UserError

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
PROMPTS = ("a red circle", "a blue square", "a yellow triangle")
QUESTION = "what shape is this ?"
SIZE = 32  # pixels: 4x4 generated latent patches (demo VAE stride 4, patch 2)
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
VAE_STEPS = 150  # steps of the demo VAE's fit (the tests set 0: a random VAE)
RADIUS = (0.36, 0.40)  # of the side: a shape's half-width (a square's, a circle's radius)

# The demo's settings, as flags: train.parse_args puts them before the command line's own, so the
# command line wins, and every option not named here keeps Args's default.
FLAGS = ["--output-dir", "out/demo", "--max-steps", "300", "--log-every", "20", "--no-activation-checkpointing",
         "--optim.lr", "3e-3", "--optim.warmup-steps", "20", "--optim.schedule", "cosine", "--optim.min-lr", "1e-4",
         "--timestep-shift", "3",  # more of training at the noisy end, where a sample's shape is decided
         "--ckpt.every", "100", "--ckpt.keep-last", "2",
         "--lora.targets", "all",  # with --lora.rank: the demo's base is random, its text needs adapting too
         "--eval.every", "150", "--eval.prompts", *PROMPTS, "--eval.question", QUESTION,
         "--eval.size", str(SIZE), "--eval.steps", "20",
         "--data.packing-length", "384", "--data.num-workers", "0", "--data.vae-max-size", str(SIZE),
         "--data.vae-min-size", "16",
         "--data.vit-max-size", "56", "--data.vit-min-size", "56"]  # 4x4 ViT patches: at 2x2 it named shapes by chance


def setup(args, d):
    """Rank 0 writes the base checkpoint (output_dir/base/) and the data (output_dir/demo_data/),
    once: a rerun finds them; every rank waits for them. Returns the args of the normal run that
    follows: --model and --data point there, and --eval.data / --eval.image default to the held-out
    set, so the question sample asks about another held-out image at each eval."""
    # its ops are too small to split over threads: threads would only wait on each other
    torch.set_num_threads(1)
    if args.data.data:
        raise UserError("--data needs --model (the demo model only knows the demo's words)")
    base, folder = os.path.join(args.output_dir, "base"), os.path.join(args.output_dir, "demo_data")
    if d.rank == 0:
        if not os.path.exists(os.path.join(folder, "val.jsonl")):  # written last
            make_data(folder, seed=args.seed)
        if not os.path.exists(os.path.join(base, "tokenizer.json")):  # written last
            make_checkpoint(base, os.path.join(folder, "images"), args.seed)
    dist.barrier()
    val = os.path.join(folder, "val")
    images = args.eval.image or tuple(os.path.join(val, f) for f in sorted(os.listdir(val)))
    return dataclasses.replace(args, model=os.path.abspath(base),
                               data=dataclasses.replace(args.data, data=(os.path.join(folder, "train.jsonl"),)),
                               eval=dataclasses.replace(args.eval, image=images,
                                                        data=args.eval.data or (os.path.join(folder, "val.jsonl"),)))


def draw_shape(shape: str, colour: str, size: int = SIZE, rng: random.Random | None = None):
    """A coloured shape on white, jittered a little in size (RADIUS) and position (+-3% of the side).
    Large, because a circle differs from a square only in its corners: at radius 0.3 of the side 300
    steps drew the circle as a rounded square. 32 pixels rather than 64: the demo VAE's fit costs a
    quarter, and the model still generates 4x4 latent patches."""
    from PIL import Image, ImageDraw
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    r = size * rng.uniform(*RADIUS)
    cx, cy = (size / 2 + rng.uniform(-0.03, 0.03) * size for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img


def make_data(folder: str, n_images: int = 400, n_val: int = 40, seed: int = 0) -> tuple[str, str]:
    """Shapes and colours with captions (text-to-image) and questions (understanding) -> train.jsonl,
    and `n_val` more drawn the same way into val/ and val.jsonl: held out from training and from the
    VAE fit, for the validation loss and the question samples."""
    rng = random.Random(seed)
    for split, n, first in (("train", n_images, 0), ("val", n_val, n_images)):
        images = "images" if split == "train" else "val"
        os.makedirs(os.path.join(folder, images), exist_ok=True)
        records = []
        for i in range(first, first + n):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            name = f"{images}/{i:05d}.png"
            draw_shape(shape, colour, SIZE, rng).save(os.path.join(folder, name))
            img = {"type": "image_url", "image_url": {"url": name}}
            # the shape question twice as often as the others: the hardest, and the one the samples ask
            q, a = rng.choice([(QUESTION, f"a {shape} ."), (QUESTION, f"a {shape} ."), ("what colour is it ?",
                               f"{colour} ."), ("describe the image .", f"a {colour} {shape} .")])
            records += [{"messages": [{"role": "user", "content": f"a {colour} {shape}"},
                                      {"role": "assistant", "content": [img]}]},
                        {"messages": [{"role": "user", "content": [img, {"type": "text", "text": q}]},
                                      {"role": "assistant", "content": a}]}]
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:  # val.jsonl last: it marks a complete set
            f.writelines(json.dumps(r) + "\n" for r in records)
    return os.path.join(folder, "train.jsonl"), os.path.join(folder, "val.jsonl")


def fit_vae(ae: AutoEncoder, images: str, steps: int, seed: int = 0) -> float:
    """Teach the demo's tiny VAE to reconstruct the shapes (reparameterised sample + a light KL, so
    the posterior samples that training draws keep the picture). The released BAGEL starts from the
    FLUX ae; a random VAE would leave the demo's generated images as noise. Returns the last loss,
    and the shift and scale that take its latents to mean 0 and std 1."""
    from PIL import Image
    files = sorted(os.listdir(images))
    x_all = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(images, f)).convert("RGB"))).permute(2, 0, 1)
                         for f in files]).float() / 127.5 - 1  # [N, 3, H, W]
    # the shape's pixels weigh 4x the white background's. Unweighted, the fit lingers on a white
    # image with a grey blob, and where it leaves that plateau depends on float rounding (the number
    # of threads); weighted, it reconstructs held-out shapes to the same loss on 1 or 2 threads
    weight = 1 + 3 * (x_all < 0.9).any(1, keepdim=True).float()  # [N, 1, H, W]
    # a nearly deterministic posterior, as FLUX's: its std starts at ~0.007, not the random init's
    # ~0.5, which 150 steps would keep and the posterior samples of training would blur the shapes with
    with torch.no_grad():
        ae.encoder.conv_out.bias[ae.config.z_channels:] -= 10  # the logvar half
    g, opt = torch.Generator().manual_seed(seed), torch.optim.Adam(ae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))  # 10 warmup steps
    for _ in range(steps):
        i = torch.randint(0, len(x_all), (8,), generator=g)
        x, w = x_all[i], weight[i]
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        rec = ae.decoder(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g))
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = (w * (rec - x).pow(2)).mean() / w.mean() + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        z = torch.cat([ae.encoder(x).chunk(2, dim=1)[0] for x in x_all.split(64)])  # posterior means
    return loss.item(), z.mean().item(), 1 / z.std().item()


def make_checkpoint(path: str, images: str, seed: int = 0) -> str:
    """A tiny random BAGEL written like a released one (configs, ema.safetensors, ae.safetensors,
    tokenizer.json), so the demo loads, trains and converts through exactly the real code path. Its
    VAE is fitted to the demo's shapes first (`fit_vae`)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    words = sorted({w for s in SHAPES for w in (s, "a", ".", "?")} | set(COLOURS) |
                   set("what shape is this colour it describe the image".split()))
    vocab = {w: i for i, w in enumerate(["<unk>", *words, *SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    config = BagelConfig(
        llm=LLMConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64),
        vit=ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      image_size=112),
        # the FLUX ae's layout with 3 levels (stride 4: 32-pixel images give 8x8 latents, as 64 pixels
        # at FLUX's stride 8) of 32 channels, the fewest its GroupNorm's 32 groups allow
        vae=AEConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=16),
        max_latent_size=8, vit_max_num_patch_per_side=8)
    torch.manual_seed(seed)  # only here, before any training code runs: the demo's random init
    # PyTorch's init throughout, llm2vae too (not upstream's zero, Bagel.init_weights): a frozen zero
    # llm2vae, as in a LoRA run, would pass no MSE gradient to anything
    model, ae = Bagel(config), AutoEncoder(config.vae)
    if VAE_STEPS:
        t0 = time.time()
        loss, shift, scale = fit_vae(ae, images, VAE_STEPS, seed)
        # as FLUX's shift and scale: the flow sees latents of mean 0 and std 1, so at each t it sees as
        # much picture against its noise as a released model does
        vae = dataclasses.replace(config.vae, shift_factor=shift, scale_factor=scale)
        model.config = dataclasses.replace(config, vae=vae)  # save_pretrained writes ae_config.json from it
        print(f"demo VAE fitted to the shapes: {VAE_STEPS} steps, reconstruction loss {loss:.3f}, latent shift "
              f"{shift:.3f} scale {scale:.3f}, {time.time() - t0:.0f}s")
    save_pretrained(path, model, ae)
    tok.save(os.path.join(path, "tokenizer.json"))
    return path
