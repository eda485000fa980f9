"""Maildir mailboxes as a POP3 session sees them.

One Maildir per user at ``ROOT/USER/{cur,new,tmp}``. The root is the
operator's (a link to it is followed); beneath it nothing is: the user's
folder, its subfolders, the lock file and every message are reached by
:class:`sockproto.files.Tree` without following any symbolic link, and listed,
unlinked and renamed through descriptors of the folders found, so a user who
can write their own Maildir cannot point a listing, a DELE or the tmp/ sweep
at someone else's mail. A session takes the
mailbox lock, lists ``new/`` and ``cur/`` once (the POP3 maildrop is fixed for
the session), marks deletions in memory and removes files only on
:meth:`Maildrop.commit` (QUIT). Messages go on the wire as CRLF lines with
dot-stuffing, whatever their stored line ends, streamed a chunk at a time by
:class:`WireReader`; the sizes listed are the CRLF sizes a client receives.

These are fixes for twisted.mail.maildir, which on Python 3 cannot open a
mailbox by ``str`` path, moves a message to ``.Trash`` on DELE (mail lost when
the connection drops), counts deleted messages, and sizes messages by their LF
form.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from zope.interface import Interface, implementer

from sockproto.files import RefusedPathError, Tree

CHUNK = 64 * 1024
LOCK_NAME = "sockproto-pop3.lock"
SUBFOLDERS = ("cur", "new", "tmp")
# A file left in tmp/ this long is a delivery that died (SIGKILL, a crash):
# the Maildir rule (and Dovecot's) is to delete it when the mailbox is opened.
TMP_MAX_AGE = 36 * 3600.0
# A user name is a folder name under the Maildir root: nothing that could climb
# out of it, hide it or need quoting.
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,63}\Z")
# Maildir++ size tags in a unique name: S= the file size, W= the CRLF size.
_SIZE_TAGS = re.compile(r",S=(\d+)(?:,W=(\d+))?")


class MailboxInUseError(Exception):
    """Another session (in this process or another) holds the mailbox."""


def valid_user(name: str) -> bool:
    """Whether ``name`` is safe as a mailbox folder name."""
    return bool(_USER.match(name))


def unique_name(filename: str) -> str:
    """The Maildir unique name: the file name without the ``:2,FLAGS`` info."""
    return filename.split(":", 1)[0]


def uidl(unique: str) -> str:
    """A UIDL value for a unique name: itself when RFC 1939 allows it (1-70
    printable ASCII characters), else a digest of it. Both stay the same when
    the message moves from new/ to cur/ or its flags change."""
    if 0 < len(unique) <= 70 and all("!" <= c <= "~" for c in unique):
        return unique
    return hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def stale_delivery(info: os.stat_result, now: float) -> bool:
    """Whether a file in tmp/ is a delivery that died: its inode unchanged for
    TMP_MAX_AGE. By ctime, not mtime: a copy that keeps its times (``cp -p``,
    ``rsync -t``) has an old mtime while it is being written, but every write
    and the utime call itself set the ctime to now, and no program can set it back."""
    return info.st_ctime < now - TMP_MAX_AGE


class CrlfNormalizer:
    """LF or CRLF line ends to CRLF, correct wherever chunk boundaries fall.

    A CR at the end of a chunk is held back until the next chunk shows whether
    an LF follows it. ``at_line_start`` says whether the output so far ends a
    line; a message that does not is finished with CRLF on the wire.
    """

    __slots__ = ("_cr", "at_line_start")

    def __init__(self) -> None:
        self._cr = False
        self.at_line_start = True

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        data = data.replace(b"\n", b"\r\n")
        if data:
            self.at_line_start = data.endswith(b"\n")
        return data

    def end(self) -> bytes:
        """What is held back at the end of the input (a lone final CR)."""
        if not self._cr:
            return b""
        self._cr = False
        self.at_line_start = False
        return b"\r"


def wire_size(file: BinaryIO, chunk: int = CHUNK) -> int:
    """Octets of a message in CRLF form, as a client counts them after RETR
    (including the CRLF that ends an unterminated last line; no dot-stuffing)."""
    normalizer = CrlfNormalizer()
    total = 0
    while block := file.read(chunk):
        total += len(normalizer.feed(block))
    total += len(normalizer.end())
    return total + (0 if normalizer.at_line_start else 2)


class WireReader:
    """A message as the lines after ``+OK`` of RETR or TOP: CRLF line ends,
    dot-stuffed, ending with ``.CRLF``. File-like (``read``), so Twisted's
    FileSender streams it with bounded memory.

    ``body_lines`` makes it TOP: the header, the blank line, then that many
    lines of the body.
    """

    def __init__(self, file: BinaryIO, body_lines: int | None = None, chunk: int = CHUNK) -> None:
        self._file = file
        self._chunk = chunk
        self._normalizer = CrlfNormalizer()
        self._at_line_start = True  # of the stuffed output, across chunks
        self._lines_left = body_lines
        self._in_body = False
        self._tail = b"\r\n"  # the message starts as if after a line end
        self._done = False

    def read(self, size: int = -1) -> bytes:
        """The next piece of the response (about one chunk); ``b""`` when done."""
        while not self._done:
            block = self._file.read(self._chunk)
            if not block:
                self._done = True
                text = self._stuff(self._normalizer.end())
                return text + (b"" if self._at_line_start else b"\r\n") + b".\r\n"
            text = self._normalizer.feed(block)
            if self._lines_left is not None:
                text = self._cut(text)
            if self._done:
                return self._stuff(text) + b".\r\n"
            if text:
                return self._stuff(text)
        return b""

    def _stuff(self, text: bytes) -> bytes:
        if not text:
            return text
        out = text.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and text[:1] == b".":
            out = b"." + out
        self._at_line_start = text.endswith(b"\n")
        return out

    def _cut(self, text: bytes) -> bytes:
        """Keep what TOP sends of this normalized chunk; set _done at the cut."""
        head = b""
        if not self._in_body:
            window = self._tail + text
            found = window.find(b"\r\n\r\n")
            if found < 0:
                self._tail = window[-3:]
                return text
            self._in_body = True
            start = found + 4 - len(self._tail)
            head, text = text[:start], text[start:]
        left = self._lines_left or 0
        if text.count(b"\n") < left:
            self._lines_left = left - text.count(b"\n")
            return head + text
        end = 0
        for _ in range(left):
            end = text.index(b"\n", end) + 1
        self._lines_left = 0
        self._done = True
        return head + text[:end]


class _SizeCache:
    """CRLF sizes by file identity, so a poll does not re-read every message.

    Shared by the logins being opened in the reactor's thread pool at once:
    the lock guards the table only, never a file being read.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._sizes: OrderedDict[tuple[int, int, int, int], int] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def size(self, tree: Tree, path: str, info: os.stat_result) -> int:
        """The CRLF size of ``path`` in ``tree``, which was ``info`` when listed.
        Read through the safe opener: a message swapped for a symlink or a FIFO
        since it was listed is refused (RefusedPathError), not followed or
        waited on; the size is kept under what was read, by its ``fstat``."""
        with self._lock:
            known = self._sizes.get(_identity(info))
            if known is not None:
                self._sizes.move_to_end(_identity(info))
                return known
        file, opened = tree.open_file(path)
        key = _identity(opened)
        with file:
            size = wire_size(file)
        with self._lock:
            self._sizes[key] = size
            if len(self._sizes) > self._limit:
                self._sizes.popitem(last=False)
        return size


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file's contents may have: its size is known by it."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


