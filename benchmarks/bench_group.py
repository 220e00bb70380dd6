"""
Group fan-out over loopback TLS: one group of 1,000 members, 200 of them online, on a real
``twistd -n imkit`` with its SQLite store.

Run ``python benchmarks/bench_group.py`` (``--quick`` for a small smoke run; ``--members``,
``--online``, ``--procs``, ``--messages``, ``--latency-messages``, ``--size`` for the shape;
``--profile`` adds a yappi profile of the server's pipelined phase, in a second run).

Processes, all on 127.0.0.1 and sharing this machine's CPUs:

server
    ``twistd -n imkit --listen tls:PORT:interface=127.0.0.1 --store sqlite:TMP/imkit.sqlite3``,
    its users ``m0000``..``m0999`` written to the store before it starts (one argon2id hash
    shared by all: they have one password).
sender
    one ``IMClient`` (``m0000``) that creates the group with every other user in it and then
    sends to it (``send(group=...)``) when told to on its standard input.
online members
    ``m0001``..``m0200``, connected, logged in and caught up, spread over ``--procs`` client
    processes (default 4 x 50 ``IMClient``s, each process one Twisted reactor).  Each process
    counts every message's copies and writes a JSON line when all of its clients have one;
    the other 799 members are offline (their copies stay in the store).

Two phases, one after the other on the same server and clients:

one at a time
    ``--latency-messages`` (50) messages, each sent once every online member has the one before
    (and 20 ms more, so each meets a quiet server).  Fan-out latency: from just before the
    sender's ``send()`` until the last of the online members has the message (the receivers'
    ``time.time()`` minus the sender's, written into the body: both read the same clock).
pipelined
    the sender sends ``--messages`` (1,000) at once; the rate is messages per second from the
    first send until every online member has every message; latency per message as above (so
    it includes queueing).

Server CPU is /proc/PID/stat utime + stime over each phase (until the server goes quiet after
the last delivery, so the delivery acknowledgements and their cursor writes are counted), per
message and per delivered copy (a message to 200 online members is 200 copies).

The defaults take one to two minutes on a 2-CPU machine, most of it the pipelined phase (every
copy costs CPU in the server and in a member's client, and all share the CPUs); ``--quick``
(40 online in 2 processes, 10 + 200 messages) about 15 seconds.  With 50 messages one at a
time, the p99 is the slowest of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

from _harness import (  # noqa: E402
    CA,
    BenchError,
    Child,
    Cleanup,
    ImkitServer,
    LoadMeter,
    percentile,
    stop_cleanly_on_sigterm,
)

PASSWORD = "bench-password"
DEVICE = "bench"
TEXT = "text/plain; charset=utf-8"
READY_TIMEOUT = 180.0
"""Seconds for the group to be created and every online member to log in and catch up."""
PAUSE = 0.02
"""Seconds between a message reaching everybody and the next one, in the one-at-a-time phase."""


def user(index: int) -> str:
    return f"m{index:04d}"


# Inside the client processes -------------------------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the benchmark that started us."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def make_body(phase: str, index: int, size: int) -> bytes:
    """``PHASE INDEX SEND_TIME `` padded with x to ``size`` bytes."""
    head = f"{phase} {index} {time.time():.6f} ".encode()
    return head + b"x" * max(0, size - len(head))


def new_client(reactor: Any, endpoint: Any, name: str, args: argparse.Namespace) -> Any:
    from imkit.client import ClientSettings, IMClient

    settings = ClientSettings(send_timeout=args.timeout, ack_delay=args.ack_delay)
    return IMClient(endpoint, name, PASSWORD, DEVICE, settings=settings, reactor=reactor)


def role_sender(args: argparse.Namespace) -> None:
    """
    Log in, create the group, say its id; then per stdin line ``L I`` send one-at-a-time message
    I, ``T N`` send N messages at once (and say when all are acknowledged), ``Q`` quit.
    """
    from twisted.internet import defer
    from twisted.internet.task import react
    from twisted.python.failure import Failure

    from imkit.client import tls_endpoint

    async def run(reactor: Any) -> None:
        client = new_client(reactor, tls_endpoint(reactor, args.server, CA), user(0), args)
        finished: defer.Deferred[None] = defer.Deferred()
        group = ""

        def failed(failure: Any) -> None:
            if not finished.called:
                finished.errback(failure)

        def pipeline(count: int) -> None:
            acked = 0
            cpu_before = time.process_time()

            def one_acked(_receipt: Any) -> None:
                nonlocal acked
                acked += 1
                if acked == count:
                    emit("acked", last=time.time(), cpu=time.process_time() - cpu_before)

            first = time.time()
            for index in range(count):
                client.send(group=group, body=make_body("T", index, args.size)).addCallbacks(one_acked, failed)
            emit("sent", first=first, last=time.time())

        def command(line: str) -> None:
            kind, _, value = line.strip().partition(" ")
            try:
                if kind == "L":
                    client.send(group=group, body=make_body("L", int(value), args.size)).addErrback(failed)
                elif kind == "T":
                    pipeline(int(value))
                elif not finished.called:  # "Q", or the end of standard input
                    finished.callback(None)
            except Exception:
                failed(Failure())

        def read_commands() -> None:
            for line in sys.stdin:
                reactor.callFromThread(command, line)
            reactor.callFromThread(command, "")

        client.startService()
        try:
            await client.loggedIn().addTimeout(READY_TIMEOUT, reactor)
            others = [user(i) for i in range(1, args.members)]
            group = await client.create_group("bench", others).addTimeout(READY_TIMEOUT, reactor)
            emit("group", group=group)
            threading.Thread(target=read_commands, name="commands", daemon=True).start()
            await finished
            emit("done")
        except Exception as error:
            emit("error", error=f"{type(error).__name__}: {error}")
        finally:
            await client.stopService()

    react(lambda reactor: defer.ensureDeferred(run(reactor)))


def role_members(args: argparse.Namespace) -> None:
    """
    Online members ``--first``..``--first + --count - 1``, one IMClient each.  Says ``ready`` once
    all are caught up; ``all`` (index, latency) when all have one-at-a-time message I; ``done``
    when all have every pipelined message, with each one's latency; then exits.
    """
    from twisted.internet import defer
    from twisted.internet.task import react

    from imkit.client import tls_endpoint

    group = args.group
    nclients = args.count
    one_at_a_time = args.latency_messages
    total = one_at_a_time + args.messages

    async def run(reactor: Any) -> None:
        endpoint = tls_endpoint(reactor, args.server, CA)
        clients = [new_client(reactor, endpoint, user(args.first + k), args) for k in range(nclients)]
        copies = [0] * total  # per message (one-at-a-time ones first): clients that have it
        expected = [0] * nclients  # per client: the message it should get next
        latencies: list[float] = []  # pipelined messages, in order of completion
        state = {"out_of_order": 0, "received": 0, "pipelined": 0, "cpu": 0.0, "last": 0.0}
        finished: defer.Deferred[None] = defer.Deferred()

        def delivered(k: int, message: Any) -> None:
            if message.conversation != group or message.content_type != TEXT:
                return  # the group's creation, seen when catching up
            phase, index_text, stamp_text, _ = message.body.split(b" ", 3)
            index = int(index_text)
            ordinal = index if phase == b"L" else one_at_a_time + index
            if ordinal != expected[k]:
                state["out_of_order"] += 1
            expected[k] = ordinal + 1
            state["received"] += 1
            copies[ordinal] += 1
            if copies[ordinal] != nclients:
                return
            now = time.time()
            latency = now - float(stamp_text)
            if phase == b"L":
                emit("all", i=index, latency=latency, cpu=time.process_time() - state["cpu"])
                if index == one_at_a_time - 1:
                    state["cpu"] = time.process_time()
                return
            latencies.append(latency)
            state["last"] = now
            state["pipelined"] += 1
            if state["pipelined"] == args.messages and not finished.called:
                finished.callback(None)

        for k, client in enumerate(clients):
            client.on_message(lambda message, k=k: delivered(k, message))
        caught_up = defer.gatherResults([client.caughtUp() for client in clients], consumeErrors=True)
        for client in clients:
            client.startService()
        try:
            await caught_up.addTimeout(READY_TIMEOUT, reactor)
            state["cpu"] = time.process_time()
            emit("ready")
            if args.messages:
                await finished.addTimeout(args.timeout, reactor)
            emit(
                "done",
                last=state["last"],
                latencies=[round(x, 6) for x in latencies],
                cpu=time.process_time() - state["cpu"],
                received=state["received"],
                out_of_order=state["out_of_order"],
            )
        except Exception as error:
            emit("error", error=f"{type(error).__name__}: {error} ({state['received']} copies received)")
        finally:
            await defer.gatherResults([client.stopService() for client in clients], consumeErrors=True)

    react(lambda reactor: defer.ensureDeferred(run(reactor)))


ROLES = {"sender": role_sender, "members": role_members}


# The benchmark ---------------------------------------------------------------------------------


class Events:
    """A child's JSON lines, read in order: each is taken once."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.position = 0

    def next(self, event: str, timeout: float) -> dict[str, Any]:
        child = self.child

        def found() -> dict[str, Any] | None:
            while self.position < len(child.lines):
                line = child.lines[self.position]
                self.position += 1
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                if record.get("event") == "error":
                    raise BenchError(f"{child.name} failed: {record.get('error')}\n{child.output_tail()}")
                if record.get("event") == event:
                    return record
                raise BenchError(f"{child.name} said {record.get('event')!r} where {event!r} was expected")
            return None

        return child.wait_for(found, timeout, f"its {event!r} line")


