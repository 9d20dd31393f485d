"""The image manifest (keys fixed by docs/internals.md, "Image cache")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

# Console on the first serial port; quiet because every console byte is slow under emulation;
# panic=-1 reboots at once on a panic, and with QEMU's -no-reboot that ends the VM instead of
# hanging it. reboot=t (triple fault) is the quickest way out of an emulated machine.
DEFAULT_CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"


def make(
    *,
    kernel_release: str,
    kernel_package: str,
    kernel_package_version: str,
    python_version: str,
    packages: Mapping[str, str],
    debian_packages: Mapping[str, str],
    modules: Sequence[str],
    cmdline: str,
    input_hash: str,
    compression: str,
    variant: str = "default",
) -> dict:
    """The manifest without ``artifacts`` (as it is copied into the guest)."""
    out = {
        "kernel_release": kernel_release,
        "kernel_package": kernel_package,
        "kernel_package_version": kernel_package_version,
        "python_version": python_version,
        "packages": dict(sorted(packages.items())),
        "debian_packages": dict(sorted(debian_packages.items())),
        "modules": list(modules),
        "cmdline": cmdline,
        "compression": compression,
        "input_hash": input_hash,
    }
    if variant != "default":  # the default's manifest keeps the keys docs/internals.md lists
        out["variant"] = variant
    return out


def artifact(path: Path) -> dict:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": path.stat().st_size}


def with_artifacts(base: dict, files: Mapping[str, Path]) -> dict:
    """The host-side manifest: ``base`` plus artifact digests and the initramfs size."""
    out = dict(base)
    out["artifacts"] = {name: artifact(p) for name, p in sorted(files.items())}
    if "initramfs.img" in out["artifacts"]:
        out["initramfs_size"] = out["artifacts"]["initramfs.img"]["size"]
    return out


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"
