"""Score a checkpoint on the validation data by the task's own measure (trainer/task_metrics.py).

    examples, settings = choose_evaluation(config.eval, valid_data, tokenizer, seed=..., task=..., classes=...)
    result = score_checkpoint(model, tokenizer, examples, settings, accelerator, sharded=...)

`choose_evaluation` runs once per run: it takes the first `eval.max_examples` validation examples in
an order shuffled by the seed (the same ones at every checkpoint and after a resume), cuts each into
its prompt and its reference answer, and settles the metrics, the stop sequences and the token
budget. Prompt and reference come from the tokens training uses (`TokenizedExample`): the prompt's
ids are the context before the example's last trained span, which training guarantees equal to
what `trainer.generate` encodes for that prompt; the reference is that span, decoded, without its
EOS (or its common ending, the stop sequence).

`score_checkpoint` answers every example greedily exactly as the checkpoint's test prompts are
answered (trainer/generate.py's rows: same ids, left-padded batches, EOS and stop handling), with
each process taking its share and the answers gathered to all, so every process returns the same
result. Under FSDP the model's forward is collective: there every process answers every example,
in the same batches, so all run the same forwards (and none waits for another forever).
"""

from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from trainer.task_metrics import (
    MetricChoice,
    choose_metrics,
    error_kind,
    normalize,
    score,
)

BATCH_SIZE = 16  # rows per generate call: short prompts, so memory is small next to training's
WRONG_PER_KIND = 2  # wrong answers kept per kind of mistake, per checkpoint (for the report)
WRONG_KINDS = 6  # kinds of mistake kept per checkpoint


@dataclass(frozen=True)
class EvalExample:
    """One validation example to answer: its prompt ids, the prompt and reference as text, its origin."""

    prompt_ids: list[int]
    prompt: str
    reference: str
    reference_tokens: int  # the reference's tokens including its end (EOS), for the token budget
    source: str
    line: int


@dataclass(frozen=True)
class EvalSettings:
    """How every checkpoint is scored: the metrics (the first is the primary one), why they, the
    stop sequences, the token budget and the batch size."""

    metrics: tuple[str, ...]
    why: str
    stop: tuple[str, ...]
    max_new_tokens: int
    batch_size: int = BATCH_SIZE

    @property
    def primary(self) -> str | None:
        return self.metrics[0] if self.metrics else None

    @property
    def classification(self) -> bool:
        return "accuracy" in self.metrics


@dataclass
class EvalRow:
    prompt: str
    reference: str
    prediction: str
    correct: bool  # the normalized prediction equals the normalized reference
    finish_reason: str
    source: str
    line: int


@dataclass
class EvalResult:
    """A checkpoint's task metrics {name: value} over `n` examples, every answer, and the time taken."""

    metrics: dict[str, float]
    n: int
    rows: list[EvalRow]
    seconds: float
    primary: str | None = None
    details: dict = field(default_factory=dict)  # per-class and confusion matrix (classification)
    classification: bool = False

    def wrong_examples(self, per_kind: int = WRONG_PER_KIND, kinds: int = WRONG_KINDS) -> list[dict]:
        """A few wrong answers of each kind of mistake (`task_metrics.error_kind`), the most common
        kinds first, in validation order within a kind: what the report shows per checkpoint."""
        by_kind: dict[str, list[EvalRow]] = {}
        for row in self.rows:
            if not row.correct:
                kind = error_kind(
                    row.prediction, row.reference, classification=self.classification, finish_reason=row.finish_reason
                )
                by_kind.setdefault(kind, []).append(row)
        ranked = sorted(by_kind.items(), key=lambda item: -len(item[1]))[:kinds]
        return [
            {
                "kind": kind,
                "count": len(group),
                "prompt": row.prompt,
                "reference": row.reference,
                "prediction": row.prediction,
                "source": row.source,
                "line": row.line,
            }
            for kind, group in ranked
            for row in group[:per_kind]
        ]

    def summary_fields(self) -> dict:
        """The fields a `CheckpointSummary` carries (trainer/report.py): metrics, examples, wrong
        answers and the classification details; small enough for the resumable state."""
        return {
            "metrics": dict(self.metrics),
            "eval_examples": self.n,
            "wrong": self.wrong_examples(),
            "metric_details": self.details,
        }

    def prediction_records(self) -> list[dict]:
        """One JSON object per example (for a checkpoint's eval_predictions.jsonl)."""
        return [asdict(row) for row in self.rows]


# ---------------------------------------------------------------------------------------------
# Once per run


def detected_task(reports: Sequence) -> tuple[str, int]:
    """(task, classes) the data preflight detected for the first training file
    (trainer/data/validate.py `task_type`), from its `ValidationReport`s or their dicts."""
    for report in reports:
        stats = report.get("stats", {}) if isinstance(report, dict) else getattr(report, "stats", {})
        task = stats.get("task")
        if task:
            return task, len(stats.get("classes") or {})
    return "conditional", 0


