"""SQLiteStore: the contract, plus durability, batching, other processes and the schema version."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import tempfile
import threading
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from imkit import operations
from imkit.model import Appended, Item, Submission, direct_conversation
from imkit.rules import Policy, Refused
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
from imkit.store.interface import Flag, ItemFlag
from imkit.wire import schema
from imkit.wire.errors import ErrorCode
from store_contract import AB, AC, CAST, CONTACTS, T0, StoreContract, add_cast, submission

# The schema as imkit wrote it in earlier versions, to test the migrations from them.
V2_SCHEMA = (
    "CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL)",
    "CREATE TABLE conversations (id TEXT PRIMARY KEY, head_seq INTEGER NOT NULL)",
    "CREATE TABLE members ("
    " conversation TEXT NOT NULL, user TEXT NOT NULL,"
    " PRIMARY KEY (conversation, user)) WITHOUT ROWID",
    "CREATE INDEX members_by_user ON members (user)",
    "CREATE TABLE messages ("
    " server_id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " conversation TEXT NOT NULL, seq INTEGER NOT NULL,"
    " sender TEXT NOT NULL, sender_device TEXT NOT NULL, client_msg_id INTEGER NOT NULL,"
    " sent_at INTEGER NOT NULL, content_type TEXT NOT NULL, body BLOB NOT NULL,"
    " bundle_remaining INTEGER NOT NULL,"
    " UNIQUE (conversation, seq))",
    "CREATE TABLE dedupe ("
    " sender TEXT NOT NULL, sender_device TEXT NOT NULL, client_msg_id INTEGER NOT NULL,"
    " conversation TEXT NOT NULL, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,"
    " PRIMARY KEY (sender, sender_device, client_msg_id)) WITHOUT ROWID",
    "CREATE TABLE cursors ("
    " user TEXT NOT NULL, device TEXT NOT NULL, conversation TEXT NOT NULL,"
    " seq INTEGER NOT NULL,"
    " PRIMARY KEY (user, device, conversation)) WITHOUT ROWID",
    "CREATE TABLE tokens ("
    " user TEXT NOT NULL, device TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,"
    " expires_at INTEGER NOT NULL,"
    " PRIMARY KEY (user, device)) WITHOUT ROWID",
)
V1_SCHEMA = tuple(statement for statement in V2_SCHEMA if not statement.startswith("CREATE TABLE tokens"))
# Version 3 is version 2 and its migration (a new version 3 file has the same tables: tested below).
V3_SCHEMA = V2_SCHEMA + sqlite_module._MIGRATIONS[2]


def schema_of(path: str) -> dict[str, Any]:
    """Every table's columns (with types, defaults and keys), rowid-ness and indexes."""
    connection = sqlite3.connect(path)
    try:
        found: dict[str, Any] = {}
        for name, kind, sql in connection.execute("SELECT name, type, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"):
            if kind == "table":
                columns = connection.execute(f"PRAGMA table_info({name})").fetchall()
                found[name] = (columns, "WITHOUT ROWID" in sql.upper())
            else:
                found[name] = (kind, connection.execute(f"PRAGMA index_info({name})").fetchall())
        return found
    finally:
        connection.close()


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

    async def with_cast(self, **kwargs) -> SQLiteStore:
        store = await self.opened(**kwargs)
        await add_cast(store)
        return store

    def lock_database(self) -> sqlite3.Connection:
        """Hold the write lock from another connection, as the CLI would while adding a user."""
        other = sqlite3.connect(self.database(), isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        return other

    async def test_acknowledged_writes_survive_close_and_reopen(self) -> None:
        store = await self.with_cast()
        calls = [store.append(submission(i, bodies=(b"m%d" % i, b"n"))) for i in range(50)]
        calls += [store.add_user("erin", "h"), store.set_cursor("alice", "phone", AB, 9)]
        calls += [store.append(submission(50, AB, items=(operations.contact_block(),))), store.set_read("bob", "pc", AB, 3)]
        closed = store.close()  # issued before any call was answered: close drains them first
        results = await defer.gatherResults(calls)
        await closed
        reopened = await self.opened()
        self.assertEqual(await reopened.head(AB), 101)
        messages = await reopened.read(AB, 0, 1000)
        self.assertEqual(messages, [m for result in results[:50] + results[52:53] for m in result.messages])
        self.assertEqual(await reopened.list_users(), sorted(CAST + ("erin",)))
        self.assertEqual(await reopened.cursors("alice", "phone"), {AB: 9})
        self.assertEqual(await reopened.contacts("alice"), {"bob": schema.RELATION_BLOCKED})
        self.assertEqual(await reopened.read_marks(AB), {"bob": 3})

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
        await server.add_user("alice", "hash-a")
        # Nobody to write to yet; the refusal is not remembered.
        with self.assertRaises(Refused):
            await server.append(submission(1))
        cli = await self.opened()  # its own connection and thread, like the imkit CLI
        await cli.add_user("bob", "hash-b")
        with self.assertRaises(UserExists):
            await cli.add_user("bob", "again")
        await cli.close()
        self.assertEqual(await server.list_users(), ["alice", "bob"])
        self.assertEqual((await server.append(submission(1))).messages[0].seq, 1)
        self.assertEqual((await server.append(submission(2))).messages[0].seq, 2)

    async def test_waits_for_another_writer_and_batches_meanwhile(self) -> None:
        counting = CountingReactor()
        store = await self.opened(reactor=counting)
        await store.add_user("bob", "h")
        other = self.lock_database()
        calls = [store.add_user("alice", "h")]
        calls += [store.append(submission(i)) for i in range(100)]
        calls += [store.add_user("alice", "again"), store.add_user("carol", "h")]
        before = counting.calls
        await task.deferLater(reactor, 0.2, lambda: None)
        other.execute("COMMIT")  # the worker was waiting on busy_timeout all along
        results = await defer.DeferredList(calls, consumeErrors=True)
        # One transaction for whatever the worker took before it blocked, one for the rest.
        self.assertLessEqual(counting.calls - before, 2)
        self.assertEqual([ok for ok, _ in results], [True] * 101 + [False, True])
        self.assertIsInstance(results[101][1].value, UserExists)
        self.assertEqual([r.messages[0].seq for _, r in results[1:101]], list(range(1, 101)))
        self.assertEqual(await store.list_users(), ["alice", "bob", "carol"])

    async def test_batch_limit(self) -> None:
        counting = CountingReactor()
        store = await self.with_cast(reactor=counting, batch_limit=10)
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
        """A database written before resume tokens gains their table (and all since) and keeps its users."""
        connection = sqlite3.connect(self.database())
        for statement in V1_SCHEMA:
            connection.execute(statement)
        connection.execute("INSERT INTO users (name, password_hash) VALUES ('alice', 'h')")
        connection.execute("PRAGMA user_version = 1")
        connection.commit()
        connection.close()
        store = await self.opened()
        self.assertEqual(await store.list_users(), ["alice"])
        await store.set_token("d", "alice", "phone", 1)
        self.assertEqual(await store.token_owner("d"), ("alice", "phone", 1))
        await store.append(submission(1, "g:new", items=(operations.group_create("New"),)))
        self.assertEqual(await store.members("g:new"), ("alice",))
        await store.close()
        self.assertEqual(schema_of(self.database()), self.new_schema())

    def new_schema(self) -> dict[str, Any]:
        path = os.path.join(self.directory(), "new.db")
        connection = sqlite3.connect(path, isolation_level=None)
        SQLiteStore(path)._create_schema(connection)
        connection.close()
        return schema_of(path)

    def version_2_database(self) -> None:
        """A database as imkit's schema version 2 wrote it, with a little of everything."""
        connection = sqlite3.connect(self.database())
        for statement in V2_SCHEMA:
            connection.execute(statement)
        connection.executemany(
            "INSERT INTO users (name, password_hash) VALUES (?, ?)", [("alice", "ha"), ("bob", "hb"), ("carol", "hc")]
        )
        connection.executemany(
            "INSERT INTO conversations (id, head_seq) VALUES (?, ?)", [(AB, 2), ("grp:team", 1)]
        )
        connection.executemany(
            "INSERT INTO members (conversation, user) VALUES (?, ?)",
            [(AB, "alice"), (AB, "bob"), ("grp:team", "alice"), ("grp:team", "carol")],
        )
        connection.executemany(
            "INSERT INTO messages (conversation, seq, sender, sender_device, client_msg_id, sent_at,"
            " content_type, body, bundle_remaining) VALUES (?, ?, ?, 'phone', ?, ?, 'text/plain', ?, 0)",
            [(AB, 1, "alice", 1, T0, b"one"), (AB, 2, "bob", 1, T0 + 1000, b"two"), ("grp:team", 1, "carol", 1, T0, b"old")],
        )
        connection.executemany(
            "INSERT INTO dedupe (sender, sender_device, client_msg_id, conversation, first_seq, count)"
            " VALUES (?, 'phone', 1, ?, ?, 1)",
            [("alice", AB, 1), ("bob", AB, 2), ("carol", "grp:team", 1)],
        )
        connection.execute("INSERT INTO cursors (user, device, conversation, seq) VALUES ('alice', 'phone', ?, 2)", (AB,))
        connection.execute("INSERT INTO tokens (user, device, digest, expires_at) VALUES ('alice', 'phone', 'd', 9)")
        connection.execute("PRAGMA user_version = 2")
        connection.commit()
        connection.close()

    async def test_version_2_database_is_upgraded(self) -> None:
        """Conversations, members and messages written by version 2 carry on under version 3 (and since)."""
        self.version_2_database()
        store = await self.opened()
        # Everything there was is still there.
        self.assertEqual(await store.list_users(), ["alice", "bob", "carol"])
        old = await store.read(AB, 0, 10)
        self.assertEqual([(m.seq, m.server_id, m.body) for m in old], [(1, 1, b"one"), (2, 2, b"two")])
        self.assertEqual(await store.members(AB), ("alice", "bob"))
        self.assertEqual(await store.members("grp:team"), ("alice", "carol"))
        self.assertEqual(await store.conversations("alice"), {AB: 2, "grp:team": 1})
        self.assertEqual(await store.visible("alice"), {AB: (0, 2), "grp:team": (0, 1)})
        self.assertEqual(await store.visibility("grp:team", "carol"), (0, 1))
        self.assertIsNone(await store.group("grp:team"))
        self.assertEqual(await store.cursors("alice", "phone"), {AB: 2})
        self.assertEqual(await store.token_owner("d"), ("alice", "phone", 9))
        again = await store.append(submission(1, AB, sender="bob"))
        self.assertEqual(again, Appended(messages=(old[1],), duplicate=True))
        # A resend into a conversation the rules would refuse now is still answered by dedupe.
        legacy = await store.append(submission(1, "grp:team", sender="carol"))
        self.assertTrue(legacy.duplicate)
        # ...and the new state works on it.
        later = T0 + 50_000
        appended = await store.append(submission(2, AB, items=(operations.contact_add(),), sent_at=later))
        self.assertEqual((appended.messages[0].seq, appended.messages[0].server_id), (3, 4))
        self.assertEqual(await store.contacts("alice"), {"bob": schema.RELATION_CONTACT})
        await store.append(submission(3, "g:new", items=(operations.group_create("New", ["bob"]),), sent_at=later))
        self.assertEqual(await store.members("g:new"), ("alice", "bob"))
        await store.append(submission(4, AB, items=(operations.recall(1),), sent_at=later))
        self.assertEqual((await store.read(AB, 0, 1))[0].content_type, schema.RECALLED)
        await store.set_read("bob", "phone", AB, 2)
        self.assertEqual(await store.read_marks(AB), {"bob": 2})
        self.assertEqual(await store.prune(T0 + 60_000, 30), {"grp:team": 1, AB: 2})
        self.assertEqual(await store.visible("carol"), {"grp:team": (1, 1)})
        self.assertEqual([m.seq for m in await store.read(AB, 0, 10)], [3, 4])
        self.assertEqual((await store.read(AB, 0, 1))[0], appended.messages[0])
        # Pruned, the legacy message's dedupe record is gone, and the rules judge the resend.
        with self.assertRaises(Refused) as raised:
            await store.append(submission(1, "grp:team", sender="carol"))
        self.assertEqual(raised.exception.code, ErrorCode.INVALID_TARGET)
        await store.close()
        connection = sqlite3.connect(self.database())
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], sqlite_module.SCHEMA_VERSION)
        connection.close()
        self.assertEqual(schema_of(self.database()), self.new_schema())

    def version_3_database(self) -> None:
        """A database as imkit's schema version 3 wrote it (before content flags), with messages."""
        connection = sqlite3.connect(self.database())
        for statement in V3_SCHEMA:
            connection.execute(statement)
        connection.executemany("INSERT INTO users (name, password_hash) VALUES (?, ?)", [("alice", "ha"), ("bob", "hb")])
        connection.execute("INSERT INTO conversations (id, head_seq) VALUES (?, 2)", (AB,))
        connection.executemany("INSERT INTO members (conversation, user) VALUES (?, ?)", [(AB, "alice"), (AB, "bob")])
        connection.executemany(
            "INSERT INTO messages (conversation, seq, sender, sender_device, client_msg_id, sent_at,"
            " content_type, body, bundle_remaining) VALUES (?, ?, ?, 'phone', ?, ?, 'text/plain', ?, 0)",
            [(AB, 1, "alice", 1, T0, b"see evil.example"), (AB, 2, "bob", 1, T0 + 1000, b"two")],
        )
        connection.executemany(
            "INSERT INTO dedupe (sender, sender_device, client_msg_id, conversation, first_seq, count)"
            " VALUES (?, 'phone', 1, ?, ?, 1)",
            [("alice", AB, 1), ("bob", AB, 2)],
        )
        connection.execute("PRAGMA user_version = 3")
        connection.commit()
        connection.close()

    async def test_version_3_database_is_upgraded(self) -> None:
        """A version 3 file gains the flags table: its old messages can be flagged, new ones flagged as stored."""
        self.version_3_database()
        store = await self.opened()
        self.assertEqual([m.body for m in await store.read(AB, 0, 10)], [b"see evil.example", b"two"])
        self.assertEqual(await store.flags(), [])
        old = await store.flag(1, "phishing", "links to evil.example")
        self.assertEqual(old, Flag(1, AB, 1, "alice", "phishing", "links to evil.example"))
        appended = await store.append(submission(2, AB), Policy(), [ItemFlag(0, "words", "rude")])
        self.assertEqual(appended.messages[0].seq, 3)
        self.assertEqual(
            await store.flags(AB),
            [Flag(appended.messages[0].server_id, AB, 3, "alice", "words", "rude"), old],
        )
        resent = await store.append(submission(1, AB, sender="bob"))
        self.assertTrue(resent.duplicate)
        await store.close()
        connection = sqlite3.connect(self.database())
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], sqlite_module.SCHEMA_VERSION)
        connection.close()
        self.assertEqual(schema_of(self.database()), self.new_schema())
        reopened = await self.opened()
        self.assertEqual(len(await reopened.flags()), 2)

    async def test_a_failed_migration_changes_nothing(self) -> None:
        self.version_2_database()
        connection = sqlite3.connect(self.database())
        connection.execute("CREATE TABLE read_marks (x INTEGER)")  # in the way of the migration
        connection.commit()
        connection.close()
        store = SQLiteStore(self.database())
        with self.assertRaises(sqlite3.OperationalError):
            await store.open()
        connection = sqlite3.connect(self.database())
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], 2)
        self.assertEqual([row[1] for row in connection.execute("PRAGMA table_info(members)")], ["conversation", "user"])

    async def test_foreign_database(self) -> None:
        connection = sqlite3.connect(self.database())
        connection.execute("CREATE TABLE users (id INTEGER)")
        connection.close()
        store = SQLiteStore(self.database())
        with self.assertRaises(SchemaVersionError) as raised:
            await store.open()
        self.assertIn("did not create", str(raised.exception))


