"""The trainer's data check before any model loads: every data file of a config, validated.

`preflight_data` runs `validate_file` on every training and validation file with the config's
settings (format, max_seq_len, too_long, chat template) and, for training files, its test prompts.
Errors stop the run (with `data.on_error: error`) in one message listing them; warnings are logged;
`write_data_reports` saves the reports as the run folder's `data_report.json`. The rows it parses
are kept for the data stage (`reads.py`), so a start reads each file once.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data.validate import validate_file
from trainer.data.validation_report import ValidationReport, plural
from trainer.errors import UserError

MAX_LISTED_ERRORS = 20


def validate_config_data(config, tokenizer=None, *, keep_rows: bool = False) -> list[ValidationReport]:
    """Validate every training and validation file of a config, with its settings (format,
    max_seq_len, too_long) and, for training files, its test prompts. `keep_rows`: see `validate_file`."""
    data = config.data
    reports = []
    for which, files in (("train", data.train_file), ("validation", data.validation_file)):
        for path in [files] if isinstance(files, str) else files or []:
            reports.append(
                validate_file(
                    path,
                    data_format=data.format,
                    tokenizer=tokenizer,
                    max_seq_len=data.max_seq_len,
                    too_long=data.too_long,
                    test_prompts=config.test_prompts if which == "train" else (),
                    chat_template=data.chat_template,
                    train_on=data.train_on,
                    held_out=which != "train",
                    keep_rows=keep_rows,
                )
            )
    return reports


def write_data_reports(path: str | Path, reports: list[ValidationReport]) -> None:
    """The preflight's reports as one JSON file (the run folder's data_report.json)."""
    Path(path).write_text(
        json.dumps([r.to_dict() for r in reports], indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def preflight_data(
    config, tokenizer=None, *, log=print, report_path: str | Path | None = None
) -> list[ValidationReport]:
    """The trainer's data check before any model loads: errors stop the run (with `data.on_error:
    error`), warnings are logged; every report is saved as JSON to `report_path` when given. The
    parsed rows stay for `pipeline.prepare_data` in this process, which then reads no file again."""
    reports = validate_config_data(config, tokenizer, keep_rows=True)
    if report_path is not None:
        write_data_reports(report_path, reports)
    errors = [e.located() for r in reports for e in r.errors]
    stop = bool(errors) and getattr(config.data, "on_error", "error") == "error"
    for report in reports:
        if not stop and (report.warnings or report.notes or report.errors):
            log(report.render(stats=False))
    if stop:
        raise UserError(
            f"the data has {plural(len(errors), 'error')}:\n"
            + "\n".join(f"  {e}" for e in errors[:MAX_LISTED_ERRORS])
            + (f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else "")
            + "\nCheck a file with: python scripts/prepare_data.py validate FILE"
        )
    return reports
