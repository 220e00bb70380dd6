"""
The generated codec against the construct declarations it is generated from.

The strategies are derived from the declarations themselves (``codec.describe``): every integer
within its field's width, every string within its prefix's limit in UTF-8 *bytes*, nested records
and lists.  For every packet kind the tests prove that:

* encoding then decoding gives the packet back, and a frame survives any chunking of the stream;
* the generated codec and construct (interpreted and compiled) agree on valid packets;
* anything that is not exactly one valid body (truncated, trailing bytes, garbage, invalid UTF-8)
  raises ``DecodeError`` and nothing else;
* the frame reader refuses oversize, short and wrong-version frames, and bounds its buffer;
* values that do not fit their field raise ``EncodeError``.

Finally a few frames are written out byte by byte, so the format cannot drift silently.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

import attrs
import pytest
from construct import Flag, FormatField, GreedyBytes, Prefixed, PrefixedArray, Struct
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imkit.model import Item, Message
from imkit.slots import slot_setters
from imkit.wire import codec, schema
from imkit.wire.codec import decode_body, describe, encode
from imkit.wire.errors import DecodeError, EncodeError, ErrorCode, ProtocolError
from imkit.wire.framing import FrameReader
from imkit.wire.packets import (
    PACKET_CLASSES,
    RECORD_CLASSES,
    DeliverAck,
    Hello,
    Send,
    SendAck,
    SyncResult,
)

KINDS = sorted(PACKET_CLASSES)
KIND_IDS = [PACKET_CLASSES[kind].__name__ for kind in KINDS]
BITS = {"B": 8, "H": 16, "L": 32, "Q": 64}
COMPILED = {kind: declaration.compile() for kind, declaration in schema.BODIES.items()}

# Examples hold several strings and lists; no single example is slow, but some are large.
checked = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _max(fmt: str) -> int:
    return 2 ** BITS[fmt] - 1


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, without splitting a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


# Strategies, derived from the declarations ---------------------------------------------------


def _value(field: codec._Field, min_items: int, raw_strings: bool) -> st.SearchStrategy[Any]:
    """Values for one field, in construct's form (dicts for records, lists for lists)."""
    if field.shape == "int":
        return st.integers(0, _max(field.fmt))
    if field.shape == "flag":
        return st.booleans()
    if field.shape == "str":
        limit = _max(field.fmt)
        text = st.text(max_size=80).map(lambda s: _clip(s, limit))
        if not raw_strings:
            return text
        # Bytes that may or may not be UTF-8: overlong forms, surrogates, cut sequences, noise.
        invalid = st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"a\x80b", b"\xf4\x90\x80\x80"])
        return st.one_of(text.map(lambda s: s.encode("utf-8")), invalid, st.binary(max_size=20))
    if field.shape == "bytes":
        return st.binary(max_size=min(200, _max(field.fmt)))
    if field.shape == "list":
        return st.lists(_record(field.record, min_items, raw_strings), min_size=min_items, max_size=max(min_items, 3))
    if field.shape == "ints":
        return st.lists(st.integers(0, _max(field.record)), min_size=min_items, max_size=max(min_items, 4))
    if field.shape == "record":
        return _record(field.record, min_items, raw_strings)
    raise AssertionError(field.shape)


def _record(declaration: Struct, min_items: int = 0, raw_strings: bool = False) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {field.name: _value(field, min_items, raw_strings) for field in describe(declaration)}
    )


def to_packet(declaration: Struct, cls: type, values: Any) -> Any:
    """A packet (or record) object from construct-form values (a dict or a Container)."""
    fields = {}
    for field in describe(declaration):
        value = values[field.name]
        if field.shape == "record":
            value = to_packet(field.record, RECORD_CLASSES[id(field.record)], value)
        elif field.shape == "list":
            value = tuple(to_packet(field.record, RECORD_CLASSES[id(field.record)], item) for item in value)
        elif field.shape == "ints":
            value = tuple(value)
        fields[field.name] = value
    return cls(**fields)


