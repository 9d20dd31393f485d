"""The stdio of a container process: ``Attachment`` speaks the protocol, ``Process`` is the API.

The agent keeps a process's output until the host acknowledges it, and numbers every byte by
its offset in its stream. An ``Attachment`` counts the bytes it hands to its reader, tells the
agent (batched acks) so it can free them, and on ``reattach()`` asks to resume exactly there:
output is neither missed nor repeated across a detach, or across a dropped connection. Until the
reader takes output, it is not acknowledged, so a slow reader slows the writer in the guest
(back-pressure) instead of losing data.

``Process`` wraps an attachment the way ``subprocess.Popen`` wraps pipes::

    proc = sandbox.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    out, err = proc.communicate()
    proc.returncode  # 3
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import grpc

from bulkhead_proto.v1 import agent_pb2

from .details import ProcessExit
from .errors import BulkheadError, ProcessTimeout, StdioError, from_rpc_error

if TYPE_CHECKING:
    from .client import AgentClient

log = logging.getLogger(__name__)

Stream = Literal["stdout", "stderr"]

ACK_BYTES = 256 * 1024  # acknowledge at least this often (bytes) ...
ACK_INTERVAL = 0.2  # ... or this often (seconds) while output is flowing
STDIN_CHUNK = 256 * 1024  # well under gRPC's 4 MiB message limit
STDIN_BUFFER = 4 * 1024 * 1024  # write_stdin blocks while this much is not yet sent
READ_BUFFER = 16 * 1024 * 1024  # Process keeps up to this much unread output per stream


@dataclass(frozen=True)
class Output:
    """A piece of a process's output: ``stream`` is ``"stdout"`` or ``"stderr"``."""

    stream: Stream
    data: bytes
    offset: int  # the stream offset of data[0]


class _Session:
    """One Attach call; a reattach makes a new one."""

    def __init__(self) -> None:
        self.call: grpc.Call | None = None
        self.done = False  # no more requests to send (exit seen, detached, failed)
        self.detaching = False
        self.requests_started = False  # gRPC has pulled the first request
        self.requests_ended = threading.Event()  # ... and has stopped pulling them


