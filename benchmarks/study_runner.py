"""Time a study of 20 small runs with reused workers against 20 separate ``python cli.py fit`` processes.

The pool: moons (10000 points) and the MLP, 2 epochs, {SGD, Adam} × {alone, SAM} × 5 seeds. In the same
run (so machine load affects both alike) it times:

* ``python cli.py study run bench.yaml --workers W --no-analysis`` (one command: the parent process and W
  reused worker processes);
* the 20 commands ``study run --dry-run`` prints, as separate ``python cli.py fit`` processes, one after the
  other (a shell loop), and ``W`` at a time (as many processes as the study's workers).

It prints the wall times, their ratios, and the runner's own overhead per run: the worker time not spent
inside ``cli.main`` (start-up of the parent and the workers, dispatch, bookkeeping, idle ends), divided
by the runs; and the bookkeeping alone (a run's task time minus its ``cli.main`` time).

    python benchmarks/study_runner.py [--workers 2] [--runs 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def study_file(folder: Path, runs: int, epochs: int) -> Path:
    """A grid of ``runs`` runs (4 cells × runs/4 seeds) with absolute config paths."""
    seeds = max(1, runs // 4)
    c = ROOT / "configs"
    text = (
        f"name: bench\nbase: [{c}/data/moons.yaml, {c}/model/mlp.yaml]\n"
        f"overrides: {{trainer.max_epochs: {epochs}}}\n"
        f"axes:\n  optim: {{sgd: {c}/optim/sgd.yaml, adam: {c}/optim/adam.yaml}}\n"
        f"  rule: {{none: {c}/minimizer/none.yaml, sam: {c}/minimizer/sam.yaml}}\n"
        f"seeds: {seeds}\nresources: {{cpu: 1}}\n"
    )
    path = folder / "bench.yaml"
    path.write_text(text)
    return path


def timed(command: list[str] | str, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        shell=isinstance(command, str),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {command}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="study_bench_")) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    study = study_file(folder, args.runs, args.epochs)
    python = [sys.executable, str(ROOT / "cli.py"), "study", "run", str(study)]

    printed = subprocess.run(
        [*python, "--out", str(folder / "separate"), "--dry-run"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [
        ln.replace(" python ", f" {sys.executable} ", 1) for ln in printed.splitlines() if ln and not ln.startswith("#")
    ]
    n = len(commands)

    wall_study = timed(
        [*python, "--out", str(folder / "study"), "--workers", str(args.workers), "--no-analysis"], folder, env
    )
    wall_loop = sum(timed(c, folder, env) for c in commands)
    shutil.rmtree(folder / "separate")
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda c: timed(c, folder, env), commands))
    wall_parallel = time.perf_counter() - start

    records = [json.loads(p.read_text()) for p in (folder / "study" / "runs").glob("*/run.json")]
    summaries = [json.loads(p.read_text()) for p in (folder / "study" / "runs").glob("*/summary.json")]
    assert len(records) == n and all(s["status"] == "finished" for s in summaries), "a run failed"
    cli_total = sum(r["cli_seconds"] for r in records)
    fit_test = sum(s["wall_time_s"] for s in summaries) / n
    overhead = (wall_study * args.workers - cli_total) / n
    bookkeeping = sum(r["seconds"] - r["cli_seconds"] for r in records) / n

    print(f"{n} runs (moons MLP, {args.epochs} epochs), {args.workers} workers, {os.cpu_count()} CPUs")
    print(f"study run --workers {args.workers}:              {wall_study:7.1f} s")
    print(f"{n} separate processes, one at a time:  {wall_loop:7.1f} s   ratio {wall_loop / wall_study:5.2f}")
    print(
        f"{n} separate processes, {args.workers} at a time:     {wall_parallel:7.1f} s   "
        f"ratio {wall_parallel / wall_study:5.2f}"
    )
    print(
        f"per run in a worker: cli.main {cli_total / n:.2f} s (fit + test {fit_test:.2f} s); "
        f"a separate process: {wall_loop / n:.2f} s"
    )
    print(
        f"runner overhead per run: {overhead:.2f} s all included (parent and worker start-up, dispatch, idle "
        f"ends); bookkeeping alone {bookkeeping * 1000:.0f} ms"
    )
    print(f"outputs: {folder}" if args.keep else "")
    if args.keep is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
