"""
Conversations on the server, end to end through the hub: contacts and the messaging policy,
bundles mixing messages and operations, groups and their visibility floors, large fan-out,
several devices per user, read receipts, typing, presence, queries, recall/edit and retention.

Every test drives a real ``Hub`` through real ``ServerConnection``s over ``StringTransport``s,
with a ``MemoryStore``, fast password hashing and a ``task.Clock``: nothing depends on timing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from imkit import operations
from imkit.checks import Rejected
from imkit.model import Item, Message, Submission, direct_conversation
from imkit.passwords import Passwords
from imkit.rules import Policy
from imkit.server.hub import Hub
from imkit.server.protocol import IMServerFactory
from imkit.session.settings import ServerSettings
from imkit.store.memory import MemoryStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.framing import FrameReader

T0 = 1_700_000_000
TEXT = "text/plain"

# Timers far away, so that advancing the clock (recall windows, retention) resends nothing and
# closes no connection unless a test asks for it.
QUIET = dict(
    ack_timeout=100_000.0,
    ack_timeout_max=100_000.0,
    idle_timeout=1_000_000.0,
    login_timeout=1_000_000.0,
    token_ttl=10_000_000.0,
    presence_grace=0.0,  # arrivals announced at once (PresenceGraceTests cover the default)
)

AB = direct_conversation("alice", "bob")
AC = direct_conversation("alice", "carol")


class Peer:
    """One fake client: a transport, the protocol under test, and what it has received so far."""

    def __init__(self, factory: IMServerFactory, user: str = "?", device: str = "?") -> None:
        self.user = user
        self.device = device
        self.transport = StringTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.reader = FrameReader(factory.settings.max_frame)
        self.frames: list[tuple[int, int, Any]] = []
        self.next_cmid = 0

    def __repr__(self) -> str:
        return f"<Peer {self.user}/{self.device}>"

    def cmid(self) -> int:
        self.next_cmid += 1
        return self.next_cmid

    def send(self, *items: Any) -> None:
        """Write packets (or encoded frames) in one chunk of data."""
        self.protocol.dataReceived(b"".join(i if isinstance(i, bytes) else codec.encode(i) for i in items))
        self.poll()

    def poll(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        for kind, flags, body in self.reader.feed(data):
            self.frames.append((kind, flags, codec.decode_body(kind, body)))

    def take(self, *classes: type) -> list:
        """The packets received and not yet taken (only those of ``classes``, if given)."""
        self.poll()
        if not classes:
            found = [packet for _kind, _flags, packet in self.frames]
            self.frames = []
            return found
        found = [packet for _kind, _flags, packet in self.frames if isinstance(packet, classes)]
        self.frames = [frame for frame in self.frames if not isinstance(frame[2], classes)]
        return found

    def take_frames(self) -> list[tuple[int, int]]:
        self.poll()
        found = [(kind, flags) for kind, flags, _packet in self.frames]
        self.frames = []
        return found

    def messages(self) -> list[Message]:
        """Every message pushed (Deliver and DeliverBundle), in the order they arrived."""
        found = []
        for packet in self.take(packets.Deliver, packets.DeliverBundle):
            if isinstance(packet, packets.Deliver):
                found.append(packet.message)
            else:
                found.extend(packet.messages)
        return found

    def seqs(self, conversation: str | None = None) -> list[int]:
        return [m.seq for m in self.messages() if conversation is None or m.conversation == conversation]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def disconnect(self) -> None:
        self.protocol.connectionLost(None)


class Base(SynchronousTestCase):
    USERS = ("alice", "bob", "carol", "dave")

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        self.passwords = Passwords.fast_for_tests()
        for user in self.USERS:
            self.store.add_user(user, self.passwords.hash(f"{user}-secret").result)
        self.start()

    def tearDown(self) -> None:
        # Nothing a test started may be left half done: every fan-out went out.
        self.assertEqual(len(self.hub._fan_outs), 0)

    def start(self, policy: Policy = Policy(), **settings: Any) -> None:
        """(Re)build the hub on the same store with these settings and policy."""
        self.settings = ServerSettings(**{**QUIET, **settings})
        self.hub = Hub(self.store, self.passwords, self.clock, self.settings, policy)
        self.factory = IMServerFactory(self.hub, self.settings, self.clock)

    # Connections -------------------------------------------------------------------------------

    def connect(self, user: str, device: str = "phone", password: str | None = None) -> tuple[Peer, packets.LoginResult]:
        peer = Peer(self.factory, user, device)
        secret = (password if password is not None else f"{user}-secret").encode()
        peer.send(packets.Hello(1, 1, "test"), packets.Login(schema.LOGIN_PASSWORD, user, device, secret))
        (hello,) = peer.take(packets.HelloOk)
        (result,) = peer.take(packets.LoginResult)
        return peer, result

    def login(self, user: str, device: str = "phone") -> Peer:
        peer, result = self.connect(user, device)
        self.assertEqual((result.status, result.reason), (0, ""))
        return peer

    def pump(self) -> None:
        """Let the reactor turn (coalesced writes, fan-out slices) until nothing is due."""
        self.clock.advance(0)

    # Sending -----------------------------------------------------------------------------------

    def send(
        self, peer: Peer, target: str, body: bytes = b"x", content_type: str = TEXT, target_type: int = schema.TARGET_USER
    ) -> packets.SendAck:
        cmid = peer.cmid()
        peer.send(packets.Send(cmid, target_type, target, content_type, body))
        (ack,) = peer.take(packets.SendAck)
        self.assertEqual(ack.client_msg_id, cmid)
        return ack

    def to(self, peer: Peer, conversation: str, body: bytes = b"x") -> packets.SendAck:
        return self.send(peer, conversation, body, target_type=schema.TARGET_CONVERSATION)

    def op(self, peer: Peer, target: str, item: Item, target_type: int | None = None) -> packets.SendAck:
        if target_type is None:
            target_type = schema.TARGET_CONVERSATION if ":" in target else schema.TARGET_USER
        return self.send(peer, target, item.body, item.content_type, target_type)

    def bundle(self, peer: Peer, target: str, items: tuple[Item, ...], target_type: int | None = None) -> packets.SendAck:
        if target_type is None:
            target_type = schema.TARGET_CONVERSATION if ":" in target else schema.TARGET_USER
        cmid = peer.cmid()
        peer.send(packets.Bundle(cmid, target_type, target, items))
        (ack,) = peer.take(packets.SendAck)
        return ack

    def ok(self, ack: packets.SendAck) -> packets.SendAck:
        self.assertEqual((ack.status, ack.reason), (0, ""))
        return ack

    def refused(self, ack: packets.SendAck, code: ErrorCode) -> packets.SendAck:
        self.assertEqual(ack.status, code, ack.reason)
        self.assertEqual((ack.server_id, ack.seq, ack.count, ack.conversation), (0, 0, 0, ""))
        return ack

    def new_group(self, owner: Peer, users: tuple[str, ...] | list[str], title: str = "Team") -> str:
        ack = self.ok(self.op(owner, "", operations.group_create(title, users), schema.TARGET_NEW_GROUP))
        self.assertTrue(ack.conversation.startswith("g:"), ack.conversation)
        return ack.conversation

    # Store shortcuts ---------------------------------------------------------------------------

    def head(self, conversation: str) -> int:
        return self.store.head(conversation).result

    def stored(self, conversation: str) -> list[Message]:
        return self.store.read(conversation, 0, 10_000).result

    def relate(self, owner: str, other: str, item: Item = None) -> None:
        """Record ``owner``'s contact operation towards ``other`` straight in the store."""
        item = item or operations.contact_add()
        pair = tuple(sorted({owner, other}))
        self.setup_cmid = getattr(self, "setup_cmid", 0) + 1
        submission = Submission(
            owner, "setup", self.setup_cmid, direct_conversation(owner, other), pair, int(self.clock.seconds() * 1000), (item,)
        )
        self.store.append(submission, self.hub.policy).result

    def befriend(self, a: str, b: str) -> None:
        self.relate(a, b)
        self.relate(b, a)

    def sync(self, peer: Peer, cursors: dict[str, int] | None = None, flags: int = 0, limit: int = 500) -> packets.SyncResult:
        given = tuple(packets.Cursor(c, s) for c, s in (cursors or {}).items())
        peer.send(packets.Sync(7, flags, limit, given))
        (result,) = peer.take(packets.SyncResult)
        return result

    def query(self, peer: Peer, what: int, target: str = "") -> packets.QueryResult:
        peer.send(packets.Query(3, what, target))
        (result,) = peer.take(packets.QueryResult)
        return result


# 1. Contacts and the messaging policy ------------------------------------------------------------


