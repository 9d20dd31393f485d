"""Just enough ELF reading for the builder: named sections and DT_NEEDED.

Reading the files ourselves (instead of running ``ldd``/``modinfo``) means the builder
needs no host tools for this and never executes guest binaries on the host.
Only 64-bit little-endian ELF is handled: the guest is x86-64.
"""

from __future__ import annotations

import struct

_DT_NEEDED = 1
_PT_INTERP = 3


class ElfError(ValueError):
    pass


def _check(data: bytes) -> None:
    if data[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("only 64-bit little-endian ELF is supported")


def _sections(data: bytes) -> list[tuple[str, int, int, int, int]]:
    """(name, type, offset, size, link) for every section."""
    _check(data)
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0:
        return []
    raw = []
    for i in range(shnum):
        base = shoff + i * shentsize
        name, typ, _flags, _addr, off, size, link = struct.unpack_from("<IIQQQQI", data, base)
        raw.append((name, typ, off, size, link))
    _n, _t, stroff, strsize, _l = raw[shstrndx]
    strtab = data[stroff : stroff + strsize]
    out = []
    for name, typ, off, size, link in raw:
        end = strtab.find(b"\0", name)
        out.append((strtab[name:end].decode(), typ, off, size, link))
    return out


def section(data: bytes, name: str) -> bytes | None:
    """The contents of the section called ``name``, or None."""
    for sname, _typ, off, size, _link in _sections(data):
        if sname == name:
            return data[off : off + size]
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """A kernel module's ``.modinfo`` strings as key -> values (keys may repeat)."""
    raw = section(data, ".modinfo")
    if raw is None:
        raise ElfError("no .modinfo section: not a kernel module")
    info: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode("utf-8", "replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


def needed(data: bytes) -> list[str]:
    """The DT_NEEDED sonames of a dynamically linked ELF, in file order."""
    sections = _sections(data)
    for sname, _typ, off, size, link in sections:
        if sname != ".dynamic":
            continue
        _n, _t, stroff, strsize, _l = sections[link]
        strtab = data[stroff : stroff + strsize]
        names = []
        for pos in range(off, off + size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                names.append(strtab[val : strtab.find(b"\0", val)].decode())
        return names
    return []  # statically linked


def interpreter(data: bytes) -> str | None:
    """The PT_INTERP path (the dynamic loader), or None for static files."""
    _check(data)
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        typ, _flags, off, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, base)
        if typ == _PT_INTERP:
            return data[off : off + filesz].rstrip(b"\0").decode()
    return None
