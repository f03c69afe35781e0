"""Statistics over a pool of run summaries: Kendall τ with bootstrap intervals, granulated Ψ, KS tests.

Pure numpy/scipy on summary dictionaries (``{"id", "status", "axes", "seed", "metrics"}``), so pools
trained anywhere can be analysed. Runs whose status is not ``finished`` are left out and counted; a run
lacking a key (or holding null) is left out of the statistics of that key only.

Non-finite values (a diverged run's ``inf`` loss): the rank statistics (τ, its interval, Ψ, KS) keep ±∞,
which order as they should (a loss of +∞ ranks above every finite loss; two of them tie), and leave NaN
out, which has no order; the descriptive statistics (mean, std, min, max) are over the finite values,
with the count of non-finite ones beside them (``nonfinite``).

* Kendall's τ-b and its p-value: ``scipy.stats.kendalltau``; the 95% interval is the percentile
  bootstrap over runs (resampled with replacement, seeded; τ-b of all resamples at once, from how often
  each resample draws each run), given from :data:`MIN_BOOTSTRAP_RUNS` runs on and None below: over a
  handful of runs the resamples hold only a few distinct runs, and a perfectly ordered sample gives
  the degenerate interval [1, 1] whatever its p-value.
* The granulated coefficient Ψ of Jiang et al. 2020 ("Fantastic generalization measures and where to
  find them", §4): for each axis, the runs that agree on every other axis and on the seed form a group;
  ψ_axis is the mean of τ within the groups of at least two runs (groups where τ is undefined — a
  constant x or y — are skipped); Ψ is the mean of ψ over the axes that vary.
* Two-sample Kolmogorov–Smirnov tests between named groups of an axis's values:
  ``scipy.stats.ks_2samp``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from flatminima.formats.summary import Summary, number

from .cmi import cmi_row
from .ranking import ranking_rows
from .spec import KSTest

MIN_BOOTSTRAP_RUNS = 10
"""No bootstrap interval of τ over fewer runs. Chosen by simulation (bivariate normal pools, 1000 resamples per
interval, 400–1000 pools per cell): the nominal 95% percentile interval covered the true τ in 45 %, 63 %, 81 %
and 92 % of pools of 4, 5, 6 and 8 runs at τ = 0.80 (ρ = 0.95), and in ≥ 96 % from 10 runs on for every
τ ≤ 0.84 (86 % at τ = 0.91, where perfectly ordered samples, hence intervals [1, 1], are common)."""


# ---------------------------------------------------------------------------------------- the pool
def split_pool(summaries: Iterable[Summary]) -> tuple[list[Summary], list[Summary]]:
    """(finished runs, the others), each sorted by id."""
    finished, other = [], []
    for s in summaries:
        (finished if s.get("status") == "finished" else other).append(s)
    return sorted(finished, key=_id), sorted(other, key=_id)


def apply_requirements(
    finished: Sequence[Summary], require: Sequence[tuple[str, str, float]]
) -> tuple[list[Summary], list[Summary]]:
    """(the finished runs within every bound, the others marked ``"excluded"`` with the reason as ``error``).

    ``require``: ``(key, "min" | "max", bound)``; a missing or NaN value is outside every bound.
    """
    kept, excluded = [], []
    for run in finished:
        reasons = [
            f"{key} {_show(ordered(run, key))} {'<' if bound == 'min' else '>'} {limit:g} (analysis.require)"
            for key, bound, limit in require
            if not _within(ordered(run, key), bound, limit)
        ]
        if reasons:
            excluded.append({**run, "status": "excluded", "error": "; ".join(reasons)})
        else:
            kept.append(run)
    return kept, excluded


def _within(v: float | None, bound: str, limit: float) -> bool:
    return v is not None and not math.isnan(v) and (v >= limit if bound == "min" else v <= limit)


def _show(v: float | None) -> str:
    return "missing" if v is None else f"{v:.4g}"


def axes_of(runs: Sequence[Summary]) -> list[str]:
    """The axis names found in the runs, in first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.get("axes") or {}))
    return list(names)


def value(run: Summary, key: str) -> float | None:
    """The run's value of ``key`` (from ``metrics``) as a float, ±inf and NaN included; None when it has none."""
    return number((run.get("metrics") or {}).get(key))


def ordered(run: Summary, key: str) -> float | None:
    """The run's value of ``key`` where it has an order: finite or ±inf; None when absent or NaN."""
    v = value(run, key)
    return None if v is None or math.isnan(v) else v


def finite(run: Summary, key: str) -> float | None:
    """The run's finite value of ``key``, else None."""
    v = value(run, key)
    return v if v is not None and math.isfinite(v) else None


