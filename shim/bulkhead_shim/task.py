"""containerd's ``containerd.task.v2.Task`` service, mapped onto the pod's guest agent.

Each handler is one request in containerd's terms and a few host-client calls in ours:

    Create  mount the bundle's rootfs, boot (or join) the pod's VM, share the rootfs into it
            over virtio-fs, create the container (process held), attach its stdio
    Start   let the container's process run, or run an exec added earlier
    Exec    remember an exec (containerd starts it with Start)
    Wait    the exit, once its output is all written to containerd's FIFOs
    Delete  remove the container or forget the exec; the VM goes with the pod's last one
    ...     Kill, State, Pids, ResizePty, CloseIO, Pause, Resume, Update, Stats, Connect,
            Shutdown map one to one

Events go to containerd in the order things happen. The guest's pids are the ones reported:
they are what ``ctr task ps`` users can relate to what runs in the container.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2

from bulkhead.containers import Container, check_id
from bulkhead.details import ProcessExit
from bulkhead.errors import AgentError, BulkheadError, FailedPrecondition, NotFound
from bulkhead.process import Process

from . import host_mounts
from . import rootfs as host_rootfs
from .api import cgroups_v2_pb2 as metrics_pb2
from .api import events_pb2, shim_pb2
from .api import runc_options_pb2 as runc_pb2
from .api import task_types_pb2 as task_pb2
from .guest_spec import guest_spec
from .pod import Pod
from .pod_state import ContainerRecord, PodPaths, PodState, read_spec
from .publisher import EventPublisher, pack_any, topic_of
from .stdio import Relay, Stdio, open_stdin_fifo
from .ttrpc import CallContext, Code, Server, TtrpcError

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
UNKNOWN_EXIT = 255  # containerd's status for an exit nobody saw (the VM died)
VM_EXIT_GRACE = 3.0  # after QEMU dies, how long broken streams get to end by themselves
DELETE_GRACE = 10.0  # how long Delete waits for a killed container's output to end
STATUS = task_pb2.Status


@dataclass
class Proc:
    """A process as containerd sees it: the container's own (``exec_id`` "") or an exec."""

    container_id: str
    exec_id: str
    stdio: Stdio
    process_spec: dict[str, Any] | None = None  # an exec's OCI process, until it is started
    pid: int = 0
    status: int = STATUS.CREATED
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp | None = None
    process: Process | None = None
    relay: Relay | None = None
    stdin_fd: int | None = None  # an exec's stdin FIFO, opened at Exec, until its relay has it
    finished: threading.Event = field(default_factory=threading.Event)
    _finish_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id


@dataclass
class Task:
    id: str
    bundle: str
    init: Proc
    record: ContainerRecord
    container: Container | None = None
    execs: dict[str, Proc] = field(default_factory=dict)


