"""The study figures (matplotlib): scatter with τ, per-group distributions, training curves.

Each function takes finished run summaries and returns a ``matplotlib.figure.Figure`` (or None when
there is nothing to draw); :func:`make_all` yields the whole set under stable names, one at a time, which
:mod:`flatminima.studies.commands` saves as PNG and :mod:`flatminima.studies.board` writes to TensorBoard. The figures are plain
``Figure`` objects, never pyplot state: none is registered with pyplot, so none stays open after it is
saved (it is freed with its last reference) and a study of any size draws in constant memory.

Non-finite values (a diverged run) are not drawn: a scatter says in its title how many runs it left out
for a non-finite x or y, the distributions and bars say how many values they left out, and a per-run
curve ends with a cross at its last finite value.

* ``scatter-<x>-vs-<y>``: every run, τ of the pool in the title; ``scatter-<x>-vs-<y>-per-<axis>``: one
  panel per value of the first group axis, each with its own τ (pools that must not be mixed);
* ``bars-<key>``: the mean (± std over seeds) of each analysed key per cell of the grid: the first group
  axis as colours, the second as ticks, the third as panels (accuracy and sharpness "per run");
* ``distributions-<axis>``: box plots per value of an axis, sorted by mean;
* ``curves-<axis>``: per-epoch ``train/loss`` and ``sharpness/*``, mean and range per group;
  ``curves-acc-<axis>``: per-epoch ``train/acc`` (solid) and ``val/acc`` (dashed), a panel per group;
* ``runs-<key>``: per-epoch ``train/loss`` and ``sharpness/*`` of every run, one line each (colour: the
  first group axis, panels: the second; log scale when positive; a cross marks a run whose next value was
  not finite): with full-batch training an epoch is a step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from flatminima.formats.summary import Summary, number

from .analysis import finite, group_by, value
from .ranking import ranking_figures

MARKERS = "osD^vP*Xh<>p"


def make_all(runs: Sequence[Summary], result: dict[str, Any]) -> Iterator[tuple[str, Figure]]:
    """Every figure of an analysis ``result`` (``analysis.json`` content) as ``(name, figure)``, one at a time."""
    groups = result.get("groups") or []
    overall = {(r["x"], r["y"]): r for r in result.get("kendall", []) if r["group"] == "all"}
    for (x, y), row in overall.items():
        yield f"scatter-{slug(x)}-vs-{slug(y)}", scatter(runs, x, y, groups, row)
    keys = list(dict.fromkeys([*result.get("x", []), *result.get("y", [])]))
    for axis in groups:
        yield from _named(f"distributions-{slug(axis)}", distributions(runs, axis, keys))
    for axis in groups or [None]:
        yield from _named(f"curves-{slug(axis or 'all')}", curves(runs, axis))
    yield from _additions(runs, result, groups, keys)
    yield from ranking_figures(result)


def _additions(
    runs: Sequence[Summary], result: dict[str, Any], groups: Sequence[str], keys: Sequence[str]
) -> Iterator[tuple[str, Figure]]:
    """Per-pool scatter panels, bars per cell, accuracy curves per group and per-run loss curves."""
    rows = {(r["x"], r["y"], r["group"]): r for r in result.get("kendall", [])}
    if groups:
        for x, y in dict.fromkeys((r["x"], r["y"]) for r in result.get("kendall", [])):
            yield from _named(
                f"scatter-{slug(x)}-vs-{slug(y)}-per-{slug(groups[0])}", scatter_panels(runs, x, y, groups[0], rows)
            )
    for key in keys:
        yield from _named(f"bars-{slug(key)}", bars(runs, key, groups))
    for axis in groups or [None]:
        yield from _named(f"curves-acc-{slug(axis or 'all')}", train_val_curves(runs, axis))
    per_epoch = sorted(
        {k for r in runs for k in (r.get("history") or {}) if k.startswith("sharpness/") and not k.endswith("_step")}
    )
    for key in ["train/loss", *per_epoch]:
        yield from _named(f"runs-{slug(key)}", run_curves(runs, key, groups))


def _named(name: str, fig: Figure | None) -> Iterator[tuple[str, Figure]]:
    if fig is not None:
        yield name, fig


def _figure(width: float, height: float, rows: int | None = None, cols: int | None = None) -> tuple[Figure, Any]:
    """A ``Figure`` outside pyplot (dpi 100) and its one axes, or its ``rows`` × ``cols`` array of axes."""
    fig = Figure(figsize=(width, height), dpi=100)
    if rows is None:
        return fig, fig.subplots()
    return fig, fig.subplots(rows, cols, squeeze=False)


def _not_drawn(count: int) -> str:
    """The note of a scatter that left out ``count`` runs for a non-finite value ('' when none)."""
    if not count:
        return ""
    return f"\n{count} run{'s' if count > 1 else ''} with a non-finite value not drawn"


def slug(key: str) -> str:
    """A file-name-safe form of a key: ``sharpness/adaptive`` → ``sharpness_adaptive``."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", key).strip("_")


