"""FSDP2 for BAGEL: process group and mesh, sharding, rank-0 loading, sharded EMA, DCP checkpoints.

The order follows torchtitan: optional float8 linears -> per block: optional compile inside an
activation-checkpointing wrapper -> `fully_shard` -> `fully_shard` of the root. Trained parameters
are fp32 master shards; compute runs in `param_dtype` (bf16) and gradients are reduced in fp32 (AdamW
on bf16 masters rounds most fine-tuning updates away). Frozen parameters are stored in the compute dtype and never saved: checkpoints
hold what training changes, plus the CRC of the frozen weights loaded from the base. Nothing here
reads the environment at import time.
"""
import json
import os
import re
import shutil
import subprocess
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import packing
from model import (LORA_PREFIX, TOP_LEVEL, Bagel, CheckpointReader, LoRALinear, PositionEmbedding, any_rows,
                   checkpoint_index, fresh_tensors, read_config, sincos_2d)
from packing import UserError

STEP_DIR = re.compile(r"^step-(\d{7})$")  # output_dir/step-0001000/ (the convert_weights.py contract)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # ranks per node (torchrun's LOCAL_WORLD_SIZE)
    device: torch.device
    store: dist.Store | None = None  # the launcher's key-value store (this attempt's keys): errors travel on it


def init_distributed(device: str = "auto", timeout_min: float = 30) -> Dist:
    """Start the process group: torchrun's env vars when present, else one process. gloo on CPU,
    nccl on CUDA (plus gloo for CPU tensors). A single process still gets a group (an in-memory
    store), so FSDP, DCP and every collective below run the same code at any world size."""
    env = os.environ
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
    timeout = timedelta(minutes=timeout_min)
    if "RANK" in env:
        store, restart = None, env.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":  # restarted by torchrun --max-restarts: the dead attempt's gloo addresses are still in
            # torchrun's store under the same keys, and a rank that reads one connects to a dead peer
            store = dist.PrefixStore(f"restart{restart}/", dist.TCPStore(
                env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=dev if cuda else None)
        # a client of its own (rank 0's server, or torchrun's, is up now), its keys this attempt's
        errors = dist.PrefixStore(f"errors{restart}/", dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout))
        return Dist(rank, world, local_rank, local_world, dev, errors)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank, world, local_rank, local_world, dev)


def mesh_shape(world_size: int, shard_size: int) -> tuple[int, int]:
    """(replicas, shards) of the HSDP mesh. shard_size 0 means the whole world (plain FSDP)."""
    shard = shard_size or world_size
    if shard < 1 or shard > world_size or world_size % shard:
        raise UserError(f"--shard-size {shard_size} does not divide the world size {world_size}: use a "
                        f"divisor of it, e.g. the ranks per node (HSDP: shard within a node, replicate "
                        f"across nodes), or 0 to shard over all ranks")
    return world_size // shard, shard


def make_mesh(d: Dist, shard_size: int) -> DeviceMesh:
    """1-D mesh when sharding over all ranks, else 2-D ("replicate", "shard") for HSDP. The default
    (shard_size=-1 from train.py) is the ranks of one node, upstream's HYBRID_SHARD over (nodes, 8)."""
    if shard_size < 0:
        shard_size = d.local_world_size
    rep, shard = mesh_shape(d.world_size, shard_size)
    if rep == 1:
        return init_device_mesh(d.device.type, (shard,), mesh_dim_names=("shard",))
    return init_device_mesh(d.device.type, (rep, shard), mesh_dim_names=("replicate", "shard"))


