"""
``IMClient``: one user's device, as a Twisted service that stays connected.

It keeps one ``ClientCore`` for its whole life and lets ``ClientService`` replace the connection
under it, with jittered exponential backoff.  ``ClientService``'s ``prepareConnection`` waits for
the login, so a connection counts as made only once it can carry messages.  Application calls
(``send``) go to the core at any time; whatever is unacknowledged is sent again, in order, after
the next login.  Each Deferred the application holds is answered by a core event.

Conversations (contacts, groups, recall, edit, retention) are operations: message items the
server applies as well as stores, so they are sent, acknowledged and resent like any message and
every member sees them in the conversation's order.  Read marks, typing, presence and queries
are not: they go out at once or not at all (see ``imkit.client.conversations.Queries``).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from imkit import operations
from imkit.client.conversations import (
    PRESENCE_STATUSES,
    GroupInfo,
    Member,
    PresenceNotice,
    Queries,
    ReadState,
    ReceiptNotice,
    TypingNotice,
    notice,
    parse_contacts,
    parse_groups,
    parse_members,
    parse_read_state,
)
from imkit.client.handoff import Handoff, MessageCallback, MessageStream
from imkit.client.protocol import IMClientFactory, IMClientProtocol
from imkit.client.results import (
    ClientStopped,
    ConnectionLost,
    IMClientError,
    LoginFailed,
    Receipt,
    SendRejected,
    SendTimeout,
    error_code,
)
from imkit.client.state import StateFile
from imkit.client.timer import DeadlineTimer
from imkit.extensions import PacketType
from imkit.model import Item, Message
from imkit.session import events
from imkit.session.client import ClientCore
from imkit.session.settings import ClientSettings
from imkit.wire import packets, schema
from imkit.wire.errors import DecodeError, ErrorCode
from imkit.wire.schema import TARGET_CONVERSATION, TARGET_NEW_GROUP, TARGET_USER

TEXT = "text/plain; charset=utf-8"

RECONNECT_INITIAL = 1.0
"""Seconds before the first reconnection attempt; doubled per failure up to RECONNECT_MAX."""
RECONNECT_MAX = 60.0
RECONNECT_JITTER = 0.5
"""Each delay is stretched by up to this fraction, so clients dropped together do not return together."""

TRANSIENT_LOGIN_CODES = frozenset(
    {ErrorCode.IDLE_TIMEOUT, ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL_ERROR, ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.RATE_LIMITED}
)
"""Login refusals that say "not now" rather than "not you": the client tries again later."""


class _Waiters:
    """Deferreds waiting for the next occurrence of something (a login, a catch-up)."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(waiter)
        return waiter

    def fire(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def fail(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(Failure(error))


class IMClient(Service):
    """
    A user's device connected to an imkit server: send messages, receive them in order, once.

    ``endpoint`` is any client endpoint (``imkit.client.tls_endpoint`` builds the usual one).
    ``state_path`` names a file where the positions the application has taken are kept across
    restarts; without it, the server's per-device cursors decide where a restarted client resumes
    (and messages handed to the application just before a crash may be skipped).
    ``password`` None logs in with the TLS client certificate of ``endpoint`` instead
    (``tls_endpoint(..., client_cert=, client_key=)``; the certificate's common name must be ``user``).
    ``e2ee`` turns on end-to-end encryption (docs/e2ee.rst): the path of this device's key file,
    an ``imkit.client.e2ee.E2EEOptions``, or True (keys in memory only); ``client.e2ee`` is then
    the device's ``DeviceCrypto``.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        user: str,
        password: str | None,
        device: str = "default",
        *,
        settings: ClientSettings = ClientSettings(),
        state_path: str | None = None,
        reactor: Any = None,
        rng: random.Random | None = None,
        e2ee: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.user = user
        self.device = device
        self.settings = settings
        self._reactor = reactor
        # Client message ids need to be unique, not secret: a generator seeded once from the OS
        # costs far less per message than asking the OS every time.
        self._rng = rng if rng is not None else random.Random(random.SystemRandom().getrandbits(128))
        self._core = ClientCore(
            reactor, user, password, device, settings, delivered={} if state_path is not None else None, rng=self._rng
        )
        self._positions: dict[str, int] = {}
        self._state = StateFile(state_path, user, reactor, self._positions.copy) if state_path is not None else None
        self._state_loaded = self._state is None
        self._handoff = Handoff(self._taken)
        self._sends: dict[int, Deferred[Receipt]] = {}
        self._login_waiters = _Waiters()
        self._caught_up_waiters = _Waiters()
        self._protocol: IMClientProtocol | None = None
        self._logged_in = False
        self._login_settled = True
        self._prepare_waiters: list[Deferred[None]] = []
        self._sessions_without_login = 0
        self._failure: IMClientError | None = None
        self._stopped = False
        self._offline_timer = DeadlineTimer(reactor, self._core.next_deadline, self._offline_deadline)
        self._queries = Queries(self._core, reactor, settings.request_timeout, self._core_changed)
        self._receipt_callbacks: list[Callable[[ReceiptNotice], Any]] = []
        self._typing_callbacks: list[Callable[[TypingNotice], Any]] = []
        self._presence_callbacks: list[Callable[[PresenceNotice], Any]] = []
        self._history_callbacks: list[Callable[[str, int, int], Any]] = []
        self._presence: packets.Presence | None = None
        self._connector = ClientService(
            endpoint,
            IMClientFactory(self._core, reactor, self),
            retryPolicy=self._reconnect_delay,
            clock=reactor,
            prepareConnection=self._prepare_connection,
        )
        self.e2ee: Any = None
        """End-to-end encryption (``imkit.client.e2ee.DeviceCrypto``), or None."""
        if e2ee:
            from imkit.client.e2ee import DeviceCrypto

            self.e2ee = DeviceCrypto(self, e2ee)

    # Service -----------------------------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        super().startService()
        self._stopped = False
        self._failure = None
        self._handoff.reopen()
        if self._state is not None and not self._state_loaded:
            self._state.load().addCallbacks(self._state_read, self._state_unreadable)
        else:
            self._connector.startService()
        if self._protocol is None:
            self._offline_timer.arm()  # sends queued before the start keep their timeout

    def _state_read(self, positions: dict[str, int]) -> None:
        self._state_loaded = True
        self._positions.update(positions)
        # Nothing has been received yet, so the core's positions are still the empty ones we gave it.
        self._core.inbound.delivered.update(positions)
        self.log.info("resuming {user} from {count} saved conversation positions", user=self.user, count=len(positions))
        if self.running:
            self._connector.startService()

    def _state_unreadable(self, failure: Failure) -> None:
        error = failure.value if isinstance(failure.value, IMClientError) else IMClientError(failure.getErrorMessage())
        self._give_up(error)

    def stopService(self) -> Deferred[None]:
        """Say goodbye, stop reconnecting, fail what is still pending, and save the positions."""
        super().stopService()
        self._stopped = True
        self._handoff.close()
        protocol = self._protocol
        if protocol is not None and self._logged_in:
            protocol.say_goodbye()
        self._settle_login()
        self._offline_timer.cancel()
        self._fail_pending(ClientStopped())
        stopped = self._connector.stopService()
        stopped.addCallback(lambda _: self._save_finally())
        return stopped

    def _save_finally(self) -> Deferred[None] | None:
        if self._state is None or not self._state_loaded:
            return None
        self._state.changed()
        return self._state.flush()

    # Waiting for the session -------------------------------------------------------------------

    @property
    def logged_in(self) -> bool:
        return self._logged_in

    def loggedIn(self) -> Deferred[None]:
        """Fires once logged in (at once if logged in now); fails with LoginFailed if refused."""
        if self._failure is not None:
            return fail(self._failure)
        if self._stopped:
            return fail(ClientStopped())
        if self._logged_in:
            return succeed(None)
        return self._login_waiters.wait()

    def caughtUp(self) -> Deferred[None]:
        """Fires once the sync after the (next) login has delivered everything stored before it."""
        if self._failure is not None:
            return fail(self._failure)
        if self._stopped:
            return fail(ClientStopped())
        if self._logged_in and self._core.caught_up:
            return succeed(None)
        return self._caught_up_waiters.wait()

    # Sending -----------------------------------------------------------------------------------

    def send(
        self,
        to: str | None = None,
        body: bytes | str = b"",
        *,
        conversation: str | None = None,
        group: str | None = None,
        content_type: str = TEXT,
    ) -> Deferred[Receipt]:
        """
        Send one message to a user (``to``) or a conversation (``group=`` is the same as
        ``conversation=``, for readability); Deferred[Receipt].

        It fails with SendRejected or SendTimeout; cancelling it stops the resending (the server
        may have stored it already).  While disconnected, sends wait and go out after the login,
        in order.
        """
        target_type, target = _target(to, conversation, group)
        if self.e2ee is not None:
            return self.e2ee.send(target_type, target, (Item(content_type, _bytes(body)),))
        return self._submit(lambda: self._core.send(target_type, target, content_type, _bytes(body)))

    def send_bundle(
        self,
        items: Iterable[Item | tuple[str, bytes | str]],
        to: str | None = None,
        conversation: str | None = None,
        *,
        group: str | None = None,
    ) -> Deferred[Receipt]:
        """Send messages that are stored together or not at all, and delivered together; Deferred[Receipt]."""
        target_type, target = _target(to, conversation, group)
        bundle = tuple(item if isinstance(item, Item) else Item(item[0], _bytes(item[1])) for item in items)
        if not bundle:
            raise ValueError("a bundle needs at least one item")
        if self.e2ee is not None:
            return self.e2ee.send(target_type, target, bundle)
        return self._submit(lambda: self._core.send_bundle(target_type, target, bundle))

    def send_packet(
        self,
        packet_type: PacketType,
        value: Any,
        to: str | None = None,
        *,
        conversation: str | None = None,
        group: str | None = None,
    ) -> Deferred[Receipt]:
        """
        Send a custom packet (``imkit.extensions.PacketType``): ``value`` is a ``packet_type.make(...)``
        value or a dict of its fields.  It travels, and is acknowledged, like any message.
        """
        return self.send(
            to, packet_type.encode(value), conversation=conversation, group=group, content_type=packet_type.content_type
        )

    # Contacts ----------------------------------------------------------------------------------
    #
    # Each is an operation sent to the direct conversation with ``user``: Deferred[Receipt], and
    # both users see it there, in order with their messages.

    def add_contact(self, user: str) -> Deferred[Receipt]:
        """Make ``user`` one of our contacts (refused with NOT_ALLOWED if they have blocked us)."""
        return self._operation(operations.contact_add(), to=user)

    def remove_contact(self, user: str, goodbye: bytes | str | None = None) -> Deferred[Receipt]:
        """
        Remove ``user`` from our contacts.  With ``goodbye``, a last text message and the removal
        are one atomic bundle: ``user`` gets the goodbye, then the removal, or neither.
        """
        if goodbye is None:
            return self._operation(operations.contact_remove(), to=user)
        return self.send_bundle([Item(TEXT, _bytes(goodbye)), operations.contact_remove()], to=user)

    def block(self, user: str) -> Deferred[Receipt]:
        """Nothing but ``unblock`` passes between us and ``user`` from now on."""
        return self._operation(operations.contact_block(), to=user)

    def unblock(self, user: str) -> Deferred[Receipt]:
        return self._operation(operations.contact_unblock(), to=user)

    def contacts(self) -> Deferred[dict[str, str]]:
        """Deferred[dict]: every user we have a relation with -> "contact" or "blocked" (a query)."""
        return self._query(lambda rid: packets.Query(rid, schema.QUERY_CONTACTS, ""), packets.QueryResult, parse_contacts)

    # Groups ------------------------------------------------------------------------------------

    def create_group(self, title: str, members: Iterable[str] = ()) -> Deferred[str]:
        """
        Create a group with us as its owner and ``members`` in it; Deferred[str]: the group's
        conversation id (for ``send(group=...)``).  It is a send like any other: queued while
        disconnected, resent until acknowledged, never created twice.
        """
        item = operations.group_create(title, _users(members))
        created = self._submit(lambda: self._core.send(TARGET_NEW_GROUP, "", item.content_type, item.body))
        return created.addCallback(lambda receipt: receipt.conversation)

    def add_members(self, group: str, users: Iterable[str]) -> Deferred[Receipt]:
        """Add users to a group (any member may); those already in are skipped."""
        return self._operation(operations.group_add(_users(users)), conversation=group)

    def remove_members(self, group: str, users: Iterable[str]) -> Deferred[Receipt]:
        """Remove members from a group (only its owner may); they get this event and nothing after it."""
        return self._operation(operations.group_remove(_users(users)), conversation=group)

    def leave_group(self, group: str) -> Deferred[Receipt]:
        """Leave a group; if we owned it, its longest-standing member becomes the owner."""
        return self._operation(operations.group_leave(), conversation=group)

    def members(self, group: str) -> Deferred[list[Member]]:
        """Deferred[list[Member]]: the group's current members, by name; QueryFailed if we are not one."""
        return self._query(lambda rid: packets.Query(rid, schema.QUERY_MEMBERS, group), packets.QueryResult, parse_members)

    def groups(self) -> Deferred[list[GroupInfo]]:
        """Deferred[list[GroupInfo]]: the groups we belong to."""
        return self._query(lambda rid: packets.Query(rid, schema.QUERY_GROUPS, ""), packets.QueryResult, parse_groups)

    # Changing what was said --------------------------------------------------------------------

    def recall(self, conversation: str, seq: int) -> Deferred[Receipt]:
        """Unsend our message ``seq`` (within the server's recall window): its stored body is erased."""
        return self._operation(operations.recall(seq), conversation=conversation)

    def edit(self, conversation: str, seq: int, body: bytes | str, content_type: str = TEXT) -> Deferred[Receipt]:
        """Replace our message ``seq`` (within the server's edit window); devices show the newest edit."""
        if self.e2ee is not None:
            return self.e2ee.send(TARGET_CONVERSATION, conversation, (Item(content_type, _bytes(body)),), edit_of=seq)
        return self._operation(operations.edit(seq, content_type, _bytes(body)), conversation=conversation)

    def set_retention(self, conversation: str, seconds: int) -> Deferred[Receipt]:
        """Prune the conversation's messages ``seconds`` after they were sent (0: the server's default)."""
        return self._operation(operations.retention(seconds), conversation=conversation)

    def _operation(self, item: Item, to: str | None = None, conversation: str | None = None) -> Deferred[Receipt]:
        target_type, target = _target(to, conversation, None)
        return self._submit(lambda: self._core.send(target_type, target, item.content_type, item.body))

    # Reading, typing, presence -----------------------------------------------------------------
    #
    # Ephemeral: written now if logged in (True), dropped otherwise (False), never queued.

    def mark_read(self, conversation: str, seq: int) -> bool:
        """
        Tell the server the user has seen ``conversation`` up to ``seq``: the other members (in
        small conversations) and our other devices get an ``on_receipt`` notice.
        """
        return self._request(packets.Read(seq, conversation))

    def read_state(self, conversation: str, seqs: Iterable[int] = ()) -> Deferred[ReadState]:
        """Deferred[ReadState]: how many have read each of ``seqs`` (up to 256), and who read how far."""
        asked = tuple(seqs)
        return self._query(
            lambda rid: packets.ReceiptsQuery(rid, conversation, asked), packets.ReceiptsResult, parse_read_state
        )

    def typing(self, conversation: str, active: bool = True) -> bool:
        """Show (or stop showing) the other members that the user is typing."""
        return self._request(packets.Typing(active, conversation))

    def set_presence(self, status: str, text: str = "") -> bool:
        """
        Tell mutual contacts the user is "online", "away", "busy" or "invisible" (shown as
        "offline"), with an optional ``text``.  The client remembers it and says it again after
        every login (contacts may see "online" for a moment first); True if it went out now.
        """
        code = PRESENCE_STATUSES.get(status)
        if code is None:
            raise ValueError(f"presence status must be one of {', '.join(PRESENCE_STATUSES)}, not {status!r}")
        self._presence = packets.Presence(code, text)
        return self._request(self._presence)

    def _request(self, packet: Any) -> bool:
        if self._stopped or not self._logged_in or not self._core.request(packet):
            return False
        self._core_changed()
        return True

    def _query(self, make: Callable[[int], Any], answer_type: type, parse: Callable[[Any], Any]) -> Deferred[Any]:
        """
        Queries are answered by the server now or never: they fail with ConnectionLost when not
        logged in, QueryTimeout after ``settings.request_timeout``, and are never resent.
        """
        if self._failure is not None:
            return fail(self._failure)
        if self._stopped:
            return fail(ClientStopped("the client is stopped; start it before asking"))
        if not self._logged_in:
            return fail(ConnectionLost("not connected to the server; wait for loggedIn() and ask again"))
        return self._queries.ask(make, answer_type, parse)

    def _submit(self, queue: Any, in_order: bool = True) -> Deferred[Receipt]:
        if self._failure is not None:
            return fail(self._failure)
        if self._stopped:
            return fail(ClientStopped("the client is stopped; start it before sending"))
        if in_order and self.e2ee is not None and self.e2ee.sending:
            return self.e2ee.in_order(queue)  # behind the sends still being encrypted
        client_msg_id = queue()
        sent: Deferred[Receipt] = Deferred(lambda _: self._cancel_send(client_msg_id))
        self._sends[client_msg_id] = sent
        self._core_changed()
        return sent

    def _cancel_send(self, client_msg_id: int) -> None:
        self._sends.pop(client_msg_id, None)
        self._core.cancel(client_msg_id)
        if self._protocol is None:
            self._offline_timer.arm()

    def _core_changed(self) -> None:
        """The application gave the core work: write it out, and keep its deadlines covered."""
        if self._protocol is not None:
            self._protocol.output_ready()
        elif not self._stopped:
            self._offline_timer.arm()

    def _fail_pending(self, error: IMClientError) -> None:
        if self.e2ee is not None:
            self.e2ee.fail_pending(error)
        sends, self._sends = self._sends, {}
        for client_msg_id, sent in sends.items():
            self._core.cancel(client_msg_id)
            sent.errback(Failure(error))
        self._queries.fail_all(error)
        self._login_waiters.fail(error)
        self._caught_up_waiters.fail(error)

    # Receiving ---------------------------------------------------------------------------------

    def on_message(self, callback: MessageCallback) -> None:
        """Call ``callback(message)`` for every delivered message, in order, each exactly once."""
        self._handoff.add_callback(callback)

    def on_packet(self, packet_type: PacketType, callback: Callable[[Message, Any], Any]) -> None:
        """
        Call ``callback(message, value)`` for every delivered packet of ``packet_type``, in order
        with the other messages; one whose body does not decode is logged and skipped.
        """

        def decode_and_call(message: Message) -> None:
            if message.content_type != packet_type.content_type:
                return
            try:
                value = packet_type.decode(message.body)
            except DecodeError as error:
                self.log.warn(
                    "skipping a malformed {name} packet {conversation}#{seq}: {error}",
                    name=packet_type.name, conversation=message.conversation, seq=message.seq, error=error.reason,
                )
                return
            callback(message, value)

        self._handoff.add_callback(decode_and_call)

    def remove_message_callback(self, callback: MessageCallback) -> None:
        self._handoff.remove_callback(callback)

    def on_receipt(self, callback: Callable[[ReceiptNotice], Any]) -> None:
        """Call ``callback(ReceiptNotice)`` when a member, or another device of ours, marks a conversation read."""
        self._receipt_callbacks.append(callback)

    def on_typing(self, callback: Callable[[TypingNotice], Any]) -> None:
        """Call ``callback(TypingNotice)`` when another member starts or stops typing."""
        self._typing_callbacks.append(callback)

    def on_presence(self, callback: Callable[[PresenceNotice], Any]) -> None:
        """Call ``callback(PresenceNotice)`` when a mutual contact's presence changes (and for each one online at login)."""
        self._presence_callbacks.append(callback)

    def on_history_unavailable(self, callback: Callable[[str, int, int], Any]) -> None:
        """
        Call ``callback(conversation, after, upto)`` when messages ``after``+1..``upto`` of a
        conversation will never be delivered (pruned, or from before the user joined a group):
        the next message delivered there is ``upto``+1.
        """
        self._history_callbacks.append(callback)

    def _notify(self, callbacks: list[Callable[..., Any]], *args: Any) -> None:
        for callback in list(callbacks):
            try:
                callback(*args)
            except Exception:
                self.log.failure("callback {callback!r} failed", callback=callback)

    def messages(self) -> MessageStream:
        """An async iterator over the messages delivered from now on (``async for``)."""
        return self._handoff.stream()

    def _taken(self, message: Message) -> None:
        positions = self._positions
        if message.seq > positions.get(message.conversation, 0):
            positions[message.conversation] = message.seq
        if self._state is not None and self._state_loaded:
            self._state.changed()

    # Connections (called by IMClientProtocol) -------------------------------------------------

    def session_started(self, protocol: IMClientProtocol) -> None:
        self._protocol = protocol
        self._login_settled = False
        self._offline_timer.cancel()

    def _prepare_connection(self, _protocol: Any) -> Deferred[None] | None:
        """ClientService's hook: the connection is ready once the login is settled."""
        if self._login_settled:
            return None
        waiter: Deferred[None] = Deferred()
        self._prepare_waiters.append(waiter)
        return waiter

    def _settle_login(self) -> None:
        """
        The login succeeded, or the connection ended (or is ending) without one.  Either way
        ClientService must now see the connection as made: it cannot be told about a connection
        lost while its preparation is pending.
        """
        self._login_settled = True
        waiters, self._prepare_waiters = self._prepare_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def session_events(self, protocol: IMClientProtocol, found: list[Any]) -> None:
        for event in found:
            kind = type(event)
            if kind is events.MessagesDelivered:
                self._handoff.deliver(event.messages if self.e2ee is None else self.e2ee.decrypt(event.messages))
            elif kind is events.SendAcknowledged:
                sent = self._sends.pop(event.client_msg_id, None)
                if sent is not None:
                    sent.callback(Receipt.from_ack(event.ack))
            elif kind is events.SendRejected:
                sent = self._sends.pop(event.client_msg_id, None)
                if sent is not None:
                    sent.errback(Failure(SendRejected(event.client_msg_id, error_code(event.ack.status), event.ack.reason)))
            elif kind is events.SendExpired:
                self._expired(event)
            elif kind is events.NoticeReceived:
                self._on_notice(event.packet)
            elif kind is events.AnswerReceived:
                self._queries.answer(event.packet)
            elif kind is events.HistoryUnavailable:
                self._notify(self._history_callbacks, event.conversation, event.after, event.upto)
            elif kind is events.LoggedIn:
                self._on_logged_in()
            elif kind is events.CaughtUp:
                self._caught_up_waiters.fire()
            elif kind is events.LoginRejected:
                self._on_login_rejected(protocol, event)
            elif kind is events.ServerError:
                self.log.warn("server closed the session: {code} {reason}", code=error_code(event.code), reason=event.reason)
            elif kind is events.CloseConnection:
                pass  # the protocol drops the connection; session_ended follows

    def _on_notice(self, packet: Any) -> None:
        value = notice(packet)
        if type(value) is ReceiptNotice:
            self._notify(self._receipt_callbacks, value)
        elif type(value) is TypingNotice:
            self._notify(self._typing_callbacks, value)
        elif type(value) is PresenceNotice:
            self._notify(self._presence_callbacks, value)

    def _on_logged_in(self) -> None:
        self._logged_in = True
        self._sessions_without_login = 0
        self.log.info("logged in as {user} (device {device})", user=self.user, device=self.device)
        if self._presence is not None and self._presence != _DEFAULT_PRESENCE:
            # The server forgets a user's presence when their last device goes: say it again.
            self._core.request(self._presence)
        self._settle_login()
        self._login_waiters.fire()
        if self.e2ee is not None:
            self.e2ee.logged_in()

    def _on_login_rejected(self, protocol: IMClientProtocol, event: events.LoginRejected) -> None:
        code = error_code(event.code)
        if code in TRANSIENT_LOGIN_CODES:
            protocol.abort(f"login refused for now ({event.reason}); will try again")
            return
        self._give_up(LoginFailed(code, event.reason))

    def _give_up(self, error: IMClientError) -> None:
        """A failure retrying cannot fix (a wrong password): stop connecting, fail everything waiting."""
        self.log.error("{user} stops connecting: {error}", user=self.user, error=error)
        self._failure = error
        self._settle_login()
        self._offline_timer.cancel()
        self._connector.stopService()
        self._fail_pending(error)
        self._handoff.close(error)

    def _expired(self, event: events.SendExpired) -> None:
        sent = self._sends.pop(event.client_msg_id, None)
        if sent is not None:
            sent.errback(Failure(SendTimeout(event.client_msg_id, self.settings.send_timeout)))

    def session_ended(self, protocol: IMClientProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._logged_in:
            self.log.info("disconnected from the server: {reason}", reason=reason.getErrorMessage())
        else:
            self._sessions_without_login += 1
        self._logged_in = False
        self._queries.fail_all(ConnectionLost())
        self._settle_login()
        if not self._stopped and self._failure is None:
            self._offline_timer.arm()

    def _offline_deadline(self) -> None:
        """Sends keep their timeout while there is no connection to drive the core's timer."""
        self.session_events(None, self._core.handle_timer())  # type: ignore[arg-type]
        if self._protocol is None and not self._stopped:
            self._offline_timer.arm()

    def _reconnect_delay(self, failed_attempts: int) -> float:
        """
        Jittered exponential backoff.  ClientService counts connections that could not be made;
        we also count connections that ended before a login (a TLS or server problem), which it
        sees as made.
        """
        attempt = max(failed_attempts, self._sessions_without_login, 1)
        delay = min(RECONNECT_INITIAL * 2.0 ** min(attempt - 1, 32), RECONNECT_MAX)
        return delay * (1 + RECONNECT_JITTER * self._rng.random())


_DEFAULT_PRESENCE = packets.Presence(schema.PRESENCE_ONLINE, "")


def _target(to: str | None, conversation: str | None, group: str | None) -> tuple[int, str]:
    if group is not None:
        if conversation is not None:
            raise ValueError("group= is another name for conversation=: give one of them")
        conversation = group
    if (to is None) == (conversation is None):
        raise ValueError("name exactly one of to= (a user) or conversation= / group= (a conversation id)")
    if to is not None:
        return TARGET_USER, to
    assert conversation is not None
    return TARGET_CONVERSATION, conversation


def _users(users: Iterable[str]) -> tuple[str, ...]:
    if isinstance(users, str):
        raise TypeError(f"users must be a list of user names, not the string {users!r}")
    return tuple(users)


def _bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)
