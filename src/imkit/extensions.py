"""
Custom packet types: a construct body, a server handler and a client callback.

An extension packet is numbered in the reserved range 0x8000-0xFFFF (``schema.EXTENSION_KINDS``)
and travels inside the reliable message stream: its construct-encoded body is the body of an
ordinary message whose content type names the kind (``application/x-imkit-8001``).  So it is
stored, sequenced, acknowledged, resent and deduplicated exactly like text, and a custom kind
needs no protocol work of its own — only its declaration, what the server should check, and what
the receiving client should do::

    vote = PacketType(0x8001, "vote", Struct("poll" / Int32ub, "choice" / Int8ub))

    @vote.on_server
    def check_vote(context, value):
        if value.choice > 3:
            raise Rejected("no such choice")

    client.on_packet(vote, lambda message, value: print(message.sender, "voted", value.choice))
    client.send_packet(vote, {"poll": 1, "choice": 2}, to="pollbot")

Bodies are decoded with the same generated, length-checked codec as the core packets when the
declaration uses the vocabulary it understands, and with construct itself otherwise.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Iterable

import attrs
from construct import ConstructError, Struct, Terminated

from imkit.checks import Rejected
from imkit.model import Item
from imkit.wire import codec
from imkit.wire.errors import DecodeError, ErrorCode
from imkit.wire.schema import EXTENSION_KINDS

CONTENT_TYPE_PREFIX = "application/x-imkit-"


class ExtensionError(ValueError):
    """A packet type that cannot be registered (kind out of range, name or kind taken)."""


@attrs.frozen
class ExtensionContext:
    """Who sent an extension packet, from which device, into which conversation."""

    sender: str
    device: str
    conversation: str


ServerHandler = Callable[[ExtensionContext, Any], Any]


@attrs.define(eq=False)
class PacketType:
    """One custom packet kind. Create it once and share it between server and client code."""

    kind: int
    name: str
    body: Struct
    server_handler: ServerHandler | None = None
    value_class: type = attrs.field(init=False)
    _decode: Callable[[bytes], Any] = attrs.field(init=False, repr=False)
    _encode: Callable[[Any], bytes] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in EXTENSION_KINDS:
            raise ExtensionError(f"extension kind {self.kind:#x} is outside the reserved range 0x8000-0xffff")
        if not isinstance(self.body, Struct):
            raise ExtensionError(f"the body of {self.name!r} must be a construct Struct")
        self.value_class = _value_class(self.name, self.body)
        try:
            compiled, _ = codec.generate({self.kind: self.body}, {self.kind: self.value_class})
        except codec.UnsupportedConstruct:
            self._decode = self._decode_with_construct
            self._encode = lambda value: self.body.build(attrs.asdict(value, recurse=True) if attrs.has(type(value)) else value)
        else:
            fast = compiled[self.kind]
            self._decode = lambda data: fast.decode(data, 0, len(data))
            self._encode = lambda value: fast.encode(value)[8:]

    @property
    def content_type(self) -> str:
        return f"{CONTENT_TYPE_PREFIX}{self.kind:04x}"

    def on_server(self, handler: ServerHandler) -> ServerHandler:
        """Decorator: run ``handler(context, value)`` on the server before such a packet is stored."""
        self.server_handler = handler
        return handler

    def make(self, **fields: Any) -> Any:
        """A value of this packet type from its fields."""
        return self.value_class(**fields)

    def encode(self, value: Any) -> bytes:
        """Body bytes of a value (an instance of ``value_class``, or a dict of its fields)."""
        if isinstance(value, dict):
            value = self._from_dict(value)
        try:
            return self._encode(value)
        except (ConstructError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"cannot encode {self.name}: {error}") from None

    def decode(self, data: bytes) -> Any:
        """The value carried by body bytes; raises DecodeError for anything malformed."""
        try:
            return self._decode(bytes(data))
        except DecodeError:
            raise
        except Exception as error:  # construct raises many kinds; all of them mean "malformed"
            raise DecodeError(f"bad {self.name} body: {error}") from None

    def item(self, value: Any) -> Item:
        """The message item carrying ``value``."""
        return Item(self.content_type, self.encode(value))

    def _from_dict(self, fields: dict) -> Any:
        return codec_from_dict(self.body, self.value_class, fields)

    def _decode_with_construct(self, data: bytes) -> Any:
        container = Struct(*self.body.subcons, Terminated).parse(data)
        return codec_from_dict(self.body, self.value_class, dict(container))


def _value_class(name: str, body: Struct) -> type:
    """A frozen attrs class with the declaration's field names, for values of this kind."""
    fields = [sub.name for sub in body.subcons if sub.name]
    class_name = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) or "Packet"
    return attrs.make_class(class_name, {field: attrs.field() for field in fields}, frozen=True, slots=True)


def codec_from_dict(body: Struct, cls: type, fields: dict) -> Any:
    """Build a value from a dict (or construct Container), ignoring construct's private keys."""
    names = [sub.name for sub in body.subcons if sub.name]
    return cls(**{name: fields[name] for name in names})


class Extensions:
    """The packet types one server or client understands, by kind and by content type."""

    def __init__(self, types: Iterable[PacketType] = ()) -> None:
        self._by_kind: dict[int, PacketType] = {}
        self._by_content_type: dict[str, PacketType] = {}
        for packet_type in types:
            self.register(packet_type)

    def __iter__(self):
        return iter(self._by_kind.values())

    def __len__(self) -> int:
        return len(self._by_kind)

    def register(self, packet_type: PacketType) -> PacketType:
        existing = self._by_kind.get(packet_type.kind)
        if existing is not None and existing is not packet_type:
            raise ExtensionError(f"extension kind {packet_type.kind:#x} is taken by {existing.name!r}")
        self._by_kind[packet_type.kind] = packet_type
        self._by_content_type[packet_type.content_type] = packet_type
        return packet_type

    def for_content_type(self, content_type: str) -> PacketType | None:
        return self._by_content_type.get(content_type)

    def server_check(self, sender: str, device: str, conversation: str, item: Item) -> Any:
        """A hub submission check: decode extension packets and run their server handlers."""
        if not item.content_type.startswith(CONTENT_TYPE_PREFIX):
            return None
        packet_type = self._by_content_type.get(item.content_type)
        if packet_type is None:
            raise Rejected(f"this server does not know the packet type {item.content_type}", ErrorCode.REJECTED)
        try:
            value = packet_type.decode(item.body)
        except DecodeError as error:
            raise Rejected(f"malformed {packet_type.name}: {error.reason}", ErrorCode.REJECTED) from None
        if packet_type.server_handler is None:
            return None
        return packet_type.server_handler(ExtensionContext(sender, device, conversation), value)


def load(reference: str) -> list[PacketType]:
    """
    Import packet types named ``module:attribute`` (as given to ``--extension``): the attribute
    may be a PacketType, an Extensions registry, or a list of PacketTypes.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ExtensionError(f"--extension takes MODULE:ATTRIBUTE, not {reference!r}")
    if os.getcwd() not in sys.path:
        # twistd does not put the working directory on the path; extensions usually live there.
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ExtensionError(f"cannot import {module_name!r} for --extension {reference}: {error}") from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ExtensionError(f"{module_name!r} has no attribute {attribute!r} for --extension {reference}") from None
    if isinstance(found, PacketType):
        return [found]
    if isinstance(found, Extensions):
        return list(found)
    if not isinstance(found, (list, tuple)) or not all(isinstance(item, PacketType) for item in found):
        raise ExtensionError(f"--extension {reference} names neither a PacketType nor a list of them")
    return found
