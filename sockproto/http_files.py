"""Static files for the HTTP responder: twisted.web's ``static.File``, kept inside one folder.

``static.File`` refuses ``..`` and encoded slashes in a path segment, but it
follows symbolic links wherever they point, serves dotfiles, lists every
folder, opens FIFOs and devices (which can block the reactor), and answers a
path segment or a ``Range`` header that is not UTF-8 with a logged traceback.
Its Range support lets a small request cost a huge response (overlapping
ranges, as in Apache's CVE-2011-3192) and fails on a suffix longer than the
file, on several ranges none of which fits, and whenever a part boundary
fills its buffer. Its producers trust the file not to change while it is
sent: one cut short spins for ever, one that grows overruns its
Content-Length (the client reads the rest as the next response). It checks a
path, then opens it again (a symlink or FIFO swapped in between is followed),
rounds Last-Modified up (``curl -z`` never gets its 304), sends no ETag and
ignores ``If-None-Match`` and ``If-Range``. :class:`SafeFile` closes each of
these in one place: a file is opened once through :class:`sockproto.files.Tree`
and everything is taken from that descriptor. Range parsing, redirects and
content types are twisted.web's.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote

from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.http import datetimeToString, stringToDatetime
from zope.interface import implementer

from sockproto.files import RefusedPathError, Tree
from sockproto.limits import peer_of
from sockproto.text import loggable

with warnings.catch_warnings():
    # Importing twisted.web.static builds one of Twisted's own deprecated
    # error pages (Twisted 22.10 and later): a warning no user can act on.
    warnings.filterwarnings("ignore", r"twisted\.web\.resource\._Unsafe", DeprecationWarning)
    from twisted.web import static

log = Logger(namespace="sockproto")


class PlainPage(resource.Resource):
    """A fixed status with a short ``text/plain`` body, for every path below it.

    Like ``twisted.web.pages.errorPage`` but plain text: the callers are curl
    users and HTTP client tests, not browsers.
    """

    isLeaf = True

    def __init__(self, code: int, text: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.code = code
        self.body = text.encode("utf-8")
        self.headers = headers or {}

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(self.body))
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return b"" if request.method == b"HEAD" else self.body

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        return self


def method_not_allowed(allowed: tuple[bytes, ...]) -> PlainPage:
    """A plain 405 with the ``Allow`` header RFC 9110 asks for."""
    names = b", ".join(allowed)
    return PlainPage(405, f"method not allowed; use {names.decode()}\n", {b"allow": names})


NOT_FOUND = PlainPage(404, "not found\n")
FILES_OFF = PlainPage(404, "not found: static files are off (start sockproto with --http-root DIR)\n")
LISTING_OFF = PlainPage(403, "forbidden: folder listings are off (start sockproto with --http-listing)\n")
FORBIDDEN = PlainPage(403, "forbidden\n")
# The server, not the path, failed (out of descriptors or memory): a 404 would
# be cached by proxies, and the file is there; try again in a second.
UNAVAILABLE = PlainPage(503, "service unavailable: try again shortly\n", {b"retry-after": b"1"})

# The errors that mean the path names nothing served: 404. Any other OSError
# (EMFILE, ENFILE, ENOMEM, EIO...) is the server's trouble, not the path's.
ABSENT = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG))


def is_absent(error: OSError) -> bool:
    """Whether opening a path failed because it names nothing that is served."""
    return isinstance(error, RefusedPathError) or error.errno in ABSENT


def failure_page(error: OSError, request: Any, path: str) -> resource.Resource:
    """The answer to a path that could not be opened: 404 when nothing is
    there, 403 when it may not be read, else 503 with one log line (with the
    peer, so the log filter budgets a flood of them)."""
    if is_absent(error):
        return NOT_FOUND
    if isinstance(error, PermissionError):
        return FORBIDDEN
    log.warn(
        "http: 503 to {peer}: {path} could not be opened: {error}",
        peer=peer_of(getattr(getattr(request, "channel", None), "transport", None)),
        path=loggable(path),
        error=os.strerror(error.errno) if error.errno else type(error).__name__,
    )
    return UNAVAILABLE


def is_hidden(name: bytes) -> bool:
    """Dotfiles, ``.`` and ``..`` (in any encoding: segments arrive decoded)."""
    return name.startswith(b".")


def is_utf8(name: str) -> bool:
    """Whether a name from the file system was valid UTF-8 (Python decodes the
    bytes of one that is not to lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def with_charset(types: Mapping[str, str]) -> dict[str, str]:
    """The content-type map with ``; charset=utf-8`` on every ``text/`` type.

    Without it, clients guess: requests and browsers read a UTF-8 ``.txt``
    as Latin-1 (``cafÃ©``). Always, not only for files that are valid UTF-8:
    that would mean reading a whole file before its first byte is sent (and
    for HEAD, Range and 304 answers), and UTF-8 is what text files are now;
    as nginx's ``charset utf-8``.
    """
    return {
        ext: f"{kind}; charset=utf-8" if kind.startswith("text/") else kind for ext, kind in types.items()
    }


CONTENT_TYPES = with_charset(static.File.contentTypes)


class Listing(static.DirectoryLister):
    """twisted.web's folder listing; a path below it is not found (in plain text).

    Its rows are ``(name, stat)`` pairs from :meth:`SafeFile.listed`: what a
    request for each name would reach, as checked then (twisted.web's lister
    stats each name again, by a path that follows links).
    """

    def render(self, request: Any) -> bytes:
        # For HEAD too: twisted.web would log a warning for each HEAD that
        # renders a body.
        body: bytes = super().render(request)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        return NOT_FOUND

    def _getFilesAndDirectories(
        self, directory: Iterable[tuple[str, os.stat_result]]
    ) -> tuple[list[dict], list[dict]]:
        """twisted.web's rows, from the stat each name was checked with."""
        dirs: list[dict] = []
        files: list[dict] = []
        for name, info in directory:
            text, href = escape(name), quote(name)
            if stat.S_ISDIR(info.st_mode):
                dirs.append(
                    {
                        "text": text + "/",
                        "href": href + "/",
                        "size": "",
                        "type": "[Directory]",
                        "encoding": "",
                    }
                )
                continue
            kind, encoding = static.getTypeAndEncoding(
                name, self.contentTypes, self.contentEncodings, self.defaultType
            )
            files.append(
                {
                    "text": text,
                    "href": href,
                    "size": static.formatFileSize(info.st_size),
                    "type": f"[{escape(kind)}]",
                    "encoding": f"[{encoding}]" if encoding else "",
                }
            )
        return dirs, files


# The most parts a multipart/byteranges answer has (Apache's MaxRanges after
# CVE-2011-3192 defaults to 200; clients ask for one or a few).
MAX_RANGES = 100


@implementer(IPullProducer)
class PulledBody:
    """A response body written a chunk each time the connection asks for more
    (as static.File's producers are), so a slow client holds one chunk, not
    the whole body. Subclasses write in :meth:`produce` and call :meth:`end`."""

    def __init__(self, request: Any) -> None:
        self.request: Any = request

    def start(self) -> None:
        self.request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        request = self.request
        if request is not None:  # None: done, or the connection is gone
            self.produce(request)

    def produce(self, request: Any) -> None:
        raise NotImplementedError

    def end(self, request: Any, last: bytes = b"", whole: bool = True) -> None:
        """Write ``last`` and finish the response; not ``whole`` (less than its
        Content-Length said): only a close tells the client."""
        self.stopProducing()
        if last:
            request.write(last)
        request.unregisterProducer()
        if whole:
            request.finish()
        else:
            request.loseConnection()

    def stopProducing(self) -> None:
        self.request = None


class FileProducer(PulledBody):
    """Bytes of an open file, exactly as many as the response's Content-Length
    promised: a file that grows while it is sent gives only those, and one that
    ends early (truncated under us, as ``copytruncate`` log rotation does) ends
    the response with a close, reported to ``cut_short`` with the bytes missing.
    Either way the producer finishes: nothing keeps asking an empty file."""

    buffer_size = static.StaticProducer.bufferSize

    def __init__(self, request: Any, file: Any, cut_short: Callable[[int], None] | None = None) -> None:
        super().__init__(request)
        self.file = file
        self.cut_short = cut_short

    def ended_early(self, request: Any, last: bytes, missing: int) -> None:
        self.end(request, last, whole=False)
        if self.cut_short is not None:
            self.cut_short(missing)

    def stopProducing(self) -> None:
        super().stopProducing()
        self.file.close()


class RangeProducer(FileProducer):
    """``size`` bytes from ``offset``: the whole file (200) or one range (206).

    It stands in for ``static.NoRangeStaticProducer``, which sends whatever
    the file has by the time it is read (more than its Content-Length if it
    grew), and ``static.SingleRangeStaticProducer``, which asks a file cut
    short for more for ever (100% CPU, even after the client has gone).
    """

    def __init__(
        self, request: Any, file: Any, offset: int, size: int, cut_short: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(request, file, cut_short)
        self.offset = offset
        self.remaining = size

    def start(self) -> None:
        if self.offset:
            self.file.seek(self.offset)
        super().start()

    def produce(self, request: Any) -> None:
        if not self.remaining:
            self.end(request)
            return
        chunk = self.file.read(min(self.buffer_size, self.remaining))
        if not chunk:
            self.ended_early(request, b"", self.remaining)
            return
        self.remaining -= len(chunk)
        if self.remaining:
            request.write(chunk)
        else:
            self.end(request, chunk)


class MultipartProducer(FileProducer):
    """A multipart/byteranges body, a buffer at a pull: each part's boundary, then its bytes.

    It stands in for ``static.MultipleRangeStaticProducer``, which asks the
    file for a negative number of bytes when a boundary fills its buffer (a
    traceback, and the response never ends), fails when no range fits the
    file, and spins for ever on a file cut short while it is sent.
    """

    def __init__(
        self,
        request: Any,
        file: Any,
        parts: Iterable[tuple[bytes, int, int]],
        cut_short: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(request, file, cut_short)
        self.parts = iter(parts)  # (boundary, offset, size), as static.File makes them
        self.remaining = 0  # bytes of the current part still to send

    def produce(self, request: Any) -> None:
        out: list[bytes] = []
        room = self.buffer_size
        while room > 0:
            if not self.remaining:
                part = next(self.parts, None)
                if part is None:
                    self.end(request, b"".join(out))
                    return
                boundary, offset, self.remaining = part
                self.file.seek(offset)
                out.append(boundary)
                room -= len(boundary)
                continue
            chunk = self.file.read(min(room, self.remaining))
            if not chunk:  # the file shrank under us
                missing = self.remaining + sum(len(boundary) + size for boundary, _, size in self.parts)
                self.ended_early(request, b"".join(out), missing)
                return
            out.append(chunk)
            room -= len(chunk)
            self.remaining -= len(chunk)
        request.write(b"".join(out))


def entity_tag(info: os.stat_result) -> bytes:
    """A strong ETag: the file's identity, size and mtime (to the nanosecond)
    from the fstat of the descriptor that is sent, so a file replaced, grown or
    rewritten gets another."""
    return b'"%x-%x-%x"' % (info.st_ino, info.st_size, info.st_mtime_ns)


def http_date(value: bytes) -> int | None:
    """An HTTP-date as whole seconds since the epoch; None if it is not one."""
    try:
        return int(stringToDatetime(value.split(b";", 1)[0].strip()))
    except (ValueError, IndexError, OverflowError):  # twisted.web raises each for some garbage
        return None


# The wall clock a file's mtime is compared with (a module attribute: tests set it).
now_ns: Callable[[], int] = time.time_ns


def strong_date(info: os.stat_result, now: int) -> int | None:
    """The file's Last-Modified in seconds if it is a strong validator, else None.

    RFC 9110 sec. 8.8.2.2: a date is strong only if the file was last changed
    at least a second before now (the response's Date): a file rewritten twice
    within one second keeps its date, so a date that young may stand for
    either version, and a range of one must not be spliced onto the other.
    """
    if now - info.st_mtime_ns < 1_000_000_000:
        return None
    return info.st_mtime_ns // 1_000_000_000


def _opaque(tag: bytes) -> bytes:
    return tag[2:] if tag.startswith(b"W/") else tag


def not_modified(request: Any, etag: bytes, modified: int) -> bool:
    """Whether a GET or HEAD gets 304 (RFC 9110 sec. 13.2.2): If-None-Match,
    compared weakly, and only without it If-Modified-Since, at the one-second
    resolution of HTTP dates, at any age of the file (as nginx and Apache: a
    weak comparison, and a 304 keeps a whole copy, never a spliced one)."""
    if request.method not in (b"GET", b"HEAD"):
        return False
    none_match = request.getHeader(b"if-none-match")
    if none_match is not None:
        tags = [tag.strip() for tag in none_match.split(b",")]
        return b"*" in tags or any(_opaque(tag) == etag for tag in tags)
    since = request.getHeader(b"if-modified-since")
    when = http_date(since) if since is not None else None
    return when is not None and modified <= when


def range_still_fits(request: Any, etag: bytes, modified: int | None) -> bool:
    """``If-Range`` (RFC 9110 sec. 13.1.5): a Range is for the file the client
    has part of, named by its ETag (compared strongly: a weak tag never matches)
    or its exact Last-Modified date while that is a strong validator (see
    :func:`strong_date`). If the file changed, the whole file is the
    answer, not a piece of the new one spliced onto the old."""
    header = request.getHeader(b"if-range")
    if header is None:
        return True
    header = header.strip()
    if header.startswith((b'"', b"W/")):
        return header == etag
    return modified is not None and http_date(header) == modified


class SafeFile(static.File):
    """A file or folder under ``root`` (a real path: no symlinks in it).

    Paths are resolved by ``tree`` (:class:`sockproto.files.Tree`), and a file
    is served from the one descriptor it opens: its size, type check and
    validators come from that descriptor's fstat, never from the path again.
    """

    childNotFound = NOT_FOUND
    forbidden = FORBIDDEN
    contentTypes = CONTENT_TYPES
    # Only real index pages: twisted.web's list adds "index" and "index.rpy".
    indexNames = ["index.html", "index.htm"]
    methods = (b"GET", b"HEAD")

    def __init__(self, path: str, root: str, listing: bool = False, tree: Tree | None = None) -> None:
        # Unknown types as octet-stream, not twisted.web's text/html: a file
        # is never rendered as a page because it lacks an extension.
        super().__init__(path, defaultType="application/octet-stream")
        self.root = root
        self.listing = listing
        self.tree = tree or Tree(root)
        self.size = 0  # of the file being rendered, from its descriptor's fstat

    @classmethod
    def serving(cls, folder: str, listing: bool = False) -> SafeFile:
        """The top of the tree: ``folder`` with its symlinks resolved once."""
        root = os.path.realpath(folder)
        return cls(root, root, listing)

    def servable(self, path: str) -> bool:
        """A regular file or a folder that :class:`Tree` reaches inside the root:
        no link out of it, nothing hidden on the way, not a FIFO, socket or device.

        Raises any other OSError (the server out of descriptors: EMFILE): that
        is no answer about the path, and must not become a 404."""
        try:
            self.tree.stat(self.tree.relative(path))
        except OSError as error:
            if is_absent(error):
                return False
            raise
        return True

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        if is_hidden(path) or b"\0" in path:
            return self.childNotFound
        if not path and request.postpath:
            # An empty segment inside the path (/files//etc/passwd): an
            # absolute path, not the folder's index or listing.
            return self.childNotFound
        try:
            path.decode("utf-8")
        except UnicodeDecodeError:
            # static.File would log this client mistake with a traceback.
            return self.childNotFound
        try:
            child = super().getChild(path, request)  # a folder's listing checks its names
            if isinstance(child, static.File) and not self.servable(child.path):
                return self.childNotFound
        except OSError as error:
            return failure_page(
                error, request, self.tree.relative(os.path.join(self.path, os.fsdecode(path)))
            )
        return child

    def getFileSize(self) -> int:
        return self.size

    def render(self, request: Any) -> Any:
        # static.File would answer other methods with twisted.web's HTML
        # "405" or "501 Huh?" page (deprecated, and a warning on each).
        if request.method not in self.methods:
            return method_not_allowed(self.methods).render(request)
        try:
            file, info = self.tree.open_file(self.tree.relative(self.path))
        except IsADirectoryError:
            return self.redirect(request)
        except OSError as error:  # gone, swapped since getChild, or no descriptor left
            return failure_page(error, request, self.tree.relative(self.path)).render(request)
        self.size = info.st_size
        if self.type is None:
            self.type, self.encoding = static.getTypeAndEncoding(
                self.basename(), self.contentTypes, self.contentEncodings, self.defaultType
            )
        etag = entity_tag(info)
        modified = info.st_mtime_ns // 1_000_000_000  # truncated, as the file's own seconds
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", etag)
        request.setHeader(b"last-modified", datetimeToString(modified))
        if not_modified(request, etag, modified):
            file.close()
            # Finished here: a body returned, even b"", would get Content-Length: 0.
            request.setResponseCode(304)
            request.finish()
            return server.NOT_DONE_YET
        if request.method == b"HEAD":
            self._setContentHeaders(request)
            file.close()
            return b""
        if not range_still_fits(request, etag, strong_date(info, now_ns())):
            request.requestHeaders.removeHeader(b"range")
        self.makeProducer(request, file).start()
        return server.NOT_DONE_YET

    def makeProducer(self, request: Any, fileForReading: Any) -> FileProducer:
        def cut_short(missing: int) -> None:
            self.ended_early(request, missing)

        byte_range = request.getHeader(b"range")
        ranges = self.ranges(byte_range) if byte_range is not None else None
        if ranges is None:
            self._setContentHeaders(request)
            request.setResponseCode(200)
            return RangeProducer(request, fileForReading, 0, self.size, cut_short)
        if len(ranges) == 1:
            offset, size = self._doSingleRangeRequest(request, ranges[0])
            self._setContentHeaders(request, size)
            return RangeProducer(request, fileForReading, offset, size, cut_short)
        info = self._doMultipleRangeRequest(request, ranges)
        # rangeInfo is ([], b"") when no range fits: a 416, set already.
        parts = info if isinstance(info, list) else []
        return MultipartProducer(request, fileForReading, parts, cut_short)

    def ended_early(self, request: Any, missing: int) -> None:
        """A file cut short while sent: one log line, one count in ``/status``."""
        log.info(
            "http: {path} ended {missing} bytes early; connection closed",
            path=loggable(self.tree.relative(self.path)),
            missing=missing,
        )
        stats = getattr(getattr(request, "site", None), "service_stats", None)
        if stats is not None:  # the suite's ResponderSite
            stats.counters["files_cut_short"] += 1

    def ranges(self, header: bytes) -> list[tuple[int | None, int | None]] | None:
        """The ranges to answer, or None for the whole file with a 200, as RFC
        9110 allows.

        None when the header is malformed, or not ASCII (static.File decodes
        it as UTF-8 to log it, and fails). None for more than
        :data:`MAX_RANGES` parts, or parts adding up to more than the file
        (nginx's rule): overlapping ranges would make a request of a few KB
        cost gigabytes.
        """
        if not header.isascii():
            return None
        try:
            ranges: list[tuple[int | None, int | None]] = self._parseRangeHeader(header)
        except ValueError:
            return None
        if len(ranges) > MAX_RANGES:
            return None
        if sum(self._rangeToOffsetAndSize(start, end)[1] for start, end in ranges) > self.size:
            return None
        return ranges

    def _rangeToOffsetAndSize(self, start: int | None, end: int | None) -> tuple[int, int]:
        # static.File turns a suffix longer than the file (bytes=-1000 of a
        # 6-byte file) into a negative offset: a traceback. RFC 9110: the
        # whole file is the answer.
        if start is None and end is not None and end > self.size:
            start, end = 0, None
        return super()._rangeToOffsetAndSize(start, end)

    def directoryListing(self) -> resource.Resource:
        if not self.listing:
            return LISTING_OFF
        return Listing(self.path, self.listed(), self.contentTypes, self.contentEncodings, self.defaultType)

    def listNames(self) -> list[str]:
        return [name for name, _ in self.listed()]

    def listed(self) -> list[tuple[str, os.stat_result]]:
        """What a listing shows, with what :class:`Tree` found for each name:
        only what a request for it would serve. A name that is not UTF-8 is
        left out (a request cannot name it: :meth:`getChild` answers 404).

        Raises what is no answer about a name (EMFILE), as :meth:`servable`."""
        shown = []
        for name in super().listNames():
            if name.startswith(".") or not is_utf8(name):
                continue
            try:
                info = self.tree.stat(self.tree.relative(os.path.join(self.path, name)))
            except OSError as error:
                if is_absent(error) or isinstance(error, PermissionError):
                    continue  # one name out of reach is left out, not the listing refused
                raise
            shown.append((name, info))
        return shown

    def createSimilarFile(self, path: str) -> SafeFile:
        return SafeFile(path, self.root, self.listing, self.tree)
