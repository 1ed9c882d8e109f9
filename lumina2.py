"""
Lumina Image 2.0 in one file: the Next-DiT diffusion transformer, the FLUX.1 autoencoder, the
Gemma-2-2B text-encoder wrapper, and loaders for the weight files users actually download.

References (read, not copied):
  - Alpha-VLLM/Lumina-Image-2.0 models/model.py (NextDiT, the numerical reference)
  - black-forest-labs/flux src/flux/modules/autoencoder.py (the AE layout of ae.safetensors)
  - Hugging Face transformers Gemma2Model (the text encoder runs through it, eager attention)
  - diffusers Lumina2Transformer2DModel / AutoencoderKL (the independent references in test_parity.py)

Conventions (see README): the DiT takes t = 1 - sigma in [0, 1] (0 = noise, 1 = clean, no x1000) and
returns the velocity v = x0 - noise. Weights are stored in bf16; the fp32 islands are marked
"fp32 island" below. Module attribute names equal the checkpoint keys, so loading is strict.

    python -c "import lumina2; m = lumina2.load_dit('lumina_2_model_bf16.safetensors'); print(m)"
    python -c "import lumina2; te = lumina2.load_text_encoder('gemma_2_2b_fp16.safetensors'); print(te(['a cat'])[0].shape)"
"""
import contextlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION = "sdpa"  # "sdpa" | "flash" | "sage" | "math" (fp32 reference); set it with set_attention(), which checks it
GEMMA_SOFTCAP = True  # Gemma-2's attention logit softcap of 50 (HF/official); False = ComfyUI/sd-scripts numerics

# -----------------------------------------------------------------------------
# small functions


def timestep_embedding(t, dim=256, max_period=10000.0):
    """t (B,) in [0, 1], used as is -> (B, dim) fp32 sinusoid, cos half first. fp32 island."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(pos, axes_dims, theta=10000.0):
    """pos (B, S, 3) integer positions -> (B, S, head_dim/2) fp32 rotation angles, one block per axis.
    fp32 island: the angle is formed in float64 and rounded once, as the official table does."""
    parts = []
    for axis, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
        parts.append((pos[..., axis, None].double() * omega).float())
    return torch.cat(parts, dim=-1)


def apply_rope(x, cos, sin):
    """x (B, S, H, D); cos/sin (B, S, D/2). Rotates adjacent pairs (x0 + i x1, x2 + i x3, ...) in fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): row-major patches, features laid out (ph, pw, c), c fastest."""
    B, C, H, W = x.shape
    return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, H, W, p):
    """Exact inverse of patchify: (B, N, p*p*C) -> (B, C, H, W)."""
    B = x.shape[0]
    return x.view(B, H // p, W // p, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)


def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier):
    """The official FFN width: 4*dim (no 2/3 factor), optionally scaled, rounded up to multiple_of."""
    hidden = 4 * dim
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# -----------------------------------------------------------------------------
# attention: one function, four backends, chosen once at start-up by set_attention()

BACKENDS = ("sdpa", "flash", "sage", "math")
HALF = (torch.float16, torch.bfloat16)  # the only dtypes the flash-attn and sageattention kernels take
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]  # MATH left out
ROUTES = {}  # route -> attention() calls since the last set_attention() (eager calls; see attention())
flash_attn_func = flash_attn_varlen_func = sageattn = sageattn_varlen = None  # bound by set_attention()


def import_kernels(name):
    """Bind the flash-attn or sageattention kernels to this module's names (tests replace them with references)."""
    global flash_attn_func, flash_attn_varlen_func, sageattn, sageattn_varlen
    try:
        if name == "flash":
            from flash_attn import flash_attn_func, flash_attn_varlen_func
        else:
            from sageattention import sageattn, sageattn_varlen
    except ImportError as e:
        hint = ("the flash-attn package (pip install flash-attn --no-build-isolation)" if name == "flash" else
                "the sageattention package with sageattn and sageattn_varlen (pip install -U sageattention)")
        raise ImportError(f"attention={name!r} needs {hint}, CUDA only; or use attention='sdpa'") from e


def set_attention(name, dtype=None, device=None):
    """Select the attention backend of every later forward. The scripts call it once at start-up, before any
    caching, so a bad choice fails in the first second. For flash and sage it checks that the device is CUDA,
    that dtype (the weights' dtype) is fp16/bf16, since their kernels take nothing else (fp32 is rejected, not
    quietly run another way), and that the package imports. dtype or device None skips that check; the dtype is
    checked again at call time. Clears ROUTES."""
    global ATTENTION
    if name not in BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    if name in ("flash", "sage"):
        if device is not None and torch.device(device).type != "cuda":
            raise ValueError(f"attention={name!r} runs only on CUDA, not on device={str(device)!r}: use attention='sdpa' there")
        if dtype is not None and dtype not in HALF:
            raise ValueError(f"attention={name!r} needs bf16 or fp16 weights, got {dtype}: its kernels take no fp32. Load the "
                             "model in bf16 (train.py mixed_precision='bf16', sample.py dtype='bfloat16'), or use attention='sdpa'")
        import_kernels(name)
    ATTENTION = name
    ROUTES.clear()


class AttentionMask(NamedTuple):
    """One forward's key mask in the forms its backend takes. NextDiT.forward builds one per sequence with
    attention_mask() and every block reads it, so no block (or checkpoint recompute) syncs with the host."""
    backend: str  # the ATTENTION it was built for
    keys: torch.Tensor  # (B, S) bool, True = a valid key
    bias: torch.Tensor | None = None  # sdpa: (B, 1, 1, S) additive, 0 or -inf, in the compute dtype
    indices: torch.Tensor | None = None  # flash/sage: (N,) long, the valid tokens' places in the flattened B*S tokens
    cu_seqlens: torch.Tensor | None = None  # flash/sage: (B+1,) int32 cumulative valid lengths
    max_seqlen: int = 0  # flash/sage: the longest valid length


