"""Time the startup self-test (trainer/selftest.py) on models built locally with random weights:

    python scripts/bench_selftest.py [--model tiny-gptj|mid-gptj|tiny-neox|tiny-gpt2] [--method lora|full]
                                     [--dtype float32|bfloat16] [--repeats 3]

Prints the checks' differences and the median time of `check_model` (attention vs eager, and the
packed layout vs one by one). docs/BENCHMARKS.md ("Self-test") has the figures and the estimate
for GPT-J-6B and GPT-NeoX-20B.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def build(name: str):
    from transformers import AutoModelForCausalLM

    from trainer.families import FAMILIES, mid_gptj_config

    if name == "mid-gptj":
        config = mid_gptj_config()
    else:
        family = {"tiny-gptj": "gptj", "tiny-neox": "gpt_neox", "tiny-gpt2": "gpt2"}[name]
        config = FAMILIES[family].tiny_config(
            {"vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0}, n_layer=2, n_embd=64, n_head=2, n_positions=256
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mid-gptj", choices=["tiny-gpt2", "tiny-gptj", "tiny-neox", "mid-gptj"])
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from trainer.attention import install_attention
    from trainer.config import Config
    from trainer.model import apply_method
    from trainer.selftest import check_model

    model = build(args.model)
    install_attention(model, "sdpa")
    if args.method == "lora":
        config = Config.model_validate({"model": {"name_or_path": "x"}, "data": {"train_file": "t"}, "method": "lora"})
        model = apply_method(config, model)
    dtype = getattr(torch, args.dtype)
    autocast = (
        contextlib.nullcontext if dtype == torch.float32 else functools.partial(torch.autocast, "cpu", dtype=dtype)
    )
    times, checks = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        checks = check_model(
            model, attention="sdpa", packing=True, compute_dtype=dtype, autocast=autocast, device=torch.device("cpu")
        )
        times.append(time.perf_counter() - started)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} {args.method} {args.dtype}: {parameters:,} parameters; "
        + "; ".join(f"{c.what} {c.difference:.1e} (tolerance {c.tolerance:g})" for c in checks)
        + f"; median {statistics.median(times):.3f} s over {args.repeats} (min {min(times):.3f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
