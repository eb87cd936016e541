"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentmesh.services.runtime.telemetry import configure_tracing


# OpenTelemetry allows one global tracer provider per process, so every folder's span tests share
# this one; each test clears it before the spans it checks.
@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """Every span this test process ends, as the SDK hands it to an exporter."""
    exporter = InMemorySpanExporter()
    # Services served in-process may have installed the provider already: attach to it.
    configure_tracing("tests").add_span_processor(SimpleSpanProcessor(exporter))
    with trace.get_tracer("tests").start_as_current_span("exporter check"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["exporter check"], (
        "a tracer provider other than the runtime's was installed in this process"
    )
    exporter.clear()
    return exporter
