"""Use a BAGEL checkpoint (official or HF layout, e.g. an export of convert_weights.py): answer a
question about an image, draw prompts, or edit an image, as the reference inferencer does (DESIGN.md#inference).

    python sample.py --model /data/BAGEL-7B-MoT --prompt "a red fox in snow" --output fox.png
    python sample.py --model out/export --image cat.jpg --prompt "make the cat black" --output black.png
    python sample.py --model out/export --image cat.jpg --question "What is on the table?"
    python sample.py --model out/export --prompt "a poster for a jazz night" --think
    python sample.py --model /data/BAGEL-7B-MoT --adapter out/adapter --prompt "a red fox"  # LoRA, unmerged

A training checkpoint (output_dir/step-N/) is converted first: python convert_weights.py --model step-N --output-dir export.
Images are sized as in training (data.transform), by the run's sizes that the export records (image_sizes.json).
Guidance defaults follow the task, as upstream: text-to-image cfg text 4, image 1, interval (0.4, 1],
global renorm; editing cfg text 4, image 2, interval (0, 1], text_channel renorm.
"""
import copy
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from PIL import Image
from torch.nn.attention.bias import causal_lower_right

import data as data_lib
import nsa
import packing
from model import (AutoEncoder, Bagel, add_lora, checkpoint_index, patchify_latent, read_config, resolve,
                   shift_timesteps, unpatchify_latent)

# -------------------------------------------------------------------------------------------------
# inference (DESIGN.md#inference): a KV-cached context, text decoding, flow sampling with text CFG

