"""Convert BAGEL checkpoints: official layout <-> HF layout, and training checkpoints -> either.

    python convert_weights.py --model BAGEL-7B-MoT --output-dir out/bagel-hf --to hf     # official -> hf (sharded)
    python convert_weights.py --model BAGEL-7B-MoT-ver.LE --output-dir out/bagel           # hf -> official
    python convert_weights.py --model out/run/step-0001000 --output-dir out/export --check # training checkpoint (DCP) -> official
    python convert_weights.py --model Qwen2.5-0.5B-Instruct --output-dir out/bagel-0.5b \
        --vit-model siglip-so400m-14-980 --vae-model flux/ae.safetensors               # a new BAGEL from its parts (pre-training)

Layouts: DESIGN.md#checkpoints (official: ByteDance-Seed/BAGEL-7B-MoT; hf: lmms-lab/BAGEL-7B-MoT-ver.LE,
which we could not read; the assumptions are the ones model.py's reader makes, see `hf_config`).

Everything streams, one tensor at a time, so a 14B checkpoint converts on a 24 GiB machine:
- safetensors are read with plain file reads at the offsets of their header (safetensors' own reader
  mmaps the file, and every page touched stays in the process's RSS: a 29 GB file becomes 29 GB RSS);
- training checkpoints are read key by key with DCP's reader into preallocated tensors;
- outputs are written by `write_safetensors`, which writes the header first (shapes and dtypes are
  known from the sources' headers) and then each tensor's bytes as it arrives.
Peak memory is about twice the largest tensor. Output goes to OUTPUT_DIR.tmp-PID, renamed to OUTPUT_DIR only
once complete (and checked, with --check), so a failed conversion never leaves one that looks finished.

The full key set is always written: from a training checkpoint, whatever the run did not save (frozen
or switched-off parts) comes from its base checkpoint. Parameters the official model lacks (e.g. NSA's
`...self_attn.nsa.*`) are exported under their own names; --plain drops them.
"""
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Literal

import torch
import torch.distributed.checkpoint as dcp
import tyro
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
from torch.distributed.checkpoint.api import CheckpointException

from model import (POS_TABLES, AutoEncoder, Bagel, PositionEmbedding, _json, checkpoint_index, config_files,
                   layout, load_weights, read_config, resolve, sincos_2d)
import packing
from data import IMAGE_SIZES, SIZE_FIELDS
from nsa import NSAConfig


@dataclass
class Args:
    model: str
    """checkpoint to read: official layout, HF layout, a training checkpoint output_dir/step-N/ (DCP), or a Hugging Face Hub id (ORG/NAME)"""
    output_dir: str
    """directory to create (written as OUTPUT_DIR.tmp-PID, renamed to OUTPUT_DIR when complete)"""
    to: Literal["official", "hf"] = "official"
    """output layout: official (json configs, ema.safetensors, ae.safetensors) or hf (config.json, model-*.safetensors shards + index, VAE under vae_model.)"""
    weights: Literal["ema", "model"] = "ema"
    """ema: ema.safetensors (what upstream's inferencer reads), from a training checkpoint's EMA, or its model if it kept none; model: its raw model, as model.safetensors"""
    dtype: Literal["bf16", "fp32"] | None = None
    """dtype of the BAGEL tensors written. Default: a layout conversion (official <-> hf) keeps each tensor's stored dtype; a training checkpoint export and a new BAGEL from parts write bf16, as the release. The VAE always keeps its stored dtype"""
    max_shard_size: str = "5GB"
    """largest shard of the hf layout (GB = 1e9 bytes, GiB = 2**30); a bigger tensor gets a shard of its own"""
    base: str | None = None
    """base checkpoint of a training run (default: "model" in its args.json): configs, tokenizer, ae.safetensors, and every tensor the run did not save (e.g. the ViT of a visual_und=False run)"""
    plain: bool = False
    """drop parameters the official model does not have (e.g. NSA's .nsa. weights): a plain official export"""
    lora_only: bool = False
    """from a LoRA run's checkpoint: write only the adapter (adapter.safetensors, fp32, + adapter_config.json) for `sample.py --model BASE --adapter OUTPUT_DIR`, instead of the merged model"""
    check: bool = False
    """before OUTPUT_DIR is renamed into place, load it strictly with model.py (meta device: names, shapes) and compare every tensor, read back by safetensors, with its source bit for bit"""
    overwrite: bool = False
    """replace OUTPUT_DIR if it exists"""
    vit_model: str | None = None
    """with a Qwen2 LLM as --model: the SigLIP checkpoint directory (HF) or hub id of a new BAGEL built from parts"""
    vae_model: str | None = None
    """with a Qwen2 LLM as --model: the FLUX VAE, ae.safetensors or a directory holding it (+ ae_config.json)"""
    max_latent_size: int = 64
    """with a Qwen2 LLM as --model: latent grid side of the new BAGEL (64 = 1024 px images)"""
    seed: int = 0
    """with a Qwen2 LLM as --model: seed of the fresh connector, time embedder and vae2llm"""


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
OUT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# measured on a 3584x3584 bf16 weight (BAGEL-7B's hidden size) with a rank-16 update B A
BF16_MERGE_LOSS = ("a bf16 merge W + B A is off by 84% of B A at |B A|/|W| = 7.7e-4 and by 21% at 7.7e-3 "
                   "(bf16 keeps 8 bits of W, and B A sits in the bits below)")
