"""Jiang et al.'s CMI score (studies/cmi.py) on pools with known answers, by hand, and against the PGDL program."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from flatminima.studies.cmi import NO_AXIS, cmi_row, cmi_score


def grid(values_per_axis: dict[str, list], runs_per_cell: int) -> dict[str, list]:
    """The full grid of the axes' values, each configuration ``runs_per_cell`` times (its "seeds")."""
    cells = list(itertools.product(*values_per_axis.values()))
    rows = [cell for cell in cells for _ in range(runs_per_cell)]
    return {axis: [row[k] for row in rows] for k, axis in enumerate(values_per_axis)}


# ------------------------------------------------------------------ the PGDL scoring program, as an oracle
# The computation of ``scoring_program/mutual_information.py`` of the PGDL starting kit (Jiang et al. 2020b),
# re-written here step by step as an independent reference: nested loops over every ordered pair of
# models (self-pairs included), strict ">" for the signs, a string key per slice made of both models'
# values, one 2×2 table per possible slice, the per-slice MI and gap entropy averaged with equal weight
# over all slices, their ratio, the minimum over ordered pairs of distinct hyperparameters.
def pgdl_entropy(p):
    p = np.asarray(p, dtype=float)
    q = p / p.sum()
    return -np.sum(q * np.log2(q + 1e-12))


def pgdl_mi(table):
    total = table.sum()
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    mi = 0.0
    for i in range(2):
        for j in range(2):
            joint = table[i, j] / total
            if joint == 0:
                continue
            mi += joint * np.log2(joint / ((rows[i] / total) * (cols[j] / total)))
    return mi, pgdl_entropy(rows)


def pgdl_table(prediction, specs, conditioning):
    names = [""]
    for values in conditioning.values():
        names = [prefix + str(v) + str(w) for prefix in names for v in values for w in values]
    index = {name: k for k, name in enumerate(names)}
    table = np.zeros((2, 2, len(names)))
    for m1 in specs:
        for m2 in specs:
            k0 = 0 if specs[m1]["metrics"]["gen_gap"] > specs[m2]["metrics"]["gen_gap"] else 1
            k1 = 0 if prediction[m1] > prediction[m2] else 1
            key = "".join(str(specs[m]["hparams"][h]["current_value"]) for h in conditioning for m in (m1, m2))
            table[k0, k1, index[key]] += 1
    return table


def pgdl_ratio(table):
    mis, hs = zip(*(pgdl_mi(table[:, :, k]) for k in range(table.shape[-1])))
    return (sum(mis) / len(mis)) / (sum(hs) / len(hs))


def pgdl_specs(measure, gap, hparams):
    possible = {h: list(dict.fromkeys(v)) for h, v in hparams.items()}
    specs = {
        f"model_{i}": {
            "metrics": {"gen_gap": float(gap[i])},
            "hparams": {h: {"current_value": hparams[h][i], "possible_values": possible[h]} for h in hparams},
        }
        for i in range(len(gap))
    }
    return {f"model_{i}": float(m) for i, m in enumerate(measure)}, specs, possible


def pgdl_score(measure, gap, hparams):
    prediction, specs, possible = pgdl_specs(measure, gap, hparams)
    best = math.inf
    for h1 in possible:
        for h2 in possible:
            if h1 != h2:
                best = min(best, pgdl_ratio(pgdl_table(prediction, specs, {h1: possible[h1], h2: possible[h2]})))
    return best


def pgdl_set(measure, gap, hparams, axes):
    prediction, specs, possible = pgdl_specs(measure, gap, hparams)
    return pgdl_ratio(pgdl_table(prediction, specs, {h: possible[h] for h in axes}))


