"""The QEMU driver: the command line for a sandbox VM, and the choice of accelerator.

``build_command()`` is pure: everything it depends on is in ``QemuConfig`` or
passed in, so its output can be checked without starting anything. Facts about
the host (is KVM usable, is there ``/dev/vhost-vsock``) are found by the
functions below it and handed in by the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .vhost_vsock.qemu_args import device_args as vhost_user_vsock_args

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
ACCELS = ("auto", "kvm", "tcg")
MACHINES = ("q35", "microvm")
DEFAULT_SERIAL_PORT = "bulkhead.agent"
VHOST_VSOCK = Path("/dev/vhost-vsock")
# Hot-plug: PCIe root ports at fixed slots of the root bus (q35), one device each, so that
# the device plugged into port N is always at guest PCI path "<slot>/00" (see hotplug.py).
HOTPLUG_FIRST_SLOT = 0x10
MAX_HOTPLUG_PORTS = 15  # slots 0x10..0x1e; 0x1f holds the ICH9 functions


@dataclass(frozen=True)
class QemuConfig:
    """Everything that decides a sandbox VM's QEMU command line.

    ``accel`` must be resolved (``"kvm"`` or ``"tcg"``, see ``choose_accel``)
    before ``build_command``; ``cpu`` ``None`` means ``"max"``, which works
    under both. ``cmdline`` is the complete kernel command line (see
    ``kernel_cmdline``).
    """

    kernel: Path
    initrd: Path
    cmdline: str = ""
    memory_mib: int = 512
    cpus: int = 1
    machine: str = "q35"
    accel: str = "auto"
    cpu: str | None = None
    name: str | None = None
    # The guest console (ttyS0): a socket (for typing into a debug console)
    # whose output is also logged to console_log, or just the log file.
    console_log: Path | None = None
    console_socket: Path | None = None
    # The agent channel: a virtio-serial port on a chardev unix socket.
    serial_socket: Path | None = None
    serial_port_name: str = DEFAULT_SERIAL_PORT
    qmp_socket: Path | None = None
    # Guest CID for vhost-vsock; used only where /dev/vhost-vsock exists.
    vsock_cid: int | None = None
    # Or a vhost-user-vsock device served by the userspace backend listening here
    # (bulkhead.vhost_vsock; the backend holds the guest CID). Needs shared_memory.
    vhost_user_vsock_socket: Path | None = None
    binary: str = QEMU_BINARY
    extra_args: tuple[str, ...] = ()
    # Empty PCIe root ports to hot-plug disks and shares into (q35 only).
    hotplug_ports: int = 0
    # Guest RAM as a shared memfd: what vhost-user devices (virtio-fs) need to reach it.
    shared_memory: bool = False
    # Memory-device slots (hot-plugged virtio-pmem) and the address space they may fill.
    memory_slots: int = 0
    max_memory_mib: int = 0
    # 9p shares from boot, as (tag, host directory, read-only). Boot only: QEMU (7.2) has no
    # QMP command that creates the fsdev a virtio-9p device needs, so these cannot come later.
    ninep_shares: tuple[tuple[str, str, bool], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QemuConfig:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if value is not None and "Path" in str(f.type):
                value = Path(value)
            elif f.name == "extra_args":
                value = tuple(value)
            elif f.name == "ninep_shares":
                value = tuple((str(t), str(d), bool(ro)) for t, d, ro in value)
            values[f.name] = value
        return cls(**values)

    def with_accel(self, choice: AccelChoice) -> QemuConfig:
        return replace(self, accel=choice.accel, cpu=choice.cpu)


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def build_command(cfg: QemuConfig, *, vhost_vsock: bool) -> list[str]:
    """The QEMU argv for ``cfg``.

    ``vhost_vsock`` says whether the host has ``/dev/vhost-vsock``
    (``vhost_vsock_available()``); only then, and only with a ``vsock_cid``, is
    a vsock device added.
    """
    if cfg.accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be resolved to 'kvm' or 'tcg' first, not {cfg.accel!r}")
    if cfg.machine not in MACHINES:
        raise ValueError(f"machine must be one of {', '.join(MACHINES)}, not {cfg.machine!r}")
    cpu = cfg.cpu or "max"
    if cpu == "host" and cfg.accel != "kvm":
        raise ValueError("-cpu host needs KVM")
    if cfg.memory_mib < 64 or cfg.cpus < 1:
        raise ValueError(f"need at least 64 MiB and 1 CPU, not {cfg.memory_mib} MiB, {cfg.cpus}")
    if not 0 <= cfg.hotplug_ports <= MAX_HOTPLUG_PORTS:
        raise ValueError(f"hotplug_ports must be 0..{MAX_HOTPLUG_PORTS}, not {cfg.hotplug_ports}")
    if cfg.hotplug_ports and cfg.machine != "q35":
        raise ValueError(f"hot-plug needs the q35 machine (PCIe), not {cfg.machine}")

    # microvm has no PCI: the same devices come as virtio-mmio (the guest
    # kernel then needs virtio_mmio, a module in Debian's kernel).
    def virtio(kind: str) -> str:
        return f"{kind}-pci" if cfg.machine == "q35" else f"{kind}-device"

    cmd = [
        cfg.binary,
        "-nodefaults",
        "-no-user-config",
        # Not -nographic: on top of "-display none" it only makes SeaBIOS write
        # terminal resets and its banner to the console log.
        "-display",
        "none",
        "-machine",
        cfg.machine,
        "-accel",
        cfg.accel,
        "-cpu",
        cpu,
        "-m",
        _memory(cfg),
        "-smp",
        str(cfg.cpus),
        "-kernel",
        str(cfg.kernel),
        "-initrd",
        str(cfg.initrd),
        "-append",
        cfg.cmdline,
        # A guest reboot ends QEMU, like a power-off: the monitor decides what follows.
        "-no-reboot",
    ]
    if cfg.name:
        cmd += ["-name", _opt(cfg.name)]
    if cfg.shared_memory:
        memory = f"memory-backend-memfd,id=ram,size={cfg.memory_mib}M,share=on"
        cmd += ["-object", memory, "-numa", "node,memdev=ram"]
    if cfg.console_socket is not None:
        chardev = f"socket,id=console,path={_opt(cfg.console_socket)},server=on,wait=off"
        if cfg.console_log is not None:
            chardev += f",logfile={_opt(cfg.console_log)}"
        cmd += ["-chardev", chardev, "-serial", "chardev:console"]
    elif cfg.console_log is not None:
        cmd += ["-chardev", f"file,id=console,path={_opt(cfg.console_log)}"]
        cmd += ["-serial", "chardev:console"]
    if cfg.serial_socket is not None:
        cmd += [
            "-device",
            f"{virtio('virtio-serial')},id=vser0",
            "-chardev",
            f"socket,id=agent,path={_opt(cfg.serial_socket)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=agent,name={_opt(cfg.serial_port_name)}",
        ]
    if cfg.qmp_socket is not None:
        cmd += [
            "-chardev",
            f"socket,id=qmp,path={_opt(cfg.qmp_socket)},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ]
    if cfg.vhost_user_vsock_socket is not None:
        # A guest has one vsock transport: the backend, when one is configured, replaces vhost.
        if not cfg.shared_memory:
            raise ValueError("a vhost-user vsock device needs shared_memory (the backend maps RAM)")
        cmd += vhost_user_vsock_args(cfg.vhost_user_vsock_socket, machine=cfg.machine)
    elif vhost_vsock and cfg.vsock_cid is not None:
        cmd += ["-device", f"{virtio('vhost-vsock')},guest-cid={cfg.vsock_cid}"]
    for index, (tag, host_dir, readonly) in enumerate(cfg.ninep_shares):
        # QEMU's own 9p server; passthrough keeps owners and modes as they are on the host
        # (a container root filesystem needs its root-owned files), which needs QEMU as root.
        fsdev = f"local,id=bh9p{index},path={_opt(host_dir)},security_model=passthrough"
        cmd += ["-fsdev", fsdev + (",readonly=on" if readonly else "")]
        cmd += ["-device", f"{virtio('virtio-9p')},fsdev=bh9p{index},mount_tag={_opt(tag)}"]
    # Entropy from the host, so the guest's getrandom() is ready early.
    cmd += ["-device", virtio("virtio-rng")]
    for port in range(cfg.hotplug_ports):
        slot = HOTPLUG_FIRST_SLOT + port
        cmd += [
            "-device",
            f"pcie-root-port,id={hotplug_port_id(port)},bus=pcie.0,chassis={port + 1},"
            f"addr={slot:#x}",
        ]
    cmd += list(cfg.extra_args)
    return cmd


def _memory(cfg: QemuConfig) -> str:
    if not cfg.memory_slots:
        return str(cfg.memory_mib)
    if cfg.max_memory_mib <= cfg.memory_mib:
        raise ValueError(f"max_memory_mib must be above memory_mib, not {cfg.max_memory_mib}")
    return f"{cfg.memory_mib}M,slots={cfg.memory_slots},maxmem={cfg.max_memory_mib}M"


def hotplug_port_id(port: int) -> str:
    """The QEMU id of hot-plug root port ``port`` (0-based)."""
    return f"bh-port{port}"


def hotplug_pci_path(port: int) -> str:
    """The guest PCI path of the device in root port ``port``: ``<port slot>/<device slot>``."""
    return f"{HOTPLUG_FIRST_SLOT + port:02x}/00"


def kernel_cmdline(
    base: str,
    options: Mapping[str, object] | None = None,
    extra: Sequence[str] = (),
) -> str:
    """``base`` (the image's default) + ``bulkhead.KEY=VALUE`` for ``options`` + ``extra`` words.

    ``base``'s own ``bulkhead.*`` words for the same keys are dropped, so the
    driver's choice wins without relying on which duplicate the guest keeps.
    A ``console=ttyS0`` is added when ``base`` names no console: the driver
    wires the console to the first serial port.
    """
    options = dict(options or {})
    keys = {f"bulkhead.{key}" for key in options}
    words = [w for w in shlex.split(base) if w.split("=", 1)[0] not in keys]
    if not any(w.startswith("console=") for w in words):
        words.append("console=ttyS0")
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        words.append(f"bulkhead.{key}={value}")
    words += extra
    return " ".join(words)


def vhost_vsock_available(device: Path = VHOST_VSOCK) -> bool:
    """Whether QEMU can use ``vhost-vsock-pci`` here (the host module is loaded)."""
    return os.access(device, os.R_OK | os.W_OK)


# --- choosing the agent's channel ---------------------------------------------------

# What the monitor reaches the agent through (recorded in state.json as "transport").
VIA_VHOST_VSOCK = "vhost-vsock"  # the kernel's vhost-vsock: AF_VSOCK on the host
VIA_VHOST_USER = "vhost-user-vsock"  # bulkhead.vhost_vsock: hybrid vsock unix sockets
VIA_SERIAL = "serial"  # the virtio-serial port with bulkhead_proto.mux on it
TRANSPORTS = (VIA_VHOST_VSOCK, VIA_VHOST_USER, VIA_SERIAL)
TRANSPORT_CHOICES = ("auto", "vsock", *TRANSPORTS)


def choose_transport(requested: str | None = None, *, vhost: bool | None = None) -> str:
    """The channel for ``requested``: ``"auto"`` (the default, or ``$BULKHEAD_TRANSPORT``),
    ``"vsock"``, or one of ``TRANSPORTS`` by name.

    ``auto`` is the kernel's vhost-vsock where ``/dev/vhost-vsock`` exists and the
    virtio-serial port elsewhere; ``vsock`` is vsock in any case, through the
    userspace backend where the kernel has none. Asking for ``vhost-vsock`` on a
    host without it is a ``ValueError`` (QEMU would fail later, less clearly).
    """
    requested = requested or os.environ.get("BULKHEAD_TRANSPORT") or "auto"
    if requested not in TRANSPORT_CHOICES:
        choices = ", ".join(TRANSPORT_CHOICES)
        raise ValueError(f"transport must be one of {choices}, not {requested!r}")
    have_vhost = vhost_vsock_available() if vhost is None else vhost
    if requested == "auto":
        return VIA_VHOST_VSOCK if have_vhost else VIA_SERIAL
    if requested == "vsock":
        return VIA_VHOST_VSOCK if have_vhost else VIA_VHOST_USER
    if requested == VIA_VHOST_VSOCK and not have_vhost:
        raise ValueError(
            f"transport {VIA_VHOST_VSOCK!r} needs {VHOST_VSOCK}; "
            "use 'vsock' for the userspace backend"
        )
    return requested


# --- choosing the accelerator ------------------------------------------------------


@dataclass(frozen=True)
class AccelChoice:
    """``accel`` and ``cpu`` to run with, and why they were chosen."""

    accel: str
    cpu: str
    reason: str
    key: dict[str, str] = field(default_factory=dict, compare=False)


def choose_accel(
    requested: str = "auto",
    *,
    kernel: Path | None = None,
    cache_file: Path | None = None,
    env: Mapping[str, str] = os.environ,
    binary: str = QEMU_BINARY,
) -> AccelChoice:
    """Resolve ``requested`` (``auto``, ``kvm``, ``tcg``) to an accelerator and CPU model.

    An explicit ``kvm`` or ``tcg`` wins; with ``auto``, ``$BULKHEAD_ACCEL``
    (``tcg``, ``kvm``) decides if set; otherwise ``probe_kvm`` does, its verdict
    cached in ``cache_file`` for as long as the host is not rebooted.
    ``-cpu host`` is used only when a probe showed that it boots.
    """
    source = "requested"
    if requested == "auto" and env.get("BULKHEAD_ACCEL"):
        requested, source = env["BULKHEAD_ACCEL"].strip().lower(), "BULKHEAD_ACCEL"
    if requested not in ACCELS:
        raise ValueError(f"accel must be one of {', '.join(ACCELS)}, not {requested!r}")
    cached = load_verdict(cache_file, binary) if cache_file is not None else None
    if requested == "tcg":
        return AccelChoice("tcg", "max", f"tcg {source}")
    if requested == "kvm":
        cpu = cached.cpu if cached is not None and cached.accel == "kvm" else "max"
        return AccelChoice("kvm", cpu, f"kvm {source}")
    if cached is not None:
        return cached
    if kernel is None:
        raise ValueError("accel 'auto' needs a kernel to probe KVM with")
    return probe_kvm(kernel, cache_file=cache_file, binary=binary)


def probe_kvm(
    kernel: Path,
    *,
    cache_file: Path | None = None,
    timeout: float = 6.0,
    binary: str = QEMU_BINARY,
    dev_kvm: Path = Path("/dev/kvm"),
) -> AccelChoice:
    """Decide whether KVM really works here, by booting ``kernel`` under it.

    ``/dev/kvm`` existing (even ``KVM_CREATE_VM`` succeeding) proves little:
    under broken nested virtualisation a bzImage dies in its decompressor with
    "KVM internal error", or QEMU aborts setting an MSR the host refuses. So
    the probe boots the guest kernel under ``-accel kvm`` with no initrd,
    ``panic=-1`` and ``-no-reboot``: a working KVM runs the kernel to its
    "VFS: Unable to mount root fs" panic, which reboots, which ends QEMU with
    status 0, all in about a second. It tries ``-cpu host`` first, then
    ``-cpu max``; anything else within ``timeout`` seconds each (an abort, an
    error, a hang) means TCG. The verdict is written to ``cache_file`` keyed by
    the host's boot id and the QEMU binary, so it is probed once per boot.
    """
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return AccelChoice("tcg", "max", f"{dev_kvm} is not usable")
    if not Path(kernel).is_file():
        raise FileNotFoundError(f"kernel to probe KVM with not found: {kernel}")
    failures = []
    choice = None
    for cpu in ("host", "max"):
        ok, why = _boots_under_kvm(Path(kernel), cpu, timeout, binary)
        if ok:
            choice = AccelChoice("kvm", cpu, f"KVM probe booted the kernel with -cpu {cpu}")
            break
        failures.append(f"-cpu {cpu}: {why}")
    if choice is None:
        choice = AccelChoice("tcg", "max", "KVM probe failed (" + "; ".join(failures) + ")")
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    if cache_file is not None:
        save_verdict(cache_file, choice, binary)
    return choice


def _boots_under_kvm(kernel: Path, cpu: str, timeout: float, binary: str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="bulkhead-kvm-probe-") as tmp:
        console = Path(tmp, "console.log")
        stderr_path = Path(tmp, "stderr.log")
        cmd = [
            binary,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            cpu,
            "-m",
            "256",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1",
            "-serial",
            f"file:{console}",
            "-no-reboot",
        ]
        with open(stderr_path, "wb") as stderr:
            try:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                return False, f"cannot run {binary}: {exc}"
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return False, f"the kernel did not finish booting within {timeout:g}s"
        output = console.read_bytes() if console.exists() else b""
        if code == 0 and b"Kernel panic" in output:
            return True, "ok"
        errors = stderr_path.read_text(errors="replace").strip().splitlines()
        return False, errors[0] if errors else f"QEMU exited with status {code}"


def _host_key(binary: str) -> dict[str, str]:
    """What the verdict depends on: this boot of this host, and this QEMU."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    path = shutil.which(binary) or binary
    try:
        stamp = str(os.stat(path).st_mtime_ns)
    except OSError:
        stamp = "missing"
    return {"boot_id": boot_id, "qemu": path, "qemu_mtime_ns": stamp}


def load_verdict(cache_file: Path, binary: str = QEMU_BINARY) -> AccelChoice | None:
    """The cached probe verdict, if it was made on this boot with this QEMU."""
    try:
        data = json.loads(Path(cache_file).read_text())
        if data.get("key") != _host_key(binary):
            return None
        return AccelChoice(data["accel"], data["cpu"], f"cached: {data['reason']}", data["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_verdict(cache_file: Path, choice: AccelChoice, binary: str = QEMU_BINARY) -> None:
    data = {
        "accel": choice.accel,
        "cpu": choice.cpu,
        "reason": choice.reason,
        "key": _host_key(binary),
    }
    cache_file = Path(cache_file)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, cache_file)
    except OSError as exc:  # a cache that cannot be written only costs a re-probe
        log.warning("cannot cache the KVM verdict in %s: %s", cache_file, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