CHUNK = 1 << 28  # read in 256 MiB pieces: one read() call returns at most ~2 GiB on Linux
CONFIG_FILES = ("config.json", "llm_config.json", "vit_config.json", "bagel_config.json", "ae_config.json")
WEIGHT_FILES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".distcp")
HF_BOOKKEEPING = ("model_type", "architectures", "torch_dtype", "dtype", "transformers_version")
# wrappers that leak into parameter names when a state dict is taken without get_model_state_dict
WRAPPERS = re.compile(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


# -------------------------------------------------------------------------------------------------
# reading: every tensor is a Source, read only when it is written

@dataclass
class Source:
    """Where one tensor lives; `read()` loads it (only then)."""
    where: str  # file or DCP directory, for error messages
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


def safetensors_header(file: str) -> tuple[dict, int]:
    """The header {name: {dtype, shape, data_offsets}} and where the data starts, checked against the
    file size (a truncated download is the usual way a safetensors file goes bad)."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: missing")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise ValueError(f"{file}: truncated or not a safetensors file ({size:,} bytes, header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file: unreadable header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{file}: truncated: its header describes {8 + n + end:,} bytes, the file has {size:,}")
    return header, 8 + n


def read_bytes(file: str, start: int, end: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One tensor from a byte range, with plain reads into its own storage (no mmap, no copy)."""
    t = torch.empty(shape, dtype=dtype)
    buf = memoryview(t.view(-1).view(torch.uint8).numpy())
    with open(file, "rb") as f:
        f.seek(start)
        got = 0
        while got < end - start:
            k = f.readinto(buf[got:got + CHUNK])
            if not k:
                raise ValueError(f"{file}: truncated at byte {start + got:,} (wanted up to {end:,})")
            got += k
    return t


def linear_patch_embedding(read: Callable[[], torch.Tensor]) -> torch.Tensor:
    t = read()  # conv layout [out, c, p, p] -> BAGEL's linear layout [out, p*p*c] in (py, px, c) order (DESIGN.md#model)
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def safetensors_sources(index: dict[str, tuple[str, str]]) -> dict[str, Source]:
    """Sources for model.checkpoint_index's map (our key -> (file, key in file)); reads headers only."""
    headers, out = {}, {}
    for key, (file, name) in index.items():
        if file not in headers:
            headers[file] = safetensors_header(file)
        header, data = headers[file]
        e = header[name]
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{file}: {name}: unsupported dtype {e['dtype']}")
        shape, dtype, (b, end) = tuple(e["shape"]), DTYPES[e["dtype"]], e["data_offsets"]
        if end - b != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{file}: {name}: header says {shape} {e['dtype']} but {end - b:,} bytes")
        read = partial(read_bytes, file, data + b, data + end, shape, dtype)
        if key.endswith("patch_embedding.weight") and len(shape) == 4:  # the HF layout may keep the conv
            read, shape = partial(linear_patch_embedding, read), (shape[0], math.prod(shape[1:]))
        out[key] = Source(file, shape, dtype, read)
    return out


class DCPReader(FileSystemReader):
    """DCP's file reader, reading `.metadata` once: load() asks for it on every call, and unpickling it
    is most of the time of loading one tensor (40 ms of 41 ms for a 3 GB checkpoint)."""
    def __init__(self, ckpt: str):
        super().__init__(ckpt)
        self.ckpt = ckpt
        try:
            self.cached_metadata = super().read_metadata()
        except Exception as e:
            raise ValueError(f"{ckpt}/.metadata: unreadable DCP metadata ({type(e).__name__}: {e})") from None

    def read_metadata(self, *args, **kwargs):
        return self.cached_metadata


def read_dcp(reader: DCPReader, path: tuple[str, ...], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a DCP checkpoint, loaded into a preallocated tensor (DCP reads only its byte ranges)."""
    t = torch.empty(shape, dtype=dtype)
    sd = t
    for p in reversed(path):  # ("model", "a.b") -> {"model": {"a.b": t}}, as it was saved
        sd = {p: sd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(sd, storage_reader=reader)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"{reader.ckpt}: reading {'.'.join(path)} failed, the checkpoint is damaged: {last}") from None
    return t


def dcp_sources(ckpt: str, weights: str) -> dict[str, Source]:
    """Sources for the "ema" (or "model") entry of a training checkpoint written with DCP. The EMA falls
    back to the model for any key it lacks; other entries (optimizer, data state, ...) are ignored."""
    reader = DCPReader(ckpt)
    meta = reader.cached_metadata
    states = {}
    for fqn, m in meta.state_dict_metadata.items():
        path = (meta.planner_data or {}).get(fqn) or tuple(fqn.split(".", 1))
        if path[0] in ("model", "ema") and isinstance(m, TensorStorageMetadata):
            key = WRAPPERS.sub("", ".".join(path[1:]))
            shape, dtype = tuple(m.size), m.properties.dtype
            states.setdefault(path[0], {})[key] = Source(ckpt, shape, dtype, partial(read_dcp, reader, path, shape, dtype))
    for index, info in meta.storage_data.items():  # catch a cut-short copy before writing anything
        file = os.path.join(ckpt, info.relative_path)
        if index.fqn.split(".", 1)[0] in ("model", "ema") and (
                not os.path.exists(file) or os.path.getsize(file) < info.offset + info.length):
            raise ValueError(f"{file}: missing or truncated: {index.fqn} needs bytes up to {info.offset + info.length:,}")
    if "model" not in states and "ema" not in states:
        raise ValueError(f"{ckpt}: training checkpoint without a 'model' or 'ema' entry")
    if weights == "ema" and "ema" in states:
        return {**states.get("model", {}), **states["ema"]}
    if weights == "ema":
        print(f"{ckpt}: no EMA in this checkpoint: exporting the trained model as ema.safetensors")
    return states["model"]


def find_base(ckpt: str, base: str | None) -> str:
    """The base checkpoint a run started from: --base, else "model" in the run's args.json."""
    if base is None:
        args_file = os.path.join(ckpt, "args.json")
        if not os.path.exists(args_file):
            raise FileNotFoundError(f"{args_file}: missing, so the base checkpoint is unknown: pass --base")
        base = _json(args_file).get("model")
        if not isinstance(base, str):
            raise ValueError(f"{args_file}: no 'model' path to the base checkpoint: pass --base")
        if not base:
            raise ValueError(f"{args_file}: the run started from the demo model, not a checkpoint: pass --base")
        where = f"{args_file} names base checkpoint {base!r}"
    else:
        where = f"--base {base!r}"
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{where}, which does not exist: pass --base")
    return base


def lora_scale(run: dict) -> float | None:
    """alpha / rank of a LoRA run (train.py's args.json), None for a run without LoRA."""
    lo = run.get("lora") or {}
    return (lo.get("alpha") or 2 * lo["rank"]) / lo["rank"] if lo.get("rank") else None


def merge_lora(sources: dict[str, Source], scale: float) -> dict[str, Source]:
    """Fold every adapter into its weight: W + B A alpha/rank, computed in fp32 from the base's W and
    the checkpoint's A, B (cast once, when written). The adapter keys themselves are dropped."""
    out = dict(sources)
    for k in [k for k in sources if k.endswith(".lora_a")]:
        name = k[:-len(".lora_a")]
        w, a, b = out[name + ".weight"], out.pop(k), out.pop(name + ".lora_b")
        read = lambda w=w, a=a, b=b: w.read().float() + b.read().float() @ a.read().float() * scale
        out[name + ".weight"] = Source(f"{w.where} + LoRA", w.shape, torch.float32, read)
    return out


def write_adapter(src: str, dst: str, trained: dict[str, Source], run: dict, base: str):
    """adapter.safetensors (the fp32 LoRA tensors, official module names) + adapter_config.json."""
    lora = {k: s for k, s in trained.items() if k.endswith((".lora_a", ".lora_b"))}
    if not lora:
        raise ValueError(f"{src}: --lora-only, but the checkpoint holds no LoRA adapters (trained without --lora.rank)")
    others = [k for k in trained if k not in lora and k not in POS_TABLES]  # (the sin-cos tables: recomputed)
    if others:
        raise ValueError(f"{src}: --lora-only would drop {len(others)} other trained tensors (e.g. {others[0]}): "
                         f"export the merged model instead")
    meta = _json(os.path.join(src, "meta.json"))
    with staging(dst) as tmp:
        write_safetensors(os.path.join(tmp, "adapter.safetensors"), [(k, s, s.dtype) for k, s in lora.items()])
        lo = run["lora"]
        write_json(os.path.join(tmp, "adapter_config.json"),
                   {"rank": lo["rank"], "alpha": lo.get("alpha") or 2 * lo["rank"], "targets": lo["targets"],
                    "vit": lo["vit"], "base": base, "base_frozen_crc32": meta.get("frozen_crc32"),
                    "visual_und": run.get("visual_und"), "visual_gen": run.get("visual_gen"),  # (None: the base's)
                    "step": meta.get("step"),
                    "image_sizes": {k: run["data"][k] for k in SIZE_FIELDS if k in run.get("data", {})}})
    print(f"done: {dst}: adapter of {len(lora)} tensors, {sum(math.prod(s.shape) for s in lora.values()) / 1e6:.3f}M parameters")
    return dst


def plan(config, sources: dict[str, Source], plain: bool) -> tuple[dict[str, Source], list[str]]:
    """Every tensor of the model `config` describes, in module order, with its source, then the extra
    parameters (keys the official model lacks, e.g. NSA's) unless `plain`. Checks names and shapes."""
    with torch.device("meta"):
        model = Bagel(config)
    tables = {name + ".pos_embed": m for name, m in model.named_modules() if isinstance(m, PositionEmbedding)}
    out, missing, wrong = {}, [], []
    for k, v in model.state_dict().items():
        s, shape = sources.get(k), tuple(v.shape)
        if k in tables and (s is None or s.shape != shape):
            # model.py recomputes the sin-cos tables, upstream's loader reads them: write them at the config's size
            m = tables[k]
            s = Source("sin-cos table", shape, torch.float32, partial(sincos_2d, m.grid, m.dim))
        if s is None:
            missing.append(k)
        elif s.shape != shape:
            wrong.append(f"{k}: {s.where} has {list(s.shape)}, the config wants {list(shape)}")
        else:
            out[k] = s
    if missing or wrong:
        files = sorted({s.where for s in sources.values()})
        parts = [f"{name} ({len(ks)}): {ks[:10]}" for name, ks in (("missing", missing), ("wrong shape", wrong)) if ks]
        raise ValueError(f"{', '.join(files)}: tensors do not match the model config: " + "; ".join(parts))
    extras = [k for k in sources if k not in out and k not in POS_TABLES]
    if not plain:
        out.update((k, sources[k]) for k in extras)
    return out, extras


# -------------------------------------------------------------------------------------------------
# writing

def out_dtype(s: Source, dtype: torch.dtype | None) -> torch.dtype:
    """None keeps the stored dtype; integer buffers always keep theirs."""
    return dtype if dtype is not None and s.dtype.is_floating_point else s.dtype


def write_safetensors(file: str, items: list[tuple[str, Source, torch.dtype]]) -> int:
    """Stream tensors into one safetensors file, holding one tensor at a time. The format: an 8-byte
    little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (offsets relative
    to the data, back to back), padded with spaces to a multiple of 8, then the raw row-major bytes. Since
    the sources' headers give every shape and dtype, the header is written first and the data streamed."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, s, dtype in items:
        n = math.prod(s.shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(s.shape), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, s, dtype in items:
            t = s.read()
            if tuple(t.shape) != s.shape:
                raise ValueError(f"{s.where}: {name}: read a tensor of {list(t.shape)}, its header said {list(s.shape)}")
            f.write(t.to(dtype).contiguous().view(-1).view(torch.uint8).numpy())
            del t
    return 8 + len(h) + offset


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def raw_configs(path: str) -> tuple[dict, dict, dict, dict]:
    """The llm, vit, BAGEL and VAE configs as stored: raw dicts keep the fields model.py does not model."""
    if layout(path) == "official":
        def read(name):
            file = os.path.join(path, name)
            return _json(file) if os.path.exists(file) else {}
        return read("llm_config.json"), read("vit_config.json"), read("bagel_config.json"), read("ae_config.json")
    cfg = _json(os.path.join(path, "config.json"))
    top = {k: v for k, v in cfg.items() if k not in ("llm_config", "vit_config", "vae_config") + HF_BOOKKEEPING}
    return cfg["llm_config"], cfg["vit_config"], top, cfg.get("vae_config") or {}


def official_configs(path: str, config) -> dict[str, dict]:
    """llm_config.json and vit_config.json as upstream reads them (stored fields kept, ours fill the gaps),
    plus our bagel_config.json and ae_config.json (model.py's values win; unknown stored fields are kept)."""
    llm, vit, bagel, ae = raw_configs(path)
    ours = config_files(config)
    return {"llm_config.json": {**ours["llm_config.json"], **llm},
            # upstream builds num_hidden_layers - 1 SigLIP layers (DESIGN.md#model): store one more than we built
            "vit_config.json": {**ours["vit_config.json"], **vit, "num_hidden_layers": config.vit.num_hidden_layers + 1},
            "bagel_config.json": {**bagel, **ours["bagel_config.json"]},
            "ae_config.json": {**ae, **ours["ae_config.json"]}}


def hf_config(path: str, config, dtype: torch.dtype) -> dict:
    """config.json of the HF layout, as we assume LMMS Engine's BagelConfig.to_dict writes it
    (EvolvingLMMs-Lab/lmms-engine, its BAGEL model code; not verified against the files): the BAGEL fields at the top, llm_config
    (Qwen2 + qk_norm, layer_module), vit_config (SigLIP + rope) and vae_config nested."""
    llm, vit, bagel, ae = raw_configs(path)
    ours = config_files(config)
    return {**bagel, **ours["bagel_config.json"], "model_type": "bagel", "architectures": ["Bagel"],
            "torch_dtype": str(dtype).removeprefix("torch."),
            # upstream sets these in code before building the model, so a saved config carries them
            "llm_config": {**ours["llm_config.json"], **llm, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer",
                           "tie_word_embeddings": False},
            # the built depth: a save_pretrained model's config already had SigLIP's last layer dropped
            "vit_config": {**ours["vit_config.json"], **vit, "num_hidden_layers": config.vit.num_hidden_layers,
                           "rope": False},
            "vae_config": {**ae, **ours["ae_config.json"], "downsample": config.vae.downsample}}


def copy_other_files(src: str, dst: str) -> list[str]:
    """Tokenizer files, README, generation config, ...: every top-level file that is not weights or a
    layout config (those are written fresh for the target layout)."""
    copied = []
    for name in sorted(os.listdir(src)):
        file = os.path.join(src, name)
        if os.path.isfile(file) and not name.startswith(".") and name not in CONFIG_FILES \
                and not name.endswith(WEIGHT_FILES):
            shutil.copy2(file, os.path.join(dst, name))
            copied.append(name)
    return copied


def write_shards(path: str, items: list[tuple[str, Source, torch.dtype]], shard_size: int, t0: float):
    """HF-style sharding: fill model-0000i-of-0000n.safetensors in order up to `shard_size` bytes each,
    plus model.safetensors.index.json (total_size and the key -> shard map)."""
    shards, used = [[]], 0
    for item in items:
        n = math.prod(item[1].shape) * item[2].itemsize
        if shards[-1] and used + n > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        size = write_safetensors(os.path.join(path, name), shard)
        weight_map.update((k, name) for k, _, _ in shard)
        total += sum(math.prod(s.shape) * dt.itemsize for _, s, dt in shard)
        print(f"wrote {name}: {len(shard)} tensors, {gb(size)} ({time.time() - t0:.0f}s)")
    write_json(os.path.join(path, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(file: str, obj: dict):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# -------------------------------------------------------------------------------------------------
# checking

def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def check(path: str, weights: dict[str, Source], ae: dict[str, Source], dtypes: dict[str, torch.dtype]):
    """Load `path` strictly with model.py on the meta device (every name and shape, no memory), then
    read every tensor back with safetensors' own reader and compare it with its source, bit for bit.
    Extra parameters that model.py does not build are compared by value only. `dtypes`: each tensor's as written."""
    from safetensors import safe_open
    config = read_config(path)
    with torch.device("meta"):
        model = Bagel(config)
    bagel_index, ae_index = checkpoint_index(path)
    known = set(model.state_dict())
    load_weights(model, {k: v for k, v in bagel_index.items() if k in known}, path, torch.float32, "meta")
    AutoEncoder.from_pretrained(path, device="meta")
    expected = {k: (s, dtypes[k]) for k, s in weights.items()}
    for found, want, what in ((bagel_index, expected, "model"), (ae_index, {k: (s, s.dtype) for k, s in ae.items()}, "VAE")):
        if set(found) != set(want):
            raise ValueError(f"{path}: --check: {what} keys differ from the source: missing "
                             f"{sorted(set(want) - set(found))[:10]}, unexpected {sorted(set(found) - set(want))[:10]}")
        by_file = {}
        for k, (file, name) in found.items():
            by_file.setdefault(file, []).append((k, name))
        for file, keys in by_file.items():  # one file open at a time: its mapped pages are released after
            with safe_open(file, "pt") as f:
                for k, name in keys:
                    s, dt = want[k]
                    if not same(f.get_tensor(name), s.read().to(dt)):
                        raise ValueError(f"{file}: --check: {name} differs from its source {s.where}")
    extra = sorted(set(bagel_index) - known)
    note = f" ({len(extra)} extra parameters model.py does not build compared by value)" if extra else ""
    print(f"check: {len(bagel_index) + len(ae_index)} tensors load strictly and equal their sources{note}")


@contextmanager
def staging(dst: str):
    """DST.tmp-PID, renamed to DST (replacing it) only when the block completes: a failed conversion
    never leaves a DST that looks finished."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(dst):  # --overwrite
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -------------------------------------------------------------------------------------------------
# a new BAGEL from its parts, as upstream's pre-training starts (train/pretrain_unified_navit.py)

def is_llm(path: str) -> bool:
    """A plain Qwen2 checkpoint (HF config.json without BAGEL's llm_config)."""
    cfg = os.path.join(path, "config.json")
    try:
        return os.path.exists(cfg) and _json(cfg).get("model_type") == "qwen2"
    except ValueError:
        return False


def hf_sources(path: str) -> dict[str, Source]:
    """Every tensor of an HF checkpoint directory (model.safetensors, or shards + index), by its name."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        files = {name: os.path.join(path, f) for name, f in _json(index_file)["weight_map"].items()}
    else:
        single = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if len(single) != 1:
            raise FileNotFoundError(f"{path}: expected model.safetensors or an index of shards, found {single or 'no safetensors'}")
        file = os.path.join(path, single[0])
        files = {name: file for name in safetensors_header(file)[0]}
    return safetensors_sources({name: (file, name) for name, file in files.items()})


def parts_sources(config, llm: dict[str, Source], vit: dict[str, Source], seed: int) -> dict[str, Source]:
    """Sources for every tensor of a new BAGEL: the LLM's weights for the understanding expert and,
    copied, for the generation expert (upstream copy_init_moe); QK-norm weights at 1 (Qwen2 has no
    QK-norm; upstream's RMSNorm init); lm_head from the embedding when the LLM ties them (upstream
    would leave it random); SigLIP's layers but its last (vit_select_layer -2), patch embedding as a
    linear layer; connector, time embedder and vae2llm at PyTorch's default init from `seed`, llm2vae
    at zero (DESIGN.md#flow). The sin-cos tables are computed by plan()."""
    out = {}
    with torch.device("meta"):
        model = Bagel(config)
    for k, v in model.state_dict().items():
        name = k.split(".", 1)[1]
        if k.startswith("language_model."):
            name = name.replace("_moe_gen", "")
            if name == "lm_head.weight" and name not in llm:
                name = "model.embed_tokens.weight"
            if name in llm:
                out[k] = llm[name]
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                out[k] = Source("QK-norm init (ones)", tuple(v.shape), torch.float32, partial(torch.ones, v.shape))
        elif k.startswith("vit_model.") and name in vit:
            out[k] = vit[name]
    torch.manual_seed(seed)
    for name, mod in model.named_children():
        if name in ("language_model", "vit_model") or isinstance(mod, PositionEmbedding):
            continue
        mod.to_empty(device="cpu")
        for sub in mod.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        if name == "llm2vae":  # a new generation head predicts v = 0 (DESIGN.md#flow)
            torch.nn.init.zeros_(mod.weight), torch.nn.init.zeros_(mod.bias)
        for k, t in mod.state_dict().items():
            out[f"{name}.{k}"] = Source(f"fresh {name} (seed {seed})", tuple(t.shape), t.dtype, partial(t.clone))
    return out


def assemble(args: Args, src: str, tmp: str) -> tuple[dict[str, Source], dict[str, Source]]:
    """Write the configs, tokenizer and ae.safetensors of a new BAGEL into `tmp`; return the tensor
    sources of ema.safetensors and of the VAE."""
    if not (args.vit_model and args.vae_model):
        raise ValueError(f"{src} is a Qwen2 LLM: building a BAGEL from parts needs --vit-model (SigLIP) and "
                         f"--vae-model (FLUX ae)")
    if args.to != "official":
        raise ValueError("a BAGEL built from parts is written in the official layout; convert it to hf afterwards")
    vae_dir, vae_file = (args.vae_model, os.path.join(args.vae_model, "ae.safetensors")) \
        if os.path.isdir(args.vae_model) else (os.path.dirname(args.vae_model), args.vae_model)
    vit_cfg = _json(os.path.join(args.vit_model, "config.json"))
    vit_cfg = vit_cfg.get("vision_config", vit_cfg)  # a full SigLIP (text + vision) checkpoint nests it
    llm_cfg = _json(os.path.join(src, "config.json"))
    side = vit_cfg.get("image_size", 980) // vit_cfg.get("patch_size", 14)  # SigLIP's position table side
    write_json(os.path.join(tmp, "llm_config.json"),
               {**llm_cfg, "qk_norm": True, "tie_word_embeddings": False, "layer_module": "Qwen2MoTDecoderLayer"})
    write_json(os.path.join(tmp, "vit_config.json"), {**vit_cfg, "rope": False})  # read_config builds one layer less
    write_json(os.path.join(tmp, "bagel_config.json"),
               {"max_latent_size": args.max_latent_size, "vit_max_num_patch_per_side": side})
    if os.path.exists(os.path.join(vae_dir, "ae_config.json")):
        shutil.copyfile(os.path.join(vae_dir, "ae_config.json"), os.path.join(tmp, "ae_config.json"))
    shutil.copyfile(vae_file, os.path.join(tmp, "ae.safetensors"))
    copy_other_files(src, tmp)  # tokenizer files: BAGEL uses the LLM's (its special tokens are Qwen2.5's)
    config = read_config(tmp)
    # SigLIP checkpoints name their tensors vision_model.* (transformers >= 5 may save them without it)
    vit = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in hf_sources(args.vit_model).items()}
    weights = parts_sources(config, hf_sources(src), vit, args.seed)
    ae = safetensors_sources({k: (vae_file, k) for k in safetensors_header(vae_file)[0]})
    print(f"new BAGEL from {src} (LLM, also the generation expert), {args.vit_model} (SigLIP, {config.vit.num_hidden_layers} "
          f"of {config.vit.num_hidden_layers + 1} layers), {vae_file} (VAE); fresh connector, time embedder, vae2llm, llm2vae")
    return weights, ae


# -------------------------------------------------------------------------------------------------

def convert(args: Args) -> str:
    """Convert args.model into a new directory args.output_dir; returns it."""
    t0 = time.time()
    src, dst = os.path.abspath(resolve(args.model)), os.path.abspath(args.output_dir)
    args = replace(args, vit_model=args.vit_model and resolve(args.vit_model, "--vit-model"))
    shard_size = parse_size(args.max_shard_size)
    # a change of layout keeps the weights as they are; a training export or a new model is cast to bf16
    dtype = OUT_DTYPES[args.dtype] if args.dtype else None
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    if os.path.exists(dst) and not args.overwrite:
        raise FileExistsError(f"{dst}: exists; pass --overwrite to replace it")
    if is_llm(src):
        dtype = dtype or torch.bfloat16
        with staging(dst) as tmp:
            sources, ae = assemble(args, src, tmp)
            weights, _ = plan(read_config(tmp), sources, plain=True)
            items = [(k, s, out_dtype(s, dtype)) for k, s in weights.items()]
            size = write_safetensors(os.path.join(tmp, "ema.safetensors"), items)
            print(f"wrote ema.safetensors: {len(items)} tensors, {gb(size)} ({time.time() - t0:.0f}s)")
            if args.check:
                check(tmp, weights, ae, {k: d for k, _, d in items})
        print(f"done: {dst} (official layout, {DTYPE_NAMES[dtype]}) in {time.time() - t0:.0f}s")
        return dst
    names = os.listdir(src)
    is_dcp = ".metadata" in names
    if any(n.endswith(".distcp") for n in names) and not {".metadata", "meta.json"} <= set(names):
        # DCP writes .metadata after the shards, fsdp.py writes meta.json after DCP (and deletes it first)
        raise ValueError(f"{src}: training checkpoint without .metadata or meta.json: its save did not finish")
    steps = sorted(n for n in names if n.startswith("step-"))
    if not is_dcp and steps and "llm_config.json" not in names and "config.json" not in names:
        raise ValueError(f"{src}: a training output directory: convert one of its checkpoints, e.g. {steps[-1]}")
    base = os.path.abspath(find_base(src, args.base)) if is_dcp else src
    if dst in (src, base):
        raise ValueError(f"{dst}: is the checkpoint being read: pick another destination")
    kind = layout(base)
    config = read_config(base)
    run = _json(os.path.join(src, "args.json")) if is_dcp and os.path.exists(os.path.join(src, "args.json")) else {}
    if run.get("attn") == "nsa" and config.nsa is None and not args.plain:
        config.nsa = NSAConfig(**run["nsa"])  # the run added NSA to a dense base: the export's bagel_config says so
    bagel_index, ae_index = checkpoint_index(base)
    sources, ae = safetensors_sources(bagel_index), safetensors_sources(ae_index)
    if is_dcp:
        dtype = dtype or torch.bfloat16
        trained = dcp_sources(src, args.weights)
        step = f" (step {_json(os.path.join(src, 'meta.json')).get('step')})"
        if args.lora_only:
            return write_adapter(src, dst, trained, run, base)
        sources.update(trained)
        scale = lora_scale(run)
        if scale:
            sources = merge_lora(sources, scale)
            print(f"{src}: LoRA adapters merged into their weights (W + B A * {scale:g}, fp32)")
    elif args.lora_only:
        raise ValueError(f"{src}: --lora-only needs a training checkpoint (output_dir/step-N) of a LoRA run")
    weights, extras = plan(config, sources, args.plain)
    if is_dcp:
        from_base = [k for k in weights if k not in trained and not weights[k].where.endswith(" + LoRA")]
        print(f"{src}{step}: {len(weights) - len(from_base)} tensors from the training checkpoint, "
              f"{len(from_base)} from base {base} ({kind} layout)")
    else:
        print(f"{src}: {kind} layout, {len(weights)} tensors")
    if extras:
        print(f"{len(extras)} parameters the official model does not have (e.g. {extras[0]}): "
              + ("dropped (--plain)" if args.plain else "exported under their own names (--plain drops them)"))
    n_params = sum(math.prod(s.shape) for s in weights.values())
    dtypes = {k: out_dtype(s, dtype) for k, s in weights.items()}
    merged = [k for k, s in weights.items() if s.where.endswith(" + LoRA")]
    if merged and dtype != torch.float32:  # rounding W + B A to bf16 erases most of a small update
        if args.dtype is None:
            dtypes.update((k, torch.float32) for k in merged)
        print(f"{len(merged)} merged LoRA tensors " + ("written in fp32, the rest in bf16" if args.dtype is None else
              "rounded to bf16 (--dtype bf16)") + f": {BF16_MERGE_LOSS}" + ("; --dtype bf16 rounds them anyway"
                                                                            if args.dtype is None else ""))

    with staging(dst) as tmp:
        copied = copy_other_files(base, tmp)
        if run.get("data"):  # the run's image sizes: sample.py resizes its inputs as training did
            write_json(os.path.join(tmp, IMAGE_SIZES), {k: run["data"][k] for k in SIZE_FIELDS if k in run["data"]})
        if not {"tokenizer.json", "vocab.json"} & set(copied):
            print(f"warning: {base} has no tokenizer files (tokenizer.json or vocab.json): none copied")
        items = [(k, s, dtypes[k]) for k, s in weights.items()]
        if args.to == "official":
            for name, cfg in official_configs(base, config).items():
                write_json(os.path.join(tmp, name), cfg)
            name = "ema.safetensors" if args.weights == "ema" else "model.safetensors"
            size = write_safetensors(os.path.join(tmp, name), items)
            print(f"wrote {name}: {len(items)} tensors, {n_params / 1e6:,.1f}M parameters, {gb(size)} ({time.time() - t0:.0f}s)")
            if kind == "official":  # the frozen VAE: a byte copy
                shutil.copyfile(os.path.join(base, "ae.safetensors"), os.path.join(tmp, "ae.safetensors"))
            else:
                write_safetensors(os.path.join(tmp, "ae.safetensors"), [(k, s, s.dtype) for k, s in ae.items()])
        else:
            floats = [d for _, _, d in items if d.is_floating_point]
            write_json(os.path.join(tmp, "config.json"), hf_config(base, config, max(set(floats), key=floats.count)))
            items += [("vae_model." + k, s, s.dtype) for k, s in ae.items()]  # LMMS Engine keeps the VAE inside
            write_shards(tmp, items, shard_size, t0)
        if args.check:
            check(tmp, weights, ae, dtypes)
    kept = ", merged LoRA tensors F32" if merged and dtypes[merged[0]] != dtype else ""
    print(f"done: {dst} ({args.to} layout, {'stored dtypes' if dtype is None else DTYPE_NAMES[dtype]}{kept}) "
          f"in {time.time() - t0:.0f}s")
    return dst


def main():
    args = tyro.cli(Args)
    try:
        convert(args)
    except (ValueError, FileNotFoundError, FileExistsError, packing.UserError) as e:  # bad input: the message says where and what
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
