"""
Training data for Lumina 2: captioned image folders, aspect buckets, caption processing, latent and text-feature caches,
batches. A dataset is a folder (searched recursively) of .jpg/.jpeg/.png/.webp images with same-stem .txt captions, or
the subsets of an sd-scripts dataset config (dataset_toml.py). The AE and text encoder run once, up front (cache_latents,
cache_text), so both can be freed for training; disk caches are keyed by a fingerprint of all that produced them.

    python -c "import data; ds = data.Dataset('out/demo/world/images', resolution=32); print(len(ds), set(ds.buckets))"
"""
import contextlib
import hashlib
import json
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

import lumina2
from files import BadInput, NotUTF8, not_utf8_message, read_text, readable_image, save_file_atomic, to_8bit, warn_extreme

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# part of the latent fingerprint: change it when the pixel pipeline changes (v2: more than 8 bits scaled, not clipped;
# v3: only the kept box is resized, exactly centred, instead of resizing all and cropping at whole pixels)
PREPROCESS = "lanczos-centre-box-v3"

# -----------------------------------------------------------------------------
# aspect buckets and pixels


def bucket_sizes(resolution, step=16, max_aspect=4.0):
    """The official Lumina buckets (imgproc.generate_crop_size_list, recomputed) -> [(w, h)], multiples of step: walk the
    tile counts (wp, hp) wide to tall, growing hp while wp*hp fits the budget (resolution/step)^2, else shrinking wp, keeping
    aspect <= max_aspect. At 1024, step 16 (8 px/latent x patch 2): 193 sizes; the spec's "51 sizes" fits no 16 px rule tried."""
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
    """-> RGB PIL image: EXIF rotation applied, >8-bit samples scaled down (not clipped), alpha over white (not black)."""
    with Image.open(path) as img:
        img = to_8bit(ImageOps.exif_transpose(img))
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        return img.convert("RGB")


def resize_cover_crop(img, w, h, path=None):
    """The centre w x h resized (LANCZOS) to cover w x h; only the kept box (fractional source px) is resized, never a huge
    intermediate (20000 x 20 at 512 x 512 would be 512000 x 512). `path`: warn once of an extreme upscale or crop."""
    W, H = img.size
    if w * H >= h * W:  # the kept region (bw x bh source px, aspect w:h) spans the whole width...
        bw, bh = W, h * W / w
    else:  # ...or the whole height; the spanned side is exact, so the box never leaves the image
        bw, bh = w * H / h, H
    left, top = (W - bw) / 2, (H - bh) / 2
    if path is not None:
        warn_extreme(path, w / bw, bw * bh / (W * H))
    return img.resize((w, h), Image.LANCZOS, box=(left, top, min(W, left + bw), min(H, top + bh)))


