"""The compare page's FastAPI app: the page, its JSON endpoints, and one thread that generates.

Routes: `GET /` (the page: no run data in it, so it is open like `/health`), `GET /health`, and
behind the token (trainer.serve's `BearerAuth`, constant-time compare) `GET /api/state` (the small
JSON the page polls: checkpoints, losses, task metrics, status, and a signature that changes when
anything shown changes), `GET /api/answers` (every checkpoint's answers to the test prompts),
`GET /api/plots` (loss and task-metric plots as PNG data URIs, drawn once per signature),
`GET /api/predictions` (validation examples with each checkpoint's prediction; `filter=all|wrong|
disagree`, `checkpoint=NAME` for `wrong`, `offset`, `limit`) and `POST /api/generate` (one
checkpoint's completion of a prompt or chat, with sampling parameters; trainer.generate's result).

Generation runs on one thread that owns every model (trainer/compare/models.py), so the page stays
responsive and two forward passes never overlap; requests for several checkpoints queue there.
Without a token the server listens on loopback only (trainer/serve.py's rules), and then it also
refuses requests addressed to any other host name (a web page that rebinds its own name to
127.0.0.1 cannot read the run) and POST bodies that are not `application/json` (a cross-site form
cannot start a generation). Errors have trainer.serve's shape, `{"error": {"message", ...}}`, and
name the field; nothing a client sends gets a 500.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from trainer.compare.folder import FILTERS, RunReader, answers, filter_predictions, prediction_table, test_prompts
from trainer.compare.models import CheckpointModels, PromptTooLong
from trainer.compare.page import render_page
from trainer.compare.plots import data_uri, plots, summaries
from trainer.config import TestPrompt
from trainer.errors import UserError
from trainer.layout import METRICS_FILE
from trainer.metrics import read_losses
from trainer.recommend import recommend
from trainer.serve import is_loopback
from trainer.serving.app import (
    MAX_BODY_BYTES,
    ApiError,
    BearerAuth,
    error_response,
    json_object,
    read_body,
    reading_client_input,
    redact_access_log,
)
from trainer.serving.schemas import MAX_STOPS, SEED_RANGE, ChatMessageIn, Stops, _Body

POLL_SECONDS = 3.0
MAX_PREDICTION_ROWS = 500  # per /api/predictions answer; the page pages through more
log = logging.getLogger("trainer.compare")


class GenerateRequest(_Body):
    """`POST /api/generate`: one checkpoint, a prompt or a chat, the test prompts' sampling fields."""

    checkpoint: str
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: Stops
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    """None: the run's training.seed, as `python -m trainer.generate` without --seed."""

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (text) or messages (a chat), exactly one of them")
        return self


ALLOWED = {
    "checkpoint": "a checkpoint's name, such as checkpoint-100 (GET /api/state lists them)",
    "prompt": "a string: the prompt, exactly as in training (include the separator)",
    "messages": 'a non-empty list of {"role": "system"|"user"|"assistant", "content": "..."}',
    "role": '"system", "user" or "assistant"',
    "content": 'a string, or a list of {"type": "text", "text": "..."}',
    "max_new_tokens": "an integer >= 1",
    "temperature": "a number >= 0 (0 is greedy)",
    "top_p": "a number in (0, 1]",
    "top_k": "an integer >= 0 (0 turns it off)",
    "stop": f"a string or a list of at most {MAX_STOPS} strings",
    "seed": f"an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, or null for the run's training.seed",
}


