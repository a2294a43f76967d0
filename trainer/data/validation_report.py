"""What validating a data file found, and how it is shown: `ValidationReport`.

A report holds the file's errors and warnings (`Problem`s, see `problems.py`), its statistics and
notes. `render()` is the summary people read (errors first, warnings grouped by kind with their
lines and one fix, then statistics); `to_dict()` / `to_json()` is what tools and the run folder's
`data_report.json` get. `WARNING_TITLES` names each warning kind in both.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from trainer.data.problems import Problem, row_unit
from trainer.schedule import epochs_table

WARNING_TITLES = {
    "leading_space": "completions that do not start with a space",
    "missing_eos": "completions that do not end with <|endoftext|>",
    "inconsistent_endings": "completions that end differently from the others",
    "prompt_trailing_whitespace": "prompts that end with whitespace",
    "agent_role": "role 'agent' instead of 'assistant'",
    "empty_assistant": "empty assistant replies",
    "no_separator": "no common separator at the end of prompts",
    "missing_separator": "prompts without the separator",
    "separator_in_text": "the separator also appears inside the text",
    "duplicate": "exact duplicates",
    "conflicting_completions": "same prompt, different completion",
    "too_long": "examples longer than max_seq_len",
    "too_few_examples": "too few examples",
    "test_prompt_in_data": "test prompts that are training prompts",
    "test_prompt_format": "test prompts shaped differently from training prompts",
    "chat_tokenization": "chats the tokenizer warns about",
}

ERRORS_PER_KIND = 20  # the human summary lists this many errors of each kind (--json lists all)


@dataclass
class ValidationReport:
    """Everything `validate_file` found in one file."""

    path: str
    data_format: str
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when training would accept the file (warnings do not stop a run)."""
        return not self.errors

    def warning_kinds(self) -> Counter:
        return Counter(w.kind for w in self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "format": self.data_format,
            "ok": self.ok,
            "errors": [e.to_dict() for e in self.errors],
            "warnings": [w.to_dict() for w in self.warnings],
            "warning_counts": dict(self.warning_kinds()),
            "stats": self.stats,
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def render(self, *, stats: bool = True, examples_per_kind: int = 3, lines_per_kind: int = 10) -> str:
        """A readable summary: errors first, then warnings grouped by kind, then statistics."""
        unit = row_unit(self.path)
        out = [
            f"{self.path}: {self.data_format} format, {self.stats.get('examples', 0)} valid examples, "
            f"{plural(len(self.errors), 'error')}, {plural(len(self.warnings), 'warning')}"
        ]
        if self.errors:
            out.append("\nERRORS (training would stop; fix these first):")
            for group in _grouped(self.errors).values():
                # One fix shared by a whole group is said once, after its lines.
                shared_fix = group[0].fix if len(group) > 1 and all(e.fix == group[0].fix for e in group) else None
                for e in group[:ERRORS_PER_KIND]:
                    out.append(f"  {replace(e, fix='').text(unit) if shared_fix else e.text(unit)}")
                if len(group) > ERRORS_PER_KIND:
                    out.append(f"  ... and {len(group) - ERRORS_PER_KIND} more like these")
                if shared_fix:
                    out.append(f"    Fix: {shared_fix}")
        if self.warnings:
            out.append("\nWARNINGS (training runs, but results may suffer):")
            for kind, group in _grouped(self.warnings).items():
                lines = [w.line for w in group if w.line is not None]
                where = ""
                if lines:
                    listed = ", ".join(str(n) for n in lines[:lines_per_kind]) + (
                        ", ..." if len(lines) > lines_per_kind else ""
                    )
                    where = f" ({plural(len(lines), unit)}: {listed})"
                out.append(f"  [{kind}] {WARNING_TITLES.get(kind, kind)}{where}")
                for w in group[:examples_per_kind]:
                    where = f"{unit} {w.line}: " if w.line is not None else ""
                    out.append(f"      {where}{w.message}")
                if len(group) > examples_per_kind:
                    out.append(f"      ... and {len(group) - examples_per_kind} more")
                if group[0].fix:
                    out.append(f"      Fix: {group[0].fix}")
        if self.notes:
            out.append("\nNOTES:")
            out += [f"  {n}" for n in self.notes]
        if stats and self.stats:
            out.append("\nSTATISTICS:")
            out += [f"  {line}" for line in _render_stats(self.stats)]
        return "\n".join(out)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _grouped(findings: list[Problem]) -> dict[str, list[Problem]]:
    groups: dict[str, list[Problem]] = {}
    for f in findings:
        groups.setdefault(f.kind, []).append(f)
    return groups


def _render_stats(stats: dict[str, Any]) -> list[str]:
    lines = [
        f"examples: {stats['examples']} ({stats['task'].replace('_', ' ')}"
        + (f", minimum recommended ~{stats['min_examples']}" if stats.get("min_examples") else "")
        + ")",
        f"file size: {stats['file_bytes']:,} bytes; recommended epochs: {stats['recommended_epochs']} "
        f"(training.epochs: auto, by size: {epochs_table()})",
    ]
    if stats.get("separator") is not None:
        lines.append(f"separator at the end of prompts: {stats['separator']!r}")
    if stats.get("classes"):
        listed = ", ".join(f"{label!r}: {n}" for label, n in stats["classes"].items())
        lines.append(f"classes ({len(stats['classes'])}): {listed}")
    tokens = stats.get("tokens")
    if tokens:
        lines.append(
            f"tokens: {tokens['total']:,} in all; prompt {tokens['prompt']:,}, completion {tokens['completion']:,}, "
            f"supervised {tokens['supervised']:,}"
        )
    lengths = stats.get("lengths")
    if lengths:
        limit = lengths.get("max_seq_len")
        over = ""
        if limit is not None:
            outcome = (
                f"{lengths['dropped']} dropped, {lengths['truncated']} truncated"
                if lengths["too_long"] != "error"
                else "training stops"
            )
            over = f"; {lengths['over']} over max_seq_len={limit}" + (f" ({outcome})" if lengths["over"] else "")
        lines.append(
            f"length in tokens: p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, "
            f"max {lengths['max']}{over}"
        )
        peak = max((b["count"] for b in lengths["histogram"]), default=0) or 1
        for b in lengths["histogram"]:
            bar = "#" * math.ceil(30 * b["count"] / peak) if b["count"] else ""
            mark = "  <- max_seq_len" if limit is not None and b["from"] <= limit <= b["to"] else ""
            lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>7} {bar}{mark}")
    elif "tokens" not in stats:
        lines.append("tokens: not counted (that needs a local tokenizer: --tokenizer or --config)")
    return lines
