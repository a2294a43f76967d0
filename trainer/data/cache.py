"""Tokenized data on disk, so a rerun or a resume never reads and tokenizes the same file again.

One cache entry per data file, named by a key that covers everything the tokens depend on:

* the file's bytes (SHA-256 of its content: a renamed file still hits, an edited one misses);
* the tokenizer: its serialized state (vocabulary, merges, normalizer, pre-tokenizer, added and
  special tokens), its class and its special-token ids;
* the settings that change the tokens: `data.format`, `data.train_on`, the chat template in use
  (`data.chat_template` or the tokenizer's or the default) and `data.on_error`;
* the code that makes them: the source of the data modules, so a fix to tokenization can never
  be hidden by an old cache.

`data.max_seq_len` and `data.too_long` are not in the key on purpose: entries hold every example at
full length and the length policy runs on load (a slice), so changing them needs no tokenization.

An entry is a folder `<cache_dir>/<key>/` with `meta.json` and arrow shards (the format `datasets`
writes, loaded memory-mapped with `datasets.Dataset.from_file`). It is built under a temporary
name and renamed when complete, so a crash or a concurrent run never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.data.problems import Problem
from trainer.data.reads import file_digest  # noqa: F401 - public here too (the resume check imports it)
from trainer.data.tokenize import TokenizedRows

CACHE_FORMAT = 2  # bump when the layout of an entry changes (2: skipped lines as [line, kind, message, fix])
META_FILE = "meta.json"
_CODE_FILES = (
    "cache.py",
    "chat.py",
    "examples.py",
    "formats.py",
    "jsonl.py",
    "pipeline.py",
    "problems.py",
    "readers.py",
    "reads.py",
    "tokenize.py",
)


def default_cache_dir() -> Path:
    """The `datasets` cache (`HF_DATASETS_CACHE`, by default ~/.cache/huggingface/datasets)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "trainer-tokenized"


def tokenizer_digest(tokenizer) -> str:
    """A fingerprint of everything in the tokenizer that decides the ids of a text."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding and truncation are call-time settings that transformers switches on and off: not
        # identity. Serialize without them, then put them back.
        padding, truncation = backend.padding, backend.truncation
        backend.no_padding()
        backend.no_truncation()
        try:
            digest.update(backend.to_str().encode())
        finally:
            if padding is not None:
                backend.enable_padding(**padding)
            if truncation is not None:
                backend.enable_truncation(**truncation)
    else:  # a slow (Python) tokenizer: its vocabulary and construction arguments
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    identity = {
        "class": type(tokenizer).__name__,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
    }
    digest.update(json.dumps(identity, sort_keys=True).encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A fingerprint of the source of the modules that turn files into tokens."""
    digest = hashlib.sha256(str(CACHE_FORMAT).encode())
    here = Path(__file__).resolve().parent
    for name in _CODE_FILES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenizeSettings:
    """The settings that change the tokens of a file (see the module docstring for what is not here)."""

    data_format: str
    train_on: str
    chat_template: str
    on_error: str


def cache_key(content_digest: str, tokenizer_fingerprint: str, settings: TokenizeSettings) -> str:
    parts = {
        "file": content_digest,
        "tokenizer": tokenizer_fingerprint,
        "settings": asdict(settings),
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


@dataclass
class CacheMeta:
    """What an entry records besides tokens, so a cache hit reports exactly what the first run did."""

    format: str
    rows: int
    tokens: int
    shards: list[str]
    skipped: list[tuple[int, str, str, str]] = field(default_factory=list)
    """Rows left out (`data.on_error: skip`), as (line, kind, message, fix) of their `Problem`."""
    alias_lines: list[int] = field(default_factory=list)
    merged_context_lines: list[int] = field(default_factory=list)
    open_turn_lines: list[int] = field(default_factory=list)


def skipped_record(problem: Problem) -> tuple[int, str, str, str]:
    return problem.line, problem.kind, problem.message, problem.fix


def skipped_problem(record, source: str) -> Problem:
    line, kind, message, fix = record
    return Problem(kind, source, line, message, fix)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def write_shard(path: str | Path, rows: TokenizedRows) -> None:
    """Write rows as one arrow record batch (IPC stream, the format `datasets` uses)."""
    import pyarrow as pa

    table = pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(pa.array(rows.offsets), pa.array(rows.ids)),
            "trained_spans": pa.LargeListArray.from_arrays(pa.array(rows.span_offsets), pa.array(rows.spans)),
            "line": pa.array(rows.lines),
        }
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _list_column(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column as numpy arrays; zero-copy views of the memory map."""
    column = table.column(name)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy()
    if len(offsets) and (offsets[0] != 0 or offsets[-1] != len(values)):  # a slice: rebase onto its values
        values, offsets = values[offsets[0] : offsets[-1]], offsets - offsets[0]
    return values, offsets


def read_shard(path: str | Path, source: str) -> TokenizedRows:
    import datasets

    table = datasets.Dataset.from_file(str(path)).data.table  # memory-mapped, nothing is read yet
    ids, offsets = _list_column(table, "input_ids")
    spans, span_offsets = _list_column(table, "trained_spans")
    lines = table.column("line").to_numpy()
    return TokenizedRows(
        ids, offsets.astype(np.int64), spans, span_offsets.astype(np.int64), lines.astype(np.int64), source
    )


def load_entry(cache_dir: Path, key: str, source: str) -> tuple[CacheMeta, list[TokenizedRows]] | None:
    """The entry's record and shards (named after `source`, the path the user gave), or None on a miss."""
    folder = cache_dir / key
    try:
        meta = CacheMeta(**json.loads((folder / META_FILE).read_text(encoding="utf-8")))
        return meta, [read_shard(folder / name, source) for name in meta.shards]
    except (OSError, ValueError, TypeError):  # missing, or unreadable: rebuild it
        return None


@contextmanager
def building(cache_dir: Path, key: str) -> Iterator[Path]:
    """A temporary folder to build an entry in; renamed to the entry when the block succeeds.

    When another process finished the same entry first, its entry stays and ours is dropped
    (both are identical by construction)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_dir / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    temporary.mkdir()
    try:
        yield temporary
        final = cache_dir / key
        if final.exists() and not (final / META_FILE).is_file():
            shutil.rmtree(final, ignore_errors=True)  # a broken entry (e.g. edited by hand): replace it
        try:
            os.rename(temporary, final)
        except OSError:
            if not (final / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_meta(folder: Path, meta: CacheMeta) -> None:
    (folder / META_FILE).write_text(json.dumps(asdict(meta)), encoding="utf-8")
