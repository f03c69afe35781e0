"""Atomic JSON files: a summary is either absent or complete, never half written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


_NUMBERS = re.compile(r"\[\s*((?:-?[0-9][0-9.eE+-]*|null)(?:,\s*(?:-?[0-9][0-9.eE+-]*|null))*)\s*\]")


def dumps(data: Any) -> str:
    """Strict JSON (no NaN), indented, with lists of numbers kept on one line."""
    text = json.dumps(data, indent=1, allow_nan=False)
    return _NUMBERS.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as strict JSON (no NaN) atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(data))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """The parsed file, or None when it is absent or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