def pick_examples(count: int, max_examples: int | None, seed: int) -> list[int]:
    """Indices of the validation examples scored: the first `max_examples` of an order shuffled by
    `seed` (its own generator: the training RNG is not touched), in file order."""
    if max_examples is None or max_examples >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), max_examples))


def _last_trained_span(labels: Sequence[int], ignore: int = -100) -> tuple[int, int] | None:
    end = max((i for i, label in enumerate(labels) if label != ignore), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != ignore:
        start -= 1
    return start, end + 1


def eval_examples(valid_data, tokenizer, indices: Sequence[int]) -> list[EvalExample]:
    """The examples at `indices` of the tokenized validation data, cut into prompt and reference."""
    examples = []
    for index in indices:
        item = valid_data[index]
        span = _last_trained_span(item.labels)
        if span is None or span[0] == 0:
            continue  # nothing trained, or no context to answer from
        start, end = span
        answer = list(item.input_ids[start:end])
        ended = answer[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(answer[:-1] if ended else answer)
        prompt_ids = list(item.input_ids[:start])
        examples.append(
            EvalExample(prompt_ids, tokenizer.decode(prompt_ids), text, len(answer), item.source, item.line)
        )
    return examples


def common_ending(references: Sequence[str], special_tokens: Sequence[str] = ()) -> str | None:
    """The ending every reference shares and none holds elsewhere, usable as a stop sequence:
    whitespace (a newline) or a special token (a chat template's end of turn), else None."""
    if not references:
        return None
    suffix = os.path.commonprefix([r[::-1] for r in references])[::-1]
    if suffix.strip() and not any(token and token in suffix for token in special_tokens):
        suffix = suffix[len(suffix.rstrip()) :]  # only its whitespace tail can end answers safely
    if not suffix or any(suffix in r[: -len(suffix)] for r in references):
        return None
    stop = suffix.strip() or suffix  # "<|im_end|>\n" stops at "<|im_end|>"
    return stop


def choose_evaluation(
    eval_config,
    valid_data,
    tokenizer,
    *,
    seed: int,
    task: str = "conditional",
    classes: int = 0,
    batch_size: int = BATCH_SIZE,
) -> tuple[list[EvalExample], EvalSettings]:
    """The examples every checkpoint answers and how they are scored (`eval` section of the config)."""
    from trainer.generate import cut_completion

    examples = eval_examples(valid_data, tokenizer, pick_examples(len(valid_data), eval_config.max_examples, seed))
    if eval_config.stop is not None:
        stop = [s for s in eval_config.stop if s]
    else:
        ending = common_ending([e.reference for e in examples], getattr(tokenizer, "all_special_tokens", []))
        stop = [ending] if ending else []
    # Predictions are cut before a stop sequence, so references are too.
    examples = [
        EvalExample(e.prompt_ids, e.prompt, cut_completion(e.reference, stop)[0], e.reference_tokens, e.source, e.line)
        for e in examples
    ]
    choice: MetricChoice = choose_metrics(eval_config.metrics, task, [e.reference for e in examples], classes)
    longest = max((e.reference_tokens for e in examples), default=1)
    budget = eval_config.max_new_tokens or longest + max(4, longest // 4)
    return examples, EvalSettings(choice.names, choice.why, tuple(stop), budget, batch_size)


# ---------------------------------------------------------------------------------------------
# At each checkpoint


def _shares(examples: Sequence[EvalExample], world: int) -> list[list[int]]:
    """Example indices per process: by prompt length, dealt round-robin, so every process gets
    about the same number of examples and of tokens."""
    by_length = sorted(range(len(examples)), key=lambda i: (len(examples[i].prompt_ids), i))
    return [by_length[rank::world] for rank in range(world)]


@torch.no_grad()
def score_checkpoint(
    model,
    tokenizer,
    examples: Sequence[EvalExample],
    settings: EvalSettings,
    accelerator=None,
    *,
    sharded: bool = False,
) -> EvalResult:
    """Answer every example greedily and score the answers; the same result on every process.

    Collective when `accelerator` has several processes: every process must call it. `model` is
    the unwrapped model (as for the test prompts); under FSDP (`sharded`) every process answers
    every example, since each forward gathers the weights from all processes."""
    from trainer.config import TestPrompt
    from trainer.generate import Row, generate_all

    started = time.perf_counter()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    split = world > 1 and not sharded
    mine = _shares(examples, world)[rank] if split else list(range(len(examples)))
    # One sampling setting for all: greedy, the run's stop sequences and budget.
    greedy = TestPrompt(prompt="", temperature=0.0, max_new_tokens=settings.max_new_tokens, stop=list(settings.stop))
    rows = [Row(greedy, examples[i].prompt_ids, examples[i].prompt) for i in mine]
    was_training = model.training
    model.eval()
    try:
        with accelerator.autocast() if accelerator is not None else nullcontext():
            completions = generate_all(model, tokenizer, rows, settings.batch_size)
    finally:
        model.train(was_training)
    answers = [(i, c.text, c.finish_reason) for i, c in zip(mine, completions)]
    if split:
        from accelerate.utils import gather_object

        answers = gather_object(answers)  # every process gets every answer (pickled over the process group)
    by_index = {i: (text, finish) for i, text, finish in answers}
    predictions = [by_index[i][0] for i in range(len(examples))]
    references = [e.reference for e in examples]
    scores = score(settings.metrics, predictions, references)
    rows_out = [
        EvalRow(
            e.prompt,
            e.reference,
            predictions[i],
            normalize(predictions[i]) == normalize(e.reference),
            by_index[i][1],
            e.source,
            e.line,
        )
        for i, e in enumerate(examples)
    ]
    return EvalResult(
        scores.values,
        len(examples),
        rows_out,
        time.perf_counter() - started,
        settings.primary,
        scores.details,
        settings.classification,
    )


@torch.no_grad()
def validation_loss(model, valid_data, pad_id: int, *, micro_batch_size: int, accelerator) -> float | None:
    """Token-level mean loss over the validation data, split across processes (collective); None
    without validation data."""
    import numpy as np

    from trainer.data.batching import collate, item_sizes, shard
    from trainer.loss import supervised_loss_sum

    if not valid_data:
        return None
    acc = accelerator
    model.eval()
    valid_tokens, valid_supervised = item_sizes(valid_data)
    by_length = np.argsort(valid_tokens, kind="stable").tolist()  # less padding per batch
    width = micro_batch_size * acc.num_processes
    loss_sum = torch.zeros((), device=acc.device)
    for start in range(0, len(by_length), width):
        mine, real = shard(by_length[start : start + width], acc.process_index, acc.num_processes)
        batch = collate([valid_data[i] for i in mine], pad_id, supervise=real)
        loss_sum += supervised_loss_sum(model, {k: v.to(acc.device) for k, v in batch.items()})
    model.train()
    total_tokens = int(valid_supervised.sum())
    return acc.reduce(loss_sum, reduction="sum").item() / total_tokens  # GPU sync


# ---------------------------------------------------------------------------------------------
# The recipe's evaluation: set up once, called at every checkpoint


@dataclass
class CheckpointEval:
    """What a checkpoint's evaluation found: the eval loss (None without validation data) and the
    task metrics' result (None when the run computes none)."""

    eval_loss: float | None
    scored: EvalResult | None

    @property
    def metrics(self) -> dict[str, float]:
        return self.scored.metrics if self.scored else {}

    def info(self) -> dict:
        """checkpoint.json's evaluation fields."""
        scored = {"metrics": self.metrics, "eval_examples": self.scored.n} if self.scored else {}
        return {"eval_loss": self.eval_loss, **scored}

    def summary_fields(self) -> dict:
        return self.scored.summary_fields() if self.scored else {}

    def prediction_records(self) -> list[dict] | None:
        return self.scored.prediction_records() if self.scored else None

    def describe(self, train_loss: float | None) -> str:
        """The figures for the log: `train loss 1.2345, eval loss -, exact_match 0.5000; scored in 0.2 s`."""
        figures = {"train loss": train_loss, "eval loss": self.eval_loss, **self.metrics}
        shown = ", ".join(f"{name} {'-' if value is None else f'{value:.4f}'}" for name, value in figures.items())
        return shown + (f"; scored in {self.scored.seconds:.1f} s" if self.scored else "")


class Evaluator:
    """The run's evaluation: the validation loss, and the task metrics on the examples
    `choose_evaluation` picked once (the same at every checkpoint and after a resume)."""

    def __init__(self, eval_config, valid_data, tokenizer, *, seed: int, task: str, classes: int, batch_size: int):
        self.valid_data, self.tokenizer, self.batch_size = valid_data, tokenizer, batch_size
        self.examples, self.settings = choose_evaluation(
            eval_config, valid_data, tokenizer, seed=seed, task=task, classes=classes, batch_size=batch_size
        )
        self.scores = bool(self.examples and self.settings.metrics)

    def describe(self) -> str | None:
        if not self.scores:
            return None
        return (
            f"task metrics: {', '.join(self.settings.metrics)} on {len(self.examples)} validation "
            f"examples ({self.settings.why})"
        )

    def __call__(self, model, unwrapped_model, accelerator, *, sharded: bool) -> CheckpointEval:
        """Collective: every process calls it at the same checkpoint and gets the same result."""
        eval_loss = validation_loss(
            model,
            self.valid_data,
            self.tokenizer.pad_token_id,
            micro_batch_size=self.batch_size,
            accelerator=accelerator,
        )
        scored = None
        if self.scores:
            scored = score_checkpoint(
                unwrapped_model, self.tokenizer, self.examples, self.settings, accelerator, sharded=sharded
            )
        return CheckpointEval(eval_loss, scored)
