"""
The SQLite writer's CPU per message, today's layout against a segment layout that stores a run of
messages as one row.  ``python benchmarks/bench_sqlite_layout.py [--batch N] [--runs R]``

imkit stores each message as a row of ``messages`` (with its (conversation, seq) index entry) and
a row of ``dedupe``: three B-tree inserts a message.  This measures, on one thread and in
transactions of ``--batch`` messages synced as ``twistd imkit`` syncs them (WAL,
``synchronous=FULL``):

writer today
    ``_append_run``, the SQLite writer's fast path, on a real store file: numbering, records,
    statements and commit, as the worker runs them.
statements only
    The same rows with the same multi-row ``INSERT`` statements, built beforehand: what SQLite
    itself costs.
segments
    A prototype of the alternative: one ``segments`` row per run of a device's consecutive
    sends to one conversation (their sent_at, content types and bodies packed into one blob;
    sequence numbers, server ids and client ids consecutive from the row's first ones) and one
    dedupe record for the run's client ids.  Not used by imkit; it shows what such a layout
    would save.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import struct
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from twisted.internet import reactor  # noqa: E402

from imkit.model import Item, Submission, direct_conversation  # noqa: E402
from imkit.store import sqlite as store_sqlite  # noqa: E402
from imkit.store.memory import DEFAULT_POLICY  # noqa: E402

CONVERSATION = direct_conversation("alice", "bob")
BODY = b"x" * 100
SENT_AT = 1_700_000_000_000


def writer_today(directory: str, count: int, batch: int) -> float:
    store = store_sqlite.SQLiteStore(os.path.join(directory, "today.sqlite3"), reactor)
    connection = store._connect()
    connection.execute("INSERT INTO users (name, password_hash) VALUES ('alice', 'x'), ('bob', 'x')")
    first = random.getrandbits(62)
    operations = [
        store_sqlite._Operation(
            store_sqlite._append,
            (Submission("alice", "d1", first + i, CONVERSATION, ("alice", "bob"), SENT_AT, (Item("text/plain", BODY),)), DEFAULT_POLICY),
            True,
            None,  # type: ignore[arg-type]
        )
        for i in range(count)
    ]
    cache = store_sqlite._AppendCache()
    begin = time.thread_time()
    for start in range(0, count, batch):
        connection.execute("BEGIN IMMEDIATE")
        store_sqlite._append_run(connection, cache, operations[start : start + batch])
        connection.execute("COMMIT")
    spent = time.thread_time() - begin
    connection.close()
    return spent


def statements_only(directory: str, count: int, batch: int) -> float:
    store = store_sqlite.SQLiteStore(os.path.join(directory, "rows.sqlite3"), reactor)
    connection = store._connect()
    connection.execute("INSERT INTO conversations (id, head_seq) VALUES (?, 0)", (CONVERSATION,))
    first = random.getrandbits(62)
    batches = []
    for start in range(0, count, batch):
        messages: list[Any] = []
        dedupe: list[Any] = []
        for index in range(start, min(start + batch, count)):
            seq = index + 1
            messages += (seq, CONVERSATION, seq, "alice", "d1", first + index, SENT_AT, "text/plain", BODY, 0)
            dedupe += ("alice", "d1", first + index, CONVERSATION, seq, 1)
        batches.append((messages, dedupe, seq))
    begin = time.thread_time()
    for messages, dedupe, head in batches:
        connection.execute("BEGIN IMMEDIATE")
        store_sqlite._insert_many(connection, store_sqlite._INSERT_DEDUPE, store_sqlite._DEDUPE_WIDTH, dedupe)
        store_sqlite._insert_many(connection, store_sqlite._INSERT_MESSAGE, store_sqlite._MESSAGE_WIDTH, messages)
        connection.execute("UPDATE conversations SET head_seq = ? WHERE id = ?", (head, CONVERSATION))
        connection.execute("COMMIT")
    spent = time.thread_time() - begin
    connection.close()
    return spent


_SEGMENT_SCHEMA = (
    "CREATE TABLE conversations (id TEXT PRIMARY KEY, head_seq INTEGER NOT NULL)",
    "CREATE TABLE segments (conversation TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,"
    " first_server_id INTEGER NOT NULL, sender TEXT NOT NULL, sender_device TEXT NOT NULL,"
    " first_client_msg_id INTEGER NOT NULL, last_sent_at INTEGER NOT NULL, payload BLOB NOT NULL,"
    " PRIMARY KEY (conversation, first_seq)) WITHOUT ROWID",
    "CREATE INDEX segments_by_server_id ON segments (first_server_id)",
    "CREATE TABLE dedupe (sender TEXT NOT NULL, sender_device TEXT NOT NULL, client_msg_id INTEGER NOT NULL,"
    " more_ids INTEGER NOT NULL, conversation TEXT NOT NULL, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,"
    " PRIMARY KEY (sender, sender_device, client_msg_id)) WITHOUT ROWID",
)
_ENTRY = struct.Struct(">qHI")  # a message in a segment: sent_at, content type and body lengths, then both


def segments(directory: str, count: int, batch: int) -> float:
    connection = sqlite3.connect(os.path.join(directory, "segments.sqlite3"), isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    for statement in _SEGMENT_SCHEMA:
        connection.execute(statement)
    connection.execute("INSERT INTO conversations (id, head_seq) VALUES (?, 0)", (CONVERSATION,))
    content_type = b"text/plain"
    first = random.getrandbits(62)
    head = 0
    begin = time.thread_time()
    for start in range(0, count, batch):
        size = min(batch, count - start)
        parts = []
        for _ in range(size):
            parts += (_ENTRY.pack(SENT_AT, len(content_type), len(BODY)), content_type, BODY)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (CONVERSATION, head + 1, head + size, head + 1, "alice", "d1", first + start, SENT_AT, b"".join(parts)),
        )
        connection.execute(
            "INSERT INTO dedupe VALUES (?, ?, ?, ?, ?, ?, ?)", ("alice", "d1", first + start, size - 1, CONVERSATION, head + 1, 1)
        )
        head += size
        connection.execute("UPDATE conversations SET head_seq = ? WHERE id = ?", (head, CONVERSATION))
        connection.execute("COMMIT")
    spent = time.thread_time() - begin
    connection.close()
    return spent


LAYOUTS: list[tuple[str, Callable[[str, int, int], float]]] = [
    ("writer today", writer_today),
    ("statements only", statements_only),
    ("segments", segments),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40000, help="messages per run (default 40000)")
    parser.add_argument("--batch", type=int, default=128, help="messages per transaction (default 128)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each layout, interleaved; the median is shown (default 3)")
    opts = parser.parse_args(argv)
    results: dict[str, list[float]] = {name: [] for name, _ in LAYOUTS}
    for _ in range(opts.runs):
        for name, layout in LAYOUTS:
            with tempfile.TemporaryDirectory(prefix="imkit-bench-layout-") as directory:
                results[name].append(layout(directory, opts.count, opts.batch) * 1e6 / opts.count)
    print(f"SQLite writer CPU per message: {opts.count:,} messages of {len(BODY)} bytes, {opts.batch} a transaction, WAL, synchronous=FULL")
    today = sorted(results["writer today"])[len(results["writer today"]) // 2]
    for name, figures in results.items():
        median = sorted(figures)[len(figures) // 2]
        runs = ", ".join(f"{figure:.1f}" for figure in figures)
        print(f"  {name:<16} {median:6.1f} us/msg   ({median / today:.2f} of the writer today; runs {runs})")
    print("segments: SQLite and packing only; a writer on that layout would still build the records it returns (about 2 us/msg today)")


if __name__ == "__main__":
    main()
