"""The validator: every error kind with its line and message, every warning kind triggered by a
minimal file and absent from a clean one, statistics, and --fix."""

import json
from pathlib import Path

import pytest

from tests.helpers import write_jsonl
from trainer.data.examples import read_examples
from trainer.data.fixes import FIXABLE, fix_row, fixed_lines
from trainer.data.preflight import preflight_data
from trainer.data.quality import find_separator
from trainer.data.token_stats import length_histogram, percentile
from trainer.data.tokenize import tokenize_examples
from trainer.data.validate import validate_file
from trainer.errors import UserError

EOS = "<|endoftext|>"
GOOD = json.dumps({"prompt": "banana ->", "completion": " yellow<|endoftext|>"})
CHAT_OK = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def lines(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode("utf-8")


def clean_rows(per_class: int = 25) -> list[dict]:
    """A seeds-style classification file: distinct prompts ending in ' ->', completions with a
    leading space and EOS, three classes of `per_class` examples each."""
    colours = {"banana": "yellow", "lime": "green", "cherry": "red"}
    return [
        {"prompt": f"{fruit} number {i} ->", "completion": f" {colour}{EOS}"}
        for i in range(per_class)
        for fruit, colour in colours.items()
    ]


def report_of(tmp_path, content: bytes | list[dict], name: str = "data.jsonl", **kwargs):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_jsonl(path, content)
    return validate_file(path, **kwargs)


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def only(findings, kind: str):
    return [f for f in findings if f.kind == kind]


# ---------------------------------------------------------------------------------------------
# Errors: one bad file per kind, with its line and a key phrase

BAD_FILES = [
    ("invalid_json", lines(GOOD, GOOD, '{"prompt": "a ->", "completion": " b"'), 3, "invalid JSON"),
    ("not_utf8", lines(GOOD) + '{"prompt": "caf\xe9 ->", "completion": " ok"}\n'.encode("cp1252"), 2, "Windows-1252"),
    ("missing_key", lines(GOOD, '{"prompt": "a ->"}'), 2, "missing key 'completion'"),
    ("unknown_key", lines(GOOD, GOOD, '{"prompt": "a ->", "completion": " b", "label": 1}'), 3, "unknown key 'label'"),
    ("wrong_type", lines('{"prompt": "a ->", "completion": 5}'), 1, "'completion' must be a string, got int"),
    ("empty_completion", lines(GOOD, '{"prompt": "a ->", "completion": "  "}'), 2, "'completion' is empty"),
    ("unknown_role", lines(CHAT_OK, '{"messages": [{"role": "bot", "content": "x"}]}'), 2, "unknown role 'bot'"),
    (
        "no_assistant_turn",
        lines(CHAT_OK, CHAT_OK, '{"messages": [{"role": "user", "content": "x"}]}'),
        3,
        "no assistant turn",
    ),
    (
        "mixed_formats",
        lines(GOOD, CHAT_OK),
        2,
        "this line is in chat format but the file is in prompt_completion format",
    ),
    ("not_an_object", lines('["a ->", " b"]'), 1, "expected a JSON object"),
    ("unknown_keys", lines(GOOD, '{"question": "a", "answer": "b"}'), 2, "no known keys"),
]


@pytest.mark.parametrize("kind, content, line, phrase", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_each_error_kind_has_its_line_and_message(tmp_path, kind, content, line, phrase):
    report = report_of(tmp_path, content)
    assert not report.ok
    assert [(e.kind, e.line) for e in report.errors] == [(kind, line)]
    assert phrase in report.errors[0].message
    assert f"line {line}: " in report.render()


def test_not_utf8_says_how_to_resave(tmp_path):
    [error] = report_of(tmp_path, BAD_FILES[1][1]).errors
    assert "byte 0xe9" in error.message and "re-save the file as UTF-8" in error.fix and "iconv" in error.fix


def test_empty_file_is_an_error_without_a_line(tmp_path):
    report = report_of(tmp_path, b"\n  \n")
    assert [(e.kind, e.line) for e in report.errors] == [("empty_file", None)]
    assert "is empty" in report.errors[0].message


def test_missing_file_raises(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        validate_file(tmp_path / "nope.jsonl")


def test_errors_are_exactly_what_training_reports(tmp_path):
    """The validator and the trainer's reader must list the same lines with the same sentences."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b"".join(case[1] for case in BAD_FILES if case[0] not in ("mixed_formats", "unknown_role", "no_assistant_turn"))
    )
    with pytest.raises(UserError) as info:
        read_examples(path)
    training = [line.strip() for line in str(info.value).splitlines()[1:]]
    report = validate_file(path)
    assert [e.text() for e in report.errors] == training
    assert len(training) == 8


# ---------------------------------------------------------------------------------------------
# Warnings: a clean file has none; each minimal bad file has its own


def test_clean_seeds_style_file_has_no_warnings(tmp_path, tokenizer):
    report = report_of(tmp_path, clean_rows(), tokenizer=tokenizer, max_seq_len=64, test_prompts=["kiwi ->"])
    assert report.errors == [] and report.warnings == []
    assert report.stats["task"] == "classification"
    assert report.stats["separator"] == " ->"


def test_small_clean_file_warns_only_about_size(tmp_path):
    report = report_of(tmp_path, clean_rows(per_class=4))
    assert kinds(report.warnings) == ["too_few_examples"]
    assert (
        report.warnings[0].message == "3 of 3 classes have fewer than ~25 examples ('green': 4, 'red': 4, 'yellow': 4)"
    )


def test_completion_without_leading_space(tmp_path):
    rows = clean_rows()
    rows[4]["completion"] = "green" + EOS
    report = report_of(tmp_path, rows)
    assert [(w.kind, w.line) for w in report.warnings] == [("leading_space", 5)]
    assert "does not start with a space" in report.warnings[0].message


def test_completions_without_eos(tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["completion"].removesuffix(EOS)} for r in clean_rows()]
    report = report_of(tmp_path, rows)
    assert kinds(report.warnings) == ["missing_eos"] * 75
    assert report.warnings[0].line == 1 and "not with <|endoftext|>" in report.warnings[0].message


def test_stop_sequence_instead_of_eos_is_named(tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["completion"].removesuffix(EOS) + " \n"} for r in clean_rows()]
    [first, *_] = report_of(tmp_path, rows).warnings
    assert first.kind == "missing_eos" and "the stop sequence ' \\n'" in first.message and "`stop`" in first.fix


def test_inconsistent_endings(tmp_path):
    rows = clean_rows()
    rows[2]["completion"] = " red"
    report = report_of(tmp_path, rows)
    assert [(w.kind, w.line) for w in report.warnings] == [("inconsistent_endings", 3)]
    assert "while 74 of 75 completions end with <|endoftext|>" in report.warnings[0].message


def test_prompt_with_trailing_whitespace(tmp_path):
    rows = clean_rows()
    rows[6]["prompt"] += " "
    report = report_of(tmp_path, rows)
    assert [(w.kind, w.line) for w in report.warnings] == [("prompt_trailing_whitespace", 7)]


def test_no_common_separator(tmp_path):
    rows = [{"prompt": p, "completion": f" {c}{EOS}"} for p, c in (("one", "a"), ("two", "b"), ("three?", "c"))]
    warnings = report_of(tmp_path, rows).warnings
    assert [(w.kind, w.line) for w in warnings][0] == ("no_separator", None)
    assert "do not end with a common separator" in warnings[0].message


def test_prompt_missing_the_separator(tmp_path):
    rows = clean_rows()
    rows[9]["prompt"] = "lime number 99"
    report = report_of(tmp_path, rows)
    assert [(w.kind, w.line) for w in report.warnings] == [("missing_separator", 10)]
    assert "that ends 74 of 75 prompts" in report.warnings[0].message


def test_separator_inside_a_prompt_or_completion(tmp_path):
    rows = clean_rows()
    rows[0]["prompt"] = "banana -> split ->"
    rows[1]["completion"] = " a -> b" + EOS
    report = report_of(tmp_path, rows)
    assert [(w.kind, w.line) for w in only(report.warnings, "separator_in_text")] == [
        ("separator_in_text", 1),
        ("separator_in_text", 2),
    ]
    assert "inside the prompt" in report.warnings[0].message


def test_duplicates_and_conflicting_completions(tmp_path):
    rows = clean_rows()
    rows.append(dict(rows[3]))  # line 76 repeats line 4
    rows.append({"prompt": rows[0]["prompt"], "completion": " green" + EOS})  # line 77 contradicts line 1
    report = report_of(tmp_path, rows)
    assert [(w.kind, w.line) for w in report.warnings] == [("duplicate", 76), ("conflicting_completions", 77)]
    assert report.warnings[0].message == "exact duplicate of line 4"
    assert report.warnings[1].message.startswith("same prompt as line 1 but a different completion")


@pytest.mark.parametrize("count, kind, needed", [(150, "conditional", 200), (400, "open_ended", 500)])
def test_too_few_examples_for_generation(tmp_path, count, kind, needed):
    prompt = "" if kind == "open_ended" else "Topic {i}\nOutline:"
    rows = [{"prompt": prompt.format(i=i), "completion": f" outline number {i}{EOS}"} for i in range(count)]
    report = report_of(tmp_path, rows)
    assert report.stats["task"] == kind
    assert [(w.kind, w.message) for w in report.warnings] == [
        (
            "too_few_examples",
            f"only {count} examples; {kind.replace('_', '-')} generation usually needs at least ~{needed}",
        )
    ]
    rows += [{"prompt": prompt.format(i=i), "completion": f" outline number {i}{EOS}"} for i in range(count, needed)]
    assert report_of(tmp_path, rows).warnings == []


def test_too_few_examples_per_class(tmp_path):
    rows = clean_rows()[:-1]  # 'red' now has 24
    report = report_of(tmp_path, rows)
    assert [w.message for w in report.warnings] == ["1 of 3 classes have fewer than ~25 examples ('red': 24)"]
    assert report.stats["classes"] == {"green": 25, "yellow": 25, "red": 24}


def test_test_prompts_in_data_or_without_separator(tmp_path):
    report = report_of(tmp_path, clean_rows(), test_prompts=["lime number 3 ->", "kiwi -> ", {"prompt": "kiwi ->"}])
    assert [(w.kind, w.line) for w in report.warnings] == [("test_prompt_in_data", 11), ("test_prompt_format", None)]
    assert "test prompt 1" in report.warnings[0].message and "test prompt 2" in report.warnings[1].message


def test_chat_warnings_agent_role_empty_reply_and_duplicates(tmp_path):
    def chat(user, reply, role="assistant"):
        return {"messages": [{"role": "user", "content": user}, {"role": role, "content": reply}]}

    rows = [chat(f"question {i}", f"answer {i}") for i in range(200)]
    rows[1] = chat("question 1", "answer 1", role="agent")
    rows[2] = chat("question 2", " ")
    rows.append(chat("question 5", "answer 5"))
    rows.append(chat("question 6", "another answer"))
    report = report_of(tmp_path, rows)
    assert report.data_format == "chat" and report.ok
    assert [(w.kind, w.line) for w in report.warnings] == [
        ("agent_role", 2),
        ("empty_assistant", 3),
        ("duplicate", 201),
        ("conflicting_completions", 202),
    ]


def test_too_long_matches_the_trainers_length_policy(tmp_path, tokenizer):
    rows = clean_rows(per_class=9)
    rows[5]["completion"] = " red and a very long answer about the cherry" + EOS
    rows[8]["prompt"] = "cherry " * 30 + "->"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    examples = read_examples(path)
    for policy in ("drop", "truncate"):
        report = validate_file(path, tokenizer=tokenizer, max_seq_len=16, too_long=policy)
        _, length_report = tokenize_examples(examples, tokenizer, max_seq_len=16, too_long=policy)
        assert [w.line for w in only(report.warnings, "too_long")] == [6, 9]
        assert report.stats["lengths"]["dropped"] == len(length_report.dropped)
        assert report.stats["lengths"]["truncated"] == len(length_report.truncated)
        assert report.ok
    assert (report.stats["lengths"]["dropped"], report.stats["lengths"]["truncated"]) == (1, 1)
    strict = validate_file(path, tokenizer=tokenizer, max_seq_len=16, too_long="error")
    assert [(e.kind, e.line) for e in strict.errors] == [("too_long", 6), ("too_long", 9)]
    assert "training stops" in strict.errors[0].message


# ---------------------------------------------------------------------------------------------
# Statistics


def test_percentiles_and_histogram_are_exact():
    values = list(range(1, 101))
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 50) == 7
    assert length_histogram([3, 4, 4, 12], bins=5) == [
        {"from": 3, "to": 4, "count": 3},
        {"from": 5, "to": 6, "count": 0},
        {"from": 7, "to": 8, "count": 0},
        {"from": 9, "to": 10, "count": 0},
        {"from": 11, "to": 12, "count": 1},
    ]


def test_token_statistics_count_what_training_trains(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", clean_rows())
    report = validate_file(path, tokenizer=tokenizer, max_seq_len=64)
    tokenized, _ = tokenize_examples(read_examples(path), tokenizer, max_seq_len=64, too_long="error")
    lengths = sorted(len(t.input_ids) for t in tokenized)
    tokens = report.stats["tokens"]
    assert tokens["total"] == sum(lengths)
    assert tokens["supervised"] == sum(t.supervised_tokens for t in tokenized)
    assert tokens["prompt"] + tokens["completion"] == tokens["total"]
    assert report.stats["lengths"]["max"] == lengths[-1] and report.stats["lengths"]["p50"] == lengths[37]
    assert report.stats["lengths"]["over"] == 0
    assert report.stats["file_bytes"] == path.stat().st_size and report.stats["recommended_epochs"] == 4


def test_find_separator_cuts_chance_overlap():
    assert find_separator(["banana ->", "cabana ->"]) == (" ->", 2)
    assert find_separator(["Text: a.\nLocations:", "Text: b.\nLocations:"]) == ("\nLocations:", 2)
    assert find_separator(["a ->", "b ->", "c"]) == (" ->", 2)
    assert find_separator(["one", "two"]) == (None, 0)


def test_render_lists_errors_then_warnings_then_statistics(tmp_path):
    rows = clean_rows()
    rows[4]["completion"] = "green" + EOS
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    path.write_bytes(path.read_bytes() + b"{broken\n")
    report = validate_file(path)
    text = report.render()
    assert text.index("ERRORS") < text.index("WARNINGS") < text.index("STATISTICS")
    assert "line 76: invalid JSON" in text and "[leading_space]" in text and "(1 line: 5)" in text
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["warning_counts"] == {"leading_space": 1}
    assert data["errors"][0]["line"] == 76 and data["stats"]["examples"] == 75


# ---------------------------------------------------------------------------------------------
# --fix


def test_fix_removes_the_fixable_warnings_and_is_idempotent(tmp_path):
    rows = clean_rows()
    rows[0]["completion"] = "yellow"  # no leading space, no EOS
    rows[1]["prompt"] += " \t"
    rows[2]["completion"] = " red<|endoftext|>\n"  # whitespace after the EOS
    rows[3]["prompt"] = "caf\u00e9 number 1 ->"  # non-ASCII survives
    rows[3]["completion"] = "yellow"
    source = write_jsonl(tmp_path / "data.jsonl", rows)
    before = source.read_bytes()
    assert set(kinds(validate_file(source).warnings)) == {
        "leading_space",
        "inconsistent_endings",
        "prompt_trailing_whitespace",
    }

    fixed, changes = fixed_lines(source)
    assert source.read_bytes() == before
    assert changes == {"leading_space": 2, "missing_eos": 3, "prompt_trailing_whitespace": 1}
    once = tmp_path / "fixed.jsonl"
    once.write_bytes(b"".join(fixed))
    report = validate_file(once)
    assert report.ok and not set(kinds(report.warnings)) & set(FIXABLE)
    assert report.warnings == []
    assert json.loads(once.read_text(encoding="utf-8").splitlines()[3]) == {
        "prompt": "caf\u00e9 number 1 ->",
        "completion": " yellow" + EOS,
    }

    twice, changes = fixed_lines(once)
    assert b"".join(twice) == once.read_bytes() and not changes


@pytest.mark.parametrize(
    "completion, fixed",
    [
        (" no  ", " no" + EOS),  # the spaces would be trained as a token before the EOS
        ("no \t", " no" + EOS),  # the leading space is added, the trailing ones dropped
        (" no\n", " no\n" + EOS),  # a newline stop sequence is kept
        (" no \n", " no \n" + EOS),  # only what ends the completion is trailing
        (" no " + EOS + " ", " no " + EOS),  # whitespace after a written EOS: dropped, no second EOS
        ("   ", "   " + EOS),  # nothing but spaces (an error of its own): not emptied
    ],
)
def test_fix_drops_the_trailing_spaces_before_the_eos_it_appends(completion, fixed):
    row, kinds = fix_row({"prompt": "q ->", "completion": completion})
    assert row == {"prompt": "q ->", "completion": fixed}
    assert fix_row(row) == (row, [])  # idempotent


def test_fix_refuses_a_file_with_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(lines(GOOD, "{oops"))
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        fixed_lines(path)


# ---------------------------------------------------------------------------------------------
# The trainer's preflight


def test_preflight_stops_on_errors_and_saves_warnings(tmp_path):
    from trainer.config import Config

    rows = clean_rows(per_class=4)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = Config.model_validate(
        {"model": {"name_or_path": "unused"}, "data": {"train_file": str(train)}, "test_prompts": ["lime number 0 ->"]}
    )
    logged: list[str] = []
    reports = preflight_data(config, log=logged.append, report_path=tmp_path / "data_report.json")
    assert kinds(reports[0].warnings) == ["too_few_examples", "test_prompt_in_data"]
    assert "[test_prompt_in_data]" in logged[0]
    assert json.loads((tmp_path / "data_report.json").read_text())[0]["warning_counts"] == {
        "too_few_examples": 1,
        "test_prompt_in_data": 1,
    }

    train.write_bytes(train.read_bytes() + b"{oops\n")
    with pytest.raises(UserError, match=r"line 13: invalid JSON"):
        preflight_data(config, log=logged.append)
    config.data.on_error = "skip"
    assert not preflight_data(config, log=logged.append)[0].ok


def test_preflight_runs_without_torch_or_transformers(tmp_path):
    """The data check before any model loads needs neither torch nor transformers (without a
    tokenizer), so a broken file can be reported before the heavy imports. A fresh process: this
    one has imported both."""
    import subprocess
    import sys

    train = write_jsonl(tmp_path / "train.jsonl", clean_rows(per_class=4))
    train.write_bytes(train.read_bytes() + b"{oops\n")
    script = (
        "import sys\n"
        "from trainer.config import load_config\n"
        "from trainer.data.preflight import preflight_data\n"
        "from trainer.errors import UserError\n"
        f"config = load_config({str(tmp_path / 'config.yaml')!r})\n"
        "try:\n"
        "    preflight_data(config, log=lambda message: None)\n"
        "except UserError as err:\n"
        "    print(str(err).splitlines()[0])\n"
        "print(sorted(name for name in ('torch', 'transformers', 'accelerate', 'peft') if name in sys.modules))\n"
    )
    (tmp_path / "config.yaml").write_text(
        f"model:\n  name_or_path: unused\ndata:\n  train_file: {train}\n", encoding="utf-8"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "the data has 1 error:\n[]\n", "")


# ---------------------------------------------------------------------------------------------
# Chat token counts, tables, held-out files


def test_chat_tokens_are_counted_as_training_counts_them(tmp_path, tokenizer):
    chats = [
        {"messages": [{"role": "user", "content": f"banana {i}"}, {"role": "assistant", "content": "yellow"}]}
        for i in range(5)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    report = validate_file(path, tokenizer=tokenizer, max_seq_len=512)
    tokenized, _ = tokenize_examples(read_examples(path), tokenizer, max_seq_len=512, too_long="error")
    assert report.ok and report.stats["tokens"]["total"] == sum(len(t.input_ids) for t in tokenized)
    assert report.stats["tokens"]["supervised"] == sum(t.supervised_tokens for t in tokenized) > 0


def test_a_parquet_table_gets_the_same_checks_with_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a ->", "b ->"], "completion": [" x" + EOS, ""]}), path)
    report = validate_file(path)
    assert [(e.kind, e.line) for e in report.errors] == [("empty_completion", 2)]
    assert "row 2: 'completion' is empty" in report.render()


def test_held_out_files_are_not_expected_to_be_large(tmp_path):
    rows = clean_rows(per_class=2)
    assert kinds(report_of(tmp_path, rows).warnings) == ["too_few_examples"]
    assert report_of(tmp_path, rows, held_out=True).warnings == []