def attention_mask(keys, max_len, dtype):
    """keys (B, S) bool key mask, max_len its largest row count (a Python int the caller already holds, so no
    sync), dtype the compute dtype -> AttentionMask with only the fields ATTENTION needs. The varlen backends
    pay one host sync here (nonzero); sdpa and math none."""
    if ATTENTION == "sdpa":
        bias = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, float("-inf"))
        return AttentionMask(ATTENTION, keys, bias=bias[:, None, None, :])
    if ATTENTION in ("flash", "sage"):
        cu_seqlens = F.pad(keys.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return AttentionMask(ATTENTION, keys, indices=keys.flatten().nonzero().squeeze(1), cu_seqlens=cu_seqlens, max_seqlen=max_len)
    return AttentionMask(ATTENTION, keys)


def fused_sdpa_only(device):
    """Whether SDPA on `device` may run only fused kernels: on CUDA its math fallback materialises fp32
    (B, H, S, S) scores, so it must fail loudly rather than run slowly. A function so CPU tests can turn it on."""
    return device.type == "cuda"


def attention_route(q, mask):
    """The path attention() takes for q (its device and dtype) and mask under ATTENTION; plain Python, no device work."""
    if ATTENTION == "sdpa":
        if mask is not None:
            return "sdpa-expanded-masked"
        # CUDA's flash SDPA has GQA but takes only fp16/bf16; in fp32 the memory-efficient kernel runs, which has no GQA
        return "sdpa-expanded-unmasked" if fused_sdpa_only(q.device) and q.dtype not in HALF else "sdpa-gqa-unmasked"
    if ATTENTION == "math":
        return "math"
    return ATTENTION + ("-dense" if mask is None else "-varlen")


def attention_report(device):
    """For bench.py: the backend, the SDPA kernels the guard allows on `device` ("any" where there is no guard)
    and the routes attention() took since set_attention(), with call counts."""
    allowed = [b.name for b in FUSED_SDPA] if fused_sdpa_only(torch.device(device)) else ["any"]
    return dict(attention=ATTENTION, sdpa_allowed=allowed, routes=dict(ROUTES))


def attention(q, k, v, mask):
    """q (B, S, Hq, D), k/v (B, S, Hkv, D) with query head h reading kv head h // (Hq/Hkv); mask None (every key
    valid) or the forward's AttentionMask. Returns (B, S, Hq, D).
    Routes on CUDA: sdpa unmasked fp16/bf16 -> flash SDPA with native GQA; sdpa masked (or fp32) -> K/V expanded
    to the query heads plus the additive bias -> memory-efficient / cuDNN SDPA; flash/sage unmasked -> the dense
    kernel, masked -> its varlen kernel on the valid tokens (masked query rows come back 0; those rows are
    discarded downstream). Calls traced by torch.compile are not counted in ROUTES (a traced count would be a
    constant); the route depends only on ATTENTION, the mask's presence, the device and the dtype."""
    route = attention_route(q, mask)
    if not torch.compiler.is_compiling():
        ROUTES[route] = ROUTES.get(route, 0) + 1
    if mask is not None and mask.backend != ATTENTION:
        raise RuntimeError(f"an attention mask built for {mask.backend!r} reached attention={ATTENTION!r}: "
                           "call set_attention() before the forward, not during it")
    if route == "math":
        return math_attention(q, k, v, None if mask is None else mask.keys)
    if route == "sdpa-gqa-unmasked":
        return sdpa(q, k, v, gqa=True)
    if route.startswith("sdpa"):
        # the memory-efficient and cuDNN kernels take a mask but no GQA, so each kv head is repeated for its
        # query heads (B, S, Hq, D) as diffusers does; flash SDPA would take GQA but takes no mask
        groups = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        return sdpa(q, k, v, bias=None if mask is None else mask.bias.to(q.dtype))
    check_kernel_inputs(q, k, v)
    if route == "flash-dense":
        return flash_attn_func(q, k, v)
    if route == "flash-varlen":
        return varlen(flash_attn_varlen_func, q, k, v, mask)
    if route == "sage-dense":
        return sageattn(q, k, v, tensor_layout="NHD")  # GQA by head groups, like flash-attn
    return varlen(sageattn_varlen, q, k, v, mask)


def sdpa(q, k, v, bias=None, gqa=False):
    """F.scaled_dot_product_attention on (B, S, H, D) tensors, bias None or (B, 1, 1, S) additive. Where
    fused_sdpa_only(), only FUSED_SDPA may run: inputs none of them takes raise "No available kernel" (with
    torch's warnings saying why each kernel declined) instead of running the math fallback."""
    guard = sdpa_kernel(FUSED_SDPA) if fused_sdpa_only(q.device) else contextlib.nullcontext()
    with guard:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, enable_gqa=gqa)
    return o.transpose(1, 2)


def math_attention(q, k, v, mask):
    """The readable reference; mask (B, S) bool or None. fp32 island: scores, softmax and the weighted sum run in fp32."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()).type_as(q)


def check_kernel_inputs(q, k, v):
    """The call-time twin of set_attention()'s checks, for inputs that reach the flash/sage kernels anyway."""
    if (flash_attn_func if ATTENTION == "flash" else sageattn) is None:
        raise RuntimeError(f"attention={ATTENTION!r} has no kernel bound: select it with lumina2.set_attention({ATTENTION!r}, dtype, device)")
    if q.dtype not in HALF:
        raise TypeError(f"attention={ATTENTION!r} got {q.dtype} q/k/v, but its kernels take only fp16/bf16: "
                        "load the model in bf16, or use attention='sdpa'")
    if ATTENTION == "sage" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("attention='sage' has no backward (sageattention is inference only): "
                           "sample with it, train with 'sdpa' or 'flash'")


def varlen(kernel, q, k, v, mask):
    """Run a varlen kernel (flash_attn_varlen_func or sageattn_varlen: packed (N, heads, D) tokens, int32
    cu_seqlens, GQA by head groups) on the valid tokens only, then scatter back: masked query rows come back 0."""
    B, S, H, D = q.shape
    pack = lambda t: t.flatten(0, 1).index_select(0, mask.indices)  # (N, heads, D)
    o = kernel(pack(q), pack(k), pack(v), mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen)
    return q.new_zeros(B * S, H, D).index_copy(0, mask.indices, o).view(B, S, H, D)


