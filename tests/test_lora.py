"""
LoRA tests: merge == unmerged forward, file round trips in both written layouts, the sd-scripts names and
shapes of the 2B, parity with diffusers' Lumina2 LoRA converter + Lumina2Transformer2DModel, hand-written
kohya and diffusers/PEFT files, and the errors for wrong files. CPU, offline, fp32.

    python -m pytest -q test_lora.py

Errors are max|a-b| / max|b| unless stated; each assert states its bound.
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import lora
import lumina2
import weightfiles
from testutil import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = lumina2.DIT_PRESETS["tiny"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return lumina2.NextDiT(**TINY).eval()


def tiny_batch(seed=1, cap_dim=64, L=7, lens=(7, 4), hw=(8, 8), C=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, *hw, generator=g)
    t = torch.rand(2, generator=g)
    cap = torch.randn(2, L, cap_dim, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]  # ragged: sample 1 has 4 valid tokens
    return x, t, cap, mask


def randomize_lora(model, seed=2, std=0.05):
    """Training-like LoRA weights: up is zero after inject, so give it (and down) non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_up.weight.copy_(std * torch.randn(m.lora_up.weight.shape, generator=g))


def run(model, batch):
    with torch.no_grad():
        return model(*batch)


# -----------------------------------------------------------------------------
# 1. the module


def test_merged_equals_unmerged_and_unmerge_restores():
    model, batch = tiny_model(), tiny_batch()
    base_out = run(model, batch)
    base_w = {k: v.clone() for k, v in model.state_dict().items()}
    mods = lora.inject(model, rank=8, alpha=4, embedder_dims=[4, 4, 4])
    assert len(mods) == 2 * 6 + 6 + 5 + 2 + 4  # 2 main + 1 noise-refiner block, 1 context refiner, final, embedders
    assert torch.equal(run(model, batch), base_out)  # up = 0: bit-identical to the base model
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora.lora_parameters(model))
    assert set(base_w) <= set(model.state_dict())  # the base keys are unchanged

    randomize_lora(model)
    for m in mods.values():
        m.multiplier = 0.7
    lora_out = run(model, batch)
    assert rel_err(lora_out, base_out) > 1e-2  # the LoRA really does something
    lora.merge(model)
    merged_out = run(model, batch)
    err = rel_err(merged_out, lora_out)
    print(f"merged vs unmerged forward, fp32: rel err {err:.2e}")
    assert err <= 1e-6  # only the summation order differs
    lora.unmerge(model)
    w_err = max(((model.state_dict()[k] - v).abs().max() / v.abs().max()).item() for k, v in base_w.items())
    print(f"unmerge restores the weights: max rel err {w_err:.2e}")
    assert w_err <= 1e-6  # W + dW - dW in fp32: one rounding of |W| + |dW|
    assert rel_err(run(model, batch), lora_out) <= 1e-6


def test_lora_dtype_and_dropout():
    model = tiny_model().to(torch.bfloat16)  # the trainer's order: load the base in bf16, then inject
    mods = lora.inject(model, rank=4, module_dropout=1.0)
    randomize_lora(model)
    layer = mods["layers.0.attention.out"]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_up.weight.dtype == torch.float32
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    base = torch.nn.functional.linear(x, layer.weight)
    assert layer(x).dtype == torch.bfloat16
    layer.train()
    assert torch.equal(layer(x), base)  # module_dropout=1: the LoRA is skipped in training
    layer.eval()
    assert not torch.equal(layer(x), base)  # and active in eval
    layer.module_dropout, layer.dropout = 0.0, 1.0
    layer.train()
    assert torch.equal(layer(x), base)  # dropout=1 zeroes the rank-r hidden
    layer.dropout, layer.rank_dropout = 0.0, 0.5
    torch.manual_seed(0)
    dropped = layer(x)
    layer.eval()
    assert dropped.shape == (3, 5, 64) and not torch.equal(dropped, layer(x))


