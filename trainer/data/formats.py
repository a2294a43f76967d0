"""The three data formats, one JSON object a line, and the checks every row must pass.

    prompt_completion  {"prompt": "...<separator>", "completion": " ...<|endoftext|>"}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    text               {"text": "..."}            (open-ended: the whole text is trained)

`row_format` says which format a row is in; `row_problem` says what is wrong with it, as a
`Problem` (kind, file, line, message, fix) made here. The trainer's preflight and
`scripts/prepare_data.py validate` both use these, so they can never disagree about what an error is.
"""

from __future__ import annotations

from typing import Any

from trainer.data.problems import Problem

FORMAT_KEYS = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"agent": "assistant"}  # seed 000 writes its example chats with "agent"
MESSAGE_KEYS = ("role", "content")


def row_format(obj: Any) -> str | None:
    """The format whose keys the row has (`None` when it matches none)."""
    if not isinstance(obj, dict):
        return None
    for name, keys in FORMAT_KEYS.items():
        if keys[0] in obj:
            return name
    return None


def _expected_keys_hint() -> str:
    return '"prompt" and "completion", or "messages", or "text"'


def _message_problem(index: int, message: Any) -> tuple[str, str, str] | None:
    """(kind, message, fix) of what is wrong with one chat message, or None."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        return "wrong_type", f'{where} must be an object with "role" and "content", got a {type(message).__name__}', ""
    missing = [k for k in MESSAGE_KEYS if k not in message]
    if missing:
        return (
            "missing_key",
            f"{where} is missing {', '.join(repr(k) for k in missing)}",
            'every message needs "role" and "content"',
        )
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        return (
            "unknown_key",
            f"{where} has unknown key {', '.join(repr(k) for k in unknown)}",
            'a message has only "role" and "content"',
        )
    role = message["role"]
    if not isinstance(role, str) or (role not in ROLES and role not in ROLE_ALIASES):
        return "unknown_role", f"{where} has unknown role {role!r}", "use one of system, user, assistant"
    if not isinstance(message["content"], str):
        return "wrong_type", f"{where}.content must be a string, got {type(message['content']).__name__}", ""
    return None


def _row_problem(obj: Any, expected_format: str) -> tuple[str, str, str] | None:
    if not isinstance(obj, dict):
        return "not_an_object", f"expected a JSON object with {_expected_keys_hint()}, got a {type(obj).__name__}", ""
    found = row_format(obj)
    if found is None:
        return (
            "unknown_keys",
            f"no known keys (found {', '.join(repr(k) for k in obj) or 'none'})",
            f"each line needs {_expected_keys_hint()}",
        )
    if found != expected_format:
        return (
            "mixed_formats",
            f"this line is in {found} format but the file is in {expected_format} format",
            "use one format per file",
        )
    keys = FORMAT_KEYS[found]
    missing = [k for k in keys if k not in obj]
    if missing:
        return (
            "missing_key",
            f"missing key {', '.join(repr(k) for k in missing)}",
            f"every line needs {' and '.join(repr(k) for k in keys)}",
        )
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        return (
            "unknown_key",
            f"unknown key {', '.join(repr(k) for k in unknown)}",
            f"only {', '.join(repr(k) for k in keys)} are read; remove the others",
        )
    if found == "chat":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return "wrong_type", '\'messages\' must be a non-empty list of {"role", "content"} objects', ""
        for index, message in enumerate(messages):
            problem = _message_problem(index, message)
            if problem:
                return problem
        if not any(ROLE_ALIASES.get(m["role"], m["role"]) == "assistant" for m in messages):
            return (
                "no_assistant_turn",
                "the chat has no assistant turn, so there is nothing to learn",
                "add the ideal assistant reply",
            )
        return None
    for key in keys:
        if not isinstance(obj[key], str):
            return "wrong_type", f"'{key}' must be a string, got {type(obj[key]).__name__}", "quote the value"
    trained = "completion" if found == "prompt_completion" else "text"
    if not obj[trained].strip():
        return (
            "empty_completion",
            f"'{trained}' is empty: there is nothing to learn",
            "write the ideal output, or remove the line",
        )
    return None


def row_problem(obj: Any, expected_format: str, *, file: str = "", line: int | None = None) -> Problem | None:
    """What is wrong with one row (row `line` of `file`) of a file in `expected_format`, or None.

    `expected_format` is a concrete format (not `auto`): a row in another format is a problem.
    """
    found = _row_problem(obj, expected_format)
    return Problem(found[0], file, line, found[1], found[2]) if found else None
