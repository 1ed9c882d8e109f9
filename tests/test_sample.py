"""
Tests for sample.py (CPU, offline, fp32): the whole sampler against diffusers' Lumina2Pipeline, CFG
truncation / renorm and the midpoint solver against the official rules written out here, the sigma grid
against diffusers' scheduler, and the script end to end on tiny demo weights, bad inputs included.

    python -m pytest -q test_sample.py
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lumina2
import sample
from testutil import diffusers_to_original, perturb_norms, run_sample

TINY_DIT = dict(lumina2.DIT_PRESETS["tiny"], cap_feat_dim=32)


def random_captions(B, L, lens, seed, dim=32):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, L, dim, generator=g)
    return feats, torch.arange(L)[None] < torch.tensor(lens)[:, None]


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return perturb_norms(lumina2.NextDiT(**TINY_DIT), 1).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# numerics


def test_sigma_schedule_matches_diffusers_and_official_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler
    for n in (1, 4, 30):
        sched = FlowMatchEulerDiscreteScheduler(shift=6.0)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))  # what Lumina2Pipeline passes
        ours = sample.sigma_schedule(n, 6.0)
        assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
        torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=1e-6)
        t = torch.linspace(0, 1, n + 1, dtype=torch.float64)  # official: t / (t + s - s t) on n + 1 points
        torch.testing.assert_close(ours, (1 - t / (t + 6.0 - 6.0 * t)).float(), rtol=0, atol=1e-6)


def test_euler_cfg_matches_diffusers_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    torch.manual_seed(0)
    ref_dit = perturb_norms(Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(8, 4, 4), axes_lens=(300, 512, 512),
        cap_feat_dim=32), 1).eval()
    dit = lumina2.NextDiT(**TINY_DIT)
    dit.load_state_dict(diffusers_to_original(ref_dit.state_dict()), strict=True)
    ae = perturb_norms(lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"]), 2).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), vae.config), strict=True)
    pipe = Lumina2Pipeline(transformer=ref_dit, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=vae,
                           text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)

    H, W = 32, 48  # latents 4 x 6: a non-square size catches an H/W swap
    cond = random_captions(2, 7, [7, 5], seed=3)
    uncond = random_captions(2, 7, [3, 3], seed=4)
    noise = sample.seeded_noise([11, 12], H, W)
    args = dict(height=H, width=W, num_inference_steps=4, guidance_scale=4.0, cfg_trunc_ratio=1.0, cfg_normalization=False,
                prompt_embeds=cond[0], prompt_attention_mask=cond[1], negative_prompt_embeds=uncond[0],
                negative_prompt_attention_mask=uncond[1])
    with torch.no_grad():
        ref_latents = pipe(latents=noise.clone(), output_type="latent", **args).images
        ref_images = pipe(latents=noise.clone(), output_type="pt", **args).images  # (B, 3, H, W) in [0, 1]
    latents = sample.sample(dit, noise, cond, uncond, steps=4, cfg=4.0, cfg_trunc=1.0, renorm=0.0, solver="euler",
                            shift=6.0, progress=False)
    err = ((latents - ref_latents).abs().max() / ref_latents.abs().max()).item()
    print(f"latents vs diffusers: max |d| / max |ref| = {err:.2e}")
    assert err < 1e-5
    with torch.no_grad():
        images = (ae.decode(latents) / 2 + 0.5).clamp(0, 1)
    img_err = (images - ref_images).abs().max().item()
    print(f"images vs diffusers: max |d| = {img_err:.2e}")
    assert images.shape == ref_images.shape == (2, 3, H, W) and img_err < 1e-4
    pil = sample.decode_to_images(ae, latents)
    assert pil[0].size == (W, H) and pil[0].mode == "RGB"
    ref_u8 = (ref_images * 255).round().permute(0, 2, 3, 1).numpy()
    assert max(np.abs(np.asarray(im, dtype=np.float32) - r).max() for im, r in zip(pil, ref_u8)) <= 1


def official_velocity(model, x, t, cond, uncond, w, trunc, r):
    """NextDiT.forward_with_cfg's rules, with cond and uncond as separate calls: guidance only while t < trunc,
    then cap each sample's whole-tensor norm at r * ||v_c|| (scaling down only)."""
    v_c = model(x, t, *cond)
    if not t[0] < trunc:
        return v_c
    v_u = model(x, t, *uncond)
    v = v_u + w * (v_c - v_u)
    if r <= 0:
        return v
    rows = []
    for b in range(len(v)):
        limit, norm = r * torch.linalg.vector_norm(v_c[b]), torch.linalg.vector_norm(v[b])
        rows.append(v[b] * (limit / norm) if norm >= limit else v[b])
    return torch.stack(rows)


