"""Shared pieces of ``benchmarks/gpu_check.py``: settings, result rows, the report, the test network and timing.

Imported by the check modules next to it (``gpu_check_steps``, ``gpu_check_measures``,
``gpu_check_speed``, ``gpu_check_ddp``); run ``python benchmarks/gpu_check.py``, not this file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.lightning_modules import Classifier  # noqa: E402

LR = 0.1  # SGD learning rate of every correctness check (momentum 0.9)
CLASSES = 10


@dataclass(frozen=True)
class Settings:
    """What one run of the check does: the device, the sizes of each part and the injected faults."""

    device: torch.device
    quick: bool
    side: int  # height = width of the BN CNN's 3-channel inputs
    batch: int  # batch size of the correctness checks and of the measures
    measure_batches: int  # number of batches the measures run on
    probes: int  # Hutchinson probes
    speed_model: str  # a key of benchmarks/step_overhead.MODELS
    speed_batch: int
    speed_rules: tuple[str, ...]
    warmup: int  # speed: untimed steps
    window: int  # speed: steps per timed window
    windows: int  # speed: timed windows of each kind
    moons_args: tuple[str, ...]  # extra `cli.py fit` arguments of the moons run (empty: the full default run)
    ddp: str  # "nccl", "gloo" or a reason to skip
    timeout_s: float  # limit of each subprocess
    faults: frozenset[str] = frozenset()  # test hook: deliberately corrupt a check ("step", "measure")

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def sizes(self) -> dict[str, Any]:
        """The settings as plain JSON values."""
        out = asdict(self)
        out["device"] = str(self.device)
        out["faults"] = sorted(self.faults)
        return out


@dataclass
class Row:
    """One line of the table: a check (pass/FAIL), a skipped check, or a reported figure (info)."""

    section: str
    check: str
    status: str  # "pass", "FAIL", "skip" or "info"
    value: str = ""
    limit: str = ""
    seconds: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


def verdict(ok: bool) -> str:
    """``"pass"`` or ``"FAIL"``."""
    return "pass" if ok else "FAIL"


COLUMNS = ("section", "check", "value", "tolerance / ratio", "status", "time (s)")


class Report:
    """Prints the table row by row (Markdown) and rewrites the JSON file after every row.

    A run cut short (a time limit on a borrowed GPU) still leaves every finished row in the JSON,
    with ``"complete": false``.
    """

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out, self.header, self.rows = out, header, []
        self.start = time.perf_counter()
        print("| " + " | ".join(COLUMNS) + " |")
        print("| --- | --- | --- | --- | --- | ---: |", flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        seconds = "" if row.seconds is None else f"{row.seconds:.2f}"
        cells = (row.section, row.check, row.value, row.limit, row.status, seconds)
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |", flush=True)
        self.write(complete=False)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def write(self, complete: bool) -> None:
        doc = dict(
            self.header,
            rows=[asdict(r) for r in self.rows],
            passed=not self.failed,
            failed=[f"{r.section}: {r.check}" for r in self.failed],
            complete=complete,
            total_seconds=round(time.perf_counter() - self.start, 2),
        )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        os.replace(tmp, self.out)


def run_section(report: Report, section: str, rows: Callable[[], Iterable[Row]]) -> None:
    """Add the rows a section yields; an exception becomes one FAIL row and the run goes on."""
    start = time.perf_counter()
    try:
        for row in rows():
            report.add(row)
            start = time.perf_counter()
    except Exception as err:  # noqa: BLE001 - any error is a failed check, reported, not a crash
        report.add(
            Row(
                section,
                "(section raised)",
                "FAIL",
                value=f"{type(err).__name__}: {err}"[:300],
                seconds=time.perf_counter() - start,
            )
        )


# ---------------------------------------------------------------------------------------- network and data
def bn_cnn(side: int, seed: int = 0) -> nn.Sequential:
    """A small BatchNorm CNN on 3×side×side inputs (side divisible by 4), 10 classes, float32.

    ``Conv3x3(3→8)-BN-ReLU-MaxPool2 → Conv3x3(8→16)-BN-ReLU-MaxPool2 → Linear(16·(side/4)², 32)-ReLU
    → Linear(32, 10)``: a feed-forward ReLU chain, so minimum sharpness and the exact trace apply.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (side // 4) ** 2, 32),
        nn.ReLU(),
        nn.Linear(32, CLASSES),
    )
    net.out_features = CLASSES
    return net


Batch = tuple[torch.Tensor, torch.Tensor]


def make_batches(n: int, batch: int, side: int, seed: int, dtype: torch.dtype) -> list[Batch]:
    """``n`` synthetic CIFAR-like batches on the CPU (Gaussian images, uniform labels): no download."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, side, side, generator=g, dtype=dtype), torch.randint(0, CLASSES, (batch,), generator=g))
        for _ in range(n)
    ]


def loader(batches: list[Batch]) -> DataLoader:
    """A loader yielding exactly ``batches``, in order."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=batches[0][0].shape[0], shuffle=False)


def fit(net: nn.Module, rule, batches, device: torch.device, steps: int, callbacks=(), **trainer_kwargs):
    """Train ``net`` with ``rule`` for ``steps`` steps through a real Trainer; return (module, trainer)."""
    model = Classifier(
        net, num_classes=CLASSES, optimizer=partial(torch.optim.SGD, lr=LR, momentum=0.9), minimizer=rule
    )
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(model, loader(batches))
    return model, trainer


# ---------------------------------------------------------------------------------------- timing and comparison
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time (s) of ``fn()`` with the device synchronised before and after, and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def cpu64(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached float64 (floating) CPU copies."""
    return [t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype).clone() for t in tensors]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a − b| over two lists of tensors (CPU, float64)."""
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def rel_norm(a: list[torch.Tensor], b: list[torch.Tensor], base: list[torch.Tensor] | None = None) -> float:
    """‖a − b‖ / ‖b − base‖ over lists of tensors (global L2 norms; base = 0 if None).

    With ``base`` the initial weights, this is the error of a step relative to the size of the reference
    step. A zero denominator gives inf (0 if a = b too).
    """
    num = sum(float((x - y).square().sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float((y if base is None else y - z).square().sum()) for y, z in zip(b, base or b)) ** 0.5
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
