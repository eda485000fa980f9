"""The one safe opener (sockproto.files.Tree) on real files, links and FIFOs."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from sockproto import files
from sockproto.files import MAX_HOPS, RefusedPathError, Tree
from tests.support import DEADLINE, temp_dir


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        top = temp_dir(self)
        self.root = os.path.join(top, "root")
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(os.path.join(self.root, ".git"))
        os.makedirs(os.path.join(top, "outside"))
        for name, text in {
            "root/a.txt": "hello\n",
            "root/sub/b.txt": "bee\n",
            "root/.env": "SECRET=1\n",
            "root/.git/config": "[core]\n",
            "outside/secret.txt": "secret\n",
        }.items():
            with open(os.path.join(top, name), "w") as file:
                file.write(text)
        links = {
            "link_in": "a.txt",
            "dir_in": "sub",
            "sub/up": "..",
            "sub/back": "../a.txt",
            "abs_in": os.path.join(self.root, "sub", "b.txt"),
            "link_out": "../outside/secret.txt",
            "abs_out": os.path.join(top, "outside", "secret.txt"),
            "sub/link_up": "../..",
            "dir_out": "../outside",
            "chain": "chain2",
            "chain2": "link_out",
            "loop": "loop",
            "dotenv": ".env",
            "repo": ".git",
            "hidden_way": "sub/../.git/config",
        }
        for name, target in links.items():
            os.symlink(target, os.path.join(self.root, name))
        os.mkfifo(os.path.join(self.root, "fifo"))
        os.symlink("fifo", os.path.join(self.root, "fifo_link"))
        self.tree = Tree(self.root)

    def read(self, path: str) -> bytes:
        file, info = self.tree.open_file(path)
        with file:
            self.assertTrue(stat.S_ISREG(info.st_mode))
            self.assertEqual(os.fstat(file.fileno()).st_ino, info.st_ino)
            return file.read()

    def test_files_and_links_inside_are_opened(self) -> None:
        self.assertEqual(self.read("a.txt"), b"hello\n")
        self.assertEqual(self.read("sub/b.txt"), b"bee\n")
        self.assertEqual(self.read("link_in"), b"hello\n")
        self.assertEqual(self.read("dir_in/b.txt"), b"bee\n")
        self.assertEqual(self.read("sub/up/a.txt"), b"hello\n")
        self.assertEqual(self.read("sub/back"), b"hello\n")
        self.assertEqual(self.read("abs_in"), b"bee\n")

    def test_links_out_are_refused(self) -> None:
        for path in ("link_out", "abs_out", "sub/link_up/outside/secret.txt", "dir_out/secret.txt", "chain"):
            with self.assertRaises(RefusedPathError, msg=path):
                self.tree.open(path)

    def test_dotfiles_are_refused_through_plain_names_too(self) -> None:
        # Regression: static.File served dotenv -> .env and /files/repo/config.
        for path in (".env", "dotenv", "repo/config", "hidden_way", ".git/config"):
            with self.assertRaises(RefusedPathError, msg=path):
                self.tree.open(path)
            with self.assertRaises(RefusedPathError, msg=path):
                self.tree.stat(path)

    def test_a_fifo_is_refused_without_blocking(self) -> None:
        # Regression: open() of a FIFO waits for a writer, and the reactor with it.
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            for path in ("fifo", "fifo_link"):
                try:
                    self.tree.open(path)
                except RefusedPathError as error:
                    outcome.append(error)
                else:
                    outcome.append(None)

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(DEADLINE)
        if thread.is_alive():
            with open(os.path.join(self.root, "fifo"), "wb"):  # unblock the thread
                pass
            self.fail("opening a FIFO blocked")
        self.assertEqual([type(error) for error in outcome], [RefusedPathError, RefusedPathError])

    def test_a_loop_ends_at_the_hop_limit(self) -> None:
        with self.assertRaises(RefusedPathError):
            self.tree.open("loop")
        for i in range(MAX_HOPS):
            os.symlink(f"hop{i + 1}", os.path.join(self.root, f"hop{i}"))
        os.symlink("a.txt", os.path.join(self.root, f"hop{MAX_HOPS}"))
        self.assertEqual(self.read("hop1"), b"hello\n")  # MAX_HOPS links
        with self.assertRaises(RefusedPathError):
            self.tree.open("hop0")  # one more

    def test_folders_and_missing_files(self) -> None:
        self.assertTrue(stat.S_ISDIR(self.tree.stat("sub").st_mode))
        self.assertTrue(stat.S_ISDIR(self.tree.stat(".").st_mode))
        self.assertTrue(stat.S_ISREG(self.tree.stat("link_in").st_mode))
        self.assertRaises(IsADirectoryError, self.tree.open, "sub")
        self.assertRaises(FileNotFoundError, self.tree.open, "missing")
        self.assertRaises(NotADirectoryError, self.tree.open, "a.txt/more")
        self.assertRaises(RefusedPathError, self.tree.open, "..")
        self.assertRaises(RefusedPathError, self.tree.stat, "fifo")

    def test_no_symlinks_at_all_when_asked(self) -> None:
        strict = Tree(self.root, follow_symlinks=False)
        with strict.open_file("a.txt")[0] as file:
            self.assertEqual(file.read(), b"hello\n")
        for path in ("link_in", "dir_in/b.txt", "abs_in"):
            self.assertRaises(RefusedPathError, strict.open, path)

    def test_a_file_swapped_for_a_link_is_not_followed(self) -> None:
        # Regression (check-then-open): the name is resolved and opened in one walk.
        path = os.path.join(self.root, "a.txt")
        os.unlink(path)
        os.symlink(os.path.join(os.path.dirname(self.root), "outside", "secret.txt"), path)
        self.assertRaises(RefusedPathError, self.tree.open, "a.txt")

    def test_no_descriptor_is_left_open(self) -> None:
        before = open_fds()
        opened = 0
        for path in (
            "a.txt",
            "dir_in/b.txt",
            "link_out",
            "fifo",
            "loop",
            "missing",
            "a.txt/x",
            "sub",
            "repo/config",
        ):
            try:
                self.tree.stat(path)
                os.close(self.tree.open(path).fd)
                opened += 1
            except OSError:
                continue
        self.assertEqual((opened, open_fds()), (2, before))

    def open_swapped_after_probe(self, path: str, make: Callable[[str], None]) -> OSError | None:
        """Open ``path`` (under the root) with ``make`` run on it right after its
        last name is probed; the error, or None if it was opened. In a thread: a
        FIFO opened as a plain file fails the test instead of hanging it."""
        full = os.path.join(self.root, path)
        probed = files._probe
        swapped: list[str] = []

        def probe_then_swap(component: str, at: int) -> tuple[int, os.stat_result]:
            found = probed(component, at)
            if component == os.path.basename(full) and not swapped:
                swapped.append(component)
                make(full)
            return found

        self.patch(files, "_probe", probe_then_swap)
        outcome: list[OSError | None] = []

        def attempt() -> None:
            try:
                opened = self.tree.open(path)
            except OSError as error:
                outcome.append(error)
            else:
                os.close(opened.fd)
                outcome.append(None)

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(DEADLINE)
        if thread.is_alive():
            with open(full, "wb"):  # unblock the thread
                pass
            self.fail(f"opening {path} blocked")
        self.assertEqual(swapped, [os.path.basename(full)])
        return outcome[0]

    def test_a_file_swapped_right_after_its_probe_is_refused(self) -> None:
        # Regression (review): nothing covered the window between probing the
        # last name and opening it for reading; O_NOFOLLOW on that open, the
        # S_ISREG check of its fstat and the close of a refused descriptor
        # could each go unnoticed. The swap here comes right after the probe.
        outside = os.path.join(os.path.dirname(self.root), "outside", "secret.txt")

        def link(path: str) -> None:
            os.unlink(path)
            os.symlink(outside, path)

        def fifo(path: str) -> None:
            os.unlink(path)
            os.mkfifo(path)

        def folder(path: str) -> None:
            os.unlink(path)
            os.mkdir(path)

        for make in (link, fifo, folder):
            path = os.path.join("sub", f"{make.__name__}.txt")
            with open(os.path.join(self.root, path), "w") as file:
                file.write("served\n")
            before = open_fds()
            error = self.open_swapped_after_probe(path, make)
            self.assertIsInstance(error, OSError, path)
            assert error is not None
            self.assertTrue(isinstance(error, RefusedPathError) or error.errno == errno.ELOOP, repr(error))
            self.assertEqual(open_fds(), before, path)
