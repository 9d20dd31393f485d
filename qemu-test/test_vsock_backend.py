"""The real guest over vsock through the userspace vhost-user-vsock backend.

This host has no /dev/vhost-vsock, so ``Sandbox.up(transport="vhost-user-vsock")``
gives the guest QEMU's vhost-user-vsock-pci device served by
``python -m bulkhead.vhost_vsock``, which the sandbox's monitor starts before QEMU;
the monitor reaches the agent's vsock port through the backend's hybrid vsock
socket, and these tests use that socket directly too (``Sandbox.connect_vsock``).
The agent checks shared with virtio-serial run over both in the other modules (the
``sandbox`` fixture is parametrised); these are the vsock-only ones. One VM for the
whole module: boots under TCG are slow and the machine is shared.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bulkhead import AgentClient, Sandbox
from bulkhead.errors import TransportError
from bulkhead.spec import make_spec
from bulkhead.storage import StorageClient
from bulkhead.transport import HybridVsockTransport

AGENT_PORT = 1024


class VsockVm:
    """The sandbox, and the paths of its vsock backend."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.dir = sb.dir
        self.uds = sb.paths.vsock_uds
        self.agent_sock = sb.agent_socket
        self.client = AgentClient(sb.agent_socket, timeout=20)

    def logs(self) -> str:
        out = []
        for name in ("monitor.log", "console.log"):
            path = self.dir / name
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"--- {name} (tail) ---\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(out)


@pytest.fixture(scope="module")
def vm(image, state_dir: Path) -> Iterator[VsockVm]:
    # The debug console's shell lets the tests start guest-side vsock clients.
    sb = Sandbox.up(
        f"vsockbe-{os.getpid() % 10000}",
        image=image.path,
        memory_mib=512,
        state_dir=state_dir,
        transport="vhost-user-vsock",
        debug_console=True,
    )
    vm = VsockVm(sb)
    backend_pid = sb._state()["vsock_backend_pid"]
    try:
        print(f"agent ready over the vsock backend {sb.boot_seconds:.1f}s after up()")
        yield vm
        assert psutil.pid_exists(backend_pid), f"the backend died\n{vm.logs()}"
        monitor_log = sb.paths.monitor_log.read_text(errors="replace")
        assert "Traceback" not in monitor_log and " ERROR " not in monitor_log, vm.logs()
    finally:
        vm.client.close()
        sb.down(timeout=20)
    # The backend goes with the sandbox, and its sockets with it.
    assert not psutil.pid_exists(backend_pid) or psutil.Process(backend_pid).status() == "zombie"
    assert not sb.paths.vsock_uds.exists()


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
    # Each AgentClient is its own connection: sixteen vsock streams through the backend at
    # once, every handshake racing the others on the one emulated vCPU.
    errors: list[BaseException] = []
    done = [0] * 16

    def worker(i: int) -> None:
        try:
            with AgentClient(vm.agent_sock, timeout=60) as client:
                for _ in range(5):
                    assert client.health() == "SERVING"
                    done[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(done))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, f"{errors}\n{vm.logs()}"
    assert done == [5] * len(done)
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


# A container's attempt to reach the agent's vsock port from inside the guest: vsock
# loopback (CID 1) and the guest's own CID, then a port nobody listens on. Prints what
# each gave: "ok N" (connected, then N bytes of answer before the connection ended),
# or the errno of a failed connect.
_PROBE = """
import socket as S, sys
for cid, port in ((1, 1024), (int(sys.argv[1]), 1024), (1, 1025)):
    s = S.socket(S.AF_VSOCK, S.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect((cid, port))
    except OSError as e:
        print(cid, port, "errno", e.errno)
        continue
    got = b""
    try:
        # An HTTP/2 preface and an empty SETTINGS frame: a gRPC server would answer.
        s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        while chunk := s.recv(4096):
            got += chunk
    except OSError:
        pass
    print(cid, port, "ok", len(got))
"""


def test_containers_cannot_reach_the_agent_over_vsock_loopback(vm: VsockVm) -> None:
    cid = vm.sb._state()["qemu"]["vsock_cid"]
    # The busybox root, with the guest's own python3 (its /usr, and /lib and /lib64 for
    # the loader and libc) bound in read-only.
    spec = make_spec(["/usr/bin/python3", "-c", _PROBE, str(cid)])
    spec["mounts"] += [
        {"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]}
        for d in ("/usr", "/lib", "/lib64")
    ]
    proc = vm.sb.run(spec=spec)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    # The agent accepted (so the connect succeeded), saw a peer that is not the host and
    # dropped the connection without a byte of gRPC.
    assert lines[0] == "1 1024 ok 0", lines
    assert lines[1] == f"{cid} 1024 ok 0", lines
    assert lines[2] == "1 1025 errno 104", lines  # the control: nobody listens there
    log = vm.sb.console_log()
    # Both went over vsock loopback, which gives its connections CID 1 at either end.
    assert log.count("refused vsock connection from cid 1") == 2, log[-2000:]
    assert vm.client.health() == "SERVING"  # and the host's channel is untouched
