"""Containers on storages: the root filesystem from a storage, and OCI mounts whose source is
``storage:ID[/sub/path]`` (volumes).

:func:`bind_storages` rewrites a CreateContainer's spec before the container manager sees
it: ``root.path`` becomes the storage's directory, each ``storage:`` source the confined
absolute path it names (as a bind mount, read-only when the storage is), and returns every
storage id the container now uses. A malformed spec is left alone for the spec parser to
name what is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from ..containers.errors import Failure
from .manager import STORAGE_PREFIX, StorageManager


def bind_storages(
    storages: StorageManager, oci_spec: bytes, rootfs_storage: str
) -> tuple[bytes, set[str]]:
    """The spec with storage references resolved, and the ids of the storages it uses."""
    uses_mounts = STORAGE_PREFIX.encode() in oci_spec
    if not rootfs_storage and not uses_mounts:
        return oci_spec, set()
    try:
        value = json.loads(oci_spec)
    except ValueError:
        return oci_spec, set()  # the manager reports it
    if not isinstance(value, dict):
        return oci_spec, set()
    used: set[str] = set()
    if rootfs_storage:
        storage, path = storages.resolve(rootfs_storage, "rootfs_storage")
        root = value.get("root")
        if not isinstance(root, dict):
            root = value["root"] = {}
        root["path"] = path
        used.add(storage.id)
    mounts = value.get("mounts")
    if isinstance(mounts, list):
        for index, mount in enumerate(mounts):
            if isinstance(mount, dict):
                _bind_one(storages, mount, f"oci_spec: mounts[{index}].source", used)
    return json.dumps(value).encode(), used


def _bind_one(storages: StorageManager, mount: dict[str, Any], field: str, used: set[str]) -> None:
    source = mount.get("source")
    if not isinstance(source, str) or not source.startswith(STORAGE_PREFIX):
        return
    ref = source[len(STORAGE_PREFIX) :]
    if not ref:
        raise Failure("INVALID_ARGUMENT", f"{field}: {source!r} names no storage")
    storage, path = storages.resolve(ref, field, directory=False)
    mount["source"] = path
    options = mount.get("options")
    if not isinstance(options, list):
        options = []
    if not any(o in ("bind", "rbind") for o in options) and mount.get("type") != "bind":
        options = ["rbind", *options]
    if storage.read_only and "ro" not in options:
        # What the storage is, the container gets: never a writable view of a read-only disk.
        options = [o for o in options if o != "rw"] + ["ro"]
    mount["options"] = options
    mount.setdefault("type", "bind")
    used.add(storage.id)