def fqn(name: str) -> str:
    """Official key of a parameter name (drops the activation-checkpoint and compile wrappers)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def shard_model(model: Bagel, mesh: DeviceMesh, param_dtype: torch.dtype | None, ac: bool = True,
                compile: bool | str = False, offload: bool = False, reshard_after_forward: bool = True,
                float8: str = "", float8_emulate: bool = False) -> Bagel:
    """float8 linears -> per block: compile -> activation checkpointing -> fully_shard; then lm_head,
    then the root, in place.

    The root unit holds the embedding, connector, time embedder, vae2llm/llm2vae and final norms. All
    of them run on every forward (on empty inputs when a pack lacks a modality, see Bagel.forward), so
    every rank reduce-scatters every unit each step and mixed-modality packs cannot hang (a rank
    skipping a branch would wait forever in a collective the others never join). The VAE is not here
    at all: it is frozen and runs outside, under no_grad (no gradient, optimizer state or sharding).

    `compile` (True, or an inductor-less backend name for tests) compiles each block's own forward,
    once per block kind (decoder layer, ViT layer: their code is shared by every layer of the kind)
    and dynamic over pack lengths and modality mixes (model.any_rows); the activation-checkpoint
    wrapper goes around the compiled block, so its recompute reruns the compiled code. `float8`:
    "tensorwise" or "rowwise" scaling for the decoder projections (`float8_linears`), before the
    wrappers, as torchtitan converts its model before applying them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    if float8:
        float8_linears(model, float8, float8_emulate, torch.device(mesh.device_type))
    stacks = [model.language_model.model.layers]
    if model.config.visual_und:
        stacks.append(model.vit_model.vision_model.encoder.layers)
    for layers in stacks:
        for i, layer in enumerate(layers):
            if compile:  # the forward only: FSDP's and the checkpoint's hooks stay outside the graph
                layer.forward = torch.compile(layer.forward, backend="inductor" if compile is True else compile)
            if ac:  # the recompute must redraw the same numbers: only LoRA's dropout draws any
                layer = checkpoint_wrapper(layer, preserve_rng_state=any(isinstance(m, LoRALinear) and m.dropout > 0
                                                                    for m in layer.modules()))
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
            if compile:  # after FSDP's pre-forward hook, which hands the block new tensors
                layer.register_forward_pre_hook(any_rows)
            layers[i] = layer
    # lm_head (vocab x hidden, the largest matrix) gets its own unit so it is not held through the
    # whole step; it runs last in forward, so resharding it would only gather it again at once
    fully_shard(model.language_model.lm_head, reshard_after_forward=False, **kw)
    # the root must not cast its inputs: noise, latents and timesteps stay fp32 as upstream (DESIGN.md#flow)
    fully_shard(model, **{**kw, "mp_policy": MixedPrecisionPolicy(param_dtype, torch.float32,
                                                                  cast_forward_inputs=False)})
    return model


def float8_linears(model: Bagel, recipe: str, emulate: bool = False, device: torch.device | None = None):
    """torchao float8 training (as torchtitan does) on the LLM decoder projections of both experts:
    q/k/v/o and gate/up/down, und and `_moe_gen`, the linears LoRA targets too. Not lm_head (its
    logits need the precision), norms, the ViT or the VAE. Parameters stay high-precision nn.Parameters
    under their official names: only the matmuls cast, so checkpoints and exports hold plain weights.
    `emulate` runs the float8 casts with high-precision matmuls (CPU, older GPUs: for tests)."""
    import dataclasses
    from packing import UserError
    dev = device or next(model.parameters()).device
    if not emulate and not (dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)):
        raise UserError(f"--float8 needs a GPU with float8 matmuls (compute capability 8.9+: Ada, Hopper or "
                        f"newer), not {dev.type}; --float8-emulate runs it emulated (slow, for checks)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise UserError("--float8 needs the optional package torchao: pip install torchao") from e
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("--float8 with --lora: the adapters' frozen base linears are not converted; use one of them")
    # tensorwise scaling all-gathers the converted weights in float8 (half the bytes of bf16; torchao has
    # it for no other recipe). It wraps each one in a torchao tensor subclass, which `plain` takes off for DCP.
    cfg = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate,
                              enable_fsdp_float8_all_gather=recipe == "tensorwise")
    convert_to_float8_training(model, config=cfg, module_filter_fn=lambda m, name: bool(LORA_PREFIX.match(name)))
    model.language_model.model.pad_experts = True  # float8 scaling needs rows: no expert's input may be empty
    model.float8_all_gather = cfg.enable_fsdp_float8_all_gather


def float8_scales(model: nn.Module):
    """With float8 all-gather: every float8 weight's scale at once, one all-reduce (else one per weight,
    in its all-gather). Run after anything that changes the weights: an optimizer step, a load."""
    if getattr(model, "float8_all_gather", False):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
        precompute_float8_dynamic_scale_for_fsdp(model)


