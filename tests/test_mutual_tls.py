"""Mutual TLS: client certificates checked in the handshake, and LOGIN_CERTIFICATE over real loopback TLS.

The handshake tests listen with imkit's server TLS configuration on 127.0.0.1 port 0 and connect
raw TLS clients; the login tests run the twistd plugin's service with IMClients.  Every test
waits until its connections are closed and stops listening, so nothing outlives it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import implementer

from imkit.client import IMClient, tls_endpoint
from imkit.client.results import LoginFailed
from imkit.passwords import Passwords
from imkit.server import tap
from imkit.tls import (
    ServerTLS,
    TLSConfigError,
    client_certificate_user,
    client_tls_options,
    server_tls_options,
)
from imkit.wire import schema
from imkit.wire.errors import ErrorCode

REPO = Path(__file__).resolve().parents[1]
CERTS = REPO / "certs"
CA = str(CERTS / "ca.pem")
CERT = str(CERTS / "server.pem")
KEY = str(CERTS / "server.key")
BOT_CERT = str(CERTS / "client-bot.pem")
BOT_KEY = str(CERTS / "client-bot.key")
PASSWORDS = Passwords.fast_for_tests()


def other_ca_set() -> dict[str, str]:
    """An unrelated CA with its own server and "bot" client certificates, made with certs/generate.py."""
    directory = tempfile.mkdtemp(prefix="imkit-test-")
    generate = [sys.executable, str(CERTS / "generate.py"), "--out", directory]
    subprocess.run(generate, check=True, capture_output=True)
    subprocess.run([*generate, "--client", "bot"], check=True, capture_output=True)
    return {name: os.path.join(directory, name) for name in os.listdir(directory)} | {"dir": directory}


@implementer(IHandshakeListener)
class Peer(Protocol):
    """Records whether its side of the handshake completed; the client says hello, the server echoes."""

    def __init__(self, *, server: bool) -> None:
        self.server = server
        self.handshake_done = False
        self.certificate_user: str | None = None
        self.received = b""
        self.failure = None
        self.lost: defer.Deferred = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        if self.server:
            self.certificate_user = client_certificate_user(self.transport)
        else:
            self.transport.write(b"hello")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.server:
            self.transport.write(data)
        elif self.received == b"hello":
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.failure = reason
        self.lost.callback(None)


class ServerFactory(Factory):
    def __init__(self) -> None:
        self.connected: defer.Deferred = defer.Deferred()

    def buildProtocol(self, addr):
        peer = Peer(server=True)
        self.connected.callback(peer)
        return peer


class HandshakeTests(unittest.TestCase):
    """What the server's TLS layer accepts once it asks for client certificates."""

    @defer.inlineCallbacks
    def connect(self, server_creator, client_creator):
        factory = ServerFactory()
        port = yield SSL4ServerEndpoint(reactor, 0, server_creator, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = Peer(server=False)
        endpoint = wrapClientTLS(client_creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        yield connectProtocol(endpoint, client)
        server = yield factory.connected
        yield defer.gatherResults([client.lost, server.lost])
        return client, server

    def assertServed(self, client: Peer, server: Peer) -> None:
        self.assertTrue(server.handshake_done)
        self.assertEqual(client.received, b"hello")

    def assertRefused(self, client: Peer, server: Peer) -> None:
        # Under TLS 1.3 the client's side of the handshake completes before the server has checked
        # the client's certificate, so only the server's side tells: it never completed, and no
        # byte came back.
        self.assertFalse(server.handshake_done, "server accepted a client it should have refused")
        self.assertEqual(server.received, b"")
        self.assertEqual(client.received, b"")
        server.failure.trap(SSL.Error)

    def bot_client(self, ca=CA, cert=BOT_CERT, key=BOT_KEY):
        return client_tls_options("localhost", ca, client_cert=cert, client_key=key)

    @defer.inlineCallbacks
    def test_verified_certificate_names_its_user(self):
        client, server = yield self.connect(server_tls_options(CERT, KEY, client_ca_path=CA), self.bot_client())
        self.assertServed(client, server)
        self.assertEqual(server.certificate_user, "bot")

    @defer.inlineCallbacks
    def test_client_without_certificate_served_when_optional(self):
        client, server = yield self.connect(
            server_tls_options(CERT, KEY, client_ca_path=CA), client_tls_options("localhost", CA)
        )
        self.assertServed(client, server)
        self.assertIsNone(server.certificate_user)

    @defer.inlineCallbacks
    def test_client_without_certificate_refused_when_required(self):
        client, server = yield self.connect(
            server_tls_options(CERT, KEY, client_ca_path=CA, require_client_cert=True),
            client_tls_options("localhost", CA),
        )
        self.assertRefused(client, server)
        self.assertIn("peer did not return a certificate", server.failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_certificate_from_another_ca_refused(self):
        other = other_ca_set()
        self.addCleanup(shutil.rmtree, other["dir"], ignore_errors=True)
        for required in (False, True):
            client, server = yield self.connect(
                server_tls_options(CERT, KEY, client_ca_path=CA, require_client_cert=required),
                self.bot_client(cert=other["client-bot.pem"], key=other["client-bot.key"]),
            )
            self.assertRefused(client, server)
            self.assertIn("certificate verify failed", server.failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_server_only_certificate_refused_as_client_certificate(self):
        """Signed by the right CA but for serverAuth only: OpenSSL checks the purpose too."""
        client, server = yield self.connect(
            server_tls_options(CERT, KEY, client_ca_path=CA), self.bot_client(cert=CERT, key=KEY)
        )
        self.assertRefused(client, server)
        # The server's alert names the reason: the chain is fine, the purpose is not.
        self.assertIn("unsupported certificate", client.failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_no_client_ca_no_certificate_user(self):
        """Without --tls-client-ca the server neither asks for nor trusts a client certificate."""
        client, server = yield self.connect(server_tls_options(CERT, KEY), self.bot_client())
        self.assertServed(client, server)
        self.assertIsNone(server.certificate_user)

    @defer.inlineCallbacks
    def test_reloadable_configuration_also_verifies(self):
        client, server = yield self.connect(ServerTLS(CERT, KEY, client_ca_path=CA), self.bot_client())
        self.assertEqual(server.certificate_user, "bot")

    def test_required_needs_a_client_ca(self):
        exc = self.assertRaises(TLSConfigError, server_tls_options, CERT, KEY, require_client_cert=True)
        self.assertIn("--tls-client-ca", str(exc))

    def test_bad_client_ca_is_one_line(self):
        exc = self.assertRaises(TLSConfigError, server_tls_options, CERT, KEY, client_ca_path=KEY)
        self.assertNotIn("\n", str(exc))
        self.assertIn("--tls-client-ca", str(exc))

    def test_client_certificate_needs_its_key(self):
        self.assertRaises(TLSConfigError, client_tls_options, "localhost", CA, client_cert=BOT_CERT)
        exc = self.assertRaises(
            TLSConfigError, client_tls_options, "localhost", CA, client_cert=BOT_CERT, client_key=KEY
        )
        self.assertIn("does not belong", str(exc))
        self.assertNotIn("\n", str(exc))

    def test_missing_client_certificate_file(self):
        missing = os.path.join(tempfile.gettempdir(), "imkit-no-such-dir", "bot.pem")
        exc = self.assertRaises(
            TLSConfigError, tls_endpoint, reactor, "localhost:1", CA, client_cert=missing, client_key=BOT_KEY
        )
        self.assertIn(missing, str(exc))


class CertificateLoginTests(unittest.TestCase):
    """LOGIN_CERTIFICATE end to end: the twistd plugin's service and IMClient over loopback TLS."""

    timeout = 60

    def setUp(self) -> None:
        self.clients: list[IMClient] = []
        self.services: list = []

    async def start_server(self, *extra: str, users: tuple[str, ...] = ("bot", "alice")) -> int:
        options = tap.Options()
        options.parseOptions(["--listen", "tls:0:interface=127.0.0.1", "--store", "memory:", *extra])
        service = tap.makeService(options, reactor=reactor, passwords=PASSWORDS)
        service.startService()
        self.services.append(service)
        (port,) = await service.whenListening()
        for name in users:
            await service.store.add_user(name, await PASSWORDS.hash(f"{name}-pw"))
        return port.getHost().port

    def client(self, port: int, user: str, password: str | None, *, cert: bool = True) -> IMClient:
        paths = {"client_cert": BOT_CERT, "client_key": BOT_KEY} if cert else {}
        endpoint = tls_endpoint(reactor, f"localhost:{port}", CA, **paths)
        client = IMClient(endpoint, user, password, reactor=reactor)
        client.startService()
        self.clients.append(client)
        return client

    async def refused(self, client: IMClient) -> LoginFailed:
        try:
            await client.loggedIn()
        except LoginFailed as error:
            return error
        self.fail("the login should have been refused")

    def tearDown(self) -> defer.Deferred:
        async def stop() -> None:
            for client in self.clients:
                await client.stopService()
            for service in self.services:
                await service.stopService()

        return defer.ensureDeferred(stop())

    def test_constant(self) -> None:
        self.assertEqual(schema.LOGIN_CERTIFICATE, 3)

    def test_bot_logs_in_by_certificate_and_sends(self) -> defer.Deferred:
        async def scenario() -> None:
            port = await self.start_server("--tls-client-ca", CA)
            bot = self.client(port, "bot", None)
            await bot.loggedIn()
            receipt = await bot.send(to="alice", body="hello from a certificate")
            self.assertEqual(receipt.seq, 1)
            service = self.services[0]
            (conn,) = service.hub.online("bot")
            self.assertEqual(service.hub.certificate_users[conn], "bot")

        return defer.ensureDeferred(scenario())

    def test_required_client_certificate_and_certificate_login(self) -> defer.Deferred:
        async def scenario() -> None:
            port = await self.start_server("--tls-client-ca", CA, "--tls-require-client-cert")
            await self.client(port, "bot", None).loggedIn()

        return defer.ensureDeferred(scenario())

    def test_certificate_of_another_user_refused(self) -> defer.Deferred:
        async def scenario() -> None:
            port = await self.start_server("--tls-client-ca", CA)
            error = await self.refused(self.client(port, "alice", None))
            self.assertEqual(error.code, ErrorCode.AUTH_FAILED)
            self.assertEqual(self.services[0].hub.online("alice"), ())

        return defer.ensureDeferred(scenario())

    def test_certificate_login_without_certificate_refused(self) -> defer.Deferred:
        async def scenario() -> None:
            port = await self.start_server("--tls-client-ca", CA)
            error = await self.refused(self.client(port, "bot", None, cert=False))
            self.assertEqual(error.code, ErrorCode.AUTH_FAILED)

        return defer.ensureDeferred(scenario())

    def test_certificate_login_needs_an_account(self) -> defer.Deferred:
        async def scenario() -> None:
            port = await self.start_server("--tls-client-ca", CA, users=("alice",))
            error = await self.refused(self.client(port, "bot", None))
            self.assertEqual(error.code, ErrorCode.AUTH_FAILED)

        return defer.ensureDeferred(scenario())

    def test_certificate_login_needs_a_client_ca(self) -> defer.Deferred:
        """Without --tls-client-ca no certificate is asked for, so none can vouch for anyone."""

        async def scenario() -> None:
            port = await self.start_server()
            error = await self.refused(self.client(port, "bot", None))
            self.assertEqual(error.code, ErrorCode.AUTH_FAILED)

        return defer.ensureDeferred(scenario())

    def test_password_login_still_works_with_a_client_ca(self) -> defer.Deferred:
        async def scenario() -> None:
            port = await self.start_server("--tls-client-ca", CA)
            without_cert = self.client(port, "alice", "alice-pw", cert=False)
            with_cert = self.client(port, "bot", "bot-pw")
            await defer.gatherResults([without_cert.loggedIn(), with_cert.loggedIn()])

        return defer.ensureDeferred(scenario())

    def test_require_without_client_ca_is_a_usage_error(self) -> None:
        options = tap.Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--tls-require-client-cert"])
        self.assertIn("--tls-client-ca", str(caught.exception))
