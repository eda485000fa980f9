"""The minimal twisted.web peer: a greeting at ``/`` and ``static.File``
under ``/files/``, on a plain ``Site`` (its default access log included)."""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web import resource, server, static

GREETING = b"Hello from a minimal twisted.web Site (sockproto bench peer)\n"


class Greeting(resource.Resource):
    isLeaf = False

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return GREETING


def main(port: int, files: str) -> None:
    root = Greeting()
    root.putChild(b"files", static.File(files))
    reactor.listenTCP(port, server.Site(root), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
