"""imkit.slots: records built straight into their slots are the records their __init__ builds."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imkit.model import Appended, Message
from imkit.slots import builder

messages = st.builds(
    Message,
    st.integers(1, 2**63 - 1),
    st.text(),
    st.integers(1, 2**63 - 1),
    st.text(),
    st.text(),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**63 - 1),
    st.text(),
    st.binary(),
    st.integers(0, 100),
)


@given(messages)
def test_built_message_is_the_message(message: Message) -> None:
    built = builder(Message)(*attrs.astuple(message, recurse=False))
    assert type(built) is Message
    assert built == message
    assert hash(built) == hash(message)
    assert repr(built) == repr(message)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.seq = 1  # type: ignore[misc]


@given(st.lists(messages, min_size=1, max_size=3), st.booleans(), st.lists(st.text(), max_size=3))
def test_built_appended_is_the_appended(stored: list[Message], duplicate: bool, audience: list[str]) -> None:
    expected = Appended(tuple(stored), duplicate, tuple(audience))
    assert builder(Appended)(tuple(stored), duplicate, tuple(audience)) == expected


def test_a_class_whose_init_checks_is_its_own_builder() -> None:
    """A validator must run, so such a class is built by calling it."""

    @attrs.frozen
    class Checked:
        x: int = attrs.field(validator=attrs.validators.lt(10))

    assert builder(Checked) is Checked
    with pytest.raises(ValueError):
        builder(Checked)(11)
