"""TCP through the guest network and the time to apply a network spec, each beside a baseline.

    python bench/network.py [--runs 3] [--mib 16] [--image DIR] [--json]

One sandbox with four user-mode NICs from boot (restricted; the first publishes a port and
forwards one guest address to a sink on the host's loopback) and a tap NIC hot-plugged into
a network namespace made here. Measured, medians of ``--runs``:

- TCP throughput, ``--mib`` MiB each way: host -> container through the published port
  (slirp hostfwd) and container -> host through the guestfwd; the test namespace ->
  container and back through the tap NIC. Baselines in the same run: the same transfer over
  the host's loopback, and the container's stdout to the host through the agent's stdio
  channel (the path every byte of ``bulkhead run`` takes).
- applying a spec of 4 interfaces and 20 routes (alternating between two such specs, so
  that every run changes addresses, MTUs and routes) beside a no-op RPC round trip (health)
  and the same spec applied natively by the same agent code in a network namespace with
  veth stand-ins.
- the agent's first network request (pyroute2 imported then) against later ones, and the
  agent's memory before and after it.

This is a benchmark, not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulkhead import Sandbox, netns
from bulkhead.network import Interface, NetworkSpec, Route

MiB = 1024 * 1024
CONTAINER_PORT = 8080
TAP_PORT = 8081
HTTP_PORT = 8082  # httpd with a file: what the host fetches leaves the guest
GUESTFWD = ("10.0.2.100", 5000)
DEADLINE = 300.0


# --- sinks and sources -----------------------------------------------------------------------


class Sink:
    """A TCP server that reads each connection to EOF; (bytes, seconds first byte -> EOF)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.results: list[tuple[int, float]] = []
        self.done = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                total, first = 0, 0.0
                while chunk := conn.recv(1 << 20):
                    if not total:
                        first = time.perf_counter()
                    total += len(chunk)
            with self.done:
                self.results.append((total, time.perf_counter() - first))
                self.done.notify_all()

    def wait(self, count: int) -> tuple[int, float]:
        with self.done:
            if not self.done.wait_for(lambda: len(self.results) >= count, DEADLINE):
                raise TimeoutError("the sink got nothing")
            return self.results[count - 1]


def send(address: tuple[str, int], size: int, connect: Callable[..., socket.socket]) -> float:
    """Seconds from connecting to the receiver's end having read all ``size`` bytes (it closes
    when it has: our read sees EOF)."""
    block = b"\0" * (1 << 20)
    started = time.perf_counter()
    with connect(address, timeout=DEADLINE) as sock:
        left = size
        while left:
            sent = sock.send(block[: min(left, len(block))])
            left -= sent
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    return time.perf_counter() - started


def in_netns(name: str, fn: Callable[[], Any]) -> Any:
    out: list[Any] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns.netns_path(name), os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


# --- in the sandbox --------------------------------------------------------------------------


def receiver(sb: Sandbox, port: int) -> Any:
    """A container reading one connection on ``port`` to its end; returned once it listens.

    nc's stdin is a fifo the shell keeps open, so nc never half-closes first: the host sees
    EOF only when nc has read everything and exited.
    """
    script = (
        f"mkfifo /tmp/in; (nc -l -p {port} </tmp/in >/dev/null) & exec 3>/tmp/in; "
        f"while ! netstat -ltn | grep -q ':{port} '; do usleep 10000; done; echo ready; wait"
    )
    proc = sb.run(["sh", "-c", script])
    line = next(iter(proc.stdout))
    assert line == b"ready\n", line
    return proc


def container_sends(sb: Sandbox, host: str, port: int, size: int) -> None:
    """The container connects out and sends ``size`` bytes, busybox nc reading a file (from a
    pipe it is several times slower: its small buffer). The receiver times it."""
    blocks = size // (64 * 1024)
    script = (
        f"dd if=/dev/zero of=/tmp/big bs=64k count={blocks} 2>/dev/null; nc {host} {port} </tmp/big"
    )
    sb.run(["sh", "-c", script]).communicate(timeout=DEADLINE)


def file_server(sb: Sandbox, size: int) -> Any:
    """httpd serving /www/big (``size`` bytes): what the host fetches leaves the guest."""
    blocks = size // (64 * 1024)
    script = (
        f"mkdir -p /www && dd if=/dev/zero of=/www/big bs=64k count={blocks} 2>/dev/null && "
        f"echo ready && exec httpd -f -p {HTTP_PORT} -h /www"
    )
    proc = sb.run(["sh", "-c", script])
    assert next(iter(proc.stdout)) == b"ready\n"
    return proc


