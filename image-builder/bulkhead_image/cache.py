"""The image cache: ``images/<input-hash>/{vmlinuz,initramfs.img,manifest.json}``.

The cache directory is ``$BULKHEAD_CACHE_DIR``, by default ``~/.cache/bulkhead``.

``images/latest`` is a text file naming the newest built hash of the default image, and
``images/latest-<variant>`` that of another variant (see ``variants``). Everything else under
the cache directory (``downloads/``, ``work/``) is the builder's and can be deleted at any time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

KERNEL_NAME = "vmlinuz"
INITRAMFS_NAME = "initramfs.img"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    kernel: Path
    initramfs: Path
    manifest: dict
    cached: bool


def default_cache_dir() -> Path:
    env = os.environ.get("BULKHEAD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bulkhead"


def images_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "images"


def load_image(path: Path, *, cached: bool = True) -> ImageInfo:
    """The image in directory ``path``; raises FileNotFoundError if it is incomplete."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    kernel, initramfs = path / KERNEL_NAME, path / INITRAMFS_NAME
    for f in (kernel, initramfs):
        if not f.is_file():
            raise FileNotFoundError(f"image {path} has no {f.name}")
    return ImageInfo(path, kernel, initramfs, manifest, cached)


def find_image(input_hash: str, cache_dir: Path | None = None) -> ImageInfo | None:
    try:
        return load_image(images_dir(cache_dir) / input_hash)
    except (FileNotFoundError, ValueError):
        return None


def latest_name(variant: str = "default") -> str:
    """The file under ``images/`` naming the newest build of ``variant``."""
    if not variant or "/" in variant or variant.startswith("."):
        raise ValueError(f"bad image variant name {variant!r}")
    return "latest" if variant == "default" else f"latest-{variant}"


def latest_image(cache_dir: Path | None = None, variant: str = "default") -> ImageInfo | None:
    """The newest built image (of ``variant``), or None if there is none (or it was removed)."""
    try:
        name = (images_dir(cache_dir) / latest_name(variant)).read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name:
        return None
    return find_image(name, cache_dir)


def set_latest(input_hash: str, cache_dir: Path | None = None, variant: str = "default") -> None:
    d = images_dir(cache_dir)
    name = latest_name(variant)
    tmp = d / f".{name}.{os.getpid()}"
    tmp.write_text(input_hash + "\n")
    tmp.replace(d / name)
