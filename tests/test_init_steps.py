"""Tests of init's boot steps one by one: modules, cgroups, mounts, network, entropy.

What would change the host (loading modules, enabling host cgroup controllers) is tested
against fakes; mounts are tested for real under a scratch prefix in a private mount
namespace.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead_init import cgroups, entropy, log, modules, mounts, network

INIT_DIR = Path(__file__).resolve().parents[1] / "init"


@pytest.fixture
def logger(tmp_path: Path) -> Iterator[tuple[log.Logger, Path]]:
    path = tmp_path / "console.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    yield log.Logger("init", "debug", fd), path
    os.close(fd)


# --- modules --------------------------------------------------------------------------


def test_module_name() -> None:
    assert modules.module_name("kernel/net/vmw_vsock/vsock.ko") == "vsock"
    assert modules.module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"


def test_load_in_order_with_eexist_as_success(logger, tmp_path: Path) -> None:
    lg, path = logger
    base = tmp_path / "6.1.0-test"
    for rel in ("a/vsock.ko", "b/virtio-rng.ko", "c/broken.ko", "d/loaded.ko"):
        (base / rel).parent.mkdir(parents=True)
        (base / rel).write_bytes(rel.encode())
    listing = tmp_path / "bulkhead-load.txt"
    listing.write_text(
        "# dependencies first\n\na/vsock.ko\nb/virtio-rng.ko\nc/broken.ko\n"
        "d/loaded.ko\ne/missing.ko\n"
    )
    seen = []

    def fake_finit(fd: int) -> None:
        content = os.pread(fd, 100, 0).decode()
        seen.append(content)
        if content == "c/broken.ko":
            raise OSError(errno.ENOEXEC, "Exec format error")
        if content == "d/loaded.ko":
            raise OSError(errno.EEXIST, "File exists")

    names = modules.load(lg, listing=str(listing), base=str(base), loader=fake_finit)
    assert names == ["vsock", "virtio_rng", "loaded"]
    assert seen == ["a/vsock.ko", "b/virtio-rng.ko", "c/broken.ko", "d/loaded.ko"]
    text = path.read_text()
    assert "WARNING init: cannot load module broken (c/broken.ko): Exec format error" in text
    assert "cannot load module missing (e/missing.ko)" in text
    assert "loaded 3/5 modules" in text


def test_no_load_list_means_no_modules(logger, tmp_path: Path) -> None:
    lg, _ = logger
    assert modules.load(lg, listing=str(tmp_path / "none.txt"), base=str(tmp_path)) == []


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_finit_module_reaches_the_kernel(tmp_path: Path) -> None:
    # Not a module: the kernel refuses it (ENOEXEC; EPERM without CAP_SYS_MODULE; ENOSYS
    # on a kernel built without modules). What matters is that the errno comes back.
    from bulkhead_init import libc

    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"not an ELF module" * 8)
    fd = os.open(junk, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            libc.finit_module(fd)
    finally:
        os.close(fd)
    assert caught.value.errno in (
        errno.ENOEXEC,
        errno.EPERM,
        errno.EINVAL,
        errno.EKEYREJECTED,
        errno.ENOSYS,
    )


# --- cgroups --------------------------------------------------------------------------


def _fake_cgroup_root(tmp_path: Path, controllers: str) -> Path:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    return tmp_path


def test_enable_only_what_the_kernel_offers(logger, tmp_path: Path) -> None:
    lg, path = logger
    root = _fake_cgroup_root(tmp_path, "cpuset cpu io memory pids rdma misc")
    assert cgroups.enable_controllers(lg, str(root)) == ["cpu", "cpuset", "io", "memory", "pids"]
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +cpuset +io +memory +pids"
    assert "(not in this kernel: hugetlb)" in path.read_text()


def test_one_refused_controller_does_not_cost_the_others(
    logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg, path = logger
    root = _fake_cgroup_root(tmp_path, "cpu memory pids")
    written = []

    def picky_write(p: str, text: str) -> None:
        if "cpu" in text:
            raise OSError(errno.EINVAL, "Invalid argument")
        written.append(text)

    monkeypatch.setattr(cgroups, "_write", picky_write)
    assert cgroups.enable_controllers(lg, str(root)) == ["memory", "pids"]
    assert written == ["+memory", "+pids"]
    assert "cannot enable cgroup controller cpu" in path.read_text()


# --- mounts ---------------------------------------------------------------------------


def test_unescape_mount_points() -> None:
    assert mounts._unescape("/mnt/with\\040space\\011tab\\134") == "/mnt/with space\ttab\\"
    assert mounts._unescape("/plain") == "/plain"


MOUNT_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from bulkhead_init import log, mounts
root = sys.argv[1]
lg = log.Logger("init", "debug", 2)
first = [mounts.mount_proc(lg, root), mounts.setup(lg, root)]
second = [mounts.mount_proc(lg, root), mounts.setup(lg, root)]
table = []
with open("/proc/self/mounts") as f:
    for line in f:
        source, target, fstype, options = line.split()[:4]
        if target.startswith(root + "/"):
            table.append([target[len(root):], fstype, options])
links = {p: os.readlink(root + p) for p in ("/dev/fd", "/dev/stdin", "/dev/stderr")}
print(json.dumps({"first": first, "second": second, "table": table, "links": links}))
"""


