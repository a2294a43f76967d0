"""The FastAPI app: authentication, request checks, and the completion and embedding routes.

Routes: `POST /completions` (the seed's API), `POST /v1/completions`, `POST /v1/chat/completions`
(both may stream server-sent events) and `POST /v1/embeddings` (OpenAI's), `GET /v1/models`, and
`GET /health`, the only one open without the token. Bodies are read here (at most `max_body_bytes`),
parsed as JSON (400 otherwise, also for text that is not valid Unicode or nesting too deep to read),
checked against the schemas (422 naming each wrong field and what it accepts), against the row cap
(422 past `max_rows_per_request` completions or inputs) and against the model (400 for a prompt that
fills the context). Anything else that goes wrong while reading a client's request is a 400, never a
500: a 500 means the server failed. Every error has OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`. Uvicorn's access log is given paths without their
query strings, so a key sent as `?api_key=...` is never written to a log.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from trainer.config import TestPrompt
from trainer.errors import UserError
from trainer.generate import Completion, Row, prompt_row
from trainer.serving.embed import POOLINGS, EmbeddingRow
from trainer.serving.schemas import (
    OPENAI_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SeedCompletionRequest,
    allowed_values,
    describe_errors,
)
from trainer.serving.worker import GenerationWorker

MAX_BODY_BYTES = 1 << 20
MAX_ROWS_PER_REQUEST = 64  # completions (prompts x n) or embedding inputs in one request
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
log = logging.getLogger("trainer.serve")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class ClientGone(Exception):
    """The client closed the connection before its completions were ready."""


class QueryRedactingFilter(logging.Filter):
    """Uvicorn's access log line names the request's path with its query string, where a client may
    have put its key (`?api_key=...`): keep the path, replace the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].partition("?")[0] + "?<redacted>", *args[3:])
        return True


