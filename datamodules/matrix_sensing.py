"""Overparametrised matrix sensing (Dai, Ahn & Sra 2023, appendix A): synthetic, seeded, no files."""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import TensorDataset

from flatminima.lightning_modules.validation import check_choice, check_int, invalid

from ._base import SplitDataModule, check_loader_args, check_net

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MatrixSensingDataModule(SplitDataModule):
    """Gaussian measurements ``b_i = ⟨A_i, X*⟩`` of a rank-r matrix ``X* = U* U*ᵀ`` (Dai, Ahn & Sra 2023).

    Following Dai, Ahn & Sra (2023, appendix A), whose SAM-vs-USAM experiment Wong et al. repeat
    (their appendix B): the entries of ``U* ∈ R^{d×r}`` are i.i.d. N(0, 1) and each column is then
    scaled to unit norm (so ``‖U*‖₂ ≈ 1``); the sensing matrices ``A_i ∈ R^{d×d}`` have i.i.d. N(0, 1)
    entries; ``b_i = ⟨A_i, X*⟩ = Σ_jk A_ijk X*_jk``. Their setting is d = 100, r = 5, m = 5·d·r = 2500
    measurements, trained full batch (``batch_size=None``). Use it with ``Regressor`` and
    :class:`~flatminima.lightning_modules.networks.MatrixFactorization`: the training loss is
    ``loss_scale · (1/m) Σ_i (⟨A_i, U Uᵀ⟩ − b_i)²`` (``loss_scale: 0.5`` is their ``1/(2m)``).
    Validation and test use fresh sensing matrices of the same law, so their MSE estimates
    ``‖U Uᵀ − X*‖²_F`` (``E⟨A, Δ⟩² = ‖Δ‖²_F``).

    Everything comes from one generator seeded with ``data_seed`` (the global RNG is untouched), so
    every run and every rank sees the same data. ``dtype: float64`` draws and stores everything in
    double precision (with ``trainer.precision: 64-true``, so that ``b_i`` is exact to float64 and a
    diverging run stays representable longer). Memory: ``4·d²·(m + num_val + num_test)`` bytes in
    float32 (140 MB for d = 100, m = 2500 and 500 + 500 evaluation matrices), twice that in float64.

    Args:
        dim: Matrix dimension d.
        rank: Rank r of the ground truth ``X*``.
        num_measurements: Number m of training measurements (None: ``5 · dim · rank``).
        num_val: Number of validation measurements.
        num_test: Number of test measurements.
        batch_size: Training batch size (None: full batch, m).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
        data_seed: Seed of X*, of the sensing matrices and of the shuffling.
        dtype: ``"float32"`` or ``"float64"``: precision in which the data are drawn and stored.
    """

    num_outputs = 1

    def __init__(
        self,
        dim: int = 100,
        rank: int = 5,
        num_measurements: int | None = None,
        num_val: int = 500,
        num_test: int = 500,
        batch_size: int | None = None,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        data_seed: int = 0,
        dtype: Literal["float32", "float64"] = "float32",
    ) -> None:
        super().__init__()
        dim = check_int("dim", dim, 1)
        rank = check_int("rank", rank, 1)
        if rank > dim:
            raise invalid("rank", rank, f"1 <= rank <= dim ({dim})")
        if num_measurements is None:
            num_measurements = 5 * dim * rank
        num_measurements = check_int("num_measurements", num_measurements, 1)
        num_val = check_int("num_val", num_val, 1)
        num_test = check_int("num_test", num_test, 1)
        if batch_size is None:
            batch_size = num_measurements
        batch_size, eval_batch_size, num_workers = check_loader_args(batch_size, eval_batch_size, num_workers)
        data_seed = check_int("data_seed", data_seed, 0)
        check_choice("dtype", dtype, tuple(_DTYPES))
        self.save_hyperparameters()
        self.hparams.num_measurements = num_measurements
        self.hparams.batch_size = batch_size
        self.dim = dim
        self.u_star: torch.Tensor | None = None
        self.x_star: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Draw ``U*``, the sensing matrices and their measurements (once, from ``data_seed``)."""
        check_net(self, dim=self.dim)
        if self.train_set is not None:
            return
        h = self.hparams
        g = torch.Generator().manual_seed(h.data_seed)
        dtype = _DTYPES[h.dtype]
        u = torch.randn(h.dim, h.rank, generator=g, dtype=dtype)
        u = u / torch.linalg.vector_norm(u, dim=0, keepdim=True)
        x_star = u @ u.T
        self.u_star, self.x_star = u, x_star

        def measure(count: int) -> TensorDataset:
            a = torch.randn(count, h.dim, h.dim, generator=g, dtype=dtype)
            return TensorDataset(a, torch.einsum("ijk,jk->i", a, x_star))

        self.train_set = measure(h.num_measurements)
        self.val_set = measure(h.num_val)
        self.test_set = measure(h.num_test)
