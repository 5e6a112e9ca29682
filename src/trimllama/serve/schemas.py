"""The request body of `POST /v1/chat/completions`, and how it is checked.

OpenAI's chat format, plus one extension object `trim` (the OpenAI client sends it with
`extra_body={"trim": {...}}`):

    {"method": "headwise_topk", "head_k": 0.1, "budget": null, "merge_remainder": false,
     "trim_scoring_layer": false, ...any other setting of the method}

A `trim` object describes the trimming completely: `method` defaults to headwise_topk, and
`{"method": "none"}` asks for the untrimmed model. Without `trim` the server's default applies.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from ..errors import InvalidSettingError
from ..methods.base import check_seed
from .config import ServeConfig
from .errors import APIError, invalid

MAX_STOP_SEQUENCES = 4
DEFAULT_TRIM_METHOD = "headwise_topk"


class ImageURL(BaseModel):
    url: StrictStr
    detail: StrictStr | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None

    @property
    def parts(self) -> list:
        """The content as a list: a string content is one part (a str), no content none."""
        return [self.content] if isinstance(self.content, str) else self.content or []


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class TrimOptions(BaseModel):
    """Per-request trimming; unknown keys are settings of the method, checked against it."""

    model_config = ConfigDict(extra="allow")

    method: StrictStr = DEFAULT_TRIM_METHOD
    head_k: StrictInt | StrictFloat | None = None
    budget: StrictInt | None = None
    merge_remainder: StrictBool = False
    trim_scoring_layer: StrictBool | None = None

    @field_validator("head_k", mode="before")
    @classmethod
    def _count_or_fraction(cls, value: object) -> object:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError("head_k must be a number: an int count of tokens or a float fraction")
        return value


class ChatCompletionRequest(BaseModel):
    """The fields this server reads; other OpenAI fields are accepted and ignored."""

    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    logprobs: StrictBool | None = None
    trim: TrimOptions | None = None

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def has_images(self) -> bool:
        return any(isinstance(part, ImagePart) for message in self.messages for part in message.parts)

    @property
    def text_chars(self) -> int:
        """Characters of text in all messages."""
        parts = (part for message in self.messages for part in message.parts if not isinstance(part, ImagePart))
        return sum(len(part) if isinstance(part, str) else len(part.text) for part in parts)


def parse_request(body: bytes, config: ServeConfig) -> ChatCompletionRequest:
    """Parse and check a request body under `config`'s limits; an APIError (400, or 413 for too much text) names
    the first problem. Each step is bounded by the one before: the body's structure is counted in its bytes
    before `json.loads` builds anything, and messages and parts are counted before they are validated.

    A body at the default size limit takes tens of milliseconds to be refused, and a request within the limits
    well under a second to be read; call it off the event loop all the same.
    """
    _check_structure(body, config)
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:  # also nesting too deep, integers too long to convert
        raise invalid(f"the request body is not valid JSON ({error})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    _check_counts(data, config)
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise _first_validation_error(error) from None
    _check_supported(request)
    _check_text_length(request, config.max_text_chars)
    return request


def _structure_limit(config: ServeConfig) -> int:
    """Commas, braces and brackets a request body within `config`'s limits can hold: each text character may be
    one, each message and content part needs fewer than 16, and 4096 cover every other field."""
    return config.max_text_chars + 16 * (config.max_messages + config.max_content_parts) + 4096


def _check_structure(body: bytes, config: ServeConfig) -> None:
    """400 when the body has more JSON structure than `_structure_limit`: what `json.loads` builds (and its time
    and memory) grows with it, e.g. 3.2 s and 660 MB for the 10 million empty arrays of a 30 MB body."""
    count = sum(body.count(byte) for byte in (b",", b"{", b"["))
    limit = _structure_limit(config)
    if count > limit:
        raise invalid(
            f"the request body has {count} JSON separators and brackets, more than a request within the limits can "
            f"hold ({limit}: at most {config.max_messages} messages, {config.max_content_parts} content parts and "
            f"{config.max_text_chars} characters of text; --max-messages, --max-content-parts, --max-text-chars)",
            code="request_too_complex",
        )


def _refuse_constant(name: str) -> float:
    """NaN and Infinity are not JSON (Python's json module reads them by default)."""
    raise ValueError(f"{name} is not a JSON value")


def _check_counts(data: dict, config: ServeConfig) -> None:
    """400 when the raw body has more messages or content parts than the limits (before any validation)."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return
    if len(messages) > config.max_messages:
        raise invalid(
            f"'messages': {len(messages)} messages, more than the limit of {config.max_messages} per request "
            "(--max-messages)",
            "messages",
            "too_many_messages",
        )
    parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
    if parts > config.max_content_parts:
        raise invalid(
            f"'messages': {parts} content parts, more than the limit of {config.max_content_parts} per request, all "
            "messages together (--max-content-parts)",
            "messages",
            "too_many_content_parts",
        )


def _first_validation_error(error: ValidationError) -> Exception:
    """The most specific problem: the error located deepest (a union reports one error per member)."""
    details = error.errors(include_url=False)
    detail = max(details, key=lambda item: len(_location_parts(item["loc"])))
    param = _location(detail["loc"])
    if detail["type"] == "missing":
        return invalid(f"'{param}' is required", param, "missing_field")
    message = detail["msg"].removeprefix("Value error, ")
    return invalid(f"'{param}': {message} (got {shorten(_as_text(detail.get('input')))})", param, "invalid_value")


def _location_parts(loc: tuple) -> list:
    """Field names and indices of a pydantic location, without union member names and repeated tags."""
    parts = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool")):
            continue
        if parts and part == parts[-1] and isinstance(part, str):
            continue  # a tagged union's tag, followed by the field of the same name
        parts.append(part)
    return parts


def _location(loc: tuple) -> str:
    text = ""
    for part in _location_parts(loc):
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _as_text(value: object) -> str:
    return json.dumps(value) if not isinstance(value, BaseModel) else repr(value)


def shorten(text: str, limit: int = 60) -> str:
    """`text` from a request cut to `limit` characters for a message (a client may send megabytes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_supported(request: ChatCompletionRequest) -> None:
    if request.n != 1:
        raise invalid(f"'n': this server returns one choice per request, got n={request.n}", "n")
    if request.logprobs:
        raise invalid("'logprobs': log probabilities are not supported by this server", "logprobs")
    stops = request.stop_sequences
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"'stop': at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", "stop")
    if any(not stop for stop in stops):
        raise invalid("'stop': stop sequences must not be empty strings", "stop")
    if not any(message.role == "user" for message in request.messages):
        raise invalid("'messages': the conversation has no user message", "messages")
    if request.seed is not None:
        try:
            check_seed("seed", request.seed)
        except InvalidSettingError as error:
            raise invalid(f"'seed': {error}", "seed", "invalid_value") from None


def _check_text_length(request: ChatCompletionRequest, limit: int) -> None:
    """413 when the messages hold more than `limit` characters of text (before any tokenizing)."""
    total = request.text_chars
    if total > limit:
        raise APIError(
            413,
            f"'messages': {total} characters of text exceed the limit of {limit} characters per request "
            "(--max-text-chars)",
            param="messages",
            code="text_too_large",
        )