class Context:
    """A conversation prefix held as a KV cache (keys/values after QK-norm and RoPE, per layer).

    `tokens` maps the names bos, eos, vision_start, vision_end to ids (looked up in the tokenizer by
    the caller: <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>)."""

    def __init__(self, model: Bagel, tokens: dict[str, int]):
        self.model, self.tokens = model, tokens
        self.kv: list = [None] * model.config.llm.num_hidden_layers
        self.rope = 0  # next RoPE id (DESIGN.md#inference)
        self.splits: list[tuple[int, str]] = []  # (length, attn mode) of the cached blocks
        self.dev = model.language_model.lm_head.weight.device

    def run(self, seq, pos, gen_rows, mode: str, update: bool = True, extend: bool = False):
        """Run block `seq` [n, hidden] after the cache as one more split of mode "causal" | "full" |
        "noise" (a target being generated), or with `extend` as the continuation of the last cached
        split (a decoded token: the answer is one split, as in the packed sample); it sees the cached
        splits and itself as `packing.allowed` says. `gen_rows`: rows routed to the generation
        expert. Returns normed hidden [n, hidden]."""
        new, size = [], seq.shape[0]
        splits = self.splits[:-1] + [(self.splits[-1][0] + size, mode)] if extend else self.splits + [(size, mode)]
        lens, modes = [n for n, _ in splits], [m for _, m in splits]
        table = packing.split_table([0] * len(splits), [packing.MODE_IDS[m] for m in modes])
        if table[:-1, -1].any():
            raise ValueError(f"packing.allowed lets earlier splits see a later one ({mode}): a KV cache cannot "
                             "hold that context; run it as one packed forward")
        # the keys of the splits the block sees (None: all), its own last (the lower-right causal mask)
        seen, causal = table[-1] != packing.SEE_NONE, table[-1, -1] == packing.SEE_CAUSAL
        sel = None if seen.all() else torch.cat([torch.arange(e - n, e) for n, e, s in zip(lens, np.cumsum(lens), seen)
                                                 if s]).to(self.dev)
        if self.model.config.nsa is not None:  # NSA's plan of the context: once per block, not per layer
            lay = nsa.plan([sum(lens)], lens, modes, self.dev)

        def attend(i, q, k, v, extra=None):
            cur = (k, v) if extra is None else (k, v, extra.k_raw, extra.cos, extra.sin)  # NSA caches 3 more
            if self.kv[i] is not None:
                cur = tuple(torch.cat([a, b]) for a, b in zip(self.kv[i], cur))
            new.append(cur)
            k, v = cur[:2]
            if extra is not None:  # the training NSA over the whole context, this block's queries
                return nsa.attend_context(q, cur, extra, lay)
            if sel is not None:
                k, v = k[sel], v[sel]
            mask = causal_lower_right(q.shape[0], k.shape[0]) if causal and q.shape[0] > 1 else None
            qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)

        gen = torch.as_tensor(gen_rows, dtype=torch.long, device=self.dev)
        is_gen = torch.zeros(seq.shape[0], dtype=torch.bool, device=self.dev)
        is_gen[gen] = True
        und = torch.nonzero(~is_gen).squeeze(1)
        h = self.model.language_model.model(seq, pos, und, gen, attend)
        if update:
            self.kv, self.splits = new, splits
        return h

    def fork(self) -> "Context":
        """A copy that can grow on its own (the cached tensors are shared: they are never modified)."""
        c = copy.copy(self)
        c.kv, c.splits = list(self.kv), list(self.splits)
        return c

    def _embed(self, ids):
        return self.model.language_model.model.embed_tokens(torch.tensor(ids, device=self.dev))

    @torch.no_grad()
    def add_text(self, ids: list[int]):
        """`<|im_start|> text <|im_end|>`, causal, consecutive RoPE ids."""
        ids = [self.tokens["bos"]] + list(ids) + [self.tokens["eos"]]
        self.run(self._embed(ids), torch.arange(self.rope, self.rope + len(ids), device=self.dev), [], "causal")
        self.rope += len(ids)

    @torch.no_grad()
    def add_vit_image(self, patches: torch.Tensor, pos_ids: torch.Tensor):
        """An understanding image: patchified pixels [n, 3*p*p] and their ids r*side+c (see data.py)."""
        m, t = self.model, self.tokens
        dtype = m.connector.fc1.weight.dtype
        x = m.vit_model.vision_model(patches.to(self.dev, dtype), pos_ids.to(self.dev), [patches.shape[0]])
        x = m.connector(x) + m.vit_pos_embed(pos_ids.to(self.dev)).to(dtype)
        seq = torch.cat([self._embed([t["vision_start"]]), x, self._embed([t["vision_end"]])])
        self.run(seq, torch.full((seq.shape[0],), self.rope, device=self.dev), [], "full")
        self.rope += 1  # one RoPE id per image, markers included (DESIGN.md#positions)

    def _latent_block(self, x, t, h: int, w: int):
        """[vision_start, h*w latent tokens, vision_end] embedded at time t (DESIGN.md#flow)."""
        m, tok = self.model, self.tokens
        dtype = m.vae2llm.weight.dtype
        ids = (torch.arange(h, device=self.dev)[:, None] * m.config.max_latent_size + torch.arange(w, device=self.dev)).flatten()
        tt = torch.full((h * w,), float(t), device=self.dev)
        lat = m.vae2llm(x.to(dtype)) + m.time_embedder(tt).to(dtype) + m.latent_pos_embed(ids).to(dtype)
        return torch.cat([self._embed([tok["vision_start"]]), lat, self._embed([tok["vision_end"]])])

    @torch.no_grad()
    def add_vae_image(self, latent: torch.Tensor):
        """A clean conditioning image (editing): VAE latent [z, H/8, W/8], gen expert, t = 0 (DESIGN.md#flow)."""
        p = self.model.config.latent_patch_size
        h, w = latent.shape[1] // p, latent.shape[2] // p
        seq = self._latent_block(patchify_latent(latent.to(self.dev), h, w, p), 0.0, h, w)
        self.run(seq, torch.full((seq.shape[0],), self.rope, device=self.dev), list(range(1, h * w + 1)), "full")
        self.rope += 1


