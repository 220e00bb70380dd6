"""
The imkit wire format, declared once with construct.

Everything on the wire is a frame::

    frame   = length:u32 version:u8 flags:u8 kind:u16 body
    length  = number of bytes after the length field (4 + len(body))

All integers are big-endian and unsigned.  ``str8``/``str16`` are UTF-8 strings prefixed by their
byte length as u8/u16; ``bytes16``/``bytes32`` are raw bytes prefixed the same way; ``list16 of X``
is a u16 element count followed by the elements.

Why these limits:

* The length prefix is checked against the receiver's maximum frame size (``HelloOk.max_frame``,
  1 MiB by default) *before* any of the body is buffered, so a peer cannot make us hold more than
  one maximum frame of its data.
* ``kind`` is 16 bits so that extensions get a range of their own (``EXTENSION_KINDS``) that can
  never collide with a kind a later imkit version adds.
* Sequence numbers, server ids and client message ids are 64-bit: they never wrap in practice.

This module is the single source of truth: the fast codec in ``imkit.wire.codec`` is generated from
these declarations at import time, ``docs/protocol.rst`` is rendered from them, and the tests prove
that the generated codec and construct itself agree byte for byte.
"""

from __future__ import annotations

from construct import (
    Flag,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    PrefixedArray,
    Struct,
)

PROTOCOL_VERSION = 1
"""The only protocol version this imkit speaks."""

HEADER = Struct(
    "length" / Int32ub,
    "version" / Int8ub,
    "flags" / Int8ub,
    "kind" / Int16ub,
)
HEADER_SIZE = 8
LENGTH_SIZE = 4

FLAG_RESEND = 0x01
"""Set on a frame that repeats an earlier one (a resend); informational, never required."""

DEFAULT_MAX_FRAME = 1024 * 1024
"""The largest frame (its ``length`` field) a receiver accepts unless configured otherwise."""

CORE_KINDS = range(0x0001, 0x8000)
EXTENSION_KINDS = range(0x8000, 0x10000)

str8 = PascalString(Int8ub, "utf8")
str16 = PascalString(Int16ub, "utf8")
bytes16 = Prefixed(Int16ub, GreedyBytes)
bytes32 = Prefixed(Int32ub, GreedyBytes)

# Fixed-width fields come first in every record: the generated codec reads them with one
# ``struct.unpack_from`` call.

MESSAGE = Struct(
    "server_id" / Int64ub,
    "seq" / Int64ub,
    "client_msg_id" / Int64ub,
    "sent_at" / Int64ub,
    "bundle_remaining" / Int16ub,
    "conversation" / str16,
    "sender" / str16,
    "sender_device" / str16,
    "content_type" / str8,
    "body" / bytes32,
)

CURSOR = Struct(
    "seq" / Int64ub,
    "conversation" / str16,
)

RANGE = Struct(
    "from_seq" / Int64ub,
    "head_seq" / Int64ub,
    "skipped_from" / Int64ub,
    "conversation" / str16,
)

ITEM = Struct(
    "content_type" / str8,
    "body" / bytes32,
)

READ_COUNT = Struct(
    "seq" / Int64ub,
    "count" / Int32ub,
)

READ_MARK = Struct(
    "seq" / Int64ub,
    "user" / str16,
)

ENTRY = Struct(
    "seq" / Int64ub,
    "state" / Int8ub,
    "name" / str16,
    "detail" / str16,
)

# End-to-end encryption's key directory (docs/e2ee.rst).  Keys, signatures and key ids are
# unpadded base64, as the client's crypto library (vodozemac) writes them.

ONE_TIME_KEY = Struct(
    "key_id" / str8,
    "key" / str8,
    "signature" / str8,
)

DEVICE_KEYS = Struct(
    "user" / str16,
    "device" / str16,
    "identity_key" / str8,
    "signing_key" / str8,
    "signature" / str8,
    "one_time_keys" / PrefixedArray(Int16ub, ONE_TIME_KEY),
)

KEY_REQUEST = Struct(
    "claim" / Flag,
    "user" / str16,
    "device" / str16,
)

