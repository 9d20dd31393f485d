"""Host side of storage without a guest: the QEMU command line for hot-plug ports, QMP
hot-plug against a real (paused, kernel-less) QEMU, and the CLI's storage options."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead import hotplug
from bulkhead.cli_storage import RunStorage, parse_mapping
from bulkhead.errors import BulkheadError, SandboxError
from bulkhead.qemu import QemuConfig, build_command, hotplug_pci_path, hotplug_port_id
from bulkhead.qmp import Qmp
from bulkhead.sandbox_storage import NinePShare, check_ninep_shares
from bulkhead.storage import storage_spec, volume

pytestmark = pytest.mark.timeout(60)


def config(**changes) -> QemuConfig:  # type: ignore[no-untyped-def]
    return QemuConfig(kernel=Path("/k"), initrd=Path("/i"), accel="tcg", **changes)


def test_hotplug_ports_are_root_ports_at_fixed_slots() -> None:
    cmd = build_command(config(hotplug_ports=3), vhost_vsock=False)
    ports = [a for a in cmd if a.startswith("pcie-root-port")]
    assert ports == [
        "pcie-root-port,id=bh-port0,bus=pcie.0,chassis=1,addr=0x10",
        "pcie-root-port,id=bh-port1,bus=pcie.0,chassis=2,addr=0x11",
        "pcie-root-port,id=bh-port2,bus=pcie.0,chassis=3,addr=0x12",
    ]
    assert [hotplug_pci_path(p) for p in range(3)] == ["10/00", "11/00", "12/00"]
    assert hotplug_port_id(14) == "bh-port14"
    assert not any("pcie-root-port" in a for a in build_command(config(), vhost_vsock=False))


def test_hotplug_limits_and_shared_memory() -> None:
    with pytest.raises(ValueError, match=r"0\.\.15"):
        build_command(config(hotplug_ports=16), vhost_vsock=False)
    with pytest.raises(ValueError, match="q35"):
        build_command(config(hotplug_ports=1, machine="microvm"), vhost_vsock=False)
    cmd = build_command(config(shared_memory=True, memory_mib=256), vhost_vsock=False)
    assert "memory-backend-memfd,id=ram,size=256M,share=on" in cmd
    assert cmd[cmd.index("-numa") + 1] == "node,memdev=ram"


def test_9p_shares_are_fsdevs_with_devices_from_boot(tmp_path: Path) -> None:
    shares = (("data", "/srv/da,ta", False), ("ro", "/srv/ro", True))
    cfg = config(ninep_shares=shares)
    cmd = build_command(cfg, vhost_vsock=False)
    fsdevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-fsdev"]
    assert fsdevs == [
        "local,id=bh9p0,path=/srv/da,,ta,security_model=passthrough",  # commas doubled
        "local,id=bh9p1,path=/srv/ro,security_model=passthrough,readonly=on",
    ]
    assert "virtio-9p-pci,fsdev=bh9p1,mount_tag=ro" in cmd
    # Through the sandbox's state file and back.
    assert QemuConfig.from_dict(cfg.to_dict()).ninep_shares == shares


def test_9p_share_options_parse_and_check(tmp_path: Path) -> None:
    assert NinePShare.parse("/a/b:tag") == NinePShare("/a/b", "tag")
    assert NinePShare.parse("/a:b:tag:ro") == NinePShare("/a:b", "tag", readonly=True)
    with pytest.raises(SandboxError, match="HOSTDIR:TAG"):
        NinePShare.parse("nodir")
    (tmp_path / "d").mkdir()
    checked = check_ninep_shares([f"{tmp_path}/./d:one", NinePShare(str(tmp_path), "two")])
    assert [(s.host_dir, s.tag) for s in checked] == [
        (str(tmp_path / "d"), "one"),
        (str(tmp_path), "two"),
    ]
    with pytest.raises(SandboxError, match="not a directory"):
        check_ninep_shares([f"{tmp_path}/missing:x"])
    with pytest.raises(SandboxError, match="tag"):
        check_ninep_shares([f"{tmp_path}:bad tag"])
    with pytest.raises(SandboxError, match="must differ"):
        check_ninep_shares([f"{tmp_path}:x", f"{tmp_path}/d:x"])


@pytest.fixture
def paused_qemu(tmp_path: Path) -> Iterator[Qmp]:
    """QEMU with two hot-plug ports, stopped before its first instruction (no guest)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no qemu-system-x86_64")
    sock = tmp_path / "qmp.sock"
    cmd = build_command(config(hotplug_ports=2, qmp_socket=sock), vhost_vsock=False)
    # No kernel to load: only the devices matter, and -S keeps the CPU from running.
    cmd = [a for a in cmd if a not in ("-kernel", "/k", "-initrd", "/i", "-append", "")]
    proc = subprocess.Popen([*cmd, "-S"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "QEMU did not open its QMP socket"
        time.sleep(0.05)
    qmp = Qmp(sock)
    qmp.connect()
    try:
        yield qmp
    finally:
        qmp.close()
        proc.kill()
        proc.wait()


def test_plug_disks_into_free_ports(paused_qemu: Qmp, tmp_path: Path) -> None:
    images = []
    for name in ("a", "b", "c"):
        images.append(tmp_path / f"{name}.img")
        images[-1].write_bytes(b"\0" * 1024 * 1024)
    assert hotplug.ports(paused_qemu) == {0: [], 1: []}
    first = hotplug.plug_disk(paused_qemu, images[0], "a", serial="disk-a")
    assert (first.port, first.pci_path, first.device_id) == (0, "10/00", "bh-disk-a")
    second = hotplug.plug_disk(paused_qemu, images[1], "b", readonly=True)
    assert (second.port, second.pci_path) == (1, "11/00")
    assert hotplug.ports(paused_qemu) == {0: ["bh-disk-a"], 1: ["bh-disk-b"]}
    with pytest.raises(hotplug.HotplugError, match="all 2 hot-plug ports"):
        hotplug.plug_disk(paused_qemu, images[2], "c")
    nodes = {n["node-name"] for n in paused_qemu.execute("query-named-block-nodes")}
    assert {"bh-node-a", "bh-node-b"} <= nodes and "bh-node-c" not in nodes


def test_plug_errors_leave_nothing_behind(paused_qemu: Qmp, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"\0" * 65536)
    with pytest.raises(hotplug.HotplugError, match="not a file"):
        hotplug.plug_disk(paused_qemu, tmp_path / "missing.img", "m")
    with pytest.raises(hotplug.HotplugError, match="bad device name"):
        hotplug.plug_disk(paused_qemu, image, "../x")
    with pytest.raises(hotplug.HotplugError, match="at most 20 bytes"):
        hotplug.plug_disk(paused_qemu, image, "s", serial="x" * 21)
    with pytest.raises(hotplug.HotplugError, match=r"QEMU cannot open .* not in qcow2 format"):
        hotplug.plug_disk(paused_qemu, image, "q", image_format="qcow2")
    nodes = {n["node-name"] for n in paused_qemu.execute("query-named-block-nodes")}
    assert not any(n.startswith("bh-node-") for n in nodes)
    assert hotplug.ports(paused_qemu) == {0: [], 1: []}
    with pytest.raises(hotplug.HotplugError, match="no device bh-disk-none"):
        hotplug.unplug_disk(paused_qemu, "none", timeout=1)


def test_no_ports_says_how_to_get_some(tmp_path: Path) -> None:
    class NoPorts:
        def execute(self, command: str, arguments: object = None) -> object:
            return [{"bus": 0, "devices": [{"qdev_id": "", "pci_bridge": {}}]}]

    with pytest.raises(hotplug.HotplugError, match="hotplug_ports=N"):
        hotplug.free_port(NoPorts())  # type: ignore[arg-type]


def test_volume_and_storage_spec() -> None:
    assert volume("data/sub", "/d", readonly=True) == {
        "destination": "/d",
        "type": "bind",
        "source": "storage:data/sub",
        "options": ["rbind", "ro"],
    }
    with pytest.raises(BulkheadError, match="absolute"):
        volume("data", "d")
    spec = storage_spec("d", "block", pci_path="10/00", timeout=2.5, options=["ro"])
    assert (spec.timeout_ms, list(spec.options), spec.pci_path) == (2500, ["ro"], "10/00")
    with pytest.raises(BulkheadError, match="unknown storage driver"):
        storage_spec("d", "nfs")


def test_run_storage_options(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"")
    share = tmp_path / "share"
    share.mkdir()
    m = parse_mapping(f"{image}:/data:ro", "--disk")
    assert (m.host, m.guest, m.readonly) == (image, "/data", True)
    for bad in (f"{image}", f"{image}:data", f"{image}:/d:rx:1", ":/d"):
        with pytest.raises(BulkheadError, match="HOST:GUESTDIR"):
            parse_mapping(bad, "--disk")

    args = argparse.Namespace(disk=[f"{image}:/d"], volume=[f"{share}:/s:ro"], rootfs=str(share))
    found = RunStorage.from_args(args)
    assert found.rootfs_share == share and args.rootfs is None
    assert (found.ports, found.needs_shared_memory) == (3, True)
    args = argparse.Namespace(disk=[], volume=[], rootfs=str(image))
    found = RunStorage.from_args(args)
    assert found.rootfs_image == image and not found.needs_shared_memory
    args = argparse.Namespace(disk=[], volume=[], rootfs="guest:/usr/share/bulkhead/rootfs")
    assert RunStorage.from_args(args).ports == 0 and args.rootfs == "/usr/share/bulkhead/rootfs"
    with pytest.raises(BulkheadError, match="no such image"):
        RunStorage.from_args(argparse.Namespace(disk=["/nope:/d"], volume=[], rootfs=None))
