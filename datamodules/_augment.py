"""Image augmentation applied to a whole batch of normalised images, with per-sample draws (pure torch).

The augmentations the studies use, as torchvision applies them to one raw image at a time —
``RandomCrop(size, padding=p)`` (zero padding), ``RandomHorizontalFlip()``, then ``ToTensor``,
``Normalize(mean, std)`` and :class:`~flatminima.datamodules._transforms.Cutout` — here on a ``(B, C, H, W)`` batch of
images that were normalised once: the padding pixels take the value a raw 0 has after normalisation,
``(0 − mean) / std`` per channel, so the result equals torchvision's pipeline pixel for pixel.

The random choices are drawn apart from the images (:meth:`BatchAugment.draw`): per sample, the crop
offsets ``top, left ∈ {0, …, 2p}``, the flip bit and Cutout's (applied, centre row, centre column). A
caller draws them for a whole data set from one seeded generator and indexes them by sample, so an
image's augmentation does not depend on the batch it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class AugmentDraws(NamedTuple):
    """Per-sample random choices, each ``(n,)`` or None when that augmentation is off."""

    top: Tensor | None = None  # crop offset in the padded image, rows, in [0, 2·padding]
    left: Tensor | None = None  # crop offset in the padded image, columns
    flip: Tensor | None = None  # bool: mirror left–right (after the crop)
    cut: Tensor | None = None  # bool: apply Cutout
    cy: Tensor | None = None  # Cutout centre row in [0, H)
    cx: Tensor | None = None  # Cutout centre column in [0, W)

    def take(self, index: Tensor) -> AugmentDraws:
        """The draws of the samples ``index`` (a LongTensor on the draws' device)."""
        return AugmentDraws(*(None if t is None else t.index_select(0, index) for t in self))

    def to(self, device: torch.device | str) -> AugmentDraws:
        """The same draws on ``device``."""
        return AugmentDraws(*(None if t is None else t.to(device) for t in self))


@dataclass(frozen=True)
class BatchAugment:
    """Zero-padded random crop, horizontal flip and Cutout on ``(B, C, H, W)`` normalised images.

    Args:
        fill: Per-channel value of a raw 0 pixel after normalisation, ``(0 − mean) / std`` (the padding).
        padding: Zero padding of the random crop on each side (0: no crop).
        flip: Mirror each image left–right with probability 1/2.
        cutout: Side of the Cutout square (DeVries & Taylor 2017) in pixels (0: no Cutout); the square
            is set to 0 (the mean, after normalisation), centred uniformly over the pixels and clipped.
        cutout_prob: Probability of applying Cutout to an image.
    """

    fill: tuple[float, ...]
    padding: int = 0
    flip: bool = False
    cutout: int = 0
    cutout_prob: float = 1.0

    @property
    def active(self) -> bool:
        """Whether any augmentation is on."""
        return bool(self.padding or self.flip or self.cutout)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> AugmentDraws:
        """The random choices of ``n`` images of ``height × width``, from ``generator`` (torch's default: None).

        Drawn in this order, each as one ``(n,)`` tensor: ``top``, ``left`` (crop), ``flip`` (``rand < 0.5``),
        ``cut`` (``rand < cutout_prob``), ``cy``, ``cx`` (Cutout); an augmentation that is off draws nothing.
        """
        g = {"generator": generator}
        top = left = flip = cut = cy = cx = None
        if self.padding:
            top = torch.randint(0, 2 * self.padding + 1, (n,), **g)
            left = torch.randint(0, 2 * self.padding + 1, (n,), **g)
        if self.flip:
            flip = torch.rand(n, **g) < 0.5
        if self.cutout:
            cut = torch.rand(n, **g) < self.cutout_prob
            cy = torch.randint(0, height, (n,), **g)
            cx = torch.randint(0, width, (n,), **g)
        return AugmentDraws(top, left, flip, cut, cy, cx)

    def __call__(self, x: Tensor, draws: AugmentDraws) -> Tensor:
        """The augmented batch (a new tensor; ``x`` is not modified)."""
        if self.padding or self.flip:
            x = self._crop_and_flip(x, draws)
        if self.cutout:
            x = self._cutout(x, draws)
        return x

    def _crop_and_flip(self, x: Tensor, d: AugmentDraws) -> Tensor:
        """Pad with ``fill``, then read every output pixel from its source pixel in one gather."""
        b, c, h, w = x.shape
        p = self.padding
        if p:
            fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p : p + h, p : p + w] = x
            x = padded
        hp, wp = h + 2 * p, w + 2 * p
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        if d.flip is not None:  # the flip comes after the crop: output column j reads crop column w − 1 − j
            cols = torch.where(d.flip[:, None], w - 1 - cols, cols)
        if p:  # output (i, j) of the crop is padded pixel (top + i, left + j)
            rows, cols = rows + d.top[:, None], cols + d.left[:, None]
        source = (rows * wp)[:, :, None] + cols[:, None, :]
        source = source.expand(b, h, w).reshape(b, 1, h * w).expand(b, c, h * w)
        return x.reshape(b, c, hp * wp).gather(2, source).view(b, c, h, w)

    def _cutout(self, x: Tensor, d: AugmentDraws) -> Tensor:
        """Zero rows ``[cy − s//2, cy − s//2 + s)`` × the same columns (clipped) where ``cut``."""
        b, _, h, w = x.shape
        top = (d.cy - self.cutout // 2)[:, None]
        left = (d.cx - self.cutout // 2)[:, None]
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top) & (rows < top + self.cutout)
        in_cols = (cols >= left) & (cols < left + self.cutout)
        square = (in_rows & d.cut[:, None])[:, :, None] & in_cols[:, None, :]
        return x.masked_fill(square[:, None], 0.0)
