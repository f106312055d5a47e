"""Training data for BAGEL: records in any common container → checked samples → first-fit packs.

    records (.parquet/.arrow/.json/.jsonl, .yaml mixtures, directories)
      → chat `messages` (LMMS Engine's format) or upstream T2I rows (`image` + `captions`)
      → a sequence plan per sample (text / ViT image / VAE image items, DESIGN.md#layout)
      → packing.layout_sample (tokens, RoPE ids, splits, labels, CFG dropout)
      → packing.FirstFitPacker → packing.collate → the batch `Bagel.forward` takes (DESIGN.md#packing)

The training loop uses `PackLoader(cfg, rank, world_size)`: iterate it for batches, save its
`state_dict()` in checkpoints, `load_state_dict()` to resume exactly, and log `log_line()`.
`python data.py --data x.parquet --model DIR --inspect 2` prints packs in human form.
"""
import base64
import bisect
import binascii
import copy
import fnmatch
import functools
import io
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import tyro
import yaml
from PIL import Image, ImageFile

import packing
from packing import Geometry, SpecialTokens

DATA_EXTS = (".parquet", ".arrow", ".json", ".jsonl")
HF_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}  # json files in HF save_to_disk dirs
LINES_PER_UNIT = 1024  # json/jsonl rows are shuffled and sharded in units of this many rows
PREFETCH = 2  # packs each DataLoader worker keeps ready (torch's default prefetch_factor)
# shared-memory bytes of a pack per token: a VAE token's uint8 pixels (16*16*3; a ViT token has fewer)
# plus padding and indexes (a 1024x1024 edit pack: 7.5 MiB for 9.6k tokens, ~820 per token)
PACK_BYTES_PER_TOKEN = 1024
BIG_UNIT_BYTES = 256 << 20  # a parquet row group larger than this is warned about (a whole-file row group)
# record forms, each known by the fields it needs (the first that a record has wins; a yaml mixture
# can name one with `format:`): chat messages, and upstream BAGEL's three dataset forms as they are
FORMS = {"messages": ("messages",),  # {role, content parts}, `images` / `videos` filling {"type": "image"}
         "unified_edit": ("image_list", "instruction_list"),  # upstream edit parquet, one chain per row
         "vlm_sft": ("conversations",),  # upstream / LLaVA SFT jsonl: {from, value} turns, `image` paths
         "t2i_pretrain": ("image", "captions")}  # upstream T2I parquet: image bytes + JSON captions
RECORD_FIELDS = ("messages", "images", "videos", "image", "captions", "image_list", "instruction_list",
                 "conversations", "video")  # all parse_record reads
# images noted in the data line: upscaled from below the minimum side, or more than this many times
# longer than wide (or the reverse): upstream's resize makes such images a few latent rows thin
EXTREME_ASPECT = 4.0
IMAGE_WARN_SHARE = 0.1  # a source with more than this share of such images gets a warning in the data line
# a parquet row group is decoded in record batches of about this many bytes: decoded as one batch,
# a 64 MB row group took ~50 MB more peak RSS (allocator fragmentation; dev/bench_data.py)
PARQUET_BATCH_BYTES = 1 << 20
VAE_MAX_PIXELS = 14 * 14 * 9 * 1024  # upstream ImageTransform default (data/transforms.py)
VIT_MAX_PIXELS = 2_007_040  # upstream data/configs/example.yaml, VLM SFT ViT transform
# --data.skip-bad is for the odd broken record: a source that is mostly bad stops the run instead
SKIP_CHECK_AFTER = 100  # records of one source read by one shard before the check starts
MAX_SKIPPED = 0.2  # fraction of a source's records that may be skipped


@dataclass
class DataConfig:
    # `--data x.parquet` even when nested as train.py's Args.data (not `--data.data`)
    data: Annotated[tuple[str, ...], tyro.conf.arg(name="data", prefix_name=False)] = ()
    """data files, directories or .yaml mixtures; `path:weight` sets a mixture weight (default 1)"""
    model: str = ""
    """directory holding the Qwen2.5 tokenizer (tokenizer.json or vocab.json + merges.txt); '': --model's"""
    packing_length: int = 10240
    """token budget of one pack: text, ViT and VAE tokens and their markers (upstream fine-tuning:
    10240, which a 1024x1024 edit fits)"""
    max_open_packs: int = 8
    """first-fit buffer: how many partly filled packs wait for more samples"""
    min_fill: float = 0.99
    """a pack at least this full is emitted at once"""
    seed: tyro.conf.Suppress[int] = 0
    """shuffle, mixture, CFG dropout and timestep draws are all functions of this seed (the CLIs' --seed)"""
    epochs: int | None = None
    """stop after this many passes over every source (None: stream forever, for step-based training)"""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)"""
    held_row_groups: float = 2
    """a data worker holds one read unit per source: the parquet ones of a mixture hold about this many
    of its largest row groups in all. With more parquet sources than this, row groups are read in
    pieces, each decoding its row group from the start, so about sources / this times the bytes are
    read; raise it to trade memory for reads (e.g. from object storage)"""
    skip_bad: bool = False
    """skip bad records and count them per reason instead of stopping with an error"""
    skip_too_long: bool = True
    """skip (and count as too_long) a record over packing_length that no cut saves (a multi-step edit
    is first cut to its longest run of steps that fits, see `cut_steps`); False: stop with an error.
    Not counted against a source by the skip_bad check, as such records are valid"""
    truncated_images: Literal["load", "error"] = "load"
    """a truncated image file: decode what is there, as upstream does (PIL's LOAD_TRUNCATED_IMAGES), or
    treat it as a bad record"""
    fresh_pass: bool = False
    """on resume, when the data differ from the checkpoint's (files added, removed or changed, another
    mixture): start a new pass over the data as they are now, from the resumed step"""
    text_cond_dropout: float = 0.1
    """CFG dropout of conditioning text in generation/edit samples (upstream default, DESIGN.md#cfg-dropout)"""
    vit_cond_dropout: float = 0.3
    """CFG dropout of conditioning ViT images in generation/edit samples"""
    vae_cond_dropout: float = 0.3
    """CFG dropout of clean conditioning VAE images in generation/edit samples"""
    video_min_frames: int = 8
    """frames per video clip: N drawn from video_min_frames..video_max_frames (upstream vlm_sft)"""
    video_max_frames: int = 12
    video_sample: Literal["rand", "middle"] = "rand"
    """frame taken from each of N equal spans of a clip: a random one (training) or the middle one (evaluation)"""
    vae_max_size: int = 1024
    vae_min_size: int = 512
    vae_max_pixels: int = VAE_MAX_PIXELS
    vit_max_size: int = 980
    """ViT images for understanding: 378-980 px, as upstream VLM SFT (data/configs/example.yaml)"""
    vit_min_size: int = 378
    vit_max_pixels: int = VIT_MAX_PIXELS
    """shared by the ViT images of one understanding sample"""
    edit_vit_max_size: int = 518
    """the ViT copy of an image that also enters as clean VAE latents (every input image of a sample
    that generates one, e.g. an edit's source): 224-518 px, as upstream `unified_edit`, so that a
    1024x1024 edit fits 10240 tokens; never above vit_max_size"""
    edit_vit_min_size: int = 224
    """never above vit_min_size"""
    edit_vit_max_pixels: int = VAE_MAX_PIXELS
    # the model's side of the geometry: read from the checkpoint by `match_model`, never options
    vit_patch_size: tyro.conf.Suppress[int] = 14
    """SigLIP patch size"""
    vit_max_num_patch_per_side: tyro.conf.Suppress[int] = 70
    """side of the ViT position table (BAGEL-7B-MoT: 70)"""
    max_latent_size: tyro.conf.Suppress[int] = 64
    """side of the latent position table (BAGEL-7B-MoT: 64, i.e. 1024 px)"""
    latent_downsample: tyro.conf.Suppress[int] = 16
    """VAE downsampling (8) times latent patch size (2)"""
    visual_und: tyro.conf.Suppress[bool] = True
    """the model has the ViT: input images become ViT tokens"""
    visual_gen: tyro.conf.Suppress[bool] = True
    """the model has the VAE path: assistant images become generation targets"""

    def geometry(self) -> Geometry:
        return Geometry(self.vit_patch_size, self.vit_max_num_patch_per_side,
                        self.latent_downsample, self.max_latent_size)

    def problems(self) -> list[str]:
        """Every setting the model cannot take, each with the flag as typed and a value that works
        (the field names are the CLIs' --data.* flags)."""
        out = []
        if not self.data:
            out.append("no data: pass --data PATH (a file, a directory or a .yaml mixture)")
        for name, size, stride, side, table in (
                ("vit", self.vit_max_size, self.vit_patch_size, self.vit_max_num_patch_per_side,
                 "vit_max_num_patch_per_side"),
                ("vae", self.vae_max_size, self.latent_downsample, self.max_latent_size,
                 "max_latent_size")):
            lo = getattr(self, f"{name}_min_size")
            if round(size / stride) > side:
                out.append(f"--data.{name}-max-size {size} gives {round(size / stride)} tokens per side, more than "
                           f"the model's {table}={side}: set --data.{name}-max-size {side * stride} or less")
                size = side * stride  # the min size is judged against the max that works
            if lo > size:
                out.append(f"--data.{name}-min-size {lo} is larger than --data.{name}-max-size {size}: "
                           f"set --data.{name}-min-size {size} or less")
        if not 1 <= self.video_min_frames <= self.video_max_frames:
            out.append(f"--data.video-min-frames {self.video_min_frames} --data.video-max-frames "
                       f"{self.video_max_frames}: need 1 <= min <= max")
        for name in ("text", "vit", "vae"):
            if not 0 <= (p := getattr(self, f"{name}_cond_dropout")) <= 1:
                out.append(f"--data.{name}-cond-dropout {p}: a probability, in [0, 1]")
        return out

    def check(self):
        """Fail at start-up, with the fixes in the message, for settings the model cannot take."""
        if bad := self.problems():
            raise DataError(bad[0] if len(bad) == 1 else f"{len(bad)} problems:\n  " + "\n  ".join(bad))


def geometry_line(cfg: DataConfig) -> str:
    """The model-decided fields, for the one line that says what the checkpoint set."""
    parts = [f"ViT patch {cfg.vit_patch_size}, {cfg.vit_max_num_patch_per_side} patches per side"
             if cfg.visual_und else "no ViT",
             f"latent stride {cfg.latent_downsample}, {cfg.max_latent_size} latents per side"
             if cfg.visual_gen else "no generation"]
    return "model geometry: " + "; ".join(parts)


def match_model(cfg: DataConfig, model_config) -> DataConfig:
    """`cfg` with the model-side fields (patch size, position-table sides, latent stride, switched-off
    parts) taken from a model.BagelConfig, so the data can never disagree with the checkpoint."""
    c = model_config
    return replace(cfg, vit_patch_size=c.vit.patch_size, vit_max_num_patch_per_side=c.vit_max_num_patch_per_side,
                   max_latent_size=c.max_latent_size, latent_downsample=c.vae.downsample * c.latent_patch_size,
                   visual_und=c.visual_und, visual_gen=c.visual_gen)


# the options that size images (the --data.*-size and *-pixels flags): an export records its run's in IMAGE_SIZES
IMAGE_SIZES = "image_sizes.json"
SIZE_FIELDS = ("vae_max_size", "vae_min_size", "vae_max_pixels", "vit_max_size", "vit_min_size", "vit_max_pixels",
               "edit_vit_max_size", "edit_vit_min_size", "edit_vit_max_pixels")


def sampling_config(model_config, trained: dict | None = None) -> DataConfig:
    """The image sizes to feed a trained model: the run's (`trained`: its SIZE_FIELDS, from the export's
    image_sizes.json) or, without a record, the defaults, each capped at what the model's position
    tables hold; the geometry is the model's. Sampling then resizes with `transform`, as training did."""
    cfg = match_model(DataConfig(**{k: v for k, v in (trained or {}).items() if k in SIZE_FIELDS}), model_config)
    vit, vae = cfg.vit_max_num_patch_per_side * cfg.vit_patch_size, cfg.max_latent_size * cfg.latent_downsample
    return replace(cfg, vit_max_size=min(cfg.vit_max_size, vit), vit_min_size=min(cfg.vit_min_size, vit),
                   edit_vit_max_size=min(cfg.edit_vit_max_size, vit), edit_vit_min_size=min(cfg.edit_vit_min_size, vit),
                   vae_max_size=min(cfg.vae_max_size, vae), vae_min_size=min(cfg.vae_min_size, vae))


def draw_size_problem(flag: str, size: int, model_config) -> str | None:
    """Why the model cannot draw `size` x `size` images (None: it can), for the flag that asked."""
    c = model_config
    ds = c.vae.downsample * c.latent_patch_size
    if size % ds or not 0 < size // ds <= c.max_latent_size:
        return (f"{flag} {size}: must be a multiple of {ds} (the model's latent stride) and at most "
                f"{c.max_latent_size * ds} px (max_latent_size {c.max_latent_size} strides)")
    return None


class DataError(packing.UserError, ValueError):
    """Data or data options the user can fix, the message naming the file or option; raised in a
    DataLoader worker, it is handed to the training process as it is, so it pickles with its arguments."""

    def __reduce__(self):
        return type(self), self.args


class BadSample(DataError):
    """A record we cannot train on (the user's to fix or skip). `reason` is the counter name used with skip_bad."""

    def __init__(self, reason: str, message: str):
        super().__init__(reason, message)
        self.reason = reason

    def __str__(self):
        return self.args[1]


class ReadError(BadSample):
    """A read unit that cannot be read (a damaged or truncated file): with skip_bad, the rows of it
    that the shard was to read are skipped and counted under `reason`."""


# --------------------------------------------------------------------------------------------------
# Tokenizer. BAGEL uses the Qwen2.5 tokenizer with no chat template (DESIGN.md#layout); ids of the four
# special tokens are looked up by name, so a tokenizer with another numbering still works.

def load_tokenizer(model_dir: str):
    """The tokenizer of a checkpoint directory: tokenizer.json, or vocab.json + merges.txt (+ the
    added tokens of tokenizer_config.json), as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    d = Path(model_dir)
    if (d / "tokenizer.json").exists():
        return Tokenizer.from_file(str(d / "tokenizer.json"))
    if not ((d / "vocab.json").exists() and (d / "merges.txt").exists()):
        raise DataError(f"{d}: no tokenizer.json and no vocab.json + merges.txt: --model must be a "
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
            raise DataError(f"{cfg_path}: added token {t['content']!r} should have id {i} but got "
                            f"{tok.token_to_id(t['content'])}; vocab.json does not match")
    return tok


def special_tokens(tok) -> SpecialTokens:
    names = dict(bos="<|im_start|>", eos="<|im_end|>", vision_start="<|vision_start|>",
                 vision_end="<|vision_end|>")
    ids = {k: tok.token_to_id(v) for k, v in names.items()}
    missing = [names[k] for k, v in ids.items() if v is None]
    if missing:
        raise DataError(f"tokenizer lacks {missing}: BAGEL needs the Qwen2.5 tokenizer")
    return SpecialTokens(**ids)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids  # no special tokens added (DESIGN.md#layout)


# --------------------------------------------------------------------------------------------------
# Storage. Every file (data, yaml mixture, image, video) is opened through `filesystem`: local paths
# directly, s3:// gs:// hdfs:// through pyarrow's filesystems, hf:// through huggingface_hub. Credentials
# and endpoints come only from each store's own environment variables (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION; GOOGLE_APPLICATION_CREDENTIALS; HADOOP_HOME and
# CLASSPATH; HF_TOKEN), never from arguments, which args.json and logs would keep.

REMOTE = ("s3://", "gs://", "gcs://", "hdfs://", "hf://")


def is_remote(path: str) -> bool:
    return isinstance(path, str) and path.startswith(REMOTE)


def join(folder: str, path: str) -> str:
    """`path` relative to `folder` (a local or remote folder); absolute and remote paths as they are."""
    if is_remote(path) or os.path.isabs(path) or not folder:
        return path
    return f"{folder.rstrip('/')}/{path}" if is_remote(folder) else os.path.join(folder, path)


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))


@functools.lru_cache(maxsize=None)
def _store(scheme: str, authority: str, pid: int):
    """One filesystem per bucket (or namenode) and process: a DataLoader worker must not use its
    parent's clients. pyarrow's `from_uri` reads AWS_ENDPOINT_URL and finds an S3 bucket's region."""
    try:
        import pyarrow.fs as pafs
        if scheme == "hf":
            from huggingface_hub import HfFileSystem  # only hf:// paths need it
            return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))
        return pafs.FileSystem.from_uri(f"{scheme}://{authority}")[0]
    except ImportError as e:
        pkg = "huggingface_hub" if scheme == "hf" else f"pyarrow built with {scheme} support"
        raise packing.UserError(f"{scheme}:// paths need {pkg} (pip install {pkg.split()[0]}): {e}") from None
    except (OSError, pa.ArrowException) as e:  # no libhdfs, a bad endpoint, an unknown bucket, ...
        raise packing.UserError(f"{scheme}://{authority}: cannot set up the filesystem: {e}") from None


