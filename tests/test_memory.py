"""
Tests for memory.py (CPU, offline): block swap (training and sampling bit-identical to no swap, slot
accounting, a deliberately broken swap caught), fp8 base weights (error on a 2304-wide model, row vs tensor
scales, bytes, no dequantised copy kept for backward, LoRA on top, fp8 files), regional compile (graph
breaks, recompiles, compiled vs eager), and prepare's order and refusals.

    python -m pytest -q test_memory.py
    python -m pytest -q -s test_memory.py -k "fp8 or recompile"     # prints the measured numbers

Bit-exact claims (torch.equal) compare two runs of the same computation on the same machine, fp32; other
errors are relative, ||a - b|| / ||b|| unless stated, each with its bound.
"""
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import lora
import lumina2
import memory
import tinyworld
import train
import weightfiles
from testutil import (TINY, assert_same_training, batch, full_width_config, loss_of, perturb_norms, ragged_batch,
                      run_sample, tiny_lora_model, train_lora)



def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def block_call(model, block, b=None):
    """The (args, kwargs) the model passes `block` in a real forward, whatever form its mask takes."""
    seen = []
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        loss_of(model, b or batch(0))
    finally:
        handle.remove()
    return seen[0]


# -----------------------------------------------------------------------------
# block swap


def test_autograd_reads_a_saved_weight_when_backward_runs():
    """The claim block swap rests on: a weight (a leaf) is saved by reference, and backward reads whatever
    its storage holds then. No snapshot is taken and no version error is raised."""
    torch.manual_seed(0)
    own, other = torch.randn(3, 4), torch.randn(3, 4)
    w = nn.Parameter(torch.zeros(3, 4), requires_grad=False)
    slot = torch.empty(3, 4)
    w.data = slot  # as BlockSwap does once at setup
    slot.copy_(own)
    x = torch.randn(2, 4, requires_grad=True)
    y = F.linear(x, w)
    slot.copy_(other)  # another block's weights now sit in the slot
    (grad_other,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert torch.equal(grad_other, torch.ones(2, 3) @ other)
    slot.copy_(own)  # resident again before backward: the exact gradient
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.ones(2, 3) @ own)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swap_training_is_bit_identical(checkpointing):
    ref, model = tiny_lora_model(), tiny_lora_model()
    if checkpointing:
        memory.enable_checkpointing(ref)
        memory.enable_checkpointing(model)
    swap = memory.swap_blocks(model, 3, "cpu")
    host_before = [[h.clone() for h in hs] for hs in swap.host]
    assert_same_training(train_lora(ref), train_lora(model))

    assert all(torch.equal(h, h0) for hs, hs0 in zip(swap.host, host_before) for h, h0 in zip(hs, hs0))  # never written
    assert [layer for phase, layer, _ in swap.ran_with if phase == "forward"] == [2, 3, 4] * 3
    assert [layer for phase, layer, _ in swap.ran_with if phase == "backward"] == [4, 3, 2] * 3
    assert all(own == layer for _, layer, own in swap.ran_with)  # every run used its own weights
    # two slot buffers, and the swapped tensors have no storage but theirs: at no moment do more than two
    # blocks' frozen weights exist outside CPU RAM; the LoRA pairs live apart from the slots
    assert len(swap.slots) == 2
    slot_storage = {t.untyped_storage().data_ptr() for slot in swap.slots for t in slot}
    for block in swap.blocks:
        assert all(t.untyped_storage().data_ptr() in slot_storage for _, t in memory.swapped_tensors(block))
    assert not {p.untyped_storage().data_ptr() for p in lora.lora_parameters(model)} & slot_storage
    copies = [e for e in swap.log if e[0] == "copy"]
    print(f"\nswap, checkpointing={checkpointing}: {len(copies)} block copies in 3 steps, {swap.block_bytes} bytes each")
    assert len(copies) == 2 + 2 * 3  # first fill, then per step one in forward and one in backward


