"""The agent's handle on the spawner: launch it, then ask from asyncio.

``Spawner.launch()`` forks the spawner and must run before the agent starts any thread (gRPC,
executors): fork() copies only the calling thread. The async methods then work from one
asyncio loop, which watches the socket with ``loop.add_reader``. Exit events arrive on
``Spawner.exits`` (an ``asyncio.Queue``), or go to ``on_exit`` if one is given.

A process with a terminal gets either a pty slave the caller made (``stdio=[slave]``), or,
with ``create_console``/``exec_console``, a pty the process makes inside the container,
from the container's own devpts, whose master comes back with the reply: only then does the
slave have a name in the container (``tty`` prints it).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from . import protocol


class SpawnError(Exception):
    """A request failed: at setup ``step`` (or ``validate``, ``exec``, ...) with ``errno``."""

    def __init__(self, step: str, errno_: int, message: str) -> None:
        super().__init__(f"{step}: {message}" if step else message)
        self.step = step
        self.errno = errno_
        self.message = message


class SpawnerGone(ConnectionError):
    """The spawner process ended; every pending request fails with this."""


class ExitEvent(NamedTuple):
    pid: int
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    container_id: str = ""
    exec_id: str = ""  # "" for a container's own process
    # Left false by the spawner: the agent decides from the cgroup's memory.events.
    oom_killed: bool = False


class Spawner:
    def __init__(
        self,
        sock: socket.socket,
        pid: int,
        on_exit: Callable[[ExitEvent], None] | None = None,
    ) -> None:
        self.sock = sock
        self.pid = pid
        self.on_exit = on_exit
        self.exits: asyncio.Queue[ExitEvent] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone = False

    @classmethod
    def launch(cls, on_exit: Callable[[ExitEvent], None] | None = None) -> Spawner:
        """Fork the spawner process (before any thread exists) and return its handle.

        The spawner imports what it needs after the fork, in parallel with the agent's own
        start-up, so the agent pays neither the time nor the memory for it. Requests sent
        before it is ready simply wait in the socket.
        """
        import threading

        if threading.active_count() > 1:
            raise RuntimeError("launch the spawner before starting any thread: fork() is unsafe")
        ours, theirs = protocol.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ours.close()
                # Import at the lowest priority: on a one-vCPU guest the agent reaching
                # "ready" matters more than the spawner's imports. Back to normal before
                # serving, since containers inherit the spawner's priority.
                os.setpriority(os.PRIO_PROCESS, 0, 19)
                from . import server

                os.setpriority(os.PRIO_PROCESS, 0, 0)
                server.run(theirs)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(ours, pid, on_exit)

    # --- requests --------------------------------------------------------------------------

    async def create(
        self,
        container_id: str,
        *,
        bundle: str,
        stdio: Sequence[int],
        spec: dict[str, Any] | None = None,
        cgroup: str = "",
    ) -> int:
        """Create the container's process, held before exec; returns its pid.

        ``spec`` is the decoded config.json (read from ``bundle`` when None); ``stdio`` is
        3 fds (stdin, stdout, stderr) or one pty slave when ``process.terminal``; the caller
        keeps and closes its own copies. ``cgroup`` is a directory the process joins first.
        """
        fields: dict[str, Any] = {"container_id": container_id, "bundle": bundle}
        if spec is not None:
            fields["spec"] = spec
        if cgroup:
            fields["cgroup"] = cgroup
        reply = await self._request("create", fields, stdio)
        return int(reply["pid"])

    async def create_console(
        self, container_id: str, *, bundle: str, spec: dict[str, Any], cgroup: str = ""
    ) -> tuple[int, int]:
        """As :meth:`create` for a ``process.terminal`` spec, with the pty made inside the
        container (it needs a devpts there); returns (pid, pty master), the master is ours."""
        fields: dict[str, Any] = {
            "container_id": container_id,
            "bundle": bundle,
            "spec": spec,
            "console": True,
        }
        if cgroup:
            fields["cgroup"] = cgroup
        reply = await self._request("create", fields)
        return int(reply["pid"]), _console_of(reply)

    async def start(self, container_id: str) -> None:
        """Release a created container; returns once its exec succeeded (or raises)."""
        await self._request("start", {"container_id": container_id})

    async def exec(
        self,
        container_id: str,
        process: dict[str, Any],
        *,
        stdio: Sequence[int],
        exec_id: str = "",
    ) -> int:
        """Run ``process`` (an OCI process object) in a running container; returns its pid."""
        fields = {"container_id": container_id, "process": process, "exec_id": exec_id}
        reply = await self._request("exec", fields, stdio)
        return int(reply["pid"])

    async def exec_console(
        self, container_id: str, process: dict[str, Any], *, exec_id: str = ""
    ) -> tuple[int, int]:
        """As :meth:`exec` with a terminal made inside the container: (pid, pty master)."""
        fields = {
            "container_id": container_id,
            "process": process,
            "exec_id": exec_id,
            "console": True,
        }
        reply = await self._request("exec", fields)
        return int(reply["pid"]), _console_of(reply)

    async def signal(self, pid: int, signo: int) -> None:
        """Signal one of the spawner's processes (never a pid it has already reaped)."""
        await self._request("signal", {"pid": pid, "signal": int(signo)})

    async def ping(self) -> None:
        await self._request("ping", {})

    # --- ending ----------------------------------------------------------------------------

    async def shutdown(self, *, kill: bool = True) -> None:
        """Ask the spawner to exit (SIGKILLing its processes first if ``kill``); then call
        :meth:`close`. Without ``kill`` the containers keep running, re-parented to init."""
        await self._request("shutdown", {"kill": kill})

    def close(self, *, kill: bool = True, timeout: float = 5.0) -> None:
        """Stop the spawner (SIGKILLing its processes if ``kill``) and wait for it to exit."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock)
        self._loop = None
        if not self._gone:
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(timeout)
                protocol.send(self.sock, {"op": "shutdown", "id": 0, "kill": kill})
            except OSError:
                pass
        self._wait_exit(timeout)
        self.sock.close()
        self._fail_pending()

    def _wait_exit(self, timeout: float) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            pidfd = -1
        try:
            if pidfd >= 0 and not select.select([pidfd], [], [], timeout)[0]:
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    # --- plumbing --------------------------------------------------------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.sock)
            loop.add_reader(self.sock, self._on_readable)
            if self._loop is not None:
                # An asyncio.Queue belongs to the loop that first waited on it.
                old, self.exits = self.exits, asyncio.Queue()
                while not old.empty():
                    self.exits.put_nowait(old.get_nowait())
            self._loop = loop
        return loop

    async def _request(
        self, op: str, fields: dict[str, Any], fds: Sequence[int] = ()
    ) -> dict[str, Any]:
        loop = self._attach()
        if self._gone:
            raise SpawnerGone("the spawner has exited")
        request = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[request] = future
        try:
            await self._send({"op": op, "id": request, **fields}, fds)
            reply = await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                _close_fds(future.result())  # cancelled after the reply came: no leak
            raise
        finally:
            self._pending.pop(request, None)
        if not reply.get("ok"):
            _close_fds(reply)
            error = reply.get("error") or {}
            raise SpawnError(
                error.get("step", ""), int(error.get("errno", 0)), error.get("message", "")
            )
        return reply

    async def _send(self, message: dict[str, Any], fds: Sequence[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                protocol.send(self.sock, message, fds)
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self.sock, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.sock)
            except OSError as exc:
                raise SpawnerGone(f"the spawner has exited: {exc}") from None

    def _on_readable(self) -> None:
        while True:
            try:
                got = protocol.recv(self.sock)
            except BlockingIOError:
                return
            except (ConnectionError, protocol.ProtocolError):
                got = None
            if got is None:
                self._on_gone()
                return
            message, fds = got
            if message.get("event") == "exit":
                for fd in fds:
                    os.close(fd)
                self._deliver(message)
            elif "id" in message:
                message[_FDS] = fds  # a console master, for the caller
                future = self._pending.get(message["id"])
                if future is not None and not future.done():
                    future.set_result(message)
                else:
                    _close_fds(message)
            else:
                for fd in fds:
                    os.close(fd)

    def _deliver(self, message: dict[str, Any]) -> None:
        event = ExitEvent(
            pid=message["pid"],
            exit_code=message.get("exit_code"),
            signal=message.get("signal"),
            container_id=message.get("container_id", ""),
            exec_id=message.get("exec_id", ""),
        )
        if self.on_exit is not None:
            self.on_exit(event)
        else:
            self.exits.put_nowait(event)

    def _on_gone(self) -> None:
        self._gone = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock)
        self._fail_pending()

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SpawnerGone("the spawner has exited"))
        self._pending.clear()


_FDS = "$fds"  # where a reply carries the fds that came with it


def _close_fds(reply: dict[str, Any]) -> None:
    for fd in reply.pop(_FDS, ()):
        os.close(fd)


def _console_of(reply: dict[str, Any]) -> int:
    fds = reply.pop(_FDS, [])
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise SpawnError("console", 0, f"expected the console's pty master, got {len(fds)} fds")
    return fds[0]
