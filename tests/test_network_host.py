"""The host side of sandbox networking: specs, NIC options, taps in namespaces, the guestfwd
relay, and hot-plug into a real (paused, guest-less) QEMU over QMP."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead import netns
from bulkhead.errors import SpecError
from bulkhead.network import Interface, NetworkSpec, Route
from bulkhead.nics import Nic, NicError, add_hostfwd, boot_args, default_spec, plug
from bulkhead.qemu import hotplug_port_id
from bulkhead.qmp import Qmp
from bulkhead.sandbox_network import parse_publish, prepare_nics
from bulkhead_proto.v1 import network_pb2 as pb

MAC = "52:54:00:12:34:56"


# --- specs -----------------------------------------------------------------------------------


def test_spec_from_json_to_the_request(tmp_path: Path) -> None:
    path = tmp_path / "net.json"
    path.write_text(
        json.dumps(
            {
                "interfaces": [
                    {"mac": MAC, "name": "eth0", "mtu": 1400, "addresses": ["10.0.2.15/24"]}
                ],
                "routes": [
                    {"destination": "default", "gateway": "10.0.2.2"},
                    {"destination": "10.9.0.0/16", "device": "eth0", "scope": "link"},
                ],
                "neighbors": [{"address": "10.0.2.7", "mac": MAC, "device": "eth0"}],
                "dns": {"nameservers": ["10.0.2.3"], "search": ["example.test"]},
                "hosts": [{"address": "10.0.2.2", "names": ["gateway"]}],
                "hostname": "web",
            }
        )
    )
    spec = NetworkSpec.load(path)
    request = spec.to_proto(wait=2.5)
    assert request.wait_ms == 2500
    assert request.interfaces[0].state == pb.LINK_STATE_UP  # the default
    assert request.HasField("routes") and len(request.routes.routes) == 2
    assert request.routes.routes[1].scope == pb.ROUTE_SCOPE_LINK
    assert request.name_resolution.hostname == "web"
    assert list(request.name_resolution.nameservers) == ["10.0.2.3"]
    assert NetworkSpec.from_dict(spec.to_dict()) == spec


def test_routes_absent_are_kept_and_empty_are_removed() -> None:
    assert not NetworkSpec.from_dict({}).to_proto().HasField("routes")
    request = NetworkSpec.from_dict({"routes": []}).to_proto()
    assert request.HasField("routes") and not request.routes.routes
    assert not NetworkSpec().to_proto().HasField("name_resolution")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"interface": []}, "unknown key 'interface'"),
        ({"interfaces": [{"addresses": ["10.0.0.2/24"]}]}, "interfaces[0].mac: is required"),
        ({"interfaces": [{"mac": MAC, "state": "sideways"}]}, "interfaces[0].state: must be one"),
        ({"interfaces": [{"mac": MAC, "mtu": "big"}]}, "interfaces[0].mtu: must be a whole"),
        ({"routes": [{"destination": "default", "scope": "moon"}]}, "routes[0].scope"),
        ({"routes": {}}, "routes: must be a list"),
        ({"dns": {"nameserver": ["1.1.1.1"]}}, "dns: unknown key 'nameserver'"),
    ],
)
def test_bad_spec_files_name_the_key(tmp_path: Path, data: dict, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError) as err:
        NetworkSpec.load(path)
    assert str(err.value).startswith(f"network spec {path}: ")
    assert message in str(err.value)


# --- NICs ------------------------------------------------------------------------------------


def test_user_nic_defaults_and_qemu_arguments() -> None:
    nic = Nic.parse(
        "user,hostfwd=tcp::8080-:80,guestfwd=tcp:10.0.2.100:5000-127.0.0.1:6000", name="net0"
    )
    assert (nic.subnet, nic.host_address, nic.guest_address, nic.dns) == (
        "10.0.2.0/24", "10.0.2.2", "10.0.2.15", "10.0.2.3",
    )  # fmt: skip
    args, fds = boot_args([nic])
    assert fds == []
    netdev = args[1]
    assert netdev.startswith("user,id=bh-net-net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3")
    assert ",restrict=on," in netdev  # the guest reaches nothing but the explicit forwards
    assert "hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80" in netdev
    assert (
        "guestfwd=tcp:10.0.2.100:5000-cmd:" in netdev
        and "bulkhead.forward 127.0.0.1 6000" in netdev
    )
    assert args[3] == f"virtio-net-pci,id=bh-nic-net0,netdev=bh-net-net0,mac={nic.mac}"
    assert nic.mac.startswith("52:54:00:")


def test_nic_spec_and_the_default_spec() -> None:
    user = Nic.make("user", name="net0", mac=MAC)
    tap = Nic.make("tap", name="net1", index=3, sandbox="web", mac="52:54:00:00:00:09")
    assert (tap.netns, tap.created_netns, tap.tap) == ("bh-web", True, "tap-net1")
    assert (tap.subnet, tap.host_address, tap.guest_address) == (
        "10.88.3.0/24",
        "10.88.3.1",
        "10.88.3.2",
    )
    spec = default_spec([user, tap])
    assert spec.interfaces == (
        Interface(MAC, ("10.0.2.15/24",)),
        Interface("52:54:00:00:00:09", ("10.88.3.2/24",)),
    )
    assert spec.routes == (Route("default", gateway="10.0.2.2"),)
    assert spec.name_resolution is not None and spec.name_resolution.nameservers == ("10.0.2.3",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wifi", "backend must be one of"),
        ("user,colour=blue", "unknown option"),
        ("user,subnet=10.0.2.0/30", "too small"),
        ("user,guest=10.0.3.15", "not in 10.0.2.0/24"),
        ("user,mac=01:00:5e:00:00:01", "unicast"),
        ("user,hostfwd=tcp:8080:80", "hostfwd"),
        ("tap,hostfwd=tcp::1-:1", "user networking only"),
    ],
)
def test_bad_nic_options(text: str, message: str) -> None:
    with pytest.raises(NicError) as err:
        Nic.parse(text, name="net0")
    assert message in str(err.value)


def test_publish_goes_on_a_user_nic() -> None:
    assert parse_publish("8080:80") == "tcp:127.0.0.1:8080-:80"
    assert parse_publish("0.0.0.0:53:53/udp") == "udp:0.0.0.0:53-:53"
    with pytest.raises(NicError):
        parse_publish("80")
    nics = prepare_nics("web", ["tap,netns=/proc/self/ns/net"], ["8080:80"])
    assert [n.backend for n in nics] == ["tap", "user"]  # one added for the ports
    assert nics[1].hostfwd == ("tcp:127.0.0.1:8080-:80",)


# --- taps in namespaces ----------------------------------------------------------------------


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def named_netns() -> Iterator[str]:
    name = f"bh-test-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


@needs_root
def test_tap_lives_in_its_namespace_while_open(named_netns: str) -> None:
    fd = netns.open_tap(named_netns, "tap-t0", "10.88.0.1/24")
    try:
        shown = json.loads(netns.ip(named_netns, "-j", "addr", "show", "dev", "tap-t0"))
        assert shown[0]["addr_info"][0]["local"] == "10.88.0.1"
        host = subprocess.run(["ip", "link", "show", "tap-t0"], capture_output=True, check=False)
        assert host.returncode != 0  # not in the host's namespace
    finally:
        os.close(fd)
    gone = subprocess.run(
        ["nsenter", f"--net=/run/netns/{named_netns}", "ip", "link", "show", "tap-t0"],
        capture_output=True,
        check=False,
    )
    assert gone.returncode != 0  # not persistent: it went with its last descriptor


# --- the guestfwd relay ----------------------------------------------------------------------


def test_forward_relays_both_ways_with_half_close() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            received.append(data)
            conn.sendall(b"reply:" + data[:10])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        relay = subprocess.Popen(
            [sys.executable, "-m", "bulkhead.forward", "127.0.0.1", str(port)],
            stdin=theirs,
            stdout=theirs,
            stderr=theirs,
        )
        theirs.close()
        payload = os.urandom(300_000)
        ours.sendall(payload)
        ours.shutdown(socket.SHUT_WR)
        answer = b""
        ours.settimeout(20)
        while chunk := ours.recv(65536):
            answer += chunk
        assert relay.wait(20) == 0
    thread.join(5)
    server.close()
    assert received == [payload]
    assert answer == b"reply:" + payload[:10]


# --- hot-plug into a real QEMU ---------------------------------------------------------------


@pytest.fixture
def paused_qemu(tmp_path: Path) -> Iterator[Path]:
    """QEMU with two hot-plug ports, paused before its firmware runs: no guest, no CPU use."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no QEMU")
    qmp_path = Path(f"/tmp/bh-nt-{secrets.token_hex(4)}.sock")
    cmd = [
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-machine", "q35",
        "-accel", "tcg", "-m", "64",
        "-chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-device", f"pcie-root-port,id={hotplug_port_id(0)},bus=pcie.0,chassis=1,addr=0x10",
        "-device", f"pcie-root-port,id={hotplug_port_id(1)},bus=pcie.0,chassis=2,addr=0x11",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not qmp_path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "QEMU's QMP socket did not appear"
            time.sleep(0.05)
        yield qmp_path
    finally:
        proc.kill()
        proc.wait()
        qmp_path.unlink(missing_ok=True)


def _plugged(qmp: Qmp) -> set[str]:
    # By id: before the firmware numbers the buses, query-pci lists nothing behind a port.
    return {child["name"] for child in qmp.execute("qom-list", {"path": "/machine/peripheral"})}


@needs_root
def test_user_and_tap_nics_plug_into_qemu(paused_qemu: Path, named_netns: str) -> None:
    user = Nic.parse("user,hostfwd=tcp::0-:80", name="net0")
    tap = Nic.parse(f"tap,netns={named_netns}", name="net1")
    with Qmp(paused_qemu, timeout=10) as qmp:
        plug(qmp, user, hotplug_port_id(0))
        plug(qmp, tap, hotplug_port_id(1))
        assert {"bh-nic-net0", "bh-nic-net1"} <= _plugged(qmp)
        # QEMU holds the tap now: it is there, with its host end configured.
        shown = json.loads(netns.ip(named_netns, "-j", "addr", "show", "dev", tap.tap))
        assert shown[0]["addr_info"][0]["local"] == "10.88.0.1"
        rule = add_hostfwd(qmp, user, "tcp:127.0.0.1:0-:8080")
        assert rule == "tcp:127.0.0.1:0-10.0.2.15:8080"
        with pytest.raises(NicError, match="publishing"):
            add_hostfwd(qmp, user, "tcp:203.0.113.1:1-:80")  # not an address of this host
