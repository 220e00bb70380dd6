"""
Resource limits and abuse resistance (``imkit.server.limits`` and where the server applies it).

Everything is deterministic (``task.Clock``, ``StringTransport``, iosim) except the last class,
which attacks a real TLS listener on 127.0.0.1 while honest clients chat through it.
"""

from __future__ import annotations

import random
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import directlyProvides

from test_client_protocol import FakeReactor, HubEndpoint

from imkit.client import ClientSettings, IMClient, development_ca, tls_endpoint
from imkit.passwords import Passwords
from imkit.server import tap
from imkit.server.hub import Hub
from imkit.server.limits import (
    LOOKUP,
    SEND,
    SYNC,
    BucketSet,
    ConnectionCount,
    OutboundBuffer,
    ProbeGuard,
    RateLimits,
    TokenBucket,
    Who,
    host_of,
)
from imkit.server.protocol import IMServerFactory
from imkit.session.client import ClientCore
from imkit.session.settings import ServerSettings
from imkit.store.memory import MemoryStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.framing import FrameReader

T0 = 1_700_000_000.0
PASSWORDS = Passwords.fast_for_tests()


def text(n: int) -> bytes:
    return b"message %d" % n


# Helpers ---------------------------------------------------------------------------------------


class Peer:
    """One scripted client on a StringTransport, talking to the protocol under test."""

    def __init__(self, factory: IMServerFactory, host: str = "10.0.0.1", port: int = 40000, tls: bool = False) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        if tls:
            directlyProvides(self.transport, ISSLTransport)
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.reader = FrameReader(factory.settings.max_frame)

    def send(self, *items: Any) -> None:
        self.protocol.dataReceived(b"".join(codec.encode(item) for item in items))

    def received(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return [codec.decode_body(kind, body) for kind, _flags, body in self.reader.feed(data)]

    def login(self, user: str, device: str = "phone") -> list:
        self.send(packets.Hello(1, 1, "test"), packets.Login(schema.LOGIN_PASSWORD, user, device, f"{user}-pw".encode()))
        return self.received()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class ServerTestCase(unittest.SynchronousTestCase):
    users = ("alice", "bob", "carol", "dave")
    settings = ServerSettings()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        for user in self.users:
            self.successResultOf(self.store.add_user(user, self.successResultOf(PASSWORDS.hash(f"{user}-pw"))))
        self.hub = Hub(self.store, PASSWORDS, self.clock, self.settings)
        self.factory = IMServerFactory(self.hub, self.settings, self.clock)
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def peer(self, user: str | None = None, device: str = "phone", host: str = "10.0.0.1", port: int = 40000) -> Peer:
        peer = Peer(self.factory, host, port)
        if user is not None:
            replies = peer.login(user, device)
            self.assertEqual(replies[1].status, 0, replies)
            peer.received()
        return peer

    def log_lines(self, word: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.logged if word in formatEvent(event)]

    def stored(self, conversation: str) -> list[bytes]:
        return [message.body for message in self.successResultOf(self.store.read(conversation, 0, 1000))]


# The building blocks ---------------------------------------------------------------------------


class BucketTests(unittest.SynchronousTestCase):
    def test_token_bucket(self) -> None:
        bucket = TokenBucket(3, 0.5, 100.0)
        self.assertEqual([bucket.take(100.0) for _ in range(4)], [True, True, True, False])
        self.assertEqual(bucket.ready_at(100.0), 100.5)
        self.assertTrue(bucket.take(100.5))
        self.assertFalse(bucket.full(101.0))
        self.assertTrue(bucket.full(102.0))
        self.assertEqual(bucket.tokens, 3)

    def test_bucket_set_forgets_idle_keys(self) -> None:
        buckets = BucketSet(rate=1.0, burst=2)
        for n in range(100):
            buckets.take(f"ip{n}", 0.0)
        self.assertEqual(len(buckets), 100)
        self.assertIsNone(buckets.ready_at("ip1", 0.0), "one token left of two")
        buckets.take("ip1", 0.0)
        self.assertEqual(buckets.ready_at("ip1", 0.0), 1.0)
        buckets.take("busy", 120.0)  # a minute later: the sweep forgets every full bucket
        self.assertEqual(len(buckets), 1)

    def test_rates_take_from_every_scope_or_none(self) -> None:
        settings = ServerSettings(send_rate=1.0, send_burst=2, user_rate_factor=1.5, ip_rate_factor=0, conversation_rate_factor=0)
        rates = RateLimits(settings)
        phone, laptop = Who("alice", "phone", "1.2.3.4"), Who("alice", "laptop", "1.2.3.4")
        self.assertEqual([rates.check(SEND, phone, (), 0.0) for _ in range(2)], [None, None])
        self.assertEqual(rates.check(SEND, phone, (), 0.0), 1.0, "the device's two are gone")
        self.assertIsNone(rates.check(SEND, laptop, (), 0.0), "the user has three")
        self.assertEqual(rates.check(SEND, laptop, (), 0.0), 1.0 / 1.5, "now the user's are gone too")
        self.assertIsNone(rates.check(SYNC, phone, (), 0.0), "syncs and lookups are off")
        self.assertFalse(rates.enabled(LOOKUP))

    def test_per_ip_and_per_conversation(self) -> None:
        settings = ServerSettings(lookup_rate=1.0, lookup_burst=1, user_rate_factor=0, ip_rate_factor=2, conversation_rate_factor=3)
        rates = RateLimits(settings)
        who = [Who(f"user{n}", "d", "1.2.3.4") for n in range(3)]
        self.assertIsNone(rates.check(LOOKUP, who[0], (), 0.0))
        self.assertIsNone(rates.check(LOOKUP, who[1], (), 0.0))
        self.assertEqual(rates.check(LOOKUP, who[2], (), 0.0), 0.5, "two per address")
        others = [Who(f"other{n}", "d", f"10.0.0.{n}") for n in range(5)]
        self.assertEqual([rates.check(LOOKUP, w, ("g:x",), 0.0) for w in others[:4]], [None, None, None, 1 / 3])
        self.assertIsNone(rates.check(LOOKUP, others[4], ("g:y",), 0.0), "another conversation")

    def test_probe_guard(self) -> None:
        guard = ProbeGuard(burst=3, interval=10.0)
        self.assertEqual([guard.missed("mallory", "same", 0.0) for _ in range(10)], [False] * 10, "the same miss again is free")
        self.assertEqual([guard.missed("mallory", f"u{n}", 0.0) for n in range(2)], [False, True], "three in all")
        self.assertEqual(guard.blocked("mallory", 0.0), 10.0)
        self.assertIsNone(guard.blocked("alice", 0.0))
        self.assertIsNone(guard.blocked("mallory", 10.0))
        self.assertTrue(guard.missed("mallory", "u99", 10.0), "one more probe per interval")
        self.assertEqual(guard.blocked("mallory", 10.0), 20.0)

    def test_small_pieces(self) -> None:
        self.assertEqual([host_of("1.2.3.4:5"), host_of("::1:5"), host_of("x")], ["1.2.3.4", "::1", "x"])
        count = ConnectionCount(2)
        self.assertEqual([count.add("a"), count.add("a"), count.add("a")], [1, 2, 3])
        self.assertEqual([count.over(2), count.over(3)], [False, True])
        count.remove("a")
        self.assertEqual(count["a"], 2)
        self.assertFalse(ConnectionCount(0).over(10**6), "0: no limit")
        buffer = OutboundBuffer(10)
        self.assertTrue(buffer.hold(b"12345"))
        self.assertFalse(buffer.hold(b"123456"))
        self.assertEqual((buffer.take(), buffer.size, buffer.peak), (b"12345", 0, 5))


# Sends -----------------------------------------------------------------------------------------


class SendRateTests(ServerTestCase):
    settings = ServerSettings(send_rate=2.0, send_burst=3, ip_rate_factor=0)

    def send(self, peer: Peer, cmid: int, to: str = "bob") -> packets.SendAck:
        peer.send(packets.Send(cmid, schema.TARGET_USER, to, "text/plain", text(cmid)))
        (ack,) = [p for p in peer.received() if type(p) is packets.SendAck]
        return ack

    def test_honest_traffic_under_the_limit_is_untouched(self) -> None:
        alice = self.peer("alice")
        for n in range(1, 31):
            self.assertEqual(self.send(alice, n).status, 0)
            self.clock.advance(0.5)
        self.assertEqual(self.stored("dm:alice:bob"), [text(n) for n in range(1, 31)])
        self.assertEqual(self.hub.limits.refused[SEND], 0)

    def test_over_the_rate_says_when_to_retry_and_keeps_order(self) -> None:
        alice = self.peer("alice")
        self.assertEqual([self.send(alice, n).status for n in (1, 2, 3)], [0, 0, 0])
        limited = self.send(alice, 4)
        self.assertEqual((limited.status, limited.sent_at, limited.seq), (ErrorCode.RATE_LIMITED, int(T0 * 1000) + 500, 0))
        # A token comes back, but send 5 must not overtake 4: it is refused until 4 is back.
        self.clock.advance(1.0)
        later = self.send(alice, 5)
        self.assertEqual(later.status, ErrorCode.RATE_LIMITED)
        self.assertEqual([self.send(alice, n).status for n in (4, 5)], [0, 0])
        self.assertEqual(self.stored("dm:alice:bob"), [text(n) for n in (1, 2, 3, 4, 5)])

    def test_a_send_that_never_comes_back_holds_the_others_for_a_while_only(self) -> None:
        alice = self.peer("alice")
        for n in (1, 2, 3):
            self.send(alice, n)
        self.assertEqual(self.send(alice, 4).status, ErrorCode.RATE_LIMITED)
        self.clock.advance(10)
        self.assertEqual(self.send(alice, 5).status, ErrorCode.RATE_LIMITED)
        self.clock.advance(30)
        self.assertEqual(self.send(alice, 5).status, 0, "the client gave up on 4")

    def test_devices_and_conversations(self) -> None:
        """Each device has its own rate; the user's devices together have three times that."""
        phone, laptop, tablet = self.peer("alice", "phone"), self.peer("alice", "laptop"), self.peer("alice", "tablet")
        statuses = [self.send(device, 10 * index + n).status for index, device in enumerate((phone, laptop, tablet)) for n in range(4)]
        self.assertEqual(statuses, [0, 0, 0, ErrorCode.RATE_LIMITED] * 3)
        self.assertEqual(self.send(self.peer("bob"), 100, to="alice").status, 0, "another user is not limited by alice")


class ConversationRateTests(ServerTestCase):
    settings = ServerSettings(send_rate=10.0, send_burst=2, user_rate_factor=0, ip_rate_factor=0, conversation_rate_factor=1.5)
    # alice and bob each have a burst of 2; their conversation has one of 3.

    def test_everybody_in_one_conversation(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        statuses = []
        for cmid, (peer, to) in enumerate([(alice, "bob"), (bob, "alice"), (alice, "bob"), (bob, "alice")]):
            peer.send(packets.Send(cmid + 1, schema.TARGET_USER, to, "text/plain", b"x"))
            statuses += [p.status for p in peer.received() if type(p) is packets.SendAck]
        self.assertEqual(statuses, [0, 0, 0, ErrorCode.RATE_LIMITED], "1.5 times a burst of 2")
        carol = self.peer("carol")
        carol.send(packets.Send(9, schema.TARGET_USER, "dave", "text/plain", b"x"))
        self.assertEqual(carol.received()[0].status, 0)


# Syncs and lookups -----------------------------------------------------------------------------


class SyncAndLookupRateTests(ServerTestCase):
    settings = ServerSettings(sync_rate=1.0, sync_burst=2, lookup_rate=1.0, lookup_burst=2, ip_rate_factor=0)

    def sync(self, request_id: int, conversation: str = "dm:alice:bob") -> packets.Sync:
        return packets.Sync(request_id, schema.SYNC_ONLY_LISTED, 0, (packets.Cursor(conversation, 0),))

    def test_syncs_over_the_rate_are_answered_later_in_order(self) -> None:
        alice = self.peer("alice")
        alice.send(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"hi"))
        alice.received()
        alice.send(self.sync(1), self.sync(2), self.sync(3), self.sync(4, "dm:alice:carol"))
        self.assertEqual([p.request_id for p in alice.received()], [1, 2])
        self.assertEqual(self.hub.limits.held_syncs(alice.protocol.session), 2)
        alice.send(self.sync(5))  # asked again with the same cursors: replaces request 3
        self.clock.advance(0.999)
        self.assertEqual(alice.received(), [])
        self.clock.advance(0.001)
        self.assertEqual([p.request_id for p in alice.received()], [5])
        self.clock.advance(1.0)
        self.assertEqual([p.request_id for p in alice.received()], [4])
        self.assertEqual(self.hub.limits.held_syncs(alice.protocol.session), 0)

    def test_held_syncs_are_bounded_and_go_with_the_connection(self) -> None:
        alice = self.peer("alice")
        alice.send(*[self.sync(n, f"dm:alice:u{n}") for n in range(1, 30)])
        self.assertEqual(self.hub.limits.held_syncs(alice.protocol.session), 8)
        alice.protocol.connectionLost(None)
        self.assertEqual(self.hub.limits.held_syncs(alice.protocol.session), 0)
        self.assertEqual([call for call in self.clock.getDelayedCalls() if call.active() and "_release" in repr(call)], [])

    def test_lookups_over_the_rate_get_rate_limited(self) -> None:
        alice = self.peer("alice")
        alice.send(*[packets.Query(n, schema.QUERY_CONTACTS, "") for n in (1, 2, 3)])
        answers = alice.received()
        self.assertEqual([a.status for a in answers], [0, 0, ErrorCode.RATE_LIMITED])
        self.assertIn(f"from server time {int(T0 * 1000) + 1000} ms", answers[2].reason)
        alice.send(packets.ReceiptsQuery(4, "dm:alice:bob", (1,)))
        self.assertEqual(alice.received()[0].status, ErrorCode.RATE_LIMITED)
        self.clock.advance(1)
        alice.send(packets.Query(5, schema.QUERY_CONTACTS, ""))
        self.assertEqual(alice.received()[0].status, 0)


# Anti-crawler ----------------------------------------------------------------------------------


class CrawlerTests(ServerTestCase):
    settings = ServerSettings(probe_burst=5, probe_interval=10.0)

    def test_enumerating_users_is_throttled_and_logged(self) -> None:
        mallory = self.peer("alice", "crawler")
        statuses = []
        for n in range(8):
            mallory.send(packets.Send(n + 1, schema.TARGET_USER, f"user{n}", "text/plain", b"hi?"))
            statuses += [p.status for p in mallory.received() if type(p) is packets.SendAck]
        self.assertEqual(statuses, [ErrorCode.UNKNOWN_RECIPIENT] * 5 + [ErrorCode.RATE_LIMITED] * 3, "five, then throttled")
        (line,) = self.log_lines("probable crawler")
        self.assertIn("throttling alice (device crawler", line)
        # Everything of the user waits now, syncs and lookups too; a second later still so.
        mallory.send(packets.Query(1, schema.QUERY_CONTACTS, ""))
        self.assertEqual(mallory.received()[0].status, ErrorCode.RATE_LIMITED)
        # One more probe per interval (the first send refused comes first: sends keep their order).
        self.clock.advance(10)
        mallory.send(packets.Send(6, schema.TARGET_USER, "user5", "text/plain", b"hi?"))
        mallory.send(packets.Send(7, schema.TARGET_USER, "user6", "text/plain", b"hi?"))
        self.assertEqual([p.status for p in mallory.received()], [ErrorCode.UNKNOWN_RECIPIENT, ErrorCode.RATE_LIMITED])
        self.assertEqual(len(self.log_lines("probable crawler")), 1, "logged once per episode")

    def test_foreign_conversations_count_and_repeats_do_not(self) -> None:
        bob = self.peer("bob")
        for n in range(3):
            bob.send(packets.Send(n + 1, schema.TARGET_USER, "carol", "text/plain", b"hi"))  # make dm:bob:carol exist
        mallory = self.peer("alice", "crawler")
        for n in range(20):
            mallory.send(packets.Query(n, schema.QUERY_MEMBERS, "g:secret"))  # the same one, again and again
        self.assertEqual({p.status for p in mallory.received()}, {ErrorCode.NOT_A_MEMBER})
        mallory.send(
            packets.Sync(1, schema.SYNC_ONLY_LISTED, 0, (packets.Cursor("dm:bob:carol", 0),)),
            packets.ReceiptsQuery(2, "dm:bob:dave", (1,)),
            packets.Send(3, schema.TARGET_CONVERSATION, "dm:carol:dave", "text/plain", b"x"),
            packets.Query(4, schema.QUERY_MEMBERS, "g:other"),
        )
        answers = mallory.received()
        self.assertEqual(answers[0], packets.SyncResult(1, False, (), ()), "nothing of a conversation not theirs")
        self.assertEqual([p.status for p in answers[1:]], [ErrorCode.NOT_A_MEMBER] * 3)
        self.assertEqual(len(self.log_lines("probable crawler")), 1, "five different ones")
        mallory.send(packets.ReceiptsQuery(5, "dm:bob:zed", (1,)))
        self.assertEqual(mallory.received()[0].status, ErrorCode.RATE_LIMITED)
        mallory.send(packets.Send(6, schema.TARGET_USER, "bob", "text/plain", b"x"))
        self.assertEqual(mallory.received()[0].status, ErrorCode.RATE_LIMITED)
        # An honest user is not affected at all.
        bob.received()
        bob.send(packets.Send(7, schema.TARGET_USER, "alice", "text/plain", b"x"))
        self.assertEqual([p.status for p in bob.received() if type(p) is packets.SendAck], [0])


# Connections -----------------------------------------------------------------------------------


class ConnectionLimitTests(ServerTestCase):
    settings = ServerSettings(max_connections_per_ip=2, max_connections_per_user=2)

    def test_connections_per_ip(self) -> None:
        first, second = self.peer(host="10.0.0.9", port=1), self.peer(host="10.0.0.9", port=2)
        third = self.peer(host="10.0.0.9", port=3)
        (error,) = third.received()
        self.assertEqual(error, packets.Error(ErrorCode.TOO_MANY_CONNECTIONS, "too many connections from 10.0.0.9 (at most 2); try again later"))
        self.assertTrue(third.closed)
        self.assertFalse(first.closed or second.closed)
        self.assertFalse(self.peer(host="10.0.0.10").closed, "another address")
        fourth = self.peer(host="10.0.0.9", port=4)
        self.assertTrue(fourth.closed)
        # A flood past twice the limit gets no answer at all: dropped at once.
        fifth = self.peer(host="10.0.0.9", port=5)
        self.assertEqual((fifth.transport.value(), fifth.closed), (b"", True))
        self.assertEqual(self.factory.stats["refused"], 3)
        self.assertEqual(len(self.log_lines("refusing connections from 10.0.0.9")), 1, "one line, not one per connection")
        for peer in (third, fourth, fifth):
            peer.protocol.connectionLost(None)
        first.protocol.connectionLost(None)
        again = self.peer("alice", host="10.0.0.9", port=6)
        self.assertFalse(again.closed)

    def test_connections_per_user(self) -> None:
        self.peer("alice", "phone", host="10.0.0.1")
        self.peer("alice", "laptop", host="10.0.0.2")
        tablet = Peer(self.factory, "10.0.0.3")
        _, result = tablet.login("alice", "tablet")
        self.assertEqual(result.status, ErrorCode.TOO_MANY_CONNECTIONS)
        self.assertIn("alice already has 2 connections", result.reason)
        self.assertTrue(tablet.closed)
        tablet.protocol.connectionLost(None)
        # The phone reconnecting replaces its old connection: allowed.
        self.peer("alice", "phone", host="10.0.0.4")
        self.assertEqual(sorted(conn.device for conn in self.hub.online("alice")), ["laptop", "phone"])
        self.peer("bob", "phone", host="10.0.0.1")


class FakeTLSTests(ServerTestCase):
    settings = ServerSettings(handshake_timeout=5.0)

    def test_handshake_deadline(self) -> None:
        slow, fine, plain = Peer(self.factory, tls=True), Peer(self.factory, tls=True), Peer(self.factory)
        fine.protocol.handshakeCompleted()
        self.clock.advance(5.0)
        self.assertTrue(slow.closed)
        self.assertFalse(fine.closed or plain.closed, "done in time, or not TLS at all")
        self.assertEqual(self.factory.stats["handshake_timeouts"], 1)


class SlowReaderTests(ServerTestCase):
    settings = ServerSettings(max_outbound_buffer=64 * 1024, max_frame=64 * 1024, max_body=16 * 1024)

    def flood(self, alice: Peer, count: int, size: int = 1000, start: int = 0) -> None:
        for n in range(start, start + count):
            alice.send(packets.Send(n + 1, schema.TARGET_USER, "bob", "text/plain", b"x" * size))
            self.clock.advance(0)

    def test_a_reader_that_catches_up_loses_nothing(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        bob.protocol.pauseProducing()
        self.flood(alice, 40)
        self.assertEqual(bob.transport.value(), b"", "held while paused")
        held = bob.protocol._outbound.size
        self.assertGreater(held, 40_000)
        bob.protocol.resumeProducing()
        delivered = [p.message.body for p in bob.received()]
        self.assertEqual(len(delivered), 40)
        self.assertFalse(bob.closed)

    def test_a_slow_reader_is_dropped_before_the_buffer_passes_the_limit(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        bob.protocol.pauseProducing()
        peak = 0
        for n in range(200):
            self.flood(alice, 1, start=n)
            peak = max(peak, bob.protocol._outbound.size)
            if bob.closed:
                break
        self.assertTrue(bob.closed)
        self.assertTrue(bob.transport.disconnected, "aborted, not waiting to flush")
        self.assertLessEqual(peak, 64 * 1024)
        self.assertEqual(bob.protocol._outbound.size, 0)
        self.assertEqual(self.hub.online("bob"), ())
        self.assertEqual(self.factory.stats["slow_readers"], 1)
        (line,) = self.log_lines("slow reader")
        self.assertIn("more than 65536 bytes waiting", line)
        # Alice's messages are all stored; bob gets them when he is back.
        self.assertEqual(len(self.stored("dm:alice:bob")), n + 1)

    def test_closing_a_connection_that_does_not_read_aborts_it_a_little_later(self) -> None:
        bob = self.peer("bob")
        bob.protocol.pauseProducing()
        self.clock.advance(self.settings.idle_timeout)
        self.assertTrue(bob.closed)
        self.assertIsNone(bob.transport.producer, "the producer is unregistered before closing (TLS waits for that)")
        self.assertIn(b"idle", bob.transport.value(), "the goodbye is written")
        self.assertFalse(bob.transport.disconnected)
        self.clock.advance(10)
        self.assertTrue(bob.transport.disconnected, "aborted")


class OptionTests(unittest.SynchronousTestCase):
    def test_options_reach_the_settings(self) -> None:
        options = tap.Options()
        options.parseOptions(
            [
                "--store", "memory:", "--handshake-timeout", "3", "--max-outbound-buffer", "2000000",
                "--max-connections-per-ip", "0", "--max-connections-per-user", "5", "--send-rate", "2.5",
                "--send-burst", "7", "--sync-rate", "1", "--sync-burst", "3", "--lookup-rate", "4", "--lookup-burst", "9",
                "--user-rate-factor", "2", "--ip-rate-factor", "0", "--conversation-rate-factor", "6",
                "--probe-burst", "11", "--probe-interval", "12",
            ]
        )
        s = options.settings
        self.assertEqual(
            (s.handshake_timeout, s.max_outbound_buffer, s.max_connections_per_ip, s.max_connections_per_user, s.send_rate,
             s.send_burst, s.sync_rate, s.sync_burst, s.lookup_rate, s.lookup_burst, s.user_rate_factor, s.ip_rate_factor,
             s.conversation_rate_factor, s.probe_burst, s.probe_interval),
            (3.0, 2_000_000, 0, 5, 2.5, 7, 1.0, 3, 4.0, 9, 2.0, 0.0, 6.0, 11, 12.0),
        )

    def test_bad_values_are_one_line(self) -> None:
        for argv, fix in (
            (("--send-rate", "fast"), "--send-rate takes a number"),
            (("--send-rate", "-1"), "--send-rate must be 0 (no limit) or more"),
            (("--max-connections-per-ip", "-3"), "--max-connections-per-ip must be 0 (no limit) or more"),
            (("--send-burst", "0"), "--send-burst must be greater than 0"),
            (("--handshake-timeout", "0"), "--handshake-timeout must be greater than 0"),
            (("--max-outbound-buffer", "1000"), "--max-outbound-buffer must be at least --max-frame"),
        ):
            with self.assertRaises(usage.UsageError) as raised:
                tap.Options().parseOptions(["--store", "memory:", *argv])
            self.assertIn(fix, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))


# The client's side of RATE_LIMITED -------------------------------------------------------------


class ClientCoreTests(unittest.SynchronousTestCase):
    """ClientCore against a scripted server whose clock is 1000 s ahead of ours."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.core = ClientCore(self.clock, "alice", "pw", settings=ClientSettings(resend_jitter=0.0), rng=random.Random(1))
        self.core.connection_made()
        self.core.data_to_send()
        self.server_ms = int((T0 + 1000) * 1000)
        self.core.receive_data(codec.encode(packets.HelloOk(1, 1 << 20, 30_000, "s")))
        self.core.receive_data(codec.encode(packets.LoginResult(0, self.server_ms, b"t", "")))
        self.core.data_to_send()

    def written(self) -> list[int]:
        data = self.core.data_to_send()
        return [codec.decode_body(k, b).client_msg_id for k, _f, b in FrameReader().feed(data) if k in (schema.SEND, schema.BUNDLE)]

    def ack(self, cmid: int, status: int = 0, sent_at: int = 0, seq: int = 1, waiting_for: int | None = None) -> list:
        server_id = seq if waiting_for is None else waiting_for
        return self.core.receive_data(codec.encode(packets.SendAck(cmid, status, server_id, seq, sent_at, 1, "dm:alice:bob", "")))

    def test_pause_then_resend_in_order_a_few_at_a_time(self) -> None:
        ids = [self.core.send(schema.TARGET_USER, "bob", "text/plain", text(n)) for n in range(4)]
        self.assertEqual(self.written(), ids)
        self.assertEqual(self.ack(ids[0], seq=1)[0].__class__.__name__, "SendAcknowledged")
        retry = self.server_ms + 500
        for cmid in ids[1:]:
            self.assertEqual(self.ack(cmid, ErrorCode.RATE_LIMITED, retry, waiting_for=ids[1]), [], "not a failure")
        late = self.core.send(schema.TARGET_USER, "bob", "text/plain", b"late")
        self.assertEqual(self.written(), [], "paused")
        self.assertEqual(self.core.next_deadline(), T0 + 0.5)
        self.clock.advance(0.499)
        self.core.handle_timer()
        self.assertEqual(self.written(), [])
        self.clock.advance(0.001)
        self.core.handle_timer()
        self.assertEqual(self.written(), [ids[1]], "the refused send first, alone")
        self.ack(ids[1], seq=2)
        self.assertEqual(self.written(), [ids[2], ids[3]], "then one more per acknowledgement")
        self.ack(ids[2], seq=3)
        self.assertEqual(self.written(), [late])
        self.ack(ids[3], seq=4)
        self.ack(late, seq=5)
        self.assertEqual(self.core.unacknowledged, 0)
        after = self.core.send(schema.TARGET_USER, "bob", "text/plain", b"after")
        self.assertEqual(self.written(), [after], "all caught up: written at once again")

    def test_resend_timers_wait_for_the_pause(self) -> None:
        ids = [self.core.send(schema.TARGET_USER, "bob", "text/plain", text(n)) for n in range(2)]
        self.written()
        self.ack(ids[1], ErrorCode.RATE_LIMITED, self.server_ms + 5000, waiting_for=ids[1])
        self.clock.advance(2.0)  # the first send's resend is due, but we are paused
        self.core.handle_timer()
        self.assertEqual(self.written(), [])
        self.clock.advance(3.0)
        self.core.handle_timer()
        self.assertEqual(self.written(), [ids[1], ids[0]], "the paused send, then the due resend")

    def test_pause_survives_a_reconnect(self) -> None:
        (cmid,) = [self.core.send(schema.TARGET_USER, "bob", "text/plain", b"x")]
        self.written()
        self.ack(cmid, ErrorCode.RATE_LIMITED, self.server_ms + 3000, waiting_for=cmid)
        self.core.connection_lost()
        self.core.connection_made()
        self.core.data_to_send()
        self.core.receive_data(codec.encode(packets.HelloOk(1, 1 << 20, 30_000, "s")))
        self.core.receive_data(codec.encode(packets.LoginResult(0, self.server_ms + 1000, b"t", "")))
        self.assertEqual(self.written(), [])
        self.clock.advance(3.0)
        self.core.handle_timer()
        self.assertEqual(self.written(), [cmid])


# Against the real hub --------------------------------------------------------------------------


class ClientRetryTests(unittest.SynchronousTestCase):
    def test_rate_limited_sends_arrive_exactly_once_in_order(self) -> None:
        """
        alice sends 60 messages at once to a server that takes 4 per second after a burst of 10:
        every one is acknowledged (none fails), and bob gets each exactly once, in order.
        """
        clock = FakeReactor()
        clock.advance(T0)
        store = MemoryStore()
        for user in ("alice", "bob"):
            self.successResultOf(store.add_user(user, self.successResultOf(PASSWORDS.hash(user + "-pw"))))
        settings = ServerSettings(send_rate=4.0, send_burst=10)
        hub = Hub(store, PASSWORDS, clock, settings)
        endpoint = HubEndpoint(clock, IMServerFactory(hub, settings, clock))
        alice = IMClient(endpoint, "alice", "alice-pw", "phone", reactor=clock, rng=random.Random(1))
        bob = IMClient(endpoint, "bob", "bob-pw", "phone", reactor=clock, rng=random.Random(2))
        heard: list[bytes] = []
        bob.on_message(lambda message: heard.append(message.body))
        for client in (alice, bob):
            client.startService()
        endpoint.pump()
        receipts = [alice.send("bob", text(n)) for n in range(60)]
        outcomes: list[Any] = []
        for d in receipts:
            d.addBoth(outcomes.append)
        for _ in range(2000):
            endpoint.pump()
            if len(heard) == 60 and len(outcomes) == 60:
                break
            clock.advance(0.05)
        self.assertEqual(heard, [text(n) for n in range(60)])
        self.assertEqual([receipt.seq for receipt in outcomes], list(range(1, 61)))
        self.assertGreater(hub.limits.refused[SEND], 0, "the limit was hit")
        self.assertGreaterEqual(clock.seconds() - T0, 50 / 4 - 1, "at the rate, not faster")
        for client in (alice, bob):
            client.stopService()
        endpoint.pump()


    def test_a_login_refused_for_too_many_connections_is_tried_again(self) -> None:
        clock = FakeReactor()
        clock.advance(T0)
        store = MemoryStore()
        self.successResultOf(store.add_user("alice", self.successResultOf(PASSWORDS.hash("alice-pw"))))
        settings = ServerSettings(max_connections_per_user=1)
        hub = Hub(store, PASSWORDS, clock, settings)
        endpoint = HubEndpoint(clock, IMServerFactory(hub, settings, clock))
        phone = IMClient(endpoint, "alice", "alice-pw", "phone", reactor=clock, rng=random.Random(1))
        laptop = IMClient(endpoint, "alice", "alice-pw", "laptop", reactor=clock, rng=random.Random(2))
        phone.startService()
        endpoint.pump()
        self.successResultOf(phone.loggedIn())
        laptop.startService()
        endpoint.pump()
        self.assertNoResult(laptop.loggedIn())
        self.assertEqual([conn.device for conn in hub.online("alice")], ["phone"])
        phone.stopService()
        endpoint.pump()
        for _ in range(100):
            clock.advance(1)
            endpoint.pump()
            if laptop.loggedIn().called:
                break
        self.successResultOf(laptop.loggedIn())
        self.assertEqual([conn.device for conn in hub.online("alice")], ["laptop"])
        laptop.stopService()
        endpoint.pump()


# Attack on a real listener ---------------------------------------------------------------------


def client_hello() -> bytes:
    """The first flight of a real TLS client, to dribble out byte by byte."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


class Attacker(protocol.Protocol):
    """Connects, then does what ``mode`` says: nothing, a byte of a ClientHello every 0.2 s, or a huge frame."""

    def __init__(self, mode: str, log: dict) -> None:
        self.mode = mode
        self.log = log
        self.call: Any = None

    def connectionMade(self) -> None:
        self.log["made"] += 1
        if self.mode == "slowloris":
            self.left = client_hello()
            self.call = reactor.callLater(0.2, self.dribble)
        elif self.mode == "oversized":
            self.transport.write(b"\x7f\xff\xff\xff" + b"\x00\x05\x00" + b"A" * 4096)

    def dribble(self) -> None:
        self.call = None
        if self.left:
            self.transport.write(self.left[:1])
            self.left = self.left[1:]
            self.call = reactor.callLater(0.2, self.dribble)

    def dataReceived(self, data: bytes) -> None:
        self.log["bytes"] += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.log["lost"] += 1
        if self.call is not None and self.call.active():
            self.call.cancel()


class AttackFactory(protocol.ClientFactory):
    def __init__(self, mode: str, log: dict) -> None:
        self.mode = mode
        self.log = log

    def buildProtocol(self, addr: Any) -> Attacker:
        return Attacker(self.mode, self.log)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.log["failed"] += 1


class AttackTests(unittest.TestCase):
    """
    Slowloris, a connection flood and oversized frames from 127.0.0.2 while alice and bob chat
    from 127.0.0.1: every one of alice's messages reaches bob once, in order, and every hostile
    connection is closed by the server.
    """

    timeout = 60

    def setUp(self) -> None:
        import socket

        for source in ("127.0.0.2", "127.0.0.3"):
            with socket.socket() as probe:
                try:
                    probe.bind((source, 0))
                except OSError:
                    raise unittest.SkipTest(f"cannot connect from {source} here (Linux routes all of 127/8 to loopback)")

    async def run_attack(self) -> None:
        options = tap.Options()
        options.parseOptions(
            [
                "--listen", "tls:0:interface=127.0.0.1", "--store", "memory:", "--handshake-timeout", "1",
                "--login-timeout", "2", "--max-connections-per-ip", "20", "--send-rate", "50", "--send-burst", "50",
            ]
        )
        service = tap.makeService(options, reactor=reactor, passwords=PASSWORDS)
        service.startService()
        self.addCleanup(service.stopService)
        (port,) = await service.whenListening()
        port = port.getHost().port
        for name in ("alice", "bob"):
            await service.store.add_user(name, await PASSWORDS.hash(f"{name}-pw"))

        logs = {mode: {"made": 0, "lost": 0, "bytes": 0, "failed": 0} for mode in ("idle", "slowloris", "oversized")}
        connectors = []

        def attack(mode: str, count: int, source: str) -> None:
            for _ in range(count):
                connectors.append(reactor.connectTCP("127.0.0.1", port, AttackFactory(mode, logs[mode]), bindAddress=(source, 0)))

        attack("idle", 60, "127.0.0.2")  # a flood of connections that never say a thing
        attack("slowloris", 10, "127.0.0.3")
        for _ in range(5):
            endpoint = tls_endpoint(reactor, f"localhost:{port}", development_ca())
            oversized = await endpoint.connect(AttackFactory("oversized", logs["oversized"]))
            connectors.append(oversized.transport)

        clients = []
        for name in ("alice", "bob"):
            client = IMClient(tls_endpoint(reactor, f"localhost:{port}", development_ca()), name, f"{name}-pw", "honest", reactor=reactor)
            client.startService()
            self.addCleanup(client.stopService)
            clients.append(client)
        alice, bob = clients
        heard: list[bytes] = []
        done: defer.Deferred = defer.Deferred()

        def hear(message: Any) -> None:
            heard.append(message.body)
            if len(heard) == 20 and not done.called:
                done.callback(None)

        bob.on_message(hear)
        await bob.caughtUp()
        await alice.loggedIn()
        for n in range(20):
            await alice.send("bob", text(n))
            await deferLater(reactor, 0.05, lambda: None)
        await done
        self.assertEqual(heard, [text(n) for n in range(20)])

        # The server has dropped every hostile connection by now or shortly (bounded wait).
        total = sum(log["made"] for log in logs.values())
        for _ in range(100):
            if sum(log["lost"] for log in logs.values()) + sum(log["failed"] for log in logs.values()) >= total:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual({mode: log["lost"] for mode, log in logs.items()}, {mode: log["made"] for mode, log in logs.items()})
        stats = service.factory.stats
        self.assertGreaterEqual(stats["handshake_timeouts"], 10 + 20)
        self.assertGreaterEqual(stats["refused"], 10, "60 from one address, at most 20 at once")
        self.assertEqual(logs["idle"]["bytes"], 0, "nothing but a closed connection for the flood")
        self.assertGreater(logs["oversized"]["bytes"], 0, "the oversized frame got its Error")
        self.assertEqual(service.factory.per_ip["127.0.0.2"], 0)

    def test_honest_clients_get_through_an_attack(self) -> defer.Deferred:
        return defer.ensureDeferred(self.run_attack())
