"""The three data formats, one JSON object a line, and the checks every row must pass.

    prompt_completion  {"prompt": "...<separator>", "completion": " ...<|endoftext|>"}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    text               {"text": "..."}            (open-ended: the whole text is trained)

`row_format` says which format a row is in; `row_problem` says what is wrong with it, in one
sentence with the fix. The trainer's preflight and `scripts/prepare_data.py validate` both use
these, so they can never disagree about what an error is.
"""

from __future__ import annotations

from typing import Any

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


def _message_problem(index: int, message: Any) -> str | None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        return f"{where} must be an object with \"role\" and \"content\", got a {type(message).__name__}"
    missing = [k for k in MESSAGE_KEYS if k not in message]
    if missing:
        return f"{where} is missing {', '.join(repr(k) for k in missing)}. Fix: every message needs \"role\" and \"content\""
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        return f"{where} has unknown key {', '.join(repr(k) for k in unknown)}. Fix: a message has only \"role\" and \"content\""
    role = message["role"]
    if not isinstance(role, str) or (role not in ROLES and role not in ROLE_ALIASES):
        return f"{where} has unknown role {role!r}. Fix: use one of system, user, assistant"
    if not isinstance(message["content"], str):
        return f"{where}.content must be a string, got {type(message['content']).__name__}"
    return None


def row_problem(obj: Any, expected_format: str) -> str | None:
    """What is wrong with one row of a file in `expected_format`, or None.

    `expected_format` is a concrete format (not `auto`): a row in another format is a problem.
    """
    if not isinstance(obj, dict):
        return f"expected a JSON object with {_expected_keys_hint()}, got a {type(obj).__name__}"
    found = row_format(obj)
    if found is None:
        return f"no known keys (found {', '.join(repr(k) for k in obj) or 'none'}). Fix: each line needs {_expected_keys_hint()}"
    if found != expected_format:
        return f"this line is in {found} format but the file is in {expected_format} format. Fix: use one format per file"
    keys = FORMAT_KEYS[found]
    missing = [k for k in keys if k not in obj]
    if missing:
        return f"missing key {', '.join(repr(k) for k in missing)}. Fix: every line needs {' and '.join(repr(k) for k in keys)}"
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        return f"unknown key {', '.join(repr(k) for k in unknown)}. Fix: only {', '.join(repr(k) for k in keys)} are read; remove the others"
    if found == "chat":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
        for index, message in enumerate(messages):
            problem = _message_problem(index, message)
            if problem:
                return problem
        if not any(ROLE_ALIASES.get(m["role"], m["role"]) == "assistant" for m in messages):
            return "the chat has no assistant turn, so there is nothing to learn. Fix: add the ideal assistant reply"
        return None
    for key in keys:
        if not isinstance(obj[key], str):
            return f"'{key}' must be a string, got {type(obj[key]).__name__}. Fix: quote the value"
    trained = "completion" if found == "prompt_completion" else "text"
    if not obj[trained].strip():
        return f"'{trained}' is empty: there is nothing to learn. Fix: write the ideal output, or remove the line"
    return None
