"""
The thin Twisted adapter between one connection and the client's sans-IO ``ClientCore``.

The core outlives its connections (it keeps the outbox and the positions); each connection gets a
new ``IMClientProtocol`` around the same core.  The protocol feeds received bytes in, writes what
the core wants out in one ``transport.write`` per reactor turn, and owns the one DelayedCall that
drives the core's deadlines.  What the events mean to the application is its observer's business.
"""

from __future__ import annotations

from typing import Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from imkit.client.timer import DeadlineTimer
from imkit.session import events
from imkit.session.client import READY, ClientCore
from imkit.wire import codec, packets
from imkit.wire.errors import ErrorCode


class SessionObserver(TypingProtocol):
    """Whoever owns the core (``IMClient``) hears about each connection through these."""

    def session_started(self, protocol: IMClientProtocol) -> None: ...

    def session_events(self, protocol: IMClientProtocol, found: list[Any]) -> None: ...

    def session_ended(self, protocol: IMClientProtocol, reason: Failure) -> None: ...


class IMClientProtocol(Protocol):
    log = Logger()

    def __init__(self, core: ClientCore, clock: Any, observer: SessionObserver) -> None:
        self.core = core
        self.clock = clock
        self.observer = observer
        self._timer = DeadlineTimer(clock, core.next_deadline, self._deadline_reached)
        self._flush_call: IDelayedCall | None = None
        self._dispatching = False
        self._closing = False

    # Connection events -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.core.connection_made()
        self.observer.session_started(self)
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._dispatch(self.core.receive_data(data))
        self.flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._timer.cancel()
        self._cancel_flush()
        self.core.connection_lost()
        self.observer.session_ended(self, reason)

    def _deadline_reached(self) -> None:
        self._dispatch(self.core.handle_timer())
        self.flush()

    def _dispatch(self, found: list[Any]) -> None:
        """Hand the core's events to the observer; output they cause is flushed by our caller."""
        if not found:
            return
        self._dispatching = True
        try:
            self.observer.session_events(self, found)
        finally:
            self._dispatching = False
        for event in found:
            if isinstance(event, events.CloseConnection):
                self.abort(event.reason)
                break

    # Output ------------------------------------------------------------------------------------

    def output_ready(self) -> None:
        """
        The application gave the core something to do (a send, say): write it at the end of this
        reactor turn, together with anything else that turns up in the same turn.
        """
        if self._closing or self._dispatching:
            return  # closed, or about to be flushed by the event being handled
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write everything the core has for the wire, then re-arm the timer."""
        self._cancel_flush()
        if self._closing or self.transport is None:
            return
        data = self.core.data_to_send()
        if data:
            self.transport.write(data)
        self._timer.arm()

    def _cancel_flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()

    # Ending ------------------------------------------------------------------------------------

    def say_goodbye(self, reason: str = "client stopping") -> None:
        """
        Write the pending delivery acks and a Bye, and write nothing after them: the server then
        records our positions and knows the close was deliberate.  The caller closes the transport.
        """
        if self._closing:
            return
        self.core.ack_now()
        self.flush()
        if self.core.state == READY:
            self.transport.write(codec.encode(packets.Bye(int(ErrorCode.OK), reason)))
        self._stop_writing()

    def abort(self, reason: str) -> None:
        """Drop the connection now (the server is silent or broke the protocol); it will be replaced."""
        if self._closing:
            return
        self.log.info("dropping the connection to the server: {reason}", reason=reason)
        self._stop_writing()
        self.transport.abortConnection()

    def _stop_writing(self) -> None:
        self._closing = True
        self._timer.cancel()
        self._cancel_flush()


class IMClientFactory(Factory):
    """Builds each new connection's protocol around the one shared core."""

    noisy = False

    def __init__(self, core: ClientCore, clock: Any, observer: SessionObserver) -> None:
        self.core = core
        self.clock = clock
        self.observer = observer

    def buildProtocol(self, addr: Any) -> IMClientProtocol:
        protocol = IMClientProtocol(self.core, self.clock, self.observer)
        protocol.factory = self
        return protocol
