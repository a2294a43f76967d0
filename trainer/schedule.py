"""Pure functions of the step: learning rate, checkpoint steps, epochs by dataset size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.errors import UserError

# The seeds' recommendation, at the upper end of each range: the N checkpoints let the user pick
# an earlier, less trained one ("slightly overtrain, then pick").
EPOCHS_BY_SIZE = ((10_000_000, 4), (100_000_000, 3), (500_000_000, 2))


def epochs_table() -> str:
    """`EPOCHS_BY_SIZE` in words: "under 10 MB 4, under 100 MB 3, under 500 MB 2, larger 1"."""
    return ", ".join(f"under {limit // 1_000_000} MB {epochs}" for limit, epochs in EPOCHS_BY_SIZE) + ", larger 1"


def auto_epochs(train_bytes: int) -> int:
    """Epochs for a training file of `train_bytes` bytes (`epochs_table()`)."""
    for limit, epochs in EPOCHS_BY_SIZE:
        if train_bytes < limit:
            return epochs
    return 1


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def learning_rate_at(step: int, *, peak: float, total_steps: int, warmup: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup over `warmup` steps, then
    constant, or linear or cosine decay that reaches 0 one step after the last, as Hugging Face's
    schedulers do: the first step after warmup runs at the peak, the last at a small positive rate
    (never 0, which would make the last step, or a 1-step run, change nothing)."""
    if step <= warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    progress = (step - 1 - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def checkpoint_steps(total_steps: int, count: int) -> list[int]:
    """`count` evenly spaced optimizer steps, the last one `total_steps`: step ceil(i * T / N) for
    i = 1..N. Distinct when N <= T; raises `UserError` otherwise."""
    if count > total_steps:
        raise UserError(
            f"checkpoints.count={count} but training has only {total_steps} optimizer steps: "
            f"lower checkpoints.count to at most {total_steps}, or train longer (training.epochs) "
            "or with smaller steps (training.micro_batch_size, training.gradient_accumulation_steps)"
        )
    return [-(-i * total_steps // count) for i in range(1, count + 1)]


@dataclass(frozen=True)
class RunSchedule:
    """A run's step arithmetic, fixed at setup: how many optimizer steps, the warmup, the steps that
    save a checkpoint, and the learning rate of each step (a pure function of the step, so a
    resume needs nothing but the step)."""

    total_steps: int
    warmup_steps: int
    checkpoint_steps: list[int]
    peak_learning_rate: float
    lr_scheduler: str

    @classmethod
    def of(cls, training, checkpoints, steps_per_epoch_schedule) -> "RunSchedule":
        """From the config's `training` and `checkpoints` sections and the data's `DataSchedule`
        (a bad checkpoints.count fails here, before anything is written)."""
        total = steps_per_epoch_schedule.total_steps(training.epochs)
        return cls(
            total,
            warmup_steps(total, training.warmup_ratio),
            checkpoint_steps(total, checkpoints.count),
            training.learning_rate,
            training.lr_scheduler,
        )

    def learning_rate(self, step: int) -> float:
        return learning_rate_at(
            step,
            peak=self.peak_learning_rate,
            total_steps=self.total_steps,
            warmup=self.warmup_steps,
            schedule=self.lr_scheduler,
        )
