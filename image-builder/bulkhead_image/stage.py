"""The guest tree on disk, before packing: files selected from the quarry plus our own.

Paths are guest paths ("/usr/bin/python3.11"). Symlinks met on the way in the quarry (merged
/usr's /lib -> usr/lib, the loader's /lib64 link, library sonames) are recreated as they are,
and their targets resolved inside the quarry, never on the host: a copied absolute link
must not lead a write out of the stage.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from pathlib import Path

from . import elf

# Where the dynamic loader looks without an ld.so.cache (Debian's multiarch system paths).
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib", "/lib")


class StageError(RuntimeError):
    pass


class Stage:
    def __init__(self, root: Path, quarry: Path) -> None:
        self.root = root
        self.quarry = quarry
        self.origins: dict[str, str] = {}  # guest file -> canonical quarry path it came from
        root.mkdir(parents=True, exist_ok=True)

    def _host(self, guest: str) -> Path:
        return self.root / guest.lstrip("/")

    # ---- our own content -------------------------------------------------------------
    def mkdir(self, guest: str, perm: int = 0o755) -> None:
        path = self._host(guest)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(perm)

    def write(self, guest: str, data: bytes | str, perm: int = 0o644) -> None:
        path = self._host(guest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(perm)

    def copy_file(self, source: Path, guest: str, perm: int | None = None) -> None:
        path = self._host(guest)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        if perm is None:
            perm = 0o755 if os.stat(source).st_mode & 0o111 else 0o644
        path.chmod(perm)

    def symlink(self, guest: str, target: str) -> None:
        path = self._host(guest)
        if path.is_symlink():
            if os.readlink(path) == target:
                return
            raise StageError(f"{guest} already links to {os.readlink(path)}, not {target}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)

    # ---- from the quarry -----------------------------------------------------------------
    def canonical(self, guest: str) -> str:
        """``guest`` with every symlink resolved inside the quarry."""
        done = "/"
        todo = [p for p in guest.split("/") if p]
        hops = 0
        while todo:
            part = todo.pop(0)
            cur = posixpath.join(done, part)
            q = self.quarry / cur.lstrip("/")
            if q.is_symlink():
                hops += 1
                if hops > 40:
                    raise StageError(f"symlink loop resolving {guest}")
                target = os.readlink(q)
                base = "/" if target.startswith("/") else done
                resolved = posixpath.normpath(posixpath.join(base, target))
                todo = [p for p in resolved.split("/") if p] + todo
                done = "/"
            else:
                done = cur
        return done

    def take(self, guest: str) -> str:
        """Copy ``guest`` from the quarry, with the symlinks on its way; returns its real path."""
        done = "/"
        todo = [p for p in guest.split("/") if p]
        while todo:
            part = todo.pop(0)
            cur = posixpath.join(done, part)
            q = self.quarry / cur.lstrip("/")
            if q.is_symlink():
                target = os.readlink(q)
                self.symlink(cur, target)
                base = "/" if target.startswith("/") else done
                resolved = posixpath.normpath(posixpath.join(base, target))
                todo = [p for p in resolved.split("/") if p] + todo
                done = "/"
                continue
            if not q.exists():
                raise StageError(f"{guest}: {cur} is not in the Debian root")
            if todo:
                if not q.is_dir():
                    raise StageError(f"{guest}: {cur} is not a directory")
                self._host(cur).mkdir(exist_ok=True)
            elif q.is_dir():
                self._host(cur).mkdir(exist_ok=True)
            else:
                self.copy_file(q, cur)
                self.origins[cur] = cur
            done = cur
        return done

    def find_library(self, soname: str) -> str:
        for d in LIBRARY_DIRS:
            guest = f"{d}/{soname}"
            if os.path.lexists(self.quarry / guest.lstrip("/")):
                return guest
        raise StageError(f"shared library {soname} is not in the Debian root")

    def add_libraries(self, elf_files: list[str]) -> list[str]:
        """Copy every shared library (and the loader) that ``elf_files`` need, transitively.

        Returns the canonical guest paths of the libraries added.
        """
        queue = list(elf_files)
        seen_sonames: set[str] = set()
        added: list[str] = []
        while queue:
            guest = queue.pop(0)
            data = self._host(self.canonical_in_stage(guest)).read_bytes()
            interp = elf.interpreter(data)
            wants = []
            if interp and interp not in seen_sonames:
                seen_sonames.add(interp)
                wants.append(("path", interp))
            for soname in elf.needed(data):
                if soname not in seen_sonames:
                    seen_sonames.add(soname)
                    wants.append(("soname", soname))
            for kind, name in wants:
                path = name if kind == "path" else self.find_library(name)
                real = self.take(path)
                added.append(real)
                queue.append(real)
        return sorted(set(added))

    def canonical_in_stage(self, guest: str) -> str:
        # The stage mirrors the quarry's links, so the quarry resolves them.
        return self.canonical(guest)