def reset_pos_tables(model: nn.Module, device):
    """The two sin-cos tables are buffers, not loaded: recompute them (upstream pops them too)."""
    for mod in model.modules():
        if isinstance(mod, PositionEmbedding):
            mod.pos_embed = sincos_2d(mod.grid, mod.dim).to(device)


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str, d: Dist, only: set[str] | None = None) -> str:
    """Strictly load a BAGEL checkpoint (official or HF layout) into the sharded model; with `only`,
    just those keys (a resume loads the frozen weights from the base, the rest from its checkpoint).

    Only rank 0 reads files, with plain reads at the header offsets (convert_weights.py's reader: a
    memory map would keep every page of a 29 GB file in its RSS until closed). Each tensor is
    broadcast once in its stored dtype and every rank keeps its shard (cast to the parameter's dtype
    by the copy), so peak host memory is a rank's shard plus one tensor, where loading the full
    checkpoint on every rank would hold 8 copies of 29 GB on a node. Returns the CRC-32 of the frozen
    parameters' bytes as stored (hex; resume compares it with the one in the checkpoint's meta.json)."""
    from convert_weights import safetensors_sources
    params = {fqn(n): p for n, p in model.named_parameters()}
    plan, sources = [None], {}
    if d.rank == 0:
        off = tuple(p + "." for p in TOP_LEVEL if not hasattr(model, p))  # visual_und/gen switched off
        index = checkpoint_index(path)[0]
        reader = CheckpointReader({k: tuple(p.shape) for k, p in params.items()}, index, path, off)
        reader.close()  # names, shapes and dtypes come from the headers; the data from plain reads
        sources = safetensors_sources({k: index[k] for k in reader.want if k in index}) if not reader.error else {}
        plan = [(reader.error, {k: s.dtype for k, s in sources.items()}, reader.fresh_nsa)]
    dist.broadcast_object_list(plan, src=0)
    error, dtypes, fresh_nsa = plan[0]
    if error:
        raise UserError(error)
    # NSA added to a dense checkpoint: every rank computes the same deterministic init locally
    new_nsa = fresh_nsa and any(".self_attn.nsa." in k for k in params)  # (sin-cos tables: reset_pos_tables)
    fresh = {fqn(k): v for k, v in fresh_tensors(model, "cpu", new_nsa).items() if fqn(k) in params}  # + LoRA
    crc = 0
    for k, p in params.items():
        if only is not None and k not in only:
            continue
        if k in fresh:
            t = fresh[k].to(d.device)
        else:
            if d.rank == 0:
                t = sources[k].read()
                if not p.requires_grad:  # ~2 GB/s: a few seconds for the 7.5B that --freeze und freezes
                    crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
                t = t.to(d.device)
            else:
                t = torch.empty(p.shape, dtype=dtypes[k], device=d.device)
            dist.broadcast(t, src=0)
        # every rank now holds the full tensor: keep the local slice only, no more communication
        shard = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(shard.to_local())
        del t, shard
    reset_pos_tables(model, d.device)
    out = [f"{crc:08x}"]
    dist.broadcast_object_list(out, src=0)
    return out[0]


# -------------------------------------------------------------------------------------------------
# EMA: fp32 shards beside the master shards (in bf16, decay 0.9999 rounds every update away: it would not move)

def ema_init(model: nn.Module) -> dict[str, torch.Tensor]:
    """Sharded fp32 copies of the trainable parameters, keyed by official name. Frozen parameters
    never change, so they have no EMA (an export takes them from the base checkpoint)."""
    return plain({fqn(n): p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad})


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float):
    """ema = decay * ema + (1 - decay) * param, on local shards (no communication)."""
    params = {fqn(n): p for n, p in model.named_parameters() if p.requires_grad}
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    torch._foreach_lerp_([local(e) for e in ema.values()], [local(params[k]) for k in ema], 1 - decay)


def ema_state_dict(ema: dict[str, torch.Tensor], model_sd: dict) -> dict:
    """The EMA under the model's keys: every key of the (trained) state dict, EMA where trained."""
    return {k: ema.get(k, v) for k, v in model_sd.items()}


# -------------------------------------------------------------------------------------------------
# DCP checkpoints: output_dir/step-NNNNNNN/ = DCP shards + args.json + meta.json (written last)

