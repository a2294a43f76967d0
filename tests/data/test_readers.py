"""Reading a data file into numbered rows and typed problems; each file read once per process."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data import readers, reads
from trainer.data.problems import EmptyDataFile
from trainer.data.readers import read_rows, row_unit

GOOD = {"prompt": "banana ->", "completion": " yellow<|endoftext|>"}


def test_jsonl_rows_are_numbered_by_line_and_broken_lines_are_problems(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n{oops\ncaf\xe9\n" + json.dumps(GOOD).encode() + b"\n")
    rows, problems = read_rows(path)
    assert rows == [(1, GOOD), (5, GOOD)]
    assert [(p.kind, p.file, p.line) for p in problems] == [("invalid_json", str(path), 3), ("not_utf8", str(path), 4)]
    assert problems[0].text() == (
        "line 3: invalid JSON (Expecting property name enclosed in double quotes at column 2). "
        "Fix: each line must be one complete JSON object; check quotes, commas and escaped newlines (\\n)"
    )
    assert problems[1].message == "byte 0xe9 at column 4 is not UTF-8 (the file looks like Windows-1252 (or Latin-1))"


def test_a_table_gives_every_row_and_nulls_are_missing_keys(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"prompt": [GOOD["prompt"], None], "completion": [GOOD["completion"], None], "text": [None, "open"]}),
        path,
    )
    assert read_rows(path) == ([(1, GOOD), (2, {"text": "open"})], [])
    assert (row_unit(path), row_unit(tmp_path / "a.jsonl"), row_unit("b.ARROW")) == ("row", "line", "row")


@pytest.mark.parametrize(
    "name, write, message, problem",
    [
        (
            "empty.jsonl",
            lambda p: p.write_text("\n \n"),
            "is empty: it needs one JSON object per line, e.g. "
            '{"prompt": "banana ->", "completion": " yellow<|endoftext|>"}',
            "the file is empty",
        ),
        (
            "empty.parquet",
            lambda p: pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p),
            "has no rows: it needs one example a row, with columns prompt and completion, or messages, or text",
            "the file has no rows",
        ),
    ],
)
def test_a_file_without_rows_raises_with_its_problem(tmp_path, name, write, message, problem):
    path = tmp_path / name
    write(path)
    with pytest.raises(EmptyDataFile) as caught:
        read_rows(path)
    assert str(caught.value) == f"{path} {message}"
    assert (caught.value.problem.kind, caught.value.problem.message) == ("empty_file", problem)
    assert caught.value.problem.fix == message.split(": ", 1)[1]


@pytest.fixture
def no_second_read(monkeypatch):
    """Makes any further read of a data file fail, so a test shows it was not read again."""

    def refuse(*args, **kwargs):
        raise AssertionError("the file was read again")

    def arm():
        monkeypatch.setattr(readers, "read_jsonl", refuse)
        monkeypatch.setattr(reads, "open", refuse, raising=False)  # file_digest's own read

    return arm


def test_kept_rows_and_the_digest_come_from_the_one_read(tmp_path, no_second_read):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n", encoding="utf-8")
    first = read_rows(path, keep=True)
    first[1].append("a caller's own problem")  # callers extend the list: the kept one must not change
    no_second_read()
    again = read_rows(f"{tmp_path}/./train.jsonl")  # the same file, spelled otherwise
    assert again[0] == first[0] and [p.kind for p in again[1]] == ["invalid_json"]
    assert again[1][0].file == f"{tmp_path}/train.jsonl"  # named as this caller names it
    assert reads.file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(AssertionError, match="read again"):
        read_rows(path)  # taken once: a third reader reads the file itself


def test_a_file_changed_after_the_read_is_read_afresh(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    read_rows(path, keep=True)
    digest = reads.file_digest(path)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"text": "more"}) + "\n", encoding="utf-8")
    assert read_rows(path) == ([(1, GOOD), (2, {"text": "more"})], [])
    assert reads.file_digest(path) != digest


def test_without_keep_nothing_stays_in_memory(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    read_rows(path)
    assert reads.take_rows(path) is None
    read_rows(path, keep=True)
    reads.drop_rows(path)
    assert reads.take_rows(path) is None


def test_a_missing_file_is_named(tmp_path):
    from trainer.errors import UserError

    with pytest.raises(UserError, match=r"data file .*nope.jsonl does not exist\. Fix: give the path of a data file"):
        read_rows(tmp_path / "nope.jsonl")
