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
"""

from imkit.client.endpoint import development_ca, tls_endpoint
from imkit.client.handoff import MessageStream
from imkit.client.protocol import IMClientFactory, IMClientProtocol
from imkit.client.results import (
    ClientStopped,
    IMClientError,
    LoginFailed,
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
    "ErrorCode",
    "IMClient",
    "IMClientError",
    "IMClientFactory",
    "IMClientProtocol",
    "Item",
    "LoginFailed",
    "Message",
    "MessageStream",
    "Receipt",
    "SendRejected",
    "SendTimeout",
    "StateFileError",
    "development_ca",
    "tls_endpoint",
]
