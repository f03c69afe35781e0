"""The factorised model U Uᵀ of overparametrised matrix sensing (Wong, Yao & Huang, appendix B)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..validation import check_choice, check_float, check_int


class MatrixFactorization(nn.Module):
    """Predicts ``⟨A, U Uᵀ⟩`` for a batch of sensing matrices A: the matrix-sensing model.

    Overparametrised matrix sensing (Li, Ma & Zhang, 2018; Dai, Ahn & Sra, 2023, appendix A;
    Wong, Yao & Huang, appendix B) recovers ``X* = U* U*ᵀ`` from ``b_i = ⟨A_i, X*⟩`` by minimising
    ``(1/m) Σ_i (⟨A_i, U Uᵀ⟩ − b_i)²`` over ``U ∈ R^{d×width}`` (``Regressor``'s MSE); ``width ≥ r``
    overparametrises it (``width = d`` by default). The forward pass forms ``X = U Uᵀ`` once
    (d²·width flops) and contracts the batch against it, ``⟨A_i, X⟩ = Σ_jk A_ijk X_jk``
    (B·d² flops), instead of ``A_i U`` per sample (B·d²·width flops).

    Initialisation: ``"gaussian"`` draws ``U_0`` with i.i.d. N(0, init_scale²) entries,
    ``"identity"`` sets ``U_0 = init_scale · I`` (the first ``min(d, width)`` columns); a small scale
    is what makes the implicit regularisation of Li et al. work.

    Args:
        dim: Matrix dimension d (must match the data).
        width: Number of columns of U (the factor's rank; ``≥ r`` overparametrises).
        init: ``"gaussian"`` or ``"identity"``.
        init_scale: Scale of ``U_0``.
    """

    def __init__(
        self,
        dim: int = 100,
        width: int = 100,
        init: Literal["gaussian", "identity"] = "gaussian",
        init_scale: float = 1e-2,
    ) -> None:
        super().__init__()
        dim = check_int("dim", dim)
        width = check_int("width", width)
        init = check_choice("init", init, ("gaussian", "identity"))
        init_scale = check_float("init_scale", init_scale, strict=True)
        if init == "gaussian":
            u = torch.randn(dim, width) * init_scale
        else:
            u = torch.eye(dim, width) * init_scale
        self.U = nn.Parameter(u)
        self.dim = dim
        self.width = width
        self.out_features = 1

    def forward(self, a: Tensor) -> Tensor:
        if a.ndim != 3 or a.shape[1:] != (self.dim, self.dim):
            raise ValueError(
                f"Invalid input for MatrixFactorization: shape {tuple(a.shape)}; "
                f"expected (batch, {self.dim}, {self.dim})"
            )
        return torch.einsum("bjk,jk->b", a, self.U @ self.U.T)

    def product(self) -> Tensor:
        """The recovered matrix ``U Uᵀ`` (d × d)."""
        return self.U @ self.U.T
