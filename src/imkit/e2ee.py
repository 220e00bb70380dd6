"""
End-to-end encryption: what the client and the server agree on (see docs/e2ee.rst).

The server keeps a directory of the devices' public keys (``imkit.server.keys``) and checks the
signatures on them with this module; it never sees a private key nor a plaintext.  The client
side, which holds the private keys and does the encrypting (with vodozemac's Olm and Megolm),
is ``imkit.client.e2ee``.

Everything signed is a statement built here, so the two sides sign and check the same bytes:
a device signs its identity keys (``device_statement``) and each of its one-time keys
(``one_time_key_statement``) with its Ed25519 signing key.  Keys and signatures travel as
unpadded base64, the way vodozemac writes them.

An encrypted message is an ordinary message whose content type is ``ENCRYPTED`` and whose body is
an ``ENVELOPE``: one Megolm ciphertext of the real content type and body (``CONTENT``) for every
recipient, and, for the devices that do not have that Megolm session yet, its key (``SESSION_KEY``)
encrypted to each of them with Olm (``SHARE``).  So keys travel inside the messages they unlock,
with the same delivery guarantees.
"""

from __future__ import annotations

import base64
import binascii

from construct import ConstructError, Int8ub, Int16ub, Int32ub, PascalString, Prefixed, PrefixedArray, GreedyBytes, Struct, Terminated
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ENCRYPTED = "application/vnd.imkit.e2ee"
"""The content type of an encrypted message (never ``application/x-imkit-*``: those name extension
packets, which a server with extensions loaded checks)."""
UNDECRYPTABLE = "application/vnd.imkit.undecryptable"
"""What an encrypted message this device cannot read is handed to the application as: the body is
the reason, in UTF-8 (``IMClient.e2ee.on_undecryptable`` gets the original message too)."""

ENVELOPE_VERSION = 1

_str8 = PascalString(Int8ub, "utf8")
_str16 = PascalString(Int16ub, "utf8")
_bytes32 = Prefixed(Int32ub, GreedyBytes)

SHARE = Struct(
    "user" / _str16,
    "device" / _str16,
    "type" / Int8ub,
    "ciphertext" / _bytes32,
)
"""The Megolm session key for one recipient device: an Olm message (``type`` 0 is a pre-key
message, which also sets up the Olm session; 1 a normal one) of a SESSION_KEY."""

ENVELOPE = Struct(
    "version" / Int8ub,
    "sender_key" / _str8,
    "session_id" / _str8,
    "shares" / PrefixedArray(Int16ub, SHARE),
    "ciphertext" / _bytes32,
    Terminated,
)
"""The body of an ENCRYPTED message: ``sender_key`` is the sending device's Curve25519 identity
key, ``ciphertext`` a Megolm message of session ``session_id`` whose plaintext is a CONTENT."""

CONTENT = Struct(
    "content_type" / _str8,
    "body" / _bytes32,
    Terminated,
)

SESSION_KEY = Struct(
    "sender" / _str16,
    "sender_device" / _str16,
    "recipient" / _str16,
    "recipient_device" / _str16,
    "recipient_key" / _str8,
    "conversation" / _str16,
    "session_id" / _str8,
    "session_key" / _str16,
    Terminated,
)
"""What a SHARE carries: the Megolm session key, bound to who sends with it, where, and to whom."""


class EnvelopeError(ValueError):
    """Bytes that are not a well-formed envelope (or content, or session key)."""


def parse(declaration: Struct, data: bytes):
    try:
        return declaration.parse(data)
    except (ConstructError, UnicodeDecodeError) as error:
        raise EnvelopeError(f"malformed {declaration_name(declaration)}: {error}") from None


def declaration_name(declaration: Struct) -> str:
    return {id(ENVELOPE): "envelope", id(CONTENT): "content", id(SESSION_KEY): "session key"}.get(id(declaration), "record")


# Signed statements -------------------------------------------------------------------------------


def device_statement(user: str, device: str, identity_key: str, signing_key: str) -> bytes:
    """What a device signs to publish its identity keys (names never contain NUL)."""
    return "\x00".join(("imkit-device-keys-v1", user, device, identity_key, signing_key)).encode("utf-8")


def one_time_key_statement(user: str, device: str, key_id: str, key: str) -> bytes:
    return "\x00".join(("imkit-one-time-key-v1", user, device, key_id, key)).encode("utf-8")


def unbase64(text: str) -> bytes:
    """Unpadded (or padded) standard base64 -> bytes; ValueError if it is not."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not base64: {text[:20]!r}") from None


def is_key(text: str) -> bool:
    """A 32-byte public key (Curve25519 or Ed25519) in base64."""
    try:
        return len(unbase64(text)) == 32
    except ValueError:
        return False


def signature_valid(signing_key: str, signature: str, statement: bytes) -> bool:
    """Whether ``signature`` (base64) is ``signing_key``'s (base64 Ed25519) over ``statement``."""
    try:
        public = Ed25519PublicKey.from_public_bytes(unbase64(signing_key))
        raw = unbase64(signature)
        if len(raw) != 64:
            return False
        public.verify(raw, statement)
    except (ValueError, InvalidSignature):
        return False
    return True
