"""Several processes on one study folder, and workers that die with their study process.

* Two ``python cli.py study run`` processes started together on one DIR split a pool of four tiny runs
  (moons MLP, one epoch, 200 points): each trains a disjoint share, together every run exactly once, each
  ends when the pool is done, and one of them writes the analysis. One run was left half done by a
  process that no longer exists (its claim stale, its folder holding an interrupted try's files): it is
  taken over and redone in a cleared folder.
* ``kill -9`` of a study process leaves no worker alive a second later.

The stale claim is written as plain JSON (not through the code under test), so the two-process test also
runs against a checkout without claims, where it fails: both processes train every run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatminima.cli_support import processes

ROOT = Path(__file__).resolve().parents[1]
HALF_DONE = "optim=sgd-seed=0"
pytestmark = pytest.mark.slow


def tiny_study(folder: Path) -> Path:
    """Two optimizers × two seeds: four runs of one epoch on 200 moons points."""
    path = folder / "tiny.yaml"
    path.write_text(
        f"name: tiny\nbase: [{ROOT}/configs/data/moons.yaml, {ROOT}/configs/model/mlp.yaml]\n"
        "overrides: {trainer.max_epochs: 1, data.init_args.num_samples: 200, trainer.enable_model_summary: false}\n"
        f"axes:\n  optim:\n    sgd: {ROOT}/configs/optim/sgd.yaml\n    adam: {ROOT}/configs/optim/adam.yaml\n"
        "seeds: [0, 1]\nanalysis: {x: [train/grad_norm], y: [test/loss], groups: [], bootstrap: 0}\n"
    )
    return path


def leave_half_done(out: Path) -> None:
    """HALF_DONE as a process killed in mid-run leaves it: its claim, a run.json and a stray event file."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    claim = {
        "host": socket.gethostname(),
        "pid": dead.pid,
        "start": 1,
        "boot": processes.boot_id(),
        "token": "0" * 32,
        "what": "study run",
        "since": time.time() - 60,
    }
    (out / "claims").mkdir(parents=True)
    (out / "claims" / f"{HALF_DONE}.claim").write_text(json.dumps(claim))
    folder = out / "runs" / HALF_DONE
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"id": HALF_DONE, "attempt": "interrupted"}))
    (folder / "events.out.tfevents.interrupted").write_text("half a run")


def trained(log: str) -> list[str]:
    """The runs a process trained, from its progress lines (``... | finished <id> (1.2 s)``)."""
    return re.findall(r"\| (?:finished|failed) (\S+) \(", log)


