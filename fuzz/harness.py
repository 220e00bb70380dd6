"""
The oracle shared by the atheris targets in this directory and ``tests/test_fuzz_properties.py``.

Three drivers feed hostile bytes to the wire layer and to both sans-IO sessions and check, after
every chunk, what must hold whatever the peer sends:

``check_stream``
    A ``FrameReader`` and ``codec.decode_body``: frames come out or ``DecodeError`` is raised,
    nothing else; the reader never holds more than one maximum frame; every body that decodes is
    the one canonical encoding of its packet (re-encoding gives the same bytes back); operation
    bodies inside messages decode the same way (``imkit.operations``).
``ServerRun``
    A ``ServerConnection`` on a fake clock, driven into a state (before Hello, after Hello, after
    login, the login accepted with ``accept_login`` as the hub does) and then fed: it never raises,
    returns only the events the hub knows and only those its state allows, answers with valid
    frames and at most as many bytes as it was sent (plus a small constant), never buffers more than
    one frame, and once it reports ``ConnectionClosing`` it is closed, the error was sent in an
    ``Error`` frame, and it ignores everything afterwards.
``ClientRun``
    The same for ``ClientCore`` fed by a hostile server (before connecting, awaiting HelloOk,
    awaiting LoginResult, logged in with sends in its outbox): it never raises, returns only client
    events, hands each conversation's messages to the application in strictly increasing order,
    and writes valid frames only.

Any broken rule raises ``AssertionError`` (any other exception escapes as it is): both the
fuzzers and hypothesis report either as a failure.  Nothing here imports atheris or hypothesis.

``sample_packets``, ``server_seeds``, ``client_seeds`` and ``frame_seeds`` build the seed corpus
from valid frames; ``decode_input`` turns one fuzzer input (a control byte, then the stream) into
the run's options and chunks, so a crash file replays the same way in a test.
"""

from __future__ import annotations

import random
import struct
import types
from typing import Any, Iterable, Iterator

import attrs
from twisted.internet.task import Clock

from imkit import operations
from imkit.model import Item, Message
from imkit.session import client as client_session
from imkit.session import events
from imkit.session import server as server_session
from imkit.session.client import ClientCore
from imkit.session.server import ServerConnection
from imkit.session.settings import ClientSettings, ServerSettings
from imkit.wire import codec, packets, schema
from imkit.wire.errors import DecodeError, ErrorCode
from imkit.wire.framing import FrameReader
from imkit.wire.packets import PACKET_CLASSES, RECORD_CLASSES

HEADER = schema.HEADER_SIZE
LENGTH = schema.LENGTH_SIZE

MAX_UNACKED = 4
"""The server window in runs: small, so that clients fill it and open it again."""
CONVERSATIONS = ("c:alice:bob", "g:team")
"""Where the fake hub delivers, in turn."""

SMALL_FRAME = 300
"""The small frame limit runs may choose, so that fuzzed lengths reach it easily."""

REPLY_SLACK = 256
"""
Bytes a server session may write in reply to one chunk beyond the chunk's own size: a HelloOk and
an Error frame.  Everything else it writes in reply (a Pong per Ping) is no larger than what it
answers, so a client cannot make it write more than it is sent.
"""

CLIENT_SLACK = 1024
"""
The same allowance for a client session (its Login, its resends and first Sync after login).  A
client may write up to three times what it is sent besides: it answers each cursor of a Heads
frame (10 bytes plus the name) with a Sync request of its own (27 bytes plus the name).
"""

SERVER_EVENTS = (
    events.LoginRequested,
    events.SendRequested,
    events.DeliveryAcked,
    events.SyncRequested,
    events.RequestReceived,
    events.WindowOpened,
    events.ConnectionClosing,
)
CLIENT_EVENTS = (
    events.LoggedIn,
    events.LoginRejected,
    events.SendAcknowledged,
    events.SendRejected,
    events.SendExpired,
    events.MessagesDelivered,
    events.NoticeReceived,
    events.AnswerReceived,
    events.HistoryUnavailable,
    events.CaughtUp,
    events.ServerError,
    events.CloseConnection,
)

