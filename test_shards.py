"""Sharding over ranks x DataLoader workers, simulated in-process (every (rank, worker) shard built in
this process, nothing spawned), and a 4-rank gloo run on data that used to leave ranks empty.

Each test names the bug it catches."""
import copy
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import data
from test_data import small_cfg, stream_shards_partly
from test_train import RECORDS, ckpt, data_config, print_to  # noqa: F401 (fixture)

RANKS, WORKERS = 8, 4


def rec(i: int) -> dict:
    return {"messages": json.dumps([{"role": "user", "content": f"q{i}"},
                                    {"role": "assistant", "content": "a " * (1 + i % 9)}])}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """Three parquet files of 5, 1 and 40 row groups of 50 rows, in one directory and as a weighted
    yaml mixture (0.3 / 0.2 / 0.5); jsonl files of 1,025 and 11 lines; a mixture of 250, 11 and
    2,000 rows."""
    d = tmp_path_factory.mktemp("layout")
    (d / "dir").mkdir()
    for name, groups in (("a", 5), ("b", 1), ("c", 40)):
        pq.write_table(pa.Table.from_pylist([rec(i) for i in range(50 * groups)]), d / "dir" / f"{name}.parquet",
                       row_group_size=50)
    (d / "mix.yaml").write_text(yaml.safe_dump({"datasets": [
        {"path": f"dir/{n}.parquet", "weight": w} for n, w in (("a", 0.3), ("b", 0.2), ("c", 0.5))]}))
    (d / "mix_small.yaml").write_text(yaml.safe_dump({"datasets": [
        {"path": p, "weight": w} for p, w in (("dir/a.parquet", 0.3), ("l11.jsonl", 0.2), ("dir/c.parquet", 0.5))]}))
    for n in (1025, 11):
        (d / f"l{n}.jsonl").write_text("".join(json.dumps({"messages": json.loads(rec(i)["messages"])}) + "\n"
                                               for i in range(n)))
    return d


def rows_read(src: data.Source, epoch: int, shard: int, n: int) -> list[tuple[int, int]]:
    return [(u, p) for u, a, b in src.plan(epoch, shard, n) for p in range(a, b)]


