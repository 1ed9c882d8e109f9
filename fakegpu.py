"""
A GPU on the CPU, for the planner (plan.py) and bench.py's predicted column: the project's own code runs on the meta device
(tensors with shapes and no bytes, so the 2B model costs nothing) while a dispatch mode (Tracker) counts the device memory
the run holds, op by op; forward_flops counts the model FLOPs that bound a step's time.

References (read, not copied): torch.distributed._tools.mem_tracker.MemTracker (storages counted once, by weakref, in
512-byte blocks: kMinBlockSize of c10/cuda/CUDACachingAllocator.cpp), torchtitan's memory estimation on fake tensors, the
SDPA kernel choice of aten/src/ATen/native/transformers/cuda/sdp_utils.cpp.

    python plan.py --card=rtx3060                      # the planner's table, traced here
    python -m pytest -q -s tests/test_plan.py          # the stand-in against the CPU allocator, printed

Where the stand-in differs from a CUDA run, each difference a line of code named here:
  - the device is "meta", not a FakeTensorMode's fake CUDA: on a CPU-only build autograd aborts the process on a fake CUDA
    tensor (its graph asks for a CUDA device guard), and nn.Module.to() cannot move fake parameters (swap_tensors refuses
    them). The model is loaded on meta, so memory.BlockSwap keeps a swapped block's "CPU RAM" copy on meta too, and the
    tracker counts what the run places (the model's parameters, buffers and swap slots: label_model) and what ops make;
  - stand_in(): lumina2.fused_sdpa_only answers True, as on CUDA, so the model takes its CUDA attention routes, and
    F.scaled_dot_product_attention is the kernel CUDA picks (KERNELS["cuda"]) called as its aten op, whose outputs and
    saved tensors are the CUDA kernel's: a logsumexp per row, never (S, S) scores;
  - memory.BlockSwap takes its synchronous path off CUDA: no streams, events or pinned memory; the same slots and copies;
  - torch's optimizers take their foreach path, as they do on CUDA by default (plan.py sets it; meta would loop per tensor);
  - kernels' own scratch buffers are not seen (cuBLAS workspaces, flash attention's fp32 dq accumulator in backward).
A host read of a device value (item, bool, float, a copy to the CPU) is a sync: the tracker records it in `syncs` and
answers 1 (or ones), so a traced step also proves whether it waits for the device.
"""
import contextlib
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lumina2

DEVICE = torch.device("meta")  # the stand-in for "cuda"
BLOCK = 512  # the CUDA caching allocator rounds every block up to this many bytes (kMinBlockSize)
aten = torch.ops.aten


