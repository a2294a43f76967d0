"""Completions with per-prompt sampling and stop sequences: the checkpoints' test prompts, batches
for the server, and the `python -m trainer.generate` command.

    python -m trainer.generate CHECKPOINT_OR_EXPORT --prompt "banana ->" [--max-new-tokens 16 ...]
    python -m trainer.generate CHECKPOINT_OR_EXPORT --prompts prompts.jsonl > completions.jsonl
    python -m trainer.generate CHECKPOINT_OR_EXPORT --messages '[{"role": "user", "content": "Hi?"}]'
    python -m trainer.generate RUN_DIR --best --prompt "banana ->"     # the run's recommended checkpoint

One prompt prints its completion as plain text; a prompts file (or --num-samples > 1, or --jsonl)
prints one JSON object per prompt and sample, with the fields of a checkpoint's samples.jsonl.

Every completion is made the same way: prompt ids encoded exactly as training encodes a context
(`encode_prompt`, or the chat template segment by segment), `temperature 0` greedy, else sampling
with top_p / top_k; the text ends at EOS, at the token budget, or before the first stop sequence.
Rows with the same sampling settings are generated together, left-padded with an attention mask,
so batched greedy output equals unbatched output. A sampled row with a seed is generated alone,
seeded exactly as the checkpoint samples are, so `--seed` reproduces them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable

import torch
from pydantic import ValidationError
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from trainer.cli import command
from trainer.config import TestPrompt
from trainer.data.tokenize import encode_chat_prompt, encode_prompt, render_chat_prompt
from trainer.errors import UsageError, UserError
from trainer.loading import add_model_arguments, position_limit
from trainer.quiet import drop_attention_mask_advice
from trainer.recommend import add_checkpoint_arguments

drop_attention_mask_advice()  # transformers drops a batch's all-ones mask, then advises one


@dataclass
class Row:
    """One completion to make: the prompt's ids and text, its sampling settings and seed."""

    test_prompt: TestPrompt
    prompt_ids: list[int]
    prompt_text: str
    seed: int | None = None
    cancelled: Callable[[], bool] | None = None
    """Polled at every step: True ends this row early (its client went away)."""
    on_text: Callable[[str], None] | None = None
    """Streaming: called on the generating thread with each settled piece of the completion's text
    as tokens are generated (`RowTextStreamer`); the pieces are a prefix of the final text."""

    @property
    def sampled(self) -> bool:
        return self.test_prompt.temperature > 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "eos", "stop" or "length"
    completion_tokens: int


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


def prompt_row(tokenizer, test_prompt: TestPrompt, seed: int | None, chat_template: str | None = None) -> Row:
    """A `Row` for `test_prompt`: its ids (`encode_test_prompt`) and the text they encode. An empty
    prompt starts from the beginning-of-text token (GPT-2's and NeoX's is their end-of-text), as an
    unconditioned sample does: a model given no token at all has nothing to predict from."""
    ids = encode_test_prompt(tokenizer, test_prompt, chat_template)
    if not ids:
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    text = (
        test_prompt.prompt
        if test_prompt.messages is None
        else render_chat_prompt(tokenizer, _messages(test_prompt), chat_template)
    )
    return Row(test_prompt, ids, text, seed)


@torch.no_grad()
def complete(model, tokenizer, test_prompt: TestPrompt, *, seed: int, chat_template: str | None = None) -> dict:
    """Generate one completion from the same prompt tokens as training (`encode_test_prompt`);
    `chat_template` is `data.chat_template` (None: the tokenizer's template, else the default)."""
    row = prompt_row(tokenizer, test_prompt, seed, chat_template)
    [completion] = generate_rows(model, tokenizer, [row])
    return sample_record(row, completion)


def sample_record(row: Row, completion: Completion) -> dict:
    """One line of samples.jsonl: the prompt (for a chat prompt, the rendered text the model got,
    plus the messages), the completion, why it ended, the parameters used."""
    test_prompt = row.test_prompt
    sample = {"prompt": row.prompt_text}
    if test_prompt.messages is not None:
        sample["messages"] = [message.model_dump() for message in test_prompt.messages]
    return sample | {
        "completion": completion.text,
        "finish_reason": completion.finish_reason,
        "parameters": test_prompt.model_dump(exclude={"prompt", "messages"}) | {"seed": row.seed},
    }


# ---------------------------------------------------------------------------------------------
# Batches


