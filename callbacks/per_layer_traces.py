"""Exact per-layer traces of the cross-entropy Hessian of a feed-forward ReLU network (torch only).

For the mean cross-entropy L = (1/N) Σ_n CE(z_n, y_n) with logits z_n = f(x_n; θ) and softmax p_n,
the Hessian is the generalized Gauss-Newton matrix plus Σ_k (p_nk − y_nk) ∇²z_nk. In a network that
is piecewise linear in each layer's parameters (Linear/Conv2d layers, ReLU/LeakyReLU, max/avg
pooling, eval-mode BatchNorm folded into the layer before it), ∂²z/∂θ_i² = 0, so the *diagonal* of
the Hessian equals the diagonal of the GGN and needs no labels (Ibayashi et al. 2021):

    diag H = (1/N) Σ_n [ Σ_k p_nk (∂z_nk/∂θ)² − (Σ_k p_nk ∂z_nk/∂θ)² ].

With S_n = diag(p_n) − p_n p_nᵀ = A_n A_nᵀ the per-example trace over a layer's weights is
Σ_j ‖∂(a_njᵀ z_n)/∂W‖². We use the rank-(K−1) factor A_n = diag(√p_n)·Q_n, where Q_n holds K−1
orthonormal columns spanning √p_n^⊥ (a Householder reflection that maps √p_n to −e_m, m = argmax
p_n, with column m dropped): K−1 backward passes to the layer outputs, batched over examples.
For a layer with output gradient b (per position) and input a (per position), the per-example
weight gradient is Σ_l b_l a_lᵀ: for a Linear layer on vectors its squared norm is ‖b‖²‖a‖²; for a
Conv2d layer (a = unfolded input patches) it is computed either directly (per-example gradient of
size C_out × C_in k²) or through L×L Gram matrices, whichever costs fewer flops. No per-example
gradient of a whole network is ever materialized.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ._core import Reduce, all_sum, compute_dtype, evaluating, model_device, prepared, unwrap

_LAYERS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_PASSTHROUGH = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_SMOOTH = (
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.PReLU,
    nn.RReLU,
)
_FUNCTIONS = {
    F.relu: "homogeneous",
    torch.relu: "homogeneous",
    F.leaky_relu: "homogeneous",
    F.max_pool1d: "homogeneous",
    F.max_pool2d: "homogeneous",
    F.avg_pool1d: "homogeneous",
    F.avg_pool2d: "homogeneous",
    F.adaptive_avg_pool1d: "homogeneous",
    F.adaptive_avg_pool2d: "homogeneous",
    F.adaptive_max_pool1d: "homogeneous",
    F.adaptive_max_pool2d: "homogeneous",
    torch.flatten: "passthrough",
    F.dropout: "passthrough",
    torch.reshape: "passthrough",
}
_METHODS = {
    "relu": "homogeneous",
    "relu_": "homogeneous",
    "flatten": "passthrough",
    "view": "passthrough",
    "reshape": "passthrough",
    "contiguous": "passthrough",
    "squeeze": "passthrough",
    "unsqueeze": "passthrough",
}
_ELEMENTS = 1 << 24  # working-set budget (elements) of one chunk of per-example products


@dataclass(frozen=True)
class Layer:
    """One α-scalable layer of a feed-forward chain: a Linear/Conv2d and the BatchNorm folded into it."""

    name: str
    module: nn.Linear | nn.Conv2d
    norm: nn.BatchNorm1d | nn.BatchNorm2d | None = None

    @property
    def has_bias(self) -> bool:
        """The folded layer has a bias (its own, or the BatchNorm shift)."""
        return self.module.bias is not None or self.norm is not None


@dataclass(frozen=True)
class LayerTraces:
    """Per-layer traces of the Hessian of the mean cross-entropy (example means, float64 on the CPU).

    ``weight[d]`` is T_d = Tr of the Hessian block of layer d's (folded) weights, ``bias[d]`` is B_d for
    its bias (0 without one); ``count`` is the number of examples they average over.
    """

    names: tuple[str, ...]
    weight: Tensor
    bias: Tensor
    has_bias: tuple[bool, ...]
    count: int

    @property
    def total(self) -> float:
        """Tr H over all layer parameters: Σ_d T_d + Σ_d B_d."""
        return float(self.weight.sum() + self.bias.sum())


class UnsupportedNetworkError(ValueError):
    """The network is not a feed-forward chain on which per-layer α-scaling is a symmetry."""


# ---------------------------------------------------------------------------------------- the chain
def _refuse(name: str, module: Any, why: str) -> UnsupportedNetworkError:
    what = type(module).__name__ if not isinstance(module, str) else module
    return UnsupportedNetworkError(
        f"Invalid model for minimum sharpness: {name or '<root>'} ({what}) {why}. Minimum sharpness needs a "
        "feed-forward chain of Linear/Conv2d layers with ReLU/LeakyReLU/max- or avg-pooling (BatchNorm "
        "right after a layer is folded into it), where scaling layer d by α_d with ∏α_d = 1 leaves the "
        "function unchanged"
    )


def _module_kind(name: str, m: nn.Module) -> str:
    if isinstance(m, _LAYERS):
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise _refuse(name, m, f"has groups={m.groups}; only groups=1 convolutions are supported")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise _refuse(name, m, f"has padding_mode={m.padding_mode!r}; only zero padding is supported")
        return "layer"
    if isinstance(m, _NORMS):
        if not m.track_running_stats or m.running_mean is None or m.running_var is None:
            raise _refuse(
                name,
                m,
                "has no running statistics, so in eval mode it normalizes with batch "
                "statistics and is not an affine map that can be folded",
            )
        return "norm"
    if isinstance(m, _HOMOGENEOUS):
        return "homogeneous"
    if isinstance(m, _PASSTHROUGH):
        return "passthrough"
    if isinstance(m, _SMOOTH):
        raise _refuse(
            name,
            m,
            "is not positively homogeneous (f(αx) ≠ αf(x)), so per-layer α-scaling changes the network's function",
        )
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)):
        raise _refuse(
            name,
            m,
            "normalizes with per-example statistics, which makes the preceding layers' "
            "scale irrelevant and is not an affine map that can be folded",
        )
    raise _refuse(name, m, "is not a supported layer of a feed-forward ReLU chain")


def _sequential_ops(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """Leaf modules of nested ``nn.Sequential`` containers in execution order (None if not such a tree)."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        ops: list[tuple[str, nn.Module]] = []
        for child_name, child in model.named_children():
            sub = _sequential_ops(child, f"{prefix}{child_name}.")
            if sub is None:
                return None
            ops += sub
        return ops
    if len(list(model.children())) == 0:
        return [(prefix.rstrip("."), model)]
    return None