def filesystem(path: str):
    """(pyarrow filesystem, path on it) of a local or remote path: s3/gs paths on their store start
    with the bucket, hdfs paths with / (the namenode is the store), hf paths keep their repo form."""
    import pyarrow.fs as pafs
    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, rest = path.split("://", 1)
    authority, _, key = rest.partition("/")
    if scheme == "hdfs":
        return _store(scheme, authority, os.getpid()), "/" + key
    return _store(scheme, "" if scheme == "hf" else authority, os.getpid()), rest


def open_file(path: str):
    """A seekable binary file of a local or remote path (a plain file object locally)."""
    if not is_remote(path):
        return open(path, "rb")
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def file_size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = filesystem(path)
    return fs.get_file_info(p).size


# --------------------------------------------------------------------------------------------------
# Images

def open_source(src: Any, folder: str, where: str, what: str = "image") -> bytes | str:
    """The bytes or the file path of an image or video source: a path (relative to `folder`), a
    data: URI, bytes, or an HF datasets `{"bytes", "path"}` struct."""
    if isinstance(src, dict):  # HF datasets Image feature: bytes win over path, as in `datasets`
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytearray, memoryview)):
        src = bytes(src)
    if isinstance(src, str):
        if src.startswith(("http://", "https://")):
            raise BadSample("http_url", f"{where}: {src[:80]}: {what}s must be local files or bytes "
                            f"(no network at training time): download them first")
        if src.startswith("data:"):
            try:
                return base64.b64decode(src.split(",", 1)[1], validate=True)
            except (IndexError, binascii.Error) as e:
                raise BadSample(f"undecodable_{what}", f"{where}: bad base64 data URI ({e})") from None
        path = src[len("file://"):] if src.startswith("file://") else src
        path = join(folder, path)  # an absolute path ignores folder
        if is_remote(path):  # read whole: one request, and a missing file is found by reading it
            try:
                fs, p = filesystem(path)
                with fs.open_input_stream(p) as fh:  # one GET
                    return fh.read()
            except (FileNotFoundError, OSError) as e:
                raise BadSample(f"missing_{what}", f"{where}: cannot read {what} {path}: {e} (relative "
                                f"paths are resolved against data_folder {folder!r})") from None
        if not os.path.isfile(path):
            raise BadSample(f"missing_{what}", f"{where}: {what} file not found: {path} (relative "
                            f"paths are resolved against data_folder {folder!r})")
        return path
    if not isinstance(src, bytes):
        raise BadSample(f"missing_{what}", f"{where}: no {what} (got {type(src).__name__}): expected a "
                        f"path, a data: URI, bytes or a {{bytes, path}} struct")
    return src


def load_image(src: Any, folder: str, where: str, truncated: str = "load") -> Image.Image:
    """Decode an image source (see `open_source`). Returns RGB with transparency composited on white;
    `info["truncated"]` is set on an image decoded from a truncated file (`truncated` "load")."""
    src = open_source(src, folder, where)
    cut = False
    try:
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
            img.load()
        except OSError as e:
            if truncated != "load" or "truncated" not in str(e):
                raise
            # upstream sets PIL's flag for the whole process; here it holds only for this retry, so
            # that --data.truncated-images error still sees the error (decoding is single-threaded)
            ImageFile.LOAD_TRUNCATED_IMAGES, cut = True, True
            try:
                img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
                img.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = False
    except Exception as e:  # PIL raises many types for broken files
        hint = " (--data.truncated-images load decodes what is there)" if "truncated" in str(e) else ""
        raise BadSample("undecodable_image", f"{where}: cannot decode image: {e}{hint}") from None
    img = to_rgb(img)
    img.info["truncated"] = cut
    return img


