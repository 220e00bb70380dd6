"""
Splitting a byte stream into frames, with the size limit enforced before a body is buffered.
"""

from __future__ import annotations

import struct
from typing import Iterator

from imkit.wire import schema
from imkit.wire.errors import DecodeError, ErrorCode

# The header as declared in schema.HEADER (length, version, flags, kind), read in one call.
_HEADER = struct.Struct(">" + "".join(sub.subcon.fmtstr[1] for sub in schema.HEADER.subcons))
_LENGTH = struct.Struct(">" + schema.HEADER.subcons[0].subcon.fmtstr[1])
_LENGTH_SIZE = schema.LENGTH_SIZE
_HEADER_SIZE = schema.HEADER_SIZE
_MIN_LENGTH = schema.HEADER_SIZE - schema.LENGTH_SIZE


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
        self._pos = 0

    @property
    def buffered(self) -> int:
        """How many received bytes are waiting for the rest of their frame."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        """
        Add ``data`` now; return an iterator over the frames it completes, which raises
        DecodeError at the first bad one.  The read position is the reader's own, so a consumer
        that stops early, or feeds again meanwhile, never sees a frame twice.
        """
        buffer = self._buffer
        if self._pos:
            del buffer[: self._pos]
            self._pos = 0
        buffer += data
        return self._frames()

    def _frames(self) -> Iterator[tuple[int, int, bytes]]:
        # Hot: every frame of every connection passes here, so the loop keeps what it reads in
        # locals.
        buffer = self._buffer
        max_frame = self.max_frame
        version_wanted = self.version
        unpack_length = _LENGTH.unpack_from
        unpack_header = _HEADER.unpack_from
        pos = self._pos
        while len(buffer) - pos >= _LENGTH_SIZE:
            (length,) = unpack_length(buffer, pos)
            if length > max_frame:
                raise DecodeError(f"frame of {length} bytes exceeds the limit of {max_frame}", ErrorCode.FRAME_TOO_LARGE)
            if length < _MIN_LENGTH:
                raise DecodeError(f"frame length {length} is shorter than a frame header")
            if len(buffer) - pos < _HEADER_SIZE:
                return
            _, version, flags, kind = unpack_header(buffer, pos)
            if version != version_wanted:
                raise DecodeError(f"protocol version {version} is not {version_wanted}", ErrorCode.UNSUPPORTED_VERSION)
            end = pos + _LENGTH_SIZE + length
            if len(buffer) < end:
                return
            self._pos = end
            yield kind, flags, bytes(buffer[pos + _HEADER_SIZE : end])
            pos = self._pos
