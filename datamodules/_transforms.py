"""Image transforms that torchvision lacks: Cutout."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatminima.lightning_modules.validation import check_float, check_int, invalid


class Cutout(nn.Module):
    """Zero a ``size × size`` square at a random centre of a ``(C, H, W)`` image (DeVries & Taylor, 2017).

    The centre is uniform over the pixels, so the square may be clipped by the border, as in the
    paper ("Improved regularization of convolutional neural networks with cutout"). Applied after
    normalisation, with probability ``p`` (davda54/sam's CIFAR pipeline, the base of Wong, Yao & Huang: 16 px, p 0.5).

    Args:
        size: Side of the square in pixels (>= 1).
        p: Probability of applying it to an image.
    """

    def __init__(self, size: int, p: float = 1.0) -> None:
        super().__init__()
        self.size = check_int("cutout", size, 1)
        self.p = check_float("cutout_prob", p)
        if not 0.0 < self.p <= 1.0:
            raise invalid("cutout_prob", p, "0 < cutout_prob <= 1")

    def forward(self, img: Tensor) -> Tensor:
        if self.p < 1.0 and torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, left = cy - self.size // 2, cx - self.size // 2
        img = img.clone()
        img[..., max(top, 0) : max(top + self.size, 0), max(left, 0) : max(left + self.size, 0)] = 0
        return img

    def extra_repr(self) -> str:
        return f"size={self.size}, p={self.p}"
