"""
The client library: IMClientProtocol (the adapter) and IMClient (the service), driven by a Clock.

Most tests put a sans-IO ServerConnection on the other end of a StringTransport and script what
the server says, so every byte and every instant is the test's choice.  The last ones run the
real hub over an in-memory connection.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from imkit.client import (
    ClientSettings,
    ClientStopped,
    IMClient,
    IMClientProtocol,
    Item,
    LoginFailed,
    Message,
    Receipt,
    SendRejected,
    SendTimeout,
    StateFileError,
)
from imkit.passwords import Passwords
from imkit.server.protocol import IMServerFactory
from imkit.server.hub import Hub
from imkit.session import events
from imkit.session.client import ClientCore
from imkit.session.server import ServerConnection
from imkit.session.settings import ServerSettings
from imkit.store import MemoryStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.framing import FrameReader

NO_JITTER = ClientSettings(resend_jitter=0.0)


# Fakes -----------------------------------------------------------------------------------------


class FakeThreadPool:
    """Runs 'thread' work at once, or holds it until ``release`` when ``hold`` is set."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Any] = []

    def callInThreadWithCallback(self, on_result: Any, function: Any, *args: Any, **kwargs: Any) -> None:
        def work() -> None:
            try:
                result = function(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)

        if self.hold:
            self.held.append(work)
        else:
            work()

    def release(self) -> None:
        held, self.held = self.held, []
        for work in held:
            work()


class FakeReactor(Clock):
    """A Clock whose thread pool is a FakeThreadPool (what IMClient needs of a reactor)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = FakeThreadPool()

    def getThreadPool(self) -> FakeThreadPool:
        return self.pool

    def callFromThread(self, function: Any, *args: Any, **kwargs: Any) -> None:
        function(*args, **kwargs)


class CountingTransport(StringTransport):
    """A StringTransport that remembers each write separately, to check coalescing."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def decode(data: bytes) -> list[tuple[int, Any]]:
    """(flags, packet) for every frame in ``data``."""
    return [(flags, codec.decode_body(kind, body)) for kind, flags, body in FrameReader().feed(data)]


def message(conversation: str, seq: int, body: bytes = b"hi", sender: str = "bob", remaining: int = 0) -> Message:
    return Message(
        server_id=1000 + seq,
        conversation=conversation,
        seq=seq,
        sender=sender,
        sender_device="laptop",
        client_msg_id=seq,
        sent_at=1_700_000_000_000 + seq,
        content_type="text/plain; charset=utf-8",
        body=body,
        bundle_remaining=remaining,
    )


class Link:
    """One client connection; a ServerConnection on the other end is scripted by the test."""

    def __init__(self, protocol: Any, transport: CountingTransport, clock: Any) -> None:
        self.protocol = protocol  # what the client's factory built (ClientService wraps ours)
        self.transport = transport
        self.server = ServerConnection(clock)
        self.sent: list[tuple[int, Any]] = []
        self.closed = False

    def pull(self) -> list[Any]:
        """Move the client's bytes to the server; return the server's events."""
        data = self.transport.value()
        self.transport.clear()
        self.sent.extend(decode(data))
        return self.server.receive_data(data)

    def push(self, *extra: Any) -> None:
        """Write ``extra`` packets from the server, then move the server's bytes to the client."""
        for packet in extra:
            self.server.send_packet(packet)
        data = self.server.data_to_send()
        if data:
            self.protocol.dataReceived(data)

    def login(self) -> events.SyncRequested:
        """Hello, login accepted; returns the client's sync request (its resends are in ``sent``)."""
        self.pull()
        self.push()
        [request] = self.pull()
        assert isinstance(request, events.LoginRequested), request
        self.server.accept_login(request.user, request.device)
        self.push()
        return next(event for event in self.pull() if isinstance(event, events.SyncRequested))

    def catch_up(self, ranges: tuple[packets.Range, ...] = (), messages: tuple[Message, ...] = ()) -> None:
        """Log in and answer the sync."""
        request = self.login()
        self.push(packets.SyncResult(request.packet.request_id, False, ranges, messages))

    def packets_of(self, cls: type) -> list[Any]:
        return [packet for _, packet in self.sent if isinstance(packet, cls)]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """Each connection attempt succeeds (unless ``refuse``) with a new Link."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.links: list[Link] = []
        self.refuse = False
        self.attempts = 0

    def connect(self, factory: Any) -> defer.Deferred:
        self.attempts += 1
        if self.refuse:
            return defer.fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = CountingTransport()
        link = Link(protocol, transport, self.clock)
        self.links.append(link)
        protocol.makeConnection(transport)
        return defer.succeed(protocol)

    @property
    def link(self) -> Link:
        return self.links[-1]


class Recorder:
    """A SessionObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.found: list[Any] = []
        self.started = 0
        self.ended = 0

    def session_started(self, protocol: Any) -> None:
        self.started += 1

    def session_events(self, protocol: Any, found: list[Any]) -> None:
        self.found.extend(found)

    def session_ended(self, protocol: Any, reason: Any) -> None:
        self.ended += 1


