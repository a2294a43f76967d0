"""One optimizer step, as training does it: the recipe and scripts/bench.py both call `optimizer_step`.

Forward and backward over the step's micro-batches, each micro-batch's token losses summed and
divided by the whole step's supervised tokens (all micro-batches, all processes: the update is then
exactly one large batch's); gradients synchronised once, on the last micro-batch; the global norm
clipped; and the update made only when the loss and the gradient norm are finite.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from trainer.loss import supervised_loss_sum


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean token loss over the step's supervised tokens, all processes (NaN when not finite)."""
    grad_norm: float
    bad: bool
    """The loss (or, without an fp16 grad scaler, the gradient norm) was not finite."""
    skipped: bool
    """No update was made (a bad step, or the fp16 grad scaler skipped an overflowing one)."""


def accumulate_gradients(
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    step_tokens: int,
    accelerator,
    strategy,
    on_micro_batch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Forward and backward over `micro_batches` (this process's share of the step, on the CPU);
    leaves (sum of the step's token losses over all processes) / `step_tokens` in `.grad` and
    returns this process's loss sum."""
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        last = index == len(micro_batches) - 1
        # Gradients are synchronised once per optimizer step, on its last micro-batch.
        with nullcontext() if last else strategy.no_sync(model):
            micro_loss = supervised_loss_sum(model, batch)
            # DDP and FSDP average gradients over processes; times num_processes makes it the sum,
            # so the update is (sum of all token losses of the step) / (its supervised tokens).
            accelerator.backward(micro_loss * accelerator.num_processes / step_tokens)
        loss_sum += micro_loss.detach()
        if on_micro_batch is not None:
            on_micro_batch()
    return loss_sum


def optimizer_step(
    model,
    optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    step_tokens: int,
    learning_rate: float,
    max_grad_norm: float | None,
    accelerator,
    strategy,
    on_micro_batch: Callable[[], None] | None = None,
) -> StepResult:
    """One optimizer step over `micro_batches` at `learning_rate` (see the module docstring)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    loss_sum = accumulate_gradients(
        model,
        micro_batches,
        step_tokens=step_tokens,
        accelerator=accelerator,
        strategy=strategy,
        on_micro_batch=on_micro_batch,
    )
    grad_norm = strategy.clip_grad_norm(model, max_grad_norm or math.inf)
    # .item() waits for the GPU: once per step, to decide on the update and to log.
    loss = accelerator.reduce(loss_sum, reduction="sum").item() / step_tokens
    bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if accelerator.scaler is not None:
        # fp16: the grad scaler skips an overflowing step itself (and lowers its scale), which is
        # routine; only a non-finite loss counts as a bad step.
        optimizer.step()
        bad = not math.isfinite(loss)
        skipped = bad or accelerator.optimizer_step_was_skipped
    else:
        if not bad:
            optimizer.step()
        skipped = bad
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, bad, skipped)
