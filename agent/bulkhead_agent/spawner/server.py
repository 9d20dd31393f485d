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
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import signal
import socket
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ..linux import mounts, namespaces, prctl
from ..linux.libc import libc
from ..oci import setup
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
        "helper",
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
        request: Any,  # id of the request whose reply waits on this child
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


def run(sock: socket.socket) -> None:
    """Serve requests on ``sock`` until the agent closes it or asks for shutdown."""
    Server(sock).serve()


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
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

    def _prepare(self) -> None:
        # The agent handles Ctrl-C and shutdown; the spawner only ends with its socket.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        prctl.set_child_subreaper()
        libc()  # loaded now, so that no child ever loads it after fork
        self.no_pivot = mounts.root_is_initramfs()
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda _signo, _frame: None)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        self.sock.setblocking(True)
        self.selector.register(self.sock, selectors.EVENT_READ, self._on_request)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, self._on_sigchld)
        # Objects that exist now are never freed: forked children then do not dirty (copy)
        # the pages the collector would touch.
        import gc

        gc.freeze()

    # --- requests --------------------------------------------------------------------------

    def _on_request(self) -> None:
        try:
            got = protocol.recv(self.sock)
        except protocol.ProtocolError as exc:
            self._send({"event": "error", "message": str(exc)})
            return
        if got is None:
            self.running = False  # the agent is gone; running containers carry on
            return
        message, fds = got
        request = message.get("id")
        handler = {
            "create": self._create,
            "start": self._start,
            "exec": self._exec,
            "signal": self._signal,
            "shutdown": self._shutdown,
            "ping": lambda _m, _f: {},
        }.get(message.get("op", ""))
        try:
            if handler is None:
                raise RequestError("request", errno.EINVAL, f"unknown op {message.get('op')!r}")
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
                os.close(fd)  # the child has its copies

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
        _check_stdio(spec.process, fds, console)
        if spec.linux.seccomp is not None:
            _import_seccomp()
        rootfs = spec.root.path
        if not rootfs.startswith("/"):
            rootfs = os.path.join(bundle, rootfs)
        ctx = setup.Context(
            process=spec.process,
            stdio=fds,
            spec=spec,
            bundle=bundle,
            rootfs=os.path.realpath(rootfs),
            cgroup=message.get("cgroup") or "",
            seccomp=spec.linux.seccomp,
            no_pivot=self.no_pivot,
            hold=True,
            console=console,
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
        child = self._fork(
            ctx, setup.CREATE_STEPS, "container", container_id, message["id"], pid_ns_path
        )
        child.spec = spec
        child.cgroup = ctx.cgroup
        self.containers[container_id] = child
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
        child.request = message["id"]
        return None  # replied when exec succeeded or failed

    def _exec(self, message: dict[str, Any], fds: list[int]) -> None:
        container_id = _string(message, "container_id")
        container = self.containers.get(container_id)
        if container is None or container.state not in (CREATED, RUNNING) or not container.pid:
            raise RequestError("exec", errno.ESRCH, f"container {container_id!r} is not running")
        process = parse_process(message.get("process"), "process")
        console = bool(message.get("console"))
        _check_stdio(process, fds, console)
        target = container.pid
        assert container.spec is not None
        ctx = setup.Context(
            process=process,
            stdio=fds,
            cgroup=container.cgroup,
            seccomp=container.spec.linux.seccomp,
            join_pid=target,
            console=console,
        )
        pid_ns_path = "" if _same_namespace(target, "pid") else f"/proc/{target}/ns/pid"
        exec_id = message.get("exec_id") or ""
        child = self._fork(ctx, setup.EXEC_STEPS, "exec", exec_id, message["id"], pid_ns_path)
        child.state = STARTING
        child.container_id = container_id
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
        return {}

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

    # --- children --------------------------------------------------------------------------

    def _fork(
        self,
        ctx: setup.Context,
        steps: tuple[setup.Step, ...],
        kind: str,
        name: str,
        request: Any,
        pid_ns_path: str = "",
    ) -> Child:
        """Fork a child to run ``steps``; with ``pid_ns_path``, straight into that PID
        namespace (or a new one for ``NEW_PID_NAMESPACE``).

        A PID namespace only applies to the children of whoever enters it. Entering it here,
        for the one fork, saves the child a second fork (a few ms: most of a container's
        start). The spawner is single-threaded, so nothing else forks meanwhile.
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
            self._child(ctx, steps, ours, theirs)  # never returns
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
            self.sock.close()
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
        for fd in fds:
            os.close(fd)
        if "pid" in message:
            pid = message["pid"]
            child.pid = pid
            self.by_pid[pid] = child
            self._settle_ready(child)
        elif "userns" in message:
            self._write_id_maps(child)
        elif "ready" in message:
            child.ready = True
            self._settle_ready(child)
        elif "error" in message:
            child.state = FAILED
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
        self._send(event)

    # --- output ----------------------------------------------------------------------------

    def _reply(self, request: Any, ok: bool, fds: Sequence[int] = (), **fields: Any) -> None:
        try:
            self._send({"id": request, "ok": ok, **fields}, fds)
        finally:
            for fd in fds:
                os.close(fd)  # the agent has its own copy now (or is gone)

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            protocol.send(self.sock, message, fds)
        except OSError:
            self.running = False  # the agent is gone


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
