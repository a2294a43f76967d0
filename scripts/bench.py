"""Benchmark one training step: ours (packing + our attention + chunked loss + token-normalized
accumulation) against what a plain transformers + peft user gets, side by side in one run.

    python scripts/bench.py --model tiny-gptj                       # CPU, seconds
    python scripts/bench.py --model mid-gptj --steps 3
    python scripts/bench.py --model gptj-6b --method lora --seq-len 2048 --json gptj-lora.json   # CUDA
    python scripts/bench.py --model gptj-6b --method full --optimizer adamw_8bit                  # CUDA + bitsandbytes
    python scripts/bench.py --model neox-20b --method qlora                                      # CUDA + bitsandbytes

Nothing is downloaded: every model is built from its config with random weights (the real
GPT-J-6B and GPT-NeoX-20B hyperparameters, built directly on the GPU in bfloat16), and the data is
synthetic token ids whose lengths follow a long-tailed (log-normal) mix, each with its first ~30%
masked as the prompt. The data set is packed whole (`pack_examples`, best-fit decreasing) and each
step takes `micro_batch_size x accumulation` random rows of it. Both rows train the same freshly
built model (same seed) on the same examples, step for step:

* `ours`: the step's packed rows, collated by `collate_packed` (position_ids, no 2D mask),
  attention chosen by `configure_attention`, the loss is
  `supervised_loss_sum` (chunked cross-entropy over supervised positions only), and the step's
  gradient is the sum of token losses over all micro-batches divided by the step's supervised tokens;
* `baseline`: the same examples in random order, `micro_batch_size` per micro-batch, right-padded to
  the longest (`collate`), the model's default attention, `model(input_ids, attention_mask,
  labels=labels).loss` (full float32 logits, mean per micro-batch), averaged over the micro-batches.

It prints one table (tokens/s, supervised tokens/s, MFU, peak memory, padding) and with `--json OUT`
writes every number with the machine, versions and date. docs/BENCHMARKS.md has the formulas and
results. On a shared CPU pass `--threads 1`: with two threads, one descheduled thread stalls every
parallel kernel and the numbers measure the scheduler.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.errors import UserError  # noqa: E402
from trainer.families import gptj_6b_config, mid_gptj_config, model_shape, neox_20b_config  # noqa: E402
from trainer.flops import Peak, gpu_peak, matmul_params, mfu, training_flops  # noqa: E402
from trainer.peak_memory import PeakMemory  # noqa: E402
from trainer.precision import AUTOCAST, DTYPE_CHOICES, dtype_name  # noqa: E402

METHODS = ("lora", "qlora", "full")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
ATTENTION = ("auto", "eager", "sdpa", "varlen", "flex")
MAX_GRAD_NORM = 1.0  # the trainer's default; both rows clip, so both pay for it
PROMPT_FRACTION = (0.2, 0.4)  # each example's prompt share, uniform: ~30% masked on average


# ---------------------------------------------------------------------------------------------
# Architectures: built from configs, random weights, nothing downloaded


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # transformers model_type: gpt2 | gptj | gpt_neox
    about: str
    build_config: Callable[[], object] | None = None  # a transformers config (real and mid sizes)
    tiny: dict = field(default_factory=dict)  # build_tiny_model sizes (tiny models)
    vocab: int = 1024
    pad_id: int = 0
    needs_cuda: bool = False
    seq_len: int = 512
    micro_batch_size: int = 4
    accumulation: int = 2
    max_positions: int = 2048


_TINY = dict(n_layer=2, n_embd=64, n_head=4)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("tiny-gpt2", "gpt2", "trainer/tiny_models.py GPT-2, 2 layers x 64, vocab 1024", tiny=_TINY),
        Architecture("tiny-gptj", "gptj", "trainer/tiny_models.py GPT-J, 2 layers x 64, vocab 1024", tiny=_TINY),
        Architecture("tiny-neox", "gpt_neox", "trainer/tiny_models.py GPT-NeoX, 2 layers x 64, vocab 1024", tiny=_TINY),
        Architecture(
            "mid-gptj",
            "gptj",
            "GPT-J design, 4 layers x 256, vocab 50400",
            build_config=mid_gptj_config,
            vocab=50400,
            pad_id=50256,
            micro_batch_size=2,
        ),
        Architecture(
            "gptj-6b",
            "gptj",
            "GPT-J-6B (EleutherAI/gpt-j-6b hyperparameters)",
            build_config=gptj_6b_config,
            vocab=50400,
            pad_id=50256,
            needs_cuda=True,
            seq_len=2048,
            micro_batch_size=2,
            accumulation=4,
        ),
        Architecture(
            "neox-20b",
            "gpt_neox",
            "GPT-NeoX-20B (EleutherAI/gpt-neox-20b hyperparameters)",
            build_config=neox_20b_config,
            vocab=50432,
            pad_id=0,
            needs_cuda=True,
            seq_len=2048,
            micro_batch_size=1,
            accumulation=8,
        ),
    )
}


class _VocabOnly:
    """What `build_tiny_model` reads from a tokenizer (its size and special ids): the benchmark's
    data are token ids, so training a real tokenizer would only cost time."""

    def __init__(self, size: int, special_id: int = 0):
        self.size = size
        self.bos_token_id = self.eos_token_id = self.pad_token_id = special_id

    def __len__(self) -> int:
        return self.size


def build_model(arch: Architecture, *, dtype: torch.dtype, device: torch.device, seed: int, positions: int):
    """A randomly initialised causal LM of `arch`, created directly on `device` in `dtype` (a 6B
    model never exists as 24 GB of float32 on the CPU). The same seed gives the same weights."""
    torch.manual_seed(seed)
    if arch.tiny:
        from trainer.tiny_models import build_tiny_model

        model = build_tiny_model(
            arch.family, _VocabOnly(arch.vocab, arch.pad_id), seed=seed, n_positions=max(positions, 64), **arch.tiny
        )
        return model.to(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(arch.build_config(), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Synthetic data and the steps both rows train on


def draw_lengths(count: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed example lengths: log-normal with median seq_len/8 and sigma 0.9, clipped to
    [seq_len/32, seq_len] (64..2048 tokens, median 256, for seq_len 2048)."""
    shortest = max(2, seq_len // 32)
    lengths = np.rint(rng.lognormal(mean=math.log(seq_len / 8), sigma=0.9, size=count))
    return np.clip(lengths, shortest, seq_len).astype(np.int64)


def synthetic_examples(count: int, *, seq_len: int, vocab: int, seed: int):
    """`count` examples of random token ids; the first 20-40% of each (at least one token) is the
    prompt (label -100), the rest is trained. The same arguments give the same examples."""
    from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample

    rng = np.random.default_rng(seed)
    lengths = draw_lengths(count, seq_len, rng)
    prompt_share = rng.uniform(*PROMPT_FRACTION, size=count)
    ids = rng.integers(0, vocab, size=int(lengths.sum())).tolist()
    examples, start = [], 0
    for line, (length, share) in enumerate(zip(lengths.tolist(), prompt_share.tolist()), 1):
        tokens = ids[start : start + length]
        start += length
        prompt = min(length - 1, max(1, round(share * length)))
        examples.append(TokenizedExample(tokens, [IGNORE_INDEX] * prompt + tokens[prompt:], "synthetic", line))
    return examples


@dataclass(frozen=True)
class StepData:
    """One optimizer step: the same examples, as ours and the baseline batch them."""

    packed: list[list]  # micro-batches of PackedRow (ours)
    padded: list[list]  # micro-batches of TokenizedExample (baseline)

    @property
    def examples(self) -> list:
        return [example for micro in self.padded for example in micro]

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def supervised_tokens(self) -> int:
        return sum(e.supervised_tokens for e in self.examples)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def plan_steps(rows: list, *, micro_batch_size: int, accumulation: int, steps: int, seed: int) -> list[StepData] | None:
    """Shuffle packed rows as the trainer's data order does (`epoch_order`) and give each step
    `accumulation` micro-batches of `micro_batch_size` rows; the baseline gets the same step's
    examples, shuffled, `micro_batch_size` per micro-batch. None if there are too few rows."""
    from trainer.data.batching import epoch_order

    per_step = micro_batch_size * accumulation
    if len(rows) < steps * per_step:
        return None
    order = epoch_order(len(rows), seed, 0)
    plans = []
    for step in range(steps):
        step_rows = [rows[i] for i in order[step * per_step : (step + 1) * per_step]]
        step_examples = [example for row in step_rows for example in row.examples]
        random.Random(f"{seed}:baseline:{step}").shuffle(step_examples)
        plans.append(StepData(_chunks(step_rows, micro_batch_size), _chunks(step_examples, micro_batch_size)))
    return plans


def make_steps(
    *, examples: int, seq_len: int, vocab: int, micro_batch_size: int, accumulation: int, steps: int, seed: int
) -> tuple[list[StepData], dict]:
    """Draw a data set of `examples` synthetic examples (more if they fill too few rows for `steps`
    steps), pack it whole as the trainer does, and plan the steps from its rows. Returns the steps
    and facts about the data set (its size and its padding after packing)."""
    from trainer.data.packing import pack_examples, packing_stats

    count = max(examples, 1)
    while True:
        drawn = synthetic_examples(count, seq_len=seq_len, vocab=vocab, seed=seed)
        rows = pack_examples(drawn, seq_len)
        plans = plan_steps(rows, micro_batch_size=micro_batch_size, accumulation=accumulation, steps=steps, seed=seed)
        if plans is not None:
            break
        count *= 2
    stats = packing_stats(rows, seq_len)
    lengths = np.array([len(e.input_ids) for e in drawn])
    facts = {
        "examples_drawn": count,
        "tokens_drawn": int(lengths.sum()),
        "length_min_median_mean_max": [
            int(lengths.min()),
            float(np.median(lengths)),
            round(float(lengths.mean()), 1),
            int(lengths.max()),
        ],
        "supervised_share": round(sum(e.supervised_tokens for e in drawn) / int(lengths.sum()), 4),
        "packed_rows": stats.rows,
        "packed_padding_fraction": stats.padding_fraction,
    }
    return plans, facts


def padding(micro_batches: list[list]) -> tuple[int, int]:
    """(real tokens, batch positions computed) of micro-batches each padded to its longest member
    (packed rows or examples: both have `input_ids`)."""
    real = sum(len(item.input_ids) for micro in micro_batches for item in micro)
    grid = sum(len(micro) * max(len(item.input_ids) for item in micro) for micro in micro_batches)
    return real, grid


# ---------------------------------------------------------------------------------------------
# Memory


# ---------------------------------------------------------------------------------------------
# The two training steps


def _to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def baseline_step(model, step: StepData, pad_id: int, device: torch.device, autocast) -> float:
    """Padded micro-batches, the model's own loss (full logits, mean per micro-batch), averaged."""
    from trainer.data.batching import collate

    loss_sum = torch.zeros((), device=device)
    for examples in step.padded:
        batch = _to(collate(examples, pad_id), device)
        with autocast():
            loss = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        (loss / len(step.padded)).backward()
        loss_sum += loss.detach()
    return loss_sum.item() / len(step.padded)  # GPU sync, once per step


# ---------------------------------------------------------------------------------------------
# One row: build, warm up, time


@dataclass
class Settings:
    arch: Architecture
    config: object  # trainer.config.Config: method, LoRA and optimizer settings
    device: torch.device
    dtype: torch.dtype
    autocast: torch.dtype | None
    attention: str
    gradient_checkpointing: bool
    seed: int
    warmup: int
    seq_len: int


def prepare_model(settings: Settings, ours: bool):
    """Build the row's model, then (in the trainer's order) attention, gradient checkpointing or the
    QLoRA preparation, LoRA or full, and the optimizer. Returns (model, optimizer, attention, parameters)."""
    from trainer.attention import configure_attention
    from trainer.model import apply_method, quantization_options
    from trainer.optim import build_optimizer
    from trainer.quantization import quantize_to_4bit

    cfg, device = settings.config, settings.device
    model = build_model(
        settings.arch, dtype=settings.dtype, device=device, seed=settings.seed, positions=settings.seq_len
    )
    parameters = sum(p.numel() for p in model.parameters())
    model.config.use_cache = False
    if cfg.method == "qlora":
        quantize_to_4bit(model, quantization_options(cfg, device)["quantization_config"], device)
    # Ours: configure_attention, before the QLoRA preparation casts norms to float32 (it reads the
    # model's dtype). Baseline: whatever transformers gives a model by default.
    attention = configure_attention(model, settings.attention, device) if ours else model.config._attn_implementation
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif settings.gradient_checkpointing:  # as trainer.model.load_model: the new name where it exists
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(cfg, model)
    model.train()
    optimizer = build_optimizer(cfg, model, device)
    return model, optimizer, attention, parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recipe_step_runner(settings: Settings, model, optimizer):
    """Ours: the trainer's own step (`trainer.step.optimizer_step`) with the trainer's strategy and
    accelerator (autocast, gradient sync, clipping), on packed micro-batches. Returns (model, step)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from trainer.data.packing import collate_packed
    from trainer.step import optimizer_step
    from trainer.strategy import Replicated

    AcceleratorState._reset_state()  # each row its own precision
    accelerator = Accelerator(
        mixed_precision=AUTOCAST.get(dtype_name(settings.autocast), "no") if settings.autocast else "no",
        cpu=settings.device.type == "cpu",
    )
    strategy = Replicated(accelerator, settings.config)
    model, optimizer = strategy.prepare(model, optimizer)

    def step(data: StepData) -> float:
        batches = [collate_packed(rows, settings.arch.pad_id) for rows in data.packed]
        return optimizer_step(
            model,
            optimizer,
            batches,
            step_tokens=data.supervised_tokens,
            learning_rate=settings.config.training.learning_rate,
            max_grad_norm=MAX_GRAD_NORM,
            accelerator=accelerator,
            strategy=strategy,
        ).loss

    return model, step


def _baseline_step_runner(settings: Settings, model, optimizer):
    """The baseline: padded micro-batches and the model's own loss, then clip and step."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def autocast():
        return torch.autocast(settings.device.type, dtype=settings.autocast) if settings.autocast else nullcontext()

    def step(data: StepData) -> float:
        loss = baseline_step(model, data, settings.arch.pad_id, settings.device, autocast)
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step


def _train(settings: Settings, steps: list[StepData], ours: bool, memory: PeakMemory) -> dict:
    """Build the row's model, train `steps` (the first `settings.warmup` untimed) and measure. Every
    tensor of the row is a local here, so all of it is freed when this returns."""
    device = settings.device
    model, optimizer, attention, parameters = prepare_model(settings, ours)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model, train_step = (_recipe_step_runner if ours else _baseline_step_runner)(settings, model, optimizer)

    memory.before_steps()
    losses, started = [], time.perf_counter()
    for index, step in enumerate(steps):
        if index == settings.warmup:
            _sync(device)
            started = time.perf_counter()
        losses.append(train_step(step))
    _sync(device)
    seconds = time.perf_counter() - started
    return {
        "attention": attention,
        "parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "adapter_parameters": sum(p.numel() for p in trainable if p.ndim == 2)
        if settings.config.method != "full"
        else 0,
        "seconds": seconds,
        "loss_per_step": losses[settings.warmup :],
        "peak_memory_bytes": memory.peak_bytes(),
        "error": None,
    }


def run_row(name: str, settings: Settings, steps: list[StepData]) -> dict:
    """One row of the table: `ours` or `baseline`. Running out of GPU memory is a result (the
    other row still runs), not a crash."""
    memory = PeakMemory(settings.device)
    memory.before_model()
    print(
        f"{name}: building the model, then {settings.warmup} warm-up + {len(steps) - settings.warmup} timed steps",
        file=sys.stderr,
    )
    try:
        row = {"name": name, **_train(settings, steps, name == "ours", memory)}
    except torch.OutOfMemoryError as err:
        row = {"name": name, "error": f"out of memory ({str(err).splitlines()[0][:120]})"}
    memory.before_model()  # the row's tensors are gone: hand their memory back before the next row
    return row


# ---------------------------------------------------------------------------------------------
# Measurements -> numbers -> table


def describe_rows(rows: list[dict], timed: list[StepData], *, shape, method: str, peak: Peak | None) -> None:
    """Add throughput, MFU and padding to each measured row (in place)."""
    lengths = [len(e.input_ids) for step in timed for e in step.examples]
    tokens = sum(lengths)
    supervised = sum(step.supervised_tokens for step in timed)
    for row in rows:
        micro_batches = [mb for step in timed for mb in (step.packed if row["name"] == "ours" else step.padded)]
        real, grid = padding(micro_batches)
        row.update(
            tokens=tokens,
            supervised_tokens=supervised,
            micro_batches=len(micro_batches),
            tokens_per_step=[step.tokens for step in timed],
            supervised_tokens_per_step=[step.supervised_tokens for step in timed],
            padded_positions=grid,
            padding_fraction=1 - real / grid,
        )
        if row.get("error"):
            row.update(tokens_per_second=None, supervised_tokens_per_second=None, model_flops=None, mfu=None)
            continue
        flops = training_flops(lengths, shape, method=method, adapter_params=row["adapter_parameters"])
        row.update(
            tokens_per_second=tokens / row["seconds"],
            supervised_tokens_per_second=supervised / row["seconds"],
            model_flops=flops,
            model_tflops_per_second=flops / row["seconds"] / 1e12,
            mfu=mfu(flops, row["seconds"], peak.tflops) if peak else None,
        )


def _human_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def format_table(result: dict) -> str:
    """The one table, with the context needed to read it."""
    s = result["settings"]
    peak = (
        f"{result['peak']['name']} = {result['peak']['tflops']:g} TFLOP/s"
        if result["peak"]
        else "n/a (no stated peak for this device; --peak-tflops sets one)"
    )
    lines = [
        f"model {s['model']} ({result['model']['about']}): {result['model']['parameters']:,} parameters, "
        f"N = {result['model']['matmul_parameters']:,} matmul parameters; "
        f"method {s['method']}, optimizer {s['optimizer']}, "
        f"{s['dtype']} weights, autocast {s['autocast'] or 'off'}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        f"device {result['machine']['device_name']}; load average before: {result['machine']['load_average_before']}",
        f"data: {result['data']['examples_drawn']:,} synthetic examples, {result['data']['tokens_drawn']:,} tokens "
        f"(min/median/mean/max length "
        f"{'/'.join(format(x, 'g') for x in result['data']['length_min_median_mean_max'])}), "
        f"packed into {result['data']['packed_rows']:,} rows "
        f"with {100 * result['data']['packed_padding_fraction']:.2f}% padding\n"
        f"steps: {s['warmup']} warm-up + {s['steps']} timed steps; "
        f"per step {s['micro_batch_size']} rows x {s['accumulation']} micro-batches of seq {s['seq_len']} (ours); "
        f"timed: {result['data']['timed_tokens']:,} tokens, {result['data']['timed_supervised_tokens']:,} supervised",
        f"MFU against: {peak}",
        f"memory: {result['memory']}",
        "",
    ]
    header = (
        "row",
        "attention",
        "micro-batches",
        "padding",
        "tokens/s",
        "supervised tok/s",
        "TFLOP/s",
        "MFU",
        "peak memory",
    )
    table = [header]
    for row in result["rows"]:
        if row.get("error"):
            table.append(
                (
                    row["name"],
                    row.get("attention", "-"),
                    str(row["micro_batches"]),
                    f"{100 * row['padding_fraction']:.1f}%",
                    row["error"],
                    "",
                    "",
                    "",
                    "",
                )
            )
            continue
        table.append(
            (
                row["name"],
                row["attention"],
                str(row["micro_batches"]),
                f"{100 * row['padding_fraction']:.1f}%",
                f"{row['tokens_per_second']:,.0f}",
                f"{row['supervised_tokens_per_second']:,.0f}",
                f"{row['model_tflops_per_second']:.3g}",
                "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
                _human_bytes(row["peak_memory_bytes"]),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for index, cells in enumerate(table):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    if result.get("speedup") is not None:
        lines.append(f"\nours / baseline tokens/s: {result['speedup']:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Environment


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({cpu}, {os.cpu_count()} logical cores)",
    }
    if device.type == "cuda":
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def versions() -> dict:
    import peft
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    try:
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        found["bitsandbytes"] = None
    return found


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="tiny-gptj")
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--seq-len", type=int, help="longest example and packed row length (default: the model's)")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        help="rows per micro-batch (ours) and examples per micro-batch (baseline); default: the model's",
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        help="micro-batches of packed rows per optimizer step; tokens per step are about "
        "micro-batch-size x accumulation x seq-len (default: the model's)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument(
        "--examples",
        type=int,
        default=2000,
        help="size of the synthetic data set that is packed; the steps take random rows of it",
    )
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing starts")
    parser.add_argument(
        "--attention", choices=ATTENTION, default="auto", help="our attention backend (model.attention)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in both rows")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="weights; auto: bfloat16 on CUDA, else float32"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the plain transformers + peft baseline (default: yes)",
    )
    parser.add_argument("--peak-tflops", type=float, help="state the device's peak (TFLOP/s) for MFU, e.g. on a CPU")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's). On a shared machine use 1: a second "
        "thread that gets descheduled stalls every parallel kernel",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write every number, the machine and versions to OUT")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name. Fix: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU (torch {torch.__version__}). Fix: --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def trainer_config(args: argparse.Namespace):
    """The trainer's own Config for these options, so LoRA, the optimizer and QLoRA are set up
    exactly as a training run sets them up (and impossible combinations are refused the same way)."""
    from pydantic import ValidationError

    from trainer.config import Config

    try:
        return Config.model_validate(
            {
                "model": {
                    "name_or_path": args.model,
                    "dtype": args.dtype,
                    "attention": args.attention,
                    "gradient_checkpointing": args.gradient_checkpointing,
                },
                "method": args.method,
                "data": {"train_file": "synthetic", "max_seq_len": args.seq_len},
                "training": {"optimizer": args.optimizer, "seed": args.seed},
            }
        )
    except ValidationError as err:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise UserError(
            f"--method {args.method} --optimizer {args.optimizer} --dtype {args.dtype}: {problems}"
        ) from None


def check_options(args: argparse.Namespace, arch: Architecture) -> None:
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--micro-batch-size", args.micro_batch_size, 1),
        ("--accumulation", args.accumulation, 1),
        ("--threads", args.threads, 1),
        ("--examples", args.examples, 1),
    ):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if not 32 <= args.seq_len <= arch.max_positions:
        raise UserError(f"--seq-len {args.seq_len}: {arch.name} takes 32 to {arch.max_positions} tokens")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"--peak-tflops {args.peak_tflops}: must be positive")


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from trainer.optim import require_device_features
    from trainer.precision import resolve_dtype

    arch = ARCHITECTURES[args.model]
    args.seq_len = args.seq_len or arch.seq_len
    args.micro_batch_size = args.micro_batch_size or arch.micro_batch_size
    args.accumulation = args.accumulation or arch.accumulation
    check_options(args, arch)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = trainer_config(args)
    device = resolve_device(args.device)
    require_device_features(config, device)  # QLoRA and 8-bit AdamW: bitsandbytes, said plainly
    if arch.needs_cuda and device.type != "cuda":
        raise UserError(
            f"--model {arch.name} needs a CUDA GPU: {arch.about} is billions of parameters, which a CPU "
            "neither holds comfortably nor trains in useful time. Fix: run it on a GPU machine, or use "
            "--model tiny-gptj, tiny-neox, tiny-gpt2 or mid-gptj here"
        )
    dtype = resolve_dtype(args.dtype, device)
    if args.method == "qlora":
        dtype = torch.bfloat16  # the unquantized parts are built as a bf16 checkpoint would load
    # Mixed precision as the trainer (and HF Trainer with bf16=True) runs it on a GPU.
    autocast = torch.bfloat16 if device.type == "cuda" and (dtype == torch.bfloat16 or args.method == "qlora") else None
    settings = Settings(
        arch,
        config,
        device,
        dtype,
        autocast,
        args.attention,
        args.gradient_checkpointing,
        args.seed,
        args.warmup,
        args.seq_len,
    )

    if args.json:  # fail now, not after the measurements
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    steps, data_facts = make_steps(
        examples=args.examples,
        seq_len=args.seq_len,
        vocab=arch.vocab,
        micro_batch_size=args.micro_batch_size,
        accumulation=args.accumulation,
        steps=args.warmup + args.steps,
        seed=args.seed,
    )
    timed = steps[args.warmup :]
    rows = []
    if args.baseline:
        rows.append(run_row("baseline", settings, steps))
    rows.append(run_row("ours", settings, steps))

    with torch.device("meta"):
        shape = model_shape(
            build_model(
                arch, dtype=torch.bfloat16, device=torch.device("meta"), seed=args.seed, positions=args.seq_len
            ).config
        )
    if args.peak_tflops:
        peak = Peak(f"stated with --peak-tflops ({machine['device_name']})", args.peak_tflops)
    else:
        peak = gpu_peak(machine["device_name"]) if device.type == "cuda" else None
    describe_rows(rows, timed, shape=shape, method=args.method, peak=peak)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    measured = {row["name"]: row for row in rows if not row.get("error")}
    speedup = (
        measured["ours"]["tokens_per_second"] / measured["baseline"]["tokens_per_second"]
        if {"ours", "baseline"} <= measured.keys()
        else None
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench.py " + shlex.join(argv),
        "machine": machine,
        "versions": versions(),
        "settings": {
            "model": arch.name,
            "method": args.method,
            "optimizer": args.optimizer,
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "accumulation": args.accumulation,
            "steps": args.steps,
            "warmup": args.warmup,
            "attention": args.attention,
            "gradient_checkpointing": args.gradient_checkpointing,
            "dtype": str(dtype).removeprefix("torch."),
            "autocast": str(autocast).removeprefix("torch.") if autocast else None,
            "device": str(device),
            "seed": args.seed,
            "baseline": args.baseline,
            "lora": {"r": config.lora.r, "alpha": config.lora.alpha, "dropout": config.lora.dropout},
            "learning_rate": config.training.learning_rate,
            "max_grad_norm": MAX_GRAD_NORM,
        },
        "model": {
            "about": arch.about,
            "family": arch.family,
            "parameters": next((row["parameters"] for row in rows if "parameters" in row), None),
            "shape": vars(shape),
            "matmul_parameters": matmul_params(shape),
        },
        "data": {
            **data_facts,
            "lengths": f"log-normal, median seq_len/8, sigma 0.9, clipped to [max(2, seq_len/32), seq_len]; "
            f"prompt {PROMPT_FRACTION[0]:.0%}-{PROMPT_FRACTION[1]:.0%} of each example (uniform), masked",
            "timed_examples": sum(len(step.examples) for step in timed),
            "timed_tokens": sum(step.tokens for step in timed),
            "timed_supervised_tokens": sum(step.supervised_tokens for step in timed),
        },
        "flops": {
            "per_token": "full: 6N; lora/qlora: 4N + 6 N_adapter; N = n_layer (4 d^2 + 2 d d_ff) + d vocab",
            "attention": "6 n_layer d L^2 per example of real length L (causal QK^T and AV, forward + backward)",
        },
        "peak": None if peak is None else {"name": peak.name, "tflops": peak.tflops},
        "memory": PeakMemory(device).label,
        "rows": rows,
        "speedup": speedup,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # transformers 5 renamed gradient checkpointing; peft still asks under the old name, and the
    # deprecation notes would bury the table.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    # transformers warns that packed input_ids "may be padded" without an attention_mask: packed rows
    # have none on purpose (trainer/data/packing.py); the table is the output, not the log.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args = parse_args(argv)  # usage errors: argparse prints them and exits with 2
    try:
        result = run(args, argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
