"""
Faults, tried as a hostile but ordinary user would: a run that diverges stops and keeps its last good
checkpoint; old checkpoints are pruned only after a newer one is complete; the log is strict JSON and
one per run; two runs cannot share an output_dir; a resume refuses changed maths and falls back past a
damaged state; a full disk, a read-only folder and a SIGKILL lose nothing; every bad input is reported,
in one line, before the AE or Gemma ever run. CPU, offline, the tiny demo weights.

    python -m pytest -q test_faults.py
"""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import data
import files
import lumina2
import optim
import tinyworld
import train
import weightfiles
from testutil import ROOT, cli_args, run, torchrun

def demo_data(tmp_path, n=4):
    return f"--train_data_dir={tinyworld.make_demo_dataset(str(tmp_path / 'img'), n=n)}"


def snapshot(folder, skip=()):
    """{file name: sha256} of every file in folder (not recursive)."""
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f)) and f not in skip}


def strict_lines(path):
    """Every line of a JSONL log, parsed by a reader that rejects NaN and Infinity (as strict JSON readers do)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def step_files(folder, name="t"):
    return sorted(f for f in os.listdir(folder) if f.startswith(f"{name}-step") and f.endswith(".safetensors"))


# -----------------------------------------------------------------------------
# divergence


def inject_nan(monkeypatch, step, where, folder, seen):
    """At optimizer step `step` (accumulation 1: one loss call per step), make the loss NaN or one gradient
    inf, and photograph the output folder just before, into seen["before"]."""
    real_loss, real_step = train.flow_matching_loss, optim.step_after_backward
    calls = [0]

    def loss(*a, **k):
        calls[0] += 1
        out = real_loss(*a, **k)
        if calls[0] == step:
            seen["before"] = snapshot(folder, skip={"t-log.jsonl", "train.lock"})
            if where == "loss":
                return out * float("nan")
        return out

    def stepped(params, *a, **k):
        if where == "grad" and calls[0] == step:
            with torch.no_grad():
                params[0].grad.view(-1)[0] = float("inf")
        return real_step(params, *a, **k)

    monkeypatch.setattr(train, "flow_matching_loss", loss)
    monkeypatch.setattr(optim, "step_after_backward", stepped)


@pytest.mark.parametrize("mode,where", [("lora", "loss"), ("lora", "grad"), ("full", "loss"), ("full --fused_backward_pass=True", "loss")])
def test_a_non_finite_step_stops_the_run_and_leaves_the_files_as_they_were(weights, tmp_path, monkeypatch, mode, where):
    out, seen = tmp_path / "out", {}
    inject_nan(monkeypatch, 4, where, out, seen)
    with pytest.raises(SystemExit) as e:
        run(weights, tmp_path, demo_data(tmp_path), *f"--train_mode={mode}".split(), "--max_train_steps=10",
            "--save_every_n_steps=1", "--learning_rate=1e-3")
    msg = str(e.value)
    assert isinstance(e.value, checkpoint.Diverged)
    assert "training diverged" in msg and "at step 4" in msg and "the last finite loss was" in msg and "at step 3" in msg
    assert f"the last good checkpoint is {out / 't-step000003.safetensors'}" in msg and "learning_rate" in msg
    # the files written before the bad step are byte-identical, and nothing was written after it
    assert snapshot(out, skip={"t-log.jsonl"}) == seen["before"]
    assert step_files(out) == [f"t-step{s:06d}.safetensors" for s in (1, 2, 3)]
    assert all(torch.isfinite(v).all() for v in load_file(out / "t-step000003.safetensors").values())
    assert torch.load(out / "t-state.pt", weights_only=True)["step"] == 3
    log = strict_lines(out / "t-log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert (log[-1]["loss"] is None) == (where == "loss") and log[-1]["grad_norm"] is None and log[2]["loss"] > 0
    assert not os.path.exists(out / "train.lock")


def test_a_diverging_learning_rate_stops_within_steps(weights, tmp_path):
    """The issue's measurement: lr 1e4 went on for 57 steps and saved a NaN LoRA with exit 0."""
    with pytest.raises(checkpoint.Diverged, match="training diverged") as e:
        run(weights, tmp_path, demo_data(tmp_path), "--learning_rate=1e4", "--max_train_steps=60", "--save_every_n_steps=1")
    step = int(str(e.value).split(" at step ")[1].split(";")[0])
    assert step <= 5 and not os.path.exists(tmp_path / "out" / "t.safetensors")
    for f in step_files(tmp_path / "out"):
        assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "out" / f).values())


