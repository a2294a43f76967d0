#!/usr/bin/env python
"""Generate the bundled example datasets: location extraction (a small NER task) and sentiment
classification.

    python scripts/make_example_data.py [--out examples/data] [--seed 0]

writes ``locations-train.jsonl`` and ``locations-valid.jsonl`` in the seeds'
prompt/completion format:

    {"prompt": "List the locations mentioned in the following text.\\nText: <sentence>\\nLocations:",
     "completion": " Paris, London<|endoftext|>"}

Sentences come from fixed templates with 0, 1 or 2 location slots, filled from a
fixed list of single-word place names (plus person names, days and months as
distractors, so the model must learn *which* capitalised words are places).
Locations are listed in the order they appear, as the seeds advise. A tiny model
trained from scratch learns this in about a minute on a CPU, and because the
held-out sentences are new combinations of templates and names, its answers on
them show whether it generalises rather than memorises.

It also writes ``sentiment-train.jsonl`` and ``sentiment-valid.jsonl`` (`make_sentiment`), the
seeds' classification example: short product and film reviews labelled " positive" or
" negative" by the adjective or verb they hold (a negation that flips it, "not boring", proved too
hard for the tiny example model to learn in a minute, so no sentence has one):

    {"prompt": "Review: What a dull film!\nSentiment:", "completion": " negative<|endoftext|>"}

The output is a pure function of the seed: rerunning reproduces the files byte for byte (each
dataset draws from its own generator, so adding one never changes another). The held-out
`TEST_PROMPTS` and `SENTIMENT_TEST_PROMPTS` are never generated into any file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "List the locations mentioned in the following text."
SEPARATOR = "\nLocations:"  # fixed separator that ends every prompt (no trailing space)
END = "<|endoftext|>"
NO_LOCATIONS = "No locations mentioned"

PLACES = [
    "Paris",
    "London",
    "Berlin",
    "Tokyo",
    "Madrid",
    "Rome",
    "Vienna",
    "Lisbon",
    "Dublin",
    "Oslo",
    "Prague",
    "Cairo",
    "Sydney",
    "Toronto",
    "Chicago",
    "Boston",
    "Seoul",
    "Mumbai",
    "Nairobi",
    "Lima",
    "Athens",
    "Warsaw",
    "Istanbul",
    "Moscow",
    "Denver",
]
PERSONS = ["Anna", "Maria", "David", "Tom", "Sarah", "James", "Laura", "Peter", "Emma", "Omar", "Lucy", "Daniel"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "March", "April", "June", "July", "September", "October", "December"]

# Slots: {A} and {B} are places (A appears before B in every template, so the answer order
# is "A, B"); {P}/{Q} persons, {D} a day, {M} a month.
TEMPLATES_0 = [
    "{P} finished the report on {D} morning.",
    "The meeting with {P} was moved to {D}.",
    "{P} and {Q} are working on a new project.",
    "{P} bought a new bike last {D}.",
    "{P} called {Q} to talk about the budget.",
    "The weather was cold and rainy all week.",
    "Our team won the final match after a long season.",
    "{P} will present the results in {M}.",
    "The new phone from the company sold out on {D}.",
    "{P} wrote a long letter to {Q} in {M}.",
]
TEMPLATES_1 = [
    "{P} spent the summer in {A} with friends.",
    "The conference will take place in {A} in {M}.",
    "Heavy rain caused flooding in {A} on {D}.",
    "{P} moved to {A} to start a new job.",
    "A new museum opened in {A} last week.",
    "The company plans to open an office in {A}.",
    "Thousands of fans gathered in {A} to watch the final.",
    "{A} hosted the summit this year.",
    "{P} met {Q} at a small cafe in {A}.",
    "Prices in {A} rose again in {M}.",
]
TEMPLATES_2 = [
    "The train from {A} to {B} was delayed by two hours.",
    "{P} flew from {A} to {B} on {D}.",
    "Talks between {A} and {B} ended without an agreement.",
    "The band will play in {A} and then in {B}.",
    "{P} lives in {A} but works in {B}.",
    "Prices in {A} rose faster than in {B} this year.",
    "{A} and {B} signed a new trade deal in {M}.",
    "{P} drove from {A} to {B} with {Q}.",
]

# Held-out test prompts: new combinations of known templates and names, checked by
# tests/test_tiny_models.py to be in neither file. The trainer's default config asks the
# model these at every checkpoint; `expected` is the greedy answer a trained model gives
# (the completion without the trailing <|endoftext|>).
_TEST_SENTENCES = [
    ("The train from Tokyo to Berlin was delayed by two hours.", ["Tokyo", "Berlin"]),
    ("Maria spent the summer in Lisbon with friends.", ["Lisbon"]),
    ("David finished the report on Friday morning.", []),
    ("Heavy rain caused flooding in Cairo on Monday.", ["Cairo"]),
    ("Anna lives in Dublin but works in London.", ["Dublin", "London"]),
]


def make_prompt(sentence: str) -> str:
    """The prompt the model sees for `sentence`, ending with the fixed separator."""
    return f"{INSTRUCTION}\nText: {sentence}{SEPARATOR}"


def make_answer(locations: list[str]) -> str:
    """The completion text without the end marker: leading space, places in text order."""
    return " " + (", ".join(locations) if locations else NO_LOCATIONS)


TEST_PROMPTS = [{"prompt": make_prompt(s), "expected": make_answer(locs)} for s, locs in _TEST_SENTENCES]


def _random_sentence(rng: random.Random) -> tuple[str, list[str]]:
    """One sentence and its locations in order of appearance. Mix: 25% none, 35% one, 40% two."""
    r = rng.random()
    templates = TEMPLATES_0 if r < 0.25 else TEMPLATES_1 if r < 0.60 else TEMPLATES_2
    template = rng.choice(templates)
    a, b = rng.sample(PLACES, 2)  # two different places: "Paris to Paris" is not a sentence
    p, q = rng.sample(PERSONS, 2)
    sentence = template.format(A=a, B=b, P=p, Q=q, D=rng.choice(DAYS), M=rng.choice(MONTHS))
    locations = [place for place, slot in ((a, "{A}"), (b, "{B}")) if slot in template]
    return sentence, locations


def generate(n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """`n` examples whose sentences are distinct and not in `taken` (which is updated)."""
    examples = []
    while len(examples) < n:
        sentence, locations = _random_sentence(rng)
        if sentence in taken:
            continue
        taken.add(sentence)
        examples.append({"prompt": make_prompt(sentence), "completion": make_answer(locations) + END})
    return examples


# ---------------------------------------------------------------------------------------------
# Sentiment (classification)

SENTIMENT_SEPARATOR = "\nSentiment:"
POSITIVE, NEGATIVE = "positive", "negative"
THINGS = [
    "film",
    "book",
    "phone",
    "hotel",
    "meal",
    "camera",
    "game",
    "album",
    "laptop",
    "service",
    "plot",
    "battery",
    "screen",
    "room",
    "coffee",
    "show",
]
GOOD = ["great", "excellent", "wonderful", "good", "lovely", "fantastic", "amazing", "pleasant"]
BAD = ["terrible", "awful", "boring", "bad", "poor", "disappointing", "horrible", "dull"]
LIKE = ["loved", "enjoyed", "liked", "recommend"]
DISLIKE = ["hated", "disliked", "regret buying", "returned"]
# {T} a thing, {G} an adjective, {V} a verb: the sentence's sentiment is its word's (GOOD or LIKE: positive).
SENTIMENT_TEMPLATES = [
    "The {T} was {G}.",
    "What a {G} {T}!",
    "I {V} the {T}.",
    "Honestly, the {T} is {G}.",
    "My friends said the {T} was {G}, and they were right.",
    "Such a {G} {T}.",
]
_SENTIMENT_TESTS = [
    ("The camera was boring.", NEGATIVE),
    ("I hated the hotel.", NEGATIVE),
    ("What a wonderful album!", POSITIVE),
    ("Honestly, the coffee is good.", POSITIVE),
]


def sentiment_prompt(review: str) -> str:
    return f"Review: {review}{SENTIMENT_SEPARATOR}"


SENTIMENT_TEST_PROMPTS = [{"prompt": sentiment_prompt(r), "expected": " " + label} for r, label in _SENTIMENT_TESTS]


def _random_review(rng: random.Random) -> tuple[str, str]:
    template = rng.choice(SENTIMENT_TEMPLATES)
    good = rng.random() < 0.5
    review = template.format(
        T=rng.choice(THINGS), G=rng.choice(GOOD if good else BAD), V=rng.choice(LIKE if good else DISLIKE)
    )
    return review, POSITIVE if good else NEGATIVE


def make_sentiment(n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """`n` labelled reviews, distinct and not in `taken` (which is updated)."""
    examples = []
    while len(examples) < n:
        review, label = _random_review(rng)
        if review in taken:
            continue
        taken.add(review)
        examples.append({"prompt": sentiment_prompt(review), "completion": f" {label}{END}"})
    return examples


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "examples/data",
        help="output folder (default examples/data in this repository)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--train", type=int, default=1000, help="training examples (default 1000)")
    parser.add_argument("--valid", type=int, default=100, help="validation examples (default 100)")
    parser.add_argument("--sentiment-train", type=int, default=600, help="sentiment training examples (default 600)")
    parser.add_argument("--sentiment-valid", type=int, default=100, help="sentiment validation examples (default 100)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    # Test sentences are reserved first, so neither split can contain them.
    taken = {s for s, _ in _TEST_SENTENCES}
    train = generate(args.train, rng, taken)
    valid = generate(args.valid, rng, taken)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "locations-train.jsonl", train)
    write_jsonl(args.out / "locations-valid.jsonl", valid)
    print(f"wrote {len(train)} train and {len(valid)} valid examples to {args.out}")
    # Its own generator: the locations files stay byte for byte what they were.
    sentiment_rng = random.Random(f"sentiment-{args.seed}")
    taken = {r for r, _ in _SENTIMENT_TESTS}
    write_jsonl(args.out / "sentiment-train.jsonl", make_sentiment(args.sentiment_train, sentiment_rng, taken))
    write_jsonl(args.out / "sentiment-valid.jsonl", make_sentiment(args.sentiment_valid, sentiment_rng, taken))
    print(f"wrote {args.sentiment_train} train and {args.sentiment_valid} valid sentiment examples to {args.out}")
    print("held-out test prompts (expected greedy completion):")
    for t in TEST_PROMPTS:
        print(f"  {t['prompt']!r} -> {t['expected']!r}")


if __name__ == "__main__":
    main()
