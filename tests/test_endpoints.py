"""Tests for imkit.endpoints: listen/connect string parsing, plus one real round trip."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    UNIXServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from imkit.endpoints import (
    EndpointStringError,
    TLSListenAddress,
    client_endpoint,
    parse_host_port,
    parse_tls_listen,
    server_endpoint,
)
from imkit.tls import TLSConfigError, client_tls_options, server_tls_options

CERTS = Path(__file__).resolve().parents[1] / "certs"
CA = str(CERTS / "ca.pem")
CERT = str(CERTS / "server.pem")
KEY = str(CERTS / "server.key")


def no_tls():
    raise AssertionError("the TLS options factory must not be called for this string")


class CountingFactory:
    """A TLS options factory that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return server_tls_options(CERT, KEY)


class ParseTLSListenTests(unittest.TestCase):
    valid = {
        "tls:14000": TLSListenAddress(14000, "", 50),
        "tls:0": TLSListenAddress(0, "", 50),
        "tls:65535": TLSListenAddress(65535, "", 50),
        "tls:14000:interface=127.0.0.1": TLSListenAddress(14000, "127.0.0.1", 50),
        "tls:port=14000:interface=127.0.0.1": TLSListenAddress(14000, "127.0.0.1", 50),
        "tls:interface=127.0.0.1:port=14000": TLSListenAddress(14000, "127.0.0.1", 50),
        "tls:port=14000": TLSListenAddress(14000, "", 50),
        "tls:14000:interface=\\:\\:1": TLSListenAddress(14000, "::1", 50),
        "tls:14000:interface=0.0.0.0:backlog=128": TLSListenAddress(14000, "0.0.0.0", 128),
        "TLS:14000": TLSListenAddress(14000, "", 50),
    }

    invalid = {
        "tls": "no port",
        "tls:": "no port",
        "tls:abc": "not a number",
        "tls:-1": "not a number",
        "tls:65536": "not a number",
        "tls:1.5": "not a number",
        "tls:١٢": "not a number",  # non-ASCII digits
        "tls:14000:15000": "without a name",
        "tls:14000:port=15000": "port given twice",
        "tls:port=1:port=2": "port given twice",
        "tls:interface=127.0.0.1": "no port",
        "tls:14000:interface=localhost": "not an IP address",
        "tls:14000:interface=::1": "without a name",  # unescaped IPv6 colons
        "tls:14000:iface=127.0.0.1": "unknown option",
        "tls:14000:interface=127.0.0.1:interface=127.0.0.2": "interface given twice",
        "tls:14000:backlog=0": "backlog",
        "tls:14000:backlog=x": "backlog",
        "tls:14000\\": "lone",
        "tcp:14000": "does not start with 'tls:'",
    }

    def test_valid(self):
        for description, expected in self.valid.items():
            self.assertEqual(parse_tls_listen(description), expected, description)

    def test_invalid(self):
        for description, fragment in self.invalid.items():
            exc = self.assertRaises(EndpointStringError, parse_tls_listen, description)
            message = str(exc)
            self.assertIn(fragment, message, description)
            self.assertIn(repr(description), message)
            self.assertIn("use tls:PORT", message)
            self.assertNotIn("\n", message)

    def test_error_is_value_error(self):
        self.assertTrue(issubclass(EndpointStringError, ValueError))

    @given(st.integers(0, 65535), st.ip_addresses())
    def test_any_port_and_address_round_trip(self, port, address):
        escaped = str(address).replace(":", "\\:")
        for description in (f"tls:{port}:interface={escaped}", f"tls:port={port}:interface={escaped}"):
            self.assertEqual(parse_tls_listen(description), (port, str(address), 50))


