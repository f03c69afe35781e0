"""Which process is which: this host and boot, a process's start time, and whether a given process still runs.

A pid alone does not name a process (pids are reused), so a process is named by its host, the boot it
runs in, its pid and its start time (Linux: ``/proc/<pid>/stat`` field 22, clock ticks since boot). On
other systems the start time is unknown and a process is alive when a signal 0 reaches it. The
standard library only.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def host() -> str:
    """This machine's host name."""
    return socket.gethostname()


@lru_cache(maxsize=1)
def boot_id() -> str | None:
    """This boot's id (Linux: ``/proc/sys/kernel/random/boot_id``), None where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), None when there is no such file."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where unknown or gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None  # field 22 of the whole line


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (Linux), None where unknown or gone."""
    fields = _stat(pid)
    return int(fields[1]) if fields is not None else None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not); with ``start``, whether it is that process.

    On Linux from ``/proc`` (a reused pid has another start time); elsewhere by a signal 0 (``start``
    then cannot be checked).
    """
    if Path("/proc/self/stat").exists():
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return start is None or int(fields[19]) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int) -> list[int]:
    """The pids of every running descendant of ``pid`` (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        ppid = parent_pid(int(entry.name))
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return [p for p in found if alive(p)]
