"""The storage commands of the ``bulkhead`` CLI: ``image rootfs``, ``storage ls``,
``disk add`` / ``disk rm``, ``cp``, and what ``run --disk``, ``-v`` and ``--rootfs`` need.

``run`` options (parsed in ``cli_containers``) become a :class:`RunStorage`: disks to plug in
and shares to add before the container is created, the volumes and root that refer to them,
and the clean-up afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BulkheadError
from .sandbox import Sandbox
from .storage import volume

MiB = 1024 * 1024


def add_image_parsers(image: Any) -> None:
    """``image rootfs`` under the CLI's ``image`` subcommands."""
    p = image.add_parser(
        "rootfs",
        help="make a container root filesystem image (ext4 or erofs) for --disk / --rootfs",
        description=(
            "Make a root filesystem image from a directory, an OCI image layout (DIR or "
            "DIR:TAG), a docker-archive tarball, or a Debian suite (mmdebstrap). No loop "
            "mounts; unpacking image layers keeps owners and needs root."
        ),
    )
    p.add_argument("output", type=Path, metavar="IMAGE")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-dir", type=Path, metavar="DIR")
    source.add_argument("--from-oci", metavar="DIR[:TAG]")
    source.add_argument("--from-docker-archive", type=Path, metavar="TAR")
    source.add_argument("--debian", metavar="SUITE", help="e.g. bookworm, through mmdebstrap")
    p.add_argument("--include", action="append", default=[], metavar="PKG", help="with --debian")
    p.add_argument("--format", choices=("ext4", "erofs"), default="ext4", help="default: ext4")
    p.add_argument("--size", type=_size, metavar="SIZE", help="ext4 size (default: fitted)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_image_rootfs)


def add_parsers(groups: Any) -> None:
    p = groups.add_parser("storage", help="a sandbox's storages").add_subparsers(metavar="COMMAND")
    q = p.add_parser("ls", help="list the storages the agent has mounted")
    q.add_argument("sandbox")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_storage_ls)
    q = p.add_parser("add-9p", help="mount a 9p share given at boot (sandbox up --9p)")
    q.add_argument("sandbox")
    q.add_argument("tag")
    q.add_argument("--id", dest="storage_id", metavar="ID", help="storage id (default: the tag)")
    q.add_argument("--read-only", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_storage_add_9p)
    q = p.add_parser("rm", help="unmount a storage (disks: disk rm, which also unplugs)")
    q.add_argument("sandbox")
    q.add_argument("storage_id", metavar="ID")
    q.set_defaults(func=cmd_storage_rm)

    p = groups.add_parser("disk", help="hot-plug disks").add_subparsers(metavar="COMMAND")
    q = p.add_parser("add", help="hot-plug a disk image and mount it in the guest")
    q.add_argument("sandbox")
    q.add_argument("image", type=Path)
    q.add_argument("--id", dest="storage_id", metavar="ID", help="storage id (default: random)")
    q.add_argument("--read-only", action="store_true")
    q.add_argument("--fstype", default="", help="default: found from the superblock")
    q.add_argument("--timeout", type=float, default=10.0, metavar="S", help="default: 10")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_disk_add)
    q = p.add_parser("rm", help="unmount a disk and unplug it")
    q.add_argument("sandbox")
    q.add_argument("storage_id", metavar="ID")
    q.set_defaults(func=cmd_disk_rm)

    p = groups.add_parser("cp", help="copy a host file into a storage of a sandbox")
    p.add_argument("source", type=Path)
    p.add_argument("destination", metavar="SANDBOX:STORAGE/PATH")
    p.add_argument("--mode", type=lambda t: int(t, 8), metavar="OCTAL", help="default: the file's")
    p.add_argument("--owner", default="0:0", metavar="UID:GID", help="default: 0:0")
    p.add_argument("--parents", action="store_true", help="make missing directories")
    p.set_defaults(func=cmd_cp)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``run``'s storage options (``--rootfs`` is ``cli_containers``')."""
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="IMAGE:GUESTDIR[:ro]",
        help="hot-plug a disk image and mount it at GUESTDIR in the container",
    )
    p.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="HOSTDIR:GUESTDIR[:ro]",
        help="share a host directory (virtio-fs) at GUESTDIR in the container",
    )


def _size(text: str) -> int:
    from .spec import SpecError, parse_size

    try:
        return parse_size(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- run --------------------------------------------------------------------------------------


@dataclass
class HostMapping:
    host: Path
    guest: str
    readonly: bool


def parse_mapping(text: str, what: str) -> HostMapping:
    """``HOST:GUEST[:ro|rw]``."""
    parts = text.split(":")
    readonly = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        readonly = parts.pop() == "ro"
    if len(parts) != 2 or not parts[0] or not parts[1].startswith("/"):
        raise BulkheadError(f"{what} {text!r}: expected HOST:GUESTDIR[:ro] with GUESTDIR absolute")
    return HostMapping(Path(parts[0]), parts[1], readonly)


@dataclass
class RunStorage:
    """What ``run``'s ``--disk``, ``-v`` and host ``--rootfs`` ask of the sandbox."""

    disks: list[HostMapping] = field(default_factory=list)
    shares: list[HostMapping] = field(default_factory=list)
    rootfs_image: Path | None = None  # a host image file: the root comes from a disk
    rootfs_share: Path | None = None  # a host directory: the root comes from a share
    added: list[tuple[str, str]] = field(default_factory=list)  # (kind, storage id)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunStorage:
        found = cls(
            disks=[parse_mapping(t, "--disk") for t in args.disk],
            shares=[parse_mapping(t, "-v") for t in args.volume],
        )
        for m in found.disks:
            if not m.host.is_file():
                raise BulkheadError(f"--disk {m.host}: no such image file")
        for m in found.shares:
            if not m.host.is_dir():
                raise BulkheadError(f"-v {m.host}: no such directory")
        rootfs = getattr(args, "rootfs", None)
        if rootfs:
            path = Path(rootfs)
            # A host image or directory becomes a disk or share; anything else is a guest
            # directory, as before (prefix it with guest: to be explicit).
            if rootfs.startswith("guest:"):
                args.rootfs = rootfs.removeprefix("guest:")
            elif path.is_file():
                found.rootfs_image, args.rootfs = path, None
            elif path.is_dir():
                found.rootfs_share, args.rootfs = path, None
        return found

    @property
    def ports(self) -> int:
        return len(self.disks) + len(self.shares) + bool(self.rootfs_image or self.rootfs_share)

    @property
    def needs_shared_memory(self) -> bool:
        return bool(self.shares or self.rootfs_share)

    def setup(self, sandbox: Sandbox, readonly_root: bool) -> dict[str, Any]:
        """Plug in and mount everything; the ``run`` options that use it. If any of it fails,
        what was added is taken out again."""
        try:
            return self._setup(sandbox, readonly_root)
        except BaseException:
            self.teardown(sandbox)
            raise

    def _setup(self, sandbox: Sandbox, readonly_root: bool) -> dict[str, Any]:
        options: dict[str, Any] = {}
        volumes = []
        tag = secrets.token_hex(3)
        if self.rootfs_image is not None:
            info = sandbox.add_disk(self.rootfs_image, f"root-{tag}", readonly=readonly_root)
            self.added.append(("disk", info.storage_id))
            options["rootfs_storage"] = info.storage_id
        if self.rootfs_share is not None:
            info = sandbox.add_share(self.rootfs_share, f"root-{tag}", readonly=readonly_root)
            self.added.append(("share", info.storage_id))
            options["rootfs_storage"] = info.storage_id
        for index, m in enumerate(self.disks):
            info = sandbox.add_disk(m.host, f"disk{index}-{tag}", readonly=m.readonly)
            self.added.append(("disk", info.storage_id))
            volumes.append(volume(info.storage_id, m.guest, readonly=m.readonly))
        for index, m in enumerate(self.shares):
            info = sandbox.add_share(m.host, f"vol{index}-{tag}", readonly=m.readonly)
            self.added.append(("share", info.storage_id))
            volumes.append(volume(info.storage_id, m.guest, readonly=m.readonly))
        if volumes:
            options["volumes"] = volumes
        return options

    def teardown(self, sandbox: Sandbox) -> None:
        """Unmount and unplug what ``setup`` added (the container must be gone)."""
        for kind, storage_id in reversed(self.added):
            try:
                if kind == "disk":
                    sandbox.remove_disk(storage_id)
                else:
                    sandbox.remove_share(storage_id)
            except BulkheadError as exc:
                print(f"bulkhead: warning: removing {storage_id}: {exc}", file=sys.stderr)
        self.added.clear()


