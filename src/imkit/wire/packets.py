"""
Packets as frozen value objects, one class per kind in ``imkit.wire.schema.BODIES``.

Field names match the construct declarations exactly (checked when ``imkit.wire.codec`` is
imported), so a packet is what the schema says and nothing else.  construct ``Container``s never
leave the wire package: everything above it sees these objects.
"""

from __future__ import annotations

import attrs

from imkit.model import Item, Message
from imkit.wire import schema


@attrs.frozen
class Cursor:
    """A conversation and a sequence number in it (a client's position, or a head)."""

    conversation: str
    seq: int


@attrs.frozen
class Range:
    """
    Where a sync answer starts in a conversation (exclusive) and where the conversation ends for
    the asker.  ``skipped_from`` below ``from_seq`` says the messages after it up to ``from_seq``
    exist no more for the asker (pruned by retention, or from before they joined a group): the
    client reports that hole instead of leaving it silent.
    """

    conversation: str
    from_seq: int
    head_seq: int
    skipped_from: int = attrs.field(default=attrs.Factory(lambda self: self.from_seq, takes_self=True))


@attrs.frozen
class Hello:
    min_version: int
    max_version: int
    agent: str


@attrs.frozen
class HelloOk:
    version: int
    max_frame: int
    heartbeat_ms: int
    agent: str


@attrs.frozen
class Login:
    method: int
    user: str
    device: str
    secret: bytes = attrs.field(repr=False)


@attrs.frozen
class LoginResult:
    status: int
    server_time: int
    resume_token: bytes = attrs.field(repr=False)
    reason: str


@attrs.frozen
class Send:
    client_msg_id: int
    target_type: int
    target: str
    content_type: str
    body: bytes


@attrs.frozen
class SendAck:
    """
    The server's receipt for a Send or Bundle: stored as ``seq``..``seq + count - 1``.

    A non-zero ``status`` (an ErrorCode) means nothing was stored and ``reason`` says why.

    ``status`` ``RATE_LIMITED`` is not a failure but "not yet": ``sent_at`` is then the server
    time (ms) from which to send it again, unchanged (same ``client_msg_id``), and ``server_id``
    the ``client_msg_id`` of the send the server waits for first (this one, or an earlier one of
    the device refused the same way).  Until that one comes back, every other send of the device
    gets this answer too, so nothing overtakes it: a client keeps its sends in order by pausing
    its outbox until ``sent_at``, then sending that one first and the others after it, in order.
    """

    client_msg_id: int
    status: int
    server_id: int
    seq: int
    sent_at: int
    count: int
    conversation: str
    reason: str


@attrs.frozen
class Deliver:
    message: Message


@attrs.frozen
class DeliverAck:
    """Cumulative: every message of ``conversation`` up to ``seq`` has been received."""

    conversation: str
    seq: int


@attrs.frozen
class Sync:
    request_id: int
    flags: int
    limit: int
    cursors: tuple[Cursor, ...]


@attrs.frozen
class SyncResult:
    request_id: int
    more: bool
    ranges: tuple[Range, ...]
    messages: tuple[Message, ...]


@attrs.frozen
class Bundle:
    client_msg_id: int
    target_type: int
    target: str
    items: tuple[Item, ...]


@attrs.frozen
class DeliverBundle:
    messages: tuple[Message, ...]


@attrs.frozen
class Heads:
    heads: tuple[Cursor, ...]


@attrs.frozen
class Ping:
    nonce: int


@attrs.frozen
class Pong:
    nonce: int


@attrs.frozen
class Error:
    code: int
    reason: str


@attrs.frozen
class Bye:
    code: int
    reason: str


@attrs.frozen
class ReadCount:
    """How many members other than the sender have read a message."""

    seq: int
    count: int


@attrs.frozen
class ReadMark:
    """One user has read a conversation up to ``seq`` (the furthest of all their devices)."""

    seq: int
    user: str


@attrs.frozen
class Entry:
    """One line of a query's answer: what ``state``, ``seq`` and ``detail`` mean depends on it."""

    seq: int
    state: int
    name: str
    detail: str


@attrs.frozen
class Read:
    """The sending device has shown ``conversation`` to its user up to ``seq``."""

    seq: int
    conversation: str


@attrs.frozen
class Receipt:
    """``device`` of ``user`` has read ``conversation`` up to ``seq``."""

    seq: int
    conversation: str
    user: str
    device: str


@attrs.frozen
class ReceiptsQuery:
    request_id: int
    conversation: str
    seqs: tuple[int, ...]


@attrs.frozen
class ReceiptsResult:
    """
    Read counts for the asked sequences, and for conversations small enough every member's
    read mark (``readers``); ``status`` is an ErrorCode (non-zero: not a member, nothing else).
    """

    request_id: int
    status: int
    conversation: str
    counts: tuple[ReadCount, ...]
    readers: tuple[ReadMark, ...]


