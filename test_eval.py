"""Validation loss, loggers and plots of train.py on CPU: `python -m pytest -q test_eval.py`.

The references are written here from the definitions: the stratified grid t = (i + 0.5) / n, the
time shift s*t / (1 + (s-1)*t), token means of a plain (unsharded, fp32) Bagel's per-token losses."""
import dataclasses
import glob
import io
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import data
import demo as demo_lib
import fsdp
import model as model_lib
import packing
import train
from model import AutoEncoder, Bagel


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny ops: threads only wait on each other; and no demo VAE fit (seconds, not tested here)."""
    monkeypatch.setattr(demo_lib, "VAE_STEPS", 0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, str, str]:
    """The demo's base checkpoint (random VAE) and a small generated set: 24 shapes, 12 held out."""
    root = tmp_path_factory.mktemp("demo")
    train_jsonl, val_jsonl = demo_lib.make_data(str(root / "data"), n_images=24, n_val=12)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(demo_lib, "VAE_STEPS", 0)
        base = demo_lib.make_checkpoint(str(root / "base"), str(root / "data" / "images"))
    return base, train_jsonl, val_jsonl


def val_args(demo, dropout: float = 0.0, packs: int = 3, **kw) -> train.Args:
    """The demo's arguments as train() completes them, fp32 so that 1e-5 means something."""
    base, train_jsonl, val_jsonl = demo
    a = train.parse_args([])
    cfg = dataclasses.replace(a.data, data=(train_jsonl,), model=base, packing_length=160, text_cond_dropout=dropout,
                              vit_cond_dropout=dropout, vae_cond_dropout=dropout)
    return dataclasses.replace(a, model=base, dtype="fp32", data=data.match_model(cfg, model_lib.read_config(base)),
                               eval=dataclasses.replace(a.eval, data=(val_jsonl,), packs=packs), **kw)


@pytest.fixture
def world1():
    d = fsdp.init_distributed("cpu")
    yield d
    dist.destroy_process_group()


def image_timesteps(packs) -> torch.Tensor:
    """The t of each noisy image as the model sees it: sigmoid of the raw value, then the shift."""
    return torch.cat([torch.sigmoid(b["packed_timesteps"]) for _, b, counts in packs if counts])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_val_timesteps_are_a_stratified_grid_and_cfg_dropout_is_off(demo, shift):
    ae = AutoEncoder.from_pretrained(demo[0])
    d = fsdp.Dist(0, 1, 0, 1, torch.device("cpu"))
    packs = train.build_val_packs(val_args(demo, dropout=1.0, timestep_shift=shift), ae, d)
    t = image_timesteps(packs)
    t = shift * t / (1 + (shift - 1) * t)
    seen = torch.unique(t[t > 0]).double()  # one value per noisy image, repeated over its latent tokens
    n = len(seen)
    assert n >= 6 and torch.allclose(seen, (torch.arange(n, dtype=torch.float64) + 0.5) / n, atol=1e-6)
    assert (t > 0).sum() == n * 16  # 32-pixel images: 4 x 4 latent tokens each, all noisy, one t each
    # CFG dropout 1.0 in the training data config drops every prompt there; the val packs keep them
    keep = train.build_val_packs(val_args(demo, dropout=0.0, timestep_shift=shift), ae, d)
    for (_, a, _), (_, b, _) in zip(packs, keep):
        assert torch.equal(a["packed_text_ids"], b["packed_text_ids"])
        assert torch.equal(a["padded_latent"], b["padded_latent"])


def test_val_packs_split_over_ranks_count_each_pack_once(demo):
    ae = AutoEncoder.from_pretrained(demo[0])
    for n_packs, world in ((3, 2), (1, 2), (2, 3)):
        ranks = [train.build_val_packs(val_args(demo, packs=n_packs), ae, fsdp.Dist(r, world, r, world, torch.device("cpu")))
                 for r in range(world)]
        counted = sorted(i for packs in ranks for i, _, counts in packs if counts)
        assert counted == list(range(n_packs)), (n_packs, world)
        assert len({len(p) for p in ranks}) == 1  # as many forwards on every rank: FSDP's collectives match