def test_no_checkpoint_holds_a_non_finite_weight(weights, tmp_path, monkeypatch):
    """A weight that went NaN while every logged loss was finite (here: set by hand after step 2) is still
    caught, at the save."""
    real = checkpoint.flush_log

    def poisoned(c, r, *a, **k):
        real(c, r, *a, **k)
        if r.step == 2:  # after step 2's losses were found finite, before its save
            with torch.no_grad():
                r.params[0].view(-1)[0] = float("nan")

    monkeypatch.setattr(checkpoint, "flush_log", poisoned)
    with pytest.raises(checkpoint.Diverged, match="a trained weight is not finite at step 2"):
        run(weights, tmp_path, demo_data(tmp_path), "--max_train_steps=4", "--save_every_n_steps=1")
    assert step_files(tmp_path / "out") == ["t-step000001.safetensors"]


# train.py under torchrun (DDP, 2 gloo processes): rank 1 alone gets a NaN loss at step 3
DDP_NAN = """
import json, os, sys
sys.path.insert(0, {here!r})
import checkpoint, train
real, calls = train.flow_matching_loss, [0]
def loss(*a, **k):
    calls[0] += 1
    out = real(*a, **k)
    return out * float("nan") if os.environ["RANK"] == "1" and calls[0] == 3 else out
train.flow_matching_loss = loss
try:
    train.main(sys.argv[1:])
    caught = None
except SystemExit as e:
    caught = dict(diverged=isinstance(e, checkpoint.Diverged), message=str(e))
with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(caught, f)
"""


def test_ddp_ranks_agree_to_stop(weights, tmp_path):
    """Only one rank's loss goes NaN; the gradients and the logged losses are averaged across ranks, so every
    rank sees the non-finite step and every rank stops there, saving nothing after step 2."""
    spy = tmp_path / "spy.py"
    spy.write_text(DDP_NAN.format(here=ROOT, out=str(tmp_path)))
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=8)
    torchrun(cli_args(weights) + [f"--train_data_dir={folder}", "--network_dim=4", "--train_batch_size=1", "--max_train_steps=6",
                                  "--save_every_n_steps=1", f"--output_dir={tmp_path / 'out'}"], fresh=tmp_path / "out", script=str(spy))
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert all(r and r["diverged"] and "at step 3" in r["message"] for r in ranks), ranks
    assert step_files(tmp_path / "out") == ["t-step000001.safetensors", "t-step000002.safetensors"]


# -----------------------------------------------------------------------------
# retention, logs, the lock


def test_save_last_n_steps_keeps_exactly_n_step_files(weights, tmp_path):
    out = run(weights, tmp_path, demo_data(tmp_path), "--max_train_steps=9", "--save_every_n_steps=1", "--save_last_n_steps=3",
              "--ema_decay=0.9", "--ema_every=1")
    folder = tmp_path / "out"
    assert step_files(folder) == ["t-step000007-ema.safetensors", "t-step000007.safetensors", "t-step000008-ema.safetensors",
                                  "t-step000008.safetensors", "t-step000009-ema.safetensors", "t-step000009.safetensors"]
    assert os.path.exists(out["lora"]) and os.path.exists(out["state"]) and os.path.exists(checkpoint.previous_state(out["state"]))


def test_save_last_n_epochs_keeps_the_newest_epochs(weights, tmp_path):
    run(weights, tmp_path, demo_data(tmp_path, n=2), "--max_train_epochs=6", "--save_every_n_epochs=1", "--save_last_n_epochs=2")
    names = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert names == ["t-000004.safetensors", "t-000005.safetensors", "t.safetensors"]  # epoch 6 is the final file


