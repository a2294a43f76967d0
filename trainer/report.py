"""The run report: every checkpoint's answer to every test prompt, side by side, with its losses,
its task metrics, and the recommended checkpoint with why."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.atomic import write_text_atomically
from trainer.recommend import Recommendation, recommend


@dataclass
class CheckpointSummary:
    """What the reports and the recommendation know of a checkpoint. The resumable state stores it
    with `asdict` and loads it with `CheckpointSummary(**saved)`: fields added later have defaults,
    so the states of older runs still load."""

    step: int
    epoch: float
    train_loss: float | None
    eval_loss: float | None
    samples: list[dict]
    metrics: dict[str, float] | None = None
    """Task metrics on the validation data {name: value}, the primary one first (trainer/evaluation.py);
    None when not scored."""
    eval_examples: int = 0
    """How many validation examples the metrics are over."""
    wrong: list[dict] = field(default_factory=list)
    """A few answers it got wrong, of each kind: {"kind", "count", "prompt", "reference", "prediction", ...}."""
    metric_details: dict = field(default_factory=dict)
    """Classification: {"classification": per-class precision/recall/F1 and the confusion matrix}."""


def markdown_cell(text: str) -> str:
    """Markdown table cell: keep it on one line and keep pipes literal."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def metric_names(checkpoints: list) -> list[str]:
    """Every task metric any checkpoint has, in the order first seen (the primary one first)."""
    names: list[str] = []
    for checkpoint in checkpoints:
        for name in getattr(checkpoint, "metrics", None) or {}:
            if name not in names:
                names.append(name)
    return names


def recommendation_line(recommendation: Recommendation | None) -> str:
    """'Recommended: **checkpoint-40**: why' (markdown), or why there is none."""
    if recommendation is None:
        return "Recommended: none yet (no task metric and no eval loss to rank the checkpoints by)."
    return f"Recommended: **{recommendation.checkpoint}**: {recommendation.why}."


def render_report(
    title: str, prompts: list[str], checkpoints: list[CheckpointSummary], recommendation: Recommendation | None = None
) -> str:
    """The markdown report; `recommendation` defaults to `recommend(checkpoints)`."""
    lines = [f"# {title}", ""]
    if checkpoints:
        lines += [recommendation_line(recommendation or recommend(checkpoints)), ""]
    if prompts:
        lines += ["Test prompts:", ""]
        # JSON string syntax shows newlines and spaces unambiguously.
        lines += [f"{i}. `{json.dumps(p, ensure_ascii=False)}`" for i, p in enumerate(prompts, start=1)]
        lines.append("")
    names = metric_names(checkpoints)
    header = (
        ["checkpoint", "epoch", "train loss", "eval loss"] + names + [f"prompt {i}" for i in range(1, len(prompts) + 1)]
    )
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for ckpt in checkpoints:
        cells = [f"checkpoint-{ckpt.step}", f"{ckpt.epoch:.2f}", _number(ckpt.train_loss), _number(ckpt.eval_loss)]
        cells += [_number((ckpt.metrics or {}).get(name)) for name in names]
        cells += [markdown_cell(sample["completion"]) for sample in ckpt.samples]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    path: Path,
    title: str,
    prompts: list[str],
    checkpoints: list[CheckpointSummary],
    recommendation: Recommendation | None = None,
) -> str:
    text = render_report(title, prompts, checkpoints, recommendation)
    write_text_atomically(path, text)
    return text