def fetch(address: tuple[str, int], size: int) -> float:
    """GET the file over HTTP/1.0: seconds from the first byte to EOF."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
        total, first = 0, 0.0
        while chunk := sock.recv(1 << 20):
            if not total:
                first = time.perf_counter()
            total += len(chunk)
    if total < size:
        raise RuntimeError(f"fetched {total} bytes of {size}")
    return time.perf_counter() - first


def stdio_seconds(sb: Sandbox, size: int) -> float:
    blocks = size // (64 * 1024)
    proc = sb.run(["dd", "if=/dev/zero", "bs=64k", f"count={blocks}"])
    first, total = 0.0, 0
    for chunk in proc.stdout:
        if not total:
            first = time.perf_counter()
        total += len(chunk)
    end = time.perf_counter()
    proc.wait(timeout=DEADLINE)
    assert total == blocks * 64 * 1024, total
    return end - first


# --- specs -----------------------------------------------------------------------------------


def four_by_twenty(macs: list[str], variant: int) -> NetworkSpec:
    """4 interfaces (addresses, MTU) and 20 routes (5 through each), in one of two variants."""
    interfaces = []
    routes = [Route("default", gateway="10.0.2.2")]
    for i, mac in enumerate(macs):
        subnet = 2 + i
        interfaces.append(
            Interface(
                mac,
                (f"10.0.{subnet}.15/24", f"fd00:{subnet}::{15 + variant}/64"),
                mtu=1500 - 100 * variant,
            )
        )
        for j in range(5 if i else 4):  # 19 + the default route = 20
            routes.append(
                Route(f"10.{100 + i}.{j + 10 * variant}.0/24", gateway=f"10.0.{subnet}.2")
            )
    return NetworkSpec(interfaces=tuple(interfaces), routes=tuple(routes))


def native_apply_seconds(runs: int) -> list[float]:
    """The same spec applied natively by the agent's own code, in a throwaway namespace."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "agent"), str(root / "init")]
    from bulkhead_agent.linux import namespaces as ns
    from bulkhead_agent.network import spec as specs
    from bulkhead_agent.network.apply import Network
    from bulkhead_agent.network.files import NameFiles

    macs = [f"52:54:00:be:00:0{i}" for i in range(4)]
    times: list[float] = []

    def inside() -> None:
        ns.unshare(ns.CLONE_NEWNET | ns.CLONE_NEWUTS)
        for i, mac in enumerate(macs):
            subprocess.run(
                ["nsenter", f"--net=/proc/{threading.get_native_id()}/ns/net", "ip", "link",
                 "add", f"v{i}", "address", mac, "type", "veth", "peer", "name", f"p{i}"],
                check=True,
            )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            files = NameFiles(tmp)
            files.prepare()
            network = Network(files, lambda message: None)

            async def go() -> None:
                for run in range(runs + 1):
                    request = specs.parse_apply(four_by_twenty(macs, run % 2).to_proto(0))
                    started = time.perf_counter()
                    await network.apply(request)
                    if run:  # the first one imports pyroute2
                        times.append(time.perf_counter() - started)

            asyncio.run(go())

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    return times


