import json

import pytest

from trainer.data.jsonl import read_jsonl
from trainer.errors import UserError

ROWS = [{"prompt": "banana ->", "completion": " yellow<|endoftext|>"}, {"prompt": "lime ->", "completion": " green<|endoftext|>"}]


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
