"""Tests for data.py and packing.py (CPU, tiny shapes, seconds). Golden files: testdata/golden/."""
import base64
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

import data
import packing
from test_train import ckpt  # noqa: F401 (a fixture: the tiny checkpoint with the golden tokenizer)

GOLDEN = Path(__file__).parent / "testdata" / "golden"
TOK_DIR = GOLDEN / "tokenizer"
CASES = sorted(p.stem for p in GOLDEN.glob("case*.json"))
GOLDEN_GEO = packing.Geometry(vit_patch=14, vit_side=8, latent_down=16, max_latent=8)


def load_case(name):
    return json.loads((GOLDEN / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(str(TOK_DIR))


@pytest.fixture(scope="module")
def specials(tok):
    return data.special_tokens(tok)


def golden_items(sample):
    items = []
    for it in sample["items"]:
        item = {k: it[k] for k in ("type", "loss", "enable_cfg", "special_token_loss", "special_token_label")}
        if it["type"] == "text":
            item["ids"] = it["text_ids"]
        else:
            item["image"] = torch.zeros(3, it["height"], it["width"])
        items.append(item)
    return items


def check_expected(batch, case):
    """Every list of `expected` exactly, and the mask row by row."""
    exp = case["expected"]
    for k, v in exp.items():
        if k == "packed_vit_tokens_shape":
            assert list(batch["packed_vit_tokens"].shape) == v, k
        elif k == "padded_images_shape":
            assert list(batch["padded_images"].shape) == v, k
        elif k == "packed_timesteps":
            assert batch[k].dtype == torch.float32
            assert batch[k].tolist() == [float(x) for x in v], k
        elif k == "ce_loss_weights":  # upstream's optional CE re-weighting: not part of our batch
            assert k not in batch
        elif k == "patchified_vae_latent_shapes":
            assert [list(s) for s in batch[k]] == v, k
        elif torch.is_tensor(batch[k]):
            assert batch[k].dtype == torch.long, k  # index tensors are Long even when empty
            assert batch[k].tolist() == v, k
        else:
            assert batch[k] == v, k
    masks = packing.sample_masks(batch["sample_lens"], batch["split_lens"], batch["attn_modes"])
    n = batch["sequence_length"]
    full = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for m in masks:
        full[start:start + len(m), start:start + len(m)] = m
        start += len(m)
    for q, row in enumerate(case["attention_mask"]):
        assert "".join("1" if x else "0" for x in full[q].tolist()) == row, f"mask row {q}"


@pytest.mark.parametrize("name", CASES)
def test_golden_from_plans(name, tok, specials):
    """The golden sequence plans, laid out and collated, give the original code's outputs."""
    case = load_case(name)
    assert specials == packing.SpecialTokens(**{k: case["settings"]["special_token_ids"][v] for k, v in
                                                dict(bos="bos_token_id", eos="eos_token_id",
                                                     vision_start="start_of_image",
                                                     vision_end="end_of_image").items()})
    for s in case["samples"]:
        for it in s["items"]:
            if it["type"] == "text":
                assert data.encode(tok, it["text"]) == it["text_ids"]
    layouts = [packing.layout_sample(golden_items(s), specials, GOLDEN_GEO) for s in case["samples"]]
    t = torch.tensor(case["fixed_t_raw_in_draw_order"], dtype=torch.float32)
    check_expected(packing.collate(layouts, timesteps=t, geo=GOLDEN_GEO), case)


def test_tokenizer_from_vocab_and_merges(tmp_path, tok):
    """Without tokenizer.json, vocab.json + merges.txt + tokenizer_config.json give the same ids."""
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((TOK_DIR / f).read_bytes())
    slow = data.load_tokenizer(str(tmp_path))
    assert data.special_tokens(slow) == data.special_tokens(tok)
    for name in CASES:
        for s in load_case(name)["samples"]:
            for it in s["items"]:
                if it["type"] == "text":
                    assert data.encode(slow, it["text"]) == it["text_ids"]


# --------------------------------------------------------------------------------------------------
# Chat records → the same layouts. Image sizes are chosen so that the resize rule (with small
# min/max sizes) yields the golden sizes: a 28x56 (HxW) source gives VAE 32x64 and ViT 28x56.

SIZES = {"a": (42, 28), "b": (14, 56), "c": (28, 28), "t2i": (32, 48), "src": (28, 56),
         "tgt": (32, 64), "e1": (28, 28), "e2": (28, 28), "e3": (28, 28)}  # name: (H, W)


def png_bytes(name, mode="RGB"):
    h, w = SIZES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def chat(ref):
    """Chat records for golden cases 1-5; ref(name) gives the image part for an image name."""
    def t(s):
        return {"type": "text", "text": s}
    return [
        {"messages": [{"role": "user", "content": [ref("a"), ref("b"), t("Which one shows a dog?")]},
                      {"role": "assistant", "content": [t("The second one.")]}]},
        {"messages": [{"role": "user", "content": [ref("c"), t("What is this?")]},
                      {"role": "assistant", "content": "A boat."},
                      {"role": "user", "content": "Is it day?"},
                      {"role": "assistant", "content": [t("No, night.")]}]},
        {"messages": [{"role": "user", "content": [t("two yellow birds fly")]},
                      {"role": "assistant", "content": [ref("t2i")]}]},
        {"messages": [{"role": "user", "content": [ref("src"), t("turn the car into a horse")]},
                      {"role": "assistant", "content": [ref("tgt")]}]},
        {"messages": [{"role": "user", "content": [ref("e1"), t("add a sun")]},
                      {"role": "assistant", "content": [ref("e2")]},
                      {"role": "user", "content": [t("make it snow")]},
                      {"role": "assistant", "content": [ref("e3")]}]},
    ]


def small_cfg(**kw):
    base = dict(model=str(TOK_DIR), packing_length=160, vit_min_size=14, vit_max_size=112,
                vae_min_size=16, vae_max_size=128, vit_max_num_patch_per_side=8, max_latent_size=8,
                text_cond_dropout=0.0, vit_cond_dropout=0.0, vae_cond_dropout=0.0, num_workers=0,
                epochs=1)
    base.update(kw)
    return data.DataConfig(**base)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for name in SIZES:
        (d / f"{name}.png").write_bytes(png_bytes(name))
    return d


@pytest.mark.parametrize("index,name", [(0, "case1_two_images"), (1, "case2_multi_turn"), (2, "case3_t2i"),
                                        (3, "case4_edit"), (4, "case5_edit_chain")])
def test_golden_from_chat(index, name, tok, specials, image_dir):
    """understanding, multi-turn, T2I, edit and edit chain from chat messages give the golden plans."""
    cfg = small_cfg()
    rec = chat(lambda n: {"type": "image_url", "image_url": {"url": f"{n}.png"}})[index]
    items = data.record_to_items(rec, "x.jsonl: row 0", str(image_dir), cfg, tok, __import__("random").Random(0))
    case = load_case(name)
    want = case["samples"][0]["items"]
    assert [(i["type"], i["loss"], i["enable_cfg"]) for i in items] == \
           [(i["type"], i["loss"], i["enable_cfg"]) for i in want]
    assert [tuple(i["image"].shape[1:]) for i in items if "image" in i] == \
           [(i["height"], i["width"]) for i in want if i["type"] != "text"]
    lay = packing.layout_sample(items, specials, cfg.geometry())
    t = torch.tensor(case["fixed_t_raw_in_draw_order"], dtype=torch.float32)
    check_expected(packing.collate([lay], timesteps=t, geo=cfg.geometry()), case)


def test_golden_pack_from_chat(tok, specials, image_dir):
    cfg = small_cfg()
    recs = chat(lambda n: {"type": "image_url", "image_url": {"url": str(image_dir / f"{n}.png")}})
    lays = [packing.layout_sample(data.record_to_items(recs[i], "r", "", cfg, tok, None), specials,
                                  cfg.geometry()) for i in (0, 2, 3)]
    case = load_case("case6_pack")
    check_expected(packing.collate(lays, timesteps=torch.tensor(case["fixed_t_raw_in_draw_order"]),
                                   geo=cfg.geometry()), case)


# --------------------------------------------------------------------------------------------------
# Containers and image sources: every way of storing the same five records gives identical packs.

def image_ref(style, img_dir):
    def ref(n):
        b = png_bytes(n)
        if style == "relpath":
            return {"type": "image_url", "image_url": {"url": f"images/{n}.png"}}
        if style == "abspath":
            return {"type": "image_url", "image_url": {"url": str(img_dir / f"{n}.png")}}
        if style == "datauri":
            return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b).decode()}}
        if style == "bytes":
            return {"type": "image", "image": b}
        if style == "struct":
            return {"type": "image", "image": {"bytes": b, "path": None}}
        if style == "images_col":
            return {"type": "image", "_bytes": b}
        raise ValueError(style)
    return ref


