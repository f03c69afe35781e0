"""How a measure runs under DDP: each rank measures a share of the batches, with rank 0's buffers.

The measures in :mod:`flatminima.callbacks.measures` take a ``reduce`` hook that sums a tensor over processes;
:func:`reducer` builds it from the trainer's strategy. :func:`rank_zero_buffers` makes every rank
measure the model the checkpoint holds (rank 0's BatchNorm statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn

from ._core import Reduce


def reducer(trainer: pl.Trainer) -> Reduce | None:
    """The ``reduce`` hook of the measures: the sum over the trainer's processes (None on one process)."""
    if trainer.world_size <= 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="sum")


@contextlib.contextmanager
def rank_zero_buffers(network: nn.Module, trainer: pl.Trainer) -> Iterator[None]:
    """Under DDP, measure with rank 0's floating buffers (BatchNorm statistics), restored afterwards.

    DDP keeps parameters identical across ranks, but each rank's BatchNorm updates its own running
    statistics after the broadcast at the start of every forward; the checkpoint holds rank 0's. One
    broadcast makes every rank measure the same (saved) model.
    """
    buffers = [b for b in network.buffers() if b.is_floating_point()]
    if trainer.world_size <= 1 or not buffers or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    local = [b.detach().clone() for b in buffers]
    flat = torch.cat([b.detach().reshape(-1) for b in buffers])
    dist.broadcast(flat, src=0)
    try:
        with torch.no_grad():
            for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(v.view_as(b))
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, local)