class ServerEndpointTests(unittest.TestCase):
    def test_tls_builds_ssl_endpoint_calling_factory_once(self):
        factory = CountingFactory()
        endpoint = server_endpoint(reactor, "tls:0:interface=127.0.0.1", factory)
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        self.assertEqual(factory.calls, 1)

    def test_other_strings_go_to_twisted(self):
        self.assertIsInstance(
            server_endpoint(reactor, "tcp:0:interface=127.0.0.1", no_tls), TCP4ServerEndpoint
        )
        directory = tempfile.mkdtemp(prefix="imkit-test-")
        self.addCleanup(shutil.rmtree, directory)
        socket_path = os.path.join(directory, "imkit.sock")
        self.assertIsInstance(
            server_endpoint(reactor, "unix:" + socket_path, no_tls), UNIXServerEndpoint
        )
        self.assertIsInstance(
            server_endpoint(reactor, f"ssl:0:privateKey={KEY}:certKey={CERT}", no_tls),
            SSL4ServerEndpoint,
        )

    def test_tls_config_errors_pass_through(self):
        def broken():
            return server_tls_options(CERT, str(CERTS / "missing.key"))

        exc = self.assertRaises(TLSConfigError, server_endpoint, reactor, "tls:0", broken)
        self.assertIn("--tls-key", str(exc))

    def test_bad_tls_string_does_not_call_factory(self):
        self.assertRaises(EndpointStringError, server_endpoint, reactor, "tls:nope", no_tls)

    def test_invalid_strings(self):
        for description in (
            "",
            "bogus:14000",
            "tcp",
            "tcp:",
            "tcp:abc",
            "tcp:0:frobnicate=1",
            "ssl:0:privateKey=/nonexistent/imkit.key",
            f"ssl:0:privateKey={CA}:certKey={CERT}",
            "tls:99999",
        ):
            exc = self.assertRaises(EndpointStringError, server_endpoint, reactor, description, no_tls)
            self.assertNotIn("\n", str(exc))
            self.assertIn("tcp:PORT:interface=127.0.0.1", str(exc))


class ParseHostPortTests(unittest.TestCase):
    valid = {
        "localhost:14000": ("localhost", 14000),
        "127.0.0.1:1": ("127.0.0.1", 1),
        "chat.example.com:65535": ("chat.example.com", 65535),
        "[::1]:14000": ("::1", 14000),
        "[2001:db8::7]:443": ("2001:db8::7", 443),
        "bücher.example:14000": ("bücher.example", 14000),
    }
    invalid = [
        "",
        "localhost",
        "localhost:",
        ":14000",
        "localhost:0",
        "localhost:65536",
        "localhost:http",
        "localhost:-1",
        "::1:14000",
        "[::1]",
        "[::1]14000",
        "[localhost]:14000",
        "[]:14000",
        "local host:14000",
        "user@host:14000",
        "tcp:host=localhost:port=14000",
    ]

    def test_valid(self):
        for server, expected in self.valid.items():
            self.assertEqual(parse_host_port(server), expected, server)

    def test_invalid(self):
        for server in self.invalid:
            exc = self.assertRaises(EndpointStringError, parse_host_port, server)
            self.assertIn(repr(server), str(exc))
            self.assertIn("HOST:PORT", str(exc))
            self.assertNotIn("\n", str(exc))

    def test_ipv6_hint(self):
        exc = self.assertRaises(EndpointStringError, parse_host_port, "::1:14000")
        self.assertIn("brackets", str(exc))

    @given(
        st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,10}){0,3}\Z"),
        st.integers(1, 65535),
    )
    def test_host_names_round_trip(self, host, port):
        self.assertEqual(parse_host_port(f"{host}:{port}"), (host, port))

    @given(st.ip_addresses(v=6), st.integers(1, 65535))
    def test_ipv6_round_trip(self, address, port):
        self.assertEqual(parse_host_port(f"[{address}]:{port}"), (str(address), port))


class ClientEndpointTests(unittest.TestCase):
    def test_plain(self):
        self.assertIsInstance(client_endpoint(reactor, "localhost:14000", None), HostnameEndpoint)

    def test_tls_wraps(self):
        endpoint = client_endpoint(
            reactor, "[::1]:14000", client_tls_options("::1", CA)
        )
        self.assertNotIsInstance(endpoint, HostnameEndpoint)

    def test_bad_address(self):
        self.assertRaises(EndpointStringError, client_endpoint, reactor, "localhost", None)


@implementer(IHandshakeListener)
class Ping(Protocol):
    """Sends a line after the handshake and hangs up when it comes back."""

    def __init__(self):
        self.received = b""
        self.handshook = False
        self.lost = defer.Deferred()

    def handshakeCompleted(self):
        self.handshook = True
        self.transport.write(b"ping\n")

    def dataReceived(self, data):
        self.received += data
        if self.received == b"ping\n":
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost.callback(None)


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        self.factory.lost.callback(None)


class RoundTripTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_tls_listen_and_connect(self):
        """server_endpoint("tls:...") and client_endpoint() talk to each other."""
        factory = Factory.forProtocol(Echo)
        factory.lost = defer.Deferred()
        endpoint = server_endpoint(
            reactor, "tls:0:interface=127.0.0.1", lambda: server_tls_options(CERT, KEY)
        )
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        host, _ = parse_host_port(address)
        client = Ping()
        yield connectProtocol(
            client_endpoint(reactor, address, client_tls_options(host, CA)), client
        )
        yield defer.gatherResults([client.lost, factory.lost])
        self.assertTrue(client.handshook)
        self.assertEqual(client.received, b"ping\n")