def records(style, img_dir, native=False):
    recs = chat(image_ref(style, img_dir))
    for r in recs:
        for m in r["messages"]:
            if native and isinstance(m["content"], str):  # parquet columns need one type per field
                m["content"] = [{"type": "text", "text": m["content"]}]
        if style == "images_col":  # HF convention: bare {"type": "image"} parts + an `images` column
            r["images"] = [{"bytes": p.pop("_bytes"), "path": None} for m in r["messages"]
                           if isinstance(m["content"], list) for p in m["content"] if "_bytes" in p]
    return recs


def write(container, recs, d):
    """Write records to a data file in d; returns the --data value."""
    if container in ("json", "jsonl", "yaml", "dir"):
        p = d / "data.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        if container == "json":
            p = d / "data.json"
            p.write_text(json.dumps(recs))
        if container == "yaml":
            (d / "mix.yaml").write_text(yaml.safe_dump(
                {"datasets": [{"path": "data.jsonl", "weight": 2.0, "data_folder": "."}]}))
            return str(d / "mix.yaml")
        return str(d) if container == "dir" else str(p)
    if container == "parquet_str":  # messages as a JSON string column (common in parquet)
        table = pa.Table.from_pylist([{"messages": json.dumps(r["messages"])} for r in recs])
    else:
        table = pa.Table.from_pylist(recs)
    if container.startswith("parquet"):
        pq.write_table(table, d / "data.parquet")
        return str(d / "data.parquet")
    p = d / "data.arrow"
    with pa.OSFile(str(p), "wb") as f:
        new = pa.ipc.new_file if container == "arrow_file" else pa.ipc.new_stream
        with new(f, table.schema) as w:
            w.write_table(table)
    return str(p)


def all_packs(cfg, rank=0, world_size=1):
    return list(data.PackedDataset(cfg, rank, world_size).stream())


def same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):  # attention_layout
            same_batch(a[k], b[k])
        elif torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


COMBOS = [("jsonl", "relpath"), ("json", "abspath"), ("jsonl", "datauri"), ("yaml", "relpath"),
          ("dir", "relpath"), ("parquet_str", "relpath"), ("parquet", "bytes"), ("parquet", "struct"),
          ("parquet", "images_col"), ("arrow_file", "struct"), ("arrow_stream", "bytes"),
          ("arrow_stream", "images_col")]


@pytest.fixture(scope="module")
def reference_packs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    (d / "images").mkdir()
    for n in SIZES:
        (d / "images" / f"{n}.png").write_bytes(png_bytes(n))
    return all_packs(small_cfg(data=(write("jsonl", records("relpath", d), d),)))


@pytest.mark.parametrize("container,style", COMBOS)
def test_containers_and_sources_identical(container, style, tmp_path, reference_packs):
    (tmp_path / "images").mkdir()
    for n in SIZES:
        (tmp_path / "images" / f"{n}.png").write_bytes(png_bytes(n))
    native = container in ("parquet", "arrow_file", "arrow_stream")
    path = write(container, records(style, tmp_path / "images", native), tmp_path)
    packs = all_packs(small_cfg(data=(path,)))
    assert len(packs) == len(reference_packs) >= 2
    assert sum(len(p) for p, _, _ in packs) == 5
    for (_, a, _), (_, b, _) in zip(packs, reference_packs):
        same_batch(a, b)


def test_upstream_t2i_row(tmp_path, tok, specials):
    """Upstream T2I parquet rows (image bytes + captions JSON) read as user text → assistant image."""
    pq.write_table(pa.Table.from_pylist([{"image": png_bytes("t2i"),
                                          "captions": json.dumps({"caption": "two yellow birds fly"})}]),
                   tmp_path / "t2i.parquet")
    (pack, batch, _), = all_packs(small_cfg(data=(str(tmp_path / "t2i.parquet"),)))
    case = load_case("case3_t2i")
    for k in ("packed_text_ids", "packed_position_ids", "mse_loss_indexes", "packed_latent_position_ids"):
        assert batch[k].tolist() == case["expected"][k]
    assert batch["attn_modes"] == case["expected"]["attn_modes"]


# --------------------------------------------------------------------------------------------------
# Images

def test_transparency_composited_on_white():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red → white
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel stays red
    assert data.to_rgb(rgba).getpixel((1, 1)) == (255, 255, 255)
    assert data.to_rgb(rgba).getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (2, 2), (0, 0))
    assert data.to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 2), 0)
    p.info["transparency"] = 0
    assert data.to_rgb(p).getpixel((0, 0)) == (255, 255, 255)


