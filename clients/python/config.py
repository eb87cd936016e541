"""One configuration for a client: where the gateway is, who calls, how long calls may take and
which calls gRPC retries on its own.

Build a :class:`ClientConfig` once and hand it to :class:`~agentmesh.client.Client` or
:class:`~agentmesh.client.AsyncClient`; every call of that client then carries its credential,
its deadline and, for idempotent methods, its retry policy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import metadata as _dist
from pathlib import Path
from typing import Literal

import grpc

#: Environment variables :meth:`ClientConfig.from_env` reads (the same as the ``agentmesh`` CLI's).
ENV_ADDRESS = "AGENTMESH_GATEWAY_ADDRESS"
ENV_TOKEN = "AGENTMESH_TOKEN"
ENV_API_KEY = "AGENTMESH_API_KEY"
ENV_TENANT = "AGENTMESH_TENANT"

DEFAULT_ADDRESS = "127.0.0.1:8080"

#: Metadata keys the gateway reads (gateway/README.md, "Authentication and authorization").
API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
TENANT_HEADER = "x-tenant-id"
REQUEST_ID_HEADER = "x-request-id"

#: The kinds of call a deadline is configured for (see :class:`Timeouts`).
CallKind = Literal["unary", "run", "generate", "ingest", "watch", "tool"]

#: Methods gRPC may send again on a retryable status: reads, and AppendMessages, which the client
#: always sends with an idempotency key (the memory service answers a repeated key with the first
#: call's result instead of appending twice). Streams (Run, StreamGenerate, WatchSession,
#: IngestDocuments...) and other writes are never re-sent; a run is resumed by id instead.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "agentmesh.agent.v1.AgentService": ("GetRun", "ListAgents"),
    "agentmesh.memory.v1.MemoryService": (
        "AppendMessages", "GetContext", "ListMessages", "GetSession", "RecallFacts", "ListFacts",
    ),
    "agentmesh.retrieval.v1.RetrievalService": ("Search", "DescribeCollection"),
    "agentmesh.llm.v1.LLMService": ("ListModels", "CountTokens", "GetSpend"),
    "agentmesh.tools.v1.ToolService": ("ListTools",),
}


def _positive_or_none(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, or None for no deadline (got {value!r})")


@dataclass(frozen=True)
class Timeouts:
    """Default deadline of each kind of call, in seconds; ``None`` means no deadline. A call's own
    ``timeout=`` argument replaces its default. The deadline bounds the whole call: every retry
    attempt of a unary call, every event of a stream.

    Attributes:
        unary_s: every unary call (GetRun, CancelRun, GetContext, Search...). 10 s.
        run_s: a whole agent run stream (Run, ResumeRun, ResolveInterrupt). 300 s.
        generate_s: LLM Generate / StreamGenerate. 120 s.
        ingest_s: one IngestDocuments upload, embedding included. 1800 s.
        watch_s: WatchSession, which is meant to stay open. None (no deadline).
        tool_s: one ExecuteTool stream (the tool service bounds each tool's own run time). 120 s.
    """

    unary_s: float | None = 10.0
    run_s: float | None = 300.0
    generate_s: float | None = 120.0
    ingest_s: float | None = 1800.0
    watch_s: float | None = None
    tool_s: float | None = 120.0

    def __post_init__(self) -> None:
        for name in ("unary_s", "run_s", "generate_s", "ingest_s", "watch_s", "tool_s"):
            _positive_or_none(f"Timeouts.{name}", getattr(self, name))

    def for_kind(self, kind: CallKind) -> float | None:
        """The default deadline of ``kind``, in seconds."""
        return getattr(self, f"{kind}_s")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retry policy (gRFC A6), applied to :data:`IDEMPOTENT_METHODS` through the
    channel's service config. gRPC retries a call only while no response has started, waits
    ``random(0, min(initial_backoff_s * backoff_multiplier ** (n-1), max_backoff_s))`` before
    attempt n+1, stays within the call's deadline, and follows a server's
    ``grpc-retry-pushback-ms``.

    Attributes:
        max_attempts: attempts per call, the first included, 1..5 (gRPC caps it at 5); 1 turns
            retries off.
        initial_backoff_s, max_backoff_s, backoff_multiplier: the back-off above, in seconds.
        retryable_codes: statuses that are retried. UNAVAILABLE only by default: the status of a
            call no server could take (no healthy upstream, connection refused, a replica
            shutting down). RESOURCE_EXHAUSTED is not retried blindly: its RetryInfo delay is on
            the raised :class:`~agentmesh.client.AgentMeshError`.
        throttle_max_tokens, throttle_token_ratio: gRPC retry throttling; each failed call costs
            1 token, each success returns ``throttle_token_ratio``; retries stop while fewer than
            half the tokens are left, so a down gateway is not hammered. ``None`` turns it off.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
    throttle_max_tokens: int | None = 10
    throttle_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"RetryPolicy.max_attempts must be 1..5 (gRPC's limit), got {self.max_attempts}")
        if not (0 < self.initial_backoff_s <= self.max_backoff_s):
            raise ValueError("RetryPolicy needs 0 < initial_backoff_s <= max_backoff_s")
        if not self.backoff_multiplier > 0:
            raise ValueError("RetryPolicy.backoff_multiplier must be > 0")
        if self.max_attempts > 1 and not self.retryable_codes:
            raise ValueError("RetryPolicy.retryable_codes is empty: use max_attempts=1 to turn retries off")
        if grpc.StatusCode.OK in self.retryable_codes:
            raise ValueError("OK is not a retryable status")
        tokens = self.throttle_max_tokens
        if tokens is not None and (not isinstance(tokens, int) or not 1 <= tokens <= 1000):
            raise ValueError("RetryPolicy.throttle_max_tokens must be a whole number 1..1000, or None")
        if not self.throttle_token_ratio > 0:
            raise ValueError("RetryPolicy.throttle_token_ratio must be > 0")

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """No retries: every call is sent once."""
        return cls(max_attempts=1)

    def service_config(self) -> dict | None:
        """The service config (gRPC's JSON form) carrying this policy; None when retries are off."""
        if self.max_attempts == 1:
            return None
        names = [
            {"service": service, "method": method}
            for service, methods in IDEMPOTENT_METHODS.items()
            for method in methods
        ]
        config: dict = {
            "methodConfig": [{
                "name": names,
                "retryPolicy": {
                    "maxAttempts": self.max_attempts,
                    "initialBackoff": f"{self.initial_backoff_s:.9f}s",
                    "maxBackoff": f"{self.max_backoff_s:.9f}s",
                    "backoffMultiplier": self.backoff_multiplier,
                    "retryableStatusCodes": [code.name for code in self.retryable_codes],
                },
            }],
        }
        if self.throttle_max_tokens is not None:
            config["retryThrottling"] = {
                "maxTokens": self.throttle_max_tokens, "tokenRatio": self.throttle_token_ratio,
            }
        return config


def _version() -> str:
    try:
        return _dist.version("agentmesh")
    except _dist.PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class ClientConfig:
    """Where and how a client calls the AgentMesh gateway.

    Attributes:
        address: ``host:port`` of the gateway (any gRPC target, e.g. ``dns:///gw.example.com:443``).
        api_key: gateway API key, sent as ``x-api-key``.
        token: bearer JWT, sent as ``authorization: Bearer <token>``. Set ``api_key`` or
            ``token``, not both (the gateway would judge the call by the key alone). A local mesh
            in dev mode needs neither.
        tenant: sent as ``x-tenant-id``. Behind an authenticating gateway it must be the
            credential's tenant (PERMISSION_DENIED otherwise); leave it None to mean "my
            credential's tenant". In dev mode it selects the tenant (None: ``default``).
        tls: connect with TLS (required when credentials cross a network you do not trust).
        root_certificates: PEM bundle the server certificate must chain to; None means gRPC's
            default roots. Only with ``tls``.
        tls_server_name: name the server certificate is checked against when it differs from the
            host in ``address``. Only with ``tls``.
        timeouts: default deadline per kind of call.
        retry: gRPC retry policy of the idempotent methods.
        max_message_bytes: largest message sent or received, in bytes (the mesh's limit: 4 MiB).
        keepalive_time_ms: interval of HTTP/2 keepalive pings on an idle connection, in ms, so a
            dead connection is noticed while a long stream waits for events.
    """

    address: str = DEFAULT_ADDRESS
    api_key: str | None = None
    token: str | None = None
    tenant: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    tls_server_name: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_message_bytes: int = 4 * 1024 * 1024
    keepalive_time_ms: int = 30_000

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("ClientConfig.address is empty: give the gateway's host:port")
        if self.api_key and self.token:
            raise ValueError(
                "set api_key or token, not both: the gateway judges a call carrying x-api-key by the key alone"
            )
        if (self.root_certificates is not None or self.tls_server_name) and not self.tls:
            raise ValueError("root_certificates and tls_server_name need tls=True")
        if self.max_message_bytes <= 0 or self.keepalive_time_ms <= 0:
            raise ValueError("max_message_bytes and keepalive_time_ms must be positive")

    @classmethod
    def from_env(cls, **overrides: object) -> ClientConfig:
        """A config from the environment, as the ``agentmesh`` CLI reads it:
        ``AGENTMESH_GATEWAY_ADDRESS`` (else 127.0.0.1:8080), ``AGENTMESH_TOKEN``,
        ``AGENTMESH_API_KEY``, ``AGENTMESH_TENANT``. Keyword arguments that are not None win
        over the environment. ValueError when both a token and an API key end up set."""
        values: dict[str, object] = {
            "address": os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS,
            "token": os.environ.get(ENV_TOKEN) or None,
            "api_key": os.environ.get(ENV_API_KEY) or None,
            "tenant": os.environ.get(ENV_TENANT) or None,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)  # type: ignore[arg-type]

    @staticmethod
    def read_root_certificates(path: str | Path) -> bytes:
        """The PEM file at ``path``, for ``root_certificates``."""
        return Path(path).read_bytes()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Credential and tenant metadata sent with every call."""
        md: list[tuple[str, str]] = []
        if self.tenant:
            md.append((TENANT_HEADER, self.tenant))
        if self.token:
            md.append((AUTHORIZATION_HEADER, f"Bearer {self.token}"))
        if self.api_key:
            md.append((API_KEY_HEADER, self.api_key))
        return tuple(md)

    def channel_options(self) -> list[tuple[str, object]]:
        """gRPC channel arguments: message limits, keepalive, user agent and the retry policy."""
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.primary_user_agent", f"agentmesh-python/{_version()}"),
        ]
        service_config = self.retry.service_config()
        if service_config is not None:
            options.append(("grpc.enable_retries", 1))
            options.append(("grpc.service_config", json.dumps(service_config)))
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for a plaintext channel."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
