"""Tools an agent may call: the :class:`Tool` abstraction and the :class:`ToolRegistry`.

A tool has a name (``^[a-zA-Z0-9_-]{1,64}$``, the subset OpenAI and Anthropic both accept), a
description written for the model, a JSON Schema (draft 2020-12) of its arguments object,
optionally one of its output, and an async ``run``. The registry checks each schema when the
tool is registered (a broken schema is a programming error and fails at start-up, not on the
first call), validates call arguments and outputs with ``jsonschema`` and turns tools into
``agentmesh.common.v1.ToolDefinition`` (what a model is shown) and
``agentmesh.tools.v1.ToolDetails`` (output schema, origin, limits) for ``ListTools``.

Tools are registered per *origin* (``builtin``, ``mcp:<server>``): :meth:`ToolRegistry.replace`
swaps all tools of one origin at once, so an MCP server's tools come and go with its connection.

Two kinds of failure, on purpose:
- the call itself is wrong (unknown tool, arguments that fail the schema): a gRPC status
  (NOT_FOUND, INVALID_ARGUMENT) raised as :class:`~agentmesh.services.runtime.errors.ServiceError`;
- the tool ran and failed in a way the model can react to (division by zero, nothing found):
  the tool raises :class:`ToolError`, which becomes a ``ToolResult`` with ``is_error=true``.
"""

from __future__ import annotations

import abc
import contextvars
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
from google.protobuf import json_format, struct_pb2
from jsonschema.exceptions import best_match

from agentmesh.common.v1 import common_pb2
from agentmesh.services.runtime.errors import invalid_argument, not_found
from agentmesh.tools.v1 import tools_pb2

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

BUILTIN = "builtin"
#: Longest progress message sent, in characters; longer process output is sent in several events.
MAX_PROGRESS_CHARS = 1000


class ProgressCallback(Protocol):
    """``await progress(message, fraction, stream=...)``: report a human-readable status line and,
    when known, the completed fraction 0..1; or, with ``stream`` set to
    ``tools_pb2.OUTPUT_STREAM_STDOUT``/``STDERR``, the next chunk of a process's output. Awaiting
    it may block briefly while the caller catches up."""

    async def __call__(self, message: str, fraction: float | None = None, *, stream: int = 0) -> None: ...


class ToolError(Exception):
    """The tool ran but failed; the message goes back to the model as an error result, with
    ``output`` (any JSON value, e.g. the captured stderr of a failed program) when given."""

    def __init__(self, message: str, output: Any = None):
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class CallContext:
    """What a tool may know about the call beyond its arguments (``ExecuteToolRequest`` fields);
    the tenant and request id are in :mod:`agentmesh.services.runtime.context`."""

    tool_call_id: str = ""
    session_id: str = ""
    user_id: str = ""


_call_var: contextvars.ContextVar[CallContext] = contextvars.ContextVar("tool_call", default=CallContext())


def current_call() -> CallContext:
    """The call being run (an empty :class:`CallContext` outside one)."""
    return _call_var.get()


def set_current_call(call: CallContext) -> contextvars.Token[CallContext]:
    return _call_var.set(call)


@dataclass
class ToolOutput:
    """What a tool returns."""

    #: Any JSON value (dict, list, str, number, bool, None).
    output: Any
    #: Retrieved chunks the answer may cite (``ToolResult.chunks``).
    chunks: Sequence[common_pb2.Chunk] = field(default_factory=tuple)


