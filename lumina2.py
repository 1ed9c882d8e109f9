"""
Lumina Image 2.0 in one file: the Next-DiT, the FLUX.1 autoencoder, the Gemma-2-2B text encoder, and their file loaders.

References (read, not copied):
  - Alpha-VLLM/Lumina-Image-2.0 models/model.py (NextDiT, the numerical reference)
  - black-forest-labs/flux src/flux/modules/autoencoder.py (the AE layout of ae.safetensors)
  - Hugging Face transformers Gemma2Model (the text encoder runs through it, eager attention)
  - diffusers Lumina2Transformer2DModel / AutoencoderKL (the independent references in test_parity.py)

Conventions (see README): the DiT takes t = 1 - sigma in [0, 1] (0 = noise, 1 = clean, no x1000) -> velocity v = x0 - noise.
Weights are stored in bf16; fp32 islands are marked "fp32 island". Attribute names are the checkpoint keys: loading is strict.

    python -c "import lumina2; m = lumina2.load_dit('lumina_2_model_bf16.safetensors'); print(m)"
    python -c "import lumina2; te = lumina2.load_text_encoder('gemma_2_2b_fp16.safetensors'); print(te(['a cat'])[0].shape)"
"""
import contextlib
import math
import warnings
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION = "sdpa"  # a key of BACKENDS ("math": the fp32 reference); set it with set_attention(), which checks it
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
    """pos (B, S, 3) ints -> (B, S, head_dim/2) fp32 angles, a block per axis. fp32 island: float64, rounded once, as official."""
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
    hidden = 4 * dim if ffn_dim_multiplier is None else int(ffn_dim_multiplier * (4 * dim))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# -----------------------------------------------------------------------------
# attention: one function, the backends of BACKENDS, chosen once at start-up by set_attention()

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
    """Select the backend of every later forward; called once at start-up, before any caching, so a bad choice fails at once.
    flash/sage need a CUDA device, fp16/bf16 weights (their kernels take no fp32: rejected, not quietly run another way) and
    the package; dtype or device None skips that check (dtype is checked again at call time). Clears ROUTES."""
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
    """One forward's key mask in its backend's forms, built once per sequence so no block (or recompute) syncs with the host."""
    backend: str  # the ATTENTION it was built for
    keys: torch.Tensor  # (B, S) bool, True = a valid key
    bias: torch.Tensor | None = None  # sdpa: (B, 1, 1, S) additive, 0 or -inf, in the compute dtype
    indices: torch.Tensor | None = None  # flash/sage: (N,) long, the valid tokens' places in the flattened B*S tokens
    cu_seqlens: torch.Tensor | None = None  # flash/sage: (B+1,) int32 cumulative valid lengths
    max_seqlen: int = 0  # flash/sage: the longest valid length