CLIENT_KINDS = sorted(k for k, d in schema.DIRECTION.items() if d != schema.SERVER_TO_CLIENT)
SERVER_KINDS = sorted(k for k, d in schema.DIRECTION.items() if d != schema.CLIENT_TO_SERVER)

# Frames ----------------------------------------------------------------------------------------


def frame(kind: int, body: bytes, version: int = schema.PROTOCOL_VERSION, flags: int = 0) -> bytes:
    """A frame around ``body`` with whatever header fields the caller wants (even wrong ones)."""
    return struct.pack(">IBBH", len(body) + 4, version, flags, kind) + body


def split_frames(stream: bytes) -> list[tuple[int, int, Any]]:
    """Decode a stream a session wrote: every frame must be whole and valid."""
    reader = FrameReader(max_frame=2**32 - 1)
    found = [(kind, flags, codec.decode_body(kind, body)) for kind, flags, body in reader.feed(stream)]
    assert reader.buffered == 0, f"a session wrote {reader.buffered} bytes of an incomplete frame"
    return found


OPERATION_ITEMS = (
    operations.contact_add(),
    operations.contact_block(),
    operations.group_create("team", ["bob", "carol"]),
    operations.group_add(["dave"]),
    operations.group_leave(),
    operations.recall(3),
    operations.edit(2, "text/plain", b"fixed"),
    operations.retention(3600),
)
"""Valid operation items, so mutated message bodies reach ``operations.decode``."""


def _limit(fmt: str) -> int:
    return 2 ** (8 * struct.calcsize(">" + fmt)) - 1


_TYPICAL = {
    "min_version": schema.PROTOCOL_VERSION,
    "max_version": schema.PROTOCOL_VERSION,
    "version": schema.PROTOCOL_VERSION,
    "method": schema.LOGIN_PASSWORD,
    "target_type": schema.TARGET_USER,
    "max_frame": schema.DEFAULT_MAX_FRAME,
    "heartbeat_ms": 30_000,
    "status": 0,
    "code": 0,
    "bundle_remaining": 0,
    "count": 1,
    "limit": 500,
    "content_type": "text/plain",
    "conversation": "c:alice:bob",
    "user": "alice",
    "sender": "alice",
    "device": "phone",
    "sender_device": "phone",
    "target": "bob",
}


def _sample(field: codec._Field, variant: int, index: int) -> Any:
    """Variant 0: zeros and empty; 1: typical values; 2: the largest integers, non-ASCII text."""
    shape = field.shape
    if shape == "int":
        if variant == 1:
            return _TYPICAL.get(field.name, index + 1)
        return 0 if variant == 0 else _limit(field.fmt)
    if shape == "flag":
        return variant == 1
    if shape == "str":
        if variant == 1:
            return _TYPICAL.get(field.name, f"{field.name}-{index}")
        return "" if variant == 0 else "é✓" * 5
    if shape == "bytes":
        return [b"", b"hello", bytes(range(40))][variant]
    if shape == "ints":
        return tuple(range(variant + 1)) if variant != 2 else (0, _limit(field.record))
    if shape in ("list", "record"):
        cls = RECORD_CLASSES[id(field.record)]
        if shape == "record":
            return _build(field.record, cls, variant, index)
        return tuple(_build(field.record, cls, variant, index + n) for n in range(variant + 1))
    raise AssertionError(shape)


def _build(declaration: Any, cls: type, variant: int, index: int = 0) -> Any:
    return cls(**{f.name: _sample(f, variant, index) for f in codec.describe(declaration)})


def sample_packets(kind: int) -> list[Any]:
    """Three valid packets of ``kind``, built from its declaration."""
    return [_build(schema.BODIES[kind], PACKET_CLASSES[kind], variant) for variant in range(3)]


