"""A pool of runs on disk: ``DIR/runs/*/summary.json``, whoever wrote them, and the keys they hold."""

from __future__ import annotations

from pathlib import Path

from flatminima.formats.summary import Summary, read_summary

SHARPNESS_PREFIXES = ("sharpness/", "complexity/")
"""The keys ``study analyze`` takes as x without ``--x``: sharpness measures and complexity measures."""

DIAGNOSTIC_SUFFIXES = ("_step", "_stderr", "_ascent_loss", "_clean_loss", "_ascent_falls")
"""Keys logged beside a measure that are not measures themselves: per-step values, Monte-Carlo standard
errors, and the adaptive sharpness's parts A and L and its fraction of falling ascent steps."""


def load(directory: str | Path) -> list[Summary]:
    """Every ``runs/*/summary.json`` under ``directory``, numbers decoded (id defaulting to the folder name).

    A summary that cannot be read is kept as a failed run, so it is counted rather than silently lost.
    """
    out: list[Summary] = []
    for path in sorted(Path(directory).glob("runs/*/summary.json")):
        data = read_summary(path)
        if data is None:
            data = {
                "id": path.parent.name,
                "status": "failed",
                "error": f"unreadable summary: {path}",
                "axes": {},
                "metrics": {},
            }
        data.setdefault("id", path.parent.name)
        out.append(data)
    return out


def metric_keys(runs: list[Summary]) -> list[str]:
    """Every metric key of the finished runs, sorted."""
    keys: set[str] = set()
    for run in runs:
        if run.get("status") == "finished":
            keys.update((run.get("metrics") or {}).keys())
    return sorted(keys)


def default_x(runs: list[Summary]) -> list[str]:
    """The final ``sharpness/*`` and ``complexity/*`` measures (no ``@threshold`` copies, no diagnostic keys)."""
    return [
        k
        for k in metric_keys(runs)
        if k.startswith(SHARPNESS_PREFIXES) and "@" not in k and not k.endswith(DIAGNOSTIC_SUFFIXES)
    ]


def default_y(runs: list[Summary]) -> list[str]:
    """The generalization gaps ``gap/*``, then ``test/loss`` and ``test/acc`` when present."""
    keys = metric_keys(runs)
    gaps = [k for k in keys if k.startswith("gap/") and "@" not in k]
    return gaps + [k for k in ("test/loss", "test/acc") if k in keys]
