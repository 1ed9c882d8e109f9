"""
Weight-file forensics: what a file is, whether its tensors are the model its shapes describe or a known preset less
some layers, whether a value is NaN or inf, and ComfyUI's scaled-fp8 layout. Each check reads the header alone (seconds
for the 2B) and says what to do; a file that passes loads through lumina2.py's plain loaders. train.py and sample.py use this.

    python -c "import weightfiles as wf; print(wf.inspect_dit('lumina_2_model_bf16.safetensors').config)"
    python -c "import weightfiles as wf; te = wf.load_text_encoder('gemma_2_2b_fp16.safetensors'); print(te(['a cat'])[0].shape)"
"""
import json
import os
import warnings
from collections import Counter
from functools import partial
from typing import NamedTuple

import torch

import lumina2
import memory
from files import BadInput


def open_safetensors(path):
    """-> (safe_open handle, metadata dict); a missing path, a folder, a truncated or non-safetensors file raise BadInput."""
    from safetensors import safe_open
    if os.path.isdir(path):
        inside = safetensors_in(path)
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise BadInput(f"{path} is a directory, not a weight file: pass the .safetensors file itself{hint}")
    if not os.path.exists(path):
        raise BadInput(f"weight file not found: {path} (check the path; a relative path is taken from {os.getcwd()})")
    if not os.path.isfile(path):
        raise BadInput(f"{path} is not a regular file (a device or a pipe?): pass the .safetensors file itself")
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise BadInput(f"{path} is not a readable safetensors file ({os.path.getsize(path):,} bytes; a truncated "
                       f"download or a .ckpt/.bin pickle?). Pass the .safetensors file itself. Reader said: {e}") from e
    return f, f.metadata() or {}


def safetensors_in(folder):
    """The first few .safetensors names in a folder, for the message of a folder passed as a file."""
    try:
        return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[:5]
    except OSError:
        return []


def describe(keys):
    """A guess at what a weight file is, from its tensor names, for error messages."""
    keys = set(keys)
    has = lambda *frags: any(all(fr in k for fr in frags) for k in keys)
    if has("text_encoders.") and has("diffusion_model."):
        return "a ComfyUI all-in-one checkpoint (DiT, Gemma and AE together)"
    if has("lora_down") or has("lora_A") or has("lora_up"):
        return "a LoRA file, not a base model"
    if has("post_feedforward_layernorm"):
        return "the Gemma-2 text encoder (gemma_2_2b_fp16.safetensors)"
    if has("decoder.conv_in") or has("decoder.up.0.block"):
        return "the FLUX autoencoder (ae.safetensors)"
    if has("cap_embedder.1.weight"):
        return "a Lumina 2 Next-DiT"
    if has("attn.to_q") and has("time_caption_embed"):
        return "a diffusers-format Lumina2Transformer2DModel (pass the original single file, e.g. lumina_2_model_bf16.safetensors)"
    if has("input_blocks.") or (has("down_blocks.") and has("attentions.")):
        return "an SD/SDXL UNet"
    if has("double_blocks."):
        return "a FLUX transformer"
    return f"an unknown model (first keys: {sorted(keys)[:3]})"


def find_prefix(keys, prefixes, marker, path, wanted):
    for prefix in prefixes:
        if prefix + marker in keys:
            return prefix
    raise BadInput(f"{path} does not look like {wanted}: it looks like {describe(keys)}. Check which file goes to which setting.")


class WeightFile(NamedTuple):
    """What a safetensors header says about the model stored in it; names are without the model's prefix."""
    path: str
    f: object  # the open safe_open handle; tensor data is read through it by checked_tensors alone
    prefix: str
    shapes: dict  # name -> shape tuple
    dtypes: dict  # name -> safetensors dtype string ("BF16", "F8_E4M3", ...)
    metadata: dict
    described: str  # describe() of the whole file


def read_header(path, prefixes, marker, wanted):
    """Read a weight file's header only: the names, shapes and dtypes under the first prefix that holds `marker`."""
    f, meta = open_safetensors(path)
    keys = set(f.keys())
    prefix = find_prefix(keys, prefixes, marker, path, wanted)
    slices = {k[len(prefix):]: f.get_slice(k) for k in keys if k.startswith(prefix)}
    return WeightFile(path, f, prefix, {k: tuple(s.get_shape()) for k, s in slices.items()},
                      {k: s.get_dtype() for k, s in slices.items()}, meta, describe(keys))


