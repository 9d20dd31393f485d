"""Finding hot-plugged disks without a VM: uevent parsing, PCI paths and disks in fake sysfs
trees, and the waiter driven by real datagrams on a real socket (standing in for the
kernel's netlink socket), with real deadlines."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bulkhead_agent.storage import blockdevs, devices, filesystems, pci, uevent
from bulkhead_agent.storage.uevent import UeventMonitor

pytestmark = pytest.mark.timeout(60)

ADD_VDB = (
    b"add@/devices/pci0000:00/0000:00:10.0/0000:01:00.0/virtio3/block/vdb\0"
    b"ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:10.0/0000:01:00.0/virtio3/block/vdb\0"
    b"SUBSYSTEM=block\0MAJOR=254\0MINOR=16\0DEVNAME=vdb\0DEVTYPE=disk\0SEQNUM=2001\0"
)


# --- uevents -----------------------------------------------------------------------------------


def test_parse_kernel_uevent() -> None:
    event = uevent.parse(ADD_VDB)
    assert event is not None
    assert event.action == "add"
    assert event.subsystem == "block"
    assert event.devname == "vdb"
    assert event.devpath.endswith("/virtio3/block/vdb")
    assert event.env["SEQNUM"] == "2001"
    assert str(event).startswith("add block /devices/pci0000:00/")


@pytest.mark.parametrize(
    "data",
    [b"libudev\0\xfe\xed\xca\xfe", b"", b"garbage", b"add@relative\0SUBSYSTEM=x\0", b"@/x\0"],
)
def test_parse_ignores_what_is_not_a_kernel_uevent(data: bytes) -> None:
    assert uevent.parse(data) is None


def test_the_real_uevent_socket_opens_as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("binding the kernel's uevent group needs root here")
    sock = uevent.open_socket()
    try:
        assert sock.family == socket.AF_NETLINK
        assert sock.getblocking() is False
    finally:
        sock.close()


# --- PCI paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hops", "shown"),
    [
        ("10/00", ((0x10, 0), (0, 0)), "10/00"),
        ("02/1", ((2, 0), (1, 0)), "02/01"),
        ("1f.3", ((0x1F, 3),), "1f.3"),
        ("0a/0b/0c", ((10, 0), (11, 0), (12, 0)), "0a/0b/0c"),
    ],
)
def test_pci_path_parse(text: str, hops: tuple, shown: str) -> None:
    path = pci.parse(text)
    assert path.hops == hops
    assert str(path) == shown


@pytest.mark.parametrize("text", ["", "/", "10/", "20/00", "1g", "10.8", "0000:00:10.0", "a/" * 9])
def test_pci_path_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="PCI path"):
        pci.parse(text)


def make_sysfs(root: Path) -> Path:
    """A sysfs with a root port at 00:10.0 (secondary bus 01) and one at 00:11.0 (bus 02),
    a disk vda on the root bus at 00:03.0, and loop0."""
    sysfs = root / "sys"
    bus = sysfs / "devices" / "pci0000:00"
    for port, secondary in (("0000:00:10.0", "0000:01"), ("0000:00:11.0", "0000:02")):
        (bus / port / "pci_bus" / secondary).mkdir(parents=True)
    add_disk(sysfs, "0000:00:03.0", "virtio1", "vda", "254:0", serial="boot")
    loop = sysfs / "devices" / "virtual" / "block" / "loop0"
    loop.mkdir(parents=True)
    (sysfs / "block").mkdir(exist_ok=True)
    (sysfs / "block" / "loop0").symlink_to(loop)
    return sysfs


def add_disk(
    sysfs: Path, chain: str, virtio: str, name: str, dev: str, serial: str | None = None
) -> Path:
    """A virtio-blk disk below the PCI devices ``chain`` ("0000:00:10.0/0000:01:00.0")."""
    disk = sysfs / "devices" / "pci0000:00" / chain / virtio / "block" / name
    disk.mkdir(parents=True)
    (disk / "dev").write_text(dev + "\n")
    if serial is not None:
        (disk / "serial").write_text(serial + "\n")
    (sysfs / "block").mkdir(exist_ok=True)
    (sysfs / "block" / name).symlink_to(disk)
    return disk


def test_resolve_follows_each_bridge_to_the_device(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path)
    add_disk(sysfs, "0000:00:10.0/0000:01:00.0", "virtio3", "vdb", "254:16", serial="data")
    found = pci.resolve(pci.parse("10/00"), str(sysfs))
    assert found.device_dir == str(sysfs / "devices/pci0000:00/0000:00:10.0/0000:01:00.0")
    assert blockdevs.disk_below(found.device_dir) == "vdb"
    assert pci.address_chain(found.device_dir) == "0000:00:10.0/0000:01:00.0"


def test_resolve_says_how_far_it_got(tmp_path: Path) -> None:
    sysfs = str(make_sysfs(tmp_path))
    assert pci.resolve(pci.parse("10/00"), sysfs) == (
        None,
        "no PCI device 0000:01:00.0 behind 0000:00:10.0",
    )
    assert pci.resolve(pci.parse("12/00"), sysfs).progress == "no PCI device 0000:00:12.0"
    assert "has no secondary bus" in pci.resolve(pci.parse("03/00"), sysfs).progress
    assert "no root bus" in pci.resolve(pci.parse("03"), str(tmp_path / "nothing")).progress


def test_disks_serials_and_inventory(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path)
    add_disk(sysfs, "0000:00:11.0/0000:02:00.0", "virtio4", "vdc", "254:32", serial="logs")
    root = str(sysfs)
    assert blockdevs.disks(root) == ["vda", "vdc"]  # never loop devices
    assert blockdevs.disk_with_serial("logs", root) == "vdc"
    assert blockdevs.disk_with_serial("nope", root) is None
    assert blockdevs.device_number("vdc", root) == (254, 32)
    assert blockdevs.inventory(root) == (
        "vda at 0000:00:03.0 serial 'boot', vdc at 0000:00:11.0/0000:02:00.0 serial 'logs'"
    )


def test_disk_below_a_virtio_pmem_device(tmp_path: Path) -> None:
    device = tmp_path / "0000:01:00.0"
    (device / "virtio5/ndbus0/region0/namespace0.0/block/pmem0/pmem0p1").mkdir(parents=True)
    (device / "driver").symlink_to(tmp_path)  # symlinks are not followed
    assert blockdevs.disk_below(str(device)) == "pmem0"


def test_device_node_checks_the_number_and_makes_its_own(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    sysfs = make_sysfs(tmp_path)
    dev = tmp_path / "dev"
    dev.mkdir()
    # /dev/vda exists but is not that device: a node of our own is made.
    os.mknod(dev / "vda", 0o600 | 0o060000, os.makedev(1, 3))
    own = blockdevs.device_node("vda", str(sysfs), str(dev), fallback_dir=str(tmp_path / "own"))
    assert own == str(tmp_path / "own" / "vda")
    st = os.stat(own)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (254, 0)
    with pytest.raises(FileNotFoundError, match="254:0"):
        blockdevs.device_node("vda", str(sysfs), str(tmp_path / "empty"))


# --- waiting -----------------------------------------------------------------------------------


class FakeKernel:
    """A datagram socket pair: the monitor reads one end, the test "emits" on the other."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.theirs.setblocking(False)

    def opener(self) -> socket.socket:
        return self.theirs

    def emit(self, data: bytes) -> None:
        self.ours.send(data)

    def close(self) -> None:
        self.ours.close()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_disk_already_there_is_found_at_once(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path)
    add_disk(sysfs, "0000:00:10.0/0000:01:00.0", "virtio3", "vdb", "254:16")
    kernel = FakeKernel()

    async def main() -> devices.Found:
        monitor = UeventMonitor(kernel.opener)
        try:
            lookup = devices.by_pci_path(pci.parse("10/00"), str(sysfs))
            return await devices.wait_for_disk(lookup, 5.0, monitor, sysfs=str(sysfs))
        finally:
            monitor.close()

    found = run(main())
    kernel.close()
    assert found.disk == "vdb"
    assert found.waited_s < 0.5


