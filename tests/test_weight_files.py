"""
Weight-file faults: every problem with a DiT, AE or Gemma file is found from the safetensors header alone
(inspect_dit / inspect_ae / inspect_text_encoder, the same checks the loaders run first) and named precisely;
NaN/inf values are refused when the tensors are read; a LoRA holding NaN/inf is refused before sampling.
CPU, offline, the tiny demo files edited on disk.

    python -m pytest -q test_weight_files.py
"""
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import files
import lora
import lumina2
import sample
import weightfiles
from testutil import one_image_dataset, run, run_sample


def edited(weights, kind, tmp_path, edit):
    """A copy of a demo file with `edit(state dict)` applied (metadata kept) -> its path."""
    meta = weightfiles.open_safetensors(weights[kind])[1]
    sd = load_file(weights[kind])
    edit(sd)
    path = str(tmp_path / os.path.basename(weights[kind]))
    save_file(sd, path, metadata=meta)
    return path


def drop(*names):
    def edit(sd):
        for n in names:
            del sd[n]
    return edit


def drop_prefix(*prefixes):
    def edit(sd):
        for n in [n for n in sd if n.startswith(prefixes)]:
            del sd[n]
    return edit


def inspect(kind, path):
    return getattr(weightfiles, {"dit": "inspect_dit", "ae": "inspect_ae", "gemma": "inspect_text_encoder"}[kind])(path).config


def load(kind, path):
    return getattr(weightfiles, {"dit": "load_dit", "ae": "load_ae", "gemma": "load_text_encoder"}[kind])(path, dtype=torch.float32)


def refused_by_both(kind, path, pattern):
    """The header check and the loader fail alike (one code path) -> the message."""
    with pytest.raises(files.BadInput, match=pattern) as a:
        inspect(kind, path)
    with pytest.raises(files.BadInput, match=pattern) as b:
        load(kind, path)
    assert str(a.value) == str(b.value)
    return str(a.value)


class HeaderOnly:
    """A safe_open handle that records every tensor whose data is read."""

    def __init__(self, f, reads):
        self.f, self.reads = f, reads

    def get_tensor(self, name):
        self.reads.append(name)
        return self.f.get_tensor(name)

    def __getattr__(self, name):
        return getattr(self.f, name)


# -----------------------------------------------------------------------------
# the header checks


def test_inspect_reads_only_the_header_and_agrees_with_the_loader(weights, monkeypatch):
    reads = []
    opened = weightfiles.open_safetensors
    monkeypatch.setattr(weightfiles, "open_safetensors", lambda path: (HeaderOnly(opened(path)[0], reads), opened(path)[1]))
    dit, ae, te = (inspect(k, weights[k]) for k in ("dit", "ae", "gemma"))
    assert reads == ["spiece_model"]  # the tokenizer (small, parsed to check it), no weight
    assert dit == dict(lumina2.DIT_PRESETS["tiny"], multiple_of=256)  # the FFN width 256 reads back as multiple_of 256
    assert ae == dict(lumina2.AE_PRESETS["tiny"], in_channels=3, out_ch=3)
    assert te.hidden_size == 64
    model = weightfiles.load_dit(weights["dit"], dtype=torch.float32)
    assert len(model.layers) == dit["n_layers"] and model.x_embedder.weight.shape == (dit["dim"], 64)


def test_missing_path_folder_and_non_safetensors_files(weights, tmp_path):
    for kind in ("dit", "ae", "gemma"):
        refused_by_both(kind, str(tmp_path / "nope.safetensors"), "weight file not found: .*nope.safetensors")
    os.makedirs(tmp_path / "models")
    os.symlink(weights["dit"], tmp_path / "models" / "lumina_2_model_bf16.safetensors")
    refused_by_both("dit", str(tmp_path / "models"), r"models is a directory, not a weight file.*holds lumina_2_model_bf16")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused_by_both("ae", str(tmp_path / "empty.safetensors"), r"not a readable safetensors file \(0 bytes; a truncated")
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(3000))
    refused_by_both("gemma", str(tmp_path / "noise.safetensors"), "not a readable safetensors file")


@pytest.mark.parametrize("kind,name", [("dit", "x_embedder.weight"), ("dit", "layers.0.attention.q_norm.weight"),
                                       ("dit", "cap_embedder.0.weight"), ("ae", "encoder.conv_in.weight"),
                                       ("ae", "decoder.conv_out.weight"), ("gemma", "model.layers.1.mlp.up_proj.weight")])
