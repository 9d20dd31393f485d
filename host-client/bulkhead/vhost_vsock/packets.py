"""The virtio-vsock packet header (virtio spec, "Socket Device").

Every packet on the rx and tx queues starts with a 44-byte little-endian
header; stream payload (``len`` bytes) follows it. Each header also carries
the sender's receive-buffer size (``buf_alloc``) and how many bytes its
application has consumed so far (``fwd_cnt``): that is the credit the other
side may send against.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HOST_CID = 2
# CIDs 0, 1 and 2 are the hypervisor, local and host; 0xFFFFFFFF is "any".
RESERVED_CIDS = frozenset({0, 1, 2, 0xFFFFFFFF})

# src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
_HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 44

TYPE_STREAM = 1

# The largest payload Linux puts in one tx packet; anything longer is refused.
MAX_PAYLOAD = 64 * 1024


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


# SHUTDOWN flags: the sender will receive no more / send no more.
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND


class PacketError(ValueError):
    """A packet that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        if len(data) < HEADER_SIZE:
            raise PacketError(f"packet of {len(data)} bytes is shorter than the header")
        return cls(*_HEADER.unpack_from(data))

    def describe(self) -> str:
        try:
            op = Op(self.op).name
        except ValueError:
            op = f"op {self.op}"
        return (
            f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
            f"len={self.len} type={self.type} flags={self.flags:#x}"
        )


@dataclass(frozen=True, slots=True)
class Packet:
    header: Header
    payload: bytes = b""

    def encode(self) -> bytes:
        return self.header.pack() + self.payload


def parse(data: bytes | bytearray | memoryview) -> Packet:
    """A packet from the bytes of one tx descriptor chain.

    The header's ``len`` must fit in what follows it (a chain may carry
    trailing bytes, which are ignored) and within ``MAX_PAYLOAD``.
    """
    header = Header.unpack(data)
    if header.len > MAX_PAYLOAD:
        raise PacketError(f"payload length {header.len} is above {MAX_PAYLOAD}")
    end = HEADER_SIZE + header.len
    if end > len(data):
        raise PacketError(
            f"header says {header.len} payload bytes but only {len(data) - HEADER_SIZE} follow"
        )
    return Packet(header, bytes(data[HEADER_SIZE:end]))
