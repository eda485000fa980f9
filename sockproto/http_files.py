"""Static files for the HTTP responder: twisted.web's ``static.File``, kept inside one folder.

``static.File`` refuses ``..`` and encoded slashes in a path segment, but it
follows symbolic links wherever they point, serves dotfiles, lists every
folder, opens FIFOs and devices (which can block the reactor), and answers a
path segment or a ``Range`` header that is not UTF-8 with a logged traceback.
:class:`SafeFile` closes each of these in one place; everything else (Range, HEAD,
``Last-Modified``/``If-Modified-Since``, content types) is twisted.web's.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from twisted.web import resource

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


class Listing(static.DirectoryLister):
    """twisted.web's folder listing; a path below it is not found (in plain text)."""

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        return NOT_FOUND


class SafeFile(static.File):
    """A file or folder under ``root`` (a real path: no symlinks in it)."""

    childNotFound = NOT_FOUND
    forbidden = PlainPage(403, "forbidden\n")
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
        # static.File logs a malformed Range header by decoding it as UTF-8,
        # which fails (a traceback and a 500) on other bytes. A Range header
        # is ASCII or malformed, and a malformed one is ignored (RFC 9110).
        byte_range = request.getHeader(b"range")
        if byte_range is not None and not byte_range.isascii():
            request.requestHeaders.removeHeader(b"range")
        return super().makeProducer(request, fileForReading)

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