@pytest.mark.parametrize("name", ["dir", "mix.yaml", "l1025.jsonl", "l11.jsonl"])
def test_every_shard_reads_its_share_every_epoch(layout, name):
    """8 ranks x 4 workers, 4 epochs: each epoch every row is read once, every shard reads N // 32
    or N // 32 + 1 rows, and over the epochs no shard falls more than one row behind another (so the
    11-row source is read by the shards in turn, and no shard is empty for good). Catches the units
    cut into ceil(shards / units) slices: 1,025 lines left 31 of 32 shards with 33 rows and one with
    one (or none), and 11 rows were read 11, 9, 9, 9 times. The mixture of three parquet sources
    reads its row groups in pieces (Source.cut): the same holds for its units."""
    srcs = data.find_sources([str(layout / name)])
    assert (len(srcs[0].units) > sum(len(f.unit_rows) for f in srcs[0].files)) == (name == "mix.yaml")
    n, total = RANKS * WORKERS, np.zeros(RANKS * WORKERS, dtype=int)
    for epoch in range(4):
        for src in srcs:
            per = [rows_read(src, epoch, s, n) for s in range(n)]
            got = sorted(r for rows in per for r in rows)
            assert got == sorted((u, p) for u, unit in enumerate(src.units) for p in range(unit[2]))  # each row once
            counts = np.array([len(rows) for rows in per])
            assert counts.min() == src.n_rows // n and counts.max() - counts.min() <= 1
            total += counts
        assert total.max() - total.min() <= 1  # (the odd rows go round the shards across the sources too)
    for src in srcs:
        if src.n_rows >= n:  # and each shard reads few units: a unit is cut only where a slice ends in it
            assert max(len(src.plan(0, s, n)) for s in range(n)) <= -(-src.n_rows // n) // min(u[2] for u in src.units) + 2


def test_the_epoch_counter_moves_on_for_a_shard_without_rows(layout):
    """The 11-line source over 8 x 4 shards and 4 epochs, through ShardStream: together the shards read
    44 rows, each of the 11 four times. Catches ready() stopping for good on an empty slice."""
    cfg = small_cfg(data=(str(layout / "l11.jsonl"),), epochs=4, num_workers=WORKERS, packing_length=128)
    seen = Counter()
    for r in range(RANKS):
        ds = data.PackedDataset(cfg, r, RANKS)
        for w in range(WORKERS):
            seen.update(ds.sources[0].read(k)[0] for k in iter(ds.stream(w, WORKERS).next_key, None))
    assert len(seen) == 11 and set(seen.values()) == {4}


def test_mixture_shares_hold_at_8x4(layout):
    """Endless stream, 300 draws per shard: each source's share of the samples is within 2% of its
    weight although the sources hold 250, 11 and 2,000 rows. Catches shards that stop drawing a
    source whose slice is empty (the weights drift)."""
    cfg = small_cfg(data=(str(layout / "mix_small.yaml"),), epochs=None, num_workers=WORKERS)
    picks = Counter()
    for r in range(RANKS):
        ds = data.PackedDataset(cfg, r, RANKS)
        for w in range(WORKERS):
            st = ds.stream(w, WORKERS)
            picks.update(st.next_key()[0] for _ in range(300))
    share = np.array([picks[i] for i in range(3)]) / sum(picks.values())
    assert np.abs(share - [0.3, 0.2, 0.5]).max() < 0.02, share


@pytest.mark.parametrize("spec", ["dir", "mix.yaml"])
def test_a_finite_epoch_is_balanced_over_ranks(layout, spec, monkeypatch):
    """--data.epochs 1 on the 5 / 1 / 40 layout at 8 x 4: every record is in exactly one pack of one
    rank and the ranks' record counts differ by at most one per worker (the trainer steps ranks
    together and pads the ranks that run dry with idle packs, see test_four_ranks_train_1025_lines).
    Catches extra units landing on the low ranks (200 packs on ranks 0-2, 100 on ranks 4-7), and a
    piece of a row group read with the whole row group's rows decoded each time."""
    cfg = small_cfg(data=(str(layout / spec),), epochs=1, num_workers=WORKERS, packing_length=128)
    decoded = count_decoded_rows(monkeypatch)
    per_rank, seen = [], Counter()
    for r in range(RANKS):
        ds, n = data.PackedDataset(cfg, r, RANKS), 0
        for w in range(WORKERS):
            for pack, _, _ in ds.stream(w, WORKERS):
                seen.update(s.where for s in pack)
                n += len(pack)
        per_rank.append(n)
    assert len(seen) == 2300 and set(seen.values()) == {1}
    assert max(per_rank) - min(per_rank) <= WORKERS, per_rank
    # rows decoded: a unit cut by a slice's end is decoded by both shards; a piece of a row group is
    # read by decoding the row group from its start (the mixture's row groups are in two pieces)
    assert decoded[0] <= (1.25 if spec == "dir" else 2) * 2300, decoded[0] / 2300


def count_decoded_rows(monkeypatch) -> list[int]:
    """[rows of parquet record batches decoded from now on]."""
    real, n = pq.ParquetFile.iter_batches, [0]

    def counted(self, *a, **k):
        for b in real(self, *a, **k):
            n[0] += b.num_rows
            yield b
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    return n


def test_resume_mid_piece_at_another_worker_count(tmp_path):
    """Three parquet sources (row groups read in two pieces), 2 ranks x 2 workers stopped after
    uneven numbers of packs, some shards inside a piece, continued on 1 rank x 3 workers: every row
    is trained once in the epoch, and every key read after the resume names the record that a fresh
    reader finds for it, read in another order (backwards: each piece read again from its row
    group's start); a piece's rows are shuffled, anew each epoch. Catches a piece read from the
    wrong row (its row group's start), a piece's row order keyed by anything but (seed, source,
    epoch, unit), a piece's rows left in file order, and a resume that re-reads a row."""
    for name, groups in (("a", 2), ("b", 3), ("c", 4)):
        pq.write_table(pa.Table.from_pylist([rec(100 * groups + i) for i in range(20 * groups)]),
                       tmp_path / f"{name}.parquet", row_group_size=20)
    paths = tuple(str(tmp_path / f"{n}.parquet") for n in "abc")
    cfg = small_cfg(data=paths, packing_length=128, num_workers=2, epochs=1)
    before, states, ends = stream_shards_partly(cfg, lambda i: 2 + i)
    inside = 0
    for ds, i, state in ends:
        for src, (e, j, place) in zip(ds.sources, state["pos"]):  # stopped inside a piece (of 10 rows)?
            plan = src.plan(e, i, 4)
            inside += j < len(plan) and 0 < plan[j][1] + place < 10
    assert inside and all(len(s.units) == 2 * len(s.files[0].unit_rows) for s in ds.sources)
    loader = data.PackLoader(small_cfg(data=paths, packing_length=128, num_workers=3, epochs=1))
    loader.continue_from(states)
    loader.dataset.resume = loader.shards
    after = [s for w in range(3) for pack, _, _ in loader.dataset.stream(w, 3) for s in pack]
    seen = Counter(before + [s.where for s in after])
    assert len(seen) == 180 and set(seen.values()) == {1}
    fresh = data.find_sources(paths, cfg.seed)
    got = [fresh[s.key[0]].read(s.key) for s in after[::-1]]
    assert [where for where, _, _ in got] == [s.where for s in after[::-1]]
    for where, _, r in got:  # and the record is the one at that row
        groups = {"a": 2, "b": 3, "c": 4}[Path(where.split(":")[0]).stem]
        assert f'"q{100 * groups + int(where.rsplit("row ", 1)[1])}"' in r["messages"], (where, r)
    # within a piece the rows are shuffled, anew each epoch
    order = lambda e, u: [int(fresh[2].read((2, e, u, p))[0].rsplit("row ", 1)[1]) for p in range(10)]
    assert all(sorted(order(0, u)) == list(range(10 * u, 10 * u + 10)) for u in range(8))
    assert order(0, 3) != sorted(order(0, 3)) and order(0, 3) != order(1, 3)


def _rank(rank: int, port: int, argv: list[str], log: str):
    import train
    print_to(f"{log}{rank}")
    os.environ.update(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="4",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.main(argv)
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's exit (gloo threads, see test_train._worker)


def test_four_ranks_train_1025_lines(ckpt, tmp_path):  # noqa: F811
    """4 ranks (gloo) of train.py --data.epochs 1 on a 1,025-line jsonl trains: every rank gets rows,
    the run steps until the last rank's data runs out and says all records were trained. Catches
    the rank left with an empty slice stopping the run at step 0 with nothing trained."""
    import torch.multiprocessing as mp
    from test_train import free_port
    cfg = data_config()
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(RECORDS["text"] if i % 2 else {"messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a " * (1 + i % 9)}]}) + "\n"
        for i in range(1025)))
    sizes = [f"--data.{k.replace('_', '-')}={getattr(cfg, k)}" for k in ("vit_min_size", "vit_max_size",
                                                                        "vae_min_size", "vae_max_size")]
    argv = ["--model", ckpt, "--data", str(path), "--output-dir", str(tmp_path / "out"), "--dtype", "fp32",
            "--no-activation-checkpointing", "--log-every", "1", "--eval.every", "0", "--data.packing-length", "512",
            "--data.num-workers", "0", "--data.epochs", "1", "--max-steps", "50", "--ckpt.every", "0", *sizes]
    # forked from a fresh server that imported this file once: a fork of the pytest process (other tests'
    # threads) hung once before gloo started, and spawned ranks would each import torch again
    multiprocessing.set_forkserver_preload(["test_shards"])
    log = str(tmp_path / "rank")
    ctx = mp.start_processes(_rank, args=(free_port(), argv, log), nprocs=4, join=False, start_method="forkserver")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("4-rank run did not finish in 240 s")
    out = open(f"{log}0").read()
    rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert rows and "the data ran out (--data.epochs): every rank trained all its records;" in out, out[-3000:]


