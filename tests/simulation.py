"""
A deterministic simulation of imkit clients, links and a restartable server, with no sockets.

Every client is a real ``ClientCore``, every connection a real ``ServerConnection``, the server a
real ``Hub`` on a ``MemoryStore``; only the network is simulated.  A ``Link`` joins one client to
one server connection and carries whole frames each way.  Frames are self-delimiting (a u32 length
prefix), so the link can cut each byte stream into frames and, frame by frame, deliver, drop,
duplicate or delay them (a delayed frame is overtaken by the frames sent after it), as a
``FaultPlan`` decides.

Time is a ``twisted.internet.task.Clock`` shared by everything, and the ``World`` moves it straight
to the next thing that can happen: a frame arriving, a session deadline, a call the hub scheduled
on the clock, or an entry of its agenda (application sends, connection cuts, server restarts,
reconnects).  Nothing else can happen in between, and the hub's ``secrets`` (resume tokens, new
group names) come from a seeded generator while the world runs, so a run is exactly reproducible.

Connections end the way TCP connections do:

* a *reset* (a cut, a restart, a side closing) is noticed by both ends, after the frames already in
  flight towards the side that stays (when the server closes, the client still reads its last
  frames, e.g. the Error saying why);
* a *silent* cut (a dead NAT entry) drops every frame and tells nobody: each side finds out through
  its own idle timeout.

A client whose connection is gone reconnects after ``reconnect_delay`` (again and again while the
server is down).  A server restart drops every ``ServerConnection`` and the hub, and builds a new
hub on the same store, which keeps every message, dedupe record and cursor.

``World.violations()`` checks, at the end, what the seed design's "Reliability" and "Consistency"
sections promise, for direct conversations and groups alike; see its docstring.  Who may read what
and which submissions the rules allow come from ``Replay``, the checker's own reading of the
rules, not from ``imkit.rules``.
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import itertools
import math
import random
import struct
from collections import Counter
from typing import Any, Callable, Iterable

import attrs
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from imkit import operations
from imkit.model import Item, Message, Submission, direct_conversation, direct_members
from imkit.passwords import Passwords
from imkit.rules import Policy
from imkit.server import hub as hub_module
from imkit.server.hub import Hub
from imkit.session import events
from imkit.session.client import DISCONNECTED as CLIENT_DISCONNECTED
from imkit.session.client import READY as CLIENT_READY
from imkit.session.client import ClientCore
from imkit.session.server import CLOSED, ServerConnection
from imkit.session.settings import ClientSettings, ServerSettings
from imkit.store.memory import MemoryStore
from imkit.wire import codec, schema
from imkit.wire.errors import ErrorCode

UP = "up"
"""Client to server."""
DOWN = "down"
"""Server to client."""

DELIVER = "deliver"
DROP = "drop"
DUPLICATE = "duplicate"
DELAY = "delay"

LATENCY = 0.01
"""One-way latency of a frame, before any fault delay (unless the World is given others)."""

EPOCH = 1_000_000.0
"""Simulated time starts here (a non-zero clock catches code that confuses times and durations)."""

KIND_NAMES = {
    getattr(schema, name): name
    for name in (
        "HELLO", "HELLO_OK", "LOGIN", "LOGIN_RESULT", "SEND", "SEND_ACK", "DELIVER", "DELIVER_ACK", "SYNC",
        "SYNC_RESULT", "BUNDLE", "DELIVER_BUNDLE", "HEADS", "PING", "PONG", "ERROR", "BYE", "PRESENCE_NOTICE",
    )
}

_LENGTH = struct.Struct(">I")
_HASHES: dict[str, str] = {}


def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte stream into whole frames (sessions only ever write whole frames)."""
    frames = []
    pos = 0
    while pos < len(data):
        (length,) = _LENGTH.unpack_from(data, pos)
        end = pos + schema.LENGTH_SIZE + length
        assert end <= len(data), "a session wrote part of a frame"
        frames.append(data[pos:end])
        pos = end
    return frames


def frame_kind(frame: bytes) -> int:
    return int.from_bytes(frame[6:8], "big")


def password_of(user: str) -> str:
    return f"secret of {user}"


def _fired(d: Any) -> Any:
    """The result of a Deferred that has already fired (everything a MemoryStore returns)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "a MemoryStore Deferred did not fire at once"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class _Secrets:
    """
    What the hub takes from ``secrets`` (resume tokens, new group names), drawn from a seeded
    generator instead, so that a run that creates groups is exactly reproducible.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def token_bytes(self, n: int) -> bytes:
        return self._rng.randbytes(n)

    def token_urlsafe(self, n: int) -> str:
        return base64.urlsafe_b64encode(self._rng.randbytes(n)).rstrip(b"=").decode("ascii")


# Faults -----------------------------------------------------------------------------------------


@attrs.frozen
class FrameFault:
    """What happens to the ``index``-th frame (0-based) of one device's stream in one direction."""

    device: str
    direction: str
    index: int
    action: str
    delay: float = 0.0


@attrs.frozen
class Noise:
    """Random faults on every frame not named by a FrameFault, in per mille, from one seed."""

    seed: int
    drop: int = 0
    duplicate: int = 0
    delay: int = 0
    delays: tuple[float, ...] = (0.05, 0.5, 3.0, 8.0)


Rule = Callable[[str, str, int, int, float], "tuple[str, float] | None"]
"""``rule(device, direction, index, kind, now)``: a (action, delay) for this frame, or None."""


class FaultPlan:
    """
    Decides the fate of each frame: explicit faults first, then rules, then noise; else deliver.

    Nothing is faulty from ``until`` on (the end of the storm).  Frames are counted per device and
    direction over all of that device's connections, so ``FrameFault(index=3)`` names the same frame
    whatever connection carries it.
    """

    def __init__(
        self,
        faults: Iterable[FrameFault] = (),
        rules: Iterable[Rule] = (),
        noise: Noise | None = None,
        until: float = math.inf,
    ) -> None:
        self.explicit = {(f.device, f.direction, f.index): (f.action, f.delay) for f in faults}
        self.rules = list(rules)
        self.noise = noise
        self._rng = random.Random(noise.seed) if noise is not None else None
        self.until = until

    def decide(self, device: str, direction: str, index: int, kind: int, now: float) -> tuple[str, float]:
        if now >= self.until:
            return DELIVER, 0.0
        found = self.explicit.get((device, direction, index))
        if found is not None:
            return found
        for rule in self.rules:
            found = rule(device, direction, index, kind, now)
            if found is not None:
                return found
        noise = self.noise
        if noise is not None:
            assert self._rng is not None
            roll = self._rng.randrange(1000)
            if roll < noise.drop:
                return DROP, 0.0
            roll -= noise.drop
            if roll < noise.duplicate:
                return DUPLICATE, self._rng.choice(noise.delays)
            roll -= noise.duplicate
            if roll < noise.delay:
                return DELAY, self._rng.choice(noise.delays)
        return DELIVER, 0.0


