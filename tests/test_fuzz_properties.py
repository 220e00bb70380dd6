"""
Hostile bytes against the wire layer and both sessions, as hypothesis properties.

Whatever a peer sends, split wherever the network splits it:

* a ``FrameReader`` and the generated decoders give packets or raise ``DecodeError`` (a
  ``ProtocolError``) and nothing else, whole or chunked alike; every body that decodes is the one
  canonical encoding of its packet; the reader never holds more than one maximum frame;
* a ``ServerConnection`` before Hello, after Hello and after login (accepted with
  ``accept_login``, as the hub does) never raises, reports only events the hub knows and its
  state allows, writes only valid frames and no more bytes than it was sent (plus a HelloOk and an
  Error frame), buffers at most one frame, and once it reports ``ConnectionClosing`` it has sent
  an ``Error`` frame with the same code and ignores everything afterwards;
* a ``ClientCore`` in each of its states never raises, reports only client events, hands each
  conversation's messages over in strictly increasing order, and writes only valid frames.

The inputs are not just noise: valid frames from the codec (with operation bodies inside
messages, and acks for the client's own pending sends), and the same frames mutated — bit flips,
truncations, length fields that lie about the frame or about a string or list inside it, other
versions, unknown core kinds, extension kinds, one kind's body under another kind's header.

The checks themselves live in ``fuzz/harness.py``, shared with the atheris targets next to it
(``python fuzz/run.py``), so a fuzzer finding replays here unchanged.
"""

from __future__ import annotations

import os
import struct
import sys
from functools import lru_cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from imkit.wire.packets import PACKET_CLASSES, RECORD_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fuzz import harness  # noqa: E402

checked = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Packets ---------------------------------------------------------------------------------------

NAMES = [
    "",
    "alice",
    "bob",
    "c:alice:bob",
    "g:team",
    "text/plain",
    "imkit/unknown",
    "application/x-imkit-8001",
    *schema.OPERATION_BODIES,
]


def _limit(fmt: str) -> int:
    return 2 ** (8 * struct.calcsize(">" + fmt)) - 1


def _int(limit: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, min(limit, 5)), st.sampled_from([limit - 1, limit]), st.integers(0, limit))


