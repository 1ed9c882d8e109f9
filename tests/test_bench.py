"""
bench.py: its analytic FLOP count against torch's FlopCounterMode, and the GPU check's CPU smoke run, so the
one command a GPU run executes cannot rot between GPU runs.
"""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import fakegpu
import lumina2


@pytest.mark.parametrize("valid", [[12, 12], [12, 5]])  # equal captions (unmasked) and ragged (padded to 12)
def test_forward_flops_matches_the_counter(valid):
    """Under the math backend attention is einsums the counter sees, so every matmul is counted by both; the
    counter, like the formula, leaves out elementwise work and bias adds, so they agree exactly (within 1%
    is the bar, for counter versions that count more)."""
    cfg = dict(lumina2.DIT_PRESETS["tiny"], n_layers=3, n_refiner_layers=2, cap_feat_dim=48)
    torch.manual_seed(0)
    m = lumina2.NextDiT(**cfg)
    B, side, L = len(valid), 32, 16  # latent 32^2 -> 16^2 patches = 256 image tokens
    x, t, cap = torch.randn(B, 16, side, side), torch.rand(B), torch.randn(B, L, cfg["cap_feat_dim"])
    mask = torch.arange(L)[None] < torch.tensor(valid)[:, None]
    lumina2.set_attention("math")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x, t, cap, mask)
    finally:
        lumina2.set_attention("sdpa")
    ours = fakegpu.forward_flops(cfg, B, max(valid), (side // 2) ** 2)
    counted = fc.get_total_flops()
    print(f"analytic {ours:.6e} vs FlopCounterMode {counted:.6e}: residual {ours / counted - 1:+.2e}")
    assert abs(ours / counted - 1) < 1e-2


def test_gpu_check_runs_on_cpu(tmp_path, monkeypatch):
    """python bench.py --check=True --smoke=True: the GPU check's own path (the CUDA test tier, whose tests
    skip here, the checks, the table with its attention routes, JSON + markdown to $OUT) on a CPU. Three cases
    keep it short; test_full.py's smoke test runs all ten."""
    monkeypatch.setenv("OUT", str(tmp_path))
    out = bench.main(["--check=True", "--smoke=True", '--cases=["lora_bs1", "cfg", "diffusers_cfg"]'])
    assert out["ok"] and out["tests"]["rc"] == 0 and "skipped" in out["tests"]["summary"]
    assert [r["impl"] for r in out["rows"]] == ["ours", "ours", "diffusers"] and all(r["ms"] > 0 for r in out["rows"])
    # plan.py's prediction beside each of our rows (the smoke model's weights alone are 127 MiB in bf16)
    assert all(r["predicted_gb"] > 127 / 1024 for r in out["rows"][:2]) and "predicted_gb" not in out["rows"][2]
    assert out["rows"][0]["attention"]["routes"] == {"sdpa-gqa-unmasked": 6}  # 3 one-layer stacks x (warm-up + timed step)
    assert set(out["rows"][1]["attention"]["routes"]) == {"sdpa-gqa-unmasked", "sdpa-expanded-masked"}  # cond + uncond differ
    assert json.load(open(tmp_path / "bench.json"))["rows"] == out["rows"]
    assert "| ours | CFG step (batch 2) |" in (tmp_path / "bench.md").read_text() and "| predicted GiB |" in (tmp_path / "bench.md").read_text()