# -----------------------------------------------------------------------------
# 2. round trips


@pytest.mark.parametrize("layout", ["kohya", "diffusion_model"])
def test_save_read_load_round_trip(tmp_path, layout):
    batch = tiny_batch()
    model = tiny_model()
    lora.inject(model, rank=4, alpha=3, attn_dim=6, mod_dim=2, embedder_dims=[2, 0, 3])
    randomize_lora(model)
    want = run(model, batch)
    path = str(tmp_path / "l.safetensors")
    lora.save_lora(model, path, layout=layout, metadata={"ss_learning_rate": 1e-4}, dtype=torch.float32)
    meta = weightfiles.open_safetensors(path)[1]
    assert meta["ss_base_model_version"] == "lumina2" and meta["modelspec.architecture"] == "lumina-2/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "3.0" and meta["ss_learning_rate"] == "0.0001"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    fresh = tiny_model()
    read = lora.read_lora(path, fresh)
    assert read["layers.0.attention.qkv"]["down"].shape == (6, 64) and read["layers.0.adaLN_modulation.1"]["alpha"] == 3.0
    assert lora.load_lora(fresh, path, merge=False) == len(lora.lora_modules(model))
    assert torch.equal(run(fresh, batch), want)  # bit-identical: same weights, same ops

    merged = tiny_model()
    lora.load_lora(merged, path, merge=True)
    assert not lora.lora_modules(merged)
    err = rel_err(run(merged, batch), want)
    print(f"{layout}: merged load vs unmerged model, fp32: rel err {err:.2e}")
    assert err <= 1e-6


def test_bf16_save_equals_rounded_lora(tmp_path):
    batch = tiny_batch()
    model = tiny_model()
    lora.inject(model, rank=4, alpha=0.3)
    randomize_lora(model)
    path = str(tmp_path / "l.safetensors")
    lora.save_lora(model, path)  # bf16 weights, fp32 alpha
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(p.to(torch.bfloat16).float())
    fresh = tiny_model()
    lora.load_lora(fresh, path, merge=False)
    assert lora.lora_modules(fresh)["layers.1.feed_forward.w2"].alpha == pytest.approx(0.3, rel=1e-7)
    assert torch.equal(run(fresh, batch), run(model, batch))


# -----------------------------------------------------------------------------
# 3. names and shapes of the 2B


def meta_2b():
    with torch.device("meta"):
        return lumina2.NextDiT(**lumina2.DIT_PRESETS["2b"])


def kohya_shapes(model):
    return {k: tuple(v.shape) for k, v in lora.lora_state_dict(model).items()}


def test_2b_kohya_names_and_shapes_equal_sd_scripts():
    with open(os.path.join(HERE, "testdata", "lora_lumina_kohya_rank8.json")) as fh:
        want = {k: tuple(v) for k, v in json.load(fh)["shapes"].items()}
    model = meta_2b()
    assert len(lora.inject(model, rank=8)) == 180
    assert kohya_shapes(model) == want
    assert sum(p.numel() for p in lora.lora_parameters(model)) == 1_651_776 * 8


