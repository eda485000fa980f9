"""No path outside the HTTP root is reachable, by any encoding, symlink or case trick.

A hypothesis strategy builds traversal-style targets from the tricks scanners
use: ``..`` and ``/`` percent-encoded once and twice, in overlong UTF-8 and in
look-alike characters, backslashes raw and encoded, NUL, ``;`` parameters,
mixed case, empty and ``.`` segments, and names of symlinks that point out of
the root (directly, through chains, through a folder, up with ``..``, in a
loop). Every target is checked three ways: which resource the site resolves it
to (unit), what the real site answers over a StringTransport, and a chosen few
with ``curl --path-as-is`` against the running daemon.

Hard links are out of scope: a hard link inside the root *is* a file of the
root (only someone who can write there can make one).
"""

from __future__ import annotations

import os

from hypothesis import event, given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from sockproto import http
from sockproto.config import HttpSettings
from sockproto.http_files import SafeFile
from sockproto.stats import Stats
from tests.support import ALL_OFF, Suite
from tests.test_http import Harness
from tests.test_http_e2e import Client
from tests.test_http_files import make_tree, resolve

SECRET = b"TOP-SECRET-e3b0c442"  # in every file outside the root
HIDDEN = b"HIDDEN-98fc1c14"  # in every dotfile inside it

DOTS = [
    "..", ".", "...", "....", "%2e%2e", "%2E%2e", ".%2e", "%2e.", "%2e", "%252e%252e", "%25252e%25252e",
    "%c0%ae%c0%ae", "%c0%2e%c0%2e", "%e0%80%ae%e0%80%ae", "%f0%80%80%ae", "%c0%ae", "%u002e%u002e",
    "%ef%bc%8e%ef%bc%8e", "%e2%80%a4%e2%80%a4", "..;", "..%00", "..%3b", ".%00.", "%2e%2e%00",
]  # fmt: skip
SLASHES = [
    "/", "//", "%2f", "%2F", "%252f", "%c0%af", "%e0%80%af", "%5c", "%5C", "\\", "%255c", "%c1%9c",
    "%ef%bc%8f", "/./", "/%2e/", "%00/", ";/",
]  # fmt: skip
NAMES = [
    "outside", "OUTSIDE", "Outside", "secret.txt", "SECRET.TXT", "secret.txt%00.png", "secret.txt.",
    "etc", "passwd", "a.txt", "A.TXT", "sub", "SUB", "b.txt", ".hidden", ".HIDDEN", "%2ehidden",
    ".git", "config", "link_out", "LINK_OUT", "abs_out", "dir_out", "link_up", "loop", "chain", "dir_in",
    "link_in", "via_sub", "up", "root", "root_link", "fifo", "tmp", "%00", "%ff", "caf%C3%A9.txt", "",
    "dotenv", "repo",
]  # fmt: skip
# Segments joined by separators (mostly a plain "/"), sometimes run together.
steps = st.tuples(
    st.one_of(st.sampled_from(DOTS), st.sampled_from(NAMES)),
    st.one_of(st.just("/"), st.just(""), st.sampled_from(SLASHES)),
)
traversals = st.lists(steps, min_size=1, max_size=8).map(
    lambda parts: "/files/" + "".join(segment + separator for segment, separator in parts)
)


def add_tricks(top: str) -> None:
    """More ways out than make_tree's: chains, a link inside a linked folder, markers."""
    root = os.path.join(top, "root")
    for name in ("outside/secret.txt", "outside/SECRET.TXT", "secret.txt", "passwd"):
        with open(os.path.join(top, name), "wb") as file:
            file.write(SECRET + b"\n")
    for name in ("root/.hidden", "root/.HIDDEN", "root/sub/.hidden", "root/.git/config"):
        with open(os.path.join(top, name), "wb") as file:
            file.write(HIDDEN + b"\n")
    os.symlink("chain2", os.path.join(root, "chain"))
    os.symlink("../outside/secret.txt", os.path.join(root, "chain2"))
    os.symlink("..", os.path.join(root, "sub", "up"))  # the root itself: allowed
    os.makedirs(os.path.join(top, "outside", "deeper"))
    os.symlink("../../root/sub", os.path.join(top, "outside", "deeper", "back"))
    os.symlink("../outside/deeper", os.path.join(root, "via_sub"))  # out, then back in: refused


