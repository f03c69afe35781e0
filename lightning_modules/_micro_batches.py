"""Splitting a training batch into micro-batches for gradient accumulation (pure torch, no Lightning)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["leading_size", "split", "split_sizes", "take"]


def leading_size(batch: Any, k: int) -> int:
    """The common first dimension of the batch's tensors, or a ValueError saying why it cannot be split."""
    sizes: set[int] = set()

    def visit(obj: Any) -> bool:
        if isinstance(obj, Tensor):
            if obj.ndim > 0:
                sizes.add(obj.shape[0])
            return obj.ndim > 0
        if isinstance(obj, (tuple, list)):
            return all(visit(o) for o in obj)
        if isinstance(obj, dict):
            return all(visit(o) for o in obj.values())
        return False

    if not visit(batch) or len(sizes) != 1:
        what = type(batch).__name__ if len(sizes) <= 1 else f"tensors with first dimensions {sorted(sizes)}"
        raise ValueError(
            f"Invalid accumulate_grad_batches: {k}; it splits each batch along the first dimension of its tensors, "
            f"and this batch ({what}) cannot be split that way. Use accumulate_grad_batches=1 (a larger batch "
            "needs more memory) or override split_batch"
        )
    return sizes.pop()


def split_sizes(n: int, k: int) -> list[int]:
    """The sizes of ``torch.tensor_split``'s ``k`` chunks of ``n`` rows (they differ by at most one)."""
    return [n // k + (i < n % k) for i in range(k)]


def split(obj: Any, k: int) -> list[Any]:
    """``k`` micro-batches of a tensor or a (named) tuple, list or dict of tensors, along the first dimension."""
    if isinstance(obj, Tensor):
        return list(obj.tensor_split(k))
    if isinstance(obj, dict):
        columns = {key: split(v, k) for key, v in obj.items()}
        return [type(obj)({key: c[i] for key, c in columns.items()}) for i in range(k)]
    rows = zip(*(split(o, k) for o in obj))
    if hasattr(obj, "_fields"):  # namedtuple
        return [type(obj)(*row) for row in rows]
    return [type(obj)(row) for row in rows]


def take(obj: Any, index: Tensor) -> Any:
    """The rows ``index`` of a tensor or a (named) tuple, list or dict of tensors (along the first dimension)."""
    if isinstance(obj, Tensor):
        return obj[index.to(obj.device)] if obj.ndim > 0 else obj
    if isinstance(obj, dict):
        return type(obj)({key: take(v, index) for key, v in obj.items()})
    if hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(take(o, index) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(take(o, index) for o in obj)
    return obj
