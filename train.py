"""
Train a LoRA on Lumina Image 2.0 (Next-DiT 2B, Gemma-2-2B, FLUX AE), or fine-tune all of it, in one plain
loop: the `lumina_train_network.py` / `lumina_train.py` commands of kohya-ss/sd-scripts' docs, with the same
defaults, done by hand.

Flow matching in Lumina time (SPEC §5): x_t = (1 - sigma) x0 + sigma noise, the model sees t = 1 - sigma and predicts
v = x0 - noise; loss = fp32 MSE. Base weights bf16, LoRA fp32, casts explicit (no autocast). Latents and text features
are cached first, then the AE and Gemma leave the GPU. Full fine-tuning steps bf16 weights through fp32 copies with
stochastic rounding (optim.py). torchrun brings DDP or FSDP2. Beside the story: the run's lifecycle (checkpoint.py),
the config check (checks.py), weight-file forensics (weightfiles.py).

    python train.py config/demo.py                       # the tiny world: AE, base DiT, then a LoRA; CPU, 3 minutes
    python train.py config/lora_1024.py --train_data_dir=my_images --output_name=my_lora
    python train.py config/full_1024.py --train_data_dir=my_images     # full fine-tune, Adafactor, fused backward
    python train.py config/lora_1024.py --train_data_dir=my_images --output_name=my_lora --resume=True   # continue it
    python train.py config/lora_1024.py --dataset_config=my_lumina_dataset_config.toml --validate_every_n_steps=100
    torchrun --nproc_per_node=8 train.py config/lora_1024.py --train_data_dir=my_images   # DDP, bs 1 per GPU
    python train.py --help                                # every setting below, with its default and comment
"""
import contextlib
import datetime
import math
import os
import random
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import checkpoint
import checks
import data
import dataset_toml
import tinyworld
import lora
import lumina2
import memory
import optim
import sample
import weightfiles
from configurator import configure
from files import BadInput, WriteFailed

# -----------------------------------------------------------------------------
# the three weight files (sd-scripts flag in the comment where one exists)
dit_path = "models/lumina_2_model_bf16.safetensors"  # --pretrained_model_name_or_path (or lumina-image-2.safetensors)
gemma_path = "models/gemma_2_2b_fp16.safetensors"  # --gemma2
ae_path = "models/ae.safetensors"  # --ae

# data
train_data_dir = "data/images"  # dataset_config image_dir: images with same-stem .txt captions
dataset_config = ""  # --dataset_config: an sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]); it
# replaces train_data_dir, and the dataset settings here become the defaults under its [general]
resolution = 1024  # dataset_config resolution: bucket area = resolution^2
num_repeats = 1  # dataset_config num_repeats
flip_aug = False  # dataset_config flip_aug
caption_extension = ".txt"  # dataset_config caption_extension
caption_dropout_rate = 0.0  # --caption_dropout_rate (works with cached text features)
caption_variants = 8  # shuffle_caption / caption_tag_dropout_rate: variants cached per caption (K x the text cache)
train_batch_size = 1  # dataset_config batch_size
system_prompt = lumina2.SYSTEM_PROMPTS["base"]  # --system_prompt
gemma2_max_token_length = 256  # --gemma2_max_token_length
cache_latents_to_disk = False  # --cache_latents_to_disk (latents are always cached; in memory otherwise)
cache_text_encoder_outputs_to_disk = False  # --cache_text_encoder_outputs_to_disk
validation_split = 0.0  # --validation_split: fraction of the images held out for the validation loss
validation_seed = 0  # --validation_seed: which images are held out
validate_every_n_steps = 0  # --validate_every_n_steps: validation loss every n optimizer steps (0 = off)
validation_sigmas = [0.1, 0.3, 0.5, 0.7, 0.9]  # the fixed noise levels of the validation loss

# what trains: a LoRA (the network_* settings) or every DiT weight
train_mode = "lora"  # "full": saved as a whole model in the original layout
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

