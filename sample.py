"""
Sample images from Lumina Image 2.0: Gemma-2 captions -> Next-DiT flow ODE (Euler or midpoint, shifted sigma grid, official
CFG truncation and norm cap) -> FLUX AE -> PNGs recording every setting. train.py imports sample, decode_to_images, save_grid.
References (read, not copied): Lumina-Image-2.0's sample.py, forward_with_cfg (the rules); diffusers (tests); nanoGPT; sd-scripts.

    python sample.py config/sample_demo.py --prompt='"a purple square on a gray background"'   # the demo's tiny world, CPU
    python sample.py --prompt='"a red fox in the snow"' --seeds=[1,2,3] --offload=model --ae_path=models/ae.safetensors \\
        --dit_path=models/lumina_2_model_bf16.safetensors --gemma_path=models/gemma_2_2b_fp16.safetensors
    python sample.py --prompt_file=prompts.txt --grid=True       # lines like: a cat --w 768 --h 1280 --d 7 --l 5 --n blurry
"""
import json
import math
import os
import re
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

import lumina2
import memory
import weightfiles
from configurator import configure, problems
from files import atomic_write

# -----------------------------------------------------------------------------
# what to draw
prompt = "a red fox sitting in fresh snow, golden hour"  # used when prompt_file is empty
prompt_file = ""  # one prompt per line ('#' comments); per-line options --w --h --s --d --l --n as in sd-scripts
negative_prompt = ""  # the unconditional caption of CFG
system_prompt = lumina2.SYSTEM_PROMPTS["base"]  # "" = the bare caption
negative_system_prompt = ""  # negatives get no system prompt unless asked (SPEC §3)
seeds = [0]  # one image per seed and prompt; a config file may say list(range(8))

# the sampler
width = 1024  # pixels, a multiple of 16
height = 1024
steps = 30  # sigma intervals; midpoint evaluates the model twice per interval
cfg = 4.0  # guidance scale w: v = v_u + w (v_c - v_u); 1.0 = no unconditional pass
cfg_trunc = 1.0  # CFG only while t = 1 - sigma < cfg_trunc (official rule); 1.0 = always on
renorm = 1.0  # cap ||v|| at renorm * ||v_c|| per sample (official renorm_cfg); 0 = off
solver = "euler"  # the ODE step (SOLVERS)
shift = 6.0  # static time shift of the sigma grid
batch_size = 1  # images per DiT batch (a batch holds one prompt); the result does not depend on it

# the models, and where they run
dtype = "bfloat16"  # the weights' dtype; x, sigma and the CFG maths stay fp32
attention = "sdpa"  # lumina2.set_attention; sd-scripts --use_flash_attn / --use_sage_attn
device = "cuda" if torch.cuda.is_available() else "cpu"
offload = "none"  # "none": all on device; "model": models wait in CPU RAM, each on the device only while used
blocks_to_swap = 0  # --blocks_to_swap (sd-scripts): the last n DiT layers wait in CPU RAM, streamed in per step
fp8_base = False  # --fp8_base (sd-scripts): the DiT blocks' Linear weights in fp8 (per-row scale), half the bytes
fp8_scaled_mm = False  # musubi-tuner's --fp8_fast: with fp8_base, the matmuls themselves in fp8 (torch._scaled_mm; sm89+, bf16)
compile = False  # torch.compile per DiT block (musubi-tuner's --compile); the first steps pay the compile
dit_path = "models/lumina_2_model_bf16.safetensors"
gemma_path = "models/gemma_2_2b_fp16.safetensors"
ae_path = "models/ae.safetensors"
lora_weights = []  # ["path.safetensors;0.8", ...], merged into the DiT before sampling
max_length = 256  # caption token limit (longer captions are truncated with a warning)

# output
out_dir = "out/samples"
grid = False  # also save one contact sheet of all images
# -----------------------------------------------------------------------------

LINE_OPTIONS = {"w": ("width", int), "h": ("height", int), "s": ("steps", int), "l": ("cfg", float),
                "n": ("negative_prompt", str), "d": ("seeds", lambda s: [int(x) for x in s.split(",")])}