class Tool(abc.ABC):
    """One tool. Subclasses set the first three attributes (on the class, or on the instance for
    tools discovered at run time) and implement :meth:`run`."""

    name: str
    description: str
    #: JSON Schema (draft 2020-12) of the arguments; its top level must be ``"type": "object"``.
    parameters_schema: dict[str, Any]
    #: JSON Schema (draft 2020-12) of the output, or None. A result that fails it is a bug of the
    #: tool: the call ends with INTERNAL instead of handing the model something malformed.
    output_schema: dict[str, Any] | None = None
    #: Where the tool comes from (``builtin``, ``mcp:<server>``).
    origin: str = BUILTIN
    #: Calls of this tool at once per process; 0 = only the service-wide limit.
    max_concurrent_calls: int = 0
    #: Longest one call may run, in seconds; None = the service's ``max_runtime_s``.
    max_runtime_s: float | None = None

    @abc.abstractmethod
    async def run(self, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        """Run with ``arguments`` (already valid against the schema; JSON numbers arrive as
        floats, because ``google.protobuf.Struct`` has no integer type). Raise :class:`ToolError`
        for a failure the model should see; a
        :class:`~agentmesh.services.runtime.errors.ServiceError` for one the caller should
        (e.g. UNAVAILABLE). The call may be cancelled at any await."""


def json_path(path: Iterable[str | int]) -> str:
    """A JSONPath-style location of a value inside the arguments: ``$``, ``$.a.b[0]``, ``$['x y']``."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


@dataclass(frozen=True)
class ToolLimits:
    """Limits of one tool in force in this process (the tool's own, or the operator's override)."""

    #: 0 = only the service-wide limit.
    max_concurrent_calls: int = 0
    #: Seconds; None = the service's ``max_runtime_s``.
    max_runtime_s: float | None = None


@dataclass
class _Entry:
    tool: Tool
    validator: jsonschema.protocols.Validator
    output_validator: jsonschema.protocols.Validator | None
    definition: common_pb2.ToolDefinition
    limits: ToolLimits


def _checked_schema(name: str, what: str, schema: Any) -> tuple[jsonschema.protocols.Validator, struct_pb2.Struct]:
    """A validator for ``schema`` and the schema as a Struct; ValueError when it is no valid
    draft 2020-12 object schema of plain JSON."""
    if not isinstance(schema, dict):
        raise ValueError(f"tool {name!r}: {what} must be a JSON object, not {type(schema).__name__}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = json_path(exc.absolute_path)
        raise ValueError(f"tool {name!r}: invalid {what} at {where}: {exc.message}") from exc
    as_struct = struct_pb2.Struct()
    try:
        as_struct.update(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tool {name!r}: {what} is not plain JSON: {exc}") from exc
    draft = jsonschema.Draft202012Validator
    return draft(schema, format_checker=draft.FORMAT_CHECKER), as_struct


class ToolRegistry:
    """Registered tools by name, in registration order.

    ``limits`` overrides the limits of named tools (the operator's ``tool_limits`` setting); a
    field left at its default keeps the tool's own value.
    """

    def __init__(self, tools: Iterable[Tool] = (), limits: Mapping[str, ToolLimits] | None = None):
        self._entries: dict[str, _Entry] = {}
        self._limits = dict(limits or {})
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add ``tool``. Raises ValueError for a bad or duplicate name, a schema that is not a
        valid draft 2020-12 schema, or a parameters schema whose top level is not an object."""
        entry = self._entry(tool)
        if entry.definition.name in self._entries:
            raise ValueError(f"a tool named {entry.definition.name!r} is already registered")
        self._entries[entry.definition.name] = entry

    def replace(self, origin: str, tools: Iterable[Tool]) -> list[str]:
        """Make ``tools`` the only tools of ``origin`` (an empty list removes them all). Tools
        that fail :meth:`register`'s checks, or whose name another origin holds, are left out;
        returns one reason per tool left out. Atomic: readers see the old or the new set."""
        kept = {name: e for name, e in self._entries.items() if e.tool.origin != origin}
        problems: list[str] = []
        for tool in tools:
            try:
                entry = self._entry(tool)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if entry.definition.name in kept:
                problems.append(f"a tool named {entry.definition.name!r} is already registered")
                continue
            kept[entry.definition.name] = entry
        self._entries = kept
        return problems

    def _entry(self, tool: Tool) -> _Entry:
        name = getattr(tool, "name", "")
        if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
            raise ValueError(f"tool name {name!r} must match {TOOL_NAME_PATTERN.pattern}")
        validator, parameters = _checked_schema(name, "parameters_schema", tool.parameters_schema)
        if tool.parameters_schema.get("type") != "object":
            raise ValueError(f"tool {name!r}: parameters_schema must describe an object (\"type\": \"object\")")
        output_validator = None
        if tool.output_schema is not None:
            output_validator, _ = _checked_schema(name, "output_schema", tool.output_schema)
        definition = common_pb2.ToolDefinition(name=name, description=tool.description, parameters_schema=parameters)
        override = self._limits.get(name, ToolLimits())
        limits = ToolLimits(
            override.max_concurrent_calls or tool.max_concurrent_calls,
            override.max_runtime_s if override.max_runtime_s is not None else tool.max_runtime_s,
        )
        return _Entry(tool, validator, output_validator, definition, limits)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Tool:
        """The tool called ``name``; NOT_FOUND (listing the known tools) otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise not_found(f"unknown tool {name[:80]!r}; known tools: {known}")
        return entry.tool

    def limits(self, name: str) -> ToolLimits:
        """Limits in force for tool ``name`` (NOT_FOUND for an unknown one)."""
        self.get(name)
        return self._entries[name].limits

    def validate(self, name: str, arguments: Any) -> None:
        """INVALID_ARGUMENT unless ``arguments`` satisfy the tool's schema. The message names the
        failing location (``$.path[0]``) and how many other problems there are."""
        self.get(name)
        problem = _first_problem(self._entries[name].validator, arguments)
        if problem:
            raise invalid_argument(f"arguments of tool {name!r} are invalid at {problem}")

    def check_output(self, name: str, output: Any) -> str | None:
        """None when ``output`` satisfies the tool's output schema (or it has none); otherwise
        where and how it fails, e.g. ``$.total: 'x' is not of type 'number'``."""
        self.get(name)
        validator = self._entries[name].output_validator
        return None if validator is None else _first_problem(validator, output)

    def definitions(self) -> list[common_pb2.ToolDefinition]:
        """Every tool as a ``ToolDefinition`` (schema as a ``Struct``), in registration order."""
        return [entry.definition for entry in self._entries.values()]

    def details(self, default_max_runtime_s: float) -> list[tools_pb2.ToolDetails]:
        """Every tool's ``ToolDetails``, in the order of :meth:`definitions`; a tool without a
        runtime limit of its own shows ``default_max_runtime_s`` (the service's)."""
        out = []
        for name, entry in self._entries.items():
            details = tools_pb2.ToolDetails(
                name=name,
                origin=entry.tool.origin,
                max_concurrent_calls=entry.limits.max_concurrent_calls,
                max_runtime_ms=int((entry.limits.max_runtime_s or default_max_runtime_s) * 1000),
            )
            if entry.tool.output_schema is not None:
                details.output_schema.update(entry.tool.output_schema)
            out.append(details)
        return out


def _first_problem(validator: jsonschema.protocols.Validator, instance: Any) -> str | None:
    """``<json path>: <message> (and N more problems)`` for the most relevant error, or None."""
    errors = list(validator.iter_errors(instance))
    if not errors:
        return None
    error = best_match(errors)
    detail = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{json_path(error.absolute_path)}: {detail}{more}"


def to_value(output: Any) -> struct_pb2.Value:
    """A JSON value as ``google.protobuf.Value``. Raises ValueError when it is not plain JSON."""
    try:
        return json_format.ParseDict(output, struct_pb2.Value())
    except (json_format.ParseError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a JSON value: {exc}") from exc
