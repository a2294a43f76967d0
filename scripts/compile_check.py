"""Count torch.compile's graph breaks and recompiles over packed batches, per model family.

    python scripts/compile_check.py [--attention varlen] [--batches 10] [--backend eager]

Each family's tiny model (random weights, built here: nothing is downloaded) gets the attention
backend, is wrapped in `torch.compile` as `training.compile` does, and trains on `--batches` packed
batches of different shapes (rows and widths), through `supervised_loss_sum` and a backward pass,
as the training loop does. On CPU `varlen` runs its reference kernel (trainer/attention.py).

Printed per family:

* graph breaks: every break dynamo took while compiling, over all batches (`in attention`: those
  whose user stack passes through a file or function named for attention: trainer/attention.py,
  transformers' sdpa/flex/eager attention functions);
* recompiles: frames compiled again after the first batch (a guard failed: new shapes, new
  values), i.e. compilations the first batch did not already pay for.

The counts depend on dynamo, not on the backend, so the default backend is "eager" (no code
generation: seconds on a CPU). docs/BENCHMARKS.md has the numbers before and after issue 8's
compile-friendly packed attention; tests/test_attention.py asserts the limits.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field

import torch

from trainer.families import FAMILIES

#: Words in the file or function names of a break's user stack that place it in attention code.
ATTENTION_FRAMES = ("attention", "attn")


@dataclass
class CompileCounts:
    graph_breaks: int = 0
    attention_breaks: int = 0
    recompiles: int = 0
    frames_first_batch: int = 0
    losses: list[float] = field(default_factory=list)
    """Each batch's loss sum, to compare with the uncompiled model's."""
    error: str | None = None
    """The first line of the exception that stopped the run (dynamo refusing a graph), if any."""
    break_reasons: list[str] = field(default_factory=list)
    recompile_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"graph breaks {self.graph_breaks} (in attention {self.attention_breaks}), "
            f"frames compiled on the first batch {self.frames_first_batch}, recompiles after it {self.recompiles}"
        )
        return text if self.error is None else f"{text}; FAILED: {self.error}"


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The tests' tiny shape (tests/conftest.py): 2 layers of width 32, 2 heads, 320 tokens."""
    from transformers import AutoModelForCausalLM

    ids = dict(vocab_size=320, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = FAMILIES[family].tiny_config(ids, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).to(torch.float32)


def packed_batches(count: int, seed: int = 0, vocab_size: int = 320) -> list[dict]:
    """`count` packed batches from `collate_packed`, each of a different width (24 to 51 tokens:
    the tiny models take 64 positions) and row count."""
    from trainer.data.packing import collate_packed, pack_examples
    from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample

    rng = random.Random(seed)
    batches = []
    for index in range(count):
        width = 24 + 3 * index  # a different longest row (and so sequence length) every batch
        examples = []
        for line in range(rng.randint(3, 8)):
            ids = [rng.randint(1, vocab_size - 1) for _ in range(rng.randint(2, width))]
            prompt = rng.randint(0, len(ids) - 1)
            examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "compile_check", line))
        batches.append(collate_packed(pack_examples(examples, max_seq_len=width), pad_id=0))
    return batches


def _in_attention(reason) -> bool:
    return any(
        word in (frame.name + frame.filename).lower() for frame in reason.user_stack for word in ATTENTION_FRAMES
    )


def count_compiles(
    model: torch.nn.Module, batches: list[dict], backend: str = "eager", *, train: bool = True
) -> CompileCounts:
    """Train-step `model` (compiled here) on `batches`, or only run the loss's forward pass
    (`train=False`, without gradients); count dynamo's graph breaks and recompiles."""
    import torch._dynamo
    from torch._dynamo.utils import counters, graph_break_reasons, guard_failures

    from trainer.loss import supervised_loss_sum

    torch._dynamo.reset()  # also clears graph_break_reasons and guard_failures
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    counts = CompileCounts()
    for index, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        try:
            with torch.set_grad_enabled(train):
                loss = supervised_loss_sum(compiled, batch)
            if train:
                loss.backward()
            counts.losses.append(loss.item())  # CPU: no sync to speak of
        except Exception as err:  # e.g. a graph dynamo cannot trace at all: report, do not hide
            counts.error = f"batch {index + 1}: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            break
        if index == 0:
            counts.frames_first_batch = counters["frames"]["ok"]
    counts.recompiles = counters["frames"]["ok"] - counts.frames_first_batch
    counts.graph_breaks = len(graph_break_reasons)
    counts.attention_breaks = sum(_in_attention(reason) for reason in graph_break_reasons)
    counts.break_reasons = sorted({reason.reason.splitlines()[0][:160] for reason in graph_break_reasons})
    counts.recompile_reasons = sorted({r.splitlines()[0][:160] for reasons in guard_failures.values() for r in reasons})
    torch._dynamo.reset()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", default="varlen", choices=["eager", "sdpa", "varlen"])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--backend", default="eager", help="torch.compile backend (eager, aot_eager, inductor)")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument(
        "--without-boundaries",
        action="store_true",
        help="drop the batches' sequence boundaries (as a caller other than the trainer would)",
    )
    parser.add_argument("--reasons", action="store_true", help="print the distinct break and recompile reasons")
    args = parser.parse_args()

    from trainer.attention import install_attention

    torch.set_num_threads(1)
    batches = packed_batches(args.batches)
    if args.without_boundaries:
        batches = [{k: v for k, v in b.items() if not k.startswith(("cu_seq_lens", "max_length"))} for b in batches]
    print(
        f"torch {torch.__version__}, attention {args.attention}, backend {args.backend}, {len(batches)} packed batches"
        f"{' without boundaries' if args.without_boundaries else ''}"
    )
    for family in args.families:
        model = tiny_model(family).train()
        install_attention(model, args.attention)
        counts = count_compiles(model, batches, args.backend)
        print(f"{family:9s} {counts.summary()}")
        if args.reasons:
            for reason in counts.break_reasons:
                print(f"    break: {reason}")
            for reason in counts.recompile_reasons:
                print(f"    recompile: {reason}")


if __name__ == "__main__":
    main()
