"""The agent's settings: the kernel command line, then environment overrides.

The environment overrides exist for native tests and development, where the
kernel command line is the host's and there is no virtio port or PID 1 of ours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from bulkhead_init.cmdline import LOG_LEVELS, Config

DEFAULT_RUN_DIR = "/run/bulkhead"
# The image builder puts a small busybox root filesystem here (CreateContainer's default).
DEFAULT_ROOTFS = "/usr/share/bulkhead/rootfs"
# The agent's own cgroup subtree: itself in agent/, containers below containers/.
DEFAULT_CGROUP_DIR = "/sys/fs/cgroup/bulkhead"


@dataclass(frozen=True)
class Settings:
    log: str = "info"
    run_dir: str = DEFAULT_RUN_DIR
    vsock_port: int = 1024  # 0: off
    serial_port: str = "bulkhead.agent"  # virtio-serial port name; "": off
    serial_device: str = ""  # explicit device/fifo/unix-socket path instead of discovery
    tcp_port: int = 0  # 0: off (development only)
    init_pid: int = 1  # who receives the power-off / reboot signal
    default_rootfs: str = DEFAULT_ROOTFS
    cgroup_dir: str = DEFAULT_CGROUP_DIR
    bench: bool = False  # benchmark aids on (bulkhead.bench=1): see bridge/bench_raw.py

    @property
    def socket_path(self) -> str:
        return os.path.join(self.run_dir, "agent.sock")

    @property
    def containers_dir(self) -> str:
        """Per-container state (overlay upper/work, the merged rootfs), never in a container."""
        return os.path.join(self.run_dir, "containers")


def _int_env(env: Mapping[str, str], key: str, default: int, hi: int, warnings: list[str]) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if raw.isdigit() and int(raw) <= hi:
        return int(raw)
    warnings.append(f"bad environment {key}={raw!r}: expected 0..{hi}; keeping {default}")
    return default


def from_config(config: Config, env: Mapping[str, str] | None = None) -> tuple[Settings, list[str]]:
    """Combine the parsed command line with ``BULKHEAD_*`` overrides from ``env``."""
    env = os.environ if env is None else env
    warnings: list[str] = []

    log = config.log
    raw_log = env.get("BULKHEAD_LOG", "").lower()
    if raw_log in LOG_LEVELS:
        log = raw_log
    elif raw_log:
        warnings.append(f"bad environment BULKHEAD_LOG={raw_log!r}; keeping {log}")

    serial_port = config.serial_port
    raw_serial = env.get("BULKHEAD_SERIAL_PORT")
    if raw_serial is not None:
        serial_port = "" if raw_serial.lower() in ("", "off") else raw_serial

    pid = _int_env(env, "BULKHEAD_INIT_PID", 1, 2**22, warnings)
    settings = Settings(
        log=log,
        run_dir=env.get("BULKHEAD_RUN_DIR") or DEFAULT_RUN_DIR,
        vsock_port=_int_env(env, "BULKHEAD_VSOCK_PORT", config.vsock_port, 0xFFFFFFFF, warnings),
        serial_port=serial_port,
        serial_device=env.get("BULKHEAD_SERIAL_DEVICE", ""),
        tcp_port=_int_env(env, "BULKHEAD_TCP_PORT", config.tcp_port, 65535, warnings),
        init_pid=pid if pid > 0 else 1,
        default_rootfs=env.get("BULKHEAD_DEFAULT_ROOTFS") or DEFAULT_ROOTFS,
        cgroup_dir=env.get("BULKHEAD_CGROUP_DIR") or DEFAULT_CGROUP_DIR,
        bench=config.bench or env.get("BULKHEAD_BENCH") == "1",
    )
    return settings, warnings
