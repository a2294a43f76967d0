"""Prompt/completion examples: the schema of one JSONL row, checked line by line."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from trainer.data.jsonl import raise_problems, read_jsonl

PROMPT_COMPLETION_KEYS = ("prompt", "completion")


@dataclass(frozen=True)
class Example:
    """One training example as the user wrote it, with where it came from."""

    prompt: str
    completion: str
    source: str
    line: int


def _row_problem(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object with keys 'prompt' and 'completion', got a {type(obj).__name__}"
    missing = [key for key in PROMPT_COMPLETION_KEYS if key not in obj]
    if missing:
        return f"missing key {', '.join(repr(k) for k in missing)}. Fix: every line needs \"prompt\" and \"completion\""
    unknown = sorted(set(obj) - set(PROMPT_COMPLETION_KEYS))
    if unknown:
        return f"unknown key {', '.join(repr(k) for k in unknown)}. Fix: only \"prompt\" and \"completion\" are read; remove the others"
    for key in PROMPT_COMPLETION_KEYS:
        if not isinstance(obj[key], str):
            return f"'{key}' must be a string, got {type(obj[key]).__name__}. Fix: quote the value"
    if not obj["completion"].strip():
        return "'completion' is empty: there is nothing to learn. Fix: write the ideal output, or remove the line"
    return None


def read_examples(path: str | Path) -> list[Example]:
    """Read and check a prompt/completion JSONL file; raises `UserError` listing every bad line."""
    path = Path(path)
    rows, problems = read_jsonl(path)
    examples: list[Example] = []
    for line_no, obj in rows:
        problem = _row_problem(obj)
        if problem:
            problems.append(f"line {line_no}: {problem}")
        else:
            examples.append(Example(obj["prompt"], obj["completion"], str(path), line_no))
    problems.sort(key=lambda p: int(p.split(":", 1)[0].removeprefix("line ")))
    raise_problems(path, problems)
    return examples


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one, never all), chosen by `seed`."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    valid = set(order[:held_out])
    return [e for i, e in enumerate(examples) if i not in valid], [e for i, e in enumerate(examples) if i in valid]
