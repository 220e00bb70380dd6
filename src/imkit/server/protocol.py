"""
The thin Twisted adapter between a transport and a sans-IO ``ServerConnection``.

It feeds received bytes in, hands events to the hub, writes whatever the connection wants out in
one ``transport.write`` per reactor turn, and owns the connection's one ``DelayedCall``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from imkit.server.hub import Hub
from imkit.session.server import CLOSED, ServerConnection
from imkit.session.settings import ServerSettings


class WriteCoalescer:
    """
    Collects the protocols that have output and flushes them all in one call scheduled for the
    end of this reactor turn, so a fan-out to many connections, or many acks to one, costs one
    write per connection.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._dirty: dict[int, Any] = {}
        self._call: IDelayedCall | None = None

    def schedule(self, protocol: Any) -> None:
        self._dirty[id(protocol)] = protocol
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write out every protocol that has output (normally called by the reactor)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        dirty, self._dirty = self._dirty, {}
        for protocol in dirty.values():
            protocol.flush()

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._dirty.clear()


class IMServerProtocol(Protocol):
    log = Logger()

    def __init__(self, hub: Hub, settings: ServerSettings, clock: Any, coalescer: WriteCoalescer) -> None:
        self.hub = hub
        self.settings = settings
        self.clock = clock
        self.coalescer = coalescer
        self.session: ServerConnection | None = None
        self._timer: IDelayedCall | None = None
        self._receiving = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        name = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.session = ServerConnection(self.clock, self.settings, peer=name)
        self.session.on_output = self._output_ready
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        self._receiving = True
        try:
            found = session.receive_data(data)
            if found:
                self.hub.handle(session, found)
        finally:
            self._receiving = False
        self.flush()

    def _output_ready(self) -> None:
        if not self._receiving:
            self.coalescer.schedule(self)

    def flush(self) -> None:
        session = self.session
        if session is None or self.transport is None:
            return
        data = session.data_to_send()
        if data:
            self.transport.write(data)
        if session.state == CLOSED:
            self._cancel_timer()
            self.transport.loseConnection()
        else:
            self._arm()

    def _arm(self) -> None:
        assert self.session is not None
        deadline = self.session.next_deadline()
        timer = self._timer
        if deadline is None:
            self._cancel_timer()
            return
        if timer is not None and timer.active():
            if timer.getTime() <= deadline:
                return  # fires early at worst; _on_timer re-arms
            timer.cancel()
        self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        session = self.session
        assert session is not None
        found = session.handle_timer()
        if found:
            self.hub.handle(session, found)
        self.flush()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_timer()
        if self.session is not None:
            self.hub.connection_lost(self.session)


class IMServerFactory(Factory):
    """Builds one IMServerProtocol per accepted connection, all sharing one hub."""

    def __init__(self, hub: Hub, settings: ServerSettings, clock: Any) -> None:
        self.hub = hub
        self.settings = settings
        self.clock = clock
        self.coalescer = WriteCoalescer(clock)

    def buildProtocol(self, addr: Any) -> IMServerProtocol:
        protocol = IMServerProtocol(self.hub, self.settings, self.clock, self.coalescer)
        protocol.factory = self
        return protocol
