"""Split a data file into training and test files: deterministic, stratified for classification.

The lines are copied byte for byte in their original order; only which file each goes to is
chosen, by a seeded shuffle. For classification-like data (few distinct completions, each
repeated) every class is split on its own, so each class keeps its share in both files.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.examples import read_examples
from trainer.data.quality import class_label, task_type
from trainer.data.readers import TABLE_SUFFIXES
from trainer.errors import UsageError, UserError


@dataclass
class Split:
    """Line numbers (1-based) in each part, and per-class counts when stratified."""

    train_lines: list[int]
    test_lines: list[int]
    stratified: bool
    classes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """class -> (train count, test count)."""

    def summary(self) -> str:
        total = len(self.train_lines) + len(self.test_lines)
        text = f"{total} examples: {len(self.train_lines)} train, {len(self.test_lines)} test"
        if self.stratified:
            text += ", stratified by completion:\n" + "\n".join(
                f"  {label!r}: {train} train, {test} test" for label, (train, test) in self.classes.items()
            )
        return text


def held_out_counts(class_sizes: dict[str, int], fraction: float) -> dict[str, int]:
    """Test examples per class: each within one of `size * fraction`, summing to the rounded total
    (largest remainders get the extra ones; ties go to the class named first)."""
    exact = {label: size * fraction for label, size in class_sizes.items()}
    counts = {label: math.floor(value) for label, value in exact.items()}
    extra = round(sum(exact.values())) - sum(counts.values())
    by_remainder = sorted(exact, key=lambda label: (-(exact[label] - counts[label]), label))
    for label in by_remainder[:extra]:
        counts[label] += 1
    return counts


def split_lines(keys: list[tuple[int, str | None]], fraction: float, seed: int) -> Split:
    """Choose test lines among `keys` = [(line, class or None)]: stratified when classes are given.

    At least one example goes to each part. The same keys, fraction and seed give the same split.
    """
    if not 0 < fraction < 1:
        raise UsageError(f"--test-fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(keys) < 2:
        raise UserError(f"cannot split {len(keys)} example(s): a split needs at least 2")
    rng = random.Random(seed)
    stratified = keys[0][1] is not None
    groups: dict[str, list[int]] = defaultdict(list)
    for line, label in keys:
        groups[label if stratified else ""].append(line)
    wanted = held_out_counts({label: len(lines) for label, lines in groups.items()}, fraction)
    total = sum(wanted.values())
    if total < 1 or total > len(keys) - 1:
        # Too few examples for this fraction: still one test example, and never all of them.
        wanted = held_out_counts(
            {label: len(lines) for label, lines in groups.items()}, min(max(1, total), len(keys) - 1) / len(keys)
        )
    test: set[int] = set()
    classes: dict[str, tuple[int, int]] = {}
    for label in sorted(groups):  # a fixed order, so the seeded shuffles are reproducible
        lines = groups[label][:]
        rng.shuffle(lines)
        test.update(lines[: wanted[label]])
        classes[label] = (len(lines) - wanted[label], wanted[label])
    ordered = [line for line, _ in keys]
    return Split(
        [n for n in ordered if n not in test],
        [n for n in ordered if n in test],
        stratified,
        dict(sorted(classes.items(), key=lambda item: (-sum(item[1]), item[0]))) if stratified else {},
    )


def _prompt_and_reply(example) -> tuple[str, str]:
    """What an example is asked and what it answers: a chat's turns before its last assistant reply,
    and that reply."""
    if example.messages is None:
        return example.prompt, example.completion
    last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    return repr(example.messages[:last]), example.messages[last][1]


def split_file(
    path: str | Path, fraction: float, seed: int, *, data_format: str = "auto"
) -> tuple[Split, dict[int, bytes]]:
    """Split a file that passes validation; returns the split and each example line's bytes."""
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        raise UserError(f"split copies JSONL lines, and {path} is a table: convert it to JSONL first")
    examples = read_examples(path, data_format)  # a file with errors stops here, every line listed
    pairs = [_prompt_and_reply(e) for e in examples]
    task, _ = task_type(pairs, "chat" if examples and examples[0].messages is not None else "prompt_completion")
    keys = [
        (e.line, class_label(reply) if task == "classification" else None) for e, (_, reply) in zip(examples, pairs)
    ]
    raw: dict[int, bytes] = {}
    wanted = {e.line for e in examples}
    with path.open("rb") as handle:
        for line_no, data in enumerate(handle, start=1):
            if line_no == 1:
                data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark belongs to no example
            if line_no in wanted:
                raw[line_no] = data if data.endswith(b"\n") else data + b"\n"
    return split_lines(keys, fraction, seed), raw


def split_output_paths(path: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """NAME-train.jsonl and NAME-test.jsonl beside the input (or in `out_dir`)."""
    path = Path(path)
    folder = Path(out_dir) if out_dir is not None else path.parent
    return folder / f"{path.stem}-train.jsonl", folder / f"{path.stem}-test.jsonl"
