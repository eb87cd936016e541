from agentmesh.common.v1 import common_pb2 as _common_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OnDisconnect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_DISCONNECT_UNSPECIFIED: _ClassVar[OnDisconnect]
    ON_DISCONNECT_CANCEL: _ClassVar[OnDisconnect]
    ON_DISCONNECT_CONTINUE: _ClassVar[OnDisconnect]

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_COMPLETED: _ClassVar[RunStatus]
    RUN_STATUS_MAX_STEPS: _ClassVar[RunStatus]
    RUN_STATUS_BUDGET_EXHAUSTED: _ClassVar[RunStatus]
    RUN_STATUS_CANCELLED: _ClassVar[RunStatus]
    RUN_STATUS_INTERRUPTED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]

class AgentRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_ROLE_UNSPECIFIED: _ClassVar[AgentRole]
    AGENT_ROLE_SINGLE: _ClassVar[AgentRole]
    AGENT_ROLE_STAGE: _ClassVar[AgentRole]
    AGENT_ROLE_BRANCH: _ClassVar[AgentRole]
    AGENT_ROLE_AGGREGATOR: _ClassVar[AgentRole]
    AGENT_ROLE_SUPERVISOR: _ClassVar[AgentRole]
    AGENT_ROLE_SPECIALIST: _ClassVar[AgentRole]

class RunPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_PHASE_UNSPECIFIED: _ClassVar[RunPhase]
    RUN_PHASE_RUNNING: _ClassVar[RunPhase]
    RUN_PHASE_INTERRUPTED: _ClassVar[RunPhase]
    RUN_PHASE_FINISHED: _ClassVar[RunPhase]
ON_DISCONNECT_UNSPECIFIED: OnDisconnect
ON_DISCONNECT_CANCEL: OnDisconnect
ON_DISCONNECT_CONTINUE: OnDisconnect
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_COMPLETED: RunStatus
RUN_STATUS_MAX_STEPS: RunStatus
RUN_STATUS_BUDGET_EXHAUSTED: RunStatus
RUN_STATUS_CANCELLED: RunStatus
RUN_STATUS_INTERRUPTED: RunStatus
RUN_STATUS_FAILED: RunStatus
AGENT_ROLE_UNSPECIFIED: AgentRole
AGENT_ROLE_SINGLE: AgentRole
AGENT_ROLE_STAGE: AgentRole
AGENT_ROLE_BRANCH: AgentRole
AGENT_ROLE_AGGREGATOR: AgentRole
AGENT_ROLE_SUPERVISOR: AgentRole
AGENT_ROLE_SPECIALIST: AgentRole
RUN_PHASE_UNSPECIFIED: RunPhase
RUN_PHASE_RUNNING: RunPhase
RUN_PHASE_INTERRUPTED: RunPhase
RUN_PHASE_FINISHED: RunPhase

class RunRequest(_message.Message):
    __slots__ = ("session_id", "input", "model", "tools", "max_steps", "max_tokens", "collection", "top_k", "disable_retrieval", "agent", "on_disconnect", "user_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DISABLE_RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: str
    model: str
    tools: _containers.RepeatedScalarFieldContainer[str]
    max_steps: int
    max_tokens: int
    collection: str
    top_k: int
    disable_retrieval: bool
    agent: str
    on_disconnect: OnDisconnect
    user_id: str
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[str] = ..., model: _Optional[str] = ..., tools: _Optional[_Iterable[str]] = ..., max_steps: _Optional[int] = ..., max_tokens: _Optional[int] = ..., collection: _Optional[str] = ..., top_k: _Optional[int] = ..., disable_retrieval: _Optional[bool] = ..., agent: _Optional[str] = ..., on_disconnect: _Optional[_Union[OnDisconnect, str]] = ..., user_id: _Optional[str] = ...) -> None: ...

class RunStarted(_message.Message):
    __slots__ = ("run_id", "session_id", "request_id", "agent")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    request_id: str
    agent: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., agent: _Optional[str] = ...) -> None: ...

