"""Transports: each opens a fresh byte-stream connection to the guest agent.

A transport knows how to reach the agent's bridge through one kind of channel;
it does not know gRPC. ``connect()`` returns a plain connected, blocking
``socket.socket``; closing it ends that connection only.

- ``VsockTransport``: AF_VSOCK (QEMU with ``vhost-vsock-pci``).
- ``HybridVsockTransport``: a unix socket plus the ``CONNECT <port>`` line that
  Firecracker and Cloud Hypervisor use to expose guest vsock ports.
- ``SerialMuxTransport``: QEMU's virtio-serial chardev socket carrying
  ``bulkhead_proto.mux``; many connections share the one serial stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from bulkhead_proto import mux
from bulkhead_proto.mux import FrameType

from .errors import TransportError

log = logging.getLogger(__name__)

DEFAULT_VSOCK_PORT = 1024


@runtime_checkable
class Transport(Protocol):
    """What the relay and the client need from a transport."""

    def connect(self, timeout: float | None = 10.0) -> socket.socket:
        """Open a new connection to the agent; raises ``TransportError``."""
        ...

    def close(self) -> None:
        """Release whatever the transport holds (connections already returned stay open)."""
        ...


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class VsockTransport:
    """AF_VSOCK to guest ``cid``, ``port`` (the agent listens on 1024 by default)."""

    def __init__(self, cid: int, port: int = DEFAULT_VSOCK_PORT) -> None:
        self.cid = cid
        self.port = port

    def __repr__(self) -> str:
        return f"VsockTransport(cid={self.cid}, port={self.port})"

    def connect(self, timeout: float | None = 10.0) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((self.cid, self.port))
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise TransportError(f"vsock {self.cid}:{self.port}: {exc}") from exc
        return sock

    def close(self) -> None:
        pass

    def __enter__(self) -> VsockTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HybridVsockTransport:
    """A guest vsock port exposed as a host unix socket (Firecracker, Cloud Hypervisor).

    The host writes ``CONNECT <port>\\n``; the VMM answers ``OK <host port>\\n``
    and from then on the socket carries the guest connection's bytes. Any other
    answer (or none) means the guest is not listening on that port.
    """

    MAX_REPLY = 64

    def __init__(self, uds_path: str | os.PathLike[str], port: int = DEFAULT_VSOCK_PORT) -> None:
        self.uds_path = Path(uds_path)
        self.port = port

    def __repr__(self) -> str:
        return f"HybridVsockTransport({str(self.uds_path)!r}, port={self.port})"

    def connect(self, timeout: float | None = 10.0) -> socket.socket:
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.uds_path))
            sock.sendall(f"CONNECT {self.port}\n".encode())
            reply = self._read_line(sock, deadline)
        except TimeoutError as exc:
            sock.close()
            raise TransportError(
                f"{self.uds_path}: no answer to CONNECT {self.port} within {timeout}s"
            ) from exc
        except OSError as exc:
            sock.close()
            raise TransportError(f"{self.uds_path}: {exc}") from exc
        words = reply.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            sock.close()
            answer = repr(reply.decode(errors="replace")) if reply else "the connection was closed"
            raise TransportError(
                f"{self.uds_path}: CONNECT {self.port} refused ({answer}); "
                f"is the guest agent listening on vsock port {self.port}?"
            )
        sock.settimeout(None)
        return sock

    def _read_line(self, sock: socket.socket, deadline: float | None) -> bytes:
        # One byte at a time: whatever follows the newline already belongs to
        # the guest connection and must stay in the socket for the caller.
        line = bytearray()
        while len(line) < self.MAX_REPLY:
            sock.settimeout(_remaining(deadline))
            byte = sock.recv(1)
            if not byte:
                break
            if byte == b"\n":
                return bytes(line)
            line += byte
        return bytes(line)

    def close(self) -> None:
        pass

    def __enter__(self) -> HybridVsockTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- virtio-serial mux --------------------------------------------------------

# Stop reading local sockets while this much is queued for the chardev: the
# serial stream is the bottleneck and nothing is gained by buffering more.
_HIGH_WATER = 1 << 20
_READ_CHUNK = 256 * 1024


@dataclass(eq=False)
class _Conn:
    id: int
    sock: socket.socket  # our end of the socketpair
    credit: mux.Credit = field(default_factory=mux.Credit)  # what the guest can still take
    window: mux.ReceiveWindow = field(default_factory=mux.ReceiveWindow)
    pending: bytearray = field(default_factory=bytearray)  # guest bytes not yet delivered
    peer_closed: bool = False


class SerialMuxTransport:
    """Connections multiplexed over QEMU's virtio-serial chardev unix socket.

    One background thread owns the chardev connection. It says HELLO when it
    connects and repeats it every ``hello_interval`` seconds until the guest
    agent answers (the agent may still be booting). Each ``connect()`` opens a
    numbered mux connection and hands back one end of a socketpair whose other
    end the thread pumps through DATA frames, within the peer's credit.

    If the chardev connection drops (or the stream turns to garbage), every mux
    connection is closed and the thread reconnects with a new session; if the
    guest agent restarts (a HELLO with a new guest session), the connections of
    the old agent are closed. The mux has no half-close: EOF on a local socket
    closes that connection both ways.
    """

    def __init__(
        self,
        chardev_path: str | os.PathLike[str],
        *,
        hello_interval: float = 1.0,
        reconnect_interval: float = 0.1,
    ) -> None:
        self.chardev_path = Path(chardev_path)
        self.hello_interval = hello_interval
        self.reconnect_interval = reconnect_interval
        # Shared with callers of connect(), under _lock.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ready = False
        self._closed = False
        self._generation = 0  # bumped on each chardev (re)connection
        self._next_id = 1
        self._ids: set[int] = set()
        self._commands: deque[tuple[int, int, socket.socket]] = deque()
        self._last_error = "not connected yet"
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Owned by the thread.
        self._sel = selectors.DefaultSelector()
        self._chardev: socket.socket | None = None
        self._parser = mux.Parser()
        self._out = bytearray()
        self._session = 0
        self._guest_session: int | None = None
        self._conns: dict[int, _Conn] = {}
        self._masks: dict[socket.socket, int] = {}
        self._thread = threading.Thread(
            target=self._run, name=f"mux {self.chardev_path.name}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"SerialMuxTransport({str(self.chardev_path)!r})"

    def __enter__(self) -> SerialMuxTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        """Whether the guest agent has answered HELLO on the current chardev connection."""
        with self._lock:
            return self._ready

    def connect(self, timeout: float | None = 10.0) -> socket.socket:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise TransportError(f"{self!r} is closed")
                if self._ready:
                    break
                remaining = _remaining(deadline)
                if remaining == 0:
                    raise TransportError(
                        f"no answer from the guest agent on {self.chardev_path} "
                        f"within {timeout}s (last: {self._last_error})"
                    )
                self._changed.wait(remaining)
            conn_id = self._allocate_id()
            ours, theirs = socket.socketpair()
            self._commands.append((self._generation, conn_id, theirs))
        self._wake()
        return ours

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._wake()
        self._thread.join(10)
        self._wake_r.close()
        self._wake_w.close()

    # -- caller side helpers (under _lock) --

    def _allocate_id(self) -> int:
        while True:
            conn_id = self._next_id
            self._next_id = self._next_id % 0xFFFFFFFF + 1  # 1..2**32-1, never 0
            if conn_id not in self._ids:
                self._ids.add(conn_id)
                return conn_id

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- the thread --

    def _run(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        backoff = self.reconnect_interval
        next_try = 0.0
        next_hello = 0.0
        try:
            while not self._is_closed():
                now = time.monotonic()
                if self._chardev is None and now >= next_try:
                    if self._open_chardev():
                        backoff = self.reconnect_interval
                        next_hello = now  # say HELLO right away
                    else:
                        next_try = now + backoff
                        backoff = min(backoff * 2, 1.0)
                if self._chardev is not None and not self._ready and now >= next_hello:
                    self._out += mux.hello(self._session)
                    next_hello = now + self.hello_interval
                self._take_commands()
                self._update_interest()
                if self._chardev is None:
                    timeout = max(0.0, next_try - now)
                elif not self._ready:
                    timeout = max(0.0, next_hello - now)
                else:
                    timeout = None
                for key, events in self._sel.select(timeout):
                    self._dispatch(key, events)
        except Exception:
            log.exception("mux thread for %s failed", self.chardev_path)
            with self._lock:
                self._last_error = "the mux thread failed (see the log)"
                self._closed = True
                self._changed.notify_all()
        finally:
            self._drop_chardev("transport closed")
            self._sel.close()

    def _is_closed(self) -> bool:
        with self._lock:
            return self._closed

    def _open_chardev(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)
            sock.connect(str(self.chardev_path))
        except OSError as exc:
            sock.close()
            with self._lock:
                self._last_error = f"cannot connect to {self.chardev_path}: {exc.strerror or exc}"
            return False
        sock.setblocking(False)
        self._chardev = sock
        self._parser.reset()
        self._out.clear()
        self._session = mux.new_session()
        self._guest_session = None
        with self._lock:
            self._last_error = "connected, waiting for the guest agent's HELLO"
        log.info("connected to %s (session %08x)", self.chardev_path, self._session)
        return True

    def _drop_chardev(self, reason: str) -> None:
        """Forget the chardev connection and everything that went through it."""
        if self._chardev is not None:
            log.info("chardev connection to %s dropped: %s", self.chardev_path, reason)
            self._unwatch(self._chardev)
            self._chardev.close()
            self._chardev = None
        self._close_all_conns()
        self._out.clear()
        with self._lock:
            self._ready = False
            self._generation += 1
            self._last_error = reason
            # Connections asked for but not yet opened can never be: end them.
            while self._commands:
                self._commands.popleft()[2].close()
            self._changed.notify_all()

    def _close_all_conns(self) -> None:
        for conn in list(self._conns.values()):
            self._finish(conn)

    def _take_commands(self) -> None:
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
            generation, ready = self._generation, self._ready
        for gen, conn_id, sock in commands:
            if gen != generation or not ready:
                sock.close()
                self._forget_id(conn_id)
                continue
            sock.setblocking(False)
            self._conns[conn_id] = _Conn(conn_id, sock)
            self._out += mux.encode(FrameType.OPEN, conn_id)

    def _forget_id(self, conn_id: int) -> None:
        with self._lock:
            self._ids.discard(conn_id)

    # -- selector bookkeeping --

    def _watch(self, sock: socket.socket, mask: int, conn: _Conn | None = None) -> None:
        old = self._masks.get(sock, 0)
        if mask == old:
            return
        if mask == 0:
            self._unwatch(sock)
        elif old == 0:
            self._sel.register(sock, mask, conn)
            self._masks[sock] = mask
        else:
            self._sel.modify(sock, mask, conn)
            self._masks[sock] = mask

    def _unwatch(self, sock: socket.socket) -> None:
        if self._masks.pop(sock, 0):
            self._sel.unregister(sock)

    def _update_interest(self) -> None:
        if self._chardev is None:
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        self._watch(self._chardev, mask)
        room = len(self._out) < _HIGH_WATER
        for conn in self._conns.values():
            mask = 0
            if room and conn.credit.available > 0 and not conn.peer_closed:
                mask |= selectors.EVENT_READ
            if conn.pending:
                mask |= selectors.EVENT_WRITE
            self._watch(conn.sock, mask, conn)

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        sock = key.fileobj
        if sock is self._wake_r:
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
            return
        if sock is self._chardev:
            if events & selectors.EVENT_WRITE:
                self._send_chardev()
            if events & selectors.EVENT_READ and self._chardev is not None:
                self._read_chardev()
            return
        conn: _Conn | None = key.data
        if conn is None or self._conns.get(conn.id) is not conn:
            return  # closed earlier in this round (the chardev, or this connection)
        if events & selectors.EVENT_WRITE:
            self._deliver(conn)
        if events & selectors.EVENT_READ and conn.id in self._conns:
            self._read_local(conn)

    # -- chardev side --

    def _send_chardev(self) -> None:
        assert self._chardev is not None
        try:
            sent = self._chardev.send(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_chardev(f"write to {self.chardev_path} failed: {exc}")
            return
        del self._out[:sent]

    def _read_chardev(self) -> None:
        assert self._chardev is not None
        try:
            data = self._chardev.recv(_READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_chardev(f"read from {self.chardev_path} failed: {exc}")
            return
        if not data:
            self._drop_chardev("QEMU closed the chardev connection")
            return
        try:
            frames = self._parser.feed(data)
        except mux.MuxError as exc:
            # No way to find the next frame boundary: start a new session.
            self._drop_chardev(f"bad frame from the guest: {exc}")
            return
        for frame in frames:
            try:
                self._on_frame(frame)
            except mux.MuxError as exc:
                self._drop_chardev(f"bad frame from the guest: {exc}")
                return

    def _on_frame(self, frame: mux.Frame) -> None:
        if frame.type == FrameType.HELLO:
            self._on_hello(mux.hello_session(frame))
            return
        conn = self._conns.get(frame.conn)
        if conn is None:
            return  # from an old session or already closed: ignored, as the protocol says
        if frame.type == FrameType.DATA:
            conn.pending += frame.payload
            self._deliver(conn)
        elif frame.type == FrameType.CREDIT:
            conn.credit.grant(mux.credit_amount(frame))
        elif frame.type == FrameType.CLOSE:
            conn.peer_closed = True
            if not conn.pending:
                self._finish(conn)
        else:
            log.warning("ignoring unexpected %s frame for conn %d", frame.type.name, frame.conn)

    def _on_hello(self, guest_session: int) -> None:
        if guest_session == self._guest_session:
            return  # an answer to one of our repeated HELLOs: nothing changes
        if self._guest_session is not None:
            log.info(
                "guest agent restarted (session %08x -> %08x): closing %d connections",
                self._guest_session,
                guest_session,
                len(self._conns),
            )
            self._close_all_conns()
        self._guest_session = guest_session
        # This agent incarnation may not have seen our HELLO (a previous one
        # could have consumed it): say it again so it knows our session.
        self._out += mux.hello(self._session)
        with self._lock:
            self._ready = True
            self._last_error = ""
            self._changed.notify_all()

    # -- local side --

    def _read_local(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(min(conn.credit.available, _READ_CHUNK))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._out += mux.encode(FrameType.CLOSE, conn.id)
            self._finish(conn)
            return
        conn.credit.take(len(data))
        for frame in mux.encode_data(conn.id, data):
            self._out += frame

    def _deliver(self, conn: _Conn) -> None:
        """Write pending guest bytes to the local socket and give credit back for them."""
        while conn.pending:
            try:
                sent = conn.sock.send(conn.pending)
            except BlockingIOError:
                break
            except OSError:
                # The local end went away: the connection is over both ways.
                if not conn.peer_closed:
                    self._out += mux.encode(FrameType.CLOSE, conn.id)
                self._finish(conn)
                return
            del conn.pending[:sent]
            grant = conn.window.consume(sent)
            if grant and not conn.peer_closed:
                self._out += mux.credit(conn.id, grant)
        if conn.peer_closed and not conn.pending:
            self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        self._unwatch(conn.sock)
        conn.sock.close()
        self._conns.pop(conn.id, None)
        self._forget_id(conn.id)
