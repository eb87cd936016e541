"""Structured (JSON-lines) logging with the request id, tenant, subject and trace of the current
call (``trace_id``/``span_id`` as 32/16 hex digits, the W3C form every tracing backend searches)."""

from __future__ import annotations

import json
import logging
import sys
import time

from agentmesh.services.runtime.context import request_id_var, subject_var, tenant_var
from agentmesh.services.runtime.telemetry import current_trace_ids


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, tenant, subject,
    trace id, span id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if rid := request_id_var.get():
            entry["request_id"] = rid
            entry["tenant"] = tenant_var.get()
            if subject := subject_var.get():
                entry["subject"] = subject
        if ids := current_trace_ids():
            entry["trace_id"], entry["span_id"] = ids
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty third-party loggers stay at WARNING.
    for name in ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "sentence_transformers", "filelock", "pymilvus"):
        logging.getLogger(name).setLevel(logging.WARNING)
