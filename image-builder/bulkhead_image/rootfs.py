"""A throwaway Debian root made by mmdebstrap: the quarry the guest's files are taken from.

It is cached per set of package versions (it takes tens of seconds to make and nothing
in it changes until Debian publishes new versions), and only the newest one is kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

SUITE = "bookworm"
# One root serves every image variant (see variants.py): crun is only taken by "bench".
INCLUDE = (
    "python3-minimal",
    "libpython3.11-stdlib",
    "busybox-static",
    "python3-seccomp",
    "crun",
)

# Every package whose files end up in the initramfs. Their candidate versions are part of the
# cache key, and the build fails if a selected file belongs to a package not listed here (so
# the key cannot silently miss an input).
SOURCE_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "busybox-static",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libstdc++6",
    "libgcc-s1",
    "libuuid1",
    "liblzma5",
    "libbz2-1.0",
    "libssl3",
    "libsqlite3-0",
    "python3-seccomp",  # libseccomp's bindings, for linux.seccomp (libseccomp linked in)
)

# Documentation and translations are never selected; not unpacking them saves time and disk.
_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
_MARKER = ".bulkhead-complete"


def ensure(work: Path, expected: dict[str, str], progress: Callable[[str], None]) -> Path:
    """A root made with mmdebstrap when apt's candidates were ``expected`` (reused if so)."""
    name = "rootfs-" + hashlib.sha256(f"{SUITE} {INCLUDE}".encode()).hexdigest()[:16]
    dest = work / name
    stamp = json.dumps(expected, sort_keys=True)
    try:
        if (dest / _MARKER).read_text() == stamp:
            return dest
    except FileNotFoundError:
        pass
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("rootfs-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = work / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"mmdebstrap {SUITE} ({', '.join(INCLUDE)})")
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        "--include=" + ",".join(INCLUDE),
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in _EXCLUDES),
        SUITE,
        str(tmp),
    ]
    log = work / "mmdebstrap.log"
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"mmdebstrap failed ({proc.returncode}):\n" + "\n".join(tail))
    (tmp / _MARKER).write_text(stamp)
    tmp.rename(dest)
    return dest
