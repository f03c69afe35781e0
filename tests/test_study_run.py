"""``study run`` end to end on tiny moons runs: reused workers, failures, a killed worker, resume, dry-run, Ray.

One pool is run once per module (two reused workers; runs of 2 epochs on 240 points): two optimizers that
train, one whose learning rate the optimizer refuses during fit, and a worker killed (SIGKILL) in the
middle of a run (a run the CLI refuses before training: tests/test_run_summary.py). The tests then read
that pool, run the study again (resume), run two ``--dry-run`` commands by hand in fresh processes, and
run four of the runs on Ray.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flatminima import cli
from flatminima.studies import commands
from flatminima.studies.engines.local import LocalEngine
from flatminima.studies.spec import load

pytestmark = pytest.mark.slow
ROOT = cli.ROOT
VICTIM = "optim=sgd-seed=1"


def study_text(failing: bool = True) -> str:
    """Two optimizers × seeds 0, 1; with ``failing``, one more optimizer value that fails in fit (6 runs)."""
    bad = (
        (
            f"    bad_lr: {{configs: [{ROOT}/configs/optim/sgd.yaml], "
            "overrides: {model.init_args.optimizer.init_args.lr: -1.0}}\n"
        )
        if failing
        else ""
    )
    return (
        f"name: tiny\nbase: [{ROOT}/configs/data/moons.yaml, {ROOT}/configs/model/mlp.yaml]\n"
        "overrides: {trainer.max_epochs: 2, data.init_args.num_samples: 240, trainer.enable_model_summary: false}\n"
        f"axes:\n  optim:\n    sgd: {ROOT}/configs/optim/sgd.yaml\n    adam: {ROOT}/configs/optim/adam.yaml\n"
        f"{bad}seeds: [0, 1]\nanalysis: {{x: [train/grad_norm], y: [gap/acc, test/loss], bootstrap: 100}}\n"
    )


def summaries(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/summary.json")}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Run the study once with a worker killed during VICTIM; returns (study, out, results, started pids)."""
    base = tmp_path_factory.mktemp("study")
    (base / "tiny.yaml").write_text(study_text())
    cwd = os.getcwd()
    os.chdir(base)
    try:
        study = load(base / "tiny.yaml")
        out = base / "out"
        tasks = commands.tasks_of(study, out)
        pids: dict[str, int] = {}

        def on_start(task, pid):
            pids[task.id] = pid
            if task.id == VICTIM:
                os.kill(pid, signal.SIGKILL)

        results = LocalEngine(workers=2, threads=1).run(tasks, on_start=on_start)
    finally:
        os.chdir(cwd)
    return study, out, {r.id: r for r in results}, pids


def test_every_run_has_a_result_and_a_summary(pool):
    study, out, results, _ = pool
    ids = [r.id for r in study.runs()]
    assert sorted(results) == sorted(ids) and len(ids) == 6
    assert sorted(summaries(out)) == sorted(ids)
    for run in study.runs():
        s = summaries(out)[run.id]
        assert s["id"] == run.id and s["axes"] == run.axes and s["seed"] == run.seed


def test_runs_train_and_workers_are_reused(pool):
    study, out, results, pids = pool
    good = [r.id for r in study.runs() if r.axes["optim"] in ("sgd", "adam") and r.id != VICTIM]
    for run_id in good:
        s = summaries(out)[run_id]
        assert s["status"] == "finished", s["error"]
        expected = {"train/loss", "train/acc", "val/acc", "test/acc", "test/loss", "gap/acc", "gap/loss"}
        assert expected <= set(s["metrics"])
        assert s["epochs"] == 2 and len(s["history"]["train/loss"]) == 2
        folder = out / "runs" / run_id
        assert list((folder / "checkpoints").glob("*.ckpt")) and list(folder.glob("events.out.tfevents.*"))
        assert (folder / "log.txt").read_text().count("Seed set to") == 1  # the run's own output, only its own
    assert len(set(pids.values())) < len(pids)  # 6 runs on 2 (+1 respawned) worker processes


def test_failed_runs_are_recorded_with_their_error_without_stopping_the_others(pool):
    _, out, results, _ = pool
    s = summaries(out)
    for seed in (0, 1):
        lr = s[f"optim=bad_lr-seed={seed}"]
        assert lr["status"] == "failed" and lr["error"].startswith("ValueError: Invalid learning rate: -1.0")
    assert results["optim=bad_lr-seed=0"].status == "failed"


def test_a_killed_worker_fails_its_run_and_is_replaced(pool):
    _, out, results, pids = pool
    s = summaries(out)[VICTIM]
    assert s["status"] == "failed" and s["error"] == "worker process died (SIGKILL)"
    assert results[VICTIM].error == "worker process died (SIGKILL)"
    order = list(pids)  # in the order the runs started
    later = [pids[run_id] for run_id in order[order.index(VICTIM) + 1 :]]
    assert later and pids[VICTIM] not in later  # the dead worker ran nothing more
    assert len(set(pids.values())) == 3  # two workers, then a new one in place of the killed one