def test_a_failed_save_prunes_nothing_and_names_the_last_complete_checkpoint(weights, tmp_path, monkeypatch):
    real = checkpoint.save_state

    def half_written(tmp):
        open(tmp, "wb").write(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full_at_step_5(obj, path, *a, **k):
        if obj["step"] == 5:
            files.atomic_write(path, half_written)
        return real(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_state", disk_full_at_step_5)
    with pytest.raises(SystemExit) as e:
        train.main(cli_args(weights) + [f"--output_dir={tmp_path / 'out'}", demo_data(tmp_path), "--max_train_steps=8",
                                        "--save_every_n_steps=1", "--save_last_n_steps=2"])
    msg = str(e.value)
    assert msg.startswith("error: could not write") and "No space left on device" in msg and "step 5" in msg
    assert f"the last complete checkpoint is {tmp_path / 'out' / 't-step000004.safetensors'}" in msg and "--resume=True" in msg
    assert step_files(tmp_path / "out") == ["t-step000003.safetensors", "t-step000004.safetensors", "t-step000005.safetensors"]
    assert torch.load(tmp_path / "out" / "t-state.pt", weights_only=True)["step"] == 4
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_every_log_line_is_strict_json_and_a_new_run_needs_resume_or_overwrite(weights, tmp_path):
    args = [demo_data(tmp_path), "--max_train_steps=3", "--max_grad_norm=0.0"]
    run(weights, tmp_path, *args)
    log = tmp_path / "out" / "t-log.jsonl"
    assert [r["step"] for r in strict_lines(log)] == [1, 2, 3]
    before = snapshot(tmp_path / "out")
    with pytest.raises(SystemExit, match="already holds a run named 't'.*--resume=True.*--overwrite=True"):
        run(weights, tmp_path, *args)
    assert snapshot(tmp_path / "out") == before  # refused before anything was written
    with pytest.raises(SystemExit, match="does not exist"):  # overwrite, but the new run fails its checks
        run(weights, tmp_path, *args, "--overwrite=True", f"--train_data_dir={tmp_path / 'typo'}")
    assert snapshot(tmp_path / "out") == before  # so the old run is still there
    run(weights, tmp_path, *args, "--overwrite=True", "--learning_rate=1e-3")
    assert [r["step"] for r in strict_lines(log)] == [1, 2, 3]  # a new log, not the old one's steps again


def test_a_second_run_on_the_same_output_dir_is_refused_and_a_dead_runs_lock_is_taken_over(weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": checkpoint.socket.gethostname(), "started": "now"}))
    with pytest.raises(SystemExit, match=f"another train.py is using output_dir {out} \\(pid {os.getpid()}.*delete {out / 'train.lock'}"):
        run(weights, tmp_path, demo_data(tmp_path), "--max_train_steps=1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": checkpoint.socket.gethostname(), "started": "then"}))
    (out / f"t.safetensors.{dead.pid}-0123abcd.tmp").write_bytes(b"the dead run's partial write")
    run(weights, tmp_path, demo_data(tmp_path), "--max_train_steps=1")
    assert not os.path.exists(out / "train.lock") and not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_files_get_the_users_permissions_and_unique_temp_names(weights, tmp_path, monkeypatch):
    temps = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (temps.append(str(a)), real_replace(a, b))[1])
    old = os.umask(0o027)
    try:
        out = run(weights, tmp_path, demo_data(tmp_path), "--max_train_steps=2", "--save_every_n_steps=1")
    finally:
        os.umask(old)
    for f in (out["lora"], out["state"], tmp_path / "out" / "t-step000001.safetensors"):
        assert os.stat(f).st_mode & 0o777 == 0o640  # 0o666 & ~umask: safetensors alone writes 0600
    tmps = [t for t in temps if t.endswith(".tmp")]
    assert len(tmps) == len(set(tmps)) >= 4 and all(f".{os.getpid()}-" in t for t in tmps)


# -----------------------------------------------------------------------------
# resume