def batch_key(row: Row) -> tuple:
    """Rows with equal keys may share one `generate` call: all greedy rows, or sampled rows without
    a seed that share temperature, top_p and top_k. A seeded sampled row is alone (its own RNG)."""
    if not row.sampled:
        return ("greedy",)
    if row.seed is not None:
        return ("seeded", id(row))
    return ("sampled", row.test_prompt.temperature, row.test_prompt.top_p, row.test_prompt.top_k)


def _token_budget(row: Row, limit: int) -> int:
    """New tokens this row may have: its max_new_tokens, never past the model's position limit
    (its embeddings would index out of range)."""
    return min(row.test_prompt.max_new_tokens, limit - len(row.prompt_ids))


def plan_batches(rows: list[Row], batch_size: int, limit: int) -> list[list[int]]:
    """Row indices grouped into `generate` calls: equal `batch_key`, at most `batch_size` rows, and
    the longest prompt plus the largest budget within `limit` (every row of a batch advances its
    positions for as many steps as the batch runs). Shorter prompts first, for less padding."""
    batches: list[list[int]] = []
    order = sorted(range(len(rows)), key=lambda i: (str(batch_key(rows[i])), len(rows[i].prompt_ids)))
    for _, group in groupby(order, key=lambda i: str(batch_key(rows[i]))):
        batch, width, budget = [], 0, 0
        for i in group:
            new_width = max(width, len(rows[i].prompt_ids))
            new_budget = max(budget, _token_budget(rows[i], limit))
            if batch and (len(batch) >= batch_size or new_width + new_budget > limit):
                batches.append(batch)
                batch, new_width, new_budget = [], len(rows[i].prompt_ids), _token_budget(rows[i], limit)
            batch.append(i)
            width, budget = new_width, new_budget
        if batch:
            batches.append(batch)
    return batches


def generate_all(model, tokenizer, rows: list[Row], batch_size: int = 8) -> list[Completion]:
    """Completions for `rows`, in their order, generated in batches (`plan_batches`)."""
    results: list[Completion | None] = [None] * len(rows)
    for batch in plan_batches(rows, batch_size, position_limit(model)):
        for i, completion in zip(batch, generate_rows(model, tokenizer, [rows[i] for i in batch])):
            results[i] = completion
    return results


class _StopRows(StoppingCriteria):
    """Per row: stop once its generated text contains a stop sequence (the text is cut there
    afterwards), its own token budget is spent, or its request was cancelled. EOS is generate's."""

    def __init__(self, tokenizer, prompt_width: int, rows: list[Row], budgets: list[int]):
        self.tokenizer, self.prompt_width, self.rows, self.budgets = tokenizer, prompt_width, rows, budgets
        self.finished_at: list[int | None] = [None] * len(rows)
        self.decode = any(row.test_prompt.stop for row in rows)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        # Decoding costs a GPU->CPU copy of the new ids at every step; only rows with stops need it.
        new_ids = input_ids[:, self.prompt_width :].tolist() if self.decode else None
        for i, row in enumerate(self.rows):
            if self.finished_at[i] is not None:
                continue
            stops = row.test_prompt.stop
            if (
                generated >= self.budgets[i]
                or (row.cancelled is not None and row.cancelled())
                or (stops and any(stop in self.tokenizer.decode(new_ids[i]) for stop in stops))
            ):
                self.finished_at[i] = generated
        done = [at is not None for at in self.finished_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def settled_text(text: str, stops: list[str]) -> str:
    """The part of a growing completion that later tokens cannot change: without an unfinished
    UTF-8 character at the end (decoded as U+FFFD) and without an end that may be the start of a
    stop sequence (the text would be cut there)."""
    text = text.rstrip("\ufffd")
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - held]


class RowTextStreamer(BaseStreamer):
    """Streams each row that has an `on_text` callback, from the very tokens `generate` produces
    (so the streamed text is the same as the finished text, `_finish`): the row's new ids up to its
    budget and before EOS, decoded, cut before a stop sequence, and sent as far as settled
    (`settled_text`). What is held back at the end is the caller's to send from the Completion."""

    def __init__(self, tokenizer, rows: list[Row], budgets: list[int]):
        self.tokenizer, self.rows, self.budgets = tokenizer, rows, budgets
        self.ids: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self.done = [row.on_text is None for row in rows]

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # generate first hands over the prompts
            return
        for i, token in enumerate(value.tolist()):
            if self.done[i]:
                continue
            if token == self.tokenizer.eos_token_id or len(self.ids[i]) >= self.budgets[i]:
                self.done[i] = True
                continue
            self.ids[i].append(token)
            stops = self.rows[i].test_prompt.stop
            text, stopped = cut_completion(self.tokenizer.decode(self.ids[i]), stops)
            self.done[i] = stopped
            settled = text if stopped else settled_text(text, stops)
            if len(settled) > len(self.sent[i]) and settled.startswith(self.sent[i]):
                self.rows[i].on_text(settled[len(self.sent[i]) :])
                self.sent[i] = settled

    def end(self) -> None:
        pass


