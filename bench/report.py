"""RESULTS.md from the figures: tables of ratios, the targets, the generator check.

Pure (figures and metadata in, Markdown out), so the rendering is tested.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import OURS, Figure, Summary, figure_table, find, ratio

# The peer whose figures show how fast the load generator can go.
C_REFERENCE = "C server (generator check)"
# The suite in one process, against which --workers 2 is measured.
ONE_PROCESS = "sockproto --workers 1"
# The metric of each service that the chart shows and the generator check uses.
MAIN_METRIC = {
    "strip": "round trips/s",
    "udp": "answers/s",
    "http": "requests/s",
    "chat": "deliveries/s",
    "pop3": "time",
    "memory": "RSS per idle connection",
    "workers": "throughput",
}
SERVICE_TITLES = {
    "strip": "strip: line round trips",
    "udp": "udp: daytime answers",
    "http": "http: wrk, keep-alive, 50 connections",
    "chat": "chat: one room",
    "pop3": "pop3: one mailbox on the same Maildir",
    "memory": "memory: idle connections",
    "workers": "workers: 2 processes against 1 (`--workers 2`)",
}


def format_value(value: float, unit: str) -> str:
    """Three significant figures, with k/M for rates: ``45.1k/s``, ``0.123 ms``."""
    if not math.isfinite(value):
        return "n/a"
    if unit.endswith("/s") and unit != "MB/s":
        for scale, suffix in ((1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{_sig(value / scale)}{suffix}{unit}"
        return f"{_sig(value)}{unit}"
    if unit == "ms" and abs(value) < 1:
        return f"{_sig(value * 1000)} µs"
    if unit == "s" and abs(value) < 1:
        return f"{_sig(value * 1000)} ms"
    return f"{_sig(value)} {unit}"


def _sig(value: float) -> str:
    if value == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def format_summary(summary: Summary, unit: str) -> str:
    text = format_value(summary.median, unit)
    if summary.rounds > 1:
        text += f" ±{summary.spread * 100:.0f}%"
    return text


def format_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "∞x"
    return f"{value:.2f}x"


def cell(figure: Figure | None, ours: Figure | None) -> str:
    """Ours: the value. A peer: the ratio (bold), then its value."""
    if figure is None:
        return ""
    summary = figure.summary()
    if summary is None:
        return figure.note or "no value"
    text = format_summary(summary, figure.unit)
    if figure.server != OURS:
        ours_summary = ours.summary() if ours is not None else None
        if ours_summary is not None:
            text = f"**{format_ratio(ratio(ours_summary, summary, figure.better))}** ({text})"
    if figure.note:
        text += f" ({figure.note})"
    return text


def servers_in_order(cases: dict[str, dict[str, Figure]]) -> list[str]:
    servers: list[str] = []
    for by_server in cases.values():
        for server in by_server:
            if server not in servers:
                servers.append(server)
    if OURS in servers:
        servers.remove(OURS)
        servers.insert(0, OURS)
    return servers


def render_table(metric: str, better: str, cases: dict[str, dict[str, Figure]]) -> list[str]:
    servers = servers_in_order(cases)
    lines = [
        f"**{metric}** ({better} is better)",
        "",
        "| case | " + " | ".join(servers) + " |",
        "|---|" + "---|" * len(servers),
    ]
    for case, by_server in cases.items():
        ours = by_server.get(OURS)
        row = [cell(by_server.get(server), ours) for server in servers]
        lines.append(f"| {case} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


@dataclass(frozen=True)
class Target:
    """One target of issue 8, checked against the figures."""

    text: str
    check: Callable[[Sequence[Figure]], tuple[str, bool | None]]


def _ratio_of(figures: Sequence[Figure], service: str, metric: str, case: str, peer: str) -> float | None:
    ours, other = (find(figures, service, metric, case, name) for name in (OURS, peer))
    if ours is None or other is None:
        return None
    return ratio(ours.summary(), other.summary(), ours.better)


def _worst_ratio(service: str, metric: str, peer: str, at_least: float, cases: Sequence[str] | None = None):
    def check(figures: Sequence[Figure]) -> tuple[str, bool | None]:
        pairs = []
        for case, by_server in figure_table(figures).get((service, metric), {}).items():
            if cases is not None and case not in cases:
                continue
            if OURS in by_server and peer in by_server:
                value = _ratio_of(figures, service, metric, case, peer)
                if value is not None:
                    pairs.append((value, case))
        if not pairs:
            return "not measured", None
        worst, case = min(pairs)
        return f"{format_ratio(worst)} (worst case: {case})", worst >= at_least

    return check


def _chat_non_reader(figures: Sequence[Figure]) -> tuple[str, bool | None]:
    pairs = []
    for case, by_server in figure_table(figures).get(("chat", "deliveries/s"), {}).items():
        if case.endswith("+ non-reader") or OURS not in by_server:
            continue
        alone = by_server[OURS].summary()
        other = find(figures, "chat", "deliveries/s", f"{case} + non-reader", OURS)
        with_silent = other.summary() if other is not None else None
        if alone is not None and with_silent is not None and alone.median > 0:
            pairs.append((with_silent.median / alone.median, case))
    if not pairs:
        return "not measured", None
    worst, case = min(pairs)
    return f"{worst:.2f} of the rate without it (worst: {case})", worst >= 0.9


TARGETS = (
    Target(
        "strip at least as fast as the Twisted LineReceiver peer (>= 1.0x)",
        _worst_ratio("strip", "round trips/s", "Twisted LineReceiver", 1.0),
    ),
    Target(
        "chat ahead of `ncat --chat` at 100 clients (> 1.0x)",
        _worst_ratio("chat", "deliveries/s", "ncat --chat", 1.0 + 1e-9, cases=("100 clients",)),
    ),
    Target("chat unaffected by a non-reader (within 10%)", _chat_non_reader),
    Target(
        "http `/` at least as fast as the minimal twisted.web peer (>= 1.0x)",
        _worst_ratio("http", "requests/s", "twisted.web Site", 1.0, cases=("/",)),
    ),
    Target(
        "strip and HTTP faster with `--workers 2` than with one process on this 2-core machine (> 1.0x)",
        _worst_ratio("workers", "throughput", ONE_PROCESS, 1.0 + 1e-9),
    ),
    Target(
        "POP3 login+LIST of 1000 messages within 2x of Dovecot (>= 0.5x)",
        _worst_ratio("pop3", "time", "Dovecot pop3d", 0.5, cases=("login + LIST, 1000 messages",)),
    ),
    Target(
        "POP3 RETR of a 100 MB message within 2x of Dovecot (>= 0.5x)",
        _worst_ratio("pop3", "time", "Dovecot pop3d", 0.5, cases=("RETR 100 MB message",)),
    ),
)


def render_targets(figures: Sequence[Figure]) -> list[str]:
    lines = ["## Targets (issue 8)", "", "| target | measured | verdict |", "|---|---|---|"]
    for target in TARGETS:
        measured, met = target.check(figures)
        verdict = {True: "met", False: "**not met**", None: "not measured"}[met]
        lines.append(f"| {target.text} | {measured} | {verdict} |")
    lines.append("")
    return lines


def generator_checks(figures: Sequence[Figure]) -> list[str]:
    """Sentences showing the generator was faster against a faster server than ours."""
    checks = []
    for service, reference, tool in (
        ("strip", C_REFERENCE, "the C load generator"),
        ("udp", C_REFERENCE, "the C load generator"),
        ("chat", C_REFERENCE, "the C load generator"),
        ("http", "nginx", "wrk"),
    ):
        metric = MAIN_METRIC[service]
        for case, by_server in figure_table(figures).get((service, metric), {}).items():
            ours = by_server.get(OURS)
            ours_summary = ours.summary() if ours is not None else None
            if ours_summary is None:
                continue
            fast = by_server.get(reference)
            best = fast.summary() if fast is not None else None
            if best is None:
                continue
            unit = ours.unit
            margin = best.median / ours_summary.median if ours_summary.median > 0 else math.inf
            verdict = "not the bottleneck" if margin > 1.05 else "**may have been the bottleneck**"
            checks.append(
                f"- {service}, {case}: {tool} reached {format_value(best.median, unit)} against"
                f" {reference}, {margin:.1f}x what it got from sockproto"
                f" ({format_value(ours_summary.median, unit)}): {verdict}."
            )
    return checks


def render_markdown(figures: Sequence[Figure], meta: dict[str, Any]) -> str:
    lines = ["# sockproto benchmark results", ""]
    if meta.get("note"):
        lines += [f"> **{meta['note']}**", ""]
    lines += [
        f"Made by `{meta.get('command', 'scripts/bench')}` on {meta.get('date', '?')},"
        f" commit {meta.get('commit', '?')}, in {meta.get('elapsed', '?')}.",
        "",
        f"Machine: {meta.get('machine', '?')}; load average {meta.get('load_start', '?')} at the start,"
        f" {meta.get('load_end', '?')} at the end.",
        "",
        f"Software: {meta.get('versions', '?')}.",
        "",
        *([f"Cores: {meta['pinning']}.", ""] if meta.get("pinning") else []),
        f"Each figure is the median of {meta.get('rounds', '?')} rounds of {meta.get('duration', '?')} s"
        f" (after a {meta.get('warmup', '?')} s warm-up), ± half the range of the rounds; in each round the"
        " servers take turns, in a rotating order. A peer's cell starts with the **ratio**: how many times"
        " better sockproto did (above 1.0, sockproto is ahead; throughput is ours ÷ peer, latency, time"
        " and memory are peer ÷ ours). Absolute numbers depend on the machine; the ratios travel better.",
        "",
    ]
    lines += render_targets(figures)
    table = figure_table(figures)
    services = []
    for service, _ in table:
        if service not in services:
            services.append(service)
    for service in services:
        lines += [f"## {SERVICE_TITLES.get(service, service)}", ""]
        for line in meta.get("setups", {}).get(service, []):
            lines.append(f"- {line}")
        if meta.get("setups", {}).get(service):
            lines.append("")
        for (svc, metric), cases in table.items():
            if svc == service:
                any_figure = next(iter(next(iter(cases.values())).values()))
                lines += render_table(metric, any_figure.better, cases)
    checks = generator_checks(figures)
    lines += ["## Is the load generator the bottleneck?", ""]
    lines += checks or ["- No figures to check."]
    lines.append("")
    notes = meta.get("notes") or []
    if notes:
        lines += ["## Notes from this run", ""]
        lines += [f"- {note}" for note in notes]
        lines.append("")
    return "\n".join(lines)
