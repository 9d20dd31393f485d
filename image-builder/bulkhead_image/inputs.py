"""Everything an image is made from, and the hash that names it in the cache.

The hash must be cheap (a cached build returns in well under a second), so it is taken over
versions and file contents, never over downloads: Debian versions come from apt's candidate
versions (memoised against apt's state, see debian.resolve_cached).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bump to force new images when the meaning of the inputs changes without them changing.
SCHEMA = 1

BUILDER_DIR = Path(__file__).resolve().parent
REPO_ROOT = BUILDER_DIR.parents[1]
# Our packages in the guest: (folder in the repo, package name).
GUEST_PACKAGES = (
    ("init", "bulkhead_init"),
    ("agent", "bulkhead_agent"),
    ("protocol", "bulkhead_proto"),
)


@dataclass(frozen=True)
class Inputs:
    kernel_package: str
    kernel_version: str
    debian_packages: dict[str, str]  # candidate versions of the packages files come from
    requirements_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # repo-relative path -> sha256
    modules: tuple[str, ...] = ()
    cmdline: str = ""
    schema: int = SCHEMA
    variant: str = "default"  # see variants.py

    def digest(self) -> str:
        fields = asdict(self)
        if fields["variant"] == "default":
            # The default image is keyed as before variants existed: adding one changes nothing.
            del fields["variant"]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def package_sources(repo_root: Path = REPO_ROOT) -> list[Path]:
    """The .py files of our guest packages: exactly what the image ships of them."""
    out: list[Path] = []
    for folder, package in GUEST_PACKAGES:
        root = repo_root / folder / package
        if not root.is_dir():
            raise FileNotFoundError(f"guest package {package} not found at {root}")
        out += [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(out)


def builder_sources(builder_dir: Path = BUILDER_DIR) -> list[Path]:
    files = [p for p in builder_dir.rglob("*") if p.suffix in (".py", ".txt")]
    return sorted(p for p in files if "__pycache__" not in p.parts)


def hash_files(paths: list[Path], root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(paths)
    }