class TaskService:
    def __init__(
        self, paths: PodPaths, state: PodState, publisher: EventPublisher, *, namespace: str,
        on_shutdown: Callable[[], None],
    ) -> None:  # fmt: skip
        self.paths = paths
        self.state = state
        self.publisher = publisher
        self.namespace = namespace
        self.on_shutdown = on_shutdown
        self.pod = Pod(paths, state, self._vm_exited)
        self.tasks: dict[str, Task] = {}
        self._lock = threading.RLock()
        self._oom_watch: threading.Thread | None = None

    def register(self, server: Server) -> None:
        table: dict[str, tuple[type[Any], Callable[[Any, CallContext], Any]]] = {
            "State": (shim_pb2.StateRequest, self.state_),
            "Create": (shim_pb2.CreateTaskRequest, self.create),
            "Start": (shim_pb2.StartRequest, self.start),
            "Delete": (shim_pb2.DeleteRequest, self.delete),
            "Pids": (shim_pb2.PidsRequest, self.pids),
            "Pause": (shim_pb2.PauseRequest, self.pause),
            "Resume": (shim_pb2.ResumeRequest, self.resume),
            "Checkpoint": (shim_pb2.CheckpointTaskRequest, self.checkpoint),
            "Kill": (shim_pb2.KillRequest, self.kill),
            "Exec": (shim_pb2.ExecProcessRequest, self.exec),
            "ResizePty": (shim_pb2.ResizePtyRequest, self.resize_pty),
            "CloseIO": (shim_pb2.CloseIORequest, self.close_io),
            "Update": (shim_pb2.UpdateTaskRequest, self.update),
            "Wait": (shim_pb2.WaitRequest, self.wait),
            "Stats": (shim_pb2.StatsRequest, self.stats),
            "Connect": (shim_pb2.ConnectRequest, self.connect),
            "Shutdown": (shim_pb2.ShutdownRequest, self.shutdown),
        }
        for method, (request_type, handler) in table.items():
            server.register(SERVICE, method, request_type, _guarded(method, handler))

    # -- lifecycle --

    def create(self, req: Any, ctx: CallContext) -> Any:
        _check_id(req.id, "id")
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "create: restoring a checkpoint is not supported")
        with self._lock:
            if req.id in self.tasks:
                raise TtrpcError(Code.ALREADY_EXISTS, f"create: task {req.id} already exists")
            record = ContainerRecord(bundle=req.bundle)
            self.state.containers[req.id] = record
            self.state.save(self.paths)
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        task = Task(req.id, req.bundle, Proc(req.id, "", stdio), record)
        try:
            self._create(task, req)
        except BaseException:
            self._undo_create(task)
            raise
        with self._lock:
            self.tasks[req.id] = task
        io = events_pb2.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                               terminal=req.terminal)  # fmt: skip
        self._publish(events_pb2.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs), io=io,
            pid=task.init.pid,
        ))  # fmt: skip
        return shim_pb2.CreateTaskResponse(pid=task.init.pid)

    def _create(self, task: Task, req: Any) -> None:
        clock = _Phases()
        try:
            spec = read_spec(req.bundle)
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"create: bundle: {exc}") from exc
        rootfs = os.path.join(req.bundle, "rootfs")
        if host_rootfs.mount_rootfs(req.rootfs, rootfs):
            task.record.rootfs = rootfs
            self.state.save(self.paths)
        if not os.path.isdir(rootfs):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"create: no rootfs mounts and no {rootfs}")
        clock.lap("rootfs")
        booted = not self.pod.up
        sandbox = self.pod.sandbox(spec)
        self._watch_ooms()
        clock.lap("vm_boot" if booted else "vm_join")
        share = "rootfs-" + hashlib.sha256(task.id.encode()).hexdigest()[:12]
        readonly = bool((spec.get("root") or {}).get("readonly"))
        sandbox.add_share(rootfs, share, readonly=readonly)
        task.record.share = share
        self.state.save(self.paths)
        clock.lap("share")
        container_spec = guest_spec(spec, task.id)
        guest_dir = self.pod.mounts_share() if host_mounts.needs_share(container_spec) else ""
        try:
            made = host_mounts.carry(container_spec, task.id, self.paths.mounts_dir, guest_dir)
        except OSError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"create: mounts: {exc}") from exc
        if made:
            task.record.host_mounts = made
            self.state.save(self.paths)
        clock.lap("mounts")
        client = sandbox.agent
        task.init.pid = client.create_container(task.id, container_spec, rootfs_storage=share)
        task.container = Container(client, task.id, tty=req.terminal)
        process = task.container.attach(stdin=True)
        self._relay(task.init, process)
        clock.lap("container")
        # One line per Create, in containerd's log too: where a container's start-up time went.
        log.info("create %s timings: %s", task.id, clock)

    def _relay(self, proc: Proc, process: Process) -> None:
        proc.process = process
        proc.relay = Relay(
            process, proc.stdio, container_id=proc.container_id, namespace=self.namespace,
            on_done=lambda exit, error: self._finished(proc, exit, error),
            stdin_fd=proc.stdin_fd,
        )  # fmt: skip
        proc.stdin_fd = None  # the relay's now
        proc.relay.start()

    def _undo_create(self, task: Task) -> None:
        if task.container is not None:
            _quietly(task.container.client.remove_container, task.id, 0)
        self._release(task)

    def _release(self, task: Task) -> None:
        """Undo what Create did on the host and in the VM (each step only if it was done)."""
        if task.record.share and self.pod.up:
            _quietly(self.pod.sandbox().remove_share, task.record.share)
        if task.record.rootfs:
            _quietly(host_rootfs.unmount_rootfs, task.record.rootfs)
        if task.record.host_mounts:
            _quietly(host_mounts.release, task.record.host_mounts)
        with self._lock:
            self.tasks.pop(task.id, None)
            self.state.containers.pop(task.id, None)
            self.state.save(self.paths)
            last = not self.state.containers
        if last:
            started = time.monotonic()
            self.pod.down()
            log.info("delete %s timings: vm_down=%.0fms", task.id,
                     (time.monotonic() - started) * 1000)  # fmt: skip

    def start(self, req: Any, ctx: CallContext) -> Any:
        task, proc = self._proc(req.id, req.exec_id)
        if proc.status != STATUS.CREATED:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"start: {proc.id} was started already")
        if not req.exec_id:
            assert task.container is not None
            try:
                task.container.start()
            except BulkheadError as exc:
                raise _status(exc, "start") from exc
            with proc._finish_lock:  # a command that cannot run may have its exit already
                if not proc.finished.is_set():
                    proc.status = STATUS.RUNNING
            if proc.relay is not None:
                proc.relay.started()
            failed = task.container.start_failure
            if failed is not None:
                # As runc: the start is an error. Its exit (127, 126) is published first.
                proc.finished.wait(5)
                why = failed.start_failure.message if failed.start_failure else "cannot run"
                raise TtrpcError(Code.UNKNOWN, f"start: {why}")
            self._publish(events_pb2.TaskStart(container_id=task.id, pid=proc.pid))
        else:
            assert task.container is not None and proc.process_spec is not None
            client = task.container.client
            try:
                pid = client.exec_process(task.id, req.exec_id, proc.process_spec)
            except BulkheadError as exc:
                raise _status(exc, "start") from exc
            proc.pid, proc.status = pid, STATUS.RUNNING
            process = Process(client, task.id, req.exec_id, pid=pid, tty=proc.stdio.terminal)
            process.reattach()  # the agent keeps its output from the first byte
            self._relay(proc, process)
            assert proc.relay is not None
            proc.relay.started()
            self._publish(events_pb2.TaskExecStarted(container_id=task.id, exec_id=req.exec_id,
                                                     pid=pid))  # fmt: skip
        return shim_pb2.StartResponse(pid=proc.pid)

    def exec(self, req: Any, ctx: CallContext) -> Any:
        _check_id(req.exec_id, "exec_id")
        task, _ = self._proc(req.id, "")
        if req.exec_id in task.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"exec: {req.exec_id} already exists")
        if task.init.status not in (STATUS.RUNNING, STATUS.PAUSED):
            raise TtrpcError(Code.FAILED_PRECONDITION, f"exec: task {req.id} is not running")
        if req.spec.type_url and req.spec.type_url != PROCESS_TYPE_URL:
            what = f"exec: spec: unexpected type {req.spec.type_url}"
            raise TtrpcError(Code.INVALID_ARGUMENT, what)
        try:
            process_spec = json.loads(req.spec.value or b"{}")
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"exec: spec: not JSON: {exc}") from exc
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        proc = Proc(req.id, req.exec_id, stdio, process_spec=process_spec)
        if req.stdin:  # now, as the container's is at Create (see stdio): a close is seen
            try:
                proc.stdin_fd = open_stdin_fifo(req.stdin)
            except OSError as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"exec: stdin: {exc}") from exc
        task.execs[req.exec_id] = proc
        self._publish(events_pb2.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    def wait(self, req: Any, ctx: CallContext) -> Any:
        _, proc = self._proc(req.id, req.exec_id)
        if not proc.finished.wait(ctx.time_left()):
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"wait: {proc.id} is still running")
        return shim_pb2.WaitResponse(exit_status=proc.exit_status, exited_at=proc.exited_at)

    def delete(self, req: Any, ctx: CallContext) -> Any:
        task, proc = self._proc(req.id, req.exec_id)
        if proc.status in (STATUS.RUNNING, STATUS.PAUSED):
            raise TtrpcError(Code.FAILED_PRECONDITION, f"delete: {proc.id} is still running")
        if req.exec_id:
            task.execs.pop(req.exec_id, None)
            _close_stdin_fd(proc)
            return self._delete_response(proc)
        if task.container is not None:
            try:
                task.container.client.remove_container(task.id, 0)
            except NotFound:
                pass
            except BulkheadError as exc:
                if self.pod.up and not isinstance(exc, AgentError):
                    raise _status(exc, "delete") from exc
                log.warning("delete %s: %s", task.id, exc)
        if proc.status == STATUS.CREATED:  # never started: its relay ends with the removal
            self._finish_after(proc, DELETE_GRACE)
        self._release(task)
        self._publish(events_pb2.TaskDelete(
            container_id=task.id, pid=proc.pid, exit_status=proc.exit_status,
            exited_at=proc.exited_at, id=task.id,
        ))  # fmt: skip
        return self._delete_response(proc)

    @staticmethod
    def _delete_response(proc: Proc) -> Any:
        return shim_pb2.DeleteResponse(
            pid=proc.pid, exit_status=proc.exit_status, exited_at=proc.exited_at
        )

    # -- processes --

    def kill(self, req: Any, ctx: CallContext) -> Any:
        task, proc = self._proc(req.id, req.exec_id)
        if proc.status == STATUS.STOPPED:
            raise TtrpcError(Code.NOT_FOUND, f"kill: process {proc.id} already finished")
        if proc.status == STATUS.CREATED and req.exec_id:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"kill: exec {proc.id} was not started")
        assert task.container is not None
        try:
            task.container.client.signal_process(task.id, req.exec_id, req.signal, all=req.all)
        except NotFound as exc:
            raise TtrpcError(Code.NOT_FOUND, f"kill: process {proc.id} already finished") from exc
        except BulkheadError as exc:
            raise _status(exc, "kill") from exc
        return empty_pb2.Empty()

    def state_(self, req: Any, ctx: CallContext) -> Any:
        task, proc = self._proc(req.id, req.exec_id)
        status = proc.status
        return shim_pb2.StateResponse(
            id=proc.id, bundle=task.bundle, pid=proc.pid, status=status,
            stdin=proc.stdio.stdin, stdout=proc.stdio.stdout, stderr=proc.stdio.stderr,
            terminal=proc.stdio.terminal, exit_status=proc.exit_status,
            exited_at=proc.exited_at, exec_id=req.exec_id,
        )  # fmt: skip

    def pids(self, req: Any, ctx: CallContext) -> Any:
        task, _ = self._proc(req.id, "")
        assert task.container is not None
        try:
            processes = task.container.processes()
        except BulkheadError as exc:
            raise _status(exc, "pids") from exc
        by_pid = {p.pid: p.exec_id for p in task.execs.values() if p.pid}
        infos = []
        for p in processes:
            info = task_pb2.ProcessInfo(pid=p.pid)
            if p.pid in by_pid:
                info.info.CopyFrom(pack_any(runc_pb2.ProcessDetails(exec_id=by_pid[p.pid])))
            infos.append(info)
        return shim_pb2.PidsResponse(processes=infos)

    def resize_pty(self, req: Any, ctx: CallContext) -> Any:
        task, proc = self._proc(req.id, req.exec_id)
        if not proc.stdio.terminal:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"resize: {proc.id} has no terminal")
        assert task.container is not None
        try:
            task.container.client.resize_terminal(task.id, req.exec_id, req.height, req.width)
        except BulkheadError as exc:
            raise _status(exc, "resize") from exc
        return empty_pb2.Empty()

    def close_io(self, req: Any, ctx: CallContext) -> Any:
        _, proc = self._proc(req.id, req.exec_id)
        if req.stdin and proc.relay is not None:
            proc.relay.close_stdin()
        return empty_pb2.Empty()

    # -- resources --

    def pause(self, req: Any, ctx: CallContext) -> Any:
        task, proc = self._proc(req.id, "")
        assert task.container is not None
        try:
            task.container.pause()
        except BulkheadError as exc:
            raise _status(exc, "pause") from exc
        proc.status = STATUS.PAUSED
        self._publish(events_pb2.TaskPaused(container_id=task.id))
        return empty_pb2.Empty()

    def resume(self, req: Any, ctx: CallContext) -> Any:
        task, proc = self._proc(req.id, "")
        assert task.container is not None
        try:
            task.container.resume()
        except BulkheadError as exc:
            raise _status(exc, "resume") from exc
        if proc.status == STATUS.PAUSED:
            proc.status = STATUS.RUNNING
        self._publish(events_pb2.TaskResumed(container_id=task.id))
        return empty_pb2.Empty()

    def update(self, req: Any, ctx: CallContext) -> Any:
        task, _ = self._proc(req.id, "")
        if req.resources.type_url not in ("", RESOURCES_TYPE_URL):
            what = f"update: resources: unexpected type {req.resources.type_url}"
            raise TtrpcError(Code.INVALID_ARGUMENT, what)
        try:
            resources = json.loads(req.resources.value or b"{}")
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"update: resources: not JSON: {exc}") from exc
        assert task.container is not None
        try:
            task.container.update(resources)
        except BulkheadError as exc:
            raise _status(exc, "update") from exc
        return empty_pb2.Empty()

    def stats(self, req: Any, ctx: CallContext) -> Any:
        task, _ = self._proc(req.id, "")
        assert task.container is not None
        try:
            s = task.container.stats()
        except BulkheadError as exc:
            raise _status(exc, "stats") from exc
        metrics = metrics_pb2.Metrics(
            pids=metrics_pb2.PidsStat(current=s.pids_current, limit=s.pids_max),
            cpu=metrics_pb2.CPUStat(
                usage_usec=s.cpu_usage_usec, user_usec=s.cpu_user_usec,
                system_usec=s.cpu_system_usec, nr_throttled=s.cpu_nr_throttled,
                throttled_usec=s.cpu_throttled_usec,
            ),
            memory=metrics_pb2.MemoryStat(
                usage=s.memory_current_bytes, usage_limit=s.memory_max_bytes,
                max_usage=s.memory_peak_bytes,
            ),
        )  # fmt: skip
        return shim_pb2.StatsResponse(stats=pack_any(metrics))

    # -- the shim --

    def connect(self, req: Any, ctx: CallContext) -> Any:
        pid = 0
        with self._lock:
            if req.id in self.tasks:
                pid = self.tasks[req.id].init.pid
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=pid)

    def shutdown(self, req: Any, ctx: CallContext) -> Any:
        """containerd asks after each Delete; the pod's shim stays while it has containers."""
        with self._lock:
            if self.tasks and not req.now:
                return empty_pb2.Empty()
        self.on_shutdown()
        return empty_pb2.Empty()

    def checkpoint(self, req: Any, ctx: CallContext) -> Any:
        raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint: not supported for VM sandboxes")

    def close(self) -> None:
        """The shim is exiting: take down whatever is left."""
        with self._lock:
            tasks = list(self.tasks.values())
        for task in tasks:
            self._release(task)
        self.pod.down()

    # -- exits --

    def _finished(self, proc: Proc, exit: ProcessExit | None, error: BaseException | None) -> None:
        """A process's output is all out: record its exit and tell containerd."""
        with proc._finish_lock:
            if proc.finished.is_set():
                return
            proc.exit_status = exit.returncode if exit is not None else UNKNOWN_EXIT
            proc.exited_at = _now()
            proc.status = STATUS.STOPPED
            self._publish(events_pb2.TaskExit(
                container_id=proc.container_id, id=proc.id, pid=proc.pid,
                exit_status=proc.exit_status, exited_at=proc.exited_at,
            ))  # fmt: skip
            proc.finished.set()

    def _finish_after(self, proc: Proc, grace: float) -> None:
        if proc.relay is not None and proc.relay.done.wait(grace):
            return
        self._finished(proc, None, None)

    def _vm_exited(self) -> None:
        """QEMU died: every process is gone with it. Streams that do not end by themselves
        within the grace are ended here, so no Wait hangs on a VM that is not there."""
        with self._lock:
            procs = [p for t in self.tasks.values() for p in (t.init, *t.execs.values())]
        deadline = time.monotonic() + VM_EXIT_GRACE
        for proc in procs:
            if proc.status == STATUS.CREATED and proc.relay is None:
                _close_stdin_fd(proc)
                self._finished(proc, None, None)  # an exec never started
            else:
                self._finish_after(proc, max(0.0, deadline - time.monotonic()))

    def _watch_ooms(self) -> None:
        """TaskOOM for every OOM kill the guest reports, whichever process it hit."""
        if self._oom_watch is not None:
            return
        sandbox = self.pod.sandbox()

        def watch() -> None:
            try:
                for event in sandbox.events():
                    if event.kind == "oom_kill" and event.container_id in self.tasks:
                        self._publish(events_pb2.TaskOOM(container_id=event.container_id))
            except Exception as exc:
                log.info("event stream ended: %s", exc)

        self._oom_watch = threading.Thread(target=watch, name="oom-watch", daemon=True)
        self._oom_watch.start()

    # -- helpers --

    def _proc(self, container_id: str, exec_id: str) -> tuple[Task, Proc]:
        with self._lock:
            task = self.tasks.get(container_id)
        if task is None:
            raise TtrpcError(Code.NOT_FOUND, f"task {container_id!r} not found")
        if not exec_id:
            return task, task.init
        proc = task.execs.get(exec_id)
        if proc is None:
            raise TtrpcError(Code.NOT_FOUND, f"exec {exec_id!r} of task {container_id!r} not found")
        return task, proc

    def _publish(self, event: Any) -> None:
        self.publisher.publish(topic_of(event), event)