def first_of(kind: int, device: str, direction: str, action: str = DROP, count: int = 1, delay: float = 0.0) -> Rule:
    """A rule hitting the first ``count`` frames of ``kind`` in one device's stream."""
    seen = [0]

    def rule(d: str, dirn: str, index: int, k: int, now: float) -> tuple[str, float] | None:
        if d == device and dirn == direction and k == kind and seen[0] < count:
            seen[0] += 1
            return action, delay
        return None

    return rule


# The application's view -----------------------------------------------------------------------


@attrs.define
class AppLog:
    """
    Everything one run of a device's application was told, in order.

    ``starts`` is where this run resumed each conversation (the positions it was restarted with,
    or the server's cursors); it should get each conversation from there on.  ``skipped`` are the
    HistoryUnavailable events: holes the client said it will never fill (a group it joined late).
    """

    starts: dict[str, int] = attrs.Factory(dict)
    batches: list[tuple[Message, ...]] = attrs.Factory(list)
    acks: dict[int, Any] = attrs.Factory(dict)
    rejected: dict[int, Any] = attrs.Factory(dict)
    rejected_at: dict[int, float] = attrs.Factory(dict)
    skipped: list[events.HistoryUnavailable] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)
    logins: int = 0
    caught_up: int = 0
    login_rejections: list[tuple[int, str]] = attrs.Factory(list)
    server_errors: list[tuple[int, str]] = attrs.Factory(list)

    def messages(self) -> list[Message]:
        return [m for batch in self.batches for m in batch]

    def positions(self) -> dict[str, int]:
        """What an application would save: the last sequence it processed per conversation."""
        saved = dict(self.starts)
        for m in self.messages():
            saved[m.conversation] = max(saved.get(m.conversation, 0), m.seq)
        return saved


@attrs.frozen
class Sent:
    """
    One send the application made, and what it expects to be stored.  ``conversation`` is None
    for a send to TARGET_NEW_GROUP: the server names the group in the ack.
    """

    device: str
    client_msg_id: int
    conversation: str | None
    items: tuple[Item, ...]
    at: float


@attrs.frozen
class Preloaded:
    """A submission written straight into the store before the run (the world's history)."""

    label: str
    client_msg_id: int
    messages: tuple[Message, ...]


@attrs.frozen
class Trace:
    """One frame's fate, for explaining a failure."""

    at: float
    device: str
    direction: str
    connection: int
    kind: int
    flags: int
    action: str
    delay: float
    body: bytes = attrs.field(repr=False)

    @property
    def delivered(self) -> bool:
        return self.action in (DELIVER, DELAY, DUPLICATE)

    @property
    def resend(self) -> bool:
        return bool(self.flags & schema.FLAG_RESEND)

    def packet(self) -> Any:
        return codec.decode_body(self.kind, self.body)

    def __str__(self) -> str:
        arrow = "->" if self.direction == UP else "<-"
        extra = f" +{self.delay}s" if self.action in (DELAY, DUPLICATE) and self.delay else ""
        resend = " (resend)" if self.flags & schema.FLAG_RESEND else ""
        name = KIND_NAMES.get(self.kind, hex(self.kind))
        return f"{self.at - EPOCH:9.3f} {self.device}#{self.connection} {arrow} {name}{resend} {self.action}{extra}"


# Devices and links ------------------------------------------------------------------------------


class Device:
    """One client application: a ClientCore, its current link, and the log of what it was told."""

    def __init__(self, world: World, user: str, name: str, delivered: dict[str, int] | None = None) -> None:
        self.world = world
        self.user = user
        self.name = name
        self.label = f"{user}/{name}"
        self.apps = [AppLog()]
        """One log per run of the application (``World.restart_device`` starts another)."""
        self.link: Link | None = None
        self.online = False
        """Whether the application wants to be connected (it reconnects while this is true)."""
        self.connections = 0
        self.groups: list[str] = []
        """The group conversations the user of this device has seen through it, in order (kept across restarts)."""
        self.client = self._new_client(delivered)

    @property
    def app(self) -> AppLog:
        """The log of the application's current run."""
        return self.apps[-1]

    def acked(self, client_msg_id: int) -> Any:
        """The ack of a send made by any run of the application, or None."""
        for app in self.apps:
            if client_msg_id in app.acks:
                return app.acks[client_msg_id]
        return None

    def _new_client(self, delivered: dict[str, int] | None) -> ClientCore:
        return ClientCore(
            self.world.clock,
            self.user,
            password_of(self.user),
            device=self.name,
            settings=self.world.client_settings,
            delivered=delivered,
            rng=random.Random(f"{self.label}#{self.connections}"),
        )

    def _learn(self, conversation: str) -> None:
        if conversation.startswith("g:") and conversation not in self.groups:
            self.groups.append(conversation)

    def on_events(self, found: list[Any]) -> None:
        app = self.app
        close = False
        for event in found:
            kind = type(event)
            if kind is events.MessagesDelivered:
                app.batches.append(event.messages)
                for m in event.messages:
                    self._learn(m.conversation)
            elif kind is events.SendAcknowledged:
                if event.client_msg_id in app.acks:
                    app.problems.append(f"{self.label}: send {event.client_msg_id} acknowledged twice")
                app.acks[event.client_msg_id] = event.ack
                self._learn(event.ack.conversation)
            elif kind is events.SendRejected:
                if event.client_msg_id in app.rejected or event.client_msg_id in app.acks:
                    app.problems.append(f"{self.label}: send {event.client_msg_id} answered twice")
                app.rejected[event.client_msg_id] = event.ack
                app.rejected_at[event.client_msg_id] = self.world.now
            elif kind is events.HistoryUnavailable:
                app.skipped.append(event)
            elif kind is events.SendExpired:
                app.problems.append(f"{self.label}: send {event.client_msg_id} expired")
            elif kind is events.LoggedIn:
                app.logins += 1
            elif kind is events.CaughtUp:
                app.caught_up += 1
            elif kind is events.LoginRejected:
                app.login_rejections.append((event.code, event.reason))
                close = True
            elif kind is events.ServerError:
                app.server_errors.append((event.code, event.reason))
            elif kind is events.CloseConnection:
                close = True
        if self.link is not None and (close or self.client.state == CLIENT_DISCONNECTED):
            self.world.client_closed(self)

    def poll(self, now: float) -> bool:
        """Run due timers and hand output to the link; True if anything happened."""
        client = self.client
        moved = False
        deadline = client.next_deadline()
        if deadline is not None and deadline <= now:
            moved = True
            self.on_events(client.handle_timer())
        data = client.data_to_send()
        if data:
            moved = True
            if self.link is not None:
                self.link.carry(UP, data)
        return moved