_sizes = _SizeCache()


@dataclass
class Message:
    path: str  # where it was listed, as a path (for the log)
    unique: str
    uid: str
    size: int  # CRLF octets
    deleted: bool = False
    location: str = ""  # where it is: "new/NAME" or "cur/NAME" in its Maildir


class IMaildrop(Interface):
    """The avatar of a POP3 login: one user's locked mailbox (see Maildrop)."""


class Maildir:
    """One user's Maildir folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # Beneath the root, no symlink is followed at all: not the user's
        # folder, a subfolder or a message. The root itself is the operator's.
        self.tree = Tree(self.path.parent, follow_symlinks=False, hide_dotfiles=False)

    def beneath(self, location: str = "") -> str:
        """``location`` in this Maildir ("" for the folder) as a path in :attr:`tree`."""
        return f"{self.path.name}/{location}" if location else self.path.name

    @contextlib.contextmanager
    def folder(self, sub: str = "") -> Iterator[int]:
        """A descriptor of the folder or its subfolder ``sub``, symlinks refused
        (RefusedPathError)."""
        fd = self.tree.open_folder(self.beneath(sub))
        try:
            yield fd
        finally:
            os.close(fd)

    def create(self) -> Maildir:
        """Make ``cur``, ``new`` and ``tmp`` (and the folder) if missing: made
        beneath descriptors, so an existing link is refused, never made through."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        root = self.tree.open_folder("")
        try:
            _make_folder(self.path.name, root)
        finally:
            os.close(root)
        with self.folder() as folder:
            for sub in SUBFOLDERS:
                _make_folder(sub, folder)
        return self

    def messages(self) -> list[Message]:
        """new/ and cur/, oldest first (by arrival time, then name)."""
        found: dict[str, tuple[int, Message]] = {}
        for sub in ("new", "cur"):  # cur wins if a move shows a message twice
            for name, info in self._files(sub):
                unique = unique_name(name)
                location = f"{sub}/{name}"
                try:
                    size = _tagged_size(unique, info.st_size)
                    if size is None:
                        size = _sizes.size(self.tree, self.beneath(location), info)
                except FileNotFoundError:  # removed by another reader meanwhile
                    continue
                except RefusedPathError:  # swapped for a link or a FIFO since listed: not a message
                    continue
                message = Message(str(self.path / location), unique, uidl(unique), size, location=location)
                found[unique] = (info.st_mtime_ns, message)
        return [message for _, message in sorted(found.values(), key=lambda item: (item[0], item[1].unique))]

    def sweep_tmp(self, now: float | None = None) -> int:
        """Delete files in tmp/ untouched for TMP_MAX_AGE; how many went."""
        now = time.time() if now is None else now
        removed = 0
        try:
            with self.folder("tmp") as tmp:
                for name, info in _listing(tmp):
                    if stale_delivery(info, now):
                        try:
                            os.unlink(name, dir_fd=tmp)
                        except FileNotFoundError:  # finished or swept by someone else meanwhile
                            continue
                        removed += 1
        except FileNotFoundError:
            return removed
        return removed

    def locate(self, unique: str) -> str | None:
        """Where a message is now ("cur/NAME" or "new/NAME"): another program
        may have moved or flagged it."""
        for sub in ("cur", "new"):
            for name, _ in self._files(sub):
                if unique_name(name) == unique:
                    return f"{sub}/{name}"
        return None

    def open_message(self, location: str) -> BinaryIO:
        """The message at ``location``, by the one safe opener: a symlink is
        refused, not followed; a FIFO is refused, not waited on."""
        return self.tree.open_file(self.beneath(location))[0]

    def remove(self, location: str) -> None:
        """Unlink the message at ``location`` in the subfolder found beneath the root."""
        sub, name = location.split("/", 1)
        with self.folder(sub) as folder:
            os.unlink(name, dir_fd=folder)

    def lock(self) -> MailboxLock:
        """The mailbox lock, taken on the lock file in the folder found beneath the root."""
        with self.folder() as folder:
            return MailboxLock(self.path / LOCK_NAME).acquire(folder)

    def deliver(self, source: BinaryIO) -> Path:
        """Write a message into tmp/, then rename it into new/: readers never
        see a partial message. The name carries its sizes (Maildir++ S= and W=).
        Both folders are found beneath the root as a login finds them."""
        self.create()
        name = new_unique_name()
        normalizer = CrlfNormalizer()
        size = wire = 0
        with self.folder("tmp") as tmp, self.folder("new") as new:
            try:
                descriptor = os.open(name, _CREATE, 0o666, dir_fd=tmp)
                with open(descriptor, "wb") as out:
                    while block := source.read(CHUNK):
                        out.write(block)
                        size += len(block)
                        wire += len(normalizer.feed(block))
                    out.flush()
                    os.fsync(out.fileno())
                wire += len(normalizer.end()) + (0 if normalizer.at_line_start else 2)
                final = f"{name},S={size},W={wire}"
                os.rename(name, final, src_dir_fd=tmp, dst_dir_fd=new)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=tmp)
                raise
            with contextlib.suppress(OSError):
                os.fsync(new)
        return self.path / "new" / final

    def _files(self, sub: str) -> list[tuple[str, os.stat_result]]:
        """The listing of a subfolder (none if it is missing)."""
        try:
            with self.folder(sub) as folder:
                return _listing(folder)
        except FileNotFoundError:
            return []


