"""
Benchmark one step of training and sampling on one GPU: ours and diffusers' Lumina2Transformer2DModel on the same random
2B weights and inputs, in the same run. Prints the GPU correctness checks (bf16 vs fp32, ours vs diffusers) and one table
(ms, TFLOP/s, MFU against a bf16 matmul ceiling measured here, peak GB, beside it plan.py's prediction of that peak (the case
traced on fakegpu.py's stand-in GPU, so the first GPU run calibrates the planner), ratio to the diffusers row doing the same
work, attention routes), also written to bench.json. CASES: LoRA steps with memory.py's options, full fine-tuning (the 16 GB
Adafactor recipe, with and without CPU EMA; AdamW), the CFG sampling step. Training counts 2x forward FLOPs (frozen base)
or 3x (full), never checkpointing's recomputation. Peak memory on a CPU is the process's peak RSS: one case per run there.

    python bench.py                                    # H200: 2B, 1024^2, captions 256 padded / 120 valid
    python bench.py --iters=20 --side=512 --cases='["full_adafactor_fused"]'
    python bench.py --smoke=True                       # one 2304-wide layer, 64^2, CPU: checks the script runs
    python bench.py --check=True                       # the GPU check: pytest -m cuda + the table, to $OUT
    python bench.py --check=True --smoke=True          # the same check on a CPU in seconds (test_bench.py runs it)
    python bench.py --device=cpu --side=1024 --cases='["full_adafactor_fused"]' --checks=False --diffusers=False --iters=1 --warmup=0
"""
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import fakegpu
import lora
import lumina2
import memory
import optim
import plan
import sample
import train
from configurator import configure
from files import atomic_write

# -----------------------------------------------------------------------------
device = "cuda" if torch.cuda.is_available() else "cpu"
side = 1024  # image side in pixels: (side / 16)^2 image tokens
cap_len = 256  # caption features padded to this length ...
cap_valid = 120  # ... of which this many are valid (the uncond caption: cap_valid // 4)
iters = 10  # timed steps per case, after `warmup` untimed ones
warmup = 3
attention = "sdpa"
diffusers = True  # also time diffusers' Lumina2Transformer2DModel (needs the diffusers package)
cases = []  # a subset of CASES by name; [] = all
checks = True  # bf16 vs fp32 and ours vs diffusers on this device first
smoke = False  # a one-layer 2304-wide model at 64^2 on CPU, one step per case: checks that every case runs
check = False  # the GPU check: pytest -m cuda, then this table at few iters, JSON + markdown to $OUT (default ./out)
out = "bench.json"
# -----------------------------------------------------------------------------


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev):
    gc.collect()  # the fused step's hooks make reference cycles: free the previous case's model before measuring
    if torch.device(dev).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def timed(step, n, warm, dev):
    """Mean wall time of step() in ms over n calls after warm calls, and the peak memory during them."""
    for _ in range(warm):
        step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(dev)
    return (time.perf_counter() - t) / n * 1e3, memory.peak_memory_gb(dev)


def matmul_ceiling(dev):
    """bf16 TFLOP/s of a large square matmul: the ceiling MFU is quoted against."""
    gpu = torch.device(dev).type == "cuda"
    n = 8192 if gpu else 1024
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms, _ = timed(lambda: a @ b, 20 if gpu else 2, 3 if gpu else 1, dev)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def dit_config(c):
    cfg = dict(lumina2.DIT_PRESETS["2b"])
    if c.smoke:  # the real width and heads (diffusers' converter hard-codes them), one layer each, a 64-wide FFN
        cfg.update(n_layers=1, n_refiner_layers=1, multiple_of=64, ffn_dim_multiplier=64 / (4 * 2304))
    return cfg


def random_weights(cfg, seed=0):
    """Random bf16 weights on the CPU, the scale of a trained model's (std 0.02; norm scales 1)."""
    with torch.device("meta"):
        m = lumina2.NextDiT(**cfg)
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.ones(v.shape) if "norm" in k else torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
            for k, v in m.state_dict().items()}


