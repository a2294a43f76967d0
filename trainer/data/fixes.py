"""`validate --fix`: the mechanical fixes a rule can make to a prompt/completion file.

A leading space and `<|endoftext|>` on completions (with the spaces before an appended EOS
dropped), trailing whitespace off prompts. Anything else needs a person: a file with errors is not
fixed. Lines that need no fix are kept byte for byte, so fixing a fixed file changes nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from trainer.data.problems import TABLE_SUFFIXES, raise_problems
from trainer.data.quality import TRAILING_SPACE
from trainer.data.tokenize import EOS_LITERAL
from trainer.data.validate import validate_file
from trainer.errors import UserError

# Warnings that `fixed_lines` removes.
FIXABLE = ("leading_space", "missing_eos", "inconsistent_endings", "prompt_trailing_whitespace")


def end_with_eos(completion: str, eos_texts: tuple[str, ...] = (EOS_LITERAL,)) -> str:
    """`completion` ending with EOS. Spaces and tabs before an appended EOS are dropped: `" no  "`
    would teach the model to end its answers with a lone space token. A trailing newline is kept (it
    is the stop sequence of the seeds' older style, and its own token); whitespace after a written EOS
    is a slip, not text to keep, so it is dropped rather than a second EOS added."""
    if completion.endswith(eos_texts):
        return completion
    if completion.rstrip().endswith(eos_texts):
        return completion.rstrip()
    return (completion.rstrip(TRAILING_SPACE) or completion) + EOS_LITERAL


def fix_row(obj: dict, eos_texts: tuple[str, ...] = (EOS_LITERAL,)) -> tuple[dict, list[str]]:
    """A prompt/completion row with the mechanical fixes applied, and the kinds fixed.

    Idempotent: a fixed row needs no further fix.
    """
    fixed = dict(obj)
    kinds: list[str] = []
    prompt = obj["prompt"].rstrip(TRAILING_SPACE)
    if prompt != obj["prompt"]:
        fixed["prompt"], kinds = prompt, kinds + ["prompt_trailing_whitespace"]
    completion = obj["completion"]
    if not completion[:1].isspace():
        completion, kinds = " " + completion, kinds + ["leading_space"]
    if not completion.endswith(eos_texts):
        completion = end_with_eos(completion, eos_texts)
        kinds.append("missing_eos")
    if completion != obj["completion"]:
        fixed["completion"] = completion
    return fixed, kinds


def fixed_lines(path: str | Path, *, data_format: str = "auto") -> tuple[list[bytes], Counter]:
    """The file's lines with the mechanical fixes (leading space and EOS on completions, trailing
    spaces dropped before the EOS; trailing whitespace off prompts) and how many of each were made.
    Lines that need no fix are kept byte for byte, so fixing a fixed file changes nothing. Raises
    `UserError` when the file has errors (they need a person, not a rule). Only prompt/completion
    files have fixable warnings.
    """
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        raise UserError(
            f"--fix rewrites JSONL files, and {path} is a table: fix it where it was made, or convert it to JSONL"
        )
    report = validate_file(path, data_format=data_format)
    if report.errors:
        raise_problems(path, report.errors)
    changes: Counter = Counter()
    out: list[bytes] = []
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                raw += b"\n"
            text = raw.decode("utf-8-sig" if not out else "utf-8")
            if report.data_format != "prompt_completion" or not text.strip():
                out.append(raw)
                continue
            fixed, kinds = fix_row(json.loads(text))
            changes.update(kinds)
            out.append((json.dumps(fixed, ensure_ascii=False) + "\n").encode("utf-8") if kinds else raw)
    return out, changes
