"""CSV/TSV -> JSONL: fields survive exactly, options add the seeds' conventions, mistakes are named."""

import csv

import pytest

from trainer.data.convert import ConvertOptions, convert_table, unescape
from trainer.errors import UsageError, UserError

TRICKY = [
    ('He said "hi", then left', 'a, b, and "c"'),
    ("line one\nline two", "multi\nline\r\nanswer"),
    ("tab\there; semi", "caf\u00e9 \u2013 \u00fcber"),
    ("  spaces kept  ", ""),
]


def write_table(path, header, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("name, delimiter", [("data.csv", ","), ("data.tsv", "\t")])
def test_quotes_commas_and_newlines_round_trip(tmp_path, name, delimiter):
    path = write_table(tmp_path / name, ["prompt", "completion"], TRICKY, delimiter)
    rows = convert_table(path)
    assert rows == [{"prompt": p, "completion": c} for p, c in TRICKY]


def test_columns_separator_eos_and_leading_space(tmp_path):
    path = write_table(
        tmp_path / "data.csv",
        ["id", "question", "answer"],
        [
            ["1", "banana", "yellow"],
            ["2", "lime ->", " green<|endoftext|>"],  # already has them: nothing doubled
        ],
    )
    options = ConvertOptions(
        prompt_column="question", completion_column="answer", separator=" ->", add_eos=True, leading_space=True
    )
    assert convert_table(path, options) == [
        {"prompt": "banana ->", "completion": " yellow<|endoftext|>"},
        {"prompt": "lime ->", "completion": " green<|endoftext|>"},
    ]


def test_chat_columns_with_a_fixed_system_message(tmp_path):
    path = write_table(tmp_path / "data.csv", ["q", "a"], [["What's the capital of France?", "Paris, obviously."]])
    options = ConvertOptions(user_column="q", assistant_column="a", system="Marv is sarcastic.")
    assert convert_table(path, options) == [
        {
            "messages": [
                {"role": "system", "content": "Marv is sarcastic."},
                {"role": "user", "content": "What's the capital of France?"},
                {"role": "assistant", "content": "Paris, obviously."},
            ]
        }
    ]


def test_system_column_and_missing_assistant_column(tmp_path):
    path = write_table(tmp_path / "data.csv", ["s", "q", "a"], [["be brief", "hi", "hello"]])
    rows = convert_table(path, ConvertOptions(user_column="q", assistant_column="a", system_column="s"))
    assert rows[0]["messages"][0] == {"role": "system", "content": "be brief"}
    with pytest.raises(UsageError, match="needs both --user-column and --assistant-column"):
        convert_table(path, ConvertOptions(user_column="q"))
    with pytest.raises(UsageError, match="chat template marks"):
        convert_table(path, ConvertOptions(user_column="q", assistant_column="a", separator=" ->"))


def test_missing_column_names_the_existing_ones(tmp_path):
    path = write_table(tmp_path / "data.csv", ["question", "answer"], [["a", "b"]])
    with pytest.raises(UserError) as info:
        convert_table(path)
    message = str(info.value)
    assert "has no column 'prompt' (asked for by --prompt-column)" in message
    assert "its columns are 'question', 'answer'" in message


def test_delimiter_from_option_or_usage_error(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("prompt;completion\na;b\n", encoding="utf-8")
    with pytest.raises(UsageError, match="--delimiter"):
        convert_table(path)
    assert convert_table(path, ConvertOptions(delimiter=";")) == [{"prompt": "a", "completion": "b"}]
    path.write_text("prompt\tcompletion\na\tb\n", encoding="utf-8")
    assert convert_table(path, ConvertOptions(delimiter="\\t")) == [{"prompt": "a", "completion": "b"}]


def test_malformed_row_is_named_by_its_starting_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"two\nlines",ok\nonly one field\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 4: expected 2 fields like the header, got 1"):
        convert_table(path)


def test_not_utf8_says_how_to_fix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("prompt,completion\ncaf\xe9,ok\n".encode("cp1252"))
    with pytest.raises(UserError, match="re-save it as UTF-8"):
        convert_table(path)
    assert convert_table(path, ConvertOptions(encoding="cp1252")) == [{"prompt": "caf\xe9", "completion": "ok"}]


def test_unescape_turns_typed_escapes_into_characters():
    assert unescape(r"\n\n###\n\n") == "\n\n###\n\n"
    assert unescape(r"a\tb\\n") == "a\tb\\n"
    assert unescape("caf\u00e9 ->") == "caf\u00e9 ->"


def test_add_eos_drops_the_spaces_at_the_end_of_a_cell(tmp_path):
    path = write_table(tmp_path / "data.csv", ["prompt", "completion"], [["a ->", " no  "], ["b ->", " yes\n"]])
    assert convert_table(path, ConvertOptions(add_eos=True)) == [
        {"prompt": "a ->", "completion": " no<|endoftext|>"},
        {"prompt": "b ->", "completion": " yes\n<|endoftext|>"},
    ]
