import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


@pytest.fixture(autouse=True, scope="session")
def _run_in_a_scratch_directory(tmp_path_factory):
    """trial's mktemp() and servers' default files land in the working directory: keep the checkout clean."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)
