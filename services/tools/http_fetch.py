"""The ``http_fetch`` tool: GET a web page from an allowlisted host, safely.

Server-side request forgery is the risk: a model (or a prompt injection in a page it read) asking
the service to fetch ``http://169.254.169.254/`` (cloud metadata), ``http://localhost:6379``
or an intranet host. The defences, in order:

1. **scheme and host allowlist**: only ``http``/``https`` URLs whose host matches an entry of
   ``allowed_hosts`` (``example.com`` exactly, or ``*.example.com`` for its subdomains, not the
   apex); checked for the first URL and again for every redirect target;
2. **address check after DNS resolution**: the host is resolved once, in the network backend
   that opens the connection, and the request is refused unless *every* address it resolves to
   is a public unicast address (not private, loopback, link-local, shared/CGNAT, multicast,
   reserved, unspecified, or an IPv4-mapped form of those). A name allowlisted by mistake
   (``localhost``) or one whose DNS points inside the network is refused;
3. **no DNS rebinding**: the connection goes to the address that was checked (the backend
   connects to the IP literal; TLS still verifies the certificate and sends SNI for the host
   name), so a second DNS answer cannot swap in an internal address between check and connect;
4. **limits**: at most ``max_redirects`` redirects, ``max_bytes`` of body (the rest is not
   read; ``truncated`` says so; a gzip/deflate body is inflated at most to that size, so a
   compression bomb cannot exhaust memory), ``timeout_s`` for the whole fetch, and no proxy,
   ``.netrc`` or other settings taken from the environment (a proxy would connect on our
   behalf, unchecked).

The address check is a constructor argument only so that the tests can permit their local
server; the service always uses :func:`is_public_address`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import httpcore
import httpx

from agentmesh.services.tools.registry import ProgressCallback, Tool, ToolError, ToolOutput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressCheck = Callable[[IPAddress], bool]
#: Content types returned as text; anything else is refused (a model cannot read bytes).
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml+xml", "application/javascript")
USER_AGENT = "agentmesh-http-fetch/0.1"


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address (``ipaddress``'s ``is_global``, which
    follows the IANA special-purpose registries, minus multicast), looking through
    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1`` is loopback)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast and not ip.is_unspecified and not ip.is_reserved


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """``host`` (lower-case ASCII, as in a URL) matches an allowlist entry: ``name`` exactly, or
    ``*.name`` for any subdomain of ``name``."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


