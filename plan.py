"""
Will it fit? Before the first download: the peak device memory and a roofline time of one training step (train.py) or one
CFG sampling step (sample.py) of the 2B model, for every combination of the memory settings, on a card of CARDS or
--vram, and the fastest combination that fits, as flags to paste.

Not a formula kept beside the code: the project's own code runs on fakegpu.py's stand-in GPU (the meta device: real shapes,
no bytes) while its live device memory is counted, op by op. Training: train.setup_model (a LoRA or every weight,
memory.prepare, the optimizer), the optimizer's state made by a first step, then the loop's loss, backward and optimizer
step. Sampling: memory.prepare and sample.cfg_velocity, the AE's decode, Gemma's weights. When the code changes, the
prediction follows. The time is a roofline, a lower bound for ranking (real steps reach 30-60% of it): model FLOPs
(fakegpu.forward_flops; 2 forwards for LoRA, 3 for full, 1 more to recompute) at the card's bf16 rate, or the bytes the
traced block swap copied over its host link, whichever is longer. Details: docs/planner.md.

    python plan.py --card=rtx3060                         # LoRA rank 16 at 1024^2 on a 12 GB card (minutes: 32 traces)
    python plan.py --card=rtx4090 --train_mode=full       # full fine-tuning on 24 GB
    python plan.py --vram=10 --task=sample                # sampling, on any 10 GiB card (the rtx4090's speeds)
"""
import concurrent.futures
import contextlib
import itertools
import multiprocessing
import time
from types import SimpleNamespace

import torch

import fakegpu
import lumina2
import memory
import optim
import sample
import train
from configurator import configure, problems

# -----------------------------------------------------------------------------
# the card
card = "rtx4090"  # whose memory, bf16 rate and host link (CARDS)
vram = 0.0  # GiB of device memory, when not the card's (0 = the card's)

# what runs
task = "train"  # what is planned: a train.py step or a sample.py CFG step (TASKS)
train_mode = "lora"  # train.py's train_mode
network_dim = 16  # train.py's LoRA rank
resolution = 1024  # train.py's resolution, sample.py's width and height
train_batch_size = 1  # train.py's batch size: one caption of cap_len tokens, the others half as long (a masked batch)
cap_len = 256  # the longest caption's tokens (train.py's gemma2_max_token_length: the worst case)

# what is tried: every combination of these, checkpointing on and off, fp8_base on and off (and fused_backward_pass, full)
optimizers = ["AdamW", "Adafactor"]  # the optimizer_type values tried
swaps = [0, 8, 16, 24]  # the blocks_to_swap values tried
workers = 0  # processes tracing at once (0 = one per CPU core)
# -----------------------------------------------------------------------------

# name -> (memory GiB, dense bf16 tensor TFLOP/s with fp32 accumulation, host link GB/s per direction, nominal PCIe).
# TFLOP/s: NVIDIA's Ampere GA102 whitepaper (RTX 3090: 71) and Ada whitepaper (RTX 4090: 165.2), where GeForce cards run
# bf16 with fp32 accumulation at twice their fp32 shader rate, which gives the RTX 3060 (12.7 x 2) and 4060 Ti (22.1 x 2);
# the A100 (312) and H100 SXM / H200 (989, half the sparse 1979) datasheets. Links: PCIe 4.0 x16 31.5, the 4060 Ti's
# x8 15.8, PCIe 5.0 x16 63 GB/s.
CARDS = {"rtx3060": (12, 25.5, 31.5), "rtx4060ti": (16, 44.1, 15.8), "rtx3090": (24, 71.0, 31.5), "rtx4090": (24, 165.2, 31.5),
         "a100-40gb": (40, 312.0, 31.5), "a100-80gb": (80, 312.0, 31.5), "h100": (80, 989.0, 63.0), "h200": (141, 989.0, 63.0)}
# The tracked peak is what torch.cuda.max_memory_allocated reports; the card must also hold the CUDA context and what the
# caching allocator reserves beyond it. EleutherAI's Transformer Math 101 budgets that as 20% over the tensors; bench.py
# --check=True prints predicted beside measured for each case, so the first GPU run calibrates this factor.
OVERHEAD = 1.2
TASKS = {"train": "train.py", "sample": "sample.py"}
CHOICES = {"card": CARDS, "task": TASKS, "train_mode": train.TRAIN_MODES}
GIB = 2**30