# --------------------------------------------------------------------------------------------------
# Reader errors: named, carried out of DataLoader workers, skipped under --data.skip-bad

def corrupt_parquet(path: Path, row_group: int, column: str = "messages"):
    """3 row groups of 50 records; the first page header of `column` in `row_group` overwritten."""
    pq.write_table(pa.Table.from_pylist([rec(i) for i in range(150)]), path, row_group_size=50, compression="none")
    md = pq.ParquetFile(path).metadata.row_group(row_group)
    col = next((md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema == column), None)
    if col is None:
        return
    with open(path, "r+b") as f:
        f.seek(col.data_page_offset)
        f.write(b"\xff" * 16)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_row_group_is_named_and_skipped(tmp_path, workers):
    """A damaged page in row group 1: the error names the file, the row group and its rows, and the
    field, as a DataError (a user error) that crosses the DataLoader worker as itself (not as
    "Caught OSError in DataLoader worker process 0" with pyarrow's bare "Couldn't deserialize
    thrift"). With skip_bad its 50 rows are skipped and counted, the other 100 trained, and the
    source is not stopped as mostly bad (a third of it is lost, but one damaged unit is no sign that
    its records are in the wrong form)."""
    path = tmp_path / "bad.parquet"
    corrupt_parquet(path, 1)
    cfg = small_cfg(data=(str(path),), packing_length=128, num_workers=workers, epochs=1)
    with pytest.raises(data.ReadError) as e:
        list(data.PackLoader(cfg))
    msg = str(e.value)
    assert msg.startswith(f"{path}: row group 1 (rows 50-99): field 'messages': cannot read") and "\n" not in msg, msg
    assert isinstance(e.value, data.packing.UserError)
    loader = data.PackLoader(small_cfg(data=(str(path),), packing_length=128, num_workers=workers, epochs=1,
                                       skip_bad=True))
    packs = list(loader)
    assert sum(len(b["sample_lens"]) for b in packs) == 100
    assert loader.stats()["skipped"] == {"unreadable_unit": 50}


