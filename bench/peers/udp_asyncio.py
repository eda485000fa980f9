"""The UDP peer: an asyncio ``DatagramProtocol`` answering every datagram
with the daytime line in the seed's format, and nothing else."""

from __future__ import annotations

import asyncio
import sys
import time


class Daytime(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        now = time.localtime()
        line = time.strftime(f"%a %b {now.tm_mday} %H:%M:%S %Y\r\n", now)
        self.transport.sendto(line.encode("ascii"), addr)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Daytime, local_addr=("127.0.0.1", port))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