def test_2b_embedders_and_per_component_ranks():
    model = meta_2b()
    lora.inject(model, rank=8, embedder_dims=[2, 3, 5])
    shapes = kohya_shapes(model)
    assert len(shapes) == 3 * 184
    assert shapes["lora_unet_x_embedder.lora_down.weight"] == (2, 64)
    assert shapes["lora_unet_t_embedder_mlp_0.lora_down.weight"] == (3, 256)
    assert shapes["lora_unet_t_embedder_mlp_2.lora_up.weight"] == (1024, 3)
    assert shapes["lora_unet_cap_embedder_1.lora_up.weight"] == (2304, 5)

    ranks = {k: m.rank for k, m in lora.inject(meta_2b(), rank=8, attn_dim=16, mlp_dim=4, mod_dim=2, refiner_dim=32).items()}
    assert ranks["layers.3.attention.qkv"] == ranks["noise_refiner.0.attention.out"] == 16  # attn_dim beats refiner_dim
    assert ranks["layers.3.feed_forward.w2"] == 4 and ranks["context_refiner.1.feed_forward.w1"] == 32
    assert ranks["layers.0.adaLN_modulation.1"] == ranks["noise_refiner.1.adaLN_modulation.1"] == 2
    assert ranks["final_layer.adaLN_modulation.1"] == 2 and ranks["final_layer.linear"] == 8

    skipped = lora.inject(meta_2b(), rank=8, mlp_dim=0)
    assert len(skipped) == 180 - 26 * 3 and "noise_refiner.0.feed_forward.w1" in skipped
    assert not any(k.startswith("layers.") and "feed_forward" in k for k in skipped)
    assert len(lora.inject(meta_2b(), train_blocks="transformer")) == 156
    assert len(lora.inject(meta_2b(), train_blocks="refiners")) == 22


# -----------------------------------------------------------------------------
# 4. diffusers: its converters and its model agree with ours


def test_diffusion_model_file_through_diffusers(tmp_path):
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
    # 2304 wide, 24/8 heads: the split sizes both diffusers converters hard-code; one block each, 64-wide FFN
    cfg = dict(lumina2.DIT_PRESETS["2b"], n_layers=1, n_refiner_layers=1, multiple_of=64,
               ffn_dim_multiplier=64 / (4 * 2304), cap_feat_dim=32)
    torch.manual_seed(0)
    ours = lumina2.NextDiT(**cfg).eval()
    ref = Lumina2Transformer2DModel(hidden_size=2304, num_layers=1, num_refiner_layers=1, num_attention_heads=24,
                                    num_kv_heads=8, multiple_of=64, ffn_dim_multiplier=cfg["ffn_dim_multiplier"],
                                    cap_feat_dim=32, in_channels=16).eval()
    ref.load_state_dict(convert_lumina2_to_diffusers(dict(ours.state_dict())), strict=True)

    x, t, cap, mask = tiny_batch(cap_dim=32, L=5, lens=(5, 3), hw=(4, 4))
    base_out = run(ours, (x, t, cap, mask))
    rank, alpha = 4, 8.0
    lora.inject(ours, rank=rank, alpha=alpha)
    randomize_lora(ours, std=0.02)
    path = str(tmp_path / "dm.safetensors")
    lora.save_lora(ours, path, layout="diffusion_model", dtype=torch.float32)

    f, _ = weightfiles.open_safetensors(path)
    sd = {k: f.get_tensor(k) for k in f.keys()}
    # diffusers' converter takes neither `.alpha` keys nor final_layer (it raises on leftovers), and PEFT
    # without alpha scales by 1: fold alpha / r into lora_B, and map final_layer by diffusers' module names
    scale = alpha / rank
    sd = {k: v * scale if k.endswith("lora_B.weight") else v for k, v in sd.items() if not k.endswith(".alpha")}
    final = {k: sd.pop(k) for k in list(sd) if k.startswith("diffusion_model.final_layer.")}
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers(sd)
    for k, v in final.items():
        converted[k.replace("diffusion_model.final_layer.adaLN_modulation.1", "transformer.norm_out.linear_1")
                   .replace("diffusion_model.final_layer.linear", "transformer.norm_out.linear_2")] = v
    assert len(converted) == 2 * (3 * (3 + 1 + 3 + 1) - 1 + 2)  # 3 blocks with split qkv (context: no adaLN), final
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith("lora_A.weight"):
                name = key[len("transformer."): -len(".lora_A.weight")]
                ref.get_submodule(name).weight += converted[key.replace("lora_A", "lora_B")] @ down

    want = run(ours, (x, t, cap, mask))
    assert rel_err(want, base_out) > 1e-2  # the LoRA changes the output far beyond the tolerance below
    with torch.no_grad():
        got = ref(x, t, cap, mask, return_dict=False)[0]
    err = rel_err(got, want)
    print(f"diffusion_model.* LoRA through diffusers' converter + Lumina2Transformer2DModel, fp32: rel err {err:.2e}")
    assert err <= 1e-5  # two implementations: summation order and RoPE table precision


