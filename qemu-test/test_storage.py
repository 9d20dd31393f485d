"""Storage in the real guest: disks hot-plugged through QMP and found by PCI path, container
root filesystems from disks (ext4, erofs, an OCI image made by umoci), overlays, read-only
volumes, refused escapes, a 200 MB file copy, virtio-fs shares, and the CLI.

One sandbox with ten hot-plug ports and shared memory (for virtio-fs) serves the module.
Every disk image is checked on the host afterwards where that proves something (a lower
layer that must not have changed, a copied file's owner and mode).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead import Sandbox
from bulkhead import rootfs_image as images
from bulkhead.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, SandboxError
from bulkhead.hotplug import ports
from bulkhead.qmp import Qmp
from bulkhead.sandbox_storage import find_virtiofsd
from bulkhead.storage import volume

DEVICE_DEADLINE = 10.0  # for the guest to find a plugged disk (TCG, a busy host)
RUN_DEADLINE = 180.0
COPY_DEADLINE = 600.0  # 200 MB through an emulated virtio-serial port
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sb(image, state_dir: Path, work: Path) -> Iterator[Sandbox]:
    name = f"storage-{os.getpid() % 10000}"
    # 9p shares exist only from boot (QEMU cannot add their fsdev later): one container root.
    ninep_root = busybox_tree(work / "ninep-root")
    (ninep_root / "etc" / "hello").write_text("hello from a 9p share\n")
    sandbox = Sandbox.up(
        name, image=image.path, memory_mib=512, cpus=2, state_dir=state_dir,
        hotplug_ports=10, shared_memory=True, pmem_slots=1,
        ninep_shares=[f"{ninep_root}:ninep"],
    )  # fmt: skip
    try:
        yield sandbox
    finally:
        sandbox.down(timeout=20)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(autouse=True)
def nothing_left(sb: Sandbox) -> Iterator[None]:
    """Each test leaves no storage mounted and no disk plugged in."""
    yield
    for info in sb.storage.list():
        if info.driver == "block":
            sb.remove_disk(info.storage_id)
        elif info.driver == "virtio-fs":
            sb.remove_share(info.storage_id)
        else:
            sb.storage.remove(info.storage_id)
    with Qmp(sb.qmp_socket) as qmp:
        # virtio-pmem cannot be unplugged (QEMU): it stays, the rest must be gone.
        left = {p: [d for d in ds if not d.startswith("bh-pmem-")] for p, ds in ports(qmp).items()}
        assert all(not plugged for plugged in left.values()), left


def run(sb: Sandbox, args: list[str], **options) -> tuple[bytes, bytes, int]:  # type: ignore[no-untyped-def]
    proc = sb.run(args, **options)
    out, err = proc.communicate(timeout=RUN_DEADLINE)
    return out, err, proc.returncode


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def ext4_image(path: Path, files: dict[str, bytes], size_mib: int = 16) -> Path:
    tree = path.with_suffix(".d")
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    tree.mkdir(exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path)], check=True)
    return path


def busybox_tree(root: Path) -> Path:
    """A minimal container root: static busybox and a link per applet."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    for sub in ("bin", "proc", "dev", "sys", "tmp", "etc", "root"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for name in listed.stdout.split():
        if name != "busybox":
            os.symlink("busybox", root / "bin" / name)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def debugfs(image: Path, request: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, check=True
    ).stdout


# --- hot-plug ----------------------------------------------------------------------------------


def test_ten_disks_one_after_another(sb: Sandbox, work: Path) -> None:
    disks = [
        ext4_image(work / f"ten{i}.img", {"marker": f"disk {i}\n".encode()}) for i in range(10)
    ]
    infos = []
    for index, path in enumerate(disks):
        info = sb.add_disk(path, f"ten{index}", timeout=DEVICE_DEADLINE)
        assert info.device_wait_ms < DEVICE_DEADLINE * 1000
        assert info.hotplug_seconds is not None and info.hotplug_seconds < DEVICE_DEADLINE
        assert info.fstype == "ext4" and info.mount_point.endswith(f"/ten{index}")
        assert "/pci0000:00/0000:00:1" in info.device_path  # behind a hot-plug port
        infos.append(info)
    assert len({i.device_path for i in infos}) == 10
    print("device_add -> mounted:", [f"{i.hotplug_seconds:.2f}s" for i in infos])
    volumes = [volume(f"ten{i}", f"/v{i}", readonly=True) for i in range(10)]
    out, err, code = run(sb, ["sh", "-c", "cat /v*/marker"], volumes=volumes)
    assert (code, out) == (0, b"".join(f"disk {i}\n".encode() for i in range(10))), err
    assert sorted(s.storage_id for s in sb.storage.list()) == sorted(f"ten{i}" for i in range(10))
    for index in range(10):
        sb.remove_disk(f"ten{index}")
    assert sb.storage.list() == []


