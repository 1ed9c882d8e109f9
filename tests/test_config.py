"""
Start-up checks of train.py: the whole config is validated before any file is read, the training state
loads without unpickling code, a state from another device type resumes with a warning, the loop syncs the
host once per logged step, and the CUDA-only set-up calls are made with the right arguments (checked with
fakes, so this runs on any CPU).

    python -m pytest -q test_config.py
"""
import json
import os
import sys

import pytest
import torch

import checkpoint
import data
import memory
import optim
import tinyworld
import train
import weightfiles
from testutil import cli_args


def run(weights, out, *args):
    folder = tinyworld.make_demo_dataset(str(out / "img"), n=4)
    return train.main(cli_args(weights) + [f"--train_data_dir={folder}", f"--output_dir={out / 'out'}", "--network_dim=4", *args])


BAD = [("--lr_scheduler=cosin", "lr_scheduler='cosin' is not one of"), ("--save_layout=x", "save_layout='x' is not one of"),
       ("--mixed_precision=fp16", "mixed_precision='fp16' is not one of 'bf16', 'no'"),
       ("--attention=flahs", "got 'flahs'"), ("--optimizer_type=adamw", "did you mean 'AdamW'"),
       ("--timestep_sampling=logit", "timestep_sampling='logit'"), ("--train_mode=dora", "train_mode='dora'"),
       ("--bf16_update=nearest", "bf16_update='nearest'"), ("--parallel=tp", "parallel='tp'"),
       ("--learning_rate=-1e-4", "learning_rate=-0.0001 must be > 0"), ("--network_dim=0", "network_dim=0 must be >= 1"),
       ("--network_alpha=0.0", "network_alpha=0.0 must be > 0"), ("--caption_dropout_rate=1.5", "caption_dropout_rate=1.5"),
       ("--network_dropout=1.0", "network_dropout=1.0 must be in [0, 1)"), ("--resolution=100", "multiple of 16"),
       ("--train_batch_size=0", "train_batch_size=0 must be >= 1"), ("--gradient_accumulation_steps=0", "gradient_accumulation_steps=0"),
       ("--embedder_dims=[4,4]", "three ranks"), ("--attn_dim=-1", "attn_dim=-1"), ("--ema_decay=1.0", "ema_decay=1.0"),
       ("--ema_every=0", "ema_every=0"), ("--sample_width=100", "sample_width=100"), ("--blocks_to_swap=-2", "blocks_to_swap=-2"),
       ("--max_grad_norm=-1.0", "max_grad_norm=-1.0"), ("--device=tpu", "device='tpu'"),
       ("--fused_backward_pass=True", "fused_backward_pass needs train_mode='full'"),
       ("--blocks_to_swap=4 --train_mode=full", "blocks_to_swap needs train_mode='lora'"),
       ("--fp8_base=True --train_mode=full", "fp8_base stores the frozen base in fp8"),
       ("--attention=flash", "attention='flash' runs only on CUDA"), ("--attention=sage", "has no backward pass")]


@pytest.mark.parametrize("flags,message", BAD, ids=[b[0] for b in BAD])
def test_every_bad_value_fails_before_any_file_is_read(weights, tmp_path, monkeypatch, flags, message):
    """Each bad value stops the run at start-up, naming the key and what it must be; the dataset, the AE and
    Gemma are never touched (the paths below do not even exist)."""
    touched = []
    monkeypatch.setattr(data.Dataset, "__init__", lambda *a, **k: touched.append("dataset"))
    with pytest.raises(SystemExit, match="config errors") as e:
        train.main(["--device=cpu", "--mixed_precision=no", "--dit_path=missing", *flags.split()])
    assert message in str(e.value) and not touched


def test_all_problems_are_listed_at_once():
    with pytest.raises(SystemExit) as e:
        train.main(["--device=cpu", "--lr_scheduler=cosin", "--network_dim=0", "--save_layout=x"])
    assert str(e.value).count("\n  - ") == 3


def test_cuda_on_a_cpu_only_torch_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="device='cuda' but this machine has"):
        train.main(["--device=cuda", "--ema_device=cpu"])


def test_a_state_file_carrying_a_pickled_object_is_refused(weights, tmp_path):
    out = run(weights, tmp_path, "--max_train_steps=2")
    st = torch.load(out["state"], weights_only=True)  # what train.py writes loads with weights_only
    st["config"]["payload"] = os.system  # anything that is not a tensor or a plain value
    torch.save(st, out["state"])
    with pytest.raises(SystemExit, match="holds pickled Python objects"):
        run(weights, tmp_path, "--max_train_steps=4", "--resume=True")


