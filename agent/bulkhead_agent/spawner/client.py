"""The agent's handle on the spawner: launch it, then ask from asyncio.

``Spawner.launch()`` forks the spawner and must run before the agent starts any thread (gRPC,
executors): fork() copies only the calling thread. The async methods then work from one
asyncio loop, which watches the socket with ``loop.add_reader``. Exit events arrive on
``Spawner.exits`` (an ``asyncio.Queue``), or go to ``on_exit`` if one is given.

A process with a terminal gets either a pty slave the caller made (``stdio=[slave]``), or,
with ``create_console``/``exec_console``, a pty the process makes inside the container,
from the container's own devpts, whose master comes back with the reply: only then does the
slave have a name in the container (``tty`` prints it).

Re-adoption. Launched with ``listen=PATH``, the spawner outlives an agent that dies: it keeps
its processes, their exit statuses and a duplicate of the agent's end of their stdio (``keep``
on create and exec), and waits on PATH for the next agent, which calls :meth:`Spawner.connect`
to get it all back (:class:`Adopted`). The agent then tells it when those duplicates are no
longer needed (:meth:`drop_stdin`, :meth:`release`, :meth:`forget`). Only :meth:`shutdown`
(or :meth:`close`) ends a listening spawner; the end of the connection alone does not.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
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


class AdoptionError(ConnectionError):
    """A spawner listens, but handing its processes over failed (or took too long)."""


class ExitEvent(NamedTuple):
    pid: int
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    container_id: str = ""
    exec_id: str = ""  # "" for a container's own process
    # Left false by the spawner: the agent decides from the cgroup's memory.events.
    oom_killed: bool = False


class Adopted(NamedTuple):
    """One process an adopted spawner reports, as the previous agent left it."""

    kind: str  # "container" (its own process) or "exec"
    container_id: str
    exec_id: str
    pid: int  # 0 while a PID-namespace child was still being made
    # "created" (held before exec), "running", "exited" (then ``exit``), "failed" (setup
    # or exec failed: ``error``), "starting" (a create, start or exec in progress)
    state: str
    exit: ExitEvent | None
    error: SpawnError | None
    fds: dict[str, int]  # the agent's ends of its stdio that were kept: now the caller's


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
        self._posted: set[asyncio.Task[dict[str, Any]]] = set()

    @classmethod
    def launch(
        cls, on_exit: Callable[[ExitEvent], None] | None = None, *, listen: str = ""
    ) -> Spawner:
        """Fork the spawner process (before any thread exists) and return its handle.

        The spawner imports what it needs after the fork, in parallel with the agent's own
        start-up, so the agent pays neither the time nor the memory for it. Requests sent
        before it is ready simply wait in the socket. With ``listen``, a socket path (its
        directory must exist), the spawner outlives this agent for the next one to adopt.
        """
        import threading

        if threading.active_count() > 1:
            raise RuntimeError("launch the spawner before starting any thread: fork() is unsafe")
        listener = _listen(listen) if listen else None
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
                server.run(theirs, listener)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        theirs.close()
        if listener is not None:
            listener.close()
        ours.setblocking(False)
        return cls(ours, pid, on_exit)

    @classmethod
    def connect(
        cls,
        path: str,
        *,
        timeout: float,
        on_exit: Callable[[ExitEvent], None] | None = None,
    ) -> tuple[Spawner, list[Adopted]] | None:
        """Adopt the spawner a previous agent left listening on ``path``.

        Returns None when none listens there (no socket, or a stale one: then it is removed);
        raises :class:`AdoptionError` when one answers but the hand-over fails. Blocking, at
        most ``timeout`` seconds: the spawner accepts only once it noticed the previous agent
        is gone, and only one agent at a time. Every fd in the returned records is the
        caller's.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            _remove_stale(path)
            return None
        except OSError as exc:
            sock.close()
            raise AdoptionError(f"cannot connect to the spawner at {path}: {exc}") from None
        adopted: list[Adopted] = []
        try:
            _check_peer(sock)
            protocol.send(sock, {"op": "adopt", "id": 1})
            while True:
                got = protocol.recv(sock)
                if got is None:
                    raise AdoptionError("the spawner closed the connection")
                message, fds = got
                if message.get("event") == "child":
                    adopted.append(_adopted(message, fds))
                elif message.get("id") == 1:
                    for fd in fds:
                        os.close(fd)
                    if not message.get("ok"):
                        error = message.get("error") or {}
                        raise AdoptionError(f"the spawner refused: {error.get('message', '')}")
                    pid = int(message["pid"])
                    break
                else:
                    for fd in fds:
                        os.close(fd)
        except BaseException as exc:
            sock.close()
            for record in adopted:
                for fd in record.fds.values():
                    os.close(fd)
            failed = (OSError, ValueError, KeyError, protocol.ProtocolError)
            if isinstance(exc, failed) and not isinstance(exc, AdoptionError):
                raise AdoptionError(f"adopting the spawner at {path}: {exc}") from None
            raise
        sock.setblocking(False)
        spawner = cls(sock, pid, on_exit)
        next(spawner._ids)  # 1 was the adoption's
        return spawner, adopted

    # --- requests --------------------------------------------------------------------------

    async def create(
        self,
        container_id: str,
        *,
        bundle: str,
        stdio: Sequence[int],
        spec: dict[str, Any] | None = None,
        cgroup: str = "",
        keep: Mapping[str, int] | None = None,
    ) -> int:
        """Create the container's process, held before exec; returns its pid.

        ``spec`` is the decoded config.json (read from ``bundle`` when None); ``stdio`` is
        3 fds (stdin, stdout, stderr) or one pty slave when ``process.terminal``; the caller
        keeps and closes its own copies. ``cgroup`` is a directory the process joins first.
        ``keep``: the caller's own ends of that stdio by name ("stdin", "stdout", "stderr",
        or "pty"), of which the spawner keeps duplicates for the next agent.
        """
        fields: dict[str, Any] = {"container_id": container_id, "bundle": bundle}
        if spec is not None:
            fields["spec"] = spec
        if cgroup:
            fields["cgroup"] = cgroup
        reply = await self._request("create", *_with_kept(fields, stdio, keep))
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
        keep: Mapping[str, int] | None = None,
    ) -> int:
        """Run ``process`` (an OCI process object) in a running container; returns its pid.
        ``keep`` as for :meth:`create`."""
        fields = {"container_id": container_id, "process": process, "exec_id": exec_id}
        reply = await self._request("exec", *_with_kept(fields, stdio, keep))
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

    async def run_hooks(
        self, kind: str, hooks: list[dict[str, Any]], state: dict[str, Any]
    ) -> None:
        """Run OCI hooks of ``kind`` (poststart, poststop) in the runtime's namespaces, in
        order, ``state`` on their stdin: a fork of the spawner does (see ``oci.hooks``).
        Returns when they are done; SpawnError names the first that failed."""
        await self._request("hooks", {"kind": kind, "hooks": hooks, "state": state})

    async def drop_stdin(self, container_id: str, exec_id: str = "") -> None:
        """Close the kept stdin of a process: the caller closed its own, EOF must get there."""
        await self._request("drop_stdin", {"container_id": container_id, "exec_id": exec_id})

    async def release(self, container_id: str, exec_id: str = "") -> None:
        """Close every kept stdio fd of a process whose output the caller read to its end."""
        await self._request("release", {"container_id": container_id, "exec_id": exec_id})

    async def forget(self, container_id: str) -> None:
        """Drop the records of a removed container (its processes have all been reaped)."""
        await self._request("forget", {"container_id": container_id})

    async def discard(self, container_id: str) -> None:
        """SIGKILL every process of a container, then forget it: one nobody knows about."""
        await self._request("discard", {"container_id": container_id})

    def post(self, op: str, **fields: Any) -> None:
        """A request whose answer nobody waits for (drop_stdin, release from sync code)."""
        loop = self._attach()
        task = loop.create_task(self._request(op, fields))
        self._posted.add(task)
        task.add_done_callback(self._posted_done)

    def _posted_done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self._posted.discard(task)
        if not task.cancelled() and task.exception() is None:
            _close_fds(task.result())
        # else: the spawner is gone, or the process already forgotten; nothing to keep then

    def listen(self) -> None:
        """Take events from now on, before any request (an adopted spawner sends exits)."""
        self._attach()

    # --- ending ----------------------------------------------------------------------------

    async def shutdown(self, *, kill: bool = True) -> None:
        """Ask the spawner to exit (SIGKILLing its processes first if ``kill``); then call
        :meth:`close`. Without ``kill`` the containers keep running, re-parented to init."""
        await self._request("shutdown", {"kill": kill})

    def detach(self) -> None:
        """Let go without a word (the agent is failing): a listening spawner keeps every
        process for the next agent; one that does not listen exits, leaving them running."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock)
        self._loop = None
        self._gone = True
        self.sock.close()
        self._fail_pending()

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
LISTEN_BACKLOG = 4  # one agent at a time; more only while an old one is still being noticed


def _listen(path: str) -> socket.socket:
    """The spawner's listening socket at ``path``, 0600 from the start (bound under a
    0177 umask), replacing a stale socket there."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(LISTEN_BACKLOG)
    return sock


