"""Packing: several tokenized examples per `max_seq_len` row, without cross-contamination.

A packed row is the concatenation of its member examples. Three things keep each member exactly as
it would be alone in a padded batch (tests/data/test_packing.py checks loss and gradients):

* positions restart at 0 for every member, and the batch carries them as `position_ids` with no 2D
  `attention_mask`. Every attention path of trainer/attention.py then attends within a member
  only: transformers 5 builds a block-diagonal causal mask from the restarts (eager, sdpa, flex;
  only with `use_cache=False` and no 2D mask, which is how trainer/loss.py calls the model), and
  the `varlen` path cuts the row into sequences at the same places (`collate_packed` hands it
  the cuts, trainer/data/boundaries.py);
* the first token of every member carries no label, so the previous member's last token is never
  trained to predict it (the shifted loss would otherwise cross the boundary);
* padding (only at the end of a row shorter than the batch's longest) is its own position run, is
  never attended to by real tokens, and has no labels.

Rows are filled by best-fit decreasing (at least as tight as first-fit decreasing), which is
deterministic: the same examples in the same order always give the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from trainer.data.boundaries import boundary_inputs
from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class PackedRow:
    """One training row made of whole examples; quacks like a TokenizedExample for the schedule
    (`input_ids`, `supervised_tokens`)."""

    examples: tuple[TokenizedExample, ...]

    @cached_property
    def input_ids(self) -> list[int]:
        return [token for example in self.examples for token in example.input_ids]

    @cached_property
    def labels(self) -> list[int]:
        """Members' labels, with each member's first label masked: position 0 of an example is
        never predicted (least of all from the previous member's last token)."""
        labels: list[int] = []
        for example in self.examples:
            labels.append(IGNORE_INDEX)
            labels.extend(example.labels[1:])
        return labels

    @cached_property
    def position_ids(self) -> list[int]:
        """0, 1, ... restarting at every member: each example keeps its own positions."""
        return [position for example in self.examples for position in range(len(example.input_ids))]

    @property
    def seq_lens(self) -> list[int]:
        return [len(example.input_ids) for example in self.examples]

    @property
    def supervised_tokens(self) -> int:
        """Equal to the sum over members (their position 0 is never supervised either)."""
        return sum(example.supervised_tokens for example in self.examples)

    def __len__(self) -> int:
        return len(self.input_ids)


class _FreeSpace:
    """Rows indexed by free space: `best(n)` finds a row with the least free space >= n in
    O(log max_seq_len), so packing a million examples stays fast."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)  # segment tree of row counts per free-space value
        self.rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # free space -> row indices

    def _update(self, free: int, delta: int) -> None:
        node = free + self.size
        while node:
            self.count[node] += delta
            node //= 2

    def add(self, row: int, free: int) -> None:
        self.rows[free].append(row)
        self._update(free, +1)

    def take_best(self, need: int) -> int | None:
        """Remove and return a row with the smallest free space >= need (the most recently
        added among equals, deterministically), or None."""
        free = self._smallest_at_least(need)
        if free is None:
            return None
        self._update(free, -1)
        return self.rows[free].pop()

    def _smallest_at_least(self, need: int) -> int | None:
        if need >= self.size:
            return None
        # Walk up from leaf `need`, looking for the nearest non-empty subtree to the right.
        node = need + self.size
        if self.count[node]:
            return need
        while node > 1:
            if node % 2 == 0 and self.count[node + 1]:
                node += 1
                break
            node //= 2
        else:
            return None
        while node < self.size:  # descend to the leftmost non-empty leaf
            node = 2 * node if self.count[2 * node] else 2 * node + 1
        return node - self.size


def pack_examples(examples: list[TokenizedExample], max_seq_len: int) -> list[PackedRow]:
    """Pack whole examples into rows of at most `max_seq_len` tokens (best-fit decreasing).

    Longest examples are placed first, each into the row it fills most tightly; ties keep the
    input order, so the result is deterministic. Every example lands in exactly one row. An example
    longer than `max_seq_len` is a bug upstream (the length policy runs before packing).
    """
    for example in examples:
        if not 0 < len(example.input_ids) <= max_seq_len:
            raise ValueError(
                f"{example.source} line {example.line}: {len(example.input_ids)} tokens cannot be packed into "
                f"rows of {max_seq_len}; the data.too_long policy must run before packing"
            )
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))  # stable: ties keep input order
    members: list[list[int]] = []
    used: list[int] = []
    space = _FreeSpace(max_seq_len)
    for index in order:
        length = len(examples[index].input_ids)
        row = space.take_best(length)
        if row is None:  # fits in no open row: open a new one
            row = len(members)
            members.append([])
            used.append(0)
        members[row].append(index)
        used[row] += length
        space.add(row, max_seq_len - used[row])
    return [PackedRow(tuple(examples[i] for i in row)) for row in members]


@dataclass(frozen=True)
class PackingStats:
    examples: int
    rows: int
    tokens: int
    max_seq_len: int

    @property
    def padding_fraction(self) -> float:
        """Share of a full `rows x max_seq_len` grid that is padding (0 = every row full)."""
        return 1.0 - self.tokens / (self.rows * self.max_seq_len) if self.rows else 0.0

    def summary(self) -> str:
        return (
            f"packed {self.examples} examples ({self.tokens} tokens) into {self.rows} rows of {self.max_seq_len}: "
            f"{100 * self.padding_fraction:.1f}% padding"
        )


def packing_stats(rows: list[PackedRow], max_seq_len: int) -> PackingStats:
    return PackingStats(
        examples=sum(len(row.examples) for row in rows),
        rows=len(rows),
        tokens=sum(len(row) for row in rows),
        max_seq_len=max_seq_len,
    )


def collate_packed(rows: list[PackedRow], pad_id: int, *, supervise: bool = True) -> dict:
    """A batch of packed rows: `input_ids`, `labels` and `position_ids`, right-padded to the longest
    row, and deliberately no 2D `attention_mask` (with one, transformers stops isolating the
    members). Padding continues as its own run of positions 0, 1, ..., so it forms a separate
    sequence that no real token attends to, and gets IGNORE_INDEX labels by position.

    Plus the members' boundaries for the varlen attention path (trainer/data/boundaries.py:
    `cu_seq_lens_q/k`, `max_length_q/k`), found here from the members' lengths so that the model
    never has to find them in `position_ids`.

    `supervise=False` masks every label (the dummy batch of an idle process), like `collate`.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for index, row in enumerate(rows):
        n = len(row)
        input_ids[index, :n] = torch.tensor(row.input_ids)
        position_ids[index, :n] = torch.tensor(row.position_ids)
        position_ids[index, n:] = torch.arange(width - n)
        if supervise:
            labels[index, :n] = torch.tensor(row.labels)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return batch | boundary_inputs([row.seq_lens for row in rows], width)


def training_rows(examples, data_config, log=print) -> tuple[list, Callable]:
    """The rows training steps over and the collate function for them: with `data.packing`,
    several examples per `max_seq_len` row, each attending only to itself (the schedule then runs
    over rows); otherwise the examples themselves, padded per batch. Evaluation stays on padded
    batches either way."""
    from trainer.data.batching import collate

    if not data_config.packing:
        return examples, collate
    rows = pack_examples(examples, data_config.max_seq_len)
    log(f"packing: {packing_stats(rows, data_config.max_seq_len).summary()}")
    return rows, collate_packed
