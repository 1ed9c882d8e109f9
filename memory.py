"""
Memory and speed transforms for the Next-DiT, applied from outside the loaded model (its LoRA injected, or merged for
sampling): fp8 base weights, gradient checkpointing, regional torch.compile and block swap. None renames a module or a
state_dict key; `prepare` applies them in the one order that composes.

References (read, not copied): sd-scripts and musubi-tuner (`--blocks_to_swap`, `--fp8_base`), torchtitan (checkpointing,
then compile, per block), torchtune's activation offloading (copy stream and events), ComfyUI's scaled-fp8 files.

    python sample.py config/sample_demo.py --blocks_to_swap=1 --fp8_base=True
    python -c "import lumina2, lora, memory; m = lumina2.load_dit('lumina_2_model_bf16.safetensors'); lora.inject(m, rank=16); \\
               memory.prepare(m, 'cuda', fp8=True, checkpointing=True, blocks_to_swap=20)"
"""
import resource
from collections import deque
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.torch_version import TorchVersion

# -----------------------------------------------------------------------------
# the unit every transform works on


def blocks(model):
    """The transformer blocks, the unit of checkpointing, compilation and FSDP2 sharding."""
    return [*model.context_refiner, *model.noise_refiner, *model.layers]


def enable_checkpointing(model):
    """Recompute each block's activations in backward (non-reentrant); forward wrapped in place, so state_dict keys stay."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks(model):
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


# -----------------------------------------------------------------------------
# fp8 base weights: frozen Linear weights stored as float8_e4m3fn with a scale, upcast at the matmul

FP8 = torch.float8_e4m3fn  # 3 mantissa bits: each weight within 1/16 of itself; range +-448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(FP8).max
SCALED_MM = False  # set by use_scaled_mm(): bf16 forwards through an fp8 base run one fp8 GEMM (torch._scaled_mm)


def fp8_scale(w, granularity="row"):
    """w (out, in) -> fp32 scale, (out, 1) per row or () per tensor: the power of two bringing max|w| to at most 448, so
    w8 * scale is exact in any float dtype, at no precision cost (e4m3's relative step is equal in every binade)."""
    if granularity not in ("row", "tensor"):
        raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
    amax = w.detach().abs().amax(dim=1, keepdim=True) if granularity == "row" else w.detach().abs().amax()
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=1e-30) / FP8_MAX)))


def quantize(w, granularity="row"):
    """w (out, in) -> (float8_e4m3fn (out, in), fp32 scale) with w ~= w8 * scale (round to nearest)."""
    scale = fp8_scale(w, granularity)
    return (w.detach().float() / scale).to(FP8), scale


def dequantize(w8, scale, dtype):
    return w8.to(dtype) * scale.to(dtype)  # exact: fp8 -> bf16/fp32 is exact and the scale a power of two


# torch's row-wise fp8 GEMM on CUDA: sm90 always, sm89 from torch 2.7 (pytorch#144348, #145676; docs/training.md)
ROWWISE_SM89_SINCE = "2.7"


def scaled_mm_capability(version=None):
    """The least CUDA compute capability with a row-wise fp8 GEMM in torch `version` (None: this one): 8.9 from 2.7 on, else 9.0."""
    return (8, 9) if TorchVersion(version or torch.__version__) >= ROWWISE_SM89_SINCE else (9, 0)


def scaled_mm_problem(device, dtype):
    """Why fp8_scaled_mm cannot run here (bf16 only, the CUDA capability, the kernel tried on zeros: docs/training.md), or None."""
    dev, version = torch.device(device), f"torch {torch.__version__}"
    if dtype != torch.bfloat16:
        return (f"fp8_scaled_mm needs a bf16 model: its fp8 GEMM (torch._scaled_mm, row-wise scales) gives bf16 output only, "
                f"but the model runs in {dtype} ({version}). Use dtype='bfloat16' (sample.py) or mixed_precision='bf16' "
                "(train.py), or fp8_scaled_mm=False")
    if dev.type == "cuda" and torch.version.cuda and torch.cuda.get_device_capability(dev) < scaled_mm_capability():
        need = ".".join(map(str, scaled_mm_capability()))
        return (f"fp8_scaled_mm needs a row-wise fp8 GEMM, which {version} has for compute capability {need} and newer "
                f"(9.0 before torch {ROWWISE_SM89_SINCE}), but {torch.cuda.get_device_name(dev)} has "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}: use fp8_scaled_mm=False (fp8 storage, bf16 matmuls)")
    try:
        scaled_mm(torch.zeros(16, 16, dtype=dtype, device=dev), torch.zeros(16, 16, dtype=FP8, device=dev),
                  torch.ones(16, 1, device=dev), None)
    except RuntimeError as e:
        return (f"fp8_scaled_mm needs torch._scaled_mm with row-wise scales and bf16 output, which {version} does not offer on "
                f"{dev.type}: it says {str(e).strip().splitlines()[0]!r}. Use fp8_scaled_mm=False (fp8 storage, bf16 matmuls)")
    return None