def test_a_wrong_pci_path_times_out_naming_it(sb: Sandbox, work: Path) -> None:
    plugged = sb.plug_disk(ext4_image(work / "wrong.img", {}), "wrong")
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            sb.storage.add("lost", "block", pci_path="1e/00", timeout=2.0)
        assert time.monotonic() - started < 2.0 + 10.0
        message = str(info.value)
        assert "timed out after 2 s waiting for a disk at PCI path 1e/00" in message
        assert "no PCI device 0000:00:1e.0" in message
        # What is there is named too: the disk that was plugged, at its own path.
        assert f"0000:00:{0x10 + plugged.port:02x}.0" in message
        with pytest.raises(DeadlineExceeded, match="serial 'nope'"):
            sb.storage.add("lost", "block", serial="nope", timeout=1.0)
    finally:
        sb.unplug_disk("wrong")


# --- root filesystems, overlays, read-only ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["ext4", "erofs"])
def test_container_root_filesystem_from_a_disk(sb: Sandbox, work: Path, fmt: str) -> None:
    tree = busybox_tree(work / f"root-{fmt}")
    (tree / "etc" / "marker").write_text(f"root on {fmt}\n")
    image = images.build(work / f"root.{fmt}", from_dir=tree, fmt=fmt).path
    before = sha256_file(image)
    info = sb.add_disk(image, f"root-{fmt}", readonly=True, timeout=DEVICE_DEADLINE)
    assert (info.fstype, info.read_only) == (fmt, True)
    # The container's own overlay takes its writes: the disk is never written.
    script = "cat /etc/marker; echo changed >/etc/marker; cat /etc/marker; ls /bin/busybox"
    out, err, code = run(sb, ["sh", "-c", script], rootfs_storage=f"root-{fmt}")
    assert (code, out) == (0, f"root on {fmt}\nchanged\n/bin/busybox\n".encode()), err
    sb.remove_disk(f"root-{fmt}")
    assert sha256_file(image) == before


def test_overlay_writes_never_reach_the_lower_layer(sb: Sandbox, work: Path) -> None:
    image = ext4_image(work / "lower.img", {"data/file": b"original\n"})
    before = sha256_file(image)
    sb.add_disk(image, "lower", readonly=True, timeout=DEVICE_DEADLINE)
    sb.storage.add("upper", "tmpfs", options=["size=16m"])
    sb.storage.add("merged", "overlay", lowers=["lower/data"], upper="upper")
    script = "cat /m/file; echo changed >/m/file; echo new >/m/other; rm -f /m/file; ls /m"
    out, err, code = run(sb, ["sh", "-c", script], volumes=[volume("merged", "/m")])
    assert (code, out) == (0, b"original\nother\n"), err
    with pytest.raises(FailedPrecondition, match="in use by storage:merged"):
        sb.remove_disk("lower")
    sb.storage.remove("merged")
    sb.storage.remove("upper")
    sb.remove_disk("lower")
    assert sha256_file(image) == before
    assert debugfs(image, "cat /data/file") == b"original\n"


def test_a_read_only_volume_is_read_only_in_the_container(sb: Sandbox, work: Path) -> None:
    image = ext4_image(work / "ro.img", {"file": b"keep\n"})
    before = sha256_file(image)
    sb.add_disk(image, "ro-disk", readonly=True, timeout=DEVICE_DEADLINE)
    sb.storage.add("ro-tmp", "tmpfs", options=["ro"])
    script = (
        "cat /ro/file; (echo x >/ro/file) 2>&1 || echo refused-disk; "
        "mount -o remount,rw /ro 2>/dev/null || echo no-remount; "
        "touch /t/x 2>&1 || echo refused-tmpfs"
    )
    volumes = [volume("ro-disk", "/ro"), volume("ro-tmp", "/t")]  # not asked ro: still ro
    out, _, code = run(sb, ["sh", "-c", script], volumes=volumes)
    assert code == 0
    assert out.count(b"Read-only file system") == 2, out
    assert b"keep\n" in out and b"refused-disk" in out and b"refused-tmpfs" in out
    assert b"no-remount" in out
    sb.remove_disk("ro-disk")
    assert sha256_file(image) == before


# --- escapes -----------------------------------------------------------------------------------