# -----------------------------------------------------------------------------
# Next-DiT modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 island: normalise in fp32, cast back, then scale (the official order)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, qk_norm, norm_eps):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)  # rows: q | k | v
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()

    def forward(self, x, mask, rope):
        B, S, _ = x.shape
        hq, hkv, d = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.head_dim
        q, k, v = self.qkv(x).split([hq, hkv, hkv], dim=-1)
        q = apply_rope(self.q_norm(q.view(B, S, -1, d)), *rope)  # per-head norm, then RoPE
        k = apply_rope(self.k_norm(k.view(B, S, -1, d)), *rope)
        return self.out(attention(q, k, v.view(B, S, -1, d), mask).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich-normed attention + FFN. With `modulation`, a scale and a tanh gate per branch come from
    the timestep embedding c (no shift terms); without it (context refiner) both are identity."""

    def __init__(self, dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm, modulation):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads, qk_norm, norm_eps)
        self.feed_forward = FeedForward(dim, ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier))
        self.attention_norm1 = RMSNorm(dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.attention_norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), 4 * dim))

    def forward(self, x, mask, rope, c=None):
        # x (B, S, dim), mask None (every key valid) or the forward's AttentionMask, rope (cos, sin) each
        # (B, S, head_dim/2), c (B, 1024)
        if c is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, rope))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)
        x = x + gate_msa.tanh() * self.attention_norm2(self.attention(self.attention_norm1(x) * (1 + scale_msa), mask, rope))
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.mlp[0].in_features).to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), dim))

    def forward(self, x, c):
        # fp32 island: the affine-free LayerNorm (eps 1e-6) runs in fp32
        x = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6).type_as(x)
        return self.linear(x * (1 + self.adaLN_modulation(c)[:, None]))


class NextDiT(nn.Module):
    """Next-DiT with the official constructor names, so any official config transfers 1:1."""

    def __init__(self, patch_size=2, in_channels=16, dim=2304, n_layers=26, n_refiner_layers=2, n_heads=24,
                 n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True,
                 cap_feat_dim=2304, axes_dims=(32, 32, 32), axes_lens=(300, 512, 512)):
        super().__init__()
        assert sum(axes_dims) == dim // n_heads, "axes_dims must add up to head_dim"
        self.patch_size, self.in_channels, self.axes_dims, self.axes_lens = patch_size, in_channels, tuple(axes_dims), tuple(axes_lens)
        block = lambda modulation: TransformerBlock(dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm, modulation)
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.noise_refiner = nn.ModuleList([block(True) for _ in range(n_refiner_layers)])
        self.context_refiner = nn.ModuleList([block(False) for _ in range(n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(dim, 1024))
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim, norm_eps), nn.Linear(cap_feat_dim, dim))
        self.layers = nn.ModuleList([block(True) for _ in range(n_layers)])
        self.norm_final = RMSNorm(dim, norm_eps)  # stored in every checkpoint, never used by forward; kept so saves stay loadable everywhere
        self.final_layer = FinalLayer(dim, patch_size * patch_size * in_channels)

    def rope(self, pos):
        angles = rope_angles(pos, self.axes_dims)
        return angles.cos(), angles.sin()

    def forward(self, x, t, cap_feats, cap_mask):
        """x (B, C, H, W) noisy latents, t (B,) = 1 - sigma, cap_feats (B, L, cap_feat_dim),
        cap_mask (B, L) right-padded validity -> velocity x0 - noise, (B, C, H, W) fp32."""
        B, C, H, W = x.shape
        p, dtype = self.patch_size, self.x_embedder.weight.dtype
        h, w = H // p, W // p
        cap_lens = cap_mask.sum(1).long()  # (B,) valid caption tokens per sample
        L = int(cap_lens.max())
        assert L < self.axes_lens[0], f"caption of {L} tokens: this model's RoPE table allows {self.axes_lens[0] - 1}"
        assert h <= self.axes_lens[1] and w <= self.axes_lens[2], f"latent {H}x{W} exceeds the RoPE table"
        # trimming padding to the longest caption makes the result independent of the padded length, and
        # when all captions have one length no mask is needed at all (the fast, unmasked kernels run)
        cap_mask = cap_mask[:, :L].bool()
        # one mask object per sequence and forward, read by every block: caption (B, L), joint (B, L + h*w)
        cap_attn = None if bool(cap_mask.all()) else attention_mask(cap_mask, L, dtype)
        joint_attn = None if cap_attn is None else attention_mask(F.pad(cap_mask, (0, h * w), value=True), L + h * w, dtype)

        # positions: caption token j -> (j, 0, 0); image patch (r, c) -> (cap_len, r, c)
        dev = x.device
        j = torch.arange(L, device=dev)
        cap_pos = torch.stack([j, torch.zeros_like(j), torch.zeros_like(j)], -1).expand(B, L, 3)
        rows, cols = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        img_pos = torch.stack([cap_lens[:, None].expand(B, h * w), rows.flatten().expand(B, -1), cols.flatten().expand(B, -1)], -1)
        cap_rope, img_rope = self.rope(cap_pos), self.rope(img_pos)

        c = self.t_embedder(t)  # (B, min(dim, 1024))
        cap = self.cap_embedder(cap_feats[:, :L].to(dtype))  # (B, L, dim)
        for layer in self.context_refiner:
            cap = layer(cap, cap_attn, cap_rope)
        cap = cap.masked_fill(~cap_mask[..., None], 0)  # padded slots carry no garbage into the joint sequence

        img = self.x_embedder(patchify(x.to(dtype), p))  # (B, h*w, dim)
        for layer in self.noise_refiner:
            img = layer(img, None, img_rope, c)

        # joint sequence [caption (L, padded) ; image]: with the padded caption slots masked as keys this
        # equals the official [caption (cap_len) ; image ; padding] layout, since positions are explicit
        x = torch.cat([cap, img], dim=1)
        rope = tuple(torch.cat(pair, dim=1) for pair in zip(cap_rope, img_rope))
        for layer in self.layers:
            x = layer(x, joint_attn, rope, c)
        return unpatchify(self.final_layer(x[:, L:], c), H, W, p).float()


DIT_PRESETS = {
    "2b": dict(patch_size=2, in_channels=16, dim=2304, n_layers=26, n_refiner_layers=2, n_heads=24, n_kv_heads=8,
               multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2304,
               axes_dims=(32, 32, 32), axes_lens=(300, 512, 512)),
    "tiny": dict(patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
                 multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
                 axes_dims=(8, 4, 4), axes_lens=(300, 512, 512)),
}

# -----------------------------------------------------------------------------
# FLUX.1 autoencoder (BFL layout: ae.safetensors)


def group_norm(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q/k/v/proj_out are 1x1 convs as in the file."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, then a stride-2 conv


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: res blocks, then an optional down- or upsample (names as in the file)."""

    def __init__(self, c_in, c_out, n_blocks, resample=None):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks)])
        if resample == "down":
            self.downsample = Downsample(c_out)
        elif resample == "up":
            self.upsample = Upsample(c_out)


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels):
        super().__init__()
        chans = [ch] + [ch * m for m in ch_mult]
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList([Level(chans[i], chans[i + 1], num_res_blocks, "down" if i < n - 1 else None) for i in range(n)])
        self.mid = MidBlock(chans[-1])
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * z_channels, 3, padding=1)  # mean | logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_ch):
        super().__init__()
        n = len(ch_mult)
        chans = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1])
        # up[i] works at chans[i]; it runs from i = n-1 down to 0 and takes its input from level i+1
        self.up = nn.ModuleList([Level(chans[min(i + 1, n - 1)], chans[i], num_res_blocks + 1, "up" if i > 0 else None) for i in range(n)])
        self.norm_out = group_norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    scale_factor, shift_factor = 0.3611, 0.1159

    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, in_channels=3, out_ch=3):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, in_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, out_ch)

    def encode(self, images, sample=False, generator=None):
        """images (B, 3, H, W) in [-1, 1] -> latents (B, 16, H/8, W/8) = 0.3611 (z - 0.1159), z the
        posterior mean (or a posterior sample with sample=True)."""
        mean, logvar = self.encoder(images.to(self.encoder.conv_in.weight.dtype)).chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
            z = mean.float() + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.scale_factor * (z.float() - self.shift_factor)

    def decode(self, latents):
        """latents -> images in [-1, 1] (fp32): the inverse scaling is applied here, exactly once."""
        z = latents.float() / self.scale_factor + self.shift_factor
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype)).float()


