"""JSONL files: read into (line number, object) rows, reporting every broken line at once (or only
the lines asked for); write.

Problems are collected rather than raised one by one, so a user fixes a file in one pass. Each is
a `Problem` (kind, file, line, message, fix) made here, where it is found; `raise_problems` lists
them as one error naming the file and each line, with the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Iterator

from trainer.data.problems import Problem, empty_file, raise_problems  # noqa: F401 - raise_problems: public here too
from trainer.errors import UserError


def require_files(paths) -> None:
    """Every data path must be an existing file; say which are not, all at once."""
    problems = [
        f"{p} is a folder, not a file" if Path(p).is_dir() else f"{p} does not exist"
        for p in paths
        if not Path(p).is_file()
    ]
    if problems:
        raise UserError(
            f"data file {'; '.join(problems)}. Fix: give the path of a data file (relative paths start at {Path.cwd()})"
        )


def _guess_encoding(raw: bytes) -> str:
    """Name the likely encoding of bytes that are not UTF-8 (a hint for the fix, not a guarantee)."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    try:
        raw.decode("cp1252")
        return "Windows-1252 (or Latin-1)"
    except UnicodeDecodeError:
        return "an unknown 8-bit encoding"


# Byte-order marks of the encodings that are not UTF-8 (UTF-32 first: its little-endian mark starts
# with UTF-16's). `iconv` knows each by this name and reads the mark to tell the byte order.
BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


class NotUtf8File(UserError):
    """The whole file is in another Unicode encoding (it starts with that encoding's byte-order mark)."""

    def __init__(self, message: str, path: str = "", encoding: str = ""):
        super().__init__(message)
        self.path, self.encoding = path, encoding


def refuse_other_unicode(path: Path) -> None:
    """A UTF-16 or UTF-32 file (Windows tools save 'Unicode' text so) would get an error for every
    line, none of which names the cause; say once what the file is and how to convert it."""
    with path.open("rb") as handle:
        head = handle.read(4)
    encoding = next((name for mark, name in BYTE_ORDER_MARKS if head.startswith(mark)), None)
    if encoding is None:
        return
    converted = f"{path.stem}-utf8{path.suffix}"
    raise NotUtf8File(
        f"{path} is {encoding} text (it starts with the {encoding} byte-order mark), not UTF-8. Fix: convert it, "
        f"e.g. `iconv -f {encoding} -t UTF-8 {path} > {converted}`, or 'Save as... UTF-8' in your editor",
        path=str(path),
        encoding=encoding,
    )


def refuse_json_array(path: Path) -> None:
    """A JSON array (`[{...}, {...}]`, often pretty-printed) given where JSON Lines belong would get
    an error for nearly every line; say once what the file is and how to convert it."""
    with path.open("rb") as handle:
        head = handle.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return
    first_line = head.split(b"\n", 1)[0].strip()
    try:
        document = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        document = None
    array_of_objects = isinstance(document, list) and document and all(isinstance(item, dict) for item in document)
    if array_of_objects or first_line == b"[":
        converted = f"{path.stem}-lines.jsonl"
        count = f" of {len(document)} items" if isinstance(document, list) else ""
        raise UserError(
            f"{path} is one JSON array{count}, not JSON Lines (one JSON object per line). Fix: convert it, e.g. "
            '`python -c "import json,sys; '
            '[print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1]))]" '
            f"{path} > {converted}` or `jq -c '.[]' {path} > {converted}`"
        )


def parse_line(path: Path, line_no: int, raw: bytes) -> tuple[int, Any] | Problem | None:
    """One raw line of a JSONL file as every reader parses it: the row `(line_no, object)`, the
    `Problem` of a line that is not UTF-8 or not JSON, or None for a blank line."""
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark is harmless; drop it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Problem(
            "not_utf8",
            str(path),
            line_no,
            f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8 "
            f"(the file looks like {_guess_encoding(raw)})",
            f"re-save the file as UTF-8, e.g. `iconv -f CP1252 -t UTF-8 {path.name} > fixed.jsonl` "
            "or 'Save as... UTF-8' in your editor",
        )
    if not text.strip():
        return None
    try:
        # Without its line ending: an object cut short is reported at its last column, not at
        # "column 1" of the next line.
        return line_no, json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        return Problem(
            "invalid_json",
            str(path),
            line_no,
            f"invalid JSON ({err.msg} at column {err.colno})",
            "each line must be one complete JSON object; check quotes, commas and escaped newlines (\\n)",
        )


def iter_jsonl(path: str | Path, digest=None) -> Iterator[tuple[int, Any] | Problem]:
    """Each non-blank line of `path` parsed (`parse_line`), as it is read: a caller that stops
    early reads no further. Raises `UserError` as `read_jsonl` does (a missing or empty file, a
    whole file of another kind); `digest` is fed every byte read."""
    path = Path(path)
    require_files([path])
    refuse_other_unicode(path)
    refuse_json_array(path)
    found = False
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if digest is not None:
                digest.update(raw)
            parsed = parse_line(path, line_no, raw)
            if parsed is not None:
                found = True
                yield parsed
    if not found:
        raise empty_file(
            path,
            "is empty",
            'it needs one JSON object per line, e.g. {"prompt": "banana ->", "completion": " yellow<|endoftext|>"}',
        )


def read_jsonl(path: str | Path, digest=None) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Parse every non-blank line of `path` as JSON; line numbers are 1-based.

    Returns the parsed rows and a `Problem` for each line that is not UTF-8 or not JSON, so the
    caller can report them together with its own checks. Raises `UserError` if the file is missing,
    holds no line at all (`EmptyDataFile`), or is a whole file of another kind (UTF-16/UTF-32, one
    JSON array) that would otherwise get an error for every line. `digest` (a `hashlib` object),
    when given, is fed every byte of the file as it is read, so the file need not be read again to
    hash it.
    """
    rows: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    for parsed in iter_jsonl(path, digest):
        if isinstance(parsed, Problem):
            problems.append(parsed)
        else:
            rows.append(parsed)
    return rows, problems


def read_jsonl_lines(path: str | Path, numbers: Collection[int]) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Only the lines `numbers` of `path`, each parsed as `read_jsonl` parses it (`parse_line`):
    the other lines are not parsed, and reading stops after the last one asked for. For lines
    read before (the self-test's first batch): no whole-file checks, no digest."""
    path = Path(path)
    wanted = set(numbers)
    last = max(wanted, default=0)
    rows: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no > last:
                break
            if line_no in wanted:
                parsed = parse_line(path, line_no, raw)
                if isinstance(parsed, Problem):
                    problems.append(parsed)
                elif parsed is not None:
                    rows.append(parsed)
    return rows, problems


def write_jsonl(path: Path, rows) -> None:
    """One JSON object a line, UTF-8, non-ASCII kept readable."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
