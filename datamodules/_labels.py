"""Label noise: corrupt a seeded fraction of the training labels (shared by the classification modules)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flatminima.lightning_modules.validation import check_choice, check_fraction

LabelNoiseMode = Literal["shuffle", "uniform"]
LABEL_NOISE_MODES = ("shuffle", "uniform")
_STREAM = 104_729  # offset of the label-noise random stream from the split's (same data_seed)


def corrupt_labels(
    targets: Tensor, fraction: float, num_classes: int, seed: int, mode: LabelNoiseMode = "shuffle"
) -> tuple[Tensor, Tensor]:
    """Return a copy of ``targets`` with ``round(fraction · n)`` labels corrupted, and their indices.

    The examples to corrupt are a seeded random subset. ``"shuffle"`` permutes the labels within that
    subset (the class frequencies are unchanged; the minimum-sharpness study of Ibayashi et al. 2021
    controls the generalization gap by shuffling labels); ``"uniform"`` replaces them by labels drawn
    uniformly from ``num_classes`` (Zhang et al. 2017's "corrupted labels"; a draw may equal the true
    label). Both are reproducible from ``seed`` and touch no global random state.

    Args:
        targets: Integer class labels, shape ``(n,)``.
        fraction: Fraction of the labels to corrupt, in [0, 1].
        num_classes: Number of classes (for ``"uniform"``).
        seed: Seed of the choice of examples and of the new labels.
        mode: ``"shuffle"`` or ``"uniform"``.
    """
    fraction = check_fraction("label_noise", fraction, closed=True)
    check_choice("label_noise_mode", mode, LABEL_NOISE_MODES)
    targets = torch.as_tensor(targets, dtype=torch.long)
    n = targets.numel()
    k = int(round(fraction * n))
    generator = torch.Generator().manual_seed(seed + _STREAM)
    chosen = torch.randperm(n, generator=generator)[:k]
    out = targets.clone()
    if k:
        if mode == "shuffle":
            out[chosen] = targets[chosen][torch.randperm(k, generator=generator)]
        else:
            out[chosen] = torch.randint(num_classes, (k,), generator=generator)
    return out, chosen.sort().values
