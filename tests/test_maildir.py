"""The Maildir mailbox: wire format, sizes, UIDLs, deletion, the lock, delivery."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sockproto import maildir
from sockproto.__main__ import main
from sockproto.files import RefusedPathError, Tree
from sockproto.maildir import (
    SUBFOLDERS,
    TMP_MAX_AGE,
    CrlfNormalizer,
    IMaildrop,
    MailboxInUseError,
    MailboxLock,
    Maildir,
    Maildrop,
    WireReader,
    uidl,
    unique_name,
    valid_user,
    wire_size,
)
from sockproto.pop3 import MaildirRealm
from tests.support import environment, temp_dir, wait_for


def wire(message: bytes, body_lines: int | None = None, chunk: int = maildir.CHUNK) -> bytes:
    reader = WireReader(io.BytesIO(message), body_lines, chunk)
    out = []
    while piece := reader.read():
        out.append(piece)
    return b"".join(out)


def reference(message: bytes) -> bytes:
    """The RETR response body the slow, obvious way: line by line."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def unstuff(data: bytes) -> bytes:
    """What a client keeps of a multi-line response (poplib's rule)."""
    assert data.endswith(b".\r\n")
    lines = data[:-3].split(b"\r\n")[:-1] if data != b".\r\n" else []
    return b"".join((line[1:] if line.startswith(b"..") else line) + b"\r\n" for line in lines)