class Attachment:
    """The stdio stream of one process over ``Attach``: iterate it for ``Output``, in order.

    Iteration ends after the process's exit (then ``exit`` is set) or a ``detach()``
    (then ``exit`` is ``None`` and ``reattach()`` resumes where it stopped). A broken
    connection raises the matching ``AgentError``; ``reattach()`` resumes after that too.
    One thread iterates; any thread may write stdin, detach or reattach.
    """

    def __init__(
        self,
        client: AgentClient,
        container_id: str,
        exec_id: str = "",
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        ack_bytes: int = ACK_BYTES,
        ack_interval: float = ACK_INTERVAL,
        stdin_buffer: int = STDIN_BUFFER,
    ) -> None:
        self.client = client
        self.container_id = container_id
        self.exec_id = exec_id
        self.ack_bytes = ack_bytes
        self.ack_interval = ack_interval
        self.stdin_buffer = stdin_buffer
        self.exit: ProcessExit | None = None
        self._cond = threading.Condition()
        # Bytes handed to the reader: the resume point and what may be acknowledged.
        self._offsets: dict[Stream, int] = {"stdout": stdout_offset, "stderr": stderr_offset}
        self._acked = dict(self._offsets)
        self._last_ack = 0.0
        self._stdin: deque[bytes] = deque()
        self._stdin_pending = 0
        self._stdin_closed = False
        self._eof_sent = False
        self._session: _Session | None = None
        self.acks_sent = 0  # for tests and curiosity

    def __repr__(self) -> str:
        state = "exited" if self.exit else "attached" if self.attached else "detached"
        return (
            f"Attachment({self.container_id!r}, {self.exec_id!r}, {state}, "
            f"stdout_offset={self.stdout_offset}, stderr_offset={self.stderr_offset})"
        )

    # -- facts --

    @property
    def stdout_offset(self) -> int:
        """Bytes of stdout handed to the reader so far (where a reattach resumes)."""
        return self._offsets["stdout"]

    @property
    def stderr_offset(self) -> int:
        return self._offsets["stderr"]

    @property
    def attached(self) -> bool:
        """Whether a stream is open (not detached, not ended)."""
        session = self._session
        return session is not None and not session.done

    # -- the connection --

    def connect(self) -> Attachment:
        """Open the stream, resuming at the offsets already received."""
        with self._cond:
            if self.exit is not None:
                raise BulkheadError(f"{self._name()} has exited; there is nothing to attach to")
            if self.attached:
                raise BulkheadError(f"{self._name()} is already attached")
            session = _Session()
            self._session = session
            first = agent_pb2.AttachRequest(
                container_id=self.container_id,
                exec_id=self.exec_id,
                stdout_offset=self._offsets["stdout"],
                stderr_offset=self._offsets["stderr"],
                # Whatever was received before is ours: the agent may free it.
                ack_stdout=self._offsets["stdout"],
                ack_stderr=self._offsets["stderr"],
            )
            self._acked = dict(self._offsets)
            self._last_ack = time.monotonic()
            session.call = self.client._open_attach(self._requests(session, first))
        return self

    def detach(self) -> None:
        """Close the stream; the process runs on and its output waits in the guest."""
        with self._cond:
            session = self._session
            if session is None or session.done:
                return
            session.detaching = True
            session.done = True
            self._cond.notify_all()
        if session.call is not None:
            session.call.cancel()
            self._settle(session, timeout=1.0)

    def reattach(self) -> Attachment:
        """A new stream that starts right after the last byte handed out."""
        self.detach()
        return self.connect()

    close = detach

    # -- stdin --

    def write_stdin(self, data: bytes) -> None:
        """Queue ``data`` for the process's stdin; blocks while much is still unsent."""
        view = memoryview(bytes(data))
        with self._cond:
            if self._stdin_closed:
                raise ValueError("stdin is closed")
            if self.exit is not None:
                raise BrokenPipeError(f"{self._name()} has exited")
            for start in range(0, len(view), STDIN_CHUNK):
                chunk = bytes(view[start : start + STDIN_CHUNK])
                while self._stdin_pending >= self.stdin_buffer:
                    if self.exit is not None:
                        raise BrokenPipeError(f"{self._name()} has exited")
                    self._cond.wait(1.0)
                self._stdin.append(chunk)
                self._stdin_pending += len(chunk)
                self._cond.notify_all()

    def close_stdin(self) -> None:
        """Send EOF to the process's stdin once what was written before has gone out."""
        with self._cond:
            self._stdin_closed = True
            self._cond.notify_all()

    @property
    def stdin_closed(self) -> bool:
        return self._stdin_closed

    # -- output --

    def __iter__(self) -> Iterator[Output]:
        while True:
            session = self._session
            if session is None or self.exit is not None:
                return
            assert session.call is not None
            try:
                response = next(session.call)
            except StopIteration:
                self._end(session)
                if session.detaching:
                    if self.attached:  # reattached meanwhile: go on with the new stream
                        continue
                    return
                raise StdioError(
                    f"{self._name()}: the stream ended before the process's exit"
                ) from None
            except grpc.RpcError as exc:
                self._end(session)
                if session.detaching:
                    if self.attached:
                        continue
                    return
                raise from_rpc_error(exc, "bulkhead.v1.Agent/Attach") from None
            kind = response.WhichOneof("event")
            if kind == "exit":
                with self._cond:
                    self.exit = ProcessExit.from_proto(response.exit)
                    session.done = True
                    self._cond.notify_all()
                self._settle(session)
                return
            if kind == "stdout" or kind == "stderr":
                output = self._accept(kind, getattr(response, kind))
                if output is not None:
                    yield output
            # Unknown events (a newer agent) are skipped.

    def _accept(self, stream: Stream, msg: agent_pb2.Output) -> Output | None:
        """Trim what was already handed out (a resend after reattach); refuse a gap."""
        expected = self._offsets[stream]
        if msg.offset > expected:
            raise StdioError(
                f"{self._name()}: {stream} jumped from offset {expected} to {msg.offset}: "
                f"{msg.offset - expected} bytes are missing"
            )
        skip = expected - msg.offset
        if skip >= len(msg.data):
            return None
        data = msg.data[skip:] if skip else msg.data
        with self._cond:
            self._offsets[stream] = expected + len(data)
            if self._unacked() >= self.ack_bytes:
                self._cond.notify_all()  # the request thread sends the ack now
        return Output(stream, data, expected)

    @staticmethod
    def _settle(session: _Session, timeout: float = 2.0) -> None:
        """Let the finished call wind down: our request generator returned, the status in.

        gRPC's own threads hold the call's lock while they finish; a program that exits
        right after the last output (the CLI) could otherwise freeze one of them holding it
        at interpreter shutdown, and then hang in the call's finaliser.
        """
        call = session.call
        finished = threading.Event()
        if call is not None:
            call.add_done_callback(lambda _call: finished.set())  # type: ignore[attr-defined]
        if session.requests_started:  # else gRPC never ran the generator: nothing to wait for
            session.requests_ended.wait(timeout)
        finished.wait(timeout)

    def _end(self, session: _Session) -> None:
        with self._cond:
            session.done = True
            self._cond.notify_all()

    # -- requests (run on gRPC's thread) --

    def _requests(
        self, session: _Session, first: agent_pb2.AttachRequest
    ) -> Iterator[agent_pb2.AttachRequest]:
        session.requests_started = True
        try:
            yield first
            while True:
                with self._cond:
                    while True:
                        call = session.call
                        if session.done or (call is not None and not call.is_active()):
                            return
                        request, wait = self._next_request()
                        if request is not None:
                            break
                        self._cond.wait(wait)
                yield request
        finally:
            session.requests_ended.set()

    def _next_request(self) -> tuple[agent_pb2.AttachRequest | None, float]:
        """The next message to send (under the lock), or how long to sleep first."""
        request = agent_pb2.AttachRequest()
        send = False
        if self._stdin:
            chunk = self._stdin.popleft()
            self._stdin_pending -= len(chunk)
            request.stdin = chunk
            send = True
            self._cond.notify_all()  # a blocked writer may go on
        if not self._stdin and self._stdin_closed and not self._eof_sent:
            request.stdin_eof = True
            self._eof_sent = True
            send = True
        now = time.monotonic()
        unacked = self._unacked()
        since = now - self._last_ack
        if unacked and (send or unacked >= self.ack_bytes or since >= self.ack_interval):
            request.ack_stdout = self._offsets["stdout"]
            request.ack_stderr = self._offsets["stderr"]
            self._acked = dict(self._offsets)
            self._last_ack = now
            self.acks_sent += 1
            send = True
        if send:
            return request, 0.0
        # Wake for the timer ack when one is pending; otherwise now and then to notice a call
        # that ended without us (a reader that gave up).
        return None, max(0.01, self.ack_interval - since) if unacked else 1.0

    def _unacked(self) -> int:
        return sum(self._offsets[s] - self._acked[s] for s in ("stdout", "stderr"))

    def _name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id