AE_PRESETS = {
    "flux": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16),
    "tiny": dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16),
}

# -----------------------------------------------------------------------------
# Gemma-2-2B text encoder

SYSTEM_PROMPTS = {
    "base": "You are an assistant designed to generate high-quality images based on user prompts.",
    "align": "You are an assistant designed to generate high-quality images with the highest degree of image-text alignment based on textual prompts.",
    "superior": "You are an assistant designed to generate superior images with the superior degree of image-text alignment based on textual prompts or user prompts.",
}
PROMPT_TAG = "<Prompt Start>"


def build_prompt(caption, system_prompt):
    """The official template "{system} <Prompt Start> {caption}"; an empty system prompt gives the bare
    caption, and a system prompt already ending in the tag does not get a second one."""
    if not system_prompt:
        return caption
    system_prompt = system_prompt.rstrip()
    if system_prompt.endswith(PROMPT_TAG):
        return f"{system_prompt} {caption}"
    return f"{system_prompt} {PROMPT_TAG} {caption}"


def gemma_config(**overrides):
    """transformers' Gemma2Config for gemma-2-2b (its defaults), eager attention so the softcap applies."""
    from transformers import Gemma2Config
    cfg = Gemma2Config(**overrides)
    cfg.attn_logit_softcapping = 50.0 if GEMMA_SOFTCAP else None
    cfg._attn_implementation = "eager"
    return cfg


class TextEncoder(nn.Module):
    """Gemma-2 without its last decoder layer and final norm: the output is hidden_states[-2] of the full
    model (layer 24's raw output for the 2B). Tokenization is SentencePiece on the embedded proto."""

    def __init__(self, config, spiece_proto, max_length=256):
        super().__init__()
        import sentencepiece
        from transformers import Gemma2Model
        self.config, self.max_length = config, max_length
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=spiece_proto)
        cut = gemma_config(**{**config.to_dict(), "num_hidden_layers": config.num_hidden_layers - 1,
                              "layer_types": config.layer_types[:-1]})
        self.model = Gemma2Model(cut)
        self.model.norm = nn.Identity()  # the features are taken before the final norm

    def tokenize(self, texts, names=None, captions=None):
        """-> ids (B, L) long and mask (B, L) bool: [BOS] + pieces, no EOS, truncated to max_length,
        right-padded with 0 to the longest in the batch. A truncated text is warned about, quoting its
        caption (captions: one per text, default the text itself) and led by its name (names: one label per
        text, such as the caption's file)."""
        bos, pad = self.config.bos_token_id, self.config.pad_token_id
        what = "prompt" if captions is None else "caption"
        counted = "" if captions is None else ", counting the system prompt"
        rows = []
        for text, name, caption in zip(texts, names or [None] * len(texts), captions or texts):
            ids = [bos] + self.sp.encode(text)
            if len(ids) > self.max_length:
                warnings.warn(f"{name + ': ' if name else ''}{what} of {len(ids)} tokens truncated to {self.max_length} tokens "
                              f"(gemma2_max_token_length{counted}); it starts {caption[:60]!r}")
            rows.append(ids[: self.max_length])
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
        mask = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in rows])
        return ids, mask

    @torch.no_grad()
    def forward(self, captions, system_prompt=SYSTEM_PROMPTS["base"], names=None):
        """captions: list of str -> (features (B, L, hidden) in the weight dtype, mask (B, L) bool). names: one
        label per caption (its file, say) for the truncation warning."""
        ids, mask = self.tokenize([build_prompt(c, system_prompt) for c in captions], names, captions)
        dev = self.model.embed_tokens.weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        return self.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state, mask