def sigma_schedule(steps, shift=6.0):
    """-> (steps + 1,) fp32 sigmas 1 to 0, S_shift(linspace(1, 0, steps + 1)), S_k(u) = k u / (1 + (k - 1) u), as diffusers."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()


def seeded_noise(seeds, height, width, channels=16):
    """-> (len(seeds), 16, H/8, W/8) fp32 on the CPU, a CPU generator per seed: an image depends on its seed alone."""
    return torch.cat([torch.randn((1, channels, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(s))
                      for s in seeds])


def with_lens(caption):
    """(feats (B, L, D), mask (B, L)) -> (feats, mask, lens): lens the valid lengths as host ints, the DiT's cap_lens, read
    from the mask once here (one sync if it is on a GPU) so that no step's forward waits for the device."""
    return (*caption[:2], caption[1].sum(1).tolist())


def stack_captions(a, b):
    """Two captions (feats (B, La, D), mask (B, La)[, lens]) -> one batch (2B, max(La, Lb), ...), right-padded: the DiT
    ignores that; host lengths, where both have them, are joined."""
    L = max(a[0].shape[1], b[0].shape[1])
    both = (torch.cat([F.pad(f, (0, 0, 0, L - f.shape[1])) for f in (a[0], b[0])]),
            torch.cat([F.pad(m.bool(), (0, L - m.shape[1]), value=False) for m in (a[1], b[1])]))
    return (*both, [*a[2], *b[2]]) if len(a) == len(b) == 3 else both


@torch.no_grad()
def cfg_velocity(model, x, sigma, cond, uncond, cfg=4.0, cfg_trunc=1.0, renorm=1.0, both=None):
    """x (B, 16, h, w) fp32 at sigma (float or 0-dim), cond/uncond (None: no CFG) = (feats (B, L, D), mask (B, L)[, lens on the
    host: see with_lens]) -> v like x."""
    t = 1 - torch.as_tensor(sigma, dtype=torch.float32)  # Lumina time: 0 = noise, 1 = clean
    guided = uncond is not None and cfg != 1.0 and float(t) < cfg_trunc
    t = t.to(x.device).expand(x.shape[0])
    if not guided:  # no CFG, or truncated (the late, nearly clean steps): no unconditional pass at all
        return model(x, t, *cond)
    v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), *(both or stack_captions(cond, uncond))).chunk(2)  # one 2B batch
    v = v_u + cfg * (v_c - v_u)
    if renorm > 0:  # norms over each whole sample (C, H, W); this only ever scales down
        cap = renorm * torch.linalg.vector_norm(v_c, dim=(1, 2, 3), keepdim=True)
        norm = torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
        v = torch.where(norm > cap, v * (cap / norm), v)
    return v


def euler(velocity, x, s0, s1):
    return velocity(x, s0)


def midpoint(velocity, x, s0, s1):
    """Half an Euler step, then the full step with the velocity found there: two model calls per interval."""
    s_mid = (s0 + s1) / 2
    return velocity(x + (s0 - s_mid) * velocity(x, s0), s_mid)


SOLVERS = {"euler": euler, "midpoint": midpoint}  # the velocity each step from sigma s0 to s1 takes
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OFFLOADS = {"none": None, "model": "cpu"}  # where the models wait while another one runs: on the device, or in CPU RAM
CHOICES = {"solver": SOLVERS, "dtype": DTYPES, "offload": OFFLOADS, "attention": lumina2.BACKENDS}  # read by the check and --help


