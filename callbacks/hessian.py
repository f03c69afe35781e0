"""Hessian spectrum and trace from exact Hessian-vector products (torch only).

The loss is the mean over batches of the batch loss L_B(w); ``H v`` is computed exactly by double
backward (``torch.autograd.grad`` of ⟨∇L_B, v⟩; it never triggers DDP's gradient reducer), summed over
this process's batches and over processes by a ``reduce`` hook, so every process sees the same H v.

* Top-k eigenvalues: Lanczos with full reorthogonalization from a seeded start vector, stopped when
  the residual ‖H y − θ y‖ = |β_m s_m| of each of the top-k Ritz pairs is ≤ tol·max|θ| (Golub & Van
  Loan, §10.1), or after ``max_iter`` products, or on an invariant subspace (then exact).
* Trace: Hutchinson's estimator Tr H ≈ (1/n) Σ_i v_iᵀ H v_i with n Rademacher probes (Hutchinson 1989;
  Avron & Toledo 2011), with its standard error s/√n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._core import FlatModel, LossFn, Reduce, all_sum


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of Tr H: the mean of ``n_probes`` Rademacher quadratic forms and its standard error."""

    value: float
    stderr: float
    n_probes: int


class HessianOperator:
    """v ↦ H v for H the Hessian of the mean batch loss, exact, summed across processes.

    With ``cache_graphs`` (default) the first-order gradient graph of every local batch is kept, so each
    product costs one double-backward pass per batch; otherwise each product recomputes forward and
    first backward (less memory).
    """

    def __init__(
        self,
        fm: FlatModel,
        batches: Sequence[tuple[Any, Any]],
        loss_fn: LossFn,
        reduce: Reduce | None = None,
        cache_graphs: bool = True,
    ) -> None:
        self.fm = fm
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.reduce = reduce
        self.cache_graphs = cache_graphs
        self.w = fm.w0.detach().requires_grad_(True)
        count = all_sum(fm.w0.new_tensor([float(len(self.batches))], dtype=torch.float64), reduce)
        self.count = float(count[0])
        if self.count == 0:
            raise ValueError("Invalid batches: no batch to measure the Hessian on (the iterable is empty)")
        self._grads = [self._grad(batch) for batch in self.batches] if cache_graphs else None
        self.products = 0

    def _grad(self, batch: tuple[Any, Any]) -> Tensor:
        loss = self.fm.loss(self.w, batch, self.loss_fn)
        (grad,) = torch.autograd.grad(loss, self.w, create_graph=True)
        return grad

    def local(self, v: Tensor) -> Tensor:
        """Σ over this process's batches of H_B v (not yet reduced nor averaged)."""
        out = torch.zeros_like(self.fm.w0)
        for i, batch in enumerate(self.batches):
            grad = self._grads[i] if self._grads is not None else self._grad(batch)
            if not grad.requires_grad:  # the loss is linear in w on this batch: H_B = 0
                continue
            (hv,) = torch.autograd.grad(grad, self.w, v, retain_graph=self._grads is not None, allow_unused=True)
            if hv is not None:
                out += hv
        self.products += 1
        return out

    def __call__(self, v: Tensor) -> Tensor:
        """H v (the same on every process)."""
        return all_sum(self.local(v), self.reduce) / self.count


def lanczos_top(operator: HessianOperator, k: int, *, tol: float, max_iter: int, seed: int) -> list[float]:
    """The k largest eigenvalues of the operator (descending) by Lanczos with full reorthogonalization."""
    fm = operator.fm
    n = fm.numel
    if k > n:
        raise ValueError(f"Invalid k: {k}; expected k <= the number of trainable parameters ({n})")
    steps = min(max_iter, n)
    generator = torch.Generator(device=fm.device).manual_seed(seed)
    q = torch.randn(n, generator=generator, device=fm.device, dtype=fm.dtype)
    basis = torch.empty(steps + 1, n, device=fm.device, dtype=fm.dtype)
    basis[0] = q / torch.linalg.vector_norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    ritz: Tensor | None = None
    for j in range(steps):
        w = operator(basis[j])
        alpha = torch.dot(w, basis[j])
        w = w - alpha * basis[j] - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
        for _ in range(2):  # full reorthogonalization, twice is enough (Kahan/Parlett)
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(float(alpha))
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(t)
        ritz = values.flip(0)[:k]
        if j + 1 >= k:
            residual = (beta * vectors[-1].flip(0)[:k]).abs()
            scale = max(float(values.abs().max()), torch.finfo(fm.dtype).tiny)
            if bool((residual <= tol * scale).all()):
                break
        if beta <= 1e3 * torch.finfo(fm.dtype).eps * max(float(values.abs().max()), 1.0):
            break  # invariant subspace: the Ritz values are eigenvalues
        betas.append(beta)
        basis[j + 1] = w / beta
    values = ritz.tolist() if ritz is not None else []
    if len(values) < k:
        raise ValueError(
            f"Invalid k: {k}; the Krylov space of the Hessian has dimension {len(values)} here (too few distinct "
            "eigenvalues), so only that many eigenvalues can be resolved"
        )
    return [float(v) for v in values]


def hutchinson(operator: HessianOperator, n_probes: int, *, seed: int) -> TraceEstimate:
    """Hutchinson's trace estimate with ``n_probes`` Rademacher probes (seeded, the same on every process)."""
    fm = operator.fm
    generator = torch.Generator(device=fm.device).manual_seed(seed)
    forms = torch.empty(n_probes, dtype=torch.float64, device=fm.device)
    for i in range(n_probes):
        v = torch.randint(0, 2, (fm.numel,), generator=generator, device=fm.device).to(fm.dtype).mul_(2).sub_(1)
        forms[i] = torch.dot(v, operator.local(v)).to(torch.float64)
    forms = all_sum(forms, operator.reduce) / operator.count
    value = float(forms.mean())
    stderr = float(forms.std() / math.sqrt(n_probes)) if n_probes > 1 else math.inf
    return TraceEstimate(value=value, stderr=stderr, n_probes=n_probes)