def attention_mask(keys, max_len, dtype, n_valid=None):
    """keys (B, S) bool, max_len its largest row count and n_valid its count of True (ints the caller holds), dtype the
    compute dtype -> AttentionMask with the fields ATTENTION needs. No host sync, but for the varlen backends when n_valid
    is None (nonzero(): the host waits to learn its size)."""
    if ATTENTION == "sdpa":
        bias = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, float("-inf"))
        return AttentionMask(ATTENTION, keys, bias=bias[:, None, None, :])
    if ATTENTION in ("flash", "sage"):
        cu_seqlens = F.pad(keys.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        flat = keys.flatten()
        # a stable sort puts the valid tokens first, in order: their places, of a size the host already knows
        indices = flat.nonzero().squeeze(1) if n_valid is None else torch.argsort(~flat, stable=True)[:n_valid]
        return AttentionMask(ATTENTION, keys, indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_len)
    return AttentionMask(ATTENTION, keys)


def fused_sdpa_only(device):
    """Whether SDPA on `device` may run only fused kernels: on CUDA its math fallback materialises fp32
    (B, H, S, S) scores, so it must fail loudly rather than run slowly. A function so CPU tests can turn it on."""
    return device.type == "cuda"


def attention_report(device):
    """For bench.py: the backend, the SDPA kernels allowed on `device` ("any": no guard), and the routes taken, with counts."""
    allowed = [b.name for b in FUSED_SDPA] if fused_sdpa_only(torch.device(device)) else ["any"]
    return dict(attention=ATTENTION, sdpa_allowed=allowed, routes=dict(ROUTES))


def attention(q, k, v, mask):
    """q (B, S, Hq, D), k/v (B, S, Hkv, D) (q head h reads kv head h // (Hq/Hkv)); mask None or an AttentionMask -> like q."""
    if mask is not None and mask.backend != ATTENTION:
        raise RuntimeError(f"an attention mask built for {mask.backend!r} reached attention={ATTENTION!r}: "
                           "call set_attention() before the forward, not during it")
    return BACKENDS[ATTENTION](q, k, v, mask)


def took(route):
    """Count an eager call's route in ROUTES; calls traced by torch.compile are not counted (a traced count is a constant)."""
    if not torch.compiler.is_compiling():
        ROUTES[route] = ROUTES.get(route, 0) + 1


def sdpa_attention(q, k, v, mask):
    """Unmasked fp16/bf16 (or off CUDA): SDPA with native GQA (flash SDPA on CUDA). Masked, or fp32 on CUDA (memory-efficient /
    cuDNN SDPA, no GQA): K/V expanded to the query heads plus the additive bias, as diffusers does; flash SDPA takes no mask."""
    if mask is None and (q.dtype in HALF or not fused_sdpa_only(q.device)):
        took("sdpa-gqa-unmasked")
        return sdpa(q, k, v, gqa=True)
    took("sdpa-expanded-" + ("unmasked" if mask is None else "masked"))
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    return sdpa(q, k, v, bias=None if mask is None else mask.bias.to(q.dtype))


def kernel_attention(q, k, v, mask):
    """flash-attn or sageattention (inference only), as ATTENTION says: the dense kernel unmasked, else varlen() (masked
    query rows are discarded downstream). GQA by head groups."""
    check_kernel_inputs(q, k, v)
    took(f"{ATTENTION}-" + ("dense" if mask is None else "varlen"))
    if ATTENTION == "flash":
        return flash_attn_func(q, k, v) if mask is None else varlen(flash_attn_varlen_func, q, k, v, mask)
    return sageattn(q, k, v, tensor_layout="NHD") if mask is None else varlen(sageattn_varlen, q, k, v, mask)


def reference_attention(q, k, v, mask):
    took("math")
    return math_attention(q, k, v, None if mask is None else mask.keys)


def sdpa(q, k, v, bias=None, gqa=False):
    """F.scaled_dot_product_attention on (B, S, H, D) tensors, bias None or (B, 1, 1, S) additive. Where fused_sdpa_only(),
    inputs no FUSED_SDPA kernel takes raise "No available kernel" (torch warns why each declined) instead of running math."""
    with sdpa_kernel(FUSED_SDPA) if fused_sdpa_only(q.device) else contextlib.nullcontext():
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


BACKENDS = {"sdpa": sdpa_attention, "flash": kernel_attention, "sage": kernel_attention, "math": reference_attention}


# -----------------------------------------------------------------------------
# Next-DiT modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

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
        self.q_norm, self.k_norm = (RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity() for _ in range(2))

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
        self.attention_norm1, self.ffn_norm1 = RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)
        self.attention_norm2, self.ffn_norm2 = RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), 4 * dim))

    def forward(self, x, mask, rope, c=None):
        # x (B, S, dim), mask None (every key valid) or an AttentionMask, rope (cos, sin) each (B, S, head_dim/2), c (B, 1024)
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

    def forward(self, x, t, cap_feats, cap_mask, cap_lens=None):
        """x (B, C, H, W) noisy latents, t (B,) = 1 - sigma, cap_feats (B, L, cap_feat_dim), cap_mask (B, L) right-padded
        validity, cap_lens its row counts on the host (a list of ints or a CPU tensor: the caller's batch has them there)
        -> velocity x0 - noise, (B, C, H, W) fp32. With cap_lens the forward never waits for the device; None reads them
        from cap_mask, one device-to-host sync when it is on a GPU."""
        B, C, H, W = x.shape
        p, dtype = self.patch_size, self.x_embedder.weight.dtype
        h, w = H // p, W // p
        lens = cap_mask.sum(1) if cap_lens is None else cap_lens
        lens = lens.tolist() if isinstance(lens, torch.Tensor) else [int(n) for n in lens]  # host ints
        L = max(lens)
        assert L < self.axes_lens[0], f"caption of {L} tokens: this model's RoPE table allows {self.axes_lens[0] - 1}"
        assert h <= self.axes_lens[1] and w <= self.axes_lens[2], f"latent {H}x{W} exceeds the RoPE table"
        # trimmed to the longest caption, the result is independent of padding; equal lengths need no mask (fast kernels)
        cap_mask = cap_mask[:, :L].bool()
        cap_lens = cap_mask.sum(1)  # (B,) on the mask's device, for the image positions: the same counts, no copy
        # one mask object per sequence and forward, read by every block: caption (B, L), joint (B, L + h*w)
        cap_attn = None if min(lens) == L else attention_mask(cap_mask, L, dtype, sum(lens))
        joint_attn = None if cap_attn is None else attention_mask(F.pad(cap_mask, (0, h * w), value=True), L + h * w, dtype,
                                                                  sum(lens) + B * h * w)

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


