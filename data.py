"""Training data for BAGEL: records in any common container → checked samples → first-fit packs.

    records (.parquet/.arrow/.json/.jsonl, .yaml mixtures, directories)
      → chat `messages` (the seed guide's format) or upstream T2I rows (`image` + `captions`)
      → a sequence plan per sample (text / ViT image / VAE image items, spec §7.3)
      → packing.layout_sample (tokens, RoPE ids, splits, labels, CFG dropout)
      → packing.FirstFitPacker → packing.collate → the batch `Bagel.forward` takes (spec §8)

The training loop uses `PackLoader(cfg, rank, world_size)`: iterate it for batches, save its
`state_dict()` in checkpoints, `load_state_dict()` to resume exactly, and log `log_line()`.
`python data.py --data x.parquet --model DIR --inspect 2` prints packs in human form.
"""
import base64
import bisect
import binascii
import copy
import io
import json
import math
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import tyro
import yaml
from PIL import Image

import packing
from packing import Geometry, SpecialTokens

DATA_EXTS = (".parquet", ".arrow", ".json", ".jsonl")
HF_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}  # json files in HF save_to_disk dirs
LINES_PER_UNIT = 1024  # json/jsonl rows are shuffled and sharded in units of this many rows
VAE_MAX_PIXELS = 14 * 14 * 9 * 1024  # upstream ImageTransform default (spec §9)
VIT_MAX_PIXELS = 2_007_040  # upstream example.yaml for VLM SFT (spec §9)


@dataclass
class DataConfig:
    # `--data x.parquet` even when nested as train.py's Args.data (not `--data.data`)
    data: Annotated[tuple[str, ...], tyro.conf.arg(name="data", prefix_name=False)] = ()
    """data files, directories or .yaml mixtures; `path:weight` sets a mixture weight (default 1)"""
    model: str = ""
    """checkpoint directory holding the Qwen2.5 tokenizer (tokenizer.json or vocab.json + merges.txt)"""
    packing_length: int = 8192
    """token budget of one pack: text, ViT and VAE tokens and their markers"""
    max_open_packs: int = 8
    """first-fit buffer: how many partly filled packs wait for more samples"""
    min_fill: float = 0.99
    """a pack at least this full is emitted at once"""
    seed: int = 0
    """shuffle, mixture, CFG dropout and timestep draws are all functions of this seed"""
    epochs: int | None = None
    """stop after this many passes over every source (None: stream forever, for step-based training)"""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)"""
    skip_bad: bool = False
    """skip bad records and count them per reason instead of stopping with an error"""
    text_cond_dropout: float = 0.1
    """CFG dropout of conditioning text in generation/edit samples (upstream default, spec §6.5)"""
    vit_cond_dropout: float = 0.3
    """CFG dropout of conditioning ViT images in generation/edit samples"""
    vae_cond_dropout: float = 0.3
    """CFG dropout of clean conditioning VAE images in generation/edit samples"""
    vae_max_size: int = 1024
    vae_min_size: int = 512
    vae_max_pixels: int = VAE_MAX_PIXELS
    vit_max_size: int = 980
    vit_min_size: int = 378
    vit_max_pixels: int = VIT_MAX_PIXELS
    vit_patch_size: int = 14
    """model: SigLIP patch size"""
    vit_max_num_patch_per_side: int = 70
    """model: side of the ViT position table (BAGEL-7B-MoT: 70)"""
    max_latent_size: int = 64
    """model: side of the latent position table (BAGEL-7B-MoT: 64, i.e. 1024 px)"""
    latent_downsample: int = 16
    """model: VAE downsampling (8) times latent patch size (2)"""
    visual_und: bool = True
    """model has the ViT: input images become ViT tokens (set from the model config)"""
    visual_gen: bool = True
    """model has the VAE path: assistant images become generation targets (set from the model config)"""

    def geometry(self) -> Geometry:
        return Geometry(self.vit_patch_size, self.vit_max_num_patch_per_side,
                        self.latent_downsample, self.max_latent_size)

    def check(self):
        """Fail at start-up, with the fix in the message, for settings the model cannot take."""
        if not self.data:
            raise ValueError("no data: pass --data PATH (a file, a directory or a .yaml mixture)")
        for name, size, stride, side, table in (
                ("vit", self.vit_max_size, self.vit_patch_size, self.vit_max_num_patch_per_side,
                 "vit_max_num_patch_per_side"),
                ("vae", self.vae_max_size, self.latent_downsample, self.max_latent_size,
                 "max_latent_size")):
            if round(size / stride) > side:
                raise ValueError(f"{name}_max_size {size} gives {round(size / stride)} tokens per "
                                 f"side, more than the model's {table}={side}: set "
                                 f"{name}_max_size to {side * stride} or less")
            if getattr(self, f"{name}_min_size") > size:
                raise ValueError(f"{name}_min_size is larger than {name}_max_size {size}")
        for p in (self.text_cond_dropout, self.vit_cond_dropout, self.vae_cond_dropout):
            if not 0 <= p <= 1:
                raise ValueError(f"CFG dropout probabilities must be in [0, 1], got {p}")


def match_model(cfg: DataConfig, model_config) -> DataConfig:
    """`cfg` with the model-side fields (patch size, position-table sides, latent stride, switched-off
    parts) taken from a model.BagelConfig, so the data can never disagree with the checkpoint."""
    c = model_config
    return replace(cfg, vit_patch_size=c.vit.patch_size, vit_max_num_patch_per_side=c.vit_max_num_patch_per_side,
                   max_latent_size=c.max_latent_size, latent_downsample=c.vae.downsample * c.latent_patch_size,
                   visual_und=c.visual_und, visual_gen=c.visual_gen)


class BadSample(ValueError):
    """A record we cannot train on. `reason` is the counter name used with skip_bad."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Tokenizer. BAGEL uses the Qwen2.5 tokenizer with no chat template (spec §7.1); ids of the four
