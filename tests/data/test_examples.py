"""Bad data files: each gets its own message, with the file and the line number."""

import json

import pytest

from trainer.data.examples import examples_at, read_examples, read_file, split_validation
from trainer.errors import UserError

GOOD = json.dumps({"prompt": "banana ->", "completion": " yellow<|endoftext|>"})


def problems_of(tmp_path, content: bytes) -> str:
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_examples(path)
    message = str(info.value)
    assert message.startswith(str(path))
    return message


def lines(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode("utf-8")


def test_good_file_reads_with_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines(GOOD, "", GOOD))
    examples = read_examples(path)
    assert [(e.line, e.prompt, e.completion) for e in examples] == [
        (1, "banana ->", " yellow<|endoftext|>"),
        (3, "banana ->", " yellow<|endoftext|>"),
    ]


def test_invalid_json(tmp_path):
    message = problems_of(tmp_path, lines(GOOD, GOOD, '{"prompt": "a", "completion": " b"'))
    assert "1 problem:" in message and "line 3: invalid JSON" in message


def test_non_utf8_bytes_name_the_line_and_the_likely_encoding(tmp_path):
    latin = '{"prompt": "caf\xe9 ->", "completion": " ok"}\n'.encode("cp1252")
    message = problems_of(tmp_path, lines(GOOD) + latin)
    assert "line 2: byte 0xe9" in message and "Windows-1252" in message and "re-save the file as UTF-8" in message


def test_missing_key(tmp_path):
    assert "line 2: missing key 'completion'" in problems_of(tmp_path, lines(GOOD, '{"prompt": "a"}'))


def test_unknown_key(tmp_path):
    assert "line 1: unknown key 'label'" in problems_of(
        tmp_path, lines('{"prompt": "a", "completion": " b", "label": 1}')
    )


def test_wrong_type(tmp_path):
    assert "line 1: 'completion' must be a string, got int" in problems_of(
        tmp_path, lines('{"prompt": "a", "completion": 5}')
    )


def test_not_an_object(tmp_path):
    assert "line 1: expected a JSON object" in problems_of(tmp_path, lines('["a", "b"]'))


def test_empty_completion(tmp_path):
    assert "line 1: 'completion' is empty" in problems_of(tmp_path, lines('{"prompt": "a", "completion": "  "}'))


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    assert "is empty" in problems_of(tmp_path, content)


def test_every_bad_line_is_listed(tmp_path):
    message = problems_of(tmp_path, lines("{", GOOD, '{"prompt": 1, "completion": " b"}', "nope"))
    assert "3 problems:" in message
    assert "line 1:" in message and "line 3:" in message and "line 4:" in message and "line 2:" not in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": " c"}) + "\n" for i in range(20)))
    examples = read_examples(path)
    train, valid = split_validation(examples, 0.25, seed=3)
    again_train, again_valid = split_validation(examples, 0.25, seed=3)
    assert (train, valid) == (again_train, again_valid)
    assert len(valid) == 5 and len(train) == 15
    assert {e.line for e in train}.isdisjoint({e.line for e in valid})
    assert split_validation(examples, 0.25, seed=4)[1] != valid


def test_chat_and_text_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(
        lines(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Marv."},
                        {"role": "user", "content": "Hi?"},
                        {"role": "agent", "content": "Hello."},
                    ]
                }
            ),
        )
    )
    [chat] = read_examples(path)
    assert chat.format == "chat" and chat.messages == (("system", "Marv."), ("user", "Hi?"), ("assistant", "Hello."))
    path.write_bytes(lines(json.dumps({"text": "Once upon a time."})))
    [text] = read_examples(path)
    assert (text.prompt, text.completion, text.format) == ("", "Once upon a time.", "prompt_completion")


def test_a_file_that_mixes_formats_names_the_first_line_that_differs(tmp_path):
    message = problems_of(tmp_path, lines(GOOD, GOOD, json.dumps({"text": "x"}), GOOD))
    assert (
        "1 problem:" in message
        and "line 3: this line is in text format but the file is in prompt_completion format" in message
    )


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "Hi"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user"}]}, "messages[0] is missing 'content'"),
        ({"messages": []}, "non-empty list"),
        ({"text": ""}, "'text' is empty"),
    ],
)
def test_chat_and_text_errors(tmp_path, row, expected):
    assert "line 1: " in problems_of(tmp_path, lines(json.dumps(row)))
    assert expected in problems_of(tmp_path, lines(json.dumps(row)))


def test_a_folder_is_not_a_data_file(tmp_path):
    with pytest.raises(UserError, match=f"data file {tmp_path} is a folder, not a file"):
        read_examples(tmp_path)


# ---------------------------------------------------------------------------------------------
# A few examples without parsing the whole file: examples_at (the self-test)

CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "agent", "content": "Hello."}]})
TEXT = json.dumps({"text": "Once upon a time."})


def test_examples_at_parses_only_the_lines_asked_for(tmp_path, parsed_lines):
    path = tmp_path / "train.jsonl"
    # Line 2 is broken and lines 5 and 6 (after the last asked for) are broken beyond parsing.
    path.write_bytes(lines(GOOD, "{oops", GOOD, GOOD.replace("banana", "apple")) + b"{\n\xff\xfe not UTF-8\n")
    found = examples_at(path, {1, 4})
    assert parsed_lines == [1, 4]
    assert {line: (e.prompt, e.completion, e.source) for line, e in found.items()} == {
        1: ("banana ->", " yellow<|endoftext|>", str(path)),
        4: ("apple ->", " yellow<|endoftext|>", str(path)),
    }


@pytest.mark.parametrize(
    "content, data_format",
    [
        (b"\xef\xbb\xbf" + lines(GOOD, "", GOOD.replace("banana", "kiwi"), GOOD), "auto"),  # a byte-order mark
        (lines(CHAT, CHAT.replace("Hi?", "Hey?"), CHAT), "auto"),  # `agent` read as `assistant`
        (lines(CHAT, "[1, 2]", CHAT.replace("Hi?", "Hey?")), "chat"),
        (lines(TEXT, TEXT.replace("Once", "Twice"), TEXT), "text"),
    ],
)
def test_examples_at_equals_the_whole_files_read_at_those_lines(tmp_path, content, data_format):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    whole = {e.line: e for e in read_file(path, data_format, on_error="skip").examples}
    for wanted in ({1}, {3}, {1, 3}, {2, 3}, set(whole)):
        assert examples_at(path, wanted, data_format) == {n: whole[n] for n in wanted if n in whole}


def test_examples_at_of_a_table_equals_its_whole_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    rows = [json.loads(GOOD), json.loads(GOOD.replace("banana", "kiwi")), json.loads(GOOD.replace("banana", "fig"))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    whole = {e.line: e for e in read_file(path).examples}
    assert examples_at(path, {3, 1, 7}) == {1: whole[1], 3: whole[3]}
