"""The run summary's file format (``summary.json``) and its atomic JSON writing; the standard library only.

The :class:`~flatminima.callbacks.summary.RunSummary` callback writes the format and the study tool (:mod:`studies`)
reads it, both through this module, so the two agree by construction, and ``study analyze`` of a pool
trained elsewhere needs neither torch nor Lightning (this package sits below both, outside ``callbacks``,
whose ``__init__`` imports torch and Lightning).

**Non-finite numbers.** JSON has no infinity and no NaN, and ``null`` would not tell "diverged" from "not
logged". A non-finite number is therefore written as one of the strings ``"inf"``, ``"-inf"`` and
``"nan"`` (:func:`encode`, wherever it stands), and read back as a float where a summary holds numbers:
the values of ``metrics``, the third entry of each ``history`` row and each ``sharpness`` value
(:func:`decode`). Elsewhere a string stays a string: an axis value may be named ``inf``.

**Atomic files.** :func:`write_json` writes a temporary file in the target's folder, flushes and fsyncs
it, renames it over the target (``os.replace``) and fsyncs the folder: a reader sees the old file or
the new one, never half of one, also across machines sharing the file system.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any, Literal, TypedDict

Status = Literal["finished", "failed"]
NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
"""The strings that stand for non-finite numbers in a summary, and their values."""


class SharpnessValue(TypedDict):
    """One ``sharpness/*`` measurement: its key, value, epoch and global step."""

    key: str
    value: float
    epoch: int
    step: int


class Summary(TypedDict, total=False):
    """``summary.json``, as :class:`~flatminima.callbacks.summary.RunSummary` writes it (a pool from elsewhere may lack keys).

    ``metrics`` maps each key to its final value (None only in summaries written before non-finite values
    were kept); ``history`` maps each per-epoch key to ``[epoch, step, value]`` rows.
    """

    id: str
    status: Status
    error: str | None
    axes: dict[str, str]
    seed: int | None
    config: str | None
    wall_time_s: float | None
    epochs: int
    global_step: int
    threshold_epoch: int | None
    metrics: dict[str, float | None]
    sharpness: list[SharpnessValue]
    history: dict[str, list[list[float]]]


# ---------------------------------------------------------------------------------------- numbers
def encode(data: Any) -> Any:
    """``data`` with every non-finite float replaced by ``"inf"``, ``"-inf"`` or ``"nan"`` (dicts, lists, tuples)."""
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {k: encode(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [encode(v) for v in data]
    return data


def number(value: Any) -> float | None:
    """A summary's number as a float: ints and floats as they are, ``"inf"``/``"-inf"``/``"nan"`` decoded; else None."""
    if isinstance(value, str):
        return NONFINITE.get(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def decode(summary: Any) -> Any:
    """A summary read from JSON with its numbers as floats (``metrics``, ``history`` values, ``sharpness`` values).

    Anything else is returned as it is (a summary that is not a dictionary, keys it lacks, null values).
    """
    if not isinstance(summary, dict):
        return summary
    out = dict(summary)
    if isinstance(out.get("metrics"), dict):
        out["metrics"] = {k: _decoded(v) for k, v in out["metrics"].items()}
    if isinstance(out.get("history"), dict):
        out["history"] = {
            k: [[*row[:2], _decoded(row[2])] if isinstance(row, list) and len(row) == 3 else row for row in rows]
            if isinstance(rows, list)
            else rows
            for k, rows in out["history"].items()
        }
    if isinstance(out.get("sharpness"), list):
        out["sharpness"] = [
            {**m, "value": _decoded(m.get("value"))} if isinstance(m, dict) else m for m in out["sharpness"]
        ]
    return out


def _decoded(value: Any) -> Any:
    return NONFINITE[value] if isinstance(value, str) and value in NONFINITE else value


# ---------------------------------------------------------------------------------------- files
_NUMBERS = re.compile(
    r'\[\s*((?:-?[0-9][0-9.eE+-]*|null|"-?inf"|"nan")'
    r'(?:,\s*(?:-?[0-9][0-9.eE+-]*|null|"-?inf"|"nan"))*)\s*\]'
)


def dumps(data: Any) -> str:
    """Strict JSON (non-finite numbers encoded), indented, with lists of numbers kept on one line."""
    text = json.dumps(encode(data), indent=1, allow_nan=False)
    return _NUMBERS.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique across hosts too
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or a new file in it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    """The parsed file, or None when it is absent or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_summary(path: str | os.PathLike) -> Summary | None:
    """A ``summary.json`` with its numbers decoded (:func:`decode`), or None when absent, unreadable or not an object."""
    data = read_json(path)
    return decode(data) if isinstance(data, dict) else None