def redact_access_log() -> None:
    """Install QueryRedactingFilter on uvicorn's access logger (once). A logger filter, not a
    formatter, so that it holds whatever logging configuration uvicorn or the user sets."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryRedactingFilter) for f in access.filters):
        access.addFilter(QueryRedactingFilter())


def invalid_text_path(data) -> str | None:
    """The path of the first string (or key) in parsed JSON that is not valid Unicode text (a lone
    surrogate such as "\\ud800", which JSON allows and tokenizers cannot take); walked without
    recursion."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{path}.<a field name>".lstrip("."), key))  # the key itself may be the bad text
                stack.append((f"{path}.{key}".lstrip("."), item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


@contextmanager
def reading_client_input(field: str | None = None):
    """Anything unexpected that fails while reading a client's request is the request's problem (a
    400 naming the field), not the server's (a 500)."""
    try:
        yield
    except (ApiError, ClientDisconnect):
        raise
    except RecursionError:
        raise ApiError(
            400, "the body is nested too deeply to read; send a JSON object of the documented shape", field
        ) from None
    except Exception as err:
        log.warning("refused a request that could not be read (%s: %s)", type(err).__name__, str(err)[:200])
        raise ApiError(
            400,
            f"{field or 'the body'} could not be read ({type(err).__name__}); send valid JSON text "
            "of the documented shape",
            field,
        ) from None


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    # Escape what is not valid Unicode (a client's lone surrogate, echoed): the JSON must stay encodable.
    message, param = (
        text.encode("utf-8", "backslashreplace").decode("utf-8") if text else text for text in (message, param)
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BearerAuth:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <token>`, compared in
    constant time. With no token configured (loopback only, see trainer/serve.py) it lets all in."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.token and scope["path"] not in self.OPEN_PATHS:
            header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            scheme, _, given = header.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)):
                response = error_response(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    kind="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class ServedModel:
    """What the routes need to know about the model; the worker holds the model itself."""

    name: str
    tokenizer: object  # copied for the event loop thread: a fast tokenizer is not shared across threads
    context: int  # positions the model attends over: prompt + completion tokens
    hidden_size: int | None = None  # the embeddings' length; None: no /v1/embeddings
    vocab_size: int | None = None  # token ids a client may send to /v1/embeddings are below it


def json_object(body: bytes, body_type: type[BaseModel]) -> dict:
    """A request body as a JSON object whose text is valid Unicode, or the ApiError that says what
    is wrong with it (400 not JSON or a lone surrogate, 422 not an object). Pydantic validates the
    fields next."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(
            400,
            f"the body is not valid JSON ({getattr(err, 'msg', err)}); send a JSON object "
            "with the header 'Content-Type: application/json'",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the body must be a JSON object with the fields {', '.join(body_type.model_fields)}")
    bad_text = invalid_text_path(data)
    if bad_text is not None:
        raise ApiError(
            400,
            f"{bad_text}: holds a lone UTF-16 surrogate (such as \\ud800), which is not valid "
            "Unicode text; send text as valid UTF-8 (or escape whole surrogate pairs)",
            bad_text,
        )
    return data


def create_app(
    served: ServedModel,
    worker: GenerationWorker,
    *,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_rows_per_request: int = MAX_ROWS_PER_REQUEST,
    embedding_pooling: str = "mean",
) -> FastAPI:
    """The app; it starts and stops `worker` with its lifespan. `token` None: no authentication.
    `embedding_pooling` is /v1/embeddings' default (a request's `pooling` overrides it)."""
    from contextlib import asynccontextmanager

    if embedding_pooling not in POOLINGS:
        raise ValueError(f"embedding_pooling must be one of {POOLINGS}")
    redact_access_log()

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="trainer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker, app.state.served = worker, served
    created = int(time.time())
    tokenizer = copy.deepcopy(served.tokenizer)  # never shared with the worker thread

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.kind, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), kind="invalid_request_error")

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, err: ClientDisconnect):
        # A client's doing, and nobody is left to answer: one line, no traceback. The path only: a
        # query string may hold a key.
        log.warning("%s %s: the client disconnected before sending the whole body", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):  # uvicorn logs the traceback
        return error_response(500, "internal server error; see the server log", kind="server_error")

    async def parse(request: Request, body_type: type[BaseModel]):
        body = await read_body(request, max_body_bytes)
        with reading_client_input():
            data = json_object(body, body_type)
            try:
                parsed = body_type.model_validate(data)
            except ValidationError as err:
                message, field = describe_errors(err, body_type, served.context)
                raise ApiError(422, message, field) from None
        if getattr(parsed, "model", served.name) != served.name:
            raise ApiError(
                404,
                f"model '{parsed.model}' is not served here; this server serves '{served.name}' (GET /v1/models)",
                "model",
                code="model_not_found",
            )
        return parsed

    def check_rows(count: int, field: str, what: str) -> None:
        """The row cap: one request may not hold the worker (and every other client) for long."""
        if count > max_rows_per_request:
            raise ApiError(
                422,
                f"{field}: this request asks for {count} {what}, more than this server's limit of "
                f"{max_rows_per_request} per request (--max-rows-per-request); send them in smaller "
                "requests",
                field,
                code="too_many_rows",
            )

    def check_length(body: BaseModel, field: str) -> None:
        value = getattr(body, field)
        if field in body.model_fields_set and value is not None and value > served.context:
            raise ApiError(
                422, f"{field}: {value} is too large; allowed: {allowed_values(served.context)[field]}", field
            )

    def make_test_prompt(field: str, **fields) -> TestPrompt:
        """The schemas check what TestPrompt checks; should they ever differ, it is still the client's 400."""
        with reading_client_input(field):
            return TestPrompt(**fields)

    def rows_for(test_prompt: TestPrompt, n: int, seed: int | None, field: str) -> list[Row]:
        """`n` rows of one prompt (sample i seeded seed + i), encoded as training encodes it."""
        try:
            with reading_client_input(field):
                row = prompt_row(tokenizer, test_prompt, seed)
        except UserError as err:
            raise ApiError(400, str(err), field) from None
        if len(row.prompt_ids) >= served.context:
            raise ApiError(
                400,
                f"{field} is {len(row.prompt_ids)} tokens, but the model's context is {served.context} "
                f"tokens: at most {served.context - 1} leave room for a completion",
                field,
                code="context_length_exceeded",
            )
        return [
            Row(row.test_prompt, row.prompt_ids, row.prompt_text, None if seed is None else seed + i) for i in range(n)
        ]

    async def generate(request: Request, rows: list[Row]) -> list[Completion]:
        """The worker's completions; raises ClientGone if the client disconnects first."""
        return await run_job(request, worker.submit(rows))

    async def run_job(request: Request, job):
        """The worker's results of `job` (a coroutine); raises ClientGone if the client disconnects first."""
        work = asyncio.ensure_future(job)
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            gone.cancel()
            try:
                return work.result()
            except Exception as err:  # the model failed (out of memory, a bug): this request fails, the server goes on
                log.exception("generation failed")
                raise ApiError(
                    500, f"generation failed ({type(err).__name__}); see the server log", kind="server_error"
                ) from None
        work.cancel()  # frees the request's queued rows and stops its running ones
        raise ClientGone

    def usage(rows_per_prompt: list[list[Row]], completions: list[Completion]) -> dict:
        prompt_tokens = sum(len(rows[0].prompt_ids) for rows in rows_per_prompt)
        completion_tokens = sum(c.completion_tokens for c in completions)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "trainer",
                    "max_model_len": served.context,
                }
            ],
        }

    @app.post("/completions")
    async def seed_completions(request: Request):
        body = await parse(request, SeedCompletionRequest)
        check_length(body, "length")
        test_prompt = make_test_prompt(
            "text", prompt=body.text, max_new_tokens=body.length, stop=body.stops, **body.sampling
        )
        check_rows(body.n, "n", "completions")
        rows = rows_for(test_prompt, body.n, body.seed, "text")
        try:
            completions = await generate(request, rows)
        except ClientGone:
            return Response(status_code=499)
        return {
            "result": [{"completion": c.text} for c in completions],
            "timestamp": int(time.time()),
            "model": served.name,
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        check_length(body, "max_tokens")
        check_rows(len(body.prompts) * body.n, "prompt", f"completions ({len(body.prompts)} prompts x n={body.n})")
        per_prompt = [
            rows_for(
                make_test_prompt(
                    "prompt",
                    prompt=text,
                    max_new_tokens=body.max_tokens or OPENAI_DEFAULT_MAX_TOKENS,
                    stop=body.stop,
                    **body.sampling,
                ),
                body.n,
                body.seed,
                "prompt",
            )
            for text in body.prompts
        ]
        created, request_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        if body.stream:

            def chunk(index: int, text: str | None, finish_reason: str | None) -> dict:
                return {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": served.name,
                    "choices": [{"text": text or "", "index": index, "logprobs": None, "finish_reason": finish_reason}],
                }

            return stream(request, per_prompt, chunk, request_id, created, body.stream_options)
        try:
            results = await generate(request, [row for rows in per_prompt for row in rows])
        except ClientGone:
            return Response(status_code=499)
        choices = [
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": FINISH_REASONS[c.finish_reason]}
            for i, c in enumerate(results)
        ]
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": served.name,
            "choices": choices,
            "usage": usage(per_prompt, results),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        check_length(body, "max_tokens")
        check_length(body, "max_completion_tokens")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        test_prompt = make_test_prompt(
            "messages",
            messages=messages,
            max_new_tokens=body.token_limit or served.context,
            stop=body.stop,
            **body.sampling,
        )
        check_rows(body.n, "n", "completions")
        rows = rows_for(test_prompt, body.n, body.seed, "messages")
        created, request_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:

            def chunk(index: int, text: str | None, finish_reason: str | None) -> dict:
                # text None: the first chunk, which names the role (as OpenAI's)
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                return {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": served.name,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                }

            return stream(request, [rows], chunk, request_id, created, body.stream_options, role_chunk=True)
        try:
            results = await generate(request, rows)
        except ClientGone:
            return Response(status_code=499)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": FINISH_REASONS[c.finish_reason],
            }
            for i, c in enumerate(results)
        ]
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": served.name,
            "choices": choices,
            "usage": usage([rows], results),
        }

    def stream(
        request: Request,
        rows_per_prompt: list[list[Row]],
        chunk,
        request_id: str,
        created: int,
        options,
        role_chunk: bool = False,
    ) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. The worker
        generates these rows as it does any others; each row's text arrives as it is generated
        (Row.on_text, the same tokens as the finished completion), and its last chunk carries what
        was still held back plus the finish reason, so the chunks add up to the non-streamed text."""
        rows = [row for rows in rows_per_prompt for row in rows]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(rows):
            row.on_text = lambda text, index=index: loop.call_soon_threadsafe(events.put_nowait, ("text", index, text))

        async def sse():
            # Delivery order: a row's texts, then its result (the same thread, FIFO), then the job's end.
            work = asyncio.ensure_future(worker.submit(rows, on_result=lambda i, c: events.put_nowait(("done", i, c))))
            work.add_done_callback(lambda _: events.put_nowait(("end", None, None)))
            sent, results = [""] * len(rows), [None] * len(rows)
            try:
                if role_chunk:
                    for index in range(len(rows)):
                        yield event(chunk(index, None, None))
                while True:
                    kind, index, value = await events.get()
                    if kind == "text":
                        sent[index] += value
                        yield event(chunk(index, value, None))
                    elif kind == "done":
                        results[index] = value
                        if not value.text.startswith(sent[index]):  # never expected: RowTextStreamer sends a prefix
                            log.warning("streamed text of %s row %d differs from its completion", request_id, index)
                        yield event(chunk(index, value.text[len(sent[index]) :], FINISH_REASONS[value.finish_reason]))
                    else:
                        break
                if work.exception() is not None:
                    log.error("generation failed", exc_info=work.exception())
                    yield event(
                        {
                            "error": {
                                "message": f"generation failed ({type(work.exception()).__name__}); see the server log",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                    return
                if options is not None and options.include_usage:
                    yield event(
                        {
                            "id": request_id,
                            "object": chunk(0, "", None)["object"],
                            "created": created,
                            "model": served.name,
                            "choices": [],
                            "usage": usage(rows_per_prompt, results),
                        }
                    )
                yield "data: [DONE]\n\n"
            finally:
                if not work.done():  # the client went away: free its queued rows, stop its running ones
                    work.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await parse(request, EmbeddingRequest)
        if worker.embed_batch is None or served.hidden_size is None:
            raise ApiError(404, "this server does not serve embeddings", code="not_found")
        if body.dimensions is not None and body.dimensions != served.hidden_size:
            raise ApiError(
                422,
                f"dimensions: {body.dimensions} is not supported; allowed: {served.hidden_size} (the "
                "model's hidden size; vectors are not shortened) or leave it out",
                "dimensions",
            )
        inputs = body.inputs
        check_rows(len(inputs), "input", "embeddings")
        pooling = body.pooling or embedding_pooling
        rows = []
        for index, item in enumerate(inputs):
            field = "input" if len(inputs) == 1 else f"input[{index}]"
            with reading_client_input(field):
                ids = tokenizer(item)["input_ids"] if isinstance(item, str) else list(item)
            if not ids:
                raise ApiError(400, f"{field} is empty: there is no token to embed; send some text", field)
            if served.vocab_size is not None and not all(0 <= i < served.vocab_size for i in ids):
                raise ApiError(
                    400, f"{field} holds token ids outside 0..{served.vocab_size - 1}, the model's vocabulary", field
                )
            if len(ids) > served.context:
                raise ApiError(
                    400,
                    f"{field} is {len(ids)} tokens, but the model's context is {served.context} tokens",
                    field,
                    code="context_length_exceeded",
                )
            rows.append(EmbeddingRow(ids, pooling))
        try:
            vectors = await run_job(request, worker.embed(rows))
        except ClientGone:
            return Response(status_code=499)

        def encoded(vector):
            if body.encoding_format == "base64":  # little-endian float32, as OpenAI's
                return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            return vector.tolist()

        data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
        tokens = sum(len(row.ids) for row in rows)
        return {
            "object": "list",
            "data": data,
            "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    app.add_middleware(BearerAuth, token=token)
    return app


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes, also when no Content-Length says so."""
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413, f"the body is larger than {limit} bytes, this server's limit; send a shorter prompt or fewer prompts"
    )
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