def to_values(declaration: Struct, packet: Any) -> dict:
    """The construct-form values of a packet object: what ``build`` takes."""
    values = {}
    for field in describe(declaration):
        value = getattr(packet, field.name)
        if field.shape == "record":
            value = to_values(field.record, value)
        elif field.shape == "list":
            value = [to_values(field.record, item) for item in value]
        elif field.shape == "ints":
            value = list(value)
        values[field.name] = value
    return values


@lru_cache(maxsize=None)
def packets_of(kind: int, min_items: int = 0) -> st.SearchStrategy[Any]:
    """Every valid packet of ``kind`` (with at least ``min_items`` entries in each list)."""
    declaration = schema.BODIES[kind]
    return _record(declaration, min_items).map(lambda values: to_packet(declaration, PACKET_CLASSES[kind], values))


def _simple_values(declaration: Struct) -> dict:
    """Zeros and empty strings, with one entry in every list."""
    empty = {"int": 0, "flag": False, "str": "", "bytes": b""}
    values = {}
    for field in describe(declaration):
        if field.shape == "list":
            values[field.name] = [_simple_values(field.record)]
        elif field.shape == "ints":
            values[field.name] = [0]
        elif field.shape == "record":
            values[field.name] = _simple_values(field.record)
        else:
            values[field.name] = empty[field.shape]
    return values


def simple_packet(kind: int) -> Any:
    declaration = schema.BODIES[kind]
    return to_packet(declaration, PACKET_CLASSES[kind], _simple_values(declaration))


any_packet = st.sampled_from(KINDS).flatmap(packets_of)
by_kind = pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)


def body_of(packet: Any) -> bytes:
    return encode(packet)[schema.HEADER_SIZE :]


# Round trip ------------------------------------------------------------------------------------


@by_kind
@checked
@given(data=st.data(), flags=st.integers(0, 255))
def test_round_trip(kind: int, data: st.DataObject, flags: int) -> None:
    """Every packet decodes back to itself, behind a header that says its kind, flags and length."""
    packet = data.draw(packets_of(kind))
    frame = encode(packet, flags)
    length, version, got_flags, got_kind = struct.unpack_from(">IBBH", frame)
    assert (length, version, got_flags, got_kind) == (len(frame) - 4, schema.PROTOCOL_VERSION, flags, kind)
    assert decode_body(kind, frame[8:]) == packet
    assert codec.kind_of(packet) == kind


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    return [stream[a:b] for a, b in zip(points, points[1:])]


@checked
@given(
    frames=st.lists(st.tuples(any_packet, st.integers(0, 255)), max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=30),
)
def test_frames_survive_any_chunking(frames: list[tuple[Any, int]], cuts: list[int]) -> None:
    """However the stream is cut, the reader yields each frame whole, once, in order."""
    stream = b"".join(encode(packet, flags) for packet, flags in frames)
    reader = FrameReader()
    got = []
    for chunk in _chunks(stream, cuts):
        got.extend(reader.feed(chunk))
    assert got == [(codec.kind_of(p), flags, body_of(p)) for p, flags in frames]
    assert [decode_body(kind, body) for kind, _, body in got] == [p for p, _ in frames]
    assert reader.buffered == 0


# Equivalence with construct ------------------------------------------------------------------


@by_kind
@checked
@given(data=st.data())
def test_same_bytes_and_values_as_construct(kind: int, data: st.DataObject) -> None:
    """
    The generated encoder writes exactly what construct builds from the same values, and
    construct's interpreted parser, its compiled parser and the generated decoder read those bytes
    as the same values.
    """
    packet = data.draw(packets_of(kind))
    declaration, cls = schema.BODIES[kind], PACKET_CLASSES[kind]
    values = to_values(declaration, packet)
    body = body_of(packet)
    assert declaration.build(values) == body
    assert COMPILED[kind].build(values) == body
    decoded = decode_body(kind, body)
    assert to_packet(declaration, cls, declaration.parse(body)) == decoded
    # Valid input only: the compiled parser does not check lengths (see the test further down).
    assert to_packet(declaration, cls, COMPILED[kind].parse(body)) == decoded
    header = schema.HEADER.build(dict(length=len(body) + 4, version=schema.PROTOCOL_VERSION, flags=0, kind=kind))
    assert encode(packet)[:8] == header