# special tokens are looked up by name, so a tokenizer with another numbering still works.

def load_tokenizer(model_dir: str):
    """The tokenizer of a checkpoint directory: tokenizer.json, or vocab.json + merges.txt (+ the
    added tokens of tokenizer_config.json), as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    d = Path(model_dir)
    if (d / "tokenizer.json").exists():
        return Tokenizer.from_file(str(d / "tokenizer.json"))
    if not ((d / "vocab.json").exists() and (d / "merges.txt").exists()):
        raise ValueError(f"{d}: no tokenizer.json and no vocab.json + merges.txt: --model must be a "
                         f"BAGEL checkpoint directory")
    # the slow Qwen2Tokenizer: NFC, Qwen's split regex, byte-level BPE
    tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    cfg_path = d / "tokenizer_config.json"
    added = json.loads(cfg_path.read_text()).get("added_tokens_decoder", {}) if cfg_path.exists() else {}
    for i, t in sorted(added.items(), key=lambda kv: int(kv[0])):
        tok.add_special_tokens([AddedToken(t["content"], special=True, normalized=False)])
        if tok.token_to_id(t["content"]) != int(i):
            raise ValueError(f"{cfg_path}: added token {t['content']!r} should have id {i} but got "
                             f"{tok.token_to_id(t['content'])}; vocab.json does not match")
    return tok


def special_tokens(tok) -> SpecialTokens:
    names = dict(bos="<|im_start|>", eos="<|im_end|>", vision_start="<|vision_start|>",
                 vision_end="<|vision_end|>")
    ids = {k: tok.token_to_id(v) for k, v in names.items()}
    missing = [names[k] for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}: BAGEL needs the Qwen2.5 tokenizer")
    return SpecialTokens(**ids)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids  # no special tokens added (spec §7.1)


# --------------------------------------------------------------------------------------------------
# Images

def load_image(src: Any, folder: str, where: str) -> Image.Image:
    """Decode an image from a path (relative to `folder`), a data: URI, bytes, or an HF datasets
    `{"bytes", "path"}` struct. Returns RGB with transparency composited on white."""
    if isinstance(src, dict):  # HF datasets Image feature: bytes win over path, as in `datasets`
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytearray, memoryview)):
        src = bytes(src)
    if isinstance(src, str):
        if src.startswith(("http://", "https://")):
            raise BadSample("http_url", f"{where}: {src[:80]}: images must be local files or bytes "
                            f"(no network at training time): download them first")
        if src.startswith("data:"):
            try:
                src = base64.b64decode(src.split(",", 1)[1], validate=True)
            except (IndexError, binascii.Error) as e:
                raise BadSample("undecodable_image", f"{where}: bad base64 data URI ({e})") from None
        else:
            path = src[len("file://"):] if src.startswith("file://") else src
            path = os.path.join(folder, path)  # an absolute path ignores folder
            if not os.path.isfile(path):
                raise BadSample("missing_image", f"{where}: image file not found: {path} (relative "
                                f"paths are resolved against data_folder {folder!r})")
            src = path
    elif not isinstance(src, bytes):
        raise BadSample("missing_image", f"{where}: no image (got {type(src).__name__}): expected a "
                        f"path, a data: URI, bytes or a {{bytes, path}} struct")
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img.load()
    except Exception as e:  # PIL raises many types for broken files
        raise BadSample("undecodable_image", f"{where}: cannot decode image: {e}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Composite transparent images on white (upstream `pil_img2rgb`; LMMS Engine skips this and
    turns transparent backgrounds black)."""
    if img.mode in ("RGBA", "LA", "PA") or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


