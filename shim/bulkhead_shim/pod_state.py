"""Where a pod's shim keeps its files, and the state that outlives the shim process.

One shim serves one pod: every container whose OCI spec carries the same
``io.kubernetes.cri.sandbox-id`` annotation (or, without it, just the one container). The
pod's directory is named by a hash of containerd's address, the namespace and the pod id,
so private containerd instances (tests, several daemons) never share a shim::

    $BULKHEAD_SHIM_DIR (default /run/bulkhead-shim)/<key>/
        shim.sock   the ttrpc socket whose address containerd writes to each bundle
        shim.pid    the long-running shim
        lock        flock()ed while ``start`` decides whether to spawn a shim
        state.json  the pod: its sandbox and each container's bundle and mounts
        shim.log    the shim's log (also copied to the bundle's ``log`` FIFO for containerd)

``state.json`` is what ``delete`` and a later shim use to clean up after a shim that died:
unmount a bundle's rootfs, take the pod's VM down.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"


def shim_root() -> Path:
    return Path(os.environ.get("BULKHEAD_SHIM_DIR", "/run/bulkhead-shim"))


def read_spec(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's ``config.json``; an error that names the file if it is unusable."""
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: not a JSON object")
    return spec


def pod_id(container_id: str, spec: dict[str, Any]) -> str:
    """The pod a container belongs to: CRI's sandbox-id annotation, else its own id."""
    annotations = spec.get("annotations") or {}
    return str(annotations.get(SANDBOX_ID_ANNOTATION) or container_id)


@dataclass(frozen=True)
class PodPaths:
    dir: Path

    @classmethod
    def of(cls, address: str, namespace: str, pod: str) -> PodPaths:
        key = hashlib.sha256(f"{address}\0{namespace}\0{pod}".encode()).hexdigest()[:16]
        return cls(shim_root() / key)

    @property
    def key(self) -> str:
        return self.dir.name

    @property
    def socket(self) -> Path:
        return self.dir / "shim.sock"

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "shim.pid"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def log(self) -> Path:
        return self.dir / "shim.log"

    @property
    def mounts_dir(self) -> Path:
        """Where the containers' host bind mounts are made again, shared into the VM."""
        return self.dir / "mounts"

    @property
    def sandbox_name(self) -> str:
        """The pod's sandbox in ``bulkhead sandbox list``: ``shim-`` and the key."""
        return f"shim-{self.key[:12]}"


@dataclass
class ContainerRecord:
    bundle: str
    rootfs: str = ""  # host mount point we made (bundle/rootfs), "" if none
    share: str = ""  # the virtio-fs storage id in the guest, "" if none
    host_mounts: list[str] = field(default_factory=list)  # host_mounts.carry's mount points


@dataclass
class PodState:
    namespace: str
    pod: str
    sandbox: str = ""  # set once the VM is up
    containers: dict[str, ContainerRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: PodPaths) -> PodState | None:
        try:
            raw = json.loads(paths.state_file.read_text())
        except (OSError, ValueError):
            return None
        containers = {k: ContainerRecord(**v) for k, v in raw.pop("containers", {}).items()}
        return cls(**raw, containers=containers)

    def save(self, paths: PodPaths) -> None:
        """Atomically (rename), so a crash mid-write leaves the old state, never half of one."""
        tmp = paths.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, paths.state_file)


def shim_alive(paths: PodPaths) -> int | None:
    """The pid of the pod's running shim, if there is one: its socket answers. (Not just a pid
    that exists: a killed shim may linger as a zombie, and its socket file stays behind.)"""
    try:
        pid = int(paths.pid_file.read_text())
    except (OSError, ValueError):
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(paths.socket))
    except OSError:
        return None
    finally:
        probe.close()
    return pid
