"""Per-call context carried in ``contextvars``: request id, tenant and subject.

The server interceptor sets them from the incoming metadata (``x-request-id``, ``x-tenant-id``,
``x-subject``); typed clients copy them onto every downstream call, so one request keeps its id,
tenant and caller across the mesh. The tenant and subject are set by the gateway from the
caller's verified credential (gateway/README.md); a call without a tenant belongs to ``default``.
:func:`outgoing_metadata` also carries the current span's W3C trace context (``traceparent``,
``tracestate``), so the callee's SERVER span is a child of the caller's span around the call.
"""

from __future__ import annotations

import contextvars
import re
import time
import uuid

from opentelemetry import propagate

REQUEST_ID_HEADER = "x-request-id"
TENANT_HEADER = "x-tenant-id"
SUBJECT_HEADER = "x-subject"
DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default=DEFAULT_TENANT)
#: Who called (JWT ``sub`` or the API key's subject); empty when the gateway named nobody.
subject_var: contextvars.ContextVar[str] = contextvars.ContextVar("subject", default="")
#: Absolute ``time.monotonic()`` deadline of the call being served; None when the caller set none.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def current_tenant() -> str:
    """Tenant of the call being served (``default`` outside a call)."""
    return tenant_var.get()


def current_subject() -> str:
    """Subject (caller identity) of the call being served; empty when unknown."""
    return subject_var.get()


def current_request_id() -> str:
    """Request id of the call being served (empty outside a call)."""
    return request_id_var.get()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that carries the current request id, tenant, subject and trace context (of the
    span current where it is called) onto a downstream call."""
    md = [(TENANT_HEADER, tenant_var.get())]
    if request_id := request_id_var.get():
        md.append((REQUEST_ID_HEADER, request_id))
    if subject := subject_var.get():
        md.append((SUBJECT_HEADER, subject))
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the globally configured propagators: W3C trace context + baggage
    md.extend(carrier.items())
    return tuple(md)


def remaining_s() -> float | None:
    """Seconds left until the current call's deadline (None when it has none)."""
    deadline = deadline_var.get()
    return None if deadline is None else deadline - time.monotonic()


def downstream_timeout(default_s: float, reserve_s: float = 0.0) -> float:
    """Timeout for a downstream call, in seconds: the caller's remaining deadline less
    ``reserve_s`` (time kept back to report a failure before our own caller gives up), or
    ``default_s`` when the caller set no deadline. Never below 1 ms, so an exhausted budget
    fails downstream with DEADLINE_EXCEEDED instead of waiting."""
    left = remaining_s()
    if left is None:
        return default_s
    return max(0.001, min(default_s, left - reserve_s))
