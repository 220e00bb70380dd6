"""
Garbage collector settings for long-running imkit processes (the server, ``imkit send``/``listen``).

Every message makes a handful of short-lived objects, and up to a window of them stay alive
until acknowledged.  With CPython's default thresholds (700, 10, 10) the young generation is
collected every 700 allocations, and each collection scans the in-flight objects again and
promotes them, so the old generations fill and are scanned too: measured at 10-20% of the
server's reactor CPU (``benchmarks/bench_server.py``).  Reference counting frees almost all of
these objects anyway; the collector is only needed for cycles, which are rare here.
"""

from __future__ import annotations

import gc

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
