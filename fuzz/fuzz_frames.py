"""
atheris target: the frame reader and the generated decoders.

One control byte (frame limit, chunk size), then a byte stream, decoded whole and in chunks
(``fuzz.harness.run_frames_input``).

    python fuzz/fuzz_frames.py fuzz/corpus/frames -max_total_time=60    # fuzz (python fuzz/run.py does this)
    python fuzz/fuzz_frames.py CRASH_FILE                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz._atheris import fuzz  # noqa: E402

if __name__ == "__main__":
    fuzz("frames")
