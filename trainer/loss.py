"""The training loss: token cross-entropies summed over supervised positions.

Returning a sum (not a mean) is what makes gradient accumulation exact: the loop divides the sum
of every micro-batch of an optimizer step, on every process, by the step's total supervised tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.tokenize import IGNORE_INDEX


def supervised_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over supervised positions of -log p(label | prefix), in float32."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    # Only the supervised positions go through the float32 softmax.
    selected = logits[:, :-1][supervised].float()
    return F.cross_entropy(selected, targets[supervised], reduction="sum")
