"""
Full fine-tuning and multi-process tests: stochastic rounding against its definition, what each way of
applying an fp32 update to bf16 weights keeps (measured), the step fused into backward against the step
after it, exact resume, EMA against the formula, the saved model through our loader and diffusers'
converter, and torchrun (gloo, 2 processes on CPU) against one process with the combined batch.

    python -m pytest -q test_full.py -s        # -s prints the measured figures
"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lumina2
import optim
import tinyworld
import train
import weightfiles
from testutil import ROOT, cli_args, full_width_config, killed_then_resumed, memorisation_error, one_image_dataset, run, torchrun



def bf16_neighbours(x):
    """The two bf16 values around fp32 x, from the bit pattern: truncation toward zero, and one bf16 step
    further from zero (written here independently of train.py's rounding)."""
    low = (x.view(torch.int32) & -65536).view(torch.float32)
    high = (low.view(torch.int32) + 65536).view(torch.float32)
    return low, high


def rounded(x, g):
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    optim.stochastic_round_(out, x, g)
    return out.float()


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-3, 2, 4096)
    low, high = bf16_neighbours(x)
    gap = (high - low).abs()
    draws = torch.stack([rounded(x, g) for _ in range(400)])
    assert ((draws == low) | (draws == high)).all()  # always one of the two neighbours
    p_up = (draws == high).float().mean(0)
    want = ((x - low) / (high - low)).abs()  # the probability of rounding away from zero that makes E = x
    assert (p_up - want).abs().max() < 0.15  # 400 draws: binomial sd <= 0.025; 6 sd over 4096 values
    bias = ((draws.mean(0) - x) / gap).mean()
    print(f"stochastic rounding: mean bias over 4096 values = {bias:.4f} bf16 steps (400 draws each)")
    assert abs(bias) < 0.01


def quadratic_run(w0, target, dtype, update, steps=1000, lr=1e-4):
    """AdamW on 0.5 ||w - target||^2 from w0, through optim.Optimizer (update = None: torch's AdamW on
    the bf16 tensor directly, i.e. round-to-nearest after every step)."""
    p = torch.nn.Parameter(w0.to(dtype, copy=True))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0) if update is None else \
        optim.Optimizer([[p]], "AdamW", lr, 0.0, update, seed=0)
    for _ in range(steps):
        p.grad = (p.detach().float() - target).to(dtype)
        opt.step() if update is None else opt.step(0)
    return p.detach().float()