def frame_indices(n: int, n_frames: int, rng: random.Random | None) -> list[int]:
    """Upstream `get_frame_indices` (ByteDance-Seed/Bagel data/video_utils.py): cut the clip into
    min(n, n_frames) equal spans, take a random frame of each ('rand') or its middle (rng None), and
    repeat the last index up to n. Upstream's quirks are kept: 'rand' never takes a span's last frame
    (it draws from range(start, end - 1)), and when a span has fewer than 2 frames it takes a sorted
    random subset of the clip instead."""
    k = min(n, n_frames)
    edges = np.linspace(0, n_frames, k + 1).astype(int).tolist()
    spans = list(zip(edges[:-1], edges[1:]))
    if rng is None:
        idx = [(a + b - 1) // 2 for a, b in spans]
    elif all(b - a >= 2 for a, b in spans):
        idx = [rng.randrange(a, b - 1) for a, b in spans]
    else:
        idx = sorted(rng.sample(range(n_frames), k))
    return idx + idx[-1:] * (n - k)


def load_video(src: Any, folder: str, where: str, cfg: DataConfig, rng: random.Random) -> list[tuple]:
    """The sampled frames of a video part as (PIL image, label): N frames, N drawn from
    video_min_frames..video_max_frames, placed by `frame_indices` (upstream `read_frames_decord`). A
    list of frame images (upstream `read_frames_folder`) is sampled the same way but never padded,
    and only its sampled frames are decoded."""
    n = rng.randint(cfg.video_min_frames, cfg.video_max_frames)
    pick = None if cfg.video_sample == "middle" else rng
    if isinstance(src, (list, tuple, np.ndarray)):
        if len(src) == 0:
            raise BadSample("empty_video", f"{where}: video: empty frame list")
        idx = frame_indices(min(n, len(src)), len(src), pick)
        return [(load_image(src[i], folder, f"{where} frame {i}"),
                 f"video frame {j + 1}/{len(idx)}: #{i} of {len(src)} listed frames") for j, i in enumerate(idx)]
    import av  # only video data needs PyAV
    src = open_source(src, folder, where, "video")
    try:
        with av.open(io.BytesIO(src) if isinstance(src, bytes) else src) as box:
            if not box.streams.video:
                raise BadSample("undecodable_video", f"{where}: no video stream in the file")
            stream = box.streams.video[0]
            stream.codec_context.thread_count = 1  # one decoder thread per data worker, like upstream's decord
            # every frame's presentation time and the keyframes, from the packets alone (nothing decoded)
            packets = [(p.pts, p.is_keyframe) for p in box.demux(stream) if p.pts is not None and p.size]
            pts = sorted(t for t, _ in packets)
            keys = sorted(t for t, key in packets if key)
            fps = float(stream.average_rate or 0)
            if not pts:
                raise BadSample("empty_video", f"{where}: video has no frames")
            idx = frame_indices(n, len(pts), pick)
            want, got, it, last = {pts[i] for i in idx}, {}, None, None
            for t in sorted(want):
                # seek only when a keyframe lies between the last decoded frame and this one (otherwise
                # decoding on is cheaper), and to that keyframe, not to t: a frame shown before its
                # GOP's keyframe (open GOP) needs the GOP before, which a seek to t would skip
                k = bisect.bisect_right(keys, t)
                if last is None or k > bisect.bisect_right(keys, last):
                    box.seek(keys[max(k - 1, 0)], stream=stream, backward=True)
                    it = box.decode(stream)
                for f in it:
                    last = f.pts
                    if f.pts in want:
                        got[f.pts] = f.to_image()
                    if f.pts >= t:
                        break
    except BadSample:
        raise
    except Exception as e:  # FFmpeg errors: not a video, a damaged file
        raise BadSample("undecodable_video", f"{where}: cannot decode video: {e!r}") from None
    missing = [i for i in idx if pts[i] not in got]
    if missing:
        raise BadSample("undecodable_video", f"{where}: video frames {missing} could not be decoded")
    info = f"{len(pts)} frames" + (f", {fps:.3g} fps, {len(pts) / fps:.1f} s" if fps else "")
    return [(to_rgb(got[pts[i]]), f"video frame {j + 1}/{n}: #{i} of {info}") for j, i in enumerate(idx)]


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
    """Target (W, H) of upstream `MaxLongEdgeMinShortEdgeResize` (DESIGN.md#image-sizes), quirks included: the
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
    """Resize for the ViT (stride 14; kind "vit" or "edit_vit") or the VAE (stride 16) and check the
    model can place it."""
    if kind == "vit":
        rule = (cfg.vit_max_size, cfg.vit_min_size, cfg.vit_patch_size, cfg.vit_max_pixels)
        side, table = cfg.vit_max_num_patch_per_side, "vit_max_num_patch_per_side"
    elif kind == "edit_vit":  # capped by the vit_* sizes, so that a small model's settings hold for both
        rule = (min(cfg.edit_vit_max_size, cfg.vit_max_size), min(cfg.edit_vit_min_size, cfg.vit_min_size),
                cfg.vit_patch_size, cfg.edit_vit_max_pixels)
        side, table = cfg.vit_max_num_patch_per_side, "vit_max_num_patch_per_side"
    else:
        rule = (cfg.vae_max_size, cfg.vae_min_size, cfg.latent_downsample, cfg.vae_max_pixels)
        side, table = cfg.max_latent_size, "max_latent_size"
    w, h = resize_shape(*img.size, *rule, img_num=img_num)
    stride = rule[2]
    if max(w, h) // stride > side:  # only reachable with settings that skipped DataConfig.check
        raise BadSample("image_too_large", f"{where}: image {img.size[0]}x{img.size[1]} resizes to "
                        f"{w}x{h}, {w // stride}x{h // stride} {kind} tokens, more than the model's "
                        f"{table}={side}: set --data.{kind.replace('_', '-')}-max-size {side * stride} or less")
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)  # = torchvision resize(bicubic, antialias) on PIL
    return to_tensor(img)


# --------------------------------------------------------------------------------------------------
# Records → sequence plans

ROLES = ("system", "user", "assistant")


def record_form(rec: Any, where: str, form: str | None = None) -> str:
    """The form of a record (FORMS): `form` when given (a yaml mixture's `format:`), checked, or the
    first form whose fields the record has."""
    if not isinstance(rec, dict):
        raise BadSample("wrong_type", f"{where}: a record must be an object, got {type(rec).__name__}")
    forms = ", ".join(f"{k} ({' + '.join(v)})" for k, v in FORMS.items())
    if form is not None:
        if form not in FORMS:
            raise packing.UserError(f"{where}: format {form!r} is not one of: {forms}")
        missing = [f for f in FORMS[form] if rec.get(f) is None]
        if missing:
            raise BadSample("wrong_type", f"{where}: format {form} needs the fields {missing} (fields: "
                            f"{sorted(rec)})")
        return form
    for name, fields in FORMS.items():
        if all(rec.get(f) is not None for f in fields):
            return name
    raise BadSample("wrong_type", f"{where}: no 'messages' field (fields: {sorted(rec)}) and no other "
                    f"record form fits: expected one of {forms}")


def parse_record(rec: Any, where: str, rng: random.Random,
                 form: str | None = None) -> list[tuple[str, str, str, Any]]:
    """A record as a flat list of (field, role, kind, value): kind "text" (value: str), "image"
    (value: an image source for `load_image`) or "video" (value: a source or frame list for `load_video`)."""
    form = record_form(rec, where, form)
    if form == "unified_edit":
        return parse_edit_chain(rec, where, rng)
    if form == "vlm_sft":
        return parse_conversations(rec, where)
    if form == "t2i_pretrain":
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
    msgs = rec["messages"]
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
    videos = iter(rec.get("videos") or [])  # and {"type": "video"} the next of `videos`
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
            elif t in ("video", "video_url"):  # qwen_vl_utils / LMMS Engine forms
                v = part.get(t)
                v = v.get("url") if t == "video_url" and isinstance(v, dict) else v
                if v is None and t == "video":
                    v = next(videos, None)
                if v is None or (isinstance(v, str) and not v):
                    raise BadSample("missing_video", f"{where}: {pf}.{t}: missing (and no entry left in "
                                    f"the record's 'videos' column)")
                if role == "assistant":
                    raise BadSample("wrong_type", f"{where}: {pf}: a video can only be an input (BAGEL "
                                    f"generates images, not videos)")
                out.append((pf, role, "video", v))
            else:
                raise BadSample("unknown_part_type", f"{where}: {pf}: unknown part type {t!r}; "
                                f"expected text, image_url, image, video or video_url")
    return out


def parse_edit_chain(rec: dict, where: str, rng: random.Random) -> list[tuple[str, str, str, Any]]:
    """An upstream `unified_edit` row (`image_list`: n images, `instruction_list`: n - 1 lists of
    phrasings of the step from image i to i + 1) sampled as upstream's `UnifiedEditIterableDataset.parse_row`
    (ByteDance-Seed/Bagel data/interleave_datasets/edit_dataset.py), draw for draw with the sample's
    keyed rng: a start image, an end 1 or 2 steps later; a 2-step jump is, with probability 0.5, one
    joined instruction "a. b." (but upstream first moves an end at the last image back one step, so
    that case trains a single step). Images between start and end are targets fed back as context."""
    images, steps = rec["image_list"], rec["instruction_list"]
    if isinstance(steps, (str, bytes)):
        try:
            steps = json.loads(steps)
        except json.JSONDecodeError as e:
            raise BadSample("malformed_json", f"{where}: instruction_list: malformed JSON ({e})") from None
    if not isinstance(images, (list, tuple, np.ndarray)) or not isinstance(steps, (list, tuple, np.ndarray)):
        raise BadSample("wrong_type", f"{where}: image_list and instruction_list must be lists")
    n = len(images)
    if n < 2 or len(steps) < n - 1:
        raise BadSample("wrong_type", f"{where}: image_list has {n} images and instruction_list {len(steps)} "
                        f"steps: an edit chain needs 2 or more images and one instruction list per step")

    def phrase(i):  # a phrasing of step i (image i -> i + 1), drawn as upstream
        opts = [steps[i]] if isinstance(steps[i], str) else list(steps[i])
        if not opts or not all(isinstance(o, str) for o in opts):
            raise BadSample("wrong_type", f"{where}: instruction_list[{i}]: expected a list of strings")
        return rng.choice(opts)

    start = rng.choice(range(n - 1))
    end = rng.choice(range(start + 1, min(start + 3, n)))
    out = [(f"image_list[{start}]", "user", "image", images[start])]
    if end - start > 1 and rng.random() < 0.5:
        if end == n - 1:
            end -= 1
        text = "".join(phrase(i - 1) + ". " for i in range(start + 1, end + 1)).rstrip()
        return out + [(f"instruction_list[{start}:{end}]", "user", "text", text),
                      (f"image_list[{end}]", "assistant", "image", images[end])]
    for i in range(start + 1, end + 1):
        out += [(f"instruction_list[{i - 1}]", "user", "text", phrase(i - 1)),
                (f"image_list[{i}]", "assistant", "image", images[i])]
    return out


def parse_conversations(rec: dict, where: str) -> list[tuple[str, str, str, Any]]:
    """An upstream `vlm_sft` / LLaVA record: `conversations` of {from: human | gpt | system, value},
    `<image>` placeholders in human turns taking the paths of `image` (one or a list) in order, and
    a `<video>` placeholder taking `video`. As upstream's `SftJSONLIterableDataset.change_format`
    (ByteDance-Seed/Bagel data/vlm_dataset.py): a human turn with placeholders is split at them and
    its pieces stripped; gpt turns are the loss. Unlike upstream, placeholders and images must pair
    up (upstream silently misaligns them)."""
    turns = rec["conversations"]
    if isinstance(turns, (str, bytes)):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise BadSample("malformed_json", f"{where}: conversations: malformed JSON ({e})") from None
    if not isinstance(turns, (list, tuple, np.ndarray)):
        raise BadSample("wrong_type", f"{where}: conversations: expected a list of {{from, value}} turns")
    images = rec.get("image")
    images = [] if images is None else [images] if isinstance(images, (str, bytes, dict)) else list(images)
    video = rec.get("video")
    slots = {"<image>": iter(images), "<video>": iter([video] if video is not None else [])}
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    n_ph = {p: sum(t["value"].count(p) for t in turns if isinstance(t, dict) and t.get("from") == "human"
                   and isinstance(t.get("value"), str)) for p in slots}
    if n_ph["<image>"] != len(images) or n_ph["<video>"] != (video is not None):
        raise BadSample("wrong_type", f"{where}: conversations: {n_ph['<image>']} <image> placeholders in "
                        f"human turns for {len(images)} images in 'image', {n_ph['<video>']} <video> for "
                        f"{int(video is not None)} 'video': they must pair up")
    out, used = [], {"<image>": 0, "<video>": 0}
    for ti, t in enumerate(turns):
        f = f"conversations[{ti}]"
        if not isinstance(t, dict) or t.get("from") not in roles or not isinstance(t.get("value"), str):
            raise BadSample("wrong_type", f"{where}: {f}: expected {{from: human | gpt | system, value: str}}")
        role, value = roles[t["from"]], t["value"]
        if role != "user" or not any(p in value for p in slots):
            if value.strip():
                out.append((f"{f}.value", role, "text", value))
            continue
        for piece in re.split("(<image>|<video>)", value):
            if piece in slots:
                used[piece] += 1
                out.append((f"{f}.value {piece} #{used[piece]}", role, piece[1:-1], next(slots[piece])))
            elif piece.strip():
                out.append((f"{f}.value", role, "text", piece.strip()))
    return out


def record_to_items(rec: Any, where: str, folder: str, cfg: DataConfig, tok,
                    rng: random.Random | None = None, form: str | None = None) -> list[dict]:
    """The sequence plan of one record (DESIGN.md#layout).

    - system/user text: no loss; user images: ViT tokens (understanding). A video is its sampled
      frames, each a user image (upstream vlm_sft).
    - assistant text: CE; assistant image: noisy VAE target (MSE).
    - In a sample that generates an image, inputs are CFG conditions (enable_cfg=1) and input
      images also enter as clean VAE latents before their ViT tokens (editing).
    - A generated image that more conversation follows is re-added as clean VAE + ViT, after its
      noisy copy (upstream edit chains), so later turns can see it: a noisy copy is invisible to them.
    - Sizes by role: VAE images 512-1024 px; the ViT copy of an image that also enters as clean VAE
      latents (any input of a sample that generates an image) 224-518 px (upstream `unified_edit`);
      other ViT images 378-980 px, sharing one pixel budget (upstream VLM SFT).
    Image items carry `option`: the --data option that sets their size (for the too-long error).
    """
    rng = rng or random.Random(0)
    parts = parse_record(rec, where, rng, form)
    if not parts:
        raise BadSample("empty_conversation", f"{where}: messages: no text and no image")
    if not any(role == "assistant" for _, role, _, _ in parts):
        raise BadSample("no_loss_token", f"{where}: messages: no assistant text or image, so nothing "
                        f"to train on")
    gen = any(role == "assistant" and kind == "image" for _, role, kind, _ in parts)
    # fail rather than feed the model inputs it has no module for: they would silently attend to zeros
    if gen and not cfg.visual_gen:
        raise BadSample("needs_visual_gen", f"{where}: an assistant image is a generation target, but "
                        f"visual_gen is off (--visual-gen False, or the checkpoint's config)")
    if not gen and not cfg.visual_und and any(kind in ("image", "video") for _, _, kind, _ in parts):
        raise BadSample("needs_visual_und", f"{where}: an input image needs the ViT, but visual_und "
                        f"is off (--visual-und False, or the checkpoint's config)")
    expanded = []  # a video part becomes its sampled frames, each a (PIL image, label)
    for f, role, kind, value in parts:
        if kind == "video":
            expanded += [(f, role, "frame", (img, f"{role} {label}"))
                         for img, label in load_video(value, folder, f"{where}: {f}", cfg, rng)]
        else:
            expanded.append((f, role, kind, value))
    parts = expanded
    last = len(parts) - 1
    n_vit = sum(kind in ("image", "frame") and (role != "assistant" or i < last)
                for i, (_, role, kind, _) in enumerate(parts))
    items = []

    def text(ids, loss, cfg_, desc):
        items.append(dict(type="text", ids=ids, loss=loss, enable_cfg=cfg_, desc=desc))

    def image(t, img, loss, cfg_, desc, option):
        items.append(dict(type=t, image=img, loss=loss, enable_cfg=cfg_, option=option,
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
        pil, label = value if kind == "frame" else (load_image(value, folder, w, cfg.truncated_images),
                                                     f"{role} image")
        first = len(items)

        def vit(desc):
            if not cfg.visual_und:  # without the ViT, edits condition on the clean VAE copy only
                return
            if gen:  # this image also enters as clean VAE latents: the edit sizing, one image each
                image("vit_image", transform(pil, "edit_vit", cfg, 1, w), 0, 1, desc, "edit_vit_max_size")
            else:  # the sample's ViT images share one pixel budget (upstream VLM `img_num`)
                image("vit_image", transform(pil, "vit", cfg, max(n_vit, 1), w), 0, 0, desc, "vit_max_size")

        if role == "assistant":
            vae = transform(pil, "vae", cfg, 1, w)
            image("vae_image", vae, 1, 0, "assistant image → noisy VAE target", "vae_max_size")
            if i < last:  # more conversation follows: it conditions on the clean image
                image("vae_image", vae, 0, 1, "assistant image → clean VAE copy", "vae_max_size")
                vit("assistant image → ViT copy")
        else:
            if gen:
                image("vae_image", transform(pil, "vae", cfg, 1, w), 0, 1, f"{label} → clean VAE",
                      "vae_max_size")
            vit(f"{label} → ViT")
        if len(items) > first:  # counted once per image, on its first item, for the data line
            low = cfg.vae_min_size if gen else cfg.vit_min_size
            items[first]["notes"] = dict(images=1, upscaled_small=int(min(pil.size) < low),
                                         extreme_aspect=int(max(pil.size) > EXTREME_ASPECT * min(pil.size)),
                                         truncated=int(bool(pil.info.get("truncated"))))
    return items


def n_tokens(it: dict, cfg: DataConfig) -> int:
    """Tokens of one sequence-plan item before CFG dropout: text + BOS/EOS, or image grid + 2 markers."""
    if it["type"] == "text":
        return len(it["ids"]) + 2
    stride = cfg.vit_patch_size if it["type"] == "vit_image" else cfg.latent_downsample
    return it["image"].shape[1] // stride * (it["image"].shape[2] // stride) + 2


def cut_steps(items: list[dict], cfg: DataConfig, rng: random.Random) -> tuple[list[dict], str] | None:
    """A multi-step edit over packing_length cut to its longest run of consecutive steps that fits
    (counted before CFG dropout), one of equally long runs drawn with the sample's keyed rng so that
    every step of long chains is trained; None when not even one step fits.

    Step k ends with the k-th generated image (its noisy VAE target). A run from step a on starts
    from the clean VAE + ViT copies of image a - 1 (as upstream's `unified_edit` starts from any image
    of a chain); for a run that starts at the first step, everything before it (system text, the
    input images) is kept. A run that ends before the last step drops the copies of its last target
    and all that follows. Returns the items and a note for the sample's name."""
    t = [i for i, it in enumerate(items) if it["type"] == "vae_image" and it["loss"]]
    if len(t) < 2:
        return None
    size = [n_tokens(it, cfg) for it in items]
    runs = []
    for a in range(len(t)):
        for b in range(a, len(t)):
            keep = list(range(0 if a == 0 else t[a - 1] + 1, t[b] + 1))
            keep += list(range(t[b] + 1, len(items))) if b == len(t) - 1 else []
            if a == 0 and b == len(t) - 1:
                continue  # the whole record, known not to fit
            if sum(size[i] for i in keep) <= cfg.packing_length:
                runs.append((b - a, a, b, keep))
    if not runs:
        return None
    best = max(r[0] for r in runs)
    _, a, b, keep = rng.choice([r for r in runs if r[0] == best])
    return [items[i] for i in keep], f" (cut to steps {a + 1}-{b + 1} of {len(t)})"


# --------------------------------------------------------------------------------------------------
# Readers. A file is read in units (a parquet row group, an Arrow record batch, 1024 json/jsonl
# lines): the unit of sharding and of caching. Each source holds one unit at a time, as Arrow data
# (or raw lines), and only the rows taken are turned into Python objects. Arrow files are
# memory-mapped.

INDEX_CHUNK = 1 << 24  # bytes index_lines reads at a time
INDEX_KEEP_DAYS = 7  # a line index no run used for this long is deleted when another is built (line_index)
_SPACE = np.zeros(256, dtype=bool)
_SPACE[list(b" \t\n\r\x0b\x0c")] = True  # the bytes bytes.strip() strips: a line of only these is blank


def index_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets of the non-blank lines of a .jsonl file and of its end, and the 1-based line number
    of each (so that an error names the line an editor shows). Read in chunks, each scanned with numpy."""
    offsets, lines, pos, no, rest = [], [], 0, 0, b""
    try:
        with open_file(path) as fh:
            while True:
                chunk = fh.read(INDEX_CHUNK)
                block = rest + chunk if rest else chunk  # rest: a line begun in the chunk before
                b = np.frombuffer(block, dtype=np.uint8)
                ends = np.flatnonzero(b == ord("\n")) + 1  # where each line ends, after its newline
                if not chunk and len(b) > (ends[-1] if len(ends) else 0):  # a last line without a newline
                    ends = np.append(ends, len(b))
                if len(ends):
                    starts = np.concatenate([[0], ends[:-1]])
                    full = ~_SPACE[b[starts]]  # a line is blank only if it starts with whitespace: those are checked whole
                    for i in np.flatnonzero(~full).tolist():
                        full[i] = bool(block[starts[i]:ends[i]].strip())
                    offsets.append(pos + starts[full])
                    lines.append(no + 1 + np.flatnonzero(full))
                    pos, no, rest = pos + int(ends[-1]), no + len(ends), block[ends[-1]:]
                else:
                    rest = block
                if not chunk:
                    break
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return np.concatenate(offsets + [[pos]]).astype(np.int64), np.concatenate(lines + [[]]).astype(np.uint32)


def line_index(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`index_lines` of a .jsonl file, computed once per node and memory-mapped, so the ranks of a
    node share one copy. It is kept in $TMPDIR/bagel-train-index, named by the file's path and its
    size and modification time; a node-local folder because locks are reliable there, and the data
    folder may be read-only and the output folder on a filesystem shared by nodes. Every step is
    taken under the folder's lock: the first process builds the index (the others wait), and each
    touches it when it uses it. Building one deletes the indexes of other versions of the file and
    those no run used for INDEX_KEEP_DAYS (an index is ~12 bytes a line: the folder must not grow
    forever); a run that has an index mapped keeps its copy."""
    import fcntl
    import hashlib
    import tempfile
    if is_remote(path):  # each process indexes a remote file itself (no shared local name for it)
        return index_lines(path)
    st = os.stat(path)
    name = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    version = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
    folder = os.path.join(tempfile.gettempdir(), "bagel-train-index")
    base = os.path.join(folder, f"{name}-{version}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(base + ".npy"):
                old = time.time() - INDEX_KEEP_DAYS * 86400
                for f in os.scandir(folder):
                    if f.name != "lock" and (f.name.startswith(name + "-") or f.stat().st_mtime < old):
                        os.remove(f.path)
                offsets, lines = index_lines(path)
                for ext, a in ((".lines.npy", lines), (".npy", offsets)):  # offsets last: they mark a complete index
                    np.save(base + ".tmp.npy", a)
                    os.replace(base + ".tmp.npy", base + ext)
            for ext in (".npy", ".lines.npy"):
                os.utime(base + ext)  # the last use, which pruning goes by
            # mapped under the lock: once mapped, a prune of another process cannot take it away
            return np.load(base + ".npy", mmap_mode="r"), np.load(base + ".lines.npy", mmap_mode="r")
    except OSError:  # no writable temporary folder: index in this process
        return index_lines(path)


class DataFile:
    """One data file, read in units. No file stays open between two reads (a source may have
    thousands of files); the parquet footer is parsed once and reused."""

    def __init__(self, path: str):
        self.path, self.ext = path, Path(path).suffix.lower()
        self.meta = self.rows = None
        self.size = file_size(path)
        if self.ext == ".jsonl":  # indexed once per node; the workers inherit it
            self.offsets, self.lines = line_index(path)
        elif self.ext == ".json":
            # a JSON list cannot be streamed without a streaming parser: loaded whole (use .jsonl
            # or parquet for big data)
            try:
                with open_file(path) as fh:
                    self.rows = json.loads(fh.read())
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: cannot read: {e}") from None
            if not isinstance(self.rows, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(self.rows).__name__}")
        elif self.ext not in (".parquet", ".arrow"):
            raise DataError(f"{path}: unknown data file type {self.ext!r}; expected one of {DATA_EXTS}")
        names = []
        try:
            if self.ext == ".parquet":
                with self.open() as h:
                    self.meta, names = h.metadata, h.schema_arrow.names
                md = self.meta
                self.unit_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
                big = max([md.row_group(i).total_byte_size for i in range(md.num_row_groups)], default=0)
                if big > BIG_UNIT_BYTES:
                    print(f"data: warning: {path} has row groups of up to {big / 2**20:,.0f} MB: a data worker "
                          f"needs about twice that to decode one (write the file with row groups of "
                          f"{BIG_UNIT_BYTES // 2**20} MB or less)", file=sys.stderr)
            elif self.ext == ".arrow":
                batches = self.batches()
                self.unit_rows, names = [b.num_rows for b in batches], batches[0].schema.names if batches else []
            else:
                n = len(self.offsets) - 1 if self.ext == ".jsonl" else len(self.rows)
                self.unit_rows = [min(LINES_PER_UNIT, n - s) for s in range(0, n, LINES_PER_UNIT)]
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        # parquet and Arrow: only the columns a record can use are read (None: all, so that the error
        # for a file without `messages` or `image` + `captions` lists its fields)
        cols = [c for c in names if c in RECORD_FIELDS]
        self.columns = cols if any(set(f) <= set(cols) for f in FORMS.values()) else None
        self.unit_start = np.concatenate([[0], np.cumsum(self.unit_rows)]).astype(np.int64)
        self.unit_bytes = [0] * len(self.unit_rows)  # parquet: the read columns' uncompressed bytes per row group
        if self.ext == ".parquet":
            groups = (self.meta.row_group(i) for i in range(self.meta.num_row_groups))
            self.unit_bytes = [sum(c.total_uncompressed_size for c in map(rg.column, range(rg.num_columns))
                                   if self.columns is None or c.path_in_schema.split(".")[0] in self.columns)
                               for rg in groups]

    def open(self):
        """A new reader of a parquet file, or the file itself (callers close it)."""
        if self.ext == ".parquet":
            # pre_buffer (pyarrow's default) keeps the last row group read in a read-ahead cache;
            # without buffer_size a column chunk is read whole into one more buffer before its pages
            # are decoded: pyarrow peaks at ~3 row groups instead of ~2 (dev/bench_data.py)
            return pq.ParquetFile(open_file(self.path) if is_remote(self.path) else self.path, metadata=self.meta,
                                  pre_buffer=False, buffer_size=1 << 20)
        return open_file(self.path)

    def batches(self, unit: int | None = None) -> list:
        """The record batches of an Arrow file (or only batch `unit`), memory-mapped: they keep the
        mapping, not a file handle."""
        with (open_file(self.path) if is_remote(self.path) else pa.memory_map(self.path)) as src:
            try:  # Arrow IPC file format (random access)...
                r = pa.ipc.open_file(src)
                return [r.get_batch(i) for i in (range(r.num_record_batches) if unit is None else [unit])]
            except pa.ArrowInvalid:  # ...or the stream format, used by HF `datasets` shards
                src.seek(0)
                return [b for i, b in enumerate(pa.ipc.open_stream(src)) if unit is None or i == unit]

    def unit_name(self, unit: int, first: int = 0, n: int | None = None) -> str:
        a, b = int(self.unit_start[unit]), int(self.unit_start[unit + 1])
        if self.ext == ".jsonl":
            return f"lines {self.line(a)}-{self.line(b - 1)}"
        piece = f"{a + first}-{a + first + n - 1} of " if n is not None and n < b - a else ""
        return f"{'row group' if self.ext == '.parquet' else 'record batch'} {unit} (rows {piece}{a}-{b - 1})"

    def load(self, unit: int, first: int = 0, n: int | None = None) -> Any:
        """The rows of one unit, as stored (Arrow table/batch, a slice of the JSON list, raw lines);
        of a parquet row group, rows first..first + n - 1 may be asked (a piece, see Source.cut).
        A unit that cannot be read raises ReadError naming the file, the unit and the field."""
        a, b = int(self.unit_start[unit]), int(self.unit_start[unit + 1])
        if self.ext == ".json":
            return self.rows[a:b]
        try:
            if self.ext == ".arrow":
                batch = self.batches(unit)[0]
                return batch.select(self.columns) if self.columns else batch
            with self.open() as h:
                if self.ext == ".jsonl":
                    h.seek(int(self.offsets[a]))
                    return h.read(int(self.offsets[b] - self.offsets[a]))
                md = self.meta.row_group(unit)
                n = b - a if n is None else n
                # batches no longer than the piece: the rows decoded past its end are wasted
                batch = min(n, max(1, PARQUET_BATCH_BYTES * md.num_rows // max(md.total_byte_size, 1)))
                end, pos, out = first + n, 0, []
                # a parquet reader cannot seek inside a row group: the rows before a piece are decoded
                # and dropped, and the reader is closed after it (an open one holds its column pages)
                for rb in h.iter_batches(batch, row_groups=[unit], columns=self.columns, use_threads=False):
                    lo, hi, pos = max(first - pos, 0), min(end - pos, len(rb)), pos + len(rb)
                    if lo < hi:  # a batch cut at a piece's edge is copied: a slice would keep all of it
                        out.append(rb if hi - lo == len(rb) else rb.slice(lo, hi - lo).take(np.arange(hi - lo)))
                    if pos >= end:
                        break
                return pa.Table.from_batches(out)
        except (pa.ArrowException, OSError, EOFError, IndexError) as e:
            why = " ".join("".join(c if c.isprintable() else " " for c in str(e)).split())  # one line
            raise ReadError("unreadable_unit", f"{self.path}: {self.unit_name(unit, first, n)}"
                            f"{self.bad_field(unit)}: cannot read ({type(e).__name__}: {why})") from None

    def bad_field(self, unit: int) -> str:
        """`: field 'x'` for the first parquet column of the unit that cannot be decoded alone."""
        if self.ext != ".parquet":
            return ""
        for c in self.columns or self.meta.schema.to_arrow_schema().names:
            try:
                with self.open() as h:
                    h.read_row_group(unit, columns=[c], use_threads=False)
            except (pa.ArrowException, OSError, EOFError):
                return f": field {c!r}"
        return ""

    def line(self, r: int) -> int:
        """The 1-based line number of non-blank line r of a .jsonl file."""
        return int(self.lines[r])

    def record(self, rows: Any, unit: int, row: int, first: int = 0) -> tuple[str, Any]:
        """(where, record) of row `row` of a loaded unit (or piece from row `first` of it); `where`
        names file and row for errors."""
        r = int(self.unit_start[unit]) + first + row
        # a jsonl record is named by its line in the file (1-based, as editors count), others by row index
        where = f"{self.path}: line {self.line(r)}" if self.ext == ".jsonl" else f"{self.path}: row {r}"
        if self.ext in (".parquet", ".arrow"):
            return where, rows.slice(row, 1).to_pylist()[0]
        if self.ext == ".json":
            return where, rows[row]
        base = self.offsets[int(self.unit_start[unit])]
        try:
            return where, json.loads(rows[self.offsets[r] - base:self.offsets[r + 1] - base])
        except json.JSONDecodeError as e:
            raise BadSample("malformed_json", f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None


def data_files(path: str) -> list[str]:
    """The data files of a --data path: a file, a directory (searched recursively) or a glob
    (`shards/*.parquet`), local or remote."""
    import pyarrow.fs as pafs
    fs, p = filesystem(path)
    prefix = path[:len(path) - len(p)] if is_remote(path) and path.endswith(p) else ""  # s3:// etc.
    found = lambda base: sorted(f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                                if f.type == pafs.FileType.File)
    if any(c in p for c in "*?["):
        base = p[:min(p.find(c) for c in "*?[" if c in p)].rsplit("/", 1)[0]
        files = [f for f in found(base) if fnmatch.fnmatch(f, p) and Path(f).suffix.lower() in DATA_EXTS]
        if not files:
            raise DataError(f"{path}: the pattern matches no data files ({', '.join(DATA_EXTS)})")
        return [prefix + f for f in files]
    try:
        kind = fs.get_file_info(p).type
    except OSError as e:  # a remote store that cannot be reached, or a denied bucket
        raise DataError(f"{path}: cannot read: {e}") from None
    if kind == pafs.FileType.Directory:
        files = [f for f in found(p) if Path(f).suffix.lower() in DATA_EXTS and Path(f).name not in HF_METADATA]
        if not files:
            raise DataError(f"{path}: directory holds no data files ({', '.join(DATA_EXTS)})")
        return [prefix + f for f in files]
    if kind == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file or directory")
    if Path(p).suffix.lower() not in DATA_EXTS:
        raise DataError(f"{path}: unknown data file type; expected {', '.join(DATA_EXTS)}, a "
                         f"directory or a .yaml mixture")
    return [path if is_remote(path) else str(Path(path))]


class Source:
    """One entry of the mixture: some files, a weight, and the folder relative image paths are in.

    Epoch e shuffles the units with a seed of (seed, source, e) and lays their rows end to end, each
    unit's rows in an order shuffled with (seed, source, e, unit). The n shards take consecutive
    slices of that sequence (`deal`), so a shard reads few units, most of them whole, each shard
    reads the same number of rows within one, and a unit is cut into row ranges only where a slice
    ends inside it. The odd rows (rows mod n) go to other shards each epoch, so a source with fewer
    rows than shards is read by the shards in turn. A sample is named by the key (source, epoch,
    unit, place in the unit's row order): it is found again from its key alone, whatever the shard.
    A source holds one unit at a time; in a mixture of many parquet sources a unit is a piece of a
    row group (`cut`).
    """

    def __init__(self, name: str, files: list[str], weight: float, folder: str | None, index: int,
                 seed: int, form: str | None = None, skip_bad: bool = False):
        self.name, self.weight, self.index, self.seed = name, float(weight), index, seed
        self.form = form  # FORMS key named in a yaml mixture; None: detected per record
        self.files, self.unreadable = [], []  # unreadable: (file, error) skipped under skip_bad
        for f in files:
            try:
                self.files.append(DataFile(f))
            except DataError as e:  # e.g. a truncated parquet file: its footer is gone
                if not skip_bad:
                    raise
                self.unreadable.append((f, str(e)))
        files = [f.path for f in self.files]
        self.folders = [folder if folder is not None else parent(f) for f in files]
        # (file, unit of the file, rows, first of them): a whole unit, until `cut` makes pieces
        self.units = [(fi, ui, n, 0) for fi, f in enumerate(self.files)
                      for ui, n in enumerate(f.unit_rows) if n > 0]
        self.n_rows = sum(u[2] for u in self.units)
        if self.n_rows == 0:
            raise DataError(f"{name}: no rows")
        if self.weight <= 0:
            raise DataError(f"{name}: mixture weight must be > 0, got {weight}")
        self.dealt = (0, self.n_rows)  # set by find_sources: rows of the sources before it, of all sources
        self._unit: tuple = (None, None)  # (unit, its rows): the one unit this source holds
        self._order: tuple = (None, None)  # ((epoch, unit), row order)

    def cut(self, most: float):
        """Makes each parquet row group of more than `most` bytes (read columns, uncompressed) into
        pieces of equal rows, each a unit of its own: a worker holds one unit per source, so the
        pieces bound its memory whatever the number of sources. Rows are shuffled within a piece only,
        and a piece is read by decoding its row group from the start (find_sources sets `most`)."""
        units = []
        for fi, ui, n, _ in self.units:
            k = min(n, max(1, math.ceil(self.files[fi].unit_bytes[ui] / most)))
            units += [(fi, ui, (j + 1) * n // k - j * n // k, j * n // k) for j in range(k)]
        self.units = units

    def plan(self, epoch: int, shard: int, n_shards: int) -> list[tuple[int, int, int]]:
        """The (unit, start, end) ranges of the unit row orders that `shard` reads in `epoch`."""
        order = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(self.units))
        before, total = self.dealt  # rows of the sources before this one, and of all sources
        return deal([(int(u), 0, self.units[u][2]) for u in order], shard, n_shards, epoch * total + before)

    def read(self, key: tuple[int, int, int, int]) -> tuple[str, str, Any]:
        _, epoch, u, place = key
        fi, ui, n, first = self.units[u]
        if self._order[0] != (epoch, u):
            self._order = ((epoch, u), np.random.default_rng([self.seed, self.index, epoch, u]).permutation(n))
        if self._unit[0] != u:
            self._unit = (None, None)  # free the old unit before reading the new one
            self._unit = (u, self.files[fi].load(ui, first, n))
        where, rec = self.files[fi].record(self._unit[1], ui, int(self._order[1][place]), first)
        return where, self.folders[fi], rec


def deal(ranges: list, shard: int, n_shards: int, base: int = 0) -> list[tuple[int, int, int]]:
    """Shard `shard`'s slice of the N rows of `ranges` ((unit, start, end), in reading order), as if
    `base` rows had been dealt before: shard s takes floor((base + N + s) / n) - floor((base + s) / n)
    rows, N // n or N // n + 1. Dealt on from one base to the next (epochs, mixture sources), the odd
    rows go round all shards, so that no shard ever has more than one row more than another."""
    sizes = np.array([b - a for _, a, b in ranges], dtype=np.int64)
    n_rows = int(sizes.sum())
    t = np.arange(n_shards, dtype=np.int64)
    counts = (base + n_rows + t) // n_shards - (base + t) // n_shards  # rows of each shard ...
    lo, hi = int(counts[:shard].sum()), int(counts[:shard + 1].sum())  # ... and this one's slice
    out, pos = [], 0
    for (u, a, b), n in zip(ranges, sizes.tolist()):
        if pos < hi and pos + n > lo:
            out.append((int(u), a + max(lo - pos, 0), a + min(hi - pos, n)))
        pos += n
    return out


def find_sources(paths: tuple[str, ...] | list[str], seed: int = 0, skip_bad: bool = False,
                 held_row_groups: float = DataConfig.held_row_groups) -> list[Source]:
    """--data values → mixture sources. `x.yaml` is a mixture (`datasets: [{path, weight,
    data_folder, format}]`, paths relative to the yaml file, local or remote; `format` names a FORMS
    key, otherwise each record's form is detected from its fields); `path:weight` weights a plain path."""
    entries = []  # (name, path, weight, folder, form)
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
                with open_file(p) as fh:
                    cfg = yaml.safe_load(fh.read())
            except (OSError, yaml.YAMLError) as e:
                raise DataError(f"{p}: cannot read the mixture: {e}") from None
            ds = cfg.get("datasets") if isinstance(cfg, dict) else None
            if not isinstance(ds, list) or not ds:
                raise DataError(f"{p}: expected `datasets: [{{path, weight, data_folder, format}}, ...]`")
            base = parent(p)
            for i, e in enumerate(ds):
                if not isinstance(e, dict) or "path" not in e:
                    raise DataError(f"{p}: datasets[{i}]: needs a `path`")
                form = e.get("format")
                if form is not None and form not in FORMS:
                    raise DataError(f"{p}: datasets[{i}]: format {form!r} is not one of "
                                            f"{', '.join(FORMS)}")
                folder = e.get("data_folder")
                folder = join(base, str(folder)) if folder else None
                entries.append((f"{p}: datasets[{i}]", join(base, str(e["path"])),
                                float(e.get("weight", 1.0)) * weight, folder, form))
        else:
            entries.append((p, p, weight, None, None))
    srcs = [Source(name, data_files(path), w, folder, i, seed, form, skip_bad)
            for i, (name, path, w, folder, form) in enumerate(entries)]
    parquet = [s for s in srcs if any(f.ext == ".parquet" for f in s.files)]
    big = max((b for s in parquet for f in s.files for b in f.unit_bytes), default=0)
    for s in parquet:  # the units held, one per source, add up to about held_row_groups row groups
        s.cut(max(held_row_groups * big / len(parquet), 1))
    starts = np.cumsum([0] + [s.n_rows for s in srcs]).tolist()
    for s, before in zip(srcs, starts):  # the sources are dealt as one sequence, epoch after epoch
        s.dealt = (before, starts[-1])
    return srcs


# --------------------------------------------------------------------------------------------------
# Iteration: per shard (rank, worker), a deterministic stream of samples into a first-fit packer.
# Everything random is keyed: the mixture draw by (seed, shard, draw number), a sample's caption
# choice and CFG dropout by (seed, sample key), timesteps by (seed, rank, step). So a state of a few
# counters (+ the keys of the samples waiting in open packs) resumes the stream exactly.

@dataclass
class Sample:
    key: tuple[int, int, int, int]  # (source, epoch, unit, place in the unit's row order)
    where: str
    layout: packing.Layout
    notes: Counter = None  # images upscaled, of extreme aspect, truncated; cut_to_fit (ShardStream.make)

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
        n_src, s = len(ds.sources), state or {}
        self.draws = s.get("draws", 0)
        # per source: [epoch, index in this epoch's plan, place in that range]
        self.pos = [list(p) for p in s.get("pos", [[0, 0, 0]] * n_src)]
        # per source: the plan of the current epoch when it is not Source.plan's (set by continue_from)
        self.plans = [p and [tuple(r) for r in p] for p in s.get("plans", [None] * n_src)]
        self.tried, self.bad = list(s.get("tried", [0] * n_src)), list(s.get("bad", [0] * n_src))
        self.packs, self.samples, self.tokens = s.get("packs", 0), s.get("samples", 0), s.get("tokens", 0)
        self.skips = Counter(s.get("skips", {}))
        self.notes = [Counter(c) for c in s.get("notes", [{}] * n_src)]  # per source: Sample.notes summed
        self._plan: dict[int, tuple] = {}  # source → (epoch, Source.plan of this shard)
        for keys in s.get("open", []):  # re-read the samples that waited in open packs
            samples = [self.make(tuple(k)) for k in keys]
            self.packer.open.append(samples)
            self.packer.used.append(sum(x.n for x in samples))

    def state(self) -> dict:
        return dict(shard=self.vshard, draws=self.draws, pos=[list(p) for p in self.pos],
                    plans=[p and [list(r) for r in p] for p in self.plans], tried=list(self.tried),
                    bad=list(self.bad), packs=self.packs, samples=self.samples, tokens=self.tokens,
                    skips=dict(self.skips), notes=[dict(c) for c in self.notes],
                    open=[[list(x.key) for x in p] for p in self.packer.open])

    def plan(self, i: int) -> list[tuple[int, int, int]]:
        epoch = self.pos[i][0]
        if self.plans[i] is not None:
            return self.plans[i]
        if self._plan.get(i, (None,))[0] != epoch:
            self._plan[i] = (epoch, self.ds.sources[i].plan(epoch, self.shard, self.n_shards))
        return self._plan[i][1]

    def ready(self, i: int) -> bool:
        """Move source i's position to its next row; False when it has none left for this shard.
        An epoch in which this shard reads no row of the source (fewer rows than shards) is passed
        over: the next epoch deals the odd rows to other shards."""
        while self.cfg.epochs is None or self.pos[i][0] < self.cfg.epochs:
            epoch, j, place = self.pos[i]
            plan = self.plan(i)
            if j < len(plan) and plan[j][1] + place < plan[j][2]:
                return True
            if j + 1 < len(plan):
                self.pos[i] = [epoch, j + 1, 0]
            else:
                self.pos[i], self.plans[i] = [epoch + 1, 0, 0], None
        return False

    def next_key(self) -> tuple[int, int, int, int] | None:
        srcs = self.ds.sources
        live = [i for i in range(len(srcs)) if self.ready(i)]
        if not live:
            return None
        u = np.random.default_rng([self.cfg.seed, self.shard, self.draws]).random()
        self.draws += 1
        cum = np.cumsum([srcs[i].weight for i in live])
        i = live[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(live) - 1)]
        epoch, j, place = self.pos[i]
        unit, start, _ = self.plan(i)[j]
        self.pos[i][2] += 1
        return i, epoch, unit, start + place

    def make(self, key: tuple[int, int, int, int]) -> Sample:
        """The sample at `key`, laid out; raises BadSample."""
        cfg = self.cfg
        where, folder, rec = self.ds.sources[key[0]].read(key)
        rng = random.Random(":".join(map(str, (cfg.seed, *key))))  # str seeds are stable across processes
        items = record_to_items(rec, where, folder, cfg, self.ds.tok, rng, self.ds.sources[key[0]].form)
        dropout = (cfg.text_cond_dropout, cfg.vit_cond_dropout, cfg.vae_cond_dropout)
        lay = packing.layout_sample(items, self.ds.specials, self.ds.geo, dropout, rng)
        cut = False
        if lay.n > cfg.packing_length:
            if (fit := cut_steps(items, cfg, rng)) is None:
                raise BadSample("too_long", too_long(where, lay.n, items, cfg))
            items, note = fit
            where, cut = where + note, True
            lay = packing.layout_sample(items, self.ds.specials, self.ds.geo, dropout, rng)
        notes = Counter(cut_to_fit=int(cut))
        for it in items:
            notes.update(it.get("notes", {}))
        return Sample(key, where, lay, notes)

    def emit(self, pack: list[Sample]) -> tuple[list[Sample], dict, dict]:
        # packs of this shard are steps k*n_workers + vshard of the rank: the DataLoader takes one
        # pack from each worker in turn, so this is the order the training loop sees them in
        step = self.packs * self.n_workers + self.vshard
        batch = packing.collate([s.layout for s in pack],
                                packing.step_generator(self.cfg.seed, self.ds.rank, step), geo=self.ds.geo)
        self.packs += 1
        self.samples += len(pack)
        self.tokens += sum(s.n for s in pack)
        for s in pack:
            self.notes[s.key[0]].update(s.notes or {})
        return pack, batch, self.state()

    def __iter__(self):
        """Yields (samples, batch, state after this pack)."""
        while True:
            key = self.next_key()
            if key is None:  # finite run (epochs set) and every source done
                while self.packer.open:  # one at a time: each state still lists the packs not yet emitted
                    yield self.emit(self.packer.pop(0))
                return
            i = key[0]
            self.tried[i] += 1
            try:
                sample = self.make(key)
            except ReadError as e:
                if not self.cfg.skip_bad:
                    raise
                # the unit's rows this shard was to read are lost, the key's and the rest of its range;
                # they are not held against the source (the > MAX_SKIPPED stop): a shard reads few
                # units, so one damaged row group would look like most of the source
                self.tried[i] -= 1
                _, start, end = self.plan(i)[self.pos[i][1]]
                self.skips[e.reason] += 1 + end - start - self.pos[i][2]
                self.pos[i][2] = end - start
                continue
            except BadSample as e:
                if e.reason == "too_long" and self.cfg.skip_too_long:  # valid, just big: not a sign of a broken source
                    self.skips[e.reason] += 1
                    self.notes[i]["too_long"] += 1
                    # as many records as the source has and none fits: an endless run would spin here
                    if self.notes[i]["too_long"] == self.tried[i] >= self.ds.sources[i].n_rows:
                        raise DataError(f"{self.ds.sources[i].name}: none of the {self.tried[i]} records read so "
                                        f"far fits; the last: {e}") from None
                    continue
                if not self.cfg.skip_bad:
                    raise
                self.skips[e.reason] += 1
                self.bad[i] += 1
                if self.tried[i] >= SKIP_CHECK_AFTER and self.bad[i] > MAX_SKIPPED * self.tried[i]:
                    raise DataError(
                        f"{self.ds.sources[i].name}: {self.bad[i]} of the {self.tried[i]} records read "
                        f"so far are bad (--data.skip-bad allows {MAX_SKIPPED:.0%}); the last: {e}") from None
                continue
            for p in self.packer.add(sample):
                yield self.emit(p)


def too_long(where: str, n: int, items: list[dict], cfg: DataConfig) -> str:
    """The error for a sample over the budget: its largest part and the option that shrinks it."""
    big = max(items, key=lambda it: n_tokens(it, cfg))
    fix = f"lower --data.{big['option'].replace('_', '-')}" if "option" in big else "shorten the text"
    return (f"{where}: sample has {n:,} tokens, more than --data.packing-length {cfg.packing_length}; its "
            f"largest part is the {big['desc']} with {n_tokens(big, cfg):,} tokens: {fix} or raise "
            f"--data.packing-length (only multi-step edits are cut, to their longest run of steps "
            f"that fits; --data.skip-too-long skips such records)")


class PackedDataset(torch.utils.data.IterableDataset):
    """Packed batches of one rank; each DataLoader worker is its own shard."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        cfg.check()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tok = load_tokenizer(cfg.model)
        self.specials = special_tokens(self.tok)
        self.geo = cfg.geometry()
        self.sources = find_sources(cfg.data, cfg.seed, cfg.skip_bad, cfg.held_row_groups)
        self.rotate, self.resume = 0, {}
        n_shards = world_size * max(cfg.num_workers, 1)
        for src in self.sources:
            for f, e in src.unreadable if rank == 0 else []:
                print(f"data: skipped (--data.skip-bad), cannot be opened: {e}", file=sys.stderr)
            if src.n_rows < n_shards and rank == 0:
                print(f"data: {src.name} has {src.n_rows} rows for {n_shards} shards (ranks x workers): "
                      f"each epoch {src.n_rows} of them read one row, in turn", file=sys.stderr)

    def stream(self, vshard: int = 0, n_workers: int = 1) -> ShardStream:
        return ShardStream(self, vshard, n_workers, self.resume.get(vshard))

    def check_records(self):
        """Start-up check (train.check_args): a record of each source's first unit parses and fits
        --data.packing-length; a few long records are skipped under --data.skip-too-long, a budget that
        none of them fits is an error. The units read are let go: the DataLoader workers would
        otherwise each inherit (or be sent) one per source, and the trainer would keep them."""
        stream = self.stream()
        try:
            for i, src in enumerate(self.sources):
                n = min(16, src.units[0][2])
                for k in range(n):
                    try:
                        stream.make((i, 0, 0, k))  # key (source, epoch, unit, place): see Source
                        break
                    except BadSample as e:
                        if e.reason != "too_long" or not self.cfg.skip_too_long or k == n - 1:
                            raise
        finally:
            for src in self.sources:
                src._unit = (None, None)  # the one unit a source holds (Source.read)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        # after a resume the DataLoader starts again at worker 0, so worker w plays the shard whose
        # turn it is: `rotate` is the number of packs consumed modulo the number of workers
        try:
            for _, batch, state in self.stream((w + self.rotate) % nw, nw):
                yield dict(to_uint8(batch, self.geo), _state=state)
        except packing.UserError as e:  # a bad record, or a file that cannot be read
            if info is None:
                raise
            yield e  # PackLoader raises it: raised here, the user would get it inside a worker traceback


def to_uint8(batch: dict, geo: Geometry) -> dict:
    """The pack's pixels as uint8 for the trip out of a DataLoader worker, through shared memory:
    a quarter of the bytes (a 1024x1024 edit pack: ~7 MB, not ~28). Exact: every pixel is k/127.5 - 1
    for an integer k (`to_tensor`), and padding is restored from `_image_hw` by `to_float`."""
    k = lambda x: x.add(1).mul_(127.5).round_().to(torch.uint8)
    return dict(batch, padded_images=k(batch["padded_images"]), packed_vit_tokens=k(batch["packed_vit_tokens"]),
                _image_hw=[(h * geo.latent_down, w * geo.latent_down) for h, w in batch["patchified_vae_latent_shapes"]])


def to_float(batch: dict) -> dict:
    """Undo `to_uint8` where the pack is used (on its device: the training step), bit for bit as
    `to_tensor` computes the pixels; the zero padding of `padded_images` is restored. A float pack
    is returned as it is."""
    if "_image_hw" not in batch:
        return batch
    b = dict(batch)
    pix = lambda x: (x.float() / 255 - 0.5) / 0.5  # = to_tensor's arithmetic
    imgs = pix(b["padded_images"])
    for img, (h, w) in zip(imgs, b.pop("_image_hw")):
        img[:, h:], img[:, :, w:] = 0, 0
    return dict(b, padded_images=imgs, packed_vit_tokens=pix(b["packed_vit_tokens"]))


def idle(batch: dict) -> bool:
    """The pack trains nothing: no CE and no MSE token (PackLoader.padded's packs; no record makes one)."""
    return len(batch["ce_loss_indexes"]) + len(batch["mse_loss_indexes"]) == 0


def _no_collate(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)  # workers decode images; torch threads there only oversubscribe cores


def check_format(states: list[dict]):
    """Data states from before sharding by read unit hold one stream position per source."""
    if any(not isinstance(p, list) for st in states for sh in st["shards"].values() for p in sh["pos"]):
        raise DataError("data state was saved by an older data.py (stream positions, before shards read "
                        "whole units): it cannot be continued; resume from a newer checkpoint or start over")


FINGERPRINT_FILES = 1000  # a source of at most this many files lists them in checkpoints (to name a change)


def fingerprint(sources: list[Source]) -> list[dict]:
    """What a data state is a position in: per source its weight, rows and files (path below the
    source's folder, size, rows), the file list as a digest when it is long. Data moved to another
    folder as they are is the same data."""
    import hashlib
    out = []
    for s in sources:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f.path)) for f in s.files])
        files = [[os.path.relpath(os.path.abspath(f.path), root), f.size, int(f.unit_start[-1])] for f in s.files]
        out.append(dict(weight=s.weight, rows=s.n_rows,
                        digest=hashlib.sha1(json.dumps(files).encode()).hexdigest(),
                        files=files if len(files) <= FINGERPRINT_FILES else None))
        if any(u[3] for u in s.units):  # row groups read in pieces (Source.cut): keys count pieces
            out[-1]["units"] = len(s.units)
    return out


def data_changes(old: list[dict], new: list[dict], names: list[str]) -> list[str]:
    """What differs between two fingerprints, in words (empty: nothing); `names`: the new sources'."""
    if len(old) != len(new):
        return [f"{len(old)} sources then, {len(new)} now ({', '.join(names)})"]
    out = []
    for a, b, name in zip(old, new, names):
        if a["weight"] != b["weight"]:
            out.append(f"{name}: weight {a['weight']:g} -> {b['weight']:g}")
        if a["digest"] == b["digest"]:
            if a.get("units") != b.get("units"):  # the same files cut into other pieces: keys name other rows
                units = [f"{x['units']:,} units" if "units" in x else "whole row groups" for x in (a, b)]
                out.append(f"{name}: read in {units[0]} then, {units[1]} now (a mixture of more parquet sources "
                           f"than --data.held-row-groups reads row groups in pieces, sized by its largest row group)")
            continue
        fa, fb = ({f[0]: f[1:] for f in x["files"] or []} for x in (a, b))
        said = [f"{len(set(fb) - set(fa))} files added (e.g. {min(set(fb) - set(fa))})" if set(fb) - set(fa) else "",
                f"{len(set(fa) - set(fb))} files removed (e.g. {min(set(fa) - set(fb))})" if set(fa) - set(fb) else "",
                next((f"{p} changed (size {fa[p][0]:,} -> {fb[p][0]:,} bytes, {fa[p][1]:,} -> {fb[p][1]:,} rows)"
                      for p in sorted(set(fa) & set(fb)) if fa[p] != fb[p]), "")]
        out.append(f"{name}: " + (", ".join(x for x in said if x) or "files changed")
                   + f" ({a['rows']:,} -> {b['rows']:,} rows)")
    return out


class PackLoader:
    """What the training loop uses: iterate for batches (Bagel.forward's keyword arguments)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, dataset: PackedDataset | None = None):
        """`dataset`: this rank's PackedDataset of `cfg` built already (train.check_args' on rank 0), so
        that start-up reads each source's footers or line index, and the tokenizer, once."""
        if dataset is not None and (dataset.cfg, dataset.rank, dataset.world_size) != (cfg, rank, world_size):
            raise ValueError("PackLoader: the dataset given was built for another config, rank or world size")
        self.cfg = cfg
        self.dataset = dataset or PackedDataset(cfg, rank, world_size)
        self.shards: dict[int, dict] = {}  # state after the last consumed pack of each worker shard
        self.consumed = 0
        self.fingerprint = fingerprint(self.dataset.sources)

    def check_shm(self):
        """DataLoader workers hand packs over in /dev/shm, PREFETCH per worker: fail at the start, with
        the fix, where it cannot hold them (Docker's default is 64 MB), not with a bus error mid-run."""
        import shutil
        nw = self.cfg.num_workers
        if not nw or not os.path.isdir("/dev/shm"):
            return
        need = nw * PREFETCH * self.cfg.packing_length * PACK_BYTES_PER_TOKEN
        free = shutil.disk_usage("/dev/shm").free
        if free < need:
            raise DataError(f"/dev/shm has {free / 2**20:,.0f} MB free, the prefetched packs need up to "
                            f"{need / 2**20:,.0f} MB ({nw} workers x {PREFETCH} packs of --data.packing-length "
                            f"{self.cfg.packing_length:,} tokens): lower --data.num-workers (0: no shared "
                            f"memory) or give the container more (docker run --shm-size 1g)")

    def __iter__(self):
        nw = self.cfg.num_workers
        self.check_shm()
        self.dataset.rotate = self.consumed % max(nw, 1)
        self.dataset.resume = copy.deepcopy(self.shards)
        # pinned batches: the trainer's copies to the GPU do not block the host (train.to_device)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=nw,
                                             collate_fn=_no_collate, worker_init_fn=_worker_init,
                                             pin_memory=torch.cuda.is_available(),
                                             prefetch_factor=PREFETCH if nw else None)
        for batch in loader:
            if isinstance(batch, packing.UserError):
                raise batch
            state = batch.pop("_state")
            self.shards[state["shard"]] = state
            self.consumed += 1
            yield batch

    def padded(self):
        """Iterate, then yield packs that train nothing (`idle`) for good. Ranks step together, so a
        rank whose finite data ran out keeps stepping with idle packs while the others train their
        last packs; the loop stops when every rank's step is idle."""
        yield from self
        ds = self.dataset
        items = [dict(type="text", ids=[ds.specials.eos], loss=0, enable_cfg=0, desc="idle")]
        while True:
            yield packing.collate([packing.layout_sample(items, ds.specials, ds.geo)], timesteps=torch.zeros(0),
                                  geo=ds.geo)

    def state_dict(self) -> dict:
        return dict(consumed=self.consumed, num_workers=self.cfg.num_workers,
                    world_size=self.dataset.world_size, seed=self.cfg.seed,
                    shards=copy.deepcopy(self.shards), sources=self.fingerprint)

    def same_data(self, sd: dict) -> bool:
        """True when `sd` is a position in the data this loader reads. Otherwise a DataError naming
        what changed, or, with --data.fresh-pass, False: the caller starts a new pass."""
        changes = data_changes(sd["sources"], self.fingerprint, [s.name for s in self.dataset.sources]) \
            if "sources" in sd else []
        if not changes:
            return True
        if not self.cfg.fresh_pass:
            raise DataError("the data changed since the checkpoint: " + "; ".join(changes) + ". Resuming "
                            "would re-read or skip rows: restore the data, or pass --data.fresh-pass to "
                            "start a new pass over the data as they are now from the resumed step")
        if self.dataset.rank == 0:
            print("data: the data changed since the checkpoint (" + "; ".join(changes) + "): --data.fresh-pass, "
                  "a new pass starts", file=sys.stderr)
        self.consumed, self.shards = 0, {}
        return False

    def load_state_dict(self, sd: dict):
        if not self.same_data(sd):
            return
        check_format([sd])
        for k in ("num_workers", "world_size", "seed"):
            mine = self.cfg.num_workers if k == "num_workers" else \
                self.dataset.world_size if k == "world_size" else self.cfg.seed
            if sd[k] != mine:
                raise DataError(f"data state was saved with {k}={sd[k]} but this run has {mine}: "
                                f"exact resume needs the same value")
        self.consumed = sd["consumed"]
        self.shards = {int(k): v for k, v in copy.deepcopy(sd["shards"]).items()}

    def continue_from(self, states: list[dict]):
        """Resume from the data states of ALL ranks of a run with another world size or worker count.
        Exact resume is impossible there (which shard reads which unit changes). Per source, the
        epoch the slowest old shard is in is finished first: the rows the old shards had not read
        yet in it are dealt to the new shards as row ranges, and the samples that waited in open
        packs are handed out again as open packs. No record is skipped; rows a faster old shard had
        already read in the next epoch are read again there. Counters and timestep draws restart."""
        if not self.same_data(states[0]):
            return
        check_format(states)
        if any(st["seed"] != self.cfg.seed for st in states):
            raise DataError(f"data state was saved with seed {states[0]['seed']}, this run has {self.cfg.seed}")
        srcs = self.dataset.sources
        old = []  # (shard, shard count, state or None) of every old shard
        for rank, st in enumerate(states):
            nw = max(st["num_workers"], 1)
            for v in range(nw):  # JSON turns the int keys into str
                old.append((rank * nw + v, len(states) * nw, st["shards"].get(str(v), st["shards"].get(v))))
        epoch = [min(sh["pos"][i][0] if sh else 0 for _, _, sh in old) for i in range(len(srcs))]
        left: list[list] = [[] for _ in srcs]  # per source: unread ranges of its slowest epoch
        waiting = []
        for shard, n, sh in old:
            for i, src in enumerate(srcs):
                e, j, place = sh["pos"][i] if sh else (0, 0, 0)
                if e == epoch[i]:
                    plan = sh["plans"][i] if sh and sh["plans"][i] is not None else src.plan(e, shard, n)
                    left[i] += [[u, a + place * (k == j), b] for k, (u, a, b) in enumerate(plan[j:], j)]
            # an open sample of a later epoch is read again there
            waiting += [[k for k in pack if k[1] <= epoch[k[0]]] for pack in (sh["open"] if sh else [])]
        waiting = [p for p in waiting if p]
        left = [[r for r in rs if r[2] > r[1]] for rs in left]
        nw = max(self.cfg.num_workers, 1)
        n_new, first = self.dataset.world_size * nw, self.dataset.rank * nw
        self.consumed = 0
        self.shards = {v: dict(shard=v, draws=0, pos=[[e, 0, 0] for e in epoch],
                               plans=[deal(rs, first + v, n_new) for rs in left], tried=[0] * len(srcs),
                               bad=[0] * len(srcs), packs=0, samples=0, tokens=0, skips={},
                               open=waiting[first + v::n_new]) for v in range(nw)}

    def rows_left(self) -> int:
        """Records of this rank's shards, up to --data.epochs, that no consumed pack holds: rows not
        read yet, and samples waiting in open packs or in packs a worker made but the loop did not
        take. A finite run stops when the first rank runs out (ranks step together), so the other
        ranks' rows left are not trained on; train.py logs their sum."""
        if self.cfg.epochs is None:
            raise ValueError("rows_left: an endless stream (--data.epochs None) has no rows left")
        srcs, nw = self.dataset.sources, max(self.cfg.num_workers, 1)
        n_shards, left = self.dataset.world_size * nw, 0
        for v in range(nw):
            sh = self.shards.get(v) or dict(pos=[[0, 0, 0]] * len(srcs), plans=[None] * len(srcs), open=[])
            left += sum(len(p) for p in sh["open"])
            for i, src in enumerate(srcs):
                e, j, place = sh["pos"][i]
                for epoch in range(e, self.cfg.epochs):
                    plan = sh["plans"][i] if epoch == e and sh["plans"][i] is not None else \
                        src.plan(epoch, self.dataset.rank * nw + v, n_shards)
                    skip = j if epoch == e else 0
                    left += sum(b - a for _, a, b in plan[skip:]) - (place if epoch == e and j < len(plan) else 0)
        return left

    def stats(self) -> dict:
        """Totals over this rank's consumed packs: fill, padding, samples/pack, skips per reason."""
        packs = sum(s["packs"] for s in self.shards.values())
        samples = sum(s["samples"] for s in self.shards.values())
        tokens = sum(s["tokens"] for s in self.shards.values())
        skips = Counter()
        for s in self.shards.values():
            skips.update(s["skips"])
        fill = tokens / (packs * self.cfg.packing_length) if packs else 0.0
        notes = [Counter() for _ in self.dataset.sources]
        for s in self.shards.values():
            for c, n in zip(notes, s.get("notes", [])):
                c.update(n)
        return dict(packs=packs, samples=samples, tokens=tokens, fill=fill, padding=1 - fill,
                    samples_per_pack=samples / packs if packs else 0.0, skipped=dict(skips),
                    notes=[dict(c) for c in notes])

    def log_line(self) -> str:
        """The data line: packing, skips, and the images upstream's resize treats badly, with a warning
        for each source where their share passes IMAGE_WARN_SHARE."""
        s = self.stats()
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())) or "none"
        total = sum((Counter(n) for n in s["notes"]), Counter())
        line = (f"data: {s['packs']:,} packs | {s['samples_per_pack']:.1f} samples/pack | padding "
                f"{100 * s['padding']:.1f}% | skipped: {skipped} | cut to fit {total['cut_to_fit']:,} | "
                f"images {total['images']:,}: upscaled small {total['upscaled_small']:,}, extreme aspect "
                f"{total['extreme_aspect']:,}, truncated {total['truncated']:,}")
        for src, n in zip(self.dataset.sources, s["notes"]):
            for k, why in (("upscaled_small", "smaller than the minimum side, upscaled"),
                           ("extreme_aspect", f"more than {EXTREME_ASPECT:g}:1, resized to a few rows")):
                if n.get(k, 0) > IMAGE_WARN_SHARE * n.get("images", 0):
                    line += (f"\nwarning: {src.name}: {n[k]:,} of {n['images']:,} images "
                             f"({100 * n[k] / n['images']:.0f}%) are {why}")
        return line


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
class Args:
    """Print packs in human form: the flags are train.py's (`--data.*`, `--model`, `--seed`)."""
    model: str
    """BAGEL checkpoint directory (its tokenizer and image geometry), or a bare tokenizer directory
    (then BAGEL-7B-MoT's geometry applies)"""
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    """shuffle, mixture, CFG dropout and timestep draws are all functions of this seed"""
    inspect: int = 2
    """print this many packs and exit"""


def main(argv: list[str] | None = None):
    args = tyro.cli(Args, args=argv)
    try:
        from model import read_config
        cfg = replace(args.data, model=args.data.model or args.model, seed=args.seed)
        try:  # a BAGEL checkpoint directory: the geometry is its own
            cfg = match_model(cfg, read_config(args.model))
            print(f"data: {geometry_line(cfg)}, from {args.model}", file=sys.stderr)
        except FileNotFoundError:  # a bare tokenizer directory
            print(f"data: {geometry_line(cfg)} (BAGEL-7B-MoT's: {args.model} has no model config)", file=sys.stderr)
        ds = PackedDataset(cfg)
        for i, (pack, batch, _) in enumerate(ds.stream()):
            if i >= args.inspect:
                break
            print(describe(pack, cfg.packing_length, i))
            print("  tensors: " + ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items()
                                             if torch.is_tensor(v)))
    except (ValueError, packing.UserError) as e:  # bad data or settings: the message says where and what to do
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