def use_scaled_mm(on, device, dtype):
    """fp8_scaled_mm (musubi-tuner's --fp8_fast): twice the bf16 tensor-core rate on sm89/sm90, for the input's rounding to 3
    mantissa bits (test_memory.py). Refused with scaled_mm_problem()'s reason; the CPU runs torch's reference kernel."""
    global SCALED_MM
    if on and (problem := scaled_mm_problem(device, dtype)):
        raise ValueError(problem)
    SCALED_MM = bool(on)


def scaled_mm(x, w8, scale, bias):
    """x (..., K) bf16, w8 (N, K) fp8, scale (N, 1) or () -> (..., N) bf16: one fp8 GEMM (fp32 accumulation, both scales in its
    epilogue), x quantised at the weight's granularity: per row for a per-row scale (the row-wise kernel), as a whole for a
    per-tensor one (the form every fp8 _scaled_mm takes). x's scale amax/448 may be any float: it is applied in fp32."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    rowwise = scale.dim() > 0
    amax = x2.abs().amax(dim=1, keepdim=True) if rowwise else x2.abs().amax()  # (M, 1) or ()
    x_scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
    x8 = (x2.float() / x_scale).to(FP8)
    w_scale = scale.float().reshape(1, -1).contiguous() if rowwise else scale.float()  # (1, N) or ()
    # w8.t() is (K, N) column-major, the layout the fp8 GEMM takes for its second operand
    y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], w8.shape[0])


def scaled_mm_fits(x, w8):
    """The shapes and dtypes the fp8 GEMM takes: bf16 activations, e4m3 weights, K and N multiples of 16."""
    return x.dtype == torch.bfloat16 and w8.dtype == FP8 and x.shape[-1] % 16 == 0 and w8.shape[0] % 16 == 0


class Fp8Matmul(torch.autograd.Function):
    """x @ (w8 * scale)^T + b for a frozen fp8 weight, dequantised only inside forward and again (from the saved fp8 bytes)
    in backward: left to autograd, F.linear would keep the dequantised copy and fp8 save nothing. With SCALED_MM: one fp8 GEMM."""
    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        if SCALED_MM and scaled_mm_fits(x, w8):
            return scaled_mm(x, w8, scale, bias)
        return F.linear(x, dequantize(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        grad_x = grad @ dequantize(w8, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None  # the base is frozen: no weight, scale or bias gradient


def linear(x, weight, bias=None, scale=None):
    """F.linear, or the fp8 matmul for an fp8 `weight` (`scale`: its scale_weight); via LoRALinear, a LoRA trains on fp8 too."""
    if weight.dtype in FP8_DTYPES:
        return Fp8Matmul.apply(x, weight, scale, bias)
    return F.linear(x, weight, bias)


def set_fp8_weight(module, granularity="row"):
    """Replace the frozen module.weight (out, in) by its fp8 form under the same name, plus its scale as `scale_weight`."""
    if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
        raise ValueError("fp8 base weights are frozen storage (LoRA training or sampling); this Linear is "
                         "trainable, as in train_mode='full'. Use fp8=False to train the weights themselves.")
    w8, scale = quantize(module.weight, granularity)
    module.weight = nn.Parameter(w8, requires_grad=False)
    module.register_buffer("scale_weight", scale)  # LoRALinear has the name registered (as None) already


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear with an fp8 `weight` (out, in) and `scale_weight` fp32 (out, 1) or (): lora.inject still finds it."""
    def __init__(self, base, granularity="row"):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight, self.bias = base.weight, base.bias
        set_fp8_weight(self, granularity)

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.scale_weight)


