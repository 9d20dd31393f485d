"""Connection multiplexing over one byte stream (the virtio-serial channel).

A virtio-serial port is a single byte stream, but gRPC clients want a fresh
connection each, and several host clients may use one sandbox at once. Both
ends therefore speak this small framing over the port: the host opens numbered
connections, each relayed in the guest to its own connection to the agent's
gRPC socket.

Frame: 8-byte header ``magic:u8 type:u8 length:u16 conn:u32`` (big endian)
followed by ``length`` payload bytes.

- HELLO  (both ways)  payload ``version:u8 session:u32``. Each end picks a
  random session number when it starts (the host: each time it connects to the
  chardev; the guest: each time the agent opens the port). The host sends HELLO
  on connect and repeats it until answered; the guest sends one when it opens
  the port and answers every host HELLO. A HELLO carrying a session number
  different from the last one seen from that peer means the peer restarted:
  the receiver drops every connection of the old session (repeated HELLOs of
  the same session change nothing, so retries cannot kill fresh connections).
- OPEN   (host→guest) open connection ``conn``.
- DATA   (both ways)  bytes for ``conn``; never more than the peer's credit.
- CLOSE  (both ways)  ``conn`` is gone (full close; later frames for it are ignored).
- CREDIT (both ways)  payload ``bytes:u32``: the sender consumed that much of
  ``conn``'s data, so the peer may send that much more. Each connection starts
  with WINDOW bytes of credit each way, so one stalled connection can never
  block the shared stream for the others.

This module is sans-I/O: it encodes frames and parses a byte stream; the agent
and the host client each drive it with their own event loop.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = 0xB7
VERSION = 1
HEADER = struct.Struct(">BBHI")
MAX_PAYLOAD = 0xFFFF
WINDOW = 256 * 1024


class FrameType(IntEnum):
    HELLO = 1
    OPEN = 2
    DATA = 3
    CLOSE = 4
    CREDIT = 5


class MuxError(Exception):
    """The byte stream is not valid mux framing (the session must be reset)."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    conn: int = 0
    payload: bytes = b""


def encode(ftype: FrameType, conn: int = 0, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, ftype, len(payload), conn) + payload


def encode_data(conn: int, data: bytes | memoryview) -> list[bytes]:
    """Split ``data`` into as many DATA frames as needed."""
    view = memoryview(data)
    return [
        encode(FrameType.DATA, conn, bytes(view[i : i + MAX_PAYLOAD]))
        for i in range(0, len(view), MAX_PAYLOAD)
    ]


_HELLO = struct.Struct(">BI")


def hello(session: int) -> bytes:
    return encode(FrameType.HELLO, 0, _HELLO.pack(VERSION, session))


def new_session() -> int:
    """A random nonzero session number."""
    return int.from_bytes(os.urandom(4), "big") or 1


def hello_session(frame: Frame) -> int:
    """The session number of a HELLO frame; MuxError if the version is not ours."""
    if len(frame.payload) != _HELLO.size:
        raise MuxError(f"HELLO frame has {len(frame.payload)} bytes, not {_HELLO.size}")
    version, session = _HELLO.unpack(frame.payload)
    if version != VERSION:
        raise MuxError(f"peer speaks mux version {version}, this end speaks {VERSION}")
    return session


def credit(conn: int, nbytes: int) -> bytes:
    return encode(FrameType.CREDIT, conn, struct.pack(">I", nbytes))


def credit_amount(frame: Frame) -> int:
    if len(frame.payload) != 4:
        raise MuxError(f"CREDIT frame for conn {frame.conn} has {len(frame.payload)} bytes, not 4")
    return struct.unpack(">I", frame.payload)[0]


class Parser:
    """Incremental frame parser: feed bytes, get whole frames back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            magic, ftype, length, conn = HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                self._buf.clear()
                raise MuxError(f"bad frame magic 0x{magic:02x} at offset {pos}")
            try:
                kind = FrameType(ftype)
            except ValueError:
                self._buf.clear()
                raise MuxError(f"unknown frame type {ftype}") from None
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            frames.append(Frame(kind, conn, bytes(buf[pos + HEADER.size : end])))
            pos = end
        del buf[:pos]
        return frames


@dataclass(slots=True)
class Credit:
    """Send-side credit of one connection: how much the peer can still take."""

    available: int = WINDOW

    def take(self, wanted: int) -> int:
        n = min(wanted, self.available)
        self.available -= n
        return n

    def grant(self, n: int) -> None:
        self.available += n


@dataclass(slots=True)
class ReceiveWindow:
    """Receive-side accounting: returns a CREDIT amount once enough was consumed.

    Call consume() with what was actually delivered to the local destination
    (not merely received), and send CREDIT for what it returns. Credit goes back
    in batches (a quarter window) to keep CREDIT frames rare.
    """

    consumed: int = 0

    def consume(self, n: int) -> int:
        self.consumed += n
        if self.consumed >= WINDOW // 4:
            n, self.consumed = self.consumed, 0
            return n
        return 0