class ContactPolicyTests(Base):
    def test_contacts_policy_needs_both_to_add(self) -> None:
        """Under ``contacts`` a message needs mutual contacts; a refused one stores and delivers nothing."""
        self.start(Policy(contacts_only=True))
        alice, bob = self.login("alice"), self.login("bob")
        ack = self.refused(self.send(alice, "bob", b"hi stranger"), ErrorCode.NOT_ALLOWED)
        self.assertIn("contacts", ack.reason)
        self.assertEqual(self.head(AB), 0)
        self.assertEqual(self.store.conversations("bob").result, {})
        self.pump()
        self.assertEqual(bob.take(), [])

        # An add is an operation: it passes, and is a sequenced event both see.
        self.assertEqual(self.ok(self.op(alice, "bob", operations.contact_add())).seq, 1)
        self.pump()
        self.assertEqual([(m.seq, m.content_type, m.sender) for m in bob.messages()], [(1, schema.CONTACT_ADD, "alice")])
        self.refused(self.send(alice, "bob", b"still no"), ErrorCode.NOT_ALLOWED)
        self.refused(self.send(bob, "alice", b"nor me"), ErrorCode.NOT_ALLOWED)
        self.assertEqual(self.head(AB), 1)

        self.assertEqual(self.ok(self.op(bob, "alice", operations.contact_add())).seq, 2)
        self.assertEqual(self.ok(self.send(alice, "bob", b"hello friend")).seq, 3)
        self.assertEqual(self.ok(self.send(bob, "alice", b"hello back")).seq, 4)
        self.pump()
        self.assertEqual([(m.seq, m.body) for m in bob.messages()], [(3, b"hello friend")])
        self.assertEqual([(m.seq, m.body) for m in alice.messages()], [(2, b""), (4, b"hello back")])
        self.assertEqual(self.store.contacts("alice").result, {"bob": schema.RELATION_CONTACT})
        self.assertEqual(self.store.contacts("bob").result, {"alice": schema.RELATION_CONTACT})

    def test_block_refuses_both_ways_under_contacts(self) -> None:
        self.start(Policy(contacts_only=True))
        self.befriend("alice", "bob")
        alice, bob = self.login("alice"), self.login("bob")
        self.ok(self.send(alice, "bob", b"before"))
        self.ok(self.op(alice, "bob", operations.contact_block()))
        head = self.head(AB)
        self.refused(self.send(alice, "bob", b"blocked"), ErrorCode.NOT_ALLOWED)
        self.refused(self.send(bob, "alice", b"let me in"), ErrorCode.NOT_ALLOWED)
        self.refused(self.op(bob, "alice", operations.contact_add()), ErrorCode.NOT_ALLOWED)
        self.assertEqual(self.head(AB), head)
        # Unblocking does not make them contacts again: under ``contacts`` it takes a new add.
        self.ok(self.op(alice, "bob", operations.contact_unblock()))
        self.refused(self.send(bob, "alice", b"now?"), ErrorCode.NOT_ALLOWED)
        self.ok(self.op(alice, "bob", operations.contact_add()))
        self.ok(self.send(bob, "alice", b"now!"))
        self.ok(self.send(alice, "bob", b"welcome back"))

    def test_open_policy_allows_anyone_unless_blocked(self) -> None:
        alice, carol = self.login("alice"), self.login("carol")
        self.ok(self.send(alice, "carol", b"hi, we never met"))
        self.ok(self.send(carol, "alice", b"hi"))
        self.ok(self.op(carol, "alice", operations.contact_block()))
        head = self.head(AC)
        a = self.refused(self.send(alice, "carol", b"hello?"), ErrorCode.NOT_ALLOWED)
        c = self.refused(self.send(carol, "alice", b"no"), ErrorCode.NOT_ALLOWED)
        self.assertNotIn("block", a.reason, "the blocked side is not told it was blocked")
        self.assertIn("block", c.reason)
        self.assertEqual(self.head(AC), head)
        self.pump()
        carol.messages()
        self.ok(self.op(carol, "alice", operations.contact_unblock()))
        self.ok(self.send(alice, "carol", b"again"))
        self.pump()
        self.assertEqual([m.body for m in carol.messages()], [b"again"])
        # Others are unaffected by a block between two users.
        self.ok(self.send(self.login("dave"), "carol", b"hi carol"))

    def test_contact_operations_need_another_user(self) -> None:
        alice = self.login("alice")
        self.refused(self.op(alice, "alice", operations.contact_add()), ErrorCode.INVALID_OPERATION)
        self.refused(self.op(alice, "nobody", operations.contact_add()), ErrorCode.UNKNOWN_RECIPIENT)
        self.refused(self.send(alice, "bob", b"", "imkit/contact.befriend"), ErrorCode.INVALID_OPERATION)
        self.refused(self.send(alice, "bob", b"junk", schema.CONTACT_ADD), ErrorCode.INVALID_OPERATION)
        self.assertEqual(self.store.contacts("alice").result, {})
        self.assertEqual(self.head(AB), 0)


# 2. The seed corner case: goodbye, then remove -----------------------------------------------------


class GoodbyeThenRemoveTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.start(Policy(contacts_only=True))
        self.befriend("alice", "bob")  # seqs 1 and 2
        self.alice, self.bob = self.login("alice"), self.login("bob")

    def assert_goodbye_then_removal(self, first: int) -> None:
        stored = self.stored(AB)[first - 1 :]
        self.assertEqual(
            [(m.seq, m.sender, m.content_type, m.body) for m in stored],
            [(first, "alice", TEXT, b"Goodbye"), (first + 1, "alice", schema.CONTACT_REMOVE, b"")],
        )
        self.assertEqual(self.store.contacts("alice").result, {})
        self.assertEqual(self.store.contacts("bob").result, {"alice": schema.RELATION_CONTACT})
        self.refused(self.send(self.alice, "bob", b"one more thing"), ErrorCode.NOT_ALLOWED)
        self.refused(self.send(self.bob, "alice", b"wait!"), ErrorCode.NOT_ALLOWED)
        self.assertEqual(self.head(AB), first + 1)

    def test_bundle_goodbye_and_remove(self) -> None:
        """One bundle: consecutive seqs, one ack, one DeliverBundle frame; then nothing passes."""
        self.alice.send(packets.Bundle(40, schema.TARGET_USER, "bob", (Item(TEXT, b"Goodbye"), operations.contact_remove())))
        (ack,) = self.alice.take(packets.SendAck)
        self.assertEqual(ack, packets.SendAck(40, 0, ack.server_id, 3, T0 * 1000, 2, AB, ""))
        self.pump()
        self.bob.take(packets.PresenceNotice)
        frames = self.bob.take_frames()
        self.assertEqual(frames, [(schema.DELIVER_BUNDLE, 0)])
        self.assert_goodbye_then_removal(3)
        bundle = self.stored(AB)[2:]
        self.assertEqual([(m.bundle_remaining, m.client_msg_id) for m in bundle], [(1, 40), (0, 40)])

    def test_bundle_pushed_whole_to_bob(self) -> None:
        self.bundle(self.alice, "bob", (Item(TEXT, b"Goodbye"), operations.contact_remove()))
        self.pump()
        (frame,) = self.bob.take(packets.Deliver, packets.DeliverBundle)
        self.assertIsInstance(frame, packets.DeliverBundle)
        self.assertEqual([(m.seq, m.content_type) for m in frame.messages], [(3, TEXT), (4, schema.CONTACT_REMOVE)])

    def test_two_packets_in_one_chunk_apply_in_order(self) -> None:
        remove = operations.contact_remove()
        goodbye, removal = self.alice.cmid(), self.alice.cmid()
        self.alice.send(
            packets.Send(goodbye, schema.TARGET_USER, "bob", TEXT, b"Goodbye"),
            packets.Send(removal, schema.TARGET_USER, "bob", remove.content_type, remove.body),
        )
        acks = self.alice.take(packets.SendAck)
        self.assertEqual([(a.client_msg_id, a.status, a.seq) for a in acks], [(goodbye, 0, 3), (removal, 0, 4)])
        self.pump()
        self.assertEqual([(m.seq, m.content_type) for m in self.bob.messages()], [(3, TEXT), (4, schema.CONTACT_REMOVE)])
        self.assert_goodbye_then_removal(3)

    def test_slow_check_does_not_let_the_removal_overtake(self) -> None:
        """A slow asynchronous check on the goodbye holds back this device's removal behind it."""
        slow = defer.Deferred()
        checked = []

        def check(sender: str, device: str, conversation: str, item: Item) -> Any:
            checked.append(item.content_type)
            if item.body == b"Goodbye":
                return slow
            return None

        self.hub.checks.append(check)
        laptop = self.login("alice", "laptop")
        remove = operations.contact_remove()
        goodbye, removal = self.alice.cmid(), self.alice.cmid()
        self.alice.send(
            packets.Send(goodbye, schema.TARGET_USER, "bob", TEXT, b"Goodbye"),
            packets.Send(removal, schema.TARGET_USER, "bob", remove.content_type, remove.body),
        )
        self.assertEqual(self.alice.take(packets.SendAck), [])
        self.assertEqual(self.head(AB), 2, "the removal waits behind the goodbye")
        self.assertEqual(checked, [TEXT], "the removal is not even checked yet")
        # Other devices and users are not held up by this device's slow check.
        self.assertEqual(self.ok(self.send(self.bob, "alice", b"bye?")).seq, 3)
        self.assertEqual(self.ok(self.send(laptop, "bob", b"from the laptop")).seq, 4)
        self.pump()
        self.bob.messages()
        slow.callback(None)
        self.pump()
        acks = self.alice.take(packets.SendAck)
        self.assertEqual([(a.client_msg_id, a.status, a.seq) for a in acks], [(goodbye, 0, 5), (removal, 0, 6)])
        self.assertEqual([(m.seq, m.body) for m in self.bob.messages()], [(5, b"Goodbye"), (6, b"")])
        self.assert_goodbye_then_removal(5)
        self.assertEqual(self.hub._in_order, {})

    def test_slow_rejection_still_keeps_order(self) -> None:
        """The first is refused by its slow check; the second is applied after that answer."""
        slow = defer.Deferred()
        self.hub.checks.append(lambda s, d, c, item: slow if item.body == b"Goodbye" else None)
        remove = operations.contact_remove()
        ids = [self.alice.cmid() for _ in range(3)]
        self.alice.send(
            packets.Send(ids[0], schema.TARGET_USER, "bob", TEXT, b"Goodbye"),
            packets.Send(ids[1], schema.TARGET_USER, "bob", remove.content_type, remove.body),
            packets.Send(ids[2], schema.TARGET_USER, "bob", TEXT, b"after"),
        )
        self.assertEqual(self.head(AB), 2)
        slow.errback(Rejected("not today"))
        self.pump()
        acks = self.alice.take(packets.SendAck)
        self.assertEqual(
            [(a.client_msg_id, a.status, a.seq) for a in acks],
            [(ids[0], ErrorCode.REJECTED, 0), (ids[1], 0, 3), (ids[2], ErrorCode.NOT_ALLOWED, 0)],
        )
        self.assertEqual([m.content_type for m in self.stored(AB)], [schema.CONTACT_ADD] * 2 + [schema.CONTACT_REMOVE])


