"""Which kernel modules go into the guest, and in what order init loads them.

The wanted list is the one place to change; everything else (dependencies, order, the
guest's ``modules.dep``) is derived from the kernel package itself.
"""

from __future__ import annotations

import lzma
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import elf

# Load order matters beyond symbol dependencies: a virtio device driver (console, blk, net, ...)
# only binds once its transport is registered, and no driver *uses a symbol* of virtio_pci, so
# modules.dep cannot tell. Transports therefore come first, and the list order is kept.
WANTED_MODULES: tuple[str, ...] = (
    # transports
    "virtio_pci",
    "virtio_mmio",
    # console and entropy first: the agent channel and early randomness
    "virtio_console",
    "virtio_rng",
    # vsock: the production agent transport; loopback lets containers reach guest services
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "vsock_loopback",
    # checksums that ext4, libcrc32c (erofs) and t10-pi (sd) ask the crypto API for by name
    # at run time: no symbol dependency, so modules.dep cannot tell; built in on the cloud
    # flavour, modules on the generic one, and without them ext4 mounts fail with ENOENT
    "crc32c_generic",
    "crct10dif_generic",
    "crc64_rocksoft_generic",
    # storage: hot-plugged disks (blk, scsi + sd), pmem/DAX images, loop-mounted images
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nd_pmem",
    "virtio_pmem",
    "loop",
    # file systems: disks, container rootfs layers and shared directories
    "ext4",
    "overlay",
    "erofs",
    "squashfs",
    "fuse",
    "virtiofs",
    "9pnet",
    "9pnet_virtio",
    "9p",
    # network
    "virtio_net",
    "veth",
    "bridge",
    # memory
    "virtio_balloon",
)

# Wanted but allowed to be absent (a kernel that lacks them still boots; what needs them says
# so). None now: the generic flavour has all of the above.
OPTIONAL_MODULES: frozenset[str] = frozenset()

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class ModuleError(RuntimeError):
    pass


def module_name(path: str) -> str:
    """``kernel/net/vmw_vsock/vsock.ko.xz`` -> ``vsock``; '-' and '_' are the same to the kernel."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def plain_ko(path: str) -> str:
    """The path a module has in the guest: always decompressed, ending in ``.ko``."""
    for suffix in _SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".ko"
    raise ModuleError(f"not a kernel module path: {path}")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse depmod's ``modules.dep``: ``path: dep-path dep-path ...`` per line.

    Returns module path -> dependency paths, in the order given.
    """
    deps: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep or not path.strip():
            raise ModuleError(f"modules.dep line {lineno}: expected 'path: deps', got {line!r}")
        deps[path.strip()] = rest.split()
    return deps


@dataclass(frozen=True)
class Selection:
    load_order: list[str]  # module paths, dependencies first, each once
    builtin: list[str]  # wanted names that the kernel has built in
    missing: list[str]  # wanted optional names the kernel lacks


def resolve(
    wanted: Sequence[str],
    deps: Mapping[str, Sequence[str]],
    builtin: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> Selection:
    """Order ``wanted`` (module names) and their dependencies for loading.

    Each module comes after everything it depends on and appears once; otherwise the order of
    ``wanted`` is kept. Built-in modules need no loading. A wanted module that exists nowhere is
    an error unless it is optional.
    """
    by_name = {module_name(p): p for p in deps}
    builtin_names = {module_name(p) for p in builtin}
    optional_names = {n.replace("-", "_") for n in optional}
    order: list[str] = []
    done: set[str] = set()
    active: list[str] = []
    found_builtin: list[str] = []
    missing: list[str] = []

    def visit(path: str) -> None:
        if path in done:
            return
        if path in active:
            cycle = " -> ".join([*active[active.index(path) :], path])
            raise ModuleError(f"dependency cycle in modules.dep: {cycle}")
        if path not in deps:
            raise ModuleError(f"{active[-1]} depends on {path}, which modules.dep does not list")
        active.append(path)
        for dep in deps[path]:
            visit(dep)
        active.pop()
        done.add(path)
        order.append(path)

    for raw in wanted:
        name = raw.replace("-", "_")
        if name in by_name:
            visit(by_name[name])
        elif name in builtin_names:
            found_builtin.append(name)
        elif name in optional_names:
            missing.append(name)
        else:
            raise ModuleError(f"wanted kernel module {name!r} is neither a module nor built in")
    return Selection(order, found_builtin, missing)


def format_modules_dep(load_order: Sequence[str], deps: Mapping[str, Sequence[str]]) -> str:
    """A ``modules.dep`` for just the selected modules (``.ko`` paths, all dependencies listed)."""
    lines = []
    for path in load_order:
        closure: list[str] = []

        def walk(p: str, closure: list[str] = closure) -> None:
            for d in deps[p]:
                if d not in closure:
                    closure.append(d)
                    walk(d)

        walk(path)
        lines.append(f"{plain_ko(path)}: {' '.join(plain_ko(d) for d in closure)}".rstrip())
    return "".join(line + "\n" for line in lines)


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressing ``.ko.xz``/``.ko.zst``/``.ko.gz``."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        # No zstd in the 3.11 standard library; the CLI is a build dependency anyway.
        return subprocess.run(
            ["zstd", "-dcq", str(path)], check=True, stdout=subprocess.PIPE
        ).stdout
    raise ModuleError(f"not a kernel module: {path}")


def modules_dep_from_tree(moddir: Path) -> str:
    """``modules.dep`` text for an unpacked kernel module tree.

    Debian's kernel package ships no ``modules.dep`` (depmod writes it when the package is
    installed, which we never do), so it is derived from each module's ``.modinfo`` "depends"
    field, which modpost computed from symbol use at kernel build time.
    """
    shipped = moddir / "modules.dep"
    if shipped.exists():
        return shipped.read_text()
    paths = sorted(
        p.relative_to(moddir).as_posix()
        for p in (moddir / "kernel").rglob("*.ko*")
        if p.name.endswith(_SUFFIXES)
    )
    by_name = {module_name(p): p for p in paths}
    lines = []
    for rel in paths:
        info = elf.modinfo(read_module(moddir / rel))
        names = [n for v in info.get("depends", []) for n in v.split(",") if n]
        try:
            dep_paths = [by_name[n.replace("-", "_")] for n in names]
        except KeyError as e:
            raise ModuleError(f"{rel} depends on unknown module {e.args[0]}") from None
        lines.append(f"{rel}: {' '.join(dep_paths)}".rstrip())
    return "".join(line + "\n" for line in lines)


def builtin_list(moddir: Path) -> list[str]:
    path = moddir / "modules.builtin"
    return path.read_text().split() if path.exists() else []
