"""OpenAI chat-completions provider: OpenAI, Azure OpenAI, and any OpenAI-compatible server
(Groq, Together, vLLM, Ollama, llama.cpp...).

One call = one streamed ``POST {base_url}/chat/completions`` (Azure:
``{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...`` with an
``api-key`` header) with ``stream_options={"include_usage": true}``. Chunks map to events:
- ``choices[0].delta.content`` (and ``refusal``) → ``text_delta``;
- ``choices[0].delta.tool_calls[i]`` → ``tool_call_delta`` with the same ``index``; the first
  fragment of a call carries ``id`` and ``function.name``, later ones argument text;
- ``choices[0].finish_reason`` → the ``finish`` reason (``stop``→STOP, ``length``→LENGTH,
  ``tool_calls``/``function_call``→TOOL_CALLS, ``content_filter``→CONTENT_FILTER);
- the final chunk's ``usage`` (``prompt_tokens``, ``completion_tokens``) → ``usage``; a server
  that sends none gets ``Finish.usage_estimated`` and the router counts the usage itself;
- ``data: {"error": {...}}`` inside the 200 stream → ProviderError(SERVER).
A stream that ends without a ``finish_reason`` yields no ``finish``, and the router treats it as
cut. Transports (see :mod:`.base`): ``lean`` and ``httpx`` send the request and parse the SSE
themselves (:mod:`.http`), ``sdk`` uses ``openai.AsyncOpenAI`` / ``openai.AsyncAzureOpenAI``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm import prompt
from agentmesh.services.llm.providers.base import (
    Batch,
    ErrorKind,
    GenerationRequest,
    Provider,
    ProviderError,
    SSEParser,
    classify_status,
    json_object,
    parse_retry_after,
    text_event,
    tool_event,
)

log = logging.getLogger("agentmesh.llm")

FinishReason = common_pb2.FinishReason

#: Upstream model when neither the request nor the configuration names one.
DEFAULT_MODEL = "gpt-4.1-mini"
#: Host of OpenAI's own API; other base URLs are OpenAI-compatible servers.
OFFICIAL_HOST = "api.openai.com"
OFFICIAL_BASE_URL = "https://api.openai.com/v1"
#: Azure OpenAI API version used when the catalogue names none.
DEFAULT_AZURE_API_VERSION = "2024-10-21"

_FINISH = {
    "stop": FinishReason.FINISH_REASON_STOP,
    "length": FinishReason.FINISH_REASON_LENGTH,
    "tool_calls": FinishReason.FINISH_REASON_TOOL_CALLS,
    "function_call": FinishReason.FINISH_REASON_TOOL_CALLS,
    "content_filter": FinishReason.FINISH_REASON_CONTENT_FILTER,
}


class OpenAIProvider(Provider):
    """Chat completions (see the module docstring).

    ``base_url`` empty means OpenAI itself (for ``azure``: the resource endpoint,
    ``https://NAME.openai.azure.com``, required). ``api_key`` may be empty for OpenAI-compatible
    servers that need none. Requests to OpenAI itself send the completion limit as
    ``max_completion_tokens`` (its reasoning models refuse ``max_tokens``); every other server
    gets ``max_tokens``, the field all OpenAI-compatible servers understand.
    """

    name = "openai"

    def __init__(
        self, *, model: str, base_url: str = "", api_key: str = "", transport: Literal["lean", "httpx", "sdk"] = "lean",
        azure: bool = False, api_version: str = "", key_env: str = "AGENTMESH_LLM_OPENAI_API_KEY (or OPENAI_API_KEY)",
        max_connections: int = 1000,
    ):
        super().__init__(model or DEFAULT_MODEL)
        self.azure = azure
        self.name = "azure" if azure else "openai"
        self.key_env = key_env
        self.transport = transport
        self.api_version = api_version or DEFAULT_AZURE_API_VERSION
        self._api_key = api_key
        if azure and not base_url:
            raise ValueError("an azure deployment needs base_url: its resource endpoint, https://NAME.openai.azure.com")
        self._base_url = (base_url or OFFICIAL_BASE_URL).rstrip("/")
        official = not azure and self._base_url.split("://", 1)[-1].split("/", 1)[0] == OFFICIAL_HOST
        self._limit_field = "max_completion_tokens" if official else "max_tokens"
        if transport == "sdk":
            import openai  # noqa: PLC0415 - the SDK is only imported when a deployment uses it

            if azure:
                self.client: Any = openai.AsyncAzureOpenAI(
                    azure_endpoint=self._base_url, api_key=api_key or "not-needed", api_version=self.api_version,
                    max_retries=0,
                )
            else:
                # Local OpenAI-compatible servers often need no key, but the SDK insists on one.
                self.client = openai.AsyncOpenAI(base_url=self._base_url, api_key=api_key or "not-needed", max_retries=0)
        else:
            from agentmesh.services.llm.providers.http import HttpTransport, LeanTransport  # noqa: PLC0415

            transport_class = LeanTransport if transport == "lean" else HttpTransport
            self.client = transport_class(self.name, max_connections=max_connections)

    @property
    def base_url(self) -> str:
        return self._base_url

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The chat-completions request body (without the SDK-only ``timeout``)."""
        params: dict[str, Any] = {
            "model": self.resolve_model(request),
            "messages": prompt.openai_messages(request.messages, request.context),
            "stream": True,
            "stream_options": {"include_usage": True},
            self._limit_field: request.max_tokens,
        }
        if request.tools:
            params["tools"] = prompt.openai_tools(request.tools)
        if request.temperature is not None:
            params["temperature"] = request.temperature
        return params

    def stream(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        if self.transport == "sdk":
            return self._stream_sdk(request)
        return self._stream_http(request)

    # --- lean and httpx transports ----------------------------------------------------------------------

    async def _stream_http(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        if self.azure:
            url = f"{self._base_url}/openai/deployments/{self.resolve_model(request)}/chat/completions"
            headers = {"api-key": self._api_key} if self._api_key else {}
            params = {"api-version": self.api_version}
        else:
            url = f"{self._base_url}/chat/completions"
            headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            params = None
        body = self.body(request)
        parser = SSEParser()
        state = _State()
        upstream = self.client.post_stream(url, body, request.timeout_s, headers, params)
        try:
            async for raw in upstream:
                batch: Batch = []
                failure = None
                for _event, data in parser.feed(raw):
                    if data == "[DONE]":
                        state.done = True
                        continue
                    chunk = json_object(data)
                    if "error" in chunk and not chunk.get("choices"):
                        failure = _stream_error(self.name, chunk["error"])
                        break
                    state.chunk(chunk, batch)
                if batch:
                    yield batch  # wire order: what came before an error object is passed on first
                if failure is not None:
                    raise failure
        finally:
            await upstream.aclose()
        if state.finish is None:
            return  # no finish_reason: the router reports the stream as cut
        yield state.closing(self)

    # --- official SDK transport --------------------------------------------------------------

    async def _stream_sdk(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        import openai  # noqa: PLC0415

        try:
            upstream = await self.client.chat.completions.create(**self.body(request), timeout=request.timeout_s)
        except openai.OpenAIError as err:
            raise translate_sdk_error(self.name, err) from err
        state = _State()
        try:
            async for chunk in upstream:
                batch: Batch = []
                if chunk.usage is not None:
                    state.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    if choice.index != 0:  # n > 1 is never requested
                        continue
                    delta = choice.delta
                    if text := (delta.content or "") + (delta.refusal or ""):
                        batch.append(text_event(text))
                    for call in delta.tool_calls or ():
                        fn = call.function
                        batch.append(tool_event(call.index, id=call.id or "", name=(fn.name if fn else None) or "",
                                                arguments=(fn.arguments if fn else None) or ""))
                    if choice.finish_reason:
                        state.finish = _FINISH.get(choice.finish_reason, FinishReason.FINISH_REASON_STOP)
                if batch:
                    yield batch
        except openai.OpenAIError as err:
            raise translate_sdk_error(self.name, err) from err
        finally:
            await upstream.close()
        if state.finish is None:
            return
        yield state.closing(self)

    async def aclose(self) -> None:
        await (self.client.close() if self.transport == "sdk" else self.client.aclose())


class _State:
    """What a chat-completions stream has told so far (finish reason, usage)."""

    __slots__ = ("done", "finish", "usage")

    def __init__(self) -> None:
        self.finish: common_pb2.FinishReason.ValueType | None = None
        self.usage: tuple[int, int] | None = None
        self.done = False

    def chunk(self, chunk: dict[str, Any], batch: Batch) -> None:
        """Append the events of one ``chat.completion.chunk`` to ``batch``."""
        usage = chunk.get("usage")
        if usage:
            self.usage = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:  # n > 1 is never requested
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            refusal = delta.get("refusal")
            if content or refusal:
                batch.append(text_event((content or "") + (refusal or "")))
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") or {}
                batch.append(tool_event(int(call.get("index", 0)), id=call.get("id") or "", name=fn.get("name") or "",
                                        arguments=fn.get("arguments") or ""))
            if reason := choice.get("finish_reason"):
                self.finish = _FINISH.get(reason, FinishReason.FINISH_REASON_STOP)

    def closing(self, provider: OpenAIProvider) -> Batch:
        estimated = self.usage is None
        if estimated:
            log.warning("openai-compatible server sent no usage chunk; the router counts the usage",
                        extra={"fields": {"base_url": provider.base_url}})
        input_tokens, output_tokens = self.usage or (0, 0)
        usage = common_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                                 total_tokens=input_tokens + output_tokens)
        assert self.finish is not None
        return [
            llm_pb2.StreamGenerateResponse(usage=usage),
            llm_pb2.StreamGenerateResponse(finish=llm_pb2.Finish(reason=self.finish, usage=usage,
                                                                 usage_estimated=estimated)),
        ]


def _stream_error(name: str, error: Any) -> ProviderError:
    message = error.get("message") if isinstance(error, dict) else str(error)
    return ProviderError(ErrorKind.SERVER, f"{name} stream error: {message}")


def translate_sdk_error(name: str, err: Exception) -> ProviderError:
    """Classify an ``openai`` SDK error (timeouts, connection errors, HTTP status errors, an
    ``error`` object inside the stream)."""
    import openai  # noqa: PLC0415

    if isinstance(err, openai.APITimeoutError):
        return ProviderError(ErrorKind.TIMEOUT, f"request to {name} timed out")
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        return ProviderError(ErrorKind.CONNECTION, f"connection to {name} failed: {cause or err}")
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        return ProviderError(classify_status(status), _api_message(err), status=status,
                             retry_after_s=parse_retry_after(err.response.headers.get("retry-after")))
    if isinstance(err, openai.APIError):
        # An `{"error": ...}` object sent inside a 200 stream: the server failed mid-generation.
        return ProviderError(ErrorKind.SERVER, f"{name} stream error: {_api_message(err)}")
    return ProviderError(ErrorKind.SERVER, f"{name} client error: {err}")


def _api_message(err: Any) -> str:
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return err.message