# ------------------------------------------------------------------ known answers
def test_a_measure_equal_to_the_gap_or_increasing_in_it_scores_one_on_every_set():
    hp = grid({"lr": [0.1, 0.01, 0.001], "width": [8, 16], "wd": [0, 1e-4, 1e-3]}, 2)
    gap = np.random.default_rng(0).normal(size=len(hp["lr"]))
    for measure in (gap, np.exp(3 * gap)):
        result = cmi_score(measure, gap, hp)
        assert result.score == pytest.approx(1.0, abs=1e-12)
        assert set(result.per_set) == {"lr,width", "lr,wd", "width,wd"}
        assert all(v == pytest.approx(1.0, abs=1e-12) for v in result.per_set.values())
        assert (result.n, result.left_out, result.axes, result.set_size) == (36, 0, ("lr", "width", "wd"), 2)
    # −gap: every pair of distinct runs disagrees, but the self-pairs count as agreeing (−1, −1), as in the
    # PGDL program, so the score is high yet below 1
    flipped = cmi_score(-gap, gap, hp)
    assert 0.8 < flipped.score < 0.95
    assert flipped.score == pytest.approx(pgdl_score(-gap, gap, hp), abs=1e-9)


def test_an_independent_measure_tends_to_zero_as_the_cells_grow_and_is_below_005_at_108_runs():
    """3 axes × 3 values, r runs per configuration: the runs per cell of a conditioned pair of axes are 3r."""
    axes = {"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 2]}
    rng = np.random.default_rng(1)
    means, largest = {}, {}
    for r in (1, 2, 4, 8):
        hp = grid(axes, r)
        scores = [cmi_score(rng.normal(size=27 * r), rng.normal(size=27 * r), hp).score for _ in range(20)]
        means[r], largest[r] = float(np.mean(scores)), max(scores)
    assert means[1] > means[2] > means[4] > means[8]
    assert means[1] > 0.08  # the plug-in estimate is biased upward on small cells (27 runs: about 0.13)
    assert means[2] < 0.06  # 54 runs: about 0.04
    assert largest[4] < 0.05 and largest[8] < 0.03  # 108 runs: every draw below 0.05 (the docstring's figure)


def test_a_measure_right_on_two_axes_and_blind_to_the_third_scores_the_set_that_leaves_the_third_varying():
    hp = grid({"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 2]}, 4)
    a, b, c = (np.asarray(hp[k], dtype=float) for k in "abc")
    rng = np.random.default_rng(0)
    gap = a + b + c + 0.1 * rng.normal(size=a.size)
    measure = a + c + 0.1 * rng.normal(size=a.size)  # right about a and c, nothing about b
    result = cmi_score(measure, gap, hp)
    assert result.argmin == "a,c"  # holding a and c fixed, only b (and the seed) moves the gap
    assert result.score == min(result.per_set.values()) == result.per_set["a,c"]
    assert result.score < 0.05
    assert result.per_set["a,b"] > 0.25 and result.per_set["b,c"] > 0.25
    assert result.score == pytest.approx(pgdl_score(measure, gap, hp), abs=1e-9)


def test_a_tiny_pool_counted_by_hand():
    """Three runs: r0 and r1 share the values (a, b) = (p, x), r2 has (q, y); gap and measure disagree.

    Ordered pairs (i, j) with V_g = [g_i > g_j], V_μ = [μ_i > μ_j] (ties −), per slice of (cell i, cell j):
      slice (px, px): (0,0) −−, (0,1) −+, (1,0) +−, (1,1) −−  → n(−,−) = 2, n(−,+) = 1, n(+,−) = 1, n(+,+) = 0
      slice (px, qy): (0,2) −+, (1,2) +−                      → n(−,+) = 1, n(+,−) = 1
      slice (qy, px): (2,0) +−, (2,1) −+                      → n(+,−) = 1, n(−,+) = 1
      slice (qy, qy): (2,2) −−                                → n(−,−) = 1
    In bits: slice (px, px): I = ½ log2(½ / (¾·¾)) + 2·¼ log2(¼ / (¾·¼)) = ½ log2(8/9) + ½ log2(4/3), H(V_g) = H(¼);
    the two mixed slices: I = H = 1 bit each; slice (qy, qy): I = H = 0. Weights 4/9, 2/9, 2/9, 1/9.
    """
    gap, measure = [0.1, 0.3, 0.2], [5.0, 1.0, 3.0]
    hp = {"a": ["p", "p", "q"], "b": ["x", "x", "y"]}
    i_pp = 0.5 * math.log2(8 / 9) + 0.5 * math.log2(4 / 3)
    h_pp = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    by_hand = (4 / 9 * i_pp + 2 / 9 + 2 / 9) / (4 / 9 * h_pp + 2 / 9 + 2 / 9)
    # the same in whole counts: (4·I_pp + 4) / (4·H_pp + 4), 4·I_pp = 2 log2(32/27), 4·H_pp = 3 log2(4/3) + 2
    assert by_hand == pytest.approx((2 * math.log2(32 / 27) + 4) / (3 * math.log2(4 / 3) + 6), abs=1e-15)
    result = cmi_score(measure, gap, hp)
    assert result.per_set == {"a,b": pytest.approx(by_hand, abs=1e-12)}
    assert result.score == pytest.approx(by_hand, abs=1e-12) and result.argmin == "a,b"
    one = cmi_score(measure, gap, hp, axes_per_set=1)  # a and b split the runs alike
    assert one.per_set == {"a": pytest.approx(by_hand, abs=1e-12), "b": pytest.approx(by_hand, abs=1e-12)}
    # No conditioning: the 9 pairs are n(−,−) = 3, n(−,+) = 3, n(+,−) = 3, n(+,+) = 0;
    # I = ⅓ log2(⅓ / (⅔·⅔)) + 2·⅓ log2(⅓ / (⅔·⅓)) = ⅓ log2(27/16), H(V_g) = H(⅓) = log2 3 − ⅔.
    none = cmi_score(measure, gap, hp, axes_per_set=0)
    assert none.per_set == {NO_AXIS: pytest.approx(math.log2(27 / 16) / 3 / (math.log2(3) - 2 / 3), abs=1e-12)}
    # The PGDL program weights the slices equally: on a alone its 4 slices give (I_pp + 2) / (H_pp + 2) = 0.755;
    # on (a, b) 12 of its 16 slices are empty and it returns NaN. On such pools (its validity check refuses
    # them) the score follows the paper's weights p(U_S).
    with np.errstate(invalid="ignore", divide="ignore"):
        assert pgdl_set(measure, gap, hp, ["a"]) == pytest.approx((i_pp + 2) / (h_pp + 2), abs=1e-9)
        assert math.isnan(pgdl_set(measure, gap, hp, ["a", "b"]))


@pytest.mark.parametrize("runs_per_cell", [1, 2])
def test_every_set_agrees_with_the_pgdl_program_on_complete_grids_with_ties(runs_per_cell):
    rng = np.random.default_rng(runs_per_cell)
    hp = grid({"lr": ["a", "b", "c"], "bs": ["d", "e"], "width": ["f", "g", "h"], "wd": ["i", "j"]}, runs_per_cell)
    n = len(hp["lr"])
    lr = np.array(["abc".index(v) for v in hp["lr"]], dtype=float)
    for trial in range(4):
        gap = lr + rng.normal(size=n) if trial % 2 else rng.integers(0, 4, size=n).astype(float)  # ties
        measure = gap + rng.normal(size=n) if trial < 2 else rng.integers(0, 3, size=n).astype(float)
        result = cmi_score(measure, gap, hp)
        assert result.score == pytest.approx(pgdl_score(measure, gap, hp), abs=1e-9)
        for key, value in result.per_set.items():
            assert value == pytest.approx(pgdl_set(measure, gap, hp, key.split(",")), abs=1e-9)


# ------------------------------------------------------------------ the pool's edges
def test_missing_and_non_finite_runs_are_left_out_and_counted():
    hp = grid({"a": [0, 1, 2], "b": [0, 1]}, 3)
    rng = np.random.default_rng(2)
    gap, measure = rng.normal(size=18), rng.normal(size=18)
    measure_bad = [None if i == 1 else math.nan if i == 4 else v for i, v in enumerate(measure)]
    gap_bad = [math.inf if i == 7 else v for i, v in enumerate(gap)]
    keep = [i for i in range(18) if i not in (1, 4, 7)]
    got = cmi_score(measure_bad, gap_bad, hp)
    want = cmi_score(measure[keep], gap[keep], {k: [v[i] for i in keep] for k, v in hp.items()})
    assert (got.n, got.left_out) == (15, 3)
    assert got.per_set == want.per_set and got.score == want.score is not None


def test_constant_axes_are_not_conditioned_on_and_fewer_varying_axes_condition_on_what_there_is():
    rng = np.random.default_rng(3)
    hp = grid({"a": [0, 1, 2], "seedless": ["x"]}, 6)
    gap, measure = rng.normal(size=18), rng.normal(size=18)
    result = cmi_score(measure, gap, {**hp, "const": [7] * 18})
    assert result.axes == ("a",) and result.set_size == 1 and list(result.per_set) == ["a"]
    assert result.score == cmi_score(measure, gap, {"a": hp["a"]}, axes_per_set=1).score
    flat = cmi_score(measure, gap, {"const": [7] * 18})
    assert flat.axes == () and flat.set_size == 0 and list(flat.per_set) == [NO_AXIS]
    assert flat.score == cmi_score(measure, gap, {}, axes_per_set=0).score


def test_a_constant_gap_or_a_single_run_has_no_score():
    hp = grid({"a": [0, 1], "b": [0, 1]}, 2)
    result = cmi_score(np.arange(8.0), [0.5] * 8, hp)
    assert result.score is None and result.argmin is None and result.per_set == {"a,b": None}
    one = cmi_score([1.0, math.nan], [0.1, 0.2], {"a": [0, 1]})
    assert one.score is None and (one.n, one.left_out) == (1, 1)
    # one run per configuration and both axes held fixed: every slice holds one pair, nothing varies
    assert cmi_score([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 1.0, 2.0], grid({"a": [0, 1], "b": [0, 1]}, 1)).score is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"axes_per_set": -1}, "Invalid axes_per_set: -1; expected an integer >= 0"),
        ({"axes_per_set": True}, "Invalid axes_per_set: True"),
        ({"axes_per_set": 1.5}, "Invalid axes_per_set: 1.5"),
    ],
)
def test_a_bad_set_size_is_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cmi_score([1.0, 2.0], [1.0, 2.0], {"a": [0, 1]}, **kwargs)


