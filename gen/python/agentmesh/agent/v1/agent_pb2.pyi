from agentmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_COMPLETED: _ClassVar[RunStatus]
    RUN_STATUS_MAX_STEPS: _ClassVar[RunStatus]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_COMPLETED: RunStatus
RUN_STATUS_MAX_STEPS: RunStatus

class RunRequest(_message.Message):
    __slots__ = ("session_id", "input", "model", "tools", "max_steps", "max_tokens", "collection", "top_k", "disable_retrieval")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DISABLE_RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: str
    model: str
    tools: _containers.RepeatedScalarFieldContainer[str]
    max_steps: int
    max_tokens: int
    collection: str
    top_k: int
    disable_retrieval: bool
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[str] = ..., model: _Optional[str] = ..., tools: _Optional[_Iterable[str]] = ..., max_steps: _Optional[int] = ..., max_tokens: _Optional[int] = ..., collection: _Optional[str] = ..., top_k: _Optional[int] = ..., disable_retrieval: _Optional[bool] = ...) -> None: ...

class RunStarted(_message.Message):
    __slots__ = ("run_id", "session_id", "request_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    request_id: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class MemoryLoaded(_message.Message):
    __slots__ = ("messages", "tokens", "messages_omitted")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    messages: int
    tokens: int
    messages_omitted: int
    def __init__(self, messages: _Optional[int] = ..., tokens: _Optional[int] = ..., messages_omitted: _Optional[int] = ...) -> None: ...

class RetrievalCompleted(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Chunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[_common_pb2.Chunk, _Mapping]]] = ...) -> None: ...

class StepStarted(_message.Message):
    __slots__ = ("step", "provider", "model", "is_llm", "notice")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IS_LLM_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    step: int
    provider: str
    model: str
    is_llm: bool
    notice: str
    def __init__(self, step: _Optional[int] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., is_llm: _Optional[bool] = ..., notice: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ToolCallStarted(_message.Message):
    __slots__ = ("tool_call",)
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    tool_call: _common_pb2.ToolCall
    def __init__(self, tool_call: _Optional[_Union[_common_pb2.ToolCall, _Mapping]] = ...) -> None: ...

class ToolCallProgress(_message.Message):
    __slots__ = ("tool_call_id", "message", "fraction")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    message: str
    fraction: float
    def __init__(self, tool_call_id: _Optional[str] = ..., message: _Optional[str] = ..., fraction: _Optional[float] = ...) -> None: ...

class ToolCallCompleted(_message.Message):
    __slots__ = ("tool_call_id", "name", "output", "is_error", "error_message", "duration_ms")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    name: str
    output: _struct_pb2.Value
    is_error: bool
    error_message: str
    duration_ms: int
    def __init__(self, tool_call_id: _Optional[str] = ..., name: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., is_error: _Optional[bool] = ..., error_message: _Optional[str] = ..., duration_ms: _Optional[int] = ...) -> None: ...

class RunCompleted(_message.Message):
    __slots__ = ("status", "output", "usage", "citations", "steps", "session_version")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    output: str
    usage: _common_pb2.Usage
    citations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Citation]
    steps: int
    session_version: int
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., output: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., citations: _Optional[_Iterable[_Union[_common_pb2.Citation, _Mapping]]] = ..., steps: _Optional[int] = ..., session_version: _Optional[int] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("sequence", "started", "memory_loaded", "retrieval", "step_started", "text_delta", "tool_call", "tool_progress", "tool_result", "final")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LOADED_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    STEP_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    started: RunStarted
    memory_loaded: MemoryLoaded
    retrieval: RetrievalCompleted
    step_started: StepStarted
    text_delta: TextDelta
    tool_call: ToolCallStarted
    tool_progress: ToolCallProgress
    tool_result: ToolCallCompleted
    final: RunCompleted
    def __init__(self, sequence: _Optional[int] = ..., started: _Optional[_Union[RunStarted, _Mapping]] = ..., memory_loaded: _Optional[_Union[MemoryLoaded, _Mapping]] = ..., retrieval: _Optional[_Union[RetrievalCompleted, _Mapping]] = ..., step_started: _Optional[_Union[StepStarted, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCallStarted, _Mapping]] = ..., tool_progress: _Optional[_Union[ToolCallProgress, _Mapping]] = ..., tool_result: _Optional[_Union[ToolCallCompleted, _Mapping]] = ..., final: _Optional[_Union[RunCompleted, _Mapping]] = ...) -> None: ...