# the dtypes the loaders cast from (fp8 upcast exactly); integers or float64 mean a different kind of file or an edited one
FLOAT_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def fp8_scales(names, expected):
    """ComfyUI's "scaled fp8": a `scaled_fp8` marker; beside a quantised `<m>.weight`, an fp32 `<m>.scale_weight` and maybe
    a `<m>.scale_input` (unused once W = weight * scale_weight is upcast) -> ({weight: scale name}, the layout's other names)."""
    scales = {n[: -len("scale_weight")] + "weight": n for n in names if n.endswith(".scale_weight")}
    scales = {w: n for w, n in scales.items() if w in expected and n not in expected}
    extra = {n for n in names if n == "scaled_fp8" or (n.endswith(".scale_input") and n not in expected)}
    return scales, set(scales.values()) | extra


def listed(names, limit=5):
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} {names[:limit]}"


def check_tensors(wf, expected, skip=()):
    """The header's tensors against the model's {name: shape}: every name present and no other, the model's shapes, dtypes
    the loaders read. Raises BadInput listing every problem; -> {weight name: scale name} of ComfyUI's scaled-fp8 weights."""
    names = set(wf.shapes) - set(skip)
    scales, fp8_extra = fp8_scales(names, expected)
    names -= fp8_extra
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    wrong_shape = sorted(n for n in names & set(expected) if wf.shapes[n] != tuple(expected[n]))
    wrong_dtype = sorted(n for n in (names & set(expected)) | set(scales.values()) if wf.dtypes[n] not in FLOAT_DTYPES)
    problems = []
    if missing:
        problems.append(f"missing {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"{listed(wrong_shape)} of the wrong shape: " +
                        ", ".join(f"{n} is {wf.shapes[n]} where the model has {tuple(expected[n])}" for n in wrong_shape[:5]))
    if wrong_dtype:
        problems.append(f"{listed(wrong_dtype)} of a dtype that is not a weight's: " +
                        ", ".join(f"{n} is {wf.dtypes[n]}" for n in wrong_dtype[:5]) + f" (weights are {'/'.join(FLOAT_DTYPES)})")
    if problems:
        raise BadInput(f"{wf.path} ({wf.described}) does not match the model its shapes describe: {'; '.join(problems)}. "
                       f"A damaged, edited or different file: re-download it or pass the original.")
    return scales


def descale(t, scale):
    """A scaled-fp8 weight times its scale (one per tensor, or per output row), in fp32: rounded once, by the cast after."""
    scale = scale.float()
    return t.float() * (scale if scale.numel() == 1 else scale.reshape(-1, *[1] * (t.dim() - 1)))


def nonfinite_count(t):
    """NaN/inf values in a tensor as stored. One fp32 sum (NaN/inf if any element is) screens it with no tensor-sized mask;
    only a tensor failing that (or overflowing it) is counted elementwise, fp8 upcast first (isfinite has no fp8 kernel)."""
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return 0
    return int((~torch.isfinite(t.float() if t.dtype in memory.FP8_DTYPES else t)).sum())


def read_finite(wf, name):
    """One tensor's data, refused if any value is NaN or inf: such a file would train or sample garbage silently."""
    t = wf.f.get_tensor(wf.prefix + name)
    if bad := nonfinite_count(t):
        raise BadInput(f"{wf.path} has {bad:,} NaN/inf values in {name}: the file is damaged; re-download it")
    return t


class Checked(NamedTuple):
    """A weight file that passed every header check, and what loading it needs."""
    file: WeightFile
    config: object  # NextDiT / AutoEncoder kwargs, or a Gemma2Config
    shapes: dict  # {name: shape} of the model's tensors, each in the file
    scales: dict  # {weight name: scale name} of scaled-fp8 weights
    tokenizer: bytes = None  # Gemma's SentencePiece model


def checked_tensors(c):
    """A checked file as {name: a function reading the tensor} for lumina2's loaders: NaN/inf refused, scaled-fp8
    weights descale()d."""
    def read(name):
        t = read_finite(c.file, name)
        return descale(t, read_finite(c.file, c.scales[name])) if name in c.scales else t
    return {name: partial(read, name) for name in c.shapes}


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_on_meta(cls, config, wf):
    """cls(**config) on the meta device. Shapes that agree on sizes no model has (a width that is no multiple of
    the head size, say) fail to build: that is the file's fault, so it is a BadInput."""
    try:
        with torch.device("meta"):
            return cls(**config)
    except (AssertionError, ValueError, RuntimeError, IndexError) as e:
        raise BadInput(f"{wf.path} ({wf.described}): its tensor shapes describe no buildable {cls.__name__} ({config}; "
                       f"{e or type(e).__name__}). A damaged or edited file: re-download it.") from e


