"""
The server's Twisted adapter and hub over in-memory transports, driven by a ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from imkit.model import direct_conversation
from imkit.passwords import Passwords
from imkit.checks import Rejected
from imkit.server.hub import Hub
from imkit.server.protocol import IMServerFactory
from imkit.session.settings import ServerSettings
from imkit.store.memory import MemoryStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.framing import FrameReader


class CountingTransport(StringTransport):
    """Counts write calls, to prove writes are coalesced."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Peer:
    """One fake client: a transport, the protocol under test, and a frame reader for replies."""

    def __init__(self, factory: IMServerFactory) -> None:
        self.transport = CountingTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.reader = FrameReader(factory.settings.max_frame)

    def send(self, *frames: bytes) -> None:
        self.protocol.dataReceived(b"".join(frames))

    def received(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return [codec.decode_body(kind, body) for kind, _flags, body in self.reader.feed(data)]

    def received_frames(self) -> list[tuple[int, int]]:
        data = self.transport.value()
        self.transport.clear()
        return [(kind, flags) for kind, flags, _body in self.reader.feed(data)]

    def login(self, user: str, password: str, device: str = "phone") -> list:
        self.send(
            codec.encode(packets.Hello(1, 1, "test")),
            codec.encode(packets.Login(schema.LOGIN_PASSWORD, user, device, password.encode())),
        )
        return self.received()


class ServerProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        passwords = Passwords.fast_for_tests()
        for user in ("alice", "bob", "carol"):
            passwords.hash(f"{user}-secret").addCallback(lambda h, u=user: self.store.add_user(u, h))
        self.settings = ServerSettings(ack_timeout=5.0, ack_timeout_max=20.0, login_timeout=10.0, idle_timeout=60.0)
        self.hub = Hub(self.store, passwords, self.clock, self.settings)
        self.factory = IMServerFactory(self.hub, self.settings, self.clock)

    def peer(self) -> Peer:
        return Peer(self.factory)

    def logged_in(self, user: str, device: str = "phone") -> Peer:
        peer = self.peer()
        replies = peer.login(user, f"{user}-secret", device)
        self.assertIsInstance(replies[0], packets.HelloOk)
        self.assertEqual(replies[1].status, 0)
        return peer

    def test_handshake(self) -> None:
        """Hello is answered with the version and limits, a good login with status 0."""
        peer = self.peer()
        hello_ok, result = peer.login("alice", "alice-secret")
        self.assertEqual(hello_ok, packets.HelloOk(1, self.settings.max_frame, 30_000, "imkit"))
        self.assertEqual(result.status, 0)
        self.assertEqual(result.server_time, 1_700_000_000_000)

    def test_sends_of_one_read_are_stored_together_in_order(self) -> None:
        """One append_many a read: acks and deliveries in the order sent, refusals in their place."""
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        calls = []
        original = self.store.append_many
        self.patch(self.store, "append_many", lambda subs, policy: (calls.append(len(subs)), original(subs, policy))[1])
        alice.send(
            codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"one")),
            codec.encode(packets.Send(2, schema.TARGET_USER, "bob", "text/plain", b"two")),
            codec.encode(packets.Send(3, schema.TARGET_USER, "no body", "text/plain", b"?")),  # refused at once
            codec.encode(packets.Send(4, schema.TARGET_USER, "nobody", "text/plain", b"?")),  # refused by the store
            codec.encode(packets.Send(5, schema.TARGET_USER, "bob", "text/plain", b"three")),
        )
        self.assertEqual(calls, [2, 2], "a refusal at once hands over what came before it")
        unknown = ErrorCode.UNKNOWN_RECIPIENT
        self.assertEqual(
            [(a.client_msg_id, a.status, a.seq) for a in alice.received()], [(1, 0, 1), (2, 0, 2), (3, unknown, 0), (4, unknown, 0), (5, 0, 3)]
        )
        self.clock.advance(0)
        self.assertEqual([d.message.body for d in bob.received()], [b"one", b"two", b"three"])

    def test_a_store_failure_in_a_read_drops_the_sender_but_delivers_what_was_stored(self) -> None:
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        original = self.store.append_many

        def failing(subs: Any, policy: Any) -> Any:
            d = original(subs, policy)
            return d.addCallback(lambda outcomes: [RuntimeError("disk on fire") if i == 1 else o for i, o in enumerate(outcomes)])

        self.patch(self.store, "append_many", failing)
        alice.send(*(codec.encode(packets.Send(n, schema.TARGET_USER, "bob", "text/plain", b"%d" % n)) for n in (1, 2, 3)))
        replies = alice.received()
        self.assertEqual([type(r).__name__ for r in replies], ["SendAck", "SendAck", "Error"])
        self.assertEqual(replies[-1].code, ErrorCode.INTERNAL_ERROR)
        self.assertTrue(alice.transport.disconnecting)
        self.clock.advance(0)
        self.assertEqual([d.message.body for d in bob.received()], [b"1", b"3"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_delivery_cursors_of_one_turn_are_written_together(self) -> None:
        """After a conversation's first ack, acks are gathered and written at the end of the turn."""
        alice, bob, carol = self.logged_in("alice"), self.logged_in("bob"), self.logged_in("carol")
        for cmid, to in ((1, "bob"), (2, "carol"), (3, "bob"), (4, "carol")):
            alice.send(codec.encode(packets.Send(cmid, schema.TARGET_USER, to, "text/plain", b"hi")))
        bob.send(codec.encode(packets.DeliverAck("dm:alice:bob", 1)))  # the first: checked, then written
        carol.send(codec.encode(packets.DeliverAck("dm:alice:carol", 1)))
        calls = []
        original = self.store.set_cursors
        self.patch(self.store, "set_cursors", lambda cursors: (calls.append(list(cursors)), original(cursors))[1])
        bob.send(codec.encode(packets.DeliverAck("dm:alice:bob", 2)))
        carol.send(codec.encode(packets.DeliverAck("dm:alice:carol", 2)))
        bob.send(codec.encode(packets.DeliverAck("dm:alice:bob", 1)))  # late and lower: never moves back
        self.assertEqual(calls, [])
        self.clock.advance(0)
        self.assertEqual(calls, [[("bob", "phone", "dm:alice:bob", 2), ("carol", "phone", "dm:alice:carol", 2)]])
        self.assertEqual(self.store.cursors("bob", "phone").result, {"dm:alice:bob": 2})
        self.assertEqual(self.store.cursors("carol", "phone").result, {"dm:alice:carol": 2})

    def test_wrong_password(self) -> None:
        """A wrong password or an unknown user get the same answer, then the connection closes."""
        answers = []
        for user, password in (("alice", "nope"), ("mallory", "whatever")):
            peer = self.peer()
            _, result = peer.login(user, password)
            answers.append((result.status, result.reason))
            self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(answers, [(ErrorCode.AUTH_FAILED, "wrong user name or password")] * 2)

    def test_send_ack_deliver_ack(self) -> None:
        """A send is stored, acked to the sender and delivered to the recipient, who acks it."""
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        alice.send(codec.encode(packets.Send(77, schema.TARGET_USER, "bob", "text/plain", b"hello")))
        (ack,) = alice.received()
        self.assertEqual(ack, packets.SendAck(77, 0, 1, 1, 1_700_000_000_000, 1, "dm:alice:bob", ""))
        self.clock.advance(0)  # the coalesced write to bob happens at the end of the turn
        (deliver,) = bob.received()
        self.assertEqual(deliver.message.body, b"hello")
        self.assertEqual((deliver.message.seq, deliver.message.sender_device), (1, "phone"))
        bob.send(codec.encode(packets.DeliverAck("dm:alice:bob", 1)))
        self.assertEqual(self.store.cursors("bob", "phone").result, {"dm:alice:bob": 1})
        self.clock.advance(50)
        self.assertEqual(bob.received(), [], "acknowledged deliveries are not resent")

    def test_resend_until_acked(self) -> None:
        """An unacknowledged delivery is resent, flagged, after 5 s, then 10 s, capped at 20 s."""
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        alice.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"x")))
        self.clock.advance(0)
        self.assertEqual(bob.received_frames(), [(schema.DELIVER, 0)])
        times = []
        for _ in range(60):
            self.clock.advance(1)
            if bob.received_frames() == [(schema.DELIVER, schema.FLAG_RESEND)]:
                times.append(self.clock.seconds() - 1_700_000_000)
            bob.send(codec.encode(packets.Ping(1)))  # stay clear of the idle timeout
            bob.received()
        self.assertEqual(times, [5, 15, 35, 55])
        bob.send(codec.encode(packets.DeliverAck("dm:alice:bob", 1)))
        self.clock.advance(100)
        self.assertNotIn((schema.DELIVER, schema.FLAG_RESEND), bob.received_frames())

    def test_duplicate_send_gets_original_ack(self) -> None:
        """A resent send is not stored again; the answer is the original ack."""
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        frame = codec.encode(packets.Send(5, schema.TARGET_USER, "bob", "text/plain", b"once"))
        alice.send(frame)
        first = alice.received()
        self.clock.advance(3)
        alice.send(frame)
        second = alice.received()
        self.assertEqual(first, second)
        self.assertEqual(self.store.head("dm:alice:bob").result, 1)
        self.clock.advance(0)
        self.assertEqual(len(bob.received()), 1, "the duplicate is not delivered again")

    def test_many_sends_one_write(self) -> None:
        """Acks for many sends received in one read go out in one transport write."""
        alice = self.logged_in("alice")
        writes = alice.transport.writes
        alice.send(*(codec.encode(packets.Send(i, schema.TARGET_USER, "bob", "text/plain", b"m")) for i in range(1, 101)))
        acks = alice.received()
        self.assertEqual([a.seq for a in acks], list(range(1, 101)))
        self.assertEqual(alice.transport.writes - writes, 1)

    def test_fan_out_coalesced_per_connection(self) -> None:
        """Deliveries to a recipient caused by several senders in one turn share one write."""
        alice, carol, bob = self.logged_in("alice"), self.logged_in("carol"), self.logged_in("bob")
        writes = bob.transport.writes
        alice.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"a")))
        carol.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"c")))
        self.clock.advance(0)
        self.assertEqual(len(bob.received()), 2)
        self.assertEqual(bob.transport.writes - writes, 1)

    def test_other_devices_of_sender_get_the_message(self) -> None:
        """A message reaches the sender's other devices, not the sending one."""
        phone, laptop, _bob = self.logged_in("alice", "phone"), self.logged_in("alice", "laptop"), self.logged_in("bob")
        phone.send(codec.encode(packets.Send(9, schema.TARGET_USER, "bob", "text/plain", b"hi")))
        self.clock.advance(0)
        self.assertEqual([type(p) for p in phone.received()], [packets.SendAck])
        (deliver,) = laptop.received()
        self.assertEqual((deliver.message.client_msg_id, deliver.message.sender_device), (9, "phone"))

    def test_unknown_recipient_and_non_member(self) -> None:
        """Sends to nobody or into someone else's conversation are refused and store nothing."""
        alice = self.logged_in("alice")
        alice.send(
            codec.encode(packets.Send(1, schema.TARGET_USER, "nobody", "text/plain", b"?")),
            codec.encode(packets.Send(2, schema.TARGET_CONVERSATION, "dm:bob:carol", "text/plain", b"?")),
            codec.encode(packets.Send(3, schema.TARGET_CONVERSATION, "g:secret", "text/plain", b"?")),
            codec.encode(packets.Send(4, schema.TARGET_CONVERSATION, "group:secret", "text/plain", b"?")),
        )
        statuses = [(a.client_msg_id, a.status) for a in alice.received()]
        self.assertEqual(
            statuses,
            [
                (1, ErrorCode.UNKNOWN_RECIPIENT),
                (2, ErrorCode.NOT_A_MEMBER),
                (3, ErrorCode.NOT_A_MEMBER),
                (4, ErrorCode.INVALID_TARGET),
            ],
        )
        self.assertEqual(self.store.conversations("alice").result, {})
        self.assertFalse(alice.transport.disconnecting, "a refused send is not a protocol error")

    def test_too_large_body(self) -> None:
        alice = self.logged_in("alice")
        body = b"x" * (self.settings.max_body + 1)
        alice.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", body)))
        (ack,) = alice.received()
        self.assertEqual(ack.status, ErrorCode.TOO_LARGE)

    def test_check_can_reject(self) -> None:
        """A submission check that raises Rejected stops the message before it is stored."""

        def no_shouting(sender, device, conversation, item):
            if item.body.isupper():
                raise Rejected("no shouting")

        self.hub.checks.append(no_shouting)
        alice = self.logged_in("alice")
        alice.send(
            codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"HELLO")),
            codec.encode(packets.Send(2, schema.TARGET_USER, "bob", "text/plain", b"hello")),
        )
        self.assertEqual([(a.status, a.reason) for a in alice.received()], [(ErrorCode.REJECTED, "no shouting"), (0, "")])
        self.assertEqual(self.store.head(direct_conversation("alice", "bob")).result, 1)

    def test_bundle_is_atomic(self) -> None:
        """A bundle gets consecutive sequences, one ack, and reaches the recipient in one frame."""
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        from imkit.model import Item

        items = (Item("text/plain", b"Goodbye"), Item("application/x-imkit-control", b"remove-contact"))
        alice.send(codec.encode(packets.Bundle(3, schema.TARGET_USER, "bob", items)))
        (ack,) = alice.received()
        self.assertEqual((ack.seq, ack.count), (1, 2))
        self.clock.advance(0)
        (bundle,) = bob.received()
        self.assertIsInstance(bundle, packets.DeliverBundle)
        self.assertEqual([(m.seq, m.bundle_remaining) for m in bundle.messages], [(1, 1), (2, 0)])

    def test_sync_pages_and_server_cursors(self) -> None:
        """Sync returns exactly the gap after the given cursor, in pages, with every range."""
        alice = self.logged_in("alice")
        alice.send(*(codec.encode(packets.Send(i, schema.TARGET_USER, "bob", "text/plain", b"%d" % i)) for i in range(1, 8)))
        alice.received()
        bob = self.logged_in("bob")
        bob.send(codec.encode(packets.Sync(1, 0, 3, (packets.Cursor("dm:alice:bob", 2),))))
        (result,) = bob.received()
        self.assertEqual([m.seq for m in result.messages], [3, 4, 5])
        self.assertTrue(result.more)
        self.assertEqual(result.ranges, (packets.Range("dm:alice:bob", 2, 7),))
        bob.send(codec.encode(packets.DeliverAck("dm:alice:bob", 5)))
        bob.send(codec.encode(packets.Sync(2, schema.SYNC_SERVER_CURSORS, 10, ())))
        (result,) = bob.received()
        self.assertEqual([m.seq for m in result.messages], [6, 7])
        self.assertFalse(result.more)

    def test_sync_of_foreign_conversation_reveals_nothing(self) -> None:
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        alice.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"private")))
        carol = self.logged_in("carol")
        carol.send(codec.encode(packets.Sync(1, schema.SYNC_ONLY_LISTED, 10, (packets.Cursor("dm:alice:bob", 0),))))
        (result,) = carol.received()
        self.assertEqual((result.ranges, result.messages), ((), ()))

    def test_malformed_frame_gets_error_and_disconnect(self) -> None:
        """Garbage gets an Error frame and a close; everyone else goes on unaffected."""
        alice, bob = self.logged_in("alice"), self.logged_in("bob")
        mallory = self.logged_in("carol")
        mallory.send(b"\x00\x00\x00\x06\x01\x00\x00\x05\xff\xff")  # a Send body cut short
        (error,) = mallory.received()
        self.assertEqual(error.code, ErrorCode.MALFORMED_FRAME)
        self.assertTrue(mallory.transport.disconnecting)
        alice.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"still here")))
        self.assertEqual(alice.received()[0].status, 0)
        self.clock.advance(0)
        self.assertEqual(bob.received()[0].message.body, b"still here")

    def test_oversized_frame_refused_before_body(self) -> None:
        """The length prefix alone is enough to refuse a frame over the limit."""
        peer = self.peer()
        peer.send((self.settings.max_frame + 1).to_bytes(4, "big"))
        (error,) = peer.received()
        self.assertEqual(error.code, ErrorCode.FRAME_TOO_LARGE)
        self.assertTrue(peer.transport.disconnecting)

    def test_out_of_state_packet(self) -> None:
        peer = self.peer()
        peer.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"x")))
        (error,) = peer.received()
        self.assertEqual(error.code, ErrorCode.UNEXPECTED_PACKET)
        self.assertIn("await-hello", error.reason)
        self.assertTrue(peer.transport.disconnecting)

    def test_unsupported_version(self) -> None:
        peer = self.peer()
        peer.send(codec.encode(packets.Hello(2, 3, "future")))
        (error,) = peer.received()
        self.assertEqual(error.code, ErrorCode.UNSUPPORTED_VERSION)

    def test_login_deadline(self) -> None:
        peer = self.peer()
        peer.send(codec.encode(packets.Hello(1, 1, "slow")))
        peer.received()
        self.clock.advance(9.9)
        self.assertFalse(peer.transport.disconnecting)
        self.clock.advance(0.2)
        (error,) = peer.received()
        self.assertEqual(error.code, ErrorCode.IDLE_TIMEOUT)
        self.assertTrue(peer.transport.disconnecting)

    def test_idle_timeout_and_no_timer_leak(self) -> None:
        """A silent connection is closed after idle_timeout; no DelayedCall outlives it."""
        peer = self.logged_in("alice")
        self.clock.advance(59)
        peer.send(codec.encode(packets.Ping(7)))
        self.assertEqual(peer.received(), [packets.Pong(7)])
        self.clock.advance(59)
        self.assertFalse(peer.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(peer.transport.disconnecting)
        peer.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.hub.online("alice"), ())


