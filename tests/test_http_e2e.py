"""The HTTP responder under the real twistd plugin: http.client, curl and raw sockets over loopback."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ALL_OFF, DEADLINE, Suite, recv_all, recv_until, run_twistd, temp_dir, wait_for
from tests.test_http_files import ESCAPES, make_tree

CURL = "/usr/bin/curl"


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} in:\n{text}")


def read_if_there(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return b""


class Client:
    """http.client connections to one suite's HTTP port, closed after the test."""

    def __init__(self, test: SynchronousTestCase, suite: Suite) -> None:
        self.test = test
        self.host, self.port = suite.address("http")

    def connection(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=20)
        self.test.addCleanup(connection.close)
        return connection

    def fetch(
        self, path: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[http.client.HTTPResponse, bytes]:
        connection = self.connection()
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()

    def json(self, path: str) -> dict:
        response, body = self.fetch(path)
        self.test.assertEqual(response.status, 200, body)
        return json.loads(body)

    def curl(self, path: str, *options: str) -> tuple[int, bytes]:
        """``curl --path-as-is``: the path goes out exactly as written, ``..`` and all."""
        result = subprocess.run(
            [
                CURL,
                "-sS",
                "--path-as-is",
                "--max-time",
                "20",
                *options,
                "-w",
                "\n%{http_code}",
                f"http://{self.host}:{self.port}{path}",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code), body


class HttpEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.top = make_tree(self)
        self.suite = Suite(
            [
                *ALL_OFF,
                "--port",
                "0",
                "--http-port",
                "0",
                "--http-root",
                os.path.join(self.top, "root"),
                "--http-max-body",
                "1000",
            ]
        ).start()
        self.addCleanup(self.suite.stop)
        self.client = Client(self, self.suite)

    def test_every_route_on_one_kept_alive_connection(self) -> None:
        connection = self.client.connection()

        def get(path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes]:
            connection.request(method, path, body=body, headers={"X-Test": "yes"})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()

        status, headers, body = get("/")
        self.assertEqual((status, body), (200, b"Hello from sockproto 0.1.0, the mini HTTP responder.\n"))
        first_socket = connection.sock
        self.assertEqual(json.loads(get("/headers")[2])["headers"]["X-Test"], "yes")
        self.assertEqual(json.loads(get("/ip")[2]), {"origin": "127.0.0.1"})
        echoed = json.loads(get("/anything/x?q=1", "PUT", b"payload")[2])
        self.assertEqual(
            (echoed["method"], echoed["path"], echoed["query"]), ("PUT", "/anything/x", {"q": ["1"]})
        )
        self.assertEqual(echoed["body"], "payload")
        self.assertEqual(get("/status/418")[0], 418)
        started = time.monotonic()
        status, _, body = get("/delay/0.5")
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(json.loads(body)["path"], "/delay/0.5")
        status, headers, body = get("/bytes/3000000")
        self.assertEqual((status, len(body), headers["Content-Length"]), (200, 3000000, "3000000"))
        self.assertNotEqual(body[:1000], body[1000:2000])
        status, headers, body = get("/metrics")
        self.assertTrue(headers["Content-Type"].startswith("text/plain"))
        self.assertIn(b'sockproto_handled_total{service="http",unit="requests"}', body)
        status = json.loads(get("/status")[2])
        self.assertEqual(status["services"]["http"]["connections"], {"current": 1, "total": 1})
        self.assertEqual(status["services"]["http"]["requests"], 9)
        self.assertIs(connection.sock, first_socket)  # one TCP connection for all of it

    def test_access_log_in_twistd_log(self) -> None:
        self.client.fetch("/ip", headers={"User-Agent": "e2e-agent"})
        self.suite.wait_log('"GET /ip HTTP/1.1" 200 28 "-" "e2e-agent"')

    def test_no_escape_from_root_with_curl(self) -> None:
        for path in ESCAPES:
            code, body = self.client.curl(path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"secret", body, path)
        self.assertEqual(self.client.curl("/files/a.txt"), (200, b"hello\n"))
        self.assertEqual(self.client.curl("/files/link_in"), (200, b"hello\n"))
        self.assertEqual(self.client.curl("/files/dir_in/b.txt"), (200, b"bee\n"))
        self.assertEqual(self.client.curl("/files/caf%C3%A9.txt"), (200, b"coffee\n"))
        self.assertEqual(self.client.curl("/files/")[0], 403)
        self.assertFalse(self.suite.saw("Traceback"))

    def test_range_head_and_conditional(self) -> None:
        self.assertEqual(self.client.curl("/files/a.txt", "-r", "1-3"), (206, b"ell"))
        response, body = self.client.fetch("/files/a.txt", headers={"Range": "bytes=-2"})
        self.assertEqual(
            (response.status, body, response.getheader("Content-Range")), (206, b"o\n", "bytes 4-5/6")
        )
        response, body = self.client.fetch("/files/a.txt", headers={"Range": "bytes=0-0,2-2"})
        self.assertEqual(response.status, 206)
        self.assertTrue(response.getheader("Content-Type").startswith("multipart/byteranges"))
        response, body = self.client.fetch("/files/a.txt", headers={"Range": "bytes=10-20"})
        self.assertEqual(response.status, 416)
        response, body = self.client.fetch("/files/a.txt", "HEAD")
        self.assertEqual((response.status, response.getheader("Content-Length"), body), (200, "6", b""))
        modified = response.getheader("Last-Modified")
        response, body = self.client.fetch("/files/a.txt", headers={"If-Modified-Since": modified})
        self.assertEqual((response.status, body), (304, b""))

    def test_body_cap(self) -> None:
        response, body = self.client.fetch("/anything", "POST", b"x" * 1000)
        self.assertEqual(json.loads(body)["body_length"], 1000)
        connection = self.client.connection()
        connection.request("POST", "/anything", body=b"x" * 1001)
        response = connection.getresponse()
        self.assertEqual((response.status, response.getheader("Connection")), (413, "close"))
        self.assertIn(b"--http-max-body", response.read())
        self.suite.wait_log("request body of 1001 bytes over 1000 bytes")
        # a big chunked upload is cut off, not buffered
        with socket.create_connection(self.client_address(), timeout=20) as sock:
            sock.sendall(b"POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(100):
                    sock.sendall(b"400\r\n" + b"y" * 1024 + b"\r\n")
            except OSError:
                pass  # the server closed while we were still sending: that is the point
            self.assertTrue(recv_all(sock).startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.client.fetch("/ip")[0].status, 200)

    def client_address(self) -> tuple[str, int]:
        return self.client.host, self.client.port

    def test_parsing_and_small_correctness_with_curl(self) -> None:
        """Regressions: absolute-form was 400, HTTP/1.1 without Host 200, a
        folded header accepted, text/plain without charset, /status/302
        without Location."""
        origin = f"http://{self.client.host}:{self.client.port}"

        def curl(*options: str) -> bytes:
            command = [CURL, "-sS", "--max-time", "20", *options]
            return subprocess.run(command, capture_output=True, check=True, timeout=30).stdout

        # a client talking to a proxy sends the absolute form
        proxied = curl("-x", origin, "-w", "\n%{http_code}", "http://example.test/ip")
        self.assertEqual(proxied, b'{\n  "origin": "127.0.0.1"\n}\n\n200')
        self.assertEqual(self.client.curl("/ip", "-H", "Host:")[0], 400)
        redirect = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", f"{origin}/status/302")
        self.assertEqual(redirect, f"302 {origin}/redirect/1".encode())
        kind = curl("-o", "/dev/null", "-w", "%{content_type}", f"{origin}/files/caf%C3%A9.txt")
        self.assertEqual(kind, b"text/plain; charset=utf-8")
        with self.suite.connect("http") as sock:
            sock.sendall(b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n")
            answer = recv_all(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.suite.wait_log("header line starts with a space or tab (obs-fold)")
        self.assertFalse(self.suite.saw("Traceback"))

    def test_malformed_request_line(self) -> None:
        with self.suite.connect("http") as sock:
            sock.sendall(b"GARBAGE\r\n\r\n")
            answer = recv_all(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
        self.suite.wait_log("malformed request")
        with self.suite.connect("http") as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"200 OK", recv_until(sock, lambda d: d.endswith(b"responder.\n")))
        self.assertFalse(self.suite.saw("Traceback"))

    def test_status_counters_move_when_strip_is_used(self) -> None:
        before = self.client.json("/status")["services"]["strip"]
        self.assertEqual(before["connections"]["total"], 0)
        with self.suite.connect("strip") as sock:
            sock.sendall(b"a b\nc d\n")
            recv_until(sock, lambda d: d.count(b"\0") == 2)
            during = self.client.json("/status")["services"]["strip"]
            self.assertEqual(during["connections"], {"current": 1, "total": 1})
            self.assertEqual(during["lines"], 2)
            self.assertEqual(during["bytes"], {"in": 8, "out": 6})
        wait_for(lambda: self.client.json("/status")["services"]["strip"]["connections"]["current"] == 0)
        _, body = self.client.fetch("/metrics")
        text = body.decode()
        self.assertEqual(metric(text, 'sockproto_handled_total{service="strip",unit="lines"}'), 2)
        self.assertEqual(metric(text, 'sockproto_connections_total{service="strip"}'), 1)
        self.assertEqual(metric(text, 'sockproto_received_bytes_total{service="strip"}'), 8)

    def test_delay_does_not_block_others(self) -> None:
        with self.suite.connect("http") as slow:
            slow.sendall(b"GET /delay/10 HTTP/1.1\r\nHost: x\r\n\r\n")
            polls = 0

            def delay_started() -> bool:
                nonlocal polls
                polls += 1  # each poll of /status is a request too
                return self.client.json("/status")["services"]["http"]["requests"] > polls

            wait_for(delay_started, what="the /delay request to be under way")
            response, _ = self.client.fetch("/ip")
            self.assertEqual(response.status, 200)
            slow.setblocking(False)
            self.assertRaises(BlockingIOError, slow.recv, 1)  # answered /ip while /delay waits


class HttpTimeoutEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.suite = Suite([*ALL_OFF, "--http-port", "0", "--http-idle-timeout", "1"]).start()
        self.addCleanup(self.suite.stop)

    def test_idle_and_half_sent_requests_cannot_pin(self) -> None:
        with self.suite.connect("http") as idle, self.suite.connect("http") as dripping:
            dripping.sendall(b"GET / HTTP/1.1\r\n")
            deadline = time.monotonic() + 10
            answer = b""
            dripping.settimeout(0.2)
            while time.monotonic() < deadline:
                try:
                    dripping.sendall(b"X: y\r\n")
                    answer = dripping.recv(1000)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if answer:
                    break
            self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
            self.assertEqual(recv_all(idle, timeout=10), b"")
        self.suite.wait_log("request incomplete after 1 s")
        self.suite.wait_log("idle for 1 s")

    def test_client_that_never_reads_is_dropped(self) -> None:
        with self.suite.connect("http") as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /bytes/10485760 HTTP/1.1\r\nHost: x\r\n\r\n")
            self.suite.wait_log("read nothing for 1 s", timeout=10)


class HttpLingerEndToEndTests(SynchronousTestCase):
    """A refused client that is still sending gets the answer, then is closed at a bound."""

    def start(self, *options: str) -> Suite:
        suite = Suite([*ALL_OFF, "--http-port", "0", "--http-max-body", "1000", *options]).start()
        self.addCleanup(suite.stop)
        return suite

    def test_curl_chunked_upload_over_the_cap_gets_413(self) -> None:
        # Regression: the server closed with the upload unread, the kernel
        # sent a reset, and curl reported "Connection reset by peer", not 413.
        host, port = self.start().address("http")
        upload = subprocess.run(
            [
                CURL,
                "-sS",
                "--max-time",
                "20",
                "-T",
                "-",
                "-H",
                "Transfer-Encoding: chunked",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://{host}:{port}/anything",
            ],
            input=os.urandom(4 * 1024 * 1024),
            capture_output=True,
            timeout=30,
        )
        self.assertEqual((upload.returncode, upload.stdout, upload.stderr), (0, b"413", b""))

    def test_a_client_that_keeps_sending_is_closed_at_the_bounds(self) -> None:
        # Each client is timed from its own refusal, one at a time (review: the
        # flood was timed only after the trickle had been closed, so it passed
        # with --http-linger-bytes ignored).
        linger = 4.0
        suite = self.start("--http-linger-time", f"{linger:g}", "--http-linger-bytes", "200000")

        def seconds_until_closed(chunk: bytes, pace: float) -> float:
            """From just before a refusal, until the server's close makes a send of
            ``chunk`` (every ``pace`` seconds) fail: never less than the linger."""
            sock = suite.connect("http")
            self.addCleanup(sock.close)
            started = time.monotonic()  # before the refusal, so before the server's timer
            sock.sendall(b"GARBAGE\r\n\r\n")
            # the answer, then the end of what the server sends (a half-close)
            self.assertTrue(recv_all(sock).startswith(b"HTTP/1.1 400 "))
            deadline = started + DEADLINE
            while time.monotonic() < deadline:
                try:
                    sock.sendall(chunk)
                except OSError:  # reset, or a broken pipe: the server closed
                    return time.monotonic() - started
                time.sleep(pace)
            raise AssertionError("the server never closed")

        # a flood is read and dropped only until the byte bound, well before the time bound...
        self.assertLess(seconds_until_closed(b"x" * 65536, 0), linger / 2)
        # ...a trickle (a few KB) until the time bound
        self.assertGreaterEqual(seconds_until_closed(b"x" * 100, 0.02), linger - 0.05)
        self.assertFalse(suite.saw("Traceback"))


class HttpOptionsEndToEndTests(SynchronousTestCase):
    def test_message_listing_access_log_and_client_cap(self) -> None:
        top = make_tree(self)
        access_log = os.path.join(top, "access.log")
        suite = Suite(
            [
                *ALL_OFF,
                "--http-port",
                "0",
                "--http-message",
                "custom hello",
                "--http-root",
                os.path.join(top, "root"),
                "--http-listing",
                "--http-access-log",
                access_log,
                "--http-max-clients",
                "1",
            ]
        ).start()
        self.addCleanup(suite.stop)
        client = Client(self, suite)
        self.assertEqual(client.curl("/"), (200, b"custom hello\n"))
        code, listing = client.curl("/files/")
        self.assertEqual(code, 200)
        self.assertIn(b"a.txt", listing)
        self.assertNotIn(b".hidden", listing)
        wait_for(lambda: b'"GET /files/ HTTP/1.1" 200' in read_if_there(access_log), what="access log line")
        self.assertFalse(suite.saw('"GET /files/ HTTP/1.1"'))

        def connected() -> socket.socket | None:
            """A connection in the one slot, once the server has seen curl's close."""
            sock = suite.connect("http")
            sock.sendall(b"GET /ip HTTP/1.1\r\nHost: x\r\n\r\n")
            if recv_until(sock, lambda d: d.endswith(b"}\n")).startswith(b"HTTP/1.1 200 "):
                return sock
            sock.close()  # a 503: curl's connection still had the slot
            return None

        with wait_for(connected, what="the slot curl used"):
            with suite.connect("http") as second:
                self.assertTrue(recv_all(second).startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))

    def test_bad_access_log_stops_start_with_one_line(self) -> None:
        result = run_twistd(
            [
                "-n",
                "sockproto",
                *ALL_OFF,
                "--http-port",
                "0",
                "--http-access-log",
                os.path.join(temp_dir(self), "no", "such", "access.log"),
            ]
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cannot open access log", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_root_must_exist(self) -> None:
        result = run_twistd(["-n", "sockproto", "--http-root", "/no/such/folder"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--http-root: no such folder", result.stderr)


class ChatStatusEndToEndTests(SynchronousTestCase):
    def test_status_counters_move_when_chat_is_used(self) -> None:
        suite = Suite([*ALL_OFF, "--chat-port", "0", "--http-port", "0"]).start()
        self.addCleanup(suite.stop)
        client = Client(self, suite)
        before = client.json("/status")["services"]["chat"]
        self.assertEqual((before["connections"]["total"], before["lines"]), (0, 0))
        with suite.connect("chat") as talker, suite.connect("chat") as listener:
            recv_until(listener, lambda d: d.endswith(b"\n"))  # welcome
            recv_until(talker, lambda d: b"joined" in d)
            talker.sendall(b"hello\n")
            recv_until(listener, lambda d: b"<guest1> hello" in d)
            during = client.json("/status")["services"]["chat"]
            self.assertEqual(during["connections"], {"current": 2, "total": 2})
            self.assertGreaterEqual(during["lines"], 1)
            self.assertGreater(during["bytes"]["out"], before["bytes"]["out"])
        wait_for(lambda: client.json("/status")["services"]["chat"]["connections"]["current"] == 0)


class HttpMemoryEndToEndTests(SynchronousTestCase):
    """Issue 12: 100 clients that POST 1 MiB to /anything and never read took
    +600 MiB (6 MiB of JSON each, written in one piece), and kept it."""

    CLIENTS = 50
    BODY = b"\x01" * (1024 * 1024)  # six bytes of JSON each: 6 MiB of answer

    def test_clients_that_never_read_an_echo_hold_little_memory(self) -> None:
        suite = Suite([*ALL_OFF, "--http-port", "0", "--http-max-body", "2M"]).start()
        self.addCleanup(suite.stop)
        client = Client(self, suite)
        client.json("/status")  # everything a request needs is loaded
        before = suite.rss_kib()
        head = b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(self.BODY)
        for _ in range(self.CLIENTS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # and never read
            sock.connect((client.host, client.port))
            self.addCleanup(sock.close)
            sock.sendall(head + self.BODY)
        asked = 1

        def answered() -> bool:
            nonlocal asked
            asked += 1
            requests = client.json("/status")["services"]["http"]["requests"]
            return requests - asked >= self.CLIENTS

        wait_for(answered, what=f"{self.CLIENTS} echoes under way")
        grown = suite.rss_kib() - before
        # One JSON each would be 300 MiB; a chunk and a transport buffer each are a few.
        self.assertLess(grown, 64 * 1024, f"RSS grew by {grown} KiB")

    def test_over_the_output_budget_the_largest_holders_are_dropped(self) -> None:
        """What sits in the transports' buffers counts: 20 downloads that are
        not read hold over 1 MiB there, past a --http-max-output of 512 KiB."""
        suite = Suite([*ALL_OFF, "--http-port", "0", "--http-max-output", "512k"]).start()
        self.addCleanup(suite.stop)
        client = Client(self, suite)
        socks = []
        for _ in range(20):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # and never read
            sock.connect((client.host, client.port))
            self.addCleanup(sock.close)
            sock.sendall(b"GET /bytes/10485760 HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)

        def limit_hits() -> int:
            return client.json("/status")["services"]["http"]["limits_hit"].get("max_output", 0)

        wait_for(limit_hits, what="a client dropped over --http-max-output")
        suite.wait_log("bytes of output unread, the most while http's clients held over 524288 bytes")
        # The /status requests themselves were answered: the others carry on.
        self.assertLess(limit_hits(), 20)
