"""``Sandbox``: a guest VM with its agent, from the host's side.

>>> with Sandbox.up("demo", memory_mib=512) as sb:
...     print(sb.agent.guest_details().kernel_release)

``up`` boots a VM under a detached monitor process and waits for the agent;
``get`` finds one that is running; ``down`` stops it in order (agent Shutdown)
and by force if it must, and removes its state.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import containers
from .client import AgentClient
from .containers import Container
from .details import ContainerInfo, GuestDetails
from .errors import (
    AgentError,
    BootError,
    DeadlineExceeded,
    ImageNotFound,
    QemuError,
    SandboxError,
    SandboxExists,
    SandboxNotFound,
)
from .qemu import (
    VIA_SERIAL,
    VIA_VHOST_USER,
    VIA_VHOST_VSOCK,
    QemuConfig,
    choose_accel,
    choose_transport,
    kernel_cmdline,
)
from .qmp import Qmp
from .sandbox_network import (
    SandboxNetwork,
    cleanup_nics,
    create_namespaces,
    prepare_nics,
    resolve_network,
)
from .sandbox_storage import NinePShare, SandboxStorage, check_ninep_shares
from .state import (
    SandboxInfo,
    SandboxPaths,
    cleanup_dead,
    default_state_dir,
    is_alive,
    kill,
    list_sandboxes,
    read_state,
    remove_dead,
    state_lock,
    validate_name,
    wait_gone,
    write_state,
)

if TYPE_CHECKING:
    from .events import Event
    from .process import Process

log = logging.getLogger(__name__)

KVM_PROBE_CACHE = "kvm-probe.json"
SHUTDOWN_REPLY_GRACE = 2.0
FIRST_VSOCK_CID = 3  # 0-2 are reserved (hypervisor, local, host)
DEFAULT_HOTPLUG_PORTS = 4
PMEM_ADDRESS_SPACE_MIB = 16 * 1024  # guest-physical room for virtio-pmem images


@dataclass(frozen=True)
class SandboxDetails:
    """``Sandbox.info()``: the host's view and the guest's."""

    sandbox: SandboxInfo
    guest: GuestDetails

    def to_dict(self) -> dict[str, Any]:
        return {"sandbox": self.sandbox.to_dict(), "guest": self.guest.to_dict()}


class Sandbox(SandboxStorage, SandboxNetwork):
    """One sandbox VM, found by name in a state directory.

    Create one with ``Sandbox.up()`` or find one with ``Sandbox.get()``. As a
    context manager it takes the sandbox down on exit.
    """

    def __init__(self, paths: SandboxPaths) -> None:
        self.paths = paths
        self.boot_seconds: float | None = None  # set by up(): spawn to agent ready
        self._agent: AgentClient | None = None

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r}, state_dir={str(self.paths.root)!r})"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- finding sandboxes --

    @classmethod
    def get(cls, name: str, *, state_dir: str | os.PathLike[str] | None = None) -> Sandbox:
        """The sandbox called ``name`` (alive or dead); ``SandboxNotFound`` if there is none."""
        paths = SandboxPaths(_root(state_dir) / validate_name(name))
        if not paths.dir.is_dir():
            raise SandboxNotFound(f"no sandbox named {name!r} in {paths.root}")
        read_state(paths)  # SandboxNotFound when it was never fully created
        return cls(paths)

    @staticmethod
    def list(state_dir: str | os.PathLike[str] | None = None) -> list[SandboxInfo]:
        """All sandboxes, the dead ones (monitor gone) with status ``"dead"``."""
        return list_sandboxes(_root(state_dir))

    @staticmethod
    def cleanup_dead(state_dir: str | os.PathLike[str] | None = None) -> list[str]:
        """Remove the state of every dead sandbox; returns their names."""
        return cleanup_dead(_root(state_dir))

    # -- creating one --

    @classmethod
    def up(
        cls,
        name: str,
        *,
        memory_mib: int = 512,
        cpus: int = 1,
        image: str | os.PathLike[str] | None = None,
        accel: str = "auto",
        boot_timeout: float = 120.0,
        state_dir: str | os.PathLike[str] | None = None,
        machine: str = "q35",
        debug_console: bool = False,
        log_level: str | None = None,
        extra_cmdline: Sequence[str] = (),
        hotplug_ports: int = DEFAULT_HOTPLUG_PORTS,
        shared_memory: bool = False,
        pmem_slots: int = 0,
        ninep_shares: Iterable[NinePShare | str] = (),
        nics: Iterable[Any] = (),
        publish: Iterable[str] = (),
        network: Any = None,
        transport: str | None = None,
    ) -> Sandbox:
        """Boot a sandbox VM and wait until its agent is ready.

        ``image`` is an image directory (default: the newest one in the cache);
        ``accel`` is ``"auto"`` (KVM if a probe shows it works, else TCG),
        ``"kvm"`` or ``"tcg"``. Raises ``SandboxExists`` if a live sandbox has
        that name, ``ImageNotFound``, or ``BootError`` (with the console log's
        tail) if the agent is not ready within ``boot_timeout`` seconds; a
        failed sandbox leaves nothing behind. ``hotplug_ports`` empty PCIe ports
        take hot-plugged disks and shares (``add_disk``, ``add_share``);
        ``shared_memory`` is what virtio-fs shares need (``add_share``);
        ``pmem_slots`` memory-device slots take virtio-pmem images (``add_pmem``).
        ``ninep_shares`` host directories shared over 9p (``NinePShare``s or
        ``"HOSTDIR:TAG[:ro]"``), mounted with ``add_9p(TAG)``.
        ``nics`` are virtio-net NICs from boot (``"user"``, ``"tap,netns=NS"``, ``Nic``s;
        see ``bulkhead.nics``), ``publish`` host ports forwarded to the guest
        (``"8080:80"``, on the first user-mode NIC, one added if needed), and ``network``
        the spec applied once the agent is ready (a ``NetworkSpec``, dict or JSON file;
        default: the one the NICs imply; ``False``: none). See ``bulkhead.network``.
        ``transport`` is the agent's channel (``bulkhead.qemu.choose_transport``):
        ``"auto"`` (default; ``$BULKHEAD_TRANSPORT`` overrides it), ``"vsock"`` (the
        kernel's vhost-vsock, else the userspace ``bulkhead.vhost_vsock`` backend, which
        implies ``shared_memory``), ``"serial"``, or a mode by name.
        """
        root = _root(state_dir)
        paths = SandboxPaths(root / validate_name(name))
        paths.check_socket_paths()
        if memory_mib < 64 or cpus < 1:
            raise SandboxError(f"need at least 64 MiB and 1 CPU, not {memory_mib} MiB, {cpus}")
        _refuse_live(paths)
        shares_9p = check_ninep_shares(ninep_shares)
        boot_nics = prepare_nics(name, nics, publish)
        network_spec = resolve_network(network, boot_nics)  # a bad spec fails before booting
        img = _load_image(image)
        try:
            choice = choose_accel(accel, kernel=Path(img.kernel), cache_file=root / KVM_PROBE_CACHE)
        except (ValueError, FileNotFoundError) as exc:
            raise SandboxError(str(exc)) from exc
        try:
            via = choose_transport(transport)
        except ValueError as exc:
            raise SandboxError(str(exc)) from exc
        vsock = via != VIA_SERIAL
        if via == VIA_VHOST_USER:
            shared_memory = True  # the backend maps guest RAM to reach the virtqueues
        options: dict[str, object] = {
            # The serial port stays in every sandbox: the agent's fallback channel.
            "serial_port": "bulkhead.agent",
            # Without a vsock device the agent need not try to listen on one.
            "vsock_port": 1024 if vsock else 0,
        }
        if debug_console:
            options["debug_console"] = True
        if log_level:
            options["log"] = log_level
        options["hostname"] = name if _hostname_ok(name) else "bulkhead"

        started = time.monotonic()
        with state_lock(root):
            _refuse_live(paths)
            if paths.dir.exists():
                remove_dead(paths)
            cfg = QemuConfig(
                kernel=Path(img.kernel),
                initrd=Path(img.initramfs),
                cmdline=kernel_cmdline(img.manifest.get("cmdline", ""), options, extra_cmdline),
                memory_mib=memory_mib,
                cpus=cpus,
                machine=machine,
                name=name,
                console_log=paths.console_log,
                console_socket=paths.console_sock,
                serial_socket=paths.serial_sock,
                qmp_socket=paths.qmp_sock,
                vsock_cid=_free_cid(root) if vsock else None,
                vhost_user_vsock_socket=paths.vhost_user_sock if via == VIA_VHOST_USER else None,
                hotplug_ports=hotplug_ports if machine == "q35" else 0,
                shared_memory=shared_memory,
                memory_slots=pmem_slots,
                max_memory_mib=memory_mib + PMEM_ADDRESS_SPACE_MIB if pmem_slots else 0,
                ninep_shares=tuple((s.tag, s.host_dir, s.readonly) for s in shares_9p),
            ).with_accel(choice)
            paths.dir.mkdir(mode=0o700)
            # Held from now until the monitor exits: this is what "alive" means.
            lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                write_state(
                    paths,
                    {
                        "name": name,
                        "status": "starting",
                        "created": time.time(),
                        "image": str(img.path),
                        "accel_reason": choice.reason,
                        "vsock": vsock,
                        "transport": via,
                        "qemu": cfg.to_dict(),
                        "nics": [nic.to_dict() for nic in boot_nics],
                    },
                )
            except BaseException:
                os.close(lock_fd)
                remove_dead(paths)
                raise
        try:
            create_namespaces(boot_nics)  # recorded in the state: _destroy removes them
            _spawn_monitor(paths, lock_fd)
        except BaseException:
            os.close(lock_fd)
            cls(paths)._destroy()
            raise
        os.close(lock_fd)  # the monitor holds the same lock now

        sb = cls(paths)
        try:
            sb._wait_booted(started + boot_timeout, boot_timeout)
            if network_spec is not None:
                sb.network.apply(network_spec)
        except BaseException as exc:
            console = tail_log(paths.console_log, 40)
            monitor = tail_log(paths.monitor_log, 15)
            sb._destroy()
            if isinstance(exc, BootError):
                raise BootError(str(exc), console, monitor) from None
            raise
        sb.boot_seconds = time.monotonic() - started
        return sb

    def _wait_booted(self, deadline: float, boot_timeout: float) -> None:
        agent = self.agent
        while True:
            if not self.alive:
                state = self._state()
                code = state.get("exit_code")
                why = f"QEMU exited with status {code}" if code is not None else "the monitor died"
                raise BootError(f"sandbox {self.name!r} did not boot: {why}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootError(
                    f"sandbox {self.name!r} did not boot: its agent was not ready "
                    f"within {boot_timeout:g}s"
                )
            try:
                # Short slices, so a VM that died is noticed at once.
                agent.wait_ready(timeout=min(remaining, 2.0))
                return
            except DeadlineExceeded:
                continue

    # -- facts --

    @property
    def name(self) -> str:
        return self.paths.name

    @property
    def dir(self) -> Path:
        """The sandbox's state directory."""
        return self.paths.dir

    @property
    def agent_socket(self) -> Path:
        """The monitor's relay: every connection is a fresh one to the agent's gRPC server."""
        return self.paths.agent_sock

    @property
    def qmp_socket(self) -> Path:
        return self.paths.qmp_sock

    @property
    def transport(self) -> str:
        """The agent's channel: ``"vhost-vsock"``, ``"vhost-user-vsock"`` or ``"serial"``."""
        state = self._state()
        return state.get("transport") or (VIA_VHOST_VSOCK if state.get("vsock") else VIA_SERIAL)

    def connect_vsock(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A connected stream socket to the guest's vsock ``port``, whichever vsock it has.

        Raises ``SandboxError`` for a serial-only sandbox and ``TransportError`` when
        nothing in the guest listens on ``port``.
        """
        from .transport import HybridVsockTransport, VsockTransport

        via = self.transport
        if via == VIA_VHOST_USER:
            return HybridVsockTransport(self.paths.vsock_uds, port).connect(timeout)
        if via == VIA_VHOST_VSOCK:
            cid = self._state().get("qemu", {}).get("vsock_cid")
            return VsockTransport(cid, port).connect(timeout)
        raise SandboxError(f"sandbox {self.name!r} has no vsock device (transport {via!r})")

    @property
    def alive(self) -> bool:
        """Whether the sandbox's monitor (and so, normally, its QEMU) is running."""
        return is_alive(self.paths)

    @property
    def qemu_pid(self) -> int | None:
        return self._state().get("qemu_pid")

    @property
    def monitor_pid(self) -> int | None:
        return self._state().get("monitor_pid")

    @property
    def agent(self) -> AgentClient:
        """An ``AgentClient`` on this sandbox's ``agent.sock`` (opened on first use)."""
        if self._agent is None:
            self._agent = AgentClient(self.paths.agent_sock)
        return self._agent

    def status(self) -> SandboxInfo:
        """The host-side facts: pids, status (``"dead"`` once the monitor is gone), config."""
        return SandboxInfo.load(self.paths)

    def info(self, *, timeout: float | None = None) -> SandboxDetails:
        """Host-side facts together with the guest's details."""
        host = self.status()
        if not host.alive:
            raise SandboxError(f"sandbox {self.name!r} is not running (its monitor is gone)")
        return SandboxDetails(host, self.agent.guest_details(timeout=timeout))

    def console_log(self) -> str:
        """Everything the guest wrote to its console so far."""
        try:
            return self.paths.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_send(self, text: str | bytes, *, timeout: float = 10.0) -> None:
        """Type ``text`` into the guest console (a shell only with ``debug_console=True``)."""
        data = text.encode() if isinstance(text, str) else text
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.paths.console_sock))
                sock.sendall(data)
                # QEMU drops what it has not read yet when we hang up, and it
                # reads only as fast as the guest's UART takes bytes: wait until
                # our send queue is empty. Meanwhile discard the console output
                # QEMU copies to us, so that it never blocks on a full socket.
                sock.setblocking(False)
                while _unread(sock):
                    if time.monotonic() >= deadline:
                        raise SandboxError(
                            f"{self.name!r}'s console did not take the input within {timeout:g}s"
                        )
                    with contextlib.suppress(BlockingIOError):
                        sock.recv(65536)
                    time.sleep(0.01)
            except OSError as exc:
                raise SandboxError(f"cannot write to {self.name!r}'s console: {exc}") from exc

    # -- containers --

    def run(
        self,
        args: Iterable[str] | None = None,
        *,
        env: Iterable[str] | Mapping[str, str] = (),
        cwd: str = "/",
        user: str | int | None = None,
        tty: bool = False,
        console_size: tuple[int, int] | None = None,
        stdin: bool = False,
        memory_limit: int | str | None = None,
        cpus_limit: float | None = None,
        pids_limit: int | None = None,
        rootfs: str | None = None,
        readonly_rootfs: bool = False,
        hostname: str | None = None,
        name: str | None = None,
        remove: bool = True,
        spec: Mapping[str, Any] | bytes | None = None,
        bundle_dir: str = "",
        rootfs_storage: str = "",
        volumes: Iterable[Mapping[str, Any]] = (),
        storages: Sequence[Any] = (),
    ) -> Process:
        """Run ``args`` in a new container; the running ``Process``.

        The stdio stream is attached before the container starts, so no output is
        ever missed. ``stdin=False`` gives the process EOF on stdin at once.
        ``tty`` allocates a terminal in the guest (output then comes as stdout only),
        ``console_size`` its first ``(rows, cols)``.
        Limits: ``memory_limit`` (bytes or ``"64m"``), ``cpus_limit`` (e.g. ``0.5``),
        ``pids_limit``. ``rootfs`` is a guest directory (default: the image's busybox
        root). ``remove`` deletes the container once its exit is in. A whole OCI
        ``spec`` (dict or bytes, with ``bundle_dir``) replaces ``args`` and options.
        Storages (``bulkhead.storage``): ``rootfs_storage`` (``"ID[/sub]"``) is the root
        instead, ``volumes`` are mounts of storages (``storage.volume(...)``), ``storages``
        are added for this container and go with it.
        """
        options = self._container_options(locals())
        return containers.run(
            self.agent, args, spec=spec, bundle_dir=bundle_dir, name=name,
            stdin=stdin, remove=remove, **options, **_storage_options(locals()),
        )  # fmt: skip

    def create_container(
        self,
        args: Iterable[str] | None = None,
        *,
        env: Iterable[str] | Mapping[str, str] = (),
        cwd: str = "/",
        user: str | int | None = None,
        tty: bool = False,
        console_size: tuple[int, int] | None = None,
        memory_limit: int | str | None = None,
        cpus_limit: float | None = None,
        pids_limit: int | None = None,
        rootfs: str | None = None,
        readonly_rootfs: bool = False,
        hostname: str | None = None,
        name: str | None = None,
        spec: Mapping[str, Any] | bytes | None = None,
        bundle_dir: str = "",
        rootfs_storage: str = "",
        volumes: Iterable[Mapping[str, Any]] = (),
        storages: Sequence[Any] = (),
    ) -> Container:
        """Create a container (its process held until ``start()``), as ``run`` describes."""
        options = self._container_options(locals())
        return containers.create(
            self.agent, args, spec=spec, bundle_dir=bundle_dir, name=name, **options,
            **_storage_options(locals()),
        )  # fmt: skip

    @staticmethod
    def _container_options(given: dict[str, Any]) -> dict[str, Any]:
        """The spec options among ``given`` that differ from their defaults (so that a
        whole ``spec`` can be refused when any is also set)."""
        defaults = {
            "env": (), "cwd": "/", "user": None, "tty": False, "console_size": None,
            "memory_limit": None,
            "cpus_limit": None, "pids_limit": None, "rootfs": None,
            "readonly_rootfs": False, "hostname": None,
        }  # fmt: skip
        options = {k: given[k] for k, default in defaults.items() if given[k] != default}
        if "env" in options:
            env = options["env"]
            options["env"] = dict(env) if isinstance(env, Mapping) else list(env)
        return options

    def container(self, container_id: str) -> Container:
        """A handle on an existing container of this sandbox (no RPC is made)."""
        return Container(self.agent, container_id)

    def containers(self) -> list[ContainerInfo]:
        """Every container in this sandbox."""
        return self.agent.list_containers()

    # -- metrics and events --

    def metrics(self, *, timeout: float | None = None) -> str:
        """The Prometheus text exposition of this sandbox, every series labelled with its name."""
        return self.agent.metrics(self.name, timeout=timeout)

    def events(
        self, since: int | None = None, *, accept_gap: bool = False, reconnect: bool = True
    ) -> Iterator[Event]:
        """Follow this sandbox's events (after ``since``; None: new ones only) until it stops.

        With ``reconnect`` a broken connection (the agent restarting, say) is dialled again
        from the last event received, so nothing is missed or repeated; the iterator ends
        when the sandbox is gone. See ``AgentClient.events`` for ``accept_gap``.
        """
        from .events import follow

        return follow(self, since, accept_gap=accept_gap, reconnect=reconnect)

    def close(self) -> None:
        """Close this object's agent connection; the sandbox keeps running."""
        self._storage = None  # on the agent's channel
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    # -- taking it down --

    def down(self, timeout: float = 30.0) -> None:
        """Stop the sandbox and remove its state; afterwards no QEMU or file of it remains.

        First in order: the agent's Shutdown, then up to ``timeout`` seconds for
        QEMU to exit. Then by force: QMP ``quit``, and SIGKILL for QEMU and the
        monitor.
        """
        deadline = time.monotonic() + timeout
        state = self._state()
        qemu = (state.get("qemu_pid"), state.get("qemu_started"))
        if self.alive:
            try:
                self.agent.shutdown(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except AgentError as exc:
                # Nothing will stop the VM now but force; a short grace in case
                # the agent acted on the request and only its reply was lost.
                log.info("%s: Shutdown failed (%s); forcing", self.name, exc)
                deadline = min(deadline, time.monotonic() + SHUTDOWN_REPLY_GRACE)
            if not wait_gone(*qemu, timeout=max(0.0, deadline - time.monotonic())):
                self._force_quit(qemu)
        self._destroy()

    def _force_quit(self, qemu: tuple[int | None, float | None]) -> None:
        try:
            with Qmp(self.paths.qmp_sock, timeout=2.0) as qmp:
                qmp.quit()
        except QemuError:
            pass  # SIGKILL below
        wait_gone(*qemu, timeout=3.0)

    def _destroy(self) -> None:
        """Kill whatever is left of the sandbox and remove its directory."""
        self.close()
        state = self._state()
        monitor = (state.get("monitor_pid"), state.get("monitor_started"))
        qemu = (state.get("qemu_pid"), state.get("qemu_started"))
        kill(*qemu)
        wait_gone(*qemu, timeout=5.0)
        # Normally the monitor exits by itself once QEMU is gone.
        if not wait_gone(*monitor, timeout=5.0):
            kill(*monitor)
            wait_gone(*monitor, timeout=5.0)
        cleanup_nics(state)  # the namespaces made for its taps
        with state_lock(self.paths.root):
            if not is_alive(self.paths):
                remove_dead(self.paths)

    def _state(self) -> dict[str, Any]:
        try:
            return read_state(self.paths)
        except SandboxError:
            return {}


def _storage_options(given: dict[str, Any]) -> dict[str, Any]:
    """The storage options among ``given`` that are set."""
    keys = ("rootfs_storage", "volumes", "storages")
    return {k: list(given[k]) if k != "rootfs_storage" else given[k] for k in keys if given[k]}


def _root(state_dir: str | os.PathLike[str] | None) -> Path:
    return Path(state_dir) if state_dir is not None else default_state_dir()


def _refuse_live(paths: SandboxPaths) -> None:
    if paths.dir.exists() and is_alive(paths):
        raise SandboxExists(
            f"sandbox {paths.name!r} already exists and is running; "
            f"take it down first (bulkhead sandbox down {paths.name})"
        )


def _hostname_ok(name: str) -> bool:
    return len(name) <= 63 and all(c.isalnum() or c == "-" for c in name) and name[-1] != "-"


def _load_image(image: str | os.PathLike[str] | None) -> Any:
    try:
        from bulkhead_image import cache
    except ImportError as exc:
        raise ImageNotFound(f"the image cache is not available: {exc}") from exc
    if image is None:
        info = cache.latest_image()
        if info is None:
            raise ImageNotFound(
                f"no guest image in {cache.default_cache_dir()}: "
                "build one first with `bulkhead image build`"
            )
        return info
    try:
        return cache.load_image(Path(image))
    except (OSError, ValueError) as exc:  # missing files, a bad manifest
        raise ImageNotFound(f"no usable guest image at {image}: {exc}") from exc


def _free_cid(root: Path) -> int:
    """The lowest guest CID that no sandbox in ``root`` uses."""
    used = {info.vsock_cid for info in list_sandboxes(root) if info.alive}
    cid = FIRST_VSOCK_CID
    while cid in used:
        cid += 1
    return cid


def _spawn_monitor(paths: SandboxPaths, lock_fd: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "bulkhead.monitor",
        paths.name,
        "--state-dir",
        str(paths.root),
        "--lock-fd",
        str(lock_fd),
        "--detach",
    ]
    with open(paths.monitor_log, "ab") as log:
        # New session, then the monitor forks again and this child exits:
        # the monitor outlives the caller and is never its zombie.
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(lock_fd,),
            start_new_session=True,
            cwd="/",
        )
    code = child.wait(30)
    if code != 0:
        raise BootError(
            f"the monitor of sandbox {paths.name!r} failed to start (status {code})",
            monitor_tail=tail_log(paths.monitor_log, 15),
        )


def _unread(sock: socket.socket) -> int:
    """Bytes sent on a unix socket that the peer has not read yet (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", raw)[0]


def tail_log(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a sandbox log ("" if it is gone), safe to print."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    # Terminal control sequences in an error message could reset the user's terminal.
    text = _CONTROL.sub("", text)
    return "\n".join(text.splitlines()[-lines:])


_CONTROL = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_]|c)|[\x00-\x08\x0b-\x1f\x7f]")
