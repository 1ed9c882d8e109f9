"""
sd-scripts' dataset config (TOML: [general], [[datasets]], [[datasets.subsets]]) -> subset dicts for data.build_datasets,
checked as a whole before any image is read: each key's table and type, refused keys (with the reason), buckets, sources.

    python -c "import dataset_toml; print(dataset_toml.read_dataset_config('my_dataset.toml'))"
"""
import difflib
import os
import tomllib

import data
from files import BadInput


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)  # TOML true is not the integer 1


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_side(v):
    return is_int(v) and v >= 16 and v % 16 == 0


BOOL = (lambda v: isinstance(v, bool), "true or false")
TEXT = (lambda v: isinstance(v, str), "a string")
PATH = (lambda v: isinstance(v, str) and v != "", "a non-empty path")
AT_LEAST_1 = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
RATE = (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
SIDE = (is_side, "a positive multiple of 16")

# Where a key goes: DATASET: one value per [[datasets]] ([general] or [[datasets]]); SUBSET: any table; OWN: a subset only
DATASET, SUBSET, OWN = "dataset", "subset", "own"

# Every supported key (its default and meaning: data.SUBSET_DEFAULTS): (where, (check, what the value must be)).
KEYS = {
    "resolution": (DATASET, (lambda v: is_side(v) or (isinstance(v, list) and len(v) == 2 and all(map(is_side, v))),
                             "a side or [width, height], positive multiples of 16")),
    "batch_size": (DATASET, AT_LEAST_1), "enable_bucket": (DATASET, BOOL), "min_bucket_reso": (DATASET, SIDE),
    "max_bucket_reso": (DATASET, SIDE), "bucket_reso_steps": (DATASET, SIDE), "bucket_no_upscale": (DATASET, BOOL),
    "validation_split": (DATASET, (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1] (1: every image of the dataset validates)")),
    "validation_seed": (DATASET, (is_int, "an integer")), "system_prompt": (DATASET, TEXT),
    "num_repeats": (SUBSET, AT_LEAST_1), "flip_aug": (SUBSET, BOOL),
    "caption_extension": (SUBSET, (lambda v: isinstance(v, str) and v.startswith("."), "an extension such as '.txt'")),
    "class_tokens": (SUBSET, TEXT), "shuffle_caption": (SUBSET, BOOL),
    "keep_tokens": (SUBSET, (lambda v: is_int(v) and v >= 0, "an integer >= 0")), "keep_tokens_separator": (SUBSET, TEXT),
    "caption_separator": (SUBSET, (lambda v: isinstance(v, str) and v != "", "a non-empty string")),
    "caption_prefix": (SUBSET, TEXT), "caption_suffix": (SUBSET, TEXT), "caption_dropout_rate": (SUBSET, RATE),
    "caption_tag_dropout_rate": (SUBSET, (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")),
    "image_dir": (OWN, PATH), "metadata_file": (OWN, PATH), "is_reg": (OWN, BOOL),
}

# sd-scripts' other dataset keys, refused by name with the reason, so none is silently ignored
REFUSED = {
    "color_aug": "it changes the pixels at every step, so latents could not be cached (sd-scripts refuses it with cached latents too)",
    "random_crop": "it crops differently at every step, so latents could not be cached; images are centre-cropped",
    "face_crop_aug_range": "it crops differently at every step, so latents could not be cached",
    "resize_interpolation": "images are always resized with LANCZOS (part of the latent cache's fingerprint)",
    "skip_image_resolution": "not implemented: move the small images to another folder",
    "secondary_separator": "not implemented: write the grouped tags with caption_separator",
    "enable_wildcard": "wildcards and multi-line captions pick text at every step; not implemented",
    "token_warmup_min": "token warm-up depends on the step; not implemented",
    "token_warmup_step": "token warm-up depends on the step; not implemented",
    "caption_dropout_every_n_epochs": "not implemented: use caption_dropout_rate",
    "cache_info": "not needed (image sizes come from the file headers, caches are keyed by fingerprints): remove the key",
    "alpha_mask": "the masked loss is not implemented",
    "conditioning_data_dir": "ControlNet datasets are not supported",
    "custom_attributes": "per-subset attributes (differential output preservation) are not implemented",
    "network_multiplier": "a per-dataset LoRA multiplier is not implemented",
}


def read_dataset_config(path, defaults=None):
    """A dataset config -> list of subset dicts, each with every key of KEYS resolved (nearest table wins: subset over dataset
    over [general] over `defaults`, train.py's constants as sd-scripts' flags, over data.SUBSET_DEFAULTS), plus `dataset`
    (index of its [[datasets]]), `table` (its name, for messages), `recursive` (False, as sd-scripts). One BadInput lists all."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise BadInput(f"dataset_config {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML: {e}") from None
    problems = []

    def bad(table, key, message):
        problems.append(f"{path}: {table}: {key!r} {message}")

    for key in doc:
        if key not in ("general", "datasets"):
            bad("top level", key, "is not a table of a dataset config (it has [general] and [[datasets]] with [[datasets.subsets]])")
    general = doc.get("general", {})
    if not isinstance(general, dict):
        bad("top level", "general", "must be a table: [general]")
        general = {}
    check_table(general, "[general]", (DATASET, SUBSET), bad)
    datasets = doc.get("datasets")
    if not (isinstance(datasets, list) and datasets and all(isinstance(d, dict) for d in datasets)):
        bad("top level", "datasets", "must be one or more [[datasets]] tables")
        datasets = []
    base = {**data.SUBSET_DEFAULTS, **known(defaults or {})}
    out = []
    for d, ds in enumerate(datasets):
        name = f"[[datasets]] #{d + 1}"
        check_table({k: v for k, v in ds.items() if k != "subsets"}, name, (DATASET, SUBSET), bad)
        subsets = ds.get("subsets")
        if not (isinstance(subsets, list) and subsets and all(isinstance(s, dict) for s in subsets)):
            bad(name, "subsets", "must be one or more [[datasets.subsets]] tables")
            continue
        merged_dataset = {**base, **known(general), **known(ds)}
        check_buckets(merged_dataset, name, bad)
        if merged_dataset["validation_split"] == 1 and any(s.get("is_reg") for s in subsets):
            bad(name, "validation_split", "= 1 holds out every training image, and its is_reg images need training images to balance")
        seen = {}
        for j, sub in enumerate(subsets):
            sname = f"{name} / [[datasets.subsets]] #{j + 1}"
            check_table(sub, sname, (SUBSET, OWN), bad)
            s = {**merged_dataset, **known(sub), "dataset": d, "table": sname, "recursive": False}
            check_sources(s, sub, sname, bad)
            source = (s["image_dir"], s["metadata_file"])
            if source in seen:  # sd-scripts drops a repeated subset silently; here it is an error
                bad(sname, "image_dir" if s["metadata_file"] is None else "metadata_file", f"repeats {seen[source]} of the same [[datasets]]")
            seen.setdefault(source, f"[[datasets.subsets]] #{j + 1}")
            out.append(s)
    if out and all(s["validation_split"] == 1 for s in out):
        bad("every [[datasets]]", "validation_split", "is 1: every image is held out for validation and none is left to train")
    if problems:
        raise BadInput("\n".join(problems))
    return out


def known(table):
    return {k: v for k, v in table.items() if k in KEYS}


def check_table(table, name, allowed, bad):
    """Each key of one table: refused, unknown, in the wrong table, or of the wrong type or range."""
    where = {DATASET: "[general] or [[datasets]]", SUBSET: "any table", OWN: "[[datasets.subsets]]"}
    for key, value in table.items():
        if key in REFUSED:
            bad(name, key, f"is an sd-scripts key this trainer does not support: {REFUSED[key]}")
        elif key not in KEYS:
            near = difflib.get_close_matches(key, list(KEYS) + list(REFUSED), n=1)
            bad(name, key, "is not a dataset config key" + (f" (did you mean {near[0]!r}?)" if near else ""))
        elif KEYS[key][0] not in allowed:
            bad(name, key, f"belongs in {where[KEYS[key][0]]}" + (" (here one system prompt per dataset: each dataset has one text cache)"
                                                                   if key == "system_prompt" else ""))
        elif not KEYS[key][1][0](value):
            bad(name, key, f"must be {KEYS[key][1][1]}, got {value!r}")


def check_buckets(s, name, bad):
    """The bucket settings of one dataset, after inheritance: ranges that fit the step and leave a bucket."""
    keys = ("resolution", "enable_bucket", "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")
    if not all(s[k] is None or KEYS[k][1][0](s[k]) for k in keys):
        return  # already reported
    step, lo, hi = s["bucket_reso_steps"], s["min_bucket_reso"], s["max_bucket_reso"]
    for key, v in (("min_bucket_reso", lo), ("max_bucket_reso", hi)):
        if v is not None and v % step:
            bad(name, key, f"must be a multiple of bucket_reso_steps ({step}), got {v}")
    if lo is not None and hi is not None and lo > hi:
        bad(name, "min_bucket_reso", f"({lo}) is larger than max_bucket_reso ({hi})")
    elif s["enable_bucket"] and not data.dataset_buckets(s):
        bad(name, "min_bucket_reso" if lo else "max_bucket_reso",
            f"leaves no bucket of area <= {s['resolution']}^2 with sides in [{lo}, {hi}]")


def check_sources(s, own, name, bad):
    """Where one subset's images come from: image_dir (a folder) and/or metadata_file (sd-scripts' JSON)."""
    if s["image_dir"] is None and s["metadata_file"] is None:
        bad(name, "image_dir", "is missing: a subset needs image_dir (a folder of images) or metadata_file")
    if isinstance(s["image_dir"], str) and not os.path.isdir(s["image_dir"]):
        bad(name, "image_dir", f"{s['image_dir']!r} does not exist or is not a folder")
    if isinstance(s["metadata_file"], str):
        for key in ("caption_extension", "class_tokens"):
            if key in own:
                bad(name, key, "has no effect with metadata_file (the captions come from the JSON file)")
        try:
            data.read_metadata(s["metadata_file"])
        except FileNotFoundError:
            bad(name, "metadata_file", f"{s['metadata_file']!r} does not exist")
        except BadInput as e:
            bad(name, "metadata_file", str(e))


def train_defaults(c):
    """train.py's dataset constants under sd-scripts' key names: train_data_dir's config, or the layer under [general]."""
    return {"resolution": c.resolution, "batch_size": c.train_batch_size, "num_repeats": c.num_repeats,
            "flip_aug": c.flip_aug, "caption_extension": c.caption_extension, "caption_dropout_rate": c.caption_dropout_rate,
            "system_prompt": c.system_prompt, "validation_split": c.validation_split, "validation_seed": c.validation_seed}