class Tracker(TorchDispatchMode):
    """Live bytes on `device`: each storage an op makes there, or label() names, counted once (rounded up to `block` bytes)
    until it is freed. Each carries a label: the `phase` it was made in until label() says what it is. peak: the most live bytes since
    start(); breakdown(): those bytes by label. h2d: bytes copied in. On the stand-in (DEVICE), syncs: [(phase, op)] the host's
    reads of device values, each answered with ones (on a real device the reads are the device's own, unrecorded)."""
    def __init__(self, device=DEVICE, block=BLOCK):
        super().__init__()
        self.device, self.block, self.phase = torch.device(device), block, "setup"
        self.live, self.info = {}, []  # id(storage) -> its serial, for live storages; serial -> [bytes, label, freed at]
        self.now = self.peak = self.h2d = 0
        self.peak_at, self.syncs = 0, []  # the peak came when the storages with serials below peak_at were made

    def on(self, t):
        return isinstance(t, torch.Tensor) and t.device == self.device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src, to = (args[0] if args else None), None  # a copy's source, and the device it goes to
        if func is aten._to_copy.default:
            to = torch.device(kwargs.get("device") or src.device)
        elif func is aten.copy_.default:
            src, to = args[1], args[0].device
        if self.device == DEVICE and self.on(src) and (func is aten._local_scalar_dense.default or to not in (None, DEVICE)):
            # the host reads a value of the stand-in, which has none: .item(), bool(), float(), or a copy out (.cpu(), .tolist())
            self.syncs.append((self.phase, "to host" if to else "item"))
            if to is None:
                return True if src.dtype == torch.bool else 1
            return args[0] if func is aten.copy_.default else torch.ones(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        if to == self.device and not self.on(src):
            self.h2d += src.nbytes
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if self.on(t):
                self.add(t)
        return out

    def add(self, t):
        st = t.untyped_storage()
        if id(st) in self.live:
            return
        n = -(-st.nbytes() // self.block) * self.block
        self.live[id(st)] = len(self.info)
        self.info.append([n, self.phase, None])
        weakref.finalize(st, self.free, id(st))
        self.now += n
        if self.now > self.peak:
            self.peak, self.peak_at = self.now, len(self.info)

    def free(self, key):
        s = self.live.pop(key)
        self.info[s][2] = len(self.info)  # freed after every storage made so far: a peak at or after this count missed it
        self.now -= self.info[s][0]

    def label(self, tensors, name):
        """Name what these tensors' storages are (weights, gradients, ...); ones not yet counted are counted from now."""
        for t in tensors:
            if self.on(t):
                self.add(t)
                self.info[self.live[id(t.untyped_storage())]][1] = name

    def label_model(self, model):
        """A placed model's parameters and buffers are its weights; a block swap's device slots are named apart."""
        self.label([*model.parameters(), *model.buffers()], "weights")
        if getattr(model, "block_swap", None):
            self.label([t for slot in model.block_swap.slots for t in slot], "swap slots")

    def start(self, phase):
        """Begin a phase; the peak restarts from what is live now."""
        self.phase, self.peak, self.peak_at = phase, self.now, len(self.info)

    def breakdown(self):
        """Bytes live at the peak, by label (labels given after the peak count: a gradient is named once backward ends)."""
        out = Counter()
        for n, label, freed in self.info[:self.peak_at]:
            if freed is None or freed >= self.peak_at:
                out[label] += n
        return out


def swapped_bytes(model, step):
    """step() run with the model's block swap log cleared -> the bytes it copied into the device slots (0 without a swap)."""
    swap = getattr(model, "block_swap", None)
    if swap:
        swap.log.clear()
    step()
    return sum(e[0] == "copy" for e in swap.log) * swap.block_bytes if swap else 0


def cuda_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention on (B, H, S, D) as CUDA runs it: flash (native GQA) for unmasked fp16/bf16 with
    head_dim <= 256, else memory-efficient attention with the mask as a bias (no GQA: the model expands K/V first)."""
    if attn_mask is None and q.dtype in lumina2.HALF and q.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    if k.shape[1] != q.shape[1]:
        raise RuntimeError("No available kernel: memory-efficient attention takes no GQA (expand K/V first)")
    bias = None if attn_mask is None else attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # kept for backward only
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias, lse, dropout_p, is_causal, scale=scale)[0]


def cpu_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """As the CPU runs it for this model (its flash kernel, for every dtype, mask and GQA it gets): the CPU proofs' twin."""
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


KERNELS = {"cuda": cuda_sdpa, "cpu": cpu_sdpa}  # the device whose attention kernels the stand-in runs


@contextlib.contextmanager
def stand_in(kernels="cuda"):
    """Inside, the model on DEVICE runs as on `kernels`' device: its attention routes (lumina2.fused_sdpa_only) and its
    SDPA kernels (F.scaled_dot_product_attention is replaced: on meta, torch would pick its math fallback, and a torch
    function mode would miss checkpointing's recompute, which runs with torch function modes off)."""
    saved = lumina2.fused_sdpa_only, F.scaled_dot_product_attention
    lumina2.fused_sdpa_only, F.scaled_dot_product_attention = (lambda device: kernels == "cuda"), KERNELS[kernels]
    try:
        yield
    finally:
        lumina2.fused_sdpa_only, F.scaled_dot_product_attention = saved


def forward_flops(cfg, batch, cap_len, image_tokens):
    """Matmul FLOPs of one NextDiT forward, counted analytically (torch 2.11's CUDA FlopCounterMode asserts equal q/kv
    heads on the unmasked GQA path). cap_len: the batch's longest caption (padded slots below it are computed, so they
    count); image_tokens = (side / 8 / patch)^2. Elementwise work and bias adds are left out, as FlopCounterMode does."""
    dim, heads, kv, hd = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["dim"] // cfg["n_heads"]
    hidden = lumina2.ffn_hidden_dim(dim, cfg["multiple_of"], cfg["ffn_dim_multiplier"])
    patch = cfg["patch_size"] ** 2 * cfg["in_channels"]
    t_dim = min(dim, 1024)

    def block(tokens, modulated):  # per sample
        linear = dim * (heads + 2 * kv) * hd + heads * hd * dim + 3 * dim * hidden
        return 2 * tokens * linear + 4 * tokens**2 * hd * heads + (2 * t_dim * 4 * dim if modulated else 0)

    return batch * (2 * 256 * t_dim + 2 * t_dim * t_dim  # per sample: t_embedder's MLP
                    + 2 * cap_len * cfg["cap_feat_dim"] * dim  # cap_embedder
                    + cfg["n_refiner_layers"] * block(cap_len, False)  # context refiner
                    + 2 * image_tokens * patch * dim  # x_embedder
                    + cfg["n_refiner_layers"] * block(image_tokens, True)  # noise refiner
                    + cfg["n_layers"] * block(cap_len + image_tokens, True)  # main layers: the joint sequence
                    + 2 * t_dim * dim + 2 * image_tokens * dim * patch)  # final layer: adaLN and linear
