"""The LLM router: ``agentmesh.llm.v1.LLMService``.

It validates a request, sends it to the configured provider (OpenAI-compatible, Anthropic, or the
extractive provider) and streams typed events back:

    metadata, (citation | text_delta | tool_call_delta)*, usage, finish

Failure semantics (DESIGN.md §8):
- Events are held back until the provider's first text or tool-call delta. A provider failure
  before it (connection error, HTTP 5xx, 429, an ``error`` event, no first token within
  ``first_token_timeout_s``) falls back to the extractive provider when
  ``fallback_to_extractive`` is on; the caller sees a normal stream whose ``metadata.notice``
  says why (and a warning is logged). Without fallback it ends with a status (below).
- A failure after the first delta ends the stream with UNAVAILABLE (DEADLINE_EXCEEDED for a
  timeout) whose message says the stream was cut and how much had been sent; the trailing
  metadata ``agentmesh-sent-deltas`` / ``agentmesh-sent-tokens`` carry the same counts. A stream
  that simply stops without the provider's terminal event is reported the same way: there is
  never a silent truncation.
- Status codes before the first delta: 429 → RESOURCE_EXHAUSTED (message gives ``retry-after``),
  timeout → DEADLINE_EXCEEDED, 5xx / connection → UNAVAILABLE, provider 400 → INVALID_ARGUMENT,
  401/403 → UNAVAILABLE naming the key's environment variable, 404 → NOT_FOUND.

Every provider call gets a timeout derived from the caller's deadline (``downstream_timeout``),
capped by ``total_timeout_s``; cancelling the RPC cancels the provider call and closes its HTTP
stream. ``Generate`` is ``StreamGenerate`` collected into one response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import Literal

import grpc
from google.protobuf import json_format, struct_pb2
from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.services.llm.providers.base import ErrorKind, GenerationRequest, Provider, ProviderError
from agentmesh.services.llm.providers.extractive import ExtractiveProvider
from agentmesh.services.runtime.tokens import count_tokens
from agentmesh.services.runtime.context import downstream_timeout
from agentmesh.services.runtime.errors import ServiceError, invalid_argument
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import ServiceSettings

log = logging.getLogger("agentmesh.llm")

Role = common_pb2.Role
#: The common subset of OpenAI and Anthropic tool names (common.v1.ToolDefinition.name).
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Seconds of the caller's deadline kept back so a fallback or a status still reaches the caller.
DEADLINE_RESERVE_S = 0.25
#: Model name that selects the extractive provider explicitly.
EXTRACTIVE_MODEL = "extractive"
#: Trailing-metadata keys set when a stream is cut after its first delta.
SENT_DELTAS_KEY = "agentmesh-sent-deltas"
SENT_TOKENS_KEY = "agentmesh-sent-tokens"

_DELTAS = ("text_delta", "tool_call_delta")


class LLMSettings(ServiceSettings):
    """Settings of the LLM router (env prefix ``AGENTMESH_LLM_``; the provider keys and the OpenAI
    base URL are also read from the SDKs' own variables). Invalid combinations fail at start."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_LLM_", extra="ignore", populate_by_name=True)

    provider: Literal["auto", "openai", "anthropic", "extractive"] = Field(
        "auto",
        description="Provider to call. auto = openai when an OpenAI key or base URL is set, else "
        "anthropic when an Anthropic key is set, else extractive.",
    )
    model: str = Field("", description="Upstream model used when a request names none; empty = provider default.")
    openai_base_url: str = Field(
        "",
        validation_alias=AliasChoices("AGENTMESH_LLM_OPENAI_BASE_URL", "OPENAI_BASE_URL"),
        description="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1; empty = OpenAI.",
    )
    openai_api_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("AGENTMESH_LLM_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    anthropic_base_url: str = Field(
        "", validation_alias=AliasChoices("AGENTMESH_LLM_ANTHROPIC_BASE_URL"), description="Empty = Anthropic."
    )
    anthropic_api_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("AGENTMESH_LLM_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    default_max_tokens: int = Field(1024, ge=1, description="Completion tokens when a request sets max_tokens=0.")
    max_tokens_limit: int = Field(16384, ge=1, description="Largest max_tokens a request may ask for.")
    first_token_timeout_s: float = Field(
        30.0, gt=0, description="Seconds to wait for the provider's first text or tool-call delta."
    )
    total_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a whole generation may take (the caller's deadline may cut it shorter)."
    )
    fallback_to_extractive: bool = Field(
        True, description="Answer with the extractive provider when the provider fails before its first delta."
    )
    provider_max_retries: int = Field(
        0, ge=0, le=5, description="SDK retries per provider call (0: fail fast and fall back instead)."
    )

    @model_validator(mode="after")
    def _check(self) -> LLMSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"AGENTMESH_LLM_DEFAULT_MAX_TOKENS ({self.default_max_tokens}) exceeds "
                f"AGENTMESH_LLM_MAX_TOKENS_LIMIT ({self.max_tokens_limit})"
            )
        if self.provider == "openai" and not (self.openai_api_key.get_secret_value() or self.openai_base_url):
            raise ValueError(
                "AGENTMESH_LLM_PROVIDER=openai needs AGENTMESH_LLM_OPENAI_API_KEY (or OPENAI_API_KEY), "
                "or AGENTMESH_LLM_OPENAI_BASE_URL for an OpenAI-compatible server that needs no key"
            )
        if self.provider == "anthropic" and not self.anthropic_api_key.get_secret_value():
            raise ValueError("AGENTMESH_LLM_PROVIDER=anthropic needs AGENTMESH_LLM_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY)")
        return self

    def resolved_provider(self) -> Literal["openai", "anthropic", "extractive"]:
        """The provider kind ``provider`` stands for (resolves ``auto``)."""
        if self.provider != "auto":
            return self.provider
        if self.openai_api_key.get_secret_value() or self.openai_base_url:
            return "openai"
        if self.anthropic_api_key.get_secret_value():
            return "anthropic"
        return "extractive"


def build_provider(settings: LLMSettings) -> Provider:
    """The provider ``settings`` select, constructed with its configuration (no remote call)."""
    kind = settings.resolved_provider()
    if kind == "openai":
        from agentmesh.services.llm.providers.openai import OpenAIProvider  # noqa: PLC0415 - import only the SDK in use (0.4-1.4 s each)

        return OpenAIProvider(
            model=settings.model,
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key.get_secret_value(),
            max_retries=settings.provider_max_retries,
        )
    if kind == "anthropic":
        from agentmesh.services.llm.providers.anthropic import AnthropicProvider  # noqa: PLC0415

        return AnthropicProvider(
            model=settings.model,
            base_url=settings.anthropic_base_url,
            api_key=settings.anthropic_api_key.get_secret_value(),
            max_retries=settings.provider_max_retries,
        )
    return ExtractiveProvider()


def _base_url_variable(provider: Provider) -> str:
    return f"AGENTMESH_LLM_{provider.name.upper()}_BASE_URL"


class LLMService(Service, llm_pb2_grpc.LLMServiceServicer):
    """The router (see the module docstring)."""

    kind = "llm"

    def __init__(self, settings: LLMSettings):
        super().__init__(settings)
        self.settings: LLMSettings = settings
        self.provider: Provider | None = None
        self.extractive = ExtractiveProvider()

    # --- Service lifecycle ---------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        llm_pb2_grpc.add_LLMServiceServicer_to_server(self, server)

    async def start(self) -> None:
        self.provider = build_provider(self.settings)
        log.info(
            "provider configured",
            extra={"fields": {"provider": self.provider.name, "model": self.provider.model}},
        )

    async def ready(self) -> tuple[bool, str]:
        # The remote provider is not called: a probe must not spend tokens or trip rate limits, and
        # the extractive fallback answers even while the provider is down.
        if self.provider is None:
            return False, "provider not constructed yet"
        return True, f"provider {self.provider.name} configured with model {self.provider.model}"

    async def stop(self) -> None:
        if self.provider is not None:
            await self.provider.aclose()

    # --- RPCs ----------------------------------------------------------------------------------

    async def StreamGenerate(  # noqa: N802 - gRPC method name
        self, request: llm_pb2.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        """Stream one generation. Raises INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE,
        DEADLINE_EXCEEDED or NOT_FOUND as described in the module docstring."""
        async for event in self._generate(request, context):
            yield event

    async def Generate(  # noqa: N802
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.GenerateResponse:
        """The same generation as StreamGenerate, collected; same errors. A tool call whose
        arguments are not a JSON object (e.g. cut by max_tokens) raises UNAVAILABLE."""
        return await collect(self._generate(request, context))

    async def ListModels(  # noqa: N802
        self, request: llm_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.ListModelsResponse:
        """The configured provider's default model, and the extractive provider."""
        provider = self._configured()
        models = []
        if provider.is_llm:
            models.append(llm_pb2.Model(name=provider.model, provider=provider.name, is_llm=True, is_default=True))
        models.append(
            llm_pb2.Model(
                name=EXTRACTIVE_MODEL, provider=self.extractive.name, is_llm=False, is_default=not provider.is_llm
            )
        )
        return llm_pb2.ListModelsResponse(models=models)

    # --- the generation pipeline ---------------------------------------------------------------

    def _configured(self) -> Provider:
        if self.provider is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the LLM router is still starting; retry shortly")
        return self.provider

    def validate(self, request: llm_pb2.GenerateRequest | llm_pb2.StreamGenerateRequest) -> GenerationRequest:
        """Check ``request`` and resolve its defaults. Raises INVALID_ARGUMENT naming the field."""
        if not request.messages:
            raise invalid_argument("messages is empty: send at least one message")
        call_ids: set[str] = set()
        for i, m in enumerate(request.messages):
            if m.role not in (Role.ROLE_SYSTEM, Role.ROLE_USER, Role.ROLE_ASSISTANT, Role.ROLE_TOOL):
                raise invalid_argument(
                    f"messages[{i}].role is {Role.Name(m.role) if m.role in Role.values() else m.role}: "
                    "set ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
                )
            if m.tool_calls and m.role != Role.ROLE_ASSISTANT:
                raise invalid_argument(f"messages[{i}] has tool_calls but only ROLE_ASSISTANT messages may")
            for j, call in enumerate(m.tool_calls):
                if not call.id:
                    raise invalid_argument(f"messages[{i}].tool_calls[{j}].id is empty")
                if not TOOL_NAME.match(call.name):
                    raise invalid_argument(
                        f"messages[{i}].tool_calls[{j}].name {call.name[:80]!r} must match ^[a-zA-Z0-9_-]{{1,64}}$"
                    )
                call_ids.add(call.id)
            if m.role == Role.ROLE_TOOL:
                if not m.tool_call_id:
                    raise invalid_argument(f"messages[{i}] is ROLE_TOOL but tool_call_id is empty")
                if m.tool_call_id not in call_ids:
                    raise invalid_argument(
                        f"messages[{i}].tool_call_id {m.tool_call_id[:80]!r} answers no tool call of an "
                        "earlier assistant message"
                    )
        names: set[str] = set()
        for i, tool in enumerate(request.tools):
            if not TOOL_NAME.match(tool.name):
                raise invalid_argument(f"tools[{i}].name {tool.name[:80]!r} must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if tool.name in names:
                raise invalid_argument(f"tools[{i}].name {tool.name!r} is listed twice")
            names.add(tool.name)
            schema_type = tool.parameters_schema.fields.get("type")
            if schema_type is not None and schema_type.string_value != "object":
                raise invalid_argument(f"tools[{i}].parameters_schema must describe an object (\"type\": \"object\")")
        options = request.options
        max_tokens = options.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise invalid_argument(
                f"options.max_tokens {max_tokens} exceeds this router's limit of {self.settings.max_tokens_limit} "
                "tokens (AGENTMESH_LLM_MAX_TOKENS_LIMIT)"
            )
        temperature = options.temperature if options.HasField("temperature") else None
        if temperature is not None and not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise invalid_argument(f"options.temperature {temperature} must be between 0 and 2")
        return GenerationRequest(
            model=request.model,
            messages=list(request.messages),
            tools=list(request.tools),
            context=list(request.context),
            max_tokens=max_tokens,
            temperature=temperature,
            timeout_s=downstream_timeout(self.settings.total_timeout_s, reserve_s=DEADLINE_RESERVE_S),
        )

    async def _generate(
        self, request: llm_pb2.GenerateRequest | llm_pb2.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        gen = self.validate(request)
        provider = self.extractive if request.model == EXTRACTIVE_MODEL else self._configured()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + gen.timeout_s
        first_token_s = min(self.settings.first_token_timeout_s, gen.timeout_s)
        first_token_timeout = (
            f"no first token within {first_token_s:.3g} s "
            + (
                "(AGENTMESH_LLM_FIRST_TOKEN_TIMEOUT_S)"
                if first_token_s == self.settings.first_token_timeout_s
                else "(the caller's deadline)"
            )
        )
        total_timeout = (
            f"the generation did not finish within {gen.timeout_s:.3g} s "
            "(AGENTMESH_LLM_TOTAL_TIMEOUT_S, or the caller's deadline)"
        )
        notice = ""
        stream = provider.stream(gen)
        try:
            try:
                head, done = await _head(stream, loop.time() + first_token_s, provider, first_token_timeout)
            except ProviderError as err:
                await stream.aclose()
                if not (self.settings.fallback_to_extractive and err.kind.transient and provider.is_llm):
                    raise self._status_before_first_delta(provider, gen, err) from err
                log.warning(
                    "provider failed before its first delta; answering with the extractive provider",
                    extra={"fields": {"provider": provider.name, "error_kind": err.kind.value, "error": str(err)}},
                )
                notice = (
                    f"The {provider.name} provider failed before answering ({err}); "
                    "the extractive provider answered instead. "
                )
                provider = self.extractive
                stream = provider.stream(gen)
                head, done = await _head(stream, deadline, provider, total_timeout)
            metadata = provider.metadata(gen)
            metadata.notice = notice + metadata.notice
            yield llm_pb2.StreamGenerateResponse(metadata=metadata)
            sent_deltas = sent_tokens = 0
            last = None
            for event in head:
                sent_deltas, sent_tokens = _account(event, sent_deltas, sent_tokens)
                last = event
                yield event
            while not done:
                try:
                    event = await _next(stream, deadline, total_timeout)
                except ProviderError as err:
                    raise self._status_after_first_delta(provider, err, sent_deltas, sent_tokens, context) from err
                if event is None:
                    break
                sent_deltas, sent_tokens = _account(event, sent_deltas, sent_tokens)
                last = event
                yield event
            if last is None or not last.HasField("finish"):
                err = ProviderError(ErrorKind.PROTOCOL, f"{provider.name} ended the stream without a finish")
                raise self._status_after_first_delta(provider, err, sent_deltas, sent_tokens, context)
        finally:
            # Runs on cancellation too: closing the generator closes the provider's HTTP stream.
            await stream.aclose()

    def _status_before_first_delta(self, provider: Provider, gen: GenerationRequest, err: ProviderError) -> ServiceError:
        name = provider.name
        if err.kind == ErrorKind.RATE_LIMITED:
            retry = f"; retry after {err.retry_after_s:g} s" if err.retry_after_s is not None else "; retry later"
            return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{name} rate-limited the request ({err}){retry}")
        if err.kind == ErrorKind.TIMEOUT:
            return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{name} timed out before answering: {err}")
        if err.kind == ErrorKind.BAD_REQUEST:
            return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} refused the request ({err})")
        if err.kind == ErrorKind.AUTH:
            return ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"{name} rejected the router's credentials ({err}): set a valid key in {provider.key_env}",
            )
        if err.kind == ErrorKind.NOT_FOUND:
            return ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"{name} does not know model {provider.resolve_model(gen)!r} ({err}): pass a model that "
                f"{name} serves, or check {_base_url_variable(provider)}",
            )
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"{name} failed before answering: {err}")

    @staticmethod
    def _status_after_first_delta(
        provider: Provider, err: ProviderError, deltas: int, tokens: int, context: grpc.aio.ServicerContext
    ) -> ServiceError:
        context.set_trailing_metadata(((SENT_DELTAS_KEY, str(deltas)), (SENT_TOKENS_KEY, str(tokens))))
        code = grpc.StatusCode.DEADLINE_EXCEEDED if err.kind == ErrorKind.TIMEOUT else grpc.StatusCode.UNAVAILABLE
        log.warning(
            "provider stream cut after its first delta",
            extra={"fields": {"provider": provider.name, "error": str(err), "sent_deltas": deltas}},
        )
        return ServiceError(
            code,
            f"the {provider.name} stream was cut after {_plural(deltas, 'delta')} (about "
            f"{_plural(tokens, 'token')}, counted as words and punctuation) had been sent: {err}. The answer "
            "received so far is incomplete.",
        )


async def _next(
    stream: AsyncIterator[llm_pb2.StreamGenerateResponse], deadline: float, timeout_message: str
) -> llm_pb2.StreamGenerateResponse | None:
    """The stream's next event, None at its end; ProviderError(TIMEOUT, ``timeout_message``) past
    ``deadline`` (a ``loop.time()`` instant). A timeout cancels the provider's pending read, which
    closes its HTTP stream."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(stream)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise ProviderError(ErrorKind.TIMEOUT, timeout_message) from None


async def _head(
    stream: AsyncIterator[llm_pb2.StreamGenerateResponse], deadline: float, provider: Provider, timeout_message: str
) -> tuple[list[llm_pb2.StreamGenerateResponse], bool]:
    """Events up to and including the first text/tool-call delta, and whether the stream ended.

    Raises ProviderError(PROTOCOL) when the stream ends, with no delta, and without a finish."""
    head: list[llm_pb2.StreamGenerateResponse] = []
    while True:
        event = await _next(stream, deadline, timeout_message)
        if event is None:
            if not head or not head[-1].HasField("finish"):
                raise ProviderError(ErrorKind.PROTOCOL, f"{provider.name} ended the stream without a finish")
            return head, True
        head.append(event)
        if event.WhichOneof("event") in _DELTAS:
            return head, False


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _account(event: llm_pb2.StreamGenerateResponse, deltas: int, tokens: int) -> tuple[int, int]:
    kind = event.WhichOneof("event")
    if kind == "text_delta":
        return deltas + 1, tokens + count_tokens(event.text_delta.text)
    if kind == "tool_call_delta":
        return deltas + 1, tokens + count_tokens(event.tool_call_delta.name + event.tool_call_delta.arguments_delta)
    return deltas, tokens


async def collect(events: AsyncIterator[llm_pb2.StreamGenerateResponse]) -> llm_pb2.GenerateResponse:
    """Fold a StreamGenerate event stream into a GenerateResponse (tool calls reassembled by
    index, arguments parsed into a Struct). Raises UNAVAILABLE for arguments that are not a JSON
    object."""
    response = llm_pb2.GenerateResponse()
    text: list[str] = []
    calls: dict[int, dict[str, list[str] | str]] = {}
    async for event in events:
        kind = event.WhichOneof("event")
        if kind == "metadata":
            response.metadata.CopyFrom(event.metadata)
        elif kind == "text_delta":
            text.append(event.text_delta.text)
        elif kind == "tool_call_delta":
            d = event.tool_call_delta
            call = calls.setdefault(d.index, {"id": "", "name": "", "args": []})
            call["id"] = call["id"] or d.id
            call["name"] = call["name"] or d.name
            call["args"].append(d.arguments_delta)  # type: ignore[union-attr]
        elif kind == "citation":
            response.citations.append(event.citation)
        elif kind == "usage":
            response.usage.CopyFrom(event.usage)
        elif kind == "finish":
            response.finish_reason = event.finish.reason
            response.usage.CopyFrom(event.finish.usage)
    message = response.message
    message.role = Role.ROLE_ASSISTANT
    message.content = "".join(text)
    for index in sorted(calls):
        call = calls[index]
        raw = "".join(call["args"])  # type: ignore[arg-type]
        try:
            parsed = json.loads(raw or "{}")
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            hint = (
                " (generation stopped at max_tokens: raise options.max_tokens)"
                if response.finish_reason == common_pb2.FINISH_REASON_LENGTH
                else ""
            )
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"{response.metadata.provider} returned tool call {call['name']!r} whose arguments are not a "
                f"JSON object: {raw[:200]!r}{hint}",
            )
        message.tool_calls.append(
            common_pb2.ToolCall(id=call["id"], name=call["name"], arguments=json_format.ParseDict(parsed, struct_pb2.Struct()))
        )
    return response


def create() -> Service:
    """The router configured from the environment (AGENTMESH_LLM_*, OPENAI_*, ANTHROPIC_API_KEY)."""
    return LLMService(LLMSettings())
