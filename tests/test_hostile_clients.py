"""
A hostile client logs in as a real user (mallory) over the real protocol and tries what it may
not: to send as someone else, to read, sync or ack conversations it is not in, to guess
conversation and message ids, to recall or edit what others said, to run groups it does not own,
to log in as others, and to exceed the limits.

Every attempt gets an error (or is ignored) and changes nothing: the whole store (messages,
heads, cursors, read marks, relations, memberships, dedupe records, tokens, the server id
counter) is snapshot before and after and must be identical, the honest users' connections hear
nothing, and their own view of every conversation (a full sync) is what it was.

The suite runs on the memory store and on SQLite (``ServerConnection`` + ``Hub`` over
``StringTransport``, time from a ``task.Clock``), and a few attempts again over loopback TLS
against a ``twistd imkit`` service.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import sqlite3
import tempfile
from typing import Any

import attrs

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from imkit import operations
from imkit.model import Item
from imkit.passwords import Passwords
from imkit.server.hub import Hub
from imkit.server.limits import Limits
from imkit.server.protocol import IMServerFactory
from imkit.session.server import CLOSED
from imkit.session.settings import ServerSettings
from imkit.store import SQLiteStore
from imkit.store.memory import MemoryStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.framing import FrameReader

T0 = 1_700_000_000
PASSWORDS = Passwords.fast_for_tests()
TEXT = "text/plain"
AB, AM, BC = "dm:alice:bob", "dm:alice:mallory", "dm:bob:carol"
HONEST = (("alice", "phone"), ("alice", "laptop"), ("bob", "phone"), ("carol", "phone"))
PUSHES = (packets.Deliver, packets.DeliverBundle, packets.Heads)


class TrackingStore:
    """The store the hub sees: the real one, counting the calls whose Deferreds have not fired."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pending = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            if isinstance(result, defer.Deferred):
                self.pending += 1

                def done(outcome: Any) -> Any:
                    self.pending -= 1
                    return outcome

                result.addBoth(done)
            return result

        return call


class Peer:
    """One client connection over a StringTransport: the server protocol under test and a reader."""

    def __init__(self, factory: IMServerFactory, ip: str) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.reader = FrameReader(factory.settings.max_frame)
        self.inbox: list[Any] = []

    def send(self, *items: Any) -> None:
        self.protocol.dataReceived(b"".join(item if isinstance(item, bytes) else codec.encode(item) for item in items))

    def take(self) -> list[Any]:
        """Everything received since the last call (and pushes set aside by ``answers``)."""
        data = self.transport.value()
        self.transport.clear()
        found = self.inbox + [codec.decode_body(kind, body) for kind, _flags, body in self.reader.feed(data)]
        self.inbox = []
        return found

    def answers(self) -> list[Any]:
        """What was received but deliveries, which are kept for the next ``take``."""
        found = self.take()
        self.inbox = [p for p in found if isinstance(p, PUSHES)]
        return [p for p in found if not isinstance(p, PUSHES)]

    @property
    def session(self) -> Any:
        return self.protocol.session

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.session.state == CLOSED


def dump_sqlite(path: str) -> dict[str, list]:
    """Every row of every table (and SQLite's autoincrement counters), in a stable order."""
    connection = sqlite3.connect(path)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {table: sorted((connection.execute(f'SELECT * FROM "{table}"').fetchall()), key=repr) for table in tables}
    finally:
        connection.close()