def test_state_dict_of_a_swapped_model_holds_each_blocks_own_weights():
    ref, model = tiny_lora_model(), tiny_lora_model()
    memory.swap_blocks(model, 3, "cpu")
    loss_of(model, batch(0)).backward()  # the slots now hold some other blocks' weights
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_broken_swap_is_caught(checkpointing):
    def swapped():
        model = tiny_lora_model()
        if checkpointing:
            memory.enable_checkpointing(model)
        return model, memory.swap_blocks(model, 3, "cpu")

    model, swap = swapped()
    swap.slot_of = lambda j: 0  # a prefetch that lands in the slot the running block reads
    with pytest.raises(RuntimeError, match="layer 2 ran its forward with the weights of layer 3"):
        loss_of(model, batch(0))
    model, swap = swapped()
    swap.backward_enters = lambda j: None  # backward (and the checkpoint recompute) without residency
    loss = loss_of(model, batch(0))
    with pytest.raises(RuntimeError, match="layer 2 ran its backward with the weights of layer 4"):
        loss.backward()


def test_swap_refuses_full_finetuning_and_bad_combinations():
    model = lumina2.NextDiT(**TINY).requires_grad_(True)
    with pytest.raises(ValueError, match="layers.2.* trainable.*gradients and optimizer step would have to live in CPU RAM"):
        memory.swap_blocks(model, 3, "cpu")
    with pytest.raises(ValueError, match="between 1 and the model's 5 layers"):
        memory.swap_blocks(model, 6, "cpu")
    with pytest.raises(ValueError, match="train_mode='full'"):
        memory.check_combination(train_mode="full", blocks_to_swap=2)
    with pytest.raises(ValueError, match="fp8_base.*train_mode='full'"):
        memory.check_combination(train_mode="full", fp8=True)
    with pytest.raises(ValueError, match="FSDP"):
        memory.check_combination(blocks_to_swap=2, fsdp=True)
    with pytest.raises(ValueError, match="trainable"):
        memory.prepare(model, "cpu", fp8=True)
    memory.check_combination(train_mode="lora", fp8=True, blocks_to_swap=4, n_layers=5)


def test_sampling_with_swap_and_fp8_gives_identical_pngs(tmp_path):
    weights = tinyworld.make_demo_weights(str(tmp_path / "weights"))  # the tiny DiT has 2 layers
    png = lambda paths: open(paths[0], "rb").read()
    plain = png(run_sample(weights, tmp_path / "plain", "--seeds=[3]"))
    assert png(run_sample(weights, tmp_path / "swap1", "--seeds=[3]", "--blocks_to_swap=1")) == plain
    assert png(run_sample(weights, tmp_path / "swap2", "--seeds=[3]", "--blocks_to_swap=2")) == plain
    fp8 = png(run_sample(weights, tmp_path / "fp8", "--seeds=[3]", "--fp8_base=True"))
    assert png(run_sample(weights, tmp_path / "fp8swap", "--seeds=[3]", "--fp8_base=True", "--blocks_to_swap=2")) == fp8


# -----------------------------------------------------------------------------
# fp8 base


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    return perturb_norms(lumina2.NextDiT(**full_width_config())).eval().requires_grad_(False)


def fp8_errors(model, b):
    """-> {bf16, row, tensor}: each model's relative error against the fp32 model."""
    with torch.no_grad():
        ref = model(*b)
        out = {"bf16": rel(copy.deepcopy(model).to(torch.bfloat16)(*b), ref)}
        for granularity in ("row", "tensor"):
            q = copy.deepcopy(model).to(torch.bfloat16)
            memory.quantize_fp8(q, granularity)
            out[granularity] = rel(q(*b), ref)
    return out


def test_fp8_error_on_a_2304_wide_model_row_vs_tensor(wide):
    b = ragged_batch(B=2, cap_dim=32, L=7, lens=(7, 4), hw=(8, 8))
    plain = fp8_errors(wide, b)
    # real checkpoints have rows of very different norms; spread the rows over ~8 binades (2^(4 N(0,1)))
    spread = copy.deepcopy(wide)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in memory.blocks(spread):
            for m in block.modules():
                if type(m) is nn.Linear:
                    m.weight.mul_(torch.exp2(4 * torch.randn(m.weight.shape[0], 1, generator=g)))
    spread_err = fp8_errors(spread, b)
    print(f"\nrelative error vs fp32, 2304 wide: random init {plain}; rows spread {spread_err}")
    # e4m3 rounds each weight to within 2^-4 of itself (about 2.5% RMS); in a dot product the independent
    # errors add in quadrature like the signal, so a Linear's output carries about that relative error, and
    # the residual stream and the unquantised parts dilute it (measured ~1%, ~1.7% spread; bf16 alone ~0.6%)
    for errs in (plain, spread_err):
        assert errs["row"] < 0.05 and errs["tensor"] < 0.05
    # power-of-two scales make row and tensor equal where all rows share a binade (random init); per row
    # is never worse, and better once rows differ: small rows keep out of e4m3's subnormals
    assert plain["row"] <= plain["tensor"] and spread_err["row"] < spread_err["tensor"]


