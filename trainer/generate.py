"""Completions for the test prompts, each with its own sampling parameters."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from trainer.config import TestPrompt
from trainer.data.tokenize import encode_chat_prompt, encode_prompt, render_chat_prompt


class _StopOnSequences(StoppingCriteria):
    """Stop once the generated text contains any stop sequence (the text is cut there afterwards)."""

    def __init__(self, tokenizer, prompt_length: int, stops: list[str]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        # Decoding each step costs a GPU->CPU copy of the new ids; test prompts are few and short.
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :])
        done = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def cut_completion(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop sequence; returns (text, whether one was found)."""
    cuts = [text.index(stop) for stop in stops if stop and stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _messages(test_prompt: TestPrompt) -> list[tuple[str, str]]:
    return [(message.role, message.content) for message in test_prompt.messages]


def encode_test_prompt(tokenizer, test_prompt: TestPrompt, chat_template: str | None = None) -> list[int]:
    """The ids the model is given, encoded exactly as training encodes a context: `encode_prompt`
    for a text prompt; for a chat prompt `encode_chat_prompt` with the training data's template
    (`data.chat_template`, else the tokenizer's, else the plain-text default)."""
    if test_prompt.messages is not None:
        return encode_chat_prompt(tokenizer, _messages(test_prompt), chat_template)
    return encode_prompt(tokenizer, test_prompt.prompt)


@torch.no_grad()
def complete(model, tokenizer, test_prompt: TestPrompt, *, seed: int, chat_template: str | None = None) -> dict:
    """Generate one completion from the same prompt tokens as training (`encode_test_prompt`);
    `chat_template` is `data.chat_template` (None: the tokenizer's template, else the default)."""
    ids = encode_test_prompt(tokenizer, test_prompt, chat_template)
    prompt_text = (
        test_prompt.prompt if test_prompt.messages is None
        else render_chat_prompt(tokenizer, _messages(test_prompt), chat_template)
    )
    return _generate(model, tokenizer, test_prompt, ids, prompt_text, seed)


def _generate(model, tokenizer, test_prompt: TestPrompt, prompt_ids: list[int], prompt_text: str, seed: int) -> dict:
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    # Never generate past the model's position limit (its embeddings would index out of range).
    position_limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    max_new_tokens = min(test_prompt.max_new_tokens, position_limit - len(prompt_ids))
    if max_new_tokens < 1:
        return _sample(test_prompt, prompt_text, "", "length", seed)
    sampling = test_prompt.temperature > 0
    options = dict(do_sample=sampling, max_new_tokens=max_new_tokens)
    if sampling:
        options.update(temperature=test_prompt.temperature, top_p=test_prompt.top_p, top_k=test_prompt.top_k)
    else:
        options.update(temperature=None, top_p=None, top_k=None)  # silence warnings from model defaults
    stopping = StoppingCriteriaList([_StopOnSequences(tokenizer, len(prompt_ids), test_prompt.stop)]) if test_prompt.stop else None
    # Each prompt samples the same way at every checkpoint; fork_rng leaves the training RNG (dropout)
    # where it was, so the main process stays in step with the others.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stopping,
            use_cache=True,
            **options,
        )
    new_ids = output[0, len(prompt_ids) :].tolist()  # GPU->CPU sync, once per prompt
    finish_reason = "length"
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
        finish_reason = "eos"
    text, stopped = cut_completion(tokenizer.decode(new_ids), test_prompt.stop)
    if stopped:
        finish_reason = "stop"
    return _sample(test_prompt, prompt_text, text, finish_reason, seed)


def _sample(test_prompt: TestPrompt, prompt_text: str, completion: str, finish_reason: str, seed: int) -> dict:
    """One line of samples.jsonl: the prompt (for a chat prompt, the rendered text the model got,
    plus the messages), the completion, why it ended, the parameters used."""
    sample = {"prompt": prompt_text}
    if test_prompt.messages is not None:
        sample["messages"] = [message.model_dump() for message in test_prompt.messages]
    return sample | {
        "completion": completion,
        "finish_reason": finish_reason,
        "parameters": test_prompt.model_dump(exclude={"prompt", "messages"}) | {"seed": seed},
    }
