"""
LoRA for the Lumina 2 Next-DiT: a wrapper Linear, injection with per-component ranks, merging, and the three file
layouts users bring (kohya/sd-scripts, ComfyUI/diffusion-pipe, diffusers/PEFT). References (read, not copied): the LoRA
paper (Hu et al. 2021); kohya-ss/sd-scripts networks/lora_lumina.py (the `lora_unet_*` layout, targets, per-component
ranks, dropout semantics); diffusers loaders/lora_conversion_utils.py and single_file_utils.py (module names); minLoRA.

A LoRA on a Linear W (out, in) is down (r, in), up (out, r), alpha: dW = up @ down * alpha / r * multiplier. A LoRALinear
owns its trained tensors (trained()) and their names in a file (NAMES), which training, block swap, fp8, saving, reading and
merging ask: a variant (DoRA, LoKr) is a subclass and one entry in VARIANTS, passed as `cls` to inject.
Training: lora.inject(model, rank=16); AdamW(lora.lora_parameters(model)); lora.save_lora(model, "my.safetensors").

    python -c "import lumina2, lora; m = lumina2.load_dit('lumina_2_model_bf16.safetensors'); print(lora.apply_lora_files(m, ['style.safetensors;0.8']))"
"""
import json
import math
import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

import memory
import weightfiles
from files import BadInput, save_file_atomic

# -----------------------------------------------------------------------------
# the module


class LoRALinear(nn.Module):
    """Stands in for a Linear: `weight` and `bias` are the base's own Parameters, so base state_dict keys
    (`layers.0.attention.qkv.weight`) stay; down/up are fp32 (the optimizer's master copy), cast to x's dtype in forward."""

    # each part's name in a file, after the module's own name, per save layout (SAVE_LAYOUTS)
    NAMES = {"kohya": {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"},
             "diffusion_model": {"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha"}}

    def __init__(self, base, rank, alpha=None, dropout=0.0, rank_dropout=0.0, module_dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.multiplier = rank, float(alpha or rank), 1.0
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        dev = base.weight.device  # "meta" works too: the names test builds the 2B model there
        self.lora_down = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # dW = 0 at step 0: training starts from the base model
        self.merged, self.merged_multiplier = False, 0.0
        self.register_buffer("scale_weight", getattr(base, "scale_weight", None))  # set when the base is fp8 (memory.py)

    @property
    def scale(self):
        return self.alpha / self.rank * self.multiplier

    def forward(self, x):
        y = memory.linear(x, self.weight, self.bias, self.scale_weight)  # an fp8 base goes through memory's fp8 matmul
        if self.merged or self.multiplier == 0:
            return y
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return y  # module dropout: this step skips the whole LoRA
        h = F.linear(x, self.lora_down.weight.to(x.dtype))  # (..., r)
        scale = self.scale
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout)
        if self.training and self.rank_dropout > 0:
            # per sample, drop whole rank channels and rescale so the expected update is unchanged
            keep = torch.rand(h.shape[0], *[1] * (h.dim() - 2), self.rank, device=h.device) >= self.rank_dropout
            h = h * keep.to(h.dtype)
            scale = scale / (1 - self.rank_dropout)
        return y + F.linear(h, self.lora_up.weight.to(h.dtype)) * scale

    def trained(self):
        """The trained tensors by part name: what the optimizer steps and block swap leaves on the device."""
        return {"down": self.lora_down.weight, "up": self.lora_up.weight}

    def parts(self):
        """Everything a file holds of this module, by part name (tensors, and alpha as a float)."""
        return {**self.trained(), "alpha": self.alpha}

    @torch.no_grad()
    def load_parts(self, parts):
        for name, p in self.trained().items():
            p.copy_(parts[name])

    @staticmethod
    def delta(parts, multiplier, weight):
        """dW = up @ down * alpha / r * multiplier: (out, in) fp32 on the weight's device (a variant may use the weight)."""
        down, up = (parts[k].to(weight.device, torch.float32) for k in ("down", "up"))
        return up @ down * (parts["alpha"] / down.shape[0] * multiplier)

    def delta_weight(self):
        return self.delta(self.parts(), self.multiplier, self.weight)

    @torch.no_grad()
    def merge(self):
        """Fold dW into the (shared) base weight; forward then skips the LoRA path."""
        if not self.merged:
            add_delta(self.weight, self.delta_weight())
            self.merged, self.merged_multiplier = True, self.multiplier

    @torch.no_grad()
    def unmerge(self):
        """Undo merge (at its multiplier): exact up to one rounding in fp32; in bf16 the merge rounding does not come back."""
        if self.merged:
            add_delta(self.weight, -self.delta(self.parts(), self.merged_multiplier, self.weight))
            self.merged = False

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}, multiplier={self.multiplier}"