class Link:
    """One connection: a device's client on one end, a ServerConnection on the other."""

    def __init__(self, world: World, device: Device, server: ServerConnection, number: int) -> None:
        self.world = world
        self.device: Device | None = device
        self.label = device.label
        self.server: ServerConnection | None = server
        self.number = number
        self.silent = False
        self.server_closed = False
        """The server closed: what is in flight down still arrives, then the client sees the end."""
        self._flight: list[tuple[float, int, str, bytes]] = []

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def carry(self, direction: str, data: bytes) -> None:
        world = self.world
        now = world.clock.seconds()
        counts = world.frame_counts[self.label]
        for frame in split_frames(data):
            index = counts[direction]
            counts[direction] += 1
            kind = frame_kind(frame)
            action, delay = world.faults.decide(self.label, direction, index, kind, now)
            if self.silent:
                action, delay = "lost (silent cut)", 0.0
            elif direction == UP and self.server is None:
                action, delay = "lost (server gone)", 0.0
            world.trace.append(Trace(now, self.label, direction, self.number, kind, frame[5], action, delay, frame[8:]))
            if action == DROP or action.startswith("lost"):
                continue
            latency = world.latency.get(self.label, LATENCY)
            self._push(now + latency + (delay if action == DELAY else 0.0), direction, frame)
            if action == DUPLICATE:
                self._push(now + latency + delay, direction, frame)

    def _push(self, due: float, direction: str, frame: bytes) -> None:
        heapq.heappush(self._flight, (due, next(self.world.order), direction, frame))

    def next_due(self) -> float | None:
        return self._flight[0][0] if self._flight else None

    def keep_only(self, direction: str | None) -> None:
        """Forget the frames in flight, except those going ``direction``."""
        self._flight = [entry for entry in self._flight if entry[2] == direction]
        heapq.heapify(self._flight)

    def deliver_due(self, now: float) -> bool:
        moved = False
        # Each delivery may end the link, which replaces self._flight: read it afresh every time.
        while self._flight and self._flight[0][0] <= now:
            _, _, direction, frame = heapq.heappop(self._flight)
            moved = True
            if direction == UP:
                server = self.server
                if server is not None:
                    self.world.hub.handle(server, server.receive_data(frame))
            else:
                device = self.device
                if device is not None:
                    device.on_events(device.client.receive_data(frame))
        if self.server_closed and self.device is not None and not any(e[2] == DOWN for e in self._flight):
            # Everything the server wrote before closing has arrived (or was lost): now the FIN.
            self.world.detach_client(self)
            moved = True
        return moved

    def poll_server(self, now: float) -> bool:
        server = self.server
        if server is None:
            return False
        moved = False
        deadline = server.next_deadline()
        if deadline is not None and deadline <= now:
            moved = True
            self.world.hub.handle(server, server.handle_timer())
        data = server.data_to_send()
        if data:
            moved = True
            if self.device is not None:
                self.carry(DOWN, data)
        if server.state == CLOSED:
            moved = True
            self.world.detach_server(self)
            if not self.silent:
                self.server_closed = True
            self.keep_only(DOWN)  # frames still travelling up will find nobody
        return moved


# The checker's reading of the rules -------------------------------------------------------------

_CONTACT_OPERATIONS = (schema.CONTACT_ADD, schema.CONTACT_REMOVE, schema.CONTACT_BLOCK, schema.CONTACT_UNBLOCK)


def submissions_of(messages: list[Message]) -> list[list[Message]]:
    """A conversation's stored messages cut into what was submitted together (a bundle counts down to 0)."""
    found: list[list[Message]] = []
    current: list[Message] = []
    for m in messages:
        current.append(m)
        if not m.bundle_remaining:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


@attrs.frozen
class GroupState:
    members: dict[str, int]
    """Each member and the seq of the event that made them one."""
    owner: str


