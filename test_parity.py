"""
Parity tests: lumina2.py against independent implementations (diffusers' Lumina2Transformer2DModel and
AutoencoderKL, transformers' Gemma2Model, SentencePiece), on tiny random models written to disk in the
real file layouts and read back through the real loaders. CPU, offline.

Second, reference outputs (docs/reference-outputs.md): fixed inputs, rebuilt from a recipe and seeds, and our
outputs for them, one safetensors file per model, for porters and to pin our own numerics across refactors; the
random models' dump is committed under tests/testdata/reference and checked here.

    python -m pytest -q test_parity.py
    python test_parity.py --weights DIR     # also compare the real files in DIR against diffusers
    python test_parity.py --dump OUT [--weights DIR] [--dtype bfloat16] [--device cuda]   # write reference outputs
    python test_parity.py --check OUT [--weights DIR]    # the current code against them; exit 1 on failure

Tolerances: fp32 comparisons use max|a-b| / max|b| <= 1e-5 (the two implementations differ only in
summation order and RoPE table precision); bf16 results are compared to fp32 with a stated bound; a
dump is checked with the bound of its dtype (TOLERANCES, measured across CPU kernels and torch versions).
"""
import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import save_file

import data
import files
import lumina2
import sample
import tinyworld
import weightfiles

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tests"))  # the shared test helpers, for `python test_parity.py` too
from testutil import diffusers_to_original, full_width_config, perturb_norms, ragged_batch, rel_err  # noqa: E402

WEIGHTS = os.environ.get("LUMINA2_WEIGHTS")  # a folder with the real files, for the full-size tier


def format_shapes(name):
    with open(os.path.join(HERE, "tests", "testdata", name)) as fh:
        return {k: tuple(v) for k, v in json.load(fh)["shapes"].items()}


# -----------------------------------------------------------------------------
# Next-DiT vs diffusers

TINY_DIFFUSERS = dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
                      num_attention_heads=4, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
                      axes_dim_rope=(8, 4, 4), axes_lens=(300, 512, 512), cap_feat_dim=32)


def test_dit_matches_diffusers_tiny(tmp_path):
    from diffusers import Lumina2Transformer2DModel
    torch.manual_seed(0)
    ref = perturb_norms(Lumina2Transformer2DModel(**TINY_DIFFUSERS)).eval()
    path = str(tmp_path / "tiny_dit.safetensors")
    save_file(diffusers_to_original(ref.state_dict()), path)
    ours = weightfiles.load_dit(path, dtype=torch.float32)
    x, t, cap, mask = ragged_batch()
    with torch.no_grad():
        want = ref(x, t, cap, mask, return_dict=False)[0]
        got = ours(x, t, cap, mask)
    err = rel_err(got, want)
    print(f"tiny DiT vs diffusers, ragged batch of 3, fp32: rel err {err:.2e}")
    assert err <= 1e-5


def test_dit_full_width_through_diffusers_converter(tmp_path):
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
    torch.manual_seed(0)
    cfg = full_width_config()
    path = str(tmp_path / "wide_dit.safetensors")
    save_file(perturb_norms(lumina2.NextDiT(**cfg)).state_dict(), path)
    ours = weightfiles.load_dit(path, dtype=torch.float32)
    assert ours.layers[0].feed_forward.w1.out_features == 64
    ref = Lumina2Transformer2DModel(hidden_size=2304, num_layers=1, num_refiner_layers=1, num_attention_heads=24,
                                    num_kv_heads=8, multiple_of=64, ffn_dim_multiplier=cfg["ffn_dim_multiplier"],
                                    cap_feat_dim=32, in_channels=16)
    # diffusers' own converter on *our* state dict: this proves our names are the real checkpoint names
    ref.load_state_dict(convert_lumina2_to_diffusers(dict(ours.state_dict())), strict=True)
    x, t, cap, mask = ragged_batch(L=7, lens=(7, 3, 5), hw=(4, 6))
    with torch.no_grad():
        err = rel_err(ours(x, t, cap, mask), ref(x, t, cap, mask, return_dict=False)[0])
    print(f"2304-wide DiT via convert_lumina2_to_diffusers, fp32: rel err {err:.2e}")
    assert err <= 1e-5


# -----------------------------------------------------------------------------
# the real file layouts (names and shapes on the meta device)

def test_2b_names_and_shapes_equal_the_real_file():
    with torch.device("meta"):
        model = lumina2.NextDiT(**lumina2.DIT_PRESETS["2b"])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == format_shapes("lumina_2_model_bf16.json")
    assert len(got) == 400 and sum(v.numel() for v in model.state_dict().values()) == 2_609_771_456
    assert weightfiles.dit_config_from_shapes(got) == lumina2.DIT_PRESETS["2b"]


def test_flux_ae_names_and_shapes_equal_the_real_file():
    with torch.device("meta"):
        ae = lumina2.AutoEncoder(**lumina2.AE_PRESETS["flux"])
    got = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert got == format_shapes("ae.json") and len(got) == 244


