"""Tools an agent may call: the :class:`Tool` abstraction and the :class:`ToolRegistry`.

A tool has a name (``^[a-zA-Z0-9_-]{1,64}$``, the subset OpenAI and Anthropic both accept), a
description written for the model, a JSON Schema (draft 2020-12) of its arguments object, and an
async ``run``. The registry checks each schema when the tool is registered (a broken schema is a
programming error and fails at start-up, not on the first call), validates call arguments with
``jsonschema`` and turns tools into ``agentmesh.common.v1.ToolDefinition`` for ``ListTools``.

Two kinds of failure, on purpose:
- the call itself is wrong (unknown tool, arguments that fail the schema): a gRPC status
  (NOT_FOUND, INVALID_ARGUMENT) raised as :class:`~agentmesh.services.runtime.errors.ServiceError`;
- the tool ran and failed in a way the model can react to (division by zero, nothing found):
  the tool raises :class:`ToolError`, which becomes a ``ToolResult`` with ``is_error=true``.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jsonschema
from google.protobuf import json_format, struct_pb2
from jsonschema.exceptions import best_match

from agentmesh.common.v1 import common_pb2
from agentmesh.services.runtime.errors import invalid_argument, not_found

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: ``await progress(message, fraction)``: report a human-readable status line and, when known,
#: the completed fraction 0..1. Awaiting it may block briefly while the caller catches up.
ProgressCallback = Callable[[str, float | None], Awaitable[None]]


class ToolError(Exception):
    """The tool ran but failed; the message goes back to the model as an error result."""


@dataclass
class ToolOutput:
    """What a tool returns."""

    #: Any JSON value (dict, list, str, number, bool, None).
    output: Any
    #: Retrieved chunks the answer may cite (``ToolResult.chunks``).
    chunks: Sequence[common_pb2.Chunk] = field(default_factory=tuple)


class Tool(abc.ABC):
    """One tool. Subclasses set the three class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: JSON Schema (draft 2020-12) of the arguments; its top level must be ``"type": "object"``.
    parameters_schema: ClassVar[dict[str, Any]]

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


@dataclass
class _Entry:
    tool: Tool
    validator: jsonschema.protocols.Validator
    definition: common_pb2.ToolDefinition


class ToolRegistry:
    """Registered tools by name, in registration order."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._entries: dict[str, _Entry] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add ``tool``. Raises ValueError for a bad or duplicate name, a schema that is not a
        valid draft 2020-12 schema, or one whose top level is not an object schema."""
        name = getattr(tool, "name", "")
        if not TOOL_NAME_PATTERN.match(name):
            raise ValueError(f"tool name {name!r} must match {TOOL_NAME_PATTERN.pattern}")
        if name in self._entries:
            raise ValueError(f"a tool named {name!r} is already registered")
        schema = tool.parameters_schema
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = json_path(exc.absolute_path)
            raise ValueError(f"tool {name!r}: invalid parameters_schema at {where}: {exc.message}") from exc
        if schema.get("type") != "object":
            raise ValueError(f"tool {name!r}: parameters_schema must describe an object (\"type\": \"object\")")
        parameters = struct_pb2.Struct()
        try:
            parameters.update(schema)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tool {name!r}: parameters_schema is not plain JSON: {exc}") from exc
        draft = jsonschema.Draft202012Validator
        validator = draft(schema, format_checker=draft.FORMAT_CHECKER)
        definition = common_pb2.ToolDefinition(name=name, description=tool.description, parameters_schema=parameters)
        self._entries[name] = _Entry(tool, validator, definition)

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

    def validate(self, name: str, arguments: Any) -> None:
        """INVALID_ARGUMENT unless ``arguments`` satisfy the tool's schema. The message names the
        failing location (``$.path[0]``) and how many other problems there are."""
        self.get(name)
        entry = self._entries[name]
        errors = list(entry.validator.iter_errors(arguments))
        if not errors:
            return
        error = best_match(errors)
        detail = error.message if len(error.message) <= 300 else error.message[:300] + "..."
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        where = json_path(error.absolute_path)
        raise invalid_argument(f"arguments of tool {name!r} are invalid at {where}: {detail}{more}")

    def definitions(self) -> list[common_pb2.ToolDefinition]:
        """Every tool as a ``ToolDefinition`` (schema as a ``Struct``), in registration order."""
        return [entry.definition for entry in self._entries.values()]


def to_value(output: Any) -> struct_pb2.Value:
    """A JSON value as ``google.protobuf.Value``. Raises ValueError when it is not plain JSON."""
    try:
        return json_format.ParseDict(output, struct_pb2.Value())
    except (json_format.ParseError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a JSON value: {exc}") from exc