def resize_shape(w: int, h: int, max_size: int, min_size: int, stride: int, max_pixels: int,
                 img_num: int = 1) -> tuple[int, int]:
    """Target (W, H) of upstream `MaxLongEdgeMinShortEdgeResize` (spec §9), quirks included: the
    short edge is pushed up to min_size even past max_size, and the pixel cap scales the sides by
    the area ratio (not its square root). The released model was trained on these sizes."""
    def mk(v):
        return max(stride, int(round(v / stride) * stride))

    def apply(w, h, s):
        return mk(round(w * s)), mk(round(h * s))

    scale = min(max_size / max(w, h), 1.0)
    scale = max(scale, min_size / min(w, h))
    w, h = apply(w, h, scale)
    if w * h > max_pixels / img_num:
        w, h = apply(w, h, max_pixels / img_num / (w * h))
    if max(w, h) > max_size:
        w, h = apply(w, h, max_size / max(w, h))
    return w, h


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB → float [3, H, W] in [-1, 1] (ToTensor then Normalize(0.5, 0.5), as upstream)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - 0.5) / 0.5


def transform(img: Image.Image, kind: str, cfg: DataConfig, img_num: int, where: str) -> torch.Tensor:
    """Resize for the ViT (stride 14) or the VAE (stride 16) and check the model can place it."""
    if kind == "vit":
        rule = (cfg.vit_max_size, cfg.vit_min_size, cfg.vit_patch_size, cfg.vit_max_pixels)
        side, table = cfg.vit_max_num_patch_per_side, "vit_max_num_patch_per_side"
    else:
        rule = (cfg.vae_max_size, cfg.vae_min_size, cfg.latent_downsample, cfg.vae_max_pixels)
        side, table = cfg.max_latent_size, "max_latent_size"
    w, h = resize_shape(*img.size, *rule, img_num=img_num)
    stride = rule[2]
    if max(w, h) // stride > side:  # only reachable with settings that skipped DataConfig.check
        raise BadSample("image_too_large", f"{where}: image {img.size[0]}x{img.size[1]} resizes to "
                        f"{w}x{h}, {w // stride}x{h // stride} {kind} tokens, more than the model's "
                        f"{table}={side}: set {kind}_max_size to {side * stride} or less")
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)  # = torchvision resize(bicubic, antialias) on PIL
    return to_tensor(img)


# --------------------------------------------------------------------------------------------------
# Records → sequence plans

ROLES = ("system", "user", "assistant")


