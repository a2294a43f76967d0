"""Request bodies the server accepts, and error messages that name the field and its allowed range.

Four bodies: the seed's completion request (`POST /completions`: text, length, temperature, top_p,
top_k, stop_sequences or its alias stop_tokens, n), OpenAI's completion request, OpenAI's chat
completion request (both may ask for `stream: true`) and OpenAI's embedding request. Unknown fields
are rejected by name. OpenAI fields this server has no use for are accepted only at their neutral
value (`presence_penalty: 0`, ...), so a client that sends defaults works and one that asks for
something else is told it is not supported.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16
MAX_STOPS = 16
SEED_RANGE = (-(2**63), 2**63 - MAX_N)  # sample i is seeded seed + i, and torch takes a 64-bit seed
SEED_DEFAULT_LENGTH = 64  # the test prompts' default max_new_tokens
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _neutral(*allowed: Any):
    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise ValueError("not supported by this server")
        return value

    return AfterValidator(check)


Stops = Annotated[str | list[str] | None, Field(None, validate_default=True)]


class _Body(BaseModel):
    # strict: "0.5" is not a number, true is not an integer; NaN and Infinity (which Python's json
    # reads) are no temperature
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("stop", "stop_sequences", "stop_tokens", mode="after", check_fields=False)
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return [stop for stop in stops if stop]  # an empty one would cut every completion at once

    @property
    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


class SeedCompletionRequest(_Body):
    """`POST /completions`, the hosted API of the seed documents (temperature 0 here means greedy)."""

    text: str
    length: int = Field(SEED_DEFAULT_LENGTH, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop_sequences: Stops
    stop_tokens: Stops
    """The seed document's own example body calls stop_sequences this; either name, not both."""
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])

    @model_validator(mode="after")
    def _one_stop_name(self):
        if self.stop_sequences and self.stop_tokens:
            raise ValueError("give stop_sequences or stop_tokens (the same field), not both")
        return self

    @property
    def stops(self) -> list[str]:
        return self.stop_sequences or self.stop_tokens


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    """A last chunk with `usage` and no choices, as OpenAI's."""


class _OpenAIBody(_Body):
    model: str
    temperature: float = Field(1.0, ge=0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension (vLLM has it too); 0 is off
    stop: Stops
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float | None, _neutral(0)] = None
    frequency_penalty: Annotated[float | None, _neutral(0)] = None
    logit_bias: Annotated[dict | None, _neutral({})] = None


class CompletionRequest(_OpenAIBody):
    """`POST /v1/completions`."""

    prompt: str | list[str]
    max_tokens: int | None = Field(OPENAI_DEFAULT_MAX_TOKENS, ge=1)
    echo: Annotated[bool | None, _neutral(False)] = None
    logprobs: Annotated[int | None, _neutral(0)] = None
    best_of: Annotated[int | None, _neutral(1)] = None
    suffix: Annotated[str | None, _neutral("")] = None

    @field_validator("prompt", mode="after")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list holds no prompt")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_OpenAIBody):
    """`POST /v1/chat/completions`; no max_tokens means the rest of the context, as OpenAI's."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Annotated[bool | None, _neutral(False)] = None
    top_logprobs: Annotated[int | None, _neutral(0)] = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(_Body):
    """`POST /v1/embeddings`: one vector per input, pooled from the last hidden states."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    pooling: Literal["mean", "last"] | None = None
    """An extension: "mean" (every token's last hidden state, averaged) or "last" (the last token's);
    None: the server's --embedding-pooling."""

    @field_validator("input", mode="after")
    @classmethod
    def _some_input(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty list holds no input")
        return value

    @property
    def inputs(self) -> list[str | list[int]]:
        """Each input: a string, or a list of token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, int) for item in self.input):
            return [self.input]
        return list(self.input)


def allowed_values(limit: int) -> dict[str, str]:
    """What each field accepts, for error messages; `limit` is the model's context in tokens."""
    tokens = f"an integer from 1 to {limit} (the model's context)"
    return {
        "text": "a string: the prompt, exactly as in training",
        "prompt": "a string or a non-empty list of strings",
        "input": "a string, a non-empty list of strings, a list of token ids, or a list of lists of token ids",
        "encoding_format": '"float" or "base64"',
        "dimensions": "the model's hidden size (vectors are not shortened)",
        "pooling": '"mean" or "last"',
        "include_usage": "true or false",
        "model": "a string: the served model's name (GET /v1/models)",
        "messages": 'a non-empty list of {"role": "system"|"user"|"assistant", "content": "..."}',
        "role": '"system", "user" or "assistant"',
        "content": 'a string, or a list of {"type": "text", "text": "..."}',
        "length": tokens,
        "max_tokens": tokens,
        "max_completion_tokens": tokens,
        "temperature": "a number >= 0 (0 is greedy)",
        "top_p": "a number in (0, 1]",
        "top_k": "an integer >= 0 (0 turns it off)",
        "n": f"an integer from 1 to {MAX_N}",
        "seed": f"an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}",
        "stop": f"a string or a list of at most {MAX_STOPS} strings",
        "stop_sequences": f"a string or a list of at most {MAX_STOPS} strings",
        "stop_tokens": f"a string or a list of at most {MAX_STOPS} strings (an alias of stop_sequences)",
        "user": "a string",
        "stream": "true or false",
        "echo": "false",
        "logprobs": "null (not supported)",
        "top_logprobs": "null (not supported)",
        "best_of": "1",
        "suffix": "null (not supported)",
        "stream_options": '{"include_usage": true|false}',
        "presence_penalty": "0 (not supported)",
        "frequency_penalty": "0 (not supported)",
        "logit_bias": "null (not supported)",
    }


def describe_errors(err: ValidationError, body_type: type[BaseModel], limit: int) -> tuple[str, str | None]:
    """(message, first field) for a rejected body: every wrong field once, with what it accepts."""
    allowed = allowed_values(limit)
    problems: dict[str, str] = {}
    first: str | None = None
    for error in err.errors():
        path, union = _path(error["loc"], allowed, body_type)
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".") or "body"
        name = next((part for part in reversed(path) if isinstance(part, str)), None)
        first = first or (path[0] if path else None)
        if field in problems:
            continue  # a union's alternatives each fail: one message per field
        if not path:  # a check across fields (model_validator): its message says it all
            problems[field] = error["msg"].removeprefix("Value error, ")
            continue
        if error["type"] == "extra_forbidden" and not union:
            fields = ", ".join(body_type.model_fields) if len(path) == 1 else None
            problems[field] = f"unknown field '{field}'" + (f"; allowed fields: {fields}" if fields else "")
        elif error["type"] == "missing" and not union:
            problems[field] = f"{field} is required: {allowed.get(name, 'a value')}"
        else:
            reason = "invalid value" if union else error["msg"].removeprefix("Value error, ")
            got = repr(error.get("input"))
            got = got if len(got) <= 40 else got[:37] + "..."
            problems[field] = f"{field}: {reason} (got {got}); allowed: {allowed.get(name, 'see the README')}"
    return "; ".join(problems.values()), first


def _path(loc: tuple, allowed: dict, body_type: type[BaseModel]) -> tuple[list, bool]:
    """The field path of an error location, up to the first union member tag (`str`, `list[str]`);
    and whether there was one."""
    path: list = []
    for part in loc:
        if isinstance(part, str) and part not in allowed and part not in body_type.model_fields and path:
            parent_is_index = isinstance(path[-1], int)
            if not parent_is_index:  # a tag such as 'list[TextPart]' after a field name
                return path, True
        path.append(part)
    return path, False
