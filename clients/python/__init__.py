"""Typed Python client for AgentMesh (async and sync) over the generated gRPC stubs.

>>> from agentmesh.client import Client, ClientConfig
>>> with Client(ClientConfig(address="127.0.0.1:8080")) as client:
...     final = client.agent.run("How do I parse JSON?", session_id="demo").result()

- :class:`ClientConfig` (with :class:`Timeouts` and :class:`RetryPolicy`): gateway address,
  credential (API key or bearer JWT), tenant, TLS, deadlines per kind of call, gRPC retry policy.
- :class:`Client` / :class:`AsyncClient`: ``.agent`` (runs, resume, approvals, cancel),
  ``.sessions`` (memory), ``.documents`` (ingestion, search), ``.llm`` (completions),
  ``.stubs`` (every generated stub).
- :class:`AgentMeshError` and one subclass per status code; ``retry_delay_s`` from RetryInfo.

See clients/python/README.md.
"""

from agentmesh.client._base import IngestProgress, Stubs
from agentmesh.client.aio import AsyncClient
from agentmesh.client.config import IDEMPOTENT_METHODS, ClientConfig, RetryPolicy, Timeouts
from agentmesh.client.errors import (
    AbortedError,
    AgentMeshError,
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    StreamLostError,
    UnavailableError,
    UnimplementedError,
    error_from_rpc,
)
from agentmesh.client.streams import AsyncRunStream, AsyncStream, RunStream, Stream
from agentmesh.client.sync import Client

__all__ = [
    "IDEMPOTENT_METHODS",
    "AbortedError",
    "AgentMeshError",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncRunStream",
    "AsyncStream",
    "CancelledError",
    "Client",
    "ClientConfig",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "IngestProgress",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RunStream",
    "Stream",
    "Stubs",
    "Timeouts",
    "UnauthenticatedError",
    "StreamLostError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_rpc",
]
