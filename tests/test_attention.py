"""
Attention tests: set_attention()'s start-up checks, the per-forward AttentionMask, the SDPA routes and their
fused-only guard, and the flash-attn / sageattention glue. CPU, offline.

    python -m pytest -q test_attention.py

The flash and sage kernels cannot run here, so their glue is tested against references written below that
keep each kernel's API contract: layout ((B, S, H, D) dense, NHD for sage; packed (total, H, D) with int32
cu_seqlens for varlen), GQA by head groups, fp16/bf16 only and the head_dim limits. On a CUDA machine with the
packages installed, test_real_kernels_match_math also runs the real kernels and test_cuda_sdpa_takes_a_fused_kernel
the real guard.

Tolerances (max|a-b| / max|b|): fp32 against fp32 math <= 1e-6, since only the summation order differs (a few
fp32 ulps of 1.2e-7; that order differs between CPU kernels, ATEN_CPU_CAPABILITY=default vs avx2). The glue
references and math both run fp32 inside and round once to bf16, so they can differ by one bf16 ulp where a
rounding flips: 2^-7 of the value, <= 8e-3. bf16 SDPA on the CPU may round the softmax weights to bf16 before
the weighted sum as well: <= 1.6e-2 (two bf16 ulps).
"""
import importlib.util
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lumina2
from testutil import perturb_norms, ragged_batch, rel_err

FP32_TOL = 1e-6
GLUE_TOL = 2 ** -7  # one bf16 ulp
BF16_SDPA_TOL = 2 * 2 ** -7  # two bf16 ulps


@pytest.fixture(autouse=True)
def restore_backend():
    """set_attention() writes module state: every test leaves it as it found it."""
    saved = (lumina2.ATTENTION, dict(lumina2.ROUTES), lumina2.flash_attn_func, lumina2.flash_attn_varlen_func,
             lumina2.sageattn, lumina2.sageattn_varlen)
    yield
    (lumina2.ATTENTION, routes, lumina2.flash_attn_func, lumina2.flash_attn_varlen_func,
     lumina2.sageattn, lumina2.sageattn_varlen) = saved
    lumina2.ROUTES.clear()
    lumina2.ROUTES.update(routes)


# -----------------------------------------------------------------------------
# reference kernels with the flash-attn 2.8 and sageattention 2 APIs

def check_kernel_contract(q, k, v, max_head_dim, head_axis):
    """The input checks both packages make (flash-attn's flash_api.cpp, sageattention's core.py)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    assert k.dtype == q.dtype and v.dtype == q.dtype, "query, key and value must have the same dtype"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "Input tensor must have contiguous last dimension"
    assert q.shape[-1] <= max_head_dim, f"head_dim {q.shape[-1]} above {max_head_dim}"
    assert k.shape == v.shape and q.shape[-1] == k.shape[-1]
    assert q.shape[head_axis] % k.shape[head_axis] == 0, "Number of heads in key/value must divide number of heads in query"


def grouped_attention(q, k, v, scale):
    """One sequence: q (Sq, Hq, D), k/v (Sk, Hkv, D) -> (Sq, Hq, D) in q.dtype, fp32 inside; query head h reads
    kv head h // (Hq / Hkv) (consecutive query heads share a kv head, flash-attn's GQA convention)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // groups].float(), v[:, h // groups].float()
        out[:, h] = torch.softmax(q[:, h].float() @ kh.T * scale, dim=-1) @ vh
    return out.to(q.dtype)


def check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes):
    assert q.ndim == 3 and k.ndim == 3, "varlen takes packed (total, heads, head_dim) tensors"
    assert cu_seqlens_q.dtype in dtypes and cu_seqlens_k.dtype in dtypes, f"cu_seqlens must have dtype {dtypes}"
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), "max_seqlen is a Python int"
    assert cu_seqlens_q[0] == 0 and cu_seqlens_q[-1] == q.shape[0] and cu_seqlens_k[-1] == k.shape[0]
    assert int(cu_seqlens_q.diff().max()) <= max_seqlen_q and int(cu_seqlens_k.diff().max()) <= max_seqlen_k


def ref_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
    """flash_attn_func: q (B, S, Hq, D), k/v (B, S, Hkv, D) -> (B, S, Hq, D)."""
    check_kernel_contract(q, k, v, 256, head_axis=2)
    assert q.ndim == 4 and dropout_p == 0.0 and not causal
    scale = softmax_scale or q.shape[-1] ** -0.5
    return torch.stack([grouped_attention(q[b], k[b], v[b], scale) for b in range(q.shape[0])])


