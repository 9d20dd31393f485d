"""The image cache: the input hash, the manifest, and returning a cached image at once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from bulkhead_image import build, cache, debian, inputs, manifest, modules, wheels

BASE = inputs.Inputs(
    kernel_package="linux-image-6.1.0-56-cloud-amd64",
    kernel_version="6.1.192-2",
    debian_packages={"libc6": "2.36-9+deb12u14", "python3.11-minimal": "3.11.2-6+deb12u9"},
    requirements_sha256="ab" * 32,
    files={"init/bulkhead_init/main.py": "cd" * 32},
    modules=("virtio_pci", "virtio_console"),
    cmdline="console=ttyS0",
)


def test_digest_is_stable() -> None:
    same = dataclasses.replace(BASE, debian_packages=dict(reversed(BASE.debian_packages.items())))
    assert BASE.digest() == same.digest()
    assert len(BASE.digest()) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"kernel_package": "linux-image-6.1.0-57-cloud-amd64"},
        {"kernel_version": "6.1.193-1"},
        {"debian_packages": {"libc6": "2.36-9+deb12u15", "python3.11-minimal": "3.11.2-6+deb12u9"}},
        {"requirements_sha256": "ef" * 32},
        {"files": {"init/bulkhead_init/main.py": "00" * 32}},
        {"files": {"init/bulkhead_init/main.py": "cd" * 32, "agent/bulkhead_agent/x.py": "1"}},
        {"modules": ("virtio_console", "virtio_pci")},
        {"cmdline": "console=hvc0"},
        {"schema": inputs.SCHEMA + 1},
    ],
)
def test_digest_changes_with_every_input(change: dict) -> None:
    assert dataclasses.replace(BASE, **change).digest() != BASE.digest()


def test_file_hashes_follow_content(tmp_path: Path) -> None:
    f = tmp_path / "pkg" / "a.py"
    f.parent.mkdir()
    f.write_text("x = 1\n")
    before = inputs.hash_files([f], tmp_path)
    assert list(before) == ["pkg/a.py"]
    assert inputs.hash_files([f], tmp_path) == before
    f.write_text("x = 2\n")
    assert inputs.hash_files([f], tmp_path) != before


def test_source_lists_cover_what_is_shipped() -> None:
    ours = [p.relative_to(inputs.REPO_ROOT).as_posix() for p in inputs.package_sources()]
    assert "init/bulkhead_init/__init__.py" in ours
    assert "protocol/bulkhead_proto/v1/agent_pb2.py" in ours
    assert all(p.endswith(".py") and "__pycache__" not in p for p in ours)
    builder = {p.name for p in inputs.builder_sources()}
    assert {"build.py", "modules.py", "guest-requirements.txt"} <= builder


def test_apt_output_parsing() -> None:
    policy = """linux-image-6.1.0-56-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
libc6:
  Installed: 2.36-9+deb12u9
  Candidate: 2.36-9+deb12u14
gone:
  Installed: (none)
  Candidate: (none)
