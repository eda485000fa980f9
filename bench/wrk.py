"""Running wrk and reading its report."""

from __future__ import annotations

import re
import subprocess

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse(report: str) -> dict[str, float]:
    """``rate`` (requests/s), ``p50_ms``, ``p99_ms`` and ``errors`` from ``wrk --latency``."""
    rate = _RATE.search(report)
    if rate is None:
        raise RuntimeError(f"wrk gave no Requests/sec: {report.strip()[-200:]!r}")
    out = {"rate": float(rate.group(1))}
    for percent, value, unit in _PERCENTILE.findall(report):
        out[f"p{percent}_ms"] = float(value) * _TIME_UNITS[unit]
    errors = (
        sum(int(n) for n in _SOCKET_ERRORS.search(report).groups()) if _SOCKET_ERRORS.search(report) else 0
    )
    non_2xx = _NON_2XX.search(report)
    out["errors"] = float(errors + (int(non_2xx.group(1)) if non_2xx else 0))
    return out


def run(url: str, connections: int, seconds: float, threads: int = 1) -> dict[str, float]:
    """wrk measures whole seconds: at least one."""
    duration = max(1, round(seconds))
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "--latency",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {(done.stderr or done.stdout).strip()[-200:]}")
    return parse(done.stdout)