def ref_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **unused):
    """flash_attn_varlen_func: q (total_q, Hq, D), k/v (total_k, Hkv, D), sequence i at cu_seqlens[i]:cu_seqlens[i+1]."""
    check_kernel_contract(q, k, v, 256, head_axis=1)
    check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, (torch.int32,))
    assert dropout_p == 0.0 and not causal
    scale = softmax_scale or q.shape[-1] ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([grouped_attention(q[a:b], k[c:d], v[c:d], scale) for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])])


@torch.no_grad()  # sageattention has no backward: its output carries no graph
def ref_sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **unused):
    """sageattn: (B, H, S, D) for "HND" (its default), (B, S, H, D) for "NHD"; the output in the input's layout."""
    assert tensor_layout in ("HND", "NHD") and not is_causal and not return_lse
    if tensor_layout == "HND":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    check_kernel_contract(q, k, v, 128, head_axis=2)
    scale = sm_scale or q.shape[-1] ** -0.5
    o = torch.stack([grouped_attention(q[b], k[b], v[b], scale) for b in range(q.shape[0])])
    return o.transpose(1, 2) if tensor_layout == "HND" else o


@torch.no_grad()
def ref_sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=False,
                        sm_scale=None, smooth_k=True, **unused):
    """sageattn_varlen: packed (total, H, D) like flash-attn's; cu_seqlens int32 or int64."""
    check_kernel_contract(q, k, v, 128, head_axis=1)
    check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, (torch.int32, torch.int64))
    assert not is_causal
    scale = sm_scale or q.shape[-1] ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([grouped_attention(q[a:b], k[c:d], v[c:d], scale) for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])])


def use_backend(name, monkeypatch):
    """Select a backend without the package check: flash and sage get the reference kernels above."""
    monkeypatch.setattr(lumina2, "ATTENTION", name)
    monkeypatch.setattr(lumina2, "flash_attn_func", ref_flash_attn_func)
    monkeypatch.setattr(lumina2, "flash_attn_varlen_func", ref_flash_attn_varlen_func)
    monkeypatch.setattr(lumina2, "sageattn", ref_sageattn)
    monkeypatch.setattr(lumina2, "sageattn_varlen", ref_sageattn_varlen)
    lumina2.ROUTES.clear()


def qkv(dtype, B=3, S=11, Hq=6, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv)]


def key_mask(lens, S=11):
    return torch.arange(S)[None] < torch.tensor(lens)[:, None]


def independent_reference(q, k, v, mask):
    """Per sample and head, only the valid keys, kv head h // (Hq / Hkv): fp32, written without repeat_interleave."""
    B, S, Hq, D = q.shape
    groups = Hq // k.shape[2]
    want = torch.zeros(B, S, Hq, D)
    for b in range(B):
        keys = mask[b]
        for h in range(Hq):
            kh, vh = k[b, keys, h // groups].float(), v[b, keys, h // groups].float()
            want[b, :, h] = torch.softmax(q[b, :, h].float() @ kh.T / math.sqrt(D), dim=-1) @ vh
    return want


# -----------------------------------------------------------------------------
# set_attention and the call-time checks

def test_set_attention_checks_name_device_dtype_and_package():
    with pytest.raises(ValueError, match="one of 'sdpa', 'flash', 'sage', 'math', got 'xformers'"):
        lumina2.set_attention("xformers")
    for name in ("flash", "sage"):
        with pytest.raises(ValueError, match=f"attention='{name}' runs only on CUDA, not on device='cpu'.*'sdpa'"):
            lumina2.set_attention(name, torch.bfloat16, "cpu")
        with pytest.raises(ValueError, match=f"attention='{name}' needs bf16 or fp16 weights, got torch.float32.*mixed_precision='bf16'"):
            lumina2.set_attention(name, torch.float32, "cuda:0")
        package = {"flash": "flash_attn", "sage": "sageattention"}[name]
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ImportError, match=f"attention='{name}' needs the .* package"):
                lumina2.set_attention(name, torch.bfloat16, "cuda")
    assert lumina2.ATTENTION == "sdpa"  # a rejected choice changes nothing
    lumina2.ROUTES["stale"] = 1
    lumina2.set_attention("math", torch.float32, "cpu")
    assert lumina2.ATTENTION == "math" and lumina2.ROUTES == {}


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_kernels_check_inputs_at_call_time(name, monkeypatch):
    use_backend(name, monkeypatch)
    q, k, v = qkv(torch.float32)
    with pytest.raises(TypeError, match=f"attention='{name}' got torch.float32 q/k/v, but its kernels take only fp16/bf16"):
        lumina2.attention(q, k, v, None)
    monkeypatch.setattr(lumina2, "flash_attn_func" if name == "flash" else "sageattn", None)
    with pytest.raises(RuntimeError, match=r"no kernel bound: select it with lumina2.set_attention"):
        lumina2.attention(*(t.bfloat16() for t in (q, k, v)), None)
    sdpa_mask = lumina2.AttentionMask("sdpa", key_mask([11, 4, 8]))
    with pytest.raises(RuntimeError, match="mask built for 'sdpa' reached attention="):
        lumina2.attention(q, k, v, sdpa_mask)