class _Phases:
    """Milliseconds per named step, for the Create timings line (``bench/shim.py`` reads it)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = (now - self._last) * 1000
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{name}={ms:.0f}ms" for name, ms in self.laps.items())


def _guarded(method: str, handler: Callable[[Any, CallContext], Any]) -> Callable[..., Any]:
    """Host-client errors become the matching status, with the method in the message."""

    def call(req: Any, ctx: CallContext) -> Any:
        # Every call in the log (with -debug, as containerd at debug level runs shims): the
        # order of Start, CloseIO, Wait and Kill is what a stdio hang is diagnosed from.
        log.debug("%s %s", method, getattr(req, "id", ""))
        try:
            return handler(req, ctx)
        except TtrpcError:
            raise
        except BulkheadError as exc:
            raise _status(exc, method.lower()) from exc
        except OSError as exc:
            raise TtrpcError(Code.INTERNAL, f"{method.lower()}: {exc}") from exc

    return call


def _status(exc: BulkheadError, what: str) -> TtrpcError:
    if isinstance(exc, AgentError):
        code = Code(exc.code.value[0])
    elif isinstance(exc, FailedPrecondition):
        code = Code.FAILED_PRECONDITION
    else:
        code = Code.UNKNOWN
    return TtrpcError(code, f"{what}: {exc}")


def _check_id(value: str, field_name: str) -> None:
    try:
        check_id(value, field_name)
    except BulkheadError as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:
        log.warning("cleanup: %s%s: %s", getattr(fn, "__name__", fn), args, exc)


def _close_stdin_fd(proc: Proc) -> None:
    """An exec that never started: its stdin FIFO, opened at Exec, is not needed any more."""
    if proc.stdin_fd is not None:
        with contextlib.suppress(OSError):
            os.close(proc.stdin_fd)
        proc.stdin_fd = None
