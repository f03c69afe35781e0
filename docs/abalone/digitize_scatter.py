"""Hammoud et al.'s published FCNN scatter (sharpness, test loss of 50 models) read back from its pixels.

Their notebook prints neither the sharpness nor the test loss of its models; its figure
(github.com/HadiHammoud44/CS439_Sharpness, commit 36e9b7d1, ``Plots/FCNN-scatter.png``, 640 × 480, the one
titled τ = −0.311, p = 0.0014) is the only record. The markers are discs of one colour (matplotlib's C0);
isolated discs give their centre as the centroid of their pixels, overlapping ones are fitted as unions of
k discs of the isolated discs' radius (least squares on a soft rendering, several starts, k chosen by the
fewest mismatched pixels; the counts are then adjusted so that the total is 50). Pixel → data coordinates
come from the grid lines the notebook draws at the ticks (x: 0.00, 0.02, ..., 0.10; y: 0.45, ..., 0.52).
A disc hidden under others cannot be seen: the read values are approximate where markers overlap.

Each point is then matched to a model (their printed values, hammoud_fcnn_notebook.csv) by the assignment
that minimises Σ |x_i − (A_j − L_j)|, A_j and L_j the printed post-ascent and last training losses: a guess
(the plotted sharpness is not A_j − L_j: see docs/reproductions.md, section 2), good enough to tell the few models
whose final training loss stands out. Usage (from the repository root; a few minutes on one thread)::

    git --git-dir <mirror of CS439_Sharpness> show 36e9b7d:Plots/FCNN-scatter.png > /tmp/FCNN-scatter.png
    python docs/abalone/digitize_scatter.py /tmp/FCNN-scatter.png docs/abalone/hammoud_fcnn_scatter.csv
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.cluster.vq import kmeans2
from scipy.optimize import linear_sum_assignment

MARKER = np.array([31.0, 119.0, 180.0])  # matplotlib's C0, #1f77b4
X_TICKS = [0.00, 0.02, 0.04, 0.06, 0.08, 0.10]
Y_TICKS = [0.52, 0.51, 0.50, 0.49, 0.48, 0.47, 0.46, 0.45]  # top to bottom
N_POINTS = 50


def grid_lines(image: np.ndarray, axis: int, minimum: int) -> list[float]:
    """Centres of the grey grid lines (runs of adjacent pixel columns or rows that are mostly grey)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    grey = (np.abs(r - g) < 3) & (np.abs(g - b) < 3) & (r > 150) & (r < 215)
    idx = np.flatnonzero(grey.sum(axis) > minimum)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    return [float(run.mean()) for run in runs if len(run)]


def union(centres: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, radius: float, hard: bool = False):
    dist = torch.sqrt((gx[None] - centres[:, 0, None, None]) ** 2 + (gy[None] - centres[:, 1, None, None]) ** 2 + 1e-9)
    disc = (dist <= radius).double() if hard else torch.sigmoid((radius - dist) * 3)
    return 1 - torch.prod(1 - disc, 0)


def fit_discs(blob: np.ndarray, k: int, radius: float, starts: int = 8) -> tuple[float, np.ndarray]:
    """(mismatched pixels, centres) of the best union of k discs found for the binary ``blob``."""
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min() - 8, ys.max() + 9, xs.min() - 8, xs.max() + 9
    gy, gx = torch.meshgrid(
        torch.arange(y0, y1, dtype=torch.float64), torch.arange(x0, x1, dtype=torch.float64), indexing="ij"
    )
    target = torch.tensor(blob[y0:y1, x0:x1], dtype=torch.float64)
    best = (np.inf, np.zeros((k, 2)))
    for start in range(starts):
        init, _ = kmeans2(np.stack([xs, ys], 1).astype(float), k, seed=start, minit="++")
        centres = torch.tensor(init, requires_grad=True)
        optimizer = torch.optim.Adam([centres], lr=0.2)
        for _ in range(300):
            loss = (union(centres, gx, gy, radius) - target).square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            bad = float((union(centres, gx, gy, radius, hard=True) != target).sum())
        if bad < best[0]:
            best = (bad, centres.detach().numpy().copy())
    return best


def markers(image: np.ndarray) -> np.ndarray:
    """The marker centres in pixels, (N_POINTS, 2) as (column, row)."""
    mask = (np.linalg.norm(image - MARKER, axis=2) < 60).astype(float)
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    single = float(np.median([s for s in sizes if s < 80]))
    radius = np.sqrt(single / np.pi)
    points, fits = [], {}
    for i in range(1, n + 1):
        blob = (labels == i).astype(float)
        if sizes[i - 1] < 1.5 * single:
            ys, xs = np.nonzero(blob)
            points.append((xs.mean(), ys.mean()))
        else:
            k0 = int(np.ceil(sizes[i - 1] / single))
            fits[i] = {k: fit_discs(blob, k, radius) for k in range(max(2, k0 - 1), k0 + 4)}
    count = {i: min(f, key=lambda k: (f[k][0], k)) for i, f in fits.items()}  # fewest mismatches, then fewest discs

    def change(i: int, step: int) -> float:  # mismatch added by one disc more (step 1) or less (step -1)
        k = count[i] + step
        return fits[i][k][0] - fits[i][count[i]][0] if k in fits[i] and k >= 1 else np.inf

    while len(points) + sum(count.values()) < N_POINTS:
        count[min(count, key=lambda i: change(i, 1))] += 1
    while len(points) + sum(count.values()) > N_POINTS:
        count[min(count, key=lambda i: change(i, -1))] -= 1
    for i, k in count.items():
        points.extend(map(tuple, fits[i][k][1]))
    return np.array(points)


def to_data(points: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = grid_lines(image, 0, 150), grid_lines(image, 1, 200)
    if len(cols) != len(X_TICKS) or len(rows) != len(Y_TICKS):
        raise ValueError(
            f"expected {len(X_TICKS)} vertical and {len(Y_TICKS)} horizontal grid lines, "
            f"found {len(cols)} and {len(rows)}"
        )
    return np.interp(points[:, 0], cols, X_TICKS), np.interp(points[:, 1], rows, Y_TICKS)


def main(png: str, out: str) -> None:
    torch.set_num_threads(1)
    image = np.asarray(Image.open(png).convert("RGB")).astype(float)
    x, y = to_data(markers(image), image)
    with open(Path(__file__).resolve().parent / "hammoud_fcnn_notebook.csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    printed = np.array([float(r["ascent_loss"]) - float(r["final_train_loss"]) for r in rows])
    point, model = linear_sum_assignment(np.abs(x[:, None] - printed[None, :]))
    order = np.argsort(x[point])
    with open(out, "w", newline="") as f:
        f.write(
            "# Hammoud et al. (2023), github.com/HadiHammoud44/CS439_Sharpness commit 36e9b7d1, "
            "Plots/FCNN-scatter.png read back by docs/abalone/digitize_scatter.py; model: a guessed match\n"
        )
        w = csv.writer(f)
        w.writerow(["sharpness", "test_loss", "model"])
        w.writerows([f"{x[point[i]]:.5f}", f"{y[point[i]]:.5f}", int(model[i])] for i in order)


if __name__ == "__main__":
    main(*sys.argv[1:3])
