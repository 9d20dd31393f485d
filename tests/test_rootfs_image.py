"""``bulkhead image rootfs`` natively: layers applied with whiteouts (from an OCI layout made
by umoci, and a docker archive made here), entries that try to escape kept inside, and real
ext4 / erofs images read back with e2fsprogs and erofs-utils (no mounts)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bulkhead import rootfs_image
from bulkhead.cli import main as cli_main
from bulkhead.rootfs_image import RootfsImageError

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/bootstrap.sh installs it)")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("unpacking layers with their owners needs root")


def tar_layer(entries: list[tuple[str, str, object]]) -> bytes:
    """A layer tarball: (name, kind, value) with kind file (bytes), dir, symlink, hardlink."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            info.uid, info.gid = 1000, 1000
            if kind == "file":
                data = value if isinstance(value, bytes) else str(value).encode()
                info.size, info.mode = len(data), 0o4755 if name.endswith("suid") else 0o644
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(value)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(value)
            tar.addfile(info)
    return buffer.getvalue()


def docker_archive(path: Path, layers: list[bytes], config: dict) -> Path:
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        names = []
        for index, layer in enumerate(layers):
            names.append(f"layer{index}/layer.tar")
            add(names[-1], layer)
        add("config.json", json.dumps({"config": config}).encode())
        add("manifest.json", json.dumps([{"Config": "config.json", "Layers": names}]).encode())
    return path


def test_docker_archive_whiteouts_and_escapes(tmp_path: Path) -> None:
    need_root()
    outside = tmp_path / "outside"
    outside.mkdir()
    lower = tar_layer(
        [
            ("etc/", "dir", None),
            ("etc/keep", "file", "keep"),
            ("etc/gone", "file", "gone"),
            ("var/cache/", "dir", None),
            ("var/cache/old", "file", "old"),
            ("bin/suid", "file", "x"),
            ("lib", "symlink", str(outside)),  # absolute: means the image's own /tmp/...
        ]
    )
    upper = tar_layer(
        [
            ("etc/.wh.gone", "file", ""),
            ("var/cache/.wh..wh..opq", "file", ""),
            ("var/cache/new", "file", "new"),
            ("lib/through-the-link", "file", "inside"),
            ("../../escape", "file", "evil"),
            ("etc/hard", "hardlink", "etc/keep"),
            ("etc/keep-again", "hardlink", "../../outside/x"),
        ]
    )
    archive = docker_archive(tmp_path / "image.tar", [lower, upper], {"Cmd": ["sh"]})
    tree = tmp_path / "tree"
    with rootfs_image.docker_archive_layers(archive) as (layers, config):
        rootfs_image.unpack_layers(layers, tree)
    assert config == {"Cmd": ["sh"]}
    assert (tree / "etc" / "keep").read_text() == "keep"
    assert not (tree / "etc" / "gone").exists()
    assert sorted(os.listdir(tree / "var" / "cache")) == ["new"]
    assert (tree / "etc" / "hard").stat().st_ino == (tree / "etc" / "keep").stat().st_ino
    st = (tree / "bin" / "suid").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o4755, 1000, 1000)
    # Nothing reached the host: the absolute symlink was followed inside the tree.
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape").exists() and not Path("/escape").exists()
    assert (tree / outside.relative_to("/") / "through-the-link").read_text() == "inside"
    assert not list(tree.rglob(".wh.*"))


