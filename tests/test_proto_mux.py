"""The mux framing that carries many connections over one virtio-serial stream."""

from __future__ import annotations

import pytest

from bulkhead_proto import mux
from bulkhead_proto.mux import FrameType


def test_round_trip_across_arbitrary_chunking() -> None:
    wire = (
        mux.hello(42)
        + mux.encode(FrameType.OPEN, 7)
        + b"".join(mux.encode_data(7, b"x" * 70_000))
        + mux.credit(7, 1234)
        + mux.encode(FrameType.CLOSE, 7)
    )
    parser = mux.Parser()
    frames: list[mux.Frame] = []
    # Feed in awkward pieces: byte by byte at first, then odd sizes.
    for i in range(0, 40):
        frames += parser.feed(wire[i : i + 1])
    for i in range(40, len(wire), 997):
        frames += parser.feed(wire[i : i + 997])

    kinds = [f.type for f in frames]
    assert kinds == [
        FrameType.HELLO,
        FrameType.OPEN,
        FrameType.DATA,
        FrameType.DATA,
        FrameType.CREDIT,
        FrameType.CLOSE,
    ]
    assert mux.hello_session(frames[0]) == 42
    assert b"".join(f.payload for f in frames if f.type == FrameType.DATA) == b"x" * 70_000
    assert all(f.conn == 7 for f in frames[1:])
    assert mux.credit_amount(frames[4]) == 1234


def test_data_is_split_at_max_payload() -> None:
    frames = mux.encode_data(1, b"a" * (mux.MAX_PAYLOAD + 1))
    assert len(frames) == 2
    assert len(frames[0]) == mux.HEADER.size + mux.MAX_PAYLOAD
    assert len(frames[1]) == mux.HEADER.size + 1


def test_oversized_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        mux.encode(FrameType.DATA, 1, b"a" * (mux.MAX_PAYLOAD + 1))


def test_garbage_is_a_mux_error_and_clears_the_buffer() -> None:
    parser = mux.Parser()
    with pytest.raises(mux.MuxError, match="magic"):
        parser.feed(b"GET / HTTP/1.1\r\n")
    # After a reset the parser accepts a clean stream again.
    assert parser.feed(mux.hello(1))[0].type == FrameType.HELLO


def test_unknown_frame_type_is_a_mux_error() -> None:
    bad = mux.HEADER.pack(mux.MAGIC, 99, 0, 1)
    with pytest.raises(mux.MuxError, match="unknown frame type 99"):
        mux.Parser().feed(bad)


def test_malformed_credit_names_the_connection() -> None:
    frame = mux.Frame(FrameType.CREDIT, 3, b"\x00\x01")
    with pytest.raises(mux.MuxError, match="conn 3"):
        mux.credit_amount(frame)


def test_credit_never_goes_negative() -> None:
    c = mux.Credit()
    assert c.take(mux.WINDOW + 10) == mux.WINDOW
    assert c.take(1) == 0
    c.grant(5)
    assert c.take(10) == 5


def test_receive_window_returns_credit_in_batches() -> None:
    w = mux.ReceiveWindow()
    quarter = mux.WINDOW // 4
    assert w.consume(quarter - 1) == 0
    assert w.consume(1) == quarter
    assert w.consume(10) == 0


def test_hello_from_another_version_is_refused() -> None:
    frame = mux.Frame(FrameType.HELLO, 0, bytes([9]) + b"\0\0\0\1")
    with pytest.raises(mux.MuxError, match="version 9"):
        mux.hello_session(frame)


def test_new_sessions_differ_and_are_nonzero() -> None:
    sessions = {mux.new_session() for _ in range(50)}
    assert 0 not in sessions
    assert len(sessions) > 45