def message(conversation: str, seq: int, remaining: int = 0, item: Item | None = None) -> Message:
    item = item or Item("text/plain", b"hi %d" % seq)
    return Message(seq + 100, conversation, seq, "bob", "laptop", seq, 1_700_000_000_000, item.content_type, item.body, remaining)


# Reader and decoder ----------------------------------------------------------------------------


def _check_operations(packet: Any) -> None:
    """Operation items inside a decoded packet decode to their one canonical body, or not at all."""
    items: Iterable[Any] = ()
    if isinstance(packet, (packets.Send,)):
        items = (packet,)
    elif isinstance(packet, packets.Bundle):
        items = packet.items
    elif isinstance(packet, packets.Deliver):
        items = (packet.message,)
    elif isinstance(packet, (packets.DeliverBundle, packets.SyncResult)):
        items = packet.messages
    for item in items:
        if not operations.is_operation(item.content_type):
            continue
        try:
            value = operations.decode(item.content_type, item.body)
        except DecodeError:
            continue
        again = operations.encode(item.content_type, value)
        assert again == item.body, f"{item.content_type} body {item.body!r} decodes to {value!r}, which encodes to {again!r}"


def check_stream(chunks: Iterable[bytes], max_frame: int = schema.DEFAULT_MAX_FRAME) -> tuple[list, ErrorCode | None]:
    """
    Feed ``chunks`` to a FrameReader and decode every frame; return the decoded packets (a
    body's DecodeError in place of its packet) and the code of the framing error that ended the
    stream (None if none).  Frames are independent of their bodies, so a bad body does not end
    the stream here (a session stops at it).
    """
    reader = FrameReader(max_frame)
    found: list[Any] = []
    try:
        for chunk in chunks:
            for kind, flags, body in reader.feed(chunk):
                assert 0 <= kind <= 0xFFFF and 0 <= flags <= 0xFF, (kind, flags)
                assert len(body) + LENGTH <= max_frame, f"a body of {len(body)} bytes passed a limit of {max_frame}"
                try:
                    packet = codec.decode_body(kind, body)
                except DecodeError as error:
                    assert error.code in (ErrorCode.MALFORMED_FRAME, ErrorCode.UNKNOWN_KIND), error
                    assert (error.code == ErrorCode.UNKNOWN_KIND) == (kind not in PACKET_CLASSES), error
                    found.append(error.code)
                    continue
                assert type(packet) is PACKET_CLASSES[kind], (kind, packet)
                again = codec.encode(packet, flags)
                assert again[HEADER:] == body, f"{body!r} decodes to {packet!r}, which encodes to {again[HEADER:]!r}"
                _check_operations(packet)
                found.append(packet)
            assert reader.buffered < LENGTH + max_frame, f"reader holds {reader.buffered} bytes, limit {max_frame}"
    except DecodeError as error:
        assert error.code in (
            ErrorCode.MALFORMED_FRAME,
            ErrorCode.FRAME_TOO_LARGE,
            ErrorCode.UNSUPPORTED_VERSION,
        ), error
        return found, error.code
    return found, None


# Server session --------------------------------------------------------------------------------

BEFORE_HELLO = "before-hello"
AFTER_HELLO = "after-hello"
AFTER_LOGIN = "after-login"
SERVER_STARTS = (BEFORE_HELLO, AFTER_HELLO, AFTER_LOGIN)


def _server_allows(state: str, event: Any) -> bool:
    """May a connection in ``state`` (before the chunk) report ``event``?"""
    kind = type(event)
    if kind in (events.ConnectionClosing, events.WindowOpened):
        return True
    if kind is events.LoginRequested:
        return state in (server_session.AWAIT_HELLO, server_session.AWAIT_LOGIN)
    return state == server_session.READY


