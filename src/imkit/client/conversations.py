"""
What the client library says about conversations: query answers, notices, and delivered events.

``describe(message)`` turns a delivered message into an ``Event`` an application can act on
without knowing the wire format: ``kind`` is ``"message"`` for ordinary content and the
operation's short name (``"group.add"``, ``"recall"``, ...) for the operations the server applies
(see ``imkit.wire.schema``).  The other classes are the values of ``IMClient``'s queries
(``contacts``, ``members``, ``groups``, ``read_state``) and of its notice callbacks
(``on_receipt``, ``on_typing``, ``on_presence``).

``Queries`` keeps the client's outstanding queries: each is matched to its answer by request id,
and fails if none comes in time or the connection drops first.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from imkit import operations
from imkit.client.results import ConnectionLost, IMClientError, QueryFailed, QueryTimeout, error_code
from imkit.model import Message
from imkit.wire import packets, schema
from imkit.wire.errors import DecodeError, ErrorCode

# Names for the wire's numbers -------------------------------------------------------------------

PRESENCE_STATUSES = {
    "online": schema.PRESENCE_ONLINE,
    "away": schema.PRESENCE_AWAY,
    "busy": schema.PRESENCE_BUSY,
    "invisible": schema.PRESENCE_OFFLINE,
}
"""What ``IMClient.set_presence`` accepts; "invisible" shows as "offline" to everyone else."""

PRESENCE_NAMES = {
    schema.PRESENCE_OFFLINE: "offline",
    schema.PRESENCE_ONLINE: "online",
    schema.PRESENCE_AWAY: "away",
    schema.PRESENCE_BUSY: "busy",
}
"""What ``PresenceNotice.status`` can be (a status from a newer server is "unknown")."""

RELATION_NAMES = {schema.RELATION_CONTACT: "contact", schema.RELATION_BLOCKED: "blocked"}
ROLE_NAMES = {schema.ROLE_OWNER: "owner", schema.ROLE_MEMBER: "member"}


# Query answers ----------------------------------------------------------------------------------


@attrs.frozen
class Member:
    """A current member of a group: ``role`` is "owner" or "member"; ``joined_seq`` is the event that added them."""

    user: str
    role: str
    joined_seq: int


@attrs.frozen
class GroupInfo:
    """A group the user belongs to: its id, title, last sequence (``head``) and the user's role in it."""

    conversation: str
    title: str
    head: int
    role: str


@attrs.frozen
class ReadState:
    """
    Read receipts of a conversation: ``counts`` maps each asked sequence to how many members
    other than its sender have read it (sequences the server could not count are left out);
    ``readers`` maps each member to how far they have read (only in small conversations: the
    server's ``small_group`` setting).
    """

    conversation: str
    counts: dict[int, int]
    readers: dict[str, int]


# Notices ----------------------------------------------------------------------------------------


@attrs.frozen
class ReceiptNotice:
    """``device`` of ``user`` has read ``conversation`` up to ``seq`` (another member, or another device of ours)."""

    conversation: str
    user: str
    device: str
    seq: int


@attrs.frozen
class TypingNotice:
    """``user`` is typing in ``conversation`` (``active``), or has stopped."""

    conversation: str
    user: str
    device: str
    active: bool


@attrs.frozen
class PresenceNotice:
    """A mutual contact's presence: ``status`` is "online", "away", "busy" or "offline"."""

    user: str
    status: str
    text: str


def notice(packet: Any) -> ReceiptNotice | TypingNotice | PresenceNotice | None:
    """The application's value for a notice packet (None for a packet that is none of these)."""
    kind = type(packet)
    if kind is packets.Receipt:
        return ReceiptNotice(packet.conversation, packet.user, packet.device, packet.seq)
    if kind is packets.TypingNotice:
        return TypingNotice(packet.conversation, packet.user, packet.device, packet.active)
    if kind is packets.PresenceNotice:
        return PresenceNotice(packet.user, PRESENCE_NAMES.get(packet.status, "unknown"), packet.text)
    return None


# Delivered messages, interpreted ----------------------------------------------------------------


@attrs.frozen
class Event:
    """
    One delivered message, as an application sees it.

    ``kind`` is "message" for ordinary content, or the operation's short name: "contact.add",
    "contact.remove", "contact.block", "contact.unblock", "group.create", "group.add",
    "group.remove", "group.leave", "recall", "edit", "retention", and "recalled" for a message
    its sender recalled before this device received it (its body is gone).  An operation this
    imkit does not know (from a newer server) keeps its short name and has no decoded fields.

    The decoded fields: ``content_type`` and ``body`` (a message's content, or an edit's new
    content), ``users`` (group.create, group.add, group.remove), ``title`` (group.create),
    ``target`` (the sequence a recall or an edit applies to), ``seconds`` (retention).  The
    sender of contact operations and of group.leave is the user concerned.  ``message`` is the
    delivered message itself.
    """

    kind: str
    conversation: str
    seq: int
    sender: str
    sender_device: str
    server_id: int
    sent_at: int
    content_type: str = ""
    body: bytes = b""
    users: tuple[str, ...] = ()
    title: str | None = None
    target: int | None = None
    seconds: int | None = None
    message: Message | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def text(self) -> str:
        """``body`` as text (UTF-8; undecodable bytes become U+FFFD)."""
        return self.body.decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        """
        A dict ready for ``json.dumps``: kind, conversation, seq, sender, sender_device, id (the
        server id), sent_at (ms since the epoch), and whichever decoded fields the kind has
        (``body`` as text).
        """
        found: dict[str, Any] = {
            "kind": self.kind,
            "conversation": self.conversation,
            "seq": self.seq,
            "sender": self.sender,
            "sender_device": self.sender_device,
            "id": self.server_id,
            "sent_at": self.sent_at,
        }
        if self.kind in ("message", "edit"):
            found["content_type"] = self.content_type
            found["body"] = self.text
        if self.kind in _WITH_USERS:
            found["users"] = list(self.users)
        if self.title is not None:
            found["title"] = self.title
        if self.target is not None:
            found["target"] = self.target
        if self.seconds is not None:
            found["seconds"] = self.seconds
        return found