@torch.no_grad()
def add_delta(weight, dw):
    """weight (out, in) += dw (fp32), rounded once to its dtype as sd-scripts merges; fp8 is refused (see the message)."""
    if weight.dtype in memory.FP8_DTYPES:
        raise ValueError("cannot merge a LoRA into an fp8 base weight: most of the LoRA's delta is below fp8's resolution "
                         "(steps of 1/16 to 1/8 of each weight) and would be lost. Merge into the bf16 weights first, then "
                         "quantise (memory.prepare(model, device, fp8=True) after lora.apply_lora_files), or keep the "
                         "LoRA unmerged (merge=False) on the fp8 base.")
    weight.copy_((weight.float() + dw).to(weight.dtype))


VARIANTS = {"lora": LoRALinear}  # the class of each "lora_variant" a file's metadata may name; none named: "lora"


def variant_of(meta, path):
    """The LoRA class a file was saved from, by its "lora_variant" metadata."""
    name = meta.get("lora_variant", "lora")
    if name not in VARIANTS:
        raise BadInput(f"{path} holds a LoRA variant {name!r} that lora.VARIANTS does not know ({', '.join(VARIANTS)}): "
                       "add its class there to read it")
    return VARIANTS[name]


# -----------------------------------------------------------------------------
# which Linears get a LoRA, at which rank

BLOCKS = ("layers.", "noise_refiner.", "context_refiner.", "final_layer.")  # the default targets (SPEC §7)
TRAIN_BLOCKS = {"all": BLOCKS, "transformer": ("layers.",), "refiners": ("noise_refiner.", "context_refiner."),
                "noise_refiner": ("noise_refiner.",), "context_refiner": ("context_refiner.",)}
EMBEDDERS = ("x_embedder", "t_embedder.", "cap_embedder.")  # index into embedder_dims [x, t, cap]


def adapter_tensors(model):
    """ids of every LoRA module's trained tensors: what fp8, block swap and the search for Linears leave alone."""
    return {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in m.trained().values()}


def linear_paths(model):
    """path -> module for every Linear a LoRA can sit on (a LoRALinear counts, the Linears inside it do not)."""
    own = adapter_tensors(model)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and id(m.weight) not in own)}


def rank_for(path, rank, attn_dim, mlp_dim, mod_dim, refiner_dim, embedder_dims, blocks):
    """The rank a module gets (0: none): the first given option naming it wins, as in sd-scripts (attention, mlp, modulation,
    refiner), but mlp_dim also reaches layers.*.feed_forward (never in sd-scripts) and t_embedder takes only embedder_dims."""
    for i, prefix in enumerate(EMBEDDERS):
        if path.startswith(prefix):
            return 0 if embedder_dims is None else int(embedder_dims[i])
    if not path.startswith(blocks):
        return 0
    for dim, applies in ((attn_dim, ".attention." in path),
                         (mlp_dim, path.startswith("layers.") and ".feed_forward." in path),
                         (mod_dim, "adaLN_modulation" in path),
                         (refiner_dim, path.startswith(("noise_refiner.", "context_refiner.")))):
        if dim is not None and applies:
            return int(dim)
    return rank


def wrap(model, path, rank, alpha, cls=None, **dropouts):
    """Swap the Linear at `path` for a LoRALinear (or the variant cls) around it; returns the new module."""
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent)
    lora = (cls or LoRALinear)(getattr(owner, child), rank, alpha, **dropouts)
    setattr(owner, child, lora)
    return lora


