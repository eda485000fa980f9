"""workers: strip and HTTP throughput of the suite with ``--workers 2`` against
one process, in the same run: how much of a second core the suite turns into
throughput."""

from __future__ import annotations

import shutil

from bench import wrk
from bench.harness import Context, Metric, interleaved_rounds, run_loadgen, skipped
from bench.report import ONE_PROCESS
from bench.scenarios.strip import PIPELINE_DEPTH
from bench.servers import Server, start_ours, tcp_answers
from bench.stats import OURS, Figure

CONNECTIONS = 100
HTTP_CONNECTIONS = 50
STRIP_CASES = (f"strip, {CONNECTIONS} conns", f"strip, {CONNECTIONS} conns, pipelined x{PIPELINE_DEPTH}")
HTTP_CASES = (f"http /, wrk -c{HTTP_CONNECTIONS}",)
METRICS = (Metric("throughput", "/s", "higher", "rate"),)


def without_workers(args: tuple[str, ...]) -> list[str]:
    """``--ours-arg`` values without any --workers: this scenario sets it."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def start_pair(ctx: Context, service: str, extra: list[str]) -> list[Server] | None:
    """The suite with 2 processes (named as ours) and with one."""
    base = without_workers(ctx.plan.ours_args)
    servers = []
    for name, workers in ((OURS, "2"), (ONE_PROCESS, "1")):
        server = start_ours(service, [*extra, "--workers", workers], ctx.work, base, tcp_answers)
        if server is None:
            return None
        server.name = name
        servers.append(server)
    return servers


def run(ctx: Context) -> list[Figure]:
    ctx.setup(
        "workers",
        f"sockproto with `--workers 2` (the main process and one worker sharing the listening sockets) in the"
        f" sockproto column, against one process (`--workers 1`), in the same rounds: `loadgen strip` with"
        f" {CONNECTIONS} connections, 1 line in flight each or {PIPELINE_DEPTH}, and `wrk -t1"
        f" -c{HTTP_CONNECTIONS}` on `/`. Caps are off (`--max-clients 0`, `--http-max-clients 0`). The load"
        " generator shares the 2 cores (and so do the other users of this machine): 2x is out of reach.",
    )
    figures: list[Figure] = []
    with ctx.servers() as stack:
        strip = start_pair(ctx, "strip", ["--max-clients", "0"])
        if strip is None:
            figures += skipped("workers", list(STRIP_CASES), METRICS, OURS, "not in the suite yet")
        else:
            for server in strip:
                stack.callback(server.stop)

            def measure_strip(server: Server, case: str) -> dict[str, float]:
                plan = ctx.plan
                depth = PIPELINE_DEPTH if "pipelined" in case else 1
                result = run_loadgen(
                    ctx,
                    "strip",
                    "127.0.0.1",
                    server.port,
                    CONNECTIONS,
                    depth,
                    plan.duration,
                    plan.warmup,
                    timeout=plan.duration + plan.warmup + 60,
                )
                return {"rate": result["rate"], "errors": result["errors"] + result["closed"]}

            figures += interleaved_rounds(ctx, "workers", STRIP_CASES, strip, METRICS, measure_strip)
    if shutil.which("wrk") is None:
        ctx.note("workers: http skipped, wrk is not installed")
        return figures
    with ctx.servers() as stack:
        web = start_pair(ctx, "http", ["--http-max-clients", "0"])
        if web is None:
            return figures + skipped("workers", list(HTTP_CASES), METRICS, OURS, "not in the suite yet")
        for server in web:
            stack.callback(server.stop)

        def measure_http(server: Server, case: str) -> dict[str, float]:
            return wrk.run(f"http://127.0.0.1:{server.port}/", HTTP_CONNECTIONS, ctx.plan.duration)

        figures += interleaved_rounds(ctx, "workers", HTTP_CASES, web, METRICS, measure_http)
    return figures