# -----------------------------------------------------------------------------
# the config a file's shapes describe, each value the majority of its witnesses: one damaged tensor is outvoted and blamed alone

def majority(values, default):
    """The value most witnesses agree on; `default` when none is present. A tie (two witnesses, one damaged) goes
    to `default` if it is among the tied values (the usual size: cap_feat_dim = dim), else to the first listed."""
    counts = Counter(v for v in values if v > 0)
    if not counts:
        return default
    top = max(counts.values())
    tied = [v for v, n in counts.items() if n == top]
    return default if default in tied else tied[0]


def sizes(shapes, names, axis):
    """shapes[n][axis] of each name present with that axis (a tensor of the wrong rank just does not vote)."""
    return [shapes[n][axis] for n in names if n in shapes and len(shapes[n]) > axis]


def ending(shapes, starts, ends):
    """The names under any of the prefixes `starts` that end with any of `ends`, sorted."""
    return sorted(k for k in shapes if k.startswith(starts) and k.endswith(ends))


def block_count(shapes, starts):
    """1 + the highest block index under any of `starts`; a block gone in the middle still counts, so it is reported missing."""
    found = [int(i) for k in shapes for s in starts if k.startswith(s) and (i := k[len(s):].split(".")[0]).isdigit()]
    return max(found) + 1 if found else 0


DIT_BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")