@pytest.mark.parametrize("checkpointing", [False, True])
def test_val_metrics_equal_a_plain_model_and_repeat_bit_for_bit(demo, world1, checkpointing):
    args = val_args(demo, activation_checkpointing=checkpointing)  # real runs checkpoint, the demo does not
    model = train.build_model(args, world1, fsdp.make_mesh(world1, 0))
    ae = AutoEncoder.from_pretrained(args.model)
    packs = train.build_val_packs(args, ae, world1)
    first = train.validate(model, packs, args, world1)
    with torch.no_grad():  # another forward in between (other noise) must leave no trace
        model(**packs[0][1], generator=torch.Generator().manual_seed(1))
    assert train.validate(model, packs, args, world1) == first

    ref = Bagel.from_pretrained(args.model, **train.config_overrides(args))  # the demo trains at its own timestep shift
    ce, mse, t = [], [], []
    with torch.no_grad():
        for i, b, _ in packs:
            out = ref(**b, generator=train.keyed_generator(args.seed, 0, i, train.VAL_NOISE, "cpu"))
            ce.append(out["ce"])
            mse.append(out["mse"].mean(-1))
            t.append(out["mse_t"])
    ce, mse, t = torch.cat(ce), torch.cat(mse), torch.cat(t)
    assert first["val_ce"] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert first["val_mse"] == pytest.approx(float(mse.mean()), rel=1e-5)
    for q, got in enumerate(first["val_mse_by_t"]):
        inside = (t >= q / 4) & (t < (q + 1) / 4)
        assert inside.any() and got == pytest.approx(float(mse[inside].mean()), rel=1e-5)


# -------------------------------------------------------------------------------------------------
# the demo end to end: validation in the log, metrics.jsonl, across a resume, to stub loggers

DEMO = ["--data.packing-length", "160", "--optim.schedule", "constant", "--optim.warmup-steps", "2",
        "--ckpt.every", "2", "--ckpt.keep-last", "2", "--log-every", "3", "--eval.every", "2", "--eval.steps", "2",
        "--eval.size", "32", "--eval.packs", "3", "--eval.prompts", "a red circle"]


class StubWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.Image = lambda png: ("image", png)

    def init(self, **kw):
        self.calls.append(("init", kw))
        return types.SimpleNamespace(log=lambda row, step: self.calls.append(("log", step, row)))


class StubWriter:
    calls = []

    def __init__(self, log_dir):
        self.calls.append(("init", log_dir))

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", step, tag, value))

    def add_image(self, tag, img, step, dataformats):
        self.calls.append(("image", step, tag, img.shape, dataformats))

    def flush(self):
        pass


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    """Run a: 4 steps with stub wandb and TensorBoard, validation at 2 and 4, logged at 3 and 4.
    Run b: resumed from a's step-2 checkpoint to 4. Both on the small demo set (copied in: the demo
    then skips writing its own)."""
    root = tmp_path_factory.mktemp("runs")
    a, b = str(root / "a"), str(root / "b")
    for run in (a, b):
        shutil.copytree(demo[0], os.path.join(run, "base"))
        shutil.copytree(os.path.dirname(demo[1]), os.path.join(run, "demo_data"))
    wandb, tb = StubWandb(), types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = StubWriter
    with pytest.MonkeyPatch.context() as m:
        m.setattr(demo_lib, "VAE_STEPS", 0)
        m.setitem(sys.modules, "wandb", wandb)
        m.setitem(sys.modules, "torch.utils.tensorboard", tb)
        torch.set_num_threads(1)
        train.main(DEMO + ["--output-dir", a, "--max-steps", "4", "--wandb", "proj", "--tensorboard"])
        train.main(DEMO + ["--output-dir", b, "--max-steps", "4", "--ckpt.resume", os.path.join(a, "step-0000002")])
    rows = {run: [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))] for run in (a, b)}
    return a, rows[a], rows[b], wandb.calls, StubWriter.calls


VAL_KEYS = ("val_ce", "val_mse", "val_mse_by_t")