def weights(cls, config, dtype):
    """{name: tensor} of a model's shapes on the stand-in device, for its loader: a weight file with no byte to read or hold."""
    return {k: torch.empty(v.shape, dtype=dtype, device=fakegpu.DEVICE) for k, v in lumina2.on_meta(cls, config).state_dict().items()}


def meta_dit(cfg, dtype=torch.bfloat16):
    """The DiT as lumina2.load_dit loads a file, on the stand-in device."""
    return lumina2.load_dit(weights(lumina2.NextDiT, cfg, dtype), cfg, dtype, fakegpu.DEVICE)


def train_step(model, cfg, settings, side, lens, kernels="cuda", block=fakegpu.BLOCK, watch=None):
    """One step of train.py on `model` (loaded, on settings["device"]): train.setup_model with train.py's defaults overridden by
    `settings`, the optimizer's state made by a step on zero gradients (as after any first step), then the loop's loss,
    backward and step on len(lens) latents of side^2 whose captions have `lens` tokens, with a Tracker (and `watch`, a
    context manager) around -> dict(tracker, swapped bytes, model, optimizer)."""
    c = SimpleNamespace(**configure(dict(vars(train)), []))
    c.__dict__.update(settings)
    r = SimpleNamespace(base=model, world=1, rank=0, fsdp=False)
    with fakegpu.stand_in(kernels):
        train.setup_model(c, r)
        for group in (g for o in r.optimizer.opts for g in o.param_groups):
            group["foreach"] = True  # torch's default on CUDA (meta would loop per tensor)
        r.model.train()  # as the loop does
        with fakegpu.Tracker(c.device):  # answers the reads torch's Adafactor makes (p.norm().item() per tensor) on meta
            for p in r.params:
                p.grad = torch.zeros_like(p)
            optim.step_after_backward(r.params, r.optimizer, c.max_grad_norm)
        t, h = fakegpu.Tracker(c.device, block), side // 8
        with t, watch or contextlib.nullcontext():
            t.label_model(r.model)
            states = [v for o in r.optimizer.opts for s in o.state.values() for v in s.values() if v.dim()]  # step counts: host
            t.label([w for ws in r.optimizer.work for w in ws] + states, "optimizer state")
            t.label(r.params, "trained")  # after: an fp32 weight is its own work tensor
            x0, noise = torch.zeros(len(lens), 16, h, h).to(c.device), torch.zeros(len(lens), 16, h, h).to(c.device)
            feats = torch.zeros(len(lens), max(lens), cfg["cap_feat_dim"], dtype=torch.bfloat16).to(c.device)
            mask = (torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]).to(c.device)
            t.label([x0, noise, feats, mask], "batch")

            def step():
                t.start("activations")
                sigma = torch.full((len(lens),), 0.5).to(c.device)
                loss = train.flow_matching_loss(r.net, x0, feats, mask, sigma, noise, lens)
                t.phase = "backward"  # gradients of activations, checkpointing's recompute; fused steps
                loss.backward()
                t.label([p.grad for p in r.params], "gradients")
                t.phase = "optimizer step"
                if not c.fused_backward_pass:
                    optim.step_after_backward(r.params, r.optimizer, c.max_grad_norm)
            moved = fakegpu.swapped_bytes(r.model, step)
    return dict(tracker=t, swapped=moved, model=r.model, optimizer=r.optimizer)


def sample_step(model, cfg, settings, side, lens=(cap_len, 1), kernels="cuda", block=fakegpu.BLOCK, watch=None):
    """One CFG step of sample.py on `model` (loaded, on settings["device"]): memory.prepare with `settings`, then
    sample.cfg_velocity on one latent of side^2, its caption of lens[0] tokens and the negative of lens[1] (an empty one
    is 1), twice (the second is measured: the swap's slots as in every later step) -> dict(tracker, swapped bytes, model)."""
    dev, h = settings["device"], side // 8
    with fakegpu.stand_in(kernels):
        model = memory.prepare(model, dev, fp8=settings.get("fp8_base", False), blocks_to_swap=settings.get("blocks_to_swap", 0))
        t = fakegpu.Tracker(dev, block)
        with t, watch or contextlib.nullcontext():
            t.label_model(model)
            x = torch.zeros(1, 16, h, h).to(dev)
            cond, uncond = ((torch.zeros(1, n, cfg["cap_feat_dim"], dtype=torch.bfloat16).to(dev),
                             torch.ones(1, n, dtype=torch.bool).to(dev), [n]) for n in lens)
            both = sample.stack_captions(cond, uncond)  # as sample.sample() builds it, once per batch
            t.label([x, *cond[:2], *uncond[:2], *both[:2]], "batch")
            velocity = lambda: sample.cfg_velocity(model, x, 0.5, cond, uncond, 4.0, both=both)
            velocity()
            t.start("activations")
            moved = fakegpu.swapped_bytes(model, velocity)
    return dict(tracker=t, swapped=moved, model=model)


