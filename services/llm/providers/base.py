"""The provider interface of the LLM router.

A provider turns one validated :class:`GenerationRequest` into an async iterator of
``llm.v1.StreamGenerateResponse`` events: text deltas, tool-call deltas, citations, then one
``usage`` and one ``finish``. It never sends ``metadata`` (the router does, because only the
router knows whether a fallback happened) and it reports every upstream failure as a
:class:`ProviderError`, so the router can decide between falling back and ending the stream with
a gRPC status without knowing any SDK.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2


@dataclass(frozen=True)
class GenerationRequest:
    """A request the router has validated; providers trust every field.

    - ``model``: upstream model name asked for by the caller; empty = the provider's default.
    - ``messages``: the conversation, oldest first (at least one; roles set; tool messages carry
      ``tool_call_id``).
    - ``tools``: tool definitions with names matching ``^[a-zA-Z0-9_-]{1,64}$``.
    - ``context``: grounding chunks, cited as ``[n]`` with n = 1-based position in this list.
    - ``max_tokens``: completion-token limit, 1..``max_tokens_limit``.
    - ``temperature``: 0..2, or None for the provider default.
    - ``timeout_s``: seconds the provider call may take in total (derived from the caller's
      deadline); SDK calls pass it as their request timeout.
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
    SERVER = "server"  # HTTP 5xx / 529, or an `error` event inside a 200 stream
    PROTOCOL = "protocol"  # the stream ended without its terminal event
    BAD_REQUEST = "bad_request"  # HTTP 400 / 413 / 422: the request itself was refused
    AUTH = "auth"  # HTTP 401 / 403: the configured key is wrong or lacks access
    NOT_FOUND = "not_found"  # HTTP 404: unknown model (or a wrong base URL)

    @property
    def transient(self) -> bool:
        """True for failures a different provider may not have (the router falls back on them)."""
        return self in _TRANSIENT


_TRANSIENT = {ErrorKind.CONNECTION, ErrorKind.TIMEOUT, ErrorKind.RATE_LIMITED, ErrorKind.SERVER, ErrorKind.PROTOCOL}


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


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``retry-after`` header given in seconds (HTTP-date values are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class Provider(abc.ABC):
    """One configured upstream (or the extractive provider)."""

    #: Provider kind as reported in ``ResponseMetadata.provider``.
    name: ClassVar[str]
    #: False only for the extractive provider.
    is_llm: ClassVar[bool] = True
    #: Environment variable holding this provider's API key (named in auth-failure messages).
    key_env: ClassVar[str] = ""

    def __init__(self, model: str):
        #: Upstream model used when a request leaves ``model`` empty.
        self.model = model

    def resolve_model(self, request: GenerationRequest) -> str:
        """The upstream model name ``request`` will be sent to."""
        return request.model or self.model

    def metadata(self, request: GenerationRequest) -> llm_pb2.ResponseMetadata:
        """Metadata describing who answers ``request`` (the router may add a fallback notice)."""
        return llm_pb2.ResponseMetadata(provider=self.name, model=self.resolve_model(request), is_llm=self.is_llm)

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        """Events of one generation (no ``metadata``); raises :class:`ProviderError`.

        The router closes the iterator (``aclose``) when the caller goes away, so implementations
        must release the upstream HTTP stream in a ``finally``.
        """

    async def aclose(self) -> None:
        """Release the provider's connections (called once at service stop)."""


def finish_events(
    reason: common_pb2.FinishReason.ValueType, input_tokens: int, output_tokens: int
) -> list[llm_pb2.StreamGenerateResponse]:
    """The closing ``usage`` and ``finish`` events of a stream."""
    usage = common_pb2.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )
    return [
        llm_pb2.StreamGenerateResponse(usage=usage),
        llm_pb2.StreamGenerateResponse(finish=llm_pb2.Finish(reason=reason, usage=usage)),
    ]