def inject(model, rank=8, alpha=None, attn_dim=None, mlp_dim=None, mod_dim=None, refiner_dim=None,
           embedder_dims=None, train_blocks="all", dropout=0.0, rank_dropout=0.0, module_dropout=0.0, cls=None):
    """Freeze the base, wrap the target Linears -> {path: LoRALinear}: every Linear in layers.*, noise_refiner.*,
    context_refiner.*, final_layer.* (180 on the 2B), narrowed by train_blocks (sd-scripts' names); embedders only with
    embedder_dims=[x, t, cap]. Per-component dims: None = `rank`, 0 = none; alpha=None: alpha = rank, a number is shared."""
    if train_blocks not in TRAIN_BLOCKS:
        raise ValueError(f"train_blocks must be one of {sorted(TRAIN_BLOCKS)}, got {train_blocks!r}")
    if embedder_dims is not None and len(embedder_dims) != 3:
        raise ValueError(f"embedder_dims takes three ranks [x, t, cap], got {embedder_dims!r}")
    if (cls or LoRALinear) not in VARIANTS.values():
        raise ValueError(f"{cls.__name__} is not in lora.VARIANTS: add it there, so that its saved files read back as {cls.__name__}")
    model.requires_grad_(False)
    out = {}
    for path, module in linear_paths(model).items():
        r = rank_for(path, rank, attn_dim, mlp_dim, mod_dim, refiner_dim, embedder_dims, TRAIN_BLOCKS[train_blocks])
        if r <= 0:
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"{path} already has a LoRA")
        out[path] = wrap(model, path, r, alpha, cls, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
    return out


def lora_modules(model):
    """{path: LoRALinear}, in module order (the order of lora_parameters and of the saved file)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    """The trainable tensors: every LoRA module's trained() tensors (fp32), in module order."""
    return [p for m in lora_modules(model).values() for p in m.trained().values()]


def merge(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model):
    for m in lora_modules(model).values():
        m.unmerge()


# -----------------------------------------------------------------------------
# saving

# a file's name of a module, per layout: kohya (sd-scripts, ComfyUI) or diffusion_model (ComfyUI, diffusion-pipe, diffusers)
SAVE_LAYOUTS = {"kohya": lambda path: "lora_unet_" + path.replace(".", "_"), "diffusion_model": lambda path: "diffusion_model." + path}


def lora_state_dict(model, layout="kohya", dtype=None):
    """{file key: tensor} by SAVE_LAYOUTS[layout] and NAMES, cast to dtype (None: kept); alpha fp32 (0.3 not rounded to bf16)."""
    if layout not in SAVE_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, SAVE_LAYOUTS))}, got {layout!r}")
    sd = {}
    for path, m in lora_modules(model).items():
        for part, v in m.parts().items():
            key = f"{SAVE_LAYOUTS[layout](path)}.{m.NAMES[layout][part]}"
            sd[key] = v.detach().to(dtype or v.dtype) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float32)
    if not sd:
        raise ValueError("the model has no LoRA modules (call lora.inject first)")
    return sd


