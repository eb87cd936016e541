"""A real OTLP/gRPC trace receiver for tests: what an OpenTelemetry Collector's ``otlp`` receiver
does, keeping the spans in memory. Envoy's OpenTelemetry tracer exports to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from agentmesh.services.cli.processes import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    service: str  # resource attribute service.name
    attributes: dict


class SpanReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """``opentelemetry.proto.collector.trace.v1.TraceService/Export`` into :attr:`spans`."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []

    async def Export(self, request, context):  # noqa: N802 - gRPC method name
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            service=resource.get("service.name", ""),
                            attributes={a.key: a.value.string_value for a in span.attributes},
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, predicate, timeout_s: float = 15.0) -> list[ReceivedSpan]:
        """Spans matching ``predicate`` once at least one arrived (Envoy flushes every ~5 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            found = [s for s in self.spans if predicate(s)]
            if found:
                return found
            await asyncio.sleep(0.2)
        raise AssertionError(f"no matching span received within {timeout_s} s; received: {self.spans}")


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[SpanReceiver, str]]:
    """Serve a :class:`SpanReceiver` on a free port; yields it and its ``host:port``."""
    receiver = SpanReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield receiver, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
