"""
The IStore contract: one test suite every storage backend must pass.

Mix ``StoreContract`` into a ``twisted.trial.unittest.TestCase`` and define ``make_store()`` (a new,
unopened store) and ``reopen(store)`` (close it and return a freshly opened store on the same data;
a store that keeps everything in its object returns that same object).

Every test starts with the users of ``CAST`` in the store: the rules refuse a direct message to a
user that does not exist, and a group member must exist when they are added.  Plain messages go
to the direct conversation of alice and bob (``AB``) unless a test says otherwise.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from zope.interface.verify import verifyObject

from imkit import operations
from imkit.model import Appended, Item, Message, Submission, direct_conversation, direct_members
from imkit.rules import Group, Membership, Policy, Refused
from imkit.store.interface import Flag, IStore, ItemFlag, UnknownMessage, UnknownUser, UserExists
from imkit.wire import schema
from imkit.wire.errors import ErrorCode
from imkit.wire.packets import DeviceKeys, OneTimeKey

U64_MAX = 2**64 - 1

CAST = ("alice", "bob", "carol", "dave")
"""The users every contract test starts with (password hash ``hash-NAME``)."""

AB = direct_conversation("alice", "bob")
AC = direct_conversation("alice", "carol")
AD = direct_conversation("alice", "dave")
BC = direct_conversation("bob", "carol")

T0 = 1_700_000_000_000
"""The default sent_at (ms)."""

SECOND = 1000

CONTACTS = Policy(contacts_only=True)
HISTORY = Policy(history_on_join=True)


def members_of(conversation: str) -> tuple[str, ...]:
    """The members a server names in a submission: a direct conversation's users, else none."""
    pair = direct_members(conversation)
    return tuple(sorted(set(pair))) if pair is not None else ()


def submission(
    client_msg_id: int,
    conversation: str = AB,
    sender: str = "alice",
    device: str = "phone",
    members: tuple[str, ...] | None = None,
    bodies: tuple[bytes, ...] = (b"hello",),
    sent_at: int = T0,
    content_type: str = "text/plain",
    items: tuple[Item, ...] | None = None,
) -> Submission:
    return Submission(
        sender=sender,
        sender_device=device,
        client_msg_id=client_msg_id,
        conversation=conversation,
        members=members_of(conversation) if members is None else members,
        sent_at=sent_at,
        items=tuple(Item(content_type, body) for body in bodies) if items is None else items,
    )


def text(body: str | bytes) -> Item:
    return Item("text/plain", body.encode() if isinstance(body, str) else body)


async def add_cast(store: IStore, names: tuple[str, ...] = CAST) -> None:
    for name in names:
        await store.add_user(name, f"hash-{name}")


