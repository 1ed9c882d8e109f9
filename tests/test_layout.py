"""
The layout a researcher relies on: imports point down (scripts -> support modules -> lumina2.py), every option
is a mapping its check, --help and docs/config.md read, a new sampler or a new logged value is one entry, a LoRA
variant is a subclass that block swap, fp8, saving and reading ask, the block swap's logs stay bounded, and equal
saves are equal bytes.

    python -m pytest -q tests/test_layout.py
"""
import ast
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import configurator
import lora
import lumina2
import memory
import sample
import train
import weightfiles
from testutil import ROOT, one_image_dataset, run

SCRIPTS = {"train", "sample", "bench", "plan"}


def project_imports():
    """{module: set of project modules it imports}, read from the top-level .py files (tests and test_parity.py left out)."""
    names = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith("test_")}
    out = {}
    for name in names:
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        out[name] = found & names
    return out


def test_imports_point_down():
    imports = project_imports()
    assert imports["lumina2"] == set()  # the model file imports nothing of the project
    for module, deps in imports.items():
        if module not in SCRIPTS:
            assert not deps & SCRIPTS, f"{module} (a support module) imports the script(s) {deps & SCRIPTS}"
    state = {}  # no cycles: a depth-first walk never meets a module it is inside of

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) is None:
            state[m] = "open"
            for d in imports[m]:
                visit(d, path + [m])
            state[m] = "done"
    for m in imports:
        visit(m, [])


@pytest.mark.parametrize("script", ["train", "sample", "bench", "plan"])
def test_help_prints_every_setting_with_its_default_comment_and_choices(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    keys = configurator.configure(dict(vars(module)), [])
    for key in keys:
        assert f"- `{key} = " in out, key
    for key, mapping in getattr(module, "CHOICES", {}).items():
        assert ", ".join(f"`{k}`" for k in mapping) in out.split(f"- `{key} = ")[1].split("\n")[0], key
    if script == "train":
        assert "- `learning_rate = 1e-4`: --learning_rate" in out and "**the objective**" in out


def test_docs_config_is_the_scripts_own_description():
    """docs/config.md is generated from the scripts' constants and mappings: it must not drift from them."""
    generated = subprocess.run([sys.executable, "configurator.py", "train.py", "sample.py", "bench.py", "plan.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == generated, "docs/config.md is stale: python configurator.py train.py sample.py bench.py plan.py > docs/config.md"


def test_a_new_noise_level_sampler_is_one_entry(weights, tmp_path, monkeypatch):
    """One function and one entry in train.SIGMA_SAMPLERS: the config check accepts it and the loop uses it."""
    monkeypatch.setitem(train.SIGMA_SAMPLERS, "half", lambda n, g, mu, c: torch.full((n,), 0.5))
    images = f"--train_data_dir={one_image_dataset(str(tmp_path / 'img'))}"
    out = run(weights, tmp_path, images, "--timestep_sampling=half", "--max_train_steps=3")
    assert [json.loads(line)["sigma"] for line in open(out["log"])] == [0.5, 0.5, 0.5]
    with pytest.raises(SystemExit, match="timestep_sampling='halff' is not one of .*'half'"):
        run(weights, tmp_path / "b", images, "--timestep_sampling=halff")


def test_a_new_logged_value_is_one_entry(tmp_path):
    """A step's metrics are a dict: any extra tensor or number reaches the JSONL by its name, with the one sync."""
    log = tmp_path / "log.jsonl"
    r = SimpleNamespace(pending=[{"step": 1, "epoch": 0, "loss": torch.tensor([1.0, 3.0]), "lr": 1e-4, "grad_norm": torch.tensor(0.5),
                                  "sigma": torch.tensor(0.25), "time": 0.1, "my_norm": torch.tensor(7.0)}],
                        losses=[], val_loss=None, log=open(log, "w"), bar=None, last_finite=None, log_path=str(log))
    checkpoint.flush_log(SimpleNamespace(device="cpu"), r)
    r.log.close()
    line = json.loads(log.read_text())
    assert line["loss"] == 2.0 and line["my_norm"] == 7.0 and r.losses == [1.0, 3.0] and list(line)[-2:] == ["my_norm", "peak_gb"]


def test_block_swap_keeps_a_bounded_log(monkeypatch):
    """Its log and ran_with keep the last LOG_LIMIT events, however long the run (6 events per layer and step)."""
    monkeypatch.setattr(memory, "LOG_LIMIT", 50)
    torch.manual_seed(0)
    model = lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], n_layers=4)).eval().requires_grad_(False)
    swap = memory.swap_blocks(model, 3, "cpu")
    x, t, cap, mask = torch.randn(1, 16, 4, 4), torch.rand(1), torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(40):
            model(x, t, cap, mask)
    assert len(swap.log) == len(swap.ran_with) == 50 and swap.ran_with[-1] == ("forward", 3, 3)


