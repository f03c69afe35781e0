"""The table and the figure of docs/reproductions.md, "Cheaper SAM", from a finished efficient_sam study folder.

Per arm of ``configs/studies/efficient_sam.yaml``: the test accuracy (mean ± std over the seeds), the fraction of
SAM's gain over the base optimizer that the arm keeps, (acc − acc_base) / (acc_SAM − acc_base), and its wall time
per run relative to the base optimizer's (means over the seeds, from each summary's ``wall_time_s``). Prints the
Markdown table and writes ``docs/figures/efficient-sam-cost.png`` (accuracy against relative cost, a point per
arm, error bars one standard deviation)::

    python docs/efficient_sam/summarize.py logs/studies/efficient_sam
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.studies import pool  # noqa: E402

ORDER = ("none", "sam", "looksam", "sam_every_k", "sam_random", "aesam", "msam", "esam", "saf", "mesa")
FIGURE = Path(__file__).resolve().parents[1] / "figures" / "efficient-sam-cost.png"


def arms(directory: Path) -> dict[str, dict[str, list[float]]]:
    """Per arm: the test accuracies (%) and wall times (s) of its finished runs."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"acc": [], "wall": []})
    for run in pool.load(directory):
        if run.get("status") == "finished":
            out[run["axes"]["rule"]]["acc"].append(100 * run["metrics"]["test/acc"])
            out[run["axes"]["rule"]]["wall"].append(run["wall_time_s"])
    return out


def table(data: dict[str, dict[str, list[float]]]) -> list[tuple[str, float, float, float, float, float]]:
    """Rows ``(arm, acc mean, acc std, gain kept, relative wall time, its std)``."""
    base, sam = (statistics.mean(data[a]["acc"]) for a in ("none", "sam"))
    base_wall = statistics.mean(data["none"]["wall"])
    rows = []
    for arm in (a for a in ORDER if a in data):
        acc, wall = data[arm]["acc"], [w / base_wall for w in data[arm]["wall"]]
        kept = (statistics.mean(acc) - base) / (sam - base)
        rows.append(
            (arm, statistics.mean(acc), statistics.stdev(acc), kept, statistics.mean(wall), statistics.stdev(wall))
        )
    return rows


def figure(rows: list[tuple[str, float, float, float, float, float]]) -> Figure:
    """Test accuracy against wall time relative to the base optimizer, one point per arm."""
    fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    for arm, acc, acc_sd, _, cost, cost_sd in rows:
        ax.errorbar(cost, acc, xerr=cost_sd, yerr=acc_sd, fmt="o", capsize=3)
        ax.annotate(arm, (cost, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("wall time per run ÷ the base optimizer's")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("efficient_sam: digits, 20 % label noise, 3 seeds (mean ± std)", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def main(directory: str) -> None:
    rows = table(arms(Path(directory)))
    print("| arm | test accuracy (%) | SAM's gain kept | wall time ÷ base |")
    print("| --- | ---: | ---: | ---: |")
    for arm, acc, acc_sd, kept, cost, cost_sd in rows:
        print(f"| {arm} | {acc:.2f} ± {acc_sd:.2f} | {100 * kept:.0f} % | {cost:.2f} ± {cost_sd:.2f} |")
    figure(rows).savefig(FIGURE)
    print(f"figure: {FIGURE}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "logs/studies/efficient_sam")
