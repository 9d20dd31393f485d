"""OCI mount options split into mount(2) flags, propagation and filesystem data."""

from __future__ import annotations

import os

import pytest

from bulkhead_agent.linux import mounts as m
from bulkhead_agent.linux.mounts import MountOptions, parse_mount_options


def test_the_usual_mix_splits_into_flags_propagation_and_data() -> None:
    options = ["nosuid", "nodev", "ro", "rbind", "rprivate", "size=65536k", "mode=755"]
    assert parse_mount_options(options) == MountOptions(
        flags=m.MS_NOSUID | m.MS_NODEV | m.MS_RDONLY | m.MS_BIND | m.MS_REC,
        propagation=m.MS_PRIVATE | m.MS_REC,
        data="size=65536k,mode=755",
    )


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ([], 0),
        (["defaults"], 0),
        (["ro", "rw"], 0),  # the later option wins
        (["rw", "ro"], m.MS_RDONLY),
        (["nosuid", "suid"], 0),
        (["noexec", "nodev", "nosuid"], m.MS_NOEXEC | m.MS_NODEV | m.MS_NOSUID),
        (["bind"], m.MS_BIND),
        (["rbind"], m.MS_BIND | m.MS_REC),
        (["strictatime", "noatime", "atime"], m.MS_STRICTATIME),
        (["relatime", "norelatime"], 0),
        (["sync", "async"], 0),
        (["dirsync", "mand", "silent"], m.MS_DIRSYNC | m.MS_MANDLOCK | m.MS_SILENT),
        (["remount", "ro"], m.MS_REMOUNT | m.MS_RDONLY),
    ],
)
def test_flag_options(options: list[str], flags: int) -> None:
    parsed = parse_mount_options(options)
    assert (parsed.flags, parsed.propagation, parsed.data) == (flags, 0, "")


@pytest.mark.parametrize(
    ("option", "propagation"),
    [
        ("private", m.MS_PRIVATE),
        ("rprivate", m.MS_PRIVATE | m.MS_REC),
        ("shared", m.MS_SHARED),
        ("rshared", m.MS_SHARED | m.MS_REC),
        ("slave", m.MS_SLAVE),
        ("rslave", m.MS_SLAVE | m.MS_REC),
        ("unbindable", m.MS_UNBINDABLE),
        ("runbindable", m.MS_UNBINDABLE | m.MS_REC),
    ],
)
def test_propagation_options_are_kept_apart_from_flags(option: str, propagation: int) -> None:
    assert parse_mount_options(["nosuid", option]) == MountOptions(m.MS_NOSUID, propagation, "")


def test_filesystem_options_pass_through_in_order() -> None:
    options = ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
    parsed = parse_mount_options(options)
    assert parsed.data == "newinstance,ptmxmode=0666,mode=0620,gid=5"
    assert parsed.flags == m.MS_NOSUID | m.MS_NOEXEC


def test_flag_names_for_messages() -> None:
    assert m.flag_names(0) == "0"
    assert m.flag_names(m.MS_BIND | m.MS_REC) == "MS_BIND|MS_REC"
    assert m.flag_names(m.MS_RDONLY | 0x40000000) == "MS_RDONLY|0x40000000"


def test_mount_table_unescapes_mount_points_and_reads_the_fstype(tmp_path) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"22 1 0:21 / / rw,relatime - rootfs rootfs rw\n"
        b"35 22 0:33 / /run/a\\040b\\011c rw shared:9 - tmpfs tmpfs rw,size=10k\n"
        b"36 22 0:34 / / rw master:1 - overlay overlay rw\n"
    )
    assert m.mount_table(str(info)) == [
        m.MountInfo(b"/", b"rootfs"),
        m.MountInfo(b"/run/a b\tc", b"tmpfs"),  # optional fields before "-" skipped
        m.MountInfo(b"/", b"overlay"),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")
def test_is_mount_point_sees_a_bind_mount_within_one_file_system(tmp_path) -> None:
    target = tmp_path / "with space"
    target.mkdir()
    assert not m.is_mount_point(str(target))
    assert not os.path.ismount(target)
    m.mount(str(target), str(target), None, m.MS_BIND)
    try:
        assert m.is_mount_point(str(target))
        assert not os.path.ismount(target)  # why the kernel's table is asked instead
    finally:
        m.umount2(str(target))
    assert not m.is_mount_point(str(target))
