"""Benchmark the data stage: read + validate + tokenize + mask a large prompt/completion file.

    python scripts/bench_data.py                         # 100 MB in a temporary folder
    python scripts/bench_data.py --size-mb 20 --dir /tmp/bench --num-proc 2 --tokenizers tiny

Generates a deterministic JSONL file of realistic shape (instruction + passage prompts ending in a
`\\n\\n###\\n\\n` separator, completions that start with a space and end with `<|endoftext|>`,
log-normal lengths: prompts median 765 and mean 1,044 characters, completions median 229 and mean 335;
Zipf-distributed made-up words, some non-ASCII),
then times `trainer.data.pipeline.prepare_data` cold (empty cache) and cached (a rerun), for:

* `tiny`: the tokenizer the tests use (`trainer.tiny_models.train_tokenizer`, 1024 tokens);
* `gpt2`: a GPT-2-sized byte-level BPE (50,257 tokens) trained here on the generated text,
  because a real vocabulary tokenizes fewer, longer tokens than a tiny one.

Both are built locally; nothing is downloaded. Prints MB/s and tokens/s for each run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

INSTRUCTIONS = (
    "Summarize the following text.",
    "List the locations mentioned in the following text.",
    "Answer the question using the passage.",
    "Rewrite the passage in plain language.",
    "Classify the sentiment of the review as positive, negative or neutral.",
)
COMMON = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an "
    "had they you were their one all we can her has there been if more when will would who so no"
).split()
SEPARATOR = "\n\n###\n\n"


def _vocabulary(rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` distinct made-up words from syllables, a few with accents (so bytes above ASCII occur)."""
    onsets = "b c d f g h j k l m n p r s t v w y z ch sh th st tr pl gr br qu".split()
    vowels = "a e i o u ai ea ou io ee é ü".split()
    words: set[str] = set(COMMON)
    while len(words) < size:
        syllables = rng.integers(1, 5)
        word = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(syllables))
        if rng.random() < 0.3:
            word += onsets[rng.integers(len(onsets))]
        words.add(word)
    ordered = list(COMMON) + sorted(words - set(COMMON))  # the common words are the most frequent
    return np.array(ordered, dtype=object)


