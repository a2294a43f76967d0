#!/usr/bin/env python
"""Prepare training data: convert a table to JSONL, validate it (and fix what a rule can), split it.

    python scripts/prepare_data.py convert data.csv data.jsonl [--prompt-column Q --completion-column A]
        [--user-column Q --assistant-column A [--system TEXT | --system-column S]]
        [--separator "\\n\\n###\\n\\n"] [--add-eos] [--leading-space] [--delimiter ";"] [--force]
    python scripts/prepare_data.py validate FILE [FILE ...] [--config CONFIG.yaml] [--tokenizer PATH]
        [--max-seq-len N] [--too-long error|drop|truncate] [--test-prompt TEXT ...] [--json]
        [--fix OUT [--force]]
    python scripts/prepare_data.py split FILE [--test-fraction 0.1] [--seed 0] [--out-dir DIR] [--force]

`validate` exits 1 when a file has errors (training would stop), 0 when it has only warnings;
`--config` takes the tokenizer (model.name_or_path, local files only), max_seq_len, too_long,
format and test prompts from a training config, and with no FILE validates its data files.
Every command exits 2 for a malformed command line, and none ever overwrites its input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.atomic import write_bytes_atomically  # noqa: E402
from trainer.cli import JsonEnding, command
from trainer.data.convert import ConvertOptions, convert_table, unescape  # noqa: E402
from trainer.data.fixes import FIXABLE, fixed_lines  # noqa: E402
from trainer.data.split import split_file, split_output_paths  # noqa: E402
from trainer.data.validate import load_local_tokenizer, validate_file  # noqa: E402
from trainer.data.validation_report import ValidationReport  # noqa: E402
from trainer.errors import UsageError  # noqa: E402

FORMATS = ("auto", "prompt_completion", "chat", "text")


# ---------------------------------------------------------------------------------------------
# Output files: never the input, never an existing file unless --force, never half-written


def check_output(output: Path, *, inputs: list[Path], force: bool) -> None:
    for source in inputs:
        if output.resolve() == source.resolve():
            raise UsageError(f"refusing to overwrite the input {source}: write the output to another file")
    if output.exists() and not force:
        raise UsageError(f"{output} already exists: choose another name, or pass --force to overwrite it")


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file, and the
    file gets the umask's permissions (a bare `tempfile.mkstemp` file would stay 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, data)


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_convert(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    check_output(output, inputs=[source], force=args.force)
    options = ConvertOptions(
        prompt_column=args.prompt_column,
        completion_column=args.completion_column,
        user_column=args.user_column,
        assistant_column=args.assistant_column,
        system=args.system,
        system_column=args.system_column,
        separator=unescape(args.separator),
        add_eos=args.add_eos,
        leading_space=args.leading_space,
        delimiter=args.delimiter,
        encoding=args.encoding,
    )
    rows = convert_table(source, options)
    write_atomically(output, jsonl_bytes(rows))
    print(f"wrote {len(rows)} {'chats' if options.chat else 'examples'} to {output}")
    print(f"next: python scripts/prepare_data.py validate {output}")
    return 0


def _load_config(path: str | None):
    if path is None:
        return None
    from trainer.config import load_config  # pydantic is only needed with --config

    return load_config(path)


def _default_max_seq_len() -> int:
    from trainer.config import DataConfig

    return DataConfig.model_fields["max_seq_len"].default


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    files = list(args.files)
    if not files:
        if config is None:
            raise UsageError("give a data FILE to validate, or --config CONFIG.yaml to validate its data files")
        for value in (config.data.train_file, config.data.validation_file):
            files += [value] if isinstance(value, str) else list(value or [])
    if args.fix and len(files) != 1:
        raise UsageError("--fix writes one corrected copy: give exactly one FILE")
    if args.fix:
        check_output(Path(args.fix), inputs=[Path(files[0])], force=args.force)

    data_format = args.format or (config.data.format if config else "auto")
    too_long = args.too_long or (config.data.too_long if config else "error")
    max_seq_len = args.max_seq_len or (config.data.max_seq_len if config else None)
    test_prompts = list(config.test_prompts) if config else []
    test_prompts += args.test_prompt or []
    tokenizer, note = None, None
    tokenizer_name = args.tokenizer or (config.model.name_or_path if config else None)
    if tokenizer_name:
        tokenizer, note = load_local_tokenizer(tokenizer_name)
        max_seq_len = max_seq_len or _default_max_seq_len()

    def check(path: str) -> ValidationReport:
        # Test prompts and size are about the training data, not held-out files.
        held_out = config is not None and Path(path).resolve() in {
            Path(v).resolve() for v in _as_list(config.data.validation_file)
        }
        report = validate_file(
            path,
            data_format=data_format,
            tokenizer=tokenizer,
            max_seq_len=max_seq_len,
            too_long=too_long,
            test_prompts=() if held_out else test_prompts,
            chat_template=config.data.chat_template if config else None,
            train_on=config.data.train_on if config else "all_assistant",
            held_out=held_out,
        )
        if note:
            report.notes.append(note)
        elif max_seq_len is not None and tokenizer is None:
            report.notes.append("--max-seq-len needs a tokenizer (--tokenizer or --config): length check skipped")
        return report

    reports = [check(path) for path in files]
    fix_result = None
    if args.fix:
        fix_result = _write_fix(Path(files[0]), Path(args.fix), reports[0], data_format)
        if fix_result is not None:
            reports = [check(args.fix)]
    _print_reports(reports, fix_result, as_json=args.json)
    return 0 if all(r.ok for r in reports) else 1


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _write_fix(source: Path, output: Path, report: ValidationReport, data_format: str) -> dict | None:
    """Write the corrected copy; None (nothing written) when the file has errors."""
    if report.errors:
        report.notes.append(f"--fix: {output} not written: fix the errors first (they need a person, not a rule)")
        return None
    lines, changes = fixed_lines(source, data_format=data_format)
    write_atomically(output, b"".join(lines))
    return {
        "path": str(output),
        "changes": {kind: changes.get(kind, 0) for kind in FIXABLE if kind != "inconsistent_endings"},
    }


def _print_reports(reports: list[ValidationReport], fix_result: dict | None, *, as_json: bool) -> None:
    if as_json:
        body = (
            reports[0].to_dict()
            if len(reports) == 1
            else {"ok": all(r.ok for r in reports), "files": [r.to_dict() for r in reports]}
        )
        if fix_result is not None:
            body["fix"] = fix_result
        print(json.dumps(body, indent=1, ensure_ascii=False))
        return
    if fix_result is not None:
        made = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in fix_result["changes"].items())
        print(f"wrote the fixed copy to {fix_result['path']} ({made}); its report:\n")
    print("\n\n".join(r.render() for r in reports))
    bad = sum(not r.ok for r in reports)
    print(f"\n{'FAILED: training would stop on ' + str(bad) + ' file(s) with errors' if bad else 'OK: no errors'}")


def cmd_split(args: argparse.Namespace) -> int:
    source = Path(args.file)
    train_path, test_path = split_output_paths(source, args.out_dir)
    for output in (train_path, test_path):
        check_output(output, inputs=[source], force=args.force)
    split, raw = split_file(source, args.test_fraction, args.seed, data_format=args.format or "auto")
    write_atomically(train_path, b"".join(raw[n] for n in split.train_lines))
    write_atomically(test_path, b"".join(raw[n] for n in split.test_lines))
    print(split.summary())
    print(f"wrote {train_path} and {test_path} (seed {args.seed})")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="CSV/TSV -> JSONL")
    convert.add_argument("input", help="a .csv or .tsv file whose first line names the columns")
    convert.add_argument("output", help="the JSONL file to write")
    convert.add_argument("--prompt-column", default="prompt")
    convert.add_argument("--completion-column", default="completion")
    convert.add_argument("--user-column", help="chat: the user's message (makes chat rows)")
    convert.add_argument("--assistant-column", help="chat: the ideal assistant reply")
    convert.add_argument("--system", help="chat: one system message for every row")
    convert.add_argument("--system-column", help="chat: a column with each row's system message")
    convert.add_argument(
        "--separator", default="", help=r'appended to prompts that lack it, e.g. " ->" or "\n\n###\n\n"'
    )
    convert.add_argument("--add-eos", action="store_true", help="end completions with <|endoftext|>")
    convert.add_argument("--leading-space", action="store_true", help="start completions with a space")
    convert.add_argument("--delimiter", help=r"field delimiter (default: from the extension; '\t' for tab)")
    convert.add_argument("--encoding", default="utf-8-sig", help="the table's encoding (default UTF-8)")
    convert.add_argument("--force", action="store_true", help="overwrite an existing output file")
    convert.set_defaults(run=cmd_convert)

    validate = commands.add_parser("validate", help="find errors and quality problems; --fix what a rule can")
    validate.add_argument("files", nargs="*", metavar="FILE", help="JSONL files (default: the config's data files)")
    validate.add_argument("--config", help="a training config: tokenizer, max_seq_len, too_long, format, test prompts")
    validate.add_argument("--tokenizer", help="a local tokenizer folder or cached model id (for token counts)")
    validate.add_argument("--max-seq-len", type=int, help="longest example in tokens (default: the config's, or 2048)")
    validate.add_argument(
        "--too-long", choices=("error", "drop", "truncate"), help="what training does with longer examples"
    )
    validate.add_argument("--format", choices=FORMATS, help="row format (default: the config's, or auto)")
    validate.add_argument("--test-prompt", action="append", metavar="TEXT", help="a test prompt to check (repeatable)")
    validate.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    validate.add_argument(
        "--fix", metavar="OUT", help="write a corrected copy (leading space, EOS, trailing whitespace)"
    )
    validate.add_argument("--force", action="store_true", help="with --fix: overwrite an existing OUT")
    validate.set_defaults(run=cmd_validate)

    split = commands.add_parser("split", help="deterministic train/test split (stratified for classification)")
    split.add_argument("file")
    split.add_argument("--test-fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out-dir", help="where NAME-train.jsonl and NAME-test.jsonl go (default: beside FILE)")
    split.add_argument("--format", choices=FORMATS)
    split.add_argument("--force", action="store_true", help="overwrite existing output files")
    split.set_defaults(run=cmd_split)
    return parser


@command(ending=JsonEnding)
def main(argv: list[str] | None = None, *, ending: JsonEnding) -> int:
    args = build_parser().parse_args(argv)
    ending.as_json = bool(getattr(args, "json", False))
    if getattr(args, "max_seq_len", None) is not None and args.max_seq_len < 1:
        raise UsageError(f"--max-seq-len must be positive, got {args.max_seq_len}")
    return args.run(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