"""
    assert debian.parse_policy(policy) == {
        "linux-image-6.1.0-56-cloud-amd64": "6.1.192-2",
        "libc6": "2.36-9+deb12u14",
        "gone": None,
    }
    depends = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert debian.parse_depends(depends) == ["linux-image-6.1.0-56-cloud-amd64"]
    assert debian.usr_merged("/lib/x86_64-linux-gnu/libc.so.6") == (
        "/usr/lib/x86_64-linux-gnu/libc.so.6"
    )


def test_guest_requirements_are_complete_pins_with_hashes() -> None:
    pins = wheels.pins()
    assert pins["grpcio"] == "1.85.1"
    assert {"grpcio-health-checking", "grpcio-reflection", "protobuf", "psutil", "pyroute2"} <= set(
        pins
    )
    assert "typing-extensions" in pins  # grpcio's only dependency (--no-deps needs it listed)
    text = wheels.REQUIREMENTS.read_text()
    assert text.count("--hash=sha256:") == len(pins)


def test_wheel_trimming_rules() -> None:
    assert wheels.wanted("grpc/__init__.py")
    assert wheels.wanted("grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so")
    assert not wheels.wanted("grpc/_cython/cygrpc.pxd")
    assert not wheels.wanted("grpc/_cython/_credentials/roots.pem")
    assert not wheels.wanted("grpcio-1.85.1.dist-info/METADATA")
    assert not wheels.wanted("grpc_health/v1/health_pb2.pyi")
    assert not wheels.wanted("bin/pyroute2-decoder")
    assert not wheels.wanted("pyroute2/__pycache__/x.cpython-311.pyc")


def test_manifest_keys() -> None:
    base = manifest.make(
        kernel_release="6.1.0-56-cloud-amd64",
        kernel_package="linux-image-6.1.0-56-cloud-amd64",
        kernel_package_version="6.1.192-2",
        python_version="3.11.2",
        packages={"grpcio": "1.85.1"},
        debian_packages={"libc6": "2.36"},
        modules=["virtio_pci"],
        cmdline=manifest.DEFAULT_CMDLINE,
        input_hash="a" * 64,
        compression="zstd",
    )
    # what internals.md promises (the guest copy has no artifacts: it cannot hash itself)
    for key in (
        "kernel_release",
        "kernel_package_version",
        "python_version",
        "packages",
        "debian_packages",
        "modules",
        "cmdline",
        "input_hash",
    ):
        assert key in base
    assert "artifacts" not in base
    assert "bulkhead." not in base["cmdline"]
    json.loads(manifest.dumps(base))


def fake_image(root: Path, key: str) -> None:
    d = cache.images_dir(root) / key
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(b"kernel")
    (d / "initramfs.img").write_bytes(b"initrd")
    base = {"kernel_release": "6.1.0-56-cloud-amd64", "input_hash": key}
    full = manifest.with_artifacts(
        base, {"vmlinuz": d / "vmlinuz", "initramfs.img": d / "initramfs.img"}
    )
    (d / "manifest.json").write_text(manifest.dumps(full))


def test_with_artifacts(tmp_path: Path) -> None:
    fake_image(tmp_path, "k")
    m = json.loads((cache.images_dir(tmp_path) / "k" / "manifest.json").read_text())
    assert m["artifacts"]["initramfs.img"] == {
        "sha256": hashlib.sha256(b"initrd").hexdigest(),
        "size": 6,
    }
    assert set(m["artifacts"]) == {"vmlinuz", "initramfs.img"}
    assert m["initramfs_size"] == 6


def test_latest_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache.latest_image(tmp_path) is None
    fake_image(tmp_path, "abc")
    cache.set_latest("abc", tmp_path)
    info = cache.latest_image(tmp_path)
    assert info is not None and info.cached
    assert info.kernel.name == "vmlinuz" and info.initramfs.name == "initramfs.img"
    assert info.manifest["input_hash"] == "abc"
    monkeypatch.setenv("BULKHEAD_CACHE_DIR", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path
    assert cache.latest_image() == info
    (info.path / "initramfs.img").unlink()
    assert cache.latest_image(tmp_path) is None  # incomplete images do not count


def test_build_returns_a_cached_image_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "collect_inputs", lambda cache_dir, variant=None: BASE)

    def no_build(*args: object) -> None:
        raise AssertionError("must not build")

    monkeypatch.setattr(build, "_build", no_build)
    fake_image(tmp_path, BASE.digest())
    messages: list[str] = []
    start = time.monotonic()
    info = build.build_image(tmp_path, progress=messages.append)
    assert time.monotonic() - start < 1
    assert info.cached and info.path.name == BASE.digest()
    assert (cache.images_dir(tmp_path) / "latest").read_text().strip() == BASE.digest()
    assert messages and "cached" in messages[-1]


def test_real_inputs_are_cheap(tmp_path: Path) -> None:
    """The cache key must not need downloads: a second computation is well under a second."""
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt")
    try:
        build.collect_inputs(tmp_path)  # may ask apt (slow) once
    except debian.DebianError as e:  # e.g. no 'apt-get update' yet on this machine
        pytest.skip(str(e))
    start = time.monotonic()
    inp = build.collect_inputs(tmp_path)
    assert time.monotonic() - start < 1
    assert inp.kernel_package.startswith("linux-image-")
    assert inp.modules == modules.WANTED_MODULES
