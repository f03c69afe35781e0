"""The study statistics on synthetic pools with known answers, and the files ``study analyze`` writes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from flatminima.formats.summary import write_json
from flatminima.studies import analysis, commands
from flatminima.studies import pool as study_pool
from flatminima.studies.spec import KSTest, StudyError, load


def pool(xs, ys, axes=None, seeds=None) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "status": "finished",
            "error": None,
            "axes": (axes or [{}] * len(xs))[i],
            "seed": (seeds or [0] * len(xs))[i],
            "metrics": {"x": float(x), "y": float(y)},
        }
        for i, (x, y) in enumerate(zip(xs, ys))
    ]


def row(rows, group="all"):
    (found,) = [r for r in rows if r["group"] == group]
    return found


def test_monotone_gives_tau_one_and_reversed_minus_one():
    x = np.arange(20.0)
    up = row(analysis.kendall_rows(pool(x, x**3 + 5), ["x"], ["y"], []))
    assert up["tau"] == pytest.approx(1.0) and up["p"] < 1e-6 and up["n"] == 20
    assert up["ci95"] == pytest.approx([1.0, 1.0])
    down = row(analysis.kendall_rows(pool(x, -np.exp(x / 4)), ["x"], ["y"], []))
    assert down["tau"] == pytest.approx(-1.0) and down["ci95"] == pytest.approx([-1.0, -1.0])


def test_independent_samples_give_a_small_tau_and_an_interval_around_zero():
    rng = np.random.default_rng(3)
    r = row(analysis.kendall_rows(pool(rng.normal(size=400), rng.normal(size=400)), ["x"], ["y"], []))
    assert abs(r["tau"]) < 0.1 and r["p"] > 0.01  # sd of tau under independence is about 0.033 here
    assert r["ci95"][0] < 0 < r["ci95"][1] and r["ci95"][1] - r["ci95"][0] < 0.2


def test_resampled_tau_b_equals_scipy_on_the_repeated_runs_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=9).astype(float)  # many ties in x and y
    y = x + rng.integers(-2, 3, size=9)
    counts = rng.integers(0, 3, size=(40, 9))
    counts[0] = 0
    counts[0, 2] = 5  # one run drawn five times: constant, tau undefined
    got = analysis.tau_b_resampled(x, y, counts)
    want = np.array([stats.kendalltau(np.repeat(x, c), np.repeat(y, c)).statistic for c in counts])
    assert np.isnan(got[0]) and np.isnan(want[0])
    np.testing.assert_allclose(got[1:], want[1:], rtol=0, atol=1e-12)


def test_bootstrap_interval_is_the_percentile_interval_of_scipy_tau_over_resampled_runs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=15)
    y = x + rng.normal(scale=1.0, size=15)
    lo, hi = analysis.bootstrap_tau(x, y, resamples=300, seed=5)
    index = np.random.default_rng(5).integers(0, 15, size=(300, 15))  # the same resamples, drawn independently
    taus = np.array([stats.kendalltau(x[i], y[i]).statistic for i in index])
    want = np.percentile(taus[np.isfinite(taus)], [2.5, 97.5])
    assert [lo, hi] == pytest.approx(want.tolist(), abs=1e-12)
    assert lo < stats.kendalltau(x, y).statistic < hi
    assert analysis.bootstrap_tau(x[:2], y[:2]) is None


def test_per_group_tau_uses_the_runs_of_each_axis_value():
    axes = [{"rule": "sam"}] * 5 + [{"rule": "none"}] * 5
    x = np.arange(10.0)
    y = np.r_[np.arange(5.0), -np.arange(5.0)]
    rows = analysis.kendall_rows(pool(x, y, axes), ["x"], ["y"], ["rule"], resamples=0)
    assert row(rows, "rule=sam")["tau"] == pytest.approx(1.0) and row(rows, "rule=sam")["n"] == 5
    assert row(rows, "rule=none")["tau"] == pytest.approx(-1.0)
    assert row(rows, "all")["ci95"] is None  # no resamples asked


def hand_grid() -> list[dict]:
    """Axes a (a0, a1, a2) and b (b0, b1), seeds 0 and 1; x = index(a) + 3·index(b).

    seed 0: y = x (everything concordant). seed 1: y = (2, 1, 0) on b0 and (3, 5, -1) on b1 (a0, a1, a2).
    Axis a (groups: same b, same seed): τ = +1 (b0,s0), +1 (b1,s0), −1 (b0,s1), and on (b1,s1) x = 3,4,5,
    y = 3,5,−1: one concordant pair, two discordant: τ = −1/3. ψ_a = (1 + 1 − 1 − 1/3)/4 = 1/6.
    Axis b (groups: same a, same seed; pairs b0/b1): all concordant but (a2, s1): y 0 → −1 while x 2 → 5.
    ψ_b = (6 − 2)/6 = 2/3. Ψ = (1/6 + 2/3)/2 = 5/12.
    """
    y1 = {("a0", "b0"): 2, ("a1", "b0"): 1, ("a2", "b0"): 0, ("a0", "b1"): 3, ("a1", "b1"): 5, ("a2", "b1"): -1}
    runs = []
    for seed in (0, 1):
        for bi, b in enumerate(("b0", "b1")):
            for ai, a in enumerate(("a0", "a1", "a2")):
                x = ai + 3 * bi
                runs.append(
                    {
                        "id": f"{a}-{b}-{seed}",
                        "status": "finished",
                        "axes": {"a": a, "b": b},
                        "seed": seed,
                        "metrics": {"x": float(x), "y": float(x if seed == 0 else y1[(a, b)])},
                    }
                )
    return runs


def test_granulated_psi_on_a_two_axis_grid_computed_by_hand():
    runs = hand_grid()
    got = analysis.granulated(runs, "x", "y", ["a", "b"])
    assert got["per_axis"] == pytest.approx({"a": 1 / 6, "b": 2 / 3})
    assert got["psi"] == pytest.approx(5 / 12)
    assert set(got) == {"x", "y", "per_axis", "psi"}
    # an axis that does not vary is not averaged in
    only_b0 = [r for r in runs if r["axes"]["b"] == "b0"]
    got = analysis.granulated(only_b0, "x", "y", ["a", "b"])
    assert got["per_axis"] == pytest.approx({"a": 0.0}) and got["psi"] == pytest.approx(0.0)


def test_failed_runs_and_missing_values_are_left_out_and_counted():
    runs = hand_grid()
    runs.append(
        {
            "id": "broken",
            "status": "failed",
            "error": "ValueError: x",
            "axes": {"a": "a0", "b": "b0"},
            "seed": 2,
            "metrics": {"x": 100.0, "y": -100.0},
        }
    )
    runs[0]["metrics"]["y"] = None  # a finished run without y: out of the x-y statistics only
    result = analysis.analyze(runs, ["x"], ["y"], resamples=50)
    assert result["runs"]["total"] == 13 and result["runs"]["finished"] == 12 and result["runs"]["left_out"] == 1
    assert result["runs"]["failed"] == [{"id": "broken", "status": "failed", "error": "ValueError: x"}]
    assert row(result["kendall"])["n"] == 11
    finished = [r for r in runs[:12] if r["metrics"]["y"] is not None]
    want = stats.kendalltau([r["metrics"]["x"] for r in finished], [r["metrics"]["y"] for r in finished])
    assert row(result["kendall"])["tau"] == pytest.approx(want.statistic)
    assert row(result["kendall"])["p"] == pytest.approx(want.pvalue)


def test_ks_between_named_groups_equals_scipy():
    rng = np.random.default_rng(2)
    values = {"sgd": rng.normal(0.0, 1.0, 12), "phb": rng.normal(0.2, 1.0, 10), "adam": rng.normal(1.5, 1.0, 14)}
    runs = [
        {"id": f"{o}{i}", "status": "finished", "axes": {"optim": o}, "seed": i, "metrics": {"test/acc": float(v)}}
        for o, vs in values.items()
        for i, v in enumerate(vs)
    ]
    test = KSTest("optim", (("plain", ("sgd", "phb")), ("adaptive", ("adam",))), ("test/acc",))
    (got,) = analysis.ks_rows(runs, [test])
    want = stats.ks_2samp(np.r_[values["sgd"], values["phb"]], values["adam"])
    assert got == {
        "key": "test/acc",
        "axis": "optim",
        "groups": ["plain", "adaptive"],
        "n": [22, 14],
        "statistic": pytest.approx(want.statistic),
        "p": pytest.approx(want.pvalue),
    }
    assert got["p"] < 0.01  # shifted by 1.5 standard deviations


def synthetic_study(tmp_path, with_file=True):
    """A study folder whose summaries were written by hand (as a pool trained elsewhere would be)."""
    rng = np.random.default_rng(4)
    for optim in ("sgd", "adam"):
        for rule in ("none", "sam"):
            for seed in (0, 1, 2):
                run_id = f"optim={optim}-rule={rule}-seed={seed}"
                s = rng.uniform(0.1, 1.0)
                history = {
                    "train/loss": [[e, 10 * (e + 1), 1.0 / (e + 1 + s)] for e in range(3)],
                    "sharpness/adaptive": [[e, 10 * (e + 1), s * (e + 1)] for e in range(3)],
                }
                write_json(
                    tmp_path / "runs" / run_id / "summary.json",
                    {
                        "id": run_id,
                        "status": "finished",
                        "error": None,
                        "axes": {"optim": optim, "rule": rule},
                        "seed": seed,
                        "history": history,
                        "metrics": {
                            "sharpness/adaptive": 3 * s,
                            "gap/acc": s + rng.normal(scale=0.1),
                            "test/acc": 0.9 - s / 10,
                        },
                    },
                )
    write_json(
        tmp_path / "runs" / "optim=adam-rule=sam-seed=3" / "summary.json",
        {
            "id": "optim=adam-rule=sam-seed=3",
            "status": "failed",
            "error": "RuntimeError: boom",
            "axes": {"optim": "adam", "rule": "sam"},
            "seed": 3,
            "metrics": {},
        },
    )
    if with_file:
        (tmp_path / "study.yaml").write_text(
            "name: synthetic\nbase: [configs/data/moons.yaml]\n"
            "axes: {optim: {sgd: a.yaml, adam: b.yaml}, rule: {none: c.yaml, sam: d.yaml}}\n"
            "analysis: {x: [sharpness/adaptive], y: [gap/acc, test/acc], groups: [rule],\n"
            "  ks: [{axis: optim, groups: {adaptive: [adam], plain: [sgd]}, keys: [test/acc]}], bootstrap: 200}\n"
        )
    return tmp_path


@pytest.mark.slow
def test_analyze_writes_tables_json_figures_and_tensorboard(tmp_path):
    directory = synthetic_study(tmp_path)
    commands.analyze(directory)
    result = json.loads((directory / "analysis.json").read_text())
    assert {"kendall", "granulated", "cmi", "ranking", "ks"} <= set(result)
    assert [set(c) for c in result["cmi"]] == [{"x", "y", "per_pair", "score", "n", "left_out"}] * 2
    assert set(result["cmi"][0]["per_pair"]) == {"optim,rule"} and result["cmi"][0]["n"] == 12
    for row, g, c in zip(result["ranking"], result["granulated"], result["cmi"]):  # one x: the order of the y
        assert (row["x"], row["y"], row["psi"], row["cmi"]) == (g["x"], g["y"], g["psi"], c["score"])
    for r in result["kendall"]:
        assert set(r) == {"x", "y", "group", "n", "tau", "p", "ci95"}
    assert {r["group"] for r in result["kendall"]} == {"all", "rule=none", "rule=sam"}
    assert [set(g) for g in result["granulated"]] == [{"x", "y", "per_axis", "psi"}] * 2
    assert set(result["granulated"][0]["per_axis"]) == {"optim", "rule"}
    (ks,) = result["ks"]
    assert set(ks) == {"key", "axis", "groups", "n", "statistic", "p"} and ks["n"] == [6, 6]
    assert result["runs"]["left_out"] == 1
    with open(directory / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and {r["status"] for r in rows} == {"finished", "failed"}
    assert {"id", "optim", "rule", "seed", "sharpness/adaptive", "gap/acc", "error"} <= set(rows[0])
    text = (directory / "analysis.md").read_text()
    assert "## Kendall τ" in text and "## Granulated" in text and "## Kolmogorov" in text and "boom" in text
    assert "## Ranking of the measures" in text
    pngs = sorted(p.name for p in (directory / "figures").glob("*.png"))
    assert pngs == [
        "bars-gap_acc.png",
        "bars-sharpness_adaptive.png",
        "bars-test_acc.png",
        "curves-rule.png",
        "distributions-rule.png",
        "ranking-psi-per-axis.png",
        "runs-sharpness_adaptive.png",
        "runs-train_loss.png",
        "scatter-sharpness_adaptive-vs-gap_acc-per-rule.png",
        "scatter-sharpness_adaptive-vs-gap_acc.png",
        "scatter-sharpness_adaptive-vs-test_acc-per-rule.png",
        "scatter-sharpness_adaptive-vs-test_acc.png",
    ]
    assert all((directory / "figures" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer().AddRunsFromDirectory(str(directory / "tensorboard"))
    board.Reload()
    runs = board.Runs()
    assert any(run.endswith("optim=sgd-rule=none-seed=0") for run in runs)  # add_hparams: one run per study run
    images = {tag for r in runs.values() for tag in r.get("images", [])}
    assert "study/scatter-sharpness_adaptive-vs-gap_acc" in images
    hparams = [r for r in runs if board.PluginRunToTagToContent("hparams").get(r)]
    assert len(hparams) >= 12


def test_analyze_flags_replace_the_study_file_keys(tmp_path):
    directory = synthetic_study(tmp_path, with_file=False)
    result = commands.analyze(
        directory, x=["sharpness/adaptive"], y=["test/acc"], groups=[], bootstrap=0, figures=False
    )
    assert {(r["x"], r["y"], r["group"]) for r in result["kendall"]} == {("sharpness/adaptive", "test/acc", "all")}
    finished = [json.loads(p.read_text()) for p in directory.glob("runs/*/summary.json")]
    finished = [s for s in finished if s["status"] == "finished"]
    want = stats.kendalltau(
        [s["metrics"]["sharpness/adaptive"] for s in finished], [s["metrics"]["test/acc"] for s in finished]
    )
    assert result["kendall"][0]["tau"] == pytest.approx(want.statistic) == pytest.approx(-1.0)
    assert math.isclose(result["granulated"][0]["psi"], -1.0)  # test/acc decreases with the sharpness in every run


def test_the_analyze_command_line(tmp_path, capsys):
    from flatminima.studies.cli import main

    directory = synthetic_study(tmp_path, with_file=False)
    assert (
        main(
            [
                "analyze",
                str(directory),
                "--x",
                "sharpness/adaptive",
                "--y",
                "gap/acc",
                "--groups",
                "optim",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    result = json.loads((directory / "analysis.json").read_text())
    assert {r["group"] for r in result["kendall"]} == {"all", "optim=sgd", "optim=adam"}
    assert all(r["ci95"] is None for r in result["kendall"])
    assert "analysis.md" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "no runs/*/summary.json to analyse" in capsys.readouterr().err


def test_non_finite_values_round_trip_through_summary_json_results_csv_and_the_analysis(tmp_path):
    """±∞ is ordered (a diverged run ranks last), NaN is left out; the tables and the scatter say how many."""
    from flatminima.studies import figures
    from flatminima.studies import pool as study_pool

    xs = [math.inf, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    ys = [9.0, math.nan, -math.inf, 3.5, 4.5, 5.0, 6.5, 8.0]
    for i, (x, y) in enumerate(zip(xs, ys)):
        write_json(
            tmp_path / "runs" / f"r{i}" / "summary.json",
            {"id": f"r{i}", "status": "finished", "error": None, "axes": {}, "seed": i, "metrics": {"x": x, "y": y}},
        )
    raw = (tmp_path / "runs" / "r0" / "summary.json").read_text()
    assert '"x": "inf"' in raw and "Infinity" not in raw
    assert '"y": "nan"' in (tmp_path / "runs" / "r1" / "summary.json").read_text()
    runs = study_pool.load(tmp_path)
    assert runs[0]["metrics"]["x"] == math.inf and math.isnan(runs[1]["metrics"]["y"])
    result = commands.analyze(tmp_path, x=["x"], y=["y"], groups=[], bootstrap=0, figures=False)
    with open(tmp_path / "results.csv", newline="") as f:
        cells = {r["id"]: (r["x"], r["y"]) for r in csv.DictReader(f)}
    assert cells["r0"][0] == "inf" and cells["r1"][1] == "nan" and cells["r2"][1] == "-inf"
    assert [float(cells[f"r{i}"][0]) for i in range(8)] == xs
    (tau,) = result["kendall"]
    keep = [i for i in range(8) if not math.isnan(ys[i])]
    want = stats.kendalltau([xs[i] for i in keep], [ys[i] for i in keep])
    assert tau["n"] == 7 and tau["tau"] == pytest.approx(want.statistic) and tau["p"] == pytest.approx(want.pvalue)
    described = {r["key"]: r for r in result["describe"]}
    assert (described["x"]["n"], described["x"]["nonfinite"]) == (7, 1)
    assert (described["y"]["n"], described["y"]["nonfinite"]) == (6, 2)
    assert described["x"]["mean"] == pytest.approx(4.0) and described["x"]["max"] == 7.0
    assert json.loads((tmp_path / "analysis.json").read_text())["describe"] == result["describe"]
    assert "4 ± 2.16 (+1 non-finite)" in (tmp_path / "analysis.md").read_text()
    fig = figures.scatter(runs, "x", "y", [], tau)
    (ax,) = fig.axes
    assert sum(len(c.get_offsets()) for c in ax.collections) == 5
    assert "3 runs with a non-finite value not drawn" in ax.get_title()


def test_figures_of_a_study_with_many_keys_never_enter_pyplot(tmp_path):
    """Figures are ``Figure`` objects, not pyplot state: none is registered, so none piles up or warns."""
    import warnings

    import matplotlib.pyplot as plt

    from flatminima.studies import figures

    rng = np.random.default_rng(0)
    xs, ys = [f"sharpness/m{i}" for i in range(3)], [f"gap/g{i}" for i in range(3)]
    runs = [
        {
            "id": f"r{i}",
            "status": "finished",
            "axes": {"optim": "ab"[i % 2]},
            "seed": i,
            "metrics": {k: float(v) for k, v in zip(xs + ys, rng.normal(size=6))},
        }
        for i in range(6)
    ]
    result = analysis.analyze(runs, xs, ys, resamples=0)
    plt.close("all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = list(figures.make_all(runs, result))  # all alive at once
        assert len(made) > 20 and plt.get_fignums() == []
    assert not [w for w in caught if "More than 20 figures" in str(w.message)]


def test_without_x_every_final_sharpness_and_complexity_key_is_an_x():
    from flatminima.studies import pool as study_pool

    runs = [
        {
            "id": "a",
            "status": "finished",
            "metrics": {
                "sharpness/adaptive": 1.0,
                "complexity/path_norm": 2.0,
                "complexity/params": 3.0,
                "test/acc": 0.5,
                "sharpness/adaptive@threshold": 1.0,
                "sharpness/gradient_norm_step": 0.1,
                "train/loss": 0.2,
                "sharpness/average_l2_stderr": 0.01,
                "sharpness/adaptive_ascent_loss": 0.6,
                "sharpness/adaptive_clean_loss": 0.5,
                "sharpness/adaptive_ascent_falls": 0.05,
            },
        }
    ]
    assert study_pool.default_x(runs) == ["complexity/params", "complexity/path_norm", "sharpness/adaptive"]


def test_no_bootstrap_interval_below_ten_runs_and_the_table_says_why():
    """Four perfectly ordered runs: τ = 1 with p = 1/12 (exact), and no interval (not [1, 1], which claims certainty)."""
    from flatminima.studies import report

    x = np.arange(4.0)
    result = analysis.analyze(pool(x, x), ["x"], ["y"], resamples=200)
    r = row(result["kendall"])
    assert r["tau"] == pytest.approx(1.0) and r["p"] == pytest.approx(1 / 12) and r["ci95"] is None
    text = report.markdown(result, "small")
    assert "| x | y | all | 4 | 1 | 0.0833 | — |" in text and "[1.000, 1.000]" not in text
    assert f"no interval below {analysis.MIN_BOOTSTRAP_RUNS} runs" in text
    assert analysis.MIN_BOOTSTRAP_RUNS == 10
    rng = np.random.default_rng(7)
    a = rng.normal(size=10)
    b = a + rng.normal(size=10)
    assert analysis.bootstrap_tau(a[:9], b[:9]) is None
    lo, hi = analysis.bootstrap_tau(a, b)
    assert -1 <= lo < stats.kendalltau(a, b).statistic < hi <= 1


def test_runs_outside_a_required_bound_are_left_out_and_counted(tmp_path):
    directory = synthetic_study(tmp_path, with_file=False)
    summaries = study_pool.load(directory)
    finished = [s for s in summaries if s["status"] == "finished"]
    limit = sorted(s["metrics"]["gap/acc"] for s in finished)[8]  # 9 runs at or below it, 3 above
    result = analysis.analyze(
        summaries, ["sharpness/adaptive"], ["test/acc"], group_axes=[], resamples=0, require=[("gap/acc", "max", limit)]
    )
    kept = [s for s in finished if s["metrics"]["gap/acc"] <= limit]
    assert result["runs"]["finished"] == 9 and result["runs"]["left_out"] == 1 + 3
    excluded = [r for r in result["runs"]["failed"] if r["status"] == "excluded"]
    assert len(excluded) == 3 and all(f"> {limit:g} (analysis.require)" in r["error"] for r in excluded)
    want = stats.kendalltau(
        [s["metrics"]["sharpness/adaptive"] for s in kept], [s["metrics"]["test/acc"] for s in kept]
    )
    assert result["kendall"][0]["n"] == 9 and result["kendall"][0]["tau"] == pytest.approx(want.statistic)


@pytest.mark.parametrize(
    "require, message",
    [
        ({"train/loss": 0.01}, r"analysis.require.train/loss: expected a mapping"),
        ({"train/loss": {"below": 0.01}}, r"analysis.require.train/loss.below: unknown key"),
        ({"train/loss": {"max": "small"}}, r"analysis.require.train/loss.max: expected a number"),
        ({"train/loss": {}}, r"analysis.require.train/loss: expected min and/or max"),
    ],
)
def test_a_bad_requirement_is_refused_naming_the_key(tmp_path, require, message):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "analysis": {"require": require}}))
    with pytest.raises(StudyError, match=message):
        load(path, check_files=False)