def test_a_state_from_another_device_type_resumes_with_a_warning(weights, tmp_path):
    """A CUDA generator's state cannot be set on a CPU generator: the device generators are re-seeded on purpose."""
    out = run(weights, tmp_path, "--max_train_steps=2")
    st = torch.load(out["state"], weights_only=True)
    st["device"] = "cuda"
    st["optimizer"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # not a CPU generator state
    torch.save(st, out["state"])
    with pytest.warns(UserWarning, match="saved on cuda, resuming on cpu"):
        resumed = run(weights, tmp_path, "--max_train_steps=4", "--resume=True")
    assert torch.load(resumed["state"], weights_only=True)["step"] == 4


def test_the_loop_syncs_the_host_once_per_logged_step(weights, tmp_path, monkeypatch):
    """Loss, grad norm and sigma stay on the device until a logged step: 6 optimizer steps of 2 micro-batches
    with log_every=3 read tensor values into Python twice in the loop's code (train.py, checkpoint.py, optim.py:
    .item(), .tolist() or float() on a tensor), plus once per save (is every weight finite?). torch's own
    CPU-side reads, like AdamW's step counter, are not device syncs and are not counted."""
    calls, ours = [], {train.__file__, checkpoint.__file__, optim.__file__}
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _o=original, _n=name):
            if sys._getframe(1).f_code.co_filename in ours:
                calls.append(_n)
            return _o(self, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    steps = []
    monkeypatch.setattr(optim, "step_after_backward", lambda *a, _f=optim.step_after_backward, **k: (steps.append(len(calls)), _f(*a, **k))[1])
    out = run(weights, tmp_path, "--max_train_steps=6", "--gradient_accumulation_steps=2", "--log_every=3")
    during = len(calls) - steps[0]  # from the first optimizer step on (the set-up before it may read values)
    assert during == 2 + 1, calls[steps[0]:]  # 2 logged flushes, and the final save's check that every weight is finite
    lines = [json.loads(s) for s in open(out["log"])]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6] and len(out["losses"]) == 12


def test_distributed_cuda_setup_binds_the_process_group_to_its_gpu(monkeypatch):
    """Under torchrun on GPUs, init_process_group gets device_id (NCCL binds to the GPU up front); faked here."""
    got = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: got.setdefault("set_device", d))
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, **k: got.update(backend=backend, **k))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 1)
    c = type("C", (), {"device": "cuda"})()
    assert train.setup_distributed(c) == (1, 2)
    assert got["backend"] == "nccl" and got["device_id"] == torch.device("cuda:1") and c.device == "cuda:1"


def test_peak_memory_follows_the_runs_device(monkeypatch):
    """A CPU run reports the process RSS even on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: pytest.fail("asked CUDA for a CPU run"))
    assert memory.peak_memory_gb("cpu") > 0


def test_latents_are_encoded_in_ieee_fp32(weights, tmp_path, monkeypatch):
    """cuDNN runs fp32 convolutions in TF32 unless told otherwise; the cache encoder turns that off for its
    duration (and restores it), so GPU- and CPU-made caches of one fingerprint agree."""
    seen = []
    ae = weightfiles.load_ae(weights["ae"], dtype=torch.float32)
    encode = ae.encode
    monkeypatch.setattr(ae, "encode", lambda x, **k: (seen.append(torch.backends.cudnn.conv.fp32_precision), encode(x, **k))[1])
    before = torch.backends.cudnn.conv.fp32_precision
    ds = data.Dataset(tinyworld.make_demo_dataset(str(tmp_path / "img"), n=2), resolution=64)
    ds.cache_latents(ae)
    assert seen == ["ieee", "ieee"] and torch.backends.cudnn.conv.fp32_precision == before


def test_ddp_gradients_are_zeroed_in_place():
    """Under DDP with gradient_as_bucket_view a gradient is a view of the all-reduce bucket: the step zeroes
    it in place (same storage next step) instead of dropping it (which would make the reducer allocate anew)."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = optim.Optimizer([[p]], "AdamW", 1e-2, 0.0, "stochastic", 0, zero_grads_in_place=True)
    p.grad = torch.full((4,), 0.5)
    ptr = p.grad.data_ptr()
    opt.step(0)
    assert p.grad is not None and p.grad.data_ptr() == ptr and not p.grad.any() and (p.detach() < 1).all()
    plain = optim.Optimizer([[p]], "AdamW", 1e-2, 0.0, "stochastic", 0)
    p.grad = torch.full((4,), 0.5)
    plain.step(0)
    assert p.grad is None  # one process: the gradient's memory is freed