def official_ode(model, noise, cond, uncond, steps, w, trunc, r, method, shift=6.0):
    """The official fixed-grid ODE in t (0 = noise): shifted grid t / (t + s - s t); Euler, or midpoint as
    torchdiffeq does it (the full step uses the velocity at t + dt/2, reached by half an Euler step)."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    t = (t / (t + shift - shift * t)).float()
    f = lambda tt, x: official_velocity(model, x, tt.expand(len(x)), cond, uncond, w, trunc, r)
    x = noise.clone()
    with torch.no_grad():
        for i in range(steps):
            dt = t[i + 1] - t[i]
            x = x + dt * (f(t[i], x) if method == "euler" else f(t[i] + dt / 2, x + dt / 2 * f(t[i], x)))
    return x


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_truncated_renormed_cfg_matches_official_rules(dit, solver):
    noise = sample.seeded_noise([5, 6], 32, 32)
    cond, uncond = random_captions(2, 6, [6, 4], seed=7), random_captions(2, 2, [2, 1], seed=8)
    # with shift 6 and 6 steps the t grid is 0, .03, .08, .14, .25, .45, 1: trunc 0.3 drops CFG on the last interval
    kw = dict(steps=6, cfg=4.0, cfg_trunc=0.3, renorm=1.0)
    ours = sample.sample(dit, noise, cond, uncond, solver=solver, shift=6.0, progress=False, **kw)
    ref = official_ode(dit, noise, cond, uncond, 6, 4.0, 0.3, 1.0, solver)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err
    always = sample.sample(dit, noise, cond, uncond, solver=solver, progress=False, **dict(kw, cfg_trunc=1.0))
    assert (always - ours).abs().max() > 1e-3  # truncation did something


def test_cfg_batches_cond_and_uncond_and_skips_uncond_when_truncated(dit, monkeypatch):
    calls, stack = [], sample.stack_captions

    def counting(x, t, *caption):  # feats, mask and the host lengths
        calls.append(x.shape[0])
        return dit(x, t, *caption)

    noise = sample.seeded_noise([1, 2], 32, 32)
    cond, uncond = random_captions(1, 5, [5], seed=1), random_captions(1, 1, [1], seed=2)
    sample.sample(counting, noise, cond, uncond, steps=6, cfg=3.0, cfg_trunc=0.3, renorm=0.0, progress=False)
    assert calls == [4] * 5 + [2]  # one batch of 2B while guided, B alone once truncated
    stacked = []
    monkeypatch.setattr(sample, "stack_captions", lambda *a: stacked.append(1) or stack(*a))
    sample.sample(counting, noise, cond, uncond, steps=6, cfg=3.0, renorm=0.0, progress=False)
    assert len(stacked) == 1  # the cond + uncond caption batch is built once per image batch, not per step
    calls.clear()
    sample.sample(counting, noise, cond, uncond, steps=3, cfg=1.0, progress=False)
    assert calls == [2] * 3  # cfg 1 needs no unconditional pass


def test_renorm_caps_whole_sample_norm_and_only_scales_down(dit):
    x = sample.seeded_noise([3, 4], 32, 32)
    sigma = torch.tensor(0.7)
    cond, uncond = random_captions(2, 6, [6, 3], seed=5), random_captions(2, 4, [4, 2], seed=6)
    t = (1 - sigma).expand(2)
    with torch.no_grad():
        v_c = dit(x, t, *cond)
        v_free = sample.cfg_velocity(dit, x, sigma, cond, uncond, 5.0, 1.0, 0.0)
    ratios = torch.linalg.vector_norm(v_free, dim=(1, 2, 3)) / torch.linalg.vector_norm(v_c, dim=(1, 2, 3))
    r = ratios.mean().item()  # between the two samples' ratios: the cap binds for exactly one of them
    assert ratios.min() < r < ratios.max()
    ours = sample.cfg_velocity(dit, x, sigma, cond, uncond, 5.0, 1.0, r)
    with torch.no_grad():
        ref = official_velocity(dit, x, t, cond, uncond, 5.0, 1.0, r)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5  # batched 2B vs separate calls: fp32 noise
    changed = [(ours[b] - v_free[b]).abs().max().item() > 1e-6 for b in range(2)]
    assert sorted(changed) == [False, True]


# -----------------------------------------------------------------------------
# the script on tiny demo weights


def test_script_is_deterministic_per_seed_and_records_settings(weights, tmp_path):
    a = run_sample(weights, tmp_path / "a", "--seeds=[7]")
    b = run_sample(weights, tmp_path / "b", "--seeds=[7]")
    c = run_sample(weights, tmp_path / "a", "--seeds=[8]")
    assert [p.rsplit("/", 1)[1] for p in a + c] == ["00000-7.png", "00001-8.png"]  # a rerun never overwrites
    assert open(a[0], "rb").read() == open(b[0], "rb").read()
    assert not np.array_equal(np.asarray(Image.open(a[0])), np.asarray(Image.open(c[0])))
    info = json.loads(Image.open(a[0]).text["parameters"])
    assert info["prompt"] == "a red circle on a white background" and info["seed"] == 7
    assert info["steps"] == 2 and info["dit"] == "lumina_2_model_bf16.safetensors" and info["lora_weights"] == []


def test_prompt_file_options_batches_and_grid(weights, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# comment\n\na red circle --d 3,4\na blue square --w 48 --h 16 --d 5 --s 1 --l 1.0 --n ugly\n")
    paths = run_sample(weights, tmp_path / "out", f"--prompt_file={pf}", "--batch_size=2", "--grid=True")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000-3.png", "00001-4.png", "00002-5.png", "00003-grid.png"]
    info = json.loads(Image.open(paths[2]).text["parameters"])
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["cfg"]) == ("a blue square", "ugly", 1, 1.0)
    assert Image.open(paths[2]).size == (48, 16) and Image.open(paths[3]).size == (96, 64)
    single = run_sample(weights, tmp_path / "single", "--prompt=a red circle", "--seeds=[4]", "--batch_size=1")
    diff = np.abs(np.asarray(Image.open(single[0]), dtype=int) - np.asarray(Image.open(paths[1]), dtype=int)).max()
    assert diff <= 1  # a seed's image does not depend on the batch it was drawn in


def test_bad_size(weights, tmp_path):
    with pytest.raises(SystemExit, match="multiples of 16, got 40x32"):
        run_sample(weights, tmp_path, "--width=40")
    pf = tmp_path / "p.txt"
    pf.write_text("a cat --h 50\n")
    with pytest.raises(SystemExit, match="multiples of 16, got 32x50"):
        run_sample(weights, tmp_path, f"--prompt_file={pf}")


def test_empty_prompt_file(weights, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("\n# only a comment\n   \n")
    with pytest.raises(SystemExit, match="holds no prompts"):
        run_sample(weights, tmp_path, f"--prompt_file={pf}")


def test_missing_or_wrong_weight_file(weights, tmp_path):
    missing = str(tmp_path / "nope" / "lumina.safetensors")
    with pytest.raises(SystemExit, match=f"weight file not found: {missing}"):
        run_sample(weights, tmp_path, f"--dit_path={missing}")
    with pytest.raises(SystemExit, match="does not look like a Lumina 2 Next-DiT.*FLUX autoencoder"):
        run_sample(weights, tmp_path, f"--dit_path={weights['ae']}")


def test_long_caption_is_truncated_with_a_warning(weights, tmp_path):
    caption = "a yellow star next to a purple heart " * 4
    with pytest.warns(UserWarning, match=r"truncated to 12.*caption 'a yellow star.*max_length=12"):
        paths = run_sample(weights, tmp_path, f"--prompt={caption}", "--max_length=12", "--system_prompt=")
    assert len(paths) == 1
