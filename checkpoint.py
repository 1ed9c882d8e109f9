"""
A training run's life around train.py's loop: its output folder (one run at a time), kill-safe checkpoints (older ones pruned),
resuming (settings and shapes checked, a damaged state falls back), the JSONL step log, the stop on divergence.

    python -c "import checkpoint; st = checkpoint.load_state('out/demo/demo_lora-state.pt'); print(st['step'], st['config']['learning_rate'])"
"""
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import lora
import memory
from files import BadInput, WriteFailed, atomic_write, save_file_atomic
from optim import local

# -----------------------------------------------------------------------------
# the training state: tensors and plain values only, so it loads with weights_only=True


def previous_state(path):
    return path[: -len(".pt")] + "-prev.pt"  # t-state.pt -> t-state-prev.pt


def save_state(obj, path):
    """Via a temp file, then current -> -prev.pt, new -> current: a kill or a full disk at any moment leaves a complete state."""
    def write(tmp):
        torch.save(obj, tmp)
        if os.path.exists(path):
            os.replace(path, previous_state(path))
    atomic_write(path, write)


def load_state(path, mmap=False):
    """A state file -> dict, with weights_only=True: pickled Python objects (which could run code) are refused, not run."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise BadInput(f"{path} holds pickled Python objects besides tensors and plain values, so it is not "
                           "loaded (unpickling could run code). train.py never writes such a file: was it replaced?") from None
        raise BadInput(f"{path} is damaged ({os.path.getsize(path):,} bytes that are not a state file)") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated, zero bytes, torn zip directory
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else "empty or cut short"
        raise BadInput(f"{path} is damaged ({os.path.getsize(path):,} bytes; {reason})") from None


# a resume must share these with the saved run: each changes its tensors' shapes, scale, dtype or optimizer state
MATH_KEYS = ("train_mode", "network_dim", "network_alpha", "attn_dim", "mlp_dim", "mod_dim", "refiner_dim", "embedder_dims",
             "mixed_precision", "fp8_base", "optimizer_type", "bf16_update", "ema_decay")


def read_resume_state(c, r):
    """-> (state, its path): the state file, else (damaged, or gone between save_state's renames) the previous; mmap: no RAM."""
    tried = []
    for path in filter(os.path.exists, (r.state_path, previous_state(r.state_path))):
        try:
            st = load_state(path, mmap=True)
        except BadInput as e:
            tried.append(str(e))
            continue
        if tried:
            print(f"{tried[0]}; resuming from the previous state {path} (step {st['step']}) instead")
        return st, path
    if not tried:
        raise BadInput(f"resume=True but there is no training state at {r.state_path}")
    raise BadInput("resume=True but no training state loads: " + "; ".join(tried))


def check_settings(st, path, c, r):
    """The saved run and this one must agree on everything the saved tensors depend on: each difference named."""
    if st["world_size"] != r.world:  # the data position counts global batches of train_batch_size x world
        raise BadInput(f"{path} was saved by {st['world_size']} process(es); resume with the same number, not {r.world}")
    saved = st["config"]
    changed = [f"{k}={saved.get(k)!r} there, {getattr(c, k)!r} now" for k in MATH_KEYS if saved.get(k) != getattr(c, k)]
    if changed:
        raise BadInput(f"{path} was trained with other settings, and resuming would change what its tensors mean: "
                       f"{'; '.join(changed)}. Resume with the saved values, or start a new run (another output_name, "
                       "or --overwrite=True)")


def check_shapes(st, path, c, r):
    mine = [tuple(local(p).shape) for p in r.params]
    theirs = [tuple(t.shape) for t in st["params"]]
    if mine != theirs:  # e.g. another base model: the tensors are paired by position, so they must match one to one
        bad = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise BadInput(f"{path} holds {len(theirs)} trained tensors, this run has {len(mine)}; the first difference is "
                       f"tensor {bad}: {theirs[bad] if bad < len(theirs) else 'none'} saved, {mine[bad] if bad < len(mine) else 'none'} now "
                       f"(another base model file, dit_path={c.dit_path!r}?)")


def resume_from(c, r):
    """Load the state into the run r: weights, optimizer, EMA, generators (re-seeded across device types), data position."""
    st, path = r.resume_state  # read and checked by check_output_dir
    check_shapes(st, path, c, r)
    if r.world > 1:  # every process must resume the same step (under FSDP2 each read its own state file)
        steps = torch.tensor([st["step"], -st["step"]], device=c.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise BadInput(f"the processes' states are at different steps ({-steps[1].item()} to {steps[0].item()}): "
                           "a damaged state file fell back on some ranks only; resume from a consistent set")
    here = torch.device(c.device).type
    same = st.get("device", "cpu") == here
    if not same:
        warnings.warn(f"{path} was saved on {st['device']}, resuming on {here}: the stochastic-rounding and "
                      f"{st['device']} random generators are re-seeded, so the run goes on but is not bit-identical to an uninterrupted one")
    with torch.no_grad():
        for p, saved in zip(r.params, st["params"]):
            local(p).copy_(saved)
        for e, saved in zip(r.ema.shadow if r.ema else [], st["ema"] or []):
            e.copy_(saved)
    r.optimizer.load_state_dict(st["optimizer"], same_device=same, step=st["step"])
    r.noise_gen.set_state(st["noise_gen"])  # a CPU generator on every device: noise and sigma resume exactly
    random.setstate(st["rng"]["python"])
    torch.set_rng_state(st["rng"]["torch"])
    if same and st["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(st["rng"]["cuda"], c.device)
    r.step, r.epoch, r.batch_in_epoch, r.last_saved = st["step"], st["epoch"], st["batch_in_epoch"], path
    if r.rank == 0:
        cut_log(r.log_path, r.step)
    print(f"resumed from {path} at step {r.step} (epoch {r.epoch}, batch {r.batch_in_epoch})")


def save_weights(c, r, path, meta):
    if c.train_mode == "lora":
        if r.rank == 0:
            lora.save_lora(r.model, path, layout=c.save_layout, metadata=meta)
    else:  # the whole model under the original keys, bf16, for load_dit, ComfyUI, sd-scripts
        sd = full_state_dict(r.model, r.fsdp) if r.rank == 0 or r.fsdp else None  # under FSDP2 a collective
        if r.rank == 0:
            save_file_atomic(sd, path, metadata=meta)


def save_checkpoint(c, r, tag):
    """Weights (and the EMA's), resume state, pruning -> the weights' path; written only if every loss and weight is finite."""
    flush_log(c, r)  # the divergence check of every step up to here
    check_finite_weights(c, r)
    path = os.path.join(c.output_dir, f"{c.output_name}{tag}.safetensors")
    meta = {"ss_learning_rate": str(c.learning_rate), "ss_training_step": str(r.step), "ss_epoch": str(r.epoch),
            "ss_timestep_sampling": c.timestep_sampling, "ss_system_prompt": c.system_prompt,
            "ss_max_token_length": str(c.gemma2_max_token_length), "ss_seed": str(c.seed),
            "ss_mixed_precision": c.mixed_precision, "ss_num_train_images": str(len(r.ds)),
            "ss_optimizer": c.optimizer_type, "ss_train_mode": c.train_mode}
    try:
        save_weights(c, r, path, meta)
        if r.ema:
            with r.ema.swapped_in():
                save_weights(c, r, path.replace(".safetensors", "-ema.safetensors"), {**meta, "ss_ema_decay": str(c.ema_decay)})
        if r.rank == 0 or r.fsdp:
            save_state({"params": [local(p).detach().cpu() for p in r.params], "optimizer": r.optimizer.state_dict(),
                        "ema": [e.cpu() for e in r.ema.shadow] if r.ema else None, "noise_gen": r.noise_gen.get_state(),
                        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state(c.device) if torch.device(c.device).type == "cuda" else None},
                        "device": torch.device(c.device).type, "step": r.step, "epoch": r.epoch,
                        "batch_in_epoch": r.batch_in_epoch, "world_size": r.world, "config": vars(c)}, r.state_path)
    except WriteFailed as e:
        raise stopped_writing(c, r, e) from None
    r.last_saved = path
    if r.rank == 0 and tag:  # the final save prunes nothing, as in sd-scripts
        prune_checkpoints(c, r)
    return path


def full_state_dict(model, fsdp):
    """The whole model in bf16 under its original keys; under FSDP2 gathered to rank 0's CPU memory (a collective)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    return {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in sd.items()}


# -----------------------------------------------------------------------------
# the output folder: one run at a time, strict JSON logs, old checkpoints pruned, nothing non-finite saved


class Diverged(SystemExit):
    """A non-finite loss, gradient norm or weight: the run stops before anything is saved from it."""


def json_line(rec):
    """Strict JSON (RFC 8259 has no NaN or Infinity): non-finite is null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}, allow_nan=False)


