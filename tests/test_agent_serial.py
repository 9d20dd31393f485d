"""The serial bridge: the test plays the host on the unix socket the agent uses as its port."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_agent_support import Agent, HostMux, health_status, short_tmpdir, start_agent, wait_for

from bulkhead_proto import mux
from bulkhead_proto.mux import FrameType
from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
# What an HTTP/2 client says first: the preface, then its (empty) SETTINGS.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
H2_SETTINGS, H2_PING = 0x4, 0x6


def h2_ping(opaque: bytes) -> bytes:
    return struct.pack(">I", 8)[1:] + bytes([H2_PING, 0]) + b"\0\0\0\0" + opaque


def h2_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(type, flags, payload)`` of the whole HTTP/2 frames in ``data``."""
    out, pos = [], 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if len(data) - pos - 9 < length:
            break
        out.append((data[pos + 3], data[pos + 4], data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


@pytest.fixture
def rig() -> Iterator[tuple[Agent, HostMux, Path]]:
    with short_tmpdir() as tmp:
        host = HostMux(tmp / "serial.sock")
        agent = start_agent(tmp, serial_device=str(tmp / "serial.sock"), tcp=False)
        try:
            host.accept()
            yield agent, host, tmp
        finally:
            code = agent.stop()
            host.close()
        assert code == 0, agent.log()


def test_hello_both_ways(rig) -> None:
    _agent, host, _ = rig
    # The agent announces its session as soon as it opens the port...
    (guest,) = host.wait_hellos(1)
    # ...and answers every HELLO of ours with that same session.
    host.hello()
    host.hello()
    assert host.wait_hellos(3) == [guest] * 3
    assert not host.violations


def test_two_raw_connections_reach_the_grpc_server(rig) -> None:
    _agent, host, _ = rig
    host.hello()
    host.wait_hellos(2)
    for conn in (1, 2):
        host.open_raw(conn)
        host.send(b"".join(mux.encode_data(conn, H2_PREFACE)))
    for conn in (1, 2):
        frames = wait_for(
            lambda conn=conn: h2_frames(host.received(conn)), 10, f"HTTP/2 frames on conn {conn}"
        )
        assert frames[0][0] == H2_SETTINGS  # the server's own SETTINGS come first

    # Closing one leaves the other working.
    host.send(mux.encode(FrameType.CLOSE, 1))
    host.send(b"".join(mux.encode_data(2, h2_ping(b"pingpong"))))

    def pong() -> bool:
        return any(t == H2_PING and f & 1 and p == b"pingpong" for t, f, p in rec(2))

    def rec(conn: int) -> list[tuple[int, int, bytes]]:
        return h2_frames(host.received(conn))

    wait_for(pong, 10, "a PING ACK on conn 2")

    # DATA for a connection the guest does not know is answered with CLOSE.
    host.send(b"".join(mux.encode_data(77, b"hello?")))
    wait_for(lambda: host.frames_of(FrameType.CLOSE, 77), 10, "CLOSE for conn 77")
    assert not host.violations


def test_grpc_through_the_mux_with_credit_both_ways(rig) -> None:
    _agent, host, tmp = rig
    host.hello()
    host.wait_hellos(2)
    target = host.serve_clients(tmp / "host.sock")
    assert health_status(target, "bulkhead.v1.Agent", timeout=10) == SERVING

    with grpc.insecure_channel(target) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        details = stub.GetGuestDetails(agent_pb2.GetGuestDetailsRequest(), timeout=10)
        assert "serial" in details.features
        # Host → guest: 1 MiB is four windows; it only gets through if the
        # guest gives credit back as it delivers to the gRPC socket.
        stub.AddEntropy(agent_pb2.AddEntropyRequest(data=os.urandom(1 << 20)), timeout=20)

    # Guest → host: credit only when the guest has used its whole window, so
    # the guest must stop at exactly WINDOW and resume when credit comes.
    host.stingy = True
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        n = 400  # ~1.3 KB each: about two windows of replies on one connection
        requests = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="bulkhead.v1.Agent")
        ] * n
        replies = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    assert len(replies) == n
    assert all(r.file_descriptor_response.file_descriptor_proto for r in replies)
    assert host.peak_unacked == mux.WINDOW, f"the guest peaked at {host.peak_unacked} bytes"
    assert not host.violations, host.violations