# 3. Groups -------------------------------------------------------------------------------------


class GroupTests(Base):
    def test_create_names_the_group_and_members_see_it(self) -> None:
        alice, bob, carol = self.login("alice"), self.login("bob"), self.login("carol")
        ack = self.bundle(alice, "", (operations.group_create("Team", ["bob", "carol"]), Item(TEXT, b"welcome")), schema.TARGET_NEW_GROUP)
        self.ok(ack)
        group = ack.conversation
        self.assertTrue(group.startswith("g:") and len(group) > 8)
        self.assertEqual((ack.seq, ack.count), (1, 2))
        self.pump()
        for peer in (bob, carol):
            (frame,) = peer.take()
            self.assertIsInstance(frame, packets.DeliverBundle)
            self.assertEqual([(m.conversation, m.seq, m.content_type) for m in frame.messages], [(group, 1, schema.GROUP_CREATE), (group, 2, TEXT)])
        members = self.query(bob, schema.QUERY_MEMBERS, group)
        self.assertEqual(
            members.entries,
            (
                packets.Entry(1, schema.ROLE_OWNER, "alice", ""),
                packets.Entry(1, schema.ROLE_MEMBER, "bob", ""),
                packets.Entry(1, schema.ROLE_MEMBER, "carol", ""),
            ),
        )
        # A second new group gets another name.
        self.assertNotEqual(self.new_group(alice, ["bob"]), group)

    def test_new_group_needs_empty_target_and_a_create(self) -> None:
        alice = self.login("alice")
        self.refused(self.op(alice, "g:mine", operations.group_create("T"), schema.TARGET_NEW_GROUP), ErrorCode.INVALID_TARGET)
        self.assertNotEqual(self.send(alice, "", b"hi", target_type=schema.TARGET_NEW_GROUP).status, 0)
        self.refused(self.op(alice, "", operations.group_create("T", ["nobody"]), schema.TARGET_NEW_GROUP), ErrorCode.UNKNOWN_RECIPIENT)
        self.assertEqual(self.query(alice, schema.QUERY_GROUPS).entries, ())

    def test_membership_events_same_order_everywhere(self) -> None:
        """Every device of every member receives the same seqs in the same order."""
        alice, alice2 = self.login("alice"), self.login("alice", "laptop")
        bob, bob2 = self.login("bob"), self.login("bob", "laptop")
        carol = self.login("carol")
        group = self.new_group(alice, ["bob"])  # 1
        self.ok(self.to(bob, group, b"hi all"))  # 2
        self.ok(self.op(bob, group, operations.group_add(["carol", "dave"])))  # 3
        self.ok(self.to(carol, group, b"thanks"))  # 4
        self.ok(self.to(alice2, group, b"from alice's laptop"))  # 5
        self.ok(self.op(carol, group, operations.group_leave()))  # 6
        self.ok(self.to(bob2, group, b"bye carol"))  # 7
        self.ok(self.bundle(alice, group, (Item(TEXT, b"last"), operations.group_remove(["dave"]))))  # 8, 9
        self.pump()
        everything = [m.seq for m in self.stored(group)]
        self.assertEqual(everything, list(range(1, 10)))
        senders = {peer: {m.seq for m in self.stored(group) if (m.sender, m.sender_device) == (peer.user, peer.device)} for peer in (alice, alice2, bob, bob2, carol)}
        for peer, expected in (
            (alice, everything),
            (alice2, everything),
            (bob, everything),
            (bob2, everything),
            (carol, list(range(3, 7))),  # from her join to her leave
        ):
            got = peer.seqs(group)
            self.assertEqual(got, [seq for seq in expected if seq not in senders[peer]], peer)
        self.assertEqual(self.store.members(group).result, ("alice", "bob"))

    def test_removed_member_gets_its_removal_and_nothing_after(self) -> None:
        alice, bob, bob2, carol = self.login("alice"), self.login("bob"), self.login("bob", "laptop"), self.login("carol")
        group = self.new_group(alice, ["bob", "carol"])  # 1
        self.ok(self.to(bob, group, b"hello"))  # 2
        removal = self.ok(self.op(alice, group, operations.group_remove(["bob"]))).seq  # 3
        self.ok(self.to(alice, group, b"now bob is gone"))  # 4
        self.ok(self.op(alice, group, operations.group_add(["dave"])))  # 5
        self.pump()
        self.assertEqual(removal, 3)
        self.assertEqual(bob.seqs(group), [1, 3])
        self.assertEqual(bob2.seqs(group), [1, 2, 3])
        self.assertEqual(carol.seqs(group), [1, 2, 3, 4, 5])
        ack = self.refused(self.to(bob, group, b"hey!"), ErrorCode.NOT_A_MEMBER)
        self.refused(self.op(bob, group, operations.group_add(["bob"])), ErrorCode.NOT_A_MEMBER)
        self.refused(self.op(bob, group, operations.group_leave()), ErrorCode.NOT_A_MEMBER)
        self.assertEqual(self.head(group), 5)
        # Sync: everything up to the removal, nothing after, whatever the cursor says.
        result = self.sync(bob2)
        self.assertEqual(result.ranges, (packets.Range(group, 0, 3, 0),))
        self.assertEqual([m.seq for m in result.messages], [1, 2, 3])
        result = self.sync(bob2, {group: 3}, schema.SYNC_ONLY_LISTED)
        self.assertEqual((result.ranges, result.messages), ((packets.Range(group, 3, 3),), ()))
        result = self.sync(bob2, {group: 4}, schema.SYNC_ONLY_LISTED)
        self.assertEqual((result.ranges, result.messages), ((packets.Range(group, 3, 3),), ()))
        self.assertEqual(self.query(bob, schema.QUERY_MEMBERS, group).status, ErrorCode.NOT_A_MEMBER)
        self.assertEqual(self.query(bob, schema.QUERY_GROUPS).entries, ())
        # Typing from the former member reaches nobody; reading past the removal is not recorded.
        alice.take(), carol.take()
        bob.send(packets.Typing(True, group), packets.Read(5, group))
        self.pump()
        self.assertEqual((alice.take(), carol.take()), ([], []))
        self.assertEqual(self.store.read_marks(group).result, {})
        # Later messages never reach bob's devices.
        self.ok(self.to(carol, group, b"more"))
        self.pump()
        self.assertEqual((bob.take(), bob2.take()), ([], []))

    def test_leave_and_owner_handover(self) -> None:
        alice, bob, carol = self.login("alice"), self.login("bob"), self.login("carol")
        group = self.new_group(alice, ["carol", "bob"])
        self.refused(self.op(bob, group, operations.group_remove(["carol"])), ErrorCode.INVALID_OPERATION)
        self.refused(self.op(alice, group, operations.group_remove(["alice"])), ErrorCode.INVALID_OPERATION)
        self.refused(self.op(alice, group, operations.group_remove(["dave"])), ErrorCode.INVALID_OPERATION)
        self.assertEqual(self.ok(self.op(alice, group, operations.group_leave())).seq, 2)
        self.pump()
        self.assertEqual([(m.seq, m.content_type, m.sender) for m in bob.messages()][-1], (2, schema.GROUP_LEAVE, "alice"))
        self.assertEqual(alice.messages(), [])
        members = self.query(carol, schema.QUERY_MEMBERS, group).entries
        # Everyone joined at seq 1: the tie goes by name.
        self.assertEqual([(e.name, e.state) for e in members], [("bob", schema.ROLE_OWNER), ("carol", schema.ROLE_MEMBER)])
        self.ok(self.op(bob, group, operations.group_remove(["carol"])))
        self.refused(self.to(alice, group), ErrorCode.NOT_A_MEMBER)
        self.refused(self.to(carol, group), ErrorCode.NOT_A_MEMBER)
        self.ok(self.to(bob, group, b"alone"))

    def test_late_joiner_starts_at_its_join(self) -> None:
        alice = self.login("alice")
        group = self.new_group(alice, ["bob"])  # 1
        for i in range(2, 6):
            self.ok(self.to(alice, group, b"before %d" % i))
        self.assertEqual(self.ok(self.op(alice, group, operations.group_add(["dave"]))).seq, 6)
        self.ok(self.to(alice, group, b"after"))  # 7
        dave = self.login("dave")
        result = self.sync(dave)
        # The range starts at the join, and says that what was asked for below it is not there.
        self.assertEqual(result.ranges, (packets.Range(group, 5, 7, skipped_from=0),))
        self.assertEqual([m.seq for m in result.messages], [6, 7])
        # Asking for older messages does not get them.
        result = self.sync(dave, {group: 2}, schema.SYNC_ONLY_LISTED)
        self.assertEqual((result.ranges, [m.seq for m in result.messages]), ((packets.Range(group, 5, 7, 2),), [6, 7]))
        result = self.sync(dave, {group: 6}, schema.SYNC_ONLY_LISTED)
        self.assertEqual((result.ranges, [m.seq for m in result.messages]), ((packets.Range(group, 6, 7, 6),), [7]))
        members = {e.name: e.seq for e in self.query(dave, schema.QUERY_MEMBERS, group).entries}
        self.assertEqual(members, {"alice": 1, "bob": 1, "dave": 6})
        # dave's receipts ask about what he can see only.
        dave.send(packets.ReceiptsQuery(1, group, (2, 6)))
        (answer,) = dave.take(packets.ReceiptsResult)
        self.assertEqual([c.seq for c in answer.counts], [6])

    def test_history_on_join(self) -> None:
        self.start(Policy(history_on_join=True))
        alice = self.login("alice")
        group = self.new_group(alice, ["bob"])
        self.ok(self.to(alice, group, b"old news"))
        self.ok(self.op(alice, group, operations.group_add(["dave"])))
        result = self.sync(self.login("dave"))
        self.assertEqual(result.ranges, (packets.Range(group, 0, 3),))
        self.assertEqual([m.seq for m in result.messages], [1, 2, 3])

    def test_rejoin_after_removal_sees_only_since_rejoining(self) -> None:
        alice = self.login("alice")
        group = self.new_group(alice, ["bob"])  # 1
        self.ok(self.op(alice, group, operations.group_remove(["bob"])))  # 2
        self.ok(self.to(alice, group, b"secret while bob was out"))  # 3
        self.ok(self.op(alice, group, operations.group_add(["bob"])))  # 4
        self.ok(self.to(alice, group, b"welcome back"))  # 5
        bob = self.login("bob")
        result = self.sync(bob)
        self.assertEqual(result.ranges, (packets.Range(group, 3, 5, skipped_from=0),))
        self.assertEqual([m.seq for m in result.messages], [4, 5])

    def test_non_members_learn_nothing(self) -> None:
        """A non-member gets exactly the answers it would get for a group that does not exist."""
        alice, bob, dave = self.login("alice"), self.login("bob"), self.login("dave")
        real = self.new_group(alice, ["bob"])
        self.ok(self.to(alice, real, b"members only"))
        fake = "g:" + "A" * 16
        self.pump()
        alice.take(), bob.take()

        def answers(group: str) -> list:
            found = []
            for ack in (
                self.to(dave, group, b"let me in"),
                self.op(dave, group, operations.group_add(["dave"])),
                self.op(dave, group, operations.group_leave()),
                self.op(dave, group, operations.group_create("mine", ["dave"])),
                self.op(dave, group, operations.retention(1)),
                self.bundle(dave, group, (operations.group_create("mine"), Item(TEXT, b"hi"))),
            ):
                found.append((ack.status, ack.reason, ack.seq, ack.conversation))
            found.append(self.sync(dave, {group: 0}, schema.SYNC_ONLY_LISTED))
            result = self.query(dave, schema.QUERY_MEMBERS, group)
            found.append((result.status, result.reason, result.entries))
            dave.send(packets.ReceiptsQuery(9, group, (1, 2)))
            found.extend(dave.take(packets.ReceiptsResult))
            dave.send(packets.Typing(True, group), packets.Read(1, group))
            found.extend(dave.take())
            return found

        for_real, for_fake = answers(real), answers(fake)
        self.assertEqual([type(x) for x in for_real].count(packets.SyncResult), 1)
        self.assertEqual([type(x) for x in for_real].count(packets.ReceiptsResult), 1)
        self.assertEqual([repr(x).replace(real, "G") for x in for_real], [repr(x).replace(fake, "G") for x in for_fake])
        self.assertTrue(all(a[0] != 0 for a in for_real[:6]), for_real)
        self.assertEqual(for_real[6].ranges, ())
        self.assertEqual(self.head(real), 2)
        self.assertEqual(self.head(fake), 0)
        self.assertEqual(self.store.group(fake).result, None, "no group was created under a chosen name")
        self.assertEqual(self.store.read_marks(real).result, {})
        self.assertEqual(self.sync(dave).ranges, ())
        self.assertEqual(self.query(dave, schema.QUERY_GROUPS).entries, ())
        self.pump()
        self.assertEqual((alice.take(), bob.take()), ([], []))

    def test_group_create_only_through_new_group(self) -> None:
        """Creating a group under a name the client chose is refused the same way for any name."""
        alice = self.login("alice")
        existing = self.new_group(alice, ["bob"])
        answers = set()
        for target in (existing, "g:free-name"):
            ack = self.op(alice, target, operations.group_create("mine", ["bob"]))
            self.refused(ack, ErrorCode.INVALID_OPERATION)
            answers.add((ack.status, ack.reason))
        self.assertEqual(len(answers), 1)
        self.assertIsNone(self.store.group("g:free-name").result)

    def test_sender_and_device_come_from_the_login(self) -> None:
        """No packet lets a user speak, ack, read or type as another user or device."""
        alice, bob = self.login("alice", "phone"), self.login("bob", "phone")
        carol = self.login("carol")
        # Same device name, different users: neither replaces the other.
        self.assertEqual(len(self.hub.online("alice")), 1)
        self.assertEqual(len(self.hub.online("bob")), 1)
        self.assertFalse(alice.closed or bob.closed)
        _peer, result = self.connect("bob", "phone", password="alice-secret")
        self.assertEqual(result.status, ErrorCode.AUTH_FAILED)
        self.assertFalse(bob.closed)
        group = self.new_group(alice, ["bob", "carol"])
        self.ok(self.to(alice, group, b"it is me"))
        self.ok(self.send(alice, "bob", b"direct"))
        self.pump()
        for message in bob.messages():
            self.assertEqual((message.sender, message.sender_device), ("alice", "phone"))
        # Into someone else's direct conversation: refused, and nothing is stored there.
        self.ok(self.send(bob, "carol", b"bob to carol"))
        self.refused(self.send(alice, "dm:bob:carol", b"as bob?", target_type=schema.TARGET_CONVERSATION), ErrorCode.NOT_A_MEMBER)
        self.assertEqual([m.sender for m in self.stored("dm:bob:carol")], ["bob"])
        # Acks, read marks and typing are recorded under the connection's own user and device.
        alice.send(packets.DeliverAck("dm:bob:carol", 1), packets.Read(1, "dm:bob:carol"), packets.Typing(True, "dm:bob:carol"))
        self.pump()
        self.assertEqual(self.store.cursors("bob", "phone").result, {})
        self.assertEqual(self.store.read_marks("dm:bob:carol").result, {})
        bob.take()
        self.assertEqual([m for m in carol.messages() if m.conversation == "dm:bob:carol"], self.stored("dm:bob:carol"))
        self.assertEqual(carol.take(), [])
        # A dm id naming the users in the wrong order is not a second conversation.
        ack = self.send(alice, "dm:bob:alice", b"?", target_type=schema.TARGET_CONVERSATION)
        self.assertNotEqual(ack.status, 0)
        self.assertEqual(self.store.members("dm:bob:alice").result, ())