@by_kind
@checked
@given(data=st.data())
def test_decoded_objects_are_ordinary_instances(kind: int, data: st.DataObject) -> None:
    """
    Decoders fill the slots of the frozen classes directly instead of calling ``__init__``: the
    objects they build are indistinguishable from constructed ones (type, equality, hash, repr,
    fields, and still frozen).
    """
    packet = data.draw(packets_of(kind, min_items=1))
    decoded = decode_body(kind, body_of(packet))
    assert type(decoded) is type(packet)
    assert decoded == packet and not decoded != packet
    assert hash(decoded) == hash(packet)
    assert repr(decoded) == repr(packet)
    assert attrs.asdict(decoded) == attrs.asdict(packet)
    assert attrs.evolve(decoded) == packet
    first = attrs.fields(type(decoded))[0].name
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(decoded, first, getattr(decoded, first))


def test_every_packet_and_record_class_is_filled_slot_by_slot() -> None:
    """The fast path applies to all of them (a validator added to one would quietly slow it down)."""
    for cls in [*PACKET_CLASSES.values(), *RECORD_CLASSES.values()]:
        assert slot_setters(cls) is not None, cls
    assert "(v_" not in codec.GENERATED_SOURCE  # no decoder calls a class


def test_classes_with_validators_are_built_through_init() -> None:
    """A value class whose __init__ does more than store (here, a validator) is always called."""

    @attrs.frozen
    class Checked:
        x: int = attrs.field(validator=attrs.validators.lt(10))

    @attrs.frozen
    class Plain:
        x: int

    declaration = Struct("x" / FormatField(">", "B"))
    codecs, source = codec.generate({0x8001: declaration}, {0x8001: Checked})
    assert "new(" not in source
    assert codecs[0x8001].decode(b"\x05", 0, 1) == Checked(5)
    with pytest.raises(ValueError):
        codecs[0x8001].decode(b"\x0b", 0, 1)
    plain, _ = codec.generate({0x8001: declaration}, {0x8001: Plain})
    assert plain[0x8001].decode(b"\x0b", 0, 1) == Plain(11)
    assert slot_setters(Checked) is None
    assert slot_setters(Plain) is not None
    bare = {"__annotations__": {"x": int}}
    assert slot_setters(attrs.define(slots=False, frozen=True)(type("NoSlots", (), dict(bare)))) is None
    assert slot_setters(attrs.frozen(cache_hash=True)(type("Cached", (), dict(bare)))) is None


def test_every_kind_has_a_class_and_a_codec() -> None:
    """The declarations, the packet classes and the generated codecs cover the same kinds."""
    assert set(schema.BODIES) == set(PACKET_CLASSES) == set(codec.CODECS)
    assert all(kind in schema.CORE_KINDS for kind in schema.BODIES)


# Rejection -------------------------------------------------------------------------------------


@by_kind
@checked
@given(data=st.data())
def test_every_truncation_is_a_decode_error(kind: int, data: st.DataObject) -> None:
    """Every strict prefix of a valid body is refused: no field is ever read past the end."""
    body = body_of(data.draw(packets_of(kind)))
    for cut in range(len(body)):
        with pytest.raises(DecodeError) as raised:
            decode_body(kind, body[:cut])
        assert raised.value.code == ErrorCode.MALFORMED_FRAME