# -----------------------------------------------------------------------------
# loaders for the files users bring

DIT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
AE_PREFIXES = ("", "vae.", "first_stage_model.")
GEMMA_PREFIXES = ("model.", "text_encoders.gemma2_2b.transformer.model.", "")
SPIECE_KEYS = ("spiece_model", "text_encoders.spiece_model")


class BadInput(ValueError):
    """A problem with something the user brought (a weight file, an image, a caption, a value), with a message
    that names it and says what to do. train.py and sample.py print it as one line; any other exception keeps
    its traceback, since that one is a bug."""


class WriteFailed(OSError):
    """A file could not be written (full disk, read-only folder, permissions); the file it was to replace,
    if any, is unchanged."""


def atomic_write(path, write):
    """write(tmp) into a temp file beside `path`, then rename it over `path`: a kill, a full disk or an error
    mid-write leaves the previous file as it was and no partial temp file behind. The temp name is unique
    per process and call (two runs never share one), and the file gets the user's normal permissions (the
    umask), not the 0600 some writers use, so that another user's ComfyUI can read a LoRA."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        free = shutil.disk_usage(os.path.dirname(path) or ".").free if os.path.exists(tmp) else None
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)) or "I/O error" in str(e):  # safetensors' own error type, for one
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if free is not None and free < 2**20:  # torch.save says "unexpected pos ..." for a full disk
                reason = f"no space left on the device: {free:,} bytes free, {reason}"
            raise WriteFailed(f"could not write {path} ({reason}); the file it was to replace, if any, is unchanged") from e
        raise


def save_file_atomic(tensors, path, metadata=None):
    """safetensors save through atomic_write."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def open_safetensors(path):
    """-> (safe_open handle, metadata dict). A missing path, a folder, or a truncated or non-safetensors file
    raises BadInput saying which."""
    from safetensors import safe_open
    if os.path.isdir(path):
        inside = safetensors_in(path)
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise BadInput(f"{path} is a directory, not a weight file: pass the .safetensors file itself{hint}")
    if not os.path.exists(path):
        raise BadInput(f"weight file not found: {path} (check the path; a relative path is taken from {os.getcwd()})")
    if not os.path.isfile(path):
        raise BadInput(f"{path} is not a regular file (a device or a pipe?): pass the .safetensors file itself")
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise BadInput(f"{path} is not a readable safetensors file ({os.path.getsize(path):,} bytes; a truncated "
                       f"download or a .ckpt/.bin pickle?). Pass the .safetensors file itself. Reader said: {e}") from e
    return f, f.metadata() or {}


def safetensors_in(folder):
    """The first few .safetensors names in a folder, for the message of a folder passed as a file."""
    try:
        return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[:5]
    except OSError:
        return []


def describe(keys):
    """A guess at what a weight file is, from its tensor names, for error messages."""
    keys = set(keys)
    has = lambda *frags: any(all(fr in k for fr in frags) for k in keys)
    if has("text_encoders.") and has("diffusion_model."):
        return "a ComfyUI all-in-one checkpoint (DiT, Gemma and AE together)"
    if has("lora_down") or has("lora_A") or has("lora_up"):
        return "a LoRA file, not a base model"
    if has("post_feedforward_layernorm"):
        return "the Gemma-2 text encoder (gemma_2_2b_fp16.safetensors)"
    if has("decoder.conv_in") or has("decoder.up.0.block"):
        return "the FLUX autoencoder (ae.safetensors)"
    if has("cap_embedder.1.weight"):
        return "a Lumina 2 Next-DiT"
    if has("attn.to_q") and has("time_caption_embed"):
        return "a diffusers-format Lumina2Transformer2DModel (pass the original single file, e.g. lumina_2_model_bf16.safetensors)"
    if has("input_blocks.") or (has("down_blocks.") and has("attentions.")):
        return "an SD/SDXL UNet"
    if has("double_blocks."):
        return "a FLUX transformer"
    return f"an unknown model (first keys: {sorted(keys)[:3]})"


def find_prefix(keys, prefixes, marker, path, wanted):
    for prefix in prefixes:
        if prefix + marker in keys:
            return prefix
    raise BadInput(f"{path} does not look like {wanted}: it looks like {describe(keys)}. Check which file goes to which setting.")


class WeightFile(NamedTuple):
    """What a safetensors header says about the model stored in it; names are without the model's prefix."""
    path: str
    f: object  # the open safe_open handle; tensor data is read through it by load_weights alone
    prefix: str
    shapes: dict  # name -> shape tuple
    dtypes: dict  # name -> safetensors dtype string ("BF16", "F8_E4M3", ...)
    metadata: dict
    described: str  # describe() of the whole file


def read_header(path, prefixes, marker, wanted):
    """Open a weight file and read its header only: the names, shapes and dtypes under the first known prefix
    that holds `marker`."""
    f, meta = open_safetensors(path)
    keys = set(f.keys())
    prefix = find_prefix(keys, prefixes, marker, path, wanted)
    slices = {k[len(prefix):]: f.get_slice(k) for k in keys if k.startswith(prefix)}
    return WeightFile(path, f, prefix, {k: tuple(s.get_shape()) for k, s in slices.items()},
                      {k: s.get_dtype() for k, s in slices.items()}, meta, describe(keys))


# the stored dtypes load_weights casts from (fp8 is upcast exactly); integers or float64 in a weight file mean
# a different kind of file or an edited one
FLOAT_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_scales(names, expected):
    """ComfyUI's "scaled fp8" files: a `scaled_fp8` marker tensor (its dtype names the fp8 format), and next
    to each quantised `<module>.weight` an fp32 `<module>.scale_weight` (W = weight * scale_weight) and
    sometimes a `<module>.scale_input` (an activation scale for fp8 matmuls, unused once W is upcast).
    -> {weight name: scale name}, and the names that are not model tensors but belong to that layout."""
    scales = {n[: -len("scale_weight")] + "weight": n for n in names if n.endswith(".scale_weight")}
    scales = {w: n for w, n in scales.items() if w in expected and n not in expected}
    extra = {n for n in names if n == "scaled_fp8" or (n.endswith(".scale_input") and n not in expected)}
    return scales, set(scales.values()) | extra


