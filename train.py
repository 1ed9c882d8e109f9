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

    python train.py config/demo.py                       # tiny random models + synthetic data, CPU, ~20 s
    python train.py config/lora_1024.py --train_data_dir=my_images --output_name=my_lora
    python train.py config/full_1024.py --train_data_dir=my_images     # full fine-tune, Adafactor, fused backward
    python train.py config/demo.py --resume=True          # continue from the last saved state
    torchrun --nproc_per_node=8 train.py config/lora_1024.py --train_data_dir=my_images   # DDP, bs 1 per GPU
"""
import contextlib
import datetime
import json
import math
import os
import random
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import data
import lora
import lumina2
import sample
from configurator import configure

# -----------------------------------------------------------------------------
# config: sd-scripts flag in the comment where one exists
dit_path = "models/lumina_2_model_bf16.safetensors"  # --pretrained_model_name_or_path (or lumina-image-2.safetensors)
gemma_path = "models/gemma_2_2b_fp16.safetensors"  # --gemma2
ae_path = "models/ae.safetensors"  # --ae
train_data_dir = "data/images"  # dataset_config image_dir: images with same-stem .txt captions
resolution = 1024  # dataset_config resolution: bucket area = resolution^2
num_repeats = 1  # dataset_config num_repeats
flip_aug = False  # dataset_config flip_aug
caption_extension = ".txt"  # dataset_config caption_extension
caption_dropout_rate = 0.0  # --caption_dropout_rate (works with cached text features)
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
resume = False  # continue from output_dir/output_name-state.pt
device = "cuda" if torch.cuda.is_available() else "cpu"
attention = "sdpa"  # lumina2.ATTENTION: sdpa | flash | math
train_mode = "lora"  # "lora" or "full" (every DiT weight trains; saved as a whole model in the original layout)
bf16_update = "stochastic"  # how a bf16 weight takes its fp32 update: "stochastic" rounding (no extra memory)
# or "master" (a persistent fp32 master copy, +4 bytes a parameter); measured in test_full.py
fused_backward_pass = False  # --fused_backward_pass: full mode, one process, no accumulation: each tensor is
# stepped the moment its gradient is complete and the gradient is freed; max_grad_norm then clips per tensor
ema_decay = 0.0  # EMA of the trained weights (0 = off), written next to each checkpoint as ...-ema.safetensors
ema_device = "cpu"  # where the fp32 EMA lives: "cpu" or the training device ("cuda")
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


def blocks(model):
    """The transformer blocks, the unit of checkpointing and of FSDP2 sharding."""
    return [*model.context_refiner, *model.noise_refiner, *model.layers]


def enable_checkpointing(model):
    """Recompute each block's activations in backward (non-reentrant), set from outside the model:
    the block's forward is wrapped in place, so module names and state_dict keys do not change."""
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    for block in blocks(model):
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


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

    def __init__(self, groups, kind, lr, weight_decay, bf16_update, seed):
        if kind not in ("AdamW", "Adafactor"):
            raise SystemExit(f"optimizer_type must be 'AdamW' or 'Adafactor', got {kind!r}")
        if bf16_update not in ("stochastic", "master"):
            raise SystemExit(f"bf16_update must be 'stochastic' or 'master', got {bf16_update!r}")
        self.groups, self.master = groups, bf16_update == "master"
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
                w.grad, p.grad = None, None

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts], "generator": self.generator.get_state(),
                "master": [[w.cpu() for w in ws] for ws in self.work] if self.master else None}

    def load_state_dict(self, st):
        for o, s in zip(self.opts, st["opts"]):
            o.load_state_dict(s)
        self.generator.set_state(st["generator"])
        if self.master:
            for ws, saved in zip(self.work, st["master"]):
                for w, v in zip(ws, saved):
                    w.copy_(v)


class EMA:
    """Exponential moving average of the trained tensors, kept in fp32 (a bf16 EMA would drop the
    (1 - decay) x update it adds each step): ema <- decay ema + (1 - decay) w, after every optimizer step."""

    def __init__(self, params, decay, device):
        self.params, self.decay = params, decay
        self.shadow = [local(p).detach().to(device, torch.float32, copy=True) for p in params]

    @torch.no_grad()
    def update(self, i):
        self.shadow[i].lerp_(local(self.params[i]).detach().to(self.shadow[i].device, torch.float32), 1 - self.decay)

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
    if c.device.startswith("cuda"):
        c.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(c.device)
    # a long timeout: the other ranks wait at a barrier while rank 0 encodes the whole dataset's caches
    dist.init_process_group("nccl" if c.device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=4))
    return dist.get_rank(), world


