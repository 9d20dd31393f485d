"""The real guest over vsock through the userspace vhost-user-vsock backend.

This host has no /dev/vhost-vsock, so the guest's vsock device is QEMU's
vhost-user-vsock-pci served by ``python -m bulkhead.vhost_vsock``; the host
reaches the agent's vsock port through the backend's hybrid vsock socket
(``HybridVsockTransport``), and grpcio dials it through a ``UnixRelay``, the
way the monitor serves agent.sock. One VM for the whole module: boots under
TCG are slow and the machine is shared.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import wait_for

from bulkhead import AgentClient
from bulkhead.errors import TransportError
from bulkhead.qemu import QemuConfig, build_command, choose_accel, kernel_cmdline
from bulkhead.relay import UnixRelay
from bulkhead.storage import StorageClient
from bulkhead.transport import HybridVsockTransport

GUEST_CID = 42
AGENT_PORT = 1024
BOOT_TIMEOUT = 120.0


@dataclass
class VsockVm:
    dir: Path
    uds: Path
    agent_sock: Path
    backend: subprocess.Popen[bytes]
    qemu: subprocess.Popen[bytes]
    client: AgentClient

    def logs(self) -> str:
        out = []
        for name in ("backend.log", "qemu.log", "console.log"):
            path = self.dir / name
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"--- {name} (tail) ---\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(out)


def _stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            print(f"{name} ignored SIGTERM: killing it")
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def vm(image, request: pytest.FixtureRequest) -> Iterator[VsockVm]:
    # Unix socket paths are limited to 108 bytes: a short directory of our own.
    tmp = Path(f"/tmp/bh-vv-{os.getpid()}")
    tmp.mkdir(mode=0o700, exist_ok=True)
    vu_sock, uds, agent_sock = tmp / "vhost.sock", tmp / "vsock", tmp / "agent.sock"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with open(tmp / "backend.log", "wb") as log:
        backend = subprocess.Popen(
            [sys.executable, "-m", "bulkhead.vhost_vsock", "--socket", str(vu_sock),
             "--cid", str(GUEST_CID), "--uds-path", str(uds),
             "--log-level", os.environ.get("BULKHEAD_VSOCK_LOG", "INFO")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )  # fmt: skip
    qemu = None
    relay = None
    client = None
    try:
        # QEMU asks the backend for the device configuration as it starts: the
        # socket must be listening first.
        wait_for(lambda: vu_sock.exists() or backend.poll() is not None, 15, "the backend socket")
        assert backend.poll() is None, (tmp / "backend.log").read_text()
        choice = choose_accel(
            os.environ.get("BULKHEAD_ACCEL", "auto"),
            kernel=Path(image.kernel),
            cache_file=Path("/tmp/bh-vv-kvm-verdict.json"),
        )
        # The debug console's shell lets the tests start guest-side vsock clients.
        options = {
            "serial_port": "off",
            "vsock_port": AGENT_PORT,
            "hostname": "vsockbe",
            "debug_console": True,
        }
        cfg = QemuConfig(
            kernel=Path(image.kernel),
            initrd=Path(image.initramfs),
            cmdline=kernel_cmdline(image.manifest.get("cmdline", ""), options),
            memory_mib=512,
            cpus=1,
            name="vsockbe",
            console_log=tmp / "console.log",
            console_socket=tmp / "console.sock",
            shared_memory=True,
            vhost_user_vsock_socket=vu_sock,
        ).with_accel(choice)
        with open(tmp / "qemu.log", "wb") as log:
            qemu = subprocess.Popen(
                build_command(cfg, vhost_vsock=False),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        relay = UnixRelay(HybridVsockTransport(uds, AGENT_PORT), agent_sock).start()
        client = AgentClient(agent_sock, timeout=20)
        vm = VsockVm(tmp, uds, agent_sock, backend, qemu, client)
        started = time.monotonic()
        try:
            client.wait_ready(BOOT_TIMEOUT)
        except Exception as exc:
            raise AssertionError(f"agent not ready over vsock: {exc}\n{vm.logs()}") from exc
        print(f"agent ready over the vsock backend {time.monotonic() - started:.1f}s after boot")
        yield vm
        assert backend.poll() is None, f"the backend died\n{vm.logs()}"
        backend_log = (tmp / "backend.log").read_text(errors="replace")
        assert "Traceback" not in backend_log and " ERROR " not in backend_log, vm.logs()
    finally:
        if client is not None:
            client.close()
        if relay is not None:
            relay.close()
        if qemu is not None:
            _stop(qemu, "QEMU")
        _stop(backend, "the backend")
        if request.session.testsfailed:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def test_health_over_vsock_and_its_round_trip(vm: VsockVm) -> None:
    assert vm.client.health() == "SERVING"
    details = vm.client.guest_details()
    assert "vsock" in details.features
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert vm.client.health() == "SERVING"
        times.append(time.perf_counter() - t0)
    print(f"health RPC over vsock: median {statistics.median(times) * 1000:.1f} ms, "
          f"min {min(times) * 1000:.1f} ms")  # fmt: skip


def test_many_connections_at_once(vm: VsockVm) -> None:
    # Each channel is its own vsock connection (a local subchannel pool, as AgentClient has).
    # Not AgentClient itself: its grpc.min_reconnect_backoff_ms=100 is also gRPC's minimum
    # connect timeout, and eight vsock handshakes at once under TCG take longer than 100 ms
    # (gRPC then gives up with "timed out before receiving SETTINGS frame"; see the report).
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(f"unix:{vm.agent_sock}", options=options) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(5):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, f"{errors}\n{vm.logs()}"
    assert vm.client.health() == "SERVING"


def test_bulk_copy_into_the_guest(vm: VsockVm) -> None:
    size = 16 * 1024 * 1024
    data = os.urandom(size)
    storage = StorageClient(vm.client.channel, timeout=120)
    t0 = time.perf_counter()
    path = storage.copy_file(data, "", "vsock-bulk.bin")
    elapsed = time.perf_counter() - t0
    print(
        f"CopyFile of {size >> 20} MiB over vsock: {elapsed:.2f}s, {size / elapsed / 1e6:.1f} MB/s"
    )
    assert path
    assert vm.client.health() == "SERVING"


def test_refused_port_and_bad_requests(vm: VsockVm) -> None:
    # Nobody listens on guest port 5555: the guest resets our REQUEST.
    with pytest.raises(TransportError, match="refused"):
        HybridVsockTransport(vm.uds, 5555).connect(timeout=30)
    # A request that is not a CONNECT line is closed without an answer.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(vm.uds))
        sock.sendall(b"HELLO there\n")
        assert sock.recv(64) == b""
    assert vm.client.health() == "SERVING"


def run_in_guest(
    vm: VsockVm, command: str, markers: list[str], timeout: float = 120.0
) -> dict[str, str]:
    """Type ``command`` into the guest's debug shell; the console lines starting with ``markers``.

    Output reaches only a connected console client, so the command is sent and its
    output read on one connection.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(vm.dir / "console.sock"))
        sock.sendall(command.encode() + b"\n")
        # QEMU copies the console output to us as well: read it until the answer.
        seen = b""
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            # Whole lines only: a recv can end in the middle of one.
            for line in seen.decode(errors="replace").split("\n")[:-1]:
                for marker in markers:
                    if line.startswith(marker):  # the command's echo starts otherwise
                        found[marker] = line.strip()
            if len(found) == len(markers):
                return found
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not all of {markers} on the console\n{vm.logs()}"
            sock.settimeout(remaining)
            seen += sock.recv(65536)


def test_guest_connects_to_a_host_socket_and_streams_to_it(vm: VsockVm) -> None:
    size = 16 * 1024 * 1024
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{vm.uds}_5000")
    listener.listen(1)
    listener.settimeout(120)
    result: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            total, start = 0, None
            while chunk := conn.recv(1 << 20):
                start = start or time.perf_counter()
                total += len(chunk)
            assert start is not None
            result["seconds"] = time.perf_counter() - start
            result["bytes"] = total
            conn.sendall(f"got {total}".encode())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with listener:
        # In the guest: connect to the host (CID 2) port 5000, send 16 MiB, half-close,
        # print the host's answer; then try port 5001, where nothing listens.
        lines = run_in_guest(
            vm,
            "/usr/bin/python3 -c 'import socket as S;s=S.socket(S.AF_VSOCK,S.SOCK_STREAM);"
            f"s.connect((2,5000));b=bytes(65536);[s.sendall(b) for _ in range({size >> 16})];"
            's.shutdown(S.SHUT_WR);print("VSOCK"+"-OK",s.recv(64).decode());'
            'r=S.socket(S.AF_VSOCK,S.SOCK_STREAM);print("VSOCK"+"-REFUSED",r.connect_ex((2,5001)))\'',
            ["VSOCK-OK", "VSOCK-REFUSED"],
        )
        server.join(60)
    assert lines["VSOCK-OK"] == f"VSOCK-OK got {size}"
    assert result["bytes"] == size
    seconds = result["seconds"]
    assert isinstance(seconds, float)
    print(f"guest to host over vsock: {size >> 20} MiB in {seconds:.2f}s, "
          f"{size / seconds / 1e6:.1f} MB/s")  # fmt: skip
    assert lines["VSOCK-REFUSED"].split()[-1] == "104"  # ECONNRESET: the backend's RST


def test_host_streams_to_a_guest_listener(vm: VsockVm) -> None:
    size = 16 * 1024 * 1024
    sent: dict[str, float] = {}

    def send() -> None:
        # Refused until the guest's listener is up: retry on a deadline.
        deadline = time.monotonic() + 60
        while True:
            try:
                sock = HybridVsockTransport(vm.uds, 6000).connect(timeout=10)
                break
            except TransportError:
                assert time.monotonic() < deadline, "the guest listener never came up"
                time.sleep(0.2)
        with sock:
            t0 = time.perf_counter()
            sock.sendall(bytes(size))
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""  # the guest read it all and closed
            sent["seconds"] = time.perf_counter() - t0

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    lines = run_in_guest(
        vm,
        "/usr/bin/python3 -c 'import socket as S;l=S.socket(S.AF_VSOCK,S.SOCK_STREAM);"
        "l.bind((S.VMADDR_CID_ANY,6000));l.listen(1);c,a=l.accept();"
        'n=sum(len(b) for b in iter(lambda:c.recv(1<<20),b""));c.close();'
        'print("VSOCK"+"-GOT",n,a[0])\'',
        ["VSOCK-GOT"],
    )
    sender.join(60)
    assert lines["VSOCK-GOT"] == f"VSOCK-GOT {size} 2"  # all of it, from the host's CID
    seconds = sent["seconds"]
    print(f"host to guest over vsock: {size >> 20} MiB in {seconds:.2f}s, "
          f"{size / seconds / 1e6:.1f} MB/s")  # fmt: skip
