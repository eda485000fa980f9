"""chat: deliveries/s and delivery latency in one room of 10, 100 and 1000
clients, then the same with one more client that never reads."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from bench.harness import Context, Metric, interleaved_rounds, latencies_ms, line_up, run_loadgen
from bench.servers import Server, tcp_greets
from bench.stats import Figure

WINDOW = 4
METRICS = (
    Metric("deliveries/s", "/s", "higher", "rate"),
    Metric("p50 delivery latency", "ms", "lower", "p50_ms"),
    Metric("p99 delivery latency", "ms", "lower", "p99_ms"),
    Metric("time for every client to join", "s", "lower", "join_s"),
)


@dataclass(frozen=True)
class Case:
    clients: int
    non_reader: bool

    @property
    def senders(self) -> int:
        return max(1, min(10, self.clients // 10))

    def __str__(self) -> str:
        return f"{self.clients} clients{' + non-reader' if self.non_reader else ''}"


def cases(quick: bool) -> tuple[Case, ...]:
    sizes = (10, 100) if quick else (10, 100, 1000)
    return tuple(Case(n, silent) for silent in (False, True) for n in sizes)


def ncat_command(port: int) -> list[str]:
    return ["ncat", "--listen", "127.0.0.1", str(port), "--chat", "--max-conns", "10000"]


def run(ctx: Context) -> list[Figure]:
    all_cases = cases(ctx.plan.quick)
    ctx.setup(
        "chat",
        "`loadgen chat` joins the clients 8 at a time (each batch once the server greeted the one before),"
        " waits until the room is quiet, then 1 sender per 10 clients (at most 10) keeps"
        f" {WINDOW} lines in flight, as seen by one observing client. Every line that reaches any"
        " client counts as a delivery; latency is from the send to each delivery.",
    )
    ctx.setup(
        "chat",
        "With a non-reader: one more client that never reads joins first; before measuring, one sender"
        " pushes 6 MiB of 3 KB lines (or for at most 4 s) so that the non-reader's socket buffers are"
        " full. ncat then blocks on it (0 deliveries: stalled); sockproto drops it as too slow"
        " (`--chat-max-pending`, 1 MiB) and carries on.",
    )
    ctx.setup(
        "chat",
        "sockproto runs with `--chat-max-clients 0 --chat-rate 0` (no cap, no flood control);"
        " ncat with `--chat --max-conns 10000`. A C room (`loadgen serve PORT chat`: the lines of one"
        " epoll wait go to each client in one send, a non-reader's output waits unbounded) shows how"
        " fast the generator goes." + (" The quick run leaves out 1000 clients." if ctx.plan.quick else ""),
    )
    peers = [("ncat --chat", ncat_command)] if shutil.which("ncat") else []
    if not peers:
        ctx.note("chat: ncat is not installed (scripts/bench installs it with apt-get)")
    with ctx.servers() as stack:
        servers, figures = line_up(
            ctx,
            stack,
            "chat",
            ["--chat-max-clients", "0", "--chat-rate", "0"],
            peers,
            ["chat"],
            tcp_greets,
            ([str(c) for c in all_cases], METRICS),
        )

        def measure(server: Server, case: Case) -> dict[str, Any]:
            plan = ctx.plan
            result = run_loadgen(
                ctx,
                "chat",
                "127.0.0.1",
                server.port,
                case.clients,
                case.senders,
                WINDOW,
                plan.duration,
                plan.warmup,
                int(case.non_reader),
                timeout=plan.duration + plan.warmup + 120,
            )
            return chat_values(result, case.clients)

        figures += interleaved_rounds(ctx, "chat", all_cases, servers, METRICS, measure)
    return figures


def chat_values(result: dict[str, Any], clients: int) -> dict[str, Any]:
    """The figures of one run; ``stalled`` when the room stopped delivering."""
    values: dict[str, Any] = {"rate": result["rate"], "errors": result["errors"] + result["closed"]}
    values |= latencies_ms(result)
    if result["joined"] < clients:
        return values | {"stalled": True, "note": f"stalled: {result['joined']} of {clients} joined"}
    values["join_s"] = result["join_s"]
    if result["rate"] == 0:
        values |= {"stalled": True, "note": "stalled: nothing delivered"}
    return values
