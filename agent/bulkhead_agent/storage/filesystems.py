"""Which filesystem a disk holds, from its superblock's magic number (there is no blkid in
the guest), and the filesystems the agent mounts from disks."""

from __future__ import annotations

import os

# (offset, magic bytes, name); the first match wins.
_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"hsqs", "squashfs"),
    (0, b"XFSB", "xfs"),
    (1024, (0xE0F5E1E2).to_bytes(4, "little"), "erofs"),
    (1080, (0xEF53).to_bytes(2, "little"), "ext4"),  # ext2/3 too: the ext4 driver mounts them
    (0x10040, b"_BHRfS_M", "btrfs"),
)
_PROBE_BYTES = 0x10048

# What a BLOCK or PMEM storage may be mounted as (the guest kernel has these).
DISK_FILESYSTEMS = frozenset({"ext4", "ext3", "ext2", "erofs", "squashfs", "xfs", "btrfs"})
READ_ONLY_FILESYSTEMS = frozenset({"erofs", "squashfs"})
DAX_FILESYSTEMS = frozenset({"ext4", "xfs", "erofs"})


def detect(device: str) -> str | None:
    """The filesystem on ``device`` by its magic number; ``None`` when none is known."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, _PROBE_BYTES, 0)
    finally:
        os.close(fd)
    for offset, magic, name in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None
