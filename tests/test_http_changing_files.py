"""Files that change while the real daemon sends them, read by a slow client over loopback.

The client's receive window is small and it stops reading after the response
head, so the server is held mid-file (its socket buffers full) while the test
truncates or appends to the file; then the client reads the rest.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString

from tests.support import ALL_OFF, Suite, recv_all, recv_until, temp_dir
from tests.test_http import parse_responses
from tests.test_http_e2e import CURL, Client

# Far more than the socket buffers and twisted.web's hold between them.
SIZE = 32 * 1024 * 1024
CONTENT = bytes(range(256)) * (SIZE // 256)
CUT = re.compile(r"http: big\.bin ended (\d+) bytes early; connection closed")


class ChangingFileEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = temp_dir(self)
        self.path = os.path.join(self.root, "big.bin")
        with open(os.path.join(self.root, "a.txt"), "wb") as file:
            file.write(b"hello\n")
        self.suite = Suite([*ALL_OFF, "--http-port", "0", "--http-root", self.root]).start()
        self.addCleanup(self.suite.stop)
        self.client = Client(self, self.suite)

    def write(self) -> None:
        with open(self.path, "wb") as file:
            file.write(CONTENT)

    def slow_client(self, requests: bytes) -> tuple[socket.socket, bytes]:
        """Send ``requests``, read just the first response head: the server is then stuck mid-file."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.settimeout(10)
        sock.connect(self.suite.address("http"))
        sock.sendall(requests)
        return sock, recv_until(sock, lambda data: b"\r\n\r\n" in data, timeout=10)

    def test_a_file_truncated_mid_transfer_closes_the_connection(self) -> None:
        # Regression: with a Range the server spun at 100% CPU until restart
        # (even after the client hung up); without one, the connection stayed
        # open, its body short of its Content-Length.
        for number, (header, offset) in enumerate([("", 0), ("Range: bytes=1000-\r\n", 1000)], 1):
            self.write()
            request = f"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode()
            sock, start = self.slow_client(request)
            os.truncate(self.path, 0)
            data = start + recv_all(sock, timeout=10)  # ends: the server closed
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            self.assertEqual(length, SIZE - offset)
            self.assertLess(len(body), length)
            self.assertEqual(body, CONTENT[offset : offset + len(body)])
            self.suite.wait_log("bytes early; connection closed")
            cuts = [int(m.group(1)) for line in self.suite.lines if (m := CUT.search(line))]
            self.assertEqual(len(cuts), number)
            self.assertEqual(len(body) + cuts[-1], length)  # every byte read was sent
        status = self.client.json("/status")
        self.assertEqual(status["services"]["http"]["counters"]["files_cut_short"], 2)
        self.assertEqual(self.client.fetch("/files/a.txt")[1], b"hello\n")  # and it answers at once
        self.assertFalse(self.suite.saw("Traceback"))

    def test_a_file_that_grows_mid_transfer_sends_only_its_content_length(self) -> None:
        # Regression: the appended bytes went out too, and a pipelining client
        # read them as the next response (response splitting).
        self.write()
        forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
        requests = (
            b"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n\r\nGET /files/a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        sock, start = self.slow_client(requests)
        with open(self.path, "ab") as file:
            file.write(forged * 1000)
        data = start + recv_until(
            sock, lambda got: len(start) + len(got) > SIZE and got.endswith(b"\r\n\r\nhello\n"), timeout=10
        )
        responses = parse_responses(data)
        self.assertEqual([r.status for r in responses], [200, 200])
        self.assertEqual(responses[0].body, CONTENT)
        self.assertEqual(responses[1].body, b"hello\n")
        status = self.client.json("/status")
        self.assertNotIn("files_cut_short", status["services"]["http"].get("counters", {}))


class CurlConditionalTests(SynchronousTestCase):
    def test_curl_z_with_the_file_itself_gets_304(self) -> None:
        # Regression: Last-Modified was rounded up to the next second, so
        # `curl -z FILE` (the file's mtime in whole seconds) always got a 200.
        root = temp_dir(self)
        path = os.path.join(root, "a.txt")
        with open(path, "wb") as file:
            file.write(b"hello\n")
        stamp = 1_795_316_331_700_000_000  # a fraction of a second in it
        os.utime(path, ns=(stamp, stamp))
        suite = Suite([*ALL_OFF, "--http-port", "0", "--http-root", root]).start()
        self.addCleanup(suite.stop)
        host, port = suite.address("http")

        def curl(*options: str) -> tuple[str, str]:
            url = f"http://{host}:{port}/files/a.txt"
            options = (
                "-sS",
                "--max-time",
                "20",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                *options,
            )
            result = subprocess.run(
                [CURL, *options, url],
                capture_output=True,
                check=True,
                text=True,
                timeout=30,
            )
            head, code = result.stdout[:-3], result.stdout[-3:]
            return code, head

        code, head = curl("-z", path)
        self.assertEqual(code, "304", head)
        self.assertNotIn("content-length", head.lower())
        etag = re.search(r"(?i)^etag: (.*?)\r?$", head, re.M).group(1)  # type: ignore[union-attr]
        self.assertEqual(curl("-H", f"If-None-Match: {etag}")[0], "304")
        before = datetimeToString(stamp // 1_000_000_000).decode()
        os.utime(path, ns=(stamp + 1_000_000_000, stamp + 1_000_000_000))  # changed a second later
        self.assertEqual(curl("-z", before)[0], "200")
        self.assertEqual(curl("-z", path)[0], "304")