def test_two_study_run_processes_split_the_pool_and_train_each_run_once(tmp_path):
    study, out = tiny_study(tmp_path), tmp_path / "out"
    leave_half_done(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FLATMINIMA_STUDY_POLL_S": "0.3"}
    command = [sys.executable, str(ROOT / "cli.py"), "study", "run", str(study), "--out", str(out), "--workers", "1"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        for log in logs
    ]
    codes = [p.wait(timeout=300) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    shares = [trained(text) for text in texts]
    ids = sorted(p.name for p in (out / "runs").iterdir())
    assert len(ids) == 4
    assert sorted(shares[0] + shares[1]) == ids, texts  # every run once: no run in both shares, none twice
    assert shares[0] and shares[1], texts  # both processes trained
    for run_id in ids:
        assert json.loads((out / "runs" / run_id / "summary.json").read_text())["status"] == "finished"
    assert not (out / "runs" / HALF_DONE / "events.out.tfevents.interrupted").exists()  # redone in a cleared folder
    assert sum(f"{HALF_DONE}: took over the claim of" in text for text in texts) == 1
    assert not list((out / "claims").glob("*.claim"))  # every claim released
    assert any("other processes:" in text for text in texts)  # each saw the other's work
    assert sorted(("analysis: written by" in text, f"analysis: {out / 'analysis.md'} (" in text) for text in texts) == [
        (False, True),
        (True, False),
    ]  # written once, by the last one out
    assert json.loads((out / "analysis.json").read_text())["runs"]["finished"] == 4


def test_workers_die_within_a_second_of_a_killed_study_process(tmp_path):
    """By the parent-death signal alone (the watchdogs set to sleep an hour): the forkserver, then its workers."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
        "FLATMINIMA_STUDY_WATCHDOG_S": "3600",
    }
    parent = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "study_worker_script.py"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    starts: dict[int, int | None] = {}
    try:
        workers = [int(parent.stdout.readline()) for _ in range(2)]
        family = processes.descendants(parent.pid)  # the forkserver and the two workers
        starts = {pid: processes.start_time(pid) for pid in family}
        assert set(workers) <= set(family) and len(family) >= 3
        parent.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 1.0
        while any(processes.alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [p for p in family if processes.alive(p)] == []
    finally:
        parent.kill()
        parent.wait()
        for pid, start in starts.items():  # whatever is left (when the test fails), never a reused pid
            if processes.alive(pid, start):
                os.kill(pid, signal.SIGKILL)


def test_the_watchdog_alone_ends_a_process_whose_parent_is_gone():
    """The fallback where the parent-death signal is missing: a thread that checks the parent twice a second."""
    code = (
        "import os, sys, time\nfrom cli_support import processes\nfrom flatminima.studies.engines.parent_guard import watch\n"
        "ppid = os.getppid()\nwatch(ppid, processes.start_time(ppid), every=0.1)\n"
        "print('watching', flush=True)\ntime.sleep(60)\n"
    )
    middle = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {code!r}], stdout=sys.stdout)\n"
        "print(child.pid, flush=True)\ntime.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", middle],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "watching"
        assert processes.alive(child)
        parent.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while processes.alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not processes.alive(child)
    finally:
        parent.kill()
        parent.wait()


# ---------------------------------------------------------------------------------------- in one process
def test_a_claim_is_given_back_when_the_run_was_finished_meanwhile(tmp_path):
    """Between the look at the pool and the claim, another process may finish the run: it is not trained again."""
    from flatminima.cli_support import claims
    from flatminima.formats.summary import write_json
    from flatminima.studies import runner, shared
    from flatminima.studies.spec import load

    study = load(tiny_study(tmp_path))
    tasks = [runner.make_task(run, tmp_path / "out", 1, tmp_path) for run in study.runs()]
    done, todo = tasks[0], tasks[1]
    with claims.Heartbeat(claims.Owner.this_process("test"), every=3600) as heartbeat:
        ledger = shared.Ledger(tmp_path / "out", heartbeat, shared.attempts(tasks))
        write_json(runner.run_dir(done.out, done.id) / "summary.json", {"id": done.id, "status": "finished"})
        assert not ledger.acquire(done) and not ledger.path(done).exists()
        assert ledger.acquire(todo) and claims.holder(ledger.path(todo)) == heartbeat.owner
        state = shared.survey(tasks, ledger)
        assert state.finished == (done.id,) and todo not in state.pending and len(state.pending) == 2
    assert not ledger.path(todo).exists()  # released when the heartbeat ends


def test_the_analysis_is_written_once_for_the_same_runs(tmp_path):
    from flatminima.cli_support import claims
    from flatminima.formats.summary import read_json, write_json
    from flatminima.studies import shared

    write_json(tmp_path / "runs" / "a" / "summary.json", {"id": "a", "status": "finished"})
    written = []
    first, second = claims.Owner.this_process("first"), claims.Owner.this_process("second")
    start = read_json(shared.analysis_stamp(tmp_path))  # both processes started before any analysis
    assert shared.analyze_once(tmp_path, first, start, lambda: written.append("first"), sys.stderr)
    assert not shared.analyze_once(tmp_path, second, start, lambda: written.append("second"), sys.stderr)
    later = read_json(shared.analysis_stamp(tmp_path))  # a command started after it analyses again
    assert shared.analyze_once(tmp_path, second, later, lambda: written.append("later"), sys.stderr)
    write_json(tmp_path / "runs" / "b" / "summary.json", {"id": "b", "status": "finished"})
    assert shared.analyze_once(tmp_path, first, start, lambda: written.append("new runs"), sys.stderr)
    assert written == ["first", "later", "new runs"]
