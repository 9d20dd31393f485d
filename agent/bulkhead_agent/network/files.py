"""The sandbox's ``resolv.conf``, ``hosts`` and ``hostname``, and their binds into containers.

The files live beside the agent's run directory (``/run/bulkhead-network/``, on the guest's
tmpfs; a scratch directory in native tests, never the host's ``/etc``; not inside the run
directory, whose contents no container may see) and every container
that shares the sandbox's network namespace gets them bound read-only at ``/etc/resolv.conf``
and ``/etc/hosts`` (and ``/etc/hostname`` when it also shares the sandbox's UTS namespace),
as docker does, unless its spec mounts something there itself.

A bind mount pins the inode, so the files are rewritten in place, never replaced by a rename:
running containers see every update. (A reader racing a rewrite can see it half-done, as with
docker; the files are tiny and rewritten only when the host changes the network.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Any, NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .spec import NameResolutionSpec

RESOLV_CONF, HOSTS, HOSTNAME = "resolv.conf", "hosts", "hostname"
# Inside a container: where each file is bound.
DESTINATIONS = {RESOLV_CONF: "/etc/resolv.conf", HOSTS: "/etc/hosts", HOSTNAME: "/etc/hostname"}
BIND_OPTIONS = ["bind", "ro", "nosuid", "nodev", "noexec"]
HEADER = "# Written by the bulkhead agent from the host's network spec.\n"
LOCALHOST = ("127.0.0.1\tlocalhost\n", "::1\tlocalhost ip6-localhost ip6-loopback\n")
OWN_NAME_ADDRESS = "127.0.1.1"  # Debian's convention for a host name without an address


# Imported when the agent starts (the binds are set up then): nothing heavier than this.
class Files(NamedTuple):
    resolv_conf: str
    hosts: str
    hostname: str


def render(spec: NameResolutionSpec, hostname: str) -> Files:
    """The three files for ``spec``; ``hostname`` is the one the sandbox will have."""
    resolv = [HEADER]
    resolv += [f"nameserver {address}\n" for address in spec.nameservers]
    if spec.search:
        resolv.append(f"search {' '.join(spec.search)}\n")
    if spec.options:
        resolv.append(f"options {' '.join(spec.options)}\n")
    hosts = [HEADER, *LOCALHOST]
    named = {"localhost"}
    for entry in spec.hosts:
        hosts.append(f"{entry.address}\t{' '.join(entry.names)}\n")
        named.update(entry.names)
    if hostname and hostname not in named:
        hosts.append(f"{OWN_NAME_ADDRESS}\t{hostname}\n")
    return Files("".join(resolv), "".join(hosts), f"{hostname}\n" if hostname else "")


def default_files(hostname: str) -> Files:
    hosts = "".join((HEADER, *LOCALHOST, f"{OWN_NAME_ADDRESS}\t{hostname}\n"))
    return Files(HEADER, hosts, f"{hostname}\n")


class NameFiles:
    """The files in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def prepare(self) -> None:
        """Create the directory and, where missing, files with the defaults (localhost only)."""
        # Searchable by all: a user-namespaced container's root must reach the files to bind.
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        defaults = default_files(os.uname().nodename)
        for name, text in self._by_name(defaults).items():
            if not os.path.exists(self.path(name)):
                _write_in_place(self.path(name), text)

    def read(self) -> Files:
        texts = {}
        for name in (RESOLV_CONF, HOSTS, HOSTNAME):
            try:
                with open(self.path(name)) as f:
                    texts[name] = f.read()
            except FileNotFoundError:
                texts[name] = ""
        return Files(texts[RESOLV_CONF], texts[HOSTS], texts[HOSTNAME])

    def write(self, files: Files) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        for name, text in self._by_name(files).items():
            _write_in_place(self.path(name), text)

    def binds(self) -> tuple[tuple[str, str], ...]:
        """``(source, destination in the container)`` for each file."""
        return tuple((self.path(name), dest) for name, dest in DESTINATIONS.items())

    @staticmethod
    def _by_name(files: Files) -> dict[str, str]:
        return {RESOLV_CONF: files.resolv_conf, HOSTS: files.hosts, HOSTNAME: files.hostname}


def _write_in_place(path: str, text: str) -> None:
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def current_hostname() -> str:
    return os.uname().nodename


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def add_container_binds(
    value: dict[str, Any], binds: Iterable[tuple[str, str]], lower: str
) -> list[str]:
    """Add the sandbox files' binds to an OCI spec (a parsed, valid one); the destinations added.

    Only for a container in the sandbox's network namespace (no ``network`` entry): one with
    a network of its own has nothing to do with the sandbox's name servers. ``/etc/hostname``
    only for one that also shares the sandbox's UTS namespace (its hostname). A destination
    the spec mounts itself is left to it. With a read-only root (``lower`` used as it is) or a
    user namespace, only files that exist in ``lower`` already are bound over: no mount point
    can be made there.
    """
    linux = value.get("linux") or {}
    types = {n.get("type") for n in linux.get("namespaces") or () if isinstance(n, dict)}
    if "network" in types:
        return []
    mounts = value.setdefault("mounts", [])
    taken = {os.path.normpath(str(m.get("destination", ""))) for m in mounts}
    # Where the mount point cannot be made: a read-only root, or a user namespace whose root
    # may not write to the image's /etc (owned by an unmapped id).
    fixed = bool((value.get("root") or {}).get("readonly")) or "user" in types
    added = []
    for source, destination in binds:
        if destination == DESTINATIONS[HOSTNAME] and "uts" in types:
            continue
        if destination in taken or not os.path.isfile(source):
            continue
        if fixed and not _exists_in_root(lower, destination):
            continue
        mounts.append(
            {
                "destination": destination,
                "type": "bind",
                "source": source,
                "options": list(BIND_OPTIONS),
            }
        )
        added.append(destination)
    return added


def _exists_in_root(root: str, path: str) -> bool:
    from ..oci.paths import resolve_in_root

    return os.path.isfile(resolve_in_root(root, path))