def git_rev() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"step-{step:07d}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first: meta.json is written after every shard, so a run killed
    while saving leaves a folder that `--resume auto` skips."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(output_dir, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def crc32_file(path: str) -> str:
    """CRC-32 of a file, read in 16 MB chunks: zlib runs at ~2.5 GB/s on one core, so the disk sets the pace."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def shares(names: list[str], sizes: dict[str, int], world: int) -> list[list[str]]:
    """Which rank checks which files of a step folder: DCP's `__{r}_{i}.distcp` go to rank r (the one that
    wrote them, and at an unchanged world size the one that reads them), the rest (index, args.json,
    shards of ranks beyond this world) to whichever rank has the fewest bytes so far: every rank reads
    about the same amount at once, not rank 0 everything while the others wait."""
    own, load = [[] for _ in range(world)], [0] * world
    rest = []
    for name in names:
        m = re.fullmatch(r"__(\d+)_\d+\.distcp", name)
        if m and int(m.group(1)) < world:
            own[int(m.group(1))].append(name)
            load[int(m.group(1))] += sizes[name]
        else:
            rest.append(name)
    for name in sorted(rest, key=lambda n: -sizes[n]):
        r = load.index(min(load))
        own[r].append(name)
        load[r] += sizes[name]
    return own


def file_table(path: str, crc: bool, d: Dist, group=None) -> dict[str, dict]:
    """Every file of a step folder but meta.json: its size, and its CRC-32 with `crc` (for meta.json),
    each rank hashing its share (`shares`) in parallel; the whole table on rank 0 (None on the others).
    A rank that cannot read its share (a full disk, a vanished file) makes rank 0 raise its OSError."""
    sizes = [None]
    if d.rank == 0:  # one listing for all: ranks listing alone could disagree on a file and skip it
        try:
            sizes = [{n: os.path.getsize(os.path.join(path, n)) for n in sorted(os.listdir(path))
                      if n not in ("meta.json", "meta.json.tmp")}]
        except OSError as e:
            sizes = [f"rank 0: {e}"]
    dist.broadcast_object_list(sizes, src=0, group=group)
    if isinstance(sizes[0], str):  # every rank stops here, none waits in the gather below
        raise OSError(sizes[0])
    sizes, problem, table = sizes[0], None, {}
    try:
        for name in shares(sorted(sizes), sizes, d.world_size)[d.rank]:
            table[name] = {"size": os.path.getsize(os.path.join(path, name))}
            if crc:
                table[name]["crc32"] = crc32_file(os.path.join(path, name))
    except OSError as e:
        problem = f"rank {d.rank}: {e}"
    tables = [None] * d.world_size
    dist.all_gather_object(tables, (problem, table), group=group)
    if d.rank:
        return None
    for problem, _ in tables:
        if problem:
            raise OSError(problem)
    return dict(sorted((k, v) for _, t in tables for k, v in t.items()))


def verify_checkpoint(path: str, d: Dist | None = None) -> str | None:
    """What is wrong with a checkpoint folder, or None: meta.json readable, every file it lists present
    with its size (and CRC-32, if it was saved with --ckpt.verify hash), DCP's index readable. Catches
    a shard truncated by a full disk or an interrupted copy before torch's unpickler meets it. With `d`,
    every rank checks its share of the files (`shares`) and all get the first problem any rank found."""
    problem = None
    try:
        with open(os.path.join(path, "meta.json")) as f:
            files = json.load(f).get("files", {})  # {}: saved before meta.json listed its files
    except (OSError, ValueError) as e:
        problem, files = f"meta.json: cannot read it ({e})", {}
    rank, world = (d.rank, d.world_size) if d else (0, 1)
    for name in shares(sorted(files), {n: f["size"] for n, f in files.items()}, world)[rank]:
        if problem:
            break
        p, want = os.path.join(path, name), files[name]
        if not os.path.exists(p):
            problem = f"{name}: missing"
        elif os.path.getsize(p) != want["size"]:
            problem = f"{name}: {os.path.getsize(p)} bytes, meta.json says {want['size']}"
        elif "crc32" in want and (crc := crc32_file(p)) != want["crc32"]:
            problem = f"{name}: CRC-32 {crc}, meta.json says {want['crc32']}"
    if rank == 0 and not problem:
        try:
            dcp.FileSystemReader(path).read_metadata()
        except Exception as e:  # the unpickler raises anything from EOFError to UnpicklingError
            problem = f".metadata: DCP cannot read it ({type(e).__name__}: {e})"
    if d is None:
        return problem
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    return next((p if world == 1 else f"rank {r}: {p}" for r, p in enumerate(problems) if p), None)


def resume_point(output_dir: str, resume: str, d: Dist, before: str | None = None) -> str | None:
    """The checkpoint to resume from ('auto', 'none' or a path: --ckpt.resume). Rank 0 lists the
    candidates and broadcasts them: with a node-local output_dir, ranks deciding alone would load
    different steps (or none) and hang in the first collective. Every rank then checks that it can
    read a candidate (if one cannot, all stop together with an error naming the checkpoint and the
    ranks) and verifies its share of the files (`verify_checkpoint`). 'auto' takes the newest complete
    checkpoint that verifies and is older than the folder `before` (the one that then failed to load),
    logging each one it skips; if checkpoints exist but none is left it stops rather than silently
    start over."""
    plan = [None]
    if d.rank == 0:
        if resume == "auto":  # folder names, looked up in each rank's output_dir
            found = [os.path.basename(p) for _, p in list_checkpoints(output_dir)]
            plan = [(None, [n for n in reversed(found) if not before or n < before], len(found))]  # names sort as steps
            if not found and os.path.isdir(output_dir) and any(STEP_DIR.match(n) for n in os.listdir(output_dir)):
                print(f"warning: {output_dir} has only incomplete checkpoints (saves that died before meta.json): "
                      f"starting from the base", flush=True)
        elif resume == "none":
            plan = [(None, [], 0)]
        elif not os.path.exists(os.path.join(resume, "meta.json")):
            plan = [(f"--ckpt.resume {resume}: not a complete checkpoint (no meta.json)", [], 0)]
        else:
            plan = [(None, [os.path.abspath(resume)], 1)]
    dist.broadcast_object_list(plan, src=0)
    error, names, found = plan[0]
    if error:
        raise UserError(error)
    for name in names:
        path = os.path.join(output_dir, name)  # an absolute path (an explicit --ckpt.resume) stays itself
        missing = [f for f in ("meta.json", ".metadata") if not os.access(os.path.join(path, f), os.R_OK)]
        bad = [None] * d.world_size
        dist.all_gather_object(bad, f"rank {d.rank} cannot read {path}/{missing[0]}" if missing else None)
        if bad[0] is None and any(bad):  # (a file rank 0 lacks too is damage: verify_checkpoint names it)
            raise UserError(f"rank 0 resumes from {path}, but " + "; ".join(b for b in bad if b) + ": every rank "
                            "must see the same checkpoints (a shared --output-dir), or pass --ckpt.resume none")
        problem = verify_checkpoint(path, d)
        if problem is None:
            return path
        if resume != "auto":
            raise UserError(f"--ckpt.resume {resume}: damaged checkpoint: {problem}")
        if d.rank == 0:
            print(f"checkpoint {path} is damaged, skipped: {problem}", flush=True)
    if found and resume == "auto":
        raise UserError(f"{output_dir}: none of its {found} checkpoints verifies and loads (see the lines above): "
                        f"repair or move them away, or start from the base with --ckpt.resume none")
    return None


class OptionsDiffer(packing.UserError, ValueError):
    """A sound checkpoint saved by a run whose model options differ from this run's: loading it would fail
    (other tensors) or train another function. Never a reason to skip it for an older one (saved alike)."""


def lora_options(lo: dict) -> str:
    if not lo.get("rank"):
        return "no LoRA"
    return (f"--lora.rank {lo['rank']} --lora.alpha {lo.get('alpha') or 2 * lo['rank']:g} --lora.targets {lo['targets']}"
            + " --lora.vit" * bool(lo["vit"]))


def model_options(args: dict, cfg) -> dict[str, str]:
    """The options of a run (its args as args.json holds them) that decide which tensors its checkpoints
    hold and what they compute, each as the flags that set it; unset ones are the base config's (`cfg`).
    --lora.dropout, --dtype and the like may change across a resume, so they are not here."""
    nsa = args.get("attn") == "nsa" or cfg.nsa is not None
    freeze = " ".join(sorted(args.get("freeze") or ()))
    opts = {"attn": "--attn nsa" if nsa else "dense attention (sdpa or flex)",
            "lora": lora_options(args.get("lora") or {}),
            "freeze": f"--freeze {freeze}" if freeze else "no --freeze"}
    for part in ("visual_und", "visual_gen"):
        opts[part] = f"--{part.replace('_', '-')} {getattr(cfg, part) if args.get(part) is None else args[part]}"
    if nsa and cfg.nsa is None:  # NSA added to a dense base: its weights' shapes and meaning are the run's --nsa.*
        opts.update({f"nsa.{k}": f"--nsa.{k.replace('_', '-')} {v}" for k, v in (args.get("nsa") or {}).items()})
    return opts


def check_options(path: str, args: dict) -> None:
    """Raise OptionsDiffer if the run that saved checkpoint `path` (its args.json) had other model options
    (`model_options`) than this run (`args`, as args.json holds them): before anything is built, naming
    each option with both values, instead of a shape or missing-key error deep in DCP read as damage."""
    try:
        with open(os.path.join(path, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # verify_checkpoint reports an unreadable args.json; load_checkpoint compares the tensors
    cfg = read_config(args["model"])  # unset options mean the same base config for both runs
    was, now = model_options(saved, cfg), model_options(args, cfg)
    diff = [k for k in {**was, **now} if was.get(k) != now.get(k)]
    if "attn" in diff:  # the NSA settings of a run without NSA do not count
        diff = [k for k in diff if not k.startswith("nsa.")]
    if not diff:
        return
    hint = ""
    if was.get("attn") != now["attn"] and now["attn"] == "--attn nsa":
        hint = (f" To train NSA from this dense checkpoint, export it (python convert_weights.py --model {path} --output-dir DIR) and "
                f"start a run from that: --model DIR --attn nsa, with another --output-dir.")
    raise OptionsDiffer(f"{path}: saved by a run with {', '.join(was.get(k, '-') for k in diff)}, but this run has "
                        f"{', '.join(now.get(k, '-') for k in diff)}: the checkpoint is fine, the options differ. "
                        f"Resume with the checkpoint's options, or start over (--ckpt.resume none, or another "
                        f"--output-dir).{hint}")


def rng_state(d: Dist) -> dict[str, torch.Tensor]:
    """This rank's global RNG states, as checkpoints store them: the CPU's, and the GPU's (LoRA dropout
    on a GPU draws from it)."""
    state = {f"rng{d.rank}": torch.get_rng_state()}
    if d.device.type == "cuda":
        state[f"device_rng{d.rank}"] = torch.cuda.get_rng_state(d.device)
    return state


def trained_state_dict(model: nn.Module) -> dict:
    """The model state dict without the frozen parameters: they never change, so checkpoints do not
    store them; a resume and convert_weights.py read them from the base checkpoint."""
    frozen = {fqn(n) for n, p in model.named_parameters() if not p.requires_grad}
    return plain({k: v for k, v in get_model_state_dict(model).items() if k not in frozen})


def plain(sd):
    """The state dict's tensors without the wrapper subclass float8 all-gather puts on converted weights
    (and their clones: the EMA), as plain tensors on the same storage: DCP then writes bytes any reader
    loads without torchao, and loads in place into the weights. (AdamW's states are made plain.)"""
    def unwrap(t):
        if isinstance(t, DTensor) and type(t._local_tensor) is not torch.Tensor:
            return DTensor.from_local(unwrap(t._local_tensor), t.device_mesh, t.placements, run_check=False,
                                      shape=t.shape, stride=t.stride())
        if type(t) not in (torch.Tensor, nn.Parameter, DTensor) and hasattr(t, "__tensor_flatten__"):
            return getattr(t, t.__tensor_flatten__()[0][0])  # the one high-precision tensor it wraps
        return t
    return torch.utils._pytree.tree_map_only(torch.Tensor, unwrap, sd)


@dataclass
class AsyncSaver:
    """What --ckpt.async keeps from one save to the next: a gloo group of its own (the background writer's
    collectives never interleave with training's) and DCP's stager, whose host copies of the state are
    allocated at the first save and refilled at every later one (pinned when CUDA is present, for fast
    copies from the device). The stager caches by source storage, which training updates in place."""
    group: dist.ProcessGroup
    stager: DefaultStager


def async_saver(d: Dist) -> AsyncSaver:
    pin = d.device.type == "cuda"  # pinning needs CUDA; on CPU the same buffers are reused, unpinned
    return AsyncSaver(dist.new_group(backend="gloo"), DefaultStager(StagingOptions(
        use_pinned_memory=pin, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False)))


def save_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer, ema: dict | None,
                    trainer: dict, rank_state: dict, d: Dist, args_json: dict, meta: dict,
                    verify: str = "size", keep_last: int = 0, saver: AsyncSaver | None = None) -> Future | None:
    """One DCP checkpoint: "model" and "ema" (official keys of what training changes, fp32 shards, no
    FSDP/wrapper prefixes), "optim" (keyed by parameter name, so it reshards), "trainer" (step,
    scheduler: JSON) and one "rank{r}" JSON entry per rank (data position) plus its RNG states (CPU, device).

    meta.json comes last, listing every file with its size (and CRC-32 with verify="hash", each rank
    hashing its share: `file_table`); only then are checkpoints beyond `keep_last` pruned, so the newest
    good one survives a failed save. With `saver` (`async_saver`) the state is copied to its host
    buffers here and written in the background: the returned future finishes the checkpoint, and must
    be waited on before the next save and at the end."""
    model_sd = trained_state_dict(model)
    sd = {"model": model_sd, "optim": get_optimizer_state_dict(model, opt), "trainer": json.dumps(trainer),
          f"rank{d.rank}": json.dumps(rank_state), **rng_state(d)}
    if ema is not None:
        sd["ema"] = ema_state_dict(ema, model_sd)
    if d.rank == 0 and os.path.exists(os.path.join(path, "meta.json")):
        os.remove(os.path.join(path, "meta.json"))  # overwriting: incomplete until rewritten
    dist.barrier()
    meta = {**meta, "world_size": d.world_size, "git": git_rev(), "torch": torch.__version__}

    def finish(write, group):
        try:
            write()
            if d.rank == 0:
                with open(os.path.join(path, "args.json"), "w") as f:
                    json.dump(args_json, f, indent=1)
            files = file_table(path, verify == "hash", d, group)
            if d.rank == 0:
                with open(os.path.join(path, "meta.json.tmp"), "w") as f:  # renamed: never half a meta.json
                    json.dump({**meta, "files": files}, f, indent=1)
                os.replace(os.path.join(path, "meta.json.tmp"), os.path.join(path, "meta.json"))
        except (OSError, CheckpointException) as e:
            if d.rank == 0:  # free what the failed save took (a full disk); without meta.json it is no checkpoint
                shutil.rmtree(path, ignore_errors=True)
            raise OSError(f"saving the checkpoint {path} failed: {dcp_error(e)}") from None

    def prune():  # rank 0, once the checkpoint is complete and the other ranks are not waiting for it
        if d.rank == 0:
            prune_checkpoints(os.path.dirname(path), keep_last, path)

    if saver is None:
        done = Future()
        try:
            finish(lambda: dcp.save(sd, checkpoint_id=path), None)
            done.set_result(None)
        except OSError as e:
            done.set_exception(e)
        wait_saved(done, d)
        prune()
        return None
    try:
        staged = dcp.async_save(sd, checkpoint_id=path, process_group=saver.group, async_stager=saver.stager)
    except (OSError, CheckpointException) as e:
        raise UserError(f"saving the checkpoint {path} failed: {dcp_error(e)}") from None
    pool = ThreadPoolExecutor(1)
    done = pool.submit(lambda: (finish(staged.result, saver.group), prune()))
    pool.shutdown(wait=False)
    return done


