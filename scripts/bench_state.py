"""How long a resumable-state save takes, and how many bytes it writes.

    python scripts/bench_state.py [--repeat 5] [--throughput-mb 1500] [--json OUT]

1. The embedded default's model (examples/tiny-gpt2, full fine-tuning, AdamW): `trainer.state.save_state`
   timed `--repeat` times (every file fsynced, then renamed), median and range.
2. This disk's throughput through the same function: a synthetic model of `--throughput-mb` MB of
   weights plus optimizer state, saved 3 times.
3. GPT-J-6B (its published shape, built on the meta device: no weights exist) with LoRA as in
   configs/gptj.yaml (bf16 base) and with full fine-tuning (float32 master weights): the state's bytes
   from `trainer.disk.run_bytes`, and the time those bytes would take at the throughput of step 2. An
   estimate for this disk only: a cluster's parallel filesystem is another disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from trainer.config import Config  # noqa: E402
from trainer.disk import human, run_bytes  # noqa: E402
from trainer.state import save_state  # noqa: E402


def config(name_or_path: str, method: str, output_dir: str) -> Config:
    return Config.model_validate(
        {
            "model": {"name_or_path": name_or_path},
            "method": method,
            "data": {"train_file": "t.jsonl"},
            "output_dir": output_dir,
        }
    )


def optimizer_with_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # creates exp_avg and exp_avg_sq
    return optimizer


def timed_saves(accelerator, model, optimizer, cfg: Config, repeat: int) -> tuple[list[float], int]:
    with tempfile.TemporaryDirectory(dir=REPO) as folder:
        seconds = []
        for step in range(1, repeat + 1):
            started = time.perf_counter()
            path = save_state(accelerator, Path(folder), step, model=model, optimizer=optimizer, config=cfg, info={})
            seconds.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in path.iterdir())
    return seconds, size


def gptj_state_bytes(method: str) -> int:
    """GPT-J-6B's state as the trainer keeps it: a bf16 base with float32 LoRA adapters, or float32
    master weights for full fine-tuning (`trainer.model.storage_dtype`); AdamW."""
    from transformers import AutoModelForCausalLM

    from trainer.families import gptj_6b_config
    from trainer.model import apply_method, storage_dtype

    cfg = config("EleutherAI/gpt-j-6b", method, ".")
    cfg.model.dtype = "bfloat16"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gptj_6b_config(), dtype=storage_dtype(cfg))
        model = apply_method(cfg, model)
    return run_bytes(model, method=method, optimizer="adamw", tokenizer_size=0).state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--throughput-mb", type=int, default=1500, help="weights + optimizer state of the synthetic save"
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=True)
    from transformers import AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_pretrained(REPO / "examples" / "tiny-gpt2")
    tiny_seconds, tiny_bytes = timed_saves(
        accelerator, tiny, optimizer_with_state(tiny), config("examples/tiny-gpt2", "full", "."), args.repeat
    )

    # Weights (4 bytes a value) + AdamW's two moments (8) = 12 bytes a parameter.
    synthetic = torch.nn.Linear(1024, args.throughput_mb * 1_000_000 // 12 // 1024, bias=False)
    big_seconds, big_bytes = timed_saves(
        accelerator, synthetic, optimizer_with_state(synthetic), config("synthetic", "full", "."), 3
    )
    throughput = big_bytes / statistics.median(big_seconds)

    result = {
        "tiny_gpt2_full": {
            "bytes": tiny_bytes,
            "seconds_median": statistics.median(tiny_seconds),
            "seconds_min": min(tiny_seconds),
            "seconds_max": max(tiny_seconds),
        },
        "synthetic": {"bytes": big_bytes, "seconds": big_seconds, "bytes_per_second": throughput},
        "gptj_6b_estimates": {},
    }
    for method in ("lora", "full"):
        size = gptj_state_bytes(method)
        result["gptj_6b_estimates"][method] = {"bytes": size, "seconds_at_this_throughput": size / throughput}

    print(
        f"tiny-gpt2 full fine-tuning state: {human(tiny_bytes)}, "
        f"median {statistics.median(tiny_seconds) * 1000:.1f} ms "
        f"(min {min(tiny_seconds) * 1000:.1f}, max {max(tiny_seconds) * 1000:.1f}) over {args.repeat} saves"
    )
    print(
        f"this disk through save_state: {human(big_bytes)} in {statistics.median(big_seconds):.2f} s median "
        f"= {human(int(throughput))}/s"
    )
    for method, estimate in result["gptj_6b_estimates"].items():
        print(
            f"GPT-J-6B {method} (AdamW): state {human(estimate['bytes'])}, about "
            f"{estimate['seconds_at_this_throughput']:.1f} s at that throughput"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