def paired(runs: Sequence[Summary], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) values of the runs that hold both keys with an order (±inf kept, NaN left out)."""
    pairs = [(ordered(r, x), ordered(r, y)) for r in runs]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    if not pairs:
        return np.empty(0), np.empty(0)
    xs, ys = zip(*pairs)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


# ---------------------------------------------------------------------------------------- Kendall τ
def kendall(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Kendall's τ-b and its two-sided p-value (scipy); None where undefined (n < 2, constant input)."""
    if len(x) < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.kendalltau(x, y)
    return _finite(result.statistic), _finite(result.pvalue)


def tau_b_resampled(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of resamples of the runs, each given by how often it draws each run (``counts``, (B, n)).

    τ_b = Σ_{a<b} sx_ab·sy_ab / sqrt(Σ|sx_ab| · Σ|sy_ab|) over the resample's pairs, sx_ab = sign(x_a − x_b):
    concordant minus discordant pairs over the root of the products of the pairs untied in x and in y. A
    run drawn c_i times contributes c_i·c_j pairs with run j, so each sum is cᵀ M c for the n × n matrix M of
    the original runs (S_x ⊙ S_y, |S_x|, |S_y|): three matrix products instead of B·n² pair signs.
    NaN where a resample is constant in x or y. ``x`` and ``y`` may hold ±inf (their ranks are used).
    """
    x, y = stats.rankdata(x), stats.rankdata(y)  # same signs, ties included; ∞ − ∞ never formed
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    counts = counts.astype(float)

    def quadratic(m: np.ndarray) -> np.ndarray:
        return np.einsum("bi,bi->b", counts @ m, counts)

    num, den = quadratic(sx * sy), np.sqrt(quadratic(np.abs(sx)) * quadratic(np.abs(sy)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_tau(
    x: Sequence[float],
    y: Sequence[float],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_runs: int = MIN_BOOTSTRAP_RUNS,
) -> list[float] | None:
    """Percentile bootstrap interval of τ-b: runs resampled with replacement (seeded).

    None when undefined (every resample constant), when ``resamples`` is 0, or under ``min_runs`` runs
    (:data:`MIN_BOOTSTRAP_RUNS`: below it the percentile interval overstates what a few runs show).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < max(3, min_runs) or resamples < 1:
        return None
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = np.bincount((index + n * np.arange(resamples)[:, None]).ravel(), minlength=resamples * n)
    taus = tau_b_resampled(x, y, counts.reshape(resamples, n))
    taus = taus[np.isfinite(taus)]
    if taus.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(taus, [tail, 100 - tail])
    return [float(lo), float(hi)]


def kendall_rows(
    runs: Sequence[Summary],
    xs: Sequence[str],
    ys: Sequence[str],
    group_axes: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """τ, p and the bootstrap interval for every x × y, over the pool (``"all"``) and per ``axis=value``."""
    groups = [("all", list(runs))] + [
        (f"{axis}={v}", members) for axis in group_axes for v, members in group_by(runs, axis).items()
    ]
    rows = []
    for x, y in itertools.product(xs, ys):
        for name, members in groups:
            a, b = paired(members, x, y)
            tau, p = kendall(a, b)
            rows.append(
                {
                    "x": x,
                    "y": y,
                    "group": name,
                    "n": int(len(a)),
                    "tau": tau,
                    "p": p,
                    "ci95": bootstrap_tau(a, b, resamples, seed) if tau is not None else None,
                }
            )
    return rows


def group_by(runs: Sequence[Summary], axis: str) -> dict[str, list[Summary]]:
    """The runs per value of ``axis``, values in first-seen order (runs without the axis left out)."""
    out: dict[str, list[Summary]] = {}
    for run in runs:
        v = (run.get("axes") or {}).get(axis)
        if v is not None:
            out.setdefault(str(v), []).append(run)
    return out


# ---------------------------------------------------------------------------------------- granulated Ψ
def granulated(runs: Sequence[Summary], x: str, y: str, axes: Sequence[str]) -> dict[str, Any]:
    """Jiang et al.'s granulated Kendall coefficient of ``x`` against ``y`` over ``axes``.

    Returns ``{"x", "y", "per_axis": {axis: ψ or None}, "psi": Ψ or None}``; ``per_axis`` lists the axes
    that vary among the runs holding both keys.
    """
    usable = [r for r in runs if ordered(r, x) is not None and ordered(r, y) is not None]
    varying = [a for a in axes if len({str((r.get("axes") or {}).get(a)) for r in usable}) > 1]
    per_axis: dict[str, float | None] = {}
    for axis in varying:
        cells: dict[tuple, list[Summary]] = defaultdict(list)
        for run in usable:
            others = tuple(str((run.get("axes") or {}).get(a)) for a in axes if a != axis)
            cells[(*others, run.get("seed"))].append(run)
        taus = [kendall(*paired(cell, x, y))[0] for cell in cells.values() if len(cell) >= 2]
        taus = [t for t in taus if t is not None]
        per_axis[axis] = float(np.mean(taus)) if taus else None
    defined = [v for v in per_axis.values() if v is not None]
    return {"x": x, "y": y, "per_axis": per_axis, "psi": float(np.mean(defined)) if defined else None}


# ---------------------------------------------------------------------------------------- KS tests
def ks_rows(runs: Sequence[Summary], tests: Sequence[KSTest]) -> list[dict[str, Any]]:
    """Two-sample KS statistic and p-value between every pair of named groups of each test, per key."""
    rows = []
    for test in tests:
        by_value = group_by(runs, test.axis)
        for (name_a, values_a), (name_b, values_b) in itertools.combinations(test.groups, 2):
            members_a = [r for v in values_a for r in by_value.get(v, [])]
            members_b = [r for v in values_b for r in by_value.get(v, [])]
            for key in test.keys:
                a = [v for v in (ordered(r, key) for r in members_a) if v is not None]
                b = [v for v in (ordered(r, key) for r in members_b) if v is not None]
                statistic = p = None
                if a and b:
                    result = stats.ks_2samp(a, b)
                    statistic, p = _finite(result.statistic), _finite(result.pvalue)
                rows.append(
                    {
                        "key": key,
                        "axis": test.axis,
                        "groups": [name_a, name_b],
                        "n": [len(a), len(b)],
                        "statistic": statistic,
                        "p": p,
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------- descriptive
def describe(runs: Sequence[Summary], keys: Sequence[str], group_axes: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, standard deviation (ddof 1), min and max of each key over the pool and per ``axis=value``.

    Over the finite values (``n`` of them); ``nonfinite`` counts the runs whose value is ±inf or NaN.
    """
    groups = [("all", list(runs))] + [
        (f"{axis}={v}", members) for axis in group_axes for v, members in group_by(runs, axis).items()
    ]
    rows = []
    for name, members in groups:
        for key in keys:
            held = [v for v in (value(r, key) for r in members) if v is not None]
            vals = np.asarray([v for v in held if math.isfinite(v)])
            rows.append(
                {
                    "group": name,
                    "key": key,
                    "n": int(vals.size),
                    "nonfinite": len(held) - int(vals.size),
                    "mean": float(vals.mean()) if vals.size else None,
                    "std": float(vals.std(ddof=1)) if vals.size > 1 else None,
                    "min": float(vals.min()) if vals.size else None,
                    "max": float(vals.max()) if vals.size else None,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------- all of it
def analyze(
    summaries: Iterable[Summary],
    xs: Sequence[str],
    ys: Sequence[str],
    *,
    group_axes: Sequence[str] | None = None,
    ks: Sequence[KSTest] = (),
    resamples: int = 1000,
    seed: int = 0,
    require: Sequence[tuple[str, str, float]] = (),
) -> dict[str, Any]:
    """The content of ``analysis.json``: ``runs`` (counts), ``kendall``, ``granulated``, ``cmi``, ``ranking``,
    ``ks``, ``describe``. Finished runs outside a ``require`` bound are left out with the reason.
    """
    finished, other = split_pool(summaries)
    finished, excluded = apply_requirements(finished, require)
    other = sorted([*other, *excluded], key=_id)
    axes = axes_of(finished) or axes_of(other)
    groups = list(axes if group_axes is None else group_axes)
    pairs = list(itertools.product(xs, ys))
    kendall_table = kendall_rows(finished, xs, ys, groups, resamples, seed)
    granulated_rows = [granulated(finished, x, y, axes) for x, y in pairs]
    cmi_rows = [cmi_row(finished, x, y, axes) for x, y in pairs]
    return {
        "runs": {
            "total": len(finished) + len(other),
            "finished": len(finished),
            "left_out": len(other),
            "failed": [{"id": _id(s), "status": s.get("status"), "error": s.get("error")} for s in other],
        },
        "axes": axes,
        "x": list(xs),
        "y": list(ys),
        "groups": groups,
        "kendall": kendall_table,
        "granulated": granulated_rows,
        "cmi": cmi_rows,
        "ranking": ranking_rows(granulated_rows, cmi_rows, kendall_table),
        "ks": ks_rows(finished, ks),
        "describe": describe(finished, list(dict.fromkeys([*xs, *ys])), groups),
    }


def _finite(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _id(summary: Summary) -> str:
    return str(summary.get("id", ""))
