"""docs/protocol.rst is rendered from the construct declarations and must stay in step with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from imkit.session import client, server
from imkit.wire import doc, schema
from imkit.wire.codec import describe
from imkit.wire.errors import ErrorCode
from imkit.wire.packets import PACKET_CLASSES

PROTOCOL_RST = Path(__file__).resolve().parent.parent / "docs" / "protocol.rst"


def test_checked_in_document_is_current() -> None:
    """The checked-in reference is exactly what the declarations render to today."""
    assert PROTOCOL_RST.read_text(encoding="utf-8") == doc.render(), (
        "docs/protocol.rst is out of date with src/imkit/wire/schema.py; regenerate it with\n"
        "    PYTHONPATH=src python -m imkit.wire.doc > docs/protocol.rst"
    )


def test_document_is_valid_restructuredtext() -> None:
    """No docutils warnings: tables line up and every record link has a target."""
    core = pytest.importorskip("docutils.core")
    core.publish_doctree(doc.render(), settings_overrides={"report_level": 2, "halt_level": 2})


def test_every_kind_field_record_and_code_is_documented() -> None:
    text = doc.render()
    for kind, declaration in schema.BODIES.items():
        name = PACKET_CLASSES[kind].__name__
        assert f"\n{name}\n{'-' * len(name)}\n\nKind ``{kind:#06x}``, {schema.DIRECTION[kind]}." in text
        for field in describe(declaration):
            assert f"``{field.name}``" in text
    for record in ("MESSAGE", "CURSOR", "RANGE", "ITEM"):
        assert f".. _{record} record:" in text
    rows = [line.split() for line in text.splitlines()]
    for code in ErrorCode:
        assert [f"``{int(code)}``", f"``{code.name}``"] in rows


def test_directions_agree_with_the_sessions() -> None:
    """DIRECTION says who sends each kind; the sessions accept exactly the kinds the peer sends."""
    assert set(schema.DIRECTION) == set(schema.BODIES)
    sent_by_client = {k for k, d in schema.DIRECTION.items() if d in (schema.CLIENT_TO_SERVER, schema.EITHER_WAY)}
    sent_by_server = {k for k, d in schema.DIRECTION.items() if d in (schema.SERVER_TO_CLIENT, schema.EITHER_WAY)}
    assert set(server.ALLOWED) == sent_by_client
    assert set(client.ALLOWED) == sent_by_server
