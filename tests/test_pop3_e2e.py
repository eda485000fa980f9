"""The POP3 server under the real twistd plugin: poplib, curl, raw sockets."""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import os
import poplib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sockproto.__main__ import set_password
from sockproto.maildir import Maildir
from sockproto.pop3 import MAX_AUTH_DELAY
from tests.support import ALL_OFF, Suite, recv_all, recv_until, run_twistd, temp_dir, wait_for


def make_certificate(folder: Path) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


class Box:
    """A Maildir root with users alice (hashed password) and bob (plain, for APOP)."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.folder = Path(temp_dir(test))
        self.root = self.folder / "mail"
        self.users = self.folder / "users.txt"
        self.users.write_bytes(b"bob:builder\n")
        set_password(str(self.users), "alice", b"secret")

    def deliver(self, data: bytes, user: str = "alice") -> Path:
        return Maildir(self.root / user).deliver(io.BytesIO(data))

    def files(self, user: str = "alice") -> list[str]:
        return sorted(os.listdir(self.root / user / "new")) + sorted(os.listdir(self.root / user / "cur"))


def start(test: SynchronousTestCase, box: Box, *args: str) -> Suite:
    """A suite serving ``box`` (in a folder of its own: twistd's pidfile is there)."""
    suite = Suite(
        [*ALL_OFF, "--pop3-port", "0", "--maildir", str(box.root), "--auth", f"file:{box.users}", *args],
        cwd=temp_dir(test),
    ).start()
    test.addCleanup(suite.stop)
    return suite


class Pop3EndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.box = Box(self)
        self.cert, self.key = make_certificate(self.box.folder / "tls")
        # Only test_failed_login_is_delayed_while_others_are_served fails a
        # login: a delay long enough that the other session surely ends within
        # it (the test checks order and the delay's lower bound, never an upper one).
        self.suite = start(
            self, self.box, "--tls-cert", self.cert, "--tls-key", self.key, "--pop3-auth-delay", "3"
        )

    def client(self, host: str = "127.0.0.1") -> poplib.POP3:
        client = poplib.POP3(host, self.suite.address("pop3")[1], timeout=20)
        self.addCleanup(client.close)
        return client

    def test_poplib_session(self) -> None:
        self.box.deliver(b"Subject: one\n\nfirst\n")
        self.box.deliver(b"Subject: two\r\n\r\n.dotted\r\nsecond\r\n")
        self.box.deliver(b"Subject: three\n\nthird")
        client = self.client()
        self.assertTrue(client.getwelcome().startswith(b"+OK sockproto POP3 server ready <"))
        self.assertIn("STLS", client.capa())
        client.user("alice")
        client.pass_("secret")
        crlf = [
            b"Subject: one\r\n\r\nfirst\r\n",
            b"Subject: two\r\n\r\n.dotted\r\nsecond\r\n",
            b"Subject: three\r\n\r\nthird\r\n",
        ]
        self.assertEqual(client.stat(), (3, sum(map(len, crlf))))
        _, sizes, _ = client.list()
        self.assertEqual(sizes, [b"%d %d" % (n, len(m)) for n, m in enumerate(crlf, 1)])
        _, uids, _ = client.uidl()
        _, lines, octets = client.retr(2)
        self.assertEqual(lines, [b"Subject: two", b"", b".dotted", b"second"])
        self.assertEqual(octets, len(crlf[1]))  # poplib counts what LIST promised
        self.assertEqual(client.top(1, 0)[1], [b"Subject: one", b""])
        self.assertEqual(client.retr(3)[1], [b"Subject: three", b"", b"third"])
        client.dele(1)
        client.dele(2)
        client.rset()
        client.dele(1)
        self.assertEqual(client.stat(), (2, len(crlf[1]) + len(crlf[2])))
        self.assertRaises(poplib.error_proto, client.retr, 1)
        self.assertTrue(
            client.quit().startswith(b"+OK sockproto POP3 server signing off (1 messages deleted)")
        )
        self.assertEqual(len(self.box.files()), 2)
        # a new session: the same UIDLs for the messages left
        again = self.client()
        again.user("alice")
        again.pass_("secret")
        self.assertEqual(again.uidl()[1], [b"1 " + uids[1].split()[1], b"2 " + uids[2].split()[1]])
        again.quit()

    def test_auth_plain_and_apop(self) -> None:
        client = self.client()
        token = base64.b64encode(b"\0alice\0secret").decode()
        self.assertTrue(client._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK alice's maildrop"))
        client.quit()
        apop = self.client()
        self.assertTrue(apop.apop("bob", "builder").startswith(b"+OK bob's maildrop"))
        apop.quit()

    def test_failed_login_is_delayed_while_others_are_served(self) -> None:
        """The good login from another host (127.0.0.2, still loopback) is
        served while the failed one waits out setUp's 3 s delay. (From the
        failing host itself, a good login waits its penalty too.)"""
        slow = self.suite.connect("pop3")
        self.addCleanup(slow.close)
        recv_until(slow, lambda d: d.endswith(b"\r\n"))
        started = time.monotonic()
        slow.sendall(b"USER alice\r\nPASS wrong\r\n")
        self.suite.wait_log("login failed for alice (answer delayed 3 s)")
        with socket.create_connection(
            self.suite.address("pop3"), timeout=20, source_address=("127.0.0.2", 0)
        ) as fast:
            recv_until(fast, lambda d: d.endswith(b"\r\n"))
            fast.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
            served = recv_until(fast, lambda d: d.count(b"\r\n") >= 3, timeout=2.5)
            self.assertTrue(served.startswith(b"+OK send PASS\r\n+OK alice's maildrop"), served)
        slow.setblocking(False)
        try:
            early = slow.recv(4096)
        except BlockingIOError:
            early = b""
        slow.setblocking(True)
        self.assertNotIn(b"-ERR", early)
        answer = early + recv_until(slow, lambda d: (early + d).count(b"\r\n") >= 2)
        self.assertGreaterEqual(time.monotonic() - started, 3)
        self.assertEqual(answer, b"+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n")

    def test_dropped_connection_keeps_deleted_mail(self) -> None:
        self.box.deliver(b"Subject: keep me\n\n")
        before = self.box.files()
        sock = self.suite.connect("pop3")
        sock.sendall(b"USER alice\r\nPASS secret\r\nDELE 1\r\n")
        self.assertIn(b"+OK message 1 deleted\r\n", recv_until(sock, lambda d: b"deleted" in d))
        sock.close()  # no QUIT
        self.suite.wait_log("alice disconnected without QUIT; nothing deleted")
        self.assertEqual(self.box.files(), before)
        client = self.client()
        client.user("alice")
        client.pass_("secret")
        self.assertEqual(client.stat()[0], 1)
        client.quit()

    def test_second_session_is_in_use_until_the_first_ends(self) -> None:
        first = self.client()
        first.user("alice")
        first.pass_("secret")
        second = self.client()
        second.user("alice")
        with self.assertRaises(poplib.error_proto) as raised:
            second.pass_("secret")
        self.assertEqual(raised.exception.args[0], b"-ERR [IN-USE] mailbox is locked by another session")
        first.close()  # ends without QUIT: the lock goes anyway
        self.suite.wait_log("alice disconnected without QUIT")
        second.user("alice")
        self.assertTrue(second.pass_("secret").startswith(b"+OK"))
        second.quit()

    def test_dot_lines_at_the_start_and_at_chunk_boundaries(self) -> None:
        parts = [b".starts with a dot\n"]
        for boundary in (16 * 1024, 64 * 1024, 128 * 1024):  # FileSender's and our chunk sizes
            while (missing := boundary - sum(map(len, parts))) > 0:
                parts.append(b"x" * (min(missing, 1000) - 1) + b"\n")
            parts.append(b".\n")  # a lone dot line starting exactly at the boundary
        message = b"".join(parts) + b"..two dots\nend\n"
        self.box.deliver(message)
        client = self.client()
        client.user("alice")
        client.pass_("secret")
        _, lines, octets = client.retr(1)
        self.assertEqual(lines, message.rstrip(b"\n").split(b"\n"))
        self.assertEqual(octets, int(client.list(1).split()[2]))
        client.quit()

    def test_fifty_megabyte_retr_in_bounded_memory(self) -> None:
        line = b"." + b"x" * 77 + b"\n"
        count = 50 * 1024 * 1024 // len(line)
        big = self.box.folder / "big.eml"
        with open(big, "wb") as out:
            out.write(b"Subject: big\n\n")
            out.write(line * count)
        with open(big, "rb") as source:
            Maildir(self.box.root / "alice").deliver(source)
        expected = len(b"Subject: big\r\n\r\n") + count * (len(line) + 2)  # CRLF, dots stuffed
        sock = self.suite.connect("pop3")
        self.addCleanup(sock.close)
        sock.sendall(b"USER alice\r\nPASS secret\r\n")
        recv_until(sock, lambda d: b"maildrop" in d)
        before = self.suite.rss_kib()
        sock.sendall(b"RETR 1\r\n")
        received, peak, tail = 0, before, b""
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
            tail = (tail + chunk)[-5:]
            if received % (4 << 20) < len(chunk):
                peak = max(peak, self.suite.rss_kib())
        peak = max(peak, self.suite.rss_kib())
        header = len(b"+OK %d octets\r\n" % (expected - count))
        self.assertEqual(received, header + expected + len(b".\r\n"))
        self.assertLess(peak - before, 16 * 1024, f"RSS grew from {before} to {peak} KiB")

    def test_a_flood_of_commands_from_a_client_that_never_reads(self) -> None:
        sock = self.suite.connect("pop3")
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        before = self.suite.rss_kib()
        sock.settimeout(1)
        flood = b"CAPA\r\n" * 10000  # each answer is 25 times the command
        with self.assertRaises(TimeoutError):  # the server stops reading: our send blocks
            for _ in range(200):
                sock.sendall(flood)
        self.assertLess(self.suite.rss_kib() - before, 8 * 1024)
        other = self.client()  # and everyone else is still served
        self.assertIn("UIDL", other.capa())
        other.quit()

    def test_stls(self) -> None:
        client = self.client()
        context = ssl.create_default_context(cafile=self.cert)
        self.assertEqual(client.stls(context), b"+OK begin TLS negotiation")
        self.assertNotIn("STLS", client.capa())  # poplib re-reads CAPA after STLS
        client.user("alice")
        client.pass_("secret")
        self.assertEqual(client.stat(), (0, 0))
        client.quit()

    def test_curl(self) -> None:
        curl = shutil.which("curl")
        if curl is None or "pop3" not in subprocess.run([curl, "-V"], capture_output=True, text=True).stdout:
            raise SkipTest("curl with pop3 support is not installed")
        self.box.deliver(b"Subject: via curl\n\n.dot\nbody\n")
        self.box.deliver(b"Subject: for bob\n\nhi\n", user="bob")
        port = self.suite.address("pop3")[1]

        def run(*args: str) -> bytes:
            result = subprocess.run([curl, "-sS", *args], capture_output=True, timeout=30)
            self.assertEqual(result.returncode, 0, result.stderr)
            return result.stdout

        message = b"Subject: via curl\r\n\r\n.dot\r\nbody\r\n"
        self.assertEqual(run(f"pop3://alice:secret@127.0.0.1:{port}/"), b"1 %d\r\n" % len(message))
        self.assertEqual(run(f"pop3://alice:secret@127.0.0.1:{port}/1"), message)
        tls = run("--ssl-reqd", "--cacert", self.cert, f"pop3://alice:secret@localhost:{port}/1")
        self.assertEqual(tls, message)
        # curl's APOP (it failed against twisted.mail)
        self.assertEqual(
            run("--login-options", "AUTH=+APOP", f"pop3://bob:builder@127.0.0.1:{port}/1"),
            b"Subject: for bob\r\n\r\nhi\r\n",
        )
        self.suite.wait_log("bob quit")


class RequireTlsTests(SynchronousTestCase):
    def test_stls_required_and_implicit_tls(self) -> None:
        box = Box(self)
        cert, key = make_certificate(box.folder / "tls")
        suite = start(self, box, "--tls-cert", cert, "--tls-key", key, "--pop3-require-tls")
        client = poplib.POP3("127.0.0.1", suite.address("pop3")[1], timeout=20)
        self.addCleanup(client.close)
        self.assertNotIn("USER", client.capa())
        with self.assertRaises(poplib.error_proto) as raised:
            client.user("alice")
        self.assertEqual(
            raised.exception.args[0], b"-ERR [AUTH] plaintext authentication disallowed before STLS"
        )
        client.stls(ssl.create_default_context(cafile=cert))
        client.user("alice")
        client.pass_("secret")
        client.quit()

    def test_curl_logs_in_only_over_tls(self) -> None:
        # curl chose APOP by itself from the greeting's timestamp and logged
        # in over clear text, whatever --pop3-require-tls said.
        curl = shutil.which("curl")
        if curl is None or "pop3" not in subprocess.run([curl, "-V"], capture_output=True, text=True).stdout:
            raise SkipTest("curl with pop3 support is not installed")
        box = Box(self)
        box.deliver(b"Subject: for bob\n\nhi\n", user="bob")
        cert, key = make_certificate(box.folder / "tls")
        suite = start(self, box, "--tls-cert", cert, "--tls-key", key, "--pop3-require-tls")
        url = f"pop3://bob:builder@localhost:{suite.address('pop3')[1]}/1"
        clear = subprocess.run([curl, "-sS", url], capture_output=True, timeout=30)
        self.assertNotEqual(clear.returncode, 0, clear.stdout)
        self.assertEqual(clear.stdout, b"")
        tls = subprocess.run(
            [curl, "-sS", "--ssl-reqd", "--cacert", cert, url], capture_output=True, timeout=30
        )
        self.assertEqual((tls.returncode, tls.stdout), (0, b"Subject: for bob\r\n\r\nhi\r\n"), tls.stderr)
        suite.wait_log("bob quit")
        self.assertEqual(suite.output.count("logged in as bob"), 1)

    def test_ssl_endpoint(self) -> None:
        box = Box(self)
        cert, key = make_certificate(box.folder / "tls")
        endpoint = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        suite = start(self, box, "--pop3-port", endpoint, "--pop3-require-tls")
        client = poplib.POP3_SSL(
            "127.0.0.1", suite.address("pop3")[1], context=ssl.create_default_context(cafile=cert), timeout=20
        )
        self.addCleanup(client.close)
        self.assertNotIn("STLS", client.capa())
        client.user("alice")
        client.pass_("secret")
        client.quit()
        # TLS from the start: the greeting offers APOP (poplib reads its timestamp)
        again = poplib.POP3_SSL(
            "127.0.0.1", suite.address("pop3")[1], context=ssl.create_default_context(cafile=cert), timeout=20
        )
        self.addCleanup(again.close)
        self.assertTrue(again.apop("bob", "builder").startswith(b"+OK bob's maildrop"))
        again.quit()

    def test_ssl_endpoint_takes_the_suites_certificate(self) -> None:
        box = Box(self)
        cert, key = make_certificate(box.folder / "tls")
        suite = start(
            self,
            box,
            "--pop3-port",
            "ssl:0:interface=127.0.0.1",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        )
        client = poplib.POP3_SSL(
            "127.0.0.1", suite.address("pop3")[1], context=ssl.create_default_context(cafile=cert), timeout=20
        )
        self.addCleanup(client.close)
        client.user("alice")
        client.pass_("secret")
        client.quit()


class SizingTests(SynchronousTestCase):
    def test_other_services_answer_while_a_login_sizes_a_big_maildir(self) -> None:
        # Messages copied in without size tags are read whole at the first
        # login to count their CRLF octets: that stalled every service.
        box = Box(self)
        new = Maildir(box.root / "alice").create().path / "new"
        count, size = 4, 128 << 20
        for number in range(count):
            with open(new / f"{number}.copied", "wb") as out:
                out.truncate(size)  # sparse: no disk, but every byte is read
        suite = start(self, box, "--port", "0")
        io_stats = Path(f"/proc/{suite.process.pid}/io")  # type: ignore[union-attr]

        def read_so_far() -> int:
            return int(re.search(r"rchar: (\d+)", io_stats.read_text()).group(1))  # type: ignore[union-attr]

        pop = suite.connect("pop3")
        self.addCleanup(pop.close)
        recv_until(pop, lambda d: d.endswith(b"\r\n"))
        before = read_so_far()
        pop.sendall(b"USER alice\r\nPASS secret\r\n")
        wait_for(lambda: read_so_far() - before > 16 << 20, what="the login to size the Maildir")
        strip = suite.connect("strip")
        self.addCleanup(strip.close)
        strip.sendall(b"a b\n")
        self.assertEqual(recv_until(strip, lambda d: d.endswith(b"\0")), b"ab\0")
        self.assertLess(read_so_far() - before, count * size, "strip answered only once the sizing was done")
        answer = recv_until(pop, lambda d: b"maildrop" in d)
        self.assertIn(b"has 4 messages (%d octets)" % (count * (size + 2)), answer)  # + CRLF each


class AcrossProcessesTests(SynchronousTestCase):
    def test_lock_holds_across_servers_and_dies_with_its_holder(self) -> None:
        box = Box(self)
        first, second = start(self, box), start(self, box)
        holder = poplib.POP3("127.0.0.1", first.address("pop3")[1], timeout=20)
        self.addCleanup(holder.close)
        holder.user("alice")
        holder.pass_("secret")
        other = poplib.POP3("127.0.0.1", second.address("pop3")[1], timeout=20)
        self.addCleanup(other.close)
        other.user("alice")
        self.assertRaises(poplib.error_proto, other.pass_, "secret")
        first.stop(signal.SIGKILL)  # no clean-up at all: the kernel drops the lock
        other.user("alice")
        self.assertTrue(other.pass_("secret").startswith(b"+OK"))
        other.quit()


class LocalTestServerTests(SynchronousTestCase):
    def test_without_auth_anyone_logs_in_on_loopback(self) -> None:
        folder = Path(temp_dir(self))
        suite = Suite([*ALL_OFF, "--pop3-port", "0", "--pop3-max-clients", "1"], cwd=str(folder)).start()
        self.addCleanup(suite.stop)
        suite.wait_log("pop3: no --auth: any user name and password is accepted")
        client = poplib.POP3("127.0.0.1", suite.address("pop3")[1], timeout=20)
        self.addCleanup(client.close)
        client.user("whoever")
        self.assertTrue(client.pass_("anything").startswith(b"+OK whoever's maildrop has 0 messages"))
        self.assertTrue((folder / "mail" / "whoever" / "new").is_dir())  # default --maildir
        extra = suite.connect("pop3")
        self.addCleanup(extra.close)
        self.assertEqual(recv_all(extra), b"-ERR [SYS/TEMP] too many sessions, try again later\r\n")
        client.quit()

    def test_without_auth_refuses_to_listen_beyond_loopback(self) -> None:
        result = run_twistd(["-n", "sockproto", *ALL_OFF, "--pop3-port", "0", "--interface", "0.0.0.0"])
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.strip(),
            "twistd sockproto: error: pop3: without --auth any password is accepted, so POP3 listens on "
            "loopback only, not tcp:0:interface=0.0.0.0; add --auth (e.g. --auth file:users.txt) or "
            "listen on 127.0.0.1",
        )

    def test_the_tac_file_reports_it_in_one_line_too(self) -> None:
        folder = Path(temp_dir(self))
        (folder / "sockproto.toml").write_text(
            'interface = "0.0.0.0"\n[strip]\nport = "off"\n[chat]\nport = "off"\n[udp]\nport = "off"\n'
            '[http]\nport = "off"\n[pop3]\nport = 0\n'
        )
        from tests.support import REPO

        result = run_twistd(["-n", "-y", str(REPO / "tac" / "sockproto.tac")], cwd=str(folder))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("sockproto: error: pop3: without --auth", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)


class FailedLoginFloodEndToEndTests(SynchronousTestCase):
    def test_failed_logins_that_hang_up_hold_no_sessions(self) -> None:
        """120 wrong logins that hang up at once held all 100 sessions until
        their answers, queued for minutes: every user got 'too many sessions'.
        With a 10 s delay, a fresh session for others must come well before
        the first answer would have been due. A right password from a
        penalized address then waits its penalty, no longer (the cap itself
        is shown with a Clock: FailedLoginThrottleTests)."""
        box = Box(self)
        suite = start(self, box, "--pop3-auth-delay", "10")
        pop3 = suite.address("pop3")

        def connect(source: str) -> socket.socket:
            return socket.create_connection(pop3, timeout=10, source_address=(source, 0))

        for _ in range(120):  # from 127.0.0.2: another address than the users'
            with connect("127.0.0.2") as sock:
                recv_until(sock, lambda d: d.endswith(b"\r\n"))  # the greeting, or the overflow line
                sock.sendall(b"USER bob\r\nPASS wrong\r\n")

        def session(source: str) -> socket.socket | None:
            sock = connect(source)
            greeting = recv_until(sock, lambda d: d.endswith(b"\r\n"))
            if greeting.startswith(b"+OK"):
                self.addCleanup(sock.close)
                return sock
            sock.close()
            self.assertEqual(greeting, b"-ERR [SYS/TEMP] too many sessions, try again later\r\n")
            return None

        sock = wait_for(lambda: session("127.0.0.1"), timeout=8, what="a POP3 session after the hang-ups")

        def hang_up_after(source: str, command: bytes) -> bytes:
            """What a session answers to ``command`` when its client hangs up
            right after: the answer to a failed login is not waited for."""
            one = wait_for(lambda: session(source), timeout=8, what="a POP3 session")
            one.sendall(command)
            one.shutdown(socket.SHUT_WR)
            return recv_all(one)

        # The guesser's address gets a session too, and its login is checked,
        # not refused as in progress: the hang-ups freed their slots.
        self.assertEqual(hang_up_after("127.0.0.2", b"USER bob\r\nPASS wrong\r\n"), b"+OK send PASS\r\n")
        # One failure from the users' address (AUTH PLAIN acting as another
        # user fails unchecked, and counts), seen by the server once it closes.
        plain = base64.b64encode(b"alice\0bob\0builder")
        self.assertEqual(hang_up_after("127.0.0.1", b"AUTH PLAIN " + plain + b"\r\n"), b"")
        # The right password from there waits the address's penalty too
        # (answered at once, it told a guesser to hang up and try the next).
        started = time.monotonic()
        sock.sendall(b"USER bob\r\nPASS builder\r\nSTAT\r\n")
        self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\r\n")), b"+OK send PASS\r\n")
        answer = recv_until(sock, lambda d: d.count(b"\r\n") >= 2, timeout=MAX_AUTH_DELAY + 10)
        waited = time.monotonic() - started
        self.assertTrue(answer.startswith(b"+OK bob's maildrop"), answer)
        self.assertTrue(answer.endswith(b"\r\n+OK 0 0\r\n"), answer)  # STAT waited behind it
        self.assertGreaterEqual(waited, 9.5)  # 10 s: one failure counted
        self.assertLess(waited, MAX_AUTH_DELAY)


class LocalWriterEndToEndTests(SynchronousTestCase):
    """alice can write her own Maildir and makes a part of it a link into
    bob's: the real server refuses her login, says so in one line, and
    neither lists, removes, sweeps nor creates anything of bob's. (Regressions:
    ``new -> ../bob/new`` listed bob's mail and DELE 1 + QUIT removed it; the
    tmp/ sweep ran in bob's cur/; a dangling lock link had its target created.)"""

    def setUp(self) -> None:
        self.box = Box(self)
        self.bobs = self.box.deliver(b"Subject: for bob\n\nbob's\n", "bob")
        self.alice = Maildir(self.box.root / "alice").create().path

    def refused(self, *args: str) -> Suite:
        """alice's login (then DELE 1 and QUIT, were it let in): refused, and the server serves bob."""
        suite = start(self, self.box, *args)
        client = poplib.POP3("127.0.0.1", suite.address("pop3")[1], timeout=20)
        self.addCleanup(client.close)
        client.user("alice")
        with self.assertRaises(poplib.error_proto) as raised:
            client.pass_("secret")
            client.dele(1)
            client.quit()
        self.assertEqual(raised.exception.args[0], b"-ERR [SYS/TEMP] cannot open the mailbox")
        suite.wait_log("cannot open the mailbox of alice: ")
        self.assertEqual(len([line for line in suite.lines if "cannot open the mailbox" in line]), 1)
        self.assertFalse(suite.saw("Traceback"))
        bob = poplib.POP3("127.0.0.1", suite.address("pop3")[1], timeout=20)
        self.addCleanup(bob.close)
        bob.apop("bob", "builder")
        self.assertEqual(bob.stat()[0], 1)
        bob.quit()
        self.assertEqual(self.bobs.read_bytes(), b"Subject: for bob\n\nbob's\n")
        return suite

    def test_a_linked_new_dele_and_quit_leave_bobs_mail(self) -> None:
        os.rmdir(self.alice / "new")
        os.symlink("../bob/new", self.alice / "new")
        self.refused()

    def test_a_linked_tmp_is_not_swept(self) -> None:
        os.rmdir(self.alice / "tmp")
        os.symlink("../bob/new", self.alice / "tmp")
        self.refused()

    def test_a_dangling_lock_link_creates_nothing(self) -> None:
        os.symlink("../bob/created-by-alice", self.alice / "sockproto-pop3.lock")
        self.refused()
        self.assertFalse(os.path.lexists(self.box.root / "bob" / "created-by-alice"))
