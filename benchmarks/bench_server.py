"""
The server alone: CPU per message of imkit's hub, sessions and store in one process, without TLS,
sockets or client processes.  ``python benchmarks/bench_server.py [--count N] [--store sqlite|memory]``

``bench_e2e.py`` measures what users see, but its figures move by 10-20% from run to run on a
small shared machine, because three processes and TLS share two cores.  This one feeds
pre-encoded frames straight into the server protocol (``IMServerFactory.buildProtocol`` on an
in-memory transport) and reads what it writes back, so it is the tool for telling whether a
change to the server's hot path helped.

One sender (alice) sends ``--count`` 1:1 messages to one receiver (bob), at most ``--window``
unacknowledged, fed in reads of ``--read`` frames as TLS would hand them over; bob acknowledges
cumulatively after every read of his output, as ``IMClient`` does.  The store is SQLite in a
temporary directory (commit before ack, as ``twistd imkit`` runs it) or memory.

Printed: messages per second, and CPU microseconds per message: the reactor thread (the
driver's own work subtracted), the other threads (the SQLite writer), and the total.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from _harness import LoadMeter  # noqa: E402
from imkit.tuning import tune_garbage_collector, tune_thread_switching  # noqa: E402
from imkit.model import direct_conversation  # noqa: E402
from imkit.passwords import Passwords  # noqa: E402
from imkit.server.service import IMServerService  # noqa: E402
from imkit.session.server import READY  # noqa: E402
from imkit.session.settings import ServerSettings  # noqa: E402
from imkit.store.memory import MemoryStore  # noqa: E402
from imkit.store.sqlite import SQLiteStore  # noqa: E402
from imkit.wire import codec, packets, schema  # noqa: E402
from imkit.wire.framing import FrameReader  # noqa: E402


class Wire(StringTransport):
    """An in-memory transport that tells the driver when the server wrote something."""

    def __init__(self, on_write: Any, port: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self._on_write = on_write

    def write(self, data: bytes) -> None:
        super().write(data)
        self._on_write()


class Driver:
    """Feeds alice's sends in, counts her acks, acknowledges bob's deliveries."""

    def __init__(self, reactor: Any, service: IMServerService, count: int, window: int, read: int, size: int) -> None:
        self.reactor = reactor
        self.count = count
        self.window = window
        self.read = read
        self.own_cpu = 0.0  # the driver's reactor-thread CPU, subtracted from the server's
        self._pending: Any = None
        self.alice = service.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.bob = service.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        self.alice_wire = Wire(self._wake, 1)
        self.bob_wire = Wire(self._wake, 2)
        self.alice.makeConnection(self.alice_wire)
        self.bob.makeConnection(self.bob_wire)
        body = b"x" * size
        self.frames = [
            codec.encode(packets.Send(index, schema.TARGET_USER, "bob", "text/plain", body)) for index in range(1, count + 1)
        ]
        self.conversation = direct_conversation("alice", "bob")
        self.sent = self.acked = self.delivered = 0
        self.alice_reader = FrameReader(1 << 24)
        self.bob_reader = FrameReader(1 << 24)
        self.done: defer.Deferred = defer.Deferred()
        self.started = 0.0

    async def log_in(self) -> None:
        for protocol, user in ((self.alice, "alice"), (self.bob, "bob")):
            protocol.dataReceived(
                codec.encode(packets.Hello(schema.PROTOCOL_VERSION, schema.PROTOCOL_VERSION, "bench"))
                + codec.encode(packets.Login(schema.LOGIN_PASSWORD, user, "d1", b"bench-password"))
            )
        while not (self.alice.session.state == READY and self.bob.session.state == READY):
            await task.deferLater(self.reactor, 0.01, lambda: None)
        await task.deferLater(self.reactor, 0.05, lambda: None)
        self.alice_wire.clear()
        self.bob_wire.clear()

    def start(self) -> defer.Deferred:
        self.started = time.perf_counter()
        self._wake()
        return self.done

    def _wake(self) -> None:
        if self.started and self._pending is None and not self.done.called:
            self._pending = self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        begin = time.thread_time()
        self._pending = None
        data = self.alice_wire.value()
        if data:
            self.alice_wire.clear()
            for kind, _flags, _body in self.alice_reader.feed(data):
                if kind == schema.SEND_ACK:
                    self.acked += 1
        data = self.bob_wire.value()
        delivered = self.delivered
        if data:
            self.bob_wire.clear()
            for kind, _flags, _body in self.bob_reader.feed(data):
                if kind == schema.DELIVER:
                    self.delivered += 1
        answer = codec.encode(packets.DeliverAck(self.conversation, self.delivered)) if self.delivered > delivered else b""
        self.own_cpu += time.thread_time() - begin
        if answer:
            self.bob.dataReceived(answer)
        while self.sent < self.count and self.sent - self.acked < self.window:
            begin = time.thread_time()
            upto = min(self.sent + self.read, self.count, self.acked + self.window)
            chunk = b"".join(self.frames[self.sent : upto])
            self.sent = upto
            self.own_cpu += time.thread_time() - begin
            self.alice.dataReceived(chunk)
        if self.delivered >= self.count and self.acked >= self.count:
            self.done.callback(time.perf_counter() - self.started)


def thread_seconds() -> dict[int, float]:
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        found[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


async def one_run(reactor: Any, opts: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="imkit-bench-server-") as directory:
        if opts.store == "sqlite":
            store = SQLiteStore(os.path.join(directory, "imkit.sqlite3"), reactor)
        else:
            store = MemoryStore()
        passwords = Passwords.fast_for_tests()
        settings = ServerSettings(send_rate=0, sync_rate=0, lookup_rate=0)  # as the other benchmarks run it
        service = IMServerService(store, passwords, [], reactor, settings)
        service.startService()
        await service.whenListening()
        for user in ("alice", "bob"):
            await store.add_user(user, await passwords.hash("bench-password"))
        driver = Driver(reactor, service, opts.count, opts.window, opts.read, opts.size)
        await driver.log_in()
        if not opts.default_gc:
            tune_garbage_collector()  # as twistd imkit does
            tune_thread_switching()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        before_threads = thread_seconds()
        before_reactor = time.thread_time()
        elapsed = await driver.start()
        reactor_cpu = time.thread_time() - before_reactor - driver.own_cpu
        after = resource.getrusage(resource.RUSAGE_SELF)
        after_threads = thread_seconds()
        main = os.getpid()
        others = sum(after_threads[t] - before_threads.get(t, 0.0) for t in after_threads if t != main)
        total = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime - driver.own_cpu
        await service.stopService()
    n = opts.count
    return {
        "rate": n / elapsed,
        "reactor": reactor_cpu * 1e6 / n,
        "others": others * 1e6 / n,
        "total": total * 1e6 / n,
        "driver": driver.own_cpu * 1e6 / n,
    }


async def run(reactor: Any, opts: argparse.Namespace) -> None:
    load = LoadMeter()
    results = [await one_run(reactor, opts) for _ in range(opts.runs)]
    median = sorted(results, key=lambda result: result["total"])[len(results) // 2]
    print(f"server alone, in process, no TLS: {opts.count:,} messages of {opts.size} bytes, window {opts.window}, store {opts.store}")
    if len(results) > 1:
        print("  total us/msg per run: " + ", ".join(f"{result['total']:.1f}" for result in results) + " (the median run below)")
    print(f"  messages/s          {median['rate']:>10,.0f}")
    print(f"  reactor us/msg      {median['reactor']:>10.1f}   (the driver's own {median['driver']:.1f} subtracted)")
    print(f"  other threads       {median['others']:>10.1f}   (the SQLite writer)")
    print(f"  total us/msg        {median['total']:>10.1f}")
    print(load.describe())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="messages (default 20000)")
    parser.add_argument("--window", type=int, default=1000, help="unacknowledged sends at most (default 1000)")
    parser.add_argument("--read", type=int, default=50, help="send frames per read (default 50)")
    parser.add_argument("--size", type=int, default=100, help="body bytes (default 100)")
    parser.add_argument("--runs", type=int, default=5, help="runs; the one with the median total CPU is shown (default 5)")
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--default-gc", action="store_true", help="keep CPython's garbage collector and thread switching settings (twistd imkit tunes them)")
    opts = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, opts)))


if __name__ == "__main__":
    main()
