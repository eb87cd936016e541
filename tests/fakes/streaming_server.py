"""A fast fake chat-completions server on asyncio streams, for benchmarks.

The scripted fakes (:mod:`tests.fakes.scripted`) run on the standard library's threaded
``http.server``: one thread per connection and a Python-level write per SSE frame, which
saturates near a few thousand frames per second on a 2-core machine — below what the router
itself can pass. This server answers every ``POST /v1/chat/completions`` with the same streamed
completion, in OpenAI's real wire format (``data: {chat.completion.chunk}`` frames, the finish
chunk, the ``stream_options.include_usage`` usage chunk, ``data: [DONE]``), over HTTP/1.1 with
keep-alive and a chunked body, so the official SDK and the router's own client read it as they
read the real API. Frames are pre-encoded once; a response is a handful of socket writes.

Shape of every completion: ``tokens`` content chunks of one word each, ``first_token_ms`` before
the first one and ``token_ms`` between the next ones (0 = write them all at once). Usage:
``prompt_tokens`` = whitespace-separated words of the messages, ``completion_tokens`` = ``tokens``.
Paced streams share one timer: a heap of streams ordered by the time their next chunk is due,
and a single task that sleeps until the earliest one, writes every chunk that is due, and
reschedules each stream one ``token_ms`` after its previous chunk (so every stream keeps its own
phase, as independent upstream generations would), instead of one timer per stream and token,
which alone would saturate the process at a few hundred concurrent streams.

Run: ``python -m tests.fakes.streaming_server --port N --tokens 20 [--first-token-ms 0] [--token-ms 0]``;
it prints one JSON line with its URL once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import time
from typing import Any

_DONE = b"data: [DONE]\n\n"


class _Paced:
    """A stream waiting for the clock: its chunks and how many were written."""

    __slots__ = ("content", "done", "sent", "tail", "writer")

    def __init__(self, writer: asyncio.StreamWriter, content: list[bytes], tail: bytes, done: asyncio.Future) -> None:
        self.writer, self.content, self.tail, self.done = writer, content, tail, done
        self.sent = 0


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class FastOpenAIServer:
    """The server described in the module docstring (``start()`` in a running event loop)."""

    def __init__(self, *, tokens: int = 20, first_token_ms: float = 0.0, token_ms: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0):
        self.tokens = tokens
        self.first_token_s = first_token_ms / 1000
        self.token_s = token_ms / 1000
        self.host, self.port = host, port
        self.requests = 0
        self._server: asyncio.base_events.Server | None = None
        self._paced: list[tuple[float, int, _Paced]] = []  # heap of (due, sequence, stream)
        self._seq = 0
        self._wake = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> FastOpenAIServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=1 << 20, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._clock = asyncio.create_task(self._tick())
        return self

    async def _tick(self) -> None:
        """Write every due chunk of the paced streams, then sleep until the next one is due."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._paced:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            due, _, stream = self._paced[0]
            if due > now:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due - now):
                        await self._wake.wait()  # a new stream may be due earlier
                continue
            heapq.heappop(self._paced)
            if stream.writer.is_closing():
                stream.done.set_result(None)
                continue
            if self.token_s:
                stream.writer.write(stream.content[stream.sent])
                stream.sent += 1
            else:  # only the first token is delayed
                stream.writer.write(b"".join(stream.content[stream.sent:]))
                stream.sent = len(stream.content)
            if stream.sent == len(stream.content):
                stream.writer.write(stream.tail)
                stream.done.set_result(None)
                continue
            self._push(due + self.token_s, stream)

    def _push(self, due: float, stream: _Paced) -> None:
        self._seq += 1
        heapq.heappush(self._paced, (due, self._seq, stream))
        self._wake.set()

    async def stop(self) -> None:
        if getattr(self, "_clock", None) is not None:
            self._clock.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _frames(self, model: str, include_usage: bool, prompt_tokens: int) -> tuple[bytes, list[bytes], bytes]:
        """(role chunk, content chunks, closing frames) as chunked-encoding pieces."""
        base = {"id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "system_fingerprint": "fp_fast"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        head = _chunked(chunk({"role": "assistant", "content": "", "refusal": None}))
        words = [_chunked(chunk({"content": ("w" if i == 0 else " w") + str(i)})) for i in range(self.tokens)]
        tail = chunk({}, "stop")
        if include_usage:
            tail += _sse({**base, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": prompt_tokens + self.tokens}})
        return head, words, _chunked(tail + _DONE) + b"0\r\n\r\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = json.loads(await reader.readexactly(length)) if length else {}
                method, path = request_line.split(b" ")[:2]
                if method != b"POST" or not path.endswith(b"/chat/completions"):
                    data = json.dumps({"error": {"message": f"no route {path.decode()}", "type": "invalid_request_error",
                                                 "param": None, "code": None}}).encode()
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(data), data))
                    await writer.drain()
                    continue
                self.requests += 1
                words = sum(len(str(m.get("content") or "").split()) for m in body.get("messages") or [])
                head, content, tail = self._frames(
                    body.get("model", "fake"), bool((body.get("stream_options") or {}).get("include_usage")), words)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                             b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n" + head)
                if self.first_token_s or self.token_s:
                    loop = asyncio.get_running_loop()
                    done = loop.create_future()
                    self._push(loop.time() + self.first_token_s, _Paced(writer, content, tail, done))
                    await done
                else:
                    writer.write(b"".join(content) + tail)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the server is stopping
        finally:
            writer.close()


async def _main(args: argparse.Namespace) -> None:
    server = await FastOpenAIServer(tokens=args.tokens, first_token_ms=args.first_token_ms, token_ms=args.token_ms,
                                    host=args.host, port=args.port).start()
    print(json.dumps({"fake": "openai-fast", "url": server.base_url, "port": server.port}), flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fast fake OpenAI chat-completions server (benchmarks)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=20, help="content chunks per completion")
    parser.add_argument("--first-token-ms", type=float, default=0.0)
    parser.add_argument("--token-ms", type=float, default=0.0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
