"""
Splitting a byte stream into frames, with the size limit enforced before a body is buffered.
"""

from __future__ import annotations

import struct
from typing import Iterator

from imkit.wire import schema
from imkit.wire.errors import DecodeError, ErrorCode

_HEADER = struct.Struct(">IBBH")
_LENGTH = struct.Struct(">I")


class FrameReader:
    """
    Accumulates received bytes and yields ``(kind, flags, body)`` for each complete frame.

    A frame whose length prefix exceeds ``max_frame`` is refused as soon as its four length bytes
    have arrived, so a peer can never make us buffer more than one maximum frame.  A frame with a
    version other than ``version`` is refused too (version negotiation happens in ``Hello``, whose
    frame carries the version the client speaks).
    """

    def __init__(self, max_frame: int = schema.DEFAULT_MAX_FRAME, version: int = schema.PROTOCOL_VERSION) -> None:
        self.max_frame = max_frame
        self.version = version
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """How many received bytes are waiting for the rest of their frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        """Add ``data`` and yield every frame it completes; raise DecodeError on a bad frame."""
        buffer = self._buffer
        buffer += data
        pos = 0
        size = len(buffer)
        try:
            while size - pos >= schema.LENGTH_SIZE:
                (length,) = _LENGTH.unpack_from(buffer, pos)
                if length > self.max_frame:
                    raise DecodeError(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame}", ErrorCode.FRAME_TOO_LARGE
                    )
                if length < schema.HEADER_SIZE - schema.LENGTH_SIZE:
                    raise DecodeError(f"frame length {length} is shorter than a frame header")
                end = pos + schema.LENGTH_SIZE + length
                if end > size:
                    break
                _, version, flags, kind = _HEADER.unpack_from(buffer, pos)
                if version != self.version:
                    raise DecodeError(f"protocol version {version} is not {self.version}", ErrorCode.UNSUPPORTED_VERSION)
                body = bytes(buffer[pos + schema.HEADER_SIZE : end])
                pos = end
                yield kind, flags, body
        finally:
            del buffer[:pos]