def describe_errors(err: ValidationError) -> tuple[str, str | None]:
    """(message, first field): every wrong field of a /api/generate body once, with what it takes."""
    problems: dict[str, str] = {}
    first = None
    for error in err.errors():
        # Keep field names and list indices; drop pydantic's union tags ("str", "list[str]").
        path = [
            part
            for part in error["loc"]
            if isinstance(part, int) or part in ALLOWED or error["type"] == "extra_forbidden"
        ]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "body"
        name = next((p for p in reversed(path) if isinstance(p, str)), None)
        first = first or (path[0] if path else None)
        if field in problems:
            continue
        if not path:
            problems[field] = error["msg"].removeprefix("Value error, ")
        elif error["type"] == "extra_forbidden":
            problems[field] = f"unknown field '{field}'; allowed fields: {', '.join(GenerateRequest.model_fields)}"
        elif error["type"] == "missing":
            problems[field] = f"{field} is required: {ALLOWED.get(name, 'a value')}"
        else:
            got = repr(error.get("input"))
            got = got if len(got) <= 40 else got[:37] + "..."
            problems[field] = (
                f"{field}: {error['msg'].removeprefix('Value error, ')} (got {got}); "
                f"allowed: {ALLOWED.get(name, 'see the README')}"
            )
    return "; ".join(problems.values()), first


class PageAuth(BearerAuth):
    """trainer.serve's token check; the page itself holds no run data and asks for the key."""

    OPEN_PATHS = ("/", "/health")