def hand_scaled_mm(x, w8, scale, bias=None):
    """What scaled_mm must give, independent of it: x quantised at the weight's granularity (per row for an (N, 1) scale,
    as a whole for a 0-d one), multiplied exactly in fp64, scaled, rounded once to bf16."""
    amax = x.double().abs().amax(-1, keepdim=True) if scale.dim() else x.double().abs().amax()
    x8 = (x.double() / (amax / 448)).float().to(torch.float8_e4m3fn).double() * (amax / 448)
    y = x8 @ (w8.double() * scale.double()).T
    return (y if bias is None else y + bias.double()).bfloat16()


def test_fp8_scaled_mm_glue_and_error(wide, monkeypatch):
    """fp8_scaled_mm: torch._scaled_mm (its CPU reference kernel here, the fp8 tensor cores on sm89+) against math written
    here, in the forms this torch's CPU kernel takes: per-tensor scales always, row-wise where offered (torch 2.13 and 2.14.1,
    not 2.11: there use_scaled_mm must refuse at once, saying why); then the 2304-wide model's bf16 forward against fp32,
    fp8 storage vs fp8 matmuls, at the finest granularity this torch offers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g) * torch.exp2(torch.randn(48, 1, generator=g))
    bias = torch.randn(48, generator=g).bfloat16()
    w8t, st = memory.quantize(w, "tensor")
    got = memory.scaled_mm(x, w8t, st, bias)
    assert got.shape == (5, 7, 48) and got.dtype == torch.bfloat16
    assert rel(got, hand_scaled_mm(x, w8t, st, bias)) < 2 ** -7  # fp32 accumulation rounded once to bf16: within a bf16 step
    problem = memory.scaled_mm_problem("cpu", torch.bfloat16)
    if problem is None:  # row-wise offered: the per-row form, and fp8_scaled_mm switches on
        w8, scale = memory.quantize(w)
        assert rel(memory.scaled_mm(x, w8, scale, bias), hand_scaled_mm(x, w8, scale, bias)) < 2 ** -7
    else:  # per-tensor only (torch 2.11's CPU kernel): refused at start-up with the kernel's reason, the glue still runs
        assert f"torch {torch.__version__}" in problem and "row-wise" in problem and "fp8_scaled_mm=False" in problem
        with pytest.raises(ValueError, match="fp8_scaled_mm needs torch._scaled_mm with row-wise scales"):
            memory.use_scaled_mm(True, "cpu", torch.bfloat16)
        assert not memory.SCALED_MM
    granularity = "row" if problem is None else "tensor"

    b = [t.bfloat16() if t.is_floating_point() else t for t in ragged_batch(B=2, cap_dim=32, L=7, lens=(7, 4), hw=(8, 8))]
    q = copy.deepcopy(wide).to(torch.bfloat16)
    memory.quantize_fp8(q, granularity)
    real, calls = memory.scaled_mm, []
    monkeypatch.setattr(memory, "scaled_mm", lambda *a: calls.append(a[1].shape) or real(*a))
    with torch.no_grad():
        ref = wide(*[t.float() if t.is_floating_point() else t for t in b])
        storage = rel(q(*b), ref)
        if problem is None:
            memory.use_scaled_mm(True, "cpu", torch.bfloat16)
        else:  # the switch use_scaled_mm refuses, thrown by hand to run the per-tensor glue through the model
            monkeypatch.setattr(memory, "SCALED_MM", True)
        calls.clear()  # use_scaled_mm's own probe of the kernel (16 x 16) is not the model's
        try:
            fast = rel(q(*b), ref)
        finally:
            memory.use_scaled_mm(False, "cpu", torch.bfloat16)
    print(f"\nfp8 2304 wide vs fp32 ({granularity} scales): fp8 storage + bf16 matmuls {storage:.4f}, fp8 matmuls {fast:.4f}")
    assert len(calls) == 17  # every fp8 Linear of the 3 blocks went through the fp8 GEMM, once
    # the input's rounding to e4m3 adds about the weights' own error again (~1%), in quadrature
    assert storage < fast < 0.05
    with pytest.raises(ValueError, match="needs fp8_base=True"):
        memory.check_combination(fp8_scaled_mm=True)


def test_fp8_scaled_mm_is_refused_at_start_up_where_it_cannot_run(tmp_path, monkeypatch):
    """bf16 only, on every device (the GEMM returns the activations' dtype; fp16/fp32 would skip it unseen), and on CUDA
    the capability torch's row-wise kernel needs: each refused by sample.py and train.py's config check before any
    weight file is read, with the dtype, the capability and the torch version in the message."""
    for dtype in (torch.float16, torch.float32):
        with pytest.raises(ValueError, match="needs a bf16 model.*" + re.escape(f"runs in {dtype} (torch {torch.__version__})")):
            memory.use_scaled_mm(True, "cpu", dtype)
    with pytest.raises(SystemExit, match="needs a bf16 model.*torch.float16"):  # the missing weight files are never reached
        run_sample({k: str(tmp_path / k) for k in ("dit", "gemma", "ae")}, tmp_path, "--dtype=float16", "--fp8_base=True",
                   "--fp8_scaled_mm=True")
    with pytest.raises(SystemExit, match="config errors:(.|\n)*needs a bf16 model.*torch.float32"):
        train.main(["--device=cpu", "--mixed_precision=no", "--fp8_base=True", "--fp8_scaled_mm=True",
                    f"--output_dir={tmp_path / 'out'}", "--train_data_dir=missing"])
    assert memory.scaled_mm_capability("2.6.0") == (9, 0) and memory.scaled_mm_capability("2.11.0+cu130") == (8, 9)
    # an Ampere card (sm86): no fp8 tensor cores; an Ada card (sm89) with a torch from before its row-wise kernel
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 6))
    problem = memory.scaled_mm_problem("cuda", torch.bfloat16)
    assert f"torch {torch.__version__} has for compute capability 8.9" in problem and "RTX 3090 has 8.6" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 9))
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    assert "torch 2.6.0+cu124 has for compute capability 9.0" in memory.scaled_mm_problem("cuda", torch.bfloat16)


def nbytes(tensors):
    return sum(t.nbytes for t in tensors)


def test_fp8_halves_the_base_weight_bytes(wide):
    model = copy.deepcopy(wide).to(torch.bfloat16)
    linears = lambda m: [t for block in memory.blocks(m) for mod in block.modules()
                         if isinstance(mod, nn.Linear) for t in (mod.weight, getattr(mod, "scale_weight", None)) if t is not None]
    whole = lambda m: nbytes([*m.parameters(), *m.buffers()])
    before, whole_before = nbytes(linears(model)), whole(model)
    n = memory.quantize_fp8(model)
    after, whole_after = nbytes(linears(model)), whole(model)
    print(f"\nfp8: {n} Linears, their bytes x{after / before:.4f} (scales included), whole DiT x{whole_after / whole_before:.4f}")
    assert n == 3 * 5 + 2 * 1  # qkv, out, w1, w2, w3 per block, plus adaLN in the two modulated blocks
    assert after <= 0.55 * before  # 1 byte per weight instead of 2, plus 4 bytes of scale per row of 2304
    scales = {k for k, _ in model.named_buffers() if k.endswith(".scale_weight")}
    assert len(scales) == n and set(model.state_dict()) == set(wide.state_dict()) | scales  # base keys unchanged


def test_fp8_backward_keeps_no_dequantised_weight(monkeypatch):
    """What is saved for backward: the fp8 bytes and the scales, never an upcast copy of a weight."""
    def saved_copies():
        model = tiny_lora_model(n_layers=2)
        memory.quantize_fp8(model)
        weights = {m.weight.numel() for block in memory.blocks(model) for m in block.modules() if hasattr(m, "scale_weight")}
        storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = loss_of(model, batch(0))
        loss.backward()
        return [t for t in saved if t.dtype not in memory.FP8_DTYPES and not t.requires_grad and t.dim() == 2 and t.numel() in weights  # W or W^T
                and t.untyped_storage().data_ptr() not in storages], [t for t in saved if t.dtype == memory.FP8]

    # 23 quantised Linears; backward needs W for the 19 whose input needs a gradient (not the context
    # refiner's qkv, fed the caption features, nor the three adaLN Linears, fed c from the frozen t_embedder)
    copies, fp8 = saved_copies()
    assert not copies and len(fp8) == 19
    naive = lambda x, w, b=None, s=None: F.linear(x, memory.dequantize(w, s, x.dtype), b) if s is not None else F.linear(x, w, b)
    monkeypatch.setattr(memory, "linear", naive)  # the obvious upcast, left to autograd: this test catches it
    copies, _ = saved_copies()
    assert len(copies) == 19


def test_lora_trains_on_an_fp8_base(tmp_path):
    model = tiny_lora_model(n_layers=2)
    ref = copy.deepcopy(model)
    memory.quantize_fp8(model)
    with torch.no_grad():  # the reference: the same LoRA on the dequantised weights, in fp32
        for m, r in zip(model.modules(), ref.modules()):
            if getattr(m, "scale_weight", None) is not None:
                r.weight.copy_(memory.dequantize(m.weight, m.scale_weight, torch.float32))
    assert isinstance(model.layers[0].attention.qkv, lora.LoRALinear) and model.layers[0].attention.qkv.weight.dtype == memory.FP8
    assert "layers.0.attention.qkv.weight" in model.state_dict()
    loss, loss_ref = loss_of(model, batch(0)), loss_of(ref, batch(0))
    assert torch.equal(loss, loss_ref)  # forward: the same F.linear on the same (exactly dequantised) weights
    loss.backward()
    loss_ref.backward()
    for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref)):
        assert rel(p.grad, q.grad) < 1e-6  # backward: grad @ W by hand vs F.linear's own backward, fp32 rounding

    # a short memorisation run in bf16, as training runs: one batch, 30 steps; the loss must fall well
    model = tiny_lora_model(n_layers=2, dtype=torch.bfloat16)
    memory.quantize_fp8(model)
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = loss_of(model, batch(0))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"\nLoRA on fp8 base, bf16, one batch: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.8 * losses[0]

    # merging into fp8 is refused, on every path; a LoRA injected after quantising keeps the scale
    lora.save_lora(ref, str(tmp_path / "l.safetensors"), dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot merge a LoRA into an fp8 base weight"):
        lora.merge(model)
    plain = lumina2.NextDiT(**dict(TINY, n_layers=2)).requires_grad_(False)
    memory.quantize_fp8(plain)
    with pytest.raises(ValueError, match="cannot merge a LoRA into an fp8 base weight"):
        lora.load_lora(plain, str(tmp_path / "l.safetensors"), merge=True)
    assert lora.load_lora(plain, str(tmp_path / "l.safetensors"), merge=False) > 0
    qkv = plain.layers[0].attention.qkv
    assert isinstance(qkv, lora.LoRALinear) and qkv.scale_weight is not None
    loss_of(plain, batch(0))


def test_fp8_with_swap_is_bit_identical_to_fp8_alone():
    ref, model = tiny_lora_model(), tiny_lora_model()
    memory.quantize_fp8(ref)
    memory.quantize_fp8(model)
    swap = memory.swap_blocks(model, 3, "cpu")
    assert_same_training(train_lora(ref), train_lora(model))
    assert {t.dtype for t in swap.slots[0]} >= {memory.FP8}  # the slots hold (and the copies move) fp8 bytes
    # the transfer against a bf16 base: 1 byte per weight, plus the scales and the bf16 norms and biases
    bf16 = [tiny_lora_model(dtype=torch.bfloat16) for _ in range(2)]
    memory.quantize_fp8(bf16[1])
    ratio = memory.BlockSwap(bf16[1].layers[2:], 2, "cpu").block_bytes / memory.BlockSwap(bf16[0].layers[2:], 2, "cpu").block_bytes
    print(f"\nfp8 + swap: bytes per block copy x{ratio:.3f} of bf16")
    assert ratio < 0.6  # per-row fp32 scales cost 4 / in_features bytes per weight: 6% at the tiny model's 64


def test_load_dit_from_fp8_and_scaled_fp8_files(tmp_path):
    torch.manual_seed(0)
    sd = perturb_norms(lumina2.NextDiT(**lumina2.DIT_PRESETS["tiny"])).state_dict()
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # plain fp8 files: every tensor stored in fp8
        path = str(tmp_path / f"{dtype}.safetensors")
        save_file({k: v.to(dtype) for k, v in sd.items()}, path)
        loaded = weightfiles.load_dit(path, dtype=torch.float32).state_dict()
        assert all(torch.equal(loaded[k], v.to(dtype).float()) for k, v in sd.items())  # the upcast is exact

    # ComfyUI's scaled fp8: 2-D weights as e4m3fn / scale_weight (an fp32 scalar, not a power of two),
    # a scale_input hint, everything else bf16, a `scaled_fp8` marker; here under an all-in-one prefix
    scaled, expected = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=memory.FP8)}, {}
    for k, v in sd.items():
        key = "model.diffusion_model." + k
        if v.dim() == 2:
            s = (v.abs().max() / 448).float()
            scaled[key], scaled[key[: -len("weight")] + "scale_weight"] = (v / s).to(memory.FP8), s
            scaled[key[: -len("weight")] + "scale_input"] = torch.ones(())
            expected[k] = scaled[key].float() * s
        else:
            scaled[key] = v.to(torch.bfloat16)
            expected[k] = scaled[key].float()
    path = str(tmp_path / "scaled.safetensors")
    save_file(scaled, path)
    loaded = weightfiles.load_dit(path, dtype=torch.float32).state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], expected[k]) for k in sd)
    assert max(rel(loaded[k], sd[k]) for k in sd if sd[k].dim() == 2) < 0.05  # and close to the original

    # memory.quantize_fp8's own state_dict (per-row scales) is such a file too
    model = weightfiles.load_dit(path, dtype=torch.float32)
    memory.quantize_fp8(model)
    path = str(tmp_path / "ours.safetensors")
    save_file({**model.state_dict(), "scaled_fp8": torch.empty(0, dtype=memory.FP8)}, path)
    again = weightfiles.load_dit(path, dtype=torch.float32)
    b = batch(0, hw=(4, 4))
    assert torch.equal(again(*b), model(*b))


# -----------------------------------------------------------------------------
# regional compile


@pytest.mark.parametrize("variant", ["lora", "lora+checkpointing", "lora+fp8"])
def test_no_graph_breaks_inside_a_block(variant):
    model = tiny_lora_model(n_layers=2)
    if "checkpointing" in variant:
        memory.enable_checkpointing(model)
    if "fp8" in variant:
        memory.quantize_fp8(model)
    kinds = (model.context_refiner[0], model.noise_refiner[0], model.layers[0]) if variant == "lora" else (model.layers[0],)
    for block in kinds:
        args, kwargs = block_call(model, block)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block.forward)(*args, **kwargs)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_regional_compile_does_not_recompile_per_caption_length():
    from torch._dynamo.testing import CompileCounter
    graphs = {}
    for dynamic in (True, False):
        torch._dynamo.reset()
        counter = CompileCounter()
        model = tiny_lora_model(n_layers=3)
        memory.compile_blocks(model, dynamic=dynamic, backend=counter)
        for L in (7, 11):  # two caption lengths: the joint sequence is L + 16 image tokens
            loss_of(model, batch(L, L=L, lens=(L, L - 3))).backward()
        graphs[dynamic] = counter.frame_count
    print(f"\ngraphs compiled for 5 blocks and two caption lengths: dynamic=True {graphs[True]}, False {graphs[False]}")
    assert graphs[True] == 3  # one per kind of block (context refiner, noise refiner, main layers), shared by all
    assert graphs[False] > graphs[True]


def test_compile_checkpointing_lora_and_swap_compose():
    """The whole stack, with dynamo + AOTAutograd (no C++ needed): the swap wraps the compiled region."""
    # no refiners and a LoRA on x_embedder (so every layer's input needs a gradient): one graph for all layers
    ref, model = (tiny_lora_model(n_refiner_layers=0, n_layers=3, embedder_dims=[4, 0, 0]) for _ in range(2))
    torch._dynamo.reset()
    memory.enable_checkpointing(model)
    memory.compile_blocks(model, backend="aot_eager")
    swap = memory.swap_blocks(model, 2, "cpu")
    for L in (7, 9):
        b = batch(L, L=L, lens=(L, L - 2))
        loss, loss_ref = loss_of(model, b), loss_of(ref, b)
        loss.backward()
        loss_ref.backward()
        assert rel(loss, loss_ref) < 1e-6  # decomposed ops: fp32 rounding only
        for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref)):
            assert rel(p.grad, q.grad) < 1e-5
    assert all(own == layer for _, layer, own in swap.ran_with) and len(swap.ran_with) == 2 * 2 * 2


# Inductor's CPU backend writes C++ for the host's vector ISA, and that part is the machine's, not ours: with
# torch 2.13 the same graph gave NaN under ATEN_CPU_CAPABILITY=avx2, failed to build under =default, and once
# aborted the whole suite on an AVX-512 Xeon. Scalar C++ (simdlen=1) builds and runs alike on every x86 and
# ARM CPU and keeps everything this test is about: the decompositions, the fusions, the symbolic sequence
# length and AOTAutograd's backward. The GPU check compiles with Triton and checks it there.
SCALAR_CPP = {"cpp.simdlen": 1}


@pytest.fixture(scope="module")
def inductor():
    try:
        with torch._inductor.config.patch(SCALAR_CPP):
            torch.compile(lambda x: x.sin() + 1)(torch.randn(8))
    except Exception as e:  # no C++ compiler: inductor cannot build a CPU kernel here
        pytest.skip(f"torch.compile (inductor) cannot build a kernel here: {type(e).__name__}: {str(e)[:200]}")


def test_compiled_blocks_match_eager(inductor):
    # one main layer and no refiners, so inductor (whose C++ build is the slow part) compiles one graph
    ref, model = tiny_lora_model(n_refiner_layers=0, n_layers=1), tiny_lora_model(n_refiner_layers=0, n_layers=1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    memory.compile_blocks(model)  # with checkpointing: test_compile_checkpointing_lora_and_swap_compose
    graphs = []
    with torch._inductor.config.patch(SCALAR_CPP):
        for L in (7, 11):
            b = batch(L, L=L, lens=(L, L - 3))
            loss, loss_ref = loss_of(model, b), loss_of(ref, b)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            loss.backward()
            loss_ref.backward()
            # inductor fuses and reorders fp32 reductions: a few ulps apart (measured <= 2e-7 on the loss and
            # <= 2e-6 on the gradients); the bounds leave 50x of room and still catch any wrong op (>= 1e-3)
            assert rel(loss, loss_ref) < 1e-5
            for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref)):
                assert rel(p.grad, q.grad) < 1e-4
                p.grad, q.grad = None, None
    assert graphs == [1, 1]  # the second caption length reused the graph


# -----------------------------------------------------------------------------
# prepare


def test_prepare_is_the_transforms_in_order():
    manual, model = tiny_lora_model(), tiny_lora_model()
    memory.quantize_fp8(manual)
    memory.enable_checkpointing(manual)
    out = memory.prepare(model, "cpu", fp8=True, checkpointing=True, blocks_to_swap=2)
    assert out is model and model.block_swap.n_slots == 2
    assert {t.dtype for t in model.block_swap.host[0]} >= {memory.FP8}  # quantised before the swap sized its slots
    assert_same_training(train_lora(manual, steps=2), train_lora(model, steps=2))
    fresh = tiny_lora_model()
    scales = {k for k in model.state_dict() if k.endswith(".scale_weight")}
    assert set(model.state_dict()) == set(fresh.state_dict()) | scales  # same keys, plus one scale per fp8 weight
    with pytest.raises(ValueError, match="between 0 and the model's 5 layers"):
        memory.prepare(tiny_lora_model(), "cpu", blocks_to_swap=9)