def process_alive(owner):
    """False only for a process of this host that no longer exists (another host's cannot be checked)."""
    try:
        if owner.get("host") == socket.gethostname():
            os.kill(owner["pid"], 0)  # signal 0: does it exist?
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


TERMINATED = []  # the SIGTERM's number, once one came


def exit_on_sigterm():
    """SIGTERM (kill, a scheduler's timeout, torchrun stopping a failed job) exits through the cleanups: the temp file being
    written is removed, the lock released; the last complete checkpoint is resumable. A SystemExit raised while Python runs
    some object's __del__ is swallowed there ("Exception ignored in ..."), so the loop asks exit_if_terminated every step."""
    def handler(signum, frame):
        TERMINATED.append(signum)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def exit_if_terminated():
    if TERMINATED:
        sys.exit(128 + TERMINATED[0])


def take_lock(path, c):
    """-> the lock file's descriptor, created exclusively; a dead local run's lock is taken over, its temp files removed."""
    with contextlib.suppress(FileExistsError):
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        owner = {}
    if not owner or process_alive(owner):
        who = f"pid {owner['pid']} on {owner['host']}, started {owner['started']}" if owner else "an unreadable lock"
        raise BadInput(f"another train.py is using output_dir {c.output_dir} ({who}); wait for it or choose "
                       f"another output_dir. If no such run is alive, delete {path}")
    print(f"taking over {path}: its run (pid {owner['pid']}) is no longer alive")
    os.remove(path)
    for f in os.listdir(c.output_dir):
        if re.fullmatch(rf".+\.{owner['pid']}-[0-9a-f]{{8}}\.tmp", f):
            os.remove(os.path.join(c.output_dir, f))
    return take_lock(path, c)  # another run may have taken it meanwhile: then it is refused above


