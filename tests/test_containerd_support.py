"""The private-containerd harness (qemu-test/containerd_support.py) and the runc baseline.

The daemon tests need root and Debian's containerd + runc (scripts/bootstrap.sh installs them);
the image and config tests only need busybox-static.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qemu-test"))
import containerd_support as cs

UNAVAILABLE = cs.containerd_available()
needs_containerd = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))
needs_busybox = pytest.mark.skipif(
    not cs.BUSYBOX.is_file(), reason="/bin/busybox missing (apt-get install busybox-static)"
)


@pytest.fixture
def short_dir() -> Iterator[Callable[[str], Path]]:
    """Factory of short dirs (pytest's tmp_path is too long for unix sockets under it)."""
    made: list[Path] = []

    def make(tag: str) -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=f"bh-{tag}-", dir="/tmp")))
        return made[-1]

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- no daemon -----------------------------------------------------------------------------


def test_config_keeps_everything_under_root(tmp_path: Path) -> None:
    ctrd = cs.Containerd(Path("/tmp/bh-cfg-test"))
    config = tomllib.loads(ctrd.config_text())
    assert config["version"] == 2
    assert config["root"] == "/tmp/bh-cfg-test/root"
    assert config["state"] == "/tmp/bh-cfg-test/state"
    assert config["grpc"]["address"] == "/tmp/bh-cfg-test/containerd.sock"
    assert config["ttrpc"]["address"] == "/tmp/bh-cfg-test/containerd.sock.ttrpc"
    assert config["debug"]["level"] == "debug"
    assert "io.containerd.grpc.v1.cri" in config["disabled_plugins"]
    assert config["plugins"]["io.containerd.internal.v1.opt"]["path"] == "/tmp/bh-cfg-test/opt"


def test_path_puts_extra_then_interpreter_dir_first() -> None:
    ctrd = cs.Containerd(Path("/tmp/bh-path-test"), extra_path=["/opt/first"])
    dirs = ctrd.path.split(os.pathsep)
    # Not resolved: a venv's console scripts live beside its python symlink.
    assert dirs[:2] == ["/opt/first", os.path.dirname(sys.executable)]
    assert "/usr/sbin" in dirs  # runc
    assert len(dirs) == len(set(dirs))


def test_long_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        cs.Containerd(tmp_path / ("x" * 100))


def test_mount_points_are_unescaped(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "99 27 0:50 / /tmp/a\\040b rw - overlay overlay rw,lowerdir=/x\n"
    )
    assert cs.mount_points(info) == ["/", "/tmp/a b"]