class Stdin:
    """A process's stdin: ``write()`` bytes, ``close()`` for EOF."""

    def __init__(self, process: Process) -> None:
        self._process = process

    def write(self, data: bytes) -> int:
        self._process._require_attachment().write_stdin(data)
        return len(data)

    def close(self) -> None:
        self._process._require_attachment().close_stdin()

    @property
    def closed(self) -> bool:
        attachment = self._process._attachment
        return attachment is None or attachment.stdin_closed

    def __enter__(self) -> Stdin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OutputReader:
    """``stdout`` or ``stderr`` of a ``Process``: iterate for chunks of bytes, or ``read()``.

    Iteration ends at the process's exit, or when the process is detached.
    """

    def __init__(self, process: Process, stream: Stream) -> None:
        self._process = process
        self.stream = stream

    def __iter__(self) -> Iterator[bytes]:
        self._process._start_pump()
        while True:
            chunk = self._process._take(self.stream)
            if chunk is None:
                return
            yield chunk

    def read(self) -> bytes:
        """Everything until the end of the stream."""
        return b"".join(self)


class Process:
    """A process in a container, used like ``subprocess.Popen``.

    Output comes two ways; pick one per process:

    - ``stdout`` / ``stderr``: iterables of bytes (and ``read()``), filled by a background
      thread; each keeps up to ``read_buffer`` bytes unread before the guest is slowed down.
    - ``output()``: every ``Output`` in the order the agent sent it, read in the caller's
      thread (this is what the CLI uses).

    ``wait()`` never deadlocks on unread output: while it waits, output nobody reads is kept
    in memory (and stays readable afterwards). ``communicate()`` sends input, closes stdin
    and returns all output.
    """

    def __init__(
        self,
        client: AgentClient,
        container_id: str,
        exec_id: str = "",
        *,
        attachment: Attachment | None = None,
        pid: int = 0,
        tty: bool = False,
        on_exit: Callable[[], None] | None = None,
        read_buffer: int = READ_BUFFER,
    ) -> None:
        self.client = client
        self.container_id = container_id
        self.exec_id = exec_id
        self.pid = pid
        self.tty = tty
        self.read_buffer = read_buffer
        self.stdin = Stdin(self)
        self.stdout = OutputReader(self, "stdout")
        self.stderr = OutputReader(self, "stderr")
        self._attachment = attachment
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._exit: ProcessExit | None = None
        self._mode: Literal["pump", "direct"] | None = None
        self._streaming = False  # a pump or an output() reader is taking output right now
        self._buffers: dict[Stream, deque[bytes]] = {"stdout": deque(), "stderr": deque()}
        self._buffered: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        self._starving: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        self._draining = False
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        name = f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id
        status = str(self._exit) if self._exit else "running"
        return f"<Process {name} pid={self.pid} {status}>"

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- status --

    @property
    def exit(self) -> ProcessExit | None:
        """How the process ended, once known."""
        return self._exit

    @property
    def returncode(self) -> int | None:
        """The shell-style status (see ``ProcessExit.returncode``), once it has exited."""
        return self._exit.returncode if self._exit else None

    @property
    def attachment(self) -> Attachment | None:
        return self._attachment

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and its output to be in; its ``returncode``.

        Raises ``ProcessTimeout`` after ``timeout`` seconds (the process runs on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        attachment = self._attachment
        with self._cond:
            if self._mode is None and attachment is not None and attachment.attached:
                self._start_pump_locked()
            self._draining = True
            self._cond.notify_all()
            while self._exit is None and self._streaming:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ProcessTimeout(f"{self!r} did not exit within {timeout:g}s")
                self._cond.wait(remaining)
            if self._exit is not None:
                return self._exit.returncode
            if self._error is not None:
                raise self._error
        # Nobody streams the output (detached, or never attached): ask the agent.
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._finish(self.client.wait_process(self.container_id, self.exec_id, timeout=remaining))
        assert self._exit is not None
        return self._exit.returncode

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        """Send ``input``, close stdin, wait; all of ``(stdout, stderr)``."""
        self._start_pump()
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        attachment = self._require_attachment()
        if input:
            attachment.write_stdin(input)
        attachment.close_stdin()
        self.wait(timeout)
        return self.stdout.read(), self.stderr.read()

    # -- control --

    def signal(self, sig: int) -> None:
        """Send a signal to this process."""
        self.client.signal_process(self.container_id, self.exec_id, int(sig))

    def terminate(self) -> None:
        self.signal(15)

    def kill(self) -> None:
        self.signal(9)

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the process's terminal (``tty=True`` only)."""
        self.client.resize_terminal(self.container_id, self.exec_id, rows, cols)

    def detach(self) -> None:
        """Stop streaming; the process runs on and its output waits in the guest."""
        if self._attachment is not None:
            self._attachment.detach()

    def reattach(self) -> Process:
        """Stream again, from the first byte not yet received (or from the start)."""
        if self._exit is not None:
            return self
        if self._attachment is None:
            self._attachment = self.client.attach(self.container_id, self.exec_id)
        else:
            self._attachment.reattach()
        with self._cond:
            self._error = None
            if self._mode == "pump":
                self._start_pump_locked(force=True)
        return self

    attach = reattach

    def close(self) -> None:
        """Detach (and, for a ``remove=True`` run, remove the container). Idempotent."""
        self.detach()
        if self._exit is None and self._on_exit is not None:
            on_exit, self._on_exit = self._on_exit, None
            try:
                on_exit()
            except BulkheadError as exc:
                log.warning("%r: cleanup failed: %s", self, exc)

    # -- output, in order --

    def output(self) -> Iterator[Output]:
        """Every piece of output in the order the agent sent it; ends at exit (or detach)."""
        attachment = self._require_attachment()
        with self._cond:
            if self._mode == "pump":
                raise BulkheadError("stdout/stderr are already being read; use them instead")
            self._mode = "direct"
            self._streaming = True
        try:
            yield from attachment
            # Before _streaming drops, so that wait() sees the exit rather than asking the agent.
            if attachment.exit is not None:
                self._finish(attachment.exit)
        except BaseException as exc:
            with self._cond:
                self._error = exc
            raise
        finally:
            with self._cond:
                self._streaming = False
                self._cond.notify_all()

    # -- the pump behind stdout/stderr --

    def _require_attachment(self) -> Attachment:
        if self._attachment is None:
            raise BulkheadError(f"{self!r} has no stdio attached; call reattach() first")
        return self._attachment

    def _start_pump(self) -> None:
        with self._cond:
            self._start_pump_locked()

    def _start_pump_locked(self, force: bool = False) -> None:
        if self._mode == "direct":
            raise BulkheadError("output() is already reading this process; use it instead")
        if self._mode == "pump" and not force:
            return
        attachment = self._require_attachment()
        self._mode = "pump"
        if self._streaming or not attachment.attached:
            return
        self._streaming = True
        name = f"bulkhead-stdio-{self.container_id}"
        threading.Thread(target=self._pump, args=(attachment,), name=name, daemon=True).start()

    def _pump(self, attachment: Attachment) -> None:
        try:
            for out in attachment:
                with self._cond:
                    # Hold back (and so stop acknowledging) while this stream's reader is
                    # behind, unless someone waits for the exit or starves on the other stream.
                    while (
                        self._buffered[out.stream] >= self.read_buffer
                        and not self._draining
                        and not any(self._starving.values())
                    ):
                        self._cond.wait()
                    self._buffers[out.stream].append(out.data)
                    self._buffered[out.stream] += len(out.data)
                    self._cond.notify_all()
            # Before _streaming drops, so that wait() sees the exit rather than asking the agent.
            if attachment.exit is not None:
                self._finish(attachment.exit)
        except BaseException as exc:
            with self._cond:
                self._error = exc
            log.debug("%r: stdio stream failed: %s", self, exc)
        finally:
            with self._cond:
                self._streaming = False
                self._cond.notify_all()

    def _take(self, stream: Stream) -> bytes | None:
        """The next chunk of ``stream``; ``None`` at its end."""
        with self._cond:
            while not self._buffers[stream]:
                if not self._streaming:
                    if self._error is not None and self._exit is None:
                        raise self._error
                    return None
                self._starving[stream] += 1
                self._cond.notify_all()
                try:
                    self._cond.wait()
                finally:
                    self._starving[stream] -= 1
            chunk = self._buffers[stream].popleft()
            self._buffered[stream] -= len(chunk)
            self._cond.notify_all()
            return chunk

    def _finish(self, exit: ProcessExit) -> None:
        """Record the exit; the cleanup (``remove=True``) runs before waiters wake up."""
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            try:
                on_exit()
            except BulkheadError as exc:
                log.warning("%r: cleanup after exit failed: %s", self, exc)
        with self._cond:
            if self._exit is None:
                self._exit = exit
            self._cond.notify_all()
