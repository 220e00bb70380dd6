"""
Operations: message items the server applies as well as stores (contacts, groups, recall, edit).

Their content types and bodies are declared in ``imkit.wire.schema`` (``OPERATION_BODIES``); this
module turns bodies into values and back, strictly: a body that does not parse exactly is an
error, never a guess.  Operations are rare next to messages, so construct's own parser does the
work here; the hot path never comes through this module.
"""

from __future__ import annotations

from typing import Any

import attrs
from construct import ConstructError, Struct, Terminated

from imkit.model import Item
from imkit.wire import schema
from imkit.wire.errors import DecodeError


@attrs.frozen
class NoBody:
    """The body of operations that need none: the conversation and the sender say it all."""


@attrs.frozen
class GroupCreate:
    title: str
    users: tuple[str, ...]


@attrs.frozen
class UserList:
    users: tuple[str, ...]


@attrs.frozen
class Recall:
    seq: int


@attrs.frozen
class Edit:
    seq: int
    content_type: str
    body: bytes


@attrs.frozen
class Retention:
    seconds: int


_VALUE_CLASSES: dict[str, type] = {
    schema.CONTACT_ADD: NoBody,
    schema.CONTACT_REMOVE: NoBody,
    schema.CONTACT_BLOCK: NoBody,
    schema.CONTACT_UNBLOCK: NoBody,
    schema.GROUP_CREATE: GroupCreate,
    schema.GROUP_ADD: UserList,
    schema.GROUP_REMOVE: UserList,
    schema.GROUP_LEAVE: NoBody,
    schema.RECALL: Recall,
    schema.EDIT: Edit,
    schema.RETENTION: Retention,
    schema.RECALLED: NoBody,
}

_EXACT = {content_type: Struct(*body.subcons, Terminated) for content_type, body in schema.OPERATION_BODIES.items()}


def is_operation(content_type: str) -> bool:
    """True for every content type in imkit's reserved namespace (known or not)."""
    return content_type.startswith(schema.OPERATION_PREFIX)


def decode(content_type: str, body: bytes) -> Any:
    """The value of an operation body; DecodeError if unknown or malformed."""
    declaration = _EXACT.get(content_type)
    if declaration is None:
        raise DecodeError(f"{content_type!r} is not an imkit operation")
    try:
        parsed = declaration.parse(bytes(body))
    except (ConstructError, UnicodeDecodeError) as error:
        raise DecodeError(f"malformed {content_type} body: {error}") from None
    cls = _VALUE_CLASSES[content_type]
    fields = {}
    for field in attrs.fields(cls):
        value = parsed[field.name]
        fields[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**fields)


def encode(content_type: str, value: Any = None) -> bytes:
    """The body bytes of an operation value (None for operations without a body)."""
    declaration = schema.OPERATION_BODIES[content_type]
    if value is None:
        value = NoBody()
    if type(value) is not _VALUE_CLASSES[content_type]:
        raise TypeError(f"{content_type} takes a {_VALUE_CLASSES[content_type].__name__}, not {value!r}")
    return declaration.build({field.name: getattr(value, field.name) for field in attrs.fields(type(value))})


def item(content_type: str, value: Any = None) -> Item:
    """A message item carrying an operation."""
    return Item(content_type, encode(content_type, value))


# Shorthands the client library and the CLI use --------------------------------------------------


def contact_add() -> Item:
    return item(schema.CONTACT_ADD)


def contact_remove() -> Item:
    return item(schema.CONTACT_REMOVE)


def contact_block() -> Item:
    return item(schema.CONTACT_BLOCK)


def contact_unblock() -> Item:
    return item(schema.CONTACT_UNBLOCK)


def group_create(title: str, users: tuple[str, ...] | list[str] = ()) -> Item:
    return item(schema.GROUP_CREATE, GroupCreate(title, tuple(users)))


def group_add(users: tuple[str, ...] | list[str]) -> Item:
    return item(schema.GROUP_ADD, UserList(tuple(users)))


def group_remove(users: tuple[str, ...] | list[str]) -> Item:
    return item(schema.GROUP_REMOVE, UserList(tuple(users)))


def group_leave() -> Item:
    return item(schema.GROUP_LEAVE)


def recall(seq: int) -> Item:
    return item(schema.RECALL, Recall(seq))


def edit(seq: int, content_type: str, body: bytes) -> Item:
    return item(schema.EDIT, Edit(seq, content_type, body))


def retention(seconds: int) -> Item:
    return item(schema.RETENTION, Retention(seconds))
