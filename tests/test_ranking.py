"""The ranking of the measures by Ψ and CMI (studies/ranking.py): rows, ranks, the table and the bar figure."""

from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from flatminima.studies import ranking

GRANULATED = [
    {"x": "sharpness/a", "y": "gap/acc", "per_axis": {"lr": 0.5, "width": 0.1}, "psi": 0.3},
    {"x": "complexity/norm", "y": "gap/acc", "per_axis": {"lr": -0.4, "width": None}, "psi": -0.4},
    {"x": "sharpness/b", "y": "gap/acc", "per_axis": {"lr": 0.9, "width": 0.7}, "psi": 0.8},
    {"x": "complexity/params", "y": "gap/acc", "per_axis": {"lr": None, "width": None}, "psi": None},
    {"x": "sharpness/a", "y": "gap/loss", "per_axis": {"lr": 0.2, "width": 0.2}, "psi": 0.2},
]
CMI = [
    {"x": "sharpness/a", "y": "gap/acc", "per_pair": {"lr,width": 0.4}, "score": 0.4},
    {"x": "complexity/norm", "y": "gap/acc", "per_pair": {"lr,width": 0.05}, "score": 0.05},
    {"x": "sharpness/b", "y": "gap/acc", "per_pair": {"lr,width": 0.4}, "score": 0.4},
    {"x": "complexity/params", "y": "gap/acc", "per_pair": {"lr,width": math.nan}, "score": math.nan},
    {"x": "sharpness/a", "y": "gap/loss", "per_pair": {"lr,width": 0.1}, "score": 0.1},
]
KENDALL = [
    {"x": "sharpness/a", "y": "gap/acc", "group": "all", "tau": 0.25},
    {"x": "sharpness/a", "y": "gap/acc", "group": "lr=0.1", "tau": 0.99},
    {"x": "sharpness/b", "y": "gap/acc", "group": "all", "tau": 0.6},
    {"x": "complexity/norm", "y": "gap/acc", "group": "all", "tau": None},
]


def test_rows_join_psi_cmi_and_the_pool_tau_sorted_by_psi_within_each_gap_key():
    rows = ranking.ranking_rows(GRANULATED, CMI, KENDALL)
    assert rows == [
        {"x": "sharpness/b", "y": "gap/acc", "psi": 0.8, "cmi": 0.4, "tau": 0.6},
        {"x": "sharpness/a", "y": "gap/acc", "psi": 0.3, "cmi": 0.4, "tau": 0.25},  # the "all" τ, not lr=0.1's
        {"x": "complexity/norm", "y": "gap/acc", "psi": -0.4, "cmi": 0.05, "tau": None},
        {"x": "complexity/params", "y": "gap/acc", "psi": None, "cmi": None, "tau": None},  # NaN CMI -> None
        {"x": "sharpness/a", "y": "gap/loss", "psi": 0.2, "cmi": 0.1, "tau": None},
    ]


def test_rows_without_cmi_or_kendall_and_ties_in_psi_broken_by_cmi_then_name():
    granulated = [{"x": n, "y": "g", "per_axis": {}, "psi": p} for n, p in [("b", 0.5), ("a", 0.5), ("c", 0.5)]]
    cmi = [{"x": "c", "y": "g", "score": 0.9}]
    assert [r["x"] for r in ranking.ranking_rows(granulated, cmi)] == ["c", "a", "b"]
    assert ranking.ranking_rows(granulated)[0] == {"x": "a", "y": "g", "psi": 0.5, "cmi": None, "tau": None}


def test_ranks_are_per_gap_key_highest_first_ties_share_the_best_rank_and_none_has_none():
    rows = [
        {"x": "p", "y": "g", "v": 0.2},
        {"x": "q", "y": "g", "v": 0.7},
        {"x": "r", "y": "g", "v": 0.2},
        {"x": "s", "y": "g", "v": None},
        {"x": "p", "y": "h", "v": -1.0},
    ]
    assert ranking.ranks(rows, "v") == [2, 1, 2, None, 1]


def test_the_markdown_table_ranks_every_measure_by_psi_and_by_cmi():
    lines = ranking.ranking_markdown(ranking.ranking_rows(GRANULATED, CMI, KENDALL))
    table = lines[lines.index("| y | x | Ψ | rank (Ψ) | CMI | rank (CMI) | τ |") + 2 : -1]
    assert table == [
        "| gap/acc | sharpness/b | 0.800 | 1 | 0.400 | 1 | 0.600 |",
        "| gap/acc | sharpness/a | 0.300 | 2 | 0.400 | 1 | 0.250 |",
        "| gap/acc | complexity/norm | -0.400 | 3 | 0.050 | 3 | – |",
        "| gap/acc | complexity/params | – | – | – | – | – |",
        "| gap/loss | sharpness/a | 0.200 | 1 | 0.100 | 1 | – |",
    ]
    assert lines[0].startswith("## Ranking") and lines[-1] == ""
    assert ranking.ranking_markdown([]) == []


def bars_of(ax):
    """(x centre, height, label) of each bar, label from the bar's container."""
    out = []
    for container in ax.containers:
        for patch in container:
            out.append((round(patch.get_x() + patch.get_width() / 2, 6), patch.get_height(), container.get_label()))
    return sorted(out)


def test_the_figure_draws_psi_per_axis_and_psi_per_measure_sorted_by_psi_without_pyplot():
    before = plt.get_fignums()
    fig = ranking.psi_bars(GRANULATED)
    assert isinstance(fig, Figure) and plt.get_fignums() == before  # never registered with pyplot
    acc, loss = fig.axes[:2]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["sharpness/b", "sharpness/a", "complexity/norm"]
    w = 0.8 / 3  # three series: ψ lr, ψ width, Ψ
    want = [
        (round(i + k * w, 6), v, label)
        for i, values in enumerate([(0.9, 0.7, 0.8), (0.5, 0.1, 0.3), (-0.4, None, -0.4)])
        for k, (v, label) in zip((-1, 0, 1), zip(values, ("ψ lr", "ψ width", "Ψ")))
        if v is not None
    ]
    assert bars_of(acc) == pytest.approx(sorted(want))  # complexity/params (nothing finite) is not drawn
    assert [t.get_text() for t in loss.get_xticklabels()] == ["sharpness/a"]
    assert [h for _, h, _ in bars_of(loss)] == [0.2, 0.2, 0.2]
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_figure_without_a_finite_value_and_the_named_figure_list():
    assert ranking.psi_bars([{"x": "m", "y": "g", "per_axis": {"lr": None}, "psi": math.nan}]) is None
    assert ranking.ranking_figures({"granulated": []}) == []
    ((name, fig),) = ranking.ranking_figures({"granulated": GRANULATED})
    assert name == ranking.FIGURE == "ranking-psi-per-axis" and isinstance(fig, Figure)
