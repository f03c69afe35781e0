"""Atomic JSON files: a summary is either absent or complete, never half written.

``dumps`` and ``write_json`` are the run summary's own (:mod:`callbacks.summary`), so a study's files and a
run's ``summary.json`` are written one way.
"""

from __future__ import annotations

import json
import os
from typing import Any

from callbacks.summary import dumps, write_json

__all__ = ["dumps", "write_json", "read_json"]


def read_json(path: str | os.PathLike) -> Any:
    """The parsed file, or None when it is absent or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