def test_val_metrics_fall_and_are_unchanged_by_a_resume(runs):
    _, rows_a, rows_b, _, _ = runs
    val = lambda rows: {r["step"]: {k: r[k] for k in VAL_KEYS} for r in rows if "val_ce" in r}
    va, vb = val(rows_a), val(rows_b)
    assert sorted(va) == [2, 4] and sorted(vb) == [4]
    assert va[4] == vb[4]  # bit for bit: the resumed run validates the same weights on the same packs
    assert va[4]["val_ce"] < va[2]["val_ce"] and va[4]["val_mse"] < va[2]["val_mse"]
    # an eval step that is no log step writes a row of its own; a log step carries both
    assert sorted(rows_a[0]) == ["step", *sorted(VAL_KEYS)] and rows_a[0]["step"] == 2
    assert [r["step"] for r in rows_a] == [2, 3, 4] and {"ce", "mse", "lr", *VAL_KEYS} <= set(rows_a[2])


def test_loggers_get_the_metrics_rows_and_the_sample_grids(runs):
    a, rows, _, wandb, tb = runs
    flat = {r["step"]: train.flat_scalars(r) for r in rows}
    assert wandb[0][0] == "init" and wandb[0][1]["project"] == "proj" and wandb[0][1]["config"]["max_steps"] == 4
    logged = [c for c in wandb if c[0] == "log"]
    assert [(s, row) for _, s, row in logged if "samples" not in row] == list(flat.items())
    assert flat[4]["val_mse_by_t/3"] == rows[-1]["val_mse_by_t"][3] and "mse_t_tokens/0" in flat[4]
    grids = [(s, row["samples"]) for _, s, row in logged if "samples" in row]
    want = [(s, ("image", os.path.join(a, "samples", f"step-{s:07d}", "grid.png"))) for s in (2, 4)]
    assert grids == want and all(os.path.exists(p) for _, (_, p) in grids)

    assert tb[0] == ("init", os.path.join(a, "tb"))
    scalars = {}
    for c in tb:
        if c[0] == "scalar":
            scalars.setdefault(c[1], {})[c[2]] = c[3]
    assert scalars == flat
    w, h = Image.open(want[0][1][1]).size
    assert [c for c in tb if c[0] == "image"] == [("image", s, "samples", (h, w, 3), "HWC") for s in (2, 4)]


def test_the_demo_asks_about_the_next_held_out_image_at_each_eval(runs):
    a = runs[0]
    val = os.path.join(a, "demo_data", "val")
    held_out = [np.asarray(Image.open(os.path.join(val, f))) for f in sorted(os.listdir(val))]
    asked = [np.asarray(Image.open(os.path.join(a, "samples", f"step-{s:07d}", "question.png"))) for s in (2, 4)]
    # eval k (step 2k with --eval.every 2) asks about held-out image k
    assert [[i for i, h in enumerate(held_out) if np.array_equal(q, h)] for q in asked] == [[1], [2]]


def wandb_history(path: str) -> list[dict]:
    """The history rows of an offline wandb run, read from its .wandb file: a 7-byte file header,
    then LevelDB-log records (crc 4 bytes, length 2, type 1 = whole, 2/3/4 = first/middle/last
    piece) in 32 KiB blocks, each record a wandb_internal_pb2.Record protobuf."""
    from wandb.proto import wandb_internal_pb2
    buf = open(path, "rb").read()
    assert buf[:4] == b":W&B"
    pos, piece, rows = 7, b"", []
    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is zero padding
            pos += 32768 - pos % 32768
            continue
        n, kind = int.from_bytes(buf[pos + 4:pos + 6], "little"), buf[pos + 6]
        piece, pos = piece + buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(piece)
            piece = b""
            if r.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def installed(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (installed("wandb") and installed("tensorboard")), reason="pip install wandb tensorboard")
