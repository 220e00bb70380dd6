"""
Accounts and tokens: the failed-login limiter (alone, and in the hub over the real protocol),
resume tokens (stored as digests, bound, expiring, revocable with the live sessions they serve),
disabled users (store, hub, CLI, and a server that notices the CLI's change within a bounded
time), argon2 parameters per hash, and the twistd options.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sqlite3
import sys
import tempfile
from typing import Any

from argon2 import PasswordHasher
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imkit import cli
from imkit.passwords import Passwords
from imkit.server.hub import Hub
from imkit.server.logins import LoginLimiter
from imkit.server.protocol import IMServerFactory
from imkit.server.tap import Options
from imkit.session.server import CLOSED
from imkit.session.settings import ServerSettings
from imkit.store import SQLiteStore, UnknownUser
from imkit.store import sqlite as sqlite_module
from imkit.store.memory import MemoryStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.framing import FrameReader

T0 = 1_700_000_000


# The limiter on its own ------------------------------------------------------------------------


def limiter(clock: Clock, **overrides: Any) -> LoginLimiter:
    values = dict(login_failures=3, login_failures_per_ip=10, login_window=60.0, login_backoff=10.0, login_backoff_max=40.0)
    values.update(overrides)
    return LoginLimiter(ServerSettings(**values), clock)


def fail(limits: LoginLimiter, user: str, ip: str = "10.0.0.1") -> None:
    assert limits.begin(user, ip) is None
    limits.failed(user, ip)


class LoginLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def test_locks_a_name_after_its_failures_and_backs_off(self) -> None:
        """N failures lock the name for the backoff, which doubles per lockout up to the maximum."""
        limits = limiter(self.clock)
        lengths = []
        for _ in range(4):
            for _ in range(3):
                fail(limits, "alice")
            refusal = limits.begin("alice", "10.0.0.1")
            self.assertIsNotNone(refusal)
            lengths.append(refusal.retry_at - self.clock.seconds())
            self.assertIn("too many failed logins for this user name", refusal.reason)
            self.assertIn(f"try again in {int(lengths[-1])} s", refusal.reason)
            self.clock.advance(lengths[-1] - 0.5)
            self.assertIsNotNone(limits.begin("alice", "10.0.0.1"), "still locked just before the end")
            self.clock.advance(0.5)
        self.assertEqual(lengths, [10, 20, 40, 40])
        self.assertIsNone(limits.begin("alice", "10.0.0.1"), "allowed again once the lockout is over")

    def test_strikes_are_forgotten_after_a_quiet_while(self) -> None:
        limits = limiter(self.clock)
        for _ in range(3):
            fail(limits, "alice")
        self.clock.advance(10)
        for _ in range(3):
            fail(limits, "alice")
        self.assertEqual(limits.begin("alice", "10.0.0.1").retry_at - self.clock.seconds(), 20)
        self.clock.advance(20 + 60)  # the lockout, then max(window, backoff_max) of quiet
        for _ in range(3):
            fail(limits, "alice")
        self.assertEqual(limits.begin("alice", "10.0.0.1").retry_at - self.clock.seconds(), 10)

    def test_failures_outside_the_window_do_not_count(self) -> None:
        limits = limiter(self.clock)
        for _ in range(10):
            fail(limits, "alice")
            self.clock.advance(31)  # never three within 60 s
        self.assertEqual(limits.lockouts, 0)

    def test_success_resets_the_name_not_the_address(self) -> None:
        limits = limiter(self.clock, login_failures_per_ip=4)
        fail(limits, "alice")
        fail(limits, "alice")
        self.assertIsNone(limits.begin("alice", "10.0.0.1"))
        limits.succeeded("alice", "10.0.0.1")
        fail(limits, "alice")
        fail(limits, "alice")
        self.assertIsNotNone(limits.begin("alice", "10.0.0.1"), "two more failures from the address make four")
        self.assertIsNone(limits.begin("alice", "10.0.0.2"), "the name itself has only two since its success")

    def test_an_address_is_locked_across_names(self) -> None:
        """A guesser spraying one password over many names is stopped by the per-address count."""
        limits = limiter(self.clock)
        for index in range(10):
            fail(limits, f"user{index}", "10.6.6.6")
        refusal = limits.begin("somebody-new", "10.6.6.6")
        self.assertIn("too many failed logins from this address", refusal.reason)
        self.assertIsNone(limits.begin("somebody-new", "10.0.0.1"), "other addresses are not affected")

    def test_attempts_in_flight_count(self) -> None:
        """Attempts sent at once cannot overtake the limit while the first are still being hashed."""
        limits = limiter(self.clock)
        for _ in range(3):
            self.assertIsNone(limits.begin("alice", "10.0.0.1"))
        refusal = limits.begin("alice", "10.0.0.1")
        self.assertIn("under way", refusal.reason)
        self.assertEqual(refusal.retry_at, self.clock.seconds() + 1)
        for _ in range(3):
            limits.failed("alice", "10.0.0.1")
        self.assertIn("too many failed logins", limits.begin("alice", "10.0.0.1").reason)

    def test_abandoned_attempts_do_not_count(self) -> None:
        limits = limiter(self.clock)
        for _ in range(5):
            self.assertIsNone(limits.begin("alice", "10.0.0.1"))
            limits.abandoned("alice", "10.0.0.1")
        self.assertEqual(limits.lockouts, 0)

    def test_off(self) -> None:
        for overrides in ({"login_failures": 0, "login_failures_per_ip": 0}, {"login_window": 0}):
            limits = limiter(self.clock, **overrides)
            for _ in range(50):
                fail(limits, "alice")
            self.assertEqual(len(limits), 0)

    def test_records_are_forgotten(self) -> None:
        """Memory follows the names and addresses that failed lately."""
        limits = limiter(self.clock)
        for index in range(500):
            fail(limits, f"name{index}", f"10.0.{index // 200}.{index % 200}")
        self.assertEqual(len(limits), 1000)
        self.clock.advance(61)
        limits.begin("alice", "10.0.0.1")
        self.assertEqual(len(limits), 2, "only the attempt in flight is remembered")


# The hub, over the real protocol ---------------------------------------------------------------


class CountingPasswords:
    """Fast test passwords that count the hash checks the hub asks for."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.inner = Passwords(hasher, defer.maybeDeferred) if hasher else Passwords.fast_for_tests()
        self.checks = 0

    def hash(self, password: str) -> defer.Deferred:
        return self.inner.hash(password)

    def verify(self, password_hash: str | None, password: str) -> defer.Deferred:
        self.checks += 1
        return self.inner.verify(password_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        return self.inner.needs_rehash(password_hash)


class Peer:
    """A fake client on its own address: transport, server protocol, and a reader for replies."""

    def __init__(self, factory: IMServerFactory, ip: str = "10.0.0.1") -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.reader = FrameReader(factory.settings.max_frame)

    def send(self, *frames: bytes) -> None:
        self.protocol.dataReceived(b"".join(frames))

    def received(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return [codec.decode_body(kind, body) for kind, _flags, body in self.reader.feed(data)]

    def login(self, user: str, secret: str | bytes, device: str = "phone", method: int = schema.LOGIN_PASSWORD) -> packets.LoginResult:
        if isinstance(secret, str):
            secret = secret.encode()
        self.send(codec.encode(packets.Hello(1, 1, "test")), codec.encode(packets.Login(method, user, device, secret)))
        replies = [reply for reply in self.received() if isinstance(reply, packets.LoginResult)]
        return replies[0]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.protocol.session.state == CLOSED


class HubAccountTests(SynchronousTestCase):
    settings = ServerSettings(
        login_failures=3, login_failures_per_ip=6, login_window=60.0, login_backoff=30.0, login_backoff_max=120.0,
        account_check_interval=5.0, token_ttl=3600.0, idle_timeout=10_000.0, login_timeout=10_000.0,
    )

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        self.passwords = CountingPasswords()
        for user in ("alice", "bob"):
            self.store.add_user(user, self.passwords.hash(f"{user}-secret").result)
        self.hub = Hub(self.store, self.passwords, self.clock, self.settings)
        self.factory = IMServerFactory(self.hub, self.settings, self.clock)

    def peer(self, ip: str = "10.0.0.1") -> Peer:
        return Peer(self.factory, ip)

    def login(self, user: str, secret: str | bytes, device: str = "phone", ip: str = "10.0.0.1", method: int = schema.LOGIN_PASSWORD) -> packets.LoginResult:
        return self.peer(ip).login(user, secret, device, method)

    def logged_in(self, user: str, device: str = "phone", ip: str = "10.0.0.1") -> tuple[Peer, bytes]:
        peer = self.peer(ip)
        result = peer.login(user, f"{user}-secret", device)
        self.assertEqual(result.status, 0, result.reason)
        return peer, result.resume_token

    # The limiter ---------------------------------------------------------------------------

    def test_locked_name_is_refused_unchecked_then_let_in(self) -> None:
        for _ in range(3):
            self.assertEqual(self.login("alice", "guess").status, ErrorCode.AUTH_FAILED)
        checks = self.passwords.checks
        refused = self.login("alice", "alice-secret")
        self.assertEqual((refused.status, refused.reason), (ErrorCode.RATE_LIMITED, "too many failed logins for this user name; try again in 30 s"))
        self.assertEqual(self.passwords.checks, checks, "no password is checked while the name is locked")
        self.assertEqual(self.login("bob", "bob-secret").status, 0, "other names are not affected")
        self.clock.advance(30)
        self.assertEqual(self.login("alice", "alice-secret").status, 0)

    def test_refusals_do_not_tell_whether_the_account_exists(self) -> None:
        """An existing and a made-up name get the same answers, attempt for attempt, and the same work."""
        answers: dict[str, list] = {}
        checks: dict[str, int] = {}
        for index, user in enumerate(("alice", "nobody")):
            ip = f"10.0.1.{index}"
            before = self.passwords.checks
            answers[user] = [(r.status, r.reason) for r in (self.login(user, "guess", ip=ip) for _ in range(5))]
            checks[user] = self.passwords.checks - before
        self.assertEqual(answers["alice"], answers["nobody"])
        self.assertEqual(checks["alice"], checks["nobody"])
        self.assertEqual([status for status, _ in answers["alice"]], [ErrorCode.AUTH_FAILED] * 3 + [ErrorCode.RATE_LIMITED] * 2)

    def test_success_resets_the_count(self) -> None:
        for _ in range(2):
            self.login("alice", "guess")
        self.logged_in("alice")
        for _ in range(2):
            self.assertEqual(self.login("alice", "guess", ip="10.0.0.2").status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.login("alice", "alice-secret", ip="10.0.0.3").status, 0)

    def test_one_address_spraying_names_is_locked(self) -> None:
        for index in range(6):
            self.login(f"user{index}", "Password1", ip="10.6.6.6")
        refused = self.login("bob", "bob-secret", ip="10.6.6.6")
        self.assertEqual((refused.status, refused.reason), (ErrorCode.RATE_LIMITED, "too many failed logins from this address; try again in 30 s"))
        self.assertEqual(self.login("bob", "bob-secret", ip="10.0.0.9").status, 0)

    def test_resume_tokens_still_work_for_a_locked_name(self) -> None:
        """A guesser who locks alice's name does not lock out her devices, which reconnect with tokens."""
        _peer, token = self.logged_in("alice")
        for _ in range(3):
            self.login("alice", "guess", ip="10.6.6.6")
        self.assertEqual(self.login("alice", "alice-secret").status, ErrorCode.RATE_LIMITED)
        self.assertEqual(self.login("alice", token, method=schema.LOGIN_TOKEN).status, 0)

    def test_failed_token_logins_are_not_counted(self) -> None:
        for _ in range(10):
            self.assertEqual(self.login("alice", b"x" * 32, method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.login("alice", "alice-secret").status, 0)

    def test_client_retries_a_rate_limited_login(self) -> None:
        """RATE_LIMITED is a "not now" the client library retries, not a wrong password it gives up on."""
        from imkit.client.service import TRANSIENT_LOGIN_CODES

        self.assertIn(ErrorCode.RATE_LIMITED, TRANSIENT_LOGIN_CODES)
        self.assertNotIn(ErrorCode.AUTH_FAILED, TRANSIENT_LOGIN_CODES)

    # Tokens --------------------------------------------------------------------------------

    def test_the_store_keeps_only_a_digest(self) -> None:
        _peer, token = self.logged_in("alice")
        self.assertEqual(self.store.token_owner(hashlib.sha256(token).hexdigest()).result, ("alice", "phone", (T0 + 3600) * 1000))
        self.assertNotIn(token.hex(), repr(vars(self.store)))
        self.assertNotIn(repr(token), repr(vars(self.store)))

    def test_a_token_is_only_its_user_and_devices(self) -> None:
        _peer, token = self.logged_in("alice")
        self.assertEqual(self.login("bob", token, method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.login("alice", token, device="laptop", method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.login("alice", token[:-1] + bytes([token[-1] ^ 1]), method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.login("alice", token, method=schema.LOGIN_TOKEN).status, 0)

    def test_tokens_expire(self) -> None:
        _peer, token = self.logged_in("alice")
        self.clock.advance(3600)
        self.assertEqual(self.login("alice", token, method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED)

    def test_revoke_one_device_ends_its_session(self) -> None:
        phone, phone_token = self.logged_in("alice", "phone")
        laptop, laptop_token = self.logged_in("alice", "laptop")
        bob, _ = self.logged_in("bob")
        self.assertEqual(self.successResultOf(defer.ensureDeferred(self.hub.revoke("alice", "phone"))), 1)
        self.clock.advance(0)  # the coalesced write
        self.assertTrue(phone.closed)
        bye = [p for p in phone.received() if isinstance(p, packets.Bye)]
        self.assertEqual(bye[0].code, ErrorCode.AUTH_FAILED)
        self.assertIn("revoked", bye[0].reason)
        self.assertFalse(laptop.closed or bob.closed)
        self.assertEqual([c.device for c in self.hub.online("alice")], ["laptop"])
        self.assertEqual(self.login("alice", phone_token, method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED)
        self.assertEqual(self.login("alice", laptop_token, device="laptop", method=schema.LOGIN_TOKEN).status, 0)

    def test_revoke_a_user_ends_every_session(self) -> None:
        peers = [self.logged_in("alice", device)[0] for device in ("phone", "laptop", "tablet")]
        bob, _ = self.logged_in("bob")
        self.assertEqual(self.successResultOf(defer.ensureDeferred(self.hub.revoke("alice"))), 3)
        self.assertTrue(all(peer.closed for peer in peers))
        self.assertEqual(self.hub.online("alice"), ())
        self.assertFalse(bob.closed)
        self.assertEqual(self.login("alice", "alice-secret").status, 0, "the password still works")

    # Disabled users ------------------------------------------------------------------------

    def test_disable_through_the_hub(self) -> None:
        phone, token = self.logged_in("alice", "phone")
        laptop, _ = self.logged_in("alice", "laptop")
        bob, _ = self.logged_in("bob")
        self.assertEqual(self.successResultOf(defer.ensureDeferred(self.hub.disable("alice"))), 2)
        self.assertTrue(phone.closed and laptop.closed)
        self.assertFalse(bob.closed)
        refused = self.login("alice", "alice-secret")
        self.assertEqual((refused.status, refused.reason), (ErrorCode.AUTH_FAILED, "this account is disabled"))
        self.assertEqual(self.login("alice", token, method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED)
        wrong = self.login("alice", "guess", device="x")
        self.assertEqual((wrong.status, wrong.reason), (ErrorCode.AUTH_FAILED, "wrong user name or password"),
                         "without the password, a disabled account looks like any other")
        self.successResultOf(defer.ensureDeferred(self.hub.enable("alice")))
        self.clock.advance(30)  # the failures above locked the name for a while
        self.assertEqual(self.login("alice", "alice-secret").status, 0)
        self.assertEqual(self.login("alice", token, method=schema.LOGIN_TOKEN).status, ErrorCode.AUTH_FAILED, "tokens stay revoked")
        self.failureResultOf(defer.ensureDeferred(self.hub.disable("nobody")), UnknownUser)

    def test_a_disabled_account_is_no_password_oracle(self) -> None:
        """Its right password counts as a failure, so guessing it is limited like any other."""
        self.store.set_disabled("alice", True)
        for _ in range(3):
            self.assertEqual(self.login("alice", "alice-secret").reason, "this account is disabled")
        self.assertEqual(self.login("alice", "alice-secret").status, ErrorCode.RATE_LIMITED)

    def test_disabled_in_the_store_while_online_is_noticed_in_bounded_time(self) -> None:
        """``imkit user disable`` writes only to the store: the server logs the user out within the interval."""
        phone, _ = self.logged_in("alice", "phone")
        bob, _ = self.logged_in("bob")
        self.clock.advance(2)
        self.store.set_disabled("alice", True)  # what the CLI does, behind the server's back
        self.clock.advance(2.9)
        self.assertFalse(phone.closed)
        self.clock.advance(0.1)
        self.assertTrue(phone.closed)
        self.assertIn("this account is disabled", [p.reason for p in phone.received() if isinstance(p, packets.Bye)])
        self.assertFalse(bob.closed)
        self.clock.advance(50)
        self.assertFalse(bob.closed)

    def test_a_login_racing_the_disable_is_caught_by_the_check(self) -> None:
        """Disabled after the login's check but before it is online: the next look ends the session."""
        self.patch(self.store, "is_disabled", lambda name: defer.succeed(False))
        phone, _ = self.logged_in("alice")
        self.store._disabled.add("alice")
        self.clock.advance(5)
        self.assertTrue(phone.closed)

    def test_no_timer_while_nobody_is_online(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])
        phone, _ = self.logged_in("alice")
        self.assertEqual(len([c for c in self.clock.getDelayedCalls() if c.func == self.hub._check_accounts]), 1)
        phone.protocol.connectionLost(None)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func == self.hub._check_accounts], [])
        self.clock.advance(100)  # and nothing looks for disabled users meanwhile

    def test_checks_can_be_turned_off(self) -> None:
        settings = ServerSettings(account_check_interval=0, idle_timeout=10_000.0)
        hub = Hub(self.store, self.passwords, self.clock, settings)
        peer = Peer(IMServerFactory(hub, settings, self.clock))
        self.assertEqual(peer.login("alice", "alice-secret").status, 0)
        self.store.set_disabled("alice", True)
        self.clock.advance(1000)
        self.assertFalse(peer.closed)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func == hub._check_accounts], [])


class RehashTests(SynchronousTestCase):
    def test_parameters_are_stored_in_each_hash(self) -> None:
        weak = Passwords(PasswordHasher(time_cost=1, memory_cost=8, parallelism=1), defer.maybeDeferred)
        strong = Passwords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1), defer.maybeDeferred)
        old = weak.hash("pw").result
        self.assertTrue(old.startswith("$argon2id$v=19$m=8,t=1,p=1$"))
        self.assertTrue(strong.verify(old, "pw").result, "an old hash still verifies under new parameters")
        self.assertTrue(strong.needs_rehash(old))
        self.assertFalse(weak.needs_rehash(old))

    def test_raised_parameters_rehash_at_the_next_password_login_only(self) -> None:
        """Token logins (no password at hand) keep the old hash; the next password login replaces it."""
        clock = Clock()
        store = MemoryStore()
        weak = CountingPasswords(PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
        old = weak.hash("pw").result
        store.add_user("alice", old)
        strong = CountingPasswords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
        settings = ServerSettings()
        factory = IMServerFactory(Hub(store, strong, clock, settings), settings, clock)
        token = Peer(factory).login("alice", "pw").resume_token
        new = store.password_hash("alice").result
        self.assertNotEqual(new, old)
        self.assertTrue(new.startswith("$argon2id$v=19$m=16,t=2,p=1$"))
        self.assertEqual(Peer(factory).login("alice", token, method=schema.LOGIN_TOKEN).status, 0)
        self.assertEqual(store.password_hash("alice").result, new)
        self.assertEqual(Peer(factory).login("alice", "pw", device="laptop").status, 0)
        self.assertEqual(store.password_hash("alice").result, new, "a current hash is not rehashed again")


# The store and the command line ----------------------------------------------------------------


class ScratchDirectory:
    def scratch(self) -> str:
        if not hasattr(self, "_scratch"):
            self._scratch = tempfile.mkdtemp(prefix="imkit-accounts-")
            self.addCleanup(shutil.rmtree, self._scratch, True)
        return self._scratch


class DisabledUsersOnSQLiteTests(ScratchDirectory, TestCase):
    async def test_version_4_database_is_upgraded(self) -> None:
        """A version 4 file gains the disabled flag (everyone enabled) and the same schema as a new file."""
        from test_store_sqlite import V3_SCHEMA, schema_of

        path = os.path.join(self.scratch(), "v4.db")
        connection = sqlite3.connect(path)
        for statement in V3_SCHEMA + sqlite_module._MIGRATIONS[3]:
            connection.execute(statement)
        connection.executemany("INSERT INTO users (name, password_hash) VALUES (?, ?)", [("alice", "ha"), ("bob", "hb")])
        connection.execute("INSERT INTO tokens (user, device, digest, expires_at) VALUES ('alice', 'phone', 'd', 9)")
        connection.execute("PRAGMA user_version = 4")
        connection.commit()
        connection.close()
        store = SQLiteStore(path)
        await store.open()
        try:
            self.assertEqual(await store.disabled_users(), [])
            self.assertEqual(await store.set_disabled("alice", True), 1)
            self.assertEqual(await store.disabled_users(), ["alice"])
            self.assertEqual(await store.password_hash("alice"), "ha")
        finally:
            await store.close()
        connection = sqlite3.connect(path)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], sqlite_module.SCHEMA_VERSION)
        connection.close()
        fresh = os.path.join(self.scratch(), "new.db")
        connection = sqlite3.connect(fresh, isolation_level=None)
        SQLiteStore(fresh)._create_schema(connection)
        connection.close()
        self.assertEqual(schema_of(path), schema_of(fresh))

    async def test_server_notices_the_cli_disabling_a_user(self) -> None:
        """The CLI's own store object writes the flag into the server's file; the hub's next look finds it."""
        path = os.path.join(self.scratch(), "imkit.sqlite3")
        server_store = SQLiteStore(path)
        await server_store.open()
        self.addCleanup(server_store.close)
        passwords = Passwords.fast_for_tests()
        for name in ("alice", "bob"):
            await server_store.add_user(name, await passwords.hash(f"{name}-pw"))
        clock = Clock()
        clock.advance(T0)
        settings = ServerSettings(account_check_interval=5.0, idle_timeout=10_000.0)
        hub = Hub(server_store, passwords, clock, settings)
        factory = IMServerFactory(hub, settings, clock)

        async def settle() -> None:
            for _ in range(100):
                await deferLater(reactor, 0.005, lambda: None)
                clock.advance(0)

        peers = {}
        for name in ("alice", "bob"):
            peers[name] = Peer(factory)
            peers[name].send(codec.encode(packets.Hello(1, 1, "t")), codec.encode(packets.Login(schema.LOGIN_PASSWORD, name, "phone", f"{name}-pw".encode())))
        await settle()
        self.assertEqual(sorted(user for user in ("alice", "bob") if hub.online(user)), ["alice", "bob"])
        await self.run_command("user", "disable", "alice", "--store", "sqlite:" + path)
        await settle()
        self.assertFalse(peers["alice"].closed, "not before the next look")
        clock.advance(5)
        await settle()
        self.assertTrue(peers["alice"].closed)
        self.assertEqual(hub.online("alice"), ())
        self.assertFalse(peers["bob"].closed)
        hub.shutdown()

    async def run_command(self, *argv: str) -> str:
        args = cli._build_parser().parse_args(list(argv))
        job = args.prepare(args)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        try:
            await job(None)
        finally:
            self.patch(sys, "stdout", sys.__stdout__)
        return out.getvalue()

    async def test_cli_disable_and_enable(self) -> None:
        path = os.path.join(self.scratch(), "imkit.sqlite3")
        store = "sqlite:" + path
        for name in ("alice", "bob"):
            await self.run_command("user", "add", name, "--password", "pw", "--store", store)
        sqlite = SQLiteStore(path)
        await sqlite.open()
        try:
            await sqlite.set_token("d1", "bob", "phone", 2**40)
        finally:
            await sqlite.close()
        output = await self.run_command("user", "disable", "bob", "--store", store)
        self.assertEqual(output, "disabled bob; revoked 1 resume token(s); a running server logs them out shortly\n")
        self.assertEqual(await self.run_command("user", "list", "--disabled", "--store", store), "bob\n")
        self.assertEqual(await self.run_command("user", "list", "--store", store), "alice\nbob\n")
        self.assertEqual(await self.run_command("user", "enable", "bob", "--store", store), "enabled bob\n")
        self.assertEqual(await self.run_command("user", "list", "--disabled", "--store", store), "")
        for command in ("disable", "enable"):
            with self.assertRaises(cli.CommandFailed) as caught:
                await self.run_command("user", command, "nobody", "--store", store)
            self.assertIn("no user 'nobody'", str(caught.exception))

    def test_revoke_help_says_live_sessions_last_until_they_reconnect(self) -> None:
        parser = cli._build_parser()
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            parser.parse_args(["user", "revoke", "--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn("stays connected until it next reconnects", text)
        self.assertIn("disable the user", text)


class OptionTests(SynchronousTestCase):
    def test_login_limiter_and_account_check_options(self) -> None:
        options = Options()
        options.parseOptions(["--store", "memory:"])
        defaults = options.settings
        self.assertEqual(
            (defaults.login_failures, defaults.login_failures_per_ip, defaults.login_window, defaults.login_backoff,
             defaults.login_backoff_max, defaults.account_check_interval),
            (5, 20, 300.0, 30.0, 900.0, 10.0),
        )
        options = Options()
        options.parseOptions([
            "--store", "memory:", "--login-failures", "0", "--login-failures-per-ip", "50", "--login-window", "60",
            "--login-backoff", "5", "--login-backoff-max", "600", "--account-check-interval", "0",
        ])
        settings = options.settings
        self.assertEqual(
            (settings.login_failures, settings.login_failures_per_ip, settings.login_window, settings.login_backoff,
             settings.login_backoff_max, settings.account_check_interval),
            (0, 50, 60.0, 5.0, 600.0, 0.0),
        )
        from twisted.python import usage

        for bad in (["--login-failures", "-1"], ["--login-backoff", "0"], ["--account-check-interval", "soon"]):
            with self.assertRaises(usage.UsageError):
                Options().parseOptions(["--store", "memory:"] + bad)
