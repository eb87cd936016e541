"""The fake OpenAI provider of the fault tests: :class:`~tests.fakes.openai_server.FakeOpenAIServer`
(OpenAI's real chat-completions SSE wire format, read by the router's real client) plus what a
fault test must control or observe:

- a *default turn* answered when the script is empty, so a load test needs no script of hundreds
  of turns (scripted turns still come first);
- a *repeated* turn, ``{"repeat": {"piece": text, "count": n}}``: ``n`` content chunks of the
  same text, encoded once, so a stream of many megabytes costs the fake no memory;
- a *gate*, ``{"hold_until_streams": n}``: the stream holds its first content chunk until ``n``
  streams are open at once (or ``hold_timeout_s``, default 60 s), proving that many concurrent
  streams reached the provider through every hop;
- live progress: SSE frames and bytes handed to the socket so far. Writes are blocking socket
  writes (one thread per connection), so when the router stops reading, TCP flow control stops
  the writer and these counters stop growing: they show whether back-pressure reached the
  provider. A frame is counted just before its write, so the count is at most one frame ahead.
- the client address of every stream while it is open (:meth:`streaming_peers`), so a test can
  tell which router replica a stream comes from;
- a listen backlog of 1024 (the standard library's is 5), so a burst of hundreds of new
  connections is accepted at once instead of waiting for SYN retransmits.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.scripted import CONTENT, request_words, sse

#: Listen backlog of the fake (connections waiting to be accepted).
BACKLOG = 1024


class FaultFake(FakeOpenAIServer):
    """:class:`FakeOpenAIServer` with a default turn and progress counters (module docstring)."""

    def __init__(self, turns: list[dict[str, Any]] | None = None, *, default_turn: dict[str, Any] | None = None,
                 api_key: str | None = None):
        super().__init__(turns, api_key=api_key)
        self.default_turn = default_turn
        self._progress = threading.Condition()
        self.frames_sent = 0
        self.bytes_sent = 0
        self.streams_open = 0
        #: Most streams open at once since the last :meth:`reset_progress`.
        self.max_streams_open = 0
        self._peers: list[tuple[str, int]] = []
        self._request = threading.local()  # the client address of the request this thread serves
        self._server.socket.listen(BACKLOG)  # a second listen() only resizes the backlog

    def reset_progress(self) -> None:
        with self._progress:
            self.frames_sent = self.bytes_sent = 0
            self.max_streams_open = self.streams_open

    def progress(self) -> tuple[int, int]:
        """(frames, bytes) handed to sockets since the last :meth:`reset_progress`."""
        with self._progress:
            return self.frames_sent, self.bytes_sent

    def streaming_peers(self) -> list[tuple[str, int]]:
        """(address, port) of the client end of every stream open now, oldest first."""
        with self._progress:
            return list(self._peers)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(super()._handler_class()):  # type: ignore[misc]
            def do_POST(self) -> None:  # noqa: N802
                fake._request.peer = self.client_address[:2]
                super().do_POST()

        return Handler

    def _next_turn(self) -> dict[str, Any] | None:
        turn = super()._next_turn()
        if turn is None and self.default_turn is not None:
            return copy.deepcopy(self.default_turn)
        return turn

    def stream_events(self, turn: dict[str, Any], body: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
        peer = getattr(self._request, "peer", ("", 0))
        with self._progress:
            self.streams_open += 1
            self.max_streams_open = max(self.max_streams_open, self.streams_open)
            self._peers.append(peer)
            self._progress.notify_all()
        frames = self._repeated(turn, body) if "repeat" in turn else super().stream_events(turn, body)
        hold = turn.get("hold_until_streams")
        try:
            for kind, frame in frames:
                with self._progress:
                    if hold and kind == CONTENT:
                        self._progress.wait_for(lambda: self.max_streams_open >= hold, turn.get("hold_timeout_s", 60))
                        hold = None
                    self.frames_sent += 1
                    self.bytes_sent += len(frame)
                yield kind, frame
        finally:
            with self._progress:
                self.streams_open -= 1
                self._peers.remove(peer)

    def _repeated(self, turn: dict[str, Any], body: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
        """The frames of a ``repeat`` turn: those of the same turn without text (role chunk,
        finish, usage, ``[DONE]``) with ``count`` content chunks after the role chunk."""
        spec = turn["repeat"]
        rest = {k: v for k, v in turn.items() if k != "repeat"}
        rest["usage"] = {"input_tokens": request_words(body), "output_tokens": spec["count"]}
        head, *tail = super().stream_events(rest | {"text": ""}, body)
        chunk = json.loads(head[1].removeprefix(b"data: "))
        chunk["choices"][0]["delta"] = {"content": spec["piece"]}
        content = sse(chunk)
        yield head
        for _ in range(spec["count"]):
            yield CONTENT, content
        yield from tail