class HostileSuite:
    """The attacks; subclasses say which store they run on."""

    timeout = 60
    settings = ServerSettings(
        max_frame=64 * 1024, max_body=16 * 1024, max_unacked=16, ack_timeout=5.0, ack_timeout_max=20.0,
        idle_timeout=100_000.0, login_timeout=100_000.0, probe_burst=10_000,
    )

    def make_store(self) -> Any:
        raise NotImplementedError

    def snapshot(self) -> Any:
        raise NotImplementedError

    async def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.real = self.make_store()
        await self.real.open()
        self.addCleanup(self.real.close)
        for name in ("alice", "bob", "carol", "mallory", "dave"):
            await self.real.add_user(name, await PASSWORDS.hash(f"{name}-pw"))
        self.store = TrackingStore(self.real)
        self.hub = Hub(self.store, PASSWORDS, self.clock, self.settings)
        self.factory = IMServerFactory(self.hub, self.settings, self.clock)
        self._cmid = 1000
        self.tokens: dict[tuple[str, str], bytes] = {}
        self.peers = {}
        for user, device in HONEST + (("mallory", "phone"),):
            self.peers[(user, device)] = await self.login(user, device)
        self.alice, self.bob, self.carol = self.peers[("alice", "phone")], self.peers[("bob", "phone")], self.peers[("carol", "phone")]
        self.mallory = self.peers[("mallory", "phone")]
        await self.honest_history()
        self.views = await self.honest_views()
        self.before = self.snapshot()

    def tearDown(self) -> None:
        self.hub.shutdown()
        self.clock.advance(60)

    # Driving the protocol ----------------------------------------------------------------------

    async def settle(self) -> None:
        """Run the hub until it has nothing left to do: store answers in, coalesced writes out."""
        for _ in range(10_000):
            while [call for call in self.clock.getDelayedCalls() if call.getTime() <= self.clock.seconds()]:
                self.clock.advance(0)
            if not self.store.pending:
                return
            await deferLater(reactor, 0.0005, lambda: None)
        raise AssertionError("the hub never settled")

    async def login(self, user: str, device: str, secret: bytes | None = None, method: int = schema.LOGIN_PASSWORD, ip: str = "10.0.0.1") -> Peer:
        peer = Peer(self.factory, ip)
        peer.send(packets.Hello(1, 1, "test"), packets.Login(method, user, device, secret if secret is not None else f"{user}-pw".encode()))
        await self.settle()
        found = peer.take()
        (result,) = [p for p in found if isinstance(p, packets.LoginResult)]
        peer.result = result
        if result.status == 0:
            self.tokens[(user, device)] = result.resume_token
        return peer

    def cmid(self) -> int:
        self._cmid += 1
        return self._cmid

    async def ask(self, peer: Peer, *items: Any) -> list[Any]:
        """Send packets, let the server answer, return what it said (deliveries are kept for later)."""
        peer.send(*items)
        await self.settle()
        return peer.answers()

    async def send(self, peer: Peer, target_type: int, target: str, *items: Item | bytes) -> packets.SendAck:
        items = tuple(Item(TEXT, item) if isinstance(item, bytes) else item for item in items)
        if len(items) == 1:
            packet: Any = packets.Send(self.cmid(), target_type, target, items[0].content_type, items[0].body)
        else:
            packet = packets.Bundle(self.cmid(), target_type, target, items)
        acks = [p for p in await self.ask(peer, packet) if isinstance(p, packets.SendAck)]
        self.assertEqual(len(acks), 1, acks)
        return acks[0]

    async def ok(self, peer: Peer, target_type: int, target: str, *items: Item | bytes) -> packets.SendAck:
        ack = await self.send(peer, target_type, target, *items)
        self.assertEqual(ack.status, 0, ack.reason)
        return ack

    async def deliver_all(self, skip: Peer | None = None) -> None:
        """Every connection (but ``skip``) reads what it was pushed and acks it, as an honest client would."""
        for _ in range(3):
            await self.settle()
            for peer in self.peers.values():
                if peer is skip:
                    continue
                acks = []
                for packet in peer.take():
                    if isinstance(packet, packets.Deliver):
                        acks.append(packets.DeliverAck(packet.message.conversation, packet.message.seq))
                    elif isinstance(packet, packets.DeliverBundle):
                        acks.append(packets.DeliverAck(packet.messages[-1].conversation, packet.messages[-1].seq))
                    elif isinstance(packet, packets.Heads):
                        acks.extend(packets.DeliverAck(c.conversation, c.seq) for c in packet.heads)
                if acks:
                    peer.send(*acks)

    async def honest_history(self) -> None:
        """A little of everything, made over the protocol: direct chats, groups, contacts, reads."""
        alice, bob, carol, mallory = self.alice, self.bob, self.carol, self.mallory
        for body in (b"hi bob", b"how are you", b"lunch?"):
            await self.ok(alice, schema.TARGET_USER, "bob", body)
        await self.ok(bob, schema.TARGET_USER, "alice", b"fine")
        await self.ok(alice, schema.TARGET_CONVERSATION, AB, operations.contact_add())
        await self.ok(bob, schema.TARGET_CONVERSATION, AB, operations.contact_add())
        team = await self.ok(alice, schema.TARGET_NEW_GROUP, "", operations.group_create("Team", ["bob", "carol"]), b"welcome")
        self.team = team.conversation
        await self.ok(carol, schema.TARGET_CONVERSATION, self.team, b"hello team")
        shared = await self.ok(alice, schema.TARGET_NEW_GROUP, "", operations.group_create("Shared", ["bob", "mallory"]))
        self.shared = shared.conversation
        self.alice_in_shared = (await self.ok(alice, schema.TARGET_CONVERSATION, self.shared, b"alice in shared")).seq
        self.mallory_in_shared = (await self.ok(mallory, schema.TARGET_CONVERSATION, self.shared, b"mallory in shared")).seq
        self.alice_to_mallory = (await self.ok(alice, schema.TARGET_USER, "mallory", b"hello mallory")).seq
        self.mallory_to_alice = (await self.ok(mallory, schema.TARGET_USER, "alice", b"hello alice")).seq
        await self.ok(bob, schema.TARGET_USER, "carol", b"psst carol")
        await self.deliver_all()
        await self.ask(bob, packets.Read(2, AB))
        await self.deliver_all()
        for peer in self.peers.values():
            peer.take()

    async def honest_views(self) -> dict[tuple[str, str], Any]:
        """What each honest device gets from a full sync (read-only: it changes no cursor)."""
        views = {}
        for key in HONEST:
            peer = self.peers[key]
            found = await self.ask(peer, packets.Sync(1, 0, 0, ()))
            (result,) = [p for p in found if isinstance(p, packets.SyncResult)]
            views[key] = (result.ranges, result.messages)
        return views

    async def assert_nothing_changed(self) -> None:
        """The store is as it was, honest connections heard nothing, and their views are the same."""
        await self.settle()
        for key in HONEST:
            self.assertEqual(self.peers[key].take(), [], f"{key} heard something")
            self.assertFalse(self.peers[key].closed)
        self.assertEqual(self.snapshot(), self.before)
        self.assertEqual(await self.honest_views(), self.views)
        self.assertEqual(self.snapshot(), self.before)

    async def refused(self, peer: Peer, target_type: int, target: str, *items: Item | bytes, code: ErrorCode | None = None) -> packets.SendAck:
        ack = await self.send(peer, target_type, target, *items)
        self.assertNotEqual(ack.status, 0, f"{target!r} {items!r} was accepted")
        if code is not None:
            self.assertEqual(ack.status, code, ack.reason)
        self.assertEqual((ack.seq, ack.count), (0, 0), "a refusal tells nothing of what is stored")
        if ack.status != ErrorCode.RATE_LIMITED:  # (whose server_id names the send to resend first)
            self.assertEqual(ack.server_id, 0)
        return ack

    # The attacks -------------------------------------------------------------------------------

    async def test_send_as_someone_else(self) -> None:
        """Packets carry no sender: only conversations mallory is in take her messages, as hers."""
        mallory, conv, user = self.mallory, schema.TARGET_CONVERSATION, schema.TARGET_USER
        for target in (AB, "dm:bob:alice", "dm:alice:alice", "dm:bob:bob", BC, "dm:alice:dave", self.team, "g:" + secrets.token_urlsafe(12)):
            await self.refused(mallory, conv, target, b"it's me, alice", code=ErrorCode.NOT_A_MEMBER)
            await self.refused(mallory, conv, target, b"a", b"bundle", code=ErrorCode.NOT_A_MEMBER)
        # Her own direct conversation, spelt backwards, is not a second one.
        await self.refused(mallory, conv, "dm:mallory:alice", b"x", code=ErrorCode.INVALID_TARGET)
        for target in ("dm:alice", "dm::alice", "alice", "team", "", "dm:alice:bob:mallory"):
            await self.refused(mallory, conv, target, b"x", code=ErrorCode.INVALID_TARGET)
        for target in ("alice:bob", "dm:alice:bob", " alice", "alice ", "nobody", "x" * 65):
            await self.refused(mallory, user, target, b"x", code=ErrorCode.UNKNOWN_RECIPIENT)
        await self.refused(mallory, 99, "alice", b"x", code=ErrorCode.INVALID_TARGET)
        await self.refused(mallory, schema.TARGET_NEW_GROUP, self.team, operations.group_create("Mine"), code=ErrorCode.INVALID_TARGET)
        await self.refused(mallory, conv, self.team, operations.group_create("Mine", ["mallory"]), code=ErrorCode.INVALID_OPERATION)
        await self.refused(mallory, conv, self.team, operations.group_add(["mallory"]), code=ErrorCode.NOT_A_MEMBER)
        await self.refused(mallory, conv, self.team, operations.group_leave(), code=ErrorCode.NOT_A_MEMBER)
        await self.assert_nothing_changed()

    async def test_dedupe_is_per_sender(self) -> None:
        """Reusing alice's device name and client message id gets mallory no copy of alice's ack."""
        impostor = await self.login("mallory", "phone")  # the same device name as alice's phone
        self.peers[("mallory", "phone")] = impostor
        alice_ids = [m.client_msg_id for m in (await self.real.read(AB, 0, 10)) if m.sender == "alice"]
        for cmid in alice_ids:
            for target_type, target in ((schema.TARGET_CONVERSATION, AB), (schema.TARGET_CONVERSATION, self.team)):
                ack = [p for p in await self.ask(impostor, packets.Send(cmid, target_type, target, TEXT, b"dup")) if isinstance(p, packets.SendAck)][0]
                self.assertEqual((ack.status, ack.server_id, ack.seq), (ErrorCode.NOT_A_MEMBER, 0, 0))
        # The mallory who logged in again replaced her old connection, nothing else.
        self.before = self.snapshot_without_tokens(self.before)
        self.assertEqual(self.snapshot_without_tokens(self.snapshot()), self.before)

    async def test_read_or_sync_conversations_not_hers(self) -> None:
        mallory = self.mallory
        foreign = (AB, BC, self.team, "dm:bob:alice", "dm:alice:dave")
        cursors = tuple(packets.Cursor(c, 0) for c in foreign)
        (result,) = await self.ask(mallory, packets.Sync(7, schema.SYNC_ONLY_LISTED, 0, cursors))
        self.assertEqual((result.request_id, result.ranges, result.messages), (7, (), ()))
        # Without "only listed" she gets her own conversations, whatever else she names.
        (result,) = await self.ask(mallory, packets.Sync(8, 0, 0, cursors))
        mine = {AM, self.shared}
        self.assertEqual({r.conversation for r in result.ranges}, mine)
        self.assertTrue(result.messages and {m.conversation for m in result.messages} <= mine)
        (result,) = await self.ask(mallory, packets.Sync(9, schema.SYNC_SERVER_CURSORS, 0, cursors))
        self.assertTrue({m.conversation for m in result.messages} <= mine)
        for conversation in foreign:
            (answer,) = await self.ask(mallory, packets.ReceiptsQuery(3, conversation, (1, 2, 3)))
            self.assertEqual((answer.status, answer.counts, answer.readers), (ErrorCode.NOT_A_MEMBER, (), ()))
            # Reads and typing in others' conversations are dropped, and nobody hears of them.
            self.assertEqual(await self.ask(mallory, packets.Read(1, conversation), packets.Typing(True, conversation)), [])
        answers = []
        for group in (self.team, "g:" + secrets.token_urlsafe(12)):
            (answer,) = await self.ask(mallory, packets.Query(4, schema.QUERY_MEMBERS, group))
            answers.append((answer.status, answer.reason, answer.entries))
        self.assertEqual(answers[0], answers[1], "a group she is not in looks like one that does not exist")
        self.assertEqual(answers[0][0], ErrorCode.NOT_A_MEMBER)
        (answer,) = await self.ask(mallory, packets.Query(5, schema.QUERY_GROUPS, ""))
        self.assertEqual([e.name for e in answer.entries], [self.shared])
        # Reading past what she can see of her own conversations marks nothing either.
        self.assertEqual(await self.ask(mallory, packets.Read(99, AM), packets.Read(2**63, self.shared)), [])
        await self.assert_nothing_changed()

    async def test_guess_conversation_and_message_ids(self) -> None:
        mallory = self.mallory
        guesses = [f"dm:{a}:{b}" for a in ("alice", "bob", "carol", "dave") for b in ("alice", "bob", "carol", "dave")]
        guesses += ["g:" + secrets.token_urlsafe(12) for _ in range(20)] + [self.team]
        for start in range(0, len(guesses), 8):
            cursors = tuple(packets.Cursor(c, 0) for c in guesses[start : start + 8])
            (result,) = await self.ask(mallory, packets.Sync(start, schema.SYNC_ONLY_LISTED, 0, cursors))
            self.assertEqual((result.ranges, result.messages), ((), ()))
        # Enumerating sequence numbers to recall or edit: in conversations not hers, and others' in hers.
        for seq in (0, 1, 2, 3, 4, 5, 100, 2**63 - 1, 2**64 - 1):
            for target in (AB, self.team):
                await self.refused(mallory, schema.TARGET_CONVERSATION, target, operations.recall(seq), code=ErrorCode.NOT_A_MEMBER)
                await self.refused(mallory, schema.TARGET_CONVERSATION, target, operations.edit(seq, TEXT, b"edited"), code=ErrorCode.NOT_A_MEMBER)
            for target in (AM, self.shared):
                if (target, seq) in ((AM, self.mallory_to_alice), (self.shared, self.mallory_in_shared)):
                    continue  # her own: she may
                await self.refused(mallory, schema.TARGET_CONVERSATION, target, operations.recall(seq), code=ErrorCode.INVALID_OPERATION)
                await self.refused(mallory, schema.TARGET_CONVERSATION, target, operations.edit(seq, TEXT, b"edited"), code=ErrorCode.INVALID_OPERATION)
        await self.assert_nothing_changed()

    async def test_ack_messages_not_hers(self) -> None:
        """Acks for others' conversations move nobody's cursor and store nothing, not even hers."""
        mallory = self.mallory
        for conversation in (AB, BC, self.team, "dm:bob:alice", "g:" + secrets.token_urlsafe(12)):
            for seq in (1, 2, 5, 2**63 - 1, 2**64 - 1):
                self.assertEqual(await self.ask(mallory, packets.DeliverAck(conversation, seq)), [])
        # The same from a connection whose device name is alice's.
        impostor = await self.login("mallory", "laptop")
        self.peers[("mallory", "laptop")] = impostor
        self.assertEqual(await self.ask(impostor, packets.DeliverAck(AB, 2**64 - 1), packets.DeliverAck(self.team, 2)), [])
        self.assertEqual(await self.real.cursors("mallory", "laptop"), {})
        self.before = self.snapshot_without_tokens(self.before)
        self.assertEqual(self.snapshot_without_tokens(self.snapshot()), self.before)
        await self.settle()
        for key in HONEST:
            self.assertEqual(self.peers[key].take(), [])

    async def test_recall_or_edit_what_others_said(self) -> None:
        mallory, conv = self.mallory, schema.TARGET_CONVERSATION
        for target, seq in ((AM, self.alice_to_mallory), (self.shared, self.alice_in_shared), (self.shared, 1)):
            ack = await self.refused(mallory, conv, target, operations.recall(seq), code=ErrorCode.INVALID_OPERATION)
            self.assertIn("only recall your own", ack.reason)
            await self.refused(mallory, conv, target, operations.edit(seq, TEXT, b"alice said something else"), code=ErrorCode.INVALID_OPERATION)
            # Hidden in a bundle behind something harmless: the whole bundle is refused.
            await self.refused(mallory, conv, target, b"innocent", operations.recall(seq), code=ErrorCode.INVALID_OPERATION)
        for target in (AB, self.team):
            await self.refused(mallory, conv, target, operations.recall(1), code=ErrorCode.NOT_A_MEMBER)
        # Running a group she does not own: removing the owner, setting its retention.
        await self.refused(mallory, conv, self.shared, operations.group_remove(["alice"]), code=ErrorCode.INVALID_OPERATION)
        await self.refused(mallory, conv, self.shared, operations.group_remove(["bob"]), code=ErrorCode.INVALID_OPERATION)
        await self.refused(mallory, conv, self.shared, operations.retention(1), code=ErrorCode.INVALID_OPERATION)
        await self.refused(mallory, conv, self.shared, operations.group_create("Taken over", ["mallory"]), code=ErrorCode.INVALID_OPERATION)
        # Operations that only the server writes, or that do not parse.
        await self.refused(mallory, conv, self.shared, Item(schema.RECALLED, b""), code=ErrorCode.INVALID_OPERATION)
        await self.refused(mallory, conv, self.shared, Item(schema.RECALL, b"\x01"), code=ErrorCode.INVALID_OPERATION)
        await self.refused(mallory, conv, AM, Item("imkit/made-up", b""), code=ErrorCode.INVALID_OPERATION)
        await self.assert_nothing_changed()

    async def test_log_in_as_someone_else(self) -> None:
        mallory_token = self.tokens[("mallory", "phone")]
        for user, device, secret, method in (
            ("alice", "phone", b"mallory-pw", schema.LOGIN_PASSWORD),
            ("alice", "phone", mallory_token, schema.LOGIN_TOKEN),
            ("alice", "mallory-phone", mallory_token, schema.LOGIN_TOKEN),
            ("alice", "phone", b"", schema.LOGIN_CERTIFICATE),
            ("alice", "phone", b"", 77),
            ("alice:bob", "phone", b"alice-pw", schema.LOGIN_PASSWORD),
        ):
            peer = await self.login(user, device, secret, method, ip="10.6.6.6")
            self.assertEqual(peer.result.status, ErrorCode.AUTH_FAILED)
            self.assertTrue(peer.closed)
        # A guessed token.
        peer = await self.login("alice", "phone", secrets.token_bytes(32), schema.LOGIN_TOKEN, ip="10.6.6.6")
        self.assertEqual(peer.result.status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.hub.online("alice")[0].state, "ready")
        await self.assert_nothing_changed()

    async def test_exceed_the_size_limits(self) -> None:
        mallory, conv = self.mallory, schema.TARGET_CONVERSATION
        big = b"x" * (self.settings.max_body + 1)
        ack = await self.refused(mallory, conv, AM, big, code=ErrorCode.TOO_LARGE)
        self.assertIn("exceeds the limit", ack.reason)
        await self.refused(mallory, conv, AM, b"fine", big, code=ErrorCode.TOO_LARGE)
        just = b"x" * self.settings.max_body
        await self.refused(mallory, conv, AM, just, just, just, code=ErrorCode.TOO_LARGE)  # a bundle over half a frame
        await self.refused(mallory, conv, AM, operations.edit(self.mallory_to_alice, TEXT, big), code=ErrorCode.TOO_LARGE)
        self.assertFalse(mallory.closed, "a refused send is not a protocol error")
        # A frame over the limit is refused from its length alone, and the connection closed.
        (error,) = await self.ask(mallory, (self.settings.max_frame + 1).to_bytes(4, "big"))
        self.assertEqual(error.code, ErrorCode.FRAME_TOO_LARGE)
        self.assertTrue(mallory.closed)
        for garbage, code in (
            (b"\x00\x00\x00\x06\x01\x00\x00\x05\xff\xff", ErrorCode.MALFORMED_FRAME),  # a Send cut short
            (b"\x00\x00\x00\x04\x01\x00\x7f\x7f", ErrorCode.UNKNOWN_KIND),
            (b"\x00\x00\x00\x04\x01\x00\x00\x04", ErrorCode.UNKNOWN_KIND),  # a LoginResult: server to client only
            (b"\x00\x00\x00\x04\x05\x00\x00\x0e", ErrorCode.UNSUPPORTED_VERSION),
        ):
            peer = await self.login("mallory", "phone")
            (error,) = await self.ask(peer, garbage)
            self.assertEqual(error.code, code, error.reason)
            self.assertTrue(peer.closed)
        # Logging in again on a logged-in connection is a protocol error, not a second identity.
        peer = await self.login("mallory", "phone")
        (error,) = await self.ask(peer, packets.Login(schema.LOGIN_PASSWORD, "alice", "phone", b"alice-pw"))
        self.assertEqual(error.code, ErrorCode.UNEXPECTED_PACKET)
        self.before = self.snapshot_without_tokens(self.before)
        self.assertEqual(self.snapshot_without_tokens(self.snapshot()), self.before)
        await self.settle()
        for key in HONEST:
            self.assertEqual(self.peers[key].take(), [])

    async def test_never_acking_is_bounded(self) -> None:
        """A reader that never acks gets max_unacked deliveries in flight, resends, and no more."""
        for index in range(40):
            await self.ok(self.alice, schema.TARGET_USER, "mallory", b"%d" % index)
        await self.deliver_all(skip=self.mallory)
        before = self.snapshot()
        limit = self.settings.max_unacked
        self.assertEqual(self.mallory.session.unacked, limit)
        delivered = [p for p in self.mallory.take() if isinstance(p, packets.Deliver)]
        self.assertEqual(len(delivered), limit)
        for _ in range(10):
            self.clock.advance(self.settings.ack_timeout_max)
            await self.settle()
            resent = self.mallory.take()
            self.assertLessEqual(len(resent), limit)
            self.assertLessEqual(self.mallory.session.unacked, limit)
        self.assertEqual(self.snapshot(), before, "nothing was acknowledged, so no cursor moved")
        # Acknowledging makes room, and the conversation's head is announced so it can sync.
        self.mallory.send(packets.DeliverAck(AM, delivered[-1].message.seq))
        await self.settle()
        heads = [p for p in self.mallory.take() if isinstance(p, packets.Heads)]
        self.assertEqual(heads[0].heads[0].conversation, AM)

    async def test_crawler_is_throttled_and_changes_nothing(self) -> None:
        """With the anti-crawler rule on, enumerating others' conversations soon throttles everything she does."""
        self.hub.limits = Limits(attrs.evolve(self.settings, probe_burst=5, probe_interval=10.0), self.clock)
        for index in range(12):
            await self.refused(self.mallory, schema.TARGET_CONVERSATION, f"dm:bob:user{index:03}", b"hi", code=ErrorCode.NOT_A_MEMBER)
        (answer,) = await self.ask(self.mallory, packets.Query(1, schema.QUERY_CONTACTS, ""))
        self.assertEqual(answer.status, ErrorCode.RATE_LIMITED)
        await self.refused(self.mallory, schema.TARGET_CONVERSATION, AM, b"even to her own", code=ErrorCode.RATE_LIMITED)
        await self.assert_nothing_changed()

    def snapshot_without_tokens(self, snapshot: Any) -> Any:
        """Logging mallory in again rotates her own token: everything else must be the same."""
        raise NotImplementedError


