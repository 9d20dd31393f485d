"""Expose any transport as a unix socket that grpcio can dial.

grpcio dials ``unix:`` paths but not vsock or a mux connection, so the monitor
listens on ``agent.sock`` and relays each accepted connection to a fresh
``transport.connect()``. Several clients can thus share one sandbox: each gets
its own connection, and so its own session with the agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from pathlib import Path

from .transport import Transport

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the terminating NUL


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst``.

    An error on either side (a reset) ends both directions at once: shutting
    both sockets down wakes the pump running the other way.
    """
    try:
        while data := src.recv(_CHUNK):
            dst.sendall(data)
    except OSError:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def splice(a: socket.socket, b: socket.socket) -> None:
    """Relay ``a`` and ``b`` both ways until both directions are done, then close both."""
    other = threading.Thread(target=pump, args=(b, a), name="relay back", daemon=True)
    other.start()
    try:
        pump(a, b)
        other.join()
    finally:
        a.close()
        b.close()


class UnixRelay:
    """Listen on unix socket ``path`` (mode 0600) and relay each connection to ``transport``.

    ``start()`` binds and returns at once; connections are served on threads.
    ``close()`` stops listening, removes the socket file and ends the
    connections being relayed. Usable as a context manager.
    """

    def __init__(
        self,
        transport: Transport,
        path: str | os.PathLike[str],
        *,
        connect_timeout: float = 10.0,
        mode: int = 0o600,
    ) -> None:
        self.transport = transport
        self.path = Path(path)
        self.connect_timeout = connect_timeout
        self.mode = mode
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self._closed = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"UnixRelay({self.transport!r}, {str(self.path)!r})"

    def __enter__(self) -> UnixRelay:
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> int:
        """How many connections are being relayed right now."""
        with self._lock:
            return len(self._active) // 2

    def start(self) -> UnixRelay:
        size = len(os.fsencode(self.path))
        if size > _MAX_UNIX_PATH:
            raise OSError(f"unix socket path too long ({size} bytes): {self.path}")
        # Bind under a temporary name, set the mode, then rename into place: the
        # socket is never reachable with the umask's looser mode, and no
        # process-wide umask change races with other threads.
        tmp = self.path.with_name(f".relay-{os.getpid()}-{threading.get_ident() % 10000}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            listener.bind(str(tmp))
            os.chmod(tmp, self.mode)
            listener.listen(64)
            os.replace(tmp, self.path)
        except BaseException:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        listener.setblocking(False)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="relay accept", daemon=True)
        self._thread.start()
        log.info("relaying %s to %r", self.path, self.transport)
        return self

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        with self._lock:
            active = list(self._active)
        for sock in active:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set():
                for key, _ in sel.select():
                    if key.fileobj is not self._listener:
                        continue
                    try:
                        client, _ = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.error("accept on %s failed: %s", self.path, exc)
                        continue
                    client.setblocking(True)
                    threading.Thread(
                        target=self._serve, args=(client,), name="relay conn", daemon=True
                    ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self.transport.connect(timeout=self.connect_timeout)
        except Exception as exc:
            # The client sees EOF at once and can retry; gRPC reports UNAVAILABLE.
            level = logging.DEBUG if self._closed.is_set() else logging.WARNING
            log.log(level, "cannot relay a connection on %s: %s", self.path, exc)
            client.close()
            return
        with self._lock:
            if self._closed.is_set():
                client.close()
                upstream.close()
                return
            self._active.update((client, upstream))
        try:
            splice(client, upstream)
        finally:
            with self._lock:
                self._active.discard(client)
                self._active.discard(upstream)
