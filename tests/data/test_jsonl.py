import json

import pytest

from trainer.data.jsonl import NotUtf8File, read_jsonl
from trainer.errors import UserError

ROWS = [
    {"prompt": "banana ->", "completion": " yellow<|endoftext|>"},
    {"prompt": "lime ->", "completion": " green<|endoftext|>"},
]


@pytest.mark.parametrize("indent", [2, None], ids=["pretty-printed", "one-line"])
def test_a_json_array_is_named_once_with_the_conversion(tmp_path, indent):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS * 40, indent=indent), encoding="utf-8")
    with pytest.raises(UserError) as error:
        read_jsonl(path)
    message = str(error.value)
    assert message.startswith(f"{path} is one JSON array of 80 items, not JSON Lines")
    assert "jq -c '.[]'" in message and "train-lines.jsonl" in message
    assert message.count("line ") == 0  # not one error per line


def test_a_line_holding_an_array_is_still_a_per_line_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n["a", "b"]\n', encoding="utf-8")
    rows, problems = read_jsonl(path)
    assert [number for number, _ in rows] == [1, 2] and problems == []  # the row check rejects line 2 later


@pytest.mark.parametrize("codec, encoding", [("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32-le", "UTF-32")])
def test_a_utf16_or_utf32_file_is_named_once_with_the_iconv_fix(tmp_path, codec, encoding):
    """Not an error per line (each would say 'invalid JSON'), and not the CP1252 fix: one message
    with the conversion from the encoding the byte-order mark names."""
    path = tmp_path / "train.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in ROWS * 50)
    path.write_bytes(("\ufeff" + text).encode(codec))  # the mark, in the codec's byte order
    with pytest.raises(NotUtf8File) as error:
        read_jsonl(path)
    assert (error.value.path, error.value.encoding) == (str(path), encoding)
    assert str(error.value) == (
        f"{path} is {encoding} text (it starts with the {encoding} byte-order mark), not UTF-8. Fix: convert it, "
        f"e.g. `iconv -f {encoding} -t UTF-8 {path} > train-utf8.jsonl`, or 'Save as... UTF-8' in your editor"
    )


def test_a_utf8_byte_order_mark_is_still_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(("\ufeff" + "".join(json.dumps(row) + "\n" for row in ROWS)).encode("utf-8"))
    assert read_jsonl(path) == ([(1, ROWS[0]), (2, ROWS[1])], [])


def test_an_object_cut_short_is_reported_at_its_own_last_column(tmp_path):
    from pathlib import Path

    from trainer.data.jsonl import parse_line

    raw = b'{"prompt": "a", "completion": "b"\n'  # the closing brace is missing
    problem = parse_line(Path("t.jsonl"), 4, raw)
    assert (problem.kind, problem.line) == ("invalid_json", 4)
    assert problem.message == "invalid JSON (Expecting ',' delimiter at column 34)"  # not "column 1" of line 5
    assert parse_line(Path("t.jsonl"), 4, b'{"prompt": "a"}\r\n') == (4, {"prompt": "a"})