DIT_PRESETS = {"2b": dict(patch_size=2, in_channels=16, dim=2304, n_layers=26, n_refiner_layers=2, n_heads=24, n_kv_heads=8,
                          multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2304,
                          axes_dims=(32, 32, 32), axes_lens=(300, 512, 512)),
               "tiny": dict(patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
                            multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
                            axes_dims=(8, 4, 4), axes_lens=(300, 512, 512))}

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
        """images (B, 3, H, W) in [-1, 1] -> latents (B, 16, H/8, W/8) = 0.3611 (z - 0.1159), z the posterior mean or a sample."""
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


AE_PRESETS = {"flux": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16),
              "tiny": dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)}

# -----------------------------------------------------------------------------
# Gemma-2-2B text encoder

SYSTEM_PROMPTS = {
    "base": "You are an assistant designed to generate high-quality images based on user prompts.",
    "align": "You are an assistant designed to generate high-quality images with the highest degree of image-text alignment based on textual prompts.",
    "superior": "You are an assistant designed to generate superior images with the superior degree of image-text alignment based on textual prompts or user prompts.",
}
PROMPT_TAG = "<Prompt Start>"


def build_prompt(caption, system_prompt):
    """The official "{system} <Prompt Start> {caption}"; no system prompt: the bare caption; one ending in the tag: no second."""
    if not system_prompt:
        return caption
    system_prompt = system_prompt.rstrip()
    return f"{system_prompt} {caption}" if system_prompt.endswith(PROMPT_TAG) else f"{system_prompt} {PROMPT_TAG} {caption}"


def gemma_config(**overrides):
    """transformers' Gemma2Config for gemma-2-2b (its defaults), eager attention so the softcap applies."""
    from transformers import Gemma2Config
    cfg = Gemma2Config(**overrides)
    cfg.attn_logit_softcapping = 50.0 if GEMMA_SOFTCAP else None
    cfg._attn_implementation = "eager"
    return cfg


class TextEncoder(nn.Module):
    """Gemma-2 less its last layer and final norm: the output is the full model's hidden_states[-2] (the 2B's layer 24, raw)."""
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
        """-> ids (B, L) long and mask (B, L) bool: [BOS] + pieces, no EOS, truncated to max_length, right-padded with 0.
        A truncation warns, led by names[i] (a label such as the caption's file), quoting captions[i] (default: the text)."""
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
        """captions: list of str -> (features (B, L, hidden) in the weight dtype, mask (B, L) bool); names as in tokenize."""
        ids, mask = self.tokenize([build_prompt(c, system_prompt) for c in captions], names, captions)
        dev = self.model.embed_tokens.weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        return self.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state, mask


# -----------------------------------------------------------------------------
# loaders: one plain, strict loader per model (weightfiles.py checks a file first, then loads it through these)

DIT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
AE_PREFIXES = ("", "vae.", "first_stage_model.")
GEMMA_PREFIXES = ("model.", "text_encoders.gemma2_2b.transformer.model.", "")
SPIECE_KEYS = ("spiece_model", "text_encoders.spiece_model")


