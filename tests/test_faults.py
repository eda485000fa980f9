"""Faults that must lose nothing: a POP3 server killed mid-session, and a
delivery interrupted at any point."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import poplib
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from sockproto.__main__ import Interrupted, SignalAwareInput, termination_exits
from sockproto.maildir import Maildir
from tests.support import ALL_OFF, DEADLINE, Suite, environment, recv_until, temp_dir, wait_for

MESSAGES = [
    b"Subject: one\n\nfirst\n",
    b"Subject: two\n\n.a dot-led line\nsecond\n",
    b"Subject: three\r\n\r\nthird, with CRLF\r\n",
    b"Subject: four\n\n" + b"a long body line\n" * 200_000,  # some 3.6 MB: still streaming when killed
    b"Subject: five\n\nfifth, no final newline",
]


def crlf(message: bytes) -> bytes:
    """A message as RETR gives it back (poplib joins the unstuffed lines)."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    return b"\r\n".join(lines[:-1] if lines[-1] == b"" else lines) + b"\r\n"


class Pop3KilledMidSessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(temp_dir(self), "mail")
        for message in MESSAGES:
            Maildir(self.root / "alice").deliver(io.BytesIO(message))

    def start(self) -> Suite:
        suite = Suite([*ALL_OFF, "--pop3-port", "0", "--maildir", str(self.root)], cwd=temp_dir(self)).start()
        self.addCleanup(suite.stop)
        return suite

    def login(self, suite: Suite) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", suite.address("pop3")[1], timeout=20)
        self.addCleanup(client.close)
        client.user("alice")
        client.pass_("any")
        return client

    def mailbox(self, client: poplib.POP3) -> dict[bytes, bytes]:
        """UIDL -> message, as a client sees the mailbox."""
        _, listing, _ = client.uidl()
        found = {}
        for line in listing:
            number, uid = line.split()
            self.assertNotIn(uid, found)
            found[uid] = b"\r\n".join(client.retr(int(number))[1]) + b"\r\n"
        return found

    def files(self) -> list[str]:
        return [name for sub in ("new", "cur", "tmp") for name in os.listdir(self.root / "alice" / sub)]

    def test_sigkill_with_dele_marks_loses_nothing_and_quit_removes_exactly_the_marked(self) -> None:
        suite = self.start()
        client = self.login(suite)
        before = self.mailbox(client)
        self.assertEqual(sorted(before.values()), sorted(crlf(m) for m in MESSAGES))
        client.close()
        files = self.files()

        # A session marks three messages deleted and is killed while the big
        # one streams to it: no QUIT, so nothing may go.
        sock = suite.connect("pop3")
        self.addCleanup(sock.close)
        sock.sendall(b"USER alice\r\nPASS any\r\nDELE 1\r\nDELE 2\r\nDELE 5\r\nRETR 4\r\n")
        recv_until(sock, lambda d: d.count(b"deleted") == 3 and len(d) > 64 * 1024)
        self.assertEqual(suite.stop(signal.SIGKILL), -signal.SIGKILL)

        suite = self.start()
        client = self.login(suite)
        self.assertEqual(self.mailbox(client), before)  # every message, exactly once
        self.assertEqual(sorted(self.files()), sorted(files))
        uids = [line.split()[1] for line in client.uidl()[1]]
        client.dele(2)
        client.dele(4)
        client.quit()

        client = self.login(suite)
        after = self.mailbox(client)
        self.assertEqual(after, {uid: before[uid] for uid in uids if uid not in (uids[1], uids[3])})
        self.assertEqual(len(self.files()), 3)
        client.quit()


def deliver_process(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sockproto", "deliver", "--maildir", str(root), "alice"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment(),
    )


