"""Train/test split: deterministic by seed, stratified for classification, lines copied exactly."""

import json
from collections import Counter

import pytest

from tests.helpers import write_jsonl
from trainer.data.split import held_out_counts, split_file, split_lines, split_output_paths
from trainer.errors import UsageError, UserError

EOS = "<|endoftext|>"


def classification_rows() -> list[dict]:
    """Unbalanced classes: 40 yellow, 25 green, 7 red (distinct prompts)."""
    sizes = {"yellow": 40, "green": 25, "red": 7}
    return [
        {"prompt": f"{label} item {i} ->", "completion": f" {label}{EOS}"}
        for label, n in sizes.items()
        for i in range(n)
    ]


def parts(path, fraction=0.2, seed=0):
    split, raw = split_file(path, fraction, seed)
    return b"".join(raw[n] for n in split.train_lines), b"".join(raw[n] for n in split.test_lines), split


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", classification_rows())
    assert parts(path, seed=3)[:2] == parts(path, seed=3)[:2]
    assert parts(path, seed=3)[1] != parts(path, seed=4)[1]


def test_stratified_split_keeps_each_class_share(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", classification_rows())
    train, test, split = parts(path, fraction=0.2)
    assert split.stratified
    assert split.classes == {"yellow": (32, 8), "green": (20, 5), "red": (6, 1)}
    held_out = Counter(json.loads(line)["completion"] for line in test.decode().splitlines())
    sizes = Counter(row["completion"] for row in classification_rows())
    for label, size in sizes.items():
        assert abs(held_out[label] - size * 0.2) <= 1
    assert "'red': 6 train, 1 test" in split.summary()


def test_lines_are_copied_exactly_and_each_goes_to_one_part(tmp_path):
    rows = [{"prompt": f"Topic {i}\nOutline:", "completion": f" caf\u00e9 {i}{EOS}"} for i in range(30)]
    path = tmp_path / "data.jsonl"
    original = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    path.write_bytes(("\ufeff" + original[0] + "\n" + "".join(original[1:])).encode("utf-8"))  # BOM and a blank line
    train, test, split = parts(path, fraction=0.1)
    assert not split.stratified and len(split.test_lines) == 3
    assert sorted(train.decode().splitlines(True) + test.decode().splitlines(True)) == sorted(original)


def test_held_out_counts_sum_to_the_rounded_total_and_stay_within_one():
    sizes = {"a": 7, "b": 7, "c": 7}
    counts = held_out_counts(sizes, 0.5)
    assert sum(counts.values()) == round(21 * 0.5) == 10
    assert all(abs(counts[k] - sizes[k] * 0.5) <= 1 for k in sizes)
    assert counts == {"a": 4, "b": 3, "c": 3}


def test_tiny_files_keep_one_example_on_each_side():
    split = split_lines([(1, None), (2, None), (3, None)], 0.01, seed=0)
    assert len(split.test_lines) == 1 and len(split.train_lines) == 2
    with pytest.raises(UserError, match="at least 2"):
        split_lines([(1, None)], 0.5, seed=0)
    with pytest.raises(UsageError, match="between 0 and 1"):
        split_lines([(1, None), (2, None)], 1.0, seed=0)


def test_a_file_with_errors_is_not_split(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a ->", "completion": " b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        split_file(path, 0.5, 0)


def test_output_paths_beside_the_input_or_in_a_folder(tmp_path):
    assert split_output_paths(tmp_path / "my.data.jsonl") == (
        tmp_path / "my.data-train.jsonl",
        tmp_path / "my.data-test.jsonl",
    )
    assert split_output_paths("x.jsonl", tmp_path / "out")[1] == tmp_path / "out" / "x-test.jsonl"
