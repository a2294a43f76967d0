"""Check a data file before any GPU time is spent: errors, quality warnings and statistics.

The seeds say the two things that matter most are dataset quality and size. This module finds
every mistake they describe and explains each in one sentence with its line number and the fix:

* ERRORS are exactly the checks training runs (`read_rows`/`read_jsonl` and `row_problem`; with a
  tokenizer also the chat template and the `data.too_long=error` length check), with the same
  messages, so the validator and the trainer can never disagree about whether a file trains.
* WARNINGS are the seeds' rules for good data: completions start with a space and end with
  `<|endoftext|>`, prompts end with one fixed separator that appears nowhere else and never with a
  trailing space, no duplicates or contradicting examples, enough examples for the task, test
  prompts that are new and shaped like the training prompts.
* STATISTICS: examples, tokens, lengths against `max_seq_len`, classes, and the epochs the seed's
  table recommends for the file size.

`validate_file` returns a `ValidationReport` (`render()` for people, `to_json()` for tools);
`scripts/prepare_data.py validate` and the trainer's preflight (`preflight_data`) both use it.
`fixed_lines` writes the mechanical fixes (leading space and EOS on completions, with the spaces
before an appended EOS dropped; trailing whitespace off prompts).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from trainer.data.examples import detect_format, read_examples
from trainer.data.formats import ROLE_ALIASES, row_problem
from trainer.data.jsonl import raise_problems
from trainer.data.readers import TABLE_SUFFIXES, read_rows, row_unit
from trainer.data.tokenize import EOS_LITERAL, IGNORE_INDEX, tokenize_examples
from trainer.errors import UserError
from trainer.hub import ModelFolderMissing, model_source
from trainer.schedule import auto_epochs

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

# Errors from the trainer's readers and row checks, classified by the phrase their message contains
# (an unknown phrase is `invalid_row`: the message itself is never changed).
ERROR_KINDS = (
    ("is not UTF-8", "not_utf8"),
    ("invalid JSON", "invalid_json"),
    ("format but the file is in", "mixed_formats"),
    ("no known keys", "unknown_keys"),
    ("missing key", "missing_key"),
    ("unknown key", "unknown_key"),
    ("must be a string", "wrong_type"),
    ("is empty: there is nothing to learn", "empty_completion"),
    ("unknown role", "unknown_role"),
    ("has no assistant turn", "no_assistant_turn"),
    ("expected a JSON object", "not_an_object"),
    ("chat template", "chat_template"),
    ("is missing", "missing_key"),
    ("must be", "wrong_type"),
)

WARNING_TITLES = {
    "leading_space": "completions that do not start with a space",
    "missing_eos": "completions that do not end with <|endoftext|>",
    "inconsistent_endings": "completions that end differently from the others",
    "prompt_trailing_whitespace": "prompts that end with whitespace",
    "agent_role": "role 'agent' instead of 'assistant'",
    "empty_assistant": "empty assistant replies",
    "no_separator": "no common separator at the end of prompts",
    "missing_separator": "prompts without the separator",
    "separator_in_text": "the separator also appears inside the text",
    "duplicate": "exact duplicates",
    "conflicting_completions": "same prompt, different completion",
    "too_long": "examples longer than max_seq_len",
    "too_few_examples": "too few examples",
    "test_prompt_in_data": "test prompts that are training prompts",
    "test_prompt_format": "test prompts shaped differently from training prompts",
    "chat_tokenization": "chats the tokenizer warns about",
}

ERRORS_PER_KIND = 20  # the human summary lists this many errors of each kind (--json lists all)

# Warnings that `fixed_lines` removes.
FIXABLE = ("leading_space", "missing_eos", "inconsistent_endings", "prompt_trailing_whitespace")


@dataclass(frozen=True)
class Finding:
    """One error or warning: what kind, where (1-based line; None for the whole file), what, the fix."""

    kind: str
    message: str
    line: int | None = None
    fix: str = ""

    def text(self, unit: str = "line") -> str:
        """One sentence as training prints it: 'line N: message. Fix: fix' (a table's unit is 'row')."""
        where = f"{unit} {self.line}: " if self.line is not None else ""
        fix = f". Fix: {self.fix}" if self.fix else ""
        return f"{where}{self.message}{fix}"


@dataclass
class ValidationReport:
    """Everything `validate_file` found in one file."""

    path: str
    data_format: str
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when training would accept the file (warnings do not stop a run)."""
        return not self.errors

    def warning_kinds(self) -> Counter:
        return Counter(w.kind for w in self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "format": self.data_format,
            "ok": self.ok,
            "errors": [asdict(e) for e in self.errors],
            "warnings": [asdict(w) for w in self.warnings],
            "warning_counts": dict(self.warning_kinds()),
            "stats": self.stats,
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def render(self, *, stats: bool = True, examples_per_kind: int = 3, lines_per_kind: int = 10) -> str:
        """A readable summary: errors first, then warnings grouped by kind, then statistics."""
        unit = row_unit(self.path)
        out = [
            f"{self.path}: {self.data_format} format, {self.stats.get('examples', 0)} valid examples, "
            f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')}"
        ]
        if self.errors:
            out.append("\nERRORS (training would stop; fix these first):")
            for group in _grouped(self.errors).values():
                # One fix shared by a whole group is said once, after its lines.
                shared_fix = group[0].fix if len(group) > 1 and all(e.fix == group[0].fix for e in group) else None
                for e in group[:ERRORS_PER_KIND]:
                    out.append(f"  {Finding(e.kind, e.message, e.line).text(unit) if shared_fix else e.text(unit)}")
                if len(group) > ERRORS_PER_KIND:
                    out.append(f"  ... and {len(group) - ERRORS_PER_KIND} more like these")
                if shared_fix:
                    out.append(f"    Fix: {shared_fix}")
        if self.warnings:
            out.append("\nWARNINGS (training runs, but results may suffer):")
            for kind, group in _grouped(self.warnings).items():
                lines = [w.line for w in group if w.line is not None]
                where = ""
                if lines:
                    listed = ", ".join(str(n) for n in lines[:lines_per_kind]) + (", ..." if len(lines) > lines_per_kind else "")
                    where = f" ({_plural(len(lines), unit)}: {listed})"
                out.append(f"  [{kind}] {WARNING_TITLES.get(kind, kind)}{where}")
                for w in group[:examples_per_kind]:
                    where = f"{unit} {w.line}: " if w.line is not None else ""
                    out.append(f"      {where}{w.message}")
                if len(group) > examples_per_kind:
                    out.append(f"      ... and {len(group) - examples_per_kind} more")
                if group[0].fix:
                    out.append(f"      Fix: {group[0].fix}")
        if self.notes:
            out.append("\nNOTES:")
            out += [f"  {n}" for n in self.notes]
        if stats and self.stats:
            out.append("\nSTATISTICS:")
            out += [f"  {line}" for line in _render_stats(self.stats)]
        return "\n".join(out)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _grouped(findings: list[Finding]) -> dict[str, list[Finding]]:
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.kind, []).append(f)
    return groups


def _short(text: str, limit: int = 40) -> str:
    """A value quoted for a message: repr, with the middle cut when long."""
    if len(text) > limit:
        text = text[: limit // 2] + "..." + text[-limit // 2 :]
    return repr(text)


# ---------------------------------------------------------------------------------------------
# Errors: the trainer's own checks


def _split_fix(sentence: str) -> tuple[str, str]:
    message, sep, fix = sentence.partition(". Fix: ")
    return (message, fix) if sep else (sentence, "")


def problem_to_finding(problem: str, line: int | None = None) -> Finding:
    """A problem from the trainer's readers and row checks as a Finding (its `text()` gives it back)."""
    kind = next((k for phrase, k in ERROR_KINDS if phrase in problem), "invalid_row")
    message, fix = _split_fix(problem)
    return Finding(kind, message, line, fix)


# ---------------------------------------------------------------------------------------------
# A uniform view of valid rows, for the quality checks


@dataclass(frozen=True)
class _Row:
    line: int
    prompt: str
    completion: str
    obj: dict
    prompt_key: str  # what "the same prompt" means: the prompt, or a chat's turns before its last reply


def _row_view(line: int, obj: dict, data_format: str) -> _Row:
    if data_format == "chat":
        messages = [(ROLE_ALIASES.get(m["role"], m["role"]), m["content"]) for m in obj["messages"]]
        last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
        context = messages[:last]
        return _Row(line, "", messages[last][1], obj, json.dumps(context, ensure_ascii=False))
    if data_format == "text":
        return _Row(line, "", obj["text"], obj, "")
    return _Row(line, obj["prompt"], obj["completion"], obj, obj["prompt"])


def class_label(completion: str) -> str:
    """A completion as a class name: without surrounding whitespace and the EOS marker."""
    text = completion.strip()
    return text.removesuffix(EOS_LITERAL).strip()


def task_type(rows: Sequence[_Row] | Sequence[tuple[str, str]], data_format: str) -> tuple[str, Counter]:
    """`classification` (few distinct completions, each repeated), `open_ended` (no prompts) or
    `conditional` generation, and the class counts (empty unless classification)."""
    pairs = [(r.prompt_key, r.completion) if isinstance(r, _Row) else r for r in rows]
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


def _ending_warnings(rows: list[_Row], eos_texts: tuple[str, ...]) -> list[Finding]:
    """Completions should end with EOS; a file that mixes endings is inconsistent."""
    without = [r for r in rows if not r.completion.endswith(eos_texts)]
    if not without:
        return []
    with_eos = len(rows) - len(without)
    if with_eos:
        return [
            Finding(
                "inconsistent_endings",
                f"completion ends with {_short(r.completion[-12:])} while {with_eos} of {len(rows)} completions end with <|endoftext|>",
                r.line,
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
        Finding("missing_eos", message or f"completion ends with {_short(r.completion[-12:])}, not with <|endoftext|>", r.line, fix)
        for r in without
    ]


def _prompt_completion_warnings(rows: list[_Row], eos_texts: tuple[str, ...]) -> tuple[list[Finding], str | None]:
    """Leading space, endings, trailing whitespace and the separator, for prompt/completion rows."""
    warnings: list[Finding] = []
    for r in rows:
        if r.completion and not r.completion[0].isspace():
            warnings.append(Finding(
                "leading_space",
                f"completion {_short(r.completion)} does not start with a space",
                r.line,
                "start every completion with a space (' yellow', not 'yellow'): the tokenizer attaches the "
                "space to the first word (--fix adds it)",
            ))
        if r.prompt and r.prompt[-1] in TRAILING_SPACE:
            warnings.append(Finding(
                "prompt_trailing_whitespace",
                f"prompt ends with whitespace ({_short(r.prompt[-12:])})",
                r.line,
                "remove the trailing space; the completion's leading space carries it (--fix removes it)",
            ))
    warnings += _ending_warnings(rows, eos_texts)
    with_prompt = [r for r in rows if r.prompt.strip()]
    if len(with_prompt) < 2:
        return warnings, None
    separator, count = find_separator([r.prompt for r in with_prompt])
    if separator is None:
        warnings.append(Finding(
            "no_separator",
            f"the {len(with_prompt)} prompts do not end with a common separator, so the model cannot tell where "
            "a prompt ends and its completion begins",
            None,
            "end every prompt with the same separator that appears nowhere else, e.g. ' ->' or '\\n\\n###\\n\\n' "
            "(scripts/prepare_data.py convert --separator adds one)",
        ))
        return warnings, None
    for r in with_prompt:
        body = r.prompt.rstrip(TRAILING_SPACE)
        if not body.endswith(separator):
            warnings.append(Finding(
                "missing_separator",
                f"prompt ends with {_short(body[-12:])}, not with the separator {separator!r} that ends {count} of {len(with_prompt)} prompts",
                r.line,
                f"end the prompt with {separator!r}",
            ))
            continue
        inside = [name for name, text in (("prompt", body[: -len(separator)]), ("completion", r.completion)) if separator in text]
        if inside:
            warnings.append(Finding(
                "separator_in_text",
                f"the separator {separator!r} also appears inside the {' and the '.join(inside)}, so the model may "
                "take it for the end of the prompt",
                r.line,
                "use a separator that appears only at the end of prompts, e.g. '\\n\\n###\\n\\n'",
            ))
    return warnings, separator


def _chat_warnings(rows: list[_Row]) -> list[Finding]:
    warnings: list[Finding] = []
    for r in rows:
        for index, message in enumerate(r.obj["messages"]):
            if message["role"] in ROLE_ALIASES:
                canonical = ROLE_ALIASES[message["role"]]
                warnings.append(Finding(
                    "agent_role",
                    f"messages[{index}] has role {message['role']!r}, read as {canonical!r}",
                    r.line,
                    f"write {canonical!r}: the alias is accepted here, but chat templates and other tools reject it",
                ))
            elif message["role"] == "assistant" and not message["content"].strip():
                warnings.append(Finding(
                    "empty_assistant",
                    f"messages[{index}] is an assistant reply with no content",
                    r.line,
                    "write the ideal reply or remove the turn: an empty reply teaches the model to say nothing",
                ))
    return warnings


def _duplicate_warnings(rows: list[_Row]) -> list[Finding]:
    """Exact duplicates, and prompts that appear with different completions."""
    warnings: list[Finding] = []
    first_seen: dict[str, int] = {}
    for r in rows:
        key = json.dumps(r.obj, sort_keys=True, ensure_ascii=False)
        if key in first_seen:
            warnings.append(Finding(
                "duplicate",
                f"exact duplicate of line {first_seen[key]}",
                r.line,
                "remove it: a duplicate counts one example twice (and leaks into the test split)",
            ))
        else:
            first_seen[key] = r.line
    by_prompt: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        if r.prompt_key.strip() and r.prompt_key != "[]":
            by_prompt[r.prompt_key].append(r)
    for group in by_prompt.values():
        first = group[0]
        for r in group[1:]:
            if r.completion != first.completion:
                warnings.append(Finding(
                    "conflicting_completions",
                    f"same prompt as line {first.line} but a different completion ({_short(r.completion, 24)} "
                    f"vs {_short(first.completion, 24)})",
                    r.line,
                    "keep one correct completion per prompt: contradicting examples teach the model to guess",
                ))
    warnings.sort(key=lambda w: w.line)
    return warnings


def _size_warnings(task: str, count: int, classes: Counter) -> list[Finding]:
    more = "add more examples of the ideal output: after quality, dataset size matters most"
    if task == "classification":
        small = [(label, n) for label, n in sorted(classes.items()) if n < MIN_PER_CLASS]
        if not small:
            return []
        listed = ", ".join(f"{label!r}: {n}" for label, n in small[:10]) + (", ..." if len(small) > 10 else "")
        return [Finding(
            "too_few_examples",
            f"{len(small)} of {len(classes)} classes have fewer than ~{MIN_PER_CLASS} examples ({listed})",
            None,
            f"{more}; the seed recommends at least ~{MIN_PER_CLASS} per class",
        )]
    needed, what = (MIN_OPEN_ENDED, "open-ended generation") if task == "open_ended" else (MIN_CONDITIONAL, "conditional generation")
    if count >= needed:
        return []
    return [Finding("too_few_examples", f"only {count} examples; {what} usually needs at least ~{needed}", None, more)]


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


def _test_prompt_warnings(rows: list[_Row], test_prompts: Sequence[Any], separator: str | None) -> list[Finding]:
    """Test prompts must be new (not training prompts) and shaped exactly like training prompts."""
    line_of_prompt: dict[str, int] = {}
    for r in rows:
        line_of_prompt.setdefault(r.prompt_key, r.line)
    warnings: list[Finding] = []
    for number, test_prompt in enumerate(test_prompts, start=1):
        prompt, messages = _test_prompt_text(test_prompt)
        key = prompt
        if messages is not None:
            key = json.dumps([(ROLE_ALIASES.get(m["role"], m["role"]), m["content"]) for m in messages], ensure_ascii=False)
        shown = _short(prompt if prompt is not None else messages[-1]["content"] if messages else "")
        if key in line_of_prompt and key.strip():
            warnings.append(Finding(
                "test_prompt_in_data",
                f"test prompt {number} ({shown}) is the prompt of this training example",
                line_of_prompt[key],
                "use test prompts the model has not seen, or the checkpoints' answers show memorisation, not skill",
            ))
        if prompt is not None and separator is not None and not prompt.endswith(separator):
            warnings.append(Finding(
                "test_prompt_format",
                f"test prompt {number} ({shown}) does not end with the separator {separator!r} that ends the training prompts",
                None,
                "write test prompts exactly like the training prompts: separator included, no trailing space",
            ))
    return warnings


# ---------------------------------------------------------------------------------------------
# Lengths and statistics (need a tokenizer)


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def length_histogram(lengths: Sequence[int], bins: int = 10) -> list[dict[str, int]]:
    """Equal-width buckets from the shortest to the longest length: [{"from", "to", "count"}]
    (bounds inclusive), at most `bins` of them."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / bins))
    count = math.ceil((high - low + 1) / width)
    counts = Counter((length - low) // width for length in lengths)
    return [{"from": low + i * width, "to": low + (i + 1) * width - 1, "count": counts.get(i, 0)} for i in range(count)]


def _length_findings(lengths: dict[int, tuple[int, int]], max_seq_len: int, too_long: str) -> tuple[list[Finding], list[Finding], dict]:
    """Errors (policy `error`) or warnings (drop/truncate) for examples over `max_seq_len`, by the
    rule of `tokenize_examples`: an example is over when all its tokens are more than max_seq_len;
    truncation keeps it when its first trained token still fits, and drops it otherwise.
    `lengths` maps line -> (first trained position, length)."""
    dropped = truncated = 0
    findings: list[Finding] = []
    for line, (first_trained, length) in lengths.items():
        if length <= max_seq_len:
            continue
        if too_long == "error":
            outcome = "training stops (data.too_long=error)"
        elif too_long == "drop" or first_trained >= max_seq_len:
            outcome, dropped = "it will be dropped", dropped + 1
        else:
            outcome, truncated = "its end will be cut to fit", truncated + 1
        findings.append(Finding(
            "too_long",
            f"{length} tokens, over max_seq_len={max_seq_len}: {outcome}",
            line,
            "raise data.max_seq_len, shorten the example, or set data.too_long to drop or truncate"
            if too_long == "error" else "raise data.max_seq_len or shorten the example, if it should be trained whole",
        ))
    summary = {"over": len(findings), "dropped": dropped, "truncated": truncated}
    if too_long == "error":
        return findings, [], summary
    return [], findings, summary


def _tokenize_all(path: Path, data_format: str, tokenizer, chat_template: str | None, train_on: str, report: ValidationReport):
    """Every example tokenized as training tokenizes it (no length limit yet), or None. Chat rows
    the template cannot render are errors, as in training; the tokenizer's own warnings are kept."""
    examples = read_examples(path, data_format)
    chat = {"chat_template": chat_template, "train_on": train_on, "on_error": "skip"} if data_format == "chat" else {}
    try:
        tokenized, length_report = tokenize_examples(examples, tokenizer, max_seq_len=2**62, too_long="drop", **chat)
    except (UserError, TypeError, ValueError, KeyError) as err:
        report.notes.append(f"token counts skipped: the examples could not be tokenized ({err})")
        return None
    for skipped in getattr(length_report, "skipped", []):
        message, fix = _split_fix(skipped.message)
        report.errors.append(Finding("chat_template", message, skipped.line, fix))
    for warning in getattr(length_report, "warnings", []):
        message, fix = _split_fix(warning.removeprefix(f"{path}: "))
        report.warnings.append(Finding("chat_tokenization", message, None, fix))
    return tokenized


def _token_stats(path: Path, data_format: str, tokenizer, max_seq_len: int | None, too_long: str,
                 chat_template: str | None, train_on: str, report: ValidationReport) -> None:
    """Count tokens and check lengths on exactly the tokens training uses."""
    tokenized = _tokenize_all(path, data_format, tokenizer, chat_template, train_on, report)
    if tokenized is None:
        return
    lengths: dict[int, tuple[int, int]] = {}
    context = supervised = total = 0
    for t in tokenized:
        length = len(t.input_ids)
        first_trained = next((i for i, label in enumerate(t.labels) if label != IGNORE_INDEX), length)
        lengths[t.line] = (first_trained, length)
        context += sum(1 for label in t.labels if label == IGNORE_INDEX)
        total += length
        supervised += t.supervised_tokens
    ordered = sorted(length for _, length in lengths.values())
    report.stats["tokens"] = {
        "prompt": context,  # every position not trained: prompts, or a chat's context turns
        "completion": total - context,  # every trained position: completions, or assistant replies
        "supervised": supervised,
        "total": total,
    }
    length_stats: dict[str, Any] = {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else 0,
        "max_seq_len": max_seq_len,
        "too_long": too_long,
        "histogram": length_histogram(ordered),
    }
    if max_seq_len is not None:
        errors, warnings, summary = _length_findings(lengths, max_seq_len, too_long)
        report.errors += errors
        report.warnings += warnings
        length_stats.update(summary)
    report.stats["lengths"] = length_stats


def _render_stats(stats: dict[str, Any]) -> list[str]:
    lines = [
        f"examples: {stats['examples']} ({stats['task'].replace('_', ' ')}"
        + (f", minimum recommended ~{stats['min_examples']}" if stats.get("min_examples") else "")
        + ")",
        f"file size: {stats['file_bytes']:,} bytes; recommended epochs: {stats['recommended_epochs']} "
        "(seed table: <1 MB 4, <10 MB 3-4, <100 MB 2-3, <500 MB 1-2, larger 1)",
    ]
    if stats.get("separator") is not None:
        lines.append(f"separator at the end of prompts: {stats['separator']!r}")
    if stats.get("classes"):
        listed = ", ".join(f"{label!r}: {n}" for label, n in stats["classes"].items())
        lines.append(f"classes ({len(stats['classes'])}): {listed}")
    tokens = stats.get("tokens")
    if tokens:
        lines.append(
            f"tokens: {tokens['total']:,} in all; prompt {tokens['prompt']:,}, completion {tokens['completion']:,}, "
            f"supervised {tokens['supervised']:,}"
        )
    lengths = stats.get("lengths")
    if lengths:
        limit = lengths.get("max_seq_len")
        over = ""
        if limit is not None:
            outcome = f"{lengths['dropped']} dropped, {lengths['truncated']} truncated" if lengths["too_long"] != "error" else "training stops"
            over = f"; {lengths['over']} over max_seq_len={limit}" + (f" ({outcome})" if lengths["over"] else "")
        lines.append(f"length in tokens: p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']}{over}")
        peak = max((b["count"] for b in lengths["histogram"]), default=0) or 1
        for b in lengths["histogram"]:
            bar = "#" * math.ceil(30 * b["count"] / peak) if b["count"] else ""
            mark = "  <- max_seq_len" if limit is not None and b["from"] <= limit <= b["to"] else ""
            lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>7} {bar}{mark}")
    elif "tokens" not in stats:
        lines.append("tokens: not counted (that needs a local tokenizer: --tokenizer or --config)")
    return lines


# ---------------------------------------------------------------------------------------------
# The entry point


def validate_file(
    path: str | Path,
    *,
    data_format: str = "auto",
    tokenizer=None,
    max_seq_len: int | None = None,
    too_long: str = "error",
    test_prompts: Sequence[Any] = (),
    chat_template: str | None = None,
    train_on: str = "all_assistant",
    held_out: bool = False,
) -> ValidationReport:
    """Check one data file (JSONL, or a parquet/arrow table as training reads it); never raises for
    a problem in the data, only for a file that is missing or cannot be read at all.

    With a `tokenizer`, tokens are counted exactly as training counts them and, with `max_seq_len`,
    examples over it are errors (`too_long="error"`, as training stops) or warnings (`drop` /
    `truncate`, with how many would be dropped or truncated); chat rows are rendered with
    `chat_template` and trained per `train_on`, as in training. `test_prompts` are strings, dicts or
    config `TestPrompt`s; they are checked against the training prompts. A `held_out` file
    (validation or test data) is not expected to be large.
    """
    path = Path(path)
    report = ValidationReport(str(path), data_format)
    try:
        rows, problems = read_rows(path)
    except UserError as err:
        if not path.is_file() or not any(phrase in str(err) for phrase in (" is empty", " has no rows")):
            raise  # a missing or unreadable file is not a report about its data
        # read_jsonl's message for a file without a single line, as a finding.
        message, fix = _split_fix(str(err).removeprefix(f"{path} ").replace(": it needs", ". Fix: it needs", 1))
        report.errors.append(Finding("empty_file", f"the file {message}", None, fix))
        report.stats = {"examples": 0, "file_bytes": path.stat().st_size, "recommended_epochs": auto_epochs(path.stat().st_size),
                        "task": "unknown"}
        return report
    data_format = detect_format(path, rows, data_format) if rows else ("prompt_completion" if data_format == "auto" else data_format)
    report.data_format = data_format
    valid: list[_Row] = []
    for line, obj in rows:
        problem = row_problem(obj, data_format)
        if problem:
            problems.append((line, problem))
        else:
            valid.append(_row_view(line, obj, data_format))
    report.errors = [problem_to_finding(message, line) for line, message in sorted(problems)]

    eos_texts = tuple({EOS_LITERAL, getattr(tokenizer, "eos_token", None) or EOS_LITERAL})
    separator = None
    if data_format == "prompt_completion":
        warnings, separator = _prompt_completion_warnings(valid, eos_texts)
        report.warnings += warnings
    elif data_format == "chat":
        report.warnings += _chat_warnings(valid)
    report.warnings += _duplicate_warnings(valid)
    task, classes = task_type(valid, data_format)
    if not held_out:
        report.warnings += _size_warnings(task, len(valid), classes)
    report.warnings += _test_prompt_warnings(valid, test_prompts, separator)

    size = path.stat().st_size
    report.stats = {
        "examples": len(valid),
        "file_bytes": size,
        "recommended_epochs": auto_epochs(size),
        "task": task,
        "min_examples": MIN_PER_CLASS * max(1, len(classes)) if task == "classification" else MIN_OPEN_ENDED if task == "open_ended" else MIN_CONDITIONAL,
        "separator": separator,
        "classes": dict(sorted(classes.items(), key=lambda item: (-item[1], item[0]))),
    }
    if tokenizer is not None:
        if report.errors:
            report.notes.append("token counts skipped: fix the errors first (training reads only files without errors)")
        elif valid:
            _token_stats(path, data_format, tokenizer, max_seq_len, too_long, chat_template, train_on, report)
    report.warnings.sort(key=lambda w: (list(WARNING_TITLES).index(w.kind) if w.kind in WARNING_TITLES else 99, w.line or 0))
    return report


# ---------------------------------------------------------------------------------------------
# Mechanical fixes


def end_with_eos(completion: str, eos_texts: tuple[str, ...] = (EOS_LITERAL,)) -> str:
    """`completion` ending with EOS. Spaces and tabs before an appended EOS are dropped: `" no  "`
    would teach the model to end its answers with a lone space token. A trailing newline is kept (it
    is the stop sequence of the seeds' older style, and its own token); whitespace after a written EOS
    is a slip, not text to keep, so it is dropped rather than a second EOS added."""
    if completion.endswith(eos_texts):
        return completion
    if completion.rstrip().endswith(eos_texts):
        return completion.rstrip()
    return (completion.rstrip(TRAILING_SPACE) or completion) + EOS_LITERAL


def fix_row(obj: dict, eos_texts: tuple[str, ...] = (EOS_LITERAL,)) -> tuple[dict, list[str]]:
    """A prompt/completion row with the mechanical fixes applied, and the kinds fixed.

    Idempotent: a fixed row needs no further fix.
    """
    fixed = dict(obj)
    kinds: list[str] = []
    prompt = obj["prompt"].rstrip(TRAILING_SPACE)
    if prompt != obj["prompt"]:
        fixed["prompt"], kinds = prompt, kinds + ["prompt_trailing_whitespace"]
    completion = obj["completion"]
    if not completion[:1].isspace():
        completion, kinds = " " + completion, kinds + ["leading_space"]
    if not completion.endswith(eos_texts):
        completion = end_with_eos(completion, eos_texts)
        kinds.append("missing_eos")
    if completion != obj["completion"]:
        fixed["completion"] = completion
    return fixed, kinds


def fixed_lines(path: str | Path, *, data_format: str = "auto") -> tuple[list[bytes], Counter]:
    """The file's lines with the mechanical fixes (leading space and EOS on completions, trailing
    spaces dropped before the EOS; trailing whitespace off prompts) and how many of each were made.
    Lines that need no fix are kept byte for byte, so fixing a fixed file changes nothing. Raises
    `UserError` when the file has errors (they need a person, not a rule). Only prompt/completion
    files have fixable warnings.
    """
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        raise UserError(f"--fix rewrites JSONL files, and {path} is a table: fix it where it was made, or convert it to JSONL")
    report = validate_file(path, data_format=data_format)
    if report.errors:
        raise_problems(path, [e.text() for e in report.errors])
    changes: Counter = Counter()
    out: list[bytes] = []
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                raw += b"\n"
            text = raw.decode("utf-8-sig" if not out else "utf-8")
            if report.data_format != "prompt_completion" or not text.strip():
                out.append(raw)
                continue
            fixed, kinds = fix_row(json.loads(text))
            changes.update(kinds)
            out.append((json.dumps(fixed, ensure_ascii=False) + "\n").encode("utf-8") if kinds else raw)
    return out, changes


# ---------------------------------------------------------------------------------------------
# Tokenizer and the trainer's preflight


def load_local_tokenizer(name_or_path: str) -> tuple[Any, str | None]:
    """(tokenizer, None), or (None, why not) when it is not available locally: nothing is downloaded
    and no repository code runs, so validating data is always safe and offline."""
    try:
        source = model_source(name_or_path, "tokenizer")
    except ModelFolderMissing:
        return None, f"tokenizer folder {name_or_path} does not exist: token counts and length checks skipped"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False), None
    except Exception as err:  # noqa: BLE001 - any failure only means "no token statistics"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"tokenizer {name_or_path!r} is not available locally ({first}): token counts and length checks skipped"