def wait_saved(pending: Future | None, d: Dist) -> None:
    """Wait for a save to complete. Rank 0 writes meta.json, so only it may fail late (a full disk): its
    outcome is broadcast and every rank stops with its message instead of hanging in the next collective."""
    if pending is None:
        return None
    outcome = [None]
    try:
        pending.result()
    except OSError as e:
        outcome = [str(e)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:  # a full disk, a lost mount: the user's to fix
        raise UserError(outcome[0])
    return None


def dcp_error(e: BaseException) -> str:
    """The first underlying error of a failed DCP save or load (it wraps every rank's in a CheckpointException)."""
    if isinstance(e, CheckpointException):
        for rank, failure in sorted(e.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
            return f"rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


class Damaged(ValueError):
    """A checkpoint that verified but cannot be loaded; the message names the file (if known) and the problem."""


class _Reader(dcp.FileSystemReader):
    """DCP's reader, remembering the file it read last: its read errors (an unpickler's) do not name it.
    `_slice_file` is called once per item read; should torch rename it, the file is just not named."""
    last = None

    def _slice_file(self, file, sinfo):
        self.last = sinfo.relative_path
        return super()._slice_file(file, sinfo)


def agree(problem: str | None, d: Dist) -> None:
    """Raise Damaged on every rank if any rank met a problem (the first one's): all ranks move on
    together, and none waits in a collective that the others have left."""
    problems = [None] * d.world_size
    dist.all_gather_object(problems, problem)
    for r, p in enumerate(problems):
        if p:
            raise Damaged(p if d.world_size == 1 else f"rank {r}: {p}")


def load_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer, ema: dict | None,
                    d: Dist, frozen_crc32: str | None = None) -> tuple[dict, list[dict]]:
    """Restore model, optimizer and EMA in place from a DCP checkpoint saved at any world size; the
    frozen parameters are already loaded from the base, whose CRC (`load_pretrained`) must be the
    one the checkpoint was saved with. Returns (trainer state, the data states of every rank that
    saved it).

    Raises Damaged on every rank if any rank cannot read it (bytes garbled at an unchanged size pass
    --ckpt.verify size). Model, optimizer and EMA may then hold part of it: a later load of another
    checkpoint overwrites every tensor this one wrote (DCP loads every key or fails), and nothing else
    (scheduler, data, RNG) is set before the load has succeeded on every rank."""
    reader, meta, problem = _Reader(path), None, None
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        keys = reader.read_metadata().state_dict_metadata
    except Exception as e:  # rank 0 verified both, but a rank on another node may see other bytes
        problem = f"{'.metadata' if meta else 'meta.json'}: cannot read it ({type(e).__name__}: {e})"
    agree(problem, d)
    old_world, saved_crc = meta.get("world_size"), meta.get("frozen_crc32")
    if frozen_crc32 is not None and saved_crc is not None and saved_crc != frozen_crc32:
        raise OptionsDiffer(f"{path}: saved by a run whose frozen weights had CRC-32 {saved_crc}, but the base "
                            f"{meta.get('base')!r} and --freeze of this run give {frozen_crc32}: resume with the "
                            f"same --model and --freeze (the checkpoint does not store frozen weights)")
    model_sd, optim_sd = trained_state_dict(model), get_optimizer_state_dict(model, opt)
    # the index names every tensor saved: one this model lacks or shapes otherwise is a change of options
    # or of --model that check_options could not see, not damage (DCP would call it a missing key)
    want = {k: tuple(v.shape) for k, v in model_sd.items()}
    have = {k[len("model."):]: tuple(m.size) for k, m in keys.items() if k.startswith("model.") and hasattr(m, "size")}
    if want != have:
        lack, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        shape = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        raise OptionsDiffer(f"{path}: " + "; ".join(x for x in (
            lack and f"lacks {len(lack)} tensors this run trains (e.g. {lack[0]})",
            extra and f"holds {len(extra)} tensors this run does not train (e.g. {extra[0]})",
            shape and f"{len(shape)} tensors have other shapes (e.g. {shape[0]}: {have[shape[0]]} saved, "
                      f"{want[shape[0]]} here)") if x) +
            ": it was saved with other model options or another --model (its args.json has them); the checkpoint "
            "is fine. Resume with its options, or start over (--ckpt.resume none, or another --output-dir)")
    sd = {"model": model_sd, "optim": optim_sd, "trainer": ""}
    if old_world == d.world_size:  # a rank's RNG streams are its own: restored at the same world size only
        sd.update({k: v for k, v in rng_state(d).items() if k in keys})
    # every old rank's data state (small JSON): exact resume uses this rank's, a run at another world
    # size or worker count continues the stream from all of them
    sd.update({f"rank{r}": "" for r in range(old_world or 0) if f"rank{r}" in keys})
    if ema is not None:
        if not any(k.startswith("ema.") for k in keys):
            raise OptionsDiffer(f"{path}: has no EMA; resume with --optim.ema-decay 0 or from a run with EMA")
        sd["ema"] = {k: ema[k] for k in ema}  # loaded in place into the fp32 shards
    try:
        dcp.load(sd, storage_reader=reader)
    except CheckpointException as e:  # raised on every rank, listing each failed rank's error
        if d.rank in e.failures:  # only this rank's reader knows the file it failed in
            own = e.failures[d.rank]
            own = own[0] if isinstance(own, tuple) else own  # (exception, traceback)
            # the unpickler's core, not torch.load's advice to retry with weights_only=False (on garbled bytes)
            why = (str(own).split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0]
            problem = f"{reader.last + ': ' if reader.last else ''}DCP cannot read it ({type(own).__name__}: {why})"
    agree(problem, d)
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, opt, optim_sd)
    float8_scales(model)
    if f"rng{d.rank}" in sd:
        torch.set_rng_state(sd[f"rng{d.rank}"])
    if f"device_rng{d.rank}" in sd:
        torch.cuda.set_rng_state(sd[f"device_rng{d.rank}"], d.device)
    return json.loads(sd["trainer"]), [json.loads(sd[f"rank{r}"]) for r in range(old_world or 0) if f"rank{r}" in sd]


def prune_checkpoints(output_dir: str, keep_last: int, writing: str | None = None):
    """Delete all but the newest `keep_last` complete checkpoints (rank 0 only, after a save completes),
    and, whatever `keep_last`, every folder without meta.json older than the newest complete one: a save
    that died (a crash-looping job would fill the disk with them). The folder being written (`writing`)
    and any newer one are left alone."""
    found = list_checkpoints(output_dir)
    if not found:
        return
    done = {p for _, p in found}
    for name in sorted(os.listdir(output_dir)):
        path, m = os.path.join(output_dir, name), STEP_DIR.match(name)
        if m and int(m.group(1)) < found[-1][0] and path not in done and path != writing and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}: an incomplete checkpoint (no meta.json, a save that died) older than "
                  f"{found[-1][1]}", flush=True)
    if keep_last > 0:
        for _, path in found[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
