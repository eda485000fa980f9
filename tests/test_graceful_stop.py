"""Signals, end to end. SIGTERM stops the suite gracefully: every service
stops accepting, chat clients are told, an HTTP response or a POP3 RETR under
way is finished, all within --shutdown-grace, and the process exits 0. SIGHUP
(logrotate's) reopens the log files and stops nothing."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import socket
import time
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import FileLogObserver, Logger, formatEvent, globalLogPublisher
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from sockproto import config
from sockproto.maildir import Maildir
from sockproto.service import make_service, reopen_log_file
from tests.support import ALL_OFF, LISTENING, Suite, recv_all, recv_until, temp_dir, wait_for

DOWNLOAD = 10 * 1024 * 1024  # the largest /bytes
# About 20 MB on the wire, with dot-led lines to stuff.
BIG_MESSAGE = b"Subject: big\n\n" + b".a line of some length that is led by a dot\n" * 450_000


def http_get(suite: Suite, target: str) -> bytes:
    with suite.connect("http") as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return recv_all(sock)


def http_requests(suite: Suite) -> int:
    """The HTTP request counter, through /status (this request counts too)."""
    return int(json.loads(body_of(http_get(suite, "/status"))[1])["services"]["http"]["requests"])


def body_of(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def start_everything(test: SynchronousTestCase, *extra: str) -> tuple[Suite, Path]:
    folder = Path(temp_dir(test))
    Maildir(folder / "mail" / "alice").deliver(io.BytesIO(BIG_MESSAGE))
    Maildir(folder / "mail" / "alice").deliver(io.BytesIO(b"Subject: small\n\nhi\n"))
    ports = ["--port", "0", "--chat-port", "0", "--udp-port", "0", "--http-port", "0", "--pop3-port", "0"]
    suite = Suite([*ports, "--maildir", str(folder / "mail"), *extra], cwd=str(folder)).start()
    test.addCleanup(suite.stop)
    return suite, folder


def pop3_retr_started(test: SynchronousTestCase, suite: Suite) -> tuple[socket.socket, bytes, int]:
    """A POP3 session with a DELE mark whose RETR of the big message is
    streaming: its first bytes are in. Returns the big message's size too."""
    sock = suite.connect("pop3")
    test.addCleanup(sock.close)
    recv_until(sock, lambda d: d.endswith(b"\r\n"))
    sock.sendall(b"USER alice\r\nPASS any\r\nLIST\r\n")
    answers = recv_until(sock, lambda d: d.endswith(b"\r\n.\r\n"))
    sizes = {int(size): number for number, size in (line.split() for line in answers.split(b"\r\n")[3:-2])}
    big, small = max(sizes), min(sizes)
    sock.sendall(b"DELE %s\r\nRETR %s\r\n" % (sizes[small], sizes[big]))
    first = recv_until(sock, lambda d: len(d) > 64 * 1024)
    return sock, first.split(b"\r\n", 2)[2], big  # after +OK to DELE and to RETR