def test_oci_layout_made_by_umoci(tmp_path: Path) -> None:
    need_root()
    need("umoci")
    layout, bundle = tmp_path / "oci", tmp_path / "bundle"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:v1")
    umoci("unpack", "--image", f"{layout}:v1", str(bundle))
    root = bundle / "rootfs"
    (root / "data" / "old").mkdir(parents=True)
    (root / "data" / "old" / "file").write_text("old")
    (root / "data" / "remove-me").write_text("x")
    umoci("repack", "--image", f"{layout}:v1", str(bundle))
    shutil.rmtree(bundle)
    umoci("unpack", "--image", f"{layout}:v1", str(bundle))
    (root / "data" / "remove-me").unlink()
    (root / "data" / "added").write_text("added")
    umoci("repack", "--image", f"{layout}:v1", str(bundle))
    umoci("config", "--image", f"{layout}:v1", "--config.cmd", "cat", "--config.cmd", "/data/added")

    layers, config = rootfs_image.oci_layers(layout, "v1")
    assert len(layers) == 2 and config["Cmd"] == ["cat", "/data/added"]
    tree = tmp_path / "tree"
    rootfs_image.unpack_layers(layers, tree)
    assert sorted(os.listdir(tree / "data")) == ["added", "old"]
    with pytest.raises(RootfsImageError, match=r"no image tagged 'v2'.*tags: v1"):
        rootfs_image.oci_layers(layout, "v2")

    image = rootfs_image.build(tmp_path / "root.erofs", from_oci=f"{layout}:v1", fmt="erofs")
    assert image.command == ["cat", "/data/added"]
    assert read_erofs(image.path, tmp_path / "x", "data/added")[0] == b"added"


def read_erofs(image: Path, scratch: Path, path: str) -> tuple[bytes, str]:
    """(content, "mode uid gid") of ``path`` in an erofs image, read through the kernel's erofs
    in a private mount namespace (nothing stays mounted)."""
    need("unshare")
    scratch.mkdir()
    script = 'mount -o loop,ro "$1" "$2" && stat -c "%a %u %g" "$2/$3" && cat "$2/$3"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(image), str(scratch), path],
        capture_output=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot loop-mount erofs here: {proc.stderr.decode().strip()}")
    mode, _, content = proc.stdout.partition(b"\n")
    return content, mode.decode()


def test_ext4_and_erofs_from_a_directory_keep_owners_and_modes(tmp_path: Path) -> None:
    need("mkfs.ext4")
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    if os.geteuid() == 0:
        os.chown(tree / "bin" / "tool", 1234, 5678)
    os.chmod(tree / "bin" / "tool", 0o4711)  # after chown, which clears setuid
    (tree / "big").write_bytes(os.urandom(3 * 1024 * 1024))

    ext4 = rootfs_image.build(tmp_path / "root.ext4", from_dir=tree)
    assert ext4.size_bytes >= 16 * 1024 * 1024
    stat = subprocess.run(
        ["debugfs", "-R", "stat /bin/tool", str(ext4.path)], capture_output=True, text=True
    ).stdout
    assert "Mode:  04711" in stat
    if os.geteuid() == 0:
        assert "User:  1234" in stat and "Group:  5678" in stat
    dumped = subprocess.run(
        ["debugfs", "-R", "cat /big", str(ext4.path)], capture_output=True, check=True
    ).stdout
    assert dumped == (tree / "big").read_bytes()

    need("mkfs.erofs")
    erofs = rootfs_image.build(tmp_path / "root.erofs", from_dir=tree, fmt="erofs")
    assert erofs.size_bytes < ext4.size_bytes
    content, mode = read_erofs(erofs.path, tmp_path / "x", "bin/tool")
    assert content == b"#!/bin/sh\necho tool\n"
    assert mode == ("4711 1234 5678" if os.geteuid() == 0 else f"4711 {os.getuid()} {os.getgid()}")


def test_cli_image_rootfs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need("mkfs.ext4")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("hi\n")
    code = cli_main(["image", "rootfs", str(tmp_path / "r.img"), "--from-dir", str(tree), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["format"] == "ext4" and report["size_bytes"] == (tmp_path / "r.img").stat().st_size
    )
    code = cli_main(
        ["image", "rootfs", str(tmp_path / "r2.img"), "--from-dir", str(tmp_path / "no")]
    )
    assert code == 1
    assert "not a directory" in capsys.readouterr().err


def test_one_source_exactly(tmp_path: Path) -> None:
    with pytest.raises(RootfsImageError, match="exactly one source"):
        rootfs_image.build(tmp_path / "x", from_dir=tmp_path, debian_suite="bookworm")
    with pytest.raises(RootfsImageError, match="format"):
        rootfs_image.build(tmp_path / "x", from_dir=tmp_path, fmt="ntfs")