def test_resize_rule():
    # long edge clamped to max, sides multiples of the stride (DESIGN.md#image-sizes)
    assert data.resize_shape(4000, 3000, 1024, 512, 16, data.VAE_MAX_PIXELS) == (1024, 768)
    # short edge pushed up to min (upscaling small images)
    assert data.resize_shape(100, 50, 980, 378, 14, data.VIT_MAX_PIXELS) == (756, 378)
    # already fine: untouched
    assert data.resize_shape(512, 512, 1024, 512, 16, data.VAE_MAX_PIXELS) == (512, 512)
    # pixel cap divided by the number of images, applied as the area ratio (upstream quirk)
    w, h = data.resize_shape(980, 980, 980, 14, 14, 2_007_040, img_num=4)
    assert (w, h) == (518, 518)  # 980 * (501760 / 960400) = 512 → rounded to 37 * 14
    for size in [(1, 1), (3000, 20), (20, 3000), (777, 555)]:
        w, h = data.resize_shape(*size, 1024, 512, 16, data.VAE_MAX_PIXELS)
        assert w % 16 == 0 and h % 16 == 0 and max(w, h) <= 1024


def test_pixels_and_patchify_order():
    img = Image.fromarray(np.arange(28 * 42 * 3, dtype=np.uint8).reshape(28, 42, 3) % 251)
    x = data.to_tensor(img)
    assert x.shape == (3, 28, 42) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 0, 0], torch.tensor(np.asarray(img)[0, 0] / 127.5 - 1, dtype=torch.float32))
    p = packing.patchify(x, 14)
    assert p.shape == (2 * 3, 14 * 14 * 3)
    # patch 4 = row 1, column 1; feature (py, px, c) = x[c, 14 + py, 14 + px]
    py, px, c = 3, 5, 2
    assert p[4, (py * 14 + px) * 3 + c] == x[c, 14 + py, 14 + px]


def test_image_size_checks():
    with pytest.raises(packing.UserError, match="set --data.vit-max-size 980 or less"):
        data.DataConfig(data=("x",), vit_max_size=1024).check()
    with pytest.raises(packing.UserError, match="set --data.vae-max-size 128 or less"):
        data.DataConfig(data=("x",), max_latent_size=8).check()
    # every problem at once, each with the flag as typed and a value that works
    bad = data.DataConfig(max_latent_size=8, vit_max_num_patch_per_side=8, vit_patch_size=14).problems()
    assert bad == ["no data: pass --data PATH (a file, a directory or a .yaml mixture)",
                   "--data.vit-max-size 980 gives 70 tokens per side, more than the model's vit_max_num_patch_per_side=8: "
                   "set --data.vit-max-size 112 or less",
                   "--data.vit-min-size 378 is larger than --data.vit-max-size 112: set --data.vit-min-size 112 or less",
                   "--data.vae-max-size 1024 gives 64 tokens per side, more than the model's max_latent_size=8: "
                   "set --data.vae-max-size 128 or less",
                   "--data.vae-min-size 512 is larger than --data.vae-max-size 128: set --data.vae-min-size 128 or less"]
    cfg = small_cfg(vit_max_size=224)  # not check()ed: 16 patches per side, the table has 8
    with pytest.raises(data.BadSample, match=r"f.png: .*vit_max_num_patch_per_side=8") as e:
        data.transform(Image.new("RGB", (600, 60)), "vit", cfg, 1, "f.png")
    assert e.value.reason == "image_too_large"


# --------------------------------------------------------------------------------------------------
# Bad input: an error naming file, row and field; with skip_bad, a count per reason.

def T(s):
    return {"type": "text", "text": s}


def good():
    return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


BAD = [
    ("unknown_part_type", {"messages": [{"role": "user", "content": [{"type": "img"}]},
                                        {"role": "assistant", "content": "x"}]},
     r"line 2: messages\[0\].content\[0\]: unknown part type 'img'"),
    ("missing_image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "nope.png"}}, T("q")]}, {"role": "assistant", "content": "a"}]},
     r"line 2: messages\[0\].content\[0\]: image file not found: .*nope.png"),
    ("undecodable_image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}]},
        {"role": "assistant", "content": "a"}]}, r"line 2: messages\[0\].content\[0\]: cannot decode image"),
    ("http_url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}, {"role": "assistant", "content": "a"}]},
     r"line 2: messages\[0\].content\[0\]: https://x.org/a.png: .*no network"),
    ("empty_conversation", {"messages": []}, r"line 2: messages: no text and no image"),
    ("no_loss_token", {"messages": [{"role": "user", "content": "hi"}]}, r"line 2: messages: no assistant"),
    ("too_long", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]},
     r"line 2: sample has \d+ tokens, more than --data.packing-length 160"),
    ("malformed_json", {"messages": "[{\"role\": "}, r"line 2: messages: malformed JSON"),
    ("wrong_type", {"messages": 5}, r"line 2: messages: expected a list"),
    ("wrong_type", {"messages": [{"role": "robot", "content": "x"}]}, r"line 2: messages\[0\].role: 'robot'"),
    ("wrong_type", {"text": "no messages"}, r"line 2: no 'messages' field"),
    ("needs_visual_und", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "images/a.png"}}]}, {"role": "assistant", "content": "a"}]},
     r"line 2: an input image needs the ViT, but visual_und is off"),
]


@pytest.mark.parametrize("reason,rec,msg", BAD, ids=[f"{b[0]}{i}" for i, b in enumerate(BAD)])
def test_bad_input(reason, rec, msg, tmp_path):
    SIZES_DIR(tmp_path)
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [good(), rec, good()]) + "\n")
    with pytest.raises(data.BadSample, match=f"bad.jsonl: {msg}") as e:
        all_packs(small_cfg(data=(str(p),), seed=3, visual_und=reason != "needs_visual_und", skip_too_long=False))
    assert e.value.reason == reason
    packs = all_packs(small_cfg(data=(str(p),), seed=3, skip_bad=True, visual_und=reason != "needs_visual_und"))
    assert sum(len(p) for p, _, _ in packs) == 2
    assert packs[-1][2]["skips"] == {reason: 1}


def test_bad_json_line_and_column_type(tmp_path):
    p = tmp_path / "bad.jsonl"
    # a bad line 7 (the file's 1-based line, blank lines counted) is "line 7", its column within that line
    p.write_text((json.dumps(good()) + "\n") * 3 + "\n\n" + json.dumps(good()) + "\n" + '{"messages": [1,}\n')
    with pytest.raises(data.BadSample, match=r"bad.jsonl: line 7: malformed JSON \(Expecting value at column 17\)"):
        all_packs(small_cfg(data=(str(p),)))
    q = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"messages": [1, 2]}), q)
    with pytest.raises(data.BadSample, match=r"bad.parquet: row \d: messages: expected a list .* got int"):
        all_packs(small_cfg(data=(str(q),)))
    packs = all_packs(small_cfg(data=(str(q), str(p)), skip_bad=True))
    assert packs[-1][2]["skips"] == {"wrong_type": 2, "malformed_json": 1}


def test_skip_counts_reach_the_log(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [good(), {"messages": []}, good()]) + "\n")
    loader = data.PackLoader(small_cfg(data=(str(p),), skip_bad=True))
    assert len(list(loader)) == 1
    assert "skipped: empty_conversation 1" in loader.log_line()
    assert loader.stats()["samples"] == 2


# --------------------------------------------------------------------------------------------------
# Packing

