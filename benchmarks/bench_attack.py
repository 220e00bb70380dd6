"""
An honest chat's latency while a hostile local client attacks the server.

Run ``python benchmarks/bench_attack.py`` (``--quick`` for a shorter run; ``--messages``,
``--interval`` for the honest chat, ``--slowloris``, ``--flood``, ``--oversized``,
``--slow-readers`` for the attack's size).

Processes, all on this machine:

server
    ``twistd -n imkit --listen tls:PORT:interface=127.0.0.1 --store sqlite:TMP/imkit.sqlite3``
    with resource limits: ``--handshake-timeout 2 --login-timeout 5 --max-connections-per-ip 100
    --max-outbound-buffer 4194304 --send-rate 20 --send-burst 40``.
honest
    alice and bob, two ``IMClient``\\ s in one process, connecting from 127.0.0.1: alice sends
    ``--messages`` messages to bob, one every ``--interval`` seconds; the latency of each is from
    just before alice's ``send()`` until bob's client hands it over (one clock: one process).
    Every message must arrive exactly once and in order, or the benchmark fails.
attacker
    one Twisted process doing everything at once, each attack from its own loopback address
    (Linux routes all of 127.0.0.0/8 to the loopback interface):

    - slowloris (127.0.0.2): ``--slowloris`` connections, each dribbling a TLS ClientHello one
      byte per second, reconnecting whenever the server drops it;
    - connection flood (127.0.0.3): ``--flood`` connections that never send a byte, each
      reopened 50 ms after the server drops or refuses it (the per-address limit is 100);
    - oversized frames (127.0.0.4): ``--oversized`` TLS connections, each announcing a 2 GiB
      frame right after the handshake, reopened when the server drops it;
    - slow readers (127.0.0.5): ``--slow-readers`` devices of user mallory that log in and then
      never read, while another device of mallory sends them 200 kB messages as fast as the
      send rate allows; each is reopened when the server drops it.

Two phases on the same server: the honest chat alone ("quiet"), then the same chat once the
attacker has ramped up ("under attack").  The attacker reports what the server did to its
connections; the server's peak memory (VmHWM) is read from /proc at the end.

The defaults take about 40 seconds; ``--quick`` about 25.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

from _harness import CA, BenchError, Child, Cleanup, ImkitServer, file_text, percentile, stop_cleanly_on_sigterm  # noqa: E402

PASSWORD = "bench-pw"
LIMITS = [
    "--handshake-timeout", "2", "--login-timeout", "5", "--max-connections-per-ip", "100",
    "--max-outbound-buffer", str(4 * 1024 * 1024), "--send-rate", "20", "--send-burst", "40",
]
SOURCES = {"slowloris": "127.0.0.2", "flood": "127.0.0.3", "oversized": "127.0.0.4", "slow_reader": "127.0.0.5"}


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


# The honest chat --------------------------------------------------------------------------------


def role_honest(args: argparse.Namespace) -> None:
    from twisted.internet import defer
    from twisted.internet.task import deferLater, react

    from imkit.client import IMClient, tls_endpoint
    from imkit.client.endpoint import development_ca

    async def run(reactor: Any) -> None:
        started = time.time()
        ca = development_ca()
        alice = IMClient(tls_endpoint(reactor, args.server, ca), "alice", PASSWORD, args.device, reactor=reactor)
        bob = IMClient(tls_endpoint(reactor, args.server, ca), "bob", PASSWORD, args.device, reactor=reactor)
        latencies: list[float] = []
        bodies: list[str] = []
        done: defer.Deferred = defer.Deferred()
        prefix = f"{args.device} "

        def heard(message: Any) -> None:
            body = message.body.decode()
            if not body.startswith(prefix):
                return  # an earlier phase's message, caught up with
            latencies.append(time.time() - float(body.split()[2]))
            bodies.append(body)
            if len(bodies) == args.messages and not done.called:
                done.callback(None)

        bob.on_message(heard)
        for client in (alice, bob):
            client.startService()
        try:
            await defer.gatherResults([alice.loggedIn(), bob.caughtUp()]).addTimeout(60, reactor)
            ready = time.time() - started
            sends = []
            for n in range(args.messages):
                sends.append(alice.send("bob", f"{prefix}{n} {time.time():.6f}"))
                await deferLater(reactor, args.interval, lambda: None)
            await defer.gatherResults(sends).addTimeout(60, reactor)
            await done.addTimeout(60, reactor)
            expected = [f"{prefix}{n}" for n in range(args.messages)]
            if [" ".join(body.split()[:2]) for body in bodies] != expected:
                raise BenchError("bob did not get alice's messages exactly once and in order")
            emit("done", latencies=latencies, ready=ready)
        except Exception as error:
            emit("error", error=f"{type(error).__name__}: {error}")
        finally:
            for client in (alice, bob):
                await client.stopService()

    react(lambda reactor: defer.ensureDeferred(run(reactor)))


# The attacker -----------------------------------------------------------------------------------


def client_hello() -> bytes:
    from OpenSSL import SSL

    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


def role_attacker(args: argparse.Namespace) -> None:
    from twisted.internet import defer, protocol, reactor, ssl
    from twisted.internet.task import LoopingCall

    from imkit.client import IMClient, tls_endpoint
    from imkit.client.endpoint import development_ca
    from imkit.wire import codec, packets, schema

    host, port = "127.0.0.1", int(args.server.rsplit(":", 1)[1])
    tls = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(open(CA, "rb").read()))
    hello = client_hello()
    stats: dict[str, dict[str, Any]] = {
        mode: {"opened": 0, "closed": 0, "lifetimes": [], "bytes": 0} for mode in ("slowloris", "flood", "oversized", "slow_reader")
    }
    stopping = []

    class Hostile(protocol.Protocol):
        def __init__(self, mode: str) -> None:
            self.mode = mode
            self.call: Any = None
            self.opened = 0.0

        def connectionMade(self) -> None:
            self.opened = time.monotonic()
            stats[self.mode]["opened"] += 1
            if self.mode == "slowloris":
                self.left = hello
                self.call = reactor.callLater(1.0, self.dribble)
            elif self.mode == "oversized":
                self.transport.write(b"\x7f\xff\xff\xff\x01\x00\x00\x05")
            elif self.mode == "slow_reader":
                handle = self.transport.getHandle()
                if hasattr(handle, "setsockopt"):
                    handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little kernel buffering
                self.transport.write(
                    codec.encode(packets.Hello(1, 1, "slow"))
                    + codec.encode(packets.Login(schema.LOGIN_PASSWORD, "mallory", f"reader{id(self) % 1000}", PASSWORD.encode()))
                )

        def dribble(self) -> None:
            self.call = None
            if self.left:
                self.transport.write(self.left[:1])
                self.left = self.left[1:]
                self.call = reactor.callLater(1.0, self.dribble)

        def dataReceived(self, data: bytes) -> None:
            stats[self.mode]["bytes"] += len(data)
            if self.mode == "slow_reader":
                self.transport.pauseProducing()  # the login answer came: never read again

        def connectionLost(self, reason: Any = None) -> None:
            stats[self.mode]["closed"] += 1
            stats[self.mode]["lifetimes"].append(time.monotonic() - self.opened)
            if self.call is not None and self.call.active():
                self.call.cancel()

    class Again(protocol.ClientFactory):
        """Opens one connection, and a new one ``delay`` after each ends."""

        def __init__(self, mode: str, delay: float) -> None:
            self.mode = mode
            self.delay = delay

        def buildProtocol(self, addr: Any) -> Hostile:
            return Hostile(self.mode)

        def connect(self) -> None:
            if stopping:
                return
            source = (SOURCES[self.mode], 0)
            if self.mode in ("oversized", "slow_reader"):
                reactor.connectSSL(host, port, self, tls, timeout=10, bindAddress=source)
            else:
                reactor.connectTCP(host, port, self, timeout=10, bindAddress=source)

        def clientConnectionLost(self, connector: Any, reason: Any) -> None:
            reactor.callLater(self.delay, self.connect)

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            reactor.callLater(max(self.delay, 0.2), self.connect)

    async def run() -> None:
        factories = []
        for mode, count, delay in (
            ("slowloris", args.slowloris, 0.1),
            ("flood", args.flood, 0.05),
            ("oversized", args.oversized, 0.1),
            ("slow_reader", args.slow_readers, 0.5),
        ):
            for _ in range(count):
                factory = Again(mode, delay)
                factory.connect()
                factories.append(factory)
        writer = None
        sent = [0]
        in_flight = [0]
        if args.slow_readers:
            # mallory's writing device: 200 kB to mallory (so to the readers), as fast as allowed.
            writer = IMClient(tls_endpoint(reactor, args.server, development_ca()), "mallory", PASSWORD, "writer", reactor=reactor)
            writer.startService()
            await writer.loggedIn()

            def answered(result: Any) -> None:
                in_flight[0] -= 1

            def write() -> None:
                if in_flight[0] < 50:
                    in_flight[0] += 1
                    writer.send("mallory", b"x" * 200_000).addBoth(answered)
                    sent[0] += 1

            pump = LoopingCall(write)
            pump.clock = reactor
            pump.start(0.02)
        reactor.callLater(args.ramp, emit, "attacking")

        def stop(_: Any = None) -> None:
            stopping.append(True)
            report = {}
            for mode, record in stats.items():
                lifetimes = sorted(record["lifetimes"])
                report[mode] = {
                    "opened": record["opened"],
                    "closed": record["closed"],
                    "bytes": record["bytes"],
                    "lifetime_p50": percentile(lifetimes, 0.5),
                    "lifetime_max": lifetimes[-1] if lifetimes else float("nan"),
                }
            report["slow_reader"]["sent"] = sent[0]
            emit("stats", stats=report)
            reactor.stop()

        def watch_stdin() -> None:
            sys.stdin.read()  # EOF: the benchmark says stop
            reactor.callFromThread(stop)

        threading.Thread(target=watch_stdin, daemon=True).start()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addErrback(lambda f: (emit("error", error=f.getErrorMessage()), reactor.stop())))
    reactor.run()


# The benchmark ----------------------------------------------------------------------------------


def honest_phase(server: ImkitServer, cleanup: Cleanup, opts: argparse.Namespace, device: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--role", "honest", "--server", server.server, "--device", device,
            "--messages", str(opts.messages), "--interval", str(opts.interval)]
    child = cleanup.child(Child(f"honest ({device})", argv))
    timeout = 90 + opts.messages * opts.interval
    record = child.wait_json("done", timeout)
    child.wait_exit(30)
    latencies = sorted(record["latencies"])
    return {
        "ready": record["ready"],
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "max": latencies[-1] * 1000,
        "count": len(latencies),
    }


def peak_memory(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return f"peak {int(fields['VmHWM'].split()[0]) / 1024:.0f} MB, now {int(fields['VmRSS'].split()[0]) / 1024:.0f} MB"
    except (OSError, KeyError, ValueError):
        return "unknown"


def main(opts: argparse.Namespace) -> int:
    stop_cleanly_on_sigterm()
    with Cleanup() as cleanup:
        users = {name: PASSWORD for name in ("alice", "bob", "mallory")}
        server = ImkitServer(cleanup, users, extra_args=LIMITS)
        print(f"server: twistd imkit {' '.join(LIMITS)}", flush=True)
        quiet = honest_phase(server, cleanup, opts, "quiet")
        memory_quiet = peak_memory(server.pid)
        attacker = cleanup.child(
            Child(
                "attacker",
                [sys.executable, __file__, "--role", "attacker", "--server", server.server, "--slowloris", str(opts.slowloris),
                 "--flood", str(opts.flood), "--oversized", str(opts.oversized), "--slow-readers", str(opts.slow_readers),
                 "--ramp", str(opts.ramp)],
                stdin=subprocess.PIPE,
            )
        )
        attacker.wait_json("attacking", 60)
        attacked = honest_phase(server, cleanup, opts, "attacked")
        attacker.proc.stdin.close()
        stats = attacker.wait_json("stats", 30)["stats"]
        attacker.wait_exit(30)
        errors = server.log_errors()
        log = file_text(server.log_path)
        # A reader that does not read does not see its connection go either: the server log says.
        stats["slow_reader"]["closed"] = log.count("slow reader: more than")

        print()
        print(f"honest chat: {opts.messages} messages alice -> bob, one every {opts.interval * 1000:.0f} ms, over loopback TLS")
        print(f"{'':24}{'login+sync (s)':>16}{'p50 (ms)':>10}{'p99 (ms)':>10}{'max (ms)':>10}")
        for name, result in (("quiet", quiet), ("under attack", attacked)):
            print(f"{name:24}{result['ready']:>16.2f}{result['p50']:>10.1f}{result['p99']:>10.1f}{result['max']:>10.1f}")
        print()
        print("the attack (each from its own loopback address), and what the server did to it")
        print("(dropped: closed by the server; slow readers: counted in the server log, they never read the close):")
        print(f"{'':14}{'concurrent':>11}{'opened':>8}{'dropped':>8}{'lifetime p50 (s)':>18}{'max (s)':>9}")
        for mode, concurrent in (("slowloris", opts.slowloris), ("flood", opts.flood), ("oversized", opts.oversized), ("slow_reader", opts.slow_readers)):
            record = stats[mode]
            print(
                f"{mode:14}{concurrent:>11}{record['opened']:>8}{record['closed']:>8}"
                f"{record['lifetime_p50']:>18.2f}{record['lifetime_max']:>9.2f}"
            )
        print(f"slow readers were sent {stats['slow_reader']['sent']} x 200 kB by mallory's writer")
        print(f"server memory: after the quiet phase {memory_quiet}; at the end {peak_memory(server.pid)}")
        if errors:
            print(f"server log errors: {len(errors)}, first: {errors[0]}")
        print(json.dumps({"quiet": quiet, "attacked": attacked, "attack": stats}))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and a smaller attack")
    parser.add_argument("--messages", type=int, default=None, help="honest messages per phase (default 200, --quick 60)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between honest messages (default 0.05)")
    parser.add_argument("--slowloris", type=int, default=None, help="slowloris connections (default 150, --quick 60)")
    parser.add_argument("--flood", type=int, default=None, help="concurrent flood connections (default 300, --quick 150)")
    parser.add_argument("--oversized", type=int, default=10, help="concurrent oversized-frame connections (default 10)")
    parser.add_argument("--slow-readers", type=int, default=2, help="slow reading devices (default 2)")
    parser.add_argument("--ramp", type=float, default=None, help="seconds of attack before the honest phase (default 4, --quick 3)")
    parser.add_argument("--role", choices=("honest", "attacker"), help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="honest", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    quick = opts.quick
    if opts.messages is None:
        opts.messages = 60 if quick else 200
    if opts.slowloris is None:
        opts.slowloris = 60 if quick else 150
    if opts.flood is None:
        opts.flood = 150 if quick else 300
    if opts.ramp is None:
        opts.ramp = 3.0 if quick else 4.0
    return opts


if __name__ == "__main__":
    options = parse()
    if options.role == "honest":
        role_honest(options)
    elif options.role == "attacker":
        role_attacker(options)
    else:
        try:
            sys.exit(main(options))
        except BenchError as error:
            print(f"bench_attack: {error}", file=sys.stderr)
            sys.exit(1)
