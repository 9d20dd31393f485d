"""The guest's third-party Python packages: pinned wheels installed for the guest's Python.

pip runs on the host but is told the guest's platform and version, so it never builds or
runs anything; ``--no-deps`` makes the pinned file the complete list.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("guest-requirements.txt")

# Only these kinds of files are needed at run time. Everything else in the wheels (dist-info,
# type stubs, Cython .pxd/.pxi, C headers and sources, console scripts) is dropped.
_KEEP_SUFFIXES = (".py", ".so")

# Parts that are dead weight in the guest (measured: grpc's roots.pem alone is 530 KB).
_DROP = (
    "bin",  # console scripts
    "grpc/_cython/_credentials",  # CA bundle for TLS; guest transports are vsock/serial only
    "google/protobuf/testdata",
    "google/protobuf/internal/testing_refleaks.py",
    "google/protobuf/internal/json_format_benchmark.py",
    "pyroute2/bsd",  # BSD-only backends
    "pyroute2/fixtures",  # pytest fixtures
    "pyroute2/config/test_platform.py",
)


def pins(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """name -> version for every ``name==version`` line (hash options ignored)."""
    out = {}
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line or line.startswith("-"):
            continue
        spec = line.split(";", 1)[0].split()[0]
        name, sep, version = spec.partition("==")
        if not sep:
            raise ValueError(f"{requirements.name}: {raw!r} is not pinned with ==")
        out[name.strip()] = version.strip()
    return out


def requirements_digest(requirements: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def ensure(work: Path, requirements: Path = REQUIREMENTS) -> Path:
    """A directory with the pinned wheels installed (``pip install --target``), cached by pins."""
    digest = requirements_digest(requirements)[:16]
    dest = work / f"wheels-{digest}"
    if dest.is_dir():
        return dest
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("wheels-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = work / f".wheels-{digest}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",  # we compile ourselves, with the guest's Python, reproducibly
        "--target",
        str(tmp),
        "--only-binary=:all:",
        "--platform",
        "manylinux2014_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--no-deps",
        "--require-hashes",
        "-r",
        str(requirements),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install of guest wheels failed:\n{proc.stderr.strip()}")
    tmp.rename(dest)
    return dest


def wanted(relpath: str) -> bool:
    """Whether a file of the pip target (path relative to it) belongs in the guest."""
    parts = relpath.split("/")
    if parts[0].endswith((".dist-info", ".data")) or "__pycache__" in parts:
        return False
    if any(relpath == d or relpath.startswith(d + "/") for d in _DROP):
        return False
    return relpath.endswith(_KEEP_SUFFIXES)
