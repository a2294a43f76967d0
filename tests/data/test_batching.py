"""trainer/data/batching.py directly: the data order, the step batches, a process's share of a
micro-batch, padded batches and the per-item sizes."""

import numpy as np
import pytest
import torch

from trainer.data.batching import DataSchedule, collate, epoch_order, item_sizes, shard
from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample

EOS = 7  # also the padding id below, as for GPT-2's tokenizers


def test_epoch_order_is_a_fixed_permutation_per_seed_and_epoch():
    # Pinned: a run resumed by a newer version must see the data in the order it started with.
    assert epoch_order(10, 1, 0) == [2, 7, 1, 0, 3, 9, 8, 5, 4, 6]
    assert epoch_order(10, 1, 1) == [3, 2, 6, 1, 9, 5, 8, 0, 4, 7]
    assert epoch_order(10, 2, 0) == [2, 8, 5, 1, 3, 4, 0, 9, 6, 7]
    epoch_order.cache_clear()
    assert epoch_order(10, 1, 0) == [2, 7, 1, 0, 3, 9, 8, 5, 4, 6]  # computed again, not only cached
    assert sorted(epoch_order(1000, 5, 3)) == list(range(1000))


def test_step_batches_split_each_epoch_into_steps_of_global_micro_batches():
    # 10 examples, 2 per process, 2 processes, 2 micro-batches a step: micro-batches of 4, 4, 2,
    # so 2 steps an epoch, the second one with a single, short micro-batch.
    schedule = DataSchedule(10, micro_batch_size=2, accumulation=2, world_size=2, seed=1)
    assert (schedule.global_batch, schedule.micro_batches_per_epoch, schedule.steps_per_epoch) == (4, 3, 2)
    assert schedule.step_batches(1).epoch == 0 and schedule.step_batches(1).micro_batches == [
        [2, 7, 1, 0],
        [3, 9, 8, 5],
    ]
    assert schedule.step_batches(2).epoch == 0 and schedule.step_batches(2).micro_batches == [[4, 6]]
    assert schedule.step_batches(3).epoch == 1 and schedule.step_batches(3).micro_batches == [
        [3, 2, 6, 1],
        [9, 5, 8, 0],
    ]
    assert schedule.step_batches(4).micro_batches == [[4, 7]]
    assert schedule.step_batches(1) == schedule.step_batches(1)  # a pure function of the step: a resume replays it


@pytest.mark.parametrize(
    "examples, micro_batch_size, accumulation, world_size",
    [(10, 2, 2, 2), (7, 3, 1, 1), (25, 1, 4, 3), (4, 8, 2, 2)],
)
def test_every_epoch_covers_each_example_exactly_once(examples, micro_batch_size, accumulation, world_size):
    schedule = DataSchedule(
        examples, micro_batch_size=micro_batch_size, accumulation=accumulation, world_size=world_size, seed=3
    )
    for epoch in range(2):
        steps = range(epoch * schedule.steps_per_epoch + 1, (epoch + 1) * schedule.steps_per_epoch + 1)
        step_batches = [schedule.step_batches(step) for step in steps]
        assert {batches.epoch for batches in step_batches} == {epoch}
        seen = [i for batches in step_batches for micro_batch in batches.micro_batches for i in micro_batch]
        assert sorted(seen) == list(range(examples))
        assert all(1 <= len(batches.micro_batches) <= accumulation for batches in step_batches)
        assert all(len(mb) <= micro_batch_size * world_size for batches in step_batches for mb in batches.micro_batches)


def test_total_steps_rounds_a_fraction_of_an_epoch_up_and_is_at_least_one():
    schedule = DataSchedule(10, micro_batch_size=2, accumulation=2, world_size=2, seed=1)  # 2 steps an epoch
    assert [schedule.total_steps(e) for e in (3, 2.5, 0.5, 0.1)] == [6, 5, 1, 1]


def test_shard_gives_each_process_every_world_size_th_example():
    assert [shard([10, 11, 12, 13, 14], rank, 2) for rank in (0, 1)] == [([10, 12, 14], True), ([11, 13], True)]
    assert [shard([10, 11, 12, 13], rank, 4) for rank in range(4)] == [
        ([10], True),
        ([11], True),
        ([12], True),
        ([13], True),
    ]