class AddressRefused(Exception):
    """The host resolved to an address the fetch may not connect to."""


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked address (never the name)."""

    def __init__(self, address_allowed: AddressCheck):
        self._inner = httpcore.AnyIOBackend()
        self._allowed = address_allowed

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc.strerror}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not self._allowed(ip):
                raise AddressRefused(
                    f"{host!r} resolves to {ip}, which is not a public address (private, loopback, "
                    "link-local or otherwise reserved); fetching it is not allowed"
                )
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise httpcore.ConnectError(f"cannot connect to {host!r} on port {port}: {last}")

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):  # pragma: no cover
        raise AddressRefused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterator[bytes], response: httpcore.Response):
        self._stream = stream
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport on an httpcore pool whose connections all go through the check."""

    def __init__(self, address_allowed: AddressCheck):
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_GuardedBackend(address_allowed), retries=0
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream, response),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class HttpFetch(Tool):
    """GET a URL of an allowlisted host (see the module docstring).

    Output: ``{"url", "status", "content_type", "text", "bytes", "truncated"}`` where ``url``
    is the final URL after redirects, ``bytes`` the body bytes read. Failures are error results:
    a refused URL or address, a non-text content type, a timeout, a connection error, an HTTP
    status of 400 or more (with the output, so the model sees the page).
    """

    name = "http_fetch"
    parameters_schema = {
        "type": "object",
        "properties": {
            "url": {
                "type": "string",
                "minLength": 1,
                "maxLength": 2048,
                "description": "Absolute http:// or https:// URL of an allowed host.",
            }
        },
        "required": ["url"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "url": {"type": "string"},
            "status": {"type": "integer"},
            "content_type": {"type": "string"},
            "text": {"type": "string"},
            "bytes": {"type": "integer", "minimum": 0},
            "truncated": {"type": "boolean"},
        },
        "required": ["url", "status", "content_type", "text", "bytes", "truncated"],
        "additionalProperties": False,
    }

    def __init__(
        self,
        allowed_hosts: Sequence[str],
        *,
        max_bytes: int = 1_000_000,
        timeout_s: float = 10.0,
        max_redirects: int = 5,
        address_allowed: AddressCheck = is_public_address,
    ):
        self.allowed_hosts = list(allowed_hosts)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self._address_allowed = address_allowed
        self.description = (
            "Fetch a web page or text document over HTTP(S) with GET and return its text. Only these "
            f"hosts are allowed: {', '.join(self.allowed_hosts)}. At most {max_bytes} bytes are returned."
        )

    def _check_url(self, url: httpx.URL) -> None:
        if url.scheme not in ("http", "https"):
            raise ToolError(f"only http:// and https:// URLs can be fetched, not {url.scheme or 'a relative'} URL")
        host = url.raw_host.decode("ascii", errors="replace")  # IDNA (punycode) form
        if not host:
            raise ToolError("the URL has no host")
        if not host_allowed(host, self.allowed_hosts):
            raise ToolError(f"host {host!r} is not in the allowlist ({', '.join(self.allowed_hosts)})")

    async def run(self, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        try:
            url = httpx.URL(arguments["url"])
        except httpx.InvalidURL as exc:
            raise ToolError(f"not a valid URL: {exc}") from None
        self._check_url(url)
        timeout = httpx.Timeout(self.timeout_s)
        client = httpx.AsyncClient(
            transport=GuardedTransport(self._address_allowed),
            trust_env=False,
            follow_redirects=False,
            timeout=timeout,
            headers={
                "user-agent": USER_AGENT,
                "accept": "text/html, text/*;q=0.9, application/json;q=0.8, */*;q=0.1",
                "accept-encoding": "gzip, deflate",
            },
        )
        try:
            async with client, asyncio.timeout(self.timeout_s):
                return await self._fetch(client, url, progress)
        except TimeoutError:
            raise ToolError(f"fetching {url} took longer than {self.timeout_s:g} s") from None
        except AddressRefused as exc:
            raise ToolError(str(exc)) from None
        except (httpx.HTTPError, httpcore.ConnectError, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, AddressRefused) else exc
            raise ToolError(f"fetching {url} failed: {cause or type(exc).__name__}") from None

    async def _fetch(self, client: httpx.AsyncClient, url: httpx.URL, progress: ProgressCallback) -> ToolOutput:
        for _ in range(self.max_redirects + 1):
            await progress(f"GET {url}", None)
            async with client.stream("GET", url) as response:
                if response.is_redirect:
                    target = response.headers.get("location", "")
                    url = url.join(target)
                    self._check_url(url)
                    continue
                content_type = response.headers.get("content-type", "")
                if content_type and not content_type.lower().startswith(TEXT_TYPES):
                    raise ToolError(f"{url} returned {content_type!r}, which is not text; only text can be fetched")
                body, truncated = await _read_limited(response, self.max_bytes)
            output = {
                "url": str(url),
                "status": response.status_code,
                "content_type": content_type,
                "text": body.decode(response.encoding or "utf-8", errors="replace"),
                "bytes": len(body),
                "truncated": truncated,
            }
            if response.status_code >= 400:
                raise ToolError(f"{url} answered HTTP {response.status_code}", output)
            return ToolOutput(output=output)
        raise ToolError(f"more than {self.max_redirects} redirects; stopped at {url}")


async def _read_limited(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, inflated when it is gzip or deflate encoded; True
    when there was more. The raw stream is inflated here, bounded by ``max_length``, rather than
    by httpx, whose decoders inflate each received chunk without a bound."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    elif encoding in ("identity", ""):
        inflater = None
    else:
        raise ToolError(f"the response uses content encoding {encoding!r}, which cannot be read")
    data = bytearray()
    async for chunk in response.aiter_raw():
        if inflater is not None:
            try:
                chunk = inflater.decompress(chunk, limit + 1 - len(data))
            except zlib.error as exc:
                raise ToolError(f"the compressed response is corrupt: {exc}") from None
        data += chunk
        if len(data) > limit or (inflater is not None and inflater.unconsumed_tail):
            return bytes(data[:limit]), True
    return bytes(data), False
