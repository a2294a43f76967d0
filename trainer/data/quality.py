"""The seeds' rules for good data: the warnings of a validation report, and the task type.

Training runs despite these, but results suffer: completions start with a space and end with
`<|endoftext|>`, prompts end with one fixed separator that appears nowhere else and never with a
trailing space, no duplicates or contradicting examples, enough examples for the task, test prompts
that are new and shaped like the training prompts. Each rule takes the file's valid rows (`Row`,
one view of every format) and returns `Problem`s of a warning kind.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from trainer.data.formats import ROLE_ALIASES
from trainer.data.problems import Problem
from trainer.data.tokenize import EOS_LITERAL

# The seeds' sizes: "at least ~25 examples per class" for classification; the usual guidance for
# conditional generation (a few hundred) and open-ended generation (more, since nothing in the
# prompt guides the model).
MIN_PER_CLASS = 25
MIN_CONDITIONAL = 200
MIN_OPEN_ENDED = 500
MAX_CLASSES = 50  # more distinct completions than this is generation, not classification
MIN_PER_CLASS_TO_DETECT = 3  # "each repeated": on average at least this many examples per class

# Only horizontal whitespace is a "trailing whitespace" mistake: a trailing space makes the prompt
# end in a lone space token while the completion's first word should carry it (" yellow"). A
# trailing newline is its own token and is part of common separators such as "\n\n###\n\n".
TRAILING_SPACE = " \t\u00a0"


def _short(text: str, limit: int = 40) -> str:
    """A value quoted for a message: repr, with the middle cut when long."""
    if len(text) > limit:
        text = text[: limit // 2] + "..." + text[-limit // 2 :]
    return repr(text)


@dataclass(frozen=True)
class Row:
    """A valid row of any format as the rules see it: prompt/completion, a text (empty prompt), or a
    chat (its last assistant reply as the completion)."""

    line: int
    prompt: str
    completion: str
    obj: dict
    prompt_key: str  # what "the same prompt" means: the prompt, or a chat's turns before its last reply


def row_view(line: int, obj: dict, data_format: str) -> Row:
    if data_format == "chat":
        messages = [(ROLE_ALIASES.get(m["role"], m["role"]), m["content"]) for m in obj["messages"]]
        last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
        context = messages[:last]
        return Row(line, "", messages[last][1], obj, json.dumps(context, ensure_ascii=False))
    if data_format == "text":
        return Row(line, "", obj["text"], obj, "")
    return Row(line, obj["prompt"], obj["completion"], obj, obj["prompt"])


def class_label(completion: str) -> str:
    """A completion as a class name: without surrounding whitespace and the EOS marker."""
    text = completion.strip()
    return text.removesuffix(EOS_LITERAL).strip()


def task_type(rows: Sequence[Row] | Sequence[tuple[str, str]], data_format: str) -> tuple[str, Counter]:
    """`classification` (few distinct completions, each repeated), `open_ended` (no prompts) or
    `conditional` generation, and the class counts (empty unless classification)."""
    pairs = [(r.prompt_key, r.completion) if isinstance(r, Row) else r for r in rows]
    if data_format == "text" or (pairs and all(p == "" for p, _ in pairs)):
        return "open_ended", Counter()
    classes = Counter(class_label(c) for _, c in pairs)
    if 2 <= len(classes) <= MAX_CLASSES and len(pairs) >= MIN_PER_CLASS_TO_DETECT * len(classes):
        return "classification", classes
    return "conditional", Counter()


# ---------------------------------------------------------------------------------------------
# Warnings: the seeds' rules


def _common_suffix(strings: Iterable[str]) -> str:
    reversed_strings = [s[::-1] for s in strings]
    return os.path.commonprefix(reversed_strings)[::-1] if reversed_strings else ""


def _separator_part(suffix: str) -> str:
    """The separator inside a common suffix: prompts can share more than the separator by chance
    (every text ending in '.' before '\nLocations:', or 'banana ->' and 'cabana ->' sharing
    'abana ->'), so start at its first whitespace, or else after the word characters it starts with."""
    first_space = next((i for i, char in enumerate(suffix) if char.isspace()), None)
    if first_space is not None:
        return suffix[first_space:]
    return suffix.lstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") or suffix


def find_separator(prompts: Sequence[str]) -> tuple[str | None, int]:
    """The separator that ends most prompts, and how many prompts end with it.

    The longest common suffix of the prompts (trailing spaces ignored: that is its own warning),
    cut to where the separator likely starts.
    When a few prompts lack it, the suffix shared by the majority that end in the same character
    is the separator, so the prompts without it can be named. None when no majority shares one.
    """
    stripped = [p.rstrip(TRAILING_SPACE) for p in prompts if p.strip()]
    if len(stripped) < 2:
        return None, 0
    suffix = _separator_part(_common_suffix(stripped))
    if suffix.strip():
        return suffix, len(stripped)
    last_char, count = Counter(p[-1] for p in stripped).most_common(1)[0]
    if count * 2 <= len(stripped):
        return None, 0
    suffix = _separator_part(_common_suffix(p for p in stripped if p[-1] == last_char))
    return (suffix, count) if suffix.strip() else (None, 0)


def _ending_warnings(file: str, rows: list[Row], eos_texts: tuple[str, ...]) -> list[Problem]:
    """Completions should end with EOS; a file that mixes endings is inconsistent."""
    without = [r for r in rows if not r.completion.endswith(eos_texts)]
    if not without:
        return []
    with_eos = len(rows) - len(without)
    if with_eos:
        return [
            Problem(
                "inconsistent_endings",
                file,
                r.line,
                f"completion ends with {_short(r.completion[-12:])} "
                f"while {with_eos} of {len(rows)} completions end with <|endoftext|>",
                "end every completion the same way, with <|endoftext|> (--fix adds it)",
            )
            for r in without
        ]
    stop = _common_suffix(r.completion for r in without)
    # A shared ending of letters only ('ed' of ' red' and ' bed') is chance, not a stop sequence.
    if any(not char.isalnum() for char in stop.strip(" ")) and len(without) > 1:
        # The seeds' older style: a stop sequence such as "\n" or "." ends every completion.
        fix = (
            f"append <|endoftext|> after it (--fix does), or keep {stop!r} and give it as `stop` in every "
            "test prompt and request; the trainer adds EOS after it either way"
        )
        message = f"completion ends with the stop sequence {stop!r} but not with <|endoftext|>"
    else:
        fix = (
            "end every completion with <|endoftext|> so the model learns where to stop (--fix adds it; the "
            "trainer appends EOS when it is missing, but the file should say so for other tools)"
        )
        message = None
    return [
        Problem(
            "missing_eos",
            file,
            r.line,
            message or f"completion ends with {_short(r.completion[-12:])}, not with <|endoftext|>",
            fix,
        )
        for r in without
    ]


def prompt_completion_warnings(
    file: str, rows: list[Row], eos_texts: tuple[str, ...]
) -> tuple[list[Problem], str | None]:
    """Leading space, endings, trailing whitespace and the separator, for prompt/completion rows."""
    warnings: list[Problem] = []
    for r in rows:
        if r.completion and not r.completion[0].isspace():
            warnings.append(
                Problem(
                    "leading_space",
                    file,
                    r.line,
                    f"completion {_short(r.completion)} does not start with a space",
                    "start every completion with a space (' yellow', not 'yellow'): the tokenizer attaches the "
                    "space to the first word (--fix adds it)",
                )
            )
        if r.prompt and r.prompt[-1] in TRAILING_SPACE:
            warnings.append(
                Problem(
                    "prompt_trailing_whitespace",
                    file,
                    r.line,
                    f"prompt ends with whitespace ({_short(r.prompt[-12:])})",
                    "remove the trailing space; the completion's leading space carries it (--fix removes it)",
                )
            )
    warnings += _ending_warnings(file, rows, eos_texts)
    with_prompt = [r for r in rows if r.prompt.strip()]
    if len(with_prompt) < 2:
        return warnings, None
    separator, count = find_separator([r.prompt for r in with_prompt])
    if separator is None:
        warnings.append(
            Problem(
                "no_separator",
                file,
                None,
                f"the {len(with_prompt)} prompts do not end with a common separator, so the model cannot tell where "
                "a prompt ends and its completion begins",
                "end every prompt with the same separator that appears nowhere else, e.g. ' ->' or '\\n\\n###\\n\\n' "
                "(scripts/prepare_data.py convert --separator adds one)",
            )
        )
        return warnings, None
    for r in with_prompt:
        body = r.prompt.rstrip(TRAILING_SPACE)
        if not body.endswith(separator):
            warnings.append(
                Problem(
                    "missing_separator",
                    file,
                    r.line,
                    f"prompt ends with {_short(body[-12:])}, "
                    f"not with the separator {separator!r} that ends {count} of {len(with_prompt)} prompts",
                    f"end the prompt with {separator!r}",
                )
            )
            continue
        inside = [
            name
            for name, text in (("prompt", body[: -len(separator)]), ("completion", r.completion))
            if separator in text
        ]
        if inside:
            warnings.append(
                Problem(
                    "separator_in_text",
                    file,
                    r.line,
                    f"the separator {separator!r} also appears inside the {' and the '.join(inside)}, so the model may "
                    "take it for the end of the prompt",
                    "use a separator that appears only at the end of prompts, e.g. '\\n\\n###\\n\\n'",
                )
            )
    return warnings, separator


def chat_warnings(file: str, rows: list[Row]) -> list[Problem]:
    warnings: list[Problem] = []
    for r in rows:
        for index, message in enumerate(r.obj["messages"]):
            if message["role"] in ROLE_ALIASES:
                canonical = ROLE_ALIASES[message["role"]]
                warnings.append(
                    Problem(
                        "agent_role",
                        file,
                        r.line,
                        f"messages[{index}] has role {message['role']!r}, read as {canonical!r}",
                        f"write {canonical!r}: the alias is accepted here, "
                        "but chat templates and other tools reject it",
                    )
                )
            elif message["role"] == "assistant" and not message["content"].strip():
                warnings.append(
                    Problem(
                        "empty_assistant",
                        file,
                        r.line,
                        f"messages[{index}] is an assistant reply with no content",
                        "write the ideal reply or remove the turn: an empty reply teaches the model to say nothing",
                    )
                )
    return warnings


def duplicate_warnings(file: str, rows: list[Row]) -> list[Problem]:
    """Exact duplicates, and prompts that appear with different completions."""
    warnings: list[Problem] = []
    first_seen: dict[str, int] = {}
    for r in rows:
        key = json.dumps(r.obj, sort_keys=True, ensure_ascii=False)
        if key in first_seen:
            warnings.append(
                Problem(
                    "duplicate",
                    file,
                    r.line,
                    f"exact duplicate of line {first_seen[key]}",
                    "remove it: a duplicate counts one example twice (and leaks into the test split)",
                )
            )
        else:
            first_seen[key] = r.line
    by_prompt: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.prompt_key.strip() and r.prompt_key != "[]":
            by_prompt[r.prompt_key].append(r)
    for group in by_prompt.values():
        first = group[0]
        for r in group[1:]:
            if r.completion != first.completion:
                warnings.append(
                    Problem(
                        "conflicting_completions",
                        file,
                        r.line,
                        f"same prompt as line {first.line} but a different completion ({_short(r.completion, 24)} "
                        f"vs {_short(first.completion, 24)})",
                        "keep one correct completion per prompt: contradicting examples teach the model to guess",
                    )
                )
    warnings.sort(key=lambda w: w.line)
    return warnings


def size_warnings(file: str, task: str, count: int, classes: Counter) -> list[Problem]:
    more = "add more examples of the ideal output: after quality, dataset size matters most"
    if task == "classification":
        small = [(label, n) for label, n in sorted(classes.items()) if n < MIN_PER_CLASS]
        if not small:
            return []
        listed = ", ".join(f"{label!r}: {n}" for label, n in small[:10]) + (", ..." if len(small) > 10 else "")
        return [
            Problem(
                "too_few_examples",
                file,
                None,
                f"{len(small)} of {len(classes)} classes have fewer than ~{MIN_PER_CLASS} examples ({listed})",
                f"{more}; the seed recommends at least ~{MIN_PER_CLASS} per class",
            )
        ]
    needed, what = (
        (MIN_OPEN_ENDED, "open-ended generation")
        if task == "open_ended"
        else (MIN_CONDITIONAL, "conditional generation")
    )
    if count >= needed:
        return []
    return [
        Problem("too_few_examples", file, None, f"only {count} examples; {what} usually needs at least ~{needed}", more)
    ]


def _test_prompt_text(test_prompt: Any) -> tuple[str | None, list | None]:
    """(prompt, messages) of a test prompt given as a string, a dict or a config `TestPrompt`."""
    if isinstance(test_prompt, str):
        return test_prompt, None
    if isinstance(test_prompt, dict):
        return test_prompt.get("prompt"), test_prompt.get("messages")
    messages = getattr(test_prompt, "messages", None)
    if messages is not None:
        messages = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
    return getattr(test_prompt, "prompt", None), messages


def test_prompt_warnings(
    file: str, rows: list[Row], test_prompts: Sequence[Any], separator: str | None
) -> list[Problem]:
    """Test prompts must be new (not training prompts) and shaped exactly like training prompts."""
    line_of_prompt: dict[str, int] = {}
    for r in rows:
        line_of_prompt.setdefault(r.prompt_key, r.line)
    warnings: list[Problem] = []
    for number, test_prompt in enumerate(test_prompts, start=1):
        prompt, messages = _test_prompt_text(test_prompt)
        key = prompt
        if messages is not None:
            key = json.dumps(
                [(ROLE_ALIASES.get(m["role"], m["role"]), m["content"]) for m in messages], ensure_ascii=False
            )
        shown = _short(prompt if prompt is not None else messages[-1]["content"] if messages else "")
        if key in line_of_prompt and key.strip():
            warnings.append(
                Problem(
                    "test_prompt_in_data",
                    file,
                    line_of_prompt[key],
                    f"test prompt {number} ({shown}) is the prompt of this training example",
                    "use test prompts the model has not seen, or the checkpoints' answers show memorisation, not skill",
                )
            )
        if prompt is not None and separator is not None and not prompt.endswith(separator):
            warnings.append(
                Problem(
                    "test_prompt_format",
                    file,
                    None,
                    f"test prompt {number} ({shown}) does not end with the separator {separator!r} "
                    "that ends the training prompts",
                    "write test prompts exactly like the training prompts: separator included, no trailing space",
                )
            )
    return warnings
