"""http: wrk on ``/`` and on a 1 MiB static file, keep-alive, 50 connections."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from bench import wrk
from bench.harness import Context, Metric, interleaved_rounds, line_up
from bench.servers import PYTHON, Server, python_peer, tcp_answers
from bench.stats import Figure

CONNECTIONS = 50
BIG_FILE = "big.bin"
CASES = ("/", f"/files/{BIG_FILE} (1 MiB)")
METRICS = (
    Metric("requests/s", "/s", "higher", "rate"),
    Metric("p50 latency", "ms", "lower", "p50_ms"),
    Metric("p99 latency", "ms", "lower", "p99_ms"),
)
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {www};
        location = / {{
            default_type "text/plain; charset=utf-8";
            return 200 "Hello from nginx (sockproto bench peer)\\n";
        }}
    }}
}}
"""


def make_site(work: Path) -> Path:
    """www/ with index.html (what http.server answers at /) and files/big.bin."""
    www = work / "www"
    (www / "files").mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("Hello from python -m http.server (sockproto bench peer)\n")
    (www / "files" / BIG_FILE).write_bytes(os.urandom(1024 * 1024))
    return www


def nginx_command(work: Path, www: Path) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        prefix = work / f"nginx-{port}"
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, www=www))
        return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]

    return command


def peers(work: Path, www: Path) -> list[tuple[str, Callable[[int], list[str]]]]:
    files = str(www / "files")
    found = [
        ("twisted.web Site", python_peer("http_twisted", files)),
        ("aiohttp", python_peer("http_aiohttp", files)),
        (
            "python -m http.server",
            lambda port: [
                PYTHON,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(www),
                "--protocol",
                "HTTP/1.1",
                str(port),
            ],
        ),
    ]
    if shutil.which("nginx"):
        found.append(("nginx", nginx_command(work, www)))
    return found


def path_of(case: str) -> str:
    return case.split()[0]


def run(ctx: Context) -> list[Figure]:
    figures: list[Figure] = []
    if shutil.which("wrk") is None:
        ctx.note("http: skipped, wrk is not installed (scripts/bench installs it with apt-get)")
        return figures
    if shutil.which("nginx") is None:
        ctx.note("http: nginx is not installed, so the ceiling is missing")
    ctx.setup(
        "http",
        f"`wrk -t1 -c{CONNECTIONS} --latency` (keep-alive) for whole seconds, no warm-up. sockproto runs with"
        " `--http-root DIR --http-max-clients 0` and logs requests to the twistd log as it does by default:"
        " a line each for 50 a second (bursts of 100), the rest summed up every 10 s (`--http-log-rate`);"
        " the twisted.web peer formats an access log line for every request (kept in Twisted's in-memory"
        " log buffer: it starts no log observer); aiohttp, http.server and nginx log nothing. nginx runs"
        " one worker process (`worker_processes 1`), as every other server is one process; http.server"
        " speaks HTTP/1.1 (`--protocol HTTP/1.1`) so that it keeps connections alive.",
    )
    www = make_site(ctx.work)
    with ctx.servers() as stack:
        servers, figures = line_up(
            ctx,
            stack,
            "http",
            ["--http-root", str(www / "files"), "--http-max-clients", "0"],
            peers(ctx.work, www),
            None,
            tcp_answers,
            (list(CASES), METRICS),
        )

        def measure(server: Server, case: str) -> dict[str, float]:
            return wrk.run(f"http://127.0.0.1:{server.port}{path_of(case)}", CONNECTIONS, ctx.plan.duration)

        figures += interleaved_rounds(ctx, "http", CASES, servers, METRICS, measure)
    return figures
