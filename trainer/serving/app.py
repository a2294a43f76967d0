"""The FastAPI app: authentication, request checks, and the completion routes.

Routes: `POST /completions` (the seed's API), `POST /v1/completions` and `POST /v1/chat/completions`
(OpenAI's), `GET /v1/models`, and `GET /health`, the only one open without the token. Bodies are
read here (at most `max_body_bytes`), parsed as JSON (400 otherwise), checked against the schemas
(422 naming each wrong field and what it accepts) and against the model (400 for a prompt that
fills the context). Every error has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trainer.config import TestPrompt
from trainer.errors import UserError
from trainer.generate import Completion, Row, prompt_row
from trainer.serving.schemas import (
    OPENAI_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    SeedCompletionRequest,
    allowed_values,
    describe_errors,
)
from trainer.serving.worker import GenerationWorker

MAX_BODY_BYTES = 1 << 20
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
log = logging.getLogger("trainer.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class ClientGone(Exception):
    """The client closed the connection before its completions were ready."""


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
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
                    401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    kind="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
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


def create_app(served: ServedModel, worker: GenerationWorker, *, token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app; it starts and stops `worker` with its lifespan. `token` None: no authentication."""
    from contextlib import asynccontextmanager

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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):  # uvicorn logs the traceback
        return error_response(500, "internal server error; see the server log", kind="server_error")

    async def parse(request: Request, body_type: type[BaseModel]):
        body = await read_body(request, max_body_bytes)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({getattr(err, 'msg', err)}); send a JSON object "
                                "with the header 'Content-Type: application/json'") from None
        if not isinstance(data, dict):
            raise ApiError(422, f"the body must be a JSON object with the fields {', '.join(body_type.model_fields)}")
        try:
            parsed = body_type.model_validate(data)
        except ValidationError as err:
            message, field = describe_errors(err, body_type, served.context)
            raise ApiError(422, message, field) from None
        if getattr(parsed, "model", served.name) != served.name:
            raise ApiError(404, f"model '{parsed.model}' is not served here; this server serves '{served.name}' "
                                "(GET /v1/models)", "model", code="model_not_found")
        return parsed

    def check_length(body: BaseModel, field: str) -> None:
        value = getattr(body, field)
        if field in body.model_fields_set and value is not None and value > served.context:
            raise ApiError(422, f"{field}: {value} is too large; allowed: {allowed_values(served.context)[field]}", field)

    def rows_for(test_prompt: TestPrompt, n: int, seed: int | None, field: str) -> list[Row]:
        """`n` rows of one prompt (sample i seeded seed + i), encoded as training encodes it."""
        try:
            row = prompt_row(tokenizer, test_prompt, seed)
        except UserError as err:
            raise ApiError(400, str(err), field) from None
        if len(row.prompt_ids) >= served.context:
            raise ApiError(400, f"{field} is {len(row.prompt_ids)} tokens, but the model's context is {served.context} "
                                f"tokens: at most {served.context - 1} leave room for a completion", field,
                           code="context_length_exceeded")
        return [Row(row.test_prompt, row.prompt_ids, row.prompt_text, None if seed is None else seed + i) for i in range(n)]

    async def generate(request: Request, rows: list[Row]) -> list[Completion]:
        """The worker's completions; raises ClientGone if the client disconnects first."""
        work = asyncio.ensure_future(worker.submit(rows))
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            gone.cancel()
            try:
                return work.result()
            except Exception as err:  # the model failed (out of memory, a bug): this request fails, the server goes on
                log.exception("generation failed")
                raise ApiError(500, f"generation failed ({type(err).__name__}); see the server log", kind="server_error") from None
        work.cancel()  # frees the request's queued rows and stops its running ones
        raise ClientGone

    def usage(rows_per_prompt: list[list[Row]], completions: list[Completion]) -> dict:
        prompt_tokens = sum(len(rows[0].prompt_ids) for rows in rows_per_prompt)
        completion_tokens = sum(c.completion_tokens for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "trainer", "max_model_len": served.context}]}

    @app.post("/completions")
    async def seed_completions(request: Request):
        body = await parse(request, SeedCompletionRequest)
        check_length(body, "length")
        test_prompt = TestPrompt(prompt=body.text, max_new_tokens=body.length, stop=body.stop_sequences, **body.sampling)
        rows = rows_for(test_prompt, body.n, body.seed, "text")
        try:
            completions = await generate(request, rows)
        except ClientGone:
            return Response(status_code=499)
        return {"result": [{"completion": c.text} for c in completions], "timestamp": int(time.time()), "model": served.name}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        check_length(body, "max_tokens")
        per_prompt = [
            rows_for(TestPrompt(prompt=text, max_new_tokens=body.max_tokens or OPENAI_DEFAULT_MAX_TOKENS, stop=body.stop,
                                **body.sampling),
                     body.n, body.seed, "prompt")
            for text in body.prompts
        ]
        try:
            results = await generate(request, [row for rows in per_prompt for row in rows])
        except ClientGone:
            return Response(status_code=499)
        choices = [{"text": c.text, "index": i, "logprobs": None, "finish_reason": FINISH_REASONS[c.finish_reason]}
                   for i, c in enumerate(results)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.name, "choices": choices, "usage": usage(per_prompt, results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        check_length(body, "max_tokens")
        check_length(body, "max_completion_tokens")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        test_prompt = TestPrompt(messages=messages, max_new_tokens=body.token_limit or served.context,
                                 stop=body.stop, **body.sampling)
        rows = rows_for(test_prompt, body.n, body.seed, "messages")
        try:
            results = await generate(request, rows)
        except ClientGone:
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": FINISH_REASONS[c.finish_reason]} for i, c in enumerate(results)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served.name, "choices": choices, "usage": usage([rows], results)}

    app.add_middleware(BearerAuth, token=token)
    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes, also when no Content-Length says so."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the body is larger than {limit} bytes, this server's limit; send a shorter prompt or fewer prompts")
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