class ServerRun:
    """
    One ServerConnection fed by a hostile client, answered the way the hub answers: a login is
    accepted with ``accept_login`` (or refused, with ``refuse_login``), a send is acknowledged,
    a sync is answered with an empty result, a window that opens again gets its Heads.  After
    every chunk the hub delivers one more message, bundle or shared frame, alternating between two
    conversations, into a window of MAX_UNACKED: acks, resends, a full window and its reopening
    all have something to work on.
    """

    def __init__(self, start: str = BEFORE_HELLO, max_frame: int = schema.DEFAULT_MAX_FRAME, refuse_login: bool = False) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.max_frame = max_frame
        self.refuse_login = False  # the start state's own login is accepted
        settings = ServerSettings(max_frame=max_frame, max_unacked=MAX_UNACKED)
        self.conn = ServerConnection(self.clock, settings, peer="fuzz")
        self.heads = dict.fromkeys(CONVERSATIONS, 0)
        self.pushes = 0
        self.closed_with: events.ConnectionClosing | None = None
        self.logins = 0
        if start in (AFTER_HELLO, AFTER_LOGIN):
            assert self.feed(codec.encode(packets.Hello(1, 1, "fuzz"))) == []
            assert self.conn.state == server_session.AWAIT_LOGIN
        if start == AFTER_LOGIN:
            found = self.feed(codec.encode(packets.Login(schema.LOGIN_PASSWORD, "alice", "phone", b"pw")))
            assert [type(e) for e in found] == [events.LoginRequested], found
            assert self.conn.state == server_session.READY, self.conn.state
            self._deliver()
            self._deliver()
            self._hub_output()
        self.refuse_login = refuse_login

    def _deliver(self) -> None:
        """The hub's next push: a message, a bundle of two, or a frame shared with other members."""
        conn = self.conn
        if conn.state != server_session.READY:
            return
        self.pushes += 1
        conversation = CONVERSATIONS[self.pushes % 2]
        seq = self.heads[conversation] + 1
        if self.pushes % 3 == 0:
            bundle = (message(conversation, seq, 1), message(conversation, seq + 1, 0))
            pushed = conn.deliver_bundle(bundle)
            last = seq + 1
        elif self.pushes % 5 == 0:
            pushed = conn.deliver_frame(conversation, seq, codec.encode(packets.Deliver(message(conversation, seq))))
            last = seq
        else:
            pushed = conn.deliver(message(conversation, seq))
            last = seq
        # A refused push is held back: the hub tells the client the new head once the window opens.
        assert conn.unacked <= MAX_UNACKED and (pushed or conn.unacked == MAX_UNACKED), (pushed, conn.unacked)
        self.heads[conversation] = last

    def _hub_output(self) -> None:
        """What the hub's own calls wrote: valid server frames, nothing more to check."""
        self._check_output(self.conn.data_to_send())

    def _check_output(self, out: bytes) -> list[tuple[int, int, Any]]:
        written = split_frames(out)
        for kind, _flags, _packet in written:
            assert kind in SERVER_KINDS, f"server wrote a {PACKET_CLASSES[kind].__name__}"
        return written

    def feed(self, chunk: bytes) -> list[Any]:
        conn = self.conn
        self._hub_output()
        state = conn.state
        found = conn.receive_data(chunk)
        out = conn.data_to_send()
        written = self._check_output(out)
        if state == server_session.CLOSED:
            assert found == [] and out == b"", (found, out)
            return found
        for event in found:
            assert isinstance(event, SERVER_EVENTS), f"unknown event {event!r}"
            assert _server_allows(state, event), f"{event!r} in state {state}"
        assert len(out) <= len(chunk) + REPLY_SLACK, f"{len(chunk)} bytes in, {len(out)} bytes out"
        closing = [e for e in found if isinstance(e, events.ConnectionClosing)]
        if closing:
            self._closed(found, closing, written)
        else:
            assert conn.state != server_session.CLOSED
            buffered = conn._reader.buffered
            assert buffered < LENGTH + self.max_frame, f"reader holds {buffered} bytes, limit {self.max_frame}"
        self._answer(found)
        return found

    def _closed(self, found: list[Any], closing: list[Any], written: list[tuple[int, int, Any]]) -> None:
        [event] = closing
        assert found[-1] is event, f"events after the close: {found!r}"
        assert self.conn.state == server_session.CLOSED and self.conn.close_reason == event
        assert self.conn.next_deadline() is None, "a closed connection keeps timers"
        assert self.conn.unacked == 0
        if event.code != ErrorCode.OK:
            assert written and written[-1][0] == schema.ERROR, f"closed ({event}) without an Error frame: {written}"
            assert (written[-1][2].code, written[-1][2].reason) == (event.code, event.reason)
            assert len(event.reason.encode("utf-8")) < REPLY_SLACK // 2, event.reason
        else:
            assert event.reason == "client said goodbye", event
        self.closed_with = event

    def _answer(self, found: list[Any]) -> None:
        conn = self.conn
        for event in found:
            if isinstance(event, events.LoginRequested):
                self.logins += 1
                assert self.logins == 1, "a second LoginRequested"
                if conn.state == server_session.CLOSED:
                    # Closed by what followed the Login in the same chunk: the hub's late answer
                    # must change nothing.
                    conn.accept_login(event.user, event.device, b"token")
                    assert conn.state == server_session.CLOSED and conn.data_to_send() == b""
                    continue
                assert conn.state == server_session.AUTHENTICATING
                if self.refuse_login:
                    closing = conn.reject_login(ErrorCode.AUTH_FAILED, "wrong password")
                    assert closing is not None and conn.state == server_session.CLOSED
                    self.closed_with = closing
                else:
                    conn.accept_login(event.user, event.device, b"token")
                    assert conn.state == server_session.READY
            elif isinstance(event, events.SendRequested):
                packet = event.packet
                count = len(packet.items) if isinstance(packet, packets.Bundle) else 1
                conn.ack(packets.SendAck(packet.client_msg_id, 0, 7, 3, 0, count & 0xFFFF, "c:alice:bob", ""))
            elif isinstance(event, events.SyncRequested):
                conn.send_packet(packets.SyncResult(event.packet.request_id, False, (), ()))
            elif isinstance(event, events.WindowOpened):
                assert conn.unacked <= MAX_UNACKED // 2, conn.unacked
                conn.announce_heads(tuple(packets.Cursor(c, self.heads[c]) for c in event.conversations))
        self._deliver()

    def tick(self, seconds: float) -> list[Any]:
        """Let time pass; run the session's timer if a deadline is due (as the protocol does)."""
        self._hub_output()
        self.clock.advance(seconds)
        due = self.conn.next_deadline()
        if due is None or due > self.clock.seconds():
            return []
        state = self.conn.state
        found = self.conn.handle_timer()
        written = self._check_output(self.conn.data_to_send())
        for event in found:
            assert isinstance(event, events.ConnectionClosing), event
            assert event.code == ErrorCode.IDLE_TIMEOUT and state != server_session.CLOSED
            self._closed(found, found, written)
        if state != server_session.CLOSED and not found:
            for kind, flags, _packet in written:
                assert kind in (schema.DELIVER, schema.DELIVER_BUNDLE, schema.HEADS) and flags & schema.FLAG_RESEND
        return found