def other_models(side, dtype=torch.bfloat16):
    """sample.py's other two models on the stand-in -> bytes of (Gemma's weights as TextEncoder holds them, the AE's weights,
    the AE's peak while it decodes a side^2 latent). Gemma's activations for 256 tokens (tens of MB) are left out."""
    from transformers import Gemma2Model
    g = lumina2.gemma_config()
    with torch.device("meta"):  # TextEncoder's cut: the last layer never runs
        gemma = Gemma2Model(lumina2.gemma_config(**{**g.to_dict(), "num_hidden_layers": g.num_hidden_layers - 1,
                                                    "layer_types": g.layer_types[:-1]}))
    ae = lumina2.load_ae(weights(lumina2.AutoEncoder, lumina2.AE_PRESETS["flux"], dtype), "flux", dtype, fakegpu.DEVICE)
    t = fakegpu.Tracker()
    with fakegpu.stand_in(), t, torch.no_grad():
        t.label_model(ae)
        ae.decode(torch.zeros(1, 16, side // 8, side // 8).to(fakegpu.DEVICE))
    return sum(p.numel() for p in gemma.parameters()) * dtype.itemsize, sum(p.nbytes for p in ae.parameters()), t.peak


def roofline_ms(flops, swapped, spec):
    """The step's lower bound: its FLOPs at the card's rate, or its swapped bytes over the host link, whichever is longer."""
    return 1e3 * max(flops / (spec[1] * 1e12), swapped / (spec[2] * 1e9))


def traced(job):
    """One combination, in a worker process: (step function's name, cfg, settings, side, lens) -> (peak, by label, swapped)."""
    name, cfg, settings, side, lens = job
    out = globals()[name](meta_dit(cfg), cfg, dict(settings, device=str(fakegpu.DEVICE)), side, lens)
    return out["tracker"].peak, out["tracker"].breakdown(), out["swapped"]


def run_all(jobs, workers):
    """traced() for every job, in `workers` processes at once (0: one per CPU core); tracing is Python-bound."""
    if workers == 1:
        return list(map(traced, jobs))
    with concurrent.futures.ProcessPoolExecutor(workers or None, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(traced, jobs))


def train_rows(c, cfg, spec):
    """Every valid combination of the training settings, traced -> rows: flags, peak and its parts (bytes), ms, swapped."""
    lens = [c.cap_len] + [c.cap_len // 2] * (c.train_batch_size - 1)
    forward = fakegpu.forward_flops(cfg, len(lens), c.cap_len, (c.resolution // 16) ** 2)
    combos = [dict(gradient_checkpointing=ckpt, blocks_to_swap=swap, fp8_base=fp8, optimizer_type=opt, fused_backward_pass=fused)
              for ckpt, swap, fp8, opt, fused in itertools.product((True, False), c.swaps, (False, True), c.optimizers, (False, True))
              if not memory.combination_problems(c.train_mode, fp8, False, swap) and not (fused and c.train_mode == "lora")]
    mode = dict(train_mode=c.train_mode, network_dim=c.network_dim, network_alpha=float(c.network_dim))
    traces = run_all([("train_step", cfg, {**flags, **mode}, c.resolution, lens) for flags in combos], c.workers)
    rows = []
    for flags, (peak, parts, swapped) in zip(combos, traces):
        passes = (2 if c.train_mode == "lora" else 3) + flags["gradient_checkpointing"]
        if c.train_mode == "lora":
            del flags["fused_backward_pass"]  # full mode only
        rows.append(dict(flags=flags, peak=peak, parts=parts, ms=roofline_ms(passes * forward, swapped, spec), swapped=swapped))
    return rows


def sample_rows(c, cfg, spec):
    """Every combination of sample.py's placement settings, traced -> rows as train_rows', the peak's parts by phase."""
    gemma, ae, decode = other_models(c.resolution)
    dit = sum(p.nbytes for p in meta_dit(cfg).parameters())
    forward = fakegpu.forward_flops(cfg, 2, c.cap_len, (c.resolution // 16) ** 2)
    combos = [(swap, fp8) for swap in c.swaps for fp8 in (False, True)]
    steps = dict(zip(combos, run_all([("sample_step", cfg, dict(blocks_to_swap=swap, fp8_base=fp8), c.resolution, (c.cap_len, 1))
                                      for swap, fp8 in combos], c.workers)))
    rows = []
    for offload, (swap, fp8) in itertools.product(("model", "none"), combos):
        peak, _, swapped = steps[swap, fp8]
        resident = offload == "none"  # all three models loaded on the device at once, the whole DiT before its swap (README)
        parts = {"encode": gemma + (dit + ae if resident else 0), "denoise": peak + (ae if resident else 0), "decode": decode}
        rows.append(dict(flags=dict(offload=offload, blocks_to_swap=swap, fp8_base=fp8), peak=max(parts.values()), parts=parts,
                         ms=roofline_ms(forward, swapped, spec), swapped=swapped))
    return rows


def main(argv=None):
    """Print the table and the fastest setting that fits -> the rows."""
    c = SimpleNamespace(**configure(dict(globals()), argv))
    if bad := problems(c, CHOICES, dict(resolution=(lambda v: v % 16 == 0 and v > 0, "a positive multiple of 16"),
                                        train_batch_size=(lambda v: v >= 1, ">= 1"), cap_len=(lambda v: 1 <= v < 300, "1 to 299"),
                                        optimizers=(lambda v: v and set(v) <= set(optim.OPTIMIZERS), f"some of {list(optim.OPTIMIZERS)}"),
                                        swaps=(lambda v: v and all(0 <= n <= 26 for n in v), "some of 0 to 26 (the 2B's layers)"))):
        raise SystemExit("config errors:\n  - " + "\n  - ".join(bad))
    spec, cfg, start = (c.vram or CARDS[c.card][0], *CARDS[c.card][1:]), lumina2.DIT_PRESETS["2b"], time.time()
    rows = (train_rows if c.task == "train" else sample_rows)(c, cfg, spec)
    fits = lambda r: r["peak"] * OVERHEAD <= spec[0] * GIB
    what = "CFG step" if c.task == "sample" else c.train_mode + (f" rank {c.network_dim}" if c.train_mode == "lora" else "") + \
        f", batch {c.train_batch_size}"
    print(f"{TASKS[c.task]} {what} at {c.resolution}^2, captions of {c.cap_len} tokens, on {c.card} ({spec[0]} GiB, {spec[1]} "
          f"TFLOP/s bf16, {spec[2]} GB/s host link): fits = peak x {OVERHEAD} <= {spec[0]} GiB; traced in {time.time() - start:.0f} s\n")
    parts = sorted({k for r in rows for k in r["parts"]}, key=lambda k: -max(r["parts"].get(k, 0) for r in rows))
    head = [*rows[0]["flags"], "peak GiB", f"x{OVERHEAD}", "fits", "roofline ms", "swap GB", *parts]
    table = [[*map(str, r["flags"].values()), f"{r['peak'] / GIB:.2f}", f"{r['peak'] * OVERHEAD / GIB:.2f}", "yes" if fits(r) else "no",
              f"{r['ms']:.0f}", f"{r['swapped'] / 1e9:.1f}", *(f"{r['parts'].get(k, 0) / GIB:.2f}" for k in parts)]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    for line in [head, ["-" * w for w in widths], *table]:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))
    if not any(map(fits, rows)):
        print(f"\nnothing fits in {spec[0]} GiB")
        return rows
    # ties (the roofline ignores fp8's dequantisation and the swap's contention): the fewest changes, then memory
    best = min(filter(fits, rows), key=lambda r: (round(r["ms"]), r["flags"]["fp8_base"], r["flags"]["blocks_to_swap"],
                                                  r["flags"].get("fused_backward_pass", False),
                                                  c.optimizers.index(r["flags"].get("optimizer_type", c.optimizers[0])), r["peak"]))
    rank = f" --network_dim={c.network_dim}" if c.train_mode == "lora" else ""
    extra = (f"--train_mode={c.train_mode}{rank} --resolution={c.resolution} --train_batch_size={c.train_batch_size}" if c.task == "train"
             else f"--width={c.resolution} --height={c.resolution}")
    print(f"\nfastest that fits: {best['ms']:.0f} ms per step (roofline), peak {best['peak'] / GIB:.2f} GiB:\n  python {TASKS[c.task]} "
          f"{extra} " + " ".join(f"--{k}={v}" for k, v in best["flags"].items()))
    return rows


if __name__ == "__main__":
    main()
