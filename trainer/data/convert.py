"""Convert a CSV or TSV table into JSONL rows in the trainer's formats.

Columns map to `prompt` and `completion`, or to chat roles (`system`, `user`, `assistant`). The
seeds' conventions can be added on the way: a fixed separator at the end of every prompt, a
leading space and `<|endoftext|>` on every completion. Quotes, commas and newlines inside quoted
CSV fields survive, because the `csv` module parses the table (never a split on commas).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.data.fixes import end_with_eos
from trainer.errors import UsageError, UserError

DELIMITERS_BY_SUFFIX = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescape(text: str) -> str:
    r"""Shell-typed escapes (`\n`, `\t`, `\r`, `\\`) as the characters they stand for, so
    `--separator "\n\n###\n\n"` means newlines. Nothing else changes (non-ASCII text is safe)."""
    return re.sub(r"\\[ntr\\]", lambda m: _ESCAPES[m.group(0)], text)


@dataclass(frozen=True)
class ConvertOptions:
    """How table columns become rows. Chat when `user_column` or `assistant_column` is set."""

    prompt_column: str = "prompt"
    completion_column: str = "completion"
    user_column: str | None = None
    assistant_column: str | None = None
    system: str | None = None
    """A fixed system message for every chat."""
    system_column: str | None = None
    separator: str = ""
    """Appended to every prompt that does not already end with it."""
    add_eos: bool = False
    """Append `<|endoftext|>` to every completion that does not already end with it."""
    leading_space: bool = False
    """Start every completion that does not start with whitespace with a space."""
    delimiter: str | None = None
    """Field delimiter; default from the suffix (.csv comma, .tsv/.tab tab)."""
    encoding: str = "utf-8-sig"

    @property
    def chat(self) -> bool:
        return self.user_column is not None or self.assistant_column is not None


def _delimiter(path: Path, options: ConvertOptions) -> str:
    if options.delimiter is not None:
        delimiter = unescape(options.delimiter)
        if len(delimiter) != 1:
            raise UsageError(f"--delimiter must be one character, got {options.delimiter!r} (e.g. ',' or '\\t')")
        return delimiter
    try:
        return DELIMITERS_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise UsageError(
            f"cannot tell the delimiter of {path} from its extension {path.suffix!r}: "
            "name it .csv or .tsv, or pass --delimiter ',' (or '\\t', ';', ...)"
        ) from None


def _completion(text: str, options: ConvertOptions) -> str:
    if options.leading_space and not text[:1].isspace():
        text = " " + text
    if options.add_eos:
        text = end_with_eos(text)  # as `validate --fix` does: no spaces kept before the EOS
    return text


def _prompt(text: str, options: ConvertOptions) -> str:
    return text if text.endswith(options.separator) else text + options.separator


def _needed_columns(options: ConvertOptions) -> list[tuple[str, str]]:
    """(option name, column) for every column the options read."""
    if options.chat:
        if options.user_column is None or options.assistant_column is None:
            raise UsageError("chat conversion needs both --user-column and --assistant-column")
        if options.system is not None and options.system_column is not None:
            raise UsageError("give either --system (one text for every chat) or --system-column, not both")
        if options.separator or options.add_eos or options.leading_space:
            raise UsageError(
                "--separator, --add-eos and --leading-space are for prompt/completion rows: in chat rows the chat "
                "template marks where each turn starts and ends"
            )
        named = [("--user-column", options.user_column), ("--assistant-column", options.assistant_column)]
        return named + ([("--system-column", options.system_column)] if options.system_column else [])
    return [("--prompt-column", options.prompt_column), ("--completion-column", options.completion_column)]


def _row(record: dict[str, str], options: ConvertOptions) -> dict:
    if not options.chat:
        return {
            "prompt": _prompt(record[options.prompt_column], options),
            "completion": _completion(record[options.completion_column], options),
        }
    messages = []
    system = record[options.system_column] if options.system_column else options.system
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": record[options.user_column]})
    messages.append({"role": "assistant", "content": record[options.assistant_column]})
    return {"messages": messages}


def convert_table(path: str | Path, options: ConvertOptions = ConvertOptions()) -> list[dict]:
    """The rows of a CSV/TSV file (first line: column names) as JSONL-ready dicts.

    Raises `UserError` naming the existing columns when a requested one is missing, and naming
    the lines (as in a text editor) whose number of fields differs from the header.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} does not exist: check the path (relative paths start at {Path.cwd()})")
    delimiter = _delimiter(path, options)
    needed = _needed_columns(options)
    try:
        with path.open(newline="", encoding=options.encoding) as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, strict=True)
            columns = reader.fieldnames or []
            if not columns:
                raise UserError(f"{path} is empty: its first line must name the columns (e.g. prompt,completion)")
            missing = [(flag, column) for flag, column in needed if column not in columns]
            if missing:
                flag, column = missing[0]
                raise UserError(
                    f"{path} has no column {column!r} (asked for by {flag}); its columns are "
                    f"{', '.join(repr(c) for c in columns)}. Fix: pass {flag} with one of them"
                )
            rows, problems = [], []
            start = reader.line_num + 1
            for record in reader:
                # A quoted field may span lines: name the line where the record starts.
                if None in record or any(value is None for value in record.values()):
                    problems.append(
                        f"line {start}: expected {len(columns)} fields like the header, got "
                        f"{len(columns) + len(record.get(None) or []) - sum(v is None for v in record.values())}. "
                        "Fix: quote fields that contain the delimiter"
                    )
                else:
                    rows.append(_row(record, options))
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not {options.encoding.removesuffix('-sig').upper()} text (byte 0x{err.object[err.start]:02x}). "
            "Fix: re-save it as UTF-8 ('Save as... UTF-8' in your editor), or pass --encoding cp1252 "
            "(or the file's encoding)"
        ) from None
    except csv.Error as err:
        raise UserError(
            f"{path} line {reader.line_num}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({err}). "
            "Fix: close every quoted field"
        ) from None
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        raise UserError(f"{path}: {len(problems)} malformed rows:\n{shown}")
    return rows
