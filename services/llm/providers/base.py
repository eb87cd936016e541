"""The provider interface of the LLM router, and what every HTTP provider shares.

A provider turns one validated :class:`GenerationRequest` into an async iterator of *batches* of
``llm.v1.StreamGenerateResponse`` events — text deltas, tool-call deltas, citations, then one
``usage`` and one ``finish``. A batch is what one network read delivered (one event for the SDK
transports and the extractive provider), so the router pays its per-read costs (a timeout, a
clock read) once per read rather than once per token. A provider never sends ``metadata`` (the
router does, because only the router knows whether a failover happened) and it reports every
upstream failure as a :class:`ProviderError`, so the router can decide between retrying, failing
over and ending the stream with a gRPC status without knowing any SDK.

HTTP providers have three transports (``client`` in the catalogue, ``AGENTMESH_LLM_CLIENT``):
- ``lean`` (default): HTTP/1.1 on asyncio streams (:class:`.http.LeanTransport`) and the
  provider's SSE wire format parsed here (:class:`SSEParser`);
- ``httpx``: the same parsing over ``httpx`` (proxies, compression);
- ``sdk``: the official ``openai`` / ``anthropic`` SDK.
Why the lean one is the default: per streamed chunk the SDKs build a pydantic model (~80 µs on
these machines against ~12 µs for the parser here), and the httpx stack costs about 100 µs per
network read of a paced stream plus a connection-pool scan that grows with the square of the
concurrent streams; ``bench/router.py`` measures all three.
"""

from __future__ import annotations

import abc
import enum
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2

Event = llm_pb2.StreamGenerateResponse
Batch = list[llm_pb2.StreamGenerateResponse]


@dataclass(frozen=True)
class GenerationRequest:
    """A request the router has validated and routed; providers trust every field.

    - ``model``: upstream model name to call (the router resolved it from the catalogue); empty
      = the provider's default.
    - ``messages``: the conversation, oldest first (at least one; roles set; tool messages carry
      ``tool_call_id``).
    - ``tools``: tool definitions with names matching ``^[a-zA-Z0-9_-]{1,64}$``.
    - ``context``: grounding chunks, cited as ``[n]`` with n = 1-based position in this list.
    - ``max_tokens``: completion-token limit, 1..``max_tokens_limit``.
    - ``temperature``: 0..2, or None for the provider default.
    - ``timeout_s``: seconds the provider call may take in total (derived from the caller's
      deadline and the deployment's total timeout); transports pass it as their request timeout.
    """

    model: str
    messages: Sequence[common_pb2.Message]
    tools: Sequence[common_pb2.ToolDefinition]
    context: Sequence[common_pb2.Chunk]
    max_tokens: int
    temperature: float | None
    timeout_s: float


class ErrorKind(enum.Enum):
    """Why a provider call failed, in provider-neutral terms."""

    CONNECTION = "connection"  # could not connect, or the connection dropped
    TIMEOUT = "timeout"  # no answer (or no next chunk) within the timeout
    RATE_LIMITED = "rate_limited"  # HTTP 429
    SERVER = "server"  # HTTP 5xx / 529 / 408 / 409, or an `error` event inside a 200 stream
    PROTOCOL = "protocol"  # the stream ended without its terminal event, or could not be parsed
    BAD_REQUEST = "bad_request"  # HTTP 400 / 413 / 422: the request itself was refused
    AUTH = "auth"  # HTTP 401 / 403: the configured key is wrong or lacks access
    NOT_FOUND = "not_found"  # HTTP 404: unknown model (or a wrong base URL)

    @property
    def transient(self) -> bool:
        """True for failures another deployment may not have: the router fails over on them."""
        return self in _TRANSIENT

    @property
    def retryable(self) -> bool:
        """True for failures worth retrying on the same deployment (HTTP 429, 5xx, connection
        errors). A timeout is not retried there: the deployment is slow, another one is tried."""
        return self in _RETRYABLE


_TRANSIENT = {ErrorKind.CONNECTION, ErrorKind.TIMEOUT, ErrorKind.RATE_LIMITED, ErrorKind.SERVER, ErrorKind.PROTOCOL}
_RETRYABLE = {ErrorKind.CONNECTION, ErrorKind.RATE_LIMITED, ErrorKind.SERVER}


