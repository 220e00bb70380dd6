"""
The client's side of the protocol, as one sans-IO object that outlives its connections.

It keeps every unacknowledged send (the outbox) and resends it on deadlines with exponential
backoff and jitter, across reconnects, in the order the application issued them; it dedupes and
reorders what the server delivers, fills gaps with sync requests, and acknowledges cumulatively.
The client library above owns the transport, the Deferreds and the application callbacks.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from typing import Any

import attrs

from imkit.model import Item, Message
from imkit.session import events
from imkit.session.deadlines import DeadlineQueue
from imkit.session.inbound import Inbound
from imkit.session.settings import ClientSettings
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode, ProtocolError
from imkit.wire.framing import FrameReader

DISCONNECTED = "disconnected"
AWAIT_HELLO_OK = "await-hello-ok"
AWAIT_LOGIN_RESULT = "await-login-result"
READY = "ready"

# Which server packets are legal in which client state.
_U64_MAX = 2**64 - 1

_NOTICES = frozenset((schema.RECEIPT, schema.TYPING_NOTICE, schema.PRESENCE_NOTICE))
_ANSWERS = frozenset((schema.RECEIPTS_RESULT, schema.QUERY_RESULT, schema.KEYS_RESULT))

ALLOWED = {
    schema.HELLO_OK: {AWAIT_HELLO_OK},
    schema.LOGIN_RESULT: {AWAIT_LOGIN_RESULT},
    schema.SEND_ACK: {READY},
    schema.DELIVER: {READY},
    schema.DELIVER_BUNDLE: {READY},
    schema.SYNC_RESULT: {READY},
    schema.HEADS: {READY},
    schema.RECEIPT: {READY},
    schema.RECEIPTS_RESULT: {READY},
    schema.TYPING_NOTICE: {READY},
    schema.PRESENCE_NOTICE: {READY},
    schema.QUERY_RESULT: {READY},
    schema.KEYS_RESULT: {READY},
    schema.PING: {AWAIT_LOGIN_RESULT, READY},
    schema.PONG: {AWAIT_LOGIN_RESULT, READY},
    schema.ERROR: {AWAIT_HELLO_OK, AWAIT_LOGIN_RESULT, READY},
    schema.BYE: {AWAIT_HELLO_OK, AWAIT_LOGIN_RESULT, READY},
}


@attrs.define
class _Pending:
    """One send waiting for its acknowledgement."""

    packet: packets.Send | packets.Bundle
    frame: bytes
    attempts: int = 0
    live: bool = False
    """Written on this connection since the last rate-limit pause (else waiting in order)."""


_MAX_ID = 2**63 - 1
"""Client message ids run from 1 to this, then start again at 1."""

_MAX_PAUSE = 3600.0
"""A RATE_LIMITED answer never pauses the outbox longer than this (whatever the server says)."""


class ClientCore:
    """
    Drive it with ``connection_made``, ``receive_data``, ``handle_timer`` and
    ``connection_lost``; take its output with ``data_to_send``.  Each returns the events the
    application should see.

    ``delivered`` is the application's saved per-conversation position (a restarted bot passes
    what it saved); with None the server's per-device cursors decide where new conversations start.
    ``password`` None logs in with the TLS client certificate instead (``LOGIN_CERTIFICATE``).
    """

    def __init__(
        self,
        clock: Any,
        user: str,
        password: str | None,
        device: str = "default",
        settings: ClientSettings = ClientSettings(),
        delivered: dict[str, int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.user = user
        self.device = device
        self._password = password
        self._resume_token: bytes | None = None
        self._token_in_use = False
        self.settings = settings
        self._rng = rng or random.SystemRandom()
        self.state = DISCONNECTED
        self.inbound = Inbound(delivered)
        self._server_cursors = delivered is None
        self._outbox: OrderedDict[int, _Pending] = OrderedDict()
        # Send deadlines fall due in the order the sends were queued (a fixed timeout from then),
        # and first resends in the order the sends were first written (a fixed delay per
        # connection): FIFOs of (due, cmid, pending), an append each; an entry whose send was
        # acknowledged, cancelled or written again meanwhile is dropped when it surfaces.  Only
        # backed-off resends, each with its own delay, go into the heap of _timers.
        self._expiry: deque[tuple[float, int, _Pending]] = deque()
        self._first_resends: deque[tuple[float, int, _Pending]] = deque()
        self._first_delay = settings.resend_initial
        self._timers = DeadlineQueue()
        self._next_id: int | None = None  # drawn at the first send
        # While receive_data runs: [index in its events, own messages released by acks, events
        # then], so the acks of one read deliver our own messages in one MessagesDelivered.
        self._own: list[Any] | None = None
        # Delayed delivery acks (settings.ack_delay): deliveries since the last ack written, and
        # whether the next output must carry the acks.
        self._deliveries_unacked = 0
        self._ack_now = False
        self._out: list[bytes] = []
        self._reader = FrameReader(settings.max_frame)
        self._heartbeat = 30.0
        self._server_max_frame: int | None = None
        self._requests: dict[int, str | None] = {}
        self._filling: set[str] = set()
        """Conversations with a gap-filling sync in flight (the values of _requests, for O(1) lookups)."""
        self._request_ids = 0
        self._syncing = False
        self.caught_up = False
        self._server_offset = 0.0
        """Server clock minus ours, in seconds, as of the last LoginResult."""
        self._paused_until: float | None = None
        """Set by a RATE_LIMITED SendAck: nothing from the outbox is written before then."""
        self._window: int | None = None
        """After a RATE_LIMITED pause, sends written but not acknowledged at most (None: no limit);
        it grows by one per acknowledgement (so doubles per round trip) until the outbox empties."""
        self._waiting: deque[int] = deque()
        """While paced or paused, the outbox's sends not yet written, in order."""
        self._paced: set[int] = set()
        """Sends written since the pause and not yet answered (at most ``_window``)."""
        self._head: int | None = None
        """The send the server waits for first, after a RATE_LIMITED answer."""

    # Application API ---------------------------------------------------------------------------

    def send(self, target_type: int, target: str, content_type: str, body: bytes) -> int:
        """Queue one message; returns its client message id."""
        cmid = self._new_id()
        packet = packets.Send(cmid, target_type, target, content_type, body)
        self._queue(cmid, packet)
        return cmid

    def send_bundle(self, target_type: int, target: str, items: tuple[Item, ...]) -> int:
        """Queue an atomic bundle; returns its client message id."""
        cmid = self._new_id()
        self._queue(cmid, packets.Bundle(cmid, target_type, target, tuple(items)))
        return cmid

    def request(self, packet: Any) -> bool:
        """
        Write a packet outside the reliable stream (read mark, typing, presence, query) now.
        False if not logged in: such packets are never queued, since a late one is a wrong one.
        """
        if self.state != READY:
            return False
        self._write(codec.encode(packet))
        return True

    def new_request_id(self) -> int:
        """A request id for a query, distinct from the session's own sync requests."""
        self._request_ids = (self._request_ids % 0xFFFFFFFF) + 1
        return self._request_ids

    def cancel(self, client_msg_id: int) -> bool:
        """Stop resending a send (it may already be stored). True if it was still pending."""
        self._timers.discard(("resend", client_msg_id))
        pending = self._outbox.pop(client_msg_id, None)
        self._forget(client_msg_id, pending)
        return pending is not None

    @property
    def unacknowledged(self) -> int:
        return len(self._outbox)

    def _new_id(self) -> int:
        # Consecutive from a random start: unique for this device across restarts as surely as
        # random ids would be, without drawing a random number per send.
        if self._next_id is None:
            self._next_id = self._rng.getrandbits(63)
        while True:
            cmid = self._next_id = self._next_id % _MAX_ID + 1
            if cmid not in self._outbox:
                return cmid

    def _queue(self, cmid: int, packet: Any) -> None:
        frame = codec.encode(packet)
        if len(frame) - schema.LENGTH_SIZE > self._frame_limit():
            raise ValueError(f"message of {len(frame)} bytes is larger than the frame limit")
        pending = self._outbox[cmid] = _Pending(packet, frame)
        if self.settings.send_timeout is not None:
            self._expiry.append((self.clock.seconds() + self.settings.send_timeout, cmid, pending))
            if len(self._expiry) > 2 * len(self._outbox) + 64:
                self._expiry = self._live(self._expiry)
        if self.state == READY:
            if self._window is None and self._paused_until is None:
                self._transmit(cmid, pending)
            else:
                self._waiting.append(cmid)
                self._pump()

    def _frame_limit(self) -> int:
        """The largest frame we may send: ours, and the server's once a HelloOk has told us."""
        server = self._server_max_frame
        return self.settings.max_frame if server is None else min(self.settings.max_frame, server)

    def _transmit(self, cmid: int, pending: _Pending) -> None:
        frame = pending.frame
        if pending.attempts:
            frame = frame[:5] + bytes([frame[5] | schema.FLAG_RESEND]) + frame[6:]
        self._write(frame)
        pending.live = True
        if not pending.attempts:
            pending.attempts = 1
            self._first_resends.append((self.clock.seconds() + self._first_delay, cmid, pending))
            if len(self._first_resends) > 2 * len(self._outbox) + 64:
                self._first_resends = self._live(self._first_resends, first=True)
            return
        settings = self.settings
        delay = min(settings.resend_initial * (2**pending.attempts), settings.resend_max)
        delay *= 1 + settings.resend_jitter * self._rng.random()
        pending.attempts += 1
        self._timers.set(("resend", cmid), self.clock.seconds() + delay)

    # Rate limits -------------------------------------------------------------------------------

    def _rate_limited(self, ack: packets.SendAck) -> None:
        """
        The server takes nothing of ours before ``ack.sent_at`` (its clock, ms), and then first
        the send ``ack.server_id`` (this one or an earlier refused one): pause the outbox until
        then, and from then on send that one first and every other unsent one after it, in
        order, a few at a time (one, then one more per acknowledgement).
        """
        cmid = ack.client_msg_id
        outbox = self._outbox
        head = ack.server_id if ack.server_id in outbox else cmid
        now = self.clock.seconds()
        retry = min(max(ack.sent_at / 1000 - self._server_offset, now), now + _MAX_PAUSE)
        if self._paused_until is None or retry > self._paused_until:
            self._paused_until = retry
        self._window = 1
        self._paced.clear()
        self._head = head
        self._timers.set("resume", self._paused_until)
        refused = outbox[cmid]
        changed = refused.live or outbox[head].live
        if refused.live:
            refused.live = False
            self._timers.discard(("resend", cmid))
        if changed or not self._waiting or self._waiting[0] != head:
            # The head and every send after it wait (earlier ones still wait for their acks,
            # unless they were refused too: they go after the head).
            after = False
            for other, entry in outbox.items():
                if other == head:
                    after = True
                if after and entry.live:
                    entry.live = False
                    self._timers.discard(("resend", other))
            self._waiting = deque([head, *(other for other, entry in outbox.items() if not entry.live and other != head)])

    def _pump(self) -> None:
        """While paced: write waiting sends, in order, while the window has room."""
        if self.state != READY or self._paused_until is not None:
            return
        waiting = self._waiting
        outbox = self._outbox
        window = self._window
        paced = self._paced
        while waiting:
            if window is not None and len(paced) >= window:
                return
            cmid = waiting.popleft()
            pending = outbox.get(cmid)
            if pending is not None and not pending.live:
                self._transmit(cmid, pending)
                if window is not None:
                    paced.add(cmid)
        if window is not None and not paced:
            self._window = None  # all caught up: back to writing sends as they come

    def _resume(self) -> None:
        self._paused_until = None
        self._timers.discard("resume")
        self._pump()

    def _forget(self, cmid: int, pending: _Pending | None) -> None:
        """A send left the outbox: it no longer waits, nor takes room in the window."""
        if pending is None:
            return
        self._paced.discard(cmid)
        if cmid == self._head:
            self._head = None
        if not pending.live and cmid in self._waiting:
            self._waiting.remove(cmid)
        if self._window is not None and not self._paced and not self._waiting and self._paused_until is None:
            self._window = None

    # Connection lifecycle ----------------------------------------------------------------------

    def connection_made(self) -> None:
        self.state = AWAIT_HELLO_OK
        # One jitter per connection, not per send: it spreads clients' resends apart, and keeps
        # this connection's first resends in the order of their sends.
        settings = self.settings
        self._first_delay = min(settings.resend_initial, settings.resend_max) * (1 + settings.resend_jitter * self._rng.random())
        self._reader = FrameReader(self.settings.max_frame)
        self._out = []
        now = self.clock.seconds()
        self._write(codec.encode(packets.Hello(schema.PROTOCOL_VERSION, schema.PROTOCOL_VERSION, self.settings.agent)))
        self._timers.set("idle", now + self.settings.request_timeout * 2)

    def connection_lost(self) -> None:
        """Forget everything tied to the connection; the outbox and positions stay."""
        self.state = DISCONNECTED
        self._timers.clear()
        self._first_resends.clear()
        self._deliveries_unacked = 0
        self._ack_now = False
        self._requests.clear()
        self._filling.clear()
        self._syncing = False
        self.caught_up = False
        self._out = []
        self.inbound.ack_due.clear()
        self._waiting.clear()
        self._paced.clear()

    def receive_data(self, data: bytes) -> list[Any]:
        if self.state == DISCONNECTED:
            return []
        found: list[Any] = []
        self._own = None
        try:
            for kind, _flags, body in self._reader.feed(data):
                allowed = ALLOWED.get(kind)
                if allowed is None or self.state not in allowed:
                    raise ProtocolError(ErrorCode.UNEXPECTED_PACKET, f"server sent kind {kind:#06x} in state {self.state}")
                self._handle(kind, codec.decode_body(kind, body), found)
                if self.state == DISCONNECTED:
                    break
        except ProtocolError as error:
            self.state = DISCONNECTED
            found.append(events.CloseConnection(f"protocol error from server: {error}"))
        if self._own is not None:
            index, released, _ = self._own
            found[index] = events.MessagesDelivered(tuple(released))
            self._own = None
        if self.state != DISCONNECTED:
            self._timers.set("idle", self.clock.seconds() + self._heartbeat * self.settings.idle_factor)
        return found

    def _handle(self, kind: int, packet: Any, found: list[Any]) -> None:
        if kind == schema.DELIVER:
            self._deliveries_unacked += 1
            released = self.inbound.offer(packet.message)
            if released:
                found.append(events.MessagesDelivered(tuple(released)))
            if self.inbound.pending:
                self._fill_gaps(found)
        elif kind == schema.SEND_ACK:
            self._on_ack(packet, found)
        elif kind == schema.DELIVER_BUNDLE:
            self._deliveries_unacked += 1
            released = []
            for message in packet.messages:
                released.extend(self.inbound.offer(message))
            if released:
                found.append(events.MessagesDelivered(tuple(released)))
            if self.inbound.pending:
                self._fill_gaps(found)
        elif kind == schema.SYNC_RESULT:
            self._on_sync_result(packet, found)
        elif kind == schema.HEADS:
            for head in packet.heads:
                if head.seq > self.inbound.delivered.get(head.conversation, 0):
                    self._request_sync(head.conversation)
                elif self.inbound.knows(head.conversation):
                    # We have it all already: say so, or the server keeps repeating the Heads.
                    self.inbound.ack_due.add(head.conversation)
        elif kind in _NOTICES:
            found.append(events.NoticeReceived(packet))
        elif kind in _ANSWERS:
            found.append(events.AnswerReceived(packet))
        elif kind == schema.PING:
            self._write(codec.encode(packets.Pong(packet.nonce)))
        elif kind == schema.PONG:
            pass
        elif kind == schema.HELLO_OK:
            self._heartbeat = packet.heartbeat_ms / 1000 or 30.0
            self._reader.max_frame = min(self.settings.max_frame, max(packet.max_frame, 1024))
            self._server_max_frame = packet.max_frame
            self.state = AWAIT_LOGIN_RESULT
            if self._resume_token:
                # A reconnect: the token saves the server a password hash check.
                login = packets.Login(schema.LOGIN_TOKEN, self.user, self.device, self._resume_token)
            elif self._password is None:
                # The TLS client certificate is the proof; the server checks it names this user.
                login = packets.Login(schema.LOGIN_CERTIFICATE, self.user, self.device, b"")
            else:
                login = packets.Login(schema.LOGIN_PASSWORD, self.user, self.device, self._password.encode("utf-8"))
            self._token_in_use = login.method == schema.LOGIN_TOKEN
            self._write(codec.encode(login))
        elif kind == schema.LOGIN_RESULT:
            if packet.status != 0:
                self.state = DISCONNECTED
                if self._token_in_use:
                    # Expired or revoked: the next connection logs in with the password instead.
                    self._resume_token = None
                    found.append(events.CloseConnection(f"resume token refused ({packet.reason}); using the password"))
                    return
                found.append(events.LoginRejected(packet.status, packet.reason))
                return
            self._resume_token = packet.resume_token or None
            self._server_offset = packet.server_time / 1000 - self.clock.seconds()
            self.state = READY
            paced = self._window is not None or self._paused_until is not None
            found.append(events.LoggedIn(self.user, self.device, packet.server_time))
            for cmid, pending in list(self._outbox.items()):
                if len(pending.frame) - schema.LENGTH_SIZE > self._frame_limit():
                    # The server drops the connection on a frame over its limit, on every
                    # reconnect: refuse it here, or it blocks every send behind it for ever.
                    del self._outbox[cmid]
                    reason = f"message of {len(pending.frame)} bytes is larger than the server's frame limit"
                    found.append(events.SendRejected(cmid, packets.SendAck(cmid, int(ErrorCode.TOO_LARGE), 0, 0, 0, 0, "", reason)))
                elif paced:
                    pending.live = False
                    if cmid != self._head:
                        self._waiting.append(cmid)
                else:
                    self._transmit(cmid, pending)
            if paced:
                if self._head in self._outbox:
                    self._waiting.appendleft(self._head)  # what the server waits for goes first
                if self._paused_until is not None:
                    if self._paused_until <= self.clock.seconds():
                        self._resume()
                    else:
                        self._timers.set("resume", self._paused_until)
                else:
                    self._pump()
            self._syncing = True
            self._request_sync(None)
        elif kind in (schema.ERROR, schema.BYE):
            found.append(events.ServerError(packet.code, packet.reason))
            if kind == schema.ERROR or packet.code != 0:
                if self.state == AWAIT_LOGIN_RESULT:
                    found.append(events.LoginRejected(packet.code, packet.reason))
            self.state = DISCONNECTED
            found.append(events.CloseConnection(f"server closed the session: {packet.reason}"))

    def _on_ack(self, ack: packets.SendAck, found: list[Any]) -> None:
        if ack.status == ErrorCode.RATE_LIMITED:
            if ack.client_msg_id in self._outbox:
                self._rate_limited(ack)  # not a failure: it is sent again later
            return
        waiting = self._outbox.get(ack.client_msg_id)
        if ack.status == 0 and waiting is not None:
            packet = waiting.packet
            count = 1 if type(packet) is packets.Send else len(packet.items)
            if max(ack.seq, ack.server_id) + max(ack.count, count) - 1 > _U64_MAX:
                # Numbers past the 64-bit space could never be acked back: a broken or hostile server.
                raise ProtocolError(ErrorCode.MALFORMED_FRAME, "send ack numbers run past 2**64 - 1")
        pending = self._outbox.pop(ack.client_msg_id, None)
        if pending is None:
            return  # an answer to a resend we no longer wait for
        if pending.attempts > 1:  # only a send written again has a resend deadline in _timers
            self._timers.discard(("resend", ack.client_msg_id))
        if self._window is not None or self._waiting or self._paced or self._head is not None:
            self._forget(ack.client_msg_id, pending)
        if self._window is not None:
            self._window += 1
            self._pump()
        if ack.status != 0:
            found.append(events.SendRejected(ack.client_msg_id, ack))
            return
        found.append(events.SendAcknowledged(ack.client_msg_id, ack))
        # Our own messages take their place in the conversation without a round trip.
        packet = pending.packet
        if type(packet) is packets.Send:
            released = self.inbound.offer(
                Message(
                    ack.server_id, ack.conversation, ack.seq, self.user, self.device, ack.client_msg_id,
                    ack.sent_at, packet.content_type, packet.body, 0,
                )
            )
        else:
            released = []
            count = len(packet.items)
            for index, item in enumerate(packet.items):
                message = Message(
                    ack.server_id + index, ack.conversation, ack.seq + index, self.user, self.device,
                    ack.client_msg_id, ack.sent_at, item.content_type, item.body, count - 1 - index,
                )
                released.extend(self.inbound.offer(message))
        if released:
            own = self._own
            if own is not None and own[2] == len(found) - 1:
                # Only this ack's event since the last of ours: one event carries them all.
                own[1].extend(released)
                own[2] = len(found)
            else:
                found.append(None)  # a MessagesDelivered, made when the read is done
                self._own = [len(found) - 1, released, len(found)]
        if self.inbound.pending:
            self._fill_gaps(found)

    # Sync --------------------------------------------------------------------------------------

    def _request_sync(self, conversation: str | None) -> None:
        """Ask for everything after our positions (conversation None) or fill one gap."""
        if conversation is not None and conversation in self._filling:
            return
        self._request_ids = (self._request_ids % 0xFFFFFFFF) + 1
        rid = self._request_ids
        self._requests[rid] = conversation
        if conversation is not None:
            self._filling.add(conversation)
        delivered = self.inbound.delivered
        if conversation is None:
            flags = schema.SYNC_SERVER_CURSORS if self._server_cursors else 0
            cursors = tuple(packets.Cursor(c, s) for c, s in sorted(delivered.items()))
        else:
            flags = schema.SYNC_ONLY_LISTED
            cursors = (packets.Cursor(conversation, delivered.get(conversation, 0)),)
        self._write(codec.encode(packets.Sync(rid, flags, self.settings.sync_page, cursors)))
        self._timers.set(("sync", rid), self.clock.seconds() + self.settings.request_timeout)

    def _on_sync_result(self, result: packets.SyncResult, found: list[Any]) -> None:
        purpose = self._requests.pop(result.request_id, "stale")
        self._filling.discard(purpose)  # type: ignore[arg-type]
        self._timers.discard(("sync", result.request_id))
        released: list[Message] = []
        for message in result.messages:
            released.extend(self.inbound.offer(message))
        for span in result.ranges:
            known = self.inbound.delivered.get(span.conversation)
            if known is not None and span.from_seq > known:
                # The server starts us later than where we are: say so, never a silent gap.
                found.append(events.HistoryUnavailable(span.conversation, known, span.from_seq))
                released.extend(self.inbound.skip_to(span.conversation, span.from_seq))
            else:
                if known is None and span.skipped_from < span.from_seq:
                    found.append(events.HistoryUnavailable(span.conversation, span.skipped_from, span.from_seq))
                released.extend(self.inbound.start(span.conversation, span.from_seq))
        if purpose == "stale":
            pass
        elif result.more:
            self._request_sync(purpose)
        elif purpose is None:
            self._syncing = False
            # Anything still unplaced belongs to a conversation created after our sync began.
            for conversation in self.inbound.unknown_waiting():
                released.extend(self.inbound.start(conversation, 0))
            if not self.caught_up:
                self.caught_up = True
                if released:
                    found.append(events.MessagesDelivered(tuple(released)))
                    released = []
                found.append(events.CaughtUp())
        if released:
            found.append(events.MessagesDelivered(tuple(released)))
        self._fill_gaps(found)

    def _fill_gaps(self, found: list[Any]) -> None:
        """Ask for what is missing behind buffered messages; place new conversations."""
        if self._syncing or self.state != READY:
            return
        released: list[Message] = []
        for conversation in self.inbound.unknown_waiting():
            # Created after our sync began: it starts at the beginning.
            released.extend(self.inbound.start(conversation, 0))
        if released:
            found.append(events.MessagesDelivered(tuple(released)))
        # After placing new conversations, so a gap at the start of one is asked for too.
        for conversation in self.inbound.gaps():
            self._request_sync(conversation)

    # Output and time ---------------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        self._out.append(frame)

    def ack_now(self) -> None:
        """Have the next output carry every delivery ack, delayed or not (before a goodbye, say)."""
        self._ack_now = True

    def data_to_send(self) -> bytes:
        """Everything to write now, including the cumulative acks gathered since the last call."""
        if self.state == READY and self.inbound.ack_due:
            delay = self.settings.ack_delay
            if delay <= 0 or self._out or self._ack_now or self._deliveries_unacked >= self.settings.ack_every:
                for conversation, seq in self.inbound.take_acks():
                    self._out.append(codec.encode(packets.DeliverAck(conversation, seq)))
                self._deliveries_unacked = 0
                self._ack_now = False
                self._timers.discard("ack")
            elif "ack" not in self._timers:
                self._timers.set("ack", self.clock.seconds() + delay)
        out = self._out
        if not out:
            return b""
        self._out = []
        if self.state != DISCONNECTED:
            self._timers.set("ping", self.clock.seconds() + self._heartbeat)
        return b"".join(out)

    def next_deadline(self) -> float | None:
        found = [due for due in (self._timers.next(), self._first_expiry(), self._first_resend()) if due is not None]
        return min(found) if found else None

    def _live(self, entries: deque, first: bool = False) -> deque:
        """
        The entries of a FIFO whose sends still wait, in order: behind one long-waiting send, the
        stale entries of those acknowledged since would otherwise pile up until it is answered.
        """
        outbox = self._outbox
        return deque(
            (due, cmid, pending)
            for due, cmid, pending in entries
            if outbox.get(cmid) is pending and (not first or (pending.live and pending.attempts == 1))
        )

    def _first_expiry(self) -> float | None:
        expiry = self._expiry
        outbox = self._outbox
        while expiry:
            due, cmid, pending = expiry[0]
            if outbox.get(cmid) is pending:
                return due
            expiry.popleft()  # acknowledged, cancelled or refused meanwhile
        return None

    def _first_resend(self) -> float | None:
        resends = self._first_resends
        outbox = self._outbox
        while resends:
            due, cmid, pending = resends[0]
            if outbox.get(cmid) is pending and pending.live and pending.attempts == 1:
                return due
            resends.popleft()  # acknowledged, paused or written again meanwhile
        return None

    def handle_timer(self) -> list[Any]:
        now = self.clock.seconds()
        found: list[Any] = []
        while (due := self._first_expiry()) is not None and due <= now:
            _, cmid, expired = self._expiry.popleft()
            del self._outbox[cmid]
            self._timers.discard(("resend", cmid))
            self._forget(cmid, expired)
            found.append(events.SendExpired(cmid))
        if self._paused_until is not None and now >= self._paused_until:
            self._resume()  # before any resend, so the paused sends go first and in order
        keys = list(self._timers.pop_due(now))
        while (due := self._first_resend()) is not None and due <= now:
            keys.append(("resend", self._first_resends.popleft()[1]))
        for key in keys:
            if key == "idle":
                if self.state != DISCONNECTED:
                    self.state = DISCONNECTED
                    found.append(events.CloseConnection("no data from the server in time"))
                    return found
            elif key == "ping":
                if self.state == READY:
                    self._write(codec.encode(packets.Ping(int(now * 1000))))
            elif key == "resume":
                pass  # done above
            elif key == "ack":
                self._ack_now = True  # written by the flush that follows
            elif key[0] == "resend":
                pending = self._outbox.get(key[1])
                if pending is not None and self.state == READY:
                    if self._paused_until is not None:
                        self._timers.set(key, self._paused_until)  # written once the pause is over
                    elif pending.live:
                        self._transmit(key[1], pending)
            elif key[0] == "sync":
                purpose = self._requests.pop(key[1], "stale")
                self._filling.discard(purpose)  # type: ignore[arg-type]
                if purpose != "stale" and self.state == READY:
                    self._request_sync(purpose)
        return found
