"""
examples/group_bot.py over the real stack: the twistd plugin's service on loopback TLS, the bot's
own ``start`` and ``Moderator`` on an IMClient, and members as IMClients.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from imkit.client import Event, IMClient, describe, development_ca, tls_endpoint
from imkit.passwords import Passwords
from imkit.server import tap

PASSWORDS = Passwords.fast_for_tests()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Heard:
    """What a client hears, described; ``until(predicate)`` fires with the first event that matches."""

    def __init__(self, client: IMClient) -> None:
        self.events: list[Event] = []
        self._waiting: list[tuple[Callable[[Event], bool], defer.Deferred]] = []
        client.on_message(self._take)

    def _take(self, message: Any) -> None:
        event = describe(message)
        self.events.append(event)
        for waiting in list(self._waiting):
            if waiting[0](event):
                self._waiting.remove(waiting)
                waiting[1].callback(event)

    def until(self, predicate: Callable[[Event], bool]) -> defer.Deferred:
        for event in self.events:
            if predicate(event):
                return defer.succeed(event)
        found: defer.Deferred = defer.Deferred()
        self._waiting.append((predicate, found))
        return found.addTimeout(10, reactor).addErrback(self._nothing_matched)

    def _nothing_matched(self, failure: Any) -> None:
        failure.trap(defer.TimeoutError)
        raise AssertionError(f"not heard within 10 seconds; heard {[(e.kind, e.sender, e.text) for e in self.events]}")


class GroupBotTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        sys.path.insert(0, ROOT)
        self.addCleanup(sys.path.remove, ROOT)
        self.clients: list[IMClient] = []

    async def start_server(self) -> int:
        options = tap.Options()
        options.parseOptions(["--listen", "tls:0:interface=127.0.0.1", "--store", "memory:"])
        service = tap.makeService(options, reactor=reactor, passwords=PASSWORDS)
        service.startService()
        self.addCleanup(service.stopService)
        (listening,) = await service.whenListening()
        for name in ("mod", "alice", "bob", "carol"):
            await service.store.add_user(name, await PASSWORDS.hash(f"{name}-pw"))
        return listening.getHost().port

    def client(self, port: int, user: str, device: str = "phone") -> IMClient:
        client = IMClient(tls_endpoint(reactor, f"localhost:{port}", development_ca()), user, f"{user}-pw", device, reactor=reactor)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    def test_welcome_members_and_ban(self) -> defer.Deferred:
        """Members added by anyone are welcomed, !members is answered, a banned word gets its sender removed after a warning."""
        from examples import group_bot

        async def scenario() -> None:
            port = await self.start_server()
            alice, bob = self.client(port, "alice"), self.client(port, "bob")
            heard_by_alice, heard_by_bob = Heard(alice), Heard(bob)
            await defer.gatherResults([alice.caughtUp(), bob.caughtUp()])
            args = group_bot.parse_args(["--user", "mod", "--password", "mod-pw", "--member", "alice", "--member", "bob", "--ban", "spam"])
            moderator = await group_bot.start(self.client(port, "mod", "group-bot"), args)
            group = moderator.group

            def said(text: str) -> Callable[[Event], bool]:
                return lambda e: e.conversation == group and e.kind == "message" and e.sender == "mod" and e.text == text

            await heard_by_alice.until(said("Welcome, alice and bob!  Please do not say: spam."))
            await alice.add_members(group, ["carol"])
            await heard_by_bob.until(said("Welcome, carol!  Please do not say: spam."))
            await alice.send(group=group, body="!members")
            await heard_by_alice.until(said("Members: alice, bob, carol, mod (owner)"))

            await bob.send(group=group, body="Cheap SPAM, anyone?")
            removal = await heard_by_bob.until(lambda e: e.conversation == group and e.kind == "group.remove")
            self.assertEqual((removal.sender, removal.users), ("mod", ("bob",)))
            bob_saw = [(e.kind, e.sender, e.text) for e in heard_by_bob.events if e.conversation == group]
            self.assertEqual(bob_saw[-2:], [("message", "mod", "bob: spam is not allowed here. Goodbye."), ("group.remove", "mod", "")])
            self.assertEqual([m.user for m in await alice.members(group)], ["alice", "carol", "mod"])

        return defer.ensureDeferred(scenario())
