"""The one way service code reports a failure to its caller: raise :class:`ServiceError`.

The server interceptor turns it into a gRPC status with the given code and message, so handlers
never half-answer; anything else that escapes a handler becomes INTERNAL and is logged.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A failure with a gRPC status code and a message a person can act on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"ServiceError({self.code.name}, {self.message!r})"


def invalid_argument(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


#: Downstream status codes passed through unchanged to our caller; the rest become UNAVAILABLE
#: (the dependency failed, not the caller's request) or, for INTERNAL, stay INTERNAL.
_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
}


def from_downstream(service: str, err: grpc.aio.AioRpcError) -> ServiceError:
    """Translate a failed downstream call into the status our caller should see.

    ``service`` names the dependency (e.g. ``"memory"``) so the message says where it failed.
    """
    code = err.code()
    if code not in _PASS_THROUGH:
        code = grpc.StatusCode.UNAVAILABLE if code != grpc.StatusCode.INTERNAL else code
    return ServiceError(code, f"{service} service: {err.details() or code.name}")