class StoreContract:
    """What every IStore promises; see the module docstring for the two hooks."""

    def make_store(self) -> IStore:
        """A new store over empty storage, not opened yet (subclasses define this)."""
        raise NotImplementedError(f"{type(self).__name__} must define make_store()")

    async def reopen(self, store: IStore) -> IStore:
        """Close ``store`` and return an opened store on the same data (subclasses define this)."""
        raise NotImplementedError(f"{type(self).__name__} must define reopen()")

    async def setUp(self) -> None:
        self.store = self.make_store()
        self.addCleanup(lambda: self.store.close())
        await self.store.open()
        await add_cast(self.store)
        self._next_client_msg_id = 10_000
        self._groups = 0

    async def restart(self) -> IStore:
        self.store = await self.reopen(self.store)
        return self.store

    # Helpers -----------------------------------------------------------------------------------

    def sub(
        self,
        conversation: str,
        *items: Item | bytes | str,
        sender: str = "alice",
        device: str = "phone",
        client_msg_id: int | None = None,
        sent_at: int = T0,
    ) -> Submission:
        """A submission of ``items`` (bytes and str are text/plain), with a fresh client id unless given."""
        if client_msg_id is None:
            self._next_client_msg_id += 1
            client_msg_id = self._next_client_msg_id
        return submission(
            client_msg_id,
            conversation,
            sender=sender,
            device=device,
            sent_at=sent_at,
            items=tuple(item if isinstance(item, Item) else text(item) for item in items),
        )

    async def send(self, conversation: str, *items: Item | bytes | str, policy: Policy = Policy(), **kwargs: Any) -> Appended:
        return await self.store.append(self.sub(conversation, *items, **kwargs), policy)

    async def refused(
        self, code: ErrorCode, conversation: str, *items: Item | bytes | str, policy: Policy = Policy(), **kwargs: Any
    ) -> Refused:
        """Send, expecting a refusal with ``code`` that stores nothing."""
        head = await self.store.head(conversation)
        with self.assertRaises(Refused) as raised:
            await self.store.append(self.sub(conversation, *items, **kwargs), policy)
        self.assertEqual(raised.exception.code, code, raised.exception.reason)
        self.assertIsInstance(raised.exception.reason, str)
        self.assertEqual(await self.store.head(conversation), head, "a refusal stores nothing")
        return raised.exception

    async def new_group(
        self, users: tuple[str, ...] = ("bob", "carol"), title: str = "Team", owner: str = "alice", **kwargs: Any
    ) -> str:
        """Create a group (its creation is seq 1) and return its id."""
        self._groups += 1
        conversation = f"g:{title.lower()}-{self._groups}"
        appended = await self.send(conversation, operations.group_create(title, users), sender=owner, **kwargs)
        self.assertEqual([m.seq for m in appended.messages], [1])
        return conversation

    async def seqs(self, conversation: str, after_seq: int = 0, limit: int = 1000) -> list[int]:
        return [m.seq for m in await self.store.read(conversation, after_seq, limit)]

    # The interface -----------------------------------------------------------------------------

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertIsInstance(self.store.description, str)

    # Sequences and server ids ------------------------------------------------------------------

    async def test_sequences_are_consecutive_per_conversation(self) -> None:
        seqs: dict[str, list[int]] = {AB: [], AC: []}
        for client_msg_id, conversation in enumerate([AB, AC, AB, AB, AC]):
            appended = await self.store.append(submission(client_msg_id, conversation))
            self.assertFalse(appended.duplicate)
            seqs[conversation] += [message.seq for message in appended.messages]
        self.assertEqual(seqs, {AB: [1, 2, 3], AC: [1, 2]})
        self.assertEqual(await self.store.head(AB), 3)
        self.assertEqual(await self.store.head(AC), 2)

    async def test_server_ids_are_unique(self) -> None:
        server_ids = []
        for client_msg_id in range(12):
            conversation = [AB, AC, AD][client_msg_id % 3]
            bodies = (b"x",) * (1 + client_msg_id % 2)
            appended = await self.store.append(submission(client_msg_id, conversation, bodies=bodies))
            server_ids += [message.server_id for message in appended.messages]
        self.assertEqual(len(server_ids), 18)
        self.assertEqual(len(set(server_ids)), 18)

    async def test_bundle_server_ids_are_consecutive(self) -> None:
        """A client numbers its own bundle's messages from the first id in the ack."""
        await self.store.append(submission(1, AC))
        appended = await self.store.append(submission(2, AC, bodies=(b"1", b"2", b"3")))
        first = appended.messages[0].server_id
        self.assertEqual([m.server_id for m in appended.messages], [first, first + 1, first + 2])

    async def test_message_fields(self) -> None:
        sub = submission(7, BC, sender="carol", device="laptop", sent_at=123456789)
        appended = await self.store.append(sub)
        [message] = appended.messages
        self.assertEqual(
            message,
            Message(
                server_id=message.server_id,
                conversation=BC,
                seq=1,
                sender="carol",
                sender_device="laptop",
                client_msg_id=7,
                sent_at=123456789,
                content_type="text/plain",
                body=b"hello",
                bundle_remaining=0,
            ),
        )
        self.assertEqual(appended.audience, ("bob", "carol"))
        self.assertFalse(appended.duplicate)
        self.assertEqual(await self.store.read(BC, 0, 10), [message])

    async def test_bundle(self) -> None:
        await self.store.append(submission(1, AC))
        appended = await self.store.append(submission(2, AC, bodies=(b"one", b"two", b"three"), sent_at=55))
        messages = appended.messages
        self.assertEqual([m.seq for m in messages], [2, 3, 4])
        self.assertEqual([m.bundle_remaining for m in messages], [2, 1, 0])
        self.assertEqual([m.body for m in messages], [b"one", b"two", b"three"])
        self.assertEqual({(m.client_msg_id, m.sent_at, m.sender) for m in messages}, {(2, 55, "alice")})
        self.assertEqual(len({m.server_id for m in messages}), 3)
        self.assertEqual(await self.store.head(AC), 4)

    # Reading -----------------------------------------------------------------------------------

    async def test_read_in_order_with_limit(self) -> None:
        for client_msg_id in range(10):
            await self.store.append(submission(client_msg_id, bodies=(b"%d" % client_msg_id,)))
        messages = await self.store.read(AB, 3, 4)
        self.assertEqual([m.seq for m in messages], [4, 5, 6, 7])
        self.assertEqual([m.body for m in messages], [b"3", b"4", b"5", b"6"])
        everything = await self.store.read(AB, 0, 100)
        self.assertEqual([m.seq for m in everything], list(range(1, 11)))

    async def test_read_never_cuts_a_bundle(self) -> None:
        await self.store.append(submission(1))
        await self.store.append(submission(2, bodies=(b"a", b"b", b"c")))
        await self.store.append(submission(3))

        async def seqs(after_seq: int, limit: int) -> list[int]:
            return [m.seq for m in await self.store.read(AB, after_seq, limit)]

        self.assertEqual(await seqs(0, 1), [1])
        self.assertEqual(await seqs(0, 2), [1, 2, 3, 4])
        self.assertEqual(await seqs(1, 1), [2, 3, 4])
        self.assertEqual(await seqs(2, 1), [3, 4])
        self.assertEqual(await seqs(0, 4), [1, 2, 3, 4])
        self.assertEqual(await seqs(0, 5), [1, 2, 3, 4, 5])
        self.assertEqual(await seqs(4, 1), [5])

    async def test_read_past_the_head_or_unknown(self) -> None:
        await self.store.append(submission(1))
        self.assertEqual(await self.store.read(AB, 1, 10), [])
        self.assertEqual(await self.store.read(AB, 99, 10), [])
        self.assertEqual(await self.store.read(AB, 0, 0), [])
        for unknown in ("dm:nobody:zed", "g:nobody", "grp:nobody"):
            self.assertEqual(await self.store.read(unknown, 0, 10), [])
            self.assertEqual(await self.store.head(unknown), 0)

    # Deduplication -----------------------------------------------------------------------------

    async def test_duplicate_returns_the_original_and_writes_nothing(self) -> None:
        original = await self.store.append(submission(42, AC))
        await self.store.append(submission(43, AC))
        # Same key, different everything else: still the original, and nothing is written.
        again = await self.store.append(submission(42, AD, bodies=(b"other", b"two")))
        self.assertEqual(again, Appended(messages=original.messages, duplicate=True))
        self.assertEqual(again.audience, (), "the audience had them already")
        self.assertEqual(await self.store.head(AC), 2)
        self.assertEqual(await self.store.head(AD), 0)
        self.assertEqual(await self.store.members(AD), ())
        self.assertEqual(await self.store.conversations("dave"), {})
        self.assertEqual(len(await self.store.read(AC, 0, 10)), 2)

    async def test_duplicate_is_answered_before_the_rules(self) -> None:
        """A resend gets its original back even if the rules would refuse it now."""
        original = await self.store.append(submission(42))
        await self.send(AB, operations.contact_block(), sender="bob")
        again = await self.store.append(submission(42), CONTACTS)
        self.assertEqual(again, Appended(messages=original.messages, duplicate=True))
        # ...and a resend of an operation is not applied twice.
        add = self.sub(BC, operations.contact_add(), sender="carol")
        first = await self.store.append(add)
        await self.send(BC, operations.contact_remove(), sender="carol")
        self.assertTrue((await self.store.append(add)).duplicate)
        self.assertEqual(await self.store.contacts("carol"), {})
        self.assertEqual(first.messages[0].seq, 1)

    async def test_duplicate_bundle(self) -> None:
        original = await self.store.append(submission(5, bodies=(b"1", b"2", b"3")))
        again = await self.store.append(submission(5, bodies=(b"1", b"2", b"3")))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.messages, original.messages)
        self.assertEqual(await self.store.head(AB), 3)

    async def test_duplicate_issued_while_the_original_is_in_flight(self) -> None:
        first, second = await defer.gatherResults([self.store.append(submission(9)), self.store.append(submission(9))])
        self.assertFalse(first.duplicate)
        self.assertEqual(second, Appended(messages=first.messages, duplicate=True))
        self.assertEqual(await self.store.head(AB), 1)

    async def test_dedupe_key_is_sender_device_and_client_id(self) -> None:
        results = [
            await self.store.append(submission(1, sender="alice", device="phone")),
            await self.store.append(submission(1, sender="alice", device="laptop")),
            await self.store.append(submission(1, sender="bob", device="phone")),
        ]
        self.assertEqual([r.duplicate for r in results], [False, False, False])
        self.assertEqual(await self.store.head(AB), 3)

    async def test_dedupe_survives_reopen(self) -> None:
        original = await self.store.append(submission(1, bodies=(b"a", b"b")))
        store = await self.restart()
        again = await store.append(submission(1, bodies=(b"a", b"b")))
        self.assertEqual(again, Appended(messages=original.messages, duplicate=True))
        self.assertEqual(await store.head(AB), 2)
        # Numbering carries on where it stopped, with server ids never reused.
        after = await store.append(submission(2))
        self.assertEqual(after.messages[0].seq, 3)
        old_ids = {m.server_id for m in original.messages}
        self.assertNotIn(after.messages[0].server_id, old_ids)

    async def test_everything_survives_reopen(self) -> None:
        await self.store.set_password_hash("alice", "hash-a2")
        appended = await self.store.append(submission(1, bodies=(b"x", b"y")))
        await self.store.set_cursor("alice", "phone", AB, 1)
        store = await self.restart()
        self.assertEqual(await store.list_users(), list(CAST))
        self.assertEqual(await store.password_hash("alice"), "hash-a2")
        self.assertEqual(await store.password_hash("bob"), "hash-bob")
        self.assertEqual(await store.read(AB, 0, 10), list(appended.messages))
        self.assertEqual(await store.members(AB), ("alice", "bob"))
        self.assertEqual(await store.conversations("bob"), {AB: 2})
        self.assertEqual(await store.cursors("alice", "phone"), {AB: 1})

    # Members and conversations -----------------------------------------------------------------

    async def test_members_and_conversations(self) -> None:
        self.assertEqual(await self.store.members(AB), ())
        await self.store.append(submission(1, AB))
        self.assertEqual(await self.store.members(AB), ("alice", "bob"))
        await self.store.append(submission(2, AB, sender="bob"))
        self.assertEqual(await self.store.members(AB), ("alice", "bob"))
        await self.store.append(submission(3, AC))
        await self.store.append(submission(4, AC, sender="carol"))
        group = await self.new_group(("carol",))
        self.assertEqual(await self.store.members(group), ("alice", "carol"))
        self.assertEqual(await self.store.conversations("alice"), {AB: 2, AC: 2, group: 1})
        self.assertEqual(await self.store.conversations("bob"), {AB: 2})
        self.assertEqual(await self.store.conversations("carol"), {AC: 2, group: 1})
        self.assertEqual(await self.store.conversations("nobody"), {})

    async def test_conversation_with_oneself(self) -> None:
        notes = direct_conversation("alice", "alice")
        appended = await self.send(notes, "remember the milk", policy=CONTACTS)
        self.assertEqual(appended.audience, ("alice",))
        self.assertEqual(await self.store.members(notes), ("alice",))
        self.assertEqual(await self.store.conversations("alice"), {notes: 1})
        await self.refused(ErrorCode.INVALID_OPERATION, notes, operations.contact_add())

    # Cursors -----------------------------------------------------------------------------------

    async def test_cursors_only_move_forward(self) -> None:
        self.assertEqual(await self.store.cursors("alice", "phone"), {})
        await self.store.set_cursor("alice", "phone", AC, 5)
        await self.store.set_cursor("alice", "phone", AC, 3)
        self.assertEqual(await self.store.cursors("alice", "phone"), {AC: 5})
        await self.store.set_cursor("alice", "phone", AC, 7)
        await self.store.set_cursor("alice", "phone", AB, 1)
        await self.store.set_cursor("alice", "laptop", AC, 2)
        self.assertEqual(await self.store.cursors("alice", "phone"), {AC: 7, AB: 1})
        self.assertEqual(await self.store.cursors("alice", "laptop"), {AC: 2})
        self.assertEqual(await self.store.cursors("bob", "phone"), {})

    async def test_set_cursors_moves_each_forward(self) -> None:
        await self.store.set_cursor("alice", "phone", AC, 5)
        await self.store.set_cursors(
            [("alice", "phone", AC, 3), ("alice", "phone", AB, 2), ("bob", "phone", AB, 4), ("alice", "phone", AB, 6)]
        )
        self.assertEqual(await self.store.cursors("alice", "phone"), {AC: 5, AB: 6})
        self.assertEqual(await self.store.cursors("bob", "phone"), {AB: 4})
        await self.store.set_cursors([])
        self.assertEqual(await self.store.cursors("bob", "phone"), {AB: 4})

    # Users -------------------------------------------------------------------------------------

    async def test_users(self) -> None:
        self.assertEqual(await self.store.list_users(), list(CAST))
        self.assertIsNone(await self.store.password_hash("erin"))
        await self.store.add_user("frank", "hash-f")
        await self.store.add_user("erin", "hash-e")
        with self.assertRaises(UserExists):
            await self.store.add_user("erin", "other")
        self.assertEqual(await self.store.password_hash("erin"), "hash-e")
        await self.store.set_password_hash("erin", "hash-e2")
        self.assertEqual(await self.store.password_hash("erin"), "hash-e2")
        with self.assertRaises(UnknownUser):
            await self.store.set_password_hash("gina", "hash-g")
        self.assertIsNone(await self.store.password_hash("gina"))
        self.assertEqual(await self.store.list_users(), sorted(CAST + ("erin", "frank")))

    async def test_disabled_users(self) -> None:
        """Disabling forgets the user's tokens (only theirs) and is undone by enabling; unknown users fail."""
        store = self.store
        self.assertEqual(await store.disabled_users(), [])
        self.assertFalse(await store.is_disabled("alice"))
        self.assertFalse(await store.is_disabled("nobody"))
        await store.set_token("a1", "alice", "phone", 1000)
        await store.set_token("a2", "alice", "laptop", 1000)
        await store.set_token("b1", "bob", "phone", 1000)
        self.assertEqual(await store.set_disabled("alice", True), 2)
        self.assertTrue(await store.is_disabled("alice"))
        self.assertIsNone(await store.token_owner("a1"))
        self.assertIsNone(await store.token_owner("a2"))
        self.assertEqual(await store.token_owner("b1"), ("bob", "phone", 1000))
        self.assertEqual(await store.set_disabled("alice", True), 0, "disabling twice is harmless")
        self.assertEqual(await store.set_disabled("carol", True), 0)
        self.assertEqual(await store.disabled_users(), ["alice", "carol"])
        self.assertIsNotNone(await store.password_hash("alice"), "a disabled user still exists")
        self.assertIn("alice", await store.list_users())
        self.assertEqual(await store.set_disabled("alice", False), 0)
        self.assertFalse(await store.is_disabled("alice"))
        self.assertEqual(await store.disabled_users(), ["carol"])
        with self.assertRaises(UnknownUser):
            await store.set_disabled("nobody", True)
        self.assertEqual(await store.disabled_users(), ["carol"])
        store = await self.restart()
        self.assertEqual(await store.disabled_users(), ["carol"])
        self.assertTrue(await store.is_disabled("carol"))

    async def test_a_failing_call_fails_alone(self) -> None:
        calls = [
            self.store.add_user("erin", "1"),
            self.store.append(submission(1)),
            self.store.add_user("erin", "2"),
            self.store.set_password_hash("nobody", "3"),
            self.store.append(submission(2, "dm:alice:zed")),
            self.store.add_user("frank", "4"),
            self.store.append(submission(3)),
        ]
        results = await defer.DeferredList(calls, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, False, False, True, True])
        self.assertIsInstance(results[2][1].value, UserExists)
        self.assertIsInstance(results[3][1].value, UnknownUser)
        self.assertIsInstance(results[4][1].value, Refused)
        self.assertEqual(results[4][1].value.code, ErrorCode.UNKNOWN_RECIPIENT)
        self.assertEqual(results[6][1].messages[0].seq, 2)
        self.assertEqual(await self.store.password_hash("erin"), "1")
        self.assertEqual(await self.store.list_users(), sorted(CAST + ("erin", "frank")))
        self.assertEqual(await self.store.head("dm:alice:zed"), 0)

    async def test_refusals_in_a_batch_fail_alone(self) -> None:
        """Appends issued together, some refused: each refusal fails its own call, in order."""
        calls = [
            self.store.append(self.sub(AB, "1")),
            self.store.append(self.sub(AB, operations.contact_block(), sender="bob")),
            self.store.append(self.sub(AB, "2")),  # blocked now
            self.store.append(self.sub(AC, "3")),
            self.store.append(self.sub("g:none", "4")),
            self.store.append(self.sub(AB, operations.contact_unblock(), sender="bob")),
            self.store.append(self.sub(AB, "5")),
            self.store.append(self.sub(AB, "6", operations.recall(99))),
            self.store.append(self.sub(AC, "7")),
        ]
        results = await defer.DeferredList(calls, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, True, False, True, True, False, True])
        self.assertEqual(
            [result.value.code for ok, result in results if not ok],
            [ErrorCode.NOT_ALLOWED, ErrorCode.NOT_A_MEMBER, ErrorCode.INVALID_OPERATION],
        )
        self.assertEqual(
            [(m.content_type, m.body) for m in await self.store.read(AB, 0, 10)],
            [("text/plain", b"1"), (schema.CONTACT_BLOCK, b""), (schema.CONTACT_UNBLOCK, b""), ("text/plain", b"5")],
        )
        self.assertEqual([results[i][1].messages[0].seq for i in (0, 1, 5, 6)], [1, 2, 3, 4])
        self.assertEqual([results[i][1].messages[0].seq for i in (3, 8)], [1, 2])
        self.assertEqual(await self.store.head(AB), 4)
        self.assertEqual(await self.store.contacts("bob"), {})

    async def test_append_many_is_appends_in_order(self) -> None:
        """append_many answers each submission as append would, refusals and duplicates alone."""
        first = self.sub(AB, "1")
        await self.store.append(first)
        batch = [
            self.sub(AB, "2"),
            self.sub(AB, operations.contact_block(), sender="bob"),
            self.sub(AB, "3"),  # blocked now
            first,  # a resend: the original answer
            self.sub(AC, "4", "5"),
            self.sub("g:none", "6"),
            submission(-1),  # not a valid client id
            self.sub(AB, operations.contact_unblock(), sender="bob"),
            self.sub(AB, "7"),
        ]
        outcomes = await self.store.append_many(batch, Policy())
        self.assertEqual(len(outcomes), len(batch))
        kinds = [type(outcome).__name__ for outcome in outcomes]
        self.assertEqual(kinds, ["Appended", "Appended", "Refused", "Appended", "Appended", "Refused", "ValueError", "Appended", "Appended"])
        self.assertEqual([outcomes[i].code for i in (2, 5)], [ErrorCode.NOT_ALLOWED, ErrorCode.NOT_A_MEMBER])
        self.assertTrue(outcomes[3].duplicate)
        self.assertEqual(outcomes[3].messages[0].seq, 1)
        self.assertEqual([m.seq for m in outcomes[4].messages], [1, 2])
        self.assertEqual([outcomes[i].messages[0].seq for i in (0, 1, 7, 8)], [2, 3, 4, 5])
        self.assertEqual(
            [m.body for m in await self.store.read(AB, 0, 10) if m.content_type == "text/plain"], [b"1", b"2", b"7"]
        )
        self.assertEqual(await self.store.append_many([], Policy()), [])

    async def test_append_many_then_append_keeps_issue_order(self) -> None:
        many = self.store.append_many([self.sub(AB, b"%d" % i) for i in range(50)], Policy())
        single = self.store.append(self.sub(AB, "last"))
        outcomes = await many
        self.assertEqual([o.messages[0].seq for o in outcomes], list(range(1, 51)))
        self.assertEqual((await single).messages[0].seq, 51)

    # Values ------------------------------------------------------------------------------------

    async def test_unsigned_64_bit_client_ids(self) -> None:
        for client_msg_id in (U64_MAX, 0, 2**63, 2**63 - 1):
            appended = await self.store.append(submission(client_msg_id))
            self.assertEqual(appended.messages[0].client_msg_id, client_msg_id)
        self.assertEqual([m.client_msg_id for m in await self.store.read(AB, 0, 10)], [U64_MAX, 0, 2**63, 2**63 - 1])
        again = await self.store.append(submission(U64_MAX))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.messages[0].seq, 1)

    async def test_invalid_submissions_are_refused(self) -> None:
        for bad in (submission(1, bodies=()), submission(-1), submission(2**64)):
            with self.assertRaises(ValueError):
                await self.store.append(bad)
        self.assertEqual(await self.store.head(AB), 0)
        self.assertEqual(await self.store.members(AB), ())

    async def test_unicode_and_empty_bodies(self) -> None:
        await self.store.add_user("Ωmega", "h")
        every_byte = bytes(range(256))
        bodies = (b"", every_byte, "héllo".encode())
        content_type = "text/plain; charset=utf-8"
        group = "g:日本語 ✓"
        sub = submission(
            1,
            group,
            sender="zoë",
            device="📱",
            items=(operations.group_create("日本語 ✓", ["Ωmega"]),) + tuple(Item(content_type, body) for body in bodies),
        )
        appended = await self.store.append(sub)
        read = await self.store.read(group, 0, 10)
        self.assertEqual(read, list(appended.messages))
        self.assertEqual([m.body for m in read[1:]], list(bodies))
        self.assertEqual({m.content_type for m in read[1:]}, {content_type})
        self.assertEqual({(m.sender, m.sender_device) for m in read}, {("zoë", "📱")})
        self.assertEqual(await self.store.members(group), ("zoë", "Ωmega"))
        self.assertEqual((await self.store.group(group)).title, "日本語 ✓")
        direct = direct_conversation("zoë", "Ωmega")
        await self.store.append(submission(2, direct, sender="zoë", bodies=bodies, content_type=content_type))
        self.assertEqual([m.body for m in await self.store.read(direct, 0, 10)], list(bodies))
        self.assertEqual(await self.store.conversations("zoë"), {group: 4, direct: 3})
        await self.store.add_user("zoë", "hásh")
        self.assertEqual(await self.store.password_hash("zoë"), "hásh")

    # Concurrency -------------------------------------------------------------------------------

    async def test_concurrent_appends_are_numbered_in_issue_order(self) -> None:
        count = 300
        appends = [self.store.append(submission(i, bodies=(b"%d" % i,))) for i in range(count)]
        # Calls take effect in the order they were made, reads included.
        head = self.store.head(AB)
        results = await defer.gatherResults(appends)
        self.assertEqual([r.messages[0].seq for r in results], list(range(1, count + 1)))
        self.assertEqual(await head, count)
        stored = await self.store.read(AB, 0, count)
        self.assertEqual([m.body for m in stored], [b"%d" % i for i in range(count)])

    async def test_concurrent_mixed_appends(self) -> None:
        """Plain messages, operations and refusals issued together take effect in issue order."""
        group = await self.new_group(("bob",))
        calls = []
        for i in range(60):
            calls.append(self.store.append(self.sub(AB, b"%d" % i, sender=["alice", "bob"][i % 2]), CONTACTS))
            calls.append(self.store.append(self.sub(group, b"%d" % i, sender=["alice", "bob", "carol"][i % 3])))
            if i in (3, 13):
                calls.append(self.store.append(self.sub(AB, operations.contact_add(), sender=["alice", "bob"][i // 10])))
            if i == 40:
                calls.append(self.store.append(self.sub(group, operations.group_add(["carol"]), sender="bob")))
            if i == 50:
                calls.append(self.store.append(self.sub(AB, "bye", operations.contact_remove(), sender="bob")))
        results = await defer.DeferredList(calls, consumeErrors=True)
        stored = {AB: [], group: []}
        for ok, result in results:
            if ok:
                stored[result.messages[0].conversation].extend(m.body for m in result.messages)
        ab = [m.body for m in await self.store.read(AB, 0, 1000)]
        self.assertEqual(ab, stored[AB])
        # Contacts from i = 13 (both added), until bob's goodbye at i = 50.
        texts = [body for body in ab if body.isdigit()]
        self.assertEqual(texts, [b"%d" % i for i in range(14, 51)])
        in_group = [m.body for m in await self.store.read(group, 1, 1000)]
        self.assertEqual(in_group, stored[group])
        self.assertEqual(
            [body for body in in_group if body.isdigit()],
            [b"%d" % i for i in range(60) if i % 3 != 2 or i > 40],
        )

    async def test_resume_tokens(self) -> None:
        """One token per device, found by digest, replaced by the next, revocable per device or user."""
        store = self.store
        self.assertIsNone(await store.token_owner("d1"))
        await store.set_token("d1", "alice", "phone", 1000)
        await store.set_token("d2", "alice", "laptop", 2000)
        self.assertEqual(await store.token_owner("d1"), ("alice", "phone", 1000))
        await store.set_token("d3", "alice", "phone", 3000)
        self.assertIsNone(await store.token_owner("d1"), "a device's new token replaces its old one")
        self.assertEqual(await store.token_owner("d3"), ("alice", "phone", 3000))
        self.assertEqual(await store.revoke_tokens("alice", "phone"), 1)
        self.assertIsNone(await store.token_owner("d3"))
        await store.set_token("d4", "alice", "phone", 4000)
        self.assertEqual(await store.revoke_tokens("alice"), 2)
        self.assertIsNone(await store.token_owner("d2"))

    # Key directory -----------------------------------------------------------------------------

    async def test_key_directory(self) -> None:
        """Published keys by user and device; one-time keys handed out once each, oldest first."""
        store = self.store
        self.assertEqual(await store.device_keys(["alice"]), [])
        phone = DeviceKeys("alice", "phone", "curve-1", "ed-1", "sig-1", tuple(OneTimeKey(f"k{i}", f"otk{i}", f"s{i}") for i in range(3)))
        self.assertEqual(await store.publish_keys(phone, 10), 3)
        laptop = DeviceKeys("alice", "laptop", "curve-2", "ed-2", "sig-2")
        self.assertEqual(await store.publish_keys(laptop, 10), 0)
        await store.publish_keys(DeviceKeys("bob", "phone", "curve-3", "ed-3", "sig-3", (OneTimeKey("b", "otk-b", "s"),)), 10)
        bare = attrs.evolve(phone, one_time_keys=())
        self.assertEqual(await store.device_keys(["alice", "nobody"]), [laptop, bare])
        self.assertEqual(len(await store.device_keys(["bob", "alice", "bob"])), 3)
        # Republishing the same identity adds keys (known ids skipped), up to the limit.
        more = attrs.evolve(phone, one_time_keys=(OneTimeKey("k0", "otk0", "s0"), OneTimeKey("k3", "otk3", "s3"), OneTimeKey("k4", "otk4", "s4")))
        self.assertEqual(await store.publish_keys(more, 4), 4)
        claimed = await store.claim_one_time_keys([("alice", "phone"), ("alice", "laptop"), ("bob", "phone"), ("carol", "x")])
        self.assertEqual(claimed, {("alice", "phone"): OneTimeKey("k0", "otk0", "s0"), ("bob", "phone"): OneTimeKey("b", "otk-b", "s")})
        self.assertEqual(await store.claim_one_time_keys([("bob", "phone")]), {}, "each one-time key is handed out once")
        self.assertEqual((await store.claim_one_time_keys([("alice", "phone")]))[("alice", "phone")].key_id, "k1")
        store = await self.restart()
        self.assertEqual(await store.device_keys(["alice"]), [laptop, bare])
        self.assertEqual((await store.claim_one_time_keys([("alice", "phone")]))[("alice", "phone")].key_id, "k2")
        self.assertEqual(await store.publish_keys(bare, 10), 1, "k3 is left")
        # A new identity replaces the old one and drops its one-time keys.
        renewed = DeviceKeys("alice", "phone", "curve-9", "ed-9", "sig-9", (OneTimeKey("n", "otk-n", "s"),))
        self.assertEqual(await store.publish_keys(renewed, 10), 1)
        self.assertEqual(await store.claim_one_time_keys([("alice", "phone")]), {("alice", "phone"): OneTimeKey("n", "otk-n", "s")})
        self.assertEqual(await store.remove_device_keys("alice", "laptop"), 1)
        self.assertEqual([k.device for k in await store.device_keys(["alice"])], ["phone"])
        self.assertEqual(await store.remove_device_keys("alice"), 1)
        self.assertEqual(await store.remove_device_keys("alice"), 0)
        self.assertEqual(await store.device_keys(["alice"]), [])
        self.assertEqual([k.user for k in await store.device_keys(["alice", "bob"])], ["bob"])

    # Conversation ids --------------------------------------------------------------------------

    async def test_conversation_ids(self) -> None:
        for conversation in ("grp:team", "dm:alice", "dm:alice:bob:carol", "dm::alice", "", "G:x", "dm:bob:alice"):
            await self.refused(ErrorCode.INVALID_TARGET, conversation, "hello")
        await self.refused(ErrorCode.NOT_A_MEMBER, BC, "hello")
        await self.refused(ErrorCode.UNKNOWN_RECIPIENT, "dm:alice:zed", "hello")
        await self.refused(ErrorCode.UNKNOWN_RECIPIENT, "dm:alice:zed", operations.contact_add())
        self.assertEqual(await self.store.members("dm:alice:zed"), ())
        self.assertEqual(await self.store.conversations("alice"), {})
        self.assertEqual(await self.store.visible("alice"), {})

    async def test_unknown_operations_are_refused(self) -> None:
        group = await self.new_group()
        for conversation in (AB, group):
            await self.refused(ErrorCode.INVALID_OPERATION, conversation, Item("imkit/nonsense", b""))
            await self.refused(ErrorCode.INVALID_OPERATION, conversation, Item(schema.RECALLED, b""))
            await self.refused(ErrorCode.INVALID_OPERATION, conversation, "ok", Item(schema.RECALL, b"\x00"))
        await self.refused(ErrorCode.INVALID_OPERATION, AB, operations.group_leave())
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.contact_add())

    # Contacts ----------------------------------------------------------------------------------

    async def test_contacts(self) -> None:
        self.assertEqual(await self.store.contacts("alice"), {})
        appended = await self.send(AB, operations.contact_add())
        self.assertEqual(appended.audience, ("alice", "bob"))
        self.assertEqual([m.content_type for m in appended.messages], [schema.CONTACT_ADD])
        self.assertEqual(await self.store.contacts("alice"), {"bob": schema.RELATION_CONTACT})
        self.assertEqual(await self.store.contacts("bob"), {})
        await self.send(AC, operations.contact_block())
        self.assertEqual(
            await self.store.contacts("alice"), {"bob": schema.RELATION_CONTACT, "carol": schema.RELATION_BLOCKED}
        )
        await self.send(AC, operations.contact_remove())  # removing does not lift a block
        self.assertEqual(await self.store.contacts("alice"), {"bob": schema.RELATION_CONTACT, "carol": schema.RELATION_BLOCKED})
        await self.send(AC, operations.contact_unblock())
        await self.send(AB, operations.contact_remove())
        self.assertEqual(await self.store.contacts("alice"), {})
        await self.send(AB, operations.contact_unblock())  # unblocking someone not blocked changes nothing
        self.assertEqual(await self.store.contacts("alice"), {})
        # A bundle's operations apply in order; the last one stands.
        await self.send(AD, operations.contact_block(), operations.contact_unblock(), operations.contact_add())
        self.assertEqual(await self.store.contacts("alice"), {"dave": schema.RELATION_CONTACT})
        self.assertEqual(await self.store.head(AD), 3)

    async def test_a_block_refuses_content_both_ways(self) -> None:
        await self.send(AB, "hi")
        await self.send(AB, operations.contact_block(), sender="bob")
        self.assertEqual(await self.store.contacts("bob"), {"alice": schema.RELATION_BLOCKED})
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "hello?")
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "hello?", sender="bob")
        # Neither may the blocked one make themselves a contact.
        await self.refused(ErrorCode.NOT_ALLOWED, AB, operations.contact_add())
        # A bundle with any content is refused whole.
        await self.refused(ErrorCode.NOT_ALLOWED, AB, operations.contact_remove(), "sneaky")
        # Events land in the blocker's view too: no unblocking, editing or retention games.
        await self.refused(ErrorCode.NOT_ALLOWED, AB, operations.contact_unblock())
        await self.refused(ErrorCode.NOT_ALLOWED, AB, operations.edit(1, "text/plain", b"edited"))
        await self.refused(ErrorCode.NOT_ALLOWED, AB, operations.retention(60))
        self.assertEqual(await self.seqs(AB), [1, 2])
        await self.send(AB, operations.contact_unblock(), "sorry", sender="bob")
        await self.send(AB, "no problem")
        self.assertEqual(await self.seqs(AB), [1, 2, 3, 4, 5])
        # The blocker's own contact.add lifts the block too.
        await self.send(AB, operations.contact_block(), sender="bob")
        await self.send(AB, operations.contact_add(), "back", sender="bob")
        self.assertEqual(await self.store.contacts("bob"), {"alice": schema.RELATION_CONTACT})

    async def test_a_blocked_user_may_still_step_back_and_take_back(self) -> None:
        await self.send(AB, "hi")
        await self.send(AB, operations.contact_block(), sender="bob")
        await self.send(AB, operations.recall(1))
        await self.send(AB, operations.contact_remove(), operations.contact_block())
        self.assertEqual(await self.store.contacts("alice"), {"bob": schema.RELATION_BLOCKED})
        self.assertEqual(await self.seqs(AB), [1, 2, 3, 4, 5])

    async def test_contacts_policy(self) -> None:
        refused = self.sub(AB, "hello", client_msg_id=77)
        with self.assertRaises(Refused) as raised:
            await self.store.append(refused, CONTACTS)
        self.assertEqual(raised.exception.code, ErrorCode.NOT_ALLOWED)
        self.assertEqual(await self.store.head(AB), 0)
        self.assertEqual(await self.store.members(AB), ())
        self.assertEqual(await self.store.conversations("alice"), {})
        # Without the policy, anyone may write to anyone.
        await self.send(AC, "hello")
        # Asking is an operation, not content: it passes.
        await self.send(AB, operations.contact_add(), policy=CONTACTS)
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "hello", policy=CONTACTS)
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "hello", sender="bob", policy=CONTACTS)
        await self.send(AB, operations.contact_add(), sender="bob", policy=CONTACTS)
        # The refusal left no dedupe record: the same client id is judged afresh, and passes.
        again = await self.store.append(refused, CONTACTS)
        self.assertFalse(again.duplicate)
        self.assertEqual([m.seq for m in again.messages], [3])
        await self.send(AB, "hi", sender="bob", policy=CONTACTS)
        # A block beats being contacts.
        await self.send(AB, operations.contact_block(), sender="bob", policy=CONTACTS)
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "hello", policy=CONTACTS)
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "hello", policy=Policy())

    async def test_goodbye_then_removal(self) -> None:
        """[text, contact.remove] is one unit: the goodbye is stored, and the removal applies after it."""
        await self.send(AB, operations.contact_add(), policy=CONTACTS)
        await self.send(AB, operations.contact_add(), sender="bob", policy=CONTACTS)
        await self.send(AB, "hi", policy=CONTACTS)
        appended = await self.send(AB, "Goodbye", operations.contact_remove(), sender="bob", policy=CONTACTS)
        self.assertEqual([m.seq for m in appended.messages], [4, 5])
        self.assertEqual([m.bundle_remaining for m in appended.messages], [1, 0])
        self.assertEqual(appended.messages[1].server_id, appended.messages[0].server_id + 1)
        self.assertEqual([m.content_type for m in appended.messages], ["text/plain", schema.CONTACT_REMOVE])
        self.assertEqual(await self.store.contacts("bob"), {})
        self.assertEqual(await self.store.contacts("alice"), {"bob": schema.RELATION_CONTACT})
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "wait", policy=CONTACTS)
        await self.refused(ErrorCode.NOT_ALLOWED, AB, "wait", sender="bob", policy=CONTACTS)
        # The other order in one bundle is refused whole.
        await self.send(AB, operations.contact_add(), sender="bob", policy=CONTACTS)
        await self.refused(ErrorCode.NOT_ALLOWED, AB, operations.contact_remove(), "Goodbye", sender="bob", policy=CONTACTS)
        self.assertEqual(await self.store.contacts("bob"), {"alice": schema.RELATION_CONTACT})
        self.assertEqual(await self.seqs(AB), [1, 2, 3, 4, 5, 6])

    # Groups ------------------------------------------------------------------------------------

    async def test_group_create(self) -> None:
        appended = await self.send("g:team", operations.group_create("Team", ["bob", "carol", "bob"]), "welcome")
        self.assertEqual([m.seq for m in appended.messages], [1, 2])
        self.assertEqual(appended.audience, ("alice", "bob", "carol"))
        self.assertEqual([m.content_type for m in appended.messages], [schema.GROUP_CREATE, "text/plain"])
        self.assertEqual(
            await self.store.group("g:team"),
            Group(
                "alice",
                "Team",
                {
                    "alice": Membership("alice", schema.ROLE_OWNER, 1, 1),
                    "bob": Membership("bob", schema.ROLE_MEMBER, 1, 1),
                    "carol": Membership("carol", schema.ROLE_MEMBER, 1, 1),
                },
            ),
        )
        self.assertEqual(await self.store.members("g:team"), ("alice", "bob", "carol"))
        for user in ("alice", "bob", "carol"):
            self.assertEqual(await self.store.conversations(user), {"g:team": 2})
            self.assertEqual(await self.store.visible(user), {"g:team": (0, 2)})
        self.assertEqual(await self.store.visible("dave"), {})
        self.assertIsNone(await self.store.visibility("g:team", "dave"))
        self.assertIsNone(await self.store.group("g:other"))
        self.assertIsNone(await self.store.group(AB))
        # Created once only.
        await self.refused(ErrorCode.INVALID_OPERATION, "g:team", operations.group_create("Again"))
        await self.refused(ErrorCode.NOT_A_MEMBER, "g:team", operations.group_create("Mine"), sender="dave")
        await self.refused(ErrorCode.INVALID_OPERATION, "g:team", "hi", operations.group_create("Late"))
        await self.refused(ErrorCode.NOT_A_MEMBER, "g:new", "hi", operations.group_create("Late"))
        # A group of one is a group.
        await self.send("g:solo", operations.group_create("Solo"), sender="dave")
        self.assertEqual(await self.store.members("g:solo"), ("dave",))

    async def test_group_create_refusals(self) -> None:
        await self.refused(ErrorCode.UNKNOWN_RECIPIENT, "g:x", operations.group_create("X", ["bob", "zed"]))
        await self.refused(
            ErrorCode.INVALID_OPERATION, "g:x", operations.group_create("X" * 6), policy=Policy(max_title=5)
        )
        small = Policy(max_group_members=3)
        await self.refused(ErrorCode.INVALID_OPERATION, "g:x", operations.group_create("X", ["bob", "carol", "dave"]), policy=small)
        self.assertIsNone(await self.store.group("g:x"))
        self.assertEqual(await self.store.members("g:x"), ())
        self.assertEqual(await self.store.conversations("bob"), {})
        await self.send("g:x", operations.group_create("XXXXX", ["bob", "carol"]), policy=Policy(max_title=5, max_group_members=3))
        await self.refused(ErrorCode.INVALID_OPERATION, "g:x", operations.group_add(["dave"]), policy=small)
        await self.send("g:x", operations.group_add(["dave", "carol"]))
        self.assertEqual(await self.store.members("g:x"), ("alice", "bob", "carol", "dave"))

    async def test_non_members_are_refused_alike(self) -> None:
        group = await self.new_group(("bob",))
        await self.refused(ErrorCode.NOT_A_MEMBER, group, "hi", sender="carol")
        await self.refused(ErrorCode.NOT_A_MEMBER, "g:nowhere", "hi", sender="carol")
        await self.refused(ErrorCode.NOT_A_MEMBER, group, operations.group_add(["carol"]), sender="carol")
        await self.refused(ErrorCode.NOT_A_MEMBER, group, operations.group_leave(), sender="carol")
        self.assertEqual(await self.store.members("g:nowhere"), ())

    async def test_group_add(self) -> None:
        group = await self.new_group(("bob",))
        await self.send(group, "before dave")
        appended = await self.send(group, operations.group_add(["dave", "bob"]), "hi dave", sender="bob")
        self.assertEqual([m.seq for m in appended.messages], [3, 4])
        self.assertEqual(appended.audience, ("alice", "bob", "dave"))
        group_now = await self.store.group(group)
        self.assertEqual(group_now.members["dave"], Membership("dave", schema.ROLE_MEMBER, 3, 3))
        self.assertEqual(group_now.members["bob"], Membership("bob", schema.ROLE_MEMBER, 1, 1))
        self.assertEqual(group_now.owner, "alice")
        # Joined without history: dave reads from his join event on.
        self.assertEqual(await self.store.visibility(group, "dave"), (2, 4))
        self.assertEqual(await self.store.visible("dave"), {group: (2, 4)})
        self.assertEqual(await self.store.visibility(group, "bob"), (0, 4))
        self.assertEqual(await self.store.conversations("dave"), {group: 4})
        await self.send(group, "hi all", sender="dave")
        self.assertEqual(await self.store.visibility(group, "dave"), (2, 5))
        # An add opens its bundle; adding nobody new changes nothing; unknown users are refused.
        await self.refused(ErrorCode.INVALID_OPERATION, group, "hi", operations.group_add(["carol"]))
        await self.refused(ErrorCode.UNKNOWN_RECIPIENT, group, operations.group_add(["carol", "zed"]))
        await self.send(group, operations.group_add(["bob"]))
        self.assertEqual(await self.store.members(group), ("alice", "bob", "dave"))

    async def test_history_on_join(self) -> None:
        group = await self.new_group(("bob",), policy=HISTORY)
        await self.send(group, "before dave", policy=HISTORY)
        await self.send(group, operations.group_add(["dave"]), policy=HISTORY)
        self.assertEqual((await self.store.group(group)).members["dave"], Membership("dave", schema.ROLE_MEMBER, 3, 1))
        self.assertEqual(await self.store.visibility(group, "dave"), (0, 3))

    async def test_group_remove(self) -> None:
        group = await self.new_group(("bob", "carol"))
        await self.send(group, "one")
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.group_remove(["carol"]), sender="bob")
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.group_remove(["alice"]))
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.group_remove(["dave"]))
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.group_remove(["carol"]), "after")
        appended = await self.send(group, "bye carol", operations.group_remove(["carol"]))
        self.assertEqual([m.seq for m in appended.messages], [3, 4])
        self.assertEqual(appended.audience, ("alice", "bob", "carol"), "the removed member gets its removal")
        self.assertEqual(await self.store.members(group), ("alice", "bob"))
        self.assertEqual(set((await self.store.group(group)).members), {"alice", "bob"})
        await self.send(group, "two")
        after = await self.send(group, "three", sender="bob")
        self.assertEqual(after.audience, ("alice", "bob"))
        # A former member reads up to and including their removal, and nothing after.
        self.assertEqual(await self.store.visibility(group, "carol"), (0, 4))
        self.assertEqual(await self.store.visible("carol"), {group: (0, 4)})
        self.assertEqual(await self.store.conversations("carol"), {})
        await self.refused(ErrorCode.NOT_A_MEMBER, group, "let me in", sender="carol")
        # Added again, without history: from the new join on.
        await self.send(group, operations.group_add(["carol"]), sender="bob")
        self.assertEqual(await self.store.visibility(group, "carol"), (6, 7))
        self.assertEqual((await self.store.group(group)).members["carol"], Membership("carol", schema.ROLE_MEMBER, 7, 7))
        self.assertEqual(await self.store.conversations("carol"), {group: 7})

    async def test_group_leave(self) -> None:
        group = await self.new_group(("carol", "bob"))
        await self.send(group, operations.group_add(["dave"]), sender="carol")
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.group_leave(), "more")
        appended = await self.send(group, "bye", operations.group_leave())
        self.assertEqual(appended.audience, ("alice", "bob", "carol", "dave"))
        # bob and carol joined at the group's creation; the tie goes by name.
        found = await self.store.group(group)
        self.assertEqual(found.owner, "bob")
        self.assertEqual(
            found.members,
            {
                "bob": Membership("bob", schema.ROLE_OWNER, 1, 1),
                "carol": Membership("carol", schema.ROLE_MEMBER, 1, 1),
                "dave": Membership("dave", schema.ROLE_MEMBER, 2, 2),
            },
        )
        self.assertEqual(await self.store.visible("alice"), {group: (0, 4)})
        await self.refused(ErrorCode.NOT_A_MEMBER, group, "hello?")
        # The new owner removes; a member who is not the owner leaves without a hand-over.
        await self.send(group, operations.group_remove(["carol"]), sender="bob")
        await self.send(group, operations.group_leave(), sender="dave")
        self.assertEqual((await self.store.group(group)).owner, "bob")
        await self.send(group, operations.group_leave(), sender="bob")
        emptied = await self.store.group(group)
        self.assertEqual(emptied.members, {})
        self.assertEqual(await self.store.members(group), ())
        self.assertEqual(await self.store.visible("bob"), {group: (0, 7)})
        self.assertEqual(await self.store.visible("dave"), {group: (1, 6)})

    async def test_longest_standing_member_takes_over(self) -> None:
        group = await self.new_group(("dave",))
        await self.send(group, operations.group_add(["bob"]))
        await self.send(group, operations.group_add(["carol"]), "hi")
        await self.send(group, operations.group_leave())
        self.assertEqual((await self.store.group(group)).owner, "dave")
        await self.send(group, operations.group_leave(), sender="dave")
        self.assertEqual((await self.store.group(group)).owner, "bob")

    async def test_group_create_and_leave_in_one_bundle(self) -> None:
        await self.send("g:gift", operations.group_create("Gift", ["carol", "bob"]), "enjoy", operations.group_leave())
        found = await self.store.group("g:gift")
        self.assertEqual(found.owner, "bob")
        self.assertEqual(found.members["bob"].role, schema.ROLE_OWNER)
        self.assertEqual(set(found.members), {"bob", "carol"})
        self.assertEqual(await self.store.visible("alice"), {"g:gift": (0, 3)})

    async def test_group_retention_is_the_owners(self) -> None:
        group = await self.new_group(("bob",))
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.retention(60), sender="bob")
        await self.send(group, operations.retention(60))

    # Recall and edit ---------------------------------------------------------------------------

    async def test_recall(self) -> None:
        original = await self.send(AB, "oops", sent_at=T0)
        other = await self.send(AB, "mine", sender="bob", sent_at=T0)
        recall = await self.send(AB, operations.recall(1), sent_at=T0 + 120 * SECOND)
        self.assertEqual(recall.audience, ("alice", "bob"))
        self.assertEqual([m.content_type for m in recall.messages], [schema.RECALL])
        [recalled, kept, event] = await self.store.read(AB, 0, 10)
        self.assertEqual(recalled.content_type, schema.RECALLED)
        self.assertEqual(recalled.body, b"")
        self.assertEqual(recalled, attrs.evolve(original.messages[0], content_type=schema.RECALLED, body=b""))
        self.assertEqual(kept, other.messages[0])
        self.assertEqual(event, recall.messages[0])
        # A resend of the recalled message gets the recalled version back.
        again = await self.store.append(self.sub(AB, "oops", client_msg_id=original.messages[0].client_msg_id))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.messages, (recalled,))
        # Not twice, not someone else's, not an event, not a message that is not there.
        for seq in (1, 2, 3, 99, 0, U64_MAX):
            await self.refused(ErrorCode.INVALID_OPERATION, AB, operations.recall(seq), sent_at=T0 + SECOND)
        self.assertEqual(await self.store.head(AB), 3)

    async def test_recall_window(self) -> None:
        await self.send(AB, "one", sent_at=T0)
        await self.refused(ErrorCode.INVALID_OPERATION, AB, operations.recall(1), sent_at=T0 + 120 * SECOND + 1)
        await self.send(AB, operations.recall(1), sent_at=T0 + 600 * SECOND, policy=Policy(recall_window=600))
        self.assertEqual((await self.store.read(AB, 0, 1))[0].content_type, schema.RECALLED)

    async def test_recall_in_a_group(self) -> None:
        group = await self.new_group(("bob",))
        await self.send(group, "a", "b", sender="bob")
        await self.refused(ErrorCode.INVALID_OPERATION, group, operations.recall(2))
        appended = await self.send(group, operations.recall(3), "b, corrected", sender="bob")
        self.assertEqual(appended.audience, ("alice", "bob"))
        self.assertEqual(
            [(m.content_type, m.body) for m in await self.store.read(group, 1, 10)],
            [("text/plain", b"a"), (schema.RECALLED, b""), (schema.RECALL, operations.encode(schema.RECALL, operations.Recall(3))), ("text/plain", b"b, corrected")],
        )

    async def test_edit(self) -> None:
        original = await self.send(AB, "helo", sent_at=T0)
        edit = operations.edit(1, "text/plain", b"hello")
        appended = await self.send(AB, edit, sent_at=T0 + 900 * SECOND)
        self.assertEqual(appended.messages[0].content_type, schema.EDIT)
        self.assertEqual(appended.messages[0].body, edit.body)
        # The original stays as it was: devices show the newest edit.
        self.assertEqual((await self.store.read(AB, 0, 1)), list(original.messages))
        await self.refused(ErrorCode.INVALID_OPERATION, AB, edit, sent_at=T0 + 900 * SECOND + 1)
        await self.refused(ErrorCode.INVALID_OPERATION, AB, edit, sender="bob")
        await self.refused(ErrorCode.INVALID_OPERATION, AB, operations.edit(2, "text/plain", b"x"))
        await self.refused(ErrorCode.INVALID_OPERATION, AB, operations.edit(1, schema.CONTACT_ADD, b""))
        await self.send(AB, operations.edit(1, "text/markdown", b"*hello*"), sent_at=T0 + 2000 * SECOND, policy=Policy(edit_window=3600))
        # An edited message can still be recalled (in its window).
        await self.send(AB, operations.recall(1), sent_at=T0 + SECOND)
        self.assertEqual((await self.store.read(AB, 0, 1))[0].content_type, schema.RECALLED)
        await self.refused(ErrorCode.INVALID_OPERATION, AB, operations.edit(1, "text/plain", b"x"))

    # Retention ---------------------------------------------------------------------------------

    async def test_prune(self) -> None:
        for minute in range(5):
            await self.send(AB, f"{minute}", sent_at=T0 + minute * 60 * SECOND, client_msg_id=minute)
        await self.send(AC, "old", sent_at=T0)
        now = T0 + 10 * 60 * SECOND
        self.assertEqual(await self.store.prune(now, None), {}, "no TTL keeps everything")
        # A TTL of 7.5 minutes: what was sent before minute 2.5 goes.
        self.assertEqual(await self.store.prune(now, 450), {AB: 3, AC: 1})
        self.assertEqual(await self.store.prune(now, 450), {})
        self.assertEqual(await self.seqs(AB), [4, 5])
        self.assertEqual(await self.seqs(AB, 2, 1), [4])
        self.assertEqual(await self.store.read(AC, 0, 10), [])
        self.assertEqual(await self.store.head(AB), 5)
        self.assertEqual(await self.store.head(AC), 1)
        self.assertEqual(await self.store.visible("alice"), {AB: (3, 5), AC: (1, 1)})
        self.assertEqual(await self.store.visibility(AB, "bob"), (3, 5))
        self.assertEqual(await self.store.conversations("carol"), {AC: 1})
        # Numbering carries on after the floor.
        after = await self.send(AB, "later", sent_at=now)
        self.assertEqual(after.messages[0].seq, 6)
        # The dedupe records of pruned messages went with them; the others stay.
        resent = await self.store.append(self.sub(AB, "0", client_msg_id=0, sent_at=now))
        self.assertFalse(resent.duplicate)
        self.assertEqual(resent.messages[0].seq, 7)
        kept = await self.store.append(self.sub(AB, "4", client_msg_id=4, sent_at=now))
        self.assertTrue(kept.duplicate)
        self.assertEqual(kept.messages[0].seq, 5)
        # A pruned message cannot be recalled.
        await self.refused(ErrorCode.INVALID_OPERATION, AB, operations.recall(1), sent_at=T0)
        # Everything old enough goes; the floor reaches the head.
        self.assertEqual(await self.store.prune(now + 3600 * SECOND, 60), {AB: 7})
        self.assertEqual(await self.store.read(AB, 0, 100), [])
        self.assertEqual(await self.store.visibility(AB, "alice"), (7, 7))
        self.assertEqual((await self.send(AB, "again")).messages[0].seq, 8)

    async def test_prune_never_cuts_a_bundle(self) -> None:
        await self.send(AB, "a", "b", "c", sent_at=T0)
        await self.send(AB, "d", "e", sent_at=T0 + 10 * SECOND)
        self.assertEqual(await self.store.prune(T0 + 15 * SECOND, 10), {AB: 3})
        self.assertEqual(await self.seqs(AB), [4, 5])
        self.assertEqual(await self.seqs(AB, 0, 1), [4, 5])

    async def test_prune_keeps_a_prefix(self) -> None:
        """Only a prefix goes: an old message after a recent one waits for it."""
        await self.send(AB, "old", sent_at=T0)
        await self.send(AB, "new", sent_at=T0 + 100 * SECOND)
        await self.send(AB, "old again", sent_at=T0)
        self.assertEqual(await self.store.prune(T0 + 100 * SECOND, 50), {AB: 1})
        self.assertEqual(await self.seqs(AB), [2, 3])

    async def test_retention_per_conversation(self) -> None:
        await self.send(AB, "a", sent_at=T0)
        await self.send(AB, operations.retention(30), sent_at=T0 + 10 * SECOND)
        await self.send(AC, "a", sent_at=T0)
        await self.send(AD, "a", sent_at=T0)
        await self.send(AD, operations.retention(0), sent_at=T0)  # 0: the server's default
        group = await self.new_group(sent_at=T0)
        await self.send(group, operations.retention(3600), sent_at=T0)
        # Without a default, only AB has a TTL.
        self.assertEqual(await self.store.prune(T0 + 35 * SECOND, None), {AB: 1})
        self.assertEqual(await self.store.prune(T0 + 45 * SECOND, None), {AB: 2})
        # Its own TTL beats a longer default, and the group's beats a shorter one.
        await self.send(AB, "b", sent_at=T0 + 50 * SECOND)
        self.assertEqual(await self.store.prune(T0 + 100 * SECOND, 3000), {AB: 3})
        self.assertEqual(await self.store.prune(T0 + 100 * SECOND, 60), {AC: 1, AD: 2})
        self.assertEqual(await self.store.prune(T0 + 3601 * SECOND, 60), {group: 2})

    async def test_prune_raises_the_floor_for_members(self) -> None:
        group = await self.new_group(("bob",), sent_at=T0)
        await self.send(group, "a", sent_at=T0)
        await self.send(group, operations.group_add(["dave"]), sent_at=T0)
        await self.send(group, "b", "bye bob", operations.group_remove(["bob"]), sent_at=T0 + 100 * SECOND)
        await self.send(group, "c", sent_at=T0 + 200 * SECOND)
        self.assertEqual(await self.store.visible("dave"), {group: (2, 7)})
        self.assertEqual(await self.store.visible("bob"), {group: (0, 6)})
        self.assertEqual(await self.store.prune(T0 + 150 * SECOND, 60), {group: 3})
        self.assertEqual(await self.store.visible("dave"), {group: (3, 7)})
        self.assertEqual(await self.store.visible("alice"), {group: (3, 7)})
        self.assertEqual(await self.store.visible("bob"), {group: (3, 6)})
        self.assertEqual(await self.store.prune(T0 + 300 * SECOND, 60), {group: 7})
        self.assertEqual(await self.store.visible("bob"), {group: (6, 6)})
        self.assertEqual(await self.store.visible("dave"), {group: (7, 7)})

    # Read marks --------------------------------------------------------------------------------

    async def test_read_marks(self) -> None:
        self.assertEqual(await self.store.read_marks(AB), {})
        await self.store.set_read("alice", "phone", AB, 3)
        await self.store.set_read("alice", "laptop", AB, 5)
        await self.store.set_read("alice", "phone", AB, 2)  # forward only, per device
        await self.store.set_read("bob", "phone", AB, 1)
        await self.store.set_read("bob", "phone", AC, 9)
        self.assertEqual(await self.store.read_marks(AB), {"alice": 5, "bob": 1})
        await self.store.set_read("alice", "laptop", AB, 4)
        await self.store.set_read("alice", "phone", AB, 4)
        self.assertEqual(await self.store.read_marks(AB), {"alice": 5, "bob": 1})
        await self.store.set_read("alice", "phone", AB, 6)
        self.assertEqual(await self.store.read_marks(AB), {"alice": 6, "bob": 1})
        self.assertEqual(await self.store.read_marks(AC), {"bob": 9})
        await self.store.set_read("carol", "phone", AC, 0)  # nothing read yet is no mark
        self.assertEqual(await self.store.read_marks(AC), {"bob": 9})

    # Durability of the conversation state ------------------------------------------------------

    async def test_conversation_state_survives_reopen(self) -> None:
        group = await self.new_group(("bob", "carol"), sent_at=T0)
        await self.send(group, "a", sent_at=T0)
        await self.send(group, operations.group_add(["dave"]), sender="bob", sent_at=T0)
        await self.send(group, operations.retention(60), sent_at=T0 + 100 * SECOND)
        await self.send(group, "bye", operations.group_remove(["carol"]), sent_at=T0 + 100 * SECOND)
        await self.send(group, operations.group_leave(), sent_at=T0 + 100 * SECOND)
        recalled = await self.send(AB, "oops", sent_at=T0)
        await self.send(AB, operations.recall(recalled.messages[0].seq), sent_at=T0)
        await self.send(AB, operations.retention(3600), sent_at=T0)
        await self.send(AB, operations.contact_add(), sender="bob")
        await self.send(AC, operations.contact_block(), sender="carol")
        await self.store.set_read("bob", "phone", group, 3)
        await self.store.set_read("bob", "laptop", group, 5)
        self.assertEqual(await self.store.prune(T0 + 90 * SECOND, None), {group: 3})
        before = {
            "group": await self.store.group(group),
            "visible": {user: await self.store.visible(user) for user in CAST},
            "conversations": {user: await self.store.conversations(user) for user in CAST},
            "members": await self.store.members(group),
            "contacts": {user: await self.store.contacts(user) for user in CAST},
            "read": {c: await self.store.read(c, 0, 100) for c in (group, AB, AC)},
            "marks": await self.store.read_marks(group),
        }
        self.assertEqual(before["group"].owner, "bob")
        self.assertEqual(before["visible"]["carol"], {group: (3, 6), AC: (0, 1)})
        store = await self.restart()
        after = {
            "group": await store.group(group),
            "visible": {user: await store.visible(user) for user in CAST},
            "conversations": {user: await store.conversations(user) for user in CAST},
            "members": await store.members(group),
            "contacts": {user: await store.contacts(user) for user in CAST},
            "read": {c: await store.read(c, 0, 100) for c in (group, AB, AC)},
            "marks": await store.read_marks(group),
        }
        self.assertEqual(after, before)
        # Relations, membership and retention still rule after the restart.
        await self.refused(ErrorCode.NOT_ALLOWED, AC, "hi")
        await self.refused(ErrorCode.NOT_A_MEMBER, group, "hi")
        await self.refused(ErrorCode.NOT_A_MEMBER, group, "hi", sender="carol")
        await self.send(group, "still here", sender="dave", sent_at=T0 + 100 * SECOND)
        await self.send(AB, "x", sent_at=T0 + 3000 * SECOND)
        self.assertEqual(await store.prune(T0 + 200 * SECOND, None), {group: 8})
        self.assertEqual(await store.prune(T0 + 3601 * SECOND, None), {AB: 4})
        self.assertEqual(await self.seqs(AB), [5])

    # Content flags -----------------------------------------------------------------------------

    async def test_append_with_flags_marks_its_messages(self) -> None:
        """Flags name items; each marks the message its item became, in the same append."""
        await self.send(AB, "before")
        flagged = await self.store.append(
            self.sub(AB, "fine", "see evil.example", sender="bob"),
            Policy(),
            [ItemFlag(1, "phishing", "links to evil.example"), ItemFlag(1, "words", "rude"), ItemFlag(0, "words", "odd")],
        )
        self.assertFalse(flagged.duplicate)
        self.assertEqual([m.seq for m in flagged.messages], [2, 3])
        self.assertEqual(await self.seqs(AB), [1, 2, 3], "a flagged message is stored like any other")
        first, second = flagged.messages
        self.assertEqual(
            await self.store.flags(),
            [
                Flag(second.server_id, AB, 3, "bob", "phishing", "links to evil.example"),
                Flag(second.server_id, AB, 3, "bob", "words", "rude"),
                Flag(first.server_id, AB, 2, "bob", "words", "odd"),
            ],
        )
        self.assertEqual(await self.store.flags(AC), [])
        self.assertEqual(len(await self.store.flags(AB, limit=2)), 2)
        self.assertEqual(await self.store.flags(limit=0), [])
        # Plain tuples do as well as ItemFlags.
        other = await self.store.append(self.sub(AC, "x"), Policy(), [(0, "words", "rude")])
        self.assertEqual(await self.store.flags(AC), [Flag(other.messages[0].server_id, AC, 1, "alice", "words", "rude")])
        self.assertEqual((await self.store.flags(limit=1))[0].conversation, AC, "newest message first")

    async def test_a_flagged_resend_adds_no_flags(self) -> None:
        original = await self.store.append(self.sub(AB, "x", client_msg_id=5), Policy(), [ItemFlag(0, "a", "first")])
        again = await self.store.append(self.sub(AB, "x", client_msg_id=5), Policy(), [ItemFlag(0, "b", "second")])
        self.assertTrue(again.duplicate)
        self.assertEqual(again.messages, original.messages)
        self.assertEqual([f.checker for f in await self.store.flags()], ["a"])

    async def test_a_refused_or_invalid_flagged_append_writes_nothing(self) -> None:
        group = await self.new_group(("bob",))
        with self.assertRaises(Refused):
            await self.store.append(self.sub(group, "hi", sender="carol"), Policy(), [ItemFlag(0, "words", "rude")])
        for flags in ([ItemFlag(1, "words", "no such item")], [ItemFlag(-1, "w", "")], [(0, "", "no checker")], [(0, "w", None)], ["junk"]):
            with self.assertRaises(ValueError):
                await self.store.append(self.sub(AB, "hi"), Policy(), flags)
        self.assertEqual(await self.store.flags(), [])
        self.assertEqual(await self.store.head(AB), 0)
        self.assertEqual(await self.store.head(group), 1)

    async def test_flagged_and_plain_appends_interleave(self) -> None:
        """Issued together, flagged and plain appends are numbered in issue order, ids unique."""
        calls = []
        for n in range(12):
            flags = [ItemFlag(0, "every-third", f"#{n}")] if n % 3 == 1 else []
            calls.append(self.store.append(self.sub(AB if n % 2 else AC, f"m{n}"), Policy(), flags))
        results = await defer.gatherResults(calls)
        self.assertEqual([m.seq for r in results[1::2] for m in r.messages], list(range(1, 7)))
        self.assertEqual([m.seq for r in results[0::2] for m in r.messages], list(range(1, 7)))
        ids = [r.messages[0].server_id for r in results]
        self.assertEqual(sorted(ids), ids)
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(
            [(f.server_id, f.reason) for f in await self.store.flags()],
            [(results[n].messages[0].server_id, f"#{n}") for n in (10, 7, 4, 1)],
        )
        later = await self.send(AB, "after")
        self.assertEqual(later.messages[0].seq, 7)
        self.assertGreater(later.messages[0].server_id, max(ids))

    async def test_flag_a_stored_message(self) -> None:
        appended = await self.send(AB, "one", "two", sender="bob")
        second = appended.messages[1]
        flag = await self.store.flag(second.server_id, "moderator", "reported by alice")
        self.assertEqual(flag, Flag(second.server_id, AB, 2, "bob", "moderator", "reported by alice"))
        self.assertEqual(await self.store.flags(AB), [flag])
        # The same checker again replaces its reason; another checker adds its own.
        replaced = await self.store.flag(second.server_id, "moderator", "confirmed")
        other = await self.store.flag(second.server_id, "abuse-desk", "seen")
        self.assertEqual(await self.store.flags(AB), [other, replaced])
        for server_id in (second.server_id + 100, 0, -1, 2**64):
            with self.assertRaises(UnknownMessage):
                await self.store.flag(server_id, "moderator", "x")
        with self.assertRaises(ValueError):
            await self.store.flag(second.server_id, "", "x")
        self.assertEqual(len(await self.store.flags()), 2)

    async def test_flags_survive_reopen_and_go_with_pruned_messages(self) -> None:
        old = await self.store.append(self.sub(AB, "old", sent_at=T0), Policy(), [ItemFlag(0, "w", "old")])
        new = await self.store.append(self.sub(AB, "new", sent_at=T0 + 100 * SECOND), Policy(), [ItemFlag(0, "w", "new")])
        await self.store.append(self.sub(AC, "kept", sent_at=T0), Policy(), [ItemFlag(0, "w", "kept")])
        await self.store.append(self.sub(AC, operations.retention(3600), sent_at=T0))
        before = await self.store.flags()
        self.assertEqual(len(before), 3)
        store = await self.restart()
        self.assertEqual(await store.flags(), before)
        self.assertEqual(await store.prune(T0 + 120 * SECOND, 60), {AB: 1})
        self.assertEqual([f.reason for f in await store.flags()], ["kept", "new"])
        with self.assertRaises(UnknownMessage):
            await store.flag(old.messages[0].server_id, "w", "gone")
        self.assertEqual((await store.flag(new.messages[0].server_id, "w", "again")).reason, "again")
