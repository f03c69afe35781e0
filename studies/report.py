"""The study's tables: ``results.csv`` (a row per run), ``analysis.json`` (for programs), ``analysis.md`` (to read)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatminima.formats.summary import Summary, write_json

from .analysis import MIN_BOOTSTRAP_RUNS
from .ranking import ranking_markdown


def write_csv(path: str | Path, summaries: Sequence[Summary], axes: Sequence[str], keys: Sequence[str]) -> None:
    """One row per run: id, status, the axes, seed, every metric key (empty where absent), the error."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "status", *axes, "seed", *keys, "error"])
        for s in sorted(summaries, key=lambda s: str(s.get("id"))):
            metrics = s.get("metrics") or {}
            writer.writerow(
                [
                    s.get("id"),
                    s.get("status"),
                    *((s.get("axes") or {}).get(a, "") for a in axes),
                    s.get("seed", ""),
                    *(_cell(metrics.get(k)) for k in keys),
                    (s.get("error") or "").replace("\n", " "),
                ]
            )


def write_analysis_json(path: str | Path, result: dict[str, Any]) -> None:
    """``analysis.json``: ``{"kendall": [...], "granulated": [...], "ks": [...], ...}`` (strict JSON, null for NaN)."""
    write_json(path, result)


def markdown(result: dict[str, Any], title: str, figures: Sequence[str] = ()) -> str:
    """``analysis.md``: the run counts, then τ, Ψ, KS and per-group tables, the failed runs and the figures."""
    runs = result["runs"]
    lines = [
        f"# {title}: analysis",
        "",
        f"{runs['total']} runs: {runs['finished']} finished, {runs['left_out']} left out "
        "(failed or unfinished)."
        + (f" Axes: {', '.join(result['axes'])}; seeds vary within each cell." if result["axes"] else ""),
        "",
    ]
    lines += _kendall(result["kendall"]) + _granulated(result["granulated"])
    lines += ranking_markdown(result.get("ranking", [])) + _ks(result["ks"])
    lines += _describe(result["describe"]) + _failed(runs["failed"])
    if figures:
        lines += ["## Figures", "", *(f"- [{f}]({f})" for f in figures), ""]
    return "\n".join(lines)


def _kendall(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = [
        "## Kendall τ",
        "",
        "τ-b (scipy), two-sided p-value, 95% percentile bootstrap interval over runs "
        f"(—: no interval below {MIN_BOOTSTRAP_RUNS} runs, where resampling a few runs overstates the certainty, "
        "e.g. [1, 1] for any perfectly ordered sample; or none asked).",
        "",
        "| x | y | group | n | τ | p | 95% CI |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else "—"
        out.append(f"| {r['x']} | {r['y']} | {r['group']} | {r['n']} | {_num(r['tau'])} | {_p(r['p'])} | {ci} |")
    return out + [""]


def _granulated(rows: list[dict[str, Any]]) -> list[str]:
    axes = list(dict.fromkeys(a for r in rows for a in r["per_axis"]))
    if not rows or not axes:
        return []
    out = [
        "## Granulated Kendall coefficient Ψ (Jiang et al. 2020)",
        "",
        "ψ per axis: mean τ over the groups of runs that differ in that axis only (same other axes, same seed); "
        "Ψ: mean over the axes.",
        "",
        "| x | y | " + " | ".join(f"ψ {a}" for a in axes) + " | Ψ |",
        "| --- | --- | " + " | ".join("---:" for _ in axes) + " | ---: |",
    ]
    for r in rows:
        cells = " | ".join(_num(r["per_axis"].get(a)) for a in axes)
        out.append(f"| {r['x']} | {r['y']} | {cells} | {_num(r['psi'])} |")
    return out + [""]


def _ks(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = [
        "## Kolmogorov–Smirnov tests",
        "",
        "Two-sample KS (scipy `ks_2samp`) between groups of an axis's values.",
        "",
        "| key | axis | groups | n | D | p |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['key']} | {r['axis']} | {r['groups'][0]} vs {r['groups'][1]} | {r['n'][0]} vs {r['n'][1]} "
            f"| {_num(r['statistic'])} | {_p(r['p'])} |"
        )
    return out + [""]


def _describe(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(r["key"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    if not rows:
        return []
    cell = {(r["group"], r["key"]): r for r in rows}
    out = [
        "## Per group (mean ± std over runs)",
        "",
        "Over the finite values; ±inf and NaN (a diverged run) are counted beside them.",
        "",
        "| group | n | " + " | ".join(keys) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for g in groups:
        n = max(cell[(g, k)]["n"] for k in keys)
        values = []
        for k in keys:
            r = cell[(g, k)]
            text = "–" if r["mean"] is None else _num(r["mean"]) + ("" if r["std"] is None else f" ± {_num(r['std'])}")
            if r.get("nonfinite"):
                text += f" (+{r['nonfinite']} non-finite)"
            values.append(text)
        out.append(f"| {g} | {n} | " + " | ".join(values) + " |")
    return out + [""]


def _failed(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["## Runs left out", "", "| id | status | error |", "| --- | --- | --- |"]
    for r in rows:
        error = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")
        out.append(f"| {r['id']} | {r['status']} | {error[:200]} |")
    return out + [""]


def _num(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _p(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def _cell(v: Any) -> str:
    """A CSV cell: empty for a missing value, ``repr`` of a float (``inf``, ``-inf`` and ``nan`` for non-finite ones)."""
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)
