"""Transports and the relay, against real unix-socket peers written here.

``GuestPeer`` plays QEMU's chardev server together with the guest agent's mux
bridge: every mux connection is bridged to a fresh connection to a target
socket (an echo server, or a gRPC server), and it checks that the host never
sends beyond its credit.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bulkhead import AgentClient, TransportError
from bulkhead.relay import UnixRelay
from bulkhead.transport import HybridVsockTransport, SerialMuxTransport
from bulkhead_proto import mux
from bulkhead_proto.mux import FrameType

# --- helpers --------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


class Server:
    """A threaded unix-socket server: ``handler(conn)`` per connection."""

    def __init__(self, path: Path, handler: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.handler = handler
        self.listener = unix_listener(path)
        self.accepted = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError:
                pass

    def close(self) -> None:
        # shutdown() wakes a blocked accept(); close() alone would not.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(f"/tmp/bh-t-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    path.mkdir(mode=0o700)
    yield path
    for p in path.iterdir():
        p.unlink()
    path.rmdir()


@pytest.fixture
def echo_server(short_tmp: Path) -> Iterator[Server]:
    srv = Server(short_tmp / "echo.sock", echo)
    yield srv
    srv.close()


# --- hybrid vsock -------------------------------------------------------------------


def test_hybrid_vsock_connects_after_ok(short_tmp: Path) -> None:
    lines: list[bytes] = []

    def vmm(conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        lines.append(line)
        # The guest's first bytes may follow the OK at once: they must not be lost.
        conn.sendall(b"OK 1073741824\nfirst bytes")
        echo(conn)

    srv = Server(short_tmp / "v.sock", vmm)
    try:
        with HybridVsockTransport(srv.path, port=1024) as transport:
            sock = transport.connect(timeout=5)
        with sock:
            assert recv_exact(sock, 11) == b"first bytes"
            sock.sendall(b"ping")
            assert recv_exact(sock, 4) == b"ping"
        assert lines == [b"CONNECT 1024\n"]
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("answer", "shown"),
    [(b"", "the connection was closed"), (b"ERR no listener on port 1024\n", "ERR no listener")],
)
def test_hybrid_vsock_refusal_is_a_clear_error(short_tmp: Path, answer: bytes, shown: str) -> None:
    def vmm(conn: socket.socket) -> None:
        conn.recv(64)
        conn.sendall(answer)

    srv = Server(short_tmp / "v.sock", vmm)
    try:
        with pytest.raises(TransportError) as caught:
            HybridVsockTransport(srv.path, port=1024).connect(timeout=5)
        message = str(caught.value)
        assert "CONNECT 1024 refused" in message
        assert shown in message
        assert str(srv.path) in message
    finally:
        srv.close()


def test_hybrid_vsock_without_an_answer_times_out(short_tmp: Path) -> None:
    answered = threading.Event()
    srv = Server(short_tmp / "v.sock", lambda conn: answered.wait(10))
    try:
        started = time.monotonic()
        with pytest.raises(TransportError, match="no answer to CONNECT 1024"):
            HybridVsockTransport(srv.path).connect(timeout=0.3)
        assert time.monotonic() - started < 5
    finally:
        answered.set()
        srv.close()


def test_hybrid_vsock_without_a_socket(short_tmp: Path) -> None:
    with pytest.raises(TransportError, match=r"missing\.sock"):
        HybridVsockTransport(short_tmp / "missing.sock").connect(timeout=1)


# --- relay --------------------------------------------------------------------------


class UnixTransport:
    """The simplest transport: a unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self, timeout: float | None = 10.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise TransportError(str(exc)) from exc
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        pass


def test_relay_client_half_closes_first(short_tmp: Path) -> None:
    def reply_after_eof(conn: socket.socket) -> None:
        got = read_to_eof(conn)
        conn.sendall(b"got " + hashlib.sha256(got).hexdigest().encode())

    upstream = Server(short_tmp / "up.sock", reply_after_eof)
    payload = os.urandom(300_000)
    try:
        with UnixRelay(UnixTransport(upstream.path), short_tmp / "relay.sock") as relay:
            assert stat.S_IMODE(os.stat(relay.path).st_mode) == 0o600
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(str(relay.path))
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
                # The reply travels back after our EOF went through.
                assert read_to_eof(c) == b"got " + hashlib.sha256(payload).hexdigest().encode()
        assert not (short_tmp / "relay.sock").exists()
    finally:
        upstream.close()


