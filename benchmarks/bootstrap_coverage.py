"""Coverage of the percentile bootstrap interval of Kendall's τ over small pools (why ``MIN_BOOTSTRAP_RUNS`` is 10).

Pools of n runs with (x, y) bivariate normal of correlation ρ, whose Kendall τ is (2/π)·asin ρ; for each
pool, the 95% interval :func:`flatminima.studies.analysis.bootstrap_tau` gives (1000 resamples, without the
minimum-run rule), and the share of pools whose interval holds the true τ. A nominal 95% interval
should cover about 95% of them.

    python benchmarks/bootstrap_coverage.py [--pools 400] [--rho 0.5,0.8,0.95,0.99] [--n 4,5,6,8,10,12,15,20]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.studies.analysis import bootstrap_tau  # noqa: E402


def coverage(rho: float, n: int, pools: int, rng: np.random.Generator) -> float:
    """Share of ``pools`` pools of ``n`` runs whose interval holds the true τ."""
    tau = 2 / math.pi * math.asin(rho)
    hits = 0
    for seed in range(pools):
        z = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], size=n)
        interval = bootstrap_tau(z[:, 0], z[:, 1], 1000, seed=seed, min_runs=0)
        hits += interval is not None and interval[0] <= tau <= interval[1]
    return hits / pools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=400)
    parser.add_argument("--rho", default="0.5,0.8,0.95,0.99")
    parser.add_argument("--n", default="4,5,6,8,10,12,15,20")
    args = parser.parse_args()
    sizes = [int(v) for v in args.n.split(",")]
    rng = np.random.default_rng(0)
    print("| ρ | τ | " + " | ".join(f"n = {n}" for n in sizes) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |")
    for rho in (float(v) for v in args.rho.split(",")):
        cells = " | ".join(f"{coverage(rho, n, args.pools, rng):.2f}" for n in sizes)
        print(f"| {rho} | {2 / math.pi * math.asin(rho):.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
