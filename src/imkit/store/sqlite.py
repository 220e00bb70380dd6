"""
The SQLite store: one database file, one worker thread, batched commits.

The reactor thread never touches SQLite.  Every call becomes an operation on a queue; one worker
thread owns the connection, takes everything queued (up to ``batch_limit`` operations), runs it in
one transaction with one commit, and hands every result back to the reactor with one
``callFromThread``.  Committing a whole batch at once is what keeps durable storage from capping
throughput: a thousand appends waiting together cost one commit, not a thousand.

Runs of plain appends (no operation items) are written with one ``executemany`` per table,
numbered from the worker's cache of conversation heads and judged from its cache of who may write
where; anything else runs in its own SAVEPOINT, so one that fails (a taken user name, an append the
rules refuse) is rolled back and fails only its own Deferred.  A batch that meets something
unusual (a resend whose dedupe record exists) is rolled back and run again with every operation in
its own savepoint.  Sequence numbers, dedupe and the rules' decisions (``imkit.rules``) are all
made inside the worker's transaction; the worker is the only process that writes messages,
relations and groups (the ``imkit user`` CLI opens the same file but only ever writes users), and
SQLite's busy timeout lets the two take turns on the write lock.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from typing import Any, Callable, NamedTuple

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imkit import rules, slots
from imkit.model import Appended, Message, Submission, direct_members
from imkit.rules import Decision, Group, Membership, Policy
from imkit.store.interface import Flag, IStore, ItemFlag, StoreError, UnknownMessage, UnknownUser, UserExists
from imkit.store.memory import DEFAULT_POLICY, check_flags, check_mark, check_submission
from imkit.wire import schema
from imkit.wire.packets import DeviceKeys, OneTimeKey

SCHEMA_VERSION = 6

_SCHEMA = (
    "CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL)",
    # floor_seq: the last sequence pruned by retention (messages start after it); retention: the
    # conversation's own TTL in seconds (NULL or 0: the server's default).
    "CREATE TABLE conversations (id TEXT PRIMARY KEY, head_seq INTEGER NOT NULL,"
    " floor_seq INTEGER NOT NULL DEFAULT 0, retention INTEGER)",
    # Members of direct conversations have only the first two columns.  A group member has a role
    # (ROLE_*), the sequence of the event that made them one and the first sequence they may
    # read; a former group member keeps their row with left_seq, the event that removed them.
    "CREATE TABLE members ("
    " conversation TEXT NOT NULL, user TEXT NOT NULL,"
    " role INTEGER NOT NULL DEFAULT 0, joined_seq INTEGER NOT NULL DEFAULT 0,"
    " visible_from INTEGER NOT NULL DEFAULT 1, left_seq INTEGER,"
    " PRIMARY KEY (conversation, user)) WITHOUT ROWID",
    "CREATE INDEX members_by_user ON members (user)",
    # client_msg_id is stored as a signed 64-bit two's complement: see _to_signed.
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
)

_TOKENS_TABLE = (
    "CREATE TABLE tokens ("
    " user TEXT NOT NULL, device TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,"
    " expires_at INTEGER NOT NULL,"
    " PRIMARY KEY (user, device)) WITHOUT ROWID"
)
_CONVERSATION_TABLES = (
    # A relation row exists only for RELATION_CONTACT and RELATION_BLOCKED.
    "CREATE TABLE relations ("
    " owner TEXT NOT NULL, other TEXT NOT NULL, relation INTEGER NOT NULL,"
    " PRIMARY KEY (owner, other)) WITHOUT ROWID",
    "CREATE TABLE groups (id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE read_marks ("
    " conversation TEXT NOT NULL, user TEXT NOT NULL, device TEXT NOT NULL, seq INTEGER NOT NULL,"
    " PRIMARY KEY (conversation, user, device)) WITHOUT ROWID",
)
_FLAGS_TABLES = (
    # Marks left by content checkers (imkit.content); conversation, seq and sender are the
    # message's, so listing needs no join and pruning finds them by (conversation, seq).
    "CREATE TABLE flags ("
    " server_id INTEGER NOT NULL, checker TEXT NOT NULL, reason TEXT NOT NULL,"
    " conversation TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL,"
    " PRIMARY KEY (server_id, checker)) WITHOUT ROWID",
    "CREATE INDEX flags_by_conversation ON flags (conversation, seq)",
)
_DISABLED_USERS = (
    # Disabled users (``imkit user disable``) cannot log in; the server looks for them often, so
    # a partial index holds just them.
    "ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX users_disabled ON users (name) WHERE disabled != 0",
)
_KEY_TABLES = (
    # End-to-end encryption's key directory (imkit.server.keys): public keys only.
    "CREATE TABLE device_keys ("
    " user TEXT NOT NULL, device TEXT NOT NULL, identity_key TEXT NOT NULL,"
    " signing_key TEXT NOT NULL, signature TEXT NOT NULL,"
    " PRIMARY KEY (user, device)) WITHOUT ROWID",
    # Unclaimed one-time keys, handed out oldest (lowest id) first.
    "CREATE TABLE one_time_keys ("
    " id INTEGER PRIMARY KEY, user TEXT NOT NULL, device TEXT NOT NULL,"
    " key_id TEXT NOT NULL, key TEXT NOT NULL, signature TEXT NOT NULL,"
    " UNIQUE (user, device, key_id))",
)
_SCHEMA = _SCHEMA + (_TOKENS_TABLE,) + _CONVERSATION_TABLES + _FLAGS_TABLES + _DISABLED_USERS + _KEY_TABLES

_MIGRATIONS = {
    1: (_TOKENS_TABLE,),  # version 1 -> 2: resume tokens
    # version 2 -> 3: contacts, groups, retention and read marks.  The new columns come last and
    # have the same defaults as in _SCHEMA, so a migrated file has the same tables as a new one.
    2: (
        "ALTER TABLE conversations ADD COLUMN floor_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE conversations ADD COLUMN retention INTEGER",
        "ALTER TABLE members ADD COLUMN role INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE members ADD COLUMN visible_from INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE members ADD COLUMN left_seq INTEGER",
    )
    + _CONVERSATION_TABLES,
    3: _FLAGS_TABLES,  # version 3 -> 4: content flags
    4: _DISABLED_USERS,  # version 4 -> 5: disabled users
    5: _KEY_TABLES,  # version 5 -> 6: the key directory of end-to-end encryption
}
"""Statements that bring a database from the version (key) to the next one."""

_MESSAGE_COLUMNS = (
    "server_id, conversation, seq, sender, sender_device, client_msg_id, sent_at,"
    " content_type, body, bundle_remaining"
)

# SQLite's LIMIT takes a signed 64-bit value, and a negative one means "no limit".
_MAX_LIMIT = 2**62
# The largest sequence number SQLite can store (an operation body may name any 64-bit one).
_MAX_SEQ = 2**63 - 1


class SchemaVersionError(StoreError):
    """The database file was written by a different version of imkit's schema."""


