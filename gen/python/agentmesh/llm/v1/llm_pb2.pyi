from agentmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoutingStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTING_STRATEGY_UNSPECIFIED: _ClassVar[RoutingStrategy]
    ROUTING_STRATEGY_FALLBACK: _ClassVar[RoutingStrategy]
    ROUTING_STRATEGY_WEIGHTED: _ClassVar[RoutingStrategy]
    ROUTING_STRATEGY_LEAST_IN_FLIGHT: _ClassVar[RoutingStrategy]
    ROUTING_STRATEGY_LOWEST_LATENCY: _ClassVar[RoutingStrategy]
    ROUTING_STRATEGY_LOWEST_COST: _ClassVar[RoutingStrategy]

class CircuitState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CIRCUIT_STATE_UNSPECIFIED: _ClassVar[CircuitState]
    CIRCUIT_STATE_CLOSED: _ClassVar[CircuitState]
    CIRCUIT_STATE_OPEN: _ClassVar[CircuitState]
    CIRCUIT_STATE_HALF_OPEN: _ClassVar[CircuitState]
ROUTING_STRATEGY_UNSPECIFIED: RoutingStrategy
ROUTING_STRATEGY_FALLBACK: RoutingStrategy
ROUTING_STRATEGY_WEIGHTED: RoutingStrategy
ROUTING_STRATEGY_LEAST_IN_FLIGHT: RoutingStrategy
ROUTING_STRATEGY_LOWEST_LATENCY: RoutingStrategy
ROUTING_STRATEGY_LOWEST_COST: RoutingStrategy
CIRCUIT_STATE_UNSPECIFIED: CircuitState
CIRCUIT_STATE_CLOSED: CircuitState
CIRCUIT_STATE_OPEN: CircuitState
CIRCUIT_STATE_HALF_OPEN: CircuitState

