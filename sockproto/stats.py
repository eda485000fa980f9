"""One stats object for the whole suite: services write it, /status and /metrics read it.

With ``--workers N`` each process counts its own connections; the others'
counts arrive as plain dicts (:meth:`ServiceStats.counts`) and
:meth:`Stats.combined` adds them up, so /status and /metrics show the whole
suite whichever process answers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sockproto import __version__


class ServiceStats:
    """Counters of one service. Plain attributes: the hot paths just add to them."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "counters",
        "current",
        "handled",
        "limits",
        "listening",
        "name",
        "total",
        "unit",
    )

    def __init__(self, name: str, unit: str) -> None:
        self.name = name
        self.unit = unit  # what 'handled' counts: lines, requests, datagrams, commands
        self.listening: list[str] = []
        self.current = 0  # connections open now
        self.total = 0  # connections (or datagrams) ever
        self.handled = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.limits: Counter[str] = Counter()  # limit name -> times it was hit
        self.counters: Counter[str] = Counter()  # service-specific counters

    def limit_hit(self, name: str) -> None:
        self.limits[name] += 1

    def counts(self) -> dict[str, Any]:
        """Everything counted, as plain data (JSON), for another process to add up."""
        return {
            "unit": self.unit,
            "listening": list(self.listening),
            "current": self.current,
            "total": self.total,
            "handled": self.handled,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "limits": dict(self.limits),
            "counters": dict(self.counters),
        }

    def add(self, counts: dict[str, Any]) -> None:
        """Add another process's :meth:`counts` to these."""
        for address in counts.get("listening", ()):
            if address not in self.listening:
                self.listening.append(address)
        self.current += counts.get("current", 0)
        self.total += counts.get("total", 0)
        self.handled += counts.get("handled", 0)
        self.bytes_in += counts.get("bytes_in", 0)
        self.bytes_out += counts.get("bytes_out", 0)
        self.limits.update(counts.get("limits", {}))
        self.counters.update(counts.get("counters", {}))

    def snapshot(self) -> dict[str, Any]:
        return {
            "listening": list(self.listening),
            "connections": {"current": self.current, "total": self.total},
            self.unit: self.handled,
            "bytes": {"in": self.bytes_in, "out": self.bytes_out},
            "limits_hit": dict(self.limits),
            **({"counters": dict(self.counters)} if self.counters else {}),
        }


class Stats:
    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self.started = now()
        self.services: dict[str, ServiceStats] = {}
        # The other processes' counts: process name -> service -> counts().
        self.others: dict[str, dict[str, dict[str, Any]]] = {}
        # With workers: one entry per process (name, pid, ...) for /status.
        self.processes: list[dict[str, Any]] = []

    def service(self, name: str, unit: str = "handled") -> ServiceStats:
        if name not in self.services:
            self.services[name] = ServiceStats(name, unit)
        return self.services[name]

    def uptime(self) -> float:
        return self._now() - self.started

    def local_counts(self) -> dict[str, dict[str, Any]]:
        return {name: service.counts() for name, service in self.services.items()}

    def combined(self) -> dict[str, ServiceStats]:
        """Each service's counts in this process plus those of the others."""
        if not self.others:
            return self.services
        total: dict[str, ServiceStats] = {}
        for counts in [self.local_counts(), *self.others.values()]:
            for name, service_counts in counts.items():
                if name not in total:
                    total[name] = ServiceStats(name, service_counts.get("unit", "handled"))
                total[name].add(service_counts)
        return total

    def snapshot(self) -> dict[str, Any]:
        shown = {
            "version": __version__,
            "uptime_seconds": round(self.uptime(), 3),
            "services": {name: s.snapshot() for name, s in self.combined().items()},
        }
        if self.processes:
            shown["processes"] = self.processes
        return shown
