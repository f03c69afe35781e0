"""Ready-made ``batch_to_inputs`` hooks and losses for batches that are not ``(x, y)`` (torch only).

Usable from YAML by import path, e.g. for Hammoud et al. 2023's GAT on Cora::

    - class_path: flatminima.callbacks.AdaptiveSharpness
      init_args:
        rho: 0.02
        batch_to_inputs: flatminima.callbacks.inputs.node_inputs
        loss_fn: flatminima.callbacks.inputs.masked_cross_entropy
"""

from __future__ import annotations

from typing import Any

import torch
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


def node_subgraph_inputs(
    data: Any, mask: str = "train_mask", num_hops: int = 2
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """:func:`node_inputs` restricted to the ``num_hops``-hop neighbourhood of the mask's nodes: same loss, less work.

    A network of ``num_hops`` message-passing layers (the two-layer GAT) computes a node's output from
    its ``num_hops``-hop neighbourhood only, so the masked loss on the subgraph induced by the mask's
    ``num_hops``-hop neighbourhood (``torch_geometric.utils.k_hop_subgraph``, nodes relabelled) equals the
    loss on the whole graph, up to floating-point summation order. On Cora a batch of 64 training nodes
    keeps about 1200 of the 2708 nodes, and a measure's forward-backward passes take about a quarter of
    the time. Not for networks with more layers than ``num_hops`` or with graph-wide operations.
    """
    from torch_geometric.utils import k_hop_subgraph

    (x, edge_index), (y, node_mask) = node_inputs(data, mask)
    nodes = node_mask.nonzero().flatten()
    subset, sub_edges, mapping, _ = k_hop_subgraph(
        nodes, num_hops, edge_index, relabel_nodes=True, num_nodes=x.shape[0]
    )
    sub_mask = torch.zeros(subset.numel(), dtype=torch.bool, device=node_mask.device)
    sub_mask[mapping] = True
    return (x[subset], sub_edges), (y[subset], sub_mask)
