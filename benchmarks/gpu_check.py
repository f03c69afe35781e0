"""GPU readiness: one script that checks every CUDA path of flatminima and times the step and the measures.

Run:  python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--out gpu_check.json] [--only SECTIONS]
      [--threads N] [--speed-model mlp|cnn|resnet18] [--speed-batch B] [--rules SAM,GSAM,...]

Sections (one table row per check; exit code 1 if any check fails, 2 if ``--device cuda`` finds no GPU):

* ``steps``: SAM, ASAM and GSAM steps of ``flatminima.lightning_modules.Classifier`` through a real ``Trainer.fit``
  on a small BatchNorm CNN in float64 equal the same steps on the CPU (≤ 1e-9).
* ``amp``: ``bf16-mixed`` and ``16-mixed`` steps (a real ``GradScaler``) follow the rules' formulas on the
  unscaled gradients (USAM's ascent ρ·g/S) and restore w exactly; a step the scaler skips leaves the
  weights bit-identical.
* ``measures``: minimum sharpness, adaptive sharpness, gradient-norm sharpness, the top Hessian
  eigenvalue and the Hessian trace (exact and Hutchinson) on the device equal their CPU values; each
  time beside one forward+backward pass over the same data.
* ``ddp``: with ≥ 2 GPUs a 2-process DDP run (nccl), per-replica and global ascent: weights identical on
  both ranks (gloo on 2 CPU processes in the full CPU run; otherwise a visible 'skip' row).
* ``speed`` (reported, not judged): ResNet-18, CIFAR-shaped synthetic input, batch 128: each rule's
  step ÷ the base step in float32 and bf16-mixed (floor 2.0, aim ≤ 2.05), and a plain PyTorch
  2-pass ÷ 1-pass loop.
* ``moons``: the wall time of the default ``python cli.py fit`` on the device, and ``configs/trainer/gpu.yaml``.

Synthetic tensors only: nothing is downloaded. ``--quick`` (fewer rules and windows, 5 moons epochs) is
sized for under 2 minutes on one H100, the full run for under 5 (estimates: not yet run on a GPU).
On the CPU (``--device cpu``) every code path runs end to end on small sizes (an MLP instead of
ResNet-18 for the speed rows; the speed figures of a shared CPU are noise): the device-equals-CPU rows
are then trivial, except the Hessian rows, which compare different start vectors and probes.
``16-mixed`` on the CPU uses an explicit CPU ``GradScaler`` plugin (Lightning's ``precision="16-mixed"``
silently becomes bf16 there). The table is printed row by row; the JSON file is rewritten after every
row (``"complete": false`` until the end).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Known, harmless notices of this torch/Lightning pair; filtered before the imports that raise them.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Lightning and the check modules are imported after the CUDA check (a missing GPU is reported at once).
SECTIONS = ("steps", "amp", "measures", "ddp", "speed", "moons")
SPEED_MODELS = ("mlp", "cnn", "resnet18")  # benchmarks/step_overhead.py's MODELS
RULES = ("SAM", "SAM-inf", "USAM", "ASAM", "GSAM", "AdaptiveGSAM")  # benchmarks/step_overhead.py's RULES
FAULTS = ("step", "measure")


def section_functions() -> dict:
    """The row generator of each section (imports Lightning and the check modules)."""
    from gpu_check_ddp import ddp_rows
    from gpu_check_measures import measure_rows
    from gpu_check_speed import moons_rows, speed_rows
    from gpu_check_steps import amp_rows, fp64_rows
    from step_overhead import MODELS
    from step_overhead import RULES as OVERHEAD_RULES

    assert set(SPEED_MODELS) == set(MODELS) and set(RULES) == set(OVERHEAD_RULES), "update gpu_check's lists"
    return {
        "steps": fp64_rows,
        "amp": amp_rows,
        "measures": measure_rows,
        "ddp": ddp_rows,
        "speed": speed_rows,
        "moons": moons_rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default; pick the GPU with CUDA_VISIBLE_DEVICES) or cpu",
    )
    parser.add_argument("--quick", action="store_true", help="the short run (< 2 min on one H100)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default: gpu_check.json)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list among {','.join(SECTIONS)}")
    parser.add_argument(
        "--speed-model",
        choices=SPEED_MODELS,
        default=None,
        help="network of the speed rows (default: resnet18 on cuda, mlp on cpu)",
    )
    parser.add_argument("--speed-batch", type=int, default=None, help="batch size of the speed rows")
    parser.add_argument("--rules", default=None, help=f"speed rows' rules, comma list among {','.join(RULES)}")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads and OMP_NUM_THREADS of the subprocesses; "
        "1 avoids oversubscription on a shared machine)",
    )
    parser.add_argument("--fault", default="", help=argparse.SUPPRESS)  # test hook: comma list among FAULTS
    args = parser.parse_args(argv)
    for name, value, allowed in (
        ("--only", args.only, SECTIONS),
        ("--rules", args.rules or "", RULES),
        ("--fault", args.fault, FAULTS),
    ):
        bad = [v for v in value.split(",") if v and v not in allowed]
        if bad:
            parser.error(f"invalid {name}: {','.join(bad)}; expected a comma list among {','.join(allowed)}")
    for name, value in (("--speed-batch", args.speed_batch), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"invalid {name}: {value}; expected an integer >= 1")
    return args


def settings(args: argparse.Namespace):
    """The sizes of this run: the device's defaults for the full or quick mode, then the overrides."""
    quick, cuda = args.quick, args.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda:
        sizes = dict(
            side=16,
            batch=64,
            measure_batches=4,
            probes=20 if quick else 50,
            speed_model="resnet18",
            speed_batch=128,
            speed_rules=("SAM", "ASAM", "GSAM") if quick else RULES,
            warmup=6 if quick else 10,
            window=5 if quick else 10,
            windows=4 if quick else 5,
            moons_args=("--trainer.max_epochs", "5") if quick else (),
            ddp="nccl" if gpus >= 2 else f"skipped: {gpus} GPU",
            timeout_s=120.0 if quick else 240.0,
        )
    else:
        sizes = dict(
            side=8,
            batch=16 if quick else 32,
            measure_batches=2,
            probes=10 if quick else 20,
            speed_model="mlp",
            speed_batch=64,
            speed_rules=("SAM", "GSAM") if quick else ("SAM", "ASAM", "GSAM"),
            warmup=4,
            window=3 if quick else 5,
            windows=2 if quick else 3,
            moons_args=(
                (
                    "--trainer.max_epochs",
                    "1",
                    "--trainer.limit_train_batches",
                    "10",
                    "--trainer.limit_val_batches",
                    "1",
                    "--trainer.limit_test_batches",
                    "1",
                )
                if quick
                else ("--trainer.max_epochs", "1")
            ),
            ddp="skipped: no GPU (--device cpu --quick; the full CPU run uses gloo)" if quick else "gloo",
            timeout_s=300.0,
        )
    if args.speed_model:
        sizes["speed_model"] = args.speed_model
    if args.speed_batch:
        sizes["speed_batch"] = args.speed_batch
    if args.rules:
        sizes["speed_rules"] = tuple(args.rules.split(","))
    faults = frozenset(f for f in args.fault.split(",") if f)
    from gpu_check_common import Settings

    return Settings(device=torch.device(args.device), quick=quick, faults=faults, **sizes)


