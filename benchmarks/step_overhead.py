"""Cost of a SAM-family step relative to a base-optimizer step: same module, model, batch, process.

Run:  python benchmarks/step_overhead.py [--device cpu|cuda] [--models mlp,cnn,resnet18] [--json out.json]
      python benchmarks/step_overhead.py --rules efficient      (SAM and the cheaper variants)

For every model, each rule (SAM, ASAM, GSAM, ...) is timed as a whole training step of our
LightningModule (``Classifier`` + ``Trainer``: the step, its logging, the one host sync), next to
``minimizer=None`` (the base optimizer alone) measured in the same run. The two passes are the
floor of a two-pass step, so a ratio of 2.0 is the target to beat only by Lightning's fixed
per-step overhead. For reference the table also gives the same ratio for a plain PyTorch loop
(``2 × forward-backward + step`` over ``forward-backward + step``), with no Lightning at all.

The cheaper variants (``VARIANTS``: LookSAM, SAM on every 5th / a random half of the steps, AE-SAM,
Momentum-SAM with and without its clean-loss forward pass, ESAM, SAF, MESA) are timed the same way, at their
presets' settings; the table's "2-pass share" is the fraction of their timed steps with two backward passes,
"ratio of means" the ratio of the mean step times over all windows (for plans that change over the run). SAF and
MESA are timed with their KL term on from the first step (in a run it starts after ``start_epoch``), and the
batch carries the sample indices SAF needs (``(x, y, idx)``; the other steps ignore them).

Timing: after ``--warmup`` steps, windows of ``--window`` steps alternate between the base step and
the rule's step within one run (the module reads ``minimizer`` at every step), so slow drifts of the
machine cancel out of the ratio; each kind's time is the median over its windows of the mean step
time. The GPU is synchronised only at window boundaries, so steps pipeline as in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.lightning_modules import ASAM, GSAM, SAM, USAM, AdaptiveGSAM, Classifier  # noqa: E402
from flatminima.lightning_modules.minimizers import (  # noqa: E402
    ESAM,
    MESA,
    SAF,
    AdaptiveSteps,
    EveryK,
    LookSAM,
    MomentumSAM,
    RandomSteps,
)
from flatminima.lightning_modules.networks import MLP  # noqa: E402

RULES = {
    "SAM": lambda: SAM(0.05),
    "SAM-inf": lambda: SAM(0.05, p=float("inf")),
    "USAM": lambda: USAM(0.05),
    "ASAM": lambda: ASAM(0.5),
    "GSAM": lambda: GSAM(0.05, alpha=0.1),
    "AdaptiveGSAM": lambda: AdaptiveGSAM(0.05, alpha=0.1),
}


def _term_on(cls):
    """``cls`` (SAF or MESA) with its KL term on at every step, so that its cost is timed (benchmark only)."""
    return type(cls.__name__, (cls,), {"extra_loss_active": lambda self, ctx: self.lam > 0})


VARIANTS = {
    "LookSAM-5": lambda: LookSAM(0.05, k=5, alpha=0.7),
    "SAM-every-5": lambda: EveryK(SAM(0.05), k=5),
    "SAM-random-0.5": lambda: RandomSteps(SAM(0.05), p=0.5),
    "AE-SAM": lambda: AdaptiveSteps(SAM(0.05)),
    "MSAM": lambda: MomentumSAM(3.0),
    "MSAM-1pass": lambda: MomentumSAM(3.0, clean_loss=False),
    "ESAM": lambda: ESAM(0.05, beta=0.6, gamma=0.5),
    "SAF": lambda: _term_on(SAF)(lam=0.3, temperature=5.0, minus_epochs=3, start_epoch=5),
    "MESA": lambda: _term_on(MESA)(lam=0.8, temperature=5.0, decay=0.9998, start_epoch=5),
}
EFFICIENT = ["SAM", *VARIANTS]  # --rules efficient


def small_cnn() -> nn.Module:
    """Two conv blocks (conv-BN-ReLU-pool) and two linear layers on 3×32×32 inputs (~0.55M parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def resnet18() -> nn.Module:
    try:
        from flatminima.lightning_modules.networks import ResNet18

        return ResNet18(num_classes=10)
    except ImportError:  # pragma: no cover - before the CIFAR networks exist
        import torchvision

        return torchvision.models.resnet18(num_classes=10)


MODELS = {
    # name: (factory, input shape without batch, classes, batch size)
    "mlp": (lambda: MLP(), (2,), 2, 64),
    "cnn": (small_cnn, (3, 32, 32), 10, 128),
    "resnet18": (resnet18, (3, 32, 32), 10, 128),
}


class RepeatBatch(Dataset):
    """The same (already on-device) batch ``(x, y, idx)``, ``n`` times: no data loading in the timing.

    ``idx`` (0 .. batch − 1) are the sample indices SAF reads; ``n`` ≥ the batch size, so they are in range.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, max(n, x.shape[0])
        self.idx = torch.arange(x.shape[0], device=x.device)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.x, self.y, self.idx


class AlternatingTimer(pl.Callback):
    """Alternate windows of ``window`` steps with and without the rule; time each window.

    The module reads ``minimizer`` at every step, so switching it at a window boundary switches the
    step. Interleaving base and rule windows in one run cancels the machine's drift from the ratio.
    The device is synchronised at window boundaries only.
    """

    def __init__(self, rule, warmup: int, window: int) -> None:
        self.rule, self.warmup, self.window = rule, warmup, window
        self.times: dict[bool, list[float]] = {False: [], True: []}
        self._start: float | None = None
        self._with_rule = False
        self.rule_steps = self.two_pass_steps = 0  # over the timed rule windows
        self._backwards = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        self._backwards += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup and self._with_rule:
            self.rule_steps += 1
            self.two_pass_steps += self._backwards >= 2

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._backwards = 0
        if batch_idx < self.warmup:  # warm both paths up: base first, then the rule
            pl_module.minimizer = self.rule if batch_idx >= self.warmup // 2 else None
            return
        if (batch_idx - self.warmup) % self.window:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None:
            self.times[self._with_rule].append((now - self._start) / self.window)
        self._with_rule = ((batch_idx - self.warmup) // self.window) % 2 == 1
        pl_module.minimizer = self.rule if self._with_rule else None
        self._start = now


def _inputs(model_name: str, device: str, batch: int | None):
    """A seeded network of ``MODELS[model_name]`` and one random batch on ``device``."""
    factory, shape, classes, default_batch = MODELS[model_name]
    batch = default_batch if batch is None else batch
    torch.manual_seed(0)
    net = factory()
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return net, x, y, classes


def time_module(
    model_name: str,
    rule_name: str,
    device: str,
    warmup: int,
    window: int,
    windows: int,
    batch: int | None = None,
    precision: str = "32-true",
    timer_out: list | None = None,
):
    """Median step time (s) of the module without and with the rule, in interleaved windows of one run.

    ``batch`` overrides the model's batch size; ``precision`` is the Trainer's (``"bf16-mixed"``, ...).
    ``timer_out``: the run's :class:`AlternatingTimer` is appended to it (its two-pass step counts).
    """
    net, x, y, classes = _inputs(model_name, device, batch)
    model = Classifier(net, num_classes=classes, optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    timer = AlternatingTimer({**RULES, **VARIANTS}[rule_name](), warmup, window)
    if timer_out is not None:
        timer_out.append(timer)
    steps = warmup + window * 2 * windows + 1
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        precision=precision,
    )
    trainer.fit(model, DataLoader(RepeatBatch(x, y, steps), batch_size=None))
    return statistics.median(timer.times[False]), statistics.median(timer.times[True])


def time_plain(
    model_name: str,
    device: str,
    warmup: int,
    window: int,
    windows: int,
    batch: int | None = None,
    precision: str = "32-true",
):
    """Median step time (s) of a bare PyTorch loop with 1 and with 2 forward-backward passes per step.

    ``precision="bf16-mixed"`` runs the forward passes under ``torch.autocast`` in bfloat16.
    """
    net, x, y, _ = _inputs(model_name, device, batch)
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    times: dict[int, list[float]] = {1: [], 2: []}
    start, passes = None, 1
    for i in range(warmup + window * 2 * windows + 1):
        if i < warmup:
            passes = 1 + i % 2  # warm both kinds up
        elif (i - warmup) % window == 0:  # a window boundary: time the window that ends here
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if start is not None:
                times[passes].append((now - start) / window)
            start, passes = now, 1 + ((i - warmup) // window) % 2
        for _ in range(passes):
            opt.zero_grad()
            with autocast:
                loss = F.cross_entropy(net(x), y)
            loss.backward()
        opt.step()
    return statistics.median(times[1]), statistics.median(times[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help="comma list among mlp,cnn,resnet18")
    parser.add_argument(
        "--rules",
        default="SAM,ASAM,GSAM",
        help=f"comma list among {','.join([*RULES, *VARIANTS])}, or 'efficient' (SAM and the variants)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (half base, half rule)")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows of each kind (interleaved)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    models = (
        args.models.split(",")
        if args.models
        else (["mlp", "cnn", "resnet18"] if args.device == "cuda" else ["mlp", "cnn"])
    )
    rules = EFFICIENT if args.rules == "efficient" else args.rules.split(",")
    unknown = [r for r in rules if r not in RULES and r not in VARIANTS]
    if unknown:
        parser.error(f"unknown rule(s) {unknown}; choose among {', '.join([*RULES, *VARIANTS])} or 'efficient'")
    timing = dict(warmup=args.warmup, window=args.window, windows=args.windows)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}; lightning {pl.__version__}")
    print("module: a Classifier training step with the rule ÷ the same step with minimizer=None")
    print("plain : a bare PyTorch loop, 2 forward-backward passes + step ÷ 1 pass + step (no Lightning)")
    print("2-pass share: the fraction of the rule's timed steps with two forward-backward passes")
    print("ratio of means: the mean over all windows (the median's ratio is robust to a busy machine, this one")
    print("               counts every step, for plans that change over the run such as AE-SAM's)")
    print(
        "| model | rule | base step (ms) | rule step (ms) | module ratio | ratio of means | 2-pass share "
        "| plain 1-pass (ms) | plain 2-pass (ms) | plain ratio |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = []
    for m in models:
        plain1, plain2 = time_plain(m, args.device, **timing)
        for r in rules:
            timers: list[AlternatingTimer] = []
            base, t = time_module(m, r, args.device, timer_out=timers, **timing)
            share = timers[0].two_pass_steps / max(timers[0].rule_steps, 1)
            times = timers[0].times
            mean_ratio = statistics.mean(times[True]) / statistics.mean(times[False])
            print(
                f"| {m} | {r} | {base * 1e3:.3f} | {t * 1e3:.3f} | {t / base:.3f} | {mean_ratio:.3f} | {share:.2f} "
                f"| {plain1 * 1e3:.3f} | {plain2 * 1e3:.3f} | {plain2 / plain1:.3f} |",
                flush=True,
            )
            results.append(
                dict(
                    model=m,
                    rule=r,
                    step_ms=t * 1e3,
                    base_ms=base * 1e3,
                    ratio=t / base,
                    mean_ratio=mean_ratio,
                    two_pass_share=share,
                    plain1_ms=plain1 * 1e3,
                    plain2_ms=plain2 * 1e3,
                    plain_ratio=plain2 / plain1,
                    device=device_name,
                )
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
