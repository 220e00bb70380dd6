"""Real loopback TLS tests for imkit.tls (the sslyze profile checks are in test_tls_profiles.py).

Every test listens on 127.0.0.1 port 0, waits until both ends of each
connection are closed and stops listening, so nothing outlives the test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

import imkit
from imkit.tls import (
    ServerTLS,
    TLSConfigError,
    TLSReloader,
    client_tls_options,
    default_cert_paths,
    key_exchange_groups,
    server_tls_options,
)

REPO = Path(__file__).resolve().parents[1]
CERTS = REPO / "certs"
CA = str(CERTS / "ca.pem")
CERT = str(CERTS / "server.pem")
KEY = str(CERTS / "server.key")

TLS13_AEAD = {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}
TLS12_AEAD_FS = re.compile(r"^ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")
PAYLOAD = b"imkit says hello over TLS\n"


class TempDirTestCase(unittest.TestCase):
    def mktemp(self) -> str:
        """Like trial's, but under the system temp dir: pytest runs from the repo root."""
        directory = tempfile.mkdtemp(prefix="imkit-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return os.path.join(directory, "temp")


@implementer(IHandshakeListener)
class Peer(Protocol):
    """One end of a test connection: records the handshake outcome and the bytes.

    The client sends PAYLOAD once the handshake completes and hangs up when the
    echo is back; the server echoes.  C{lost} fires when the connection closes.
    """

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.negotiated: tuple[str, str] | None = None
        self.failure = None
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()

    def handshakeCompleted(self) -> None:
        conn = self.transport.getHandle()
        self.negotiated = (conn.get_protocol_version_name(), conn.get_cipher_name())
        if not self.echo:
            self.transport.write(PAYLOAD)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)
        elif self.received == PAYLOAD:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self.negotiated is None:
            self.failure = reason
        self.lost.callback(None)


class ServerFactory(Factory):
    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.connected: defer.Deferred = defer.Deferred()

    def buildProtocol(self, addr):
        assert self.peer is None, "each test makes a single connection"
        self.peer = Peer(echo=True)
        self.connected.callback(self.peer)
        return self.peer


@implementer(IOpenSSLClientConnectionCreator)
class RawClient:
    """A client built straight on pyOpenSSL, to play old or weak peers.

    It does not verify the server: these tests are about what the server
    accepts.
    """

    def __init__(self, *, min_version: int = 0, max_version: int = 0, ciphers: bytes = b"DEFAULT"):
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(min_version)
        self.context.set_max_proto_version(max_version)
        self.context.set_cipher_list(ciphers)

    def clientConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.context, None)

    @staticmethod
    def can_set_groups() -> bool:
        from OpenSSL._util import lib

        return hasattr(lib, "SSL_CTX_set1_curves_list")

    def set_groups(self, groups: bytes) -> None:
        """Offer only these key-exchange groups (pyOpenSSL has no public call for it)."""
        from OpenSSL._util import lib

        assert lib.SSL_CTX_set1_curves_list(self.context._context, groups) == 1, groups

    def offered_tls12_ciphers(self) -> list[str]:
        ciphers = SSL.Connection(self.context, None).get_cipher_list()
        return [c for c in ciphers if not c.startswith("TLS_")]


