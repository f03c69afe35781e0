"""``python cli.py study run|analyze``: the command line of studies.

::

    python cli.py study run STUDY.yaml [--out DIR] [--engine local|ray] [--workers N] [--address ADDR]
                                       [--cpus-per-run C] [--gpus-per-run G] [--timeout S] [--dry-run]
    python cli.py study analyze DIR [--x KEY ...] [--y KEY ...] [--groups AXIS ...] [--bootstrap N]
"""

from __future__ import annotations

import argparse
import os
import sys

from .spec import StudyError, load


def parser() -> argparse.ArgumentParser:
    """The ``study`` argument parser (``run`` and ``analyze``)."""
    p = argparse.ArgumentParser(
        prog="python cli.py study",
        description="Pools of runs over a grid, and their statistics (Kendall τ, granulated Ψ, KS tests, figures).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run every unfinished run of a study file, then analyse the pool",
        description="Run every unfinished run of STUDY (a finished summary.json is skipped, so a "
        "stopped study continues where it stopped), then analyse DIR. Several processes "
        "(or machines sharing DIR) may run the same study at once: each run is claimed "
        "(DIR/claims/) and trained by one of them, each waits for the others, and the "
        "last one out writes the analysis.",
    )
    r.add_argument("study", help="the study file (YAML); relative config paths resolve against the current directory")
    r.add_argument("--out", help="the study folder (default: logs/studies/<name>)")
    r.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: reused worker processes on this machine (default); ray: Ray Tune trials",
    )
    r.add_argument(
        "--workers",
        type=_positive_int,
        help="runs at once (local default: the CPUs / threads per run; ray default: as resources allow)",
    )
    r.add_argument(
        "--address",
        help="ray: an existing cluster (e.g. auto or ray://host:10001); default: start a local Ray instance",
    )
    r.add_argument("--cpus-per-run", type=float, help="override resources.cpu (threads of a run; Ray CPUs)")
    r.add_argument("--gpus-per-run", type=float, help="override resources.gpu (Ray GPUs, fractional allowed)")
    r.add_argument("--timeout", type=float, help="local: seconds a run may take before its worker is killed")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print one `python cli.py fit ...` command per run and write nothing (each command claims "
        "its run while it trains: FLATMINIMA_CLAIM)",
    )
    r.add_argument("--no-analysis", action="store_true", help="do not analyse the pool at the end")
    a = sub.add_parser(
        "analyze",
        help="analyse a folder of runs/*/summary.json",
        description="Kendall τ (with p and bootstrap interval), granulated Ψ, KS tests, results.csv, "
        "analysis.md/json, figures and TensorBoard, from DIR/runs/*/summary.json; the "
        "analysis section of DIR/study.yaml unless --x/--y are given.",
    )
    a.add_argument("dir", help="the study folder")
    a.add_argument(
        "--x", nargs="+", metavar="KEY", help="sharpness keys (default: the study file's, or every sharpness/* key)"
    )
    a.add_argument(
        "--y",
        nargs="+",
        metavar="KEY",
        help="generalization keys (default: the study file's, or gap/*, test/loss, test/acc)",
    )
    a.add_argument("--groups", nargs="*", metavar="AXIS", help="axes for per-group τ, colours and distributions")
    a.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples of the τ interval (0: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``study run|analyze`` on ``argv`` (default: the command line after ``study``); returns the exit code."""
    args = parser().parse_args(sys.argv[2:] if argv is None else argv)
    from . import commands

    try:
        if args.command == "analyze":
            commands.analyze(args.dir, x=args.x, y=args.y, groups=args.groups, bootstrap=args.bootstrap)
            return 0
        if args.address is not None and args.engine != "ray":
            raise StudyError("--address applies to --engine ray only")
        if args.timeout is not None and (args.engine != "local" or not args.timeout > 0):
            raise StudyError(f"Invalid --timeout: {args.timeout}; expected seconds > 0, with --engine local")
        study = commands.with_resources(load(args.study), args.cpus_per_run, args.gpus_per_run)
        out = args.out or str(commands.default_out(study))
        if args.dry_run:
            return commands.dry_run(study, out)
        return commands.run(
            study,
            out,
            engine=args.engine,
            workers=args.workers,
            address=args.address,
            timeout=args.timeout,
            analyze_after=not args.no_analysis,
        )
    except (StudyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `--dry-run | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\nstudy interrupted: finished runs are kept; run the same command again to continue", file=sys.stderr)
        return 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
