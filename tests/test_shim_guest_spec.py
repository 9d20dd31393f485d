"""containerd's spec, made right for the guest (``bulkhead_shim.guest_spec``)."""

from __future__ import annotations

from bulkhead_shim.guest_spec import guest_spec


def spec(**linux) -> dict:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"]},
        "root": {"path": "/var/lib/containerd/x/rootfs", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": linux,
    }


def test_host_namespace_paths_are_dropped_and_the_host_netns_left_out() -> None:
    given = spec(namespaces=[
        {"type": "pid"},
        {"type": "network", "path": "/var/run/netns/cni-1234"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "mount"},
    ])  # fmt: skip
    out = guest_spec(given, "c1")
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]
    assert given["linux"]["namespaces"][1]["path"]  # the caller's spec is untouched


def test_a_new_network_namespace_stays() -> None:
    out = guest_spec(spec(namespaces=[{"type": "network"}]), "c1")
    assert out["linux"]["namespaces"] == [{"type": "network"}]


def test_the_host_cgroup_path_goes_and_the_root_is_the_shared_one() -> None:
    out = guest_spec(spec(cgroupsPath="/default/c1", resources={"pids": {"limit": 5}}), "c1")
    assert "cgroupsPath" not in out["linux"]
    assert out["linux"]["resources"] == {"pids": {"limit": 5}}
    assert out["root"] == {"path": "rootfs", "readonly": True}
    assert out["mounts"] == [{"destination": "/proc", "type": "proc", "source": "proc"}]
