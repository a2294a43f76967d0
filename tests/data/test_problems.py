"""A data problem is a value: its kind, file, line, message and fix, and the texts users see."""

import pytest

from trainer.data.problems import (
    ERROR_KINDS,
    WARNING_KINDS,
    DataFileProblems,
    EmptyDataFile,
    Problem,
    empty_file,
    raise_problems,
)
from trainer.data.validation_report import WARNING_TITLES

MISSING = Problem(
    "missing_key", "data/train.jsonl", 3, "missing key 'completion'", "every line needs 'prompt' and 'completion'"
)


def test_the_three_texts_of_a_problem():
    assert MISSING.sentence() == "missing key 'completion'. Fix: every line needs 'prompt' and 'completion'"
    assert MISSING.text() == "line 3: missing key 'completion'. Fix: every line needs 'prompt' and 'completion'"
    assert (
        MISSING.located()
        == "data/train.jsonl line 3: missing key 'completion'. Fix: every line needs 'prompt' and 'completion'"
    )


def test_without_a_fix_or_a_line_the_text_is_shorter():
    bare = Problem("not_an_object", "a.jsonl", 5, "expected a JSON object, got a list")
    whole = Problem("empty_file", "a.jsonl", None, "the file is empty", "it needs one JSON object per line")
    assert (bare.sentence(), bare.text()) == (
        "expected a JSON object, got a list",
        "line 5: expected a JSON object, got a list",
    )
    assert whole.text() == "the file is empty. Fix: it needs one JSON object per line"
    assert whole.located() == "a.jsonl the file is empty. Fix: it needs one JSON object per line"


def test_a_table_counts_rows_and_a_unit_can_be_given():
    row = Problem("wrong_type", "data.parquet", 2, "'prompt' must be a string, got int", "quote the value")
    assert row.text() == "row 2: 'prompt' must be a string, got int. Fix: quote the value"
    assert MISSING.text("row").startswith("row 3: missing key")


def test_a_kind_outside_the_closed_set_is_a_bug_caught_at_once():
    with pytest.raises(ValueError, match="unknown problem kind 'missing'"):
        Problem("missing", "a.jsonl", 1, "x")


def test_every_warning_kind_has_a_title_and_too_long_is_both():
    assert set(WARNING_TITLES) == set(WARNING_KINDS)
    assert set(ERROR_KINDS) & set(WARNING_KINDS) == {"too_long"}


def test_the_report_json_of_a_problem_names_no_file_and_keeps_its_key_order():
    assert list(MISSING.to_dict().items()) == [
        ("kind", "missing_key"),
        ("message", "missing key 'completion'"),
        ("line", 3),
        ("fix", "every line needs 'prompt' and 'completion'"),
    ]


def test_raise_problems_lists_twenty_and_carries_them_all():
    problems = [Problem("invalid_json", "a.jsonl", n, "invalid JSON (x at column 1)") for n in range(1, 23)]
    with pytest.raises(DataFileProblems) as caught:
        raise_problems("a.jsonl", problems)
    lines = str(caught.value).splitlines()
    assert lines[0] == "a.jsonl: 22 problems:"
    assert (
        lines[1] == "  line 1: invalid JSON (x at column 1)" and lines[20] == "  line 20: invalid JSON (x at column 1)"
    )
    assert lines[21:] == ["  ... and 2 more"]
    assert caught.value.problems == problems and caught.value.path == "a.jsonl"
    raise_problems("a.jsonl", [])  # nothing to say: no error


def test_raise_problems_takes_lines_of_text_from_callers_outside_the_data_layer():
    with pytest.raises(
        DataFileProblems, match=r"^p.jsonl: 2 problems:\n  line 1: x\n  line 2: seed must be an integer$"
    ):
        raise_problems("p.jsonl", [Problem("invalid_json", "p.jsonl", 1, "x"), "line 2: seed must be an integer"])


def test_an_empty_file_says_so_and_carries_the_same_fact():
    err = empty_file("a.jsonl", "is empty", "it needs one JSON object per line")
    assert isinstance(err, EmptyDataFile) and str(err) == "a.jsonl is empty: it needs one JSON object per line"
    assert err.problem == Problem(
        "empty_file", "a.jsonl", None, "the file is empty", "it needs one JSON object per line"
    )