def test_relay_upstream_half_closes_first(short_tmp: Path) -> None:
    received: list[bytes] = []
    done = threading.Event()

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello, then EOF")
        conn.shutdown(socket.SHUT_WR)
        received.append(read_to_eof(conn))
        done.set()

    upstream = Server(short_tmp / "up.sock", greet_then_listen)
    try:
        with UnixRelay(UnixTransport(upstream.path), short_tmp / "relay.sock") as relay:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(str(relay.path))
                assert read_to_eof(c) == b"hello, then EOF"
                # Our direction is still open after theirs ended.
                c.sendall(b"late answer")
                c.shutdown(socket.SHUT_WR)
                assert done.wait(10)
            assert received == [b"late answer"]
    finally:
        upstream.close()


def test_relay_serves_connections_at_once_and_close_ends_them(
    short_tmp: Path, echo_server: Server
) -> None:
    relay = UnixRelay(UnixTransport(echo_server.path), short_tmp / "relay.sock").start()
    clients = []
    try:
        for i in range(5):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(relay.path))
            clients.append(c)
            c.sendall(f"client {i}".encode())
        for i, c in enumerate(clients):
            assert recv_exact(c, len(f"client {i}")) == f"client {i}".encode()
        assert relay.connections == 5
    finally:
        relay.close()
    for c in clients:
        assert read_to_eof(c, timeout=5) == b""
        c.close()
    assert not relay.path.exists()


def test_relay_closes_the_client_when_the_transport_fails(short_tmp: Path) -> None:
    transport = UnixTransport(short_tmp / "nobody.sock")
    with (
        UnixRelay(transport, short_tmp / "relay.sock") as relay,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c,
    ):
        c.connect(str(relay.path))
        assert read_to_eof(c, timeout=5) == b""


# --- virtio-serial mux ----------------------------------------------------------------


@dataclass(eq=False)
class PeerConn:
    sock: socket.socket
    credit: mux.Credit = field(default_factory=mux.Credit)
    window: mux.ReceiveWindow = field(default_factory=mux.ReceiveWindow)
    to_target: bytearray = field(default_factory=bytearray)
    received: int = 0  # DATA bytes from the host
    returned: int = 0  # credit given back to the host


class GuestPeer:
    """QEMU's chardev server plus a guest agent's mux bridge to ``target``."""

    def __init__(self, path: Path, target: Path, *, answer_after: int = 1) -> None:
        self.path = path
        self.target = target
        self.answer_after = answer_after
        self.session = mux.new_session()
        self.cond = threading.Condition()
        self.hellos: list[int] = []  # the host session of every HELLO received
        self.chardev_connections = 0
        self.live_conns = 0
        self.opened = 0
        self.violations: list[str] = []
        self.max_outstanding = 0
        self._chan: socket.socket | None = None
        self._restart = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.listener = unix_listener(path)
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def drop(self) -> None:
        """Hang up the chardev connection, as QEMU does when it exits."""
        with self.cond:
            if self._chan is not None:
                self._chan.shutdown(socket.SHUT_RDWR)

    def restart_agent(self) -> None:
        """Drop every connection and say HELLO with a new guest session."""
        with self.cond:
            self._restart = True
        self._wake_w.send(b"r")

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.drop()
        self.thread.join(5)

    def _accept_loop(self) -> None:
        while True:
            try:
                chan, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                self._chan = chan
                self.chardev_connections += 1
                self.cond.notify_all()
            try:
                self._serve(chan)
            except OSError:
                pass
            finally:
                with self.cond:
                    self._chan = None
                    chan.close()
                    self.cond.notify_all()

    def _serve(self, chan: socket.socket) -> None:
        chan.setblocking(False)
        parser = mux.Parser()
        out = bytearray()
        conns: dict[int, PeerConn] = {}
        hellos_here = 0

        def end(conn_id: int) -> None:
            conns.pop(conn_id).sock.close()
            with self.cond:
                self.live_conns -= 1
                self.cond.notify_all()

        try:
            while True:
                with self.cond:
                    restart, self._restart = self._restart, False
                if restart:
                    for conn_id in list(conns):
                        end(conn_id)
                    self.session = mux.new_session()
                    out += mux.hello(self.session)
                readers = [chan, self._wake_r]
                readers += [c.sock for c in conns.values() if c.credit.available > 0]
                writers = [chan] if out else []
                writers += [c.sock for c in conns.values() if c.to_target]
                readable, writable, _ = select.select(readers, writers, [], 5)
                if self._wake_r in readable:
                    self._wake_r.recv(64)
                if chan in writable:
                    del out[: chan.send(out)]
                for conn_id, c in list(conns.items()):
                    if c.sock in writable:
                        sent = c.sock.send(c.to_target)
                        del c.to_target[:sent]
                        if grant := c.window.consume(sent):
                            c.returned += grant
                            out += mux.credit(conn_id, grant)
                    if c.sock in readable:
                        data = c.sock.recv(min(c.credit.available, 65536))
                        if not data:
                            out += mux.encode(FrameType.CLOSE, conn_id)
                            end(conn_id)
                            continue
                        c.credit.take(len(data))
                        out += b"".join(mux.encode_data(conn_id, data))
                if chan not in readable:
                    continue
                data = chan.recv(262144)
                if not data:
                    return
                for frame in parser.feed(data):
                    if frame.type == FrameType.HELLO:
                        hellos_here += 1
                        with self.cond:
                            self.hellos.append(mux.hello_session(frame))
                            self.cond.notify_all()
                        if hellos_here >= self.answer_after:
                            out += mux.hello(self.session)
                    elif frame.type == FrameType.OPEN:
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        sock.connect(str(self.target))
                        sock.setblocking(False)
                        conns[frame.conn] = PeerConn(sock)
                        with self.cond:
                            self.opened += 1
                            self.live_conns += 1
                            self.cond.notify_all()
                    elif frame.conn not in conns:
                        continue
                    elif frame.type == FrameType.DATA:
                        c = conns[frame.conn]
                        c.received += len(frame.payload)
                        outstanding = c.received - c.returned
                        with self.cond:
                            self.max_outstanding = max(self.max_outstanding, outstanding)
                            if outstanding > mux.WINDOW:
                                self.violations.append(f"conn {frame.conn}: {outstanding} > window")
                            self.cond.notify_all()
                        c.to_target += frame.payload
                    elif frame.type == FrameType.CREDIT:
                        conns[frame.conn].credit.grant(mux.credit_amount(frame))
                    elif frame.type == FrameType.CLOSE:
                        end(frame.conn)
        finally:
            for conn_id in list(conns):
                end(conn_id)