def dit_config_from_shapes(shapes):
    """Recover NextDiT's constructor arguments from tensor shapes (patch 2, qk_norm assumed). A value no tensor
    witnesses falls back to the 2B's, so that the shape check can name what is missing."""
    blocks = lambda *ends: ending(shapes, DIT_BLOCKS, ends)
    dim = majority(sizes(shapes, ["x_embedder.weight", "x_embedder.bias", "cap_embedder.1.weight", "cap_embedder.1.bias",
                                  "norm_final.weight", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"], 0)
                   + sizes(shapes, ["final_layer.linear.weight"], 1)
                   + sizes(shapes, blocks(".attention.out.weight", "norm1.weight", "norm2.weight", ".feed_forward.w2.weight"), 0)
                   + sizes(shapes, blocks(".attention.qkv.weight", ".feed_forward.w1.weight", ".feed_forward.w3.weight"), 1), 2304)
    head_dim = majority(sizes(shapes, blocks(".attention.q_norm.weight", ".attention.k_norm.weight"), 0), 96)
    hidden = majority(sizes(shapes, blocks(".feed_forward.w1.weight", ".feed_forward.w3.weight"), 0)
                      + sizes(shapes, blocks(".feed_forward.w2.weight"), 1), lumina2.ffn_hidden_dim(dim, 256, None))
    qkv_rows = majority(sizes(shapes, blocks(".attention.qkv.weight"), 0), dim + 2 * 8 * head_dim)
    cap_feat_dim = majority(sizes(shapes, ["cap_embedder.0.weight"], 0) + sizes(shapes, ["cap_embedder.1.weight"], 1), dim)
    patch_in = majority(sizes(shapes, ["x_embedder.weight"], 1) + sizes(shapes, ["final_layer.linear.weight", "final_layer.linear.bias"], 0), 64)
    a = head_dim // 3 // 2 * 2  # axes split: (32, 32, 32) for head_dim 96, (8, 4, 4) for 16
    if hidden == lumina2.ffn_hidden_dim(dim, 256, None):
        multiple_of, mult = 256, None
    else:  # round_up(int(mult * 4 dim), hidden) == hidden reproduces any width
        multiple_of, mult = hidden, (None if hidden >= 4 * dim else hidden / (4 * dim))
    return dict(patch_size=2, in_channels=patch_in // 4, dim=dim, n_layers=block_count(shapes, ["layers."]),
                n_refiner_layers=block_count(shapes, ["noise_refiner.", "context_refiner."]), n_heads=dim // head_dim,
                n_kv_heads=(qkv_rows - dim) // (2 * head_dim), multiple_of=multiple_of, ffn_dim_multiplier=mult,
                norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap_feat_dim, axes_dims=(head_dim - 2 * a, a, a), axes_lens=(300, 512, 512))


def layers_left(config, preset):
    """"25 of its 26 main layers (layers.25.* missing)", and the same for the refiners, for a preset less layers."""
    parts = []
    for key, what, prefixes in (("n_layers", "main", ["layers"]), ("n_refiner_layers", "refiner", ["noise_refiner", "context_refiner"])):
        have, full = config[key], preset[key]
        if have < full:
            gone = [f"{p}.{have}.*" if full - have == 1 else f"{p}.{have}-{full - 1}.*" for p in prefixes]
            parts.append(f"{have} of its {full} {what} layers ({', '.join(gone)} missing)")
    return " and ".join(parts)


def ffn_width_only(config):
    """A NextDiT config with multiple_of and ffn_dim_multiplier replaced by the FFN width they give: different
    pairs build the same model (the tiny preset's 16 and the 256 read back from its file), so only the width compares."""
    config = dict(config, ffn_hidden=lumina2.ffn_hidden_dim(config["dim"], config["multiple_of"], config["ffn_dim_multiplier"]))
    del config["multiple_of"], config["ffn_dim_multiplier"]
    return config


def check_dit_preset(config, path):
    """A known preset less some layers is refused (a truncated or edited 2B would silently load as a smaller model); any
    other non-preset loads with one warning naming the nearest preset and the differences (custom is fine, a surprise not)."""
    config = ffn_width_only(config)
    presets = {name: ffn_width_only(preset) for name, preset in lumina2.DIT_PRESETS.items()}
    diffs = {name: [k for k in preset if config[k] != preset[k]] for name, preset in presets.items()}
    if not all(diffs.values()):
        return
    for name, keys in diffs.items():
        preset = presets[name]
        if set(keys) <= {"n_layers", "n_refiner_layers"} and all(config[k] <= preset[k] for k in keys):
            raise BadInput(f"{path} looks like the {name} Next-DiT with {layers_left(config, preset)}: a truncated or edited "
                           f"file? Re-download it, or pass the original {name} file.")
    name = min(diffs, key=lambda n: len(diffs[n]))
    how = ", ".join(f"{k}={config[k]} where {name} has {presets[name][k]}" for k in diffs[name])
    warnings.warn(f"{path} is not a known Lumina 2 preset: {how}. It loads as the model its shapes describe; if you "
                  f"meant the {name} model, this is the wrong file.", stacklevel=4)


def inspect_dit(path):
    """load_dit's checks, from the header alone, in the order a message is most useful: what it is, its tensors, its preset
    -> Checked. Raises BadInput for a missing, unreadable, wrong, fewer-layer or damaged file; warns for a non-preset."""
    wf = read_header(path, lumina2.DIT_PREFIXES, "cap_embedder.1.weight", "a Lumina 2 Next-DiT (lumina_2_model_bf16.safetensors)")
    config = dit_config_from_shapes(wf.shapes)
    shapes = shapes_of(build_on_meta(lumina2.NextDiT, config, wf))
    scales = check_tensors(wf, shapes)
    check_dit_preset(config, path)
    return Checked(wf, config, shapes, scales)


def load_dit(path, dtype=torch.bfloat16, device="cpu"):
    """lumina_2_model_bf16.safetensors / lumina-image-2.safetensors / an all-in-one checkpoint -> NextDiT, checked."""
    c = inspect_dit(path)
    return lumina2.load_dit(checked_tensors(c), c.config, dtype, device)


def ae_config_from_shapes(shapes):
    """The FLUX AE's constructor arguments from tensor shapes, each by majority as for the DiT."""
    ch = majority(sizes(shapes, ["encoder.conv_in.weight", "encoder.conv_in.bias", "encoder.down.0.block.0.norm1.weight"], 0)
                  + sizes(shapes, ["encoder.down.0.block.0.conv1.weight"], 1), 128)
    levels = block_count(shapes, ["encoder.down.", "decoder.up."])
    res_blocks = majority([block_count(shapes, [f"encoder.down.{i}.block."]) for i in range(levels)]
                          + [block_count(shapes, [f"decoder.up.{i}.block."]) - 1 for i in range(levels)], 2)
    # every tensor of level i that is as wide as its output: ch * ch_mult[i] channels, in the encoder and decoder alike
    outputs = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "norm2.weight", "norm2.bias", "nin_shortcut.weight",
               "nin_shortcut.bias", "sample.conv.weight", "sample.conv.bias")
    widths = [majority(sizes(shapes, ending(shapes, (f"encoder.down.{i}.", f"decoder.up.{i}."), outputs), 0), ch) for i in range(levels)]
    return dict(ch=ch, ch_mult=tuple(max(w // ch, 1) for w in widths), num_res_blocks=res_blocks,
                z_channels=majority(sizes(shapes, ["decoder.conv_in.weight"], 1)
                                    + [n // 2 for n in sizes(shapes, ["encoder.conv_out.weight", "encoder.conv_out.bias"], 0)], 16),
                in_channels=majority(sizes(shapes, ["encoder.conv_in.weight"], 1), 3),
                out_ch=majority(sizes(shapes, ["decoder.conv_out.weight", "decoder.conv_out.bias"], 0), 3))


def inspect_ae(path):
    """load_ae's checks, from the header alone: what it is, then its tensors against the model they describe -> Checked."""
    wf = read_header(path, lumina2.AE_PREFIXES, "decoder.conv_in.weight", "the FLUX autoencoder (ae.safetensors)")
    config = ae_config_from_shapes(wf.shapes)
    shapes = shapes_of(build_on_meta(lumina2.AutoEncoder, config, wf))
    return Checked(wf, config, shapes, check_tensors(wf, shapes))


def load_ae(path, dtype=torch.bfloat16, device="cpu"):
    """ae.safetensors (BFL layout, also under a vae. prefix) -> AutoEncoder, checked."""
    c = inspect_ae(path)
    return lumina2.load_ae(checked_tensors(c), c.config, dtype, device)


def gemma_file_keys(config):
    """name -> shape of every tensor a Gemma-2 file holds under `model.` (built on the meta device)."""
    from transformers import Gemma2Model
    with torch.device("meta"):
        return shapes_of(Gemma2Model(lumina2.gemma_config(**config.to_dict())))


def gemma_config_of(wf):
    """gemma-2-2b's config, or the one in the file's `gemma2_config` metadata (tiny test files carry one)."""
    try:
        return lumina2.gemma_config(**json.loads(wf.metadata.get("gemma2_config", "{}")))
    except (ValueError, TypeError) as e:
        raise BadInput(f"{wf.path}: its gemma2_config metadata is not a Gemma-2 config ({e}); re-download the file") from e


def tokenizer_proto(wf, tokenizer):
    """The SentencePiece model: from `tokenizer` (a tokenizer.model file or a folder holding one) if given, else the
    file's embedded `spiece_model` tensor (small: the one tensor read before the checks pass). Checked to parse."""
    if tokenizer is not None:
        source = os.path.join(tokenizer, "tokenizer.model") if os.path.isdir(tokenizer) else tokenizer
        if not os.path.isfile(source):
            raise BadInput(f"tokenizer not found: {source} (pass a tokenizer.model file or a folder holding one)")
        with open(source, "rb") as fh:
            proto = fh.read()
    else:
        spiece = next((k for k in lumina2.SPIECE_KEYS if k in wf.f.keys()), None)
        if spiece is None:
            raise BadInput(f"{wf.path} holds no `spiece_model` tokenizer tensor; pass tokenizer=<folder with tokenizer.model>")
        source = f"{wf.path}'s {spiece} tensor"
        proto = wf.f.get_tensor(spiece).numpy().tobytes()
    import sentencepiece
    try:
        sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise BadInput(f"{source} is not a SentencePiece tokenizer ({len(proto):,} bytes that do not parse): "
                       f"a damaged file; re-download it") from e
    return proto


def inspect_text_encoder(path, tokenizer=None, max_length=256):
    """load_text_encoder's checks from the header: what it is, its config, its tokenizer (must parse), its tensors -> Checked."""
    wf = read_header(path, lumina2.GEMMA_PREFIXES, "layers.0.post_feedforward_layernorm.weight", "the Gemma-2 text encoder (gemma_2_2b_fp16.safetensors)")
    config = gemma_config_of(wf)
    proto = tokenizer_proto(wf, tokenizer)
    shapes = gemma_file_keys(config)
    return Checked(wf, config, shapes, check_tensors(wf, shapes, skip=lumina2.SPIECE_KEYS), proto)


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", tokenizer=None, max_length=256):
    """gemma_2_2b_fp16.safetensors (or an all-in-one checkpoint) -> TextEncoder, checked; tokenizer as in tokenizer_proto."""
    c = inspect_text_encoder(path, tokenizer, max_length)
    return lumina2.load_text_encoder(checked_tensors(c), c.config, dtype, device, tokenizer=c.tokenizer, max_length=max_length)