# A new file in tmp/: never an existing one, never through a link.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _listing(folder: int) -> list[tuple[str, os.stat_result]]:
    """The regular files (not dotfiles) in the folder of a descriptor, with
    their ``lstat``: a link or a FIFO in it is not a message."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile
                continue
            if stat.S_ISREG(info.st_mode):
                found.append((entry.name, info))
    return found


def _make_folder(name: str, parent: int) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)


def _tagged_size(unique: str, file_size: int) -> int | None:
    """The W= size in the name, trusted only while S= matches the file."""
    match = _SIZE_TAGS.search(unique)
    if match and match.group(2) and int(match.group(1)) == file_size:
        return int(match.group(2))
    return None


_deliveries = 0


def new_unique_name() -> str:
    """``SECONDS.MusecPpidQn_Rrandom.HOST`` as the Maildir spec suggests."""
    global _deliveries
    _deliveries += 1
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"
    # Zero-padded microseconds: deliveries within one second (and one mtime
    # tick, when listings fall back to the name) sort in the order they came.
    return f"{int(now)}.M{int(now % 1 * 1e6):06d}P{os.getpid()}Q{_deliveries}R{secrets.token_hex(4)}.{host}"


# The lock file: created if missing, never through a link, never waited on (a FIFO).
_LOCK = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class MailboxLock:
    """An exclusive ``flock`` on a file in the Maildir.

    Works across server processes; the kernel drops it when its holder dies,
    so a killed server never locks a user out. The file is opened without
    following a link (a dangling one would have its target created) and must
    be a regular file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, folder: int | None = None) -> MailboxLock:
        """Take the lock; ``folder``: a descriptor of the folder it is in (its
        path is then not walked again)."""
        where = self.path if folder is None else self.path.name
        try:
            fd = os.open(where, _LOCK, 0o600, dir_fd=folder)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise RefusedPathError(errno.ELOOP, "a symbolic link", str(self.path)) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RefusedPathError(errno.EACCES, "not a regular file", str(self.path))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or (
                error.errno == errno.EACCES and not isinstance(error, RefusedPathError)
            ):
                raise MailboxInUseError(str(self.path.parent)) from None
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


