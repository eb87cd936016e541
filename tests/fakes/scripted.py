"""Shared machinery of the scripted fake provider servers (stdlib ``http.server`` only).

A fake serves a queue of *turns*; each ``POST`` to the provider endpoint consumes one. A turn is a
JSON object (all keys optional):

``text`` (str)
    Answer text. ``text_chunks`` (int): number of pieces it is streamed in (split at word
    boundaries; default one piece per word).
``tool_calls`` (list)
    ``{"id", "name", "arguments": {...}, "fragments": k}``: the arguments' JSON text is streamed in
    ``k`` pieces cut at arbitrary characters (default 3). ``id`` defaults to a provider-style id.
``finish_reason``
    The provider's own value (``stop``/``tool_calls``/``length`` or ``end_turn``/``tool_use``/
    ``max_tokens``...); default: tool calls → the tool value, else the natural stop.
``usage``
    ``{"input_tokens": n, "output_tokens": m}``; default: input = whitespace-separated words of the
    request's message texts, output = number of content events.
``status``, ``retry_after``, ``error_message``, ``error_type``
    Fail the request with this HTTP status (and ``retry-after`` header) in the provider's error format.
``first_token_delay_s``
    Seconds between the response headers and the first event (a slow first token).
``chunk_delay_s``
    Seconds between events.
``cut_after`` (int)
    Drop the connection after this many content events (text pieces, tool-call fragments), without
    ending the chunked body: the client sees a broken stream.
``error_after`` (int)
    After this many content events send the provider's in-stream error (status 200 already sent),
    then end the body normally.

Every request is recorded (``path``, ``headers``, ``body``, and ``outcome``: ``completed``,
``failed``, ``cut``, ``client_disconnected``), readable in-process through ``server.requests``
and over HTTP at ``GET /_fake/requests``. ``POST /_fake/turns`` (a list, or ``{"turns": [...]}``)
appends turns to the queue. A request with no turn left gets HTTP 500 saying the script is exhausted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: Event kinds yielded by a fake's ``stream_events``: only "content" events count for cut/error.
META, CONTENT = "meta", "content"


def split_text(text: str, pieces: int | None) -> list[str]:
    """``text`` in ``pieces`` parts cut at word boundaries (their concatenation is ``text``)."""
    words: list[str] = []
    for i, part in enumerate(text.split(" ")):
        words.append(part if i == 0 else " " + part)
    words = [w for w in words if w]
    if not words:
        return []
    n = max(1, min(pieces or len(words), len(words)))
    size, extra = divmod(len(words), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append("".join(words[start:end]))
        start = end
    return out


def split_fragments(text: str, pieces: int) -> list[str]:
    """``text`` in ``pieces`` parts of near-equal length, cut anywhere (like streamed JSON)."""
    n = max(1, min(pieces, len(text))) if text else 1
    size, extra = divmod(len(text), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def request_words(body: dict[str, Any]) -> int:
    """Whitespace-separated words in the message texts of a chat request (the fakes' token count)."""
    count = 0
    system = body.get("system")
    if isinstance(system, str):
        count += len(system.split())
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            count += len(content.split())
        elif isinstance(content, list):
            for block in content:
                for key in ("text", "content"):
                    if isinstance(block.get(key), str):
                        count += len(block[key].split())
    return count


class _Cut(Exception):
    """Raised inside the handler to drop the connection mid-body."""


class ScriptedFakeServer:
    """A threaded HTTP server that answers provider requests from a script of turns.

    Subclasses set ``endpoint`` and implement ``authorized``, ``validate``, ``error_body``,
    ``stream_events``, ``error_event`` and ``completion``.
    """

    #: Path of the provider endpoint, e.g. "/v1/chat/completions".
    endpoint: str = ""
    name: str = "fake"

    def __init__(self, turns: list[dict[str, Any]] | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None):
        self.api_key = api_key
        self._turns: deque[dict[str, Any]] = deque(turns or [])
        self._requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- in-process API -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port`` (no path)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Copies of the recorded requests, oldest first."""
        with self._lock:
            return json.loads(json.dumps(self._requests))

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies received at the provider endpoint, oldest first."""
        return [r["body"] for r in self.requests if self.matches(r["path"])]

    def enqueue(self, *turns: dict[str, Any]) -> None:
        with self._lock:
            self._turns.extend(turns)

    @property
    def pending_turns(self) -> int:
        with self._lock:
            return len(self._turns)

    def start(self) -> ScriptedFakeServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"{self.name}-fake", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the subprocess entry point)."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        """Stop a server started with :meth:`start`."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ScriptedFakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_outcome(self, index: int, timeout_s: float = 5.0) -> str | None:
        """The outcome of request ``index`` once it has one (None on timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if index < len(self._requests) and self._requests[index]["outcome"]:
                    return self._requests[index]["outcome"]
            time.sleep(0.02)
        return None

    # --- provider specifics (subclasses) --------------------------------------------------------

    def matches(self, path: str) -> bool:
        """Whether ``path`` (with its query) is the provider endpoint."""
        return path == self.endpoint

    def authorized(self, headers: dict[str, str]) -> bool:
        raise NotImplementedError

    def validate(self, body: dict[str, Any], headers: dict[str, str]) -> str | None:
        """A 400 message when the request would be refused by the real API, else None."""
        raise NotImplementedError

    def error_body(self, status: int, message: str, error_type: str | None) -> dict[str, Any]:
        """The provider's JSON error body; ``error_type`` (from the turn) overrides the type the
        real API uses for ``status``."""
        raise NotImplementedError

    def stream_events(self, turn: dict[str, Any], body: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
        """The SSE frames of a streamed answer, each tagged META or CONTENT."""
        raise NotImplementedError

    def error_event(self, turn: dict[str, Any]) -> bytes:
        """The SSE frame reporting a failure inside a 200 stream."""
        raise NotImplementedError

    def completion(self, turn: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """The JSON body of a non-streamed answer."""
        raise NotImplementedError

    # --- helpers for subclasses -------------------------------------------------------------------

    @staticmethod
    def content_count(turn: dict[str, Any]) -> int:
        """Content events a turn produces (text pieces + tool-call fragments)."""
        n = len(split_text(turn.get("text", ""), turn.get("text_chunks")))
        for call in turn.get("tool_calls") or []:
            n += 1 + len(split_fragments(json.dumps(call.get("arguments", {})), call.get("fragments", 3)))
        return n

    def usage(self, turn: dict[str, Any], body: dict[str, Any]) -> tuple[int, int]:
        given = turn.get("usage") or {}
        return (
            int(given.get("input_tokens", request_words(body))),
            int(given.get("output_tokens", self.content_count(turn))),
        )

    # --- HTTP ---------------------------------------------------------------------------------

    def _record(self, path: str, headers: dict[str, str], body: Any) -> int:
        with self._lock:
            self._requests.append({"path": path, "headers": headers, "body": body, "outcome": None})
            return len(self._requests) - 1

    def _set_outcome(self, index: int, outcome: str) -> None:
        with self._lock:
            self._requests[index]["outcome"] = outcome

    def _next_turn(self) -> dict[str, Any] | None:
        with self._lock:
            return self._turns.popleft() if self._turns else None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like the real APIs

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self) -> bytes:
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else b""

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/_fake/requests":
                    self._json(200, fake.requests)
                else:
                    self._json(404, fake.error_body(404, f"no route GET {self.path}", None))

            def do_POST(self) -> None:  # noqa: N802
                raw = self._read_body()
                if self.path == "/_fake/turns":
                    payload = json.loads(raw or b"[]")
                    turns = payload.get("turns", []) if isinstance(payload, dict) else payload
                    fake.enqueue(*turns)
                    self._json(200, {"pending_turns": fake.pending_turns})
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as exc:
                    index = fake._record(self.path, headers, raw.decode(errors="replace"))
                    self._json(400, fake.error_body(400, f"body is not JSON: {exc}", None))
                    fake._set_outcome(index, "failed")
                    return
                index = fake._record(self.path, headers, body)
                try:
                    fake._set_outcome(index, self._serve(body, headers))
                except _Cut:
                    fake._set_outcome(index, "cut")
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                except (BrokenPipeError, ConnectionResetError):
                    fake._set_outcome(index, "client_disconnected")
                    self.close_connection = True

            def _serve(self, body: dict[str, Any], headers: dict[str, str]) -> str:
                if not fake.matches(self.path):
                    self._json(404, fake.error_body(404, f"no route POST {self.path}", None))
                    return "failed"
                if not fake.authorized(headers):
                    self._json(401, fake.error_body(401, "invalid API key", None))
                    return "failed"
                if problem := fake.validate(body, headers):
                    self._json(400, fake.error_body(400, problem, None))
                    return "failed"
                turn = fake._next_turn()
                if turn is None:
                    self._json(500, fake.error_body(500, "fake server script exhausted: no turn left", None))
                    return "failed"
                if status := turn.get("status"):
                    extra = {"retry-after": str(turn["retry_after"])} if "retry_after" in turn else {}
                    message = turn.get("error_message", f"scripted failure {status}")
                    self._json(int(status), fake.error_body(int(status), message, turn.get("error_type")), extra)
                    return "failed"
                if not body.get("stream"):
                    time.sleep(float(turn.get("first_token_delay_s", 0)))
                    if turn.get("cut_after") is not None:
                        raise _Cut
                    self._json(200, fake.completion(turn, body))
                    return "completed"
                return self._stream(turn, body)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

            def _stream(self, turn: dict[str, Any], body: dict[str, Any]) -> str:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream; charset=utf-8")
                self.send_header("cache-control", "no-cache")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                first_delay = float(turn.get("first_token_delay_s", 0))
                chunk_delay = float(turn.get("chunk_delay_s", 0))
                cut_after, error_after = turn.get("cut_after"), turn.get("error_after")
                sent = 0
                outcome = "completed"
                for i, (kind, frame) in enumerate(fake.stream_events(turn, body)):
                    if kind == CONTENT:
                        if sent == 0 and first_delay:
                            time.sleep(first_delay)
                        if cut_after is not None and sent >= cut_after:
                            raise _Cut
                        if error_after is not None and sent >= error_after:
                            self._chunk(fake.error_event(turn))
                            outcome = "error_event"
                            break
                        sent += 1
                    if i and chunk_delay:
                        time.sleep(chunk_delay)
                    self._chunk(frame)
                self.wfile.write(b"0\r\n\r\n")
                return outcome

        return Handler


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: optional ``event:`` line, a ``data:`` line, a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def main(server_class: type[ScriptedFakeServer], argv: list[str] | None = None) -> None:
    """``python -m tests.fakes.<provider>_server --port N --script script.json [--api-key K]``.

    The script file holds a list of turns or ``{"turns": [...]}``. Prints one JSON line with the
    URL once listening, then serves until SIGTERM/SIGINT.
    """
    parser = argparse.ArgumentParser(description=f"Scripted fake {server_class.name} server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", type=Path, help="JSON file: a list of turns or {\"turns\": [...]}")
    parser.add_argument("--api-key", default=None, help="Refuse requests that do not carry this key")
    args = parser.parse_args(argv)
    turns: list[dict[str, Any]] = []
    if args.script:
        loaded = json.loads(args.script.read_text())
        turns = loaded.get("turns", []) if isinstance(loaded, dict) else loaded
    server = server_class(turns, host=args.host, port=args.port, api_key=args.api_key)
    print(json.dumps({"fake": server_class.name, "url": server.url, "port": server.port}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
