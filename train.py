"""
Train a LoRA on Lumina Image 2.0 (Next-DiT 2B, Gemma-2-2B, FLUX AE), or fine-tune all of it, in one plain
loop: the `lumina_train_network.py` / `lumina_train.py` commands of kohya-ss/sd-scripts' docs, with the same
defaults, done by hand.

Flow matching in Lumina time (SPEC §5): x_t = (1 - sigma) x0 + sigma noise, the model sees t = 1 - sigma
and predicts v = x0 - noise; loss = fp32 MSE. Base weights in bf16, LoRA weights in fp32, casts explicit
(no autocast). Latents and text features are cached first, then the AE and Gemma leave the GPU.
Full fine-tuning keeps the weights in bf16 and steps each one through an fp32 copy with stochastic
rounding (or fp32 master weights); Adafactor + fused_backward_pass fits 2.6B in one 16 GB budget.
Under torchrun, DDP (LoRA or full) or FSDP2 (full) takes over; one process is the plain default.

    python train.py config/demo.py                       # tiny random models + synthetic data, CPU, under a minute
    python train.py config/lora_1024.py --train_data_dir=my_images --output_name=my_lora
    python train.py config/full_1024.py --train_data_dir=my_images     # full fine-tune, Adafactor, fused backward
    python train.py config/demo.py --resume=True          # continue from the last saved state
    python train.py config/lora_1024.py --dataset_config=my_lumina_dataset_config.toml --validate_every_n_steps=100
    torchrun --nproc_per_node=8 train.py config/lora_1024.py --train_data_dir=my_images   # DDP, bs 1 per GPU
"""
import contextlib
import datetime
import json
import math
import os
import random
import re
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import data
import lora
import lumina2
import memory
import sample
from configurator import configure

# -----------------------------------------------------------------------------
# config: sd-scripts flag in the comment where one exists
dit_path = "models/lumina_2_model_bf16.safetensors"  # --pretrained_model_name_or_path (or lumina-image-2.safetensors)
gemma_path = "models/gemma_2_2b_fp16.safetensors"  # --gemma2
ae_path = "models/ae.safetensors"  # --ae
train_data_dir = "data/images"  # dataset_config image_dir: images with same-stem .txt captions
dataset_config = ""  # --dataset_config: an sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]); it
# replaces train_data_dir, and the dataset constants here become the defaults under its [general]
resolution = 1024  # dataset_config resolution: bucket area = resolution^2
num_repeats = 1  # dataset_config num_repeats
flip_aug = False  # dataset_config flip_aug
caption_extension = ".txt"  # dataset_config caption_extension
caption_dropout_rate = 0.0  # --caption_dropout_rate (works with cached text features)
caption_variants = 8  # shuffle_caption / caption_tag_dropout_rate: variants cached per caption (K x the text cache)
validation_split = 0.0  # --validation_split: fraction of the images held out for the validation loss
validation_seed = 0  # --validation_seed: which images are held out
validate_every_n_steps = 0  # --validate_every_n_steps: validation loss every n optimizer steps (0 = off)
validation_sigmas = [0.1, 0.3, 0.5, 0.7, 0.9]  # the fixed noise levels of the validation loss
train_batch_size = 1  # dataset_config batch_size
output_dir = "out/lora"  # --output_dir
output_name = "my_lumina_lora"  # --output_name
save_layout = "kohya"  # "kohya" (sd-scripts / ComfyUI) or "diffusion_model" (ComfyUI / diffusion-pipe / diffusers)
network_dim = 8  # --network_dim
network_alpha = 8.0  # --network_alpha
attn_dim = None  # --network_args attn_dim=..., and the others below; None = network_dim, 0 = skip
mlp_dim = None
mod_dim = None
refiner_dim = None
embedder_dims = None  # [x, t, cap] ranks for the embedders; None = no embedder LoRA
network_dropout = 0.0  # --network_dropout
rank_dropout = 0.0
module_dropout = 0.0
learning_rate = 1e-4  # --learning_rate
optimizer_type = "AdamW"  # --optimizer_type: AdamW (fp32 states) | Adafactor (torch.optim.Adafactor: factored
# second moment, no first moment; its learning_rate is the cap of a step *relative* to each weight's RMS)
weight_decay = 0.01
lr_scheduler = "constant"  # --lr_scheduler: constant | constant_with_warmup | cosine | linear
lr_warmup_steps = 0  # --lr_warmup_steps
timestep_sampling = "nextdit_shift"  # --timestep_sampling: nextdit_shift | lognorm | shift | sigmoid | uniform
discrete_flow_shift = 6.0  # --discrete_flow_shift (for "shift")
sigmoid_scale = 1.0  # --sigmoid_scale
model_prediction_type = "raw"  # --model_prediction_type: raw only (the model already predicts x0 - noise)
system_prompt = lumina2.SYSTEM_PROMPTS["base"]  # --system_prompt
gemma2_max_token_length = 256  # --gemma2_max_token_length
max_train_epochs = 10  # --max_train_epochs
max_train_steps = 0  # --max_train_steps (optimizer steps; 0 = from epochs)
save_every_n_epochs = 1  # --save_every_n_epochs (0 = off)
save_every_n_steps = 0  # --save_every_n_steps (0 = off)
save_last_n_steps = 0  # --save_last_n_steps: keep the step checkpoints of the last n steps only (0 = keep all)
save_last_n_epochs = 0  # --save_last_n_epochs: keep the last n epoch checkpoints only (0 = keep all)
mixed_precision = "bf16"  # --mixed_precision: bf16 | no (fp32 everywhere)
gradient_checkpointing = True  # --gradient_checkpointing
gradient_accumulation_steps = 1  # --gradient_accumulation_steps
max_grad_norm = 1.0  # --max_grad_norm (0 = off)
cache_latents_to_disk = False  # --cache_latents_to_disk (latents are always cached; in memory otherwise)
cache_text_encoder_outputs_to_disk = False  # --cache_text_encoder_outputs_to_disk
seed = 42  # --seed
sample_prompts = []  # --sample_prompts, as a list of prompts
sample_every_n_steps = 0  # --sample_every_n_steps
sample_every_n_epochs = 0  # --sample_every_n_epochs
sample_width = 1024
sample_height = 1024
sample_steps = 30
sample_cfg = 4.0
sample_seed = 0
resume = False  # continue from output_dir/output_name-state.pt (or the previous state, if that one is damaged)
overwrite = False  # a new run (resume=False) into an output_dir holding this output_name's state or log is refused
# unless this is True: then that state and log are removed and the checkpoints are replaced as the run saves
device = "cuda" if torch.cuda.is_available() else "cpu"
attention = "sdpa"  # sdpa | flash | math (lumina2.set_attention; sd-scripts --use_flash_attn); sage samples only
blocks_to_swap = 0  # --blocks_to_swap: this many of the 26 main layers wait in CPU RAM and stream to the device
fp8_base = False  # --fp8_base: frozen base Linear weights stored as float8_e4m3fn with a scale (LoRA only)
fp8_scaled_mm = False  # musubi-tuner's --fp8_fast: with fp8_base, forward matmuls in fp8 (torch._scaled_mm; sm89+)
compile = False  # torch.compile each block (regional), dynamic sequence length
train_mode = "lora"  # "lora" or "full" (every DiT weight trains; saved as a whole model in the original layout)
bf16_update = "stochastic"  # how a bf16 weight takes its fp32 update: "stochastic" rounding (no extra memory)
# or "master" (a persistent fp32 master copy, +4 bytes a parameter); measured in test_full.py
fused_backward_pass = False  # --fused_backward_pass: full mode, one process, no accumulation: each tensor is
# stepped the moment its gradient is complete and the gradient is freed; max_grad_norm then clips per tensor
ema_decay = 0.0  # EMA of the trained weights (0 = off), written next to each checkpoint as ...-ema.safetensors
ema_device = "cpu"  # where the fp32 EMA lives: "cpu" or the training device ("cuda")
ema_every = 10  # update the EMA every k optimizer steps with decay^k (a CPU EMA costs a device->host copy per update)
log_every = 1  # log (and sync the device for the loss) every n optimizer steps
parallel = "ddp"  # under torchrun: "ddp" (LoRA or full, a full replica per GPU) | "fsdp" (full: FSDP2 per block)
demo = False  # write tiny random weights and a synthetic dataset first (config/demo.py)
# -----------------------------------------------------------------------------


