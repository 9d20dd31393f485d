"""On-disk sandbox state: one directory per sandbox under the state directory.

A sandbox is alive exactly while its ``monitor.lock`` is flock()ed: ``up``
takes the lock before it writes anything and hands the locked file to the
monitor, which holds it until it exits. Unlike a pid, a lock cannot be
mistaken for an unrelated process that happens to reuse the number.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .errors import SandboxError, SandboxNotFound

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAX_UNIX_PATH = 107


def default_state_dir() -> Path:
    """``$BULKHEAD_STATE_DIR``, else ``/run/bulkhead`` (root) or ``$XDG_RUNTIME_DIR/bulkhead``."""
    if env := os.environ.get("BULKHEAD_STATE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/bulkhead")
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime, "bulkhead")
    return Path(f"/tmp/bulkhead-{os.getuid()}")


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise SandboxError(
            f"bad sandbox name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class SandboxPaths:
    """Where a sandbox's files live (see docs/internals.md, "Host side")."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def root(self) -> Path:
        return self.dir.parent

    state = property(lambda self: self.dir / "state.json")
    lock = property(lambda self: self.dir / "monitor.lock")
    console_log = property(lambda self: self.dir / "console.log")
    console_sock = property(lambda self: self.dir / "console.sock")
    qmp_sock = property(lambda self: self.dir / "qmp.sock")
    serial_sock = property(lambda self: self.dir / "serial.sock")
    agent_sock = property(lambda self: self.dir / "agent.sock")
    monitor_log = property(lambda self: self.dir / "monitor.log")
    # The userspace vsock backend (transport "vhost-user-vsock"): QEMU's vhost-user
    # socket, and the hybrid vsock socket host programs CONNECT through. A guest
    # connection to host port P reaches "vsock.sock_P" (whoever listens there).
    vhost_user_sock = property(lambda self: self.dir / "vhost-vsock.sock")
    vsock_uds = property(lambda self: self.dir / "vsock.sock")

    def sockets(self) -> list[Path]:
        return [
            self.agent_sock,
            self.serial_sock,
            self.qmp_sock,
            self.console_sock,
            self.vhost_user_sock,
            self.vsock_uds,
        ]

    def check_socket_paths(self) -> None:
        # "_4294967295": the longest guest-to-host port socket the backend may name.
        longest = max(
            [*self.sockets(), Path(f"{self.vsock_uds}_4294967295")],
            key=lambda p: len(os.fsencode(p)),
        )
        if len(os.fsencode(longest)) > _MAX_UNIX_PATH:
            raise SandboxError(
                f"unix socket path {longest} is longer than {_MAX_UNIX_PATH} bytes: "
                "use a shorter state directory or sandbox name"
            )


def read_state(paths: SandboxPaths) -> dict[str, Any]:
    try:
        return json.loads(paths.state.read_text())
    except FileNotFoundError:
        raise SandboxNotFound(f"no sandbox named {paths.name!r} in {paths.root}") from None
    except (OSError, ValueError) as exc:
        raise SandboxError(f"cannot read {paths.state}: {exc}") from exc


def write_state(paths: SandboxPaths, state: dict[str, Any]) -> None:
    """Replace state.json atomically: readers never see half a file."""
    tmp = paths.dir / f".state.json.{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, paths.state)


