"""Byte-compiling the guest's Python with the guest's own interpreter, reproducibly.

The stage holds Debian's python3.11 with its libraries, so it is its own chroot: the bytecode
comes from exactly the compiler that will run it (host 3.11.7 and guest 3.11.2 share the
magic number, but the compiler may differ between patch releases).

Reproducibility: ``UNCHECKED_HASH`` pycs embed no mtime, ``PYTHONHASHSEED=0`` fixes the
iteration order of frozenset constants, and files are compiled in sorted order in one
process so marshal's reference flags come out the same.

Third-party and standard-library sources are dropped after compiling, leaving "sourceless"
``x.pyc`` beside where ``x.py`` was (the only place the import system looks for them).
Our own packages keep their sources (readable tracebacks) with ``__pycache__`` pycs.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

_SCRIPT = r"""
import importlib.util, py_compile, sys
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
n = 0
for line in open(sys.argv[1], encoding="utf-8"):
    src, how = line.rstrip("\n").split("\t")
    cfile = src + "c" if how == "sourceless" else importlib.util.cache_from_source(src)
    py_compile.compile(src, cfile=cfile, dfile=src, doraise=True, invalidation_mode=mode)
    n += 1
print(n, "%d.%d.%d" % sys.version_info[:3])
"""

_WORKDIR = "/.bulkhead-compile"


class CompileError(RuntimeError):
    pass


def _chroot(root: Path, argv: list[str], env: dict[str, str] | None = None) -> str:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    proc = subprocess.run(
        [chroot, str(root), *argv],
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise CompileError(f"{' '.join(argv[:3])} in the guest tree failed:\n{proc.stderr}")
    return proc.stdout


def compile_tree(root: Path, sources: Iterable[str], keep_source: Iterable[str]) -> str:
    """Compile ``sources`` (guest paths of .py files) in the stage rooted at ``root``.

    Files under a prefix in ``keep_source`` keep their .py; all others lose it.
    Returns the guest's Python version ("3.11.2").
    """
    keep = tuple(p.rstrip("/") + "/" for p in keep_source)
    ordered = sorted(set(sources))
    lines = [f"{s}\t{'cached' if s.startswith(keep) else 'sourceless'}\n" for s in ordered]
    work = root / _WORKDIR.lstrip("/")
    work.mkdir()
    try:
        (work / "list").write_text("".join(lines))
        (work / "compile.py").write_text(_SCRIPT)
        # -B: importing py_compile itself must not leave __pycache__ behind in the stage.
        out = _chroot(
            root,
            ["/usr/bin/python3", "-B", "-S", f"{_WORKDIR}/compile.py", f"{_WORKDIR}/list"],
            env={"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        for f in sorted(work.iterdir()):
            f.unlink()
        work.rmdir()
    count, version = out.split()
    if int(count) != len(ordered):
        raise CompileError(f"compiled {count} files, expected {len(ordered)}")
    for s in ordered:
        if not s.startswith(keep):
            (root / s.lstrip("/")).unlink()
    return version


def smoke_test(root: Path, path: str, imports: Iterable[str]) -> None:
    """Import ``imports`` with the guest's Python in the finished tree (no VM needed)."""
    code = (
        f"import sys; sys.path.insert(0, {path!r}); import importlib\n"
        f"for m in {sorted(imports)!r}: importlib.import_module(m)\n"
    )
    _chroot(root, ["/usr/bin/python3", "-I", "-S", "-B", "-c", code])