class MemoryHostileTests(HostileSuite, TestCase):
    def make_store(self) -> Any:
        return MemoryStore()

    def snapshot(self) -> Any:
        return copy.deepcopy({name: value for name, value in vars(self.real).items() if name != "_view"})

    def snapshot_without_tokens(self, snapshot: Any) -> Any:
        trimmed = dict(snapshot)
        trimmed["_tokens"] = {key: value for key, value in snapshot["_tokens"].items() if key[0] != "mallory"}
        return trimmed


class SQLiteHostileTests(HostileSuite, TestCase):
    def make_store(self) -> Any:
        directory = tempfile.mkdtemp(prefix="imkit-hostile-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "imkit.sqlite3")
        return SQLiteStore(self.path)

    def snapshot(self) -> Any:
        return dump_sqlite(self.path)

    def snapshot_without_tokens(self, snapshot: Any) -> Any:
        trimmed = dict(snapshot)
        trimmed["tokens"] = [row for row in snapshot["tokens"] if row[0] != "mallory"]
        return trimmed


# Over loopback TLS, against the twistd service ---------------------------------------------------


class RawClient(Protocol):
    """Speaks frames, nothing more: sends what it is told and collects every packet answered."""

    def __init__(self) -> None:
        self.reader = FrameReader()
        self.packets: list[Any] = []
        self.waiting: list[tuple[Any, defer.Deferred]] = []
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        for kind, _flags, body in self.reader.feed(data):
            self.packets.append(codec.decode_body(kind, body))
        for entry in list(self.waiting):
            wanted, d = entry
            found = [p for p in self.packets if wanted(p)]
            if found:
                self.waiting.remove(entry)
                d.callback(found[0])

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def wait_for(self, wanted: Any) -> defer.Deferred:
        found = [p for p in self.packets if wanted(p)]
        if found:
            return defer.succeed(found[0])
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((wanted, d))
        d.addTimeout(10, reactor)
        return d

    def send(self, *items: Any) -> None:
        self.transport.write(b"".join(codec.encode(item) for item in items))


class LoopbackTLSHostileTests(TestCase):
    timeout = 60

    async def test_over_tls_against_the_service(self) -> None:
        from imkit.client import IMClient, development_ca, tls_endpoint
        from imkit.server import tap

        directory = tempfile.mkdtemp(prefix="imkit-hostile-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "imkit.sqlite3")
        options = tap.Options()
        options.parseOptions(["--listen", "tls:0:interface=127.0.0.1", "--store", f"sqlite:{path}"])
        service = tap.makeService(options, reactor=reactor, passwords=PASSWORDS)
        service.startService()
        self.addCleanup(service.stopService)
        (port,) = await service.whenListening()
        port = port.getHost().port
        for name in ("alice", "bob", "mallory"):
            await service.store.add_user(name, await PASSWORDS.hash(f"{name}-pw"))

        # Honest alice and bob chat with the client library.
        clients = {}
        for name in ("alice", "bob"):
            client = IMClient(tls_endpoint(reactor, f"localhost:{port}", development_ca()), name, f"{name}-pw", "phone", reactor=reactor)
            client.startService()
            self.addCleanup(client.stopService)
            clients[name] = client
        heard: list[bytes] = []
        clients["bob"].on_message(lambda message: heard.append(message.body))
        for body in (b"one", b"two"):
            await clients["alice"].send("bob", body)
        for _ in range(200):
            if len(heard) == 2:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(heard, [b"one", b"two"])
        await deferLater(reactor, 0.2, lambda: None)  # bob's acks reach the store
        before = dump_sqlite(path)
        mallory_tokens = [row for row in before["tokens"] if row[0] == "mallory"]

        mallory = RawClient()
        endpoint = tls_endpoint(reactor, f"localhost:{port}", development_ca())
        await endpoint.connect(Factory.forProtocol(lambda: mallory))
        mallory.send(packets.Hello(1, 1, "mallory"), packets.Login(schema.LOGIN_PASSWORD, "mallory", "phone", b"mallory-pw"))
        result = await mallory.wait_for(lambda p: isinstance(p, packets.LoginResult))
        self.assertEqual(result.status, 0)
        mallory.send(
            packets.Send(1, schema.TARGET_CONVERSATION, AB, TEXT, b"as alice"),
            packets.Send(2, schema.TARGET_CONVERSATION, "dm:bob:alice", TEXT, b"as alice"),
            packets.Bundle(3, schema.TARGET_CONVERSATION, AB, (operations.recall(1),)),
            packets.Send(4, schema.TARGET_USER, "bob", schema.EDIT, operations.edit(1, TEXT, b"x").body),
            packets.DeliverAck(AB, 2**64 - 1),
            packets.Read(1, AB),
            packets.Sync(5, schema.SYNC_ONLY_LISTED, 0, (packets.Cursor(AB, 0),)),
            packets.ReceiptsQuery(6, AB, (1, 2)),
        )
        acks = {}
        for cmid in (1, 2, 3, 4):
            acks[cmid] = await mallory.wait_for(lambda p, cmid=cmid: isinstance(p, packets.SendAck) and p.client_msg_id == cmid)
        self.assertEqual(
            [acks[c].status for c in (1, 2, 3, 4)],
            [ErrorCode.NOT_A_MEMBER, ErrorCode.NOT_A_MEMBER, ErrorCode.NOT_A_MEMBER, ErrorCode.INVALID_OPERATION],
        )
        sync = await mallory.wait_for(lambda p: isinstance(p, packets.SyncResult))
        self.assertEqual((sync.ranges, sync.messages), ((), ()))
        receipts = await mallory.wait_for(lambda p: isinstance(p, packets.ReceiptsResult))
        self.assertEqual(receipts.status, ErrorCode.NOT_A_MEMBER)
        mallory.send(packets.Ping(1))
        await mallory.wait_for(lambda p: isinstance(p, packets.Pong))
        # An oversized frame ends her connection.
        mallory.transport.write((options.settings.max_frame + 1).to_bytes(4, "big"))
        error = await mallory.wait_for(lambda p: isinstance(p, packets.Error))
        self.assertEqual(error.code, ErrorCode.FRAME_TOO_LARGE)
        await mallory.lost
        after = dump_sqlite(path)
        self.assertNotEqual([row for row in after["tokens"] if row[0] == "mallory"], mallory_tokens, "her login rotated her token")
        for snapshot in (before, after):
            snapshot["tokens"] = [row for row in snapshot["tokens"] if row[0] != "mallory"]
        self.assertEqual(after, before)
        self.assertEqual(heard, [b"one", b"two"])