@contextlib.contextmanager
def output_dir_lock(c, r):
    """output_dir/train.lock (pid, host, start), held by rank 0: a second train.py there stops instead of interleaving saves."""
    if r.rank > 0:
        yield
        return
    path = os.path.join(c.output_dir, "train.lock")
    try:
        os.makedirs(c.output_dir, exist_ok=True)
        fd = take_lock(path, c)
    except OSError as e:
        raise WriteFailed(f"output_dir {c.output_dir} is not writable ({e.strerror or e}); choose another output_dir "
                          "or fix its permissions") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def check_output_dir(c, r):
    """Refuse a new run over this output_name's state or log unless overwrite=True: it may be a forgotten --resume=True."""
    if c.resume:  # read now, so that a damaged state or changed settings fail before the caching
        r.resume_state = read_resume_state(c, r)
        check_settings(*r.resume_state, c, r)
        return
    if r.rank > 0:
        return
    found = sorted(n for n in os.listdir(c.output_dir) if re.fullmatch(re.escape(c.output_name) + r"-(state.*\.pt|log\.jsonl)", n))
    if found and not c.overwrite:
        raise BadInput(f"output_dir {c.output_dir} already holds a run named {c.output_name!r} ({', '.join(found)}): "
                       "continue it with --resume=True, start over with --overwrite=True, or choose another output_name")
    r.replaced = [os.path.join(c.output_dir, name) for name in found]