def save_lora(model, path, layout="kohya", metadata=None, dtype=torch.bfloat16):
    """Write the LoRA as safetensors, atomically, tensors cast to dtype (alpha stays fp32), plus `metadata` as strings."""
    sd = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model, layout, dtype).items()}
    modules = lora_modules(model).values()
    meta = {"ss_network_module": "networks.lora_lumina",  # the sd-scripts layout, so its tools take the file
            "ss_network_dim": str(Counter(m.rank for m in modules).most_common(1)[0][0]),
            "ss_network_alpha": str(Counter(m.alpha for m in modules).most_common(1)[0][0]),
            "ss_base_model_version": "lumina2", "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "lumina-2/lora"}
    kind = {v: k for k, v in VARIANTS.items()}.get(type(next(iter(modules))))
    if kind != "lora":  # plain LoRA files stay as sd-scripts writes them
        meta["lora_variant"] = kind
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    save_file_atomic(sd, path, metadata=meta)


# -----------------------------------------------------------------------------
# reading the three layouts

# diffusers Lumina2Transformer2DModel name fragment -> ours, applied in order (q/k/v are handled apart)
DIFFUSERS_NAMES = [("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                   ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                   ("time_caption_embed.caption_embedder.", "cap_embedder."),
                   ("norm_out.linear_1", "final_layer.adaLN_modulation.1"), ("norm_out.linear_2", "final_layer.linear"),
                   (".attn.to_out.0", ".attention.out"), (".feed_forward.linear_", ".feed_forward.w"),
                   (".norm1.linear", ".adaLN_modulation.1")]


def module_for(stem, kohya_names):
    """A key stem -> (our module path, part), part 'q'/'k'/'v' for diffusers' split attention, else None."""
    if stem.startswith("lora_unet_"):
        # underscores are ambiguous (adaLN_modulation, feed_forward), so match against the model's names
        return kohya_names.get(stem), None
    if stem.startswith("diffusion_model."):
        return stem[len("diffusion_model."):], None
    if stem.startswith("transformer."):
        path = stem[len("transformer."):]
        qkv = re.fullmatch(r"(.+)\.attn\.to_([qkv])", path)
        if qkv:
            return qkv[1] + ".attention.qkv", qkv[2]
        for theirs, ours in DIFFUSERS_NAMES:
            path = path.replace(theirs, ours)
        return path, None
    return None, None


def peft_alpha(metadata):
    """diffusers writes PEFT's LoraConfig into the metadata; -> rank -> alpha (None when absent: alpha = rank)."""
    cfg = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    if cfg.get("transformer.alpha_pattern") or cfg.get("transformer.use_dora"):
        raise ValueError("PEFT alpha_pattern / DoRA LoRAs are not supported")
    alpha = cfg.get("transformer.lora_alpha")
    if alpha is None:
        return None
    return lambda r: alpha * math.sqrt(r) if cfg.get("transformer.use_rslora") else alpha


def fuse_qkv(parts, sizes, path):
    """diffusers' separate to_q/to_k/to_v LoRAs -> one LoRA on our qkv (rows q | k | v). A shared down (diffusers' form of
    a fused LoRA) stays rank r, up = cat(B_q, B_k, B_v); else the exact form has rank r_q + r_k + r_v: down = cat(A_q, A_k,
    A_v), up = blockdiag(B_q s_q, B_k s_k, B_v s_v) (s = alpha / r), alpha = that rank; a missing part gives zero rows."""
    got = [parts.get(p) for p in "qkv"]
    for p, part, n in zip("qkv", got, sizes):
        if part is not None and part["up"].shape[0] != n:
            raise ValueError(f"{path} ({p}): lora_B has {part['up'].shape[0]} rows, this model's {p} has {n}")
    first = got[0]
    if all(g is not None and torch.equal(g["down"], first["down"]) and g["alpha"] == first["alpha"] for g in got):
        return dict(first, up=torch.cat([g["up"] for g in got]))
    down = torch.cat([g["down"] for g in got if g is not None])
    ups = [g["up"] * (g["alpha"] / g["down"].shape[0]) if g is not None else torch.zeros(n, 0) for g, n in zip(got, sizes)]
    return {"down": down, "up": torch.block_diag(*ups), "alpha": float(down.shape[0])}


def parse_lora(sd, model, metadata=None, source="the LoRA", cls=None):
    """{key: tensor} in any of the three layouts -> {module path: {"down": (r, in), "up": (out, r) fp32, "alpha": float, and a
    variant's own parts}}. Strict: a key naming no Linear of `model` is an error (a LoRA that silently loads half is worse)."""
    cls = cls or LoRALinear
    suffixes = {"." + name: part for names in cls.NAMES.values() for part, name in names.items()}
    needed = sorted(set(next(iter(cls.NAMES.values()))) - {"alpha"})
    if not any(k.endswith(tuple(suffixes)) for k in sd):
        raise ValueError(f"{source} is not a LoRA file (no {'/'.join(s[1:].removesuffix('.weight') for s in suffixes if s != '.alpha')} tensors): "
                         f"it looks like {weightfiles.describe(sd.keys())}")
    linears = linear_paths(model)
    kohya_names = {"lora_unet_" + p.replace(".", "_"): p for p in linears}
    default_alpha = peft_alpha(metadata or {})
    found, unknown = {}, []
    for key, t in sd.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        path, part = module_for(key[: -len(suffix)], kohya_names) if suffix else (None, None)
        if path not in linears:
            unknown.append(key)
            continue
        found.setdefault((path, part), {})[suffixes[suffix]] = t.float()
    if unknown:
        hint = " (text-encoder LoRAs, lora_te_*, are not supported)" if any(k.startswith("lora_te") for k in unknown) else ""
        raise ValueError(f"{source}: {len(unknown)} keys name no Linear of this model{hint}: {sorted(unknown)[:8]}")
    pieces = {}
    for (path, part), t in found.items():
        if not all(n in t for n in needed):
            raise ValueError(f"{source}: {path}{'.' + part if part else ''} has {sorted(t)} but needs both {' and '.join(needed)}")
        down, up = t["down"], t["up"]
        r = down.shape[0]
        if up.shape[1] != r or down.shape[1] != linears[path].in_features:
            raise ValueError(f"{source}: {path} down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                             f"a Linear of {linears[path].in_features} -> {linears[path].out_features}")
        alpha = t["alpha"].item() if "alpha" in t else (default_alpha(r) if default_alpha else float(r))
        pieces.setdefault(path, {})[part] = {**t, "alpha": alpha}
    out = {}
    for path, parts in pieces.items():
        if None in parts and len(parts) > 1:
            raise ValueError(f"{source}: {path} appears both fused and as split q/k/v")
        if None in parts:
            out[path] = parts[None]
        else:
            attn = model.get_submodule(path.rpartition(".")[0])
            hq, hkv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
            out[path] = fuse_qkv(parts, (hq, hkv, hkv), path)
        if out[path]["up"].shape[0] != linears[path].out_features:
            raise ValueError(f"{source}: {path} up has {out[path]['up'].shape[0]} rows, the model has {linears[path].out_features}")
    return out


def read_lora(path, model, cls=None):
    """A LoRA file -> {module path: parts} (parse_lora); `model` gives the valid module names and the q/k/v split sizes."""
    f, meta = weightfiles.open_safetensors(path)
    sd = {k: f.get_tensor(k) for k in f.keys()}
    check_finite(sd, path)
    return parse_lora(sd, model, meta, source=path, cls=cls or variant_of(meta, path))


def check_finite(sd, path):
    """Refuse a LoRA holding NaN or inf: merged, it would turn every output of the model into NaN (a black image)."""
    bad = sorted(k for k, t in sd.items() if t.is_floating_point() and weightfiles.nonfinite_count(t))
    if bad:
        raise BadInput(f"{path}: {len(bad)} of its {len(sd)} tensors hold NaN/inf values ({', '.join(bad[:3])}"
                       f"{', ...' if len(bad) > 3 else ''}): was it saved from a diverged run? Use an earlier "
                       f"checkpoint of it, or train again with a lower learning rate")


# -----------------------------------------------------------------------------
# applying files


def load_lora(model, path, multiplier=1.0, merge=True, cls=None):
    """Apply one LoRA file -> the number of modules. merge=True bakes multiplier * dW into the base weights (no extra compute,
    no way back but reloading); merge=False wraps each module in a LoRALinear (or cls) with the file's rank and alpha."""
    cls = cls or variant_of(weightfiles.open_safetensors(path)[1], path)
    lora_weights = read_lora(path, model, cls)
    for name, parts in lora_weights.items():
        module = model.get_submodule(name)
        if merge:
            add_delta(module.weight, cls.delta(parts, multiplier, module.weight))
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA; load several files with merge=True")
        m = wrap(model, name, parts["down"].shape[0], parts["alpha"], cls)
        m.load_parts(parts)
        m.multiplier = multiplier
        m.requires_grad_(False)
    return len(lora_weights)


def apply_lora_files(model, specs, merge=True):
    """specs: "path" or "path;multiplier" (sd-scripts' --lora_weights) -> [(path, multiplier)]; unmerged, only one file."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not merge and len(specs) > 1:
        raise ValueError(f"{len(specs)} LoRA files: stacking them needs merge=True")
    applied = []
    for spec in specs:
        path, sep, mult = spec.rpartition(";")
        if not sep:
            path, mult = spec, "1.0"
        try:
            multiplier = float(mult)
        except ValueError:
            raise ValueError(f"LoRA spec {spec!r}: expected 'path' or 'path;multiplier'") from None
        load_lora(model, path, multiplier, merge)
        applied.append((path, multiplier))
    return applied