class CountingConnection:
    """
    A connection that notes the statements it is given: in ``executed`` each one but the
    inserts and updates of rows, and in ``statements`` every one with the number of rows it
    writes (an executemany's row count, or the rows of a multi-row VALUES insert).
    """

    WRITES = ("INSERT", "UPDATE")

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self.executed: list[str] = []
        self.statements: list[tuple[str, int]] = []

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        if not sql.startswith(self.WRITES):
            self.executed.append(sql)
        self.statements.append((sql, sql.count("), (") + 1 if " VALUES (" in sql else 1))
        return self._connection.execute(sql, parameters)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        self.statements.append((sql, len(rows)))
        return self._connection.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def write_series(self) -> list[str]:
        """The row writes: each unbroken series of statements writing one table, named once."""
        series: list[str] = []
        previous = None
        for sql, _ in self.statements:
            table = " ".join(sql.split()[:4]) if sql.startswith(self.WRITES) else None
            if table is not None and table != previous:
                series.append(table)
            previous = table
        return series

    def many_starting(self, prefix: str) -> list[int]:
        """Rows written by each unbroken series of statements starting with ``prefix``."""
        runs: list[int] = []
        previous = False
        for sql, rows in self.statements:
            matches = sql.startswith(prefix)
            if matches and previous:
                runs[-1] += rows
            elif matches:
                runs.append(rows)
            previous = matches
        return runs