@torch.no_grad()
def generate_text(ctx: Context, max_new_tokens: int = 64, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> list[int]:
    """Decode after `ctx` (DESIGN.md#inference): start with <|im_start|>, greedy when temperature is 0, stop at
    <|im_end|>. The answer is appended to the context, so a conversation can go on."""
    m, tok, out = ctx.model, ctx.tokens, []
    cur = tok["bos"]
    for i in range(max_new_tokens):
        h = ctx.run(ctx._embed([cur]), torch.tensor([ctx.rope], device=ctx.dev), [], "causal", extend=i > 0)
        logits = m.language_model.lm_head(h[-1]).float()
        ctx.rope += 1
        if temperature > 0:
            if generator is None:
                raise ValueError("temperature > 0 needs a torch.Generator (reproducible sampling)")
            cur = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        else:
            cur = int(logits.argmax())
        if cur == tok["eos"]:
            break
        out.append(cur)
    return out


@torch.no_grad()
def generate_image(ctx: Context, cfg_ctx: Context | None, height: int, width: int, steps: int = 50,
                   timestep_shift: float = 3.0, cfg_text_scale: float = 4.0,
                   cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm_min: float = 0.0, *,
                   generator: torch.Generator, cfg_img_ctx: Context | None = None, cfg_img_scale: float = 1.0,
                   cfg_renorm_type: str = "global") -> torch.Tensor:
    """Rectified-flow sampling from t=1 (noise) to 0 (DESIGN.md#inference) -> VAE latent [z, height/8, width/8].

    `cfg_ctx` is the conversation without its last text (for T2I: an empty Context), `cfg_img_ctx`
    the conversation without its images (editing). Guidance applies while t is inside cfg_interval
    and, as in the reference, only when cfg_text_scale > 1 (image CFG included). cfg_renorm_type:
    "global" / "channel" rescale the guided velocity to at most the norm of the conditional one
    (over everything / per token); "text_channel" renormalises the text-guided velocity per token,
    then applies image CFG on top (the reference's editing default)."""
    if cfg_renorm_type not in ("global", "channel", "text_channel"):
        raise ValueError(f"cfg_renorm_type {cfg_renorm_type!r}: expected global, channel or text_channel")
    m = ctx.model
    c, ds = m.config, m.config.latent_patch_size * m.config.vae.downsample
    if height % ds or width % ds or max(height, width) // ds > c.max_latent_size:
        raise ValueError(f"image size {height}x{width}: must be multiples of {ds} and at most "
                         f"{c.max_latent_size * ds} px per side (max_latent_size={c.max_latent_size})")
    h, w = height // ds, width // ds
    x = torch.randn(h * w, c.latent_channels, generator=generator, device=generator.device).to(ctx.dev)
    ts = shift_timesteps(torch.linspace(1, 0, steps), timestep_shift)
    gen_rows = list(range(1, h * w + 1))

    def velocity(cx, t):
        pos_c = torch.full((h * w + 2,), cx.rope, device=ctx.dev)  # the image takes the next RoPE id
        hid = cx.run(cx._latent_block(x, t, h, w), pos_c, gen_rows, "noise", update=False)
        return m.llm2vae(hid[1:-1]).float()

    def renorm(v, ref, per_token: bool):
        dim = dict(dim=-1, keepdim=True) if per_token else {}
        return v * (ref.norm(**dim) / (v.norm(**dim) + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)

    for i in range(steps - 1):
        t, dt = float(ts[i]), float(ts[i] - ts[i + 1])
        v = velocity(ctx, t)
        if cfg_ctx is not None and cfg_text_scale > 1.0 and cfg_interval[0] < t <= cfg_interval[1]:
            v_txt0 = velocity(cfg_ctx, t)
            v_img0 = velocity(cfg_img_ctx, t) if cfg_img_ctx is not None and cfg_img_scale > 1.0 else None
            guided = v_txt0 + cfg_text_scale * (v - v_txt0)
            if cfg_renorm_type == "text_channel":
                guided = renorm(guided, v, per_token=True)
            if v_img0 is not None:
                guided = v_img0 + cfg_img_scale * (guided - v_img0)
            v = guided if cfg_renorm_type == "text_channel" else renorm(guided, v, cfg_renorm_type == "channel")
        x = x - v * dt  # v = eps - x0 points towards noise; step towards data
    return unpatchify_latent(x, h, w, c.latent_patch_size)


@torch.no_grad()
def latent_to_pil(ae: AutoEncoder, latent: torch.Tensor):
    """Decode one latent [z, H/8, W/8] to a PIL image."""
    img = (ae.decode(latent[None].to(next(ae.parameters()).dtype)) * 0.5 + 0.5).clamp(0, 1)[0]
    return Image.fromarray((img.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8))


# -------------------------------------------------------------------------------------------------
# the command line


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
    """a LoRA adapter folder (convert_weights.py --model STEP --output-dir DIR --lora-only) applied unmerged on top of --model"""
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
    output: str = "sample.png"
    """the image drawn"""
    size: int | None = None
    """text-to-image height and width in pixels: a multiple of the model's latent stride (VAE downsampling x
    latent patch, 16 for BAGEL-7B-MoT) and at most its max_latent_size strides (1024 px for BAGEL-7B-MoT).
    Default: the largest the model was trained to draw (its run's --data.vae-max-size within that limit).
    Edits keep the input's size"""
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
    device: str = "auto"
    """auto: cuda when available, else cpu (as train.py's --device); or a torch device such as cuda:1"""
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
        raise packing.UserError(f"--adapter {folder}: not a LoRA adapter folder ({type(e).__name__}: {e})") from None
    parts = {k: cfg.get(k) for k in ("visual_und", "visual_gen")}
    if check_base and (crc := base_crc32(model, base, parts)) != want_crc:
        raise packing.UserError(f"--adapter {folder} was trained on {trained_on}, whose weights have CRC-32 "
                         f"{want_crc}, but the weights of --model {base} have {crc}: use the base it was trained on "
                         f"(--no-check-base to run it anyway)")
    names = add_lora(model, cfg["rank"], cfg["alpha"], 0.0, cfg["targets"], cfg["vit"])
    dev = model.language_model.lm_head.weight.device
    want = {n + s for n in names for s in (".lora_a", ".lora_b")}
    if set(weights) != want:
        bad = sorted(set(weights) ^ want)
        raise packing.UserError(f"--adapter {folder}: adapter.safetensors does not match adapter_config.json "
                         f"on --model {base}: {len(bad)} keys differ, e.g. {bad[0]}")
    for k, v in weights.items():  # kept fp32: the adapter's forward casts its input to them
        model.get_parameter(k).data = v.to(dev)
    print(f"adapter {folder}: rank {cfg['rank']}, alpha {cfg['alpha']}, {cfg['targets']} targets, {len(names)} layers")


def trained_sizes(model: str, adapter: str) -> dict | None:
    """The image sizes of the run that trained --adapter (its adapter_config.json) or --model (the export's
    image_sizes.json); None when not recorded."""
    file = os.path.join(adapter, "adapter_config.json") if adapter else os.path.join(model, data_lib.IMAGE_SIZES)
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f).get("image_sizes") if adapter else json.load(f)


def main(argv: list[str] | None = None) -> dict:
    """The command line; a user error ends it with one `error:` line."""
    a = tyro.cli(Args, args=argv)
    try:
        return run(a)
    except packing.UserError as e:
        raise SystemExit(f"error: {e}") from None


def run(a: Args) -> dict:
    if not (a.prompt or a.question):
        raise packing.UserError("give --prompt (draw / edit) or --question (answer)")
    if a.prompt and a.question:
        raise packing.UserError("--prompt draws or edits, --question answers: give one of them")
    if a.image:  # before the model loads: a typo costs a second, not the load
        try:
            Image.open(a.image).verify()
        except OSError as e:
            raise packing.UserError(f"--image {a.image}: cannot read the image ({e.strerror or e})") from None
    a.model = resolve(a.model)
    if os.path.exists(os.path.join(a.model, "meta.json")):
        raise packing.UserError(f"--model {a.model} is a training checkpoint: export it first with "
                                f"python convert_weights.py --model {a.model} --output-dir EXPORT_DIR")
    try:
        c = read_config(a.model)
    except FileNotFoundError as e:
        raise packing.UserError(f"--model {e}") from None
    if a.prompt and not c.visual_gen:
        raise packing.UserError(f"--model {a.model} has no generation part (visual_gen false in its config): it cannot draw")
    if a.image and a.question and not c.visual_und:
        raise packing.UserError(f"--model {a.model} has no ViT (visual_und false in its config): it cannot see --image")
    trained = trained_sizes(a.model, a.adapter)
    geo = data_lib.sampling_config(c, trained)  # images are sized by training's rule (data.transform) and sizes
    if a.size is None:
        a.size = geo.vae_max_size // geo.latent_downsample * geo.latent_downsample
    if a.prompt and not a.image and (why := data_lib.draw_size_problem("--size", a.size, c)):
        raise packing.UserError(why)
    edit = bool(a.image and a.prompt)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    t0 = time.time()
    model = Bagel.from_pretrained(a.model, dtype=dtype, device=dev).eval()
    if a.adapter:
        load_adapter(model, a.adapter, a.model, a.check_base)
    ae = AutoEncoder.from_pretrained(a.model, dtype=dtype, device=dev).eval()
    tok = data_lib.load_tokenizer(a.model)
    tokens = asdict(data_lib.special_tokens(tok))
    print(f"loaded {a.model} in {time.time() - t0:.1f}s ({dev}, {a.dtype}); images sized as "
          f"{'its training run' if trained else 'the training defaults'}: ViT {geo.vit_min_size}-{geo.vit_max_size} px, "
          f"VAE {geo.vae_min_size}-{geo.vae_max_size} px")

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
            x = data_lib.transform(img, "edit_vit" if edit else "vit", geo, 1, a.image)  # as training sizes them
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
    latent_to_pil(ae, lat.float()).save(a.output)
    print(f"wrote {a.output} ({size[1]}x{size[0]}) in {time.time() - t0:.1f}s")
    return result | {"image": a.output}


if __name__ == "__main__":
    main()
