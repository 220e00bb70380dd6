"""
The protocol reference, rendered from the construct declarations in ``imkit.wire.schema``.

``render()`` returns reStructuredText describing the frame header, every packet kind byte by byte,
the nested records, the constants and the error codes.  Regenerate ``docs/protocol.rst`` with::

    python -m imkit.wire.doc > docs/protocol.rst

(``tests/test_protocol_doc.py`` fails while the checked-in file differs from ``render()``.)  The
declarations are walked with the codec generator's own ``describe()``, so the document shows
exactly what the codec compiles.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

from construct import FocusedSeq, Struct

from imkit.wire import codec, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.packets import PACKET_CLASSES, RECORD_CLASSES

_BITS = {"B": 8, "H": 16, "L": 32, "Q": 64}

_HEADER_NOTES = {
    "length": "bytes after this field: 4 + the body's length",
    "version": f"protocol version, {schema.PROTOCOL_VERSION}",
    "flags": "bit set; ``FLAG_RESEND``",
    "kind": "packet kind, below",
}

# Where each constant is used; its meaning is its docstring in ``schema``.
_CONSTANTS = [
    ("PROTOCOL_VERSION", "header ``version``"),
    ("FLAG_RESEND", "header ``flags``"),
    ("DEFAULT_MAX_FRAME", "``HelloOk.max_frame``"),
    ("LOGIN_PASSWORD", "``Login.method``"),
    ("LOGIN_TOKEN", "``Login.method``"),
    ("LOGIN_CERTIFICATE", "``Login.method``"),
    ("TARGET_USER", "``Send.target_type``, ``Bundle.target_type``"),
    ("TARGET_CONVERSATION", "``Send.target_type``, ``Bundle.target_type``"),
    ("TARGET_NEW_GROUP", "``Send.target_type``, ``Bundle.target_type``"),
    ("SYNC_SERVER_CURSORS", "``Sync.flags``"),
    ("SYNC_ONLY_LISTED", "``Sync.flags``"),
    ("PRESENCE_OFFLINE", "``Presence.status``, ``PresenceNotice.status``"),
    ("PRESENCE_ONLINE", "``Presence.status``, ``PresenceNotice.status``"),
    ("PRESENCE_AWAY", "``Presence.status``, ``PresenceNotice.status``"),
    ("PRESENCE_BUSY", "``Presence.status``, ``PresenceNotice.status``"),
    ("QUERY_CONTACTS", "``Query.what``"),
    ("QUERY_MEMBERS", "``Query.what``"),
    ("QUERY_GROUPS", "``Query.what``"),
    ("RELATION_NONE", "``Entry.state`` (contacts)"),
    ("RELATION_CONTACT", "``Entry.state`` (contacts)"),
    ("RELATION_BLOCKED", "``Entry.state`` (contacts)"),
    ("ROLE_MEMBER", "``Entry.state`` (members, groups)"),
    ("ROLE_OWNER", "``Entry.state`` (members, groups)"),
]

_KIND_RANGES = [
    ("CORE_KINDS", "kinds of imkit itself, listed below"),
    ("EXTENSION_KINDS", "reserved for extension packet types: no core kind will ever use them"),
]


def _record_names() -> dict[int, str]:
    """The schema's nested record declarations (by id) -> their names, in declaration order."""
    return {id(value): name for name, value in vars(schema).items() if id(value) in RECORD_CLASSES}


def _type(field: codec._Field, records: dict[int, str]) -> str:
    bits = _BITS[field.fmt] if field.fmt in _BITS else 8
    if field.shape == "int":
        return f"u{bits}"
    if field.shape == "flag":
        return "flag"
    if field.shape in ("str", "bytes"):
        return f"{field.shape}{bits}"
    if field.shape == "ints":
        return f"list{bits} of u{_BITS[field.record]}"
    name = records[id(field.record)]
    link = f"`{name} <{name} record_>`__"
    return f"list{bits} of {link}" if field.shape == "list" else link


def _size(field: codec._Field) -> str:
    if field.shape == "flag":
        return "1"
    if field.shape == "record":
        return "varies"
    size = _BITS[field.fmt] // 8
    return str(size) if field.shape == "int" else f"{size} + n"


def _layout(declaration: Struct, records: dict[int, str], notes: dict[str, str] | None = None) -> str:
    """The table of a declaration's fields: offset, size, type, name (and notes, if given)."""
    rows = []
    offset: int | None = 0
    for field in codec.describe(declaration):
        where = "after previous" if offset is None else str(offset)
        row = [where, _size(field), _type(field, records), f"``{field.name}``"]
        if notes is not None:
            row.append(notes.get(field.name, ""))
        rows.append(row)
        fixed = field.shape in ("int", "flag")
        offset = offset + int(_size(field)) if fixed and offset is not None else None
    headers = ["Offset", "Size", "Type", "Field"] + (["Meaning"] if notes is not None else [])
    return _table(headers, rows)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A reStructuredText simple table."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    rule = "  ".join("=" * width for width in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(headers), rule, *(line(row) for row in rows), rule])


def _title(text: str, underline: str, overline: bool = False) -> str:
    rule = underline * len(text)
    return f"{rule}\n{text}\n{rule}" if overline else f"{text}\n{rule}"