# Client session --------------------------------------------------------------------------------

DISCONNECTED = "disconnected"
AWAIT_HELLO_OK = "await-hello-ok"
AWAIT_LOGIN_RESULT = "await-login-result"
LOGGED_IN = "logged-in"
CLIENT_STARTS = (DISCONNECTED, AWAIT_HELLO_OK, AWAIT_LOGIN_RESULT, LOGGED_IN)

CLIENT_RNG_SEED = 4
"""The client's random generator is seeded, so its client message ids are known in advance."""


class ClientRun:
    """
    One ClientCore fed by a hostile server.  Before connecting it queues a send and a bundle of
    two, so acknowledgements (``outbox``: their client message ids) have something to match.
    """

    def __init__(self, start: str = LOGGED_IN, max_frame: int = schema.DEFAULT_MAX_FRAME, resume_token: bool = False) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.core = ClientCore(
            self.clock, "alice", "pw", "phone", ClientSettings(max_frame=max_frame), rng=random.Random(CLIENT_RNG_SEED)
        )
        if resume_token:
            self.core._resume_token = b"token"
        self.outbox = (
            self.core.send(schema.TARGET_USER, "bob", "text/plain", b"one"),
            self.core.send_bundle(schema.TARGET_USER, "bob", (Item("text/plain", b"a"), Item("text/plain", b"b"))),
        )
        self.delivered: dict[str, int] = {}
        self.disconnected = start == DISCONNECTED
        if start == DISCONNECTED:
            return
        self.core.connection_made()
        self._check_output(self.core.data_to_send())
        if start in (AWAIT_LOGIN_RESULT, LOGGED_IN):
            assert self.feed(codec.encode(packets.HelloOk(1, schema.DEFAULT_MAX_FRAME, 30_000, "imkit"))) == []
        if start == LOGGED_IN:
            found = self.feed(codec.encode(packets.LoginResult(0, 1_700_000_000_000, b"token", "")))
            assert [type(e) for e in found] == [events.LoggedIn], found
            assert self.core.state == client_session.READY

    def _check_output(self, out: bytes) -> list[tuple[int, int, Any]]:
        written = split_frames(out)
        for kind, _flags, _packet in written:
            assert kind in CLIENT_KINDS, f"client wrote a {PACKET_CLASSES[kind].__name__}"
        return written

    def feed(self, chunk: bytes) -> list[Any]:
        core = self.core
        self._check_output(core.data_to_send())
        state = core.state
        found = core.receive_data(chunk)
        out = core.data_to_send()
        self._check_output(out)
        if state == client_session.DISCONNECTED:
            assert found == [] and out == b"", (found, out)
            return found
        self._check_events(found)
        assert len(out) <= 3 * len(chunk) + CLIENT_SLACK, f"{len(chunk)} bytes in, {len(out)} bytes out"
        ended = [e for e in found if isinstance(e, (events.CloseConnection, events.LoginRejected))]
        if ended:
            assert core.state == client_session.DISCONNECTED, (found, core.state)
            self._disconnect()
        else:
            assert core.state != client_session.DISCONNECTED, found
            buffered = core._reader.buffered
            assert buffered < LENGTH + core._reader.max_frame, f"reader holds {buffered} bytes"
        return found

    def _disconnect(self) -> None:
        """The protocol above closes the transport: tell the core, as the client library does."""
        self.core.connection_lost()
        self.disconnected = True

    def _check_events(self, found: list[Any]) -> None:
        for event in found:
            assert isinstance(event, CLIENT_EVENTS), f"unknown event {event!r}"
            if isinstance(event, events.MessagesDelivered):
                for msg in event.messages:
                    last = self.delivered.get(msg.conversation)
                    assert last is None or msg.seq > last, f"{msg.conversation} delivered {msg.seq} after {last}"
                    self.delivered[msg.conversation] = msg.seq

    def tick(self, seconds: float) -> list[Any]:
        self.clock.advance(seconds)
        due = self.core.next_deadline()
        if due is None or due > self.clock.seconds():
            return []
        state = self.core.state
        found = self.core.handle_timer()
        self._check_output(self.core.data_to_send())
        self._check_events(found)
        if any(isinstance(e, events.CloseConnection) for e in found):
            assert state != client_session.DISCONNECTED
            self._disconnect()
        return found


