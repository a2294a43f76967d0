"""Shared fixtures: tiny models and tokenizers built locally; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests must never reach a model hub: a missing local file fails loudly instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized-data caches go to a throwaway folder, not the user's ~/.cache.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="trainer-tests-datasets-"))

import torch  # noqa: E402

from tests.helpers import fruit_rows  # noqa: E402

torch.set_num_threads(1)  # the suite runs 2 workers on 2 cores


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model (random init) of every family in trainer/families.py, with a BPE tokenizer,
    saved as folders, by `model_type`."""
    from trainer.families import FAMILIES
    from trainer.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    texts = [row["prompt"] + row["completion"] for row in fruit_rows()] + [
        "Hello world, the quick brown fox jumps over the lazy dog.",
        "List the locations mentioned in the following text.",
    ]
    return {
        family: save_tiny_model(
            root / family, family, texts, vocab_size=320, n_layer=2, n_embd=32, n_head=2, n_positions=64
        )
        for family in FAMILIES
    }


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dirs["gpt2"])


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory, tiny_model_dirs):
    """`trained_checkpoints(family, method)`: a real checkpoint of a tiny run (tests/trained_runs.py),
    trained in-process on first use and shared by the session."""
    from tests.trained_runs import TrainedCheckpoints

    return TrainedCheckpoints(tmp_path_factory, tiny_model_dirs)


@pytest.fixture
def parsed_lines(monkeypatch):
    """The line numbers `trainer.data.jsonl.parse_line` was asked to parse, in order."""
    import trainer.data.jsonl as jsonl

    seen = []
    parse_line = jsonl.parse_line

    def counted(path, line_no, raw):
        seen.append(line_no)
        return parse_line(path, line_no, raw)

    monkeypatch.setattr(jsonl, "parse_line", counted)
    return seen