def test_gemma_loader_accepts_exactly_the_real_names():
    want = format_shapes("gemma_2_2b_fp16.json")
    want.pop("spiece_model")
    got = {"model." + k: v for k, v in weightfiles.gemma_file_keys(lumina2.gemma_config()).items()}
    assert got == want


# -----------------------------------------------------------------------------
# FLUX AE vs diffusers AutoencoderKL

def test_ae_matches_diffusers(tmp_path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    torch.manual_seed(0)
    ae = perturb_norms(lumina2.AutoEncoder(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, z_channels=16))
    path = str(tmp_path / "ae.safetensors")
    save_file(ae.state_dict(), path)
    ours = weightfiles.load_ae(path, dtype=torch.float32)
    ref = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
                        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(ours.state_dict()), ref.config), strict=True)
    img = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        lat = ours.encode(img)
        want_lat = (ref.encode(img).latent_dist.mode() - 0.1159) * 0.3611
        enc_err = rel_err(lat, want_lat)
        dec_err = rel_err(ours.decode(lat), ref.decode(lat / 0.3611 + 0.1159).sample)
    print(f"AE vs diffusers, fp32: encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    assert lat.shape == (2, 16, 6, 8)
    assert enc_err <= 1e-5 and dec_err <= 1e-5


def test_ae_posterior_sample_option():
    torch.manual_seed(0)
    ae = lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"]).eval()
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = ae.encode(img)
        a = ae.encode(img, sample=True, generator=torch.Generator().manual_seed(0))
        b = ae.encode(img, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, mean)


# -----------------------------------------------------------------------------
# Gemma-2 wrapper vs transformers, tokenizer vs SentencePiece

TINY_GEMMA = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
TRICKY = ["a cat", "", "café naïve 東京 🙂", "double  spaces\tand tab", "digits 12345 and 3.14",
          "<Prompt Start> already", "  leading and trailing  "]


def train_sentencepiece():
    import sentencepiece as spm
    text = ["a photo of a cat sitting on a red chair", "digits 0123456789 and unicode cafe", "a blue dog runs",
            "You are an assistant designed to generate images <Prompt Start>", "  spaces\tand tabs "]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 30), model_writer=buf, model_type="bpe", vocab_size=300,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, normalization_rule_name="identity", minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory):
    """A tiny Gemma-2 saved like the ComfyUI file: `model.` prefix, F16, spiece_model as a U8 tensor."""
    from transformers import Gemma2Config, Gemma2Model
    torch.manual_seed(0)
    cfg = Gemma2Config(**TINY_GEMMA, attn_logit_softcapping=50.0)
    ref = perturb_norms(Gemma2Model._from_config(cfg, attn_implementation="eager", dtype=torch.float32)).eval()
    proto = train_sentencepiece()
    sd = {"model." + k: v.half() for k, v in ref.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    path = str(tmp_path_factory.mktemp("gemma") / "gemma_2_2b_fp16.safetensors")
    save_file(sd, path, metadata={"gemma2_config": json.dumps(TINY_GEMMA)})
    with torch.no_grad():  # the reference sees the same fp16-rounded weights the file holds
        for p in ref.parameters():
            p.copy_(p.half().float())
    return path, ref, proto


def test_gemma_features_match_transformers(gemma_file):
    path, ref, _ = gemma_file
    te = weightfiles.load_text_encoder(path, dtype=torch.float32)
    assert len(te.model.layers) == TINY_GEMMA["num_hidden_layers"] - 1  # the last layer is never built or run
    captions = ["a cat", "a blue dog runs on a red chair with digits 0123"]
    feats, mask = te(captions)
    with torch.no_grad():
        ids, m = te.tokenize([lumina2.build_prompt(c, lumina2.SYSTEM_PROMPTS["base"]) for c in captions])
        want = ref(input_ids=ids, attention_mask=m.long(), output_hidden_states=True).hidden_states[-2]
    err = rel_err(feats[mask], want[m])
    print(f"Gemma features vs transformers hidden_states[-2], fp32: rel err {err:.2e}")
    assert torch.equal(mask, m) and err <= 1e-5
    # right padding does not change the valid tokens
    alone, _ = te(captions[:1])
    assert rel_err(alone[0], feats[0, : alone.shape[1]]) <= 1e-5


def test_tokenizer_ids_equal_sentencepiece(gemma_file):
    import sentencepiece as spm
    path, _, proto = gemma_file
    te = weightfiles.load_text_encoder(path, dtype=torch.float32)
    sp = spm.SentencePieceProcessor(model_proto=proto, add_bos=True, add_eos=False)
    ids, mask = te.tokenize(TRICKY)
    for row, m, text in zip(ids, mask, TRICKY):
        assert row[m].tolist() == sp.encode(text), text
    assert ids[~mask].eq(0).all() and ids[:, 0].eq(2).all()


def test_tokenizer_from_a_local_folder(gemma_file, tmp_path):
    path, _, proto = gemma_file
    (tmp_path / "tokenizer.model").write_bytes(proto)
    a = weightfiles.load_text_encoder(path, dtype=torch.float32)
    b = weightfiles.load_text_encoder(path, dtype=torch.float32, tokenizer=str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(a.tokenize(TRICKY), b.tokenize(TRICKY)))


def test_tokenizer_truncates_to_max_length_with_a_warning(gemma_file):
    te = weightfiles.load_text_encoder(gemma_file[0], dtype=torch.float32, max_length=16)
    with pytest.warns(UserWarning, match="truncated to 16"):
        ids, mask = te.tokenize(["a cat " * 40])
    assert ids.shape == (1, 16) and mask.all()


def test_prompt_template_is_the_official_one():
    base = "You are an assistant designed to generate high-quality images based on user prompts."
    assert lumina2.SYSTEM_PROMPTS["base"] == base
    assert lumina2.build_prompt("a cat", base) == base + " <Prompt Start> a cat"
    assert lumina2.build_prompt("a cat", "") == "a cat"
    assert lumina2.build_prompt("a cat", base + " <Prompt Start> ") == base + " <Prompt Start> a cat"


def test_comfyui_all_in_one_checkpoint_loads(tmp_path, gemma_file):
    from safetensors.torch import load_file
    torch.manual_seed(0)
    dit = lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], cap_feat_dim=TINY_GEMMA["hidden_size"]))
    ae = lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"])
    gemma = load_file(gemma_file[0])
    sd = {"model.diffusion_model." + k: v.bfloat16() for k, v in dit.state_dict().items()}
    sd.update({"vae." + k: v for k, v in ae.state_dict().items()})
    sd.update({"text_encoders.gemma2_2b.transformer." + k: v for k, v in gemma.items() if k != "spiece_model"})
    sd["text_encoders.spiece_model"] = gemma["spiece_model"]
    path = str(tmp_path / "all_in_one.safetensors")
    save_file(sd, path, metadata={"gemma2_config": json.dumps(TINY_GEMMA)})
    d = weightfiles.load_dit(path)
    assert d.x_embedder.weight.dtype == torch.bfloat16 and torch.equal(d.x_embedder.weight, dit.x_embedder.weight.bfloat16())
    a = weightfiles.load_ae(path, dtype=torch.float32)
    assert torch.equal(a.decoder.conv_out.weight, ae.decoder.conv_out.weight)
    te = weightfiles.load_text_encoder(path, dtype=torch.float32)
    assert te(["a cat"])[0].shape[-1] == TINY_GEMMA["hidden_size"]