HELLO = 0x01
HELLO_OK = 0x02
LOGIN = 0x03
LOGIN_RESULT = 0x04
SEND = 0x05
SEND_ACK = 0x06
DELIVER = 0x07
DELIVER_ACK = 0x08
SYNC = 0x09
SYNC_RESULT = 0x0A
BUNDLE = 0x0B
DELIVER_BUNDLE = 0x0C
HEADS = 0x0D
PING = 0x0E
PONG = 0x0F
ERROR = 0x10
BYE = 0x11
READ = 0x12
RECEIPT = 0x13
RECEIPTS_QUERY = 0x14
RECEIPTS_RESULT = 0x15
TYPING = 0x16
TYPING_NOTICE = 0x17
PRESENCE = 0x18
PRESENCE_NOTICE = 0x19
QUERY = 0x1A
QUERY_RESULT = 0x1B
KEYS_UPLOAD = 0x1C
KEYS_QUERY = 0x1D
KEYS_RESULT = 0x1E

BODIES = {
    HELLO: Struct(
        "min_version" / Int8ub,
        "max_version" / Int8ub,
        "agent" / str16,
    ),
    HELLO_OK: Struct(
        "version" / Int8ub,
        "max_frame" / Int32ub,
        "heartbeat_ms" / Int32ub,
        "agent" / str16,
    ),
    LOGIN: Struct(
        "method" / Int8ub,
        "user" / str16,
        "device" / str16,
        "secret" / bytes16,
    ),
    LOGIN_RESULT: Struct(
        "status" / Int16ub,
        "server_time" / Int64ub,
        "resume_token" / bytes16,
        "reason" / str16,
    ),
    SEND: Struct(
        "client_msg_id" / Int64ub,
        "target_type" / Int8ub,
        "target" / str16,
        "content_type" / str8,
        "body" / bytes32,
    ),
    SEND_ACK: Struct(
        "client_msg_id" / Int64ub,
        "status" / Int16ub,
        "server_id" / Int64ub,
        "seq" / Int64ub,
        "sent_at" / Int64ub,
        "count" / Int16ub,
        "conversation" / str16,
        "reason" / str16,
    ),
    DELIVER: Struct(
        "message" / MESSAGE,
    ),
    DELIVER_ACK: Struct(
        "seq" / Int64ub,
        "conversation" / str16,
    ),
    SYNC: Struct(
        "request_id" / Int32ub,
        "flags" / Int8ub,
        "limit" / Int16ub,
        "cursors" / PrefixedArray(Int16ub, CURSOR),
    ),
    SYNC_RESULT: Struct(
        "request_id" / Int32ub,
        "more" / Flag,
        "ranges" / PrefixedArray(Int16ub, RANGE),
        "messages" / PrefixedArray(Int16ub, MESSAGE),
    ),
    BUNDLE: Struct(
        "client_msg_id" / Int64ub,
        "target_type" / Int8ub,
        "target" / str16,
        "items" / PrefixedArray(Int16ub, ITEM),
    ),
    DELIVER_BUNDLE: Struct(
        "messages" / PrefixedArray(Int16ub, MESSAGE),
    ),
    HEADS: Struct(
        "heads" / PrefixedArray(Int16ub, CURSOR),
    ),
    PING: Struct(
        "nonce" / Int64ub,
    ),
    PONG: Struct(
        "nonce" / Int64ub,
    ),
    ERROR: Struct(
        "code" / Int16ub,
        "reason" / str16,
    ),
    BYE: Struct(
        "code" / Int16ub,
        "reason" / str16,
    ),
    READ: Struct(
        "seq" / Int64ub,
        "conversation" / str16,
    ),
    RECEIPT: Struct(
        "seq" / Int64ub,
        "conversation" / str16,
        "user" / str16,
        "device" / str16,
    ),
    RECEIPTS_QUERY: Struct(
        "request_id" / Int32ub,
        "conversation" / str16,
        "seqs" / PrefixedArray(Int16ub, Int64ub),
    ),
    RECEIPTS_RESULT: Struct(
        "request_id" / Int32ub,
        "status" / Int16ub,
        "conversation" / str16,
        "counts" / PrefixedArray(Int16ub, READ_COUNT),
        "readers" / PrefixedArray(Int16ub, READ_MARK),
    ),
    TYPING: Struct(
        "active" / Flag,
        "conversation" / str16,
    ),
    TYPING_NOTICE: Struct(
        "active" / Flag,
        "conversation" / str16,
        "user" / str16,
        "device" / str16,
    ),
    PRESENCE: Struct(
        "status" / Int8ub,
        "text" / str16,
    ),
    PRESENCE_NOTICE: Struct(
        "status" / Int8ub,
        "user" / str16,
        "text" / str16,
    ),
    QUERY: Struct(
        "request_id" / Int32ub,
        "what" / Int8ub,
        "target" / str16,
    ),
    QUERY_RESULT: Struct(
        "request_id" / Int32ub,
        "status" / Int16ub,
        "reason" / str16,
        "entries" / PrefixedArray(Int16ub, ENTRY),
    ),
    KEYS_UPLOAD: Struct(
        "request_id" / Int32ub,
        "keys" / DEVICE_KEYS,
    ),
    KEYS_QUERY: Struct(
        "request_id" / Int32ub,
        "requests" / PrefixedArray(Int16ub, KEY_REQUEST),
    ),
    KEYS_RESULT: Struct(
        "request_id" / Int32ub,
        "status" / Int16ub,
        "unclaimed" / Int32ub,
        "reason" / str16,
        "devices" / PrefixedArray(Int16ub, DEVICE_KEYS),
    ),
}
"""Packet kind -> construct declaration of its body."""

