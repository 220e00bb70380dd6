"""
The thin Twisted adapter between a transport and a sans-IO ``ServerConnection``.

It feeds received bytes in, hands events to the hub, writes whatever the connection wants out in
one ``transport.write`` per reactor turn, and owns the connection's one ``DelayedCall``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from imkit.server.hub import Hub
from imkit.server.limits import ConnectionCount, LogThrottle, OutboundBuffer
from imkit.session.server import CLOSED, ServerConnection
from imkit.session.settings import ServerSettings
from imkit.tls import client_certificate_user
from imkit.wire.errors import ErrorCode


_LINGER = 10.0
"""Seconds a closing connection has to take what was written to it before it is aborted."""


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


@implementer(IHandshakeListener, IPushProducer)
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
        self._outbound = OutboundBuffer(settings.max_outbound_buffer)
        self._producing = False
        self._handshake: IDelayedCall | None = None
        self._host: str | None = None
        self._aborted = False
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        name = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.session = ServerConnection(self.clock, self.settings, peer=name)
        self.session.on_output = self._output_ready
        self._arm()
        self._guard(str(getattr(peer, "host", peer)))

    def handshakeCompleted(self) -> None:
        """TLS is up: remember whom a verified client certificate names, for LOGIN_CERTIFICATE."""
        self._cancel_handshake()
        user = client_certificate_user(self.transport)
        if user is not None and self.session is not None:
            self.hub.certificate_users[self.session] = user

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
        if data and not self._write(data):
            return  # a slow reader, dropped
        if session.state == CLOSED:
            self._cancel_timer()
            self._close()
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
        self._aborted = True  # gone: nothing more to write, close or abort
        self._cancel_timer()
        self._cancel_handshake()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self._outbound.clear()
        self._producing = False
        if self._host is not None:
            self.factory.per_ip.remove(self._host)
            self._host = None
        if self.session is not None:
            self.hub.connection_lost(self.session)

    # Resource limits of the connection itself (imkit.server.limits) ----------------------------

    def _guard(self, host: str) -> None:
        """Count the connection against its address, start the TLS handshake deadline, and
        have the transport tell us when the peer does not read fast enough."""
        factory = getattr(self, "factory", None)
        per_ip = getattr(factory, "per_ip", None)
        if ISSLTransport.providedBy(self.transport) and self.settings.handshake_timeout > 0:
            self._handshake = self.clock.callLater(self.settings.handshake_timeout, self._handshake_overdue)
        if per_ip is not None:
            self._host = host
            count = per_ip.add(host)
            if per_ip.over(count):
                factory.refuse(self, host, count)
                return
        self.transport.registerProducer(self, True)
        self._producing = True

    def _handshake_overdue(self) -> None:
        self._handshake = None
        factory = getattr(self, "factory", None)
        if factory is not None and hasattr(factory, "stats"):
            factory.stats["handshake_timeouts"] += 1
            if factory.log_throttle.allow(("handshake", self._host), self.clock.seconds()):
                self.log.info("dropping {peer}: no TLS handshake within {timeout} s", peer=self.session.peer, timeout=self.settings.handshake_timeout)
        if self.session is not None:
            self.session.close(ErrorCode.IDLE_TIMEOUT, "no TLS handshake in time", say_bye=False)
        self._cancel_timer()
        self._outbound.clear()
        self._aborted = True
        self.transport.abortConnection()

    def _cancel_handshake(self) -> None:
        call, self._handshake = self._handshake, None
        if call is not None and call.active():
            call.cancel()

    def _write(self, data: bytes) -> bool:
        """Write, or hold while the transport is paused; False if that drops a slow reader."""
        outbound = self._outbound
        if not outbound.paused and not outbound.size:
            self.transport.write(data)
            return True
        if self._aborted:
            return True  # the connection is gone: nothing to hold
        if outbound.hold(data):
            return True
        self._drop_slow_reader()
        return False

    def _drop_slow_reader(self) -> None:
        session = self.session
        assert session is not None
        limit = self._outbound.limit
        self._outbound.clear()
        factory = getattr(self, "factory", None)
        if factory is not None and hasattr(factory, "stats"):
            factory.stats["slow_readers"] += 1
        # One line in the log (the hub's "closing ..."), nothing more for a reader that cannot take it.
        found = session.fail(ErrorCode.SLOW_READER, f"slow reader: more than {limit} bytes waiting to be sent")
        self.hub.handle(session, [found])
        session.data_to_send()
        self._cancel_timer()
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        """
        Close after what was written (and what we hold for a slow reader, within its limit);
        ``abort``: at once, dropping it.  A peer that was not reading and does not take what is
        left within ``_LINGER`` seconds is aborted then, so such a close never hangs on.
        """
        if self._aborted:
            return
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()  # TLS waits for its producer to go before closing
        outbound = self._outbound
        if abort:
            outbound.clear()
            self._aborted = True
            self.transport.abortConnection()
            return
        paused = outbound.paused
        if outbound.size:
            self.transport.write(outbound.take())
        self.transport.loseConnection()
        if paused and self._linger is None:
            # The peer was not reading: give it a little while for the rest, not for ever.
            self._linger = self.clock.callLater(_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        if not self._aborted:
            self._aborted = True
            self.transport.abortConnection()

    def pauseProducing(self) -> None:
        """The transport's buffer is full: hold what we write (up to max_outbound_buffer)."""
        self._outbound.paused = True

    def resumeProducing(self) -> None:
        outbound = self._outbound
        outbound.paused = False
        if outbound.size and self.transport is not None:
            self.transport.write(outbound.take())

    def stopProducing(self) -> None:
        self._outbound.clear()


