"""
The server as a Twisted service: open the store, then listen; on stop, say goodbye, stop
listening, flush and close the store.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Sequence

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger

from imkit.rules import Policy
from imkit.server.hub import Hub
from imkit.server.protocol import IMServerFactory
from imkit.session.settings import ServerSettings
from imkit.store.interface import IStore, StoreError


class IMServerService(MultiService):
    """
    One hub, one store, any number of listening endpoints.

    Listening starts only once the store is open, so no client is ever acknowledged by a
    server that could not store.  ``whenListening()`` gives the listening ports (tests listen on
    port 0 and ask which port they got).
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        passwords: Any,
        endpoints: Sequence[IStreamServerEndpoint],
        reactor: Any,
        settings: ServerSettings = ServerSettings(),
        policy: Policy = Policy(),
    ) -> None:
        super().__init__()
        self.store = store
        self.reactor = reactor
        self.settings = settings
        self.hub = Hub(store, passwords, reactor, settings, policy)
        self._pruning = task.LoopingCall(self._prune)
        self._pruning.clock = reactor
        self.factory = IMServerFactory(self.hub, settings, reactor)
        self.endpoints = list(endpoints)
        self.ports: list[IListeningPort] = []
        self._listening: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._serving = False
        self.stop_reactor_on_failure = False

    def startService(self) -> None:
        super().startService()
        self._listening = defer.ensureDeferred(self._start())
        self._listening.addErrback(self._could_not_start)

    async def _start(self) -> None:
        await self.store.open()
        self.log.info("store {store} open", store=self.store.description)
        for endpoint in self.endpoints:
            port = await endpoint.listen(self.factory)
            self.ports.append(port)
            address = port.getHost()
            self.log.info("listening on {host}:{port}", host=getattr(address, "host", address), port=getattr(address, "port", ""))
        self._pruning.start(self.settings.prune_interval, now=True)
        self._serving = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(list(self.ports))

    def _prune(self) -> defer.Deferred:
        """Retention: drop what conversations (or the server) keep no longer; errors wait for next time."""
        d = self.hub.prune()
        d.addErrback(lambda failure: self.log.failure("pruning old messages failed", failure))
        return d

    def _could_not_start(self, failure: Any) -> None:
        if failure.check(CannotListenError, StoreError, sqlite3.Error):
            # Configuration, not a bug: one line saying what, no traceback.
            self.log.error("imkit could not start: {reason}", reason=failure.getErrorMessage())
        else:
            self.log.failure("imkit could not start", failure)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)
        if self.stop_reactor_on_failure:
            # Under twistd a server that cannot serve should end, not idle.
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)

    def whenListening(self) -> defer.Deferred:
        """Deferred[list[IListeningPort]], fired once every endpoint is listening."""
        if self._serving:
            return defer.succeed(list(self.ports))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        await super().stopService()
        self._serving = False
        if self._pruning.running:
            self._pruning.stop()
        ports, self.ports = self.ports, []
        await defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
        self.hub.shutdown()
        self.factory.coalescer.flush()
        await self.hub.settle(self.settings.stop_timeout)
        self.hub.write_cursors()  # any a first ack gathered while settling
        await self.store.close()
        self.log.info("store {store} closed", store=self.store.description)
