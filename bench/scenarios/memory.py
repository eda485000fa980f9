"""memory: resident memory per idle connection, with 5000 connections open,
each having made one exchange (so its buffers and protocol state exist)."""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.harness import Context, Metric, interleaved_rounds, skipped
from bench.scenarios import http as http_scenario
from bench.scenarios import strip as strip_scenario
from bench.servers import Server, ServerError, start_ours, start_peer, tcp_answers
from bench.stats import OURS, Figure

METRICS = (
    Metric("RSS per idle connection", "KiB", "lower", "per_connection"),
    Metric("RSS with the connections open", "MiB", "lower", "total_mib"),
)
BATCH = 40  # connections opened before waiting for their answers: below every listen backlog
DEADLINE = 60.0


@dataclass(frozen=True)
class Protocol:
    request: bytes
    done: Callable[[bytes], bool]


def _http_done(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


STRIP = Protocol(b"hello world\n", lambda data: b"\0" in data)
HTTP = Protocol(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", _http_done)


class Fresh:
    """A server started anew for every round, so rounds do not share a heap."""

    def __init__(self, name: str, start: Callable[[], Server | None]) -> None:
        self.name = name
        self.start = start

    def alive(self) -> bool:
        return True


def exchange(socks: Sequence[socket.socket], protocol: Protocol, deadline: float) -> None:
    """Sends the request on every socket and waits for every answer."""
    received = {sock: b"" for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.sendall(protocol.request)
            selector.register(sock, selectors.EVENT_READ)
        waiting = len(socks)
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{waiting} of {len(socks)} answers missing after {DEADLINE:.0f} s")
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed a connection")
                received[sock] += chunk
                if protocol.done(received[sock]):
                    selector.unregister(sock)
                    waiting -= 1


def hold(server: Server, protocol: Protocol, connections: int) -> dict[str, Any]:
    """Opens the connections in batches, one exchange each; the server's RSS before and after."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as warm:
        exchange([warm], protocol, time.monotonic() + DEADLINE)
    before = server.process.rss_kib()
    socks: list[socket.socket] = []
    deadline = time.monotonic() + DEADLINE
    try:
        while len(socks) < connections:
            batch = [
                socket.create_connection(("127.0.0.1", server.port), timeout=10)
                for _ in range(min(BATCH, connections - len(socks)))
            ]
            socks += batch
            exchange(batch, protocol, deadline)
            if not server.process.alive():
                raise ServerError(f"exited after {len(socks)} connections: {server.process.tail(1)}")
        after = server.process.rss_kib()
    except (OSError, RuntimeError) as error:
        if server.process.exits_within(2.0):
            raise ServerError(f"exited after {len(socks)} connections: {server.process.tail(1)}") from error
        raise RuntimeError(f"after {len(socks)} connections: {error}") from error
    finally:
        for sock in socks:
            sock.close()
    return {"per_connection": (after - before) / connections, "total_mib": after / 1024}


def run(ctx: Context) -> list[Figure]:
    count = ctx.plan.memory_connections
    ctx.setup(
        "memory",
        f"{count} connections opened {BATCH} at a time, each making one exchange (a strip line; a"
        " keep-alive `GET /`), then left idle; the figure is the growth of the server's resident memory"
        f" (VmRSS, with nginx's worker) divided by {count}. Each round starts a fresh server."
        " http.server is left out: it runs a thread per connection.",
    )
    figures: list[Figure] = []
    www = http_scenario.make_site(ctx.work)
    families = [
        (
            f"strip, {count} connections",
            STRIP,
            "strip",
            ["--max-clients", "0"],
            [(name, command) for name, command in strip_scenario.PEERS],
        ),
        (
            f"http, {count} connections",
            HTTP,
            "http",
            ["--http-root", str(www / "files"), "--http-max-clients", "0"],
            [
                (name, command)
                for name, command in http_scenario.peers(ctx.work, www)
                if "http.server" not in name
            ],
        ),
    ]
    for case, protocol, service, ours_extra, peers in families:
        servers: list[Fresh] = []
        probe = start_ours(service, ours_extra, ctx.work, ctx.plan.ours_args, tcp_answers)
        if probe is None:
            figures += skipped("memory", [case], METRICS, OURS, "not in the suite yet")
        else:
            probe.stop()
            servers.append(
                Fresh(
                    OURS,
                    lambda service=service, extra=ours_extra: start_ours(
                        service, extra, ctx.work, ctx.plan.ours_args, tcp_answers
                    ),
                )
            )
        for name, command in peers:
            servers.append(
                Fresh(
                    name, lambda name=name, command=command: start_peer(name, command, ctx.work, tcp_answers)
                )
            )

        def measure(fresh: Fresh, case: str, protocol: Protocol = protocol) -> dict[str, Any]:
            server = fresh.start()
            if server is None:
                raise RuntimeError("did not start")
            try:
                return hold(server, protocol, count)
            finally:
                server.stop()

        figures += interleaved_rounds(ctx, "memory", [case], servers, METRICS, measure)
    return figures
