"""A problem found in a data file, as a value: its kind, file, line, message and fix.

Each problem is made where it is found (the JSONL reader, the table reader, the row checks of
`formats.py`, the chat template, tokenization, the validator's rules) with its facts as fields, so
nothing downstream ever classifies or takes apart a message: the validator groups by `kind`, the
trainer lists `text()`, the run folder keeps `sentence()`. The texts are the ones users have always
seen:

    sentence()   "missing key 'completion'. Fix: every line needs 'prompt' and 'completion'"
    text()       "line 3: missing key 'completion'. Fix: ..."        (a table's unit is "row")
    located()    "data/train.jsonl line 3: missing key 'completion'. Fix: ..."

`raise_problems` turns a file's problems into one `DataFileProblems` (a `UserError` that carries
them); a file without a single row raises `EmptyDataFile`, whose one problem the validator reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, get_args

from trainer.errors import UserError

# Errors: training stops on them (or skips the row with data.on_error=skip).
ErrorKind = Literal[
    "not_utf8",  # a line's bytes are not UTF-8
    "invalid_json",  # a line is not one JSON value
    "not_an_object",  # a row is JSON but not an object
    "unknown_keys",  # a row has none of the keys of any format
    "mixed_formats",  # a row is in another format than the file
    "missing_key",  # a key of the format (or of a chat message) is missing
    "unknown_key",  # a key the format does not read
    "wrong_type",  # a value of the wrong JSON type
    "unknown_role",  # a chat message's role is not system, user or assistant
    "no_assistant_turn",  # a chat with nothing to learn
    "empty_completion",  # a completion or text that is empty
    "chat_template",  # the chat template cannot render the row usably
    "empty_file",  # the file holds no row at all
    "too_long",  # longer than max_seq_len with data.too_long=error (a warning with drop/truncate)
]
# Warnings: the seeds' rules for good data; training runs, results may suffer.
WarningKind = Literal[
    "leading_space",
    "missing_eos",
    "inconsistent_endings",
    "prompt_trailing_whitespace",
    "agent_role",
    "empty_assistant",
    "no_separator",
    "missing_separator",
    "separator_in_text",
    "duplicate",
    "conflicting_completions",
    "too_long",
    "too_few_examples",
    "test_prompt_in_data",
    "test_prompt_format",
    "chat_tokenization",
]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)
WARNING_KINDS: tuple[str, ...] = get_args(WarningKind)
KINDS = frozenset(ERROR_KINDS + WARNING_KINDS)

TABLE_SUFFIXES = (".parquet", ".arrow")


def row_unit(path: str | Path) -> str:
    """What a row number counts in this file, for messages: a table's rows, or a JSONL file's lines."""
    return "row" if Path(path).suffix.lower() in TABLE_SUFFIXES else "line"


@dataclass(frozen=True)
class Problem:
    """One error or warning in a data file. `line` is 1-based (a JSONL line or a table row), None
    for the whole file; `file` is the path as the user gave it ("" where no file is known yet)."""

    kind: ErrorKind | WarningKind
    file: str
    line: int | None
    message: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # a typo in our code, not the user's data
            raise ValueError(f"unknown problem kind {self.kind!r}: add it to trainer/data/problems.py")

    def sentence(self) -> str:
        """'message. Fix: fix' (the message alone when there is no fix)."""
        return f"{self.message}. Fix: {self.fix}" if self.fix else self.message

    def text(self, unit: str | None = None) -> str:
        """One line as training prints it: 'line N: message. Fix: fix' (`unit` defaults to the
        file's: 'row' for a table); the sentence alone for a problem of the whole file."""
        if self.line is None:
            return self.sentence()
        return f"{unit or row_unit(self.file)} {self.line}: {self.sentence()}"

    def located(self) -> str:
        """'FILE line N: message. Fix: fix', for lists that span several files."""
        return f"{self.file} {self.text()}"

    def to_dict(self) -> dict:
        """The JSON of a finding in a validation report (the report names the file once)."""
        return {"kind": self.kind, "message": self.message, "line": self.line, "fix": self.fix}


MAX_LISTED_PROBLEMS = 20


class DataFileProblems(UserError):
    """Rows of a data file that training cannot use; `problems` holds them (`Problem`s, or lines
    of text from callers outside the data layer)."""

    def __init__(self, message: str, path: str = "", problems: Sequence[Problem | str] = ()):
        super().__init__(message)
        self.path, self.problems = path, list(problems)


class EmptyDataFile(UserError):
    """The file holds not a single row; `problem` is that fact as the validator reports it."""

    def __init__(self, message: str, problem: Problem | None = None):
        super().__init__(message)
        self.problem = problem


def empty_file(path: str | Path, what: str, needs: str) -> EmptyDataFile:
    """'PATH is empty: it needs ...' as an error, carrying the same fact as a `Problem`."""
    return EmptyDataFile(f"{path} {what}: {needs}", Problem("empty_file", str(path), None, f"the file {what}", needs))


def raise_problems(path: str | Path, problems: Sequence[Problem | str]) -> None:
    """Raise one `DataFileProblems` listing `problems` ('line N: ...' each), when there are any."""
    if not problems:
        return
    texts = [p if isinstance(p, str) else p.text() for p in problems]
    shown = texts[:MAX_LISTED_PROBLEMS]
    more = len(texts) - len(shown)
    listed = "\n".join(f"  {p}" for p in shown)
    tail = f"\n  ... and {more} more" if more else ""
    noun = "problem" if len(texts) == 1 else "problems"
    raise DataFileProblems(f"{path}: {len(texts)} {noun}:\n{listed}{tail}", str(path), problems)