@attrs.frozen
class Typing:
    active: bool
    conversation: str


@attrs.frozen
class TypingNotice:
    active: bool
    conversation: str
    user: str
    device: str


@attrs.frozen
class Presence:
    status: int
    text: str


@attrs.frozen
class PresenceNotice:
    status: int
    user: str
    text: str


@attrs.frozen
class Query:
    request_id: int
    what: int
    target: str


@attrs.frozen
class QueryResult:
    request_id: int
    status: int
    reason: str
    entries: tuple[Entry, ...]


@attrs.frozen
class OneTimeKey:
    """A Curve25519 one-time key of a device, signed by the device's Ed25519 signing key."""

    key_id: str
    key: str
    signature: str


@attrs.frozen
class DeviceKeys:
    """
    A device's public identity keys (Curve25519 ``identity_key``, Ed25519 ``signing_key``) and
    its ``signature`` of them with the signing key, over ``imkit.e2ee.device_statement``.  In
    KeysUpload ``one_time_keys`` are new keys to publish; in KeysResult, the one claimed for the
    asker (if it asked, and the device had one left).
    """

    user: str
    device: str
    identity_key: str
    signing_key: str
    signature: str
    one_time_keys: tuple[OneTimeKey, ...] = ()


@attrs.frozen
class KeyRequest:
    """
    The keys of one device of ``user`` (every device, if ``device`` is empty); with ``claim``,
    one of each answered device's one-time keys too, which the server hands out only once.
    """

    claim: bool
    user: str
    device: str


@attrs.frozen
class KeysUpload:
    """
    Publish the logged-in device's keys.  ``keys.user`` and ``keys.device`` must be the
    session's own (else NOT_ALLOWED); the signatures must verify (else INVALID_OPERATION).
    New identity keys replace the device's old ones and drop its unclaimed one-time keys.
    Answered by a KeysResult whose ``unclaimed`` counts the device's one-time keys on the server.
    """

    request_id: int
    keys: DeviceKeys


@attrs.frozen
class KeysQuery:
    """
    Fetch the published keys of other devices (end-to-end encryption, docs/e2ee.rst), claiming
    one-time keys where asked: answered by a KeysResult listing the devices found, sorted by user
    and device (users without published keys have none).
    """

    request_id: int
    requests: tuple[KeyRequest, ...]


@attrs.frozen
class KeysResult:
    """The answer to KeysUpload or KeysQuery; ``status`` is an ErrorCode (non-zero: ``reason`` says why)."""

    request_id: int
    status: int
    unclaimed: int
    reason: str
    devices: tuple[DeviceKeys, ...]


PACKET_CLASSES = {
    schema.HELLO: Hello,
    schema.HELLO_OK: HelloOk,
    schema.LOGIN: Login,
    schema.LOGIN_RESULT: LoginResult,
    schema.SEND: Send,
    schema.SEND_ACK: SendAck,
    schema.DELIVER: Deliver,
    schema.DELIVER_ACK: DeliverAck,
    schema.SYNC: Sync,
    schema.SYNC_RESULT: SyncResult,
    schema.BUNDLE: Bundle,
    schema.DELIVER_BUNDLE: DeliverBundle,
    schema.HEADS: Heads,
    schema.PING: Ping,
    schema.PONG: Pong,
    schema.ERROR: Error,
    schema.BYE: Bye,
    schema.READ: Read,
    schema.RECEIPT: Receipt,
    schema.RECEIPTS_QUERY: ReceiptsQuery,
    schema.RECEIPTS_RESULT: ReceiptsResult,
    schema.TYPING: Typing,
    schema.TYPING_NOTICE: TypingNotice,
    schema.PRESENCE: Presence,
    schema.PRESENCE_NOTICE: PresenceNotice,
    schema.QUERY: Query,
    schema.QUERY_RESULT: QueryResult,
    schema.KEYS_UPLOAD: KeysUpload,
    schema.KEYS_QUERY: KeysQuery,
    schema.KEYS_RESULT: KeysResult,
}
"""Packet kind -> packet class."""

KIND_OF = {cls: kind for kind, cls in PACKET_CLASSES.items()}

RECORD_CLASSES = {
    id(schema.MESSAGE): Message,
    id(schema.CURSOR): Cursor,
    id(schema.RANGE): Range,
    id(schema.ITEM): Item,
    id(schema.READ_COUNT): ReadCount,
    id(schema.READ_MARK): ReadMark,
    id(schema.ENTRY): Entry,
    id(schema.ONE_TIME_KEY): OneTimeKey,
    id(schema.DEVICE_KEYS): DeviceKeys,
    id(schema.KEY_REQUEST): KeyRequest,
}
"""Nested record declarations -> the value class they decode into."""