def test_path_escapes_are_rejected(sb: Sandbox) -> None:
    for mount_point in ("../../etc", "/etc", "a/../../../sbin"):
        with pytest.raises(InvalidArgument, match="mount_point"):
            sb.storage.add("evil", "tmpfs", mount_point=mount_point)
    sb.storage.add("vol", "local")
    # Something in a container plants symlinks that lead out of the storage.
    out, err, code = run(
        sb, ["sh", "-c", "ln -s /etc /v/abs && ln -s ../../../.. /v/rel && ls /v"],
        volumes=[volume("vol", "/v")],
    )  # fmt: skip
    assert (code, out) == (0, b"abs\nrel\n"), err
    for path in ("../x", "/etc/x", "abs/passwd", "rel/etc/passwd"):
        with pytest.raises(InvalidArgument):
            sb.storage.copy_file(b"evil", "vol", path, make_parents=True)
    for source in ("vol/abs", "vol/../vol", "vol/rel/etc"):
        with pytest.raises(InvalidArgument):
            sb.run(["true"], volumes=[volume(source, "/x")])
    with pytest.raises(FailedPrecondition, match="overlaps"):
        sb.storage.add("nested", "tmpfs", mount_point="vol/inner")
    with pytest.raises(InvalidArgument, match="storage_id"):
        sb.storage.add("../up", "tmpfs")


# --- file copy ---------------------------------------------------------------------------------


