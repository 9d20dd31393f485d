"""containerd's OCI spec, made right for the guest.

The spec containerd writes into the bundle describes a container on the host. Inside the VM
some of it means nothing or the wrong thing: namespace paths name host namespaces (``ctr
--with-ns``, CRI's pod network namespace), and the root is a host path. Everything else (the
process, mounts, resources, seccomp, hooks that exist in the guest) is the agent's to apply.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

log = logging.getLogger(__name__)


def guest_spec(spec: dict[str, Any], container_id: str) -> dict[str, Any]:
    """A copy of ``spec`` for the agent; the root comes from the shared rootfs storage."""
    out = copy.deepcopy(spec)
    linux = out.setdefault("linux", {})
    namespaces = []
    for ns in linux.get("namespaces") or []:
        path = ns.get("path")
        if not path:
            namespaces.append(ns)
        elif ns.get("type") == "network":
            # The pod's network namespace (CNI's) is the host's: the VM took its interfaces
            # over (pod_network), and the container shares the VM's network.
            log.info("%s: host network namespace %s: the VM's is used", container_id, path)
        else:
            # A host namespace cannot be joined from the guest: a new one it is.
            log.info("%s: host %s namespace %s: a new one", container_id, ns.get("type"), path)
            namespaces.append({"type": ns.get("type")})
    linux["namespaces"] = namespaces
    # The agent puts each container in its own cgroup under its own tree; containerd's path
    # (``/default/ID``, or a systemd slice) is the host's naming.
    linux.pop("cgroupsPath", None)
    out["root"] = {"path": "rootfs", "readonly": bool(spec.get("root", {}).get("readonly"))}
    return out