@implementer(IOpenSSLContextFactory)
class FixedContext:
    """A server configured by hand, to play a weak server."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def getContext(self) -> SSL.Context:
        return self.context


def client_hello(creator: RawClient) -> bytes:
    """Return the ClientHello a client would send, or raise SSL.Error."""
    conn = SSL.Connection(creator.context, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        return conn.bio_read(65536)
    raise AssertionError("handshake cannot complete without a server")


def tls11_client_or_skip_reason() -> tuple[RawClient | None, str]:
    """A client offering only TLS 1.1, or why this OpenSSL cannot build one."""
    # OpenSSL 3 forbids TLS < 1.2 at security level 1 and above (SHA-1/MD5
    # in the PRF), so an old client needs security level 0.
    try:
        client = RawClient(
            min_version=SSL.TLS1_1_VERSION,
            max_version=SSL.TLS1_1_VERSION,
            ciphers=b"DEFAULT:@SECLEVEL=0",
        )
        hello = client_hello(client)
    except SSL.Error as e:
        return None, f"local OpenSSL cannot offer TLS 1.1: {e}"
    # Handshake record (0x16), then the ClientHello's client_version at 9..11.
    if hello[:1] != b"\x16" or hello[9:11] != b"\x03\x02":
        return None, f"local OpenSSL's TLS 1.1 ClientHello is not TLS 1.1: {hello[:11].hex()}"
    return client, ""


def generate_other_certs(directory: str) -> dict[str, str]:
    """A second, unrelated dev CA + server cert, made with certs/generate.py."""
    subprocess.run(
        [sys.executable, str(CERTS / "generate.py"), "--out", directory],
        check=True,
        capture_output=True,
    )
    return {name: os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key")}


class LoopbackTLSTests(TempDirTestCase):
    @defer.inlineCallbacks
    def connect(self, server_options, client_creator):
        """Listen with C{server_options}, connect once, return (client, server) peers once closed."""
        factory = ServerFactory()
        port = yield SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        client = Peer(echo=False)
        endpoint = wrapClientTLS(
            client_creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        )
        yield connectProtocol(endpoint, client)
        server = yield factory.connected
        yield defer.gatherResults([client.lost, server.lost])
        return client, server

    def assertRefused(self, client, server, error_type=SSL.Error):
        self.assertIsNone(client.negotiated, "client finished a handshake it should not have")
        self.assertIsNone(server.negotiated, "server finished a handshake it should not have")
        self.assertEqual(client.received, b"")
        self.assertIsNotNone(client.failure)
        client.failure.trap(error_type)

    @defer.inlineCallbacks
    def test_exchange_bytes_with_dev_ca(self):
        """A client trusting the dev CA connects to localhost and bytes round-trip."""
        client, server = yield self.connect(
            server_tls_options(CERT, KEY), client_tls_options("localhost", CA)
        )
        self.assertEqual(client.received, PAYLOAD)
        self.assertEqual(server.received, PAYLOAD)
        version, cipher = client.negotiated
        self.assertEqual(version, "TLSv1.3")
        self.assertIn(cipher, TLS13_AEAD)
        self.assertEqual(server.negotiated, client.negotiated)

    @defer.inlineCallbacks
    def test_ip_address_identity(self):
        """The certificate also names 127.0.0.1, checked as an IP identity."""
        client, _ = yield self.connect(
            server_tls_options(CERT, KEY), client_tls_options("127.0.0.1", CA)
        )
        self.assertEqual(client.received, PAYLOAD)

    @defer.inlineCallbacks
    def test_wrong_host_name_refused(self):
        client, server = yield self.connect(
            server_tls_options(CERT, KEY), client_tls_options("imkit.example.com", CA)
        )
        self.assertRefused(client, server, VerificationError)

    @defer.inlineCallbacks
    def test_untrusted_ca_refused(self):
        other = generate_other_certs(self.mktemp())
        client, server = yield self.connect(
            server_tls_options(CERT, KEY), client_tls_options("localhost", other["ca.pem"])
        )
        self.assertRefused(client, server)
        self.assertIn("certificate verify failed", client.failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_server_cert_from_other_ca_refused(self):
        other = generate_other_certs(self.mktemp())
        client, server = yield self.connect(
            server_tls_options(other["server.pem"], other["server.key"]),
            client_tls_options("localhost", CA),
        )
        self.assertRefused(client, server)

    @defer.inlineCallbacks
    def test_tls11_client_refused(self):
        client_creator, why_not = tls11_client_or_skip_reason()
        if client_creator is None:
            raise unittest.SkipTest(why_not)
        client, server = yield self.connect(server_tls_options(CERT, KEY), client_creator)
        self.assertRefused(client, server)
        server.failure.trap(SSL.Error)
        self.assertIn("unsupported protocol", server.failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_tls12_client_accepted_with_aead_fs_suite(self):
        """A TLS 1.2 client offering everything still gets ECDHE + AEAD."""
        client_creator = RawClient(
            max_version=SSL.TLS1_2_VERSION, ciphers=b"ALL:@SECLEVEL=0"
        )
        self.assertTrue(any("CBC" in c or c.endswith("-SHA") for c in client_creator.offered_tls12_ciphers()))
        client, server = yield self.connect(server_tls_options(CERT, KEY), client_creator)
        self.assertEqual(client.received, PAYLOAD)
        version, cipher = server.negotiated
        self.assertEqual(version, "TLSv1.2")
        self.assertRegex(cipher, TLS12_AEAD_FS)

    @defer.inlineCallbacks
    def test_cbc_only_tls12_client_refused(self):
        client_creator = RawClient(
            max_version=SSL.TLS1_2_VERSION,
            ciphers=b"AES:!AESGCM:!AESCCM:!CHACHA20:@SECLEVEL=0",
        )
        offered = client_creator.offered_tls12_ciphers()
        self.assertTrue(offered)
        self.assertFalse([c for c in offered if "GCM" in c or "CCM" in c or "CHACHA" in c])
        client, server = yield self.connect(server_tls_options(CERT, KEY), client_creator)
        self.assertRefused(client, server)
        server.failure.trap(SSL.Error)
        self.assertIn("no shared cipher", server.failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_modern_refuses_tls12_client(self):
        client_creator = RawClient(max_version=SSL.TLS1_2_VERSION, ciphers=b"ECDHE+AESGCM")
        client, server = yield self.connect(server_tls_options(CERT, KEY, modern=True), client_creator)
        self.assertRefused(client, server)

    @defer.inlineCallbacks
    def test_modern_accepts_tls13_client(self):
        client, server = yield self.connect(
            server_tls_options(CERT, KEY, modern=True), client_tls_options("localhost", CA)
        )
        self.assertEqual(client.received, PAYLOAD)
        self.assertEqual(server.negotiated[0], "TLSv1.3")

    @defer.inlineCallbacks
    def test_client_refuses_tls12_cbc_only_server(self):
        """imkit's client also insists on AEAD suites, even with a weak server."""
        weak = SSL.Context(SSL.TLS_METHOD)
        weak.set_max_proto_version(SSL.TLS1_2_VERSION)
        weak.set_cipher_list(b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:@SECLEVEL=0")
        weak.use_certificate_file(CERT)
        weak.use_privatekey_file(KEY)
        server_options = FixedContext(weak)
        client, server = yield self.connect(server_options, client_tls_options("localhost", CA))
        self.assertRefused(client, server)

    @defer.inlineCallbacks
    def test_key_exchange_groups(self):
        """X25519, P-256 and P-384 only (Mozilla's list): OpenSSL 3 would also take X448 and P-521.

        TLS 1.3, where the key-exchange group is independent of the certificate (in TLS 1.2 a
        client's group list also limits which ECDSA certificate curves it accepts).  Where
        pyOpenSSL cannot set the list, the server offers P-256 alone (key_exchange_groups()).
        """
        offered = key_exchange_groups()
        self.assertIn("P-256", offered)
        self.assertLessEqual(set(offered), {"X25519", "P-256", "P-384"})
        if not RawClient.can_set_groups():
            raise unittest.SkipTest("this pyOpenSSL cannot restrict a client's groups either")
        for group in ("X25519", "P-256", "P-384", "X448", "P-521"):
            client_creator = RawClient(min_version=SSL.TLS1_3_VERSION)
            client_creator.set_groups(group.encode("ascii"))
            client, server = yield self.connect(server_tls_options(CERT, KEY), client_creator)
            if group in offered:
                self.assertEqual(client.received, PAYLOAD, group)
            else:
                self.assertRefused(client, server)
                self.assertIn("no suitable key share", server.failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_full_chain_in_cert_file(self):
        """A cert file holding leaf + chain (a "fullchain.pem") is accepted."""
        fullchain = self.mktemp()
        Path(fullchain).write_bytes(Path(CERT).read_bytes() + Path(CA).read_bytes())
        client, _ = yield self.connect(
            server_tls_options(fullchain, KEY), client_tls_options("localhost", CA)
        )
        self.assertEqual(client.received, PAYLOAD)

    @defer.inlineCallbacks
    def test_chain_paths(self):
        client, _ = yield self.connect(
            server_tls_options(CERT, KEY, chain_paths=[CA]), client_tls_options("localhost", CA)
        )
        self.assertEqual(client.received, PAYLOAD)


class ServerContextTests(TempDirTestCase):
    """Check the configuration itself, as OpenSSL's security level and the
    AEAD-only suites would refuse a TLS 1.1 client even without the floor."""

    def cipher_list(self, **kwargs) -> list[str]:
        options = server_tls_options(CERT, KEY, **kwargs)
        return SSL.Connection(options.getContext(), None).get_cipher_list()

    def test_only_forward_secret_aead_suites(self):
        for modern in (False, True):
            ciphers = self.cipher_list(modern=modern)
            self.assertTrue(ciphers)
            for name in ciphers:
                if name.startswith("TLS_"):
                    self.assertIn(name, TLS13_AEAD)
                else:
                    self.assertRegex(name, TLS12_AEAD_FS)

    def protocol_options(self, **kwargs) -> int:
        context = server_tls_options(CERT, KEY, **kwargs).getContext()
        # SSL_CTX_set_options returns the options now in force; 0 adds none.
        return context.set_options(0)

    def test_version_floor_is_tls12(self):
        options = self.protocol_options()
        for flag in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
            self.assertTrue(options & flag, hex(flag))
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)
        self.assertFalse(options & SSL.OP_NO_TLSv1_3)

    def test_modern_is_tls13_only(self):
        options = self.protocol_options(modern=True)
        self.assertTrue(options & SSL.OP_NO_TLSv1_2)
        self.assertFalse(options & SSL.OP_NO_TLSv1_3)

    def test_no_session_resumption(self):
        self.assertTrue(self.protocol_options() & SSL.OP_NO_TICKET)

    def test_no_client_renegotiation(self):
        self.assertTrue(self.protocol_options() & SSL.OP_NO_RENEGOTIATION)


class ConfigErrorTests(TempDirTestCase):
    def assertOneLineError(self, exc: TLSConfigError, *fragments: str) -> None:
        message = str(exc)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_is_value_error(self):
        self.assertTrue(issubclass(TLSConfigError, ValueError))

    def test_missing_key(self):
        missing = os.path.join(self.mktemp(), "nope.key")
        exc = self.assertRaises(TLSConfigError, server_tls_options, CERT, missing)
        self.assertOneLineError(exc, "--tls-key", missing, "No such file", "pass --tls-key PATH")

    def test_missing_cert(self):
        missing = os.path.join(self.mktemp(), "nope.pem")
        exc = self.assertRaises(TLSConfigError, server_tls_options, missing, KEY)
        self.assertOneLineError(exc, "--tls-cert", missing, "No such file", "pass --tls-cert PATH")

    def test_unreadable_key(self):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            raise unittest.SkipTest("root can read files whatever their mode")
        unreadable = self.mktemp()
        Path(unreadable).write_bytes(Path(KEY).read_bytes())
        os.chmod(unreadable, 0)
        exc = self.assertRaises(TLSConfigError, server_tls_options, CERT, unreadable)
        self.assertOneLineError(exc, "--tls-key", unreadable, "Permission denied")

    def test_directory_as_cert(self):
        exc = self.assertRaises(TLSConfigError, server_tls_options, str(CERTS), KEY)
        self.assertOneLineError(exc, "--tls-cert", str(CERTS))

    def test_key_is_not_a_key(self):
        exc = self.assertRaises(TLSConfigError, server_tls_options, CERT, CERT)
        self.assertOneLineError(exc, "--tls-key", CERT, "not a PEM private key")

    def test_cert_is_not_a_cert(self):
        exc = self.assertRaises(TLSConfigError, server_tls_options, KEY, KEY)
        self.assertOneLineError(exc, "--tls-cert", KEY, "no PEM certificate")

    def test_mismatched_key(self):
        other = generate_other_certs(self.mktemp())
        exc = self.assertRaises(TLSConfigError, server_tls_options, CERT, other["server.key"])
        self.assertOneLineError(exc, "does not belong", CERT, other["server.key"])

    def test_chain_before_leaf_is_a_mismatch(self):
        """With the CA first, the "leaf" is the CA and the key cannot match it."""
        wrong_order = self.mktemp()
        Path(wrong_order).write_bytes(Path(CA).read_bytes() + Path(CERT).read_bytes())
        exc = self.assertRaises(TLSConfigError, server_tls_options, wrong_order, KEY)
        self.assertOneLineError(exc, "does not belong", wrong_order)

    def test_encrypted_key(self):
        key = serialization.load_pem_private_key(Path(KEY).read_bytes(), None)
        encrypted = self.mktemp()
        Path(encrypted).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        exc = self.assertRaises(TLSConfigError, server_tls_options, CERT, encrypted)
        self.assertOneLineError(exc, "--tls-key", encrypted, "encrypted", "unencrypted")

    def test_missing_client_ca(self):
        missing = os.path.join(self.mktemp(), "ca.pem")
        exc = self.assertRaises(TLSConfigError, client_tls_options, "localhost", missing)
        self.assertOneLineError(exc, "--tls-ca", missing, "No such file")

    def test_empty_client_host_name(self):
        self.assertRaises(TLSConfigError, client_tls_options, "", CA)

    def test_platform_trust_client(self):
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(client_tls_options("localhost")))