def diffusers_model(cfg, sd, dev):
    from diffusers import Lumina2Transformer2DModel
    from diffusers.utils import logging
    logging.set_verbosity_error()  # its advice on casting with .to() concerns from_pretrained, not this
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
    with torch.device("meta"):
        m = Lumina2Transformer2DModel(hidden_size=cfg["dim"], num_layers=cfg["n_layers"], num_refiner_layers=cfg["n_refiner_layers"],
                                      num_attention_heads=cfg["n_heads"], num_kv_heads=cfg["n_kv_heads"],
                                      multiple_of=cfg["multiple_of"], ffn_dim_multiplier=cfg["ffn_dim_multiplier"],
                                      cap_feat_dim=cfg["cap_feat_dim"], in_channels=16)
    m.load_state_dict(convert_lumina2_to_diffusers(dict(sd)), strict=True, assign=True)
    # its RoPE table is a plain attribute computed in __init__, so it is rebuilt off the meta device
    m.rope_embedder = type(m.rope_embedder)(theta=10000, axes_dim=list(cfg["axes_dims"]), axes_lens=list(cfg["axes_lens"]), patch_size=2)
    return m.to(dev, torch.bfloat16).requires_grad_(False)


def inputs(c, cfg, bs, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = c.side // 8
    x0, noise = torch.randn(bs, 16, h, h, generator=g), torch.randn(bs, 16, h, h, generator=g)
    cap = torch.randn(bs, c.cap_len, cfg["cap_feat_dim"], generator=g).bfloat16()
    mask = torch.arange(c.cap_len)[None].expand(bs, -1) < c.cap_valid
    sigma = torch.rand(bs, generator=g)
    return [v.to(c.device) for v in (x0, noise, cap, mask, sigma)]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def predicted_gb(c, cfg, fn, kw):
    """plan.py's prediction of one of our cases' peak (GiB): its setup and step traced on fakegpu's stand-in, eager (compile
    and the attention backend aside), a CPU EMA costing the device nothing (its copies go through pinned host buffers)."""
    placed = dict(device=str(fakegpu.DEVICE), fp8_base=kw.get("fp8", False), blocks_to_swap=swapped(c, cfg, kw.get("swap", 0)))
    if fn is cfg_step:
        return plan.sample_step(plan.meta_dit(cfg), cfg, placed, c.side, (c.cap_valid, c.cap_valid // 4))["tracker"].peak / 2**30
    trained = dict(train_mode="lora" if fn is lora_step else "full", network_dim=16, network_alpha=16.0,
                   optimizer_type=kw.get("kind", "AdamW"), gradient_checkpointing=kw.get("ckpt", True),
                   fused_backward_pass=kw.get("fused", False))
    out = plan.train_step(plan.meta_dit(cfg), cfg, {**placed, **trained}, c.side, [c.cap_valid] * kw.get("bs", 1))
    return out["tracker"].peak / 2**30


class Unavailable(Exception):
    """A case this machine cannot run (no CUDA, a package not installed): its row says so, and it is no failure."""


def placed_model(c, cfg, sd, rank=0, **memory_flags):
    """Our model as train.py and sample.py set it up: built on the CPU, LoRA (rank > 0) injected, then memory.prepare."""
    model = lumina2.load_dit(sd, cfg, device="cpu")
    if rank:
        lora.inject(model, rank=rank, alpha=rank)
    return memory.prepare(model, c.device, **memory_flags)


def swapped(c, cfg, n):
    """n of the 2B's 26 main layers swapped (24 -> all but 2 resident); in smoke mode its one layer."""
    return min(n, cfg["n_layers"])


def lora_step(c, cfg, sd, bs, ckpt, swap=0, fp8=False, compile=False):
    model = placed_model(c, cfg, sd, rank=16, fp8=fp8, checkpointing=ckpt, compile=compile, blocks_to_swap=swapped(c, cfg, swap))
    params = lora.lora_parameters(model)
    opt = optim.Optimizer([params], "AdamW", 1e-4, 0.01, "stochastic", 0)
    x0, noise, cap, mask, sigma = inputs(c, cfg, bs)

    def step():
        train.flow_matching_loss(model, x0, cap, mask, sigma, noise, [c.cap_valid] * bs).backward()
        optim.step_after_backward(params, opt, max_grad_norm=1.0)
    return timed(step, c.iters, c.warmup, c.device)


def full_step(c, cfg, sd, kind, fused, ema=False):
    """Full fine-tuning at bs 1 as train.py runs it; ema=True adds its CPU EMA, updated once per timed window (every `iters`)."""
    model = lumina2.load_dit(sd, cfg, device="cpu")
    model.requires_grad_(True).norm_final.requires_grad_(False)
    model = memory.prepare(model, c.device, checkpointing=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.Optimizer([[p] for p in params], kind, 1e-5 if kind == "AdamW" else 5e-4, 0.0, "stochastic", 0)
    average = optim.EMA(params, 0.999, "cpu", every=c.iters) if ema else None
    if fused:
        optim.fuse_steps_into_backward(params, opt, max_grad_norm=1.0, ema=average)
    x0, noise, cap, mask, sigma = inputs(c, cfg, 1)
    steps = [0]

    def step():
        if average:
            average.set_step(steps[0])
        train.flow_matching_loss(model, x0, cap, mask, sigma, noise, [c.cap_valid]).backward()
        if not fused:
            optim.step_after_backward(params, opt, max_grad_norm=1.0, ema=average)
        steps[0] += 1
    return timed(step, c.iters, c.warmup, c.device)


def cfg_inputs(c, cfg):
    """cond (cap_valid tokens) and uncond (cap_valid // 4) as one batch of 2, the same latent twice."""
    x0, _, cap, mask, _ = inputs(c, cfg, 2)
    mask[1] = torch.arange(c.cap_len, device=c.device) < c.cap_valid // 4
    return x0[:1], cap, mask


@torch.no_grad()
def cfg_step(c, cfg, sd, swap=0, fp8=False, compile=False, attention=None):
    """One CFG sampling step, placed as sample.py places it; attention= runs it on another backend (sage: sampling only)."""
    model = lumina2.load_dit(sd, cfg, device="cpu")
    model = memory.prepare(model, c.device, blocks_to_swap=swapped(c, cfg, swap), fp8=fp8, compile=compile)
    x, cap, mask = cfg_inputs(c, cfg)
    try:
        lumina2.set_attention(attention or c.attention, torch.bfloat16, c.device)
    except (ImportError, ValueError) as e:  # sage needs CUDA and its package
        raise Unavailable(str(e).split(":")[0]) from e
    try:
        cond, uncond = (cap[:1], mask[:1], [c.cap_valid]), (cap[1:], mask[1:], [c.cap_valid // 4])  # lengths on the host
        return timed(lambda: sample.cfg_velocity(model, x, 0.5, cond, uncond, 4.0), c.iters, c.warmup, c.device)
    finally:
        routes = dict(lumina2.ROUTES)  # set_attention clears them: this case's routes go into its row
        lumina2.set_attention(c.attention, torch.bfloat16, c.device)
        lumina2.ROUTES.update(routes)


def diffusers_lora_step(c, cfg, sd, bs, ckpt):
    """LoRA-like in diffusers: the base frozen, x_embedder trainable, so backward runs through every block."""
    ref = diffusers_model(cfg, sd, c.device)
    ref.x_embedder.requires_grad_(True)
    if ckpt:
        ref.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(ref.x_embedder.parameters(), lr=1e-4)
    x0, noise, cap, mask, sigma = inputs(c, cfg, bs)

    def step():
        s = sigma.view(-1, 1, 1, 1)
        v = ref(((1 - s) * x0 + s * noise).bfloat16(), 1 - sigma, cap, mask, return_dict=False)[0]
        torch.nn.functional.mse_loss(v.float(), x0 - noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, c.iters, c.warmup, c.device)


@torch.no_grad()
def diffusers_cfg_step(c, cfg, sd):
    ref = diffusers_model(cfg, sd, c.device)
    x, cap, mask = cfg_inputs(c, cfg)
    t = torch.full((2,), 0.5, device=c.device)
    return timed(lambda: ref(x.repeat(2, 1, 1, 1).bfloat16(), t, cap, mask, return_dict=False)[0], c.iters, c.warmup, c.device)


CASES = {  # name -> (case label, implementation, function, its keyword arguments, model FLOPs in forwards at bs 1)
    "lora_bs1": ("LoRA r16 bs1", "ours", lora_step, dict(bs=1, ckpt=False), 2),
    "lora_bs1_ckpt": ("LoRA r16 bs1 ckpt", "ours", lora_step, dict(bs=1, ckpt=True), 2),
    "lora_bs4_ckpt": ("LoRA r16 bs4 ckpt", "ours", lora_step, dict(bs=4, ckpt=True), 8),
    "lora_bs1_ckpt_swap24": ("LoRA r16 bs1 ckpt swap 24/26", "ours", lora_step, dict(bs=1, ckpt=True, swap=24), 2),
    "lora_bs1_ckpt_fp8": ("LoRA r16 bs1 ckpt fp8 base", "ours", lora_step, dict(bs=1, ckpt=True, fp8=True), 2),
    "lora_bs1_compiled": ("LoRA r16 bs1 compiled", "ours", lora_step, dict(bs=1, ckpt=False, compile=True), 2),
    "full_adafactor_fused": ("full bs1 ckpt Adafactor SR fused", "ours", full_step, dict(kind="Adafactor", fused=True), 3),
    "full_adafactor_fused_ema": ("full bs1 ckpt Adafactor SR fused + CPU EMA", "ours", full_step,
                                 dict(kind="Adafactor", fused=True, ema=True), 3),
    "full_adamw": ("full bs1 ckpt AdamW SR", "ours", full_step, dict(kind="AdamW", fused=False), 3),
    "cfg": ("CFG step (batch 2)", "ours", cfg_step, dict(), None),
    "cfg_swap24": ("CFG step swap 24/26", "ours", cfg_step, dict(swap=24), None),
    "cfg_fp8": ("CFG step fp8 base", "ours", cfg_step, dict(fp8=True), None),
    "cfg_sage": ("CFG step sage", "ours", cfg_step, dict(attention="sage"), None),
    "diffusers_lora_bs1": ("LoRA r16 bs1", "diffusers", diffusers_lora_step, dict(bs=1, ckpt=False), 2),
    "diffusers_lora_bs1_ckpt": ("LoRA r16 bs1 ckpt", "diffusers", diffusers_lora_step, dict(bs=1, ckpt=True), 2),
    "diffusers_lora_bs4_ckpt": ("LoRA r16 bs4 ckpt", "diffusers", diffusers_lora_step, dict(bs=4, ckpt=True), 8),
    "diffusers_cfg": ("CFG step (batch 2)", "diffusers", diffusers_cfg_step, dict(), None),
}
# what each of our rows is compared with: diffusers' row of the same work (LoRA-like step, CFG step)
SAME_WORK = {"lora_bs1_compiled": "LoRA r16 bs1", "lora_bs1_ckpt_swap24": "LoRA r16 bs1 ckpt",
             "lora_bs1_ckpt_fp8": "LoRA r16 bs1 ckpt", "cfg_swap24": "CFG step (batch 2)", "cfg_fp8": "CFG step (batch 2)",
             "cfg_sage": "CFG step (batch 2)"}


def compile_settings(c):
    """On a CPU (the smoke run) inductor builds scalar C++: its vectorised code depends on the host's ISA and fails on some."""
    if torch.device(c.device).type == "cuda":
        return contextlib.nullcontext()
    return torch._inductor.config.patch({"cpp.simdlen": 1})


def run_checks(c, cfg, sd):
    """bf16 vs fp32 forward of the same weights (fp32 on sdpa: flash and sage take no fp32), and ours vs diffusers in bf16."""
    x0, noise, cap, mask, sigma = inputs(c, cfg, 1)
    with torch.no_grad():
        v_bf16 = lumina2.load_dit(sd, cfg, device=c.device)(x0, 1 - sigma, cap, mask)
        if c.attention != "sdpa":
            print(f"  fp32 reference: attention 'sdpa' for it ({c.attention!r} takes no fp32), then back to {c.attention!r}")
        lumina2.set_attention("sdpa", torch.float32, c.device)
        try:
            v_fp32 = lumina2.load_dit(sd, cfg, torch.float32, c.device)(x0, 1 - sigma, cap.float(), mask)
        finally:
            lumina2.set_attention(c.attention, torch.bfloat16, c.device)
        checks = {"bf16_vs_fp32": rel_err(v_bf16, v_fp32)}
        if c.diffusers:
            ref = diffusers_model(cfg, sd, c.device)
            checks["ours_vs_diffusers_bf16"] = rel_err(v_bf16, ref(x0.bfloat16(), 1 - sigma, cap, mask, return_dict=False)[0])
    return checks


def run_cuda_tests(out_dir):
    """The CUDA test tier (pytest -m cuda) in a child process, its output shown and kept in out_dir. On a CPU
    its tests skip; none selected (exit 5) counts as a failure, since then the tier itself has gone."""
    print("[check] pytest -q -m cuda", flush=True)
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                           cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=240)
        rc, log = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:  # a hung kernel must not eat the device time the table needs
        out = e.stdout or ""  # bytes here even with text=True
        rc, log = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    Path(out_dir, "pytest_cuda.txt").write_text(log)
    summary = log.strip().splitlines()[-1] if log.strip() else ""
    print(f"[check] pytest -m cuda: rc {rc}, {summary} ({time.perf_counter() - t:.0f} s)", flush=True)
    return dict(rc=rc, summary=summary)


def routes_text(report):
    return ", ".join(f"{k} x{v}" for k, v in report["routes"].items()) or "-"


def markdown(result):
    """The result as a markdown table, for pasting into an issue."""
    lines = [f"{result['device']}, torch {result['torch']}, {result['side']}^2, captions {result['cap_len']} padded / "
             f"{result['cap_valid']} valid, attention {result['attention']}, bf16 matmul ceiling {result['matmul_tflops']:.0f} TFLOP/s", ""]
    if result.get("tests"):
        lines += [f"pytest -m cuda: rc {result['tests']['rc']}, {result['tests']['summary']}", ""]
    if result["checks"]:
        lines += ["checks: " + ", ".join(f"{k} {v:.2e}" for k, v in result["checks"].items()), ""]
    lines += ["| impl | case | ms | TFLOP/s | MFU | peak GiB | predicted GiB | reserved GiB | ours / diffusers | attention routes |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "ms" not in r:
            why = "error: " + r["error"] if "error" in r else "skipped: " + r["skipped"]
            lines.append(f"| {r['impl']} | {r['case']} | {why} | | | | | | | |")
            continue
        ratio = f"{r['ratio_to_diffusers']:.2f}" if r["ratio_to_diffusers"] else ""
        pred = f"{r['predicted_gb']:.2f}" if "predicted_gb" in r else r.get("predicted_error", "")
        reserved = f"{r['reserved_gb']:.2f}" if r["reserved_gb"] is not None else ""
        lines.append(f"| {r['impl']} | {r['case']} | {r['ms']:.1f} | {r['tflops']:.1f} | {r['mfu']:.1%} | {r['peak_gb']:.2f} | {pred} | "
                     f"{reserved} | {ratio} | {routes_text(r['attention']) if r['impl'] == 'ours' else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    c = SimpleNamespace(**configure(dict(globals()), argv))
    if c.check:  # few steps per case: the whole GPU check, start-up included, fits in 8 minutes on an H200
        c.iters, c.warmup, c.out = 5, 2, os.path.join(os.environ.get("OUT") or "out", "bench.json")
    if c.smoke:
        c.device, c.side, c.cap_len, c.cap_valid, c.iters, c.warmup = "cpu", 64, 16, 8, 1, 1
    unknown = set(c.cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {list(CASES)}")
    os.makedirs(os.path.dirname(c.out) or ".", exist_ok=True)
    tests = run_cuda_tests(os.path.dirname(c.out)) if c.check else None
    lumina2.set_attention(c.attention, torch.bfloat16, c.device)
    cfg = dit_config(c)
    sd = random_weights(cfg)
    ceiling = matmul_ceiling(c.device)
    name = torch.cuda.get_device_name(c.device) if torch.device(c.device).type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {c.side}^2, captions {c.cap_len} padded / {c.cap_valid} valid, "
          f"attention {c.attention}, bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    checks = run_checks(c, cfg, sd) if c.checks else {}
    if checks:
        print("  checks: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()), flush=True)
    # the forward trims captions to the batch's longest: cap_valid in every case (CFG's shorter uncond is padded to it)
    image_tokens = (c.side // 8 // cfg["patch_size"]) ** 2
    fwd1 = fakegpu.forward_flops(cfg, 1, c.cap_valid, image_tokens)
    fwd_cfg = fakegpu.forward_flops(cfg, 2, c.cap_valid, image_tokens)
    rows = []
    for key, (case, impl, fn, kwargs, forwards) in CASES.items():
        if c.cases and key not in c.cases or impl == "diffusers" and not c.diffusers:
            continue
        reset_peak(c.device)
        lumina2.ROUTES.clear()  # so each case reports only its own attention calls
        try:
            with compile_settings(c):
                ms, gb = fn(c, cfg, sd, **kwargs)
        except Unavailable as e:
            rows.append(dict(key=key, case=case, impl=impl, skipped=str(e)))
            print(f"  {impl:9s} {case:40s} skipped: {e}", flush=True)
            continue
        except Exception as e:  # in the GPU check one failing case must not cost the rest of the table
            if not c.check:
                raise
            rows.append(dict(key=key, case=case, impl=impl, error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(f"  {impl:9s} {case:40s} error: {rows[-1]['error']}", flush=True)
            continue
        report = lumina2.attention_report(c.device)
        tf = (fwd_cfg if forwards is None else forwards * fwd1) / (ms * 1e-3) / 1e12
        # what the allocator reserved: with the CUDA context, the part of the card plan.py's OVERHEAD stands for
        reserved = torch.cuda.max_memory_reserved(c.device) / 2**30 if torch.device(c.device).type == "cuda" else None
        rows.append(dict(key=key, case=case, impl=impl, ms=ms, tflops=tf, mfu=tf / ceiling, peak_gb=gb, reserved_gb=reserved,
                         attention=report))
        if impl == "ours":
            try:
                rows[-1]["predicted_gb"] = predicted_gb(c, cfg, fn, kwargs)
            except Exception as e:  # a planner bug must not cost the GPU's table: shown in its row
                rows[-1]["predicted_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        routes = routes_text(report) if impl == "ours" else "-"  # diffusers runs its own attention
        pred = f"{rows[-1]['predicted_gb']:6.2f}" if "predicted_gb" in rows[-1] else rows[-1].get("predicted_error", "     -")
        print(f"  {impl:9s} {case:40s} {ms:9.1f} ms {tf:7.1f} TFLOP/s  MFU {tf / ceiling:5.1%}  peak {gb:6.2f} GiB (predicted {pred})  "
              f"{routes}", flush=True)
    theirs = {r["case"]: r["ms"] for r in rows if r["impl"] == "diffusers" and "ms" in r}
    for r in rows:
        same = SAME_WORK.get(r["key"], r["case"])  # the diffusers row doing the same work
        if "ms" in r:
            r["ratio_to_diffusers"] = r["ms"] / theirs[same] if r["impl"] == "ours" and same in theirs else None
    if theirs:
        print("  ours / diffusers: " + ", ".join(f"{r['case']} {r['ratio_to_diffusers']:.2f}" for r in rows if r.get("ratio_to_diffusers")))
    result = dict(device=name, torch=torch.__version__, side=c.side, cap_len=c.cap_len, cap_valid=c.cap_valid, attention=c.attention,
                  matmul_tflops=ceiling, forward_flops_bs1=fwd1, checks=checks, rows=rows, date=time.strftime("%Y-%m-%d"))
    if c.check:
        result.update(tests=tests, ok=tests["rc"] == 0 and not any("error" in r for r in rows))
    atomic_write(c.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    if c.check:
        md = os.path.join(os.path.dirname(c.out), "bench.md")
        Path(md).write_text(markdown(result))
        print(f"[check] {'ok' if result['ok'] else 'FAILED'}: wrote {c.out} and {md}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
