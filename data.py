"""
Data for training Lumina 2: image folders with captions, aspect buckets, latent and text-feature
caches, and the tiny built-in demo (random models written in the real file layouts, plus a synthetic
dataset of coloured shapes), so that everything runs on a CPU with no downloads.

A dataset is a folder (searched recursively) of .jpg/.jpeg/.png/.webp images, each with a caption in a
same-stem .txt file. Every image goes to the aspect bucket nearest its own aspect, is resized to cover
the bucket and centre-cropped. The AE and text encoder run once, up front (cache_latents, cache_text);
training then reads only the caches, so both models can be freed. Disk caches are keyed by a
fingerprint of everything that produced them, so a changed setting re-encodes and nothing goes stale.

    python -c "import data; print(data.make_demo_weights('out/demo/weights'))"
    python -c "import data; print(data.make_demo_dataset('out/demo/images'))"
"""
import contextlib
import hashlib
import io
import json
import math
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import lumina2

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
PREPROCESS = "cover-lanczos-centre-crop-v1"  # part of the latent fingerprint: change it when the pixel pipeline changes

# -----------------------------------------------------------------------------
# aspect buckets and pixels


def bucket_sizes(resolution, step=16, max_aspect=4.0):
    """The official Lumina buckets (imgproc.generate_crop_size_list, recomputed): with a budget of
    (resolution/step)^2 tiles of step x step px, walk the staircase of tile counts (wp, hp), wide to tall:
    grow hp while wp*hp fits the budget, else shrink wp, keeping each visited size with aspect <= max_aspect.
    -> list of (w, h) in px, multiples of step, area <= resolution^2. At 1024 with step 16 (the official
    finetune's 8 px per latent x patch 2) this is 193 sizes, 2048x512 ... 1024x1024 ... 512x2048; the
    "51 sizes" quoted in the spec and notes does not come out of this rule, nor of any 16 px rule tried."""
    budget = round((resolution / step) ** 2)
    sizes, wp, hp = [], budget, 1
    while wp > 0:
        if max(wp, hp) <= max_aspect * min(wp, hp):
            sizes.append((wp * step, hp * step))
        if wp * (hp + 1) <= budget:
            hp += 1
        else:
            wp -= 1
    return sizes


def nearest_bucket(w, h, buckets):
    """The bucket closest in aspect ratio (|log(w/h) - log(bw/bh)|); ties go to the larger area."""
    return min(buckets, key=lambda b: (abs(math.log(w / h) - math.log(b[0] / b[1])), -b[0] * b[1]))


def image_size(path):
    """(w, h) as displayed, read from the header only: EXIF orientations 5-8 swap the sides."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def load_image(path):
    """-> RGB PIL image, EXIF rotation applied, transparency composited over white (not black)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        return img.convert("RGB")


def resize_cover_crop(img, w, h):
    """Resize (LANCZOS) so the image covers w x h, keeping its aspect, then cut the centre w x h."""
    scale = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img):
    """PIL image -> (3, H, W) fp32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return x.permute(2, 0, 1).float() / 127.5 - 1.0

# -----------------------------------------------------------------------------
# folder scanning


def scan_folder(root, caption_ext=".txt"):
    """All images under root (recursive, sorted) -> list of (path, caption). A missing caption file gives ""
    with a warning; an image that fails to decode is reported and skipped. Decoding is a full load, not
    just verify(): a truncated JPEG passes verify() and only fails when its pixels are read."""
    if not os.path.isdir(root):
        raise ValueError(f"dataset folder {root!r} does not exist or is not a folder")
    items, bad = [], []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTS):
                continue
            path = os.path.join(folder, name)
            try:
                with Image.open(path) as img:
                    img.verify()
                with Image.open(path) as img:
                    img.load()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... all mean unusable
                print(f"skipping unreadable image {path}: {e}")
                bad.append(path)
                continue
            items.append((path, read_caption(path, caption_ext)))
    if bad:
        print(f"{len(bad)} unreadable image(s) skipped in {root}")
    if not items:
        raise ValueError(f"no usable images in {root!r} (looked for {', '.join(IMAGE_EXTS)}, recursively)")
    return items


def read_caption(image_path, caption_ext):
    """The same-stem caption file's text, stripped (a UTF-8 BOM too); "" with a warning when missing."""
    path = os.path.splitext(image_path)[0] + caption_ext
    if not os.path.exists(path):
        warnings.warn(f"no caption file {path} for {image_path}; using the empty caption")
        return ""
    with open(path, encoding="utf-8-sig") as f:
        return f.read().strip()