def adapter_tensors(module):
    """ids of the tensors the adapters inside `module` train (a LoRA module lists them in trained()); they stay fp32, resident."""
    return {id(p) for m in module.modules() if callable(getattr(m, "trained", None)) for p in m.trained().values()}


def quantize_fp8(model, granularity="row"):
    """Store every frozen Linear weight in the blocks (99.6% of the 2B's, LoRA bases too) as fp8, scaled per row (default) or
    per tensor; returns the count. Embedders and final layer keep their dtype (sd-scripts too): nothing averages their error."""
    count = 0
    for block in blocks(model):
        own = adapter_tensors(block)
        for path, m in list(block.named_modules()):
            if not isinstance(getattr(m, "weight", None), torch.Tensor) or id(m.weight) in own or m.weight.dtype in FP8_DTYPES:
                continue
            if callable(getattr(m, "trained", None)):  # a LoRA module: its forward sends an fp8 weight through linear()
                set_fp8_weight(m, granularity)
            elif type(m) is nn.Linear:
                parent, _, child = path.rpartition(".")
                setattr(block.get_submodule(parent), child, Fp8Linear(m, granularity))
            else:
                continue
            count += 1
    return count


# -----------------------------------------------------------------------------
# regional compile: one torch.compile per block, shared by every block of the same kind


def compile_blocks(model, dynamic=True, backend="inductor"):
    """torch.compile each block's forward from outside. dynamic=True: captions and aspect buckets change the sequence length
    every batch, and a graph per length would be a recompile storm ending in eager fallback at dynamo's cache limit of 8."""
    for block in blocks(model):
        block.forward = torch.compile(block.forward, dynamic=dynamic, backend=backend)


# -----------------------------------------------------------------------------
# block swap: the last n layers' frozen weights live in CPU RAM, a few device slots hold the ones running

SWAP_FULL = ("blocks_to_swap needs a frozen base (LoRA training or sampling), but {} is trainable: with "
             "train_mode='full' the swapped blocks' gradients and optimizer step would have to live in CPU RAM "
             "as well, which this block swap does not do. Use blocks_to_swap=0 for full fine-tuning.")
LOG_LIMIT = 4096  # events a BlockSwap keeps in its log and ran_with: unbounded, they would grow ~6 per swapped layer per step


class OnBackward(torch.autograd.Function):
    """Identity in forward; calls fn() when backward reaches this point, before the gradients flow on."""
    @staticmethod
    def forward(ctx, fn, *xs):
        ctx.fn = fn
        out = tuple(x.view_as(x) for x in xs)
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.fn()
        return None, *grads


