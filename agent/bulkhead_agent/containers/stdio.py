"""A process's stdio in the agent: pipes (or a pty), read and written by the asyncio loop.

Output: each stream's read end is watched with ``loop.add_reader`` only while its
:class:`~.buffer.OutputBuffer` has room; when it is full the agent stops reading, the pipe fills
and the process blocks in write(). Nothing is dropped; an acknowledgement makes room and
reading resumes.

Input: bytes from the host queue in :class:`StdinSink` and are written whenever the fd is
writable (``loop.add_writer``), so a process that does not read its stdin stalls the host's
stream (the Attach handler stops reading requests) instead of growing the queue.

With a terminal there is one pty: the master stays in the agent and carries both directions
(the process has the slave as stdin, stdout and stderr), so there is only stdout. Either the
agent makes the pty (from the guest's devpts) and hands the slave over, or, when the
container has a devpts of its own, the process makes it there during setup (so ``tty`` can
name it) and the master arrives with the spawner's reply: :meth:`ProcessStdio.attach_master`.
Until then stdin queues and nothing is read.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import termios
from collections import deque
from collections.abc import Callable

from .buffer import CHUNK, OutputBuffer

EOF_CHAR = b"\x04"  # ^D, the usual VEOF, when the terminal's own cannot be read
READ_SIZE = 4 * CHUNK  # per wake-up: fewer trips through the loop when the writer is fast
PIPE_SIZE = 1024 * 1024  # output pipes: room for a fast writer while the loop is busy


class OutputPipe:
    """Moves bytes from one fd into one buffer, pausing while the buffer is full."""

    def __init__(
        self,
        fd: int,
        buffer: OutputBuffer,
        on_change: Callable[[], None],
        *,
        owns_fd: bool = True,
    ) -> None:
        self.fd = fd
        self.buffer = buffer
        self._on_change = on_change
        self._owns_fd = owns_fd  # a pty master is shared with the stdin side
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self.resume()

    def resume(self) -> None:
        """Watch the fd again if there is room (after an acknowledgement)."""
        if not self._reading and not self.buffer.eof and self.buffer.room > 0 and self.fd >= 0:
            self._loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def _on_readable(self) -> None:
        room = self.buffer.room
        if room == 0:  # read(fd, 0) would look like the end of stream
            self._pause()
            return
        try:
            data = os.read(self.fd, min(room, READ_SIZE))
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: a pty master whose last slave closed, its end of stream.
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.finish()
        else:
            self.buffer.append(data)
            if self.buffer.room == 0:
                self._pause()
        self._on_change()

    def finish(self) -> None:
        """End of stream (or the process is forgotten): stop reading, close the fd."""
        self._pause()
        self.buffer.eof = True
        if self.fd >= 0 and self._owns_fd:
            os.close(self.fd)
        self.fd = -1


class StdinSink:
    """Writes the host's bytes to a process's stdin (a pipe or the pty master)."""

    def __init__(self, fd: int, on_change: Callable[[], None], *, terminal: bool) -> None:
        self.fd = fd
        self.terminal = terminal
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._queue: deque[memoryview] = deque()
        self.pending = 0  # bytes accepted from the host, not yet written
        self._eof_requested = False
        self._writing = False
        self.closed = False  # nothing more can reach the process

    def feed(self, data: bytes) -> None:
        if self.closed or not data:
            return  # the process closed its stdin or ended: nobody can read it any more
        if self._eof_requested and not self.terminal:
            return  # after stdin_eof a pipe is closed for good
        self._queue.append(memoryview(data))
        self.pending += len(data)
        self._flush()

    def end(self) -> None:
        """The host's stdin_eof.

        A pipe is closed once what was queued is written. A pty must stay open (closing the
        master would hang up the terminal), so it gets the terminal's EOF character, which a
        program reading in canonical mode sees as end of input at the start of a line, as
        when someone types ^D.
        """
        if self.closed:
            return
        if self.terminal:
            self.feed(self._eof_char())
            return
        self._eof_requested = True
        self._flush()

    def resume(self) -> None:
        """Write what is queued (the fd just arrived)."""
        self._flush()

    def _eof_char(self) -> bytes:
        try:
            char = termios.tcgetattr(self.fd)[6][termios.VEOF]
        except (termios.error, OSError, IndexError):
            return EOF_CHAR
        return char if isinstance(char, bytes) and char else EOF_CHAR

    def _flush(self) -> None:
        if self.fd < 0:
            return  # the pty master has not arrived yet
        while self._queue:
            view = self._queue[0]
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                if not self._writing:
                    self._loop.add_writer(self.fd, self._flush)
                    self._writing = True
                return
            except OSError:
                # EPIPE (the reader is gone) or EIO (the pty's slave is gone): what is left
                # can never be read; drop it rather than hold the host's stream forever.
                self.close()
                self._on_change()
                return
            self.pending -= written
            if written == len(view):
                self._queue.popleft()
            else:
                self._queue[0] = view[written:]
            self._on_change()
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        if self._eof_requested and not self.terminal:
            self.close()

    def close(self, *, close_fd: bool = True) -> None:
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        self._queue.clear()
        self.pending = 0
        if not self.closed and close_fd and not self.terminal and self.fd >= 0:
            os.close(self.fd)
        self.closed = True


class ProcessStdio:
    """The agent's side of one process's stdio, plus the fds to hand to the spawner."""

    def __init__(
        self, terminal: bool, on_change: Callable[[], None], *, console: bool = False
    ) -> None:
        self.terminal = terminal
        self.stdout = OutputBuffer()
        self.stderr = OutputBuffer()
        self.child_fds: list[int] = []  # for the spawner; closed by close_child_fds()
        self._master = -1
        opened: list[int] = []
        try:
            if terminal:
                if not console:
                    self._master, slave = os.openpty()  # both close-on-exec (PEP 446)
                    opened += [self._master, slave]
                    os.set_blocking(self._master, False)
                    self.child_fds = [slave]
                self.out = OutputPipe(self._master, self.stdout, on_change, owns_fd=False)
                self.stderr.eof = True  # a terminal has one output stream
                self.err: OutputPipe | None = None
                self.stdin = StdinSink(self._master, on_change, terminal=True)
            else:
                stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
                opened += [stdin_r, stdin_w]
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                opened += [out_r, out_w]
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                opened += [err_r, err_w]
                # O_NONBLOCK lives on the open file description: set on our ends only, the
                # process's ends stay blocking, as programs expect.
                for fd in (stdin_w, out_r, err_r):
                    os.set_blocking(fd, False)
                for fd in (out_r, err_r):
                    _grow_pipe(fd)
                self.child_fds = [stdin_r, out_w, err_w]
                self.out = OutputPipe(out_r, self.stdout, on_change)
                self.err = OutputPipe(err_r, self.stderr, on_change)
                self.stdin = StdinSink(stdin_w, on_change, terminal=False)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise

    def attach_master(self, master: int) -> None:
        """The pty master the process made in its container (console mode)."""
        os.set_blocking(master, False)
        self._master = self.out.fd = self.stdin.fd = master
        self.out.resume()
        self.stdin.resume()  # writes what queued meanwhile

    def abandon(self) -> None:
        """The process never got its stdio (it failed to start before making its console):
        there is no output to wait for."""
        if self.terminal and self._master < 0:
            self.out.finish()
            self.stdin.close()

    @property
    def eof(self) -> bool:
        """Both output streams ended: everything the process wrote is in the buffers."""
        return self.stdout.eof and self.stderr.eof

    def buffer(self, name: str) -> OutputBuffer:
        return self.stdout if name == "stdout" else self.stderr

    def resume(self) -> None:
        self.out.resume()
        if self.err is not None:
            self.err.resume()

    @property
    def stalled(self) -> bool:
        """Some output stream is full: only an acknowledgement lets the process go on."""
        return any(b.room == 0 and not b.eof for b in (self.stdout, self.stderr))

    def close_child_fds(self) -> None:
        """Our copies of the process's ends: closed once the spawner has its own."""
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds = []

    def resize(self, rows: int, cols: int) -> None:
        # The kernel sends SIGWINCH to the terminal's foreground process group.
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    @property
    def master_open(self) -> bool:
        return self._master >= 0

    def output_done(self) -> None:
        """After the end of output: with a pty, nothing can be written or resized any more."""
        if self.terminal and self.eof and self._master >= 0:
            self.stdin.close(close_fd=False)
            os.close(self._master)
            self._master = -1

    def close(self) -> None:
        """Forget everything: stop watching, close every fd, free the buffers."""
        self.close_child_fds()
        self.stdin.close(close_fd=not self.terminal)
        self.out.finish()
        if self.err is not None:
            self.err.finish()
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        self.stdout.clear()
        self.stderr.clear()


def _grow_pipe(fd: int) -> None:
    # Above /proc/sys/fs/pipe-max-size (1 MiB by default) only root may go; the pipe is
    # charged to the agent's memory. A failure just leaves the default 64 KiB.
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
