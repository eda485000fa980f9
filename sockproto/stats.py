"""One stats object for the whole suite: services write it, /status and /metrics read it."""

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

    def service(self, name: str, unit: str = "handled") -> ServiceStats:
        if name not in self.services:
            self.services[name] = ServiceStats(name, unit)
        return self.services[name]

    def uptime(self) -> float:
        return self._now() - self.started

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "uptime_seconds": round(self.uptime(), 3),
            "services": {name: s.snapshot() for name, s in self.services.items()},
        }
