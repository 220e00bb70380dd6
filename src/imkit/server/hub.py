"""
The hub: what the server does with the events of its connections.

It authenticates logins, authorizes, stores and acknowledges sends, fans stored messages out to
every online device of every member, answers syncs from the store and records delivery cursors.
It talks to connections only through the sans-IO ``ServerConnection`` methods and to storage only
through ``IStore`` Deferreds, so the same hub runs under the reactor and in the deterministic
simulation.

Sessions and tokens.  A login (password, resume token or TLS client certificate) authenticates
the connection, and the connection *is* the session: every later packet on it acts as the user
and device it logged in as (no packet carries a sender), and the session ends with the
connection.  There is deliberately no separate short-lived session token: on one persistent TLS
connection nothing would ever present it, so it would add a secret to keep without protecting
anything.  What a login hands out is the *resume token*: 32 random bytes that let that device
log in again without its password.  It expires after ``token_ttl``, is bound to its user and
device, and is replaced by a new one at every login (so each is good for one reconnect, and one
used by a thief makes the owner's device fall back to its password).  The store keeps only its
SHA-256 digest and finds a token by that digest: nothing compares a secret byte by byte (an
attacker timing the lookup learns about digests of their own guesses).  Tokens are revoked
per device or per user (``revoke``, ``imkit user revoke``), and every token of a user when the
user is disabled (``disable``, ``imkit user disable``).  Revoking or disabling through the hub
also ends the live sessions at once; done by the CLI on the store of a running server, revoking
ends them at their next reconnect, and disabling within ``account_check_interval`` seconds (the
hub looks for disabled users among those online that often, and at every login).

Password logins go through the failed-login limiter (``imkit.server.logins``) per user name and
per IP address.
"""

from __future__ import annotations

import hashlib
import secrets
import weakref
from collections import OrderedDict, deque
from itertools import groupby
from typing import Any, Iterable

import attrs

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imkit import slots
from imkit.checks import Rejected, SubmissionCheck
from imkit.content.pipeline import ContentPipeline
from imkit.model import Appended, Item, Message, Submission, direct_conversation, direct_members
from imkit.rules import Policy, Refused, is_group
from imkit.server.limits import Limits, host_of
from imkit.server.logins import LoginLimiter
from imkit.server.keys import KEY_PACKETS, KeyDirectory
from imkit.server.requests import Requests
from imkit.session import events
from imkit.session.server import CLOSED, READY, ServerConnection
from imkit.session.settings import ServerSettings
from imkit.store.interface import IStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode

_encode_deliver = codec.CODECS[schema.DELIVER].encode

