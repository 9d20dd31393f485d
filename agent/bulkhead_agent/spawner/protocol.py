"""Messages between the agent and the spawner, and between the spawner and its children.

One message is one datagram on an ``AF_UNIX``/``SOCK_SEQPACKET`` socket: compact JSON, with
file descriptors (stdio pipes, a pty) attached as ``SCM_RIGHTS``. Datagrams keep message
boundaries and never arrive in pieces, so no framing is needed. A message too big for one
datagram (a spec with a large seccomp profile) travels in a memfd whose fd is attached
instead.

Requests (agent -> spawner) carry ``op`` and ``id``; each gets one reply with the same ``id``
and ``ok`` (true, or false with ``error: {step, errno, message}``). Events carry ``event``.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

# Datagrams above this go through a memfd. Well below the default socket buffer (~208 KiB),
# so an inline send never waits for room it cannot get.
INLINE_MAX = 64 * 1024
MAX_FDS = 8
_PAYLOAD = "$payload"  # {"$payload": i}: the real message is in attached fd i
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ProtocolError(Exception):
    pass


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair; both ends close-on-exec, as Python makes all its fds."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message; raises BlockingIOError on a non-blocking socket that is full."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) <= INLINE_MAX:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
        return
    memfd = os.memfd_create("bulkhead-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view) :]
        header = json.dumps({_PAYLOAD: len(fds)}).encode()
        socket.send_fds(sock, [header], [*fds, memfd])
    finally:
        os.close(memfd)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Receive one message and its fds (close-on-exec); None at end of stream.

    Raises BlockingIOError on a non-blocking socket with nothing queued.
    """
    # Not socket.recv_fds: in 3.11 it drops its flags argument, and the fds must arrive
    # close-on-exec, or a fork elsewhere in the spawner would leak them into a container.
    data, ancillary, flags, _addr = sock.recvmsg(
        INLINE_MAX + 1, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC
    )
    received = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
    fds = received.tolist()
    if not data and not fds:
        return None  # a zero-length datagram is end of stream: we never send empty ones
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError(f"message truncated ({len(data)} bytes, {len(fds)} fds)")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ProtocolError("message is not a JSON object")
        if _PAYLOAD in message:
            memfd = fds.pop(message[_PAYLOAD])
            try:
                message = json.loads(_read_all(memfd))
            finally:
                os.close(memfd)
    except (ValueError, IndexError, TypeError) as exc:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"bad message: {exc}") from None
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def _read_all(fd: int) -> bytes:
    # The sender's writes moved the shared file offset to the end: start from 0.
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class Channel:
    """A spawner child's end of its private socketpair (see ``oci.setup.Channel``)."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        send(self.sock, message, fds or ())

    def recv(self) -> dict[str, Any] | None:
        got = recv(self.sock)
        if got is None:
            return None
        message, fds = got
        for fd in fds:
            os.close(fd)
        return message

    def fileno(self) -> int:
        return self.sock.fileno()
