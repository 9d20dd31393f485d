"""The guest kernel: Debian's generic flavour, downloaded and unpacked, never installed.

Generic rather than cloud: the 6.1 cloud flavour is built without 9p (CONFIG_NET_9P unset),
and the generic one has everything else we use too. Its vmlinuz is smaller (8 MB against
14 MB: less built in), at the price of ext4 and its helpers as modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import debian

# The metapackage tracks the current ABI; the concrete linux-image-<abi>-amd64 package
# behind it is resolved with apt each time inputs are computed.
KERNEL_META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    release: str  # `uname -r`, e.g. 6.1.0-57-amd64
    vmlinuz: Path
    moddir: Path  # lib/modules/<release> of the unpacked package
    config: Path


def fetch(package: str, version: str, downloads: Path, dest: Path) -> Kernel:
    """Download (once, into ``downloads``) and unpack the kernel package into ``dest``."""
    deb = debian.download(package, version, downloads)
    debian.unpack(deb, dest)
    releases = sorted(p.name for p in (dest / "lib/modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise debian.DebianError(f"{deb.name}: expected one lib/modules/<release>, got {releases}")
    release = releases[0]
    vmlinuz = dest / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise debian.DebianError(f"{deb.name}: no boot/vmlinuz-{release}")
    return Kernel(
        package=package,
        version=version,
        release=release,
        vmlinuz=vmlinuz,
        moddir=dest / "lib/modules" / release,
        config=dest / "boot" / f"config-{release}",
    )