def shift_sigma(u, k):
    """S_k(u) = k u / (1 + (k - 1) u): pushes sigma toward noise for k > 1."""
    return k * u / (1 + (k - 1) * u)


def sample_sigmas(n, mode, latent_hw, generator, flow_shift=6.0, sigmoid_scale=1.0):
    """n noise levels sigma in (0, 1) (sigma = 1 is pure noise) for latents of size latent_hw (SPEC §5)."""
    h, w = latent_hw
    mu = 0.5 + 0.65 * ((h // 2) * (w // 2) - 256) / 3840  # resolution-dependent shift: 1.15 at 1024^2
    if mode == "nextdit_shift":
        return shift_sigma(torch.rand(n, generator=generator), math.exp(mu))
    if mode == "lognorm":
        return shift_sigma(torch.sigmoid(torch.randn(n, generator=generator)), math.exp(mu))
    if mode == "shift":
        return shift_sigma(torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator)), flow_shift)
    if mode == "sigmoid":
        return torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"timestep_sampling must be nextdit_shift, lognorm, shift, sigmoid or uniform, got {mode!r}")


def flow_matching_loss(model, x0, cap_feats, cap_mask, sigma, noise):
    """x0, noise (B, 16, h, w) fp32; sigma (B,) fp32 -> scalar fp32 MSE against v = x0 - noise."""
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    v = model(xt, 1 - sigma, cap_feats, cap_mask)  # t = 1 - sigma stays fp32 into the timestep embedding
    return F.mse_loss(v.float(), x0 - noise, reduction="none").mean(dim=(1, 2, 3)).mean()


def lr_lambda(kind, warmup, total):
    """Multiplier of the base learning rate at optimizer step s."""
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        p = (s - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1 - p)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
        raise ValueError(f"lr_scheduler must be constant, constant_with_warmup, cosine or linear, got {kind!r}")
    return f


def local(t):
    """The part of a tensor this process holds: an FSDP2 shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def stochastic_round_(dst, src, generator):
    """dst (bf16) <- src (fp32), rounded down or up at random with the probabilities that make it unbiased:
    adding uniform noise to the 16 bits bf16 drops, then truncating them. E[dst] = src, so an update far
    below bf16's resolution (2^-8 relative) still moves the weight on average instead of vanishing."""
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    dst.copy_((src.view(torch.int32) + noise).bitwise_and_(-65536).view(torch.float32))  # exact in bf16


class Optimizer:
    """torch.optim.AdamW or Adafactor over groups of tensors that can be stepped one group at a time: all
    LoRA tensors form one group; in full mode each tensor is its own group, so it can be stepped inside
    backward (fused_backward_pass) and its gradient freed at once.

    The torch optimizer only ever sees fp32 tensors. An fp32 weight is stepped in place. A bf16 weight is
    stepped through an fp32 work tensor and written back, by `bf16_update`: "stochastic" fills the work
    tensor from the weight for the length of its step only (no memory kept) and rounds back stochastically;
    "master" keeps the work tensor as a persistent fp32 master weight and rounds back to nearest."""

    def __init__(self, groups, kind, lr, weight_decay, bf16_update, seed, zero_grads_in_place=False):
        if kind not in ("AdamW", "Adafactor"):
            raise SystemExit(f"optimizer_type must be 'AdamW' or 'Adafactor', got {kind!r}")
        if bf16_update not in ("stochastic", "master"):
            raise SystemExit(f"bf16_update must be 'stochastic' or 'master', got {bf16_update!r}")
        self.groups, self.master, self.seed = groups, bf16_update == "master", seed
        # DDP with gradient_as_bucket_view: a gradient is a view of the all-reduce bucket. Zeroed in place it stays
        # that view; set to None, the reducer would allocate a fresh one next step and copy it into the bucket.
        self.zero_grads_in_place = zero_grads_in_place
        self.work = [[self.work_tensor(local(p)) for p in g] for g in groups]
        make = torch.optim.AdamW if kind == "AdamW" else torch.optim.Adafactor
        self.opts = [make(w, lr=lr, weight_decay=weight_decay) for w in self.work]
        self.lr = lr
        self.generator = torch.Generator(local(groups[0][0]).device).manual_seed(seed)  # the rounding noise

    def work_tensor(self, p):
        if p.dtype == torch.float32:
            return p.detach()  # the weight itself
        return p.detach().float() if self.master else torch.empty(0, device=p.device)

    def step(self, i):
        """Step group i with the gradients its tensors hold, then free those gradients."""
        with torch.no_grad():
            for p, w in zip(self.groups[i], self.work[i]):
                if local(p).dtype != torch.float32 and not self.master:
                    w.data = local(p).float()  # the fp32 copy exists for this step only
                w.grad = local(p.grad).float()
            for group in self.opts[i].param_groups:
                group["lr"] = self.lr
            self.opts[i].step()
            for p, w in zip(self.groups[i], self.work[i]):
                if local(p).dtype != torch.float32:
                    if self.master:
                        local(p).copy_(w)  # round to nearest
                    else:
                        stochastic_round_(local(p), w, self.generator)
                        w.data = torch.empty(0, device=w.device)
                w.grad = None
                if self.zero_grads_in_place:
                    p.grad.zero_()
                else:
                    p.grad = None

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts], "generator": self.generator.get_state(),
                "master": [[w.cpu() for w in ws] for ws in self.work] if self.master else None}

    def load_state_dict(self, st, same_device=True, step=0):
        for o, s in zip(self.opts, st["opts"]):
            o.load_state_dict(s)
        if same_device:
            self.generator.set_state(st["generator"])
        else:  # a CPU generator's state does not fit a CUDA generator (or back): a fresh stream, on purpose
            self.generator.manual_seed(self.seed + step)
        if self.master:
            for ws, saved in zip(self.work, st["master"]):
                for w, v in zip(ws, saved):
                    w.copy_(v)