# the objective
timestep_sampling = "nextdit_shift"  # --timestep_sampling: how sigma is drawn (SIGMA_SAMPLERS)
discrete_flow_shift = 6.0  # --discrete_flow_shift (for "shift")
sigmoid_scale = 1.0  # --sigmoid_scale
model_prediction_type = "raw"  # --model_prediction_type: the model already predicts x0 - noise

# the optimizer (optim.py)
learning_rate = 1e-4  # --learning_rate
optimizer_type = "AdamW"  # --optimizer_type: AdamW (fp32 states) or torch's Adafactor, whose lr caps a step *relative* to a weight's RMS
weight_decay = 0.01
lr_scheduler = "constant"  # --lr_scheduler
lr_warmup_steps = 0  # --lr_warmup_steps
max_train_epochs = 10  # --max_train_epochs
max_train_steps = 0  # --max_train_steps (optimizer steps; 0 = from epochs)
gradient_accumulation_steps = 1  # --gradient_accumulation_steps
max_grad_norm = 1.0  # --max_grad_norm (0 = off)
bf16_update = "stochastic"  # a bf16 weight's fp32 update: rounded stochastically, or via an fp32 master copy (+4 bytes a parameter)
fused_backward_pass = False  # --fused_backward_pass: full mode, one process, no accumulation: each tensor is
# stepped the moment its gradient is complete and the gradient is freed; max_grad_norm then clips per tensor
ema_decay = 0.0  # EMA of the trained weights (0 = off), written next to each checkpoint as ...-ema.safetensors
ema_device = "cpu"  # where the fp32 EMA lives: "cpu" or the training device ("cuda")
ema_every = 10  # update the EMA every k optimizer steps with decay^k (a CPU EMA costs a device->host copy per update)
seed = 42  # --seed

# precision, memory and speed (memory.py)
mixed_precision = "bf16"  # --mixed_precision: the weights' dtype (fp16 is not offered: Gemma-2 and the DiT overflow)
device = "cuda" if torch.cuda.is_available() else "cpu"
attention = "sdpa"  # lumina2.set_attention; sd-scripts --use_flash_attn; sage samples only
gradient_checkpointing = True  # --gradient_checkpointing
blocks_to_swap = 0  # --blocks_to_swap: this many of the 26 main layers wait in CPU RAM and stream to the device
fp8_base = False  # --fp8_base: frozen base Linear weights stored as float8_e4m3fn with a scale (LoRA only)
fp8_scaled_mm = False  # musubi-tuner's --fp8_fast: with fp8_base, forward matmuls in fp8 (torch._scaled_mm; sm89+, bf16)
compile = False  # torch.compile each block (regional), dynamic sequence length
parallel = "ddp"  # under torchrun: a full replica per GPU (LoRA or full), or FSDP2 per block (full)

# output: checkpoints, state, log, samples (checkpoint.py)
output_dir = "out/lora"  # --output_dir
output_name = "my_lumina_lora"  # --output_name
save_layout = "kohya"  # the LoRA file's key names: sd-scripts / ComfyUI, or ComfyUI / diffusion-pipe / diffusers
save_every_n_epochs = 1  # --save_every_n_epochs (0 = off)
save_every_n_steps = 0  # --save_every_n_steps (0 = off)
save_last_n_steps = 0  # --save_last_n_steps: keep the step checkpoints of the last n steps only (0 = keep all)
save_last_n_epochs = 0  # --save_last_n_epochs: keep the last n epoch checkpoints only (0 = keep all)
resume = False  # continue from output_dir/output_name-state.pt (or the previous state, if that one is damaged)
overwrite = False  # a new run (resume=False) into an output_dir holding this output_name's state or log is refused
# unless this is True: then that state and log are removed and the checkpoints are replaced as the run saves
log_every = 1  # log (and sync the device for the loss) every n optimizer steps
sample_prompts = []  # --sample_prompts, as a list of prompts
sample_every_n_steps = 0  # --sample_every_n_steps
sample_every_n_epochs = 0  # --sample_every_n_epochs
sample_width = 1024
sample_height = 1024
sample_steps = 30
sample_cfg = 4.0
sample_seed = 0
demo = False  # build the tiny world first and train on top of it (config/demo.py: the paths above are the world's)
# -----------------------------------------------------------------------------
# the objective: noise levels, and the loss


