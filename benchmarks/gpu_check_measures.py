"""The sharpness measures of ``flatminima.callbacks.measures`` on the device equal their CPU values.

Same float64 BN CNN (BatchNorm running statistics set to non-trivial values, so the eval-mode
folding matters) and the same synthetic batches on both devices. Deterministic measures must agree
to float64 rounding; Lanczos starts from another seeded vector on the device (seed 1 against seed 0,
and CUDA draws other numbers anyway), so the top eigenvalue must agree to the solver's tolerance;
Hutchinson's probes differ too, so the two estimates must agree within their standard errors.
Each device time stands beside one forward+backward pass over the same batches on the device.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from gpu_check_common import Row, Settings, bn_cnn, make_batches, timed, verdict
from torch import nn

from flatminima.callbacks import measures as M

LANCZOS_TOL = 1e-10
Z_MAX = 4.0


@dataclass(frozen=True)
class Measure:
    """One measure: how to compute it (``fn(net, batches, seed)``) and how to compare two values."""

    name: str
    fn: Callable[[nn.Module, list, int], Any]
    tol: float  # relative tolerance, or the largest z-score for "z"
    kind: str = "rel"  # "rel" or "z" (two independent Hutchinson estimates)


def measures(s: Settings) -> list[Measure]:
    """The measures checked, with the arguments of this run."""
    return [
        Measure("minimum_sharpness (exact traces + Newton)", lambda n, b, seed: M.minimum_sharpness(n, b), 1e-9),
        Measure(
            "adaptive_sharpness (APGD, L∞, ρ 1e-3, 20 it)", lambda n, b, seed: M.adaptive_sharpness(n, b, 1e-3), 1e-6
        ),
        Measure("gradient_norm_sharpness (ρ 0.05)", lambda n, b, seed: M.gradient_norm_sharpness(n, b, 0.05), 1e-9),
        Measure(
            f"hessian_eigenvalues k=1 (Lanczos tol {LANCZOS_TOL:g}; start seed 0 cpu, 1 device)",
            lambda n, b, seed: M.hessian_eigenvalues(n, b, 1, tol=LANCZOS_TOL, max_iter=300, seed=seed)[0],
            1e-8,
        ),
        Measure("hessian_trace exact (layer traces)", lambda n, b, seed: M.hessian_trace(n, b, method="exact"), 1e-9),
        Measure(
            f"hessian_trace Hutchinson, {s.probes} probes (seed 0 cpu, 1 device)",
            lambda n, b, seed: M.hutchinson_trace(n, b, n_probes=s.probes, seed=seed),
            Z_MAX,
            "z",
        ),
    ]


def measured_net(side: int) -> nn.Sequential:
    """The float64 BN CNN with seeded, non-trivial BatchNorm running statistics."""
    net = bn_cnn(side).double()
    g = torch.Generator().manual_seed(2)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
    return net


def forward_backward_seconds(net: nn.Module, batches: list, device: torch.device, repeats: int = 3) -> float:
    """Median time of one forward+backward pass over all the batches (eval mode, a copy of the net)."""
    net = copy.deepcopy(net).eval()

    def run() -> None:
        for x, y in batches:
            F.cross_entropy(net(x), y).backward()
        net.zero_grad(set_to_none=True)

    run()  # warm-up
    return statistics.median(timed(run, device)[0] for _ in range(repeats))


def compare(m: Measure, cpu: Any, dev: Any) -> tuple[bool, str, str, dict]:
    """(ok, value text, tolerance text, data) for the CPU and device results of one measure."""
    if m.kind == "z":
        z = abs(cpu.value - dev.value) / max((cpu.stderr**2 + dev.stderr**2) ** 0.5, 1e-300)
        text = f"cpu {cpu.value:.5g}±{cpu.stderr:.2g}, dev {dev.value:.5g}±{dev.stderr:.2g}, z {z:.2f}"
        return (
            z <= m.tol,
            text,
            f"z ≤ {m.tol:g}",
            dict(cpu=cpu.value, device=dev.value, cpu_se=cpu.stderr, device_se=dev.stderr, z=z),
        )
    rel = abs(cpu - dev) / max(abs(cpu), 1e-300)
    return (
        rel <= m.tol,
        f"cpu {cpu:.10g}, dev {dev:.10g}, rel {rel:.1e}",
        f"≤ {m.tol:g} rel",
        dict(cpu=cpu, device=dev, rel_diff=rel),
    )


def measure_rows(s: Settings) -> Iterator[Row]:
    """One row per measure: device value = CPU value, device time and its ratio to one forward+backward."""
    net = measured_net(s.side)
    batches = make_batches(s.measure_batches, s.batch, s.side, seed=4, dtype=torch.float64)
    dev_net = copy.deepcopy(net).to(s.device)
    dev_batches = [(x.to(s.device), y.to(s.device)) for x, y in batches]
    if "measure" in s.faults:  # test hook: a deliberately different model on the device
        with torch.no_grad():
            next(dev_net.parameters()).mul_(1.01)
    fwd_bwd = forward_backward_seconds(dev_net, dev_batches, s.device)
    yield Row(
        "measures",
        f"forward+backward over the same {len(batches)}×{s.batch} inputs ({s.device.type})",
        "info",
        f"{fwd_bwd * 1e3:.2f} ms",
        "baseline",
        fwd_bwd,
        dict(seconds=fwd_bwd),
    )
    for m in measures(s):
        cpu_value = m.fn(net, batches, 0)
        m.fn(dev_net, dev_batches, 1)  # warm-up (kernels, allocator)
        seconds, dev_value = timed(lambda m=m: m.fn(dev_net, dev_batches, 1), s.device)
        ok, value, limit, data = compare(m, cpu_value, dev_value)
        ratio = seconds / fwd_bwd
        yield Row(
            "measures",
            f"{m.name}: {s.device.type} = cpu",
            verdict(ok),
            f"{value}; time {ratio:.1f}× fwd+bwd",
            limit,
            seconds,
            dict(data, seconds=seconds, fwd_bwd_ratio=ratio),
        )
