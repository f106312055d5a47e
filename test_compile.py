"""--compile (regional, one compile per block kind over any pack) and --float8 (torchao, emulated on CPU)."""
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import fsdp
from model import Qwen2MoTDecoderLayer, SiglipEncoderLayer
from test_smoke import CASES, golden_batch, tiny_bagel
from test_train import one_thread, world1  # noqa: F401 (fixtures)


def losses_and_grads(model, cases) -> list[torch.Tensor]:
    got = []
    for case in cases:
        model.zero_grad(set_to_none=True)
        out = model(**golden_batch(case))
        (out["ce"].sum() + out["mse"].mean()).backward()
        got += [out["ce"].detach(), out["mse"].detach()] + [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                                                            for p in model.parameters()]
    return got


def test_compiled_blocks_compile_once_over_all_packs_without_graph_breaks(world1):
    """The golden packs (1-5 samples, with and without ViT images, VAE latents, CE tokens) through
    FSDP + activation checkpointing + compiled blocks: one compile per block kind in all, no graph
    break, and the eager model's losses and gradients. aot_eager: dynamo and the autograd of the
    attention op are what is tested, inductor's code generation is torch's (bench.py measures it)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    mesh = fsdp.make_mesh(world1, 0)
    want = losses_and_grads(fsdp.shard_model(tiny_bagel(), mesh, None, ac=True), CASES)
    got = losses_and_grads(fsdp.shard_model(tiny_bagel(), mesh, None, ac=True, compile="aot_eager"), CASES)
    compiles = {kind.__name__: len(_debug_get_cache_entry_list(kind.forward.__code__))
                for kind in (Qwen2MoTDecoderLayer, SiglipEncoderLayer)}
    assert compiles == {"Qwen2MoTDecoderLayer": 1, "SiglipEncoderLayer": 1}, compiles
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_sdpa_op_matches_the_eager_loop_and_its_backward_recomputes_nothing():
    """The compiled path's attention op against the eager loop (autograd through F.sdpa): splits that
    share keys, gathered keys, a lower-right causal split, a one-query split, GQA and an empty job.
    Its backward runs the SDPA backward kernel on the saved outputs, no attention forward."""
    from model import sdpa_jobs, sdpa_plan
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    plan = sdpa_plan([(0, 10, 0, 10, 0, 1), (10, 20, 0, 4, 1, 0), (20, 30, 4, 14, 1, 1), (30, 31, 0, 31, 0, 1),
                      (31, 40, 20, 40, 0, 1), (40, 40, 0, 0, 0, 0)], torch.tensor([0, 1, 2, 3, *range(10, 20)]), "cpu")
    want = sdpa_jobs(q, k, v, plan.jobs, plan.keys)
    dout = torch.randn(want.shape, generator=g)
    got = torch.ops.bagel.packed_sdpa(q, k, v, plan.jobs, plan.keys)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.profiler.profile() as prof:
        grads = torch.autograd.grad(got, (q, k, v), dout)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in names, "the backward recomputed the forward"
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_explain_finds_no_graph_break_in_either_block():
    """torch._dynamo.explain on one decoder layer and one ViT layer, as the model calls them."""
    model = tiny_bagel()
    seen = {}
    hooks = [layers[0].register_forward_pre_hook(lambda m, a, kind=kind: seen.setdefault(kind, (m, a)) and None)
             for kind, layers in (("llm", model.language_model.model.layers), ("vit", model.vit_model.vision_model.encoder.layers))]
    model(**golden_batch("case6_pack"))
    for h in hooks:
        h.remove()
    for kind, (layer, args) in seen.items():
        torch._dynamo.reset()
        ex = torch._dynamo.explain(lambda *a: layer(*a))(*args)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, (kind, ex.break_reasons)


def test_step_flops_reads_host_side_numbers_only():
    """train.step_flops (the log's MFU and bench.py's) takes the ViT lengths from the layout collate
    ships on the host: a device tensor read per image would stall the GPU every step."""
    import train
    from test_train import make_batches
    from test_smoke import TINY
    b = make_batches(0)[0][0]
    assert b["vit_token_seqlens"].numel()  # the pack has ViT images
    want = train.step_flops(TINY, [{**b, "attention_layout": None}])  # read from the tensor
    b["vit_token_seqlens"] = None  # what a device tensor is to the host: not to be read
    assert train.step_flops(TINY, [b]) == want > 0


F8_TOL = 0.05  # relative loss gap to bf16 after a few steps: e4m3 keeps 3 mantissa bits (2^-4 steps)


def test_float8_emulated_tracks_bf16_and_saves_plain_weights(world1, tmp_path):
    """--float8 tensorwise, emulated (CPU), with FSDP and activation checkpointing: the decoder
    projections of both experts are converted (not lm_head, the ViT or the connector) and all-gathered
    in float8, five AdamW steps on the golden packs track bf16 within F8_TOL, the checkpoint (model,
    optimizer, EMA) holds plain tensors under the official names, which a process without torchao
    reads and a model built without float8 loads strictly, and a load refreshes the weights' scales."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    import train
    from packing import UserError
    mesh = fsdp.make_mesh(world1, 0)
    with pytest.raises(UserError, match="needs a GPU with float8 matmuls .* --float8-emulate"):
        fsdp.shard_model(tiny_bagel(), mesh, torch.bfloat16, float8="tensorwise")
    runs = {}

    def step(model, opt, case):
        out = model(**golden_batch(case))
        loss = sum(t.float().sum() / max(t.numel(), 1) for t in (out["ce"], out["mse"]))  # a pack may lack one
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    # eager: the GPU check's CPU run covers float8 under --compile; compiling here would cost more than the rest
    for f8 in ("", "tensorwise"):
        model = fsdp.shard_model(tiny_bagel(), mesh, torch.bfloat16, float8=f8, float8_emulate=True)
        opt, _ = train.make_optimizer(model, train.OptimConfig(lr=1e-3, warmup_steps=0), 10)
        runs[f8] = model, opt, torch.tensor([step(model, opt, CASES[i % len(CASES)]) for i in range(5)])
    model, opt, f8_losses = runs["tensorwise"]
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert len(converted) == 2 * 2 * 7  # layers x experts x (q, k, v, o, gate, up, down)
    assert all(".layers." in n and "language_model" in n for n in converted)
    gathered = {n for n, p in model.named_parameters() if type(p.to_local()).__name__ == "WeightWithDynamicFloat8CastTensor"}
    assert len(gathered) == len(converted), "float8 all-gather is off"
    gap = ((f8_losses - runs[""][2]).abs() / runs[""][2]).max().item()
    print(f"float8 vs bf16 loss gap over 5 steps: {gap:.2%}")
    assert 1e-3 < gap < F8_TOL, gap  # ~0: float8 did not run at all
    ck = str(tmp_path / "ck")
    fsdp.save_checkpoint(ck, model, opt, fsdp.ema_init(model), {}, {}, world1, {}, {})
    # a load puts back the weights and the float8 scales computed from them (a stale scale changes the loss)
    full = lambda: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    snapshot = {k: v.clone() for k, v in full().items()}
    want = step(model, opt, CASES[1])
    fsdp.load_checkpoint(ck, model, opt, fsdp.ema_init(model), world1)
    assert all(torch.equal(v, snapshot[k]) for k, v in full().items())
    assert step(model, opt, CASES[1]) == want
    plain = tiny_bagel(seed=1)  # a model without float8, its state dict of plain tensors
    sd = {k: v.clone() for k, v in plain.state_dict().items() if k in fsdp.trained_state_dict(model)}
    import torch.distributed.checkpoint as dcp
    dcp.load({"model": sd}, checkpoint_id=ck)
    plain.load_state_dict(sd, strict=False)
    assert set(sd) == set(snapshot) and all(torch.equal(sd[k], snapshot[k].float()) for k in sd)
    # every entry, and what convert_weights.py exports, read in a process where torchao cannot be imported
    read = ("import sys; sys.modules['torchao'] = None; import torch; from convert_weights import dcp_sources; "
            "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
            f"dcp_to_torch_save({ck!r}, {ck!r} + '.pt'); sd = torch.load({ck!r} + '.pt', weights_only=True); "
            "print(sorted(sd), sum(s.read().numel() for s in dcp_sources(%r, 'model').values()))" % ck)
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, cwd=os.path.dirname(fsdp.__file__))
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.split("]")[-1].strip() == str(sum(v.numel() for v in sd.values()))
    assert all(f"'{k}'" in out.stdout for k in ("model", "optim", "ema")), out.stdout


