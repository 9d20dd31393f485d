"""The cpio "newc" writer, checked against GNU cpio (the kernel's format)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bulkhead_image import cpio, initramfs

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")


def sample(tmp_path: Path) -> list[cpio.Entry]:
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 41)  # not a multiple of 4: exercises padding
    return [
        cpio.file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.directory("usr"),
        cpio.directory("usr/bin"),
        cpio.directory("dev"),
        cpio.char_device("dev/null", 1, 3),
        cpio.char_device("dev/console", 5, 1, 0o600),
        cpio.symlink("bin", "usr/bin"),
        cpio.file("big.bin", src),
        cpio.file("empty", b""),
        cpio.directory("tmp", 0o1777),
    ]


def test_bytes_are_deterministic_and_order_independent(tmp_path: Path) -> None:
    entries = sample(tmp_path)
    a = cpio.pack(entries)
    b = cpio.pack(list(reversed(entries)))
    assert a == b
    assert a.startswith(b"070701")
    assert len(a) % 512 == 0
    assert b"TRAILER!!!\0" in a.rstrip(b"\0")[-16:] + b"\0"


def test_header_fields(tmp_path: Path) -> None:
    data = cpio.pack([cpio.directory("dev"), cpio.char_device("dev/null", 1, 3)], mtime=0)
    # second entry: dev/null
    second = data.index(b"070701", 6)
    fields = [int(data[second + 6 + 8 * i : second + 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _chk = fields
    assert ino == 2 and stat.S_ISCHR(mode) and (rmaj, rmin) == (1, 3)
    assert (uid, gid, mtime, size, nlink) == (0, 0, 0, 0, 1)
    assert namesize == len("dev/null") + 1


def test_rejects_bad_trees() -> None:
    with pytest.raises(ValueError, match="without its directory"):
        cpio.pack([cpio.file("usr/bin/x", b"")])
    with pytest.raises(ValueError, match="duplicate"):
        cpio.pack([cpio.file("x", b""), cpio.file("x", b"y")])
    with pytest.raises(ValueError, match="bad archive path"):
        cpio.pack([cpio.file("/abs", b"")])


@needs_cpio
def test_gnu_cpio_lists_and_extracts_it(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.pack(sample(tmp_path)))
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet", "-F", str(archive)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert names == [
        "big.bin",
        "bin",
        "dev",
        "dev/console",
        "dev/null",
        "empty",
        "tmp",
        "usr",
        "usr/bin",
        "usr/bin/tool",
    ]
    modes = {n: line.split()[0] for n, line in zip(names, listing, strict=True)}
    assert modes["dev/null"].startswith("crw-rw-rw-")
    assert modes["bin"].startswith("lrwxrwxrwx")
    assert modes["tmp"] == "drwxrwxrwt"

    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames", "-F", str(archive)],
        cwd=out,
        check=True,
    )
    assert (out / "big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert (out / "usr/bin/tool").read_text() == "#!/bin/sh\necho hi\n"
    assert os.stat(out / "usr/bin/tool").st_mode & 0o777 == 0o755
    assert os.readlink(out / "bin") == "usr/bin"
    assert (out / "empty").read_bytes() == b""
    if os.geteuid() == 0:  # mknod needs root
        st = os.lstat(out / "dev/null")
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)


def test_stage_entries_normalise_modes_and_add_devices(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    (root / "usr/bin").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "dev").mkdir()
    tool = root / "usr/bin/tool"
    tool.write_text("x")
    tool.chmod(0o700)
    data = root / "usr/data"
    data.write_text("y")
    data.chmod(0o600)
    (root / "bin").symlink_to("usr/bin")
    by_path = {e.path: e for e in initramfs.entries(root)}
    assert by_path["usr/bin/tool"].mode & 0o7777 == 0o755
    assert by_path["usr/data"].mode & 0o7777 == 0o644
    assert by_path["tmp"].mode & 0o7777 == 0o1777
    assert stat.S_ISLNK(by_path["bin"].mode) and by_path["bin"].data == b"usr/bin"
    for path, major, minor, _perm in initramfs.DEVICES:
        assert by_path[path].rdev == (major, minor)
    assert {"dev/console", "dev/null", "dev/urandom", "dev/random", "dev/zero", "dev/tty"} <= set(
        by_path
    )


def test_split_puts_app_last_with_its_directories() -> None:
    entries = [
        cpio.directory("usr"),
        cpio.directory("usr/lib"),
        cpio.directory("usr/lib/bulkhead"),
        cpio.directory("usr/lib/bulkhead/grpc"),
        cpio.file("usr/lib/bulkhead/grpc/x.pyc", b"g"),
        cpio.directory("usr/lib/bulkhead/bulkhead_agent"),
        cpio.file("usr/lib/bulkhead/bulkhead_agent/main.py", b"a"),
        cpio.file("init", b"#!"),
    ]
    base, app = initramfs.split(entries, ("init", "usr/lib/bulkhead/bulkhead_agent"))
    assert [e.path for e in app] == [
        "usr",
        "usr/lib",
        "usr/lib/bulkhead",
        "usr/lib/bulkhead/bulkhead_agent",
        "usr/lib/bulkhead/bulkhead_agent/main.py",
        "init",
    ]
    assert "usr/lib/bulkhead/grpc/x.pyc" in [e.path for e in base]
    assert "init" not in [e.path for e in base]
    cpio.pack(base), cpio.pack(app)  # each part is a complete archive on its own


def test_pack_reuses_compressed_parts(tmp_path: Path) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("no zstd")
    root = tmp_path / "stage"
    for d in ("dev", "usr/lib/bulkhead/bulkhead_init"):
        (root / d).mkdir(parents=True)
    (root / "usr/lib/bulkhead/bulkhead_init/main.py").write_text("v1")
    (root / "usr/big").write_bytes(b"x" * 100_000)
    zcache = tmp_path / "z"
    app = ("usr/lib/bulkhead/bulkhead_init",)
    one, two = tmp_path / "1.img", tmp_path / "2.img"
    initramfs.pack(root, one, app_paths=app, zcache=zcache)
    initramfs.pack(root, two, app_paths=app, zcache=zcache)
    assert one.read_bytes() == two.read_bytes()
    assert len(list(zcache.iterdir())) == 2  # base and app
    (root / "usr/lib/bulkhead/bulkhead_init/main.py").write_text("v2")
    initramfs.pack(root, two, app_paths=app, zcache=zcache)
    assert len(list(zcache.iterdir())) == 3  # only the app part was compressed again
    # the concatenated zstd frames decompress to both archives, one after the other
    out = subprocess.run(["zstd", "-dc", str(two)], capture_output=True, check=True).stdout
    assert out.count(b"TRAILER!!!") == 2 and b"v2" in out
