"""The virtio-serial port carrying the mux: open, read, write, and wait for the host.

A virtio-serial port whose host side is not connected reads 0 at once and polls
as POLLHUP (see HOST-NOTES), so it cannot simply stay registered with the event
loop: it would wake it forever. On a read of 0 the session is dropped, the fd is
taken off the loop and re-armed by a timer that backs off from 10 ms to 200 ms,
which keeps an idle agent near zero CPU and still answers a new host's HELLO
within a fifth of a second.

The bridge works on any file descriptor: ``BULKHEAD_SERIAL_DEVICE`` may name a
character device, a fifo, or a unix stream socket (connected to; native tests
play the host on it). For a socket, a read of 0 means the peer closed, so it is
closed and connected again on the same back-off.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import stat
from collections import deque

from bulkhead_agent.bridge.mux_session import MuxSession
from bulkhead_init.log import Logger

SYS_PORTS = "/sys/class/virtio-ports"
READ_SIZE = 64 * 1024
READS_PER_WAKEUP = 16  # bounded, so one busy port cannot starve the other connections
BACKOFF_MIN_S = 0.010
BACKOFF_MAX_S = 0.200
_IOV_BATCH = 64


def find_port(name: str, sys_dir: str = SYS_PORTS) -> str | None:
    """The ``/dev/vportNpM`` path of the virtio-serial port called ``name``, if any.

    There is no udev in the guest, so no ``/dev/virtio-ports/<name>`` link: the
    name is only in sysfs.
    """
    try:
        ports = sorted(p for p in os.listdir(sys_dir) if p.startswith("vport"))
    except OSError:
        return None
    for port in ports:
        name_file = os.path.join(sys_dir, port, "name")
        try:
            with open(name_file) as f:
                found = f.read().strip()
        except OSError:
            continue
        if found == name:
            return "/dev/" + port
    return None


class SerialBridge:
    def __init__(
        self, path: str, socket_path: str, log: Logger, raw_socket_path: str | None = None
    ) -> None:
        self.path = path
        self._log = log
        self.session = MuxSession(self, socket_path, log, raw_socket_path)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._sock: socket.socket | None = None  # set when the path is a unix socket
        self._armed = False  # the fd is registered for reading; output is accepted
        self._writing = False  # the fd is registered for writing
        self._out: deque[bytes] = deque()
        self._out_off = 0  # bytes of _out[0] already written
        self._backoff = BACKOFF_MIN_S
        self._timer: asyncio.TimerHandle | None = None
        self._host_present = False  # data was read since the last hang-up (for the log)
        self._open_error_logged = False
        self._closed = False

    def start(self) -> bool:
        self._loop = asyncio.get_running_loop()
        self._log.info(f"serial: mux on {self.path}")
        self._try_open()
        return True

    def stop_accepting(self) -> None:
        # New connections already fail once the gRPC server stops listening;
        # open ones keep flowing so in-flight calls can finish during the grace.
        pass

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._disarm()
        self.session.reset()
        self._close_fd()

    # -- Port (used by the session) ------------------------------------------

    def send(self, frame: bytes) -> None:
        if not self._armed:
            return  # no host session: nothing to send to
        self._out.append(frame)
        if not self._writing:
            self._flush()

    def discard_output(self) -> None:
        """Drop queued frames of the old session, except the rest of a half-written one."""
        head = self._out[0] if self._out and self._out_off else None
        self._out.clear()
        if head is not None:
            self._out.append(head)  # cutting it short would corrupt the new session's stream
        else:
            self._out_off = 0

    # -- opening and waiting for the host -------------------------------------

    def _try_open(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self._fd < 0:
            try:
                self._open()
            except OSError as exc:
                if not self._open_error_logged:
                    self._log.warning(f"serial: cannot open {self.path}: {exc}; retrying")
                    self._open_error_logged = True
                self._retry_later()
                return
            if self._open_error_logged:
                self._log.info(f"serial: opened {self.path}")
                self._open_error_logged = False
            opened = True
        else:
            opened = False  # a device whose host went away: same fd, same session
        assert self._loop is not None
        self._loop.add_reader(self._fd, self._on_readable)
        self._armed = True
        if opened:
            self.session.begin()

    def _open(self) -> None:
        if stat.S_ISSOCK(os.stat(self.path).st_mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(1.0)  # a local connect; only a full backlog would wait
                sock.connect(self.path)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self._sock, self._fd = sock, sock.fileno()
        else:
            flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            self._fd = os.open(self.path, flags)

    def _close_fd(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._sock, self._fd = None, -1

    def _disarm(self) -> None:
        if self._loop is not None and self._fd >= 0:
            if self._armed:
                self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._armed = self._writing = False

    def _retry_later(self) -> None:
        assert self._loop is not None
        delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX_S)
        self._timer = self._loop.call_later(delay, self._try_open)

    def _hang_up(self, why: str, reopen: bool) -> None:
        """The host is gone (or the fd broke): end the session, try again later."""
        self._disarm()
        self._out.clear()
        self._out_off = 0
        self.session.reset()
        if self._host_present:
            self._log.info(f"serial: {why}; waiting for the host")
            self._host_present = False
        if reopen:
            self._close_fd()
        self._retry_later()

    # -- I/O -----------------------------------------------------------------

    def _on_readable(self) -> None:
        fd = self._fd
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._hang_up(f"read error: {exc}", reopen=True)
                return
            if not data:
                # Device: no host on the chardev (the fd stays open). Socket: peer closed.
                self._hang_up("host went away", reopen=self._sock is not None)
                return
            if not self._host_present:
                self._host_present = True
                self._log.info("serial: host connected")
            self._backoff = BACKOFF_MIN_S
            self.session.feed(data)
            if not self._armed or self._fd != fd:
                return  # a write error inside feed() hung up

    def _flush(self) -> None:
        out = self._out
        while out:
            bufs: list[bytes | memoryview] = list(itertools.islice(out, _IOV_BATCH))
            if self._out_off:
                bufs[0] = memoryview(bufs[0])[self._out_off :]
            try:
                n = os.writev(self._fd, bufs)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._hang_up(f"write error: {exc}", reopen=True)
                return
            while n:
                left = len(out[0]) - self._out_off
                if n < left:
                    self._out_off += n
                    break
                n -= left
                out.popleft()
                self._out_off = 0
        assert self._loop is not None
        if out and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not out and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