class Replay:
    """
    One stored conversation replayed by the checker's own reading of the seed design's rules
    (written here from the design, not taken from ``imkit.rules``): who may read which sequences,
    and the conversation's state after each stored submission.

    Readers: both users of a direct conversation read all of it.  In a group, the creator and the
    users it was created with read from seq 1; a user added later reads from the event that added
    them (from seq 1 with ``history_on_join``); a member removed, or leaving, reads up to and
    including that event.

    The states judge submissions: every stored one must have been allowed in the state before it
    (``problems``), and every refusal a client got must be what some state the conversation was in
    while that send was on its way would answer (``justified``).
    """

    def __init__(self, conversation: str, messages: list[Message], policy: Policy) -> None:
        self.conversation = conversation
        self.policy = policy
        self.pair = direct_members(conversation)
        self.head = messages[-1].seq if messages else 0
        self.problems: list[str] = []
        self.states: list[tuple[int, Any]] = [(-1, {} if self.pair is not None else None)]
        """(server time in ms of the submission that led to it, state); the first is the empty one."""
        spans: dict[str, list[tuple[int, int]]] = {}
        opened: dict[str, int] = {}
        if self.pair is not None and self.head:
            opened = {user: 1 for user in self.pair}
        for submission in submissions_of(messages):
            first = submission[0]
            before = self.states[-1][1]
            items = tuple(Item(m.content_type, m.body) for m in submission)
            verdict = self.verdict(before, first.sender, items)
            if verdict:
                self.problems.append(
                    f"(7) {conversation} seq {first.seq} from {first.sender}/{first.sender_device} is stored, "
                    f"but the rules answer it with {ErrorCode(verdict).name}"
                )
            self.states.append((first.sent_at, self._apply(before, submission, opened, spans)))
        for user, start in opened.items():
            spans.setdefault(user, []).append((start, self.head))
        self.ranges = spans
        """Per user, the (first, last) sequences of each of their memberships, oldest first."""
        self.readable: dict[str, set[int]] = {
            user: {seq for start, end in ranges for seq in range(start, end + 1)} for user, ranges in spans.items()
        }
        self.owed: dict[str, set[int]] = {user: set(range(ranges[-1][0], ranges[-1][1] + 1)) for user, ranges in spans.items()}
        """
        What every device of the user must get: their latest membership.  What they may read of
        an earlier one (they were removed, or left, and were added again) a device may get only a
        first part of, then be told it is unavailable: the store keeps one span per user and
        member (a known limitation, see test_readmitted_member_keeps_its_earlier_membership).
        """

    def may_read(self, user: str, seq: int) -> bool:
        return seq in self.readable.get(user, ())

    def is_owed(self, user: str, seq: int) -> bool:
        return seq in self.owed.get(user, ())

    def last_span(self, user: str) -> tuple[int, int] | None:
        """What the store's ``visible`` should say: (floor, upto) of the user's latest membership."""
        ranges = self.ranges.get(user)
        if not ranges:
            return None
        first, last = ranges[-1]
        return (first - 1, last)

    def _apply(self, state: Any, submission: list[Message], opened: dict[str, int], spans: dict[str, list[tuple[int, int]]]) -> Any:
        pair = self.pair
        if pair is not None:
            relations = dict(state)
            for m in submission:
                kind = m.content_type
                if kind not in _CONTACT_OPERATIONS:
                    continue
                other = pair[0] if pair[1] == m.sender else pair[1]
                mine = relations.get((m.sender, other), schema.RELATION_NONE)
                if kind == schema.CONTACT_ADD:
                    mine = schema.RELATION_CONTACT
                elif kind == schema.CONTACT_REMOVE:
                    mine = schema.RELATION_NONE if mine == schema.RELATION_CONTACT else mine
                elif kind == schema.CONTACT_BLOCK:
                    mine = schema.RELATION_BLOCKED
                elif mine == schema.RELATION_BLOCKED:
                    mine = schema.RELATION_NONE
                relations[(m.sender, other)] = mine
            return relations
        members = dict(state.members) if state is not None else {}
        owner = state.owner if state is not None else submission[0].sender

        def close(user: str, seq: int) -> None:
            spans.setdefault(user, []).append((opened.pop(user), seq))

        for m in submission:
            kind = m.content_type
            if not kind.startswith(schema.OPERATION_PREFIX):
                continue
            value = operations.decode(kind, m.body)
            if kind == schema.GROUP_CREATE:
                for user in (m.sender, *value.users):
                    if user not in members:
                        members[user] = m.seq
                        opened[user] = 1
            elif kind == schema.GROUP_ADD:
                for user in value.users:
                    if user not in members:
                        members[user] = m.seq
                        opened[user] = 1 if self.policy.history_on_join else m.seq
            elif kind == schema.GROUP_REMOVE:
                for user in value.users:
                    del members[user]
                    close(user, m.seq)
            elif kind == schema.GROUP_LEAVE:
                del members[m.sender]
                close(m.sender, m.seq)
                if owner == m.sender and members:
                    owner = min(members, key=lambda user: (members[user], user))
        return GroupState(members, owner)

    def verdict(self, state: Any, sender: str, items: tuple[Item, ...]) -> int:
        """What the rules answer ``items`` from ``sender`` with in ``state``: 0 (stored) or an ErrorCode."""
        pair = self.pair
        if pair is not None:
            if sender not in pair:
                return ErrorCode.NOT_A_MEMBER
            other = pair[0] if pair[1] == sender else pair[1]
            if other == sender:
                mine = theirs = schema.RELATION_CONTACT
            else:
                mine = state.get((sender, other), schema.RELATION_NONE)
                theirs = state.get((other, sender), schema.RELATION_NONE)
            contacts = schema.RELATION_CONTACT
            for item in items:
                kind = item.content_type
                if not kind.startswith(schema.OPERATION_PREFIX):
                    if schema.RELATION_BLOCKED in (mine, theirs) or (
                        self.policy.contacts_only and not mine == theirs == contacts
                    ):
                        return ErrorCode.NOT_ALLOWED
                elif kind == schema.CONTACT_ADD:
                    if theirs == schema.RELATION_BLOCKED:
                        return ErrorCode.NOT_ALLOWED
                    mine = contacts
                elif kind == schema.CONTACT_REMOVE:
                    mine = schema.RELATION_NONE if mine == contacts else mine
                else:
                    return ErrorCode.INVALID_OPERATION  # not used by the workloads
            return 0
        start = 0
        if state is None:
            if items[0].content_type != schema.GROUP_CREATE:
                return ErrorCode.NOT_A_MEMBER
            members = {sender, *operations.decode(schema.GROUP_CREATE, items[0].body).users}
            owner = sender
            start = 1
        elif sender not in state.members:
            return ErrorCode.NOT_A_MEMBER
        else:
            members = set(state.members)
            owner = state.owner
        last = len(items) - 1
        for index in range(start, len(items)):
            kind = items[index].content_type
            if sender not in members:
                return ErrorCode.INVALID_OPERATION
            if not kind.startswith(schema.OPERATION_PREFIX):
                continue
            value = operations.decode(kind, items[index].body)
            if kind == schema.GROUP_ADD and index == 0:
                members.update(value.users)
            elif kind == schema.GROUP_REMOVE and index == last and sender == owner:
                for user in value.users:
                    if user == sender or user not in members:
                        return ErrorCode.INVALID_OPERATION
                    members.discard(user)
            elif kind == schema.GROUP_LEAVE and index == last:
                members.discard(sender)
            else:
                return ErrorCode.INVALID_OPERATION
        return 0

    def justified(self, sender: str, items: tuple[Item, ...], code: int, sent: float, answered: float) -> bool:
        """
        Whether some state the conversation was in between the send (``sent``) and its refusal
        reaching the client (``answered``) refuses ``items`` with ``code``.
        """
        low, high = math.floor(sent * 1000), math.ceil(answered * 1000)
        states = self.states
        for index, (since, state) in enumerate(states):
            until = states[index + 1][0] if index + 1 < len(states) else math.inf
            if since <= high and until >= low and self.verdict(state, sender, items) == code:
                return True
        return False


# The world --------------------------------------------------------------------------------------