def test_sequences_of_another_length_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"Invalid gap: 1 values; expected one per run of measure \(2\)"):
        cmi_score([1.0, 2.0], [1.0], {"a": [0, 1]})
    with pytest.raises(ValueError, match=r"Invalid hparams\['a'\]: 3 values"):
        cmi_score([1.0, 2.0], [1.0, 2.0], {"a": [0, 1, 2]})


def test_the_analysis_row_reads_run_summaries():
    hp = grid({"lr": [0.1, 0.01], "width": [8, 16], "wd": [0.0, 0.1]}, 3)
    rng = np.random.default_rng(4)
    gap, measure = rng.normal(size=24), rng.normal(size=24)
    runs = [
        {
            "id": f"r{i}",
            "status": "finished",
            "seed": i % 3,
            "axes": {k: hp[k][i] for k in hp},
            "metrics": {"m": float(measure[i]), "gap/acc": float(gap[i])},
        }
        for i in range(24)
    ]
    runs[5]["metrics"].pop("m")
    row = cmi_row(runs, "m", "gap/acc", ["lr", "width", "wd"])
    keep = [i for i in range(24) if i != 5]
    want = cmi_score(measure[keep], gap[keep], {k: [str(hp[k][i]) for i in keep] for k in hp})
    assert row == {"x": "m", "y": "gap/acc", "per_pair": want.per_set, "score": want.score, "n": 23, "left_out": 1}
    assert list(row["per_pair"]) == ["lr,width", "lr,wd", "width,wd"]
