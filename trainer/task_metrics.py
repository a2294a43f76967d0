"""Task metrics: how right a checkpoint's answers are, by the task's own measure (no torch).

Every comparison first normalizes both texts (`normalize`): surrounding whitespace stripped,
casefolded (Unicode's caseless form, stronger than lower()), and every run of whitespace
(spaces, tabs, newlines) collapsed to one space. So " Tokyo, Berlin\\n" equals "tokyo,  berlin".

* `exact_match`: 1 when the normalized prediction equals the normalized reference, else 0.
* `f1`: SQuAD's token-level F1: the words both texts share (counted with multiplicity) against the
  words of each. Words are the normalized text split on whitespace, with punctuation treated as a
  space ("Tokyo,Berlin" is two words). Unlike SQuAD's English-only script, articles (a, an, the)
  are kept: the tasks here need not be English.
* `item_f1`: for list-like answers ("Tokyo, Berlin"): each text is split into items at commas,
  semicolons, newlines and the word " and "; each item is normalized with the punctuation at its
  ends removed ("Berlin." is "berlin"); the F1 of the two sets of items (order and repeats do not
  count). "Trinidad and Tobago" would be two items: a known limit of the rule.
* `accuracy`: classification, the share of exact matches, with per-class precision, recall and
  F1 and a confusion matrix (`classification_report`).

Both texts empty counts as right (1.0) for every measure; one of them empty as wrong (0.0).

`choose_metrics` turns `eval.metrics` into the list to compute: `auto` picks by what the data
preflight detected (trainer/data/validate.py `task_type`): classification -> accuracy; list-like
references (`looks_like_lists`) -> exact_match and item_f1; open-ended text -> none (there is no
answer to compare with); other generation -> f1 and exact_match. The first metric is the primary
one, which the recommendation (trainer/recommend.py) ranks checkpoints by.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

METRIC_NAMES = ("exact_match", "f1", "item_f1", "accuracy")
OTHER_LABEL = "(other)"  # a classification prediction that is none of the classes

_ITEM_SEPARATORS = re.compile(r"[,;\n]| and ", flags=re.IGNORECASE)
_LIST_SEPARATORS = re.compile(r"[,;]")
LIST_SHARE = 0.2  # references that hold a list, for list-like data: at least this share...
LIST_ITEM_WORDS = 4  # ...each item of at most this many words


def normalize(text: str) -> str:
    """Strip, casefold, collapse whitespace: what 'the same answer' means for every metric."""
    return " ".join(text.casefold().split())


def _without_punctuation(text: str) -> str:
    return "".join(" " if unicodedata.category(char).startswith("P") else char for char in text)


def words(text: str) -> list[str]:
    """The normalized text's words, punctuation counted as a space (for `f1`)."""
    return _without_punctuation(normalize(text)).split()


def items(text: str) -> set[str]:
    """The set of normalized items of a list-like answer (for `item_f1`)."""
    found = set()
    for part in _ITEM_SEPARATORS.split(text):
        item = normalize(part)
        # Punctuation at an item's ends is not part of it ("Berlin." -> "berlin"); inside it is ("St. Louis").
        while item and unicodedata.category(item[0]).startswith("P"):
            item = item[1:].strip()
        while item and unicodedata.category(item[-1]).startswith("P"):
            item = item[:-1].strip()
        if item:
            found.add(item)
    return found


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _f1(common: int, predicted: int, expected: int) -> float:
    if predicted == 0 and expected == 0:
        return 1.0
    if common == 0:
        return 0.0
    precision, recall = common / predicted, common / expected
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of one answer."""
    predicted, expected = words(prediction), words(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    return _f1(common, len(predicted), len(expected))


def item_f1(prediction: str, reference: str) -> float:
    """F1 of the sets of items of one list-like answer."""
    predicted, expected = items(prediction), items(reference)
    return _f1(len(predicted & expected), len(predicted), len(expected))


# ---------------------------------------------------------------------------------------------
# Classification


@dataclass
class ClassificationReport:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of one set of answers.

    `labels` are the classes (the references' normalized texts) by support, most examples first,
    then by name; `confusion[i][j]` counts examples of class `labels[i]` predicted as `labels[j]`,
    the last column (`OTHER_LABEL`) those predicted as none of the classes."""

    accuracy: float
    labels: list[str]
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]
    macro_f1: float

    def to_dict(self) -> dict:
        return {
            "labels": self.labels,
            "other_label": OTHER_LABEL,
            "per_class": self.per_class,
            "confusion": self.confusion,
            "macro_f1": self.macro_f1,
        }


