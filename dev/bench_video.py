"""One data worker on video (a developer's benchmark; bench.py measures the model):

    python dev/bench_video.py      # decode + ViT transform of a 720p 10 s H.264 clip; tokens per video sample

"""
import os
import random
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

TOK_DIR = os.path.join(ROOT, "testdata", "golden", "tokenizer")


@dataclass
class Args:
    seed: int = 0
    repeats: int = 3
    """runs of each measurement; the best counts"""


def main():
    """One data worker (one thread) on a 1280x720, 10 s, 30 fps H.264 clip, with a keyframe every 250
    frames (x264's default) and every 30: wall and CPU time of `load_video` (12 frames) + the ViT
    transform, against decoding every frame; then tokens of a video-QA sample at the default sizes."""
    a = tyro.cli(Args)
    import av
    from data import DataConfig, load_tokenizer, load_video, record_to_items, special_tokens, transform
    torch.set_num_threads(1)
    cfg = DataConfig(model=TOK_DIR, video_min_frames=12, video_max_frames=12)
    y, x = np.mgrid[0:720, 0:1280]
    grain = np.random.default_rng(a.seed).integers(0, 40, (720, 1280, 1), dtype=np.uint8)

    def timed(fn):  # best (wall, cpu) seconds of a.repeats runs
        runs = []
        for r in range(a.repeats):
            w, c = time.perf_counter(), time.process_time()
            out = fn(r)
            runs.append((time.perf_counter() - w, time.process_time() - c))
        return out, min(w for w, _ in runs), min(c for _, c in runs)

    def all_frames(clip):
        with av.open(clip) as box:
            box.streams.video[0].codec_context.thread_count = 1
            return sum(1 for _ in box.decode(video=0))

    with tempfile.TemporaryDirectory() as tmp:
        for gop in (250, 30):
            clip = os.path.join(tmp, f"clip{gop}.mp4")
            with av.open(clip, "w") as box:  # a moving colour pattern with fixed grain
                s = box.add_stream("libx264", rate=30, options={"preset": "veryfast", "g": str(gop)})
                s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
                for i in range(300):
                    rgb = np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, (x + y - 3 * i) % 256], -1)
                    box.mux(s.encode(av.VideoFrame.from_ndarray(rgb.astype(np.uint8) + grain, format="rgb24")))
                box.mux(s.encode())
            frames, w_dec, c_dec = timed(lambda r: load_video(clip, "", "bench", cfg, random.Random(r)))
            vit, w_tr, c_tr = timed(lambda r: [transform(img, "vit", cfg, len(frames), "bench") for img, _ in frames])
            n_all, w_all, c_all = timed(lambda r: all_frames(clip))
            print(f"720p 10 s H.264, keyframe every {gop:3d} | 12 frames: decode {w_dec:.2f} s wall / {c_dec:.2f} s "
                  f"cpu, ViT transform {w_tr:.2f} / {c_tr:.2f} s -> {vit[0].shape[1]}x{vit[0].shape[2]} (HxW) | "
                  f"all {n_all} frames: {w_all:.2f} / {c_all:.2f} s | best of {a.repeats}")
        tok = load_tokenizer(TOK_DIR)
        rec = {"messages": [{"role": "user", "content": [{"type": "video", "video": clip},
                                                           {"type": "text", "text": "What moves in this clip?"}]},
                            {"role": "assistant", "content": "A colour pattern drifting to the left."}]}
        for n in range(8, 13):
            c = DataConfig(model=TOK_DIR, video_min_frames=n, video_max_frames=n)
            lay = packing.layout_sample(record_to_items(rec, "bench", "", c, tok, random.Random(0)),
                                        special_tokens(tok), c.geometry())
            print(f"video-QA sample, {n:2d} frames of 720p at the default ViT sizes | {lay.n:,} tokens")


if __name__ == "__main__":
    main()
