"""metrics.jsonl: one JSON object a line, flushed at once so a crashed run keeps its history."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite_or_null(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({key: _finite_or_null(value) for key, value in record.items()}) + "\n")
