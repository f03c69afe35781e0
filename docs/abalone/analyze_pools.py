"""Abalone's sign: our pools of 50 in Hammoud et al.'s notebook setup against what their notebook prints.

Inputs (this folder): ``pools_notebook_setup.csv`` (our runs of
``configs/studies/adaptive_sharpness_abalone_pools.yaml``, exported from the study folder with ``--study``),
``replica_seeds_0-49.csv`` (their notebook's code re-typed in plain torch, ``notebook_replica.py``),
``hammoud_fcnn_notebook.csv`` (what their notebook prints per model, ``extract_notebook.py``) and
``hammoud_fcnn_scatter.csv`` (their published scatter, digitized, ``digitize_scatter.py``). Prints the
tables of docs/reproductions.md section 2 and draws docs/figures/abalone-sign.png.

Kendall's τ is scipy's τ-b, as their notebook computes it. The pools are seeds 0-49, 50-99, ...

The rule for "disturbed", fixed before our pools were read: a model whose final training loss lies more than
3 robust standard deviations from its pool's median, |L − median| > 3 · 1.4826 · MAD (the Hampel identifier).
Our final training loss is L (``sharpness/adaptive_clean_loss``: the training MSE of the final weights); theirs
is the last training loss their notebook prints (one SGD step before the final weights, which it does not print).

"Stale A": the sharpness recomputed with each model's L and the post-ascent loss A of *another* model of the
pool (a random permutation, 2000 draws): what the published figure computes if the ascent results it read
belonged to networks trained earlier (docs/reproductions.md, section 2).

Usage (from the repository root)::

    python docs/abalone/analyze_pools.py [--study logs/studies/adaptive_sharpness_abalone_pools]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy import stats

HERE = Path(__file__).resolve().parent
POOL = 50
KEYS = {
    "S": "sharpness/adaptive",
    "S_best": "sharpness/adaptive_best_iterate",
    "A": "sharpness/adaptive_ascent_loss",
    "L": "sharpness/adaptive_clean_loss",
    "falls": "sharpness/adaptive_ascent_falls",
    "test": "test/loss",
}
OURS = HERE / "pools_notebook_setup.csv"


def export_study(study: Path) -> None:
    """Write the finished runs of the complete pools of ``study`` to pools_notebook_setup.csv."""
    rows = []
    for path in sorted((study / "runs").glob("*/summary.json")):
        s = json.loads(path.read_text())
        if s["status"] == "finished":
            rows.append([s["seed"], len(s["history"]["train/loss"])] + [s["metrics"][k] for k in KEYS.values()])
    rows.sort()
    seeds = {r[0] for r in rows}
    complete = {p for p in {r[0] // POOL for r in rows} if all(p * POOL + i in seeds for i in range(POOL))}
    with open(OURS, "w", newline="") as f:
        f.write(
            f"# our runs of configs/studies/adaptive_sharpness_abalone_pools.yaml ({study.name}), summary.json "
            "metrics (docs/abalone/analyze_pools.py --study)\n"
        )
        w = csv.writer(f)
        w.writerow(["seed", "epochs"] + list(KEYS))
        w.writerows(r for r in rows if r[0] // POOL in complete)


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def read_notebook() -> dict[str, np.ndarray]:
    """Their printed per-model values: L (last printed training loss), A (last pass), epochs."""
    with open(HERE / "hammoud_fcnn_notebook.csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return {
        "L": np.array([float(r["final_train_loss"]) for r in rows]),
        "A": np.array([float(r["ascent_loss"]) for r in rows]),
        "epochs": np.array([int(r["epochs"]) for r in rows]),
    }


def hampel(values: np.ndarray, k: float = 3.0) -> np.ndarray:
    """The disturbed models: |x − median| > k · 1.4826 · MAD."""
    median = np.median(values)
    return np.abs(values - median) > k * 1.4826 * np.median(np.abs(values - median))


def tau(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    result = stats.kendalltau(x, y)
    return float(result.statistic), float(result.pvalue)


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:+.3f} (p {t[1]:.2g})"


def describe(v: np.ndarray) -> str:
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} [{v.min():.3f}, {v.max():.3f}]"


def stale(a: np.ndarray, low: np.ndarray, test: np.ndarray, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """τ(A_π − L, test) over random permutations π of the pool (each model's A replaced by another's)."""
    rng = np.random.default_rng(seed)
    return np.array([tau(a[rng.permutation(len(a))] - low, test)[0] for _ in range(draws)])


def pool_rows(pools: list[tuple[str, dict[str, np.ndarray]]]) -> list[dict]:
    out = []
    for name, r in pools:
        flagged = hampel(r["L"])
        mixed = stale(r["A"], r["L"], r["test"])
        out.append(
            {
                "pool": name,
                "S": tau(r["S"], r["test"]),
                "S_clean": tau(r["S"][~flagged], r["test"][~flagged]),
                "n_flagged": int(flagged.sum()),
                "flagged_L": np.round(np.sort(r["L"][flagged]), 3).tolist(),
                "S_best": tau(r["S_best"], r["test"]) if "S_best" in r else None,
                "A": tau(r["A"], r["test"]),
                "L": tau(r["L"], r["test"]),
                "AL": tau(r["A"], r["L"]),
                "stale": (mixed.mean(), mixed.std()),
            }
        )
    return out


def pools_of(runs: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
    out = []
    for start in range(0, int(runs["seed"].max()) + 1, POOL):
        sel = (runs["seed"] >= start) & (runs["seed"] < start + POOL)
        if sel.sum() == POOL:
            out.append((f"ours, seeds {start}-{start + POOL - 1}", {k: v[sel] for k, v in runs.items()}))
    return out


def report(runs, replica, theirs, scatter) -> list[dict]:
    replica = dict(replica, S=replica["sharpness"], test=replica["test_loss"])
    rows = pool_rows(pools_of(runs) + [("their code re-typed, seeds 0-49", replica)])
    print(
        "| pool | τ(S, test) | without disturbed | disturbed: n, L | τ(A, test) | τ(L, test) | τ(A, L) "
        "| stale A: τ(A_other − L, test) |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['pool']} | {fmt(r['S'])} | {fmt(r['S_clean'])} | {r['n_flagged']}: {r['flagged_L']} | "
            f"{fmt(r['A'])} | {fmt(r['L'])} | {r['AL'][0]:+.3f} | {r['stale'][0]:+.3f} ± {r['stale'][1]:.3f} |"
        )
    ours = [r for r in rows if r["pool"].startswith("ours")]
    for key, label in (("S", "τ(S, test)"), ("S_clean", "without disturbed"), ("L", "τ(L, test)")):
        v = np.array([r[key][0] for r in ours])
        print(
            f"spread over our {len(v)} pools, {label}: mean {v.mean():+.3f}, std {v.std(ddof=1):.3f}, "
            f"range [{v.min():+.3f}, {v.max():+.3f}]"
        )
    same = np.abs(runs["S"] - runs["S_best"])
    print(
        f"end of the best pass vs best iterate: equal (to 1e-6) in {(same < 1e-6).sum()} of {len(same)} runs, "
        f"largest difference {same.max():.1e}; τ with the best iterate per pool: "
        + ", ".join(f"{r['S_best'][0]:+.3f}" for r in ours)
    )
    print(
        f"falling ascent steps: ours {describe(runs['falls'])} (no run monotone: {(runs['falls'] == 0).sum()}); "
        f"their code {describe(replica['falls'] / 318)}"
    )
    print("\n| models | A: post-ascent train MSE | L: final train MSE | A − L | τ(A, L) | epochs |")
    print("| --- | --- | --- | --- | ---: | --- |")
    ep = lambda e: ", ".join(f"{int(k)}: {v}" for k, v in zip(*np.unique(e, return_counts=True)))  # noqa: E731
    for label, r in (
        (f"ours, {len(runs['seed'])}", runs),
        ("their code re-typed, 50", replica),
        ("theirs as printed, 50", dict(theirs, S=theirs["A"] - theirs["L"])),
    ):
        print(
            f"| {label} | {describe(r['A'])} | {describe(r['L'])} | {describe(r['S'])} "
            f"| {tau(r['A'], r['L'])[0]:+.3f} | {ep(r['epochs'])} |"
        )
    flagged = hampel(theirs["L"])
    print(
        f"their disturbed (same rule): models {np.flatnonzero(flagged).tolist()}, "
        f"L = {np.round(theirs['L'][flagged], 4).tolist()}"
    )
    if scatter is not None:
        s, t, model = scatter["sharpness"], scatter["test_loss"], scatter["model"].astype(int)
        keep = ~flagged[model]
        print(
            f"their scatter, digitized ({len(s)} points): τ {fmt(tau(s, t))} (published −0.311, p 0.0014); "
            f"without their {int((~keep).sum())} disturbed: {fmt(tau(s[keep], t[keep]))}"
        )
    return rows


def figure(runs, replica, theirs, scatter, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flagged = np.concatenate([hampel(r["L"]) for _, r in pools_of(runs)])
    tf = hampel(theirs["L"])
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    ax[0].scatter(runs["L"], runs["A"], s=9, c="tab:blue", label=f"ours ({len(runs['seed'])} runs)")
    ax[0].scatter(replica["L"], replica["A"], s=12, c="tab:green", marker="s", label="their code re-typed (50)")
    ax[0].scatter(
        runs["L"][flagged], runs["A"][flagged], s=28, facecolors="none", edgecolors="k", label="ours, disturbed"
    )
    ax[0].scatter(theirs["L"], theirs["A"], s=18, c="tab:orange", marker="^", label="theirs as printed (50)")
    ax[0].scatter(
        theirs["L"][tf], theirs["A"][tf], s=50, facecolors="none", edgecolors="r", marker="^", label="theirs, disturbed"
    )
    ax[0].set(
        xlabel="L: final training MSE",
        ylabel="A: training MSE after the ascent",
        title="A follows L here; not in their printout",
    )
    ax[0].legend(fontsize=8)
    ax[1].scatter(runs["S"], runs["test"], s=9, c="tab:blue", label="ours")
    ax[1].scatter(
        runs["S"][flagged], runs["test"][flagged], s=28, facecolors="none", edgecolors="k", label="ours, disturbed"
    )
    if scatter is not None:
        bad = tf[scatter["model"].astype(int)]
        ax[1].scatter(
            scatter["sharpness"],
            scatter["test_loss"],
            s=18,
            c="tab:orange",
            marker="^",
            label="their figure (digitized)",
        )
        ax[1].scatter(
            scatter["sharpness"][bad],
            scatter["test_loss"][bad],
            s=50,
            facecolors="none",
            edgecolors="r",
            marker="^",
            label="theirs, disturbed",
        )
    ax[1].set(xlabel="sharpness A − L", ylabel="test MSE (standardised rings)", title="sharpness against test loss")
    ax[1].legend(fontsize=8)
    x = np.arange(len(rows))
    ax[2].scatter(x - 0.1, [r["S"][0] for r in rows], c="tab:blue", label="τ(S, test)")
    ax[2].scatter(x + 0.1, [r["S_clean"][0] for r in rows], c="k", label="without disturbed")
    ax[2].errorbar(
        x,
        [r["stale"][0] for r in rows],
        [r["stale"][1] for r in rows],
        fmt="o",
        c="tab:purple",
        label="stale A (another model's A)",
    )
    ax[2].axhline(-0.311, color="tab:orange", ls="--", label="published −0.311")
    ax[2].axhline(0, color="grey", lw=0.5)
    ax[2].set_xticks(
        x,
        [r["pool"].replace("ours, seeds ", "").replace("their code re-typed, seeds 0-49", "their code") for r in rows],
    )
    ax[2].set(xlabel="pool of 50", ylabel="Kendall τ with the test loss", title="τ per pool")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, help="export this study folder's runs to pools_notebook_setup.csv first")
    parser.add_argument("--figure", type=Path, default=HERE.parent / "figures" / "abalone-sign.png")
    args = parser.parse_args()
    if args.study is not None:
        export_study(args.study)
    runs, replica, theirs = read_csv(OURS), read_csv(HERE / "replica_seeds_0-49.csv"), read_notebook()
    scatter_path = HERE / "hammoud_fcnn_scatter.csv"
    scatter = read_csv(scatter_path) if scatter_path.exists() else None
    rows = report(runs, replica, theirs, scatter)
    figure(runs, replica, theirs, scatter, rows, args.figure)


if __name__ == "__main__":
    main()
