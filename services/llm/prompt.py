"""Prompt rendering: ``common.v1`` messages, tools and context chunks → each SDK's request format.

Choices made here, for every LLM provider alike:
- All ``ROLE_SYSTEM`` messages are joined (blank line between them, in order) into one system
  prompt placed first; Anthropic only accepts the system prompt as a separate field, and one
  place keeps both providers' behaviour the same.
- Context chunks are rendered after the system messages as numbered sources ``[1]..[n]``
  (n = 1-based position in ``context``) with their title and source, preceded by an instruction
  to cite with ``[n]``. The extractive provider uses the same numbering, so citations mean the
  same whichever provider answered.
- Tool-call arguments (a ``google.protobuf.Struct``) are sent as JSON text to OpenAI and as a JSON
  object to Anthropic. ``Struct`` stores every number as a double, so integral numbers are turned
  back into integers (``3.0`` → ``3``) and keys are sorted before they are sent.
- ``ROLE_TOOL`` messages become OpenAI ``tool`` messages, and Anthropic ``tool_result`` blocks in a
  ``user`` message (consecutive results share one message, as the Messages API requires).
- ``Message.name`` (an optional author name) is not forwarded: the providers constrain it
  differently and it does not change the answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2

from agentmesh.common.v1 import common_pb2

Role = common_pb2.Role

#: Instruction placed before the numbered sources in the system prompt of LLM providers.
CITE_INSTRUCTION = (
    "Answer using the numbered sources below. After each statement taken from a source, cite it "
    "with its number in square brackets, for example [1] or [2][3]. If the sources do not contain "
    "the answer, say so instead of guessing."
)


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``Struct`` as a plain JSON object: integral numbers as ints (``Struct`` keeps doubles), keys
    sorted (protobuf map order varies between processes; stable bytes keep provider prompt caches
    warm and requests reproducible)."""
    return _ints(json_format.MessageToDict(struct))


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def render_context(context: Sequence[common_pb2.Chunk]) -> str:
    """The numbered sources block: ``[n] title — source`` then the chunk text, for each chunk."""
    parts = [CITE_INSTRUCTION]
    for n, chunk in enumerate(context, start=1):
        label = " — ".join(x for x in (chunk.title, chunk.source) if x) or chunk.document_id or chunk.chunk_id
        parts.append(f"[{n}] {label}\n{chunk.text.strip()}")
    return "\n\n".join(parts)


def system_prompt(messages: Sequence[common_pb2.Message], context: Sequence[common_pb2.Chunk]) -> str:
    """System messages joined, then the rendered context (empty string when there is neither)."""
    parts = [m.content for m in messages if m.role == Role.ROLE_SYSTEM and m.content]
    if context:
        parts.append(render_context(context))
    return "\n\n".join(parts)


def _schema(tool: common_pb2.ToolDefinition) -> dict[str, Any]:
    # Both APIs require an object schema; a tool without parameters takes an empty object.
    schema = struct_to_dict(tool.parameters_schema)
    return schema or {"type": "object", "properties": {}}


# --- OpenAI chat completions ---------------------------------------------------------------


def openai_messages(
    messages: Sequence[common_pb2.Message], context: Sequence[common_pb2.Chunk]
) -> list[dict[str, Any]]:
    """Chat-completions ``messages``: one leading ``system`` message, then the conversation."""
    out: list[dict[str, Any]] = []
    if system := system_prompt(messages, context):
        out.append({"role": "system", "content": system})
    for m in messages:
        if m.role == Role.ROLE_USER:
            out.append({"role": "user", "content": m.content})
        elif m.role == Role.ROLE_ASSISTANT:
            item: dict[str, Any] = {"role": "assistant", "content": m.content or None}
            if m.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.dumps(struct_to_dict(call.arguments))},
                    }
                    for call in m.tool_calls
                ]
            out.append(item)
        elif m.role == Role.ROLE_TOOL:
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
    return out


def openai_tools(tools: Sequence[common_pb2.ToolDefinition]) -> list[dict[str, Any]]:
    """Chat-completions ``tools`` (function tools)."""
    result = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": _schema(tool)}
        if tool.description:
            function["description"] = tool.description
        result.append({"type": "function", "function": function})
    return result


# --- Anthropic messages ----------------------------------------------------------------------


def anthropic_messages(messages: Sequence[common_pb2.Message]) -> list[dict[str, Any]]:
    """Messages-API ``messages`` (system messages excluded: see :func:`system_prompt`).

    Consecutive messages of the same API role are merged into one, with ``tool_result`` blocks
    first, as the Messages API requires; empty text is dropped (the API refuses empty blocks).
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == Role.ROLE_SYSTEM:
            continue
        blocks: list[dict[str, Any]] = []
        if m.role == Role.ROLE_TOOL:
            role = "user"
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.tool_call_id}
            if m.content:
                result["content"] = m.content
            blocks.append(result)
        else:
            role = "assistant" if m.role == Role.ROLE_ASSISTANT else "user"
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            for call in m.tool_calls:
                blocks.append(
                    {"type": "tool_use", "id": call.id, "name": call.name, "input": struct_to_dict(call.arguments)}
                )
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for item in out:
        # stable sort: tool results first, everything else keeps its order
        item["content"].sort(key=lambda block: block["type"] != "tool_result")
    return out


def anthropic_tools(tools: Sequence[common_pb2.ToolDefinition]) -> list[dict[str, Any]]:
    """Messages-API ``tools`` (client tools with an ``input_schema``)."""
    result = []
    for tool in tools:
        item: dict[str, Any] = {"name": tool.name, "input_schema": _schema(tool)}
        if tool.description:
            item["description"] = tool.description
        result.append(item)
    return result
