"""
train.py's config, checked whole before any file is read so that a typo fails in a second, not after the caching: every
option against train.py's CHOICES, every range and impossible combination, the devices, the dataset config, the attention backend.

    python train.py --learning_rate=-1 --optimizer_type=adamw     # lists both problems, reads nothing
"""
import warnings

import torch

import dataset_toml
import lumina2
import memory
from configurator import device_problem, problems as config_problems

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
          "log_every": AT_LEAST_1, "save_last_n_steps": NONNEG, "save_last_n_epochs": NONNEG, "blocks_to_swap": NONNEG,
          "caption_variants": AT_LEAST_1, "validate_every_n_steps": NONNEG,
          "validation_split": (lambda v: 0 <= v <= 1, "in [0, 1]"), "validation_seed": (lambda v: isinstance(v, int), "an integer"),
          "validation_sigmas": (lambda v: len(v) > 0 and all(isinstance(s, (int, float)) and 0 < s < 1 for s in v), "a list of noise levels in (0, 1)")}


def validate(c, world, choices):
    """Every problem of config c (`world` processes; choices: CHOICES) in one SystemExit; set_attention checks, sets attention."""
    problems = config_problems(c, {k: v for k, v in choices.items() if k != "attention"}, RANGES)
    problems += [p for p in (device_problem(c.device, "device"), device_problem(c.ema_device, "ema_device")) if p]
    if not all(isinstance(p, str) for p in c.sample_prompts):
        problems.append(f"sample_prompts must be a list of strings, got {c.sample_prompts!r}")
    splits = [c.validation_split]
    if c.dataset_config:  # read and checked whole now: a typo in the TOML fails here, before any image is read
        try:
            splits = [s["validation_split"] for s in dataset_toml.read_dataset_config(c.dataset_config, dataset_toml.train_defaults(c))]
        except ValueError as e:
            problems.append(f"dataset_config: {e}".replace("\n", "\n    "))
            splits = None
    if splits is not None and c.validate_every_n_steps > 0 and max(splits) == 0:
        problems.append("validate_every_n_steps needs validation images: set validation_split (here, or in the dataset_config's "
                        "[general] or [[datasets]])")
    combos = [(c.fused_backward_pass and (c.train_mode != "full" or c.gradient_accumulation_steps != 1 or world > 1),
               "fused_backward_pass needs train_mode='full', gradient_accumulation_steps=1 and one process (the step runs "
               "inside backward, before gradients could be accumulated or averaged)"),
              (world > 1 and c.parallel == "fsdp" and c.train_mode != "full",
               "parallel='fsdp' is for train_mode='full'; LoRA training uses 'ddp'"),
              (c.attention == "sage", "attention='sage' has no backward pass (sageattention's kernels are inference-only): "
                                      "train with 'sdpa' or 'flash' and use sage in sample.py")]
    problems += [msg for bad, msg in combos if bad]
    problems += memory.combination_problems(c.train_mode, c.fp8_base, c.fp8_scaled_mm, c.blocks_to_swap, fsdp=world > 1 and c.parallel == "fsdp")
    if not device_problem(c.device, "device"):
        dtype = torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32
        try:  # the fp8 GEMM: bf16 only, and a row-wise kernel on this device with this torch (sm89+ on CUDA)
            memory.use_scaled_mm(c.fp8_scaled_mm, c.device, dtype)
        except ValueError as e:
            problems.append(str(e))
        try:  # the backend's name, its package, its device and its dtype
            lumina2.set_attention(c.attention, dtype, c.device)
        except (ValueError, ImportError) as e:
            problems.append(str(e))
    if problems:
        raise SystemExit("config errors:\n  - " + "\n  - ".join(problems))
    if splits is not None and max(splits) > 0 and not c.validate_every_n_steps:
        warnings.warn("validation_split holds images out of training, but validate_every_n_steps=0 never uses them")
    if c.optimizer_type == "Adafactor" and c.learning_rate < 1e-4:
        warnings.warn(f"learning_rate={c.learning_rate} with torch's Adafactor caps each step at that fraction of the "
                      "weight's RMS (about 0.02 here): sd-scripts' absolute 1e-5 corresponds to about 5e-4")