def environment(s) -> dict:
    """What the figures were measured on."""
    import lightning

    env = dict(
        schema=1,
        device=s.device.type,
        mode="quick" if s.quick else "full",
        torch=torch.__version__,
        lightning=lightning.__version__,
        python=sys.version.split()[0],
        sizes=s.sizes(),
    )
    if s.on_cuda:
        env.update(
            device_name=torch.cuda.get_device_name(),
            gpu_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    else:
        env.update(device_name=f"CPU ({torch.get_num_threads()} threads)", gpu_count=0)
    return env


def quiet() -> None:
    """Keep Lightning's per-Trainer banners and known warnings out of the table."""
    import lightning.pytorch  # noqa: F401 - its import sets its loggers' level, so import it first

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|log_every_n_steps).*")


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections; 0 if every check passed, 1 if one failed, 2 without the requested GPU."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: --device cuda, but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda}); use --device cpu for the CPU run",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the cli.py and DDP subprocesses
    quiet()
    s = settings(args)
    env = environment(s)
    print(
        f"gpu_check ({env['mode']}): {env['device_name']}; torch {env['torch']}, lightning {env['lightning']}"
        + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, {env['gpu_count']} GPU(s)" if s.on_cuda else ""),
        flush=True,
    )
    from gpu_check_common import Report, run_section

    functions = section_functions()
    report = Report(Path(args.out), env)
    start = time.perf_counter()
    for name in [n for n in SECTIONS if n in args.only.split(",")]:
        run_section(report, name, lambda fn=functions[name]: fn(s))
    report.write(complete=True)
    counts = {k: sum(r.status == k for r in report.rows) for k in ("pass", "FAIL", "skip", "info")}
    print(
        f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped, {counts['info']} reported "
        f"in {time.perf_counter() - start:.0f} s; JSON: {args.out}",
        flush=True,
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
