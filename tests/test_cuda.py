"""
The CUDA test tier: what only a GPU can show, on small models (seconds each on an H200), and the CPU twins
that check, on any machine, the logic those tests stand on.

    python -m pytest -q -m cuda test_cuda.py -rs    # the CUDA tests; without a GPU each one skips, saying why
    python -m pytest -q test_cuda.py                # the CPU twins (and the CUDA tests where there is a GPU)
    python bench.py --check=True                    # the GPU check: pytest -q -m cuda over every test file

CUDA tests: bf16 against fp32 per module (NextDiT 2304 wide, the FLUX AE, Gemma-2); training through block swap
with its copy stream and events, bit-identical to no swap while each stream in turn is held back (so a missing
wait would race); fp8 base weights, with bf16 matmuls and with fp8 GEMMs (torch._scaled_mm); inductor's Triton
kernels against eager, without a recompile per caption length; the fused-only SDPA guard through a CFG step
and a masked training step. CPU twins: the swap's stream/event protocol replayed on a fake CUDA (and three
broken variants caught), the guard's routes and kernels on the CPU's fused kernel, the AE and Gemma bf16 bounds.

Tolerances, and why:
  fp32 against fp32 through the same kernels (swap vs no swap): torch.equal. A swap moves bytes and must change
      none. Deterministic algorithms are on, so no atomic accumulation (memory-efficient attention's backward
      may split the keys) can make two identical runs differ.
  fp32 compiled vs eager: ||a - b|| / ||b|| < 1e-5 on the loss, < 1e-4 on the LoRA gradients, test_memory's CPU
      bounds: inductor fuses and reorders fp32 reductions, a few ulps of 2^-24 that backward spreads; a wrong op
      is >= 1e-3.
  bf16 against fp32 on the same bf16-rounded weights (the fp32 side in IEEE fp32, data.exact_fp32: no TF32 in
      cuDNN's convolutions), max|a - b| / max|b| as in test_parity: one bf16 rounding is <= 2^-8 = 3.9e-3 relative,
      and they accumulate with depth. NextDiT (three blocks) <= 2e-2, measured 4.7e-3 to 6.4e-3 on the CPU;
      Gemma (two layers, activations up to ~6) <= 4e-2, measured 1.1e-2 to 1.2e-2; the AE (about 25 convolutions
      and group norms in a row, random weights) <= 1e-1, measured 1.1e-2 to 4.2e-2 over five seeds. CUDA's bf16
      kernels accumulate in fp32 as the CPU's do; a wrong op (a dropped norm, an ignored mask) is O(1).
  fp8 (e4m3, per-row scales) against bf16 and fp32: ||a - b|| / ||b|| < 0.05, test_memory's CPU bound: e4m3
      rounds each weight to within 2^-4 of itself (~2.5% RMS), which the residual stream dilutes (~1% measured).
  a bf16 CFG step against its fp32 math-attention reference (cond and uncond run alone, unpadded): <= 6e-2,
      max-relative: the guided velocity 4 v_c - 3 v_u carries up to 7 times one forward's bf16 error (measured
      on the CPU: 2.1e-2 at 2304 wide, 2.2e-2 to 2.7e-2 tiny); attending to the padded caption keys, the bug the
      mask exists for, gives 0.2.
"""
import contextlib
import copy
import os
from collections import Counter, defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import lora
import lumina2
import memory
import sample
import tinyworld
import weightfiles
from testutil import (assert_same_training, batch, full_width_config, loss_of, perturb_norms, ragged_batch, rel_err,
                      tiny_lora_model, train_lora)

# under torch.use_deterministic_algorithms (the swap test) torch wants cuBLAS on a fixed workspace, named by this
# variable, and warns at every matmul without it; it reads the variable once, at the process's first cuBLAS call,
# so it is set here, at collection, before any test has run a kernel
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]  # a CPU twin and its CUDA test

DIT_BOUND, GEMMA_BOUND, AE_BOUND, FP8_BOUND, CFG_BOUND = 2e-2, 4e-2, 1e-1, 0.05, 6e-2


