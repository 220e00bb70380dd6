"""
Every imkit benchmark in turn: ``python benchmarks/run.py [--quick] [--count N] [--profile]``.

1. ``bench_codec.py``: encode and decode cost per frame (generated codec, construct, struct).
2. ``bench_server.py``: the server alone, in process, without TLS or client processes: CPU per
   message of the hub, sessions and SQLite store (the steadiest figure for the hot path).
3. ``bench_sqlite_layout.py``: the SQLite writer's CPU per message, today's layout against a
   segment layout (a run of messages in one row).
4. ``bench_e2e.py``: durable 1:1 throughput, latency and CPU per message over loopback TLS,
   imkit against Mosquitto (QoS 1) and against a relay that stores nothing.
5. ``bench_pipeline.py``: ``seq | imkit send`` into ``imkit listen`` against
   ``seq | mosquitto_pub`` into ``mosquitto_sub``.
6. ``bench_group.py``: fan-out to a group of 1,000 members with 200 online over loopback TLS:
   latency to the last online member, server CPU per message and per delivered copy, and the
   rate a pipelined sender sustains.
7. ``bench_attack.py``: an honest chat's latency p50/p99, quiet and while a local attacker runs
   slowloris, a connection flood, oversized frames and slow readers against the server.

Each runs as a process of its own, with the working tree's ``src`` first on the path; a failing
one is reported and the others still run.  The exit status is 1 if any failed.  Defaults finish
in a few minutes on a small machine; ``--quick`` in well under one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _harness import child_env, stop_cleanly_on_sigterm  # noqa: E402

TIMEOUT = 1800
"""Seconds one benchmark may take at most."""


def stop(child: subprocess.Popen) -> None:
    """SIGTERM: the benchmark stops its servers and clients, then exits; SIGKILL if it does not."""
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, noisier runs of every benchmark")
    parser.add_argument("--count", type=int, help="messages per run for bench_e2e and bench_pipeline (default 20000, --quick 5000)")
    parser.add_argument("--profile", action="store_true", help="add bench_e2e's profile of the imkit server (needs yappi)")
    opts = parser.parse_args(argv)
    stop_cleanly_on_sigterm()
    quick = ["--quick"] if opts.quick else []
    count = ["--count", str(opts.count)] if opts.count else []
    benchmarks = [
        ("bench_codec.py", quick),
        ("bench_server.py", ["--count", "5000"] if opts.quick else []),
        ("bench_sqlite_layout.py", ["--count", "10000", "--runs", "1"] if opts.quick else []),
        ("bench_e2e.py", quick + count + (["--profile"] if opts.profile else [])),
        ("bench_pipeline.py", quick + count),
        ("bench_group.py", quick),
        ("bench_attack.py", quick),
    ]
    failed = []
    for name, arguments in benchmarks:
        command = [sys.executable, os.path.join(HERE, name), *arguments]
        print(f"=== {name} {' '.join(arguments)}".rstrip(), flush=True)
        started = time.monotonic()
        child = subprocess.Popen(command, env=child_env())
        try:
            status: int | str = child.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            stop(child)
            status = f"timed out after {TIMEOUT} s"
        except BaseException:  # Ctrl-C, SIGTERM: let the benchmark stop what it started first
            stop(child)
            raise
        print(f"=== {name}: {'ok' if status == 0 else f'FAILED ({status})'} in {time.monotonic() - started:.0f} s\n", flush=True)
        if status != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
