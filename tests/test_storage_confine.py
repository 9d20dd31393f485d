"""Paths stay where they belong: openat2-based resolution and file copies on real directories
with real symlinks planted to lead out."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from bulkhead_agent.containers.errors import Failure
from bulkhead_agent.storage import confine
from bulkhead_agent.storage.files import FileCopy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with a dir, an inside symlink, symlinks out (absolute, relative) and a secret
    beside root that nothing may reach."""
    root = tmp_path / "root"
    (root / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "inside").symlink_to("dir/sub")
    (root / "abs-out").symlink_to(tmp_path / "secret")
    (root / "rel-out").symlink_to("../secret")
    (root / "dir" / "up").symlink_to("..")  # stays inside: fine
    return root


def open_root(root: Path) -> int:
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "must be relative"),
        ("../x", "must not contain '..'"),
        ("a/../../x", "must not contain '..'"),
        ("", "names nothing"),
        ("./", "names nothing"),
        ("a\0b", "NUL"),
    ],
)
def test_components_refuse_lexical_escapes(path: str, why: str) -> None:
    with pytest.raises(confine.PathRefused, match=why):
        confine.components(path)


def test_components_normalise() -> None:
    assert confine.components("a//b/./c/") == ["a", "b", "c"]
    assert confine.components("", allow_empty=True) == []


def test_open_dir_follows_symlinks_that_stay_inside(tree: Path) -> None:
    fd = open_root(tree)
    try:
        inner = confine.open_dir(fd, ["inside"])
        assert confine.real_path(inner) == str(tree / "dir" / "sub")
        os.close(inner)
        up = confine.open_dir(fd, ["dir", "up", "dir"])
        assert confine.real_path(up) == str(tree / "dir")
        os.close(up)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["abs-out", "rel-out"])
def test_open_dir_refuses_symlinks_leading_out(tree: Path, name: str) -> None:
    fd = open_root(tree)
    try:
        with pytest.raises(confine.PathRefused, match="leads out of its storage"):
            confine.open_dir(fd, [name, "x"], create=True)
    finally:
        os.close(fd)
    assert list((tree.parent / "secret").iterdir()) == []


def test_strict_resolution_refuses_any_symlink_and_other_mounts(tree: Path) -> None:
    fd = open_root(tree)
    try:
        with pytest.raises(confine.PathRefused, match="symlink"):
            confine.open_dir(fd, ["inside"], resolve=confine.STRICT)
        made = confine.open_dir(fd, ["new", "deeper"], resolve=confine.STRICT, create=True)
        os.close(made)
        assert (tree / "new" / "deeper").is_dir()
    finally:
        os.close(fd)


def test_open_dir_creates_with_owner(tree: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    fd = open_root(tree)
    try:
        os.close(confine.open_dir(fd, ["made", "here"], create=True, owner=(1234, 5678)))
    finally:
        os.close(fd)
    st = os.stat(tree / "made" / "here")
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_open_in_refuses_escapes(tree: Path) -> None:
    fd = open_root(tree)
    try:
        with pytest.raises(confine.PathRefused, match="leads out"):
            confine.open_in(fd, "abs-out", os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(confine.PathRefused, match=r"'\.\.'"):
            confine.open_in(fd, "dir/../../secret", os.O_RDONLY)
    finally:
        os.close(fd)


# --- file copies -------------------------------------------------------------------------------


def copy(root: Path, path: str, data: bytes, chunk: int = 1000, **options) -> str:  # type: ignore[no-untyped-def]
    options.setdefault("mode", 0o640)
    options.setdefault("uid", os.getuid())
    options.setdefault("gid", os.getgid())
    writer = FileCopy(str(root), path, size=len(data), **options)
    try:
        for offset in range(0, len(data), chunk):
            writer.write(data[offset : offset + chunk])
        return asyncio.run(writer.finish())
    except BaseException:
        writer.abort()
        raise


def test_copy_writes_mode_and_owner_and_renames_at_the_end(tree: Path) -> None:
    data = os.urandom(100_000)
    (tree / "dir" / "file").write_bytes(b"old")
    owner = (4321, 8765) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    writer = FileCopy(
        str(tree), "dir/file", size=len(data), mode=0o4750, uid=owner[0], gid=owner[1]
    )
    writer.write(data[:50_000])
    # Half-way: the old file is still what readers see, the new one is a hidden temp.
    assert (tree / "dir" / "file").read_bytes() == b"old"
    hidden = [p.name for p in (tree / "dir").iterdir() if p.name.startswith(".file.")]
    assert len(hidden) == 1
    writer.write(data[50_000:])
    final = asyncio.run(writer.finish())
    assert final == str(tree / "dir" / "file")
    assert (tree / "dir" / "file").read_bytes() == data
    st = os.stat(final)
    assert stat.S_IMODE(st.st_mode) == 0o4750
    assert (st.st_uid, st.st_gid) == owner
    assert sorted(p.name for p in (tree / "dir").iterdir()) == ["file", "sub", "up"]


def test_copy_through_an_inside_symlink_and_with_parents(tree: Path) -> None:
    assert copy(tree, "inside/a.txt", b"x") == str(tree / "dir" / "sub" / "a.txt")
    assert copy(tree, "p/q/r.txt", b"y", make_parents=True) == str(tree / "p" / "q" / "r.txt")


def test_copy_without_parents_says_so(tree: Path) -> None:
    with pytest.raises(Failure, match="does not exist") as info:
        copy(tree, "missing/x", b"y")
    assert info.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize("path", ["abs-out/x", "rel-out/x", "../secret/x", "/secret/x"])
def test_copy_escapes_are_refused(tree: Path, path: str) -> None:
    with pytest.raises(Failure) as info:
        copy(tree, path, b"evil", make_parents=True)
    assert info.value.code == "INVALID_ARGUMENT"
    assert list((tree.parent / "secret").iterdir()) == []


def test_copy_onto_a_symlink_replaces_the_link_not_its_target(tree: Path) -> None:
    (tree.parent / "secret" / "target").write_text("keep")
    (tree / "link").symlink_to(tree.parent / "secret" / "target")
    copy(tree, "link", b"new")
    assert (tree.parent / "secret" / "target").read_text() == "keep"
    assert not (tree / "link").is_symlink()
    assert (tree / "link").read_bytes() == b"new"


def test_copy_size_must_add_up_and_a_failed_copy_leaves_nothing(tree: Path) -> None:
    writer = FileCopy(str(tree), "short", size=10, mode=0o644, uid=0, gid=0)
    writer.write(b"12345")
    with pytest.raises(Failure, match="after 5 of 10 bytes"):
        asyncio.run(writer.finish())
    writer.abort()
    writer = FileCopy(str(tree), "long", size=3, mode=0o644, uid=0, gid=0)
    with pytest.raises(Failure, match="more than the 3 bytes"):
        writer.write(b"1234")
    writer.abort()
    assert sorted(p.name for p in tree.iterdir()) == ["abs-out", "dir", "inside", "rel-out"]


def test_copy_refuses_a_directory_and_bad_modes(tree: Path) -> None:
    with pytest.raises(Failure, match="is a directory"):
        copy(tree, "dir", b"x")
    with pytest.raises(Failure, match="bits beyond"):
        copy(tree, "f", b"x", mode=0o10000)
