"""Static files: which resource each request path reaches, and what it answers.

Paths are split and decoded the way twisted.web's Request does it, so every
encoding of ``..`` and ``/`` arrives here as a real client's would. The end-to-end
tests serve files with curl too.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from io import BytesIO
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import _producer_helpers
from twisted.internet.task import Cooperator
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource
from twisted.web.http import datetimeToString

from sockproto import checks, files, http, http_files
from sockproto.config import HttpSettings
from sockproto.files import Tree
from sockproto.http_files import LISTING_OFF, NOT_FOUND, Listing, MultipartProducer, RangeProducer, SafeFile
from sockproto.stats import Stats
from tests.support import Consumer, temp_dir
from tests.test_http import Harness, messages, parse_responses

ESCAPES = [
    "/files/../outside/secret.txt",
    "/files/%2e%2e/outside/secret.txt",
    "/files/%2E%2E/outside/secret.txt",
    "/files/..%2foutside%2fsecret.txt",
    "/files/%2e%2e%2foutside%2fsecret.txt",
    "/files/sub/../../outside/secret.txt",
    "/files/sub/..%2f..%2foutside%2fsecret.txt",
    "/files/%2fetc%2fpasswd",
    "/files//etc/passwd",
    "/files/sub//etc/passwd",
    "/files/link_out",
    "/files/abs_out",
    "/files/dir_out/secret.txt",
    "/files/sub/link_up",
    "/files/.hidden",
    "/files/.git/config",
    "/files/sub/.hidden",
    "/files/dotenv",
    "/files/repo/config",
    "/files/repo/",
    "/files/%2ehidden",
    "/files/fifo",
    "/files/loop",
    "/files/a.txt%00",
    "/files/%ff",
    "/files/a.txt/more",
    "/files/missing.txt",
]


def make_tree(test: SynchronousTestCase) -> str:
    """A root with files, dotfiles, a FIFO and symlinks in and out; returns its parent."""
    top = temp_dir(test)
    root = os.path.join(top, "root")
    outside = os.path.join(top, "outside")
    os.makedirs(os.path.join(root, "sub"))
    os.makedirs(os.path.join(root, ".git"))
    os.makedirs(outside)
    files = {
        "outside/secret.txt": "secret\n",
        "root/a.txt": "hello\n",
        "root/.hidden": "hidden\n",
        "root/.git/config": "[core]\n",
        "root/sub/b.txt": "bee\n",
        "root/sub/.hidden": "hidden\n",
        "root/caf\u00e9.txt": "coffee\n",
    }
    for name, text in files.items():
        with open(os.path.join(top, name), "w", encoding="utf-8") as file:
            file.write(text)
    os.symlink("a.txt", os.path.join(root, "link_in"))
    os.symlink("sub", os.path.join(root, "dir_in"))
    os.symlink("../outside/secret.txt", os.path.join(root, "link_out"))
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(root, "abs_out"))
    os.symlink("../outside", os.path.join(root, "dir_out"))
    os.symlink("../..", os.path.join(root, "sub", "link_up"))
    os.symlink("loop", os.path.join(root, "loop"))
    os.symlink(".hidden", os.path.join(root, "dotenv"))  # a dotfile by a plain name
    os.symlink(".git", os.path.join(root, "repo"))
    os.symlink("root", os.path.join(top, "root_link"))
    os.mkfifo(os.path.join(root, "fifo"))
    return top


def resolve(root: resource.Resource, target: str) -> tuple[resource.Resource, Any]:
    """The resource twisted.web would render for ``target`` (as server.Request splits it)."""
    path = target.encode("ascii")
    request = SimpleNamespace(prepath=[], postpath=[unquote_to_bytes(s) for s in path[1:].split(b"/")])
    return resource.getChildForRequest(root, request), request


class ResolutionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.top = make_tree(self)
        self.real_root = os.path.realpath(os.path.join(self.top, "root"))
        self.root = http.make_root(HttpSettings(root=os.path.join(self.top, "root")), Stats(), None)

    def served(self, target: str) -> str:
        found, _ = resolve(self.root, target)
        self.assertIsInstance(found, SafeFile, target)
        return os.path.relpath(found.path, self.real_root)

    def test_files_inside_served(self) -> None:
        self.assertEqual(self.served("/files/a.txt"), "a.txt")
        self.assertEqual(self.served("/files/sub/b.txt"), os.path.join("sub", "b.txt"))
        self.assertEqual(self.served("/files/caf%C3%A9.txt"), "caf\u00e9.txt")

    def test_symlinks_inside_followed(self) -> None:
        self.assertEqual(self.served("/files/link_in"), "link_in")
        self.assertEqual(self.served("/files/dir_in/b.txt"), os.path.join("dir_in", "b.txt"))

    def test_no_escape(self) -> None:
        with capturedLogs() as events:
            for target in ESCAPES:
                found, _ = resolve(self.root, target)
                self.assertIs(found, NOT_FOUND, target)
        # not even a traceback for the segment that is not UTF-8
        self.assertEqual(events, [])

    def test_root_given_through_a_symlink(self) -> None:
        root = http.make_root(HttpSettings(root=os.path.join(self.top, "root_link")), Stats(), None)
        found, _ = resolve(root, "/files/a.txt")
        self.assertEqual(found.path, os.path.join(self.real_root, "a.txt"))
        self.assertIs(resolve(root, "/files/link_out")[0], NOT_FOUND)

    def test_folder_without_listing(self) -> None:
        self.assertIs(resolve(self.root, "/files/")[0], LISTING_OFF)
        self.assertIs(resolve(self.root, "/files/sub/")[0], LISTING_OFF)

    def test_index_page_served(self) -> None:
        with open(os.path.join(self.real_root, "sub", "index.html"), "w") as file:
            file.write("<p>hi</p>\n")
        self.assertEqual(self.served("/files/sub/"), os.path.join("sub", "index.html"))

    def test_listing_shows_only_what_is_served(self) -> None:
        root = http.make_root(HttpSettings(root=os.path.join(self.top, "root"), listing=True), Stats(), None)
        found, _ = resolve(root, "/files/")
        self.assertIsInstance(found, Listing)
        self.assertEqual(
            sorted(name for name, _ in found.dirs), ["a.txt", "caf\u00e9.txt", "dir_in", "link_in", "sub"]
        )
        self.assertIs(resolve(root, "/files//etc/passwd")[0], NOT_FOUND)

    def test_unknown_type_is_not_html(self) -> None:
        with open(os.path.join(self.real_root, "page"), "w") as file:
            file.write("<script>alert(1)</script>")
        found, _ = resolve(self.root, "/files/page")
        self.assertEqual(found.defaultType, "application/octet-stream")


class RenderTests(SynchronousTestCase):
    """What needs no producer: errors, HEAD, 304, the listing page."""

    def setUp(self) -> None:
        self.top = make_tree(self)
        self.http = Harness(self, root=os.path.join(self.top, "root"))

    def test_file_served_whole_and_in_ranges(self) -> None:
        self.assertEqual(self.http.get("/files/a.txt").body, b"hello\n")
        part = self.http.get("/files/a.txt", headers="Range: bytes=1-3\r\n")
        self.assertEqual((part.status, part.body), (206, b"ell"))

    def test_suffix_longer_than_the_file_is_the_whole_file(self) -> None:
        # Regression: static.File sought to a negative offset: a traceback and a 500.
        response = self.http.get("/files/a.txt", headers="Range: bytes=-1000\r\n")
        self.assertEqual((response.status, response.body), (206, b"hello\n"))
        self.assertEqual(response.header(b"content-range"), b"bytes 0-5/6")

    def test_several_ranges_as_multipart(self) -> None:
        response = self.http.get("/files/a.txt", headers="Range: bytes=0-0,2-3,-1\r\n")
        self.assertEqual(response.status, 206)
        boundary = response.header(b"content-type").partition(b'boundary="')[2].rstrip(b'"')
        parts = response.body.split(b"\r\n--" + boundary)
        self.assertEqual(parts[0], b"")
        self.assertEqual(parts[-1], b"--\r\n")
        bodies = [part.partition(b"\r\n\r\n")[2] for part in parts[1:-1]]
        self.assertEqual(bodies, [b"h", b"ll", b"\n"])

    def test_no_range_fits(self) -> None:
        # Regression: static.File failed (a traceback) when none of several ranges fits.
        with capturedLogs() as events:
            response = self.http.get("/files/a.txt", headers="Range: bytes=10-20,30-40\r\n")
        self.assertEqual((response.status, response.header(b"content-range")), (416, b"bytes */6"))
        self.assertEqual([e for e in events if "log_failure" in e], [])

    def test_costly_ranges_get_the_whole_file_once(self) -> None:
        # Regression: "bytes=0-,0-,..." made a few KB of request cost the file
        # that many times over (CVE-2011-3192's attack on Apache).
        content = bytes(range(256)) * 4
        with open(os.path.join(self.top, "root", "big.bin"), "wb") as file:
            file.write(content)
        costly = ["0-,0-", "0-1000,500-", "-2000,0-0", ",".join(f"{i}-{i}" for i in range(101))]
        for ranges in costly:
            response = self.http.get("/files/big.bin", headers=f"Range: bytes={ranges}\r\n")
            self.assertEqual((response.status, response.body), (200, content), ranges[:20])
        many = ",".join(f"{i}-{i}" for i in range(0, 200, 2))  # 100 parts, apart
        self.assertEqual(self.http.get("/files/big.bin", headers=f"Range: bytes={many}\r\n").status, 206)

    def test_range_header_not_ascii_is_ignored(self) -> None:
        # Regression: static.File decoded a malformed Range header as UTF-8 to
        # log it, and answered one that is not with a traceback and a 500.
        with capturedLogs() as events:
            response = self.http.get("/files/a.txt", headers="Range: bytes=\xff-\r\n")
        self.assertEqual((response.status, response.body), (200, b"hello\n"))
        self.assertEqual([e for e in events if "log_failure" in e], [])

    def test_other_methods_get_plain_405(self) -> None:
        # Regression: static.File answered them with twisted.web's HTML 405 or
        # "501 Huh?" page, a deprecated class warning on each request.
        for method in ("POST", "DELETE", "BREW"):
            response = self.http.get("/files/a.txt", method=method)
            self.assertEqual(response.status, 405, method)
            self.assertEqual(response.header(b"allow"), b"GET, HEAD")
            self.assertEqual(response.header(b"content-type"), b"text/plain; charset=utf-8")

    def test_escape_is_plain_404(self) -> None:
        response = self.http.get("/files/%2e%2e/outside/secret.txt")
        self.assertEqual(response.status, 404)
        self.assertEqual(response.body, b"not found\n")

    def test_listing_off_is_403_with_hint(self) -> None:
        response = self.http.get("/files/")
        self.assertEqual(response.status, 403)
        self.assertIn(b"--http-listing", response.body)

    def test_folder_without_slash_redirects(self) -> None:
        response = self.http.get("/files/sub")
        self.assertEqual(response.status, 302)
        self.assertTrue(response.header(b"location").endswith(b"/files/sub/"))

    def test_head_and_not_modified(self) -> None:
        head = self.http.get("/files/a.txt", method="HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header(b"content-length"), b"6")
        self.assertEqual(head.header(b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(head.header(b"accept-ranges"), b"bytes")
        modified = head.header(b"last-modified")
        self.assertIsNotNone(modified)
        cached = self.http.get("/files/a.txt", headers=f"If-Modified-Since: {modified.decode()}\r\n")
        self.assertEqual(cached.status, 304)
        self.assertEqual(cached.body, b"")

    def test_listing_head(self) -> None:
        # It was answered by twisted.web faking GET, and a warning logged each time.
        self.http = Harness(self, root=os.path.join(self.top, "root"), listing=True)
        length = self.http.get("/files/").header(b"content-length")
        with capturedLogs() as events:
            response = self.http.get("/files/", method="HEAD")
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(response.header(b"content-length"), length)
        self.assertEqual(events, [])

    def test_listing_page(self) -> None:
        self.http = Harness(self, root=os.path.join(self.top, "root"), listing=True)
        response = self.http.get("/files/")
        self.assertEqual(response.status, 200)
        self.assertIn(b'href="a.txt"', response.body)
        for hidden in (b".hidden", b".git", b"link_out", b"dir_out", b"fifo", b"secret", b"dotenv", b"repo"):
            self.assertNotIn(hidden, response.body)

    def test_text_files_say_they_are_utf8(self) -> None:
        # Regression: a UTF-8 .txt came as bare text/plain, and requests and
        # browsers read it as Latin-1 (cafÃ©).
        root = os.path.join(self.top, "root")
        expected = {
            "notes.txt": b"text/plain; charset=utf-8",
            "page.html": b"text/html; charset=utf-8",
            "style.css": b"text/css; charset=utf-8",
            "app.js": b"text/javascript; charset=utf-8",
            "table.csv": b"text/csv; charset=utf-8",
            "read.md": b"text/markdown; charset=utf-8",
            "data.json": b"application/json",
            "image.png": b"image/png",
        }
        for name in expected:
            with open(os.path.join(root, name), "w", encoding="utf-8") as file:
                file.write("caf\u00e9\n")
        for name, kind in expected.items():
            response = self.http.get(f"/files/{name}")
            self.assertEqual((response.status, response.header(b"content-type")), (200, kind), name)
            self.assertEqual(response.body, "caf\u00e9\n".encode())

    def test_listing_with_a_name_that_is_not_utf8(self) -> None:
        # Regression: twisted.web's lister failed on it: a 500 and a critical
        # traceback on every request for the folder. Then (review) it was
        # listed, but its link answered 404: now it is left out, as a request
        # cannot name it.
        root = os.path.join(self.top, "root")
        with open(os.path.join(os.fsencode(root), b"caf\xe9 <b>.txt"), "wb") as file:
            file.write(b"latin-1\n")
        os.mkdir(os.path.join(os.fsencode(root), b"dir\xff"))
        self.http = Harness(self, root=root, listing=True)
        with capturedLogs() as events:
            response = self.http.get("/files/")
        self.assertEqual(response.status, 200)
        self.assertEqual(events, [])
        for absent in (b"caf%E9", b"caf\xef\xbf\xbd", b"dir%FF", b"dir\xef\xbf\xbd"):
            self.assertNotIn(absent, response.body)
        self.assertEqual(self.http.get("/files/caf%E9%20%3Cb%3E.txt").status, 404)
        self.assertIn(b'href="a.txt"', response.body)
        self.assertIn(b'href="caf%C3%A9.txt"', response.body)
        self.assertIn("caf\u00e9.txt".encode(), response.body)  # UTF-8 names as they are
        self.assertIn(b'href="sub/"', response.body)

    def test_listing_rows_are_what_was_checked(self) -> None:
        # Regression (review): each listed name was stat'ed again by path
        # (following links) after the walk had checked it, so a file that
        # changed in between showed another size than the one checked.
        root = os.path.join(self.top, "root")
        checked = Tree.stat

        def grow_after_check(tree: Tree, path: str) -> os.stat_result:
            info = checked(tree, path)
            if path == "a.txt":
                with open(os.path.join(root, "a.txt"), "ab") as file:
                    file.write(b"x" * 5000)
            return info

        self.http = Harness(self, root=root, listing=True)
        self.patch(Tree, "stat", grow_after_check)
        response = self.http.get("/files/")
        row = response.body[response.body.index(b'href="a.txt"') :].split(b"</tr>")[0]
        self.assertIn(b"<td>6B</td>", row)


class OutOfDescriptorsTests(SynchronousTestCase):
    """Regression (review): with RLIMIT_NOFILE exhausted, Tree's os.open of the
    root raised EMFILE and every existing file answered 404 (cacheable by a
    proxy), with no log line. A 503 with Retry-After, and one line."""

    def setUp(self) -> None:
        self.top = make_tree(self)
        self.http = Harness(self, root=os.path.join(self.top, "root"), listing=True)

    def out_of_descriptors(self, when: Callable[[int], bool]) -> None:
        """Make sockproto.files' os.open fail with EMFILE for the flags ``when`` picks."""
        real_open = os.open

        def open_or_fail(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if when(flags):
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
            return real_open(path, flags, *args, **kwargs)

        self.patch(files.os, "open", open_or_fail)

    def assert_unavailable(self, target: str) -> None:
        with capturedLogs() as events:
            response = self.http.get(target)
        self.assertEqual(
            (response.status, response.header(b"retry-after"), response.body),
            (503, b"1", b"service unavailable: try again shortly\n"),
            target,
        )
        lines = [formatEvent(event) for event in events]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("peer", events[0])
        self.assertIn("503 to 127.0.0.1:40000: ", lines[0])
        self.assertIn("Too many open files", lines[0])

    def test_no_descriptor_for_the_walk(self) -> None:
        self.out_of_descriptors(lambda flags: True)
        for target in ("/files/a.txt", "/files/sub/b.txt", "/files/", "/files/sub/"):
            self.assert_unavailable(target)

    def test_no_descriptor_to_read_the_file(self) -> None:
        # The walk (in getChild) succeeds; the open for reading (in render) fails.
        self.out_of_descriptors(lambda flags: flags == files._READ)
        self.assert_unavailable("/files/a.txt")

    def test_what_is_not_there_is_still_404(self) -> None:
        self.out_of_descriptors(lambda flags: flags == files._READ)
        for target in ("/files/missing.txt", "/files/a.txt/more", "/files/fifo", "/files/link_out"):
            self.assertEqual(self.http.get(target).status, 404, target)


class MultipartProducerTests(SynchronousTestCase):
    content = os.urandom(MultipartProducer.buffer_size + 100)

    def produce(self, parts: list[tuple[bytes, int, int]], content: bytes | None = None) -> Consumer:
        consumer = Consumer()
        file = BytesIO(self.content if content is None else content)
        MultipartProducer(consumer, file, parts).start()
        consumer.body = consumer.pull()  # type: ignore[attr-defined]
        self.assertTrue(file.closed)
        return consumer

    def test_a_boundary_that_fills_the_buffer(self) -> None:
        # Regression: twisted.web's producer then read a negative length: a
        # traceback, and the response never ended.
        size = MultipartProducer.buffer_size
        parts = [(b"A" * 10, 0, size - 15), (b"B" * 10, 7, 3), (b"--end--", 0, 0)]
        consumer = self.produce(parts)
        self.assertEqual(
            consumer.body, b"A" * 10 + self.content[: size - 15] + b"B" * 10 + self.content[7:10] + b"--end--"
        )
        self.assertTrue(consumer.finished)
        self.assertTrue(all(len(chunk) <= size + 10 for chunk in consumer.chunks))  # + a boundary

    def test_no_parts_is_an_empty_body(self) -> None:
        consumer = self.produce([])
        self.assertEqual((consumer.body, consumer.finished), (b"", True))

    def test_file_cut_short_ends_with_a_close(self) -> None:
        consumer = self.produce([(b"A", 0, 100), (b"B", 0, 1)], content=b"0123456789")
        self.assertEqual(consumer.body, b"A0123456789")
        self.assertEqual((consumer.finished, consumer.lost), (False, True))

    def test_file_cut_short_reports_what_is_missing(self) -> None:
        missing: list[int] = []
        consumer = Consumer()
        MultipartProducer(
            consumer, BytesIO(b"0123456789"), [(b"A", 0, 100), (b"BB", 0, 1)], missing.append
        ).start()
        self.assertEqual(consumer.pull(), b"A0123456789")
        self.assertEqual(missing, [90 + 2 + 1])

    def test_stopped_producer_writes_nothing_more(self) -> None:
        consumer = Consumer()
        file = BytesIO(self.content)
        producer = MultipartProducer(consumer, file, [(b"A", 0, 10)])
        producer.start()
        producer.stopProducing()
        producer.resumeProducing()
        self.assertEqual(consumer.chunks, [])
        self.assertTrue(file.closed)


class RangeProducerTests(SynchronousTestCase):
    """The whole-file and single-range producer on a real file changed between pulls."""

    size = 3 * RangeProducer.buffer_size

    def setUp(self) -> None:
        self.path = os.path.join(temp_dir(self), "file")
        self.content = os.urandom(self.size)
        with open(self.path, "wb") as file:
            file.write(self.content)
        self.file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (the producer closes it)
        self.missing: list[int] = []
        self.consumer = Consumer()

    def producer(self, offset: int, size: int) -> RangeProducer:
        producer = RangeProducer(self.consumer, self.file, offset, size, self.missing.append)
        producer.start()
        return producer

    def test_exactly_the_range_in_buffer_sized_chunks(self) -> None:
        self.producer(10, self.size - 20)
        self.assertEqual(self.consumer.pull(), self.content[10:-10])
        self.assertTrue(self.consumer.finished)
        self.assertTrue(all(len(chunk) <= RangeProducer.buffer_size for chunk in self.consumer.chunks))
        self.assertTrue(self.file.closed)

    def test_cut_short_between_pulls(self) -> None:
        producer = self.producer(0, self.size)
        producer.resumeProducing()
        os.truncate(self.path, 100)
        self.assertEqual(self.consumer.pull(), self.content[: RangeProducer.buffer_size])
        self.assertEqual((self.consumer.finished, self.consumer.lost), (False, True))
        self.assertEqual(self.missing, [self.size - RangeProducer.buffer_size])
        self.assertTrue(self.file.closed)

    def test_grown_between_pulls(self) -> None:
        producer = self.producer(0, self.size)
        producer.resumeProducing()
        with open(self.path, "ab") as file:
            file.write(b"appended")
        self.assertEqual(self.consumer.pull(), self.content)
        self.assertEqual((self.consumer.finished, self.missing), (True, []))

    def test_stopped_when_the_client_goes(self) -> None:
        producer = self.producer(0, self.size)
        producer.resumeProducing()
        producer.stopProducing()
        producer.resumeProducing()
        self.assertEqual(len(self.consumer.chunks), 1)
        self.assertTrue(self.file.closed)


class FolderCheckTests(SynchronousTestCase):
    def test_root_must_be_a_folder(self) -> None:
        top = temp_dir(self)
        self.assertEqual(checks.optional_folder(""), "")
        self.assertEqual(checks.optional_folder(f" {top} "), top)
        with self.assertRaises(ValueError) as raised:
            checks.optional_folder(os.path.join(top, "nope"))
        self.assertIn("no such folder", str(raised.exception))
        path = os.path.join(top, "file")
        with open(path, "w"):
            pass
        self.assertRaises(ValueError, checks.optional_folder, path)


class ValidatorTests(SynchronousTestCase):
    """ETag, If-None-Match, If-Modified-Since and If-Range, from the served descriptor's fstat."""

    # 2026-11-22 02:58:51.7 UTC: a fraction of a second that rounding up would show.
    seconds = 1795316331
    nanoseconds = seconds * 1_000_000_000 + 700_000_000

    def setUp(self) -> None:
        self.top = make_tree(self)
        self.path = os.path.join(self.top, "root", "a.txt")
        os.utime(self.path, ns=(self.nanoseconds, self.nanoseconds))
        self.http = Harness(self, root=os.path.join(self.top, "root"))
        info = os.stat(self.path)
        self.etag = b'"%x-%x-%x"' % (info.st_ino, info.st_size, info.st_mtime_ns)
        self.date = datetimeToString(self.seconds).decode()

    def get(self, headers: str, method: str = "GET") -> Any:
        return self.http.get("/files/a.txt", method=method, headers=headers)

    def test_strong_etag_and_last_modified_to_the_second(self) -> None:
        # Regression: no ETag, and Last-Modified rounded up to the next second.
        response = self.get("")
        self.assertEqual(response.header(b"etag"), self.etag)
        self.assertEqual(response.header(b"last-modified"), self.date.encode())

    def test_if_modified_since_the_files_own_second_is_304(self) -> None:
        # Regression: `curl -z FILE` sends the file's mtime in seconds, which
        # was one second before the rounded-up Last-Modified: never a 304.
        for method in ("GET", "HEAD"):
            response = self.get(f"If-Modified-Since: {self.date}\r\n", method)
            self.assertEqual((response.status, response.body), (304, b""), method)
        earlier = datetimeToString(self.seconds - 1).decode()
        self.assertEqual(self.get(f"If-Modified-Since: {earlier}\r\n").status, 200)
        self.assertEqual(self.get("If-Modified-Since: not a date\r\n").status, 200)

    def test_304_has_no_content_length(self) -> None:
        # Regression: it said Content-Length: 0, the length of no representation.
        connection = self.http.connect()
        connection.send(
            f"GET /files/a.txt HTTP/1.1\r\nHost: x\r\nIf-None-Match: {self.etag.decode()}\r\n\r\n".encode()
        )
        head = connection.received()
        self.assertTrue(head.startswith(b"HTTP/1.1 304 "), head)
        self.assertNotIn(b"content-length", head.lower())
        self.assertIn(b"ETag: " + self.etag, head)
        self.assertFalse(connection.closed)  # and the connection goes on
        (after,) = connection.request("/files/a.txt")
        self.assertEqual((after.status, after.body), (200, b"hello\n"))

    def test_if_none_match(self) -> None:
        # Regression: If-None-Match was ignored.
        tag = self.etag.decode()
        for value in (tag, f'"other", {tag}', f"W/{tag}", "*"):
            response = self.get(f"If-None-Match: {value}\r\n")
            self.assertEqual((response.status, response.body), (304, b""), value)
        for value in ('"other"', tag.replace('"', ""), f'"{tag}"'):
            self.assertEqual(self.get(f"If-None-Match: {value}\r\n").status, 200, value)

    def test_if_none_match_outranks_if_modified_since(self) -> None:
        # RFC 9110 sec. 13.2.2: If-Modified-Since only without If-None-Match.
        response = self.get(f'If-None-Match: "other"\r\nIf-Modified-Since: {self.date}\r\n')
        self.assertEqual((response.status, response.body), (200, b"hello\n"))

    def test_if_range(self) -> None:
        # Regression: If-Range was ignored, so a resumed download of a changed
        # file got a piece of the new one spliced onto the old.
        tag = self.etag.decode()
        for value in (tag, self.date):
            response = self.get(f"Range: bytes=1-3\r\nIf-Range: {value}\r\n")
            self.assertEqual((response.status, response.body), (206, b"ell"), value)
        earlier = datetimeToString(self.seconds - 1).decode()
        for value in ('"other"', f"W/{tag}", earlier, "not a date"):
            response = self.get(f"Range: bytes=1-3\r\nIf-Range: {value}\r\n")
            self.assertEqual((response.status, response.body), (200, b"hello\n"), value)
            self.assertIsNone(response.header(b"content-range"), value)

    def test_a_date_under_a_second_old_is_no_validator(self) -> None:
        # Regression (review): a file rewritten twice within one second keeps
        # its Last-Modified, so If-Range with that date spliced a range of the
        # new file onto the old. RFC 9110 sec. 8.8.2.2: a date is strong only
        # once the file is a second old. If-Modified-Since compares seconds at
        # any age (as nginx and Apache do): a 304 keeps a whole, older copy.
        for age, ranged in ((0, 200), (999_999_999, 200), (1_000_000_000, 206)):
            self.patch(http_files, "now_ns", lambda age=age: self.nanoseconds + age)
            response = self.get(f"Range: bytes=1-3\r\nIf-Range: {self.date}\r\n")
            self.assertEqual(response.status, ranged, age)
            self.assertEqual(response.body, b"ell" if ranged == 206 else b"hello\n", age)
            self.assertEqual(self.get(f"If-Modified-Since: {self.date}\r\n").status, 304, age)
            # the ETag is a validator at any age
            tag = self.etag.decode()
            self.assertEqual(self.get(f"Range: bytes=1-3\r\nIf-Range: {tag}\r\n").status, 206, age)
            self.assertEqual(self.get(f"If-None-Match: {tag}\r\n").status, 304, age)

    def test_a_changed_file_gets_another_etag(self) -> None:
        with open(self.path, "ab") as file:
            file.write(b"more\n")
        response = self.get(f"If-None-Match: {self.etag.decode()}\r\n")
        self.assertEqual((response.status, response.body), (200, b"hello\nmore\n"))
        self.assertNotEqual(response.header(b"etag"), self.etag)


class ChangingFileTests(SynchronousTestCase):
    """A file that changes between the response's head and its body, over the real site.

    The body is pulled on the Clock a step at a time: twisted.web's
    single-range producer, asked for more of a file cut short, never ends,
    and would keep a step running for ever.
    """

    def setUp(self) -> None:
        self.top = make_tree(self)
        self.path = os.path.join(self.top, "root", "big.bin")
        self.content = os.urandom(5 * MultipartProducer.buffer_size + 7)
        with open(self.path, "wb") as file:
            file.write(self.content)
        self.http = Harness(self, root=os.path.join(self.top, "root"))
        cooperator = Cooperator(scheduler=lambda step: self.http.clock.callLater(0.01, step))
        self.patch(_producer_helpers, "cooperate", cooperator.cooperate)

    def start(self, headers: str = "") -> Any:
        """Send the request: its head is decided (Content-Length too); no body yet."""
        connection = self.http.connect()
        connection.protocol.dataReceived(f"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        return connection

    def pump(self, connection: Any) -> None:
        """A second of the Clock in steps: enough for the body, and bounded if it never ends."""
        for _ in range(100):
            self.http.clock.advance(0.01)
            if connection.closed:
                return

    def test_a_file_cut_short_closes_the_connection(self) -> None:
        # Regression: a Range request spun at 100% CPU until restart; the
        # whole file left the connection open with a short body.
        for headers, offset in (("", 0), ("Range: bytes=100-\r\n", 100), ("Range: bytes=10-99999\r\n", 10)):
            connection = self.start(headers)
            os.truncate(self.path, 50_000)
            with capturedLogs() as events:
                self.pump(connection)
            self.assertTrue(connection.closed, headers)
            head, _, body = connection.transport.value().partition(b"\r\n\r\n")
            promised = int(head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0])
            self.assertEqual(body, self.content[offset:50_000], headers)
            missing = promised - len(body)
            self.assertGreater(missing, 0)
            self.assertIn(f"http: big.bin ended {missing} bytes early; connection closed", messages(events))
            with open(self.path, "wb") as file:
                file.write(self.content)
        self.assertEqual(self.http.service_stats.counters["files_cut_short"], 3)

    def test_a_file_that_grows_sends_only_its_content_length(self) -> None:
        # Regression: the rest went out too, and a pipelining client read it
        # as the next response.
        connection = self.start()
        with open(self.path, "ab") as file:
            file.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
        connection.protocol.dataReceived(b"GET /files/a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        self.pump(connection)
        first, second = parse_responses(connection.transport.value())
        self.assertEqual((first.status, first.body), (200, self.content))
        self.assertEqual((second.status, second.body), (200, b"hello\n"))
        self.assertFalse(connection.closed)
        self.assertEqual(self.http.service_stats.counters["files_cut_short"], 0)

    def test_a_file_swapped_for_a_link_after_the_check_is_not_followed(self) -> None:
        # Regression (check-then-open): the path was checked, then opened
        # again by name, so a symlink swapped in between was followed.
        secret = os.path.join(self.top, "outside", "secret.txt")
        checked = SafeFile.servable

        def swap_after_check(resource: SafeFile, path: str) -> bool:
            answer = checked(resource, path)
            if path.endswith("a.txt") and not os.path.islink(path):
                os.unlink(path)
                os.symlink(secret, path)
            return answer

        self.patch(SafeFile, "servable", swap_after_check)
        response = self.http.get("/files/a.txt")
        self.assertEqual((response.status, response.body), (404, b"not found\n"))

    def test_a_file_swapped_for_a_fifo_after_the_check_is_not_served(self) -> None:
        # The FIFO is held open for writing too, so twisted.web's open() of it
        # returned (without a writer it would block the test, as the reactor).
        path = os.path.join(self.top, "root", "a.txt")
        checked = SafeFile.servable
        writers: list[int] = []

        def swap_after_check(resource: SafeFile, child: str) -> bool:
            answer = checked(resource, child)
            if child == path and not writers:
                os.unlink(path)
                os.mkfifo(path)
                writers.append(os.open(path, os.O_RDWR | os.O_NONBLOCK))
                self.addCleanup(os.close, writers[0])
            return answer

        self.patch(SafeFile, "servable", swap_after_check)
        response = self.http.get("/files/a.txt")
        self.assertEqual((response.status, response.body), (404, b"not found\n"))
