"""The HTTP transports of the provider adapters: a streamed ``POST`` whose answer body comes back
as bytes, and every failure mapped to a :class:`ProviderError`.

- :class:`LeanTransport` (``client: lean``, the default): HTTP/1.1 on asyncio streams;
- :class:`HttpTransport` (``client: httpx``): one ``httpx.AsyncClient`` per deployment (proxies,
  compression, the broadest TLS handling).

Both do only what a streaming chat call needs (JSON body out, raw SSE bytes back), so that the
per-chunk work is the provider's own parsing, not an SDK's object model.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson

from agentmesh.services.llm.providers.base import (
    ErrorKind,
    ProviderError,
    classify_status,
    error_message,
    parse_retry_after,
)

#: Connect timeout cap, in seconds (the request's whole timeout bounds it too).
CONNECT_TIMEOUT_S = 10.0
#: Largest error body read from a failed response, in bytes.
MAX_ERROR_BODY_BYTES = 64 * 1024


class HttpTransport:
    """Streams ``POST`` responses of one upstream.

    ``max_connections`` bounds the open connections (one per concurrent stream; HTTP/1.1 as the
    providers' streaming APIs are used). ``name`` is the provider kind used in error messages.
    """

    def __init__(self, name: str, *, max_connections: int = 1000, headers: dict[str, str] | None = None):
        self.name = name
        self.client = httpx.AsyncClient(
            headers=headers or {},
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(60.0, connect=CONNECT_TIMEOUT_S),
        )

    async def post_stream(
        self, url: str, body: dict[str, Any], timeout_s: float, headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[bytes]:
        """The response body of a 200 answer, as the network delivers it.

        Raises ProviderError: the status's kind (with ``retry-after`` and the provider's error
        message) for a non-200 answer, TIMEOUT when ``timeout_s`` passes (connect, or between two
        reads), CONNECTION when the connection fails or drops mid-body."""
        request = self.client.build_request(
            "POST", url, content=json.dumps(body, separators=(",", ":")).encode(),
            headers={"content-type": "application/json", "accept": "text/event-stream", **(headers or {})},
            params=params, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise ProviderError(ErrorKind.TIMEOUT, f"request to {self.name} timed out") from None
        except httpx.HTTPError as exc:
            raise ProviderError(ErrorKind.CONNECTION, f"connection to {self.name} failed: {_describe(exc)}") from None
        try:
            if response.status_code != 200:
                raw = b""
                async for piece in response.aiter_bytes():
                    raw += piece
                    if len(raw) >= MAX_ERROR_BODY_BYTES:
                        break
                status = response.status_code
                raise ProviderError(
                    classify_status(status), error_message(raw, response.reason_phrase or f"HTTP {status}"),
                    status=status, retry_after_s=parse_retry_after(response.headers.get("retry-after")),
                )
            async for piece in response.aiter_bytes():
                yield piece
        except httpx.TimeoutException:
            raise ProviderError(ErrorKind.TIMEOUT, f"request to {self.name} timed out") from None
        except httpx.HTTPError as exc:
            raise ProviderError(ErrorKind.CONNECTION, f"connection to {self.name} failed: {_describe(exc)}") from None
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class LeanTransport:
    """A minimal HTTP/1.1 client on asyncio streams for the streaming hot path (``client: lean``,
    the default).

    Why not ``httpx`` here: measured with ``bench/router.py`` on these 2-core machines, the
    httpx / httpcore / anyio stack costs about 100 µs of CPU per network read of a paced stream
    (cancel scopes, an h11 event per HTTP chunk) and its connection pool re-scans every connection
    on every request (quadratic in the number of concurrent streams), which capped a router at a
    few thousand tokens per second. This client does one ``StreamReader.read`` per network read and
    decodes every complete chunk of the chunked body it holds at once.

    What it does: keep-alive connections per origin (at most ``max_connections`` open, idle ones
    dropped after :data:`IDLE_S`), TLS with the system trust store (``ssl.create_default_context``),
    ``content-length``, chunked and close-delimited bodies, one retry on a fresh connection when a
    reused keep-alive connection turns out closed before any byte of the answer. What it does not:
    proxies (``HTTPS_PROXY``), compression (it asks for identity), HTTP/2 — use ``client: httpx``
    or ``client: sdk`` for an upstream that needs them.
    """

    def __init__(self, name: str, *, max_connections: int = 1000):
        self.name = name
        self.max_connections = max_connections
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._slots: asyncio.Semaphore | None = None
        self._ssl: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, origin: tuple[str, str, int]) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                return connection, True
            connection.close()
        scheme, host, port = origin
        reader, writer = await asyncio.open_connection(
            host, port, ssl=self._tls() if scheme == "https" else None, server_hostname=host if scheme == "https" else None,
            limit=1 << 20,
        )
        return _Connection(reader, writer), False

    def _release(self, origin: tuple[str, str, int], connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(origin, []).append(connection)

    async def post_stream(
        self, url: str, body: dict[str, Any], timeout_s: float, headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[bytes]:
        """As :meth:`HttpTransport.post_stream`."""
        target = urlsplit(url)
        scheme = target.scheme or "http"
        if scheme not in ("http", "https") or not target.hostname:
            raise ProviderError(ErrorKind.CONNECTION, f"cannot call {url!r}: only http:// and https:// URLs are supported")
        port = target.port or (443 if scheme == "https" else 80)
        origin = (scheme, target.hostname, port)
        path = target.path or "/"
        query = "&".join(q for q in (target.query, urlencode(params or {})) if q)
        if query:
            path += "?" + query
        host = target.hostname if target.port is None else f"{target.hostname}:{target.port}"
        payload = orjson.dumps(body)
        lines = [f"POST {path} HTTP/1.1", f"host: {host}", "content-type: application/json",
                 "accept: text/event-stream", "accept-encoding: identity", f"content-length: {len(payload)}",
                 "user-agent: agentmesh-llm"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        connection: _Connection | None = None
        reusable = False
        try:
            async with asyncio.timeout(timeout_s):
                await self._slots.acquire()
                try:
                    for attempt in (0, 1):
                        connection, reused = await self._connect(origin)
                        try:
                            connection.writer.write(request)
                            await connection.writer.drain()
                            status, response_headers = await connection.read_head()
                            break
                        except (ConnectionError, asyncio.IncompleteReadError) as exc:
                            connection.close()
                            connection = None
                            if not reused or attempt:
                                raise ProviderError(ErrorKind.CONNECTION,
                                                    f"connection to {self.name} failed: {_describe(exc)}") from None
                except BaseException:
                    self._slots.release()
                    raise
        except TimeoutError:
            if connection is not None:
                connection.close()
            raise ProviderError(ErrorKind.TIMEOUT, f"request to {self.name} timed out") from None
        except OSError as exc:
            raise ProviderError(ErrorKind.CONNECTION, f"connection to {self.name} failed: {_describe(exc)}") from None
        assert connection is not None
        try:
            body_reader = connection.body(response_headers)
            if status != 200:
                raw = b""
                async for piece in body_reader:
                    raw += piece
                    if len(raw) >= MAX_ERROR_BODY_BYTES:
                        break
                raise ProviderError(
                    classify_status(status), error_message(raw, f"HTTP {status}"), status=status,
                    retry_after_s=parse_retry_after(response_headers.get("retry-after")),
                )
            async for piece in body_reader:
                yield piece
            reusable = connection.complete and response_headers.get("connection", "").lower() != "close"
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            raise ProviderError(ErrorKind.CONNECTION, f"connection to {self.name} failed: {_describe(exc)}") from None
        finally:
            if reusable:
                self._release(origin, connection)
            else:
                connection.close()
            self._slots.release()

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


#: Seconds an idle keep-alive connection is kept (servers commonly close them after 60 s or more).
IDLE_S = 30.0
_CHUNK_LINE_LIMIT = 1024


class _Connection:
    """One HTTP/1.1 connection and the framing of its current response body."""

    __slots__ = ("complete", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.complete = False

    def usable(self, now: float) -> bool:
        return now - self.idle_since < IDLE_S and not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()

    async def read_head(self) -> tuple[int, dict[str, str]]:
        """The status code and headers (lower-case names) of the response."""
        while True:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = raw.decode("latin-1").split("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"not an HTTP/1.1 response: {status_line[:80]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            for line in header_lines:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if status != 100:  # an interim 100 Continue is followed by the real answer
                return status, headers

    async def body(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The response body, one piece per network read; ``complete`` once it ended properly."""
        self.complete = False
        reader = self.reader
        if "chunked" in headers.get("transfer-encoding", "").lower():
            buffer = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection before the end of the response body")
                buffer += data
                out = []
                position = 0
                while True:
                    end = buffer.find(b"\r\n", position)
                    if end < 0:
                        if len(buffer) - position > _CHUNK_LINE_LIMIT:
                            raise ValueError("malformed chunked body")
                        break
                    size = int(buffer[position:end].split(b";", 1)[0], 16)
                    if size == 0:
                        # Last chunk: trailers (if any) end with an empty line.
                        terminator = buffer.find(b"\r\n\r\n", end)
                        if buffer[end:end + 4] == b"\r\n\r\n" or terminator >= 0:
                            if out:
                                yield b"".join(out)
                            self.complete = True
                            return
                        break
                    start = end + 2
                    if len(buffer) < start + size + 2:
                        break
                    out.append(buffer[start:start + size])
                    position = start + size + 2
                buffer = buffer[position:]
                if out:
                    yield b"".join(out)
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining > 0:
                data = await reader.read(min(65536, remaining))
                if not data:
                    raise ConnectionError("the server closed the connection before the end of the response body")
                remaining -= len(data)
                yield data
            self.complete = True
        else:  # delimited by the end of the connection
            while data := await reader.read(65536):
                yield data