def listed(names, limit=5):
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} {names[:limit]}"


def check_tensors(wf, expected, skip=()):
    """Everything the header tells about the file's tensors, against the model's {name: shape}: every expected
    name present and no other, each shape the model's, each dtype one that load_weights reads. Raises BadInput
    listing every problem; -> {weight name: its scale's name} for ComfyUI's scaled-fp8 weights."""
    names = set(wf.shapes) - set(skip)
    scales, fp8_extra = fp8_scales(names, expected)
    names -= fp8_extra
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    wrong_shape = sorted(n for n in names & set(expected) if wf.shapes[n] != tuple(expected[n]))
    wrong_dtype = sorted(n for n in (names & set(expected)) | set(scales.values()) if wf.dtypes[n] not in FLOAT_DTYPES)
    problems = []
    if missing:
        problems.append(f"missing {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"{listed(wrong_shape)} of the wrong shape: " +
                        ", ".join(f"{n} is {wf.shapes[n]} where the model has {tuple(expected[n])}" for n in wrong_shape[:5]))
    if wrong_dtype:
        problems.append(f"{listed(wrong_dtype)} of a dtype that is not a weight's: " +
                        ", ".join(f"{n} is {wf.dtypes[n]}" for n in wrong_dtype[:5]) + f" (weights are {'/'.join(FLOAT_DTYPES)})")
    if problems:
        raise BadInput(f"{wf.path} ({wf.described}) does not match the model its shapes describe: {'; '.join(problems)}. "
                       f"A damaged, edited or different file: re-download it or pass the original.")
    return scales


def descale(t, scale):
    """A scaled-fp8 weight times its scale (one per tensor, or per output row), in fp32: rounded once, by the cast after."""
    scale = scale.float()
    return t.float() * (scale if scale.numel() == 1 else scale.reshape(-1, *[1] * (t.dim() - 1)))


def nonfinite_count(t):
    """NaN/inf values in a tensor as stored. An fp32 sum is NaN or inf whenever any element is, so one reduction
    (no tensor-sized mask) screens it; only a tensor that fails the screen, or whose large finite values
    overflow the sum, is counted element by element (fp8 upcast first: isfinite has no fp8 kernel)."""
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return 0
    return int((~torch.isfinite(t.float() if t.dtype in FP8_DTYPES else t)).sum())


def read_finite(wf, name):
    """One tensor's data, refused if any value is NaN or inf: such a file would train or sample garbage silently."""
    t = wf.f.get_tensor(wf.prefix + name)
    bad = nonfinite_count(t)
    if bad:
        raise BadInput(f"{wf.path} has {bad:,} NaN/inf values in {name}: the file is damaged; re-download it")
    return t


def load_weights(model, wf, scales, dtype, device):
    """Fill a meta-device model strictly from a file check_tensors passed, casting each tensor as it is read so
    that only one copy of the weights ever exists. Files stored in fp8, plain or ComfyUI-scaled, load too."""
    sd = {}
    for name in model.state_dict():
        t = read_finite(wf, name)
        if name in scales:
            t = descale(t, read_finite(wf, scales[name]))
        sd[name] = t.to(device=device, dtype=dtype)  # a plain fp8 (e4m3fn / e5m2) tensor is upcast here, exactly
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class Checked(NamedTuple):
    """A weight file that passed every header check, and the meta-device model its tensors will fill."""
    file: WeightFile
    config: object  # NextDiT / AutoEncoder kwargs, or a Gemma2Config
    model: nn.Module
    scales: dict  # {weight name: scale name} of scaled-fp8 weights


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_on_meta(cls, config, wf):
    """cls(**config) on the meta device. Shapes that agree on sizes no model has (a width that is no multiple of
    the head size, say) fail to build: that is the file's fault, so it is a BadInput."""
    try:
        with torch.device("meta"):
            return cls(**config)
    except (AssertionError, ValueError, RuntimeError, IndexError) as e:
        raise BadInput(f"{wf.path} ({wf.described}): its tensor shapes describe no buildable {cls.__name__} ({config}; "
                       f"{e or type(e).__name__}). A damaged or edited file: re-download it.") from e


# -----------------------------------------------------------------------------
# the config a file's shapes describe: each value is the majority over every tensor that witnesses it, so one
# damaged tensor is outvoted and the shape check then blames it alone, not its intact neighbours

def majority(values, default):
    """The value most witnesses agree on; `default` when none is present. A tie (two witnesses, one damaged) goes
    to `default` if it is among the tied values (the usual size: cap_feat_dim = dim), else to the first listed."""
    counts = Counter(v for v in values if v > 0)
    if not counts:
        return default
    top = max(counts.values())
    tied = [v for v, n in counts.items() if n == top]
    return default if default in tied else tied[0]


def sizes(shapes, names, axis):
    """shapes[n][axis] of each name present with that axis (a tensor of the wrong rank just does not vote)."""
    return [shapes[n][axis] for n in names if n in shapes and len(shapes[n]) > axis]


def ending(shapes, starts, ends):
    """The names under any of the prefixes `starts` that end with any of `ends`, sorted."""
    return sorted(k for k in shapes if k.startswith(starts) and k.endswith(ends))


def block_count(shapes, starts):
    """1 + the highest block index under any of the prefixes (e.g. "layers."). A block with some or all of its
    tensors gone in the middle still counts, so they are reported missing instead of shrinking the model."""
    found = [int(i) for k in shapes for s in starts if k.startswith(s) and (i := k[len(s):].split(".")[0]).isdigit()]
    return max(found) + 1 if found else 0


DIT_BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")