class GracefulStopTests(SynchronousTestCase):
    def test_sigterm_finishes_work_in_progress_then_exits_0(self) -> None:
        # A grace no loaded machine uses up: this test is about what is
        # finished, the next one about the bound.
        suite, folder = start_everything(self, "--shutdown-grace", "60")
        chat = suite.connect("chat")
        self.addCleanup(chat.close)
        recv_until(chat, lambda d: d.endswith(b"\n"))  # the welcome
        strip = suite.connect("strip")
        self.addCleanup(strip.close)
        # A download the client reads slowly: 64 KiB now, the rest after SIGTERM.
        download = suite.connect("http")
        self.addCleanup(download.close)
        download.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % DOWNLOAD)
        download_start = recv_until(download, lambda d: len(d) > 64 * 1024)
        retr, retr_start, size = pop3_retr_started(self, suite)
        # Last, so it is surely under way at SIGTERM: an answer that takes 2 s.
        # Wait until the server has taken it (its request counter counts it).
        delayed = suite.connect("http")
        self.addCleanup(delayed.close)
        polls = itertools.count(http_requests(suite) + 1)  # each poll is a request too
        delayed.sendall(b"GET /delay/2 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: http_requests(suite) > next(polls), what="the /delay request taken")

        suite.send_signal(15)
        for service in ("strip", "chat", "http", "pop3"):
            # Each service closes its port before it tells its connections;
            # the services stop one after another, so wait for this one's.
            suite.wait_log(f"{service}: closing ")
            with self.assertRaises(ConnectionRefusedError, msg=service):
                socket.create_connection(suite.address(service), timeout=5).close()

        self.assertEqual(recv_all(chat), b"*** server shutting down\r\n")
        self.assertEqual(recv_all(strip), b"")
        head, body = body_of(recv_all(delayed))
        self.assertIn(b"HTTP/1.1 200 ", head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertEqual(json.loads(body)["path"], "/delay/2")
        head, body = body_of(download_start + recv_all(download))
        self.assertIn(b"HTTP/1.1 200 ", head)
        self.assertEqual(len(body), DOWNLOAD)
        rest = recv_all(retr)
        self.assertTrue(rest.endswith(b"\r\n.\r\n-ERR [SYS/TEMP] server shutting down\r\n"), rest[-200:])
        message = (retr_start + rest).rsplit(b"\r\n.\r\n", 1)[0] + b"\r\n"
        self.assertEqual(len(message.replace(b"\r\n..", b"\r\n.")), size)

        self.assertEqual(suite.stop(), 0)
        self.assertFalse(suite.saw("Traceback"), suite.output)
        self.assertFalse(suite.saw("cutting them"), suite.output)  # all done within the grace
        for service in ("strip", "chat", "udp", "http", "pop3"):
            self.assertTrue(suite.saw(f"{service} stopped"), service)
        # The session ended without QUIT: its DELE was not applied.
        self.assertEqual(len(list((folder / "mail" / "alice" / "new").iterdir())), 2)

    def test_the_grace_bounds_the_stop(self) -> None:
        """Clients that never read cannot hold the stop up past --shutdown-grace."""
        suite, _ = start_everything(self, "--shutdown-grace", "1")
        download = suite.connect("http")
        self.addCleanup(download.close)
        download.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % DOWNLOAD)
        recv_until(download, lambda d: len(d) > 1024)
        pop3_retr_started(self, suite)
        started = time.monotonic()
        self.assertEqual(suite.stop(), 0)
        self.assertLess(time.monotonic() - started, 8)
        self.assertTrue(suite.saw("http: 1 connection(s) still open after 1 s; cutting them"), suite.output)
        self.assertTrue(suite.saw("pop3: 1 connection(s) still open after 1 s; cutting them"), suite.output)
        self.assertFalse(suite.saw("Traceback"), suite.output)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


class SighupTests(SynchronousTestCase):
    def test_reopen_by_name_or_keep_the_old_file(self) -> None:
        folder = Path(temp_dir(self)) / "logs"
        folder.mkdir()
        log_file = LogFile("access.log", str(folder))
        self.addCleanup(log_file.close)
        log_file.write("one\n")
        os.rename(folder / "access.log", folder / "access.log.1")
        self.assertIsNone(reopen_log_file(log_file))
        log_file.write("two\n")
        self.assertEqual(read(folder / "access.log"), "two\n")
        self.assertEqual(read(folder / "access.log.1"), "one\n")
        # A file it could not open again: the old one stays open, and in use.
        os.rename(folder, folder.with_name("moved"))
        self.assertEqual(reopen_log_file(log_file), f"{folder / 'access.log'}: cannot write to {folder}")
        log_file.write("three\n")
        self.assertEqual(read(folder.with_name("moved") / "access.log"), "two\nthree\n")

    def test_reopen_the_twistd_log_behind_the_log_filter(self) -> None:
        """The --log-rate filter takes twistd's file observer out of the global
        publisher's list to wrap it: the file is found before, and reopened."""
        folder = Path(temp_dir(self))
        log_file = LogFile("twistd.log", str(folder))
        self.addCleanup(log_file.close)
        observer = FileLogObserver(log_file, lambda event: formatEvent(event) + "\n")  # as twistd's
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        settings = config.build({(name, "port"): ("off", "test") for name in config.SERVICES})
        suite = make_service(settings, reactor=Clock())
        suite._before_listening()  # as privilegedStartService does: the filter goes in
        self.addCleanup(suite._unfilter_the_log)
        Logger(namespace="sockproto").info("before")
        os.rename(folder / "twistd.log", folder / "twistd.log.1")
        suite.reopen_log_files()
        Logger(namespace="sockproto").info("after")
        log_file.flush()
        self.assertEqual(
            read(folder / "twistd.log").splitlines(),
            [f"SIGHUP: log files reopened: {folder / 'twistd.log'}", "after"],
        )
        self.assertEqual(read(folder / "twistd.log.1").splitlines(), ["before"])

    def test_sighup_reopens_the_log_files_and_keeps_serving(self) -> None:
        """What logrotate does: move the files, send SIGHUP; the lines go on in
        new files of the same names, and a response under way is sent whole."""
        folder = Path(temp_dir(self))
        twistd_log, access_log = folder / "twistd.log", folder / "access.log"
        suite = Suite(
            [*ALL_OFF, "--http-port", "0", "--http-access-log", str(access_log)],
            cwd=str(folder),
            twistd_args=["-l", str(twistd_log)],
        ).start(ready=False)
        self.addCleanup(suite.stop)
        wait_for(
            lambda: "sockproto ready" in read(twistd_log) or suite.process.poll() is not None, what="ready"
        )
        self.assertIn("sockproto ready", read(twistd_log), suite.output)
        address = LISTENING.search(read(twistd_log)).group(2)  # tcp:127.0.0.1:PORT
        host, port = address.split(":", 1)[1].rsplit(":", 1)

        def get(target: str) -> bytes:
            with socket.create_connection((host, int(port)), timeout=20) as sock:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                return recv_all(sock)

        self.assertIn(b" 200 ", get("/anything?before"))
        wait_for(lambda: "?before" in read(access_log), what="the first access log line")
        # A download the client reads slowly: its first 64 KiB now, the rest after SIGHUP.
        download = socket.create_connection((host, int(port)), timeout=20)
        self.addCleanup(download.close)
        download.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % DOWNLOAD)
        download_start = recv_until(download, lambda d: len(d) > 64 * 1024)

        os.rename(twistd_log, folder / "twistd.log.1")
        os.rename(access_log, folder / "access.log.1")
        suite.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "SIGHUP: log files reopened" in read(twistd_log) or suite.process.poll() is not None,
            what="the reopened twistd log",
        )
        self.assertIsNone(suite.process.poll(), read(folder / "twistd.log.1"))
        self.assertIn(f"SIGHUP: log files reopened: {twistd_log}, {access_log}", read(twistd_log))

        self.assertIn(b" 200 ", get("/anything?after"))
        head, body = body_of(download_start + recv_all(download))
        self.assertIn(b"HTTP/1.1 200 ", head)
        self.assertEqual(len(body), DOWNLOAD)
        wait_for(lambda: "?after" in read(access_log), what="the new access log line")
        wait_for(lambda: "/bytes/" in read(access_log), what="the download's line, logged once it ended")
        self.assertIn("?before", read(folder / "access.log.1"))
        self.assertNotIn("?after", read(folder / "access.log.1"))
        self.assertNotIn("SIGHUP", read(folder / "twistd.log.1"))

        self.assertEqual(suite.stop(), 0)
        self.assertIn("http stopped", read(twistd_log))
        for path in folder.iterdir():
            self.assertNotIn("Traceback", read(path), path)
