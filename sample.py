"""Use a BAGEL checkpoint (official or HF layout, e.g. an export of convert_weights.py): answer a
question about an image, draw prompts, or edit an image, as the reference inferencer does (DESIGN.md#inference).

    python sample.py --model /data/BAGEL-7B-MoT --prompt "a red fox in snow" --out fox.png
    python sample.py --model out/export --image cat.jpg --prompt "make the cat black" --out black.png
    python sample.py --model out/export --image cat.jpg --question "What is on the table?"
    python sample.py --model out/export --prompt "a poster for a jazz night" --think
    python sample.py --model /data/BAGEL-7B-MoT --adapter out/adapter --prompt "a red fox"  # LoRA, unmerged

A training checkpoint (output_dir/step-N/) is converted first: python convert_weights.py step-N export.
Guidance defaults follow the task, as upstream: text-to-image cfg text 4, image 1, interval (0.4, 1],
global renorm; editing cfg text 4, image 2, interval (0, 1], text_channel renorm.
"""
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import tyro
from PIL import Image

import data as data_lib
import packing
from model import (AutoEncoder, Bagel, Context, add_lora, checkpoint_index, generate_image, generate_text,
                   latent_to_pil, resolve)

# the reference inferencer's think-mode system prompts (the released model was trained with them)
THINK_UND = ("You should first think about the reasoning process in the mind and then provide the user with the "
             "answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning "
             "process here </think> answer here")
THINK_GEN = ("You should first think about the planning process in the mind and then generate the image. \nThe "
             "planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
             "</think> image here")