def test_a_200_mb_copy_arrives_whole_with_mode_and_owner(sb: Sandbox, work: Path) -> None:
    source = work / "big.bin"
    with open(source, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(MiB))
    digest = sha256_file(source)
    image = work / "copies.img"
    with open(image, "wb") as f:
        f.truncate(320 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    sb.add_disk(image, "copies", timeout=DEVICE_DEADLINE)
    started = time.monotonic()
    where = sb.storage.copy_file(
        source, "copies", "in/big.bin", mode=0o640, uid=1000, gid=1001, make_parents=True,
        timeout=COPY_DEADLINE,
    )  # fmt: skip
    seconds = time.monotonic() - started
    print(f"200 MB copied in {seconds:.1f} s ({200 / seconds:.1f} MB/s)")
    assert where == "/run/bulkhead/storage/copies/in/big.bin"
    stats = sb.storage.volume_stats("copies")
    assert stats.used_bytes >= 200 * MiB and stats.capacity_bytes > stats.used_bytes
    out, err, code = run(
        sb, ["sh", "-c", "stat -c '%a %u %g %s' /c/in/big.bin; sha256sum /c/in/big.bin"],
        volumes=[volume("copies", "/c", readonly=True)],
    )  # fmt: skip
    assert code == 0, err
    assert out.decode().split() == ["640", "1000", "1001", str(200 * MiB), digest, "/c/in/big.bin"]
    sb.remove_disk("copies")
    stat = debugfs(image, "stat /in/big.bin").decode()
    assert "Mode:  0640" in stat and "User:  1000" in stat and "Group:  1001" in stat
    assert debugfs(image, "ls /in").count(b".big.bin.bulkhead-") == 0  # no temporary left


# --- images made by real tools ---------------------------------------------------------------


def test_an_oci_image_made_by_umoci_becomes_a_working_container(sb: Sandbox, work: Path) -> None:
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed (scripts/bootstrap.sh installs it)")
    layout, bundle = work / "oci", work / "bundle"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:app")
    umoci("unpack", "--image", f"{layout}:app", str(bundle))
    busybox_tree(bundle / "rootfs")
    (bundle / "rootfs" / "etc" / "secret").write_text("removed in the next layer\n")
    umoci("repack", "--image", f"{layout}:app", str(bundle))
    shutil.rmtree(bundle)
    umoci("unpack", "--image", f"{layout}:app", str(bundle))
    (bundle / "rootfs" / "etc" / "secret").unlink()
    (bundle / "rootfs" / "etc" / "greeting").write_text("hello from an OCI image\n")
    umoci("repack", "--image", f"{layout}:app", str(bundle))
    umoci(
        "config", "--image", f"{layout}:app", "--config.cmd", "sh", "--config.cmd", "-c",
        "--config.cmd", "cat /etc/greeting; ls /etc",
    )  # fmt: skip

    made = images.build(work / "app.erofs", from_oci=f"{layout}:app", fmt="erofs")
    assert made.command == ["sh", "-c", "cat /etc/greeting; ls /etc"]
    sb.add_disk(made.path, "app", readonly=True, timeout=DEVICE_DEADLINE)
    out, err, code = run(sb, made.command, rootfs_storage="app")
    assert code == 0, err
    assert out.startswith(b"hello from an OCI image\n")
    assert b"greeting" in out and b"secret" not in out  # the whiteout held


# --- shares --------------------------------------------------------------------------------------


def test_a_debian_root_made_by_mmdebstrap_becomes_a_working_container(
    sb: Sandbox, work: Path
) -> None:
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (scripts/bootstrap.sh installs it)")
    image = images.build(work / "debian.erofs", debian_suite="bookworm", fmt="erofs").path
    sb.add_disk(image, "debian", readonly=True, timeout=DEVICE_DEADLINE)
    script = "cat /etc/debian_version; dpkg-query -W -f='${Package} ${Status}\\n' dash"
    out, err, code = run(sb, ["sh", "-c", script], rootfs_storage="debian")
    assert (code, err) == (0, b""), err
    version, dash = out.decode().splitlines()
    assert version.startswith("12."), version
    assert dash == "dash install ok installed"
    sb.remove_disk("debian")


def test_virtio_fs_share(sb: Sandbox, work: Path) -> None:
    if find_virtiofsd() is None:
        pytest.skip("no virtiofsd on this host")
    shared = work / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host says hi\n")
    info = sb.add_share(shared, "share", timeout=DEVICE_DEADLINE)
    assert info.fstype == "virtiofs"
    out, err, code = run(
        sb, ["sh", "-c", "cat /s/from-host; echo guest says hi >/s/from-guest"],
        volumes=[volume("share", "/s")],
    )  # fmt: skip
    assert (code, out) == (0, b"host says hi\n"), err
    assert (shared / "from-guest").read_text() == "guest says hi\n"
    sb.remove_share("share")


def test_container_root_filesystem_from_a_9p_share(sb: Sandbox, work: Path) -> None:
    root = work / "ninep-root"
    info = sb.add_9p("ninep")
    assert (info.driver, info.fstype, info.read_only) == ("9p", "9p", False)
    script = "cat /etc/hello; echo changed > /etc/hello; cat /etc/hello; ls /bin/busybox"
    out, err, code = run(sb, ["sh", "-c", script], rootfs_storage="ninep")
    assert (code, err) == (0, b""), err
    assert out == b"hello from a 9p share\nchanged\n/bin/busybox\n"
    # The container's writable layer is its own: the shared directory is as it was.
    assert (root / "etc" / "hello").read_text() == "hello from a 9p share\n"
    # The same root by its guest path, from the CLI (README, "Storage").
    cli = subprocess.run(
        [sys.executable, "-m", "bulkhead.cli", "--state-dir", str(sb.paths.dir.parent),
         "run", "--rm", "--sandbox", sb.name, "--rootfs", f"guest:{info.mount_point}",
         "--", "cat", "/etc/hello"],
        capture_output=True, timeout=RUN_DEADLINE,
    )  # fmt: skip
    assert (cli.returncode, cli.stdout) == (0, b"hello from a 9p share\n"), cli.stderr
    sb.storage.remove("ninep")


def test_9p_shares_come_only_from_boot_and_unknown_tags_fail_clearly(sb: Sandbox) -> None:
    with pytest.raises(SandboxError, match=r"no 9p share 'other'.*given at boot: ninep"):
        sb.add_9p("other")
    # Straight to the agent, a tag the guest has no device for times out naming it.
    with pytest.raises(DeadlineExceeded, match="9p share with tag 'missing'"):
        sb.storage.add("nine", "9p", tag="missing", timeout=1.0)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_run_with_a_disk(sb: Sandbox, work: Path, state_dir: Path) -> None:
    image = ext4_image(work / "cli.img", {"hello": b"hello from --disk\n"})
    cmd = [
        sys.executable, "-m", "bulkhead.cli", "--state-dir", str(state_dir),
        "run", "--rm", "--sandbox", sb.name, "--disk", f"{image}:/data:ro",
        "--", "sh", "-c", "cat /data/hello; touch /data/x 2>/dev/null || echo read-only",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=RUN_DEADLINE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello from --disk\nread-only\n"
    assert sb.storage.list() == []  # unmounted and unplugged after the run


# --- persistent memory (last: QEMU cannot unplug it, its port stays taken) ---------------------


def test_pmem_with_dax(sb: Sandbox, work: Path) -> None:
    tree = work / "pmem.d"
    tree.mkdir()
    (tree / "hello").write_text("hello from pmem\n")
    image = work / "pmem.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    # DAX needs the filesystem's block size to be the page size.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(image)], check=True)
    info = sb.add_pmem(image, "pm", dax=True, timeout=DEVICE_DEADLINE)
    assert info.driver == "pmem" and info.source.startswith("/dev/pmem"), info
    out, err, code = run(
        sb, ["sh", "-c", "cat /p/hello; grep ' /p ' /proc/mounts"], volumes=[volume("pm", "/p")]
    )
    assert code == 0, err
    assert out.startswith(b"hello from pmem\n") and b"dax" in out, out
    sb.remove_pmem("pm")
