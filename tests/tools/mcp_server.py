"""A small MCP server for the tests, written with the official SDK's MCPServer (FastMCP's name
in mcp 2.x). Run as ``python mcp_server.py stdio`` or ``python mcp_server.py http <port>``."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

server = MCPServer("demo")


class Sum(BaseModel):
    total: float


@server.tool()
def add(a: float, b: float) -> Sum:
    """Add two numbers."""
    return Sum(total=a + b)


@server.tool()
async def count(steps: int, ctx: Context) -> str:
    """Count to `steps`, reporting progress at each step."""
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"step {i + 1} of {steps}")
        await anyio.sleep(0.05)
    return f"counted to {steps}"


@server.tool()
async def sleep(seconds: float, marker: str) -> str:
    """Sleep; if cancelled, write 'cancelled' to the file `marker`."""
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        Path(marker).write_text("cancelled")
        raise
    return "woke up"


@server.tool()
async def tally(path: str, delay_s: float) -> int:
    """A side effect first (append a line to the file `path`), then wait `delay_s` seconds; returns
    the lines the file has, i.e. how many times the tool ran."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("ran\n")
    await anyio.sleep(delay_s)
    return len(Path(path).read_text(encoding="utf-8").splitlines())


@server.tool()
def fail(reason: str) -> str:
    """Always fails with `reason`."""
    raise ToolError(reason)


@server.tool(name="text.upper", structured_output=False)
def upper(text: str) -> str:
    """Upper-case a text (a dotted tool name)."""
    return text.upper()


if __name__ == "__main__":
    if sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
