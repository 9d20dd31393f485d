"""The storage half of ``Sandbox``: hot-plugged disks and virtio-fs shares, end to end.

``add_disk`` plugs an image in through QMP (``hotplug``) and has the agent find and mount it
(``storage``); ``remove_disk`` undoes both, in the other order. ``add_share`` starts a
``virtiofsd`` for a host directory, plugs a ``vhost-user-fs-pci`` device in and has the agent
mount it by tag. ``add_9p`` mounts a 9p share given at boot (``Sandbox.up(ninep_shares=)``):
QEMU cannot create a 9p share's fsdev once it runs. What a container then sees comes from
``rootfs_storage=`` and ``volumes=``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hotplug
from .errors import BulkheadError, NotFound, SandboxError
from .qemu import hotplug_pci_path
from .qmp import Qmp
from .storage import StorageClient, StorageInfo

if TYPE_CHECKING:
    from .client import AgentClient
    from .state import SandboxPaths

log = logging.getLogger(__name__)

VIRTIOFSD_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "virtiofsd")
VIRTIOFSD_START_TIMEOUT = 10.0
DEVICE_TIMEOUT = 10.0  # for the guest to see a plugged device (TCG is slow)


def find_virtiofsd() -> str | None:
    """The host's virtiofsd (Debian 12: QEMU's, in /usr/lib/qemu), or None."""
    for candidate in VIRTIOFSD_CANDIDATES:
        found = shutil.which(candidate) if "/" not in candidate else candidate
        if found and os.access(found, os.X_OK):
            return found
    return None


@dataclass(frozen=True)
class NinePShare:
    """A host directory the guest sees as a 9p share from boot, under ``tag``."""

    host_dir: str
    tag: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> NinePShare:
        """``HOSTDIR:TAG`` or ``HOSTDIR:TAG:ro`` (the CLI's ``--9p``)."""
        parts = text.rsplit(":", 2) if text.endswith(":ro") else text.rsplit(":", 1)
        if len(parts) < 2 or not parts[0]:
            raise SandboxError(f"9p share {text!r}: expected HOSTDIR:TAG[:ro]")
        return cls(parts[0], parts[1], readonly=len(parts) == 3)

    def checked(self) -> NinePShare:
        """This share with its directory made absolute; SandboxError if it cannot be shared."""
        try:
            hotplug.check_name(self.tag)
        except hotplug.HotplugError as exc:
            raise SandboxError(f"9p share tag: {exc}") from None
        source = Path(self.host_dir).resolve()
        if not source.is_dir():
            raise SandboxError(f"9p share {self.host_dir}: not a directory")
        return replace(self, host_dir=str(source))


def check_ninep_shares(shares: Iterable[NinePShare | str]) -> list[NinePShare]:
    """Checked shares for ``Sandbox.up``; their tags must differ."""
    out = [(NinePShare.parse(s) if isinstance(s, str) else s).checked() for s in shares]
    tags = [share.tag for share in out]
    if len(set(tags)) != len(tags):
        raise SandboxError(f"9p share tags must differ: {', '.join(tags)}")
    return out


class SandboxStorage:
    """Mixed into ``Sandbox``: needs ``paths``, ``agent``, ``qmp_socket`` and ``status()``."""

    paths: SandboxPaths
    agent: AgentClient
    qmp_socket: Path
    _storage: StorageClient | None = None

    @property
    def storage(self) -> StorageClient:
        """The agent's Storage service (``add``, ``remove``, ``list``, ``copy_file``, ...)."""
        if self._storage is None:
            self._storage = StorageClient(self.agent.channel, timeout=self.agent.timeout)
        return self._storage

    def _qmp(self) -> Qmp:
        return Qmp(self.qmp_socket, timeout=5.0)

    # -- disks --

    def add_disk(
        self,
        image: str | os.PathLike[str],
        storage_id: str | None = None,
        *,
        readonly: bool = False,
        fstype: str = "",
        options: Iterable[str] = (),
        mount_point: str = "",
        serial: str | None = None,
        image_format: str = "raw",
        timeout: float = DEVICE_TIMEOUT,
    ) -> StorageInfo:
        """Hot-plug ``image`` as a virtio-blk disk and mount it in the guest; its storage.

        The disk goes into a free hot-plug port and the agent waits (up to ``timeout``
        seconds) for it at that port's PCI path. ``readonly`` makes both the disk and the
        mount read-only. ``hotplug_seconds`` on the result is the time from QMP
        ``device_add`` to mounted. If the agent cannot mount it, the disk is unplugged again.
        """
        storage_id = hotplug.check_name(storage_id or f"disk-{secrets.token_hex(4)}")
        mount_options = list(options)
        if readonly and "ro" not in mount_options:
            mount_options.append("ro")
        with self._qmp() as qmp:
            started = time.monotonic()
            plugged = hotplug.plug_disk(
                qmp, image, storage_id, readonly=readonly, serial=serial, image_format=image_format
            )
        try:
            info = self.storage.add(
                storage_id,
                "block",
                pci_path=plugged.pci_path,
                fstype=fstype,
                options=mount_options,
                mount_point=mount_point,
                timeout=timeout,
            )
        except BaseException:
            self._unplug_quietly(storage_id)
            raise
        return replace(info, hotplug_seconds=time.monotonic() - started)

    def remove_disk(self, storage_id: str, *, timeout: float = hotplug.UNPLUG_TIMEOUT) -> None:
        """Unmount a disk added by ``add_disk`` and unplug it (``FailedPrecondition`` while a
        container uses it)."""
        with contextlib.suppress(NotFound):
            self.storage.remove(storage_id)
        with self._qmp() as qmp:
            hotplug.unplug_disk(qmp, storage_id, timeout=timeout)

    def plug_disk(
        self,
        image: str | os.PathLike[str],
        name: str,
        *,
        readonly: bool = False,
        serial: str | None = None,
    ) -> hotplug.Plugged:
        """Only the QMP half of ``add_disk``: the disk is in, nothing is mounted."""
        with self._qmp() as qmp:
            return hotplug.plug_disk(qmp, image, name, readonly=readonly, serial=serial)

    def unplug_disk(self, name: str, *, timeout: float = hotplug.UNPLUG_TIMEOUT) -> None:
        with self._qmp() as qmp:
            hotplug.unplug_disk(qmp, name, timeout=timeout)

    def _unplug_quietly(self, name: str) -> None:
        try:
            self.unplug_disk(name)
        except BulkheadError as exc:
            log.warning("%s: could not unplug disk %s again: %s", self.paths.name, name, exc)

    # -- persistent memory --

    def add_pmem(
        self,
        image: str | os.PathLike[str],
        storage_id: str | None = None,
        *,
        readonly: bool = False,
        dax: bool = True,
        fstype: str = "",
        timeout: float = DEVICE_TIMEOUT,
    ) -> StorageInfo:
        """Plug ``image`` in as a virtio-pmem device and mount it (with DAX: file reads map
        the host's page cache directly); its storage.

        Needs a sandbox booted with ``pmem_slots``. QEMU cannot unplug virtio memory devices:
        ``remove_pmem`` unmounts it, but the device (and its port) stays until the VM stops.
        """
        storage_id = hotplug.check_name(storage_id or f"pmem-{secrets.token_hex(4)}")
        path = Path(image).resolve()
        if not path.is_file():
            raise SandboxError(f"pmem image {image}: not a file")
        size = path.stat().st_size
        if size == 0 or size % (2 * 1024 * 1024):
            raise SandboxError(f"pmem image {image}: its size must be a multiple of 2 MiB")
        qemu = self.status().state.get("qemu", {})
        if not qemu.get("memory_slots"):
            raise SandboxError(
                f"sandbox {self.paths.name!r} has no memory-device slots for pmem: boot it with "
                "pmem_slots=N (sandbox up --pmem-slots N)"
            )
        backend, device_id = f"bh-pmemmem-{storage_id}", f"bh-pmem-{storage_id}"
        with self._qmp() as qmp:
            started = time.monotonic()
            port = hotplug.free_port(qmp)
            qmp.execute(
                "object-add",
                {
                    "qom-type": "memory-backend-file",
                    "id": backend,
                    "mem-path": str(path),
                    "size": size,
                    "share": not readonly,
                    "readonly": readonly,
                },
            )
            try:
                qmp.execute(
                    "device_add",
                    {
                        "driver": "virtio-pmem-pci",
                        "id": device_id,
                        "memdev": backend,
                        "bus": f"bh-port{port}",
                        "addr": "0",
                    },
                )
            except BaseException:
                with contextlib.suppress(BulkheadError):
                    qmp.execute("object-del", {"id": backend})
                raise
        info = self.storage.add(
            storage_id,
            "pmem",
            pci_path=hotplug_pci_path(port),
            fstype=fstype,
            options=["ro"] if readonly else [],
            dax=dax,
            timeout=timeout,
        )
        return replace(info, hotplug_seconds=time.monotonic() - started)

    def remove_pmem(self, storage_id: str) -> None:
        """Unmount a pmem storage; the device stays plugged in (see ``add_pmem``)."""
        self.storage.remove(storage_id)

    # -- 9p shares (from boot) --

    def add_9p(
        self,
        tag: str,
        storage_id: str | None = None,
        *,
        readonly: bool = False,
        mount_point: str = "",
        timeout: float = DEVICE_TIMEOUT,
    ) -> StorageInfo:
        """Mount the 9p share ``tag`` given at boot; its storage (id: the tag unless named).

        A share given read-only at boot is always mounted read-only.
        """
        qemu = self.status().state.get("qemu", {})
        given = {t: bool(ro) for t, _, ro in qemu.get("ninep_shares", [])}
        if tag not in given:
            known = ", ".join(sorted(given)) or "none"
            raise SandboxError(
                f"sandbox {self.paths.name!r} has no 9p share {tag!r} (given at boot: {known}); "
                "9p shares come only at boot: sandbox up --9p HOSTDIR:TAG"
            )
        return self.storage.add(
            storage_id or tag,
            "9p",
            tag=tag,
            options=["ro"] if readonly or given[tag] else [],
            mount_point=mount_point,
            timeout=timeout,
        )

    # -- virtio-fs shares --

    def add_share(
        self,
        host_dir: str | os.PathLike[str],
        storage_id: str | None = None,
        *,
        readonly: bool = False,
        mount_point: str = "",
        timeout: float = DEVICE_TIMEOUT,
    ) -> StorageInfo:
        """Share a host directory through virtio-fs and mount it in the guest; its storage.

        Needs a sandbox booted with ``shared_memory=True`` (vhost-user devices reach guest
        RAM through it) and a ``virtiofsd`` on the host (``find_virtiofsd``); the share's tag
        is the storage id.
        """
        storage_id = hotplug.check_name(storage_id or f"share-{secrets.token_hex(4)}")
        source = Path(host_dir).resolve()
        if not source.is_dir():
            raise SandboxError(f"share {host_dir}: not a directory")
        qemu = self.status().state.get("qemu", {})
        if not qemu.get("shared_memory"):
            raise SandboxError(
                f"sandbox {self.paths.name!r} was not booted with shared memory, which virtio-fs "
                "needs: boot it with shared_memory=True (sandbox up --shared-memory)"
            )
        binary = find_virtiofsd()
        if binary is None:
            raise SandboxError("no virtiofsd on this host (Debian: qemu-system-common)")
        socket_path = self.paths.dir / f"fs-{storage_id}.sock"
        daemon = _start_virtiofsd(binary, source, socket_path, self.paths.dir, storage_id)
        device_id, chardev = f"bh-fs-{storage_id}", f"bh-fschr-{storage_id}"
        try:
            with self._qmp() as qmp:
                started = time.monotonic()
                port = hotplug.free_port(qmp)
                qmp.execute(
                    "chardev-add",
                    {
                        "id": chardev,
                        "backend": {
                            "type": "socket",
                            "data": {
                                "addr": {"type": "unix", "data": {"path": str(socket_path)}},
                                "server": False,
                            },
                        },
                    },
                )
                try:
                    qmp.execute(
                        "device_add",
                        {
                            "driver": "vhost-user-fs-pci",
                            "id": device_id,
                            "chardev": chardev,
                            "tag": storage_id,
                            "bus": f"bh-port{port}",
                            "addr": "0",
                        },
                    )
                except BaseException:
                    with contextlib.suppress(BulkheadError):
                        qmp.execute("chardev-remove", {"id": chardev})
                    raise
        except BaseException:
            _stop(daemon)
            raise
        try:
            info = self.storage.add(
                storage_id,
                "virtio-fs",
                tag=storage_id,
                options=["ro"] if readonly else [],
                mount_point=mount_point,
                timeout=timeout,
            )
        except BaseException:
            self._remove_share_device(storage_id)
            raise
        return replace(info, hotplug_seconds=time.monotonic() - started)

    def remove_share(self, storage_id: str, *, timeout: float = hotplug.UNPLUG_TIMEOUT) -> None:
        """Unmount a share added by ``add_share``, unplug it, and end its virtiofsd."""
        with contextlib.suppress(NotFound):
            self.storage.remove(storage_id)
        self._remove_share_device(storage_id, timeout=timeout)

    def _remove_share_device(
        self, storage_id: str, *, timeout: float = hotplug.UNPLUG_TIMEOUT
    ) -> None:
        with self._qmp() as qmp:
            hotplug.unplug(qmp, f"bh-fs-{storage_id}", timeout=timeout)
            with contextlib.suppress(BulkheadError):
                qmp.execute("chardev-remove", {"id": f"bh-fschr-{storage_id}"})
        pid_file = self.paths.dir / f"fs-{storage_id}.pid"
        with contextlib.suppress(OSError, ValueError):
            _stop_pid(int(pid_file.read_text()))
            pid_file.unlink()


def _start_virtiofsd(
    binary: str, source: Path, socket_path: Path, state_dir: Path, name: str
) -> subprocess.Popen[bytes]:
    """virtiofsd serving ``source`` on ``socket_path``; it exits when QEMU hangs up."""
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    with open(state_dir / f"fs-{name}.log", "ab") as logfile:
        daemon = subprocess.Popen(
            [
                binary,
                f"--socket-path={socket_path}",
                "-o", f"source={source}",
                "-o", "cache=auto",
                "-o", "sandbox=chroot",  # the host may not allow the namespace sandbox
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
        )  # fmt: skip
    (state_dir / f"fs-{name}.pid").write_text(str(daemon.pid))
    deadline = time.monotonic() + VIRTIOFSD_START_TIMEOUT
    while not socket_path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            _stop(daemon)
            tail = (state_dir / f"fs-{name}.log").read_text(errors="replace")[-500:]
            raise SandboxError(f"virtiofsd for {source} did not start: {tail.strip()}")
        time.sleep(0.02)
    return daemon


def _stop(daemon: subprocess.Popen[Any]) -> None:
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(5)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _stop_pid(pid: int) -> None:
    """End a virtiofsd started earlier, maybe by another process (it normally exits by itself
    once QEMU let go of it): wait a little, then SIGKILL it if it is still that program."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it, or it never goes
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"virtiofsd" not in f.read():
                    return  # gone, and the pid is someone else's now
        except OSError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