def test_a_disk_plugged_later_is_found_on_its_uevent(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path)
    kernel = FakeKernel()

    async def main() -> tuple[devices.Found, float]:
        monitor = UeventMonitor(kernel.opener)
        lookup = devices.by_serial("data", str(sysfs))
        task = asyncio.create_task(devices.wait_for_disk(lookup, 10.0, monitor, sysfs=str(sysfs)))
        await asyncio.sleep(0.3)  # the "host" plugs the disk a while later
        assert not task.done()
        add_disk(sysfs, "0000:00:10.0/0000:01:00.0", "virtio3", "vdb", "254:16", serial="data")
        plugged = time.monotonic()
        kernel.emit(b"add@/devices/pci0000:00/0000:00:10.0\0SUBSYSTEM=pci\0")
        kernel.emit(ADD_VDB)
        found = await task
        monitor.close()
        return found, time.monotonic() - plugged

    found, latency = run(main())
    kernel.close()
    assert found.disk == "vdb"
    assert latency < 1.0  # woken by the event, not by a poll


def test_a_disk_without_its_dev_number_yet_is_waited_for(tmp_path: Path) -> None:
    # Seen in the guest: the block directory exists a moment before its attributes.
    sysfs = make_sysfs(tmp_path)
    disk = add_disk(sysfs, "0000:00:10.0/0000:01:00.0", "virtio3", "vdb", "254:16")
    (disk / "dev").unlink()
    kernel = FakeKernel()

    async def main() -> devices.Found:
        monitor = UeventMonitor(kernel.opener)
        lookup = devices.by_pci_path(pci.parse("10/00"), str(sysfs))
        task = asyncio.create_task(devices.wait_for_disk(lookup, 10.0, monitor, sysfs=str(sysfs)))
        await asyncio.sleep(0.3)
        assert not task.done()  # found the directory, but it is not a disk yet
        (disk / "dev").write_text("254:16\n")
        kernel.emit(ADD_VDB)
        found = await task
        monitor.close()
        return found

    found = run(main())
    kernel.close()
    assert found.disk == "vdb"


