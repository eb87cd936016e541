"""Server interceptor applied to every AgentMesh RPC.

It does, for every call, in one place:
- request id, tenant and subject from metadata into ``contextvars`` (``x-request-id``,
  ``x-tenant-id``, ``x-subject``), also set as attributes of the call's SERVER span (which the
  OpenTelemetry interceptor placed before this one has started);
- the incoming deadline into a ``contextvar`` so downstream calls derive their own from it;
- refusal with DEADLINE_EXCEEDED when the remaining deadline is below the service's minimum;
- translation of :class:`ServiceError` into a gRPC status, and of any other exception into
  INTERNAL (logged with its traceback, never shown to the caller);
- refusal with INVALID_ARGUMENT of request bytes that do not decode into the request type
  (grpc.aio would answer UNKNOWN, naming a Python exception);
- one structured log line per call with method, status code and duration (ms);
- the Prometheus RPC metrics of :mod:`~agentmesh.services.runtime.telemetry` (started, handled by
  code, latency, stream items sent, in flight).

grpc.aio interceptors can only wrap the handler, so the wrapping is done per RPC kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace

from agentmesh.services.runtime import context as ctx
from agentmesh.services.runtime import telemetry
from agentmesh.services.runtime.errors import ServiceError

log = logging.getLogger("agentmesh.rpc")

#: Infrastructure RPCs that are neither deadline-checked nor logged.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

#: Metric children by (metric, label values): ``labels()`` validates, converts and takes a lock on
#: every call; the children of a method never change, so each is looked up once.
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


class _CallScope:
    """Sets the call's context variables and records its outcome for the log line."""

    def __init__(self, method: str, labels: tuple[str, str, str], context: grpc.aio.ServicerContext,
                 min_deadline_s: float):
        self.method = method
        self.context = context
        self.min_deadline_s = min_deadline_s
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        self.tokens: list[tuple[Any, Any]] = []
        self.labels = labels  # (service, method name, kind)
        _child(telemetry.RPC_STARTED, labels).inc()
        _child(telemetry.RPC_IN_FLIGHT, labels).inc()

    async def enter(self) -> None:
        metadata = {k: v for k, v in (self.context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = metadata.get(ctx.REQUEST_ID_HEADER) or ctx.new_request_id()
        tenant = metadata.get(ctx.TENANT_HEADER) or ctx.DEFAULT_TENANT
        subject = metadata.get(ctx.SUBJECT_HEADER, "")[:256]
        remaining = self.context.time_remaining()
        self.tokens = [
            (ctx.request_id_var, ctx.request_id_var.set(request_id[:128])),
            (ctx.tenant_var, ctx.tenant_var.set(tenant)),
            (ctx.subject_var, ctx.subject_var.set(subject)),
            (ctx.deadline_var, ctx.deadline_var.set(None if remaining is None else time.monotonic() + remaining)),
        ]
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"agentmesh.request_id": request_id[:128], "agentmesh.tenant": tenant[:64]})
            if subject:
                span.set_attribute("enduser.id", subject)
        if not ctx.TENANT_PATTERN.match(tenant):
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid {ctx.TENANT_HEADER} {tenant[:80]!r}: use 1..64 characters of [A-Za-z0-9_-]",
            )
        if remaining is not None and remaining < self.min_deadline_s:
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline leaves {remaining * 1000:.0f} ms but {self.method} needs at least "
                f"{self.min_deadline_s * 1000:.0f} ms; call again with a longer deadline",
            )

    def exit(self) -> None:
        for var, token in reversed(self.tokens):
            var.reset(token)

    def log(self) -> None:
        elapsed_s = time.perf_counter() - self.start
        elapsed_ms = elapsed_s * 1000
        _child(telemetry.RPC_IN_FLIGHT, self.labels).dec()
        _child(telemetry.RPC_HANDLED, (*self.labels, self.code.name)).inc()
        _child(telemetry.RPC_LATENCY, self.labels).observe(elapsed_s)
        level = logging.ERROR if self.code == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(
            level,
            "rpc finished",
            extra={"fields": {"method": self.method, "code": self.code.name, "duration_ms": round(elapsed_ms, 2)}},
        )

    async def fail(self, exc: BaseException) -> None:
        """Abort the call with the status ``exc`` stands for (re-raises aborts and cancellations)."""
        if isinstance(exc, ServiceError):
            self.code = exc.code
            await self.context.abort(exc.code, exc.message)
        if isinstance(exc, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError) or _is_abort(exc):
            code = self.context.code()
            self.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise exc
        self.code = grpc.StatusCode.INTERNAL
        log.exception("unhandled error in %s", self.method, exc_info=exc)
        await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}; see the service log")


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ == "AbortError"