# -----------------------------------------------------------------------------
# dtypes (attention backends, padding and batching invariances: test_attention.py)

@pytest.fixture
def tiny_dit():
    torch.manual_seed(0)
    return perturb_norms(lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], cap_feat_dim=32))).eval()


def test_bf16_forward_stays_near_fp32(tiny_dit):
    x, t, cap, mask = ragged_batch()
    low = lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], cap_feat_dim=32)).to(torch.bfloat16).eval()
    low.load_state_dict(tiny_dit.state_dict())
    ref = lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], cap_feat_dim=32)).eval()
    ref.load_state_dict(low.state_dict())  # the same bf16-rounded weights, run in fp32
    with torch.no_grad():
        err = rel_err(low(x, t, cap, mask), ref(x, t, cap, mask))
    print(f"tiny DiT bf16 vs fp32 (same weights): rel err {err:.2e}")
    assert err <= 3e-2  # bf16 has an 8-bit mantissa (2^-8 = 3.9e-3 per rounding); a few layers of it stay within 3%


# -----------------------------------------------------------------------------
# wrong files give clear errors

def test_bad_files_say_what_they_are(tmp_path, gemma_file):
    from diffusers import Lumina2Transformer2DModel
    path = str(tmp_path / "x.safetensors")
    with pytest.raises(files.BadInput, match="weight file not found"):
        weightfiles.load_dit(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="this is the Gemma|looks like the Gemma-2 text encoder"):
        weightfiles.load_dit(gemma_file[0])
    torch.manual_seed(0)
    save_file(Lumina2Transformer2DModel(**TINY_DIFFUSERS).state_dict(), path)
    with pytest.raises(ValueError, match="diffusers-format Lumina2Transformer2DModel"):
        weightfiles.load_dit(path)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4), "model.diffusion_model.out.2.weight": torch.zeros(4)}, path)
    with pytest.raises(ValueError, match="SD/SDXL UNet"):
        weightfiles.load_dit(path)
    save_file(lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"]).state_dict(), path)
    with pytest.raises(ValueError, match="FLUX autoencoder"):
        weightfiles.load_dit(path)
    with pytest.raises(ValueError, match="looks like the FLUX autoencoder"):
        weightfiles.load_text_encoder(path)
    with open(gemma_file[0], "rb") as fh:
        head = fh.read(5000)
    with open(path, "wb") as fh:
        fh.write(head)
    with pytest.raises(ValueError, match="not a readable safetensors file .*truncated"):
        weightfiles.load_dit(path)
    with open(path, "wb") as fh:
        fh.write(b"PK\x03\x04 a zip-based .ckpt, not safetensors" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        weightfiles.load_ae(path)
    torch.manual_seed(0)
    sd = lumina2.NextDiT(**lumina2.DIT_PRESETS["tiny"]).state_dict()
    sd.pop("layers.1.ffn_norm2.weight")
    save_file(sd, path)
    with pytest.raises(ValueError, match="missing 1 .*layers.1.ffn_norm2.weight"):
        weightfiles.load_dit(path)


# -----------------------------------------------------------------------------
# the real files, when a user points at them (python test_parity.py --weights DIR)

def real_file(*names):
    if not WEIGHTS:
        pytest.skip("set LUMINA2_WEIGHTS=DIR or run `python test_parity.py --weights DIR` to compare the real files")
    for n in names:
        if os.path.exists(os.path.join(WEIGHTS, n)):
            return os.path.join(WEIGHTS, n)
    pytest.skip(f"none of {names} in {WEIGHTS}")


def test_real_dit_matches_diffusers():
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
    path = real_file("lumina_2_model_bf16.safetensors", "lumina-image-2.safetensors")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ours = weightfiles.load_dit(path, dtype=torch.float32, device=dev)
    with torch.device(dev):
        ref = Lumina2Transformer2DModel(cap_feat_dim=2304)
    ref.load_state_dict(convert_lumina2_to_diffusers(dict(ours.state_dict())), strict=True)
    x, t, cap, mask = (v.to(dev) for v in ragged_batch(B=2, cap_dim=2304, L=20, lens=(20, 9), hw=(32, 32)))
    with torch.no_grad():
        err = rel_err(ours(x, t, cap, mask), ref(x, t, cap, mask, return_dict=False)[0])
    print(f"real DiT vs diffusers, fp32: rel err {err:.2e}")
    assert err <= 1e-4  # 26 layers at 2304 wide accumulate more fp32 summation-order noise than the tiny model


def test_real_ae_matches_diffusers():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    path = real_file("ae.safetensors")
    ours = weightfiles.load_ae(path, dtype=torch.float32)
    ref = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(ours.state_dict()), ref.config), strict=True)
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        lat = ours.encode(img)
        assert rel_err(lat, (ref.encode(img).latent_dist.mode() - 0.1159) * 0.3611) <= 1e-5
        assert rel_err(ours.decode(lat), ref.decode(lat / 0.3611 + 0.1159).sample) <= 1e-5


