"""Talking to the host's apt and dpkg: candidate versions, downloads, and who owns a file.

Nothing here installs anything on the host: packages are downloaded and unpacked into
the cache, and the guest's own package database is read from its root directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

# apt's state: when none of these change, neither do candidate versions.
_APT_STATE = (
    Path("/var/lib/apt/lists"),
    Path("/etc/apt/sources.list"),
    Path("/etc/apt/sources.list.d"),
    Path("/etc/apt/preferences"),
    Path("/etc/apt/preferences.d"),
    Path("/var/lib/dpkg/status"),
)


class DebianError(RuntimeError):
    pass


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DebianError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def parse_policy(text: str) -> dict[str, str | None]:
    """``apt-cache policy A B ...`` -> name -> candidate version (None when there is none)."""
    out: dict[str, str | None] = {}
    name = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            name = line[:-1]
            out[name] = None
        elif name and line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            out[name] = None if value == "(none)" else value
    return out


def parse_depends(text: str) -> list[str]:
    """``apt-cache depends P`` -> the names of P's direct Depends."""
    names = []
    for line in text.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if m and not m.group(1).startswith("<"):
            names.append(m.group(1))
    return names


def candidate_versions(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    found = parse_policy(_run(["apt-cache", "policy", *names]))
    missing = [n for n in names if not found.get(n)]
    if missing:
        raise DebianError(
            f"no installable candidate for {', '.join(missing)} (run 'apt-get update'?)"
        )
    return {n: found[n] for n in names}  # type: ignore[misc]


def depends(name: str) -> list[str]:
    return parse_depends(_run(["apt-cache", "depends", name]))


def apt_state_digest() -> str:
    """A digest of apt's lists and configuration (names, sizes, mtimes), cheap to compute."""
    h = hashlib.sha256()
    for root in _APT_STATE:
        paths = sorted(root.iterdir()) if root.is_dir() else [root]
        for p in paths:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_cached(
    meta_package: str, names: Sequence[str], memo: Path
) -> tuple[str, dict[str, str]]:
    """(concrete package behind ``meta_package``, candidate versions of it and of ``names``).

    Asking apt costs over a second per call here (it keeps no binary cache), so the answer is
    memoised against apt's state and reused until the lists or configuration change.
    """
    state = apt_state_digest() + "\0" + meta_package + "\0" + "\0".join(names)
    try:
        saved = json.loads(memo.read_text())
        if saved.get("state") == state:
            return saved["package"], saved["versions"]
    except (OSError, ValueError, KeyError):
        pass
    deps = [d for d in depends(meta_package) if d.startswith("linux-image-")]
    if not deps:
        raise DebianError(f"{meta_package} depends on no linux-image-* package")
    package = deps[0]
    versions = candidate_versions([package, *names])
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps({"state": state, "package": package, "versions": versions}))
    tmp.replace(memo)
    return package, versions


def download(name: str, version: str, dest: Path) -> Path:
    """The .deb of ``name`` at ``version`` in ``dest`` (downloaded by apt if not there yet)."""
    dest.mkdir(parents=True, exist_ok=True)
    # apt escapes the epoch colon in file names.
    pattern = f"{name}_{version.replace(':', '%3a')}_*.deb"
    found = sorted(dest.glob(pattern))
    if not found:
        _run(["apt-get", "download", "-q", f"{name}={version}"], cwd=dest)
        found = sorted(dest.glob(pattern))
        if not found:
            raise DebianError(f"apt-get download {name}={version} left no {pattern} in {dest}")
    return found[0]


def unpack(deb: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


def installed_versions(root: Path) -> dict[str, str]:
    """Package -> version installed in the guest root (read from its dpkg database)."""
    out = _run(
        [
            "dpkg-query",
            f"--admindir={root / 'var/lib/dpkg'}",
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\n",
        ]
    )
    versions = {}
    for line in out.splitlines():
        status, name, version = line.split("\t")
        if status.startswith("ii"):
            versions[name] = version
    return versions


def file_owners(root: Path) -> dict[str, str]:
    """Absolute guest path -> owning package, from the guest's ``/var/lib/dpkg/info/*.list``."""
    owners: dict[str, str] = {}
    for lst in sorted((root / "var/lib/dpkg/info").glob("*.list")):
        package = lst.name[: -len(".list")].split(":", 1)[0]
        for line in lst.read_text().splitlines():
            owners.setdefault(usr_merged(line), package)
    return owners


def usr_merged(path: str) -> str:
    """Where a path really lives on a merged-/usr system (bookworm packages still list /lib)."""
    for top in ("/bin/", "/sbin/", "/lib/", "/lib64/"):
        if path.startswith(top):
            return "/usr" + path
    return path
