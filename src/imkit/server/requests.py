"""
What the server does with packets outside the reliable stream: read marks and receipts, typing,
presence, and queries about contacts and groups.

None of it is sequenced.  Typing and presence are never stored at all: they go to whoever is
online and may see them, and a device that sends them too fast has the excess dropped.  Read
marks are stored (so a device that was away can ask for them) and pushed to the reader's other
devices and, in small conversations, to the other members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from imkit.model import direct_members
from imkit.rules import is_group
from imkit.server.limits import TokenBucket
from imkit.session.server import READY, ServerConnection
from imkit.wire import packets, schema
from imkit.wire.errors import ErrorCode

if TYPE_CHECKING:  # pragma: no cover
    from imkit.server.hub import Hub

_MAX_RECEIPT_SEQS = 256
_BUCKET = 5
"""Typing and presence packets a device may send in a burst before the rate applies."""


class Requests:
    log = Logger()

    def __init__(self, hub: "Hub") -> None:
        self.hub = hub
        self._buckets: dict[ServerConnection, TokenBucket] = {}
        self._presence: dict[str, tuple[int, str]] = {}
        """What users said of themselves (status, text), while any of their devices is online."""
        self._arriving: dict[str, Any] = {}
        """user -> the DelayedCall that will tell their contacts they came (``presence_grace``)."""

    # Hub hooks ---------------------------------------------------------------------------------

    async def handle(self, conn: ServerConnection, packet: Any) -> None:
        kind = type(packet)
        if kind is packets.Read:
            await self._read(conn, packet)
        elif kind is packets.Typing:
            if self._allowed(conn):
                await self._typing(conn, packet)
        elif kind is packets.Presence:
            if self._allowed(conn):
                await self._set_presence(conn, packet)
        elif kind is packets.ReceiptsQuery:
            retry = self.hub.limits.lookup(conn, packet.conversation)
            if retry is None:
                await self._receipts(conn, packet)
            elif conn.state == READY:
                conn.send_packet(packets.ReceiptsResult(packet.request_id, int(ErrorCode.RATE_LIMITED), packet.conversation, (), ()))
        elif kind is packets.Query:
            retry = self.hub.limits.lookup(conn, packet.target or None)
            if retry is None:
                await self._query(conn, packet)
            else:
                self._answer(conn, packet, ErrorCode.RATE_LIMITED, f"too many lookups; ask again from server time {retry} ms")

    def device_online(self, conn: ServerConnection) -> None:
        """A device logged in: tell it who is online, and if it is its user's first, tell them."""
        self._quietly(self._arrived(conn))

    def device_offline(self, conn: ServerConnection) -> None:
        self._buckets.pop(conn, None)
        user = conn.user
        if user is None or self.hub.online(user) or self.hub.stopping:
            return
        said = self._presence.pop(user, None)
        arrival = self._arriving.pop(user, None)
        if arrival is not None:
            arrival.cancel()
            return  # gone before their arrival was announced: nobody saw them come
        if said is not None and said[0] == schema.PRESENCE_OFFLINE:
            return  # invisible all along: nobody saw them arrive either
        self._quietly(self._announce(user, schema.PRESENCE_OFFLINE, ""))

    def _quietly(self, coroutine: Any) -> None:
        """Presence is best effort: a failure is logged, and costs nobody their connection."""
        d = self.hub.track(defer.ensureDeferred(coroutine))
        d.addErrback(lambda failure: self.log.failure("could not tell contacts about presence", failure))

    # Presence ----------------------------------------------------------------------------------

    async def _arrived(self, conn: ServerConnection) -> None:
        user = conn.user
        assert user is not None
        friends = await self._mutual_contacts(user)
        for friend in sorted(friends):
            if self.hub.online(friend) and friend not in self._arriving:  # an arriving one is told of later
                status, text = self._presence.get(friend, (schema.PRESENCE_ONLINE, ""))
                if status != schema.PRESENCE_OFFLINE and conn.state == READY:
                    conn.send_packet(packets.PresenceNotice(status, friend, text))
        if len(self.hub.online(user)) == 1 and user not in self._presence:
            grace = self.hub.settings.presence_grace
            if grace <= 0:
                await self._announce(user, schema.PRESENCE_ONLINE, "", friends, exclude=conn)
            elif user not in self._arriving:
                # The client may say it is invisible (or away) first: then that is all they hear.
                self._arriving[user] = self.hub.clock.callLater(grace, self._arrival_due, user)

    def _arrival_due(self, user: str) -> None:
        del self._arriving[user]
        # Contacts as they are now (they may have changed during the grace); not the user's own devices.
        self._quietly(self._announce(user, schema.PRESENCE_ONLINE, "", to_self=False))

    def stop(self) -> None:
        """The server is stopping: announce no more arrivals."""
        for arrival in self._arriving.values():
            arrival.cancel()
        self._arriving.clear()

    async def _set_presence(self, conn: ServerConnection, packet: packets.Presence) -> None:
        user = conn.user
        assert user is not None
        if packet.status not in (schema.PRESENCE_OFFLINE, schema.PRESENCE_ONLINE, schema.PRESENCE_AWAY, schema.PRESENCE_BUSY):
            return
        text = packet.text[:200]
        self._presence[user] = (packet.status, text)
        arrival = self._arriving.pop(user, None)
        if arrival is not None:
            arrival.cancel()  # their own word replaces the announcement of their arrival
            if packet.status == schema.PRESENCE_OFFLINE:
                # Invisible from the start: only their own devices hear it, nobody was told they came.
                await self._announce(user, packet.status, text, set(), exclude=conn)
                return
        await self._announce(user, packet.status, text, exclude=conn)

    async def _announce(
        self, user: str, status: int, text: str, friends: set[str] | None = None, exclude: Any = None, to_self: bool = True
    ) -> None:
        if friends is None:
            friends = await self._mutual_contacts(user)
        notice = packets.PresenceNotice(status, user, text)
        for friend in friends | {user} if to_self else friends:
            for device in self.hub.online(friend):
                if device is not exclude and device.state == READY:
                    device.send_packet(notice)

    async def _mutual_contacts(self, user: str) -> set[str]:
        """Who may see a user's presence: those who have them as a contact, and are theirs."""
        store = self.hub.store
        mine = await store.contacts(user)
        found = set()
        for other, relation in mine.items():
            if relation == schema.RELATION_CONTACT:
                theirs = await store.contacts(other)
                if theirs.get(user) == schema.RELATION_CONTACT:
                    found.add(other)
        return found

    def _allowed(self, conn: ServerConnection) -> bool:
        now = self.hub.clock.seconds()
        bucket = self._buckets.get(conn)
        if bucket is None:
            bucket = self._buckets[conn] = TokenBucket(_BUCKET, self.hub.settings.typing_interval, now)
        return bucket.take(now)

    # Typing ------------------------------------------------------------------------------------

    async def _typing(self, conn: ServerConnection, packet: packets.Typing) -> None:
        user = conn.user
        assert user is not None
        audience = await self._current_audience(user, packet.conversation)
        if audience is None:
            return
        notice = packets.TypingNotice(packet.active, packet.conversation, user, conn.device or "")
        for member in audience:
            for device in self.hub.online(member):
                if device is not conn and device.state == READY:
                    device.send_packet(notice)

    async def _current_audience(self, user: str, conversation: str) -> tuple[str, ...] | None:
        """The members a user may show typing to now, or None if they may not."""
        pair = direct_members(conversation)
        if pair is not None:
            if user not in pair:
                return None
            other = pair[0] if pair[1] == user else pair[1]
            if other == user:
                return None
            theirs = (await self.hub.store.contacts(other)).get(user, schema.RELATION_NONE)
            mine = (await self.hub.store.contacts(user)).get(other, schema.RELATION_NONE)
            if schema.RELATION_BLOCKED in (theirs, mine):
                return None
            if self.hub.policy.contacts_only and not theirs == mine == schema.RELATION_CONTACT:
                return None
            return (other,)
        if not is_group(conversation):
            return None
        members = await self.hub.store.members(conversation)
        if user not in members:
            return None
        return tuple(member for member in members if member != user)

    # Read marks and receipts -------------------------------------------------------------------

    async def _read(self, conn: ServerConnection, packet: packets.Read) -> None:
        user = conn.user
        assert user is not None
        store = self.hub.store
        span = await store.visibility(packet.conversation, user)
        if span is None or not 0 < packet.seq <= span[1]:
            return  # nothing to mark: not theirs, or beyond what they can see
        await store.set_read(user, conn.device, packet.conversation, packet.seq)
        receipt = packets.Receipt(packet.seq, packet.conversation, user, conn.device or "")
        members = await store.members(packet.conversation)
        audience = {user}
        if len(members) <= self.hub.settings.small_group:
            audience.update(members)
        for member in audience:
            for device in self.hub.online(member):
                if device is not conn and device.state == READY:
                    device.send_packet(receipt)

    async def _receipts(self, conn: ServerConnection, query: packets.ReceiptsQuery) -> None:
        user = conn.user
        assert user is not None
        store = self.hub.store
        conversation = query.conversation
        span = await store.visibility(conversation, user)
        if span is None:
            self.hub.limits.missed(conn, conversation)
            conn.send_packet(packets.ReceiptsResult(query.request_id, int(ErrorCode.NOT_A_MEMBER), conversation, (), ()))
            return
        marks = await store.read_marks(conversation)
        members = await store.members(conversation)
        counts = []
        for seq in query.seqs[:_MAX_RECEIPT_SEQS]:
            if not span[0] < seq <= span[1]:
                continue
            found = await store.read(conversation, seq - 1, 1)
            if not found or found[0].seq != seq:
                continue
            sender = found[0].sender
            readers = sum(1 for member in members if member != sender and marks.get(member, 0) >= seq)
            counts.append(packets.ReadCount(seq, readers))
        readers: tuple[packets.ReadMark, ...] = ()
        if len(members) <= self.hub.settings.small_group:
            readers = tuple(packets.ReadMark(marks[member], member) for member in members if member in marks)
        if conn.state == READY:
            conn.send_packet(packets.ReceiptsResult(query.request_id, 0, conversation, tuple(counts), readers))

    # Queries -----------------------------------------------------------------------------------

    async def _query(self, conn: ServerConnection, query: packets.Query) -> None:
        user = conn.user
        assert user is not None
        store = self.hub.store
        entries: list[packets.Entry] = []
        if query.what == schema.QUERY_CONTACTS:
            for other, relation in sorted((await store.contacts(user)).items()):
                entries.append(packets.Entry(0, relation, other, ""))
        elif query.what == schema.QUERY_MEMBERS:
            group = await store.group(query.target) if is_group(query.target) else None
            if group is None or user not in group.members:
                self.hub.limits.missed(conn, query.target)
                self._answer(conn, query, ErrorCode.NOT_A_MEMBER, "you are not a member of that group")
                return
            for name in sorted(group.members):
                membership = group.members[name]
                entries.append(packets.Entry(membership.joined_seq, membership.role, name, ""))
        elif query.what == schema.QUERY_GROUPS:
            for conversation, (_floor, upto) in sorted((await store.visible(user)).items()):
                if not is_group(conversation):
                    continue
                group = await store.group(conversation)
                if group is not None and user in group.members:
                    entries.append(packets.Entry(upto, group.members[user].role, conversation, group.title))
        else:
            self._answer(conn, query, ErrorCode.INVALID_OPERATION, f"unknown query {query.what}")
            return
        self._answer(conn, query, ErrorCode.OK, "", tuple(entries))

    def _answer(self, conn: ServerConnection, query: packets.Query, code: ErrorCode, reason: str, entries: tuple = ()) -> None:
        if conn.state == READY:
            conn.send_packet(packets.QueryResult(query.request_id, int(code), reason, entries))