def _remove_stale(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _check_peer(sock: socket.socket) -> None:
    """Refuse a socket made by another user. (Its pid is not the spawner's: a listening
    socket's credentials are those of whoever called listen(), the agent that launched it.)"""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.geteuid():
        raise AdoptionError(f"the spawner socket belongs to uid {uid}, not us")


def _adopted(message: dict[str, Any], fds: list[int]) -> Adopted:
    names = message.get("fds") or []
    if len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise protocol.ProtocolError(f"child: {len(fds)} fds for {names!r}")
    exit_ = None
    if message.get("state") == "exited":
        exit_ = ExitEvent(
            pid=int(message.get("pid") or 0),
            exit_code=message.get("exit_code"),
            signal=message.get("signal"),
            container_id=message.get("container_id", ""),
            exec_id=message.get("exec_id", ""),
        )
    error = None
    if message.get("error"):
        raw = message["error"]
        error = SpawnError(raw.get("step", ""), int(raw.get("errno", 0)), raw.get("message", ""))
    return Adopted(
        kind=message.get("kind", ""),
        container_id=message.get("container_id", ""),
        exec_id=message.get("exec_id", ""),
        pid=int(message.get("pid") or 0),
        state=message.get("state", ""),
        exit=exit_,
        error=error,
        fds=dict(zip(names, fds, strict=True)),
    )


def _with_kept(
    fields: dict[str, Any], stdio: Sequence[int], keep: Mapping[str, int] | None
) -> tuple[dict[str, Any], list[int]]:
    if not keep:
        return fields, list(stdio)
    fields["keep"] = list(keep)
    return fields, [*stdio, *keep.values()]


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