class StoreClosed(StoreError):
    """The store was used before ``open`` or after ``close`` (or after it failed)."""


_SIGN_BIT = 2**63
_U64 = 2**64


def _to_signed(value: int) -> int:
    """Map an unsigned 64-bit client id onto SQLite's signed 64-bit INTEGER (two's complement)."""
    return value - _U64 if value >= _SIGN_BIT else value


def _from_signed(value: int) -> int:
    """Undo _to_signed."""
    return value + 2**64 if value < 0 else value


def _message(row: tuple) -> Message:
    return Message(
        server_id=row[0],
        conversation=row[1],
        seq=row[2],
        sender=row[3],
        sender_device=row[4],
        client_msg_id=_from_signed(row[5]),
        sent_at=row[6],
        content_type=row[7],
        body=bytes(row[8]),
        bundle_remaining=row[9],
    )


def _messages_between(
    connection: sqlite3.Connection, conversation: str, first: int, last: int
) -> list[Message]:
    rows = connection.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        " WHERE conversation = ? AND seq >= ? AND seq <= ? ORDER BY seq",
        (conversation, first, last),
    )
    return [_message(row) for row in rows]


# Operations: each runs on the worker thread inside the batch transaction ----------------------


def _add_user(connection: sqlite3.Connection, name: str, password_hash: str) -> None:
    try:
        connection.execute(
            "INSERT INTO users (name, password_hash) VALUES (?, ?)", (name, password_hash)
        )
    except sqlite3.IntegrityError:
        raise UserExists(name) from None


def _password_hash(connection: sqlite3.Connection, name: str) -> str | None:
    row = connection.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def _set_password_hash(connection: sqlite3.Connection, name: str, password_hash: str) -> None:
    cursor = connection.execute(
        "UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, name)
    )
    if cursor.rowcount == 0:
        raise UnknownUser(name)


def _list_users(connection: sqlite3.Connection) -> list[str]:
    return [row[0] for row in connection.execute("SELECT name FROM users ORDER BY name")]


def _set_disabled(connection: sqlite3.Connection, name: str, disabled: bool) -> int:
    if not connection.execute("UPDATE users SET disabled = ? WHERE name = ?", (1 if disabled else 0, name)).rowcount:
        raise UnknownUser(name)
    if not disabled:
        return 0
    return connection.execute("DELETE FROM tokens WHERE user = ?", (name,)).rowcount


def _is_disabled(connection: sqlite3.Connection, name: str) -> bool:
    row = connection.execute("SELECT disabled FROM users WHERE name = ?", (name,)).fetchone()
    return bool(row and row[0])


def _disabled_users(connection: sqlite3.Connection) -> list[str]:
    return [row[0] for row in connection.execute("SELECT name FROM users WHERE disabled != 0 ORDER BY name")]


