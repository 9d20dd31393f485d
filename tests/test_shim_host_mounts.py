"""The shim's carrying of host bind mounts into the pod's share, with real mounts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bulkhead_agent.linux.mounts import is_mount_point
from bulkhead_shim import host_mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")


def test_binds_are_made_in_the_share_and_the_spec_points_there(tmp_path: Path) -> None:
    volume, conf, share = tmp_path / "volume", tmp_path / "hosts", tmp_path / "share"
    volume.mkdir()
    share.mkdir()
    (volume / "a").write_text("a")
    conf.write_text("127.0.0.1 localhost\n")
    spec = {"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(conf),
         "options": ["rbind", "ro"]},
        {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
    ]}  # fmt: skip
    assert host_mounts.needs_share(spec)
    made = host_mounts.carry(spec, "web", share, "/run/guest/pod-mounts")
    try:
        assert made == [str(share / "web-1"), str(share / "web-2")]
        assert (share / "web-1" / "a").read_text() == "a"
        assert (share / "web-2").read_text() == "127.0.0.1 localhost\n"
        with pytest.raises(OSError):  # ro on the host copy too: the guest cannot write it
            (share / "web-2").write_text("changed")
        mounts = spec["mounts"]
        assert mounts[0]["source"] == "proc"
        assert mounts[1]["source"] == "/run/guest/pod-mounts/web-1"
        assert mounts[2]["source"] == "/run/guest/pod-mounts/web-2"
        assert mounts[3] == host_mounts.SHM  # the guest's own tmpfs
    finally:
        host_mounts.release(made)
    assert not any(is_mount_point(t) for t in made)
    assert list(share.iterdir()) == []
    assert (volume / "a").read_text() == "a" and conf.exists()  # the sources untouched


def test_a_missing_source_is_refused_and_nothing_stays(tmp_path: Path) -> None:
    volume, share = tmp_path / "volume", tmp_path / "share"
    volume.mkdir()
    share.mkdir()
    spec = {"mounts": [
        {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind"]},
        {"destination": "/gone", "type": "bind", "source": str(tmp_path / "nope")},
    ]}  # fmt: skip
    with pytest.raises(FileNotFoundError, match="nope"):
        host_mounts.carry(spec, "web", share, "/g")
    assert list(share.iterdir()) == []


def test_only_shm_needs_no_share() -> None:
    spec = {"mounts": [{"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm"}]}
    assert not host_mounts.needs_share(spec)


def test_unmount_below_clears_a_directory_before_its_removal(tmp_path: Path) -> None:
    source, pod = tmp_path / "precious", tmp_path / "pod"
    source.mkdir()
    (source / "keep").write_text("keep")
    (pod / "mounts" / "x").mkdir(parents=True)
    host_mounts._bind(str(source), pod / "mounts" / "x", ["rbind"])
    host_mounts.unmount_below(pod)
    assert not is_mount_point(str(pod / "mounts" / "x"))
    assert (source / "keep").read_text() == "keep"
