"""Data order and padded batches.

The order of examples is a pure function of (seed, epoch), and the micro-batches of an optimizer
step are a pure function of the step number, so every process can compute the whole step's
supervised-token count without communicating, and a resumed run sees the same data.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.boundaries import boundary_inputs
from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample


@functools.lru_cache(maxsize=2)  # one shuffle per epoch, not per step
def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """A permutation of the example indices, the same in every process and on every resume."""
    order = list(range(num_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class StepBatches:
    """Which examples each micro-batch of one optimizer step holds, on every process."""

    epoch: int
    micro_batches: list[list[int]]
    """Global micro-batches: example indices over all processes, `micro_batch_size * world_size` at most."""


class DataSchedule:
    """Maps optimizer steps to examples: `micro_batch_size` per process per micro-batch,
    `gradient_accumulation_steps` micro-batches per step, `steps_per_epoch` steps per epoch.
    The last step of an epoch may hold fewer micro-batches; the token-normalized loss makes that exact."""

    def __init__(self, num_examples: int, *, micro_batch_size: int, accumulation: int, world_size: int, seed: int):
        self.num_examples = num_examples
        self.global_batch = micro_batch_size * world_size
        self.accumulation = accumulation
        self.seed = seed
        self.micro_batches_per_epoch = math.ceil(num_examples / self.global_batch)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / accumulation)

    def total_steps(self, epochs: float) -> int:
        return max(1, math.ceil(self.steps_per_epoch * epochs))

    def step_batches(self, step: int) -> StepBatches:
        """The micro-batches of optimizer step `step` (1-based)."""
        epoch, step_in_epoch = divmod(step - 1, self.steps_per_epoch)
        order = epoch_order(self.num_examples, self.seed, epoch)
        first = step_in_epoch * self.accumulation
        last = min(first + self.accumulation, self.micro_batches_per_epoch)
        micro_batches = [order[m * self.global_batch : (m + 1) * self.global_batch] for m in range(first, last)]
        return StepBatches(epoch=epoch, micro_batches=micro_batches)


def shard(global_micro_batch: list[int], rank: int, world_size: int) -> tuple[list[int], bool]:
    """This process's share of a global micro-batch, and whether it is real.

    A short last micro-batch can leave a process with nothing; it then runs the first example with
    every label masked (weight 0), because every process must take part in each backward pass.
    """
    mine = global_micro_batch[rank::world_size]
    return (mine, True) if mine else (global_micro_batch[:1], False)


def collate(examples: list[TokenizedExample], pad_id: int, *, supervise: bool = True) -> dict:
    """Right-pad to the longest example. Padding gets label IGNORE_INDEX because it is padding
    (by position), never by token id, so EOS stays supervised when pad == eos.

    Plus the rows' boundaries for the varlen attention path (trainer/data/boundaries.py: each row
    one sequence, its padding another), so that the model never has to find them in the mask."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        if supervise:
            labels[row, :n] = torch.tensor(example.labels)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch | boundary_inputs([[len(e.input_ids)] for e in examples], width)


def item_sizes(items) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, supervised tokens) of every training item, computed once; steps only sum them."""
    if hasattr(items, "lengths"):  # TokenizedData keeps them as arrays already
        return items.lengths, items.supervised_tokens
    return np.array([len(i.input_ids) for i in items]), np.array([i.supervised_tokens for i in items])


class TrainingBatches:
    """This process's share of every optimizer step: its collated micro-batches, the step's items
    (on all processes) and their token counts. Every process knows the whole step's items, so the
    step's supervised-token count (the loss's normalizer) needs no communication."""

    def __init__(self, rows, collate_rows, pad_id: int, schedule: DataSchedule, *, rank: int, world_size: int):
        self.rows, self.collate_rows, self.pad_id, self.schedule = rows, collate_rows, pad_id, schedule
        self.rank, self.world_size = rank, world_size
        self.tokens, self.supervised = item_sizes(rows)

    @classmethod
    def for_run(cls, rows, collate_rows, pad_id: int, training, *, rank: int, world_size: int) -> "TrainingBatches":
        """With the data order of the `training` config section (seed, batch sizes)."""
        schedule = DataSchedule(
            len(rows),
            micro_batch_size=training.micro_batch_size,
            accumulation=training.gradient_accumulation_steps,
            world_size=world_size,
            seed=training.seed,
        )
        return cls(rows, collate_rows, pad_id, schedule, rank=rank, world_size=world_size)

    def _collated(self, global_micro_batch: list[int]) -> tuple[list, dict, bool]:
        mine, real = shard(global_micro_batch, self.rank, self.world_size)
        items = [self.rows[i] for i in mine]
        return items, self.collate_rows(items, self.pad_id, supervise=real), real

    def of_step(self, step: int) -> tuple[list[dict], list[int], int]:
        """(this process's collated micro-batches, on the CPU; the indices of the step's items on
        all processes; the step's supervised tokens)."""
        micro_batches = self.schedule.step_batches(step).micro_batches
        step_items = [i for micro_batch in micro_batches for i in micro_batch]
        batches = [self._collated(micro_batch)[1] for micro_batch in micro_batches]
        return batches, step_items, int(self.supervised[step_items].sum())

    def first_micro_batch(self, step: int) -> tuple[list, dict, bool]:
        """This process's first micro-batch of `step`: its items, the collated batch, and whether
        it trains (a process with no item of its own gets a stand-in with no labels)."""
        return self._collated(self.schedule.step_batches(step).micro_batches[0])

    def tokens_of(self, items: list[int]) -> int:
        return int(self.tokens[items].sum())

    def source_lines(self, items: list[int], limit: int = 5) -> list[str]:
        """'file line N' of the first items (a packed row names each of its examples)."""
        lines = []
        for item in items[:3]:
            for example in getattr(self.rows[item], "examples", (self.rows[item],)):
                lines.append(f"{example.source} line {example.line}")
        return lines[:limit]