def test_a_corrupt_page_in_a_later_piece_is_named_and_skipped(tmp_path):
    """Three parquet sources (row groups read in two pieces of 25 rows) where one value of row 90
    (row group 1, second piece) is damaged: the error names the file, the row group, the piece's
    rows and the field; with skip_bad only that piece's 25 rows are lost, the rows of the row group
    before it are trained."""
    for n in "abc":
        pq.write_table(pa.Table.from_pylist([rec(i) for i in range(150)]), tmp_path / f"{n}.parquet",
                       row_group_size=50, compression="none", use_dictionary=False)
    raw = (tmp_path / "a.parquet").read_bytes()
    at = raw.index(rec(90)["messages"].encode())
    with open(tmp_path / "a.parquet", "r+b") as f:
        f.seek(at - 4)  # the value's length
        f.write(b"\xff\xff\xff\x7f")
    paths = tuple(str(tmp_path / f"{n}.parquet") for n in "abc")
    with pytest.raises(data.ReadError) as e:
        list(data.PackLoader(small_cfg(data=paths, packing_length=128, epochs=1)))
    assert str(e.value).startswith(f"{tmp_path / 'a.parquet'}: row group 1 (rows 75-99 of 50-99): field 'messages': "
                                   f"cannot read"), str(e.value)
    loader = data.PackLoader(small_cfg(data=paths, packing_length=128, epochs=1, skip_bad=True))
    assert sum(len(b["sample_lens"]) for b in loader) == 450 - 25
    assert loader.stats()["skipped"] == {"unreadable_unit": 25}


def test_a_truncated_file_is_named_and_skipped(tmp_path, capsys):
    """A parquet file cut short (its footer gone) beside a good one: the start-up error names it;
    with skip_bad it is left out with a line that names it, and the good file trains."""
    corrupt_parquet(tmp_path / "good.parquet", 0, "nothing")  # no such column: nothing overwritten
    data_bytes = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data_bytes[:len(data_bytes) // 2])
    with pytest.raises(data.DataError, match=r"cut.parquet: cannot read"):
        data.PackLoader(small_cfg(data=(str(tmp_path),), packing_length=128))
    loader = data.PackLoader(small_cfg(data=(str(tmp_path),), packing_length=128, skip_bad=True))
    assert sum(len(b["sample_lens"]) for b in loader) == 150
    assert "data: skipped (--data.skip-bad), cannot be opened: " in capsys.readouterr().err


def test_the_mostly_bad_stop_crosses_a_worker_with_the_source_name(tmp_path):
    """The > 20% bad stop, raised in a DataLoader worker, reaches the loop as a DataError naming the
    source (not a worker traceback)."""
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps({"messages": []} if i % 2 else {"messages": json.loads(rec(i)["messages"])})
                         + "\n" for i in range(300)))
    with pytest.raises(data.DataError, match=rf"^{p}: \d+ of the \d+ records read so far are bad"):
        list(data.PackLoader(small_cfg(data=(str(p),), packing_length=128, num_workers=1, skip_bad=True)))


# --------------------------------------------------------------------------------------------------
# Resume knows when the data changed