def test_sage_refuses_to_train(monkeypatch):
    use_backend("sage", monkeypatch)
    q, k, v = qkv(torch.bfloat16)
    with pytest.raises(RuntimeError, match="attention='sage' has no backward"):
        lumina2.attention(q.requires_grad_(), k, v, None)
    with torch.no_grad():
        lumina2.attention(q, k, v, None)  # sampling is fine


# -----------------------------------------------------------------------------
# the flash and sage glue against math, through the reference kernels

@pytest.mark.parametrize("name", ["flash", "sage"])
def test_kernel_glue_matches_math(name, monkeypatch):
    use_backend(name, monkeypatch)
    q, k, v = qkv(torch.bfloat16)
    for lens in ([11, 4, 8], [3, 11, 1]):  # ragged, the longest first and in the middle, a one-token row
        keys = key_mask(lens)
        mask = lumina2.attention_mask(keys, max(lens), torch.bfloat16)
        assert mask.bias is None and mask.max_seqlen == 11 and mask.cu_seqlens.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
        got = lumina2.attention(q, k, v, mask)
        want = lumina2.math_attention(q, k, v, keys)
        err = rel_err(got[keys], want[keys])
        print(f"{name}-varlen glue vs math, bf16, lens {lens}: rel err {err:.2e}")
        assert got.shape == q.shape and got.dtype == torch.bfloat16
        assert err <= GLUE_TOL and rel_err(want[keys], independent_reference(q, k, v, keys)[keys]) <= GLUE_TOL
        assert got[~keys].eq(0).all()  # masked query rows come back 0
    err = rel_err(lumina2.attention(q, k, v, None), lumina2.math_attention(q, k, v, None))
    print(f"{name}-dense glue vs math, bf16: rel err {err:.2e}")
    assert err <= GLUE_TOL
    assert lumina2.attention_report("cpu")["routes"] == {f"{name}-varlen": 2, f"{name}-dense": 1}


# -----------------------------------------------------------------------------
# SDPA: the expanded masked path, the unmasked GQA path and the fused-only guard

@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_routes_match_math(dtype, guard, monkeypatch):
    # guard=True runs the CUDA code path on the CPU: only fused kernels allowed (the CPU flash kernel takes these)
    use_backend("sdpa", monkeypatch)
    monkeypatch.setattr(lumina2, "fused_sdpa_only", lambda device: guard)
    tol = FP32_TOL if dtype == torch.float32 else BF16_SDPA_TOL
    q, k, v = qkv(dtype)
    keys = key_mask([11, 4, 8])
    mask = lumina2.attention_mask(keys, 11, dtype)
    assert mask.indices is None and mask.bias.shape == (3, 1, 1, 11) and mask.bias.dtype == dtype
    masked = rel_err(lumina2.attention(q, k, v, mask), lumina2.math_attention(q, k, v, keys))
    unmasked = rel_err(lumina2.attention(q, k, v, None), lumina2.math_attention(q, k, v, None))
    print(f"sdpa vs math, {dtype}, guard {guard}: masked rel err {masked:.2e}, unmasked {unmasked:.2e}")
    assert masked <= tol and unmasked <= tol
    unmasked_route = "sdpa-expanded-unmasked" if guard and dtype == torch.float32 else "sdpa-gqa-unmasked"
    assert lumina2.attention_report("cpu")["routes"] == {"sdpa-expanded-masked": 1, unmasked_route: 1}