def settle(server: ImkitServer, quiet: float = 0.25, limit: float = 10.0) -> None:
    """Wait until the server used less than a clock tick of CPU in ``quiet`` seconds (acks, cursor writes)."""
    deadline = time.monotonic() + limit
    before = server.cpu()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = server.cpu()
        if now - before < 0.015:
            return
        before = now


def split(online: int, procs: int) -> list[tuple[int, int]]:
    """(first member index, count) per client process, as even as can be; members 1..online."""
    procs = max(1, min(procs, online))
    base, extra = divmod(online, procs)
    parts, first = [], 1
    for p in range(procs):
        count = base + (p < extra)
        parts.append((first, count))
        first += count
    return parts


def role_argv(role: str, opts: argparse.Namespace, server: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        role,
        "--server",
        server,
        "--members",
        str(opts.members),
        "--messages",
        str(opts.messages),
        "--latency-messages",
        str(opts.latency_messages),
        "--size",
        str(opts.size),
        "--timeout",
        str(opts.timeout),
        "--ack-delay",
        str(opts.ack_delay),
        *extra,
    ]


def run(opts: argparse.Namespace, profiler: Any = None) -> dict[str, Any]:
    """One run of both phases; ``profiler`` (bench_e2e's YappiProfiler) watches the pipelined one."""
    result: dict[str, Any] = {}
    with Cleanup() as cleanup:
        started = time.monotonic()
        server = ImkitServer(cleanup, {user(i): PASSWORD for i in range(opts.members)}, twistd=getattr(profiler, "twistd", None))
        result["setup_users_s"] = time.monotonic() - started
        cpu_start = server.cpu()
        started = time.monotonic()
        sender = cleanup.child(Child("sender", role_argv("sender", opts, server.server), stdin=subprocess.PIPE))
        sender_events = Events(sender)
        group = sender_events.next("group", READY_TIMEOUT + 10)["group"]
        result["create_s"] = time.monotonic() - started
        parts = split(opts.online, opts.procs)
        result["parts"] = parts
        members = [
            cleanup.child(
                Child(
                    f"members {user(first)}-{user(first + count - 1)}",
                    role_argv("members", opts, server.server, "--group", group, "--first", str(first), "--count", str(count)),
                )
            )
            for first, count in parts
        ]
        member_events = [Events(child) for child in members]
        for events in member_events:
            events.next("ready", READY_TIMEOUT + 10)
        settle(server)
        result["login_s"] = time.monotonic() - started
        result["login_server_cpu_s"] = server.cpu() - cpu_start
        assert sender.proc.stdin is not None

        def tell(line: str) -> None:
            sender.proc.stdin.write(line.encode() + b"\n")
            sender.proc.stdin.flush()

        # One at a time.
        n = opts.latency_messages
        cpu_before, threads_before = server.cpu(), server.thread_cpu()
        latencies = []
        client_cpu = 0.0
        for index in range(n):
            tell(f"L {index}")
            reports = [events.next("all", opts.timeout) for events in member_events]
            if any(report["i"] != index for report in reports):
                raise BenchError(f"one-at-a-time message {index}: the members reported {[r['i'] for r in reports]}")
            latencies.append(max(report["latency"] for report in reports))
            if index == n - 1:
                client_cpu = sum(report["cpu"] for report in reports)
            time.sleep(PAUSE)
        settle(server)
        cpu_after, threads_after = server.cpu(), server.thread_cpu()
        result["one"] = figures(n, opts.online, sorted(latencies), cpu_after - cpu_before, threads_before, threads_after)
        result["one"]["members_cpu_us"] = client_cpu / max(1, n * opts.online) * 1e6

        # Pipelined.
        n = opts.messages
        if profiler is not None:
            profiler.start(server.pid)
        cpu_before, threads_before = server.cpu(), server.thread_cpu()
        tell(f"T {n}")
        sent = sender_events.next("sent", opts.timeout)
        acked = sender_events.next("acked", opts.timeout)
        done = [events.next("done", opts.timeout) for events in member_events]
        settle(server)
        cpu_after, threads_after = server.cpu(), server.thread_cpu()
        if profiler is not None:
            profiler.stop()
        tell("Q")
        sender_events.next("done", 30)
        for child in (sender, *members):
            child.wait_exit(60)
        # Per message: the latest of the processes' "all have it" (each process's list is in order).
        per_message = [max(values) for values in zip(*(report["latencies"] for report in done))]
        last = max(report["last"] for report in done)
        copies = sum(report["received"] for report in done)
        expected = (opts.latency_messages + n) * opts.online
        if copies != expected or any(report["out_of_order"] for report in done) or len(per_message) != n:
            raise BenchError(
                f"{copies} copies delivered of {expected}, "
                f"{sum(report['out_of_order'] for report in done)} out of order"
            )
        pipelined = figures(n, opts.online, sorted(per_message), cpu_after - cpu_before, threads_before, threads_after)
        pipelined["rate"] = n / (last - sent["first"])
        pipelined["ack_rate"] = n / (acked["last"] - sent["first"])
        pipelined["copy_rate"] = pipelined["rate"] * opts.online
        pipelined["seconds"] = last - sent["first"]
        pipelined["members_cpu_us"] = sum(report["cpu"] for report in done) / (n * opts.online) * 1e6
        pipelined["sender_cpu_us"] = acked["cpu"] / n * 1e6
        result["pipelined"] = pipelined
        errors = server.log_errors()
        if errors:
            raise BenchError("the imkit server logged errors:\n" + "\n".join(errors[:10]))
    return result


