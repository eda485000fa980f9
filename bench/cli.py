"""``python -m bench``: the arguments, the plan they make, and the run."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SERVICES = ("strip", "udp", "http", "chat", "pop3", "memory", "workers")
RESULTS = Path(__file__).resolve().parent / "results"
RAW_NAME = "latest.raw.json"
DEFAULT_DURATION, DEFAULT_ROUNDS = 2.0, 3
QUICK_DURATION, QUICK_ROUNDS = 0.5, 2
# For the estimate printed at the start (and the test that keeps runs within
# their budget): per service, how many (case, server) pairs a round measures,
# the seconds one measurement costs beyond the measured time, and a fixed cost
# (starting servers, writing the Maildir, ncat's slow joins of 1000 clients).
COSTS = {
    "strip": (6 * 5, 0.1, 3.0),
    "udp": (2 * 3, 0.1, 3.0),
    "http": (2 * 5, 0.1, 5.0),  # wrk measures whole seconds: at least 1
    "chat": (6 * 2, 0.7, 5.0),
    "pop3": (2 * 2, 0.5, 5.0),
    "memory": (7, 1.5, 3.0),
    "workers": (3 * 2, 0.1, 8.0),  # 2 strip cases and 1 http case, 2 suites each
}
# Seconds 1000 clients take to join, per round: ncat --chat (its announcements
# grow with the square of the room) plus sockproto.
THOUSAND_JOINS = 22.0


@dataclass(frozen=True)
class Plan:
    services: tuple[str, ...]
    duration: float
    rounds: int
    quick: bool
    out: Path
    note: str
    ours_args: tuple[str, ...]
    memory_connections: int
    render: Path | None = None

    @property
    def warmup(self) -> float:
        """Not measured: lets caches, buffers and the JIT-less interpreters settle."""
        return round(min(0.5, self.duration / 4), 3)


def _services(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SERVICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown service {', '.join(unknown) or '(none)'}; choose from {', '.join(SERVICES)}"
        )
    return names


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark every sockproto service against its peers, in one run on this machine,"
        " and write RESULTS.md and chart.png.",
    )
    p.add_argument("--quick", action="store_true", help="short rounds for a look (about 2 minutes)")
    p.add_argument(
        "--duration", type=_positive(float), help="seconds measured per round (default 2, quick 0.5)"
    )
    p.add_argument("--rounds", type=_positive(int), help="rounds per figure (default 3, quick 2)")
    p.add_argument("--only", type=_services, help=f"comma-separated services to run ({','.join(SERVICES)})")
    p.add_argument("--skip", type=_services, default=(), help="comma-separated services to leave out")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for RESULTS.md and chart.png")
    p.add_argument(
        "--note", default="", help="a line shown at the top of RESULTS.md (e.g. the machine's state)"
    )
    p.add_argument(
        "--ours-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `twistd sockproto` (repeatable), e.g. --ours-arg=--workers --ours-arg=2",
    )
    p.add_argument(
        "--memory-connections",
        type=_positive(int),
        default=5000,
        help="idle connections opened for the memory figures (default 5000)",
    )
    p.add_argument("--render", type=Path, metavar="RAW_JSON", help="only re-render RESULTS.md and chart.png")
    return p


def parse(argv: Sequence[str]) -> Plan:
    args = parser().parse_args(argv)
    services = tuple(s for s in (args.only or SERVICES) if s not in args.skip)
    if not services and args.render is None:
        parser().error("--only/--skip leave nothing to run")
    return Plan(
        services=services,
        duration=args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION),
        rounds=args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
        quick=args.quick,
        out=args.out,
        note=args.note,
        ours_args=tuple(args.ours_arg),
        memory_connections=args.memory_connections,
        render=args.render,
    )


def estimate_seconds(plan: Plan) -> float:
    """Roughly how long the plan takes, to say so before starting."""
    total = 0.0
    for service in plan.services:
        pairs, overhead, fixed = COSTS[service]
        if service == "chat" and plan.quick:
            pairs = pairs * 2 // 3  # no 1000 clients
        measured = plan.duration + plan.warmup
        if service == "http":
            measured = max(1, round(plan.duration))
        elif service in ("pop3", "memory"):
            measured = 0
        total += fixed + pairs * plan.rounds * (measured + overhead)
        if service == "chat" and not plan.quick:
            total += 2 * plan.rounds * THOUSAND_JOINS
    return total


def raise_open_files_limit() -> None:
    """Thousands of connections need thousands of descriptors, here and in the servers we start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model or 'unknown CPU'}), Linux {os.uname().release}"


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def versions() -> str:
    parts = [f"Python {sys.version.split()[0]}"]
    for module in ("twisted", "uvloop", "aiohttp"):
        try:
            parts.append(f"{module} {importlib.import_module(module).__version__}")
        except ImportError:
            continue
    for label, command in (
        ("nginx", ("nginx", "-v")),
        ("ncat", ("ncat", "--version")),
        ("Dovecot", ("dovecot", "--version")),
        ("wrk", ("wrk", "--version")),
    ):
        text = _run(*command)
        words = [w for w in text.replace("/", " ").split() if w[:1].isdigit()]
        if words:
            parts.append(f"{label} {words[0]}")
    return ", ".join(parts)


def commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    head = _run("git", "-C", str(repo), "rev-parse", "--short", "HEAD") or "unknown"
    dirty = _run("git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no")
    return f"{head}{' with uncommitted changes' if dirty else ''}"


def write_results(figures: list, meta: dict, out: Path) -> None:
    from bench.chart import render_chart
    from bench.report import render_markdown

    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text(render_markdown(figures, meta))
    title = "sockproto vs peers: x better than each peer (log scale, 1.0 = even)"
    if meta.get("note"):
        title += f"\n{meta['note']}"
    if not render_chart(figures, out / "chart.png", title):
        print("bench: nothing to chart", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse(sys.argv[1:] if argv is None else argv)
    from bench.stats import Figure

    if plan.render is not None:
        raw = json.loads(plan.render.read_text())
        write_results([Figure.from_json(f) for f in raw["figures"]], raw["meta"], plan.out)
        print(f"bench: wrote {plan.out / 'RESULTS.md'} and {plan.out / 'chart.png'}")
        return 0

    from bench.harness import Context, compile_loadgen, elapsed_since
    from bench.servers import pin_cores

    raise_open_files_limit()
    pinning = pin_cores()
    started = time.monotonic()
    minutes = estimate_seconds(plan) / 60
    print(
        f"bench: {', '.join(plan.services)}; {plan.rounds} rounds of {plan.duration} s;"
        f" about {minutes:.0f} min (load average now {load_average()})",
        flush=True,
    )
    meta = {
        "note": plan.note,
        "command": " ".join(["scripts/bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "machine": machine(),
        "load_start": load_average(),
        "versions": versions(),
        "rounds": plan.rounds,
        "duration": plan.duration,
        "warmup": plan.warmup,
        "quick": plan.quick,
        "pinning": pinning,
    }
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="sockproto-bench-") as work:
        workdir = Path(work)
        os.chmod(workdir, 0o755)  # Dovecot's and nginx's unprivileged processes read below it
        ctx = Context(plan, workdir, compile_loadgen(workdir))
        for service in plan.services:
            print(f"bench: {service}", flush=True)
            module = importlib.import_module(f"bench.scenarios.{service}")
            service_started = time.monotonic()
            try:
                figures += module.run(ctx)
                print(f"bench: {service} took {elapsed_since(service_started)}", flush=True)
            except KeyboardInterrupt:
                print("bench: interrupted; writing what was measured", flush=True)
                ctx.notes.append(f"interrupted during {service}")
                break
            except Exception as error:  # one broken scenario must not cost the others' figures
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                print(f"bench: {service} failed: {error}", flush=True)
                ctx.notes.append(f"{service}: not measured, the scenario failed: {first}")
    meta.update(load_end=load_average(), elapsed=elapsed_since(started), notes=ctx.notes, setups=ctx.setups)
    plan.out.mkdir(parents=True, exist_ok=True)
    raw = {"meta": meta, "figures": [f.to_json() for f in figures]}
    (plan.out / RAW_NAME).write_text(json.dumps(raw, indent=1))
    write_results(figures, meta, plan.out)
    print(f"bench: done in {meta['elapsed']}; wrote {plan.out / 'RESULTS.md'} and {plan.out / 'chart.png'}")
    return 0