# 4. Large fan-out ------------------------------------------------------------------------------


class LargeFanOutTests(Base):
    USERS = ("alice",)
    MEMBERS = 5000
    SLICE = 500

    def setUp(self) -> None:
        super().setUp()
        # Users straight into the store, all with one fast hash.
        shared = self.passwords.hash("pw").result
        self.names = [f"m{i:04d}" for i in range(1, self.MEMBERS)]
        for name in self.names:
            self.store.add_user(name, shared)
        self.start(fan_out_slice=self.SLICE)

    def due(self) -> list:
        return [call for call in self.clock.calls if call.getTime() <= self.clock.seconds()]

    def turn(self) -> int:
        """One reactor turn: run what was due when it began (later calls wait for the next), then write."""
        due = self.due()
        for call in due:
            if call in self.clock.calls:
                self.clock.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)
        self.factory.coalescer.flush()
        return len(due)

    def online_member(self, name: str) -> Peer:
        peer, result = self.connect(name, "phone", password="pw")
        self.assertEqual(result.status, 0)
        return peer

    def test_five_thousand_members(self) -> None:
        alice, laptop = self.login("alice"), self.login("alice", "laptop")
        online = {name: self.online_member(name) for name in self.names[::16]}
        online["alice/laptop"] = laptop
        self.assertGreater(len(online), 300)
        group = self.new_group(alice, self.names, "everyone")
        self.assertEqual(len(self.store.members(group).result), self.MEMBERS)
        self.pump()
        for peer in online.values():
            self.assertEqual(peer.seqs(group), [1])
        # Two messages in one chunk, then a third from a member while they are going out.
        alice.send(*(packets.Send(100 + i, schema.TARGET_CONVERSATION, group, TEXT, b"news %d" % i) for i in (1, 2)))
        self.assertEqual([(a.status, a.seq) for a in alice.take(packets.SendAck)], [(0, 2), (0, 3)])
        sofar = {name: [] for name in online}
        for name, peer in online.items():
            self.assertEqual(peer.take(), [], "nothing goes out before the reactor turns")
        turns = 0
        middle = online[self.names[2400]]
        received_after_turn = []
        while self.due():
            self.assertLess(turns, 100)
            self.turn()
            turns += 1
            for name, peer in online.items():
                sofar[name].extend(m.seq for m in peer.messages())
            received_after_turn.append(sum(1 for seqs in sofar.values() if 2 in seqs))
            if turns == 3:
                ack = self.ok(self.to(middle, group, b"me too"))
                self.assertEqual(ack.seq, 4)
            # Never out of order, never twice, at any moment.
            for name, seqs in sofar.items():
                self.assertEqual(seqs, sorted(set(seqs)), name)
        slices = self.MEMBERS // self.SLICE
        self.assertEqual(turns, 3 * slices, "one slice per turn, three messages")
        first = received_after_turn[:slices]
        self.assertEqual(first, sorted(set(first)), "each turn reaches more members")
        self.assertLess(first[0], len(online) // 5, "the first turn serves only the first slice")
        self.assertEqual(first[-1], len(online))
        for name, peer in online.items():
            expected = [2, 3, 4] if peer is not middle else [2, 3]
            self.assertEqual(sofar[name], expected, name)
        self.assertEqual(alice.messages(), [m for m in self.stored(group) if m.seq == 4])
        self.assertEqual(self.hub._fan_out_call, None)

    def test_small_messages_queue_behind_a_large_fan_out(self) -> None:
        """While a large fan-out is under way, a member's later messages never arrive before it."""
        alice = self.login("alice")
        first = self.names[0]
        peer = self.online_member(first)
        group = self.new_group(alice, self.names[: self.SLICE * 2], "big")
        self.pump()
        peer.messages()
        self.ok(self.to(alice, group, b"big one"))  # 2, goes out over two turns
        self.ok(self.send(alice, first, b"direct"))
        self.ok(self.to(alice, group, b"big two"))  # 3
        self.ok(self.send(alice, first, b"direct again"))
        self.pump()
        got = [(m.conversation, m.seq) for m in peer.messages()]
        dm = direct_conversation("alice", first)
        self.assertEqual(got, [(group, 2), (dm, 1), (group, 3), (dm, 2)])

    def test_disconnect_during_fan_out(self) -> None:
        alice = self.login("alice")
        peers = [self.online_member(name) for name in self.names[::500]]
        group = self.new_group(alice, self.names, "big")
        self.pump()
        self.ok(self.to(alice, group, b"x"))
        self.turn()
        for peer in peers[5:]:
            peer.disconnect()
        self.pump()
        for index, peer in enumerate(peers):
            self.assertEqual(peer.seqs(group), [1, 2] if index < 5 else [1])


# 5. Several devices of one user --------------------------------------------------------------------


class MultiDeviceTests(Base):
    def test_own_devices_receive_with_original_ids(self) -> None:
        phone, laptop, bob = self.login("alice", "phone"), self.login("alice", "laptop"), self.login("bob")
        group = self.new_group(phone, ["bob"])
        self.pump()
        self.assertEqual([m.seq for m in laptop.messages()], [1])
        phone.send(packets.Send(4242, schema.TARGET_CONVERSATION, group, TEXT, b"from my phone"))
        phone.send(packets.Send(4243, schema.TARGET_USER, "bob", TEXT, b"dm from my phone"))
        self.assertEqual(len(phone.take(packets.SendAck)), 2)
        self.pump()
        got = [(m.conversation, m.client_msg_id, m.sender, m.sender_device, m.body) for m in laptop.messages()]
        self.assertEqual(
            got,
            [(group, 4242, "alice", "phone", b"from my phone"), (AB, 4243, "alice", "phone", b"dm from my phone")],
        )
        self.assertEqual(phone.take(), [], "not echoed to the sending device")
        self.assertEqual(len(bob.messages()), 3)

    def test_evict_oldest(self) -> None:
        self.start(max_devices=2, device_policy="evict-oldest")
        phone, laptop = self.login("alice", "phone"), self.login("alice", "laptop")
        tablet = self.login("alice", "tablet")
        self.pump()
        (bye,) = phone.take()
        self.assertEqual(bye.code, ErrorCode.TOO_MANY_DEVICES)
        self.assertTrue(phone.closed)
        self.assertFalse(laptop.closed or tablet.closed)
        self.assertEqual([c.device for c in self.hub.online("alice")], ["laptop", "tablet"])
        self.ok(self.send(self.login("bob"), "alice", b"to every device"))
        self.pump()
        self.assertEqual([len(p.messages()) for p in (phone, laptop, tablet)], [0, 1, 1])
        # The next one evicts the laptop, now the oldest.
        self.login("alice", "watch")
        self.pump()
        self.assertTrue(laptop.closed)
        self.assertEqual([c.device for c in self.hub.online("alice")], ["tablet", "watch"])

    def test_refuse(self) -> None:
        self.start(max_devices=2, device_policy="refuse")
        phone, laptop = self.login("alice", "phone"), self.login("alice", "laptop")
        tablet, result = self.connect("alice", "tablet")
        self.assertEqual(result.status, ErrorCode.TOO_MANY_DEVICES)
        self.assertTrue(tablet.closed)
        self.pump()
        self.assertEqual((phone.take(), laptop.take()), ([], []))
        self.assertFalse(phone.closed or laptop.closed)
        self.assertEqual([c.device for c in self.hub.online("alice")], ["phone", "laptop"])
        # Another user is not counted against alice.
        self.login("bob", "tablet")
        # A device already logged in may log in again at the limit: it replaces itself.
        phone2 = self.login("alice", "phone")
        self.pump()
        self.assertTrue(phone.closed)
        self.assertEqual([c.device for c in self.hub.online("alice")], ["laptop", "phone"])
        self.assertFalse(phone2.closed)

    def test_second_login_of_a_device_replaces_the_first(self) -> None:
        first = self.login("alice", "phone")
        second = self.login("alice", "phone")
        self.pump()
        (bye,) = first.take()
        self.assertEqual(bye.code, ErrorCode.OK)
        self.assertTrue(first.closed)
        self.assertEqual(len(self.hub.online("alice")), 1)
        self.ok(self.send(self.login("bob"), "alice", b"which one?"))
        self.pump()
        self.assertEqual((first.take(), [m.body for m in second.messages()]), ([], [b"which one?"]))
        # The old connection going away later does not take the new one offline.
        first.disconnect()
        self.assertEqual(len(self.hub.online("alice")), 1)

    def test_new_device_history(self) -> None:
        self.start(new_device_history=3)
        alice = self.login("alice")
        for i in range(1, 11):
            self.ok(self.send(alice, "bob", b"%d" % i))
        group = self.new_group(alice, ["bob"])
        self.ok(self.to(alice, group, b"g"))
        tablet = self.login("bob", "tablet")
        result = self.sync(tablet, flags=schema.SYNC_SERVER_CURSORS)
        self.assertEqual(result.ranges, (packets.Range(AB, 7, 10), packets.Range(group, 0, 2)))
        self.assertEqual([(m.conversation, m.seq) for m in result.messages], [(AB, 8), (AB, 9), (AB, 10), (group, 1), (group, 2)])
        # Without server cursors the client's own (none: from the start) count.
        result = self.sync(self.login("bob", "watch"))
        self.assertEqual(result.ranges[0], packets.Range(AB, 0, 10))
        # A device with cursors starts at them, and at 0 where it has none.
        phone = self.login("bob", "phone")
        phone.send(packets.DeliverAck(AB, 4))
        result = self.sync(phone, flags=schema.SYNC_SERVER_CURSORS)
        self.assertEqual(result.ranges, (packets.Range(AB, 4, 10), packets.Range(group, 0, 2)))
        self.assertEqual(len(result.messages), 8)


# 6. Receipts, typing, presence, queries --------------------------------------------------------------


class ReceiptTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.alice, self.bob, self.bob2 = self.login("alice"), self.login("bob"), self.login("bob", "laptop")
        self.carol, self.dave = self.login("carol"), self.login("dave")
        self.group = self.new_group(self.alice, ["bob", "carol"])  # 1
        self.ok(self.to(self.alice, self.group, b"read me"))  # 2
        self.pump()
        for peer in (self.alice, self.bob, self.bob2, self.carol, self.dave):
            peer.take()

    def test_read_is_stored_and_pushed(self) -> None:
        self.bob.send(packets.Read(2, self.group))
        self.assertEqual(self.store.read_marks(self.group).result, {"bob": 2})
        self.pump()
        receipt = packets.Receipt(2, self.group, "bob", "phone")
        self.assertEqual(self.bob2.take(), [receipt])
        self.assertEqual(self.alice.take(), [receipt])
        self.assertEqual(self.carol.take(), [receipt])
        self.assertEqual(self.dave.take(), [])
        self.assertEqual(self.bob.take(), [])
        self.assertEqual(self.head(self.group), 2, "receipts are not messages")

    def test_read_beyond_head_or_elsewhere_is_ignored(self) -> None:
        self.bob.send(packets.Read(3, self.group), packets.Read(0, self.group), packets.Read(1, "g:nothing"))
        self.dave.send(packets.Read(1, self.group))
        self.pump()
        self.assertEqual(self.store.read_marks(self.group).result, {})
        for peer in (self.alice, self.bob, self.bob2, self.carol, self.dave):
            self.assertEqual(peer.take(), [])

    def test_receipts_query(self) -> None:
        self.bob.send(packets.Read(2, self.group))
        self.carol.send(packets.Read(1, self.group))
        self.bob2.send(packets.Read(1, self.group))  # an older mark of another device changes nothing
        self.alice.send(packets.Read(2, self.group))  # the sender's own mark is not a reader of hers
        self.alice.send(packets.ReceiptsQuery(5, self.group, (1, 2, 3, 0)))
        (result,) = self.alice.take(packets.ReceiptsResult)
        self.assertEqual(
            result,
            packets.ReceiptsResult(
                5,
                0,
                self.group,
                (packets.ReadCount(1, 2), packets.ReadCount(2, 1)),
                (packets.ReadMark(2, "alice"), packets.ReadMark(2, "bob"), packets.ReadMark(1, "carol")),
            ),
        )
        # Carol's message counts alice as a reader.
        self.ok(self.to(self.carol, self.group, b"mine"))  # 3
        self.alice.send(packets.Read(3, self.group))
        self.carol.send(packets.ReceiptsQuery(6, self.group, (3,)))
        (result,) = self.carol.take(packets.ReceiptsResult)
        self.assertEqual(result.counts, (packets.ReadCount(3, 1),))
        self.dave.send(packets.ReceiptsQuery(6, self.group, (1, 2)))
        (refused,) = self.dave.take(packets.ReceiptsResult)
        self.assertEqual(refused, packets.ReceiptsResult(6, ErrorCode.NOT_A_MEMBER, self.group, (), ()))

    def test_large_group_receipts_go_to_own_devices_only(self) -> None:
        self.start(small_group=2)
        alice, bob, bob2, carol = self.login("alice"), self.login("bob"), self.login("bob", "laptop"), self.login("carol")
        bob.send(packets.Read(2, self.group))
        self.pump()
        self.assertEqual(bob2.take(), [packets.Receipt(2, self.group, "bob", "phone")])
        self.assertEqual((alice.take(), carol.take()), ([], []))
        alice.send(packets.ReceiptsQuery(1, self.group, (2,)))
        (result,) = alice.take(packets.ReceiptsResult)
        self.assertEqual((result.counts, result.readers), ((packets.ReadCount(2, 1),), ()))

    def test_direct_receipt(self) -> None:
        self.ok(self.send(self.alice, "bob", b"dm"))
        self.pump()
        self.bob.take()
        self.bob2.take()
        self.bob2.send(packets.Read(1, AB))
        self.pump()
        self.assertEqual(self.alice.take(), [packets.Receipt(1, AB, "bob", "laptop")])
        self.assertEqual(self.bob.take(), [packets.Receipt(1, AB, "bob", "laptop")])
        self.assertEqual((self.carol.take(), self.dave.take()), ([], []))


class TypingTests(Base):
    def test_forwarded_to_online_members_only_and_never_stored(self) -> None:
        alice, alice2 = self.login("alice"), self.login("alice", "laptop")
        bob, bob2, dave = self.login("bob"), self.login("bob", "laptop"), self.login("dave")
        group = self.new_group(alice, ["bob", "carol"])
        self.pump()
        for peer in (alice2, bob, bob2):
            peer.take()
        alice.send(packets.Typing(True, group))
        self.pump()
        notice = packets.TypingNotice(True, group, "alice", "phone")
        self.assertEqual((bob.take(), bob2.take()), ([notice], [notice]))
        self.assertEqual((alice.take(), alice2.take(), dave.take()), ([], [], []))
        self.assertEqual(self.head(group), 1)
        # A direct conversation that has no messages yet stays empty.
        bob.send(packets.Typing(False, AB))
        self.pump()
        self.assertEqual((alice.take(), alice2.take()), ([packets.TypingNotice(False, AB, "bob", "phone")],) * 2)
        self.assertEqual(self.head(AB), 0)
        self.assertEqual(self.store.conversations("alice").result, {group: 1})
        # Not into a conversation of others, nor of oneself.
        dave.send(packets.Typing(True, AB), packets.Typing(True, group), packets.Typing(True, "dm:dave:dave"), packets.Typing(True, "x"))
        self.pump()
        for peer in (alice, alice2, bob, bob2, dave):
            self.assertEqual(peer.take(), [])

    def test_rate_limited(self) -> None:
        self.start(typing_interval=2.0)
        alice, bob = self.login("alice"), self.login("bob")
        alice.send(*(packets.Typing(True, AB) for _ in range(8)))
        self.pump()
        self.assertEqual(len(bob.take()), 5, "a burst of five, then the rate")
        self.clock.advance(1.0)
        alice.send(packets.Typing(True, AB))
        self.pump()
        self.assertEqual(len(bob.take()), 0)
        self.clock.advance(1.0)
        alice.send(packets.Typing(True, AB), packets.Typing(True, AB))
        self.pump()
        self.assertEqual(len(bob.take()), 1)
        # The bucket is per device; a long pause refills it, to five at most.
        laptop = self.login("alice", "laptop")
        laptop.send(packets.Typing(True, AB))
        self.pump()
        self.assertEqual(len(bob.take()), 1)
        self.clock.advance(100)
        alice.send(*(packets.Typing(False, AB) for _ in range(7)))
        self.pump()
        self.assertEqual(len(bob.take()), 5)

    def test_not_to_someone_who_blocked_the_typer(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        self.ok(self.op(bob, "alice", operations.contact_block()))
        self.pump()
        alice.take()
        alice.send(packets.Typing(True, AB))
        bob.send(packets.Typing(True, AB))
        self.pump()
        self.assertEqual((alice.take(), bob.take()), ([], []))
        self.ok(self.op(bob, "alice", operations.contact_unblock()))
        self.pump()
        alice.take()
        alice.send(packets.Typing(True, AB))
        self.pump()
        self.assertEqual(bob.take(), [packets.TypingNotice(True, AB, "alice", "phone")])

    def test_contacts_policy_applies_to_typing(self) -> None:
        self.start(Policy(contacts_only=True))
        alice, bob = self.login("alice"), self.login("bob")
        alice.send(packets.Typing(True, AB))
        self.pump()
        self.assertEqual(bob.take(), [])
        self.befriend("alice", "bob")
        alice.send(packets.Typing(True, AB))
        self.pump()
        self.assertEqual(bob.take(), [packets.TypingNotice(True, AB, "alice", "phone")])


class PresenceTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.befriend("alice", "bob")
        self.relate("carol", "alice")  # one way only
        self.relate("alice", "dave")
        self.relate("dave", "alice", operations.contact_block())

    def test_online_and_offline_between_mutual_contacts_only(self) -> None:
        bob, carol, dave = self.login("bob"), self.login("carol"), self.login("dave")
        alice = self.login("alice")
        self.assertEqual(alice.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "bob", "")])
        self.pump()
        self.assertEqual(bob.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "alice", "")])
        self.assertEqual((carol.take(), dave.take()), ([], []))
        # A second device of alice: no news for bob; the device learns who is online.
        laptop = self.login("alice", "laptop")
        self.assertEqual(laptop.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "bob", "")])
        self.pump()
        self.assertEqual((bob.take(), alice.take()), ([], []))
        # Status changes go to contacts and the user's other devices.
        alice.send(packets.Presence(schema.PRESENCE_AWAY, "lunch"))
        self.pump()
        away = packets.PresenceNotice(schema.PRESENCE_AWAY, "alice", "lunch")
        self.assertEqual((bob.take(), laptop.take(), alice.take()), ([away], [away], []))
        self.assertEqual((carol.take(), dave.take()), ([], []))
        # A newcomer sees the status alice chose.
        bob2 = self.login("bob", "laptop")
        self.assertEqual(bob2.take(), [away])
        # Offline only when the last device goes.
        alice.disconnect()
        self.pump()
        self.assertEqual((bob.take(), bob2.take()), ([], []))
        laptop.disconnect()
        self.pump()
        offline = packets.PresenceNotice(schema.PRESENCE_OFFLINE, "alice", "")
        self.assertEqual((bob.take(), bob2.take()), ([offline], [offline]))
        self.assertEqual((carol.take(), dave.take()), ([], []))

    def test_invisible(self) -> None:
        bob = self.login("bob")
        alice = self.login("alice")
        self.pump()
        bob.take()
        alice.send(packets.Presence(schema.PRESENCE_OFFLINE, ""))
        self.pump()
        self.assertEqual(bob.take(), [packets.PresenceNotice(schema.PRESENCE_OFFLINE, "alice", "")])
        bob2 = self.login("bob", "laptop")
        self.assertEqual(bob2.take(), [], "an invisible user is not listed as online")
        alice.disconnect()
        self.pump()
        self.assertEqual((bob.take(), bob2.take()), ([], []))

    def test_not_after_contact_removed(self) -> None:
        bob = self.login("bob")
        self.relate("bob", "alice", operations.contact_remove())
        alice = self.login("alice")
        self.pump()
        self.assertEqual((alice.take(), bob.take()), ([], []))

    def test_presence_rate_limited(self) -> None:
        bob = self.login("bob")
        alice = self.login("alice")
        self.pump()
        bob.take()
        alice.send(*(packets.Presence(schema.PRESENCE_BUSY, "%d" % i) for i in range(7)))
        self.pump()
        self.assertEqual([n.text for n in bob.take()], ["0", "1", "2", "3", "4"])