def figures(
    n: int, online: int, latencies: list[float], server_cpu: float, threads_before: tuple[float, float], threads_after: tuple[float, float]
) -> dict[str, Any]:
    copies = n * online
    return {
        "messages": n,
        "copies": copies,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "max_ms": latencies[-1] * 1e3,
        "server_cpu_s": server_cpu,
        "server_ms_msg": server_cpu / n * 1e3,
        "server_us_copy": server_cpu / copies * 1e6,
        "reactor_us_copy": (threads_after[0] - threads_before[0]) / copies * 1e6,
        "other_us_copy": (threads_after[1] - threads_before[1]) / copies * 1e6,
    }


ROWS = [
    ("messages", "messages", "{:,}"),
    ("copies delivered", "copies", "{:,}"),
    ("msg/s to all online", "rate", "{:,.1f}"),
    ("copies/s", "copy_rate", "{:,.0f}"),
    ("fan-out latency p50 (ms)", "p50_ms", "{:.1f}"),
    ("fan-out latency p99 (ms)", "p99_ms", "{:.1f}"),
    ("fan-out latency max (ms)", "max_ms", "{:.1f}"),
    ("server CPU (ms/msg)", "server_ms_msg", "{:.2f}"),
    ("server CPU (us/copy)", "server_us_copy", "{:.1f}"),
    ("  reactor thread", "reactor_us_copy", "{:.1f}"),
    ("  SQLite + other threads", "other_us_copy", "{:.1f}"),
    ("member clients CPU (us/copy)", "members_cpu_us", "{:.1f}"),
    ("sender CPU (us/msg)", "sender_cpu_us", "{:.1f}"),
]