@pytest.fixture(autouse=True)
def restore_attention():
    """set_attention() writes module state: every test leaves it as it found it."""
    saved = lumina2.ATTENTION, dict(lumina2.ROUTES)
    yield
    lumina2.ATTENTION = saved[0]
    lumina2.ROUTES.clear()
    lumina2.ROUTES.update(saved[1])


@pytest.fixture(autouse=True)
def one_thread():
    """These models' CPU ops are far too small for threads; on one thread the CPU twins' time does not depend on
    what else the machine runs (two OpenMP threads on two busy cores wait on each other at every op)."""
    kept = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(kept)


def rel(a, b):
    """||a - b|| / ||b|| in fp32 (test_memory's measure for fp8 and compile)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms for the block, restored after. warn_only: an op without a deterministic
    kernel warns instead of raising, and the bit-exact comparison then says whether it mattered."""
    kept = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(kept[0], warn_only=kept[1])


# -----------------------------------------------------------------------------
# models, batches and a training loop (built on the CPU, then placed, as the scripts do)


def assert_swap_ran_right(swap, steps=3):
    """Each step ran swapped layers 2, 3, 4 forward and 4, 3, 2 backward, each with its own weights, through two
    slots; per step one copy in forward and one in backward, after the first fill of both slots."""
    assert [layer for phase, layer, _ in swap.ran_with if phase == "forward"] == [2, 3, 4] * steps
    assert [layer for phase, layer, _ in swap.ran_with if phase == "backward"] == [4, 3, 2] * steps
    assert all(own == layer for _, layer, own in swap.ran_with)
    assert len(swap.slots) == 2
    assert len([e for e in swap.log if e[0] == "copy"]) == 2 + 2 * steps


