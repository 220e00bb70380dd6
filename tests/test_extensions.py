"""Custom packet types: declaration, codec, and the server check that runs their handlers."""

from __future__ import annotations

from construct import Array, Int8ub, Int32ub, PascalString, Struct
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from imkit.extensions import ExtensionError, Extensions, PacketType, load
from imkit.model import Item
from imkit.checks import Rejected
from imkit.wire.errors import DecodeError

VOTE = Struct("poll" / Int32ub, "choice" / Int8ub, "comment" / PascalString(Int8ub, "utf8"))


class PacketTypeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        vote = PacketType(0x8001, "vote", VOTE)
        value = vote.make(poll=7, choice=2, comment="yes")
        self.assertEqual(vote.decode(vote.encode(value)), value)
        self.assertEqual(vote.encode({"poll": 7, "choice": 2, "comment": "yes"}), vote.encode(value))
        self.assertEqual(vote.content_type, "application/x-imkit-8001")

    def test_bytes_match_construct(self) -> None:
        """The fast codec and construct agree, so the declaration stays the source of truth."""
        vote = PacketType(0x8001, "vote", VOTE)
        value = vote.make(poll=1, choice=3, comment="ok")
        self.assertEqual(vote.encode(value), VOTE.build(dict(poll=1, choice=3, comment="ok")))

    @given(st.binary(max_size=40))
    def test_garbage_is_a_decode_error(self, data: bytes) -> None:
        vote = PacketType(0x8001, "vote", VOTE)
        try:
            value = vote.decode(data)
        except DecodeError:
            return
        self.assertEqual(vote.encode(value), data)

    def test_unsupported_declarations_fall_back_to_construct(self) -> None:
        """Constructs the generator does not know still work, through construct itself."""
        grid = PacketType(0x8002, "grid", Struct("cells" / Array(3, Int8ub)))
        value = grid.make(cells=[1, 2, 3])
        self.assertEqual(grid.encode(value), b"\x01\x02\x03")
        self.assertEqual(list(grid.decode(b"\x01\x02\x03").cells), [1, 2, 3])
        self.assertRaises(DecodeError, grid.decode, b"\x01\x02")
        self.assertRaises(DecodeError, grid.decode, b"\x01\x02\x03\x04")

    def test_kind_range_and_collisions(self) -> None:
        self.assertRaises(ExtensionError, PacketType, 0x0100, "core", VOTE)
        registry = Extensions([PacketType(0x8001, "vote", VOTE)])
        self.assertRaises(ExtensionError, registry.register, PacketType(0x8001, "other", VOTE))

    def test_load(self) -> None:
        (loaded,) = load("test_extensions:LOADABLE")
        self.assertIs(loaded, LOADABLE)
        for bad in ("nocolon", "no_such_module_xyz:X", "test_extensions:MISSING", "test_extensions:VOTE"):
            self.assertRaises(ExtensionError, load, bad)


LOADABLE = PacketType(0x8003, "loadable", VOTE)


class ServerCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.vote = PacketType(0x8001, "vote", VOTE)
        self.seen = []

        @self.vote.on_server
        def check(context, value):
            self.seen.append((context.sender, value.choice))
            if value.choice > 3:
                raise Rejected("no such choice")

        self.registry = Extensions([self.vote])

    def check(self, item: Item):
        return defer.maybeDeferred(self.registry.server_check, "alice", "phone", "dm:alice:bob", item)

    def test_handler_allows_and_rejects(self) -> None:
        self.assertIsNone(self.successResultOf(self.check(self.vote.item(self.vote.make(poll=1, choice=2, comment="")))))
        failure = self.failureResultOf(self.check(self.vote.item(self.vote.make(poll=1, choice=9, comment=""))), Rejected)
        self.assertEqual(failure.value.reason, "no such choice")
        self.assertEqual(self.seen, [("alice", 2), ("alice", 9)])

    def test_plain_messages_pass_untouched(self) -> None:
        self.assertIsNone(self.successResultOf(self.check(Item("text/plain", b"hello"))))

    def test_unknown_or_malformed_extension_is_rejected(self) -> None:
        self.failureResultOf(self.check(Item("application/x-imkit-9999", b"")), Rejected)
        failure = self.failureResultOf(self.check(Item(self.vote.content_type, b"\x00")), Rejected)
        self.assertIn("malformed vote", failure.value.reason)
