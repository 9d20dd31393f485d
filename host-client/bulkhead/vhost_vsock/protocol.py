"""vhost-user messages (QEMU ``docs/interop/vhost-user.rst``): framing and payloads.

A message is a 12-byte header (``request``, ``flags``, payload ``size``, all
u32) and a payload. The spec says native byte order; we read and write little
endian, which is what the x86-64 hosts we run on use, so that the encoding does
not depend on where a test runs. File descriptors travel alongside in
``SCM_RIGHTS``. This module only encodes and decodes; ``backend.py`` decides
what each request does.
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from dataclasses import dataclass, field

_HEADER = struct.Struct("<III")
HEADER_SIZE = _HEADER.size

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# No request payload is anywhere near this; a bigger "size" means a broken
# stream, and reading it would only let the peer make us allocate.
MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_MEM_REGIONS = 8

# Virtio / vhost-user feature bits (the u64 of GET_FEATURES / SET_FEATURES).
VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# Protocol feature bits (GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES).
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9

# In the u64 payload of SET_VRING_KICK/CALL/ERR: the low byte is the queue
# index and this bit says that no descriptor came with the message.
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


class ProtocolError(Exception):
    """A message that breaks the protocol; the connection to the front-end cannot go on."""


@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def encode(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload

    def describe(self) -> str:
        return f"{request_name(self.request)} ({len(self.payload)} bytes, {len(self.fds)} fds)"


def decode_header(data: bytes) -> tuple[int, int, int]:
    """``(request, flags, size)``; raises ``ProtocolError`` for a bad version or size."""
    request, flags, size = _HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"{request_name(request)} payload of {size} bytes is too big")
    return request, flags, size


def reply(msg: Message, payload: bytes) -> Message:
    """The reply to ``msg``: same request, the REPLY flag, our version."""
    return Message(msg.request, VERSION | FLAG_REPLY, payload)


def receive(sock: socket.socket) -> Message | None:
    """Read one whole message (blocking); ``None`` when the peer has closed.

    File descriptors come with the first bytes of a message (QEMU sends each
    message with one ``sendmsg``); any that arrive later are an error. The
    caller owns the returned ``fds`` and must close them.
    """
    fds = array.array("i")
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(
            HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % fds.itemsize
                fds.frombytes(cdata[:usable])
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("more file descriptors than any request carries")
        if not data:
            _close_fds(fds)
            return None
        data += _recv_exactly(sock, HEADER_SIZE - len(data))
        request, flags, size = decode_header(data)
        payload = _recv_exactly(sock, size)
    except BaseException:
        _close_fds(fds)
        raise
    return Message(request, flags, payload, list(fds))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = sock.recv(size)
        if not chunk:
            raise ProtocolError("the front-end closed the connection inside a message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _close_fds(fds: array.array[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- payloads -----------------------------------------------------------------

_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")  # index, num
_VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
_MEM_HEADER = struct.Struct("<II")  # nregions, padding
_MEM_REGION = struct.Struct("<QQQQ")  # guest address, size, user address, mmap offset
_CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags


def _exact(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise ProtocolError(f"{what} payload of {len(payload)} bytes, need {size}")


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(payload: bytes) -> int:
    _exact(payload, _U64.size, "u64")
    return _U64.unpack_from(payload)[0]


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    def encode(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        _exact(payload, _VRING_STATE.size, "vring state")
        return cls(*_VRING_STATE.unpack_from(payload))


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def encode(self) -> bytes:
        return _VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        _exact(payload, _VRING_ADDR.size, "vring address")
        return cls(*_VRING_ADDR.unpack_from(payload))


@dataclass(frozen=True)
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    out = _MEM_HEADER.pack(len(regions), 0)
    for r in regions:
        out += _MEM_REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    return out


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    _exact(payload, _MEM_HEADER.size, "memory table")
    count, _ = _MEM_HEADER.unpack_from(payload)
    if count > MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table with {count} regions (at most {MAX_MEM_REGIONS})")
    _exact(payload, _MEM_HEADER.size + count * _MEM_REGION.size, "memory table")
    return [
        MemRegion(*_MEM_REGION.unpack_from(payload, _MEM_HEADER.size + i * _MEM_REGION.size))
        for i in range(count)
    ]


@dataclass(frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int
    data: bytes = b""

    def encode(self) -> bytes:
        return _CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> ConfigSpace:
        _exact(payload, _CONFIG_HEADER.size, "config")
        offset, size, flags = _CONFIG_HEADER.unpack_from(payload)
        return cls(offset, size, flags, payload[_CONFIG_HEADER.size :])
