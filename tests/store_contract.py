"""
The IStore contract: one test suite every storage backend must pass.

Mix ``StoreContract`` into a ``twisted.trial.unittest.TestCase`` and define ``make_store()`` (a new,
unopened store) and ``reopen(store)`` (close it and return a freshly opened store on the same data;
a store that keeps everything in its object returns that same object).
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface.verify import verifyObject

from imkit.model import Appended, Item, Message, Submission
from imkit.store.interface import IStore, UnknownUser, UserExists

U64_MAX = 2**64 - 1


def submission(
    client_msg_id: int,
    conversation: str = "grp:team",
    sender: str = "alice",
    device: str = "phone",
    members: tuple[str, ...] = ("alice", "bob"),
    bodies: tuple[bytes, ...] = (b"hello",),
    sent_at: int = 1_700_000_000_000,
    content_type: str = "text/plain",
) -> Submission:
    return Submission(
        sender=sender,
        sender_device=device,
        client_msg_id=client_msg_id,
        conversation=conversation,
        members=members,
        sent_at=sent_at,
        items=tuple(Item(content_type, body) for body in bodies),
    )


class StoreContract:
    """What every IStore promises; see the module docstring for the two hooks."""

    def make_store(self) -> IStore:
        """A new store over empty storage, not opened yet (subclasses define this)."""
        raise NotImplementedError(f"{type(self).__name__} must define make_store()")

    async def reopen(self, store: IStore) -> IStore:
        """Close ``store`` and return an opened store on the same data (subclasses define this)."""
        raise NotImplementedError(f"{type(self).__name__} must define reopen()")

    def setUp(self) -> defer.Deferred:
        self.store = self.make_store()
        self.addCleanup(lambda: self.store.close())
        return self.store.open()

    async def restart(self) -> IStore:
        self.store = await self.reopen(self.store)
        return self.store

    # The interface -----------------------------------------------------------------------------

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertIsInstance(self.store.description, str)

    # Sequences and server ids ------------------------------------------------------------------

    async def test_sequences_are_consecutive_per_conversation(self) -> None:
        seqs: dict[str, list[int]] = {"grp:a": [], "grp:b": []}
        for client_msg_id, conversation in enumerate(["grp:a", "grp:b", "grp:a", "grp:a", "grp:b"]):
            appended = await self.store.append(submission(client_msg_id, conversation))
            self.assertFalse(appended.duplicate)
            seqs[conversation] += [message.seq for message in appended.messages]
        self.assertEqual(seqs, {"grp:a": [1, 2, 3], "grp:b": [1, 2]})
        self.assertEqual(await self.store.head("grp:a"), 3)
        self.assertEqual(await self.store.head("grp:b"), 2)

    async def test_server_ids_are_unique(self) -> None:
        server_ids = []
        for client_msg_id in range(12):
            conversation = f"grp:{client_msg_id % 3}"
            bodies = (b"x",) * (1 + client_msg_id % 2)
            appended = await self.store.append(
                submission(client_msg_id, conversation, bodies=bodies)
            )
            server_ids += [message.server_id for message in appended.messages]
        self.assertEqual(len(server_ids), 18)
        self.assertEqual(len(set(server_ids)), 18)

    async def test_bundle_server_ids_are_consecutive(self) -> None:
        """A client numbers its own bundle's messages from the first id in the ack."""
        await self.store.append(submission(1, "grp:a"))
        appended = await self.store.append(submission(2, "grp:a", bodies=(b"1", b"2", b"3")))
        first = appended.messages[0].server_id
        self.assertEqual([m.server_id for m in appended.messages], [first, first + 1, first + 2])

    async def test_message_fields(self) -> None:
        sub = submission(7, "grp:x", sender="carol", device="laptop", sent_at=123456789)
        appended = await self.store.append(sub)
        [message] = appended.messages
        self.assertEqual(
            message,
            Message(
                server_id=message.server_id,
                conversation="grp:x",
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
        self.assertEqual(await self.store.read("grp:x", 0, 10), [message])

    async def test_bundle(self) -> None:
        await self.store.append(submission(1, "grp:x"))
        appended = await self.store.append(
            submission(2, "grp:x", bodies=(b"one", b"two", b"three"), sent_at=55)
        )
        messages = appended.messages
        self.assertEqual([m.seq for m in messages], [2, 3, 4])
        self.assertEqual([m.bundle_remaining for m in messages], [2, 1, 0])
        self.assertEqual([m.body for m in messages], [b"one", b"two", b"three"])
        self.assertEqual(
            {(m.client_msg_id, m.sent_at, m.sender) for m in messages}, {(2, 55, "alice")}
        )
        self.assertEqual(len({m.server_id for m in messages}), 3)
        self.assertEqual(await self.store.head("grp:x"), 4)

    # Reading -----------------------------------------------------------------------------------

    async def test_read_in_order_with_limit(self) -> None:
        for client_msg_id in range(10):
            await self.store.append(submission(client_msg_id, bodies=(b"%d" % client_msg_id,)))
        messages = await self.store.read("grp:team", 3, 4)
        self.assertEqual([m.seq for m in messages], [4, 5, 6, 7])
        self.assertEqual([m.body for m in messages], [b"3", b"4", b"5", b"6"])
        everything = await self.store.read("grp:team", 0, 100)
        self.assertEqual([m.seq for m in everything], list(range(1, 11)))

    async def test_read_never_cuts_a_bundle(self) -> None:
        await self.store.append(submission(1))
        await self.store.append(submission(2, bodies=(b"a", b"b", b"c")))
        await self.store.append(submission(3))

        async def seqs(after_seq: int, limit: int) -> list[int]:
            return [m.seq for m in await self.store.read("grp:team", after_seq, limit)]

        self.assertEqual(await seqs(0, 1), [1])
        self.assertEqual(await seqs(0, 2), [1, 2, 3, 4])
        self.assertEqual(await seqs(1, 1), [2, 3, 4])
        self.assertEqual(await seqs(2, 1), [3, 4])
        self.assertEqual(await seqs(0, 4), [1, 2, 3, 4])
        self.assertEqual(await seqs(0, 5), [1, 2, 3, 4, 5])
        self.assertEqual(await seqs(4, 1), [5])

    async def test_read_past_the_head_or_unknown(self) -> None:
        await self.store.append(submission(1))
        self.assertEqual(await self.store.read("grp:team", 1, 10), [])
        self.assertEqual(await self.store.read("grp:team", 99, 10), [])
        self.assertEqual(await self.store.read("grp:team", 0, 0), [])
        self.assertEqual(await self.store.read("grp:nobody", 0, 10), [])
        self.assertEqual(await self.store.head("grp:nobody"), 0)

    # Deduplication -----------------------------------------------------------------------------

    async def test_duplicate_returns_the_original_and_writes_nothing(self) -> None:
        original = await self.store.append(submission(42, "grp:x"))
        await self.store.append(submission(43, "grp:x"))
        # Same key, different everything else: still the original, and nothing is written.
        again = await self.store.append(
            submission(42, "grp:elsewhere", members=("alice", "dave"), bodies=(b"other", b"two"))
        )
        self.assertEqual(again, Appended(messages=original.messages, duplicate=True))
        self.assertEqual(await self.store.head("grp:x"), 2)
        self.assertEqual(await self.store.head("grp:elsewhere"), 0)
        self.assertEqual(await self.store.members("grp:elsewhere"), ())
        self.assertEqual(await self.store.conversations("dave"), {})
        self.assertEqual(len(await self.store.read("grp:x", 0, 10)), 2)

    async def test_duplicate_bundle(self) -> None:
        original = await self.store.append(submission(5, bodies=(b"1", b"2", b"3")))
        again = await self.store.append(submission(5, bodies=(b"1", b"2", b"3")))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.messages, original.messages)
        self.assertEqual(await self.store.head("grp:team"), 3)

    async def test_duplicate_issued_while_the_original_is_in_flight(self) -> None:
        first, second = await defer.gatherResults(
            [self.store.append(submission(9)), self.store.append(submission(9))]
        )
        self.assertFalse(first.duplicate)
        self.assertEqual(second, Appended(messages=first.messages, duplicate=True))
        self.assertEqual(await self.store.head("grp:team"), 1)

    async def test_dedupe_key_is_sender_device_and_client_id(self) -> None:
        results = [
            await self.store.append(submission(1, sender="alice", device="phone")),
            await self.store.append(submission(1, sender="alice", device="laptop")),
            await self.store.append(submission(1, sender="bob", device="phone")),
        ]
        self.assertEqual([r.duplicate for r in results], [False, False, False])
        self.assertEqual(await self.store.head("grp:team"), 3)

    async def test_dedupe_survives_reopen(self) -> None:
        original = await self.store.append(submission(1, bodies=(b"a", b"b")))
        store = await self.restart()
        again = await store.append(submission(1, bodies=(b"a", b"b")))
        self.assertEqual(again, Appended(messages=original.messages, duplicate=True))
        self.assertEqual(await store.head("grp:team"), 2)
        # Numbering carries on where it stopped, with server ids never reused.
        after = await store.append(submission(2))
        self.assertEqual(after.messages[0].seq, 3)
        old_ids = {m.server_id for m in original.messages}
        self.assertNotIn(after.messages[0].server_id, old_ids)

    async def test_everything_survives_reopen(self) -> None:
        await self.store.add_user("alice", "hash-a")
        appended = await self.store.append(submission(1, bodies=(b"x", b"y")))
        await self.store.set_cursor("alice", "phone", "grp:team", 1)
        store = await self.restart()
        self.assertEqual(await store.list_users(), ["alice"])
        self.assertEqual(await store.password_hash("alice"), "hash-a")
        self.assertEqual(await store.read("grp:team", 0, 10), list(appended.messages))
        self.assertEqual(await store.members("grp:team"), ("alice", "bob"))
        self.assertEqual(await store.conversations("bob"), {"grp:team": 2})
        self.assertEqual(await store.cursors("alice", "phone"), {"grp:team": 1})

    # Members and conversations -----------------------------------------------------------------

    async def test_members_and_conversations(self) -> None:
        self.assertEqual(await self.store.members("grp:team"), ())
        await self.store.append(submission(1, "grp:team", members=("carol", "alice")))
        self.assertEqual(await self.store.members("grp:team"), ("alice", "carol"))
        await self.store.append(submission(2, "grp:team", members=("alice", "bob")))
        self.assertEqual(await self.store.members("grp:team"), ("alice", "bob", "carol"))
        await self.store.append(submission(3, "dm:alice:carol", members=("alice", "carol")))
        await self.store.append(submission(4, "dm:alice:carol", members=("alice", "carol")))
        self.assertEqual(
            await self.store.conversations("alice"), {"grp:team": 2, "dm:alice:carol": 2}
        )
        self.assertEqual(await self.store.conversations("bob"), {"grp:team": 2})
        self.assertEqual(await self.store.conversations("nobody"), {})

    # Cursors -----------------------------------------------------------------------------------

    async def test_cursors_only_move_forward(self) -> None:
        self.assertEqual(await self.store.cursors("alice", "phone"), {})
        await self.store.set_cursor("alice", "phone", "grp:team", 5)
        await self.store.set_cursor("alice", "phone", "grp:team", 3)
        self.assertEqual(await self.store.cursors("alice", "phone"), {"grp:team": 5})
        await self.store.set_cursor("alice", "phone", "grp:team", 7)
        await self.store.set_cursor("alice", "phone", "dm:alice:bob", 1)
        await self.store.set_cursor("alice", "laptop", "grp:team", 2)
        self.assertEqual(
            await self.store.cursors("alice", "phone"), {"grp:team": 7, "dm:alice:bob": 1}
        )
        self.assertEqual(await self.store.cursors("alice", "laptop"), {"grp:team": 2})
        self.assertEqual(await self.store.cursors("bob", "phone"), {})

    # Users -------------------------------------------------------------------------------------

    async def test_users(self) -> None:
        self.assertEqual(await self.store.list_users(), [])
        self.assertIsNone(await self.store.password_hash("alice"))
        await self.store.add_user("bob", "hash-b")
        await self.store.add_user("alice", "hash-a")
        with self.assertRaises(UserExists):
            await self.store.add_user("alice", "other")
        self.assertEqual(await self.store.password_hash("alice"), "hash-a")
        await self.store.set_password_hash("alice", "hash-a2")
        self.assertEqual(await self.store.password_hash("alice"), "hash-a2")
        with self.assertRaises(UnknownUser):
            await self.store.set_password_hash("carol", "hash-c")
        self.assertIsNone(await self.store.password_hash("carol"))
        self.assertEqual(await self.store.list_users(), ["alice", "bob"])

    async def test_a_failing_call_fails_alone(self) -> None:
        calls = [
            self.store.add_user("alice", "1"),
            self.store.append(submission(1)),
            self.store.add_user("alice", "2"),
            self.store.set_password_hash("nobody", "3"),
            self.store.add_user("bob", "4"),
            self.store.append(submission(2)),
        ]
        results = await defer.DeferredList(calls, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, False, True, True])
        self.assertIsInstance(results[2][1].value, UserExists)
        self.assertIsInstance(results[3][1].value, UnknownUser)
        self.assertEqual(results[5][1].messages[0].seq, 2)
        self.assertEqual(await self.store.password_hash("alice"), "1")
        self.assertEqual(await self.store.list_users(), ["alice", "bob"])

    # Values ------------------------------------------------------------------------------------

    async def test_unsigned_64_bit_client_ids(self) -> None:
        for client_msg_id in (U64_MAX, 0, 2**63, 2**63 - 1):
            appended = await self.store.append(submission(client_msg_id))
            self.assertEqual(appended.messages[0].client_msg_id, client_msg_id)
        self.assertEqual(
            [m.client_msg_id for m in await self.store.read("grp:team", 0, 10)],
            [U64_MAX, 0, 2**63, 2**63 - 1],
        )
        again = await self.store.append(submission(U64_MAX))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.messages[0].seq, 1)

    async def test_invalid_submissions_are_refused(self) -> None:
        for bad in (submission(1, bodies=()), submission(-1), submission(2**64)):
            with self.assertRaises(ValueError):
                await self.store.append(bad)
        self.assertEqual(await self.store.head("grp:team"), 0)
        self.assertEqual(await self.store.members("grp:team"), ())

    async def test_unicode_and_empty_bodies(self) -> None:
        every_byte = bytes(range(256))
        sub = submission(
            1,
            "grp:日本語 ✓",
            sender="zoë",
            device="📱",
            members=("zoë", "Ωmega"),
            bodies=(b"", every_byte, "héllo".encode()),
            content_type="text/plain; charset=utf-8",
        )
        appended = await self.store.append(sub)
        read = await self.store.read("grp:日本語 ✓", 0, 10)
        self.assertEqual(read, list(appended.messages))
        self.assertEqual([m.body for m in read], [b"", every_byte, "héllo".encode()])
        self.assertEqual({(m.sender, m.sender_device) for m in read}, {("zoë", "📱")})
        self.assertEqual(await self.store.members("grp:日本語 ✓"), ("zoë", "Ωmega"))
        await self.store.add_user("zoë", "hásh")
        self.assertEqual(await self.store.password_hash("zoë"), "hásh")

    # Concurrency -------------------------------------------------------------------------------

    async def test_concurrent_appends_are_numbered_in_issue_order(self) -> None:
        count = 300
        appends = [self.store.append(submission(i, bodies=(b"%d" % i,))) for i in range(count)]
        # Calls take effect in the order they were made, reads included.
        head = self.store.head("grp:team")
        results = await defer.gatherResults(appends)
        self.assertEqual([r.messages[0].seq for r in results], list(range(1, count + 1)))
        self.assertEqual(await head, count)
        stored = await self.store.read("grp:team", 0, count)
        self.assertEqual([m.body for m in stored], [b"%d" % i for i in range(count)])

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
