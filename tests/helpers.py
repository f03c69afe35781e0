"""Small shared helpers for the core tests: a quiet CPU Trainer and fixed-batch loaders."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or summary (overridable)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def fixed_batches(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> DataLoader:
    """A loader that yields exactly ``batches`` in order (no shuffling)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=batches[0][0].shape[0], shuffle=False)


def bn_mlp(seed: int = 0, in_features: int = 3, hidden: int = 6, classes: int = 3, dtype=torch.float64) -> nn.Module:
    """A tiny MLP with BatchNorm (Linear → BN → ReLU → Linear → BN → ReLU → Linear)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    ).to(dtype)
    net.out_features = classes
    return net


def classification_batches(
    n_batches: int, batch: int = 16, in_features: int = 3, classes: int = 3, seed: int = 1, dtype=torch.float64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random inputs with labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(in_features, classes, generator=g, dtype=dtype)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, in_features, generator=g, dtype=dtype)
        out.append((x, (x @ w).argmax(1)))
    return out


def params_of(module: nn.Module) -> list[torch.Tensor]:
    """Detached copies of a module's parameters."""
    return [p.detach().clone() for p in module.parameters()]


def clone(module: nn.Module) -> nn.Module:
    """A deep copy (same weights, independent storage)."""
    return copy.deepcopy(module)