@pytest.fixture
def peer(short_tmp: Path, echo_server: Server) -> Iterator[GuestPeer]:
    p = GuestPeer(short_tmp / "serial.sock", echo_server.path)
    yield p
    p.close()


@pytest.fixture
def transport(peer: GuestPeer) -> Iterator[SerialMuxTransport]:
    with SerialMuxTransport(peer.path, hello_interval=0.05) as t:
        yield t


def roundtrip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data)) == data


def test_mux_connections_are_independent_echo_channels(
    peer: GuestPeer, transport: SerialMuxTransport
) -> None:
    socks = [transport.connect(timeout=10) for _ in range(4)]
    try:
        for i, s in enumerate(socks):
            s.sendall(f"conn {i} says hi".encode())
        for i, s in enumerate(socks):
            assert recv_exact(s, len(f"conn {i} says hi")) == f"conn {i} says hi".encode()
        assert peer.opened == 4
    finally:
        for s in socks:
            s.close()
    # A local close reaches the guest as CLOSE.
    peer.wait_until(lambda: peer.live_conns == 0, "the guest to see every CLOSE")


def test_mux_moves_2_mib_within_credit(peer: GuestPeer, transport: SerialMuxTransport) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    sock = transport.connect(timeout=10)
    writer = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    writer.start()
    try:
        echoed = recv_exact(sock, len(payload), timeout=60)
    finally:
        sock.close()
        writer.join(10)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert peer.violations == []
    # The host really was held back by credit: more than a window went through.
    assert 0 < peer.max_outstanding <= mux.WINDOW


def test_a_stalled_connection_does_not_block_the_others(
    peer: GuestPeer, transport: SerialMuxTransport
) -> None:
    stalled = transport.connect(timeout=10)
    # Far more than all the socket buffers on the way hold: with nobody reading
    # the echo, the guest stops returning credit and the host has to stop.
    payload = os.urandom(8 * 1024 * 1024)
    writer = threading.Thread(target=stalled.sendall, args=(payload,), daemon=True)
    writer.start()
    peer.wait_until(lambda: peer.max_outstanding == mux.WINDOW, "the whole window to be in use")
    with transport.connect(timeout=10) as other:
        roundtrip(other, b"still flowing")
    echoed = recv_exact(stalled, len(payload), timeout=60)
    writer.join(10)
    stalled.close()
    assert echoed == payload
    assert peer.violations == []


