"""Operation bodies: exact round trips, and anything malformed is a DecodeError, never a guess."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imkit import operations
from imkit.wire import schema
from imkit.wire.errors import DecodeError

names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)

values = st.one_of(
    st.tuples(st.sampled_from([schema.CONTACT_ADD, schema.CONTACT_REMOVE, schema.CONTACT_BLOCK,
                               schema.CONTACT_UNBLOCK, schema.GROUP_LEAVE, schema.RECALLED]), st.just(operations.NoBody())),
    st.tuples(st.just(schema.GROUP_CREATE), st.builds(operations.GroupCreate, names, st.lists(names, max_size=5).map(tuple))),
    st.tuples(st.sampled_from([schema.GROUP_ADD, schema.GROUP_REMOVE]), st.builds(operations.UserList, st.lists(names, max_size=5).map(tuple))),
    st.tuples(st.just(schema.RECALL), st.builds(operations.Recall, st.integers(0, 2**64 - 1))),
    st.tuples(st.just(schema.EDIT), st.builds(operations.Edit, st.integers(0, 2**64 - 1), names, st.binary(max_size=50))),
    st.tuples(st.just(schema.RETENTION), st.builds(operations.Retention, st.integers(0, 2**32 - 1))),
)


def test_every_declared_operation_has_a_value_class() -> None:
    for content_type in schema.OPERATION_BODIES:
        assert operations.is_operation(content_type)
        assert operations.decode(content_type, operations.encode(content_type, _empty(content_type))) is not None


def _empty(content_type: str):
    return {
        schema.GROUP_CREATE: operations.GroupCreate("", ()),
        schema.GROUP_ADD: operations.UserList(()),
        schema.GROUP_REMOVE: operations.UserList(()),
        schema.RECALL: operations.Recall(0),
        schema.EDIT: operations.Edit(0, "", b""),
        schema.RETENTION: operations.Retention(0),
    }.get(content_type)


@given(values)
def test_round_trip(pair) -> None:
    content_type, value = pair
    body = operations.encode(content_type, value)
    assert operations.decode(content_type, body) == value
    assert operations.item(content_type, value).body == body


@given(values, st.data())
def test_truncated_or_extended_bodies_are_refused(pair, data) -> None:
    content_type, value = pair
    body = operations.encode(content_type, value)
    if body:
        cut = data.draw(st.integers(0, len(body) - 1))
        with pytest.raises(DecodeError):
            operations.decode(content_type, body[:cut])
    with pytest.raises(DecodeError):
        operations.decode(content_type, body + data.draw(st.binary(min_size=1, max_size=5)))


@given(st.binary(max_size=40))
def test_garbage_never_escapes_as_another_exception(body) -> None:
    for content_type in schema.OPERATION_BODIES:
        try:
            operations.decode(content_type, body)
        except DecodeError:
            pass


def test_unknown_operation_and_wrong_value() -> None:
    assert operations.is_operation("imkit/teleport")
    assert not operations.is_operation("text/plain")
    with pytest.raises(DecodeError):
        operations.decode("imkit/teleport", b"")
    with pytest.raises(TypeError):
        operations.encode(schema.RECALL, operations.UserList(("bob",)))


def test_exact_bytes() -> None:
    assert operations.group_create("team", ["bob"]).body == b"\x00\x04team\x00\x01\x00\x03bob"
    assert operations.recall(2).body == b"\x00" * 7 + b"\x02"
    assert operations.contact_remove().body == b""
