"""
Durable one-to-one throughput over loopback TLS: imkit against Mosquitto (QoS 1) on this machine.

Run ``python benchmarks/bench_e2e.py`` (``--quick`` for one shorter run per system, ``--count N``
for the number of messages, ``--runs R``; ``--no-raw``, ``--no-relay``, ``--no-mosquitto`` skip systems;
``--profile`` adds a profile of the imkit server: yappi, CPU time per function per thread, or
``--profile py-spy``).

For each system, three processes on 127.0.0.1:

server
    ``twistd -n imkit --listen tls:PORT:interface=127.0.0.1 --store sqlite:TMP/imkit.sqlite3``
    (stores every message in an SQLite transaction before acknowledging it), or our own
    ``mosquitto`` with one TLS listener, persistence on, QoS 1 (acknowledges before its
    asynchronous save: not the same promise, see the note printed with the results).
receiver
    ``IMClient`` (user bob), a ``RawClient`` (below) or a paho-mqtt client subscribed to
    ``chat/bob``, counting deliveries, checking their order and recording each message's
    latency: the receiver's ``time.time()`` minus the sender's, written into the body (both
    processes read the same clock).
sender
    ``IMClient`` (user alice, ``send(to="bob")``), a ``RawClient`` or a paho-mqtt client
    publishing to ``chat/bob``, with at most ``--window`` unacknowledged messages, started only
    once both clients are logged in (and the receiver caught up or subscribed).

Reported: messages per second end to end (first send to last delivery) and acknowledged
(first send to last ack), latency percentiles, and CPU microseconds per message of the server
(``/proc/PID/stat`` utime + stime before and after, over N) and of each client process.  The
machine has few cores and all processes share them: the figures are for comparison on this
machine, not capacity planning.

Mosquitto runs with two pairs of clients.  ``mosq/paho``: paho-mqtt (``pip install paho-mqtt``;
skipped without it), Python like our IMClients, so the clients cost alike.  ``mosq/C``: Mosquitto's
own ``mosquitto_pub -l -M WINDOW`` and ``mosquitto_sub``, so the clients cost little and the
broker sets the pace; we feed the timestamped lines, at most WINDOW ahead of the deliveries.

imkit runs with two pairs too.  ``imkit``: IMClient, the client an application uses (outbox,
resends, ordering, cursors).  ``imkit/raw``: the same server with lean clients (``RawClient``)
that write Send frames and cumulative DeliverAcks straight to the TLS connection, the analogue
of mosquitto_pub and mosquitto_sub: what the imkit server itself carries.

``relay`` is a yardstick, not a competitor: the same lean clients, TLS settings and codec against
a minimal Twisted relay (``role_relay_server``) that acknowledges and forwards each Send and
keeps nothing.  Whatever it reaches is about the most any server of this design can reach on
this machine, so imkit's figures can be read against it.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

from twisted.internet.protocol import Protocol

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

from _harness import (  # noqa: E402
    CA,
    MOSQUITTO_NOTE,
    BenchError,
    Child,
    Cleanup,
    ImkitServer,
    LoadMeter,
    Mosquitto,
    cpu_seconds,
    file_text,
    percentile,
    script,
    stop_cleanly_on_sigterm,
    version,
    wait_until,
)

PASSWORD = "bench-password"
TOPIC = "chat/bob"
READY_TIMEOUT = 60.0
F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity


# Inside the client processes -------------------------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the benchmark that started us."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def make_body(index: int, size: int) -> bytes:
    """``INDEX SEND_TIME `` padded with x to ``size`` bytes: what the receiver checks and times."""
    head = f"{index} {time.time():.6f} ".encode()
    return head + b"x" * max(0, size - len(head))


class Tally:
    """The receiver's count: order, latency, first and last arrival."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.received = 0
        self.expected = 0
        self.out_of_order = 0
        self.latencies: list[float] = []
        self.first = 0.0
        self.last = 0.0
        self.cpu_at_first = 0.0

    def got(self, body: bytes) -> bool:
        """Count one message; True once ``count`` arrived."""
        now = time.time()
        index_text, stamp_text, _ = body.split(b" ", 2)
        index = int(index_text)
        if index != self.expected:
            self.out_of_order += 1
        self.expected = index + 1
        self.latencies.append(now - float(stamp_text))
        if not self.received:
            self.first = now
            self.cpu_at_first = time.process_time()
        self.last = now
        self.received += 1
        return self.received >= self.count

    def result(self, cpu_before: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "received": self.received,
            "out_of_order": self.out_of_order,
            "first": self.first,
            "last": self.last,
            "p50": percentile(ordered, 0.50),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1] if ordered else float("nan"),
            "cpu": time.process_time() - cpu_before,
        }


class Window:
    """The sender's bookkeeping: at most ``window`` unacknowledged, timestamps of first send and last ack."""

    def __init__(self, count: int, window: int) -> None:
        self.count = count
        self.window = window
        self.sent = 0
        self.acked = 0
        self.first = 0.0
        self.last_ack = 0.0

    def result(self, cpu_before: float) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "first": self.first,
            "last_ack": self.last_ack,
            "cpu": time.process_time() - cpu_before,
        }


def read_go_line(on_line: Callable[[str], None]) -> None:
    """Call ``on_line`` (from a daemon thread) with the first line of standard input."""

    def read() -> None:
        on_line(sys.stdin.readline())

    threading.Thread(target=read, name="go", daemon=True).start()


async def ready_then_go(reactor: Any) -> None:
    """Tell the benchmark we are ready, then wait for its "go" line (a sender starts on it)."""
    from twisted.internet import defer

    go: defer.Deferred[str] = defer.Deferred()
    read_go_line(lambda line: reactor.callFromThread(go.callback, line))
    emit("ready")
    await go.addTimeout(READY_TIMEOUT, reactor)