def parse_record(rec: Any, where: str, rng: random.Random) -> list[tuple[str, str, str, Any]]:
    """A record as a flat list of (field, role, kind, value): kind "text" (value: str) or "image"
    (value: an image source for `load_image`)."""
    if not isinstance(rec, dict):
        raise BadSample("wrong_type", f"{where}: a record must be an object, got {type(rec).__name__}")
    msgs = rec.get("messages")
    if msgs is None:
        if rec.get("image") is not None and rec.get("captions") is not None:
            # upstream T2I parquet rows: image bytes + a JSON dict of captions; one caption at random
            caps = rec["captions"]
            try:
                caps = json.loads(caps) if isinstance(caps, (str, bytes)) else caps
            except json.JSONDecodeError as e:
                raise BadSample("malformed_json", f"{where}: captions: malformed JSON ({e})") from None
            caps = list(caps.values()) if isinstance(caps, dict) else caps if isinstance(caps, list) else [caps]
            caps = [c for c in caps if isinstance(c, str) and c.strip()]
            if not caps:
                raise BadSample("empty_conversation", f"{where}: captions: no caption text")
            return [("captions", "user", "text", rng.choice(caps)),
                    ("image", "assistant", "image", rec["image"])]
        raise BadSample("wrong_type", f"{where}: no 'messages' field (fields: {sorted(rec)}): expected "
                        f"chat messages, or an upstream T2I row with 'image' and 'captions'")
    if isinstance(msgs, bytes):
        msgs = msgs.decode()
    if isinstance(msgs, str):  # common in parquet: messages stored as a JSON string
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise BadSample("malformed_json", f"{where}: messages: malformed JSON ({e})") from None
    if not isinstance(msgs, list):
        raise BadSample("wrong_type", f"{where}: messages: expected a list of messages (or a JSON "
                        f"string of one), got {type(msgs).__name__}")
    images = iter(rec.get("images") or [])  # HF convention: {"type": "image"} takes the next one
    out = []
    for mi, m in enumerate(msgs):
        f = f"messages[{mi}]"
        if not isinstance(m, dict):
            raise BadSample("wrong_type", f"{where}: {f}: expected an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise BadSample("wrong_type", f"{where}: {f}.role: {role!r} is not one of {ROLES}")
        content = m.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadSample("wrong_type", f"{where}: {f}.content: expected a string or a list of "
                            f"parts, got {type(content).__name__}")
        for pi, part in enumerate(content):
            pf = f"{f}.content[{pi}]"
            if not isinstance(part, dict):
                raise BadSample("wrong_type", f"{where}: {pf}: expected an object with a type")
            t = part.get("type")
            if t == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadSample("wrong_type", f"{where}: {pf}.text: expected a string, got "
                                    f"{type(text).__name__}")
                if text.strip():
                    out.append((pf, role, "text", text))
            elif t == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise BadSample("missing_image", f"{where}: {pf}.image_url.url: missing")
                out.append((pf, role, "image", url))
            elif t == "image":
                img = part.get("image")
                if img is None:
                    img = next(images, None)
                if img is None:
                    raise BadSample("missing_image", f"{where}: {pf}.image: missing (and no entry left "
                                    f"in the record's 'images' column)")
                out.append((pf, role, "image", img))
            else:
                raise BadSample("unknown_part_type", f"{where}: {pf}: unknown part type {t!r}; "
                                f"expected text, image_url or image")
    return out


def record_to_items(rec: Any, where: str, folder: str, cfg: DataConfig, tok,
                    rng: random.Random | None = None) -> list[dict]:
    """The sequence plan of one record (DESIGN.md "Meaning", spec §7.3).

    - system/user text: no loss; user images: ViT tokens (understanding).
    - assistant text: CE; assistant image: noisy VAE target (MSE).
    - In a sample that generates an image, inputs are CFG conditions (enable_cfg=1) and input
      images also enter as clean VAE latents before their ViT tokens (editing).
    - A generated image that more conversation follows is re-added as clean VAE + ViT, after its
      noisy copy (upstream edit chains), so later turns can see it (LMMS Engine bug D6).
    """
    parts = parse_record(rec, where, rng or random.Random(0))
    if not parts:
        raise BadSample("empty_conversation", f"{where}: messages: no text and no image")
    if not any(role == "assistant" for _, role, _, _ in parts):
        raise BadSample("no_loss_token", f"{where}: messages: no assistant text or image, so nothing "
                        f"to train on")
    gen = any(role == "assistant" and kind == "image" for _, role, kind, _ in parts)
    # fail rather than feed the model inputs it has no module for (LMMS Engine bug D2)
    if gen and not cfg.visual_gen:
        raise BadSample("needs_visual_gen", f"{where}: an assistant image is a generation target, but "
                        f"visual_gen is off")
    if not gen and not cfg.visual_und and any(kind == "image" for _, _, kind, _ in parts):
        raise BadSample("needs_visual_und", f"{where}: an input image needs the ViT, but visual_und "
                        f"is off")
    last = len(parts) - 1
    n_vit = sum(kind == "image" and (role != "assistant" or i < last)
                for i, (_, role, kind, _) in enumerate(parts))
    items = []

    def text(ids, loss, cfg_, desc):
        items.append(dict(type="text", ids=ids, loss=loss, enable_cfg=cfg_, desc=desc))

    def image(t, img, loss, cfg_, desc):
        items.append(dict(type=t, image=img, loss=loss, enable_cfg=cfg_,
                          desc=f"{desc} {img.shape[1]}x{img.shape[2]} (HxW)"))

    for i, (f, role, kind, value) in enumerate(parts):
        w = f"{where}: {f}"
        if kind == "text":
            short = value if len(value) <= 40 else value[:37] + "..."
            if role == "assistant":
                text(encode(tok, value), 1, 0, f"assistant text {short!r}")
            else:
                text(encode(tok, value), 0, int(gen), f"{role} text {short!r}")
            continue
        pil = load_image(value, folder, w)

        def vit(desc):  # the sample's ViT images share one pixel budget (upstream VLM `img_num`)
            if cfg.visual_und:  # without the ViT, edits condition on the clean VAE copy only
                image("vit_image", transform(pil, "vit", cfg, max(n_vit, 1), w), 0, int(gen), desc)

        if role == "assistant":
            vae = transform(pil, "vae", cfg, 1, w)
            image("vae_image", vae, 1, 0, "assistant image → noisy VAE target")
            if i < last:  # more conversation follows: it conditions on the clean image
                image("vae_image", vae, 0, 1, "assistant image → clean VAE copy")
                vit("assistant image → ViT copy")
        else:
            if gen:
                image("vae_image", transform(pil, "vae", cfg, 1, w), 0, 1, f"{role} image → clean VAE")
            vit(f"{role} image → ViT")
    return items


# --------------------------------------------------------------------------------------------------
# Readers. A file is read in units (a parquet row group, an Arrow record batch, 1024 json/jsonl
# rows); only one unit per source is held at a time, as Arrow data, and only the rows taken are
# turned into Python objects. Arrow files are memory-mapped.

class DataFile:
    def __init__(self, path: str):
        self.path, self.ext = path, Path(path).suffix.lower()
        self._h = self._cache = self._pid = None
        self._open()
        self.unit_rows = self._unit_rows()
        self.unit_start = np.concatenate([[0], np.cumsum(self.unit_rows)]).astype(np.int64)

    def __getstate__(self):  # open handles stay in the process that opened them
        return {**self.__dict__, "_h": None, "_cache": None}

    def _open(self):
        if self._h is not None and self._pid == os.getpid():
            return
        # (re)open in each process: DataLoader workers must not share the parent's file handles
        self._pid, self._cache, p = os.getpid(), None, self.path
        try:
            if self.ext == ".parquet":
                self._h = pq.ParquetFile(p)
            elif self.ext == ".arrow":
                src = pa.memory_map(p)
                try:  # Arrow IPC file format (random access)...
                    r = pa.ipc.open_file(src)
                    self._h = [r.get_batch(i) for i in range(r.num_record_batches)]
                except pa.ArrowInvalid:  # ...or the stream format, used by HF `datasets` shards
                    src.seek(0)
                    self._h = list(pa.ipc.open_stream(src))
            elif self.ext == ".jsonl":
                offsets, pos = [], 0
                with open(p, "rb") as fh:  # index line starts once; rows are read by seeking
                    for line in fh:
                        if line.strip():
                            offsets.append(pos)
                        pos += len(line)
                self._h = np.array(offsets, dtype=np.int64)
            elif self.ext == ".json":
                # a JSON list cannot be streamed without a streaming parser: loaded whole (use .jsonl
                # or parquet for big data)
                with open(p) as fh:
                    rows = json.load(fh)
                if not isinstance(rows, list):
                    raise ValueError(f"{p}: expected a JSON list of records, got {type(rows).__name__}")
                self._h = rows
            else:
                raise ValueError(f"{p}: unknown data file type {self.ext!r}; expected one of {DATA_EXTS}")
        except (pa.ArrowInvalid, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read: {e}") from None

    def _unit_rows(self) -> list[int]:
        if self.ext == ".parquet":
            md = self._h.metadata
            return [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        if self.ext == ".arrow":
            return [b.num_rows for b in self._h]
        n = len(self._h)
        return [min(LINES_PER_UNIT, n - s) for s in range(0, n, LINES_PER_UNIT)]

    def read(self, unit: int, row: int) -> tuple[str, Any]:
        """(where, record) of row `row` of unit `unit`; `where` names file and row for errors."""
        self._open()
        r = int(self.unit_start[unit]) + row
        where = f"{self.path}: row {r}"
        if self.ext == ".parquet":
            if self._cache is None or self._cache[0] != unit:
                self._cache = (unit, self._h.read_row_group(unit))
            return where, self._cache[1].slice(row, 1).to_pylist()[0]
        if self.ext == ".arrow":
            return where, self._h[unit].slice(row, 1).to_pylist()[0]
        if self.ext == ".json":
            return where, self._h[r]
        with open(self.path, "rb") as fh:
            fh.seek(int(self._h[r]))
            line = fh.readline()
        try:
            return where, json.loads(line)
        except json.JSONDecodeError as e:
            raise BadSample("malformed_json", f"{where}: malformed JSON ({e})") from None


def data_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in DATA_EXTS
                       and f.name not in HF_METADATA and f.is_file())
        if not files:
            raise ValueError(f"{path}: directory holds no data files ({', '.join(DATA_EXTS)})")
        return files
    if not p.exists():
        raise ValueError(f"{path}: no such file or directory")
    if p.suffix.lower() not in DATA_EXTS:
        raise ValueError(f"{path}: unknown data file type; expected {', '.join(DATA_EXTS)}, a "
                         f"directory or a .yaml mixture")
    return [str(p)]


class Source:
    """One entry of the mixture: some files, a weight, and the folder relative image paths are in.

    Row order: the stream of one source is all its epochs back to back; epoch e visits the units in
    a random order and the rows of each unit in a random order, both functions of (seed, source, e).
    Shard s of n takes stream positions s, s+n, s+2n, ...: disjoint within an epoch, and together
    the shards cover it. A row is found again from its position alone (resume needs nothing else).
    """

    def __init__(self, name: str, files: list[str], weight: float, folder: str | None, index: int,
                 seed: int):
        self.name, self.weight, self.index, self.seed = name, float(weight), index, seed
        self.files = [DataFile(f) for f in files]
        self.folders = [folder if folder is not None else os.path.dirname(os.path.abspath(f))
                        for f in files]
        self.units = [(fi, ui, n) for fi, f in enumerate(self.files)
                      for ui, n in enumerate(f.unit_rows) if n > 0]
        self.n_rows = sum(n for _, _, n in self.units)
        if self.n_rows == 0:
            raise ValueError(f"{name}: no rows")
        if self.weight <= 0:
            raise ValueError(f"{name}: mixture weight must be > 0, got {weight}")
        self._epoch_cache: tuple = (None, None, None)
        self._perm_cache: tuple = (None, None)

    def locate(self, pos: int) -> tuple[int, int, int]:
        """Stream position → (file, unit, row in unit)."""
        epoch, off = divmod(pos, self.n_rows)
        if self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(self.units))
            starts = np.cumsum([0] + [self.units[u][2] for u in order])
            self._epoch_cache = (epoch, order, starts)
        _, order, starts = self._epoch_cache
        j = bisect.bisect_right(starts, off) - 1
        u = int(order[j])
        if self._perm_cache[0] != (epoch, u):
            rows = np.random.default_rng([self.seed, self.index, epoch, u]).permutation(self.units[u][2])
            self._perm_cache = ((epoch, u), rows)
        fi, ui, _ = self.units[u]
        return fi, ui, int(self._perm_cache[1][off - starts[j]])

    def read(self, pos: int) -> tuple[str, str, Any]:
        fi, ui, row = self.locate(pos)
        where, rec = self.files[fi].read(ui, row)
        return where, self.folders[fi], rec


def find_sources(paths: tuple[str, ...] | list[str], seed: int = 0) -> list[Source]:
    """--data values → mixture sources. `x.yaml` is a mixture (`datasets: [{path, weight,
    data_folder}]`, paths relative to the yaml file); `path:weight` weights a plain path."""
    entries = []  # (name, path, weight, folder)
    for p in paths:
        weight = 1.0
        head, _, tail = p.rpartition(":")
        if head and not os.path.exists(p):
            try:
                p, weight = head, float(tail)
            except ValueError:
                pass
        if p.endswith((".yaml", ".yml")):
            try:
                cfg = yaml.safe_load(Path(p).read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ValueError(f"{p}: cannot read the mixture: {e}") from None
            ds = cfg.get("datasets") if isinstance(cfg, dict) else None
            if not isinstance(ds, list) or not ds:
                raise ValueError(f"{p}: expected `datasets: [{{path, weight, data_folder}}, ...]`")
            base = os.path.dirname(os.path.abspath(p))
            for i, e in enumerate(ds):
                if not isinstance(e, dict) or "path" not in e:
                    raise ValueError(f"{p}: datasets[{i}]: needs a `path`")
                folder = e.get("data_folder")
                folder = os.path.join(base, folder) if folder else None
                entries.append((f"{p}: datasets[{i}]", os.path.join(base, str(e["path"])),
                                float(e.get("weight", 1.0)) * weight, folder))
        else:
            entries.append((p, p, weight, None))
    return [Source(name, data_files(path), w, folder, i, seed)
            for i, (name, path, w, folder) in enumerate(entries)]


# --------------------------------------------------------------------------------------------------
# Iteration: per shard (rank, worker), a deterministic stream of samples into a first-fit packer.
# Everything random is keyed: the mixture draw by (seed, shard, draw number), a sample's caption
# choice and CFG dropout by (seed, source, position), timesteps by (seed, rank, step). So a state of
# a few counters (+ the keys of the samples waiting in open packs) resumes the stream exactly.

@dataclass
class Sample:
    key: tuple[int, int]  # (source index, stream position)
    where: str
    layout: packing.Layout

    @property
    def n(self) -> int:
        return self.layout.n


class ShardStream:
    def __init__(self, ds: "PackedDataset", vshard: int, n_workers: int, state: dict | None):
        self.ds, self.cfg, self.vshard, self.n_workers = ds, ds.cfg, vshard, n_workers
        self.shard = ds.rank * n_workers + vshard
        self.n_shards = ds.world_size * n_workers
        self.packer = packing.FirstFitPacker(self.cfg.packing_length, self.cfg.max_open_packs,
                                             self.cfg.min_fill)
        s = state or {}
        self.draws = s.get("draws", 0)
        self.pos = list(s.get("pos", [self.shard] * len(ds.sources)))
        self.packs, self.samples, self.tokens = s.get("packs", 0), s.get("samples", 0), s.get("tokens", 0)
        self.skips = Counter(s.get("skips", {}))
        for keys in s.get("open", []):  # re-read the samples that waited in open packs
            samples = [self.make(tuple(k)) for k in keys]
            self.packer.open.append(samples)
            self.packer.used.append(sum(x.n for x in samples))

    def state(self) -> dict:
        return dict(shard=self.vshard, draws=self.draws, pos=list(self.pos), packs=self.packs,
                    samples=self.samples, tokens=self.tokens, skips=dict(self.skips),
                    open=[[list(x.key) for x in p] for p in self.packer.open])

    def next_key(self) -> tuple[int, int] | None:
        srcs = self.ds.sources
        limit = self.cfg.epochs
        live = [i for i, s in enumerate(srcs) if limit is None or self.pos[i] < limit * s.n_rows]
        if not live:
            return None
        u = np.random.default_rng([self.cfg.seed, self.shard, self.draws]).random()
        self.draws += 1
        cum = np.cumsum([srcs[i].weight for i in live])
        i = live[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(live) - 1)]
        key = (i, self.pos[i])
        self.pos[i] += self.n_shards
        return key

    def make(self, key: tuple[int, int]) -> Sample:
        """The sample at `key`, laid out; raises BadSample."""
        cfg = self.cfg
        where, folder, rec = self.ds.sources[key[0]].read(key[1])
        rng = random.Random(f"{cfg.seed}:{key[0]}:{key[1]}")  # str seeds are stable across processes
        items = record_to_items(rec, where, folder, cfg, self.ds.tok, rng)
        dropout = (cfg.text_cond_dropout, cfg.vit_cond_dropout, cfg.vae_cond_dropout)
        lay = packing.layout_sample(items, self.ds.specials, self.ds.geo, dropout, rng)
        if lay.n > cfg.packing_length:
            raise BadSample("too_long", f"{where}: sample has {lay.n} tokens, more than "
                            f"packing_length={cfg.packing_length}: raise --data.packing-length or "
                            f"lower the image sizes (it is never cut)")
        return Sample(key, where, lay)

    def emit(self, pack: list[Sample]) -> tuple[list[Sample], dict, dict]:
        # packs of this shard are steps k*n_workers + vshard of the rank: the DataLoader takes one
        # pack from each worker in turn, so this is the order the training loop sees them in
        step = self.packs * self.n_workers + self.vshard
        batch = packing.collate([s.layout for s in pack],
                                packing.step_generator(self.cfg.seed, self.ds.rank, step), geo=self.ds.geo)
        self.packs += 1
        self.samples += len(pack)
        self.tokens += sum(s.n for s in pack)
        return pack, batch, self.state()

    def __iter__(self):
        """Yields (samples, batch, state after this pack)."""
        while True:
            key = self.next_key()
            if key is None:  # finite run (epochs set) and every source done
                while self.packer.open:  # one at a time: each state still lists the packs not yet emitted
                    yield self.emit(self.packer.pop(0))
                return
            try:
                sample = self.make(key)
            except BadSample as e:
                if not self.cfg.skip_bad:
                    raise
                self.skips[e.reason] += 1
                continue
            for p in self.packer.add(sample):
                yield self.emit(p)


class PackedDataset(torch.utils.data.IterableDataset):
    """Packed batches of one rank; each DataLoader worker is its own shard."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        cfg.check()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tok = load_tokenizer(cfg.model)
        self.specials = special_tokens(self.tok)
        self.geo = cfg.geometry()
        self.sources = find_sources(cfg.data, cfg.seed)
        self.rotate, self.resume = 0, {}

    def stream(self, vshard: int = 0, n_workers: int = 1) -> ShardStream:
        return ShardStream(self, vshard, n_workers, self.resume.get(vshard))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        # after a resume the DataLoader starts again at worker 0, so worker w plays the shard whose
        # turn it is: `rotate` is the number of packs consumed modulo the number of workers
        for _, batch, state in self.stream((w + self.rotate) % nw, nw):
            batch["_state"] = state
            yield batch


def _no_collate(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)  # workers decode images; torch threads there only oversubscribe cores


class PackLoader:
    """What the training loop uses: iterate for batches (Bagel.forward's keyword arguments)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.dataset = PackedDataset(cfg, rank, world_size)
        self.shards: dict[int, dict] = {}  # state after the last consumed pack of each worker shard
        self.consumed = 0

    def __iter__(self):
        nw = self.cfg.num_workers
        self.dataset.rotate = self.consumed % max(nw, 1)
        self.dataset.resume = copy.deepcopy(self.shards)
        # pinned batches: the trainer's copies to the GPU do not block the host (train.to_device)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=nw,
                                             collate_fn=_no_collate, worker_init_fn=_worker_init,
                                             pin_memory=torch.cuda.is_available())
        for batch in loader:
            state = batch.pop("_state")
            self.shards[state["shard"]] = state
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return dict(consumed=self.consumed, num_workers=self.cfg.num_workers,
                    world_size=self.dataset.world_size, seed=self.cfg.seed,
                    shards=copy.deepcopy(self.shards))

    def load_state_dict(self, sd: dict):
        for k in ("num_workers", "world_size", "seed"):
            mine = self.cfg.num_workers if k == "num_workers" else \
                self.dataset.world_size if k == "world_size" else self.cfg.seed
            if sd[k] != mine:
                raise ValueError(f"data state was saved with {k}={sd[k]} but this run has {mine}: "
                                 f"exact resume needs the same value")
        self.consumed = sd["consumed"]
        self.shards = {int(k): v for k, v in copy.deepcopy(sd["shards"]).items()}

    def continue_from(self, states: list[dict]):
        """Resume from the data states of ALL ranks of a run with another world size or worker count.
        Exact resume is impossible there (which shard reads which record changes), so each source
        restarts at the smallest next position of the old shards, and the samples that waited in open
        packs below it are handed out again as open packs: no record is skipped, the few between the
        old shards' positions are read twice. Counters and timestep draws restart."""
        if any(st["seed"] != self.cfg.seed for st in states):
            raise ValueError(f"data state was saved with seed {states[0]['seed']}, this run has {self.cfg.seed}")
        n_src = len(self.dataset.sources)
        start, waiting = [math.inf] * n_src, []
        for rank, st in enumerate(states):
            nw = max(st["num_workers"], 1)
            for v in range(nw):
                sh = st["shards"].get(str(v), st["shards"].get(v))  # JSON turns the int keys into str
                pos = sh["pos"] if sh else [rank * nw + v] * n_src  # a shard that never emitted: its start
                start = [min(a, b) for a, b in zip(start, pos)]
                waiting += sh["open"] if sh else []
        waiting = [p for p in ([k for k in pack if k[1] < start[k[0]]] for pack in waiting) if p]
        nw = max(self.cfg.num_workers, 1)
        n_new, first = self.dataset.world_size * nw, self.dataset.rank * nw
        self.consumed = 0
        self.shards = {v: dict(shard=v, draws=0, pos=[int(p) + first + v for p in start], packs=0, samples=0,
                               tokens=0, skips={}, open=waiting[first + v::n_new]) for v in range(nw)}

    def stats(self) -> dict:
        """Totals over this rank's consumed packs: fill, padding, samples/pack, skips per reason."""
        packs = sum(s["packs"] for s in self.shards.values())
        samples = sum(s["samples"] for s in self.shards.values())
        tokens = sum(s["tokens"] for s in self.shards.values())
        skips = Counter()
        for s in self.shards.values():
            skips.update(s["skips"])
        fill = tokens / (packs * self.cfg.packing_length) if packs else 0.0
        return dict(packs=packs, samples=samples, tokens=tokens, fill=fill, padding=1 - fill,
                    samples_per_pack=samples / packs if packs else 0.0, skipped=dict(skips))

    def log_line(self) -> str:
        s = self.stats()
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())) or "none"
        return (f"data: {s['packs']:,} packs | {s['samples_per_pack']:.1f} samples/pack | padding "
                f"{100 * s['padding']:.1f}% | skipped: {skipped}")