# -----------------------------------------------------------------------------
# reference outputs: fixed inputs and our outputs, one safetensors file per model, for porters and for our own
# refactors (docs/reference-outputs.md). Everything is rebuilt from recipe.json: the seeds, shapes and captions.

REFERENCE = os.path.join(HERE, "tests", "testdata", "reference")  # the committed dump of the random models (fp32)
CAPTIONS = ["a red fox sitting in fresh snow, golden hour", "unicode: café, naïve, 東京, emoji 🙂, ∑ → ∞", "",
            " ".join(["a very long caption that never seems to come to an end"] * 30)]  # over max_length: truncated
SAMPLE = dict(caption="a red circle on a white background", system_prompt="base", negative="", steps=4, cfg=4.0,
              cfg_trunc=0.2, renorm=1.0, solver="euler", shift=6.0, seeds=[1])  # cfg_trunc 0.2: the last step unguided
GEMMA = {"plain": dict(system_prompt="", captions=CAPTIONS), "system": dict(system_prompt="base", captions=CAPTIONS[:3:2])}
PROBES = ["t_freq", "t_emb", "rope", "cap_embedder", "context_refiner", "layers.0"]  # what dit_probes records
RECIPES = {  # what --dump feeds each model; t = 1 - sigma per sample, hw in latent pixels; probe: the intermediates kept
    "random": {"gemma": dict(batches=GEMMA, max_length=96),
               "dit": dict(L=10, lens=[10, 3, 7], seed=1, cases=[dict(hw=[4, 8], t=[0.0, 0.5, 1.0], probe=PROBES),
                                                                dict(hw=[8, 4], t=[0.03, 0.6, 0.97], probe=["t_emb", "rope", "layers.0"])]),
               "dit_wide": dict(L=2, lens=[2, 1], seed=1, cases=[dict(hw=[4, 4], t=[0.25, 0.75], probe=["t_freq", "t_emb", "rope"]),
                                                                  dict(hw=[4, 6], t=[0.0, 1.0], probe=[])]),
               "ae": dict(hw=[32, 32], seed=2),
               "sample": dict(SAMPLE, hw=[32, 32])},
    "real": {"gemma": dict(batches=GEMMA, max_length=256),
             "dit": dict(L=20, lens=[20, 9], seed=1, cases=[dict(hw=[32, 32], t=[0.3, 0.9], probe=PROBES),
                                                            dict(hw=[24, 40], t=[0.0, 1.0], probe=PROBES)]),
             "ae": dict(hw=[128, 128], seed=2),
             "sample": dict(SAMPLE, hw=[256, 256])},
}
# max|ours - dump| / max|dump| per tensor, by the dtype the models ran in; ids, masks and positions must be equal. The
# random models' dumps made under native AVX-512 were checked under ATEN_CPU_CAPABILITY=default, =avx2 and native with
# torch 2.11.0, 2.13.0 and 2.14.1: the torch version changed no bit, the kernels did (docs/reference-outputs.md); each
# bound is about 4x the worst measured, so another CPU's summation order has room, and a bug (>= 1e-3) does not.
TOLERANCES = {
    "float32": 2e-5,  # worst 4.8e-6: ae/decoded under default (scalar GroupNorm/SiLU); DiT 5.5e-7, Gemma 9.6e-7, sample 1.4e-6
    "bfloat16": 1e-1,  # worst 4.3e-2: ae/decoded under default; a sum's order flips a bf16 rounding (2^-8), later layers carry it
    "float16": 2e-2,  # worst 5.5e-3: ae/decoded under default; fp16 keeps 3 more mantissa bits than bf16
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_random_gemma(path, seed):
    """tinyworld's tiny Gemma-2 (its config, random norms and tokenizer) saved in F32 -> path. The demo's F16 file would turn
    the last-bit difference between randn's scalar and vectorised kernels (ATEN_CPU_CAPABILITY=default vs the others) into
    an F16 step in a few weights: 5e-5 in the features, measured. In F32 it stays a last bit."""
    from transformers import Gemma2Model
    torch.manual_seed(seed)
    gemma = Gemma2Model(lumina2.gemma_config(**tinyworld.DEMO_GEMMA))
    with torch.no_grad():
        for name, p in gemma.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    tensors = {"model." + k: v for k, v in gemma.state_dict().items()}
    tensors["spiece_model"] = torch.frombuffer(bytearray(tinyworld.train_tiny_tokenizer()), dtype=torch.uint8)
    files.save_file_atomic(tensors, path, metadata={"gemma2_config": json.dumps(tinyworld.DEMO_GEMMA)})
    return path


def random_models(folder, seed=0):
    """{name: a function building it}: the demo's tiny DiT and AE (tinyworld.make_demo_weights, written into `folder` in the
    real file layouts, read through weightfiles' loaders), their norm scales randomised so a forgotten scale shows, the
    demo config's Gemma in F32 (write_random_gemma), and the 2304-wide DiT of testutil.full_width_config (24/8 heads, head_dim 96)."""
    paths = dict(tinyworld.make_demo_weights(folder, seed), gemma=write_random_gemma(os.path.join(folder, "gemma_f32.safetensors"), seed))

    def wide(dtype, device):
        torch.manual_seed(seed)
        return perturb_norms(lumina2.NextDiT(**full_width_config()), seed).to(device, dtype).eval()
    return {"gemma": lambda dtype, device: weightfiles.load_text_encoder(paths["gemma"], dtype, device),
            "dit": lambda dtype, device: perturb_norms(weightfiles.load_dit(paths["dit"], dtype, device), seed),
            "dit_wide": wide, "ae": lambda dtype, device: perturb_norms(weightfiles.load_ae(paths["ae"], dtype, device), seed)}


def real_models(folder):
    """{name: a function loading it} for the real files in `folder`, through weightfiles' loaders (which check them first)."""
    def find(*names):
        found = [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]
        if not found:
            raise files.BadInput(f"none of {', '.join(names)} in {folder}: --weights takes the folder holding the three files")
        return found[0]
    return {"gemma": lambda dtype, device: weightfiles.load_text_encoder(find("gemma_2_2b_fp16.safetensors"), dtype, device),
            "dit": lambda dtype, device: weightfiles.load_dit(find("lumina_2_model_bf16.safetensors", "lumina-image-2.safetensors"), dtype, device),
            "ae": lambda dtype, device: weightfiles.load_ae(find("ae.safetensors"), dtype, device)}


@contextlib.contextmanager
def dit_probes(model, on=True):
    """Record, from outside the model, what ports most often get wrong -> the dict it fills (complete once the block ends):
    t_freq (B, 256) the sinusoid (cos half first, t not x1000), t_emb (B, min(dim, 1024)), rope.{cap,img}.{pos (B, S, 3),
    angles, cos, sin (B, S, head_dim/2)}, cap_embedder and context_refiner (B, L, dim), layers.0 (B, L + h*w, dim)."""
    got, ropes = {}, []
    if not on:
        yield got
        return
    keep = lambda name: lambda module, args, out: got.__setitem__(name, out)
    hooks = [model.t_embedder.mlp.register_forward_pre_hook(lambda module, args: got.__setitem__("t_freq", args[0])),
             model.t_embedder.register_forward_hook(keep("t_emb")), model.cap_embedder.register_forward_hook(keep("cap_embedder")),
             model.context_refiner[-1].register_forward_hook(keep("context_refiner")),
             model.layers[0].register_forward_hook(keep("layers.0"))]
    angles, rope = lumina2.rope_angles, model.rope  # NextDiT.rope(pos) calls lumina2.rope_angles(pos, axes), then cos, sin

    def recorded_angles(pos, *args):
        ropes.append(dict(pos=pos, angles=angles(pos, *args)))
        return ropes[-1]["angles"]

    def recorded_rope(pos):
        ropes[-1]["cos"], ropes[-1]["sin"] = rope(pos)
        return ropes[-1]["cos"], ropes[-1]["sin"]
    lumina2.rope_angles, model.rope = recorded_angles, recorded_rope
    try:
        yield got
    finally:
        lumina2.rope_angles = angles
        del model.rope
        for h in hooks:
            h.remove()
        for part, r in zip(("cap", "img"), ropes):  # the forward builds the caption's table, then the image's
            got.update({f"rope.{part}.{k}": v for k, v in r.items()})


def gemma_outputs(models, name, r, dtype, device):
    """Per batch and caption i: its token ids (L_i,) and features (L_i, hidden), the caption encoded in its right-padded
    batch and cut to its own length (what a model computes at padding is its own)."""
    te, out = models["gemma"](dtype, device), {}
    te.max_length = r["max_length"]
    for key, batch in r["batches"].items():
        system = lumina2.SYSTEM_PROMPTS[batch["system_prompt"]] if batch["system_prompt"] else ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long caption's truncation, on purpose
            ids, mask = te.tokenize([lumina2.build_prompt(c, system) for c in batch["captions"]])
            features, _ = te(batch["captions"], system)
        for i, n in enumerate(mask.sum(1).tolist()):
            out.update({f"{key}.{i}.ids": ids[i, :n], f"{key}.{i}.features": features[i, :n]})
    return out


def dit_outputs(models, name, r, dtype, device):
    """A ragged caption batch (cap_feats, cap_mask), and per case its x, t and output, with the dit_probes intermediates its
    probe names; caption rows past a caption's length are set to 0 (what a model computes there is its own)."""
    model = models[name](dtype, device)
    g = torch.Generator().manual_seed(r["seed"])
    B, L = len(r["lens"]), r["L"]
    out = {"cap_feats": torch.randn(B, L, model.cap_embedder[1].in_features, generator=g),
           "cap_mask": torch.arange(L)[None] < torch.tensor(r["lens"])[:, None]}
    valid = out["cap_mask"][:, :max(r["lens"]), None]  # (B, L', 1): the forward trims to the longest caption
    for i, case in enumerate(r["cases"]):
        x, t = torch.randn(B, model.in_channels, *case["hw"], generator=g), torch.tensor(case["t"])
        with torch.no_grad(), dit_probes(model, bool(case["probe"])) as got:
            v = model(*(a.to(device) for a in (x, t, out["cap_feats"].to(dtype), out["cap_mask"])))
        got = {k: a.float().cpu() for k, a in got.items() if any(k == p or k.startswith(p + ".") for p in case["probe"])}
        for k in ("cap_embedder", "context_refiner", "layers.0"):
            if k in got:
                got[k][:, :valid.shape[1]] *= valid
        out.update({f"case{i}.x": x, f"case{i}.t": t, f"case{i}.output": v, **{f"case{i}.{k}": a for k, a in got.items()}})
    return out


def ae_outputs(models, name, r, dtype, device):
    """A random image in [-1, 1] (1, 3, H, W), its latents (encode: the posterior mean, scaled and shifted), their decode."""
    ae = models["ae"](dtype, device)
    image = torch.rand(1, 3, *r["hw"], generator=torch.Generator().manual_seed(r["seed"])) * 2 - 1
    with torch.no_grad():
        latents = ae.encode(image.to(device, dtype))
        return {"image": image, "latents": latents, "decoded": ae.decode(latents)}


def sample_outputs(models, name, r, dtype, device):
    """sample.sample as sample.py runs it: Gemma features of the caption (with the system prompt) and of the negative
    (none), seeded noise, the sigma grid, the latents after `steps` steps with CFG, and their decode; one model at a time."""
    te = models["gemma"](dtype, device)
    cond, uncond = te([r["caption"]], lumina2.SYSTEM_PROMPTS[r["system_prompt"]]), te([r["negative"]], "")
    del te
    noise = sample.seeded_noise(r["seeds"], *r["hw"])
    latents = sample.sample(models["dit"](dtype, device), noise.to(device), cond, uncond, r["steps"], r["cfg"], r["cfg_trunc"],
                            r["renorm"], r["solver"], r["shift"], progress=False)
    with torch.no_grad():
        images = models["ae"](dtype, device).decode(latents)
    return {"cond.features": cond[0], "cond.mask": cond[1], "uncond.features": uncond[0], "uncond.mask": uncond[1],
            "noise": noise, "sigmas": sample.sigma_schedule(r["steps"], r["shift"]), "latents": latents, "images": images}


OUTPUTS = {"gemma": gemma_outputs, "dit": dit_outputs, "dit_wide": dit_outputs, "ae": ae_outputs, "sample": sample_outputs}


def reference_outputs(recipe, models, device="cpu", only=None):
    """recipe (see recipe_for) and models ({name: (dtype, device) -> model}) -> {model: {tensor name: CPU tensor}}: floating
    tensors in fp32, whatever dtype the models ran in. IEEE fp32 matmuls and convolutions (no TF32 on a GPU)."""
    dtype, out = DTYPES[recipe["dtype"]], {}
    with data.exact_fp32():
        for name, r in recipe["models"].items():
            if only is None or name in only:
                tensors = OUTPUTS[name](models, name, r, dtype, device)
                out[name] = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in tensors.items()}
    return out


