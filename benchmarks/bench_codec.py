"""
Encode and decode cost per frame: the generated codec against construct and against hand-written
``struct`` code.

Run ``python benchmarks/bench_codec.py`` (add ``--quick`` for a fast, noisier run, and ``--cpu`` to
count CPU time rather than wall time when other processes compete for the CPU).

Five codecs, on four representative packets (a Send with a 100-byte body, a Deliver, a SendAck
and a DeliverAck):

generated
    ``imkit.wire.codec.encode(packet)`` and ``decode_body(kind, body)``: the public API, dispatch
    and error translation included.
hand/objects
    A careful hand-written ``struct`` codec for the same four packets (below), producing and
    consuming the same packet objects and doing the same checks (lengths, strict UTF-8, no
    trailing bytes): the fair baseline.  The generated codec should be close to it; its decoders
    fill the frozen objects' slots directly instead of calling the class (``codec._slot_setters``),
    so they can even beat it.
hand/tuples
    The same, with plain tuples instead of packet objects: how much of the cost is building objects.
construct
    ``BODIES[kind].build(values)`` / ``.parse(body)``: construct interpreting the declarations, on
    dicts and Containers (no conversion to packet objects, and no frame header: both favour it).
compiled
    ``BODIES[kind].compile()``: construct's own compiler (whose parser does not check lengths).

Encoding produces a whole frame (header included) for generated and hand-written, only the body
for construct.  Decoding always starts from the body.  Each figure is the best of several timed
loops, in microseconds per frame.
"""

from __future__ import annotations

import argparse
import functools
import os
import struct
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from imkit.model import Message  # noqa: E402
from imkit.wire import codec, schema  # noqa: E402
from imkit.wire.errors import DecodeError  # noqa: E402
from imkit.wire.packets import Deliver, DeliverAck, Send, SendAck  # noqa: E402

# The packets ---------------------------------------------------------------------------------

BODY = bytes(range(100))

MESSAGE = Message(
    server_id=123_456_789,
    conversation="grp:engineering",
    seq=4242,
    sender="alice",
    sender_device="laptop-1",
    client_msg_id=987_654_321,
    sent_at=1_700_000_000_000,
    content_type="text/plain; charset=utf-8",
    body=BODY,
)

PACKETS = {
    "Send": Send(
        client_msg_id=987_654_321,
        target_type=schema.TARGET_CONVERSATION,
        target="grp:engineering",
        content_type="text/plain; charset=utf-8",
        body=BODY,
    ),
    "Deliver": Deliver(message=MESSAGE),
    "SendAck": SendAck(
        client_msg_id=987_654_321,
        status=0,
        server_id=123_456_789,
        seq=4242,
        sent_at=1_700_000_000_000,
        count=1,
        conversation="grp:engineering",
        reason="",
    ),
    "DeliverAck": DeliverAck(conversation="grp:engineering", seq=4242),
}

# The hand-written baseline -------------------------------------------------------------------
#
# What a careful programmer writes for these four packets with ``struct``: each run of fixed fields
# (with the frame header, and the prefix of the string that follows) in one precompiled Struct, a
# length check before every read, strict UTF-8, no trailing bytes.

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

_SEND_HEAD = struct.Struct(">IBBHQBH")
_SEND_FIXED = struct.Struct(">QBH")
_SENDACK_HEAD = struct.Struct(">IBBHQHQQQHH")
_SENDACK_FIXED = struct.Struct(">QHQQQHH")
_DELIVERACK_HEAD = struct.Struct(">IBBHQH")
_DELIVERACK_FIXED = struct.Struct(">QH")
_DELIVER_HEAD = struct.Struct(">IBBHQQQQHH")
_MESSAGE_FIXED = struct.Struct(">QQQQHH")


def _short() -> DecodeError:
    return DecodeError("truncated or trailing bytes")


