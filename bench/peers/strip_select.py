"""strip as seed 000 writes it, in Python: one thread, one ``select()`` over
the listening socket and a list of clients, ``recv(1024)``, blocking sends.

Line-correct where the seed is not (the seed answers each 1024-byte read as
if it were one line), so that the same load generator can drive it.
"""

from __future__ import annotations

import select
import socket
import sys


def main(port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    clients: list[socket.socket] = []
    pending: dict[socket.socket, bytes] = {}
    while True:
        readable, _, _ = select.select([server, *clients], [], [])
        for sock in readable:
            if sock is server:
                client, _ = server.accept()
                clients.append(client)
                pending[client] = b""
                continue
            try:
                data = sock.recv(1024)
                *lines, pending[sock] = (pending[sock] + data).split(b"\n")
                for line in lines:
                    sock.sendall(line.translate(None, b" \t\r") + b"\0")
            except OSError:  # reset by the peer: the seed would crash here
                data = b""
            if not data:
                clients.remove(sock)
                del pending[sock]
                sock.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