@torch.no_grad()
def sample(model, noise, cond, uncond=None, steps=30, cfg=4.0, cfg_trunc=1.0, renorm=1.0, solver="euler", shift=6.0, progress=True):
    """The flow ODE from sigma = 1 (noise (B, 16, h, w)) to 0 -> latents (B, 16, h, w) fp32; cond/uncond: batch 1 or B."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
    widen = lambda c: None if c is None else with_lens(tuple(z.expand(noise.shape[0], *z.shape[1:]) for z in c[:2]))
    cond, uncond = widen(cond), widen(uncond)
    both = stack_captions(cond, uncond) if uncond is not None and cfg != 1.0 else None
    velocity = lambda x, s: cfg_velocity(model, x, s, cond, uncond, cfg, cfg_trunc, renorm, both)
    sigmas = sigma_schedule(steps, shift)  # stays on the CPU: 0-dim scalars, no device syncs
    x = noise.float()
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        s0, s1 = sigmas[i], sigmas[i + 1]
        x = x + (s0 - s1) * SOLVERS[solver](velocity, x, s0, s1)  # x_sigma = (1 - sigma) x0 + sigma noise, v = x0 - noise
    return x


@torch.no_grad()
def decode_to_images(ae, latents):
    """latents (B, 16, h, w) -> B RGB PIL images of (8h, 8w). ae.decode undoes the latent scaling, once."""
    x = ae.decode(latents.to(ae.decoder.conv_in.weight.device))  # (B, 3, H, W) in [-1, 1]
    x = (x / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def save_png(img, path, info):
    """Write img with a tEXt chunk "parameters" = JSON of info, through a temp file + rename."""
    meta = PngInfo()
    meta.add_text("parameters", json.dumps(info))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=meta))


def save_grid(images, path, info=None):
    """A near-square contact sheet; every cell has the size of the largest image, top-left aligned."""
    cols = math.ceil(math.sqrt(len(images)))
    w, h = max(im.width for im in images), max(im.height for im in images)
    sheet = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    save_png(sheet, path, info or {})


def next_free_path(out_dir, name):
    """out_dir/NNNNN-name.png with NNNNN one above every existing index, so reruns never overwrite."""
    taken = [int(f[:5]) for f in os.listdir(out_dir) if re.match(r"\d{5}-.*\.png$", f)] if os.path.isdir(out_dir) else []
    return os.path.join(out_dir, f"{max(taken, default=-1) + 1:05d}-{name}.png")


# -----------------------------------------------------------------------------
# the script


def parse_prompt_line(line, defaults, where):
    """'a cat --w 768 --d 1,2 --n blurry' -> a job dict: defaults overridden by the line's options."""
    text, *opts = re.split(r"(?:^|\s+)--([a-z]+)(?:\s+|$)", line)
    job = dict(defaults, prompt=text.strip())
    for key, value in zip(opts[::2], opts[1::2]):
        if key not in LINE_OPTIONS:
            raise SystemExit(f"{where}: unknown option --{key}; known: {' '.join('--' + k for k in LINE_OPTIONS)}")
        name, cast = LINE_OPTIONS[key]
        try:
            job[name] = cast(value.strip())
        except ValueError:
            raise SystemExit(f"{where}: bad value {value!r} for --{key}") from None
    return job


def read_jobs(c):
    """The config -> list of jobs {prompt, negative_prompt, width, height, steps, cfg, seeds}, checked."""
    defaults = dict(negative_prompt=c.negative_prompt, width=c.width, height=c.height, steps=c.steps, cfg=c.cfg, seeds=c.seeds)
    if not c.prompt_file:
        jobs = [dict(defaults, prompt=c.prompt)]
    else:
        if not os.path.isfile(c.prompt_file):
            raise SystemExit(f"prompt file not found: {c.prompt_file}")
        with open(c.prompt_file, encoding="utf-8") as fh:
            lines = [(n, s.strip()) for n, s in enumerate(fh, 1) if s.strip() and not s.lstrip().startswith("#")]
        if not lines:
            raise SystemExit(f"prompt file {c.prompt_file} holds no prompts (blank lines and # comments are skipped)")
        jobs = [parse_prompt_line(s, defaults, f"{c.prompt_file}:{n}") for n, s in lines]
    for job in jobs:
        if job["width"] % 16 or job["height"] % 16 or min(job["width"], job["height"]) <= 0:
            raise SystemExit(f"width and height must be positive multiples of 16, got {job['width']}x{job['height']} "
                             f"for prompt {job['prompt'][:60]!r}")
        if job["steps"] < 1 or not job["seeds"]:
            raise SystemExit(f"need steps >= 1 and at least one seed, got steps={job['steps']} seeds={job['seeds']}")
    return jobs


def encode_caption(te, caption, system, device):
    """One caption -> (feats (1, L, D), mask (1, L)) on device; truncation warnings name the caption, not the system prompt."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats, mask = te([caption], system)
    for w in caught:
        warnings.warn(f"{w.message} -- caption {caption[:80]!r} is longer than max_length={te.max_length} tokens "
                      f"with its system prompt; the rest is ignored", w.category, stacklevel=2)
    return feats.to(device), mask.to(device)


def load_models(c, dtype, home):
    """-> (te, dit, ae) on `home`, LoRAs merged into the DiT. File problems end the run with the loader's message."""
    missing = [p for p in (c.dit_path, c.gemma_path, c.ae_path) if not os.path.exists(p)]  # a folder: the loader says so
    if missing:
        raise SystemExit(f"weight file not found: {', '.join(missing)} (set dit_path / gemma_path / ae_path, "
                         f"or train the demo's tiny world first: `python train.py config/demo.py`)")
    try:
        te = weightfiles.load_text_encoder(c.gemma_path, dtype, home, max_length=c.max_length)
        dit = weightfiles.load_dit(c.dit_path, dtype, home)
        ae = weightfiles.load_ae(c.ae_path, dtype, home)
        if c.lora_weights:
            import lora  # only LoRA runs need it
            lora.apply_lora_files(dit, c.lora_weights, merge=True)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load weights: {e}") from None
    return te, dit, ae