def _is_shape_query(node: Any) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1:] == ("shape",):
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        return _is_shape_query(node.args[0])
    return False


def _fx_ops(model: nn.Module) -> list[tuple[str, Any]]:
    """Operations of ``model.forward`` traced by torch.fx; refuses anything that is not one chain."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 - any tracing failure means we cannot verify the chain
        raise _refuse(
            "",
            model,
            f"could not be traced by torch.fx to verify it is a feed-forward chain "
            f"({type(error).__name__}: {error}); wrap the layers in an nn.Sequential",
        ) from error
    ops: list[tuple[str, Any]] = []
    prev = None
    for node in graph.nodes:
        if _is_shape_query(node):
            continue
        if node.op == "placeholder":
            if prev is not None:
                raise _refuse("", model, "takes more than one input")
            prev = node
            continue
        inputs = [a for a in node.all_input_nodes if not _is_shape_query(a)]
        if node.op == "output":
            if inputs != [prev]:
                raise _refuse("", model, "does not return the output of its last operation alone")
            break
        users = [u for u in prev.users if not _is_shape_query(u)]
        if inputs != [prev] or len(users) != 1:
            raise _refuse(
                node.name,
                str(node.target),
                "combines tensors or reuses an intermediate output "
                "(residual/skip connection): not a feed-forward chain",
            )
        if node.op == "call_module":
            ops.append((str(node.target), model.get_submodule(str(node.target))))
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            ops.append((node.name, _FUNCTIONS[node.target]))
        elif node.op == "call_method" and node.target in _METHODS:
            ops.append((node.name, _METHODS[node.target]))
        else:
            raise _refuse(
                node.name,
                str(getattr(node.target, "__name__", node.target)),
                "is an operation that is not positively homogeneous or not supported",
            )
        prev = node
    return ops


def feed_forward_layers(model: nn.Module) -> list[Layer]:
    """The α-scalable layers of a feed-forward chain, in order, each with the BatchNorm folded into it.

    ``model`` is a (nested) ``nn.Sequential`` or a module whose ``forward`` torch.fx can trace to a
    single chain. Raises :class:`UnsupportedNetworkError` (a ``ValueError``) naming the offending part
    when per-layer α-scaling is not a symmetry: smooth activations, residual connections, BatchNorm
    that does not directly follow a layer, grouped convolutions, weight sharing.
    """
    model = unwrap(model)
    ops = _sequential_ops(model)
    if ops is None:
        ops = _fx_ops(model)
    layers: list[Layer] = []
    seen: set[int] = set()
    last = None  # kind of the last non-passthrough op
    for name, op in ops:
        kind = op if isinstance(op, str) else _module_kind(name, op)
        if isinstance(op, nn.Module):
            if id(op) in seen and kind in ("layer", "norm"):
                raise _refuse(name, op, "is used twice (shared weights)")
            seen.add(id(op))
        if kind == "layer":
            layers.append(Layer(name, op))
        elif kind == "norm":
            if last != "layer":
                raise _refuse(
                    name,
                    op,
                    "does not directly follow a Linear/Conv2d layer; only a BatchNorm right "
                    "after a layer is affine in that layer and can be folded into it",
                )
            layers[-1] = Layer(layers[-1].name, layers[-1].module, op)
        if kind != "passthrough":
            last = kind
    if not layers:
        raise _refuse("", model, "has no Linear/Conv2d layer")
    owned = {id(p) for layer in layers for m in (layer.module, layer.norm) if m is not None for p in m.parameters()}
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            raise _refuse(pname, "parameter", "is a trainable parameter outside the Linear/Conv2d/BatchNorm layers")
    return layers


# ---------------------------------------------------------------------------------------- the traces
def _ce_hessian_factor(logits: Tensor) -> Tensor:
    """A (N, K, K−1) factor A with A Aᵀ = diag(p) − p pᵀ, p = softmax(logits), for each example.

    A = diag(√p)·Q where Q is the Householder reflection H = I − 2vvᵀ/vᵀv, v = √p + e_m (m = argmax p,
    so vᵀv = 2 + 2√p_m ≥ 2 is well conditioned) with column m removed: H maps √p to −e_m, hence
    Q Qᵀ = H (I − e_m e_mᵀ) H = I − √p√pᵀ and A Aᵀ = diag(√p)(I − √p√pᵀ)diag(√p) = diag(p) − ppᵀ.
    """
    n, k = logits.shape
    p = logits.softmax(dim=1)
    s = p.sqrt()
    m = p.argmax(dim=1)
    rows = torch.arange(n, device=logits.device)
    v = s.clone()
    v[rows, m] += 1.0
    outer = v[:, :, None] * v[:, None, :]
    h = torch.eye(k, dtype=p.dtype, device=p.device) - (2.0 / (v * v).sum(1))[:, None, None] * outer
    cols = torch.arange(k, device=logits.device).expand(n, k)
    keep = cols[cols != m[:, None]].view(n, k - 1)
    q = h.gather(2, keep[:, None, :].expand(n, k, k - 1))
    return s[:, :, None] * q


def _conv_patches(conv: nn.Conv2d, a: Tensor) -> Tensor:
    """Input patches of a Conv2d per output position: (N, C_in·kh·kw, L), L = H_out·W_out.

    A strided view of the (padded) input copied once; faster than ``F.unfold`` on the CPU.
    """
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    if padding == "same":  # stride 1: total dilation·(k−1) per dimension, the odd one on the right/bottom
        th, tw = dh * (kh - 1), dw * (kw - 1)
        a = F.pad(a, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    elif padding != (0, 0):
        a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    v = a.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]
    v = v.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # (N, C, H_out, W_out, kh, kw)
    n, c, h, w = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, h * w)


def _sqsum(t: Tensor) -> Tensor:
    """Σ t² as a float64 scalar (one BLAS dot, no squared copy)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat).to(torch.float64)