class RehashTests(SynchronousTestCase):
    def test_login_upgrades_a_weak_hash(self) -> None:
        """A password hashed with weaker parameters is rehashed with today's at the next login."""
        from argon2 import PasswordHasher

        clock = Clock()
        store = MemoryStore()
        synchronous = defer.maybeDeferred
        weak = Passwords(PasswordHasher(time_cost=1, memory_cost=8, parallelism=1), synchronous)
        strong = Passwords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1), synchronous)
        old = weak.hash("pw").result
        store.add_user("alice", old)
        hub = Hub(store, strong, clock)
        peer = Peer(IMServerFactory(hub, ServerSettings(), clock))
        _, result = peer.login("alice", "pw")
        self.assertEqual(result.status, 0)
        new = store.password_hash("alice").result
        self.assertNotEqual(new, old)
        self.assertFalse(strong.needs_rehash(new))
        self.assertTrue(strong.verify(new, "pw").result)


class ResumeTokenTests(SynchronousTestCase):
    """A login hands out a resume token; a reconnecting device logs in with it, not its password."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        passwords = Passwords.fast_for_tests()
        passwords.hash("alice-secret").addCallback(lambda h: self.store.add_user("alice", h))
        self.settings = ServerSettings(token_ttl=3600.0)
        self.factory = IMServerFactory(Hub(self.store, passwords, self.clock, self.settings), self.settings, self.clock)

    def login(self, method: int, secret: bytes, device: str = "phone") -> packets.LoginResult:
        peer = Peer(self.factory)
        peer.send(codec.encode(packets.Hello(1, 1, "t")), codec.encode(packets.Login(method, "alice", device, secret)))
        return peer.received()[1]

    def test_token_login(self) -> None:
        first = self.login(schema.LOGIN_PASSWORD, b"alice-secret")
        self.assertEqual(len(first.resume_token), 32)
        again = self.login(schema.LOGIN_TOKEN, first.resume_token)
        self.assertEqual(again.status, 0)
        self.assertNotEqual(again.resume_token, first.resume_token, "each login rotates the token")
        self.assertEqual(self.login(schema.LOGIN_TOKEN, first.resume_token).status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.login(schema.LOGIN_TOKEN, again.resume_token).status, 0)

    def test_token_is_bound_to_its_device_and_expires(self) -> None:
        token = self.login(schema.LOGIN_PASSWORD, b"alice-secret").resume_token
        self.assertEqual(self.login(schema.LOGIN_TOKEN, token, device="laptop").status, ErrorCode.AUTH_FAILED)
        self.clock.advance(3601)
        refused = self.login(schema.LOGIN_TOKEN, token)
        self.assertEqual(refused.status, ErrorCode.AUTH_FAILED)
        self.assertIn("log in with the password", refused.reason)

    def test_client_core_reconnects_with_its_token(self) -> None:
        """ClientCore uses the token on reconnect, and falls back to the password when it is refused."""
        import random

        from imkit.session import events
        from imkit.session.client import ClientCore

        core = ClientCore(self.clock, "alice", "alice-secret", "phone", rng=random.Random(1))
        methods = []

        def connect() -> list:
            peer = Peer(self.factory)
            core.connection_made()
            found = []
            for _ in range(4):
                data = core.data_to_send()
                for kind, _flags, body in FrameReader().feed(data):
                    if kind == schema.LOGIN:
                        methods.append(codec.decode_body(kind, body).method)
                peer.protocol.dataReceived(data)
                found += core.receive_data(peer.transport.value())
                peer.transport.clear()
            core.connection_lost()
            return found

        self.assertIn(events.LoggedIn, [type(e) for e in connect()])
        self.assertIn(events.LoggedIn, [type(e) for e in connect()])
        self.store.revoke_tokens("alice")
        self.assertIn(events.CloseConnection, [type(e) for e in connect()])
        self.assertIn(events.LoggedIn, [type(e) for e in connect()])
        self.assertEqual(methods, [schema.LOGIN_PASSWORD, schema.LOGIN_TOKEN, schema.LOGIN_TOKEN, schema.LOGIN_PASSWORD])


class SlowVisibilityStore(MemoryStore):
    """A MemoryStore whose visibility answers wait for the test, and that refuses work once closed."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[defer.Deferred, Any]] = []
        self.closed = False

    def visibility(self, conversation: str, user: str) -> defer.Deferred:
        answer = super().visibility(conversation, user).result
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((d, answer))
        return d

    def set_cursor(self, user: str, device: str, conversation: str, seq: int) -> defer.Deferred:
        if self.closed:
            return defer.fail(RuntimeError("the store is closed"))
        return super().set_cursor(user, device, conversation, seq)

    def close(self) -> defer.Deferred:
        self.closed = True
        return super().close()


