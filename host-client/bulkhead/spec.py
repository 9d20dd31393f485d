"""OCI runtime specs (``config.json``) for running a command, shaped the way docker shapes them.

>>> spec = make_spec(["sh", "-c", "echo hi"], env=["A=1"], memory_limit="64m")
>>> spec["linux"]["resources"]["memory"]["limit"]
67108864

The container gets its own pid, mount, ipc, uts and cgroup namespaces. It shares the sandbox's
network namespace (the VM is the network boundary, as in a Kubernetes pod), so there is no
``network`` entry. ``root.path`` is ``"rootfs"``, relative to the bundle directory; sent with
``bundle_dir=""`` that is the guest image's default busybox root filesystem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import SpecError

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD_USEC = 100_000

# The set docker grants by default: enough for ordinary programs (chown, setuid, binding low
# ports, ping), none of the ones that reach the kernel at large (SYS_ADMIN, SYS_MODULE, ...).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# Files under /proc and /sys that leak facts about the machine or let a process poke at it.
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)
READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

_NAMESPACES = ("pid", "mount", "ipc", "uts", "cgroup")

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from ``"64m"``, ``"1.5g"``, ``"512k"`` or ``"1024"`` (binary units, like docker)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        if match is None:
            raise SpecError(f"not a size: {text!r} (try 64m, 1g, 512k or a number of bytes)")
        value = int(float(match[1]) * _UNITS[match[2].lower()])
    if value <= 0:
        raise SpecError(f"a size must be positive, not {text!r}")
    return value


def parse_user(user: str | int | None) -> tuple[int, int]:
    """``(uid, gid)`` from ``"root"``, ``"UID"`` or ``"UID:GID"``.

    Only numbers (and ``root``): names would need the container's ``/etc/passwd``,
    which the host cannot read. A bare uid gets the group of the same number.
    """
    if user is None or user == "" or user == "root":
        return 0, 0
    if isinstance(user, int) and not isinstance(user, bool):
        uid_text, gid_text = str(user), str(user)
    else:
        uid_text, _, gid_text = str(user).partition(":")
        gid_text = gid_text or uid_text
    try:
        uid, gid = int(uid_text), int(gid_text)
    except ValueError:
        raise SpecError(f"user must be 'root', UID or UID:GID (numbers), not {user!r}") from None
    if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1):
        raise SpecError(f"uid and gid must be between 0 and 4294967294, not {user!r}")
    return uid, gid


def make_process(
    args: Iterable[str],
    *,
    env: Iterable[str] | Mapping[str, str] = (),
    cwd: str = "/",
    user: str | int | None = None,
    terminal: bool = False,
    console_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """An OCI ``process`` object for a container's first process.

    ``env`` adds to (and overrides) the defaults: ``PATH``, ``HOME`` and, with a
    terminal, ``TERM=xterm``. ``console_size`` is ``(rows, cols)``.
    """
    argv = _args(args)
    if not cwd.startswith("/"):
        raise SpecError(f"the working directory must be absolute, not {cwd!r}")
    uid, gid = parse_user(user)
    defaults = {"PATH": DEFAULT_PATH, "HOME": "/root" if uid == 0 else "/"}
    if terminal:
        defaults["TERM"] = "xterm"
    caps = list(DEFAULT_CAPABILITIES)
    process: dict[str, Any] = {
        "terminal": terminal,
        "user": {"uid": uid, "gid": gid},
        "args": argv,
        "env": _env(env, defaults),
        "cwd": cwd,
        # No inheritable or ambient capabilities: a setuid-less binary run by a non-root user
        # gets none at all, as with docker since 20.10.
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": False,
    }
    if console_size is not None:
        process["consoleSize"] = {"height": console_size[0], "width": console_size[1]}
    return process


def make_exec_process(
    args: Iterable[str],
    *,
    env: Iterable[str] | Mapping[str, str] = (),
    cwd: str | None = None,
    user: str | int | None = None,
    terminal: bool = False,
) -> dict[str, Any]:
    """An OCI ``process`` object for ``ExecProcess``: only what is given, the rest inherited.

    The agent fills the fields left out (cwd, user, env, capabilities) from the
    container's own process, as ``docker exec`` does. A given ``env`` replaces the
    container's whole environment there, so it gets the default ``PATH`` unless it
    has one.
    """
    process: dict[str, Any] = {"args": _args(args), "terminal": terminal}
    env_list = _env(env, {})
    if env_list:
        process["env"] = _env(env, {"PATH": DEFAULT_PATH})
    if cwd is not None:
        if not cwd.startswith("/"):
            raise SpecError(f"the working directory must be absolute, not {cwd!r}")
        process["cwd"] = cwd
    if user is not None:
        uid, gid = parse_user(user)
        process["user"] = {"uid": uid, "gid": gid}
    return process


def make_spec(
    args: Iterable[str],
    *,
    env: Iterable[str] | Mapping[str, str] = (),
    cwd: str = "/",
    user: str | int | None = None,
    terminal: bool = False,
    console_size: tuple[int, int] | None = None,
    hostname: str | None = None,
    memory_limit: int | str | None = None,
    cpus_limit: float | None = None,
    pids_limit: int | None = None,
    readonly_rootfs: bool = False,
    rootfs: str | None = None,
) -> dict[str, Any]:
    """An OCI runtime spec (as a dict; ``json.dumps`` it, or see :func:`dumps`) for ``args``.

    - ``user``: ``"root"`` (default), ``"UID"`` or ``"UID:GID"``.
    - ``memory_limit``: bytes, or a size such as ``"64m"``; the kernel OOM-kills past it.
    - ``cpus_limit``: CPUs' worth of time per period, e.g. ``0.5`` (cgroup ``cpu.max``).
    - ``pids_limit``: the most tasks the container may hold at once (``pids.max``).
    - ``rootfs``: an absolute directory in the guest; default ``"rootfs"``, relative to the
      bundle directory (``bundle_dir=""``: the guest image's busybox root filesystem).
    """
    process = make_process(
        args, env=env, cwd=cwd, user=user, terminal=terminal, console_size=console_size
    )
    if rootfs is not None and not rootfs.startswith("/"):
        raise SpecError(f"rootfs must be an absolute directory in the guest, not {rootfs!r}")
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs or "rootfs", "readonly": readonly_rootfs},
        "mounts": default_mounts(),
        "linux": {
            "namespaces": [{"type": ns} for ns in _NAMESPACES],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if hostname:
        spec["hostname"] = hostname
    resources = make_resources(
        memory_limit=memory_limit, cpus_limit=cpus_limit, pids_limit=pids_limit
    )
    # As docker does: no device but the standard ones (/dev/null, /dev/zero, ttys, ...), which
    # the agent always allows, even for a root that can mknod one.
    resources["devices"] = [{"allow": False, "access": "rwm"}]
    spec["linux"]["resources"] = resources
    return spec


def make_resources(
    *,
    memory_limit: int | str | None = None,
    cpus_limit: float | None = None,
    pids_limit: int | None = None,
) -> dict[str, Any]:
    """An OCI ``linux.resources`` object (also what ``update_container`` takes); ``{}`` if none."""
    resources: dict[str, Any] = {}
    if memory_limit is not None:
        resources["memory"] = {"limit": parse_size(memory_limit)}
    if cpus_limit is not None:
        if not cpus_limit > 0:
            raise SpecError(f"cpus_limit must be more than 0, not {cpus_limit!r}")
        # At least 1 ms per period: the kernel refuses smaller quotas.
        quota = max(1000, round(cpus_limit * CPU_PERIOD_USEC))
        resources["cpu"] = {"quota": quota, "period": CPU_PERIOD_USEC}
    if pids_limit is not None:
        if isinstance(pids_limit, bool) or not isinstance(pids_limit, int) or pids_limit < 1:
            raise SpecError(f"pids_limit must be a whole number of at least 1, not {pids_limit!r}")
        resources["pids"] = {"limit": pids_limit}
    return resources


def default_mounts() -> list[dict[str, Any]]:
    """What every container sees: /proc, a /dev of its own, /sys and its cgroup, read-only."""
    nosuid_noexec_nodev = ["nosuid", "noexec", "nodev"]
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": nosuid_noexec_nodev},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            # gid 5 is "tty" in busybox and Debian alike; a private instance per container.
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": [*nosuid_noexec_nodev, "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": nosuid_noexec_nodev,
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": [*nosuid_noexec_nodev, "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": [*nosuid_noexec_nodev, "relatime", "ro"],
        },
    ]


def dumps(spec: Mapping[str, Any]) -> bytes:
    """The spec as ``config.json`` bytes, the form ``CreateContainer`` takes."""
    return json.dumps(spec, separators=(",", ":")).encode()


def _args(args: Iterable[str]) -> list[str]:
    if isinstance(args, str | bytes):
        # A lone string would otherwise run as one argument per character.
        raise SpecError(f"args must be a list of strings, not the string {args!r}")
    argv = list(args)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise SpecError(f"args must be a non-empty list of strings, not {argv!r}")
    return argv


def _env(env: Iterable[str] | Mapping[str, str], defaults: Mapping[str, str]) -> list[str]:
    merged = dict(defaults)
    items = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"environment entries must be KEY=VALUE, not {item!r}")
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]
