"""The pod's VM: booted by the first container's Create, shared by the pod's others, taken
down when the last of them is deleted. A watcher notices a VM that dies under the pod."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from bulkhead import Sandbox

from . import host_mounts
from .pod_network import network_namespace, pod_network
from .pod_state import PodPaths, PodState

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5
# Sizing: annotations on the pod's first container, else the environment containerd gives
# the shim, else the host client's defaults.
MEMORY_ANNOTATION = "io.bulkhead.sandbox.memory-mib"
CPUS_ANNOTATION = "io.bulkhead.sandbox.cpus"


class Pod:
    def __init__(self, paths: PodPaths, state: PodState, on_vm_exit: Callable[[], None]) -> None:
        self.paths = paths
        self.state = state
        self.on_vm_exit = on_vm_exit
        self._sandbox: Sandbox | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._mounts_guest_dir = ""

    @property
    def up(self) -> bool:
        return self._sandbox is not None

    def sandbox(self, spec: dict[str, Any] | None = None) -> Sandbox:
        """The pod's VM, booted now if it is not up yet (this is where Create spends its time).

        The first container's ``spec`` sizes it (annotations) and gives its network (the
        network namespace CNI set up, which the VM takes over)."""
        with self._lock:
            if self._sandbox is None:
                self._sandbox = self._boot(spec or {})
                self.state.sandbox = self._sandbox.name
                self.state.save(self.paths)
                threading.Thread(target=self._watch, name="vm-watch", daemon=True).start()
            return self._sandbox

    def _boot(self, spec: dict[str, Any]) -> Sandbox:
        annotations = spec.get("annotations") or {}
        options: dict[str, Any] = {"shared_memory": True}  # virtio-fs carries the rootfs
        memory = annotations.get(MEMORY_ANNOTATION) or os.environ.get("BULKHEAD_SHIM_MEMORY_MIB")
        cpus = annotations.get(CPUS_ANNOTATION) or os.environ.get("BULKHEAD_SHIM_CPUS")
        if memory:
            options["memory_mib"] = int(memory)
        if cpus:
            options["cpus"] = int(cpus)
        if image := os.environ.get("BULKHEAD_IMAGE"):
            options["image"] = image
        if path := network_namespace(spec):
            options["nics"], options["network"] = pod_network(path)
        log.info("booting sandbox %s (%s)", self.paths.sandbox_name, options)
        # A sandbox of a shim that died before it could take it down is in the way.
        for name in Sandbox.cleanup_dead():
            log.info("removed the dead sandbox %s", name)
        with_stale = _existing(self.paths.sandbox_name)
        if with_stale is not None:
            log.warning("taking down %s, left by an earlier shim of this pod", with_stale.name)
            with_stale.down(timeout=10)
        return Sandbox.up(self.paths.sandbox_name, **options)

    def mounts_share(self) -> str:
        """The pod's share of host bind mounts (``host_mounts``), added on first need; its
        mount point in the guest."""
        sandbox = self.sandbox()
        with self._lock:
            if not self._mounts_guest_dir:
                self.paths.mounts_dir.mkdir(mode=0o700, exist_ok=True)
                info = sandbox.add_share(self.paths.mounts_dir, host_mounts.SHARE_ID)
                self._mounts_guest_dir = info.mount_point
            return self._mounts_guest_dir

    def _watch(self) -> None:
        sandbox = self._sandbox
        while sandbox is not None and not self._stopping.wait(WATCH_INTERVAL):
            if not sandbox.alive:
                log.error("sandbox %s is gone (QEMU died)", sandbox.name)
                self.on_vm_exit()
                return

    def down(self) -> None:
        """Take the VM down (idempotent)."""
        self._stopping.set()
        with self._lock:
            sandbox, self._sandbox = self._sandbox, None
            self._mounts_guest_dir = ""
        if sandbox is not None:
            try:
                sandbox.down(timeout=10)
            except Exception as exc:
                log.warning("taking %s down: %s", sandbox.name, exc)
            self.state.sandbox = ""
            self.state.save(self.paths)


def _existing(name: str) -> Sandbox | None:
    try:
        return Sandbox.get(name)
    except Exception:
        return None
