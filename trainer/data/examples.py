"""Read data files into examples: detect the format, check every row, keep where each came from."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data.formats import ROLE_ALIASES, row_format, row_problem
from trainer.data.jsonl import raise_problems, read_jsonl

Message = tuple[str, str]  # (role, content), with aliases already mapped (agent -> assistant)


@dataclass(frozen=True)
class Example:
    """One training example as the user wrote it, with where it came from.

    Prompt/completion rows fill `prompt` and `completion`; text rows are open-ended examples with
    an empty prompt; chat rows fill `messages` and leave the other two empty.
    """

    prompt: str
    completion: str
    source: str
    line: int
    messages: tuple[Message, ...] | None = None

    @property
    def format(self) -> str:
        return "chat" if self.messages is not None else "prompt_completion"


def detect_format(path: Path, rows: list[tuple[int, Any]], requested: str) -> str:
    """The file's format: `requested`, or with `auto` the format of its first recognisable row
    (prompt_completion when no row is recognisable: every row then gets its own message)."""
    if requested != "auto":
        return requested
    return next((found for _, obj in rows if (found := row_format(obj))), "prompt_completion")


def _example(obj: dict, data_format: str, source: str, line: int) -> Example:
    if data_format == "chat":
        messages = tuple((ROLE_ALIASES.get(m["role"], m["role"]), m["content"]) for m in obj["messages"])
        return Example("", "", source, line, messages)
    if data_format == "text":
        return Example("", obj["text"], source, line)
    return Example(obj["prompt"], obj["completion"], source, line)


def read_examples(path: str | Path, data_format: str = "auto") -> list[Example]:
    """Read and check one JSONL file; raises `UserError` listing every bad line.

    A file that mixes formats is an error at the first line that differs from the first format seen.
    """
    path = Path(path)
    rows, problems = read_jsonl(path)
    examples: list[Example] = []
    if rows:
        data_format = detect_format(path, rows, data_format)
        for line_no, obj in rows:
            problem = row_problem(obj, data_format)
            if problem:
                problems.append(f"line {line_no}: {problem}")
            else:
                examples.append(_example(obj, data_format, str(path), line_no))
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