class IMServerFactory(Factory):
    """Builds one IMServerProtocol per accepted connection, all sharing one hub."""

    log = Logger()

    def __init__(self, hub: Hub, settings: ServerSettings, clock: Any) -> None:
        self.hub = hub
        self.settings = settings
        self.clock = clock
        self.coalescer = WriteCoalescer(clock)
        self.per_ip = ConnectionCount(settings.max_connections_per_ip)
        """Open connections per IP address."""
        self.log_throttle = LogThrottle()
        self.stats = {"refused": 0, "handshake_timeouts": 0, "slow_readers": 0}
        """Connections refused (too many from one address), dropped mid-handshake, dropped as slow readers."""

    def buildProtocol(self, addr: Any) -> IMServerProtocol:
        protocol = IMServerProtocol(self.hub, self.settings, self.clock, self.coalescer)
        protocol.factory = self
        return protocol

    def refuse(self, protocol: IMServerProtocol, host: str, count: int) -> None:
        """
        Too many connections from ``host``: say so in an Error frame and close (after the TLS
        handshake, which the handshake deadline bounds).  Past twice the limit, a flood gets no
        answer at all: the connection is dropped at once.
        """
        self.stats["refused"] += 1
        limit = self.per_ip.limit
        if self.log_throttle.allow(("ip", host), self.clock.seconds()):
            suppressed = self.log_throttle.take_suppressed(("ip", host))
            self.log.warn(
                "refusing connections from {host}: {count} open, at most {limit} ({suppressed} more refused since the last line)",
                host=host, count=count - 1, limit=limit, suppressed=suppressed,
            )
        session = protocol.session
        assert session is not None
        if count > 2 * limit:
            session.close(ErrorCode.TOO_MANY_CONNECTIONS, "too many connections", say_bye=False)
            session.data_to_send()
            protocol._cancel_timer()
            protocol._cancel_handshake()
            protocol._aborted = True
            protocol.transport.abortConnection()
            return
        session.fail(ErrorCode.TOO_MANY_CONNECTIONS, f"too many connections from {host} (at most {limit}); try again later")
        protocol.flush()