def main(argv=None):
    """Run the script with `argv` (default sys.argv[1:]) -> the written PNG paths; module constants untouched: callable again."""
    c = SimpleNamespace(**configure(dict(globals()), argv))
    start = time.time()
    if bad := problems(c, CHOICES, {"batch_size": (lambda v: v >= 1, ">= 1")}):
        raise SystemExit("config errors:\n  - " + "\n  - ".join(bad))
    jobs = read_jobs(c)
    try:  # every setting that can be checked before a weight file is read
        lumina2.set_attention(c.attention, DTYPES[c.dtype], c.device)
        memory.check_combination(fp8=c.fp8_base, fp8_scaled_mm=c.fp8_scaled_mm, blocks_to_swap=c.blocks_to_swap)
        memory.use_scaled_mm(c.fp8_scaled_mm, c.device, DTYPES[c.dtype])  # bf16 only; row-wise fp8 GEMM on this device
    except (ValueError, ImportError) as e:
        raise SystemExit(str(e)) from None
    if c.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    te, dit, ae = load_models(c, DTYPES[c.dtype], OFFLOADS[c.offload] or c.device)

    # 1. captions: Gemma runs once per distinct text, then is freed (it is never needed again)
    te = te.to(c.device)
    texts = {(j["prompt"], c.system_prompt) for j in jobs} | {(j["negative_prompt"], c.negative_system_prompt) for j in jobs if j["cfg"] != 1.0}
    captions = {key: encode_caption(te, *key, c.device) for key in sorted(texts)}
    del te

    # 2. denoise: each batch is a slice of one job's seeds; latents wait on the CPU
    dit = memory.prepare(dit, c.device, fp8=c.fp8_base, fp8_scaled_mm=c.fp8_scaled_mm, compile=c.compile,
                         blocks_to_swap=c.blocks_to_swap)
    batches = []
    for job in jobs:
        uncond = captions[(job["negative_prompt"], c.negative_system_prompt)] if job["cfg"] != 1.0 else None
        for i in range(0, len(job["seeds"]), c.batch_size):
            chunk = job["seeds"][i:i + c.batch_size]
            noise = seeded_noise(chunk, job["height"], job["width"]).to(c.device)
            latents = sample(dit, noise, captions[(job["prompt"], c.system_prompt)], uncond, job["steps"], job["cfg"],
                             c.cfg_trunc, c.renorm, c.solver, c.shift)
            batches.append((job, chunk, latents.cpu()))
    del dit

    # 3. decode and save, one PNG per seed with every setting in its text chunk
    ae = ae.to(c.device)
    paths, images = [], []
    files = dict(dit=os.path.basename(c.dit_path), gemma=os.path.basename(c.gemma_path), ae=os.path.basename(c.ae_path))
    for job, chunk, latents in batches:
        for seed, img in zip(chunk, decode_to_images(ae, latents)):
            info = dict(job, seed=seed, system_prompt=c.system_prompt, negative_system_prompt=c.negative_system_prompt,
                        cfg_trunc=c.cfg_trunc, renorm=c.renorm, solver=c.solver, shift=c.shift, dtype=c.dtype,
                        **files, lora_weights=c.lora_weights)
            del info["seeds"]
            paths.append(next_free_path(c.out_dir, str(seed)))
            save_png(img, paths[-1], info)
            images.append(img)
    if c.grid and images:
        paths.append(next_free_path(c.out_dir, "grid"))
        save_grid(images, paths[-1], dict(images=[os.path.basename(p) for p in paths[:-1]]))
    print("\n".join(paths))
    print(f"{len(images)} images in {time.time() - start:.1f} s, peak memory {memory.peak_memory_gb(c.device):.2f} GiB "
          f"{'CUDA allocated' if torch.device(c.device).type == 'cuda' else 'process RSS'}")
    return paths


if __name__ == "__main__":
    main()
