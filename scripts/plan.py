#!/usr/bin/env python
"""Will it fit? Per-GPU memory of a training config (weights, gradients, optimizer state,
activations) and, when it does not fit, what would.

    python scripts/plan.py configs/gptj.yaml --gpus 1 --gpu-memory 80GB
    python scripts/plan.py configs/gptj.yaml method=full --gpus 1 --gpu-memory 80GB
    python scripts/plan.py configs/neox20b.yaml method=full distributed.strategy=fsdp --gpus 8 --json

`section.key=value` overrides work as in training. Nothing is downloaded and no GPU is needed: the
model is built on the meta device from its config.json (a local folder or the local Hugging Face
cache) or from its published shape (trainer/families.py). The memory model is described in
trainer/plan.py and trainer/activations.py. Exit codes: 0 with a verdict (fits or not), 1 for a
config or model problem, 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.errors import UsageError, UserError  # noqa: E402

UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(text: str) -> int:
    """'80GB' (10^9 bytes), '80GiB' (2^30), '81559MiB', '141 GB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text)
    unit = match and UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) <= 0:
        raise UsageError(f"--gpu-memory {text!r}: give a positive size with a unit, e.g. 80GB, 80GiB or 81559MiB")
    return int(float(match.group(1)) * unit)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/plan.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="the training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, as in training")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the run uses (processes), default 1")
    parser.add_argument(
        "--gpu-memory", default="80GB", help="memory of one GPU: 80GB (10^9 bytes), 80GiB (2^30), ...; default 80GB"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit:  # argparse: --help (0) or a malformed command line (2)
        return int(exit.code or 0)
    try:
        if args.gpus < 1:
            raise UsageError(f"--gpus {args.gpus}: must be at least 1")
        memory = parse_memory(args.gpu_memory)
        if not Path(args.config).is_file():
            raise UsageError(
                f"config file {args.config} does not exist: check the path (it is relative to {Path.cwd()})"
            )
        from transformers.utils import logging as hf_logging

        from trainer.config import load_config
        from trainer.plan import estimate_run, format_estimate

        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore")  # library deprecation notes about meta-device models
        config = load_config(args.config, args.overrides)
        estimate = estimate_run(config, gpus=args.gpus, gpu_memory_bytes=memory)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.json:
        print(json.dumps({"config": args.config, "overrides": args.overrides, **estimate.to_json()}, indent=2))
    else:
        print(format_estimate(estimate, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
