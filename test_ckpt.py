"""Checkpoints a user can trust (fsdp.py save/verify/resume, train.py save): a damaged newest checkpoint
is named and skipped, a checkpoint of other model options is named as that (never as damage), a failed
save names its folder and leaves nothing that looks complete, an async save writes what a synchronous
one does into buffers it reuses, each rank hashes its own files, dead saves are pruned, and torchrun
--max-restarts resumes by itself. Tiny model, one process (gloo world of 1) except the torchrun and
hashing tests (2 ranks). Each test names the bug it catches."""
import errno
import faulthandler
import json
import multiprocessing
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from test_paths import run_main
from test_train import ckpt, free_port, one_thread, print_to, random_demo_vae, read_dcp, world1  # noqa: F401 (fixtures)

RECORDS = ["vqa", "t2i", "edit", "text"]
SHARD = "__0_0.distcp"  # rank 0's DCP data file


def state(step_dir, tmp) -> dict:
    """Everything a checkpoint holds (model, optim, ema, trainer, data and RNG state), flattened."""
    sd = read_dcp(str(step_dir), str(tmp / "read.pt"))
    flat = {}
    def walk(x, key):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}.{k}")
        else:
            flat[key] = x
    walk(sd, "")
    return flat


def assert_same(got: dict, want: dict):
    """Bit-identical, but for the saved global RNG: training never draws from it (train.keyed_generator),
    so it holds whatever earlier tests in this process left there."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k.startswith(".rng"):
            continue
        assert torch.equal(got[k], v) if torch.is_tensor(v) else got[k] == v, k


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip(path):  # same size, one byte changed in the middle: only a hash sees it
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def drop_crcs(step_dir):  # as if saved under the default --ckpt.verify size
    meta = json.load(open(step_dir / "meta.json"))
    for f in meta["files"].values():
        f.pop("crc32")
    json.dump(meta, open(step_dir / "meta.json", "w"))


def garble_item(step_dir, key: str, shard: str = SHARD):
    """Zero the start of one saved item (its zip header) in place: sizes unchanged, DCP cannot read it."""
    import torch.distributed.checkpoint as dcp
    items = dcp.FileSystemReader(str(step_dir)).read_metadata().storage_data
    where = next(v for k, v in items.items() if k.fqn == key and v.relative_path == shard)
    with open(step_dir / shard, "r+b") as f:
        f.seek(where.offset)
        f.write(b"\0" * 16)


def test_damaged_checkpoints_are_named_skipped_and_the_run_ends_bit_identical(ckpt, tmp_path, capsys):
    """Run a saves steps 1-3 (--ckpt.verify hash, EMA). Copy x: step 3's shard truncated, step 2's deleted;
    copy y: step 3's shard with one byte flipped (same size), step 2's DCP index overwritten with
    same-size garbage and its CRCs dropped (the default --ckpt.verify size); copy z, CRCs dropped: in
    step 3's shard the item DCP loads last (the last EMA tensor) garbled at the same size, so it passes
    verification and fails halfway through the load. Auto resume names each folder, file and problem,
    continues from step 1 (x, y) or 2 (z), and its step 3 equals run a's bit for bit (model, optimizer,
    EMA, trainer and data state). Every checkpoint damaged: an error, not a silent restart; an explicit
    damaged path (failing verification, or the load): an error naming it. Catches resume loading a
    damaged shard (torch's raw EOFError), skipping it silently, falling back to the base instead of
    step 1, a hash not checked, a load error stopping the run, and state half-loaded from the
    damaged checkpoint left in the model, optimizer or EMA."""
    common = ("--max-steps", "3", "--ckpt.every", "1", "--ckpt.keep-last", "0", "--optim.ema-decay", "0.75")
    run_main(ckpt, tmp_path / "a", RECORDS, *common, "--ckpt.verify", "hash")
    want = state(tmp_path / "a" / "step-0000003", tmp_path)
    x, y, z = tmp_path / "x", tmp_path / "y", tmp_path / "z"
    for out in (x, y, z):
        shutil.copytree(tmp_path / "a", out)
    truncate(x / "step-0000003" / SHARD)
    os.remove(x / "step-0000002" / SHARD)
    flip(y / "step-0000003" / SHARD)
    drop_crcs(y / "step-0000002")
    with open(y / "step-0000002" / ".metadata", "r+b") as f:
        f.write(b"\0" * os.path.getsize(y / "step-0000002" / ".metadata"))
    drop_crcs(z / "step-0000003")
    last_ema = [k for k in want if k.startswith(".ema.") and "pos_embed" not in k][-1][1:]  # (tables: not loaded)
    garble_item(z / "step-0000003", last_ema)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # before z's run rewrites its step 3
        run_main(ckpt, tmp_path / "c", RECORDS, *common, "--ckpt.resume", str(z / "step-0000003"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --ckpt.resume {z}/step-0000003: damaged checkpoint: {SHARD}: DCP cannot read it (" in err, err
    for out, says in ((x, {3: "bytes, meta.json says", 2: f"{SHARD}: missing"}),
                      (y, {3: f"{SHARD}: CRC-32", 2: ".metadata: DCP cannot read it"}),
                      (z, {3: f"{SHARD}: DCP cannot read it (UnpicklingError"})):
        run_main(ckpt, out, RECORDS, *common)
        log = capsys.readouterr().out
        for step, problem in says.items():
            line = f"checkpoint {out}/step-{step:07d} is damaged, skipped: "
            assert line in log and problem in log.split(line)[1].splitlines()[0], log
        assert f"resumed from {out}/step-{3 - len(says):07d} at step {3 - len(says)}" in log, log
        assert_same(state(out / "step-0000003", tmp_path), want)

    for step in (1, 2, 3):  # x has steps 1-3 again, all good: damage them all
        os.remove(x / f"step-{step:07d}" / SHARD)
    with pytest.raises(SystemExit) as e:
        run_main(ckpt, x, RECORDS, "--max-steps", "4")
    assert e.value.code == 2
    assert f"error: {x}: none of its 3 checkpoints verifies and loads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main(ckpt, tmp_path / "c", RECORDS, "--max-steps", "4", "--ckpt.resume", str(x / "step-0000003"))
    assert e.value.code == 2
    assert f"error: --ckpt.resume {x}/step-0000003: damaged checkpoint: {SHARD}: missing" in capsys.readouterr().err


def test_failed_save_names_the_folder_and_keeps_the_last_good_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    """A save that cannot write stops the run with exit 2 and one line naming the folder: a file where the
    step folder goes; a full disk (DCP's file writer raising ENOSPC); a read-only --output-dir (made so
    before step 2, which is then saved by an unprivileged user: root writes anywhere). It leaves no
    folder with meta.json, and --ckpt.keep-last 1 has not deleted step 1 (the last good one) for it.
    Catches a raw CheckpointException traceback, a meta.json written after a failed write, and pruning
    before the new checkpoint is complete."""
    import tempfile
    import torch.distributed.checkpoint.filesystem as fs
    import fsdp
    blocked = tmp_path / "blocked"
    os.makedirs(blocked)
    (blocked / "step-0000002").write_text("")  # not a folder: DCP cannot create its files in it
    real_write, real_save = fs._write_item, fsdp.save_checkpoint
    def full(transforms, stream, *a, **k):  # step 1 writes, step 2 meets a full disk
        if "step-0000002" in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(transforms, stream, *a, **k)
    def read_only(path, *a, **k):
        if path.endswith("step-0000002"):
            os.chmod(os.path.dirname(path), 0o555)
            if os.geteuid() == 0:
                os.seteuid(65534)  # nobody; the effective uid only, so it can be undone
        try:
            return real_save(path, *a, **k)
        finally:
            os.seteuid(os.getuid())
    ro = Path(tempfile.mkdtemp())  # not under tmp_path: its parents let no other user through
    try:
        for out, says in ((blocked, "File exists"), (tmp_path / "full", "No space left"), (ro, "Permission denied")):
            if out == tmp_path / "full":
                monkeypatch.setattr(fs, "_write_item", full)
            if out == ro:
                monkeypatch.setattr(fs, "_write_item", real_write)
                monkeypatch.setattr(fsdp, "save_checkpoint", read_only)
            with pytest.raises(SystemExit) as e:
                run_main(ckpt, out, RECORDS, "--max-steps", "2", "--ckpt.every", "1", "--ckpt.keep-last", "1")
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"error: saving the checkpoint {out}/step-0000002 failed: " in err and says in err, err
            assert os.path.exists(out / "step-0000001" / "meta.json")
            assert not os.path.exists(out / "step-0000002" / "meta.json")
            assert [n for n in os.listdir(out) if n.startswith("step-")] in (["step-0000001"], ["step-0000001", "step-0000002"])
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(ro)


def test_async_save_writes_what_a_sync_save_writes(ckpt, tmp_path, capsys):
    """--ckpt.async: every checkpoint (steps 1-3, each staged while the previous one may still be written)
    holds the same tensors and states as a synchronous run's, meta.json lists the same files, and the
    run ends only once the last is complete. Catches the background write racing the next optimizer
    step (a checkpoint of step 2 holding step 3's weights), meta.json written before the shards, and
    the end of training not waiting."""
    common = ("--max-steps", "3", "--ckpt.every", "1", "--ckpt.keep-last", "0", "--ckpt.verify", "hash")
    os.makedirs(tmp_path / "sync" / "step-0000009")  # a save killed before meta.json: the run starts from the base
    run_main(ckpt, tmp_path / "sync", RECORDS, *common)
    assert f"warning: {tmp_path}/sync has only incomplete checkpoints" in capsys.readouterr().out
    run_main(ckpt, tmp_path / "async", RECORDS, *common, "--ckpt.async")
    assert "staged" in capsys.readouterr().out
    for step in (1, 2, 3):
        name = f"step-{step:07d}"
        assert_same(state(tmp_path / "async" / name, tmp_path), state(tmp_path / "sync" / name, tmp_path))
        files = [json.load(open(tmp_path / run / name / "meta.json"))["files"] for run in ("sync", "async")]
        assert files[0].keys() == files[1].keys() and SHARD in files[0]
        # the same size (the bytes differ: the staged copies serialise in another order) and a CRC-32 each
        assert files[0][SHARD]["size"] == files[1][SHARD]["size"] and all("crc32" in f for f in files[1].values())


def elastic_worker(argv: list[str], ref: str):
    """One worker of the job below: train.main(argv). In the first attempt, once step 2 is saved (async),
    rank 0 copies it to `ref` (an uninterrupted run's step 2), then rank 1 garbles its own shard of it at
    the same size (its RNG state, which rank 0 never reads) and dies."""
    import torch.distributed as dist
    import fsdp
    import train
    torch.set_num_threads(1)
    rank, first = int(os.environ["RANK"]), os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
    print_to(os.path.join(os.path.dirname(ref), f"worker{rank}.log"))  # both attempts
    save = fsdp.save_checkpoint
    def save_then_die(path, *a, **k):
        pending = save(path, *a, **k)
        if path.endswith("step-0000002"):
            pending.result()  # the background write is complete
            if rank == 0:
                shutil.copytree(path, ref)
            dist.barrier()
            if rank == 1:
                garble_item(Path(path), "rng1", "__1_0.distcp")
                os._exit(1)
        return pending
    if first:
        fsdp.save_checkpoint = save_then_die  # (in this worker process only)
    train.main(argv + (["--ckpt.async"] if first else []))


def test_torchrun_max_restarts_resumes_after_a_rank_dies(ckpt, tmp_path, monkeypatch):
    """2 ranks under torchrun's agent with --max-restarts 1 (elastic_launch, the function behind the
    torchrun command, its workers forked from a server that imported train once). The first attempt saves steps 1
    and 2 with --ckpt.async; then rank 1 garbles its shard of step 2 and dies. The agent restarts both
    workers; they find step 2 (it verifies: sizes unchanged), fail to load it on rank 1 only, agree to
    skip it, resume from step 1 and save step 2 synchronously: bit-identical to the first attempt's
    uninterrupted async step 2. Catches a restart that starts over from the base or needs a manual step,
    ranks not agreeing on a load failure (one trains on, one falls back: a hang), state half-loaded from
    step 2 left on rank 0, and a 2-rank async save differing from a sync one."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    import train
    argv, out, ref = [], tmp_path / "elastic", str(tmp_path / "ref")
    with monkeypatch.context() as m:  # run_main's arguments and data, not run
        m.setattr(train, "main", argv.extend)
        run_main(ckpt, out, RECORDS, "--max-steps", "2", "--ckpt.every", "1", "--ckpt.keep-last", "0",
                 "--timeout-min", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the agent runs in this process: it sets this variable and handlers for these signals; undo both after
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, max_restarts=1, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id="elastic", start_method="forkserver", monitor_interval=0.1)
    # workers forked from a fresh server that imported train once: forked from this process, they would
    # inherit earlier tests' gloo groups, whose destructor waits forever for threads that were not forked
    # (seen: a hang); spawned, each would import torch again (+12 s)
    multiprocessing.set_forkserver_preload(["train", "test_ckpt"])
    faulthandler.dump_traceback_later(300, exit=True)  # a hang fails the suite instead of blocking it (~10 s normally)
    try:
        elastic_launch(config, elastic_worker)(argv, ref)
    finally:
        faulthandler.cancel_dump_traceback_later()
        for s, h in handlers.items():
            signal.signal(s, h)
    log = open(tmp_path / "worker0.log").read()
    line = f"checkpoint {out}/step-0000002 is damaged, skipped: rank 1: __1_0.distcp: DCP cannot read it"
    assert line in log and f"resumed from {out}/step-0000001 at step 1" in log, log[-3000:]
    assert "staged" in log  # the first attempt saved async
    assert_same(state(out / "step-0000002", tmp_path), state(ref, tmp_path))


def snapshot(out) -> dict:
    """Every checkpoint file's bytes (CRC-32) and modification time: what 'untouched' means."""
    import fsdp
    return {str(p): (fsdp.crc32_file(str(p)), p.stat().st_mtime_ns) for p in sorted(Path(out).glob("step-*/*"))}


def test_changed_options_are_named_and_never_called_damage(ckpt, tmp_path, capsys, monkeypatch):
    """A dense checkpoint (steps 1-2) resumed with --attn nsa, --visual-und False or --freeze vit: exit 2
    and one line naming each option with the checkpoint's and this run's value (for NSA: how to start
    it from the dense checkpoint), never 'damaged', no fallback to step 1, every checkpoint file
    untouched. With that check bypassed, the load itself sees the NSA tensors missing from the index
    and says the same kind of thing (not DCP's missing key as damage). Catches changed options read
    as damage (and the older checkpoints skipped or deleted for it), a value misnamed, and the NSA
    settings compared when only one run has NSA."""
    import fsdp
    out = tmp_path / "dense"
    run_main(ckpt, out, RECORDS, "--max-steps", "2", "--ckpt.every", "1", "--ckpt.keep-last", "0")
    before = snapshot(out)
    step = out / "step-0000002"
    nsa = ("--attn", "nsa", "--nsa.block-size", "32", "--nsa.topk", "4", "--nsa.window-size", "64")
    for flags, says in ((nsa, "dense attention (sdpa or flex), but this run has --attn nsa: the checkpoint is fine"),
                        (("--visual-und", "False"), "--visual-und True, but this run has --visual-und False: "),
                        (("--freeze", "vit", "connector"), "no --freeze, but this run has --freeze connector vit: ")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(ckpt, out, RECORDS, "--max-steps", "3", *flags)
        assert e.value.code == 2
        err, log = capsys.readouterr()[::-1]
        assert f"error: {step}: saved by a run with {says}" in err, err
        assert "damaged" not in err + log and "resumed" not in log, err + log
        if flags == nsa:
            assert (f"export it (python convert_weights.py --model {step} --output-dir DIR) and start a run "
                    f"from that: --model DIR --attn nsa") in err
        assert snapshot(out) == before
    monkeypatch.setattr(fsdp, "check_options", lambda *a: None)  # as if args.json did not tell
    with pytest.raises(SystemExit) as e:
        run_main(ckpt, out, RECORDS, "--max-steps", "3", *nsa)
    err, log = capsys.readouterr()[::-1]
    assert e.value.code == 2 and f"error: {step}: lacks " in err and ".self_attn.nsa." in err, err
    assert "saved with other model options or another --model" in err and "damaged" not in err + log, err + log
    assert snapshot(out) == before


def test_incomplete_folders_older_than_the_newest_checkpoint_are_pruned(ckpt, tmp_path, capsys):
    """Saves that died before meta.json (steps 1 and 3, as a crash-looping job leaves them) are removed, with
    a line each, once a newer checkpoint is complete; one newer than the newest complete checkpoint (it
    could be a save in progress: step 9) stays, and --ckpt.keep-last still keeps the newest complete
    ones. Catches incomplete folders never pruned (the disk fills), a folder newer than the last good
    checkpoint deleted, and the pruning silent."""
    out = tmp_path / "run"
    for step in (1, 3, 9):
        os.makedirs(out / f"step-{step:07d}")
        (out / f"step-{step:07d}" / SHARD).write_bytes(b"x" * 10)
    run_main(ckpt, out, RECORDS, "--max-steps", "4", "--ckpt.every", "2", "--ckpt.keep-last", "1")
    log = capsys.readouterr().out
    for step in (1, 3):
        assert f"removed {out}/step-{step:07d}: an incomplete checkpoint (no meta.json" in log, log
    assert sorted(n for n in os.listdir(out) if n.startswith("step-")) == ["step-0000004", "step-0000009"]


def share_worker(rank: int, port: int, folder: str):
    """One of 2 gloo ranks: each writes its own DCP file, `fsdp.file_table` hashes them, rank 0 writes
    meta.json; `fsdp.verify_checkpoint` before and after rank 1 flips a byte of its file. Which files each
    rank hashed (save, then verify) and both verdicts go to folder/rank{r}.json."""
    import sys
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import fsdp
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    d = fsdp.init_distributed("cpu", timeout_min=1)
    hashed, real = [], fsdp.crc32_file
    fsdp.crc32_file = lambda p: hashed.append(os.path.basename(p)) or real(p)
    step = os.path.join(folder, "step-0000001")
    try:
        dcp.save({f"t{rank}": torch.full((1000,), float(rank))}, checkpoint_id=step)  # __{rank}_0.distcp
        files = fsdp.file_table(step, True, d)
        if rank == 0:
            json.dump({"files": files}, open(os.path.join(step, "meta.json"), "w"))
        dist.barrier()
        out = {"saved": sorted(hashed)}
        hashed.clear()
        out["verdicts"] = [fsdp.verify_checkpoint(step, d)]
        out["read"] = sorted(hashed)
        if rank == 1:
            flip(Path(step) / "__1_0.distcp")
        dist.barrier()
        out["verdicts"].append(fsdp.verify_checkpoint(step, d))
        json.dump(out, open(os.path.join(folder, f"rank{rank}.json"), "w"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as test_train's 2-rank worker: skip an interpreter exit that can abort inside gloo


def test_each_rank_hashes_and_verifies_its_own_files(tmp_path):
    """2 gloo ranks, --ckpt.verify hash: at the save and at the check before a resume each rank reads its
    own DCP file (rank 0 also the index), every file once; a byte flipped in rank 1's file is found by
    rank 1 and both ranks get the same verdict naming rank, file and CRCs (the one-rank verdicts of the
    damaged-checkpoint test above are unchanged). Catches rank 0 reading every byte while the others
    wait, a file nobody checks, and ranks disagreeing on the verdict (one resumes, one skips: a hang)."""
    import torch.multiprocessing as mp
    multiprocessing.set_forkserver_preload(["train", "test_ckpt"])  # as the elastic test above
    mp.start_processes(share_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="forkserver")
    got = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert got[0]["saved"] == got[0]["read"] == [".metadata", SHARD]
    assert got[1]["saved"] == got[1]["read"] == ["__1_0.distcp"]
    for g in got:
        assert g["verdicts"][0] is None
        assert re.fullmatch(r"rank 1: __1_0\.distcp: CRC-32 \w{8}, meta.json says \w{8}", g["verdicts"][1]), g


def test_async_save_refills_the_buffers_of_the_first(ckpt, world1, tmp_path):
    """--ckpt.async: the second save copies the state (model, AdamW moments, EMA) into the host buffers the
    first one allocated, not into new ones; what it writes is its own step's state. Catches a stager made
    anew at each save (a fresh host copy of the trained state every time) and a cache that outlives the
    source tensors' values (the second checkpoint holding the first's state)."""
    import dataclasses
    import fsdp
    import train
    from model import AutoEncoder
    from test_train import parity_args, start_run, step_run
    args = dataclasses.replace(parity_args(ckpt, 1), optim=train.OptimConfig(lr=1e-3, warmup_steps=0, ema_decay=0.75))
    model, opt, ema = start_run(args, world1, fsdp.make_mesh(world1, 0), True)
    ae = AutoEncoder.from_pretrained(ckpt)
    saver = fsdp.async_saver(world1)
    staged, stage = [], saver.stager.stage
    saver.stager.stage = lambda sd, **k: staged.append(stage(sd, **k)) or staged[-1]
    for s in (1, 2):
        step_run(model, ae, opt, ema, s, args, world1)
        fsdp.wait_saved(fsdp.save_checkpoint(str(tmp_path / f"step-{s:07d}"), model, opt, ema, {"step": s}, {}, world1,
                                             {"model": ckpt}, {}, saver=saver), world1)
    ptrs = []
    for sd in staged:
        flat = {}
        def walk(x, key):
            if isinstance(x, dict):
                for k, v in x.items():
                    walk(v, f"{key}.{k}")
            elif torch.is_tensor(x) and x.numel() > 1 and not key.startswith(".rng"):  # (RNG: new each save)
                flat[key] = (x.to_local() if hasattr(x, "to_local") else x).data_ptr()
        walk(sd, "")
        ptrs.append(flat)
    assert len(ptrs[1]) > 10 and any(".exp_avg" in k for k in ptrs[1]) and any(k.startswith(".ema.") for k in ptrs[1])
    assert ptrs[0] == ptrs[1]
    saved = state(tmp_path / "step-0000002", tmp_path)
    for k, v in fsdp.trained_state_dict(model).items():
        assert torch.equal(saved[f".model.{k}"], v.full_tensor() if hasattr(v, "full_tensor") else v), k