def cut_log(path, step):
    """On resume: keep the log's lines up to the resumed step (none torn by a kill), so that it reads as one run."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(keep)))


def prune_checkpoints(c, r):
    """Remove step checkpoints (EMA twins too) older than save_last_n_steps, epoch ones beyond the save_last_n_epochs newest."""
    name = re.escape(c.output_name)
    rules = [(c.save_last_n_steps, name + r"-step(\d{6})(-ema)?\.safetensors", r.step - c.save_last_n_steps),
             (c.save_last_n_epochs, name + r"-(\d{6})(-ema)?\.safetensors", r.epoch - c.save_last_n_epochs * max(1, c.save_every_n_epochs))]
    for n, pattern, oldest_gone in rules:
        if not n:
            continue
        for f in os.listdir(c.output_dir):
            if (m := re.fullmatch(pattern, f)) and int(m.group(1)) <= oldest_gone:
                os.remove(os.path.join(c.output_dir, f))


def stopped_writing(c, r, e):
    left = (f"the last complete checkpoint is {r.last_saved}" if r.last_saved else "no checkpoint had been completed yet")
    return WriteFailed(f"{e}. Stopped at step {r.step}: {left}. Free space (or make {c.output_dir} writable) and "
                       "run again with --resume=True")


def divergence_message(c, r, what, step):
    last = (f"the last finite loss was {r.last_finite[1]:.4g} at step {r.last_finite[0]}" if r.last_finite
            else "no step had a finite loss")
    kept = (f"the last good checkpoint is {r.last_saved}, unchanged" if r.last_saved else "no checkpoint had been saved yet")
    return (f"training diverged: {what} at step {step}; {last}. Stopped without saving: {kept}. Try a lower learning_rate "
            f"(now {c.learning_rate:g}), max_grad_norm > 0 (now {c.max_grad_norm:g}), or look for a damaged image or weight "
            f"file; --resume=True continues from the last good state")


def check_finite_weights(c, r):
    """Every trained tensor and the EMA finite, else Diverged: no NaN is saved. One host sync per save; FSDP2 all-reduces."""
    tensors = [local(p).detach() for p in r.params] + (r.ema.shadow if r.ema else [])
    ok = torch.stack([torch.isfinite(t).all().to(c.device) for t in tensors]).all().float()
    if r.fsdp:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise Diverged(divergence_message(c, r, "a trained weight is not finite", r.step))


def start_log(c, r):
    """Open the log; only now, as training starts, does an overwritten run's state and log go (failing checks keeps them)."""
    for path in r.replaced:
        os.remove(path)
    r.log = open(r.log_path, "a") if r.rank == 0 else None


BAR = {"loss": ("loss", "{:.4f}"), "val_loss": ("val", "{:.4f}"), "lr": ("lr", "{:.2e}"), "peak_gb": ("mem", "{:.1f}GB")}  # shown, of all logged


def flush_log(c, r):
    """r.pending (step metrics: numbers or device tensors) -> means with one host sync -> JSON lines, bar; stops if not finite."""
    if not r.pending:
        return
    tensors = [v.detach().float().reshape(-1) for rec in r.pending for v in rec.values() if isinstance(v, torch.Tensor)]
    flat = torch.cat([t.to(tensors[0].device) for t in tensors]).tolist()  # the one sync
    bad, lines, k = None, [], 0
    for rec in r.pending:
        for key, v in rec.items():
            if isinstance(v, torch.Tensor):
                values, k = flat[k:k + v.numel()], k + v.numel()
                rec[key] = sum(values) / len(values)
                if key == "loss":  # one per micro-batch
                    r.losses += values
        val = rec.pop("val_loss", None)
        rec["peak_gb"] = round(memory.peak_memory_gb(c.device), 3)
        if val is not None:
            rec["val_loss"] = r.val_loss = val
        lines.append(json_line(rec) + "\n")
        if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
            bad = rec
            break
        r.last_finite = (rec["step"], rec["loss"])
    r.pending.clear()
    if r.log:  # the bad step's line too, before the stop
        try:
            r.log.write("".join(lines))
            r.log.flush()
        except OSError as e:
            raise stopped_writing(c, r, WriteFailed(f"could not write {r.log_path} ({e.strerror or e})")) from None
    if bad:
        raise Diverged(divergence_message(c, r, f"loss {bad['loss']:.4g}, gradient norm {bad['grad_norm']:.4g}", bad["step"]))
    if r.bar:
        shown = {**rec, "val_loss": r.val_loss}
        r.bar.set_postfix(**{name: fmt.format(shown[k]) for k, (name, fmt) in BAR.items() if shown.get(k) is not None})
