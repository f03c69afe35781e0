"""Jiang et al.'s conditional mutual information (CMI) score of a measure against the generalization gap.

Jiang et al. 2020 ("Fantastic generalization measures and where to find them", §5) and the scoring
program of the NeurIPS 2020 PGDL competition (Jiang et al. 2020b, ``scoring_program/mutual_information.py``
of its starting kit) rank a measure μ by how much the sign of its difference between two runs tells about
the sign of their difference in generalization gap g, whatever pair of hyperparameters is held fixed.

**Pairs.** Every ordered pair (i, j) of the runs used, i = j included (the PGDL program loops over all
models twice): V_μ(i, j) = +1 if μ_i > μ_j else −1, and V_g(i, j) = +1 if g_i > g_j else −1. A tie
counts as −1 (the program's strict ``>``), so the n self-pairs all land in (V_μ, V_g) = (−1, −1). Pairs
are not restricted to runs that agree on anything: the seed and the axes outside S vary freely.

**Conditioning.** For a set S of hyperparameter axes, U_S of a pair is the values of those axes in *both*
runs, (u_S(i), u_S(j)) (the program's key concatenates run i's and run j's value of each axis in S), so
the pairs fall into at most (Π_{a∈S} |values of a|)² slices.

**Score.** With plug-in probabilities from the counts n_k(v_g, v_μ) of the pairs of slice k
(n_k = Σ n_k(·,·), N = Σ_k n_k, p(U_S = k) = n_k / N)::

    I(V_μ, V_g | U_S) = Σ_k p(k) Σ_{v_g, v_μ} p(v_g, v_μ | k) log [p(v_g, v_μ | k) / (p(v_g | k) p(v_μ | k))]
    H(V_g | U_S)     = −Σ_k p(k) Σ_{v_g} p(v_g | k) log p(v_g | k)
    Î_S = I(V_μ, V_g | U_S) / H(V_g | U_S),        score = min_S Î_S over the sets S of ``axes_per_set`` axes

(0 log 0 = 0; the ratio does not depend on the base of the logarithm). Î_S lies in [0, 1]: 1 when V_μ
determines V_g within every slice (a measure increasing in the gap), 0 when they are independent within
every slice. Mutual information does not see the direction, but the self-pairs and ties, all counted as
agreeing (−1, −1), break the symmetry: a measure equal to −gap scores high but below 1 (about 0.9 on a
grid of 36 runs; Kendall's τ gives the direction).

**Where the PGDL program and this function differ.**

* The program averages the per-slice mutual information and entropy with equal weight over all
  (Π |values|)² slices (``total_mi_from_table``), while the paper weights them by p(U_S). On a complete
  grid with the same number of runs per cell (the only pools the program accepts: its
  ``check_data_validity`` refuses incomplete or repeated configurations) every slice holds the same number
  of pairs and the two agree. On other pools (runs left out, unequal seeds per cell) the program's equal
  weights are undefined (an empty slice gives NaN) and this function uses the paper's p(U_S).
* The program tries every hyperparameter it is given; here only the axes that take at least two values
  among the runs used form the sets (a constant axis conditions on nothing). With fewer varying axes than
  ``axes_per_set``, the one set is all the varying axes (none: the plain normalized mutual information
  I(V_μ, V_g) / H(V_g)); ``CMIResult.set_size`` says how many axes were conditioned on.
* The program keys a slice by the concatenated strings of the values (values ``1`` and ``11`` collide);
  here the values themselves are compared.
* The program's entropy adds 1e-12 inside the logarithm; here 0 log 0 = 0 exactly (differences ~1e-12).
* A set whose H(V_g | U_S) is 0 (e.g. a constant gap) has no Î_S (None; the program divides by zero);
  the score is the minimum over the sets that have one, None if none has.

**Small-sample bias.** The plug-in mutual information is biased upward, so a measure drawn independently
of the gap does not score 0 on a small pool. What sets the bias is m, the number of runs per cell of the
conditioned axes (runs sharing their values of S; a slice then holds about m² pairs). Measured with a
measure and a gap drawn independently (standard normal) on full grids, 200 draws each:

======================================  ====  =====  ==========  ===========  =========
grid (axes × values, runs per config)   runs    m    mean score  95th pct.    largest
======================================  ====  =====  ==========  ===========  =========
3 × 3, 1                                  27     3   0.128       0.181        0.310
3 × 3, 2                                  54     6   0.039       0.063        0.083
3 × 3, 3                                  81     9   0.022       0.041        0.059
3 × 3, 4                                 108    12   0.014       0.024        0.029
3 × 3, 6                                 162    18   0.009       0.015        0.020
4 × 3, 1                                  81     9   0.019       0.033        0.053
3 × 2, 2                                  16     4   0.078       0.163        0.350
3 × 2, 4                                  32     8   0.028       0.062        0.088
4 × 2, 3                                  48    12   0.013       0.035        0.058
======================================  ====  =====  ==========  ===========  =========

So an independent measure scores below 0.05 on average from about m = 6 runs per cell of the conditioned
pair (54 runs on a 3 × 3 × 3 grid with two seeds), and in 95 % of draws from about m = 9 to 12 (108 runs
on a 3 × 3 × 3 grid with four seeds: all 200 draws below 0.03). Read a score below about 0.05 on such pools
as "no information"; ``tests/test_cmi.py`` pins the 3 × 3 × 3 figures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NO_AXIS = "(none)"
"""The ``per_set`` key of the empty conditioning set (no axis varies): the plain normalized MI."""


@dataclass(frozen=True)
class CMIResult:
    """The CMI score of one measure against the gap over a pool of runs.

    Attributes:
        score: min over the sets S of Î_S; None if no set has one (fewer than two runs, a constant gap).
        per_set: Î_S per conditioning set, keyed by its axes joined with ``","`` (``"lr,width"``) in the
            order of ``hparams``; :data:`NO_AXIS` for the empty set.
        argmin: the key of the set that gives the score (the first one on a tie), or None.
        n: the runs used (finite measure and gap).
        left_out: the runs left out (measure or gap missing or not finite).
        axes: the axes that vary among the runs used, in the order of ``hparams``.
        set_size: how many axes each set conditions on: ``min(axes_per_set, len(axes))``.
    """

    score: float | None
    per_set: dict[str, float | None] = field(default_factory=dict)
    argmin: str | None = None
    n: int = 0
    left_out: int = 0
    axes: tuple[str, ...] = ()
    set_size: int = 0


def cmi_score(
    measure: Sequence[float | None],
    gap: Sequence[float | None],
    hparams: Mapping[str, Sequence[Hashable]],
    *,
    axes_per_set: int = 2,
) -> CMIResult:
    """Jiang et al.'s CMI score: min over sets S of ``axes_per_set`` axes of I(V_μ, V_g | U_S) / H(V_g | U_S).

    The module docstring defines it exactly (pairs, ties, slices, weights) and says where it departs from
    the PGDL scoring program.

    Args:
        measure: μ of each run (None, NaN or ±inf: the run is left out and counted).
        gap: the generalization gap of each run, aligned with ``measure``.
        hparams: per axis, the value of that axis for each run (any hashable values), aligned with ``measure``.
        axes_per_set: |S|, the number of axes held fixed (Jiang et al.: 2; 0 gives the unconditional score).

    Returns:
        The score, Î_S per set, and the counts of runs used and left out.

    Raises:
        ValueError: ``axes_per_set`` is not an integer >= 0, or a sequence's length differs from ``measure``'s.
    """
    if isinstance(axes_per_set, bool) or not isinstance(axes_per_set, (int, np.integer)) or axes_per_set < 0:
        raise ValueError(f"Invalid axes_per_set: {axes_per_set!r}; expected an integer >= 0")
    n_all = len(measure)
    for name, values in [("gap", gap), *((f"hparams[{axis!r}]", v) for axis, v in hparams.items())]:
        if len(values) != n_all:
            raise ValueError(f"Invalid {name}: {len(values)} values; expected one per run of measure ({n_all})")
    keep = [i for i in range(n_all) if _finite(measure[i]) is not None and _finite(gap[i]) is not None]
    mu = np.array([float(measure[i]) for i in keep])
    g = np.array([float(gap[i]) for i in keep])
    codes = {axis: _codes([values[i] for i in keep]) for axis, values in hparams.items()}
    varying = tuple(axis for axis, c in codes.items() if c.size and c.max() > 0)
    size = min(int(axes_per_set), len(varying))
    base = {"n": len(keep), "left_out": n_all - len(keep), "axes": varying, "set_size": size}
    if len(keep) < 2:
        return CMIResult(score=None, **base)
    joint = pair_codes(mu, g)
    per_set = {
        ",".join(s) or NO_AXIS: normalized_cmi(slice_counts(joint, [codes[a] for a in s]))
        for s in itertools.combinations(varying, size)
    }
    defined = {k: v for k, v in per_set.items() if v is not None}
    argmin = min(defined, key=defined.__getitem__) if defined else None
    return CMIResult(score=defined[argmin] if argmin else None, per_set=per_set, argmin=argmin, **base)


def pair_codes(measure: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """The (n, n) code 2·[g_i > g_j] + [μ_i > μ_j] of each ordered pair: 0 (−,−), 1 (−,+), 2 (+,−), 3 (+,+)."""
    v_g = gap[:, None] > gap[None, :]
    v_mu = measure[:, None] > measure[None, :]
    return 2 * v_g.astype(np.int64) + v_mu


def slice_counts(joint: np.ndarray, axis_codes: Sequence[np.ndarray]) -> np.ndarray:
    """Counts n_k(v_g, v_μ) as a (slices, 2, 2) array: slice k = the cells of both runs on the given axes.

    ``axis_codes``: per axis of S, the integer code of each run's value. With no axis, one slice (all pairs).
    Only the slices that hold pairs are returned (empty ones have p(U_S) = 0).
    """
    n = joint.shape[0]
    cell = np.zeros(n, dtype=np.int64)
    for c in axis_codes:
        cell = cell * (int(c.max()) + 1) + c
    cell = np.unique(cell, return_inverse=True)[1].reshape(-1)
    cells = int(cell.max()) + 1 if n else 1
    slices = cell[:, None] * cells + cell[None, :]
    counts = np.bincount((4 * slices + joint).ravel(), minlength=4 * cells * cells).reshape(-1, 2, 2)
    return counts[counts.sum(axis=(1, 2)) > 0]


def normalized_cmi(counts: np.ndarray) -> float | None:
    """I(V_μ, V_g | U_S) / H(V_g | U_S) from the (slices, 2, 2) counts n_k(v_g, v_μ); None where H is 0.

    Weights p(k) = n_k / N; within a slice the plug-in probabilities n_k(v_g, v_μ) / n_k. In natural logs:
    N·I = Σ_k Σ n_k(a, b) log[n_k(a, b) n_k / (n_k(a, ·) n_k(·, b))], N·H = −Σ_k Σ_a n_k(a, ·) log[n_k(a, ·) / n_k].
    """
    counts = np.asarray(counts, dtype=float)
    n_k = counts.sum(axis=(1, 2))[:, None, None]
    rows = counts.sum(axis=2, keepdims=True)  # n_k(v_g, ·)
    cols = counts.sum(axis=1, keepdims=True)  # n_k(·, v_μ)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.where(counts > 0, counts * np.log(counts * n_k / (rows * cols)), 0.0).sum()
        h = -np.where(rows > 0, rows * np.log(rows / n_k), 0.0).sum()
    if not h > 1e-9:  # N·H is 0 or at least log 2
        return None
    return float(mi / h)


def cmi_row(
    runs: Sequence[dict[str, Any]], x: str, y: str, axes: Sequence[str], *, axes_per_set: int = 2
) -> dict[str, Any]:
    """The ``analysis.json`` ``"cmi"`` row of measure ``x`` against gap ``y`` over run summaries.

    ``runs``: finished run summaries (``{"axes": {axis: value}, "metrics": {key: value}}``); a run's
    axis values are compared as strings (as the granulated Ψ groups them), a missing axis as ``"None"``.

    Returns:
        ``{"x", "y", "per_pair": {"axisA,axisB": Î_S}, "score", "n", "left_out"}``.
    """
    metrics = [r.get("metrics") or {} for r in runs]
    hparams = {a: [str((r.get("axes") or {}).get(a)) for r in runs] for a in axes}
    result = cmi_score([m.get(x) for m in metrics], [m.get(y) for m in metrics], hparams, axes_per_set=axes_per_set)
    return {
        "x": x,
        "y": y,
        "per_pair": result.per_set,
        "score": result.score,
        "n": result.n,
        "left_out": result.left_out,
    }


def _codes(values: Sequence[Hashable]) -> np.ndarray:
    """Integer codes of the values in first-seen order (equal values, equal codes)."""
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(v, len(index)) for v in values], dtype=np.int64)


def _finite(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