@by_kind
@checked
@given(data=st.data(), extra=st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_a_decode_error(kind: int, data: st.DataObject, extra: bytes) -> None:
    """A body is exactly one packet: anything after it is refused, not ignored."""
    body = body_of(data.draw(packets_of(kind)))
    with pytest.raises(DecodeError):
        decode_body(kind, body + extra)


def _outcome_is_canonical(kind: int, data: bytes) -> None:
    """``data`` decodes to a packet that encodes back to exactly ``data``, or is a DecodeError."""
    try:
        packet = decode_body(kind, data)
    except DecodeError:
        return
    assert body_of(packet) == data


@by_kind
@checked
@given(data=st.binary(max_size=120))
def test_garbage_decodes_canonically_or_not_at_all(kind: int, data: bytes) -> None:
    """Random bytes: a DecodeError, or a packet whose encoding is those very bytes."""
    _outcome_is_canonical(kind, data)


@by_kind
@checked
@given(
    data=st.data(),
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from("sid")), min_size=1, max_size=4
    ),
)
def test_damaged_bodies_decode_canonically_or_not_at_all(
    kind: int, data: st.DataObject, edits: list[tuple[int, int, str]]
) -> None:
    """Valid bodies with bytes set, inserted or deleted (close to valid, so deep in the decoder)."""
    body = bytearray(body_of(data.draw(packets_of(kind, min_items=1))))
    for position, byte, how in edits:
        position %= len(body) + 1
        if how == "s" and position < len(body):
            body[position] = byte
        elif how == "i":
            body.insert(position, byte)
        elif how == "d" and position < len(body):
            del body[position]
    _outcome_is_canonical(kind, bytes(body))


def test_non_canonical_flag_is_a_decode_error() -> None:
    """
    A flag byte other than 0 or 1 is refused, so every decodable body has one encoding.  (construct
    would read it as True, and the packet would not encode back to the same bytes.)
    """
    body = body_of(SyncResult(request_id=1, more=True, ranges=(), messages=()))
    assert body[4] == 1
    damaged = body[:4] + b"\x02" + body[5:]
    assert schema.BODIES[schema.SYNC_RESULT].parse(damaged).more is True
    with pytest.raises(DecodeError):
        decode_body(schema.SYNC_RESULT, damaged)
    assert decode_body(schema.SYNC_RESULT, body[:4] + b"\x00" + body[5:]).more is False


@lru_cache(maxsize=None)
def _raw(declaration: Struct) -> Struct:
    """The declaration with every string as plain prefixed bytes: builds bodies with any bytes."""
    fields = []
    for field in describe(declaration):
        if field.shape == "int":
            con = FormatField(">", field.fmt)
        elif field.shape == "flag":
            con = Flag
        elif field.shape in ("str", "bytes"):
            con = Prefixed(FormatField(">", field.fmt), GreedyBytes)
        elif field.shape == "list":
            con = PrefixedArray(FormatField(">", field.fmt), _raw(field.record))
        elif field.shape == "ints":
            con = PrefixedArray(FormatField(">", field.fmt), FormatField(">", field.record))
        else:
            con = _raw(field.record)
        fields.append(field.name / con)
    return Struct(*fields)


def _decode_strings(declaration: Struct, values: dict) -> dict:
    """``values`` with every string field's bytes decoded (strictly) as UTF-8."""
    out = {}
    for field in describe(declaration):
        value = values[field.name]
        if field.shape == "str":
            value = value.decode("utf-8")
        elif field.shape == "record":
            value = _decode_strings(field.record, value)
        elif field.shape == "list":
            value = [_decode_strings(field.record, item) for item in value]
        out[field.name] = value
    return out


@by_kind
@checked
@given(data=st.data())
def test_strings_decode_exactly_when_they_are_utf8(kind: int, data: st.DataObject) -> None:
    """A body is accepted if and only if every string in it is valid UTF-8."""
    declaration = schema.BODIES[kind]
    values = data.draw(_record(declaration, min_items=1, raw_strings=True))
    body = _raw(declaration).build(values)
    try:
        expected = to_packet(declaration, PACKET_CLASSES[kind], _decode_strings(declaration, values))
    except UnicodeDecodeError:
        with pytest.raises(DecodeError):
            decode_body(kind, body)
    else:
        assert decode_body(kind, body) == expected