def test_hello_is_repeated_until_the_guest_answers(short_tmp: Path, echo_server: Server) -> None:
    # The agent is "still booting": it ignores the first two HELLOs.
    peer = GuestPeer(short_tmp / "serial.sock", echo_server.path, answer_after=3)
    try:
        with SerialMuxTransport(peer.path, hello_interval=0.05) as transport:
            sock = transport.connect(timeout=10)
            with sock:
                roundtrip(sock, b"after three hellos")
            assert len(peer.hellos) >= 3
            assert len(set(peer.hellos)) == 1  # all from one host session
    finally:
        peer.close()


def test_connect_gives_up_when_the_guest_never_answers(
    short_tmp: Path, echo_server: Server
) -> None:
    peer = GuestPeer(short_tmp / "serial.sock", echo_server.path, answer_after=10**9)
    try:
        with SerialMuxTransport(peer.path, hello_interval=0.05) as transport:
            started = time.monotonic()
            with pytest.raises(TransportError) as caught:
                transport.connect(timeout=0.5)
            assert time.monotonic() - started < 5
            assert str(peer.path) in str(caught.value)
            assert "HELLO" in str(caught.value)
            assert peer.opened == 0
    finally:
        peer.close()


def test_chardev_drop_closes_connections_and_a_new_session_starts(
    peer: GuestPeer, transport: SerialMuxTransport
) -> None:
    old = transport.connect(timeout=10)
    roundtrip(old, b"before")
    first_session = peer.hellos[0]

    peer.drop()
    assert read_to_eof(old, timeout=10) == b""  # the connection ended with the chardev
    old.close()
    peer.wait_until(lambda: peer.chardev_connections == 2, "the transport to reconnect")
    peer.wait_until(
        lambda: any(h != first_session for h in peer.hellos), "a HELLO of a new host session"
    )
    with transport.connect(timeout=10) as new:
        roundtrip(new, b"after")


def test_a_restarted_guest_agent_ends_the_old_connections(
    peer: GuestPeer, transport: SerialMuxTransport
) -> None:
    old = transport.connect(timeout=10)
    roundtrip(old, b"old agent")
    hellos_before = len(peer.hellos)

    peer.restart_agent()
    assert read_to_eof(old, timeout=10) == b""
    old.close()
    # The host says HELLO again so the new agent knows its session; same session number.
    peer.wait_until(lambda: len(peer.hellos) > hellos_before, "the host to say HELLO again")
    assert set(peer.hellos) == {peer.hellos[0]}
    assert peer.chardev_connections == 1
    with transport.connect(timeout=10) as new:
        roundtrip(new, b"new agent")


def test_mux_waits_for_a_chardev_that_appears_later(short_tmp: Path, echo_server: Server) -> None:
    path = short_tmp / "serial.sock"
    with SerialMuxTransport(path, hello_interval=0.05, reconnect_interval=0.02) as transport:
        with pytest.raises(TransportError, match="No such file"):
            transport.connect(timeout=0.2)
        peer = GuestPeer(path, echo_server.path)  # QEMU has started now
        try:
            with transport.connect(timeout=10) as sock:
                roundtrip(sock, b"late but fine")
        finally:
            peer.close()


def test_a_closed_transport_refuses_to_connect(peer: GuestPeer) -> None:
    transport = SerialMuxTransport(peer.path)
    transport.close()
    with pytest.raises(TransportError, match="closed"):
        transport.connect(timeout=1)


def test_grpc_through_relay_and_mux(short_tmp: Path) -> None:
    """The whole host path: AgentClient -> agent.sock relay -> mux -> guest bridge -> gRPC."""
    grpc_path = short_tmp / "grpc.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"unix:{grpc_path}")
    server.start()
    peer = GuestPeer(short_tmp / "serial.sock", grpc_path)
    try:
        with (
            SerialMuxTransport(peer.path, hello_interval=0.05) as transport,
            UnixRelay(transport, short_tmp / "agent.sock") as relay,
        ):
            clients = [AgentClient(relay.path, timeout=10) for _ in range(2)]
            for c in clients:
                c.wait_ready(timeout=20)
                assert c.health() == "SERVING"
            for c in clients:
                c.close()
        assert peer.opened >= 2  # one mux connection per client
        assert peer.violations == []
    finally:
        peer.close()
        server.stop(0)