@needs_busybox
def test_image_build_is_reproducible_and_cached(tmp_path: Path) -> None:
    first = cs.build_busybox_image(tmp_path / "a")
    second = cs.build_busybox_image(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert cs.image_manifest_digest(first) == cs.image_manifest_digest(second)
    mtime = first.stat().st_mtime_ns
    assert cs.build_busybox_image(tmp_path / "a") == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    other = cs.build_busybox_image(tmp_path / "a", ref="localhost/other:1")
    assert other != first
    assert cs.archive_ref(other) == "localhost/other:1"


@needs_busybox
def test_image_layout(tmp_path: Path) -> None:
    archive = cs.build_busybox_image(tmp_path)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert member_json(tar, "oci-layout") == {"imageLayoutVersion": "1.0.0"}
        desc = member_json(tar, "index.json")["manifests"][0]
        manifest = member_json(tar, blob(desc["digest"]))
        config = member_json(tar, blob(manifest["config"]["digest"]))
        layer_gz = tar.extractfile(blob(manifest["layers"][0]["digest"]))
        with tarfile.open(fileobj=layer_gz, mode="r:gz") as layer:
            rootfs = {m.name: m for m in layer.getmembers()}
    assert "index.json" in names
    assert desc["annotations"] == {
        "io.containerd.image.name": cs.DEFAULT_REF,
        "org.opencontainers.image.ref.name": "test",
    }
    assert config["config"]["Cmd"] == ["sh"]
    assert config["config"]["Env"][0].startswith("PATH=")
    assert rootfs["bin/busybox"].isfile() and rootfs["bin/busybox"].mode == 0o755
    for applet in ("sh", "echo", "cat", "sleep", "true", "false", "ls", "ps", "id", "env", "dd"):
        assert rootfs[f"bin/{applet}"].issym() and rootfs[f"bin/{applet}"].linkname == "busybox"
    assert {"etc/passwd", "etc/group", "tmp", "proc", "dev", "sys"} <= rootfs.keys()
    assert all(m.mtime == 0 and m.uid == 0 for m in rootfs.values())


def blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def member_json(tar: tarfile.TarFile, name: str) -> Any:
    member = tar.extractfile(name)
    assert member is not None, name
    return json.load(member)


# -- with a daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctrd() -> Iterator[cs.Containerd]:
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    root = Path(tempfile.mkdtemp(prefix="bh-ctrd-", dir="/tmp"))
    try:
        with cs.Containerd(root) as daemon:
            yield daemon
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image_ref(ctrd: cs.Containerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    archive = cs.build_busybox_image(tmp_path_factory.mktemp("image"))
    return cs.import_image(ctrd, archive)


@needs_containerd
@pytest.mark.root
def test_start_stop_leaves_nothing_behind(short_dir: Callable[[str], Path]) -> None:
    daemon = cs.Containerd(short_dir("startstop"))
    daemon.start()
    pid = daemon.pid
    assert pid is not None and pid_alive(pid)
    assert daemon.address.is_socket() and daemon.ttrpc_address.is_socket()
    assert b"Server:" in daemon.ctr("version").stdout
    assert daemon.snapshotter in ("overlayfs", "native")
    assert daemon.stop() == []
    assert not pid_alive(pid)
    assert not daemon.address.exists() and not daemon.ttrpc_address.exists()
    assert daemon.mounts() == []
    # A second start on the same root (fresh sockets, same metadata) works too.
    with daemon:
        daemon.ctr("version")


@needs_containerd
@pytest.mark.root
def test_start_failure_reports_the_log(short_dir: Callable[[str], Path]) -> None:
    daemon = cs.Containerd(short_dir("badstart"))
    daemon.address.mkdir(parents=True)  # containerd cannot listen where a directory is
    (daemon.address / "keep").touch()
    with pytest.raises(cs.ContainerdError, match="did not start") as err:
        daemon.start(timeout=15)
    assert "containerd.sock" in str(err.value)  # the log tail names what failed
    assert not daemon.running()


@needs_containerd
@pytest.mark.root
def test_ctr_failure_carries_stderr(ctrd: cs.Containerd) -> None:
    with pytest.raises(cs.ContainerdError, match="not found"):
        ctrd.ctr("containers", "info", "no-such-container")
    assert ctrd.ctr("containers", "info", "no-such-container", check=False).returncode != 0


@needs_containerd
@pytest.mark.root
def test_image_imports_under_its_ref(ctrd: cs.Containerd, image_ref: str) -> None:
    assert image_ref == cs.DEFAULT_REF
    assert image_ref in ctrd.images()
    assert image_ref in ctrd.ctr("images", "ls").stdout.decode()


@needs_containerd
@pytest.mark.root
def test_runc_round_trip_leaves_nothing(ctrd: cs.Containerd, image_ref: str) -> None:
    hello = ctrd.run(image_ref, "rt-hello", "/bin/echo", "hello")
    assert hello.stdout == b"hello\n"
    assert hello.returncode == 0
    # ctr's own exit status is the container's.
    three = ctrd.run(image_ref, "rt-exit3", "sh", "-c", "exit 3", check=False)
    assert three.returncode == 3, three.stderr

    assert ctrd.containers() == []
    assert ctrd.tasks() == []
    # The shims exit just after answering the last Delete/Shutdown: wait, do not assume.
    cs.wait_for(lambda: not ctrd.shims(), 10, "the runc shims to exit")
    assert ctrd.mounts() == []
    for cid in ("rt-hello", "rt-exit3"):
        assert not ctrd.bundle_dir(cid).exists()
        assert not ctrd.shim_socket(cid).exists()
        assert ctrd.cgroup_dirs(cid) == []
    assert list(ctrd.fifo_dir.iterdir()) == []


@needs_containerd
@pytest.mark.root
def test_detached_container_bundle(ctrd: cs.Containerd, image_ref: str) -> None:
    """What a runtime v2 shim is handed: the bundle with config.json and a mounted rootfs."""
    cid = "bundle-probe"
    ctrd.ctr(*ctrd.run_args(image_ref, cid, "sleep", "60", rm=False, options=["--detach"]))
    try:
        bundle = ctrd.bundle_dir(cid)
        spec = json.loads((bundle / "config.json").read_text())
        assert spec["process"]["args"] == ["sleep", "60"]
        assert spec["root"]["path"] == "rootfs"
        assert str(bundle / "rootfs") in ctrd.mounts()
        assert (bundle / "rootfs/bin/busybox").is_file()
        assert ctrd.shim_socket(cid).is_socket()
        assert cid in ctrd.tasks()
    finally:
        ctrd.remove(cid)
    cs.wait_for(lambda: not ctrd.shims(), 10, "the runc shim to exit")
    assert ctrd.mounts() == []
    assert ctrd.containers() == []


@needs_containerd
@pytest.mark.root
def test_terminal_run_through_popen(ctrd: cs.Containerd, image_ref: str) -> None:
    """``ctr run -t`` wants a terminal on its own stdin: give it a pty."""
    cid = "tty-run"
    leader, follower = pty.openpty()
    argv = ctrd.run_args(image_ref, cid, "sh", "-c", "tty; exit 5", options=["-t"])
    proc = ctrd.ctr_popen(*argv, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    try:
        output = read_until_eof(leader, deadline=time.monotonic() + 20)
        assert proc.wait(20) == 5
        assert b"/dev/pts/" in output
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ctrd.remove(cid)
    assert ctrd.containers() == []
    cs.wait_for(lambda: not ctrd.shims(), 10, "the runc shim to exit")


def read_until_eof(fd: int, deadline: float) -> bytes:
    out = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every follower fd is closed
            break
        if not chunk:
            break
        out += chunk
    return out


@needs_containerd
@pytest.mark.root
def test_time_runs_measures_whole_runs(ctrd: cs.Containerd, image_ref: str) -> None:
    times = cs.time_runs(ctrd, image_ref, 2, prefix="timing")
    assert len(times) == 2 and all(0 < t < 60 for t in times)
    assert ctrd.containers() == []
