"""trainer/progress.py directly: the counters a resume needs."""

from trainer.progress import TrainingProgress
from trainer.report import CheckpointSummary
from trainer.step import StepResult


def test_a_bad_step_counts_in_a_row_and_adds_nothing_to_the_train_loss():
    progress = TrainingProgress()
    progress.record_step(StepResult(2.0, 1.0, False, False), step_tokens=10)
    progress.record_step(StepResult(float("nan"), 1.0, True, True), step_tokens=30)
    progress.record_step(StepResult(float("nan"), 1.0, True, True), step_tokens=30)
    assert (progress.bad_steps_in_a_row, progress.skipped_steps) == (2, 2)
    progress.record_step(StepResult(1.0, 1.0, False, False), step_tokens=30)
    assert progress.bad_steps_in_a_row == 0 and progress.skipped_steps == 2
    assert progress.take_train_loss() == (2.0 * 10 + 1.0 * 30) / 40 == 1.25  # token-weighted
    assert progress.take_train_loss() is None  # counted again from the checkpoint on


def test_it_is_saved_under_the_state_json_keys_runs_always_had_and_restored_whole():
    progress = TrainingProgress(7, 3.5, 12, 1, 2, [CheckpointSummary(4, 0.5, 1.5, None, [])])
    info = progress.state_info()
    assert set(info) == {
        "loss_since_checkpoint",
        "tokens_since_checkpoint",
        "bad_steps_in_a_row",
        "skipped_steps",
        "checkpoints",
    }
    assert info["checkpoints"][0]["step"] == 4 and info["checkpoints"][0]["train_loss"] == 1.5
    assert TrainingProgress.from_state(7, info) == progress
