"""Video parts of `messages` records (data.py): frame sampling, PyAV decoding, errors, resume, a
training step. Clips are written here by PyAV: a red square moving 3 px right per frame, so a decoded
frame says which frame it is. CPU, tiny shapes, seconds."""
import json
import random
import re
import wave

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import packing
from test_data import TOK_DIR, same_batch, small_cfg
from test_smoke import tiny_bagel

W, H, N_FRAMES, FPS = 96, 32, 30, 30
# H.264 with B-frames (pts out of decode order); VP9 in WebM (no frame count in the header); HEVC with
# open GOPs (frames before a keyframe in time but after it in the file: a seek must start one GOP earlier)
FORMATS = [("mp4", "libx264", {}), ("webm", "libvpx-vp9", {}),
           ("hevc.mp4", "libx265", {"x265-params": "open-gop=1:keyint=8:bframes=3:log-level=none"})]
FORMATS = [f for f in FORMATS if f[1] in av.codecs_available]


def write_clip(path, codec: str, options: dict, n: int = N_FRAMES):
    """Frame i: black, with an 8x8 red square at x = 3i; a keyframe every 8 frames, so seeks matter."""
    with av.open(str(path), "w") as box:
        s = box.add_stream(codec, rate=FPS, options=options)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = 8
        for i in range(n):
            a = np.zeros((H, W, 3), np.uint8)
            a[12:20, 3 * i:3 * i + 8] = (255, 40, 40)
            box.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        box.mux(s.encode())


def square_at(img) -> int:
    """Which frame an image is: the red square's left edge / 3 (tolerates codec blur at the edges)."""
    xs = np.nonzero(np.asarray(img)[..., 0] > 128)[1]
    x = (xs.mean() - 3.5) / 3
    assert abs(x - round(x)) < 0.2, x
    return round(x)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    for ext, codec, options in FORMATS:
        write_clip(d / f"clip.{ext}", codec, options)
    with av.open(str(d / "clip.mp4")) as box:  # the decoded frames as PNGs, for the frame-list form
        for i, f in enumerate(box.decode(video=0)):
            f.to_image().save(d / f"f{i:02d}.png")
    return d


def upstream_rand(n: int, vlen: int, rng: random.Random) -> list[int] | None:
    """get_frame_indices(n, vlen, 'rand') of ByteDance-Seed/Bagel data/video_utils.py, from its
    description: intervals = linspace(0, vlen, min(n, vlen) + 1) cast to int; ranges (start, next - 1);
    random.choice(range(*r)) per range; padded to n with the last index. None where a range is empty
    (upstream then falls back to a random subset)."""
    acc = min(n, vlen)
    iv = np.linspace(start=0, stop=vlen, num=acc + 1).astype(int)
    ranges = [(iv[i], iv[i + 1] - 1) for i in range(acc)]
    if any(b <= a for a, b in ranges):
        return None
    idx = [rng.choice(range(a, b)) for a, b in ranges]
    return idx + [idx[-1]] * (n - len(idx))