def bf16_pair(model, device):
    """-> (model in bf16, the same bf16-rounded weights in fp32), both on device: the pair measures bf16
    compute alone, not the rounding of the weights."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    return low.to(device), copy.deepcopy(low).float().to(device)


@pytest.fixture(scope="module")
def wide():
    """2304 wide, 24/8 heads of 96 (the 2B's attention shapes), one layer of each kind, fp32 on the CPU."""
    torch.manual_seed(0)
    return perturb_norms(lumina2.NextDiT(**full_width_config())).eval().requires_grad_(False)


def wide_batch(device):
    return tuple(t.to(device) for t in ragged_batch(B=2, cap_dim=32, L=7, lens=(7, 4), hw=(8, 8)))


# -----------------------------------------------------------------------------
# bf16 against fp32, per module


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_dit_stays_near_fp32(wide):
    low, ref = bf16_pair(wide, "cuda")
    b = wide_batch("cuda")
    lumina2.set_attention("sdpa", torch.bfloat16, "cuda")
    with torch.no_grad():
        got = low(*b)
        with data.exact_fp32():
            want = ref(*b)
    err = rel_err(got, want)
    print(f"\nCUDA NextDiT 2304 wide, bf16 vs fp32 (same weights), ragged batch: rel err {err:.2e}")
    assert got.dtype == torch.float32 and err <= DIT_BOUND


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_ae_stays_near_fp32(device):
    torch.manual_seed(0)
    low, ref = bf16_pair(perturb_norms(lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"])).eval(), device)
    img = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
    with torch.no_grad():
        with data.exact_fp32():
            lat = ref.encode(img)  # (2, 16, 8, 8)
            decoded = ref.decode(lat)
        enc_err, dec_err = rel_err(low.encode(img), lat), rel_err(low.decode(lat), decoded)
    print(f"\n{device} AE bf16 vs fp32 (same weights): encode rel err {enc_err:.2e}, decode {dec_err:.2e}")
    assert lat.shape == (2, 16, 8, 8) and enc_err <= AE_BOUND and dec_err <= AE_BOUND


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_gemma_stays_near_fp32(weights, device):
    low = weightfiles.load_text_encoder(weights["gemma"], dtype=torch.bfloat16, device=device)
    ref = weightfiles.load_text_encoder(weights["gemma"], dtype=torch.float32, device=device)
    with torch.no_grad():  # the file is fp16: give the fp32 model the bf16-rounded weights
        for p, q in zip(ref.parameters(), low.parameters()):
            p.copy_(q.float())
    captions = tinyworld.DEMO_SENTENCES[:3]  # 65, 63 and 72 tokens with the system prompt: padded rows
    feats, mask = low(captions)
    with data.exact_fp32():
        want, want_mask = ref(captions)
    err = rel_err(feats[mask], want[want_mask])
    print(f"\n{device} Gemma features bf16 vs fp32 (same weights): rel err {err:.2e}")
    assert feats.dtype == torch.bfloat16 and feats.device.type == device
    assert torch.equal(mask, want_mask) and not mask.all() and err <= GEMMA_BOUND


# -----------------------------------------------------------------------------
# block swap: on CUDA with the copy stream; its stream/event protocol on a fake CUDA


def hold_back(model, swap, cycles=200_000_000):
    """A forward pre-hook on the first main layer (unswapped, and after NextDiT.forward's host syncs) that queues a
    GPU sleep of ~0.1 s on the compute stream in the first step and on the copy stream in the second. The host
    then runs ahead of the held stream, so the races the events prevent would really happen: in step 1 a copy
    that did not wait for used[s] would overwrite weights a queued block has still to read; in step 2 a block that
    did not wait for copied[s] would read its slot before the delayed copy lands."""
    held = iter([torch.cuda.current_stream(), swap.copy_stream])

    def hook(module, args):
        stream = next(held, None)
        if stream is not None:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(cycles)
    return model.layers[0].register_forward_pre_hook(hook)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_swap_training_is_bit_identical(checkpointing):
    ref, model = tiny_lora_model(), tiny_lora_model()
    if checkpointing:
        memory.enable_checkpointing(ref)
        memory.enable_checkpointing(model)
    ref.to("cuda")
    swap = memory.swap_blocks(model, 3, "cuda")
    assert swap.cuda and swap.copy_stream != torch.cuda.current_stream()  # the copies have a stream of their own
    assert all(h.is_pinned() for hs in swap.host for h in hs)  # pinned: a non_blocking copy is truly asynchronous
    assert all(t.is_cuda for slot in swap.slots for t in slot)
    assert all(p.is_cuda for p in model.parameters() if p.requires_grad) and model.x_embedder.weight.is_cuda
    hook = hold_back(model, swap)
    with deterministic():
        assert_same_training(train_lora(ref, device="cuda"), train_lora(model, device="cuda"))
    hook.remove()
    assert_swap_ran_right(swap)


class FakeStream:
    """A torch.cuda.Stream whose work is what FakeCuda logs while it is current."""

    def __init__(self, fake, name):
        self.fake, self.name = fake, name

    def wait_event(self, event):
        self.fake.log.append(("wait", self.name, event))


class FakeEvent:
    def __init__(self, fake):
        self.fake, self.label = fake, "event"

    def record(self, stream=None):
        self.fake.log.append(("record", (stream or self.fake.current).name, self))


class FakeCuda:
    """torch.cuda's stream API for a CPU run, written into one log in host order: every event record, stream wait,
    and (through SlotAccesses) every copy into a swap slot and every kernel that reads one, each with the stream
    current at the time. The CPU runs it all at once, in order; hazards() asks what a GPU could overlap."""

    def __init__(self):
        self.log, self.pinned = [], 0
        self.compute = FakeStream(self, "compute")
        self.current = self.compute

    def Stream(self, device=None):
        return FakeStream(self, "copy")

    def Event(self, **kwargs):
        return FakeEvent(self)

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        kept, self.current = self.current, s
        try:
            yield
        finally:
            self.current = kept

    def pin_memory(self, tensor, *args):
        self.pinned += 1
        return tensor.clone()  # a copy, as pinning makes one


def fake_cuda_swap(model, n, monkeypatch):
    """memory.swap_blocks(model, n, "cuda") with its CUDA branches on (copy stream, events, pinned host copies)
    while every tensor stays on the CPU. -> (BlockSwap, FakeCuda)."""
    fake = FakeCuda()
    for name in ("Stream", "Event", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    empty_like = torch.empty_like
    with monkeypatch.context() as placement:  # only while the swap is built: slots and model stay on the CPU
        placement.setattr(torch.Tensor, "pin_memory", lambda t, *a: fake.pin_memory(t, *a))
        placement.setattr(torch, "empty_like", lambda t, *a, device=None, **k: empty_like(t, *a, **k))
        placement.setattr(model, "to", lambda *a, **k: model)
        swap = memory.swap_blocks(model, n, "cuda")
    for kind in ("copied", "used"):
        for s, event in enumerate(getattr(swap, kind)):
            event.label = f"{kind}[{s}]"
    return swap, fake


class SlotAccesses(TorchDispatchMode):
    """Logs every aten op that touches a slot's storage into fake.log: a copy_ into it is a write, any other op
    (a matmul reading a weight, a view of one saved for backward) a read, with the stream current at the time.
    Dispatch modes see the ops autograd runs in backward and the checkpoint recomputes too."""

    def __init__(self, fake, swap):
        super().__init__()
        self.fake = fake
        self.slot_of = {t.untyped_storage().data_ptr(): s for s, slot in enumerate(swap.slots) for t in slot}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        slots = [self.slot_of.get(t.untyped_storage().data_ptr()) for t in tensors]
        stream = self.fake.current.name
        if func is torch.ops.aten.copy_.default and slots[0] is not None:
            self.fake.log.append(("write", stream, slots[0]))
        else:
            self.fake.log += [("read", stream, s) for s in sorted({s for s in slots if s is not None})]
        return func(*args, **kwargs)


def hazards(log):
    """Replay the log as a GPU orders it: each stream runs its own work in order; a stream that waits on an event
    runs its later work after everything the recording stream had queued before the record, and after what that
    stream had itself waited for (a wait on an event never recorded orders nothing, as cudaStreamWaitEvent).
    -> the slot accesses a GPU could overlap with a conflicting one: a copy into a slot while a kernel that read
    it may still run (write after read), a kernel reading a slot whose copy may not be done (read after write)."""
    queued = Counter()  # stream -> its slot accesses so far
    after = defaultdict(int)  # (a, b) -> stream a's later work runs after the first `after` accesses of stream b
    marks = {}  # event -> (stream, its accesses at the last record, that stream's own `after` then)
    last_write, reads, found = {}, defaultdict(list), []
    for i, (kind, stream, what) in enumerate(log):
        if kind == "record":
            marks[what] = (stream, queued[stream], {b: n for (a, b), n in after.items() if a == stream})
        elif kind == "wait":
            if what in marks:
                source, n, known = marks[what]
                for b, m in [(source, n), *known.items()]:
                    after[stream, b] = max(after[stream, b], m)
        else:
            queued[stream] += 1
            here = queued[stream]
            if kind == "write":
                found += [f"log[{i}]: a copy into slot {what} on the {stream} stream may overwrite it while a {s} "
                          f"kernel still reads it" for s, at in reads[what] if s != stream and after[stream, s] < at]
                last_write[what], reads[what] = (stream, here), []
            else:
                source, at = last_write.get(what, (None, 0))
                if source is None:
                    found.append(f"log[{i}]: a {stream} kernel reads slot {what} before anything was copied into it")
                elif source != stream and after[stream, source] < at:
                    found.append(f"log[{i}]: a {stream} kernel reads slot {what} while its copy may still be running")
                reads[what].append((stream, here))
    return found


def copy_batches(log):
    """[(slot, label of the copy stream's last wait before it)] per block copy (a run of writes into one slot)."""
    out, wait, previous = [], None, None
    for kind, stream, what in log:
        if kind == "wait" and stream == "copy":
            wait = what.label
        elif kind == "write" and previous != (kind, what):
            out.append((what, wait))
            wait = None
        previous = (kind, what)
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swap_stream_protocol_on_a_fake_cuda(checkpointing, monkeypatch):
    """The CPU twin of test_cuda_swap_training_is_bit_identical: BlockSwap's CUDA branches run (copy stream,
    copied/used events, pinned host copies) with every tensor on the CPU, and the log of slot accesses, records
    and waits, replayed in GPU order, has no hazard: every copy into slot s is ordered after the kernels that
    read s before it (the copy stream waits on used[s], recorded after them), and every kernel reading s after
    the copy that filled it (the compute stream waits on copied[s] before each block that runs from s)."""
    ref, model = tiny_lora_model(), tiny_lora_model()
    if checkpointing:  # then backward also recomputes each block's forward from its slot
        memory.enable_checkpointing(ref)
        memory.enable_checkpointing(model)
    swap, fake = fake_cuda_swap(model, 3, monkeypatch)
    assert swap.cuda and fake.pinned == sum(len(hs) for hs in swap.host)
    with SlotAccesses(fake, swap):
        swapped = train_lora(model, steps=2)  # the first fill, then the steady rotation
    assert_same_training(train_lora(ref, steps=2), swapped)  # with the CUDA branches on, still bit-identical
    assert_swap_ran_right(swap, steps=2)

    log = fake.log
    writes = [e for e in log if e[0] == "write"]
    assert writes and {stream for _, stream, _ in writes} == {"copy"}  # every copy on the copy stream
    assert {stream for kind, stream, _ in log if kind == "read"} == {"compute"}
    assert len(writes) == (2 + 2 * 2) * len(swap.names)  # one copy_ per swapped tensor of each block copy
    batches = copy_batches(log)
    assert [s for s, _ in batches] == [s for event, _, s in swap.log if event == "copy"]
    assert all(wait == f"used[{s}]" for s, wait in batches)  # each block copy right after a wait on its slot's used
    assert any(kind == "wait" and stream == "compute" and event.label.startswith("copied") for kind, stream, event in log)
    assert hazards(log) == []


def no_wait_for_used(swap):
    """load() without copy_stream.wait_event(used[s]), the only wait the copy stream makes."""
    swap.copy_stream.wait_event = lambda event: None


def used_never_recorded(swap):
    """ran() without used[s].record(...): the copy stream then waits on events that order nothing."""
    for event in swap.used:
        event.record = lambda stream=None: None


def no_wait_for_copied(swap):
    """ensure() without current_stream().wait_event(copied[s]): a block may start before its weights arrive."""
    swap.ensure = swap.load


WRITE_AFTER_READ = "may overwrite it while a compute kernel still reads it"
READ_AFTER_WRITE = "while its copy may still be running"
BROKEN = {"no_wait_for_used": (no_wait_for_used, WRITE_AFTER_READ),
          "used_never_recorded": (used_never_recorded, WRITE_AFTER_READ),
          "no_wait_for_copied": (no_wait_for_copied, READ_AFTER_WRITE)}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_stream_protocol_is_caught(broken, monkeypatch):
    """Each variant runs correctly on the CPU, where every copy finishes before the next line, so the numbers
    cannot catch it; on a GPU it would race. The replay must."""
    ref, model = tiny_lora_model(), tiny_lora_model()
    swap, fake = fake_cuda_swap(model, 3, monkeypatch)
    breaks, hazard = BROKEN[broken]
    breaks(swap)
    with SlotAccesses(fake, swap):
        loss = loss_of(model, batch(0))
        loss.backward()
    loss_ref = loss_of(ref, batch(0))
    loss_ref.backward()
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref)))
    found = hazards(fake.log)
    assert found and any(hazard in f for f in found), found


# -----------------------------------------------------------------------------
# fp8 base weights and inductor on CUDA


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("matmul", ["bf16", "scaled_mm"])
def test_cuda_fp8_base_error_on_a_2304_wide_model(matmul, wide, monkeypatch):
    """fp8 base weights on the GPU: stored in fp8 and upcast for bf16 matmuls (fp8_base), and with fp8_scaled_mm
    run as fp8 GEMMs on the tensor cores (torch._scaled_mm, sm89+), which test_memory checks on the CPU's
    reference kernel only."""
    if matmul == "scaled_mm" and (problem := memory.scaled_mm_problem("cuda", torch.bfloat16)):
        pytest.skip(problem)  # the capability, the torch version and the kernel's own word
    monkeypatch.setattr(memory, "SCALED_MM", False)  # off now, and off again at teardown whatever use_scaled_mm sets
    real, calls = memory.scaled_mm, []
    monkeypatch.setattr(memory, "scaled_mm", lambda *a: calls.append(a[1].shape) or real(*a))
    plain = copy.deepcopy(wide).to(torch.bfloat16)
    fp8 = copy.deepcopy(plain)
    n = memory.quantize_fp8(fp8)  # on the CPU, before placement, as memory.prepare does
    plain, fp8, ref = plain.to("cuda"), fp8.to("cuda"), copy.deepcopy(wide).to("cuda")
    quantised = [m for block in memory.blocks(fp8) for m in block.modules() if getattr(m, "scale_weight", None) is not None]
    assert n == len(quantised) == 3 * 5 + 2  # qkv, out, w1, w2, w3 per block, plus adaLN in the two modulated blocks
    assert all(m.weight.dtype == memory.FP8 and m.weight.is_cuda and m.scale_weight.is_cuda for m in quantised)
    b = wide_batch("cuda")
    lumina2.set_attention("sdpa", torch.bfloat16, "cuda")
    with torch.no_grad():
        bf16, storage = plain(*b), fp8(*b)  # fp8 storage, bf16 matmuls
        memory.use_scaled_mm(matmul == "scaled_mm", "cuda", torch.bfloat16)
        got = fp8(*b)
        with data.exact_fp32():
            want = ref(*b)
    errs = dict(fp8_vs_fp32=rel(got, want), fp8_vs_bf16=rel(got, bf16), bf16_vs_fp32=rel(bf16, want),
                storage_vs_fp32=rel(storage, want))
    print(f"\nCUDA fp8 base ({matmul} matmuls), 2304 wide: {', '.join(f'{k} {v:.2e}' for k, v in errs.items())}")
    assert errs["fp8_vs_fp32"] < FP8_BOUND and errs["fp8_vs_bf16"] < FP8_BOUND
    assert errs["storage_vs_fp32"] > errs["bf16_vs_fp32"]  # the fp8 rounding is there: the weights really are fp8
    if matmul == "bf16":
        assert not calls and torch.equal(got, storage)
    else:  # every fp8 Linear of the 3 blocks went through the fp8 GEMM once, and the input's rounding to e4m3
        # adds about the weights' own error again, in quadrature (test_memory: 1.04% -> 1.25% on the CPU)
        assert len(calls) == 17 and errs["storage_vs_fp32"] < errs["fp8_vs_fp32"]


@pytest.fixture
def triton_compiles():
    try:
        torch.compile(lambda x: x.sin() + 1)(torch.randn(8, device="cuda"))
    except Exception as e:  # no Triton, or no C compiler for its launcher: the machine's, not this code's
        pytest.skip(f"torch.compile (inductor) cannot build a Triton kernel here: {type(e).__name__}: {str(e)[:200]}")


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_blocks_match_eager(triton_compiles):
    # one main layer and no refiners: inductor compiles one graph (and its backward) with Triton
    ref = tiny_lora_model(n_refiner_layers=0, n_layers=1).to("cuda")
    model = tiny_lora_model(n_refiner_layers=0, n_layers=1).to("cuda")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    memory.compile_blocks(model)
    graphs = []
    # joint lengths 23 and 27: both odd, like most captions, so no alignment guard of the masked SDPA (which pads
    # a bias whose row is not a multiple of 8) tells them apart; a recompile here is one per caption length
    for L in (7, 11):
        b = batch(L, L=L, lens=(L, L - 3), device="cuda")
        loss, loss_ref = loss_of(model, b), loss_of(ref, b)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        loss.backward()
        loss_ref.backward()
        grad_errs = [rel(p.grad, q.grad) for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref))]
        print(f"\nCUDA inductor vs eager, caption {L}: loss rel err {rel(loss, loss_ref):.2e}, grads max {max(grad_errs):.2e}")
        assert rel(loss, loss_ref) < 1e-5 and max(grad_errs) < 1e-4
        for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref)):
            p.grad, q.grad = None, None
    assert graphs == [1, 1]  # the second caption length reused the graph


