"""What cannot work is refused at start: one clear error line, a non-zero
exit, never a half-started suite. (A port already taken: test_e2e_suite.)"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sockproto.listening import StartupError
from sockproto.pop3 import check_maildir_root
from tests.support import ALL_OFF, run_twistd, temp_dir
from tests.test_pop3_e2e import make_certificate

NOBODY = 65534


class MaildirRootTests(SynchronousTestCase):
    def test_made_when_missing(self) -> None:
        root = Path(temp_dir(self), "mail", "root")
        check_maildir_root(root)
        self.assertTrue(root.is_dir())

    def test_refused_when_not_a_folder(self) -> None:
        folder = Path(temp_dir(self))
        (folder / "file").write_text("")
        error = self.assertRaises(StartupError, check_maildir_root, folder / "file")
        self.assertEqual(str(error), f"pop3: the Maildir root {folder / 'file'} (--maildir) is not a folder")
        error = self.assertRaises(StartupError, check_maildir_root, folder / "file" / "mail")
        self.assertEqual(
            str(error),
            f"pop3: cannot make the Maildir root {folder / 'file' / 'mail'} (--maildir): Not a directory",
        )


class EndToEndTests(SynchronousTestCase):
    def refused(self, args: list[str], twistd_args: tuple[str, ...] = ()) -> tuple[str, str]:
        """Runs the suite with strip and chat on too; returns (error line, log)."""
        result = run_twistd(
            [
                "-n",
                "--pidfile",
                "",
                *twistd_args,
                "sockproto",
                *ALL_OFF,
                "--port",
                "0",
                "--chat-port",
                "0",
                *args,
            ]
        )
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("sockproto ready", output)
        return result.stderr.strip(), result.stdout

    def test_maildir_root_not_writable_by_the_server_user(self) -> None:
        """Checked as the user the server runs as: with twistd --uid, after
        privileges are dropped, not as root before."""
        folder = Path(temp_dir(self))
        os.chmod(folder, 0o755)
        root = folder / "mail"
        root.mkdir(mode=0o755)
        twistd_args: tuple[str, ...] = ()
        if os.geteuid() == 0:
            twistd_args = ("--uid", str(NOBODY), "--gid", str(NOBODY))
            uid = NOBODY
        else:
            os.chmod(root, 0o555)
            self.addCleanup(os.chmod, root, 0o755)
            uid = os.getuid()
        error, log = self.refused(["--pop3-port", "0", "--maildir", str(root)], twistd_args)
        self.assertEqual(
            error,
            f"sockproto: error: pop3: the Maildir root {root} (--maildir) is not writable by the user "
            f"the server runs as (uid {uid})",
        )
        self.assertIn("strip listening on", log)  # bound, then closed again: not half-started

    def test_maildir_root_under_a_file(self) -> None:
        folder = Path(temp_dir(self))
        (folder / "file").write_text("")
        error, _ = self.refused(["--pop3-port", "0", "--maildir", str(folder / "file" / "mail")])
        self.assertIn("pop3: cannot make the Maildir root", error)
        self.assertTrue(error.endswith("(--maildir): Not a directory"))

    def test_ssl_endpoint_without_tls_files(self) -> None:
        error, _ = self.refused(["--http-port", "ssl:0:interface=127.0.0.1"])
        self.assertEqual(
            error,
            "twistd sockproto: error: http: ssl:0:interface=127.0.0.1 needs --tls-cert (and --tls-key),"
            " or privateKey= and certKey= in it",
        )

    def test_missing_tls_key(self) -> None:
        folder = Path(temp_dir(self))
        cert, _ = make_certificate(folder)
        missing = folder / "missing-key.pem"
        error, _ = self.refused(["--pop3-port", "0", "--tls-cert", cert, "--tls-key", str(missing)])
        self.assertEqual(
            error, f"twistd sockproto: error: --tls-key: cannot read {missing}: No such file or directory"
        )

    def test_tls_key_of_another_certificate(self) -> None:
        folder = Path(temp_dir(self))
        cert, _ = make_certificate(folder)
        _, other = make_certificate(folder / "other")
        error, _ = self.refused(["--pop3-port", "0", "--tls-cert", cert, "--tls-key", other])
        self.assertEqual(
            error,
            f"twistd sockproto: error: --tls-key: the private key in {other} does not belong to the "
            f"certificate in {cert}",
        )

    def test_missing_file_in_an_ssl_endpoint(self) -> None:
        missing = Path(temp_dir(self), "key.pem")
        error, _ = self.refused(["--http-port", f"ssl:0:privateKey={missing}"])
        self.assertIn(f"--http-port: endpoint 'ssl:0:privateKey={missing}': cannot read {missing}", error)
