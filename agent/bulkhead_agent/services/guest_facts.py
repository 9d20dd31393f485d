"""Facts about the guest read from /proc, /sys, the image manifest and init's environment.

Plain reads of small kernel files: cheap enough to do on every request, so the
answers are always current and nothing is cached in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MANIFEST = "/etc/bulkhead/manifest.json"
CGROUP_ROOT = "/sys/fs/cgroup"


def memory_total_bytes(meminfo: str = "/proc/meminfo") -> int:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def uptime_seconds(path: str = "/proc/uptime") -> float:
    try:
        with open(path) as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    """2 on a unified hierarchy, 1 if legacy controllers are mounted, else 0."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return 2
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        # A v1 hierarchy (memory, cpu,cpuacct, ...) always has a "tasks" file;
        # a hybrid host's "unified" v2 mount has none and does not count.
        if os.path.exists(os.path.join(root, name, "tasks")):
            return 1
    return 0


def init_version(fallback: str, manifest: str = MANIFEST) -> str:
    """The image's Bulkhead version from its manifest, else ``fallback``.

    The manifest has no dedicated key yet; accept ``init_version`` or the pinned
    ``bulkhead`` entry of ``packages``. Init and agent ship from one source tree,
    so the agent's own version is the right fallback.
    """
    import json  # only here: the agent has no other use for it

    try:
        with open(manifest) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return fallback
    if not isinstance(data, dict):
        return fallback
    version = data.get("init_version")
    packages = data.get("packages")
    if not version and isinstance(packages, dict):
        version = packages.get("bulkhead")
    return version if isinstance(version, str) and version else fallback


def process_memory(pid: int) -> tuple[int, int, int, int] | None:
    """``(rss, uss, pss, threads)`` of ``pid`` in bytes, or None if it cannot be read.

    smaps_rollup sums every mapping in one read; USS is private clean + dirty,
    what the process alone costs.
    """
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[key] = int(parts[0]) * 1024
        threads = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        return None
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0), uss, fields.get("Pss", 0), threads


def env_ms(env: Mapping[str, str], key: str) -> float:
    try:
        value = float(env.get(key, "0"))
    except ValueError:
        return 0.0
    return value if value > 0 else 0.0


def env_count(env: Mapping[str, str], key: str) -> int:
    raw = env.get(key, "")
    return int(raw) if raw.isdigit() else 0


def env_list(env: Mapping[str, str], key: str) -> list[str]:
    return [item.strip() for item in env.get(key, "").split(",") if item.strip()]