def imkit_client(reactor: Any, args: argparse.Namespace, user: str, device: str) -> Any:
    from imkit.client import ClientSettings, IMClient, tls_endpoint
    from imkit.tuning import tune_garbage_collector

    tune_garbage_collector(collect=False)  # as imkit's own commands do; see imkit.tuning

    settings = ClientSettings(send_timeout=args.timeout)
    return IMClient(tls_endpoint(reactor, args.server, CA), user, PASSWORD, device, settings=settings, reactor=reactor)


def role_imkit_receiver(args: argparse.Namespace) -> None:
    from twisted.internet import defer
    from twisted.internet.task import react

    async def run(reactor: Any) -> None:
        client = imkit_client(reactor, args, "bob", "bench-recv")
        tally = Tally(args.count)
        done: defer.Deferred[None] = defer.Deferred()

        def delivered(message: Any) -> None:
            if not done.called and tally.got(message.body):
                done.callback(None)

        client.on_message(delivered)
        client.startService()
        try:
            await client.caughtUp().addTimeout(READY_TIMEOUT, reactor)
            cpu_before = time.process_time()
            emit("ready")
            await done.addTimeout(args.timeout, reactor)
            emit("done", **tally.result(cpu_before))
        except Exception as error:
            emit("error", error=f"{type(error).__name__}: {error} after {tally.received} messages")
        finally:
            await client.stopService()

    react(lambda reactor: defer.ensureDeferred(run(reactor)))


def role_imkit_sender(args: argparse.Namespace) -> None:
    from twisted.internet import defer
    from twisted.internet.task import react

    async def run(reactor: Any) -> None:
        client = imkit_client(reactor, args, "alice", "bench-send")
        window = Window(args.count, args.window)
        done: defer.Deferred[None] = defer.Deferred()

        def pump() -> None:
            while window.sent < window.count and window.sent - window.acked < window.window:
                sent = client.send(to="bob", body=make_body(window.sent, args.size))
                window.sent += 1
                sent.addCallbacks(acked, failed)

        def acked(_receipt: Any) -> None:
            window.acked += 1
            window.last_ack = time.time()
            if window.acked >= window.count:
                if not done.called:
                    done.callback(None)
            else:
                pump()

        def failed(failure: Any) -> None:
            if not done.called:
                done.errback(failure)

        client.startService()
        try:
            await client.loggedIn().addTimeout(READY_TIMEOUT, reactor)
            await ready_then_go(reactor)
            cpu_before = time.process_time()
            window.first = time.time()
            pump()
            await done.addTimeout(args.timeout, reactor)
            emit("done", **window.result(cpu_before))
        except Exception as error:
            emit("error", error=f"{type(error).__name__}: {error} after {window.acked} acknowledgements")
        finally:
            await client.stopService()

    react(lambda reactor: defer.ensureDeferred(run(reactor)))


