"""
The hub: what the server does with the events of its connections.

It authenticates logins, authorizes, stores and acknowledges sends, fans stored messages out to
every online device of every member, answers syncs from the store and records delivery cursors.
It talks to connections only through the sans-IO ``ServerConnection`` methods and to storage only
through ``IStore`` Deferreds, so the same hub runs under the reactor and in the deterministic
simulation.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from imkit.checks import Rejected, SubmissionCheck
from imkit.model import Appended, Item, Message, Submission, direct_conversation, direct_members
from imkit.session import events
from imkit.session.server import CLOSED, READY, ServerConnection
from imkit.session.settings import ServerSettings
from imkit.store.interface import IStore
from imkit.wire import packets, schema
from imkit.wire.errors import ErrorCode

_MAX_NAME = 64
_MAX_ROUTES = 100_000
_PER_MESSAGE_OVERHEAD = 256
_DUMMY_PASSWORD = "imkit timing equaliser"


def valid_name(name: str) -> bool:
    """User and device names: 1-64 printable characters, none of them ':' or whitespace."""
    return 0 < len(name) <= _MAX_NAME and name.isprintable() and ":" not in name and not any(c.isspace() for c in name)


class Hub:
    log = Logger()

    def __init__(
        self,
        store: IStore,
        passwords: Any,
        clock: Any,
        settings: ServerSettings = ServerSettings(),
    ) -> None:
        self.store = store
        self.passwords = passwords
        self.clock = clock
        self.settings = settings
        self.checks: list[SubmissionCheck] = []
        self._online: dict[str, set[ServerConnection]] = {}
        self._known_users: set[str] = set()
        self._routes: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
        """(sender, recipient) -> their direct conversation and its members, once the recipient is known."""
        self._dummy_hash: str | None = None

    # Connections -------------------------------------------------------------------------------

    def online(self, user: str) -> tuple[ServerConnection, ...]:
        return tuple(self._online.get(user, ()))

    def connection_lost(self, conn: ServerConnection) -> None:
        if conn.user is not None:
            devices = self._online.get(conn.user)
            if devices is not None:
                devices.discard(conn)
                if not devices:
                    del self._online[conn.user]
        if conn.state != CLOSED:
            conn.close(ErrorCode.OK, "connection lost", say_bye=False)

    def shutdown(self, reason: str = "server is shutting down") -> None:
        """Say goodbye to every connection (unacknowledged sends will be resent elsewhere)."""
        for devices in list(self._online.values()):
            for conn in list(devices):
                conn.close(ErrorCode.SHUTTING_DOWN, reason)

    def handle(self, conn: ServerConnection, found: Iterable[Any]) -> None:
        """React to the events one connection produced."""
        for event in found:
            kind = type(event)
            if kind is events.SendRequested:
                self._submit(conn, event.packet)
            elif kind is events.DeliveryAcked:
                self._record_cursor(conn, event.conversation, event.seq)
            elif kind is events.SyncRequested:
                self._later(conn, self._sync(conn, event.packet))
            elif kind is events.LoginRequested:
                self._later(conn, self._login(conn, event))
            elif kind is events.WindowOpened:
                self._later(conn, self._send_heads(conn, event.conversations))
            elif kind is events.ConnectionClosing:
                if event.code not in (ErrorCode.OK, ErrorCode.SHUTTING_DOWN):
                    self.log.info(
                        "closing {peer} ({user}): {reason}", peer=conn.peer, user=conn.user, reason=event.reason
                    )
                self.connection_lost(conn)

    def _later(self, conn: ServerConnection, coroutine: Any) -> None:
        d = defer.ensureDeferred(coroutine)
        d.addErrback(self._failed, conn)

    def _failed(self, failure: Any, conn: ServerConnection) -> None:
        """A bug or a store failure: drop this connection (its client will retry), keep serving."""
        self.log.failure("internal error serving {peer}", failure, peer=conn.peer)
        if conn.state != CLOSED:
            conn.fail(ErrorCode.INTERNAL_ERROR, "internal server error; retry later")
            self.connection_lost(conn)

    # Login -------------------------------------------------------------------------------------

    async def _login(self, conn: ServerConnection, request: events.LoginRequested) -> None:
        if request.method not in (schema.LOGIN_PASSWORD, schema.LOGIN_TOKEN):
            conn.reject_login(ErrorCode.AUTH_FAILED, "unknown login method")
            return
        if not valid_name(request.user) or not valid_name(request.device):
            conn.reject_login(ErrorCode.AUTH_FAILED, "user and device names are 1-64 characters without ':' or spaces")
            return
        if request.method == schema.LOGIN_TOKEN:
            ok = await self._token_valid(request)
        else:
            ok = await self._password_valid(request)
        if not ok:
            self.log.warn("failed login for {user!r} from {peer}", user=request.user, peer=conn.peer)
            if request.method == schema.LOGIN_TOKEN:
                conn.reject_login(ErrorCode.AUTH_FAILED, "resume token unknown or expired; log in with the password")
            else:
                conn.reject_login(ErrorCode.AUTH_FAILED, "wrong user name or password")
            return
        if conn.state == CLOSED:
            return
        # Every login gets a fresh resume token, replacing the device's previous one.
        token = secrets.token_bytes(32)
        expires_at = int((self.clock.seconds() + self.settings.token_ttl) * 1000)
        d = self.store.set_token(_digest(token), request.user, request.device, expires_at)
        d.addErrback(lambda failure: self.log.failure("could not record a resume token", failure))
        self._known_users.add(request.user)
        conn.accept_login(request.user, request.device, token)
        self._online.setdefault(request.user, set()).add(conn)

    async def _password_valid(self, request: events.LoginRequested) -> bool:
        try:
            password = request.secret.decode("utf-8")
        except UnicodeDecodeError:
            password = None
        stored = await self.store.password_hash(request.user)
        if stored is None or password is None:
            # Spend the same time as a real check, so a wrong name looks like a wrong password.
            await self.passwords.verify(await self._dummy(), password or "")
            return False
        if not await self.passwords.verify(stored, password):
            return False
        if self.passwords.needs_rehash(stored):
            # The hash was made with weaker parameters than today's: replace it while we have the password.
            d = defer.ensureDeferred(self._rehash(request.user, password))
            d.addErrback(lambda failure: self.log.failure("could not rehash a password", failure))
        return True

    async def _token_valid(self, request: events.LoginRequested) -> bool:
        owner = await self.store.token_owner(_digest(request.secret))
        if owner is None:
            return False
        user, device, expires_at = owner
        return user == request.user and device == request.device and expires_at > self.clock.seconds() * 1000

    async def _rehash(self, user: str, password: str) -> None:
        await self.store.set_password_hash(user, await self.passwords.hash(password))

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self.passwords.hash(_DUMMY_PASSWORD)
        return self._dummy_hash

    # Sending -----------------------------------------------------------------------------------

    def _submit(self, conn: ServerConnection, packet: packets.Send | packets.Bundle) -> None:
        if type(packet) is packets.Send and packet.target_type == schema.TARGET_USER:
            # The common case, a message to someone written to before: no lookups at all.
            route = self._routes.get((conn.user, packet.target))
            if route is not None and len(packet.body) <= self.settings.max_body:
                self._store(conn, packet, route[0], route[1], (Item(packet.content_type, packet.body),))
                return
        if isinstance(packet, packets.Send):
            items: tuple[Item, ...] = (Item(packet.content_type, packet.body),)
        else:
            items = packet.items
        problem = self._check_size(items)
        if problem is not None:
            self._refuse(conn, packet.client_msg_id, ErrorCode.TOO_LARGE, problem)
            return
        sender = conn.user
        assert sender is not None
        target = packet.target
        if packet.target_type == schema.TARGET_USER:
            if target == sender or target in self._known_users:
                route = (direct_conversation(sender, target), _pair(sender, target))
                if len(self._routes) >= _MAX_ROUTES:
                    self._routes.clear()
                self._routes[(sender, target)] = route
                self._store(conn, packet, route[0], route[1], items)
                return
            d = self.store.password_hash(target)
            d.addCallback(self._recipient_checked, conn, packet, items)
            d.addErrback(self._failed, conn)
            return
        if packet.target_type == schema.TARGET_CONVERSATION:
            members = direct_members(target)
            if members is not None and sender in members:
                other = members[0] if members[1] == sender else members[1]
                if other == sender or other in self._known_users:
                    self._store(conn, packet, target, members, items)
                    return
                d = self.store.password_hash(other)
                d.addCallback(self._recipient_checked, conn, packet, items)
                d.addErrback(self._failed, conn)
                return
            d = self.store.members(target)
            d.addCallback(self._membership_checked, conn, packet, items)
            d.addErrback(self._failed, conn)
            return
        self._refuse(conn, packet.client_msg_id, ErrorCode.INVALID_TARGET, f"unknown target type {packet.target_type}")

    def _check_size(self, items: tuple[Item, ...]) -> str | None:
        if not items:
            return "a bundle needs at least one message"
        total = 0
        for item in items:
            if len(item.body) > self.settings.max_body:
                return f"message body of {len(item.body)} bytes exceeds the limit of {self.settings.max_body}"
            total += len(item.body) + len(item.content_type) + _PER_MESSAGE_OVERHEAD
        if total > self.settings.max_frame // 2:
            return f"bundle of {total} bytes exceeds the limit of {self.settings.max_frame // 2}"
        return None

    def _recipient_checked(self, stored_hash: str | None, conn: ServerConnection, packet: Any, items: tuple[Item, ...]) -> None:
        sender = conn.user
        assert sender is not None
        if packet.target_type == schema.TARGET_USER:
            recipient = packet.target
            conversation = direct_conversation(sender, recipient)
        else:
            conversation = packet.target
            a, b = direct_members(conversation)  # type: ignore[misc]
            recipient = a if b == sender else b
        if stored_hash is None:
            self._refuse(conn, packet.client_msg_id, ErrorCode.UNKNOWN_RECIPIENT, f"no user named {recipient!r}")
            return
        self._known_users.add(recipient)
        self._store(conn, packet, conversation, _pair(sender, recipient), items)

    def _membership_checked(self, members: tuple[str, ...], conn: ServerConnection, packet: Any, items: tuple[Item, ...]) -> None:
        if conn.user not in members:
            # Same answer whether or not the conversation exists: nothing leaks to non-members.
            self._refuse(conn, packet.client_msg_id, ErrorCode.NOT_A_MEMBER, "you are not a member of that conversation")
            return
        self._store(conn, packet, packet.target, members, items)

    def _refuse(self, conn: ServerConnection, cmid: int, code: ErrorCode, reason: str) -> None:
        conn.ack(packets.SendAck(cmid, int(code), 0, 0, 0, 0, "", reason))

    def _store(self, conn: ServerConnection, packet: Any, conversation: str, members: tuple[str, ...], items: tuple[Item, ...]) -> None:
        # (sender, sender_device, client_msg_id, conversation, members, sent_at, items)
        submission = Submission(
            conn.user, conn.device, packet.client_msg_id, conversation, members, int(self.clock.seconds() * 1000), items  # type: ignore[arg-type]
        )
        if self.checks:
            d = self._run_checks(submission)
            d.addCallback(lambda _: self.store.append(submission))
        else:
            d = self.store.append(submission)
        d.addCallbacks(self._stored, self._not_stored, (conn, members), None, (conn, packet.client_msg_id))

    def _run_checks(self, submission: Submission) -> defer.Deferred:
        async def run() -> None:
            for item in submission.items:
                for check in self.checks:
                    result = check(submission.sender, submission.sender_device, submission.conversation, item)
                    if isinstance(result, defer.Deferred):
                        await result

        return defer.ensureDeferred(run())

    def _not_stored(self, failure: Any, conn: ServerConnection, cmid: int) -> None:
        if failure.check(Rejected):
            error = failure.value
            self._refuse(conn, cmid, error.code, error.reason)
            return
        self._failed(failure, conn)

    def _stored(self, appended: Appended, conn: ServerConnection, members: tuple[str, ...]) -> None:
        messages = appended.messages
        first = messages[0]
        conn.ack(
            packets.SendAck(
                first.client_msg_id, 0, first.server_id, first.seq, first.sent_at, len(messages), first.conversation, ""
            )
        )
        if not appended.duplicate:
            self.fan_out(messages, members, conn)

    def fan_out(self, messages: tuple[Message, ...], members: Iterable[str], origin: ServerConnection | None = None) -> None:
        """Push stored messages to every online device of every member but the one that sent them."""
        online = self._online
        for member in members:
            devices = online.get(member)
            if not devices:
                continue
            for conn in devices:
                if conn is origin or conn.state != READY:
                    continue
                if len(messages) == 1:
                    conn.deliver(messages[0])
                else:
                    conn.deliver_bundle(messages)

    # Acks, sync, heads -------------------------------------------------------------------------

    def _record_cursor(self, conn: ServerConnection, conversation: str, seq: int) -> None:
        d = self.store.set_cursor(conn.user, conn.device, conversation, seq)
        d.addErrback(lambda failure: self.log.failure("could not record a delivery cursor", failure))

    async def _is_member(self, conversation: str, user: str) -> bool:
        members = direct_members(conversation)
        if members is not None:
            return user in members
        return user in await self.store.members(conversation)

    async def _sync(self, conn: ServerConnection, request: packets.Sync) -> None:
        user, device = conn.user, conn.device
        store = self.store
        limit = min(request.limit or self.settings.sync_page, self.settings.sync_page)
        given = {cursor.conversation: cursor.seq for cursor in request.cursors}
        if request.flags & schema.SYNC_ONLY_LISTED:
            heads = {}
            for conversation in given:
                if await self._is_member(conversation, user):  # type: ignore[arg-type]
                    heads[conversation] = await store.head(conversation)
                else:
                    self.log.warn("{user} asked to sync {conversation!r}, not theirs", user=user, conversation=conversation)
            starts = {conversation: given[conversation] for conversation in heads}
        else:
            heads = await store.conversations(user)
            server = await store.cursors(user, device) if request.flags & schema.SYNC_SERVER_CURSORS else {}
            starts = {conversation: given.get(conversation, server.get(conversation, 0)) for conversation in heads}
        ranges = []
        messages: list[Message] = []
        budget = self.settings.max_frame // 2
        more = False
        for conversation in sorted(heads):
            start = min(starts[conversation], heads[conversation])
            ranges.append(packets.Range(conversation, start, heads[conversation]))
        for span in ranges:
            if span.from_seq >= span.head_seq:
                continue
            room = limit - len(messages)
            if room <= 0 or budget <= 0:
                more = True
                break
            page = await store.read(span.conversation, span.from_seq, room)
            taken = 0
            for message in page:
                cost = len(message.body) + len(message.content_type) + len(message.conversation) + _PER_MESSAGE_OVERHEAD
                if budget < cost and messages and not messages[-1].bundle_remaining:
                    break  # page full; a bundle is never cut, so this is a bundle boundary
                budget -= cost
                messages.append(message)
                taken += 1
            if taken < len(page) or (page and page[-1].seq < span.head_seq):
                more = True
                break
        if conn.state == READY:
            conn.send_packet(packets.SyncResult(request.request_id, more, tuple(ranges), tuple(messages)))

    async def _send_heads(self, conn: ServerConnection, conversations: tuple[str, ...]) -> None:
        heads = []
        for conversation in conversations:
            heads.append(packets.Cursor(conversation, await self.store.head(conversation)))
        conn.announce_heads(tuple(heads))


def _digest(token: bytes) -> str:
    """What the store keeps of a resume token: enough to recognise it, useless to a thief of the database."""
    return hashlib.sha256(token).hexdigest()


def _pair(a: str, b: str) -> tuple[str, ...]:
    return (a,) if a == b else tuple(sorted((a, b)))
