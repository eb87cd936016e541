"""http_fetch against a real local HTTP server.

This machine has no internet, so a *permitted* fetch can only reach a local server, which the
real address check refuses (loopback is not public). Those tests therefore construct the tool
with an address check that also permits loopback — the constructor argument exists for this
only; the service always uses ``is_public_address``. Every refusal test uses the real check.
"""

from __future__ import annotations

import gzip
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentmesh.services.tools.http_fetch import HttpFetch, host_allowed, is_public_address
from agentmesh.services.tools.registry import ToolError

BOMB = gzip.compress(b"\0" * (64 * 2**20))  # 64 MiB of zeros in about 64 KiB


class Handler(BaseHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", **headers: str):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        Handler.requests.append(self.path)
        port = self.server.server_address[1]
        if self.path == "/page":
            self._send(200, "<h1>Grüße</h1>".encode(), "text/html; charset=utf-8")
        elif self.path == "/big":
            self._send(200, b"a" * 300_000)
        elif self.path == "/bomb":
            self._send(200, BOMB, content_encoding="gzip")
        elif self.path == "/binary":
            self._send(200, b"\x89PNG...", "image/png")
        elif self.path == "/missing":
            self._send(404, b"no such page")
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, b"late")
        elif self.path == "/to-page":
            self._send(302, b"", location="/page")
        elif self.path == "/to-ip":
            self._send(302, b"", location=f"http://127.0.0.1:{port}/page")
        elif self.path == "/loop":
            self._send(302, b"", location="/loop")
        else:
            self._send(404, b"unknown")


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def clear_requests():
    Handler.requests.clear()


def loopback_too(ip) -> bool:
    """Test-only check: public addresses and loopback (our local server)."""
    return ip.is_loopback or is_public_address(ip)


async def no_progress(message, fraction=None, *, stream=0):
    return None


async def fetch(tool: HttpFetch, url: str):
    return (await tool.run({"url": url}, no_progress)).output


# -- refusals, with the real address check ------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space (CGNAT)
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
    ],
)
def test_only_public_addresses_are_allowed(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_host_allowlist_patterns():
    allowed = ["docs.python.org", "*.example.com"]
    assert host_allowed("docs.python.org", allowed)
    assert host_allowed("DOCS.python.org.", allowed)
    assert host_allowed("a.b.example.com", allowed)
    assert not host_allowed("example.com", allowed)  # '*.' means subdomains only
    assert not host_allowed("evil-example.com", allowed)
    assert not host_allowed("python.org", allowed)


async def test_a_host_outside_the_allowlist_is_refused_without_a_request(server):
    tool = HttpFetch(["docs.python.org"])
    with pytest.raises(ToolError, match=r"host 'localhost' is not in the allowlist \(docs.python.org\)"):
        await fetch(tool, f"http://localhost:{server}/page")
    assert Handler.requests == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_loopback_is_refused_even_when_allowlisted(server, host):
    tool = HttpFetch([host])  # the real address check
    with pytest.raises(ToolError, match=r"resolves to (127\.0\.0\.1|::1), which is not a public address"):
        await fetch(tool, f"http://{host}:{server}/page")
    assert Handler.requests == []


async def test_a_private_address_is_refused_even_when_allowlisted():
    tool = HttpFetch(["10.255.255.1", "169.254.169.254"])
    with pytest.raises(ToolError, match="resolves to 10.255.255.1, which is not a public address"):
        await fetch(tool, "http://10.255.255.1/")
    with pytest.raises(ToolError, match="resolves to 169.254.169.254, which is not a public address"):
        await fetch(tool, "http://169.254.169.254/latest/meta-data/")


async def test_other_schemes_are_refused():
    tool = HttpFetch(["localhost"])
    for url in ("file:///etc/passwd", "ftp://localhost/x", "/relative"):
        with pytest.raises(ToolError, match="only http:// and https://"):
            await fetch(tool, url)


async def test_the_connection_goes_to_the_checked_address_not_a_second_dns_answer(server, monkeypatch):
    """DNS rebinding: the first answer passes the check, a second one would point at the local
    server. The name must be resolved once and the checked address connected to."""
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            answer = "127.0.0.2" if not answers else "127.0.0.1"
            answers.append(answer)
            return real(answer, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    # The check treats 127.0.0.2 as "public" and 127.0.0.1 (where the server listens) as not.
    tool = HttpFetch(["rebind.test"], timeout_s=3, address_allowed=lambda ip: str(ip) == "127.0.0.2")
    with pytest.raises(ToolError, match="cannot connect to 'rebind.test'"):
        await fetch(tool, f"http://rebind.test:{server}/page")
    assert answers == ["127.0.0.2"]
    assert Handler.requests == []


# -- permitted fetches (test-only address check that also permits loopback) ---------------------


async def test_a_permitted_fetch_returns_the_text(server):
    tool = HttpFetch(["localhost"], address_allowed=loopback_too)
    output = await fetch(tool, f"http://localhost:{server}/page")
    assert output == {
        "url": f"http://localhost:{server}/page",
        "status": 200,
        "content_type": "text/html; charset=utf-8",
        "text": "<h1>Grüße</h1>",
        "bytes": len("<h1>Grüße</h1>".encode()),
        "truncated": False,
    }


async def test_the_body_is_cut_at_max_bytes(server):
    tool = HttpFetch(["localhost"], max_bytes=1000, address_allowed=loopback_too)
    output = await fetch(tool, f"http://localhost:{server}/big")
    assert output["truncated"] and output["bytes"] == 1000 and output["text"] == "a" * 1000


async def test_a_compression_bomb_is_inflated_only_up_to_max_bytes(server):
    tool = HttpFetch(["localhost"], max_bytes=100_000, address_allowed=loopback_too)
    output = await fetch(tool, f"http://localhost:{server}/bomb")
    assert output["truncated"] and output["bytes"] == 100_000


async def test_redirects_are_followed_and_checked_again(server):
    tool = HttpFetch(["localhost"], address_allowed=loopback_too)
    output = await fetch(tool, f"http://localhost:{server}/to-page")
    assert output["url"] == f"http://localhost:{server}/page" and output["text"] == "<h1>Grüße</h1>"
    # A redirect to a host that is not allowlisted is refused before it is requested.
    with pytest.raises(ToolError, match="host '127.0.0.1' is not in the allowlist"):
        await fetch(tool, f"http://localhost:{server}/to-ip")
    assert Handler.requests == ["/to-page", "/page", "/to-ip"]
    with pytest.raises(ToolError, match="more than 2 redirects"):
        await fetch(HttpFetch(["localhost"], max_redirects=2, address_allowed=loopback_too), f"http://localhost:{server}/loop")


async def test_time_limit(server):
    tool = HttpFetch(["localhost"], timeout_s=0.5, address_allowed=loopback_too)
    started = time.monotonic()
    with pytest.raises(ToolError, match="took longer than 0.5 s"):
        await fetch(tool, f"http://localhost:{server}/slow")
    assert time.monotonic() - started < 1.5


async def test_non_text_and_http_errors_are_error_results(server):
    tool = HttpFetch(["localhost"], address_allowed=loopback_too)
    with pytest.raises(ToolError, match="'image/png', which is not text"):
        await fetch(tool, f"http://localhost:{server}/binary")
    with pytest.raises(ToolError, match="answered HTTP 404") as err:
        await fetch(tool, f"http://localhost:{server}/missing")
    assert err.value.output["text"] == "no such page" and err.value.output["status"] == 404
