"""Debian's Python 3.11 for the guest: the interpreter and a trimmed standard library.

Trimming is a deny list (what is known to be unused), not an allow list: the agent may
import any ordinary stdlib module lazily, and a missing one would only show up at run time.
Each build checks the result by importing what the guest uses (see pycompile.smoke_test).
"""

from __future__ import annotations

import os
from pathlib import Path

from .stage import Stage

VERSION = "3.11"
PYTHON = f"/usr/bin/python{VERSION}"
STDLIB = f"/usr/lib/python{VERSION}"

# Whole packages the guest never imports (tests, GUI, docs, packaging tools, databases).
_DROP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "venv",
        "curses",
        "dbm",
        "xmlrpc",
        # not wsgiref: prometheus_client's package imports it (metrics, on the first scrape)
        "__phello__",
        "site-packages",
        "dist-packages",
        "__pycache__",  # Debian's, compiled at install time: we compile our own
    }
)

_DROP_FILES = frozenset(
    {
        "EXTERNALLY-MANAGED",
        "LICENSE.txt",
        "__hello__.py",
        "antigravity.py",
        "this.py",
        "turtle.py",
        "pydoc.py",
        "doctest.py",
        "tabnanny.py",
        "_pydecimal.py",  # pure-Python fallback; the C _decimal is kept
        "smtpd.py",
        # mail and news protocols, audio/image sniffing, Windows/macOS/AIX helpers
        "mailbox.py",
        "mailcap.py",
        "imaplib.py",
        "nntplib.py",
        "poplib.py",
        "smtplib.py",
        "ftplib.py",
        "telnetlib.py",
        "cgi.py",
        "cgitb.py",
        "xdrlib.py",
        "sndhdr.py",
        "imghdr.py",
        "aifc.py",
        "sunau.py",
        "wave.py",
        "chunk.py",
        "uu.py",
        "webbrowser.py",
        "zipapp.py",
        "_osx_support.py",
        "_aix_support.py",
        "_distutils_system_mod.py",
        "nturl2path.py",
        "sitecustomize.py",  # Debian's points into /etc; -S never imports it anyway
    }
)

# Extension modules by name (before the first "."): test helpers, terminals, audio, databases.
# _ssl (and with it 5.4 MB of libssl/libcrypto) has to stay although the agent speaks no TLS:
# pyroute2 0.9.7 imports ssl when the package is imported (netlink/rtnl/probe_msg.py), and
# sqlite3 too (ndb/schema.py), so both stay.
_DROP_EXTENSIONS = frozenset(
    {
        "_ctypes_test",
        "_testbuffer",
        "_testcapi",
        "_testclinic",
        "_testimportmultiple",
        "_testinternalcapi",
        "_testmultiphase",
        "_xxsubinterpreters",
        "_xxtestfuzz",
        "xxlimited",
        "xxlimited_35",
        "audioop",
        "ossaudiodev",
        "nis",
        "readline",
        "_curses",
        "_curses_panel",
        "_dbm",
        "_gdbm",
        "_crypt",
        "_tkinter",
        # East Asian multibyte codecs (with their encodings/ wrappers below)
        "_multibytecodec",
        "_codecs_cn",
        "_codecs_hk",
        "_codecs_iso2022",
        "_codecs_jp",
        "_codecs_kr",
        "_codecs_tw",
    }
)

_CJK_ENCODINGS = frozenset(
    {
        "big5",
        "big5hkscs",
        "cp932",
        "cp949",
        "cp950",
        "euc_jis_2004",
        "euc_jisx0213",
        "euc_jp",
        "euc_kr",
        "gb18030",
        "gb2312",
        "gbk",
        "hz",
        "iso2022_jp",
        "iso2022_jp_1",
        "iso2022_jp_2",
        "iso2022_jp_2004",
        "iso2022_jp_3",
        "iso2022_jp_ext",
        "iso2022_kr",
        "johab",
        "shift_jis",
        "shift_jis_2004",
        "shift_jisx0213",
    }
)


def keep_stdlib(relpath: str) -> bool:
    """Whether a file of the standard library (path relative to it) goes into the guest."""
    parts = relpath.split("/")
    if any(p in _DROP_DIRS for p in parts[:-1]) or parts[0].startswith("config-"):
        return False
    name = parts[-1]
    if len(parts) == 1 and name in _DROP_FILES:
        return False
    if parts[0] == "lib-dynload":
        return name.split(".", 1)[0] not in _DROP_EXTENSIONS
    if parts[0] == "encodings" and name.endswith(".py"):
        return name[:-3] not in _CJK_ENCODINGS
    return name.endswith(".py")


def add(stage: Stage) -> list[str]:
    """Put the interpreter and the trimmed stdlib into the stage; returns the ELF files added."""
    stage.take(PYTHON)
    stage.symlink("/usr/bin/python3", f"python{VERSION}")
    elves = [PYTHON]
    base = stage.quarry / STDLIB.lstrip("/")
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _DROP_DIRS)
        for fname in sorted(filenames):
            src = Path(dirpath) / fname
            rel = src.relative_to(base).as_posix()
            if not keep_stdlib(rel):
                continue
            if src.is_symlink():
                target = os.readlink(src)
                if target.startswith("/"):
                    continue
                src = src.resolve()  # a relative alias (sysconfigdata): keep a real copy
            guest = f"{STDLIB}/{rel}"
            stage.copy_file(src, guest)
            stage.origins[guest] = stage.canonical(f"{STDLIB}/{rel}")
            if rel.endswith(".so"):
                elves.append(guest)
    return elves