def test_resume_refuses_changed_maths_and_names_each_difference(weights, tmp_path):
    args = [demo_data(tmp_path), "--network_dim=4", "--network_alpha=4.0"]
    run(weights, tmp_path, *args, "--max_train_steps=2")
    with pytest.raises(SystemExit) as e:
        run(weights, tmp_path, *args, "--max_train_steps=4", "--resume=True", "--network_alpha=64.0", "--optimizer_type=Adafactor")
    msg = str(e.value)
    assert "network_alpha=4.0 there, 64.0 now" in msg and "optimizer_type='AdamW' there, 'Adafactor' now" in msg
    with pytest.raises(SystemExit, match="network_dim=4 there, 8 now"):
        run(weights, tmp_path, *args, "--max_train_steps=4", "--resume=True", "--network_dim=8")
    # another base model of another width: same settings, but the tensors no longer pair up
    other = str(tmp_path / "other_dit.safetensors")
    save_file(lumina2.NextDiT(**dict(lumina2.DIT_PRESETS["tiny"], dim=32, n_heads=2, n_kv_heads=1,
                                     cap_feat_dim=tinyworld.DEMO_GEMMA["hidden_size"])).state_dict(), other)
    with pytest.raises(SystemExit, match=r"the first difference is tensor 0: \(4, 64\) saved, \(4, 32\) now \(another base model"):
        run(weights, tmp_path, *args, "--max_train_steps=4", "--resume=True", f"--dit_path={other}")


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "missing"])
def test_a_damaged_state_falls_back_to_the_previous_one_and_the_run_ends_as_if_uninterrupted(weights, tmp_path, damage):
    args = [demo_data(tmp_path), "--network_dim=4", "--save_every_n_steps=2", "--learning_rate=1e-3"]
    whole = run(weights, tmp_path / "a", *args, "--max_train_steps=6")
    first = run(weights, tmp_path / "b", *args, "--max_train_steps=4")
    state = first["state"]
    if damage == "missing":  # a kill between save_state's two renames
        os.remove(state)
    else:
        blob = open(state, "rb").read()
        open(state, "wb").write(blob[: len(blob) // 2] if damage == "truncated" else b"")
    resumed = run(weights, tmp_path / "b", *args, "--max_train_steps=6", "--resume=True")
    a, b = load_file(whole["lora"]), load_file(resumed["lora"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # from step 2, bit-exact with the uninterrupted run
    assert [r["step"] for r in strict_lines(resumed["log"])] == [1, 2, 3, 4, 5, 6]  # the log reads as one run


def test_a_damaged_state_without_a_previous_one_says_so(weights, tmp_path):
    out = run(weights, tmp_path, demo_data(tmp_path), "--max_train_steps=2")
    open(out["state"], "wb").write(b"")
    with pytest.raises(SystemExit, match=r"error: resume=True but no training state loads: .*t-state.pt is damaged \(0 bytes"):
        run(weights, tmp_path, demo_data(tmp_path), "--max_train_steps=4", "--resume=True")


def resumable_step(out):
    """The step a resume would start from (the state, else the previous state), or None."""
    for name in ("t-state.pt", "t-state-prev.pt"):
        try:
            return torch.load(out / name, weights_only=True)["step"]
        except Exception:
            continue
    return None


def test_sigkill_at_random_moments_while_saving_every_step_always_resumes(weights, tmp_path):
    """The issue's 5 of 5, kept under test: a process killed with SIGKILL while it saves every step (each round
    at another moment) leaves a state that resumes, through the previous state when the kill fell between the
    two renames; the next run takes over the dead run's lock and clears its partial temp files. A SIGTERM
    (kill, a scheduler) cleans up after itself."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=4)
    out = tmp_path / "out"
    args = cli_args(weights) + [f"--train_data_dir={folder}", f"--output_dir={out}", "--save_every_n_steps=1",
                                "--network_dim=4", "--max_train_steps=100000"]
    step = 0
    for delay, sig in ((0.0, signal.SIGKILL), (0.137, signal.SIGKILL), (0.411, signal.SIGKILL), (0.2, signal.SIGTERM)):
        p = subprocess.Popen([sys.executable, "train.py", *args, f"--resume={step > 0}"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()  # wait until this round is saving (its second step file exists), then a little more
        while not os.path.exists(out / f"t-step{step + 2:06d}.safetensors") and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.005)
        time.sleep(delay)
        p.send_signal(sig)
        p.wait()
        if sig == signal.SIGKILL:
            assert p.returncode == -signal.SIGKILL
        else:  # a SIGTERM exits through the cleanups: no temp file, no lock left behind
            assert p.returncode == 128 + signal.SIGTERM
            assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not os.path.exists(out / "train.lock")
        new = resumable_step(out)
        assert new is not None and new >= step + 1, (step, new)
        step = new
    final = run(weights, tmp_path, f"--train_data_dir={folder}", "--save_every_n_steps=1", "--network_dim=4",
                f"--max_train_steps={step + 2}", "--resume=True")
    assert torch.load(final["state"], weights_only=True)["step"] == step + 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not os.path.exists(out / "train.lock")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exit, on purpose
def test_a_sigterm_exit_swallowed_by_a_del_still_stops_the_loop(weights, tmp_path, monkeypatch):
    """The SIGTERM handler's SystemExit, raised while Python runs some object's __del__, is swallowed there ("Exception
    ignored in ..."): one SIGTERM round of the test above hung that way once (torch 2.11, training on at step 30,000).
    The loop asks at every step whether a SIGTERM came, and exits through the cleanups."""
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(checkpoint, "TERMINATED", [])
    try:
        checkpoint.exit_on_sigterm()

        class Dying:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # Python bytecode: the handler runs here, inside __del__

        Dying()
        assert checkpoint.TERMINATED == [signal.SIGTERM]  # it ran, its exit was swallowed, and we are still here
        folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=4)
        with pytest.raises(SystemExit) as e:
            run(weights, tmp_path, f"--train_data_dir={folder}", "--network_dim=4", "--max_train_steps=1000")
        assert e.value.code == 128 + signal.SIGTERM
        out = tmp_path / "out"
        assert not os.path.exists(out / "train.lock") and not [f for f in os.listdir(out) if f.endswith(".tmp")]
        assert not [line for line in open(out / "t-log.jsonl")][1:]  # it stopped after its first step
    finally:
        signal.signal(signal.SIGTERM, previous)


# -----------------------------------------------------------------------------
# output faults


def test_a_read_only_output_dir_fails_at_start_up(weights, tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses everyone
        target = "/sys/lumina2-test-out"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        target = str(tmp_path / "ro" / "out")
    touched = []
    monkeypatch.setattr(weightfiles, "load_ae", lambda *a, **k: touched.append("ae"))
    with pytest.raises(SystemExit, match=f"error: output_dir {target} is not writable") as e:
        train.main(cli_args(weights) + [demo_data(tmp_path), f"--output_dir={target}"])
    assert "\n" not in str(e.value) and not touched


FULL_DISK = """
import resource, signal, sys, train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead of killing us
real = checkpoint.save_checkpoint
def limited(c, r, tag):
    if r.step == 3:  # from here on no file may grow beyond 1 kB: the disk is full
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    return real(c, r, tag)
checkpoint.save_checkpoint = limited
train.main(sys.argv[1:])
"""


def mount_tmpfs(path, size):
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_full_disk_stops_the_run_with_the_last_complete_checkpoint_intact(weights, tmp_path):
    """A real full disk where this machine lets the test mount a small tmpfs as output_dir; elsewhere the same
    failure from the kernel through RLIMIT_FSIZE. Either way: one line, the previous files intact, no partial
    temp file left holding the space, and the run resumes once there is room."""
    folder = tinyworld.make_demo_dataset(str(tmp_path / "img"), n=4)
    out = tmp_path / "out"
    out.mkdir()
    tmpfs = os.geteuid() == 0 and mount_tmpfs(out, "3m")  # a rank-4 LoRA file is 100 kB, its state 600 kB (x2: the previous)
    args = cli_args(weights) + [f"--train_data_dir={folder}", f"--output_dir={out}", "--save_every_n_steps=1",
                                "--network_dim=4", "--max_train_steps=100"]
    try:
        p = subprocess.run([sys.executable, "-c", "import sys, train; train.main(sys.argv[1:])" if tmpfs else FULL_DISK, *args],
                           cwd=ROOT, capture_output=True, text=True)
        err = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 1 and err.startswith("error: could not write") and "Traceback" not in p.stderr
        assert ("no space left on the device" if tmpfs else "File too large") in err and "--resume=True" in err, err
        last = err.split("the last complete checkpoint is ")[1].split(". ")[0]
        assert all(torch.isfinite(v).all() for v in load_file(last).values())
        state = torch.load(out / "t-state.pt", weights_only=True)
        assert f"t-step{state['step']:06d}.safetensors" in last
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
        for f in step_files(out):
            os.remove(out / f)  # make room
        resumed = run(weights, tmp_path, f"--train_data_dir={folder}", "--network_dim=4", "--max_train_steps=42", "--resume=True")
        assert torch.load(resumed["state"], weights_only=True)["step"] == 42
    finally:
        if tmpfs:
            subprocess.run(["umount", str(out)])


# -----------------------------------------------------------------------------
# bad inputs: each reported in one line before the AE or Gemma is loaded


def damaged_copy(weights, tmp_path, kind):
    """A copy of the tiny DiT with one kind of damage -> its path."""
    path = str(tmp_path / f"dit_{kind.replace(' ', '_')}.safetensors")
    sd = load_file(weights["dit"])
    if kind == "truncated":
        blob = open(weights["dit"], "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
        return path
    if kind == "zero bytes":
        open(path, "wb").close()
        return path
    if kind == "last layer removed":
        last = max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        sd = {k: v for k, v in sd.items() if not k.startswith(f"layers.{last}.")}
    if kind == "NaN tensor":
        sd["layers.0.attention.qkv.weight"][0, 0] = float("nan")
    save_file(sd, path)
    return path


BAD_INPUTS = [("dit missing", lambda w, t: [f"--dit_path={t / 'nope.safetensors'}"], "not found"),
              ("dit is a folder", lambda w, t: [f"--dit_path={t}"], "is a directory"),
              ("dit truncated", lambda w, t: [f"--dit_path={damaged_copy(w, t, 'truncated')}"], "not a readable safetensors file"),
              ("ae zero bytes", lambda w, t: [f"--ae_path={damaged_copy(w, t, 'zero bytes')}"], "not a readable safetensors file"),
              ("ae given as dit", lambda w, t: [f"--dit_path={w['ae']}"], "looks like the FLUX autoencoder"),
              ("dit given as gemma", lambda w, t: [f"--gemma_path={w['dit']}"], "looks like a Lumina 2 Next-DiT"),
              ("dit last layer removed", lambda w, t: [f"--dit_path={damaged_copy(w, t, 'last layer removed')}"], "truncated or edited"),
              ("dit NaN tensor", lambda w, t: [f"--dit_path={damaged_copy(w, t, 'NaN tensor')}"], "layers.0.attention.qkv.weight"),
              ("no dataset", lambda w, t: [f"--train_data_dir={t / 'none'}"], "does not exist"),
              ("undecodable caption", lambda w, t: [f"--train_data_dir={bad_caption_folder(t)}"], "UTF-8")]


def bad_caption_folder(tmp_path):
    folder = tinyworld.make_demo_dataset(str(tmp_path / "capimg"), n=2)
    txt = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))[0]
    open(os.path.join(folder, txt), "wb").write(b"a caption in latin-1: caf\xe9")
    return folder


@pytest.mark.parametrize("name,flags,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_each_bad_input_is_one_line_before_any_caching(weights, tmp_path, monkeypatch, name, flags, message):
    touched = []
    monkeypatch.setattr(weightfiles, "load_ae", lambda *a, **k: touched.append("ae"))
    monkeypatch.setattr(weightfiles, "load_text_encoder", lambda *a, **k: touched.append("gemma"))
    with pytest.raises(SystemExit) as e:
        train.main(cli_args(weights) + [demo_data(tmp_path), f"--output_dir={tmp_path / 'out'}", *flags(weights, tmp_path)])
    msg = str(e.value)
    assert msg.startswith("error: ") and message in msg and not touched, msg
    assert not os.path.exists(tmp_path / "out" / "train.lock")


def test_a_bug_keeps_its_traceback(weights, tmp_path, monkeypatch):
    """Only the known failures are turned into one line: anything else is a bug and must show where it is."""
    monkeypatch.setattr(data, "build_datasets", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(weights, tmp_path, demo_data(tmp_path))
