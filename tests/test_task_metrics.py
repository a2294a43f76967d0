"""Task metrics: exact numbers for each measure, the classification report, and what `auto` picks."""

import json

import pytest

from tests.helpers import REPO
from trainer.data.validate import validate_file
from trainer.evaluation import detected_task
from trainer.task_metrics import (
    OTHER_LABEL,
    choose_metrics,
    classification_report,
    error_kind,
    exact_match,
    f1,
    item_f1,
    items,
    looks_like_lists,
    normalize,
    score,
)


def references(name: str) -> list[str]:
    lines = (REPO / "examples" / "data" / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["completion"].removesuffix("<|endoftext|>") for line in lines]


def test_normalization_strips_casefolds_and_collapses_whitespace():
    assert normalize(" Tokyo,\n  BERLIN\t") == "tokyo, berlin"
    assert normalize("Straße") == "strasse"  # casefold, not lower
    assert exact_match("  TOKYO ", "tokyo") == 1.0
    assert exact_match("Tokyo.", "Tokyo") == 0.0
    assert exact_match("", "  ") == 1.0


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("the cat sat", "the cat sat on the mat", 2 / 3),  # precision 1, recall 1/2
        ("a a b", "a b b", 2 / 3),  # shared words counted with multiplicity: a once, b once
        ("Tokyo,Berlin", "tokyo, berlin", 1.0),  # punctuation separates words
        ("Paris", "London", 0.0),
        ("", "", 1.0),
        ("", "London", 0.0),
        ("London", "", 0.0),
    ],
)
def test_token_f1_is_squads(prediction, reference, expected):
    assert f1(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("Berlin and Tokyo.", " Tokyo, Berlin", 1.0),  # order, " and " and a final period do not count
        (" Tokyo", " Tokyo, Berlin", 2 / 3),  # precision 1, recall 1/2
        ("Tokyo; Paris", "Tokyo, Berlin", 0.5),
        ("Tokyo, Tokyo", "Tokyo", 1.0),  # a set: repeats do not count
        (" No locations mentioned", " No locations mentioned", 1.0),
        ("Paris", " No locations mentioned", 0.0),
    ],
)
def test_item_f1_compares_sets_of_items(prediction, reference, expected):
    assert item_f1(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_items_keep_inner_punctuation_and_drop_it_at_the_ends():
    assert items("St. Louis, Paris.; (Rome)\nOslo and  LIMA") == {"st. louis", "paris", "rome", "oslo", "lima"}


def test_classification_report_counts_every_cell():
    refs = ["yes", "yes", "yes", "no", "no", "maybe"]
    preds = [" Yes", "no", "yes", "no", "dunno", "maybe"]
    report = classification_report(preds, refs)
    assert report.labels == ["yes", "no", "maybe"]  # by support, then by name
    assert report.confusion == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]  # last column: OTHER_LABEL
    assert report.accuracy == 4 / 6
    assert report.per_class["yes"] == {"precision": 1.0, "recall": 2 / 3, "f1": pytest.approx(0.8), "support": 3}
    assert report.per_class["no"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report.per_class["maybe"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert report.macro_f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert report.to_dict()["other_label"] == OTHER_LABEL


def test_score_is_the_mean_over_answers_in_the_order_asked():
    scores = score(
        ["item_f1", "exact_match"], ["Tokyo", "Lisbon", "Cairo, Rome"], ["Tokyo, Berlin", "Lisbon", "Rome, Cairo"]
    )
    assert list(scores.values) == ["item_f1", "exact_match"]
    assert scores.values["item_f1"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert scores.values["exact_match"] == pytest.approx(1 / 3)
    accuracy = score(["accuracy"], ["yes", "no"], ["yes", "yes"])
    assert accuracy.values == {"accuracy": 0.5}
    assert accuracy.details["classification"]["confusion"] == [[1, 1]]  # "no" is not a class: counted as (other)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score(["bleu"], ["a"], ["a"])


def test_list_detection_on_the_bundled_data_and_on_sentences():
    assert looks_like_lists(references("locations-valid.jsonl")) is True
    assert looks_like_lists(references("sentiment-valid.jsonl")) is False
    sentences = [
        " Well, I think that is the right answer for you.",
        " It rained all day.",
        " Yes, and then it stopped.",
    ]
    assert looks_like_lists(sentences) is False
    assert looks_like_lists([]) is False


def test_auto_reuses_the_preflights_detection_and_says_what_it_chose():
    sentiment = detected_task([validate_file(REPO / "examples/data/sentiment-train.jsonl")])
    locations = detected_task([validate_file(REPO / "examples/data/locations-train.jsonl")])
    assert sentiment == ("classification", 2) and locations == ("conditional", 0)

    choice = choose_metrics("auto", *sentiment[:1], references("sentiment-valid.jsonl"), sentiment[1])
    assert choice.names == ("accuracy",) and choice.primary == "accuracy"
    assert choice.why == "auto: the data preflight found a classification task (2 classes)"
    choice = choose_metrics("auto", locations[0], references("locations-valid.jsonl"))
    assert choice.names == ("exact_match", "item_f1")
    assert choice.why == "auto: the references are lists (comma- or semicolon-separated items)"
    assert choose_metrics("auto", "conditional", [" It rained all day."]).names == ("f1", "exact_match")
    assert choose_metrics("auto", "open_ended", ["text"]).names == ()
    assert (
        choose_metrics("none", "classification", ["yes"]).names == ()
        and choose_metrics("none", "x", []).primary is None
    )
    assert choose_metrics(["f1", "accuracy"], "classification", ["yes"]).names == ("f1", "accuracy")


@pytest.mark.parametrize(
    "prediction, reference, classification, finish, kind",
    [
        ("  ", "yes", True, "eos", "empty answer"),
        ("No", "yes", True, "eos", "expected 'yes', got 'no'"),
        ("Berlin, Tokyo", "Tokyo, Berlin", False, "eos", "right items, other order or form"),
        ("Tokyo", "Tokyo, Berlin", False, "eos", "missed items"),
        ("Tokyo, Berlin, Rome", "Tokyo, Berlin", False, "eos", "extra items"),
        ("Tokyo, Rome", "Tokyo, Berlin", False, "eos", "wrong items"),
        ("Tokyo Tokyo Tokyo", "Tokyo", False, "length", "did not stop (cut at the token budget)"),
        ("Paris", "Lisbon", False, "eos", "wrong answer"),
    ],
)
def test_error_kinds(prediction, reference, classification, finish, kind):
    assert error_kind(prediction, reference, classification=classification, finish_reason=finish) == kind
