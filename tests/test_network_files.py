"""The sandbox's resolv.conf / hosts / hostname files and their binds into container specs."""

from __future__ import annotations

import os
from pathlib import Path

from bulkhead_agent.network import spec as specs
from bulkhead_agent.network.files import NameFiles, add_container_binds, render
from bulkhead_proto.v1 import network_pb2 as pb


def _files(tmp_path: Path) -> NameFiles:
    files = NameFiles(str(tmp_path / "network"))
    files.prepare()
    return files


def test_defaults_are_localhost_and_the_current_hostname(tmp_path: Path) -> None:
    files = _files(tmp_path)
    now = files.read()
    assert "nameserver" not in now.resolv_conf
    assert "127.0.0.1\tlocalhost\n" in now.hosts
    assert now.hostname == os.uname().nodename + "\n"
    # prepare() keeps what is there: an agent restart must not undo the host's settings.
    Path(files.path("hosts")).write_text("kept\n")
    files.prepare()
    assert files.read().hosts == "kept\n"


def test_rewritten_in_place_so_binds_see_updates(tmp_path: Path) -> None:
    files = _files(tmp_path)
    before = os.stat(files.path("resolv.conf")).st_ino
    spec = specs.parse_name_resolution(
        pb.NameResolution(nameservers=["10.0.2.3"], hostname="box"), "name_resolution"
    )
    files.write(render(spec, "box"))
    assert os.stat(files.path("resolv.conf")).st_ino == before
    assert files.read().resolv_conf.endswith("nameserver 10.0.2.3\n")
    # Shorter contents leave no tail of the longer ones behind.
    files.write(render(specs.parse_name_resolution(pb.NameResolution(), "n"), "box"))
    assert "nameserver" not in files.read().resolv_conf


def test_hosts_names_the_hostname_once(tmp_path: Path) -> None:
    entry = pb.HostEntry(address="10.0.0.5", names=["box", "box.example.test"])
    spec = specs.parse_name_resolution(pb.NameResolution(hosts=[entry]), "n")
    hosts = render(spec, "box").hosts
    assert "10.0.0.5\tbox box.example.test\n" in hosts
    assert "127.0.1.1" not in hosts  # named by an entry already


def _spec(namespaces: list[str], mounts: list[dict] | None = None, readonly: bool = False) -> dict:
    return {
        "root": {"path": "rootfs", "readonly": readonly},
        "mounts": list(mounts or []),
        "linux": {"namespaces": [{"type": t} for t in namespaces]},
    }


def test_binds_for_a_container_in_the_sandbox_network(tmp_path: Path) -> None:
    files = _files(tmp_path)
    lower = tmp_path / "lower"
    lower.mkdir()
    value = _spec(["pid", "mount", "uts"])
    added = add_container_binds(value, files.binds(), str(lower))
    assert added == ["/etc/resolv.conf", "/etc/hosts"]  # not hostname: it has its own UTS
    mount = value["mounts"][0]
    assert mount["source"] == files.path("resolv.conf")
    assert mount["type"] == "bind" and "ro" in mount["options"]
    # Sharing the sandbox's UTS namespace too: its hostname file as well.
    value = _spec(["pid", "mount"])
    assert "/etc/hostname" in add_container_binds(value, files.binds(), str(lower))


def test_no_binds_where_the_spec_decides(tmp_path: Path) -> None:
    files = _files(tmp_path)
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    # A network of its own: the sandbox's name servers mean nothing there.
    assert add_container_binds(_spec(["network", "mount"]), files.binds(), str(lower)) == []
    # Its own /etc/hosts mount wins.
    own = {"destination": "/etc/hosts", "type": "bind", "source": "/x", "options": ["bind"]}
    value = _spec(["mount", "uts"], [own])
    assert add_container_binds(value, files.binds(), str(lower)) == ["/etc/resolv.conf"]
    # A read-only root without the file: nowhere to mount it on.
    (lower / "etc" / "hosts").write_text("")
    value = _spec(["mount", "uts"], readonly=True)
    assert add_container_binds(value, files.binds(), str(lower)) == ["/etc/hosts"]
    # A user namespace: its root cannot make a mount point in the image's /etc either.
    value = _spec(["user", "mount", "uts"])
    assert add_container_binds(value, files.binds(), str(lower)) == ["/etc/hosts"]
