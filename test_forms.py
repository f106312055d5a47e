"""Upstream BAGEL's record forms read as they are (`unified_edit` parquet, `vlm_sft` / LLaVA jsonl,
`t2i_pretrain` parquet), form detection and `format:`; long edit chains cut to fit; truncated, tiny and
extreme-aspect images; remote-path plumbing that needs no server (test_remote.py has the S3 server).

Upstream's dataset classes are not a dependency of this repo, so the expected plans here are written
by hand from its code: `upstream_edit_plan` mirrors `UnifiedEditIterableDataset.parse_row`
(ByteDance-Seed/Bagel data/interleave_datasets/edit_dataset.py) and the LLaVA layouts follow
`SftJSONLIterableDataset.change_format` (data/vlm_dataset.py). When written, both were checked against
upstream's own functions: the same plans for 300 seeds of chains of 2-5 images, and both records below."""
import base64
import io
import json
import random
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data
import packing
from test_data import TOK_DIR, all_packs, small_cfg


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(str(TOK_DIR))


def img_bytes(w: int, h: int = 16, fmt: str = "PNG", seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def chain(n: int) -> dict:
    """An upstream unified_edit row: image i is 16 x 16(i+1) px (its VAE width names it), step i has
    three phrasings."""
    return {"image_list": [img_bytes(16 * (i + 1), seed=i) for i in range(n)],
            "instruction_list": [[f"step {i} a", f"step {i} b", f"step {i} c"] for i in range(n - 1)]}


def upstream_edit_plan(row: dict, rng: random.Random) -> list[tuple]:
    """parse_row's sequence plan as (type, loss, enable_cfg, image index or text), written from
    upstream's code: _add_image(need_loss, need_vae, need_vit) appends noisy VAE (loss 1, cfg 0), clean
    VAE (cfg 1), ViT (cfg 1) in that order; _add_text appends a cfg-1 text without loss."""
    def add_image(i, loss, vae, vit):
        return [("vae_image", 1, 0, i)] * loss + [("vae_image", 0, 1, i)] * vae + [("vit_image", 0, 1, i)] * vit
    n = len(row["image_list"])
    start = rng.choice(range(n - 1))
    end = rng.choice(range(start + 1, min(start + 3, n)))
    plan = add_image(start, False, True, True)
    if end - start > 1 and rng.random() < 0.5:
        if end == n - 1:
            end -= 1
        text = "".join(rng.choice(row["instruction_list"][i - 1]) + ". " for i in range(start + 1, end + 1))
        return plan + [("text", 0, 1, text.rstrip())] + add_image(end, True, False, False)
    for i in range(start + 1, end + 1):
        plan.append(("text", 0, 1, rng.choice(row["instruction_list"][i - 1])))
        plan += add_image(i, True, i != end, i != end)
    return plan


def plan_of(items: list[dict], tok) -> list[tuple]:
    """Our items in upstream's terms; a VAE image is named by its width (16(i+1) px), a ViT copy by
    the VAE item before it."""
    out = []
    for it in items:
        if it["type"] == "text":
            x = tok.decode(it["ids"])
        elif it["type"] == "vae_image":
            x = it["image"].shape[2] // 16 - 1
        else:
            x = out[-1][3]
        out.append((it["type"], it["loss"], it["enable_cfg"], x))
    return out


@pytest.mark.parametrize("n", [2, 3, 5])
def test_unified_edit_rows_are_sampled_like_upstream(n, tok):
    """record_to_items on an upstream edit row == the hand-written plan of parse_row, draw for draw
    with the same seeded rng, over 200 seeds; for 3 images the four outcomes come with upstream's
    odds (start 1: 1/2; 0 -> 1: 1/4; 0 -> 2 joined, which upstream moves back to 0 -> 1: 1/8; the
    chain 0 -> 1 -> 2: 1/8). Catches the draws in another order, the joined-instruction quirk lost,
    an intermediate image not fed back as clean VAE + ViT, and the final target given copies."""
    row, cfg = chain(n), small_cfg(vae_max_size=128)
    seen = Counter()
    for seed in range(200):
        got = plan_of(data.record_to_items(row, "r", "", cfg, tok, random.Random(seed), "unified_edit"), tok)
        want = upstream_edit_plan(row, random.Random(seed))
        assert got == want, seed
        seen[tuple(x for t, loss, _, x in want if t == "vae_image" and loss)] += 1
    if n == 3:
        assert seen.keys() == {(2,), (1,), (1, 2)}
        assert seen[(2,)] / 200 == pytest.approx(0.5, abs=0.1) and seen[(1, 2)] / 200 == pytest.approx(0.125, abs=0.06)


def test_unified_edit_golden_layout(tok):
    """A 3-image chain with the seed that draws the whole chain, laid out by hand from parse_row:
    image 0 clean VAE + ViT, instruction 0, image 1 noisy VAE target then clean VAE + ViT, instruction
    1, image 2 noisy VAE target only (no copies after the last target)."""
    row, cfg = chain(3), small_cfg(vae_max_size=128)
    seed = next(s for s in range(100) if len(upstream_edit_plan(row, random.Random(s))) == 8)
    got = plan_of(data.record_to_items(row, "r", "", cfg, tok, random.Random(seed), "unified_edit"), tok)
    assert [g[:3] for g in got] == [("vae_image", 0, 1), ("vit_image", 0, 1), ("text", 0, 1),
                                    ("vae_image", 1, 0), ("vae_image", 0, 1), ("vit_image", 0, 1),
                                    ("text", 0, 1), ("vae_image", 1, 0)]
    assert [g[3] for g in got if g[0] == "vae_image"] == [0, 1, 1, 2]
    assert got[2][3].startswith("step 0 ") and got[6][3].startswith("step 1 ")


LLAVA = [  # (record, the plan upstream's change_format gives, as (role, kind, text or image path))
    ({"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and\n<image> please."}, {"from": "gpt", "value": "left"}]},
     [("user", "text", "Compare"), ("user", "image", "a.png"), ("user", "text", "and"), ("user", "image", "b.png"),
      ("user", "text", "please."), ("assistant", "text", "left")]),
    ({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": " A b "},
        {"from": "human", "value": " more? "}, {"from": "gpt", "value": "c"}]},
     [("user", "image", "a.png"), ("user", "text", "What?"), ("assistant", "text", " A b "),
      ("user", "text", " more? "), ("assistant", "text", "c")]),  # no placeholder: not stripped
    ({"video": "clip.mp4", "conversations": [  # upstream puts the sampled frames where <video> is
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<video>\nWhat happens?"},
        {"from": "gpt", "value": "A jump."}]},
     [("system", "text", "Be brief."), ("user", "video", "clip.mp4"), ("user", "text", "What happens?"),
      ("assistant", "text", "A jump.")]),
]


