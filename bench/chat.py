"""Chat fan-out benchmark, loopback only: one talker, N listeners, optionally
one client that never reads.

    .venv/bin/python bench/chat.py --listeners 100 --lines 10000 --stalled

Starts the real suite (twistd) on a free port, sends LINES lines of about
100 bytes from one client with the rate limit off, and reports how long it
took until every listener had every line, deliveries per second, and the
server's resident memory before and after. Bounded: at most 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import ALL_OFF, Suite, recv_until

LIMIT = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listeners", type=int, default=100)
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--stalled", action="store_true", help="add a client that never reads")
    args = parser.parse_args()

    suite = Suite([*ALL_OFF, "--chat-port", "0", "--chat-rate", "0", "--chat-history", "0"]).start()
    sockets: list[socket.socket] = []
    try:
        if args.stalled:
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(suite.address("chat"))
            sockets.append(stalled)
        selector = selectors.DefaultSelector()
        counts: dict[socket.socket, int] = {}
        for _ in range(args.listeners):
            sock = suite.connect("chat")
            recv_until(sock, lambda data: data.endswith(b"\n"))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            counts[sock] = 0
            sockets.append(sock)
        talker = suite.connect("chat")
        sockets.append(talker)
        talker.setblocking(False)
        payload = memoryview(b"".join(b"line %06d %s\n" % (i, b"y" * 88) for i in range(args.lines)))
        before = suite.rss_kib()

        started, sent, done = time.monotonic(), 0, 0
        while done < args.listeners and time.monotonic() - started < LIMIT:
            if sent < len(payload):
                with contextlib.suppress(BlockingIOError):
                    sent += talker.send(payload[sent : sent + 65536])
            for key, _ in selector.select(0.01):
                sock = key.fileobj
                try:
                    data = sock.recv(1 << 20)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                had = counts[sock]  # type: ignore[index]
                counts[sock] = had + data.count(b"<guest")  # type: ignore[index]
                if had < args.lines <= counts[sock]:  # type: ignore[index]
                    done += 1
        elapsed = time.monotonic() - started
        after = suite.rss_kib()
        deliveries = sum(min(count, args.lines) for count in counts.values())
        print(
            f"{args.listeners} listeners x {args.lines} lines"
            f"{' (+1 stalled)' if args.stalled else ''}: {elapsed:.2f} s, "
            f"{deliveries / elapsed:,.0f} deliveries/s, {done}/{args.listeners} complete; "
            f"server RSS {before} -> {after} KiB; "
            f"dropped as too slow: {sum('left: too slow' in line for line in suite.lines)}"
        )
    finally:
        for sock in sockets:
            sock.close()
        suite.stop()


if __name__ == "__main__":
    main()