def test_invalid_utf8_is_a_decode_error() -> None:
    """The simplest case, spelled out: Hello's agent is one 0xff byte."""
    with pytest.raises(DecodeError) as raised:
        decode_body(schema.HELLO, b"\x01\x01\x00\x01\xff")
    assert raised.value.code == ErrorCode.MALFORMED_FRAME


def test_construct_compiled_parser_accepts_a_truncated_string() -> None:
    """
    Why we generate our own codec: construct's compiled parser reads a string with ``io.read(n)``
    and never checks that it got ``n`` bytes, so a Hello whose agent claims 5 bytes but carries 2
    parses "successfully" as agent "ab".  Its interpreted parser refuses it, and so do we.
    """
    truncated = b"\x01\x01\x00\x05ab"
    assert COMPILED[schema.HELLO].parse(truncated).agent == "ab"
    with pytest.raises(Exception):
        schema.BODIES[schema.HELLO].parse(truncated)
    with pytest.raises(DecodeError):
        decode_body(schema.HELLO, truncated)


def test_unknown_kind() -> None:
    with pytest.raises(DecodeError) as raised:
        decode_body(0x7FFF, b"")
    assert raised.value.code == ErrorCode.UNKNOWN_KIND


# Framing ---------------------------------------------------------------------------------------


def _frame(kind: int, body: bytes, version: int = schema.PROTOCOL_VERSION, flags: int = 0) -> bytes:
    return struct.pack(">IBBH", len(body) + 4, version, flags, kind) + body


@checked
@given(max_frame=st.integers(4, 10_000), excess=st.integers(1, 2**32 - 1), rest=st.binary(max_size=50))
def test_oversize_frame_refused_on_its_length_bytes(max_frame: int, excess: int, rest: bytes) -> None:
    """The limit is enforced as soon as the four length bytes are in: the body is never buffered."""
    length = min(max_frame + excess, 2**32 - 1)
    prefix = struct.pack(">I", length)
    reader = FrameReader(max_frame)
    for byte in prefix[:3]:
        assert list(reader.feed(bytes([byte]))) == []
    with pytest.raises(DecodeError) as raised:
        list(reader.feed(prefix[3:] + rest))
    assert raised.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(DecodeError):
        list(FrameReader(max_frame).feed(prefix))


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    frame = _frame(schema.PING, b"\x00" * 8)
    assert list(FrameReader(max_frame=12).feed(frame)) == [(schema.PING, 0, b"\x00" * 8)]
    with pytest.raises(DecodeError):
        list(FrameReader(max_frame=11).feed(frame))


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_shorter_than_a_header(length: int) -> None:
    with pytest.raises(DecodeError) as raised:
        list(FrameReader().feed(struct.pack(">I", length)))
    assert raised.value.code == ErrorCode.MALFORMED_FRAME


@given(version=st.integers(0, 255).filter(lambda v: v != schema.PROTOCOL_VERSION))
def test_wrong_version(version: int) -> None:
    """A frame in another protocol version is refused; a reader made for that version takes it."""
    frame = _frame(schema.PING, b"\x00" * 8, version=version)
    with pytest.raises(DecodeError) as raised:
        list(FrameReader().feed(frame))
    assert raised.value.code == ErrorCode.UNSUPPORTED_VERSION
    assert list(FrameReader(version=version).feed(frame)) == [(schema.PING, 0, b"\x00" * 8)]


# Streams that are partly valid: frames, headers with small lengths, noise.
_stream_piece = st.one_of(
    any_packet.map(encode),
    st.tuples(st.integers(0, 80), st.integers(0, 2), st.integers(0, 255), st.integers(0, 0xFFFF)).map(
        lambda h: struct.pack(">IBBH", *h)
    ),
    st.binary(max_size=30),
)


