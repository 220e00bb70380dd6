"""
Interpreter settings for imkit's own long-running processes (the server, ``imkit send``/``listen``).

The garbage collector: every message makes a handful of short-lived objects, and up to a window of them stay alive
until acknowledged.  With CPython's default thresholds (700, 10, 10) the young generation is
collected every 700 allocations, and each collection scans the in-flight objects again and
promotes them, so the old generations fill and are scanned too: measured at 10-20% of the
server's reactor CPU (``benchmarks/bench_server.py``).  Reference counting frees almost all of
these objects anyway; the collector is only needed for cycles, which are rare here.

Thread switching, in the server only: see ``tune_thread_switching``.
"""

from __future__ import annotations

import gc
import sys

YOUNG_THRESHOLD = 50_000
"""Allocations between young collections: rare enough to cost little, often enough to bound cycles."""


def tune_garbage_collector(young: int = YOUNG_THRESHOLD, collect: bool = True) -> None:
    """
    Move everything start-up made (modules, classes, the generated codec) out of the collector's
    sight with ``gc.freeze()``, and collect the young generation every ``young`` allocations.
    Call once, when start-up is done; ``collect=False`` skips the full collection first (a
    short-lived command's start-up left little garbage, and every millisecond shows).
    """
    if collect:
        gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


SWITCH_INTERVAL = 0.0005
"""Seconds a busy thread keeps the GIL while another waits for it (CPython's default: 0.005)."""


def tune_thread_switching(interval: float = SWITCH_INTERVAL) -> None:
    """
    The server's reactor thread and its SQLite writer thread share the GIL.  The writer lets go
    of it for every statement SQLite runs, and needs it back to go on; behind a busy reactor it
    waits up to the switch interval each time, so a batch of a dozen statements could take 60 ms
    with the default.  A shorter interval keeps the writer's commits, and so the acks, flowing:
    measured with bench_e2e's lean clients, about 15% more messages per second at the same CPU.
    """
    sys.setswitchinterval(interval)
