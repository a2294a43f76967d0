"""Stop a run at an exact step in tests, through the paths a real job takes."""

import signal

from trainer.stopping import Deadline
from trainer.train import FineTuneRecipe


def signal_after_step(monkeypatch, step: int, signum: int = signal.SIGUSR1) -> None:
    """Send this process `signum` (as SLURM's --signal does) right after the first job's step
    `step`: the run saves its state at that boundary and exits 75."""
    train_step = FineTuneRecipe.train_step

    def step_then_signal(self, current):
        loss = train_step(self, current)
        if current == step and self.start_step < step:
            signal.raise_signal(signum)
        return loss

    monkeypatch.setattr(FineTuneRecipe, "train_step", step_then_signal)


def out_of_time_after_steps(monkeypatch, steps: int) -> None:
    """The job's time limit runs out after it has trained `steps` steps (its deadline's check at
    that step boundary says stop), whatever this machine's speed."""
    boundaries = {"seen": 0}

    def must_stop(self, now, next_step_has_checkpoint):
        boundaries["seen"] += 1
        return boundaries["seen"] >= steps

    monkeypatch.setattr(Deadline, "must_stop", must_stop)
