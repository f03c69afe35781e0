"""Cost of the image data path on FashionMNIST with LeNet-5 at batch 64: torchvision's loader against the in-memory one.

Run:  python benchmarks/data_path.py [--short] [--data-dir ./data] [--threads 1] [--profile]

The setup of ``configs/experiments/adaptive_sharpness_fashion_mnist.yaml`` (Hammoud et al. 2023): LeNet-5
with BatchNorm, dropout 0.5 and Xavier init, cross-entropy, SGD lr 0.05, batch 64, on the real
FashionMNIST (``apt-get install dataset-fashion-mnist``, or the files under ``--data-dir``), one thread.

(a) The training loader's time per batch (``next()`` on its iterator) as a fraction of a plain PyTorch
    forward-backward-step on a pre-built batch, for torchvision's path (``in_memory: false``: PIL image,
    ``ToTensor``, ``Normalize`` per sample, then ``default_collate``) and the in-memory path. Windows of
    ``--window`` batches of the three kinds alternate in one process, so a drift of the machine cancels
    out of the ratios; each time is the median over its windows.
(b) Training epochs of the Lightning module (``Classifier``, ``minimizer: null``; no validation, logger,
    checkpoint or progress bar) fed by the in-memory loader, against a plain PyTorch loop (same network,
    optimizer and batch size) over the batches pre-built in a list. A callback times each Lightning
    epoch from its first to its last batch (the Trainer's start-up is not counted) and runs one plain
    epoch right after it, so the two alternate; the ratio is of the medians. ``--fraction`` (``--short``:
    0.1) limits both to that fraction of an epoch. ``--profile`` prints where the Lightning step's time
    goes beyond the plain step (cProfile of a steady-state epoch: own time per package, top functions).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402,F401  (this checkout is the package flatminima)
from flatminima.datamodules import FashionMNISTDataModule  # noqa: E402
from flatminima.lightning_modules import Classifier  # noqa: E402
from flatminima.lightning_modules.networks import LeNet5  # noqa: E402

BATCH = 64


def lenet5() -> torch.nn.Module:
    """The experiment's LeNet-5 (BN, dropout 0.5, Xavier), seeded."""
    torch.manual_seed(0)
    return LeNet5(dropout=0.5, weight_init="xavier")


def data(data_dir: str, in_memory: bool) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir, batch_size=BATCH, in_memory=in_memory, device="cpu")
    dm.prepare_data()
    dm.setup("fit")
    return dm


