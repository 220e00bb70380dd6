"""
The imkit client library.

::

    client = IMClient(tls_endpoint(reactor, "localhost:14000", development_ca()), "alice", password)
    client.on_message(lambda message: print(message.sender, message.body))
    client.startService()
    receipt = await client.send(to="bob", body="hello")

``IMClient`` is a Twisted service (add it to a ``MultiService``, or start it yourself).  It stays
connected, resends what the server has not acknowledged, and hands every message of the user's
conversations to the application once, in order (the user's own messages included, from all of
its devices).

Groups, contacts and the other conversation operations are messages too: every member sees them
in the conversation's order, and ``describe`` says what each delivered message means::

    client.on_message(lambda message: print(json.dumps(describe(message).to_json())))
    await client.loggedIn()
    group = await client.create_group("lunch", ["bob", "carol"])
    sent = await client.send(group=group, body="noon?")
    await client.add_members(group, ["dave"])
    for member in await client.members(group):      # queries: answered now, or QueryUnanswered
        print(member.user, member.role)
    client.mark_read(group, sent.seq)                # ephemeral: False when not connected
    await client.leave_group(group)
"""

from imkit.client.conversations import (
    Event,
    GroupInfo,
    Member,
    PresenceNotice,
    ReadState,
    ReceiptNotice,
    TypingNotice,
    describe,
)
from imkit.client.endpoint import development_ca, tls_endpoint
from imkit.client.handoff import MessageStream
from imkit.client.protocol import IMClientFactory, IMClientProtocol
from imkit.client.results import (
    ClientStopped,
    ConnectionLost,
    IMClientError,
    LoginFailed,
    QueryFailed,
    QueryTimeout,
    QueryUnanswered,
    Receipt,
    SendRejected,
    SendTimeout,
    StateFileError,
)
from imkit.client.service import IMClient
from imkit.model import Item, Message
from imkit.session.settings import ClientSettings
from imkit.wire.errors import ErrorCode

__all__ = [
    "ClientSettings",
    "ClientStopped",
    "ConnectionLost",
    "ErrorCode",
    "Event",
    "GroupInfo",
    "IMClient",
    "IMClientError",
    "IMClientFactory",
    "IMClientProtocol",
    "Item",
    "LoginFailed",
    "Member",
    "Message",
    "MessageStream",
    "PresenceNotice",
    "QueryFailed",
    "QueryTimeout",
    "QueryUnanswered",
    "ReadState",
    "Receipt",
    "ReceiptNotice",
    "SendRejected",
    "SendTimeout",
    "StateFileError",
    "TypingNotice",
    "describe",
    "development_ca",
    "tls_endpoint",
]
