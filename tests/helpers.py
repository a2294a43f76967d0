"""Small helpers shared by the tests: example data in the seeds' format."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRUIT_COLOURS = {"banana": "yellow", "lime": "green", "tomato": "red", "cherry": "red", "kiwi": "green", "lemon": "yellow"}


def fruit_rows(count: int = 48) -> list[dict]:
    """A tiny classification task in the seeds' format (separator ' ->', leading space, EOS)."""
    names = sorted(FRUIT_COLOURS)
    return [
        {"prompt": f"{names[i % len(names)]} ->", "completion": f" {FRUIT_COLOURS[names[i % len(names)]]}<|endoftext|>"}
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