class ResolutionTests(SynchronousTestCase):
    """Which resource each target reaches (the site's traversal, no sockets)."""

    def setUp(self) -> None:
        self.top = make_tree(self)
        add_tricks(self.top)
        self.real_root = os.path.realpath(os.path.join(self.top, "root"))
        self.root = http.make_root(HttpSettings(root=os.path.join(self.top, "root")), Stats(), None)

    @given(traversals)
    def test_nothing_outside_the_root_resolves(self, target: str) -> None:
        found, _ = resolve(self.root, target)
        if not isinstance(found, SafeFile):
            return
        real = os.path.realpath(found.path)
        self.assertTrue(real == self.real_root or real.startswith(self.real_root + os.sep), (target, real))
        inside = os.path.relpath(real, self.real_root)
        self.assertFalse(any(part.startswith(".") and part != "." for part in inside.split(os.sep)), target)
        self.assertTrue(os.path.isfile(real) or os.path.isdir(real), target)

    def test_the_tricks_are_there(self) -> None:
        """The tree really has ways out, so the property above is not empty."""
        for link in ("link_out", "abs_out", "dir_out", "chain", "via_sub", "sub/link_up"):
            real = os.path.realpath(os.path.join(self.real_root, link))
            self.assertFalse(real.startswith(self.real_root + os.sep), link)
        with open(os.path.join(self.real_root, "chain"), "rb") as file:
            self.assertIn(SECRET, file.read())


class SiteTests(SynchronousTestCase):
    """What the real site answers, for GET and HEAD, with and without listings."""

    def setUp(self) -> None:
        self.top = make_tree(self)
        add_tricks(self.top)
        root = os.path.join(self.top, "root")
        clock = Clock()
        self.sites = [
            Harness(self, root=root, clock=clock),
            Harness(self, root=root, listing=True, clock=clock),
        ]

    @given(traversals, st.sampled_from(["GET", "HEAD"]), st.booleans())
    def test_no_secret_ever_served(self, target: str, method: str, listing: bool) -> None:
        connection = self.sites[listing].connect()
        with capturedLogs() as events:
            (response,) = connection.request(target, method)
        connection.lose()
        event(f"status {response.status}")
        self.assertNotIn(SECRET, response.body, target)
        self.assertNotIn(HIDDEN, response.body, target)
        self.assertIn(response.status, (200, 206, 301, 302, 400, 403, 404), target)
        self.assertEqual([e for e in events if "log_failure" in e], [], target)
        if response.status == 200 and method == "GET" and b"<html" not in response.body:
            self.assertIn(response.body, {b"hello\n", b"bee\n", b"coffee\n"}, target)

    def test_links_inside_followed_links_out_and_back_not(self) -> None:
        """Each step must stay inside: a link out is refused even if a later one leads back."""
        for target, status, body in (
            ("/files/sub/up/a.txt", 200, b"hello\n"),
            ("/files/dir_in/b.txt", 200, b"bee\n"),
            ("/files/via_sub/back/b.txt", 404, b"not found\n"),
        ):
            (response,) = self.sites[0].connect().request(target)
            self.assertEqual((response.status, response.body), (status, body), target)


# Chosen from the strategy's categories, for the real daemon and curl.
CURL_TARGETS = [
    "/files/../secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/%252e%252e/secret.txt",
    "/files/%c0%ae%c0%ae/secret.txt",
    "/files/..%c0%afsecret.txt",
    "/files/..%5csecret.txt",
    "/files/..\\secret.txt",
    "/files/%2e%2e%5c%2e%2e%5csecret.txt",
    "/files/sub/..%2f..%2fsecret.txt",
    "/files/%2fetc%2fpasswd",
    "/files/OUTSIDE/SECRET.TXT",
    "/files/dir_out/SECRET.TXT",
    "/files/chain",
    "/files/via_sub/../../outside/secret.txt",
    "/files/sub/link_up/secret.txt",
    "/files/loop/x",
    "/files/.HIDDEN",
    "/files/%2eHIDDEN",
    "/files/a.txt%00.png",
    "/files/..;/secret.txt",
]


class CurlTests(SynchronousTestCase):
    def test_no_escape_with_curl_path_as_is(self) -> None:
        top = make_tree(self)
        add_tricks(top)
        suite = Suite(
            [*ALL_OFF, "--http-port", "0", "--http-root", os.path.join(top, "root"), "--http-listing"]
        ).start()
        self.addCleanup(suite.stop)
        client = Client(self, suite)
        for target in CURL_TARGETS:
            code, body = client.curl(target)
            self.assertIn(code, (400, 404), target)
            self.assertNotIn(SECRET, body, target)
            self.assertNotIn(HIDDEN, body, target)
        self.assertEqual(client.curl("/files/sub/up/sub/b.txt"), (200, b"bee\n"))
        self.assertFalse(suite.saw("Traceback"))
