import pytest

from trainer.data.batching import collate
from trainer.data.examples import Example
from trainer.data.tokenize import IGNORE_INDEX, encode_prompt, tokenize_examples
from trainer.errors import UserError


def example(prompt: str, completion: str, line: int = 1) -> Example:
    return Example(prompt, completion, "data.jsonl", line)


def tokenize(tokenizer, examples, max_seq_len=64, too_long="error"):
    return tokenize_examples(examples, tokenizer, max_seq_len=max_seq_len, too_long=too_long)


def test_prompt_tokens_are_exactly_the_inference_tokens_across_a_merging_boundary(tokenizer):
    # A separator split across the boundary: jointly, " ->" is one token.
    prompt, completion = "kiwi -", "> green"
    joint = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    prompt_ids = encode_prompt(tokenizer, prompt)
    # The trap: tokenized jointly, " ->" is one token, so the first len(prompt_ids) joint
    # tokens are not the prompt the model gets at inference.
    assert joint[: len(prompt_ids)] != prompt_ids
    [row], _ = tokenize(tokenizer, [example(prompt, completion)])
    assert row.input_ids[: len(prompt_ids)] == prompt_ids
    assert row.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row.input_ids[len(prompt_ids) :] == completion_ids
    assert row.labels[len(prompt_ids) :] == completion_ids


def test_eos_literal_becomes_the_eos_id_not_text(tokenizer):
    [with_literal, without], _ = tokenize(
        tokenizer, [example("banana ->", " yellow<|endoftext|>"), example("banana ->", " yellow")]
    )
    assert with_literal.input_ids == without.input_ids
    assert with_literal.input_ids[-1] == tokenizer.eos_token_id
    assert with_literal.input_ids.count(tokenizer.eos_token_id) == 1
    assert "<|endoftext|>" not in tokenizer.decode(with_literal.input_ids[:-1])


def test_eos_is_supervised_even_though_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows, _ = tokenize(
        tokenizer,
        [
            example("banana ->", " yellow<|endoftext|>"),
            example("List the locations mentioned", " in the following text."),
        ],
    )
    batch = collate(rows, tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        assert batch["labels"][i, n - 1].item() == tokenizer.eos_token_id  # EOS keeps its label
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (batch["labels"].shape[1] - n)  # padding does not
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
    short = min(range(2), key=lambda i: len(rows[i].input_ids))
    assert (batch["input_ids"][short] == tokenizer.eos_token_id).sum() > 1  # padding is made of EOS ids


def test_empty_prompt_starts_from_the_start_token_and_trains_every_text_token(tokenizer):
    [row], _ = tokenize(tokenizer, [example("", "Hello world")])
    text_ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert row.input_ids == [tokenizer.eos_token_id] + text_ids + [tokenizer.eos_token_id]
    assert row.labels == [IGNORE_INDEX] + text_ids + [tokenizer.eos_token_id]
    assert row.supervised_tokens == len(text_ids) + 1


def test_supervised_tokens_count_completion_and_eos(tokenizer):
    [row], _ = tokenize(tokenizer, [example("banana ->", " yellow")])
    assert row.supervised_tokens == len(tokenizer(" yellow", add_special_tokens=False)["input_ids"]) + 1


def long_and_short(tokenizer):
    long = example("kiwi ->", " green" * 30, line=2)
    short = example("lime ->", " green", line=3)
    prompt_too_long = example("lemon " * 40 + "->", " yellow", line=4)
    return [short, long, prompt_too_long]


def test_too_long_error_lists_lines_and_the_fix(tokenizer):
    with pytest.raises(UserError) as info:
        tokenize(tokenizer, long_and_short(tokenizer), max_seq_len=20)
    message = str(info.value)
    assert "2 examples are longer than data.max_seq_len=20" in message
    assert "data.jsonl line 2" in message and "data.jsonl line 4" in message and "line 3" not in message
    assert "data.too_long" in message


def test_too_long_drop(tokenizer):
    rows, report = tokenize(tokenizer, long_and_short(tokenizer), max_seq_len=20, too_long="drop")
    assert [r.line for r in rows] == [3]
    assert report.dropped == ["data.jsonl line 2", "data.jsonl line 4"] and report.truncated == []


def test_too_long_truncate_cuts_the_completion_and_drops_prompts_that_fill_the_window(tokenizer):
    rows, report = tokenize(tokenizer, long_and_short(tokenizer), max_seq_len=20, too_long="truncate")
    assert [r.line for r in rows] == [3, 2]
    assert len(rows[1].input_ids) == 20 and len(rows[1].labels) == 20
    prompt_len = len(encode_prompt(tokenizer, "kiwi ->"))
    assert rows[1].labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert report.truncated == ["data.jsonl line 2"] and report.dropped == ["data.jsonl line 4"]
    assert report.summary() == "2 examples kept, 1 dropped, 1 truncated as too long"


def test_batched_encoding_equals_the_one_example_reference(tokenizer):
    from trainer.data.tokenize import encode_completion

    cases = [("banana ->", " yellow<|endoftext|>"), ("", "Hello world"), ("kiwi -", "> green"), ("lemon ->", " yellow")]
    rows, _ = tokenize(tokenizer, [example(p, c, line=i) for i, (p, c) in enumerate(cases, start=1)])
    for row, (prompt, completion) in zip(rows, cases):
        prompt_ids, completion_ids = encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
        assert row.input_ids == prompt_ids + completion_ids
        assert row.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def test_the_batch_encoder_takes_the_plain_call_when_the_fast_path_disagrees(tokenizer, monkeypatch):
    from trainer.data.tokenize import BatchEncoder

    encoder = BatchEncoder(tokenizer)
    monkeypatch.setattr(encoder, "_fast", lambda texts, add_special_tokens: [[0] for _ in texts])
    texts = ["banana ->", " yellow"]
    assert encoder(texts, add_special_tokens=False) == [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts
    ]
    assert encoder._backend is None  # and keeps taking it


def test_tokenized_data_counts_match_the_examples_after_truncation(tokenizer):
    from trainer.data.tokenize import TokenizedData, apply_length_policy, encode_examples

    rows, _ = encode_examples(long_and_short(tokenizer) + [example("", "Hello world", line=5)], tokenizer)
    data, report = apply_length_policy(TokenizedData([rows]), max_seq_len=20, too_long="truncate")
    assert data.lengths.tolist() == [len(e.input_ids) for e in data] and max(data.lengths) == 20
    assert data.supervised_tokens.tolist() == [e.supervised_tokens for e in data]
    assert [e.line for e in data[1:]] == [2, 5] and data[-1].line == 5
    with pytest.raises(IndexError):
        data[3]
