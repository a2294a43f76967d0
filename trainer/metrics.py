"""metrics.jsonl: the run's history, one JSON object a line; its one writer and its one reader.

`MetricsLog` appends a training step's row (`write_step`) or a checkpoint's evaluation row
(`write_eval`), each flushed at once so a crashed run keeps its history; `keep_until` rewinds the
file to a resumed state's step. `read_metrics` reads the rows back as typed records for the
reports and the compare page, tolerating what a running or crashed job leaves: a half-written
last line, a null loss, a step written twice (a resumed run replays nothing, but a copied history
may hold it: the last row counts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.atomic import write_text_atomically


def _finite_or_null(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Appends metrics.jsonl's rows (main process; `enabled=False` elsewhere)."""

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

    def keep_until(self, step: int) -> None:
        """Keep only the rows of steps up to `step` (a resumed state's): every step then appears
        once after the resume. A line cut by a kill, or a row without a step, goes too."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line + "\n")
        write_text_atomically(self.path, "".join(kept))


# ---------------------------------------------------------------------------------------------
# Reading it back


@dataclass(frozen=True)
class StepRecord:
    """A training step's row. `loss` is None for a skipped step (not finite: nothing was updated)."""

    step: int
    loss: float | None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    supervised_tokens: int | None = None
    tokens_per_second: float | None = None
    epoch: float | None = None

    @property
    def skipped(self) -> bool:
        return self.loss is None


@dataclass(frozen=True)
class EvalRecord:
    """A checkpoint's evaluation row: the eval loss (None without validation data) and each task
    metric by its name (without the `eval_` prefix of the file)."""

    step: int
    eval_loss: float | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    epoch: float | None = None


@dataclass
class LossHistory:
    """The losses a plot draws: finite train losses, the skipped steps, and the eval losses."""

    train: dict[int, float] = field(default_factory=dict)  # step -> loss of finite steps
    skipped: list[int] = field(default_factory=list)  # steps with a null / non-finite loss
    evals: dict[int, float] = field(default_factory=dict)  # step -> eval loss


@dataclass
class MetricsHistory:
    steps: dict[int, StepRecord] = field(default_factory=dict)
    evals: dict[int, EvalRecord] = field(default_factory=dict)

    def losses(self) -> LossHistory:
        return LossHistory(
            train={s: r.loss for s, r in sorted(self.steps.items()) if r.loss is not None},
            skipped=sorted(s for s, r in self.steps.items() if r.skipped),
            evals={s: r.eval_loss for s, r in sorted(self.evals.items()) if r.eval_loss is not None},
        )


def finite(value: Any) -> float | None:
    """`value` as a finite float, or None (null, NaN, infinity, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def whole_number(value: Any) -> int | None:
    """`value` as an int (3 or 3.0), or None (a bool, a fraction, a string, null)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def read_metrics(path: Path) -> MetricsHistory:
    """The rows of metrics.jsonl as typed records; a missing file is an empty history, and lines
    that are not whole JSON objects with a step are skipped (see the module docstring)."""
    history = MetricsHistory()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return history
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or (step := whole_number(record.get("step"))) is None:
            continue
        epoch = finite(record.get("epoch"))
        if "eval_loss" in record:
            metrics = {k.removeprefix("eval_"): finite(v) for k, v in record.items() if k.startswith("eval_")}
            metrics.pop("loss")
            history.evals[step] = EvalRecord(step, finite(record["eval_loss"]), metrics, epoch)
        elif "loss" in record:
            loss = None if record.get("skipped") else finite(record["loss"])
            history.steps[step] = StepRecord(
                step,
                loss,
                finite(record.get("learning_rate")),
                finite(record.get("grad_norm")),
                whole_number(record.get("tokens")),
                whole_number(record.get("supervised_tokens")),
                finite(record.get("tokens_per_second")),
                epoch,
            )
    return history


def read_losses(path: Path) -> LossHistory:
    """The losses of metrics.jsonl, for a plot."""
    return read_metrics(path).losses()
