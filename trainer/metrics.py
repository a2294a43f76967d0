"""metrics.jsonl: one JSON object a line, flushed at once so a crashed run keeps its history."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite_or_null(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({key: _finite_or_null(value) for key, value in record.items()}) + "\n")

    def write_step(
        self,
        step: int,
        *,
        epoch: float,
        result,
        learning_rate: float,
        tokens: int,
        supervised_tokens: int,
        seconds: float,
    ) -> None:
        """A training step's row: `step`, `loss` and what the step did (`skipped` when its loss or
        gradient norm was not finite and nothing was updated)."""
        self.write(
            step=step,
            epoch=round(epoch, 4),
            loss=result.loss,
            learning_rate=learning_rate,
            grad_norm=result.grad_norm,
            tokens=tokens,
            supervised_tokens=supervised_tokens,
            tokens_per_second=round(tokens / seconds, 1),
            **({"skipped": True} if result.skipped else {}),
        )

    def write_eval(self, step: int, *, epoch: float, eval_loss: float | None, task_metrics: dict) -> None:
        """A checkpoint's evaluation row: `step`, `eval_loss` and each task metric as `eval_<name>`."""
        self.write(
            step=step,
            epoch=round(epoch, 4),
            eval_loss=eval_loss,
            **{f"eval_{name}": value for name, value in task_metrics.items()},
        )