@pytest.mark.parametrize("rec,want", LLAVA)
def test_llava_conversations_like_upstream(rec, want):
    """`<image>` splits a human turn into stripped pieces around the images, in `image` order; a turn
    without one is kept as it is; gpt turns are the loss. Hand-written from change_format."""
    got = [(role, kind, v) for _, role, kind, v in data.parse_record(rec, "r", random.Random(0))]
    assert got == want


def test_llava_jsonl_trains_with_images_beside_it(tmp_path, tok):
    """A LLaVA jsonl with image paths relative to its folder (or a yaml data_folder) packs as an
    understanding sample: ViT images sharing one pixel budget, no CFG, CE on the answer only."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(img_bytes(28, 28))
    (tmp_path / "imgs" / "b.png").write_bytes(img_bytes(56, 28))
    rec, _ = LLAVA[0]
    (tmp_path / "sft.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "mix.yaml").write_text("datasets:\n  - {path: sft.jsonl, data_folder: imgs, format: vlm_sft}\n")
    (pack, batch, _), = all_packs(small_cfg(data=(str(tmp_path / "mix.yaml"),)))
    assert batch["attn_modes"] == ["causal", "full", "causal", "full", "causal", "causal"]
    text = tok.decode(batch["packed_text_ids"].tolist())
    assert "Compare" in text and "left" in text
    assert tok.decode(batch["packed_label_ids"].tolist(), skip_special_tokens=False) == "left<|im_end|>"
    with pytest.raises(data.BadSample, match=r"sft.jsonl: row 0: conversations: 1 <image> placeholders in human "
                                             r"turns for 2 images"):
        data.parse_record({**rec, "conversations": [{"from": "human", "value": "<image>"}]}, f"{tmp_path}/sft.jsonl: row 0",
                          random.Random(0))


def test_form_detection_format_key_and_errors(tmp_path):
    """Detected from the fields (chat messages win over other fields); `format:` forces a form and
    says which fields it lacks; a record that fits no form gets the error listing them all; an
    unknown format is a user error naming the yaml entry."""
    both = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert [v for *_, v in data.parse_record(both, "r", random.Random(0))] == ["hi", "yo"]
    assert [v for *_, v in data.parse_record(both, "r", random.Random(0), "vlm_sft")] == ["q", "a"]
    with pytest.raises(data.BadSample, match=r"r: format unified_edit needs the fields \['image_list', 'instruction_list'\]"):
        data.parse_record(both, "r", random.Random(0), "unified_edit")
    with pytest.raises(data.BadSample, match=r"r: no 'messages' field \(fields: \['caption', 'img'\]\) .*expected one "
                                             r"of messages .*unified_edit \(image_list \+ instruction_list\), vlm_sft "
                                             r"\(conversations\), t2i_pretrain \(image \+ captions\)"):
        data.parse_record({"img": 1, "caption": "x"}, "r", random.Random(0))
    (tmp_path / "d.jsonl").write_text(json.dumps(both) + "\n")
    (tmp_path / "m.yaml").write_text("datasets:\n  - {path: d.jsonl, format: llava}\n")
    with pytest.raises(packing.UserError, match=r"m.yaml: datasets\[0\]: format 'llava' is not one of messages, "
                                                r"unified_edit, vlm_sft, t2i_pretrain"):
        data.find_sources([str(tmp_path / "m.yaml")])


def test_unified_edit_parquet_reads_only_its_columns_and_inspects(tmp_path, monkeypatch, capsys):
    """An upstream edit parquet with an extra column: only image_list + instruction_list are read, and
    --inspect lays the sampled chain out (clean VAE / ViT copies of the start, the target)."""
    pq.write_table(pa.Table.from_pylist([{**chain(3), "source": "web"}] * 2), tmp_path / "e.parquet")
    assert data.DataFile(str(tmp_path / "e.parquet")).columns == ["image_list", "instruction_list"]
    monkeypatch.setattr(sys, "argv", ["data.py", "--data", str(tmp_path / "e.parquet"), "--model", str(TOK_DIR),
                                      "--inspect", "1", "--data.epochs", "1", "--data.vit-min-size", "14",
                                      "--data.vit-max-size", "112", "--data.vae-min-size", "16", "--data.vae-max-size",
                                      "128"])
    data.main()
    out = capsys.readouterr().out
    assert "user image → clean VAE" in out and "user image → ViT" in out and "noisy VAE target" in out, out
    assert "user text 'step " in out


# --------------------------------------------------------------------------------------------------
# Long chains: cut to the longest run of steps that fits

def long_chain(steps: int) -> dict:
    """A chat edit chain: input image, then per step an instruction and a generated 32x32 image."""
    def im(w, s):
        return {"type": "image", "image": "data:image/png;base64," + base64.b64encode(img_bytes(w, 32, seed=s)).decode()}
    msgs = [{"role": "system", "content": "You edit images."},
            {"role": "user", "content": [im(32, 99), {"type": "text", "text": "make it red"}]}]
    for k in range(steps):
        msgs += [{"role": "assistant", "content": [im(16 * (k + 2), k)]}] + \
                ([{"role": "user", "content": f"then step {k + 1}"}] if k + 1 < steps else [])
    return {"messages": msgs}


def test_long_chain_cut_to_the_longest_run_that_fits(tmp_path, tok):
    """A 3-step chain over the budget becomes a 2-step run (steps 1-2 or 2-3, both drawn over the
    keys); a run from step 2 starts from step 1's clean VAE + ViT copies (its noisy target, the
    system text and the input image are gone) and a run ending at step 2 drops step 2's copies. The
    same record at a budget no single step fits is skipped and counted as too_long, and too_long
    never counts towards the skip_bad stop. Catches a hard stop, a cut that keeps a noisy image as
    context, copies of a final target left in, and too_long taken as a sign of a broken source."""
    cfg = small_cfg(vae_max_size=128)
    items = data.record_to_items(long_chain(3), "r", "", cfg, tok, random.Random(0))
    size = [data.n_tokens(it, cfg) for it in items]
    steps = [i for i, it in enumerate(items) if it["type"] == "vae_image" and it["loss"]]
    full = sum(size)
    budget = max(sum(size[:steps[1] + 1]), sum(size[steps[0] + 1:])) + 1  # two steps fit, three do not
    assert budget < full
    cuts = Counter()
    for seed in range(20):
        got, note = data.cut_steps(items, small_cfg(vae_max_size=128, packing_length=budget), random.Random(seed))
        cuts[note] += 1
        assert sum(data.n_tokens(it, cfg) for it in got) <= budget
        if note == " (cut to steps 2-3 of 3)":
            assert got == items[steps[0] + 1:]
            assert got[0]["desc"].startswith("assistant image → clean VAE copy") and got[0]["enable_cfg"] == 1
        else:
            assert note == " (cut to steps 1-2 of 3)" and got == items[:steps[1] + 1]
            assert got[-1]["loss"] == 1 and "noisy" in got[-1]["desc"]
    assert len(cuts) == 2
    path = tmp_path / "chain.jsonl"
    path.write_text(json.dumps(long_chain(3)) + "\n")
    (pack, _, state), = all_packs(small_cfg(data=(str(path),), vae_max_size=128, packing_length=budget))
    assert "(cut to steps" in pack[0].where and state["notes"][0]["cut_to_fit"] == 1
    one = min(sum(size[:steps[0] + 1]), sum(size[steps[0] + 1:steps[1] + 1]), sum(size[steps[1] + 1:]))
    path.write_text((json.dumps(long_chain(3)) + "\n") * 150)
    tiny = small_cfg(data=(str(path),), vae_max_size=128, packing_length=one - 1, skip_bad=True)
    path.write_text((json.dumps(long_chain(3)) + "\n") * 150 + json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    stream = data.PackedDataset(tiny).stream()
    assert sum(len(p) for p, _, _ in stream) == 1 and stream.skips == {"too_long": 150}
    path.write_text((json.dumps(long_chain(3)) + "\n") * 150)  # nothing fits: an endless run would spin
    with pytest.raises(ValueError, match=r"chain.jsonl: none of the 150 records read so far fits"):
        list(data.PackedDataset(replace(tiny, epochs=None)).stream())
    with pytest.raises(data.BadSample, match="more than --data.packing-length.*skip-too-long"):
        all_packs(small_cfg(data=(str(path),), vae_max_size=128, packing_length=one - 1, skip_too_long=False))


# --------------------------------------------------------------------------------------------------
# Images as they come

def test_truncated_jpeg_loads_unless_asked_and_is_counted(tmp_path):
    """A JPEG cut in half decodes (upstream's LOAD_TRUNCATED_IMAGES) and is counted; with
    truncated_images "error" it is an undecodable_image. PIL's flag is left off afterwards."""
    full = img_bytes(64, 64, fmt="JPEG")
    cut = full[:len(full) // 2]
    img = data.load_image(cut, "", "r")
    assert img.size == (64, 64) and img.info["truncated"] and not data.load_image(full, "", "r").info["truncated"]
    with pytest.raises(data.BadSample, match=r"r: cannot decode image: image file is truncated.*truncated-images load"):
        data.load_image(cut, "", "r", "error")
    from PIL import ImageFile
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    rows = [{"image": cut, "captions": json.dumps({"c": "a cat"})}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (_, _, state), = all_packs(small_cfg(data=(str(tmp_path / "t.parquet"),), vae_max_size=128, packing_length=400))
    assert state["notes"][0]["truncated"] == 1


def test_small_and_extreme_aspect_images_are_counted_and_warned(tmp_path):
    """The data line counts images below the minimum side (upscaled) and beyond EXTREME_ASPECT, and
    warns for a source whose share passes IMAGE_WARN_SHARE. Catches the counts lost between the
    worker shards and the loader, or a warning for a source with none."""
    rows = [{"image": img_bytes(w, h, seed=i), "captions": json.dumps({"c": f"cat {i}"})}
            for i, (w, h) in enumerate([(8, 8), (128, 16), (32, 32), (32, 32)])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    ok = [{"image": img_bytes(32, 32, seed=9), "captions": json.dumps({"c": "dog"})}] * 4
    pq.write_table(pa.Table.from_pylist(ok), tmp_path / "ok.parquet")
    loader = data.PackLoader(small_cfg(data=(str(tmp_path / "t.parquet"), str(tmp_path / "ok.parquet")),
                                       vae_min_size=16, vae_max_size=128, packing_length=400))
    list(loader)
    line = loader.log_line()
    assert "images 8: upscaled small 1, extreme aspect 1, truncated 0" in line, line
    assert f"warning: {tmp_path}/t.parquet: 1 of 4 images (25%) are smaller than the minimum side" in line
    assert "ok.parquet" not in line


# --------------------------------------------------------------------------------------------------
# Remote paths without a server

def test_remote_path_helpers_and_missing_packages(monkeypatch):
    """Relative paths join a remote folder with '/', absolute and remote ones stay; hf:// without
    huggingface_hub is a user error naming the package."""
    assert data.join("s3://b/d", "x/1.png") == "s3://b/d/x/1.png"
    assert data.join("s3://b/d", "/abs.png") == "/abs.png" and data.join("/l", "gs://b/i.png") == "gs://b/i.png"
    assert data.parent("s3://b/d/f.parquet") == "s3://b/d"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    data._store.cache_clear()
    with pytest.raises(packing.UserError, match=r"hf:// paths need huggingface_hub \(pip install huggingface_hub\)"):
        data.data_files("hf://datasets/someone/set/train.parquet")
    data._store.cache_clear()
