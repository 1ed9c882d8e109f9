"""
The optimizer step of train.py: torch's AdamW or Adafactor always on fp32 tensors (a bf16 weight stepped through an fp32
copy and stochastically rounded back), gradient clipping, the step fused into backward, and the EMA.

References (read, not copied): Revisiting BFloat16 Training (Zamirai et al. 2020) and Gupta et al. 2015 on
stochastic rounding; sd-scripts' fused_backward_pass and its Adafactor recipe; torch.optim's docs.

    python -c "import torch, optim; w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)); w.grad = torch.ones(4, dtype=torch.bfloat16); \\
               o = optim.Optimizer([[w]], 'AdamW', 1e-3, 0.0, 'stochastic', 0); o.step(0); print(w)"
"""
import contextlib

import torch
from torch.distributed.tensor import DTensor

OPTIMIZERS = {"AdamW": torch.optim.AdamW,  # fp32 states: 8 bytes a trained weight
              "Adafactor": torch.optim.Adafactor}  # factored second moment, no first moment; lr caps a step relative to each weight's RMS
BF16_UPDATES = {"stochastic": False,  # no master copy: an fp32 copy exists for one step, rounded back stochastically
                "master": True}  # a persistent fp32 master copy (+4 bytes a parameter), rounded back to nearest


def local(t):
    """The part of a tensor this process holds: an FSDP2 shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def stochastic_round_(dst, src, generator):
    """dst (bf16) <- src (fp32), rounded down or up at random with the probabilities that make it unbiased:
    adding uniform noise to the 16 bits bf16 drops, then truncating them. E[dst] = src, so an update far
    below bf16's resolution (2^-8 relative) still moves the weight on average instead of vanishing."""
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    dst.copy_((src.view(torch.int32) + noise).bitwise_and_(-65536).view(torch.float32))  # exact in bf16


class Optimizer:
    """AdamW or Adafactor over groups stepped one at a time (all LoRA tensors one group; in full mode one per tensor, stepped
    inside backward), seeing only fp32: a bf16 weight is stepped through an fp32 work tensor, written back per `bf16_update`."""
    def __init__(self, groups, kind, lr, weight_decay, bf16_update, seed, zero_grads_in_place=False):
        self.groups, self.master, self.seed, self.lr = groups, BF16_UPDATES[bf16_update], seed, lr
        # DDP's gradient_as_bucket_view: zeroed in place, a gradient stays a view of its bucket (None: a new one, then a copy)
        self.zero_grads_in_place = zero_grads_in_place
        self.work = [[self.work_tensor(local(p)) for p in g] for g in groups]
        self.opts = [OPTIMIZERS[kind](w, lr=lr, weight_decay=weight_decay) for w in self.work]
        device = local(groups[0][0]).device  # the meta device (plan.py's stand-in GPU) has no generator: it draws nothing
        self.generator = torch.Generator(device if device.type != "meta" else "cpu").manual_seed(seed)  # the rounding noise

    def work_tensor(self, p):
        if p.dtype == torch.float32:
            return p.detach()  # the weight itself
        return p.detach().float() if self.master else torch.empty(0, device=p.device)

    @torch.no_grad()
    def step(self, i):
        """Step group i with the gradients its tensors hold, then free those gradients."""
        for p, w in zip(self.groups[i], self.work[i]):
            if local(p).dtype != torch.float32 and not self.master:
                w.data = local(p).float()  # the fp32 copy exists for this step only
            w.grad = local(p.grad).float()
        for group in self.opts[i].param_groups:
            group["lr"] = self.lr
        self.opts[i].step()
        for p, w in zip(self.groups[i], self.work[i]):
            if local(p).dtype != torch.float32:
                if self.master:
                    local(p).copy_(w)  # round to nearest
                else:
                    stochastic_round_(local(p), w, self.generator)
                    w.data = torch.empty(0, device=w.device)
            w.grad = None
            if self.zero_grads_in_place:
                p.grad.zero_()
            else:
                p.grad = None

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts], "generator": self.generator.get_state(),
                "master": [[w.cpu() for w in ws] for ws in self.work] if self.master else None}

    def load_state_dict(self, st, same_device=True, step=0):
        for o, s in zip(self.opts, st["opts"]):
            o.load_state_dict(s)
        if same_device:
            self.generator.set_state(st["generator"])
        else:  # a CPU generator's state does not fit a CUDA generator (or back): a fresh stream, on purpose
            self.generator.manual_seed(self.seed + step)
        if self.master:
            for ws, saved in zip(self.work, st["master"]):
                for w, v in zip(ws, saved):
                    w.copy_(v)


class EMA:
    """Exponential moving average of the trained tensors in fp32 (bf16 would drop the (1 - decay) x update): every k = `every`
    steps, ema <- d^k ema + (1 - d^k) w, spanning the same steps whatever k. A CPU EMA of a CUDA model reads through pinned
    buffers on a side stream, k > 1 spreading that copy (5 GB for a full 2.6B model). `due` is read by the fused step."""
    def __init__(self, params, decay, device, every=1):
        self.params, self.decay, self.every, self.due = params, decay, every, every == 1
        self.shadow = [local(p).detach().to(device, torch.float32, copy=True) for p in params]
        cuda_to_host = local(params[0]).is_cuda and torch.device(device).type == "cpu"
        self.stream = torch.cuda.Stream() if cuda_to_host else None
        self.staging = [torch.empty(local(p).shape, dtype=p.dtype, pin_memory=True) for p in params] if cuda_to_host else None

    def set_step(self, step):
        """Before optimizer step `step` (0-based) runs: it updates the EMA when (step + 1) % every == 0."""
        self.due = (step + 1) % self.every == 0

    @torch.no_grad()
    def update(self, i):
        if not self.due:
            return
        w = local(self.params[i]).detach()
        if self.stream is not None:  # device -> pinned host copy off the compute stream, then the fp32 lerp on the CPU
            self.stream.wait_stream(torch.cuda.current_stream(w.device))
            with torch.cuda.stream(self.stream):
                self.staging[i].copy_(w, non_blocking=True)
            self.stream.synchronize()
            w = self.staging[i]
        self.shadow[i].lerp_(w.to(self.shadow[i].device, torch.float32), 1 - self.decay ** self.every)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the trained tensors hold the EMA (rounded to their dtype); after: their own values, exactly."""
        kept = [local(p).detach().to("cpu", copy=True) for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.shadow):
                local(p).copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    local(p).copy_(k)


def clip_limit(max_grad_norm):
    return max_grad_norm if max_grad_norm > 0 else float("inf")  # 0 = off; the norm is still computed, for the log


def step_after_backward(params, optimizer, max_grad_norm, ema=None):
    """Clip the global gradient norm, step every group, update the EMA. Returns the pre-clip norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip_limit(max_grad_norm))
    for i in range(len(optimizer.groups)):
        optimizer.step(i)
        if ema:
            ema.update(i)
    return norm


def fuse_steps_into_backward(params, optimizer, max_grad_norm, ema=None):
    """Full mode, params[i] alone in group i: step and free each gradient from a post-accumulate-grad hook, so the model's
    gradients never all exist at once; clipping is per tensor (no global norm yet). Returns the list of pre-clip norms."""
    norms = []

    def step(p, i):
        norms.append(torch.nn.utils.clip_grad_norm_([p], clip_limit(max_grad_norm)))
        optimizer.step(i)
        if ema:
            ema.update(i)

    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda p, i=i: step(p, i))
    return norms
