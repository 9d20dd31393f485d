"""Packing the stage into the initramfs: a cpio archive plus the nodes PID 1 needs at once.

The image is two compressed archives back to back (see split): to look inside, decompress and
extract twice, e.g. ``zstd -dc initramfs.img | (cpio -idm; cpio -idm)``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from . import compress, cpio

# Python's startup needs random bytes (hash randomisation) and /dev/null before init can
# mount devtmpfs, and the kernel opens /dev/console for PID 1's stdio: ship them as nodes.
DEVICES: tuple[tuple[str, int, int, int], ...] = (
    ("dev/console", 5, 1, 0o600),
    ("dev/null", 1, 3, 0o666),
    ("dev/zero", 1, 5, 0o666),
    ("dev/random", 1, 8, 0o666),
    ("dev/urandom", 1, 9, 0o666),
    ("dev/tty", 5, 0, 0o666),
)

# Directory modes that are not the default 0755.
_DIR_MODES = {"tmp": 0o1777, "root": 0o700}


def entries(stage_root: Path) -> list[cpio.Entry]:
    """Archive entries for everything in the stage (modes normalised) plus the device nodes."""
    out: list[cpio.Entry] = []
    for dirpath, dirnames, filenames in os.walk(stage_root):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*dirnames, *sorted(filenames)]:
            path = base / name
            rel = path.relative_to(stage_root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out.append(cpio.symlink(rel, os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(cpio.directory(rel, _DIR_MODES.get(rel, 0o755)))
            elif stat.S_ISREG(st.st_mode):
                perm = 0o755 if st.st_mode & 0o111 else 0o644
                out.append(cpio.file(rel, path, perm))
            else:
                raise ValueError(f"unexpected file type in the stage: {rel}")
    out += [cpio.char_device(p, major, minor, perm) for p, major, minor, perm in DEVICES]
    return out


def split(entries: list[cpio.Entry], app_paths: tuple[str, ...]) -> list[list[cpio.Entry]]:
    """[base, app]: entries at or under ``app_paths``, with the directories above them, go last.

    The kernel unpacks concatenated compressed archives one after the other into the same
    root (re-creating a directory that exists is harmless), so the part that changes with every
    code edit is compressed separately and the big, slow-to-compress base is reused as is.
    """

    def in_app(path: str) -> bool:
        return any(path == a or path.startswith(a + "/") for a in app_paths)

    base = [e for e in entries if not in_app(e.path)]
    app = [e for e in entries if in_app(e.path)]
    dirs = {e.path: e for e in base if e.is_dir}
    parents = {p for e in app for p in _ancestors(e.path) if not in_app(p)}
    return [base, [dirs[p] for p in sorted(parents)] + app]


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def pack(
    stage_root: Path,
    dest: Path,
    method: str = compress.DEFAULT,
    app_paths: tuple[str, ...] = (),
    zcache: Path | None = None,
) -> tuple[int, int]:
    """Write the compressed initramfs; returns (entries, uncompressed bytes).

    With ``zcache``, compressed parts are kept there by the digest of their uncompressed
    bytes (same bytes in, same bytes out), so an unchanged base is never compressed twice.
    """
    parts = split(entries(stage_root), app_paths) if app_paths else [entries(stage_root)]
    count = raw_total = 0
    with dest.open("wb") as out:
        for i, part in enumerate(parts):
            raw = dest.with_name(f"{dest.name}.part{i}.cpio")
            try:
                with raw.open("wb") as f:
                    count += cpio.write(part, f)
                raw_total += raw.stat().st_size
                out.write(_compressed(raw, method, zcache).read_bytes())
            finally:
                raw.unlink(missing_ok=True)
                raw.with_suffix(".z").unlink(missing_ok=True)
    return count, raw_total


_ZCACHE_KEEP = 4  # compressed parts kept: a few bases (and apps) of recent builds


def _compressed(raw: Path, method: str, zcache: Path | None) -> Path:
    if zcache is None:
        out = raw.with_suffix(".z")
        compress.compress(raw, out, method)
        return out
    h = hashlib.sha256()
    with raw.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    hit = zcache / f"{h.hexdigest()}.{method}"
    if hit.exists():
        os.utime(hit)  # most recently used
        return hit
    zcache.mkdir(parents=True, exist_ok=True)
    tmp = hit.with_suffix(".tmp")
    compress.compress(raw, tmp, method)
    tmp.replace(hit)
    old = sorted(zcache.glob(f"*.{method}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in old[_ZCACHE_KEEP:]:
        stale.unlink(missing_ok=True)
    return hit
