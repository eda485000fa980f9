"""A plain ``pip install .`` into a fresh virtualenv gives twistd the plugin.

This guards the packaging pitfalls of DESIGN.md: ``twisted/plugins`` has no
``__init__.py``, so it must be listed by hand or the wheel ships no plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import REPO, temp_dir

TWISTD = "from twisted.scripts.twistd import run; run()"


class FreshInstallTests(SynchronousTestCase):
    def test_plugin_visible_after_plain_install(self) -> None:
        folder = Path(temp_dir(self))
        target = folder / "venv"
        venv.create(target, with_pip=False)
        python = target / "bin" / "python"
        site = Path(
            subprocess.check_output(
                [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
            ).strip()
        )
        # Twisted and friends come from the test environment (no download);
        # sockproto itself only from the wheel installed below.
        (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
        install = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--quiet",
                "--no-deps",
                str(REPO),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(install.returncode, 0, install.stderr)
        self.assertTrue((site / "twisted" / "plugins" / "sockproto_plugin.py").exists())
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOCKPROTO_CONFIG")}

        def twistd(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [python, "-c", TWISTD, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=60
            )

        listing = twistd("--help")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn("sockproto", listing.stdout)
        help_text = twistd("sockproto", "--help")
        self.assertIn("--max-clients=", help_text.stdout)
        where = subprocess.run(
            [python, "-c", "import sockproto; print(sockproto.__file__)"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
        )
        self.assertTrue(where.stdout.startswith(str(site)), where.stdout)