def on_backward(fn, args, kwargs):
    """(args, kwargs), each tensor needing a gradient passed through one OnBackward(fn): fn runs after the block's backward."""
    args, kwargs = list(args), dict(kwargs)
    where = [(args, i) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    where += [(kwargs, k) for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if where:
        out = OnBackward.apply(fn, *(box[key] for box, key in where))
        for (box, key), t in zip(where, out if len(where) > 1 else (out,)):
            box[key] = t
    return args, kwargs


def swapped_tensors(block, prefix=""):
    """[(name, tensor)]: a block's frozen parameters and buffers, all but what its adapters train; `prefix` is for the error."""
    out, own = [], adapter_tensors(block)
    for name, p in block.named_parameters():
        if id(p) in own:
            continue  # a LoRA's own tensors are small (and usually trained): they stay resident on the device
        if p.requires_grad:
            raise ValueError(SWAP_FULL.format(prefix + name))
        out.append((name, p))
    return out + list(block.named_buffers())


class BlockSwap:
    """n blocks whose frozen tensors live in CPU RAM (pinned for CUDA) and rotate through n_slots device slots (device memory:
    the unswapped layers plus n_slots blocks, whatever n): block j's tensors point at slot j % n_slots for good, so making
    it resident is one copy. Autograd saves a weight (a leaf) by reference and reads it in backward, so re-making a block
    resident before its backward (and its checkpoint recompute, which calls the block's function without a module hook)
    gives exact gradients: a node on its output makes it resident and prefetches the block before; one on its inputs checks
    and releases the slot. On CUDA the copies run on a side stream: compute waits for a slot's copy, and a copy into a slot
    waits for the kernels that last read it; on the CPU all is synchronous. A block run with another block's weights always
    raises a RuntimeError. `log` holds (event, layer, slot), `ran_with` (phase, layer, layer whose weights its slot held)."""
    def __init__(self, blocks, first_layer, device, n_slots=2):
        self.blocks, self.first, self.device = list(blocks), first_layer, torch.device(device)
        self.cuda = self.device.type == "cuda"
        tensors = [swapped_tensors(b, f"layers.{first_layer + j}.") for j, b in enumerate(self.blocks)]
        self.names = [name for name, _ in tensors[0]]
        layout = lambda ts: [(n, tuple(t.shape), t.dtype) for n, t in ts]
        for j, ts in enumerate(tensors):
            if layout(ts) != layout(tensors[0]):
                raise ValueError(f"block swap needs identical layers, but layer {first_layer + j}'s frozen tensors differ "
                                 f"from layer {first_layer}'s: {sorted(set(layout(ts)) ^ set(layout(tensors[0])))[:4]}")
        # CPU RAM, pinned for CUDA's side stream; a meta tensor (plan.py's stand-in GPU) stays on meta: it has no bytes
        host = lambda t: t.detach() if t.is_meta else t.detach().cpu().pin_memory() if self.cuda else t.detach().cpu()
        self.host = [[host(t) for _, t in ts] for ts in tensors]
        self.n_slots = min(n_slots, len(self.blocks))
        self.slots = [[torch.empty_like(h, device=self.device) for h in self.host[0]] for _ in range(self.n_slots)]
        self.resident = [None] * self.n_slots  # the block whose weights each slot holds
        self.block_bytes = sum(h.nbytes for h in self.host[0])
        for j, ts in enumerate(tensors):
            for (_, t), slot in zip(ts, self.slots[self.slot_of(j)]):
                t.data = slot  # once: the block's tensors now live in its slot; residency = the slot's content
            self.blocks[j].register_state_dict_post_hook(partial(self.state_dict_hook, j))
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in range(self.n_slots)]  # the slot's last copy is done
            self.used = [torch.cuda.Event() for _ in range(self.n_slots)]  # the kernels reading it are queued before
        self.log, self.ran_with = deque(maxlen=LOG_LIMIT), deque(maxlen=LOG_LIMIT)

    def slot_of(self, j):
        return j % self.n_slots

    def load(self, j):
        """Start copying block j's weights into its slot (a no-op when they are there)."""
        s = self.slot_of(j)
        if self.resident[s] == j:
            return
        if self.cuda:
            self.copy_stream.wait_event(self.used[s])  # never overwrite a slot a queued kernel still reads
            with torch.cuda.stream(self.copy_stream):
                for dst, src in zip(self.slots[s], self.host[j]):
                    dst.copy_(src, non_blocking=True)
            self.copied[s].record(self.copy_stream)
        else:
            for dst, src in zip(self.slots[s], self.host[j]):
                dst.copy_(src)
        self.resident[s] = j
        self.log.append(("copy", self.first + j, s))

    def ensure(self, j):
        """Block j's weights are in its slot before the compute stream goes on."""
        self.load(j)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[self.slot_of(j)])

    def prefetch(self, j):
        if 0 <= j < len(self.blocks) and self.n_slots > 1:
            self.load(j)

    def ran(self, j, phase):
        """Block j's `phase` kernels are queued: record with whose weights, and release the slot to the copies."""
        s = self.slot_of(j)
        held = None if self.resident[s] is None else self.first + self.resident[s]
        self.ran_with.append((phase, self.first + j, held))
        self.log.append((phase, self.first + j, s))
        if self.resident[s] != j:
            raise RuntimeError(f"block swap: layer {self.first + j} ran its {phase} with the weights of layer {held} in slot {s}")
        if self.cuda:
            self.used[s].record(torch.cuda.current_stream(self.device))

    def backward_enters(self, j):
        self.ensure(j)
        self.prefetch(j - 1)  # backward runs the layers in reverse

    def forward(self, j, inner, *args, **kwargs):
        """Block j's forward: residency around `inner` (original, checkpointed or compiled forward), and the backward nodes."""
        grad = torch.is_grad_enabled()
        if grad:
            args, kwargs = on_backward(partial(self.ran, j, "backward"), args, kwargs)
        self.ensure(j)
        self.prefetch(j + 1)  # copied while this block computes
        out = inner(*args, **kwargs)
        self.ran(j, "forward")
        if grad and out.requires_grad:
            return OnBackward.apply(partial(self.backward_enters, j), out)
        if not grad and j == len(self.blocks) - 1 and self.slot_of(0) != self.slot_of(j):
            self.prefetch(0)  # sampling: the next forward starts there, during the unswapped layers
        return out

    def state_dict_hook(self, j, module, state_dict, prefix, local_metadata):
        """state_dict() of a swapped block returns its own weights (the CPU copies), not its slot's content."""
        for name, h in zip(self.names, self.host[j]):
            if prefix + name in state_dict:
                state_dict[prefix + name] = h


