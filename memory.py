"""
Memory and speed transforms of the Next-DiT, applied from outside the model (placeholder: checkpointing and
placement only; block swap, fp8 and compile land here).
"""
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint


def blocks(model):
    """The transformer blocks, the unit of checkpointing and of FSDP2 sharding."""
    return [*model.context_refiner, *model.noise_refiner, *model.layers]


def enable_checkpointing(model):
    """Recompute each block's activations in backward (non-reentrant), set from outside the model."""
    for block in blocks(model):
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def prepare(model, device, *, fp8=False, checkpointing=False, compile=False, blocks_to_swap=0):
    if checkpointing:
        enable_checkpointing(model)
    return model.to(device)