WRITE = """
import sys, torch, files
files.save_file_atomic({"b": torch.arange(4.0), "a": torch.ones(2, dtype=torch.bfloat16)}, sys.argv[1],
                       metadata={f"key{i}": str(i) for i in range(12)})
"""


def test_equal_saves_are_equal_bytes(tmp_path):
    """safetensors writes its metadata in an order that changes from process to process; our saves sort it, so two
    processes saving the same tensors write the same file, and a sha256 compares runs."""
    digests = set()
    for i in range(3):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE, str(path)], cwd=ROOT, check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors.torch import load_file
    assert torch.equal(load_file(path)["b"], torch.arange(4.0))


class GainLoRA(lora.LoRALinear):
    """A LoRA variant with one more trained tensor: a gain per output row, dW = diag(gain) up down * alpha / r."""
    NAMES = {layout: {**names, "gain": "lora_gain"} for layout, names in lora.LoRALinear.NAMES.items()}

    def __init__(self, base, rank, alpha=None, **dropouts):
        super().__init__(base, rank, alpha, **dropouts)
        self.lora_gain = torch.nn.Parameter(torch.ones(self.out_features, device=base.weight.device))

    def trained(self):
        return {**super().trained(), "gain": self.lora_gain}

    def forward(self, x):
        y = memory.linear(x, self.weight, self.bias, self.scale_weight)
        if self.merged:
            return y
        h = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_down.weight.to(x.dtype)), self.lora_up.weight.to(x.dtype))
        return y + h * self.scale * self.lora_gain.to(x.dtype)

    @staticmethod
    def delta(parts, multiplier, weight):
        return parts["gain"].to(weight.device, torch.float32)[:, None] * lora.LoRALinear.delta(parts, multiplier, weight)


def test_a_lora_variant_is_a_subclass_and_one_entry(weights, tmp_path, monkeypatch):
    """A variant with an extra trained tensor trains under block swap (which leaves every tensor the module trains on
    the device) and on an fp8 base (which quantises none of them), saves its extra tensor, and reads back, merged or
    not, through lora.py and sample.py alike, because each of them asks the module instead of matching key names."""
    with pytest.raises(ValueError, match="GainLoRA is not in lora.VARIANTS"):
        lora.inject(lumina2.NextDiT(**lumina2.DIT_PRESETS["tiny"]), rank=4, cls=GainLoRA)
    monkeypatch.setitem(lora.VARIANTS, "gain", GainLoRA)
    torch.manual_seed(0)
    model = weightfiles.load_dit(weights["dit"], dtype=torch.float32)
    lora.inject(model, rank=4, cls=GainLoRA)
    memory.prepare(model, "cpu", blocks_to_swap=1)
    params = lora.lora_parameters(model)
    assert len(params) == 3 * len(lora.lora_modules(model))  # down, up and gain of every module
    x, t, cap, mask = torch.randn(2, 16, 4, 4), torch.rand(2), torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool)
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        model(x, t, cap, mask).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(own == layer for _, layer, own in model.block_swap.ran_with)
    gains = [m.lora_gain for m in lora.lora_modules(model).values()]
    assert all(g.dtype == torch.float32 for g in gains) and any((g != 1).any() for g in gains)
    path = str(tmp_path / "gain.safetensors")
    lora.save_lora(model, path, dtype=torch.float32)
    f, meta = weightfiles.open_safetensors(path)
    assert meta["lora_variant"] == "gain" and sum(k.endswith(".lora_gain") for k in f.keys()) == len(gains)
    with torch.no_grad():
        want = model.eval()(x, t, cap, mask)
        fresh = weightfiles.load_dit(weights["dit"], dtype=torch.float32)
        assert lora.load_lora(fresh, path, merge=False) == len(gains) and type(next(iter(lora.lora_modules(fresh).values()))) is GainLoRA
        assert torch.equal(fresh(x, t, cap, mask), want)
        merged = weightfiles.load_dit(weights["dit"], dtype=torch.float32)
        lora.load_lora(merged, path, merge=True)
        assert (merged(x, t, cap, mask) - want).abs().max() <= 1e-5 * want.abs().max()
    fp8 = weightfiles.load_dit(weights["dit"], dtype=torch.bfloat16)
    lora.inject(fp8, rank=4, cls=GainLoRA)
    memory.prepare(fp8, "cpu", fp8=True)
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(fp8))
    assert fp8.layers[0].attention.qkv.weight.dtype == memory.FP8
    png = sample.main([f"--dit_path={weights['dit']}", f"--gemma_path={weights['gemma']}", f"--ae_path={weights['ae']}",
                       f"--out_dir={tmp_path / 'png'}", "--device=cpu", "--dtype=float32", "--width=32", "--height=32",
                       "--steps=2", f"--lora_weights=['{path}']"])
    assert len(png) == 1
