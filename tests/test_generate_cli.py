"""python -m trainer.generate, and batched generation: the checkpoint's samples reproduced from the
command line (text, chat, sampled with the run's seed), batched greedy output equal to unbatched."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import write_jsonl
from tests.trained_runs import SEED, TEST_PROMPTS, read_samples
from trainer.config import TestPrompt
from trainer.generate import Row, generate_all, generate_rows, main, plan_batches, prompt_row


def generate(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before (a fixture's training run)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_prompt_prints_the_checkpoints_completion(capsys, trained_checkpoints):
    checkpoint = trained_checkpoints("gptj", "lora")
    [sample] = [s for s in read_samples(checkpoint) if s["prompt"] == "kiwi ->"]
    argv = [checkpoint, "--prompt", "kiwi ->", "--max-new-tokens", 16, "--stop", "e"]
    code, out, _ = generate(capsys, *argv)
    assert code == 0 and out == sample["completion"] + "\n"
    code, out, _ = generate(capsys, *argv, "--jsonl")
    assert code == 0 and json.loads(out) == sample


def test_prompts_file_reproduces_samples_jsonl_exactly(tmp_path, capsys, trained_checkpoints):
    checkpoint = trained_checkpoints("gpt2", "lora")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", TEST_PROMPTS)
    code, out, _ = generate(capsys, checkpoint, "--prompts", prompts, "--batch-size", 3)
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == read_samples(checkpoint)


def test_chat_messages_and_samples_with_their_seeds(capsys, trained_checkpoints):
    checkpoint = trained_checkpoints("gpt2", "lora")
    samples = read_samples(checkpoint)
    messages = json.dumps(TEST_PROMPTS[3]["messages"])
    code, out, _ = generate(capsys, checkpoint, "--messages", messages, "--max-new-tokens", 8)
    assert code == 0 and out == samples[3]["completion"] + "\n"

    # Sample i is drawn with seed + i; the run's training.seed is the default, so sample 0 is the
    # checkpoint's own sample of this prompt.
    sampled = ("--prompt", "tomato ->", "--temperature", 0.8, "--top-k", 20, "--max-new-tokens", 8, "--num-samples", 3)
    code, out, _ = generate(capsys, checkpoint, *sampled)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines[0] == samples[2]
    assert [line["parameters"]["seed"] for line in lines] == [SEED, SEED + 1, SEED + 2]
    code, again, _ = generate(
        capsys,
        checkpoint,
        *sampled,
        "--seed",
        SEED,
    )
    assert again == out


PROMPTS = [
    "banana ->",
    "kiwi -> green\nlemon -> yellow\ncherry ->",
    "",
    "Hello world, the quick brown fox jumps",
    "lime ->",
    "List the locations mentioned in the following text.\nText: x\nLocations:",
    "tomato",
    "k",
]


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_batched_greedy_output_equals_unbatched(tiny_model_dirs, family):
    """Random tiny models rarely emit EOS, so rows run long, at different lengths, under padding."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
    rows = [
        prompt_row(tokenizer, TestPrompt(prompt=p, max_new_tokens=n, stop=stop), seed=0)
        for p in PROMPTS
        for n, stop in ((20, []), (12, ["e"]))
    ]
    assert plan_batches(rows, 8, 64)[0] and max(map(len, plan_batches(rows, 8, 64))) == 8
    one_by_one = [generate_rows(model, tokenizer, [row])[0] for row in rows]
    assert generate_all(model, tokenizer, rows, batch_size=8) == one_by_one
    assert {c.finish_reason for c in one_by_one} >= {"length", "stop"}
    assert max(c.completion_tokens for c in one_by_one) == 20


def test_batches_keep_sampling_settings_apart_and_within_the_position_limit():
    def row(prompt_tokens: int, max_new_tokens: int, seed: int | None = None, **sampling) -> Row:
        return Row(TestPrompt(prompt="x", max_new_tokens=max_new_tokens, **sampling), [5] * prompt_tokens, "x", seed)

    rows = [
        row(10, 20),
        row(50, 20),
        row(12, 5),
        row(3, 8, temperature=0.7),
        row(4, 8, temperature=0.7),
        row(5, 8, temperature=0.7, top_k=3),
        row(6, 8, 1, temperature=0.7),
        row(7, 8, 1, temperature=0.7),
    ]
    # Greedy rows 0 and 2 fit together (12 + 20 <= 64); row 1 (50 tokens, budget 14) would not fit with 20.
    assert sorted(map(sorted, plan_batches(rows, 8, 64))) == [[0, 2], [1], [3, 4], [5], [6], [7]]
    assert sorted(map(sorted, plan_batches(rows[:3], 1, 64))) == [[0], [1], [2]]


def test_a_cancelled_row_stops_at_the_next_token(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    rows = [prompt_row(tokenizer, TestPrompt(prompt="banana ->", max_new_tokens=30), seed=0) for _ in range(2)]
    rows[0].cancelled = lambda: True
    cancelled, kept = generate_rows(model, tokenizer, rows)
    assert cancelled.completion_tokens == 1 and kept.completion_tokens == 30


def test_generation_keeps_the_rng_of_the_caller(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_all(model, tokenizer, [prompt_row(tokenizer, TestPrompt(prompt="kiwi ->", temperature=1.0), seed=None)])
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "argv, code, expected",
    [
        (["--prompt", "a", "--messages", "[]"], 2, "not allowed with argument"),
        ([], 2, "one of the arguments --prompt --prompts --messages is required"),
        (["--messages", "{nope"], 2, "--messages is not valid JSON"),
        (["--messages", '[{"role": "bot", "content": "x"}]'], 1, "--messages: messages.0.role"),
        (["--prompt", "a", "--top-p", "2"], 2, "error: --top-p: Input should be less than or equal to 1"),
        (["--prompt", "a", "--max-new-tokens", "-3"], 2, "error: --max-new-tokens: Input should be greater than 0"),
        (["--prompt", "a", "--num-samples", "0"], 2, "--num-samples must be at least 1"),
        (["--prompts", "PROMPTS"], 1, "line 2: temperature: Input should be greater than or equal to 0"),
        (["--prompt", "a", "--device", "nope"], 2, "--device 'nope' is not a device"),
    ],
)
def test_bad_arguments_end_in_one_line(tmp_path, capsys, trained_checkpoints, argv, code, expected):
    checkpoint = trained_checkpoints("gpt2", "lora")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b", "temperature": -1}])
    argv = [prompts if a == "PROMPTS" else a for a in argv]
    got, out, err = generate(capsys, checkpoint, *argv)
    assert got == code and expected in err and not out and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_not_a_checkpoint(tmp_path, capsys):
    code, out, err = generate(capsys, tmp_path, "--prompt", "a")
    assert code == 1 and not out and err.startswith(f"error: {tmp_path} is not a checkpoint") and err.count("\n") == 1
