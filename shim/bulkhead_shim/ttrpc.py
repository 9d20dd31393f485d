"""ttrpc, containerd's lightweight RPC protocol, over unix sockets: a server and a client.

containerd talks to a runtime v2 shim with ttrpc, and the shim publishes its events to
containerd's ttrpc socket, so the shim needs both ends. No Python ttrpc exists; this one
speaks the unary subset (all that the shim API uses) with sockets and threads.

The wire: every message is a 10-byte header, then its payload::

    uint32 payload length | uint32 stream id | uint8 type | uint8 flags   (big-endian)

Type 1 is a request (payload: a ``ttrpc.Request``), type 2 a response (a
``ttrpc.Response``); type 3 (stream data) belongs to ttrpc streaming, which nothing here
uses, so it and unknown types are skipped, as Go's server does for forward compatibility.
Client stream ids are odd and increase. A payload may be at most 4 MiB; a larger frame is
discarded and its stream answered with RESOURCE_EXHAUSTED, but the connection lives on.
Status codes are gRPC's.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import queue
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError, Message

from bulkhead_shim.api import ttrpc_request_pb2 as pb

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE = 4 << 20  # Go's messageLengthMax: payload bytes, header not counted

TYPE_REQUEST = 0x1
TYPE_RESPONSE = 0x2
TYPE_DATA = 0x3

# Pass as a call's timeout for a call with no deadline on a client that has a default one
# (a shim's Wait can rightly take as long as the container runs).
NO_TIMEOUT = math.inf


class Code(enum.IntEnum):
    """gRPC status codes, which ttrpc reuses as its own."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def _code(value: Code | int) -> Code:
    try:
        return Code(value)
    except ValueError:  # a peer's code from a newer gRPC table
        return Code.UNKNOWN


class TtrpcError(Exception):
    """A call that ended with a non-OK status, raised by handlers and by the client.

    containerd maps the code onto its errdefs (NOT_FOUND, ALREADY_EXISTS,
    FAILED_PRECONDITION, UNIMPLEMENTED ... become errdefs.ErrNotFound and so on), so a
    handler should pick it with care.
    """

    def __init__(self, code: Code | int, message: str) -> None:
        self.code = _code(code)
        self.message = message
        super().__init__(f"{self.code.name}: {message}")


@dataclass(eq=False)  # identity semantics: live contexts are kept in a set
class CallContext:
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    # Keys lower-cased (as Go's ttrpc.MD does); a key sent several times has several values.
    metadata: dict[str, list[str]]
    # time.monotonic() by which the caller stops waiting; None when it sent no timeout.
    deadline: float | None
    # Set when the caller's connection is gone or the server shuts down: a handler that
    # blocks (Wait) can watch it and give up, as nobody will read its answer.
    cancelled: threading.Event = field(default_factory=threading.Event)

    def time_left(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


Handler = Callable[[Message, CallContext], Message]


# --- framing ------------------------------------------------------------------------------


def encode_frame(stream_id: int, msg_type: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read n bytes; EOFError if the peer closes first (OSError if the socket breaks)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        chunk = sock.recv_into(view[got:], n - got)
        if chunk == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += chunk
    return bytes(buf)


def _discard(sock: socket.socket, n: int) -> None:
    scratch = bytearray(min(n, 1 << 16))
    while n > 0:
        chunk = sock.recv_into(scratch, min(n, len(scratch)))
        if chunk == 0:
            raise EOFError("connection closed inside a discarded frame")
        n -= chunk


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes | None]:
    """(stream id, type, flags, payload); payload None when the frame was too large and
    was skipped, so the caller can answer that stream instead of dropping the connection."""
    length, stream_id, msg_type, flags = HEADER.unpack(_recv_exact(sock, HEADER_SIZE))
    if length > MAX_MESSAGE:
        _discard(sock, length)
        return stream_id, msg_type, flags, None
    return stream_id, msg_type, flags, _recv_exact(sock, length) if length else b""


def _socket_path(path: str | os.PathLike[str]) -> str:
    """A filesystem path, or an abstract name starting with NUL; "unix://" is accepted
    since that is how containerd writes socket addresses."""
    text = os.fspath(path)
    return text.removeprefix("unix://")


# --- server -------------------------------------------------------------------------------


class _Workers:
    """A bounded pool of daemon threads.

    Not concurrent.futures: its workers are joined at interpreter exit, and a shim must be
    able to exit while a handler (a Wait on a process that never ends) still blocks.
    """

    def __init__(self, max_workers: int) -> None:
        self._max = max_workers
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # workers waiting for a job
        self._queued = 0  # jobs submitted and not yet taken
        self._stopped = False
        self._warned = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("worker pool stopped")
            self._queued += 1
            # A job beyond the idle workers gets a new thread, so a handler that blocks
            # never holds up the next call while the pool is below its bound.
            if self._queued > self._idle:
                if self._threads < self._max:
                    self._threads += 1
                    self._idle += 1  # it starts out waiting for a job
                    threading.Thread(target=self._run, name="ttrpc-worker", daemon=True).start()
                elif not self._warned:
                    self._warned = True
                    log.warning("ttrpc: all %d workers busy; calls are queueing", self._max)
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            try:
                job()
            except Exception:  # jobs catch their own errors; this is a last resort
                log.exception("ttrpc: worker job failed")
            with self._lock:
                if self._stopped:
                    return
                self._idle += 1

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)


