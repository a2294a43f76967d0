"""trainer/step.py directly: the token-normalized gradient over a step's micro-batches, the update
at the step's learning rate, clipping, and a non-finite step that changes nothing.

The model is built as the recipe builds it (`make_strategy(...).build_model()`, then
`strategy.prepare`) with a one-process `Accelerator(cpu=True)`; the optimizer is plain SGD, so an
update is exactly `learning_rate * gradient` and can be checked weight by weight."""

import math

import pytest
import torch
from accelerate import Accelerator

import trainer.step
from tests.test_loss import examples
from trainer.config import Config
from trainer.data.batching import collate
from trainer.loss import supervised_loss_sum
from trainer.step import accumulate_gradients, optimizer_step
from trainer.strategy import Replicated, make_strategy

# tests/test_loss.py's examples: 6 + 4 + 8 + 3 supervised tokens. Split 2 + 2, the micro-batches
# hold 10 and 11 tokens; split 1 + 3, 6 and 15: a mean of per-micro-batch means would weigh
# tokens unequally.
STEP_TOKENS = 21


def setup(tmp_path, model_dir):
    config = Config.model_validate(
        {
            "model": {"name_or_path": str(model_dir), "dtype": "float32", "attention": "eager"},
            "method": "full",
            "data": {"train_file": str(tmp_path / "train.jsonl")},
            "output_dir": str(tmp_path / "run"),
        }
    )
    accelerator = Accelerator(cpu=True)
    strategy = make_strategy(accelerator, config)
    assert type(strategy) is Replicated  # one process, full fine-tuning: auto is ddp
    model = strategy.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = strategy.prepare(model, optimizer)
    return model, optimizer, accelerator, strategy


@pytest.fixture
def gpt2(tmp_path, tiny_model_dirs):
    return setup(tmp_path, tiny_model_dirs["gpt2"])


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference(model):
    """The whole step as one batch: (loss sum, gradient of loss sum / its tokens)."""
    model.zero_grad(set_to_none=True)
    loss = supervised_loss_sum(model, collate(examples(), pad_id=0))
    (loss / STEP_TOKENS).backward()
    result = loss.detach(), grads(model)
    model.zero_grad(set_to_none=True)
    return result


def split(sizes=(2, 2)):
    rows, batches = examples(), []
    for size in sizes:
        batches.append(collate(rows[:size], pad_id=0))
        rows = rows[size:]
    return batches


def step(gpt2, *, learning_rate: float, max_grad_norm: float | None):
    """One optimizer step of the fixture's model on `split()`'s two micro-batches."""
    model, optimizer, accelerator, strategy = gpt2
    return optimizer_step(
        model,
        optimizer,
        split(),
        step_tokens=STEP_TOKENS,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        accelerator=accelerator,
        strategy=strategy,
    )


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("sizes", [(2, 2), (1, 3), (1, 1, 1, 1)])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(gpt2, sizes):
    model, _, accelerator, strategy = gpt2
    loss_sum, expected = reference(model)
    calls = []
    returned = accumulate_gradients(
        model,
        split(sizes),
        step_tokens=STEP_TOKENS,
        accelerator=accelerator,
        strategy=strategy,
        on_micro_batch=lambda: calls.append(1),
    )
    assert len(calls) == len(sizes)
    torch.testing.assert_close(returned, loss_sum, rtol=1e-5, atol=1e-5)
    assert_close(grads(model), expected)


def test_a_mean_of_micro_batch_means_would_differ(gpt2):
    """Guards the test above: with these micro-batches, weighting each micro-batch equally (not
    each token) gives a measurably different gradient, so the equality there is not vacuous."""
    model, _, accelerator, strategy = gpt2
    _, expected = reference(model)
    naive = {}
    batches = split((1, 3))
    for batch in batches:
        model.zero_grad(set_to_none=True)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        accumulate_gradients(model, [batch], step_tokens=tokens, accelerator=accelerator, strategy=strategy)
        for name, grad in grads(model).items():
            naive[name] = naive.get(name, 0) + grad / len(batches)
    assert max((naive[n] - expected[n]).abs().max().item() for n in expected) > 1e-3


def test_a_step_updates_at_its_learning_rate_and_reports_the_token_mean_loss(gpt2):
    model, optimizer = gpt2[:2]
    loss_sum, gradient = reference(model)
    before = weights(model)
    result = step(gpt2, learning_rate=0.5, max_grad_norm=None)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient.values()])).item()
    assert result.loss == pytest.approx(loss_sum.item() / STEP_TOKENS, rel=1e-6)
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)
    assert (result.bad, result.skipped) == (False, False)
    assert [group["lr"] for group in optimizer.param_groups] == [0.5]
    assert_close(weights(model), {n: before[n] - 0.5 * gradient[n] for n in before})
    assert grads(model) == {}  # zeroed for the next step


def test_the_gradient_is_clipped_to_max_grad_norm(gpt2):
    model = gpt2[0]
    _, gradient = reference(model)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient.values()])).item()
    before = weights(model)
    max_norm = norm / 4
    result = step(gpt2, learning_rate=1.0, max_grad_norm=max_norm)
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)  # the norm before clipping is logged
    update = {n: before[n] - p for n, p in weights(model).items()}
    update_norm = torch.linalg.vector_norm(torch.stack([u.norm() for u in update.values()])).item()
    assert update_norm == pytest.approx(max_norm, rel=1e-4)
    assert_close(update, {n: gradient[n] / 4 for n in gradient})


def nan_on_micro_batch(monkeypatch, which: int) -> None:
    real, calls = trainer.step.supervised_loss_sum, [0]

    def loss(model, batch, **kwargs):
        calls[0] += 1
        value = real(model, batch, **kwargs)
        return value * float("nan") if calls[0] == which else value

    monkeypatch.setattr(trainer.step, "supervised_loss_sum", loss)


def assert_changed_nothing(result, model, before) -> None:
    assert (result.bad, result.skipped) == (True, True)
    assert all(torch.equal(p, before[n]) for n, p in weights(model).items())
    assert grads(model) == {}  # the bad gradient does not leak into the next step


def test_a_non_finite_loss_on_one_micro_batch_changes_nothing(gpt2, monkeypatch):
    model = gpt2[0]
    before = weights(model)
    nan_on_micro_batch(monkeypatch, 2)
    result = step(gpt2, learning_rate=1.0, max_grad_norm=1.0)
    assert math.isnan(result.loss)
    assert_changed_nothing(result, model, before)


def test_a_non_finite_gradient_norm_with_a_finite_loss_changes_nothing(gpt2):
    model = gpt2[0]
    before = weights(model)
    first = next(p for p in model.parameters() if p.requires_grad)
    first.register_hook(lambda grad: grad * float("inf"))
    result = step(gpt2, learning_rate=1.0, max_grad_norm=None)
    assert math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    assert_changed_nothing(result, model, before)