def video_qa(video, question="What moves?"):
    return {"messages": [{"role": "user", "content": [video, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]}


def frames_of(items) -> list[torch.Tensor]:
    return [it["image"] for it in items if it["type"] == "vit_image"]


# --------------------------------------------------------------------------------------------------
# sampling and decoding

def test_frame_indices_follow_upstream_rule():
    ran_fallback = 0
    for seed in range(40):
        for n in (1, 8, 12):
            for vlen in (1, 5, 12, 20, 30, 31, 300):
                want = upstream_rand(n, vlen, random.Random(seed))
                got = data.frame_indices(n, vlen, random.Random(seed))
                if want is not None:
                    assert got == want, (seed, n, vlen)
                else:  # a sorted random subset of distinct frames, then the last one repeated
                    ran_fallback += 1
                    k = min(n, vlen)
                    assert len(got) == n and got[k:] == [got[k - 1]] * (n - k)
                    assert got[:k] == sorted(set(got[:k])) and 0 <= got[0] and got[k - 1] < vlen
    assert ran_fallback
    # evaluation: interval middles (start + end - 1) // 2, then padded
    assert data.frame_indices(3, 30, None) == [4, 14, 24]
    assert data.frame_indices(4, 2, None) == [0, 1, 1, 1]


@pytest.mark.parametrize("ext", [f[0] for f in FORMATS])
def test_decoded_frames_are_the_sampled_ones(clips, ext):
    for seed, (lo, hi) in zip(range(24), [(8, 12), (3, 5)] * 12):  # (3, 5): sparse, so more seeks
        cfg = small_cfg(video_min_frames=lo, video_max_frames=hi)
        got = data.load_video(f"clip.{ext}", str(clips), "x", cfg, random.Random(seed))
        rng = random.Random(seed)
        want = upstream_rand(rng.randint(lo, hi), N_FRAMES, rng)
        assert [square_at(img) for img, _ in got] == want
        assert all(img.size == (W, H) and img.mode == "RGB" for img, _ in got)
    mid = data.load_video(str(clips / f"clip.{ext}"), "", "x", small_cfg(video_sample="middle"), random.Random(0))
    edges = np.linspace(0, N_FRAMES, len(mid) + 1).astype(int)  # interval middles: (start + next - 1) // 2
    assert [square_at(img) for img, _ in mid] == [(a + b - 1) // 2 for a, b in zip(edges, edges[1:])]
    # a clip shorter than N: every frame once, then the last one repeated
    short = data.load_video(f"clip.{ext}", str(clips), "x",
                            small_cfg(video_min_frames=33, video_max_frames=33), random.Random(0))
    assert [square_at(img) for img, _ in short] == list(range(30)) + [29] * 3
    assert short[0][1] == "video frame 1/33: #0 of 30 frames, 30 fps, 1.0 s"


class CountingContainer:
    """An av container that counts the frames it decodes."""

    def __init__(self, box):
        self.box, self.decoded = box, 0

    def __getattr__(self, name):
        return getattr(self.box, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.box.close()

    def decode(self, *args, **kw):
        for f in self.box.decode(*args, **kw):
            self.decoded += 1
            yield f


@pytest.mark.parametrize("n,want,most", [(3, [4, 14, 24], 13), (6, [2, 7, 12, 17, 22, 27], 24)])
def test_decoding_seeks_past_unwanted_frames(clips, monkeypatch, n, want, most):
    """Middle frames of 30 with keyframes at 0, 8, 16, 24: decode from the keyframe before a frame
    when it is past the last one decoded, else decode on. 4, 14, 24: frames 0-4, 8-14, 24 (13; 25
    without seeking); 2, 7, ..., 27: 0-7, 8-12, 16-22, 24-27 (24; 29 seeking back for 7 and 22)."""
    opened, real_open = [], av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(CountingContainer(real_open(*a, **k))) or opened[-1])
    cfg = small_cfg(video_sample="middle", video_min_frames=n, video_max_frames=n)
    got = data.load_video("clip.mp4", str(clips), "x", cfg, random.Random(0))
    assert [square_at(img) for img, _ in got] == want
    assert opened[0].decoded == most


def test_frame_list_and_bytes_equal_the_clip(clips, tmp_path):
    """One record, five ways: clip path, video_url, clip bytes in parquet (part and `videos` column),
    the clip's frames as a list of PNG paths. Same seed and row → identical packs."""
    frames = [f"f{i:02d}.png" for i in range(N_FRAMES)]
    clip = (clips / "clip.mp4").read_bytes()
    ways = {"path.jsonl": {"type": "video", "video": "clip.mp4"},
            "url.jsonl": {"type": "video_url", "video_url": {"url": str(clips / "clip.mp4")}},
            "list.jsonl": {"type": "video", "video": frames},
            "bytes.parquet": {"type": "video", "video": clip},
            "col.parquet": {"type": "video"}}
    packs = {}
    for name, part in ways.items():
        rec = video_qa(part)
        if name == "col.parquet":
            rec["videos"] = [clip]
        p = tmp_path / name
        if name.endswith("jsonl"):
            p.write_text(json.dumps(rec) + "\n")
        else:
            pq.write_table(pa.Table.from_pylist([rec]), p)
        yml = tmp_path / f"{name}.yaml"  # data_folder: relative paths resolve against the clips' folder
        yml.write_text(json.dumps({"datasets": [{"path": name, "data_folder": str(clips)}]}))
        (pack, batch, _), = data.PackedDataset(small_cfg(data=(str(yml),), packing_length=400, seed=5)).stream()
        packs[name] = batch
    assert packs["path.jsonl"]["packed_vit_tokens"].shape[0] >= 8 * 14  # 8..12 frames of 2x7 patches
    for name, b in packs.items():
        same_batch(b, packs["path.jsonl"])
    # N covers min..max, both ends included (np.random.randint(min, max + 1) upstream)
    seen = {len(data.load_video(frames, str(clips), "x", small_cfg(), random.Random(s))) for s in range(40)}
    assert seen == set(range(8, 13))
    # a frame list never longer than N is taken whole and not padded (upstream read_frames_folder)
    few = data.load_video(frames[:5], str(clips), "x", small_cfg(), random.Random(0))
    assert [square_at(img) for img, _ in few] == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# records, packs, training

def test_video_frames_share_the_vit_budget_and_inspect_shows_them(clips):
    cfg = small_cfg(vit_max_pixels=4 * 98 * 28)  # room for 4 full-size frames: N frames shrink
    tok = data.load_tokenizer(str(TOK_DIR))
    items = data.record_to_items(video_qa({"type": "video", "video": "clip.mp4"}), "r", str(clips), cfg, tok,
                                 random.Random(0))
    vit = frames_of(items)
    n = len(vit)
    assert 8 <= n <= 12
    want = data.resize_shape(W, H, cfg.vit_max_size, cfg.vit_min_size, 14, cfg.vit_max_pixels, img_num=n)
    assert all(tuple(x.shape) == (3, want[1], want[0]) for x in vit) and want != (98, 28)
    (clips / "v.jsonl").write_text(json.dumps(video_qa({"type": "video", "video": "clip.webm"})) + "\n")
    (pack, _, _), = data.PackedDataset(small_cfg(data=(str(clips / "v.jsonl"),), packing_length=400)).stream()
    frames = [line for line in data.describe(pack, 400, 0).splitlines() if "video frame" in line]
    assert 8 <= len(frames) <= 12
    for j, line in enumerate(frames):
        assert re.search(rf"full .* user video frame {j + 1}/{len(frames)}: #\d+ of 30 frames, 30 fps, 1.0 s "
                         rf"→ ViT 28x98 \(HxW\)$", line), line


@pytest.fixture
def one_thread():
    """Tiny ops: threads only wait on each other on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_video_and_image_qa_pack_trains_a_step(clips, one_thread):
    img = {"type": "image_url", "image_url": {"url": "f00.png"}}
    recs = [video_qa({"type": "video", "video": "clip.mp4"}),
            {"messages": [{"role": "user", "content": [img, {"type": "text", "text": "Where is it?"}]},
                          {"role": "assistant", "content": "Left."}]}]
    p = clips / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (clips / "train.yaml").write_text(json.dumps({"datasets": [{"path": "train.jsonl", "data_folder": "."}]}))
    (pack, batch, _), = data.PackedDataset(small_cfg(data=(str(clips / "train.yaml"),), packing_length=400)).stream()
    assert len(pack) == 2 and not batch["patchified_vae_latent_shapes"]
    n_frames = sum("video frame" in d for d in pack[0].layout.split_desc + pack[1].layout.split_desc)
    assert 8 <= n_frames <= 12 and batch["vit_token_seqlens"].tolist() == [14] * (n_frames + 1)  # 2x7 patches
    torch.manual_seed(0)
    model = tiny_bagel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.vit_model.vision_model.embeddings.patch_embedding.weight.clone()
    out = model(**batch)
    loss = out["ce"].mean()
    assert torch.isfinite(loss) and out["ce"].numel() == len(batch["ce_loss_indexes"]) > 0
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.vit_model.vision_model.embeddings.patch_embedding.weight)


def test_resume_mid_epoch_reproduces_the_frames(clips, tmp_path):
    recs = [video_qa({"type": "video", "video": str(clips / f"clip.{e}")}, f"Question {i}?")
            for i in range(6) for e in ("mp4", "webm")]
    p = tmp_path / "v.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = small_cfg(data=(str(p),), packing_length=400, epochs=None)
    loader = data.PackLoader(cfg)
    it = iter(loader)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    want = [next(it) for _ in range(8)]
    assert len({b["packed_vit_tokens"].shape[0] for b in want}) > 1  # frame counts differ between packs
    fresh = data.PackLoader(cfg)
    fresh.load_state_dict(state)
    it2 = iter(fresh)
    for b in want:
        same_batch(next(it2), b)


# --------------------------------------------------------------------------------------------------
# bad clips: an error naming file, row and field; with skip_bad, a count per reason

def empty_clip(path):
    with av.open(str(path), "w") as box:  # an AVI keeps a video stream without frames (MP4, MKV drop it)
        s = box.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        box.start_encoding()


BAD = [("missing_video", {"type": "video", "video": "nope.mp4"}, r"video file not found: .*nope.mp4"),
       ("undecodable_video", {"type": "video_url", "video_url": {"url": "junk.mp4"}}, r"cannot decode video"),
       ("undecodable_video", {"type": "video", "video": "audio.wav"}, r"no video stream"),
       ("empty_video", {"type": "video", "video": "empty.avi"}, r"video has no frames"),
       ("empty_video", {"type": "video", "video": []}, r"empty frame list"),
       ("missing_video", {"type": "video"}, r"video: missing"),
       ("missing_image", {"type": "video", "video": ["f00.png", "gone.png"] * 10}, r"frame \d+: image file not found")]


@pytest.mark.parametrize("reason,part,msg", BAD, ids=[f"{b[0]}{i}" for i, b in enumerate(BAD)])
def test_bad_clip(reason, part, msg, clips, tmp_path):
    (clips / "junk.mp4").write_bytes(b"\x00\x00\x00 not a video" * 50)
    empty_clip(clips / "empty.avi")
    with wave.open(str(clips / "audio.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [good, video_qa(part), good]))
    yml = tmp_path / "bad.yaml"
    yml.write_text(json.dumps({"datasets": [{"path": "bad.jsonl", "data_folder": str(clips)}]}))
    with pytest.raises(data.BadSample, match=rf"bad.jsonl: line 2: messages\[0\].content\[0\].*{msg}") as e:
        list(data.PackedDataset(small_cfg(data=(str(yml),), packing_length=400)).stream())
    assert e.value.reason == reason
    packs = list(data.PackedDataset(small_cfg(data=(str(yml),), packing_length=400, skip_bad=True)).stream())
    assert sum(len(pk) for pk, _, _ in packs) == 2 and packs[-1][2]["skips"] == {reason: 1}


def test_video_needs_the_vit_and_cannot_be_a_target(clips):
    tok = data.load_tokenizer(str(TOK_DIR))
    rec = video_qa({"type": "video", "video": "clip.mp4"})
    with pytest.raises(data.BadSample, match="needs the ViT"):
        data.record_to_items(rec, "r", str(clips), small_cfg(visual_und=False), tok)
    rec["messages"][1]["content"] = [{"type": "video", "video": "clip.mp4"}]
    with pytest.raises(data.BadSample, match=r"messages\[1\].content\[0\]: a video can only be an input"):
        data.record_to_items(rec, "r", str(clips), small_cfg(), tok)
    with pytest.raises(packing.UserError, match="--data.video-min-frames 13 --data.video-max-frames 12: need 1 <= min <= max"):
        small_cfg(data=("x",), video_min_frames=13).check()