def scatter(runs: Sequence[Summary], x: str, y: str, group_axes: Sequence[str], row: dict[str, Any]) -> Figure:
    """``y`` against ``x``, one colour per value of the first group axis (marker: the second); τ in the title."""
    fig, ax = _figure(5.5, 4.2)
    colour_axis = group_axes[0] if group_axes else None
    marker_axis = group_axes[1] if len(group_axes) > 1 else None
    colours = _palette(group_by(runs, colour_axis) if colour_axis else {"all": list(runs)})
    markers = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(group_by(runs, marker_axis))} if marker_axis else {}
    left_out = 0
    for run in runs:
        vx, vy = value(run, x), value(run, y)
        if vx is None or vy is None:
            continue
        if not (math.isfinite(vx) and math.isfinite(vy)):
            left_out += 1
            continue
        axes = run.get("axes") or {}
        ax.scatter(
            vx,
            vy,
            color=colours[axes.get(colour_axis, "all") if colour_axis else "all"],
            marker=markers.get(axes.get(marker_axis), "o"),
            s=36,
            alpha=0.85,
            edgecolors="none",
        )
    handles = [
        Line2D([], [], ls="", marker="o", color=c, label=f"{colour_axis}={v}")
        for v, c in colours.items()
        if colour_axis
    ]
    handles += [Line2D([], [], ls="", marker=m, color="0.3", label=f"{marker_axis}={v}") for v, m in markers.items()]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.7)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}\n{_tau_text(row)}{_not_drawn(left_out)}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def distributions(runs: Sequence[Summary], axis: str, keys: Sequence[str]) -> Figure | None:
    """Box plots of each key per value of ``axis``, values sorted by mean (the runs drawn on top)."""
    groups = group_by(runs, axis)
    keys = [k for k in keys if any(finite(r, k) is not None for r in runs)]
    if not groups or not keys:
        return None
    fig, axs = _figure(max(4.0, 1.1 * len(groups) + 1.5) * len(keys), 3.8, 1, len(keys))
    rng = np.random.default_rng(0)
    left_out = 0
    for ax, key in zip(axs[0], keys):
        left_out += sum(1 for r in runs if value(r, key) is not None and finite(r, key) is None)
        data = {v: [x for x in (finite(r, key) for r in members) if x is not None] for v, members in groups.items()}
        data = {v: d for v, d in data.items() if d}
        order = sorted(data, key=lambda v: float(np.mean(data[v])))
        ax.boxplot([data[v] for v in order], showmeans=True, showfliers=False, widths=0.6)
        for i, v in enumerate(order, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(data[v])), data[v], s=10, color="0.25", alpha=0.7, zorder=3)
        ax.set_xticks(range(1, len(order) + 1), order, rotation=30 if len(order) > 4 else 0, fontsize=8)
        ax.set_xlabel(axis)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"per {axis}, sorted by mean" + _values_left_out(left_out), fontsize=9)
    fig.tight_layout()
    return fig


