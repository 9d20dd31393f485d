"""Host network namespaces and the tap devices in them that back a sandbox's NICs.

A tap NIC's host end lives in a network namespace, never in the host's own: whatever the
guest sends reaches only that namespace (where tests run their servers, or a bridge or
router the operator set up). The namespace is named (``/run/netns/NAME``, as ``ip netns``
makes them) or given as a path (``/proc/PID/ns/net``).

The tap is opened *inside* the namespace by a thread that entered it (network namespaces are
per thread), and the open file is what QEMU gets (``-netdev tap,fd=N``, or QMP ``getfd`` for
a hot-plug): the device is not persistent, so it disappears when QEMU closes it. Its host
side address is set with ``ip`` through ``nsenter``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import subprocess
import threading
from pathlib import Path

from .errors import SandboxError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
IFNAMSIZ = 16


class NetnsError(SandboxError):
    pass


def netns_path(netns: str) -> Path:
    """``/run/netns/NAME`` for a name; a path as it is."""
    return Path(netns) if "/" in netns else NETNS_DIR / netns


def exists(netns: str) -> bool:
    return netns_path(netns).exists()


def create(name: str) -> Path:
    """A new named namespace (``ip netns add``), with its loopback up."""
    _ip_run("netns", "add", name)
    ip(name, "link", "set", "lo", "up")
    return netns_path(name)


def delete(name: str) -> None:
    """Remove a named namespace; its taps go with it (their QEMU must be gone already)."""
    if netns_path(name).exists():
        _ip_run("netns", "del", name)


def ip(netns: str, *args: str) -> str:
    """Run ``ip ARGS`` in ``netns``; its output."""
    return _run(["nsenter", f"--net={netns_path(netns)}", "ip", *args])


def tc(netns: str, *args: str) -> str:
    """Run ``tc ARGS`` in ``netns``; its output."""
    return _run(["nsenter", f"--net={netns_path(netns)}", "tc", *args])


def _ip_run(*args: str) -> str:
    return _run(["ip", *args])


def _run(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        raise NetnsError(f"cannot run {cmd[0]}: {exc}") from exc
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def open_tap(netns: str, name: str, host_address: str = "") -> int:
    """Create tap ``name`` in ``netns`` and return its file descriptor (close-on-exec).

    ``host_address`` (``10.88.0.1/24``) is put on the host end, which is then brought up.
    The tap lasts while the descriptor (or a copy of it, QEMU's) is open.
    """
    path = netns_path(netns)
    if not path.exists():
        raise NetnsError(f"no network namespace {netns!r} ({path})")
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise NetnsError(f"tap name {name!r}: 1-15 characters")
    result: list[int] = []
    errors: list[BaseException] = []

    def inside() -> None:
        try:
            _enter(path)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                # vnet_hdr lets QEMU pass checksum and segmentation offloads through.
                ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
                fcntl.ioctl(fd, TUNSETIFF, ifr.ljust(40, b"\0"))
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as exc:
            errors.append(exc)

    # A thread of its own: entering a namespace changes only the calling thread's, and this
    # one ends right after.
    thread = threading.Thread(target=inside, name="tap-open")
    thread.start()
    thread.join()
    if errors:
        raise NetnsError(f"tap {name} in {netns}: {errors[0]}") from errors[0]
    fd = result[0]
    try:
        if host_address:
            ip(netns, "addr", "add", host_address, "dev", name)
        ip(netns, "link", "set", name, "up")
    except BaseException:
        os.close(fd)
        raise
    return fd


def redirect(netns: str, interface: str, tap: str) -> None:
    """Join ``interface`` and ``tap`` with tc: what either receives leaves by the other.

    The namespace's own stack then sees none of ``interface``'s traffic: the guest behind
    the tap answers for its addresses instead.
    """
    every_frame = ("protocol", "all", "u32", "match", "u32", "0", "0")
    for src, dst in ((interface, tap), (tap, interface)):
        tc(netns, "qdisc", "replace", "dev", src, "ingress")
        tc(netns, "filter", "add", "dev", src, "parent", "ffff:", *every_frame,
           "action", "mirred", "egress", "redirect", "dev", dst)  # fmt: skip


def unredirect(netns: str, interface: str) -> None:
    """Undo ``redirect`` on ``interface`` (the tap's side went with the tap)."""
    if netns_path(netns).exists():
        tc(netns, "qdisc", "del", "dev", interface, "ingress")


def _enter(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {path}: {os.strerror(code)}")
    finally:
        os.close(fd)