class SQLiteView:
    """
    The rules' questions (``imkit.rules.View``), answered from the worker's connection inside the
    transaction that will apply their decision.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def user_exists(self, user: str) -> bool:
        return self._connection.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone() is not None

    def relation(self, owner: str, other: str) -> int:
        row = self._connection.execute(
            "SELECT relation FROM relations WHERE owner = ? AND other = ?", (owner, other)
        ).fetchone()
        return schema.RELATION_NONE if row is None else row[0]

    def group(self, conversation: str) -> Group | None:
        return _group(self._connection, conversation)

    def message(self, conversation: str, seq: int) -> Message | None:
        if not 0 < seq <= _MAX_SEQ:  # beyond what SQLite stores, so never a message
            return None
        found = _messages_between(self._connection, conversation, seq, seq)
        return found[0] if found else None


def _append(connection: sqlite3.Connection, submission: Submission, policy: Policy) -> Appended:
    """The careful way: judge one submission by the rules and store it with their decision."""
    client_msg_id = _to_signed(submission.client_msg_id)
    original = connection.execute(
        "SELECT conversation, first_seq, count FROM dedupe"
        " WHERE sender = ? AND sender_device = ? AND client_msg_id = ?",
        (submission.sender, submission.sender_device, client_msg_id),
    ).fetchone()
    if original is not None:
        conversation, first, count = original
        messages = _messages_between(connection, conversation, first, first + count - 1)
        return Appended(messages=tuple(messages), duplicate=True)

    conversation = submission.conversation
    row = connection.execute(
        "SELECT head_seq FROM conversations WHERE id = ?", (conversation,)
    ).fetchone()
    head = 0 if row is None else row[0]
    # Raises Refused before anything is written.
    decision = rules.decide(SQLiteView(connection), policy, submission, head)
    if row is None:
        connection.execute(
            "INSERT INTO conversations (id, head_seq) VALUES (?, 0)", (conversation,)
        )
    if submission.members and direct_members(conversation) is not None:
        connection.executemany(
            "INSERT OR IGNORE INTO members (conversation, user) VALUES (?, ?)",
            [(conversation, member) for member in submission.members],
        )
    count = len(submission.items)
    messages = []
    for index, item in enumerate(submission.items):
        body = bytes(item.body)
        seq = head + 1 + index
        remaining = count - 1 - index
        cursor = connection.execute(
            "INSERT INTO messages (conversation, seq, sender, sender_device, client_msg_id,"
            " sent_at, content_type, body, bundle_remaining) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                conversation,
                seq,
                submission.sender,
                submission.sender_device,
                client_msg_id,
                submission.sent_at,
                item.content_type,
                body,
                remaining,
            ),
        )
        messages.append(
            Message(
                server_id=cursor.lastrowid,
                conversation=conversation,
                seq=seq,
                sender=submission.sender,
                sender_device=submission.sender_device,
                client_msg_id=submission.client_msg_id,
                sent_at=submission.sent_at,
                content_type=item.content_type,
                body=body,
                bundle_remaining=remaining,
            )
        )
    _apply(connection, conversation, decision)
    connection.execute(
        "UPDATE conversations SET head_seq = ? WHERE id = ?", (head + count, conversation)
    )
    connection.execute(
        "INSERT INTO dedupe (sender, sender_device, client_msg_id, conversation, first_seq, count)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (submission.sender, submission.sender_device, client_msg_id, conversation, head + 1, count),
    )
    return Appended(messages=tuple(messages), audience=decision.audience)


_INSERT_FLAG = (
    "INSERT INTO flags (server_id, checker, reason, conversation, seq, sender) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (server_id, checker) DO UPDATE SET reason = excluded.reason"
)


def _append_flagged(
    connection: sqlite3.Connection, submission: Submission, policy: Policy, flags: tuple[ItemFlag, ...]
) -> Appended:
    """An append whose items content checkers marked: the messages and their marks, together."""
    appended = _append(connection, submission, policy)
    if not appended.duplicate:
        rows = []
        for index, checker, reason in flags:
            message = appended.messages[index]
            rows.append((message.server_id, checker, reason, message.conversation, message.seq, message.sender))
        connection.executemany(_INSERT_FLAG, rows)
    return appended


def _flag(connection: sqlite3.Connection, server_id: int, checker: str, reason: str) -> Flag:
    row = None
    if isinstance(server_id, int) and 0 < server_id <= _MAX_SEQ:  # else beyond what SQLite stores
        row = connection.execute("SELECT conversation, seq, sender FROM messages WHERE server_id = ?", (server_id,)).fetchone()
    if row is None:
        raise UnknownMessage(f"no stored message has server id {server_id!r}")
    connection.execute(_INSERT_FLAG, (server_id, checker, reason, row[0], row[1], row[2]))
    return Flag(server_id, row[0], row[1], row[2], checker, reason)


def _flags(connection: sqlite3.Connection, conversation: str | None, limit: int) -> list[Flag]:
    if limit <= 0:
        return []
    columns = "SELECT server_id, conversation, seq, sender, checker, reason FROM flags"
    order = " ORDER BY server_id DESC, checker LIMIT ?"
    if conversation is None:
        rows = connection.execute(columns + order, (min(limit, _MAX_LIMIT),))
    else:
        rows = connection.execute(columns + " WHERE conversation = ?" + order, (conversation, min(limit, _MAX_LIMIT)))
    return [Flag(*row) for row in rows]


def _apply(connection: sqlite3.Connection, conversation: str, decision: Decision) -> None:
    """Write what the rules decided besides the messages (as MemoryStore._apply does)."""
    for owner, other, relation in decision.relations:
        if relation == schema.RELATION_NONE:
            connection.execute("DELETE FROM relations WHERE owner = ? AND other = ?", (owner, other))
        else:
            connection.execute(
                "INSERT INTO relations (owner, other, relation) VALUES (?, ?, ?)"
                " ON CONFLICT (owner, other) DO UPDATE SET relation = excluded.relation",
                (owner, other, relation),
            )
    created = decision.created
    if created is not None:
        connection.execute(
            "INSERT INTO groups (id, owner, title) VALUES (?, ?, ?)", (conversation, created.owner, created.title)
        )
    if decision.joins:
        # A former member who comes back starts afresh: new join, new first visible sequence.
        connection.executemany(
            "INSERT INTO members (conversation, user, role, joined_seq, visible_from, left_seq)"
            " VALUES (?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (conversation, user) DO UPDATE SET role = excluded.role,"
            " joined_seq = excluded.joined_seq, visible_from = excluded.visible_from, left_seq = NULL",
            [(conversation, m.user, m.role, m.joined_seq, m.visible_from) for m in decision.joins],
        )
    if decision.leaves:
        connection.executemany(
            "UPDATE members SET left_seq = ?, role = ? WHERE conversation = ? AND user = ?",
            [(seq, schema.ROLE_MEMBER, conversation, user) for user, seq in decision.leaves],
        )
    # A new group's owner may not be its creator (who left in the same bundle).
    owner = decision.owner or (created.owner if created is not None else None)
    if owner is not None:
        connection.execute("UPDATE groups SET owner = ? WHERE id = ?", (owner, conversation))
        connection.execute(
            "UPDATE members SET role = ? WHERE conversation = ? AND user = ? AND left_seq IS NULL",
            (schema.ROLE_OWNER, conversation, owner),
        )
    if decision.recalls:
        connection.executemany(
            "UPDATE messages SET content_type = ?, body = ? WHERE conversation = ? AND seq = ?",
            [(schema.RECALLED, b"", conversation, seq) for seq in decision.recalls],
        )
    if decision.retention is not None:
        connection.execute(
            "UPDATE conversations SET retention = ? WHERE id = ?", (decision.retention, conversation)
        )


def _group(connection: sqlite3.Connection, conversation: str) -> Group | None:
    row = connection.execute("SELECT owner, title FROM groups WHERE id = ?", (conversation,)).fetchone()
    if row is None:
        return None
    rows = connection.execute(
        "SELECT user, role, joined_seq, visible_from FROM members"
        " WHERE conversation = ? AND left_seq IS NULL",
        (conversation,),
    )
    return Group(row[0], row[1], {user: Membership(user, role, joined, start) for user, role, joined, start in rows})


def _span(
    group: bool, floor: int, head: int, visible_from: int, left: int | None
) -> tuple[int, int] | None:
    """What a member may read of a conversation: (floor, upto), as MemoryStore._span."""
    if not group:
        return (floor, head) if left is None else None
    if left is None:
        return (max(floor, visible_from - 1), head)
    return (min(max(floor, visible_from - 1), left), left)


_SPAN_QUERY = (
    "SELECT members.conversation, groups.id IS NOT NULL, conversations.floor_seq, conversations.head_seq,"
    " members.visible_from, members.left_seq FROM members"
    " JOIN conversations ON conversations.id = members.conversation"
    " LEFT JOIN groups ON groups.id = members.conversation"
)


def _visible(connection: sqlite3.Connection, user: str) -> dict[str, tuple[int, int]]:
    found = {}
    for conversation, group, floor, head, visible_from, left in connection.execute(
        _SPAN_QUERY + " WHERE members.user = ?", (user,)
    ):
        span = _span(group, floor, head, visible_from, left)
        if span is not None:
            found[conversation] = span
    return found


def _visibility(connection: sqlite3.Connection, conversation: str, user: str) -> tuple[int, int] | None:
    row = connection.execute(
        _SPAN_QUERY + " WHERE members.conversation = ? AND members.user = ?", (conversation, user)
    ).fetchone()
    return None if row is None else _span(*row[1:])


def _contacts(connection: sqlite3.Connection, user: str) -> dict[str, int]:
    return dict(connection.execute("SELECT other, relation FROM relations WHERE owner = ?", (user,)).fetchall())


def _prune(connection: sqlite3.Connection, now: int, default_ttl: float | None) -> dict[str, int]:
    """
    Delete each conversation's expired prefix.  The oldest message is found through the
    (conversation, seq) index, so a conversation with nothing to prune costs one lookup.
    """
    changed = {}
    rows = connection.execute(
        "SELECT id, head_seq, floor_seq, retention FROM conversations WHERE head_seq > floor_seq"
    ).fetchall()
    for conversation, head, floor, retention in rows:
        ttl = retention or default_ttl
        if not ttl:
            continue
        row = connection.execute(
            "SELECT seq FROM messages WHERE conversation = ? AND seq > ? AND sent_at >= ? ORDER BY seq LIMIT 1",
            (conversation, floor, now - ttl * 1000),
        ).fetchone()
        new_floor = head if row is None else row[0] - 1
        if new_floor <= floor:
            continue
        # The dedupe records of the deleted messages: a bundle is never cut, so each record's
        # messages all go together.
        keys = connection.execute(
            "SELECT DISTINCT sender, sender_device, client_msg_id FROM messages"
            " WHERE conversation = ? AND seq > ? AND seq <= ?",
            (conversation, floor, new_floor),
        ).fetchall()
        connection.executemany(
            "DELETE FROM dedupe WHERE sender = ? AND sender_device = ? AND client_msg_id = ?"
            " AND conversation = ? AND first_seq <= ?",
            [(sender, device, client_msg_id, conversation, new_floor) for sender, device, client_msg_id in keys],
        )
        connection.execute(
            "DELETE FROM messages WHERE conversation = ? AND seq > ? AND seq <= ?", (conversation, floor, new_floor)
        )
        connection.execute(
            "DELETE FROM flags WHERE conversation = ? AND seq > ? AND seq <= ?", (conversation, floor, new_floor)
        )
        connection.execute("UPDATE conversations SET floor_seq = ? WHERE id = ?", (new_floor, conversation))
        changed[conversation] = new_floor
    return changed


def _set_read(connection: sqlite3.Connection, user: str, device: str, conversation: str, seq: int) -> None:
    if seq <= 0:
        return  # nothing read is no mark
    connection.execute(
        "INSERT INTO read_marks (conversation, user, device, seq) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (conversation, user, device) DO UPDATE SET seq = excluded.seq"
        " WHERE excluded.seq > read_marks.seq",
        (conversation, user, device, seq),
    )


def _read_marks(connection: sqlite3.Connection, conversation: str) -> dict[str, int]:
    rows = connection.execute(
        "SELECT user, max(seq) FROM read_marks WHERE conversation = ? GROUP BY user", (conversation,)
    )
    return dict(rows.fetchall())


def _read(
    connection: sqlite3.Connection, conversation: str, after_seq: int, limit: int
) -> list[Message]:
    if limit <= 0:
        return []
    rows = connection.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        " WHERE conversation = ? AND seq > ? ORDER BY seq LIMIT ?",
        (conversation, after_seq, min(limit, _MAX_LIMIT)),
    )
    messages = [_message(row) for row in rows]
    if messages and messages[-1].bundle_remaining:
        last = messages[-1]
        messages += _messages_between(
            connection, conversation, last.seq + 1, last.seq + last.bundle_remaining
        )
    return messages


def _head(connection: sqlite3.Connection, conversation: str) -> int:
    row = connection.execute(
        "SELECT head_seq FROM conversations WHERE id = ?", (conversation,)
    ).fetchone()
    return 0 if row is None else row[0]


def _members(connection: sqlite3.Connection, conversation: str) -> tuple[str, ...]:
    rows = connection.execute(
        "SELECT user FROM members WHERE conversation = ? AND left_seq IS NULL ORDER BY user", (conversation,)
    )
    return tuple(row[0] for row in rows)


def _conversations(connection: sqlite3.Connection, user: str) -> dict[str, int]:
    rows = connection.execute(
        "SELECT conversations.id, conversations.head_seq FROM members"
        " JOIN conversations ON conversations.id = members.conversation"
        " WHERE members.user = ? AND members.left_seq IS NULL",
        (user,),
    )
    return dict(rows.fetchall())


_SET_CURSOR = (
    "INSERT INTO cursors (user, device, conversation, seq) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (user, device, conversation) DO UPDATE SET seq = excluded.seq"
    " WHERE excluded.seq > cursors.seq"
)


def _set_cursor(
    connection: sqlite3.Connection, user: str, device: str, conversation: str, seq: int
) -> None:
    connection.execute(_SET_CURSOR, (user, device, conversation, seq))


def _set_cursors(connection: sqlite3.Connection, cursors: list[tuple[str, str, str, int]]) -> None:
    connection.executemany(_SET_CURSOR, cursors)


def _set_token(connection: sqlite3.Connection, digest: str, user: str, device: str, expires_at: int) -> None:
    connection.execute(
        "INSERT OR REPLACE INTO tokens (user, device, digest, expires_at) VALUES (?, ?, ?, ?)",
        (user, device, digest, expires_at),
    )


def _token_owner(connection: sqlite3.Connection, digest: str) -> tuple[str, str, int] | None:
    row = connection.execute("SELECT user, device, expires_at FROM tokens WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _revoke_tokens(connection: sqlite3.Connection, user: str, device: str | None) -> int:
    if device is None:
        return connection.execute("DELETE FROM tokens WHERE user = ?", (user,)).rowcount
    return connection.execute("DELETE FROM tokens WHERE user = ? AND device = ?", (user, device)).rowcount


def _publish_keys(connection: sqlite3.Connection, keys: DeviceKeys, limit: int) -> int:
    row = connection.execute(
        "SELECT identity_key FROM device_keys WHERE user = ? AND device = ?", (keys.user, keys.device)
    ).fetchone()
    if row is not None and row[0] != keys.identity_key:
        connection.execute("DELETE FROM one_time_keys WHERE user = ? AND device = ?", (keys.user, keys.device))
    connection.execute(
        "INSERT OR REPLACE INTO device_keys (user, device, identity_key, signing_key, signature) VALUES (?, ?, ?, ?, ?)",
        (keys.user, keys.device, keys.identity_key, keys.signing_key, keys.signature),
    )
    count = _one_time_key_count(connection, keys.user, keys.device)
    for one in keys.one_time_keys:
        if count >= limit:
            break
        count += connection.execute(
            "INSERT OR IGNORE INTO one_time_keys (user, device, key_id, key, signature) VALUES (?, ?, ?, ?, ?)",
            (keys.user, keys.device, one.key_id, one.key, one.signature),
        ).rowcount
    return count


def _one_time_key_count(connection: sqlite3.Connection, user: str, device: str) -> int:
    return connection.execute("SELECT count(*) FROM one_time_keys WHERE user = ? AND device = ?", (user, device)).fetchone()[0]


def _device_keys(connection: sqlite3.Connection, users: list[str]) -> list[DeviceKeys]:
    found = []
    for user in sorted(set(users)):
        rows = connection.execute(
            "SELECT user, device, identity_key, signing_key, signature FROM device_keys WHERE user = ? ORDER BY device", (user,)
        )
        found.extend(DeviceKeys(*row) for row in rows)
    return found


def _claim_one_time_keys(connection: sqlite3.Connection, devices: list[tuple[str, str]]) -> dict[tuple[str, str], OneTimeKey]:
    claimed: dict[tuple[str, str], OneTimeKey] = {}
    for user, device in devices:
        if (user, device) in claimed:
            continue
        row = connection.execute(
            "SELECT id, key_id, key, signature FROM one_time_keys WHERE user = ? AND device = ? ORDER BY id LIMIT 1",
            (user, device),
        ).fetchone()
        if row is not None:
            connection.execute("DELETE FROM one_time_keys WHERE id = ?", (row[0],))
            claimed[(user, device)] = OneTimeKey(row[1], row[2], row[3])
    return claimed


def _remove_device_keys(connection: sqlite3.Connection, user: str, device: str | None) -> int:
    if device is None:
        connection.execute("DELETE FROM one_time_keys WHERE user = ?", (user,))
        return connection.execute("DELETE FROM device_keys WHERE user = ?", (user,)).rowcount
    connection.execute("DELETE FROM one_time_keys WHERE user = ? AND device = ?", (user, device))
    return connection.execute("DELETE FROM device_keys WHERE user = ? AND device = ?", (user, device)).rowcount


def _cursors(connection: sqlite3.Connection, user: str, device: str) -> dict[str, int]:
    rows = connection.execute(
        "SELECT conversation, seq FROM cursors WHERE user = ? AND device = ?", (user, device)
    )
    return dict(rows.fetchall())


# The store -------------------------------------------------------------------------------------


class _Operation(NamedTuple):
    """
    One queued call: what to run on the worker, whether it writes, and whom to tell.  A named
    tuple, not an attrs class: one is made per store call, on the reactor thread's hot path.
    """

    function: Callable[..., Any]
    args: tuple
    write: bool
    deferred: defer.Deferred


class _Gathered:
    """The outcomes of one ``append_many``, filled in on the reactor thread as its parts finish."""

    __slots__ = ("deferred", "outcomes", "missing")

    def __init__(self, deferred: defer.Deferred, outcomes: list[Any], missing: int) -> None:
        self.deferred = deferred
        self.outcomes = outcomes
        self.missing = missing

    def fill(self, index: int, outcome: Any) -> None:
        self.outcomes[index] = outcome
        self.missing -= 1
        if not self.missing:
            self.deferred.callback(self.outcomes)


class _Part:
    """
    Stands in for the Deferred of one submission of an ``append_many``: the worker runs it as an
    ordinary append (so it joins the fast path's runs), and its outcome goes to the gathering.
    """

    __slots__ = ("gathered", "index")

    def __init__(self, gathered: _Gathered, index: int) -> None:
        self.gathered = gathered
        self.index = index

    def errback(self, failure: Failure) -> None:
        """The worker failed before running it (see ``_failed``)."""
        self.gathered.fill(self.index, failure.value)


class _SlowPath(Exception):
    """The fast way of running a batch hit something unusual: run it the careful way."""


@attrs.define
class _AppendCache:
    """
    What the worker remembers between batches so a plain append needs no reads: each
    conversation's head and direct members, the next server id, and who may send plain messages
    where.  Valid because this worker is the only writer of messages, relations and groups;
    dropped whenever a batch is rolled back or an append is stored the careful way (it may have
    changed relations or groups).
    """

    heads: dict[str, int] = attrs.Factory(dict)
    members: dict[str, set[str]] = attrs.Factory(dict)
    next_server_id: int | None = None
    allowed: dict[tuple[str, str], tuple[Policy, tuple[str, ...], bool]] = attrs.Factory(dict)
    """(conversation, sender) -> (policy, audience, direct): the rules let that sender's plain
    messages in under that policy (they change nothing, so one answer holds for the next)."""
    groups: dict[str, tuple[frozenset[str], tuple[str, ...]]] = attrs.Factory(dict)
    """A group's current members, as a set and as the sorted audience."""


def _allow_plain(
    connection: sqlite3.Connection, cache: _AppendCache, submission: Submission, policy: Policy, head: int
) -> tuple[tuple[str, ...], bool] | None:
    """
    (audience, direct) if the rules let a submission of plain messages in, else None (the
    careful way will find out why).  A direct conversation asks the rules themselves, once per
    sender; a group needs only its membership, read once per group however many members write.
    """
    conversation = submission.conversation
    if direct_members(conversation) is not None:
        try:
            decision = rules.decide(SQLiteView(connection), policy, submission, head)
        except rules.Refused:
            return None
        return decision.audience, True
    if not rules.is_group(conversation):
        return None
    members = cache.groups.get(conversation)
    if members is None:
        if connection.execute("SELECT 1 FROM groups WHERE id = ?", (conversation,)).fetchone() is None:
            return None
        users = tuple(
            row[0]
            for row in connection.execute(
                "SELECT user FROM members WHERE conversation = ? AND left_seq IS NULL ORDER BY user", (conversation,)
            )
        )
        members = cache.groups[conversation] = (frozenset(users), users)
    if submission.sender not in members[0]:
        return None
    return members[1], False


def _append_run(connection: sqlite3.Connection, cache: _AppendCache, run: list[_Operation]) -> list[Appended]:
    """
    Append a run of submissions with one statement per table, as far as they are plain and the
    rules let them in: the results, fewer than ``run`` if the next one needs the careful way.
    A duplicate makes the dedupe insert fail (primary key), which sends the whole batch down the
    careful path that answers it.
    """
    if cache.next_server_id is None:
        row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        cache.next_server_id = (row[0] if row else 0) + 1
    heads = cache.heads
    known_members = cache.members
    allowed = cache.allowed
    server_id = cache.next_server_id
    prefix = schema.OPERATION_PREFIX
    rows: list[Any] = []  # flat: _MESSAGE_WIDTH values a message
    dedupe_rows: list[Any] = []  # flat: _DEDUPE_WIDTH values a submission
    touched: dict[str, int] = {}
    results: list[Appended] = []
    for operation in run:
        submission, policy = operation.args
        items = submission.items
        count = len(items)
        if count == 1:
            if items[0].content_type.startswith(prefix):
                break
        elif not rules.plain(items):
            break
        conversation = submission.conversation
        sender = submission.sender
        head = heads.get(conversation)
        new = False
        if head is None:
            row = connection.execute("SELECT head_seq FROM conversations WHERE id = ?", (conversation,)).fetchone()
            new = row is None
            head = 0 if new else row[0]
        entry = allowed.get((conversation, sender))
        if entry is None or (entry[0] is not policy and entry[0] != policy):
            verdict = _allow_plain(connection, cache, submission, policy, head)
            if verdict is None:
                break
            entry = allowed[(conversation, sender)] = (policy, verdict[0], verdict[1])
        if new:
            connection.execute("INSERT INTO conversations (id, head_seq) VALUES (?, 0)", (conversation,))
        if entry[2] and submission.members:  # a direct conversation's members
            members = known_members.get(conversation)
            if members is None:
                members = known_members[conversation] = set()
            if not members.issuperset(submission.members):
                missing = [member for member in submission.members if member not in members]
                connection.executemany(
                    "INSERT OR IGNORE INTO members (conversation, user) VALUES (?, ?)",
                    [(conversation, member) for member in missing],
                )
                members.update(missing)
        device, sent_at = submission.sender_device, submission.sent_at
        client_msg_id = submission.client_msg_id
        signed_id = client_msg_id if client_msg_id < _SIGN_BIT else client_msg_id - _U64
        if count == 1:  # the common case, without the loop's bookkeeping
            item = items[0]
            body = item.body if type(item.body) is bytes else bytes(item.body)
            seq = head + 1
            rows += (server_id, conversation, seq, sender, device, signed_id, sent_at, item.content_type, body, 0)
            messages = (_new_message(server_id, conversation, seq, sender, device, client_msg_id, sent_at, item.content_type, body, 0),)
            server_id += 1
        else:
            bundle = []
            for index, item in enumerate(items):
                body = item.body if type(item.body) is bytes else bytes(item.body)
                remaining = count - 1 - index
                seq = head + 1 + index
                rows += (server_id, conversation, seq, sender, device, signed_id, sent_at, item.content_type, body, remaining)
                bundle.append(
                    _new_message(server_id, conversation, seq, sender, device, client_msg_id, sent_at, item.content_type, body, remaining)
                )
                server_id += 1
            messages = tuple(bundle)
        dedupe_rows += (sender, device, signed_id, conversation, head + 1, count)
        heads[conversation] = touched[conversation] = head + count
        results.append(_new_appended(messages, False, entry[1]))
    if rows:
        _insert_many(connection, _INSERT_DEDUPE, _DEDUPE_WIDTH, dedupe_rows)
        _insert_many(connection, _INSERT_MESSAGE, _MESSAGE_WIDTH, rows)
        connection.executemany(
            "UPDATE conversations SET head_seq = ? WHERE id = ?", [(head, conv) for conv, head in touched.items()]
        )
        cache.next_server_id = server_id
    return results


# The fast path builds thousands of these a second (see imkit.slots).
_new_message = slots.builder(Message)
_new_appended = slots.builder(Appended)

_INSERT_DEDUPE = "INSERT INTO dedupe (sender, sender_device, client_msg_id, conversation, first_seq, count) VALUES "
_DEDUPE_WIDTH = 6
_INSERT_MESSAGE = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES "
_MESSAGE_WIDTH = 10
_CHUNKS = (64, 16, 4, 1)
_MULTI_ROW: dict[tuple[str, int, int], str] = {}


def _insert_many(connection: sqlite3.Connection, insert: str, width: int, values: list[Any]) -> None:
    """
    Insert rows (``values`` flat, ``width`` a row) with multi-row ``VALUES`` statements of a few
    fixed sizes (so SQLite's statement cache holds them all).  Measured against ``executemany``:
    about a quarter less CPU per row, and one step a statement instead of one a row, so the
    writer lets go of the GIL, and the reactor waits for it, once per statement.
    """
    rows = len(values) // width
    start = 0
    while start < rows:
        size = next(chunk for chunk in _CHUNKS if chunk <= rows - start)
        statement = _MULTI_ROW.get((insert, width, size))
        if statement is None:
            row = "(" + ", ".join("?" * width) + ")"
            statement = _MULTI_ROW[(insert, width, size)] = insert + ", ".join([row] * size)
        connection.execute(statement, values[start * width : (start + size) * width])
        start += size


_CLOSE = object()  # queued by close(): the worker finishes what is ahead of it, then stops


@implementer(IStore)
class SQLiteStore:
    """
    IStore in one SQLite file, with all I/O on one worker thread.

    Durability: the database runs in WAL mode, and with ``synchronous="FULL"`` (the default) every
    commit syncs the WAL before any Deferred of its batch fires, so an acknowledged write survives
    a power failure too.  Batching makes that one sync per batch, which costs next to nothing in
    throughput.  ``synchronous="NORMAL"`` skips the sync: in WAL mode a commit is still durable
    against a crash of the process (the transaction is in the WAL file, which SQLite replays on the
    next open), but the last acknowledged commits may be lost if the machine crashes or loses power.

    ``busy_timeout`` (seconds) is how long either side waits for the write lock when another
    process — the ``imkit user add`` CLI — holds it.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        batch_limit: int = 500,
        busy_timeout: float = 5.0,
        synchronous: str = "FULL",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if batch_limit < 1:
            raise ValueError(f"batch_limit must be at least 1, not {batch_limit!r}")
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = path
        self.description = f"sqlite:{path}"
        self.batch_limit = batch_limit
        self._reactor = reactor
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # new -> open -> closing -> closed; or failed if opening or the worker failed.
        self._state = "new"
        self._opening: defer.Deferred | None = None
        self._closing: list[defer.Deferred] = []
        self._cache = _AppendCache()  # the worker thread's alone

    # Life cycle (reactor thread) ---------------------------------------------------------------

    def open(self) -> defer.Deferred:
        if self._state != "new":
            return defer.fail(StoreError(f"{self.description} can only be opened once"))
        self._state = "open"
        self._opening = defer.Deferred()
        self._thread = threading.Thread(
            target=self._work, name=f"imkit {self.description}", daemon=True
        )
        self._thread.start()
        return self._opening

    def close(self) -> defer.Deferred:
        if self._state == "new":
            self._state = "closed"
        if self._state in ("closed", "failed"):
            return defer.succeed(None)
        closed: defer.Deferred = defer.Deferred()
        self._closing.append(closed)
        if self._state == "open":
            self._state = "closing"
            self._queue.put(_CLOSE)
        return closed

    def _opened(self) -> None:
        self.log.info("Opened {description}", description=self.description)
        opening, self._opening = self._opening, None
        opening.callback(None)

    def _deliver(self, outcomes: list[tuple[defer.Deferred, Any]]) -> None:
        """Fire a batch's Deferreds, in the order their calls were made."""
        for deferred, outcome in outcomes:
            if type(deferred) is _Part:
                deferred.gathered.fill(deferred.index, outcome.value if type(outcome) is Failure else outcome)
            elif isinstance(outcome, Failure):
                deferred.errback(outcome)
            else:
                deferred.callback(outcome)

    def _stopped(self, failure: Failure | None) -> None:
        """The worker closed the connection and is exiting."""
        self._join()
        self._state = "closed"
        self.log.info("Closed {description}", description=self.description)
        closing, self._closing = self._closing, []
        for closed in closing:
            if failure is None:
                closed.callback(None)
            else:
                closed.errback(failure)

    def _failed(self, failure: Failure, opening: bool) -> None:
        """The worker could not open the database, or died: fail everything still waiting."""
        self._join()
        self._state = "failed"
        if not opening:
            self.log.failure("{description} stopped working", failure, description=self.description)
        if self._opening is not None:
            self._opening, deferred = None, self._opening
            deferred.errback(failure)
        while True:
            try:
                operation = self._queue.get_nowait()
            except queue.Empty:
                break
            if operation is not _CLOSE:
                operation.deferred.errback(failure)
        closing, self._closing = self._closing, []
        for closed in closing:
            closed.callback(None)

    def _join(self) -> None:
        # The worker's last act is the callFromThread that brought us here, so this is brief.
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _submit(self, function: Callable[..., Any], *args: Any, write: bool) -> defer.Deferred:
        if self._state != "open":
            return defer.fail(StoreClosed(f"{self.description} is not open"))
        deferred: defer.Deferred = defer.Deferred()
        self._queue.put(_Operation(function, args, write, deferred))
        return deferred

    # IStore ------------------------------------------------------------------------------------

    def add_user(self, name: str, password_hash: str) -> defer.Deferred:
        return self._submit(_add_user, name, password_hash, write=True)

    def password_hash(self, name: str) -> defer.Deferred:
        return self._submit(_password_hash, name, write=False)

    def set_password_hash(self, name: str, password_hash: str) -> defer.Deferred:
        return self._submit(_set_password_hash, name, password_hash, write=True)

    def list_users(self) -> defer.Deferred:
        return self._submit(_list_users, write=False)

    def set_disabled(self, name: str, disabled: bool) -> defer.Deferred:
        return self._submit(_set_disabled, name, bool(disabled), write=True)

    def is_disabled(self, name: str) -> defer.Deferred:
        return self._submit(_is_disabled, name, write=False)

    def disabled_users(self) -> defer.Deferred:
        return self._submit(_disabled_users, write=False)

    def append(self, submission: Submission, policy: Policy = DEFAULT_POLICY, flags: Any = ()) -> defer.Deferred:
        try:
            check_submission(submission)
            marks = check_flags(submission, flags) if flags else ()
        except ValueError:
            return defer.fail()
        if marks:
            # Not _append: the fast path's runs never take it, so it has its own savepoint.
            return self._submit(_append_flagged, submission, policy, marks, write=True)
        return self._submit(_append, submission, policy, write=True)

    def append_many(self, submissions: Any, policy: Policy = DEFAULT_POLICY) -> defer.Deferred:
        if self._state != "open":
            return defer.fail(StoreClosed(f"{self.description} is not open"))
        deferred: defer.Deferred = defer.Deferred()
        outcomes: list[Any] = [None] * len(submissions)
        gathered = _Gathered(deferred, outcomes, len(submissions))
        put = self._queue.put
        for index, submission in enumerate(submissions):
            try:
                check_submission(submission)
            except ValueError as error:
                gathered.fill(index, error)
                continue
            put(_Operation(_append, (submission, policy), True, _Part(gathered, index)))
        if not submissions:
            deferred.callback(outcomes)
        return deferred

    def flag(self, server_id: int, checker: str, reason: str) -> defer.Deferred:
        try:
            check_mark(checker, reason)
        except ValueError:
            return defer.fail()
        return self._submit(_flag, server_id, checker, reason, write=True)

    def flags(self, conversation: str | None = None, limit: int = 100) -> defer.Deferred:
        return self._submit(_flags, conversation, limit, write=False)

    def read(self, conversation: str, after_seq: int, limit: int) -> defer.Deferred:
        return self._submit(_read, conversation, after_seq, limit, write=False)

    def head(self, conversation: str) -> defer.Deferred:
        return self._submit(_head, conversation, write=False)

    def members(self, conversation: str) -> defer.Deferred:
        return self._submit(_members, conversation, write=False)

    def conversations(self, user: str) -> defer.Deferred:
        return self._submit(_conversations, user, write=False)

    def visible(self, user: str) -> defer.Deferred:
        return self._submit(_visible, user, write=False)

    def visibility(self, conversation: str, user: str) -> defer.Deferred:
        return self._submit(_visibility, conversation, user, write=False)

    def group(self, conversation: str) -> defer.Deferred:
        return self._submit(_group, conversation, write=False)

    def contacts(self, user: str) -> defer.Deferred:
        return self._submit(_contacts, user, write=False)

    def prune(self, now: int, default_ttl: float | None) -> defer.Deferred:
        return self._submit(_prune, now, default_ttl, write=True)

    def set_read(self, user: str, device: str, conversation: str, seq: int) -> defer.Deferred:
        return self._submit(_set_read, user, device, conversation, seq, write=True)

    def read_marks(self, conversation: str) -> defer.Deferred:
        return self._submit(_read_marks, conversation, write=False)

    def set_cursor(self, user: str, device: str, conversation: str, seq: int) -> defer.Deferred:
        return self._submit(_set_cursor, user, device, conversation, seq, write=True)

    def set_cursors(self, cursors: Any) -> defer.Deferred:
        return self._submit(_set_cursors, [tuple(cursor) for cursor in cursors], write=True)

    def set_token(self, digest: str, user: str, device: str, expires_at: int) -> defer.Deferred:
        return self._submit(_set_token, digest, user, device, expires_at, write=True)

    def token_owner(self, digest: str) -> defer.Deferred:
        return self._submit(_token_owner, digest, write=False)

    def revoke_tokens(self, user: str, device: str | None = None) -> defer.Deferred:
        return self._submit(_revoke_tokens, user, device, write=True)

    def cursors(self, user: str, device: str) -> defer.Deferred:
        return self._submit(_cursors, user, device, write=False)

    def publish_keys(self, keys: DeviceKeys, limit: int) -> defer.Deferred:
        return self._submit(_publish_keys, keys, limit, write=True)

    def device_keys(self, users: Any) -> defer.Deferred:
        return self._submit(_device_keys, list(users), write=False)

    def claim_one_time_keys(self, devices: Any) -> defer.Deferred:
        return self._submit(_claim_one_time_keys, [tuple(device) for device in devices], write=True)

    def remove_device_keys(self, user: str, device: str | None = None) -> defer.Deferred:
        return self._submit(_remove_device_keys, user, device, write=True)

    # The worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        call = self._reactor.callFromThread
        try:
            connection = self._connect()
        except BaseException:
            call(self._failed, Failure(), True)
            return
        call(self._opened)
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._take()
                if batch:
                    call(self._deliver, self._run_batch(connection, batch))
        except BaseException:
            failure = Failure()
            connection.close()
            call(self._failed, failure, False)
            return
        try:
            connection.close()
        except BaseException:
            call(self._stopped, Failure())
        else:
            call(self._stopped, None)

    def _take(self) -> tuple[list[_Operation], bool]:
        """Wait for work, then take everything queued up to batch_limit; True when told to stop."""
        first = self._queue.get()
        if first is _CLOSE:
            return [], True
        batch = [first]
        while len(batch) < self.batch_limit:
            try:
                operation = self._queue.get_nowait()
            except queue.Empty:
                break
            if operation is _CLOSE:
                return batch, True
            batch.append(operation)
        return batch, False

    def _run_batch(
        self, connection: sqlite3.Connection, batch: list[_Operation]
    ) -> list[tuple[defer.Deferred, Any]]:
        """
        Run a batch in one transaction; each operation's outcome is its result or its Failure.

        First the fast way: runs of plain appends are written with one ``executemany`` per table,
        their sequence numbers and server ids taken from the worker's caches; an append with
        operations, or one the rules may refuse, runs alone in its own SAVEPOINT between runs.
        If anything in that goes
        wrong — typically a resend whose dedupe record exists already — the transaction is rolled
        back, the caches are dropped, and the batch runs again the careful way: each operation in
        its own SAVEPOINT, so a failing one is rolled back alone and fails only its own Deferred.
        If the transaction itself fails (cannot begin or commit), every operation fails with it,
        since none of their writes took effect.
        """
        try:
            return self._run_fast(connection, batch)
        except _SlowPath:
            self._rollback(connection)
            self._cache = _AppendCache()
        try:
            return self._run_careful(connection, batch)
        except Exception:
            failure = Failure()
            self._rollback(connection)
            return [(operation.deferred, failure) for operation in batch]
        finally:
            self._cache = _AppendCache()

    @staticmethod
    def _rollback(connection: sqlite3.Connection) -> None:
        if connection.in_transaction:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _begin(self, connection: sqlite3.Connection, batch: list[_Operation]) -> None:
        writes = any(operation.write for operation in batch)
        # IMMEDIATE takes the write lock up front, waiting out the CLI via busy_timeout.
        connection.execute("BEGIN IMMEDIATE" if writes else "BEGIN")

    def _run_fast(self, connection: sqlite3.Connection, batch: list[_Operation]) -> list[tuple[defer.Deferred, Any]]:
        try:
            self._begin(connection, batch)
        except Exception:
            raise _SlowPath() from None
        outcomes: list[tuple[defer.Deferred, Any]] = []
        start = 0
        while start < len(batch):
            operation = batch[start]
            if operation.function is _append:
                end = start
                while end < len(batch) and batch[end].function is _append:
                    end += 1
                try:
                    appended = _append_run(connection, self._cache, batch[start:end])
                except Exception:
                    raise _SlowPath() from None
                outcomes.extend(zip([op.deferred for op in batch[start : start + len(appended)]], appended))
                start += len(appended)
                if start < end:
                    # An append with operations, or one the rules may refuse: the careful way,
                    # in its own savepoint, so a refusal writes nothing and fails it alone.
                    operation = batch[start]
                    outcome = self._in_savepoint(connection, operation)
                    if not isinstance(outcome, Failure) and not outcome.duplicate:
                        self._cache = _AppendCache()
                    outcomes.append((operation.deferred, outcome))
                    start += 1
            else:
                outcome = self._in_savepoint(connection, operation)
                if operation.function is _append_flagged:
                    self._cache = _AppendCache()  # it wrote messages the caches do not know of
                outcomes.append((operation.deferred, outcome))
                start += 1
        try:
            connection.execute("COMMIT")
        except Exception:
            raise _SlowPath() from None
        return outcomes

    def _run_careful(self, connection: sqlite3.Connection, batch: list[_Operation]) -> list[tuple[defer.Deferred, Any]]:
        self._begin(connection, batch)
        outcomes = [(operation.deferred, self._in_savepoint(connection, operation)) for operation in batch]
        connection.execute("COMMIT")
        return outcomes

    @staticmethod
    def _in_savepoint(connection: sqlite3.Connection, operation: _Operation) -> Any:
        connection.execute("SAVEPOINT operation")
        try:
            outcome = operation.function(connection, *operation.args)
        except Exception:
            outcome = Failure()
            connection.execute("ROLLBACK TO operation")
        connection.execute("RELEASE operation")
        return outcome

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal" and self.path != ":memory:":
                raise StoreError(f"{self.description} cannot use WAL mode (it is in {mode} mode)")
            connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._create_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        """Create the tables in a new file, or check that an existing one has our version."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise SchemaVersionError(
                        f"{self.description} is a database imkit did not create (it has tables"
                        " but no imkit schema version): use a new file"
                    )
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version < SCHEMA_VERSION and all(v in _MIGRATIONS for v in range(version, SCHEMA_VERSION)):
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.description} has schema version {version}, but this imkit only knows"
                    f" version {SCHEMA_VERSION}: use the imkit release that wrote it"
                )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
