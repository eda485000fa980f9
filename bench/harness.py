"""What every scenario shares: the run's context, the C load generator, and
the loop that measures each case on each server in interleaved rounds."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cli import Plan
from bench.report import C_REFERENCE, format_value
from bench.servers import Server, ServerError, start_ours, start_peer
from bench.stats import OURS, Better, Figure

LOADGEN_SOURCE = Path(__file__).with_name("loadgen.c")


@dataclass
class Context:
    plan: Plan
    work: Path
    loadgen: Path
    notes: list[str] = field(default_factory=list)
    setups: dict[str, list[str]] = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(message, flush=True)

    def note(self, message: str) -> None:
        """Goes to the console now and to RESULTS.md's notes at the end."""
        self.say(f"  note: {message}")
        self.notes.append(message)

    def setup(self, service: str, line: str) -> None:
        """One line of RESULTS.md describing how a service was measured."""
        self.setups.setdefault(service, []).append(line)

    @contextmanager
    def servers(self) -> Iterator[ExitStack]:
        """Everything started inside is stopped on the way out, whatever happens."""
        with ExitStack() as stack:
            yield stack


def compile_loadgen(work: Path) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("bench: needs gcc (or cc) to build the load generator (apt-get install gcc)")
    target = work / "loadgen"
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(target), str(LOADGEN_SOURCE)], check=True)
    return target


def run_loadgen(ctx: Context, *args: object, timeout: float) -> dict[str, Any]:
    """One run of the C load generator; its JSON line as a dict."""
    command = [str(ctx.loadgen), *(str(a) for a in args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"load generator timed out after {timeout:.0f} s") from error
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip() or done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def latencies_ms(result: dict[str, Any]) -> dict[str, float]:
    """The load generator's percentiles in ms; none when nothing was answered."""
    if not result.get("ops"):
        return {}
    return {"p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000}


@dataclass(frozen=True)
class Metric:
    """A figure a measurement yields: ``key`` in the dict ``measure`` returns."""

    name: str
    unit: str
    better: Better
    key: str


def interleaved_rounds(
    ctx: Context,
    service: str,
    cases: Sequence[Any],
    servers: Sequence[Any],
    metrics: Sequence[Metric],
    measure: Callable[[Any, Any], dict[str, Any]],
) -> list[Figure]:
    """Each case: ``rounds`` rounds, every server once per round, the order rotating.

    A server is anything with a ``name`` and an ``alive()`` (a started
    :class:`Server`, or a recipe that starts one per round).

    ``measure`` returns a value per metric key, and may add ``errors`` (a
    count), ``note`` (a word on the figures) and ``stalled`` (true: the server
    stopped serving, so its later rounds of this case are not run). A failed
    measurement is noted on its figures; a server that died is left out of
    what remains (its figures say so).
    """
    figures: list[Figure] = []
    rounds = ctx.plan.rounds
    for case in cases:
        case_name = str(case)
        by_server = {
            server.name: [
                Figure(service, metric.name, case_name, server.name, metric.unit, metric.better)
                for metric in metrics
            ]
            for server in servers
        }
        stalled: set[str] = set()
        for round_index in range(rounds):
            shift = round_index % max(1, len(servers))
            for server in [*servers[shift:], *servers[:shift]]:
                own = by_server[server.name]
                if server.name in stalled:
                    continue
                if not server.alive() and not _restarted(ctx, server, f"{service} {case_name}"):
                    for figure in own:
                        figure.note = figure.note or "server exited"
                    continue
                try:
                    values = measure(server, case)
                except (RuntimeError, OSError, ServerError) as error:
                    ctx.say(f"  {service} {case_name} round {round_index + 1}: {server.name} failed: {error}")
                    for figure in own:
                        figure.note = f"failed: {str(error).splitlines()[0][:80]}"
                    continue
                for figure, metric in zip(own, metrics, strict=True):
                    if metric.key in values:
                        figure.values.append(values[metric.key])
                notes = [values["note"]] if values.get("note") else []
                if values.get("errors"):
                    notes.append(f"errors seen: {values['errors']:.0f}")
                if values.get("stalled"):
                    stalled.add(server.name)
                    if round_index + 1 < rounds:
                        notes.append("not repeated")
                for figure in own:
                    figure.note = "; ".join(notes) or figure.note
                shown = ", ".join(format_value(values[m.key], m.unit) for m in metrics if m.key in values)
                extra = f" ({'; '.join(notes)})" if notes else ""
                ctx.say(
                    f"  {service} {case_name} round {round_index + 1}/{rounds}: {server.name}: {shown}{extra}"
                )
        for own in by_server.values():
            figures.extend(own)
    return figures


MAX_RESTARTS = 3


def _restarted(ctx: Context, server: Any, where: str) -> bool:
    """A server that crashed is started again (a few times), and the crash noted."""
    restart = getattr(server, "restart", None)
    if restart is None or getattr(server, "restarts", 0) >= MAX_RESTARTS:
        return False
    last_words = server.process.tail(1).strip() or "no output"
    ctx.note(f"{server.name} exited during {where} ({last_words}); started it again")
    try:
        return bool(restart())
    except ServerError as error:
        ctx.say(f"  {server.name} would not start again: {error}")
        return False


def skipped(
    service: str, cases: Sequence[str], metrics: Sequence[Metric], server: str, why: str
) -> list[Figure]:
    """Figures that say why a server was not measured."""
    return [
        Figure(service, metric.name, case, server, metric.unit, metric.better, note=why)
        for case in cases
        for metric in metrics
    ]


def elapsed_since(start: float) -> str:
    seconds = time.monotonic() - start
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def python_version() -> str:
    return sys.version.split()[0]


def line_up(
    ctx: Context,
    stack: ExitStack,
    service: str,
    ours_extra: Sequence[str],
    peers: Sequence[tuple[str, Callable[[int], list[str]]]],
    reference: Sequence[str] | None,
    ready: Callable[[int], bool],
    skipped_figures: tuple[Sequence[str], Sequence[Metric]],
    kind: int = socket.SOCK_STREAM,
) -> tuple[list[Server], list[Figure]]:
    """Start sockproto with only ``service`` on, the peers, and the C reference
    (``loadgen serve PORT *reference``; None: the service has none), each
    stopped when ``stack`` closes.

    Returns the servers in that order, and, when the suite does not have the
    service, figures that say so for ``skipped_figures`` (cases, metrics).
    """
    servers: list[Server] = []
    figures: list[Figure] = []
    ours = start_ours(service, ours_extra, ctx.work, ctx.plan.ours_args, ready)
    if ours is None:
        cases, metrics = skipped_figures
        figures += skipped(service, cases, metrics, OURS, "not in the suite yet")
    else:
        stack.callback(ours.stop)
        servers.append(ours)
    commands = list(peers)
    if reference is not None:
        loadgen, serve = str(ctx.loadgen), list(reference)
        commands.append((C_REFERENCE, lambda port: [loadgen, "serve", str(port), *serve]))
    for name, command in commands:
        server = start_peer(name, command, ctx.work, ready, kind)
        stack.callback(server.stop)
        servers.append(server)
    return servers, figures
