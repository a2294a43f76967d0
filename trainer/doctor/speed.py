"""The doctor's section 7 (`--speed`): the trainer's own optimizer step timed on synthetic packed rows:
tokens/s, MFU where the GPU's peak is known, and the peak memory measured against the planner's."""

from __future__ import annotations

import time

import torch

from trainer.doctor.model import Built
from trainer.doctor.report import Report, _gb
from trainer.doctor.setup import Resolved
from trainer.peak_memory import PeakMemory

#: Untimed optimizer steps before `--speed` starts its clock (allocator, kernel selection, lazy
#: optimizer state).
WARMUP_STEPS = 1


# ---------------------------------------------------------------------------------------------
# 7. Speed


def synthetic_rows(count: int, *, seq_len: int, vocab: int, seed: int) -> list:
    """`count` packed rows of exactly `seq_len` tokens of random ids, each a few examples (a half,
    a quarter and two eighths of the row, at least 2 tokens each) whose first 30% is a masked prompt."""
    from trainer.data.packing import PackedRow
    from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(seed)
    parts = [seq_len // 2, seq_len // 4, seq_len // 8]
    parts = [p for p in parts if p >= 2]
    parts.append(seq_len - sum(parts))
    rows = []
    for row in range(count):
        examples = []
        for number, length in enumerate(parts):
            ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
            prompt = min(length - 1, max(1, round(0.3 * length)))
            examples.append(
                TokenizedExample(
                    ids, [IGNORE_INDEX] * prompt + ids[prompt:], "synthetic", row * len(parts) + number + 1
                )
            )
        rows.append(PackedRow(tuple(examples)))
    return rows


def check_speed(
    report: Report,
    resolved: Resolved,
    built: Built,
    device: torch.device,
    steps: int,
    memory_estimate,
    memory: PeakMemory,
) -> None:
    from trainer.data.packing import collate_packed
    from trainer.families import model_shape
    from trainer.flops import gpu_peak, mfu, training_flops
    from trainer.step import optimizer_step

    report.heading(f"7. speed: {WARMUP_STEPS} warm-up + {steps} timed steps of trainer.step.optimizer_step")
    config, acc = resolved.config, resolved.recipe.accelerator
    seq_len, rows_per_micro = config.data.max_seq_len, config.training.micro_batch_size
    accumulation = config.training.gradient_accumulation_steps
    vocab = resolved.model_config.vocab_size
    pad_id = built.tokenizer.pad_token_id if built.tokenizer is not None else 0
    rows = synthetic_rows(
        (WARMUP_STEPS + steps) * rows_per_micro * accumulation, seq_len=seq_len, vocab=vocab, seed=config.training.seed
    )
    per_step = rows_per_micro * accumulation
    step_rows = [rows[i * per_step : (i + 1) * per_step] for i in range(WARMUP_STEPS + steps)]
    built.model.train()
    memory.before_steps()
    losses, started = [], time.perf_counter()
    for index, this_step in enumerate(step_rows):
        if index == WARMUP_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        batches = [
            collate_packed(this_step[i : i + rows_per_micro], pad_id) for i in range(0, per_step, rows_per_micro)
        ]
        result = optimizer_step(
            built.model,
            built.optimizer,
            batches,
            step_tokens=sum(row.supervised_tokens for row in this_step),
            learning_rate=config.training.learning_rate,
            max_grad_norm=config.training.max_grad_norm,
            accelerator=acc,
            strategy=built.strategy,
        )
        losses.append(result.loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    timed = [row for this_step in step_rows[WARMUP_STEPS:] for row in this_step]
    lengths = [length for row in timed for length in row.seq_lens]
    tokens = sum(lengths)
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    adapter = sum(p.numel() for p in trainable if p.ndim == 2) if config.method != "full" else 0
    try:
        flops = training_flops(
            lengths, model_shape(resolved.model_config), method=config.method, adapter_params=adapter
        )
    except ValueError:  # a family without a FLOP formula
        flops = None
    peak = gpu_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak_bytes = memory.peak_bytes()
    estimate = memory_estimate.per_gpu.total if memory_estimate is not None else None
    section = {
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "seq_len": seq_len,
        "rows_per_step": per_step,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "model_tflops_per_second": flops / seconds / 1e12 if flops else None,
        "mfu": mfu(flops, seconds, peak.tflops) if flops and peak else None,
        "peak": None if peak is None else {"name": peak.name, "tflops": peak.tflops},
        "loss_first_last": [losses[0], losses[-1]],
        "peak_memory_bytes": peak_bytes,
        "peak_memory": memory.label,
        "planner_estimate_bytes": estimate,
    }
    report.sections["speed"] = section
    report.say(
        f"  {tokens:,} tokens in {seconds:.2f} s: {section['tokens_per_second']:,.0f} tokens/s"
        + (f", {section['model_tflops_per_second']:.3g} model TFLOP/s" if flops else "")
        + (
            f", MFU {100 * section['mfu']:.1f}% of {peak.name} {peak.tflops:g} TFLOP/s"
            if section["mfu"] is not None
            else ", MFU n/a (no known peak for this device)"
        )
    )
    report.say(f"  loss {losses[0]:.4f} (warm-up step) -> {losses[-1]:.4f} (last step)")
    comparison = ""
    if peak_bytes is not None and estimate:
        comparison = f"; the planner estimated {_gb(estimate)} ({100 * peak_bytes / estimate:.0f}% measured)"
        if device.type != "cuda":
            comparison += " for a CUDA GPU, so the two are not comparable here"
    report.say(f"  peak memory {_gb(peak_bytes)} ({memory.label}){comparison}")
