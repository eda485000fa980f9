"""strip: line round trips/s and latency at 1, 10 and 100 connections,
one line in flight per connection or 16 (pipelined)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.harness import Context, Metric, interleaved_rounds, latencies_ms, line_up, run_loadgen
from bench.servers import Server, python_peer, tcp_answers
from bench.stats import Figure

PIPELINE_DEPTH = 16
METRICS = (
    Metric("round trips/s", "/s", "higher", "rate"),
    Metric("p50 latency", "ms", "lower", "p50_ms"),
    Metric("p99 latency", "ms", "lower", "p99_ms"),
)
PEERS = (
    ("Twisted LineReceiver", python_peer("strip_twisted")),
    ("asyncio + uvloop", python_peer("strip_uvloop")),
    ("select() (seed 000)", python_peer("strip_select")),
)


@dataclass(frozen=True)
class Case:
    connections: int
    depth: int

    def __str__(self) -> str:
        conns = f"{self.connections} conn{'s' if self.connections > 1 else ''}"
        return f"{conns}, pipelined x{self.depth}" if self.depth > 1 else conns


CASES = tuple(Case(n, depth) for depth in (1, PIPELINE_DEPTH) for n in (1, 10, 100))


def run(ctx: Context) -> list[Figure]:
    ctx.setup(
        "strip",
        f"`loadgen strip` (C, epoll, one thread) sends `hello world bench` lines and counts the NUL-ended"
        f" answers; each connection keeps 1 line (or {PIPELINE_DEPTH}, pipelined) in flight. Every peer"
        " gives the same answer. sockproto runs with `--max-clients 0`.",
    )
    with ctx.servers() as stack:
        servers, figures = line_up(
            ctx,
            stack,
            "strip",
            ["--max-clients", "0"],
            PEERS,
            [],
            tcp_answers,
            ([str(c) for c in CASES], METRICS),
        )

        def measure(server: Server, case: Case) -> dict[str, float]:
            plan = ctx.plan
            result = run_loadgen(
                ctx,
                "strip",
                "127.0.0.1",
                server.port,
                case.connections,
                case.depth,
                plan.duration,
                plan.warmup,
                timeout=plan.duration + plan.warmup + 60,
            )
            return latencies_ms(result) | {
                "rate": result["rate"],
                "errors": result["errors"] + result["closed"],
            }

        figures += interleaved_rounds(ctx, "strip", CASES, servers, METRICS, measure)
    return figures