def test_first_fit_beats_next_fit_and_respects_budget():
    rng = np.random.default_rng(0)
    # skewed: many short samples, a few long ones
    sizes = [int(x) for x in np.where(rng.random(3000) < 0.8, rng.integers(50, 400, 3000),
                                      rng.integers(1500, 3500, 3000))]
    fills = {}
    for name, max_open in (("first", 8), ("next", 1)):
        p = packing.FirstFitPacker(4096, max_open, size=lambda s: s)
        packs = [q for s in sizes for q in p.add(s)] + p.flush()
        assert all(sum(q) <= 4096 for q in packs)
        assert sorted(s for q in packs for s in q) == sorted(sizes)  # nothing dropped
        fills[name] = sum(sizes) / (len(packs) * 4096)
    assert fills["first"] > fills["next"] + 0.03 and fills["first"] > 0.97
    with pytest.raises(ValueError, match="longer than the packing budget"):
        packing.FirstFitPacker(100, size=lambda s: s).add(101)


def test_cfg_dropout_scope_and_rope(tok, specials):
    """Dropout only hits enable_cfg items; a dropped text keeps the RoPE id, a dropped image moves it."""
    img = torch.zeros(3, 16, 16)
    items = [dict(type="vae_image", image=img, loss=0, enable_cfg=1),
             dict(type="text", ids=[5, 6], loss=0, enable_cfg=1),
             dict(type="text", ids=[7], loss=0, enable_cfg=0),
             dict(type="vae_image", image=img, loss=1, enable_cfg=0)]
    all_drop = packing.layout_sample(items, specials, GOLDEN_GEO, (1.0, 1.0, 1.0))
    # clean VAE dropped (rope 0 used up), conditioning text dropped (no rope), plain text at rope 1
    assert all_drop.attn_modes == ["causal", "noise"]
    assert all_drop.rope == [1, 2, 3] + [4] * 3
    vqa = [dict(type="vit_image", image=torch.zeros(3, 14, 14), loss=0, enable_cfg=0),
           dict(type="text", ids=[5], loss=1, enable_cfg=0)]
    assert packing.layout_sample(vqa, specials, GOLDEN_GEO, (1.0, 1.0, 1.0)).attn_modes == ["full", "causal"]


def test_record_enable_cfg_scope(tok, image_dir):
    """VQA inputs are never CFG conditions; inputs of generation/edit samples are."""
    cfg = small_cfg()
    recs = chat(lambda n: {"type": "image_url", "image_url": {"url": f"{n}.png"}})
    vqa = data.record_to_items(recs[0], "r", str(image_dir), cfg, tok, None)
    edit = data.record_to_items(recs[3], "r", str(image_dir), cfg, tok, None)
    assert [i["enable_cfg"] for i in vqa] == [0, 0, 0, 0]
    assert [(i["type"], i["enable_cfg"]) for i in edit] == [("vae_image", 1), ("vit_image", 1), ("text", 1),
                                                           ("vae_image", 0)]


def test_timesteps_from_step_generator_not_global_rng(specials):
    lay = packing.layout_sample([dict(type="vae_image", image=torch.zeros(3, 16, 32), loss=1)], specials, GOLDEN_GEO)
    torch.manual_seed(0)
    a = packing.collate([lay, lay], packing.step_generator(1, 0, 5), geo=GOLDEN_GEO)["packed_timesteps"]
    torch.manual_seed(1)
    b = packing.collate([lay, lay], packing.step_generator(1, 0, 5), geo=GOLDEN_GEO)["packed_timesteps"]
    c = packing.collate([lay, lay], packing.step_generator(1, 1, 5), geo=GOLDEN_GEO)["packed_timesteps"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[0] == a[1] and a[1] != a[2]  # one draw per image, repeated over its tokens


def test_empty_modalities_are_long(specials):
    lay = packing.layout_sample([dict(type="text", ids=[5], loss=1)], specials, GOLDEN_GEO)
    b = packing.collate([lay], geo=GOLDEN_GEO)
    for k in ("packed_vit_token_indexes", "packed_vae_token_indexes", "mse_loss_indexes", "vit_token_seqlens",
              "packed_latent_position_ids", "packed_vit_position_ids"):
        assert b[k].dtype == torch.long and b[k].numel() == 0, k
    assert b["packed_vit_tokens"].shape == (0, 588) and b["padded_images"].shape[0] == 0
    assert b["packed_timesteps"].dtype == torch.float32 and b["patchified_vae_latent_shapes"] == []


# --------------------------------------------------------------------------------------------------
# Distributed and resumable iteration (text-only records: fast)

def text_data(tmp_path, n=40, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                    {"role": "assistant", "content": f"answer {i} " * (1 + i % 7)}]})
                           for i in range(n)) + "\n")
    return str(p)


def test_ranks_and_workers_are_disjoint_and_cover_the_epoch(tmp_path):
    path = text_data(tmp_path)
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(good()["messages"])}] * 30),
                   tmp_path / "p.parquet", row_group_size=7)  # several row groups
    cfg = small_cfg(data=(path, str(tmp_path / "p.parquet")), packing_length=128)
    seen = []
    for rank in range(2):
        ds = data.PackedDataset(cfg, rank, 2)
        for w in range(2):
            seen += [s.where for pack, _, _ in ds.stream(w, 2) for s in pack]
    assert len(seen) == len(set(seen)) == 70


def stream_shards_partly(cfg, packs) -> tuple[list[str], list[dict], list[tuple]]:
    """The 4 shards of 2 ranks x 2 workers (cfg.num_workers 2), shard i = 2 * rank + worker stopped
    after packs(i) packs: the rows they read, each rank's data state as a checkpoint holds it, and
    each shard's (dataset, i, last stream state)."""
    before, states, ends = [], [], []
    for rank in range(2):
        ds, shards = data.PackedDataset(cfg, rank, 2), {}
        for w in range(2):
            for k, (pack, _, state) in enumerate(ds.stream(w, 2)):
                before += [s.where for s in pack]
                shards[w] = state
                if k + 1 == packs(2 * rank + w):
                    break
            ends.append((ds, 2 * rank + w, state))
        states.append(json.loads(json.dumps(dict(consumed=0, num_workers=2, world_size=2, seed=cfg.seed, shards=shards))))
    return before, states, ends


