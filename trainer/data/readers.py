"""Read one data file into numbered rows, whatever its container: JSONL, parquet or arrow.

Every reader returns the same thing, `(rows, problems)`: rows are `(number, object)` with 1-based
numbers (the line of a JSONL file, the row of a table), and problems are the `Problem`s of rows
that could not even be parsed. The row checks of `formats.py` then run on every row alike, so a
parquet file gets exactly the messages a JSONL file gets.

`read_rows` reads through `reads.py`: a file this process already read (unchanged since) is not
read again, and its SHA-256 comes from the same pass.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Collection

from trainer.data import reads
from trainer.data.jsonl import read_jsonl, read_jsonl_lines, require_files
from trainer.data.problems import TABLE_SUFFIXES, Problem, empty_file, row_unit  # noqa: F401 - public here too
from trainer.errors import UserError


def _without_nulls(value: Any) -> Any:
    """A table gives every row every column, null where the row has none. A null is a missing key
    (so a prompt/completion row of a mixed table is not 'unknown key text'), also inside messages."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _read_arrow_table(path: Path):
    """An arrow file as `datasets` writes it (IPC stream, e.g. `save_to_disk`), or an IPC/Feather file."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(path)).data.table
    except (pa.ArrowInvalid, OSError):
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def _read_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        return _read_arrow_table(path)
    except (pa.ArrowException, OSError) as err:
        kind = path.suffix.lower().lstrip(".")
        raise UserError(
            f"{path} is not a readable {kind} file ({err}). Fix: re-export it as {kind}, or convert it to JSONL "
            "(one JSON object a line)"
        ) from None


def read_table_rows(path: str | Path) -> list[tuple[int, Any]]:
    """Rows of a local parquet or arrow file as dicts, numbered from 1. Raises `UserError` when the file
    is missing, unreadable or empty."""
    path = Path(path)
    require_files([path])
    table = _read_table(path)
    if table.num_rows == 0:
        raise empty_file(
            path, "has no rows", "it needs one example a row, with columns prompt and completion, or messages, or text"
        )
    return [(number, _without_nulls(row)) for number, row in enumerate(table.to_pylist(), start=1)]


def read_rows_at(path: str | Path, numbers: Collection[int]) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Only the rows `numbers` of a data file (those that exist), each parsed as `read_rows` parses
    it: a JSONL file is read up to the last of them and only their lines parsed; a table is opened
    (memory-mapped) and only those rows converted. For rows read before: nothing is kept or hashed."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        return read_jsonl_lines(path, numbers)
    table = _read_table(path)
    present = sorted(n for n in set(numbers) if 1 <= n <= table.num_rows)
    rows = table.take([n - 1 for n in present]).to_pylist()
    return [(number, _without_nulls(row)) for number, row in zip(present, rows)], []


def read_rows(path: str | Path, *, keep: bool = False) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Numbered rows of a data file, and the rows that could not be parsed (JSONL only: a table's
    rows are always well-formed). Parquet and arrow files are recognised by their suffix; any other
    name is read as JSONL.

    The file is read once per process while it stays unchanged (`reads.py`): this call takes the
    rows an earlier `keep=True` call left, and with `keep=True` leaves its own for the next call
    (the trainer's preflight keeps them for tokenization). The caller may change neither."""
    path = Path(path)
    kept = reads.take_rows(path)
    if kept is not None:
        rows, problems = kept
        # The same file, perhaps spelled otherwise ("./a.jsonl"): problems name it as this caller does.
        problems = [p if p.file == str(path) else replace(p, file=str(path)) for p in problems]
    elif path.suffix.lower() in TABLE_SUFFIXES:
        # pyarrow reads the table itself (memory-mapped); its digest is a separate read.
        rows, problems = read_table_rows(path), []
    else:
        require_files([path])  # before its size and mtime are asked for
        rows, problems = reads.read_and_hash(path, lambda digest: read_jsonl(path, digest))
    if keep:
        reads.keep_rows(path, (rows, problems))
    return rows, list(problems)  # a copy: callers add their own problems to it