def test_timeout_names_what_was_expected_and_what_was_seen(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path)
    kernel = FakeKernel()
    rescans: list[float] = []

    async def main() -> None:
        monitor = UeventMonitor(kernel.opener)
        try:
            lookup = devices.by_pci_path(pci.parse("10/00"), str(sysfs))
            kernel.emit(b"add@/devices/virtual/net/lo\0SUBSYSTEM=net\0")  # unrelated
            await devices.wait_for_disk(
                lookup,
                0.6,
                monitor,
                sysfs=str(sysfs),
                rescan=lambda: rescans.append(time.monotonic()),
            )
        finally:
            monitor.close()

    started = time.monotonic()
    with pytest.raises(devices.DeviceTimeout) as info:
        run(main())
    elapsed = time.monotonic() - started
    kernel.close()
    message = str(info.value)
    assert "timed out after 0.6 s waiting for a disk at PCI path 10/00" in message
    assert "no PCI device 0000:01:00.0 behind 0000:00:10.0" in message
    assert "disks seen: vda at 0000:00:03.0 serial 'boot'" in message
    assert 0.55 < elapsed < 3.0
    assert len(rescans) == 1 and 0.2 < rescans[0] - started < 0.6


def test_a_rescan_that_makes_the_device_appear_ends_the_wait(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path)
    kernel = FakeKernel()

    def rescan() -> None:  # what the kernel does: enumerate, find the disk
        add_disk(sysfs, "0000:00:11.0/0000:02:00.0", "virtio4", "vdc", "254:32")

    async def main() -> devices.Found:
        monitor = UeventMonitor(kernel.opener)
        try:
            lookup = devices.by_pci_path(pci.parse("11/00"), str(sysfs))
            return await devices.wait_for_disk(
                lookup, 2.0, monitor, sysfs=str(sysfs), rescan=rescan
            )
        finally:
            monitor.close()

    found = run(main())
    kernel.close()
    assert found.disk == "vdc"
    assert 0.9 < found.waited_s < 1.9


# --- filesystems -------------------------------------------------------------------------------


def _image(tmp_path: Path, kind: str) -> Path:
    content = tmp_path / "content"
    content.mkdir(exist_ok=True)
    (content / "hello").write_text("hi\n")
    image = tmp_path / f"{kind}.img"
    if kind == "ext4":
        subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
        cmd = ["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)]
    elif kind == "erofs":
        cmd = ["mkfs.erofs", "--quiet", str(image), str(content)]
    else:
        cmd = ["mksquashfs", str(content), str(image), "-quiet", "-noappend"]
    try:
        subprocess.run(cmd, check=True, capture_output=True)
    except FileNotFoundError:
        pytest.skip(f"{cmd[0]} is not installed (scripts/bootstrap.sh installs it)")
    return image


@pytest.mark.parametrize("kind", ["ext4", "erofs", "squashfs"])
def test_detect_filesystems_by_magic(tmp_path: Path, kind: str) -> None:
    assert filesystems.detect(str(_image(tmp_path, kind))) == kind


def test_detect_nothing_on_zeroes(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(b"\0" * 70000)
    assert filesystems.detect(str(blank)) is None