class PresenceGraceTests(Base):
    """With ``presence_grace`` (1 s by default), a login is announced only if the client says nothing first."""

    def setUp(self) -> None:
        super().setUp()
        self.start(presence_grace=ServerSettings().presence_grace)
        self.befriend("alice", "bob")
        self.bob = self.login("bob")
        self.clock.advance(5)

    def test_a_silent_client_is_announced_after_the_grace(self) -> None:
        alice = self.login("alice")
        self.assertEqual(alice.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "bob", "")])
        self.clock.advance(0.9)
        self.assertEqual(self.bob.take(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.bob.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "alice", "")])
        self.assertEqual(alice.take(), [], "nobody tells alice she came")

    def test_a_client_reconnecting_invisible_is_never_seen_online(self) -> None:
        for _ in range(2):
            alice = self.login("alice")
            alice.send(packets.Presence(schema.PRESENCE_OFFLINE, ""))  # what IMClient repeats at login
            self.clock.advance(5)
            alice.disconnect()
            self.clock.advance(5)
            self.assertEqual(self.bob.take(), [])

    def test_a_client_stating_its_presence_is_announced_with_it_once(self) -> None:
        alice = self.login("alice")
        alice.send(packets.Presence(schema.PRESENCE_AWAY, "lunch"))
        self.clock.advance(5)
        self.assertEqual(self.bob.take(), [packets.PresenceNotice(schema.PRESENCE_AWAY, "alice", "lunch")])

    def test_contacts_logging_in_during_the_grace_hear_of_it_when_it_ends(self) -> None:
        alice = self.login("alice")
        bobs_laptop = self.login("bob", "laptop")  # not an arrival: bob is online already
        self.assertEqual(bobs_laptop.take(), [], "alice has not been announced yet")
        self.clock.advance(1)
        self.assertEqual(bobs_laptop.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "alice", "")])
        self.assertEqual(alice.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "bob", "")])

    def test_gone_within_the_grace_is_neither_online_nor_offline(self) -> None:
        alice = self.login("alice")
        self.clock.advance(0.5)
        alice.disconnect()
        self.clock.advance(5)
        self.assertEqual(self.bob.take(), [])

    def test_stopping_announces_no_more_arrivals(self) -> None:
        self.login("alice")
        self.hub.shutdown()
        self.clock.advance(5)
        self.assertEqual(self.bob.take(packets.PresenceNotice), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class QueryTests(Base):
    def test_contacts_members_groups(self) -> None:
        self.befriend("alice", "bob")
        self.relate("alice", "carol", operations.contact_block())
        self.relate("dave", "alice")
        alice, bob, dave = self.login("alice"), self.login("bob"), self.login("dave")
        self.assertEqual(
            self.query(alice, schema.QUERY_CONTACTS),
            packets.QueryResult(
                3,
                0,
                "",
                (packets.Entry(0, schema.RELATION_CONTACT, "bob", ""), packets.Entry(0, schema.RELATION_BLOCKED, "carol", "")),
            ),
        )
        self.assertEqual(self.query(dave, schema.QUERY_CONTACTS).entries, (packets.Entry(0, schema.RELATION_CONTACT, "alice", ""),))
        self.assertEqual(self.query(self.login("carol"), schema.QUERY_CONTACTS).entries, ())

        team = self.new_group(alice, ["bob"], "Team")  # 1
        self.ok(self.to(bob, team, b"hi"))  # 2
        self.ok(self.op(bob, team, operations.group_add(["dave"])))  # 3
        other = self.new_group(bob, ["alice"], "Other")
        self.ok(self.op(bob, other, operations.group_remove(["alice"])))
        members = self.query(dave, schema.QUERY_MEMBERS, team)
        self.assertEqual(
            members.entries,
            (
                packets.Entry(1, schema.ROLE_OWNER, "alice", ""),
                packets.Entry(1, schema.ROLE_MEMBER, "bob", ""),
                packets.Entry(3, schema.ROLE_MEMBER, "dave", ""),
            ),
        )
        self.assertEqual(self.query(alice, schema.QUERY_GROUPS).entries, (packets.Entry(3, schema.ROLE_OWNER, team, "Team"),))
        self.assertEqual(
            self.query(bob, schema.QUERY_GROUPS).entries,
            tuple(sorted((packets.Entry(3, schema.ROLE_MEMBER, team, "Team"), packets.Entry(2, schema.ROLE_OWNER, other, "Other")), key=lambda e: e.name)),
        )
        refused = self.query(alice, schema.QUERY_MEMBERS, other)
        self.assertEqual((refused.status, refused.entries), (ErrorCode.NOT_A_MEMBER, ()))
        for target in ("g:nope", AB, ""):
            self.assertEqual(self.query(alice, schema.QUERY_MEMBERS, target).status, ErrorCode.NOT_A_MEMBER, target)
        self.assertEqual(self.query(alice, 99).status, ErrorCode.INVALID_OPERATION)
        self.assertFalse(alice.closed)


# 7. Recall, edit, retention --------------------------------------------------------------------


class RecallEditTests(Base):
    def test_recall_within_the_window(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        self.ok(self.send(alice, "bob", b"oops"))  # 1
        self.clock.advance(119)
        ack = self.ok(self.op(alice, "bob", operations.recall(1)))
        self.assertEqual(ack.seq, 2)
        first, event = self.stored(AB)
        self.assertEqual((first.content_type, first.body, first.seq, first.sender), (schema.RECALLED, b"", 1, "alice"))
        self.assertEqual((event.content_type, operations.decode(event.content_type, event.body)), (schema.RECALL, operations.Recall(1)))
        self.pump()
        self.assertEqual([(m.seq, m.content_type) for m in bob.messages()], [(1, TEXT), (2, schema.RECALL)])
        result = self.sync(bob)
        self.assertEqual([(m.seq, m.content_type, m.body) for m in result.messages][0], (1, schema.RECALLED, b""))

    def test_recall_outside_the_window_or_of_others(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        self.ok(self.send(alice, "bob", b"keep"))  # 1
        self.ok(self.send(bob, "alice", b"bob's"))  # 2
        self.refused(self.op(alice, "bob", operations.recall(2)), ErrorCode.INVALID_OPERATION)
        self.refused(self.op(alice, "bob", operations.recall(9)), ErrorCode.INVALID_OPERATION)
        self.clock.advance(121)
        ack = self.refused(self.op(alice, "bob", operations.recall(1)), ErrorCode.INVALID_OPERATION)
        self.assertIn("too late", ack.reason)
        self.assertEqual([m.body for m in self.stored(AB)], [b"keep", b"bob's"])
        # Operations are not messages one can recall.
        self.ok(self.op(alice, "bob", operations.contact_add()))  # 3
        self.refused(self.op(alice, "bob", operations.recall(3)), ErrorCode.INVALID_OPERATION)
        self.assertEqual(self.head(AB), 3)

    def test_edit_windows_and_ownership(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        group = self.new_group(alice, ["bob"])  # 1
        self.ok(self.to(alice, group, b"tpyo"))  # 2
        self.clock.advance(600)
        self.refused(self.op(bob, group, operations.edit(2, TEXT, b"hacked")), ErrorCode.INVALID_OPERATION)
        self.refused(self.op(alice, group, operations.edit(2, schema.GROUP_LEAVE, b"")), ErrorCode.INVALID_OPERATION)
        self.assertEqual(self.ok(self.op(alice, group, operations.edit(2, TEXT, b"typo"))).seq, 3)
        self.assertEqual(self.stored(group)[1].body, b"tpyo", "an edit is an event; the original stays")
        self.pump()
        (event,) = [m for m in bob.messages() if m.seq == 3]
        self.assertEqual(operations.decode(event.content_type, event.body), operations.Edit(2, TEXT, b"typo"))
        self.clock.advance(301)
        ack = self.refused(self.op(alice, group, operations.edit(2, TEXT, b"too late")), ErrorCode.INVALID_OPERATION)
        self.assertIn("too late", ack.reason)
        self.refused(self.op(alice, group, operations.recall(2)), ErrorCode.INVALID_OPERATION)
        self.assertEqual(self.head(group), 3)

    def test_windows_follow_the_policy(self) -> None:
        self.start(Policy(recall_window=10, edit_window=20))
        alice = self.login("alice")
        self.ok(self.send(alice, "bob", b"a"))  # 1
        self.clock.advance(15)
        self.refused(self.op(alice, "bob", operations.recall(1)), ErrorCode.INVALID_OPERATION)
        self.ok(self.op(alice, "bob", operations.edit(1, TEXT, b"b")))


class RetentionTests(Base):
    def test_pruned_range_is_reported(self) -> None:
        self.start(retention=60.0)
        alice, bob = self.login("alice"), self.login("bob")
        for i in range(1, 4):
            self.ok(self.send(alice, "bob", b"old %d" % i))
        self.clock.advance(61)
        for i in range(4, 6):
            self.ok(self.send(alice, "bob", b"new %d" % i))
        self.assertEqual(self.hub.prune().result, {AB: 3})
        # The range starts at the floor and reports the pruned part (from where the client asked).
        for result, asked in ((self.sync(bob, {AB: 0}), 0), (self.sync(bob), 0), (self.sync(bob, {AB: 1}, schema.SYNC_ONLY_LISTED), 1)):
            self.assertEqual(result.ranges, (packets.Range(AB, 3, 5, skipped_from=asked),))
            self.assertEqual([m.seq for m in result.messages], [4, 5])
        result = self.sync(bob, {AB: 4})
        self.assertEqual((result.ranges, [m.seq for m in result.messages]), ((packets.Range(AB, 4, 5, 4),), [5]))
        # Everything gone: the range says so, and sending goes on from the head.
        self.clock.advance(61)
        self.assertEqual(self.hub.prune().result, {AB: 5})
        result = self.sync(bob)
        self.assertEqual((result.ranges, result.messages), ((packets.Range(AB, 5, 5, 0),), ()))
        self.assertEqual(self.ok(self.send(alice, "bob", b"fresh")).seq, 6)
        self.assertEqual(self.hub.prune().result, {})

    def test_conversation_retention(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        group = self.new_group(alice, ["bob"])  # 1
        self.refused(self.op(bob, group, operations.retention(10)), ErrorCode.INVALID_OPERATION)
        self.ok(self.op(alice, group, operations.retention(10)))  # 2
        self.ok(self.to(bob, group, b"short-lived"))  # 3
        self.ok(self.send(alice, "bob", b"kept"))
        self.clock.advance(11)
        self.ok(self.to(bob, group, b"recent"))  # 4
        self.assertEqual(self.hub.prune().result, {group: 3})
        result = self.sync(bob)
        self.assertEqual(result.ranges, (packets.Range(AB, 0, 1), packets.Range(group, 3, 4, skipped_from=0)))
        self.assertEqual([(m.conversation, m.seq) for m in result.messages], [(AB, 1), (group, 4)])
        # A late joiner's floor is the higher of its join and the pruned range.
        self.ok(self.op(alice, group, operations.group_add(["carol"])))  # 5
        result = self.sync(self.login("carol"))
        self.assertEqual(result.ranges, (packets.Range(group, 4, 5, skipped_from=0),))


class DeviceReplacementTests(Base):
    """What a login that replaces or is refused does to the device's token and the user's presence."""

    def token_login(self, device: str, token: bytes) -> tuple[Peer, packets.LoginResult]:
        peer = Peer(self.factory, "alice", device)
        peer.send(packets.Hello(1, 1, "test"), packets.Login(schema.LOGIN_TOKEN, "alice", device, token))
        (result,) = peer.take(packets.LoginResult)
        return peer, result

    def test_refused_login_keeps_the_devices_token(self) -> None:
        self.start(max_devices=2, device_policy="refuse")
        tablet, result = self.connect("alice", "tablet")
        token = result.resume_token
        tablet.disconnect()
        phone, laptop = self.login("alice", "phone"), self.login("alice", "laptop")
        refused, result = self.token_login("tablet", token)
        self.assertEqual(result.status, ErrorCode.TOO_MANY_DEVICES)
        self.assertEqual(result.resume_token, b"")
        laptop.disconnect()
        _tablet, result = self.token_login("tablet", token)
        self.assertEqual((result.status, result.reason), (0, ""), "the refused login did not cost the device its token")

    def test_replacing_a_device_is_not_going_offline(self) -> None:
        self.befriend("alice", "bob")
        bob = self.login("bob")
        first = self.login("alice", "phone")
        first.send(packets.Presence(schema.PRESENCE_AWAY, "lunch"))
        self.pump()
        self.assertEqual([n.status for n in bob.take()], [schema.PRESENCE_ONLINE, schema.PRESENCE_AWAY])
        second = self.login("alice", "phone")
        self.pump()
        self.assertTrue(first.closed)
        notices = bob.take(packets.PresenceNotice)
        self.assertNotIn(schema.PRESENCE_OFFLINE, [n.status for n in notices], "alice never went offline")
        self.assertEqual(notices, [], "nor did her status change")
        self.assertEqual([c.device for c in self.hub.online("alice")], ["phone"])
        second.disconnect()
        self.pump()
        self.assertEqual(bob.take(), [packets.PresenceNotice(schema.PRESENCE_OFFLINE, "alice", "")])

    def test_evicting_the_only_device_is_not_going_offline(self) -> None:
        self.start(max_devices=1)
        self.befriend("alice", "bob")
        bob = self.login("bob")
        phone = self.login("alice", "phone")
        self.pump()
        self.assertEqual(bob.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "alice", "")])
        laptop = self.login("alice", "laptop")
        self.assertEqual(laptop.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "bob", "")])
        self.pump()
        self.assertEqual(phone.take(), [packets.PresenceNotice(schema.PRESENCE_ONLINE, "bob", ""), packets.Bye(ErrorCode.TOO_MANY_DEVICES, "logged out: a newer device of this user logged in")])
        self.assertTrue(phone.closed)
        self.assertEqual(bob.take(), [])
        phone.disconnect()
        self.assertEqual([c.device for c in self.hub.online("alice")], ["laptop"])
        laptop.disconnect()
        self.pump()
        self.assertEqual(bob.take(), [packets.PresenceNotice(schema.PRESENCE_OFFLINE, "alice", "")])
