"""Tiny training runs made in-process for the tests of export, generate and serve: one real
checkpoint per (family, method), trained once per test process and shared."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import fruit_rows, write_jsonl

TEST_PROMPTS = [
    {"prompt": "banana ->", "max_new_tokens": 16},
    {"prompt": "kiwi ->", "max_new_tokens": 16, "stop": ["e"]},
    {"prompt": "tomato ->", "temperature": 0.8, "top_k": 20, "max_new_tokens": 8},
    {"messages": [{"role": "system", "content": "Marv."}, {"role": "user", "content": "Hi?"}], "max_new_tokens": 8},
    {"prompt": "", "max_new_tokens": 16},
]
SEED = 1


def train_tiny_run(folder: Path, model_dir: Path, method: str) -> Path:
    """Train half an epoch of the fruit task (3 optimizer steps) with one checkpoint; returns it."""
    from trainer.train import main

    config = {
        "model": {"name_or_path": str(model_dir)},
        "method": method,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_file": str(write_jsonl(folder / "train.jsonl", fruit_rows(48))), "max_seq_len": 32},
        "training": {
            "epochs": 0.5,
            "micro_batch_size": 8,
            "learning_rate": 3e-2 if method == "lora" else 1e-2,
            "warmup_ratio": 0.1,
            "seed": SEED,
        },
        "checkpoints": {"count": 1},
        "test_prompts": TEST_PROMPTS,
        "output_dir": str(folder / "run"),
    }
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main([str(config_path)]) == 0
    [checkpoint] = sorted((folder / "run").glob("checkpoint-*"))
    return checkpoint


class TrainedCheckpoints:
    """`checkpoints("gptj", "lora")`: the checkpoint folder of a tiny run, trained on first use."""

    def __init__(self, tmp_path_factory, tiny_model_dirs: dict[str, Path]):
        self.tmp_path_factory, self.tiny_model_dirs = tmp_path_factory, tiny_model_dirs
        self.cache: dict[tuple[str, str], Path] = {}

    def __call__(self, family: str = "gpt2", method: str = "lora") -> Path:
        if (family, method) not in self.cache:
            folder = self.tmp_path_factory.mktemp(f"run-{family}-{method}")
            self.cache[family, method] = train_tiny_run(folder, self.tiny_model_dirs[family], method)
        return self.cache[family, method]


def read_samples(checkpoint: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
