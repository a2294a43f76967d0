"""Read each data file once per process: its SHA-256, and its parsed rows for the next reader.

A start needs every data file three times: the preflight checks its rows, the resume check and
the tokenized-data cache need its SHA-256, and a cache miss tokenizes its rows. Here those share
one pass: reading a JSONL file hashes the same bytes (`read_and_hash`), and the preflight leaves
the parsed rows (`keep_rows`) that the pipeline then takes (`take_rows`) on a cache miss or drops
(`drop_rows`) on a hit. Both are keyed by the file's resolved path, size and modification time, so
a file changed in between is read afresh, never answered from memory.

Kept rows cost memory from the preflight until the pipeline takes them (the data stage then
holds them anyway); digests are 64 characters each and stay for the process's life.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
FileKey = tuple[str, int, int]  # (resolved path, size in bytes, mtime in ns)

_DIGESTS: dict[FileKey, str] = {}
_ROWS: dict[FileKey, Any] = {}


def file_key(path: str | Path) -> FileKey:
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def file_digest(path: str | Path, chunk_size: int = 1 << 24) -> str:
    """SHA-256 of the file's bytes, hashed at most once per process while its size and mtime stay
    the same (the read that parsed it may have hashed it already)."""
    key = file_key(path)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def read_and_hash(path: str | Path, read: Callable[[Any], T]) -> T:
    """`read(digest)`, where `read` feeds every byte of the file to `digest` as it reads it; the
    digest is remembered when the file did not change during the read."""
    before = file_key(path)
    digest = hashlib.sha256()
    result = read(digest)
    if file_key(path) == before:
        _DIGESTS[before] = digest.hexdigest()
    return result


def keep_rows(path: str | Path, rows: Any) -> None:
    """Leave `rows` (what a reader returned) for the next reader of this unchanged file."""
    _ROWS[file_key(path)] = rows


def take_rows(path: str | Path) -> Any | None:
    """The rows kept for this file, handed over once (None when none are kept, or the file changed)."""
    try:
        key = file_key(path)
    except OSError:
        return None  # missing: the reader says so
    return _ROWS.pop(key, None)


def drop_rows(path: str | Path) -> None:
    """Forget the rows kept for this file (its tokens came from the cache: they are not needed)."""
    try:
        _ROWS.pop(file_key(path), None)
    except OSError:
        pass


def forget_all() -> None:
    """Forget every digest and kept rows (tests; a long-lived process that rewrites files in place)."""
    _DIGESTS.clear()
    _ROWS.clear()
