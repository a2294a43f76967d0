"""Read data files into examples: detect the format, check every row, keep where each came from.

`read_file` is the whole story for one file: rows (JSONL, parquet or arrow) -> the file's format ->
the row checks of `formats.py` -> examples, plus the rows it skipped (`on_error: skip`) and warnings
(e.g. the role `agent`, read as `assistant`). `read_examples` is the short form that only returns
the examples and raises on any invalid row. `examples_at` gives a few of the examples `read_file`
gives without parsing the whole file (the self-test's first batch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence, TypeVar

from trainer.data.formats import ROLE_ALIASES, row_format, row_problem
from trainer.data.problems import Problem, raise_problems, row_unit
from trainer.data.readers import read_rows, read_rows_at

Message = tuple[str, str]  # (role, content), with aliases already mapped (agent -> assistant)
MAX_LISTED_LINES = 5


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


@dataclass(frozen=True)
class SkippedLine:
    """An invalid line left out of training with `data.on_error: skip` (the run folder lists them)."""

    problem: Problem

    @property
    def source(self) -> str:
        return self.problem.file

    @property
    def line(self) -> int:
        return self.problem.line

    @property
    def message(self) -> str:
        """What is wrong and the fix, as one sentence."""
        return self.problem.sentence()

    def to_json(self) -> dict:
        return {"file": self.source, "line": self.line, "message": self.message}


@dataclass
class FileData:
    """What reading one file gave: its examples, the lines skipped as invalid, and warnings to show."""

    path: str
    format: str
    examples: list[Example]
    skipped: list[SkippedLine] = field(default_factory=list)
    alias_lines: list[int] = field(default_factory=list)
    """Chat lines that use a role alias (`agent`), read as `assistant`."""

    @property
    def warnings(self) -> list[str]:
        return [alias_warning(self.path, self.alias_lines)] if self.alias_lines else []


def listed_lines(lines: list[int], unit: str = "line") -> str:
    """'lines 3, 7, 9 and 12 more': a short pointer into a file for a warning."""
    shown = ", ".join(str(n) for n in lines[:MAX_LISTED_LINES])
    more = f" and {len(lines) - MAX_LISTED_LINES} more" if len(lines) > MAX_LISTED_LINES else ""
    return f"{unit}{'s' if len(lines) > 1 else ''} {shown}{more}"


def detect_format(path: Path, rows: list[tuple[int, Any]], requested: str) -> str:
    """The file's format: `requested`, or with `auto` the format of its first recognisable row
    (prompt_completion when no row is recognisable: every row then gets its own message)."""
    if requested != "auto":
        return requested
    return next((found for _, obj in rows if (found := row_format(obj))), "prompt_completion")


def example_of(obj: dict, data_format: str, source: str, line: int) -> Example:
    """The example a valid row (one that passed `row_problem`) of a file in `data_format` holds."""
    if data_format == "chat":
        messages = tuple((ROLE_ALIASES.get(m["role"], m["role"]), m["content"]) for m in obj["messages"])
        return Example("", "", source, line, messages)
    if data_format == "text":
        return Example("", obj["text"], source, line)
    return Example(obj["prompt"], obj["completion"], source, line)


def _uses_alias(obj: dict) -> bool:
    return any(m["role"] in ROLE_ALIASES for m in obj["messages"])


def alias_warning(path: str | Path, lines: list[int]) -> str:
    """The warning for chats that say `agent` (seed 000 does): accepted, but not a standard role."""
    aliases = " or ".join(repr(alias) for alias in ROLE_ALIASES)
    verb = "use" if len(lines) > 1 else "uses"
    return (
        f"{path}: {listed_lines(lines, row_unit(path))} {verb} the role {aliases}, read as 'assistant'. "
        'Fix: write "assistant" (the role chat templates know)'
    )


def read_file(path: str | Path, data_format: str = "auto", *, on_error: str = "error") -> FileData:
    """Read and check one file (JSONL, or a local parquet / arrow table).

    With `on_error="error"` any invalid row raises one `UserError` listing every bad line; with
    `"skip"` the bad lines are left out and returned in `skipped` (a file with no valid line still
    raises). A file that mixes formats is a problem at each line that differs from the first format
    seen.
    """
    path = Path(path)
    rows, problems = read_rows(path)
    return _file_data(path, rows, problems, data_format, on_error)


def _file_data(path: Path, rows: list, problems: list[Problem], data_format: str, on_error: str) -> FileData:
    """`read_file` after the read: the file's format, each row checked, the examples."""
    examples: list[Example] = []
    alias_lines: list[int] = []
    data_format = detect_format(path, rows, data_format) if rows else data_format
    for number, obj in rows:
        problem = row_problem(obj, data_format, file=str(path), line=number)
        if problem:
            problems.append(problem)
            continue
        examples.append(example_of(obj, data_format, str(path), number))
        if data_format == "chat" and _uses_alias(obj):
            alias_lines.append(number)
    problems.sort(key=lambda p: p.line)
    if problems and (on_error == "error" or not examples):
        raise_problems(path, problems)
    skipped = [SkippedLine(problem) for problem in problems]
    return FileData(str(path), data_format, examples, skipped, alias_lines)


def examples_at(path: str | Path, lines: Collection[int], data_format: str = "auto") -> dict[int, Example]:
    """The valid examples at `lines` of a file (rows of a table), by line, as `read_file` gives them,
    parsing those lines alone (`read_rows_at`: a JSONL file is read up to the last of them). For
    lines that training read as valid (the self-test's first batch): with `auto`, the format
    detected from them is the file's, since each valid line is in the file's format."""
    path = Path(path)
    rows, _ = read_rows_at(path, lines)
    data_format = detect_format(path, rows, data_format) if rows else data_format
    return {
        number: example_of(obj, data_format, str(path), number)
        for number, obj in rows
        if row_problem(obj, data_format) is None
    }


def read_examples(path: str | Path, data_format: str = "auto", *, on_error: str = "error") -> list[Example]:
    """Read and check one file; raises `UserError` listing every bad line (see `read_file`)."""
    return read_file(path, data_format, on_error=on_error).examples


T = TypeVar("T")


def split_validation(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `fraction` of the examples (at least one, never all), chosen by `seed`; both parts
    keep the file order. Works on any sequence (the pipeline splits row indices)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    valid = set(order[:held_out])
    return [e for i, e in enumerate(examples) if i not in valid], [e for i, e in enumerate(examples) if i in valid]
