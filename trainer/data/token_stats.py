"""Token statistics of a data file, on exactly the tokens training uses.

With a tokenizer the validator counts prompt, completion and supervised tokens, summarises the
lengths (percentiles, a histogram) against `max_seq_len`, and finds the examples over it by the rule
training applies (`data.too_long`: an error with `error`, a warning with `drop` or `truncate`,
saying whether each would be dropped or truncated). Chat rows the template cannot render are
errors here as in training.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

from trainer.data.examples import Example
from trainer.data.problems import Problem
from trainer.data.tokenize import encode_examples
from trainer.data.validation_report import ValidationReport
from trainer.errors import UserError


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


def length_findings(
    file: str, lengths: dict[int, tuple[int, int]], max_seq_len: int, too_long: str
) -> tuple[list[Problem], list[Problem], dict]:
    """Errors (policy `error`) or warnings (drop/truncate) for examples over `max_seq_len`, by the
    rule of `tokenize_examples`: an example is over when all its tokens are more than max_seq_len;
    truncation keeps it when its first trained token still fits, and drops it otherwise.
    `lengths` maps line -> (first trained position, length)."""
    dropped = truncated = 0
    findings: list[Problem] = []
    for line, (first_trained, length) in lengths.items():
        if length <= max_seq_len:
            continue
        if too_long == "error":
            outcome = "training stops (data.too_long=error)"
        elif too_long == "drop" or first_trained >= max_seq_len:
            outcome, dropped = "it will be dropped", dropped + 1
        else:
            outcome, truncated = "its end will be cut to fit", truncated + 1
        findings.append(
            Problem(
                "too_long",
                file,
                line,
                f"{length} tokens, over max_seq_len={max_seq_len}: {outcome}",
                "raise data.max_seq_len, shorten the example, or set data.too_long to drop or truncate"
                if too_long == "error"
                else "raise data.max_seq_len or shorten the example, if it should be trained whole",
            )
        )
    summary = {"over": len(findings), "dropped": dropped, "truncated": truncated}
    if too_long == "error":
        return findings, [], summary
    return [], findings, summary


def token_stats(
    file: str,
    examples: Sequence[Example],
    tokenizer,
    *,
    max_seq_len: int | None,
    too_long: str,
    chat_template: str | None,
    train_on: str,
    report: ValidationReport,
) -> None:
    """Count tokens and check lengths on exactly the tokens training uses (`encode_examples`, the
    length rule of `apply_length_policy`), into `report`: its `tokens` and `lengths` statistics,
    chat rows the template cannot render as errors (as in training), the tokenizer's warnings about
    chats, and examples over `max_seq_len` as errors (`too_long="error"`) or warnings."""
    try:
        rows, notes = encode_examples(examples, tokenizer, chat_template=chat_template, train_on=train_on, source=file)
    except (UserError, TypeError, ValueError, KeyError) as err:
        report.notes.append(f"token counts skipped: the examples could not be tokenized ({err})")
        return
    report.errors += sorted(notes.problems, key=lambda p: p.line)
    report.warnings += notes.warning_problems(file)
    # Plain ints: the statistics go into JSON.
    line_numbers, all_lengths = rows.lines.tolist(), rows.lengths.tolist()
    lengths = dict(zip(line_numbers, zip(rows.first_trained.tolist(), all_lengths)))
    total = sum(all_lengths)
    trained = int((rows.spans[1::2].astype(np.int64) - rows.spans[0::2]).sum())
    context = total - trained
    supervised = int(rows.supervised().sum())
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
        errors, warnings, summary = length_findings(file, lengths, max_seq_len, too_long)
        report.errors += errors
        report.warnings += warnings
        length_stats.update(summary)
    report.stats["lengths"] = length_stats