@torch.no_grad()
def generate_rows(model, tokenizer, rows: list[Row]) -> list[Completion]:
    """One `generate` call for rows of one `batch_key` (see `plan_batches`), left-padded."""
    keys = {str(batch_key(row)) for row in rows}
    assert len(keys) == 1, f"rows of different sampling settings in one batch: {keys}"
    device = next(model.parameters()).device
    limit = position_limit(model)
    budgets = [_token_budget(row, limit) for row in rows]
    results: list[Completion] = [Completion("", "length", 0)] * len(rows)
    active = [i for i, budget in enumerate(budgets) if budget >= 1]
    if not active:
        return results
    active_rows = [rows[i] for i in active]
    width = max(len(row.prompt_ids) for row in active_rows)
    assert width + max(budgets[i] for i in active) <= limit, "batch passes the position limit: use plan_batches"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor(
        [[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in active_rows], device=device
    )
    attention_mask = torch.tensor(
        [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in active_rows], device=device
    )

    first = active_rows[0].test_prompt
    options = dict(do_sample=first.temperature > 0, max_new_tokens=max(budgets[i] for i in active))
    if first.temperature > 0:
        options.update(temperature=first.temperature, top_p=first.top_p, top_k=first.top_k)
    else:
        options.update(temperature=None, top_p=None, top_k=None)  # silence warnings from model defaults
    active_budgets = [budgets[i] for i in active]
    needs_stopping = (
        any(r.test_prompt.stop for r in active_rows)
        or any(r.cancelled for r in active_rows)
        or len(set(active_budgets)) > 1
    )
    stopping = _StopRows(tokenizer, width, active_rows, active_budgets) if needs_stopping else None
    # Only streamed rows pay for it: the streamer copies each step's tokens to the CPU (a sync).
    streamer = RowTextStreamer(tokenizer, active_rows, active_budgets) if any(r.on_text for r in active_rows) else None
    # A seeded sampled row is alone in its batch (batch_key); greedy decoding draws no random numbers.
    seed = active_rows[0].seed if len(active_rows) == 1 else None
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    # Each prompt samples the same way at every checkpoint; fork_rng leaves the training RNG (dropout)
    # where it was, so the main process stays in step with the others.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([stopping]) if stopping else None,
            streamer=streamer,
            use_cache=True,
            **options,
        )
    new_rows = output[:, width:].tolist()  # GPU->CPU sync, once per batch
    for n, i in enumerate(active):
        results[i] = _finish(
            tokenizer, rows[i], new_rows[n][: budgets[i]], stopping.finished_at[n] if stopping else None
        )
    return results


def _finish(tokenizer, row: Row, new_ids: list[int], stopped_at: int | None) -> Completion:
    """The completion text of one row: cut where it stopped (what follows is padding), at EOS, then
    before the first stop sequence."""
    new_ids = new_ids[:stopped_at] if stopped_at is not None else new_ids
    finish_reason, count = "length", len(new_ids)
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
        finish_reason, count = "eos", len(new_ids) + 1
    text, stopped = cut_completion(tokenizer.decode(new_ids), row.test_prompt.stop)
    if stopped:
        finish_reason = "stop"
    return Completion(text, finish_reason, count)


# ---------------------------------------------------------------------------------------------
# Command line