def git_commit():
    """This checkout's commit, "-dirty" when it has uncommitted changes; None outside a git checkout."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True, check=True).stdout.strip()
        return run("rev-parse", "HEAD") + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def recipe_for(kind, dtype="float32"):
    """The recipe.json of a dump: the inputs (RECIPES[kind]), the dtype, the seed and what made it."""
    import platform
    import sentencepiece
    import transformers
    return {"kind": kind, "seed": 0, "dtype": dtype, "models": RECIPES[kind],
            "made_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "sentencepiece": sentencepiece.__version__, "python": platform.python_version(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "commit": git_commit()}}


@contextlib.contextmanager
def models_of(recipe, weights):
    """The models a recipe was made with: the random ones from its seed (in a temp folder for the block), or the real files."""
    if (recipe["kind"] == "real") != bool(weights):
        raise files.BadInput(f"this dump was made from {'the real weights: pass --weights DIR' if weights is None else 'the random models: leave out --weights'}")
    if weights:
        yield real_models(weights)
        return
    with tempfile.TemporaryDirectory() as folder:
        yield random_models(folder, recipe["seed"])


def dump(folder, weights=None, dtype="float32", device="cpu", only=None):
    """Write recipe.json and one <model>.safetensors per model into `folder` (atomically) -> the outputs."""
    recipe = recipe_for("real" if weights else "random", dtype)
    recipe["models"] = {n: r for n, r in recipe["models"].items() if only is None or n in only}
    with models_of(recipe, weights) as models:
        outputs = reference_outputs(recipe, models, device)
    for name, tensors in outputs.items():
        files.save_file_atomic(tensors, os.path.join(folder, f"{name}.safetensors"))

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(recipe, indent=1, ensure_ascii=False) + "\n")
    files.atomic_write(os.path.join(folder, "recipe.json"), write_json)
    return outputs


def read_dump(folder, only=None):
    """-> (recipe, {model: {tensor name: tensor}}) of a dump folder."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "recipe.json")
    if not os.path.isfile(path):
        raise files.BadInput(f"{folder} holds no recipe.json: make a dump with `python test_parity.py --dump {folder}`")
    with open(path, encoding="utf-8") as fh:
        recipe = json.load(fh)
    names = [n for n in recipe["models"] if only is None or n in only]
    return recipe, {n: load_file(os.path.join(folder, f"{n}.safetensors")) for n in names}


