"""
Train a LoRA on Lumina Image 2.0 (Next-DiT 2B, Gemma-2-2B, FLUX AE) in one plain loop: the
`lumina_train_network.py` command of kohya-ss/sd-scripts' docs, with the same defaults, done by hand.

Flow matching in Lumina time (SPEC §5): x_t = (1 - sigma) x0 + sigma noise, the model sees t = 1 - sigma
and predicts v = x0 - noise; loss = fp32 MSE. Base weights frozen in bf16, LoRA weights in fp32, casts
explicit (no autocast). Latents and text features are cached first, then the AE and Gemma leave the GPU.

    python train.py config/demo.py                       # tiny random models + synthetic data, CPU, ~1 min
    python train.py config/lora_1024.py --train_data_dir=my_images --output_name=my_lora
    python train.py config/demo.py --resume=True          # continue from the last saved state
"""
import json
import math
import os
import random
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import lora
import lumina2
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
optimizer_type = "AdamW"  # --optimizer_type: AdamW
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


def enable_checkpointing(model):
    """Recompute each block's activations in backward (non-reentrant), set from outside the model:
    the block's forward is wrapped in place, so module names and state_dict keys do not change."""
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    for block in [*model.context_refiner, *model.noise_refiner, *model.layers]:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


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


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def train(c):
    """c: the config namespace. Returns a dict with the losses and the paths written."""
    assert c.model_prediction_type == "raw", "only model_prediction_type='raw' exists for Lumina 2 (v = x0 - noise)"
    assert c.optimizer_type == "AdamW", "optimizer_type: AdamW is the one supported optimizer"
    if c.resolution % 16:
        raise SystemExit(f"resolution={c.resolution} must be a multiple of 16 (the AE divides by 8, the DiT patches 2x2)")
    if c.train_mode not in ("lora", "full"):
        raise SystemExit(f"train_mode must be 'lora' or 'full', got {c.train_mode!r}")
    lumina2.ATTENTION = c.attention
    dtype = torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32
    os.makedirs(c.output_dir, exist_ok=True)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    if c.demo:
        paths = data.make_demo_weights(os.path.join(c.output_dir, "weights"))  # the same files sample.py's demo uses
        c.dit_path, c.gemma_path, c.ae_path = paths["dit"], paths["gemma"], paths["ae"]
        c.train_data_dir = data.make_demo_dataset(os.path.join(c.output_dir, "demo_images"))

    # 1. caches: latents and text features, then the AE and Gemma leave the device
    ds = data.Dataset(c.train_data_dir, resolution=c.resolution, repeats=c.num_repeats, flip=c.flip_aug,
                      caption_ext=c.caption_extension)
    cache_dir = os.path.join(c.output_dir, "cache")
    ae = lumina2.load_ae(c.ae_path, dtype=torch.float32, device=c.device)  # fp32: caches carry no bf16 error (84M params)
    ds.cache_latents(ae, device=c.device, cache_dir=cache_dir if c.cache_latents_to_disk else None, ae_id=data.file_id(c.ae_path))
    ae.to("cpu")  # kept off the device, only for decoding samples
    te = lumina2.load_text_encoder(c.gemma_path, dtype=dtype, device=c.device, max_length=c.gemma2_max_token_length)
    ds.cache_text(te, c.system_prompt, c.gemma2_max_token_length, te_id=data.file_id(c.gemma_path),
                  cache_dir=cache_dir if c.cache_text_encoder_outputs_to_disk else None)
    sample_cond = [te([p], c.system_prompt) for p in c.sample_prompts]
    sample_uncond = te([""], "") if c.sample_prompts else None
    del te
    if c.device.startswith("cuda"):
        torch.cuda.empty_cache()

    # 2. the ordered setup: base in bf16 -> LoRA (fp32) or all weights trainable -> checkpointing -> optimizer
    model = lumina2.load_dit(c.dit_path, dtype=dtype, device=c.device)
    if c.train_mode == "lora":
        lora.inject(model, rank=c.network_dim, alpha=c.network_alpha, attn_dim=c.attn_dim, mlp_dim=c.mlp_dim,
                    mod_dim=c.mod_dim, refiner_dim=c.refiner_dim, embedder_dims=c.embedder_dims,
                    dropout=c.network_dropout, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout)
        params = lora.lora_parameters(model)
    else:
        model.requires_grad_(True).norm_final.requires_grad_(False)  # norm_final is stored but unused
        params = [p for p in model.parameters() if p.requires_grad]
    if c.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    batches_per_epoch = ds.len_batches(c.train_batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / c.gradient_accumulation_steps)
    total_steps = c.max_train_steps or c.max_train_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.lr_scheduler, c.lr_warmup_steps, total_steps))
    noise_gen = torch.Generator().manual_seed(c.seed)  # noise and sigma come from here: resumable, device-independent
    print(f"{c.train_mode}: {sum(p.numel() for p in params):,} trainable params; "
          f"{len(ds)} images, {batches_per_epoch} batches/epoch, {total_steps} steps")

    state_path = os.path.join(c.output_dir, f"{c.output_name}-state.pt")
    step, epoch, batch_in_epoch = 0, 0, 0
    if c.resume:
        if not os.path.exists(state_path):
            raise SystemExit(f"resume=True but there is no training state at {state_path}")
        st = torch.load(state_path, weights_only=False)
        for p, saved in zip(params, st["lora"]):
            p.data.copy_(saved)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        noise_gen.set_state(st["noise_gen"])
        set_rng_state(st["rng"])
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        print(f"resumed from {state_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    def save_checkpoint(tag):
        path = os.path.join(c.output_dir, f"{c.output_name}{tag}.safetensors")
        meta = {"ss_learning_rate": str(c.learning_rate), "ss_training_step": str(step), "ss_epoch": str(epoch),
                "ss_timestep_sampling": c.timestep_sampling, "ss_system_prompt": c.system_prompt,
                "ss_max_token_length": str(c.gemma2_max_token_length), "ss_seed": str(c.seed),
                "ss_mixed_precision": c.mixed_precision, "ss_num_train_images": str(len(ds))}
        if c.train_mode == "lora":
            lora.save_lora(model, path, layout=c.save_layout, metadata=meta)
        else:  # the whole model under the original keys, bf16, loadable by load_dit, ComfyUI and sd-scripts
            lumina2.save_file_atomic({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, path, metadata=meta)
        save_atomic({"lora": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "noise_gen": noise_gen.get_state(), "rng": rng_state(),
                     "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "config": vars(c)}, state_path)
        return path

    def save_samples(tag):
        import sample
        model.eval()
        grid = []
        for i, cond in enumerate(sample_cond):
            noise = sample.seeded_noise([c.sample_seed + i], c.sample_height, c.sample_width).to(c.device)
            lat = sample.sample(model, noise, cond, sample_uncond, c.sample_steps, c.sample_cfg, progress=False)
            grid.append(lat)
        ae.to(c.device)
        images = sample.decode_to_images(ae, torch.cat(grid))  # decoded once, here
        ae.to("cpu")
        model.train()
        path = os.path.join(c.output_dir, "samples", f"{c.output_name}{tag}.png")
        sample.save_grid(images, path)
        return path

    # 3. the loop
    log_path = os.path.join(c.output_dir, f"{c.output_name}-log.jsonl")
    log = open(log_path, "a")
    losses, t0 = [], time.time()
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    while step < total_steps:
        micro = 0
        for batch in ds.batches(c.train_batch_size, c.seed, epoch, c.caption_dropout_rate, skip=batch_in_epoch):
            x0 = batch["latents"].to(c.device, torch.float32)
            noise = torch.randn(x0.shape, generator=noise_gen).to(c.device)
            sigma = sample_sigmas(len(x0), c.timestep_sampling, x0.shape[-2:], noise_gen, c.discrete_flow_shift, c.sigmoid_scale).to(c.device)
            loss = flow_matching_loss(model, x0, batch["cap_feats"].to(c.device), batch["cap_mask"].to(c.device), sigma, noise)
            (loss / c.gradient_accumulation_steps).backward()
            batch_in_epoch += 1
            micro += 1
            losses.append(loss.item())
            if micro % c.gradient_accumulation_steps and batch_in_epoch < batches_per_epoch:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = scheduler.get_last_lr()[0]
            window = losses[-c.gradient_accumulation_steps:]
            rec = {"step": step, "epoch": epoch, "loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm.item(),
                   "sigma": sigma.mean().item(), "time": round(time.time() - t0, 3), "peak_gb": round(peak_memory_gb(), 3)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", mem=f"{rec['peak_gb']:.1f}GB")
            bar.update(1)
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
    log.close()
    final = save_checkpoint("")
    sample_path = save_samples("-final") if c.sample_prompts else None
    print(f"{'LoRA' if c.train_mode == 'lora' else 'model'}: {final}\nsamples: {sample_path}\nlog: {log_path}\n"
          f"{step} steps in {time.time() - t0:.1f}s, loss (mean of 20 batches) first {mean(losses[:20]):.4f}, "
          f"last {mean(losses[-20:]):.4f}, peak {peak_memory_gb():.2f} GB")
    return {"losses": losses, "lora": final, "state": state_path, "log": log_path, "samples": sample_path, "model": model}


def main(argv=None):
    cfg = configure(dict(globals()), argv)
    return train(SimpleNamespace(**cfg))


if __name__ == "__main__":
    main()
