"""Metric sinks behind one small interface. Process 0 is the only one that writes."""

from __future__ import annotations

import json
import os
from typing import Any


class JsonlTracker:
    """Appends one JSON object per `log` call to `path` (local disk), flushed at once so a crashed run
    keeps what it logged."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullTracker:
    """What processes other than 0 use."""

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