@pytest.fixture
def scratch_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bulkhead-mounts-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_mounts_are_complete_and_idempotent(scratch_root: Path) -> None:
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-I",
            "-S",
            "-c",
            MOUNT_SCRIPT,
            str(scratch_root),
            str(INIT_DIR),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    table = {target: (fstype, set(opts.split(","))) for target, fstype, opts in out["table"]}

    assert out["first"][0] is True
    mounted = [p[len(str(scratch_root)) :] for p in out["first"][1]]
    assert sorted(mounted) == sorted(t for _, t, *_ in mounts.TABLE)
    assert out["second"] == [False, []]  # nothing mounted twice
    assert [target for target, *_ in out["table"]].count("/dev/pts") == 1
    assert table["/proc"][0] == "proc" and {"nosuid", "nodev", "noexec"} <= table["/proc"][1]
    assert table["/sys"][0] == "sysfs"
    assert table["/dev"][0] == "devtmpfs"
    assert table["/dev/pts"][0] == "devpts"
    assert {"ptmxmode=666", "mode=620", "gid=5"} <= table["/dev/pts"][1]
    assert table["/dev/shm"][0] == "tmpfs" and "nosuid" in table["/dev/shm"][1]
    assert table["/run"][0] == "tmpfs" and {"nosuid", "nodev", "mode=755"} <= table["/run"][1]
    assert table["/tmp"][0] == "tmpfs"
    assert out["links"] == {
        "/dev/fd": "/proc/self/fd",
        "/dev/stdin": "/proc/self/fd/0",
        "/dev/stderr": "/proc/self/fd/2",
    }
    # The namespace is gone, and its mounts with it: the prefix is empty again.
    assert not os.path.ismount(scratch_root / "proc")


# --- network and entropy ----------------------------------------------------------------


def test_ifreq_layout() -> None:
    assert network._IFREQ.size == 40  # sizeof(struct ifreq) on x86_64


def test_loopback_flags_readable() -> None:
    # lo is up on any host: link_up must see that and change nothing.
    assert network.link_up("lo") is False


def test_set_hostname_writes_the_file(tmp_path: Path) -> None:
    target = tmp_path / "hostname"
    network.set_hostname("box-1", str(target))
    assert target.read_text() == "box-1"


def test_entropy_never_raises_and_reports(logger) -> None:
    lg, path = logger
    assert isinstance(entropy.stir(lg, b"console=hvc0"), bool)
    assert "entropy: pool ready" in path.read_text()