def format_table(one: dict[str, Any], pipelined: dict[str, Any]) -> str:
    head = f"{'':<30}{'one at a time':>15}{'pipelined':>12}"
    lines = [head, "-" * len(head)]
    for label, key, fmt in ROWS:
        cells = [fmt.format(column[key]) if key in column else "-" for column in (one, pipelined)]
        lines.append(f"{label:<30}{cells[0]:>15}{cells[1]:>12}")
    return "\n".join(lines)


# Command line ------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> tuple[str | None, argparse.Namespace]:
    argv = sys.argv[1:] if argv is None else argv
    role = argv[0] if argv and argv[0] in ROLES else None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000, help="members of the group, the sender included (default 1000)")
    parser.add_argument("--online", type=int, default=None, help="members online besides the sender (default 200, --quick 40)")
    parser.add_argument("--procs", type=int, default=None, help="client processes the online members are spread over (default 4, --quick 2)")
    parser.add_argument("--messages", type=int, default=None, help="messages sent at once in the pipelined phase (default 1000, --quick 200)")
    parser.add_argument(
        "--latency-messages", type=int, default=None, help="messages sent one at a time, for latency (default 50, --quick 10)"
    )
    parser.add_argument("--size", type=int, default=100, help="message body bytes (default 100)")
    parser.add_argument(
        "--ack-delay",
        type=float,
        default=0.05,
        help="the members' ClientSettings.ack_delay: seconds a delivery ack may wait to cover more (default 0.05, the client's own; 0: none)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds a phase may take at most (default: from the sizes)")
    parser.add_argument("--quick", action="store_true", help="a small, fast smoke run")
    parser.add_argument(
        "--profile", action="store_true", help="then profile the server's pipelined phase in a second run (yappi, as bench_e2e --profile)"
    )
    parser.add_argument("--server", help=argparse.SUPPRESS)  # for the client roles
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv[1:] if role else argv)
    quick = opts.quick
    if opts.online is None:
        opts.online = 40 if quick else 200
    if opts.procs is None:
        opts.procs = 2 if quick else 4
    if opts.messages is None:
        opts.messages = 200 if quick else 1000
    if opts.latency_messages is None:
        opts.latency_messages = 10 if quick else 50
    if role is None:
        if opts.members < 2 or not 1 <= opts.online < opts.members or opts.procs < 1:
            parser.error("need --members at least 2, --online between 1 and --members - 1, --procs at least 1")
        if opts.messages < 1 or opts.latency_messages < 1 or opts.size < 40:
            parser.error("--messages and --latency-messages must be positive and --size at least 40")
    if opts.timeout is None:
        opts.timeout = 120.0 + opts.messages * opts.online / 2000
    return role, opts


