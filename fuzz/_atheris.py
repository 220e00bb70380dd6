"""
What every target script does: put the working tree first on the path, instrument imkit for
coverage (including the codec functions generated at import time), and hand one harness runner to
atheris.  libFuzzer's own arguments pass through: a corpus directory to fuzz, or files to replay.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fuzz(target: str) -> None:
    # The working tree's src before any installed imkit, and this directory as the package fuzz.
    sys.path[:0] = [os.path.join(ROOT, "src"), ROOT]
    import atheris

    # Only imkit is instrumented: coverage counts imkit's code, not the oracle's.
    with atheris.instrument_imports(include=["imkit"]):
        from fuzz import harness
    for function in harness.generated_functions():
        atheris.instrument_func(function)
    atheris.Setup(sys.argv, harness.RUNNERS[target])
    atheris.Fuzz()