def _send_frame(
    client_msg_id: int, target_type: int, target: str, content_type: str, body: bytes, flags: int = 0
) -> bytes:
    target_b = target.encode("utf-8")
    ctype = content_type.encode("utf-8")
    length = 20 + len(target_b) + len(ctype) + len(body)
    head = _SEND_HEAD.pack(length, 1, flags, schema.SEND, client_msg_id, target_type, len(target_b))
    return b"".join((head, target_b, _U8.pack(len(ctype)), ctype, _U32.pack(len(body)), body))


def hand_encode_send(p: Send, flags: int = 0) -> bytes:
    return _send_frame(p.client_msg_id, p.target_type, p.target, p.content_type, p.body, flags)


def hand_decode_send(b: bytes, as_tuple: bool = False) -> Any:
    try:
        end = len(b)
        if end < 11:
            raise _short()
        client_msg_id, target_type, n = _SEND_FIXED.unpack_from(b, 0)
        pos = 11 + n
        if pos + 1 > end:
            raise _short()
        target = b[11:pos].decode("utf-8")
        stop = pos + 1 + b[pos]
        if stop + 4 > end:
            raise _short()
        ctype = b[pos + 1 : stop].decode("utf-8")
        (n,) = _U32.unpack_from(b, stop)
        if stop + 4 + n != end:
            raise _short()
    except UnicodeDecodeError as error:
        raise DecodeError(str(error)) from None
    if as_tuple:
        return client_msg_id, target_type, target, ctype, b[stop + 4 :]
    return Send(client_msg_id, target_type, target, ctype, b[stop + 4 :])


def _sendack_frame(
    client_msg_id: int,
    status: int,
    server_id: int,
    seq: int,
    sent_at: int,
    count: int,
    conversation: str,
    reason: str,
    flags: int = 0,
) -> bytes:
    conversation_b = conversation.encode("utf-8")
    reason_b = reason.encode("utf-8")
    length = 44 + len(conversation_b) + len(reason_b)
    head = _SENDACK_HEAD.pack(
        length, 1, flags, schema.SEND_ACK, client_msg_id, status, server_id, seq, sent_at, count, len(conversation_b)
    )
    return b"".join((head, conversation_b, _U16.pack(len(reason_b)), reason_b))


def hand_encode_sendack(p: SendAck, flags: int = 0) -> bytes:
    return _sendack_frame(
        p.client_msg_id, p.status, p.server_id, p.seq, p.sent_at, p.count, p.conversation, p.reason, flags
    )


def hand_decode_sendack(b: bytes, as_tuple: bool = False) -> Any:
    try:
        end = len(b)
        if end < 38:
            raise _short()
        client_msg_id, status, server_id, seq, sent_at, count, n = _SENDACK_FIXED.unpack_from(b, 0)
        pos = 38 + n
        if pos + 2 > end:
            raise _short()
        conversation = b[38:pos].decode("utf-8")
        (n,) = _U16.unpack_from(b, pos)
        if pos + 2 + n != end:
            raise _short()
        reason = b[pos + 2 :].decode("utf-8")
    except UnicodeDecodeError as error:
        raise DecodeError(str(error)) from None
    if as_tuple:
        return client_msg_id, status, server_id, seq, sent_at, count, conversation, reason
    return SendAck(client_msg_id, status, server_id, seq, sent_at, count, conversation, reason)


def _deliverack_frame(conversation: str, seq: int, flags: int = 0) -> bytes:
    conversation_b = conversation.encode("utf-8")
    head = _DELIVERACK_HEAD.pack(14 + len(conversation_b), 1, flags, schema.DELIVER_ACK, seq, len(conversation_b))
    return head + conversation_b


def hand_encode_deliverack(p: DeliverAck, flags: int = 0) -> bytes:
    return _deliverack_frame(p.conversation, p.seq, flags)


def hand_decode_deliverack(b: bytes, as_tuple: bool = False) -> Any:
    try:
        if len(b) < 10:
            raise _short()
        seq, n = _DELIVERACK_FIXED.unpack_from(b, 0)
        if 10 + n != len(b):
            raise _short()
        conversation = b[10:].decode("utf-8")
    except UnicodeDecodeError as error:
        raise DecodeError(str(error)) from None
    if as_tuple:
        return conversation, seq
    return DeliverAck(conversation, seq)


