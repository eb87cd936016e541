"""Anthropic Messages-API provider, through the official ``anthropic`` SDK.

One call = one streamed ``POST {base_url}/v1/messages``; the system prompt (system messages plus
the numbered context) goes in the separate ``system`` field. Stream events map as follows:
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
- ``message_stop`` → ``usage`` and ``finish``.
A stream that ends before ``message_stop`` yields no ``finish`` (the router reports it cut).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2  # the anthropic SDK's HTTP client; mid-stream transport errors surface as its types

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm import prompt
from agentmesh.services.llm.providers.base import (
    ErrorKind,
    GenerationRequest,
    Provider,
    ProviderError,
    finish_events,
    parse_retry_after,
)

FinishReason = common_pb2.FinishReason

#: Upstream model when neither the request nor AGENTMESH_LLM_MODEL names one.
DEFAULT_MODEL = "claude-haiku-4-5"

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


def translate_error(err: Exception) -> ProviderError:
    """Classify an ``anthropic`` SDK error or an ``httpx2`` transport error raised mid-stream."""
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
        retry_after = parse_retry_after(err.response.headers.get("retry-after"))
        if status == 200:  # an `error` event after the stream had started
            kind = _ERROR_TYPES.get(err.type or "", ErrorKind.SERVER)
            return ProviderError(kind, f"anthropic stream error ({err.type}): {message}")
        if status == 429:
            kind = ErrorKind.RATE_LIMITED
        elif status in (401, 403):
            kind = ErrorKind.AUTH
        elif status == 404:
            kind = ErrorKind.NOT_FOUND
        elif status >= 500 or status in (408, 409):
            kind = ErrorKind.SERVER
        else:
            kind = ErrorKind.BAD_REQUEST
        return ProviderError(kind, message, status=status, retry_after_s=retry_after)
    return ProviderError(ErrorKind.SERVER, f"anthropic client error: {err}")


class AnthropicProvider(Provider):
    """Messages API through ``anthropic.AsyncAnthropic`` (``base_url`` empty = Anthropic itself;
    ``max_retries`` as for the OpenAI provider)."""

    name = "anthropic"
    key_env = "AGENTMESH_LLM_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY)"

    def __init__(self, *, model: str, api_key: str, base_url: str = "", max_retries: int = 0):
        super().__init__(model or DEFAULT_MODEL)
        self.client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url or None, max_retries=max_retries)

    def _params(self, request: GenerationRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.resolve_model(request),
            "messages": prompt.anthropic_messages(request.messages),
            "max_tokens": request.max_tokens,
            "stream": True,
            "timeout": request.timeout_s,
        }
        if system := prompt.system_prompt(request.messages, request.context):
            params["system"] = system
        if request.tools:
            params["tools"] = prompt.anthropic_tools(request.tools)
        if request.temperature is not None:
            # The Messages API accepts 0..1; the router's contract allows 0..2 (OpenAI's range).
            params["temperature"] = min(request.temperature, 1.0)
        return params

    async def stream(self, request: GenerationRequest) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        try:
            upstream = await self.client.messages.create(**self._params(request))
        except (anthropic.AnthropicError, httpx2.HTTPError) as err:
            raise translate_error(err) from err
        input_tokens = output_tokens = 0
        stop_reason: str | None = None
        stopped = False
        tool_index: dict[int, int] = {}  # content-block index → tool-call index
        tool_has_args: dict[int, bool] = {}
        try:
            async for event in upstream:
                if event.type == "message_start":
                    u = event.message.usage
                    input_tokens = (
                        u.input_tokens + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
                    )
                    output_tokens = u.output_tokens
                elif event.type == "content_block_start":
                    block = event.content_block
                    if block.type == "tool_use":
                        index = tool_index[event.index] = len(tool_index)
                        tool_has_args[index] = False
                        yield _tool_delta(index, id=block.id, name=block.name)
                    elif block.type == "text" and block.text:
                        yield llm_pb2.StreamGenerateResponse(text_delta=llm_pb2.TextDelta(text=block.text))
                elif event.type == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta" and delta.text:
                        yield llm_pb2.StreamGenerateResponse(text_delta=llm_pb2.TextDelta(text=delta.text))
                    elif delta.type == "input_json_delta" and event.index in tool_index and delta.partial_json:
                        index = tool_index[event.index]
                        tool_has_args[index] = True
                        yield _tool_delta(index, arguments=delta.partial_json)
                elif event.type == "content_block_stop":
                    index = tool_index.get(event.index)
                    if index is not None and not tool_has_args[index]:
                        yield _tool_delta(index, arguments="{}")
                elif event.type == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    output_tokens = event.usage.output_tokens
                    if event.usage.input_tokens is not None:
                        input_tokens = (
                            event.usage.input_tokens
                            + (event.usage.cache_creation_input_tokens or 0)
                            + (event.usage.cache_read_input_tokens or 0)
                        )
                elif event.type == "message_stop":
                    stopped = True
        except (anthropic.AnthropicError, httpx2.HTTPError) as err:
            raise translate_error(err) from err
        finally:
            await upstream.close()
        if not stopped:
            return  # no message_stop: the router reports the stream as cut
        reason = _FINISH.get(stop_reason or "", FinishReason.FINISH_REASON_STOP)
        for event in finish_events(reason, input_tokens, output_tokens):
            yield event

    async def aclose(self) -> None:
        await self.client.close()


def _tool_delta(index: int, *, id: str = "", name: str = "", arguments: str = "") -> llm_pb2.StreamGenerateResponse:  # noqa: A002
    return llm_pb2.StreamGenerateResponse(
        tool_call_delta=llm_pb2.ToolCallDelta(index=index, id=id, name=name, arguments_delta=arguments)
    )