def test_resume_on_changed_data_stops_and_says_what_changed(tmp_path):
    """A state saved on a directory of 2 files, resumed after a third file was added (it used to
    re-read 25 of 100 rows without a word), after a file grew, and after a source was added to a
    yaml mixture (it used to raise a bare IndexError): each stops with an error naming the change
    and the option; with --data.fresh-pass a new pass starts over the data as they are now."""
    d = tmp_path / "d"
    d.mkdir()
    for n in ("a", "b"):
        (d / f"{n}.jsonl").write_text("".join(json.dumps({"messages": json.loads(rec(i)["messages"])}) + "\n"
                                              for i in range(50)))
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"datasets": [{"path": "d/a.jsonl"}]}))
    for spec, change, want in [
            ((str(d),), lambda: (d / "c.jsonl").write_text((d / "a.jsonl").read_text()),
             r"1 files added \(e.g. .*c.jsonl\) \(100 -> 150 rows\)"),
            ((str(d),), lambda: (d / "b.jsonl").write_text((d / "b.jsonl").read_text() * 2),
             r"b.jsonl changed \(size .* bytes, 50 -> 100 rows\)"),
            ((str(tmp_path / "mix.yaml"),), lambda: (tmp_path / "mix.yaml").write_text(yaml.safe_dump(
                {"datasets": [{"path": "d/a.jsonl"}, {"path": "d/b.jsonl", "weight": 2}]})), r"1 sources then, 2 now")]:
        cfg = small_cfg(data=spec, packing_length=128, epochs=None)
        loader = data.PackLoader(cfg)
        it = iter(loader)
        [next(it) for _ in range(3)]
        state = json.loads(json.dumps(loader.state_dict()))
        data.PackLoader(cfg).load_state_dict(state)  # unchanged: resumes
        change()
        for load in (lambda l: l.load_state_dict(state), lambda l: l.continue_from([state])):
            with pytest.raises(data.DataError, match=rf"the data changed since the checkpoint: .*{want}.*--data.fresh-pass"):
                load(data.PackLoader(cfg))
        fresh = data.PackLoader(small_cfg(data=spec, packing_length=128, epochs=None, fresh_pass=True))
        fresh.load_state_dict(state)
        assert fresh.consumed == 0 and fresh.shards == {}
        for f in d.glob("c.jsonl"):
            f.unlink()


def test_resume_with_row_groups_cut_into_other_pieces_stops(tmp_path):
    """Three parquet sources (row groups read in pieces): a state saved where the row groups were
    read whole (an older data.py: its fingerprint has no unit count) or cut into other pieces (the
    largest row group changed in another source, or the rule) stops with an error naming the change,
    as a sample's key numbers pieces; unchanged, it resumes. Catches a resume that silently reads
    other rows (or raises an IndexError) for the keys and positions of the state."""
    for name, groups in (("a", 2), ("b", 3), ("c", 4)):
        pq.write_table(pa.Table.from_pylist([rec(i) for i in range(20 * groups)]),
                       tmp_path / f"{name}.parquet", row_group_size=20)
    cfg = small_cfg(data=tuple(str(tmp_path / f"{n}.parquet") for n in "abc"), packing_length=128, epochs=None)
    loader = data.PackLoader(cfg)
    it = iter(loader)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    assert [s["units"] for s in state["sources"]] == [4, 6, 8]
    data.PackLoader(cfg).load_state_dict(state)  # unchanged: resumes
    old = copy.deepcopy(state)
    for s in old["sources"]:
        del s["units"]
    with pytest.raises(data.DataError, match=r"the data changed since the checkpoint: .*a.parquet: read in whole "
                                             r"row groups then, 4 units now .*--data.fresh-pass"):
        data.PackLoader(cfg).load_state_dict(old)
    with pytest.raises(data.DataError, match=r"c.parquet: read in 8 units then, 12 units now"):
        data.PackLoader(dataclasses.replace(cfg, held_row_groups=1)).continue_from([state])
    whole = data.PackLoader(dataclasses.replace(cfg, held_row_groups=3))  # as many as the sources: no pieces
    assert [len(s.units) for s in whole.dataset.sources] == [2, 3, 4]


# --------------------------------------------------------------------------------------------------
# Lean transport: pixels cross from the workers as uint8

