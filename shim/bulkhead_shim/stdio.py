"""One process's stdio: between containerd's side (FIFOs, ``file://``, ``binary://``) and the
agent's ``Attach`` stream.

Lossless in both directions. Output is written to the FIFO as the agent delivers it, and
the agent only frees what was handed over, so a slow reader slows the container instead of
losing bytes. The output FIFOs are opened read-write: the open never blocks on a reader that
has not come yet, and the pipe survives a reader that comes and goes (``ctr`` reattaching).

Stdin, as with runc's shim, ends at containerd's ``CloseIO`` (what is already in the FIFO is
still sent first): once the process is started we hold a write end of our own, so a client that
detaches, or containerd restarting, does not end it. Before Start, though, the writer closing
the FIFO ends stdin too. ``ctr`` arms its CloseIO only when Create (or Exec) has returned, so a
short pipe it reads to the end during Create gets no CloseIO at all, only the close; runc's shim
then leaves ``echo hi | ctr run ... cat`` waiting for ever. The FIFO is opened at Create (Exec
for an exec), so that the writer is connected, and its close seen, before Start.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import select
import selectors
import subprocess
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from bulkhead.details import ProcessExit
from bulkhead.process import Process

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
BINARY_READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


Done = Callable[[ProcessExit | None, BaseException | None], None]


class Relay:
    """Copies ``process``'s output out and stdin in; ``on_done(exit, error)`` runs once the
    output is all written and closed (``exit`` None: the stream broke, ``error`` says why)."""

    def __init__(
        self, process: Process, stdio: Stdio, *, container_id: str, namespace: str, on_done: Done,
        stdin_fd: int | None = None,
    ) -> None:  # fmt: skip
        self.process = process
        self.stdio = stdio
        self.container_id = container_id
        self.namespace = namespace
        self.on_done = on_done
        self.done = threading.Event()
        self._stdin_fd = stdin_fd
        self._wake_r, self._wake_w = os.pipe()
        self._stdin_closing = threading.Event()
        self._started = threading.Event()
        self._stdin_lock = threading.Lock()  # the thread's end against started()'s own writer
        self._stdin_ended = False
        self._own_writer: int | None = None
        self._stdin_thread: threading.Thread | None = None
        self._outputs: dict[str, int] = {}
        self._binary: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Open containerd's ends and begin copying (call before the process starts)."""
        self._outputs = self._open_outputs()
        if self.stdio.stdin:
            if self._stdin_fd is None:
                self._stdin_fd = open_stdin_fifo(self.stdio.stdin)
            self._stdin_thread = threading.Thread(
                target=self._copy_stdin, name=f"stdin-{self.container_id}", daemon=True
            )
            self._stdin_thread.start()
        elif not self.stdio.terminal and self.process.attachment is not None:
            self.process.attachment.close_stdin()  # no stdin: EOF at once, as runc gives
        threading.Thread(
            target=self._copy_output, name=f"output-{self.container_id}", daemon=True
        ).start()

    def started(self) -> None:
        """The process runs: from now on only CloseIO ends its stdin.

        Done here, before Start returns, not in the copying thread: a client that writes
        and detaches right after Start must find our write end already there."""
        with self._stdin_lock:
            fd = self._stdin_fd
            if fd is not None and not self._stdin_ended and not _writer_gone(fd):
                self._own_writer = os.open(self.stdio.stdin, os.O_WRONLY | os.O_NONBLOCK
                                           | os.O_CLOEXEC)  # fmt: skip
            self._started.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")

    def close_stdin(self) -> None:
        """containerd's CloseIO: send what the FIFO still holds, then EOF."""
        if self._stdin_thread is None:
            if self.process.attachment is not None:
                self.process.attachment.close_stdin()
            return
        self._stdin_closing.set()
        os.write(self._wake_w, b"x")

    # -- output --

    def _open_outputs(self) -> dict[str, int]:
        outputs: dict[str, int] = {}
        stdout, stderr = self.stdio.stdout, self.stdio.stderr
        if stdout.startswith("binary://"):
            return self._start_binary(stdout)
        if stdout:
            outputs["stdout"] = _open_target(stdout)
        if stderr and not self.stdio.terminal:  # a terminal's output is all on stdout
            outputs["stderr"] = (
                os.dup(outputs["stdout"]) if stderr == stdout and stdout else _open_target(stderr)
            )
        return outputs

    def _start_binary(self, uri: str) -> dict[str, int]:
        """containerd's logging binary contract: it reads stdout on fd 3 and stderr on fd 4, and
        closes fd 5 once it is ready; it learns whose output it is from the environment."""
        url = urllib.parse.urlparse(uri)
        args = [url.path]
        for key, values in urllib.parse.parse_qs(url.query, keep_blank_values=True).items():
            for value in values:
                args += [key, value] if value else [key]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        env = dict(os.environ, CONTAINER_ID=self.container_id, CONTAINER_NAMESPACE=self.namespace)

        def _fds() -> None:  # in the child: put the three where the contract says
            # Out of the way first, so that no dup2 overwrites a descriptor still to be moved.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (out_r, err_r, ready_w)]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)

        try:
            # close_fds=False: subprocess would close 3-5 after _fds made them. Nothing else
            # leaks: Python's own descriptors are close-on-exec, dup2's copies are not.
            self._binary = subprocess.Popen(
                args, env=env, preexec_fn=_fds, close_fds=False,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        finally:
            for fd in (out_r, err_r, ready_w):
                os.close(fd)
        selector = selectors.DefaultSelector()
        selector.register(ready_r, selectors.EVENT_READ)
        ready = selector.select(BINARY_READY_TIMEOUT)
        selector.close()
        os.close(ready_r)
        if not ready:
            log.warning("%s: logging binary %s not ready in %ss", self.container_id, uri,
                        BINARY_READY_TIMEOUT)  # fmt: skip
        return {"stdout": out_w, "stderr": err_w}

    def _copy_output(self) -> None:
        exit: ProcessExit | None = None
        error: BaseException | None = None
        try:
            for out in self.process.output():
                fd = self._outputs.get(out.stream)
                if fd is not None:
                    _write_all(fd, out.data, self._outputs, out.stream)
            exit = self.process.exit
        except BaseException as exc:
            error = exc
            log.warning("%s: stdio stream ended before the exit: %s", self.container_id, exc)
        finally:
            for fd in self._outputs.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._outputs = {}
            self._stop_stdin()
            if self._binary is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._binary.wait(BINARY_READY_TIMEOUT)
        try:
            self.on_done(exit, error)
        finally:
            self.done.set()

    # -- stdin --

    def _copy_stdin(self) -> None:
        fd = self._stdin_fd
        assert fd is not None
        attachment = self.process.attachment
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                events = selector.select()
                readable = {key.fd for key, _ in events}
                if fd in readable and self._forward(fd) is _Read.EOF:
                    # Linux polls an emptied FIFO readable for ever once its writer has gone.
                    selector.unregister(fd)
                if self._wake_r in readable:
                    os.read(self._wake_r, 64)
                    if self._stdin_closing.is_set():
                        self._drain(fd)  # CloseIO: what was written before it, then EOF
                        break
                    if self._started.is_set() and self._own_writer is None:
                        self._drain(fd)
                        break  # closed before Start: nobody will send CloseIO
        except Exception as exc:
            log.warning("%s: stdin copy stopped: %s", self.container_id, exc)
        finally:
            selector.close()
            with contextlib.suppress(Exception):
                if attachment is not None:
                    attachment.close_stdin()
            with self._stdin_lock:
                self._stdin_ended = True
                for end in (fd, self._own_writer):
                    if end is not None:
                        with contextlib.suppress(OSError):
                            os.close(end)

    def _drain(self, fd: int) -> None:
        """Forward what the FIFO holds now (up to an EOF, if its writer has gone)."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while poller.poll(0) and self._forward(fd) is _Read.MORE:
            pass

    def _forward(self, fd: int) -> _Read:
        """Copy one chunk from the FIFO to the process: MORE, EMPTY (nothing there now) or
        EOF. Only called once poll said readable: a FIFO no writer has opened yet reads as
        EOF too, but Linux polls it readable only once a writer has come (and data or its
        close with it)."""
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return _Read.EMPTY
        if not data:
            return _Read.EOF
        if self.process.attachment is not None:
            self.process.attachment.write_stdin(data)
        return _Read.MORE

    def _stop_stdin(self) -> None:
        if self._stdin_thread is not None and self._stdin_thread.is_alive():
            self._stdin_closing.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._stdin_thread.join(5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Read(enum.Enum):
    MORE = "more"
    EMPTY = "nothing there now"
    EOF = "eof"


def _writer_gone(fd: int) -> bool:
    """Whether a FIFO's writer has come and gone since we opened it (Linux says POLLHUP)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def open_stdin_fifo(path: str) -> int:
    """Read-only, so that the writer's close before Start is seen as an EOF; non-blocking, so
    that the open returns before containerd's end is open."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def _open_fifo(path: str) -> int:
    """Read-write and non-blocking: the open returns at once whether or not containerd's end is
    open yet, and reads say "nothing now" rather than EOF while nobody writes."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def _open_target(uri: str) -> int:
    if uri.startswith("file://"):
        path = urllib.parse.urlparse(uri).path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    fd = _open_fifo(uri.removeprefix("fifo://"))
    os.set_blocking(fd, True)  # a full pipe holds the writer: back-pressure, not loss
    return fd


def _write_all(fd: int, data: bytes, outputs: dict[str, int], stream: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:  # a logging binary that quit: nowhere to put it any more
            log.warning("%s reader went away; dropping the rest of it", stream)
            outputs.pop(stream, None)
            os.close(fd)
            return
        view = view[n:]
