#!/usr/bin/env python
"""Build the tiny random-init model folder used by the embedded default job.

    python scripts/make_tiny_model.py [--family gpt2] [--out examples/tiny-gpt2]
                                      [--data examples/data/locations-train.jsonl] [...]

Trains a byte-level BPE tokenizer on the example training data (prompts and
completions) and saves it with a randomly initialised model of the chosen family
(see trainer/tiny_models.py). Nothing is downloaded. The defaults reproduce the
committed ``examples/tiny-gpt2`` folder; they were chosen so that full fine-tuning
on ``examples/data`` learns the task in about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script from anywhere: make the repository root importable.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.tiny_models import FAMILIES, save_tiny_model  # noqa: E402

# The committed examples/tiny-gpt2 is exactly these defaults.
DEFAULTS = dict(family="gpt2", vocab_size=1024, seed=0, n_layer=2, n_embd=128, n_head=4, n_positions=256)


def read_texts(path: Path) -> list[str]:
    """Prompts and completions of a prompt/completion JSONL file, in file order."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                example = json.loads(line)
                texts += [example["prompt"], example["completion"]]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default=DEFAULTS["family"])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default examples/tiny-<family>)")
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO / "examples/data/locations-train.jsonl",
        help="prompt/completion JSONL the tokenizer is trained on",
    )
    for name in ("vocab_size", "seed", "n_layer", "n_embd", "n_head", "n_positions"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=DEFAULTS[name], help=f"default {DEFAULTS[name]}"
        )
    args = parser.parse_args(argv)

    out = args.out or REPO / f"examples/tiny-{args.family.replace('_', '-')}"
    path = save_tiny_model(
        out,
        args.family,
        read_texts(args.data),
        vocab_size=args.vocab_size,
        seed=args.seed,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_positions=args.n_positions,
    )
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    print(f"wrote {args.family} model to {path} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
