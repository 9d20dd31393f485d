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
(``linux.cgroupsPath`` is ignored). OCI hooks run as ``oci.hooks`` says: poststart once start
has exec'd the program, poststop once the container is gone (or a create failed), both by the
spawner, their failures only logged.

Each container's record is kept on disk (``records``) and the spawner outlives the agent, so a
restarted agent adopts the containers a previous one left running (:meth:`Manager.adopt`).
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

from ..events.containers import ContainerObserver
from ..oci import cgroups as oci_cgroups
from ..oci import hooks as oci_hooks
from ..oci.cgroups import Cgroup
from ..oci.spec import Spec, SpecError, parse, parse_process, parse_resources
from ..spawner.client import Adopted, ExitEvent, Spawner, SpawnerGone, SpawnError
from . import adoption, cgroup_tree, procfs, rootfs
from .cgroup_tree import CgroupTree
from .errors import Failure, check_id
from .process import EXITED, SIGNALED, START_FAILED, ExitInfo, ProcessRecord
from .records import RecordStore

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
        self.spec: Spec | None = None  # for its poststart and poststop hooks
        self.bundle = "/"

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
        self._records = RecordStore(os.path.join(settings.run_dir, "records"))
        self._own_pid_namespace = procfs.own_pid_namespace()
        self.observer = ContainerObserver()  # told of starts, exits, removals (events)
        # (source, destination) files bound read-only into every container that shares the
        # sandbox's network: its resolv.conf, hosts, hostname (network.files).
        self.shared_files: tuple[tuple[str, str], ...] = ()
        spawner.on_exit = self._on_exit

    def prepare(self) -> None:
        """At agent start: the shared mount point the containers' directories go under, and
        where their records go."""
        rootfs.prepare_base(self._settings.containers_dir)
        self._records.prepare()

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

    # --- adoption --------------------------------------------------------------------------

    async def adopt(self, adopted: list[Adopted] | None) -> None:
        """At agent start, before serving: take over what a previous agent left.

        ``adopted``: what the spawner a previous agent left reports, every fd now ours; None
        when our spawner is new, so that any container left is beyond reach: torn down.
        Processes in the spawner that no record knows, and records without processes, were
        being made when that agent died; they are undone, as the host was never told they
        exist.
        """
        records, broken = self._records.load_all()
        children = adoption.by_container(adopted or ())
        for container_id, why in broken.items():
            self._log.warning(f"container {container_id}: unreadable record ({why}): removed")
        for container_id, saved in records.items():
            if adopted is None:
                self._log.warning(f"container {container_id}: its spawner is gone: removed")
                continue
            container = Container(container_id)
            try:
                self._restore(container, saved, children.get(container_id, []))
            except (KeyError, TypeError, ValueError, OSError) as exc:
                self._log.error(f"container {container_id}: cannot adopt it ({exc!r}): removed")
                for record in container.records():
                    record.forget()
                continue
            self._containers[container_id] = container
        # From now on exits find their records (some may be queued already).
        self._spawner.listen()
        for container_id, left in children.items():
            adoption.close_fds(left)
            if container_id not in self._containers:
                await self._discard(container_id)
                continue
            for child in left:  # an exec (or a create) under way when the agent died
                if child.state not in (adoption.FAILED, "exited") and child.pid:
                    await self._kill_quietly(child.pid)
        await self._remove_debris()
        if adopted is not None:
            self._log.info(
                f"adopted {len(self._containers)} containers"
                f" ({sum(len(c.records()) for c in self._containers.values())} processes)"
            )

    def _restore(
        self, container: Container, saved: dict[str, Any], children: list[Adopted]
    ) -> None:
        """Rebuild ``container`` from its record and the spawner's ``children`` of it."""
        container.created_unix = float(saved["created_unix"])
        container.process_spec = dict(saved["process_spec"])
        container.args = tuple(saved["args"])
        container.source_rootfs = saved["source_rootfs"]
        container.state_dir = saved["state_dir"]
        if saved["cgroup"] and self._cgroups is not None:
            container.cgroup = self._cgroups.cgroup(container.id)
        if saved["pid_namespace"]:
            container.pid_namespace = tuple(saved["pid_namespace"])  # type: ignore[assignment]
        container.own_devpts = bool(saved["own_devpts"])
        init_state = ""
        to_kill: list[ProcessRecord] = []
        for process in saved["processes"]:
            exec_id = str(process["exec_id"])
            pid = int(process["pid"])
            terminal, console = bool(process["terminal"]), bool(process["console"])
            oom_kills, started = int(process["oom_kills_at_start"]), float(process["started_unix"])
            child = adoption.take(children, exec_id, pid)
            try:
                record = ProcessRecord(
                    container.id,
                    exec_id,
                    terminal,
                    console=console,
                    offsets_path=self._records.offsets_path(container.id, exec_id),
                    adopted=dict(child.fds) if child is not None else {},
                )
            except BaseException:
                adoption.close_fds([child] if child is not None else [])
                raise
            record.pid = pid or (child.pid if child is not None else 0)
            record.oom_kills_at_start = oom_kills
            record.started_unix = started
            self._track(container, record)
            if exec_id:
                container.execs[exec_id] = record
            else:
                container.init = record
                init_state = child.state if child is not None else ""
            start_failed = adoption.restored_exit(process["start_failed"])
            if start_failed is not None:
                record.set_exit(start_failed)
            elif child is None:
                record.set_exit(adoption.unknown_exit(record.pid))
            elif child.exit is not None:
                self._record_exit(container, record, child.exit)
            elif child.state == adoption.FAILED:
                record.stdio.abandon()
                record.set_exit(adoption.failed_exit(child))
            elif child.state == adoption.STARTING:
                to_kill.append(record)  # the host never heard it started
        if container.init is None:
            raise ValueError("no process of its own")
        if container.init.exit is not None:
            container.status = STOPPED
        elif init_state == adoption.CREATED:
            container.status = CREATED
        elif container.cgroup is not None and _frozen(container.cgroup):
            container.status = PAUSED
        else:
            container.status = RUNNING
        for record in to_kill:
            if record.pid:
                self._spawner.post("signal", pid=record.pid, signal=int(signal.SIGKILL))

    async def _kill_quietly(self, pid: int) -> None:
        try:
            await self._spawner.signal(pid, signal.SIGKILL)
        except (SpawnError, SpawnerGone):
            pass  # ended meanwhile: its exit is on its way

    async def _discard(self, container_id: str) -> None:
        try:
            await self._spawner.discard(container_id)
        except (SpawnError, SpawnerGone) as exc:
            self._log.warning(f"container {container_id}: cannot discard its processes: {exc}")

    async def _remove_debris(self) -> None:
        """Whatever no container claims: the records directory, mounts and cgroups of a
        container that a previous agent was making, or one it left beyond reach."""
        known = set(self._containers)
        for name in _listdir(self._records.directory):
            if name not in known:
                self._records.delete(name)
        for name in _listdir(self._settings.containers_dir):
            if name not in known:
                try:
                    rootfs.teardown(os.path.join(self._settings.containers_dir, name))
                except OSError as exc:
                    self._log.warning(f"leftover {name}: unmounting: {exc}")
        if self._cgroups is None:
            return
        for name in _listdir(self._cgroups.containers):
            cgroup = self._cgroups.cgroup(name)
            if name not in known and os.path.isdir(cgroup.path):
                try:
                    await cgroup_tree.remove(cgroup, KILL_DEADLINE_S)
                except (OSError, TimeoutError) as exc:
                    self._log.warning(f"leftover cgroup {name}: {exc}")

    # --- lookup ----------------------------------------------------------------------------

    def _get(self, container_id: str) -> Container:
        container = self._containers.get(container_id)
        if container is None or container.status == CREATING or container.removed:
            raise Failure("NOT_FOUND", f"no container {container_id!r}")
        return container

    def container(self, container_id: str) -> Container:
        """The container (NOT_FOUND while it is being created or once removed)."""
        return self._get(container_id)

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
        if self.shared_files:
            from ..network.files import add_container_binds

            add_container_binds(value, self.shared_files, lower)

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
        try:
            self._records.create_dir(container_id)
        except OSError as exc:
            raise Failure("FAILED_PRECONDITION", f"the container's record: {exc}") from None
        undo.append(lambda: self._records.delete(container_id))
        record = ProcessRecord(
            container_id,
            "",
            spec.process.terminal,
            console=console,
            offsets_path=self._records.offsets_path(container_id, ""),
        )
        undo.append(record.forget)
        self._track(container, record)
        container.init = record
        container.process_spec = dict(value["process"])
        container.args = spec.process.args
        container.spec = spec
        container.bundle = bundle_dir or "/"
        cgroup_path = container.cgroup.path if container.cgroup else ""
        undo.append(lambda: self._forget(container_id))  # whatever the spawner got to make
        # A create that fails from here on (a hook, say) ends like a removal: poststop hooks
        # once everything else is undone (runtime spec, lifecycle steps 12 and 13).
        undo.insert(0, lambda: self._run_hooks(container, "poststop", "stopped"))
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
                    keep=record.stdio.kept_fds,
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
        self._save(container)
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
                self._save(container)
                self.observer.exited(container, record)
                raise _spawn_failure(exc, "oci_spec") from None
            except SpawnerGone as exc:
                raise Failure("UNAVAILABLE", str(exc)) from None
            self._save(container)
            self.observer.started(container)
            await self._run_hooks(container, "poststart", "running", record.pid)

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
            record = ProcessRecord(
                container_id,
                exec_id,
                process.terminal,
                console=console,
                offsets_path=self._records.offsets_path(container_id, exec_id),
            )
            record.oom_kills_at_start = self._oom_kills(container)
            self._track(container, record)
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
                        container_id,
                        merged,
                        stdio=record.stdio.child_fds,
                        exec_id=exec_id,
                        keep=record.stdio.kept_fds,
                    )
            except SpawnError as exc:
                record.stdio.abandon()
                record.set_exit(_start_failed(0, exc))
                self._save(container)
                self.observer.exited(container, record)
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
            self._save(container)
            return pid

    # --- records, and what the spawner keeps -------------------------------------------------

    def _track(self, container: Container, record: ProcessRecord) -> None:
        """Tell the spawner when its copies of the process's stdio are no longer needed."""
        container_id, exec_id = container.id, record.exec_id

        def stdin_closed() -> None:
            if record.exit is None and not record.forgotten:  # an ended one's is gone already
                self._spawner.post("drop_stdin", container_id=container_id, exec_id=exec_id)

        def finished() -> None:
            self._spawner.post("release", container_id=container_id, exec_id=exec_id)

        record.stdio.on_stdin_closed = stdin_closed
        record.on_finished = finished

    def _save(self, container: Container) -> None:
        try:
            self._records.save(container.id, _record_of(container))
        except OSError as exc:
            # The container works on; only an agent after this one would not know it.
            self._log.error(f"container {container.id}: cannot write its record: {exc}")

    async def _forget(self, container_id: str) -> None:
        try:
            await self._spawner.forget(container_id)
        except (SpawnError, SpawnerGone):
            pass  # it never had the container, or it is gone with all it had

    # --- exits -----------------------------------------------------------------------------

    def _on_exit(self, event: ExitEvent) -> None:
        container = self._containers.get(event.container_id)
        record = container.process(event.exec_id) if container is not None else None
        if container is None or record is None or (record.pid and record.pid != event.pid):
            # (another pid: a process an agent before us left half-made, killed on adoption)
            self._log.debug(f"exit of unknown process {event}")
            return
        info = self._record_exit(container, record, event)
        self.observer.exited(container, record)
        self._log.debug(f"process {record.name} (pid {event.pid}) ended: {info}")

    def _record_exit(
        self, container: Container, record: ProcessRecord, event: ExitEvent
    ) -> ExitInfo:
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
        return info

    async def _run_hooks(self, container: Container, kind: str, status: str, pid: int = 0) -> None:
        """poststart or poststop hooks, which the spawner runs (see ``oci.hooks``); a failure
        is logged, never the operation's (runtime spec, lifecycle steps 9 and 13)."""
        spec = container.spec
        todo = oci_hooks.of(spec.hooks, kind) if spec is not None else ()
        if spec is None or not todo:
            return
        state = oci_hooks.state(spec, container.id, container.bundle, status, pid)
        try:
            await self._spawner.run_hooks(kind, oci_hooks.encode(todo), state)
        except (SpawnError, SpawnerGone) as exc:
            self._log.warning(f"container {container.id}: {exc}")

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
            self.observer.removed(container)
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
            # While the id is still ours: a new container of that id must keep its records.
            await self._forget(container_id)
            self._records.delete(container_id)
            del self._containers[container_id]
        await self._run_hooks(container, "poststop", "stopped")
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
                self._save(container)

    async def update(self, container_id: str, resources_json: bytes) -> None:
        container = self._get(container_id)
        value = _decode_json(resources_json, "resources")
        try:
            resources = parse_resources(value, "resources")
            files = oci_cgroups.resources_to_v2(resources)
        except SpecError as exc:
            raise Failure("INVALID_ARGUMENT", str(exc)) from None
        async with container.lock:
            if container.cgroup is None:
                raise Failure("FAILED_PRECONDITION", "no cgroup v2 here: resources cannot apply")
            try:
                container.cgroup.write_files(files)
                container.cgroup.set_devices(resources.devices)  # replaces the program, if any
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


def _record_of(container: Container) -> dict[str, Any]:
    """What an agent after this one needs to know about ``container`` (see ``records``)."""
    return {
        "id": container.id,
        "status": container.status,
        "created_unix": container.created_unix,
        "process_spec": container.process_spec,
        "args": list(container.args),
        "source_rootfs": container.source_rootfs,
        "state_dir": container.state_dir,
        "cgroup": container.cgroup is not None,
        "pid_namespace": list(container.pid_namespace) if container.pid_namespace else None,
        "own_devpts": container.own_devpts,
        "processes": [
            {
                "exec_id": r.exec_id,
                "pid": r.pid,
                "terminal": r.terminal,
                "console": r.console,
                "oom_kills_at_start": r.oom_kills_at_start,
                "started_unix": r.started_unix,
                # Start failures are the agent's alone; every other exit the spawner keeps.
                "start_failed": r.exit._asdict()
                if r.exit is not None and r.exit.kind == START_FAILED
                else None,
            }
            for r in container.records()
        ],
    }


def _listdir(directory: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(directory) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _frozen(cgroup: Cgroup) -> bool:
    return (procfs.read_file(cgroup.file("cgroup.freeze")) or b"").strip() == b"1"


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