def file_tensors(path, prefixes, marker):
    """A .safetensors file -> {name: a function that reads the tensor}: the names under the first of `prefixes` holding
    `marker` (all-in-one checkpoints nest each model under one), the prefix cut off. Nothing is read yet."""
    from safetensors import safe_open
    f = safe_open(path, framework="pt", device="cpu")
    prefix = next((p for p in prefixes if p + marker in f.keys()), None)
    if prefix is None:
        raise ValueError(f"{path} holds no {marker} under any of the prefixes {prefixes}: it is not this model's file")
    return {k[len(prefix):]: partial(f.get_tensor, k) for k in f.keys() if k.startswith(prefix)}


def fill(model, tensors, dtype, device, extra=()):
    """A meta-device model -> the model holding `tensors` ({name: tensor, or a function reading it}), strictly: all of its
    tensors, each of its shape, none left over but names starting with `extra`. Each is cast as it is read, so only
    one copy of the weights ever exists (fp8 is upcast exactly)."""
    names = list(model.state_dict())
    missing = [k for k in names if k not in tensors]
    unused = [k for k in sorted(set(tensors) - set(names)) if not k.startswith(extra)]
    if missing or unused:
        raise ValueError(f"the tensors do not fit {type(model).__name__}: missing {missing[:5]}, unused {unused[:5]} "
                         "(weightfiles.py's loaders say what a file is and which of its tensors is wrong)")
    read = lambda t: t() if callable(t) else t
    model.load_state_dict({k: read(tensors[k]).to(device=device, dtype=dtype) for k in names}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def on_meta(cls, config):
    with torch.device("meta"):
        return cls(**config)


def load_dit(source, config="2b", dtype=torch.bfloat16, device="cpu"):
    """lumina_2_model_bf16.safetensors / lumina-image-2.safetensors / an all-in-one checkpoint (a path), or a
    {name: tensor} dict (see fill) -> NextDiT of `config`: a DIT_PRESETS name or NextDiT's keyword arguments."""
    tensors = source if isinstance(source, dict) else file_tensors(source, DIT_PREFIXES, "cap_embedder.1.weight")
    return fill(on_meta(NextDiT, DIT_PRESETS[config] if isinstance(config, str) else config), tensors, dtype, device)


def load_ae(source, config="flux", dtype=torch.bfloat16, device="cpu"):
    """ae.safetensors (also under vae.) or a {name: tensor} dict -> AutoEncoder of `config` (an AE_PRESETS name or kwargs)."""
    tensors = source if isinstance(source, dict) else file_tensors(source, AE_PREFIXES, "decoder.conv_in.weight")
    return fill(on_meta(AutoEncoder, AE_PRESETS[config] if isinstance(config, str) else config), tensors, dtype, device)


def load_text_encoder(source, config=None, dtype=torch.bfloat16, device="cpu", tokenizer=None, max_length=256):
    """gemma_2_2b_fp16.safetensors / an all-in-one checkpoint (a path), or a {name: tensor} dict -> TextEncoder. config: a
    Gemma2Config (None: gemma-2-2b's); tokenizer: SentencePiece model bytes (None: the file's `spiece_model`). See TextEncoder."""
    config = config or gemma_config()
    tensors = source if isinstance(source, dict) else file_tensors(source, GEMMA_PREFIXES, "layers.0.post_feedforward_layernorm.weight")
    if tokenizer is None:  # the SentencePiece model the file embeds
        from safetensors import safe_open
        with safe_open(source, framework="pt") as f:
            tokenizer = f.get_tensor(next(k for k in SPIECE_KEYS if k in f.keys())).numpy().tobytes()
    with torch.device("meta"):
        te = TextEncoder(config, tokenizer, max_length)
    fill(te.model, tensors, dtype, device, extra=(f"layers.{config.num_hidden_layers - 1}.", "norm."))
    # non-persistent buffers are not in the file: rebuild them off the meta device
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding
    te.model.rotary_emb = Gemma2RotaryEmbedding(te.model.config).to(device)
    te.model.embed_tokens.embed_scale = torch.tensor(config.hidden_size ** 0.5, device=device)
    return te.eval().requires_grad_(False)
