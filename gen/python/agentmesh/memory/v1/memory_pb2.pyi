from agentmesh.common.v1 import common_pb2 as _common_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACT_KIND_UNSPECIFIED: _ClassVar[FactKind]
    FACT_KIND_FACT: _ClassVar[FactKind]
    FACT_KIND_PREFERENCE: _ClassVar[FactKind]

class RememberOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REMEMBER_OUTCOME_UNSPECIFIED: _ClassVar[RememberOutcome]
    REMEMBER_OUTCOME_CREATED: _ClassVar[RememberOutcome]
    REMEMBER_OUTCOME_EXACT_DUPLICATE: _ClassVar[RememberOutcome]
    REMEMBER_OUTCOME_MERGED: _ClassVar[RememberOutcome]
FACT_KIND_UNSPECIFIED: FactKind
FACT_KIND_FACT: FactKind
FACT_KIND_PREFERENCE: FactKind
REMEMBER_OUTCOME_UNSPECIFIED: RememberOutcome
REMEMBER_OUTCOME_CREATED: RememberOutcome
REMEMBER_OUTCOME_EXACT_DUPLICATE: RememberOutcome
REMEMBER_OUTCOME_MERGED: RememberOutcome

class AppendMessagesRequest(_message.Message):
    __slots__ = ("session_id", "messages", "user_id", "idempotency_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    user_id: str
    idempotency_key: str
    def __init__(self, session_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., user_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AppendMessagesResponse(_message.Message):
    __slots__ = ("version", "first_sequence", "message_ids", "replayed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    version: int
    first_sequence: int
    message_ids: _containers.RepeatedScalarFieldContainer[str]
    replayed: bool
    def __init__(self, version: _Optional[int] = ..., first_sequence: _Optional[int] = ..., message_ids: _Optional[_Iterable[str]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetContextRequest(_message.Message):
    __slots__ = ("session_id", "token_budget", "user_id", "min_version", "model")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_budget: int
    user_id: str
    min_version: int
    model: str
    def __init__(self, session_id: _Optional[str] = ..., token_budget: _Optional[int] = ..., user_id: _Optional[str] = ..., min_version: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class GetContextResponse(_message.Message):
    __slots__ = ("messages", "tokens_used", "version", "messages_omitted", "pinned_messages", "summary_included", "summary_through_sequence", "first_sequence", "message_ids", "tokenizer", "tokens_approximate")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    PINNED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_INCLUDED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_THROUGH_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    tokens_used: int
    version: int
    messages_omitted: int
    pinned_messages: int
    summary_included: bool
    summary_through_sequence: int
    first_sequence: int
    message_ids: _containers.RepeatedScalarFieldContainer[str]
    tokenizer: str
    tokens_approximate: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., tokens_used: _Optional[int] = ..., version: _Optional[int] = ..., messages_omitted: _Optional[int] = ..., pinned_messages: _Optional[int] = ..., summary_included: _Optional[bool] = ..., summary_through_sequence: _Optional[int] = ..., first_sequence: _Optional[int] = ..., message_ids: _Optional[_Iterable[str]] = ..., tokenizer: _Optional[str] = ..., tokens_approximate: _Optional[bool] = ...) -> None: ...

class SessionMessage(_message.Message):
    __slots__ = ("id", "sequence", "message", "created_at_ms", "tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    sequence: int
    message: _common_pb2.Message
    created_at_ms: int
    tokens: int
    def __init__(self, id: _Optional[str] = ..., sequence: _Optional[int] = ..., message: _Optional[_Union[_common_pb2.Message, _Mapping]] = ..., created_at_ms: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("session_id", "user_id", "from_sequence", "to_sequence", "limit", "min_version", "from_message_id", "to_message_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TO_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TO_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    from_sequence: int
    to_sequence: int
    limit: int
    min_version: int
    from_message_id: str
    to_message_id: str
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ..., from_sequence: _Optional[int] = ..., to_sequence: _Optional[int] = ..., limit: _Optional[int] = ..., min_version: _Optional[int] = ..., from_message_id: _Optional[str] = ..., to_message_id: _Optional[str] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "version", "first_sequence", "next_sequence")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[SessionMessage]
    version: int
    first_sequence: int
    next_sequence: int
    def __init__(self, messages: _Optional[_Iterable[_Union[SessionMessage, _Mapping]]] = ..., version: _Optional[int] = ..., first_sequence: _Optional[int] = ..., next_sequence: _Optional[int] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id", "user_id", "after_sequence")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    after_sequence: int
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchStarted(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SessionDeleted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchSessionResponse(_message.Message):
    __slots__ = ("started", "message", "deleted")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    started: WatchStarted
    message: SessionMessage
    deleted: SessionDeleted
    def __init__(self, started: _Optional[_Union[WatchStarted, _Mapping]] = ..., message: _Optional[_Union[SessionMessage, _Mapping]] = ..., deleted: _Optional[_Union[SessionDeleted, _Mapping]] = ...) -> None: ...

class SessionSummary(_message.Message):
    __slots__ = ("text", "from_sequence", "through_sequence", "tokens", "provider", "model", "is_llm", "updated_at_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    THROUGH_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IS_LLM_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    from_sequence: int
    through_sequence: int
    tokens: int
    provider: str
    model: str
    is_llm: bool
    updated_at_ms: int
    def __init__(self, text: _Optional[str] = ..., from_sequence: _Optional[int] = ..., through_sequence: _Optional[int] = ..., tokens: _Optional[int] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., is_llm: _Optional[bool] = ..., updated_at_ms: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "user_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("exists", "version", "first_sequence", "messages_stored", "summary", "pinned", "ttl_s", "keep_last_messages", "expires_in_ms", "created_at_ms", "updated_at_ms")
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_STORED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    version: int
    first_sequence: int
    messages_stored: int
    summary: SessionSummary
    pinned: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    ttl_s: int
    keep_last_messages: int
    expires_in_ms: int
    created_at_ms: int
    updated_at_ms: int
    def __init__(self, exists: _Optional[bool] = ..., version: _Optional[int] = ..., first_sequence: _Optional[int] = ..., messages_stored: _Optional[int] = ..., summary: _Optional[_Union[SessionSummary, _Mapping]] = ..., pinned: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., ttl_s: _Optional[int] = ..., keep_last_messages: _Optional[int] = ..., expires_in_ms: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ...) -> None: ...

class SetPinnedMessagesRequest(_message.Message):
    __slots__ = ("session_id", "user_id", "messages")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ...) -> None: ...

class SetPinnedMessagesResponse(_message.Message):
    __slots__ = ("pinned_tokens",)
    PINNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    pinned_tokens: int
    def __init__(self, pinned_tokens: _Optional[int] = ...) -> None: ...

class CompactSessionRequest(_message.Message):
    __slots__ = ("session_id", "user_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class CompactSessionResponse(_message.Message):
    __slots__ = ("compacted", "messages_summarized", "summary")
    COMPACTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_SUMMARIZED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    compacted: bool
    messages_summarized: int
    summary: SessionSummary
    def __init__(self, compacted: _Optional[bool] = ..., messages_summarized: _Optional[int] = ..., summary: _Optional[_Union[SessionSummary, _Mapping]] = ...) -> None: ...

class SetRetentionRequest(_message.Message):
    __slots__ = ("session_id", "user_id", "ttl_s", "keep_last_messages")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    ttl_s: int
    keep_last_messages: int
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ..., ttl_s: _Optional[int] = ..., keep_last_messages: _Optional[int] = ...) -> None: ...

class SetRetentionResponse(_message.Message):
    __slots__ = ("ttl_s", "keep_last_messages", "messages_deleted")
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_DELETED_FIELD_NUMBER: _ClassVar[int]
    ttl_s: int
    keep_last_messages: int
    messages_deleted: int
    def __init__(self, ttl_s: _Optional[int] = ..., keep_last_messages: _Optional[int] = ..., messages_deleted: _Optional[int] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id", "user_id", "keep_facts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FACTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    keep_facts: bool
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ..., keep_facts: _Optional[bool] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("existed", "messages_deleted", "facts_deleted", "facts_updated")
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_DELETED_FIELD_NUMBER: _ClassVar[int]
    FACTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    FACTS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    messages_deleted: int
    facts_deleted: int
    facts_updated: int
    def __init__(self, existed: _Optional[bool] = ..., messages_deleted: _Optional[int] = ..., facts_deleted: _Optional[int] = ..., facts_updated: _Optional[int] = ...) -> None: ...

class ForgetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("sessions_deleted", "keys_deleted", "facts_deleted")
    SESSIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    KEYS_DELETED_FIELD_NUMBER: _ClassVar[int]
    FACTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    sessions_deleted: int
    keys_deleted: int
    facts_deleted: int
    def __init__(self, sessions_deleted: _Optional[int] = ..., keys_deleted: _Optional[int] = ..., facts_deleted: _Optional[int] = ...) -> None: ...

class FactSource(_message.Message):
    __slots__ = ("session_id", "message_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message_id: str
    def __init__(self, session_id: _Optional[str] = ..., message_id: _Optional[str] = ...) -> None: ...

class Fact(_message.Message):
    __slots__ = ("fact_id", "text", "kind", "sources", "created_at_ms", "updated_at_ms", "mentions")
    FACT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MENTIONS_FIELD_NUMBER: _ClassVar[int]
    fact_id: str
    text: str
    kind: FactKind
    sources: _containers.RepeatedCompositeFieldContainer[FactSource]
    created_at_ms: int
    updated_at_ms: int
    mentions: int
    def __init__(self, fact_id: _Optional[str] = ..., text: _Optional[str] = ..., kind: _Optional[_Union[FactKind, str]] = ..., sources: _Optional[_Iterable[_Union[FactSource, _Mapping]]] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., mentions: _Optional[int] = ...) -> None: ...

class FactInput(_message.Message):
    __slots__ = ("text", "kind", "sources")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    text: str
    kind: FactKind
    sources: _containers.RepeatedCompositeFieldContainer[FactSource]
    def __init__(self, text: _Optional[str] = ..., kind: _Optional[_Union[FactKind, str]] = ..., sources: _Optional[_Iterable[_Union[FactSource, _Mapping]]] = ...) -> None: ...

class RememberFactsRequest(_message.Message):
    __slots__ = ("user_id", "facts")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    facts: _containers.RepeatedCompositeFieldContainer[FactInput]
    def __init__(self, user_id: _Optional[str] = ..., facts: _Optional[_Iterable[_Union[FactInput, _Mapping]]] = ...) -> None: ...

class RememberedFact(_message.Message):
    __slots__ = ("fact_id", "outcome", "similarity")
    FACT_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    fact_id: str
    outcome: RememberOutcome
    similarity: float
    def __init__(self, fact_id: _Optional[str] = ..., outcome: _Optional[_Union[RememberOutcome, str]] = ..., similarity: _Optional[float] = ...) -> None: ...

class RememberFactsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RememberedFact]
    def __init__(self, results: _Optional[_Iterable[_Union[RememberedFact, _Mapping]]] = ...) -> None: ...

class RecallFactsRequest(_message.Message):
    __slots__ = ("user_id", "query", "top_k", "min_similarity", "recency_weight", "recency_half_life_s", "min_score")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    RECENCY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RECENCY_HALF_LIFE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query: str
    top_k: int
    min_similarity: float
    recency_weight: float
    recency_half_life_s: int
    min_score: float
    def __init__(self, user_id: _Optional[str] = ..., query: _Optional[str] = ..., top_k: _Optional[int] = ..., min_similarity: _Optional[float] = ..., recency_weight: _Optional[float] = ..., recency_half_life_s: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class RecalledFact(_message.Message):
    __slots__ = ("fact", "similarity", "recency", "score")
    FACT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    RECENCY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    fact: Fact
    similarity: float
    recency: float
    score: float
    def __init__(self, fact: _Optional[_Union[Fact, _Mapping]] = ..., similarity: _Optional[float] = ..., recency: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class RecallFactsResponse(_message.Message):
    __slots__ = ("facts",)
    FACTS_FIELD_NUMBER: _ClassVar[int]
    facts: _containers.RepeatedCompositeFieldContainer[RecalledFact]
    def __init__(self, facts: _Optional[_Iterable[_Union[RecalledFact, _Mapping]]] = ...) -> None: ...

class ListFactsRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFactsResponse(_message.Message):
    __slots__ = ("facts", "next_page_token")
    FACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    next_page_token: str
    def __init__(self, facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteFactsRequest(_message.Message):
    __slots__ = ("user_id", "fact_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FACT_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    fact_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., fact_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteFactsResponse(_message.Message):
    __slots__ = ("facts_deleted",)
    FACTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    facts_deleted: int
    def __init__(self, facts_deleted: _Optional[int] = ...) -> None: ...