@pytest.mark.parametrize("lines,n_a,n_b,epochs", [(1024, 120, 60, 1), (8, 120, 60, 1), (4, 60, 30, 2)])
def test_resume_at_another_world_size_skips_no_record(tmp_path, monkeypatch, lines, n_a, n_b, epochs):
    """A run saved by 2 ranks x 2 workers continues on 1 rank x 1 worker: together the packs before
    and after use every record `epochs` times. Units of `lines` rows: 1024 = one unit per file (cut
    into row ranges), 8 = whole units per shard, 4 with 2 epochs = old shards in different epochs."""
    monkeypatch.setattr(data, "LINES_PER_UNIT", lines)
    cfg = small_cfg(data=(text_data(tmp_path, n_a, "a.jsonl"), text_data(tmp_path, n_b, "b.jsonl")),
                    packing_length=128, num_workers=2, epochs=epochs)
    before, states, _ = stream_shards_partly(cfg, lambda i: 2 + 2 * i)  # uneven progress across shards
    n = n_a + n_b
    loader = data.PackLoader(small_cfg(data=cfg.data, packing_length=128, num_workers=0, epochs=epochs))
    loader.continue_from(states)
    loader.dataset.resume = loader.shards
    after = [s.where for pack, _, _ in loader.dataset.stream() for s in pack]
    seen = Counter(before + after)
    assert len(seen) == n and min(seen.values()) == epochs  # every record, none skipped
    print(f"re-read after resuming on another world size: {len(before) + len(after) - epochs * n} of {epochs * n}")
    assert 0 < len(before) < epochs * n
    if epochs == 1:  # within one epoch nothing is read twice
        assert len(before) + len(after) == n
    # and from there on, resume at the same world size is exact again (the dealt ranges are saved)
    loader = data.PackLoader(small_cfg(data=cfg.data, packing_length=128, num_workers=0, epochs=epochs))
    loader.continue_from(states)
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    want = [next(it) for _ in range(2)]
    fresh = data.PackLoader(small_cfg(data=cfg.data, packing_length=128, num_workers=0, epochs=epochs))
    fresh.load_state_dict(state)
    for a, b in zip(iter(fresh), want):
        same_batch(a, b)
    with pytest.raises(ValueError, match="seed"):
        data.PackLoader(small_cfg(data=cfg.data, seed=1)).continue_from(states)


def test_epochs_reshuffle(tmp_path):
    cfg = small_cfg(data=(text_data(tmp_path),), packing_length=128, epochs=2)
    ds = data.PackedDataset(cfg)
    st = ds.stream()
    keys = iter(st.next_key, None)  # the sample stream before packing
    rows = [ds.sources[0].read(k)[0] for k in keys]  # "file: line n"
    assert len(rows) == 80 and st.next_key() is None
    first, second = rows[:40], rows[40:]
    assert len(set(first)) == 40 and sorted(first) == sorted(second) and first != second
    seen = [s.where for pack, _, _ in ds.stream() for s in pack]
    assert len(seen) == 80 and len(set(seen)) == 40


@pytest.mark.parametrize("workers,lines", [(0, 1024), (2, 1024), (2, 4)])
def test_resume_mid_epoch_gives_the_same_next_packs(tmp_path, monkeypatch, workers, lines):
    monkeypatch.setattr(data, "LINES_PER_UNIT", lines)  # 4: several units per shard
    cfg = small_cfg(data=(text_data(tmp_path, 30, "a.jsonl") + ":3", text_data(tmp_path, 20, "b.jsonl")),
                    packing_length=128, epochs=None, num_workers=workers)
    loader = data.PackLoader(cfg)
    it = iter(loader)
    head = [next(it) for _ in range(5)]  # odd count: resume starts with the other worker
    state = loader.state_dict()
    want = [next(it) for _ in range(6)]
    assert any(b["sample_lens"] != want[0]["sample_lens"] for b in want)
    fresh = data.PackLoader(cfg)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON (checkpoint-safe)
    it2 = iter(fresh)
    got = [next(it2) for _ in range(6)]
    for a, b in zip(got, want):
        same_batch(a, b)
    assert fresh.stats()["packs"] == 11 and head
    other = data.PackLoader(small_cfg(data=cfg.data, packing_length=128, epochs=None, num_workers=workers + 1))
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)
    for sh in state["shards"].values():  # a state from before sharding by unit: one position per source
        sh["pos"] = [p[2] for p in sh["pos"]]
    for load in (fresh.load_state_dict, lambda st: fresh.continue_from([st])):
        with pytest.raises(ValueError, match="older data.py"):
            load(state)


def test_workers_interleave_in_step_order(tmp_path):
    """num_workers=2 yields the packs of the two worker shards alternately, as stream() makes them."""
    cfg = small_cfg(data=(text_data(tmp_path),), packing_length=128, epochs=None, num_workers=2)
    it = iter(data.PackLoader(cfg))
    got = [next(it) for _ in range(6)]
    ds = data.PackedDataset(cfg)
    s0, s1 = iter(ds.stream(0, 2)), iter(ds.stream(1, 2))
    want = [next(s)[1] for _ in range(3) for s in (s0, s1)]
    for a, b in zip(got, want):
        same_batch(data.to_float(a), b)  # the loader's pixels cross as uint8


def test_inspect_cli(tmp_path, ckpt, capsys):
    """data.py takes train.py's flags (--data.*); the geometry is the checkpoint's, printed once, not an option."""
    path = write("jsonl", records("abspath", SIZES_DIR(tmp_path)), tmp_path)

    def run(*argv):
        capsys.readouterr()
        try:
            data.main(["--model", ckpt, *argv])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, *capsys.readouterr()
    code, out, err = run("--data", path, "--inspect", "1", "--data.vit-min-size", "14", "--data.vit-max-size", "112",
                         "--data.vae-min-size", "16", "--data.vae-max-size", "128", "--data.packing-length", "160")
    assert code == 0, err
    assert "pack 0:" in out and "noise" in out and "MSE" in out and "rope" in out
    assert err.count("model geometry: ViT patch 14, 8 patches per side; latent stride 16, 8 latents") == 1
    code, out, err = run("--data", str(tmp_path / "none.jsonl"))
    assert code == 1 and err.startswith("data: ") and "Traceback" not in err
    assert err.splitlines()[1] == "error: 4 problems:"  # 7B-MoT's default sizes do not fit: all at once
    assert "set --data.vit-max-size 112 or less" in err and "set --data.vae-min-size 128 or less" in err
    assert run("--data", path, "--data.max-latent-size", "8")[0] == 2  # the checkpoint's, not an option


def SIZES_DIR(tmp_path):
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    for n in SIZES:
        (d / f"{n}.png").write_bytes(png_bytes(n))
    return d


def test_mixture_weights(tmp_path):
    a, b = text_data(tmp_path, 20, "a.jsonl"), text_data(tmp_path, 20, "b.jsonl")
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"datasets": [{"path": "a.jsonl", "weight": 3},
                                                                    {"path": "b.jsonl", "weight": 1}]}))
    for spec in [(a + ":3", b), (str(tmp_path / "mix.yaml"),)]:
        st = data.PackedDataset(small_cfg(data=spec, epochs=None)).stream()
        picks = [st.next_key()[0] for _ in range(2000)]
        assert 0.72 < picks.count(0) / 2000 < 0.78


def test_source_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "m.yaml").write_text("datasets: nope\n")
    (tmp_path / "empty").mkdir()
    for path, msg in [(tmp_path / "none.jsonl", "no such file"), (tmp_path / "x.csv", "unknown data file type"),
                      (tmp_path / "m.yaml", "expected `datasets:"), (tmp_path / "empty", "holds no data files")]:
        with pytest.raises(ValueError, match=msg):
            data.find_sources([str(path)])


