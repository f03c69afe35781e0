"""Claims of runs on a shared file system (cli_support/claims.py): one holder, stale claims taken over, no race.

The claims of another host are simulated by writing a claim file by hand (another host name) and setting
its mtime; a dead owner of this host is a real process killed with SIGKILL (and left a zombie first: a
zombie is dead too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from flatminima.cli_support import claims, processes

ROOT = Path(__file__).resolve().parents[1]


def other_host(token: str = "t" * 32) -> claims.Owner:
    return claims.Owner("elsewhere.example", 4242, 777, "boot", token, "study run", time.time())


def write_claim(path: Path, owner: claims.Owner, age: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(owner)))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def test_one_holder_at_a_time_and_release_frees_the_claim(tmp_path):
    path = tmp_path / "claims" / "run.claim"
    a, b = claims.Owner.this_process("a"), claims.Owner.this_process("b")  # both alive: this process
    got = claims.acquire(path, a)
    assert got.acquired and got.holder == a and got.replaced is None
    assert claims.holder(path) == a and claims.state(path) == ("live", a)
    refused = claims.acquire(path, b)
    assert not refused.acquired and refused.holder == a
    assert not claims.release(path, b) and path.exists()  # not b's to release
    assert claims.release(path, a) and not path.exists()
    assert claims.acquire(path, b).acquired
    assert [p.name for p in path.parent.iterdir()] == ["run.claim"]  # no temporary file left behind


def test_a_claim_left_by_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "run.claim"
    code = (
        "import sys, time; from cli_support import claims\n"
        f"assert claims.acquire({str(path)!r}, claims.Owner.this_process('victim')).acquired\n"
        "print('held', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout.readline().strip() == "held"
        victim = claims.holder(path)
        assert victim.pid == child.pid and victim.start == processes.start_time(child.pid)
        me = claims.Owner.this_process("me")
        assert not claims.acquire(path, me).acquired  # alive: not taken
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while processes.alive(child.pid) and time.monotonic() < deadline:  # dead, not reaped: a zombie
            time.sleep(0.01)
        got = claims.acquire(path, me)
        assert got.acquired and got.replaced == victim and claims.holder(path) == me
    finally:
        child.kill()
        child.wait()


def test_a_reused_pid_or_another_boot_does_not_keep_a_claim_alive(tmp_path):
    me = claims.Owner.this_process("me")
    for n, stale in enumerate(
        [
            replace(me, token="x" * 32, start=(me.start or 0) + 1),  # same pid, other process
            replace(me, token="y" * 32, boot="another-boot"),
        ]
    ):
        path = tmp_path / f"run{n}.claim"
        write_claim(path, stale)
        assert claims.state(path)[0] == "stale"
        got = claims.acquire(path, me)
        assert got.acquired and got.replaced == stale


def test_another_hosts_claim_is_live_while_its_heartbeat_is_fresh(tmp_path):
    path = tmp_path / "run.claim"
    far = other_host()
    write_claim(path, far, age=claims.STALE_AFTER_S - 30)
    me = claims.Owner.this_process("me")
    assert not claims.acquire(path, me).acquired
    write_claim(path, far, age=claims.STALE_AFTER_S + 30)
    got = claims.acquire(path, me)
    assert got.acquired and got.replaced == far
    # an unreadable claim (a writer that died mid-write elsewhere) counts as live while fresh
    path.write_text("")
    assert not claims.acquire(path, claims.Owner.this_process("other")).acquired
    os.utime(path, (time.time() - claims.STALE_AFTER_S - 1,) * 2)
    assert claims.acquire(path, me).acquired


def test_the_heartbeat_keeps_claims_fresh_reports_lost_ones_and_releases_on_exit(tmp_path):
    me = claims.Owner.this_process("me")
    kept, taken = tmp_path / "kept.claim", tmp_path / "taken.claim"
    with claims.Heartbeat(me, every=3600) as heartbeat:
        for path in (kept, taken):
            assert claims.acquire(path, me).acquired
            heartbeat.track(path)
            os.utime(path, (1.0, 1.0))  # as if untouched since 1970
        write_claim(taken, other_host())  # replaced while this process looked dead
        heartbeat.beat()
        assert time.time() - kept.stat().st_mtime < 60
        assert heartbeat.lost() == {taken}
    assert not kept.exists() and taken.exists()  # its own released on exit, the other's left alone


def test_racing_takers_of_one_stale_claim_leave_exactly_one_holder(tmp_path):
    """Eight threads (each its own owner) race for a stale claim, fifty times: one winner each time."""
    owners = [claims.Owner.this_process(f"t{i}") for i in range(8)]
    for round_ in range(50):
        path = tmp_path / f"run{round_}.claim"
        write_claim(path, other_host(token=f"{round_:032d}"), age=claims.STALE_AFTER_S + 10)
        barrier, won = threading.Barrier(len(owners)), []

        def race(owner, barrier=barrier, path=path, won=won):
            barrier.wait()
            if claims.acquire(path, owner).acquired:
                won.append(owner)

        threads = [threading.Thread(target=race, args=(o,)) for o in owners]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and claims.holder(path) == won[0], round_
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(path.name)) == [path.name]


def test_rank_zero_follows_the_launchers_rank_variables(monkeypatch):
    for name in claims.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert claims.rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert claims.rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not claims.rank_zero()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc (Linux)")
def test_process_identity_from_proc():
    me = os.getpid()
    assert processes.alive(me, processes.start_time(me)) and not processes.alive(me, processes.start_time(me) + 1)
    assert processes.parent_pid(me) == os.getppid()


def test_a_printed_fit_command_leaves_a_run_another_process_holds(tmp_path, monkeypatch, capsys):
    """``FLATMINIMA_CLAIM=<claim> python cli.py fit ...`` (what ``study run --dry-run`` prints) claims before training."""
    from flatminima.cli_support import app

    path = tmp_path / "claims" / "run.claim"
    other = claims.Owner.this_process("study run")  # alive: this process, another token
    assert claims.acquire(path, other).acquired
    monkeypatch.setenv(claims.CLAIM_ENV, str(path))
    monkeypatch.setattr(app, "main", lambda args=None: pytest.fail("trained a run another process holds"))
    assert app.entry(["fit", "--trainer.max_epochs=1"]) == 0
    assert f"{path}: claimed by {other.describe()}, which trains this run" in capsys.readouterr().err
    assert claims.holder(path) == other
    claims.release(path, other)
    seen = []
    monkeypatch.setattr(app, "main", lambda args=None: seen.append(claims.holder(path)))
    assert app.entry(["fit", "--trainer.max_epochs=1"]) == 0
    assert seen[0].what == "cli.py fit" and seen[0].pid == os.getpid() and not path.exists()  # held while it ran
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank other than the first never claims
    assert app.entry(["fit", "--trainer.max_epochs=1"]) == 0
    assert seen[1] is None
