"""A Streamable HTTP MCP server on the official Python SDK (`MCPServer`,
mcp 2.x), for tests/mcp.rs: the runtime connects to it as an HTTP tool
source. It prints its port, then serves on 127.0.0.1 until killed. With
MCP_TEST_TOKEN set, a request without `Authorization: Bearer <token>` is
refused with 401. Its `ping_flood` tool is hostile: it sends the client
pings, and from then on this server never answers a POST of that MCP
session that carries the client's answer to one of its own requests, so
the answers pile up unless the client bounds them. Test-only; runs from the server venv that
`scripts/setup --peers` builds.
"""

import asyncio
import json
import os
import socket

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("notes")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """Upper-cases a text."""
    return text.upper()


@server.tool()
async def ping_flood(ctx: Context) -> str:
    """Sends pings whose answers it never takes."""
    await asyncio.gather(*(ctx.session.send_ping() for _ in range(200)))
    return "every ping answered"


TOKEN = os.environ.get("MCP_TEST_TOKEN")
# The MCP sessions that called `ping_flood`.
FLOODED = set()


def is_answer(body):
    """Whether a POST body is a JSON-RPC answer (no method; a result or an
    error), judged by its top-level keys."""
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return isinstance(message, dict) and "method" not in message and (
        "result" in message or "error" in message
    )


def calls_ping_flood(body):
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(message, dict)
        and message.get("method") == "tools/call"
        and isinstance(message.get("params"), dict)
        and message["params"].get("name") == "ping_flood"
    )


class Bearer:
    """Refuses HTTP requests without the token (lifespan events pass)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and TOKEN is not None:
            given = dict(scope["headers"]).get(b"authorization")
            if given != f"Bearer {TOKEN}".encode():
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"text/plain")],
                    }
                )
                await send({"type": "http.response.body", "body": b"bad token"})
                return
        if scope["type"] == "http" and scope["method"] == "POST":
            # Read the body to tell a flooded session's answers from the
            # rest, then hand what was read on.
            session = dict(scope["headers"]).get(b"mcp-session-id")
            received = []
            while True:
                message = await receive()
                received.append(message)
                if not message.get("more_body"):
                    break
            body = b"".join(m.get("body", b"") for m in received)
            if calls_ping_flood(body):
                FLOODED.add(session)
            elif session in FLOODED and is_answer(body):
                await asyncio.Event().wait()  # never answered

            async def replay():
                return received.pop(0) if received else await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print(listener.getsockname()[1], flush=True)
config = uvicorn.Config(
    Bearer(server.streamable_http_app()), log_level="warning", lifespan="on"
)
uvicorn.Server(config).run(sockets=[listener])