def compare(got, want, bound):
    """-> one row per tensor of either side: model, name, max abs error, relative error (max|got - want| / max|want|), the
    bound (0 for ids, masks and positions) and ok. A tensor missing on one side, or of another shape, fails."""
    rows = []
    for model in want:
        for name in sorted(set(want[model]) | set(got.get(model, {}))):
            a, b = got.get(model, {}).get(name), want[model].get(name)
            row = dict(model=model, name=name, abs=math.inf, rel=math.inf, bound=bound if b is None or b.is_floating_point() else 0)
            if a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype:
                diff = (a.double() - b.double()).abs()
                row["abs"] = diff.max().item() if diff.numel() else 0.0
                row["rel"] = row["abs"] / max(b.double().abs().max().item() if b.numel() else 0.0, 1e-30)
            row["note"] = "" if a is not None and b is not None else "missing from the dump" if b is None else "not produced"
            if a is not None and b is not None and (a.shape != b.shape or a.dtype != b.dtype):
                row["note"] = f"{tuple(a.shape)} {a.dtype} here, {tuple(b.shape)} {b.dtype} in the dump"
            rows.append(dict(row, ok=row["rel"] <= row["bound"] if row["bound"] else row["abs"] == 0))
    return rows


def report(rows):
    """Print each model's worst tensor (its name, max abs and relative error, bound) and every failing one -> all ok."""
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        worst = max(mine, key=lambda r: (not r["ok"], r["rel"] / r["bound"] if r["bound"] else r["abs"] > 0))
        print(f"{model:9s} {len(mine):3d} tensors, worst {worst['name']}: max abs {worst['abs']:.2e}, rel {worst['rel']:.2e}, "
              f"bound {worst['bound']:.0e}{'' if worst['ok'] else '  FAILED'}")
        for r in mine:
            if not r["ok"]:
                print(f"  FAILED {model}/{r['name']}: max abs {r['abs']:.2e}, rel {r['rel']:.2e} > bound {r['bound']:.0e} {r['note']}")
    return all(r["ok"] for r in rows)