# -----------------------------------------------------------------------------
# 5. files written by hand from the documented layouts


def test_handwritten_kohya_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    r, alpha, mult = 4, 3.0, 0.8
    modules = {"lora_unet_layers_1_feed_forward_w2": "layers.1.feed_forward.w2",
               "lora_unet_noise_refiner_0_adaLN_modulation_1": "noise_refiner.0.adaLN_modulation.1",
               "lora_unet_context_refiner_0_attention_qkv": "context_refiner.0.attention.qkv",
               "lora_unet_final_layer_linear": "final_layer.linear",
               "lora_unet_t_embedder_mlp_0": "t_embedder.mlp.0", "lora_unet_cap_embedder_1": "cap_embedder.1"}
    sd, want = {}, dict(base)
    for name, path in modules.items():
        w = base[path + ".weight"]
        down, up = torch.randn(r, w.shape[1], generator=g), 0.1 * torch.randn(w.shape[0], r, generator=g)
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
        want[path + ".weight"] = w + up @ down * (alpha / r * mult)
    file = str(tmp_path / "kohya.safetensors")
    save_file(sd, file)
    assert lora.apply_lora_files(model, [f"{file};{mult}"]) == [(file, mult)]
    got = model.state_dict()
    err = max(rel_err(got[k], want[k]) for k in want)
    print(f"hand-written kohya file, merged weights vs independent dW: rel err {err:.2e}")
    assert err <= 1e-6  # fp32, one rounding of the sum
    assert all(torch.equal(got[k], v) for k, v in base.items() if k[: -len(".weight")] not in modules.values())

    expect = tiny_model()
    expect.load_state_dict(want)
    assert rel_err(run(model, tiny_batch()), run(expect, tiny_batch())) <= 1e-6

    # a second file on the same modules adds up; unmerged stacking is refused
    lora.apply_lora_files(model, [file + ";-0.8"])
    assert max(rel_err(model.state_dict()[k], v) for k, v in base.items()) <= 1e-6
    with pytest.raises(ValueError, match="merge=True"):
        lora.apply_lora_files(tiny_model(), [file, file], merge=False)