def _clip(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _value(field: codec._Field) -> st.SearchStrategy[Any]:
    shape = field.shape
    if shape == "int":
        return _int(_limit(field.fmt))
    if shape == "flag":
        return st.booleans()
    if shape == "str":
        limit = _limit(field.fmt)
        return st.one_of(st.sampled_from(NAMES), st.text(max_size=8)).map(lambda s: _clip(s, limit))
    if shape == "bytes":
        return st.binary(max_size=16)
    if shape == "ints":
        return st.lists(_int(_limit(field.record)), max_size=3).map(tuple)
    if shape == "list":
        return st.lists(_record(id(field.record)), max_size=3).map(tuple)
    if shape == "record":
        return _record(id(field.record))
    raise AssertionError(shape)


def _fields(declaration: Any, cls: type) -> st.SearchStrategy[Any]:
    described = codec.describe(declaration)
    plain = st.fixed_dictionaries({f.name: _value(f) for f in described})
    names = {f.name for f in described}
    if {"content_type", "body"} <= names:
        # Messages and items: often a valid operation, so its body reaches operations.decode.
        operation = st.tuples(plain, st.sampled_from(harness.OPERATION_ITEMS)).map(
            lambda pair: {**pair[0], "content_type": pair[1].content_type, "body": pair[1].body}
        )
        plain = st.one_of(plain, operation)
    return plain.map(lambda values: cls(**values))


@lru_cache(maxsize=None)
def _record(key: int) -> st.SearchStrategy[Any]:
    declaration = next(d for d in _declarations() if id(d) == key)
    return _fields(declaration, RECORD_CLASSES[key])


@lru_cache(maxsize=None)
def _declarations() -> tuple[Any, ...]:
    found: list[Any] = []

    def walk(declaration: Any) -> None:
        for field in codec.describe(declaration):
            if field.shape in ("list", "record") and field.record not in found:
                found.append(field.record)
                walk(field.record)

    for declaration in schema.BODIES.values():
        walk(declaration)
    return tuple(found)


@lru_cache(maxsize=None)
def packet_of(kind: int) -> st.SearchStrategy[Any]:
    return _fields(schema.BODIES[kind], PACKET_CLASSES[kind])


def frames_of(kinds: list[int]) -> st.SearchStrategy[bytes]:
    return st.tuples(st.sampled_from(kinds).flatmap(packet_of), st.integers(0, 255)).map(
        lambda pair: codec.encode(pair[0], pair[1])
    )


# Mutations -------------------------------------------------------------------------------------

OTHER_KINDS = st.one_of(
    st.sampled_from(sorted(PACKET_CLASSES)),  # another kind's header over this body
    st.integers(max(PACKET_CLASSES) + 1, schema.CORE_KINDS.stop - 1),  # unknown core kinds
    st.integers(schema.EXTENSION_KINDS.start, schema.EXTENSION_KINDS.stop - 1),
    st.just(0),
)


def _relength(data: bytearray) -> bytearray:
    data[0:4] = struct.pack(">I", max(len(data) - schema.LENGTH_SIZE, 0))
    return data


@st.composite
def mutated(draw: Any, frames: st.SearchStrategy[bytes]) -> bytes:
    """A valid frame with one kind of damage."""
    data = bytearray(draw(frames))
    body = range(schema.HEADER_SIZE, len(data))
    how = draw(st.sampled_from(["flip", "cut", "cut-body", "length", "version", "kind", "insert", "prefix"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif how == "cut":  # the stream ends inside the frame (its length says more)
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "cut-body" and body:  # a shorter body in a consistent frame
        data = _relength(data[: draw(st.integers(schema.HEADER_SIZE, len(data) - 1))])
    elif how == "length":  # the length field lies about the frame
        lie = draw(st.one_of(st.integers(-6, 6).map(lambda d: len(data) - 4 + d), st.integers(0, 2**32 - 1)))
        data[0:4] = struct.pack(">I", max(lie, 0))
    elif how == "version":
        data[4] = draw(st.integers(0, 255))
    elif how == "kind":
        data[6:8] = struct.pack(">H", draw(OTHER_KINDS))
    elif how == "insert":  # garbage inside the body, the frame's length kept right
        at = draw(st.integers(schema.HEADER_SIZE, len(data)))
        data = _relength(data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:])
    elif how == "prefix" and body:  # a string, bytes or count prefix inside the body lies
        at = draw(st.integers(schema.HEADER_SIZE, len(data) - 1))
        width = draw(st.sampled_from([1, 2, 4]))
        top = 2 ** (8 * width) - 1
        value = draw(st.one_of(st.sampled_from([0, 1, top]), st.integers(0, top)))
        data[at : at + width] = value.to_bytes(width, "big")
        data = _relength(data)
    return bytes(data)


def _header(max_length: int) -> st.SearchStrategy[bytes]:
    """A lone header: often a length beyond the limit, a small one, or another version."""
    return st.tuples(
        st.one_of(st.integers(0, 40), st.integers(max_length - 2, max_length + 2), st.integers(0, 2**32 - 1)),
        st.sampled_from([schema.PROTOCOL_VERSION, 0, 2, 255]),
        st.integers(0, 255),
        st.one_of(st.sampled_from(sorted(PACKET_CLASSES)), OTHER_KINDS),
    ).map(lambda h: struct.pack(">IBBH", *h))


def stream_of(kinds: list[int], extra: list[st.SearchStrategy[bytes]] = ()) -> st.SearchStrategy[list[bytes]]:
    """Up to eight pieces: frames, damaged frames (of these kinds or any), lone headers, noise."""
    valid = frames_of(kinds)
    anything = frames_of(sorted(PACKET_CLASSES))
    piece = st.one_of(valid, mutated(valid), mutated(anything), _header(harness.SMALL_FRAME), st.binary(max_size=24), *extra)
    return st.lists(piece, max_size=8)


def chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    return [stream[a:b] for a, b in zip(points, points[1:])]


cut_points = st.lists(st.integers(0, 10**6), max_size=12)
frame_limits = st.sampled_from([64, harness.SMALL_FRAME, schema.DEFAULT_MAX_FRAME])
ticks = st.lists(st.sampled_from([0.0, 0.25, 6.0, 25.0, 100.0]), min_size=1, max_size=4)

# Reader and decoder ----------------------------------------------------------------------------


@checked
@given(pieces=stream_of(sorted(PACKET_CLASSES)), cuts=cut_points, max_frame=frame_limits)
def test_any_stream_decodes_or_raises_the_protocol_error(pieces: list[bytes], cuts: list[int], max_frame: int) -> None:
    """
    Frames, mutated frames and noise, split anywhere: packets (each re-encoding to its own bytes)
    or DecodeError, the same outcome whole, chunked and byte by byte, the reader within one frame.
    """
    stream = b"".join(pieces)
    whole = harness.check_stream([stream], max_frame)
    assert harness.check_stream(chunks(stream, cuts), max_frame) == whole
    assert harness.check_stream([bytes([b]) for b in stream], max_frame) == whole


# Server session --------------------------------------------------------------------------------


@pytest.mark.parametrize("start", harness.SERVER_STARTS)
@checked
@given(
    pieces=stream_of(harness.CLIENT_KINDS),
    cuts=cut_points,
    small=st.booleans(),
    refuse=st.booleans(),
    pauses=ticks,
)
def test_server_session_survives_any_input(
    start: str, pieces: list[bytes], cuts: list[int], small: bool, refuse: bool, pauses: list[float]
) -> None:
    run = harness.ServerRun(start, harness.SMALL_FRAME if small else schema.DEFAULT_MAX_FRAME, refuse_login=refuse)
    for n, chunk in enumerate(chunks(b"".join(pieces), cuts)):
        run.feed(chunk)
        run.tick(pauses[n % len(pauses)])


@checked
@given(pieces=st.lists(frames_of(harness.CLIENT_KINDS), max_size=10), cuts=cut_points, pauses=ticks)
def test_server_session_takes_any_valid_client_frames(pieces: list[bytes], cuts: list[int], pauses: list[float]) -> None:
    """Only well-formed frames after login, so the checks reach acks, resends and the window."""
    run = harness.ServerRun(harness.AFTER_LOGIN)
    for n, chunk in enumerate(chunks(b"".join(pieces), cuts)):
        run.feed(chunk)
        run.tick(pauses[n % len(pauses)])


def test_server_error_closes_with_an_error_frame_and_ignores_the_rest() -> None:
    """The rules the property checks, on one example: a garbled Send after login."""
    run = harness.ServerRun(harness.AFTER_LOGIN)
    send = bytearray(codec.encode(packets.Send(1, schema.TARGET_USER, "bob", "text/plain", b"x")))
    send[-2] = 0xFF  # the body's length prefix now overruns the frame
    [closing] = run.feed(bytes(send) + codec.encode(packets.Ping(1)))
    assert closing.code == 1 and run.conn.state == "closed"
    assert run.feed(codec.encode(packets.Ping(2))) == []


# Client session --------------------------------------------------------------------------------

OUTBOX = harness.ClientRun(harness.DISCONNECTED).outbox
"""The client message ids of the sends every ClientRun has pending (its generator is seeded)."""


def drive_client(run: harness.ClientRun, parts: list[bytes], pauses: list[float]) -> None:
    """Feed ``parts`` with pauses between them."""
    for n, part in enumerate(parts):
        run.feed(part)
        run.tick(pauses[n % len(pauses)])


@st.composite
def acks_for_the_outbox(draw: Any) -> bytes:
    """
    A SendAck the client is waiting for, with any status, sequence and count; often after the
    answer to the client's first sync, placing the conversation just before the acked sequence.
    """
    limit = 2**64 - 1
    seq = draw(st.one_of(st.integers(0, 10), st.just(limit), st.integers(0, limit)))
    conversation = draw(st.sampled_from(["c:alice:bob", "g:team", ""]))
    ack = packets.SendAck(
        draw(st.sampled_from(OUTBOX)),
        draw(st.one_of(st.just(0), st.sampled_from(sorted(ErrorCode)))),
        draw(_int(limit)),
        seq,
        draw(_int(limit)),
        draw(st.integers(0, 3)),
        conversation,
        "",
    )
    placed = b""
    if draw(st.booleans()):
        start = max(seq - 1, 0)
        placed = codec.encode(packets.SyncResult(1, False, (packets.Range(conversation, start, start),), ()))
    return placed + codec.encode(ack)


@pytest.mark.parametrize("start", harness.CLIENT_STARTS)
@checked
@given(
    pieces=stream_of(harness.SERVER_KINDS, [acks_for_the_outbox()]),
    cuts=cut_points,
    small=st.booleans(),
    token=st.booleans(),
    pauses=ticks,
)
def test_client_session_survives_any_input(
    start: str, pieces: list[bytes], cuts: list[int], small: bool, token: bool, pauses: list[float]
) -> None:
    run = harness.ClientRun(start, harness.SMALL_FRAME if small else schema.DEFAULT_MAX_FRAME, resume_token=token)
    drive_client(run, chunks(b"".join(pieces), cuts), pauses)


@checked
@given(
    pieces=st.lists(st.one_of(frames_of(harness.SERVER_KINDS), acks_for_the_outbox()), max_size=10),
    cuts=cut_points,
    pauses=ticks,
)
def test_client_session_takes_any_valid_server_frames(pieces: list[bytes], cuts: list[int], pauses: list[float]) -> None:
    """
    Only well-formed frames, none of which ends the session by being garbled, so the properties
    reach deep into the logged-in client: acks for its own sends, syncs, bundles and heads.
    """
    drive_client(harness.ClientRun(harness.LOGGED_IN), chunks(b"".join(pieces), cuts), pauses)


def test_bundle_acked_at_the_top_of_the_sequence_space() -> None:
    """
    A server that acknowledges a bundle of two at seq 2**64 - 1 would make the client number its
    second message 2**64, which no DeliverAck can carry: the client refuses such an ack as a
    protocol error and drops the connection, like any other impossible value.
    """
    run = harness.ClientRun(harness.LOGGED_IN)
    top = 2**64 - 1
    stream = codec.encode(packets.SyncResult(1, False, (packets.Range("c:alice:bob", top - 1, top - 1),), ()))
    stream += codec.encode(packets.SendAck(OUTBOX[1], 0, 1, top, 0, 2, "c:alice:bob", ""))
    run.feed(stream)
    assert run.core.state == "disconnected"
    assert all(seq <= top for seq in run.core.inbound.delivered.values())


# The seed corpus and the atheris entry points ----------------------------------------------------


@pytest.mark.parametrize("target", sorted(harness.SEEDS))
def test_every_seed_passes_its_target(target: str) -> None:
    """The fuzzers' seed corpus is valid input that the targets accept as it is."""
    seeds = list(harness.SEEDS[target]())
    assert len(seeds) > 50
    for seed in seeds:
        harness.RUNNERS[target](seed)


def test_seeds_reach_every_state() -> None:
    """The honest conversations in the seeds get each session all the way through."""
    logged_in, _, from_scratch = list(harness.server_seeds())[:3]
    options, parts = harness.decode_input(logged_in)
    server = harness.ServerRun(harness.SERVER_STARTS[options.start])
    found = [type(e).__name__ for part in parts for e in server.feed(part)]
    assert {"SendRequested", "DeliveryAcked", "SyncRequested", "RequestReceived"} <= set(found)
    assert server.closed_with is not None and server.closed_with.code == 0
    options, parts = harness.decode_input(from_scratch)
    server = harness.ServerRun(harness.SERVER_STARTS[options.start])
    assert [type(e).__name__ for part in parts for e in server.feed(part)] == ["LoginRequested"]
    assert server.conn.state == "ready"

    options, parts = harness.decode_input(next(harness.client_seeds()))
    client = harness.ClientRun(harness.CLIENT_STARTS[options.start])
    found = [type(e).__name__ for part in parts for e in client.feed(part)]
    assert found[:3] == ["LoggedIn", "MessagesDelivered", "CaughtUp"]
    assert found.count("SendAcknowledged") == 2 and found[-1] == "CloseConnection"


def test_decode_input_round_trips_its_control_byte() -> None:
    control = harness.control_byte(start=2, alternative=True, small_frame=True, chunk=13)
    options, parts = harness.decode_input(bytes([control]) + bytes(30))
    assert (options.start, options.alternative, options.max_frame, options.chunk) == (2, True, harness.SMALL_FRAME, 13)
    assert [len(p) for p in parts] == [13, 13, 4]
    assert harness.decode_input(b"") == (harness.Options(0, False, False, 0), [])