def test_real_wandb_and_tensorboard_log_the_metrics_rows(demo, tmp_path, monkeypatch):
    """The installed packages (wandb offline): read back, their scalars are metrics.jsonl's (float32
    in TensorBoard) and their images the sample grids."""
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true",
                     WANDB_DISABLE_CODE="true").items():
        monkeypatch.setenv(k, v)
    run = str(tmp_path / "run")
    shutil.copytree(demo[0], os.path.join(run, "base"))
    shutil.copytree(os.path.dirname(demo[1]), os.path.join(run, "demo_data"))
    train.main(DEMO + ["--output-dir", run, "--max-steps", "3", "--wandb", "proj", "--tensorboard"])
    wandb.finish()  # what wandb's exit hook does at the end of `python train.py`
    rows = {r["step"]: train.flat_scalars(r) for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}
    assert sorted(rows) == [2, 3] and "val_ce" in rows[2] and "ce" in rows[3]  # eval-only row, then a full one
    grids = {s: np.asarray(Image.open(os.path.join(run, "samples", f"step-{s:07d}", "grid.png")).convert("RGB"))
             for s in (2, 3)}

    acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tb = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            tb.setdefault(e.step, {})[tag] = e.value
    assert tb == {s: {k: float(np.float32(v)) for k, v in row.items()} for s, row in rows.items()}
    images = {e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in acc.Images("samples")}
    assert sorted(images) == [2, 3] and all(np.array_equal(images[s], grids[s]) for s in (2, 3))

    (path,) = glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb"))
    history = wandb_history(path)
    logged = {}
    for h in history:
        logged.setdefault(h["_step"], {}).update({k: v for k, v in h.items() if not k.startswith(("_", "samples/"))})
    assert logged == rows  # floats survive wandb's JSON exactly
    files = {h["_step"]: h["samples/path"] for h in history if "samples/path" in h}
    assert sorted(files) == [2, 3]
    for s, f in files.items():
        img = np.asarray(Image.open(os.path.join(os.path.dirname(path), "files", f)).convert("RGB"))
        assert np.array_equal(img, grids[s])


def test_plots_have_the_expected_size(runs):
    a = runs[0]
    assert Image.open(os.path.join(a, "loss.png")).size == (800, 400)
    # question + 1 prompt, GRID_TILE inches each at 100 dpi
    assert Image.open(os.path.join(a, "samples", "step-0000004", "grid.png")).size == (2 * 250, 310)


def test_missing_logger_packages_name_the_install_command(demo, monkeypatch):
    args = val_args(demo)
    monkeypatch.setitem(sys.modules, "wandb", None)  # None in sys.modules: `import wandb` raises ImportError
    with pytest.raises(packing.UserError, match=r"--wandb proj: .*pip install wandb"):
        train.open_loggers(dataclasses.replace(args, wandb="proj"), {}, 0)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(packing.UserError, match=r"--tensorboard: .*pip install tensorboard"):
        train.open_loggers(dataclasses.replace(args, tensorboard=True), {}, 1)  # every rank checks
    assert train.open_loggers(args, {}, 0) == []  # neither asked: nothing imported


def test_loss_plot_axes(tmp_path):
    metrics, png = str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png")
    rows = [dict(step=s, ce=10 / s, mse=1 - 0.01 * s) for s in range(1, 31)]
    rows += [dict(step=10, val_ce=2.0, val_mse=0.9), dict(step=20, val_ce=1.0, val_mse=0.8)]
    with open(metrics, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:1])
    assert train.plot_losses(metrics, png) is None and not os.path.exists(png)  # one row: nothing to draw
    with open(metrics, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"]))
    ce, mse = train.plot_losses(metrics, png).axes
    assert Image.open(png).size == (800, 400)
    assert ce.get_yscale() == "log" and mse.get_yscale() == "linear"  # ce spans 10 .. 0.33, mse 0.99 .. 0.7
    for ax, key in ((ce, "ce"), (mse, "mse")):
        assert ax.get_xlabel() == "step" and ax.get_ylabel() and len(ax.get_xticks()) > 2
        train_line, val_line = ax.get_lines()
        assert list(train_line.get_xdata()) == list(range(1, 31))
        assert list(val_line.get_xdata()) == [10, 20] and list(val_line.get_ydata()) == [r[f"val_{key}"] for r in rows[30:]]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val (held out)"]


# -------------------------------------------------------------------------------------------------
# the demo draws shapes: the prompted colour's pixels overlap the prompted shape best

def template(shape: str, size: int) -> np.ndarray:
    """A centred shape of the demo's mean radius, drawn here (not with demo_lib.draw_shape)."""
    from PIL import ImageDraw
    img = Image.new("1", (size, size), 0)
    c, r = size / 2, size * sum(demo_lib.RADIUS) / 2
    box = (c - r, c - r, c + r, c + r)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "square":
        draw.rectangle(box, fill=1)
    else:
        draw.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=1)
    return np.asarray(img)


