"""
Parity tests: lumina2.py against independent implementations (diffusers' Lumina2Transformer2DModel and
AutoencoderKL, transformers' Gemma2Model, SentencePiece), on tiny random models written to disk in the
real file layouts and read back through the real loaders. CPU, offline.

    python -m pytest -q test_parity.py
    python test_parity.py --weights DIR     # also compare the real files in DIR against diffusers

Tolerances: fp32 comparisons use max|a-b| / max|b| <= 1e-5 (the two implementations differ only in
summation order and RoPE table precision); bf16 results are compared to fp32 with a stated bound.
"""
import io
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

import files
import lumina2
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


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--weights" in args:
        i = args.index("--weights")
        os.environ["LUMINA2_WEIGHTS"] = args[i + 1]
        del args[i:i + 2]
    sys.exit(pytest.main([__file__, "-q", "-s", *args]))