def parallelize(model, c, world):
    """DDP: a replica per process, gradients averaged in backward. FSDP2: each block's weights (and the
    rest, at the root) sharded across processes and gathered just in time. Returns the module to call."""
    if world == 1:
        return model
    if c.parallel == "fsdp":
        if c.train_mode != "full":
            raise SystemExit("parallel='fsdp' is for train_mode='full'; LoRA training uses 'ddp'")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # bf16 gradients are summed across ranks in fp32
        for block in blocks(model):
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    if c.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[torch.device(c.device).index] if c.device.startswith("cuda") else None,
                                       find_unused_parameters=c.module_dropout > 0,  # a dropped LoRA module gets no grad
                                       gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no second copy
    raise SystemExit(f"parallel must be 'ddp' or 'fsdp', got {c.parallel!r}")


def full_state_dict(model):
    """The whole model in bf16 under its original keys; FSDP2 shards are gathered (a collective: every rank calls)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).to("cpu", torch.bfloat16).contiguous()
            for k, v in model.state_dict().items()}


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous file intact


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def global_mean(x, world):
    """A scalar averaged over all processes (for the log; the gradients are averaged by DDP / FSDP)."""
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x.item()


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def train(c):
    """c: the config namespace. Returns a dict with the losses and the paths written."""
    assert c.model_prediction_type == "raw", "only model_prediction_type='raw' exists for Lumina 2 (v = x0 - noise)"
    if c.resolution % 16:
        raise SystemExit(f"resolution={c.resolution} must be a multiple of 16 (the AE divides by 8, the DiT patches 2x2)")
    if c.train_mode not in ("lora", "full"):
        raise SystemExit(f"train_mode must be 'lora' or 'full', got {c.train_mode!r}")
    if c.optimizer_type == "Adafactor" and c.learning_rate < 1e-4:
        warnings.warn(f"learning_rate={c.learning_rate} with torch's Adafactor caps each step at that fraction of the "
                      "weight's RMS (about 0.02 here): sd-scripts' absolute 1e-5 corresponds to about 5e-4")
    dtype = torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32
    lumina2.set_attention(c.attention, dtype, c.device)
    rank, world = setup_distributed(c)
    fsdp = world > 1 and c.parallel == "fsdp"  # every rank holds a shard: saving gathers, each rank keeps its own state
    if c.fused_backward_pass and (c.train_mode != "full" or c.gradient_accumulation_steps != 1 or world > 1):
        raise SystemExit("fused_backward_pass needs train_mode='full', gradient_accumulation_steps=1 and one process "
                         "(the step runs inside backward, before gradients could be accumulated or averaged)")
    os.makedirs(c.output_dir, exist_ok=True)
    torch.manual_seed(c.seed)
    random.seed(c.seed)

    # 1. caches: latents and text features, then the AE and Gemma leave the device. Under torchrun rank 0
    # writes the demo files and the disk caches first, then the other ranks read them.
    if rank > 0:
        dist.barrier()
    if c.demo:
        paths = data.make_demo_weights(os.path.join(c.output_dir, "weights"))  # the same files sample.py's demo uses
        c.dit_path, c.gemma_path, c.ae_path = paths["dit"], paths["gemma"], paths["ae"]
        c.train_data_dir = data.make_demo_dataset(os.path.join(c.output_dir, "demo_images"))
    ds = data.Dataset(c.train_data_dir, resolution=c.resolution, repeats=c.num_repeats, flip=c.flip_aug,
                      caption_ext=c.caption_extension)
    cache_dir = os.path.join(c.output_dir, "cache")
    ae = lumina2.load_ae(c.ae_path, dtype=torch.float32, device=c.device)  # fp32: caches carry no bf16 error (84M params)
    ds.cache_latents(ae, device=c.device, cache_dir=cache_dir if c.cache_latents_to_disk or world > 1 else None,
                     ae_id=data.file_id(c.ae_path))
    ae.to("cpu")  # kept off the device, only for decoding samples
    te = lumina2.load_text_encoder(c.gemma_path, dtype=dtype, device=c.device, max_length=c.gemma2_max_token_length)
    ds.cache_text(te, c.system_prompt, c.gemma2_max_token_length, te_id=data.file_id(c.gemma_path),
                  cache_dir=cache_dir if c.cache_text_encoder_outputs_to_disk or world > 1 else None)
    sample_cond = [te([p], c.system_prompt) for p in c.sample_prompts]
    sample_uncond = te([""], "") if c.sample_prompts else None
    del te
    if c.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if rank == 0 and world > 1:
        dist.barrier()

    # 2. the ordered setup: base in bf16 -> LoRA (fp32) or all weights trainable -> checkpointing
    #    -> DDP / FSDP2 under torchrun -> optimizer -> EMA -> optimizer steps fused into backward
    model = lumina2.load_dit(c.dit_path, dtype=dtype, device=c.device)
    if c.train_mode == "lora":
        lora.inject(model, rank=c.network_dim, alpha=c.network_alpha, attn_dim=c.attn_dim, mlp_dim=c.mlp_dim,
                    mod_dim=c.mod_dim, refiner_dim=c.refiner_dim, embedder_dims=c.embedder_dims,
                    dropout=c.network_dropout, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout)
    else:
        model.requires_grad_(True).norm_final.requires_grad_(False)  # norm_final is stored but unused
    if c.gradient_checkpointing:
        enable_checkpointing(model)
    net = parallelize(model, c, world)
    params = lora.lora_parameters(model) if c.train_mode == "lora" else [p for p in model.parameters() if p.requires_grad]
    groups = [params] if c.train_mode == "lora" else [[p] for p in params]  # full: each tensor steps alone
    optimizer = Optimizer(groups, c.optimizer_type, c.learning_rate, c.weight_decay, c.bf16_update, c.seed)
    # DDP replicas are identical, so one EMA (rank 0's) is enough; FSDP2 keeps each rank's shard's
    ema = EMA(params, c.ema_decay, c.ema_device) if c.ema_decay > 0 and (rank == 0 or fsdp) else None
    grad_norms = fuse_steps_into_backward(params, optimizer, c.max_grad_norm, ema) if c.fused_backward_pass else None
    batches_per_epoch = ds.len_batches(c.train_batch_size * world)
    steps_per_epoch = math.ceil(batches_per_epoch / c.gradient_accumulation_steps)
    total_steps = c.max_train_steps or c.max_train_epochs * steps_per_epoch
    schedule = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, total_steps)
    noise_gen = torch.Generator().manual_seed(c.seed)  # noise and sigma come from here: resumable, device-independent
    if rank == 0:
        print(f"{c.train_mode}: {sum(p.numel() for p in params):,} trainable params; {len(ds)} images, "
              f"{batches_per_epoch} batches/epoch of {c.train_batch_size} x {world} process(es), {total_steps} steps")

    state_path = os.path.join(c.output_dir, f"{c.output_name}-state{f'-rank{rank}' if fsdp else ''}.pt")
    step, epoch, batch_in_epoch = 0, 0, 0
    if c.resume:
        if not os.path.exists(state_path):
            raise SystemExit(f"resume=True but there is no training state at {state_path}")
        st = torch.load(state_path, weights_only=False, map_location="cpu")
        if st["world_size"] != world:  # the data position counts global batches of train_batch_size x world
            raise SystemExit(f"{state_path} was saved by {st['world_size']} process(es); resume with the same number, not {world}")
        with torch.no_grad():
            for p, saved in zip(params, st["params"]):
                local(p).copy_(saved)
            for e, saved in zip(ema.shadow if ema else [], st["ema"] or []):
                e.copy_(saved)
        optimizer.load_state_dict(st["optimizer"])
        noise_gen.set_state(st["noise_gen"])
        set_rng_state(st["rng"])
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        print(f"resumed from {state_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    def save_weights(path, meta):
        if c.train_mode == "lora":
            if rank == 0:
                lora.save_lora(model, path, layout=c.save_layout, metadata=meta)
        elif rank == 0 or fsdp:  # the whole model under the original keys, bf16, for load_dit, ComfyUI, sd-scripts
            sd = full_state_dict(model)  # under FSDP2 a collective: every rank gathers
            if rank == 0:
                lumina2.save_file_atomic(sd, path, metadata=meta)

    def save_checkpoint(tag):
        path = os.path.join(c.output_dir, f"{c.output_name}{tag}.safetensors")
        meta = {"ss_learning_rate": str(c.learning_rate), "ss_training_step": str(step), "ss_epoch": str(epoch),
                "ss_timestep_sampling": c.timestep_sampling, "ss_system_prompt": c.system_prompt,
                "ss_max_token_length": str(c.gemma2_max_token_length), "ss_seed": str(c.seed),
                "ss_mixed_precision": c.mixed_precision, "ss_num_train_images": str(len(ds)),
                "ss_optimizer": c.optimizer_type, "ss_train_mode": c.train_mode}
        save_weights(path, meta)
        if ema:
            with ema.swapped_in():
                save_weights(path.replace(".safetensors", "-ema.safetensors"), {**meta, "ss_ema_decay": str(c.ema_decay)})
        if rank == 0 or fsdp:
            save_atomic({"params": [local(p).detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
                         "ema": [e.cpu() for e in ema.shadow] if ema else None, "noise_gen": noise_gen.get_state(),
                         "rng": rng_state(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                         "world_size": world, "config": vars(c)}, state_path)
        return path

    def save_samples(tag):
        """Rank 0 samples and writes the grid; under FSDP2 every rank runs the forward with it (a collective)."""
        if not (rank == 0 or fsdp):
            return None
        model.eval()
        grid = []
        for i, cond in enumerate(sample_cond):
            noise = sample.seeded_noise([c.sample_seed + i], c.sample_height, c.sample_width).to(c.device)
            lat = sample.sample(model, noise, cond, sample_uncond, c.sample_steps, c.sample_cfg, progress=False)
            grid.append(lat)
        model.train()
        path = os.path.join(c.output_dir, "samples", f"{c.output_name}{tag}.png")
        if rank == 0:
            ae.to(c.device)
            sample.save_grid(sample.decode_to_images(ae, torch.cat(grid)), path)  # decoded once, here
            ae.to("cpu")
        return path

    # 3. the loop
    log_path = os.path.join(c.output_dir, f"{c.output_name}-log.jsonl")
    log = open(log_path, "a") if rank == 0 else None
    losses, t0 = [], time.time()
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, disable=rank > 0)
    while step < total_steps:
        micro = 0
        optimizer.lr = c.learning_rate * schedule(step)
        for batch in ds.batches(c.train_batch_size, c.seed, epoch, c.caption_dropout_rate, skip=batch_in_epoch, rank=rank, world=world):
            # noise and sigma are drawn for the whole global batch on every rank and cut to this rank's share,
            # so N processes see exactly the draws one process with the combined batch would
            n, lo, hi = batch["global_size"], batch["start"], batch["start"] + len(batch["latents"])
            x0 = batch["latents"].to(c.device, torch.float32)
            noise = torch.randn((n, *x0.shape[1:]), generator=noise_gen)[lo:hi].to(c.device)
            sigma = sample_sigmas(n, c.timestep_sampling, x0.shape[-2:], noise_gen, c.discrete_flow_shift, c.sigmoid_scale)[lo:hi].to(c.device)
            sync = micro + 1 == c.gradient_accumulation_steps or batch_in_epoch + 1 == batches_per_epoch
            with net.no_sync() if world > 1 and c.parallel == "ddp" and not sync else contextlib.nullcontext():
                loss = flow_matching_loss(net, x0, batch["cap_feats"].to(c.device), batch["cap_mask"].to(c.device), sigma, noise)
                # this rank's mean, weighted by its share: averaged over ranks it is the global batch's mean
                (loss * batch["weight"] / c.gradient_accumulation_steps).backward()
            batch_in_epoch += 1
            micro += 1
            losses.append(global_mean(loss.detach() * batch["weight"], world))
            if not sync:
                continue
            if c.fused_backward_pass:  # the steps already ran inside backward
                grad_norm = torch.stack(grad_norms).norm()
                grad_norms.clear()
            else:
                grad_norm = step_after_backward(params, optimizer, c.max_grad_norm, ema)
            step += 1
            window = losses[-micro:]
            rec = {"step": step, "epoch": epoch, "loss": sum(window) / len(window), "lr": optimizer.lr,
                   "grad_norm": float(grad_norm), "sigma": sigma.mean().item(), "time": round(time.time() - t0, 3),
                   "peak_gb": round(sample.peak_memory_gb(), 3)}
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{optimizer.lr:.2e}", mem=f"{rec['peak_gb']:.1f}GB")
            bar.update(1)
            micro = 0
            optimizer.lr = c.learning_rate * schedule(step)
            if batch_in_epoch == batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if c.save_every_n_steps and step % c.save_every_n_steps == 0:
                save_checkpoint(f"-step{step:06d}")
            if c.sample_prompts and c.sample_every_n_steps and step % c.sample_every_n_steps == 0:
                save_samples(f"-step{step:06d}")
            if batch_in_epoch == 0:
                if c.save_every_n_epochs and epoch % c.save_every_n_epochs == 0 and step < total_steps:
                    save_checkpoint(f"-{epoch:06d}")
                if c.sample_prompts and c.sample_every_n_epochs and epoch % c.sample_every_n_epochs == 0:
                    save_samples(f"-e{epoch:06d}")
                break  # a new epoch draws a new order
            if step >= total_steps:
                break
    bar.close()
    if log:
        log.close()
    final = save_checkpoint("")
    sample_path = save_samples("-final") if c.sample_prompts else None
    if rank == 0:
        print(f"{'LoRA' if c.train_mode == 'lora' else 'model'}: {final}\nsamples: {sample_path}\nlog: {log_path}\n"
              f"{step} steps in {time.time() - t0:.1f}s, loss (mean of 20 batches) first {mean(losses[:20]):.4f}, "
              f"last {mean(losses[-20:]):.4f}, peak {sample.peak_memory_gb():.2f} GB")
    if world > 1:
        dist.barrier()  # rank 0 may still be writing: leave together
        dist.destroy_process_group()
    return {"losses": losses, "lora": final, "state": state_path, "log": log_path, "samples": sample_path,
            "model": model, "ema": ema}


def main(argv=None):
    cfg = configure(dict(globals()), argv)
    return train(SimpleNamespace(**cfg))


if __name__ == "__main__":
    main()
