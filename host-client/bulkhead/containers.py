"""``Container``: one container in a sandbox, and the calls that make and run them.

>>> with Sandbox.get("demo") as sb:                       # doctest: +SKIP
...     c = sb.create_container(["sleep", "60"], name="web")
...     c.start()
...     print(c.exec(["ps"]).communicate()[0].decode())
...     c.remove()

``Sandbox.run()`` is the one-call form: create, attach, start, and (by default) remove the
container once its process has exited.
"""

from __future__ import annotations

import re
import secrets
import signal as signals
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import spec as specs
from .details import ContainerInfo, ContainerStats, ProcessExit, ProcessInfo
from .errors import BulkheadError, FailedPrecondition, NotFound
from .process import Process

if TYPE_CHECKING:
    from .client import AgentClient

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def new_id() -> str:
    """A fresh container or exec id: 12 hex digits, as docker's short ids look."""
    return secrets.token_hex(6)


def check_id(value: str, what: str = "container id") -> str:
    """``value`` if the agent would accept it as an id; a clear error before any RPC if not."""
    if not _ID.fullmatch(value):
        raise BulkheadError(
            f"bad {what} {value!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


class Container:
    """A container in a sandbox's guest, by id. Cheap to make: it holds no connection of its own.

    Its own process (``exec_id=""``) is ``process`` once it has been attached; ``start()`` lets
    it run. As a context manager the container is removed on exit.
    """

    def __init__(self, client: AgentClient, container_id: str, *, tty: bool = False) -> None:
        self.client = client
        self.id = container_id
        self.tty = tty
        self.process: Process | None = None
        # The exit the agent recorded when start() found the command could not run.
        self.start_failure: ProcessExit | None = None

    def __repr__(self) -> str:
        return f"Container({self.id!r})"

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.remove(timeout=0)
        except NotFound:
            pass

    # -- lifecycle --

    @classmethod
    def create(
        cls,
        client: AgentClient,
        spec: Mapping[str, Any] | bytes,
        *,
        name: str | None = None,
        bundle_dir: str = "",
        rootfs_storage: str = "",
        storages: Sequence[Any] = (),
    ) -> Container:
        """Create a container from a full OCI spec (dict or ``config.json`` bytes).

        ``rootfs_storage`` and ``storages``: see ``AgentClient.create_container``.
        """
        container_id = check_id(name) if name else new_id()
        client.create_container(
            container_id,
            spec if isinstance(spec, bytes) else dict(spec),
            bundle_dir,
            rootfs_storage=rootfs_storage,
            storages=storages,
        )
        tty = False
        if isinstance(spec, Mapping):
            tty = bool(spec.get("process", {}).get("terminal", False))
        return cls(client, container_id, tty=tty)

    def attach(self, *, stdin: bool = True) -> Process:
        """Stream the container's own process's stdio (before ``start()``: from its first byte).

        With ``stdin=False`` the process's stdin gets EOF at once (with a terminal, it is
        simply never written), as ``docker run`` without ``-i``.
        """
        if self.process is None:
            self.process = Process(self.client, self.id, tty=self.tty)
        self.process.reattach()
        if not stdin and not self.tty and self.process.attachment is not None:
            self.process.attachment.close_stdin()
        return self.process

    def start(self) -> Process:
        """Let the container's process run its command; returns ``process`` (made if need be).

        A command that cannot be started (missing, not executable) is an outcome, not an
        error: the agent refuses the start but records a ``start_failed`` exit, which the
        process then reports like any other exit (``returncode`` 127 or 126). That exit is
        also ``start_failure``, for callers that must refuse the start (a containerd shim).
        """
        try:
            self.client.start_container(self.id)
        except FailedPrecondition:
            self.start_failure = self._recorded_start_failure()
            if self.start_failure is None:
                raise
        if self.process is None:
            self.process = Process(self.client, self.id, tty=self.tty)
        return self.process

    def _recorded_start_failure(self) -> ProcessExit | None:
        try:
            exit = self.client.wait_process(self.id, "", timeout=5)
        except BulkheadError:
            return None
        return exit if exit.kind == "start_failed" else None

    def wait(self, timeout: float | None = None) -> ProcessExit:
        """Wait for the container's own process to exit (``ProcessTimeout`` after ``timeout``)."""
        return self.client.wait_process(self.id, "", timeout=timeout)

    def remove(self, timeout: float = 10) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``timeout`` seconds) and delete it."""
        if self.process is not None:
            self.process.detach()
        self.client.remove_container(self.id, timeout=timeout)

    # -- processes --

    def exec(
        self,
        args: Iterable[str],
        *,
        env: Iterable[str] | Mapping[str, str] = (),
        cwd: str | None = None,
        user: str | int | None = None,
        tty: bool = False,
        stdin: bool = False,
        exec_id: str | None = None,
    ) -> Process:
        """Run another process in this (running) container; unset options are the container's.

        Stdio is attached before the process starts, so no output is missed.
        """
        process = specs.make_exec_process(args, env=env, cwd=cwd, user=user, terminal=tty)
        exec_id = check_id(exec_id, "exec id") if exec_id else new_id()
        pid = self.client.exec_process(self.id, exec_id, process)
        proc = Process(self.client, self.id, exec_id, pid=pid, tty=tty)
        proc.reattach()
        if not stdin and not tty and proc.attachment is not None:
            proc.attachment.close_stdin()
        return proc

    def signal(self, sig: int = signals.SIGTERM, *, all: bool = False) -> None:
        """Send ``sig`` to the container's process, or with ``all`` to every process in it."""
        self.client.signal_process(self.id, "", int(sig), all=all)

    def kill(self, sig: int = signals.SIGKILL, *, all: bool = False) -> None:
        """``signal()`` with SIGKILL as the default, like ``docker kill``."""
        self.signal(sig, all=all)

    def processes(self) -> list[ProcessInfo]:
        """Every process in the container's cgroup (guest pids)."""
        return self.client.list_processes(self.id)

    # -- resources --

    def pause(self) -> None:
        """Freeze every process of the container."""
        self.client.pause_container(self.id)

    def resume(self) -> None:
        self.client.resume_container(self.id)

    def update(
        self,
        resources: Mapping[str, Any] | None = None,
        *,
        memory_limit: int | str | None = None,
        cpus_limit: float | None = None,
        pids_limit: int | None = None,
    ) -> None:
        """Change limits: an OCI ``linux.resources`` object, or the same keywords as ``run``."""
        merged = dict(resources or {})
        merged.update(
            specs.make_resources(
                memory_limit=memory_limit, cpus_limit=cpus_limit, pids_limit=pids_limit
            )
        )
        self.client.update_container(self.id, merged)

    def stats(self) -> ContainerStats:
        return self.client.container_stats(self.id)

    def info(self) -> ContainerInfo:
        """The agent's view: status (``created``, ``running``, ``paused``, ``stopped``), pid..."""
        for info in self.client.list_containers():
            if info.container_id == self.id:
                return info
        raise NotFound(f"no container {self.id!r} in this sandbox", method="ListContainers")

    @property
    def status(self) -> str:
        return self.info().status


