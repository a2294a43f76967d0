"""trainer/data/boundaries.py directly: the cu_seq_lens and longest length of padded and packed rows.
(That they are the cuts trainer/attention.py would find in the batch is tested in tests/test_attention.py.)"""

import torch

from trainer.data.boundaries import BOUNDARY_KEYS, HostInt, boundary_inputs


def test_padded_rows_each_sequence_then_its_padding_as_one_more():
    inputs = boundary_inputs([[3], [5], [4]], 5)  # rows of 3 + 2 padding, 5, 4 + 1 padding
    assert sorted(inputs) == sorted(BOUNDARY_KEYS)
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 10, 14, 15]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]  # self-attention: the same cuts
    assert inputs["max_length_q"] == inputs["max_length_k"] == 5


def test_packed_rows_each_member_a_sequence():
    inputs = boundary_inputs([[2, 3], [4, 2]], 6)  # 2 + 3 + 1 padding, 4 + 2 (full)
    assert inputs["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 10, 12]
    assert inputs["max_length_q"] == 4


def test_the_padding_can_be_the_longest_sequence():
    inputs = boundary_inputs([[1], [2]], 8)
    assert inputs["cu_seq_lens_q"].tolist() == [0, 1, 8, 10, 16]
    assert inputs["max_length_q"] == 7


def test_the_longest_length_stays_a_host_int_when_the_batch_is_moved():
    inputs = boundary_inputs([[3]], 3)
    moved = {key: value.to("cpu", non_blocking=True) for key, value in inputs.items()}
    assert type(moved["max_length_q"]) is HostInt and moved["max_length_q"] == 3
    assert moved["cu_seq_lens_q"].tolist() == [0, 3]
