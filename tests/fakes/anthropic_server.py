"""A scripted fake of Anthropic's Messages API (``POST /v1/messages``).

Wire format, as the real API sends it:
- streamed (``"stream": true``): ``text/event-stream`` of named events — ``message_start``
  (message with empty content and the input ``usage``), ``ping``, then per content block
  ``content_block_start`` / ``content_block_delta`` (``text_delta`` or ``input_json_delta`` with
  ``partial_json``) / ``content_block_stop``, then ``message_delta`` (``stop_reason`` and the
  cumulative output ``usage``) and ``message_stop``;
- otherwise one ``message`` JSON object with ``text`` and ``tool_use`` content blocks;
- errors as ``{"type": "error", "error": {"type", "message"}, "request_id"}`` with the HTTP status;
  an error inside a 200 stream as ``event: error``.

It also refuses what the real API refuses and the router could get wrong: a missing
``anthropic-version`` header, model or ``max_tokens``; a ``system`` role inside ``messages``;
empty text blocks; ``tool_use`` blocks not answered by ``tool_result`` blocks at the start of the
next user message; ``tool_result`` blocks answering no ``tool_use``; malformed tool definitions.
Script format and recording: see :mod:`tests.fakes.scripted`.

Run: ``python -m tests.fakes.anthropic_server --port N --script script.json``; point the SDK at
``base_url=http://127.0.0.1:N``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

from tests.fakes.scripted import CONTENT, META, ScriptedFakeServer, main, split_fragments, split_text, sse

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
_ids = itertools.count(1)


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


class FakeAnthropicServer(ScriptedFakeServer):
    """Fake Messages-API server (see the module docstring)."""

    endpoint = "/v1/messages"
    name = "anthropic"

    @property
    def base_url(self) -> str:
        """What to pass as the Anthropic SDK's ``base_url``."""
        return self.url

    def authorized(self, headers: dict[str, str]) -> bool:
        # The API takes the key as `x-api-key`, or as a bearer token (what SDK 2.x sends).
        return self.api_key is None or self.api_key in (
            headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer ")
        )

    def validate(self, body: dict[str, Any], headers: dict[str, str]) -> str | None:
        if not headers.get("anthropic-version"):
            return "anthropic-version: header is required"
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "model: Field required"
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return "max_tokens: Field required (an integer >= 1)"
        if "temperature" in body and not 0 <= body["temperature"] <= 1:
            return "temperature: Input should be less than or equal to 1"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: at least one message is required"
        pending: set[str] = set()  # tool_use ids the next user message must answer
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("user", "assistant"):
                return (
                    f'messages.{i}.role: Unexpected role "{role}". The Messages API accepts a top-level '
                    "`system` parameter, not \"system\" as an input message role."
                )
            blocks = _blocks(m.get("content"))
            if not blocks:
                return f"messages.{i}: all messages must have non-empty content"
            for j, block in enumerate(blocks):
                if block.get("type") == "text" and not block.get("text"):
                    return f"messages.{i}.content.{j}.text: text content blocks must be non-empty"
            if role == "user":
                results = [b for b in blocks if b.get("type") == "tool_result"]
                if any(b.get("type") == "tool_result" for b in blocks[len(results):]):
                    return f"messages.{i}: tool_result blocks must come first in the user message content"
                answered = {b.get("tool_use_id") for b in results}
                if unexpected := answered - pending:
                    return (
                        f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{', '.join(sorted(map(str, unexpected)))}. Each `tool_result` block must have a "
                        "corresponding `tool_use` block in the previous message."
                    )
                if missing := pending - answered:
                    return (
                        f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                        f"after: {', '.join(sorted(missing))}"
                    )
                pending = set()
            else:
                if pending:
                    return f"messages.{i}: `tool_use` ids were found without `tool_result` blocks: {', '.join(sorted(pending))}"
                for block in blocks:
                    if block.get("type") == "tool_use":
                        if not block.get("id") or not _TOOL_NAME.match(block.get("name") or "") or not isinstance(
                            block.get("input"), dict
                        ):
                            return f"messages.{i}: tool_use blocks need an id, a valid name and an object input"
                        pending.add(block["id"])
        system = body.get("system")
        if system is not None and not isinstance(system, (str, list)):
            return "system: Input should be a valid string or list of text blocks"
        for i, tool in enumerate(body.get("tools") or []):
            if not _TOOL_NAME.match(tool.get("name") or ""):
                return f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            if (tool.get("input_schema") or {}).get("type") != "object":
                return f"tools.{i}.input_schema.type: Input should be 'object'"
        return None

    def error_body(self, status: int, message: str, error_type: str | None) -> dict[str, Any]:
        kind = error_type or _ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}

    def error_event(self, turn: dict[str, Any]) -> bytes:
        error = {"type": turn.get("error_type", "overloaded_error"), "message": turn.get("error_message", "Overloaded")}
        return sse({"type": "error", "error": error}, event="error")

    @staticmethod
    def _calls(turn: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], int]]:
        return [
            (c.get("id") or f"toolu_fake{next(_ids):06d}", c["name"], c.get("arguments", {}), c.get("fragments", 3))
            for c in turn.get("tool_calls") or []
        ]

    @staticmethod
    def _stop(turn: dict[str, Any]) -> str:
        return turn.get("finish_reason") or ("tool_use" if turn.get("tool_calls") else "end_turn")

    def stream_events(self, turn: dict[str, Any], body: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
        input_tokens, output_tokens = self.usage(turn, body)
        message = {
            "id": f"msg_fake{next(_ids):06d}", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "service_tier": "standard"},
        }
        yield META, sse({"type": "message_start", "message": message}, event="message_start")
        yield META, sse({"type": "ping"}, event="ping")
        index = 0
        pieces = split_text(turn.get("text", ""), turn.get("text_chunks"))
        if pieces:
            yield META, sse({"type": "content_block_start", "index": index,
                             "content_block": {"type": "text", "text": ""}}, event="content_block_start")
            for piece in pieces:
                yield CONTENT, sse({"type": "content_block_delta", "index": index,
                                    "delta": {"type": "text_delta", "text": piece}}, event="content_block_delta")
            yield META, sse({"type": "content_block_stop", "index": index}, event="content_block_stop")
            index += 1
        for call_id, name, arguments, fragments in self._calls(turn):
            yield CONTENT, sse({"type": "content_block_start", "index": index,
                                "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}},
                               event="content_block_start")
            for fragment in split_fragments(json.dumps(arguments), fragments):
                yield CONTENT, sse({"type": "content_block_delta", "index": index,
                                    "delta": {"type": "input_json_delta", "partial_json": fragment}},
                                   event="content_block_delta")
            yield META, sse({"type": "content_block_stop", "index": index}, event="content_block_stop")
            index += 1
        yield META, sse({"type": "message_delta", "delta": {"stop_reason": self._stop(turn), "stop_sequence": None},
                         "usage": {"output_tokens": output_tokens}}, event="message_delta")
        yield META, sse({"type": "message_stop"}, event="message_stop")

    def completion(self, turn: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        input_tokens, output_tokens = self.usage(turn, body)
        content: list[dict[str, Any]] = []
        if turn.get("text"):
            content.append({"type": "text", "text": turn["text"]})
        for call_id, name, arguments, _ in self._calls(turn):
            content.append({"type": "tool_use", "id": call_id, "name": name, "input": arguments})
        return {
            "id": f"msg_fake{next(_ids):06d}", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": self._stop(turn), "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }


if __name__ == "__main__":
    main(FakeAnthropicServer)