class MemoryLoaded(_message.Message):
    __slots__ = ("messages", "tokens", "messages_omitted", "facts", "notice")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    messages: int
    tokens: int
    messages_omitted: int
    facts: int
    notice: str
    def __init__(self, messages: _Optional[int] = ..., tokens: _Optional[int] = ..., messages_omitted: _Optional[int] = ..., facts: _Optional[int] = ..., notice: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("tool_call_id", "name", "output", "is_error", "error_message", "duration_ms", "replayed")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    name: str
    output: _struct_pb2.Value
    is_error: bool
    error_message: str
    duration_ms: int
    replayed: bool
    def __init__(self, tool_call_id: _Optional[str] = ..., name: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., is_error: _Optional[bool] = ..., error_message: _Optional[str] = ..., duration_ms: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RunCompleted(_message.Message):
    __slots__ = ("status", "output", "usage", "citations", "steps", "session_version", "cost_usd")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    output: str
    usage: _common_pb2.Usage
    citations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Citation]
    steps: int
    session_version: int
    cost_usd: float
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., output: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., citations: _Optional[_Iterable[_Union[_common_pb2.Citation, _Mapping]]] = ..., steps: _Optional[int] = ..., session_version: _Optional[int] = ..., cost_usd: _Optional[float] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("sequence", "started", "memory_loaded", "retrieval", "step_started", "text_delta", "tool_call", "tool_progress", "tool_result", "final", "agent_started", "agent_completed", "handoff", "interrupt", "interrupt_resolved", "resumed", "step_completed", "agent", "invocation_id", "step")
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
    AGENT_STARTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    STEP_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
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
    agent_started: AgentStarted
    agent_completed: AgentCompleted
    handoff: Handoff
    interrupt: RunInterrupted
    interrupt_resolved: InterruptResolved
    resumed: RunResumed
    step_completed: StepCompleted
    agent: str
    invocation_id: str
    step: int
    def __init__(self, sequence: _Optional[int] = ..., started: _Optional[_Union[RunStarted, _Mapping]] = ..., memory_loaded: _Optional[_Union[MemoryLoaded, _Mapping]] = ..., retrieval: _Optional[_Union[RetrievalCompleted, _Mapping]] = ..., step_started: _Optional[_Union[StepStarted, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCallStarted, _Mapping]] = ..., tool_progress: _Optional[_Union[ToolCallProgress, _Mapping]] = ..., tool_result: _Optional[_Union[ToolCallCompleted, _Mapping]] = ..., final: _Optional[_Union[RunCompleted, _Mapping]] = ..., agent_started: _Optional[_Union[AgentStarted, _Mapping]] = ..., agent_completed: _Optional[_Union[AgentCompleted, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ..., interrupt: _Optional[_Union[RunInterrupted, _Mapping]] = ..., interrupt_resolved: _Optional[_Union[InterruptResolved, _Mapping]] = ..., resumed: _Optional[_Union[RunResumed, _Mapping]] = ..., step_completed: _Optional[_Union[StepCompleted, _Mapping]] = ..., agent: _Optional[str] = ..., invocation_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class AgentStarted(_message.Message):
    __slots__ = ("agent", "invocation_id", "parent_invocation_id", "role", "input")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    agent: str
    invocation_id: str
    parent_invocation_id: str
    role: AgentRole
    input: str
    def __init__(self, agent: _Optional[str] = ..., invocation_id: _Optional[str] = ..., parent_invocation_id: _Optional[str] = ..., role: _Optional[_Union[AgentRole, str]] = ..., input: _Optional[str] = ...) -> None: ...

class AgentCompleted(_message.Message):
    __slots__ = ("agent", "invocation_id", "status", "output", "usage", "cost_usd", "steps")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    invocation_id: str
    status: RunStatus
    output: str
    usage: _common_pb2.Usage
    cost_usd: float
    steps: int
    def __init__(self, agent: _Optional[str] = ..., invocation_id: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., output: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_usd: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("from_agent", "from_invocation_id", "to_agent", "to_invocation_id", "tool_call_id", "task")
    FROM_AGENT_FIELD_NUMBER: _ClassVar[int]
    FROM_INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    TO_AGENT_FIELD_NUMBER: _ClassVar[int]
    TO_INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    from_agent: str
    from_invocation_id: str
    to_agent: str
    to_invocation_id: str
    tool_call_id: str
    task: str
    def __init__(self, from_agent: _Optional[str] = ..., from_invocation_id: _Optional[str] = ..., to_agent: _Optional[str] = ..., to_invocation_id: _Optional[str] = ..., tool_call_id: _Optional[str] = ..., task: _Optional[str] = ...) -> None: ...

class ApprovalRequest(_message.Message):
    __slots__ = ("invocation_id", "agent", "step", "tool_call")
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    invocation_id: str
    agent: str
    step: int
    tool_call: _common_pb2.ToolCall
    def __init__(self, invocation_id: _Optional[str] = ..., agent: _Optional[str] = ..., step: _Optional[int] = ..., tool_call: _Optional[_Union[_common_pb2.ToolCall, _Mapping]] = ...) -> None: ...

class RunInterrupted(_message.Message):
    __slots__ = ("interrupt_id", "approvals")
    INTERRUPT_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    interrupt_id: str
    approvals: _containers.RepeatedCompositeFieldContainer[ApprovalRequest]
    def __init__(self, interrupt_id: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[ApprovalRequest, _Mapping]]] = ...) -> None: ...

class ToolCallDecision(_message.Message):
    __slots__ = ("tool_call_id", "approved", "reason", "invocation_id", "arguments")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    approved: bool
    reason: str
    invocation_id: str
    arguments: _struct_pb2.Struct
    def __init__(self, tool_call_id: _Optional[str] = ..., approved: _Optional[bool] = ..., reason: _Optional[str] = ..., invocation_id: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class InterruptResolved(_message.Message):
    __slots__ = ("interrupt_id", "decisions")
    INTERRUPT_ID_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    interrupt_id: str
    decisions: _containers.RepeatedCompositeFieldContainer[ToolCallDecision]
    def __init__(self, interrupt_id: _Optional[str] = ..., decisions: _Optional[_Iterable[_Union[ToolCallDecision, _Mapping]]] = ...) -> None: ...

class RunResumed(_message.Message):
    __slots__ = ("replica", "discarded_after_sequence", "reason")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    replica: str
    discarded_after_sequence: int
    reason: str
    def __init__(self, replica: _Optional[str] = ..., discarded_after_sequence: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StepCompleted(_message.Message):
    __slots__ = ("duration_ms", "model_ms", "tools_ms", "overhead_ms", "tool_calls")
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_MS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_MS_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    duration_ms: float
    model_ms: float
    tools_ms: float
    overhead_ms: float
    tool_calls: int
    def __init__(self, duration_ms: _Optional[float] = ..., model_ms: _Optional[float] = ..., tools_ms: _Optional[float] = ..., overhead_ms: _Optional[float] = ..., tool_calls: _Optional[int] = ...) -> None: ...

class ResumeRunRequest(_message.Message):
    __slots__ = ("run_id", "after_sequence")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_sequence: int
    def __init__(self, run_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class ResumeRunResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: RunResponse
    def __init__(self, event: _Optional[_Union[RunResponse, _Mapping]] = ...) -> None: ...

class ResolveInterruptRequest(_message.Message):
    __slots__ = ("run_id", "interrupt_id", "decisions")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_ID_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    interrupt_id: str
    decisions: _containers.RepeatedCompositeFieldContainer[ToolCallDecision]
    def __init__(self, run_id: _Optional[str] = ..., interrupt_id: _Optional[str] = ..., decisions: _Optional[_Iterable[_Union[ToolCallDecision, _Mapping]]] = ...) -> None: ...

class ResolveInterruptResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: RunResponse
    def __init__(self, event: _Optional[_Union[RunResponse, _Mapping]] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "session_id", "agent", "phase", "status", "last_sequence", "first_sequence", "steps", "usage", "cost_usd", "output", "interrupt", "created_at_ms", "updated_at_ms", "error_message", "replica", "user_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    agent: str
    phase: RunPhase
    status: RunStatus
    last_sequence: int
    first_sequence: int
    steps: int
    usage: _common_pb2.Usage
    cost_usd: float
    output: str
    interrupt: RunInterrupted
    created_at_ms: int
    updated_at_ms: int
    error_message: str
    replica: str
    user_id: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., agent: _Optional[str] = ..., phase: _Optional[_Union[RunPhase, str]] = ..., status: _Optional[_Union[RunStatus, str]] = ..., last_sequence: _Optional[int] = ..., first_sequence: _Optional[int] = ..., steps: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_usd: _Optional[float] = ..., output: _Optional[str] = ..., interrupt: _Optional[_Union[RunInterrupted, _Mapping]] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., error_message: _Optional[str] = ..., replica: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("name", "kind", "description", "members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...