class EMA:
    """Exponential moving average of the trained tensors, kept in fp32 (a bf16 EMA would drop the
    (1 - decay) x update it adds each step): every `every` optimizer steps, ema <- d^k ema + (1 - d^k) w with
    k = every, so the average spans the same number of steps whatever k is. A CPU EMA of a CUDA model reads
    the weights through pinned buffers on a side stream; k > 1 spreads that copy (5 GB for a full 2.6B model)
    over k steps. `due` says whether this step updates: the fused step reads it inside backward."""

    def __init__(self, params, decay, device, every=1):
        self.params, self.decay, self.every, self.due = params, decay, every, every == 1
        self.shadow = [local(p).detach().to(device, torch.float32, copy=True) for p in params]
        cuda_to_host = local(params[0]).is_cuda and torch.device(device).type == "cpu"
        self.stream = torch.cuda.Stream() if cuda_to_host else None
        self.staging = [torch.empty(local(p).shape, dtype=p.dtype, pin_memory=True) for p in params] if cuda_to_host else None

    def set_step(self, step):
        """Before optimizer step `step` (0-based) runs: it updates the EMA when (step + 1) % every == 0."""
        self.due = (step + 1) % self.every == 0

    @torch.no_grad()
    def update(self, i):
        if not self.due:
            return
        w = local(self.params[i]).detach()
        if self.stream is not None:  # device -> pinned host copy off the compute stream, then the fp32 lerp on the CPU
            self.stream.wait_stream(torch.cuda.current_stream(w.device))
            with torch.cuda.stream(self.stream):
                self.staging[i].copy_(w, non_blocking=True)
            self.stream.synchronize()
            w = self.staging[i]
        self.shadow[i].lerp_(w.to(self.shadow[i].device, torch.float32), 1 - self.decay ** self.every)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the trained tensors hold the EMA (rounded to their dtype); after: their own values, exactly."""
        kept = [local(p).detach().to("cpu", copy=True) for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.shadow):
                local(p).copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    local(p).copy_(k)


def clip_limit(max_grad_norm):
    return max_grad_norm if max_grad_norm > 0 else float("inf")  # 0 = off; the norm is still computed, for the log


def step_after_backward(params, optimizer, max_grad_norm, ema=None):
    """Clip the global gradient norm, step every group, update the EMA. Returns the pre-clip norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip_limit(max_grad_norm))
    for i in range(len(optimizer.groups)):
        optimizer.step(i)
        if ema:
            ema.update(i)
    return norm


def fuse_steps_into_backward(params, optimizer, max_grad_norm, ema=None):
    """Full mode, params[i] alone in optimizer group i: step each tensor from a post-accumulate-grad hook, the
    moment backward has finished its gradient, and free that gradient, so that the whole model's gradients
    never exist at once. Clipping is per tensor here (no global norm exists yet). Returns the list the
    hooks append each tensor's pre-clip gradient norm to."""
    norms = []

    def step(p, i):
        norms.append(torch.nn.utils.clip_grad_norm_([p], clip_limit(max_grad_norm)))
        optimizer.step(i)
        if ema:
            ema.update(i)

    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda p, i=i: step(p, i))
    return norms


def setup_distributed(c):
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPU), one GPU per process.
    Returns (rank, world size); (0, 1) for a plain `python train.py`."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    device_id = None
    if c.device.startswith("cuda"):
        c.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(c.device)
        device_id = torch.device(c.device)  # binds NCCL to this GPU now, not lazily at the first collective
    # a long timeout: the other ranks wait at a barrier while rank 0 encodes the whole dataset's caches
    dist.init_process_group("nccl" if device_id else "gloo", timeout=datetime.timedelta(hours=4), device_id=device_id)
    return dist.get_rank(), world


def parallelize(model, c, world):
    """DDP: a replica per process, gradients averaged in backward. FSDP2: each block's weights (and the
    rest, at the root) sharded across processes and gathered just in time. Returns the module to call."""
    if world == 1:
        return model
    if c.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # bf16 gradients are summed across ranks in fp32
        for block in memory.blocks(model):
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[torch.device(c.device).index] if c.device.startswith("cuda") else None,
                                   find_unused_parameters=c.module_dropout > 0,  # a dropped LoRA module gets no grad
                                   gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no second copy


def full_state_dict(model, fsdp):
    """The whole model in bf16 under its original keys. Under FSDP2 the shards are gathered to rank 0 alone,
    straight into CPU memory (a collective: every rank calls; the others get {})."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    return {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in sd.items()}


# -----------------------------------------------------------------------------
# the config, checked as a whole before anything is loaded

CHOICES = {"train_mode": ("lora", "full"), "save_layout": ("kohya", "diffusion_model"), "optimizer_type": ("AdamW", "Adafactor"),
           "lr_scheduler": ("constant", "constant_with_warmup", "cosine", "linear"),
           "timestep_sampling": ("nextdit_shift", "lognorm", "shift", "sigmoid", "uniform"),
           "model_prediction_type": ("raw",),  # the model already predicts v = x0 - noise
           "mixed_precision": ("bf16", "no"),  # fp16 is not offered: Gemma-2 and the DiT overflow in fp16
           "bf16_update": ("stochastic", "master"), "parallel": ("ddp", "fsdp")}
NONNEG = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
SIDE = (lambda v: v >= 16 and v % 16 == 0, "a positive multiple of 16 (the AE divides by 8, the DiT patches 2x2)")
OPTIONAL_RANK = (lambda v: v is None or v >= 0, "None or >= 0")
RANGES = {"learning_rate": POSITIVE, "network_dim": AT_LEAST_1, "network_alpha": POSITIVE, "weight_decay": NONNEG,
          "attn_dim": OPTIONAL_RANK, "mlp_dim": OPTIONAL_RANK, "mod_dim": OPTIONAL_RANK, "refiner_dim": OPTIONAL_RANK,
          "embedder_dims": (lambda v: v is None or (len(v) == 3 and all(isinstance(r, int) and r >= 0 for r in v)), "None or three ranks [x, t, cap] >= 0"),
          "network_dropout": FRACTION, "rank_dropout": FRACTION, "module_dropout": FRACTION,
          "caption_dropout_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"), "resolution": SIDE, "num_repeats": AT_LEAST_1,
          "train_batch_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1, "max_grad_norm": NONNEG,
          "max_train_steps": NONNEG, "max_train_epochs": NONNEG, "save_every_n_epochs": NONNEG, "save_every_n_steps": NONNEG,
          "sample_every_n_steps": NONNEG, "sample_every_n_epochs": NONNEG, "lr_warmup_steps": NONNEG,
          "discrete_flow_shift": POSITIVE, "sigmoid_scale": POSITIVE, "gemma2_max_token_length": AT_LEAST_1,
          "sample_width": SIDE, "sample_height": SIDE, "sample_steps": AT_LEAST_1, "ema_decay": FRACTION, "ema_every": AT_LEAST_1,
          "log_every": AT_LEAST_1, "save_last_n_steps": NONNEG, "save_last_n_epochs": NONNEG, "blocks_to_swap": NONNEG, "caption_variants": AT_LEAST_1, "validate_every_n_steps": NONNEG,
          "validation_split": (lambda v: 0 <= v <= 1, "in [0, 1]"), "validation_seed": (lambda v: isinstance(v, int), "an integer"),
          "validation_sigmas": (lambda v: len(v) > 0 and all(isinstance(s, (int, float)) and 0 < s < 1 for s in v), "a list of noise levels in (0, 1)")}


def device_problem(name, what):
    """None when `name` is a device this torch can use, else why not."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        return f"{what}={name!r} is not a device name (cpu, cuda, cuda:1, ...)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
            return f"{what}={name!r} but this machine has {build}; use --{what}=cpu or install a CUDA build of torch"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{what}={name!r} but only {torch.cuda.device_count()} GPU(s) are visible"
    elif dev.type != "cpu":
        return f"{what}={name!r}: only cpu and cuda devices are supported"
    return None


