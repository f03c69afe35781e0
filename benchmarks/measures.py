"""Time each sharpness measure on a fixed small CNN and 1024 MNIST-shaped inputs (CPU).

Each row is the median (and minimum) wall time over ``--repeats`` runs, and its ratio to one
forward+backward pass over the same data, timed right before each run (the median of the ratios, so
slow drifts of a shared machine's load cancel). Also timed, for scale against
the original minimum-sharpness code (~30 s for the Hessian diagonal of such a CNN plus 3–10 s for its
α solve): a reference-style Hessian diagonal from per-example Jacobians (torch.func, K+1 backward
directions per example, the original's algorithm), which also cross-checks our traces, and the
original's torch-SGD α solve (10 000 steps). Timings on a shared machine are noisy: read the medians;
with other jobs on the cores, ``--threads 1`` avoids OpenMP threads waiting for each other.

    python benchmarks/measures.py [--repeats 3] [--threads N] [--samples 1024] [--probes 20] [--no-reference]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.callbacks import measures  # noqa: E402
from tests.reference_alpha import reference_sgd_solve  # noqa: E402  (the tests' oracle)


def cnn() -> nn.Sequential:
    """Two 5×5 conv layers with 2×2 max pooling and one linear layer: 13 422 parameters for 28×28×1."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 10, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(10, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), out


def reference_diag_traces(net: nn.Module, batches: list, chunk: int = 64) -> torch.Tensor:
    """Per-layer traces of diag H = Σ_k p_k (∂z_k/∂θ)² − (Σ_k p_k ∂z_k/∂θ)² from full per-example Jacobians.

    The original code's algorithm (K backward passes for the diag(p) part and one for the p pᵀ part, each
    with per-example gradients), written with torch.func instead of its autograd hooks.
    """
    net = net.eval()
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach() for n, p in net.named_parameters()}

    def logits(p, x):
        return functional_call(net, p, (x[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))
    sums = {n: torch.zeros(()) for n in names}
    count = 0
    for x, _ in batches:
        for xs in x.split(chunk):
            j = jac(params, xs)  # name -> (n, K, *shape)
            with torch.no_grad():
                prob = functional_call(net, params, (xs,)).softmax(1)
                for n in names:
                    g = j[n].flatten(2)
                    sums[n] += (prob[:, :, None] * g.square()).sum() - (prob[:, :, None] * g).sum(1).square().sum()
            count += len(xs)
    return torch.stack([sums[n] / count for n in names])


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--probes", type=int, default=20, help="Hutchinson probes")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style baselines")
    return parser.parse_args()


def _rows(net: nn.Module, x: torch.Tensor, y: torch.Tensor, traces, args) -> list[tuple[str, Callable[[], object]]]:
    """The timed rows: (name, call), the forward+backward baseline first."""
    b256, b128, b64 = ([(x[i : i + m], y[i : i + m]) for i in range(0, len(x), m)] for m in (256, 128, 64))

    def forward_backward():
        for xb, yb in b256:
            F.cross_entropy(net(xb), yb).backward()
        net.zero_grad(set_to_none=True)

    t_list, b_list = traces.weight.tolist(), traces.bias.tolist()
    rows: list[tuple[str, Callable[[], object]]] = [
        ("forward+backward (baseline)", forward_backward),
        ("minimum_sharpness (exact traces + Newton)", lambda: measures.minimum_sharpness(net, b256)),
        ("  layer traces only", lambda: measures.layer_traces(net, b256)),
        ("  alpha solve: exact (Newton)", lambda: measures.minimize_scaled_trace(t_list, b_list)),
        ("  alpha solve: sgd, 10k steps", lambda: measures.minimize_scaled_trace(t_list, b_list, solver="sgd")),
        (
            "  alpha solve: sgd, 100k steps (Bejan et al.)",
            lambda: measures.minimize_scaled_trace(t_list, b_list, solver="sgd", steps=100_000),
        ),
        ("adaptive_sharpness apgd, 20 it, m=128", lambda: measures.adaptive_sharpness(net, b128, 0.0005)),
        (
            "adaptive_sharpness pga, 5 it, m=64",
            lambda: measures.adaptive_sharpness(net, b64, 0.0005, method="pga", step_size=0.05, n_iters=5),
        ),
        ("gradient_norm_sharpness, m=128", lambda: measures.gradient_norm_sharpness(net, b128, 0.05)),
        ("hessian_eigenvalues k=1 (Lanczos, tol 1e-4)", lambda: measures.hessian_eigenvalues(net, b256, 1)),
        (
            f"hessian_trace hutchinson, {args.probes} probes",
            lambda: measures.hessian_trace(net, b256, n_probes=args.probes),
        ),
        ("hessian_trace exact (GGN)", lambda: measures.hessian_trace(net, b256, method="exact")),
    ]
    if not args.no_reference:
        rows += [
            ("reference-style diag H (per-example Jacobians)", lambda: reference_diag_traces(net, b256)),
            ("reference alpha solve (torch SGD, 10k steps)", lambda: reference_sgd_solve(t_list, b_list)),
        ]
    return rows


def _time_rows(rows: list[tuple[str, Callable[[], object]]], repeats: int) -> dict[str, object]:
    """Print each row's median/min time and median ratio to the baseline timed just before; return the values."""
    forward_backward = rows[0][1]
    results = {}
    print(f"{'measure':<48} {'median s':>9} {'min s':>8} {'× fwd+bwd':>10}  value")
    for name, fn in rows:
        fn()  # warm-up (allocator, kernels)
        times, ratios, out = [], [], None
        for _ in range(repeats):
            base, _, _ = timed(forward_backward, 1)
            elapsed, _, out = timed(fn, 1)
            times.append(elapsed)
            ratios.append(elapsed / base)
        results[name] = out
        value = out if isinstance(out, float) else (out[0] if isinstance(out, list) else "")
        value = f"{value:.6g}" if isinstance(value, float) else ""
        print(
            f"{name:<48} {statistics.median(times):>9.3f} {min(times):>8.3f} {statistics.median(ratios):>10.1f}  "
            f"{value}"
        )
    return results


def main() -> None:
    args = _arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    traces = measures.layer_traces(net, [(x[i : i + 256], y[i : i + 256]) for i in range(0, args.samples, 256)])
    rows = _rows(net, x, y, traces, args)
    params = sum(p.numel() for p in net.parameters())
    print(
        f"CNN with {params} parameters, {args.samples} inputs 1×28×28, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median/min of {args.repeats} runs; each run of a measure is "
        "paired with a forward+backward run just before it and the ratio is the median of the pairs' ratios"
    )
    results = _time_rows(rows, args.repeats)
    if not args.no_reference:
        ref = results["reference-style diag H (per-example Jacobians)"]
        ours = torch.stack([traces.weight, traces.bias], 1).reshape(-1).to(ref.dtype)
        print(
            f"max relative difference of the per-parameter-tensor traces, ours vs reference-style: "
            f"{float(((ours - ref).abs() / ref.abs()).max()):.2e}"
        )


if __name__ == "__main__":
    main()
