"""strip on asyncio with uvloop: an idiomatic ``asyncio.Protocol`` answering
every complete line in a chunk with one write."""

from __future__ import annotations

import asyncio
import sys

import uvloop

WHITESPACE = b" \t\r"


class Strip(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        if lines:
            self.transport.write(b"".join(line.translate(None, WHITESPACE) + b"\0" for line in lines))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Strip, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
