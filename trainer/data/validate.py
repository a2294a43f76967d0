"""Check one data file before any GPU time is spent: `validate_file` -> a `ValidationReport`.

The seeds say the two things that matter most are dataset quality and size. `validate_file` runs,
on one file, exactly the checks training runs (`read_rows` and `row_problem`; with a tokenizer
also the chat template and the `data.too_long` length check), so the validator and the trainer can
never disagree about whether a file trains; then the seeds' quality rules (`quality.py`) and, with
a tokenizer, the token statistics (`token_stats.py`). `scripts/prepare_data.py validate` and the
trainer's preflight (`preflight.py`) both call it; `load_local_tokenizer` gives the command line a
tokenizer without downloading anything.

What a report holds and how it is shown is `validation_report.py`; `--fix` is `fixes.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from trainer.data.examples import detect_format, example_of
from trainer.data.formats import row_problem
from trainer.data.problems import EmptyDataFile
from trainer.data.quality import (
    MIN_CONDITIONAL,
    MIN_OPEN_ENDED,
    MIN_PER_CLASS,
    Row,
    chat_warnings,
    duplicate_warnings,
    prompt_completion_warnings,
    row_view,
    size_warnings,
    task_type,
    test_prompt_warnings,
)
from trainer.data.readers import read_rows
from trainer.data.token_stats import token_stats
from trainer.data.tokenize import EOS_LITERAL
from trainer.data.validation_report import WARNING_TITLES, ValidationReport  # noqa: F401 - WARNING_TITLES: trainer/report_html.py
from trainer.hub import ModelFolderMissing, model_source
from trainer.schedule import auto_epochs


def validate_file(
    path: str | Path,
    *,
    data_format: str = "auto",
    tokenizer=None,
    max_seq_len: int | None = None,
    too_long: str = "error",
    test_prompts: Sequence[Any] = (),
    chat_template: str | None = None,
    train_on: str = "all_assistant",
    held_out: bool = False,
    keep_rows: bool = False,
) -> ValidationReport:
    """Check one data file (JSONL, or a parquet/arrow table as training reads it); never raises for
    a problem in the data, only for a file that is missing or cannot be read at all.

    With a `tokenizer`, tokens are counted exactly as training counts them and, with `max_seq_len`,
    examples over it are errors (`too_long="error"`, as training stops) or warnings (`drop` /
    `truncate`, with how many would be dropped or truncated); chat rows are rendered with
    `chat_template` and trained per `train_on`, as in training. `test_prompts` are strings, dicts or
    config `TestPrompt`s; they are checked against the training prompts. A `held_out` file
    (validation or test data) is not expected to be large. `keep_rows` leaves the parsed rows for
    the next reader of the file (the trainer's preflight, for tokenization: `reads.py`).
    """
    path = Path(path)
    file = str(path)
    report = ValidationReport(file, data_format)
    try:
        rows, problems = read_rows(path, keep=keep_rows)
    except EmptyDataFile as err:  # a file without a single row is a finding, not a failure to read
        report.errors.append(err.problem)
        size = path.stat().st_size
        report.stats = {"examples": 0, "file_bytes": size, "recommended_epochs": auto_epochs(size), "task": "unknown"}
        return report
    data_format = (
        detect_format(path, rows, data_format)
        if rows
        else ("prompt_completion" if data_format == "auto" else data_format)
    )
    report.data_format = data_format
    valid: list[Row] = []
    for line, obj in rows:
        problem = row_problem(obj, data_format, file=file, line=line)
        if problem:
            problems.append(problem)
        else:
            valid.append(row_view(line, obj, data_format))
    report.errors = sorted(problems, key=lambda p: p.line)

    eos_texts = tuple({EOS_LITERAL, getattr(tokenizer, "eos_token", None) or EOS_LITERAL})
    separator = None
    if data_format == "prompt_completion":
        warnings, separator = prompt_completion_warnings(file, valid, eos_texts)
        report.warnings += warnings
    elif data_format == "chat":
        report.warnings += chat_warnings(file, valid)
    report.warnings += duplicate_warnings(file, valid)
    task, classes = task_type(valid, data_format)
    if not held_out:
        report.warnings += size_warnings(file, task, len(valid), classes)
    report.warnings += test_prompt_warnings(file, valid, test_prompts, separator)

    size = path.stat().st_size
    report.stats = {
        "examples": len(valid),
        "file_bytes": size,
        "recommended_epochs": auto_epochs(size),
        "task": task,
        "min_examples": MIN_PER_CLASS * max(1, len(classes))
        if task == "classification"
        else MIN_OPEN_ENDED
        if task == "open_ended"
        else MIN_CONDITIONAL,
        "separator": separator,
        "classes": dict(sorted(classes.items(), key=lambda item: (-item[1], item[0]))),
    }
    if tokenizer is not None:
        if report.errors:
            report.notes.append("token counts skipped: fix the errors first (training reads only files without errors)")
        elif valid:
            examples = [example_of(r.obj, data_format, file, r.line) for r in valid]
            token_stats(
                file,
                examples,
                tokenizer,
                max_seq_len=max_seq_len,
                too_long=too_long,
                chat_template=chat_template,
                train_on=train_on,
                report=report,
            )
    report.warnings.sort(
        key=lambda w: (list(WARNING_TITLES).index(w.kind) if w.kind in WARNING_TITLES else 99, w.line or 0)
    )
    return report


def load_local_tokenizer(name_or_path: str) -> tuple[Any, str | None]:
    """(tokenizer, None), or (None, why not) when it is not available locally: nothing is downloaded
    and no repository code runs, so validating data is always safe and offline."""
    try:
        source = model_source(name_or_path, "tokenizer")
    except ModelFolderMissing:
        return None, f"tokenizer folder {name_or_path} does not exist: token counts and length checks skipped"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False), None
    except Exception as err:  # noqa: BLE001 - any failure only means "no token statistics"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            None,
            f"tokenizer {name_or_path!r} is not available locally ({first}): token counts and length checks skipped",
        )
