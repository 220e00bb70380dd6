"""
The server's side of one connection, as a sans-IO state machine.

Bytes come in through ``receive_data``; what the connection wants written is taken with
``data_to_send``; time passes through ``handle_timer``, whose next deadline is ``next_deadline``.
The hub above answers the events (login, send, sync) by calling ``accept_login``, ``ack``,
``deliver`` and friends.  Nothing here touches a socket, the reactor or the store.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from imkit.model import Message
from imkit.session import events
from imkit.session.deadlines import DeadlineQueue
from imkit.session.settings import ServerSettings
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode, ProtocolError
from imkit.wire.framing import FrameReader

AWAIT_HELLO = "await-hello"
AWAIT_LOGIN = "await-login"
AUTHENTICATING = "authenticating"
READY = "ready"
CLOSED = "closed"

# Every packet a client may send, and the states in which it may send it.  Anything else is an
# UNEXPECTED_PACKET protocol error naming the state and the packet.
ALLOWED = {
    schema.HELLO: {AWAIT_HELLO},
    schema.LOGIN: {AWAIT_LOGIN},
    schema.SEND: {READY},
    schema.BUNDLE: {READY},
    schema.DELIVER_ACK: {READY},
    schema.SYNC: {READY},
    schema.READ: {READY},
    schema.RECEIPTS_QUERY: {READY},
    schema.TYPING: {READY},
    schema.PRESENCE: {READY},
    schema.QUERY: {READY},
    schema.KEYS_UPLOAD: {READY},
    schema.KEYS_QUERY: {READY},
    schema.PING: {AWAIT_LOGIN, AUTHENTICATING, READY},
    schema.PONG: {AWAIT_LOGIN, AUTHENTICATING, READY},
    schema.BYE: {AWAIT_HELLO, AWAIT_LOGIN, AUTHENTICATING, READY},
}

# The hot-path encoders, called directly (codec.encode's lookup and checks cost more than they do
# here, where the packets are built by this module and known to be valid).
_encode_deliver = codec.CODECS[schema.DELIVER].encode
_encode_send_ack = codec.CODECS[schema.SEND_ACK].encode

_REQUESTS = frozenset(
    (schema.READ, schema.RECEIPTS_QUERY, schema.TYPING, schema.PRESENCE, schema.QUERY, schema.KEYS_UPLOAD, schema.KEYS_QUERY)
)

_LOGIN_DEADLINE = "login"
_IDLE_DEADLINE = "idle"


class ServerConnection:
    """
    One client connection: handshake, heartbeat, and the window of unacknowledged deliveries.

    ``clock`` is anything with ``seconds()`` (a reactor, a ``task.Clock``).  ``on_output`` is
    called when the connection goes from having nothing to write to having something, so the
    adapter can schedule one coalesced write for this reactor turn.
    """

    def __init__(self, clock: Any, settings: ServerSettings = ServerSettings(), peer: str = "?") -> None:
        self.clock = clock
        self.settings = settings
        self.peer = peer
        self.state = AWAIT_HELLO
        self.user: str | None = None
        self.device: str | None = None
        self.on_output: Callable[[], None] = lambda: None
        self.close_reason: events.ConnectionClosing | None = None
        self._reader = FrameReader(settings.max_frame)
        self._out: list[bytes] = []
        self._timers = DeadlineQueue()
        self._window = DeliveryWindow(settings)
        now = clock.seconds()
        self._timers.set(_LOGIN_DEADLINE, now + settings.login_timeout)
        self._timers.set(_IDLE_DEADLINE, now + settings.idle_timeout)

    # Input -------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Any]:
        """Feed received bytes; return the events they complete (stops at the first error)."""
        if self.state == CLOSED:
            return []
        self._timers.set(_IDLE_DEADLINE, self.clock.seconds() + self.settings.idle_timeout)
        found: list[Any] = []
        try:
            for kind, _flags, body in self._reader.feed(data):
                allowed = ALLOWED.get(kind)
                if allowed is None:
                    raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"packet kind {kind:#06x} is not one a client sends")
                if self.state not in allowed:
                    name = packets.PACKET_CLASSES[kind].__name__
                    raise ProtocolError(ErrorCode.UNEXPECTED_PACKET, f"{name} is not allowed in state {self.state}")
                event = self._handle(kind, codec.decode_body(kind, body))
                if event is not None:
                    found.append(event)
                if self.state == CLOSED:
                    break
            opened = self._window.take_opened()
            if opened:
                found.append(events.WindowOpened(opened))
        except ProtocolError as error:
            found.append(self.fail(error.code, error.reason))
        return found

    def _handle(self, kind: int, packet: Any) -> Any:
        if kind == schema.DELIVER_ACK:
            self._window.ack(packet.conversation, packet.seq)
            return events.DeliveryAcked(packet.conversation, packet.seq)
        if kind == schema.SEND or kind == schema.BUNDLE:
            return events.SendRequested(packet)
        if kind == schema.SYNC:
            return events.SyncRequested(packet)
        if kind in _REQUESTS:
            return events.RequestReceived(packet)
        if kind == schema.PING:
            self._write(codec.encode(packets.Pong(packet.nonce)))
            return None
        if kind == schema.PONG:
            return None
        if kind == schema.HELLO:
            if not packet.min_version <= schema.PROTOCOL_VERSION <= packet.max_version:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"client speaks versions {packet.min_version}-{packet.max_version}, server speaks {schema.PROTOCOL_VERSION}",
                )
            self.state = AWAIT_LOGIN
            settings = self.settings
            self._write(
                codec.encode(
                    packets.HelloOk(schema.PROTOCOL_VERSION, settings.max_frame, int(settings.heartbeat * 1000), settings.agent)
                )
            )
            return None
        if kind == schema.LOGIN:
            self.state = AUTHENTICATING
            return events.LoginRequested(packet.method, packet.user, packet.device, packet.secret)
        if kind == schema.BYE:
            return self.close(ErrorCode.OK, "client said goodbye", say_bye=False)
        raise AssertionError(f"no handler for allowed kind {kind}")  # pragma: no cover - table and handlers agree

    # Answers from the hub ----------------------------------------------------------------------

    def accept_login(self, user: str, device: str, resume_token: bytes = b"") -> None:
        if self.state != AUTHENTICATING:
            return
        self.state = READY
        self.user = user
        self.device = device
        self._timers.discard(_LOGIN_DEADLINE)
        self._write(codec.encode(packets.LoginResult(0, _ms(self.clock), resume_token, "")))

    def reject_login(self, code: ErrorCode, reason: str) -> events.ConnectionClosing | None:
        if self.state != AUTHENTICATING:
            return None
        self._write(codec.encode(packets.LoginResult(int(code), _ms(self.clock), b"", reason)))
        return self.close(code, reason, say_bye=False)

    def ack(self, ack: packets.SendAck) -> None:
        if self.state == READY:
            self._write(_encode_send_ack(ack))

    def deliver(self, message: Message) -> bool:
        """Push one message; False if the window is full (the client will be told to sync)."""
        if self.state != READY:
            return False
        return self._push(message.conversation, message.seq, _encode_deliver(packets.Deliver(message)))

    def deliver_bundle(self, messages: tuple[Message, ...]) -> bool:
        """Push an atomic bundle in one frame."""
        if self.state != READY:
            return False
        last = messages[-1]
        return self._push(last.conversation, last.seq, codec.encode(packets.DeliverBundle(messages)))

    def deliver_frame(self, conversation: str, seq: int, frame: bytes) -> bool:
        """Push a Deliver or DeliverBundle frame encoded once for many connections (group fan-out)."""
        if self.state != READY:
            return False
        return self._push(conversation, seq, frame)

    def deliver_frames(self, conversation: str, seqs: list[int], frames: list[bytes]) -> None:
        """``deliver_frame`` for several frames of one conversation, in order."""
        if self.state != READY:
            return
        add = self._window.add
        now = self.clock.seconds()
        out = self._out
        was_empty = not out
        for seq, frame in zip(seqs, frames):
            if add(conversation, seq, frame, now):
                out.append(frame)
        if was_empty and out:
            self.on_output()

    def _push(self, conversation: str, seq: int, frame: bytes) -> bool:
        if not self._window.add(conversation, seq, frame, self.clock.seconds()):
            return False
        self._write(frame)
        return True

    def announce_heads(self, heads: tuple[packets.Cursor, ...]) -> None:
        """
        Tell the client where conversations whose deliveries were held back now end, one Heads
        frame per conversation.  Each stands in for messages the client was never sent, so it is
        tracked and resent like a delivery until the client's cumulative ack reaches its head.
        """
        if self.state != READY:
            return
        for head in heads:
            self._push(head.conversation, head.seq, codec.encode(packets.Heads((head,))))

    def send_packet(self, packet: Any) -> None:
        """Write a reply that needs no tracking (sync results: the client retries a lost one)."""
        if self.state == READY:
            self._write(codec.encode(packet))

    @property
    def unacked(self) -> int:
        return len(self._window)

    # Ending ------------------------------------------------------------------------------------

    def fail(self, code: ErrorCode, reason: str) -> events.ConnectionClosing:
        """Tell the client what it did wrong in an Error frame, then close."""
        if self.state != CLOSED:
            self._write(codec.encode(packets.Error(int(code), reason)))
        return self.close(code, reason, say_bye=False)

    def close(self, code: ErrorCode, reason: str, say_bye: bool = True) -> events.ConnectionClosing:
        if self.state != CLOSED:
            if say_bye:
                self._write(codec.encode(packets.Bye(int(code), reason)))
            self.state = CLOSED
            self.close_reason = events.ConnectionClosing(int(code), reason)
            self._timers.clear()
            self._window.clear()
            self.on_output()
        assert self.close_reason is not None
        return self.close_reason

    # Output and time ---------------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        if not self._out:
            self._out.append(frame)
            self.on_output()
        else:
            self._out.append(frame)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def next_deadline(self) -> float | None:
        mine = self._timers.next()
        window = self._window.next_deadline()
        if mine is None:
            return window
        if window is None:
            return mine
        return min(mine, window)

    def handle_timer(self) -> list[Any]:
        """Resend overdue deliveries and enforce the login and idle deadlines."""
        if self.state == CLOSED:
            return []
        now = self.clock.seconds()
        for key in self._timers.pop_due(now):
            if key == _LOGIN_DEADLINE and self.state != READY:
                return [self.fail(ErrorCode.IDLE_TIMEOUT, "no login in time")]
            if key == _IDLE_DEADLINE:
                return [self.fail(ErrorCode.IDLE_TIMEOUT, "connection idle for too long")]
        for frame in self._window.due(now):
            self._write(frame)
        return []


def _ms(clock: Any) -> int:
    return int(clock.seconds() * 1000)


class DeliveryWindow:
    """
    Deliveries sent but not yet acknowledged, with their resend deadlines (the seed's
    "acknowledgement list").

    Keys are ``(conversation, seq)`` of the last message in the frame; a cumulative ack for a
    conversation clears every entry up to its seq.  When ``max_unacked`` are in flight, further
    pushes are refused and remembered per conversation, so the hub can tell the client to sync
    once there is room again.

    First sends all wait the same ``ack_timeout``, so their deadlines come in the order they were
    sent: a FIFO holds them (the common case costs an append).  Only frames that had to be resent,
    each with its own backed-off timeout, go into a heap.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        # key -> (frame, current timeout, first deadline): the deadline tells a FIFO entry of this
        # frame from a stale one left by an earlier frame with the same key.
        self._frames: dict[tuple[str, int], tuple[bytes, float, float]] = {}
        self._by_conversation: dict[str, list[int]] = {}
        self._fresh: deque[tuple[float, tuple[str, int]]] = deque()
        self._resent = DeadlineQueue()
        self._held_back: set[str] = set()
        self._opened: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, conversation: str, seq: int, frame: bytes, now: float) -> bool:
        frames = self._frames
        if len(frames) >= self._settings.max_unacked:
            self._held_back.add(conversation)
            return False
        key = (conversation, seq)
        if key in frames:
            return False
        timeout = self._settings.ack_timeout
        due = now + timeout
        frames[key] = (frame, timeout, due)
        seqs = self._by_conversation.get(conversation)
        if seqs is None:
            self._by_conversation[conversation] = [seq]
        else:
            seqs.append(seq)
            if seqs[-2] > seq:
                seqs.sort()
        self._fresh.append((due, key))
        return True

    def ack(self, conversation: str, seq: int) -> None:
        seqs = self._by_conversation.get(conversation)
        if not seqs:
            return
        frames = self._frames
        resent = self._resent if len(self._resent) else None  # resends are rare: skip the lookups
        done = 0
        for pending in seqs:
            if pending > seq:
                break
            key = (conversation, pending)
            del frames[key]
            if resent is not None:
                resent.discard(key)
            done += 1
        if done == len(seqs):
            del self._by_conversation[conversation]
        else:
            del seqs[:done]
        if self._held_back and len(frames) <= self._settings.max_unacked // 2:
            self._opened = tuple(sorted(self._held_back))
            self._held_back.clear()

    def take_opened(self) -> tuple[str, ...]:
        opened, self._opened = self._opened, ()
        return opened

    def _first_fresh(self) -> float | None:
        fresh = self._fresh
        frames = self._frames
        resent = self._resent
        while fresh:
            due, key = fresh[0]
            entry = frames.get(key)
            if entry is not None and entry[2] == due and key not in resent:
                return due
            fresh.popleft()  # acknowledged, already resent, or replaced since
        return None

    def next_deadline(self) -> float | None:
        fresh = self._first_fresh()
        resent = self._resent.next()
        if fresh is None:
            return resent
        if resent is None:
            return fresh
        return min(fresh, resent)

    def due(self, now: float) -> list[bytes]:
        """Frames to resend now (marked as resends), each with its next deadline doubled."""
        overdue = []
        fresh = self._fresh
        while (first := self._first_fresh()) is not None and first <= now:
            overdue.append(fresh.popleft()[1])
        overdue.extend(self._resent.pop_due(now))
        resend = []
        limit = self._settings.ack_timeout_max
        for key in overdue:
            frame, timeout, first_due = self._frames[key]
            timeout = min(timeout * 2, limit)
            self._frames[key] = (frame, timeout, first_due)
            self._resent.set(key, now + timeout)
            resend.append(frame[:5] + bytes([frame[5] | schema.FLAG_RESEND]) + frame[6:])
        return resend

    def clear(self) -> None:
        self._frames.clear()
        self._by_conversation.clear()
        self._fresh.clear()
        self._resent.clear()
        self._held_back.clear()