def test_guard_allows_only_fused_kernels(monkeypatch):
    """What the kernels may be, seen from inside the SDPA call; independent of which CPU kernel then runs."""
    assert lumina2.attention_report("cuda")["sdpa_allowed"] == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
    assert lumina2.attention_report("cpu")["sdpa_allowed"] == ["any"]
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        b = torch.backends.cuda
        seen.append((b.math_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled()))
        return real(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    use_backend("sdpa", monkeypatch)
    q, k, v = qkv(torch.float32)
    mask = lumina2.attention_mask(key_mask([11, 4, 8]), 11, torch.float32)
    for guard in (True, False):
        monkeypatch.setattr(lumina2, "fused_sdpa_only", lambda device: guard)
        lumina2.attention(q, k, v, mask)
        lumina2.attention(q, k, v, None)
    assert seen[:2] == [(False, True, True, True)] * 2  # math off, every fused kernel on
    assert seen[2:] == [(True, True, True, True)] * 2  # no guard: torch's own choice, math included
    assert torch.backends.cuda.math_sdp_enabled()  # the guard leaves the global setting as it was


def test_guard_raises_instead_of_the_math_fallback(monkeypatch):
    # the CPU's fused (flash) kernel has no gradient for the mask: only math could run this, so the guard refuses
    q, k, v = qkv(torch.float32, Hkv=6)
    bias = torch.zeros(3, 1, 1, 11).masked_fill(~key_mask([11, 4, 8])[:, None, None], float("-inf")).requires_grad_()
    monkeypatch.setattr(lumina2, "fused_sdpa_only", lambda device: True)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="No available kernel"):
        warnings.simplefilter("ignore")  # torch's notes on why each kernel declined
        lumina2.sdpa(q, k, v, bias=bias)
    monkeypatch.setattr(lumina2, "fused_sdpa_only", lambda device: False)
    assert rel_err(lumina2.sdpa(q, k, v, bias=bias), lumina2.math_attention(q, k, v, key_mask([11, 4, 8]))) <= FP32_TOL


def test_compiled_block_takes_the_mask_without_graph_breaks(monkeypatch):
    use_backend("sdpa", monkeypatch)
    monkeypatch.setattr(lumina2, "fused_sdpa_only", lambda device: True)
    torch.manual_seed(0)
    block = lumina2.TransformerBlock(64, 4, 2, 16, None, 1e-5, True, modulation=True).eval()
    x, c = torch.randn(3, 11, 64), torch.randn(3, 64)
    rope = tuple(t.expand(3, -1, -1) for t in (torch.ones(1, 11, 8), torch.zeros(1, 11, 8)))
    mask = lumina2.attention_mask(key_mask([11, 4, 8]), 11, torch.float32)
    compiled = torch.compile(block, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        assert rel_err(compiled(x, mask, rope, c), block(x, mask, rope, c)) <= FP32_TOL


# -----------------------------------------------------------------------------
# the whole DiT: one mask per forward, backends agree, padding and batching invariances

@pytest.fixture
def tiny_dit():
    torch.manual_seed(0)
    return perturb_norms(lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], cap_feat_dim=32))).eval()


@pytest.mark.parametrize("name", ["sdpa", "flash", "math"])
def test_dit_builds_each_mask_once_per_forward(name, tiny_dit, monkeypatch):
    use_backend(name, monkeypatch)
    model = tiny_dit.to(torch.bfloat16) if name == "flash" else tiny_dit
    built, passed = [], []
    build, attend = lumina2.attention_mask, lumina2.attention
    monkeypatch.setattr(lumina2, "attention_mask", lambda *a: built.append(build(*a)) or built[-1])
    monkeypatch.setattr(lumina2, "attention", lambda q, k, v, mask: passed.append(mask) or attend(q, k, v, mask))
    x, t, cap, mask = ragged_batch()
    with torch.no_grad():
        model(x, t, cap, mask)
        assert len(built) == 2 and [m.keys.shape for m in built] == [(3, 12), (3, 12 + 4 * 6)]
        assert [id(m) for m in passed] == [id(built[0]), id(None), id(built[1]), id(built[1])]  # context, noise, 2 joint
        varlen = name == "flash"
        assert all((m.bias is not None) == (name == "sdpa") and (m.indices is not None) == varlen for m in built)
        if varlen:
            assert [m.max_seqlen for m in built] == [12, 12 + 24] and built[1].indices.numel() == 12 + 5 + 9 + 3 * 24
        model(x, t, cap, torch.ones_like(mask))  # one caption length: no mask at all
    assert len(built) == 2 and passed[4:] == [None] * 4