_MAX_NAME = 64
_MAX_ROUTES = 100_000
_MAX_REFUSALS = 100_000
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
        policy: Policy = Policy(),
    ) -> None:
        self.store = store
        self.policy = policy
        self.passwords = passwords
        self.clock = clock
        self.settings = settings
        self.checks: list[SubmissionCheck] = []
        self.content = ContentPipeline(clock)
        """Content checkers (``imkit.content``), run after ``checks``; flagged messages are reported to ``content.on_flagged``."""
        self._online: dict[str, dict[ServerConnection, None]] = {}
        """user -> their logged-in connections, oldest first."""
        self._routes: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
        """(sender, recipient) -> their direct conversation and its members, once the recipient is known."""
        self._dummy_hash: str | None = None
        self.certificate_users: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        """connection -> the user its verified TLS client certificate names (set by the protocol)."""
        self._in_order: dict[tuple[str, str], deque] = {}
        """(user, device) -> its sends waiting behind a slow check, oldest first."""
        self._gathering: list[Submission] | None = None
        """While ``handle`` runs: the sends of that read that go straight to the store, handed
        over in one ``append_many`` (one Deferred for them all, not one each)."""
        self._gathering_for: ServerConnection | None = None
        self._refusals: OrderedDict[tuple[str, str, int], packets.SendAck] = OrderedDict()
        """The latest refusals by (user, device, client message id): a resend gets the same answer."""
        self._fan_outs: deque[_FanOut] = deque()
        self._fan_out_call: Any = None
        self.stopping = False
        self.limits = Limits(settings, clock)
        """Rate limits, the anti-crawler rule and connections per user (``imkit.server.limits``)."""
        self.logins = LoginLimiter(settings, clock)
        """Failed password logins per user name and per IP address (``imkit.server.logins``)."""
        self._account_check: Any = None
        self._ackable: weakref.WeakKeyDictionary[ServerConnection, set[str]] = weakref.WeakKeyDictionary()
        """connection -> conversations it may see, found when it first acknowledged them."""
        self._cursor_updates: dict[tuple[str, str, str], int] = {}
        """Delivery cursors acknowledged this reactor turn, written together at its end (in a group
        every member acknowledges every message): (user, device, conversation) -> seq."""
        self._cursor_flush: Any = None
        self._in_flight: set[defer.Deferred] = set()
        """Work that reads or writes the store across several steps (logins, syncs, requests, first
        acks, checks): stopping waits for it before the store closes (``settle``)."""
        self.requests = Requests(self)
        self.keys = KeyDirectory(self)
        """End-to-end encryption's key directory (``imkit.server.keys``)."""

    # Connections -------------------------------------------------------------------------------

    def online(self, user: str) -> tuple[ServerConnection, ...]:
        return tuple(self._online.get(user, ()))

    def connection_lost(self, conn: ServerConnection) -> None:
        self.limits.connection_lost(conn)
        if conn.user is not None:
            devices = self._online.get(conn.user)
            if devices is not None and conn in devices:
                del devices[conn]
                if not devices:
                    del self._online[conn.user]
                    if not self._online:
                        self._stop_account_checks()
                self.requests.device_offline(conn)
        if conn.state != CLOSED:
            conn.close(ErrorCode.OK, "connection lost", say_bye=False)

    def shutdown(self, reason: str = "server is shutting down") -> None:
        """Say goodbye to every connection (unacknowledged sends will be resent elsewhere)."""
        self.stopping = True
        self.limits.stop()
        self.requests.stop()
        self._stop_account_checks()
        self.write_cursors()
        for devices in list(self._online.values()):
            for conn in list(devices):
                conn.close(ErrorCode.SHUTTING_DOWN, reason)

    def handle(self, conn: ServerConnection, found: Iterable[Any]) -> None:
        """React to the events one connection produced."""
        outer = self._gathering, self._gathering_for
        self._gathering, self._gathering_for = [], conn
        try:
            for event in found:
                if type(event) is events.SendRequested:
                    self._submit(conn, event.packet)
                else:
                    self._hand_over(conn)  # whatever comes after the sends sees them stored
                    self._react(conn, event)
            self._hand_over(conn)
        finally:
            self._gathering, self._gathering_for = outer

    def _hand_over(self, conn: ServerConnection) -> None:
        """Give the store the sends gathered so far (before anything answers a later one)."""
        gathering = self._gathering
        if gathering and self._gathering_for is conn:
            self._gathering = []
            self._append_gathered(conn, gathering)

    def _react(self, conn: ServerConnection, event: Any) -> None:
        kind = type(event)
        if kind is events.DeliveryAcked:
            self._record_cursor(conn, event.conversation, event.seq)
        elif kind is events.SyncRequested:
            self.limits.sync_requested(conn, event.packet, self._start_sync)
        elif kind is events.LoginRequested:
            refusal = self.limits.login_requested(conn, event.user, event.device)
            if refusal is None:
                self._later(conn, self._login(conn, event))
            else:
                conn.reject_login(ErrorCode.TOO_MANY_CONNECTIONS, refusal)
        elif kind is events.RequestReceived:
            handler = self.keys if isinstance(event.packet, KEY_PACKETS) else self.requests
            self._later(conn, handler.handle(conn, event.packet))
        elif kind is events.WindowOpened:
            self._later(conn, self._send_heads(conn, event.conversations))
        elif kind is events.ConnectionClosing:
            if event.code not in (ErrorCode.OK, ErrorCode.SHUTTING_DOWN):
                self.log.info(
                    "closing {peer} ({user}): {reason}", peer=conn.peer, user=conn.user, reason=event.reason
                )
            self.connection_lost(conn)

    def _later(self, conn: ServerConnection, coroutine: Any) -> None:
        d = self.track(defer.ensureDeferred(coroutine))
        d.addErrback(self._failed, conn)

    def track(self, d: defer.Deferred) -> defer.Deferred:
        """Count ``d`` as work in flight until it fires (see ``settle``); returns it."""
        in_flight = self._in_flight

        def finished(result: Any) -> Any:
            in_flight.discard(d)
            return result

        in_flight.add(d)
        d.addBoth(finished)
        return d

    async def settle(self, timeout: float) -> bool:
        """
        Wait for the work in flight, and for any it starts, at most ``timeout`` seconds; True if
        it all finished.  Stopping calls it after closing every connection, so a login or a
        first ack halfway through does not meet a closed store.
        """
        deadline = self.clock.seconds() + timeout
        while self._in_flight:
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                self.log.warn("stopping with {count} requests unfinished", count=len(self._in_flight))
                return False
            woken: defer.Deferred = defer.Deferred()

            def wake(_: Any = None) -> None:
                if not woken.called:
                    woken.callback(None)

            defer.DeferredList(list(self._in_flight)).addBoth(wake)
            timer = self.clock.callLater(remaining, wake)
            await woken
            if timer.active():
                timer.cancel()
        return True

    def _failed(self, failure: Any, conn: ServerConnection) -> None:
        """A bug or a store failure: drop this connection (its client will retry), keep serving."""
        self.log.failure("internal error serving {peer}", failure, peer=conn.peer)
        if conn.state != CLOSED:
            conn.fail(ErrorCode.INTERNAL_ERROR, "internal server error; retry later")
            self.connection_lost(conn)

    # Login -------------------------------------------------------------------------------------

    async def _login(self, conn: ServerConnection, request: events.LoginRequested) -> None:
        if request.method not in (schema.LOGIN_PASSWORD, schema.LOGIN_TOKEN, schema.LOGIN_CERTIFICATE):
            conn.reject_login(ErrorCode.AUTH_FAILED, "unknown login method")
            return
        if not valid_name(request.user) or not valid_name(request.device):
            conn.reject_login(ErrorCode.AUTH_FAILED, "user and device names are 1-64 characters without ':' or spaces")
            return
        limited = request.method == schema.LOGIN_PASSWORD and self.logins.enabled
        if limited:
            # Refused unchecked while the name or the address is locked: the same for every name.
            refusal = self.logins.begin(request.user, host_of(conn.peer))
            if refusal is not None:
                conn.reject_login(ErrorCode.RATE_LIMITED, refusal.reason)
                return
        try:
            if request.method == schema.LOGIN_TOKEN:
                ok = await self._token_valid(request)
            elif request.method == schema.LOGIN_CERTIFICATE:
                ok = await self._certificate_valid(conn, request)
            else:
                ok = await self._password_valid(request)
            # Asked only once the credentials are good: a disabled account looks like any
            # other to someone who cannot log in as it.
            disabled = ok and await self.store.is_disabled(request.user)
        except BaseException:
            if limited:
                self.logins.abandoned(request.user, host_of(conn.peer))
            raise
        if limited:
            if ok and not disabled:
                self.logins.succeeded(request.user, host_of(conn.peer))
            else:
                # A right password for a disabled account counts as a failure: such an account
                # must be no better a password oracle than a live one.
                self.logins.failed(request.user, host_of(conn.peer))
        if disabled:
            self.log.warn("refused a login of disabled user {user!r} from {peer}", user=request.user, peer=conn.peer)
            conn.reject_login(ErrorCode.AUTH_FAILED, "this account is disabled")
            return
        if not ok:
            self.log.warn("failed login for {user!r} from {peer}", user=request.user, peer=conn.peer)
            if request.method == schema.LOGIN_TOKEN:
                conn.reject_login(ErrorCode.AUTH_FAILED, "resume token unknown or expired; log in with the password")
            elif request.method == schema.LOGIN_CERTIFICATE:
                conn.reject_login(ErrorCode.AUTH_FAILED, "no verified client certificate for this user")
            else:
                conn.reject_login(ErrorCode.AUTH_FAILED, "wrong user name or password")
            return
        if conn.state == CLOSED:
            return
        leaving = self._make_room(conn, request.user, request.device)
        if leaving is None:
            return  # refused: the device keeps its previous resume token
        # Every login gets a fresh resume token, replacing the device's previous one.
        token = secrets.token_bytes(32)
        expires_at = int((self.clock.seconds() + self.settings.token_ttl) * 1000)
        d = self.store.set_token(_digest(token), request.user, request.device, expires_at)
        d.addErrback(lambda failure: self.log.failure("could not record a resume token", failure))
        conn.accept_login(request.user, request.device, token)
        self._online.setdefault(request.user, {})[conn] = None
        self._start_account_checks()
        self.requests.device_online(conn)
        # The connections this one replaces go once it is online: the user never went offline.
        for other, code, reason in leaving:
            other.close(code, reason)
            self.connection_lost(other)

    def _make_room(self, conn: ServerConnection, user: str, device: str) -> list[tuple[ServerConnection, ErrorCode, str]] | None:
        """
        One connection per device (a new login replaces a stale one), and at most
        ``max_devices`` devices per user: the oldest makes way, or the newcomer is refused
        (None).  Returns the connections to close, and why, once the newcomer is in.
        """
        devices = self._online.get(user, {})
        leaving = [
            (other, ErrorCode.OK, "this device logged in again on another connection")
            for other in devices
            if other.device == device
        ]
        staying = [other for other in devices if other.device != device]
        if len(staying) < self.settings.max_devices:
            return leaving
        if self.settings.device_policy == "refuse":
            conn.reject_login(ErrorCode.TOO_MANY_DEVICES, f"already logged in on {len(staying)} devices, the most allowed")
            return None
        leaving.append((staying[0], ErrorCode.TOO_MANY_DEVICES, "logged out: a newer device of this user logged in"))
        return leaving

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
            d = self.track(defer.ensureDeferred(self._rehash(request.user, password)))
            d.addErrback(lambda failure: self.log.failure("could not rehash a password", failure))
        return True

    async def _token_valid(self, request: events.LoginRequested) -> bool:
        owner = await self.store.token_owner(_digest(request.secret))
        if owner is None:
            return False
        user, device, expires_at = owner
        return user == request.user and device == request.device and expires_at > self.clock.seconds() * 1000

    async def _certificate_valid(self, conn: ServerConnection, request: events.LoginRequested) -> bool:
        """The connection's verified TLS client certificate names this user, who has an account."""
        if self.certificate_users.get(conn) != request.user:
            return False
        return await self.store.password_hash(request.user) is not None

    async def _rehash(self, user: str, password: str) -> None:
        await self.store.set_password_hash(user, await self.passwords.hash(password))

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self.passwords.hash(_DUMMY_PASSWORD)
        return self._dummy_hash

    # Accounts ----------------------------------------------------------------------------------

    def end_sessions(self, user: str, device: str | None = None, reason: str = "logged out by the server") -> int:
        """Close the live connections of ``user`` (of one ``device`` only, if given). Returns how many."""
        doomed = [conn for conn in self._online.get(user, ()) if device is None or conn.device == device]
        for conn in doomed:
            conn.close(ErrorCode.AUTH_FAILED, reason)
            self.connection_lost(conn)
        if doomed:
            self.log.info("ended {count} session(s) of {user}: {reason}", count=len(doomed), user=user, reason=reason)
        return len(doomed)

    async def revoke(self, user: str, device: str | None = None) -> int:
        """
        Revoke the resume tokens of one device of ``user``, or of all its devices, and end their
        live sessions: they must log in with the password again.  Returns how many tokens went.
        """
        revoked = await self.store.revoke_tokens(user, device)
        self.end_sessions(user, device, "this device's resume token was revoked; log in with the password")
        return revoked

    async def disable(self, user: str) -> int:
        """Disable ``user``: tokens revoked, live sessions ended, logins refused.  Fails with UnknownUser."""
        revoked = await self.store.set_disabled(user, True)
        self.end_sessions(user, None, "this account is disabled")
        return revoked

    async def enable(self, user: str) -> None:
        """Let a disabled user log in again (with the password: their tokens are gone)."""
        await self.store.set_disabled(user, False)

    def _start_account_checks(self) -> None:
        interval = self.settings.account_check_interval
        if self._account_check is None and interval > 0 and not self.stopping:
            self._account_check = self.clock.callLater(interval, self._check_accounts)

    def _stop_account_checks(self) -> None:
        call, self._account_check = self._account_check, None
        if call is not None and call.active():
            call.cancel()

    def _check_accounts(self) -> None:
        """Log out online users disabled meanwhile (by ``imkit user disable`` on the store)."""
        self._account_check = None
        if not self._online:
            return
        self._start_account_checks()
        d = self.store.disabled_users()
        d.addCallback(self._end_disabled)
        d.addErrback(lambda failure: self.log.failure("could not look for disabled users", failure))

    def _end_disabled(self, disabled: list[str]) -> None:
        for user in disabled:
            if user in self._online:
                self.end_sessions(user, None, "this account is disabled")

    # Sending -----------------------------------------------------------------------------------

    def _submit(self, conn: ServerConnection, packet: packets.Send | packets.Bundle) -> None:
        sender = conn.user
        assert sender is not None
        if self._refusals:
            refusal = self._refusals.get((sender, conn.device, packet.client_msg_id))
            if refusal is not None:
                # A resend of something refused: the client has told its application "refused",
                # so the answer stays the same even if the rules would now let it through.
                self._hand_over(conn)
                conn.ack(refusal)
                return
        target_type = packet.target_type
        if type(packet) is packets.Send:
            items: tuple[Item, ...] = (_new_item(packet.content_type, packet.body),)
            simple = len(packet.body) <= self.settings.max_body
        else:
            items = packet.items
            simple = False
        if not simple:
            problem = self._check_size(items)
            if problem is not None:
                self._refuse(conn, packet.client_msg_id, ErrorCode.TOO_LARGE, problem)
                return
        if target_type == schema.TARGET_USER:
            # The common case, a message to someone written to before: no work at all.
            route = self._routes.get((sender, packet.target))
            if route is None:
                target = packet.target
                if not valid_name(target):
                    self.limits.missed(conn, target, "user")
                    self._refuse(conn, packet.client_msg_id, ErrorCode.UNKNOWN_RECIPIENT, f"no user named {target!r}")
                    return
                route = (direct_conversation(sender, target), _pair(sender, target))
                if len(self._routes) >= _MAX_ROUTES:
                    self._routes.clear()
                self._routes[(sender, target)] = route
            conversation, members = route
        elif target_type == schema.TARGET_CONVERSATION:
            conversation = packet.target
            pair = direct_members(conversation)
            if pair is not None:
                if sender not in pair:
                    self.limits.missed(conn, conversation)
                    self._refuse(conn, packet.client_msg_id, ErrorCode.NOT_A_MEMBER, "you are not a member of that conversation")
                    return
                members = _pair(*pair)
            elif is_group(conversation):
                if items[0].content_type == schema.GROUP_CREATE:
                    # Only TARGET_NEW_GROUP creates: a name the client chose would tell a
                    # non-member whether that group exists (created, or refused).
                    reason = "a group is created by the first item sent to a new group"
                    self._refuse(conn, packet.client_msg_id, ErrorCode.INVALID_OPERATION, reason)
                    return
                members = ()
            else:
                self._refuse(conn, packet.client_msg_id, ErrorCode.INVALID_TARGET, f"{conversation!r} is not a conversation id")
                return
        elif target_type == schema.TARGET_NEW_GROUP:
            if packet.target:
                self._refuse(conn, packet.client_msg_id, ErrorCode.INVALID_TARGET, "a new group's target is empty: the server names it")
                return
            # A resend gets a fresh name here, but the store answers it with the original group.
            conversation, members = "g:" + secrets.token_urlsafe(12), ()
        else:
            self._refuse(conn, packet.client_msg_id, ErrorCode.INVALID_TARGET, f"unknown target type {target_type}")
            return
        limited = self.limits.send(conn, packet.client_msg_id, conversation)
        if limited is not None:
            # Not stored, not failed: sent again from retry_at (server time, ms), waiting_for first.
            retry_at, waiting_for = limited
            self._hand_over(conn)
            conn.ack(packets.SendAck(packet.client_msg_id, int(ErrorCode.RATE_LIMITED), waiting_for, 0, retry_at, 0, "", "rate limited"))
            return
        submission = _new_submission(
            sender, conn.device, packet.client_msg_id, conversation, members, int(self.clock.seconds() * 1000), items  # type: ignore[arg-type]
        )
        key = (sender, conn.device)
        waiting = self._in_order.get(key) if self._in_order else None
        if waiting is None and not self.checks and not self.content:
            if self._gathering_for is conn:
                self._gathering.append(submission)  # type: ignore[union-attr]
            else:
                self._append(conn, submission)
            return
        # Checks may take a while: this device's later sends wait behind them, so the store still
        # gets every device's sends in the order the device sent them.
        if waiting is None:
            waiting = self._in_order[key] = deque()
            waiting.append((conn, submission))
            self._later(conn, self._drain(key, waiting))
        else:
            waiting.append((conn, submission))

    async def _drain(self, key: tuple[str, str], waiting: deque) -> None:
        try:
            while waiting:
                conn, submission = waiting[0]
                try:
                    flags = await self._run_checks(submission)
                except Rejected as error:
                    self._refuse(conn, submission.client_msg_id, error.code, error.reason)
                else:
                    self._append(conn, submission, flags)
                waiting.popleft()
        finally:
            if self._in_order.get(key) is waiting:
                del self._in_order[key]

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

    def _refuse(self, conn: ServerConnection, cmid: int, code: ErrorCode, reason: str) -> None:
        self._hand_over(conn)
        refusal = packets.SendAck(cmid, int(code), 0, 0, 0, 0, "", reason)
        refusals = self._refusals
        refusals[(conn.user, conn.device, cmid)] = refusal  # type: ignore[index]
        if len(refusals) > _MAX_REFUSALS:
            refusals.popitem(last=False)
        conn.ack(refusal)

    def _append(self, conn: ServerConnection, submission: Submission, flags: tuple = ()) -> None:
        if flags:
            # Stored with their marks in one transaction, then reported.
            d = self.store.append(submission, self.policy, flags)
            d.addCallback(self.content.stored, submission, flags)
        else:
            d = self.store.append(submission, self.policy)
        d.addCallbacks(self._stored, self._not_stored, (conn,), None, (conn, submission))

    def _append_gathered(self, conn: ServerConnection, submissions: list[Submission]) -> None:
        d = self.store.append_many(submissions, self.policy)
        d.addCallbacks(self._stored_many, self._failed, (conn, submissions), None, (conn,))

    def _stored_many(self, outcomes: list[Any], conn: ServerConnection, submissions: list[Submission]) -> None:
        failed = None
        stored: list[Appended] = []
        for outcome, submission in zip(outcomes, submissions):
            if type(outcome) is Appended:
                _ack_stored(conn, outcome.messages)
                if not outcome.duplicate:
                    stored.append(outcome)  # fanned out even after a failure: the others get it
            elif isinstance(outcome, (Refused, Rejected)):
                self._refused(conn, submission, outcome)
            elif failed is None:
                failed = outcome
        # Consecutive single messages of one conversation go to each recipient in one call.
        for _, run in groupby(stored, _fan_out_key):
            appended = next(run)
            rest = list(run)
            if rest:
                self._fan_out_run([appended.messages[0]] + [other.messages[0] for other in rest], appended.audience, conn)
            else:
                self.fan_out(appended.messages, appended.audience, conn)
        if failed is not None:
            self._failed(Failure(failed), conn)

    def _fan_out_run(self, run: list[Message], members: Iterable[str], origin: ServerConnection) -> None:
        """fan_out for consecutive single messages of one conversation with one audience."""
        members = tuple(members)
        if self._fan_outs or len(members) > self.settings.fan_out_slice:
            for message in run:
                self.fan_out((message,), members, origin)
            return
        conversation = run[0].conversation
        seqs = [message.seq for message in run]
        frames = [_encode_deliver(packets.Deliver(message)) for message in run]
        for device in self._recipients(members, origin):
            device.deliver_frames(conversation, seqs, frames)

    async def _run_checks(self, submission: Submission) -> tuple:
        """Raise Rejected, or return the content pipeline's flags for the store."""
        for item in submission.items:
            for check in self.checks:
                result = check(submission.sender, submission.sender_device, submission.conversation, item)
                if isinstance(result, defer.Deferred):
                    await result
        if self.content:
            return await self.content.check(submission)
        return ()

    def _start_sync(self, conn: ServerConnection, request: packets.Sync) -> None:
        self.write_cursors()  # a sync from the server's cursors reads them after what came before
        self._later(conn, self._sync(conn, request))

    def _not_stored(self, failure: Any, conn: ServerConnection, submission: Submission) -> None:
        if failure.check(Refused, Rejected):
            self._refused(conn, submission, failure.value)
        else:
            self._failed(failure, conn)

    def _refused(self, conn: ServerConnection, submission: Submission, error: Refused | Rejected) -> None:
        """Answer a refusal; one as to an unknown user or a conversation not theirs counts as a probe."""
        if isinstance(error, Refused) and error.code in (ErrorCode.UNKNOWN_RECIPIENT, ErrorCode.NOT_A_MEMBER):
            self.limits.missed(conn, submission.conversation)
        self._refuse(conn, submission.client_msg_id, error.code, error.reason)

    def _stored(self, appended: Appended, conn: ServerConnection) -> None:
        _ack_stored(conn, appended.messages)
        if not appended.duplicate:
            self.fan_out(appended.messages, appended.audience, conn)

    def fan_out(self, messages: tuple[Message, ...], members: Iterable[str], origin: ServerConnection | None = None) -> None:
        """
        Push stored messages to every online device of every member but the one that sent them.

        The frame is encoded once for everybody.  A large group is served ``fan_out_slice``
        members per reactor turn, and while such a fan-out is under way later ones queue behind
        it, so no member ever gets a conversation's messages out of order.
        """
        members = tuple(members)
        last = messages[-1]
        if len(messages) == 1:
            frame = _encode_deliver(packets.Deliver(last))
        else:
            frame = codec.encode(packets.DeliverBundle(messages))
        if self._fan_outs or len(members) > self.settings.fan_out_slice:
            self._fan_outs.append(_FanOut(last.conversation, last.seq, frame, members, origin))
            if self._fan_out_call is None:
                self._fan_out_call = self.clock.callLater(0, self._continue_fan_outs)
            return
        self._push(last.conversation, last.seq, frame, members, origin)

    def _push(self, conversation: str, seq: int, frame: bytes, members: Iterable[str], origin: ServerConnection | None) -> None:
        for conn in self._recipients(members, origin):
            conn.deliver_frame(conversation, seq, frame)

    def _recipients(self, members: Iterable[str], origin: ServerConnection | None) -> Iterable[ServerConnection]:
        """Every logged-in device of ``members`` but ``origin``."""
        online = self._online
        for member in members:
            devices = online.get(member)
            if devices:
                for conn in devices:
                    if conn is not origin and conn.state == READY:
                        yield conn

    def _continue_fan_outs(self) -> None:
        """One slice of the oldest queued fan-out per call, then yield the reactor."""
        self._fan_out_call = None
        if not self._fan_outs:
            return
        work = self._fan_outs[0]
        size = self.settings.fan_out_slice
        self._push(work.conversation, work.seq, work.frame, work.members[work.done : work.done + size], work.origin)
        work.done += size
        if work.done >= len(work.members):
            self._fan_outs.popleft()
        if self._fan_outs:
            self._fan_out_call = self.clock.callLater(0, self._continue_fan_outs)

    # Acks, sync, heads -------------------------------------------------------------------------

    def _record_cursor(self, conn: ServerConnection, conversation: str, seq: int) -> None:
        ackable = self._ackable.get(conn)
        if ackable is not None and conversation in ackable:
            key = (conn.user, conn.device, conversation)  # type: ignore[arg-type]
            updates = self._cursor_updates
            if seq > updates.get(key, -1):
                updates[key] = seq
            if self._cursor_flush is None:
                self._cursor_flush = self.clock.callLater(0, self.write_cursors)
        else:
            # The first ack of a conversation on this connection: is it one the user may see?
            # (Otherwise anyone could fill the store with cursors for made-up conversations.)
            d = self.track(defer.ensureDeferred(self._first_ack(conn, conversation, seq)))
            d.addErrback(lambda failure: self.log.failure("could not record a delivery cursor", failure))

    def write_cursors(self) -> None:
        """Write the delivery cursors gathered so far (normally at the end of the reactor turn)."""
        call, self._cursor_flush = self._cursor_flush, None
        if call is not None and call.active():
            call.cancel()
        updates, self._cursor_updates = self._cursor_updates, {}
        if updates:
            d = self.store.set_cursors([(*key, seq) for key, seq in updates.items()])
            d.addErrback(lambda failure: self.log.failure("could not record delivery cursors", failure))

    async def _first_ack(self, conn: ServerConnection, conversation: str, seq: int) -> None:
        span = await self.store.visibility(conversation, conn.user)
        if span is None:
            self.limits.missed(conn, conversation)  # counted (and logged) as a probe, ignored
            return
        self._ackable.setdefault(conn, set()).add(conversation)
        await self.store.set_cursor(conn.user, conn.device, conversation, seq)

    async def _sync(self, conn: ServerConnection, request: packets.Sync) -> None:
        user, device = conn.user, conn.device
        store = self.store
        limit = min(request.limit or self.settings.sync_page, self.settings.sync_page)
        given = {cursor.conversation: cursor.seq for cursor in request.cursors}
        if request.flags & schema.SYNC_ONLY_LISTED:
            spans = {}
            for conversation in given:
                span = await store.visibility(conversation, user)
                if span is not None:
                    spans[conversation] = span
                else:
                    self.log.warn("{user} asked to sync {conversation!r}, not theirs", user=user, conversation=conversation)
                    self.limits.missed(conn, conversation)
            starts = {conversation: given[conversation] for conversation in spans}
        else:
            spans = await store.visible(user)
            server = await store.cursors(user, device) if request.flags & schema.SYNC_SERVER_CURSORS else {}
            depth = self.settings.new_device_history
            starts = {}
            for conversation, (floor, upto) in spans.items():
                start = given.get(conversation, server.get(conversation))
                if start is None:
                    # A device we have never seen starts with recent history only, if so configured.
                    start = 0 if depth is None or not request.flags & schema.SYNC_SERVER_CURSORS or server else max(upto - depth, 0)
                starts[conversation] = start
        ranges = []
        messages: list[Message] = []
        budget = self.settings.max_frame // 2
        more = False
        for conversation in sorted(spans):
            floor, upto = spans[conversation]
            # Below the floor is gone (pruned, or before this member could see it): the range
            # starts above it, and the client reports the hole instead of waiting for it.
            wanted = min(starts[conversation], upto)
            start = min(max(wanted, floor), upto)
            ranges.append(packets.Range(conversation, start, upto, wanted))
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
                if message.seq > span.head_seq:
                    break  # a former member sees nothing after the event that removed them
                cost = len(message.body) + len(message.content_type) + len(message.conversation) + _PER_MESSAGE_OVERHEAD
                if budget < cost and messages and not messages[-1].bundle_remaining:
                    break  # page full; a bundle is never cut, so this is a bundle boundary
                budget -= cost
                messages.append(message)
                taken += 1
            if taken < len(page) and page[taken].seq <= span.head_seq or (page and page[-1].seq < span.head_seq):
                more = True
                break
        if conn.state == READY:
            conn.send_packet(packets.SyncResult(request.request_id, more, tuple(ranges), tuple(messages)))

    def prune(self) -> defer.Deferred:
        """Apply retention now. Deferred[dict]: the new floor of every conversation that was pruned."""
        d = self.store.prune(int(self.clock.seconds() * 1000), self.settings.retention)

        def pruned(floors: dict[str, int]) -> dict[str, int]:
            if floors:
                self.log.info("retention pruned {count} conversations", count=len(floors))
            return floors

        return d.addCallback(pruned)

    async def _send_heads(self, conn: ServerConnection, conversations: tuple[str, ...]) -> None:
        heads = []
        for conversation in conversations:
            span = await self.store.visibility(conversation, conn.user)
            if span is not None:
                heads.append(packets.Cursor(conversation, span[1]))
        conn.announce_heads(tuple(heads))


@attrs.define
class _FanOut:
    """A large group's message on its way out, ``done`` members at a time."""

    conversation: str
    seq: int
    frame: bytes
    members: tuple[str, ...]
    origin: ServerConnection | None
    done: int = 0


def _digest(token: bytes) -> str:
    """What the store keeps of a resume token: enough to recognise it, useless to a thief of the database."""
    return hashlib.sha256(token).hexdigest()


# Built once or more per message (see imkit.slots).
_new_item = slots.builder(Item)
_new_submission = slots.builder(Submission)
_new_send_ack = slots.builder(packets.SendAck)


def _ack_stored(conn: ServerConnection, messages: tuple[Message, ...]) -> None:
    first = messages[0]
    conn.ack(_new_send_ack(first.client_msg_id, 0, first.server_id, first.seq, first.sent_at, len(messages), first.conversation, ""))


def _fan_out_key(appended: Appended) -> Any:
    """Stored single messages of one conversation and audience share a key; a bundle has its own."""
    messages = appended.messages
    return (messages[0].conversation, appended.audience) if len(messages) == 1 else (id(appended),)


def _pair(a: str, b: str) -> tuple[str, ...]:
    return (a,) if a == b else tuple(sorted((a, b)))
