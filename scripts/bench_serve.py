"""Load-test the server: many concurrent completion requests on loopback; throughput and latency.

    python scripts/bench_serve.py                                   # examples/tiny-gpt2, 64 requests at once
    python scripts/bench_serve.py --max-batch-size 1                # the same, without dynamic batching
    python scripts/bench_serve.py runs/x/checkpoint-100 --requests 256 --concurrency 32 --json serve.json
    python scripts/bench_serve.py --big-request 64                  # fairness: one 64-prompt request among them

The model is loaded and served exactly as `python -m trainer.serve` does (same app, same worker),
on a free loopback port in this process; the requests come from an asyncio client (httpx) here too,
so client and server share the machine. Each request is `POST /v1/completions` with one prompt,
`max_tokens` new tokens, greedy (`temperature 0`). After one warm-up request, `--requests` requests
are sent with at most `--concurrency` in flight; each one's latency is measured from sending to the
full response. Printed: requests/s, completion tokens/s, latency p50/p90/p99/max, and how the worker
batched the rows (batches, largest batch). With `--big-request N`, one request of N prompts is sent
just before the others (the server's --max-rows-per-request is raised to N): the worker's round-robin
batches should keep the small requests' latency near what it is without it, while the big request
finishes last (`big_request_latency_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "examples" / "tiny-gpt2"
PROMPTS = [
    (
        "List the locations mentioned in the following text.\n"
        "Text: The train from Tokyo to Berlin was delayed by two hours.\nLocations:"
    ),
    (
        "List the locations mentioned in the following text.\n"
        "Text: Maria spent the summer in Lisbon with friends.\nLocations:"
    ),
    (
        "List the locations mentioned in the following text.\n"
        "Text: David finished the report on Friday morning.\nLocations:"
    ),
    (
        "List the locations mentioned in the following text.\n"
        "Text: Heavy rain caused flooding in Cairo on Monday.\nLocations:"
    ),
    "List the locations mentioned in the following text.\nText: Anna lives in Dublin but works in London.\nLocations:",
    "Hello",
    "The",
    "List the locations",
]
BENCH_KEY = "bench-key"


@dataclass
class Answer:
    seconds: float
    status: int
    body: dict


async def send_all(
    url: str, key: str | None, bodies: list[dict], concurrency: int, path: str = "/v1/completions", timeout: float = 300
) -> list[Answer]:
    """POST every body to `url + path`, at most `concurrency` at once; answers in the bodies' order."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:

        async def one(body: dict) -> Answer:
            async with gate:
                started = time.perf_counter()
                response = await client.post(path, json=body)
                return Answer(time.perf_counter() - started, response.status_code, response.json())

        return await asyncio.gather(*(one(body) for body in bodies))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))]


def summarize(answers: list[Answer], seconds: float) -> dict:
    latencies = [a.seconds for a in answers]
    tokens = sum(a.body.get("usage", {}).get("completion_tokens", 0) for a in answers if a.status == 200)
    return {
        "requests": len(answers),
        "ok": sum(a.status == 200 for a in answers),
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(answers) / seconds, 2),
        "completion_tokens": tokens,
        "completion_tokens_per_second": round(tokens / seconds, 1),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p90_s": round(percentile(latencies, 90), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "latency_max_s": round(max(latencies), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint",
        nargs="?",
        default=str(DEFAULT_MODEL),
        help="checkpoint or export to serve (default: examples/tiny-gpt2, random weights)",
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--big-request",
        type=int,
        default=0,
        metavar="N",
        help="also send one request of N prompts first, to measure fairness (default: none)",
    )
    parser.add_argument("--json", metavar="OUT", help="write every number, the command and the machine here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from trainer.errors import UserError
    from trainer.serve import build_parser as serve_parser
    from trainer.serve import build_server, serving_in_thread

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        app, name = build_server(
            serve_parser().parse_args(
                [
                    args.checkpoint,
                    "--max-batch-size",
                    str(args.max_batch_size),
                    "--max-rows-per-request",
                    str(max(64, args.big_request)),
                ]
            ),
            BENCH_KEY,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    bodies = [
        {"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0}
        for i in range(args.requests)
    ]
    with serving_in_thread(app) as url:
        asyncio.run(send_all(url, BENCH_KEY, bodies[:1], 1))  # warm-up
        worker = app.state.worker
        batches_before, rows_before = worker.stats.batches, worker.stats.rows
        big = {
            "model": name,
            "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(args.big_request)],
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }

        async def send_with_big() -> tuple[list[Answer], Answer | None]:
            if not args.big_request:
                return await send_all(url, BENCH_KEY, bodies, args.concurrency), None
            big_answer = asyncio.ensure_future(send_all(url, BENCH_KEY, [big], 1))
            await asyncio.sleep(0.05)  # the big request is queued first
            small = await send_all(url, BENCH_KEY, bodies, args.concurrency)
            return small, (await big_answer)[0]

        started = time.perf_counter()
        answers, big_answer = asyncio.run(send_with_big())
        seconds = time.perf_counter() - started
        result = summarize(answers, seconds) | {
            "batches": worker.stats.batches - batches_before,
            "rows": worker.stats.rows - rows_before,
            "largest_batch": worker.stats.largest_batch,
        }
        if big_answer is not None:
            result |= {
                "big_request_rows": args.big_request,
                "big_request_status": big_answer.status,
                "big_request_latency_s": round(big_answer.seconds, 3),
            }
    print(
        f"{name}: {args.requests} requests, {args.concurrency} concurrent, max batch {args.max_batch_size}, "
        f"{args.max_tokens} tokens each, torch threads {torch.get_num_threads()}"
    )
    for key, value in result.items():
        print(f"  {key:30s} {value}")
    if args.json:
        record = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "options": vars(args),
            "result": result,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0 if result["ok"] == result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