def _features(layer: Layer, t: Tensor, is_input: bool) -> Tensor:
    """A layer's input patches or output gradients as (N, features, L), L the number of output positions."""
    if isinstance(layer.module, nn.Conv2d):
        return _conv_patches(layer.module, t) if is_input else t.flatten(2)
    return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)


def _chunks(n: int, per_example: int) -> list[slice]:
    step = max(1, _ELEMENTS // max(per_example, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _LayerAccumulator:
    """Accumulates Σ_n Σ_j ‖∂(a_njᵀ z_n)/∂W_d‖² (and the bias analogue) for one layer over the columns j.

    With input patches U_n (F_in × L) and output gradients B_nj (F_out × L) the per-example weight
    gradient is B_nj U_nᵀ. For L = 1 (a Linear layer on vectors) ‖B U ᵀ‖² = ‖B‖²‖U‖². Otherwise either
    directly (F_out·L·F_in flops per column) or as ⟨Σ_j B_njᵀB_nj, U_nᵀU_n⟩ with L×L Gram matrices
    (L²·F_out per column plus L²·F_in once), whichever is cheaper.
    """

    def __init__(self, layer: Layer, a: Tensor, n_columns: int) -> None:
        self.layer = layer
        self.u = _features(layer, a, is_input=True)  # (N, F_in, L)
        n, f_in, length = self.u.shape
        f_out = layer.module.out_features if isinstance(layer.module, nn.Linear) else layer.module.out_channels
        self.length = length
        self.direct = length == 1 or f_in * f_out <= length * (f_out + f_in / max(n_columns, 1))
        self.u_sq = self.u.square().sum((1, 2)) if length == 1 else None
        self.weight = torch.zeros((), dtype=torch.float64, device=a.device)
        self.bias = torch.zeros((), dtype=torch.float64, device=a.device)
        self.gram_chunks = _chunks(n, length * length)
        self.b_gram = None if self.direct else torch.zeros(n, length, length, dtype=a.dtype, device=a.device)

    def add(self, g: Tensor) -> None:
        b = _features(self.layer, g, is_input=False)  # (N, F_out, L)
        if self.layer.has_bias:
            self.bias += _sqsum(b.sum(2))
        if self.u_sq is not None:
            self.weight += (self.u_sq * b.square().sum((1, 2))).sum().to(torch.float64)
        elif self.direct:
            n, f_out, length = b.shape
            for c in _chunks(n, f_out * self.u.shape[1]):
                self.weight += _sqsum(b[c] @ self.u[c].transpose(1, 2))
        else:
            self.b_gram.baddbmm_(b.transpose(1, 2), b)

    def finish(self) -> None:
        """Fold the accumulated Gram matrices into the weight sum (Gram mode only)."""
        if self.b_gram is None:
            return
        for c in self.gram_chunks:
            u = self.u[c]
            self.weight += (self.b_gram[c] * (u.transpose(1, 2) @ u)).sum().to(torch.float64)
        self.b_gram = None


def layer_traces(model: nn.Module, batches: Iterable[Any], *, reduce: Reduce | None = None) -> LayerTraces:
    """Exact per-layer traces T_d, B_d of the Hessian of the mean cross-entropy (labels not needed).

    Ibayashi, Hamaguchi & Imaizumi (2021), "Minimum sharpness: scale-invariant parameter-robustness of
    neural networks": for a feed-forward ReLU chain, diag H = diag GGN, and per layer

        T_d = (1/N) Σ_n Σ_j ‖∂(a_njᵀ z_n)/∂W_d‖²,   A_n A_nᵀ = diag(p_n) − p_n p_nᵀ,

    (B_d likewise for the bias), with eval-mode BatchNorm folded into the layer before it. The model is
    measured in eval mode and fp32 and left untouched.

    Args:
        model: A feed-forward chain (see :func:`feed_forward_layers`) producing (N, K) logits.
        batches: Iterable of ``(inputs, targets)`` (targets are ignored) or of input tensors.
        reduce: Sums a tensor over processes (each process passing its share of the batches);
            None on one process.

    Returns:
        The per-layer traces (example means over all processes' batches).
    """
    model = unwrap(model)
    layers = feed_forward_layers(model)
    device, dtype = model_device(model), compute_dtype(model)
    depth = len(layers)
    weight = torch.zeros(depth, dtype=torch.float64, device=device)
    bias = torch.zeros(depth, dtype=torch.float64, device=device)
    count = 0
    with evaluating(model):
        params = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
        params.update({n: b.detach().to(dtype) for n, b in model.named_buffers() if b.is_floating_point()})
        for inputs, _ in prepared(batches, device, dtype):
            if isinstance(inputs, (tuple, list)):
                raise TypeError("Invalid batches for minimum sharpness: a feed-forward chain takes one input tensor")
            w, b, n = _batch_traces(model, layers, params, inputs)
            weight += w
            bias += b
            count += n
    packed = all_sum(torch.cat([weight, bias, weight.new_tensor([float(count)])]), reduce).cpu()
    total = float(packed[-1])
    if total == 0:
        raise ValueError("Invalid batches: no example to measure minimum sharpness on (the iterable is empty)")
    return LayerTraces(
        names=tuple(layer.name for layer in layers),
        weight=packed[:depth] / total,
        bias=packed[depth : 2 * depth] / total,
        has_bias=tuple(layer.has_bias for layer in layers),
        count=int(total),
    )


def _batch_traces(
    model: nn.Module, layers: list[Layer], params: dict[str, Tensor], inputs: Tensor
) -> tuple[Tensor, Tensor, int]:
    acts: list[Tensor | None] = [None] * len(layers)
    outs: list[Tensor | None] = [None] * len(layers)

    def capture_input(i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            acts[i] = args[0].detach()

        return hook

    def capture_output(i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            outs[i] = output
            return output.clone()  # downstream in-place ops (ReLU(inplace=True)) must not touch it

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.module.register_forward_hook(capture_input(i)))
            handles.append((layer.norm or layer.module).register_forward_hook(capture_output(i)))
        logits = functional_call(model, params, (inputs,))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Invalid model output for minimum sharpness: {shape}; expected (batch, classes) logits")
    if any(a is None for a in acts) or any(o is None for o in outs):
        raise UnsupportedNetworkError("Invalid model for minimum sharpness: a layer of the chain was not called")
    n, k = logits.shape
    weight = logits.new_zeros(len(layers), dtype=torch.float64)
    bias = logits.new_zeros(len(layers), dtype=torch.float64)
    if k < 2:
        return weight, bias, n
    factor = _ce_hessian_factor(logits.detach())
    accs = [_LayerAccumulator(layer, a, k - 1) for layer, a in zip(layers, acts)]
    for j in range(k - 1):
        grads = torch.autograd.grad(logits, outs, grad_outputs=factor[:, :, j], retain_graph=j < k - 2)
        for acc, g in zip(accs, grads):
            acc.add(g)
    for acc in accs:
        acc.finish()
    weight = torch.stack([acc.weight for acc in accs])
    bias = torch.stack([acc.bias for acc in accs])
    return weight, bias, n
