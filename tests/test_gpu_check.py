"""benchmarks/gpu_check.py runs end to end on the CPU, reports in its JSON format, and fails when a check fails.

The script is meant for a GPU that is only now and then available; these runs keep its code paths
(the steps through a real Trainer, mixed precision with a GradScaler, the measures, the speed rows,
the ``cli.py`` invocation, the DDP script) from rotting in between.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ROW_KEYS = {"section", "check", "status", "value", "limit", "seconds", "data"}
MEASURES = (
    "minimum_sharpness",
    "adaptive_sharpness",
    "gradient_norm_sharpness",
    "hessian_eigenvalues",
    "hessian_trace exact",
    "hessian_trace Hutchinson",
)


def _run(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "gpu_check.json"
    # one thread: the CI machine's cores are shared, and oversubscribed OpenMP threads only wait for each other
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    return proc, json.loads(out.read_text()) if out.exists() else None


def _rows(doc: dict, section: str) -> list[dict]:
    return [r for r in doc["rows"] if r["section"] == section]


@pytest.mark.slow
def test_quick_cpu_run_passes_every_check_and_writes_the_report(tmp_path):
    proc, doc = _run(tmp_path, "--device", "cpu", "--quick")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert doc["complete"] and doc["passed"] and doc["failed"] == []
    assert doc["device"] == "cpu" and doc["mode"] == "quick"
    assert {"torch", "lightning", "device_name", "sizes", "total_seconds"} <= set(doc)
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS
        assert row["status"] in ("pass", "skip", "info"), row
        assert row["check"] in proc.stdout  # the printed table has every row
    steps = _rows(doc, "steps")
    for rule in ("SAM", "ASAM", "GSAM"):
        assert any(r["check"].startswith(f"{rule} step, float64") and r["status"] == "pass" for r in steps)
    steps = _rows(doc, "amp")
    for precision in ("bf16-mixed", "16-mixed"):
        for rule in ("SAM", "GSAM", "USAM"):
            rows = [r for r in steps if r["check"].startswith(f"{rule} step, {precision}") and "inf" not in r["check"]]
            assert len(rows) == 2 and all(r["status"] == "pass" for r in rows)  # formulas, and close to float64
    usam = next(r for r in steps if r["check"].startswith("USAM step, 16-mixed (GradScaler"))
    assert usam["data"]["scale"] > 1 and usam["data"]["eps"] <= 1e-4  # a real loss scale, and the ascent unscaled
    skipped = next(r for r in steps if "inf forced" in r["check"])
    assert skipped["status"] == "pass" and skipped["data"]["scale_after"] < skipped["data"]["scale_before"]
    assert any(r["status"] == "skip" and "16-mixed" in r["check"] for r in steps)  # CPU: Lightning's flag is bf16
    measures = _rows(doc, "measures")
    for name in MEASURES:
        row = next(r for r in measures if r["check"].startswith(name))
        assert row["status"] == "pass" and row["data"]["fwd_bwd_ratio"] > 0
    assert [r["status"] for r in _rows(doc, "ddp")] == ["skip"]
    speed = _rows(doc, "speed")
    assert len(speed) == 2 * 3 and all(r["data"]["ratio"] > 0 for r in speed)  # plain + 2 rules, 2 precisions
    moons = _rows(doc, "moons")
    assert moons[0]["status"] == "pass" and moons[0]["data"]["wall_seconds"] > 0
    assert moons[0]["data"]["test_acc"] is not None


@pytest.mark.slow
def test_a_corrupted_step_or_measure_fails_the_run(tmp_path):
    # hidden test hook: the device step uses 1.01·ρ; the device model's first weight is scaled by 1.01
    proc, doc = _run(tmp_path, "--device", "cpu", "--quick", "--only", "steps,measures", "--fault", "step,measure")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = {r["check"] for r in doc["rows"] if r["status"] == "FAIL"}
    assert not doc["passed"] and len(doc["failed"]) == len(failed)
    for rule in ("SAM", "ASAM", "GSAM"):
        assert any(c.startswith(f"{rule} step, float64") for c in failed)
    for name in MEASURES[:-1]:  # Hutchinson's estimate cannot see a 1% change within its error
        assert any(c.startswith(name) for c in failed)
    assert all("float64" in c or c.startswith(MEASURES) for c in failed)  # nothing else broke


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_device_cuda_without_a_gpu_exits_2_with_one_line(tmp_path):
    proc, doc = _run(tmp_path, "--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert doc is None and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu" in lines[0]


def test_bad_section_name_is_refused(tmp_path):
    proc, _ = _run(tmp_path, "--device", "cpu", "--only", "steps,nope", timeout=120)
    assert proc.returncode == 2 and "invalid --only: nope" in proc.stderr


@pytest.mark.slow
def test_full_cpu_ddp_section_runs_two_gloo_processes(tmp_path):
    proc, doc = _run(tmp_path, "--device", "cpu", "--only", "ddp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(doc, "ddp")
    assert len(rows) == 3 and all(r["status"] == "pass" for r in rows)
    replica, global_ = rows[0]["data"], rows[1]["data"]
    assert replica["world_size"] == 2 and replica["identical"] and not replica["pass1_grads_equal"]
    assert global_["identical"] and global_["pass1_grads_equal"]
