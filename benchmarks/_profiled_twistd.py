"""
``twistd`` under yappi, for ``bench_e2e.py --profile``: CPU time per function, in every thread.

Usage: ``python benchmarks/_profiled_twistd.py OUTPUT.json TWISTD_ARGUMENTS...``.  Nothing is
profiled until the first SIGUSR2 (so start-up and logins are left out); the second one stops the
profiler and writes OUTPUT.json: per thread its CPU seconds and per function its calls, own and
inclusive CPU seconds.  Builtins (sqlite3, OpenSSL through cffi, socket calls) are profiled as
functions of their own (without them, yappi counts their time in no function's own time), unless
IMKIT_PROFILE_BUILTINS=0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import yappi


def toggle(output: str) -> Any:
    def handler(signum: int, frame: Any) -> None:
        if not yappi.is_running():
            yappi.clear_stats()
            yappi.set_clock_type("cpu")
            yappi.start(builtins=os.environ.get("IMKIT_PROFILE_BUILTINS", "1") == "1", profile_threads=True)
            return
        yappi.stop()
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        threads = []
        for thread in yappi.get_thread_stats():
            functions = [
                {
                    "name": stat.name,
                    "module": stat.module,
                    "line": stat.lineno,
                    "calls": stat.ncall,
                    "own": stat.tsub,
                    "inclusive": stat.ttot,
                }
                for stat in yappi.get_func_stats(filter={"ctx_id": thread.id})
            ]
            main = thread.name == "_MainThread"
            name = "reactor" if main else names.get(thread.tid, thread.name)
            threads.append({"name": name, "main": main, "cpu": thread.ttot, "functions": functions})
        partial = output + ".partial"
        with open(partial, "w") as f:
            json.dump({"threads": threads}, f)
        os.replace(partial, output)

    return handler


def main() -> None:
    output, *arguments = sys.argv[1:]
    signal.signal(signal.SIGUSR2, toggle(output))
    sys.argv = ["twistd", *arguments]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