# --- main ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def agent_uss(sb: Sandbox) -> float:
    for p in sb.agent.guest_details().processes:
        if p.name == "agent":
            return p.uss_bytes / MiB
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=16, help="MiB per transfer (default 16)")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = args.mib * MiB
    runs = max(1, args.runs)

    sink = Sink(socket.create_server(("127.0.0.1", 0)))
    published_port, published_http = free_port(), free_port()
    guestfwd = f"tcp:{GUESTFWD[0]}:{GUESTFWD[1]}-127.0.0.1:{sink.port}"
    test_ns = f"bh-bench-{secrets.token_hex(3)}"
    netns.create(test_ns)
    nics = [f"user,guestfwd={guestfwd}"] + [f"user,subnet=10.0.{i}.0/24" for i in (3, 4, 5)]
    state_dir = Path(tempfile.mkdtemp(prefix="bh-bench-net-"))
    figures: dict[str, Any] = {}
    sb = Sandbox.up(
        f"bench-net-{os.getpid() % 10000}",
        image=args.image,
        memory_mib=512,
        state_dir=state_dir,
        nics=nics,
        publish=[f"{published_port}:{CONTAINER_PORT}", f"{published_http}:{HTTP_PORT}"],
        network=False,  # applied below, to time the first request
    )
    try:
        # --- the first network request, pyroute2's import with it ---
        uss_before = agent_uss(sb)
        started = time.perf_counter()
        sb.network.interfaces()
        cold = time.perf_counter() - started
        uss_after = agent_uss(sb)
        warm = []
        for _ in range(max(5, runs)):
            started = time.perf_counter()
            sb.network.interfaces()
            warm.append(time.perf_counter() - started)
        figures["first_request_ms"] = cold * 1000
        figures["later_request_ms"] = median(warm) * 1000
        figures["agent_uss_mib"] = (uss_before, uss_after)

        # --- applying 4 interfaces and 20 routes ---
        macs = [n.mac for n in sb.nics()]
        noop = []
        for _ in range(max(5, runs)):
            started = time.perf_counter()
            sb.agent.health()
            noop.append(time.perf_counter() - started)
        applies = []
        for run in range(runs * 2):
            spec = four_by_twenty(macs, (run + 1) % 2)
            started = time.perf_counter()
            sb.network.apply(spec)
            applies.append(time.perf_counter() - started)
        native = native_apply_seconds(runs * 2)
        figures["apply_ms"] = median(applies) * 1000
        figures["noop_rpc_ms"] = median(noop) * 1000
        figures["native_apply_ms"] = median(native) * 1000
        sb.network.apply(four_by_twenty(macs, 0))  # back to addresses the forwards expect

        # --- a tap NIC in the test namespace ---
        started = time.perf_counter()
        sb.add_nic(f"tap,netns={test_ns}")
        figures["hotplug_to_configured_s"] = time.perf_counter() - started

        # --- throughput ---
        keys = (
            "loopback", "stdio", "host_to_container_user", "container_to_host_user",
            "container_connects_out_user", "ns_to_container_tap", "container_to_ns_tap",
            "container_connects_out_tap",
        )  # fmt: skip
        results: dict[str, list[float]] = {k: [] for k in keys}
        ns_sink = in_netns(test_ns, lambda: Sink(socket.create_server(("10.88.0.1", 0))))
        server = file_server(sb, size)
        user_http = ("127.0.0.1", published_http)
        tap_http = ("10.88.0.2", HTTP_PORT)
        for _ in range(runs):
            count = len(sink.results)
            results["loopback"].append(
                send(("127.0.0.1", sink.port), size, socket.create_connection)
            )
            sink.wait(count + 1)
            results["stdio"].append(stdio_seconds(sb, size))
            # user-mode networking: published ports in, the guestfwd out
            proc = receiver(sb, CONTAINER_PORT)
            results["host_to_container_user"].append(
                send(("127.0.0.1", published_port), size, socket.create_connection)
            )
            proc.wait(timeout=DEADLINE)
            results["container_to_host_user"].append(fetch(user_http, size))
            container_sends(sb, *GUESTFWD, size)
            received, seconds = sink.wait(count + 2)
            results["container_connects_out_user"].append(
                seconds if received == size else float("nan")
            )
            # the tap NIC, from and to the test namespace
            proc = receiver(sb, TAP_PORT)
            results["ns_to_container_tap"].append(
                in_netns(
                    test_ns, lambda: send(("10.88.0.2", TAP_PORT), size, socket.create_connection)
                )
            )
            proc.wait(timeout=DEADLINE)
            results["container_to_ns_tap"].append(in_netns(test_ns, lambda: fetch(tap_http, size)))
            count = len(ns_sink.results)
            container_sends(sb, "10.88.0.1", ns_sink.port, size)
            received, seconds = ns_sink.wait(count + 1)
            results["container_connects_out_tap"].append(
                seconds if received == size else float("nan")
            )
        server.kill()
        figures["mib_per_s"] = {k: args.mib / median(v) for k, v in results.items()}
        match = re.search(r"network: pyroute2 loaded in (\d+) ms", sb.console_log())
        figures["guest_import_ms"] = float(match[1]) if match else float("nan")
    finally:
        sb.down(timeout=20)
        netns.delete(test_ns)
        shutil.rmtree(state_dir, ignore_errors=True)

    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    rates = figures["mib_per_s"]
    print(f"TCP throughput, {args.mib} MiB per transfer, median of {runs} (MiB/s):")
    print(f"  {'path':44} {'MiB/s':>8} {'vs loopback':>12} {'vs stdio':>9}")
    for key, label in (
        ("loopback", "baseline: host loopback"),
        ("stdio", "baseline: container stdout -> host (stdio)"),
        ("host_to_container_user", "host -> container (user: hostfwd)"),
        ("container_to_host_user", "container -> host (user: hostfwd, httpd)"),
        ("container_connects_out_user", "container -> host (user: guestfwd, nc)"),
        ("ns_to_container_tap", "netns -> container (tap)"),
        ("container_to_ns_tap", "container -> netns (tap, httpd)"),
        ("container_connects_out_tap", "container -> netns (tap, nc)"),
    ):
        rate = rates[key]
        print(
            f"  {label:44} {rate:8.1f} {rate / rates['loopback']:11.3f}x"
            f" {rate / rates['stdio']:8.2f}x"
        )
    print()
    print("applying a spec of 4 interfaces and 20 routes (median):")
    print(f"  ApplyNetwork                 {figures['apply_ms']:8.1f} ms")
    print(
        f"  baseline: no-op RPC          {figures['noop_rpc_ms']:8.1f} ms"
        f"   (apply is {figures['apply_ms'] / figures['noop_rpc_ms']:.1f}x)"
    )
    print(
        f"  baseline: same code natively {figures['native_apply_ms']:8.1f} ms"
        f"   (apply is {figures['apply_ms'] / figures['native_apply_ms']:.1f}x)"
    )
    print()
    before, after = figures["agent_uss_mib"]
    print("the first network request (pyroute2 imported lazily):")
    print(f"  pyroute2 import in the guest (the agent's log): {figures['guest_import_ms']:.0f} ms")
    print(
        f"  first {figures['first_request_ms']:.0f} ms, later {figures['later_request_ms']:.1f} ms;"
        f" agent USS {before:.1f} -> {after:.1f} MiB"
    )
    print(f"  hot-plugged tap NIC to configured: {figures['hotplug_to_configured_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