def main(argv: list[str] | None = None) -> int:
    role, opts = parse(argv)
    if role is not None:
        ROLES[role](opts)
        return 0
    stop_cleanly_on_sigterm()
    print(
        f"group fan-out over loopback TLS: one group of {opts.members:,} members, {opts.online} online besides the sender, "
        f"{opts.size}-byte messages; {os.cpu_count()} CPUs shared by the server and every client"
    )
    print(
        f"imkit: twistd -n imkit, SQLite store, fan_out_slice 500; online members in {min(opts.procs, opts.online)} client "
        f"processes of {' + '.join(str(count) for _, count in split(opts.online, opts.procs))} IMClients"
        f" (ack_delay {opts.ack_delay:g} s), the sender in one more; "
        f"Python {sys.version.split()[0]}"
    )
    load = LoadMeter()
    try:
        result = run(opts)
    except BenchError as error:
        print(f"bench_group: {error}", file=sys.stderr)
        return 1
    one, pipelined = result["one"], result["pipelined"]
    print(
        f"setup: {opts.members:,} users in {result['setup_users_s']:.1f} s (server start included); group created in "
        f"{result['create_s']:.1f} s; {opts.online} logins and catch-ups in {result['login_s']:.1f} s, "
        f"server CPU {result['login_server_cpu_s']:.1f} s (argon2id per login)"
    )
    print()
    print(format_table(one, pipelined))
    server_share = pipelined["server_cpu_s"] / pipelined["seconds"]
    print(
        f"\npipelined: {pipelined['rate']:,.1f} msg/s x {opts.online} online = {pipelined['copy_rate']:,.0f} copies/s "
        f"(acknowledged to the sender at {pipelined['ack_rate']:,.0f} msg/s); server CPU {pipelined['server_us_copy']:.1f} us/copy "
        f"against {pipelined['members_cpu_us']:.1f} us/copy in the member clients, the server using {server_share:.2f} of "
        f"{os.cpu_count()} CPUs: alone it would fan out about {1e6 / pipelined['server_us_copy']:,.0f} copies/s per CPU"
    )
    print(
        "latency: from just before send() until the last online member has the message (receivers' clock minus the "
        "time in the body); pipelined latency includes queueing behind the earlier messages; server CPU: user+system "
        "over the phase until the server is quiet (delivery acks and cursor writes included)"
    )
    print(load.describe())
    if opts.profile:
        print()
        try:
            print(profile(opts, pipelined))
        except BenchError as error:
            print(f"bench_group: {error}", file=sys.stderr)
            return 1
    return 0


