"""Compare a run's checkpoints in the browser, live while the run trains.

    python -m trainer.compare RUN_DIR [--port 8100] [--host 127.0.0.1] [--max-loaded 2]
                              [--api-key-file FILE] [--base PATH_OR_ID] [--dtype auto] [--device auto]

Open the printed address: the loss plot (and the task metrics per checkpoint, when the run computes
them), every checkpoint's answers to the test prompts side by side, the validation examples with each
checkpoint's prediction (when the checkpoints have predictions.jsonl), and a prompt box that asks the
chosen checkpoints and shows their completions side by side (the same completion
`python -m trainer.generate` gives for the same prompt, parameters and seed). New checkpoints appear
as they are saved. The run folder is only read, never locked. LoRA checkpoints share one base model
in memory; full checkpoints are loaded when first asked and at most --max-loaded are held. Token
rules are trainer.serve's: loopback only without a key; with TRAINER_API_KEY or --api-key-file the
page asks for the key. Needs the `serve` extra: pip install -e ".[serve]".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.cli import command
from trainer.errors import UsageError
from trainer.loading import add_model_arguments
from trainer.serve import (
    API_KEY_VARIABLE,
    base_url,
    check_exposure,
    open_socket,
    read_api_key,
    require_serving_extras,
    serve_forever,
)

DEFAULT_PORT = 8100


def build_parser() -> argparse.ArgumentParser:
    from trainer.compare.models import DEFAULT_MAX_LOADED

    parser = argparse.ArgumentParser(
        prog="python -m trainer.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run's output_dir (it may still be training)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 takes a free one)"
    )
    parser.add_argument("--api-key-file", type=Path, help=f"a file holding the API key (default: ${API_KEY_VARIABLE})")
    parser.add_argument(
        "--max-loaded",
        type=int,
        default=DEFAULT_MAX_LOADED,
        help="full fine-tuning checkpoints held in memory at once; the least recently used is "
        f"dropped first (default {DEFAULT_MAX_LOADED}). LoRA checkpoints share one base model "
        "and are not counted",
    )
    add_model_arguments(parser, "base model of LoRA checkpoints")
    parser.add_argument(
        "--poll-seconds", type=float, default=3.0, help="how often the page looks for new checkpoints (default 3)"
    )
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def build_app(args: argparse.Namespace, key: str | None):
    """The app for parsed `args` (nothing is loaded before a checkpoint is asked for)."""
    from trainer.compare.app import create_app
    from trainer.compare.folder import RunReader, check_run_folder
    from trainer.compare.models import CheckpointModels
    from trainer.loading import resolve_device
    from trainer.precision import resolve_dtype

    run_dir = check_run_folder(args.run_dir)
    device = resolve_device(args.device)
    models = CheckpointModels(device, resolve_dtype(args.dtype, device), base=args.base, max_loaded=args.max_loaded)
    return create_app(RunReader(run_dir), models, token=key, poll_seconds=args.poll_seconds)


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_loaded < 1:
        raise UsageError(f"--max-loaded must be at least 1, got {args.max_loaded}")
    if not args.poll_seconds > 0:
        raise UsageError(f"--poll-seconds must be more than 0, got {args.poll_seconds}")
    require_serving_extras("the compare page")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    key = read_api_key(args.api_key_file)
    check_exposure(args.host, key)
    app = build_app(args, key)
    sock = open_socket(args.host, args.port)
    access = "API key required: the page asks for it" if key else "no API key (loopback only)"
    print(
        f"comparing the checkpoints of {args.run_dir} at {base_url(args.host, sock)}/ ({access}); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    serve_forever(app, sock, args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