class _Malformed:
    """Stands for request bytes the deserializer refused (see :func:`_tolerant`)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning a :class:`_Malformed` instead of raising: grpc.aio decodes a
    request before any handler code runs, and answers a decoding error with UNKNOWN; this way the
    wrapper below answers it with INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a custom deserializer raises
            return _Malformed(exc)

    return decode


def _valid(request: Any, label: str = "the request") -> Any:
    """``request``, or INVALID_ARGUMENT when it could not be decoded."""
    if isinstance(request, _Malformed):
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{label} is not a valid serialized protobuf message of this method's request type "
            f"({request.error}); send the message the method's .proto declares",
        )
    return request


async def _valid_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        yield _valid(request, f"request message {index} of the stream")
        index += 1


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """The interceptor described in the module docstring."""

    def __init__(self, min_deadline_ms: int = 0):
        self.min_deadline_s = min_deadline_ms / 1000.0
        # method -> (handler, its wrapper): the server returns the same handler object for a
        # method every time, and the wrapper keeps no per-call state, so it is built once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap_handler(handler, method, self.min_deadline_s)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str, min_deadline_s: float) -> grpc.RpcMethodHandler:
    labels = (*telemetry.split_method(method), telemetry.grpc_type(handler))

    streaming_request = bool(handler.stream_unary or handler.stream_stream)

    def checked(request_or_iterator):
        return _valid_stream(request_or_iterator) if streaming_request else _valid(request_or_iterator)

    def unary_response(behavior):
        async def wrapper(request_or_iterator, context):
            scope = _CallScope(method, labels, context, min_deadline_s)
            try:
                await scope.enter()
                return await behavior(checked(request_or_iterator), context)
            except BaseException as exc:  # noqa: BLE001 - translated into a status by fail()
                await scope.fail(exc)
            finally:
                scope.log()  # still inside the call's context: the line has its ids
                scope.exit()

        return wrapper

    def stream_response(behavior):
        async def wrapper(request_or_iterator, context) -> AsyncIterator[Any]:
            scope = _CallScope(method, labels, context, min_deadline_s)
            sent = _child(telemetry.RPC_MSG_SENT, labels)
            try:
                await scope.enter()
                async for item in behavior(checked(request_or_iterator), context):
                    sent.inc()
                    yield item
            except BaseException as exc:  # noqa: BLE001 - translated into a status by fail()
                if isinstance(exc, GeneratorExit):
                    scope.code = grpc.StatusCode.CANCELLED
                    raise
                with contextlib.suppress(StopAsyncIteration):
                    await scope.fail(exc)
            finally:
                scope.log()  # still inside the call's context: the line has its ids
                scope.exit()

        return wrapper

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary_response(handler.unary_unary), _tolerant(handler.request_deserializer), handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream_response(handler.unary_stream), _tolerant(handler.request_deserializer), handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary_response(handler.stream_unary), _tolerant(handler.request_deserializer), handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        stream_response(handler.stream_stream), _tolerant(handler.request_deserializer), handler.response_serializer
    )