class SignalAwareInputTests(SynchronousTestCase):
    def test_a_signal_that_misses_the_read_still_ends_it(self) -> None:
        """A read waiting on a quiet pipe gives way to a signal even when the
        signal is not delivered to the reading thread (as when it lands just
        before read() starts, so read() never sees EINTR)."""
        quiet, writer = os.pipe()
        self.addCleanup(os.close, quiet)
        self.addCleanup(os.close, writer)
        rescued = threading.Event()

        def rescue() -> None:  # should the read not give way
            rescued.set()
            os.write(writer, b"late")

        def hit() -> None:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

        with termination_exits() as wakeup:
            assert wakeup is not None
            rescuer, hitter = threading.Timer(DEADLINE, rescue), threading.Timer(0.1, hit)
            self.addCleanup(rescuer.cancel)
            rescuer.start()
            hitter.start()
            with self.assertRaises(Interrupted) as caught:
                SignalAwareInput(quiet, wakeup).read(10)
            hitter.join()
        self.assertEqual(caught.exception.signum, signal.SIGTERM)
        self.assertFalse(rescued.is_set())

    def test_it_reads_what_comes_and_the_end(self) -> None:
        source, writer = os.pipe()
        self.addCleanup(os.close, source)
        os.write(writer, b"abc")
        os.close(writer)
        with termination_exits() as wakeup:
            assert wakeup is not None
            self.assertEqual(SignalAwareInput(source, wakeup).read(), b"abc")


class DeliverInterruptedTests(SynchronousTestCase):
    """A message is visible in new/ whole or not at all."""

    def setUp(self) -> None:
        self.root = Path(temp_dir(self), "mail")
        self.box = Maildir(self.root / "alice")

    def listing(self, sub: str) -> list[str]:
        return os.listdir(self.box.path / sub)

    def interrupted_while_reading(self, sig: int) -> tuple[int, bytes]:
        """``deliver`` reading a slow stdin: a first part is in tmp/ when ``sig`` comes."""
        process = deliver_process(self.root)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        assert process.stdin is not None and process.stderr is not None
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdin.close)
        process.stdin.write(b"Subject: half\n\n" + b"x" * 200_000)
        process.stdin.flush()
        tmp = self.box.path / "tmp"
        wait_for(
            lambda: tmp.is_dir() and any(f.stat().st_size >= 65536 for f in tmp.iterdir()),
            what="a first part written to tmp/",
        )
        self.assertEqual(self.listing("new"), [])
        process.send_signal(sig)
        code = process.wait(20)
        return code, process.stderr.read()

    def test_sigkill(self) -> None:
        code, _ = self.interrupted_while_reading(signal.SIGKILL)
        self.assertEqual(code, -signal.SIGKILL)
        self.assertEqual(self.listing("new"), [])  # the part stays in tmp/, where readers never look
        self.assertEqual(self.box.messages(), [])

    def test_sigterm_and_sigint_also_clean_tmp(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            code, errors = self.interrupted_while_reading(sig)
            self.assertEqual(code, 128 + sig)
            name = signal.Signals(sig).name.encode()
            self.assertEqual(errors, b"python -m sockproto deliver: interrupted by %s\n" % name)
            self.assertEqual((self.listing("new"), self.listing("tmp")), ([], []), sig)

    def test_every_step_failing_leaves_nothing_anywhere(self) -> None:
        """Whichever step of a delivery fails (reading, writing, syncing,
        renaming), nothing is left in new/ or tmp/; while it runs, new/ never
        holds the message."""
        box = self.box
        new = box.path / "new"

        class Source(io.BytesIO):
            """Raises ``fail`` once past 100 kB: a broken or interrupted input."""

            def __init__(self, data: bytes, fail: BaseException | None = None) -> None:
                super().__init__(data)
                self.fail = fail

            def read(self, size: int = -1) -> bytes:
                if self.fail is not None and self.tell() > 100_000:
                    raise self.fail
                assert not (new.exists() and os.listdir(new)), "partial message visible in new/"
                return super().read(size)

        message = b"Subject: x\n\n" + b"y" * 300_000
        full_disk = OSError(errno.ENOSPC, "No space left on device")
        no_patch = contextlib.nullcontext()
        steps: list[tuple[str, Source, contextlib.AbstractContextManager[Any], type[BaseException]]] = [
            ("read", Source(message, OSError(errno.EIO, "input/output error")), no_patch, OSError),
            ("signal", Source(message, KeyboardInterrupt()), no_patch, KeyboardInterrupt),
            ("fsync", Source(message), mock.patch("os.fsync", side_effect=full_disk), OSError),
            ("rename", Source(message), mock.patch("os.rename", side_effect=full_disk), OSError),
        ]
        for step, source, patch, error in steps:
            with patch:
                self.assertRaises(error, box.deliver, source)
            self.assertEqual((self.listing("new"), self.listing("tmp")), ([], []), step)
        delivered = box.deliver(Source(message))
        self.assertEqual(delivered.read_bytes(), message)
        self.assertEqual((len(self.listing("new")), self.listing("tmp")), (1, []))