# -----------------------------------------------------------------------------
# caches: one safetensors file per entry, named by the hash of its fingerprint


def file_id(path):
    """A cheap identity of a file (name, size, mtime) for the ae_id / te_id fingerprints."""
    st = os.stat(path)
    return f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}"


def fingerprint(**fields):
    """-> (json text, sha1 hex) of the fields: the file name is the hash, the text is stored inside."""
    text = json.dumps(fields, sort_keys=True)
    return text, hashlib.sha1(text.encode()).hexdigest()


def cache_hit(path, text):
    """True when path is a readable cache file written for exactly this fingerprint."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("fingerprint") == text
    except Exception:  # missing, or a broken file from an older crash: re-encode it
        return False


@contextlib.contextmanager
def exact_fp32():
    """fp32 convolutions and matmuls in IEEE fp32 inside, whatever the process's TF32 settings: on a GPU,
    cuDNN runs fp32 convs in TF32 by default (10-bit mantissa), which would make GPU-made latent caches differ
    from CPU-made ones under the same fingerprint."""
    new_api = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")
    if new_api:  # torch >= 2.9; mixing it with the legacy allow_tf32 flags is an error there
        knobs = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
        kept = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"
    else:
        kept = [torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32]
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            for k, v in zip(knobs, kept):
                k.fp32_precision = v
        else:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = kept


def cache_get(store, key):
    """An entry is a CPU tensor (memory cache) or the path of its file (disk cache, read on demand)."""
    from safetensors.torch import load_file
    v = store[key]
    return load_file(v)["x"] if isinstance(v, str) else v


class Dataset:
    """Images of one folder in aspect buckets, with cached latents and caption features.

    Caches: latents are kept in `dtype` (fp32 by default, lossless; bf16 halves the memory) and returned
    as fp32; caption features are kept as the text encoder returned them (its weight dtype), valid tokens
    only, and padded per batch. With cache_dir they live on disk and are read when a batch needs them."""

    def __init__(self, root, resolution=1024, repeats=1, flip=False, caption_ext=".txt", bucket_step=16):
        self.root, self.resolution, self.repeats, self.flip = root, resolution, repeats, flip
        self.items = scan_folder(root, caption_ext)
        sizes = bucket_sizes(resolution, bucket_step)
        self.buckets = [nearest_bucket(*image_size(p), sizes) for p, _ in self.items]  # (w, h) per image
        self.latents, self.text = {}, {}  # (index, flipped) -> (16, h, w); caption -> (L, D)
        print(f"{len(self.items)} images in {len(set(self.buckets))} buckets from {root}")

    def __len__(self):
        return len(self.items)

    @torch.no_grad()
    def cache_latents(self, ae, device="cpu", batch_size=1, cache_dir=None, sample=False, dtype=torch.float32, ae_id=""):
        """Encode every image (and its mirror image with flip=True) once, in batches of one bucket.
        sample=False encodes the posterior mean; sample=True one posterior draw, seeded by the entry's
        fingerprint so that it is reproducible. Returns (reused, encoded)."""
        if cache_dir and not ae_id:
            warnings.warn("cache_latents without ae_id: a different AE file will not invalidate the disk cache")
        ae_dtype = str(next(ae.parameters()).dtype)
        todo, reused = {}, 0  # bucket -> [(key, fingerprint text, digest, file path)]
        for i, (path, _) in enumerate(self.items):
            st = os.stat(path)
            for flipped in ([False, True] if self.flip else [False]):
                text, digest = fingerprint(ae=ae_id, ae_dtype=ae_dtype, image=os.path.abspath(path), size=st.st_size,
                                           mtime=st.st_mtime_ns, bucket=self.buckets[i], flip=flipped,
                                           mode="sample" if sample else "mean", dtype=str(dtype), pre=PREPROCESS)
                file = os.path.join(cache_dir, "latents", digest + ".safetensors") if cache_dir else None
                if file and cache_hit(file, text):
                    self.latents[(i, flipped)], reused = file, reused + 1
                else:
                    todo.setdefault(self.buckets[i], []).append(((i, flipped), text, digest, file))
        jobs = [group[k:k + batch_size] for group in todo.values() for k in range(0, len(group), batch_size)]
        with exact_fp32():
            self.encode_jobs(ae, jobs, device, sample, dtype)
        encoded = sum(len(g) for g in todo.values())
        print(f"latent cache: reused {reused} / encoded {encoded}")
        return reused, encoded

    def encode_jobs(self, ae, jobs, device, sample, dtype):
        for job in tqdm(jobs, desc="encoding latents", disable=not jobs):
            x = torch.stack([self.pixels(i, flipped) for (i, flipped), *_ in job]).to(device)
            if sample:  # one generator per image, so a draw does not depend on the batching
                z = torch.cat([ae.encode(x[j:j + 1], sample=True, generator=torch.Generator(device).manual_seed(int(d[:12], 16)))
                               for j, (_, _, d, _) in enumerate(job)])
            else:
                z = ae.encode(x)
            for (key, text, _, file), zi in zip(job, z.to("cpu", dtype)):
                if file:
                    lumina2.save_file_atomic({"x": zi}, file, metadata={"fingerprint": text})
                self.latents[key] = file or zi.clone()

    def pixels(self, i, flipped):
        """Image i, bucketed -> (3, h, w) in [-1, 1], mirrored left-right when flipped."""
        x = to_tensor(resize_cover_crop(load_image(self.items[i][0]), *self.buckets[i]))
        return x.flip(-1) if flipped else x

    @torch.no_grad()
    def cache_text(self, text_encoder, system_prompt, max_length, cache_dir=None, te_id="", batch_size=8):
        """Encode every distinct caption, and the empty caption "" for caption dropout (the system
        prompt still applied), keeping the first min(max_length, encoder max) valid tokens. Gemma is
        causal, so these equal an encoding truncated at that length. Returns (reused, encoded)."""
        if cache_dir and not te_id:
            warnings.warn("cache_text without te_id: a different text-encoder file will not invalidate the disk cache")
        max_length = min(max_length, text_encoder.max_length)
        te_dtype = str(next(text_encoder.parameters()).dtype)
        todo, reused = [], 0
        for caption in sorted({c for _, c in self.items} | {""}):
            text, digest = fingerprint(te=te_id, te_dtype=te_dtype, softcap=lumina2.GEMMA_SOFTCAP,
                                       system_prompt=system_prompt, max_length=max_length, caption=caption)
            file = os.path.join(cache_dir, "text", digest + ".safetensors") if cache_dir else None
            if file and cache_hit(file, text):
                self.text[caption], reused = file, reused + 1
            else:
                todo.append((caption, text, file))
        todo.sort(key=lambda t: len(t[0]))  # similar lengths together: less padding per batch
        jobs = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
        for job in tqdm(jobs, desc="encoding captions", disable=not jobs):
            feats, mask = text_encoder([c for c, _, _ in job], system_prompt)  # (B, L, D), (B, L)
            for (caption, text, file), f, m in zip(job, feats.cpu(), mask.cpu()):
                f = f[:min(int(m.sum()), max_length)].clone()  # (L_i, D) valid tokens only
                if file:
                    lumina2.save_file_atomic({"x": f}, file, metadata={"fingerprint": text})
                self.text[caption] = file or f
        print(f"text cache: reused {reused} / encoded {len(todo)}")
        return reused, len(todo)

    def epoch_plan(self, batch_size, seed, epoch, caption_dropout=0.0):
        """The whole epoch as lists of (index, flipped, dropped), from (seed, epoch) only: shuffle each
        bucket's samples (repeats included), cut them into batches (a bucket's last batch may be smaller:
        it is kept, not dropped or padded), shuffle the batch order, then draw flips and caption dropout
        per sample from their own generators, so one setting never changes the other's draws."""
        order = np.random.default_rng([seed, epoch, 0])
        by_bucket = {}
        for i, b in enumerate(self.buckets):
            by_bucket.setdefault(b, []).extend([i] * self.repeats)
        batches = []
        for b in sorted(by_bucket):
            idx = [by_bucket[b][k] for k in order.permutation(len(by_bucket[b]))]
            batches += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
        batches = [batches[k] for k in order.permutation(len(batches))]
        n = sum(len(b) for b in batches)
        flips = (np.random.default_rng([seed, epoch, 1]).random(n) < 0.5) & self.flip
        drops = np.random.default_rng([seed, epoch, 2]).random(n) < caption_dropout
        plan, k = [], 0
        for b in batches:
            plan.append([(i, bool(flips[k + j]), bool(drops[k + j])) for j, i in enumerate(b)])
            k += len(b)
        return plan

    def len_batches(self, batch_size):
        """Batches per epoch: per bucket ceil(images * repeats / batch_size), the last one kept even if short."""
        return sum(math.ceil(self.buckets.count(b) * self.repeats / batch_size) for b in set(self.buckets))

    def batches(self, batch_size, seed, epoch, caption_dropout=0.0, skip=0, rank=0, world=1):
        """Yield the epoch's batches, from batch `skip` on (exact resume: the skipped batches are not
        loaded), as dicts: latents (B, 16, h, w) fp32, cap_feats (B, L, D) in the text encoder's dtype,
        zero-padded to this batch's longest caption, cap_mask (B, L) bool, captions (the ones used: "" when
        dropped), paths. With world > 1 processes a global batch holds batch_size x world samples and this
        rank gets its contiguous share, starting at `start` of `global_size`; `weight` = share x world /
        global_size makes the average over ranks of weight x (share mean) the global mean. A rank left with
        no sample (a bucket's short last batch) gets the batch's first one with weight 0: every rank must
        run backward."""
        if len(self.latents) < len(self.items) * (2 if self.flip else 1) or not self.text:
            raise RuntimeError("call cache_latents(ae, ...) and cache_text(text_encoder, ...) before batches()")
        for batch in self.epoch_plan(batch_size * world, seed, epoch, caption_dropout)[skip:]:
            n = len(batch)
            lo, hi = n * rank // world, n * (rank + 1) // world
            share = batch[lo:hi] or batch[:1]
            captions = ["" if dropped else self.items[i][1] for i, _, dropped in share]
            feats = [cache_get(self.text, c) for c in captions]
            L = max(f.shape[0] for f in feats)
            cap_feats = feats[0].new_zeros(len(feats), L, feats[0].shape[1])
            cap_mask = torch.zeros(len(feats), L, dtype=torch.bool)
            for j, f in enumerate(feats):
                cap_feats[j, :len(f)], cap_mask[j, :len(f)] = f, True
            yield {"latents": torch.stack([cache_get(self.latents, (i, flipped)).float() for i, flipped, _ in share]),
                   "cap_feats": cap_feats, "cap_mask": cap_mask, "captions": captions,
                   "paths": [self.items[i][0] for i, _, _ in share],
                   "global_size": n, "start": lo if hi > lo else 0, "weight": (hi - lo) * world / n}