def swap_blocks(model, n, device, n_slots=2):
    """Keep the last n layers' frozen weights in CPU RAM (sd-scripts' blocks_to_swap), place the rest; call it last (see
    prepare), never move the model after. Returns the BlockSwap, also at model.block_swap."""
    layers = list(model.layers)
    if not 0 < n <= len(layers):
        raise ValueError(f"blocks_to_swap must be between 1 and the model's {len(layers)} layers, got {n}")
    swap = BlockSwap(layers[-n:], len(layers) - n, device, n_slots)
    for j, block in enumerate(swap.blocks):
        block.forward = partial(swap.forward, j, block.forward)
    model.to(device)  # the swapped tensors already point at device slots: this moves the rest
    model.block_swap = swap
    return swap


# -----------------------------------------------------------------------------
# one ordered setup


def combination_problems(train_mode="lora", fp8=False, fp8_scaled_mm=False, blocks_to_swap=0, fsdp=False, n_layers=None):
    """What cannot work together, as messages: train.py lists them with its config errors, prepare() refuses the first."""
    bad = [(fp8_scaled_mm and not fp8, "fp8_scaled_mm runs the matmuls of an fp8 base: it needs fp8_base=True"),
           (n_layers is not None and not 0 <= blocks_to_swap <= n_layers,
            f"blocks_to_swap must be between 0 and the model's {n_layers} layers, got {blocks_to_swap}"),
           (blocks_to_swap and train_mode == "full",
            "blocks_to_swap needs train_mode='lora': with train_mode='full' the swapped blocks' gradients and optimizer states would "
            "have to live in CPU RAM and be stepped there; use gradient checkpointing + Adafactor + fused_backward_pass instead"),
           (fp8 and train_mode == "full", "fp8_base stores the frozen base in fp8 for LoRA training and sampling; train_mode='full' "
                                          "trains those weights, which needs them (and their optimizer state) in bf16 or fp32"),
           (blocks_to_swap and fsdp, "blocks_to_swap with FSDP2: FSDP shards the parameters and owns where they live, the block "
                                     "swap moves whole frozen blocks itself. Use DDP (LoRA) or blocks_to_swap=0.")]
    return [msg for when, msg in bad if when]


def check_combination(**settings):
    """combination_problems(**settings), the first one raised as a ValueError."""
    problems = combination_problems(**settings)
    if problems:
        raise ValueError(problems[0])


def peak_memory_gb(device):
    """GiB: the CUDA allocator's peak when the run's device is a GPU, else the process's peak RSS since start."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def prepare(model, device, *, fp8=False, fp8_scaled_mm=False, checkpointing=False, compile=False, blocks_to_swap=0):
    """The model as loaded on the CPU, its LoRA injected or merged by the caller -> on `device`, in the one order that composes:
      1. fp8 first: the LoRA merge needed the bf16 weights, and the swap's slots and copies are then fp8 (half the bytes);
      2. checkpointing, then compile: the checkpoint is inside the compiled region, which is the block body;
      3. block swap last: it owns placement, and its bookkeeping must wrap the compiled region, not be traced into it.
    DDP and the optimizer come after, in train.py. Returns the model."""
    check_combination(fp8=fp8, fp8_scaled_mm=fp8_scaled_mm, blocks_to_swap=blocks_to_swap, n_layers=len(model.layers))
    use_scaled_mm(fp8_scaled_mm, device, model.x_embedder.weight.dtype)
    if fp8:
        quantize_fp8(model)
    if checkpointing:
        enable_checkpointing(model)
    if compile:
        compile_blocks(model)
    if blocks_to_swap:
        swap_blocks(model, blocks_to_swap, device)
        return model
    return model.to(device)
