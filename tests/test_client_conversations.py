"""
The client library's conversation API against the real hub: contacts, groups, recall and edit,
retention, read receipts, typing, presence and queries.

Every client is a real IMClient talking to a real Hub over MemoryStore, through iosim's in-memory
transports; time is a Clock, so nothing sleeps and every run is the same.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from imkit import operations
from imkit.client import (
    ClientStopped,
    ConnectionLost,
    Event,
    GroupInfo,
    IMClient,
    Member,
    Message,
    PresenceNotice,
    QueryFailed,
    QueryTimeout,
    QueryUnanswered,
    ReadState,
    ReceiptNotice,
    SendRejected,
    TypingNotice,
    describe,
)
from imkit.model import direct_conversation
from imkit.passwords import Passwords
from imkit.rules import Policy
from imkit.server.hub import Hub
from imkit.server.protocol import IMServerFactory
from imkit.session.settings import ClientSettings, ServerSettings
from imkit.store import MemoryStore
from imkit.wire import schema
from imkit.wire.errors import ErrorCode
from test_client_protocol import FakeReactor, HubEndpoint

USERS = ("alice", "bob", "carol", "dave")
AB = direct_conversation("alice", "bob")


class ConversationTestCase(unittest.SynchronousTestCase):
    policy = Policy()

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.store = MemoryStore()
        passwords = Passwords.fast_for_tests()
        for user in USERS:
            self.successResultOf(self.store.add_user(user, self.successResultOf(passwords.hash(user + "-pw"))))
        self.hub = Hub(self.store, passwords, self.reactor, ServerSettings(), self.policy)
        self.endpoint = HubEndpoint(self.reactor, IMServerFactory(self.hub, ServerSettings(), self.reactor))
        self.clients: list[IMClient] = []
        self.heard: dict[str, list[Event]] = {}
        self.notices: dict[str, list[Any]] = {}
        self.holes: dict[str, list[tuple[str, int, int]]] = {}

    def tearDown(self) -> None:
        stopping = [client.stopService() for client in self.clients if client.running]
        self.pump()
        for d in stopping:
            self.successResultOf(d)
        # Only the server's own timers may be left (the hub is not a service here): no query timer.
        self.assertEqual([call for call in self.reactor.getDelayedCalls() if "IMServerProtocol" not in repr(call)], [])

    def connect(self, user: str, device: str = "phone", start: bool = True, **kwargs: Any) -> IMClient:
        """A started, caught-up client; what it hears is in heard/notices/holes["user/device"]."""
        client = IMClient(
            self.endpoint, user, user + "-pw", device, reactor=self.reactor, rng=random.Random(f"{user}/{device}"), **kwargs
        )
        name = f"{user}/{device}"
        heard = self.heard[name] = []
        notices = self.notices[name] = []
        holes = self.holes[name] = []
        client.on_message(lambda message: heard.append(describe(message)))
        client.on_receipt(notices.append)
        client.on_typing(notices.append)
        client.on_presence(notices.append)
        client.on_history_unavailable(lambda *hole: holes.append(hole))
        self.clients.append(client)
        if start:
            client.startService()
            self.pump()
            self.successResultOf(client.caughtUp())
        return client

    def pump(self) -> None:
        """Move bytes on every connection until all are quiet (one client's send reaches the others)."""
        for _ in range(10_000):
            moved = [pump.pump() for pump in self.endpoint.pumps]
            if not any(moved):
                return
        self.fail("the connections never went quiet")

    def wait(self, seconds: float) -> None:
        """Let time pass a second at a time, the connections kept alive by their heartbeats."""
        for _ in range(int(seconds)):
            self.reactor.advance(1)
            self.pump()

    def done(self, d: defer.Deferred) -> Any:
        """Let everything settle, then the result of ``d``."""
        self.pump()
        return self.successResultOf(d)

    def refused(self, d: defer.Deferred, error: type = SendRejected) -> Any:
        self.pump()
        return self.failureResultOf(d, error).value

    def kinds(self, name: str, conversation: str) -> list[tuple[int, str, str]]:
        return [(e.seq, e.kind, e.sender) for e in self.heard[name] if e.conversation == conversation]

    def befriend(self, a: IMClient, b: IMClient) -> None:
        self.done(a.add_contact(b.user))
        self.done(b.add_contact(a.user))

    def drop(self, client: IMClient) -> None:
        """Cut the client's connection (not a goodbye: as if the network went away)."""
        client._protocol.transport.abortConnection()
        self.pump()
        self.assertFalse(client.logged_in)


# Contacts ----------------------------------------------------------------------------------------


class ContactTests(ConversationTestCase):
    def test_add_list_block_unblock(self) -> None:
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        receipt = self.done(alice.add_contact("bob"))
        self.assertEqual((receipt.conversation, receipt.seq, receipt.count), (AB, 1, 1))
        self.assertEqual(self.kinds("bob/phone", AB), [(1, "contact.add", "alice")])
        self.assertEqual(self.kinds("alice/phone", AB), [(1, "contact.add", "alice")])
        self.assertEqual(self.done(alice.contacts()), {"bob": "contact"})
        self.assertEqual(self.done(bob.contacts()), {})
        self.done(alice.block("carol"))
        self.assertEqual(self.done(alice.contacts()), {"bob": "contact", "carol": "blocked"})
        self.assertEqual(self.refused(carol.send("alice", "hello?")).code, ErrorCode.NOT_ALLOWED)
        self.done(alice.unblock("carol"))
        self.assertEqual(self.done(alice.contacts()), {"bob": "contact"})
        self.done(carol.send("alice", "hello!"))
        self.assertEqual(self.heard["alice/phone"][-1].text, "hello!")

    def test_remove_contact(self) -> None:
        alice, bob = self.connect("alice"), self.connect("bob")
        self.befriend(alice, bob)
        self.done(alice.remove_contact("bob"))
        self.assertEqual(self.done(alice.contacts()), {})
        self.assertEqual(self.done(bob.contacts()), {"alice": "contact"})
        self.assertEqual(self.heard["bob/phone"][-1].kind, "contact.remove")


class ContactsOnlyTests(ConversationTestCase):
    """Under the ``contacts`` messaging policy: the seed's goodbye-then-remove corner case."""

    policy = Policy(contacts_only=True)

    def test_goodbye_is_delivered_before_the_removal_as_one_bundle(self) -> None:
        alice, bob = self.connect("alice"), self.connect("bob")
        self.befriend(alice, bob)
        self.done(alice.send("bob", "still friends"))
        receipt = self.done(alice.remove_contact("bob", goodbye="goodbye, bob"))
        self.assertEqual((receipt.seq, receipt.count), (4, 2))
        goodbye, removal = self.heard["bob/phone"][-2:]
        self.assertEqual((goodbye.seq, goodbye.kind, goodbye.text), (4, "message", "goodbye, bob"))
        self.assertEqual((removal.seq, removal.kind, removal.sender), (5, "contact.remove", "alice"))
        # One bundle: one submission, stored and delivered together.
        self.assertEqual(goodbye.message.client_msg_id, removal.message.client_msg_id)
        self.assertEqual((goodbye.message.bundle_remaining, removal.message.bundle_remaining), (1, 0))
        self.assertEqual(goodbye.sent_at, removal.sent_at)
        # Both users see the same conversation.
        self.assertEqual(self.kinds("alice/phone", AB), self.kinds("bob/phone", AB))
        # After it, they are no longer each other's contacts: nothing more passes.
        self.assertEqual(self.refused(alice.send("bob", "one more thing")).code, ErrorCode.NOT_ALLOWED)
        self.assertEqual(self.refused(bob.send("alice", "wait")).code, ErrorCode.NOT_ALLOWED)


# Groups ------------------------------------------------------------------------------------------


class GroupTests(ConversationTestCase):
    def test_create_add_remove_leave(self) -> None:
        alice, bob, carol, dave = (self.connect(user) for user in USERS)
        group = self.done(alice.create_group("lunch", ["bob", "carol"]))
        self.assertTrue(group.startswith("g:"), group)
        [created] = [e for e in self.heard["bob/phone"] if e.conversation == group]
        self.assertEqual((created.kind, created.seq, created.sender, created.title, created.users), ("group.create", 1, "alice", "lunch", ("bob", "carol")))
        self.assertEqual(
            self.done(alice.members(group)),
            [Member("alice", "owner", 1), Member("bob", "member", 1), Member("carol", "member", 1)],
        )
        self.assertEqual(self.done(bob.groups()), [GroupInfo(group, "lunch", 1, "member")])
        self.assertEqual(self.done(alice.groups()), [GroupInfo(group, "lunch", 1, "owner")])

        added = self.done(bob.add_members(group, ["dave"]))  # any member may add
        self.assertEqual(added.seq, 2)
        self.assertEqual(self.done(dave.members(group))[-1], Member("dave", "member", 2))
        self.assertEqual(self.kinds("dave/phone", group), [(2, "group.add", "bob")])
        self.assertEqual(self.heard["dave/phone"][-1].users, ("dave",))

        # Only the owner removes; the removed member gets its removal and nothing after it.
        self.assertEqual(self.refused(bob.remove_members(group, ["dave"])).code, ErrorCode.INVALID_OPERATION)
        self.done(alice.remove_members(group, ["dave"]))
        self.assertEqual(self.heard["dave/phone"][-1].kind, "group.remove")
        self.assertEqual(self.heard["dave/phone"][-1].users, ("dave",))
        self.done(alice.send(group=group, body="just us now"))
        self.assertEqual(self.kinds("dave/phone", group), [(2, "group.add", "bob"), (3, "group.remove", "alice")])
        self.assertEqual(self.done(dave.groups()), [])

        # The owner leaves: the longest-standing member (ties by name) takes over.
        self.done(alice.leave_group(group))
        self.assertEqual(self.heard["bob/phone"][-1].kind, "group.leave")
        self.assertEqual(self.done(bob.members(group)), [Member("bob", "owner", 1), Member("carol", "member", 1)])
        self.assertEqual(self.done(carol.groups()), [GroupInfo(group, "lunch", 5, "member")])
        self.assertEqual(self.refused(alice.send(group=group, body="?")).code, ErrorCode.NOT_A_MEMBER)
        self.assertEqual(self.heard["alice/phone"][-1].seq, 5)

    def test_group_messages_reach_every_member_in_the_same_order(self) -> None:
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        group = self.done(alice.create_group("plans", ["bob", "carol"]))
        sent = []
        for n in range(4):
            # Sent in the same reactor turn: the server puts them in one order for everybody.
            sent += [client.send(group=group, body=f"{client.user} {n}") for client in (carol, alice, bob)]
        self.pump()
        receipts = [self.successResultOf(d) for d in sent]
        self.assertEqual(sorted(r.seq for r in receipts), list(range(2, 14)))
        views = {
            name: [(e.seq, e.sender, e.text) for e in self.heard[name] if e.conversation == group and e.kind == "message"]
            for name in ("alice/phone", "bob/phone", "carol/phone")
        }
        self.assertEqual([seq for seq, _, _ in views["alice/phone"]], list(range(2, 14)))
        self.assertEqual(views["alice/phone"], views["bob/phone"])
        self.assertEqual(views["alice/phone"], views["carol/phone"])
        # Each sender's messages keep the order they were sent in.
        for user in ("alice", "bob", "carol"):
            self.assertEqual([text for _, sender, text in views["bob/phone"] if sender == user], [f"{user} {n}" for n in range(4)])

    def test_send_bundle_to_a_group_and_the_group_alias(self) -> None:
        alice, bob = self.connect("alice"), self.connect("bob")
        group = self.done(alice.create_group("pair", ["bob"]))
        receipt = self.done(alice.send_bundle([("text/plain", "one"), ("text/plain", "two")], group=group))
        self.assertEqual((receipt.conversation, receipt.seq, receipt.count), (group, 2, 2))
        self.assertEqual([e.text for e in self.heard["bob/phone"][-2:]], ["one", "two"])
        with self.assertRaises(ValueError):
            alice.send(conversation=group, group=group, body="x")
        with self.assertRaises(ValueError):
            alice.send("bob", group=group, body="x")
        with self.assertRaises(TypeError):
            alice.add_members(group, "carol")

    def test_create_group_while_disconnected(self) -> None:
        """A group created before the client is connected is created once, after the login."""
        self.connect("bob")
        alice = self.connect("alice", start=False)
        created = alice.create_group("later", ["bob"])
        self.assertNoResult(created)
        alice.startService()
        group = self.done(created)
        self.assertEqual(self.kinds("bob/phone", group), [(1, "group.create", "alice")])

    def test_late_joiner_is_told_history_is_unavailable(self) -> None:
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        group = self.done(alice.create_group("club", ["bob"]))
        for n in range(3):
            self.done(bob.send(group=group, body=f"before {n}"))
        self.done(alice.add_members(group, ["carol"]))
        self.done(bob.send(group=group, body="welcome"))
        self.assertEqual(self.holes["carol/phone"], [(group, 0, 4)])
        self.assertEqual(self.kinds("carol/phone", group), [(5, "group.add", "alice"), (6, "message", "bob")])
        self.assertEqual(self.holes["bob/phone"], [])
        # What the joiner could not see is not counted for them either.
        self.assertEqual(self.done(carol.read_state(group, [2, 5])).counts, {5: 0})


# Recall, edit, retention -------------------------------------------------------------------------


class ChangeTests(ConversationTestCase):
    def test_edit_and_recall_reach_the_other_party(self) -> None:
        alice, bob = self.connect("alice"), self.connect("bob")
        typo = self.done(alice.send("bob", "helo"))
        self.done(alice.edit(AB, typo.seq, "hello"))
        edit = self.heard["bob/phone"][-1]
        self.assertEqual((edit.kind, edit.target, edit.text, edit.content_type), ("edit", typo.seq, "hello", "text/plain; charset=utf-8"))
        self.done(alice.recall(AB, typo.seq))
        recall = self.heard["bob/phone"][-1]
        self.assertEqual((recall.kind, recall.target, recall.sender), ("recall", typo.seq, "alice"))
        # Only one's own messages.
        self.assertEqual(self.refused(bob.recall(AB, typo.seq)).code, ErrorCode.INVALID_OPERATION)
        # A device that syncs later finds the message recalled.
        self.connect("bob", "laptop")
        self.assertEqual(self.kinds("bob/laptop", AB), [(1, "recalled", "alice"), (2, "edit", "alice"), (3, "recall", "alice")])
        self.assertEqual(self.heard["bob/laptop"][0].body, b"")

    def test_recall_window(self) -> None:
        alice, _ = self.connect("alice"), self.connect("bob")
        sent = self.done(alice.send("bob", "oops"))
        self.wait(Policy().recall_window + 1)
        self.assertTrue(alice.logged_in)
        error = self.refused(alice.recall(AB, sent.seq))
        self.assertEqual(error.code, ErrorCode.INVALID_OPERATION)
        self.assertIn("too late", error.reason)

    def test_retention(self) -> None:
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        self.done(bob.set_retention(AB, 3600))
        event = self.heard["alice/phone"][-1]
        self.assertEqual((event.kind, event.seconds, event.sender), ("retention", 3600, "bob"))
        group = self.done(alice.create_group("g", ["bob"]))
        self.assertEqual(self.refused(bob.set_retention(group, 60)).code, ErrorCode.INVALID_OPERATION)
        self.done(alice.set_retention(group, 60))
        self.assertEqual(self.heard["bob/phone"][-1].seconds, 60)


# Read receipts -----------------------------------------------------------------------------------


class ReadTests(ConversationTestCase):
    def test_mark_read_notifies_the_sender_and_the_readers_other_devices(self) -> None:
        alice = self.connect("alice")
        phone, laptop = self.connect("bob", "phone"), self.connect("bob", "laptop")
        for body in ("one", "two"):
            self.done(alice.send("bob", body))
        self.assertTrue(phone.mark_read(AB, 2))
        self.pump()
        self.assertEqual(self.notices["alice/phone"], [ReceiptNotice(AB, "bob", "phone", 2)])
        self.assertEqual(self.notices["bob/laptop"], [ReceiptNotice(AB, "bob", "phone", 2)])
        self.assertEqual(self.notices["bob/phone"], [])
        state = self.done(alice.read_state(AB, [1, 2]))
        self.assertEqual(state, ReadState(AB, {1: 1, 2: 1}, {"bob": 2}))

    def test_read_state_of_a_group(self) -> None:
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        group = self.done(alice.create_group("g", ["bob", "carol"]))
        for body in ("one", "two"):
            self.done(alice.send(group=group, body=body))
        bob.mark_read(group, 3)
        carol.mark_read(group, 2)
        self.pump()
        self.assertEqual(self.done(alice.read_state(group, [2, 3])), ReadState(group, {2: 2, 3: 1}, {"bob": 3, "carol": 2}))
        self.assertEqual(self.done(alice.read_state(group)).counts, {})
        self.assertIn(ReceiptNotice(group, "carol", "phone", 2), self.notices["bob/phone"])

    def test_read_state_of_someone_elses_conversation_fails(self) -> None:
        self.connect("alice")
        self.connect("bob")
        carol = self.connect("carol")
        error = self.refused(carol.read_state(AB, [1]), QueryFailed)
        self.assertEqual(error.code, ErrorCode.NOT_A_MEMBER)
        self.assertIn("not a member", str(error))


# Typing and presence -----------------------------------------------------------------------------


class TypingTests(ConversationTestCase):
    def test_typing_in_a_direct_conversation_and_a_group(self) -> None:
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        self.assertTrue(alice.typing(AB))
        self.assertTrue(alice.typing(AB, active=False))
        self.pump()
        self.assertEqual(self.notices["bob/phone"], [TypingNotice(AB, "alice", "phone", True), TypingNotice(AB, "alice", "phone", False)])
        self.assertEqual(self.notices["carol/phone"], [])
        group = self.done(alice.create_group("g", ["bob", "carol"]))
        bob.typing(group)
        self.pump()
        self.assertEqual(self.notices["carol/phone"], [TypingNotice(group, "bob", "phone", True)])
        self.assertEqual(self.notices["alice/phone"], [TypingNotice(group, "bob", "phone", True)])
        self.assertEqual(self.notices["bob/phone"][2:], [])


class PresenceTests(ConversationTestCase):
    def presences(self, name: str) -> list[tuple[str, str, str]]:
        return [(n.user, n.status, n.text) for n in self.notices[name] if isinstance(n, PresenceNotice)]

    def test_presence_goes_only_to_mutual_contacts(self) -> None:
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        self.befriend(alice, bob)
        self.done(alice.add_contact("carol"))  # one way only: carol sees nothing
        self.assertTrue(alice.set_presence("away", "lunch"))
        self.pump()
        self.assertEqual(self.presences("bob/phone"), [("alice", "away", "lunch")])
        self.assertEqual(self.presences("carol/phone"), [])
        self.assertEqual(self.presences("alice/phone"), [])
        # A device arriving hears who is online, and how; its friends hear of its user's arrival.
        self.connect("bob", "laptop")
        self.assertEqual(self.presences("bob/laptop"), [("alice", "away", "lunch")])
        alice.set_presence("invisible")
        self.pump()
        self.assertEqual(self.presences("bob/phone")[-1], ("alice", "offline", ""))
        with self.assertRaises(ValueError):
            alice.set_presence("asleep")

    def test_arrival_departure_and_presence_said_again_after_reconnecting(self) -> None:
        alice, bob = self.connect("alice"), self.connect("bob")
        self.befriend(alice, bob)
        alice.set_presence("busy", "in a meeting")
        self.pump()
        self.drop(alice)
        self.assertEqual(self.presences("bob/phone")[-1], ("alice", "offline", ""))
        self.assertFalse(alice.set_presence("busy", "still in a meeting"))
        self.reactor.advance(2)  # the reconnection delay
        self.pump()
        self.assertTrue(alice.logged_in)
        # What the client says again at login is what bob hears: no "online" flicker before it.
        self.assertEqual(self.presences("bob/phone")[-2:], [("alice", "offline", ""), ("alice", "busy", "still in a meeting")])
        self.reactor.advance(ServerSettings().presence_grace)
        self.assertEqual(self.presences("bob/phone")[-1], ("alice", "busy", "still in a meeting"))
        stopped = bob.stopService()
        self.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.presences("alice/phone")[-1], ("bob", "offline", ""))