def test_handwritten_diffusers_peft_file_with_split_qkv(tmp_path):
    g = torch.Generator().manual_seed(4)
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rand = lambda *s: 0.1 * torch.randn(*s, generator=g)
    dq, dkv = 64, 32  # tiny: 4 heads, 2 kv heads, head_dim 16
    sd, delta = {}, {}

    def add(name, ranks, outs, shared=False, missing=()):
        """diffusers-named LoRAs for q/k/v (or one module) -> the file entries and our expected dW."""
        A0 = rand(max(ranks), 64)
        parts = []
        for part, r, n in zip("qkv", ranks, outs):
            if part in missing:
                parts.append(torch.zeros(n, 64))
                continue
            A, B = (A0.clone() if shared else rand(r, 64)), rand(n, A0.shape[0] if shared else r)
            sd[f"transformer.{name}.to_{part}.lora_A.weight"], sd[f"transformer.{name}.to_{part}.lora_B.weight"] = A, B
            parts.append(B @ A * (8.0 / A.shape[0]))  # alpha 8 from the PEFT metadata below
        return torch.cat(parts)

    delta["layers.0.attention.qkv"] = add("layers.0.attn", (2, 3, 4), (dq, dkv, dkv))
    delta["layers.1.attention.qkv"] = add("layers.1.attn", (4, 4, 4), (dq, dkv, dkv), shared=True)
    delta["context_refiner.0.attention.qkv"] = add("context_refiner.0.attn", (2, 2, 2), (dq, dkv, dkv), missing="k")
    singles = {"layers.0.attn.to_out.0": "layers.0.attention.out", "layers.1.feed_forward.linear_3": "layers.1.feed_forward.w3",
               "noise_refiner.0.norm1.linear": "noise_refiner.0.adaLN_modulation.1", "norm_out.linear_1": "final_layer.adaLN_modulation.1",
               "norm_out.linear_2": "final_layer.linear", "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_caption_embed.caption_embedder.1": "cap_embedder.1", "x_embedder": "x_embedder"}
    for theirs, ours in singles.items():
        out_f, in_f = base[ours + ".weight"].shape
        A, B = rand(3, in_f), rand(out_f, 3)
        sd[f"transformer.{theirs}.lora_A.weight"], sd[f"transformer.{theirs}.lora_B.weight"] = A, B
        delta[ours] = B @ A * (8.0 / 3)
    file = str(tmp_path / "peft.safetensors")
    save_file(sd, file, metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 3, "transformer.lora_alpha": 8})})

    read = lora.read_lora(file, model)
    assert read["layers.0.attention.qkv"]["down"].shape == (9, 64)  # distinct A: rank 2 + 3 + 4, block-diagonal up
    assert read["layers.1.attention.qkv"]["down"].shape == (4, 64)  # shared A: stays rank 4
    assert lora.load_lora(model, file) == len(delta)
    got = model.state_dict()
    err = max(rel_err(got[k + ".weight"] - base[k + ".weight"], d) for k, d in delta.items())
    print(f"hand-written diffusers/PEFT file (split q/k/v), merged dW vs independent dW: rel err {err:.2e}")
    assert err <= 1e-5  # dW recovered as (W + dW) - W: fp32 cancellation, relative to |dW| ~ 0.1 |W|
    assert torch.equal(got["layers.0.feed_forward.w1.weight"], base["layers.0.feed_forward.w1.weight"])


# -----------------------------------------------------------------------------
# 6. wrong files


def test_errors_for_wrong_files(tmp_path):
    model = tiny_model()
    dit = str(tmp_path / "dit.safetensors")
    save_file(model.state_dict(), dit)
    with pytest.raises(ValueError, match="not a LoRA file.*Next-DiT"):
        lora.load_lora(model, dit)

    good = {"lora_unet_layers_0_attention_out.lora_down.weight": torch.zeros(2, 64),
            "lora_unet_layers_0_attention_out.lora_up.weight": torch.zeros(64, 2)}
    for extra, pattern in [({"lora_unet_layers_9_attention_qkv.lora_down.weight": torch.zeros(2, 64)}, "lora_unet_layers_9_attention_qkv"),
                           ({"lora_te_layers_0_mlp_up_proj.lora_down.weight": torch.zeros(2, 64)}, "text-encoder"),
                           ({"diffusion_model.layers.0.attention.out.dora_scale": torch.zeros(1, 64)}, "dora_scale"),
                           ({"transformer.layers.0.attn.to_add_out.lora_A.weight": torch.zeros(2, 64)}, "to_add_out")]:
        path = str(tmp_path / "bad.safetensors")
        save_file({**good, **extra}, path)
        with pytest.raises(ValueError, match=pattern):
            lora.load_lora(model, path)

    for bad, pattern in [({"lora_unet_layers_0_attention_out.lora_down.weight": torch.zeros(2, 64)}, "needs both"),
                         ({**good, "lora_unet_layers_0_attention_out.lora_down.weight": torch.zeros(2, 2304)}, "do not fit")]:
        path = str(tmp_path / "bad.safetensors")
        save_file(bad, path)
        with pytest.raises(ValueError, match=pattern):
            lora.load_lora(model, path)
    with pytest.raises(ValueError, match="path;multiplier"):
        lora.apply_lora_files(model, [dit + ";strong"])
