"""Exclusive claims of a path on a shared file system: one owner at a time, a dead owner's claim taken over.

A claim is a small JSON file naming its owner: host, boot, pid, the process's start time (a pid alone is
reused), a random token and what it is (``study run``, ``cli.py fit``). The study tool claims each run
(``DIR/claims/<id>.claim``) before training it, so several processes, on one machine or on several that
share DIR, split a pool between them and train each run once.

* **Acquire**: the file is written under a temporary name and hard-linked to the claim's name
  (``os.link`` fails when the name exists, atomically, also over NFS), so a claim is never seen half
  written; where hard links are refused, ``O_CREAT | O_EXCL`` does the same.
* **Live or stale**: a claim of this host is live while its owner runs (pid and start time, same boot);
  a claim of another host is live while its heartbeat is fresh: the owner touches its claims every
  :data:`HEARTBEAT_S` seconds (the file's mtime), and a claim untouched for :data:`STALE_AFTER_S` seconds
  is stale. A claim that cannot be read is live while fresh. Hosts sharing a file system need clocks
  within a fraction of :data:`STALE_AFTER_S` of each other (NTP), and distinct host names.
* **Take over**: a stale claim is replaced only by the process that first creates the marker
  ``<claim>.takeover-<digest of the stale content>`` (itself a claim, so a taker that dies is taken over
  in turn); under the marker the claim is read again and replaced (``os.replace``) only if it still
  holds the stale content. Two takers never both succeed: the marker excludes them from each other, and
  the second reads the first's claim, live.
* **Release**: the owner removes its claim (checked to be its own first).

An owner paused for longer than :data:`STALE_AFTER_S` on another host (its heartbeat stopped) may find
its claim taken over when it resumes: :meth:`Heartbeat.lost` lists those claims, whose work the owner
must stop. The standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from . import processes

HEARTBEAT_S = 30.0
"""Seconds between two touches of a live owner's claims."""
STALE_AFTER_S = 300.0
"""Seconds without a touch after which another host's claim is stale (``FLATMINIMA_CLAIM_STALE_S`` overrides)."""
CLAIM_ENV = "FLATMINIMA_CLAIM"
"""The environment variable that makes ``python cli.py fit`` claim a path while it trains (see :func:`held`)."""
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: a process named by host, boot, pid and start time, with a random token."""

    host: str
    pid: int
    start: int | None
    boot: str | None
    token: str
    what: str = ""
    since: float = 0.0

    @classmethod
    def this_process(cls, what: str) -> Owner:
        """This process, with a new token."""
        pid = os.getpid()
        return cls(
            processes.host(), pid, processes.start_time(pid), processes.boot_id(), uuid.uuid4().hex, what, time.time()
        )

    def describe(self) -> str:
        """``host:pid (what, since HH:MM:SS)``."""
        since = time.strftime("%H:%M:%S", time.localtime(self.since)) if self.since else "?"
        return f"{self.host}:{self.pid} ({self.what or 'unknown'}, since {since})"


@dataclass(frozen=True)
class Outcome:
    """The result of :func:`acquire`: whether this owner holds the claim, who does, and whom it replaced."""

    acquired: bool
    holder: Owner | None
    replaced: Owner | None = None


def stale_after() -> float:
    """:data:`STALE_AFTER_S`, or ``FLATMINIMA_CLAIM_STALE_S`` when set."""
    text = os.environ.get("FLATMINIMA_CLAIM_STALE_S")
    return float(text) if text else STALE_AFTER_S


# ---------------------------------------------------------------------------------------- reading
def _read(path: Path) -> tuple[bytes, float] | None:
    """The claim's bytes and mtime, None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> Owner | None:
    try:
        data = json.loads(raw.decode("utf-8"))
        return Owner(
            **{k: data[k] for k in ("host", "pid", "start", "boot", "token")},
            what=data.get("what", ""),
            since=float(data.get("since", 0.0)),
        )
    except (ValueError, KeyError, TypeError):
        return None


def holder(path: str | os.PathLike) -> Owner | None:
    """The owner named in the claim at ``path``, None when there is none (or it cannot be read)."""
    found = _read(Path(path))
    return _parse(found[0]) if found is not None else None


def is_live(owner: Owner | None, mtime: float, now: float | None = None, stale: float | None = None) -> bool:
    """Whether a claim by ``owner`` (None: unreadable) whose file was last touched at ``mtime`` is live."""
    now = time.time() if now is None else now
    stale = stale_after() if stale is None else stale
    if owner is not None and owner.host == processes.host():
        this_boot = processes.boot_id()
        if owner.boot is not None and this_boot is not None and owner.boot != this_boot:
            return False  # a claim from before a reboot
        if processes.start_time(os.getpid()) is not None:  # the start time is known here: pid and start decide
            return processes.alive(owner.pid, owner.start)
        return processes.alive(owner.pid) and now - mtime < stale
    return now - mtime < stale