class RawClient(Protocol):
    """
    A lean imkit client for ``imkit/raw``: Hello and a password Login, then frames straight off
    the wire, so the clients cost little and the server sets the pace.  It answers Pings itself;
    every other frame after the login goes to ``on_frames(client, [(kind, body), ...])``, once per
    read.  ``ready`` fires at the LoginResult; the role fires ``done`` when its work is complete.
    A refused login, an Error or Bye frame, a bad frame or a lost connection fails whichever of
    the two is still waited for.
    """

    def __init__(self, user: str, device: str, on_frames: Callable[[RawClient, list[tuple[int, bytes]]], None]) -> None:
        from twisted.internet import defer

        from imkit.wire import schema
        from imkit.wire.framing import FrameReader

        self.user = user
        self.device = device
        self.on_frames = on_frames
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.done: defer.Deferred[None] = defer.Deferred()
        self.reader = FrameReader()
        self.logged_in = False
        self.failed = False
        self.control = frozenset((schema.HELLO_OK, schema.LOGIN_RESULT, schema.PING, schema.PONG, schema.ERROR, schema.BYE))

    def connectionMade(self) -> None:
        from imkit.wire import codec, packets, schema

        hello = packets.Hello(schema.PROTOCOL_VERSION, schema.PROTOCOL_VERSION, "imkit-bench-raw")
        login = packets.Login(schema.LOGIN_PASSWORD, self.user, self.device, PASSWORD.encode())
        self.transport.write(codec.encode(hello) + codec.encode(login))

    def dataReceived(self, data: bytes) -> None:
        from imkit.wire.errors import DecodeError

        found = []
        control = self.control
        try:
            for kind, _flags, body in self.reader.feed(data):
                if kind in control:
                    self.handle_control(kind, body)
                    if self.failed:
                        return
                else:
                    found.append((kind, body))
        except DecodeError as error:
            self.fail(f"bad frame from the server: {error}")
            return
        if found:
            self.on_frames(self, found)

    def handle_control(self, kind: int, body: bytes) -> None:
        from imkit.wire import codec, packets, schema

        packet = codec.decode_body(kind, body)
        if kind == schema.PING:
            self.transport.write(codec.encode(packets.Pong(packet.nonce)))
        elif kind == schema.LOGIN_RESULT:
            if packet.status:
                self.fail(f"login refused ({packet.status}): {packet.reason}")
            elif not self.logged_in:
                self.logged_in = True
                self.ready.callback(None)
        elif kind in (schema.ERROR, schema.BYE):
            self.fail(f"the server sent {type(packet).__name__} ({packet.code}): {packet.reason}")

    def fail(self, reason: str) -> None:
        """Fail what is waited for (the login, else the run) and drop the connection."""
        self.failed = True
        waiting = self.done if self.logged_in else self.ready
        if not waiting.called:
            waiting.errback(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.failed and not self.done.called:
            self.fail(f"connection lost: {reason.getErrorMessage() if reason is not None else '?'}")

    def close(self) -> None:
        """Say goodbye and hang up (the run is over)."""
        from imkit.wire import codec, packets

        if not self.done.called:
            self.done.callback(None)
        if self.transport is not None and self.transport.connected:
            self.transport.write(codec.encode(packets.Bye(0, "benchmark done")))
            self.transport.loseConnection()


async def raw_connect(reactor: Any, args: argparse.Namespace, client: RawClient) -> None:
    """Connect ``client`` over TLS as IMClient does, and wait for its login."""
    from twisted.internet.endpoints import connectProtocol

    from imkit.client import tls_endpoint
    from imkit.tuning import tune_garbage_collector

    tune_garbage_collector(collect=False)  # as the IMClient roles do
    await connectProtocol(tls_endpoint(reactor, args.server, CA), client).addTimeout(READY_TIMEOUT, reactor)
    await client.ready.addTimeout(READY_TIMEOUT, reactor)


def role_imkit_raw_receiver(args: argparse.Namespace) -> None:
    from twisted.internet import defer
    from twisted.internet.task import react

    from imkit.wire import codec, packets, schema

    decode_body = codec.decode_body
    encode = codec.encode
    DeliverAck = packets.DeliverAck
    DELIVER, DELIVER_BUNDLE, HEADS = schema.DELIVER, schema.DELIVER_BUNDLE, schema.HEADS

    async def run(reactor: Any) -> None:
        tally = Tally(args.count)
        highest: dict[str, int] = {}

        def frames(client: RawClient, found: list[tuple[int, bytes]]) -> None:
            advanced: dict[str, int] = {}
            complete = False
            for kind, body in found:
                if kind == DELIVER:
                    messages: Any = (decode_body(kind, body).message,)
                elif kind == DELIVER_BUNDLE:
                    messages = decode_body(kind, body).messages
                elif kind == HEADS:  # deliveries held back: a client must sync, and this one does not
                    client.fail(f"the server held deliveries back (Heads) after {tally.received} messages")
                    return
                else:
                    continue  # notices of no interest here
                for message in messages:
                    if message.seq > highest.get(message.conversation, 0):
                        highest[message.conversation] = advanced[message.conversation] = message.seq
                    if tally.got(message.body):
                        complete = True
            if advanced:  # one cumulative ack per conversation, one write per read
                client.transport.write(b"".join([encode(DeliverAck(conversation, seq)) for conversation, seq in advanced.items()]))
            if complete and not client.done.called:
                client.done.callback(None)

        client = RawClient("bob", "bench-raw-recv", frames)
        try:
            # A fresh server has no history: logged in is caught up, live messages come pushed.
            await raw_connect(reactor, args, client)
            cpu_before = time.process_time()
            emit("ready")
            await client.done.addTimeout(args.timeout, reactor)
            emit("done", **tally.result(cpu_before))
        except Exception as error:
            emit("error", error=f"{type(error).__name__}: {error} after {tally.received} messages")
        finally:
            client.close()

    react(lambda reactor: defer.ensureDeferred(run(reactor)))


def role_imkit_raw_sender(args: argparse.Namespace) -> None:
    from twisted.internet import defer
    from twisted.internet.task import react

    from imkit.wire import codec, packets, schema

    decode_body = codec.decode_body
    encode = codec.encode
    Send = packets.Send
    SEND_ACK, TARGET_USER = schema.SEND_ACK, schema.TARGET_USER

    async def run(reactor: Any) -> None:
        window = Window(args.count, args.window)
        first_id = random.getrandbits(62)  # never one the server's dedupe records hold from an earlier run

        def pump(client: RawClient) -> None:
            start = window.sent
            end = min(window.count, window.acked + window.window)
            if end > start:
                window.sent = end
                sends = [encode(Send(first_id + i, TARGET_USER, "bob", "text/plain", make_body(i, args.size))) for i in range(start, end)]
                client.transport.write(b"".join(sends))

        def frames(client: RawClient, found: list[tuple[int, bytes]]) -> None:
            acks = 0
            for kind, body in found:
                if kind == SEND_ACK:
                    ack = decode_body(kind, body)
                    if ack.status:
                        client.fail(f"send {ack.client_msg_id - first_id} refused ({ack.status}): {ack.reason}")
                        return
                    acks += 1
            if acks:
                window.acked += acks
                window.last_ack = time.time()
                if window.acked >= window.count:
                    if not client.done.called:
                        client.done.callback(None)
                else:
                    pump(client)

        client = RawClient("alice", "bench-raw-send", frames)
        try:
            await raw_connect(reactor, args, client)
            await ready_then_go(reactor)
            cpu_before = time.process_time()
            window.first = time.time()
            pump(client)
            await client.done.addTimeout(args.timeout, reactor)
            emit("done", **window.result(cpu_before))
        except Exception as error:
            emit("error", error=f"{type(error).__name__}: {error} after {window.acked} acknowledgements")
        finally:
            client.close()

    react(lambda reactor: defer.ensureDeferred(run(reactor)))


def mqtt_client(client_id: str) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    client.tls_set(ca_certs=CA)
    return client


def role_relay_server(args: argparse.Namespace) -> None:
    """
    The ``relay`` system's server: the least a server can do with imkit's wire format, as a
    yardstick for what the machine allows.  It speaks to the same RawClients over the same TLS
    settings and codec, acknowledges each Send at once and forwards it to the recipient's
    connection, one write per connection per read, and keeps nothing: no store, no sessions, no
    resends, no dedupe, no authentication.
    """
    from twisted.internet import defer
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.protocol import Factory
    from twisted.internet.task import react

    from imkit.model import Message, direct_conversation
    from imkit.tls import default_cert_paths, server_tls_options
    from imkit.tuning import tune_garbage_collector
    from imkit.wire import codec, packets, schema
    from imkit.wire.framing import FrameReader

    decode_body, encode = codec.decode_body, codec.encode
    online: dict[str, Relay] = {}
    heads: dict[str, int] = {}
    ids = iter(range(1, 2**62))

    class Relay(Protocol):
        def connectionMade(self) -> None:
            self.reader = FrameReader()
            self.user = ""
            self.device = ""
            self.out: list[bytes] = []

        def dataReceived(self, data: bytes) -> None:
            touched = {self}
            for kind, _flags, body in self.reader.feed(data):
                if kind == schema.SEND:
                    send = decode_body(kind, body)
                    conversation = direct_conversation(self.user, send.target)
                    seq = heads[conversation] = heads.get(conversation, 0) + 1
                    server_id = next(ids)
                    sent_at = int(time.time() * 1000)
                    self.out.append(encode(packets.SendAck(send.client_msg_id, 0, server_id, seq, sent_at, 1, conversation, "")))
                    peer = online.get(send.target)
                    if peer is not None:
                        message = Message(server_id, conversation, seq, self.user, self.device, send.client_msg_id, sent_at, send.content_type, send.body)
                        peer.out.append(encode(packets.Deliver(message)))
                        touched.add(peer)
                elif kind == schema.HELLO:
                    self.out.append(encode(packets.HelloOk(schema.PROTOCOL_VERSION, 1 << 20, 30000, "relay")))
                elif kind == schema.LOGIN:
                    login = decode_body(kind, body)
                    self.user, self.device = login.user, login.device
                    online[self.user] = self
                    self.out.append(encode(packets.LoginResult(0, int(time.time() * 1000), b"", "")))
                elif kind == schema.PING:
                    self.out.append(encode(packets.Pong(decode_body(kind, body).nonce)))
                elif kind == schema.BYE:
                    self.transport.loseConnection()
            for connection in touched:
                if connection.out:
                    connection.transport.write(b"".join(connection.out))
                    connection.out = []

        def connectionLost(self, reason: Any = None) -> None:
            if online.get(self.user) is self:
                del online[self.user]

    async def run(reactor: Any) -> None:
        _ca, cert, key = default_cert_paths()
        endpoint = SSL4ServerEndpoint(reactor, 0, server_tls_options(cert, key), interface="127.0.0.1")
        port = await endpoint.listen(Factory.forProtocol(Relay))
        tune_garbage_collector()
        emit("listening", port=port.getHost().port)
        await defer.Deferred()  # until the benchmark stops us

    stop_cleanly_on_sigterm()
    react(lambda reactor: defer.ensureDeferred(run(reactor)))


def role_mqtt_receiver(args: argparse.Namespace) -> None:
    client = mqtt_client(f"bench-recv-{os.getpid()}")
    tally = Tally(args.count)
    subscribed = threading.Event()
    done = threading.Event()
    client.on_connect = lambda c, userdata, flags, reason, properties: c.subscribe(TOPIC, qos=1)
    client.on_subscribe = lambda c, userdata, mid, reasons, properties: subscribed.set()

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        if not done.is_set() and tally.got(message.payload):
            done.set()

    client.on_message = on_message
    host, port = args.server.rsplit(":", 1)
    client.connect(host, int(port), keepalive=60)
    client.loop_start()
    try:
        if not subscribed.wait(READY_TIMEOUT):
            emit("error", error=f"not subscribed within {READY_TIMEOUT:g} s")
            return
        cpu_before = time.process_time()
        emit("ready")
        if done.wait(args.timeout):
            emit("done", **tally.result(cpu_before))
        else:
            emit("error", error=f"only {tally.received} of {args.count} messages within {args.timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()


def role_mqtt_sender(args: argparse.Namespace) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt_client(f"bench-send-{os.getpid()}")
    client.max_inflight_messages_set(args.window)
    client.max_queued_messages_set(0)
    window = Window(args.count, args.window)
    room = threading.Semaphore(args.window)
    connected = threading.Event()
    done = threading.Event()
    lock = threading.Lock()

    def on_publish(c: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with lock:
            window.acked += 1
            window.last_ack = time.time()
            if window.acked >= window.count:
                done.set()
        room.release()

    client.on_connect = lambda c, userdata, flags, reason, properties: connected.set()
    client.on_publish = on_publish
    host, port = args.server.rsplit(":", 1)
    client.connect(host, int(port), keepalive=60)
    client.loop_start()
    try:
        if not connected.wait(READY_TIMEOUT):
            emit("error", error=f"not connected within {READY_TIMEOUT:g} s")
            return
        go = threading.Event()
        read_go_line(lambda line: go.set())
        emit("ready")
        if not go.wait(READY_TIMEOUT):
            emit("error", error="no go line")
            return
        cpu_before = time.process_time()
        window.first = time.time()
        deadline = time.monotonic() + args.timeout
        for index in range(args.count):
            if not room.acquire(timeout=max(0.0, deadline - time.monotonic())):
                emit("error", error=f"window never opened: {window.acked} of {args.count} acknowledged within {args.timeout:g} s")
                return
            info = client.publish(TOPIC, make_body(index, args.size), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                emit("error", error=f"publish {index} failed: {mqtt.error_string(info.rc)}")
                return
            window.sent += 1
        if done.wait(max(0.0, deadline - time.monotonic())):
            emit("done", **window.result(cpu_before))
        else:
            emit("error", error=f"only {window.acked} of {args.count} acknowledged within {args.timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()


ROLES = {
    "imkit-receiver": role_imkit_receiver,
    "imkit-sender": role_imkit_sender,
    "imkit-raw-receiver": role_imkit_raw_receiver,
    "imkit-raw-sender": role_imkit_raw_sender,
    "relay-server": role_relay_server,
    "mqtt-receiver": role_mqtt_receiver,
    "mqtt-sender": role_mqtt_sender,
}


# The benchmark ---------------------------------------------------------------------------------


def role_argv(role: str, server: str, opts: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        role,
        "--server",
        server,
        "--count",
        str(opts.count),
        "--window",
        str(opts.window),
        "--size",
        str(opts.size),
        "--timeout",
        str(opts.timeout),
    ]


def drive(system: str, server: Any, opts: argparse.Namespace, cleanup: Cleanup, spy: Any = None) -> dict[str, Any]:
    """Start the receiver, then the sender; say go; wait for both to finish; read the server's CPU."""
    prefix = {"imkit": "imkit", "imkit/raw": "imkit-raw", "relay": "imkit-raw"}.get(system, "mqtt")
    receiver = cleanup.child(Child(f"{system} receiver", role_argv(f"{prefix}-receiver", server.server, opts)))
    receiver.wait_json("ready", READY_TIMEOUT + 10)
    sender = cleanup.child(Child(f"{system} sender", role_argv(f"{prefix}-sender", server.server, opts), stdin=subprocess.PIPE))
    sender.wait_json("ready", READY_TIMEOUT + 10)
    if spy is not None:
        spy.start(server.pid)
    cpu_before = server.cpu()
    threads_before = server.thread_cpu() if hasattr(server, "thread_cpu") else (0.0, 0.0)
    assert sender.proc.stdin is not None
    sender.proc.stdin.write(b"go\n")
    sender.proc.stdin.flush()
    sent = sender.wait_json("done", opts.timeout + 30)
    received = receiver.wait_json("done", opts.timeout + 30)
    time.sleep(0.3)  # the last delivery acknowledgements reach the server
    cpu_after = server.cpu()
    threads_after = server.thread_cpu() if hasattr(server, "thread_cpu") else (0.0, 0.0)
    if spy is not None:
        spy.stop()
    for child in (sender, receiver):
        child.wait_exit(30)
    if sent["acked"] != opts.count or received["received"] != opts.count:
        raise BenchError(f"{system}: {sent['acked']} acknowledged and {received['received']} received of {opts.count}")
    if received["out_of_order"]:
        raise BenchError(f"{system}: {received['out_of_order']} of {opts.count} messages arrived out of order")
    n = opts.count
    return {
        "system": system,
        "e2e_rate": n / (received["last"] - sent["first"]),
        "ack_rate": n / (sent["last_ack"] - sent["first"]),
        "p50_ms": received["p50"] * 1e3,
        "p99_ms": received["p99"] * 1e3,
        "max_ms": received["max"] * 1e3,
        "server_cpu_us": (cpu_after - cpu_before) / n * 1e6,
        "sender_cpu_us": sent["cpu"] / n * 1e6,
        "receiver_cpu_us": received["cpu"] / n * 1e6,
        "server_cpu_s": cpu_after - cpu_before,
        "server_main_cpu_us": (threads_after[0] - threads_before[0]) / n * 1e6,
        "server_other_cpu_us": (threads_after[1] - threads_before[1]) / n * 1e6,
    }


def run_imkit(opts: argparse.Namespace, spy: Any = None, system: str = "imkit") -> dict[str, Any]:
    with Cleanup() as cleanup:
        server = ImkitServer(cleanup, {"alice": PASSWORD, "bob": PASSWORD}, twistd=getattr(spy, "twistd", None))
        result = drive(system, server, opts, cleanup, spy)
        errors = server.log_errors()
        if errors:
            raise BenchError(f"the {system} server logged errors:\n" + "\n".join(errors[:10]))
        return result


def run_imkit_raw(opts: argparse.Namespace) -> dict[str, Any]:
    """The same server with the lean clients (RawClient): what the server itself carries."""
    return run_imkit(opts, system="imkit/raw")


class RelayServer:
    """The ``relay`` system's server (``role_relay_server``) in its own process."""

    def __init__(self, cleanup: Cleanup) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "relay-server", "--server", "localhost:0"]
        self.child = cleanup.child(Child("relay server", argv))
        self.port = self.child.wait_json("listening", READY_TIMEOUT)["port"]
        self.pid = self.child.pid

    @property
    def server(self) -> str:
        return f"localhost:{self.port}"

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


def run_relay(opts: argparse.Namespace) -> dict[str, Any]:
    """RawClients against a relay that stores and tracks nothing: the ceiling of this design here."""
    with Cleanup() as cleanup:
        return drive("relay", RelayServer(cleanup), opts, cleanup)


def run_mosquitto(opts: argparse.Namespace) -> dict[str, Any]:
    with Cleanup() as cleanup:
        broker = Mosquitto(cleanup, max_inflight=opts.window)
        return drive("mosquitto", broker, opts, cleanup)


def run_mosquitto_c(opts: argparse.Namespace) -> dict[str, Any]:
    """
    The same workload with Mosquitto's own C clients: ``mosquitto_pub -l -q 1 -M WINDOW`` fed
    timestamped lines by us through a pipe shrunk to one page (so lines do not wait in it long),
    and ``mosquitto_sub -q 1 -C N`` whose lines we time as they arrive.  "Acknowledged" is
    when mosquitto_pub exits: it waits for the acknowledgement of everything it sent.
    """
    n = opts.count
    with Cleanup() as cleanup:
        broker = Mosquitto(cleanup, max_inflight=opts.window)
        tls = ["-h", "localhost", "-p", str(broker.port), "--cafile", CA, "-q", "1", "-t", TOPIC]
        sub = cleanup.child(Child("mosquitto_sub", ["mosquitto_sub", *tls, "-C", str(n), "-i", "bench-sub-c"], keep_times=True))
        wait_until(lambda: broker.subscribed("bench-sub-c", TOPIC), READY_TIMEOUT, "mosquitto_sub to subscribe")
        pub = cleanup.child(
            Child("mosquitto_pub", ["mosquitto_pub", *tls, "-l", "-M", str(opts.window), "-i", "bench-pub-c"], stdin=subprocess.PIPE)
        )
        assert pub.proc.stdin is not None
        try:
            fcntl.fcntl(pub.proc.stdin.fileno(), F_SETPIPE_SZ, 4096)
        except OSError:
            pass  # a larger pipe only adds latency on the Mosquitto side
        wait_until(lambda: "as bench-pub-c " in file_text(broker.log_path), READY_TIMEOUT, "mosquitto_pub to connect")
        cpu_before = broker.cpu()
        first = time.time()

        # At most WINDOW lines written and not yet delivered: the clients' bounded window, measured
        # by delivery since mosquitto_pub does not show its acknowledgements.
        def room(written: int) -> None:
            sub.wait_for(lambda: len(sub.lines) > written - opts.window, opts.timeout, "room in the window")

        writer = threading.Thread(target=feed_lines, args=(pub.proc.stdin, n, opts.size, room), daemon=True)
        writer.start()
        sub.wait_for(lambda: len(sub.lines) >= n, opts.timeout, f"{n} lines")
        pub.wait_exit(opts.timeout)
        sub.wait_exit(30)
        time.sleep(0.3)
        cpu_after = broker.cpu()
        if pub.proc.returncode or sub.proc.returncode:
            raise BenchError(
                f"mosquitto_pub exited {pub.proc.returncode}, mosquitto_sub {sub.proc.returncode}:\n{pub.output_tail()}\n{sub.output_tail()}"
            )
        latencies = []
        out_of_order = 0
        for expected, (line, arrived) in enumerate(zip(sub.lines, sub.times)):
            index_text, stamp_text, _ = line.split(" ", 2)
            out_of_order += int(index_text) != expected
            latencies.append(arrived - float(stamp_text))
        if len(sub.lines) != n or out_of_order:
            raise BenchError(f"mosquitto C clients: {len(sub.lines)} lines of {n}, {out_of_order} out of order")
        latencies.sort()
        assert pub.exit_time is not None and pub.cpu is not None and sub.cpu is not None
        return {
            "system": "mosquitto C",
            "e2e_rate": n / (sub.times[-1] - first),
            "ack_rate": n / (pub.exit_time - first),
            "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "max_ms": latencies[-1] * 1e3,
            "server_cpu_us": (cpu_after - cpu_before) / n * 1e6,
            # From their resource usage at exit: the TLS handshake included, nothing else to leave out.
            "sender_cpu_us": pub.cpu / n * 1e6,
            "receiver_cpu_us": sub.cpu / n * 1e6,
            "server_cpu_s": cpu_after - cpu_before,
        }


def feed_lines(stream: Any, count: int, size: int, room: Callable[[int], Any], chunk: int = 16) -> None:
    """
    Write ``count`` timestamped lines (as ``make_body``, newline-free), ``chunk`` per write, each
    write once ``room(written)`` returns, then close.
    """
    try:
        for start in range(0, count, chunk):
            room(start + chunk)
            stream.write(b"".join(make_body(i, size) + b"\n" for i in range(start, min(count, start + chunk))))
            stream.flush()
        stream.close()
    except (BrokenPipeError, ValueError, BenchError):
        pass  # mosquitto_pub was stopped, or stopped delivering: the benchmark reports why


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median end-to-end rate (whole runs, so the figures belong together)."""
    ordered = sorted(results, key=lambda r: r["e2e_rate"])
    return ordered[(len(ordered) - 1) // 2]


ROWS = [
    ("end to end (msg/s)", "e2e_rate", "{:,.0f}"),
    ("acknowledged (msg/s)", "ack_rate", "{:,.0f}"),
    ("latency p50 (ms)", "p50_ms", "{:.1f}"),
    ("latency p99 (ms)", "p99_ms", "{:.1f}"),
    ("latency max (ms)", "max_ms", "{:.1f}"),
    ("server CPU (us/msg)", "server_cpu_us", "{:.1f}"),
    ("sender CPU (us/msg)", "sender_cpu_us", "{:.1f}"),
    ("receiver CPU (us/msg)", "receiver_cpu_us", "{:.1f}"),
]


def format_table(imkit: dict[str, Any], others: list[tuple[str, dict[str, Any]]]) -> str:
    """One column per system; after each column but imkit's, the ratio imkit / that column."""
    head = f"{'':<24}{'imkit':>10}"
    for name, _ in others:
        head += f"{name:>14}{'ratio':>12}"
    lines = [head, "-" * len(head)]
    for label, key, fmt in ROWS:
        line = f"{label:<24}{fmt.format(imkit[key]):>10}"
        for _, other in others:
            ratio = imkit[key] / other[key] if other[key] else float("inf")
            line += f"{fmt.format(other[key]):>14}{ratio:>12.2f}"
        lines.append(line)
    return "\n".join(lines)


# Profiling the server ----------------------------------------------------------------------------


class YappiProfiler:
    """
    The server run by ``_profiled_twistd.py``: yappi measures CPU time per function in every
    thread, between two SIGUSR2 (sent when the sender is told to go, and after the last delivery).

    Deterministic profiling with a CPU clock costs a few microseconds per call, so the profiled
    server uses several times the CPU it uses otherwise, and functions called often look
    heavier than they are.  The report scales each thread's figures down to that thread's CPU in
    the unprofiled runs (``us/msg``), and shows calls per message, which the profiler does not
    distort.
    """

    name = "yappi, CPU clock per thread, deterministic"

    def __init__(self, cleanup: Cleanup) -> None:
        self.path = os.path.join(cleanup.tempdir("imkit-profile-"), "yappi.json")
        self.twistd = [sys.executable, os.path.join(HERE, "_profiled_twistd.py"), self.path]
        self.pid = 0

    def start(self, pid: int) -> None:
        self.pid = pid
        os.kill(pid, signal.SIGUSR2)

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGUSR2)
        wait_until(lambda: os.path.exists(self.path), 60, "the profile to be written")

    def report(self, count: int, real: dict[str, Any], top: int = 20) -> str:
        with open(self.path) as f:
            threads = [t for t in json.load(f)["threads"] if t["cpu"] > 0]
        profiled = sum(t["cpu"] for t in threads)
        lines = [
            f"profiled CPU {profiled / count * 1e6:.1f} us/msg, {profiled * 1e6 / count / real['server_cpu_us']:.1f} times the "
            f"{real['server_cpu_us']:.1f} us/msg measured without the profiler; "
            "us/msg below are scaled to each thread's unprofiled CPU; % is of the thread's profiled CPU"
        ]
        for thread in sorted(threads, key=lambda t: -t["cpu"]):
            if thread["cpu"] < 0.05 * profiled:
                continue
            unprofiled = real["server_main_cpu_us"] if thread["main"] else real["server_other_cpu_us"]
            scale = unprofiled / (thread["cpu"] / count * 1e6)  # profiled us/msg -> unprofiled us/msg
            own: Counter[str] = Counter()
            inclusive: Counter[str] = Counter()
            calls: Counter[str] = Counter()
            for function in thread["functions"]:
                name = short(f"{function['name']} ({function['module']}:{function['line']})")
                own[name] += function["own"]
                inclusive[name] = max(inclusive[name], function["inclusive"])
                calls[name] += function["calls"]
            lines += [
                "",
                f"thread {thread['name']}: {thread['cpu'] * 100 / profiled:.0f}% of the profiled CPU; "
                f"{unprofiled:.1f} us/msg unprofiled{' (with the other non-reactor threads)' if not thread['main'] else ''}; "
                f"{sum(calls.values()) / count:.1f} Python calls per message",
            ]
            rows = top if thread["main"] else max(10, top // 2)
            for title, table in (("own time", own), ("inclusive time", inclusive)):
                lines += [f"  top {rows} by {title}", f"  {'us/msg':>8}{'%':>7}{'calls/msg':>11}  function"]
                lines += [
                    f"  {seconds / count * 1e6 * scale:>8.2f}{seconds * 100 / thread['cpu']:>7.1f}{calls[name] / count:>11.2f}  {name}"
                    for name, seconds in table.most_common(rows)
                ]
        return "\n".join(lines)


class PySpyProfiler:
    """
    ``py-spy record`` attached to the server for the timed part of a run (raw collapsed stacks).

    Beware: py-spy counts a thread as busy when it is not in a wait it recognises, so a thread
    waiting for the GIL or for an fsync counts; on this server its totals come out two to three
    times the real CPU time.  It is a wall-clock view of the busy threads, not a CPU profile.
    """

    name = "py-spy, sampled wall time of threads py-spy considers active"

    def __init__(self, cleanup: Cleanup, rate: int) -> None:
        self.rate = rate
        self.path = os.path.join(cleanup.tempdir("imkit-profile-"), "stacks.txt")
        self.proc: subprocess.Popen | None = None
        self.twistd = None
        self._cleanup = cleanup

    def start(self, pid: int) -> None:
        argv = [script("py-spy"), "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--function", "--threads"]
        argv += ["--output", self.path]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._cleanup.add(self.stop)
        time.sleep(0.5)  # attached before the first message
        if self.proc.poll() is not None:
            raise BenchError(f"py-spy failed: {self.proc.stderr.read().decode(errors='replace') if self.proc.stderr else ''}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def report(self, count: int, real: dict[str, Any], top: int = 20) -> str:
        stacks = []
        with open(self.path) as f:
            for line in f:
                stack, _, number = line.rstrip("\n").rpartition(" ")
                if stack:
                    stacks.append((stack.split(";"), int(number)))
        total = sum(n for _, n in stacks)
        if not total:
            return "py-spy recorded no samples"
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        threads: Counter[str] = Counter()
        for frames, n in stacks:
            thread, *calls = frames  # --threads: the first frame names the thread
            threads[thread.split(": ", 1)[-1]] += n
            if calls:
                own[short(calls[-1])] += n
                for call in set(calls):
                    inclusive[short(call)] += n
        us = 1e6 / self.rate / count
        lines = [
            f"{total} samples at {self.rate} Hz = {total / self.rate:.2f} s, {total * us:.1f} us per message; by thread: "
            + ", ".join(f"{name} {n * 100 / total:.0f}%" for name, n in threads.most_common()),
        ]
        for title, table in (("own time", own), ("inclusive time", inclusive)):
            lines += ["", f"top {top} by {title}", f"{'us/msg':>8}{'%':>7}  function"]
            lines += [f"{n * us:>8.2f}{n * 100 / total:>7.1f}  {name}" for name, n in table.most_common(top)]
        return "\n".join(lines)


def short(frame: str) -> str:
    """``function (path/to/module.py:12)`` -> ``function (imkit/module.py:12)``; install prefixes cut."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3.", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3.":
                where = where.split("/", 1)[-1]
            break
    return f"{name} ({where})" if where else name


def profile_imkit(opts: argparse.Namespace, real: dict[str, Any]) -> str:
    """Profile the server in a run of its own; ``real`` is an unprofiled run, to scale against."""
    with Cleanup() as cleanup:
        profiler: YappiProfiler | PySpyProfiler
        if opts.profile == "py-spy":
            profiler = PySpyProfiler(cleanup, opts.profile_rate)
        else:
            if importlib.util.find_spec("yappi") is None:  # the profiled server imports it
                raise BenchError("--profile needs yappi: pip install yappi (or use --profile py-spy)")
            profiler = YappiProfiler(cleanup)
        result = run_imkit(opts, profiler)
        report = profiler.report(opts.count, real)
        if opts.profile_output:
            shutil.copyfile(profiler.path, opts.profile_output)
            report += f"\n(raw profile saved to {opts.profile_output})"
    return (
        f"imkit server profile ({profiler.name}), a separate run of {opts.count:,} messages: "
        f"{result['e2e_rate']:,.0f} msg/s end to end while profiled, server CPU {result['server_cpu_us']:.1f} us/msg "
        f"by /proc (profiler included)\n{report}"
    )


# Command line ------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> tuple[str | None, argparse.Namespace]:
    argv = sys.argv[1:] if argv is None else argv
    role = argv[0] if argv and argv[0] in ROLES else None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=None, help="messages per run (default 20000, --quick 5000)")
    parser.add_argument("--window", type=int, default=1000, help="unacknowledged messages at most (default 1000)")
    parser.add_argument("--size", type=int, default=100, help="message body bytes (default 100)")
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per system; the run with the median rate is shown (default 3, --quick 1)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds a run may take at most (default: from --count)")
    parser.add_argument("--quick", action="store_true", help="fewer messages")
    parser.add_argument("--no-mosquitto", action="store_true", help="run imkit only")
    parser.add_argument("--no-raw", action="store_true", help="skip imkit/raw (imkit with the lean clients)")
    parser.add_argument("--no-relay", action="store_true", help="skip relay (a minimal relay that stores nothing: the yardstick)")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="yappi",
        choices=["yappi", "py-spy"],
        help="also profile the imkit server in a separate run: yappi (CPU per function, the default) or py-spy",
    )
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--profile-output", metavar="FILE", help="keep the raw profile (yappi JSON, py-spy collapsed stacks) in FILE")
    parser.add_argument("--server", help=argparse.SUPPRESS)  # for the client roles
    opts = parser.parse_args(argv[1:] if role else argv)
    if opts.count is None:
        opts.count = 5000 if opts.quick else 20000
    if opts.runs is None:
        opts.runs = 1 if opts.quick or role else 3
    if opts.count < 1 or opts.window < 1 or opts.size < 32 or opts.runs < 1:
        parser.error("--count, --window and --runs must be positive and --size at least 32")
    if opts.timeout is None:
        opts.timeout = 60.0 + opts.count / 200
    return role, opts


def main(argv: list[str] | None = None) -> int:
    role, opts = parse(argv)
    if role is not None:
        ROLES[role](opts)
        return 0
    stop_cleanly_on_sigterm()
    try:
        import paho.mqtt

        paho_version: str | None = getattr(paho.mqtt, "__version__", "?")
    except ImportError:
        paho_version = None
    print(
        f"durable 1:1 messages over loopback TLS: {opts.count:,} messages of {opts.size} bytes, "
        f"at most {opts.window} unacknowledged, {os.cpu_count()} CPUs shared by server and both clients"
    )
    print(f"imkit: twistd -n imkit, SQLite store (commit before ack); clients: IMClient; Python {sys.version.split()[0]}")
    load = LoadMeter()
    try:
        systems: list[tuple[str, Callable[[argparse.Namespace], dict[str, Any]]]] = [("imkit", run_imkit)]
        if not opts.no_raw:
            print("imkit/raw: the same server; clients speak the wire protocol directly over TLS, without IMClient's bookkeeping")
            systems.append(("imkit/raw", run_imkit_raw))
        if not opts.no_relay:
            print("relay: a minimal Twisted relay (same TLS, codec and lean clients) that acks and forwards, storing and tracking nothing")
            systems.append(("relay", run_relay))
        if not opts.no_mosquitto:
            print(
                f"mosquitto: {version(['mosquitto', '-h'])}, our own broker with a TLS listener, QoS 1, persistence on, "
                f"max_inflight_messages {opts.window}, max_queued_messages 0 (no limit)"
            )
            if paho_version is not None:
                print(f"  mosq/paho: clients are paho-mqtt {paho_version} (Python, MQTT 3.1.1), as our IMClients are Python")
                systems.append(("mosq/paho", run_mosquitto))
            else:
                print("  mosq/paho: skipped, paho-mqtt is not installed (pip install paho-mqtt)")
            print(f"  mosq/C: clients are mosquitto_pub -l -M {opts.window} and mosquitto_sub (C); sender CPU from rusage")
            systems.append(("mosq/C", run_mosquitto_c))
        # Interleaved, so a change in the machine's background load touches every system alike.
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in systems}
        for _ in range(opts.runs):
            for name, run in systems:
                results[name].append(run(opts))
        imkit = median_run(results["imkit"])
        others = [(name, median_run(results[name])) for name, _ in systems[1:]]
        if opts.runs > 1:
            print(
                "end-to-end msg/s per run: "
                + "; ".join(f"{name} " + ", ".join(f"{r['e2e_rate']:,.0f}" for r in runs) for name, runs in results.items())
            )
            # Runs are interleaved, so run i of every system saw the same machine: the ratio of
            # each pair is steadier than the ratio of the medians when the machine's speed drifts.
            for name, runs in list(results.items())[1:]:
                pairs = [(a["server_cpu_us"] / b["server_cpu_us"], a["e2e_rate"] / b["e2e_rate"]) for a, b in zip(results["imkit"], runs)]
                cpu = sorted(pair[0] for pair in pairs)
                rate = sorted(pair[1] for pair in pairs)
                print(
                    f"imkit / {name}, run by run: server CPU {', '.join(f'{c:.2f}' for c, _ in pairs)} (median {cpu[len(cpu) // 2]:.2f});"
                    f" end to end msg/s {', '.join(f'{r:.2f}' for _, r in pairs)} (median {rate[len(rate) // 2]:.2f})"
                )
        print()
        print(format_table(imkit, others))
        print()
        for name, run in [("imkit", imkit), *others]:
            if name.startswith("imkit"):
                print(
                    f"{name} server CPU by thread: reactor {run['server_main_cpu_us']:.1f} us/msg, "
                    f"SQLite writer and other threads {run['server_other_cpu_us']:.1f} us/msg"
                )
        print(
            "end to end: first send to last delivery; acknowledged: first send to last ack; latency: receiver's "
            "clock minus the send time in the body; CPU: user+system seconds over the timed part, per message"
        )
        if not opts.no_mosquitto:
            print(f"note: {MOSQUITTO_NOTE}")
        print(load.describe())
        if opts.profile:
            print()
            print(profile_imkit(opts, imkit))
    except BenchError as error:
        print(f"bench_e2e: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
