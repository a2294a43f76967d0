"""The row checks: every kind of problem a row can have, made where it is found, with its exact text."""

import pytest

from trainer.data.formats import row_format, row_problem
from trainer.data.problems import Problem

KEYS = '"prompt" and "completion", or "messages", or "text"'
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    "row, data_format, kind, sentence",
    [
        ([1, 2], "prompt_completion", "not_an_object", f"expected a JSON object with {KEYS}, got a list"),
        ({"foo": 1}, "prompt_completion", "unknown_keys", f"no known keys (found 'foo'). Fix: each line needs {KEYS}"),
        # A key named like another kind's phrase: classified where found, not by what the text contains.
        (
            {"invalid JSON": 1},
            "prompt_completion",
            "unknown_keys",
            f"no known keys (found 'invalid JSON'). Fix: each line needs {KEYS}",
        ),
        (
            CHAT,
            "prompt_completion",
            "mixed_formats",
            "this line is in chat format but the file is in prompt_completion format. Fix: use one format per file",
        ),
        (
            {"prompt": "a"},
            "prompt_completion",
            "missing_key",
            "missing key 'completion'. Fix: every line needs 'prompt' and 'completion'",
        ),
        (
            {"prompt": "a", "completion": " b", "x": 1},
            "prompt_completion",
            "unknown_key",
            "unknown key 'x'. Fix: only 'prompt', 'completion' are read; remove the others",
        ),
        (
            {"prompt": 3, "completion": " b"},
            "prompt_completion",
            "wrong_type",
            "'prompt' must be a string, got int. Fix: quote the value",
        ),
        (
            {"prompt": "a", "completion": "  "},
            "prompt_completion",
            "empty_completion",
            "'completion' is empty: there is nothing to learn. Fix: write the ideal output, or remove the line",
        ),
        (
            {"text": ""},
            "text",
            "empty_completion",
            "'text' is empty: there is nothing to learn. Fix: write the ideal output, or remove the line",
        ),
        (
            {"messages": []},
            "chat",
            "wrong_type",
            '\'messages\' must be a non-empty list of {"role", "content"} objects',
        ),
        (
            {"messages": ["x"]},
            "chat",
            "wrong_type",
            'messages[0] must be an object with "role" and "content", got a str',
        ),
        (
            {"messages": [{"role": "user"}]},
            "chat",
            "missing_key",
            'messages[0] is missing \'content\'. Fix: every message needs "role" and "content"',
        ),
        (
            {"messages": [{"role": "user", "content": "a", "name": "b"}]},
            "chat",
            "unknown_key",
            'messages[0] has unknown key \'name\'. Fix: a message has only "role" and "content"',
        ),
        (
            {"messages": [{"role": "robot", "content": "a"}]},
            "chat",
            "unknown_role",
            "messages[0] has unknown role 'robot'. Fix: use one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "chat",
            "wrong_type",
            "messages[0].content must be a string, got int",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}]},
            "chat",
            "no_assistant_turn",
            "the chat has no assistant turn, so there is nothing to learn. Fix: add the ideal assistant reply",
        ),
    ],
)
def test_each_problem_has_its_kind_and_exact_sentence(row, data_format, kind, sentence):
    problem = row_problem(row, data_format, file="train.jsonl", line=7)
    assert (problem.kind, problem.sentence()) == (kind, sentence)
    assert (problem.file, problem.line) == ("train.jsonl", 7)


def test_the_message_and_the_fix_are_separate_fields():
    assert row_problem({"prompt": "a"}, "prompt_completion", file="t.jsonl", line=2) == Problem(
        "missing_key", "t.jsonl", 2, "missing key 'completion'", "every line needs 'prompt' and 'completion'"
    )


@pytest.mark.parametrize(
    "row, data_format",
    [
        ({"prompt": "a ->", "completion": " b"}, "prompt_completion"),
        (CHAT, "chat"),
        ({"messages": [{"role": "agent", "content": "yo"}]}, "chat"),  # the alias is accepted (a warning elsewhere)
        ({"text": "hello"}, "text"),
    ],
)
def test_a_valid_row_has_no_problem(row, data_format):
    assert row_problem(row, data_format) is None


def test_row_format_goes_by_the_first_key_of_each_format():
    assert [row_format(r) for r in ({"prompt": 1}, CHAT, {"text": "x"}, {"x": 1}, [1])] == [
        "prompt_completion",
        "chat",
        "text",
        None,
        None,
    ]