def state(path: str | os.PathLike) -> tuple[str, Owner | None]:
    """``("free", None)``, ``("live", owner)`` or ``("stale", owner)`` (owner None when unreadable)."""
    found = _read(Path(path))
    if found is None:
        return "free", None
    owner = _parse(found[0])
    return ("live" if is_live(owner, found[1]) else "stale"), owner


# ---------------------------------------------------------------------------------------- writing
def _content(owner: Owner) -> bytes:
    return (json.dumps(asdict(owner), indent=1) + "\n").encode("utf-8")


def _temporary(path: Path, owner: Owner) -> Path:
    tmp = path.with_name(f".{path.name}.{owner.token[:12]}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(_content(owner))
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _create(path: Path, owner: Owner) -> bool:
    """Create the claim file with ``owner``'s content if no file has its name; True when created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, owner)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:  # no hard links here: exclusive creation instead (content written just after)
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(_content(owner))
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire(path: str | os.PathLike, owner: Owner, stale: float | None = None) -> Outcome:
    """Claim ``path`` for ``owner``: create it, or take it over when its holder is gone; never two holders."""
    path = Path(path)
    for _ in range(1000):
        if _create(path, owner):
            return Outcome(True, owner)
        found = _read(path)
        if found is None:
            continue  # released in between: try again
        raw, mtime = found
        current = _parse(raw)
        if current is not None and current.token == owner.token:
            return Outcome(True, owner)  # already ours
        if is_live(current, mtime, stale=stale):
            return Outcome(False, current)
        if _take_over(path, raw, owner, stale):
            return Outcome(True, owner, current)
    raise RuntimeError(f"{path}: could not settle the claim (it changed hands 1000 times)")


def _take_over(path: Path, raw: bytes, owner: Owner, stale: float | None) -> bool:
    """Replace the stale claim whose content is ``raw`` by ``owner``'s, if no other taker got there first."""
    marker = path.with_name(f"{path.name}.takeover-{hashlib.sha256(raw).hexdigest()[:16]}")
    if not acquire(marker, owner, stale).acquired:
        return False  # another process is taking it over (or took it)
    try:
        found = _read(path)
        if found is None or found[0] != raw:
            return False  # it changed since it was read: released, or taken over by someone else
        tmp = _temporary(path, owner)
        os.replace(tmp, path)
        return True
    finally:
        release(marker, owner)


def release(path: str | os.PathLike, owner: Owner) -> bool:
    """Remove ``owner``'s claim at ``path``; False (and nothing removed) when it is not ``owner``'s."""
    current = holder(path)
    if current is None or current.token != owner.token:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def touch(path: str | os.PathLike, owner: Owner) -> bool:
    """Refresh ``owner``'s claim at ``path`` (its mtime); False when the claim is not, or no longer, ``owner``'s."""
    current = holder(path)
    if current is None or current.token != owner.token:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)
        return True
    return False


# ---------------------------------------------------------------------------------------- heartbeat
@dataclass
class Heartbeat:
    """A thread touching ``owner``'s claims every ``every`` seconds; on exit, the claims still held are released.

    ``track``/``untrack`` name the claims to keep alive; a tracked claim found no longer ``owner``'s is
    reported by :meth:`lost`.
    """

    owner: Owner
    every: float = HEARTBEAT_S
    _paths: set[Path] = field(default_factory=set)
    _lost: set[Path] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            held = list(self._paths)
            self._paths.clear()
        for path in held:
            release(path, self.owner)

    def track(self, path: str | os.PathLike) -> None:
        """Keep the claim at ``path`` alive (and release it on exit)."""
        with self._lock:
            self._paths.add(Path(path))

    def untrack(self, path: str | os.PathLike) -> None:
        """Stop touching ``path``."""
        with self._lock:
            self._paths.discard(Path(path))
            self._lost.discard(Path(path))

    def lost(self) -> set[Path]:
        """Tracked claims found taken over by another process (this one was presumed dead)."""
        with self._lock:
            return set(self._lost)

    def beat(self) -> None:
        """Touch every tracked claim once."""
        with self._lock:
            paths = list(self._paths)
        for path in paths:
            current = holder(path)
            if current is None:
                continue  # released (by whoever claimed it in this owner's name, e.g. a Ray trial)
            if current.token != self.owner.token:
                with self._lock:
                    if path in self._paths:
                        self._lost.add(path)
            else:
                touch(path, self.owner)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()


# ---------------------------------------------------------------------------------------- one command
def rank_zero() -> bool:
    """Whether this process is the first of its launch (no rank variable of a launcher says otherwise)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


@contextlib.contextmanager
def held(path: str | os.PathLike, what: str) -> Iterator[Outcome]:
    """Hold the claim at ``path`` for this process while the block runs (heartbeat included), then release it.

    Yields the :class:`Outcome`; when it is not ``acquired``, the block must not do the claimed work.
    """
    owner = Owner.this_process(what)
    outcome = acquire(path, owner)
    if not outcome.acquired:
        yield outcome
        return
    with Heartbeat(owner) as heartbeat:
        heartbeat.track(path)
        yield outcome