# Fuzzer inputs ---------------------------------------------------------------------------------

CHUNK_SIZES = (0, 1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 31, 64, 100, 257, 1000)
"""Chunk sizes a control byte picks from (its high nibble); 0: the whole stream at once."""

TICK = 0.25
"""Seconds of fake time between two chunks: the login deadline (20 s) falls after 80 chunks."""
LAST_TICK = 100.0
"""Seconds of silence after the last chunk: past every idle deadline."""


@attrs.frozen
class Options:
    start: int
    """The low two bits of the control byte: which start state (modulo how many there are)."""
    alternative: bool
    """Bit 2: a refused login (server), a resume token in use (client)."""
    small_frame: bool
    """Bit 3: a frame limit of SMALL_FRAME bytes instead of the default."""
    chunk: int

    @property
    def max_frame(self) -> int:
        return SMALL_FRAME if self.small_frame else schema.DEFAULT_MAX_FRAME


def decode_input(data: bytes) -> tuple[Options, list[bytes]]:
    """A fuzzer input: one control byte, then the byte stream, cut into chunks as it says."""
    control = data[0] if data else 0
    options = Options(control & 0b11, bool(control & 0b100), bool(control & 0b1000), CHUNK_SIZES[control >> 4])
    stream = data[1:]
    size = options.chunk or max(len(stream), 1)
    return options, [stream[i : i + size] for i in range(0, len(stream), size)]


