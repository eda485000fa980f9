"""Static files for the HTTP responder: twisted.web's ``static.File``, kept inside one folder.

``static.File`` refuses ``..`` and encoded slashes in a path segment, but it
follows symbolic links wherever they point, serves dotfiles, lists every
folder, opens FIFOs and devices (which can block the reactor), and answers a
path segment or a ``Range`` header that is not UTF-8 with a logged traceback.
Its Range support lets a small request cost a huge response (overlapping
ranges, as in Apache's CVE-2011-3192) and fails on a suffix longer than the
file, on several ranges none of which fits, and whenever a part boundary
fills its buffer. :class:`SafeFile` closes each of these in one place;
everything else (Range, HEAD, ``Last-Modified``/``If-Modified-Since``,
content types) is twisted.web's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote

from twisted.internet.interfaces import IPullProducer
from twisted.web import resource
from zope.interface import implementer

with warnings.catch_warnings():
    # Importing twisted.web.static builds one of Twisted's own deprecated
    # error pages (Twisted 22.10 and later): a warning no user can act on.
    warnings.filterwarnings("ignore", r"twisted\.web\.resource\._Unsafe", DeprecationWarning)
    from twisted.web import static


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


def is_hidden(name: bytes) -> bool:
    """Dotfiles, ``.`` and ``..`` (in any encoding: segments arrive decoded)."""
    return name.startswith(b".")


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

    A name that is not UTF-8 (it reaches Python with surrogate escapes) is
    shown with U+FFFD for its bad bytes and linked with each byte %-encoded:
    twisted.web's lister fails on it with a traceback, a 500 for the whole
    folder on every request.
    """

    def render(self, request: Any) -> bytes:
        # For HEAD too: twisted.web would log a warning for each HEAD that
        # renders a body.
        body: bytes = super().render(request)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        return NOT_FOUND

    def _getFilesAndDirectories(self, directory: Iterable[str | bytes]) -> tuple[list[dict], list[dict]]:
        """twisted.web's rows, built from each name's bytes (see the class docstring)."""
        dirs: list[dict] = []
        files: list[dict] = []
        for name in directory:
            raw = name if isinstance(name, bytes) else os.fsencode(name)
            text = escape(raw.decode("utf-8", "replace"))
            href = quote(raw, "/")
            path = os.path.join(os.fsencode(self.path), raw)
            if os.path.isdir(path):
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
            try:
                size = os.path.getsize(path)
            except OSError:
                continue  # gone since the folder was read
            kind, encoding = static.getTypeAndEncoding(
                os.fsdecode(raw), self.contentTypes, self.contentEncodings, self.defaultType
            )
            files.append(
                {
                    "text": text,
                    "href": href,
                    "size": static.formatFileSize(size),
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


class MultipartProducer(PulledBody):
    """A multipart/byteranges body, a buffer at a pull: each part's boundary, then its bytes.

    It stands in for ``static.MultipleRangeStaticProducer``, which asks the
    file for a negative number of bytes when a boundary fills its buffer (a
    traceback, and the response never ends), fails when no range fits the
    file, and spins for ever on a file cut short while it is sent.
    """

    buffer_size = static.StaticProducer.bufferSize

    def __init__(self, request: Any, file: Any, parts: Iterable[tuple[bytes, int, int]]) -> None:
        super().__init__(request)
        self.file = file
        self.parts = iter(parts)  # (boundary, offset, size), as static.File makes them
        self.remaining = 0  # bytes of the current part still to send

    def produce(self, request: Any) -> None:
        out: list[bytes] = []
        room = self.buffer_size
        done = short = False
        while room > 0:
            if not self.remaining:
                part = next(self.parts, None)
                if part is None:
                    done = True
                    break
                boundary, offset, self.remaining = part
                self.file.seek(offset)
                out.append(boundary)
                room -= len(boundary)
                continue
            chunk = self.file.read(min(room, self.remaining))
            if not chunk:
                done = short = True  # the file shrank under us
                break
            out.append(chunk)
            room -= len(chunk)
            self.remaining -= len(chunk)
        if done:
            self.end(request, b"".join(out), whole=not short)  # short: the file shrank under us
        else:
            request.write(b"".join(out))

    def stopProducing(self) -> None:
        super().stopProducing()
        self.file.close()


class SafeFile(static.File):
    """A file or folder under ``root`` (a real path: no symlinks in it)."""

    childNotFound = NOT_FOUND
    forbidden = PlainPage(403, "forbidden\n")
    contentTypes = CONTENT_TYPES
    # Only real index pages: twisted.web's list adds "index" and "index.rpy".
    indexNames = ["index.html", "index.htm"]
    methods = (b"GET", b"HEAD")

    def __init__(self, path: str, root: str, listing: bool = False) -> None:
        # Unknown types as octet-stream, not twisted.web's text/html: a file
        # is never rendered as a page because it lacks an extension.
        super().__init__(path, defaultType="application/octet-stream")
        self.root = root
        self.listing = listing

    @classmethod
    def serving(cls, folder: str, listing: bool = False) -> SafeFile:
        """The top of the tree: ``folder`` with its symlinks resolved once."""
        root = os.path.realpath(folder)
        return cls(root, root, listing)

    def inside_root(self, path: str) -> bool:
        """Whether ``path``, with every symbolic link resolved, lies in the root."""
        real = os.path.realpath(path)
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def servable(self, path: str) -> bool:
        """A regular file or a folder inside the root; not a FIFO, socket or device."""
        return self.inside_root(path) and (os.path.isfile(path) or os.path.isdir(path))

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
        child = super().getChild(path, request)
        if isinstance(child, static.File) and not self.servable(child.path):
            return self.childNotFound
        return child

    def render(self, request: Any) -> Any:
        # static.File would answer other methods with twisted.web's HTML
        # "405" or "501 Huh?" page (deprecated, and a warning on each).
        if request.method not in self.methods:
            return method_not_allowed(self.methods).render(request)
        return super().render(request)

    def makeProducer(self, request: Any, fileForReading: Any) -> Any:
        byte_range = request.getHeader(b"range")
        if byte_range is not None and not self.honours_range(byte_range):
            request.requestHeaders.removeHeader(b"range")  # the whole file, once
        producer = super().makeProducer(request, fileForReading)
        if isinstance(producer, static.MultipleRangeStaticProducer):
            # rangeInfo is ([], b"") when no range fits: a 416, set already.
            parts = producer.rangeInfo if isinstance(producer.rangeInfo, list) else []
            return MultipartProducer(request, fileForReading, parts)
        return producer

    def honours_range(self, header: bytes) -> bool:
        """Whether to answer a Range header at all; if not, the whole file is sent
        with a 200, as RFC 9110 allows.

        Not when it is not ASCII: static.File decodes a malformed one as UTF-8
        to log it, and fails. Not for more than :data:`MAX_RANGES` parts, or
        parts adding up to more than the file (nginx's rule): overlapping
        ranges would make a request of a few KB cost gigabytes.
        """
        if not header.isascii():
            return False
        try:
            ranges = self._parseRangeHeader(header)
        except ValueError:
            return True  # malformed: static.File ignores it (and says so in the log)
        if len(ranges) > MAX_RANGES:
            return False
        return sum(self._rangeToOffsetAndSize(start, end)[1] for start, end in ranges) <= self.getFileSize()

    def _rangeToOffsetAndSize(self, start: int | None, end: int | None) -> tuple[int, int]:
        # static.File turns a suffix longer than the file (bytes=-1000 of a
        # 6-byte file) into a negative offset: a traceback. RFC 9110: the
        # whole file is the answer.
        if start is None and end is not None and end > self.getFileSize():
            start, end = 0, None
        return super()._rangeToOffsetAndSize(start, end)

    def directoryListing(self) -> resource.Resource:
        if not self.listing:
            return LISTING_OFF
        return Listing(
            self.path, self.listNames(), self.contentTypes, self.contentEncodings, self.defaultType
        )

    def listNames(self) -> list[str]:
        """What a listing shows: only what a request for it would serve."""
        return [
            name
            for name in super().listNames()
            if not name.startswith(".") and self.servable(os.path.join(self.path, name))
        ]

    def createSimilarFile(self, path: str) -> SafeFile:
        return SafeFile(path, self.root, self.listing)
