"""Which measure predicts the gap best: every ``x`` ranked by Ψ and by the CMI score, as a table and a figure.

Jiang et al. 2020 ("Fantastic generalization measures and where to find them") rank each measure by the
granulated Kendall coefficient Ψ (the mean over the axes of ψ, τ within groups of runs that differ in that
axis only; :func:`flatminima.studies.analysis.granulated`) and by the conditional mutual information score
(:mod:`flatminima.studies.cmi`). This module joins the per-measure results ``study analyze`` already computes:

* :func:`ranking_rows`: ``{"x", "y", "psi", "cmi", "tau"}`` per measure and gap key (``tau``: Kendall's τ
  over the whole pool, the ``"all"`` row of ``kendall``), sorted by Ψ (the ``"ranking"`` key of
  ``analysis.json``);
* :func:`ranking_markdown`: one table ranking every ``x`` by Ψ and by CMI (``analysis.md``);
* :func:`psi_bars`: per measure, its ψ per axis and Ψ as grouped bars, measures sorted by Ψ.

The inputs are the lists of ``analysis.json``: ``granulated`` (``{"x", "y", "per_axis": {axis: ψ}, "psi"}``),
``cmi`` (``{"x", "y", "per_pair", "score"}``) and ``kendall`` (``{"x", "y", "group", "tau", ...}``).
A missing, None or non-finite value is None in the rows, "–" in the table, no bar in the figure (a grey ×
on the zero line instead), and sorts and ranks after every defined value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

Row = dict[str, Any]
FIGURE = "ranking-psi-per-axis"
"""The name of :func:`psi_bars`'s figure among the study's figures."""


def ranking_rows(
    granulated: Iterable[Mapping[str, Any]],
    cmi: Iterable[Mapping[str, Any]] = (),
    kendall: Iterable[Mapping[str, Any]] = (),
) -> list[Row]:
    """``{"x", "y", "psi", "cmi", "tau"}`` per (x, y) found in ``granulated`` or ``cmi``, sorted by Ψ.

    The gap keys ``y`` keep their first-seen order; within each, Ψ descending (None last), then CMI
    descending, then ``x``. ``tau`` comes from the ``kendall`` row of group ``"all"``.
    """
    psi = {(r["x"], r["y"]): _finite(r.get("psi")) for r in granulated}
    score = {(r["x"], r["y"]): _finite(r.get("score")) for r in cmi}
    tau = {(r["x"], r["y"]): _finite(r.get("tau")) for r in kendall if r.get("group") == "all"}
    keys = list(dict.fromkeys([*psi, *score]))
    y_order = {y: i for i, y in enumerate(dict.fromkeys(y for _, y in keys))}
    rows = [{"x": x, "y": y, "psi": psi.get((x, y)), "cmi": score.get((x, y)), "tau": tau.get((x, y))} for x, y in keys]
    return sorted(rows, key=lambda r: (y_order[r["y"]], *_descending(r["psi"]), *_descending(r["cmi"]), r["x"]))


def ranks(rows: Sequence[Mapping[str, Any]], key: str) -> list[int | None]:
    """The rank of each row's ``key`` among the rows of the same ``y``: 1 = highest, ties share the best rank.

    None where the value is None.
    """
    out: list[int | None] = []
    for row in rows:
        v = _finite(row.get(key))
        peers = [_finite(r.get(key)) for r in rows if r["y"] == row["y"]]
        out.append(None if v is None else 1 + sum(1 for p in peers if p is not None and p > v))
    return out


def ranking_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``analysis.md`` section: one table, every ``x`` with Ψ, its rank, CMI, its rank and τ (rows as given)."""
    if not rows:
        return []
    by_psi, by_cmi = ranks(rows, "psi"), ranks(rows, "cmi")
    out = [
        "## Ranking of the measures (Jiang et al. 2020)",
        "",
        "Every x ranked against each y by the granulated Kendall coefficient Ψ and by the conditional mutual "
        "information score CMI (the minimum over the pairs of axes held fixed of I(V_μ, V_g | U_S) / "
        "H(V_g | U_S); 0: no information, 1: the sign of the difference in x between two runs gives the "
        "sign of their difference in y); τ: Kendall's τ over all runs. Rank 1 is the highest; sorted by Ψ.",
        "",
        "| y | x | Ψ | rank (Ψ) | CMI | rank (CMI) | τ |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row, rank_psi, rank_cmi in zip(rows, by_psi, by_cmi):
        out.append(
            f"| {row['y']} | {row['x']} | {_num(row.get('psi'))} | {_rank(rank_psi)} | "
            f"{_num(row.get('cmi'))} | {_rank(rank_cmi)} | {_num(row.get('tau'))} |"
        )
    return out + [""]


def psi_bars(granulated: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Per measure, ψ of each axis and Ψ as grouped bars, measures sorted by Ψ; one panel per gap key ``y``.

    Returns a ``matplotlib.figure.Figure`` (not registered with pyplot, so nothing stays open), or None when
    no row holds a finite ψ or Ψ.
    """
    rows = [
        r
        for r in granulated
        if _finite(r.get("psi")) is not None or any(_finite(v) is not None for v in (r.get("per_axis") or {}).values())
    ]
    if not rows:
        return None
    axes = list(dict.fromkeys(a for r in rows for a in (r.get("per_axis") or {})))
    ys = list(dict.fromkeys(r["y"] for r in rows))
    count = max(sum(1 for r in rows if r["y"] == y) for y in ys)
    fig = Figure(figsize=(max(5.0, 0.22 * (len(axes) + 1) * count + 2.5), 3.6 * len(ys)), dpi=100, layout="constrained")
    for ax, y in zip(fig.subplots(len(ys), 1, squeeze=False)[:, 0], ys):
        panel = sorted((r for r in rows if r["y"] == y), key=lambda r: (*_descending(r.get("psi")), r["x"]))
        _grouped(ax, panel, axes)
        ax.set_title(f"ψ per axis and Ψ against {y}, sorted by Ψ", fontsize=9)
    return fig


def ranking_figures(result: Mapping[str, Any]) -> list[tuple[str, Figure]]:
    """The ranking figure of an analysis ``result`` (``analysis.json`` content) as ``[(name, figure)]``."""
    fig = psi_bars(result.get("granulated") or [])
    return [] if fig is None else [(FIGURE, fig)]


def _grouped(ax: Any, rows: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> None:
    """Draw one panel: a group of bars per row (ψ of each axis, then Ψ in black), x ticks = the measures."""
    series = [
        (f"ψ {a}", [_finite((r.get("per_axis") or {}).get(a)) for r in rows], f"C{i % 10}") for i, a in enumerate(axes)
    ]
    series.append(("Ψ", [_finite(r.get("psi")) for r in rows], "black"))
    width = 0.8 / len(series)
    positions = np.arange(len(rows), dtype=float)
    for k, (label, values, colour) in enumerate(series):
        at = positions + (k - (len(series) - 1) / 2) * width
        drawn = [(p, v) for p, v in zip(at, values) if v is not None]
        missing = [p for p, v in zip(at, values) if v is None]
        if drawn:
            ax.bar([p for p, _ in drawn], [v for _, v in drawn], width, color=colour, label=label)
        if missing:
            ax.plot(missing, [0.0] * len(missing), ls="", marker="x", color="0.6", markersize=4)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    tilted = len(rows) > 3
    ax.set_xticks(
        positions,
        [str(r["x"]) for r in rows],
        rotation=30 if tilted else 0,
        ha="right" if tilted else "center",
        fontsize=8,
    )
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Kendall τ", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=min(len(series), 6), loc="best", framealpha=0.7)


def _descending(v: float | None) -> tuple[bool, float]:
    """A sort key putting larger values first and None last."""
    return (True, 0.0) if v is None else (False, -v)


def _finite(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _num(v: Any) -> str:
    v = _finite(v)
    if v is None:
        return "–"
    return f"{v:.3f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


def _rank(rank: int | None) -> str:
    return "–" if rank is None else str(rank)
