"""
Helpers shared by the test files (the fixtures are in conftest.py). A test file imports these from here,
never from another test file, so that each test file can be run, renamed or removed on its own.
"""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

import checkpoint
import data
import lora
import lumina2
import sample
import train
import weightfiles


def rel_err(a, b):
    """max |a - b| / max |b|, in fp32: the error of a against the reference b, relative to b's scale."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# -----------------------------------------------------------------------------
# models and key maps


def perturb_norms(model, seed=0):
    """Norm weights start at ones (or zeros); randomise them so the test sees every weight's role."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.ndim == 1:  # norm scales only, not Linears named norm_*
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def diffusers_to_original(sd):
    """The inverse of diffusers' convert_lumina2_to_diffusers, written here from the two module trees."""
    out = {}
    renames = [("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
               ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
               ("time_caption_embed.caption_embedder", "cap_embedder"),
               ("norm_out.linear_1", "final_layer.adaLN_modulation.1"), ("norm_out.linear_2", "final_layer.linear"),
               (".attn.to_out.0.", ".attention.out."), (".attn.norm_q.", ".attention.q_norm."),
               (".attn.norm_k.", ".attention.k_norm."), (".feed_forward.linear_1.", ".feed_forward.w1."),
               (".feed_forward.linear_2.", ".feed_forward.w2."), (".feed_forward.linear_3.", ".feed_forward.w3."),
               (".norm1.linear.", ".adaLN_modulation.1."), (".norm1.norm.", ".attention_norm1."),
               (".norm1.weight", ".attention_norm1.weight"), (".norm2.", ".attention_norm2.")]
    for k, v in sd.items():
        if ".attn.to_k." in k or ".attn.to_v." in k:
            continue
        if ".attn.to_q." in k:
            kk, vv = k.replace("to_q", "to_k"), k.replace("to_q", "to_v")
            out[k.replace(".attn.to_q.", ".attention.qkv.")] = torch.cat([v, sd[kk], sd[vv]])
            continue
        for a, b in renames:
            k = k.replace(a, b)
        out[k] = v
    out["norm_final.weight"] = torch.ones(sd["x_embedder.weight"].shape[0])
    return out


def ragged_batch(B=3, cap_dim=32, L=12, lens=(12, 5, 9), hw=(8, 12), seed=0):
    """(x, t, cap_feats, cap_mask) with captions of different valid lengths: the padded case every path must get right."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, *hw, generator=g)
    t = torch.rand(B, generator=g)
    cap = torch.randn(B, L, cap_dim, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]
    return x, t, cap, mask


def full_width_config():
    """2304 wide with 24/8 heads (the width diffusers' converter hard-codes), one layer each, a 64-wide FFN."""
    return dict(lumina2.DIT_PRESETS["2b"], n_layers=1, n_refiner_layers=1, multiple_of=64,
                ffn_dim_multiplier=64 / (4 * 2304), cap_feat_dim=32)


# -----------------------------------------------------------------------------
# a tiny LoRA model and its training, for the memory tests (test_memory.py on CPU, test_cuda.py on CUDA)

TINY = dict(lumina2.DIT_PRESETS["tiny"], n_layers=5)  # 5 main layers: 3 swapped through 2 slots rotate


def tiny_lora_model(seed=0, dtype=torch.float32, embedder_dims=None, **overrides):
    torch.manual_seed(seed)
    model = perturb_norms(lumina2.NextDiT(**dict(TINY, **overrides)), seed).to(dtype)
    lora.inject(model, rank=4, embedder_dims=embedder_dims)
    with torch.no_grad():  # lora_up starts at zero; a random pair gives every LoRA weight a gradient at step 1
        for m in lora.lora_modules(model).values():
            m.lora_up.weight.normal_(0, 0.02)
    return model


def batch(seed=0, L=7, lens=(7, 4), hw=(8, 8), device="cpu"):
    """(x (2, 16, h, w), t (2,), caption features (2, L, 64), mask (2, L)), drawn on the CPU and then moved."""
    g = torch.Generator().manual_seed(seed)
    b = (torch.randn(2, 16, *hw, generator=g), torch.rand(2, generator=g), torch.randn(2, L, 64, generator=g),
         torch.arange(L)[None] < torch.tensor(lens)[:, None])
    return tuple(t.to(device) for t in b)


def loss_of(model, b):
    x, t, cap, mask = b
    return (model(x, t, cap, mask) - x).square().mean()  # any scalar that reaches every weight does


def train_lora(model, steps=3, lr=1e-2, device="cpu"):
    """steps AdamW steps on the LoRA, a new batch each -> ([(loss, grads)] per step, LoRA weights after)."""
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr)
    history = []
    for step in range(steps):
        loss = loss_of(model, batch(step, device=device))
        loss.backward()
        history.append((loss.detach(), [p.grad.clone() for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history, [p.detach().clone() for p in params]


def assert_same_training(a, b):
    for (loss_a, grads_a), (loss_b, grads_b) in zip(a[0], b[0]):
        assert torch.equal(loss_a, loss_b)
        assert all(torch.equal(g, h) for g, h in zip(grads_a, grads_b))
    assert all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


# -----------------------------------------------------------------------------
# train.py end to end on the tiny demo weights


def one_image_dataset(folder, caption="a red circle on a white background"):
    os.makedirs(folder, exist_ok=True)
    img = Image.new("RGB", (64, 64), "white")
    for x in range(64):
        for y in range(64):
            if (x - 30) ** 2 + (y - 34) ** 2 < 200:
                img.putpixel((x, y), (220, 30, 30))
    img.save(os.path.join(folder, "circle.png"))
    with open(os.path.join(folder, "circle.txt"), "w") as fh:
        fh.write(caption)
    return folder


def cli_args(weights):
    """The flags every test run starts from (later flags override them): the tiny weights, CPU, fp32, 64 px,
    no checkpointing, no end-of-epoch saves, output name t."""
    return [f"--dit_path={weights['dit']}", f"--gemma_path={weights['gemma']}", f"--ae_path={weights['ae']}",
            "--device=cpu", "--mixed_precision=no", "--resolution=64", "--gradient_checkpointing=False",
            "--save_every_n_epochs=0", "--max_train_epochs=0", "--output_name=t"]


def run(weights, tmp_path, *args):
    return train.main(cli_args(weights) + [f"--output_dir={tmp_path / 'out'}", *args])


# 8 noise draws: one sample's error varies by about +-0.04 with its noise (measured on the tiny model), the
# mean of 8 by about a third of that, so the verdict is the model's and not one draw's
MEMORISATION_SEEDS = (123, 0, 1, 2, 3, 4, 5, 6)


def memorisation_error(weights, tmp_path, model, caption, seeds=MEMORISATION_SEEDS):
    """Sample the training caption from fixed noise draws (one per seed, 20 Euler steps) and compare with the
    training latent: the mean over the draws of |sample - latent| / |latent|."""
    te = weightfiles.load_text_encoder(weights["gemma"], dtype=torch.float32)
    ae = weightfiles.load_ae(weights["ae"], dtype=torch.float32)
    img = data.to_tensor(Image.open(tmp_path / "img" / "circle.png").convert("RGB"))[None]
    with torch.no_grad():
        target = ae.encode(img)
    cond = te([caption], lumina2.SYSTEM_PROMPTS["base"])
    noise = torch.cat([torch.randn(target.shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    model.eval()
    got = sample.sample(model, noise, cond, None, steps=20, cfg=1.0, progress=False)
    return ((got - target).flatten(1).norm(dim=1) / target.norm()).mean().item()


def flipped_target_loss(model, *args, **kwargs):
    """A convention bug on purpose: the target is noise - x0 (the sign ComfyUI applies outside the model), made by
    negating the model's output inside train.py's own loss: mse(-v, x0 - noise) = mse(v, noise - x0)."""
    return TRUE_LOSS(lambda *a, **k: -model(*a, **k), *args, **kwargs)


TRUE_LOSS = train.flow_matching_loss  # kept here: the tests that replace train.flow_matching_loss call it


def killed_then_resumed(weights, tmp_path, monkeypatch, args):
    """Run, killed right after its first state file is written (the step-3 checkpoint), then resume it."""
    saved = checkpoint.save_state

    def save_then_die(*a, **k):
        saved(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(weights, tmp_path, *args)
    monkeypatch.undo()
    return run(weights, tmp_path, *args, "--resume=True")


def run_sample(weights, out_dir, *flags):
    """sample.py on the tiny demo weights: CPU, fp32, 32 px, 2 steps, one fixed prompt (later flags override)."""
    return sample.main([f"--dit_path={weights['dit']}", f"--gemma_path={weights['gemma']}", f"--ae_path={weights['ae']}",
                        f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32", "--width=32", "--height=32",
                        "--steps=2", "--prompt=a red circle on a white background", *flags])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: where train.py runs


def torchrun(args, nproc=2, fresh=None, script="train.py"):
    """Launch train.py on nproc gloo processes. Training is deterministic, so a bug fails every launch; a
    launch that fails is retried once (after emptying `fresh`, the run's output folder, when given) with
    its output shown as a warning: one in about twenty full-suite runs here lost a launch to the launcher
    or the transport, not to train.py."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    for attempt in (1, 2):
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode == 0:
            return res
        output = res.stdout[-3000:] + res.stderr[-3000:]
        assert attempt == 1, output
        warnings.warn(f"torchrun failed once (exit {res.returncode}), retrying:\n{output}")
        if fresh:
            shutil.rmtree(fresh, ignore_errors=True)