def to_tensor(img):
    """PIL image -> (3, H, W) fp32 in [-1, 1]; a 16-bit or float greyscale image is scaled as load_image does."""
    x = torch.from_numpy(np.asarray(to_8bit(img).convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0

# -----------------------------------------------------------------------------
# folder scanning


def scan_folder(root, caption_ext=".txt", recursive=True, class_tokens=None):
    """Sorted images under root (recursive, or only those directly inside as sd-scripts' image_dir) -> [(path, caption)]."""
    if not os.path.isdir(root):
        raise BadInput(f"dataset folder {root!r} does not exist or is not a folder")
    items, bad, not_utf8 = [], [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(dirs) if recursive else []
        for name in sorted(n for n in files if n.lower().endswith(IMAGE_EXTS)):
            path = os.path.join(folder, name)
            if not readable_image(path):
                bad.append(path)
                continue
            try:
                items.append((path, read_caption(path, caption_ext, class_tokens)))
            except NotUTF8 as e:
                not_utf8.append(e)
    if bad:
        print(f"{len(bad)} unreadable image(s) skipped in {root}")
    if not_utf8:
        raise BadInput(not_utf8_message(not_utf8))
    if not items:
        raise BadInput(f"no usable images in {root!r} (looked for {', '.join(IMAGE_EXTS)}{', recursively' if recursive else ''})")
    return items


def read_caption(image_path, caption_ext, class_tokens=None):
    """The same-stem caption file's text, stripped (BOM too); if missing, class_tokens (sd-scripts' DreamBooth), else ""."""
    path = os.path.splitext(image_path)[0] + caption_ext
    if not os.path.exists(path):
        if class_tokens is not None:
            return class_tokens
        warnings.warn(f"no caption file {path} for {image_path}; using the empty caption")
        return ""
    return read_text(path).strip()


def scan_metadata(metadata_file, image_dir=None):
    """sd-scripts' fine-tuning metadata_file -> [(path, caption and tags joined with ", ")], sorted by key (see find_image)."""
    meta = read_metadata(metadata_file)
    items, missing = [], []
    for key in sorted(meta):
        path = find_image(key, image_dir)
        if path is None:
            missing.append(key)
        elif readable_image(path):
            parts = [meta[key].get(k) for k in ("caption", "tags")]
            caption = ", ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
            if not caption:
                warnings.warn(f"{metadata_file}: {key!r} has no caption or tags; using the empty caption")
            items.append((path, caption))
    if missing:
        print(f"{metadata_file}: {len(missing)} image(s) not found, skipped: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if not items:
        raise BadInput(f"no usable images listed in {metadata_file!r} (image_dir {image_dir!r})")
    return items


def read_metadata(path):
    """A metadata_file -> its dict {image key: {"caption": ..., "tags": ...}}, or BadInput saying what is wrong with it."""
    try:
        meta = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path!r} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}; fix it "
                       f"(a JSON checker such as python -m json.tool {path} points at it)") from None
    if not (isinstance(meta, dict) and all(isinstance(v, dict) for v in meta.values())):
        raise BadInput(f"{path!r} is not a JSON object of {{image: {{\"caption\": ..., \"tags\": ...}}}}")
    return meta


def find_image(key, image_dir):
    """The file a metadata key names: the key as a path, else image_dir/key, else image_dir/key + an image extension."""
    candidates = [key] + ([os.path.join(image_dir, key)] + [os.path.join(image_dir, key + e) for e in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS)]
                          if image_dir else [])
    return next((c for c in candidates if c.lower().endswith(IMAGE_EXTS) and os.path.isfile(c)), None)

# What a subset is: sd-scripts' dataset keys with their defaults (dataset_toml.py reads and checks them from a TOML)
SUBSET_DEFAULTS = dict(
    resolution=1024, batch_size=1, enable_bucket=False,  # false (sd-scripts' default): every image is cropped to the resolution
    min_bucket_reso=None, max_bucket_reso=None,  # unset: the official buckets' own range (aspect <= 4)
    bucket_reso_steps=16,  # sd-scripts' default is 64; the official buckets walk 16 px tiles
    bucket_no_upscale=False, validation_split=0.0, validation_seed=0,
    system_prompt=lumina2.SYSTEM_PROMPTS["base"],  # one text cache per dataset
    num_repeats=1, flip_aug=False, caption_extension=".txt", class_tokens=None,  # the caption of an image without a caption file
    shuffle_caption=False, keep_tokens=0, keep_tokens_separator="", caption_separator=",", caption_prefix="",
    caption_suffix="", caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0, image_dir=None, metadata_file=None, is_reg=False)


def folder_subset(root, **values):
    """The one subset train_data_dir stands for: the folder, recursive and bucketed, with `values` (train.py's constants)."""
    return {**SUBSET_DEFAULTS, **values, "image_dir": root, "enable_bucket": True, "dataset": 0, "table": "train_data_dir",
            "recursive": True}