USAGE_EXAMPLE = 'python -m trainer.generate runs/my-run/checkpoint-100 --prompt "banana ->"'
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompt", metavar="TEXT", help=r"one prompt, exactly as in training (include the separator; \n is a newline)"
    )
    source.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        type=Path,
        help='one JSON object a line: {"prompt": ...} or {"messages": [...]}, optionally with its own '
        "temperature, top_p, top_k, max_new_tokens, stop, seed",
    )
    source.add_argument("--messages", metavar="JSON", help='a chat: [{"role": "user", "content": "..."}, ...]')
    defaults = TestPrompt(prompt="")
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="0 (default) is greedy decoding"
    )
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling, in (0, 1] (default 1)")
    parser.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="keep the k most likely tokens; 0 (default) is off"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="longest completion in tokens (default 64)"
    )
    parser.add_argument(
        "--stop",
        nargs="+",
        action="extend",
        default=[],
        metavar="TEXT",
        help=r"stop sequences: the completion is cut before the first "
        r"(\n is a newline; --stop=-> for one starting with -)",
    )
    parser.add_argument(
        "--seed", type=int, help="sampling seed (default: the run's training.seed, as the checkpoint samples)"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt; sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--jsonl", action="store_true", help="print JSON lines also for a single prompt")
    add_model_arguments(parser)
    return parser


def _sampling_options(args: argparse.Namespace) -> dict:
    """The command line's sampling options, checked here so that a bad one names its flag (exit 2)."""
    from trainer.data.convert import unescape

    options = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "stop": [unescape(stop) for stop in args.stop],
    }
    try:
        TestPrompt(prompt="", **options)
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise UsageError(problems) from None
    return options


def _test_prompt(fields: dict, where: str) -> TestPrompt:
    try:
        return TestPrompt(**fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'prompt'}: {e['msg']}" for e in err.errors())
        raise UserError(f"{where}: {problems}") from None


def read_prompts(args: argparse.Namespace, default_seed: int) -> list[tuple[TestPrompt, int]]:
    """(prompt, seed) pairs from --prompt, --messages or --prompts; file lines may set their own
    sampling options and seed over the command line's."""
    from trainer.data.convert import unescape
    from trainer.data.jsonl import raise_problems, read_jsonl

    options, seed = _sampling_options(args), default_seed if args.seed is None else args.seed
    if args.prompt is not None:
        return [(_test_prompt({"prompt": unescape(args.prompt), **options}, "--prompt"), seed)]
    if args.messages is not None:
        try:
            messages = json.loads(args.messages)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"--messages is not valid JSON ({err.msg} at column {err.colno}). Fix: give a list like "
                '\'[{"role": "user", "content": "Hi?"}]\''
            ) from None
        if isinstance(messages, dict) and "messages" in messages:
            messages = messages["messages"]
        return [(_test_prompt({"messages": messages, **options}, "--messages"), seed)]
    rows, problems = read_jsonl(args.prompts)
    prompts = []
    for line, row in rows:
        if not isinstance(row, dict):
            problems.append(f'line {line}: expected a JSON object with "prompt" or "messages"')
            continue
        fields = dict(row)
        line_seed = fields.pop("seed", seed)
        if not isinstance(line_seed, int) or isinstance(line_seed, bool):
            problems.append(f"line {line}: seed must be an integer")
            continue
        try:
            prompts.append((_test_prompt(options | fields, f"line {line}"), line_seed))
        except UserError as err:
            problems.append(str(err))
    raise_problems(args.prompts, problems)
    return prompts


@command
def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from trainer.loading import (
        inspect_checkpoint,
        load_checkpoint_model,
        load_checkpoint_tokenizer,
        resolve_device,
    )
    from trainer.precision import resolve_dtype
    from trainer.recommend import checkpoint_from_args

    hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    info = inspect_checkpoint(checkpoint_from_args(args.checkpoint, args.best))
    prompts = read_prompts(args, info.training_seed or 0)
    device = resolve_device(args.device)
    tokenizer = load_checkpoint_tokenizer(info)
    model = load_checkpoint_model(info, resolve_dtype(args.dtype, device), base=args.base).to(device)
    rows = [
        prompt_row(tokenizer, test_prompt, seed + sample)
        for test_prompt, seed in prompts
        for sample in range(args.num_samples)
    ]
    completions = generate_all(model, tokenizer, rows, args.batch_size)
    if len(rows) == 1 and not args.jsonl:
        print(completions[0].text)
    else:
        for row, completion in zip(rows, completions):
            print(json.dumps(sample_record(row, completion), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())


@torch.no_grad()
def test_prompt_samples(model, tokenizer, config, autocast) -> list[dict]:
    """Every test prompt's completion at a checkpoint (the samples.jsonl records), with the run's
    seed and chat template; `model` is left in training mode."""
    model.eval()
    with autocast():
        samples = [
            complete(model, tokenizer, prompt, seed=config.training.seed, chat_template=config.data.chat_template)
            for prompt in config.test_prompts
        ]
    model.train()
    return samples
