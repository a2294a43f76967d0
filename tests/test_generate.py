import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.config import TestPrompt
from trainer.generate import complete, cut_completion


def test_cut_before_the_earliest_stop_sequence():
    assert cut_completion(" yellow\nlime -> green", ["->", "\n"]) == (" yellow", True)
    assert cut_completion(" yellow", ["\n"]) == (" yellow", False)
    assert cut_completion(" yellow", [""]) == (" yellow", False)


def greedy(model, tokenizer, **params):
    return complete(model, tokenizer, TestPrompt(prompt="banana ->", **params), seed=0)


@torch.no_grad()
def manual_greedy(model, tokenizer, ids: list[int], steps: int) -> list[int]:
    """The new ids greedy decoding gives after `ids`, one forward per token, up to EOS."""
    new = []
    for _ in range(steps):
        next_id = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
        if next_id == tokenizer.eos_token_id:
            break
        new.append(next_id)
    return new


def test_greedy_completion_matches_manual_greedy_decoding(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    sample = greedy(model, tokenizer, max_new_tokens=8)
    prompt_ids = tokenizer("banana ->")["input_ids"]
    assert sample["completion"] == tokenizer.decode(manual_greedy(model, tokenizer, prompt_ids, 8))
    assert sample["parameters"]["max_new_tokens"] == 8 and sample["parameters"]["temperature"] == 0.0


def test_stop_sequence_cuts_the_text(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    free = greedy(model, tokenizer, max_new_tokens=12)["completion"]
    assert len(free) > 2
    stop = free[2:4]
    cut = greedy(model, tokenizer, max_new_tokens=12, stop=[stop])
    assert cut["completion"] == free[: free.index(stop)] and cut["finish_reason"] == "stop"


def test_generation_never_passes_the_position_limit(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    sample = greedy(model, tokenizer, max_new_tokens=500)  # the tiny model has 64 positions
    assert sample["finish_reason"] in ("length", "eos")
    assert len(tokenizer(sample["completion"])["input_ids"]) <= 64


def test_sampling_is_reproducible_with_the_seed(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    first = greedy(model, tokenizer, temperature=1.0, top_k=50, max_new_tokens=10)
    second = greedy(model, tokenizer, temperature=1.0, top_k=50, max_new_tokens=10)
    assert first == second


# Chat test prompts: the template and the tokens are those of training.

CONVERSATION = [
    ("system", "Marv."),
    ("user", "Hi?"),
    ("assistant", "Hello."),
    ("user", "Bye?"),
    ("assistant", "Bye now."),
]
TAGGED_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_prompt(messages, **params):
    return TestPrompt(messages=[{"role": r, "content": c} for r, c in messages], **params)


def training_context_ids(tokenizer, chat_template):
    """Training's ids before each trained assistant turn of CONVERSATION."""
    from trainer.data.examples import Example
    from trainer.data.tokenize import IGNORE_INDEX, tokenize_examples

    [row], _ = tokenize_examples(
        [Example("", "", "chat.jsonl", 1, tuple(CONVERSATION))],
        tokenizer,
        max_seq_len=256,
        too_long="error",
        chat_template=chat_template,
    )
    starts = [
        i for i in range(1, len(row.labels)) if row.labels[i] != IGNORE_INDEX and row.labels[i - 1] == IGNORE_INDEX
    ]
    return [row.input_ids[:start] for start in starts]


@pytest.mark.parametrize("template", ["default", "tokenizer's own", "config"])
def test_chat_test_prompt_ids_equal_the_training_context_before_each_assistant_turn(tokenizer, template):
    import copy

    from trainer.generate import encode_test_prompt

    chat_template = None
    if template == "tokenizer's own":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = TAGGED_TEMPLATE
    elif template == "config":
        chat_template = TAGGED_TEMPLATE
    first, second = training_context_ids(tokenizer, chat_template)
    assert encode_test_prompt(tokenizer, chat_prompt(CONVERSATION[:2]), chat_template) == first
    assert encode_test_prompt(tokenizer, chat_prompt(CONVERSATION[:4]), chat_template) == second
    if template != "default":  # the template really was used
        assert (
            first[: len(tokenizer("<|system|>", add_special_tokens=False)["input_ids"])]
            == tokenizer("<|system|>", add_special_tokens=False)["input_ids"]
        )


def test_chat_sample_records_the_rendered_prompt_and_the_messages(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    sample = complete(model, tokenizer, chat_prompt(CONVERSATION[:2], max_new_tokens=4), seed=0)
    assert sample["prompt"] == "System: Marv.\n\nUser: Hi?\n\nAssistant:"
    assert sample["messages"] == [{"role": "system", "content": "Marv."}, {"role": "user", "content": "Hi?"}]
    assert "messages" not in sample["parameters"] and sample["parameters"]["max_new_tokens"] == 4


def test_an_empty_prompt_starts_from_the_beginning_of_text_token(tiny_model_dirs, tokenizer):
    """A model given no token has nothing to predict from: an empty prompt is an unconditioned
    sample, from the tokenizer's BOS (GPT-2's is its end-of-text)."""
    from trainer.generate import prompt_row

    row = prompt_row(tokenizer, TestPrompt(prompt=""), seed=0)
    assert row.prompt_ids == [tokenizer.bos_token_id] and row.prompt_text == ""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    sample = complete(model, tokenizer, TestPrompt(prompt="", max_new_tokens=4), seed=0)
    assert sample["completion"] == tokenizer.decode(manual_greedy(model, tokenizer, [tokenizer.bos_token_id], 4))