def test_pixels_cross_as_uint8_and_come_back_bit_exact(tmp_path):
    """Packs with ViT and VAE images of several sizes (zero padding in padded_images): the loader's
    pack carries its pixels as uint8 (a quarter of the bytes) and data.to_float gives back the
    worker's float pack bit for bit, padding included. Catches a lossy conversion (a scale of
    1/255 vs 2/255, a floor instead of a round), padding left at -1 or at the value 128 maps to,
    and the float pixels shipped."""
    from test_data import SIZES_DIR, records, same_batch, write
    path = write("jsonl", records("abspath", SIZES_DIR(tmp_path)), tmp_path)
    cfg = small_cfg(data=(path,), packing_length=160, epochs=1)
    want = [b for _, b, _ in data.PackedDataset(cfg).stream()]
    got = list(data.PackLoader(cfg))
    assert len(got) == len(want) and any(b["padded_images"].shape[0] > 1 for b in want)
    for g, w in zip(got, want):
        assert g["padded_images"].dtype == g["packed_vit_tokens"].dtype == torch.uint8
        same_batch(data.to_float(g), w)
        big = sum(v.nbytes for v in w.values() if torch.is_tensor(v))
        small = sum(v.nbytes for v in g.values() if torch.is_tensor(v))
        assert small < big


def test_a_small_dev_shm_fails_at_the_start_with_the_fix(tmp_path, monkeypatch):
    """/dev/shm smaller than the workers' prefetched packs: an error before any worker starts that
    names --data.num-workers (not a bus error in a worker mid-run); num_workers 0 needs none."""
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(64 << 20, 60 << 20, 4 << 20))
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"messages": json.loads(rec(0)["messages"])}) + "\n")
    with pytest.raises(data.DataError, match=r"/dev/shm has 4 MB free, .* lower --data.num-workers"):
        next(iter(data.PackLoader(small_cfg(data=(str(p),), num_workers=2, packing_length=10240))))
    next(iter(data.PackLoader(small_cfg(data=(str(p),), num_workers=0, packing_length=10240))))


# --------------------------------------------------------------------------------------------------
# Keyed randomness: timesteps by (seed, rank, worker's pack), dropout and captions by the sample key

def test_ranks_and_workers_never_share_draws_and_resume_draws_the_same(tmp_path):
    """64 edit records (CFG dropout 0.5 on each condition, one noisy image each) on 2 ranks x 2
    workers: no timestep is drawn by two shards, and the dropout draws differ between shards (the
    same record content, other keys). A loader resumed after 3 packs (workers 2) yields the packs,
    timesteps and dropout included, of the uninterrupted run. Catches a generator seeded by step
    alone (every rank and worker the same timesteps) or by the record (every copy the same dropout)."""
    from test_data import SIZES_DIR, T, same_batch
    SIZES_DIR(tmp_path)
    edit = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/src.png"}},
                                                      T("turn it round")]},
                         {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "images/tgt.png"}}]}]}
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(edit) + "\n" for _ in range(64)))
    cfg = small_cfg(data=(str(tmp_path / "e.jsonl"),), packing_length=160, num_workers=2, epochs=1,
                    text_cond_dropout=0.5, vit_cond_dropout=0.5, vae_cond_dropout=0.5)
    t_of, modes_of = {}, {}
    for r in range(2):
        ds = data.PackedDataset(cfg, r, 2)
        for w in range(2):
            packs = [b for _, b, _ in ds.stream(w, 2)]
            t = torch.cat([b["packed_timesteps"] for b in packs])
            t_of[r, w] = set(t[torch.isfinite(t)].tolist())
            modes_of[r, w] = [tuple(b["split_lens"]) for b in packs]
    assert sum(len(v) for v in t_of.values()) == len(set().union(*t_of.values())) >= 64
    assert len(set(map(tuple, modes_of.values()))) == 4
    loader = data.PackLoader(cfg, 1, 2)
    it = iter(loader)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    want = list(it)
    assert len(want) >= 2
    fresh = data.PackLoader(cfg, 1, 2)
    fresh.load_state_dict(state)
    got = list(fresh)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        same_batch(a, b)


# --------------------------------------------------------------------------------------------------
# Bounded at scale

def test_2000_files_are_read_under_ulimit_256(tmp_path):
    """A source of 2,000 parquet files read by one shard in a process limited to 256 open files:
    every row is read (a process used to keep a handle per file: "Too many open files" at start-up)."""
    pq.write_table(pa.Table.from_pylist([rec(0)]), tmp_path / "f0.parquet")
    for i in range(1, 2000):
        os.link(tmp_path / "f0.parquet", tmp_path / f"f{i}.parquet")
    code = ("import resource, data; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
            f"src = data.find_sources([{str(tmp_path)!r}])[0]; "
            "print(len({src.read((0, 0, u, 0))[0] for u in range(len(src.units))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.stdout.split() == ["2000"], out.stderr[-2000:]