# --- commands ---------------------------------------------------------------------------------


def cmd_image_rootfs(args: argparse.Namespace) -> int:
    from . import rootfs_image

    image = rootfs_image.build(
        args.output,
        from_dir=args.from_dir,
        from_oci=args.from_oci,
        from_docker_archive=args.from_docker_archive,
        debian_suite=args.debian,
        include=args.include,
        fmt=args.format,
        size=args.size,
    )
    if args.json:
        from .cli import _print_json

        _print_json(
            {
                "path": str(image.path),
                "format": image.format,
                "size_bytes": image.size_bytes,
                "config": image.config,
            }
        )
        return 0
    print(f"{image.path}: {image.format}, {image.size_bytes / MiB:.1f} MiB")
    if image.command:
        print(f"image command: {' '.join(image.command)}")
    return 0


def cmd_storage_ls(args: argparse.Namespace) -> int:
    from .cli import _print_json, _table

    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    with contextlib.closing(sandbox):
        storages = sandbox.storage.list()
    if args.json:
        _print_json([s.to_dict() for s in storages])
        return 0
    if not storages:
        print("no storages")
        return 0
    rows = [("ID", "DRIVER", "SOURCE", "FSTYPE", "MODE", "MOUNT POINT", "USERS")]
    for s in storages:
        rows.append(
            (
                s.storage_id,
                s.driver,
                s.source or "-",
                s.fstype or "-",
                "ro" if s.read_only else "rw",
                s.mount_point,
                ",".join(s.users) or "-",
            )
        )
    _table(rows)
    return 0


