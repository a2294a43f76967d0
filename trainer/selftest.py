"""The startup self-test: before step 1, on the run's own model, device, dtype and library
versions, check the guarantees training relies on (`training.self_test`, on by default).

Three checks, each a number against a tolerance:

* `attention`: the chosen backend (sdpa, varlen, flex) against transformers' eager attention, on
  three short probe sequences, each alone: logits, and the gradients of the trained parameters
  after one backward pass.
* `layout`: the batch layout training uses (packed rows, or padded rows when packing is off)
  against the same sequences alone, with the chosen backend: a packed example that attends to
  its neighbour, or a row that attends to its padding, shows here as an O(1) difference.
* `labels`: on the first real batch, the supervised positions are exactly the completion tokens
  (with their EOS) of the examples in it, re-encoded from the data file with the tokenizer's
  plain call; collate put each example's labels where its tokens are and masked the rest.

Differences are relative: max |got - expected| / max |expected|, over all logits, and over all
compared gradients together. The tolerances per compute dtype (`TOLERANCES`) sit well above the
differences that reordered float arithmetic gives (measured: docs/BENCHMARKS.md, "Self-test") and
far below what a wrong mask gives (O(0.1) to O(1)). A failure stops the run before any training,
with the check, the difference, the tolerance, the library versions and the fix.

The probe runs in eval mode (no dropout) with the random generators forked, gradients cleared
afterwards and the optimizer untouched, so a run with the self-test trains bitwise as one without.
Under FSDP every process runs the same probe (the sharded forward is collective) and compares its
own gradient shards; the largest difference over the processes decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.attention import install_attention
from trainer.errors import UserError
from trainer.unwrap import transformers_model

#: Relative tolerance of every check, by the dtype attention computes in.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

#: Probe sequence lengths: short, different (so packing and padding both have work), and the
#: packed row holds all three.
PROBE_LENGTHS = (9, 6, 4)

#: Gradients compared are capped at this many bytes per copy (full fine-tuning of a 6B model
#: would otherwise keep three float32 copies of every gradient); tensors are then taken at an
#: even stride through the model, first and last block included.
GRADIENT_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Check:
    name: str
    """`attention`, `layout` or `labels`."""
    what: str
    """What was compared, in words (`sdpa vs eager`, `packed rows vs one by one`, ...)."""
    difference: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.difference <= self.tolerance

    def summary(self) -> str:
        if self.name == "labels":
            return f"{self.what}: {self.detail}"
        return f"{self.what} {self.difference:.1e} (tolerance {self.tolerance:g})"


@dataclass(frozen=True)
class SelfTestResult:
    checks: tuple[Check, ...]
    seconds: float

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if not check.passed)

    def summary(self) -> str:
        verdict = "passed" if not self.failed else "FAILED"
        return f"self-test {verdict} in {self.seconds:.2f} s: " + "; ".join(c.summary() for c in self.checks)


class SelfTestFailed(UserError):
    """A self-test check failed: training would not compute what it promises. `checks` are the
    failed checks (name, difference, tolerance)."""

    def __init__(self, message: str, checks: tuple[Check, ...] = ()):
        super().__init__(message)
        self.checks = checks
        self.shared = True  # every process finds the same: rank 0 prints it


def library_versions() -> str:
    import accelerate
    import peft
    import transformers

    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"accelerate {accelerate.__version__}"
    )


FIXES = {
    "attention": "set model.attention=eager (transformers' reference attention), or install the tested versions: "
    "pip install -c constraints.txt -e .",
    "layout": "set data.packing=false (if packing is on), or model.attention=eager, or install the tested versions: "
    "pip install -c constraints.txt -e .",
    "labels": "this is a bug in the trainer's data path for this tokenizer: report it with the data line named above; "
    "training.self_test=false skips the check",
}


def failure(result: SelfTestResult) -> SelfTestFailed:
    lines = []
    for check in result.failed:
        if check.name == "labels":
            lines.append(f"{check.what}: {check.detail}")
        else:
            lines.append(
                f"{check.what}: relative difference {check.difference:.3g} > tolerance {check.tolerance:g}"
                + (f" ({check.detail})" if check.detail else "")
            )
    fixes = "; ".join(f"{c.name}: {FIXES[c.name]}" for c in result.failed)
    return SelfTestFailed(
        f"training.self_test failed before step 1 (nothing was trained): {'; '.join(lines)}. "
        f"Libraries: {library_versions()}. Fix: {fixes}",
        checks=result.failed,
    )


# ---------------------------------------------------------------------------------------------
# The probe: three short sequences, every position supervised.


def probe_examples(vocab_size: int, lengths=PROBE_LENGTHS):
    """Short sequences of random token ids (a fixed local generator: the run's RNG is untouched)."""
    from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(1234)
    examples = []
    for number, length in enumerate(lengths):
        ids = torch.randint(1, max(2, vocab_size - 1), (length,), generator=generator).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] + ids[1:], "self-test", number + 1))
    return examples


