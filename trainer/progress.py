"""`TrainingProgress`: the counters a resume needs, saved in the resumable state and restored as one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from trainer.report import CheckpointSummary


@dataclass
class TrainingProgress:
    step: int = 0
    loss_since_checkpoint: float = 0.0
    """Token-weighted loss sum of the steps since the last checkpoint (its train loss)."""
    tokens_since_checkpoint: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    checkpoints: list[CheckpointSummary] = field(default_factory=list)

    #: The state.json keys, as runs have always saved them.
    KEYS = ("loss_since_checkpoint", "tokens_since_checkpoint", "bad_steps_in_a_row", "skipped_steps", "checkpoints")

    def state_info(self) -> dict:
        return {key: getattr(self, key) for key in self.KEYS[:-1]} | {
            "checkpoints": [asdict(summary) for summary in self.checkpoints]
        }

    @classmethod
    def from_state(cls, step: int, info: dict) -> "TrainingProgress":
        return cls(
            step,
            *(info[key] for key in cls.KEYS[:-1]),
            [CheckpointSummary(**summary) for summary in info["checkpoints"]],
        )

    def record_step(self, result, step_tokens: int) -> None:
        """A finished optimizer step (trainer/step.py's result): a non-finite one changed nothing."""
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if result.bad else 0
        self.skipped_steps += result.skipped
        if not result.bad:
            self.loss_since_checkpoint += result.loss * step_tokens
            self.tokens_since_checkpoint += step_tokens

    def take_train_loss(self) -> float | None:
        """The mean token loss since the last checkpoint; the count starts again."""
        loss = self.loss_since_checkpoint / self.tokens_since_checkpoint if self.tokens_since_checkpoint else None
        self.loss_since_checkpoint, self.tokens_since_checkpoint = 0.0, 0
        return loss