class SQLiteWorkerTests(TemporaryDirectory, unittest.TestCase):
    """The worker's batches, run synchronously on a connection of the test's own: which statements they take."""

    def setUp(self) -> None:
        self.store = SQLiteStore(self.database())
        connection = self.store._connect()
        self.addCleanup(connection.close)
        self.connection = CountingConnection(connection)
        self.run_batch([(sqlite_module._add_user, name, "h") for name in CAST])

    def run_batch(self, calls: list[tuple]) -> list[Any]:
        batch = [sqlite_module._Operation(call[0], tuple(call[1:]), True, defer.Deferred()) for call in calls]
        self.connection.executed.clear()
        self.connection.statements.clear()
        outcomes = self.store._run_batch(self.connection, batch)
        self.assertEqual([deferred for deferred, _ in outcomes], [operation.deferred for operation in batch])
        return [outcome for _, outcome in outcomes]

    @staticmethod
    def plain(client_msg_id: int, conversation: str, sender_index: int = 0) -> tuple:
        sender = conversation.split(":")[1 + sender_index % 2]
        return (sqlite_module._append, submission(client_msg_id, conversation, sender=sender), Policy())

    def test_plain_direct_messages_take_one_statement_per_table(self) -> None:
        calls = [self.plain(i, [AB, AC][i % 2], i // 2) for i in range(1000)]
        outcomes = self.run_batch(calls)
        self.assertEqual([type(outcome) for outcome in outcomes], [Appended] * 1000)
        self.assertEqual([o.messages[0].seq for o in outcomes[::2]], list(range(1, 501)))
        self.assertEqual([o.messages[0].server_id for o in outcomes], list(range(1, 1001)))
        self.assertEqual({o.audience for o in outcomes}, {("alice", "bob"), ("alice", "carol")})
        connection = self.connection
        self.assertEqual(connection.many_starting("INSERT INTO messages"), [1000])
        self.assertEqual(connection.many_starting("INSERT INTO dedupe"), [1000])
        self.assertEqual(connection.many_starting("UPDATE conversations"), [2])
        self.assertEqual(connection.many_starting("INSERT OR IGNORE INTO members"), [2, 2])
        new_conversation = ["INSERT INTO conversations (id,", "INSERT OR IGNORE INTO"]  # and its members
        writes = ["INSERT INTO dedupe (sender,", "INSERT INTO messages (server_id,", "UPDATE conversations SET head_seq"]
        self.assertEqual(connection.write_series(), new_conversation * 2 + writes)
        # The rest: a transaction, the heads and server id, and the rules' questions once per sender.
        self.assertLess(len(connection.executed), 20, connection.executed)
        self.assertNotIn("ROLLBACK", connection.executed)
        # The next batch needs no reads at all.
        self.run_batch([self.plain(1000 + i, [AB, AC][i % 2], i // 2) for i in range(1000)])
        self.assertEqual(connection.executed, ["BEGIN IMMEDIATE", "COMMIT"])
        self.assertEqual(connection.write_series(), writes)

    def test_plain_group_messages_take_one_statement_per_table(self) -> None:
        group = "g:team"
        create = submission(0, group, items=(operations.group_create("Team", ["bob", "carol"]),))
        self.run_batch([(sqlite_module._append, create, Policy())])
        calls = [(sqlite_module._append, submission(i, group, sender=CAST[i % 3]), Policy()) for i in range(1, 1001)]
        outcomes = self.run_batch(calls)
        self.assertEqual([o.messages[0].seq for o in outcomes], list(range(2, 1002)))
        self.assertEqual({o.audience for o in outcomes}, {("alice", "bob", "carol")})
        self.assertEqual(self.connection.many_starting("INSERT INTO messages"), [1000])
        self.assertLess(len(self.connection.executed), 20, self.connection.executed)

    def test_operations_and_refusals_do_not_stop_the_fast_way(self) -> None:
        """Each runs alone in a savepoint between runs of plain messages; nothing is run twice."""
        calls = [self.plain(i, AB, i) for i in range(500)]
        calls.append((sqlite_module._append, submission(500, AB, sender="bob", items=(operations.contact_block(),)), Policy()))
        calls.append((sqlite_module._append, submission(501, "dm:alice:zed"), Policy()))
        calls.append((sqlite_module._append, submission(502, AB), Policy()))  # blocked now
        calls += [self.plain(i, AC, i) for i in range(503, 1000)]
        outcomes = self.run_batch(calls)
        self.assertEqual([type(o) for o in outcomes], [Appended] * 501 + [Failure] * 2 + [Appended] * 497)
        self.assertEqual([o.value.code for o in outcomes[501:503]], [ErrorCode.UNKNOWN_RECIPIENT, ErrorCode.NOT_ALLOWED])
        self.assertEqual(outcomes[500].messages[0].seq, 501)
        self.assertEqual(outcomes[-1].messages[0].seq, 497)
        # Two runs, and between them the block, stored the careful way in its savepoint.
        self.assertEqual(self.connection.many_starting("INSERT INTO messages"), [500, 1, 497])
        self.assertNotIn("ROLLBACK", self.connection.executed)
        self.assertEqual(self.connection.executed.count("SAVEPOINT operation"), 3)

    def test_a_resend_runs_the_batch_the_careful_way(self) -> None:
        self.run_batch([self.plain(1, AB)])
        outcomes = self.run_batch([self.plain(2, AB), self.plain(1, AB), self.plain(3, AB)])
        self.assertEqual([o.duplicate for o in outcomes], [False, True, False])
        self.assertEqual([o.messages[0].seq for o in outcomes], [2, 1, 3])
        self.assertIn("ROLLBACK", self.connection.executed)


USERS = CAST + ("zed",)
"""zed does not exist until a script adds it."""

GROUPS = ("g:1", "g:2", "g:3")

POLICIES = (
    Policy(),
    Policy(),
    Policy(),
    CONTACTS,
    Policy(history_on_join=True, max_group_members=4, recall_window=5, edit_window=10),
)


def random_items(rng: random.Random, conversation: str, now: int, exists: bool = True) -> tuple[Item, ...]:
    texts = [Item("text/plain", b"%d" % rng.randrange(1000)) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    if rng.random() < 0.55:
        return tuple(texts)
    if rng.random() < 0.5:
        texts = texts[:1] if rng.random() < 0.5 else []
    seq = rng.randrange(0, 14)
    common = [
        operations.recall(seq),
        operations.edit(seq, "text/plain", b"edited"),
        operations.retention(rng.choice([0, 5, 30])),
    ]
    if conversation.startswith("dm:"):
        operation = rng.choice(
            [operations.contact_add(), operations.contact_remove(), operations.contact_block(), operations.contact_unblock()] * 2
            + common
        )
        return tuple(texts + [operation]) if rng.random() < 0.5 else tuple([operation] + texts)
    users = rng.sample(USERS, rng.randrange(0, 5))
    create = operations.group_create(f"t{now % 7}", users)
    first = rng.choices([create, operations.group_add(users), None], [3, 3, 14] if exists else [16, 1, 3])[0]
    last = rng.choices([operations.group_remove(users[:2]), operations.group_leave(), rng.choice(common), None], [2, 1, 4, 13])[0]
    return tuple(([first] if first else []) + texts + ([last] if last else [])) or (operations.group_leave(),)


def random_script(rng: random.Random, length: int) -> list[tuple[str, tuple]]:
    """
    Store calls: mostly appends (plain, operations, some refused, some resent), with prunes and
    read marks.  A store of its own follows the script, so most group messages come from members.
    """
    shadow = MemoryStore()
    for name in CAST:
        shadow.add_user(name, "h")
    script: list[tuple[str, tuple]] = []
    sent: list[Submission] = []
    now = T0
    for client_msg_id in range(length):
        now += rng.randrange(0, 3000)
        roll = rng.random()
        if roll < 0.06 and sent:
            script.append(("append", (rng.choice(sent), rng.choice(POLICIES))))
        elif roll < 0.09:
            script.append(("prune", (now, rng.choice([None, 5, 20]))))
        elif roll < 0.12:
            conversation = rng.choice(GROUPS + (AB, AC))
            script.append(("set_read", (rng.choice(USERS), rng.choice(["phone", "pc"]), conversation, rng.randrange(0, 20))))
        elif roll < 0.13:
            script.append(("add_user", ("zed", "h")))
        else:
            if rng.random() < 0.5:
                pair = rng.sample(USERS, 2) if rng.random() < 0.95 else [rng.choice(USERS)] * 2
                conversation = direct_conversation(*pair)
                sender = rng.choice(pair) if rng.random() < 0.95 else rng.choice(USERS)
            else:
                conversation = rng.choice(GROUPS)
                members = [user for user in shadow._members.get(conversation, ()) if user in CAST]
                sender = rng.choice(members if members and rng.random() < 0.9 else CAST)
            sub = submission(
                client_msg_id,
                conversation,
                sender=sender,
                device=rng.choice(["phone", "pc"]),
                sent_at=now,
                items=random_items(rng, conversation, now, conversation in shadow._groups),
            )
            sent.append(sub)
            script.append(("append", (sub, rng.choice(POLICIES))))
        method, args = script[-1]
        getattr(shadow, method)(*args).addErrback(lambda failure: None)
    return script


def outcome(ok: bool, value: Any) -> Any:
    if ok:
        return value
    if isinstance(value.value, Refused):
        return ("refused", value.value.code)
    return ("failed", type(value.value))


class SQLiteAgreesWithMemoryTests(TemporaryDirectory, unittest.TestCase):
    """
    Random scripts, issued all at once to SQLite (so they meet in batches, fast and careful) and
    one by one to the reference MemoryStore: every answer and the final state agree.
    """

    async def check(self, seed: int, batch_limit: int, length: int = 400) -> None:
        script = random_script(random.Random(seed), length)
        memory = MemoryStore()
        store = SQLiteStore(os.path.join(self.directory(), f"{seed}-{batch_limit}.db"), batch_limit=batch_limit)
        self.addCleanup(store.close)
        await store.open()
        await add_cast(memory)
        await add_cast(store)
        expected = []
        for method, args in script:
            answers: list = []
            getattr(memory, method)(*args).addBoth(answers.append)
            [answer] = answers
            expected.append(outcome(not isinstance(answer, Failure), answer))
        results = await defer.DeferredList([getattr(store, method)(*args) for method, args in script], consumeErrors=True)
        for index, ((ok, value), wanted) in enumerate(zip(results, expected)):
            self.assertEqual(outcome(ok, value), wanted, f"call {index}: {script[index]}")
        self.assertGreater(sum(1 for answer in expected if isinstance(answer, tuple)), length // 20, "some refusals")
        self.assertGreater(sum(1 for answer in expected if isinstance(answer, Appended)), length // 3)
        conversations = {args[0].conversation for method, args in script if method == "append"} | set(GROUPS)
        for conversation in sorted(conversations):
            for question in ("head", "members", "group", "read_marks"):
                self.assertEqual(
                    await getattr(store, question)(conversation),
                    getattr(memory, question)(conversation).result,
                    f"{question}({conversation!r})",
                )
            self.assertEqual(await store.read(conversation, 0, 10_000), memory.read(conversation, 0, 10_000).result)
            for user in USERS:
                self.assertEqual(await store.visibility(conversation, user), memory.visibility(conversation, user).result)
        for user in USERS:
            for question in ("visible", "conversations", "contacts"):
                self.assertEqual(await getattr(store, question)(user), getattr(memory, question)(user).result, f"{question}({user!r})")

    async def test_big_batches(self) -> None:
        for seed in range(4):
            await self.check(seed, 500)

    async def test_small_batches(self) -> None:
        for seed in range(4):
            await self.check(seed, 3)

    async def test_one_at_a_time(self) -> None:
        await self.check(99, 1)


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
