"""Fold eval-mode BatchNorm into the Linear/Conv layer it directly follows: the same function (torch only).

An eval-mode BatchNorm computes y = γ (x − μ)/√(σ² + ε) + β, an affine map per channel; after a layer
x = W a + b it folds into the layer as

    W' = s·W (row/output channel c scaled by s_c),  b' = s·(b − μ) + β,  s = γ/√(σ² + ε),

so the norm-based measures see the network's effective weights (Jiang et al. 2020 fold BatchNorm first, as
Neyshabur et al.'s ``generalization-bounds`` code does). The layer each BatchNorm follows is read from the
module tree for (nested) ``nn.Sequential`` networks and from a ``torch.fx`` trace otherwise; a BatchNorm
that does not directly follow a Linear/Conv layer whose output only it reads (pre-activation residual
blocks), or that has no running statistics, cannot be folded and is refused with a ``ValueError``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._core import unwrap
from .per_layer_traces import _PASSTHROUGH, _sequential_ops

__all__ = ["fold_batchnorm", "weight_layers", "LAYERS"]

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layers whose weights the norm-based measures read (and BatchNorm folds into)."""
_NORMS = {nn.BatchNorm1d: (nn.Linear, nn.Conv1d), nn.BatchNorm2d: (nn.Conv2d,), nn.BatchNorm3d: (nn.Conv3d,)}


def _norm_kind(module: nn.Module) -> type | None:
    return next((k for k in _NORMS if type(module) is k), None)


def _sequential_pairs(ops: list[tuple[str, nn.Module]]) -> list[tuple[str, str]]:
    pairs, layer = [], None
    for name, op in ops:
        if isinstance(op, LAYERS):
            layer = name
        elif _norm_kind(op) is not None and layer is not None:
            pairs.append((layer, name))
            layer = None
        elif not isinstance(op, _PASSTHROUGH):
            layer = None
    return pairs


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 - any tracing failure means we cannot find the layers
        raise ValueError(
            f"Invalid model for BatchNorm folding: {type(model).__name__} could not be traced by "
            f"torch.fx ({type(error).__name__}: {error}), so the layer each BatchNorm follows is "
            "unknown"
        ) from error
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or _norm_kind(model.get_submodule(str(node.target))) is None:
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and isinstance(model.get_submodule(str(source.target)), LAYERS)
            and calls[str(source.target)] == 1
            and calls[str(node.target)] == 1
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def _fold(layer: nn.Module, norm: nn.Module, norm_name: str) -> None:
    if not isinstance(layer, _NORMS[type(norm)]):
        raise ValueError(
            f"Invalid model for BatchNorm folding: {norm_name} ({type(norm).__name__}) follows a "
            f"{type(layer).__name__}, which it does not normalize channel-wise"
        )
    if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            f"Invalid model for BatchNorm folding: {norm_name} has no running statistics (in eval mode "
            "it normalizes with batch statistics, which is not an affine map)"
        )
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    shift = (bias - norm.running_mean) * scale + (norm.bias if norm.bias is not None else 0.0)
    layer.weight.mul_(scale.reshape(-1, *([1] * (layer.weight.ndim - 1))).to(layer.weight.dtype))
    layer.bias = nn.Parameter(shift.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm folded into the layer before it (see the module docstring).

    The copy computes the same function as ``model`` in eval mode (up to rounding); ``model`` is not changed.
    Layers without a bias get one. Raises ``ValueError`` naming a BatchNorm that cannot be folded.
    """
    model = unwrap(model)
    norms = [n for n, m in model.named_modules() if _norm_kind(m) is not None]
    out = copy.deepcopy(model).eval()
    if not norms:
        return out
    ops = _sequential_ops(model)
    pairs = _sequential_pairs(ops) if ops is not None else _fx_pairs(model)
    folded = {norm for _, norm in pairs}
    left = [n for n in norms if n not in folded]
    if left:
        kind = type(model.get_submodule(left[0])).__name__
        raise ValueError(
            f"Invalid model for BatchNorm folding: {left[0]} ({kind}) does not directly follow a "
            "Linear/Conv layer whose output only it reads, so it cannot be folded into a layer"
        )
    for layer_name, norm_name in pairs:
        _fold(out.get_submodule(layer_name), out.get_submodule(norm_name), norm_name)
        _replace(out, norm_name, nn.Identity())
    return out


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv layers of ``model`` with trainable weights, in module order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LAYERS) and m.weight.requires_grad]
