"""The data pipeline at real sizes (a developer's benchmark; bench.py measures the model):

    python dev/bench_data.py       # packing fill, row groups read per shard, a worker's RSS, samples/s

"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python dev/...py`: the repo's modules are one folder up

import packing  # noqa: E402
from data import DataConfig  # noqa: E402

TOK_DIR = os.path.join(ROOT, "testdata", "golden", "tokenizer")


@dataclass
class Args:
    seed: int = 0
    data_files: int = 200
    """parquet files one worker streams for its peak RSS (8 written, the rest hard links)"""
    data_row_group_mb: int = 64
    """row group size of those files in MB"""
    data_sources: int = 1
    """mixture sources those files are dealt into (a worker holds a read unit per source)"""


def main():
    """The data pipeline at real sizes, budget DataConfig().packing_length (10240):
    - packing fill on a mix with 1024^2 edits (token counts from the resize rule, 20k samples);
    - row groups each shard reads per epoch (16 row groups, 4 ranks x 2 workers);
    - peak RSS of one data worker streaming `data_files` parquet files of `data_row_group_mb` MB
      row groups (a fresh process);
    - samples/s of one worker on 1024^2 JPEG edit records and on 512^2 JPEG VQA/T2I records."""
    a = tyro.cli(Args)
    budget = DataConfig().packing_length
    fill_with_edits(budget, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        row_groups_per_shard(tmp)
        worker_rss(tmp, a.data_files, a.data_row_group_mb, a.data_sources)
        jpeg_throughput(tmp, budget)


def fill_with_edits(budget: int, seed: int = 0):
    """First-fit fill at `budget` on 40% understanding (one photo, 378-980 px ViT), 30% T2I and 30%
    edits, images drawn from common photo sizes, half of the T2I/edit ones 1024^2. Token counts are
    computed with data.resize_shape (the rule data.py uses), not by decoding images."""
    from data import VAE_MAX_PIXELS, VIT_MAX_PIXELS, DataConfig, resize_shape
    c, rng = DataConfig(), random.Random(seed)
    sizes = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080), (1080, 1350), (512, 512)]

    def img(vit=None):
        w, h = (1024, 1024) if vit != "und" and rng.random() < 0.5 else rng.choice(sizes)
        if vit == "und":
            w, h = resize_shape(w, h, c.vit_max_size, c.vit_min_size, 14, VIT_MAX_PIXELS)
            return (w // 14) * (h // 14) + 2, None
        vae = resize_shape(w, h, c.vae_max_size, c.vae_min_size, 16, VAE_MAX_PIXELS)
        vits = {k: resize_shape(w, h, mx, mn, 14, px) for k, mx, mn, px in
                (("new", c.edit_vit_max_size, c.edit_vit_min_size, c.edit_vit_max_pixels),
                 ("old", c.vit_max_size, c.vit_min_size, c.vit_max_pixels))}  # old: sized like understanding
        return (vae[0] // 16) * (vae[1] // 16) + 2, {k: (w // 14) * (h // 14) + 2 for k, (w, h) in vits.items()}

    samples = []  # (tokens with edit ViT 224-518, tokens with the old 378-980)
    for _ in range(20000):
        kind = rng.choices(["und", "t2i", "edit"], [4, 3, 3])[0]
        if kind == "und":
            n = img("und")[0] + rng.randint(20, 80) + rng.randint(30, 400) + 4
            samples.append((n, n))
        elif kind == "t2i":
            n = img()[0] + rng.randint(10, 80) + 2
            samples.append((n, n))
        else:
            vae, vit = img()
            n = 2 * vae + rng.randint(5, 40) + 2
            samples.append((n + vit["new"], n + vit["old"]))
    for name, col, b, open_packs in (("edit ViT 224-518, 10240, first-fit", 0, budget, 8),
                                     ("edit ViT 224-518, 10240, next-fit", 0, budget, 1),
                                     ("edit ViT 378-980, 8192 (before), first-fit", 1, 8192, 8)):
        fits = [s[col] for s in samples if s[col] <= b]
        packer, packs = packing.FirstFitPacker(b, open_packs, size=lambda n: n), []
        for n in fits:
            packs += packer.add(n)
        packs += packer.flush()
        fill = sum(map(sum, packs)) / (len(packs) * b)
        print(f"packing fill, mix with 1024^2 edits, {name:42s} | fill {fill:.1%} | {len(fits) / len(packs):.1f} "
              f"samples/pack | over budget (error / skipped): {1 - len(fits) / len(samples):.1%} of samples")


def row_groups_per_shard(tmp: str, ranks: int = 4, workers: int = 2, groups: int = 16):
    """Counts the row groups ParquetFile.iter_batches decodes of each shard over one epoch (a dataset per shard,
    as each DataLoader worker is its own process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data import DataConfig, PackedDataset
    path = os.path.join(tmp, "rg.parquet")
    rows = [{"messages": json.dumps([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}])}
            for i in range(groups * 8)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    real, reads = pq.ParquetFile.iter_batches, []
    pq.ParquetFile.iter_batches = lambda self, *x, row_groups, **k: reads.extend(row_groups) or real(self, *x, row_groups=row_groups, **k)
    per_shard = []
    try:
        for r in range(ranks):
            for w in range(workers):
                ds = PackedDataset(DataConfig(data=(path,), model=TOK_DIR, epochs=1, num_workers=workers), r, ranks)
                n = len(reads)
                for _ in ds.stream(w, workers):
                    pass
                per_shard.append(len(reads) - n)
    finally:
        pq.ParquetFile.iter_batches = real
    print(f"row groups read per shard per epoch: {groups} row groups, {ranks} ranks x {workers} workers | "
          f"min {min(per_shard)} max {max(per_shard)} | ideal {groups / (ranks * workers):g} | "
          f"dataset read {sum(per_shard) / groups:g}x per epoch")


def worker_rss(tmp: str, n_files: int, mb: int, sources: int = 1, distinct: int = 8):
    """Writes `distinct` parquet files of 2 row groups of `mb` MB (16 rows, each a text record + an
    incompressible mb/16 MB image in the `images` column, which its messages do not use), hard-links
    them up to n_files (disk: the issue's 200 x 128 MB would be 25 GB; every file is still opened
    and read on its own), deals them into `sources` folders (a mixture of that many sources), and
    streams them all in a fresh process (one data worker): peak RSS and peak pyarrow allocation
    over that process's baseline after start-up."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = os.path.join(tmp, "rss")
    folders = [os.path.join(folder, str(i)) for i in range(sources)]
    for d in folders:
        os.makedirs(d)
    for f in range(n_files):
        path = os.path.join(folders[f % sources], f"{f:04d}.parquet")
        if f >= distinct:
            os.link(os.path.join(folders[f % distinct % sources], f"{f % distinct:04d}.parquet"), path)
            continue
        msgs = [json.dumps([{"role": "user", "content": f"q{f} {i}"}, {"role": "assistant", "content": "a"}])
                for i in range(32)]
        t = pa.table({"messages": msgs, "images": [[os.urandom(mb * 2**20 // 16)] for _ in range(32)]})
        pq.write_table(t, path, row_group_size=16, compression="none")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_data; bench_data.stream_rss({folders!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        print(f"worker RSS failed: {out.stderr.strip().splitlines()[-1]}")
        return
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"one data worker, {n_files} parquet files ({min(n_files, distinct)} distinct, the rest hard links"
          f"{f'; {sources} sources' if sources > 1 else ''}) x 2 "
          f"row groups of {mb} MB ({n_files * 2 * mb / 1024:.1f} GB) | {r['samples']} samples in {r['seconds']:.1f} s | "
          f"peak RSS {r['base_mb']:.0f} MB at start + {r['peak_mb'] - r['base_mb']:.0f} MB while streaming "
          f"({(r['peak_mb'] - r['base_mb']) / mb:.1f} row groups), + {r['end_mb'] - r['base_mb']:.0f} MB at the end | "
          f"pyarrow: peak {r['arrow_peak_mb']:.0f} MB, "
          f"{r['arrow_end_mb']:.0f} MB at the end | bytes read {r['read_x']:.2f}x the rows' bytes")


def stream_rss(folders: list[str]):
    """(In a fresh process) one shard streams every record of `folders` (a mixture) once; prints JSON."""
    import pyarrow as pa
    from data import DataConfig, PackedDataset

    def mb(field):  # VmRSS: now; VmHWM: the peak since the reset below
        line = next(x for x in open("/proc/self/status") if x.startswith(field))
        return int(line.split()[1]) / 1024
    ds = PackedDataset(DataConfig(data=tuple(folders), model=TOK_DIR, epochs=1, num_workers=0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak: the imports' transient peak is not the data's (Linux)
    def read():  # bytes this process has read from files (page cache hits too: hard links share it)
        return int(next(x for x in open("/proc/self/io") if x.startswith("rchar")).split()[1])
    # the bytes of the rows used: every row is read once, so the stored bytes of the columns read
    used = sum(c.total_compressed_size for s in ds.sources for f in s.files for i in range(f.meta.num_row_groups)
               for c in (f.meta.row_group(i).column(j) for j in range(f.meta.num_columns))
               if f.columns is None or c.path_in_schema.split(".")[0] in f.columns)
    base, t, n, arrow, r0 = mb("VmRSS"), time.perf_counter(), 0, pa.total_allocated_bytes(), read()
    for pack, _, _ in ds.stream():
        n += len(pack)
    print(json.dumps({"samples": n, "seconds": time.perf_counter() - t, "base_mb": base, "peak_mb": mb("VmHWM"),
                      "end_mb": mb("VmRSS"), "read_x": (read() - r0) / used,
                      "arrow_peak_mb": (pa.default_memory_pool().max_memory() - arrow) / 2**20,
                      "arrow_end_mb": (pa.total_allocated_bytes() - arrow) / 2**20}))


def jpeg_throughput(tmp: str, budget: int):
    """Samples/s of one worker (this process, 1 torch thread) on 1024^2 JPEG edit records (source
    image → instruction → edited image: two 1024^2 decodes, a 518 px ViT resize, VAE tensors) and on
    512^2 JPEG records (half T2I targets, half VQA inputs)."""
    from PIL import Image
    from data import DataConfig, PackedDataset
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)  # as data._worker_init sets it in each DataLoader worker
    for side, n_img in ((1024, 8), (512, 32)):
        recs = []
        for i in range(n_img):  # a smooth picture with some noise: JPEG sizes like photos' (~100-300 kB)
            g = np.add.outer(np.linspace(0, 200, side), np.linspace(0, 55, side))[..., None] * [1, 0.7, 0.4]
            px = np.clip(g + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(os.path.join(tmp, f"{side}_{i}.jpg"), quality=90)
            img = lambda j: {"type": "image_url", "image_url": {"url": f"{side}_{j % n_img}.jpg"}}
            if side == 1024:
                recs.append([{"role": "user", "content": [img(i), {"type": "text", "text": "make it warmer"}]},
                             {"role": "assistant", "content": [img(i + 1)]}])
            elif i % 2:
                recs.append([{"role": "user", "content": f"a photo number {i}"}, {"role": "assistant", "content": [img(i)]}])
            else:
                recs.append([{"role": "user", "content": [img(i), {"type": "text", "text": "what is this?"}]},
                             {"role": "assistant", "content": "a gradient."}])
        path = os.path.join(tmp, f"{side}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"messages": m}) + "\n" for m in recs)
        ds = PackedDataset(DataConfig(data=(path,), model=TOK_DIR, packing_length=budget, num_workers=0))
        t, cpu, n, tokens, packs = time.perf_counter(), time.process_time(), 0, 0, 0
        for pack, batch, _ in ds.stream():
            n, tokens, packs = n + len(pack), tokens + batch["sequence_length"], packs + 1
            if n >= (24 if side == 1024 else 128):
                break
        dt, cpu = time.perf_counter() - t, time.process_time() - cpu
        kind = "edit" if side == 1024 else "VQA/T2I"
        print(f"one worker, {side}^2 JPEG {kind} records | {n / dt:.1f} samples/s ({n / cpu:.1f} per CPU "
              f"second) | {tokens / dt:,.0f} tokens/s | fill {tokens / (packs * budget):.1%}")


if __name__ == "__main__":
    main()
