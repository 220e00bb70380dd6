"""The installed distribution contains every package of the source tree."""

import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackagingTests(SynchronousTestCase):
    def test_every_package_is_listed(self) -> None:
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        listed = {line.strip() for line in config["options"]["packages"].splitlines() if line.strip()}
        found = set()
        for directory, _dirs, files in os.walk(os.path.join(ROOT, "src", "imkit")):
            if "__init__.py" in files:
                found.add(os.path.relpath(directory, os.path.join(ROOT, "src")).replace(os.sep, "."))
        self.assertEqual(found - listed, set(), "add these to [options] packages in setup.cfg")
        self.assertIn("twisted.plugins", listed)
