"""``delete``: clean up after a container whose shim is gone; print only a DeleteResponse.

containerd runs this when a shim died or never came up, and may run it again: every step
looks before it acts, so a second run finds nothing to do. It is quick when nothing is left:
the host client (and with it gRPC) is imported only when there is a VM to take down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from bulkhead_agent.linux.mounts import is_mount_point

from . import host_mounts
from .cli import Flags
from .pod_state import PodPaths, PodState, pod_id, read_spec, shim_alive
from .rootfs import unmount_rootfs

log = logging.getLogger(__name__)

KILLED_STATUS = 128 + signal.SIGKILL  # what containerd reports for a task that was not waited


def delete(flags: Flags) -> bytes:
    from google.protobuf import timestamp_pb2

    from .api import shim_pb2

    bundle = Path(flags.bundle or os.getcwd())
    try:
        pod = pod_id(flags.id, read_spec(bundle))
    except ValueError:  # a bundle half made or half gone: the container is its own pod then
        pod = flags.id
    paths = PodPaths.of(flags.address, flags.namespace, pod)
    rootfs = bundle / "rootfs"
    if is_mount_point(str(rootfs)):
        unmount_rootfs(str(rootfs))
    state = PodState.load(paths)
    if state is not None:
        state.containers.pop(flags.id, None)
        if shim_alive(paths) is None:
            if state.containers:
                state.save(paths)
            else:
                clean_pod(paths, state)
        else:
            state.save(paths)
    exited_at = timestamp_pb2.Timestamp()
    exited_at.GetCurrentTime()
    response = shim_pb2.DeleteResponse(exit_status=KILLED_STATUS, exited_at=exited_at)
    return response.SerializeToString()


def clean_pod(paths: PodPaths, state: PodState) -> None:
    """Everything a dead shim of this pod left: its containers' rootfs mounts, its VM."""
    for record in state.containers.values():
        if record.rootfs and is_mount_point(record.rootfs):
            with contextlib.suppress(OSError):
                unmount_rootfs(record.rootfs)
        host_mounts.release(record.host_mounts)
    if state.sandbox:
        from bulkhead import Sandbox
        from bulkhead.errors import BulkheadError

        with contextlib.suppress(BulkheadError):
            Sandbox.get(state.sandbox).down(timeout=10)
    state.containers.clear()
    state.sandbox = ""
    if shim_alive(paths) is None:
        host_mounts.remove_tree(paths.dir)
