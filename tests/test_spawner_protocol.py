"""Agent <-> spawner messages: JSON datagrams with fds attached, big ones through a memfd."""

from __future__ import annotations

import os
import socket

import pytest

from bulkhead_agent.spawner import protocol


def test_message_with_fds_round_trips() -> None:
    a, b = protocol.socketpair()
    read, write = os.pipe()
    try:
        protocol.send(a, {"op": "create", "id": 1, "args": ["sh", "-c", "écho"]}, [read, write])
        message, fds = protocol.recv(b)  # type: ignore[misc]
        assert message == {"op": "create", "id": 1, "args": ["sh", "-c", "écho"]}
        assert len(fds) == 2
        # Received fds are close-on-exec and are working copies of the pipe.
        assert not os.get_inheritable(fds[0]) and not os.get_inheritable(fds[1])
        os.write(fds[1], b"through")
        assert os.read(read, 7) == b"through"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (read, write):
            os.close(fd)
        a.close()
        b.close()


def test_large_message_goes_through_a_memfd() -> None:
    a, b = protocol.socketpair()
    read, write = os.pipe()
    try:
        big = {"spec": {"syscalls": ["x" * 100] * 5000}}  # ~500 KiB: more than one datagram
        protocol.send(a, big, [write])
        message, fds = protocol.recv(b)  # type: ignore[misc]
        assert message == big
        assert len(fds) == 1  # the memfd is consumed, the caller's fd is kept
        os.close(fds[0])
    finally:
        os.close(read)
        os.close(write)
        a.close()
        b.close()


def test_end_of_stream_is_none() -> None:
    a, b = protocol.socketpair()
    a.close()
    assert protocol.recv(b) is None
    b.close()


def test_non_blocking_receive_raises_when_empty() -> None:
    a, b = protocol.socketpair()
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        protocol.recv(b)
    a.close()
    b.close()


def test_garbage_is_a_protocol_error() -> None:
    a, b = protocol.socketpair()
    a.send(b"not json")
    with pytest.raises(protocol.ProtocolError):
        protocol.recv(b)
    a.send(b"[1, 2]")
    with pytest.raises(protocol.ProtocolError):
        protocol.recv(b)
    a.close()
    b.close()


def test_message_boundaries_are_kept() -> None:
    a, b = protocol.socketpair()
    for i in range(50):
        protocol.send(a, {"n": i})
    assert [protocol.recv(b)[0]["n"] for _ in range(50)] == list(range(50))  # type: ignore[index]
    assert b.type == socket.SOCK_SEQPACKET
    a.close()
    b.close()