# The protocol adapter --------------------------------------------------------------------------


class ProtocolTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.core = ClientCore(self.clock, "alice", "secret", "phone", NO_JITTER, rng=random.Random(1))
        self.observer = Recorder()
        self.protocol = IMClientProtocol(self.core, self.clock, self.observer)
        self.transport = CountingTransport()
        self.link = Link(self.protocol, self.transport, self.clock)
        self.protocol.makeConnection(self.transport)

    def test_hello_is_written_on_connect(self) -> None:
        """connectionMade starts the session: one write with the Hello, and one armed timer."""
        self.assertEqual(len(self.transport.writes), 1)
        [(_, hello)] = decode(self.transport.value())
        self.assertIsInstance(hello, packets.Hello)
        self.assertEqual(self.observer.started, 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_sends_in_one_turn_are_one_write(self) -> None:
        """Sends made by the application in one reactor turn leave in one write, at the end of the turn."""
        self.link.catch_up()
        self.transport.writes.clear()
        for n in range(3):
            self.core.send(schema.TARGET_USER, "bob", "text/plain", b"%d" % n)
            self.protocol.output_ready()
        self.assertEqual(self.transport.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.transport.writes), 1)
        self.link.pull()
        self.assertEqual([p.body for p in self.link.packets_of(packets.Send)], [b"0", b"1", b"2"])

    def test_received_data_is_answered_in_one_write(self) -> None:
        """The acks for a burst of deliveries wait ack_delay (0.05 s by default), then go out as one write."""
        self.assertEqual(ClientSettings().ack_delay, 0.05)
        self.link.catch_up(ranges=(packets.Range("c", 0, 0),))
        self.link.pull()
        self.transport.writes.clear()
        for seq in (1, 2, 3):
            self.link.server.deliver(message("c", seq))
        self.link.push()
        self.assertEqual(self.transport.writes, [])
        self.clock.advance(NO_JITTER.ack_delay)
        self.assertEqual(len(self.transport.writes), 1)
        self.link.pull()
        self.assertEqual(self.link.packets_of(packets.DeliverAck), [packets.DeliverAck("c", 3)])
        delivered = [e for e in self.observer.found if isinstance(e, events.MessagesDelivered)]
        self.assertEqual([m.seq for e in delivered for m in e.messages], [1, 2, 3])

    def test_deadline_queues_stay_small_behind_a_send_that_waits_long(self) -> None:
        """Acknowledged sends leave nothing behind, even while an older one waits for its ack."""
        conversation = "dm:alice:bob"
        self.link.catch_up(ranges=(packets.Range(conversation, 0, 0),))
        self.core.send(schema.TARGET_USER, "bob", "text/plain", b"never acknowledged")
        seq = 0
        for _ in range(50):
            for n in range(20):
                self.core.send(schema.TARGET_USER, "bob", "text/plain", b"%d" % n)
            self.protocol.output_ready()
            self.clock.advance(0)
            self.link.pull()
            for send in self.link.packets_of(packets.Send)[-20:]:
                seq += 1
                self.link.server.ack(packets.SendAck(send.client_msg_id, 0, seq, seq, 0, 1, conversation, ""))
            self.link.push()
        self.assertEqual(self.core.unacknowledged, 1)
        self.assertLessEqual(len(self.core._expiry), 2 * 21 + 64 + 1)  # at most 21 waited at once
        self.assertLessEqual(len(self.core._first_resends), 2 * 21 + 64 + 1)

    def test_the_acks_of_one_read_deliver_our_own_messages_in_one_event(self) -> None:
        """Our own messages take their place when acknowledged: those of one read in one event, in order."""
        conversation = "dm:alice:bob"
        self.link.catch_up(ranges=(packets.Range(conversation, 0, 0),))
        for n in range(3):
            self.core.send(schema.TARGET_USER, "bob", "text/plain", b"%d" % n)
        self.protocol.output_ready()
        self.clock.advance(0)
        self.link.pull()
        self.observer.found.clear()
        for seq, send in enumerate(self.link.packets_of(packets.Send), 1):
            self.link.server.ack(packets.SendAck(send.client_msg_id, 0, seq, seq, 0, 1, conversation, ""))
        self.link.push()
        kinds = [type(event).__name__ for event in self.observer.found]
        self.assertEqual(kinds, ["SendAcknowledged", "MessagesDelivered", "SendAcknowledged", "SendAcknowledged"])
        [delivered] = [event for event in self.observer.found if isinstance(event, events.MessagesDelivered)]
        self.assertEqual([(m.seq, m.sender, m.body) for m in delivered.messages], [(1, "alice", b"0"), (2, "alice", b"1"), (3, "alice", b"2")])
        self.assertIsInstance(delivered.messages, tuple)

    def delayed_acks(self, **settings: Any) -> None:
        """Start again with delivery acks delayed by 50 ms, caught up in conversation c."""
        self.core = ClientCore(self.clock, "alice", "secret", "phone", ClientSettings(resend_jitter=0.0, ack_delay=0.05, **settings))
        self.protocol = IMClientProtocol(self.core, self.clock, self.observer)
        self.transport = CountingTransport()
        self.link = Link(self.protocol, self.transport, self.clock)
        self.protocol.makeConnection(self.transport)
        self.link.catch_up(ranges=(packets.Range("c", 0, 0),))
        self.link.pull()
        self.transport.writes.clear()

    def test_delayed_acks_wait_then_one_covers_them_all(self) -> None:
        self.delayed_acks()
        for seq in (1, 2):
            self.link.server.deliver(message("c", seq))
            self.link.push()
            self.clock.advance(0.02)
        self.assertEqual(self.transport.value(), b"", "nothing written yet")
        self.assertEqual([m.seq for e in self.observer.found if isinstance(e, events.MessagesDelivered) for m in e.messages], [1, 2])
        self.clock.advance(0.01)  # 50 ms after the first delivery
        self.link.pull()
        self.assertEqual(self.link.packets_of(packets.DeliverAck), [packets.DeliverAck("c", 2)])

    def test_delayed_acks_ride_along_with_other_output_or_go_when_many(self) -> None:
        self.delayed_acks(ack_every=3)
        self.link.server.deliver(message("c", 1))
        self.link.push()
        self.core.send(schema.TARGET_USER, "bob", "text/plain", b"x")
        self.protocol.output_ready()
        self.clock.advance(0)
        self.link.pull()
        self.assertEqual(self.link.packets_of(packets.DeliverAck), [packets.DeliverAck("c", 1)], "with the send")
        for seq in (2, 3, 4):
            self.link.server.deliver(message("c", seq))
            self.link.push()
        self.link.pull()
        self.assertEqual(self.link.packets_of(packets.DeliverAck)[1:], [packets.DeliverAck("c", 4)], "three waiting: at once")

    def test_delayed_acks_go_before_a_goodbye(self) -> None:
        self.delayed_acks()
        self.link.server.deliver(message("c", 1))
        self.link.push()
        self.protocol.say_goodbye()
        self.link.pull()
        self.assertEqual(self.link.packets_of(packets.DeliverAck), [packets.DeliverAck("c", 1)])
        self.assertIsInstance(self.link.sent[-1][1], packets.Bye)

    def test_a_conversation_that_starts_above_its_floor_is_reported(self) -> None:
        """
        A conversation this device has never seen, whose first messages are gone (pruned, or
        from before the user joined), is reported as a hole before what follows is handed over.
        """
        self.link.catch_up(
            ranges=(packets.Range("g:team", 4, 5, skipped_from=0), packets.Range("c", 2, 2)),
            messages=(message("g:team", 5),),
        )
        found = [e for e in self.observer.found if isinstance(e, (events.HistoryUnavailable, events.MessagesDelivered))]
        self.assertEqual(found[0], events.HistoryUnavailable("g:team", 0, 4))
        self.assertEqual([m.seq for e in found[1:] for m in e.messages], [5])
        self.assertNotIn(events.HistoryUnavailable("c", 2, 2), found)

    def test_one_delayed_call_armed_at_the_deadline(self) -> None:
        """The protocol keeps one DelayedCall, never later than the core's next deadline."""
        self.link.catch_up()
        self.core.send(schema.TARGET_USER, "bob", "text/plain", b"x")
        self.protocol.output_ready()
        self.clock.advance(0)
        calls = self.clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].getTime(), self.core.next_deadline())
        self.assertEqual(self.core.next_deadline(), self.clock.seconds() + NO_JITTER.resend_initial)

    def test_early_firing_rearms(self) -> None:
        """A call that fires before the (moved) deadline does nothing but arm itself again."""
        self.link.catch_up()
        first = self.clock.getDelayedCalls()[0].getTime()
        self.clock.advance(first - 1)
        self.link.push(packets.Ping(1))  # our Pong pushes the heartbeat deadline back
        self.transport.clear()
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"")
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), self.core.next_deadline())

    def test_silent_server_is_dropped(self) -> None:
        """After idle_factor heartbeats of silence, CloseConnection aborts the transport."""
        self.link.catch_up()
        self.clock.pump([30.0] * 4)
        self.assertTrue(self.transport.disconnecting)
        self.assertIsInstance(self.observer.found[-1], events.CloseConnection)

    def test_connection_lost_leaves_no_calls(self) -> None:
        self.link.catch_up()
        self.core.send(schema.TARGET_USER, "bob", "text/plain", b"x")
        self.protocol.output_ready()
        self.link.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.observer.ended, 1)
        self.assertEqual(self.core.unacknowledged, 1)

    def test_goodbye_flushes_acks_then_bye(self) -> None:
        """say_goodbye writes the pending acks and a Bye, and nothing afterwards."""
        self.link.catch_up(ranges=(packets.Range("c", 0, 1),), messages=(message("c", 1),))
        self.protocol.say_goodbye()
        self.link.pull()
        self.assertEqual(self.link.packets_of(packets.DeliverAck), [packets.DeliverAck("c", 1)])
        self.assertEqual(self.link.sent[-1][1], packets.Bye(0, "client stopping"))
        self.assertEqual(self.clock.getDelayedCalls(), [])