def control_byte(start: int = 0, alternative: bool = False, small_frame: bool = False, chunk: int = 0) -> int:
    return start | alternative << 2 | small_frame << 3 | CHUNK_SIZES.index(chunk) << 4


def run_frames_input(data: bytes) -> None:
    """The decoder target: the whole stream at once and in chunks must give the same outcome."""
    options, chunks = decode_input(data)
    whole = check_stream([b"".join(chunks)], options.max_frame)
    assert check_stream(chunks, options.max_frame) == whole


def run_server_input(data: bytes) -> None:
    options, chunks = decode_input(data)
    run = ServerRun(SERVER_STARTS[options.start % len(SERVER_STARTS)], options.max_frame, options.alternative)
    for chunk in chunks:
        run.feed(chunk)
        run.tick(TICK)
    run.tick(LAST_TICK)


def run_client_input(data: bytes) -> None:
    options, chunks = decode_input(data)
    run = ClientRun(CLIENT_STARTS[options.start], options.max_frame, options.alternative)
    for chunk in chunks:
        run.feed(chunk)
        run.tick(TICK)
    run.tick(LAST_TICK)


# Seeds -----------------------------------------------------------------------------------------


def all_sample_frames(kinds: Iterable[int] = sorted(PACKET_CLASSES)) -> list[bytes]:
    return [codec.encode(packet) for kind in kinds for packet in sample_packets(kind)]


def client_stream() -> list[Any]:
    """What an honest client sends after login: one of every packet it may send."""
    return [
        packets.Send(11, schema.TARGET_USER, "bob", "text/plain", b"hello"),
        packets.Bundle(12, schema.TARGET_NEW_GROUP, "", (OPERATION_ITEMS[2], Item("text/plain", b"hi all"))),
        packets.Bundle(13, schema.TARGET_CONVERSATION, "c:alice:bob", OPERATION_ITEMS[5:7]),
        packets.DeliverAck("c:alice:bob", 1),
        packets.Sync(1, schema.SYNC_SERVER_CURSORS, 500, (packets.Cursor("c:alice:bob", 0),)),
        packets.Read(2, "c:alice:bob"),
        packets.ReceiptsQuery(2, "c:alice:bob", (1, 2)),
        packets.Typing(True, "c:alice:bob"),
        packets.Presence(schema.PRESENCE_ONLINE, "here"),
        packets.Query(3, schema.QUERY_CONTACTS, ""),
        packets.Ping(5),
        packets.Pong(6),
        packets.DeliverAck("c:alice:bob", 2),
        packets.DeliverAck("g:team", 3),
        packets.Bye(0, "bye"),
    ]