class StoppingTests(SynchronousTestCase):
    """Stopping the service lets the hub's unfinished work finish before the store closes."""

    def setUp(self) -> None:
        from imkit.server.service import IMServerService

        self.clock = Clock()
        self.store = SlowVisibilityStore()
        passwords = Passwords.fast_for_tests()
        for user in ("alice", "bob"):
            passwords.hash(f"{user}-secret").addCallback(lambda h, u=user: self.store.add_user(u, h))
        self.service = IMServerService(self.store, passwords, [], self.clock, ServerSettings(stop_timeout=10.0))
        self.service.startService()
        self.logged: list[dict] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        alice, self.bob = Peer(self.service.factory), Peer(self.service.factory)
        alice.login("alice", "alice-secret")
        self.bob.login("bob", "bob-secret")
        alice.send(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"bye")))
        # Bob's first ack of the conversation: the hub asks the store whether he may see it.
        self.bob.send(codec.encode(packets.DeliverAck("dm:alice:bob", 1)))
        self.assertEqual(len(self.store.waiting), 1)

    def errors(self) -> list[dict]:
        return [event for event in self.logged if event.get("log_failure") is not None]

    def test_a_first_ack_under_way_is_recorded_before_the_store_closes(self) -> None:
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertFalse(self.store.closed)
        answer, span = self.store.waiting.pop()
        answer.callback(span)
        self.successResultOf(stopped)
        self.assertTrue(self.store.closed)
        self.assertEqual(self.store.cursors("bob", "phone").result, {"dm:alice:bob": 1})
        self.assertEqual(self.errors(), [])

    def test_work_that_never_finishes_delays_the_stop_only_by_stop_timeout(self) -> None:
        stopped = self.service.stopService()
        self.clock.advance(9.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertTrue(self.store.closed)
        self.assertTrue(any("unfinished" in event.get("log_format", "") for event in self.logged))
