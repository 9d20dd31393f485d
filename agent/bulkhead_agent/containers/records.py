"""What the agent knows about each container, on disk, for the agent that comes after it.

A restarted agent adopts the spawner and its processes (see ``spawner.client``); what those
processes are to the host (the container's spec, root, cgroup, its exec ids) only the agent
knew. So the manager writes each container's record to ``<run dir>/records/<id>/container.json``
(a tmpfs in the guest) whenever that changes: created, started, exec'd, paused, resumed; and
removes the directory with the container. Exits are not written: the spawner keeps them
until the container is removed.

Each write goes to a temporary file that is renamed over the record, so an agent killed
half-way leaves the old record or the new one, never a mix. The directory also holds each
process's stdio offsets (``containers.offsets``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

VERSION = 1
RECORD = "container.json"


class RecordStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory  # <run dir>/records, 0700

    def prepare(self) -> None:
        os.makedirs(self.directory, 0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def container_dir(self, container_id: str) -> str:
        return os.path.join(self.directory, container_id)

    def offsets_path(self, container_id: str, exec_id: str) -> str:
        """Where a process's stdio offsets live."""
        name = f"exec.{exec_id}.offsets" if exec_id else "init.offsets"
        return os.path.join(self.container_dir(container_id), name)

    def create_dir(self, container_id: str) -> None:
        path = self.container_dir(container_id)
        shutil.rmtree(path, ignore_errors=True)  # a previous container of that id
        os.mkdir(path, 0o700)

    def save(self, container_id: str, record: dict[str, Any]) -> None:
        """Write ``record`` atomically (the container's directory must exist)."""
        path = os.path.join(self.container_dir(container_id), RECORD)
        temporary = path + ".new"
        data = json.dumps({"version": VERSION, **record}, separators=(",", ":")).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(temporary, path)

    def delete(self, container_id: str) -> None:
        shutil.rmtree(self.container_dir(container_id), ignore_errors=True)

    def load_all(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every readable record by container id, and why the others could not be read
        (a create that never finished has a directory and no record yet)."""
        records: dict[str, dict[str, Any]] = {}
        broken: dict[str, str] = {}
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return records, broken
        for name in names:
            try:
                with open(os.path.join(self.directory, name, RECORD), "rb") as f:
                    record = json.loads(f.read())
                if not isinstance(record, dict) or record.get("version") != VERSION:
                    raise ValueError(f"unknown record version in {record!r:.80}")
            except (OSError, ValueError) as exc:
                broken[name] = str(exc)
                continue
            records[name] = record
        return records, broken
