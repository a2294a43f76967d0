"""Serve a checkpoint or an exported model over HTTP: the seed's completion API and OpenAI's.

    python -m trainer.serve CHECKPOINT_OR_EXPORT [--host 127.0.0.1] [--port 8000] [--model-name NAME]
                            [--api-key-file FILE] [--max-batch-size 8] [--max-rows-per-request 64]
                            [--embedding-pooling mean|last]
    python -m trainer.serve RUN_DIR --best ...     # the run's recommended checkpoint

Routes: POST /completions (the seed's API: text, length, temperature, top_p, top_k, stop_sequences
or stop_tokens, n), POST /v1/completions and POST /v1/chat/completions (for the `openai` client;
`stream: true` sends server-sent events), POST /v1/embeddings, GET /v1/models and GET /health. It
listens on loopback unless told otherwise. With an API key (the TRAINER_API_KEY environment
variable, or --api-key-file) every route but /health needs `Authorization: Bearer <key>`; on any
address but loopback it refuses to start without one. The key is never printed or logged (the
access log shows paths without query strings).

Requests are queued and served in dynamic batches of up to --max-batch-size rows by one worker that
owns the model. Fairness: a request holds at most --max-rows-per-request rows (completions: prompts
x n; embeddings: inputs; more is refused with 422), and each batch is shared out round-robin over
the waiting requests, one row each in turn, so a small request waits at most for the batch being
generated, never for a big request's remaining rows (see trainer/serving/worker.py). Needs the
`serve` extra: pip install -c constraints.txt -e ".[serve]".
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from trainer.cli import command
from trainer.errors import UsageError, UserError
from trainer.loading import add_model_arguments
from trainer.recommend import add_checkpoint_arguments, checkpoint_from_args

API_KEY_VARIABLE = "TRAINER_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--model-name", help="the name clients use (default: RUN/checkpoint-STEP, or the folder's name)"
    )
    parser.add_argument("--api-key-file", type=Path, help=f"a file holding the API key (default: ${API_KEY_VARIABLE})")
    parser.add_argument("--max-batch-size", type=int, default=8, help="most rows generated together (default 8)")
    parser.add_argument(
        "--max-rows-per-request",
        type=int,
        default=64,
        help="most completions (prompts x n) or embedding inputs in one request; more is refused with 422 (default 64)",
    )
    parser.add_argument(
        "--embedding-pooling",
        default="mean",
        choices=("mean", "last"),
        help="/v1/embeddings' vector: the mean of the input's last hidden states, or the last token's "
        '(default mean; a request\'s "pooling" field overrides it)',
    )
    add_model_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def read_api_key(key_file: Path | None) -> str | None:
    """The key from --api-key-file, else from $TRAINER_API_KEY, else None."""
    if key_file is not None:
        try:
            key = key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(
                f"--api-key-file {key_file} cannot be read ({getattr(err, 'strerror', None) or err}). "
                "Fix: give a readable text file that holds the key"
            ) from None
        if not key:
            raise UserError(f"--api-key-file {key_file} is empty. Fix: write the key into it")
        return key
    key = os.environ.get(API_KEY_VARIABLE)
    if key is not None and not key.strip():
        raise UserError(f"{API_KEY_VARIABLE} is set but empty. Fix: set it to the key, or unset it (loopback only)")
    return key.strip() if key else None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def check_exposure(host: str, key: str | None) -> None:
    if key is None and not is_loopback(host):
        raise UserError(
            f"refusing to listen on {host} without an API key: anyone who can reach it could use the model. "
            f"Fix: set {API_KEY_VARIABLE} (or pass --api-key-file FILE), or listen on 127.0.0.1"
        )


def open_socket(host: str, port: int) -> socket.socket:
    """Bind now, so a taken port is a one-line error before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({err.strerror or err}). Fix: choose another --port or --host"
        ) from None
    return sock


def require_serving_extras(what: str) -> None:
    """The `serve` extra's packages (fastapi, uvicorn), which the server and the compare page need."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"{what} needs {' and '.join(missing)}, not installed here. "
            'Fix: pip install -c constraints.txt -e ".[serve]"'
        )


def base_url(host: str, sock: socket.socket) -> str:
    """`http://HOST:PORT` of a listening socket, an IPv6 address in brackets."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{sock.getsockname()[1]}"


def default_model_name(path: Path) -> str:
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def build_server(args: argparse.Namespace, key: str | None):
    """(app, model name): the model loaded and its worker ready to start with the app."""
    from trainer.generate import generate_all
    from trainer.loading import (
        inspect_checkpoint,
        load_checkpoint_model,
        load_checkpoint_tokenizer,
        position_limit,
        resolve_device,
    )
    from trainer.precision import resolve_dtype
    from trainer.serving.app import ServedModel, create_app
    from trainer.serving.embed import embed_rows
    from trainer.serving.worker import GenerationWorker

    info = inspect_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    tokenizer = load_checkpoint_tokenizer(info)
    model = load_checkpoint_model(info, resolve_dtype(args.dtype, device), base=args.base).to(device)
    # The worker thread uses `tokenizer`; the app encodes requests with its own copy (create_app).
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    worker = GenerationWorker(
        lambda rows: generate_all(model, tokenizer, rows, args.max_batch_size),
        args.max_batch_size,
        embed_batch=lambda rows: embed_rows(model, rows, pad_id or 0),
    )
    name = args.model_name or default_model_name(info.path)
    served = ServedModel(
        name,
        tokenizer,
        position_limit(model),
        hidden_size=model.config.hidden_size,
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    app = create_app(
        served,
        worker,
        token=key,
        max_rows_per_request=args.max_rows_per_request,
        embedding_pooling=args.embedding_pooling,
    )
    return app, name


@contextmanager
def serving_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve `app` with uvicorn on a background thread while the block runs (tests, benchmarks);
    yields the base URL. Port 0 takes a free one."""
    import uvicorn

    sock = open_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield base_url(host, sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for option in ("max_batch_size", "max_rows_per_request"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    require_serving_extras("serving")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args.checkpoint = checkpoint_from_args(args.checkpoint, args.best)
    key = read_api_key(args.api_key_file)
    check_exposure(args.host, key)
    sock = open_socket(args.host, args.port)
    try:
        app, name = build_server(args, key)
    except BaseException:
        sock.close()
        raise
    access = "API key required" if key else "no API key (loopback only)"
    print(
        f"serving {name} at {base_url(args.host, sock)} ({access}); POST /completions, /v1/completions, "
        "/v1/chat/completions, /v1/embeddings; GET /v1/models, /health",
        file=sys.stderr,
        flush=True,
    )
    serve_forever(app, sock, args.log_level)
    return 0


def serve_forever(app, sock: socket.socket, log_level: str) -> None:
    """Run uvicorn on the bound socket until it is stopped (Ctrl-C, SIGTERM)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