def _run(reader: FrameReader, chunks: list[bytes]) -> tuple[list, ErrorCode | None]:
    """Feed ``chunks``; return the frames and the error code (None if none), checking the bound."""
    frames = []
    for chunk in chunks:
        try:
            frames.extend(reader.feed(chunk))
        except DecodeError as error:
            return frames, error.code
        # Between feeds at most one incomplete frame is held: fewer than length bytes + max_frame.
        assert reader.buffered < schema.LENGTH_SIZE + reader.max_frame
    return frames, None


@checked
@given(
    pieces=st.lists(_stream_piece, max_size=8),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    max_frame=st.integers(4, 300),
)
def test_any_stream_in_any_chunks(pieces: list[bytes], cuts: list[int], max_frame: int) -> None:
    """
    Any bytes, split anywhere, give frames or a DecodeError (never another exception), the buffer
    stays within one frame, and the outcome does not depend on the split.
    """
    stream = b"".join(pieces)
    whole = _run(FrameReader(max_frame), [stream])
    assert _run(FrameReader(max_frame), _chunks(stream, cuts)) == whole
    assert _run(FrameReader(max_frame), [bytes([b]) for b in stream]) == whole


@checked
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 10**6), max_size=20))
def test_any_bytes_in_any_chunks(data: bytes, cuts: list[int]) -> None:
    """Pure noise: frames or a ProtocolError, and nothing else."""
    reader = FrameReader(max_frame=64)
    try:
        for chunk in _chunks(data, cuts):
            for kind, flags, body in reader.feed(chunk):
                assert 0 <= kind <= 0xFFFF and 0 <= flags <= 255 and len(body) <= 60
    except ProtocolError:
        pass


def test_reader_keeps_a_partial_frame_only() -> None:
    frame = encode(DeliverAck(conversation="c", seq=1))
    reader = FrameReader()
    assert list(reader.feed(frame + frame[:5])) == [(schema.DELIVER_ACK, 0, frame[8:])]
    assert reader.buffered == 5
    assert list(reader.feed(frame[5:])) == [(schema.DELIVER_ACK, 0, frame[8:])]
    assert reader.buffered == 0


# Encode errors ---------------------------------------------------------------------------------


def _paths(declaration: Struct, shapes: tuple[str, ...]) -> list[tuple[tuple[str, ...], codec._Field]]:
    """Paths to every field of the given shapes, descending into records and first list entries."""
    found = []
    for field in describe(declaration):
        if field.shape in shapes:
            found.append(((field.name,), field))
        if field.shape in ("record", "list"):
            found += [((field.name, *path), inner) for path, inner in _paths(field.record, shapes)]
    return found


def _replace(obj: Any, declaration: Struct, path: tuple[str, ...], value: Any) -> Any:
    """``obj`` with the field at ``path`` set to ``value`` (in the first entry of a list)."""
    name, rest = path[0], path[1:]
    if not rest:
        return attrs.evolve(obj, **{name: value})
    field = next(f for f in describe(declaration) if f.name == name)
    inner = getattr(obj, name)
    if field.shape == "list":
        return attrs.evolve(obj, **{name: (_replace(inner[0], field.record, rest, value), *inner[1:])})
    return attrs.evolve(obj, **{name: _replace(inner, field.record, rest, value)})


@by_kind
@checked
@given(data=st.data())
def test_out_of_range_int_is_an_encode_error(kind: int, data: st.DataObject) -> None:
    """Every integer field, top level or nested, refuses -1 and 2**bits instead of wrapping."""
    paths = _paths(schema.BODIES[kind], ("int",))
    if not paths:
        pytest.skip("this packet has no integer field")
    path, field = data.draw(st.sampled_from(paths))
    bad = data.draw(st.sampled_from([-1, 2 ** BITS[field.fmt], -(2**70), 2**70]))
    packet = data.draw(packets_of(kind, min_items=1))
    with pytest.raises(EncodeError):
        encode(_replace(packet, schema.BODIES[kind], path, bad))


