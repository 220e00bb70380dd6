"""Protocol errors and the stable error codes carried by ``Error``, ``SendAck`` and ``LoginResult``."""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """
    Stable numeric codes: clients branch on these, so a number never changes meaning.

    0 means success wherever a status field carries one of these codes.

    Codes 50 and up come from the server's resource limits.  ``TOO_MANY_CONNECTIONS`` (from one
    IP address, or as one user) and ``RATE_LIMITED`` mean "not now": try again later (a
    ``SendAck`` with ``RATE_LIMITED`` says when, in ``sent_at``).  ``SLOW_READER``: the client did
    not read what it was sent fast enough and was disconnected.
    """

    OK = 0
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    UNEXPECTED_PACKET = 4
    UNKNOWN_KIND = 5
    AUTH_FAILED = 10
    TOO_MANY_DEVICES = 11
    UNKNOWN_RECIPIENT = 20
    NOT_A_MEMBER = 21
    INVALID_TARGET = 22
    TOO_LARGE = 23
    REJECTED = 24
    NOT_ALLOWED = 25
    INVALID_OPERATION = 26
    IDLE_TIMEOUT = 30
    SHUTTING_DOWN = 31
    TOO_MANY_UNACKED = 32
    INTERNAL_ERROR = 40
    TOO_MANY_CONNECTIONS = 50
    """Too many connections from this IP address, or logged in as this user: try again later."""
    RATE_LIMITED = 51
    """Over a rate limit.  In a ``SendAck``, ``sent_at`` is the server time (ms) to send again."""
    SLOW_READER = 52
    """The client read too slowly: the server's buffer for it was full."""


class ProtocolError(Exception):
    """
    The peer broke the protocol: the connection cannot continue.

    ``code`` is the ErrorCode sent to the peer in an ``Error`` frame before closing.
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


class DecodeError(ProtocolError):
    """Bytes that are not a valid frame or packet body (truncated, garbled, trailing data)."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> None:
        super().__init__(code, reason)


class EncodeError(ValueError):
    """A packet object that cannot be put on the wire (a value out of its field's range)."""