# The service -------------------------------------------------------------------------------------


class ClientTestCase(unittest.SynchronousTestCase):
    def make_client(self, settings: ClientSettings = NO_JITTER, seed: int = 7, **kwargs: Any) -> IMClient:
        self.reactor = FakeReactor()
        self.endpoint = ScriptedEndpoint(self.reactor)
        self.received: list[Message] = []
        client = IMClient(
            self.endpoint, "alice", "secret", "phone", settings=settings, reactor=self.reactor, rng=random.Random(seed), **kwargs
        )
        client.on_message(self.received.append)
        return client

    @staticmethod
    def unanswered(sent: defer.Deferred) -> defer.Deferred:
        """A send the test leaves unacknowledged: it fails with ClientStopped when the client stops."""
        return sent.addErrback(lambda failure: failure.trap(ClientStopped))

    def stop(self, client: IMClient) -> None:
        """Stop the client, let the connection close, and check that no timer is left behind."""
        stopped = client.stopService()
        for link in self.endpoint.links:
            if link.transport.disconnecting:
                link.close()
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class LoginTests(ClientTestCase):
    def test_logged_in_after_login_result(self) -> None:
        """loggedIn() fires on the LoginResult, not on the TCP connection."""
        client = self.make_client()
        logged_in = client.loggedIn()
        caught_up = client.caughtUp()
        client.startService()
        link = self.endpoint.link
        self.assertNoResult(logged_in)
        request = link.login()
        self.assertIsNone(self.successResultOf(logged_in))
        self.assertTrue(client.logged_in)
        self.assertEqual(request.packet.flags, schema.SYNC_SERVER_CURSORS)
        self.assertNoResult(caught_up)
        link.push(packets.SyncResult(request.packet.request_id, False, (), ()))
        self.successResultOf(caught_up)
        self.successResultOf(client.loggedIn())
        self.stop(client)

    def test_connection_counts_as_made_only_after_login(self) -> None:
        """ClientService's whenConnected (through prepareConnection) waits for the login."""
        client = self.make_client()
        client.startService()
        connected = client._connector.whenConnected()
        self.assertNoResult(connected)
        self.endpoint.link.login()
        self.successResultOf(connected)
        self.stop(client)

    def test_wrong_password_fails_and_stops_reconnecting(self) -> None:
        """A refused login fails loggedIn() and pending sends with LoginFailed, and is not retried."""
        client = self.make_client()
        client.startService()
        logged_in = client.loggedIn()
        sent = client.send("bob", "queued")
        link = self.endpoint.link
        link.pull()
        link.push()
        link.pull()
        link.server.reject_login(ErrorCode.AUTH_FAILED, "wrong user name or password")
        link.push()
        error = self.failureResultOf(logged_in, LoginFailed).value
        self.assertEqual((error.code, error.reason), (ErrorCode.AUTH_FAILED, "wrong user name or password"))
        self.failureResultOf(sent, LoginFailed)
        self.failureResultOf(client.loggedIn(), LoginFailed)
        self.failureResultOf(client.send("bob", "later"), LoginFailed)
        self.assertTrue(link.transport.disconnecting)
        link.close()
        self.reactor.advance(3600)
        self.assertEqual(self.endpoint.attempts, 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.stop(client)

    def test_server_shutting_down_during_login_is_retried(self) -> None:
        """A refusal that means "not now" (SHUTTING_DOWN) is followed by a reconnection."""
        client = self.make_client()
        logged_in = client.loggedIn()
        client.startService()
        link = self.endpoint.link
        link.pull()
        link.push()
        link.pull()
        link.server.reject_login(ErrorCode.SHUTTING_DOWN, "restarting")
        link.push()
        self.assertNoResult(logged_in)
        link.close()
        self.reactor.advance(RECONNECT_AT_MOST)
        self.assertEqual(len(self.endpoint.links), 2)
        self.endpoint.link.login()
        self.successResultOf(logged_in)
        self.stop(client)

    def test_backoff_grows_while_sessions_end_before_login(self) -> None:
        """Connections that die before the login (a TLS failure, say) back off exponentially."""
        client = self.make_client()
        client.startService()
        starts = []
        for _ in range(5):
            starts.append(self.reactor.seconds())
            self.endpoint.link.close()
            [retry] = self.reactor.getDelayedCalls()
            self.reactor.advance(retry.getTime() - self.reactor.seconds())
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        for index, gap in enumerate(gaps):
            base = 2.0**index
            self.assertTrue(base <= gap <= base * 1.5, (index, gap))
        self.stop(client)


RECONNECT_AT_MOST = 1.5


class SendTests(ClientTestCase):
    def setUp(self) -> None:
        self.client = self.make_client()
        self.client.startService()
        self.link = self.endpoint.link
        self.link.catch_up()

    def tearDown(self) -> None:
        self.stop(self.client)

    def ack(self, send: packets.Send, seq: int = 1, count: int = 1, conversation: str = "dm:alice:bob") -> None:
        self.link.server.ack(packets.SendAck(send.client_msg_id, 0, 500 + seq, seq, 1234, count, conversation, ""))
        self.link.push()

    def test_send_gives_a_receipt(self) -> None:
        """A text body is UTF-8 encoded; the ack becomes a Receipt."""
        sent = self.client.send("bob", "grüß")
        self.reactor.advance(0)
        [found] = self.link.pull()
        self.assertEqual(found.packet.body, "grüß".encode())
        self.assertEqual((found.packet.target_type, found.packet.target), (schema.TARGET_USER, "bob"))
        self.assertEqual(found.packet.content_type, "text/plain; charset=utf-8")
        self.ack(found.packet, seq=4)
        self.assertEqual(self.successResultOf(sent), Receipt(found.packet.client_msg_id, 504, "dm:alice:bob", 4, 1234, 1))

    def test_own_messages_are_handed_over(self) -> None:
        """The protocol delivers our own sends too, so a listener prints them."""
        self.link.server.send_packet(packets.SyncResult(99, False, (packets.Range("dm:alice:bob", 0, 0),), ()))
        self.link.push()
        self.client.send("bob", "mine")
        self.reactor.advance(0)
        [found] = self.link.pull()
        self.ack(found.packet)
        self.assertEqual([(m.sender, m.body) for m in self.received], [("alice", b"mine")])

    def test_send_to_a_conversation_and_bundles(self) -> None:
        self.unanswered(self.client.send(conversation="room", body=b"\x00raw", content_type="application/octet-stream"))
        bundle = self.client.send_bundle([("text/plain", "a"), Item("image/png", b"\x89PNG")], conversation="room")
        self.reactor.advance(0)
        send, bundled = [event.packet for event in self.link.pull()]
        self.assertEqual((send.target_type, send.target, send.body), (schema.TARGET_CONVERSATION, "room", b"\x00raw"))
        self.assertEqual(bundled.items, (Item("text/plain", b"a"), Item("image/png", b"\x89PNG")))
        self.ack(bundled, seq=2, count=2, conversation="room")
        self.assertEqual(self.successResultOf(bundle).count, 2)

    def test_target_must_be_one_of_user_or_conversation(self) -> None:
        self.assertRaises(ValueError, self.client.send, "bob", "x", conversation="room")
        self.assertRaises(ValueError, self.client.send, body="x")
        self.assertRaises(ValueError, self.client.send_bundle, [], to="bob")

    def test_rejected_send(self) -> None:
        sent = self.client.send("nobody", "x")
        self.reactor.advance(0)
        [found] = self.link.pull()
        self.link.server.ack(packets.SendAck(found.packet.client_msg_id, ErrorCode.UNKNOWN_RECIPIENT, 0, 0, 0, 0, "", "no user named 'nobody'"))
        self.link.push()
        error = self.failureResultOf(sent, SendRejected).value
        self.assertEqual((error.code, error.reason), (ErrorCode.UNKNOWN_RECIPIENT, "no user named 'nobody'"))

    def test_resends_back_off(self) -> None:
        """Unacknowledged sends are resent, flagged, after 2, 4, 8... seconds (no jitter here)."""
        self.unanswered(self.client.send("bob", "x"))
        self.reactor.advance(0)
        self.link.pull()
        times = []
        for _ in range(4):
            before = len(self.link.packets_of(packets.Send))
            while len(self.link.packets_of(packets.Send)) == before:
                self.reactor.advance(0.25)
                self.link.pull()
            times.append(self.reactor.seconds())
        self.assertEqual([b - a for a, b in zip(times, times[1:])], [4.0, 8.0, 16.0])
        flags = [flags for flags, packet in self.link.sent if isinstance(packet, packets.Send)]
        self.assertEqual(flags, [0] + [schema.FLAG_RESEND] * 4)

    def test_cancel_stops_resending(self) -> None:
        sent = self.client.send("bob", "x")
        self.reactor.advance(0)
        self.link.pull()
        sent.cancel()
        self.failureResultOf(sent, defer.CancelledError)
        self.reactor.advance(60)
        self.link.pull()
        self.assertEqual(len(self.link.packets_of(packets.Send)), 1)

    def test_timeout(self) -> None:
        self.stop(self.client)
        self.client = self.make_client(ClientSettings(send_timeout=10.0))
        self.client.startService()
        self.link = self.endpoint.link
        self.link.catch_up()
        sent = self.client.send("bob", "x")
        self.reactor.advance(9.9)
        self.assertNoResult(sent)
        self.reactor.advance(0.2)
        self.assertEqual(self.failureResultOf(sent, SendTimeout).value.timeout, 10.0)


class JitterTests(ClientTestCase):
    def resend_times(self, seed: int) -> list[float]:
        client = self.make_client(ClientSettings(resend_jitter=0.2), seed=seed)
        client.startService()
        link = self.endpoint.link
        link.catch_up()
        self.unanswered(client.send("bob", "x"))
        times = []
        while len(times) < 3:
            self.reactor.advance(0.01)
            link.pull()
            times.extend([self.reactor.seconds()] * (len(link.packets_of(packets.Send)) - 1 - len(times)))
        self.stop(client)
        return times

    def test_jitter_is_bounded_and_seeded(self) -> None:
        """Resend delays are stretched by up to resend_jitter; a seeded rng repeats them exactly."""
        first = self.resend_times(3)
        self.assertTrue(2.0 <= first[0] <= 2.4 + 0.01, first)
        self.assertTrue(4.0 <= first[1] - first[0] <= 4.8 + 0.01, first)
        self.assertEqual(self.resend_times(3), first)
        self.assertNotEqual(self.resend_times(4), first)


class ReconnectTests(ClientTestCase):
    def test_unacknowledged_and_queued_sends_go_out_after_the_next_login_in_order(self) -> None:
        client = self.make_client()
        client.startService()
        first = self.endpoint.link
        first.catch_up()
        one = client.send("bob", "one")
        self.reactor.advance(0)
        first.pull()
        first.close()
        two = client.send("bob", "two")
        three = client.send("bob", "three")
        self.reactor.advance(RECONNECT_AT_MOST)
        second = self.endpoint.link
        self.assertIsNot(second, first)
        second.login()
        sends = second.packets_of(packets.Send)
        self.assertEqual([s.body for s in sends], [b"one", b"two", b"three"])
        flags = [flags for flags, packet in second.sent if isinstance(packet, packets.Send)]
        self.assertEqual(flags, [schema.FLAG_RESEND, 0, 0])
        for seq, send in enumerate(sends, 1):
            second.server.ack(packets.SendAck(send.client_msg_id, 0, seq, seq, 0, 1, "dm:alice:bob", ""))
        second.push()
        self.assertEqual([self.successResultOf(d).seq for d in (one, two, three)], [1, 2, 3])
        self.stop(client)

    def test_sends_before_start_are_queued(self) -> None:
        client = self.make_client()
        sent = [client.send("bob", body) for body in ("a", "b")]
        client.startService()
        self.endpoint.link.login()
        self.assertEqual([s.body for s in self.endpoint.link.packets_of(packets.Send)], [b"a", b"b"])
        self.assertEqual(len(self.endpoint.link.transport.writes), 3)  # Hello, Login, sends + sync
        for d in sent:
            self.assertNoResult(d)
        self.stop(client)
        for d in sent:
            self.failureResultOf(d, ClientStopped)

    def test_send_timeout_while_disconnected(self) -> None:
        """With no server to talk to, a send still fails after its timeout."""
        client = self.make_client(ClientSettings(send_timeout=5.0))
        self.endpoint.refuse = True
        client.startService()
        sent = client.send("bob", "x")
        self.reactor.advance(5.0)
        self.failureResultOf(sent, SendTimeout)
        self.assertGreater(self.endpoint.attempts, 1)
        self.stop(client)


class DeliveryTests(ClientTestCase):
    def setUp(self) -> None:
        self.client = self.make_client()
        self.client.startService()
        self.link = self.endpoint.link
        self.link.catch_up(ranges=(packets.Range("c", 0, 0),))

    def tearDown(self) -> None:
        self.stop(self.client)

    def test_duplicates_dropped_and_order_restored(self) -> None:
        server = self.link.server
        for seq in (2, 1, 1, 2, 3):
            server.send_packet(packets.Deliver(message("c", seq)))
        self.link.push()
        self.assertEqual([m.seq for m in self.received], [1, 2, 3])

    def test_gap_is_filled_by_a_sync(self) -> None:
        self.link.push(packets.Deliver(message("c", 1)), packets.Deliver(message("c", 3)))
        self.assertEqual([m.seq for m in self.received], [1])
        [request] = [e for e in self.link.pull() if isinstance(e, events.SyncRequested)]
        self.assertEqual(request.packet.flags, schema.SYNC_ONLY_LISTED)
        self.assertEqual(request.packet.cursors, (packets.Cursor("c", 1),))
        self.link.push(packets.SyncResult(request.packet.request_id, False, (packets.Range("c", 1, 3),), (message("c", 2),)))
        self.assertEqual([m.seq for m in self.received], [1, 2, 3])

    def test_gap_at_the_start_of_a_new_conversation_is_filled(self) -> None:
        """A conversation created after the sync whose first delivery went missing is synced from 0."""
        self.link.push(packets.Deliver(message("new", 2)))
        self.assertEqual(self.received, [])
        [request] = [e for e in self.link.pull() if isinstance(e, events.SyncRequested)]
        self.assertEqual(request.packet.cursors, (packets.Cursor("new", 0),))
        self.link.push(packets.SyncResult(request.packet.request_id, False, (packets.Range("new", 0, 2),), (message("new", 1),)))
        self.assertEqual([m.seq for m in self.received], [1, 2])

    def test_callback_errors_do_not_stop_delivery(self) -> None:
        def broken(message: Message) -> None:
            raise RuntimeError("bug in the application")

        self.client.on_message(broken)
        self.link.push(packets.Deliver(message("c", 1)), packets.Deliver(message("c", 2)))
        self.assertEqual([m.seq for m in self.received], [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_async_iteration(self) -> None:
        """messages() yields the same stream in order, and ends when the client stops."""
        seen: list[int] = []

        async def consume() -> str:
            async for m in self.client.messages():
                seen.append(m.seq)
            return "ended"

        done = defer.ensureDeferred(consume())
        self.link.push(packets.Deliver(message("c", 2)), packets.Deliver(message("c", 1)))
        self.link.push(packets.Deliver(message("c", 3)))
        self.assertEqual(seen, [1, 2, 3])
        self.assertNoResult(done)
        self.stop(self.client)
        self.assertEqual(self.successResultOf(done), "ended")


class StateFileTests(ClientTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="imkit-client-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "alice.state")

    def saved(self) -> dict[str, int]:
        with open(self.path) as f:
            document = json.load(f)
        self.assertEqual(document["user"], "alice")
        return document["delivered"]

    def start(self, **kwargs: Any) -> tuple[IMClient, Any]:
        client = self.make_client(state_path=self.path, **kwargs)
        client.startService()
        return client, (self.endpoint.links[-1] if self.endpoint.links else None)

    def test_no_file_means_from_the_beginning(self) -> None:
        """Without a saved file, the client asks for every conversation from seq 0 (not server cursors)."""
        client, link = self.start()
        request = link.login()
        self.assertEqual((request.packet.flags, request.packet.cursors), (0, ()))
        self.stop(client)
        self.assertEqual(self.saved(), {})

    def test_positions_saved_and_resumed(self) -> None:
        client, link = self.start()
        link.catch_up(ranges=(packets.Range("c", 0, 2), packets.Range("d", 0, 1)), messages=(message("c", 1), message("c", 2), message("d", 1)))
        self.assertEqual(self.saved(), {"c": 2, "d": 1})
        self.stop(client)
        client, link = self.start()
        request = link.login()
        self.assertEqual(request.packet.cursors, (packets.Cursor("c", 2), packets.Cursor("d", 1)))
        self.stop(client)

    def test_writes_are_coalesced(self) -> None:
        """One write in flight at a time; the positions written next are the latest ones."""
        client, link = self.start()
        link.catch_up(ranges=(packets.Range("c", 0, 0),))
        self.reactor.pool.hold = True
        for seq in (1, 2, 3):
            link.push(packets.Deliver(message("c", seq)))
        self.assertEqual(len(self.reactor.pool.held), 1)
        self.reactor.pool.release()
        self.assertEqual(self.saved(), {"c": 1})
        self.assertEqual(len(self.reactor.pool.held), 1)
        self.reactor.pool.release()
        self.assertEqual(self.saved(), {"c": 3})
        self.assertEqual(self.reactor.pool.held, [])
        self.reactor.pool.hold = False
        self.stop(client)
        self.assertEqual([name for name in os.listdir(self.directory)], ["alice.state"])

    def test_stopping_in_a_callback_saves_only_what_was_handed_over(self) -> None:
        """Like `imkit listen --count 2`: the third message of the batch was not taken, so it comes again."""
        client, link = self.start()
        link.catch_up(ranges=(packets.Range("c", 0, 0),))
        stopped = []

        def stop_after_two(m: Message) -> None:
            if len(self.received) == 2:
                stopped.append(client.stopService())

        client.on_message(stop_after_two)
        link.push(*(packets.Deliver(message("c", seq)) for seq in (1, 2, 3)))
        self.assertEqual([m.seq for m in self.received], [1, 2])
        link.close()
        self.successResultOf(stopped[0])
        self.assertEqual(self.saved(), {"c": 2})

    def test_unconsumed_iterator_messages_are_not_saved(self) -> None:
        client, link = self.start()
        link.catch_up(ranges=(packets.Range("c", 0, 0),))
        stream = client.messages()
        link.push(*(packets.Deliver(message("c", seq)) for seq in (1, 2, 3)))
        first = self.successResultOf(defer.ensureDeferred(stream.__anext__()))
        self.assertEqual(first.seq, 1)
        self.stop(client)
        self.assertEqual(self.saved(), {"c": 1})

    def test_unusable_file(self) -> None:
        with open(self.path, "w") as f:
            f.write("{not json")
        client, link = self.start()
        error = self.failureResultOf(client.loggedIn(), StateFileError).value
        self.assertIn(self.path, str(error))
        self.assertIn("delete it", str(error))
        self.assertEqual(self.endpoint.links, [])
        self.flushLoggedErrors()
        self.stop(client)
        with open(self.path) as f:
            self.assertEqual(f.read(), "{not json")

    def test_file_of_another_user(self) -> None:
        with open(self.path, "w") as f:
            json.dump({"format": "imkit-client-state", "version": 1, "user": "bob", "delivered": {}}, f)
        client, _ = self.start()
        self.assertIn("belongs to user 'bob'", str(self.failureResultOf(client.loggedIn(), StateFileError).value))
        self.stop(client)


# Against the real hub --------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class HubEndpoint:
    """Connects clients to an IMServerFactory over iosim's in-memory transports."""

    def __init__(self, reactor: FakeReactor, server_factory: IMServerFactory) -> None:
        self.reactor = reactor
        self.server_factory = server_factory
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory: Any) -> defer.Deferred:
        client = factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        self.pumps.append(
            iosim.connect(server, iosim.FakeTransport(server, True), client, iosim.FakeTransport(client, False), greet=False, clock=self.reactor)
        )
        return defer.succeed(client)

    def pump(self) -> None:
        for pump in self.pumps:
            pump.flush()


class HubTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.store = MemoryStore()
        passwords = Passwords.fast_for_tests()
        for user in ("alice", "bob"):
            self.successResultOf(self.store.add_user(user, self.successResultOf(passwords.hash(user + "-pw"))))
        self.hub = Hub(self.store, passwords, self.reactor, ServerSettings())
        self.endpoint = HubEndpoint(self.reactor, IMServerFactory(self.hub, ServerSettings(), self.reactor))
        self.directory = tempfile.mkdtemp(prefix="imkit-client-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def client(self, user: str, password: str | None = None, on_message: Any = None, **kwargs: Any) -> IMClient:
        client = IMClient(self.endpoint, user, password or user + "-pw", "test", reactor=self.reactor, rng=random.Random(user), **kwargs)
        if on_message is not None:
            client.on_message(on_message)
        client.startService()
        self.endpoint.pump()
        return client

    def stop(self, *clients: IMClient, everyone: bool = True) -> None:
        stopping = [client.stopService() for client in clients]
        self.endpoint.pump()
        for d in stopping:
            self.successResultOf(d)
        if everyone:
            # Only the server's own timers may be left; the hub is not a service here.
            self.assertEqual([call for call in self.reactor.getDelayedCalls() if "IMServerProtocol" not in repr(call)], [])

    def test_conversation(self) -> None:
        """alice sends to bob; both see the message in the same place in the conversation."""
        alice, bob = self.client("alice"), self.client("bob")
        self.successResultOf(alice.caughtUp())
        self.successResultOf(bob.caughtUp())
        heard: list[Message] = []
        bob.on_message(heard.append)
        receipts = [alice.send("bob", f"hello {n}") for n in range(3)]
        self.endpoint.pump()
        seqs = [self.successResultOf(d).seq for d in receipts]
        self.assertEqual(seqs, [1, 2, 3])
        self.assertEqual([(m.sender, m.seq, m.body) for m in heard], [("alice", n + 1, b"hello %d" % n) for n in range(3)])
        self.stop(alice, bob)

    def test_wrong_password(self) -> None:
        client = self.client("alice", password="nope")
        self.assertEqual(self.failureResultOf(client.loggedIn(), LoginFailed).value.code, ErrorCode.AUTH_FAILED)
        self.reactor.advance(600)
        self.assertEqual(len(self.endpoint.pumps), 1)
        self.stop(client)

    def test_restarted_bot_resumes_without_loss_or_duplicates(self) -> None:
        state = os.path.join(self.directory, "bob.state")
        heard: list[bytes] = []
        alice = self.client("alice")
        bob = self.client("bob", state_path=state, on_message=lambda m: heard.append(m.body))
        sent = alice.send("bob", "one")
        self.endpoint.pump()
        self.successResultOf(sent)
        self.stop(bob, everyone=False)
        for body in ("two", "three"):
            alice.send("bob", body)
        self.endpoint.pump()
        bob = self.client("bob", state_path=state, on_message=lambda m: heard.append(m.body))
        self.successResultOf(bob.caughtUp())
        self.assertEqual(heard, [b"one", b"two", b"three"])
        self.stop(alice, bob)