# --------------------------------------------------------------------------------------------------
# python data.py --data x.parquet --model DIR --inspect N

def describe(pack: list[Sample], budget: int, index: int) -> str:
    """Human form of one pack: each split with its mode, RoPE ids and loss."""
    n = sum(s.n for s in pack)
    lines = [f"pack {index}: {len(pack)} samples, {n:,}/{budget:,} tokens ({100 * n / budget:.1f}%)"]
    for s in pack:
        lay = s.layout
        lines.append(f"  sample {s.where}: {lay.n} tokens")
        ce, mse, start = set(lay.ce_idx), set(lay.mse_idx), 0
        for n_split, mode, desc in zip(lay.split_lens, lay.attn_modes, lay.split_desc):
            r = lay.rope[start:start + n_split]
            rope = f"{r[0]}" if r[0] == r[-1] else f"{r[0]}..{r[-1]}"
            n_ce = sum(i in ce for i in range(start, start + n_split))
            n_mse = sum(i in mse for i in range(start, start + n_split))
            loss = f"CE {n_ce}" if n_ce else f"MSE {n_mse}" if n_mse else "-"
            lines.append(f"    [{start:5d}, {start + n_split:5d})  {mode:6s}  rope {rope:9s}  "
                         f"{loss:8s}  {desc}")
            start += n_split
    return "\n".join(lines)


@dataclass
class Args(DataConfig):
    inspect: int = 2
    """print this many packs and exit"""


def main():
    import tyro
    args = tyro.cli(Args)
    try:
        from model import read_config
        try:  # a BAGEL checkpoint directory: its geometry wins over the flags
            args = match_model(args, read_config(args.model))
        except FileNotFoundError:
            pass  # a bare tokenizer directory: the flags (default: BAGEL-7B-MoT) apply
        ds = PackedDataset(args)
        for i, (pack, batch, _) in enumerate(ds.stream()):
            if i >= args.inspect:
                break
            print(describe(pack, args.packing_length, i))
            print("  tensors: " + ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items()
                                             if torch.is_tensor(v)))
    except ValueError as e:  # bad data or settings: the message says where and what to do
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