def test_a_missing_tensor_is_named_not_a_key_error(weights, tmp_path, kind, name):
    path = edited(weights, kind, tmp_path, drop(name))
    bare = name.removeprefix("model.")
    msg = refused_by_both(kind, path, re.escape(f"missing 1 tensor ['{bare}']"))
    assert "wrong shape" not in msg and "unexpected" not in msg


@pytest.mark.parametrize("name,shape", [("x_embedder.weight", (64, 32)), ("layers.1.attention.qkv.weight", (96, 64)),
                                        ("cap_embedder.0.weight", (32,)), ("layers.0.attention.k_norm.weight", (8,))])
def test_a_damaged_shape_is_blamed_alone(weights, tmp_path, name, shape):
    path = edited(weights, "dit", tmp_path, lambda sd: sd.__setitem__(name, torch.zeros(shape, dtype=torch.bfloat16)))
    msg = refused_by_both("dit", path, re.escape(f"1 tensor ['{name}'] of the wrong shape: {name} is {shape}"))
    assert "missing" not in msg and "unexpected" not in msg


def test_damaged_ae_shape_is_blamed_alone(weights, tmp_path):
    name = "encoder.down.1.block.0.conv1.weight"
    path = edited(weights, "ae", tmp_path, lambda sd: sd.__setitem__(name, torch.zeros(16, 32, 3, 3)))
    refused_by_both("ae", path, re.escape(f"1 tensor ['{name}'] of the wrong shape"))


def test_a_non_float_dtype_is_named(weights, tmp_path):
    def edit(sd):
        sd["layers.0.ffn_norm1.weight"] = sd["layers.0.ffn_norm1.weight"].double()
        sd["x_embedder.bias"] = sd["x_embedder.bias"].long()
    path = edited(weights, "dit", tmp_path, edit)
    refused_by_both("dit", path, r"2 tensors .* not a weight's: layers.0.ffn_norm1.weight is F64, x_embedder.bias is I64")


def test_a_damaged_tokenizer_is_refused(weights, tmp_path):
    path = edited(weights, "gemma", tmp_path, lambda sd: sd.__setitem__("spiece_model", torch.arange(200, dtype=torch.uint8)))
    refused_by_both("gemma", path, "spiece_model tensor is not a SentencePiece tokenizer")


# -----------------------------------------------------------------------------
# presets: fewer layers than a preset is refused, any other config warns


def test_a_preset_less_a_layer_is_refused(weights, tmp_path):
    path = edited(weights, "dit", tmp_path, drop_prefix("layers.1."))
    refused_by_both("dit", path, re.escape("looks like the tiny Next-DiT with 1 of its 2 main layers (layers.1.* missing): "
                                           "a truncated or edited file?"))
    path = edited(weights, "dit", tmp_path, drop_prefix("noise_refiner.0.", "context_refiner.0."))
    refused_by_both("dit", path, re.escape("with 0 of its 1 refiner layers (noise_refiner.0.*, context_refiner.0.* missing)"))


def test_the_2b_less_its_last_layer_is_refused_from_shapes():
    with torch.device("meta"):
        shapes = weightfiles.shapes_of(lumina2.NextDiT(**lumina2.DIT_PRESETS["2b"]))
    config = weightfiles.dit_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("layers.25.")})
    with pytest.raises(files.BadInput, match=re.escape("looks like the 2b Next-DiT with 25 of its 26 main layers (layers.25.* missing)")):
        weightfiles.check_dit_preset(config, "lumina_2_model_bf16.safetensors")
    config = weightfiles.dit_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith(("noise_refiner.1.", "context_refiner.1."))})
    with pytest.raises(files.BadInput, match=re.escape("1 of its 2 refiner layers")):
        weightfiles.check_dit_preset(config, "lumina_2_model_bf16.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightfiles.check_dit_preset(weightfiles.dit_config_from_shapes(shapes), "lumina_2_model_bf16.safetensors")  # the 2B itself: silent


def test_a_non_preset_config_loads_with_one_warning(weights, tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "five.safetensors")
    save_file(lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], n_layers=5)).state_dict(), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = weightfiles.load_dit(path, dtype=torch.float32)
        weightfiles.load_dit(weights["dit"], dtype=torch.float32)  # the tiny preset itself: no warning
    assert len(model.layers) == 5
    assert [str(w.message) for w in caught] == [f"{path} is not a known Lumina 2 preset: n_layers=5 where tiny has 2. It loads "
                                                "as the model its shapes describe; if you meant the tiny model, this is the wrong file."]


