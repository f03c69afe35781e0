"""A pool of runs on disk: ``DIR/runs/*/summary.json``, whoever wrote them, and the keys they hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import read_json


def load(directory: str | Path) -> list[dict[str, Any]]:
    """Every readable ``runs/*/summary.json`` under ``directory`` (id defaulting to the folder name).

    A summary that cannot be read is kept as a failed run, so it is counted rather than silently lost.
    """
    out = []
    for path in sorted(Path(directory).glob("runs/*/summary.json")):
        data = read_json(path)
        if not isinstance(data, dict):
            data = {"id": path.parent.name, "status": "failed", "error": f"unreadable summary: {path}",
                    "axes": {}, "metrics": {}}
        data.setdefault("id", path.parent.name)
        out.append(data)
    return out


def metric_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Every metric key of the finished runs, sorted."""
    keys: set[str] = set()
    for run in runs:
        if run.get("status") == "finished":
            keys.update((run.get("metrics") or {}).keys())
    return sorted(keys)


def default_x(runs: list[dict[str, Any]]) -> list[str]:
    """The final ``sharpness/*`` keys (not per-step values, not ``@threshold`` copies)."""
    return [k for k in metric_keys(runs) if k.startswith("sharpness/") and "@" not in k and not k.endswith("_step")]


def default_y(runs: list[dict[str, Any]]) -> list[str]:
    """The generalization gaps ``gap/*``, then ``test/loss`` and ``test/acc`` when present."""
    keys = metric_keys(runs)
    gaps = [k for k in keys if k.startswith("gap/") and "@" not in k]
    return gaps + [k for k in ("test/loss", "test/acc") if k in keys]