CLIENT_TO_SERVER = "client->server"
SERVER_TO_CLIENT = "server->client"
EITHER_WAY = "either way"

DIRECTION = {
    HELLO: CLIENT_TO_SERVER,
    HELLO_OK: SERVER_TO_CLIENT,
    LOGIN: CLIENT_TO_SERVER,
    LOGIN_RESULT: SERVER_TO_CLIENT,
    SEND: CLIENT_TO_SERVER,
    SEND_ACK: SERVER_TO_CLIENT,
    DELIVER: SERVER_TO_CLIENT,
    DELIVER_ACK: CLIENT_TO_SERVER,
    SYNC: CLIENT_TO_SERVER,
    SYNC_RESULT: SERVER_TO_CLIENT,
    BUNDLE: CLIENT_TO_SERVER,
    DELIVER_BUNDLE: SERVER_TO_CLIENT,
    HEADS: SERVER_TO_CLIENT,
    PING: EITHER_WAY,
    PONG: EITHER_WAY,
    ERROR: SERVER_TO_CLIENT,
    BYE: EITHER_WAY,
    READ: CLIENT_TO_SERVER,
    RECEIPT: SERVER_TO_CLIENT,
    RECEIPTS_QUERY: CLIENT_TO_SERVER,
    RECEIPTS_RESULT: SERVER_TO_CLIENT,
    TYPING: CLIENT_TO_SERVER,
    TYPING_NOTICE: SERVER_TO_CLIENT,
    PRESENCE: CLIENT_TO_SERVER,
    PRESENCE_NOTICE: SERVER_TO_CLIENT,
    QUERY: CLIENT_TO_SERVER,
    QUERY_RESULT: SERVER_TO_CLIENT,
    KEYS_UPLOAD: CLIENT_TO_SERVER,
    KEYS_QUERY: CLIENT_TO_SERVER,
    KEYS_RESULT: SERVER_TO_CLIENT,
}
"""Packet kind -> which peer sends it (the sessions' tables of accepted kinds agree)."""

# Field values with a fixed meaning.

LOGIN_PASSWORD = 1
"""``secret`` is the user's password, in UTF-8. After too many failed attempts for the name or from the address the server answers RATE_LIMITED, unchecked, with a reason saying in how many seconds to try again; a disabled account's right password gets AUTH_FAILED "this account is disabled"."""
LOGIN_TOKEN = 2
"""``secret`` is the resume token from the last ``LoginResult`` (each login rotates it; an expired
or revoked one is refused with AUTH_FAILED, and the client logs in with its password again)."""
LOGIN_CERTIFICATE = 3
"""``secret`` is empty: the TLS client certificate the server verified against its
``--tls-client-ca`` is the proof.  Its subject common name must equal ``user``, an existing
account; anything else (no certificate, another name, no client CA) is refused with AUTH_FAILED."""