# -----------------------------------------------------------------------------
# the fused-only SDPA guard through sampling and training, in bf16


def expected_routes(model, forwards):
    """The routes of `forwards` masked bf16 forwards under sdpa: the context refiner and the main layers read
    the caption mask (K/V expanded to the query heads, additive bias), the noise refiner runs unmasked (native GQA)."""
    masked = len(model.context_refiner) + len(model.layers)
    return {"sdpa-expanded-masked": forwards * masked, "sdpa-gqa-unmasked": forwards * len(model.noise_refiner)}


def sdpa_kernels(run):
    """run() under the profiler -> (its result, the names of the SDPA implementations it dispatched:
    aten::_scaled_dot_product_{flash,efficient,cudnn}_attention..., or _scaled_dot_product_attention_math)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = run()
    return out, {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def guided_inputs(device, cap_dim=32):
    """x (1, 16, 8, 8); cond (1, 9) and uncond (1, 4) caption features, every token valid: the batch of two
    cfg_velocity builds from them is right-padded and masked."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    cond = (torch.randn(1, 9, cap_dim, generator=g), torch.ones(1, 9, dtype=torch.bool))
    uncond = (torch.randn(1, 4, cap_dim, generator=g), torch.ones(1, 4, dtype=torch.bool))
    move = lambda c: tuple(t.to(device) for t in c)
    return x.to(device), move(cond), move(uncond)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_cfg_step_and_masked_training_take_only_fused_sdpa(device, monkeypatch):
    """On CUDA with attention='sdpa' in bf16, a CFG step and a masked training step run only fused SDPA kernels:
    the guard did not raise, every call took the expected route, and no math kernel ran. The CPU twin turns
    the guard on for the CPU's fused (flash) kernel, with the tiny model."""
    if device == "cpu":
        monkeypatch.setattr(lumina2, "fused_sdpa_only", lambda d: True)
    cfg = full_width_config() if device == "cuda" else dict(lumina2.DIT_PRESETS["tiny"], cap_feat_dim=32)
    torch.manual_seed(0)
    base = perturb_norms(lumina2.NextDiT(**cfg)).eval().requires_grad_(False).to(torch.bfloat16)
    trainee = copy.deepcopy(base)
    lora.inject(trainee, rank=4)  # after the bf16 cast: the LoRA pair stays fp32
    with torch.no_grad():
        for m in lora.lora_modules(trainee).values():
            m.lora_up.weight.normal_(0, 0.02)
    sampler, trainee = copy.deepcopy(base).to(device), trainee.to(device)
    x, cond, uncond = guided_inputs(device)
    train_batch = tuple(t.to(device) for t in ragged_batch(B=2, cap_dim=32, L=7, lens=(7, 4), hw=(8, 8)))

    def sample_then_train():
        with torch.no_grad():
            v = sample.cfg_velocity(sampler, x, 0.6, cond, uncond, cfg=4.0, renorm=0.0)  # t = 0.4
        loss_of(trainee, train_batch).backward()
        return v

    lumina2.set_attention("sdpa", torch.bfloat16, device)  # clears ROUTES
    v, kernels = sdpa_kernels(sample_then_train)
    print(f"\n{device} bf16 CFG step + training step: routes {lumina2.ROUTES}, kernels {sorted(kernels)}")
    assert lumina2.ROUTES == expected_routes(sampler, forwards=2)
    assert kernels and not any("math" in k for k in kernels)
    assert lumina2.attention_report(device)["sdpa_allowed"] == [b.name for b in lumina2.FUSED_SDPA]
    grads = [p.grad for p in lora.lora_parameters(trainee)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    # the numbers: the padded, masked batch of two against cond and uncond run alone in fp32 math attention
    ref = copy.deepcopy(sampler).float()
    lumina2.set_attention("math")
    t = (1 - torch.as_tensor(0.6)).to(device).expand(1)  # the t cfg_velocity takes at sigma 0.6, to the last bit
    with torch.no_grad(), data.exact_fp32():
        v_c, v_u = ref(x, t, *cond), ref(x, t, *uncond)
    err = rel_err(v, v_u + 4.0 * (v_c - v_u))
    print(f"{device} bf16 CFG velocity vs fp32 math reference: rel err {err:.2e}")
    assert v.shape == x.shape and v.dtype == torch.float32 and err <= CFG_BOUND
