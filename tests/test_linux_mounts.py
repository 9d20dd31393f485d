"""OCI mount options split into mount(2) flags, propagation and filesystem data."""

from __future__ import annotations

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
