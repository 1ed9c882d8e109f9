"""
Benchmark one step of training and sampling on one GPU: ours and diffusers' Lumina2Transformer2DModel,
on the same random 2B weights and the same inputs, in the same run. Prints one table (ms, TFLOP/s, MFU
against a bf16 matmul ceiling measured here, peak GB, ratio to diffusers) and the GPU correctness checks
(bf16 vs fp32, ours vs diffusers), and writes it all to bench.json.

Cases: LoRA rank 16 at bs 1 without and with checkpointing and at bs 4 with it; full fine-tuning at bs 1
(Adafactor + bf16 stochastic rounding + step fused into backward + checkpointing: the 16 GB recipe; and
AdamW with the step after backward); the CFG sampling step (cond + uncond as one batch of 2). Diffusers
runs LoRA-like (base frozen, x_embedder trainable, so backward reaches the input) and its CFG step.
Model FLOPs come from torch's FlopCounterMode on our forward (a 1- and a 2-layer model, extrapolated to all
layers, which are identical); training counts 2x forward (frozen base: no weight gradients) or 3x (full),
never the recomputation of checkpointing. Peak memory is the CUDA allocator's peak per case; on a CPU it
is the process's peak RSS since start, so run one case at a time there.

    python bench.py                                    # H200: 2B, 1024^2, captions 256 padded / 120 valid
    python bench.py --iters=20 --side=512 --cases='["full_adafactor_fused"]'
    python bench.py --smoke=True                       # one 2304-wide layer, 64^2, CPU: checks the script runs
    python bench.py --device=cpu --side=1024 --cases='["full_adafactor_fused"]' --checks=False --diffusers=False --iters=1 --warmup=0
"""
import gc
import json
import os
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import lora
import lumina2
import memory
import sample
import train
from configurator import configure

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
out = "bench.json"
# -----------------------------------------------------------------------------


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev):
    gc.collect()  # the fused step's hooks make reference cycles: free the previous case's model before measuring
    if torch.device(dev).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(step, n, warm, dev):
    """Mean wall time of step() in ms over n calls after warm calls, and the peak memory during them."""
    for _ in range(warm):
        step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(dev)
    return (time.perf_counter() - t) / n * 1e3, sample.peak_memory_gb(dev)


def matmul_ceiling(dev):
    """bf16 TFLOP/s of a large square matmul: the ceiling MFU is quoted against."""
    n = 8192 if dev.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms, _ = timed(lambda: a @ b, 20 if dev.startswith("cuda") else 2, 3 if dev.startswith("cuda") else 1, dev)
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


def our_model(cfg, sd, dev, dtype=torch.bfloat16):
    with torch.device("meta"):
        m = lumina2.NextDiT(**cfg)
    m.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return m.to(dev).requires_grad_(False)


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


def forward_flops(cfg, dev, x, t, cap, mask):
    """FLOPs of one forward of the full-depth model, counted on a 1- and a 2-layer model (cheap anywhere):
    the layers are identical, so flops(n) = flops(1) + (n - 1) (flops(2) - flops(1))."""
    counts = []
    for n in (1, 2):
        with torch.device("meta"):
            m = lumina2.NextDiT(**dict(cfg, n_layers=n))
        m = m.to_empty(device=dev).to(torch.bfloat16)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x, t, cap, mask)
        counts.append(fc.get_total_flops())
    return counts[0] + (cfg["n_layers"] - 1) * (counts[1] - counts[0])


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def lora_step(c, cfg, sd, bs, ckpt):
    model = our_model(cfg, sd, c.device)
    lora.inject(model, rank=16, alpha=16)
    if ckpt:
        memory.enable_checkpointing(model)
    params = lora.lora_parameters(model)
    opt = train.Optimizer([params], "AdamW", 1e-4, 0.01, "stochastic", 0)
    x0, noise, cap, mask, sigma = inputs(c, cfg, bs)

    def step():
        train.flow_matching_loss(model, x0, cap, mask, sigma, noise).backward()
        train.step_after_backward(params, opt, max_grad_norm=1.0)
    return timed(step, c.iters, c.warmup, c.device)


def full_step(c, cfg, sd, kind, fused):
    """Full fine-tuning at bs 1 with checkpointing, bf16 weights + stochastic rounding, as train.py runs it."""
    model = our_model(cfg, sd, c.device)
    model.requires_grad_(True).norm_final.requires_grad_(False)
    memory.enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.Optimizer([[p] for p in params], kind, 1e-5 if kind == "AdamW" else 5e-4, 0.0, "stochastic", 0)
    if fused:
        train.fuse_steps_into_backward(params, opt, max_grad_norm=1.0)
    x0, noise, cap, mask, sigma = inputs(c, cfg, 1)

    def step():
        train.flow_matching_loss(model, x0, cap, mask, sigma, noise).backward()
        if not fused:
            train.step_after_backward(params, opt, max_grad_norm=1.0)
    return timed(step, c.iters, c.warmup, c.device)


def cfg_inputs(c, cfg):
    """cond (cap_valid tokens) and uncond (cap_valid // 4) as one batch of 2, the same latent twice."""
    x0, _, cap, mask, _ = inputs(c, cfg, 2)
    mask[1] = torch.arange(c.cap_len, device=c.device) < c.cap_valid // 4
    return x0[:1], cap, mask