# Queries -----------------------------------------------------------------------------------------


class QueryTests(ConversationTestCase):
    def silence_requests(self) -> None:
        async def ignore(conn: Any, packet: Any) -> None:
            return None

        self.hub.requests.handle = ignore  # type: ignore[method-assign]

    def test_members_of_a_group_one_is_not_in(self) -> None:
        alice, carol = self.connect("alice"), self.connect("carol")
        group = self.done(alice.create_group("private", []))
        for target in (group, "g:no-such-group", AB):
            error = self.refused(carol.members(target), QueryFailed)
            self.assertEqual(error.code, ErrorCode.NOT_A_MEMBER)

    def test_timeout(self) -> None:
        alice = self.connect("alice")
        self.silence_requests()
        asked = alice.contacts()
        self.pump()
        self.reactor.advance(ClientSettings().request_timeout - 0.5)
        self.assertNoResult(asked)
        self.reactor.advance(0.5)
        error = self.failureResultOf(asked, QueryTimeout).value
        self.assertIsInstance(error, QueryUnanswered)
        self.assertIn("10 seconds", str(error))
        del self.hub.requests.handle
        self.assertEqual(self.done(alice.contacts()), {})

    def test_answers_are_matched_by_request_id(self) -> None:
        alice, bob = self.connect("alice"), self.connect("bob")
        group = self.done(alice.create_group("g", ["bob"]))
        self.done(alice.add_contact("bob"))
        asked = [alice.members(group), alice.contacts(), alice.groups(), alice.read_state(group, [1])]
        self.pump()
        members, contacts, groups, state = (self.successResultOf(d) for d in asked)
        self.assertEqual([m.user for m in members], ["alice", "bob"])
        self.assertEqual(contacts, {"bob": "contact"})
        self.assertEqual(groups, [GroupInfo(group, "g", 1, "owner")])
        self.assertEqual(state.counts, {1: 0})

    def test_connection_lost_and_not_connected(self) -> None:
        alice = self.connect("alice")
        self.silence_requests()
        asked = alice.groups()
        self.pump()
        self.drop(alice)
        self.failureResultOf(asked, ConnectionLost)
        # Not connected: queries fail at once, ephemeral packets are not sent, sends wait.
        self.failureResultOf(alice.contacts(), ConnectionLost)
        self.assertFalse(alice.mark_read(AB, 1))
        self.assertFalse(alice.typing(AB))
        sent = alice.send("bob", "queued")
        self.reactor.advance(2)
        self.pump()
        self.assertTrue(alice.logged_in)
        self.assertEqual(self.successResultOf(sent).seq, 1)

    def test_stopping_fails_pending_queries(self) -> None:
        alice = self.connect("alice")
        self.silence_requests()
        asked = alice.members("g:x")
        self.pump()
        alice.stopService()
        self.failureResultOf(asked, ClientStopped)
        self.failureResultOf(alice.groups(), ClientStopped)
        self.assertFalse(alice.set_presence("away"))

    def test_cancelling_a_query(self) -> None:
        alice = self.connect("alice")
        asked = alice.contacts()
        asked.cancel()
        self.failureResultOf(asked, defer.CancelledError)
        self.pump()  # the late answer is ignored


