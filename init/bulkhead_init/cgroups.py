"""The unified cgroup hierarchy (v2) on /sys/fs/cgroup, with controllers handed to children.

The root cgroup is exempt from the "no internal processes" rule, so it can enable
controllers in cgroup.subtree_control while init and the agent still live in it; the
agent then creates the containers' cgroups below.
"""

from __future__ import annotations

import os

from .mounts import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount_points

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .log import Logger

ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids", "hugetlb")


def mount(log: Logger, root: str = ROOT) -> bool:
    """Mount cgroup2 on ``root`` unless something is mounted there already."""
    from . import libc

    if root in mount_points():
        log.debug(f"{root} already mounted")
        return False
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        os.makedirs(root, 0o755, exist_ok=True)
        # nsdelegate: cgroup namespaces become delegation boundaries for containers.
        libc.mount("cgroup2", root, "cgroup2", flags, "nsdelegate")
    except OSError as exc:
        log.error(f"cannot mount cgroup2 on {root}: {exc}")
        return False
    return True


def enable_controllers(log: Logger, root: str = ROOT) -> list[str]:
    """Enable the wanted controllers that the kernel offers; return those now enabled."""
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            available = f.read().split()
    except OSError as exc:
        log.error(f"cannot read {root}/cgroup.controllers: {exc}")
        return []
    wanted = [c for c in CONTROLLERS if c in available]
    control = os.path.join(root, "cgroup.subtree_control")
    enabled: list[str] = []
    try:
        _write(control, " ".join("+" + c for c in wanted))
        enabled = wanted
    except OSError:
        # One refusal (say, cpu while a realtime task runs) must not cost the others.
        for c in wanted:
            try:
                _write(control, "+" + c)
                enabled.append(c)
            except OSError as exc:
                log.warning(f"cannot enable cgroup controller {c}: {exc}")
    missing = [c for c in CONTROLLERS if c not in available]
    log.info(
        "cgroup2 controllers for children: "
        + (" ".join(enabled) or "none")
        + (f" (not in this kernel: {' '.join(missing)})" if missing else "")
    )
    return enabled


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
