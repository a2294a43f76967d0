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


def test_greedy_completion_matches_manual_greedy_decoding(tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    sample = greedy(model, tokenizer, max_new_tokens=8)
    ids = tokenizer("banana ->")["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            next_id = model(torch.tensor([ids])).logits[0, -1].argmax().item()
            if next_id == tokenizer.eos_token_id:
                break
            ids.append(next_id)
    assert sample["completion"] == tokenizer.decode(ids[len(tokenizer("banana ->")["input_ids"]):])
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
