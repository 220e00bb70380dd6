"""
End to end over real loopback TLS: the twistd plugin's service with SQLite, and two IMClients.
"""

from __future__ import annotations

import os
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from imkit.client import ErrorCode, IMClient, Item, SendRejected, development_ca, tls_endpoint
from imkit.passwords import Passwords
from imkit.server import tap

PASSWORDS = Passwords.fast_for_tests()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EndToEndTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.database = os.path.join(tempfile.mkdtemp(), "imkit.sqlite3")
        self.services: list = []
        self.clients: list[IMClient] = []

    async def start_server(self, port: int = 0, *extra: str) -> int:
        options = tap.Options()
        options.parseOptions(["--listen", f"tls:{port}:interface=127.0.0.1", "--store", f"sqlite:{self.database}", *extra])
        service = tap.makeService(options, reactor=reactor, passwords=PASSWORDS)
        service.startService()
        self.services.append(service)
        (listening,) = await service.whenListening()
        self.service = service
        return listening.getHost().port

    async def stop_server(self) -> None:
        service = self.services.pop()
        await service.stopService()

    async def add_users(self, *names: str) -> None:
        for name in names:
            await self.service.store.add_user(name, await PASSWORDS.hash(f"{name}-pw"))

    def client(self, port: int, user: str, device: str = "default", **kwargs) -> IMClient:
        endpoint = tls_endpoint(reactor, f"localhost:{port}", development_ca())
        client = IMClient(endpoint, user, f"{user}-pw", device, reactor=reactor, **kwargs)
        client.startService()
        self.clients.append(client)
        return client

    async def tearDownAsync(self) -> None:
        for client in self.clients:
            await client.stopService()
        while self.services:
            await self.stop_server()

    def tearDown(self) -> defer.Deferred:
        return defer.ensureDeferred(self.tearDownAsync())

    def test_chat_exactly_once_in_order(self) -> defer.Deferred:
        """Two users over TLS: every message arrives once, in order, for both of them."""

        async def scenario() -> None:
            port = await self.start_server()
            await self.add_users("alice", "bob")
            alice, bob = self.client(port, "alice"), self.client(port, "bob")
            seen_by_bob, all_seen = collect(bob, 51, lambda m: (m.seq, m.sender, m.body))
            await defer.gatherResults([alice.caughtUp(), bob.caughtUp()])
            receipts = await defer.gatherResults([alice.send(to="bob", body=f"m{i}") for i in range(50)])
            self.assertEqual([r.seq for r in receipts], list(range(1, 51)))
            self.assertEqual(len({r.server_id for r in receipts}), 50)
            reply = await bob.send(to="alice", body="got them")
            self.assertEqual(reply.seq, 51)
            await all_seen
            self.assertEqual(seen_by_bob[:50], [(i + 1, "alice", f"m{i}".encode()) for i in range(50)])
            self.assertEqual(seen_by_bob[50], (51, "bob", b"got them"))

        return defer.ensureDeferred(scenario())

    def test_server_restart_mid_stream(self) -> defer.Deferred:
        """The server stops and starts again on the same store while messages flow: none lost, none doubled."""

        async def scenario() -> None:
            port = await self.start_server()
            await self.add_users("alice", "bob")
            alice, bob = self.client(port, "alice"), self.client(port, "bob", state_path=os.path.join(tempfile.mkdtemp(), "bob.json"))
            seen, all_seen = collect(bob, 60, lambda m: m.body)
            await defer.gatherResults([alice.caughtUp(), bob.caughtUp()])
            first = [alice.send(to="bob", body=f"before {i}") for i in range(30)]
            await defer.gatherResults(first)
            await self.stop_server()
            during = [alice.send(to="bob", body=f"during {i}") for i in range(30)]
            await self.start_server(port)
            receipts = await defer.gatherResults(during)
            self.assertEqual([r.seq for r in receipts], list(range(31, 61)))
            await all_seen
            expected = [f"before {i}".encode() for i in range(30)] + [f"during {i}".encode() for i in range(30)]
            self.assertEqual(seen, expected)

        return defer.ensureDeferred(scenario())

    def test_offline_recipient_and_bundle(self) -> defer.Deferred:
        """Messages to an offline user wait in the store; a bundle arrives whole, after the rest."""

        async def scenario() -> None:
            port = await self.start_server()
            await self.add_users("alice", "bob")
            alice = self.client(port, "alice")
            await alice.caughtUp()
            await alice.send(to="bob", body="are you there?")
            await alice.send_bundle([Item("text/plain", b"Goodbye"), Item("application/x-demo-control", b"remove bob")], to="bob")
            bob = self.client(port, "bob")
            batches, all_seen = collect(bob, 3, lambda m: (m.seq, m.body, m.bundle_remaining))
            await bob.caughtUp()
            await all_seen
            self.assertEqual(batches, [(1, b"are you there?", 0), (2, b"Goodbye", 1), (3, b"remove bob", 0)])

        return defer.ensureDeferred(scenario())


    def test_custom_packet_type(self) -> defer.Deferred:
        """examples/poll.py over the real stack: the server refuses a bad vote, the tally counts good ones once."""
        sys.path.insert(0, ROOT)
        self.addCleanup(sys.path.remove, ROOT)
        from examples.poll import VOTE, Tally

        async def scenario() -> None:
            port = await self.start_server(0, "--extension", "examples.poll:POLL_TYPES")
            await self.add_users("alice", "bob")
            alice, bob = self.client(port, "alice"), self.client(port, "bob")
            tally = Tally(bob)
            _, arrived = collect(bob, 2)
            await alice.send_packet(VOTE, {"poll": 1, "choice": 2, "comment": "yes"}, to="bob")
            with self.assertRaises(SendRejected) as caught:
                await alice.send_packet(VOTE, VOTE.make(poll=1, choice=9, comment=""), to="bob")
            self.assertEqual(caught.exception.code, ErrorCode.REJECTED)
            await alice.send_packet(VOTE, {"poll": 1, "choice": 2, "comment": ""}, to="bob")
            await arrived
            self.assertEqual(tally.counts, {1: [0, 0, 2, 0]})

        return defer.ensureDeferred(scenario())


def collect(client: IMClient, count: int, view=lambda m: m) -> tuple[list, defer.Deferred]:
    """What ``client`` hands to its application, and a Deferred fired once ``count`` arrived."""
    seen: list = []
    done: defer.Deferred = defer.Deferred()

    def take(message) -> None:
        seen.append(view(message))
        if len(seen) == count:
            done.callback(seen)

    client.on_message(take)
    return seen, done