# -----------------------------------------------------------------------------
# the tiny demo: random models in the three real file layouts, and a folder of coloured shapes

DEMO_GEMMA = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512)
DEMO_SENTENCES = [
    "a red circle on a white background", "a blue square on a black background", "a green triangle in the middle",
    "a yellow star next to a purple heart", "two orange circles and one small cyan square",
    "You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start>",
    "digits 0123456789 and unicode: café, naïve, 東京, emoji 🙂", "  double  spaces\tand tabs  ",
]


def train_tiny_tokenizer(vocab_size=DEMO_GEMMA["vocab_size"]):
    """A Gemma-like SentencePiece BPE model (pad 0, eos 1, bos 2, unk 3, byte fallback) -> proto bytes."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEMO_SENTENCES * 20), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", num_threads=1, minloglevel=2)
    return buf.getvalue()


def make_demo_weights(out_dir, seed=0):
    """Write tiny random models as lumina_2_model_bf16.safetensors (raw keys, BF16),
    gemma_2_2b_fp16.safetensors (`model.` prefix, F16, embedded spiece_model) and ae.safetensors (F32).
    Returns the three paths; existing files are kept."""
    from transformers import Gemma2Model
    paths = {n: os.path.join(out_dir, f) for n, f in
             [("dit", "lumina_2_model_bf16.safetensors"), ("gemma", "gemma_2_2b_fp16.safetensors"), ("ae", "ae.safetensors")]}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    torch.manual_seed(seed)
    dit = lumina2.NextDiT(**lumina2.DIT_PRESETS["tiny"])
    lumina2.save_file_atomic({k: v.to(torch.bfloat16) for k, v in dit.state_dict().items()}, paths["dit"])
    gemma = Gemma2Model(lumina2.gemma_config(**DEMO_GEMMA))
    with torch.no_grad():  # Gemma initialises its (1 + w) norms at w = 0; random w makes the test meaningful
        for name, p in gemma.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    sd = {"model." + k: v.to(torch.float16) for k, v in gemma.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(train_tiny_tokenizer()), dtype=torch.uint8)
    lumina2.save_file_atomic(sd, paths["gemma"], metadata={"gemma2_config": json.dumps(DEMO_GEMMA)})
    ae = lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"])
    with torch.no_grad():  # a random encoder gives latents of std ~0.1; scale its output to the real AE's std ~1
        ae.encoder.conv_out.weight.mul_(8.0)
        ae.encoder.conv_out.bias.mul_(8.0)
    lumina2.save_file_atomic(ae.state_dict(), paths["ae"])
    return paths


DEMO_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 20)}
DEMO_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
DEMO_SHAPES = ("circle", "square", "triangle")


def make_demo_dataset(out_dir, n=24, size=64, seed=0):
    """Write n coloured shapes on plain backgrounds as PNG + .txt caption ("a red circle on a white
    background"), in three aspects: size x size, wide (5:3) and tall (3:5), sides multiples of 16 for
    size 64 (64x64, 80x48, 48x80). Deterministic in seed; existing files are kept. Returns out_dir."""
    rng = random.Random(seed)
    aspects = [(size, size), (size * 5 // 4, size * 3 // 4), (size * 3 // 4, size * 5 // 4)]
    os.makedirs(out_dir, exist_ok=True)
    for k in range(n):
        w, h = aspects[k % len(aspects)]
        shape, color, bg = rng.choice(DEMO_SHAPES), rng.choice(list(DEMO_COLORS)), rng.choice(list(DEMO_BACKGROUNDS))
        r = rng.uniform(0.25, 0.4) * min(w, h)  # half-size of the shape, centre jittered inside the frame
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        stem = os.path.join(out_dir, f"shape_{k:03d}")
        if os.path.exists(stem + ".png") and os.path.exists(stem + ".txt"):
            continue
        img = Image.new("RGB", (w, h), DEMO_BACKGROUNDS[bg])
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=DEMO_COLORS[color])
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=DEMO_COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=DEMO_COLORS[color])
        img.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(f"a {color} {shape} on a {bg} background\n")
    return out_dir
