"""
Run imkit's atheris fuzz targets: ``python fuzz/run.py [--time SECONDS] [--target NAME ...]``.

Targets (each a script of its own in this directory, run as a separate process, since libFuzzer
ends the process it runs in):

``frames``
    The frame reader and the generated decoders (and operation bodies inside messages).
``server``
    A ``ServerConnection`` driven through the Hello and login states on a fake clock.
``client``
    A ``ClientCore`` fed by a hostile server.

Before each run the seed corpus (valid frames and honest conversations, ``fuzz.harness``) is
written into ``fuzz/corpus/<target>/``, which libFuzzer then grows; inputs that break a rule are
saved as ``fuzz/crashes/<target>-crash-<hash>`` and replay with ``python fuzz/fuzz_<target>.py
FILE``.  At the end one line per target gives the inputs run, coverage and findings; the exit
status is 1 if any target found something.  Needs ``pip install '.[fuzz]'`` (atheris).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = ("frames", "server", "client")
MAX_LEN = 4096
"""Longest input libFuzzer makes: a few dozen frames, and past the small frame limit."""


def write_seeds(target: str, corpus: str) -> int:
    sys.path[:0] = [os.path.join(ROOT, "src"), ROOT]
    try:
        from fuzz import harness
    finally:
        del sys.path[:2]
    os.makedirs(corpus, exist_ok=True)
    count = 0
    for seed in harness.SEEDS[target]():
        name = os.path.join(corpus, "seed-" + hashlib.sha1(seed).hexdigest()[:16])
        if not os.path.exists(name):
            with open(name, "wb") as out:
                out.write(seed)
        count += 1
    return count


_STATS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def run(target: str, seconds: int, extra: list[str]) -> dict:
    corpus = os.path.join(HERE, "corpus", target)
    seeds = write_seeds(target, corpus)
    crashes = os.path.join(HERE, "crashes")
    os.makedirs(crashes, exist_ok=True)
    command = [
        sys.executable,
        os.path.join(HERE, f"fuzz_{target}.py"),
        corpus,
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={os.path.join(crashes, target)}-",
        "-print_final_stats=1",
        *extra,
    ]
    print(f"=== {target}: {seeds} seeds, {seconds} s", flush=True)
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    summary = {"target": target, "runs": 0, "cov": 0, "ft": 0, "corp": 0, "artifacts": []}
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        stats = _STATS.match(line)
        if stats:
            summary.update(runs=int(stats[1]), cov=int(stats[2]), ft=int(stats[3]), corp=int(stats[4]))
        elif line.startswith("stat::number_of_executed_units:"):
            summary["runs"] = int(line.split(":")[-1])
        elif "Test unit written to" in line:
            summary["artifacts"].append(line.rsplit(" ", 1)[-1].strip())
    summary["status"] = child.wait()
    summary["seconds"] = time.monotonic() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", type=int, default=60, help="seconds per target (default 60)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="run only this target (repeatable)")
    parser.add_argument("libfuzzer", nargs="*", help="more libFuzzer flags, after --, e.g. -- -jobs=2")
    opts = parser.parse_args(argv)
    results = [run(target, opts.time, opts.libfuzzer) for target in opts.target or TARGETS]
    print()
    failed = False
    for r in results:
        found = ", ".join(r["artifacts"]) or ("nothing" if r["status"] == 0 else f"exit status {r['status']}")
        failed |= bool(r["artifacts"]) or r["status"] != 0
        print(
            f"{r['target']:7} {r['runs']:>9} inputs in {r['seconds']:.0f} s   cov {r['cov']}  ft {r['ft']}  "
            f"corpus {r['corp']}   found: {found}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
