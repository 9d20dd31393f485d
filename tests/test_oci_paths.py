"""Paths inside a rootfs resolve as if the rootfs were "/": no escape by symlink or "..."."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bulkhead_agent.oci.paths import make_mount_point, resolve_in_root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")  # relative, as in merged-/usr images
    (root / "abs").symlink_to("/usr")  # absolute: means the rootfs's /usr
    (root / "up").symlink_to("../../../../..")  # tries to climb out
    (root / "host").symlink_to(str(tmp_path))  # the host path of the parent
    (root / "loop").symlink_to("loop")
    return root


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/etc", "etc"),
        ("/etc/", "etc"),
        ("etc/resolv.conf", "etc/resolv.conf"),
        ("/lib/x", "usr/lib/x"),
        ("/abs/lib", "usr/lib"),
        ("/../../etc", "etc"),
        ("/etc/../../../../x", "x"),
        ("/up/etc", "etc"),
        ("/missing/../etc", "etc"),
        ("/", ""),
    ],
)
def test_resolves_inside(root: Path, path: str, expected: str) -> None:
    assert resolve_in_root(str(root), path) == os.path.join(str(root), expected).rstrip("/")


def test_absolute_link_to_a_host_path_stays_inside(root: Path, tmp_path: Path) -> None:
    # "/tmp/.../" is read as a path inside the rootfs, where it does not exist.
    resolved = resolve_in_root(str(root), "/host/secret")
    assert resolved == str(root) + str(tmp_path) + "/secret"


def test_symlink_loops_fail(root: Path) -> None:
    with pytest.raises(OSError) as info:
        resolve_in_root(str(root), "/loop/x")
    assert info.value.errno == errno.ELOOP


def test_make_mount_point_creates_dirs_and_files_inside(root: Path, tmp_path: Path) -> None:
    target = make_mount_point(str(root), "/up/new/dir")
    assert target == str(root / "new" / "dir") and os.path.isdir(target)
    target = make_mount_point(str(root), "/lib/conf/file", directory=False)
    assert target == str(root / "usr" / "lib" / "conf" / "file") and os.path.isfile(target)
    assert not (tmp_path / "new").exists()