def test_small_updates_survive_in_bf16_weights():
    """Weights of magnitude 1..1.5 (bf16 spacing 2^-7) pulled by AdamW at lr 1e-4 toward a target 0.02
    away: each update is ~1/80 of a bf16 step. Round-to-nearest loses all of them; stochastic rounding
    and fp32 master weights reach the target up to bf16's own resolution."""
    g = torch.Generator().manual_seed(0)
    w0 = 1 + 0.5 * torch.rand(1 << 14, generator=g)
    target = w0 + 0.02 * torch.randn(1 << 14, generator=g)
    floor = (target - target.bfloat16().float()).pow(2).mean().sqrt()  # rms error of the target itself in bf16
    rms = {name: (quadratic_run(w0, target, dt, up) - target).pow(2).mean().sqrt().item() for name, dt, up in
           [("fp32", torch.float32, "stochastic"), ("bf16 round-to-nearest", torch.bfloat16, None),
            ("bf16 stochastic", torch.bfloat16, "stochastic"), ("bf16 master", torch.bfloat16, "master")]}
    start = (w0 - target).pow(2).mean().sqrt().item()
    print(f"rms distance to the target after 1000 steps (start {start:.4f}, bf16 floor {floor:.4f}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in rms.items()))
    assert rms["fp32"] < 0.05 * start
    assert rms["bf16 round-to-nearest"] > 0.9 * start  # the update is lost
    assert rms["bf16 stochastic"] < 2 * floor and rms["bf16 master"] < 2 * floor


def full_args(folder, *extra):
    return [f"--train_data_dir={folder}", "--train_mode=full", "--lr_scheduler=constant", *extra]


def test_bf16_update_methods_on_the_tiny_model(weights, tmp_path, monkeypatch):
    """Full training at a fine-tuning learning rate (1e-4; the tiny model's weights are ~0.05, so most
    updates are below bf16's step): the final loss of each way to apply the update, against fp32 weights."""
    one_image_dataset(tmp_path / "img")
    args = full_args(tmp_path / "img", "--timestep_sampling=uniform", "--max_grad_norm=0.0", "--num_repeats=4",
                     "--train_batch_size=4", "--max_train_steps=200", "--learning_rate=1e-4")

    def final_loss(name, *extra):
        losses = run(weights, tmp_path / name, *args, *extra)["losses"]
        return sum(losses[-20:]) / 20

    loss = {"fp32": final_loss("fp32"), "bf16 stochastic": final_loss("sr", "--mixed_precision=bf16"),
            "bf16 master": final_loss("master", "--mixed_precision=bf16", "--bf16_update=master")}
    monkeypatch.setattr(optim, "stochastic_round_", lambda dst, src, *a, **k: dst.copy_(src))
    loss["bf16 round-to-nearest"] = final_loss("nearest", "--mixed_precision=bf16")
    print("final loss (mean of the last 20 of 200 steps): " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    assert abs(loss["bf16 stochastic"] - loss["fp32"]) < 0.02 * loss["fp32"]
    assert abs(loss["bf16 master"] - loss["fp32"]) < 0.02 * loss["fp32"]
    assert loss["bf16 round-to-nearest"] > 1.1 * loss["fp32"]


def test_memorisation_adafactor_bf16_fused(weights, tmp_path):
    """The 16 GB recipe (bf16 weights, Adafactor, stochastic rounding, step fused into backward, checkpointing)
    memorises one image like the fp32 AdamW run of test_train.py does."""
    caption = "a red circle on a white background"
    one_image_dataset(tmp_path / "img", caption)
    args = full_args(tmp_path / "img", "--timestep_sampling=uniform", "--max_grad_norm=0.0", "--num_repeats=4",
                     "--train_batch_size=4", "--mixed_precision=bf16", "--optimizer_type=Adafactor",
                     "--fused_backward_pass=True", "--gradient_checkpointing=True", "--learning_rate=3e-2")
    before = memorisation_error(weights, tmp_path, run(weights, tmp_path / "u", *args, "--max_train_steps=0")["model"].float(), caption)
    trained = run(weights, tmp_path / "t", *args, "--max_train_steps=600")
    after = memorisation_error(weights, tmp_path, trained["model"].float(), caption)
    print(f"memorisation (full, bf16, Adafactor, fused, checkpointing): {before:.3f} -> {after:.3f}")
    assert after < before / 3  # 1.59 -> 0.30 to 0.36 under default, avx2 and avx512 kernels and seeds 3, 7, 42


@pytest.mark.parametrize("extra", [["--mixed_precision=no"], ["--mixed_precision=bf16", "--bf16_update=master"],
                                   ["--mixed_precision=no", "--optimizer_type=Adafactor"]])
def test_fused_backward_equals_the_step_after_backward(weights, tmp_path, extra):
    """The fused step updates each tensor inside backward; the same deterministic update after backward must
    give the same weights, bit for bit (no clipping: fused clips per tensor, the plain path globally)."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=6)
    args = full_args(folder, "--max_grad_norm=0.0", "--train_batch_size=2", "--max_train_steps=4", "--learning_rate=1e-3", *extra)
    a = run(weights, tmp_path / "a", *args)["model"].state_dict()
    b = run(weights, tmp_path / "b", *args, "--fused_backward_pass=True", "--gradient_checkpointing=True")["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_embedder.weight"], load_file(weights["dit"])["x_embedder.weight"].to(a["x_embedder.weight"].dtype))


def test_fused_backward_never_holds_the_whole_models_gradients(weights, tmp_path, monkeypatch):
    """Count, at every tensor step, how many trained tensors hold a gradient: exactly one with the
    fused step (backward reaches each tensor once), all of them in the plain path."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=4)
    step, held = optim.Optimizer.step, []

    def counting_step(self, i):
        held.append(sum(p.grad is not None for g in self.groups for p in g))
        step(self, i)

    monkeypatch.setattr(optim.Optimizer, "step", counting_step)
    args = full_args(folder, "--mixed_precision=bf16", "--train_batch_size=2", "--max_train_steps=2", "--gradient_checkpointing=True")
    n = sum(p.requires_grad for p in run(weights, tmp_path / "a", *args, "--fused_backward_pass=True")["model"].parameters())
    fused = max(held)
    held.clear()
    run(weights, tmp_path / "b", *args)
    print(f"trained tensors holding a gradient at a step: fused at most {fused} of {n}; plain {max(held)} of {n}")
    assert fused == 1 and max(held) == n


def test_adafactor_with_an_absolute_learning_rate_warns(weights, tmp_path):
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=2)
    with pytest.warns(UserWarning, match="5e-4"):
        run(weights, tmp_path, *full_args(folder, "--optimizer_type=Adafactor", "--learning_rate=1e-5", "--max_train_steps=1"))


def test_fused_backward_needs_full_mode_one_process_no_accumulation(weights, tmp_path):
    with pytest.raises(SystemExit, match="fused_backward_pass needs"):
        run(weights, tmp_path, f"--train_data_dir={tmp_path}", "--fused_backward_pass=True")
    with pytest.raises(SystemExit, match="fused_backward_pass needs"):
        run(weights, tmp_path, *full_args(tmp_path, "--fused_backward_pass=True", "--gradient_accumulation_steps=2"))


def test_full_resume_is_bit_exact(weights, tmp_path, monkeypatch):
    """bf16 + Adafactor + stochastic rounding + fused step + EMA on CPU, killed after its step-3 checkpoint and
    resumed: the model, the EMA and the state equal an uninterrupted run (the rounding noise is resumed too)."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=8)
    args = full_args(folder, "--mixed_precision=bf16", "--optimizer_type=Adafactor", "--fused_backward_pass=True",
                     "--ema_decay=0.9", "--train_batch_size=2", "--caption_dropout_rate=0.3", "--learning_rate=1e-2",
                     "--lr_scheduler=cosine", "--max_train_steps=6", "--save_every_n_steps=3")
    whole = run(weights, tmp_path / "a", *args)
    resumed = killed_then_resumed(weights, tmp_path / "b", monkeypatch, args)
    for name in ["t.safetensors", "t-ema.safetensors"]:
        a, b = load_file(tmp_path / "a" / "out" / name), load_file(tmp_path / "b" / "out" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = torch.load(whole["state"], weights_only=False), torch.load(resumed["state"], weights_only=False)
    assert all(torch.equal(x, y) for x, y in zip(sa["params"] + sa["ema"], sb["params"] + sb["ema"]))
    assert sa["step"] == sb["step"] == 6 and 0 < len(resumed["losses"]) < len(whole["losses"])


@pytest.mark.parametrize("every", [1, 2])
def test_ema_follows_its_formula(weights, tmp_path, every):
    """bf16 weights are exact in the per-step model files, so the EMA can be recomputed here from them:
    e_0 = w_0, and at every `every`-th step e = d^every e + (1 - d^every) w in fp32 (the other steps leave it);
    the saved EMA is that, rounded to bf16."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=4)
    d = 0.7
    run(weights, tmp_path, *full_args(folder, "--mixed_precision=bf16", "--ema_decay=0.7", "--train_batch_size=2",
                                      f"--ema_every={every}", "--learning_rate=1e-2", "--max_train_steps=4",
                                      "--save_every_n_steps=1"))
    out = tmp_path / "out"
    ws = [load_file(weights["dit"])] + [load_file(out / f"t-step{k:06d}.safetensors") for k in (1, 2, 3, 4)]
    ema = {k: v.float() for k, v in ws[0].items()}
    for step, w in enumerate(ws[1:], 1):
        if step % every == 0:
            ema = {k: d ** every * ema[k] + (1 - d ** every) * w[k].float() for k in ema}
    got = load_file(out / "t-ema.safetensors")
    assert got.keys() == ws[0].keys()
    for k in got:
        if k == "norm_final.weight":  # not trained: its EMA is itself
            assert torch.equal(got[k], ws[0][k])
            continue
        step = ema[k].abs().clamp_min(1e-30) * 2 ** -7  # one bf16 step
        assert ((got[k].float() - ema[k]).abs() <= step).all(), k
    assert not torch.equal(got["layers.0.attention.qkv.weight"], ws[-1]["layers.0.attention.qkv.weight"])


def test_full_model_file_loads_in_our_loader_and_diffusers(weights, tmp_path):
    """A 2304-wide model (the width diffusers' converter hard-codes) trained for 2 steps in bf16: the file has
    the original keys and dtype (norm_final.weight kept), load_dit returns the trained weights exactly, and
    diffusers' convert_lumina2_to_diffusers builds a Lumina2Transformer2DModel that computes the same output."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
    torch.manual_seed(0)
    cfg = dict(full_width_config(), cap_feat_dim=tinyworld.DEMO_GEMMA["hidden_size"])
    base = str(tmp_path / "wide.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in lumina2.NextDiT(**cfg).state_dict().items()}, base)
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=2)
    trained = run({**weights, "dit": base}, tmp_path, *full_args(folder, "--mixed_precision=bf16", "--max_train_steps=2",
                                                                  "--learning_rate=1e-3", "--gradient_checkpointing=True"))
    path = trained["lora"]
    with safe_open(path, "pt") as f, safe_open(base, "pt") as g:
        assert set(f.keys()) == set(g.keys()) and "norm_final.weight" in f.keys()
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    ours = weightfiles.load_dit(path, dtype=torch.float32)
    model_sd = trained["model"].state_dict()
    assert all(torch.equal(v, model_sd[k].float()) for k, v in ours.state_dict().items())
    assert not torch.equal(load_file(path)["layers.0.attention.qkv.weight"], load_file(base)["layers.0.attention.qkv.weight"])
    ref = Lumina2Transformer2DModel(hidden_size=2304, num_layers=1, num_refiner_layers=1, num_attention_heads=24,
                                    num_kv_heads=8, multiple_of=64, ffn_dim_multiplier=cfg["ffn_dim_multiplier"],
                                    cap_feat_dim=cfg["cap_feat_dim"], in_channels=16)
    ref.load_state_dict(convert_lumina2_to_diffusers({k: v.float() for k, v in load_file(path).items()}), strict=True)
    g = torch.Generator().manual_seed(1)
    x, t, cap = torch.randn(2, 16, 4, 6, generator=g), torch.rand(2, generator=g), torch.randn(2, 7, cfg["cap_feat_dim"], generator=g)
    mask = torch.arange(7)[None] < torch.tensor([7, 4])[:, None]
    with torch.no_grad():
        want = ref(x, t, cap, mask, return_dict=False)[0]
        err = ((ours(x, t, cap, mask) - want).abs().max() / want.abs().max()).item()
    print(f"trained full-mode file through diffusers' converter, fp32: rel err {err:.2e}")
    assert err <= 1e-5


# -----------------------------------------------------------------------------
# torchrun: 2 processes (gloo, CPU) against 1 process with the combined batch


def trained_params(out, fsdp):
    """The fp32 trained tensors from the state file(s); FSDP2's per-rank shards are concatenated on dim 0."""
    if not fsdp:
        return torch.load(out / "t-state.pt", weights_only=False)["params"]
    shards = [torch.load(out / f"t-state-rank{r}.pt", weights_only=False)["params"] for r in (0, 1)]
    return [torch.cat(pair) for pair in zip(*shards)]


@pytest.mark.parametrize("mode,extra", [("lora", ["--gradient_accumulation_steps=2", "--network_dim=4"]),
                                        ("full", ["--parallel=ddp", "--ema_decay=0.9"]),
                                        ("full", ["--parallel=fsdp", "--gradient_checkpointing=True", "--ema_decay=0.9"])])
def test_two_processes_equal_one_with_the_combined_batch(weights, tmp_path, mode, extra):
    """13 images in 3 aspect buckets (5/4/4) cut into global batches of 4: a short batch of 1 leaves one rank
    with no sample (it runs with weight 0), the others split evenly. Noise and sigma are drawn per global batch,
    so both runs see the same numbers and must agree to fp32 summation noise. Only rank 0 writes files."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=13)
    common = cli_args(weights) + [
        f"--train_data_dir={folder}", f"--train_mode={mode}", "--learning_rate=1e-3", "--max_train_steps=5",
        "--cache_latents_to_disk=True", "--cache_text_encoder_outputs_to_disk=True",
        "--sample_prompts=['a red circle']", "--sample_steps=2", "--sample_width=64", "--sample_height=64", *extra]
    fsdp = "--parallel=fsdp" in extra
    one = tmp_path / "one"
    train.main(common + [f"--output_dir={one}", "--train_batch_size=4", "--parallel=ddp"])
    two = tmp_path / "two"
    torchrun(common + [f"--output_dir={two}", "--train_batch_size=2"], fresh=two)
    log_one, log_two = ([json.loads(line) for line in open(d / "t-log.jsonl")] for d in (one, two))
    assert len(log_two) == len(log_one) == 5  # one writer: 5 lines, not 10
    loss_err = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(log_one, log_two))
    a, b = trained_params(one, False), trained_params(two, fsdp)
    assert [x.shape for x in a] == [y.shape for y in b]
    err = max((x - y).abs().max().item() for x, y in zip(a, b)) / max(x.abs().max().item() for x in a)
    print(f"torchrun 2 x bs 2 vs 1 x bs 4, {mode} {extra}: loss per step rel diff <= {loss_err:.1e}, "
          f"weights max |diff| / max |weight| = {err:.2e}")
    assert loss_err < 1e-5  # the same samples, noise and sigma, step by step
    # fp32 summation order differs (batch 2 vs 4, 1 vs 2 threads); Adam divides by sqrt(v), so where a
    # gradient is near zero that noise becomes a visible step: a few 1e-6 after 5 steps
    assert err < 5e-5
    files = sorted(p.name for p in two.iterdir() if p.is_file())
    want = ["t-log.jsonl", "t.safetensors"] + (["t-state-rank0.pt", "t-state-rank1.pt"] if fsdp else ["t-state.pt"])
    if mode == "full":  # the EMA file (bf16): the same up to a bf16 step where fp32 noise crosses a rounding boundary
        want.append("t-ema.safetensors")
        e1, e2 = load_file(one / "t-ema.safetensors"), load_file(two / "t-ema.safetensors")
        assert e1.keys() == e2.keys()
        assert all(((e1[k].float() - e2[k].float()).abs() <= e1[k].float().abs() * 2 ** -7).all() for k in e1)
    assert files == sorted(want), files
    assert sorted(os.listdir(two / "samples")) == ["t-final.png"]


# train.py under torchrun with two spies: FSDP2's reduce-scatter (one foreach_reduce per sharded unit per
# backward that syncs) and checkpoint.full_state_dict (what each rank holds when the weights are gathered for a save)
FSDP_SPY = """
import json, os, sys
sys.path.insert(0, {here!r})
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
import checkpoint, train
reduces, gathered = [], []
real_reduce, real_gather = _fsdp_param_group.foreach_reduce, checkpoint.full_state_dict
_fsdp_param_group.foreach_reduce = lambda *a, **k: reduces.append(1) or real_reduce(*a, **k)
checkpoint.full_state_dict = lambda *a: (lambda sd: gathered.append(len(sd)) or sd)(real_gather(*a))
out = train.main(sys.argv[1:])
units = sum(isinstance(m, FSDPModule) for m in out["model"].modules())
with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(dict(reduces=len(reduces), units=units, gathered=gathered), f)
"""


def test_fsdp_reduces_once_per_step_and_gathers_to_rank_0(weights, tmp_path):
    """Accumulation 2 over 3 optimizer steps: gradients are reduce-scattered at the last micro-step of each
    step only (3 x the sharded units, not 6 x), and a save gathers the whole model on rank 0 alone."""
    spy = tmp_path / "spy.py"
    spy.write_text(FSDP_SPY.format(here=ROOT, out=str(tmp_path)))
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=8)
    torchrun(cli_args(weights) + [f"--train_data_dir={folder}", "--train_mode=full", "--parallel=fsdp", "--resolution=64",
                                  "--train_batch_size=1", "--gradient_accumulation_steps=2", "--max_train_steps=3",
                                  f"--output_dir={tmp_path / 'out'}"], fresh=tmp_path / "out", script=str(spy))
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    print(f"\nFSDP2, 3 steps x 2 micro-steps: {[(r['reduces'], r['units']) for r in ranks]} (reduces, sharded units) per rank; "
          f"gathered tensors per save: rank 0 {ranks[0]['gathered']}, rank 1 {ranks[1]['gathered']}")
    for r in ranks:
        assert r["units"] > 1 and r["reduces"] == 3 * r["units"]
    assert ranks[0]["gathered"] and all(n > 0 for n in ranks[0]["gathered"])
    assert len(ranks[1]["gathered"]) == len(ranks[0]["gathered"]) and set(ranks[1]["gathered"]) == {0}  # nothing held


def test_bench_runs_every_case(tmp_path):
    """bench.py's smoke mode (one 2304-wide layer, 64^2, CPU): every case runs, ours and diffusers' bf16
    outputs agree within bf16 noise, and the table is written. The timings are meaningless on CPU."""
    import bench
    out = bench.main(["--smoke=True", f"--out={tmp_path / 'bench.json'}"])
    ran = [r for r in out["rows"] if "ms" in r]
    assert [r["key"] for r in out["rows"]] == list(bench.CASES) and all(r["ms"] > 0 for r in ran)
    assert [r["key"] for r in out["rows"] if r not in ran] == ["cfg_sage"]  # sage needs CUDA: a skipped row, not an error
    by_key = {r["key"]: r for r in ran}
    # the swapped, fp8 and compiled rows are divided by the diffusers row doing the same work
    assert by_key["lora_bs1_ckpt_swap24"]["ratio_to_diffusers"] == pytest.approx(
        by_key["lora_bs1_ckpt_swap24"]["ms"] / by_key["diffusers_lora_bs1_ckpt"]["ms"])
    assert by_key["cfg_fp8"]["attention"]["routes"] == {"sdpa-gqa-unmasked": 2, "sdpa-expanded-masked": 4}
    assert out["checks"]["bf16_vs_fp32"] < 3e-2 and out["checks"]["ours_vs_diffusers_bf16"] < 3e-2
    assert json.load(open(tmp_path / "bench.json"))["rows"] == out["rows"]


def test_fsdp_resume_is_bit_exact(weights, tmp_path):
    """FSDP2 on 2 processes, bf16 + Adafactor + stochastic rounding + EMA: 3 steps, then a resumed run to 6,
    equals 6 steps in one go (constant LR, so stopping at 3 is the same as being killed after that checkpoint).
    Each rank resumes its own shard, optimizer state and rounding generator."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=8)
    common = cli_args(weights) + [
        "--mixed_precision=bf16", f"--train_data_dir={folder}", "--train_mode=full", "--parallel=fsdp",
        "--optimizer_type=Adafactor", "--learning_rate=1e-2", "--ema_decay=0.9", "--train_batch_size=2"]
    torchrun(common + [f"--output_dir={tmp_path / 'a'}", "--max_train_steps=6"], fresh=tmp_path / "a")
    torchrun(common + [f"--output_dir={tmp_path / 'b'}", "--max_train_steps=3"], fresh=tmp_path / "b")
    torchrun(common + [f"--output_dir={tmp_path / 'b'}", "--max_train_steps=6", "--resume=True"])
    for name in ["t.safetensors", "t-ema.safetensors"]:
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(load_file(tmp_path / "a" / "t.safetensors")["x_embedder.weight"], load_file(weights["dit"])["x_embedder.weight"])