@pytest.mark.parametrize("name", ["math", "flash", "sage"])
def test_dit_backends_agree(name, tiny_dit, monkeypatch):
    x, t, cap, mask = ragged_batch()
    dtype = torch.float32 if name == "math" else torch.bfloat16  # flash/sage: the glue runs only in bf16
    model = tiny_dit.to(dtype)
    outs = {}
    with torch.no_grad():
        for backend in ("sdpa", name) if name == "math" else ("math", name):
            use_backend(backend, monkeypatch)
            outs[backend] = model(x, t, cap, mask)
    base = "sdpa" if name == "math" else "math"
    err = rel_err(outs[name], outs[base])
    print(f"tiny DiT {name} vs {base}, {dtype}: rel err {err:.2e}")
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2)  # bf16: attention differs by <= 1 ulp, then 3 more layers


@pytest.mark.parametrize("name", ["sdpa", "math"])
def test_padding_invariance(name, tiny_dit):
    lumina2.set_attention(name, torch.float32, "cpu")
    x, t, cap, mask = ragged_batch()
    with torch.no_grad():
        ref = tiny_dit(x, t, cap, mask)
        # pad to 256 with junk in the padded slots: the output must not move
        pad = torch.randn(3, 256 - cap.shape[1], cap.shape[2]) * 1000
        long = tiny_dit(x, t, torch.cat([cap, pad], 1), F.pad(mask, (0, pad.shape[1])))
    assert torch.equal(ref, long)


@pytest.mark.parametrize("name", ["sdpa", "math"])
def test_batch_of_3_equals_three_batches_of_1(name, tiny_dit):
    lumina2.set_attention(name, torch.float32, "cpu")
    x, t, cap, mask = ragged_batch()
    with torch.no_grad():
        batched = tiny_dit(x, t, cap, mask)
        single = torch.cat([tiny_dit(x[i:i + 1], t[i:i + 1], cap[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())])
                            for i in range(3)])
    err = rel_err(batched, single)
    print(f"batch of 3 vs 3 x batch of 1, {name}, fp32: rel err {err:.2e}")
    assert err <= 1e-5


# -----------------------------------------------------------------------------
# the real kernels, where a CUDA device and the packages are there

def cuda_or_skip(package=None):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["flash", "sage"])
def test_real_kernels_match_math(name):
    cuda_or_skip({"flash": "flash_attn", "sage": "sageattention"}[name])
    lumina2.set_attention(name, torch.bfloat16, "cuda")
    q, k, v = (t.cuda() for t in qkv(torch.bfloat16, S=300, Hq=24, Hkv=8, D=96))
    keys = key_mask([300, 120, 7], S=300).cuda()
    tol = 1e-2 if name == "flash" else 5e-2  # sage quantises q/k to int8 (and p/v to fp8 on sm89/sm90)
    with torch.no_grad():
        got = lumina2.attention(q, k, v, lumina2.attention_mask(keys, 300, torch.bfloat16))
        assert rel_err(got[keys], lumina2.math_attention(q, k, v, keys)[keys]) <= tol and got[~keys].eq(0).all()
        assert rel_err(lumina2.attention(q, k, v, None), lumina2.math_attention(q, k, v, None)) <= tol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_takes_a_fused_kernel(dtype):
    cuda_or_skip()
    lumina2.set_attention("sdpa", dtype, "cuda")
    q, k, v = (t.cuda().requires_grad_() for t in qkv(dtype, S=300, Hq=24, Hkv=8, D=96))
    keys = key_mask([300, 120, 7], S=300).cuda()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the guard raises if only math could take these
    got = lumina2.attention(q, k, v, lumina2.attention_mask(keys, 300, dtype))
    got.float().sum().backward()
    with torch.no_grad():
        assert rel_err(got, lumina2.math_attention(q, k, v, keys)) <= tol
        assert rel_err(lumina2.attention(q, k, v, None), lumina2.math_attention(q, k, v, None)) <= tol
    assert set(lumina2.ROUTES) == {"sdpa-expanded-masked", "sdpa-gqa-unmasked" if dtype == torch.bfloat16 else "sdpa-expanded-unmasked"}