class RoutingOptions(_message.Message):
    __slots__ = ("deployment", "fallback_models", "cache", "cache_ttl_s")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    fallback_models: _containers.RepeatedScalarFieldContainer[str]
    cache: bool
    cache_ttl_s: int
    def __init__(self, deployment: _Optional[str] = ..., fallback_models: _Optional[_Iterable[str]] = ..., cache: _Optional[bool] = ..., cache_ttl_s: _Optional[int] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("max_tokens", "temperature")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "messages", "tools", "context", "options", "routing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolDefinition]
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.Chunk]
    options: GenerationOptions
    routing: RoutingOptions
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolDefinition, _Mapping]]] = ..., context: _Optional[_Iterable[_Union[_common_pb2.Chunk, _Mapping]]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., routing: _Optional[_Union[RoutingOptions, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("message", "finish_reason", "usage", "citations", "metadata")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    message: _common_pb2.Message
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    citations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Citation]
    metadata: ResponseMetadata
    def __init__(self, message: _Optional[_Union[_common_pb2.Message, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., citations: _Optional[_Iterable[_Union[_common_pb2.Citation, _Mapping]]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class StreamGenerateRequest(_message.Message):
    __slots__ = ("model", "messages", "tools", "context", "options", "routing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolDefinition]
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.Chunk]
    options: GenerationOptions
    routing: RoutingOptions
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolDefinition, _Mapping]]] = ..., context: _Optional[_Iterable[_Union[_common_pb2.Chunk, _Mapping]]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., routing: _Optional[_Union[RoutingOptions, _Mapping]] = ...) -> None: ...

class ResponseMetadata(_message.Message):
    __slots__ = ("provider", "model", "is_llm", "notice", "deployment", "requested_model", "attempts", "cached")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IS_LLM_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    provider: str
    model: str
    is_llm: bool
    notice: str
    deployment: str
    requested_model: str
    attempts: int
    cached: bool
    def __init__(self, provider: _Optional[str] = ..., model: _Optional[str] = ..., is_llm: _Optional[bool] = ..., notice: _Optional[str] = ..., deployment: _Optional[str] = ..., requested_model: _Optional[str] = ..., attempts: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments_delta")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_DELTA_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments_delta: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments_delta: _Optional[str] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "usage", "cost_usd", "usage_estimated")
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    cost_usd: float
    usage_estimated: bool
    def __init__(self, reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_usd: _Optional[float] = ..., usage_estimated: _Optional[bool] = ...) -> None: ...

class StreamInterrupted(_message.Message):
    __slots__ = ("partial_usage", "usage_estimated", "cost_usd", "sent_deltas", "reason")
    PARTIAL_USAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    SENT_DELTAS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    partial_usage: _common_pb2.Usage
    usage_estimated: bool
    cost_usd: float
    sent_deltas: int
    reason: str
    def __init__(self, partial_usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., usage_estimated: _Optional[bool] = ..., cost_usd: _Optional[float] = ..., sent_deltas: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StreamGenerateResponse(_message.Message):
    __slots__ = ("metadata", "text_delta", "tool_call_delta", "citation", "usage", "finish", "interrupted")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_DELTA_FIELD_NUMBER: _ClassVar[int]
    CITATION_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    text_delta: TextDelta
    tool_call_delta: ToolCallDelta
    citation: _common_pb2.Citation
    usage: _common_pb2.Usage
    finish: Finish
    interrupted: StreamInterrupted
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., tool_call_delta: _Optional[_Union[ToolCallDelta, _Mapping]] = ..., citation: _Optional[_Union[_common_pb2.Citation, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ..., interrupted: _Optional[_Union[StreamInterrupted, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "provider", "is_llm", "is_default", "strategy", "deployments", "fallback_models", "context_window_fallback_models")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    IS_LLM_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    is_llm: bool
    is_default: bool
    strategy: RoutingStrategy
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    fallback_models: _containers.RepeatedScalarFieldContainer[str]
    context_window_fallback_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., is_llm: _Optional[bool] = ..., is_default: _Optional[bool] = ..., strategy: _Optional[_Union[RoutingStrategy, str]] = ..., deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., fallback_models: _Optional[_Iterable[str]] = ..., context_window_fallback_models: _Optional[_Iterable[str]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "provider", "upstream_model", "base_url", "weight", "rpm_limit", "tpm_limit", "input_usd_per_million_tokens", "output_usd_per_million_tokens", "context_window_tokens", "circuit_state", "in_flight", "ttft_ewma_ms", "first_token_timeout_ms", "total_timeout_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RPM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TPM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    INPUT_USD_PER_MILLION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_USD_PER_MILLION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_STATE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TTFT_EWMA_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    upstream_model: str
    base_url: str
    weight: int
    rpm_limit: int
    tpm_limit: int
    input_usd_per_million_tokens: float
    output_usd_per_million_tokens: float
    context_window_tokens: int
    circuit_state: CircuitState
    in_flight: int
    ttft_ewma_ms: float
    first_token_timeout_ms: int
    total_timeout_ms: int
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., upstream_model: _Optional[str] = ..., base_url: _Optional[str] = ..., weight: _Optional[int] = ..., rpm_limit: _Optional[int] = ..., tpm_limit: _Optional[int] = ..., input_usd_per_million_tokens: _Optional[float] = ..., output_usd_per_million_tokens: _Optional[float] = ..., context_window_tokens: _Optional[int] = ..., circuit_state: _Optional[_Union[CircuitState, str]] = ..., in_flight: _Optional[int] = ..., ttft_ewma_ms: _Optional[float] = ..., first_token_timeout_ms: _Optional[int] = ..., total_timeout_ms: _Optional[int] = ...) -> None: ...

class CountTokensRequest(_message.Message):
    __slots__ = ("model", "messages", "tools", "context", "deployment")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolDefinition]
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.Chunk]
    deployment: str
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolDefinition, _Mapping]]] = ..., context: _Optional[_Iterable[_Union[_common_pb2.Chunk, _Mapping]]] = ..., deployment: _Optional[str] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("input_tokens", "approximate", "tokenizer", "deployment", "upstream_model", "context_window_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    approximate: bool
    tokenizer: str
    deployment: str
    upstream_model: str
    context_window_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., approximate: _Optional[bool] = ..., tokenizer: _Optional[str] = ..., deployment: _Optional[str] = ..., upstream_model: _Optional[str] = ..., context_window_tokens: _Optional[int] = ...) -> None: ...

class GetSpendRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Spend(_message.Message):
    __slots__ = ("scope", "id", "spent_usd", "budget_usd", "period", "period_id", "held_usd")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_USD_FIELD_NUMBER: _ClassVar[int]
    scope: str
    id: str
    spent_usd: float
    budget_usd: float
    period: str
    period_id: str
    held_usd: float
    def __init__(self, scope: _Optional[str] = ..., id: _Optional[str] = ..., spent_usd: _Optional[float] = ..., budget_usd: _Optional[float] = ..., period: _Optional[str] = ..., period_id: _Optional[str] = ..., held_usd: _Optional[float] = ...) -> None: ...

class GetSpendResponse(_message.Message):
    __slots__ = ("spends",)
    SPENDS_FIELD_NUMBER: _ClassVar[int]
    spends: _containers.RepeatedCompositeFieldContainer[Spend]
    def __init__(self, spends: _Optional[_Iterable[_Union[Spend, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...
