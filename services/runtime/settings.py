"""Typed settings shared by every service, read from the environment (pydantic-settings).

Each service subclasses :class:`ServiceSettings` with its own env prefix, e.g.
``AGENTMESH_MEMORY_PORT``. :class:`MeshSettings` holds what every process needs to know about the
others (their addresses) and is read with the ``AGENTMESH_`` prefix. Invalid values fail at
start with a pydantic ``ValidationError`` naming the variable.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Default local ports, one per service (the gateway listens on 8080).
DEFAULT_PORTS = {
    "orchestrator": 50051,
    "llm": 50052,
    "retrieval": 50053,
    "memory": 50054,
    "tools": 50055,
}

#: gRPC service names registered by each service (also the health-check service names).
SERVICE_NAMES = {
    "orchestrator": "agentmesh.agent.v1.AgentService",
    "llm": "agentmesh.llm.v1.LLMService",
    "retrieval": "agentmesh.retrieval.v1.RetrievalService",
    "memory": "agentmesh.memory.v1.MemoryService",
    "tools": "agentmesh.tools.v1.ToolService",
}


class ServiceSettings(BaseSettings):
    """Settings every gRPC server has. Subclasses set ``env_prefix``."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on ('0.0.0.0' in containers).")
    port: int = Field(0, ge=0, le=65535, description="Port to listen on; 0 = the service default.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent, in bytes."
    )
    max_concurrent_streams: int = Field(
        1000, ge=1, description="Most RPCs one server handles at once; more wait in HTTP/2."
    )
    grace_period_s: float = Field(
        20.0, ge=0, description="On SIGTERM, how long in-flight RPCs may run before they are cancelled."
    )
    min_deadline_ms: int = Field(
        20,
        ge=0,
        description="A call whose remaining deadline is shorter than this is refused with "
        "DEADLINE_EXCEEDED before any work starts.",
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="Seconds after which the server asks a client to move to a new connection "
        "(HTTP/2 GOAWAY; gRPC's MAX_CONNECTION_AGE, gRFC A9, +-10 % jitter), so callers re-resolve "
        "DNS and spread over replicas added since; 0 = never.",
    )
    max_connection_age_grace_s: float = Field(
        3600.0,
        ge=0,
        description="How long calls in flight on a connection past its age may still run before "
        "it is closed (long streams: agent runs, generations, session watches); 0 = no limit.",
    )
    readiness_interval_s: float = Field(
        1.0, gt=0, description="How often the readiness probe behind grpc.health.v1 runs, in seconds."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    gc_freeze: bool = Field(
        True,
        description="Once started, move every object alive into the garbage collector's permanent "
        "generation (gc.freeze), so full collections stop rescanning the start-up heap (imports, "
        "catalogues, models) while requests wait: on the router, full-collection pauses fell from "
        "25-40 ms to ~2 ms (services/llm/README.md).",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (on `host`); 0 = no endpoint. Env: "
        "AGENTMESH_<KIND>_METRICS_PORT.",
    )


class MeshSettings(BaseSettings):
    """Where the services are. Each address is a gRPC target: ``host:port``, ``dns:///name:port``
    (every address the name resolves to) or ``ipv4:host:port,host:port`` (several replicas);
    calls are balanced over them (:mod:`~agentmesh.services.runtime.clients`)."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_", extra="ignore")

    llm_address: str = f"127.0.0.1:{DEFAULT_PORTS['llm']}"
    retrieval_address: str = f"127.0.0.1:{DEFAULT_PORTS['retrieval']}"
    memory_address: str = f"127.0.0.1:{DEFAULT_PORTS['memory']}"
    tools_address: str = f"127.0.0.1:{DEFAULT_PORTS['tools']}"
    orchestrator_address: str = f"127.0.0.1:{DEFAULT_PORTS['orchestrator']}"
    default_call_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of a downstream call when the caller set none, in seconds."
    )