def check(folder, weights=None, device="cpu", only=None, tolerance=None):
    """The current code against the dump in `folder` -> rows (see compare); tolerance None: TOLERANCES[the dump's dtype]."""
    recipe, want = read_dump(folder, only)
    with models_of(recipe, weights) as models:
        got = reference_outputs(recipe, models, device, only)
    return compare(got, want, tolerance or TOLERANCES[recipe["dtype"]])


@pytest.fixture(scope="module")
def fresh_reference():
    """The random models' outputs for the committed dump's recipe, computed once by the current code."""
    recipe, _ = read_dump(REFERENCE)
    with models_of(recipe, None) as models:
        return reference_outputs(recipe, models)


def test_committed_reference_outputs_still_hold(fresh_reference):
    """Any change to our numerics fails here, naming the tensor (rebuild the dump on purpose: docs/reference-outputs.md)."""
    recipe, want = read_dump(REFERENCE)
    assert recipe["models"] == json.loads(json.dumps(RECIPES["random"])), "the committed dump was made from another recipe"
    rows = compare(fresh_reference, want, TOLERANCES["float32"])
    assert report(rows), "\n".join(f"{r['model']}/{r['name']}: rel {r['rel']:.2e} {r['note']}" for r in rows if not r["ok"])
    assert {r["model"] for r in rows} == set(RECIPES["random"]) and len(rows) > 60


