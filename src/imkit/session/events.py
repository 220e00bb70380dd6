"""
What the sans-IO sessions tell the layer above.

Server-side events go to the hub (which owns the store); client-side events go to the client
library (which owns the Deferreds and the application callbacks).
"""

from __future__ import annotations

from typing import Any

import attrs

from imkit.model import Message
from imkit.wire.packets import Bundle, SendAck, Send, Sync


# Server side -----------------------------------------------------------------------------------


@attrs.frozen
class LoginRequested:
    method: int
    user: str
    device: str
    secret: bytes = attrs.field(repr=False)


@attrs.frozen
class SendRequested:
    packet: Send | Bundle


@attrs.frozen
class DeliveryAcked:
    conversation: str
    seq: int


@attrs.frozen
class SyncRequested:
    packet: Sync


@attrs.frozen
class RequestReceived:
    """
    A packet outside the reliable stream: a read mark, typing, presence, or a query.  The hub
    answers (or forwards) it; nothing here is stored by the session.
    """

    packet: Any


@attrs.frozen
class WindowOpened:
    """Deliveries were held back for these conversations while the window was full."""

    conversations: tuple[str, ...]


@attrs.frozen
class ConnectionClosing:
    """The session has ended (protocol error, timeout, Bye); close the transport after writing."""

    code: int
    reason: str


# Client side -----------------------------------------------------------------------------------


@attrs.frozen
class LoggedIn:
    user: str
    device: str
    server_time: int


@attrs.frozen
class LoginRejected:
    code: int
    reason: str


@attrs.frozen
class SendAcknowledged:
    client_msg_id: int
    ack: SendAck


@attrs.frozen
class SendRejected:
    """The server refused the send for good (``ack.status`` says why); it was not stored."""

    client_msg_id: int
    ack: SendAck


@attrs.frozen
class SendExpired:
    """No acknowledgement within the send timeout; the client stopped resending."""

    client_msg_id: int


@attrs.frozen
class MessagesDelivered:
    """Messages for the application, in sequence order per conversation, each exactly once."""

    messages: tuple[Message, ...]


@attrs.frozen
class NoticeReceived:
    """An ephemeral packet from the server: a receipt, a typing notice or a presence notice."""

    packet: Any


@attrs.frozen
class AnswerReceived:
    """The server's answer to a query the application sent (matched by ``request_id``)."""

    packet: Any


@attrs.frozen
class HistoryUnavailable:
    """
    Messages ``after``+1 .. ``upto`` of a conversation will never arrive: pruned by retention,
    before this user joined, or older than a new device's history depth.  Said, never silent.
    """

    conversation: str
    after: int
    upto: int


@attrs.frozen
class CaughtUp:
    """The sync after login has finished: everything stored before it has been delivered."""


@attrs.frozen
class ServerError:
    code: int
    reason: str


@attrs.frozen
class CloseConnection:
    """The client session gave up on this connection (silence, protocol error); reconnect."""

    reason: str