def _deliver_frame(
    server_id: int,
    conversation: str,
    seq: int,
    sender: str,
    sender_device: str,
    client_msg_id: int,
    sent_at: int,
    content_type: str,
    body: bytes,
    bundle_remaining: int,
    flags: int = 0,
) -> bytes:
    conversation_b = conversation.encode("utf-8")
    sender_b = sender.encode("utf-8")
    device = sender_device.encode("utf-8")
    ctype = content_type.encode("utf-8")
    length = 49 + len(conversation_b) + len(sender_b) + len(device) + len(ctype) + len(body)
    head = _DELIVER_HEAD.pack(
        length, 1, flags, schema.DELIVER, server_id, seq, client_msg_id, sent_at, bundle_remaining, len(conversation_b)
    )
    return b"".join(
        (
            head,
            conversation_b,
            _U16.pack(len(sender_b)),
            sender_b,
            _U16.pack(len(device)),
            device,
            _U8.pack(len(ctype)),
            ctype,
            _U32.pack(len(body)),
            body,
        )
    )


def hand_encode_deliver(p: Deliver, flags: int = 0) -> bytes:
    m = p.message
    return _deliver_frame(
        m.server_id,
        m.conversation,
        m.seq,
        m.sender,
        m.sender_device,
        m.client_msg_id,
        m.sent_at,
        m.content_type,
        m.body,
        m.bundle_remaining,
        flags,
    )


def hand_decode_deliver(b: bytes, as_tuple: bool = False) -> Any:
    try:
        end = len(b)
        if end < 36:
            raise _short()
        server_id, seq, client_msg_id, sent_at, bundle_remaining, n = _MESSAGE_FIXED.unpack_from(b, 0)
        pos = 36 + n
        if pos + 2 > end:
            raise _short()
        conversation = b[36:pos].decode("utf-8")
        (n,) = _U16.unpack_from(b, pos)
        stop = pos + 2 + n
        if stop + 2 > end:
            raise _short()
        sender = b[pos + 2 : stop].decode("utf-8")
        (n,) = _U16.unpack_from(b, stop)
        pos = stop + 2 + n
        if pos + 1 > end:
            raise _short()
        device = b[stop + 2 : pos].decode("utf-8")
        stop = pos + 1 + b[pos]
        if stop + 4 > end:
            raise _short()
        ctype = b[pos + 1 : stop].decode("utf-8")
        (n,) = _U32.unpack_from(b, stop)
        if stop + 4 + n != end:
            raise _short()
    except UnicodeDecodeError as error:
        raise DecodeError(str(error)) from None
    body = b[stop + 4 :]
    # In Message's attribute order.
    if as_tuple:
        return server_id, conversation, seq, sender, device, client_msg_id, sent_at, ctype, body, bundle_remaining
    message = Message(server_id, conversation, seq, sender, device, client_msg_id, sent_at, ctype, body, bundle_remaining)
    return Deliver(message)


HAND = {
    "Send": (hand_encode_send, hand_decode_send),
    "Deliver": (hand_encode_deliver, hand_decode_deliver),
    "SendAck": (hand_encode_sendack, hand_decode_sendack),
    "DeliverAck": (hand_encode_deliverack, hand_decode_deliverack),
}

# The tuple variant's encoders: the values in the class's attribute order.
HAND_TUPLE_ENCODE = {
    "Send": lambda t: _send_frame(*t),
    "Deliver": lambda t: _deliver_frame(*t),
    "SendAck": lambda t: _sendack_frame(*t),
    "DeliverAck": lambda t: _deliverack_frame(*t),
}


# Construct's form of the values ----------------------------------------------------------------