def curves(runs: Sequence[Summary], axis: str | None) -> Figure | None:
    """Per-epoch ``train/loss`` and ``sharpness/*`` (from the summaries' histories): group mean and range."""
    keys = ["train/loss"] + sorted(
        {k for r in runs for k in (r.get("history") or {}) if k.startswith("sharpness/") and not k.endswith("_step")}
    )
    keys = [k for k in keys if any((r.get("history") or {}).get(k) for r in runs)]
    if not keys:
        return None
    groups = group_by(runs, axis) if axis else {"all": list(runs)}
    colours = _palette(groups)
    fig, axs = _figure(4.6 * len(keys), 3.6, 1, len(keys))
    for ax, key in zip(axs[0], keys):
        for name, members in groups.items():
            epochs, mean, low, high = _band(members, key)
            if not epochs:
                continue
            label = f"{axis}={name}" if axis else name
            ax.plot(epochs, mean, color=colours[name], label=label, marker="." if len(epochs) < 3 else None)
            ax.fill_between(epochs, low, high, color=colours[name], alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        if key == "train/loss" and all(v > 0 for v in _all_values(runs, key)):
            ax.set_yscale("log")
    axs[0][0].legend(fontsize=7, framealpha=0.7)
    fig.suptitle("mean over runs (band: min to max)" + (f", per {axis}" if axis else ""), fontsize=9)
    fig.tight_layout()
    return fig


def scatter_panels(
    runs: Sequence[Summary], x: str, y: str, axis: str, rows: dict[tuple[str, str, str], dict[str, Any]]
) -> Figure | None:
    """``y`` against ``x`` in one panel per value of ``axis`` (at least two), each with its group's τ."""
    groups = group_by(runs, axis)
    if len(groups) < 2:
        return None
    fig, axs = _panels(len(groups), 4.4, 3.6)
    for ax, (name, members) in zip(axs, groups.items()):
        held = [(value(r, x), value(r, y)) for r in members]
        held = [p for p in held if p[0] is not None and p[1] is not None]
        points = [p for p in held if math.isfinite(p[0]) and math.isfinite(p[1])]
        if points:
            ax.scatter(*zip(*points), s=30, alpha=0.85, edgecolors="none", color="C0")
        row = rows.get((x, y, f"{axis}={name}"), {"n": len(points)})
        ax.set_title(f"{axis}={name}\n{_tau_text(row)}{_not_drawn(len(held) - len(points))}", fontsize=8)
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(y, fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def bars(runs: Sequence[Summary], key: str, group_axes: Sequence[str]) -> Figure | None:
    """Mean ± std (over seeds) of ``key`` per grid cell: colours = first axis, ticks = second, panels = third."""
    cells: dict[tuple[str, str, str], list[float]] = {}
    colour_axis, tick_axis, panel_axis = (list(group_axes) + [None, None, None])[:3]
    tick_axis = tick_axis or colour_axis
    left_out = 0
    for run in runs:
        v = finite(run, key)
        if v is None:
            left_out += value(run, key) is not None
            continue
        axes = {**{a: "all" for a in (colour_axis, tick_axis, panel_axis) if a}, **(run.get("axes") or {})}
        cell = tuple(str(axes.get(a, "all")) if a else "all" for a in (panel_axis, tick_axis, colour_axis))
        cells.setdefault(cell, []).append(v)
    if not cells:
        return None
    panels = list(dict.fromkeys(c[0] for c in cells))
    ticks = list(dict.fromkeys(c[1] for c in cells))
    colours = _palette(dict.fromkeys(c[2] for c in cells))
    fig, axs = _panels(len(panels), max(4.0, 0.45 * len(ticks) * max(1, len(colours)) + 1.5), 3.6)
    width = 0.8 / len(colours)
    for ax, panel in zip(axs, panels):
        for j, (colour, c) in enumerate(colours.items()):
            labelled = False
            for i, tick in enumerate(ticks):
                vals = cells.get((panel, tick, colour))
                if vals:
                    ax.bar(
                        i + (j - (len(colours) - 1) / 2) * width,
                        float(np.mean(vals)),
                        width,
                        color=c,
                        yerr=float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                        capsize=2,
                        label=None if labelled else colour,
                    )
                    labelled = True
        ax.set_xticks(range(len(ticks)), ticks, rotation=30 if len(ticks) > 4 else 0, fontsize=8)
        ax.set_title(key if panel == "all" else f"{panel_axis}={panel}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if colour_axis and len(colours) > 1:
            ax.legend(fontsize=7, title=colour_axis, title_fontsize=7, framealpha=0.7)
    fig.suptitle(f"{key}: mean over seeds (± std)" + _values_left_out(left_out), fontsize=9)
    fig.tight_layout()
    return fig


def train_val_curves(runs: Sequence[Summary], axis: str | None, metric: str = "acc") -> Figure | None:
    """Per-epoch ``train/<metric>`` (solid) and ``val/<metric>`` (dashed), mean and range, a panel per group."""
    train, val = f"train/{metric}", f"val/{metric}"
    if not any((r.get("history") or {}).get(train) for r in runs) or not any(
        (r.get("history") or {}).get(val) for r in runs
    ):
        return None
    groups = group_by(runs, axis) if axis else {"all": list(runs)}
    fig, axs = _panels(len(groups), 3.6, 3.0)
    for ax, (name, members) in zip(axs, groups.items()):
        for key, style in ((train, "-"), (val, "--")):
            epochs, mean, low, high = _band(members, key)
            if epochs:
                ax.plot(epochs, mean, style, color="C0" if key == train else "C3", label=key)
                ax.fill_between(epochs, low, high, color="C0" if key == train else "C3", alpha=0.15, linewidth=0)
        ax.set_title(f"{axis}={name}" if axis else name, fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize=7, framealpha=0.7)
    fig.suptitle(f"{train} and {val}: mean over runs (band: min to max)", fontsize=9)
    fig.tight_layout()
    return fig


def run_curves(runs: Sequence[Summary], key: str, group_axes: Sequence[str]) -> Figure | None:
    """Per-epoch ``key`` of every run, one line each: colour = first group axis, panels = second."""
    drawn = [r for r in runs if len((r.get("history") or {}).get(key, [])) >= 2]
    if not drawn:
        return None
    colour_axis = group_axes[0] if group_axes else None
    panel_axis = group_axes[1] if len(group_axes) > 1 else None
    panels = group_by(drawn, panel_axis) if panel_axis else {"all": drawn}
    colours = _palette(group_by(drawn, colour_axis) if colour_axis else {"all": drawn})
    fig, axs = _panels(len(panels), 4.2, 3.4)
    values = [v for r in drawn for _, _, v in r["history"][key] if _finite_number(v)]
    for ax, (name, members) in zip(axs, panels.items()):
        for run in members:
            rows = run["history"][key]
            points = [(e, number(v)) for e, _, v in rows if _finite_number(v)]
            colour = colours[(run.get("axes") or {}).get(colour_axis, "all")] if colour_axis else colours["all"]
            if points:
                ax.plot(*zip(*points), color=colour, alpha=0.7, linewidth=1.2, marker="." if len(points) < 20 else None)
                if len(points) < len(rows):
                    ax.plot(*points[-1], marker="x", color=colour, markersize=9)
        if values and all(number(v) > 0 for v in values):
            ax.set_yscale("log")
        ax.set_title(f"{panel_axis}={name}" if panel_axis else key, fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    if colour_axis:
        axs[0].legend(
            handles=[Line2D([], [], color=c, label=f"{colour_axis}={v}") for v, c in colours.items()],
            fontsize=7,
            framealpha=0.7,
        )
    fig.suptitle(f"{key} per run (×: the next value was not finite)", fontsize=9)
    fig.tight_layout()
    return fig


def _panels(count: int, width: float, height: float, columns: int = 5) -> tuple[Figure, list[Any]]:
    """A figure with ``count`` panels in rows of at most ``columns``, the unused axes hidden."""
    cols = min(count, columns)
    rows = math.ceil(count / cols)
    fig, axs = _figure(width * cols, height * rows, rows, cols)
    flat = list(axs.ravel())
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _band(runs: Sequence[Summary], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        for epoch, _step, v in (run.get("history") or {}).get(key, []):
            if _finite_number(v):
                per_epoch.setdefault(int(epoch), []).append(number(v))
    epochs = sorted(per_epoch)
    return (
        epochs,
        [float(np.mean(per_epoch[e])) for e in epochs],
        [min(per_epoch[e]) for e in epochs],
        [max(per_epoch[e]) for e in epochs],
    )


def _all_values(runs: Sequence[Summary], key: str) -> list[float]:
    return [number(v) for r in runs for _, _, v in (r.get("history") or {}).get(key, []) if _finite_number(v)]


def _finite_number(v: Any) -> bool:
    n = number(v)
    return n is not None and math.isfinite(n)


def _values_left_out(count: int) -> str:
    return f" ({count} non-finite value{'s' if count > 1 else ''} left out)" if count else ""


def _palette(groups: dict[str, Any]) -> dict[str, Any]:
    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(groups)}


def _tau_text(row: dict[str, Any]) -> str:
    if row.get("tau") is None:
        return f"τ undefined (n = {row.get('n', 0)})"
    text = f"Kendall τ = {row['tau']:.3f} (p = {row['p']:.3g}, n = {row['n']})"
    if row.get("ci95"):
        text += f", 95% CI [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]"
    return text
