"""POP3 RETR of one big message: throughput and the server's memory.

    .venv/bin/python bench/pop3_retr.py [MEGABYTES] [--stls]

Starts the real suite on a loopback port (no --auth), delivers one message of
80-octet lines that all start with a dot (the worst case for dot-stuffing),
retrieves it once over a raw socket and prints the time taken and the
server's resident memory before and at its peak.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sockproto.maildir import Maildir
from tests.support import ALL_OFF, Suite, recv_until
from tests.test_pop3_e2e import make_certificate


def main() -> None:
    megabytes = int(next((a for a in sys.argv[1:] if a.isdigit()), "50"))
    use_tls = "--stls" in sys.argv
    folder = Path(tempfile.mkdtemp(prefix="sockproto-bench-"))
    try:
        run(folder, megabytes, use_tls)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(folder: Path, megabytes: int, use_tls: bool) -> None:
    line = b"." + b"x" * 77 + b"\n"
    count = megabytes * 1024 * 1024 // len(line)
    message = folder / "big.eml"
    with open(message, "wb") as out:
        out.write(b"Subject: big\n\n")
        for _ in range(count // 1000):
            out.write(line * 1000)
    with open(message, "rb") as source:
        Maildir(folder / "mail" / "bench").deliver(source)
    args = [*ALL_OFF, "--pop3-port", "0", "--maildir", str(folder / "mail")]
    if use_tls:
        cert, key = make_certificate(folder / "tls")
        args += ["--tls-cert", cert, "--tls-key", key]
    with Suite(args, cwd=str(folder)) as suite:
        sock: socket.socket = suite.connect("pop3")
        recv_until(sock, lambda d: d.endswith(b"\r\n"))
        if use_tls:
            sock.sendall(b"STLS\r\n")
            recv_until(sock, lambda d: d.endswith(b"\r\n"))
            sock = ssl.create_default_context(cafile=cert).wrap_socket(sock, server_hostname="localhost")
        sock.sendall(b"USER bench\r\nPASS x\r\n")
        recv_until(sock, lambda d: b"maildrop" in d)
        before = peak = suite.rss_kib()
        started = time.perf_counter()
        sock.sendall(b"RETR 1\r\n")
        received, tail = 0, b""
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise SystemExit("connection closed early")
            received += len(chunk)
            tail = (tail + chunk)[-5:]
            if received % (4 << 20) < len(chunk):
                peak = max(peak, suite.rss_kib())
        elapsed = time.perf_counter() - started
        peak = max(peak, suite.rss_kib())
        sock.close()
    print(
        f"RETR {received / 2**20:.1f} MiB{' over STLS' if use_tls else ''} in {elapsed:.2f} s "
        f"({received / 2**20 / elapsed:.0f} MiB/s); server RSS {before / 1024:.1f} MiB before, "
        f"peak {peak / 1024:.1f} MiB (+{(peak - before) / 1024:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