class DefaultCertPathsTests(TempDirTestCase):
    def chdir(self, path) -> None:
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(path)

    def test_current_directory_first(self):
        self.chdir(REPO)
        self.assertEqual(default_cert_paths(), (CA, CERT, KEY))

    def test_falls_back_to_package_copies(self):
        empty = self.mktemp()
        os.makedirs(empty)
        self.chdir(empty)
        packaged = Path(imkit.__file__).resolve().parent / "_devcerts"
        self.assertEqual(
            default_cert_paths(),
            tuple(str(packaged / n) for n in ("ca.pem", "server.pem", "server.key")),
        )
        for path in default_cert_paths():
            self.assertTrue(os.path.isfile(path), path)

    def test_incomplete_local_folder_is_ignored(self):
        folder = Path(self.mktemp())
        (folder / "certs").mkdir(parents=True)
        (folder / "certs" / "server.pem").write_bytes(Path(CERT).read_bytes())
        self.chdir(folder)
        self.assertIn("_devcerts", default_cert_paths()[1])

    def test_default_paths_build_options(self):
        ca, cert, key = default_cert_paths()
        server_tls_options(cert, key)
        client_tls_options("localhost", ca)


@implementer(IHandshakeListener)
class HeldClient(Protocol):
    """A client that stays connected: records the certificate it was shown, echoes on demand."""

    def __init__(self) -> None:
        self.handshake: defer.Deferred = defer.Deferred()
        self.echoed: defer.Deferred | None = None
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()
        self.failure = None

    def handshakeCompleted(self) -> None:
        cert = self.transport.getHandle().get_peer_certificate(as_cryptography=True)
        self.handshake.callback(cert)

    def ping(self, data: bytes) -> defer.Deferred:
        self.received = b""
        self.echoed = defer.Deferred()
        self.transport.write(data)
        return self.echoed

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echoed is not None:
            self.echoed, echoed = None, self.echoed
            echoed.callback(self.received)

    def connectionLost(self, reason) -> None:
        self.failure = reason
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.lost.callback(None)


