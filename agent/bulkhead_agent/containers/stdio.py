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

Surviving the agent: the spawner keeps a duplicate of the agent's ends (``kept_fds``), so a
restarted agent gets them back (``adopted``) and reads on where the pipe is; the container
only blocks on a full pipe meanwhile. Since that duplicate of a stdin pipe's write end would
keep the process from ever seeing the end of its input, closing stdin calls
``on_stdin_closed`` (the manager tells the spawner to drop its copy). Each stream's numbering
is recorded as it goes (``offsets``), so that the next agent numbers on after it.
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
from .offsets import STDERR, STDOUT, Offsets

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
        offsets: Offsets | None = None,
        slot: int = STDOUT,
    ) -> None:
        self.fd = fd
        self.buffer = buffer
        self._on_change = on_change
        self._owns_fd = owns_fd  # a pty master is shared with the stdin side
        self._offsets = offsets if offsets is not None else Offsets()
        self._slot = slot
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
        size = min(room, READ_SIZE)
        # Should the agent die within the read, the next one numbers on after all of it.
        self._offsets[self._slot] = self.buffer.end + size
        try:
            data = os.read(self.fd, size)
        except BlockingIOError:
            self._offsets[self._slot] = self.buffer.end
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
        self._offsets[self._slot] = self.buffer.end
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

    def __init__(
        self,
        fd: int,
        on_change: Callable[[], None],
        *,
        terminal: bool,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.terminal = terminal
        self._on_change = on_change
        self._on_close = on_close  # a pipe's write end was closed (not called for a pty)
        self._loop = asyncio.get_running_loop()
        self._queue: deque[memoryview] = deque()
        self.pending = 0  # bytes accepted from the host, not yet written
        self.written = 0  # bytes written to the process so far (metrics)
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
            self.written += written
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
        closing = not self.closed and close_fd and not self.terminal and self.fd >= 0
        if closing:
            os.close(self.fd)
        self.closed = True
        if closing and self._on_close is not None:
            self._on_close()


class ProcessStdio:
    """The agent's side of one process's stdio, plus the fds to hand to the spawner.

    ``offsets_path``: where the streams' numbering is recorded (see ``offsets``). ``adopted``:
    the agent's ends that a spawner kept for a process a previous agent started (by name, as
    in :attr:`kept_fds`; a missing output end has reached its end), numbered on from the
    record at ``offsets_path``; no new pipes are made then.
    """

    def __init__(
        self,
        terminal: bool,
        on_change: Callable[[], None],
        *,
        console: bool = False,
        offsets_path: str = "",
        adopted: dict[str, int] | None = None,
    ) -> None:
        self.terminal = terminal
        self.offsets = Offsets(offsets_path, fresh=adopted is None)
        self.stdout = OutputBuffer(start=self.offsets[STDOUT])
        self.stderr = OutputBuffer(start=self.offsets[STDERR])
        self.child_fds: list[int] = []  # for the spawner; closed by close_child_fds()
        self.kept_fds: dict[str, int] = {}  # ours, of which the spawner keeps duplicates
        self.on_stdin_closed: Callable[[], None] | None = None
        self._master = -1
        opened: list[int] = []
        try:
            if adopted is not None:
                self._adopt(on_change, adopted)
            elif terminal:
                if not console:
                    self._master, slave = os.openpty()  # both close-on-exec (PEP 446)
                    opened += [self._master, slave]
                    os.set_blocking(self._master, False)
                    self.child_fds = [slave]
                    self.kept_fds = {"pty": self._master}
                self._terminal_ends(on_change)
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
                self.kept_fds = {"stdin": stdin_w, "stdout": out_r, "stderr": err_r}
                self._pipe_ends(on_change, stdin_w, out_r, err_r)
        except BaseException:
            for fd in opened:
                os.close(fd)
            self.offsets.close()
            raise

    def _terminal_ends(self, on_change: Callable[[], None]) -> None:
        self.out = OutputPipe(
            self._master, self.stdout, on_change, owns_fd=False, offsets=self.offsets
        )
        self.stderr.eof = True  # a terminal has one output stream
        self.err: OutputPipe | None = None
        self.stdin = StdinSink(self._master, on_change, terminal=True)

    def _pipe_ends(self, on_change: Callable[[], None], stdin: int, out: int, err: int) -> None:
        self.out = OutputPipe(out, self.stdout, on_change, offsets=self.offsets, slot=STDOUT)
        self.err = OutputPipe(err, self.stderr, on_change, offsets=self.offsets, slot=STDERR)
        self.stdin = StdinSink(stdin, on_change, terminal=False, on_close=self._stdin_closed)

    def _adopt(self, on_change: Callable[[], None], fds: dict[str, int]) -> None:
        for fd in fds.values():
            os.set_blocking(fd, False)  # ours were; a console master came blocking
        if self.terminal:
            self._master = fds.get("pty", -1)
            self._terminal_ends(on_change)
            if self._master < 0:  # released: the output had all been read
                self.out.finish()
                self.stdin.close()
            return
        self._pipe_ends(
            on_change, fds.get("stdin", -1), fds.get("stdout", -1), fds.get("stderr", -1)
        )
        for pipe in (self.out, self.err):
            if pipe is not None and pipe.fd < 0:
                pipe.finish()
        if self.stdin.fd < 0:  # closed by the previous agent, or the process ended
            self.stdin.close()

    def _stdin_closed(self) -> None:
        if self.on_stdin_closed is not None:
            self.on_stdin_closed()

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
        self.on_stdin_closed = None  # the spawner forgets the process as a whole
        self.stdin.close(close_fd=not self.terminal)
        self.out.finish()
        if self.err is not None:
            self.err.finish()
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        self.stdout.clear()
        self.stderr.clear()
        self.offsets.close()


def _grow_pipe(fd: int) -> None:
    # Above /proc/sys/fs/pipe-max-size (1 MiB by default) only root may go; the pipe is
    # charged to the agent's memory. A failure just leaves the default 64 KiB.
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
