#!/usr/bin/env python
"""Check the planner's activation estimate against a measurement, on CPU, in seconds.

    python scripts/plan_check.py                  # mid-gptj: LoRA and full, checkpointing off and on
    python scripts/plan_check.py --supervised 1   # every position labelled: the loss's chunk dominates

For each case a real model (mid-gptj: GPT-J's layer design and 50,400-token vocabulary, 4 layers of
256; random weights) is prepared as a run prepares it (`trainer.model.apply_method`, sdpa attention,
gradient checkpointing), one packed micro-batch goes forward and backward through the trainer's
loss (`trainer.loss.supervised_loss_sum`), and `trainer.activations.measure_activations` measures
(1) the bytes autograd keeps for the backward pass when the forward pass ends (saved_tensors_hooks,
each storage once, parameters excluded) and (2) the peak of all live tensors during forward and
backward (parameters, their gradients and the batch excluded). The planner's estimate for the same
settings uses the CPU's kernel rules (`trainer.activations.CPU`) in place of CUDA's; everything else
is the code `scripts/plan.py` runs. Float32, no autocast: this CPU's bf16 is slow.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = (("lora", False), ("lora", True), ("full", False), ("full", True))


@dataclasses.dataclass(frozen=True)
class Check:
    method: str
    gradient_checkpointing: bool
    estimated_forward: int
    measured_forward: int
    estimated_peak: int
    measured_peak: int
    seconds: float

    @property
    def peak_error(self) -> float:
        return self.estimated_peak / self.measured_peak - 1

    @property
    def forward_error(self) -> float:
        return self.estimated_forward / self.measured_forward - 1


def case_config(method: str, gradient_checkpointing: bool, micro_batch_size: int, seq_len: int, dropout: float):
    """The trainer Config of one case: float32, no autocast, sdpa (what a CPU runs)."""
    from trainer.config import Config

    return Config.model_validate(
        {
            "model": {
                "name_or_path": "mid-gptj",
                "dtype": "float32",
                "attention": "sdpa",
                "gradient_checkpointing": gradient_checkpointing,
            },
            "method": method,
            "lora": {"dropout": dropout},
            "data": {"train_file": "synthetic", "max_seq_len": seq_len, "packing": True},
            "training": {"micro_batch_size": micro_batch_size, "mixed_precision": "no"},
        }
    )


def check(
    model_config,
    method: str,
    gradient_checkpointing: bool,
    *,
    micro_batch_size: int = 2,
    seq_len: int = 256,
    supervised: float = 0.05,
    dropout: float = 0.0,
    seed: int = 0,
) -> Check:
    """Measure one case on a real model and estimate it with the planner's code."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from trainer.activations import CPU, estimate_activations, measure_activations, packed_batch
    from trainer.attention import configure_attention
    from trainer.model import apply_method
    from trainer.plan import activation_setup, inventory_of, prepared_model, resolve_settings

    config = case_config(method, gradient_checkpointing, micro_batch_size, seq_len, dropout)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config), dtype=torch.float32)
    model.config.use_cache = False
    configure_attention(model, "sdpa", "cpu")
    if gradient_checkpointing:  # as trainer.model.load_model does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(config, model)
    model.train()
    batch = packed_batch(model_config.vocab_size, micro_batch_size, seq_len, supervised=supervised, seed=seed)
    started = time.perf_counter()
    measured = measure_activations(model, batch)
    seconds = time.perf_counter() - started

    settings = resolve_settings(config, model_config, gpus=1)
    held = inventory_of(prepared_model(config, model_config, method), method)
    setup = dataclasses.replace(
        activation_setup(settings, model_config, held),
        kernels=CPU,
        supervised_rows=int((batch["labels"][:, 1:] != -100).sum()),
    )
    estimate = estimate_activations(setup)
    return Check(
        method,
        gradient_checkpointing,
        estimate.forward,
        measured.saved_after_forward,
        estimate.total,
        measured.peak,
        seconds,
    )


def format_checks(checks: list[Check]) -> str:
    lines = [
        "| method | gradient checkpointing | kept by forward: estimated | measured "
        "| peak: estimated | measured | peak error |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in checks:
        lines.append(
            f"| {c.method} | {'on' if c.gradient_checkpointing else 'off'} | {c.estimated_forward / 1e6:.2f} MB | "
            f"{c.measured_forward / 1e6:.2f} MB | {c.estimated_peak / 1e6:.2f} MB | {c.measured_peak / 1e6:.2f} MB | "
            f"{100 * c.peak_error:+.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/plan_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--supervised",
        type=float,
        default=0.05,
        help="share of each example that is labelled (default 0.05: few, as in classification-like "
        "data, so that the blocks' share of the peak shows beside the loss's)",
    )
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    if args.micro_batch_size < 1 or not 32 <= args.seq_len <= 2048 or not 0 < args.supervised <= 1:
        print("error: --micro-batch-size >= 1, --seq-len 32..2048, --supervised in (0, 1]", file=sys.stderr)
        return 2
    import torch
    from transformers.utils import logging as hf_logging

    from trainer.families import mid_gptj_config

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    print(
        f"mid-gptj, {args.micro_batch_size} packed rows x {args.seq_len} tokens, {args.supervised:.0%} supervised, "
        f"float32 on CPU ({torch.get_num_threads()} threads)\n"
    )
    checks = [
        check(
            mid_gptj_config(),
            method,
            ckpt,
            micro_batch_size=args.micro_batch_size,
            seq_len=args.seq_len,
            supervised=args.supervised,
            dropout=args.lora_dropout,
        )
        for method, ckpt in CASES
    ]
    print(format_checks(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
