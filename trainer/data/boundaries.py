"""Sequence boundaries of a batch, found once on the CPU while the batch is built.

The `varlen` attention path (trainer/attention.py) runs one kernel call over every sequence of a
batch, flattened to (rows * width) tokens. It needs where the sequences start (`cu_seq_lens`, the
cumulative lengths, int32) and the longest one (`max_length`, a host int: the kernel's launch grid).
Found inside the model from `position_ids` and the padding mask, they cost a data-dependent
`nonzero()` and an `int()` (GPU syncs) and, under `torch.compile`, graph breaks and recompiles in
every attention layer. The collate functions know the lengths anyway, so they add these inputs to
every batch (`collate` and `collate_packed`), and the model gets them as plain inputs:

* the keys are transformers' `FlashAttentionKwargs` names (`cu_seq_lens_q/k`, `max_length_q/k`),
  which GPT-2 and GPT-NeoX pass from the model's call down to the attention function (GPT-J's code
  does not; trainer/attention.py carries them there);
* the cuts are the ones `trainer.attention.sequence_boundaries` finds in a batch without them
  (tested): each example (a packed row's member, or a padded batch's row) is a sequence, and the
  padding at the end of a row is a sequence of its own, so no real token attends to it.

trainer/loss.py hands them to a model that attends with `varlen` only; eager, sdpa and flex need
no boundaries (and a compiled model would only recompile on their changing shapes).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

#: Batch keys of the boundaries, as transformers names them. Self-attention without a cache:
#: queries and keys are the same tokens, so the _q and _k values are the same.
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class HostInt(int):
    """An int that stays an int when a batch is moved to the GPU with `{k: v.to(device) ...}`, as
    the training loop moves every value of a batch.

    The kernel takes the longest sequence as a host int; as a tensor it would travel to the GPU
    and have to be read back (a GPU sync) before the kernel could be launched."""

    def to(self, *args, **kwargs) -> HostInt:
        return self


def boundary_inputs(row_lengths: Sequence[Sequence[int]], width: int) -> dict[str, torch.Tensor | HostInt]:
    """The boundary inputs of rows `width` tokens wide, each made of sequences of `row_lengths[i]`
    tokens followed by padding up to `width`, which forms one more sequence.

    `cu_seq_lens` is int32 (the flash kernels' index type) and counts over the flattened rows:
    [0, end of the first sequence, ..., rows * width].
    """
    lengths: list[int] = []
    for row in row_lengths:
        lengths.extend(row)
        padding = width - sum(row)
        if padding:
            lengths.append(padding)
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    longest = HostInt(max(lengths))
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }
