"""The sandbox's network in the real guest: NICs from the host, specs applied by the agent.

One sandbox for the module: a user-mode NIC from boot (restricted: it reaches only the
``guestfwd`` to a server of this test on 127.0.0.1, and the host only the published port),
and a tap NIC hot-plugged into a network namespace this test makes. No packet goes to an
address outside those. Containers share the sandbox's network, so servers and clients run in
containers. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from bulkhead import Sandbox, netns
from bulkhead.errors import InvalidArgument, NotFound
from bulkhead.network import Interface, NetworkSpec, Route

DEADLINE = 120.0
GUESTFWD = ("10.0.2.100", 5000)  # the guest's name for our host server
CONTAINER_PORT = 8080


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.server.server_address[0]} to {self.client_address[0]}\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


def _serve(sock: socket.socket) -> HTTPServer:
    """An HTTP server on an already bound and listening socket, in a thread."""
    server = HTTPServer(sock.getsockname(), _Hello, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _in_netns(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread inside network namespace ``name`` (sockets it makes live there)."""
    out: list[Any] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns.netns_path(name), os.O_RDONLY)
        try:
            assert libc.setns(fd, 0x40000000) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert out, "the namespace thread did not finish"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def _poll_get(url: str, what: str, fetch: Callable[[str], str] = _get) -> str:
    return wait_for(lambda: fetch(url), DEADLINE, what, interval=0.5)


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """An HTTP server on the host's loopback: what the guestfwd leads to."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = _serve(sock)
    yield sock.getsockname()[1]
    server.shutdown()
    sock.close()


@pytest.fixture(scope="module")
def published() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def test_netns() -> Iterator[str]:
    name = f"bh-qt-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


@pytest.fixture(scope="module")
def sb(image, state_dir: Path, host_server: int, published: int) -> Iterator[Sandbox]:
    guestfwd = f"tcp:{GUESTFWD[0]}:{GUESTFWD[1]}-127.0.0.1:{host_server}"
    sandbox = Sandbox.up(
        f"net-{os.getpid() % 10000}",
        image=image.path,
        memory_mib=512,
        state_dir=state_dir,
        nics=[f"user,guestfwd={guestfwd}"],
        publish=[f"{published}:{CONTAINER_PORT}"],
    )
    try:
        yield sandbox
    finally:
        sandbox.down(timeout=20)


@pytest.fixture
def keep(sb: Sandbox) -> Iterator[Callable[[Any], Any]]:
    made: list[Any] = []
    yield lambda c: made.append(c) or c
    for container in made:
        with contextlib.suppress(NotFound):
            container.remove(timeout=0)


def run(sb: Sandbox, script: str) -> tuple[int, str, str]:
    proc = sb.run(["sh", "-c", script])
    out, err = proc.communicate(timeout=DEADLINE)
    return proc.returncode, out.decode(), err.decode()


def http_get(sb: Sandbox, host: str, port: int) -> str:
    """The body of ``GET /`` from a container, through busybox ``nc`` (the image's static
    busybox ``wget`` crashes in glibc's resolver, even for addresses)."""
    request = "GET / HTTP/1.0\\r\\n\\r\\n"
    code, out, err = run(sb, f"printf '{request}' | nc -w 20 {host} {port}")
    assert code == 0, err
    head, _, body = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200"), out
    return body


def web_server(sb: Sandbox, keep: Callable[[Any], Any], port: int, text: str) -> None:
    script = f"mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p {port} -h /www"
    keep(sb.create_container(["sh", "-c", script])).start()


# --- the NIC from boot -----------------------------------------------------------------------


def test_boot_nic_configured_from_the_spec(sb: Sandbox) -> None:
    nic = sb.nics()[0]
    state = sb.network.state()
    eth = state.interface(nic.mac)
    assert "10.0.2.15/24" in eth.addresses and eth.state == "up" and eth.carrier
    assert not any(a.startswith("fec0:") for a in eth.addresses)  # no autoconfiguration
    default = [r for r in state.routes if r.destination == "default"]
    assert default == [Route("default", "10.0.2.2", eth.name, "", "universe", 0, "static")]
    code, out, err = run(sb, "cat /etc/resolv.conf /etc/hosts; echo x >> /etc/hosts")
    assert "nameserver 10.0.2.3\n" in out
    assert "127.0.0.1\tlocalhost\n" in out
    assert code != 0 and "Read-only file system" in err  # the sandbox's, bound read-only


def test_host_reaches_a_container_through_the_published_port(
    sb: Sandbox, keep, published: int
) -> None:
    web_server(sb, keep, CONTAINER_PORT, "published-hello")
    assert _poll_get(f"http://127.0.0.1:{published}/", "the published port") == "published-hello\n"


def test_container_reaches_the_host_server_through_guestfwd(sb: Sandbox) -> None:
    assert http_get(sb, *GUESTFWD).startswith("hello from 127.0.0.1")


def test_restricted_user_network_reaches_nothing_else(sb: Sandbox) -> None:
    # The gateway (the host's slirp address) answers no connection: restrict=on.
    code, _, _ = run(sb, "nc -w 5 10.0.2.2 80 </dev/null || exit 3")
    assert code == 3


# --- a hot-plugged tap NIC -------------------------------------------------------------------


def test_hotplugged_tap_nic_carries_traffic_both_ways(sb: Sandbox, keep, test_netns: str) -> None:
    started = time.monotonic()
    nic, interface = sb.add_nic(f"tap,netns={test_netns}")
    plugged_s = time.monotonic() - started
    print(f"hot-plug to configured: {plugged_s:.2f} s")
    assert interface is not None and interface.addresses[0] == "10.88.0.2/24"
    assert interface.state == "up" and interface.carrier
    # A server in the test's namespace, on the tap's host end: only reachable through it.
    server_sock = _in_netns(test_netns, lambda: socket.create_server(("10.88.0.1", 0)))
    server = _serve(server_sock)
    try:
        port = server_sock.getsockname()[1]
        assert http_get(sb, "10.88.0.1", port) == "hello from 10.88.0.1 to 10.88.0.2\n"
    finally:
        server.shutdown()
        server_sock.close()
    # And the other way: the namespace reaches a container's server at the guest's address.
    web_server(sb, keep, 8081, "tap-hello")
    text = _in_netns(test_netns, lambda: _poll_get("http://10.88.0.2:8081/", "the tap server"))
    assert text == "tap-hello\n"
    assert [n.name for n in sb.nics()] == ["net0", nic.name]


# --- bad specs -------------------------------------------------------------------------------


def test_bad_specs_fail_clearly_and_leave_the_network_working(
    sb: Sandbox, keep, published: int
) -> None:
    web_server(sb, keep, CONTAINER_PORT, "still-here")
    assert _poll_get(f"http://127.0.0.1:{published}/", "the published port") == "still-here\n"
    nics = sb.nics()
    eth = sb.network.state().interface(nics[0].mac)
    before = sb.network.state()
    bad = [
        (
            NetworkSpec(interfaces=(Interface("52:54:00:de:ad:00", ("10.0.9.2/24",)),)),
            NotFound,
            "interfaces[0].mac: no interface with MAC 52:54:00:de:ad:00",
        ),
        (
            NetworkSpec(interfaces=(Interface(eth.mac, ("10.0.2.300/24",)),)),
            InvalidArgument,
            "interfaces[0].addresses[0]: '10.0.2.300/24' is not an address",
        ),
        (
            NetworkSpec(routes=(Route("10.50.0.0/16", device="eth9"),)),
            NotFound,
            "routes[0].device: no interface 'eth9'",
        ),
        (
            # Another NIC (the hot-plugged one, or this one again under a second entry).
            NetworkSpec(interfaces=(Interface(nics[-1].mac, ("10.0.2.15/24",)),))
            if len(nics) > 1
            else NetworkSpec(
                interfaces=(
                    Interface(eth.mac, ("10.0.2.15/24",)),
                    Interface(eth.mac.upper(), ()),
                )
            ),
            InvalidArgument,
            f"10.0.2.15 is already on {eth.name}" if len(nics) > 1 else "interfaces[1].mac: ",
        ),
        (
            # Valid on its face; the kernel refuses the gateway after the address moved.
            NetworkSpec(
                interfaces=(Interface(eth.mac, ("10.0.7.15/24",), mtu=1400),),
                routes=(Route("default", gateway="10.0.2.2"),),
            ),
            InvalidArgument,
            "routes[0]: ",
        ),
    ]
    for spec, error, message in bad:
        with pytest.raises(error) as err:
            sb.network.apply(spec, wait=0.5)
        assert message in str(err.value), str(err.value)
        assert sb.network.state() == before
    # The old configuration still works: the published port still leads to the container.
    assert _get(f"http://127.0.0.1:{published}/") == "still-here\n"


# --- the CLI ---------------------------------------------------------------------------------


def bulkhead(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bulkhead.cli", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_cli_network_ls_apply_and_run_publish(sb: Sandbox, state_dir: Path, tmp_path: Path) -> None:
    done = bulkhead(state_dir, "network", "ls", sb.name, "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert any("10.0.2.15/24" in i["addresses"] for i in listed["interfaces"])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"dns": {"nameservers": ["10.0.2.3"], "search": ["test"]}}))
    done = bulkhead(state_dir, "network", "apply", sb.name, str(spec))
    assert done.returncode == 0, done.stderr
    spec.write_text(json.dumps({"routes": [{"destination": "10.1.0.0/16", "device": "nope0"}]}))
    done = bulkhead(state_dir, "network", "apply", sb.name, str(spec))
    assert done.returncode == 1
    assert "routes[0].device: no interface 'nope0'" in done.stderr
    port = _free_port()
    done = bulkhead(
        state_dir, "run", "-d", "--sandbox", sb.name, "-p", f"{port}:8090", "--",
        "sh", "-c", "mkdir -p /w && echo cli-hello > /w/index.html && exec httpd -f -p 8090 -h /w",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    container = done.stdout.strip()
    try:
        assert _poll_get(f"http://127.0.0.1:{port}/", "run -p") == "cli-hello\n"
        _, out, _ = run(sb, "cat /etc/resolv.conf")
        assert "search test\n" in out
    finally:
        bulkhead(state_dir, "rm", "-f", sb.name, container)
