"""Figures, their summaries across rounds, and ratios to the peers.

Pure: no I/O, so the arithmetic behind every number in RESULTS.md is tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Better = Literal["higher", "lower"]
OURS = "sockproto"


@dataclass
class Figure:
    """One figure of one server in one case, with a value per round.

    ``note`` says why there are no values (skipped, failed) or what to know
    about them (errors seen); a figure without values is rendered as its note.
    """

    service: str
    metric: str
    case: str
    server: str
    unit: str
    better: Better
    values: list[float] = field(default_factory=list)
    note: str = ""

    def summary(self) -> Summary | None:
        return summarize(self.values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        return cls(**data)


@dataclass(frozen=True)
class Summary:
    """The median of the rounds and their range (min and max)."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def spread(self) -> float:
        """Half the range as a fraction of the median: 0.03 reads as ±3%."""
        if self.median == 0:
            return 0.0
        return (self.high - self.low) / 2 / abs(self.median)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def summarize(values: Iterable[float]) -> Summary | None:
    """None when no round gave a (finite) value."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return Summary(median(finite), min(finite), max(finite), len(finite))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (what the C load generator reports too)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


def ratio(ours: Summary | None, peer: Summary | None, better: Better) -> float | None:
    """How many times better ours is than the peer: > 1.0 means ours wins.

    Throughput: ours / peer. Latency, time, memory: peer / ours.
    """
    if ours is None or peer is None:
        return None
    top, bottom = (ours.median, peer.median) if better == "higher" else (peer.median, ours.median)
    if bottom <= 0:
        return math.inf if top > 0 else None  # e.g. the peer stalled and delivered nothing
    return top / bottom


def figure_table(figures: Iterable[Figure]) -> dict[tuple[str, str], dict[str, dict[str, Figure]]]:
    """(service, metric) -> case -> server -> figure, in first-seen order."""
    table: dict[tuple[str, str], dict[str, dict[str, Figure]]] = {}
    for figure in figures:
        table.setdefault((figure.service, figure.metric), {}).setdefault(figure.case, {})[figure.server] = (
            figure
        )
    return table


def find(figures: Iterable[Figure], service: str, metric: str, case: str, server: str) -> Figure | None:
    for figure in figures:
        if (figure.service, figure.metric, figure.case, figure.server) == (service, metric, case, server):
            return figure
    return None
