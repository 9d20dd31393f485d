"""The containers the agent runs: create, start, exec, signal, wait, remove, pause, resume,
update, stats and listings, on top of the spawner, the rootfs overlay and cgroup v2.

Every method runs on the agent's event loop. Lifecycle operations on one container (create,
start, exec, remove, pause, resume, update) take its lock, so for instance an exec cannot
join a container that a remove is killing. Failures are :class:`Failure` with a status name;
a create that fails undoes every step it made (mounts, cgroup, fds, the record).

What the agent decides, whatever the spec says: the container's root is an overlay of the
spec's root directory (unless ``root.readonly``), it always gets a mount namespace of its own
(the guest's mount table holds the agent's socket), it joins the sandbox's network namespace
unless the spec names one, and its cgroup is ``<agent tree>/containers/<id>``
(``linux.cgroupsPath`` is ignored). OCI hooks are not run.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from ..oci import cgroups as oci_cgroups
from ..oci.cgroups import Cgroup
from ..oci.spec import Spec, SpecError, parse, parse_process, parse_resources
from ..spawner.client import ExitEvent, Spawner, SpawnerGone, SpawnError
from . import cgroup_tree, procfs, rootfs
from .cgroup_tree import CgroupTree
from .errors import Failure, check_id
from .process import EXITED, SIGNALED, START_FAILED, ExitInfo, ProcessRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bulkhead_init.log import Logger

    from ..settings import Settings

CREATING, CREATED, RUNNING, PAUSED, STOPPED = "creating", "created", "running", "paused", "stopped"
MAX_SIGNAL = 64  # SIGRTMAX on Linux
CGROUP_TIMEOUT_S = 5.0  # freezing, thawing
KILL_DEADLINE_S = 10.0  # after SIGKILL, for every process to be gone
# An exec's process object inherits these from the container's when it leaves them out;
# what it runs, and its terminal, are its own.
NOT_INHERITED = ("args", "commandLine", "terminal", "consoleSize")


class ContainerInfo(NamedTuple):
    container_id: str
    status: str
    pid: int
    created_unix: float
    args: tuple[str, ...]
    rootfs: str
    exec_ids: tuple[str, ...]


class Stats(NamedTuple):
    cpu_usage_usec: int = 0
    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    cpu_nr_throttled: int = 0
    cpu_throttled_usec: int = 0
    memory_current_bytes: int = 0
    memory_peak_bytes: int = 0
    memory_max_bytes: int = 0
    memory_oom_kills: int = 0
    pids_current: int = 0
    pids_max: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0


class Container:
    def __init__(self, container_id: str) -> None:
        self.id = container_id
        self.status = CREATING
        self.lock = asyncio.Lock()
        self.removed = False
        self.created_unix = time.time()
        self.process_spec: dict[str, Any] = {}  # the spec's process object, for exec
        self.args: tuple[str, ...] = ()
        self.source_rootfs = ""  # the directory the host named (the overlay's lower)
        self.state_dir = ""  # the per-container tmpfs; "" without an overlay
        self.cgroup: Cgroup | None = None
        self.pid_namespace: tuple[int, int] | None = None  # its own, when it has one
        self.own_devpts = False  # terminals can be made inside it
        self.init: ProcessRecord | None = None
        self.execs: dict[str, ProcessRecord] = {}

    def process(self, exec_id: str) -> ProcessRecord | None:
        return self.init if not exec_id else self.execs.get(exec_id)

    def records(self) -> list[ProcessRecord]:
        return [r for r in (self.init, *self.execs.values()) if r is not None]


class Manager:
    def __init__(
        self, settings: Settings, spawner: Spawner, cgroups: CgroupTree | None, log: Logger
    ) -> None:
        self._settings = settings
        self._spawner = spawner
        self._cgroups = cgroups
        self._log = log
        self._containers: dict[str, Container] = {}
        self._own_pid_namespace = procfs.own_pid_namespace()
        spawner.on_exit = self._on_exit

    def prepare(self) -> None:
        """At agent start: the shared mount point the containers' directories go under."""
        rootfs.prepare_base(self._settings.containers_dir)

    async def shutdown(self) -> None:
        """Remove every container (SIGKILL at once), as the guest is going away."""
        for container_id in list(self._containers):
            try:
                await self.remove(container_id, 0)
            except Failure as exc:
                self._log.warning(f"stopping: container {container_id}: {exc.message}")
        try:
            rootfs.release_base(self._settings.containers_dir)
        except OSError as exc:
            self._log.warning(f"stopping: {exc}")

    # --- lookup ----------------------------------------------------------------------------

    def _get(self, container_id: str) -> Container:
        container = self._containers.get(container_id)
        if container is None or container.status == CREATING or container.removed:
            raise Failure("NOT_FOUND", f"no container {container_id!r}")
        return container

    def find_process(self, container_id: str, exec_id: str) -> ProcessRecord:
        container = self._get(container_id)
        record = container.process(exec_id)
        if record is None:
            raise Failure("NOT_FOUND", f"no process {exec_id!r} in container {container_id!r}")
        return record

    # --- create ----------------------------------------------------------------------------

    async def create(self, container_id: str, oci_spec: bytes, bundle_dir: str) -> int:
        check_id(container_id, "container_id")
        if container_id in self._containers:
            raise Failure("ALREADY_EXISTS", f"container {container_id!r} exists")
        value = _decode_json(oci_spec, "oci_spec")
        _own_mount_namespace(value)
        try:
            spec = parse(value)
            if spec.linux.resources is not None:
                oci_cgroups.resources_to_v2(spec.linux.resources)  # refused before any work
        except SpecError as exc:
            raise Failure("INVALID_ARGUMENT", f"oci_spec: {exc}") from None
        if bundle_dir and not bundle_dir.startswith("/"):
            raise Failure("INVALID_ARGUMENT", f"bundle_dir: must be absolute, not {bundle_dir!r}")
        lower = self._lower_dir(spec, bundle_dir)

        container = Container(container_id)
        self._containers[container_id] = container  # reserves the id at once
        undo: list[Callable[[], Awaitable[None] | None]] = []
        try:
            async with container.lock:
                return await self._create(container, spec, value, bundle_dir, lower, undo)
        except BaseException:
            for step in reversed(undo):
                try:
                    result = step()
                    if result is not None:
                        await result
                except Exception as exc:  # keep undoing the rest
                    self._log.error(f"create {container_id}: cleaning up: {exc}")
            if self._containers.get(container_id) is container:
                del self._containers[container_id]
            raise

    def _lower_dir(self, spec: Spec, bundle_dir: str) -> str:
        path = spec.root.path
        if not path.startswith("/"):
            # A relative root.path belongs to a bundle; without one, the image's rootfs.
            path = os.path.join(bundle_dir, path) if bundle_dir else self._settings.default_rootfs
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise Failure("INVALID_ARGUMENT", f"root.path: {path} is not a directory")
        return path

    async def _create(
        self,
        container: Container,
        spec: Spec,
        value: dict[str, Any],
        bundle_dir: str,
        lower: str,
        undo: list[Callable[[], Awaitable[None] | None]],
    ) -> int:
        container_id = container.id
        container.source_rootfs = lower
        root = lower
        if not spec.root.readonly:
            state_dir = os.path.join(self._settings.containers_dir, container_id)
            try:
                root = rootfs.mount_overlay(lower, state_dir, _mapped_root(spec))
            except OSError as exc:
                raise Failure("FAILED_PRECONDITION", f"root filesystem overlay: {exc}") from None
            container.state_dir = state_dir
            undo.append(lambda: rootfs.teardown(state_dir))
        value["root"]["path"] = root

        if self._cgroups is not None:
            cgroup = self._cgroups.cgroup(container_id)
            if os.path.isdir(cgroup.path):  # left by a previous agent
                await cgroup_tree.remove(cgroup, KILL_DEADLINE_S)
            try:
                cgroup.create(spec.linux.resources)
            except OSError as exc:
                raise _cgroup_failure(exc, "oci_spec: linux.resources") from None
            container.cgroup = cgroup
            undo.append(lambda: cgroup_tree.remove(cgroup, KILL_DEADLINE_S))

        container.own_devpts = _has_own_devpts(spec)
        console = spec.process.terminal and container.own_devpts
        record = ProcessRecord(container_id, "", spec.process.terminal, console=console)
        undo.append(record.forget)
        container.init = record
        container.process_spec = dict(value["process"])
        container.args = spec.process.args
        cgroup_path = container.cgroup.path if container.cgroup else ""
        try:
            if console:
                pid, master = await self._spawner.create_console(
                    container_id, bundle=bundle_dir or "/", spec=value, cgroup=cgroup_path
                )
                record.stdio.attach_master(master)
            else:
                pid = await self._spawner.create(
                    container_id,
                    bundle=bundle_dir or "/",
                    spec=value,
                    stdio=record.stdio.child_fds,
                    cgroup=cgroup_path,
                )
        except SpawnError as exc:
            raise _spawn_failure(exc, "oci_spec") from None
        except SpawnerGone as exc:
            raise Failure("UNAVAILABLE", str(exc)) from None
        finally:
            record.stdio.close_child_fds()
        record.pid = pid
        if spec.linux.namespace("pid") is not None:
            namespace = procfs.pid_namespace_of(pid)
            if namespace != self._own_pid_namespace:
                container.pid_namespace = namespace
        container.status = CREATED
        self._log.debug(f"container {container_id} created: pid {pid}, root {root}")
        return pid

    # --- start, exec -----------------------------------------------------------------------

    async def start(self, container_id: str) -> None:
        container = self._get(container_id)
        async with container.lock:
            if container.removed or container.status != CREATED:
                raise Failure(
                    "FAILED_PRECONDITION",
                    f"container {container_id!r} is {container.status}, not created",
                )
            record = container.init
            assert record is not None
            # Before the await: an exit reported meanwhile must leave it stopped.
            container.status = RUNNING
            record.oom_kills_at_start = self._oom_kills(container)
            try:
                await self._spawner.start(container_id)
            except SpawnError as exc:
                record.stdio.abandon()
                record.set_exit(_start_failed(record.pid, exc))
                container.status = STOPPED
                raise _spawn_failure(exc, "oci_spec") from None
            except SpawnerGone as exc:
                raise Failure("UNAVAILABLE", str(exc)) from None

    async def exec(self, container_id: str, exec_id: str, process_json: bytes) -> int:
        container = self._get(container_id)
        check_id(exec_id, "exec_id")
        if exec_id in container.execs:
            raise Failure("ALREADY_EXISTS", f"exec {exec_id!r} exists in {container_id!r}")
        given = _decode_json(process_json, "process")
        if not isinstance(given, dict):
            raise Failure("INVALID_ARGUMENT", "process: must be an object")
        merged = {k: v for k, v in container.process_spec.items() if k not in NOT_INHERITED}
        merged.update((k, v) for k, v in given.items() if v is not None)
        try:
            process = parse_process(merged, "process")
        except SpecError as exc:
            raise Failure("INVALID_ARGUMENT", str(exc)) from None
        async with container.lock:
            if exec_id in container.execs:
                raise Failure("ALREADY_EXISTS", f"exec {exec_id!r} exists in {container_id!r}")
            if container.removed or container.status != RUNNING:
                raise Failure(
                    "FAILED_PRECONDITION",
                    f"container {container_id!r} is {container.status}, not running",
                )
            console = process.terminal and container.own_devpts
            record = ProcessRecord(container_id, exec_id, process.terminal, console=console)
            record.oom_kills_at_start = self._oom_kills(container)
            # Registered first: the exit may be reported before the reply is read.
            container.execs[exec_id] = record
            try:
                if console:
                    pid, master = await self._spawner.exec_console(
                        container_id, merged, exec_id=exec_id
                    )
                    record.stdio.attach_master(master)
                else:
                    pid = await self._spawner.exec(
                        container_id, merged, stdio=record.stdio.child_fds, exec_id=exec_id
                    )
            except SpawnError as exc:
                record.stdio.abandon()
                record.set_exit(_start_failed(0, exc))
                raise _spawn_failure(exc, "process") from None
            except BaseException as exc:
                record.forget()
                del container.execs[exec_id]
                if isinstance(exc, SpawnerGone):
                    raise Failure("UNAVAILABLE", str(exc)) from None
                raise
            finally:
                record.stdio.close_child_fds()
            record.pid = pid
            return pid

    # --- exits -----------------------------------------------------------------------------

    def _on_exit(self, event: ExitEvent) -> None:
        container = self._containers.get(event.container_id)
        record = container.process(event.exec_id) if container is not None else None
        if container is None or record is None:
            self._log.debug(f"exit of unknown process {event}")
            return
        if not record.pid:
            record.pid = event.pid
        if event.signal is not None:
            # The kernel's OOM killer sends SIGKILL and counts it in memory.events, before the
            # victim can even die: a count above the one at start means this was (very
            # likely) its doing. Any SIGKILL in a group that has seen an OOM kill since the
            # process started is reported as one; the kernel names no victim to do better.
            oom = event.signal == signal.SIGKILL and (
                self._oom_kills(container) > record.oom_kills_at_start
            )
            info = ExitInfo(SIGNALED, event.pid, signal=event.signal, oom_killed=oom)
        else:
            info = ExitInfo(EXITED, event.pid, exit_code=event.exit_code or 0)
        record.set_exit(info)
        if record is container.init:
            container.status = STOPPED
        self._log.debug(f"process {record.name} (pid {event.pid}) ended: {info}")

    def _oom_kills(self, container: Container) -> int:
        if container.cgroup is None:
            return 0
        raw = procfs.read_file(container.cgroup.file("memory.events")) or b""
        for line in raw.splitlines():
            if line.startswith(b"oom_kill "):
                return int(line.split()[1])
        return 0

    async def wait(self, container_id: str, exec_id: str) -> ExitInfo:
        record = self.find_process(container_id, exec_id)
        await record.finished.wait()
        if record.exit is None:
            raise Failure("NOT_FOUND", f"container {container_id!r} was removed")
        return record.exit

    # --- signals ---------------------------------------------------------------------------

    async def signal(self, container_id: str, exec_id: str, signo: int, all_: bool) -> None:
        container = self._get(container_id)
        if not 0 <= signo <= MAX_SIGNAL:
            raise Failure("INVALID_ARGUMENT", f"signal: {signo} is not in 0..{MAX_SIGNAL}")
        record = container.process(exec_id)
        if record is None:
            raise Failure("NOT_FOUND", f"no process {exec_id!r} in container {container_id!r}")
        if all_:
            await self._signal_all(container, signo)
            return
        if not record.running:
            raise Failure("FAILED_PRECONDITION", f"process {record.name} is not running")
        await self._signal_one(record, signo)

    async def _signal_one(self, record: ProcessRecord, signo: int) -> None:
        # Through the spawner: it knows whether the pid is still its unreaped child, so a
        # reused pid is never hit.
        try:
            await self._spawner.signal(record.pid, signo)
        except SpawnError as exc:
            if exc.errno == errno.ESRCH:
                raise Failure("FAILED_PRECONDITION", f"process {record.name} has ended") from None
            raise Failure("INVALID_ARGUMENT", f"signal: {exc.message}") from None
        except SpawnerGone as exc:
            raise Failure("UNAVAILABLE", str(exc)) from None

    async def _signal_all(self, container: Container, signo: int) -> None:
        cgroup = container.cgroup
        killable = cgroup is not None and os.path.exists(cgroup.file("cgroup.kill"))
        if signo == signal.SIGKILL and cgroup is not None and killable:
            cgroup.write_files({"cgroup.kill": "1"})  # atomic: no fork escapes it
            return
        tracked = {r.pid: r for r in container.records() if r.running}
        for pid in self._container_pids(container):
            if pid in tracked:
                try:
                    await self._signal_one(tracked[pid], signo)
                except Failure:
                    pass  # ended meanwhile
                continue
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    def _container_pids(self, container: Container) -> list[int]:
        """Every process of the container: its cgroup's, or else its PID namespace's, or else
        the ones the agent started (natively, with neither cgroup v2 nor a PID namespace)."""
        if container.cgroup is not None:
            return cgroup_tree.procs(container.cgroup)
        pids = {r.pid for r in container.records() if r.running}
        init = container.init
        if container.pid_namespace is not None and init is not None and init.running:
            pids.update(procfs.pid_namespace_members(container.pid_namespace))
        return sorted(pids)

    # --- remove ----------------------------------------------------------------------------

    async def remove(self, container_id: str, timeout_ms: int) -> None:
        container = self._get(container_id)
        async with container.lock:
            if container.removed:
                raise Failure("NOT_FOUND", f"no container {container_id!r}")
            await self._stop_processes(container, timeout_ms / 1000)
            container.removed = True
            problems = []
            for record in container.records():
                record.forget()
            if container.state_dir:
                try:
                    rootfs.teardown(container.state_dir)
                except OSError as exc:
                    problems.append(f"unmounting: {exc}")
            if container.cgroup is not None:
                try:
                    await cgroup_tree.remove(container.cgroup, KILL_DEADLINE_S)
                except (OSError, TimeoutError) as exc:
                    problems.append(f"removing the cgroup: {exc}")
            del self._containers[container_id]
        self._log.debug(f"container {container_id} removed")
        if problems:
            for problem in problems:
                self._log.error(f"remove {container_id}: {problem}")
            message = f"container {container_id!r} removed, but " + "; ".join(problems)
            raise Failure("INTERNAL", message)

    async def _stop_processes(self, container: Container, grace_s: float) -> None:
        init = container.init
        if container.status == PAUSED and container.cgroup is not None:
            # Frozen processes would not act on SIGTERM; SIGKILL reaches them anyway.
            try:
                await cgroup_tree.freeze(container.cgroup, False, CGROUP_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                self._log.warning(f"remove {container.id}: thawing: {exc}")
        if grace_s > 0 and init is not None and init.running:
            try:
                await self._signal_one(init, signal.SIGTERM)
                await asyncio.wait_for(init.exited.wait(), grace_s)
            except (Failure, TimeoutError):
                pass  # ended already, or did not end in time: SIGKILL follows
        try:
            if container.cgroup is not None:
                await cgroup_tree.kill_all(container.cgroup, KILL_DEADLINE_S)
            else:
                await self._signal_all(container, signal.SIGKILL)
            running = [r.exited.wait() for r in container.records() if r.pid and r.exit is None]
            if running:
                await asyncio.wait_for(asyncio.gather(*running), KILL_DEADLINE_S)
        except TimeoutError:
            left = [r.name for r in container.records() if r.exit is None]
            raise Failure(
                "DEADLINE_EXCEEDED",
                f"container {container.id!r}: processes still there {KILL_DEADLINE_S:.0f} s "
                f"after SIGKILL ({', '.join(left) or 'in its cgroup'}); try again",
            ) from None

    # --- pause, resume, update ---------------------------------------------------------------

    async def pause(self, container_id: str) -> None:
        await self._freeze(container_id, True)

    async def resume(self, container_id: str) -> None:
        await self._freeze(container_id, False)

    async def _freeze(self, container_id: str, frozen: bool) -> None:
        container = self._get(container_id)
        async with container.lock:
            if container.cgroup is None:
                raise Failure("FAILED_PRECONDITION", "no cgroup v2 here: containers cannot freeze")
            want = RUNNING if frozen else PAUSED
            if container.removed or container.status != want:
                raise Failure(
                    "FAILED_PRECONDITION",
                    f"container {container_id!r} is {container.status}, not {want}",
                )
            try:
                await cgroup_tree.freeze(container.cgroup, frozen, CGROUP_TIMEOUT_S)
            except TimeoutError as exc:
                if frozen:  # half frozen helps nobody: back to running
                    container.cgroup.write_files({"cgroup.freeze": "0"})
                raise Failure("DEADLINE_EXCEEDED", str(exc)) from None
            except OSError as exc:
                raise Failure("FAILED_PRECONDITION", f"cgroup.freeze: {exc}") from None
            if container.status == want:  # not stopped meanwhile
                container.status = PAUSED if frozen else RUNNING

    async def update(self, container_id: str, resources_json: bytes) -> None:
        container = self._get(container_id)
        value = _decode_json(resources_json, "resources")
        try:
            files = oci_cgroups.resources_to_v2(parse_resources(value, "resources"))
        except SpecError as exc:
            raise Failure("INVALID_ARGUMENT", str(exc)) from None
        async with container.lock:
            if container.cgroup is None:
                raise Failure("FAILED_PRECONDITION", "no cgroup v2 here: resources cannot apply")
            try:
                container.cgroup.write_files(files)
            except OSError as exc:
                raise _cgroup_failure(exc, "resources") from None

    # --- figures and listings --------------------------------------------------------------

    def stats(self, container_id: str) -> Stats:
        container = self._get(container_id)
        cgroup = container.cgroup
        if cgroup is None:
            usage = procfs.usage(self._container_pids(container))
            return Stats(
                cpu_usage_usec=usage.cpu_user_usec + usage.cpu_system_usec,
                cpu_user_usec=usage.cpu_user_usec,
                cpu_system_usec=usage.cpu_system_usec,
                memory_current_bytes=usage.rss_bytes,
                pids_current=usage.pids,
                io_read_bytes=usage.read_bytes,
                io_write_bytes=usage.write_bytes,
            )
        figures = cgroup.stats()
        return Stats(
            cpu_usage_usec=figures.cpu.get("usage_usec", 0),
            cpu_user_usec=figures.cpu.get("user_usec", 0),
            cpu_system_usec=figures.cpu.get("system_usec", 0),
            cpu_nr_throttled=figures.cpu.get("nr_throttled", 0),
            cpu_throttled_usec=figures.cpu.get("throttled_usec", 0),
            memory_current_bytes=figures.memory_current or 0,
            memory_peak_bytes=figures.memory_peak or 0,
            memory_max_bytes=_limit_file(cgroup.file("memory.max")),
            memory_oom_kills=figures.oom_kills,
            pids_current=figures.pids_current or len(cgroup_tree.procs(cgroup)),
            pids_max=_limit_file(cgroup.file("pids.max")),
            io_read_bytes=sum(d.get("rbytes", 0) for d in figures.io.values()),
            io_write_bytes=sum(d.get("wbytes", 0) for d in figures.io.values()),
        )

    def list(self) -> list[ContainerInfo]:
        return [
            ContainerInfo(
                container_id=c.id,
                status=c.status,
                pid=c.init.pid if c.init else 0,
                created_unix=c.created_unix,
                args=c.args,
                rootfs=c.source_rootfs,
                exec_ids=tuple(c.execs),
            )
            for c in self._containers.values()
            if c.status != CREATING and not c.removed
        ]

    def processes(self, container_id: str) -> list[procfs.ProcInfo]:
        container = self._get(container_id)
        found = (procfs.process_info(pid) for pid in self._container_pids(container))
        return [info for info in found if info is not None]

    def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        record = self.find_process(container_id, exec_id)
        if not record.terminal:
            raise Failure("FAILED_PRECONDITION", f"process {record.name} has no terminal")
        if not (0 < rows <= 0xFFFF and 0 < cols <= 0xFFFF):
            raise Failure("INVALID_ARGUMENT", f"rows, cols: {rows}x{cols} is not in 1..65535")
        if not record.stdio.master_open:
            raise Failure("FAILED_PRECONDITION", f"process {record.name} has ended")
        record.stdio.resize(rows, cols)


# --- helpers ---------------------------------------------------------------------------------


def _decode_json(raw: bytes, field: str) -> Any:
    if not raw:
        raise Failure("INVALID_ARGUMENT", f"{field}: is empty")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise Failure("INVALID_ARGUMENT", f"{field}: not valid JSON: {exc}") from None


def _own_mount_namespace(value: Any) -> None:
    """Give the container a mount namespace when its spec has none.

    Without one it would live in the guest's mount table, chrooted at best, where the agent's
    socket and every other container's root are mounted. A malformed spec is left for the
    validation to name.
    """
    if not isinstance(value, dict):
        return
    linux = value.setdefault("linux", {})
    if not isinstance(linux, dict):
        return
    namespaces = linux.get("namespaces")
    if namespaces is None:
        namespaces = linux["namespaces"] = []
    if not isinstance(namespaces, list):
        return
    if not any(isinstance(n, dict) and n.get("type") == "mount" for n in namespaces):
        namespaces.append({"type": "mount"})


def _has_own_devpts(spec: Spec) -> bool:
    """Whether the container mounts a devpts of its own, where its terminals can be made."""
    mount_ns = spec.linux.namespace("mount")
    if mount_ns is None or mount_ns.path:
        return False
    return any(m.type == "devpts" and m.destination.rstrip("/") == "/dev/pts" for m in spec.mounts)


def _start_failed(pid: int, exc: SpawnError) -> ExitInfo:
    return ExitInfo(START_FAILED, pid, step=exc.step, errno=exc.errno, message=exc.message)


def _spawn_failure(exc: SpawnError, spec_field: str) -> Failure:
    if exc.step == "validate":
        return Failure("INVALID_ARGUMENT", f"{spec_field}: {exc.message}")
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else ""
    detail = f" ({name})" if name else ""
    return Failure("FAILED_PRECONDITION", f"{exc.step}: {exc.message}{detail}")


def _cgroup_failure(exc: OSError, field: str) -> Failure:
    # EINVAL/ERANGE: the kernel refused a value; ENOENT: no such file, so the controller is
    # not available here; others: the group itself is in trouble.
    if exc.errno in (errno.EINVAL, errno.ERANGE, errno.EOPNOTSUPP):
        return Failure("INVALID_ARGUMENT", f"{field}: {exc}")
    return Failure("FAILED_PRECONDITION", f"{field}: {exc}")


def _limit_file(path: str) -> int:
    raw = (procfs.read_file(path) or b"").strip()
    return int(raw) if raw.isdigit() else 0  # "max" (or missing): unlimited


def _mapped_root(spec: Spec) -> tuple[int, int]:
    """The guest (uid, gid) that container root maps to: itself without a user namespace."""

    def host_id(mappings) -> int:
        for m in mappings:
            if m.container_id <= 0 < m.container_id + m.size:
                return m.host_id - m.container_id
        return 0

    return host_id(spec.linux.uid_mappings), host_id(spec.linux.gid_mappings)