def plain_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def endless(loader):
    """Batches of ``loader``, starting a new epoch whenever one ends."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_fractions(tv: FashionMNISTDataModule, mem: FashionMNISTDataModule, window: int, windows: int) -> dict:
    """(a): median ms per batch of each loader and of the plain step, in alternating windows."""
    net = lenet5()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    batches = list(zip(range(window), mem.train_dataloader()))
    sources = {"torchvision": endless(tv.train_dataloader()), "in memory": endless(mem.train_dataloader())}
    times: dict[str, list[float]] = {"torchvision": [], "in memory": [], "step": []}
    for _window in range(windows + 1):  # window 0 warms everything up and is not counted
        for name, source in sources.items():
            start = time.perf_counter()
            for _ in range(window):
                next(source)
            times[name].append((time.perf_counter() - start) / window)
        start = time.perf_counter()
        for _, (x, y) in batches:
            plain_step(net, opt, x, y)
        times["step"].append((time.perf_counter() - start) / window)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


class EpochTimer(pl.Callback):
    """Times each Lightning epoch (first batch start to last batch end), then runs one plain epoch."""

    def __init__(self, batches: list, limit: int) -> None:
        self.batches, self.limit = batches, limit
        self.net = lenet5()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05)
        self.lightning: list[float] = []
        self.plain: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.lightning.append(time.perf_counter() - self._start)
        self.net.train()
        start = time.perf_counter()
        for x, y in self.batches[: self.limit]:
            plain_step(self.net, self.opt, x, y)
        self.plain.append(time.perf_counter() - start)


def epochs(mem: FashionMNISTDataModule, fraction: float, repeats: int) -> tuple[int, float, float]:
    """(b): the median Lightning epoch and plain epoch (s), alternating, and the batches per epoch."""
    batches = list(mem.train_dataloader())
    limit = max(1, int(len(batches) * fraction))
    timer = EpochTimer(batches, limit)
    model = Classifier(lenet5(), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05), minimizer=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=repeats + 1,
        limit_train_batches=limit,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=mem)
    return limit, statistics.median(timer.lightning[1:]), statistics.median(timer.plain[1:])


GROUPS = (  # (label, test on (file name, function name)); the first match wins. "~": C code called from Python
    ("torch C++ (ops, autograd)", lambda f, fn: f == "~" and ("torch" in fn or "Tensor" in fn or "_C." in fn)),
    ("Python built-ins (isinstance, abc, ...)", lambda f, fn: f == "~"),
    ("datamodules (the loader)", lambda f, fn: "datamodules" in f),
    ("lightning_modules (the task)", lambda f, fn: "lightning_modules" in f),
    ("torchmetrics", lambda f, fn: "torchmetrics" in f),
    ("lightning, lightning_utilities", lambda f, fn: "lightning" in f),
    ("torch Python", lambda f, fn: "torch" in f),
    ("other Python", lambda f, fn: True),
)


class ProfileEpoch(pl.Callback):
    """cProfile of the second training epoch only (first batch start to epoch end: no start-up, warm caches)."""

    def __init__(self) -> None:
        self.profiler = cProfile.Profile()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.profiler.enable()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self.profiler.disable()


def profile_epoch(mem: FashionMNISTDataModule, limit: int) -> str:
    """cProfile of a steady-state Lightning epoch of ``limit`` batches: own time per group of code, then the
    top functions by own time."""
    model = Classifier(lenet5(), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05), minimizer=None)
    profile = ProfileEpoch()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=limit,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[profile],
    )
    trainer.fit(model, datamodule=mem)
    stats = pstats.Stats(profile.profiler)
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        group = next(label for label, test in GROUPS if test(filename, function))
        totals[group] = totals.get(group, 0.0) + own
    out = io.StringIO()
    out.write("| code | own time (s) | per step (ms) |\n| --- | --- | --- |\n")
    for group, own in sorted(totals.items(), key=lambda kv: -kv[1]):
        out.write(f"| {group} | {own:.3f} | {own / limit * 1e3:.2f} |\n")
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(12)
    stats.sort_stats("cumulative").print_stats("lightning_modules|logger_connector|apply_func", 10)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="./data", help="data_dir (the Debian package's folder is searched too)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--short", action="store_true", help="a fraction 0.1 of an epoch and fewer windows")
    parser.add_argument("--fraction", type=float, default=None, help="fraction of an epoch for (b) (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each kind in (b)")
    parser.add_argument("--window", type=int, default=20, help="batches per timed window in (a)")
    parser.add_argument("--windows", type=int, default=None, help="timed windows of each kind in (a)")
    parser.add_argument("--profile", action="store_true", help="also profile one Lightning epoch (b)")
    args = parser.parse_args()
    fraction = args.fraction if args.fraction is not None else (0.1 if args.short else 1.0)
    windows = args.windows if args.windows is not None else (5 if args.short else 15)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    tv, mem = data(args.data_dir, in_memory=False), data(args.data_dir, in_memory=True)
    print(
        f"device: CPU ({torch.get_num_threads()} thread(s)); torch {torch.__version__}; lightning {pl.__version__}; "
        f"FashionMNIST {len(mem.train_set)} training images (read in {time.perf_counter() - start:.1f} s); "
        f"LeNet-5 (BN, dropout 0.5), SGD, batch {BATCH}"
    )
    a = loader_fractions(tv, mem, args.window, windows)
    print(
        f"\n(a) loader time per batch / plain forward-backward-step ({windows} windows of {args.window} batches "
        "each, interleaved; medians)"
    )
    print("| path | loader (ms/batch) | plain step (ms) | loader / step |")
    print("| --- | --- | --- | --- |")
    for name in ("torchvision", "in memory"):
        print(f"| {name} | {a[name] * 1e3:.3f} | {a['step'] * 1e3:.2f} | {a[name] / a['step']:.3f} |")

    limit, lightning, plain = epochs(mem, fraction, args.repeats)
    print(
        f"\n(b) training epoch of {limit} batches ({fraction:g} of an epoch): Lightning Classifier + in-memory "
        f"loader / plain loop over pre-built batches ({args.repeats} of each, alternating; medians)"
    )
    print("| batches | Lightning (s) | plain loop (s) | Lightning / plain | per step: Lightning, plain (ms) |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| {limit} | {lightning:.2f} | {plain:.2f} | {lightning / plain:.3f} | "
        f"{lightning / limit * 1e3:.2f}, {plain / limit * 1e3:.2f} |"
    )
    if args.profile:
        print("\ncProfile of one Lightning epoch (top functions by own time):")
        print(profile_epoch(mem, limit))


if __name__ == "__main__":
    main()