@torch.no_grad()
def cfg_step(c, cfg, sd):
    model = our_model(cfg, sd, c.device)
    x, cap, mask = cfg_inputs(c, cfg)
    return timed(lambda: sample.cfg_velocity(model, x, 0.5, (cap[:1], mask[:1]), (cap[1:], mask[1:]), 4.0), c.iters, c.warmup, c.device)


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


CASES = {  # name -> (case label, implementation, function, its arguments, model FLOPs in forwards at bs 1)
    "lora_bs1": ("LoRA r16 bs1", "ours", lora_step, (1, False), 2),
    "lora_bs1_ckpt": ("LoRA r16 bs1 ckpt", "ours", lora_step, (1, True), 2),
    "lora_bs4_ckpt": ("LoRA r16 bs4 ckpt", "ours", lora_step, (4, True), 8),
    "full_adafactor_fused": ("full bs1 ckpt Adafactor SR fused", "ours", full_step, ("Adafactor", True), 3),
    "full_adamw": ("full bs1 ckpt AdamW SR", "ours", full_step, ("AdamW", False), 3),
    "cfg": ("CFG step (batch 2)", "ours", cfg_step, (), None),
    "diffusers_lora_bs1": ("LoRA r16 bs1", "diffusers", diffusers_lora_step, (1, False), 2),
    "diffusers_lora_bs1_ckpt": ("LoRA r16 bs1 ckpt", "diffusers", diffusers_lora_step, (1, True), 2),
    "diffusers_lora_bs4_ckpt": ("LoRA r16 bs4 ckpt", "diffusers", diffusers_lora_step, (4, True), 8),
    "diffusers_cfg": ("CFG step (batch 2)", "diffusers", diffusers_cfg_step, (), None),
}


def run_checks(c, cfg, sd):
    """bf16 vs fp32 forward of the same weights, and ours vs diffusers in bf16, on this device."""
    checks = {}
    x0, noise, cap, mask, sigma = inputs(c, cfg, 1)
    with torch.no_grad():
        v_bf16 = our_model(cfg, sd, c.device)(x0, 1 - sigma, cap, mask)
        checks["bf16_vs_fp32"] = rel_err(v_bf16, our_model(cfg, sd, c.device, torch.float32)(x0, 1 - sigma, cap.float(), mask))
        if c.diffusers:
            ref = diffusers_model(cfg, sd, c.device)
            checks["ours_vs_diffusers_bf16"] = rel_err(v_bf16, ref(x0.bfloat16(), 1 - sigma, cap, mask, return_dict=False)[0])
    return checks


def main(argv=None):
    c = SimpleNamespace(**configure(dict(globals()), argv))
    if c.smoke:
        c.device, c.side, c.cap_len, c.cap_valid, c.iters, c.warmup = "cpu", 64, 16, 8, 1, 1
    unknown = set(c.cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {list(CASES)}")
    lumina2.set_attention(c.attention, torch.bfloat16, c.device)
    cfg = dit_config(c)
    sd = random_weights(cfg)
    ceiling = matmul_ceiling(c.device)
    name = torch.cuda.get_device_name() if c.device.startswith("cuda") else "cpu"
    print(f"{name}, torch {torch.__version__}, {c.side}^2, captions {c.cap_len} padded / {c.cap_valid} valid, "
          f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    checks = run_checks(c, cfg, sd) if c.checks else {}
    if checks:
        print("  checks: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    x0, _, cap, mask, sigma = inputs(c, cfg, 1)
    fwd1 = forward_flops(cfg, c.device, x0, 1 - sigma, cap, mask)
    x, cap2, mask2 = cfg_inputs(c, cfg)
    fwd_cfg = forward_flops(cfg, c.device, x.repeat(2, 1, 1, 1), torch.full((2,), 0.5, device=c.device), cap2, mask2)

    rows = []
    for key, (case, impl, fn, args, forwards) in CASES.items():
        if c.cases and key not in c.cases or impl == "diffusers" and not c.diffusers:
            continue
        reset_peak(c.device)
        ms, gb = fn(c, cfg, sd, *args)
        tf = (fwd_cfg if forwards is None else forwards * fwd1) / (ms * 1e-3) / 1e12
        rows.append(dict(case=case, impl=impl, ms=ms, tflops=tf, mfu=tf / ceiling, peak_gb=gb))
        print(f"  {impl:9s} {case:40s} {ms:9.1f} ms {tf:7.1f} TFLOP/s  MFU {tf / ceiling:5.1%}  peak {gb:6.2f} GiB", flush=True)
    theirs = {r["case"]: r["ms"] for r in rows if r["impl"] == "diffusers"}
    for r in rows:
        r["ratio_to_diffusers"] = r["ms"] / theirs[r["case"]] if r["impl"] == "ours" and r["case"] in theirs else None
    if theirs:
        print("  ours / diffusers: " + ", ".join(f"{r['case']} {r['ratio_to_diffusers']:.2f}" for r in rows if r["ratio_to_diffusers"]))

    result = dict(device=name, torch=torch.__version__, side=c.side, cap_len=c.cap_len, cap_valid=c.cap_valid,
                  matmul_tflops=ceiling, forward_flops_bs1=fwd1, checks=checks, rows=rows, date=time.strftime("%Y-%m-%d"))
    tmp = c.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, c.out)
    return result


if __name__ == "__main__":
    main()