class ProviderError(Exception):
    """An upstream failure, already classified.

    ``status`` is the HTTP status when there was one; ``retry_after_s`` the provider's
    ``retry-after`` header in seconds when it sent one.
    """

    def __init__(
        self, kind: ErrorKind, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


def classify_status(status: int) -> ErrorKind:
    """The kind of an HTTP error status (both providers use the same meanings)."""
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 404:
        return ErrorKind.NOT_FOUND
    if status >= 500 or status in (408, 409):
        return ErrorKind.SERVER  # 408/409: request timeout / conflict, retried by the SDKs too
    return ErrorKind.BAD_REQUEST


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``retry-after`` header given in seconds (HTTP-date values are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_message(body: bytes, fallback: str) -> str:
    """The ``error.message`` of a provider's JSON error body (both providers nest it so), else
    the first 300 characters of the body, else ``fallback``."""
    try:
        parsed = json.loads(body)
    except ValueError:
        text = body.decode(errors="replace").strip()
        return text[:300] or fallback
    inner = parsed.get("error", parsed) if isinstance(parsed, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return inner["message"]
    return fallback


class SSEParser:
    """Incremental ``text/event-stream`` parser (WHATWG HTML, "Server-sent events", §9.2.6).

    :meth:`feed` takes bytes as they arrive and returns the events they completed as
    ``(event name, data)`` pairs: lines end at CRLF, LF or CR; ``data`` lines are joined with
    ``\\n``; comment lines (``:``) and the ``id`` / ``retry`` fields are ignored; an event with no
    data is not dispatched. The name is ``""`` when the event has no ``event`` field.
    """

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            # A lone CR at the very end may be the first half of a CRLF: wait for the next read.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            buffer = buffer[: len(buffer) - len(tail)].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        *lines, self._buffer = buffer.split(b"\n")
        out: list[tuple[str, str]] = []
        for raw in lines:
            if not raw:  # blank line: dispatch
                if self._data:
                    out.append((self._event, "\n".join(self._data)))
                self._data, self._event = [], ""
                continue
            line = raw.decode()
            name, sep, value = line.partition(":")
            if not name:
                continue  # comment
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
        return out


class Provider(abc.ABC):
    """One configured upstream (or the extractive provider)."""

    #: Provider kind as reported in ``ResponseMetadata.provider``.
    name: str = ""
    #: False only for the extractive provider.
    is_llm: ClassVar[bool] = True
    #: Environment variable holding this provider's API key (named in auth-failure messages).
    key_env: str = ""

    def __init__(self, model: str):
        #: Upstream model used when a request leaves ``model`` empty.
        self.model = model

    @property
    def base_url(self) -> str:
        """The endpoint called (empty for local providers)."""
        return ""

    def resolve_model(self, request: GenerationRequest) -> str:
        """The upstream model name ``request`` will be sent to."""
        return request.model or self.model

    def metadata(self, request: GenerationRequest) -> llm_pb2.ResponseMetadata:
        """Metadata describing who answers ``request`` (the router adds routing fields)."""
        return llm_pb2.ResponseMetadata(provider=self.name, model=self.resolve_model(request), is_llm=self.is_llm)

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        """Batches of events of one generation (no ``metadata``); raises :class:`ProviderError`.

        A stream that ends without ``finish`` is reported by the router as cut. The router closes
        the iterator (``aclose``) when the caller goes away, so implementations must release the
        upstream HTTP stream in a ``finally``.
        """

    async def aclose(self) -> None:
        """Release the provider's connections (called when it is no longer used)."""


def finish_events(
    reason: common_pb2.FinishReason.ValueType, input_tokens: int, output_tokens: int
) -> Batch:
    """The closing ``usage`` and ``finish`` events of a stream."""
    usage = common_pb2.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )
    return [
        llm_pb2.StreamGenerateResponse(usage=usage),
        llm_pb2.StreamGenerateResponse(finish=llm_pb2.Finish(reason=reason, usage=usage)),
    ]


def text_event(text: str) -> Event:
    event = Event()
    event.text_delta.text = text  # no intermediate TextDelta to copy: ~40 % less per token
    return event


def tool_event(index: int, *, id: str = "", name: str = "", arguments: str = "") -> Event:  # noqa: A002
    return llm_pb2.StreamGenerateResponse(
        tool_call_delta=llm_pb2.ToolCallDelta(index=index, id=id, name=name, arguments_delta=arguments)
    )


def json_object(data: str) -> dict[str, Any]:
    """One SSE ``data`` payload as a JSON object; ProviderError(PROTOCOL) when it is not one."""
    try:
        value = orjson.loads(data)  # ~2.5x faster than json.loads per chunk: the parse is per token
    except ValueError as exc:
        raise ProviderError(ErrorKind.PROTOCOL, f"unparseable stream event {data[:120]!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ProviderError(ErrorKind.PROTOCOL, f"stream event is not a JSON object: {data[:120]!r}")
    return value
