"""SQLiteStore: the contract, plus durability, batching, other processes and the schema version."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import threading

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from imkit.store import (
    IStore,
    MemoryStore,
    SchemaVersionError,
    SQLiteStore,
    StoreClosed,
    StoreError,
    StoreStringError,
    UserExists,
    sqlite as sqlite_module,
    store_from_string,
)
from store_contract import StoreContract, submission


class TemporaryDirectory:
    """A fresh directory per test, removed afterwards (trial's mktemp would write into the tree)."""

    def directory(self) -> str:
        if not hasattr(self, "_directory"):
            self._directory = tempfile.mkdtemp(prefix="imkit-sqlite-")
            self.addCleanup(shutil.rmtree, self._directory, True)
        return self._directory

    def database(self) -> str:
        return os.path.join(self.directory(), "imkit.db")


class SQLiteStoreContractTests(TemporaryDirectory, StoreContract, unittest.TestCase):
    batch_limit = 500

    def make_store(self) -> IStore:
        return SQLiteStore(self.database(), batch_limit=self.batch_limit)

    async def reopen(self, store: IStore) -> IStore:
        await store.close()
        reopened = SQLiteStore(self.database(), batch_limit=self.batch_limit)
        await reopened.open()
        return reopened


class SQLiteStoreSmallBatchContractTests(SQLiteStoreContractTests):
    """The contract again with batches of two, so concurrent calls span several transactions."""

    batch_limit = 2


class CountingReactor:
    """Delegates to the real reactor, counting the worker's callFromThread calls."""

    def __init__(self) -> None:
        self.calls = 0

    def callFromThread(self, function, *args, **kwargs) -> None:
        self.calls += 1  # only the worker thread calls this
        reactor.callFromThread(function, *args, **kwargs)


class SQLiteStoreTests(TemporaryDirectory, unittest.TestCase):
    async def opened(self, **kwargs) -> SQLiteStore:
        store = SQLiteStore(self.database(), **kwargs)
        self.addCleanup(store.close)
        await store.open()
        return store

    def lock_database(self) -> sqlite3.Connection:
        """Hold the write lock from another connection, as the CLI would while adding a user."""
        other = sqlite3.connect(self.database(), isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        return other

    async def test_acknowledged_writes_survive_close_and_reopen(self) -> None:
        store = await self.opened()
        calls = [store.append(submission(i, bodies=(b"m%d" % i, b"n"))) for i in range(50)]
        calls += [store.add_user("alice", "h"), store.set_cursor("alice", "phone", "grp:team", 9)]
        closed = store.close()  # issued before any call was answered: close drains them first
        results = await defer.gatherResults(calls)
        await closed
        reopened = await self.opened()
        self.assertEqual(await reopened.head("grp:team"), 100)
        messages = await reopened.read("grp:team", 0, 1000)
        self.assertEqual(messages, [m for result in results[:50] for m in result.messages])
        self.assertEqual(await reopened.list_users(), ["alice"])
        self.assertEqual(await reopened.cursors("alice", "phone"), {"grp:team": 9})

    async def test_wal_mode_and_schema_version(self) -> None:
        store = await self.opened()
        await store.close()
        connection = sqlite3.connect(self.database())
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(
            connection.execute("PRAGMA user_version").fetchone()[0], sqlite_module.SCHEMA_VERSION
        )

    async def test_another_process_adds_a_user_while_open(self) -> None:
        server = await self.opened()
        await server.append(submission(1))
        cli = await self.opened()  # its own connection and thread, like the imkit CLI
        await cli.add_user("carol", "hash-c")
        with self.assertRaises(UserExists):
            await cli.add_user("carol", "again")
        await cli.close()
        self.assertEqual(await server.list_users(), ["carol"])
        self.assertEqual((await server.append(submission(2))).messages[0].seq, 2)

    async def test_waits_for_another_writer_and_batches_meanwhile(self) -> None:
        counting = CountingReactor()
        store = await self.opened(reactor=counting)
        other = self.lock_database()
        calls = [store.add_user("alice", "h")]
        calls += [store.append(submission(i)) for i in range(100)]
        calls += [store.add_user("alice", "again"), store.add_user("bob", "h")]
        before = counting.calls
        await task.deferLater(reactor, 0.2, lambda: None)
        other.execute("COMMIT")  # the worker was waiting on busy_timeout all along
        results = await defer.DeferredList(calls, consumeErrors=True)
        # One transaction for whatever the worker took before it blocked, one for the rest.
        self.assertLessEqual(counting.calls - before, 2)
        self.assertEqual([ok for ok, _ in results], [True] * 101 + [False, True])
        self.assertIsInstance(results[101][1].value, UserExists)
        self.assertEqual([r.messages[0].seq for _, r in results[1:101]], list(range(1, 101)))
        self.assertEqual(await store.list_users(), ["alice", "bob"])

    async def test_batch_limit(self) -> None:
        counting = CountingReactor()
        store = await self.opened(reactor=counting, batch_limit=10)
        other = self.lock_database()
        calls = [store.append(submission(i)) for i in range(100)]
        before = counting.calls
        await task.deferLater(reactor, 0.1, lambda: None)
        other.execute("COMMIT")
        await defer.gatherResults(calls)
        self.assertGreaterEqual(counting.calls - before, 10)

    async def test_sqlite_runs_on_the_worker_thread(self) -> None:
        threads = []
        original = sqlite_module._head

        def head(connection, conversation):
            threads.append(threading.current_thread())
            return original(connection, conversation)

        self.patch(sqlite_module, "_head", head)
        store = await self.opened()
        self.assertEqual(await store.head("grp:x"), 0)
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.current_thread())

    async def test_close_is_idempotent(self) -> None:
        store = await self.opened()
        first, second = store.close(), store.close()
        await first
        await second
        await store.close()
        with self.assertRaises(StoreClosed):
            await store.head("grp:x")
        with self.assertRaises(StoreError):
            await store.open()

    async def test_close_without_open(self) -> None:
        store = SQLiteStore(self.database())
        await store.close()
        await store.close()
        with self.assertRaises(StoreClosed):
            await store.list_users()

    async def test_unknown_schema_version(self) -> None:
        connection = sqlite3.connect(self.database())
        connection.execute("PRAGMA user_version = 99")
        connection.close()
        store = SQLiteStore(self.database())
        opening = store.open()
        queued = store.list_users()  # issued while opening: fails with it
        with self.assertRaises(SchemaVersionError) as raised:
            await opening
        message = str(raised.exception)
        self.assertIn("schema version 99", message)
        self.assertIn(self.database(), message)
        with self.assertRaises(SchemaVersionError):
            await queued
        with self.assertRaises(StoreClosed):
            await store.list_users()
        await store.close()

    async def test_version_1_database_is_upgraded(self) -> None:
        """A database written before resume tokens gains their table and keeps its messages."""
        from imkit.store import sqlite as module

        connection = sqlite3.connect(self.database())
        for statement in module._SCHEMA:
            if not statement.startswith("CREATE TABLE tokens"):
                connection.execute(statement)
        connection.execute("INSERT INTO users (name, password_hash) VALUES ('alice', 'h')")
        connection.execute("PRAGMA user_version = 1")
        connection.commit()
        connection.close()
        store = await self.opened()
        self.assertEqual(await store.list_users(), ["alice"])
        await store.set_token("d", "alice", "phone", 1)
        self.assertEqual(await store.token_owner("d"), ("alice", "phone", 1))

    async def test_foreign_database(self) -> None:
        connection = sqlite3.connect(self.database())
        connection.execute("CREATE TABLE users (id INTEGER)")
        connection.close()
        store = SQLiteStore(self.database())
        with self.assertRaises(SchemaVersionError) as raised:
            await store.open()
        self.assertIn("did not create", str(raised.exception))


class StoreFromStringTests(unittest.SynchronousTestCase):
    def test_memory(self) -> None:
        self.assertIsInstance(store_from_string("memory:"), MemoryStore)

    def test_sqlite_path_is_made_absolute(self) -> None:
        store = store_from_string("sqlite:data/imkit.db")
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.path, os.path.abspath("data/imkit.db"))
        self.assertEqual(store.description, "sqlite:" + os.path.abspath("data/imkit.db"))

    def test_errors_name_the_fix(self) -> None:
        for description, expected in [
            ("foo:bar", "unknown store 'foo:bar': use sqlite:PATH or memory:"),
            ("imkit.db", "unknown store 'imkit.db': use sqlite:PATH or memory:"),
            ("", "unknown store '': use sqlite:PATH or memory:"),
            ("sqlite:", "no file named in 'sqlite:': use sqlite:PATH"),
            ("memory:x", "the memory store takes no argument in 'memory:x': use memory:"),
        ]:
            with self.assertRaises(StoreStringError) as raised:
                store_from_string(description)
            self.assertEqual(str(raised.exception), expected)
            self.assertIsInstance(raised.exception, ValueError)
