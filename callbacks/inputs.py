"""Ready-made ``batch_to_inputs`` hooks and losses for batches that are not ``(x, y)`` (torch only).

Usable from YAML by import path, e.g. for seed 002's GAT on Cora::

    - class_path: callbacks.AdaptiveSharpness
      init_args:
        rho: 0.02
        batch_to_inputs: callbacks.inputs.node_inputs
        loss_fn: callbacks.inputs.masked_cross_entropy
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor


def node_inputs(data: Any, mask: str = "train_mask") -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x, edge_index), (y, mask))`` of a PyG ``Data`` graph: the net is called as ``net(x, edge_index)``.

    Pair it with :func:`masked_cross_entropy`, which scores the nodes of ``mask`` (the training nodes).
    """
    for key in ("x", "edge_index", "y", mask):
        if getattr(data, key, None) is None:
            raise ValueError(f"Invalid batch for node_inputs: a PyG Data object with '{key}' is needed")
    return (data.x, data.edge_index), (data.y, getattr(data, mask))


def masked_cross_entropy(logits: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy over the masked nodes: ``targets`` is ``(y, mask)`` from :func:`node_inputs`."""
    y, mask = targets
    return F.cross_entropy(logits[mask], y[mask])


def mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of a ``(N, 1)`` regression output against ``(N,)`` targets (no broadcasting to N×N)."""
    if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    if outputs.shape != targets.shape:
        raise ValueError(f"Invalid targets: shape {tuple(targets.shape)} for outputs of shape {tuple(outputs.shape)}")
    return F.mse_loss(outputs, targets.to(outputs.dtype))