def _values(declaration: Any, obj: Any) -> dict:
    values = {}
    for field in codec.describe(declaration):
        value = getattr(obj, field.name)
        if field.shape == "record":
            value = _values(field.record, value)
        elif field.shape == "list":
            value = [_values(field.record, item) for item in value]
        values[field.name] = value
    return values


# Timing ----------------------------------------------------------------------------------------


Clock = Callable[[], float]


def best_us(fn: Callable[[Any], Any], arg: Any, number: int, repeat: int, clock: Clock = time.perf_counter) -> float:
    """Microseconds per call: the best of ``repeat`` loops of ``number`` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        for _ in range(number):
            fn(arg)
        best = min(best, clock() - start)
    return best / number * 1e6


def check(name: str) -> None:
    """Every codec in the table must agree on this packet before it is timed."""
    packet = PACKETS[name]
    kind = codec.kind_of(packet)
    frame = codec.encode(packet)
    body = frame[schema.HEADER_SIZE :]
    hand_encode, hand_decode = HAND[name]
    assert hand_encode(packet) == frame, name
    assert hand_decode(body) == packet, name
    assert HAND_TUPLE_ENCODE[name](hand_decode(body, True)) == frame, name
    assert codec.decode_body(kind, body) == packet, name
    declaration = schema.BODIES[kind]
    assert declaration.build(_values(declaration, packet)) == body, name
    assert declaration.compile().build(_values(declaration, packet)) == body, name


COLUMNS = ["generated", "hand/objects", "hand/tuples", "construct", "compiled"]


def run(number: int, repeat: int, clock: Clock = time.perf_counter) -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    for name, packet in PACKETS.items():
        check(name)
        kind = codec.kind_of(packet)
        body = codec.encode(packet)[schema.HEADER_SIZE :]
        declaration = schema.BODIES[kind]
        compiled = declaration.compile()
        values = _values(declaration, packet)
        hand_encode, hand_decode = HAND[name]
        as_tuple = hand_decode(body, True)
        slow = max(1, number // 20)  # construct is far slower: fewer calls, same accuracy
        decode_body = codec.decode_body

        encoders = {
            "generated": (codec.encode, packet, number),
            "hand/objects": (hand_encode, packet, number),
            "hand/tuples": (HAND_TUPLE_ENCODE[name], as_tuple, number),
            "construct": (declaration.build, values, slow),
            "compiled": (compiled.build, values, slow),
        }
        decoders = {
            "generated": (functools.partial(decode_body, kind), body, number),
            "hand/objects": (hand_decode, body, number),
            "hand/tuples": (functools.partial(hand_decode, as_tuple=True), body, number),
            "construct": (declaration.parse, body, slow),
            "compiled": (compiled.parse, body, slow),
        }
        for op, table in (("encode", encoders), ("decode", decoders)):
            rows.append((name, op, {col: best_us(fn, arg, n, repeat, clock) for col, (fn, arg, n) in table.items()}))
    return rows


def format_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    head = f"{'packet':<11}{'op':<7}" + "".join(f"{c:>13}" for c in COLUMNS)
    head += f"{'gen/hand':>10}{'constr/gen':>12}{'compl/gen':>11}"
    title = f"microseconds per frame (best of runs); {sys.implementation.name} {sys.version.split()[0]}"
    lines = [title, head, "-" * len(head)]
    for name, op, t in rows:
        line = f"{name:<11}{op:<7}" + "".join(f"{t[c]:>13.2f}" for c in COLUMNS)
        line += f"{t['generated'] / t['hand/objects']:>10.2f}"
        line += f"{t['construct'] / t['generated']:>12.1f}{t['compiled'] / t['generated']:>11.1f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (noisier)")
    parser.add_argument(
        "--cpu", action="store_true", help="time with process_time instead of perf_counter (steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    number, repeat = (2_000, 3) if args.quick else (50_000, 7)
    clock = time.process_time if args.cpu else time.perf_counter
    print(format_table(run(number, repeat, clock)))
    print(f"clock: {clock.__name__}")


if __name__ == "__main__":
    main()
