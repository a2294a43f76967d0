"""The data stage of a run: files -> checked rows -> tokens with the loss mask -> train/valid.

    prepared = prepare_data(config, tokenizer, log)

reads and checks every file (JSONL, parquet, arrow), tokenizes it in one or several processes and
caches the result (`cache.py`), so a rerun or a resume only hashes the files and memory-maps the
tokens. A file the preflight already read is not read again: its digest and rows come from that
read (`reads.py`). Then it splits off the validation data and applies the length policy, both cheap and done
on every run. `prepared.skipped` lists the lines `data.on_error: skip` left out, for the run folder
(`write_skipped_lines`).

"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from trainer.config import Config
from trainer.data import reads
from trainer.data.cache import (
    CacheMeta,
    TokenizeSettings,
    building,
    cache_key,
    default_cache_dir,
    load_entry,
    shard_name,
    skipped_problem,
    skipped_record,
    tokenizer_digest,
    write_meta,
    write_shard,
)
from trainer.data.chat import resolve_chat_template
from trainer.data.examples import (
    Example,
    SkippedLine,
    alias_warning,
    read_file,
    split_validation,
)
from trainer.data.jsonl import require_files, write_jsonl
from trainer.data.problems import raise_problems
from trainer.data.tokenize import (
    ENCODE_BATCH,
    EncodeNotes,
    TokenizedData,
    TokenizedRows,
    apply_length_policy,
    encode_examples,
)
from trainer.errors import UserError
from trainer.layout import SKIPPED_LINES_FILE

BYTES_PER_PROCESS = 8 * 2**20  # a process per 8 MB (up to one per core); smaller files: one process, rayon threads


def _files(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# ---------------------------------------------------------------------------------------------
# One file: the cache, or read -> tokenize in processes -> store


@dataclass
class FileTokens:
    """One file's tokenized rows (cache shards), with what reading and tokenizing it reported."""

    path: str
    format: str
    parts: list[TokenizedRows]
    skipped: list[SkippedLine]
    warnings: list[str]
    from_cache: bool
    seconds: float
    processes: int = 1

    @property
    def rows(self) -> int:
        return sum(len(p) for p in self.parts)