def server_stream(outbox: tuple[int, ...]) -> list[Any]:
    """What an honest server sends after login, acknowledging the outbox of ``ClientRun``."""
    conversation = "c:alice:bob"
    return [
        packets.SyncResult(1, False, (packets.Range(conversation, 0, 2),), (message(conversation, 1),)),
        packets.SendAck(outbox[0], 0, 50, 3, 0, 1, conversation, ""),
        packets.SendAck(outbox[1], 0, 51, 4, 0, 2, conversation, ""),
        packets.Deliver(message(conversation, 7)),
        packets.DeliverBundle((message(conversation, 8, 1), message(conversation, 9, 0, OPERATION_ITEMS[5]))),
        packets.Heads((packets.Cursor("g:team", 4),)),
        packets.Receipt(2, conversation, "bob", "laptop"),
        packets.ReceiptsResult(2, 0, conversation, (packets.ReadCount(1, 1),), (packets.ReadMark(1, "bob"),)),
        packets.TypingNotice(True, conversation, "bob", "laptop"),
        packets.PresenceNotice(schema.PRESENCE_AWAY, "bob", "lunch"),
        packets.QueryResult(3, 0, "", (packets.Entry(0, 1, "bob", ""),)),
        packets.Ping(9),
        packets.Pong(10),
        packets.Error(int(ErrorCode.TOO_MANY_UNACKED), "slow down"),
    ]


def _joined(items: Iterable[Any]) -> bytes:
    return b"".join(codec.encode(p) for p in items)


def frame_seeds() -> Iterator[bytes]:
    """Seeds of the decoder target: each sample frame alone, in both frame limits, then streams."""
    for encoded in all_sample_frames():
        yield bytes([control_byte()]) + encoded
        yield bytes([control_byte(small_frame=True, chunk=3)]) + encoded
    yield bytes([control_byte(chunk=7)]) + _joined(client_stream())
    yield bytes([control_byte(chunk=13)]) + _joined(server_stream((1, 2)))


def server_seeds() -> Iterator[bytes]:
    hello = codec.encode(packets.Hello(1, 1, "fuzz"))
    login = codec.encode(packets.Login(schema.LOGIN_PASSWORD, "alice", "phone", b"pw"))
    after = _joined(client_stream())
    ping, bye = codec.encode(packets.Ping(1)), codec.encode(packets.Bye(0, ""))
    yield bytes([control_byte(2)]) + after
    yield bytes([control_byte(2, small_frame=True, chunk=16)]) + after
    yield bytes([control_byte(0)]) + hello + login + ping
    yield bytes([control_byte(0, chunk=5)]) + hello + login + ping + bye
    yield bytes([control_byte(1, alternative=True)]) + login + ping
    for start in range(3):
        for encoded in all_sample_frames(CLIENT_KINDS):
            yield bytes([control_byte(start)]) + encoded


def client_seeds() -> Iterator[bytes]:
    outbox = ClientRun(DISCONNECTED).outbox
    hello_ok = codec.encode(packets.HelloOk(1, schema.DEFAULT_MAX_FRAME, 30_000, "imkit"))
    result = codec.encode(packets.LoginResult(0, 1_700_000_000_000, b"token", ""))
    after = _joined(server_stream(outbox))
    yield bytes([control_byte(1)]) + hello_ok + result + after
    yield bytes([control_byte(1, chunk=7)]) + hello_ok + result + after
    yield bytes([control_byte(2, alternative=True)]) + codec.encode(packets.LoginResult(10, 0, b"", "no"))
    yield bytes([control_byte(3, small_frame=True, chunk=31)]) + after
    for start in range(1, 4):
        for encoded in all_sample_frames(SERVER_KINDS):
            yield bytes([control_byte(start)]) + encoded


SEEDS = {"frames": frame_seeds, "server": server_seeds, "client": client_seeds}
RUNNERS = {"frames": run_frames_input, "server": run_server_input, "client": run_client_input}


def generated_functions() -> list[Any]:
    """
    The decoders and encoders ``imkit.wire.codec`` generates at import time: they come from
    ``exec``, not from an import, so a fuzzer has to instrument them by hand.
    """
    namespace = next(iter(codec.CODECS.values())).decode.__globals__
    filename = codec.CODECS[schema.PING].decode.__code__.co_filename
    return [v for v in namespace.values() if isinstance(v, types.FunctionType) and v.__code__.co_filename == filename]
