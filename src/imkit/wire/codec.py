"""
The hot-path codec, generated from the construct declarations in ``imkit.wire.schema``.

construct interprets its declaration tree for every packet, which costs 27-45x a hand-written
``struct`` codec, and its own compiler emits parsers that do not check lengths (a truncated string
parses silently).  So we compile the declarations ourselves, once, at import time, into plain Python
that does what a careful hand-written codec would: runs of fixed-width fields are packed and
unpacked with one precompiled ``struct.Struct`` call each (including the length or count prefix
of the variable-length field that ends the run, and for encoding the frame header too), every
length is checked against the end of the buffer, UTF-8 is decoded strictly, and trailing bytes are
an error.

Only a small vocabulary of construct is understood (big-endian ``FormatField`` integers, ``Flag``,
UTF-8 ``PascalString``, ``Prefixed(..., GreedyBytes)``, ``PrefixedArray`` of a ``Struct``, nested
``Struct``); anything else raises ``UnsupportedConstruct`` when the codec is generated.  The tests
prove with hypothesis that for every kind the generated codec and construct agree on valid packets
and that any truncated or garbled body raises ``DecodeError``.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import attrs
from construct import Array, Construct, FocusedSeq, FormatField, GreedyBytes, Prefixed, Renamed, Rebuild
from construct import Struct as ConstructStruct
from construct import Flag
from construct.core import StringEncoded

from imkit.slots import slot_setters
from imkit.wire import schema
from imkit.wire.errors import DecodeError, EncodeError, ErrorCode
from imkit.wire.packets import KIND_OF, PACKET_CLASSES, RECORD_CLASSES


class UnsupportedConstruct(TypeError):
    """A declaration uses a construct this generator does not compile."""


@attrs.frozen
class _Field:
    """One declared field, reduced to what the generator needs."""

    name: str
    shape: str  # "int", "flag", "str", "bytes", "list", "ints", "record"
    fmt: str = ""  # struct code of the value (int/flag) or of its length/count prefix
    record: Any = None  # nested Struct for "list" and "record"; element struct code for "ints"


def _fmt_of(field: Construct) -> str:
    if not isinstance(field, FormatField) or field.fmtstr[0] != ">" or field.fmtstr[1] not in "BHLQ":
        raise UnsupportedConstruct(f"only big-endian unsigned FormatField is supported, not {field!r}")
    return field.fmtstr[1]


def _describe(name: str, con: Construct) -> _Field:
    if isinstance(con, FormatField):
        return _Field(name, "int", _fmt_of(con))
    if con is Flag:
        return _Field(name, "flag", "?")
    if isinstance(con, StringEncoded):
        if con.encoding not in ("utf8", "utf-8"):
            raise UnsupportedConstruct(f"{name}: only utf8 strings are supported")
        inner = con.subcon
        if isinstance(inner, Prefixed) and not inner.includelength and inner.subcon is GreedyBytes:
            return _Field(name, "str", _fmt_of(inner.lengthfield))
    if isinstance(con, Prefixed) and not con.includelength and con.subcon is GreedyBytes:
        return _Field(name, "bytes", _fmt_of(con.lengthfield))
    if isinstance(con, FocusedSeq) and len(con.subcons) == 2:
        # A PrefixedArray: a rebuilt count, then an Array of records or of integers.
        count, items = con.subcons
        if count.name == "count" and isinstance(count.subcon, Rebuild) and items.name == "items" and isinstance(items.subcon, Array):
            element = items.subcon.subcon
            if isinstance(element, ConstructStruct):
                return _Field(name, "list", _fmt_of(count.subcon.subcon), element)
            if isinstance(element, FormatField):
                return _Field(name, "ints", _fmt_of(count.subcon.subcon), _fmt_of(element))
    if isinstance(con, ConstructStruct):
        return _Field(name, "record", "", con)
    raise UnsupportedConstruct(f"{name}: cannot compile {con!r}")


def describe(declaration: ConstructStruct) -> list[_Field]:
    """The fields of a Struct declaration, in wire order."""
    fields = []
    for sub in declaration.subcons:
        if not isinstance(sub, Renamed) or not sub.name:
            raise UnsupportedConstruct(f"every field needs a name, not {sub!r}")
        fields.append(_describe(sub.name, sub.subcon))
    return fields


def _segments(fields: list[_Field]) -> list[tuple[list[_Field], _Field | None]]:
    """
    Split fields into runs that one struct call handles: fixed fields, then optionally the
    variable-length field whose prefix ends the run.  Nested records are their own segment.
    """
    segments: list[tuple[list[_Field], _Field | None]] = []
    fixed: list[_Field] = []
    for field in fields:
        if field.shape in ("int", "flag"):
            fixed.append(field)
        else:
            segments.append((fixed, field))
            fixed = []
    if fixed:
        segments.append((fixed, None))
    return segments


class _Generator:
    """Writes the Python source of the decoders and encoders, one function per declaration."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {"DecodeError": DecodeError, "new": object.__new__, "struct": struct}
        self.record_names: dict[int, str] = {}
        self._counter = 0

    def _name(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def _struct(self, fmt: str) -> tuple[str, int]:
        name = self._name("S")
        compiled = struct.Struct(">" + fmt)
        self.namespace[name] = compiled
        return name, compiled.size

    def record(self, declaration: ConstructStruct) -> str:
        """Generate the decoder and encoder of a nested record once; return its name."""
        key = id(declaration)
        if key not in self.record_names:
            name = self._name("rec")
            self.record_names[key] = name
            cls = RECORD_CLASSES.get(key)
            if cls is None:
                raise UnsupportedConstruct(f"nested record {declaration!r} has no value class")
            self._decoder(f"dec_{name}", declaration, cls, nested=True)
            self._encoder(f"enc_{name}", declaration, header=None)
        return self.record_names[key]

    def _decoder(self, fname: str, declaration: ConstructStruct, cls: type, nested: bool) -> None:
        fields = describe(declaration)
        _check_fields(cls, fields)
        for field in fields:
            if field.shape in ("list", "record"):
                self.record(field.record)
        cls_name = self._name("C")
        self.namespace[cls_name] = cls
        out = [f"def {fname}(buf, pos, end):"]
        for fixed, var in _segments(fields):
            # A flag is read as a byte and must be 0 or 1, so that every body has one encoding.
            fmt = "".join("B" if f.shape == "flag" else f.fmt for f in fixed)
            fmt += var.fmt if var is not None and var.shape != "record" else ""
            names = [f"v_{f.name}" for f in fixed]
            if var is not None and var.shape != "record":
                names.append(f"n_{var.name}")
            if fmt:
                sname, size = self._struct(fmt)
                out.append(f"    if pos + {size} > end: raise DecodeError('truncated')")
                target = ", ".join(names) + ("," if len(names) == 1 else "")
                out.append(f"    {target} = {sname}.unpack_from(buf, pos)")
                out.append(f"    pos += {size}")
            for f in fixed:
                if f.shape == "flag":
                    out.append(f"    if v_{f.name} > 1: raise DecodeError('flag {f.name} is neither 0 nor 1')")
                    out.append(f"    v_{f.name} = v_{f.name} == 1")
            if var is None:
                continue
            v, n = f"v_{var.name}", f"n_{var.name}"
            if var.shape in ("str", "bytes"):
                out.append(f"    stop = pos + {n}")
                out.append("    if stop > end: raise DecodeError('truncated')")
                conv = ".decode('utf-8')" if var.shape == "str" else ""
                out.append(f"    {v} = buf[pos:stop]{conv}")
                out.append("    pos = stop")
            elif var.shape == "ints":
                width = struct.calcsize(">" + var.record)
                out.append(f"    stop = pos + {n} * {width}")
                out.append("    if stop > end: raise DecodeError('truncated')")
                out.append(f"    {v} = struct.unpack_from('>%d{var.record}' % {n}, buf, pos)")
                out.append("    pos = stop")
            elif var.shape == "list":
                rec = self.record_names[id(var.record)]
                out.append("    items = []")
                out.append(f"    for _ in range({n}):")
                out.append(f"        item, pos = dec_{rec}(buf, pos, end)")
                out.append("        items.append(item)")
                out.append(f"    {v} = tuple(items)")
            else:
                rec = self.record_names[id(var.record)]
                out.append(f"    {v}, pos = dec_{rec}(buf, pos, end)")
        if not nested:
            out.append("    if pos != end: raise DecodeError('trailing bytes after the packet body')")
        setters = slot_setters(cls)
        if setters is None:
            args = ", ".join(f"v_{a.name}" for a in attrs.fields(cls))
            out.append(f"    obj = {cls_name}({args})")
        else:
            # The class's __init__ would only store the values, one object.__setattr__ each:
            # storing them straight into the slots builds the same object at a fraction of the cost.
            out.append(f"    obj = new({cls_name})")
            for name, setter in setters.items():
                self.namespace[f"{cls_name}_{name}"] = setter
                out.append(f"    {cls_name}_{name}(obj, v_{name})")
        out.append("    return obj, pos" if nested else "    return obj")
        self.lines.extend(out)
        self.lines.append("")

    def _encoder(self, fname: str, declaration: ConstructStruct, header: int | None) -> None:
        """
        An encoder returns the record's bytes, or with ``header`` (a kind) the whole frame:
        length, version, flags and kind are packed together with the first run of fields.
        """
        fields = describe(declaration)
        out = [f"def {fname}(p, flags=0):" if header is not None else f"def {fname}(p):"]
        fixed_size = 0
        var_lens = []
        for field in fields:
            if field.shape == "str":
                out.append(f"    b_{field.name} = p.{field.name}.encode('utf-8')")
            elif field.shape == "bytes":
                out.append(f"    b_{field.name} = p.{field.name}")
            elif field.shape == "list":
                rec = self.record_names[id(field.record)]
                out.append(f"    c_{field.name} = p.{field.name}")
                out.append(f"    b_{field.name} = b''.join([enc_{rec}(x) for x in c_{field.name}])")
            elif field.shape == "ints":
                out.append(f"    c_{field.name} = p.{field.name}")
                out.append(f"    b_{field.name} = struct.pack('>%d{field.record}' % len(c_{field.name}), *c_{field.name})")
            elif field.shape == "record":
                rec = self.record_names[id(field.record)]
                out.append(f"    b_{field.name} = enc_{rec}(p.{field.name})")
            if field.shape in ("str", "bytes") and header is not None:
                # A frame needs each length twice (its prefix and the frame's total): take it once.
                out.append(f"    n_{field.name} = len(b_{field.name})")
                var_lens.append(f"n_{field.name}")
            elif field.shape in ("str", "bytes", "list", "ints", "record"):
                var_lens.append(f"len(b_{field.name})")
        parts = []
        first = True
        for fixed, var in _segments(fields):
            fmt = "".join(f.fmt for f in fixed)
            values = [f"p.{f.name}" for f in fixed]
            if var is not None and var.shape in ("str", "bytes"):
                fmt += var.fmt
                values.append(f"n_{var.name}" if header is not None else f"len(b_{var.name})")
            elif var is not None and var.shape in ("list", "ints"):
                fmt += var.fmt
                values.append(f"len(c_{var.name})")
            if first and header is not None:
                fmt = "LBBH" + fmt
                values = ["length", str(schema.PROTOCOL_VERSION), "flags", str(header)] + values
            first = False
            if fmt:
                sname, size = self._struct(fmt)
                fixed_size += size
                parts.append(f"{sname}.pack({', '.join(values)})")
            if var is not None:
                parts.append(f"b_{var.name}")
        if header is not None and not parts:
            sname, size = self._struct("LBBH")
            fixed_size += size
            parts.append(f"{sname}.pack(length, {schema.PROTOCOL_VERSION}, flags, {header})")
        if header is not None:
            total = " + ".join([str(fixed_size - schema.LENGTH_SIZE)] + var_lens)
            out.append(f"    length = {total}")
        out.append(f"    return b''.join(({', '.join(parts)},))")
        self.lines.extend(out)
        self.lines.append("")

    def packet(self, kind: int, declaration: ConstructStruct, cls: type) -> None:
        self._decoder(f"decode_{kind}", declaration, cls, nested=False)
        self._encoder(f"encode_{kind}", declaration, header=kind)

    def compile(self) -> dict[str, Any]:
        source = "\n".join(self.lines)
        code = compile(source, "<imkit.wire.codec generated>", "exec")
        exec(code, self.namespace)
        self.namespace["__source__"] = source
        return self.namespace


def _check_fields(cls: type, fields: list[_Field]) -> None:
    declared = [f.name for f in fields]
    attributes = [a.name for a in attrs.fields(cls)]
    if sorted(declared) != sorted(attributes):
        raise UnsupportedConstruct(
            f"{cls.__name__} has fields {attributes} but its declaration has {declared}"
        )


@attrs.define
class PacketCodec:
    """The generated decoder and encoder of one packet kind."""

    kind: int
    cls: type
    declaration: ConstructStruct
    decode: Callable[[bytes, int, int], Any]
    encode: Callable[..., bytes]


def generate(bodies: dict[int, ConstructStruct], classes: dict[int, type]) -> tuple[dict[int, PacketCodec], str]:
    """Compile every declaration in ``bodies``; returns the codecs and the generated source."""
    generator = _Generator()
    for kind, declaration in bodies.items():
        generator.packet(kind, declaration, classes[kind])
    namespace = generator.compile()
    codecs = {
        kind: PacketCodec(kind, classes[kind], declaration, namespace[f"decode_{kind}"], namespace[f"encode_{kind}"])
        for kind, declaration in bodies.items()
    }
    return codecs, namespace["__source__"]


CODECS, GENERATED_SOURCE = generate(schema.BODIES, PACKET_CLASSES)
_DECODERS = {kind: codec.decode for kind, codec in CODECS.items()}
_ENCODERS = {cls: codec.encode for cls, codec in ((c.cls, c) for c in CODECS.values())}


def decode_body(kind: int, body: bytes) -> Any:
    """Turn one frame body into its packet object, or raise DecodeError."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise DecodeError(f"unknown packet kind {kind:#06x}", ErrorCode.UNKNOWN_KIND)
    try:
        return decoder(body, 0, len(body))
    except DecodeError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError) as error:
        raise DecodeError(f"bad {PACKET_CLASSES[kind].__name__} body: {error}") from None


def encode(packet: Any, flags: int = 0) -> bytes:
    """Turn a packet object into one complete frame (header included)."""
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise EncodeError(f"{packet!r} is not a packet")
    try:
        return encoder(packet, flags)
    except (struct.error, TypeError, AttributeError, UnicodeEncodeError) as error:
        raise EncodeError(f"cannot encode {type(packet).__name__}: {error}") from None


def kind_of(packet: Any) -> int:
    """The kind number of a packet object."""
    return KIND_OF[type(packet)]