class WireFormatTests(SynchronousTestCase):
    def test_line_ends_become_crlf(self) -> None:
        self.assertEqual(wire(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n.\r\n")

    def test_unterminated_last_line_is_ended(self) -> None:
        self.assertEqual(wire(b"a\nlast"), b"a\r\nlast\r\n.\r\n")
        self.assertEqual(wire_size(io.BytesIO(b"a\nlast")), len(b"a\r\nlast\r\n"))

    def test_empty_message(self) -> None:
        self.assertEqual(wire(b""), b".\r\n")
        self.assertEqual(wire_size(io.BytesIO(b"")), 0)

    def test_dot_in_first_line_is_stuffed(self) -> None:
        # twisted.mail sent this unstuffed: the client saw the message end early.
        self.assertEqual(wire(b".\nafter\n"), b"..\r\nafter\r\n.\r\n")
        self.assertEqual(wire(b".hidden\n"), b"..hidden\r\n.\r\n")

    def test_dot_line_at_every_chunk_boundary(self) -> None:
        # twisted.mail stuffed each 16 KiB chunk on its own, missing a dot line
        # that starts a chunk.
        for boundary in (16 * 1024, maildir.CHUNK):
            for shift in (-2, -1, 0, 1):
                head = b"x" * (boundary + shift - 1) + b"\n"
                message = head + b".\n..two\nend\n"
                self.assertEqual(wire(message), reference(message), (boundary, shift))

    def test_crlf_split_across_chunks(self) -> None:
        message = b"ab\r\n.c\r\n"
        for chunk in range(1, len(message) + 1):
            self.assertEqual(wire(message, chunk=chunk), b"ab\r\n..c\r\n.\r\n", chunk)

    def test_bare_cr_stays_data(self) -> None:
        self.assertEqual(wire(b"a\rb\n"), b"a\rb\r\n.\r\n")
        self.assertEqual(wire(b"end\r"), b"end\r\r\n.\r\n")
        self.assertEqual(wire_size(io.BytesIO(b"end\r")), len(b"end\r\r\n"))

    @settings(max_examples=300)
    @given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")), st.integers(1, 40))
    def test_any_message_any_chunk_size(self, message: bytes, chunk: int) -> None:
        out = wire(message, chunk=chunk)
        self.assertEqual(out, reference(message))
        self.assertEqual(len(unstuff(out)), wire_size(io.BytesIO(message), chunk))

    @settings(max_examples=300)
    @given(st.binary(max_size=200), st.integers(1, 30))
    def test_size_is_what_the_client_counts(self, message: bytes, chunk: int) -> None:
        out = wire(message, chunk=chunk)
        self.assertEqual(len(unstuff(out)), wire_size(io.BytesIO(message), chunk))
        self.assertEqual(out, wire(message))  # independent of chunking

    def test_normalizer_tracks_line_start(self) -> None:
        normalizer = CrlfNormalizer()
        self.assertEqual(normalizer.feed(b"a\r"), b"a")
        self.assertFalse(normalizer.at_line_start)
        self.assertEqual(normalizer.feed(b"\n"), b"\r\n")
        self.assertTrue(normalizer.at_line_start)


class TopTests(SynchronousTestCase):
    message = b"From: a\nSubject: s\n\n.one\ntwo\nthree\n"

    def test_headers_and_blank_line_only(self) -> None:
        self.assertEqual(wire(self.message, 0), b"From: a\r\nSubject: s\r\n\r\n.\r\n")

    def test_some_body_lines_stuffed(self) -> None:
        self.assertEqual(wire(self.message, 2), b"From: a\r\nSubject: s\r\n\r\n..one\r\ntwo\r\n.\r\n")

    def test_more_lines_than_the_body_has(self) -> None:
        self.assertEqual(wire(self.message, 99), reference(self.message))

    def test_any_chunk_size(self) -> None:
        expected = wire(self.message, 1)
        for chunk in range(1, len(self.message) + 1):
            self.assertEqual(wire(self.message, 1, chunk), expected, chunk)

    def test_empty_header(self) -> None:
        self.assertEqual(wire(b"\nbody\nmore\n", 1), b"\r\nbody\r\n.\r\n")

    def test_no_body(self) -> None:
        self.assertEqual(wire(b"Subject: only", 3), b"Subject: only\r\n.\r\n")


def put(folder: Path, name: str, data: bytes, mtime: int | None = None) -> Path:
    path = folder / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


class MaildirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(temp_dir(self))
        self.box = Maildir(self.root / "alice").create()

    def test_lists_new_and_cur_in_arrival_order_with_crlf_sizes(self) -> None:
        put(self.box.path / "cur", "200.b:2,S", b"b\nb\n", mtime=2000)
        put(self.box.path / "new", "100.a", b"a\n", mtime=1000)
        put(self.box.path / "new", ".hidden", b"x\n")
        put(self.box.path / "tmp", "300.c", b"half a messa")
        listed = self.box.messages()
        self.assertEqual([m.unique for m in listed], ["100.a", "200.b"])
        self.assertEqual([m.size for m in listed], [3, 6])

    def test_uidl_survives_move_to_cur_and_flag_changes(self) -> None:
        path = put(self.box.path / "new", "1700.M1P2.host", b"x\n")
        before = self.box.messages()[0].uid
        os.rename(path, self.box.path / "cur" / "1700.M1P2.host:2,S")
        self.assertEqual(self.box.messages()[0].uid, before)
        os.rename(self.box.path / "cur" / "1700.M1P2.host:2,S", self.box.path / "cur" / "1700.M1P2.host:2,RS")
        self.assertEqual(self.box.messages()[0].uid, before)
        self.assertEqual(before, "1700.M1P2.host")

    def test_uidl_of_unusual_names_is_a_stable_digest(self) -> None:
        self.assertEqual(unique_name("x:2,S"), "x")
        for odd in ("é" * 3, "a b", "x" * 71):
            value = uidl(odd)
            self.assertEqual(value, uidl(odd))
            self.assertTrue(0 < len(value) <= 70 and all("!" <= c <= "~" for c in value), value)

    def test_size_tag_trusted_only_when_the_file_size_matches(self) -> None:
        put(self.box.path / "new", "1.a,S=2,W=99", b"a\n", mtime=1)
        put(self.box.path / "new", "2.b,S=5,W=99", b"b\n", mtime=2)  # S= wrong: measured
        self.assertEqual([m.size for m in self.box.messages()], [99, 3])

    def swapped_while_listing(self, swap: Callable[[Path], None]) -> list[str]:
        """The uniques listed when the second message is swapped (by ``swap``)
        between the folder's scan and its sizing."""
        put(self.box.path / "new", "1.a", b"a\n")
        swapped = put(self.box.path / "new", "2.b", b"b\n")
        real_size = maildir._sizes.size

        def swap_then_measure(tree: Tree, path: str, stat: os.stat_result) -> int:
            if path == self.box.beneath("new/" + swapped.name):
                swapped.unlink()
                swap(swapped)
            return real_size(tree, path, stat)

        self.patch(maildir._sizes, "size", swap_then_measure)
        # In a thread: were a FIFO opened as a plain file, the open would wait
        # for a writer for ever; this way the test fails instead of hanging.
        listed: list[list[str]] = []
        lister = threading.Thread(target=lambda: listed.append([m.unique for m in self.box.messages()]))
        lister.daemon = True
        lister.start()
        lister.join(10)
        self.assertFalse(lister.is_alive(), "listing the Maildir hung on the swapped message")
        return listed[0]

    def test_a_message_removed_while_listing_is_skipped(self) -> None:
        self.assertEqual(self.swapped_while_listing(lambda path: None), ["1.a"])

    def test_a_message_swapped_for_a_symlink_while_listing_is_not_followed(self) -> None:
        """The size of a file outside the Maildir was read through the link."""
        outside = self.root.parent / "outside.txt"
        outside.write_bytes(b"secret\n" * 100)
        self.addCleanup(outside.unlink)
        self.assertEqual(self.swapped_while_listing(lambda path: path.symlink_to(outside)), ["1.a"])

    def test_a_message_swapped_for_a_fifo_while_listing_is_not_waited_on(self) -> None:
        """open() of a FIFO waits for a writer: the login (a pool thread) hung."""
        self.assertEqual(self.swapped_while_listing(os.mkfifo), ["1.a"])

    def test_str_and_bytes_free_paths(self) -> None:
        # twisted.mail's MaildirMailbox failed login with a str path.
        put(self.box.path / "new", "1.a", b"a\n")
        drop = Maildrop.open(str(self.root), "alice")
        self.addCleanup(drop.close)
        self.assertEqual(drop.stat(), (1, 3))

    def test_creates_missing_maildir(self) -> None:
        drop = Maildrop.open(self.root / "new-root", "bob")
        self.addCleanup(drop.close)
        for sub in ("cur", "new", "tmp"):
            self.assertTrue((self.root / "new-root" / "bob" / sub).is_dir())

    def test_user_names_cannot_leave_the_root(self) -> None:
        for bad in ("..", "../x", "a/b", ".hidden", "", "a" * 65, "a b", "a\0"):
            self.assertFalse(valid_user(bad), bad)
            self.assertRaises(ValueError, Maildrop.open, self.root, bad)
        for good in ("alice", "bob.smith", "a_b-c+d@example.org", "0"):
            self.assertTrue(valid_user(good), good)


class MaildropTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(temp_dir(self))
        box = Maildir(self.root / "alice").create()
        self.paths = [put(box.path / "new", f"{i}.m", b"m%d\n" % i, mtime=i) for i in (1, 2, 3)]
        self.drop = Maildrop.open(self.root, "alice")
        self.addCleanup(self.drop.close)

    def test_deleted_messages_vanish_at_once_but_stay_on_disk(self) -> None:
        self.drop.get(2).deleted = True  # type: ignore[union-attr]
        self.assertEqual(self.drop.stat(), (2, 8))
        self.assertIsNone(self.drop.get(2))
        self.assertEqual([n for n, _ in self.drop.visible()], [1, 3])
        self.assertTrue(all(p.exists() for p in self.paths))

    def test_reset_unmarks(self) -> None:
        self.drop.get(1).deleted = True  # type: ignore[union-attr]
        self.drop.reset()
        self.assertEqual(self.drop.stat(), (3, 12))

    def test_commit_removes_marked_only(self) -> None:
        self.drop.get(1).deleted = True  # type: ignore[union-attr]
        self.drop.get(3).deleted = True  # type: ignore[union-attr]
        self.assertEqual(self.drop.commit(), (2, 0))
        self.assertEqual([p.exists() for p in self.paths], [False, True, False])

    def test_close_without_commit_removes_nothing(self) -> None:
        self.drop.get(1).deleted = True  # type: ignore[union-attr]
        self.drop.close()
        self.assertTrue(all(p.exists() for p in self.paths))

    def test_message_moved_by_another_program_is_still_found(self) -> None:
        moved = self.root / "alice" / "cur" / "2.m:2,S"
        os.rename(self.paths[1], moved)
        with self.drop.open_message(self.drop.get(2)) as file:  # type: ignore[arg-type]
            self.assertEqual(file.read(), b"m2\n")
        self.drop.get(2).deleted = True  # type: ignore[union-attr]
        os.rename(moved, self.root / "alice" / "cur" / "2.m:2,ST")
        self.assertEqual(self.drop.commit(), (1, 0))
        self.assertEqual(sorted(os.listdir(self.root / "alice" / "cur")), [])

    def test_a_message_swapped_for_a_link_after_login_is_not_followed(self) -> None:
        # Regression: RETR of a message replaced by a symlink returned the file
        # it pointed to, outside the Maildir.
        secret = self.root / "secret"
        secret.write_bytes(b"not mail\n")
        for target in (secret, self.paths[2]):  # out of the Maildir, or to another message
            self.paths[0].unlink()
            self.paths[0].symlink_to(target)
            with self.assertRaises(RefusedPathError):
                self.drop.open_message(self.drop.get(1))  # type: ignore[arg-type]

    def test_a_message_swapped_for_a_fifo_is_refused_at_once(self) -> None:
        # Regression: open() of the FIFO waited for a writer, and froze the
        # server. (The test holds a writer, so the old open() returned.)
        self.paths[0].unlink()
        os.mkfifo(self.paths[0])
        writer = os.open(self.paths[0], os.O_RDWR | os.O_NONBLOCK)
        self.addCleanup(os.close, writer)
        with self.assertRaises(RefusedPathError):
            self.drop.open_message(self.drop.get(1))  # type: ignore[arg-type]

    def test_a_maildir_root_reached_through_a_symlink_still_opens(self) -> None:
        # A link the operator made to the root of the Maildirs is theirs: only
        # what is beneath it is opened without following any.
        os.symlink(self.root, self.root.parent / f"{self.root.name}-linked")
        linked = Maildir(self.root.parent / f"{self.root.name}-linked" / "alice")
        drop = Maildrop(linked, self.drop.lock, linked.messages())
        with drop.open_message(drop.get(1)) as file:  # type: ignore[arg-type]
            self.assertEqual(file.read(), b"m1\n")
        drop.get(1).deleted = True  # type: ignore[union-attr]
        self.assertEqual(drop.commit(), (1, 0))
        self.assertFalse(self.paths[0].exists())

    def test_message_already_gone_counts_as_removed(self) -> None:
        self.paths[0].unlink()
        self.drop.get(1).deleted = True  # type: ignore[union-attr]
        self.assertEqual(self.drop.commit(), (1, 0))


class LocalWriterTests(SynchronousTestCase):
    """A user who can write their own Maildir makes a folder in it, or the lock
    file, a symbolic link to someone else's: a listing, DELE, the tmp/ sweep,
    the lock and a delivery never act through it. (Regressions: alice's
    ``new -> ../bob/new`` listed bob's mail at her login and DELE + QUIT
    emptied it; ``tmp -> ../bob/cur`` had her login sweep bob's old mail; a
    dangling lock link had its target created.)"""

    def setUp(self) -> None:
        self.root = Path(temp_dir(self))
        self.bob = Maildir(self.root / "bob").create()
        self.bobs = [
            put(self.bob.path / "new", "1.m", b"bob's new\n", mtime=1),
            put(self.bob.path / "cur", "2.m:2,S", b"bob's old\n", mtime=2),
            put(self.bob.path / "tmp", "3.m", b"bob's half\n", mtime=3),
        ]
        self.alice = Maildir(self.root / "alice").create()

    def link(self, sub: str, target: str) -> None:
        """alice's ``sub`` becomes a link to ``target`` (relative to her folder)."""
        os.rmdir(self.alice.path / sub)
        os.symlink(target, self.alice.path / sub)

    def assert_bobs_mail_untouched(self) -> None:
        self.assertEqual(
            [p.read_bytes() for p in self.bobs], [b"bob's new\n", b"bob's old\n", b"bob's half\n"]
        )
        self.assertEqual(
            [sorted(os.listdir(self.bob.path / sub)) for sub in ("new", "cur", "tmp")],
            [["1.m"], ["2.m:2,S"], ["3.m"]],
        )

    def test_a_linked_subfolder_is_refused_at_login(self) -> None:
        for sub in SUBFOLDERS:
            self.link(sub, f"../bob/{sub}")
            with self.assertRaises(RefusedPathError):
                Maildrop.open(self.root, "alice").close()
            os.unlink(self.alice.path / sub)
            os.mkdir(self.alice.path / sub)
        self.assert_bobs_mail_untouched()

    def test_a_linked_user_folder_is_refused(self) -> None:
        shutil.rmtree(self.alice.path)
        os.symlink("bob", self.alice.path)
        with self.assertRaises(RefusedPathError):
            Maildrop.open(self.root, "alice").close()
        self.assertRaises(RefusedPathError, self.alice.deliver, io.BytesIO(b"x\n"))
        self.assert_bobs_mail_untouched()

    def test_new_swapped_for_a_link_after_login_dele_and_quit_leave_bobs_mail(self) -> None:
        put(self.alice.path / "new", "1.m", b"alice's\n")  # the same name as bob's
        drop = Maildrop.open(self.root, "alice")
        self.addCleanup(drop.close)
        os.rename(self.alice.path / "new", self.alice.path / "old-new")
        os.symlink("../bob/new", self.alice.path / "new")
        drop.get(1).deleted = True  # type: ignore[union-attr]
        self.assertEqual(drop.commit(), (0, 1))
        self.assert_bobs_mail_untouched()
        self.assertRaises(RefusedPathError, self.alice.locate, "1.m")

    def test_a_linked_tmp_is_not_swept(self) -> None:
        self.link("tmp", "../bob/cur")
        self.assertRaises(RefusedPathError, self.alice.sweep_tmp, time.time() + TMP_MAX_AGE + 60)
        self.patch(maildir, "TMP_MAX_AGE", -60.0)  # every file counts as old: the login's sweep
        with self.assertRaises(RefusedPathError):
            Maildrop.open(self.root, "alice").close()
        self.assert_bobs_mail_untouched()

    def test_a_dangling_lock_link_creates_nothing(self) -> None:
        target = self.root / "bob" / "created-by-alice"
        os.symlink("../bob/created-by-alice", self.alice.path / maildir.LOCK_NAME)
        with self.assertRaises(RefusedPathError):
            Maildrop.open(self.root, "alice").close()
        self.assertFalse(os.path.lexists(target))
        # A lock link to an existing file is refused too (not locked, nor opened for writing).
        os.unlink(self.alice.path / maildir.LOCK_NAME)
        os.symlink("../bob/new/1.m", self.alice.path / maildir.LOCK_NAME)
        self.assertRaises(RefusedPathError, Maildrop.open, self.root, "alice")
        self.assert_bobs_mail_untouched()

    def test_a_fifo_as_the_lock_file_is_refused_at_once(self) -> None:
        os.mkfifo(self.alice.path / maildir.LOCK_NAME)
        self.assertRaises(RefusedPathError, Maildrop.open, self.root, "alice")

    def test_deliver_refuses_a_linked_new_or_tmp(self) -> None:
        for sub in ("new", "tmp"):
            self.link(sub, f"../bob/{sub}")
            self.assertRaises(RefusedPathError, self.alice.deliver, io.BytesIO(b"for alice\n"))
            os.unlink(self.alice.path / sub)
            os.mkdir(self.alice.path / sub)
        self.assertEqual(os.listdir(self.alice.path / "tmp"), [])  # no half delivery left either
        self.assert_bobs_mail_untouched()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


class StaleTmpTests(SynchronousTestCase):
    """A delivery killed mid-write leaves a file in tmp/: the next login to the
    mailbox deletes it once it is 36 hours old (the Maildir rule), by ctime."""

    def setUp(self) -> None:
        self.root = Path(temp_dir(self))
        self.box = Maildir(self.root / "erin").create()
        self.tmp = self.box.path / "tmp"
        # Being written by `cp -p` or `rsync -t`: the source's old times, a fresh ctime.
        put(self.tmp, "copying", b"half a mess", mtime=int(time.time() - 10 * TMP_MAX_AGE))

    def test_a_copy_with_preserved_times_is_not_swept_while_written(self) -> None:
        drop = Maildrop.open(self.root, "erin")
        self.addCleanup(drop.close)
        self.assertEqual((drop.swept, os.listdir(self.tmp)), (0, ["copying"]))

    def test_swept_once_its_inode_is_old(self) -> None:
        self.assertEqual(self.box.sweep_tmp(now=time.time() + TMP_MAX_AGE - 60), 0)
        self.assertEqual(self.box.sweep_tmp(now=time.time() + TMP_MAX_AGE + 60), 1)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_the_age_is_the_ctime_not_the_mtime(self) -> None:
        # An old ctime cannot be made on a real file: the choice on stat-like values.
        now = 1_000_000_000.0
        old, fresh = now - TMP_MAX_AGE - 1, now - 60

        def stat(mtime: float, ctime: float) -> os.stat_result:
            return SimpleNamespace(st_mtime=mtime, st_ctime=ctime)  # type: ignore[return-value]

        self.assertFalse(maildir.stale_delivery(stat(mtime=old, ctime=fresh), now))
        self.assertTrue(maildir.stale_delivery(stat(mtime=old, ctime=old), now))
        self.assertTrue(maildir.stale_delivery(stat(mtime=fresh, ctime=old), now))
        self.assertFalse(maildir.stale_delivery(stat(mtime=fresh, ctime=fresh), now))

    def test_the_login_says_so(self) -> None:
        self.patch(maildir, "TMP_MAX_AGE", -60.0)  # every file in tmp/ counts as old
        with capturedLogs() as events:
            opened = MaildirRealm(self.root, run=defer.maybeDeferred).requestAvatar("erin", None, IMaildrop)
            *_, logout = self.successResultOf(opened)
        logout()
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["pop3: removed 1 file(s) older than 36 h from erin/tmp (deliveries that died)"],
        )
        self.assertEqual(os.listdir(self.tmp), [])


class LockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(temp_dir(self))
        Maildir(self.root / "alice").create()

    def test_second_session_is_refused_until_the_first_ends(self) -> None:
        first = Maildrop.open(self.root, "alice")
        self.assertRaises(MailboxInUseError, Maildrop.open, self.root, "alice")
        first.close()
        Maildrop.open(self.root, "alice").close()

    def test_other_users_are_independent(self) -> None:
        first = Maildrop.open(self.root, "alice")
        self.addCleanup(first.close)
        Maildrop.open(self.root, "bob").close()

    def test_lock_held_by_another_process_and_freed_when_it_is_killed(self) -> None:
        lock_path = self.root / "alice" / maildir.LOCK_NAME
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(lock_path)], stdout=subprocess.PIPE, text=True
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdout.close)  # type: ignore[union-attr]
        self.assertEqual(holder.stdout.readline().strip(), "locked")  # type: ignore[union-attr]
        self.assertRaises(MailboxInUseError, MailboxLock(lock_path).acquire)
        holder.send_signal(signal.SIGKILL)

        def free() -> bool:
            try:
                MailboxLock(lock_path).acquire().release()
            except MailboxInUseError:
                return False
            return True

        wait_for(free, what="the lock of a killed process to be free")


class DeliverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(temp_dir(self))

    def test_deliver_writes_into_new_via_tmp(self) -> None:
        path = Maildir(self.root / "alice").deliver(io.BytesIO(b"Subject: x\n\nhi\n"))
        self.assertEqual(path.parent, self.root / "alice" / "new")
        self.assertEqual(path.read_bytes(), b"Subject: x\n\nhi\n")
        self.assertEqual(os.listdir(self.root / "alice" / "tmp"), [])
        (message,) = Maildir(self.root / "alice").messages()
        self.assertEqual(message.size, len(b"Subject: x\r\n\r\nhi\r\n"))
        self.assertIn(",S=15,W=18", path.name)

    def test_unique_names_differ(self) -> None:
        box = Maildir(self.root / "alice")
        names = {box.deliver(io.BytesIO(b"x")).name for _ in range(20)}
        self.assertEqual(len(names), 20)

    def test_unique_names_sort_in_delivery_order(self) -> None:
        """Within one mtime tick a listing falls back to the names: 0.099999 s
        must not sort after 0.100001 s."""
        moments = iter([1_700_000_000.099999, 1_700_000_000.100001, 1_700_000_001.000002])
        with mock.patch("time.time", lambda: next(moments)):
            names = [maildir.new_unique_name() for _ in range(3)]
        self.assertEqual(sorted(names), names)

    def test_failed_delivery_leaves_nothing(self) -> None:
        class Broken(io.BytesIO):
            def read(self, size: int = -1) -> bytes:
                raise OSError("disk on fire")

        box = Maildir(self.root / "alice")
        self.assertRaises(OSError, box.deliver, Broken())
        self.assertEqual(os.listdir(self.root / "alice" / "tmp"), [])
        self.assertEqual(os.listdir(self.root / "alice" / "new"), [])

    def test_deliver_command(self) -> None:
        message = self.root / "message.eml"
        message.write_bytes(b"Subject: cli\n\nbody\n")
        maildir_root = self.root / "boxes"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.assertEqual(main(["deliver", "--maildir", str(maildir_root), "carol", str(message)]), 0)
        (delivered,) = (maildir_root / "carol" / "new").iterdir()
        self.assertEqual(delivered.read_bytes(), b"Subject: cli\n\nbody\n")
        self.assertEqual(printed.getvalue(), f"{delivered}\n")  # the new file's path, for scripts

    def test_deliver_command_from_stdin_with_the_servers_default_root(self) -> None:
        # No --maildir: [pop3] maildir from ./sockproto.toml, like the server.
        (self.root / "sockproto.toml").write_text('[pop3]\nmaildir = "boxes"\n')
        result = subprocess.run(
            [sys.executable, "-m", "sockproto", "deliver", "dave"],
            input=b"piped\n",
            cwd=self.root,
            env=environment(),
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        path = Path(result.stdout.decode().strip())
        self.assertEqual(path.parent, self.root / "boxes" / "dave" / "new")
        self.assertEqual(path.read_bytes(), b"piped\n")

    def test_deliver_command_refuses_a_bad_user(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "sockproto", "deliver", "--maildir", str(self.root), "../escape"],
            input=b"x",
            env=environment(),
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.decode().strip(),
            "python -m sockproto deliver: error: '../escape' is not a valid mailbox name",
        )
        self.assertEqual(list(self.root.iterdir()), [])