@implementer(IMaildrop)
class Maildrop:
    """One session's view of a mailbox: the messages at login, numbered from
    1; deletions are marks until :meth:`commit`."""

    swept = 0  # stale files removed from tmp/ when it was opened

    def __init__(self, maildir: Maildir, lock: MailboxLock, messages: list[Message]) -> None:
        self.maildir = maildir
        self.lock = lock
        self.messages = messages

    @classmethod
    def open(cls, root: str | os.PathLike[str], user: str) -> Maildrop:
        """Create the Maildir if missing, lock it, sweep its stale tmp/ files
        and list it."""
        if not valid_user(user):
            raise ValueError(f"not a valid mailbox name: {user!r}")
        maildir = Maildir(Path(root) / user).create()
        lock = maildir.lock()
        try:
            swept = maildir.sweep_tmp()
            drop = cls(maildir, lock, maildir.messages())
        except BaseException:
            lock.release()
            raise
        drop.swept = swept
        return drop

    @property
    def user(self) -> str:
        return self.maildir.path.name

    def visible(self) -> list[tuple[int, Message]]:
        return [(number, m) for number, m in enumerate(self.messages, 1) if not m.deleted]

    def stat(self) -> tuple[int, int]:
        """(messages, octets), deleted ones not counted."""
        shown = [m.size for m in self.messages if not m.deleted]
        return len(shown), sum(shown)

    def get(self, number: int) -> Message | None:
        """Message ``number`` (from 1), or None if there is none or it is deleted."""
        if 1 <= number <= len(self.messages) and not self.messages[number - 1].deleted:
            return self.messages[number - 1]
        return None

    def reset(self) -> None:
        for message in self.messages:
            message.deleted = False

    def open_message(self, message: Message) -> BinaryIO:
        """The message's file, opened beneath the Maildir by the one safe opener
        (:class:`sockproto.files.Tree`): a symlink swapped in after login is
        refused, not followed; a FIFO is refused, not waited on (the reactor
        would be)."""
        try:
            return self.maildir.open_message(message.location)
        except FileNotFoundError:
            moved = self.maildir.locate(message.unique)
            if moved is None:
                raise
            message.location, message.path = moved, str(self.maildir.path / moved)
            return self.maildir.open_message(moved)

    def commit(self) -> tuple[int, int]:
        """Remove the messages marked deleted: (removed, failed). A message
        already gone counts as removed."""
        removed = failed = 0
        for message in self.messages:
            if message.deleted:
                if self._remove(message):
                    removed += 1
                else:
                    failed += 1
        return removed, failed

    def _remove(self, message: Message) -> bool:
        location: str | None = message.location
        try:
            for _ in range(2):  # where it was listed, then where it is now
                if location is None:
                    return True
                try:
                    self.maildir.remove(location)
                    return True
                except FileNotFoundError:
                    location = self.maildir.locate(message.unique)
        except OSError:  # a folder swapped for a link, no permission, ...
            return False
        return location is None

    def close(self) -> None:
        """End the session without touching any message; releases the lock."""
        self.lock.release()