def _relative(pairs) -> float:
    """max |got - expected| / max |expected| over every (got, expected) pair together: one scale
    for all, so a gradient that is zero in exact arithmetic (a key bias: softmax ignores it) and
    rounding noise in floating point does not count as a 100% difference."""
    difference = scale = 0.0
    for got, expected in pairs:
        got, expected = got.detach().float(), expected.detach().float()
        if expected.numel():
            difference = max(difference, float((got - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
    return difference / max(scale, 1e-12)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard (DTensor)


def _compared_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    total = sum(_local(p).numel() * 4 for _, p in trained)
    if total <= GRADIENT_BUDGET_BYTES or len(trained) <= 2:
        return trained
    keep = max(2, int(len(trained) * GRADIENT_BUDGET_BYTES / total))
    indices = sorted({round(i * (len(trained) - 1) / (keep - 1)) for i in range(keep)})
    return [trained[i] for i in indices]


class _Probe:
    """Forward + backward of the probe batches on the unwrapped model; logits per example and
    copies of the compared gradients."""

    def __init__(self, model: torch.nn.Module, autocast, device: torch.device):
        self.model, self.autocast, self.device = model, autocast, device
        self.parameters = _compared_parameters(model)

    def run(self, batches: list[tuple[dict, list[tuple[int, slice]]]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`batches`: (collated batch, [(row, positions of one example)]). Returns each example's
        logits in order and the compared gradients summed over the batches."""
        from trainer.loss import model_inputs

        for _, p in self.parameters:
            p.grad = None
        logits_per_example = []
        for batch, members in batches:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with self.autocast():
                logits = self.model(**model_inputs(self.model, batch), use_cache=False).logits
            targets = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum")
            loss.backward()
            logits_per_example += [logits[row, positions].detach().float() for row, positions in members]
        grads = [
            _local(p.grad).detach().float().clone() if p.grad is not None else torch.zeros(())
            for _, p in self.parameters
        ]
        for p in self.model.parameters():
            p.grad = None
        return logits_per_example, grads


def _alone(examples) -> list[tuple[dict, list]]:
    from trainer.data.batching import collate

    return [(collate([e], pad_id=0), [(0, slice(0, len(e.input_ids)))]) for e in examples]


def _as_trained(examples, packing: bool) -> list[tuple[dict, list]]:
    """The probe in training's layout: one packed row of all three (collate_packed), or a padded
    batch (collate)."""
    from trainer.data.batching import collate
    from trainer.data.packing import PackedRow, collate_packed

    if packing:
        starts = [sum(len(e.input_ids) for e in examples[:i]) for i in range(len(examples))]
        members = [(0, slice(start, start + len(e.input_ids))) for start, e in zip(starts, examples)]
        return [(collate_packed([PackedRow(tuple(examples))], pad_id=0), members)]
    return [(collate(examples, pad_id=0), [(row, slice(0, len(e.input_ids))) for row, e in enumerate(examples)])]


def _over_processes(value: float) -> float:
    """The largest value over the processes (FSDP: each compared its own gradient shards)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    backend = dist.get_backend()
    tensor = torch.tensor([value], dtype=torch.float64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def check_model(
    model: torch.nn.Module, *, attention: str, packing: bool, compute_dtype: torch.dtype, autocast, device: torch.device
) -> list[Check]:
    """The `attention` and `layout` checks on `model` (prepared, any wrapper), which is left with
    `attention` installed, its mode and gradients as they were, and the random generators untouched."""
    inner = transformers_model(model)
    tolerance = TOLERANCES.get(compute_dtype, TOLERANCES[torch.float32])
    examples = probe_examples(inner.config.vocab_size)
    devices = [device] if device.type == "cuda" else []
    was_training = inner.training
    probe = _Probe(inner, autocast, device)
    checks = []
    with torch.random.fork_rng(devices=devices):
        inner.eval()
        try:
            if attention != "eager":
                chosen = inner.config._attn_implementation  # transformers' name for it
                install_attention(inner, "eager")
                try:
                    reference = probe.run(_alone(examples))
                finally:
                    inner.set_attn_implementation(chosen)
            alone = probe.run(_alone(examples))
            trained = probe.run(_as_trained(examples, packing))
        finally:
            inner.train(was_training)
    if attention != "eager":
        difference = max(_relative(zip(alone[0], reference[0])), _relative(zip(alone[1], reference[1])))
        checks.append(Check("attention", f"{attention} vs eager", _over_processes(difference), tolerance))
    layout = "packed rows vs one by one" if packing else "padded rows vs one by one"
    difference = max(_relative(zip(trained[0], alone[0])), _relative(zip(trained[1], alone[1])))
    checks.append(
        Check(
            "layout",
            layout,
            _over_processes(difference),
            tolerance,
            "packed examples attend to each other" if packing else "rows attend to their padding",
        )
    )
    return checks


# ---------------------------------------------------------------------------------------------
# The first real batch: its labels against the data file, re-encoded.


def _raw_examples(sources: dict[str, set[int]], data_format: str) -> dict[tuple[str, int], object]:
    """The examples at the given lines of each file, as the reader gives them: those lines alone
    are parsed, with the reader's own per-line parser (the file may be large; the batch is small)."""
    from trainer.data.examples import examples_at

    found = {}
    for source, lines in sources.items():
        if not Path(source).exists():
            continue
        for line, example in examples_at(source, lines, data_format).items():
            found[(source, line)] = example
    return found


def expected_labels(tokenizer, example) -> tuple[list[int], list[int]] | None:
    """(ids, labels) of a prompt/completion or text example, encoded with the tokenizer's plain
    call (`encode_prompt`, `encode_completion`): what inference sees. None for chat rows."""
    from trainer.data.tokenize import IGNORE_INDEX, encode_completion, encode_prompt

    if example.messages is not None:
        return None
    prompt = encode_prompt(tokenizer, example.prompt)
    completion = encode_completion(tokenizer, example.completion)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def check_labels(items, batch: dict, tokenizer, data_format: str) -> Check:
    """The `labels` check on one collated micro-batch and the training items it was made from
    (TokenizedExamples, or PackedRows of them)."""
    from trainer.data.tokenize import IGNORE_INDEX

    problems: list[str] = []
    rows = []
    for row, item in enumerate(items):
        members = getattr(item, "examples", (item,))
        start = 0
        for member in members:
            rows.append((row, start, member))
            start += len(member.input_ids)
        # collate: this row's labels are its members' (each member's first position masked when packed)
        width = batch["labels"].shape[1]
        got = batch["labels"][row].tolist()
        want = list(item.labels) + [IGNORE_INDEX] * (width - len(item.labels))
        if got != want:
            problems.append(f"batch row {row}: labels not where the example's tokens are")
    sources: dict[str, set[int]] = {}
    for _, _, member in rows:
        sources.setdefault(member.source, set()).add(member.line)
    raw = _raw_examples(sources, data_format)
    exact = consistent = 0
    for _, _, member in rows:
        ids, labels = list(member.input_ids), list(member.labels)
        if any(label != IGNORE_INDEX and label != token for label, token in zip(labels, ids)):
            problems.append(f"{member.source} line {member.line}: a label differs from its token")
            continue
        example = raw.get((member.source, member.line))
        expected = expected_labels(tokenizer, example) if example is not None else None
        if expected is None:
            consistent += 1
            continue
        want_ids, want_labels = (part[: len(ids)] for part in expected)  # data.too_long=truncate keeps a prefix
        if ids != want_ids:
            problems.append(
                f"{member.source} line {member.line}: the tokens differ from prompt and completion "
                "encoded separately (a tokenization boundary)"
            )
        elif labels != want_labels:
            problems.append(
                f"{member.source} line {member.line}: supervised positions are not exactly the completion and its EOS"
            )
        else:
            exact += 1
    detail = (
        (
            f"{exact} examples supervise exactly their completion and EOS"
            + (f", {consistent} chat examples consistent" if consistent else "")
        )
        if not problems
        else problems[0]
    )
    return Check("labels", "first batch's labels", float(len(problems)), 0.0, detail)


def run_self_test(
    model: torch.nn.Module,
    *,
    attention: str,
    packing: bool,
    compute_dtype: torch.dtype,
    autocast,
    device: torch.device,
    first_batch: tuple | None = None,
    tokenizer=None,
    data_format: str = "auto",
) -> SelfTestResult:
    """Every check; `first_batch` is (items, collated batch) of this process's first micro-batch."""
    started = time.perf_counter()
    checks = check_model(
        model, attention=attention, packing=packing, compute_dtype=compute_dtype, autocast=autocast, device=device
    )
    if first_batch is not None:
        checks.append(check_labels(*first_batch, tokenizer, data_format))
    return SelfTestResult(tuple(checks), time.perf_counter() - started)