TARGET_USER = 1
"""``target`` is a user name: the message goes to the direct conversation with that user."""
TARGET_CONVERSATION = 2
"""``target`` is a conversation id."""
TARGET_NEW_GROUP = 3
"""``target`` is empty: the server creates a group conversation (the first item must be a
``imkit/group.create`` operation) and names it in the ack's ``conversation``."""

SYNC_SERVER_CURSORS = 0x01
"""Conversations missing from ``cursors`` start at this device's server-side cursor, not at 0."""
SYNC_ONLY_LISTED = 0x02
"""Sync only the conversations in ``cursors`` (filling a gap), not every conversation."""

PRESENCE_OFFLINE = 0
"""Offline, or invisible: the server sends it for a user's last device going away, too."""
PRESENCE_ONLINE = 1
PRESENCE_AWAY = 2
PRESENCE_BUSY = 3

QUERY_CONTACTS = 1
"""Entries: one per user the asker has a relation with; ``state`` is a RELATION_* value."""
QUERY_MEMBERS = 2
"""``target`` is a group: one entry per current member, ``state`` a ROLE_* value, ``seq`` the
sequence of the event that made them a member, ``detail`` empty."""
QUERY_GROUPS = 3
"""Entries: one per group the asker belongs to; ``name`` is its id, ``seq`` its head, ``detail``
its title."""

RELATION_NONE = 0
RELATION_CONTACT = 1
RELATION_BLOCKED = 2

ROLE_MEMBER = 0
ROLE_OWNER = 1

# Operations: message items the server applies as well as stores -------------------------------
#
# A message whose content type is one of these is a sequenced event of its conversation: it is
# stored and delivered like any message (so every member and device sees it at the same place in
# the conversation's order), and the server applies it in the same transaction.  Any other
# content type beginning with ``imkit/`` is refused.

OPERATION_PREFIX = "imkit/"

CONTACT_ADD = "imkit/contact.add"
"""In a direct conversation: the sender makes the other user a contact."""
CONTACT_REMOVE = "imkit/contact.remove"
"""In a direct conversation: the sender removes the other user from their contacts."""
CONTACT_BLOCK = "imkit/contact.block"
"""In a direct conversation: no more messages pass between the two, either way, until the sender
unblocks (operations such as recall still do)."""
CONTACT_UNBLOCK = "imkit/contact.unblock"
GROUP_CREATE = "imkit/group.create"
"""First item sent to TARGET_NEW_GROUP: the group's title and first members (besides the sender,
who becomes its owner)."""
GROUP_ADD = "imkit/group.add"
"""Any member adds users to the group."""
GROUP_REMOVE = "imkit/group.remove"
"""The owner removes members; they receive this event, and nothing after it."""
GROUP_LEAVE = "imkit/group.leave"
"""The sender leaves; if it was the owner, the longest-standing member becomes owner."""
RECALL = "imkit/recall"
"""Unsend one's own message within the server's recall window: its stored body is erased."""
EDIT = "imkit/edit"
"""Replace one's own message within the server's edit window; devices show the newest edit."""
RETENTION = "imkit/retention"
"""Messages of this conversation are pruned ``seconds`` after they were sent (0: the server's
default).  Any member of a direct conversation, or a group's owner, may set it."""
RECALLED = "imkit/recalled"
"""What a recalled message's content type becomes in the store (its body becomes empty)."""

NO_BODY = Struct()
USER_LIST = Struct(
    "users" / PrefixedArray(Int16ub, str16),
)

OPERATION_BODIES = {
    CONTACT_ADD: NO_BODY,
    CONTACT_REMOVE: NO_BODY,
    CONTACT_BLOCK: NO_BODY,
    CONTACT_UNBLOCK: NO_BODY,
    GROUP_CREATE: Struct(
        "title" / str16,
        "users" / PrefixedArray(Int16ub, str16),
    ),
    GROUP_ADD: USER_LIST,
    GROUP_REMOVE: USER_LIST,
    GROUP_LEAVE: NO_BODY,
    RECALL: Struct(
        "seq" / Int64ub,
    ),
    EDIT: Struct(
        "seq" / Int64ub,
        "content_type" / str8,
        "body" / bytes32,
    ),
    RETENTION: Struct(
        "seconds" / Int32ub,
    ),
    RECALLED: NO_BODY,
}
"""Operation content type -> construct declaration of its body."""