def validate_config_data(config, tokenizer=None) -> list[ValidationReport]:
    """Validate every JSONL training and validation file of a config, with its settings (format,
    max_seq_len, too_long) and, for training files, its test prompts."""
    data = config.data
    reports = []
    for which, files in (("train", data.train_file), ("validation", data.validation_file)):
        for path in [files] if isinstance(files, str) else files or []:
            reports.append(validate_file(
                path,
                data_format=data.format,
                tokenizer=tokenizer,
                max_seq_len=data.max_seq_len,
                too_long=data.too_long,
                test_prompts=config.test_prompts if which == "train" else (),
                chat_template=data.chat_template,
                train_on=data.train_on,
                held_out=which != "train",
            ))
    return reports


def write_data_reports(path: str | Path, reports: list[ValidationReport]) -> None:
    """The preflight's reports as one JSON file (the run folder's data_report.json)."""
    Path(path).write_text(json.dumps([r.to_dict() for r in reports], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def preflight_data(config, tokenizer=None, *, log=print, report_path: str | Path | None = None) -> list[ValidationReport]:
    """The trainer's data check before any model loads: errors stop the run (with `data.on_error:
    error`), warnings are logged; every report is saved as JSON to `report_path` when given."""
    reports = validate_config_data(config, tokenizer)
    if report_path is not None:
        write_data_reports(report_path, reports)
    errors = [f"{r.path} {e.text(row_unit(r.path))}" for r in reports for e in r.errors]
    stop = bool(errors) and getattr(config.data, "on_error", "error") == "error"
    for report in reports:
        if not stop and (report.warnings or report.notes or report.errors):
            log(report.render(stats=False))
    if stop:
        raise UserError(
            f"the data has {_plural(len(errors), 'error')}:\n"
            + "\n".join(f"  {e}" for e in errors[:20])
            + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
            + "\nCheck a file with: python scripts/prepare_data.py validate FILE"
        )
    return reports