def classification_report(predictions: Sequence[str], references: Sequence[str]) -> ClassificationReport:
    expected = [normalize(r) for r in references]
    predicted = [normalize(p) for p in predictions]
    support = Counter(expected)
    labels = sorted(support, key=lambda label: (-support[label], label))
    index = {label: i for i, label in enumerate(labels)}
    other = len(labels)
    confusion = [[0] * (len(labels) + 1) for _ in labels]
    for truth, guess in zip(expected, predicted):
        confusion[index[truth]][index.get(guess, other)] += 1
    per_class = {}
    for label, i in index.items():
        right = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        precision = right / predicted_as if predicted_as else 0.0
        recall = right / support[label]
        f1_value = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1_value, "support": support[label]}
    correct = sum(confusion[i][i] for i in range(len(labels)))
    accuracy = correct / len(expected) if expected else 0.0
    macro = sum(c["f1"] for c in per_class.values()) / len(per_class) if per_class else 0.0
    return ClassificationReport(accuracy, labels, per_class, confusion, macro)


# ---------------------------------------------------------------------------------------------
# Choosing and computing


@dataclass(frozen=True)
class MetricChoice:
    """The metrics to compute (the first is the primary one; empty: none) and why they were chosen."""

    names: tuple[str, ...]
    why: str

    @property
    def primary(self) -> str | None:
        return self.names[0] if self.names else None


def looks_like_lists(references: Sequence[str]) -> bool:
    """True when the references are lists of short items: at least `LIST_SHARE` of them hold a comma
    or semicolon, and in those every item has at most `LIST_ITEM_WORDS` words (a sentence with a
    comma has longer parts)."""
    with_separator = [r for r in references if _LIST_SEPARATORS.search(r)]
    if not references or len(with_separator) < LIST_SHARE * len(references):
        return False
    return all(len(part.split()) <= LIST_ITEM_WORDS for r in with_separator for part in _LIST_SEPARATORS.split(r))


def choose_metrics(
    setting: str | Sequence[str], task: str, references: Sequence[str], classes: int = 0
) -> MetricChoice:
    """The metrics for `eval.metrics` (`auto`, `none` or a list of names). `task` is what the
    preflight detected (`classification`, `conditional`, `open_ended`), `classes` how many classes."""
    if setting == "none":
        return MetricChoice((), "eval.metrics=none")
    if not isinstance(setting, str):
        return MetricChoice(tuple(setting), "eval.metrics lists them")
    if task == "classification":
        return MetricChoice(("accuracy",), f"auto: the data preflight found a classification task ({classes} classes)")
    if task == "open_ended":
        return MetricChoice((), "auto: open-ended text has no reference answer to compare with")
    if looks_like_lists(references):
        return MetricChoice(
            ("exact_match", "item_f1"), "auto: the references are lists (comma- or semicolon-separated items)"
        )
    # Free text rarely matches exactly, so exact match would tie across checkpoints: F1 leads.
    return MetricChoice(("f1", "exact_match"), "auto: short generation (references are neither classes nor lists)")


@dataclass
class Scores:
    """Metric values {name: value in [0, 1]} over a set of answers, and the details behind them
    (`classification`: per-class and confusion, for accuracy)."""

    values: dict[str, float]
    details: dict = field(default_factory=dict)


_PER_EXAMPLE = {"exact_match": exact_match, "f1": f1, "item_f1": item_f1}


def score(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> Scores:
    """Every metric in `names` (in that order) as the mean over the answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    values: dict[str, float] = {}
    details: dict = {}
    for name in names:
        if name == "accuracy":
            report = classification_report(predictions, references)
            values[name] = report.accuracy
            details["classification"] = report.to_dict()
        elif name in _PER_EXAMPLE:
            measure = _PER_EXAMPLE[name]
            values[name] = (
                sum(measure(p, r) for p, r in zip(predictions, references)) / len(references) if references else 0.0
            )
        else:
            raise ValueError(f"unknown metric {name!r}: known are {', '.join(METRIC_NAMES)}")
    return Scores(values, details)


def error_kind(prediction: str, reference: str, *, classification: bool, finish_reason: str | None = None) -> str:
    """What kind of mistake a wrong answer is, so that a report can show a few of each kind:
    an empty answer; one that never ended (cut at the token budget); for classification the
    confusion ('expected yes, got no'); for lists items missed, added, both, or the right items in
    another order; else a wrong answer."""
    if not normalize(prediction):
        return "empty answer"
    if classification:
        return f"expected {normalize(reference)!r}, got {normalize(prediction)!r}"
    if finish_reason == "length":
        return "did not stop (cut at the token budget)"
    predicted, expected = items(prediction), items(reference)
    if len(expected) > 1 or len(predicted) > 1:
        if predicted == expected:
            return "right items, other order or form"
        missed, added = expected - predicted, predicted - expected
        if missed and added:
            return "wrong items"
        return "missed items" if missed else "extra items"
    return "wrong answer"
