"""Load test of the UDP responder over loopback: bounded in count and time.

    .venv/bin/python bench/udp_flood.py              # all three scenarios
    .venv/bin/python bench/udp_flood.py --seconds 2 --sources 20000

1. throughput: ``--udp-rate 0``; one client keeps WINDOW datagrams in flight
   for SECONDS and counts answers a second (the log budget keeps logging cheap).
2. flood: default limits; one source blasts COUNT datagrams at full speed; how
   many are answered, and how many the server got through per second.
3. sources: SOURCES distinct loopback addresses (127.x.y.z) send one datagram
   each, with a refill so slow that every source stays in the rate limiter's
   table; the server's memory as the table reaches its bound and stays there.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import ALL_OFF, Suite

FIRST_SOURCE = ipaddress.IPv4Address("127.1.0.1")  # all of 127/8 is loopback on Linux


def throughput(seconds: float, window: int, mode: str) -> None:
    with Suite([*ALL_OFF, "--udp-port", "0", "--udp-rate", "0", "--udp-mode", mode]) as suite:
        server = suite.address("udp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            for _ in range(window):
                sock.sendto(b"Ping !", server)
            answered = lost = 0
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                try:
                    sock.recv(65535)
                    answered += 1
                except TimeoutError:
                    lost += 1  # a datagram dropped somewhere: refill the window
                sock.sendto(b"Ping !", server)
            elapsed = time.monotonic() - started
    print(
        f"throughput ({mode}, rate limit off, {window} in flight): "
        f"{answered / elapsed:,.0f} answers/s over {elapsed:.1f} s ({lost} timeouts)"
    )


def flood(count: int) -> None:
    with Suite([*ALL_OFF, "--udp-port", "0"]) as suite:
        server = suite.address("udp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            started = time.monotonic()
            for _ in range(count):
                sock.sendto(b"Ping !", server)
            sent = time.monotonic() - started
            answered = 0
            sock.settimeout(1.0)
            try:
                while True:
                    sock.recv(65535)
                    answered += 1
            except TimeoutError:
                pass
        suite.stop()
        dropped = sum(int(n) for n in re.findall(r"(\d+) over the rate limit", suite.output))
        log_lines = len(suite.lines)
    handled = answered + dropped + 1  # +1: the first drop, logged on its own
    print(
        f"flood (one source, {count} datagrams sent in {sent:.2f} s): {answered} answered, "
        f"{handled} reached the server (the kernel dropped the rest), {log_lines} log lines in all"
    )


def sources(count: int) -> None:
    # A slow refill (1 token per 100 s) keeps every source's bucket in the
    # table, so the table reaches its bound (10000) and must stay there.
    args = [*ALL_OFF, "--udp-port", "0", "--udp-rate", "0.01/40"]
    with Suite(args) as suite:
        server = suite.address("udp")
        rss = [suite.rss_kib()]
        answered = 0
        started = time.monotonic()
        for n in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((str(FIRST_SOURCE + n), 0))
                sock.settimeout(1.0)
                sock.sendto(b"Ping !", server)
                try:
                    sock.recv(65535)
                    answered += 1
                except TimeoutError:
                    pass
            if n + 1 in (count // 4, count // 2, count):
                rss.append(suite.rss_kib())
        elapsed = time.monotonic() - started
    print(
        f"sources ({count} addresses, one datagram each, in {elapsed:.1f} s): {answered} answered; "
        f"server RSS KiB at 0, 1/4, 1/2, all of them: {', '.join(map(str, rss))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--mode", default="daytime")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--sources", type=int, default=40000)
    options = parser.parse_args()
    throughput(min(options.seconds, 30.0), options.window, options.mode)
    flood(min(options.count, 200_000))
    sources(min(options.sources, 100_000))


if __name__ == "__main__":
    main()
