"""Typed errors: every failed call raises an :class:`AgentMeshError` (or the subclass of its
status code) carrying the gRPC status code, the server's message, the request id the call was
sent with, and the ``google.rpc`` status details (``grpc-status-details-bin``), RetryInfo's delay
among them."""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The google.rpc detail messages (ErrorInfo, RetryInfo, QuotaFailure, BadRequest...) by full name,
# so packed details come back as their own type.
_DETAIL_TYPES: dict[str, type[message.Message]] = {
    descriptor.full_name: getattr(error_details_pb2, name)
    for name, descriptor in error_details_pb2.DESCRIPTOR.message_types_by_name.items()
}


class AgentMeshError(Exception):
    """A call ended with a non-OK gRPC status.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``).
        message: the server's message (or gRPC's, for a call that never reached a server).
        request_id: the ``x-request-id`` the call was sent with; the gateway and every service log
            the call under it. Empty when unknown.
        details: the status details, unpacked to their ``google.rpc`` types (RetryInfo,
            QuotaFailure, BadRequest, ErrorInfo...); unknown types stay ``google.protobuf.Any``.
        retry_delay_s: the delay in seconds the server asks for before a retry (its RetryInfo),
            None when it gave none. The LLM router sets it on RESOURCE_EXHAUSTED (a rate limit or
            budget) and on UNAVAILABLE (open circuit breakers).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        request_id: str = "",
        details: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details
        self.retry_delay_s: float | None = None
        for detail in details:
            if isinstance(detail, error_details_pb2.RetryInfo):
                self.retry_delay_s = detail.retry_delay.ToNanoseconds() / 1e9

    def detail(self, kind: type[message.Message]) -> Any | None:
        """The first status detail of type ``kind`` (e.g. ``error_details_pb2.QuotaFailure``)."""
        return next((d for d in self.details if isinstance(d, kind)), None)


class CancelledError(AgentMeshError):
    """CANCELLED: the call was cancelled (by this client, or the server went away mid-call)."""


class InvalidArgumentError(AgentMeshError):
    """INVALID_ARGUMENT: the request is malformed; the message says which field and why."""


class DeadlineExceededError(AgentMeshError):
    """DEADLINE_EXCEEDED: the call's deadline passed (or left less than the server's minimum)."""


class NotFoundError(AgentMeshError):
    """NOT_FOUND: an unknown run, agent, tool, collection... (or one of another tenant)."""


class AlreadyExistsError(AgentMeshError):
    """ALREADY_EXISTS: e.g. a collection created again with other settings."""


class PermissionDeniedError(AgentMeshError):
    """PERMISSION_DENIED: the credential lacks the role, or names another tenant."""


class ResourceExhaustedError(AgentMeshError):
    """RESOURCE_EXHAUSTED: a rate limit, token budget or size limit; see ``retry_delay_s``."""


class FailedPreconditionError(AgentMeshError):
    """FAILED_PRECONDITION: the target is not in the state the call needs (a run already finished,
    an idempotency key reused with other content, a session not at ``min_version``)."""


class AbortedError(AgentMeshError):
    """ABORTED: the call lost a race (another compaction of the session is running, a run id
    collided); calling again is safe."""


class OutOfRangeError(AgentMeshError):
    """OUT_OF_RANGE: e.g. resuming a run after events that are no longer stored."""


class UnimplementedError(AgentMeshError):
    """UNIMPLEMENTED: the gateway routes no such method."""


class InternalError(AgentMeshError):
    """INTERNAL: a server bug, or a stream reset by a replica that died mid-stream."""


class UnavailableError(AgentMeshError):
    """UNAVAILABLE: no server could take the call (down, overloaded, shutting down). Idempotent
    unary calls were already retried by gRPC before this is raised."""


class StreamLostError(UnavailableError):
    """The stream was reset mid-way by the transport (the replica serving it died after its
    first response byte; Envoy can then only reset the HTTP/2 stream, which gRPC reports as
    INTERNAL "Stream removed (RST_STREAM ...)"). Reported as UNAVAILABLE because nothing failed
    in the server's logic: resume a run with ``stream.resume()`` / ResumeRun on another replica
    (see gateway/README.md, "A replica dies mid-stream")."""


class UnauthenticatedError(AgentMeshError):
    """UNAUTHENTICATED: the credential is missing, malformed, expired or unknown."""


_BY_CODE: dict[grpc.StatusCode, type[AgentMeshError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def _unpack(detail: any_pb2.Any) -> Any:
    kind = _DETAIL_TYPES.get(detail.TypeName())
    if kind is None:
        return detail
    unpacked = kind()
    return unpacked if detail.Unpack(unpacked) else detail


#: Statuses a proxy's reset of a stream shows up as (Envoy resets a stream whose response has
#: begun when its copy of the call's deadline fires, and gRPC reports the reset as INTERNAL
#: "Stream removed"), and the slack allowed on the client's clock, in seconds.
_RESET_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
_DEADLINE_SLACK_S = 0.05


def error_from_rpc(exc: grpc.RpcError, request_id: str = "", deadline: float | None = None) -> AgentMeshError:
    """The typed error for a failed call (``grpc.RpcError`` of the sync API, or
    ``grpc.aio.AioRpcError``); use it on errors of raw stub calls too.

    ``deadline``: the call's deadline as a ``time.monotonic()`` value. A call that ended with a
    reset (INTERNAL, CANCELLED, UNAVAILABLE) once its deadline had passed is reported as
    DEADLINE_EXCEEDED, whichever of the client's timer and the gateway's fired first.
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message_text = (exc.details() if hasattr(exc, "details") else None) or ""
    if code in _RESET_CODES and deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S:
        return DeadlineExceededError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the call's deadline passed; the stream ended with {code.name}: {message_text}",
            request_id=request_id,
        )
    if code is grpc.StatusCode.INTERNAL and _is_transport_reset(exc, message_text):
        return StreamLostError(
            grpc.StatusCode.UNAVAILABLE,
            f"the stream was reset before it ended (the serving replica went away): {message_text}",
            request_id=request_id,
        )
    details: tuple[Any, ...] = ()
    try:
        status = rpc_status.from_call(exc) if hasattr(exc, "trailing_metadata") else None
    except ValueError:  # details that contradict the status line are ignored, not trusted
        status = None
    if status is not None:
        details = tuple(_unpack(d) for d in status.details)
    return _BY_CODE.get(code, AgentMeshError)(code, message_text, request_id=request_id, details=details)


def _is_transport_reset(exc: grpc.RpcError, message_text: str) -> bool:
    """True when INTERNAL came from an HTTP/2 RST_STREAM rather than from a server: gRPC core
    words it "Stream removed" / "RST_STREAM", and no grpc-status trailer (hence no
    ``grpc-status-details-bin``) came from any server."""
    if "RST_STREAM" not in message_text and "Stream removed" not in message_text:
        return False
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return not any(key == "grpc-status-details-bin" for key, _ in (trailers or ()))