# --------------------------------------------------------------------------------------------------
# Sharding by read unit: each (rank, worker) shard reads only its own units, each once per epoch.

def unit_file(container, tmp_path, n_units, rows, monkeypatch):
    """A data file of n_units read units of `rows` text records each; returns (path, unit of row)."""
    recs = [{"messages": json.dumps([{"role": "user", "content": f"q{i}"},
                                     {"role": "assistant", "content": "a " * (1 + i % 5)}])}
            for i in range(n_units * rows)]
    if container == "parquet":
        pq.write_table(pa.Table.from_pylist(recs), tmp_path / "u.parquet", row_group_size=rows)
    elif container == "arrow":
        table = pa.Table.from_pylist(recs)
        with pa.OSFile(str(tmp_path / "u.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            for b in table.to_batches(max_chunksize=rows):
                w.write_batch(b)
    else:
        monkeypatch.setattr(data, "LINES_PER_UNIT", rows)
        (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(tmp_path / f"u.{container}"), lambda r: r // rows


def count_row_group_reads(monkeypatch) -> list[int]:
    """The row groups pyarrow reads from now on, in order."""
    reads, real = [], pq.ParquetFile.iter_batches

    def counted(self, *a, row_groups=None, **k):
        reads.extend(row_groups if row_groups is not None else range(self.num_row_groups))
        return real(self, *a, row_groups=row_groups, **k)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    return reads


def row_of(where):  # "file: row r", or "file: line r + 1" for jsonl (these files have no blank lines)
    return int(where.rsplit("row ", 1)[1]) if "row " in where else int(where.rsplit("line ", 1)[1]) - 1


@pytest.mark.parametrize("container", ["parquet", "arrow", "jsonl"])
def test_each_unit_is_read_by_one_shard(container, tmp_path, monkeypatch):
    """16 units, 4 ranks x 2 workers, 2 epochs: every shard reads 2 whole units per epoch, each unit
    is read by one shard, every row is used once per epoch, the units are dealt anew each epoch;
    parquet row groups are read from disk once per epoch (counted at pyarrow)."""
    path, unit = unit_file(container, tmp_path, 16, 3, monkeypatch)
    reads = count_row_group_reads(monkeypatch)
    cfg = small_cfg(data=(path,), packing_length=128, epochs=2, num_workers=2)
    rows = {}  # (epoch, shard) -> rows in reading order
    for rank in range(4):
        for w in range(2):
            ds = data.PackedDataset(cfg, rank, 4)  # a dataset each: a worker process each, no shared cache
            for pack, _, _ in ds.stream(w, 2):
                for s in pack:
                    rows.setdefault((s.key[1], rank * 2 + w), []).append(row_of(s.where))
    for epoch in range(2):
        owner = {}
        for shard in range(8):
            got = rows[epoch, shard]
            assert len({unit(r) for r in got}) == 2 and len(got) == 6  # two whole units
            for r in got:
                assert owner.setdefault(unit(r), shard) == shard
        assert sorted(r for s in range(8) for r in rows[epoch, s]) == list(range(48))
    assert [{unit(r) for r in rows[0, s]} for s in range(8)] != [{unit(r) for r in rows[1, s]} for s in range(8)]
    if container == "parquet":  # at most once per epoch (a shard whose last unit of one epoch is its first
        # of the next keeps it)
        assert set(reads) == set(range(16)) and max(Counter(reads).values()) <= 2 and len(reads) >= 30


def test_fewer_units_than_shards(tmp_path, monkeypatch):
    """3 row groups of 6 rows on 8 shards: the 18 rows are cut into slices of 2 or 3, so every shard
    draws from both sources (the mixture holds) and a row group is read by the 2 or 3 shards whose
    slices touch it, not 8."""
    path, _ = unit_file("parquet", tmp_path, 3, 6, monkeypatch)
    reads = count_row_group_reads(monkeypatch)
    cfg = small_cfg(data=(path, text_data(tmp_path, 80)), packing_length=128, num_workers=2)
    seen = []
    for rank in range(4):
        for w in range(2):
            ds = data.PackedDataset(cfg, rank, 4)  # a dataset each: a worker process each, no shared cache
            keys = list(iter(ds.stream(w, 2).next_key, None))
            assert {k[0] for k in keys} == {0, 1}
            seen += [ds.sources[k[0]].read(k)[0] for k in keys]
    assert len(seen) == len(set(seen)) == 18 + 80
    assert sorted(Counter(reads).values()) == [2, 3, 3]


def test_parquet_decode_peak_in_a_fresh_process(tmp_path):
    """The peak of pyarrow's process-wide pool while a worker decodes a 16 MB row group (16 rows of
    1 MB), in a fresh process so that the peak is this decode's alone: about 2 row groups (the page
    and the table), not 4 (the column chunk read whole first, without the read buffer)."""
    import subprocess
    pq.write_table(pa.table({"images": [[os.urandom(2**20)] for _ in range(32)]}), tmp_path / "big.parquet",
                   row_group_size=16, compression="none")
    code = (f"import data, pyarrow as pa; f = data.DataFile({str(tmp_path / 'big.parquet')!r}); "
            f"t = f.load(1); print(pa.default_memory_pool().max_memory() / 2**24, t.num_rows)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    peak, rows = out.stdout.split()
    assert rows == "16" and float(peak) < 2.5, f"decoding a row group peaks at {float(peak):.2f} row groups"


def test_unused_columns_are_not_read_but_listed_in_errors(tmp_path):
    """Parquet reads only the columns a record can use; a file whose records cannot parse still
    lists all of its fields in the error (here a T2I table with the caption column misnamed)."""
    pq.write_table(pa.table({"image": [png_bytes("t2i")], "text": ["a cat"]}), tmp_path / "t2i.parquet")
    with pytest.raises(data.BadSample, match=r"t2i.parquet: row 0: no 'messages' field \(fields: \['image', 'text'\]\)"):
        all_packs(small_cfg(data=(str(tmp_path / "t2i.parquet"),)))


@pytest.mark.parametrize("lines,epochs", [(4, 2), (1024, 1)])
def test_rows_left_when_a_finite_run_stops(tmp_path, monkeypatch, lines, epochs):
    """2 ranks x 2 workers stop after uneven numbers of packs, some shards run dry: rows_left of the
    ranks adds up to the records the consumed packs lack (counted from the packs' samples). Units
    of 4 lines with 2 epochs: shards in different epochs; 1024: units cut into row ranges."""
    monkeypatch.setattr(data, "LINES_PER_UNIT", lines)
    cfg = small_cfg(data=(text_data(tmp_path, 50, "a.jsonl") + ":2", text_data(tmp_path, 30, "b.jsonl")),
                    packing_length=128, num_workers=2, epochs=epochs)
    used, left = 0, 0
    for rank, stops in enumerate([(3, 1000), (0, 7)]):  # packs taken per worker; 1000: until it runs dry
        loader = data.PackLoader(cfg, rank, 2)
        for w, stop in enumerate(stops):
            for k, (pack, _, state) in enumerate(loader.dataset.stream(w, 2)):
                if k == stop:
                    break
                used += len(pack)
                loader.shards[w] = state
        left += loader.rows_left()
    assert 0 < used < 80 * epochs and used + left == 80 * epochs


def test_jsonl_is_indexed_once_per_process_tree(tmp_path, monkeypatch):
    """The line offsets of a .jsonl file are computed in the parent; DataLoader workers inherit them."""
    log = tmp_path / "index.log"
    real = data.index_lines

    def logged(path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(path)
    monkeypatch.setattr(data, "index_lines", logged)
    it = iter(data.PackLoader(small_cfg(data=(text_data(tmp_path, 80),), packing_length=128, num_workers=2,
                                        epochs=None)))
    [next(it) for _ in range(4)]
    assert log.read_text().split() == [str(os.getpid())]


@pytest.mark.parametrize("chunk", [1, 5, 1 << 24])
def test_index_lines_matches_reading_line_by_line(tmp_path, monkeypatch, chunk):
    """index_lines scans chunks with numpy; a line-by-line reading is the reference: blank and
    whitespace-only lines (CRLF, tabs, form feeds) are skipped but counted, lines cross chunk
    borders, the last line may lack its newline."""
    monkeypatch.setattr(data, "INDEX_CHUNK", chunk)
    for text in [b"", b"\n", b"{}", b"\n\n{}", b'{"a": "\xc3\xa9"}\r\n \t\r\n\x0c\n  {} \n\n{}\n\x0b']:
        (tmp_path / "t.jsonl").write_bytes(text)
        offsets, lines, pos = [], [], 0
        for no, line in enumerate(io.BytesIO(text), 1):  # split at b"\n" only, as index_lines
            if line.strip():
                offsets.append(pos)
                lines.append(no)
            pos += len(line)
        got = data.index_lines(str(tmp_path / "t.jsonl"))
        assert got[0].tolist() == offsets + [len(text)] and got[1].tolist() == lines, text


def test_line_index_is_shared_and_pruned(tmp_path, monkeypatch):
    """The per-node index of a .jsonl file ($TMPDIR/bagel-train-index): while one process builds it,
    another that asks for it waits and gets it whole, without building it too; building one deletes
    the indexes no run used for INDEX_KEEP_DAYS and those of older versions of the file; an index
    used since is kept; a file changed (size or modification time) is indexed again."""
    import tempfile
    import threading
    import time
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    folder = tmp_path / "tmp" / "bagel-train-index"
    real, built, started, go = data.index_lines, [], threading.Event(), threading.Event()

    def slow(path):
        built.append(os.path.basename(path))
        started.set()
        go.wait(10)
        return real(path)
    monkeypatch.setattr(data, "index_lines", slow)
    a, b, c = (text_data(tmp_path, 30, f"{x}.jsonl") for x in "abc")
    got = {}
    threads = [threading.Thread(target=lambda k=k: got.setdefault(k, data.line_index(a))) for k in range(2)]
    threads[0].start()
    started.wait(10)
    threads[1].start()
    time.sleep(0.3)
    assert got == {}  # the second waits for the first's index
    go.set()
    for t in threads:
        t.join()
    assert built == ["a.jsonl"]
    for offsets, lines in got.values():
        assert np.array_equal(offsets, real(a)[0]) and np.array_equal(lines, real(a)[1])

    files = lambda: {f.name for f in folder.iterdir() if f.name != "lock"}
    of_a = files()
    data.line_index(b)
    of_b = files() - of_a
    assert len(of_a) == len(of_b) == 2
    aged = time.time() - (data.INDEX_KEEP_DAYS + 1) * 86400
    for f in folder.iterdir():
        os.utime(f, (aged, aged))
    data.line_index(b)  # b is used: it stays
    data.line_index(c)  # c is built: a's index, unused for too long, goes
    of_c = files() - of_b
    assert files() == of_b | of_c and len(of_c) == 2
    st = os.stat(b)
    with open(b, "a") as f:  # a new version of b: its index is built again, the old one goes
        f.write(json.dumps(good()) + "\n")
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))  # its time kept (as `cp -p` does): only the size tells
    assert len(data.line_index(b)[1]) == 31 and files() & of_b == set() and len(files()) == 4
    with open(b, "rb") as f:  # the same size, two lines joined: only the modification time tells
        text = f.read()
    with open(b, "wb") as f:
        f.write(text.replace(b"\n", b" ", 1))
    st = os.stat(b)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later time, also where timestamps are coarse
    assert os.stat(b).st_size == st.st_size and len(data.line_index(b)[1]) == 30


POOLS = []  # memory pools of the parquet memory tests: alive until exit (pyarrow frees into them)


def read_counting_pyarrow(cfg) -> tuple[list[int], int, int]:
    """Streams one shard of `cfg`, reading every record: (pyarrow's bytes held after each record, the
    reader's peak, bytes still held once the dataset is gone), counted exactly at pyarrow's memory
    pools (RSS is noisy). The reader allocates from the default pool set here, a proxy that counts its
    peak; the read-ahead cache allocates from the process-wide pool below it (counted in `held`)."""
    base = pa.default_memory_pool()
    reader = pa.proxy_memory_pool(base)
    POOLS.append(reader)
    pa.set_memory_pool(reader)
    try:
        start = base.bytes_allocated()
        ds = data.PackedDataset(cfg)
        st, held = ds.stream(), []
        for key in iter(st.next_key, None):
            ds.sources[key[0]].read(key)
            held.append(base.bytes_allocated() - start)
        del ds, st
        return held, reader.max_memory(), base.bytes_allocated() - start
    finally:
        pa.set_memory_pool(base)


def test_parquet_memory_is_bounded(tmp_path):
    """One shard streams 8 parquet files of 2 row groups (units) of 16 rows, each row 64 kB of
    incompressible bytes in the `images` column records use and 64 kB in a column they do not:
    between two records pyarrow holds at most one unit (no read-ahead cache per open file, no unit
    kept per file, no unused column), and while it decodes one the reader peaks under 2.5 units. All
    of it is freed with the dataset."""
    unit = 16 * 2**16  # bytes of the used column in one row group
    for f in range(8):
        msgs = [json.dumps(good()["messages"])] * 32
        pq.write_table(pa.table({"messages": msgs, "images": [[os.urandom(2**16)] for _ in range(32)],
                                 "unused": [os.urandom(2**16) for _ in range(32)]}),
                       tmp_path / f"{f}.parquet", row_group_size=16, compression="none")
    held, peak, left = read_counting_pyarrow(small_cfg(data=(str(tmp_path),), packing_length=4096))
    assert len(held) == 256
    assert max(held) < 1.1 * unit, f"pyarrow holds {max(held) / unit:.2f} units between records"
    assert peak < 2.5 * unit, f"decoding a unit peaks at {peak / unit:.2f} units"
    assert left == 0


def test_a_mixture_of_ten_parquet_sources_holds_about_two_row_groups(tmp_path):
    """One shard draws from 10 parquet sources, each 2 row groups of 16 rows of 64 kB of
    incompressible bytes (one page per column chunk, as pyarrow writes rows this big): between two
    records pyarrow holds about 2 row groups in all, not one per source (10); while it decodes, a
    piece peaks under 2 row groups more (the column's page is read whole)."""
    unit = 16 * 2**16  # in pieces of 3 or 4 rows: at most 10 x 4 / 16 held
    for f in range(10):
        pq.write_table(pa.table({"messages": [json.dumps(good()["messages"])] * 32,
                                 "images": [[os.urandom(2**16)] for _ in range(32)]}),
                       tmp_path / f"{f}.parquet", row_group_size=16, compression="none")
    held, peak, _ = read_counting_pyarrow(small_cfg(data=tuple(str(tmp_path / f"{f}.parquet") for f in range(10)),
                                                    packing_length=4096))
    assert len(held) == 320
    assert max(held) < 2.6 * unit, f"pyarrow holds {max(held) / unit:.2f} row groups between records"
    assert peak < 4.3 * unit, f"reading peaks at {peak / unit:.2f} row groups"


def test_start_up_check_keeps_no_unit(tmp_path):
    """train.check_args reads a record of each source's first unit (PackedDataset.check_records) and
    rank 0's loader reuses its dataset: the units read (here 2 sources of one 1 MB parquet row group)
    must not stay there, where each DataLoader worker would inherit one per source and the trainer
    keep them for the run. Counted at pyarrow's memory pool."""
    for f in range(2):
        pq.write_table(pa.table({"messages": [json.dumps(good()["messages"])] * 16,
                                 "images": [[os.urandom(2**16)] for _ in range(16)]}),
                       tmp_path / f"{f}.parquet", compression="none")
    cfg = small_cfg(data=(str(tmp_path / "0.parquet"), str(tmp_path / "1.parquet")))
    start = pa.total_allocated_bytes()
    ds = data.PackedDataset(cfg)
    ds.check_records()
    assert pa.total_allocated_bytes() - start < 2**16, "the checked units stay in the dataset"


def test_a_loader_takes_only_a_dataset_of_its_own_config_and_rank(tmp_path):
    """PackLoader reuses the dataset train.check_args built on rank 0 only where it is the one it would
    build: the same config, rank and world size (else its shards would read another rank's rows)."""
    cfg = small_cfg(data=(text_data(tmp_path, 8),))
    assert data.PackLoader(cfg, 0, 2, ds := data.PackedDataset(cfg, 0, 2)).dataset is ds
    for other in [(small_cfg(data=cfg.data, seed=1), 0, 2), (cfg, 1, 2), (cfg, 0, 1)]:
        with pytest.raises(ValueError, match="another config, rank or world size"):
            data.PackLoader(*other, ds)


# --------------------------------------------------------------------------------------------------
# Real sizes: a 1024x1024 edit fits the defaults; over-budget and mostly-bad sources are errors.

def test_1024_edits_fit_the_defaults(tmp_path, tok, monkeypatch, capsys):
    """At the defaults (BAGEL-7B-MoT geometry, packing_length 10240) a 1024^2 edit and a 1024^2
    "ask about it, then edit it" record fit: VAE 1024 px = 64x64 latents, the edit's ViT copy
    518 px = 37x37 patches (upstream `unified_edit`), each + 2 markers, text + 2 per turn."""
    g = np.linspace(0, 255, 1024, dtype=np.uint8)
    Image.fromarray(np.stack([np.add.outer(g, g) // 2] * 3, -1).astype(np.uint8)).save(tmp_path / "big.jpg")
    img = {"type": "image_url", "image_url": {"url": "big.jpg"}}
    edit = [{"role": "user", "content": [img, T("now mirror it")]}, {"role": "assistant", "content": [img]}]
    multi = [{"role": "user", "content": [img, T("what is in this picture?")]},
             {"role": "assistant", "content": "a smooth grey gradient from the top left corner"},
             {"role": "user", "content": "now mirror it"}, {"role": "assistant", "content": [img]}]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in (edit, multi)))
    monkeypatch.setattr(sys, "argv", ["data.py", "--data", str(tmp_path / "big.jsonl"), "--model", str(TOK_DIR),
                                      "--inspect", "2", "--data.epochs", "1", "--data.text-cond-dropout", "0",
                                      "--data.vit-cond-dropout", "0", "--data.vae-cond-dropout", "0"])
    data.main()
    out = capsys.readouterr().out
    texts = [["now mirror it"], ["what is in this picture?", "a smooth grey gradient from the top left corner",
                                 "now mirror it"]]
    want = {2 * (64 * 64 + 2) + 37 * 37 + 2 + sum(len(tok.encode(t, add_special_tokens=False).ids) + 2 for t in ts)
            for ts in texts}
    got = {int(n) for n in __import__("re").findall(r"sample .*: (\d+) tokens", out)}
    assert got == want and "/10,240 tokens" in out and "518x518" in out and "1024x1024" in out


@pytest.mark.parametrize("msgs,budget,part,option", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/a.png"}}, T("what?")]},
      {"role": "assistant", "content": "x"}], 12, "user image → ViT", "--data.vit-max-size"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/c.png"}}, T("edit")]},
      {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "images/tgt.png"}}]}], 20,
     "assistant image → noisy VAE target", "--data.vae-max-size"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 40}], 30, "assistant text",
     "shorten the text"),
])
def test_too_long_names_the_large_part(msgs, budget, part, option, tmp_path):
    SIZES_DIR(tmp_path)
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(data.BadSample, match=f"long.jsonl: line 1: sample has .* more than --data.packing-length {budget}; "
                                             f"its largest part is the {part}.*tokens: .*{option}"):
        all_packs(small_cfg(data=(str(p),), packing_length=budget, skip_too_long=False))


def test_mostly_skipped_source_stops(tmp_path):
    """With skip_bad, a source whose records are > 20% bad stops the run with its name; 10% does not."""
    def source(name, every):
        p = tmp_path / name
        p.write_text("".join((json.dumps({"messages": []}) if i % every == 0 else json.dumps(good())) + "\n"
                             for i in range(150)))
        return str(p)
    ok, bad = source("ok.jsonl", 10), source("bad.jsonl", 4)
    packs = all_packs(small_cfg(data=(ok,), skip_bad=True, packing_length=512))
    assert packs[-1][2]["skips"] == {"empty_conversation": 15}
    with pytest.raises(ValueError, match=r"bad.jsonl: \d+ of the 1\d\d records read so far are bad .*the last: "
                                         r".*bad.jsonl: line \d+: messages: no text"):
        all_packs(small_cfg(data=(ok, bad), skip_bad=True, packing_length=512))