def test_flex_compiles_once_over_pack_lengths():
    """The BlockMask's sizes are dynamic from the first compile: flex alone (what the eager model
    calls) and flex traced into a compiled block compile once each over packs of 3 to 9 blocks."""
    from model import any_rows, packed_attention, plan_attention
    from torch._dynamo.utils import counters
    qkv = lambda x: x.unflatten(1, (8, 16)).split([4, 2, 2], dim=1)  # [N, 128] -> q [N, 4, 16], k, v [N, 2, 16]
    block = torch.compile(lambda plan, x: packed_attention(plan, *qkv(x)))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch.compiler.set_stance(force_backend="eager"):  # the guards are dynamo's
        for n in (300, 700, 1100):
            plan = plan_attention("flex", [n // 3, n - n // 3], [n // 3, n - n // 3], ["full", "causal"], "cpu")
            x = torch.randn(n, 128)
            q, k, v = qkv(x)
            want = packed_attention(plan_attention("sdpa", [n // 3, n - n // 3], [n // 3, n - n // 3],
                                                   ["full", "causal"], "cpu"), q, k, v)
            torch.testing.assert_close(packed_attention(plan, q, k, v), want, rtol=1e-5, atol=1e-5)
            any_rows(None, (x,))  # what a compiled block's pre-hook marks: its rows are any number
            torch.testing.assert_close(block(plan, x), want, rtol=1e-5, atol=1e-5)
    assert counters["frames"]["ok"] == 2, dict(counters["frames"])


def test_compiled_flex_block_lowers_on_cpu_and_matches_sdpa(world1):
    """Inductor's CPU flex template reads q/k/v as 4-D buffers: a transposed view of a padded [N, H, D]
    tensor failed to lower ("expected 4, got 3"), so packed_attention pads after the transpose. No
    flex backward on CPU: forward only."""
    torch._dynamo.reset()
    b = golden_batch("case6_pack")
    with torch.no_grad():
        want = tiny_bagel()(**b)  # eager sdpa
        model = fsdp.shard_model(tiny_bagel(), fsdp.make_mesh(world1, 0), None, ac=False, compile=True)
        model.attn = "flex"
        got = model(**b)
    for k in ("ce", "mse"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)


def test_float8_without_torchao_names_the_package(monkeypatch):
    from packing import UserError
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without it imports
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UserError, match="optional package torchao: pip install torchao"):
        fsdp.float8_linears(tiny_bagel(), "tensorwise", emulate=True)
