"""Anthropic Messages-API provider.

One call = one streamed ``POST {base_url}/v1/messages`` (headers ``x-api-key`` and
``anthropic-version``); the system prompt (system messages plus the numbered context) goes in the
separate ``system`` field. Stream events map as follows:
- ``message_start.message.usage`` → input tokens (``input_tokens`` plus the cache-read and
  cache-creation input tokens, i.e. the whole prompt);
- ``content_block_start`` of a ``tool_use`` block → the first ``tool_call_delta`` of a call (``id``,
  ``name``), numbered 0, 1, ... in order of appearance; its ``input_json_delta.partial_json``
  fragments → further ``tool_call_delta`` with the same index (a call whose input streamed no
  fragment gets ``{}`` so the arguments are always a JSON object);
- ``text_delta`` → ``text_delta`` (thinking blocks are not forwarded);
- ``message_delta`` → ``stop_reason`` (``end_turn``/``stop_sequence``/``pause_turn``→STOP,
  ``max_tokens``/``model_context_window_exceeded``→LENGTH, ``tool_use``→TOOL_CALLS,
  ``refusal``→CONTENT_FILTER) and the cumulative ``output_tokens``;
- ``message_stop`` → ``usage`` and ``finish``;
- an ``error`` event inside the 200 stream → ProviderError of the kind its ``error.type`` names.
A stream that ends before ``message_stop`` yields no ``finish`` (the router reports it cut).
Transports (see :mod:`.base`): ``lean`` and ``httpx`` send the request and parse the SSE
themselves (:mod:`.http`), ``sdk`` uses ``anthropic.AsyncAnthropic``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from agentmesh.common.v1 import common_pb2
from agentmesh.services.llm import prompt
from agentmesh.services.llm.providers.base import (
    Batch,
    ErrorKind,
    GenerationRequest,
    Provider,
    ProviderError,
    SSEParser,
    classify_status,
    finish_events,
    json_object,
    parse_retry_after,
    text_event,
    tool_event,
)

FinishReason = common_pb2.FinishReason

#: Upstream model when neither the request nor the configuration names one.
DEFAULT_MODEL = "claude-haiku-4-5"
OFFICIAL_BASE_URL = "https://api.anthropic.com"
#: The Messages-API version header every request carries.
API_VERSION = "2023-06-01"

_FINISH = {
    "end_turn": FinishReason.FINISH_REASON_STOP,
    "stop_sequence": FinishReason.FINISH_REASON_STOP,
    "pause_turn": FinishReason.FINISH_REASON_STOP,
    "max_tokens": FinishReason.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": FinishReason.FINISH_REASON_LENGTH,
    "tool_use": FinishReason.FINISH_REASON_TOOL_CALLS,
    "refusal": FinishReason.FINISH_REASON_CONTENT_FILTER,
}

#: `error.type` of an Anthropic error body → kind (used for `error` events inside a 200 stream).
_ERROR_TYPES = {
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "request_too_large": ErrorKind.BAD_REQUEST,
    "authentication_error": ErrorKind.AUTH,
    "permission_error": ErrorKind.AUTH,
    "not_found_error": ErrorKind.NOT_FOUND,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "api_error": ErrorKind.SERVER,
    "overloaded_error": ErrorKind.SERVER,
}


class AnthropicProvider(Provider):
    """Messages API (``base_url`` empty = Anthropic itself; see the module docstring)."""

    name = "anthropic"

    def __init__(
        self, *, model: str, api_key: str, base_url: str = "", transport: Literal["lean", "httpx", "sdk"] = "lean",
        key_env: str = "AGENTMESH_LLM_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY)", max_connections: int = 1000,
    ):
        super().__init__(model or DEFAULT_MODEL)
        self.key_env = key_env
        self.transport = transport
        self._base_url = (base_url or OFFICIAL_BASE_URL).rstrip("/")
        self._api_key = api_key
        if transport == "sdk":
            import anthropic  # noqa: PLC0415 - the SDK is only imported when a deployment uses it

            self.client: Any = anthropic.AsyncAnthropic(api_key=api_key, base_url=self._base_url, max_retries=0)
        else:
            from agentmesh.services.llm.providers.http import HttpTransport, LeanTransport  # noqa: PLC0415

            transport_class = LeanTransport if transport == "lean" else HttpTransport
            self.client = transport_class(self.name, max_connections=max_connections)

    @property
    def base_url(self) -> str:
        return self._base_url

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The Messages-API request body."""
        params: dict[str, Any] = {
            "model": self.resolve_model(request),
            "messages": prompt.anthropic_messages(request.messages),
            "max_tokens": request.max_tokens,
            "stream": True,
        }
        if system := prompt.system_prompt(request.messages, request.context):
            params["system"] = system
        if request.tools:
            params["tools"] = prompt.anthropic_tools(request.tools)
        if request.temperature is not None:
            # The Messages API accepts 0..1; the router's contract allows 0..2 (OpenAI's range).
            params["temperature"] = min(request.temperature, 1.0)
        return params

    def stream(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        if self.transport == "sdk":
            return self._stream_sdk(request)
        return self._stream_http(request)

    async def _stream_http(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        headers = {"anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        parser = SSEParser()
        state = _State()
        upstream = self.client.post_stream(f"{self._base_url}/v1/messages", self.body(request), request.timeout_s, headers)
        try:
            async for raw in upstream:
                batch: Batch = []
                failure = None
                for name, data in parser.feed(raw):
                    event = json_object(data)
                    kind = event.get("type") or name
                    if kind == "error":
                        error = event.get("error") or {}
                        failure = stream_error(error.get("type") or "", error.get("message") or "stream error")
                        break
                    state.event(kind, event, batch)
                if batch:
                    yield batch  # wire order: what came before an error event is passed on first
                if failure is not None:
                    raise failure
        finally:
            await upstream.aclose()
        if state.stopped:
            yield state.closing()

    async def _stream_sdk(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        import anthropic  # noqa: PLC0415
        import httpx2  # noqa: PLC0415 - the SDK's HTTP client; mid-stream transport errors surface as its types

        try:
            upstream = await self.client.messages.create(**self.body(request), timeout=request.timeout_s)
        except (anthropic.AnthropicError, httpx2.HTTPError) as err:
            raise translate_sdk_error(err) from err
        state = _State()
        try:
            async for event in upstream:
                batch: Batch = []
                state.event(event.type, event.model_dump(), batch)
                if batch:
                    yield batch
        except (anthropic.AnthropicError, httpx2.HTTPError) as err:
            raise translate_sdk_error(err) from err
        finally:
            await upstream.close()
        if state.stopped:
            yield state.closing()

    async def aclose(self) -> None:
        await (self.client.close() if self.transport == "sdk" else self.client.aclose())


def _input_tokens(usage: dict[str, Any]) -> int:
    return (
        int(usage.get("input_tokens") or 0)
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0)
    )


class _State:
    """What a Messages stream has told so far."""

    __slots__ = ("input_tokens", "output_tokens", "stop_reason", "stopped", "tool_has_args", "tool_index")

    def __init__(self) -> None:
        self.input_tokens = self.output_tokens = 0
        self.stop_reason: str | None = None
        self.stopped = False
        self.tool_index: dict[int, int] = {}  # content-block index → tool-call index
        self.tool_has_args: dict[int, bool] = {}

    def event(self, kind: str, event: dict[str, Any], batch: Batch) -> None:
        """Append the router events of one Messages stream event to ``batch``."""
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and (text := delta.get("text")):
                batch.append(text_event(text))
            elif delta.get("type") == "input_json_delta" and (block := event.get("index")) in self.tool_index:
                if fragment := delta.get("partial_json"):
                    index = self.tool_index[block]
                    self.tool_has_args[index] = True
                    batch.append(tool_event(index, arguments=fragment))
        elif kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self.input_tokens = _input_tokens(usage)
            self.output_tokens = int(usage.get("output_tokens") or 0)
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self.tool_index[event.get("index", 0)] = len(self.tool_index)
                self.tool_has_args[index] = False
                batch.append(tool_event(index, id=block.get("id") or "", name=block.get("name") or ""))
            elif block.get("type") == "text" and block.get("text"):
                batch.append(text_event(block["text"]))
        elif kind == "content_block_stop":
            index = self.tool_index.get(event.get("index", -1))
            if index is not None and not self.tool_has_args[index]:
                batch.append(tool_event(index, arguments="{}"))
        elif kind == "message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            usage = event.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self.output_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens") is not None:
                self.input_tokens = _input_tokens(usage)
        elif kind == "message_stop":
            self.stopped = True

    def closing(self) -> Batch:
        reason = _FINISH.get(self.stop_reason or "", FinishReason.FINISH_REASON_STOP)
        return finish_events(reason, self.input_tokens, self.output_tokens)


def stream_error(error_type: str, message: str) -> ProviderError:
    """An ``error`` event received after the 200 (e.g. ``overloaded_error``)."""
    return ProviderError(_ERROR_TYPES.get(error_type, ErrorKind.SERVER), f"anthropic stream error ({error_type}): {message}")


def translate_sdk_error(err: Exception) -> ProviderError:
    """Classify an ``anthropic`` SDK error or an ``httpx2`` transport error raised mid-stream."""
    import anthropic  # noqa: PLC0415
    import httpx2  # noqa: PLC0415

    if isinstance(err, (anthropic.APITimeoutError, httpx2.TimeoutException)):
        return ProviderError(ErrorKind.TIMEOUT, "request to anthropic timed out")
    if isinstance(err, anthropic.APIConnectionError):
        cause = err.__cause__ or err.__context__
        return ProviderError(ErrorKind.CONNECTION, f"connection to anthropic failed: {cause or err}")
    if isinstance(err, httpx2.TransportError):
        return ProviderError(ErrorKind.CONNECTION, f"connection to anthropic failed: {err}")
    if isinstance(err, anthropic.APIStatusError):
        status = err.status_code
        message = err.api_message or str(err)
        if status == 200:  # an `error` event after the stream had started
            return stream_error(err.type or "", message)
        return ProviderError(classify_status(status), message, status=status,
                             retry_after_s=parse_retry_after(err.response.headers.get("retry-after")))
    return ProviderError(ErrorKind.SERVER, f"anthropic client error: {err}")
