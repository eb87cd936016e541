"""The checkpoint of a run: everything needed to continue it on any replica, as JSON in Redis.

A run is a tree of agent *invocations* (one for a single agent; stages, branches, an aggregator,
a supervisor and its specialists for workflows), each a small state machine::

    start ──(memory, retrieval)──▶ model ──(tool calls)──▶ tools ──(results)──▶ model ... ──▶ done

A checkpoint is written after every phase change, so a replica that takes a run over repeats at
most the step that was in flight: a model call is made again, a tool call is sent again with the
same idempotency key (the tool service answers a repeated key with the first call's result).
Protobuf messages are kept as their serialized bytes (base64 in the JSON): compact, fast, and
exactly what the next request sends.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agentmesh.agent.v1 import agent_pb2
from agentmesh.common.v1 import common_pb2

#: Bytes fields serialize as base64 in the JSON checkpoint.
_BYTES_AS_BASE64 = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class Usage(BaseModel):
    """Tokens and cost of model calls, summed."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, usage: common_pb2.Usage, cost_usd: float) -> None:
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.total_tokens += usage.total_tokens or usage.input_tokens + usage.output_tokens
        self.cost_usd += cost_usd

    def proto(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            input_tokens=self.input_tokens, output_tokens=self.output_tokens, total_tokens=self.total_tokens
        )


class Decision(BaseModel):
    model_config = _BYTES_AS_BASE64

    approved: bool
    reason: str = ""
    #: The reviewer's arguments for an approved call (a serialized ``google.protobuf.Struct``);
    #: None runs the model's.
    arguments: bytes | None = None


class Invocation(BaseModel):
    """One agent invocation within a run."""

    model_config = _BYTES_AS_BASE64

    id: str
    agent: str
    #: Invocation that started it (a specialist's supervisor); "" otherwise.
    parent: str = ""
    role: int = agent_pb2.AGENT_ROLE_SINGLE
    #: Its input: the user message it starts from.
    task: str
    phase: Literal["start", "model", "tools", "done"] = "start"
    #: Model calls made (the current one included while it runs).
    step: int = 0
    #: The conversation sent to the model: serialized ``common.v1.Message``.
    messages: list[bytes] = Field(default_factory=list)
    #: Index in ``messages`` of this turn's user message (what precedes it is system + history).
    turn_start: int = 0
    #: Context chunks (serialized ``common.v1.Chunk``), numbered [1]..[n] for citations.
    context: list[bytes] = Field(default_factory=list)
    #: Tool calls of the current step (serialized ``common.v1.ToolCall``), while in ``tools``.
    calls: list[bytes] = Field(default_factory=list)
    #: Results of the current step's calls so far (serialized ``agent.v1.ToolCallCompleted``).
    results: dict[str, bytes] = Field(default_factory=dict)
    #: Decisions on the current step's calls that wait for approval.
    decisions: dict[str, Decision] = Field(default_factory=dict)
    #: All answer text of the invocation, in order.
    output: str = ""
    #: RunStatus once done, and why it stopped early (BUDGET_EXHAUSTED).
    status: int = 0
    stop_reason: str = ""
    usage: Usage = Field(default_factory=Usage)


class PendingApproval(BaseModel):
    invocation: str
    tool_call_id: str


class Interrupt(BaseModel):
    id: str
    approvals: list[PendingApproval]


class RunState(BaseModel):
    """The whole run (see the module docstring)."""

    model_config = _BYTES_AS_BASE64

    run_id: str
    tenant: str
    session_id: str
    #: The user the run acts for (memory scope); "" = the memory service's default user.
    user_id: str = ""
    #: Request id of the call that started the run.
    request_id: str = ""
    #: The agent or workflow run, and its definition when the run started (agents.Catalog.snapshot).
    target: str
    snapshot: dict
    #: The RunRequest (serialized).
    request: bytes
    on_disconnect: int = agent_pb2.ON_DISCONNECT_CANCEL
    phase: Literal["running", "interrupted", "finished"] = "running"
    #: RunStatus: how it ended (INTERRUPTED while paused).
    status: int = 0
    #: gRPC status code name and message of a FAILED run; why a run was CANCELLED or stopped
    #: with BUDGET_EXHAUSTED.
    error_code: str = ""
    error_message: str = ""
    #: Last event sequence covered by this checkpoint.
    sequence: int = 0
    invocations: dict[str, Invocation] = Field(default_factory=dict)
    #: Workflow slot ("single", "stage:0", "branch:1", "aggregator", "supervisor",
    #: "handoff:<invocation>:<tool call id>") → invocation id, so a resumed run finds its invocations.
    slots: dict[str, str] = Field(default_factory=dict)
    interrupt: Interrupt | None = None
    usage: Usage = Field(default_factory=Usage)
    #: Model calls of every invocation.
    steps: int = 0
    output: str = ""
    session_version: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0
    #: Replica that runs (or last ran) it.
    replica: str = ""

    def new_invocation_id(self, agent: str) -> str:
        """``agent`` for its first invocation in the run, then ``agent#2``, ``agent#3``..."""
        n = sum(1 for inv in self.invocations.values() if inv.agent == agent)
        return agent if n == 0 else f"{agent}#{n + 1}"
