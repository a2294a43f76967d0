import pytest
import torch

from trainer.errors import UserError
from trainer.schedule import auto_epochs, checkpoint_steps, learning_rate_at, warmup_steps


@pytest.mark.parametrize(
    "total, count, expected",
    [
        (10, 5, [2, 4, 6, 8, 10]),
        (10, 3, [4, 7, 10]),
        (7, 7, [1, 2, 3, 4, 5, 6, 7]),
        (100, 1, [100]),
        (11, 4, [3, 6, 9, 11]),
    ],
)
def test_checkpoint_steps_are_ceil_of_even_fractions(total, count, expected):
    assert checkpoint_steps(total, count) == expected


def test_checkpoint_steps_are_distinct_increasing_and_end_at_the_last_step():
    for total in range(1, 40):
        for count in range(1, total + 1):
            steps = checkpoint_steps(total, count)
            assert len(steps) == count and steps[-1] == total, (total, count, steps)
            assert all(a < b for a, b in zip(steps, steps[1:])), (total, count, steps)


def test_more_checkpoints_than_steps_is_a_user_error():
    with pytest.raises(UserError, match="checkpoints.count=6 but training has only 5"):
        checkpoint_steps(5, 6)


def test_warmup_then_cosine_decays_to_zero_one_step_after_the_last():
    kw = dict(peak=1.0, total_steps=10, warmup=2, schedule="cosine")
    assert learning_rate_at(1, **kw) == 0.5
    assert learning_rate_at(2, **kw) == 1.0
    assert learning_rate_at(3, **kw) == 1.0  # the first step after warmup runs at the peak
    assert learning_rate_at(7, **kw) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert learning_rate_at(10, **kw) == pytest.approx(0.0380602337)  # 7/8 of the way: > 0, the last step trains
    assert learning_rate_at(11, **kw) == pytest.approx(0.0, abs=1e-12)


def test_linear_and_constant():
    assert learning_rate_at(6, peak=2.0, total_steps=10, warmup=2, schedule="linear") == pytest.approx(1.25)
    assert learning_rate_at(10, peak=2.0, total_steps=10, warmup=2, schedule="linear") == pytest.approx(0.25)
    assert learning_rate_at(9, peak=2.0, total_steps=10, warmup=0, schedule="constant") == 2.0


def test_a_one_step_run_trains_at_the_peak():
    for schedule in ("linear", "cosine", "constant"):
        assert learning_rate_at(1, peak=3e-4, total_steps=1, warmup=0, schedule=schedule) == 3e-4


def test_decay_equals_hugging_faces_schedulers():
    """After warmup, our step s (1-based) runs at the rate Hugging Face's scheduler gives its step
    s - 1 (0-based). (Its warmup starts at 0, ours at peak / warmup: a first step that trains.)"""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for make, name in ((get_linear_schedule_with_warmup, "linear"), (get_cosine_schedule_with_warmup, "cosine")):
        for total, warmup in ((10, 2), (7, 0), (1, 0), (50, 5)):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            hf = make(optimizer, warmup, total)
            for step in range(warmup + 1, total + 1):
                expected = hf.lr_lambdas[0](step - 1)
                assert learning_rate_at(
                    step, peak=1.0, total_steps=total, warmup=warmup, schedule=name
                ) == pytest.approx(expected, abs=1e-12), (name, total, warmup, step)


def test_warmup_steps_round_up():
    assert warmup_steps(100, 0.03) == 3
    assert warmup_steps(10, 0.0) == 0
    assert warmup_steps(7, 0.1) == 1  # 0.7 of a step is one step
    assert warmup_steps(20, 0.05) == 1


@pytest.mark.parametrize(
    "size, epochs",
    [
        (0, 4),
        (999_999, 4),
        (5_000_000, 4),
        (10_000_000, 3),
        (99_999_999, 3),
        (100_000_000, 2),
        (499_999_999, 2),
        (500_000_000, 1),
    ],
)
def test_auto_epochs_table(size, epochs):
    assert auto_epochs(size) == epochs


def test_warmup_steps_equal_the_hugging_face_trainers_for_every_total_and_ratio():
    """The same rounding as transformers' TrainingArguments.get_warmup_steps, float edges included
    (100 steps at 0.07 is 8 in both: 100 * 0.07 is 7.000000000000001), so a run here warms up as
    the same config would under the HF Trainer; a resumed run never sees its warmup move."""
    from transformers import TrainingArguments

    for ratio in (0.0, 0.03, 0.07, 0.1, 0.15, 0.5):
        args = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
        for total in range(1, 401):
            assert warmup_steps(total, ratio) == args.get_warmup_steps(total), (total, ratio)
    assert warmup_steps(100, 0.07) == 8 and warmup_steps(100, 0.03) == 3


def test_the_epochs_table_in_words_is_the_one_auto_uses():
    from trainer.schedule import epochs_table

    assert epochs_table() == "under 10 MB 4, under 100 MB 3, under 500 MB 2, larger 1"