class _ServerConnection:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self._write_lock = threading.Lock()
        self.closed = threading.Event()  # also every call's CallContext.cancelled source
        self._contexts: set[CallContext] = set()
        self._contexts_lock = threading.Lock()
        # Set by a shutdown() that a handler on this connection called: close once that
        # handler's answer is out rather than under it.
        self.close_after_reply = False
        self.thread = threading.Thread(target=self._read_loop, name="ttrpc-conn", daemon=True)

    # Reading runs in one thread per connection; handlers run in the server's workers, so
    # a blocking call does not hold up the next frame, and answers go out as they finish.
    def _read_loop(self) -> None:
        try:
            while True:
                stream_id, msg_type, _flags, payload = _read_frame(self.sock)
                if msg_type != TYPE_REQUEST:
                    log.debug("ttrpc: ignoring message type %d on stream %d", msg_type, stream_id)
                    continue
                if payload is None:
                    self.send_status(
                        stream_id,
                        Code.RESOURCE_EXHAUSTED,
                        f"message length exceeds maximum message size of {MAX_MESSAGE}",
                    )
                    continue
                if stream_id % 2 != 1:
                    self.send_status(
                        stream_id,
                        Code.INVALID_ARGUMENT,
                        "StreamID must be odd for client initiated streams",
                    )
                    continue
                try:
                    request = pb.Request.FromString(payload)
                except DecodeError as e:
                    self.send_status(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request: {e}")
                    continue
                self.server._dispatch(self, stream_id, request)
        except (EOFError, OSError):
            pass  # the peer went away (or shutdown closed us): nothing to answer
        except Exception:
            log.exception("ttrpc: connection reader failed")
        finally:
            self.close()

    def track(self, ctx: CallContext) -> bool:
        with self._contexts_lock:
            if self.closed.is_set():
                return False
            self._contexts.add(ctx)
            return True

    def untrack(self, ctx: CallContext) -> None:
        with self._contexts_lock:
            self._contexts.discard(ctx)

    def send(self, stream_id: int, msg_type: int, payload: bytes) -> None:
        frame = encode_frame(stream_id, msg_type, payload)
        with self._write_lock:
            try:
                self.sock.sendall(frame)
            except OSError as e:
                log.debug("ttrpc: cannot answer stream %d: %s", stream_id, e)

    def send_status(self, stream_id: int, code: Code, message: str) -> None:
        response = pb.Response(status=pb.Status(code=int(code), message=message))
        self.send(stream_id, TYPE_RESPONSE, response.SerializeToString())

    def close(self) -> None:
        with self._contexts_lock:
            if self.closed.is_set():
                return
            self.closed.set()
            contexts = list(self._contexts)
        for ctx in contexts:
            ctx.cancelled.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread's recv
        # Taking the write lock keeps a response half-written by a worker from going out
        # on a closed (or reused) descriptor.
        with self._write_lock:
            self.sock.close()
        self.server._forget(self)


class Server:
    """A ttrpc server: register handlers, give it sockets, serve."""

    def __init__(self, *, max_workers: int = 32) -> None:
        self._methods: dict[str, dict[str, tuple[type[Message], Handler]]] = {}
        self._workers = _Workers(max_workers)
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        # What listen() bound: the socket, its path and the path's (st_dev, st_ino).
        self._bound: list[tuple[socket.socket, str, tuple[int, int]]] = []
        self._conns: set[_ServerConnection] = set()
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._serving = False
        self._thread: threading.Thread | None = None
        # Wakes the accept loop's select(): closing a listening socket under a blocked
        # accept() does not reliably wake it on Linux.
        self._wake_r, self._wake_w = socket.socketpair()
        self._current = threading.local()  # .conn: the connection of the call a worker runs

    def register(
        self, service: str, method: str, request_type: type[Message], handler: Handler
    ) -> None:
        methods = self._methods.setdefault(service, {})
        if method in methods:
            raise ValueError(f"{service}/{method} registered twice")
        methods[method] = (request_type, handler)

    def listen(self, path: str | os.PathLike[str]) -> None:
        """Bind and listen on a unix socket at path, replacing a stale socket there."""
        where = _socket_path(path)
        if not where.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISSOCK(os.lstat(where).st_mode):
                    raise FileExistsError(f"{where} exists and is not a socket")
                os.unlink(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(where)
            ident = (0, 0)
            if not where.startswith("\0"):
                os.chmod(where, 0o600)  # containerd runs as root; nobody else may drive us
                st = os.lstat(where)
                ident = (st.st_dev, st.st_ino)
            sock.listen(128)
            self.adopt(sock)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._bound.append((sock, where, ident))

    def adopt(self, sock: socket.socket) -> None:
        """Serve an already-listening socket (the shim binds it before it forks)."""
        sock.setblocking(False)
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("server is shut down")
            self._listeners.append(sock)
        self._wake()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def serve_forever(self) -> None:
        with self._lock:
            if self._serving:
                raise RuntimeError("server is already serving")
            if self._stopping.is_set():
                return
            self._serving = True
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        watched: set[socket.socket] = set()
        try:
            while not self._stopping.is_set():
                with self._lock:
                    listeners = list(self._listeners)
                for sock in listeners:
                    if sock not in watched:
                        watched.add(sock)
                        try:
                            selector.register(sock, selectors.EVENT_READ)
                        except (ValueError, OSError):  # closed by a racing shutdown()
                            continue
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        continue
                    self._accept(key.fileobj)  # type: ignore[arg-type]
        finally:
            selector.close()
            self._wake_r.close()
            self._stopped.set()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if self._stopping.is_set():
                return  # shutdown() closed the listener under us
            log.warning("ttrpc: accept failed: %s", e)
            time.sleep(0.05)  # e.g. EMFILE: do not spin
            return
        sock.setblocking(True)
        conn = _ServerConnection(self, sock)
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                return
            self._conns.add(conn)
        conn.thread.start()

    def start(self) -> None:
        """serve_forever() in a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="ttrpc-server", daemon=True)
        self._thread.start()

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish for up to grace seconds, then close
        every connection and unlink the socket listen() bound.

        May be called from a handler: its own call is not waited for, and its answer still
        goes out before its connection closes. Handlers still blocked after grace run on
        in their daemon threads; their answers are dropped.
        """
        deadline = time.monotonic() + grace
        with self._lock:
            first = not self._stopping.is_set()
            self._stopping.set()
            listeners, self._listeners = self._listeners, []
            bound, self._bound = self._bound, []
        self._wake()
        for sock in listeners:
            sock.close()
        for sock, where, ident in bound:
            sock.close()
            # Only our own socket file: a new shim may already have bound this path.
            with contextlib.suppress(OSError):
                st = os.lstat(where)
                if (st.st_dev, st.st_ino) == ident:
                    os.unlink(where)
        # Called by a handler (a Shutdown method, say): do not wait for that call itself,
        # and leave its connection open until its answer is sent.
        own = getattr(self._current, "conn", None)
        with self._idle:
            others = 1 if own is not None else 0
            while self._inflight > others and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            if self._inflight > others:
                log.warning("ttrpc: shutting down with %d calls still running", self._inflight)
            conns = list(self._conns)
        for conn in conns:
            if conn is own:
                conn.close_after_reply = True
            else:
                conn.close()
        for conn in conns:
            if conn is not own:
                conn.thread.join(timeout=1.0)
        if first:
            self._workers.stop()
        with self._lock:
            serving = self._serving
        if serving:
            # serve_forever may run in any thread (the shim's main thread, say): wait for
            # its loop to end, not for a particular thread.
            self._stopped.wait(timeout=max(0.1, deadline - time.monotonic()))
        elif first:
            self._wake_r.close()  # else serve_forever closes it on its way out
        if first:
            self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _forget(self, conn: _ServerConnection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _dispatch(self, conn: _ServerConnection, stream_id: int, request: pb.Request) -> None:
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        deadline = (
            time.monotonic() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        )
        ctx = CallContext(request.service, request.method, metadata, deadline)
        with self._lock:
            self._inflight += 1
        try:
            self._workers.submit(lambda: self._run_call(conn, stream_id, request, ctx))
        except RuntimeError:  # shutting down
            self._call_done()
            conn.send_status(stream_id, Code.UNAVAILABLE, "server is shutting down")

    def _run_call(
        self, conn: _ServerConnection, stream_id: int, request: pb.Request, ctx: CallContext
    ) -> None:
        self._current.conn = conn
        try:
            if not conn.track(ctx):
                return  # the caller is gone
            try:
                code, message, payload = self._invoke(request, ctx)
            finally:
                conn.untrack(ctx)
                self._current.conn = None
            if len(payload) > MAX_MESSAGE:
                code, message, payload = (
                    Code.RESOURCE_EXHAUSTED,
                    f"response of {len(payload)} bytes exceeds {MAX_MESSAGE}",
                    b"",
                )
            response = pb.Response(status=pb.Status(code=int(code), message=message))
            if payload:
                response.payload = payload
            conn.send(stream_id, TYPE_RESPONSE, response.SerializeToString())
            if conn.close_after_reply:
                conn.close()
        finally:
            self._current.conn = None
            self._call_done()

    def _invoke(self, request: pb.Request, ctx: CallContext) -> tuple[Code, str, bytes]:
        service = self._methods.get(request.service)
        if service is None:
            return Code.UNIMPLEMENTED, f"service {request.service}", b""
        entry = service.get(request.method)
        if entry is None:
            return Code.UNIMPLEMENTED, f"method {request.service}/{request.method}", b""
        request_type, handler = entry
        try:
            message = request_type.FromString(request.payload)
        except DecodeError as e:
            return (
                Code.INVALID_ARGUMENT,
                f"cannot decode {request_type.DESCRIPTOR.full_name}: {e}",
                b"",
            )
        full = f"/{request.service}/{request.method}"
        try:
            reply = handler(message, ctx)
            return Code.OK, "", reply.SerializeToString()
        except TtrpcError as e:
            return e.code, e.message, b""
        except NotImplementedError as e:
            return Code.UNIMPLEMENTED, str(e) or f"{full} is not implemented", b""
        except Exception as e:
            # Never fatal to the server: the call fails, the rest go on.
            log.exception("ttrpc: handler %s failed", full)
            return Code.UNKNOWN, f"{type(e).__name__}: {e}", b""

    def _call_done(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()


# --- client -------------------------------------------------------------------------------


class _Pending:
    __slots__ = ("done", "error", "response")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: pb.Response | None = None
        self.error: TtrpcError | None = None


class Client:
    """A ttrpc client on one connection, safe to share between threads.

    timeout is the connect timeout and every call's default deadline (None: no deadline).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = 10.0) -> None:
        self.timeout = timeout
        self._path = _socket_path(path)
        self._lock = threading.Lock()  # pending table, stream ids, closed state
        self._write_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._closed_reason: str | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._path)
            sock.settimeout(None)
        except OSError as e:
            sock.close()
            raise TtrpcError(Code.UNAVAILABLE, f"connect {self._path!r}: {e}") from e
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self._reader.start()

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed_reason is not None

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[Message],
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Message:
        """Call service/method; timeout None takes the client's default, NO_TIMEOUT none."""
        limit = self.timeout if timeout is None else timeout
        if limit is not None and math.isinf(limit):
            limit = None
        payload = request.SerializeToString()
        if len(payload) > MAX_MESSAGE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, f"request of {len(payload)} bytes")
        envelope = pb.Request(service=service, method=method, payload=payload)
        if limit is not None:
            # The server sees our deadline; never 0, which would mean "none".
            envelope.timeout_nano = max(1, int(limit * 1e9))
        for key, value in (metadata or {}).items():
            envelope.metadata.add(key=key, value=value)
        frame_payload = envelope.SerializeToString()
        if len(frame_payload) > MAX_MESSAGE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, f"request of {len(frame_payload)} bytes")

        pending = _Pending()
        with self._lock:
            if self._closed_reason is not None:
                raise TtrpcError(Code.UNAVAILABLE, self._closed_reason)
            stream_id = self._next_id
            self._next_id = self._next_id + 2 if self._next_id < 0xFFFFFFFD else 1
            self._pending[stream_id] = pending
        try:
            with self._write_lock:
                self._sock.sendall(encode_frame(stream_id, TYPE_REQUEST, frame_payload))
        except OSError as e:
            self._fail_all(f"connection lost: {e}")
        if not pending.done.wait(limit):
            with self._lock:
                self._pending.pop(stream_id, None)
            if not pending.done.is_set():
                raise TtrpcError(
                    Code.DEADLINE_EXCEEDED, f"{service}/{method}: no answer in {limit:g}s"
                )
        if pending.error is not None:
            raise pending.error
        assert pending.response is not None
        response = pending.response
        if response.status.code != Code.OK:
            raise TtrpcError(response.status.code, response.status.message)
        try:
            return response_type.FromString(response.payload)
        except DecodeError as e:
            raise TtrpcError(
                Code.INTERNAL, f"cannot decode {response_type.DESCRIPTOR.full_name}: {e}"
            ) from e

    def _read_loop(self) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                stream_id, msg_type, _flags, payload = _read_frame(self._sock)
                if msg_type != TYPE_RESPONSE:
                    log.debug("ttrpc: ignoring message type %d on stream %d", msg_type, stream_id)
                    continue
                with self._lock:
                    pending = self._pending.pop(stream_id, None)
                if pending is None:
                    continue  # the caller timed out and left
                if payload is None:
                    pending.error = TtrpcError(
                        Code.RESOURCE_EXHAUSTED, f"response exceeds {MAX_MESSAGE} bytes"
                    )
                else:
                    try:
                        pending.response = pb.Response.FromString(payload)
                    except DecodeError as e:
                        pending.error = TtrpcError(Code.INTERNAL, f"bad response frame: {e}")
                pending.done.set()
        except (EOFError, OSError) as e:
            if isinstance(e, OSError):
                reason = f"connection lost: {e}"
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            pending, self._pending = self._pending, {}
            reason = self._closed_reason
        for p in pending.values():
            p.error = TtrpcError(Code.UNAVAILABLE, reason)
            p.done.set()

    def close(self) -> None:
        self._fail_all("client closed")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        with self._write_lock:
            self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