class World:
    """
    Users and their devices, the network between them and the server, and the server.

    ``users`` maps each user name to its number of devices (named d1, d2, ...).  Devices start
    offline; ``connect`` (or ``connect_all``) brings one online, after which it stays online,
    reconnecting after every lost connection, until ``disconnect``.  The hub runs ``policy``;
    ``preload`` writes history into the store before the run (contacts, say).
    """

    def __init__(
        self,
        users: dict[str, int],
        server_settings: ServerSettings = ServerSettings(),
        client_settings: ClientSettings = ClientSettings(send_timeout=None),
        faults: FaultPlan | None = None,
        reconnect_delay: float = 1.0,
        latency: dict[str, float] | None = None,
        policy: Policy = Policy(),
    ) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.server_settings = server_settings
        self.client_settings = client_settings
        self.policy = policy
        self._secrets = _Secrets(random.Random(f"{sorted(users.items())}"))
        self.faults = faults or FaultPlan()
        self.reconnect_delay = reconnect_delay
        self.latency = latency or {}
        """One-way latency per device label (LATENCY for the others)."""
        self.store = MemoryStore()
        self.passwords = Passwords.fast_for_tests()
        for user in users:
            password = password_of(user)
            if password not in _HASHES:
                _HASHES[password] = _fired(self.passwords.hash(password))
            _fired(self.store.add_user(user, _HASHES[password]))
        self.server_failures: list[str] = []
        """What the hub logged as errors, and server cursors found ahead of their device."""
        self.hub = self._new_hub()
        self.server_up = True
        self.restarts = 0
        self.order = itertools.count()
        self.trace: list[Trace] = []
        self.notes: list[str] = []
        self.sent: list[Sent] = []
        self.preloaded: list[Preloaded] = []
        self.skipped_sends: list[str] = []
        """Group sends the workload wanted to make from a device that knew no group yet."""
        self.abandoned: set[tuple[str, int]] = set()
        """Sends that died with their application (``restart_device``): nobody waits for their ack."""
        self.links: list[Link] = []
        self.frame_counts: dict[str, dict[str, int]] = {}
        self._agenda: list[tuple[float, int, str, Callable[[], None]]] = []
        self.devices: dict[str, Device] = {}
        for user, count in users.items():
            for n in range(1, count + 1):
                device = Device(self, user, f"d{n}")
                self.devices[device.label] = device
                self.frame_counts[device.label] = {UP: 0, DOWN: 0}

    def _new_hub(self) -> Hub:
        hub = Hub(self.store, self.passwords, self.clock, self.server_settings, self.policy)
        hub.log = Logger(namespace="imkit.server.hub", observer=self._observe_hub)
        return hub

    def _observe_hub(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event["log_level"].name in ("error", "critical"):
            failure = event.get("log_failure")
            detail = failure.getTraceback() if failure is not None else ""
            self.server_failures.append(f"{formatEvent(event)}\n{detail}")

    @property
    def now(self) -> float:
        return self.clock.seconds()

    def device(self, label: str) -> Device:
        return self.devices[label]

    def devices_of(self, user: str) -> list[Device]:
        return [d for d in self.devices.values() if d.user == user]

    # The agenda ---------------------------------------------------------------------------------

    def at(self, when: float, what: str, action: Callable[[], None]) -> None:
        """Do ``action`` at simulated time ``when`` (absolute, see EPOCH)."""
        heapq.heappush(self._agenda, (when, next(self.order), what, action))

    def after(self, delay: float, what: str, action: Callable[[], None]) -> None:
        self.at(self.now + delay, what, action)

    # Applications -------------------------------------------------------------------------------

    def send(self, label: str, target_user: str, body: bytes, via_conversation: bool = False) -> int:
        return self._submit(label, target_user, (Item("text/plain", body),), via_conversation)

    def send_bundle(self, label: str, target_user: str, bodies: Iterable[bytes], via_conversation: bool = False) -> int:
        return self._submit(label, target_user, tuple(Item("text/plain", b) for b in bodies), via_conversation)

    def _submit(self, label: str, target_user: str, items: tuple[Item, ...], via_conversation: bool) -> int:
        device = self.devices[label]
        conversation = direct_conversation(device.user, target_user)
        if via_conversation:
            return self.submit(label, schema.TARGET_CONVERSATION, conversation, items)
        return self.submit(label, schema.TARGET_USER, target_user, items)

    def submit(self, label: str, target_type: int, target: str, items: Iterable[Item], bundle: bool = False) -> int:
        """
        Send ``items`` from a device: one Send for a single item (unless ``bundle``), else a
        Bundle.  Returns the client message id.
        """
        device = self.devices[label]
        items = tuple(items)
        if target_type == schema.TARGET_USER:
            conversation: str | None = direct_conversation(device.user, target)
        elif target_type == schema.TARGET_CONVERSATION:
            conversation = target
        else:
            conversation = None
        if len(items) == 1 and not bundle:
            cmid = device.client.send(target_type, target, items[0].content_type, items[0].body)
        else:
            cmid = device.client.send_bundle(target_type, target, items)
        self.sent.append(Sent(label, cmid, conversation, items, self.now))
        return cmid

    def create_group(self, label: str, title: str, users: Iterable[str], bodies: Iterable[bytes] = ()) -> int:
        """A device creates a group through TARGET_NEW_GROUP: [group.create, *plain items] in one bundle."""
        items = (operations.group_create(title, tuple(users)),) + tuple(Item("text/plain", b) for b in bodies)
        return self.submit(label, schema.TARGET_NEW_GROUP, "", items, bundle=True)

    def send_to_group(self, label: str, items: Iterable[Item], what: str = "send") -> int | None:
        """
        Send ``items`` to the first group this device has seen (by delivery or ack), as a Send or
        a Bundle; None (and a note) if it knows none yet, as an application could not address it.
        """
        device = self.devices[label]
        if not device.groups:
            self.skipped_sends.append(f"{self.now - EPOCH:9.3f} {label} knows no group for its {what}")
            return None
        items = tuple(items)
        return self.submit(label, schema.TARGET_CONVERSATION, device.groups[0], items, bundle=len(items) > 1)

    def preload(self, label: str, conversation: str, items: Iterable[Item]) -> tuple[Message, ...]:
        """
        Store a submission from ``label`` ("user/device", a device that need not exist) straight
        into the store, under the world's policy, before the run: history every member's devices
        must then get like any other message.
        """
        user, _, device = label.partition("/")
        pair = direct_members(conversation)
        members = tuple(sorted(set(pair))) if pair is not None else ()
        cmid = len(self.preloaded) + 1
        submission = Submission(user, device, cmid, conversation, members, int(self.now * 1000), tuple(items))
        appended = _fired(self.store.append(submission, self.policy))
        self.preloaded.append(Preloaded(label, cmid, appended.messages))
        return appended.messages

    def connect(self, label: str) -> None:
        device = self.devices[label]
        device.online = True
        if device.link is None:
            self._dial(device)

    def connect_all(self) -> None:
        for label in self.devices:
            self.connect(label)

    def disconnect(self, label: str) -> None:
        """The application goes offline on purpose (it will not reconnect until ``connect``)."""
        device = self.devices[label]
        device.online = False
        if device.link is not None:
            self.reset(device.link)

    def restart_device(self, label: str, delivered: dict[str, int] | None) -> None:
        """
        The application process dies and starts again with the positions it saved (``delivered``),
        or with none (None: it resumes at the server's cursors for the device).

        Its ClientCore, with the unacknowledged sends in it, is gone; if the application is
        online, the new one connects after ``reconnect_delay``.
        """
        device = self.devices[label]
        self.notes.append(f"{self.now - EPOCH:9.3f} {label} restarts with positions {delivered}")
        if device.link is not None:
            self.reset(device.link)
        for sent in self.sent:
            if sent.device == label and device.acked(sent.client_msg_id) is None:
                self.abandoned.add((label, sent.client_msg_id))
        if delivered is None:
            starts = _fired(self.store.cursors(device.user, device.name))
            for conversation, seq in starts.items():
                got = max((m.seq for app in device.apps for m in app.messages() if m.conversation == conversation), default=0)
                if seq > got:
                    self.server_failures.append(f"{label}'s cursor in {conversation} is {seq}, but it only got {got}")
        else:
            starts = dict(delivered)
        device.apps.append(AppLog(starts=starts))
        device.connections += 1
        device.client = device._new_client(delivered)
        # Resetting the link scheduled a reconnect, which dials with the new client.

    def _dial(self, device: Device) -> None:
        if not device.online or device.link is not None:
            return
        if not self.server_up:
            self.after(self.reconnect_delay, f"{device.label} reconnects", lambda: self._dial(device))
            return
        device.connections += 1
        server = ServerConnection(self.clock, self.server_settings, peer=f"{device.label}#{device.connections}")
        link = Link(self, device, server, device.connections)
        self.links.append(link)
        device.link = link
        device.client.connection_made()

    # Faults -------------------------------------------------------------------------------------

    def cut(self, label: str, silent: bool = False) -> None:
        """Break a device's current connection: reset (both ends notice) or silent (nobody does)."""
        link = self.devices[label].link
        if link is None:
            return
        if silent:
            self.notes.append(f"{self.now - EPOCH:9.3f} {label}#{link.number} silently cut")
            link.silent = True
            link.keep_only(None)
        else:
            self.notes.append(f"{self.now - EPOCH:9.3f} {label}#{link.number} reset")
            self.reset(link)

    def reset(self, link: Link) -> None:
        link.keep_only(None)
        self.detach_server(link)
        self.detach_client(link)

    def restart_server(self, downtime: float = 0.0) -> None:
        """
        The server process dies: every connection and the hub are gone; the store survives.

        A new hub starts on the same store after ``downtime``; until then, reconnects fail.
        """
        self.notes.append(f"{self.now - EPOCH:9.3f} server restarts (down {downtime}s)")
        self.restarts += 1
        self.server_up = False
        for link in list(self.links):
            link.server = None
            link.keep_only(None)
            if not link.silent:
                self.detach_client(link)
            self._forget(link)
        self.hub = self._new_hub()
        if downtime:
            self.after(downtime, "server is back", self._server_back)
        else:
            self._server_back()

    def _server_back(self) -> None:
        self.server_up = True

    def client_closed(self, device: Device) -> None:
        """The client gave up its connection: the server sees the FIN unless the link is silent."""
        link = device.link
        assert link is not None
        if not link.silent:
            link.keep_only(None)
            self.detach_server(link)
        self.detach_client(link)

    def detach_client(self, link: Link) -> None:
        device = link.device
        if device is None:
            return
        link.device = None
        link.keep_only(UP)
        if device.link is link:
            device.link = None
            device.client.connection_lost()
            if device.online:
                self.after(self.reconnect_delay, f"{device.label} reconnects", lambda: self._dial(device))
        self._forget(link)

    def detach_server(self, link: Link) -> None:
        server = link.server
        if server is None:
            return
        link.server = None
        self.hub.connection_lost(server)
        self._forget(link)

    def _forget(self, link: Link) -> None:
        if link.device is None and link.server is None and link in self.links:
            self.links.remove(link)

    # Running ------------------------------------------------------------------------------------

    def _settle(self) -> None:
        """Do everything that is due now, until nothing more is."""
        for _ in range(100_000):
            now = self.clock.seconds()
            moved = False
            agenda = self._agenda
            while agenda and agenda[0][0] <= now:
                _, _, _, action = heapq.heappop(agenda)
                action()
                moved = True
            for link in list(self.links):
                moved |= link.deliver_due(now)
            for device in self.devices.values():
                moved |= device.poll(now)
            for link in list(self.links):
                moved |= link.poll_server(now)
            if any(call.getTime() <= now for call in self.clock.getDelayedCalls()):
                self.clock.advance(0)  # the hub's own callLater(0)s (a large group's fan-out)
                moved = True
            if not moved:
                return
        raise AssertionError("livelock: the simulation keeps doing things without time passing")

    def next_time(self) -> float | None:
        times = []
        if self._agenda:
            times.append(self._agenda[0][0])
        for link in self.links:
            due = link.next_due()
            if due is not None:
                times.append(due)
            if link.server is not None:
                due = link.server.next_deadline()
                if due is not None:
                    times.append(due)
        for device in self.devices.values():
            due = device.client.next_deadline()
            if due is not None:
                times.append(due)
        for call in self.clock.getDelayedCalls():
            times.append(call.getTime())
        return min(times) if times else None

    @contextlib.contextmanager
    def _deterministic(self) -> Any:
        """While the world runs, the hub's ``secrets`` are this world's seeded ones."""
        saved = hub_module.secrets
        hub_module.secrets = self._secrets  # type: ignore[assignment]
        try:
            yield
        finally:
            hub_module.secrets = saved

    def run_until(self, end: float, until: Callable[[], bool] | None = None) -> bool:
        """
        Advance to ``end`` (absolute) event by event; stop early, returning True, once ``until()``.
        """
        with self._deterministic():
            return self._run_until(end, until)

    def _run_until(self, end: float, until: Callable[[], bool] | None) -> bool:
        stuck = 0
        while True:
            self._settle()
            if until is not None and until():
                return True
            when = self.next_time()
            now = self.clock.seconds()
            if when is None or when > end:
                if end > now:
                    self.clock.advance(end - now)
                    self._settle()
                return until() if until is not None else False
            if when <= now:
                stuck += 1
                assert stuck < 1000, f"a deadline at {when} stays due at {now} and nothing happens"
            else:
                stuck = 0
                self.clock.advance(when - now)

    def run_for(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + seconds, until)

    def quiet(self) -> bool:
        """
        Nothing left to do but heartbeats: every online device is logged in and caught up with the
        store, nothing is unacknowledged or in flight, no connection waits for an ack, and nothing
        is on the agenda.
        """
        if self._agenda:
            return False
        for link in self.links:
            if link.in_flight or link.device is None or link.server is None or link.server.unacked:
                return False
        for device in self.devices.values():
            if not device.online:
                continue
            client = device.client
            if device.link is None or client.state != CLIENT_READY or not client.caught_up:
                return False
            if client.unacknowledged or client.inbound.pending or client.inbound.ack_due:
                return False
            # Every conversation the user may read, up to where they may read it (a former member
            # of a group up to their removal), not only those they belong to now.
            spans = _fired(self.store.visible(device.user))
            delivered = client.inbound.delivered
            if any(delivered.get(c, 0) < upto for c, (_floor, upto) in spans.items()):
                return False
        return True

    def settle_down(self, limit: float = 3600.0) -> bool:
        """Run with no new faults until quiet (True) or ``limit`` seconds have passed (False)."""
        return self.run_for(limit, self.quiet)

    # Checking -----------------------------------------------------------------------------------

    def stored(self) -> dict[str, list[Message]]:
        """Every conversation in the store with all its messages, from its public interface."""
        conversations: set[str] = set()
        for user in _fired(self.store.list_users()):
            conversations.update(_fired(self.store.conversations(user)))
            conversations.update(_fired(self.store.visible(user)))
        return {c: _fired(self.store.read(c, 0, 1_000_000)) for c in sorted(conversations)}

    def violations(self) -> list[str]:
        """
        What went wrong, as readable sentences (empty if nothing did):

        1. an acknowledged message is missing from a device of a user who may read it (the
           sending device included: it sees its own messages through the ack; the user's other
           devices get them like everybody else), or a client said history is unavailable where
           its user may read it;
        2. a run of a device's application got a message twice;
        3. a device's application did not get its conversation as exactly the sequences its user
           may read, in order, each message identical to the stored one (so every reader sees the
           same order), or got one its user may not read.  Who may read what is ``Replay``'s: all
           of a direct conversation; a group from the start (its first members) or from the event
           that added them, up to and including the one that removed them.  A restarted
           application gets it from where it resumed (``AppLog.starts``) on; a run that ended got
           a gap-free part of it from there;
        4. a bundle was split across deliveries or interleaved with other messages;
        5. a send was not acknowledged (or expired), or was refused although no state its
           conversation was in while the send was on its way refuses it (``Replay.justified``);
        6. a server id names two different messages, an ack disagrees with what was stored, a
           send was stored more than once (or something nobody sent was stored), or a send the
           client was told is refused was stored;
        7. the store holds a submission the rules forbid where it stands, or its ``visible``
           disagrees with ``Replay`` about what a user may read;

        plus anything the hub logged as a failure, and login rejections for a right password.
        Sends that died with a restarted application are not expected to be acknowledged (5), but
        if they were stored, every reader's devices must still get them.
        """
        problems: list[str] = []
        stored = self.stored()
        by_server_id: dict[int, Message] = {}
        replays: dict[str, Replay] = {}
        for conversation, messages in stored.items():
            replays[conversation] = replay = Replay(conversation, messages, self.policy)
            problems.extend(replay.problems)
            seqs = [m.seq for m in messages]
            if seqs != list(range(1, len(seqs) + 1)):
                problems.append(f"(3) the store holds {conversation} as seqs {seqs}")
            for m in messages:
                other = by_server_id.setdefault(m.server_id, m)
                if other != m:
                    problems.append(f"(6) server id {m.server_id} is both {other} and {m}")
        for user in _fired(self.store.list_users()):
            visible = _fired(self.store.visible(user))
            for conversation, replay in replays.items():
                expected = replay.last_span(user)
                if visible.get(conversation) != expected:
                    problems.append(f"(7) the store lets {user} read {conversation} {visible.get(conversation)}, not {expected}")

        # 5 and 6: every send acknowledged, with what was stored, or refused for a reason.
        acked: dict[tuple[str, int], Message] = {}
        for preloaded in self.preloaded:
            acked.update(((m.conversation, m.seq), m) for m in preloaded.messages)
        sizes = {(s.device, s.client_msg_id): len(s.items) for s in self.sent}
        sizes.update(((p.label, p.client_msg_id), len(p.messages)) for p in self.preloaded)
        copies = Counter(
            (f"{m.sender}/{m.sender_device}", m.client_msg_id) for messages in stored.values() for m in messages
        )
        for sent in self.sent:
            device = self.devices[sent.device]
            ack = device.acked(sent.client_msg_id)
            if ack is None:
                refusals = [(app.rejected[sent.client_msg_id], app.rejected_at[sent.client_msg_id]) for app in device.apps if sent.client_msg_id in app.rejected]
                if refusals:
                    refusal, when = refusals[0]
                    what = f"{sent.device}'s send {sent.client_msg_id} made at {sent.at - EPOCH:.3f}"
                    replay = replays.get(sent.conversation) if sent.conversation is not None else None
                    if sent.conversation is not None and replay is None:
                        replay = Replay(sent.conversation, [], self.policy)
                    if copies[(sent.device, sent.client_msg_id)]:
                        problems.append(f"(6) {what} is stored, but was refused at {when - EPOCH:.3f}: {refusal}")
                    elif replay is None or not replay.justified(device.user, sent.items, refusal.status, sent.at, when):
                        problems.append(f"(5) {what} was refused at {when - EPOCH:.3f} for no reason: {refusal}")
                elif (sent.device, sent.client_msg_id) not in self.abandoned:
                    problems.append(f"(5) {sent.device} never got an ack for send {sent.client_msg_id} made at {sent.at - EPOCH:.3f}")
                continue
            if sent.conversation is None:
                fits = ack.conversation.startswith("g:") and ack.seq == 1
            else:
                fits = ack.conversation == sent.conversation
            if ack.status != 0 or not fits or ack.count != len(sent.items):
                problems.append(f"(5) {sent.device}: ack {ack} does not fit send to {sent.conversation} of {len(sent.items)}")
                continue
            window = stored.get(ack.conversation, [])[ack.seq - 1 : ack.seq - 1 + ack.count]
            for index, item in enumerate(sent.items):
                m = window[index] if index < len(window) else None
                if (
                    m is None
                    or m.server_id != ack.server_id + index
                    or (m.sender, m.sender_device, m.client_msg_id) != (device.user, device.name, sent.client_msg_id)
                    or (m.content_type, m.body) != (item.content_type, item.body)
                    or m.sent_at != ack.sent_at
                ):
                    problems.append(f"(6) {sent.device}: ack {ack} item {index} does not match the store ({m})")
                else:
                    acked[(m.conversation, m.seq)] = m
        # Every stored message comes from a send, and every send is stored at most once.
        for (label, cmid), count in sorted(copies.items()):
            if label == "?" or (label, cmid) not in sizes:
                problems.append(f"(6) the store holds messages from {label} {cmid}, which nobody sent")
            elif count != sizes[(label, cmid)]:
                problems.append(f"(6) the store holds {count} messages from {label}'s send {cmid} of {sizes[(label, cmid)]}")

        for device in self.devices.values():
            seen: set[tuple[str, int]] = set()
            for number, app in enumerate(device.apps):
                final = number == len(device.apps) - 1
                who = device.label if len(device.apps) == 1 else f"{device.label} (run {number + 1})"
                problems.extend(self._check_run(who, device.user, app, final, stored, replays, acked, by_server_id))
                seen.update((m.conversation, m.seq) for m in app.messages())
            lost = sorted(key for key in acked if key not in seen and replays[key[0]].is_owed(device.user, key[1]))
            if lost:
                problems.append(f"(1) {device.label} never got acknowledged messages {lost}")
        problems.extend(f"server: {f}" for f in self.server_failures)
        return problems

    def _check_run(
        self,
        who: str,
        user: str,
        app: AppLog,
        final: bool,
        stored: dict[str, list[Message]],
        replays: dict[str, Replay],
        acked: dict[tuple[str, int], Message],
        by_server_id: dict[int, Message],
    ) -> list[str]:
        """Checks 1 (history said to be unavailable), 2, 3, 4 and 6 for one run of one device's application."""
        problems = list(app.problems)
        for code, reason in app.login_rejections:
            if code == 10:  # AUTH_FAILED: the password is right, so this is a bug
                problems.append(f"{who}: login rejected: {reason}")
        got: dict[str, list[Message]] = {}
        for m in app.messages():
            got.setdefault(m.conversation, []).append(m)
            if by_server_id.get(m.server_id) != m:
                problems.append(f"(6) {who} got {m}, stored as {by_server_id.get(m.server_id)}")
        for conversation, messages in stored.items():
            replay = replays[conversation]
            mine = got.pop(conversation, [])
            foreign = [m.seq for m in mine if not replay.may_read(user, m.seq)]
            if foreign:
                problems.append(f"(3) {who} got {conversation} seqs {foreign}, which {user} may not read")
                continue
            if not replay.readable.get(user):
                continue
            start = app.starts.get(conversation, 0)
            seqs = [m.seq for m in mine]
            twice = sorted(seq for seq, n in Counter(seqs).items() if n > 1)
            if twice:
                problems.append(f"(2) {who} got {conversation} seqs {twice} more than once")
                continue
            # Of an earlier membership (see Replay.owed), a gap-free first part; then the latest.
            earlier = [m for m in messages if m.seq > start and replay.may_read(user, m.seq) and not replay.is_owed(user, m.seq)]
            prefix = 0
            while prefix < len(mine) and not replay.is_owed(user, mine[prefix].seq):
                prefix += 1
            if mine[:prefix] != earlier[:prefix]:
                problems.append(
                    f"(3) {who} got {conversation} seqs {seqs[:prefix]} of an earlier membership, not {[m.seq for m in earlier[:prefix]]}"
                )
                continue
            mine = mine[prefix:]
            seqs = seqs[prefix:]
            expected = [m for m in messages if m.seq > start and replay.is_owed(user, m.seq)]
            if not final:
                expected = expected[: len(mine)]
            missing = sorted({m.seq for m in expected} - set(seqs))
            lost = [seq for seq in missing if (conversation, seq) in acked]
            if lost:
                problems.append(f"(1) {who} never got acknowledged {conversation} seqs {lost}")
            elif missing:
                problems.append(f"(3) {who} never got {conversation} seqs {missing} (it resumed after {start})")
            elif mine != expected:
                problems.append(f"(3) {who} got {conversation} as seqs {seqs}, not {[m.seq for m in expected]}")
        for conversation in got:
            problems.append(f"{who} got messages of {conversation}, which the store does not have")
        for event in app.skipped:
            replay = replays.get(event.conversation)
            hidden = [seq for seq in range(event.after + 1, event.upto + 1) if replay is not None and replay.is_owed(user, seq)]
            if hidden:
                problems.append(f"(1) {who} was told {event.conversation} seqs {hidden} are unavailable, but {user} may read them")
        problems.extend(self._split_bundles(who, app, stored))
        return problems

    def _split_bundles(self, who: str, app: AppLog, stored: dict[str, list[Message]]) -> list[str]:
        """(4) Each bundle arrives whole, in one delivery, its messages consecutive."""
        problems = []
        for number, batch in enumerate(app.batches):
            for index, m in enumerate(batch):
                history = stored.get(m.conversation, [])
                before = history[m.seq - 2] if 2 <= m.seq <= len(history) + 1 else None
                if before is not None and before.bundle_remaining:
                    # m continues a bundle: its predecessor must come right before it, in this batch.
                    if index == 0 or batch[index - 1] != before:
                        problems.append(f"(4) {who} got {m.conversation} seq {m.seq} apart from the rest of its bundle (delivery {number})")
                if m.bundle_remaining:
                    if index + 1 >= len(batch) or batch[index + 1].conversation != m.conversation or batch[index + 1].seq != m.seq + 1:
                        problems.append(f"(4) {who} got {m.conversation} seq {m.seq} without the rest of its bundle (delivery {number})")
        return problems

    def frames(self, label: str, direction: str, kind: int) -> list[Trace]:
        """Every frame of ``kind`` sent in one device's stream, whatever became of it, in order."""
        return [t for t in self.trace if t.device == label and t.direction == direction and t.kind == kind]

    def explain(self, last: int = 400) -> str:
        """The notes (cuts, restarts) and the fate of the last frames, for a failure report."""
        lines = list(self.notes)
        lines.append(f"--- last {min(last, len(self.trace))} of {len(self.trace)} frames")
        lines.extend(str(t) for t in self.trace[-last:])
        for device in self.devices.values():
            client = device.client
            lines.append(
                f"{device.label}: state={client.state} caught_up={client.caught_up} unacked={client.unacknowledged} "
                f"delivered={client.inbound.delivered} pending={ {c: sorted(p) for c, p in client.inbound.pending.items()} } "
                f"logins={device.app.logins} link={'#%d' % device.link.number if device.link else None}"
            )
        for conversation, messages in self.stored().items():
            lines.append(f"store {conversation}: head {len(messages)}")
        return "\n".join(lines)
