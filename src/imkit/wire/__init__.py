"""
The wire format: construct declarations (``schema``), the packet objects (``packets``), the
generated fast codec (``codec``) and stream framing (``framing``).
"""

from imkit.wire.codec import decode_body, encode, kind_of
from imkit.wire.errors import DecodeError, EncodeError, ErrorCode, ProtocolError
from imkit.wire.framing import FrameReader
from imkit.wire.packets import *  # noqa: F401,F403 - the packet classes are the public API
from imkit.wire.packets import PACKET_CLASSES

__all__ = [
    "DecodeError",
    "EncodeError",
    "ErrorCode",
    "FrameReader",
    "PACKET_CLASSES",
    "ProtocolError",
    "decode_body",
    "encode",
    "kind_of",
] + [cls.__name__ for cls in PACKET_CLASSES.values()] + ["Cursor", "Range"]