def dataset_buckets(s):
    """The sizes (w, h) a dataset's images may go to: bucket_sizes for an area of resolution^2 (or w x h), sides in
    [min_bucket_reso, max_bucket_reso]; only the resolution itself when enable_bucket is false."""
    w, h = s["resolution"] if isinstance(s["resolution"], list) else (s["resolution"], s["resolution"])
    if not s["enable_bucket"]:
        return [(w, h)]
    lo, hi = s["min_bucket_reso"] or 0, s["max_bucket_reso"] or math.inf
    return [(bw, bh) for bw, bh in bucket_sizes(math.sqrt(w * h), s["bucket_reso_steps"]) if lo <= min(bw, bh) and max(bw, bh) <= hi]


def image_bucket(w, h, sizes, s):
    """The nearest bucket in aspect, or with bucket_no_upscale a smaller image's size cut to the step (sd-scripts' rule)."""
    b = nearest_bucket(w, h, sizes)
    step = s["bucket_reso_steps"]
    if s["enable_bucket"] and s["bucket_no_upscale"] and w * h < b[0] * b[1]:
        return max(step, w // step * step), max(step, h // step * step)
    return b

# -----------------------------------------------------------------------------
# captions: sd-scripts' caption processing, and the few variants of a shuffled caption that get cached


def shuffles(s):
    """True when a subset's captions change from step to step (so they are cached as variants)."""
    return s["shuffle_caption"] or s["caption_tag_dropout_rate"] > 0


def make_caption(caption, s, rng=None):
    """The text one image trains with: prefix + caption + suffix (sd-scripts shuffles those too), split at caption_separator
    when the subset shuffles or drops tags or the text has keep_tokens_separator: the first keep_tokens tags (or the parts
    outside the two separators) stay put, the rest are shuffled and dropped by rng (None: neither); joined with ", "."""
    text = " ".join(t for t in (s["caption_prefix"], caption, s["caption_suffix"]) if t)
    sep = s["keep_tokens_separator"]
    if not (shuffles(s) or (sep and sep in text)):
        return text

    def tags(part):
        return [t.strip() for t in part.split(s["caption_separator"]) if t.strip()]

    if sep and sep in text:
        head, _, rest = text.partition(sep)
        middle, _, tail = rest.partition(sep)
        fixed, free, end = tags(head), tags(middle), tags(tail)
    else:
        every = tags(text)
        fixed, free, end = every[:s["keep_tokens"]], every[s["keep_tokens"]:], []
    if rng is not None:
        if s["shuffle_caption"]:
            free = [free[k] for k in rng.permutation(len(free))]
        if s["caption_tag_dropout_rate"] > 0:
            free = [t for t, u in zip(free, rng.random(len(free))) if u >= s["caption_tag_dropout_rate"]]
    return ", ".join(fixed + free + end)


def caption_variants(caption, s, n, seed):
    """The texts to cache for one training image: the caption as processed, or, when its subset shuffles or
    drops tags, n variants, variant v drawn from (seed, v, caption) alone: the same on every run and resume."""
    if not shuffles(s):
        return [make_caption(caption, s)]
    return [make_caption(caption, s, np.random.default_rng(int(hashlib.sha256(f"{seed}\n{v}\n{caption}".encode()).hexdigest()[:16], 16)))
            for v in range(n)]

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
    """IEEE fp32 convolutions and matmuls inside, whatever the TF32 settings: on a GPU cuDNN runs fp32 convs in TF32 by
    default (10-bit mantissa), so GPU-made latent caches would differ from CPU-made ones under the same fingerprint."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        # torch >= 2.9; mixing it with the legacy allow_tf32 flags is an error there
        knobs = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        knobs = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    kept = [(knob, name, getattr(knob, name)) for knob, name, _ in knobs]
    for knob, name, value in knobs:
        setattr(knob, name, value)
    try:
        yield
    finally:
        for knob, name, value in kept:
            setattr(knob, name, value)


def cache_get(store, key):
    """An entry is a CPU tensor (memory cache) or the path of its file (disk cache, read on demand)."""
    from safetensors.torch import load_file
    v = store[key]
    return load_file(v)["x"] if isinstance(v, str) else v


class Dataset:
    """The images of one folder, or of the subsets of one [[datasets]] table, in aspect buckets; per image a bucket, repeats per
    epoch (0: validation) and caption texts (variants if its subset shuffles). Latents are cached in `dtype` (fp32 by default,
    lossless; bf16 halves the memory), returned as fp32; caption features in the encoder's dtype, valid tokens only."""
    def __init__(self, root=None, resolution=1024, repeats=1, flip=False, caption_ext=".txt", bucket_step=16,
                 subsets=None, variants=1, seed=0):
        """A folder (root and the keywords after it; caption dropout from batches()) or one [[datasets]] table's subsets."""
        if subsets is None:
            subsets = [folder_subset(root, resolution=resolution, num_repeats=repeats, flip_aug=flip, caption_extension=caption_ext,
                                     bucket_reso_steps=bucket_step, caption_dropout_rate=None)]
        first = subsets[0]  # the dataset-level keys are the same in every subset of a dataset
        self.subsets, self.root, self.resolution = subsets, first["image_dir"], first["resolution"]
        self.batch_size, self.system_prompt = first["batch_size"], first["system_prompt"]
        self.items, self.subset_of = [], []  # (path, caption as written); index into self.subsets
        for k, sub in enumerate(subsets):
            found = (scan_metadata(sub["metadata_file"], sub["image_dir"]) if sub["metadata_file"] else
                     scan_folder(sub["image_dir"], sub["caption_extension"], sub["recursive"], sub["class_tokens"]))
            self.items += found
            self.subset_of += [k] * len(found)
        self.val = self.split_validation(first["validation_split"], first["validation_seed"])
        self.repeats = [0 if i in self.val else self.subset(i)["num_repeats"] for i in range(len(self.items))]
        self.balance_regularisation()
        keep = [i for i in range(len(self.items)) if self.repeats[i] or i in self.val]  # unused reg images go
        self.val = {new for new, old in enumerate(keep) if old in self.val}
        self.items, self.subset_of, self.repeats = ([x[i] for i in keep] for x in (self.items, self.subset_of, self.repeats))
        sizes = dataset_buckets(first)
        self.buckets = [image_bucket(*image_size(p), sizes, first) for p, _ in self.items]  # (w, h) per image
        # the caption texts per image: a validation image uses its caption as written, unshuffled
        self.texts = [[make_caption(c, self.subset(i))] if i in self.val else caption_variants(c, self.subset(i), variants, seed)
                      for i, (_, c) in enumerate(self.items)]
        self.latents, self.text = {}, {}  # (index, flipped) -> (16, h, w); caption text -> (L, D)
        n_reg = sum(self.subset(i)["is_reg"] for i in range(len(self.items)))
        print(f"{len(self.items) - len(self.val)} training images ({n_reg} regularisation) + {len(self.val)} validation "
              f"in {len(set(self.buckets))} buckets, batch {self.batch_size}, from "
              + ", ".join(sub["image_dir"] or sub["metadata_file"] for sub in subsets))

    def subset(self, i):
        return self.subsets[self.subset_of[i]]

    def split_validation(self, split, seed):
        """The held-out indices: a `split` fraction of the non-reg images (>= 1 when split > 0), drawn from `seed` alone."""
        pool = [i for i in range(len(self.items)) if not self.subset(i)["is_reg"]]
        if split <= 0 or not pool:
            return set()
        n = len(pool) if split >= 1 else max(1, round(split * len(pool)))
        return {pool[k] for k in np.random.default_rng(seed).permutation(len(pool))[:n]}

    def balance_regularisation(self):
        """sd-scripts' is_reg rule: a pass at their num_repeats, then one repeat at a time until they match the training
        images' samples per epoch; those never reached go unused (sd-scripts' prior_loss_weight, 1, is not offered)."""
        reg = [i for i in range(len(self.items)) if self.subset(i)["is_reg"]]
        target = sum(r for i, r in enumerate(self.repeats) if not self.subset(i)["is_reg"])
        if not reg:
            return
        if target == 0:
            raise BadInput(f"{self.subset(reg[0])['table']}: is_reg images need training images in the same [[datasets]] to balance")
        for i in reg:
            self.repeats[i] = 0
        n, first = 0, True
        while n < target:
            for i in reg:
                add = self.subset(i)["num_repeats"] if first else 1
                self.repeats[i], n = self.repeats[i] + add, n + add
                if n >= target:
                    break
            first = False
        print(f"regularisation: {sum(self.repeats[i] > 0 for i in reg)} of {len(reg)} images give {n} samples per epoch "
              f"(training images: {target})")

    def flips(self, i):
        """Whether image i is also cached and trained mirrored: its subset's flip_aug, training images only."""
        return self.subset(i)["flip_aug"] and i not in self.val

    def __len__(self):
        return len(self.items)

    @torch.no_grad()
    def cache_latents(self, ae, device="cpu", batch_size=1, cache_dir=None, sample=False, dtype=torch.float32, ae_id=""):
        """Encode every image (and its mirror image with flip=True) once, in batches of one bucket: the posterior
        mean, or with sample=True one draw seeded by the entry's fingerprint (reproducible). Returns (reused, encoded)."""
        if cache_dir and not ae_id:
            warnings.warn("cache_latents without ae_id: a different AE file will not invalidate the disk cache")
        ae_dtype = str(next(ae.parameters()).dtype)
        todo, reused = {}, 0  # bucket -> [(key, fingerprint text, digest, file path)]
        for i, (path, _) in enumerate(self.items):
            st = os.stat(path)
            for flipped in ([False, True] if self.flips(i) else [False]):
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
                    save_file_atomic({"x": zi}, file, metadata={"fingerprint": text})
                self.latents[key] = file or zi.clone()

    def pixels(self, i, flipped):
        """Image i, bucketed -> (3, h, w) in [-1, 1], mirrored left-right when flipped."""
        path = self.items[i][0]
        x = to_tensor(resize_cover_crop(load_image(path), *self.buckets[i], path=path))
        return x.flip(-1) if flipped else x

    @torch.no_grad()
    def cache_text(self, text_encoder, system_prompt, max_length, cache_dir=None, te_id="", batch_size=8):
        """Encode every caption text in use (all variants) and "" for caption dropout (system prompt still applied), keeping
        the first min(max_length, encoder max) valid tokens (Gemma is causal: same as truncating) -> (reused, encoded)."""
        if cache_dir and not te_id:
            warnings.warn("cache_text without te_id: a different text-encoder file will not invalidate the disk cache")
        max_length = min(max_length, text_encoder.max_length)
        te_dtype = str(next(text_encoder.parameters()).dtype)
        todo, reused = [], 0
        for caption in sorted({t for texts in self.texts for t in texts} | {""}):
            text, digest = fingerprint(te=te_id, te_dtype=te_dtype, softcap=lumina2.GEMMA_SOFTCAP,
                                       system_prompt=system_prompt, max_length=max_length, caption=caption)
            file = os.path.join(cache_dir, "text", digest + ".safetensors") if cache_dir else None
            if file and cache_hit(file, text):
                self.text[caption], reused = file, reused + 1
            else:
                todo.append((caption, text, file))
        todo.sort(key=lambda t: len(t[0]))  # similar lengths together: less padding per batch
        jobs = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
        source = self.caption_sources()
        for job in tqdm(jobs, desc="encoding captions", disable=not jobs):
            captions = [c for c, _, _ in job]  # source names them in the truncation warning
            feats, mask = text_encoder(captions, system_prompt, [source[c] for c in captions])  # (B, L, D), (B, L)
            for (caption, text, file), f, m in zip(job, feats.cpu(), mask.cpu()):
                f = f[:min(int(m.sum()), max_length)].clone()  # (L_i, D) valid tokens only
                if file:
                    save_file_atomic({"x": f}, file, metadata={"fingerprint": text})
                self.text[caption] = file or f
        print(f"text cache: reused {reused} / encoded {len(todo)}")
        return reused, len(todo)

    def caption_sources(self):
        """caption text -> where it came from, for messages: the caption file of the first image using it, else that image."""
        source = {}
        for i, (path, _) in enumerate(self.items):
            sub = self.subset(i)
            file = os.path.splitext(path)[0] + sub["caption_extension"]
            where = file if sub["metadata_file"] is None and os.path.exists(file) else path
            for text in self.texts[i]:
                source.setdefault(text, where)
        source.setdefault("", "the empty caption (caption dropout)")
        return source

    def epoch_plan(self, batch_size, seed, epoch, caption_dropout=0.0):
        """The epoch as lists of (index, flipped, caption text), from (seed, epoch) only: each bucket's samples (repeats
        included) shuffled and batched (a short last batch is kept), batches shuffled, then per sample the flip, caption
        dropout (the subset's rate, else `caption_dropout`) and variant, each by its own generator so none shifts another."""
        order = np.random.default_rng([seed, epoch, 0])
        by_bucket = {}
        for i, b in enumerate(self.buckets):
            if self.repeats[i]:
                by_bucket.setdefault(b, []).extend([i] * self.repeats[i])
        batches = []
        for b in sorted(by_bucket):
            idx = [by_bucket[b][k] for k in order.permutation(len(by_bucket[b]))]
            batches += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
        batches = [batches[k] for k in order.permutation(len(batches))]
        n = sum(len(b) for b in batches)
        flips = np.random.default_rng([seed, epoch, 1]).random(n) < 0.5
        drops = np.random.default_rng([seed, epoch, 2]).random(n)
        picks = np.random.default_rng([seed, epoch, 3]).integers(0, 1 << 30, n)
        plan, k = [], 0
        for b in batches:
            batch = []
            for j, i in enumerate(b):
                rate = self.subset(i)["caption_dropout_rate"]
                dropped = drops[k + j] < (caption_dropout if rate is None else rate)
                text = "" if dropped else self.texts[i][picks[k + j] % len(self.texts[i])]
                batch.append((i, bool(flips[k + j]) and self.flips(i), text))
            plan.append(batch)
            k += len(b)
        return plan

    def len_batches(self, batch_size):
        """Batches per epoch: per bucket ceil(samples / batch_size), repeats included, validation images excluded."""
        samples = {}
        for b, r in zip(self.buckets, self.repeats):
            samples[b] = samples.get(b, 0) + r
        return sum(math.ceil(n / batch_size) for n in samples.values())

    def check_cached(self):
        if len(self.latents) < sum(1 + self.flips(i) for i in range(len(self.items))) or not self.text:
            raise RuntimeError("call cache_latents(ae, ...) and cache_text(text_encoder, ...) before batches()")

    def batches(self, batch_size, seed, epoch, caption_dropout=0.0, skip=0, rank=0, world=1):
        """Yield the epoch's batches as load() makes them, from batch `skip` on (exact resume: skipped ones are not
        loaded). With world > 1 processes a global batch holds batch_size x world samples and this rank gets its share."""
        self.check_cached()
        for batch in self.epoch_plan(batch_size * world, seed, epoch, caption_dropout)[skip:]:
            yield self.load(batch, rank, world)

    def load(self, batch, rank=0, world=1):
        """One batch of the plan -> dict: latents (B, 16, h, w) fp32, cap_feats (B, L, D) in the encoder's dtype, zero-padded to
        the longest caption, cap_mask (B, L) bool, cap_lens (the captions' lengths, host ints: the forward needs them and
        must not read them back from the device), captions (texts used, "" when dropped), paths. This rank's contiguous share
        starts at `start` of `global_size`; `weight` = share x world / global_size makes the mean over ranks of weight x (share
        mean) the global mean. A rank left with no sample gets the batch's first at weight 0: every rank must run backward."""
        n = len(batch)
        lo, hi = n * rank // world, n * (rank + 1) // world
        share = batch[lo:hi] or batch[:1]
        captions = [text for _, _, text in share]
        feats = [cache_get(self.text, c) for c in captions]
        L = max(f.shape[0] for f in feats)
        cap_feats = feats[0].new_zeros(len(feats), L, feats[0].shape[1])
        cap_mask = torch.zeros(len(feats), L, dtype=torch.bool)
        for j, f in enumerate(feats):
            cap_feats[j, :len(f)], cap_mask[j, :len(f)] = f, True
        return {"latents": torch.stack([cache_get(self.latents, (i, flipped)).float() for i, flipped, _ in share]),
                "cap_feats": cap_feats, "cap_mask": cap_mask, "cap_lens": [len(f) for f in feats], "captions": captions,
                "paths": [self.items[i][0] for i, _, _ in share],
                "global_size": n, "start": lo if hi > lo else 0, "weight": (hi - lo) * world / n}

    def validation_batches(self):
        """The validation images bucket by bucket, in index order, batch_size at a time, unflipped, captions as written."""
        self.check_cached()
        by_bucket = {}
        for i in sorted(self.val):
            by_bucket.setdefault(self.buckets[i], []).append(i)
        for _, idx in sorted(by_bucket.items()):
            for k in range(0, len(idx), self.batch_size):
                yield self.load([(i, False, self.texts[i][0]) for i in idx[k:k + self.batch_size]])


class DatasetGroup:
    """The datasets of one run. An epoch is one epoch of each: dataset k plans from seed + k, turns are drawn from (seed,
    epoch), so a batch never mixes datasets or buckets and one dataset alone trains exactly as that Dataset would."""
    def __init__(self, datasets):
        self.datasets = datasets
        if not any(any(ds.repeats) for ds in datasets):
            raise BadInput("no training images: every image is held out for validation")

    def __len__(self):
        """Training images (validation images and unused regularisation images excluded)."""
        return sum(r > 0 for ds in self.datasets for r in ds.repeats)

    def cache_latents(self, ae, **kwargs):
        done = [ds.cache_latents(ae, **kwargs) for ds in self.datasets]
        return sum(r for r, _ in done), sum(e for _, e in done)

    def cache_text(self, text_encoder, max_length, **kwargs):
        """Each dataset's captions under its own system prompt."""
        done = [ds.cache_text(text_encoder, ds.system_prompt, max_length, **kwargs) for ds in self.datasets]
        return sum(r for r, _ in done), sum(e for _, e in done)

    def len_batches(self, world=1):
        return sum(ds.len_batches(ds.batch_size * world) for ds in self.datasets)

    def epoch_plan(self, seed, epoch, world=1):
        """-> list of (dataset index, batch of that dataset's plan), every dataset's batches in its own order."""
        plans = [ds.epoch_plan(ds.batch_size * world, seed + k, epoch) for k, ds in enumerate(self.datasets)]
        turns = np.repeat(np.arange(len(plans)), [len(p) for p in plans])
        turns = np.random.default_rng([seed, epoch, 4]).permutation(turns)
        queues = [iter(p) for p in plans]
        return [(int(k), next(queues[k])) for k in turns]

    def batches(self, seed, epoch, skip=0, rank=0, world=1):
        """Yield the epoch's batches from batch `skip` on (see Dataset.batches and Dataset.load)."""
        for ds in self.datasets:
            ds.check_cached()
        for k, batch in self.epoch_plan(seed, epoch, world)[skip:]:
            yield self.datasets[k].load(batch, rank, world)

    def validation_batches(self):
        for ds in self.datasets:
            yield from ds.validation_batches()

    def has_validation(self):
        return any(ds.val for ds in self.datasets)


def build_datasets(subsets, variants=1, seed=0):
    """Subset dicts (read_dataset_config, or [folder_subset(...)]) -> DatasetGroup, one Dataset per [[datasets]]."""
    by_dataset = {}
    for s in subsets:
        by_dataset.setdefault(s["dataset"], []).append(s)
    return DatasetGroup([Dataset(subsets=group, variants=variants, seed=seed) for _, group in sorted(by_dataset.items())])