def _strings_at_limit(limit: int) -> list[str]:
    """Strings of exactly ``limit`` UTF-8 bytes, in 1- to 4-byte characters."""
    return [char * (limit // width) + "a" * (limit % width) for char, width in (("a", 1), ("é", 2), ("€", 3), ("😀", 4))]


_prefixed = [
    (kind, path, field)
    for kind in KINDS
    for path, field in _paths(schema.BODIES[kind], ("str", "bytes"))
    if field.fmt in "BH"
]


@pytest.mark.parametrize(
    "kind, path, field", _prefixed, ids=[f"{PACKET_CLASSES[k].__name__}.{'.'.join(p)}" for k, p, _ in _prefixed]
)
def test_strings_and_bytes_at_and_past_their_limit(kind: int, path: tuple[str, ...], field: codec._Field) -> None:
    """
    A string of exactly its prefix's limit in UTF-8 bytes goes through (and matches construct);
    one byte more is an EncodeError, even when it has fewer characters than the limit.
    """
    limit = _max(field.fmt)
    declaration = schema.BODIES[kind]
    packet = simple_packet(kind)
    if field.shape == "str":
        fitting = _strings_at_limit(limit)
        too_long = [s + "a" for s in fitting] + ["é" * (limit // 2 + 1)]
    else:
        fitting, too_long = [b"\x00" * limit], [b"\x00" * (limit + 1)]
    for value in fitting:
        ok = _replace(packet, declaration, path, value)
        assert decode_body(kind, body_of(ok)) == ok
        assert declaration.build(to_values(declaration, ok)) == body_of(ok)
    for value in too_long:
        with pytest.raises(EncodeError):
            encode(_replace(packet, declaration, path, value))


_lists = [
    (kind, path, field) for kind in KINDS for path, field in _paths(schema.BODIES[kind], ("list",)) if len(path) == 1
]


@pytest.mark.parametrize(
    "kind, path, field", _lists, ids=[f"{PACKET_CLASSES[k].__name__}.{p[0]}" for k, p, _ in _lists]
)
def test_list_longer_than_its_count_is_an_encode_error(kind: int, path: tuple[str, ...], field: codec._Field) -> None:
    packet = simple_packet(kind)
    entry = getattr(packet, path[0])[0]
    with pytest.raises(EncodeError):
        encode(attrs.evolve(packet, **{path[0]: (entry,) * (_max(field.fmt) + 1)}))


def test_other_encode_errors() -> None:
    """Bad flags, wrong types, unencodable text and non-packets are EncodeErrors too."""
    hello = Hello(min_version=1, max_version=1, agent="a")
    with pytest.raises(EncodeError):
        encode(hello, flags=256)
    with pytest.raises(EncodeError):
        encode(attrs.evolve(hello, agent=b"bytes"))
    with pytest.raises(EncodeError):
        encode(attrs.evolve(hello, agent="\ud800"))  # a lone surrogate has no UTF-8 form
    with pytest.raises(EncodeError):
        encode(attrs.evolve(hello, min_version=1.5))
    with pytest.raises(EncodeError):
        encode(Item(content_type="text/plain", body=b""))
    with pytest.raises(EncodeError):
        encode("not a packet")


# Exact bytes -----------------------------------------------------------------------------------

MESSAGE = Message(
    server_id=1000,
    conversation="dm:alice:bob",
    seq=42,
    sender="alice",
    sender_device="phone",
    client_msg_id=7,
    sent_at=1_700_000_000_000,
    content_type="text/plain",
    body=b"hi",
)

EXACT = [
    (
        Hello(min_version=1, max_version=1, agent="imkit"),
        0,
        b"\x00\x00\x00\x0d"  # length: 4 header bytes after it + 9 body bytes
        b"\x01"  # version
        b"\x00"  # flags
        b"\x00\x01"  # kind: Hello
        b"\x01"  # min_version
        b"\x01"  # max_version
        b"\x00\x05imkit",  # agent: str16
    ),
    (
        Send(client_msg_id=7, target_type=schema.TARGET_USER, target="bob", content_type="text/plain", body=b"hi"),
        schema.FLAG_RESEND,
        b"\x00\x00\x00\x23"  # length: 4 + 31
        b"\x01"  # version
        b"\x01"  # flags: FLAG_RESEND
        b"\x00\x05"  # kind: Send
        b"\x00\x00\x00\x00\x00\x00\x00\x07"  # client_msg_id: u64
        b"\x01"  # target_type: TARGET_USER
        b"\x00\x03bob"  # target: str16
        b"\x0atext/plain"  # content_type: str8
        b"\x00\x00\x00\x02hi",  # body: bytes32
    ),
    (
        SendAck(
            client_msg_id=7,
            status=0,
            server_id=1000,
            seq=42,
            sent_at=1_700_000_000_000,
            count=1,
            conversation="dm:alice:bob",
            reason="",
        ),
        0,
        b"\x00\x00\x00\x38"  # length: 4 + 52
        b"\x01\x00\x00\x06"  # version, flags, kind: SendAck
        b"\x00\x00\x00\x00\x00\x00\x00\x07"  # client_msg_id
        b"\x00\x00"  # status: OK
        b"\x00\x00\x00\x00\x00\x00\x03\xe8"  # server_id: 1000
        b"\x00\x00\x00\x00\x00\x00\x00\x2a"  # seq: 42
        b"\x00\x00\x01\x8b\xcf\xe5\x68\x00"  # sent_at: 1700000000000 (ms)
        b"\x00\x01"  # count
        b"\x00\x0cdm:alice:bob"  # conversation: str16
        b"\x00\x00",  # reason: empty str16
    ),
    (
        DeliverAck(conversation="dm:alice:bob", seq=42),
        0,
        b"\x00\x00\x00\x1a"  # length: 4 + 22
        b"\x01\x00\x00\x08"  # version, flags, kind: DeliverAck
        b"\x00\x00\x00\x00\x00\x00\x00\x2a"  # seq: the fixed field comes first on the wire
        b"\x00\x0cdm:alice:bob",  # conversation: str16
    ),
    (
        SyncResult(request_id=3, more=False, ranges=(), messages=(MESSAGE,)),
        0,
        b"\x00\x00\x00\x5c"  # length: 4 + 88
        b"\x01\x00\x00\x0a"  # version, flags, kind: SyncResult
        b"\x00\x00\x00\x03"  # request_id: u32
        b"\x00"  # more: flag
        b"\x00\x00"  # ranges: list16, empty
        b"\x00\x01"  # messages: list16, one MESSAGE:
        b"\x00\x00\x00\x00\x00\x00\x03\xe8"  # server_id
        b"\x00\x00\x00\x00\x00\x00\x00\x2a"  # seq
        b"\x00\x00\x00\x00\x00\x00\x00\x07"  # client_msg_id
        b"\x00\x00\x01\x8b\xcf\xe5\x68\x00"  # sent_at
        b"\x00\x00"  # bundle_remaining
        b"\x00\x0cdm:alice:bob"  # conversation
        b"\x00\x05alice"  # sender
        b"\x00\x05phone"  # sender_device
        b"\x0atext/plain"  # content_type: str8
        b"\x00\x00\x00\x02hi",  # body: bytes32
    ),
]


@pytest.mark.parametrize("packet, flags, frame", EXACT, ids=[type(p).__name__ for p, _, _ in EXACT])
def test_exact_bytes(packet: Any, flags: int, frame: bytes) -> None:
    """These frames are written out by hand: any change to the wire format shows up here."""
    assert encode(packet, flags) == frame
    assert list(FrameReader().feed(frame)) == [(codec.kind_of(packet), flags, frame[8:])]
    assert decode_body(codec.kind_of(packet), frame[8:]) == packet