_WITH_USERS = frozenset(("group.create", "group.add", "group.remove"))
_PREFIX = len(schema.OPERATION_PREFIX)


def describe(message: Message) -> Event:
    """Interpret a delivered message (see ``Event``); never raises for what a server sends."""
    content_type = message.content_type
    common = (
        message.conversation, message.seq, message.sender, message.sender_device, message.server_id, message.sent_at,
    )
    if not content_type.startswith(schema.OPERATION_PREFIX):
        return Event("message", *common, content_type=content_type, body=message.body, message=message)
    kind = content_type[_PREFIX:]
    try:
        value = operations.decode(content_type, message.body)
    except DecodeError:
        return Event(kind, *common, message=message)
    if isinstance(value, operations.GroupCreate):
        return Event(kind, *common, title=value.title, users=value.users, message=message)
    if isinstance(value, operations.UserList):
        return Event(kind, *common, users=value.users, message=message)
    if isinstance(value, operations.Recall):
        return Event(kind, *common, target=value.seq, message=message)
    if isinstance(value, operations.Edit):
        return Event(kind, *common, target=value.seq, content_type=value.content_type, body=value.body, message=message)
    if isinstance(value, operations.Retention):
        return Event(kind, *common, seconds=value.seconds, message=message)
    return Event(kind, *common, message=message)


# Queries ----------------------------------------------------------------------------------------


@attrs.define
class _Query:
    answer_type: type
    parse: Callable[[Any], Any]
    waiting: Deferred[Any]
    timer: Any


class Queries:
    """
    The client's outstanding queries, by request id.

    A query goes out at once or fails at once (ConnectionLost) when there is no logged-in
    session: unlike sends, queries are never queued nor resent, since the answer would describe
    a moment the application no longer cares about.  One that gets no answer within
    ``timeout`` seconds fails with QueryTimeout; one whose connection drops first fails with
    ConnectionLost.  Either way the application may simply ask again.
    """

    def __init__(self, core: Any, clock: Any, timeout: float, written: Callable[[], None]) -> None:
        self._core = core
        self._clock = clock
        self._timeout = timeout
        self._written = written
        self._waiting: dict[int, _Query] = {}

    def ask(self, make: Callable[[int], Any], answer_type: type, parse: Callable[[Any], Any]) -> Deferred[Any]:
        """Send ``make(request_id)``; Deferred of ``parse(answer)``."""
        request_id = self._core.new_request_id()
        if not self._core.request(make(request_id)):
            return fail(ConnectionLost("not connected to the server; wait for loggedIn() and ask again"))
        waiting: Deferred[Any] = Deferred(lambda _: self._forget(request_id))
        timer = self._clock.callLater(self._timeout, self._timed_out, request_id)
        self._waiting[request_id] = _Query(answer_type, parse, waiting, timer)
        self._written()
        return waiting

    def answer(self, packet: Any) -> None:
        """An answer from the server: fire the query it belongs to (a late or unknown one is ignored)."""
        query = self._waiting.get(packet.request_id)
        if query is None or type(packet) is not query.answer_type:
            return
        del self._waiting[packet.request_id]
        _cancel(query.timer)
        if packet.status != 0:
            code = error_code(packet.status)
            reason = getattr(packet, "reason", "") or _REASONS.get(packet.status, "the server refused the query")
            query.waiting.errback(Failure(QueryFailed(code, reason)))
            return
        try:
            value = query.parse(packet)
        except Exception:
            query.waiting.errback(Failure())
            return
        query.waiting.callback(value)

    def fail_all(self, error: IMClientError) -> None:
        waiting, self._waiting = self._waiting, {}
        for query in waiting.values():
            _cancel(query.timer)
            query.waiting.errback(Failure(error))

    def __len__(self) -> int:
        return len(self._waiting)

    def _timed_out(self, request_id: int) -> None:
        query = self._waiting.pop(request_id, None)
        if query is not None:
            query.waiting.errback(Failure(QueryTimeout(self._timeout)))

    def _forget(self, request_id: int) -> None:
        query = self._waiting.pop(request_id, None)
        if query is not None:
            _cancel(query.timer)


_REASONS = {int(ErrorCode.NOT_A_MEMBER): "you are not a member of that conversation"}


def _cancel(call: Any) -> None:
    if call.active():
        call.cancel()


def parse_contacts(answer: packets.QueryResult) -> dict[str, str]:
    return {entry.name: RELATION_NAMES[entry.state] for entry in answer.entries if entry.state in RELATION_NAMES}


def parse_members(answer: packets.QueryResult) -> list[Member]:
    return [Member(entry.name, ROLE_NAMES.get(entry.state, "member"), entry.seq) for entry in answer.entries]


def parse_groups(answer: packets.QueryResult) -> list[GroupInfo]:
    return [GroupInfo(entry.name, entry.detail, entry.seq, ROLE_NAMES.get(entry.state, "member")) for entry in answer.entries]


def parse_read_state(answer: packets.ReceiptsResult) -> ReadState:
    return ReadState(
        answer.conversation,
        {count.seq: count.count for count in answer.counts},
        {mark.user: mark.seq for mark in answer.readers},
    )
