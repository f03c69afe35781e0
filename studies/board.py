"""The study in TensorBoard (``DIR/tensorboard``): the figures, and every run in the HParams dashboard.

``tensorboard --logdir DIR/tensorboard``: the IMAGES tab shows the figures; the HPARAMS tab lists the runs
with their axis values and seed as hyperparameters and their final metrics (``summary.json``) as metrics.
The folder is rewritten on each analysis.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .analysis import value


def write(directory: str | Path, figures: Sequence[tuple[str, Figure]], runs: Sequence[dict[str, Any]],
          axes: Sequence[str]) -> Path:
    """Write ``figures`` (``add_figure``) and one ``add_hparams`` entry per run; returns the folder."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(directory)
    if folder.exists():
        shutil.rmtree(folder)
    with SummaryWriter(log_dir=str(folder)) as writer:
        for name, fig in figures:
            writer.add_figure(f"study/{name}", fig, close=False)
        for run in runs:
            run_axes = run.get("axes") or {}
            hparams: dict[str, Any] = {axis: str(run_axes.get(axis, "")) for axis in axes}
            if run.get("seed") is not None:
                hparams["seed"] = int(run["seed"])
            metrics = {k: value(run, k) for k in (run.get("metrics") or {})}
            metrics = {k: v for k, v in metrics.items() if v is not None and "@" not in k}
            writer.add_hparams(hparams, metrics, run_name=str(run.get("id")))
    return folder
