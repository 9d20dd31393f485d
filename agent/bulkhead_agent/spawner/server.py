"""The spawner's loop: fork container and exec processes, hold them until start, reap them.

Single-threaded on purpose (DESIGN decision 4): fork() copies only the calling thread, and
setns() into a mount or user namespace refuses multi-threaded callers. Everything a child
needs is imported before the loop starts, so a fork costs about a millisecond.

Each child gets a private socketpair (its "channel"), close-on-exec on the child's side. The
child reports on it ("pid" of its PID-namespace child, "userns" to have its id maps written,
"ready" when held before exec, "error" when a setup step or exec failed) and reads "start"
from it. End of stream without an error means every holder exec'd: the process started.
That is the classic exec-succeeded pipe, and it is what tells a failure to start (a reply
with ok=false) from an exit (an ``exit`` event).

The spawner is a child subreaper: container processes whose intermediate parent exits (the
PID-namespace fork) come back to it, and it reaps every child, reporting an ``exit`` event for
each container or exec process once it is reaped.

Outliving the agent (DESIGN decision 5). The spawner keeps a record of every process it forked,
with its exit status once reaped, until the agent forgets the container; and a duplicate of the
agent's end of each process's stdio (it never reads them), until the agent releases them. When
the agent's connection ends without a ``shutdown`` request, the agent died: the spawner carries
on reaping, and accepts one connection on its listening socket (``<run dir>/spawner.sock``),
from a process of its own user and mount namespace (containers have their own), that must
``adopt`` first: the reply lists every record, each with its stdio fds. Replies to requests of
an earlier connection are dropped, and no event goes out before ``adopt``; a reaped process's
status waits in its record, so no exit is lost in between.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..linux import mounts, namespaces, prctl
from ..linux.libc import libc
from ..oci import hooks, setup
from ..oci.spec import Process, Spec, SpecError, load, parse, parse_process
from . import protocol

# Lifecycle of a child record.
CREATING = "creating"  # forked, setting up (create)
CREATED = "created"  # held before exec, waiting for start
STARTING = "starting"  # released (or exec): waiting for exec to succeed or fail
RUNNING = "running"  # exec succeeded; an exit event follows when it is reaped
FAILED = "failed"  # setup or exec failed and was reported; its exit is not an event
DIED = "died"  # ended during setup without a word; the reply waits for its exit status

SHUTDOWN_TIMEOUT = 5.0
NEW_PID_NAMESPACE = "new"
# A request as (connection serial, its id): a reply goes out only on the connection that asked.
Request = tuple[int, Any]


class RequestError(Exception):
    def __init__(self, step: str, errno_: int, message: str) -> None:
        super().__init__(message)
        self.error = {"step": step, "errno": errno_, "message": message}


class Child:
    """One process the spawner forked, from fork until it is reaped."""

    __slots__ = (
        "cgroup",
        "channel",
        "console",
        "container_id",
        "error",
        "helper",
        "hooks_waiting",
        "kept",
        "kind",
        "name",
        "pid",
        "ready",
        "request",
        "spec",
        "state",
        "status",
    )

    def __init__(
        self,
        kind: str,  # "container" or "exec"
        name: str,  # container id, or exec id
        channel: socket.socket,
        pid: int | None,  # the process itself; None until a PID-namespace child is named
        helper: int | None,  # the intermediate parent of that PID-namespace child
        request: Request,  # the request whose reply waits on this child
    ) -> None:
        self.kind = kind
        self.name = name
        self.channel: socket.socket | None = channel
        self.pid = pid
        self.helper = helper
        self.request = request
        self.state = CREATING
        self.ready = False
        self.spec: Spec | None = None
        self.cgroup = ""
        self.status: int | None = None  # wait status, once reaped
        self.console = -1  # the pty master the child made in the container, until replied
        self.container_id = name if kind == "container" else ""
        # The agent's ends of this process's stdio ("stdin", "stdout", "stderr" or "pty"),
        # duplicates kept for the agent that comes after this one; never read here.
        self.kept: dict[str, int] = {}
        self.error: dict[str, Any] | None = None  # why setup or exec failed, when it did
        self.hooks_waiting: dict[str, Any] | None = None  # createRuntime asked before "pid"


def run(sock: socket.socket, listener: socket.socket | None = None) -> None:
    """Serve requests on ``sock`` until the agent asks for shutdown.

    Without ``listener`` the end of ``sock`` ends the spawner too (its processes carry on,
    re-parented); with one, a new agent may connect there and adopt them.
    """
    Server(sock, listener).serve()


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class Server:
    def __init__(self, sock: socket.socket, listener: socket.socket | None = None) -> None:
        self.sock: socket.socket | None = sock  # the agent's connection, while there is one
        self.listener = listener
        self.serial = 1  # of the current connection
        self.adopted = True  # the current connection may get events (the first one at once)
        self.stopping = False  # a shutdown was asked for: the end of the connection is ours
        # Every container or exec process forked, by container id, until the agent forgets it.
        self.records: dict[str, list[Child]] = {}
        self.selector = selectors.DefaultSelector()
        self.by_channel: dict[int, Child] = {}
        self.by_pid: dict[int, Child] = {}
        self.helpers: dict[int, Child] = {}
        self.containers: dict[str, Child] = {}
        self.running = True
        self.no_pivot = False
        self.wakeup_r = self.wakeup_w = -1
        self.own_pid_ns = -1

    # --- the loop --------------------------------------------------------------------------

    def serve(self) -> None:
        self._prepare()
        while self.running:
            for key, _events in self.selector.select():
                # Handling one event can close another ready fd (a reaped child's channel,
                # drained early) or even reuse its number: skip keys no longer registered.
                if self.selector.get_map().get(key.fd) is not key:
                    continue
                try:
                    key.data()
                except Exception:
                    # A bug here must not end the spawner: it reaps every container and
                    # holds their exit statuses. Say so on stderr (the guest console).
                    traceback.print_exc()
                if not self.running:
                    break
        self._close_listener()

    def _close_listener(self) -> None:
        """Asked to stop: no agent may find this spawner any more."""
        if self.listener is None:
            return
        path = self.listener.getsockname()
        if isinstance(path, str) and path:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.listener.close()
        self.listener = None

    def _prepare(self) -> None:
        # The agent handles Ctrl-C and shutdown; the spawner only ends with its socket.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Nor may the agent's end take us along (its session, should it ever have a terminal).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        prctl.set_child_subreaper()
        libc()  # loaded now, so that no child ever loads it after fork
        self.no_pivot = mounts.root_is_initramfs()
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda _signo, _frame: None)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        assert self.sock is not None
        self.sock.setblocking(True)
        self.selector.register(self.sock, selectors.EVENT_READ, self._on_request)
        if self.listener is not None:
            self.listener.setblocking(False)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, self._on_sigchld)
        # Objects that exist now are never freed: forked children then do not dirty (copy)
        # the pages the collector would touch.
        import gc

        gc.freeze()

    # --- requests --------------------------------------------------------------------------

    def _on_request(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            got = protocol.recv(sock)
        except protocol.ProtocolError as exc:
            self._send({"event": "error", "message": str(exc)})
            return
        except OSError:
            got = None  # ECONNRESET: gone as well
        if got is None:
            self._lose_agent()
            return
        message, fds = got
        request: Request = (self.serial, message.get("id"))
        handler = {
            "create": self._create,
            "start": self._start,
            "exec": self._exec,
            "signal": self._signal,
            "shutdown": self._shutdown,
            "adopt": self._adopt,
            "drop_stdin": self._drop_stdin,
            "release": self._release,
            "forget": self._forget,
            "discard": self._discard,
            "hooks": self._hooks,
            "ping": lambda _m, _f: {},
        }.get(message.get("op", ""))
        try:
            if handler is None:
                raise RequestError("request", errno.EINVAL, f"unknown op {message.get('op')!r}")
            if not self.adopted and message.get("op") not in ("adopt", "ping"):
                raise RequestError("request", errno.EPERM, "adopt first")
            result = handler(message, fds)
            if result is not None:
                self._reply(request, True, **result)
        except RequestError as exc:
            self._reply(request, False, error=exc.error)
        except SpecError as exc:
            self._reply(request, False, error=_error("validate", errno.EINVAL, str(exc)))
        except OSError as exc:
            self._reply(request, False, error=_error("spawn", exc.errno or 0, str(exc)))
        except Exception as exc:  # a bad request must not end the spawner
            message = f"{type(exc).__name__}: {exc}"
            self._reply(request, False, error=_error("request", errno.EINVAL, message))
        finally:
            for fd in fds:
                os.close(fd)  # the child has its copies; kept ones were taken off the list

    # --- the agent's connection ------------------------------------------------------------

    def _lose_agent(self) -> None:
        """The agent's connection ended: without a shutdown, wait for the next agent."""
        if self.sock is None:
            return
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None
        if self.stopping or self.listener is None:
            self.running = False  # running containers carry on, re-parented
            return
        self.adopted = False
        self.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        alive = len(self.by_pid) + len(self.helpers)
        _say(f"the agent is gone; {alive} processes keep running until a new agent adopts them")

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _addr = self.listener.accept()  # close-on-exec, as Python makes all its fds
        except OSError:
            return  # the caller gave up already
        if self.sock is not None or not _trusted(conn):
            conn.close()
            return
        conn.setblocking(True)
        # Further connections wait in the backlog until this one is gone.
        self.selector.unregister(self.listener)
        self.serial += 1
        self.sock = conn
        self.selector.register(conn, selectors.EVENT_READ, self._on_request)

    def _adopt(self, _message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        """Every record, one ``child`` event each with its kept fds, then the reply."""
        if self.adopted:
            raise RequestError("adopt", errno.EINVAL, "this connection has adopted already")
        count = 0
        for children in self.records.values():
            for child in children:
                if self.sock is None:
                    return {}
                self._send({"event": "child", **_describe(child)}, list(child.kept.values()))
                count += 1
        self.adopted = True
        _say(f"a new agent adopted {count} processes")
        return {"pid": os.getpid(), "children": count}

    def _create(self, message: dict[str, Any], fds: list[int]) -> None:
        container_id = _string(message, "container_id")
        if container_id in self.containers:
            raise RequestError("create", errno.EEXIST, f"container {container_id!r} exists")
        bundle = _string(message, "bundle")
        if "spec" in message:
            spec = parse(message["spec"])
        else:
            spec = load(os.path.join(bundle, "config.json"))
        console = bool(message.get("console"))
        stdio, kept = _split_kept(message, fds)
        _check_stdio(spec.process, stdio, console)
        if spec.linux.seccomp is not None:
            _import_seccomp()
        rootfs = spec.root.path
        if not rootfs.startswith("/"):
            rootfs = os.path.join(bundle, rootfs)
        ctx = setup.Context(
            process=spec.process,
            stdio=stdio,
            spec=spec,
            bundle=bundle,
            rootfs=os.path.realpath(rootfs),
            cgroup=message.get("cgroup") or "",
            seccomp=spec.linux.seccomp,
            no_pivot=self.no_pivot,
            hold=True,
            console=console,
            container_id=container_id,
        )
        pid_ns = spec.linux.namespace("pid")
        pid_ns_path = ""
        if pid_ns is not None:
            if spec.linux.namespace("user") is not None:
                # The PID namespace must belong to the container's user namespace (or /proc
                # cannot be mounted in it): the child makes it after the user namespace,
                # then forks once more.
                ctx.fork_for_pid_ns = True
            else:
                pid_ns_path = pid_ns.path or NEW_PID_NAMESPACE
                ctx.pid_ns_ready = True
        token = self._token(message)
        child = self._fork(
            ctx, setup.CREATE_STEPS, "container", container_id, token, pid_ns_path, kept.values()
        )
        child.spec = spec
        child.cgroup = ctx.cgroup
        self.containers[container_id] = child
        self.records.setdefault(container_id, []).append(child)
        child.kept = _take_kept(kept, fds)
        return None  # replied once the child is ready (or failed)

    def _start(self, message: dict[str, Any], _fds: list[int]) -> None:
        container_id = _string(message, "container_id")
        child = self.containers.get(container_id)
        if child is None or child.state != CREATED:
            state = child.state if child else "unknown"
            raise RequestError("start", errno.EINVAL, f"container {container_id!r} is {state}")
        assert child.channel is not None
        try:
            protocol.send(child.channel, {"start": True})
        except OSError as exc:
            raise RequestError("start", exc.errno or 0, "container process is gone") from None
        child.state = STARTING
        child.request = self._token(message)
        return None  # replied when exec succeeded or failed

    def _exec(self, message: dict[str, Any], fds: list[int]) -> None:
        container_id = _string(message, "container_id")
        container = self.containers.get(container_id)
        if container is None or container.state not in (CREATED, RUNNING) or not container.pid:
            raise RequestError("exec", errno.ESRCH, f"container {container_id!r} is not running")
        process = parse_process(message.get("process"), "process")
        console = bool(message.get("console"))
        stdio, kept = _split_kept(message, fds)
        _check_stdio(process, stdio, console)
        target = container.pid
        assert container.spec is not None
        ctx = setup.Context(
            process=process,
            stdio=stdio,
            cgroup=container.cgroup,
            seccomp=container.spec.linux.seccomp,
            join_pid=target,
            console=console,
        )
        pid_ns_path = "" if _same_namespace(target, "pid") else f"/proc/{target}/ns/pid"
        exec_id = message.get("exec_id") or ""
        token = self._token(message)
        child = self._fork(
            ctx, setup.EXEC_STEPS, "exec", exec_id, token, pid_ns_path, kept.values()
        )
        child.state = STARTING
        child.container_id = container_id
        self.records.setdefault(container_id, []).append(child)
        child.kept = _take_kept(kept, fds)
        return None  # replied when exec succeeded or failed

    def _signal(self, message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        pid = message.get("pid")
        signo = message.get("signal")
        if not isinstance(signo, int) or isinstance(signo, bool):
            raise RequestError("signal", errno.EINVAL, "signal must be an integer")
        # Only our own, not yet reaped, processes: a reaped pid may belong to anyone by now.
        if pid not in self.by_pid:
            raise RequestError("signal", errno.ESRCH, f"no such process {pid!r}")
        os.kill(pid, signo)
        return {}

    def _shutdown(self, message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        if message.get("kill"):
            self._kill_all()
        self.running = False
        self.stopping = True
        return {}

    # --- records and kept stdio ------------------------------------------------------------

    def _token(self, message: dict[str, Any]) -> Request:
        return (self.serial, message.get("id"))

    def _record(self, message: dict[str, Any]) -> Child:
        container_id = _string(message, "container_id")
        exec_id = message.get("exec_id") or ""
        for child in reversed(self.records.get(container_id, ())):
            if exec_id and child.kind == "exec" and child.name == exec_id:
                return child
            if not exec_id and child.kind == "container":
                return child
        raise RequestError("request", errno.ESRCH, f"no process {container_id}/{exec_id}")

    def _drop_stdin(self, message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        """The agent closed the process's stdin: so must we, or it never sees the end."""
        _close_kept(self._record(message), ("stdin",))
        return {}

    def _release(self, message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        """The agent read the process's output to its end: nothing is left to keep."""
        _close_kept(self._record(message))
        return {}

    def _forget(self, message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        """The container was removed: drop its records (and whatever they still keep)."""
        for child in self.records.pop(_string(message, "container_id"), ()):
            _close_kept(child)
        return {}

    def _discard(self, message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        """SIGKILL every process of a container the agent does not know, then forget it."""
        container_id = _string(message, "container_id")
        for pid, child in (*self.by_pid.items(), *self.helpers.items()):
            if child.container_id == container_id:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self._forget(message, _fds)

    def _kill_all(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        while self.by_pid or self.helpers:
            for pid in (*self.by_pid, *self.helpers):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            select.select([self.wakeup_r], [], [], min(remaining, 0.1))
            self._on_sigchld()

    # --- OCI hooks in the runtime's namespaces (see oci.hooks) -------------------------------

    def _hooks(self, message: dict[str, Any], _fds: list[int]) -> None:
        """The agent's poststart or poststop hooks; replied once a forked runner has run them
        (never in this loop: a hook may take its time)."""
        kind = message.get("kind")
        state = message.get("state")
        if kind not in hooks.KINDS or not isinstance(state, dict):
            raise RequestError("request", errno.EINVAL, "hooks: needs a known kind and a state")
        try:
            todo = hooks.decode(message.get("hooks"))
        except ValueError as exc:
            raise RequestError("request", errno.EINVAL, f"hooks: {exc}") from None
        request = self._token(message)
        step = f"{hooks.KINDS[kind]}_hooks"

        def done(ok: bool, errno_: int, text: str) -> None:
            if ok:
                self._reply(request, True)
            else:
                self._reply(request, False, error=_error(step, errno_, text))

        self._run_hooks([(kind, todo)], state, done)
        return None

    def _child_hooks(self, child: Child, message: dict[str, Any]) -> None:
        """A container's process, its mounts made, waits for its prestart and createRuntime
        hooks; the state it sent lacks only its pid as the runtime sees it."""
        if child.pid is None:
            child.hooks_waiting = message  # the "pid" of its PID-namespace fork is on its way
            return
        assert child.spec is not None
        state = {**message.get("state", {}), "pid": child.pid}
        batches = [
            ("prestart", child.spec.hooks.prestart),
            ("createRuntime", child.spec.hooks.create_runtime),
        ]

        def done(ok: bool, errno_: int, text: str) -> None:
            if child.channel is None:
                return  # it ended meanwhile: its end tells the agent
            try:
                protocol.send(child.channel, {"hooks_done": ok, "errno": errno_, "message": text})
            except OSError:
                pass

        self._run_hooks(batches, state, done)

    def _run_hooks(
        self,
        batches: list[hooks.Batch],
        state: dict[str, Any],
        done: Callable[[bool, int, str], None],
    ) -> None:
        bundle = state.get("bundle")
        cwd = bundle if isinstance(bundle, str) and os.path.isdir(bundle) else "/"
        try:
            fd = hooks.start_runner(batches, state, cwd)
        except OSError as exc:
            done(False, exc.errno or 0, f"cannot fork a hook runner: {exc}")
            return

        def on_verdict() -> None:
            self.selector.unregister(fd)
            done(*hooks.read_verdict(fd))

        self.selector.register(fd, selectors.EVENT_READ, on_verdict)

    # --- children --------------------------------------------------------------------------

    def _fork(
        self,
        ctx: setup.Context,
        steps: tuple[setup.Step, ...],
        kind: str,
        name: str,
        request: Request,
        pid_ns_path: str = "",
        closing: Iterable[int] = (),
    ) -> Child:
        """Fork a child to run ``steps``; with ``pid_ns_path``, straight into that PID
        namespace (or a new one for ``NEW_PID_NAMESPACE``).

        A PID namespace only applies to the children of whoever enters it. Entering it here,
        for the one fork, saves the child a second fork (a few ms: most of a container's
        start). The spawner is single-threaded, so nothing else forks meanwhile. ``closing``:
        more fds of ours the child must not hold (the agent's stdio ends that we keep).
        """
        ours, theirs = protocol.socketpair()
        try:
            if pid_ns_path:
                self._enter_pid_namespace(pid_ns_path)
            try:
                pid = os.fork()
            except BaseException:
                self._leave_pid_namespace(pid_ns_path)
                raise
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            # Not _leave_pid_namespace here: the container's children belong in its namespace.
            self._child(ctx, steps, ours, theirs, closing)  # never returns
        self._leave_pid_namespace(pid_ns_path)
        theirs.close()
        child = Child(
            kind=kind,
            name=name,
            channel=ours,
            pid=None if ctx.fork_for_pid_ns else pid,
            helper=pid if ctx.fork_for_pid_ns else None,
            request=request,
        )
        if child.pid is not None:
            self.by_pid[pid] = child
        else:
            self.helpers[pid] = child
        self.by_channel[ours.fileno()] = child
        self.selector.register(ours, selectors.EVENT_READ, lambda: self._on_channel(child))
        return child

    def _enter_pid_namespace(self, path: str) -> None:
        try:
            if path == NEW_PID_NAMESPACE:
                namespaces.unshare(namespaces.CLONE_NEWPID)
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    namespaces.setns(fd, namespaces.CLONE_NEWPID)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise RequestError("enter_pid_namespace", exc.errno or 0, str(exc)) from None

    def _leave_pid_namespace(self, path: str) -> None:
        if not path:
            return
        try:
            # Our own PID namespace for our next children again.
            namespaces.setns(self.own_pid_ns, namespaces.CLONE_NEWPID)
        except OSError as exc:
            # Every later container would land in this one's namespace: better to stop,
            # which the agent sees as the end of the socket.
            os.write(2, f"spawner: cannot return to its PID namespace: {exc}\n".encode())
            os._exit(70)

    def _child(
        self,
        ctx: setup.Context,
        steps: tuple[setup.Step, ...],
        ours: socket.socket,
        theirs: socket.socket,
        closing: Iterable[int],
    ) -> None:
        code = 127
        try:
            # What is the spawner's must not stay open in a container, even until exec:
            # the agent would not see the spawner's end of the socket close, for one.
            signal.set_wakeup_fd(-1)
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            os.close(self.own_pid_ns)
            self.selector.close()
            for other in self.by_channel.values():
                if other.channel is not None:
                    other.channel.close()
            # Nor another process's stdio: a stdin write end held here would keep that
            # process from ever seeing the end of its input.
            for children in self.records.values():
                for other in children:
                    for fd in other.kept.values():
                        os.close(fd)
            for fd in closing:
                os.close(fd)
            if self.sock is not None:
                self.sock.close()
            if self.listener is not None:
                self.listener.close()
            ours.close()
            ctx.channel = protocol.Channel(theirs)
            try:
                setup.run_steps(steps, ctx)
            except setup.StepError as exc:
                ctx.channel.send({"error": exc.to_dict()})
        except BaseException as exc:
            try:
                theirs.send(_encode_error("spawn", exc))
            except BaseException:
                pass
        finally:
            os._exit(code)

    def _on_channel(self, child: Child) -> None:
        if child.channel is None:
            return  # already read to its end
        try:
            got = protocol.recv(child.channel)
        except (ConnectionResetError, protocol.ProtocolError):
            got = None
        if got is None:
            self._on_channel_closed(child)
            return
        message, fds = got
        if "console" in message and fds and child.console < 0:
            child.console = fds.pop(0)  # kept for the reply to the agent
            child.kept["pty"] = os.dup(child.console)  # and for the next agent
        for fd in fds:
            os.close(fd)
        if "pid" in message:
            pid = message["pid"]
            child.pid = pid
            self.by_pid[pid] = child
            self._settle_ready(child)
            if child.hooks_waiting is not None:
                waiting, child.hooks_waiting = child.hooks_waiting, None
                self._child_hooks(child, waiting)
        elif "hooks" in message:
            self._child_hooks(child, message)
        elif "userns" in message:
            self._write_id_maps(child)
        elif "ready" in message:
            child.ready = True
            self._settle_ready(child)
        elif "error" in message:
            child.state = FAILED
            child.error = message["error"]
            _close_kept(child)  # it never ran: there is no output to keep
            self._drop_console(child)
            self._reply(child.request, False, error=message["error"])
            self._close_channel(child)
            self._forget_container(child)

    def _settle_ready(self, child: Child) -> None:
        # With a PID-namespace fork, "ready" (from the grandchild) and "pid" (from its parent)
        # may arrive in either order; the reply needs both.
        if child.ready and child.pid is not None and child.state == CREATING:
            child.state = CREATED
            self._reply(child.request, True, self._take_console(child), pid=child.pid)

    def _write_id_maps(self, child: Child) -> None:
        assert child.spec is not None
        pid = child.helper or child.pid
        linux = child.spec.linux
        try:
            for name, ranges in (("uid_map", linux.uid_mappings), ("gid_map", linux.gid_mappings)):
                text = "".join(f"{r.container_id} {r.host_id} {r.size}\n" for r in ranges)
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(text)
            reply: dict[str, Any] = {"ok": True}
        except OSError as exc:
            reply = {"error": str(exc)}
        if child.channel is not None:
            try:
                protocol.send(child.channel, reply)
            except OSError:
                pass  # it died; its end of stream tells the rest

    def _on_channel_closed(self, child: Child) -> None:
        self._close_channel(child)
        if child.state == STARTING:
            # Every holder of the child's end exec'd: the process runs.
            child.state = RUNNING
            if child.kind == "exec":
                self._reply(child.request, True, self._take_console(child), pid=child.pid)
            else:
                self._reply(child.request, True)
        elif child.state == CREATED:
            child.state = RUNNING  # died while held; its exit event tells the agent
        elif child.state == CREATING:
            child.state = DIED
            self._forget_container(child)
            if child.status is not None:
                self._reply_died(child)

    def _take_console(self, child: Child) -> list[int]:
        """The console master for a reply (which closes it once sent), if there is one."""
        fd, child.console = child.console, -1
        return [fd] if fd >= 0 else []

    def _drop_console(self, child: Child) -> None:
        if child.console >= 0:
            os.close(child.console)
            child.console = -1

    def _close_channel(self, child: Child) -> None:
        if child.channel is not None:
            self.selector.unregister(child.channel)
            self.by_channel.pop(child.channel.fileno(), None)
            child.channel.close()
            child.channel = None

    def _drain(self, child: Child) -> None:
        """Read what a child left on its channel; the caller knows it has ended."""
        while child.channel is not None:
            self._on_channel(child)

    def _forget_container(self, child: Child) -> None:
        if child.kind == "container" and self.containers.get(child.name) is child:
            del self.containers[child.name]

    # --- reaping ---------------------------------------------------------------------------

    def _on_sigchld(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        helper_of = self.helpers.pop(pid, None)
        if helper_of is not None:
            if helper_of.pid is None and helper_of.channel is not None:
                # The intermediate parent ended before naming its child: setup failed there,
                # and unless it got to fork, the end of stream is queued.
                helper_of.status = status
                self._drain_ready(helper_of)
            return
        child = self.by_pid.pop(pid, None)
        if child is None:
            # A "pid" message naming it may still be queued: its sender wrote it before
            # exiting, and only then could this grandchild become ours.
            for other in list(self.by_channel.values()):
                if other.pid is None:
                    self._drain_ready(other)
            child = self.by_pid.pop(pid, None)
        if child is None:
            return  # an orphaned descendant of a container, re-parented to us
        child.status = status
        # All its holders are gone, so what it wrote, and the end of stream, are queued.
        self._drain(child)
        self._drop_console(child)  # unless a reply took it
        # Nobody reads its stdin any more. Its output stays kept: if the agent is away, the
        # pipe still holds what the process wrote last, for the next one.
        _close_kept(child, ("stdin",))
        if child.state == RUNNING:
            self._send_exit(child, status)
        elif child.state == DIED:
            self._reply_died(child)
        self._forget_container(child)

    def _drain_ready(self, child: Child) -> None:
        """Read what is queued on a child's channel, without waiting."""
        assert child.channel is not None
        selector = selectors.DefaultSelector()
        try:
            selector.register(child.channel, selectors.EVENT_READ)
            while child.channel is not None and selector.select(0):
                self._on_channel(child)
        finally:
            selector.close()

    def _reply_died(self, child: Child) -> None:
        status = child.status if child.status is not None else 0
        message = f"process {describe_status(status)} during setup"
        child.error = _error("setup", 0, message)
        _close_kept(child)
        self._drop_console(child)
        self._reply(child.request, False, error=_error("setup", 0, message))
        child.state = FAILED

    def _send_exit(self, child: Child, status: int) -> None:
        event: dict[str, Any] = {"event": "exit", "pid": child.pid, "oom_killed": False}
        if os.WIFSIGNALED(status):
            event["signal"] = os.WTERMSIG(status)
        else:
            event["exit_code"] = os.waitstatus_to_exitcode(status)
        event["container_id"] = child.container_id
        if child.kind == "exec":
            event["exec_id"] = child.name
        if self.adopted:  # else the record tells the next agent
            self._send(event)

    # --- output ----------------------------------------------------------------------------

    def _reply(self, request: Request, ok: bool, fds: Sequence[int] = (), **fields: Any) -> None:
        serial, request_id = request
        try:
            # A request of an agent that is gone: its successor never asked (and may well
            # use the same id for something else).
            if serial == self.serial:
                self._send({"id": request_id, "ok": ok, **fields}, fds)
        finally:
            for fd in fds:
                os.close(fd)  # the agent has its own copy now (or is gone)

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self.sock is None:
            return
        try:
            protocol.send(self.sock, message, fds)
        except OSError:
            self._lose_agent()


def _say(message: str) -> None:
    # Our stderr is the agent's: the guest console.
    sys.stderr.write(f"spawner: {message}\n")
    sys.stderr.flush()


def _trusted(conn: socket.socket) -> bool:
    """A peer of our own user and mount namespace: an agent, never a container process.

    The socket's directory is root's and out of any container's reach (each container has
    a mount namespace of its own, and /run of the guest is not in it); this says so again.
    """
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        theirs = os.stat(f"/proc/{pid}/ns/mnt")
        ours = os.stat("/proc/self/ns/mnt")
    except OSError:
        return False
    return uid == os.geteuid() and (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _describe(child: Child) -> dict[str, Any]:
    """A record as the adopting agent gets it."""
    info: dict[str, Any] = {
        "kind": child.kind,
        "container_id": child.container_id,
        "exec_id": child.name if child.kind == "exec" else "",
        "pid": child.pid or 0,
        "fds": list(child.kept),
    }
    if child.state in (FAILED, DIED):
        info["state"] = "failed"
        if child.error is not None:
            info["error"] = child.error
    elif child.state == RUNNING and child.status is not None:
        info["state"] = "exited"
        if os.WIFSIGNALED(child.status):
            info["signal"] = os.WTERMSIG(child.status)
        else:
            info["exit_code"] = os.waitstatus_to_exitcode(child.status)
    elif child.state in (CREATED, RUNNING):
        info["state"] = child.state
    else:
        info["state"] = "starting"  # a create, start or exec of the agent that died
    return info


KEPT_NAMES = ("stdin", "stdout", "stderr", "pty")


def _split_kept(message: dict[str, Any], fds: list[int]) -> tuple[list[int], dict[str, int]]:
    """The request's fds: (the process's stdio, the agent's ends to keep, by name).

    ``keep`` names the last fds of the request. They stay on ``fds`` (closed with the rest
    when the request fails) until :func:`_take_kept`.
    """
    names = message.get("keep") or []
    if (
        not isinstance(names, list)
        or len(names) > len(fds)
        or any(name not in KEPT_NAMES for name in names)
        or len(set(names)) != len(names)
    ):
        raise RequestError("request", errno.EINVAL, f"keep: bad names {names!r}")
    split = len(fds) - len(names)
    return fds[:split], dict(zip(names, fds[split:], strict=True))


def _take_kept(kept: dict[str, int], fds: list[int]) -> dict[str, int]:
    """Ownership of the kept fds passes to a record: off the request's list."""
    for fd in kept.values():
        fds.remove(fd)
    return kept


def _close_kept(child: Child, names: Iterable[str] | None = None) -> None:
    for name in list(child.kept) if names is None else names:
        fd = child.kept.pop(name, -1)
        if fd >= 0:
            os.close(fd)


def _error(step: str, errno_: int, message: str) -> dict[str, Any]:
    return {"step": step, "errno": errno_, "message": message}


def _encode_error(step: str, exc: BaseException) -> bytes:
    import json

    errno_ = exc.errno if isinstance(exc, OSError) and exc.errno else 0
    text = f"{type(exc).__name__}: {exc}"
    return json.dumps({"error": _error(step, errno_, text)}).encode()


def _string(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError("request", errno.EINVAL, f"{key} must be a non-empty string")
    return value


def _check_stdio(process: Process, fds: list[int], console: bool) -> None:
    if console:
        # The child makes its own pty inside the container and sends back the master.
        if not process.terminal:
            raise RequestError("request", errno.EINVAL, "console: needs process.terminal")
        if fds:
            raise RequestError("request", errno.EINVAL, "stdio: none with console")
        return
    want = 1 if process.terminal else 3
    if len(fds) != want:
        what = "1 fd (a pty)" if process.terminal else "3 fds (stdin, stdout, stderr)"
        raise RequestError("request", errno.EINVAL, f"stdio: need {what}, got {len(fds)}")


def _import_seccomp() -> None:
    # Here, not in the child: after pivot_root the child cannot import anything. Only
    # specs with seccomp pay for the bindings, once per spawner.
    from ..oci import seccomp_filter

    try:
        seccomp_filter.bindings()
    except OSError as exc:
        raise RequestError("seccomp", exc.errno or 0, exc.strerror or str(exc)) from None


def _same_namespace(pid: int, name: str) -> bool:
    theirs = os.stat(f"/proc/{pid}/ns/{name}")
    ours = os.stat(f"/proc/self/ns/{name}")
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