def _docstring(obj: Any) -> str:
    """An object's own docstring (not one inherited from a base class), cleaned."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    return inspect.cleandoc(doc) if doc else ""


def _attribute_docs(module: Any) -> dict[str, str]:
    """The docstrings that follow module-level assignments (``NAME = ...`` then a string)."""
    body = ast.parse(inspect.getsource(module)).body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.targets[0].id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _value(name: str, value: int) -> str:
    return f"``{value:#04x}``" if "FLAG" in name or name.startswith("SYNC_") else f"``{value}``"


def _comment_block(module: Any, first_line: str) -> str:
    """The text of a ``#`` comment block in a module's source, starting at ``first_line``."""
    lines = inspect.getsource(module).splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(first_line))
    text = []
    for line in lines[start + 1 :]:
        if not line.startswith("#"):
            break
        text.append(line[1:].strip())
    return "\n".join(text).strip()


def _operation_type(con: Any) -> str:
    """The field types of operation bodies, in the notation of the table above."""
    if isinstance(con, FocusedSeq):  # PrefixedArray
        count, items = con.subcons
        return f"list{_BITS[codec._fmt_of(count.subcon.subcon)]} of {_operation_type(items.subcon.subcon)}"
    return _type(codec._describe("field", con), {})


def render() -> str:
    """The whole protocol reference, as reStructuredText."""
    records = _record_names()
    attribute_docs = _attribute_docs(schema)
    out = [
        ".. Generated from src/imkit/wire/schema.py by ``python -m imkit.wire.doc > docs/protocol.rst``.",
        "   Do not edit: tests/test_protocol_doc.py fails when this file and the declarations differ.",
        "",
        _title("The imkit wire protocol", "=", overline=True),
        "",
        inspect.cleandoc(schema.__doc__ or ""),
        "",
        _title("Field types", "="),
        "",
        _table(
            ["Type", "Encoding"],
            [
                ["u8, u16, u32, u64", "unsigned big-endian integer of 1, 2, 4 or 8 bytes"],
                ["flag", "one byte, 0 (false) or 1 (true); any other value is a malformed body"],
                ["str8, str16", "UTF-8 text prefixed by its length in bytes as u8/u16 (at most 255/65535 bytes)"],
                ["bytes16, bytes32", "raw bytes prefixed by their length as u16/u32"],
                ["list16 of R", "u16 count, then that many R records one after the other"],
                ["R", "a record (below), inline"],
            ],
        ),
        "",
        "A body is exactly its fields: a truncated body, invalid UTF-8 or bytes after the last field",
        "make the frame malformed (``MALFORMED_FRAME``).  *Offset* counts from the start of the body",
        "(add 8 for the offset in the frame); after the first variable-length field offsets depend on",
        "the data, and each field follows the previous one.",
        "",
        _title("Frame header", "="),
        "",
        _layout(schema.HEADER, records, _HEADER_NOTES),
        "",
        "A receiver refuses a frame whose ``length`` exceeds its maximum frame size (``FRAME_TOO_LARGE``)",
        "as soon as the four length bytes have arrived, one shorter than the rest of the header",
        "(``MALFORMED_FRAME``), and one whose ``version`` it does not speak (``UNSUPPORTED_VERSION``).",
        "",
        _title("Packets", "="),
        "",
        _table(
            ["Kind", "Packet", "Direction"],
            [
                [f"``{kind:#06x}``", f"`{PACKET_CLASSES[kind].__name__}`_", schema.DIRECTION[kind]]
                for kind in sorted(schema.BODIES)
            ],
        ),
        "",
    ]
    for kind in sorted(schema.BODIES):
        cls = PACKET_CLASSES[kind]
        out += [_title(cls.__name__, "-"), ""]
        out += [f"Kind ``{kind:#06x}``, {schema.DIRECTION[kind]}.", ""]
        doc = _docstring(cls)
        if doc:
            out += [doc, ""]
        out += [_layout(schema.BODIES[kind], records), ""]

    out += [_title("Records", "="), ""]
    for key, name in records.items():
        declaration = next(value for value in vars(schema).values() if id(value) == key)
        value_class = RECORD_CLASSES[key]
        out += [f".. _{name} record:", "", _title(name, "-"), ""]
        out += [f"Decoded as ``{value_class.__module__}.{value_class.__qualname__}``.", ""]
        doc = _docstring(value_class)
        if doc:
            out += [doc, ""]
        out += [_layout(declaration, records), ""]

    constants = [
        [f"``{name}``", _value(name, getattr(schema, name)), where, attribute_docs.get(name, "")]
        for name, where in _CONSTANTS
    ]
    for name, meaning in _KIND_RANGES:
        kinds = getattr(schema, name)
        span = f"``{kinds.start:#06x}``-``{kinds.stop - 1:#06x}``"
        constants.append([f"``{name}``", span, "header ``kind``", meaning])
    out += [_title("Constants", "="), "", _table(["Name", "Value", "Used in", "Meaning"], constants), ""]

    out += [
        _title("Operations", "="),
        "",
        _comment_block(schema, "# Operations:"),
        "",
    ]
    operation_names = {value: name for name, value in vars(schema).items() if isinstance(value, str) and value in schema.OPERATION_BODIES}
    for content_type, declaration in schema.OPERATION_BODIES.items():
        name = operation_names[content_type]
        out += [_title(f"``{content_type}``", "-"), ""]
        if attribute_docs.get(name):
            out += [attribute_docs[name], ""]
        rows = [[_operation_type(sub.subcon), f"``{sub.name}``"] for sub in declaration.subcons]
        out += [_table(["Type", "Field"], rows) if rows else "Empty body.", ""]

    codes = [[f"``{int(code)}``", f"``{code.name}``"] for code in ErrorCode]
    out += [
        _title("Error codes", "="),
        "",
        "Carried by ``Error.code``, ``Bye.code``, ``SendAck.status`` and ``LoginResult.status``.",
        "",
        _docstring(ErrorCode),
        "",
        _table(["Code", "Name"], codes),
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