def test_a_process_left_without_examples_gets_a_stand_in_marked_not_real():
    assert [shard([10, 11], rank, 3) for rank in range(3)] == [([10], True), ([11], True), ([10], False)]


def example(ids: list[int], prompt: int) -> TokenizedExample:
    return TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "data.jsonl", 1)


def test_collate_pads_by_position_so_eos_stays_supervised_when_pad_is_eos():
    batch = collate([example([5, 6, 8, EOS], 2), example([5, 9, 10, 11, 12, EOS], 1)], pad_id=EOS)
    assert batch["input_ids"].tolist() == [[5, 6, 8, EOS, EOS, EOS], [5, 9, 10, 11, 12, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    M = IGNORE_INDEX  # masked
    assert batch["labels"].tolist() == [[M, M, 8, EOS, M, M], [M, 9, 10, 11, 12, EOS]]
    assert {batch[k].dtype for k in ("input_ids", "attention_mask", "labels")} == {torch.long}
    # The rows' boundaries for the varlen path: row 0 is 4 tokens and 2 of padding, row 1 is 6.
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 6, 12] and batch["max_length_q"] == 6


def test_collate_without_supervision_masks_every_label():
    batch = collate([example([5, 6, EOS], 1), example([5, EOS], 0)], pad_id=0, supervise=False)
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3] * 2
    assert batch["input_ids"].tolist() == [[5, 6, EOS], [5, EOS, 0]]


def test_item_sizes_of_examples_are_their_tokens_and_supervised_tokens():
    tokens, supervised = item_sizes([example([5, 6, 8, EOS], 2), example([5, 9, EOS], 0), example([5, EOS], 2)])
    assert tokens.tolist() == [4, 3, 2] and supervised.tolist() == [2, 2, 0]  # position 0 is never predicted


def test_item_sizes_takes_the_arrays_tokenized_data_keeps():
    class Kept:  # as TokenizedData: arrays, so no example is built
        lengths = np.array([4, 9])
        supervised_tokens = np.array([1, 3])

        def __iter__(self):
            raise AssertionError("item_sizes must not iterate over the items")

    tokens, supervised = item_sizes(Kept())
    assert tokens is Kept.lengths and supervised is Kept.supervised_tokens


def test_training_batches_give_this_process_its_share_and_the_whole_steps_sizes():
    """Process 1 of 2 at step 1 of the 10-example schedule above: micro-batches [2, 7, 1, 0] and
    [3, 9, 8, 5]; its shares are items [7, 0] and [9, 5]; the step's 8 items count for both."""
    from trainer.data.batching import TrainingBatches

    rows = [TokenizedExample([5] * (i + 2), [IGNORE_INDEX] + [5] * (i + 1), "d.jsonl", i + 1) for i in range(10)]
    schedule = DataSchedule(10, micro_batch_size=2, accumulation=2, world_size=2, seed=1)
    batches = TrainingBatches(rows, collate, EOS, schedule, rank=1, world_size=2)
    collated, step_items, supervised = batches.of_step(1)
    assert step_items == [2, 7, 1, 0, 3, 9, 8, 5]
    assert supervised == sum(i + 1 for i in step_items) == 43  # example i supervises i + 1 tokens
    assert [b["input_ids"].shape[1] for b in collated] == [9, 11]  # rows 7 and 0, rows 9 and 5: longest
    assert batches.tokens_of(step_items) == sum(i + 2 for i in step_items) == 51
    items, batch, real = batches.first_micro_batch(2)  # step 2 is [[4, 6]]: process 1 gets item 6
    assert real and [item.line for item in items] == [7] and batch["input_ids"].shape == (1, 8)
    assert batches.source_lines([4, 6]) == ["d.jsonl line 5", "d.jsonl line 7"]
    alone = TrainingBatches(rows[:1], collate, EOS, DataSchedule(1, micro_batch_size=1, accumulation=1,
                            world_size=2, seed=1), rank=1, world_size=2)  # fmt: skip
    items, batch, real = alone.first_micro_batch(1)  # nothing of its own: a stand-in with no labels
    assert not real and batch["labels"].eq(IGNORE_INDEX).all()
