"""The floor for strip: the same answer from a plain Twisted ``LineReceiver``,
with none of sockproto's limits, counters or close handling."""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class Strip(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65536

    def lineReceived(self, line: bytes) -> None:
        self.transport.write(line.translate(None, b" \t\r") + b"\0")


def main(port: int) -> None:
    reactor.listenTCP(port, Factory.forProtocol(Strip), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