def test_rerun_skips_finished_runs_and_continues_the_rest(pool, tmp_path):
    study, out, _, _ = pool
    before = summaries(out)
    stamps = {run_id: (out / "runs" / run_id / "summary.json").stat().st_mtime_ns for run_id in before}
    log = io.StringIO()
    cwd = os.getcwd()
    os.chdir(study.path.parent)
    try:
        code = commands.run(study, out, workers=2, stream=log)
    finally:
        os.chdir(cwd)
    after = summaries(out)
    assert code == 1  # the refused runs fail again
    for run_id, s in before.items():
        if s["status"] == "finished":
            assert after[run_id] == s
            assert (out / "runs" / run_id / "summary.json").stat().st_mtime_ns == stamps[run_id]
    assert after[VICTIM]["status"] == "finished"  # the killed run was run again
    assert "6 runs, 3 to run" in log.getvalue() and "3 skipped" in log.getvalue()
    # the pool was analysed at the end
    result = json.loads((out / "analysis.json").read_text())
    assert result["runs"] == {**result["runs"], "total": 6, "finished": 4, "left_out": 2}
    assert (out / "results.csv").is_file() and (out / "analysis.md").is_file() and (out / "study.yaml").is_file()


def test_dry_run_commands_run_by_hand_give_the_same_summaries(pool, tmp_path):
    """Fresh `python cli.py fit` processes reproduce the reused workers' runs exactly."""
    study, out, _, _ = pool
    printed = io.StringIO()
    cwd = os.getcwd()
    os.chdir(study.path.parent)
    try:
        assert commands.dry_run(study, tmp_path / "hand", stream=printed) == 0
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "hand").exists()  # a dry run writes nothing
    lines = [ln for ln in printed.getvalue().splitlines() if not ln.startswith("#")]
    assert len(lines) == 6 and all(ln.startswith("OMP_NUM_THREADS=1 FLATMINIMA_CLAIM=") for ln in lines)
    assert all(f"/claims/{run.id}.claim python " in ln for run, ln in zip(study.runs(), lines))
    chosen = [ln for ln in lines if '"run_id":"optim=adam-seed=1"' in ln or '"run_id":"optim=sgd-seed=0"' in ln]
    assert len(chosen) == 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            ["bash", "-c", ln.replace("python ", f"{shlex.quote(sys.executable)} ", 1)],
            cwd=study.path.parent,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for ln in chosen
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    hand = summaries(tmp_path / "hand")
    assert sorted(hand) == ["optim=adam-seed=1", "optim=sgd-seed=0"]
    assert (tmp_path / "hand" / "claims").is_dir() and not list((tmp_path / "hand" / "claims").iterdir())  # released
    for run_id, s in hand.items():
        worker = summaries(out)[run_id]
        assert s["status"] == worker["status"] == "finished"
        for field in ("metrics", "history", "sharpness", "epochs", "global_step", "axes", "seed", "id"):
            assert s[field] == worker[field], (run_id, field)


def test_ray_engine_runs_a_pool_and_writes_the_same_files(pool, tmp_path):
    pytest.importorskip("ray.tune", reason='the ray engine needs the extra: pip install "flatminima[ray]"')
    study, out, _, _ = pool
    (tmp_path / "ray.yaml").write_text(study_text(failing=False))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        small = load(tmp_path / "ray.yaml")
        assert len(small.runs()) == 4
        stale = tmp_path / "ray_out" / "claims" / f"{small.runs()[0].id}.claim"  # left by a process now gone
        stale.parent.mkdir(parents=True)
        stale.write_text(json.dumps({"host": "gone.example", "pid": 1, "start": 1, "boot": None, "token": "0" * 32}))
        os.utime(stale, (1.0, 1.0))
        log = io.StringIO()
        code = commands.run(small, tmp_path / "ray_out", engine="ray", workers=2, stream=log)
    finally:
        os.chdir(cwd)
    assert code == 0, log.getvalue()
    got = summaries(tmp_path / "ray_out")
    assert sorted(got) == sorted(r.id for r in small.runs())
    for run_id, s in got.items():
        assert s["status"] == "finished"
        local = summaries(out)[run_id]
        if local["status"] == "finished":  # (the killed run is finished only after the resume test)
            assert s["metrics"] == local["metrics"] and s["history"] == local["history"]  # same runs, same numbers
        folder = tmp_path / "ray_out" / "runs" / run_id
        assert (folder / "log.txt").is_file() and list(folder.glob("events.out.tfevents.*"))
    assert (tmp_path / "ray_out" / "analysis.json").is_file()
    assert "[4/4] 4 done, 0 failed, 0 left" in log.getvalue()
    assert not list((tmp_path / "ray_out" / "claims").glob("*.claim"))  # the stale claim taken over, then released


def test_a_run_over_the_timeout_is_killed_and_recorded(pool, tmp_path):
    study, _, _, _ = pool
    text = study_text(failing=False).replace("trainer.max_epochs: 2", "trainer.max_epochs: 10000")
    (tmp_path / "long.yaml").write_text(text)
    long = load(tmp_path / "long.yaml")
    task = commands.tasks_of(long, tmp_path / "out")[0]
    (result,) = LocalEngine(workers=1, timeout=3.0).run([task])
    assert result.status == "failed" and result.error == "timed out after 3 s (worker killed)"
    s = json.loads((tmp_path / "out" / "runs" / task.id / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"] == result.error and s["id"] == task.id