def profile(opts: argparse.Namespace, real: dict[str, Any]) -> str:
    """
    A second run with the server under yappi (bench_e2e's YappiProfiler) during the pipelined
    phase; figures per delivered copy, scaled to ``real`` (the unprofiled run's pipelined phase).
    """
    import importlib.util

    if importlib.util.find_spec("yappi") is None:
        raise BenchError("--profile needs yappi: pip install yappi")
    from bench_e2e import YappiProfiler

    with Cleanup() as cleanup:
        profiler = YappiProfiler(cleanup)
        profiled = run(opts, profiler)["pipelined"]
        scale = {
            "server_cpu_us": real["server_us_copy"],
            "server_main_cpu_us": real["reactor_us_copy"],
            "server_other_cpu_us": real["other_us_copy"],
        }
        report = profiler.report(profiled["copies"], scale)
    for per_message, per_copy in (("us/msg", "us/copy"), ("calls/msg", "calls/copy"), ("per message", "per copy")):
        report = report.replace(per_message, per_copy)
    return (
        f"imkit server profile (yappi, CPU clock per thread), the pipelined phase of a separate run: "
        f"{profiled['rate']:,.1f} msg/s while profiled, server CPU {profiled['server_us_copy']:.1f} us/copy by /proc "
        f"(profiler included)\n{report}"
    )


if __name__ == "__main__":
    sys.exit(main())
