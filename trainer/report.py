"""The run report: every checkpoint's answer to every test prompt, side by side, with its losses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.atomic import write_text_atomically


@dataclass
class CheckpointSummary:
    step: int
    epoch: float
    train_loss: float | None
    eval_loss: float | None
    samples: list[dict]


def markdown_cell(text: str) -> str:
    """Markdown table cell: keep it on one line and keep pipes literal."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_report(title: str, prompts: list[str], checkpoints: list[CheckpointSummary]) -> str:
    lines = [f"# {title}", ""]
    if prompts:
        lines += ["Test prompts:", ""]
        # JSON string syntax shows newlines and spaces unambiguously.
        lines += [f"{i}. `{json.dumps(p, ensure_ascii=False)}`" for i, p in enumerate(prompts, start=1)]
        lines.append("")
    header = ["checkpoint", "epoch", "train loss", "eval loss"] + [f"prompt {i}" for i in range(1, len(prompts) + 1)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for ckpt in checkpoints:
        cells = [f"checkpoint-{ckpt.step}", f"{ckpt.epoch:.2f}", _number(ckpt.train_loss), _number(ckpt.eval_loss)]
        cells += [markdown_cell(sample["completion"]) for sample in ckpt.samples]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(path: Path, title: str, prompts: list[str], checkpoints: list[CheckpointSummary]) -> str:
    text = render_report(title, prompts, checkpoints)
    write_text_atomically(path, text)
    return text
