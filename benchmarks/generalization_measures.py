"""Time each generalization measure (Jiang et al. 2020 and beside them) on a small CNN and 1024 inputs (CPU).

The network of ``benchmarks/measures.py`` (a 13 422-parameter CNN) on 1024 MNIST-shaped random inputs
labelled by the network at initialization, then trained on them with Adam (lr 3e-3, batches of 128) until
the epoch-mean training cross-entropy is ≤ 0.01 (Jiang et al.'s stopping criterion; ~35 epochs, ~15 s on
one core): training accuracy 1, margins as after training, and real distances to the initial weights.
Each row is the median (and minimum) wall time over ``--repeats`` runs and its ratio to one forward+backward
pass over the same data in batches of 256, timed right before each run (the median of the ratios; a first
run over a second counts as one, shorter ones are a warm-up). ``evals`` is the number of perturbed
evaluations of the bisection measures (at most depth × samples; one pass over the data each, times
steps + 1 for the worst-case ascent).

    python benchmarks/generalization_measures.py [--repeats 1] [--threads N] [--samples 1024]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from benchmarks.measures import cnn, timed  # noqa: E402
from flatminima.callbacks import measures  # noqa: E402


def _rows(net, batches, initial) -> list[tuple[str, Callable[[], object]]]:
    def forward_backward():
        for xb, yb in batches:
            F.cross_entropy(net(xb), yb).backward()
        net.zero_grad(set_to_none=True)

    search = dict(depth=15, samples=10)
    return [
        ("forward+backward (baseline)", forward_backward),
        ("pac_bayes: both variants + bounds (tol 0.01)", lambda: measures.pac_bayes(net, batches, initial=initial)),
        ("  pac_bayes_sigma plain, tol 0 (15 x 10)", lambda: measures.pac_bayes_sigma(net, batches, tol=0, **search)),
        (
            "  pac_bayes_sigma magnitude, tol 0 (15 x 10)",
            lambda: measures.pac_bayes_sigma(net, batches, tol=0, magnitude_eps=1e-3, **search),
        ),
        ("sharpness_alpha plain (15 x 3 starts x 5 steps)", lambda: measures.sharpness_alpha(net, batches)),
        ("sharpness_alpha magnitude", lambda: measures.sharpness_alpha(net, batches, magnitude_eps=1e-3)),
        ("  sharpness_alpha plain, tol 0", lambda: measures.sharpness_alpha(net, batches, tol=0)),
        ("average_sharpness L2 adaptive, 20 draws", lambda: measures.average_sharpness(net, batches, 0.1)),
        (
            "average_sharpness Linf adaptive, 20 draws",
            lambda: measures.average_sharpness(net, batches, 0.1, p=math.inf),
        ),
        ("norm_measures (with initial weights)", lambda: measures.norm_measures(net, batches, initial=initial)),
        ("fisher_rao_norm", lambda: measures.fisher_rao_norm(net, batches)),
        (
            "loss_and_accuracy (final train evaluation)",
            lambda: measures.loss_and_accuracy(net, batches, F.cross_entropy),
        ),
    ]


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, max_epochs: int = 200) -> int:
    """Adam (lr 3e-3, batches of 128, fixed order) until the epoch-mean cross-entropy is ≤ 0.01; the epochs run."""
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(1, max_epochs + 1):
        total = torch.zeros(())
        for i in range(0, len(x), 128):
            loss = F.cross_entropy(net(x[i : i + 128]), y[i : i + 128])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(x[i : i + 128])
        if float(total) / len(x) <= 0.01:
            return epoch
    return max_epochs


def _describe(out: object) -> tuple[str, str]:
    """(evals, value) columns of a measure's result."""
    if isinstance(out, measures.RadiusSearch):
        return str(out.evaluations), f"radius {out.radius:.4g}"
    if isinstance(out, measures.MonteCarloEstimate):
        return "", f"{out.value:.4g} ± {out.stderr:.2g}"
    if isinstance(out, dict):
        shown = [k for k in ("pac_bayes_flatness", "pac_bayes_mag_flatness", "path_norm") if k in out]
        return "", ", ".join(f"{k} {out[k]:.4g}" for k in shown)
    if isinstance(out, tuple):
        return "", f"loss {out[0]:.4g}, acc {out[1]:.4g}"
    return "", f"{out:.4g}" if isinstance(out, float) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = cnn()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(args.samples, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    epochs = train(net, x, y)
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, args.samples, 256)]
    rows = _rows(net, batches, initial)
    print(
        f"CNN with {sum(p.numel() for p in net.parameters())} parameters, {args.samples} inputs 1×28×28 labelled "
        f"by the network at initialization, trained {epochs} epochs to cross-entropy <= 0.01, batches of 256, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median/min of {args.repeats} runs, ratio to a forward+backward run just before each"
    )
    print(f"{'measure':<50} {'median s':>9} {'min s':>8} {'× fwd+bwd':>10} {'evals':>6}  value")
    forward_backward = rows[0][1]
    for name, fn in rows:
        times, ratios, out = [], [], None
        base, _, _ = timed(forward_backward, 1)
        elapsed, _, out = timed(fn, 1)  # warm-up (allocator, kernels); kept as a run when it takes over a second
        if elapsed > 1.0:
            times.append(elapsed)
            ratios.append(elapsed / base)
        while len(times) < args.repeats:
            base, _, _ = timed(forward_backward, 1)
            elapsed, _, out = timed(fn, 1)
            times.append(elapsed)
            ratios.append(elapsed / base)
        evals, value = _describe(out)
        print(
            f"{name:<50} {statistics.median(times):>9.3f} {min(times):>8.3f} {statistics.median(ratios):>10.1f} "
            f"{evals:>6}  {value}"
        )


if __name__ == "__main__":
    main()
