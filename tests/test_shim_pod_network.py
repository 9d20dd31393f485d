"""What the shim reads from a CNI-made network namespace, and the tc redirect of a mirror tap,
against real namespaces, veths and taps (no VM: the tap's other end is this test)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from bulkhead import netns
from bulkhead.network import Interface, Route
from bulkhead.nics import open_tap
from bulkhead_shim.pod_network import network_namespace, pod_network

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

VNET_HDR = 10  # struct virtio_net_hdr in front of every frame on a tap opened with vnet_hdr


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def cni() -> Iterator[tuple[str, str]]:
    """A pod namespace as the bridge plugin leaves it, and the node's end in another."""
    pod, node = f"bh-tpod-{os.getpid()}", f"bh-tnode-{os.getpid()}"
    try:
        ip("netns", "add", pod)
        ip("netns", "add", node)
        ip("-n", pod, "link", "add", "eth0", "mtu", "1450", "address", "0a:58:0a:59:00:05",
           "type", "veth", "peer", "name", "node0", "netns", node)  # fmt: skip
        ip("-n", pod, "addr", "add", "10.89.0.5/24", "dev", "eth0")
        ip("-n", pod, "link", "set", "eth0", "up")
        ip("-n", pod, "route", "add", "default", "via", "10.89.0.1")
        ip("-n", pod, "route", "add", "10.96.0.0/12", "via", "10.89.0.1")
        ip("-n", pod, "addr", "add", "fd00:89::5/64", "dev", "eth0", "nodad")
        ip("-n", pod, "-6", "route", "add", "default", "via", "fd00:89::1", "dev", "eth0")
        ip("-n", node, "addr", "add", "10.89.0.1/24", "dev", "node0")
        ip("-n", node, "link", "set", "node0", "up")
        yield f"/run/netns/{pod}", node
    finally:
        for ns in (pod, node):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_spec_names_the_network_namespace() -> None:
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}]}}
    assert network_namespace(spec) == "/run/netns/x"
    assert network_namespace({"linux": {"namespaces": [{"type": "network"}]}}) == ""
    assert network_namespace({}) == ""


def test_the_guest_gets_the_pod_interface_as_cni_made_it(cni: tuple[str, str]) -> None:
    path, _ = cni
    nics, spec = pod_network(path)
    [nic] = nics
    assert (nic.backend, nic.netns, nic.mirror, nic.mac) == ("tap", path, "eth0",
                                                              "0a:58:0a:59:00:05")  # fmt: skip
    assert (nic.subnet, nic.guest_address, nic.host_address) == ("10.89.0.0/24", "10.89.0.5",
                                                                  "10.89.0.1")  # fmt: skip
    assert spec.interfaces == (
        Interface("0a:58:0a:59:00:05", ("10.89.0.5/24", "fd00:89::5/64"), name="eth0", mtu=1450),
    )
    # The plugin's routes; the subnet route the kernel made for the address is the guest's own.
    assert spec.routes == (
        Route("default", gateway="10.89.0.1", device="eth0"),
        Route("10.96.0.0/12", gateway="10.89.0.1", device="eth0"),
        Route("::/0", gateway="fd00:89::1", device="eth0"),
    )


def test_a_mirror_tap_takes_over_the_pod_interface(cni: tuple[str, str]) -> None:
    path, node = cni
    [nic], _ = pod_network(path)
    fd = open_tap(nic)
    try:
        # The node asks who has the pod's address: the request reaches the tap, not the
        # namespace's stack (which would answer it by itself).
        ping = subprocess.Popen(["ip", "netns", "exec", node, "busybox", "ping", "-c", "3",
                                 "-W", "1", "10.89.0.5"], stdout=subprocess.DEVNULL)  # fmt: skip
        frame = _read_frame(fd, 10)
        ping.wait(30)
        assert frame[12:14] == b"\x08\x06", frame[:20]  # ARP
        assert frame[38:42] == socket.inet_aton("10.89.0.5")  # target: the pod's address
        neighbours = netns.ip(node, "neigh", "show", "10.89.0.5")
        assert "lladdr" not in neighbours, neighbours  # nobody but the "guest" may answer
        # What the "guest" sends leaves by the veth: a gratuitous ARP teaches the node its MAC.
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        me = socket.inet_aton("10.89.0.5")
        arp = (b"\xff" * 6 + mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x02" + mac + me
               + b"\xff" * 6 + me)  # fmt: skip
        os.write(fd, bytes(VNET_HDR) + arp)
        _wait_for(lambda: nic.mac in netns.ip(node, "neigh", "show", "10.89.0.5"))
    finally:
        os.close(fd)
    # The tap went with its descriptor; the redirect from the veth is taken off by cleanup.
    netns.unredirect(nic.netns, nic.mirror)
    assert "ingress" not in netns_tc(path)


def netns_tc(path: str) -> str:
    return subprocess.run(["nsenter", f"--net={path}", "tc", "qdisc", "show", "dev", "eth0"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def _read_frame(fd: int, timeout: float) -> bytes:
    """The next ARP frame the tap delivers (IPv6 router solicitations and such come too)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            frame = os.read(fd, 65536)[VNET_HDR:]
            if frame[12:14] == b"\x08\x06":
                return frame
    raise AssertionError("no ARP frame reached the tap")


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