# Describing delivered messages -------------------------------------------------------------------


def delivered(content_type: str, body: bytes, seq: int = 7) -> Message:
    return Message(500 + seq, "g:abc", seq, "alice", "phone", 99, 1_700_000_000_000, content_type, body, 0)


class DescribeTests(unittest.SynchronousTestCase):
    def test_message(self) -> None:
        event = describe(delivered("text/plain; charset=utf-8", "héllo".encode() + b"\xff"))
        self.assertEqual(event.kind, "message")
        self.assertEqual(
            event.to_json(),
            {
                "kind": "message", "conversation": "g:abc", "seq": 7, "sender": "alice", "sender_device": "phone",
                "id": 507, "sent_at": 1_700_000_000_000, "content_type": "text/plain; charset=utf-8", "body": "héllo\ufffd",
            },
        )
        json.dumps(event.to_json())

    def test_operations(self) -> None:
        cases = [
            (operations.contact_add(), "contact.add", {}),
            (operations.contact_remove(), "contact.remove", {}),
            (operations.contact_block(), "contact.block", {}),
            (operations.contact_unblock(), "contact.unblock", {}),
            (operations.group_create("Team", ["bob"]), "group.create", {"title": "Team", "users": ["bob"]}),
            (operations.group_add(["carol", "dave"]), "group.add", {"users": ["carol", "dave"]}),
            (operations.group_remove(["dave"]), "group.remove", {"users": ["dave"]}),
            (operations.group_leave(), "group.leave", {}),
            (operations.recall(3), "recall", {"target": 3}),
            (operations.edit(3, "text/plain", b"fixed"), "edit", {"target": 3, "content_type": "text/plain", "body": "fixed"}),
            (operations.retention(86400), "retention", {"seconds": 86400}),
            (operations.item(schema.RECALLED), "recalled", {}),
        ]
        base = {"conversation": "g:abc", "seq": 7, "sender": "alice", "sender_device": "phone", "id": 507, "sent_at": 1_700_000_000_000}
        for item, kind, extra in cases:
            event = describe(delivered(item.content_type, item.body))
            self.assertEqual(event.kind, kind)
            self.assertEqual(event.to_json(), {"kind": kind, **base, **extra})
            json.dumps(event.to_json())

    def test_unknown_or_malformed_operations_keep_their_name(self) -> None:
        self.assertEqual(describe(delivered("imkit/group.rename", b"\x00\x01x")).kind, "group.rename")
        event = describe(delivered(schema.GROUP_ADD, b"\x00"))
        self.assertEqual((event.kind, event.users), ("group.add", ()))
        self.assertEqual(event.to_json()["users"], [])
