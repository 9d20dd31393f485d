"""Kernel module selection: modules.dep parsing, dependency order, modinfo reading."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from bulkhead_image import elf, modules
from bulkhead_image.modules import ModuleError, parse_modules_dep, resolve

V = "kernel/drivers/virtio"
S = "kernel/net/vmw_vsock"
DEP = "".join(
    line + "\n"
    for line in (
        f"{V}/virtio_ring.ko:",
        f"{V}/virtio.ko: {V}/virtio_ring.ko",
        f"{V}/virtio_pci.ko: {V}/virtio.ko {V}/virtio_ring.ko",
        f"kernel/drivers/char/virtio_console.ko: {V}/virtio.ko {V}/virtio_ring.ko",
        f"{S}/vsock.ko:",
        f"{S}/vmw_vsock_virtio_transport_common.ko: {S}/vsock.ko",
        f"{S}/vmw_vsock_virtio_transport.ko: {S}/vmw_vsock_virtio_transport_common.ko"
        f" {V}/virtio.ko",
        f"kernel/drivers/char/hw_random/virtio-rng.ko.xz: {V}/virtio.ko",
    )
)


def test_parse_modules_dep() -> None:
    deps = parse_modules_dep(DEP + "\n# comment\n")
    assert deps["kernel/drivers/virtio/virtio_ring.ko"] == []
    assert deps["kernel/drivers/virtio/virtio_pci.ko"] == [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    ]
    assert len(deps) == 8


def test_parse_modules_dep_rejects_garbage() -> None:
    with pytest.raises(ModuleError, match="line 2"):
        parse_modules_dep("a.ko:\nnot a dependency line\n")


def test_dependencies_first_each_once_wanted_order_kept() -> None:
    deps = parse_modules_dep(DEP)
    sel = resolve(["virtio_pci", "virtio_console", "vmw_vsock_virtio_transport"], deps)
    names = [modules.module_name(p) for p in sel.load_order]
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_pci",  # the transport before the drivers, as listed
        "virtio_console",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
    ]
    assert len(set(sel.load_order)) == len(sel.load_order)


def test_dash_and_underscore_are_the_same_module() -> None:
    deps = parse_modules_dep(DEP)
    sel = resolve(["virtio_rng"], deps)
    assert sel.load_order[-1] == "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
    assert modules.plain_ko(sel.load_order[-1]) == "kernel/drivers/char/hw_random/virtio-rng.ko"


def test_missing_module_is_a_clear_error() -> None:
    with pytest.raises(ModuleError, match="'no_such_mod'"):
        resolve(["virtio_pci", "no_such_mod"], parse_modules_dep(DEP))


def test_builtin_and_optional_modules() -> None:
    sel = resolve(
        ["virtio_pci", "ext4", "9p"],
        parse_modules_dep(DEP),
        builtin=["kernel/fs/ext4/ext4.ko"],
        optional=["9p"],
    )
    assert sel.builtin == ["ext4"]
    assert sel.missing == ["9p"]
    assert sel.load_order[-1] == "kernel/drivers/virtio/virtio_pci.ko"


def test_dependency_not_listed_or_cyclic() -> None:
    with pytest.raises(ModuleError, match="does not list"):
        resolve(["a"], {"a.ko": ["b.ko"]})
    with pytest.raises(ModuleError, match="cycle"):
        resolve(["a"], {"a.ko": ["b.ko"], "b.ko": ["a.ko"]})


def test_guest_modules_dep_lists_the_closure() -> None:
    deps = parse_modules_dep(DEP)
    sel = resolve(["vmw_vsock_virtio_transport", "virtio_rng"], deps)
    text = modules.format_modules_dep(sel.load_order, deps)
    lines = dict(line.split(":", 1) for line in text.splitlines())
    got = lines["kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"].split()
    assert set(got) == {
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
        "kernel/net/vmw_vsock/vsock.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    }
    assert "kernel/drivers/char/hw_random/virtio-rng.ko" in lines  # .xz dropped
    assert parse_modules_dep(text)  # round-trips through the parser


def test_wanted_list_puts_transports_first() -> None:
    assert modules.WANTED_MODULES[:2] == ("virtio_pci", "virtio_mmio")
    assert len(set(modules.WANTED_MODULES)) == len(modules.WANTED_MODULES)
    assert set(modules.WANTED_MODULES) >= modules.OPTIONAL_MODULES


# ---- modinfo from ELF, and modules.dep from a module tree ----------------------------------


def fake_module(name: str, depends: str) -> bytes:
    """A minimal ELF64 with a .modinfo section, as modpost leaves in every .ko."""
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    modinfo_off = body_off
    shstr_off = modinfo_off + len(modinfo)
    shoff = (shstr_off + len(shstrtab) + 7) & ~7
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    data = bytearray(header)
    data += modinfo + shstrtab
    data += b"\0" * (shoff - len(data))

    def sh(name_off: int, typ: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, typ, 0, 0, off, size, 0, 0, 1, 0)

    data += sh(0, 0, 0, 0)
    data += sh(1, 1, modinfo_off, len(modinfo))
    data += sh(10, 3, shstr_off, len(shstrtab))
    return bytes(data)


def test_modinfo_reads_depends() -> None:
    info = elf.modinfo(fake_module("virtio_net", "virtio,net_failover"))
    assert info["depends"] == ["virtio,net_failover"]
    assert info["name"] == ["virtio_net"]
    with pytest.raises(elf.ElfError):
        elf.modinfo(b"not an elf at all")


def test_modules_dep_from_tree_handles_compressed_modules(tmp_path: Path) -> None:
    k = tmp_path / "kernel"
    (k / "virtio").mkdir(parents=True)
    (k / "net").mkdir()
    (k / "virtio/virtio.ko").write_bytes(fake_module("virtio", ""))
    (k / "net/failover.ko.xz").write_bytes(lzma.compress(fake_module("failover", "")))
    (k / "net/virtio_net.ko").write_bytes(fake_module("virtio_net", "virtio,failover"))
    deps = parse_modules_dep(modules.modules_dep_from_tree(tmp_path))
    assert deps["kernel/net/virtio_net.ko"] == [
        "kernel/virtio/virtio.ko",
        "kernel/net/failover.ko.xz",
    ]
    sel = resolve(["virtio_net"], deps)
    assert [modules.module_name(p) for p in sel.load_order] == [
        "virtio",
        "failover",
        "virtio_net",
    ]
    # what the guest gets is plain ELF, whatever the package compressed
    assert modules.read_module(tmp_path / sel.load_order[1])[:4] == b"\x7fELF"


def test_shipped_modules_dep_wins(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("kernel/a.ko:\n")
    assert modules.modules_dep_from_tree(tmp_path) == "kernel/a.ko:\n"
