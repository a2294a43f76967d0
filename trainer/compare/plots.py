"""The compare page's two plots, as PNG data URIs: report.html's own loss plot and task-metric plot
(trainer/report_html.py), drawn from the checkpoints as read from the folder."""

from __future__ import annotations

import base64

from trainer.compare.folder import Checkpoint
from trainer.metrics import LossHistory
from trainer.report_html import _rows, best_checkpoint, render_loss_plot, render_metrics_plot


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def summaries(checkpoints: list[Checkpoint]) -> list[dict]:
    """The checkpoints in the shape of the report's checkpoint summaries (trainer/report.py)."""
    return [
        {
            "step": c.step,
            "epoch": c.epoch,
            "train_loss": c.train_loss,
            "eval_loss": c.eval_loss,
            "samples": [],
            "metrics": c.metrics,
            "eval_examples": c.metric_examples,
        }
        for c in checkpoints
    ]


def plots(history: LossHistory, checkpoints: list[Checkpoint]) -> tuple[bytes, bytes | None]:
    """(the loss plot, the task-metric plot or None when no checkpoint has task metrics); the
    recommended checkpoint is starred in both, as in report.html."""
    rows = _rows(summaries(checkpoints))
    best = best_checkpoint(rows)
    metrics = render_metrics_plot(rows, best) if any(row.metrics for row in rows) else None
    return render_loss_plot(history, rows, best), metrics