def run(
    client: AgentClient,
    args: Iterable[str] | None = None,
    *,
    spec: Mapping[str, Any] | bytes | None = None,
    bundle_dir: str = "",
    name: str | None = None,
    stdin: bool = False,
    remove: bool = True,
    **options: Any,
) -> Process:
    """Create a container, attach to it, start it; the ``Process`` to read and wait on.

    ``options`` are ``make_spec``'s (``env``, ``cwd``, ``user``, ``tty``, ``memory_limit``,
    ...); or give a whole ``spec``. With ``remove`` the container is removed once the exit
    is in (or when the process is closed before that).
    """
    container = create(client, args, spec=spec, bundle_dir=bundle_dir, name=name, **options)
    try:
        proc = container.attach(stdin=stdin)
        if remove:
            proc._on_exit = lambda: _remove_quietly(container)
        container.start()
    except BaseException:
        _remove_quietly(container)
        raise
    return proc


def create(
    client: AgentClient,
    args: Iterable[str] | None = None,
    *,
    spec: Mapping[str, Any] | bytes | None = None,
    bundle_dir: str = "",
    name: str | None = None,
    tty: bool = False,
    **options: Any,
) -> Container:
    """A created (not yet started) container from ``args`` and ``make_spec`` options or ``spec``.

    Storage options go with either: ``rootfs_storage``, ``storages`` (see
    ``AgentClient.create_container``) and ``volumes`` (OCI mounts, ``bulkhead.storage.volume``).
    """
    storage = {k: options.pop(k) for k in ("rootfs_storage", "storages") if k in options}
    volumes = list(options.pop("volumes", None) or ())
    if spec is None:
        if args is None:
            raise BulkheadError("give the command (args) or a whole spec")
        container_id = check_id(name) if name else new_id()
        options.setdefault("hostname", container_id)
        spec = specs.make_spec(args, terminal=tty, **options)
        spec["mounts"] += volumes
        return Container.create(client, spec, name=container_id, bundle_dir=bundle_dir, **storage)
    if args is not None or options or tty:
        raise BulkheadError("give either a spec or args and options, not both")
    if volumes:
        if isinstance(spec, bytes):
            raise BulkheadError("volumes need the spec as a dict, not bytes")
        spec = {**spec, "mounts": [*spec.get("mounts", []), *volumes]}
    return Container.create(client, spec, name=name, bundle_dir=bundle_dir, **storage)


def _remove_quietly(container: Container) -> None:
    try:
        container.client.remove_container(container.id, timeout=0)
    except NotFound:
        pass