def dit_config_from_shapes(shapes):
    """Recover NextDiT's constructor arguments from tensor shapes (patch 2, qk_norm assumed). A value no tensor
    witnesses falls back to the 2B's, so that the shape check can name what is missing."""
    blocks = lambda *ends: ending(shapes, DIT_BLOCKS, ends)
    dim = majority(sizes(shapes, ["x_embedder.weight", "x_embedder.bias", "cap_embedder.1.weight", "cap_embedder.1.bias",
                                  "norm_final.weight", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"], 0)
                   + sizes(shapes, ["final_layer.linear.weight"], 1)
                   + sizes(shapes, blocks(".attention.out.weight", "norm1.weight", "norm2.weight", ".feed_forward.w2.weight"), 0)
                   + sizes(shapes, blocks(".attention.qkv.weight", ".feed_forward.w1.weight", ".feed_forward.w3.weight"), 1), 2304)
    head_dim = majority(sizes(shapes, blocks(".attention.q_norm.weight", ".attention.k_norm.weight"), 0), 96)
    hidden = majority(sizes(shapes, blocks(".feed_forward.w1.weight", ".feed_forward.w3.weight"), 0)
                      + sizes(shapes, blocks(".feed_forward.w2.weight"), 1), ffn_hidden_dim(dim, 256, None))
    qkv_rows = majority(sizes(shapes, blocks(".attention.qkv.weight"), 0), dim + 2 * 8 * head_dim)
    cap_feat_dim = majority(sizes(shapes, ["cap_embedder.0.weight"], 0) + sizes(shapes, ["cap_embedder.1.weight"], 1), dim)
    patch_in = majority(sizes(shapes, ["x_embedder.weight"], 1) + sizes(shapes, ["final_layer.linear.weight", "final_layer.linear.bias"], 0), 64)
    a = head_dim // 3 // 2 * 2  # axes split: (32, 32, 32) for head_dim 96, (8, 4, 4) for 16
    if hidden == ffn_hidden_dim(dim, 256, None):
        multiple_of, mult = 256, None
    else:  # round_up(int(mult * 4 dim), hidden) == hidden reproduces any width
        multiple_of, mult = hidden, (None if hidden >= 4 * dim else hidden / (4 * dim))
    return dict(patch_size=2, in_channels=patch_in // 4, dim=dim, n_layers=block_count(shapes, ["layers."]),
                n_refiner_layers=block_count(shapes, ["noise_refiner.", "context_refiner."]), n_heads=dim // head_dim,
                n_kv_heads=(qkv_rows - dim) // (2 * head_dim), multiple_of=multiple_of, ffn_dim_multiplier=mult,
                norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap_feat_dim, axes_dims=(head_dim - 2 * a, a, a), axes_lens=(300, 512, 512))


def layers_left(config, preset):
    """"25 of its 26 main layers (layers.25.* missing)", and the same for the refiners, for a preset less layers."""
    parts = []
    for key, what, prefixes in (("n_layers", "main", ["layers"]), ("n_refiner_layers", "refiner", ["noise_refiner", "context_refiner"])):
        have, full = config[key], preset[key]
        if have < full:
            gone = [f"{p}.{have}.*" if full - have == 1 else f"{p}.{have}-{full - 1}.*" for p in prefixes]
            parts.append(f"{have} of its {full} {what} layers ({', '.join(gone)} missing)")
    return " and ".join(parts)


def ffn_width_only(config):
    """A NextDiT config with multiple_of and ffn_dim_multiplier replaced by the FFN width they give: different
    pairs build the same model (the tiny preset's 16 and the 256 read back from its file), so only the width compares."""
    config = dict(config, ffn_hidden=ffn_hidden_dim(config["dim"], config["multiple_of"], config["ffn_dim_multiplier"]))
    del config["multiple_of"], config["ffn_dim_multiplier"]
    return config


def check_dit_preset(config, path):
    """A file that is a known preset less some of its layers is refused: a truncated or edited 2B would otherwise
    load as a smaller model, silently. Any other config that is no preset loads with one warning that names the
    nearest preset and how this file differs (a custom or test model is fine, a surprise is not)."""
    config = ffn_width_only(config)
    presets = {name: ffn_width_only(preset) for name, preset in DIT_PRESETS.items()}
    diffs = {name: [k for k in preset if config[k] != preset[k]] for name, preset in presets.items()}
    if not all(diffs.values()):
        return
    for name, keys in diffs.items():
        preset = presets[name]
        if set(keys) <= {"n_layers", "n_refiner_layers"} and all(config[k] <= preset[k] for k in keys):
            raise BadInput(f"{path} looks like the {name} Next-DiT with {layers_left(config, preset)}: a truncated or edited "
                           f"file? Re-download it, or pass the original {name} file.")
    name = min(diffs, key=lambda n: len(diffs[n]))
    how = ", ".join(f"{k}={config[k]} where {name} has {presets[name][k]}" for k in diffs[name])
    warnings.warn(f"{path} is not a known Lumina 2 preset: {how}. It loads as the model its shapes describe; if you "
                  f"meant the {name} model, this is the wrong file.", stacklevel=4)


def inspect_dit(path):
    """Every check load_dit makes before it reads tensor data, from the safetensors header alone (seconds for the
    2B), in the order a message is most useful: what it is, its tensors, its preset -> Checked. Raises BadInput for
    a missing, unreadable, wrong, truncated-to-fewer-layers or damaged file; warns for a config that is no preset."""
    wf = read_header(path, DIT_PREFIXES, "cap_embedder.1.weight", "a Lumina 2 Next-DiT (lumina_2_model_bf16.safetensors)")
    config = dit_config_from_shapes(wf.shapes)
    model = build_on_meta(NextDiT, config, wf)
    scales = check_tensors(wf, shapes_of(model))
    check_dit_preset(config, path)
    return Checked(wf, config, model, scales)


def load_dit(path, dtype=torch.bfloat16, device="cpu"):
    """lumina_2_model_bf16.safetensors / lumina-image-2.safetensors / an all-in-one checkpoint -> NextDiT."""
    c = inspect_dit(path)
    return load_weights(c.model, c.file, c.scales, dtype, device)


def ae_config_from_shapes(shapes):
    """The FLUX AE's constructor arguments from tensor shapes, each by majority as for the DiT."""
    ch = majority(sizes(shapes, ["encoder.conv_in.weight", "encoder.conv_in.bias", "encoder.down.0.block.0.norm1.weight"], 0)
                  + sizes(shapes, ["encoder.down.0.block.0.conv1.weight"], 1), 128)
    levels = block_count(shapes, ["encoder.down.", "decoder.up."])
    res_blocks = majority([block_count(shapes, [f"encoder.down.{i}.block."]) for i in range(levels)]
                          + [block_count(shapes, [f"decoder.up.{i}.block."]) - 1 for i in range(levels)], 2)
    # every tensor of level i that is as wide as its output: ch * ch_mult[i] channels, in the encoder and decoder alike
    outputs = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "norm2.weight", "norm2.bias", "nin_shortcut.weight",
               "nin_shortcut.bias", "sample.conv.weight", "sample.conv.bias")
    widths = [majority(sizes(shapes, ending(shapes, (f"encoder.down.{i}.", f"decoder.up.{i}."), outputs), 0), ch) for i in range(levels)]
    return dict(ch=ch, ch_mult=tuple(max(w // ch, 1) for w in widths), num_res_blocks=res_blocks,
                z_channels=majority(sizes(shapes, ["decoder.conv_in.weight"], 1)
                                    + [n // 2 for n in sizes(shapes, ["encoder.conv_out.weight", "encoder.conv_out.bias"], 0)], 16),
                in_channels=majority(sizes(shapes, ["encoder.conv_in.weight"], 1), 3),
                out_ch=majority(sizes(shapes, ["decoder.conv_out.weight", "decoder.conv_out.bias"], 0), 3))


def inspect_ae(path):
    """Every check load_ae makes before it reads tensor data, from the header alone: what it is, then its tensors
    against the model its shapes describe -> Checked. Raises BadInput."""
    wf = read_header(path, AE_PREFIXES, "decoder.conv_in.weight", "the FLUX autoencoder (ae.safetensors)")
    config = ae_config_from_shapes(wf.shapes)
    model = build_on_meta(AutoEncoder, config, wf)
    return Checked(wf, config, model, check_tensors(wf, shapes_of(model)))


def load_ae(path, dtype=torch.bfloat16, device="cpu"):
    """ae.safetensors (BFL layout, also under a vae. prefix) -> AutoEncoder."""
    c = inspect_ae(path)
    return load_weights(c.model, c.file, c.scales, dtype, device)


def gemma_file_keys(config):
    """name -> shape of every tensor a Gemma-2 file holds under `model.` (built on the meta device)."""
    from transformers import Gemma2Model
    with torch.device("meta"):
        sd = Gemma2Model(gemma_config(**config.to_dict())).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def gemma_config_of(wf):
    """gemma-2-2b's config, or the one in the file's `gemma2_config` metadata (tiny test files carry one)."""
    try:
        return gemma_config(**json.loads(wf.metadata.get("gemma2_config", "{}")))
    except (ValueError, TypeError) as e:
        raise BadInput(f"{wf.path}: its gemma2_config metadata is not a Gemma-2 config ({e}); re-download the file") from e


def tokenizer_proto(wf, tokenizer):
    """The SentencePiece model: from `tokenizer` (a tokenizer.model file or a folder holding one) if given, else the
    file's embedded `spiece_model` tensor (small: the one tensor read before the checks pass). Checked to parse."""
    if tokenizer is not None:
        source = os.path.join(tokenizer, "tokenizer.model") if os.path.isdir(tokenizer) else tokenizer
        if not os.path.isfile(source):
            raise BadInput(f"tokenizer not found: {source} (pass a tokenizer.model file or a folder holding one)")
        with open(source, "rb") as fh:
            proto = fh.read()
    else:
        spiece = next((k for k in SPIECE_KEYS if k in wf.f.keys()), None)
        if spiece is None:
            raise BadInput(f"{wf.path} holds no `spiece_model` tokenizer tensor; pass tokenizer=<folder with tokenizer.model>")
        source = f"{wf.path}'s {spiece} tensor"
        proto = wf.f.get_tensor(spiece).numpy().tobytes()
    import sentencepiece
    try:
        sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise BadInput(f"{source} is not a SentencePiece tokenizer ({len(proto):,} bytes that do not parse): "
                       f"a damaged file; re-download it") from e
    return proto


def inspect_text_encoder(path, tokenizer=None, max_length=256):
    """Every check load_text_encoder makes before it reads weight data, from the header and the small tokenizer
    tensor (which must parse): what it is, its config, its tokenizer, its tensors against that config -> Checked."""
    wf = read_header(path, GEMMA_PREFIXES, "layers.0.post_feedforward_layernorm.weight", "the Gemma-2 text encoder (gemma_2_2b_fp16.safetensors)")
    config = gemma_config_of(wf)
    proto = tokenizer_proto(wf, tokenizer)
    scales = check_tensors(wf, gemma_file_keys(config), skip=SPIECE_KEYS)
    with torch.device("meta"):
        te = TextEncoder(config, proto, max_length)
    return Checked(wf, config, te, scales)


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", tokenizer=None, max_length=256):
    """gemma_2_2b_fp16.safetensors (or an all-in-one checkpoint) -> TextEncoder. The tokenizer comes from
    the embedded `spiece_model` tensor, or from `tokenizer` (a tokenizer.model file or a folder holding one).
    The config is gemma-2-2b's unless the file's metadata carries `gemma2_config` (tiny test files do). The file
    holds the last layer and final norm too (checked); they are not loaded, since the features come before them."""
    c = inspect_text_encoder(path, tokenizer, max_length)
    te = c.model
    load_weights(te.model, c.file, c.scales, dtype, device)
    # non-persistent buffers are not in the file: rebuild them off the meta device
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding
    te.model.rotary_emb = Gemma2RotaryEmbedding(te.model.config).to(device)
    te.model.embed_tokens.embed_scale = torch.tensor(c.config.hidden_size ** 0.5, device=device)
    return te.eval().requires_grad_(False)
