"""
atheris target: the server session.

One control byte (start before Hello, after Hello or after login; login accepted or refused; frame
limit; chunk size), then the bytes a hostile client sends, fed chunk by chunk to a
``ServerConnection`` on a fake clock (``fuzz.harness.run_server_input``).

    python fuzz/fuzz_server.py fuzz/corpus/server -max_total_time=60    # fuzz (python fuzz/run.py does this)
    python fuzz/fuzz_server.py CRASH_FILE                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz._atheris import fuzz  # noqa: E402

if __name__ == "__main__":
    fuzz("server")
