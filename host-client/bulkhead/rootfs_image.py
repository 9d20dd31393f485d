"""``bulkhead image rootfs``: container root filesystem images (ext4 or erofs) for disks.

Sources: a directory; an OCI image layout (``DIR`` or ``DIR:TAG``, as ``umoci`` or
``skopeo copy ... oci:DIR:TAG`` write it); a docker-archive tarball (``docker save``); or a
Debian suite through ``mmdebstrap``. Images are built without loop-mounting anything:
``mkfs.ext4 -d`` and ``mkfs.erofs`` read the tree directly.

Layers are applied in order into a scratch directory, with the OCI whiteout rules: a
``.wh.NAME`` entry deletes NAME from the layers below, ``.wh..wh..opq`` empties its
directory of what the layers below put there. Each layer is extracted by a child process
chrooted into the scratch directory, so that no entry (an absolute symlink such as ``lib ->
/usr/lib`` followed by ``lib/x.so``, a ``../`` name, a hard link out) can write anywhere but
inside. Ownership, modes (setuid included) and device nodes are kept, so this runs as root.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import BulkheadError

FORMATS = ("ext4", "erofs")
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MiB = 1024 * 1024


class RootfsImageError(BulkheadError):
    pass


@dataclass(frozen=True)
class RootfsImage:
    path: Path
    format: str
    size_bytes: int
    # The image's own config (OCI "config" object: Entrypoint, Cmd, Env, WorkingDir, User),
    # when it came from an image; {} otherwise.
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        """What the image runs by default: Entrypoint + Cmd."""
        return [*(self.config.get("Entrypoint") or []), *(self.config.get("Cmd") or [])]


# --- building the image from a tree --------------------------------------------------------------


def make_image(
    tree: Path, output: Path, fmt: str = "ext4", *, size: int | None = None, label: str = "rootfs"
) -> int:
    """Write ``tree`` as a filesystem image at ``output``; its size in bytes."""
    if fmt not in FORMATS:
        raise RootfsImageError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        if fmt == "erofs":
            # lz4hc: the guest kernel's erofs decompresses it; reading beats a bigger disk.
            _run(["mkfs.erofs", "--quiet", "-zlz4hc", str(tmp), str(tree)], "mkfs.erofs")
        else:
            _make_ext4(tree, tmp, size, label)
        tmp.rename(output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return output.stat().st_size


def _make_ext4(tree: Path, output: Path, size: int | None, label: str) -> None:
    used, inodes = _usage(tree)
    # Room for metadata and the journal, and some for the container's own writes when it is
    # mounted read-write; a given size is taken as it is.
    size = size or max(16 * MiB, int(used * 1.3) + 16 * MiB)
    size = (size + MiB - 1) // MiB * MiB
    for _attempt in range(3):
        with open(output, "wb") as f:
            f.truncate(size)
        cmd = [
            # 4 KiB blocks whatever the size: what DAX (a pmem disk) needs.
            "mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-N", str(inodes * 2 + 1024),
            "-E", "root_owner=0:0", "-d", str(tree), str(output),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if "No space left" not in proc.stderr and "Could not allocate" not in proc.stderr:
            raise RootfsImageError(f"mkfs.ext4 failed: {proc.stderr.strip()}")
        size *= 2  # the estimate was short (many small files): try bigger
    raise RootfsImageError(f"mkfs.ext4: {tree} does not fit in {size // MiB} MiB")


def _usage(tree: Path) -> tuple[int, int]:
    """(bytes rounded up to 4 KiB blocks, entries) of a tree, not following symlinks."""
    total, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            count += 1
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += (st.st_size + 4095) // 4096 * 4096
    return total, count


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        hint = {"mkfs.erofs": "erofs-utils", "mmdebstrap": "mmdebstrap"}.get(cmd[0], cmd[0])
        raise RootfsImageError(f"{cmd[0]} is not installed (apt-get install {hint})") from None
    if proc.returncode != 0:
        raise RootfsImageError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")


# --- unpacking layers ----------------------------------------------------------------------------


def _opener(path: Path, media_type: str = "") -> Callable[[], IO[bytes]]:
    """A function opening the layer's uncompressed tar stream (gzip, zstd or plain)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b" or media_type.endswith("gzip"):
        return lambda: gzip.open(path, "rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd" or media_type.endswith("zstd"):

        def unzstd() -> IO[bytes]:
            proc = subprocess.Popen(["zstd", "-dcq", str(path)], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            return proc.stdout

        return unzstd
    return lambda: open(path, "rb")


def _safe_name(name: str) -> str | None:
    """A member name as a path relative to the root; None for one that would climb out."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def apply_layer(dest: Path, open_layer: Callable[[], IO[bytes]]) -> None:
    """Apply one layer (a tar stream) on ``dest``: whiteouts first, then the entries."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: chrooted, extracts, reports on the pipe
        code = 0
        try:
            os.close(read)
            first, second = open_layer(), open_layer()  # before the chroot: host paths
            os.chroot(dest)
            os.chdir("/")
            _extract(first, second)
        except BaseException as exc:
            os.write(write, f"{type(exc).__name__}: {exc}".encode()[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RootfsImageError(f"applying a layer failed: {message or 'the extractor died'}")


def _extract(first: IO[bytes], second: IO[bytes]) -> None:
    """In the chroot: delete what the layer's whiteouts name, then extract the rest.

    Plain tar streams only ("r|"): sniffing for compression would import modules, and the
    chroot has no Python library to import them from.
    """
    with tarfile.open(fileobj=first, mode="r|") as tar:
        for member in tar:
            name = _safe_name(member.name)
            if name is None:
                continue
            directory, _, base = name.rpartition("/")
            if base == OPAQUE:
                _empty("/" + directory)
            elif base.startswith(WHITEOUT):
                _remove("/" + "/".join(filter(None, [directory, base[len(WHITEOUT) :]])))
    with tarfile.open(fileobj=second, mode="r|") as tar:
        for member in tar:
            name = _safe_name(member.name)
            if not name or name.rpartition("/")[2].startswith(WHITEOUT):
                continue
            if member.islnk():
                target = _safe_name(member.linkname)
                if target is None:
                    continue
                member.linkname = target
            member.name = name
            parent = os.path.dirname("/" + name)
            if parent != "/":
                # Through symlinks, as the container will see it (dangling ones included).
                os.makedirs(os.path.realpath(parent), exist_ok=True)
            existing = "/" + name
            # A layer replaces what is there, except a directory by a directory (merged).
            if os.path.lexists(existing) and not (member.isdir() and os.path.isdir(existing)):
                _remove(existing)
            tar.extract(member, "/", numeric_owner=True, filter="fully_trusted")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _empty(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory or "/"):
            _remove(os.path.join(directory or "/", entry))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RootfsImageError(f"{path}: {exc}") from None


def oci_layers(layout: Path, tag: str | None) -> tuple[list[tuple[Path, str]], dict[str, Any]]:
    """The layer blobs (path, media type), bottom first, and the image config of ``tag`` in
    an OCI image layout (the only image when ``tag`` is None)."""
    index = _read_json(layout / "index.json")
    manifests = index.get("manifests", [])
    if tag is not None:
        manifests = [
            m
            for m in manifests
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
        ]
    if len(manifests) != 1:
        names = [
            m.get("annotations", {}).get("org.opencontainers.image.ref.name", "?")
            for m in index.get("manifests", [])
        ]
        raise RootfsImageError(
            f"{layout}: {'no image tagged ' + repr(tag) if tag else 'more than one image'}; "
            f"tags: {', '.join(names) or 'none'} (give DIR:TAG)"
        )

    def blob(descriptor: dict[str, Any]) -> Path:
        algorithm, _, digest = descriptor["digest"].partition(":")
        return layout / "blobs" / algorithm / digest

    manifest = _read_json(blob(manifests[0]))
    if "manifests" in manifest:  # an index of platforms: take linux/amd64
        chosen = [
            m
            for m in manifest["manifests"]
            if m.get("platform", {}).get("architecture") in ("amd64", None)
        ]
        if not chosen:
            raise RootfsImageError(f"{layout}: no linux/amd64 image in the index")
        manifest = _read_json(blob(chosen[0]))
    config = _read_json(blob(manifest["config"])).get("config") or {}
    layers = [(blob(layer), layer.get("mediaType", "")) for layer in manifest.get("layers", [])]
    return layers, config


@contextlib.contextmanager
def docker_archive_layers(
    archive: Path,
) -> Iterator[tuple[list[tuple[Path, str]], dict[str, Any]]]:
    """Layers and config of the (first) image in a ``docker save`` tarball, unpacked to a
    temporary directory for as long as the context lasts."""
    with tempfile.TemporaryDirectory(prefix="bulkhead-archive-") as tmp:
        root = Path(tmp)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        manifest = _read_json(root / "manifest.json")
        if not manifest:
            raise RootfsImageError(f"{archive}: manifest.json lists no image")
        image = manifest[0]
        config = _read_json(root / image["Config"]).get("config") or {}
        yield [(root / layer, "") for layer in image["Layers"]], config


def unpack_layers(layers: list[tuple[Path, str]], dest: Path) -> None:
    dest.mkdir(mode=0o755, exist_ok=True)
    for path, media_type in layers:
        if not path.is_file():
            raise RootfsImageError(f"layer blob {path} is missing")
        apply_layer(dest, _opener(path, media_type))


def debootstrap(suite: str, dest: Path, include: list[str]) -> None:
    cmd = ["mmdebstrap", "--variant=minbase", "--quiet"]
    if include:
        cmd.append("--include=" + ",".join(include))
    _run([*cmd, suite, str(dest)], "mmdebstrap")


# --- the whole job -------------------------------------------------------------------------------


def build(
    output: str | os.PathLike[str],
    *,
    from_dir: str | os.PathLike[str] | None = None,
    from_oci: str | None = None,
    from_docker_archive: str | os.PathLike[str] | None = None,
    debian_suite: str | None = None,
    include: list[str] | None = None,
    fmt: str = "ext4",
    size: int | None = None,
) -> RootfsImage:
    """Make a root filesystem image from exactly one source (see the module text)."""
    sources = [s for s in (from_dir, from_oci, from_docker_archive, debian_suite) if s]
    if len(sources) != 1:
        raise RootfsImageError(
            "give exactly one source: a directory, an OCI layout, a docker archive or a suite"
        )
    if fmt not in FORMATS:
        raise RootfsImageError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    output = Path(output)
    if from_dir:
        tree = Path(from_dir)
        if not tree.is_dir():
            raise RootfsImageError(f"{tree}: not a directory")
        return RootfsImage(output, fmt, make_image(tree, output, fmt, size=size))
    if os.geteuid() != 0:
        raise RootfsImageError("unpacking image layers keeps their owners: run as root")
    with tempfile.TemporaryDirectory(prefix="bulkhead-rootfs-", dir=output.parent) as tmp:
        tree = Path(tmp) / "rootfs"
        config: dict[str, Any] = {}
        if from_oci:
            layout, tag = _split_layout(from_oci)
            layers, config = oci_layers(layout, tag)
            unpack_layers(layers, tree)
        elif from_docker_archive:
            with docker_archive_layers(Path(from_docker_archive)) as (layers, config):
                unpack_layers(layers, tree)
        else:
            assert debian_suite is not None
            debootstrap(debian_suite, tree, include or [])
        return RootfsImage(output, fmt, make_image(tree, output, fmt, size=size), config)


def _split_layout(text: str) -> tuple[Path, str | None]:
    """``DIR`` or ``DIR:TAG`` (a DIR with a colon in it needs the tag)."""
    if Path(text).is_dir():
        return Path(text), None
    layout, sep, tag = text.rpartition(":")
    if sep and Path(layout).is_dir():
        return Path(layout), tag
    raise RootfsImageError(f"{text}: no OCI image layout there (DIR or DIR:TAG)")
