"""A scripted fake of OpenAI's chat-completions API (``POST /v1/chat/completions``).

Wire format, as the real API sends it:
- streamed (``"stream": true``): ``text/event-stream`` of ``data: {chat.completion.chunk}`` lines —
  a first chunk with ``delta.role``, content pieces in ``delta.content``, tool calls in
  ``delta.tool_calls`` (first fragment: ``index``, ``id``, ``type``, ``function.name`` and empty
  ``arguments``; later fragments: ``index`` and ``function.arguments``), a chunk with the
  ``finish_reason``, then — when ``stream_options.include_usage`` — a chunk with empty ``choices``
  and the ``usage`` (every earlier chunk then carries ``"usage": null``), and ``data: [DONE]``;
- otherwise one ``chat.completion`` JSON object;
- errors as ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status; an error
  inside a 200 stream as a ``data: {"error": {...}}`` line.

It also refuses what the real API refuses and the router could get wrong: a missing model or
messages, ``stream_options`` without streaming, a ``tool`` message that answers no preceding tool
call, an assistant's tool call left without a ``tool`` answer, malformed tool definitions.
It also answers Azure OpenAI's route, ``POST /openai/deployments/{deployment}/chat/completions?api-version=...``
(key in the ``api-key`` header; a missing ``api-version`` is refused with 404 as Azure does).
Script format and recording: see :mod:`tests.fakes.scripted`.

Run: ``python -m tests.fakes.openai_server --port N --script script.json``; point the SDK at
``base_url=http://127.0.0.1:N/v1``.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

from tests.fakes.scripted import CONTENT, META, ScriptedFakeServer, main, split_fragments, split_text, sse

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_AZURE_ROUTE = re.compile(r"^/openai/deployments/[A-Za-z0-9_.-]+/chat/completions\?(?:.*&)?api-version=[0-9a-z-]+(?:&.*)?$")
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
                404: "invalid_request_error", 429: "requests"}
_ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_ids = itertools.count(1)


class FakeOpenAIServer(ScriptedFakeServer):
    """Fake chat-completions server (see the module docstring)."""

    endpoint = "/v1/chat/completions"
    name = "openai"

    @property
    def base_url(self) -> str:
        """What to pass as the OpenAI SDK's ``base_url``."""
        return f"{self.url}/v1"

    def matches(self, path: str) -> bool:
        return path == self.endpoint or bool(_AZURE_ROUTE.match(path))

    def authorized(self, headers: dict[str, str]) -> bool:
        return self.api_key is None or self.api_key in (
            headers.get("authorization", "").removeprefix("Bearer "), headers.get("api-key"))

    def validate(self, body: dict[str, Any], headers: dict[str, str]) -> str | None:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "you must provide a model parameter"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must contain at least 1 item"
        if body.get("stream_options") is not None and not body.get("stream"):
            return "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        open_calls: set[str] = set()
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                return f"Invalid value for 'messages[{i}].role': {role!r}"
            if role != "tool" and open_calls:
                return (
                    "An assistant message with 'tool_calls' must be followed by tool messages responding to "
                    f"each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                    f"{', '.join(sorted(open_calls))}"
                )
            if role == "assistant":
                if m.get("content") is None and not m.get("tool_calls"):
                    return f"messages[{i}]: assistant message needs content or tool_calls"
                for call in m.get("tool_calls") or []:
                    fn = call.get("function") or {}
                    if call.get("type") != "function" or not call.get("id") or not isinstance(fn.get("arguments"), str):
                        return f"messages[{i}].tool_calls: each needs id, type 'function' and string arguments"
                    if not _TOOL_NAME.match(fn.get("name") or ""):
                        return f"messages[{i}].tool_calls: invalid function name {fn.get('name')!r}"
                    open_calls.add(call["id"])
            elif role == "tool":
                if m.get("tool_call_id") not in open_calls:
                    return (
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                        "message with 'tool_calls'."
                    )
                open_calls.discard(m["tool_call_id"])
                if not isinstance(m.get("content"), (str, list)):
                    return f"messages[{i}].content: tool messages need content"
            elif not isinstance(m.get("content"), (str, list)):
                return f"messages[{i}].content must be a string or a list of content parts"
        if open_calls:
            return f"tool_call_ids without response messages: {', '.join(sorted(open_calls))}"
        for i, tool in enumerate(body.get("tools") or []):
            fn = tool.get("function") or {}
            if tool.get("type") != "function" or not _TOOL_NAME.match(fn.get("name") or ""):
                return f"Invalid 'tools[{i}]': expected a function tool with a name matching ^[a-zA-Z0-9_-]{{1,64}}$"
            if "parameters" in fn and (fn["parameters"] or {}).get("type") != "object":
                return f"Invalid schema for function '{fn['name']}': schema must be a JSON Schema of 'type: \"object\"'"
        return None

    def error_body(self, status: int, message: str, error_type: str | None) -> dict[str, Any]:
        return {
            "error": {
                "message": message,
                "type": error_type or _ERROR_TYPES.get(status, "server_error"),
                "param": None,
                "code": _ERROR_CODES.get(status),
            }
        }

    def error_event(self, turn: dict[str, Any]) -> bytes:
        return sse({"error": {"message": turn.get("error_message", "The server had an error while processing your "
                                                 "request."), "type": turn.get("error_type", "server_error"),
                              "param": None, "code": None}})

    @staticmethod
    def _calls(turn: dict[str, Any]) -> list[tuple[str, str, str, int]]:
        return [
            (c.get("id") or f"call_fake{next(_ids):06d}", c["name"], json.dumps(c.get("arguments", {})), c.get("fragments", 3))
            for c in turn.get("tool_calls") or []
        ]

    @staticmethod
    def _finish(turn: dict[str, Any]) -> str:
        return turn.get("finish_reason") or ("tool_calls" if turn.get("tool_calls") else "stop")

    def stream_events(self, turn: dict[str, Any], body: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
        cid, created, model = f"chatcmpl-fake{next(_ids):06d}", int(time.time()), body["model"]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                obj["usage"] = None
            return sse(obj)

        yield META, chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in split_text(turn.get("text", ""), turn.get("text_chunks")):
            yield CONTENT, chunk({"content": piece})
        for index, (call_id, name, arguments, fragments) in enumerate(self._calls(turn)):
            yield CONTENT, chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]})
            for fragment in split_fragments(arguments, fragments):
                yield CONTENT, chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        yield META, chunk({}, self._finish(turn))
        if include_usage:
            prompt_tokens, completion_tokens = self.usage(turn, body)
            yield META, sse({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_fake", "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens,
                          "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                        "accepted_prediction_tokens": 0,
                                                        "rejected_prediction_tokens": 0}},
            })
        yield META, sse("[DONE]")

    def completion(self, turn: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        prompt_tokens, completion_tokens = self.usage(turn, body)
        message: dict[str, Any] = {"role": "assistant", "content": turn.get("text") or None, "refusal": None}
        if calls := self._calls(turn):
            message["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                for call_id, name, arguments, _ in calls
            ]
        return {
            "id": f"chatcmpl-fake{next(_ids):06d}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish(turn)}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


if __name__ == "__main__":
    main(FakeOpenAIServer)