@dataclass
class Args:
    model: str
    """checkpoint directory (official or HF layout), or a Hugging Face Hub id (ORG/NAME)"""
    adapter: str = ""
    """a LoRA adapter folder (convert_weights.py STEP DIR --lora-only) applied unmerged on top of --model"""
    check_base: bool = True
    """with --adapter: stop unless --model holds the weights the adapter was trained on (the CRC-32 of
    their bytes, recorded in adapter_config.json; reads the base once more, ~20 s for BAGEL-7B)"""
    prompt: str = ""
    """what to draw, or the edit instruction when --image is given"""
    image: str = ""
    """input image: edited with --prompt, or asked about with --question"""
    question: str = ""
    """ask about --image (or a text-only question without it): prints the answer"""
    think: bool = False
    """let the model write its reasoning / plan first (the reference's think mode)"""
    out: str = "sample.png"
    size: int = 1024
    """text-to-image height and width in pixels (multiple of 16); edits keep the input's size"""
    steps: int = 50
    cfg_text_scale: float = 4.0
    cfg_img_scale: float | None = None
    """image guidance when editing (default 2.0; 1.0 for text-to-image, where it has no effect)"""
    cfg_interval: tuple[float, float] | None = None
    """timesteps (lo, hi] that get guidance (default (0.4, 1.0) for text-to-image, (0.0, 1.0) for edits)"""
    cfg_renorm_type: Literal["global", "channel", "text_channel"] | None = None
    """default global for text-to-image, text_channel for edits"""
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0: greedy text"""
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: Literal["bf16", "fp32"] = "bf16" if torch.cuda.is_available() else "fp32"


def base_crc32(model: Bagel, path: str, parts: dict | None = None) -> str:
    """CRC-32 of the stored bytes of every weight of `path` that `model` loads (adapters are no base
    weights), in the model's parameter order: what a LoRA run records of its frozen base
    (fsdp.load_pretrained), whatever the folder's name, layout or the dtype sampled in. `parts`: the
    run's visual_und / visual_gen; a part it switched off held no weights of its record."""
    from convert_weights import safetensors_sources
    index = checkpoint_index(path)[0]
    off = {k: v for k, v in (parts or {}).items() if v is not None}
    with torch.device("meta"):  # the names of the training run's model
        names = {k for k, _ in Bagel(replace(model.config, **off)).named_parameters()} if off else None
    sources = safetensors_sources({k: index[k] for k, _ in model.named_parameters()
                                   if k in index and (names is None or k in names)})
    crc = 0
    for k in sources:
        crc = zlib.crc32(sources[k].read().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def load_adapter(model: Bagel, folder: str, base: str, check_base: bool = True):
    """Add the LoRA adapters of `folder` (adapter_config.json + adapter.safetensors) to `model`, strictly.
    An adapter is a change to one set of weights: on another base it computes what nobody trained, with
    no error to show it, so a base whose bytes differ from the training run's stops here (a moved or
    renamed copy of the same base passes)."""
    from safetensors.torch import load_file
    try:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            cfg = json.load(f)
        weights = load_file(os.path.join(folder, "adapter.safetensors"))
        trained_on, want_crc = cfg["base"], cfg["base_frozen_crc32"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"sample.py: --adapter {folder}: not a LoRA adapter folder ({type(e).__name__}: {e})") from None
    parts = {k: cfg.get(k) for k in ("visual_und", "visual_gen")}
    if check_base and (crc := base_crc32(model, base, parts)) != want_crc:
        raise SystemExit(f"sample.py: --adapter {folder} was trained on {trained_on}, whose weights have CRC-32 "
                         f"{want_crc}, but the weights of --model {base} have {crc}: use the base it was trained on "
                         f"(--no-check-base to run it anyway)")
    names = add_lora(model, cfg["rank"], cfg["alpha"], 0.0, cfg["targets"], cfg["vit"])
    dev = model.language_model.lm_head.weight.device
    want = {n + s for n in names for s in (".lora_a", ".lora_b")}
    if set(weights) != want:
        bad = sorted(set(weights) ^ want)
        raise SystemExit(f"sample.py: --adapter {folder}: adapter.safetensors does not match adapter_config.json "
                         f"on --model {base}: {len(bad)} keys differ, e.g. {bad[0]}")
    for k, v in weights.items():  # kept fp32: the adapter's forward casts its input to them
        model.get_parameter(k).data = v.to(dev)
    print(f"adapter {folder}: rank {cfg['rank']}, alpha {cfg['alpha']}, {cfg['targets']} targets, {len(names)} layers")


def main(argv: list[str] | None = None) -> dict:
    a = tyro.cli(Args, args=argv)
    if not (a.prompt or a.question):
        raise SystemExit("sample.py: give --prompt (draw / edit) or --question (answer)")
    if a.prompt and a.question:
        raise SystemExit("sample.py: --prompt draws or edits, --question answers: give one of them")
    try:
        a.model = resolve(a.model)
    except FileNotFoundError as e:
        raise SystemExit(f"sample.py: {e}") from None
    if os.path.exists(os.path.join(a.model, "meta.json")):
        raise SystemExit(f"sample.py: {a.model} is a training checkpoint: export it first with "
                         f"python convert_weights.py {a.model} EXPORT_DIR --to official")
    edit = bool(a.image and a.prompt)
    dev, dtype = torch.device(a.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    t0 = time.time()
    model = Bagel.from_pretrained(a.model, dtype=dtype, device=dev).eval()
    if a.adapter:
        load_adapter(model, a.adapter, a.model, a.check_base)
    if a.prompt and not model.config.visual_gen:
        raise SystemExit(f"sample.py: {a.model} has no generation part (visual_gen false in its config): it cannot draw")
    if a.image and a.question and not model.config.visual_und:
        raise SystemExit(f"sample.py: {a.model} has no ViT (visual_und false in its config): it cannot see --image")
    ae = AutoEncoder.from_pretrained(a.model, dtype=dtype, device=dev).eval()
    tok = data_lib.load_tokenizer(a.model)
    tokens = asdict(data_lib.special_tokens(tok))
    # the reference's inference transforms, VAE 512-1024 px (stride 16) and ViT 224-980 px (stride
    # 14), capped at what the model's position tables hold (smaller models, the demo)
    c = model.config
    vae_max, vit_max = min(1024, c.max_latent_size * 16), min(980, c.vit_max_num_patch_per_side * c.vit.patch_size)
    geo = data_lib.match_model(data_lib.DataConfig(vae_max_size=vae_max, vae_min_size=min(512, vae_max),
                                                   vit_max_size=vit_max, vit_min_size=min(224, vit_max)), c)
    print(f"loaded {a.model} in {time.time() - t0:.1f}s ({a.device}, {a.dtype})")

    g = torch.Generator(dev).manual_seed(a.seed)
    ctx = Context(model, tokens)
    if a.think:
        ctx.add_text(data_lib.encode(tok, THINK_UND if a.question else THINK_GEN))
    img_free = ctx.fork()  # the image-CFG branch: everything but the images
    size = (a.size, a.size)
    if a.image:
        img = Image.open(a.image).convert("RGB")
        if edit:  # a clean VAE copy first, then the ViT tokens, as the reference (DESIGN.md#inference)
            x = data_lib.transform(img, "vae", geo, 1, a.image)
            size = tuple(x.shape[1:])
            ctx.add_vae_image(ae.encode(x[None].to(dev, dtype), generator=g)[0])
        if model.config.visual_und:
            x = data_lib.transform(img, "vit", geo, 1, a.image)
            ctx.add_vit_image(*packing.vit_tokens(x, geo.vit_patch_size, geo.vit_max_num_patch_per_side))
    text_free = ctx.fork()  # the text-CFG branch: everything but the last text
    ctx.add_text(data_lib.encode(tok, a.prompt or a.question))
    img_free.add_text(data_lib.encode(tok, a.prompt or a.question))
    result = {}
    if a.question or a.think:
        ids = generate_text(ctx.fork(), a.max_new_tokens, a.temperature, generator=g)
        result["text"] = tok.decode(ids)
        print(result["text"])
        if a.question:
            return result
        ctx.add_text(ids)  # the plan becomes part of the conversation the image is drawn from
    lat = generate_image(ctx, text_free, *size, a.steps, a.timestep_shift, a.cfg_text_scale,
                         a.cfg_interval or ((0.0, 1.0) if edit else (0.4, 1.0)), a.cfg_renorm_min, generator=g,
                         cfg_img_ctx=img_free, cfg_img_scale=a.cfg_img_scale or (2.0 if edit else 1.0),
                         cfg_renorm_type=a.cfg_renorm_type or ("text_channel" if edit else "global"))
    latent_to_pil(ae, lat.float()).save(a.out)
    print(f"wrote {a.out} ({size[1]}x{size[0]}) in {time.time() - t0:.1f}s")
    return result | {"image": a.out}


if __name__ == "__main__":
    main()
