"""The recipe's pieces, called in-process: gradient accumulation with token-level normalization."""

import pytest
import torch

from tests.helpers import write_jsonl
from trainer.config import Config, load_config
from trainer.train import FineTuneRecipe

# Completions of very different lengths, so per-micro-batch means would weigh tokens unequally.
ROWS = [
    {"prompt": "banana ->", "completion": " yellow"},
    {"prompt": "lime ->", "completion": " green green green green green green"},
    {"prompt": "kiwi ->", "completion": " green"},
    {"prompt": "tomato ->", "completion": " red red red red red red red red red red"},
    {"prompt": "lemon ->", "completion": " yellow yellow"},
    {"prompt": "cherry ->", "completion": " red"},
]


def recipe(tmp_path, model_dir, name, **training) -> FineTuneRecipe:
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = Config.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "method": "full",
            "data": {"train_file": str(data), "max_seq_len": 64, "packing": False},
            "training": {"epochs": 1, "seed": 0, **training},
            "checkpoints": {"count": 1},
            "output_dir": str(tmp_path / name),
        }
    )
    r = FineTuneRecipe(config)
    r.setup()
    return r


def gradients(r: FineTuneRecipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in r.model.named_parameters() if p.grad is not None}


def accumulate_step(r: FineTuneRecipe, step: int):
    """Forward and backward over every micro-batch of `step` (no update), as the recipe's step does."""
    from trainer.step import accumulate_gradients

    batches, items, tokens = r.batches.of_step(step)
    loss = accumulate_gradients(r.model, batches, step_tokens=tokens, accelerator=r.accelerator, strategy=r.strategy)
    return loss, items, tokens


def test_accumulated_micro_batches_equal_one_batch_of_the_same_examples(tmp_path, tiny_model_dirs):
    one = recipe(tmp_path, tiny_model_dirs["gpt2"], "one", micro_batch_size=6, gradient_accumulation_steps=1)
    split = recipe(tmp_path, tiny_model_dirs["gpt2"], "split", micro_batch_size=2, gradient_accumulation_steps=3)
    loss_one, items_one, tokens_one = accumulate_step(one, 1)
    loss_split, items_split, tokens_split = accumulate_step(split, 1)
    lines = lambda r, items: sorted(r.batches.rows[i].line for i in items)
    assert lines(one, items_one) == lines(split, items_split) == [1, 2, 3, 4, 5, 6]
    # Not vacuous: the micro-batches hold different numbers of supervised tokens, so a mean of
    # per-micro-batch means would weigh tokens unequally (its gradient differs: tests/test_step.py).
    per_micro_batch = [
        sum(split.batches.rows[i].supervised_tokens for i in mb)
        for mb in split.batches.schedule.step_batches(1).micro_batches
    ]
    assert len(per_micro_batch) == 3 and len(set(per_micro_batch)) == 3, per_micro_batch
    assert tokens_one == tokens_split
    assert abs(loss_one.item() - loss_split.item()) < 1e-5 * tokens_one
    reference, accumulated = gradients(one), gradients(split)
    assert reference.keys() == accumulated.keys() and reference
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], atol=1e-5, rtol=1e-5, msg=name)


def nan_loss_at(monkeypatch, bad_steps) -> None:
    """Make the training loss NaN at the given steps (one micro-batch per step in these runs)."""
    import trainer.step

    real, calls = trainer.step.supervised_loss_sum, [0]

    def loss(model, batch, **kwargs):
        value = real(model, batch, **kwargs)
        if torch.is_grad_enabled():  # training, not evaluation
            calls[0] += 1
            if calls[0] in bad_steps:
                return value * float("nan")
        return value

    monkeypatch.setattr(trainer.step, "supervised_loss_sum", loss)


def test_a_step_with_a_non_finite_loss_changes_nothing_and_is_counted(tmp_path, tiny_model_dirs, monkeypatch):
    from tests.helpers import read_jsonl, write_config

    nan_loss_at(monkeypatch, {3, 4})
    config = load_config(write_config(tmp_path, tiny_model_dirs["gpt2"], "full"))
    r = FineTuneRecipe(config)
    try:
        r.setup()
        assert r.train() == "complete"
    finally:
        r.close()
    steps = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "grad_norm" in m]
    assert [m["step"] for m in steps if m.get("skipped")] == [3, 4]
    assert steps[2]["loss"] is None and steps[3]["loss"] is None and steps[4]["loss"] > 0
    # Adam counted 16 updates of the 18 steps: the skipped ones did not reach the optimizer.
    assert {int(s["step"]) for s in r.optimizer.state.values()} == {r.schedule.total_steps - 2}


def test_too_many_bad_steps_in_a_row_save_the_state_and_stop_naming_the_step(
    tmp_path, tiny_model_dirs, monkeypatch, capsys
):
    from tests.helpers import write_config
    from trainer.errors import TrainingDiverged
    from trainer.train import main

    nan_loss_at(monkeypatch, set(range(3, 100)))
    path = write_config(tmp_path, tiny_model_dirs["gpt2"], "full", training={"max_bad_steps": 3})
    r = FineTuneRecipe(load_config(path))
    try:
        r.setup()
        with pytest.raises(TrainingDiverged) as stopped:
            r.train()
    finally:
        r.close()
    assert stopped.value.step == 5
    message = str(stopped.value)
    assert "not finite in 3 steps in a row (steps 3 to 5" in message and "train.jsonl line" in message
    assert "training.learning_rate=0.01" in message
    assert sorted(p.name for p in (tmp_path / "run").glob("state-*")) == ["state-5"]
    assert main([str(path), "overwrite_output_dir=true"]) == 1  # the command: exit 1, one message
    assert "error: training stopped at step " in capsys.readouterr().err
