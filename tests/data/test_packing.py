import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.attention import install_attention
from trainer.data.batching import collate
from trainer.data.boundaries import BOUNDARY_KEYS
from trainer.data.packing import PackedRow, collate_packed, pack_examples, packing_stats
from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample
from trainer.loss import supervised_loss_sum

MASKED = IGNORE_INDEX


def example(length: int, prompt: int = 1, line: int = 1, start: int = 1) -> TokenizedExample:
    ids = list(range(start, start + length))
    return TokenizedExample(ids, [MASKED] * prompt + ids[prompt:], "data.jsonl", line)


def lines(row: PackedRow) -> list[int]:
    return [e.line for e in row.examples]


def test_best_fit_decreasing_gives_these_exact_rows():
    lengths = [2, 6, 1, 4, 3, 5, 2]  # lines 1..7
    examples = [example(n, line=i + 1) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, max_seq_len=8)
    # 6 -> new row; 5 -> new row; 4 -> new row; 3 fills the 5's row; 2 fills the 6's row;
    # the other 2 and the 1 go with the 4.
    assert [lines(r) for r in rows] == [[2, 1], [6, 5], [4, 7, 3]]
    assert [len(r) for r in rows] == [8, 8, 7]


def test_every_example_is_packed_once_within_max_seq_len_deterministically():
    rng = random.Random(0)
    examples = [example(rng.randint(1, 100), line=i) for i in range(500)]
    rows = pack_examples(examples, max_seq_len=128)
    assert sorted(e.line for r in rows for e in r.examples) == list(range(500))
    assert max(len(r) for r in rows) <= 128
    assert [lines(r) for r in rows] == [lines(r) for r in pack_examples(examples, max_seq_len=128)]
    total = sum(len(e.input_ids) for e in examples)
    assert len(rows) <= total // 128 + 3  # within a few rows of the bound no packing can beat
    assert packing_stats(rows, 128).padding_fraction < 0.02


def test_an_example_longer_than_max_seq_len_is_a_bug_upstream():
    with pytest.raises(ValueError, match="data.jsonl line 9: 5 tokens"):
        pack_examples([example(5, line=9)], max_seq_len=4)


def test_packed_row_masks_each_members_first_label_and_restarts_positions():
    first = TokenizedExample([5, 6, 7], [MASKED, 6, 7], "a.jsonl", 1)
    second = TokenizedExample([8, 9], [8, 9], "a.jsonl", 2)  # open-ended text: every label set
    row = PackedRow((first, second))
    assert row.input_ids == [5, 6, 7, 8, 9]
    # 8 would be predicted from 7, the other example's last token: never.
    assert row.labels == [MASKED, 6, 7, MASKED, 9]
    assert row.position_ids == [0, 1, 2, 0, 1]
    assert row.seq_lens == [3, 2]
    assert row.supervised_tokens == first.supervised_tokens + second.supervised_tokens == 3
    assert len(row) == 5


def test_collate_packed_pads_as_a_separate_sequence_without_a_2d_mask():
    long = PackedRow((example(3, start=10), example(2, start=20)))
    short = PackedRow((example(2, start=30),))
    batch = collate_packed([long, short], pad_id=0)
    assert "attention_mask" not in batch
    assert set(batch) == {"input_ids", "labels", "position_ids", *BOUNDARY_KEYS}
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 0, 0, 0]]
    assert batch["labels"].tolist() == [[MASKED, 11, 12, MASKED, 21], [MASKED, 31, MASKED, MASKED, MASKED]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # The varlen path's boundaries over the flattened rows: 3 | 2 || 2 | 3 of padding.
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 3 and batch["max_length_q"].to("meta") == 3  # stays a host int
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"] and batch["max_length_k"] == 3
    idle = collate_packed([long, short], pad_id=0, supervise=False)
    assert (idle["labels"] == MASKED).all()
    assert torch.equal(idle["input_ids"], batch["input_ids"])


def test_packing_stats_padding_fraction():
    rows = pack_examples([example(n, line=i) for i, n in enumerate([6, 5, 3, 2])], max_seq_len=8)
    stats = packing_stats(rows, 8)
    assert (stats.examples, stats.rows, stats.tokens) == (4, 2, 16)
    assert stats.padding_fraction == 0.0
    stats = packing_stats(pack_examples([example(6), example(5)], max_seq_len=8), 8)
    assert stats.padding_fraction == 1 - 11 / 16
    assert stats.summary() == "packed 2 examples (11 tokens) into 2 rows of 8: 31.2% padding"


# ---------------------------------------------------------------------------------------------
# Issue 4's acceptance test: packed loss and gradients == unpacked, per architecture and backend.


def fruit_examples(tokenizer) -> list[TokenizedExample]:
    from trainer.data.tokenize import encode_completion, encode_prompt

    pairs = [
        ("banana ->", " yellow"),
        ("kiwi ->", " green and sweet"),
        ("", "Hello world, the quick brown fox."),
        ("lemon ->", " yellow"),
        ("tomato ->", " red"),
    ]
    examples = []
    for line, (prompt, completion) in enumerate(pairs, 1):
        p, c = encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
        examples.append(TokenizedExample(p + c, [MASKED] * len(p) + c, "fruit.jsonl", line))
    # Every label set, position 0 included (as a format may produce): packed after a longer
    # example, its first token must not be predicted from that example's last one.
    ids = encode_completion(tokenizer, "lime -> green")
    examples.append(TokenizedExample(ids, list(ids), "fruit.jsonl", len(pairs) + 1))
    return examples


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = supervised_loss_sum(model, batch, chunk_rows=7)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["eager", "sdpa", "varlen"])
@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dirs, tokenizer, family, attention):
    examples = fruit_examples(tokenizer)
    rows = pack_examples(examples, max_seq_len=32)
    assert len(rows) < len(examples) and any(len(r.examples) > 1 for r in rows)
    assert all(r.examples[0] is not examples[-1] for r in rows)  # the all-supervised one follows another
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
    install_attention(model, attention)  # varlen runs its CPU reference kernel here

    unpacked_loss, unpacked_grads = loss_and_grads(model, collate(examples, tokenizer.pad_token_id))
    packed_loss, packed_grads = loss_and_grads(model, collate_packed(rows, tokenizer.pad_token_id))

    assert sum(r.supervised_tokens for r in rows) == sum(e.supervised_tokens for e in examples)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-5)
    for name, grad in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_a_2d_attention_mask_would_let_packed_examples_see_each_other(tiny_model_dirs, tokenizer, family):
    """The trap the acceptance test guards against: with a 2D mask transformers stops isolating."""
    examples = fruit_examples(tokenizer)
    rows = pack_examples(examples, max_seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
    with torch.no_grad():
        unpacked = supervised_loss_sum(model, collate(examples, tokenizer.pad_token_id))
        batch = collate_packed(rows, tokenizer.pad_token_id)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        contaminated = supervised_loss_sum(model, batch)
    assert abs(contaminated.item() - unpacked.item()) > 1e-3
