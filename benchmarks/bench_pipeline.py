"""
The user-visible pipeline: ``seq 1 N | imkit send`` into a running ``imkit listen``, against
``seq 1 N | mosquitto_pub -l -q 1`` into ``mosquitto_sub -q 1 -C N``, both over TLS on 127.0.0.1.

Run ``python benchmarks/bench_pipeline.py`` (``--quick`` for N = 5000 and one run, ``--count N``,
``--runs R``).

For each run, the listener starts first (``imkit -v listen --count N``: ready once it logs its
login, the only readiness signal the CLI gives; ``mosquitto_sub``: ready once the broker logs its
subscription), then the clock starts and the sender pipeline is started.  The time reported is
from starting the sender to the listener printing its Nth line, so it includes starting the
sender process, its TLS handshake and login (a Python process importing Twisted, against a C
program).  Both outputs are checked: exactly N lines, the numbers 1..N in order.

Mosquitto runs twice: with the command as it is usually written (``mosquitto_pub`` keeps at most
20 QoS 1 messages unacknowledged, its default) and with ``-M 1000``, the window ``imkit send``
uses.  The broker is our own, with a TLS listener and persistence on (asynchronous: see the note
printed with the results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _harness import (  # noqa: E402
    CA,
    MOSQUITTO_NOTE,
    BenchError,
    Child,
    Cleanup,
    ImkitServer,
    LoadMeter,
    Mosquitto,
    child_env,
    script,
    stop_cleanly_on_sigterm,
    stop_process,
    version,
    wait_until,
)

PASSWORD = "bench-password"
IMKIT = "imkit send | imkit listen"
DEFAULT = "mosquitto_pub | mosquitto_sub"
WIDE = "same, mosquitto_pub -M 1000"
READY_TIMEOUT = 60.0


def pipe_from_seq(cleanup: Cleanup, count: int) -> subprocess.Popen:
    seq = subprocess.Popen(["seq", "1", str(count)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    cleanup.add(lambda: stop_process(seq, 5))
    return seq


def check_numbers(lines: list[str], count: int, what: str) -> None:
    """``lines`` must be exactly "1".."count", in order."""
    if len(lines) != count:
        raise BenchError(f"{what}: {len(lines)} lines, expected {count}")
    for expected, line in enumerate(lines, 1):
        if line != str(expected):
            raise BenchError(f"{what}: line {expected} is {line[:80]!r}, expected {str(expected)!r}")


def timing(start: float, times: list[float], count: int) -> dict[str, float]:
    return {
        "total": times[count - 1] - start,
        "first": times[0] - start,
        "rate": (count - 1) / (times[count - 1] - times[0]) if count > 1 and times[count - 1] > times[0] else float("nan"),
    }


def cpu(sender: Child, listener: Child, server: float) -> dict[str, float]:
    """CPU seconds of the whole sender and listener processes (start-up included), and of the server meanwhile."""
    assert sender.cpu is not None and listener.cpu is not None
    return {"sender_cpu": sender.cpu, "listener_cpu": listener.cpu, "server_cpu": server}


def imkit_run(cleanup: Cleanup, server: ImkitServer, run: int, count: int, timeout: float) -> dict[str, float]:
    imkit = script("imkit")
    sender, receiver = f"alice{run}", f"bob{run}"
    env = {**child_env(), "IMKIT_PASSWORD": PASSWORD}
    common = ["--server", server.server, "--ca", CA]
    listen = cleanup.child(
        Child(
            "imkit listen",
            [imkit, "-v", "listen", *common, "--user", receiver, "--count", str(count)],
            env=env,
            keep_times=True,
        )
    )
    listen.wait_for(lambda: any("logged in as" in line for line in listen.err_lines), READY_TIMEOUT, "its login")
    server_cpu = server.cpu()
    start = time.time()
    seq = pipe_from_seq(cleanup, count)
    # Its acknowledgements go to a file, as a user would redirect them: not to a pipe we read meanwhile.
    acks_path = os.path.join(cleanup.tempdir("imkit-send-"), "acks.jsonl")
    with open(acks_path, "wb") as acks_file:
        send = cleanup.child(
            Child("imkit send", [imkit, "send", *common, "--user", sender, "--to", receiver], stdin=seq.stdout, stdout=acks_file, env=env)
        )
    assert seq.stdout is not None
    seq.stdout.close()  # imkit send holds the only reading end now
    listen.wait_for(lambda: len(listen.lines) >= count, timeout, f"{count} lines")
    result = timing(start, listen.times, count)
    if send.wait_exit(timeout) != 0:
        raise BenchError(f"imkit send failed (exit {send.proc.returncode}):\n{send.output_tail()}")
    if listen.wait_exit(30) != 0:
        raise BenchError(f"imkit listen failed (exit {listen.proc.returncode}):\n{listen.output_tail()}")
    result.update(cpu(send, listen, server.cpu() - server_cpu))
    bodies = []
    for number, line in enumerate(listen.lines, 1):
        record = json.loads(line)
        if record["seq"] != number or record["sender"] != sender:
            raise BenchError(f"imkit listen line {number} is {line[:200]}: expected seq {number} from {sender}")
        bodies.append(record["body"])
    check_numbers(bodies, count, "imkit listen (bodies)")
    with open(acks_path) as acks_file:
        acks = [json.loads(line)["seq"] for line in acks_file]
    if acks != list(range(1, count + 1)):
        raise BenchError(f"imkit send printed {len(acks)} acknowledgements, not seq 1..{count} in order")
    return result


def mosquitto_run(cleanup: Cleanup, broker: Mosquitto, run: int, count: int, timeout: float, inflight: int | None) -> dict[str, float]:
    topic = f"chat/bob{run}"
    client_id = f"bench-sub-{run}-{inflight or 'default'}"
    tls = ["-h", "localhost", "-p", str(broker.port), "--cafile", CA, "-q", "1", "-t", topic]
    sub = cleanup.child(Child("mosquitto_sub", ["mosquitto_sub", *tls, "-C", str(count), "-i", client_id], keep_times=True))
    wait_until(lambda: broker.subscribed(client_id, topic), READY_TIMEOUT, "mosquitto_sub's subscription")
    broker_cpu = broker.cpu()
    start = time.time()
    seq = pipe_from_seq(cleanup, count)
    argv = ["mosquitto_pub", *tls, "-l"] + (["-M", str(inflight)] if inflight else [])
    pub = cleanup.child(Child("mosquitto_pub", argv, stdin=seq.stdout))
    assert seq.stdout is not None
    seq.stdout.close()
    sub.wait_for(lambda: len(sub.lines) >= count, timeout, f"{count} lines")
    result = timing(start, sub.times, count)
    if pub.wait_exit(timeout) != 0:
        raise BenchError(f"mosquitto_pub failed (exit {pub.proc.returncode}):\n{pub.output_tail()}")
    if sub.wait_exit(30) != 0:
        raise BenchError(f"mosquitto_sub failed (exit {sub.proc.returncode}):\n{sub.output_tail()}")
    result.update(cpu(pub, sub, broker.cpu() - broker_cpu))
    check_numbers(sub.lines, count, "mosquitto_sub")
    return result


def summary(name: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    """The median of each figure over the runs."""
    return {"name": name, "runs": [r["total"] for r in runs], **{key: statistics.median(r[key] for r in runs) for key in runs[0]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=None, help="lines per run (default 20000, --quick 5000)")
    parser.add_argument("--runs", type=int, default=None, help="runs per pipeline, the median is shown (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="fewer lines, one run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a run may take at most (default: from --count)")
    opts = parser.parse_args(argv)
    stop_cleanly_on_sigterm()
    count = opts.count or (5000 if opts.quick else 20000)
    runs = opts.runs or (1 if opts.quick else 3)
    timeout = opts.timeout or 60.0 + count / 100
    if count < 1 or runs < 1:
        parser.error("--count and --runs must be positive")
    print(f"pipeline over loopback TLS: {count:,} lines from seq, sender start to the listener's last line; median of {runs} run(s)")
    load = LoadMeter()
    try:
        with Cleanup() as cleanup:
            users = {f"{role}{run}": PASSWORD for run in range(runs) for role in ("alice", "bob")}
            server = ImkitServer(cleanup, users)
            broker = Mosquitto(cleanup, max_inflight=1000)
            timings: dict[str, list[dict[str, float]]] = {IMKIT: [], DEFAULT: [], WIDE: []}
            # Interleaved, so a change in the machine's background load touches every pipeline alike.
            for run in range(runs):
                timings[IMKIT].append(imkit_run(cleanup, server, run, count, timeout))
                timings[DEFAULT].append(mosquitto_run(cleanup, broker, run, count, timeout, None))
                timings[WIDE].append(mosquitto_run(cleanup, broker, run + runs, count, timeout, 1000))
            errors = server.log_errors()
            if errors:
                raise BenchError("the imkit server logged errors:\n" + "\n".join(errors[:10]))
        imkit, default, wide = (summary(name, timings[name]) for name in (IMKIT, DEFAULT, WIDE))
    except BenchError as error:
        print(f"bench_pipeline: {error}", file=sys.stderr)
        return 1
    print(f"imkit send: at most 1000 unacknowledged; {version(['mosquitto', '-h'])}, QoS 1; mosquitto_pub default window 20")
    print()
    head = f"{'':<30}{'total s':>8}{'first line s':>13}{'lines/s after':>14}{'imkit/this':>11}{'CPU s: sender':>15}{'listener':>9}{'server':>8}"
    print(head)
    print("-" * len(head))
    for row in (imkit, default, wide):
        ratio = imkit["total"] / row["total"]
        print(
            f"{row['name']:<30}{row['total']:>8.2f}{row['first']:>13.2f}{row['rate']:>14,.0f}{ratio:>11.2f}"
            f"{row['sender_cpu']:>15.2f}{row['listener_cpu']:>9.2f}{row['server_cpu']:>8.2f}"
        )
    print(
        "\ntotal: from starting the sender to the listener's last line; first line: from starting the sender "
        "(process start, TLS, login included); lines/s after: from the first line to the last; CPU: whole sender "
        "and listener processes (start-up included), and the server or broker from the sender's start to the listener's exit"
    )
    print("runs (total s): " + "; ".join(f"{row['name']}: " + ", ".join(f"{t:.2f}" for t in row["runs"]) for row in (imkit, default, wide)))
    ratio = imkit["total"] / default["total"]
    verdict = "meets" if ratio <= 1.5 else "misses"
    print(f"imkit / mosquitto (as usually written) = {ratio:.2f}: {verdict} the target of 1.5 at most")
    print(f"note: {MOSQUITTO_NOTE}")
    print(load.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
