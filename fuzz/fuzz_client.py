"""
atheris target: the client session.

One control byte (start disconnected, awaiting HelloOk, awaiting LoginResult or logged in with
sends pending; password or token; frame limit; chunk size), then the bytes a hostile server sends,
fed to a ``ClientCore`` on a fake clock (``fuzz.harness.run_client_input``).

    python fuzz/fuzz_client.py fuzz/corpus/client -max_total_time=60    # fuzz (python fuzz/run.py does this)
    python fuzz/fuzz_client.py CRASH_FILE                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz._atheris import fuzz  # noqa: E402

if __name__ == "__main__":
    fuzz("client")
