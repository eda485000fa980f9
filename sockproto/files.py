"""The one safe way to open a file under a folder: HTTP's served root and a POP3 Maildir.

Checking a path and then opening it is a race: between the two, a local
writer can swap the file for a symbolic link to anything readable, or for a
FIFO whose ``open()`` blocks the whole reactor. :class:`Tree` instead walks
the path a component at a time from a descriptor of the folder, opening each
with ``O_NOFOLLOW`` (``O_PATH`` where Linux has it, so nothing is really
opened on the way), and resolves a symbolic link itself: only while its target
stays beneath the folder, at most :data:`MAX_HOPS` of them. The file is opened
with ``O_NONBLOCK``, and what it is (a regular file, nothing else) is decided
on ``fstat`` of that one descriptor, which is then the only thing read.

This is ``openat2(RESOLVE_BENEATH)`` done by hand: Python has no wrapper for
it, and the walk works on every kernel.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO, NamedTuple

# Symbolic links resolved in one path at most (Linux's own MAXSYMLINKS).
MAX_HOPS = 40

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_PATH = getattr(os, "O_PATH", 0)
# A component on the way: only looked at (O_PATH), never followed. Without
# O_PATH it is opened for reading, but never blocks (O_NONBLOCK) and never
# becomes a controlling terminal.
_PROBE = (_PATH or os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)) | _NOFOLLOW | _CLOEXEC
_READ = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _NOFOLLOW | _CLOEXEC
_FOLDER = (_PATH or os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC


class RefusedPathError(OSError):
    """The path exists but is not served: it leaves the folder, is hidden, or is
    not a regular file (a FIFO, a socket, a device)."""


class Opened(NamedTuple):
    """A descriptor and its ``fstat``: everything about the file comes from these."""

    fd: int
    stat: os.stat_result

    def file(self) -> BinaryIO:
        """The descriptor as an unbuffered binary file (closing it closes the descriptor)."""
        return open(self.fd, "rb", buffering=0)


class Tree:
    """A folder whose files are opened only beneath it.

    ``follow_symlinks``: resolve symbolic links that stay inside (the HTTP
    root), or refuse every one (a Maildir holds none). ``hide_dotfiles``:
    refuse any path whose resolution passes through a name starting with a
    dot, so ``dotenv -> .env`` or ``repo -> .git`` are refused too.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, follow_symlinks: bool = True, hide_dotfiles: bool = True
    ):
        self.folder = os.fspath(root)  # as given: paths listed in it start so
        self.root = os.path.realpath(root)
        self.follow_symlinks = follow_symlinks
        self.hide_dotfiles = hide_dotfiles

    def open(self, path: str) -> Opened:
        """``path`` (relative to the root) opened for reading: a regular file only."""
        return self._resolve(path, folder_ok=False)

    def open_file(self, path: str) -> tuple[BinaryIO, os.stat_result]:
        """:meth:`open` as a file object, with its ``fstat``."""
        opened = self.open(path)
        return opened.file(), opened.stat

    def stat(self, path: str) -> os.stat_result:
        """What :meth:`open` would find (a regular file, or a folder here), without reading it."""
        opened = self._resolve(path, folder_ok=True, read=False)
        os.close(opened.fd)
        return opened.stat

    def open_folder(self, path: str) -> int:
        """A readable descriptor of the folder at ``path`` (relative to the root;
        ``""`` is the root), found as :meth:`open` finds a file: for listing it
        with ``os.scandir(fd)`` and changing it with ``dir_fd=``, so a folder
        swapped for a link after this call is not followed either. The caller
        closes it."""
        opened = self._resolve(path, folder_ok=True, read=False)
        try:
            if not stat.S_ISDIR(opened.stat.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", path)
            # "." of the descriptor found: readable (an O_PATH one is not), the same folder.
            return os.open(".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC, dir_fd=opened.fd)
        finally:
            os.close(opened.fd)

    def relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` (under the folder as given, as twisted.web or a listing makes
        it) relative to the folder, for :meth:`open`."""
        return os.path.relpath(path, self.folder)

    def _resolve(self, path: str, *, folder_ok: bool, read: bool = True) -> Opened:
        pending = _components(path)
        hops = 0
        folders = [os.open(self.root, _FOLDER)]  # the folders walked, the root first
        try:
            while pending:
                name = pending.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(folders) == 1:
                        raise RefusedPathError(errno.EACCES, "leaves the folder", path)
                    os.close(folders.pop())
                    continue
                if "\0" in name or (self.hide_dotfiles and name.startswith(".")):
                    raise RefusedPathError(errno.EACCES, "hidden or not a file name", path)
                fd, info = _probe(name, folders[-1])
                if stat.S_ISLNK(info.st_mode):
                    if fd >= 0:
                        os.close(fd)
                    hops += 1
                    pending[:0] = self._link_target(name, folders, hops, path)
                    continue
                if stat.S_ISDIR(info.st_mode) and (pending or folder_ok):
                    folders.append(fd)
                    continue
                if pending:
                    os.close(fd)
                    raise NotADirectoryError(errno.ENOTDIR, "not a folder", path)
                if stat.S_ISDIR(info.st_mode):
                    os.close(fd)
                    raise IsADirectoryError(errno.EISDIR, "a folder", path)
                if not stat.S_ISREG(info.st_mode):
                    os.close(fd)
                    raise RefusedPathError(errno.EACCES, "not a regular file", path)
                if not read or _PATH == 0:
                    return Opened(fd, info)
                os.close(fd)
                # Opened afresh for reading: O_NOFOLLOW and O_NONBLOCK again, and
                # the fstat of this descriptor decides (it may have been swapped).
                fd = os.open(name, _READ, dir_fd=folders[-1])
                try:
                    info = os.fstat(fd)
                    if not stat.S_ISREG(info.st_mode):
                        raise RefusedPathError(errno.EACCES, "not a regular file", path)
                except BaseException:
                    os.close(fd)
                    raise
                return Opened(fd, info)
            if not folder_ok:
                raise IsADirectoryError(errno.EISDIR, "a folder", path)
            fd = folders.pop()  # the folder reached (the root itself for "" or ".")
            return Opened(fd, os.fstat(fd))
        finally:
            for fd in folders:
                os.close(fd)

    def _link_target(self, name: str, folders: list[int], hops: int, path: str) -> list[str]:
        """The components a link at ``name`` (in ``folders[-1]``) stands for; an
        absolute target restarts the walk at the root (only if it points inside)."""
        if not self.follow_symlinks:
            raise RefusedPathError(errno.ELOOP, "a symbolic link", path)
        if hops > MAX_HOPS:
            raise RefusedPathError(errno.ELOOP, f"more than {MAX_HOPS} symbolic links", path)
        target = os.readlink(name, dir_fd=folders[-1])
        if not os.path.isabs(target):
            return _components(target)
        # Compared as text, not normalized: any ".." after the root's name is
        # walked like the rest, and refused if it climbs out.
        if target != self.root and not target.startswith(self.root.rstrip(os.sep) + os.sep):
            raise RefusedPathError(errno.EACCES, "a symbolic link out of the folder", path)
        while len(folders) > 1:
            os.close(folders.pop())
        return _components(target[len(self.root) :])


def _components(path: str) -> list[str]:
    return path.split(os.sep)


def _probe(name: str, folder: int) -> tuple[int, os.stat_result]:
    """One component, never followed: its descriptor (-1 for a link seen as
    ELOOP, where there is no O_PATH) and its fstat."""
    try:
        fd = os.open(name, _PROBE, dir_fd=folder)
    except OSError as error:
        if _PATH or error.errno not in (errno.ELOOP, errno.EMLINK):
            raise
        return -1, os.stat(name, dir_fd=folder, follow_symlinks=False)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
