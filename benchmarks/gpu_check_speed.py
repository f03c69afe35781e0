"""Speed on the device: each rule's step ÷ the base step, a plain PyTorch loop, and the default moons run.

The step ratios come from ``benchmarks/step_overhead.py`` (the module's whole training step with the
rule ÷ the same step with ``minimizer=None``, interleaved windows in one run, the device synchronised at
window boundaries), in float32 and ``bf16-mixed``. They are reported, not judged: two passes are the
floor (2.0), the aim is ≤ 2.05. The moons rows run ``python cli.py fit`` in a subprocess and time it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from gpu_check_common import ROOT, Row, Settings, verdict
from step_overhead import time_module, time_plain

AIM = 2.05


def speed_rows(s: Settings) -> Iterator[Row]:
    """Plain 2-pass ÷ 1-pass and each rule's step ÷ the base step, in float32 and bf16-mixed."""
    device = s.device.type
    timing = dict(warmup=s.warmup, window=s.window, windows=s.windows, batch=s.speed_batch)
    what = f"{s.speed_model}, batch {s.speed_batch}"
    for precision in ("32-true", "bf16-mixed"):
        start = time.perf_counter()
        one, two = time_plain(s.speed_model, device, precision=precision, **timing)
        yield Row(
            "speed",
            f"{what}, {precision}: plain PyTorch 2-pass ÷ 1-pass loop",
            "info",
            f"{two / one:.3f} ({one * 1e3:.2f} → {two * 1e3:.2f} ms)",
            "reference",
            time.perf_counter() - start,
            dict(
                model=s.speed_model, precision=precision, one_pass_ms=one * 1e3, two_pass_ms=two * 1e3, ratio=two / one
            ),
        )
        for rule in s.speed_rules:
            start = time.perf_counter()
            base, step = time_module(s.speed_model, rule, device, precision=precision, **timing)
            ratio = step / base
            note = "" if ratio <= AIM else ", above the aim"
            yield Row(
                "speed",
                f"{what}, {precision}: {rule} step ÷ base step (module)",
                "info",
                f"{ratio:.3f} ({base * 1e3:.2f} → {step * 1e3:.2f} ms{note})",
                f"floor 2.0, aim ≤ {AIM}",
                time.perf_counter() - start,
                dict(
                    model=s.speed_model,
                    precision=precision,
                    rule=rule,
                    base_ms=base * 1e3,
                    step_ms=step * 1e3,
                    ratio=ratio,
                ),
            )


# ---------------------------------------------------------------------------------------- cli.py runs
def moons_command(accelerator: str, extra: Sequence[str] = (), trainer_config: Path | None = None) -> list[str]:
    """The ``python cli.py fit`` command of the default moons run (the one place that knows cli.py's flags).

    Without ``trainer_config``: the embedded default (``cli.py`` adds it when no ``--config`` is given)
    on ``accelerator`` with one device; with it: the default experiment config plus that trainer preset.
    """
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit"]
    if trainer_config is None:
        cmd += ["--trainer.accelerator", accelerator, "--trainer.devices", "1"]
    else:
        cmd += ["--config", str(ROOT / "configs" / "experiments" / "moons_gsam.yaml"), "--config", str(trainer_config)]
    return cmd + list(extra)


def run_cli(cmd: list[str], timeout_s: float) -> tuple[int | None, float, str]:
    """Run a command in a temporary working directory (its logs/ go there): (exit code or None, seconds, output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            out = (err.stdout or b"") if isinstance(err.stdout, bytes) else (err.stdout or "")
            return None, time.perf_counter() - start, str(out)
        return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def _cli_row(check: str, cmd: list[str], timeout_s: float) -> Row:
    code, seconds, out = run_cli(cmd, timeout_s)
    acc = re.findall(r"test/acc\D*?([0-9]*\.[0-9]+)", out)
    if code is None:
        value = f"timed out after {seconds:.0f} s"
    elif code:
        value = f"exit {code}: " + " ".join(out.strip().splitlines()[-2:])[-200:]
    else:
        value = f"wall {seconds:.1f} s" + (f", test/acc {float(acc[-1]):.4f}" if acc else "")
    return Row(
        "moons",
        check,
        verdict(code == 0),
        value,
        "runs (wall time reported)",
        seconds,
        dict(
            command=cmd[1:],
            exit_code=code,
            wall_seconds=seconds,
            test_acc=float(acc[-1]) if acc else None,
            output_tail=out[-1500:] if code else "",
        ),
    )


def moons_rows(s: Settings) -> Iterator[Row]:
    """The default moons run on the device (timed), and the GPU trainer preset for one epoch."""
    accelerator = "gpu" if s.on_cuda else "cpu"
    cmd = moons_command(accelerator, s.moons_args)
    label = " ".join(["python cli.py fit", *cmd[3:]])
    yield _cli_row(f"default moons run: {label}", cmd, s.timeout_s)
    preset = ROOT / "configs" / "trainer" / "gpu.yaml"
    if not s.on_cuda:
        yield Row("moons", "configs/trainer/gpu.yaml (bf16-mixed), 1 epoch", "skip", "needs a GPU")
        return
    cmd = moons_command(accelerator, ["--trainer.max_epochs", "1", "--test_after_fit", "false"], trainer_config=preset)
    yield _cli_row("configs/trainer/gpu.yaml (bf16-mixed), 1 epoch", cmd, s.timeout_s)