def validate(c, world):
    """Every enumerated value, every range and every combination, checked before any file is read, so that
    a typo fails in a second instead of after caching or at the first save. Raises SystemExit listing all."""
    problems = []
    for key, allowed in CHOICES.items():
        v = getattr(c, key)
        if v not in allowed:
            near = [a for a in allowed if isinstance(v, str) and a.lower() == v.lower()]
            problems.append(f"{key}={v!r} is not one of {', '.join(map(repr, allowed))}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    for key, (ok, what) in RANGES.items():
        v = getattr(c, key)
        try:
            good = ok(v)
        except TypeError:
            good = False
        if not good:
            problems.append(f"{key}={v!r} must be {what}")
    for key in ("device", "ema_device"):
        p = device_problem(getattr(c, key), key)
        if p:
            problems.append(p)
    if not all(isinstance(p, str) for p in c.sample_prompts):
        problems.append(f"sample_prompts must be a list of strings, got {c.sample_prompts!r}")
    splits = [c.validation_split]
    if c.dataset_config:  # read and checked whole now: a typo in the TOML fails here, before any image is read
        try:
            splits = [s["validation_split"] for s in data.read_dataset_config(c.dataset_config, dataset_defaults(c))]
        except ValueError as e:
            problems.append(f"dataset_config: {e}".replace("\n", "\n    "))
            splits = None
    if splits is not None and c.validate_every_n_steps > 0 and max(splits) == 0:
        problems.append("validate_every_n_steps needs validation images: set validation_split (here, or in the dataset_config's "
                        "[general] or [[datasets]])")
    combos = [
        (c.fused_backward_pass and (c.train_mode != "full" or c.gradient_accumulation_steps != 1 or world > 1),
         "fused_backward_pass needs train_mode='full', gradient_accumulation_steps=1 and one process (the step runs "
         "inside backward, before gradients could be accumulated or averaged)"),
        (world > 1 and c.parallel == "fsdp" and c.train_mode != "full", "parallel='fsdp' is for train_mode='full'; LoRA training uses 'ddp'"),
        (c.blocks_to_swap > 0 and c.train_mode == "full",
         "blocks_to_swap needs train_mode='lora': in full mode the swapped blocks' gradients and optimizer states would have "
         "to live in CPU RAM and be stepped there; use gradient checkpointing + Adafactor + fused_backward_pass instead"),
        (c.attention == "sage", "attention='sage' has no backward pass (sageattention's kernels are inference-only): "
                                "train with 'sdpa' or 'flash' and use sage in sample.py"),
        (c.blocks_to_swap > 0 and world > 1 and c.parallel == "fsdp", "blocks_to_swap cannot combine with FSDP2, which owns the weights' placement"),
        (c.fp8_base and c.train_mode == "full", "fp8_base stores the frozen base in fp8: it needs train_mode='lora'"),
        (c.fp8_scaled_mm and not c.fp8_base, "fp8_scaled_mm runs the matmuls of an fp8 base: it needs fp8_base=True"),
    ]
    problems += [msg for bad, msg in combos if bad]
    if not device_problem(c.device, "device"):
        try:  # the fp8 GEMM needs sm89+ on CUDA
            memory.use_scaled_mm(c.fp8_scaled_mm, c.device)
        except ValueError as e:
            problems.append(str(e))
        try:  # the backend's name, its package, its device and its dtype
            lumina2.set_attention(c.attention, torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32, c.device)
        except (ValueError, ImportError) as e:
            problems.append(str(e))
    if problems:
        raise SystemExit("config errors:\n  - " + "\n  - ".join(problems))
    if splits is not None and max(splits) > 0 and not c.validate_every_n_steps:
        warnings.warn("validation_split holds images out of training, but validate_every_n_steps=0 never uses them")
    if c.optimizer_type == "Adafactor" and c.learning_rate < 1e-4:
        warnings.warn(f"learning_rate={c.learning_rate} with torch's Adafactor caps each step at that fraction of the "
                      "weight's RMS (about 0.02 here): sd-scripts' absolute 1e-5 corresponds to about 5e-4")


# -----------------------------------------------------------------------------
# the training state: tensors and plain values only, so it loads with weights_only=True


def previous_state(path):
    return path[: -len(".pt")] + "-prev.pt"  # t-state.pt -> t-state-prev.pt


def save_state(obj, path):
    """Write the state through a temp file; only once it is complete does the current state become the
    previous one (-prev.pt) and the new one take its name. A kill or a full disk at any moment leaves at least
    one complete state: the current one, or (killed between the two renames) the previous one."""
    def write(tmp):
        torch.save(obj, tmp)
        if os.path.exists(path):
            os.replace(path, previous_state(path))
    lumina2.atomic_write(path, write)


def load_state(path, mmap=False):
    """A state file -> dict. Loaded with weights_only=True: a file that carries pickled Python objects (which
    could run code when loaded) is refused, not executed. Raises BadInput saying which of the two it is."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise lumina2.BadInput(f"{path} holds pickled Python objects besides tensors and plain values, so it is not "
                                   "loaded (unpickling could run code). train.py never writes such a file: was it replaced?") from None
        raise lumina2.BadInput(f"{path} is damaged ({os.path.getsize(path):,} bytes that are not a state file)") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated, zero bytes, torn zip directory
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else "empty or cut short"
        raise lumina2.BadInput(f"{path} is damaged ({os.path.getsize(path):,} bytes; {reason})") from None


def rng_state(device):
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None}


def set_rng_state(s, device, same_device):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if same_device and s["cuda"] is not None:
        torch.cuda.set_rng_state(s["cuda"], device)


# what a resumed run must share with the saved one: each of these changes the maths of the saved tensors (their
# shapes, scale, dtype or optimizer state), so a resume with another value would train something else silently
MATH_KEYS = ("train_mode", "network_dim", "network_alpha", "attn_dim", "mlp_dim", "mod_dim", "refiner_dim", "embedder_dims",
             "mixed_precision", "fp8_base", "optimizer_type", "bf16_update", "ema_decay")


def read_resume_state(c, r):
    """The newest state that loads: the state file, else the previous one (the state is damaged, or a kill
    between save_state's two renames left only the previous one), with a message. Memory-mapped, so that
    reading it before the caching costs no RAM. -> (state, its path)."""
    tried = []
    for path in (r.state_path, previous_state(r.state_path)):
        if not os.path.exists(path):
            continue
        try:
            st = load_state(path, mmap=True)
        except lumina2.BadInput as e:
            tried.append(str(e))
            continue
        if tried:
            print(f"{tried[0]}; resuming from the previous state {path} (step {st['step']}) instead")
        return st, path
    if not tried:
        raise lumina2.BadInput(f"resume=True but there is no training state at {r.state_path}")
    raise lumina2.BadInput("resume=True but no training state loads: " + "; ".join(tried))


def check_settings(st, path, c, r):
    """The saved run and this one must agree on everything the saved tensors depend on: each difference named."""
    if st["world_size"] != r.world:  # the data position counts global batches of train_batch_size x world
        raise lumina2.BadInput(f"{path} was saved by {st['world_size']} process(es); resume with the same number, not {r.world}")
    saved = st["config"]
    changed = [f"{k}={saved.get(k)!r} there, {getattr(c, k)!r} now" for k in MATH_KEYS if saved.get(k) != getattr(c, k)]
    if changed:
        raise lumina2.BadInput(f"{path} was trained with other settings, and resuming would change what its tensors mean: "
                               f"{'; '.join(changed)}. Resume with the saved values, or start a new run (another output_name, "
                               "or --overwrite=True)")


def check_shapes(st, path, c, r):
    mine = [tuple(local(p).shape) for p in r.params]
    theirs = [tuple(t.shape) for t in st["params"]]
    if mine != theirs:  # e.g. another base model: the tensors are paired by position, so they must match one to one
        bad = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise lumina2.BadInput(f"{path} holds {len(theirs)} trained tensors, this run has {len(mine)}; the first difference is "
                               f"tensor {bad}: {theirs[bad] if bad < len(theirs) else 'none'} saved, {mine[bad] if bad < len(mine) else 'none'} now "
                               f"(another base model file, dit_path={c.dit_path!r}?)")


def resume_from(c, r):
    """Load the state into the run r (weights, optimizer, EMA, generators, data position). A state saved on
    another device type resumes with its device generators re-seeded (with a warning): their states do not
    transfer between CPU and CUDA."""
    st, path = r.resume_state  # read and checked by check_output_dir
    check_shapes(st, path, c, r)
    if r.world > 1:  # every process must resume the same step (under FSDP2 each read its own state file)
        steps = torch.tensor([st["step"], -st["step"]], device=c.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise lumina2.BadInput(f"the processes' states are at different steps ({-steps[1].item()} to {steps[0].item()}): "
                                   "a damaged state file fell back on some ranks only; resume from a consistent set")
    here = torch.device(c.device).type
    same = st.get("device", "cpu") == here
    if not same:
        warnings.warn(f"{path} was saved on {st['device']}, resuming on {here}: the stochastic-rounding and "
                      f"{st['device']} random generators are re-seeded, so the run goes on but is not bit-identical to an uninterrupted one")
    with torch.no_grad():
        for p, saved in zip(r.params, st["params"]):
            local(p).copy_(saved)
        for e, saved in zip(r.ema.shadow if r.ema else [], st["ema"] or []):
            e.copy_(saved)
    r.optimizer.load_state_dict(st["optimizer"], same_device=same, step=st["step"])
    r.noise_gen.set_state(st["noise_gen"])  # a CPU generator on every device: noise and sigma resume exactly
    set_rng_state(st["rng"], c.device, same)
    r.step, r.epoch, r.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
    r.last_saved = path
    if r.rank == 0:
        cut_log(r.log_path, r.step)
    print(f"resumed from {path} at step {r.step} (epoch {r.epoch}, batch {r.batch_in_epoch})")


def save_weights(c, r, path, meta):
    if c.train_mode == "lora":
        if r.rank == 0:
            lora.save_lora(r.model, path, layout=c.save_layout, metadata=meta)
    else:  # the whole model under the original keys, bf16, for load_dit, ComfyUI, sd-scripts
        sd = full_state_dict(r.model, r.fsdp) if r.rank == 0 or r.fsdp else None  # under FSDP2 a collective
        if r.rank == 0:
            lumina2.save_file_atomic(sd, path, metadata=meta)


def save_checkpoint(c, r, tag):
    """The weights (and the EMA's) as safetensors, then the state to resume from, then the pruning of older
    checkpoints. Nothing is written unless every logged loss and every trained tensor is finite, and a failed
    write stops the run saying which complete checkpoint is left. Returns the weights' path."""
    flush_log(c, r)  # the divergence check of every step up to here
    check_finite_weights(c, r)
    path = os.path.join(c.output_dir, f"{c.output_name}{tag}.safetensors")
    meta = {"ss_learning_rate": str(c.learning_rate), "ss_training_step": str(r.step), "ss_epoch": str(r.epoch),
            "ss_timestep_sampling": c.timestep_sampling, "ss_system_prompt": c.system_prompt,
            "ss_max_token_length": str(c.gemma2_max_token_length), "ss_seed": str(c.seed),
            "ss_mixed_precision": c.mixed_precision, "ss_num_train_images": str(len(r.ds)),
            "ss_optimizer": c.optimizer_type, "ss_train_mode": c.train_mode}
    try:
        save_weights(c, r, path, meta)
        if r.ema:
            with r.ema.swapped_in():
                save_weights(c, r, path.replace(".safetensors", "-ema.safetensors"), {**meta, "ss_ema_decay": str(c.ema_decay)})
        if r.rank == 0 or r.fsdp:
            save_state({"params": [local(p).detach().cpu() for p in r.params], "optimizer": r.optimizer.state_dict(),
                        "ema": [e.cpu() for e in r.ema.shadow] if r.ema else None, "noise_gen": r.noise_gen.get_state(),
                        "rng": rng_state(c.device), "device": torch.device(c.device).type, "step": r.step, "epoch": r.epoch,
                        "batch_in_epoch": r.batch_in_epoch, "world_size": r.world, "config": vars(c)}, r.state_path)
    except lumina2.WriteFailed as e:
        raise stopped_writing(c, r, e) from None
    r.last_saved = path
    if r.rank == 0 and tag:  # the final save prunes nothing, as in sd-scripts
        prune_checkpoints(c, r)
    return path


def save_samples(c, r, tag):
    """Rank 0 samples and writes the grid; under FSDP2 every rank runs the forward with it (a collective)."""
    flush_log(c, r)  # no samples from a diverged model
    if not (r.rank == 0 or r.fsdp):
        return None
    r.model.eval()
    grid = []
    for i, cond in enumerate(r.sample_cond):
        noise = sample.seeded_noise([c.sample_seed + i], c.sample_height, c.sample_width).to(c.device)
        grid.append(sample.sample(r.model, noise, cond, r.sample_uncond, c.sample_steps, c.sample_cfg, progress=False))
    r.model.train()
    path = os.path.join(c.output_dir, "samples", f"{c.output_name}{tag}.png")
    if r.rank == 0:
        r.ae.to(c.device)
        sample.save_grid(sample.decode_to_images(r.ae, torch.cat(grid)), path)  # decoded once, here
        r.ae.to("cpu")
    return path


# -----------------------------------------------------------------------------
# the output folder: one run at a time, strict JSON logs, old checkpoints pruned, nothing non-finite saved


class Diverged(SystemExit):
    """A non-finite loss, gradient norm or weight: the run stops before anything is saved from it."""


def json_line(rec):
    """Strict JSON (RFC 8259 has no NaN or Infinity, and strict readers reject them): non-finite is null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}, allow_nan=False)


def process_alive(owner):
    """False only for a process of this host that no longer exists (another host's cannot be checked)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)  # signal 0: does it exist?
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def take_lock(path, c):
    """-> the descriptor of the lock file, created exclusively. A lock whose run has died on this host is taken
    over, and the partial writes that run was killed in (atomic_write's temp names) are removed."""
    try:
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        pass
    try:
        with open(path) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        owner = {}
    if not owner or process_alive(owner):
        who = f"pid {owner['pid']} on {owner['host']}, started {owner['started']}" if owner else "an unreadable lock"
        raise lumina2.BadInput(f"another train.py is using output_dir {c.output_dir} ({who}); wait for it or choose "
                               f"another output_dir. If no such run is alive, delete {path}")
    print(f"taking over {path}: its run (pid {owner['pid']}) is no longer alive")
    os.remove(path)
    for f in os.listdir(c.output_dir):
        if re.fullmatch(rf".+\.{owner['pid']}-[0-9a-f]{{8}}\.tmp", f):
            os.remove(os.path.join(c.output_dir, f))
    return take_lock(path, c)  # another run may have taken it meanwhile: then it is refused above


@contextlib.contextmanager
def output_dir_lock(c, r):
    """output_dir/train.lock, holding the owner's pid and host for the length of the run: a second train.py on
    the same output_dir stops at start-up instead of interleaving its checkpoints with the first one's. Rank 0
    holds it."""
    if r.rank > 0:
        yield
        return
    path = os.path.join(c.output_dir, "train.lock")
    try:
        os.makedirs(c.output_dir, exist_ok=True)
        fd = take_lock(path, c)
    except OSError as e:
        raise lumina2.WriteFailed(f"output_dir {c.output_dir} is not writable ({e.strerror or e}); choose another output_dir "
                                  "or fix its permissions") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def check_output_dir(c, r):
    """A new run (resume=False) into a folder that holds this output_name's state or log is refused, so that a
    forgotten --resume=True cannot replace a long run's checkpoints with step 1's. overwrite=True starts over:
    the old state and log are removed when training starts (a run that fails its checks leaves them), and
    the old checkpoints are replaced as the new run saves its own.
    A resume reads its state now, so that a damaged state or changed settings fail before the caching."""
    if c.resume:
        r.resume_state = read_resume_state(c, r)
        check_settings(*r.resume_state, c, r)
        return
    if r.rank > 0:
        return
    found = sorted(n for n in os.listdir(c.output_dir) if re.fullmatch(re.escape(c.output_name) + r"-(state.*\.pt|log\.jsonl)", n))
    if found and not c.overwrite:
        raise lumina2.BadInput(f"output_dir {c.output_dir} already holds a run named {c.output_name!r} ({', '.join(found)}): "
                               "continue it with --resume=True, start over with --overwrite=True, or choose another output_name")
    r.replaced = [os.path.join(c.output_dir, name) for name in found]


def cut_log(path, step):
    """On resume: keep the log's lines up to the resumed step (the interrupted run's later lines go, and a line
    torn by a kill too), so the log reads as one uninterrupted run."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
    lumina2.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(keep)))


def prune_checkpoints(c, r):
    """save_last_n_steps: remove the step checkpoints (and their EMA twins) older than the last n steps;
    save_last_n_epochs: keep the n newest epoch checkpoints. Called after a save is complete, so the newest
    file always exists first. The final file and the resume state are never touched."""
    name = re.escape(c.output_name)
    rules = [(c.save_last_n_steps, name + r"-step(\d{6})(-ema)?\.safetensors", r.step - c.save_last_n_steps),
             (c.save_last_n_epochs, name + r"-(\d{6})(-ema)?\.safetensors", r.epoch - c.save_last_n_epochs * max(1, c.save_every_n_epochs))]
    for n, pattern, oldest_gone in rules:
        if not n:
            continue
        for f in os.listdir(c.output_dir):
            m = re.fullmatch(pattern, f)
            if m and int(m.group(1)) <= oldest_gone:
                os.remove(os.path.join(c.output_dir, f))


def stopped_writing(c, r, e):
    left = (f"the last complete checkpoint is {r.last_saved}" if r.last_saved else "no checkpoint had been completed yet")
    return lumina2.WriteFailed(f"{e}. Stopped at step {r.step}: {left}. Free space (or make {c.output_dir} writable) and "
                               "run again with --resume=True")


def divergence_message(c, r, what, step):
    last = (f"the last finite loss was {r.last_finite[1]:.4g} at step {r.last_finite[0]}" if r.last_finite
            else "no step had a finite loss")
    kept = (f"the last good checkpoint is {r.last_saved}, unchanged" if r.last_saved else "no checkpoint had been saved yet")
    return (f"training diverged: {what} at step {step}; {last}. Stopped without saving: {kept}. Try a lower learning_rate "
            f"(now {c.learning_rate:g}), max_grad_norm > 0 (now {c.max_grad_norm:g}), or look for a damaged image or weight "
            f"file; --resume=True continues from the last good state")


def check_finite_weights(c, r):
    """Every trained tensor (and the EMA) finite, else Diverged: no checkpoint ever holds a NaN. One host sync
    per save. FSDP2 ranks each check their shard and agree through an all-reduce."""
    tensors = [local(p).detach() for p in r.params] + (r.ema.shadow if r.ema else [])
    ok = torch.stack([torch.isfinite(t).all().to(c.device) for t in tensors]).all().float()
    if r.fsdp:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise Diverged(divergence_message(c, r, "a trained weight is not finite", r.step))


# -----------------------------------------------------------------------------
# setup: caches first, then the model in one ordered setup


def dataset_defaults(c):
    """train.py's dataset constants under sd-scripts' key names: the whole config of train_data_dir, and the
    layer under [general] of a dataset_config (as sd-scripts' command-line flags are)."""
    return {"resolution": c.resolution, "batch_size": c.train_batch_size, "num_repeats": c.num_repeats,
            "flip_aug": c.flip_aug, "caption_extension": c.caption_extension, "caption_dropout_rate": c.caption_dropout_rate,
            "system_prompt": c.system_prompt, "validation_split": c.validation_split, "validation_seed": c.validation_seed}


def check_inputs(c, r):
    """Everything cheap before anything expensive, so that a bad file fails in seconds and not after the
    caching: the AE's and Gemma's headers (names, shapes, dtypes), the DiT (its header and the preset it
    matches, then its values: loaded into CPU RAM now, so that a damaged tensor is reported before the
    caching too; setup_model takes it from r.base), then the dataset scan (every image decoded, every
    caption read)."""
    if c.demo:
        paths = data.make_demo_weights(os.path.join(c.output_dir, "weights"))  # the same files sample.py's demo uses
        c.dit_path, c.gemma_path, c.ae_path = paths["dit"], paths["gemma"], paths["ae"]
        c.train_data_dir = data.make_demo_dataset(os.path.join(c.output_dir, "demo_images"))
    lumina2.inspect_ae(c.ae_path)
    lumina2.inspect_text_encoder(c.gemma_path)
    r.base = lumina2.load_dit(c.dit_path, dtype=r.dtype, device="cpu")  # its header checks, then its values
    subsets = (data.read_dataset_config(c.dataset_config, dataset_defaults(c)) if c.dataset_config
               else [data.folder_subset(c.train_data_dir, **dataset_defaults(c))])
    r.ds = data.build_datasets(subsets, variants=c.caption_variants, seed=c.seed)


def build_caches(c, r):
    """Latents and text features, then the AE and Gemma leave the device (the AE stays in CPU RAM for samples).
    Under torchrun rank 0 checks the inputs, writes the demo files and the disk caches first, then the other
    ranks read them."""
    if r.rank > 0:
        dist.barrier()
    check_inputs(c, r)
    cache_dir = os.path.join(c.output_dir, "cache")
    r.ae = lumina2.load_ae(c.ae_path, dtype=torch.float32, device=c.device)  # fp32: caches carry no bf16 error (84M params)
    r.ds.cache_latents(r.ae, device=c.device, cache_dir=cache_dir if c.cache_latents_to_disk or r.world > 1 else None,
                       ae_id=data.file_id(c.ae_path))
    r.ae.to("cpu")
    te = lumina2.load_text_encoder(c.gemma_path, dtype=r.dtype, device=c.device, max_length=c.gemma2_max_token_length)
    r.ds.cache_text(te, c.gemma2_max_token_length, te_id=data.file_id(c.gemma_path),  # each dataset's own system prompt
                    cache_dir=cache_dir if c.cache_text_encoder_outputs_to_disk or r.world > 1 else None)
    r.sample_cond = [te([p], c.system_prompt) for p in c.sample_prompts]
    r.sample_uncond = te([""], "") if c.sample_prompts else None
    del te
    if c.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if r.rank == 0 and r.world > 1:
        dist.barrier()


def setup_model(c, r):
    """The one ordered setup. Each step needs the one before it:
    1. the DiT, loaded on the CPU by check_inputs (the device holds only what step 5 puts there);
    2. LoRA (fp32 pairs around the base Linears), or every weight trainable: before fp8, so the LoRA wraps the
       full-precision Linears and its scale is exact;
    3-6. memory.prepare: fp8 storage of the frozen base -> gradient checkpointing -> regional compile -> block swap
       and placement on the device (memory.py says why in that order);
    7. DDP / FSDP2 wrap the placed model; 8. the optimizer sees the placed tensors; 9. EMA; 10. the fused step's hooks."""
    model, r.base = r.base, None  # loaded by check_inputs, on the CPU
    if c.train_mode == "lora":
        lora.inject(model, rank=c.network_dim, alpha=c.network_alpha, attn_dim=c.attn_dim, mlp_dim=c.mlp_dim,
                    mod_dim=c.mod_dim, refiner_dim=c.refiner_dim, embedder_dims=c.embedder_dims,
                    dropout=c.network_dropout, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout)
    else:
        model.requires_grad_(True).norm_final.requires_grad_(False)  # norm_final is stored but unused
    r.model = memory.prepare(model, c.device, fp8=c.fp8_base, fp8_scaled_mm=c.fp8_scaled_mm,
                             checkpointing=c.gradient_checkpointing, compile=c.compile, blocks_to_swap=c.blocks_to_swap)
    r.net = parallelize(r.model, c, r.world)
    r.params = lora.lora_parameters(r.model) if c.train_mode == "lora" else [p for p in r.model.parameters() if p.requires_grad]
    groups = [r.params] if c.train_mode == "lora" else [[p] for p in r.params]  # full: each tensor steps alone
    r.optimizer = Optimizer(groups, c.optimizer_type, c.learning_rate, c.weight_decay, c.bf16_update, c.seed,
                            zero_grads_in_place=r.world > 1 and c.parallel == "ddp")
    # DDP replicas are identical, so one EMA (rank 0's) is enough; FSDP2 keeps each rank's shard's
    r.ema = EMA(r.params, c.ema_decay, c.ema_device, c.ema_every) if c.ema_decay > 0 and (r.rank == 0 or r.fsdp) else None
    r.grad_norms = fuse_steps_into_backward(r.params, r.optimizer, c.max_grad_norm, r.ema) if c.fused_backward_pass else None


@torch.no_grad()
def validation_loss(c, r):
    """The mean flow-matching loss over the validation images, each at every sigma of c.validation_sigmas with
    its own fixed noise (seeded by its position in the validation set): a function of the weights alone, so
    the number is comparable across steps and runs. The model runs in eval mode (LoRA dropouts off), and no
    generator of the training is touched, so training goes on exactly as without validation. Rank 0 computes
    it (under FSDP2 every rank runs the forward with it); the other ranks return None."""
    if not (r.rank == 0 or r.fsdp):
        return None
    r.model.eval()
    total, n, first = torch.zeros((), device=c.device), 0, 0
    for batch in r.ds.validation_batches():
        x0 = batch["latents"].to(c.device)  # (B, 16, h, w)
        noise = torch.stack([torch.randn((len(c.validation_sigmas), *x0.shape[1:]), generator=torch.Generator().manual_seed(first + j))
                             for j in range(len(x0))]).to(c.device)  # (B, S, 16, h, w)
        for k, s in enumerate(c.validation_sigmas):
            sigma = torch.full((len(x0),), float(s), device=c.device)
            loss = flow_matching_loss(r.model, x0, batch["cap_feats"].to(c.device), batch["cap_mask"].to(c.device), sigma, noise[:, k])
            total += loss * len(x0)  # the batch's mean -> its sum
        first += len(x0)
        n += len(x0) * len(c.validation_sigmas)
    r.model.train()
    return (total / n).item()


def flush_log(c, r):
    """Turn the logged steps' device scalars into numbers with one host sync, write them as strict JSON, and
    stop the run at the first step whose loss or gradient norm is not finite (every rank sees the same
    all-reduced numbers, so every rank stops)."""
    if not r.pending:
        return
    flat = torch.cat([torch.cat([p["losses"], p["stats"]]) for p in r.pending]).tolist()  # the one sync
    k, bad, lines = 0, None, []
    for p in r.pending:
        n = len(p["losses"])
        v, k = flat[k:k + n + 2], k + n + 2
        r.losses += v[:n]
        rec = {"step": p["step"], "epoch": p["epoch"], "loss": sum(v[:n]) / n, "lr": p["lr"], "grad_norm": v[n],
               "sigma": v[n + 1], "time": p["time"], "peak_gb": round(sample.peak_memory_gb(c.device), 3)}
        if p.get("val_loss") is not None:
            rec["val_loss"] = r.val_loss = p["val_loss"]
        lines.append(json_line(rec) + "\n")
        if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
            bad = rec
            break
        r.last_finite = (rec["step"], rec["loss"])
    r.pending.clear()
    if r.log:  # the bad step's line too, before the stop
        try:
            r.log.write("".join(lines))
            r.log.flush()
        except OSError as e:
            raise stopped_writing(c, r, lumina2.WriteFailed(f"could not write {r.log_path} ({e.strerror or e})")) from None
    if bad:
        raise Diverged(divergence_message(c, r, f"loss {bad['loss']:.4g}, gradient norm {bad['grad_norm']:.4g}", bad["step"]))
    val = {"val": f"{r.val_loss:.4f}"} if r.val_loss is not None else {}
    if r.bar:
        r.bar.set_postfix(loss=f"{rec['loss']:.4f}", **val, lr=f"{rec['lr']:.2e}", mem=f"{rec['peak_gb']:.1f}GB")


def train(c):
    """c: the config namespace. Returns a dict with the losses and the paths written."""
    r = SimpleNamespace(step=0, epoch=0, batch_in_epoch=0, losses=[], val_loss=None, pending=[], log=None, bar=None,
                        last_finite=None, last_saved=None, replaced=[])
    world = int(os.environ.get("WORLD_SIZE", 1))
    validate(c, world)  # also sets the attention backend
    r.dtype = torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32
    r.rank, r.world = setup_distributed(c)
    r.fsdp = r.world > 1 and c.parallel == "fsdp"  # every rank holds a shard: saving gathers, each rank keeps its own state
    r.state_path = os.path.join(c.output_dir, f"{c.output_name}-state{f'-rank{r.rank}' if r.fsdp else ''}.pt")
    r.log_path = os.path.join(c.output_dir, f"{c.output_name}-log.jsonl")
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    with output_dir_lock(c, r):
        check_output_dir(c, r)
        build_caches(c, r)
        setup_model(c, r)
        try:
            return train_loop(c, r)
        finally:
            if r.log:
                r.log.close()
            if r.bar:
                r.bar.close()


def train_loop(c, r):
    batches_per_epoch = r.ds.len_batches(r.world)
    steps_per_epoch = math.ceil(batches_per_epoch / c.gradient_accumulation_steps)
    total_steps = c.max_train_steps or c.max_train_epochs * steps_per_epoch
    schedule = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, total_steps)
    r.noise_gen = torch.Generator().manual_seed(c.seed)  # noise and sigma come from here: resumable, device-independent
    if r.rank == 0:
        sizes = "/".join(str(ds.batch_size) for ds in r.ds.datasets)
        print(f"{c.train_mode}: {sum(p.numel() for p in r.params):,} trainable params; {len(r.ds)} images, "
              f"{batches_per_epoch} batches/epoch of {sizes} x {r.world} process(es), {total_steps} steps")
    if c.resume:
        resume_from(c, r)

    for path in r.replaced:  # overwrite=True: the previous run's state and log
        os.remove(path)
    # the loop: the loss, grad norm and sigma stay on the device; flush_log syncs once per logged step
    r.log = open(r.log_path, "a") if r.rank == 0 else None  # a new run found no log (check_output_dir); a resumed one was cut
    t0 = time.time()
    r.model.train()
    r.bar = tqdm(total=total_steps, initial=r.step, desc="train", dynamic_ncols=True, disable=r.rank > 0)
    while r.step < total_steps:
        micro, micro_losses, sigmas = 0, [], []
        r.optimizer.lr = c.learning_rate * schedule(r.step)
        if r.ema:
            r.ema.set_step(r.step)
        for batch in r.ds.batches(c.seed, r.epoch, skip=r.batch_in_epoch, rank=r.rank, world=r.world):
            # noise and sigma are drawn for the whole global batch on every rank and cut to this rank's share,
            # so N processes see exactly the draws one process with the combined batch would
            n, lo, hi = batch["global_size"], batch["start"], batch["start"] + len(batch["latents"])
            x0 = batch["latents"].to(c.device, torch.float32)
            noise = torch.randn((n, *x0.shape[1:]), generator=r.noise_gen)[lo:hi].to(c.device)
            sigma = sample_sigmas(n, c.timestep_sampling, x0.shape[-2:], r.noise_gen, c.discrete_flow_shift, c.sigmoid_scale)[lo:hi]
            sync = micro + 1 == c.gradient_accumulation_steps or r.batch_in_epoch + 1 == batches_per_epoch
            if r.fsdp:  # reduce-scatter once per optimizer step, not at every micro-step
                r.net.set_requires_gradient_sync(sync)
            with r.net.no_sync() if r.world > 1 and not r.fsdp and not sync else contextlib.nullcontext():
                loss = flow_matching_loss(r.net, x0, batch["cap_feats"].to(c.device), batch["cap_mask"].to(c.device),
                                          sigma.to(c.device), noise)
                # this rank's mean, weighted by its share: averaged over ranks it is the global batch's mean
                (loss * batch["weight"] / c.gradient_accumulation_steps).backward()
            r.batch_in_epoch += 1
            micro += 1
            micro_losses.append(loss.detach() * batch["weight"])
            sigmas.append(sigma.mean())
            if not sync:
                continue
            if c.fused_backward_pass:  # the steps already ran inside backward
                grad_norm = torch.stack(r.grad_norms).norm()
                r.grad_norms.clear()
            else:
                grad_norm = step_after_backward(r.params, r.optimizer, c.max_grad_norm, r.ema)
            r.step += 1
            losses = torch.stack(micro_losses)
            if r.world > 1:  # one small all-reduce per optimizer step, for the log
                dist.all_reduce(losses)
                losses = losses / r.world
            grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
            r.pending.append({"step": r.step, "epoch": r.epoch, "losses": losses.float(), "lr": r.optimizer.lr,
                              "stats": torch.stack([grad_norm.float(), torch.stack(sigmas).mean().to(grad_norm.device)]),
                              "time": round(time.time() - t0, 3)})
            r.bar.update(1)
            if c.validate_every_n_steps and r.step % c.validate_every_n_steps == 0:
                r.pending[-1]["val_loss"] = validation_loss(c, r)
            if r.step % c.log_every == 0 or r.step == total_steps:
                flush_log(c, r)
            micro, micro_losses, sigmas = 0, [], []
            r.optimizer.lr = c.learning_rate * schedule(r.step)
            if r.ema:
                r.ema.set_step(r.step)
            if r.batch_in_epoch == batches_per_epoch:
                r.epoch, r.batch_in_epoch = r.epoch + 1, 0
            if c.save_every_n_steps and r.step % c.save_every_n_steps == 0:
                save_checkpoint(c, r, f"-step{r.step:06d}")
            if c.sample_prompts and c.sample_every_n_steps and r.step % c.sample_every_n_steps == 0:
                save_samples(c, r, f"-step{r.step:06d}")
            if r.batch_in_epoch == 0:
                if c.save_every_n_epochs and r.epoch % c.save_every_n_epochs == 0 and r.step < total_steps:
                    save_checkpoint(c, r, f"-{r.epoch:06d}")
                if c.sample_prompts and c.sample_every_n_epochs and r.epoch % c.sample_every_n_epochs == 0:
                    save_samples(c, r, f"-e{r.epoch:06d}")
                break  # a new epoch draws a new order
            if r.step >= total_steps:
                break
    flush_log(c, r)
    r.bar.close()
    final = save_checkpoint(c, r, "")
    sample_path = save_samples(c, r, "-final") if c.sample_prompts else None
    if r.rank == 0:
        print(f"{'LoRA' if c.train_mode == 'lora' else 'model'}: {final}\nsamples: {sample_path}\nlog: {r.log_path}\n"
              f"{r.step} steps in {time.time() - t0:.1f}s, loss (mean of 20 batches) first {mean(r.losses[:20]):.4f}, "
              f"last {mean(r.losses[-20:]):.4f}, peak {sample.peak_memory_gb(c.device):.2f} GB")
    if r.world > 1:
        dist.barrier()  # rank 0 may still be writing: leave together
        dist.destroy_process_group()
    return {"losses": r.losses, "lora": final, "state": r.state_path, "log": r.log_path, "samples": sample_path,
            "model": r.model, "ema": r.ema}


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None):
    """The known failures (a bad input, a failed write) print one line that says what to do; anything else is a
    bug and keeps its traceback."""
    cfg = configure(dict(globals()), argv)
    try:
        return train(SimpleNamespace(**cfg))
    except (lumina2.BadInput, lumina2.WriteFailed) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    # SIGTERM (kill, a scheduler's timeout, torchrun stopping a failed job) exits through the cleanups: the
    # temp file being written is removed, the lock released; the last complete checkpoint is resumable
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
