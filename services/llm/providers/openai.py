"""OpenAI chat-completions provider (also any OpenAI-compatible server: vLLM, Ollama, llama.cpp,
Groq...), through the official ``openai`` SDK.

One call = one streamed ``POST {base_url}/chat/completions`` with
``stream_options={"include_usage": true}``; chunks map to events as follows:
- ``choices[0].delta.content`` (and ``refusal``) → ``text_delta``;
- ``choices[0].delta.tool_calls[i]`` → ``tool_call_delta`` with the same ``index``; the first
  fragment of a call carries ``id`` and ``function.name``, later ones argument text;
- ``choices[0].finish_reason`` → the ``finish`` reason (``stop``→STOP, ``length``→LENGTH,
  ``tool_calls``/``function_call``→TOOL_CALLS, ``content_filter``→CONTENT_FILTER);
- the final chunk's ``usage`` (``prompt_tokens``, ``completion_tokens``) → ``usage``.
A stream that ends without a ``finish_reason`` yields no ``finish``, and the router treats it as
cut. SDK errors become :class:`ProviderError` (see :func:`translate_error`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import openai

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

log = logging.getLogger("agentmesh.llm")

FinishReason = common_pb2.FinishReason

#: Upstream model when neither the request nor AGENTMESH_LLM_MODEL names one.
DEFAULT_MODEL = "gpt-4.1-mini"
#: Host of OpenAI's own API; other base URLs are OpenAI-compatible servers.
OFFICIAL_HOST = "api.openai.com"

_FINISH = {
    "stop": FinishReason.FINISH_REASON_STOP,
    "length": FinishReason.FINISH_REASON_LENGTH,
    "tool_calls": FinishReason.FINISH_REASON_TOOL_CALLS,
    "function_call": FinishReason.FINISH_REASON_TOOL_CALLS,
    "content_filter": FinishReason.FINISH_REASON_CONTENT_FILTER,
}


def translate_error(err: openai.OpenAIError) -> ProviderError:
    """Classify an ``openai`` SDK error (timeouts, connection errors, HTTP status errors, an
    ``error`` object inside the stream)."""
    if isinstance(err, openai.APITimeoutError):
        return ProviderError(ErrorKind.TIMEOUT, "request to openai timed out")
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        return ProviderError(ErrorKind.CONNECTION, f"connection to openai failed: {cause or err}")
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        retry_after = parse_retry_after(err.response.headers.get("retry-after"))
        message = _api_message(err)
        if status == 429:
            kind = ErrorKind.RATE_LIMITED
        elif status in (401, 403):
            kind = ErrorKind.AUTH
        elif status == 404:
            kind = ErrorKind.NOT_FOUND
        elif status >= 500:
            kind = ErrorKind.SERVER
        elif status in (408, 409):
            kind = ErrorKind.SERVER  # request timeout / conflict: the SDK itself retries these
        else:
            kind = ErrorKind.BAD_REQUEST
        return ProviderError(kind, message, status=status, retry_after_s=retry_after)
    if isinstance(err, openai.APIError):
        # An `{"error": ...}` object sent inside a 200 stream: the server failed mid-generation.
        return ProviderError(ErrorKind.SERVER, f"openai stream error: {_api_message(err)}")
    return ProviderError(ErrorKind.SERVER, f"openai client error: {err}")


def _api_message(err: openai.APIError) -> str:
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return err.message


class OpenAIProvider(Provider):
    """Chat completions through ``openai.AsyncOpenAI``.

    ``base_url`` empty means OpenAI itself. ``api_key`` may be empty for OpenAI-compatible servers
    that need none. ``max_retries`` is the SDK's own retry count (0: the router falls back
    instead, within the caller's deadline). Requests to OpenAI itself send the completion limit as
    ``max_completion_tokens`` (OpenAI's reasoning models refuse ``max_tokens``); requests to other
    servers send ``max_tokens``, the field every OpenAI-compatible server understands.
    """

    name = "openai"
    key_env = "AGENTMESH_LLM_OPENAI_API_KEY (or OPENAI_API_KEY)"

    def __init__(self, *, model: str, base_url: str = "", api_key: str = "", max_retries: int = 0):
        super().__init__(model or DEFAULT_MODEL)
        self.client = openai.AsyncOpenAI(
            base_url=base_url or None,
            # Local OpenAI-compatible servers often need no key, but the SDK insists on one.
            api_key=api_key or "not-needed",
            max_retries=max_retries,
        )
        self._limit_field = "max_completion_tokens" if self.client.base_url.host == OFFICIAL_HOST else "max_tokens"

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    def _params(self, request: GenerationRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.resolve_model(request),
            "messages": prompt.openai_messages(request.messages, request.context),
            "stream": True,
            "stream_options": {"include_usage": True},
            self._limit_field: request.max_tokens,
            "timeout": request.timeout_s,
        }
        if request.tools:
            params["tools"] = prompt.openai_tools(request.tools)
        if request.temperature is not None:
            params["temperature"] = request.temperature
        return params

    async def stream(self, request: GenerationRequest) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        try:
            upstream = await self.client.chat.completions.create(**self._params(request))
        except openai.OpenAIError as err:
            raise translate_error(err) from err
        finish: common_pb2.FinishReason.ValueType | None = None
        usage = None
        try:
            async for chunk in upstream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.index != 0:  # n > 1 is never requested
                        continue
                    delta = choice.delta
                    if text := (delta.content or "") + (delta.refusal or ""):
                        yield llm_pb2.StreamGenerateResponse(text_delta=llm_pb2.TextDelta(text=text))
                    for call in delta.tool_calls or ():
                        fn = call.function
                        yield llm_pb2.StreamGenerateResponse(
                            tool_call_delta=llm_pb2.ToolCallDelta(
                                index=call.index,
                                id=call.id or "",
                                name=(fn.name if fn else None) or "",
                                arguments_delta=(fn.arguments if fn else None) or "",
                            )
                        )
                    if choice.finish_reason:
                        finish = _FINISH.get(choice.finish_reason, FinishReason.FINISH_REASON_STOP)
        except openai.OpenAIError as err:
            raise translate_error(err) from err
        finally:
            await upstream.close()
        if finish is None:
            return  # no finish_reason: the router reports the stream as cut
        if usage is None:
            log.warning(
                "openai-compatible server sent no usage chunk; reporting 0 tokens",
                extra={"fields": {"base_url": self.base_url}},
            )
        for event in finish_events(
            finish, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0
        ):
            yield event

    async def aclose(self) -> None:
        await self.client.close()