# -----------------------------------------------------------------------------
# values: NaN/inf in a weight file or a LoRA


def poisoned(name, count, dtype=None):
    def edit(sd):
        t = sd[name].float().flatten()
        t[:count] = torch.tensor([float("nan"), float("inf"), -float("inf")] * count)[:count]
        sd[name] = t.view(sd[name].shape).to(dtype or sd[name].dtype)
    return edit


@pytest.mark.parametrize("kind,name,dtype", [("dit", "layers.0.attention.qkv.weight", None), ("ae", "decoder.conv_out.bias", None),
                                             ("gemma", "model.layers.0.self_attn.q_proj.weight", None),
                                             ("dit", "final_layer.linear.weight", torch.float8_e5m2)])
def test_non_finite_values_are_refused_on_load(weights, tmp_path, kind, name, dtype):
    path = edited(weights, kind, tmp_path, poisoned(name, 3, dtype))
    inspect(kind, path)  # the header is fine: values are only seen when read
    bare = name.removeprefix("model.")
    with pytest.raises(files.BadInput, match=re.escape(f"has 3 NaN/inf values in {bare}: the file is damaged; re-download it")):
        load(kind, path)


def test_nan_in_fp8_e4m3_is_refused(weights, tmp_path):
    def edit(sd):
        for k in sd:
            sd[k] = sd[k].float().to(torch.float8_e4m3fn)
        sd["layers.1.feed_forward.w2.weight"][0, :2] = float("nan")  # e4m3fn has NaN but no inf
    path = edited(weights, "dit", tmp_path, edit)
    with pytest.raises(files.BadInput, match=r"has 2 NaN/inf values in layers.1.feed_forward.w2.weight"):
        weightfiles.load_dit(path, dtype=torch.float32)


def nan_lora(weights, tmp_path):
    model = weightfiles.load_dit(weights["dit"], dtype=torch.float32)
    lora.inject(model, rank=2)
    path = str(tmp_path / "diverged.safetensors")
    lora.save_lora(model, path, dtype=torch.float32)
    sd = load_file(path)
    for k in sorted(k for k in sd if k.endswith("lora_down.weight"))[:4]:
        sd[k][0, 0] = float("nan")
    save_file(sd, path, metadata=weightfiles.open_safetensors(path)[1])
    return path


def test_a_lora_with_nan_is_refused(weights, tmp_path):
    path = nan_lora(weights, tmp_path)
    model = weightfiles.load_dit(weights["dit"], dtype=torch.float32)
    for merge in (True, False):
        with pytest.raises(files.BadInput, match=re.escape(path) + r": 4 of its \d+ tensors hold NaN/inf values "
                                                   r"\(lora_unet_.*, \.\.\.\): was it saved from a diverged run\?"):
            lora.apply_lora_files(model, [f"{path};0.8"], merge=merge)


def test_sample_refuses_a_lora_with_nan_before_sampling(weights, tmp_path, monkeypatch):
    path = nan_lora(weights, tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("sampled with a NaN LoRA")

    monkeypatch.setattr(sample, "sample", never)
    with pytest.raises(SystemExit, match=f"cannot load weights: {re.escape(path)}: 4 of .* diverged run"):
        run_sample(weights, tmp_path / "out", f"--lora_weights=['{path}']")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# -----------------------------------------------------------------------------
# train.py checks every file before any caching


def test_train_checks_the_files_before_caching(weights, tmp_path, monkeypatch):
    bad = edited(weights, "dit", tmp_path, drop("layers.0.attention.q_norm.weight"))

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the weight files were checked")

    monkeypatch.setattr(weightfiles, "load_ae", no_load)
    with pytest.raises(SystemExit, match=re.escape("missing 1 tensor ['layers.0.attention.q_norm.weight']")):  # one line
        run({**weights, "dit": bad}, tmp_path, f"--train_data_dir={one_image_dataset(str(tmp_path / 'img'))}")
    assert not (tmp_path / "out" / "cache").exists()