def shift_sigma(u, k):
    """S_k(u) = k u / (1 + (k - 1) u): pushes sigma toward noise for k > 1."""
    return k * u / (1 + (k - 1) * u)


# how the noise levels sigma in (0, 1) are drawn (sigma = 1 is pure noise), SPEC §5: n levels from the generator
# g; mu is the resolution-dependent shift (1.15 at 1024^2), c the config (discrete_flow_shift, sigmoid_scale, ...)
SIGMA_SAMPLERS = {
    "nextdit_shift": lambda n, g, mu, c: shift_sigma(torch.rand(n, generator=g), math.exp(mu)),
    "lognorm": lambda n, g, mu, c: shift_sigma(torch.sigmoid(torch.randn(n, generator=g)), math.exp(mu)),
    "shift": lambda n, g, mu, c: shift_sigma(torch.sigmoid(c.sigmoid_scale * torch.randn(n, generator=g)), c.discrete_flow_shift),
    "sigmoid": lambda n, g, mu, c: torch.sigmoid(c.sigmoid_scale * torch.randn(n, generator=g)),
    "uniform": lambda n, g, mu, c: torch.rand(n, generator=g),
}


def sample_sigmas(n, latent_hw, generator, c):
    """n noise levels for latents of size latent_hw, drawn by SIGMA_SAMPLERS[c.timestep_sampling] -> (n,) fp32."""
    h, w = latent_hw
    mu = 0.5 + 0.65 * ((h // 2) * (w // 2) - 256) / 3840
    return SIGMA_SAMPLERS[c.timestep_sampling](n, generator, mu, c)


def flow_matching_loss(model, x0, cap_feats, cap_mask, sigma, noise, cap_lens=None):
    """x0, noise (B, 16, h, w) fp32; sigma (B,) fp32; cap_lens the captions' valid lengths as host ints (the batch
    has them: then the forward waits for nothing on the device) -> scalar fp32 MSE against v = x0 - noise."""
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    v = model(xt, 1 - sigma, cap_feats, cap_mask, cap_lens)  # t = 1 - sigma stays fp32 into the timestep embedding
    return F.mse_loss(v.float(), x0 - noise, reduction="none").mean(dim=(1, 2, 3)).mean()


# the learning rate's multiplier after warmup, at progress p in [0, 1] of the steps after it
LR_SCHEDULES = {"constant": lambda p: 1.0, "constant_with_warmup": lambda p: 1.0,
                "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * min(p, 1.0))), "linear": lambda p: max(0.0, 1 - p)}


def lr_lambda(kind, warmup, total):
    """Multiplier of the base learning rate at optimizer step s: linear warmup, then LR_SCHEDULES[kind]."""
    return lambda s: (s + 1) / warmup if s < warmup else LR_SCHEDULES[kind]((s - warmup) / max(1, total - warmup))


# -----------------------------------------------------------------------------
# the one ordered setup


def inject_lora(model, c):
    lora.inject(model, rank=c.network_dim, alpha=c.network_alpha, attn_dim=c.attn_dim, mlp_dim=c.mlp_dim, mod_dim=c.mod_dim,
                refiner_dim=c.refiner_dim, embedder_dims=c.embedder_dims, dropout=c.network_dropout,
                rank_dropout=c.rank_dropout, module_dropout=c.module_dropout)


def train_every_weight(model, c):
    model.requires_grad_(True).norm_final.requires_grad_(False)  # norm_final is stored but unused


def ddp(model, c):
    """A replica per process, gradients averaged in backward."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[torch.device(c.device).index] if c.device.startswith("cuda") else None,
                                   find_unused_parameters=c.module_dropout > 0,  # a dropped LoRA module gets no grad
                                   gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no second copy


def fsdp(model, c):
    """Each block's weights (and the rest, at the root) sharded across processes and gathered just in time."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # bf16 gradients are summed across ranks in fp32
    for block in memory.blocks(model):
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


TRAIN_MODES = {"lora": inject_lora, "full": train_every_weight}  # makes the trained tensors trainable
PRECISIONS = {"bf16": torch.bfloat16, "no": torch.float32}  # the weights' dtype
PARALLEL = {"ddp": ddp, "fsdp": fsdp}  # under torchrun
CHOICES = {"train_mode": TRAIN_MODES, "mixed_precision": PRECISIONS, "parallel": PARALLEL, "timestep_sampling": SIGMA_SAMPLERS,
           "lr_scheduler": LR_SCHEDULES, "optimizer_type": optim.OPTIMIZERS, "bf16_update": optim.BF16_UPDATES,
           "save_layout": lora.SAVE_LAYOUTS, "attention": lumina2.BACKENDS, "model_prediction_type": {"raw": None}}


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


def check_inputs(c, r):
    """Everything cheap before anything expensive, so that a bad file fails in seconds and not after the
    caching: the AE's and Gemma's headers, the DiT (its header and preset, then its values: loaded into CPU
    RAM now, so that a damaged tensor is reported before the caching too), then the dataset scan."""
    weightfiles.inspect_ae(c.ae_path)
    weightfiles.inspect_text_encoder(c.gemma_path)
    r.base = weightfiles.load_dit(c.dit_path, dtype=r.dtype, device="cpu")
    defaults = dataset_toml.train_defaults(c)
    subsets = (dataset_toml.read_dataset_config(c.dataset_config, defaults) if c.dataset_config
               else [data.folder_subset(c.train_data_dir, **defaults)])
    r.ds = data.build_datasets(subsets, variants=c.caption_variants, seed=c.seed)


def build_caches(c, r):
    """Latents and text features, then the AE and Gemma leave the device (the AE stays in CPU RAM for samples).
    Under torchrun rank 0 checks the inputs, writes the demo files and the disk caches first, then the other
    ranks read them."""
    if r.rank > 0:
        dist.barrier()
    check_inputs(c, r)
    cache_dir = os.path.join(c.output_dir, "cache")
    r.ae = weightfiles.load_ae(c.ae_path, dtype=torch.float32, device=c.device)  # fp32: caches carry no bf16 error (84M params)
    r.ds.cache_latents(r.ae, device=c.device, cache_dir=cache_dir if c.cache_latents_to_disk or r.world > 1 else None,
                       ae_id=data.file_id(c.ae_path))
    r.ae.to("cpu")
    te = weightfiles.load_text_encoder(c.gemma_path, dtype=r.dtype, device=c.device, max_length=c.gemma2_max_token_length)
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
    1. the DiT, loaded on the CPU by check_inputs (the device holds only what step 3 puts there);
    2. what trains: a LoRA (fp32 pairs around the base Linears) or every weight, before fp8, so that the LoRA
       wraps the full-precision Linears and its scale is exact;
    3. memory.prepare: fp8 storage of the frozen base -> gradient checkpointing -> regional compile -> block swap
       and placement on the device (memory.py says why in that order);
    4. DDP / FSDP2 wrap the placed model; 5. the optimizer sees the placed tensors; 6. EMA; 7. the fused step's hooks."""
    model, r.base = r.base, None
    TRAIN_MODES[c.train_mode](model, c)
    r.model = memory.prepare(model, c.device, fp8=c.fp8_base, fp8_scaled_mm=c.fp8_scaled_mm,
                             checkpointing=c.gradient_checkpointing, compile=c.compile, blocks_to_swap=c.blocks_to_swap)
    r.net = PARALLEL[c.parallel](r.model, c) if r.world > 1 else r.model
    r.params = [p for p in r.model.parameters() if p.requires_grad]
    groups = [r.params] if c.train_mode == "lora" else [[p] for p in r.params]  # full: each tensor steps alone
    r.optimizer = optim.Optimizer(groups, c.optimizer_type, c.learning_rate, c.weight_decay, c.bf16_update, c.seed,
                                  zero_grads_in_place=r.world > 1 and c.parallel == "ddp")
    # DDP replicas are identical, so one EMA (rank 0's) is enough; FSDP2 keeps each rank's shard's
    r.ema = optim.EMA(r.params, c.ema_decay, c.ema_device, c.ema_every) if c.ema_decay > 0 and (r.rank == 0 or r.fsdp) else None
    r.grad_norms = optim.fuse_steps_into_backward(r.params, r.optimizer, c.max_grad_norm, r.ema) if c.fused_backward_pass else None


# -----------------------------------------------------------------------------
# the loop


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
            loss = flow_matching_loss(r.model, x0, batch["cap_feats"].to(c.device), batch["cap_mask"].to(c.device), sigma, noise[:, k],
                                      batch["cap_lens"])
            total += loss * len(x0)  # the batch's mean -> its sum
        first += len(x0)
        n += len(x0) * len(c.validation_sigmas)
    r.model.train()
    return (total / n).item()


def save_samples(c, r, tag):
    """Rank 0 samples and writes the grid; under FSDP2 every rank runs the forward with it (a collective)."""
    checkpoint.flush_log(c, r)  # no samples from a diverged model
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


def train(c):
    """c: the config namespace. Returns a dict with the losses and the paths written."""
    r = SimpleNamespace(step=0, epoch=0, batch_in_epoch=0, losses=[], val_loss=None, pending=[], log=None, bar=None,
                        last_finite=None, last_saved=None, replaced=[])
    world = int(os.environ.get("WORLD_SIZE", 1))
    checks.validate(c, world, CHOICES)  # every problem of the config at once; also sets the attention backend
    r.dtype = PRECISIONS[c.mixed_precision]
    r.rank, r.world = setup_distributed(c)
    r.fsdp = r.world > 1 and c.parallel == "fsdp"  # every rank holds a shard: saving gathers, each rank keeps its own state
    r.state_path = os.path.join(c.output_dir, f"{c.output_name}-state{f'-rank{r.rank}' if r.fsdp else ''}.pt")
    r.log_path = os.path.join(c.output_dir, f"{c.output_name}-log.jsonl")
    if c.demo:  # the tiny world first: its pictures and AE (tinyworld.py), its base DiT trained by this script's main
        c.dit_path, c.gemma_path, c.ae_path, c.train_data_dir = tinyworld.make_world(c.output_dir, main)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    with checkpoint.output_dir_lock(c, r):
        checkpoint.check_output_dir(c, r)  # a resume reads and checks its state here, before the caching
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
    total_steps = c.max_train_steps or c.max_train_epochs * math.ceil(batches_per_epoch / c.gradient_accumulation_steps)
    schedule = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, total_steps)
    r.noise_gen = torch.Generator().manual_seed(c.seed)  # noise and sigma come from here: resumable, device-independent
    if r.rank == 0:
        sizes = "/".join(str(ds.batch_size) for ds in r.ds.datasets)
        print(f"{c.train_mode}: {sum(p.numel() for p in r.params):,} trainable params; {len(r.ds)} images, "
              f"{batches_per_epoch} batches/epoch of {sizes} x {r.world} process(es), {total_steps} steps")
    if c.resume:
        checkpoint.resume_from(c, r)
    checkpoint.start_log(c, r)
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
            sigma = sample_sigmas(n, x0.shape[-2:], r.noise_gen, c)[lo:hi]
            sync = micro + 1 == c.gradient_accumulation_steps or r.batch_in_epoch + 1 == batches_per_epoch
            if r.fsdp:  # reduce-scatter once per optimizer step, not at every micro-step
                r.net.set_requires_gradient_sync(sync)
            with r.net.no_sync() if r.world > 1 and not r.fsdp and not sync else contextlib.nullcontext():
                loss = flow_matching_loss(r.net, x0, batch["cap_feats"].to(c.device), batch["cap_mask"].to(c.device),
                                          sigma.to(c.device), noise, batch["cap_lens"])
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
                grad_norm = optim.step_after_backward(r.params, r.optimizer, c.max_grad_norm, r.ema)
            r.step += 1
            losses = torch.stack(micro_losses)
            if r.world > 1:  # one small all-reduce per optimizer step, for the log
                dist.all_reduce(losses)
                losses = losses / r.world
            grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
            # the step's metrics, by name: device tensors until checkpoint.flush_log syncs them, once per logged step
            r.pending.append({"step": r.step, "epoch": r.epoch, "loss": losses, "lr": r.optimizer.lr, "grad_norm": grad_norm,
                              "sigma": torch.stack(sigmas).mean(), "time": round(time.time() - t0, 3)})
            r.bar.update(1)
            checkpoint.exit_if_terminated()  # a SIGTERM's exit that a __del__ swallowed
            if c.validate_every_n_steps and r.step % c.validate_every_n_steps == 0:
                r.pending[-1]["val_loss"] = validation_loss(c, r)
            if r.step % c.log_every == 0 or r.step == total_steps:
                checkpoint.flush_log(c, r)  # stops the run at a non-finite loss or gradient norm
            micro, micro_losses, sigmas = 0, [], []
            r.optimizer.lr = c.learning_rate * schedule(r.step)
            if r.ema:
                r.ema.set_step(r.step)
            if r.batch_in_epoch == batches_per_epoch:
                r.epoch, r.batch_in_epoch = r.epoch + 1, 0
            if c.save_every_n_steps and r.step % c.save_every_n_steps == 0:
                checkpoint.save_checkpoint(c, r, f"-step{r.step:06d}")
            if c.sample_prompts and c.sample_every_n_steps and r.step % c.sample_every_n_steps == 0:
                save_samples(c, r, f"-step{r.step:06d}")
            if r.batch_in_epoch == 0:
                if c.save_every_n_epochs and r.epoch % c.save_every_n_epochs == 0 and r.step < total_steps:
                    checkpoint.save_checkpoint(c, r, f"-{r.epoch:06d}")
                if c.sample_prompts and c.sample_every_n_epochs and r.epoch % c.sample_every_n_epochs == 0:
                    save_samples(c, r, f"-e{r.epoch:06d}")
                break  # a new epoch draws a new order
            if r.step >= total_steps:
                break
    checkpoint.flush_log(c, r)
    r.bar.close()
    final = checkpoint.save_checkpoint(c, r, "")
    sample_path = save_samples(c, r, "-final") if c.sample_prompts else None
    if r.rank == 0:
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        print(f"{'LoRA' if c.train_mode == 'lora' else 'model'}: {final}\nsamples: {sample_path}\nlog: {r.log_path}\n"
              f"{r.step} steps in {time.time() - t0:.1f}s, loss (mean of 20 batches) first {mean(r.losses[:20]):.4f}, "
              f"last {mean(r.losses[-20:]):.4f}, peak {memory.peak_memory_gb(c.device):.2f} GB")
    if r.world > 1:
        dist.barrier()  # rank 0 may still be writing: leave together
        dist.destroy_process_group()
    return {"losses": r.losses, "lora": final, "state": r.state_path, "log": r.log_path, "samples": sample_path,
            "model": r.model, "ema": r.ema}


def main(argv=None):
    """The known failures (a bad input, a failed write) print one line that says what to do; anything else is a
    bug and keeps its traceback."""
    cfg = configure(dict(globals()), argv)
    try:
        return train(SimpleNamespace(**cfg))
    except (BadInput, WriteFailed) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    checkpoint.exit_on_sigterm()  # through the cleanups: temp files removed, the lock released
    main()