def auto_num_proc(size_bytes: int) -> int:
    """Processes for a file: one per `BYTES_PER_PROCESS`, at most one per available core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, size_bytes // BYTES_PER_PROCESS))


# Forked workers inherit the job instead of receiving it pickled: the examples are already in memory.
_JOB: tuple | None = None  # (examples, tokenizer, settings, folder, source)


def _start_worker(job: tuple | None) -> None:
    global _JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no threads on top
    if job is not None:  # spawned, not forked: the job came pickled
        _JOB = job


def _encode_shard(task: tuple[int, int, int, list[Example] | None]) -> tuple[int, int, EncodeNotes]:
    """Encode examples[start:end] of the job and write them as shard `index`; returns rows, tokens, notes."""
    index, start, end, examples = task
    all_examples, tokenizer, settings, folder, source = _JOB
    batch = examples if examples is not None else all_examples[start:end]
    rows, notes = encode_examples(
        batch, tokenizer, chat_template=settings.chat_template, train_on=settings.train_on, source=source
    )
    write_shard(Path(folder) / shard_name(index), rows)
    return len(rows), int(rows.offsets[-1]), notes


def _encode_to_shards(
    examples: list[Example], tokenizer, settings: TokenizeSettings, folder: Path, source: str, processes: int
) -> tuple[list[str], int, int, EncodeNotes]:
    """Encode `examples` into `processes` shard files in `folder`; returns their names, the rows,
    the tokens and the merged notes."""
    global _JOB
    bounds = [int(b) for b in np.linspace(0, len(examples), processes + 1)]
    _JOB = (examples, tokenizer, settings, str(folder), source)
    try:
        if processes == 1:
            results = [_encode_shard((0, 0, len(examples), None))]
        else:
            # Linux forks, and the workers share the examples already in memory; elsewhere fork is
            # unsafe or missing, so workers are spawned and get their slice pickled.
            fork = sys.platform.startswith("linux")
            context = multiprocessing.get_context("fork" if fork else "spawn")
            tasks = [(i, a, b, None if fork else examples[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
            worker_job = None if fork else (None, tokenizer, settings, str(folder), source)
            with context.Pool(processes, initializer=_start_worker, initargs=(worker_job,)) as pool:
                results = pool.map(_encode_shard, tasks, chunksize=1)
    finally:
        _JOB = None
    notes = EncodeNotes()
    for _, _, shard_notes in results:
        notes.extend(shard_notes)
    rows, tokens = sum(r[0] for r in results), sum(r[1] for r in results)
    return [shard_name(i) for i in range(len(results))], rows, tokens, notes


def _build_entry(
    path: str, tokenizer, settings: TokenizeSettings, cache_dir: Path, key: str, num_proc: int | None
) -> int:
    """Read, check and tokenize one file into cache entry `key`; returns the processes used."""
    file = read_file(path, settings.data_format, on_error=settings.on_error)
    processes = num_proc or auto_num_proc(os.path.getsize(path))
    processes = max(1, min(processes, -(-len(file.examples) // ENCODE_BATCH)))  # at least a batch each
    try:
        with building(cache_dir, key) as folder:
            shards, rows, tokens, notes = _encode_to_shards(file.examples, tokenizer, settings, folder, path, processes)
            problems = sorted(notes.problems, key=lambda p: p.line)
            if problems and (settings.on_error == "error" or rows == 0):
                raise_problems(Path(path), problems)
            skipped = [
                skipped_record(p) for p in sorted([s.problem for s in file.skipped] + problems, key=lambda p: p.line)
            ]
            write_meta(
                folder,
                CacheMeta(
                    file.format,
                    rows,
                    tokens,
                    shards,
                    skipped,
                    file.alias_lines,
                    sorted(notes.merged_context_lines),
                    sorted(notes.open_turn_lines),
                ),
            )
    except OSError as err:  # not writable, not a folder, disk full
        raise UserError(
            f"cannot write the tokenized-data cache in {cache_dir} ({err.strerror or err}). "
            "Fix: set data.cache_dir to a writable folder"
        ) from None
    return processes


def tokenize_file(
    path: str,
    tokenizer,
    settings: TokenizeSettings,
    *,
    cache_dir: Path,
    tokenizer_fingerprint: str,
    num_proc: int | None = None,
) -> FileTokens:
    """One file's tokens: from the cache when the file, tokenizer, settings and code are unchanged;
    otherwise read, check, tokenize (in `num_proc` processes, default by size) and store them."""
    started = time.perf_counter()
    key = cache_key(reads.file_digest(path), tokenizer_fingerprint, settings)
    found = load_entry(cache_dir, key, path)
    if found is not None:
        reads.drop_rows(path)  # rows the preflight kept for tokenizing: not needed
        return _file_tokens(path, *found, from_cache=True, started=started)
    # An entry that exists but does not load is damaged (a crash, a full disk): rebuild it.
    shutil.rmtree(cache_dir / key, ignore_errors=True)
    processes = _build_entry(path, tokenizer, settings, cache_dir, key, num_proc)
    found = load_entry(cache_dir, key, path)
    if found is None:
        raise UserError(
            f"could not read back the tokenized data of {path} from {cache_dir}. "
            "Fix: check that data.cache_dir is writable and its disk not full"
        )
    return _file_tokens(path, *found, from_cache=False, started=started, processes=processes)


def _file_tokens(
    path: str, meta: CacheMeta, parts: list[TokenizedRows], *, from_cache: bool, started: float, processes: int = 1
) -> FileTokens:
    notes = EncodeNotes([], meta.merged_context_lines, meta.open_turn_lines)
    warnings = ([alias_warning(path, meta.alias_lines)] if meta.alias_lines else []) + notes.warnings(path)
    skipped = [SkippedLine(skipped_problem(record, path)) for record in meta.skipped]
    return FileTokens(path, meta.format, parts, skipped, warnings, from_cache, time.perf_counter() - started, processes)


# ---------------------------------------------------------------------------------------------
# A run's data


@dataclass
class PreparedData:
    """Everything the recipe needs from the data stage."""

    train: TokenizedData
    valid: TokenizedData
    skipped: list[SkippedLine] = field(default_factory=list)
    """Invalid lines left out (`data.on_error: skip`), for `skipped_lines.jsonl` in the run folder."""
    warnings: list[str] = field(default_factory=list)
    files: list[FileTokens] = field(default_factory=list)


def tokenize_settings(config: Config, tokenizer) -> TokenizeSettings:
    data = config.data
    return TokenizeSettings(
        data.format, data.train_on, resolve_chat_template(tokenizer, data.chat_template), data.on_error
    )


def _length_policy(config: Config, data: TokenizedData, which: str, log: Callable[[str], None]) -> TokenizedData:
    settings = config.data
    kept, report = apply_length_policy(data, max_seq_len=settings.max_seq_len, too_long=settings.too_long)
    if report.dropped or report.truncated:
        log(f"{which} data: {report.summary()} (data.max_seq_len={settings.max_seq_len})")
    if not len(kept):
        raise UserError(
            f"no {which} examples are left after data.too_long={settings.too_long}: "
            "raise data.max_seq_len or shorten the examples"
        )
    return kept


def prepare_data(config: Config, tokenizer, log: Callable[[str], None] = print) -> PreparedData:
    """Read, check and tokenize every data file (cached), split off validation data, apply the length policy.

    Call it on each node's main process first (`accelerator.local_main_process_first()`): the
    other processes then find every file in the cache.
    """
    data = config.data
    train_paths, valid_paths = _files(data.train_file), _files(data.validation_file)
    require_files(train_paths + valid_paths)  # all missing ones at once, before anything is read
    settings = tokenize_settings(config, tokenizer)
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    fingerprint = tokenizer_digest(tokenizer)

    def tokenize_all(paths: list[str]) -> list[FileTokens]:
        files = []
        for path in paths:
            tokens = tokenize_file(
                path,
                tokenizer,
                settings,
                cache_dir=cache_dir,
                tokenizer_fingerprint=fingerprint,
                num_proc=data.num_proc,
            )
            how = "from the cache" if tokens.from_cache else f"tokenized with {tokens.processes} process(es)"
            log(f"{path}: {tokens.rows} {tokens.format} examples, {how} in {tokens.seconds:.1f} s")
            files.append(tokens)
        return files

    train_files, valid_files = tokenize_all(train_paths), tokenize_all(valid_paths)
    every_file = train_files + valid_files
    skipped = [line for f in every_file for line in f.skipped]
    warnings = [warning for f in every_file for warning in f.warnings]
    for warning in warnings:
        log(f"warning: {warning}")
    if skipped:
        log(
            f"skipped {len(skipped)} invalid lines (data.on_error=skip); "
            f"the run folder lists them in {SKIPPED_LINES_FILE}"
        )

    train = TokenizedData([part for f in train_files for part in f.parts])
    valid = TokenizedData([part for f in valid_files for part in f.parts])
    if not valid_files and data.validation_split > 0:
        train_rows, valid_rows = split_validation(range(len(train)), data.validation_split, config.training.seed)
        train, valid = train.select(train_rows), train.select(valid_rows)
    train = _length_policy(config, train, "training", log)
    valid = _length_policy(config, valid, "validation", log) if len(valid) else valid
    return PreparedData(train, valid, skipped, warnings, every_file)


def write_skipped_lines(path: str | Path, skipped: Sequence[SkippedLine]) -> None:
    """`skipped_lines.jsonl`: one {"file", "line", "message"} object per skipped line."""
    write_jsonl(path, [line.to_json() for line in skipped])


def data_paths(config: Config) -> list[str]:
    """Every data file of the config: the training files, then the validation files."""
    return _files(config.data.train_file) + _files(config.data.validation_file)


def train_file_bytes(config: Config) -> int:
    """Total size of the training files, for `training.epochs: auto`."""
    return sum(os.path.getsize(path) for path in _files(config.data.train_file))
