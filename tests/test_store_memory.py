"""MemoryStore: the contract, plus a model-based check of sequences, bundles and dedupe."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from imkit.store import IStore, MemoryStore, UserExists
from store_contract import AB, AC, BC, CAST, StoreContract, submission


def with_cast() -> MemoryStore:
    store = MemoryStore()
    for name in CAST:
        store.add_user(name, f"hash-{name}")
    return store


class MemoryStoreContractTests(StoreContract, unittest.TestCase):
    def make_store(self) -> IStore:
        return MemoryStore()

    async def reopen(self, store: IStore) -> IStore:
        return store


class MemoryStoreTests(unittest.SynchronousTestCase):
    def test_answers_are_already_fired(self) -> None:
        """The deterministic simulation relies on never waiting for the memory store."""
        store = with_cast()
        self.assertIsNone(self.successResultOf(store.open()))
        appended = self.successResultOf(store.append(submission(1)))
        self.assertEqual(self.successResultOf(store.head(AB)), 1)
        self.assertEqual(appended.messages[0].seq, 1)
        self.successResultOf(store.add_user("a", "h"))
        self.failureResultOf(store.add_user("a", "h"), UserExists)

    def test_server_ids_count_from_one_across_conversations(self) -> None:
        store = with_cast()
        ids = []
        for client_msg_id, conversation in enumerate([AB, AC, AB]):
            appended = self.successResultOf(
                store.append(submission(client_msg_id, conversation, bodies=(b"1", b"2")))
            )
            ids += [m.server_id for m in appended.messages]
        self.assertEqual(ids, [1, 2, 3, 4, 5, 6])

    def test_restart_keeps_everything(self) -> None:
        """A simulated restart closes the store and opens the same object again."""
        store = with_cast()
        self.successResultOf(store.open())
        original = self.successResultOf(store.append(submission(1)))
        self.successResultOf(store.set_cursor("alice", "phone", AB, 1))
        self.successResultOf(store.close())
        self.successResultOf(store.open())
        again = self.successResultOf(store.append(submission(1)))
        self.assertEqual(again.messages, original.messages)
        self.assertTrue(again.duplicate)
        self.assertEqual(self.successResultOf(store.list_users()), list(CAST))
        self.assertEqual(self.successResultOf(store.cursors("alice", "phone")), {AB: 1})
        after = self.successResultOf(store.append(submission(2)))
        self.assertEqual((after.messages[0].seq, after.messages[0].server_id), (2, 2))


# (conversation, which of its two users sends, client_msg_id, bundle size): few values, so
# duplicates are common.
CONVERSATIONS = [AB, AC, BC]
appends = st.lists(
    st.tuples(
        st.sampled_from(CONVERSATIONS),
        st.sampled_from([0, 1]),
        st.integers(0, 6),
        st.integers(1, 4),
    ),
    max_size=25,
)


class MemoryStoreModelTests(unittest.SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(appends, st.data())
    def test_against_a_model(self, operations, data) -> None:
        """
        A list of submissions per conversation is the whole model: seqs are positions in it,
        a repeated key returns what the first one stored, and reads never end inside a bundle.
        """
        store = with_cast()
        stored: dict[str, list] = {}
        originals: dict[tuple, tuple] = {}
        for conversation, which, client_msg_id, size in operations:
            sender = conversation.split(":")[1 + which]
            key = (sender, "phone", client_msg_id)
            bodies = tuple(b"%d" % n for n in range(size))
            result = self.successResultOf(
                store.append(submission(client_msg_id, conversation, sender=sender, bodies=bodies))
            )
            if key in originals:
                self.assertTrue(result.duplicate)
                self.assertEqual(result.messages, originals[key])
                continue
            self.assertFalse(result.duplicate)
            messages = stored.setdefault(conversation, [])
            self.assertEqual(
                [m.seq for m in result.messages],
                list(range(len(messages) + 1, len(messages) + size + 1)),
            )
            self.assertEqual([m.bundle_remaining for m in result.messages], list(range(size))[::-1])
            messages.extend(result.messages)
            originals[key] = result.messages

        all_ids = [m.server_id for messages in stored.values() for m in messages]
        self.assertEqual(sorted(all_ids), list(range(1, len(all_ids) + 1)))
        for conversation in CONVERSATIONS:
            messages = stored.get(conversation, [])
            self.assertEqual(self.successResultOf(store.head(conversation)), len(messages))
            after_seq = data.draw(st.integers(0, len(messages) + 1), label="after_seq")
            limit = data.draw(st.integers(0, 6), label="limit")
            read = self.successResultOf(store.read(conversation, after_seq, limit))
            available = messages[after_seq:]
            plain = min(limit, len(available))
            extra = available[plain - 1].bundle_remaining if plain else 0
            self.assertEqual(read, available[: plain + extra])
            if read:
                self.assertEqual(read[-1].bundle_remaining, 0)