def update_state(paths: SandboxPaths, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into state.json (only the monitor writes after ``up``)."""
    with _update_lock:
        state = read_state(paths)
        state.update(changes)
        write_state(paths, state)
        return state


# The monitor updates its state from its main thread and its stop thread.
_update_lock = threading.Lock()


def lock_held(path: Path) -> bool:
    """Whether some process holds the flock on ``path`` (False if it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # also drops the probe's own shared lock
    return False


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if ``started`` is given, is that same process."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 0.5
    except psutil.Error:
        return False


def is_alive(paths: SandboxPaths, state: dict[str, Any] | None = None) -> bool:
    if paths.lock.exists():
        return lock_held(paths.lock)
    # No lock file: a state written by hand or by an older version; trust the pid.
    if state is None:
        try:
            state = read_state(paths)
        except SandboxError:
            return False
    return pid_alive(state.get("monitor_pid"), state.get("monitor_started"))


def wait_gone(pid: int | None, started: float | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a process (not necessarily our child) to end."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid, started):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def kill(pid: int | None, started: float | None, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` only if it is still the process recorded (pids get reused)."""
    if pid and pid_alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def state_lock(root: Path) -> Iterator[None]:
    """Serialise creating and removing sandboxes in ``root`` between processes."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SandboxInfo:
    """Host-side facts about one sandbox, from its state directory."""

    name: str
    status: str  # starting, booting, running, stopping; "dead" once the monitor is gone
    dir: Path
    created: float = 0.0
    monitor_pid: int | None = None
    qemu_pid: int | None = None
    image: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    accel: str | None = None
    cpu: str | None = None
    vsock_cid: int | None = None
    transport: str | None = None  # vhost-vsock, vhost-user-vsock or serial
    exit_code: int | None = None
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def alive(self) -> bool:
        return self.status != "dead"

    @classmethod
    def load(cls, paths: SandboxPaths) -> SandboxInfo:
        state = read_state(paths)
        qemu = state.get("qemu", {})
        status = state.get("status", "unknown") if is_alive(paths, state) else "dead"
        return cls(
            name=paths.name,
            status=status,
            dir=paths.dir,
            created=state.get("created", 0.0),
            monitor_pid=state.get("monitor_pid"),
            qemu_pid=state.get("qemu_pid"),
            image=state.get("image"),
            memory_mib=qemu.get("memory_mib"),
            cpus=qemu.get("cpus"),
            accel=qemu.get("accel"),
            cpu=qemu.get("cpu"),
            vsock_cid=qemu.get("vsock_cid") if state.get("vsock") else None,
            transport=state.get("transport"),
            exit_code=state.get("exit_code"),
            state=state,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "dir": str(self.dir),
            "created": self.created,
            "monitor_pid": self.monitor_pid,
            "qemu_pid": self.qemu_pid,
            "image": self.image,
            "memory_mib": self.memory_mib,
            "cpus": self.cpus,
            "accel": self.accel,
            "cpu": self.cpu,
            "vsock_cid": self.vsock_cid,
            "transport": self.transport,
            "exit_code": self.exit_code,
        }


def list_sandboxes(root: Path) -> list[SandboxInfo]:
    """Every sandbox in ``root``, sorted by name; those whose monitor is gone are "dead"."""
    if not root.is_dir():
        return []
    infos = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        paths = SandboxPaths(entry)
        if not paths.state.exists():
            if not lock_held(paths.lock) and _stale(entry):
                # A directory from an ``up`` that died before writing its state.
                infos.append(SandboxInfo(entry.name, "dead", entry))
            continue
        try:
            infos.append(SandboxInfo.load(paths))
        except SandboxError:
            infos.append(SandboxInfo(entry.name, "dead", entry))
    return infos


def _stale(path: Path, age: float = 60.0) -> bool:
    try:
        return time.time() - path.stat().st_mtime > age
    except OSError:
        return False


def remove_dead(paths: SandboxPaths) -> None:
    """Remove a dead sandbox's directory, first ending a QEMU its monitor left behind."""
    try:
        state = read_state(paths)
    except SandboxError:
        state = {}
    kill(state.get("qemu_pid"), state.get("qemu_started"))
    wait_gone(state.get("qemu_pid"), state.get("qemu_started"), 5.0)
    shutil.rmtree(paths.dir, ignore_errors=True)


def cleanup_dead(root: Path) -> list[str]:
    """Remove every dead sandbox in ``root``; returns their names."""
    removed = []
    with state_lock(root):
        for info in list_sandboxes(root):
            paths = SandboxPaths(info.dir)
            # Checked again under the lock: an ``up`` may have just replaced it.
            if info.status == "dead" and not is_alive(paths):
                remove_dead(paths)
                removed.append(info.name)
    return removed