def cmd_storage_add_9p(args: argparse.Namespace) -> int:
    from .cli import _print_json

    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    with contextlib.closing(sandbox):
        info = sandbox.add_9p(args.tag, args.storage_id, readonly=args.read_only)
    if args.json:
        _print_json(info.to_dict())
    else:
        print(f"{info.storage_id}: 9p share {args.tag!r} on {info.mount_point}")
    return 0


def cmd_storage_rm(args: argparse.Namespace) -> int:
    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    with contextlib.closing(sandbox):
        sandbox.storage.remove(args.storage_id)
    return 0


def cmd_disk_add(args: argparse.Namespace) -> int:
    from .cli import _print_json

    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    with contextlib.closing(sandbox):
        info = sandbox.add_disk(
            args.image,
            args.storage_id,
            readonly=args.read_only,
            fstype=args.fstype,
            timeout=args.timeout,
        )
    if args.json:
        _print_json(info.to_dict())
    else:
        print(
            f"{info.storage_id}: {info.source} ({info.fstype}) on {info.mount_point} "
            f"after {info.hotplug_seconds or 0:.2f} s"
        )
    return 0


def cmd_disk_rm(args: argparse.Namespace) -> int:
    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    with contextlib.closing(sandbox):
        sandbox.remove_disk(args.storage_id)
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    name, sep, rest = args.destination.partition(":")
    storage_id, _, path = rest.partition("/")
    if not sep or not path:
        raise BulkheadError(
            f"destination {args.destination!r}: expected SANDBOX:STORAGE/PATH "
            "(SANDBOX:/PATH for the agent's file area)"
        )
    uid, _, gid = args.owner.partition(":")
    if not (uid.isdigit() and (gid or uid).isdigit()):
        raise BulkheadError(f"--owner {args.owner!r}: expected UID:GID (numbers)")
    sandbox = Sandbox.get(name, state_dir=args.state_dir)
    with contextlib.closing(sandbox):
        where = sandbox.storage.copy_file(
            args.source,
            storage_id,
            path,
            mode=args.mode,
            uid=int(uid),
            gid=int(gid or uid),
            make_parents=args.parents,
        )
    print(where)
    return 0