def shape_ious(img: Image.Image, colour: str) -> dict[str, float]:
    """IoU of the pixels near `colour` (RGB distance < 100 of 441) with each shape's template."""
    x = np.asarray(img.convert("RGB"), dtype=np.float64)
    mask = np.linalg.norm(x - np.array(demo_lib.COLOURS[colour]), axis=-1) < 100
    return {s: float((mask & template(s, len(x))).sum() / max((mask | template(s, len(x))).sum(), 1))
            for s in demo_lib.SHAPES}


def shape_check(images: list[Image.Image]) -> list[tuple[str, dict]]:
    """For each demo prompt: (prompt, IoUs); raises AssertionError unless the prompted shape wins,
    with an IoU of at least 0.5 (noise or a blob of the right colour does not pass)."""
    out = []
    for img, prompt in zip(images, demo_lib.PROMPTS):
        _, colour, shape = prompt.split()
        ious = shape_ious(img, colour)
        out.append((prompt, ious))
        assert ious[shape] >= 0.5 and all(ious[shape] > v for s, v in ious.items() if s != shape), out
    return out


def test_shape_check_accepts_drawn_shapes_and_rejects_blobs():
    from PIL import ImageChops, ImageFilter

    def drawn(shape, colour, dx, dy):  # a template, shifted by a few pixels, in the prompted colour
        mask = Image.fromarray(template(shape, 64)).convert("L")
        img = Image.new("RGB", (64, 64), "white")
        img.paste(Image.new("RGB", (64, 64), demo_lib.COLOURS[colour]), mask=ImageChops.offset(mask, dx, dy))
        return img
    for dx, dy in ((0, 0), (3, -2), (-3, 3)):
        shape_check([drawn(p.split()[2], p.split()[1], dx, dy) for p in demo_lib.PROMPTS])
    blobs = [demo_lib.draw_shape("circle", p.split()[1], 64).filter(ImageFilter.GaussianBlur(4)) for p in demo_lib.PROMPTS]
    with pytest.raises(AssertionError):  # blobs of the right colour
        shape_check(blobs)
    speckles = []  # a third of each template's pixels: the right shapes win, but nothing solid is drawn
    for p in demo_lib.PROMPTS:
        keep = template(p.split()[2], 64) & (np.random.default_rng(0).random((64, 64)) < 0.35)
        speckles.append(Image.fromarray(np.where(keep[..., None], demo_lib.COLOURS[p.split()[1]], 255).astype(np.uint8)))
    with pytest.raises(AssertionError, match="a red circle"):
        shape_check(speckles)
    with pytest.raises(AssertionError):  # shapes in the wrong order
        shape_check([drawn(s, p.split()[1], 0, 0) for s, p in zip(("square", "triangle", "circle"), demo_lib.PROMPTS)])


@pytest.mark.skipif(not os.environ.get("BAGEL_DEMO_CHECK"), reason="the whole demo (minutes): BAGEL_DEMO_CHECK=1")
def test_demo_draws_the_prompted_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_lib, "VAE_STEPS", DEMO_VAE_STEPS)
    out = str(tmp_path / "demo")
    train.main(["--output-dir", out])
    args = json.load(open(os.path.join(out, "args.json")))
    samples = os.path.join(out, "samples", f"step-{args['max_steps']:07d}")
    print(shape_check([Image.open(os.path.join(samples, f"prompt-{i}.png")) for i in range(3)]))


DEMO_VAE_STEPS = demo_lib.VAE_STEPS  # the autouse fixture sets it to 0 for the other tests