class EchoFactory(Factory):
    def __init__(self) -> None:
        self.peers: list[Peer] = []

    def buildProtocol(self, addr):
        peer = Peer(echo=True)
        self.peers.append(peer)
        return peer


class ReloadTests(TempDirTestCase):
    """ServerTLS.reload over real loopback TLS: new connections see the new certificate."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert = os.path.join(self.dir, "server.pem")
        self.key = os.path.join(self.dir, "server.key")
        self.install(CERT, KEY)
        self.other = generate_other_certs(self.mktemp())
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def install(self, cert: str, key: str) -> None:
        """Replace the served files the way deployment tools do: write aside, then rename."""
        for source, target in ((cert, self.cert), (key, self.key)):
            self.replace(target, Path(source).read_bytes())

    def replace(self, target: str, data: bytes) -> None:
        Path(target + ".new").write_bytes(data)
        os.replace(target + ".new", target)

    @defer.inlineCallbacks
    def listen(self, tls: ServerTLS):
        factory = EchoFactory()
        port = yield SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        return factory

    @defer.inlineCallbacks
    def connect(self, ca: str):
        """Connect a client trusting C{ca}; return it and the certificate it saw (or the failure)."""
        client = HeldClient()
        endpoint = wrapClientTLS(
            client_tls_options("localhost", ca), TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        )
        yield connectProtocol(endpoint, client)
        try:
            cert = yield client.handshake
        except Exception:
            cert = None
        if cert is not None:
            self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])
        return client, cert

    def serial(self, path: str) -> int:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number

    def errors(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.error]

    @defer.inlineCallbacks
    def test_new_connections_get_the_new_certificate_old_ones_go_on(self):
        tls = ServerTLS(self.cert, self.key)
        yield self.listen(tls)
        old_client, seen = yield self.connect(CA)
        self.assertEqual(seen.serial_number, self.serial(CERT))

        self.install(self.other["server.pem"], self.other["server.key"])
        self.assertTrue(tls.reload())

        new_client, seen = yield self.connect(self.other["ca.pem"])
        self.assertEqual(seen.serial_number, self.serial(self.other["server.pem"]))
        # The connection made before the reload still works, on the old certificate.
        echoed = yield old_client.ping(b"still here")
        self.assertEqual(echoed, b"still here")
        # A client trusting only the old CA now meets the new certificate and refuses it.
        refusing, seen = yield self.connect(CA)
        self.assertIsNone(seen)
        yield refusing.lost
        self.assertIn("certificate verify failed", refusing.failure.getErrorMessage())
        self.assertEqual(self.errors(), [])

    @defer.inlineCallbacks
    def test_broken_file_keeps_the_old_certificate(self):
        tls = ServerTLS(self.cert, self.key)
        yield self.listen(tls)
        self.replace(self.cert, b"-----BEGIN CERTIFICATE-----\ntruncated")
        self.assertFalse(tls.reload())
        (error,) = self.errors()
        self.assertNotIn("\n", error)
        self.assertIn(self.cert, error)
        self.assertIn("previous certificate", error)
        _, seen = yield self.connect(CA)
        self.assertEqual(seen.serial_number, self.serial(CERT))

    @defer.inlineCallbacks
    def test_certificate_then_key_replaced(self):
        """Files replaced one at a time: the mismatch in between is refused, the pair is taken."""
        tls = ServerTLS(self.cert, self.key)
        yield self.listen(tls)
        self.replace(self.cert, Path(self.other["server.pem"]).read_bytes())
        self.assertTrue(tls.reload_if_changed() is False)
        self.assertIn("does not belong", self.errors()[0])
        _, seen = yield self.connect(CA)
        self.assertEqual(seen.serial_number, self.serial(CERT))

        self.replace(self.key, Path(self.other["server.key"]).read_bytes())
        self.assertTrue(tls.reload_if_changed())
        _, seen = yield self.connect(self.other["ca.pem"])
        self.assertEqual(seen.serial_number, self.serial(self.other["server.pem"]))

    def test_reload_if_changed_only_when_changed(self):
        tls = ServerTLS(self.cert, self.key)
        self.assertFalse(tls.reload_if_changed())
        self.install(CERT, KEY)  # same bytes, new files
        self.assertTrue(tls.reload_if_changed())
        self.assertFalse(tls.reload_if_changed())

    def test_poll_reloads_changed_files(self):
        clock = task.Clock()
        tls = ServerTLS(self.cert, self.key)
        reloader = TLSReloader(tls, clock, interval=5.0)
        reloader.startService()
        self.addCleanup(reloader.stopService)
        before = tls.options
        self.install(self.other["server.pem"], self.other["server.key"])
        clock.advance(4.9)
        self.assertIs(tls.options, before)
        clock.advance(0.1)
        self.assertIsNot(tls.options, before)
        self.assertEqual(clock.getDelayedCalls()[0].getTime(), 10.0)

    def test_no_poll_with_interval_zero(self):
        clock = task.Clock()
        reloader = TLSReloader(ServerTLS(self.cert, self.key), clock, interval=0)
        reloader.startService()
        self.assertEqual(clock.getDelayedCalls(), [])
        reloader.stopService()

    def test_sighup_reloads(self):
        if not hasattr(signal, "SIGHUP"):
            raise unittest.SkipTest("no SIGHUP on this platform")

        class Reactor(task.Clock):
            def callFromThread(self, f, *args):
                f(*args)

        before = signal.getsignal(signal.SIGHUP)
        tls = ServerTLS(self.cert, self.key)
        reloader = TLSReloader(tls, Reactor(), interval=0, sighup=True)
        reloader.startService()
        try:
            old = tls.options
            os.kill(os.getpid(), signal.SIGHUP)
            self.assertIsNot(tls.options, old)
        finally:
            reloader.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_twistd_service_polls_tls_files(self):
        from imkit.server import tap

        options = tap.Options()
        options.parseOptions(
            ["--listen", "tls:0:interface=127.0.0.1", "--store", "memory:",
             "--tls-cert", self.cert, "--tls-key", self.key, "--tls-reload", "2.5"]
        )
        service = tap.makeService(options, reactor=reactor)
        reloader = service.getServiceNamed(TLSReloader.name)
        self.assertEqual(reloader.interval, 2.5)
        self.assertEqual(reloader.tls.paths, (self.cert, self.key))
        self.assertFalse(reloader.sighup)

        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--store", "memory:"])
        service = tap.makeService(options, reactor=reactor)
        self.assertRaises(KeyError, service.getServiceNamed, TLSReloader.name)
