"""Tokenize prompt/completion examples into input ids and labels, masked by position.

Two guarantees, each a trap that well-known trainers fell into:

* The prompt's tokens in training are exactly the tokens the model gets at inference. Prompt and
  completion are tokenized separately (with the same `encode_prompt` that generation uses) and
  concatenated, so a token can never straddle the boundary and the mask can never be off by one.
* EOS is always learned. Labels are -100 on prompt positions (and, in the collator, on padding
  positions) because of where they are, never because of their token id, so EOS keeps its label
  even when the tokenizer's pad id equals its EOS id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.examples import Example
from trainer.errors import UserError

IGNORE_INDEX = -100
EOS_LITERAL = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """Same length as `input_ids`; IGNORE_INDEX where the position is not trained."""
    source: str
    line: int

    @property
    def supervised_tokens(self) -> int:
        """Positions whose label the model predicts (position 0 has no previous token)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class LengthReport:
    """How the `data.too_long` policy changed the data."""

    kept: int = 0
    dropped: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.kept} examples kept, {len(self.dropped)} dropped, {len(self.truncated)} truncated as too long"


def start_token_id(tokenizer) -> int:
    """The token an empty prompt starts from: BOS, or EOS for GPT-2-style models that have no BOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids exactly as the model sees them at inference (training uses this too).

    An empty prompt (open-ended text) becomes the start token, so the completion's first token is
    trained and generation has something to condition on.
    """
    ids = tokenizer(prompt)["input_ids"]
    return ids if ids else [start_token_id(tokenizer)]


def _strip_eos_literal(completion: str, eos_text: str | None) -> str:
    for literal in {EOS_LITERAL, eos_text or EOS_LITERAL}:
        if completion.endswith(literal):
            return completion[: -len(literal)]
    return completion


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion ids ending in exactly one EOS id: a trailing `<|endoftext|>` (or the tokenizer's
    EOS text) written in the data becomes the EOS id, and a completion without one gets it appended."""
    text = _strip_eos_literal(completion, tokenizer.eos_token)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_examples(
    examples: list[Example], tokenizer, *, max_seq_len: int, too_long: str
) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenize, mask and apply the length policy (`error` | `drop` | `truncate`)."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, so completions cannot learn to stop: use a tokenizer with one")
    report = LengthReport()
    tokenized: list[TokenizedExample] = []
    too_long_lines: list[str] = []
    for example in examples:
        prompt_ids = encode_prompt(tokenizer, example.prompt)
        completion_ids = encode_completion(tokenizer, example.completion)
        where = f"{example.source} line {example.line}"
        length = len(prompt_ids) + len(completion_ids)
        if length > max_seq_len:
            too_long_lines.append(f"{where} ({length} tokens)")
            if too_long == "error":
                continue
            room = max_seq_len - len(prompt_ids)
            if too_long == "drop" or room < 1:
                report.dropped.append(where)
                continue
            completion_ids = completion_ids[:room]
            report.truncated.append(where)
        tokenized.append(
            TokenizedExample(
                input_ids=prompt_ids + completion_ids,
                labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
                source=example.source,
                line=example.line,
            )
        )
    if too_long == "error" and too_long_lines:
        listed = "\n".join(f"  {line}" for line in too_long_lines[:20])
        more = f"\n  ... and {len(too_long_lines) - 20} more" if len(too_long_lines) > 20 else ""
        raise UserError(
            f"{len(too_long_lines)} examples are longer than data.max_seq_len={max_seq_len}:\n{listed}{more}\n"
            "Fix: raise data.max_seq_len, shorten them, or set data.too_long to drop or truncate"
        )
    report.kept = len(tokenized)
    return tokenized, report