def request_host(scope) -> str:
    header = next((value for name, value in scope["headers"] if name == b"host"), b"").decode("latin-1")
    if header.startswith("["):  # [::1]:8000
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class LoopbackHostOnly:
    """ASGI middleware for a server without a token: answer only requests addressed to a loopback
    name, so that a page whose DNS name was rebound to 127.0.0.1 cannot read the run."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not is_loopback(request_host(scope)):
            response = error_response(
                421,
                "this server has no API key, so it answers only requests addressed to "
                "127.0.0.1 or localhost; open http://127.0.0.1:<port>/",
                code="not_loopback",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ApiError(422, f"{name}: {text!r} is not allowed; allowed: an integer from {low} to {high}", name)
    return value


def create_app(
    reader: RunReader,
    models: CheckpointModels,
    *,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    poll_seconds: float = POLL_SECONDS,
) -> FastAPI:
    """The app; its generation thread lives as long as the app's lifespan. `token` None: no
    authentication, and then only loopback host names are answered."""
    redact_access_log()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compare-generate")

    @asynccontextmanager
    async def lifespan(app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="trainer compare", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.reader, app.state.models = reader, models
    plots_lock = threading.Lock()
    plots_cache: dict[str, dict] = {}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.kind, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, err: ClientDisconnect):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):  # uvicorn logs the traceback
        return error_response(500, "internal server error; see the server log", kind="server_error")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(render_page(poll_seconds), headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    # Plain `def` routes read files: FastAPI runs them on its thread pool, off the event loop.

    @app.get("/api/state")
    def state():
        checkpoints = reader.checkpoints()
        recommendation = recommend(summaries(checkpoints))  # report.html's rule: best task metric, else eval loss
        metric_names = list(dict.fromkeys(name for c in checkpoints for name in c.metrics))  # the primary first
        return {
            "run": str(reader.path),
            "title": reader.path.name,
            "signature": reader.signature(checkpoints),
            "status": reader.status(),
            "checkpoints": [c.summary() for c in checkpoints],
            "best": recommendation.checkpoint if recommendation else None,
            "why": recommendation.why if recommendation else None,
            "metric_names": metric_names,
            "predictions": any(c.predictions is not None for c in checkpoints),
        }

    @app.get("/api/answers")
    def answers_route():
        checkpoints = reader.checkpoints()
        prompts = test_prompts(reader.config(), checkpoints)
        return {
            "signature": reader.signature(checkpoints),
            "prompts": prompts,
            "answers": {c.name: answers(c, len(prompts)) for c in checkpoints},
        }

    @app.get("/api/plots")
    def plots_route():
        checkpoints = reader.checkpoints()
        signature = reader.signature(checkpoints)
        with plots_lock:  # several pages polling draw each version once
            if signature not in plots_cache:
                drawn = {"signature": signature, "loss": None, "metrics": None, "error": None}
                try:
                    loss, metrics = plots(read_losses(reader.path / METRICS_FILE), checkpoints)
                    drawn["loss"], drawn["metrics"] = data_uri(loss), data_uri(metrics) if metrics else None
                except Exception as err:  # a picture is not worth the page: the rest still shows
                    log.exception("drawing the plots failed")
                    drawn["error"] = f"{type(err).__name__}: {err}"
                plots_cache.clear()
                plots_cache[signature] = drawn
            return plots_cache[signature]

    @app.get("/api/predictions")
    def predictions(request: Request):
        how = request.query_params.get("filter") or "all"
        if how not in FILTERS:
            raise ApiError(422, f"filter: {how!r} is not a filter; allowed: {', '.join(FILTERS)}", "filter")
        checkpoints = reader.checkpoints()
        names, rows = prediction_table(checkpoints)
        chosen = request.query_params.get("checkpoint") or None
        if chosen is not None and chosen not in names:
            raise ApiError(
                422,
                f"checkpoint: {chosen!r} has no predictions; allowed: {', '.join(names) or 'none yet'}",
                "checkpoint",
            )
        offset = _query_int(request, "offset", 0, 0, 10**9)
        limit = _query_int(request, "limit", 100, 1, MAX_PREDICTION_ROWS)
        for index, row in enumerate(rows, start=1):
            row["index"] = index
        matching = filter_predictions(rows, how, chosen)
        return {
            "signature": reader.signature(checkpoints),
            "checkpoints": names,
            "filter": how,
            "checkpoint": chosen,
            "total": len(rows),
            "matching": len(matching),
            "offset": offset,
            "limit": limit,
            "rows": matching[offset : offset + limit],
        }

    @app.post("/api/generate")
    async def generate(request: Request):
        body = await parse(request)
        checkpoint = await asyncio.to_thread(reader.checkpoint, body.checkpoint)
        if checkpoint is None:
            names = [c.name for c in await asyncio.to_thread(reader.checkpoints)]
            raise ApiError(
                404,
                f"checkpoint: there is no {body.checkpoint!r} in {reader.path}; there are: "
                f"{', '.join(names) or 'none yet'}",
                "checkpoint",
                code="checkpoint_not_found",
            )
        field = "prompt" if body.prompt is not None else "messages"
        try:
            with reading_client_input(field):
                test_prompt = TestPrompt(
                    prompt=body.prompt,
                    max_new_tokens=body.max_new_tokens,
                    stop=body.stop,
                    **body.sampling,
                    messages=None
                    if body.messages is None
                    else [{"role": m.role, "content": m.text} for m in body.messages],
                )
        except ValidationError as err:  # never expected: the schema checks what TestPrompt checks
            raise ApiError(422, f"{field}: {err.errors()[0]['msg']}", field) from None
        started = time.perf_counter()
        try:
            row, completion = await asyncio.get_running_loop().run_in_executor(
                executor, models.complete, checkpoint, test_prompt, body.seed
            )
        except PromptTooLong as err:
            raise ApiError(400, str(err), field, code="context_length_exceeded") from None
        except UserError as err:  # the checkpoint cannot be loaded (its base model is missing, ...)
            raise ApiError(400, str(err), "checkpoint", code="checkpoint_unusable") from None
        except Exception as err:  # the model failed (out of memory, a bug): this request fails, the page goes on
            log.exception("generation failed")
            raise ApiError(
                500, f"generation failed ({type(err).__name__}); see the server log", kind="server_error"
            ) from None
        return {
            "checkpoint": checkpoint.name,
            "completion": completion.text,
            "finish_reason": completion.finish_reason,
            "completion_tokens": completion.completion_tokens,
            "prompt_tokens": len(row.prompt_ids),
            "prompt_text": row.prompt_text,
            "seed": row.seed,
            "seconds": round(time.perf_counter() - started, 3),
        }

    async def parse(request: Request) -> GenerateRequest:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, "send the body as JSON with the header 'Content-Type: application/json'")
        body = await read_body(request, max_body_bytes)
        with reading_client_input():
            data = json_object(body, GenerateRequest)
            try:
                return GenerateRequest.model_validate(data)
            except ValidationError as err:
                message, field = describe_errors(err)
                raise ApiError(422, message, field) from None

    app.add_middleware(PageAuth, token=token)
    if token is None:
        app.add_middleware(LoopbackHostOnly)
    return app
