"""
What a send, a login or a query can end with: a receipt, or one of these errors.

The errors carry the server's ``ErrorCode`` (a plain int when the server sent a code this imkit
does not know), so applications branch on codes, never on reason strings.
"""

from __future__ import annotations

import attrs

from imkit.wire.errors import ErrorCode
from imkit.wire.packets import SendAck


def error_code(code: int) -> ErrorCode | int:
    """The ErrorCode for ``code``, or ``code`` itself if a newer server sent one we do not know."""
    try:
        return ErrorCode(code)
    except ValueError:
        return code


@attrs.frozen
class Receipt:
    """
    The server stored a send: as ``seq``..``seq + count - 1`` of ``conversation``.

    ``server_id`` is the id of the first stored message; ``sent_at`` is the server's time of
    storing, in milliseconds since the epoch.
    """

    client_msg_id: int
    server_id: int
    conversation: str
    seq: int
    sent_at: int
    count: int

    @classmethod
    def from_ack(cls, ack: SendAck) -> Receipt:
        return cls(ack.client_msg_id, ack.server_id, ack.conversation, ack.seq, ack.sent_at, ack.count)


class IMClientError(Exception):
    """Base class of the errors the client library reports through its Deferreds."""


class LoginFailed(IMClientError):
    """The server refused our login (a wrong password, say); the client stopped reconnecting."""

    def __init__(self, code: ErrorCode | int, reason: str) -> None:
        super().__init__(f"login refused ({_name(code)}): {reason}")
        self.code = code
        self.reason = reason


class SendRejected(IMClientError):
    """The server refused a send for good (unknown recipient, not a member, too large); nothing was stored."""

    def __init__(self, client_msg_id: int, code: ErrorCode | int, reason: str) -> None:
        super().__init__(f"send refused ({_name(code)}): {reason}")
        self.client_msg_id = client_msg_id
        self.code = code
        self.reason = reason


class SendTimeout(IMClientError):
    """
    No acknowledgement within the send timeout; the client stopped resending.

    The message may or may not have been stored: the server may have stored it and its
    acknowledgement been lost.
    """

    def __init__(self, client_msg_id: int, timeout: float | None) -> None:
        super().__init__(f"no acknowledgement from the server within {timeout:g} seconds" if timeout else "no acknowledgement")
        self.client_msg_id = client_msg_id
        self.timeout = timeout


class ClientStopped(IMClientError):
    """The client was stopped before this could complete (a stopped client is not sending)."""

    def __init__(self, what: str = "the client was stopped") -> None:
        super().__init__(what)


class QueryFailed(IMClientError):
    """
    The server answered a query with an error: ``code`` NOT_A_MEMBER when asking about a
    conversation or group the user is not in (or that does not exist: the answer is the same).
    """

    def __init__(self, code: ErrorCode | int, reason: str) -> None:
        super().__init__(f"query refused ({_name(code)}): {reason}")
        self.code = code
        self.reason = reason


class QueryUnanswered(IMClientError):
    """
    A query got no answer: it timed out, or the connection was not there or went away.  Queries
    are never resent by the client; ask again (after ``loggedIn()``) if the answer still matters.
    """


class QueryTimeout(QueryUnanswered):
    """No answer to a query within ``ClientSettings.request_timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no answer from the server within {timeout:g} seconds")
        self.timeout = timeout


class ConnectionLost(QueryUnanswered):
    """There was no logged-in connection to ask on, or it ended before the answer came."""

    def __init__(self, what: str = "the connection to the server was lost before the answer came") -> None:
        super().__init__(what)


class StateFileError(IMClientError):
    """The client's state file cannot be read or written; the message names the file and the fix."""


def _name(code: ErrorCode | int) -> str:
    return code.name if isinstance(code, ErrorCode) else str(code)