class _TextSource:
    """Zipf-distributed words drawn in bulk, cut into sentences and paragraphs."""

    def __init__(self, seed: int, vocabulary_size: int = 60_000):
        self.rng = np.random.default_rng(seed)
        self.words = _vocabulary(self.rng, vocabulary_size)
        weights = 1.0 / np.arange(1, len(self.words) + 1)
        self.cumulative = np.cumsum(weights / weights.sum())
        self._pool = np.zeros(0, dtype=np.int64)

    def _take(self, count: int) -> list[str]:
        if len(self._pool) < count:
            fresh = np.searchsorted(self.cumulative, self.rng.random(max(count, 1 << 20)))
            self._pool = np.concatenate([self._pool, np.minimum(fresh, len(self.words) - 1)])
        taken, self._pool = self._pool[:count], self._pool[count:]
        return self.words[taken].tolist()

    def paragraph(self, words: int) -> str:
        out = []
        left = words
        while left > 0:
            length = min(left, int(self.rng.integers(4, 24)))
            sentence = self._take(length)
            sentence[0] = sentence[0].capitalize()
            if self.rng.random() < 0.1:  # numbers and names occur
                sentence.insert(len(sentence) // 2, str(int(self.rng.integers(1, 3000))))
            end = ". " if self.rng.random() < 0.85 else ("? " if self.rng.random() < 0.5 else "!\n")
            out.append(" ".join(sentence) + end)
            left -= length
        return "".join(out).strip()


def generate(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write `size_mb` MB of prompt/completion JSONL to `path` (same seed, same bytes); returns rows."""
    source = _TextSource(seed)
    target = int(size_mb * 1e6)
    written = rows = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            prompt_words = int(np.clip(source.rng.lognormal(4.6, 0.8), 5, 1500))
            completion_words = int(np.clip(source.rng.lognormal(3.4, 0.9), 1, 600))
            instruction = INSTRUCTIONS[int(source.rng.integers(len(INSTRUCTIONS)))]
            row = {
                "prompt": f"{instruction}\nText: {source.paragraph(prompt_words)}{SEPARATOR}",
                "completion": f" {source.paragraph(completion_words)}<|endoftext|>",
            }
            line = json.dumps(row, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
            rows += 1
    return rows


def _sample_texts(path: Path, limit_bytes: int) -> list[str]:
    texts, size = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            texts.append(row["prompt"] + row["completion"])
            size += len(line)
            if size >= limit_bytes:
                break
    return texts


def build_tokenizer(kind: str, data: Path, folder: Path):
    """`tiny` (1024 tokens) or `gpt2` (50,257 tokens), trained on the start of the data; saved in
    `folder` so a second benchmark run reuses it."""
    from transformers import AutoTokenizer

    from trainer.tiny_models import train_tokenizer

    saved = folder / f"tokenizer-{kind}"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    started = time.perf_counter()
    vocab_size, sample_mb = (1024, 2) if kind == "tiny" else (50_257, 24)
    tokenizer = train_tokenizer(_sample_texts(data, sample_mb * 10**6), vocab_size=vocab_size)
    tokenizer.save_pretrained(saved)
    print(f"  trained the {kind} tokenizer ({len(tokenizer):,} tokens) in {time.perf_counter() - started:.1f} s")
    return AutoTokenizer.from_pretrained(saved)


def _config(data: Path, cache_dir: Path, num_proc: int | None):
    from trainer.config import Config

    return Config.model_validate(
        {
            "model": {"name_or_path": "unused"},
            "data": {
                "train_file": str(data),
                "cache_dir": str(cache_dir),
                "num_proc": num_proc,
                "max_seq_len": 2048,
                "too_long": "truncate",
            },
        }
    )


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: with wall time, shows a busy machine."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def bench(kind: str, data: Path, folder: Path, num_proc: int | None) -> None:
    import shutil

    from trainer.data.pipeline import prepare_data

    tokenizer = build_tokenizer(kind, data, folder)
    cache_dir = folder / f"cache-{kind}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    config = _config(data, cache_dir, num_proc)
    megabytes = data.stat().st_size / 1e6
    quiet = lambda message: None  # noqa: E731
    for run in ("cold", "cached"):
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        prepared = prepare_data(config, tokenizer, quiet)
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
        tokens = int(prepared.train.lengths.sum())
        processes = prepared.files[0].processes if run == "cold" else "-"
        print(
            f"  {kind:5s} {run:6s} {seconds:7.2f} s  {megabytes / seconds:8.1f} MB/s  "
            f"{tokens / seconds / 1e6:7.2f} M tokens/s"
            f"  (CPU {cpu:.1f} s in all processes; {len(prepared.train):,} examples, {tokens:,} tokens, "
            f"processes: {processes})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the generated file (default 100)")
    parser.add_argument(
        "--dir", type=Path, help="folder for the data, tokenizers and caches (default: a temporary one)"
    )
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: auto by size)")
    parser.add_argument("--tokenizers", default="tiny,gpt2", help="comma-separated: tiny, gpt2 (default both)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as temporary:
        folder = args.dir or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / f"bench-{args.size_mb:g}mb.jsonl"
        if not data.is_file():
            started = time.perf_counter()
            rows = generate(data, args.size_mb)
            print(
                f"generated {data} ({data.stat().st_size / 1e6:.1f} MB, {rows:,} rows) "
                f"in {time.perf_counter() - started:.1f} s"
            )
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"read + validate + tokenize + mask, {data.stat().st_size / 1e6:.1f} MB, {cores} cores:")
        for kind in args.tokenizers.split(","):
            bench(kind.strip(), data, folder, args.num_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