def test_host_reconnects_with_a_new_session(rig) -> None:
    agent, host, tmp = rig
    (first,) = host.wait_hellos(1)
    host.hello()
    host.wait_hellos(2)
    host.open_raw(5)
    host.send(b"".join(mux.encode_data(5, H2_PREFACE)))
    wait_for(lambda: h2_frames(host.received(5)), 10, "the server's SETTINGS on conn 5")

    host.disconnect()
    host.accept()  # the agent comes back to the port at once
    hellos = host.wait_hellos(3)
    assert hellos[2] != first  # reopening the port is a new guest session
    host.hello(mux.new_session())
    host.wait_hellos(4)
    # conn 5 belonged to the old session: gone.
    host.send(b"".join(mux.encode_data(5, b"stale")))
    wait_for(lambda: host.frames_of(FrameType.CLOSE, 5), 10, "CLOSE for the old conn 5")
    target = host.serve_clients(tmp / "host.sock")
    assert health_status(target, timeout=10) == SERVING
    assert "host went away" in agent.log()


def test_new_host_session_drops_connections_but_a_repeat_does_not(rig) -> None:
    _agent, host, _ = rig
    host.hello()
    host.wait_hellos(2)
    host.open_raw(1)
    host.send(b"".join(mux.encode_data(1, H2_PREFACE)))
    wait_for(lambda: h2_frames(host.received(1)), 10, "SETTINGS on conn 1")

    host.hello()  # the same session again: conn 1 lives on
    host.wait_hellos(3)
    host.send(b"".join(mux.encode_data(1, h2_ping(b"still-up"))))
    wait_for(
        lambda: any(p == b"still-up" for t, _, p in h2_frames(host.received(1)) if t == H2_PING),
        10,
        "a PING ACK after a repeated HELLO",
    )
    assert not host.frames_of(FrameType.CLOSE, 1)

    host.hello(mux.new_session())  # a restarted host: conn 1 is dropped
    host.wait_hellos(4)
    host.send(b"".join(mux.encode_data(1, b"x")))
    wait_for(lambda: host.frames_of(FrameType.CLOSE, 1), 10, "CLOSE for conn 1")


def test_garbage_then_hello_starts_over(rig) -> None:
    agent, host, tmp = rig
    host.hello()
    host.wait_hellos(2)
    host.send(b"\xb7\x09" + b"\0" * 30)  # bad frame type: the stream is lost
    host.send(b"more junk")
    # The guest starts a new session, so that the host drops its connections and
    # says HELLO again: that HELLO is where the guest picks the stream up.
    hellos = host.wait_hellos(3)
    assert hellos[2] != hellos[0]
    host.hello(mux.new_session())
    assert host.wait_hellos(4)[3] == hellos[2]
    target = host.serve_clients(tmp / "host.sock")
    assert health_status(target, timeout=10) == SERVING
    assert "bad mux stream" in agent.log()


def test_no_busy_loop_while_the_host_is_away() -> None:
    psutil = pytest.importorskip("psutil")
    with short_tmpdir() as tmp:
        # Nothing listens at the port path: the agent retries on its back-off.
        agent = start_agent(tmp, serial_device=str(tmp / "serial.sock"), tcp=False)
        try:
            proc = psutil.Process(agent.proc.pid)
            before = proc.cpu_times()
            time.sleep(1.0)
            after = proc.cpu_times()
            busy = (after.user - before.user) + (after.system - before.system)
            assert busy < 0.05, f"agent used {busy:.3f}s CPU in 1s waiting for the host"
            # And a host that turns up is served within the back-off cap.
            host = HostMux(tmp / "serial.sock")
            try:
                host.accept(timeout=5)
                host.wait_hellos(1, timeout=5)
            finally:
                host.close()
        finally:
            assert agent.stop() == 0
