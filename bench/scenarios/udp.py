"""udp: daytime answers/s from one source and from many (each its own
127.0.1.x address, so per-source state is exercised as a flood would)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from bench.harness import Context, Metric, interleaved_rounds, line_up, run_loadgen
from bench.servers import Server, python_peer, udp_answers
from bench.stats import Figure

METRICS = (Metric("answers/s", "/s", "higher", "rate"),)


@dataclass(frozen=True)
class Case:
    sources: int
    window: int

    def __str__(self) -> str:
        return f"{self.sources} source{'s' if self.sources > 1 else ''}"


CASES = (Case(1, 32), Case(64, 4))


def run(ctx: Context) -> list[Figure]:
    ctx.setup(
        "udp",
        "`loadgen udp` keeps 32 datagrams in flight from one socket, or 4 from each of 64 sockets bound to"
        " 127.0.1.1-64; a source silent for 50 ms starts its window again (losses are counted, not waited"
        " for). sockproto runs with `--udp-mode daytime --udp-rate 0` (no rate limit) and logs every"
        " datagram, as it does by default; the peer logs nothing. A C responder (`loadgen serve PORT udp`)"
        " shows how fast the generator goes.",
    )
    with ctx.servers() as stack:
        servers, figures = line_up(
            ctx,
            stack,
            "udp",
            ["--udp-mode", "daytime", "--udp-rate", "0"],
            [("asyncio DatagramProtocol", python_peer("udp_asyncio"))],
            ["udp"],
            udp_answers,
            ([str(c) for c in CASES], METRICS),
            socket.SOCK_DGRAM,
        )

        def measure(server: Server, case: Case) -> dict[str, float]:
            plan = ctx.plan
            result = run_loadgen(
                ctx,
                "udp",
                "127.0.0.1",
                server.port,
                case.sources,
                case.window,
                plan.duration,
                plan.warmup,
                timeout=plan.duration + plan.warmup + 30,
            )
            return {"rate": result["rate"]}

        figures += interleaved_rounds(ctx, "udp", CASES, servers, METRICS, measure)
    return figures