def test_a_dump_checked_against_itself_is_exact(tmp_path, fresh_reference):
    dump(str(tmp_path))
    rows = compare(fresh_reference, read_dump(str(tmp_path))[1], TOLERANCES["float32"])
    assert rows and all(r["abs"] == 0 for r in rows)  # bit for bit: the same code, inputs and weights, rebuilt from seeds
    with open(tmp_path / "recipe.json", encoding="utf-8") as fh:
        made = json.load(fh)["made_with"]
    assert made["torch"] == torch.__version__ and made["python"] == sys.version.split()[0]


def test_a_perturbed_weight_is_reported_by_name(monkeypatch, capsys):
    """One element of layers.0's FFN output weight (mean |w| 0.03), moved by 0.01: the check fails exactly the tensors after
    it, layers.0's output and the velocity (rel ~4e-4, 20x the bound), and leaves what comes before it untouched: the same
    error against the dump as the unperturbed model's, bit for bit (on other CPU kernels than the dump's that error is not 0)."""
    clean = {r["name"]: r["abs"] for r in check(REFERENCE, only=("dit",))}
    load = weightfiles.load_dit

    def perturbed(*args, **kwargs):
        model = load(*args, **kwargs)
        model.layers[0].feed_forward.w2.weight.data[0, 0] += 0.01
        return model
    monkeypatch.setattr(weightfiles, "load_dit", perturbed)
    rows = check(REFERENCE, only=("dit",))
    assert not report(rows)
    failed = {r["name"] for r in rows if not r["ok"]}
    assert failed == {"case0.layers.0", "case0.output", "case1.layers.0", "case1.output"}
    assert "FAILED dit/case0.layers.0" in capsys.readouterr().out
    before = [r for r in rows if any(k in r["name"] for k in ("t_emb", "rope", "cap_embedder", "refiner"))]
    assert before and all(r["abs"] == clean[r["name"]] for r in before)


def test_the_real_recipe_reads_the_three_files_by_their_names(tmp_path, capsys):
    """--weights DIR: the real recipe on files in the real layouts (the demo's tiny ones here), through the command line."""
    weights = os.path.dirname(tinyworld.make_demo_weights(str(tmp_path / "weights"))["dit"])
    ref = str(tmp_path / "ref")
    assert main(["--dump", ref, "--weights", weights, "--only", "dit,ae"]) == 0
    assert main(["--check", ref, "--weights", weights]) == 0
    out = capsys.readouterr().out
    assert "dit.safetensors (34 tensors), ae.safetensors (3 tensors)" in out and out.count("rel 0.00e+00, bound 2e-05") == 2
    with pytest.raises(SystemExit, match="made from the real weights: pass --weights DIR"):
        main(["--check", ref])
    with pytest.raises(SystemExit, match="none of lumina_2_model_bf16.safetensors, lumina-image-2.safetensors in"):
        main(["--check", ref, "--weights", str(tmp_path), "--only", "dit"])


def main(argv):
    """python test_parity.py [--dump DIR | --check DIR] [--weights DIR] [--dtype D] [--device D] [--only a,b]; with neither
    --dump nor --check, the parity tests (pytest), the real-file ones too with --weights."""
    cli = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--dump", metavar="DIR", help="write the reference outputs of the current code into DIR")
    cli.add_argument("--check", metavar="DIR", help="compare the current code against the dump in DIR; exit 1 on failure")
    cli.add_argument("--weights", metavar="DIR", help="the real files' folder (else: the random models from their seeds)")
    cli.add_argument("--dtype", default="float32", choices=list(DTYPES), help="what the models run in, for --dump")
    cli.add_argument("--device", default="cpu", help="where the models run (cuda: no TF32)")
    cli.add_argument("--only", type=lambda s: s.split(","), help=f"some of {','.join(OUTPUTS)}")
    cli.add_argument("--tolerance", type=float, help="replace the dtype's bound, for --check (see TOLERANCES)")
    args, rest = cli.parse_known_args(argv)
    if args.only and set(args.only) - set(OUTPUTS):
        cli.error(f"--only takes names from {', '.join(OUTPUTS)}, got {','.join(args.only)}")
    try:
        if args.dump:
            outputs = dump(args.dump, args.weights, args.dtype, args.device, args.only)
            print(f"wrote {', '.join(f'{n}.safetensors ({len(t)} tensors)' for n, t in outputs.items())} and recipe.json to {args.dump}")
            return 0
        if args.check:
            return 0 if report(check(args.check, args.weights, args.device, args.only, args.tolerance)) else 1
    except files.BadInput as e:
        sys.exit(str(e))
    if args.weights:
        os.environ["LUMINA2_WEIGHTS"] = args.weights
    return pytest.main([__file__, "-q", "-s", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
