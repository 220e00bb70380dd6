"""FrameReader bookkeeping: data is kept as soon as it is fed, and no frame is handed out twice."""

from twisted.trial.unittest import SynchronousTestCase

from imkit.wire import codec, packets
from imkit.wire.errors import DecodeError, ErrorCode
from imkit.wire.framing import FrameReader


class FrameReaderTests(SynchronousTestCase):
    def test_fed_data_is_kept_even_if_not_iterated(self) -> None:
        reader = FrameReader()
        frame = codec.encode(packets.Ping(1))
        reader.feed(frame)
        self.assertEqual(reader.buffered, len(frame))
        self.assertEqual([kind for kind, _, _ in reader.feed(b"")], [0x0E])

    def test_stopping_early_and_feeding_again_never_repeats_a_frame(self) -> None:
        reader = FrameReader()
        frames = reader.feed(codec.encode(packets.Ping(1)) + codec.encode(packets.Ping(2)))
        first = next(frames)
        rest = list(reader.feed(codec.encode(packets.Ping(3))))
        bodies = [codec.decode_body(kind, body).nonce for kind, _, body in [first, *rest]]
        self.assertEqual(bodies, [1, 2, 3])

    def test_wrong_version_refused_from_the_header(self) -> None:
        """A frame in another version is refused once its header is in, before its body is buffered."""
        reader = FrameReader(max_frame=1 << 20)
        header = (1000).to_bytes(4, "big") + bytes([9, 0, 0, 1])
        with self.assertRaises(DecodeError) as caught:
            list(reader.feed(header))
        self.assertEqual(caught.exception.code, ErrorCode.UNSUPPORTED_VERSION)
