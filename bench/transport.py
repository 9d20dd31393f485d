"""The agent's channel: vsock through the userspace backend against virtio-serial.

    python bench/transport.py [--runs 5] [--image DIR] [--mib 16] [--rtt-calls 100]

Boots two sandboxes from the same image with ``bulkhead.bench=1``, one whose agent is
reached over virtio-serial (the mux, the monitor's relay) and one over vsock (QEMU's
vhost-user-vsock-pci served by ``bulkhead.vhost_vsock``, hybrid vsock, the same relay),
and measures both in the same run, their runs interleaved. vsock is the figure, serial
the baseline, and the ratio is vsock / serial:

- boot: ``Sandbox.up`` to agent ready, host wall clock (sequential, one VM at a time).
- health RTT: one gRPC health check on an open channel, median of ``--rtt-calls``.
- raw guest -> host: N zero bytes from the agent's bench-only source (no gRPC): the
  channel alone. Over serial through the agent socket and the mux (the magic prefix);
  over vsock on the agent's port + 1 through the hybrid socket (``Sandbox.connect_vsock``).
- stdio guest -> host: ``head -c N /dev/zero`` in a container read through
  ``Sandbox.run`` (gRPC Attach with acks): what a user's container output gets.
- CopyFile host -> guest: N random bytes into the guest (gRPC client stream).

Throughput is from the first byte to the last, MB/s (10^6). The idle VM of the pair
costs almost nothing while the other is measured. This is a benchmark, not a test: it
prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bulkhead import Sandbox
from bulkhead_image.build import build_image
from bulkhead_image.cache import load_image

RAW_MAGIC = b"BULKHEAD-BENCH-RAW\n"  # as bulkhead_agent.bridge.bench_raw
RAW_VSOCK_PORT = 1025  # the agent's vsock port + 1, with bulkhead.bench=1
TRANSPORTS = ("serial", "vsock")


def stream_rate(chunks: Iterator[bytes], expected: int) -> float:
    """MB/s from the first chunk to the end (the first chunk's bytes are not counted)."""
    first = next(chunks)
    start = time.perf_counter()
    total = len(first)
    for chunk in chunks:
        total += len(chunk)
    seconds = time.perf_counter() - start
    if total != expected:
        raise RuntimeError(f"got {total} bytes, expected {expected}")
    return (total - len(first)) / seconds / 1e6


def _recv_all(sock: socket.socket) -> Iterator[bytes]:
    with sock:
        while data := sock.recv(1 << 20):
            yield data


def raw_rate(sb: Sandbox, size: int) -> float:
    if sb.transport == "serial":
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(sb.agent_socket))
    else:
        sock = sb.connect_vsock(RAW_VSOCK_PORT, timeout=30)
    sock.sendall(RAW_MAGIC + b"%d\n" % size)
    return stream_rate(_recv_all(sock), size)


def stdio_rate(sb: Sandbox, size: int) -> float:
    proc = sb.run(["head", "-c", str(size), "/dev/zero"])
    rate = stream_rate((o.data for o in proc.output() if o.stream == "stdout"), size)
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"head exited with {proc.exit}")
    return rate


def copy_rate(sb: Sandbox, data: bytes) -> float:
    start = time.perf_counter()
    sb.storage.copy_file(data, "", "bench-copy.bin")
    return len(data) / (time.perf_counter() - start) / 1e6


def rtt_ms(sb: Sandbox, calls: int) -> float:
    agent = sb.agent
    agent.health()  # the channel is open before the clock starts
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        agent.health()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


ROWS: tuple[tuple[str, str, str, str], ...] = (
    # (figure, label, unit, which way is better)
    ("boot", "boot: up() to agent ready", "s", "lower"),
    ("rtt", "health RPC round trip (median)", "ms", "lower"),
    ("raw", "raw guest -> host (no gRPC)", "MB/s", "higher"),
    ("stdio", "container stdout -> host (Attach)", "MB/s", "higher"),
    ("copy", "CopyFile host -> guest", "MB/s", "higher"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", type=Path, help="default: the cached image, built if need be")
    parser.add_argument("--mib", type=int, default=16, help="bytes per throughput run, MiB")
    parser.add_argument("--rtt-calls", type=int, default=100)
    opts = parser.parse_args()

    if opts.image:
        image = load_image(opts.image)
    else:
        image = build_image(progress=lambda m: print(f"image: {m}", flush=True))
    size = opts.mib * 2**20
    data = os.urandom(size)
    figures: dict[tuple[str, str], list[float]] = {}

    def keep(name: str, via: str, value: float) -> None:
        figures.setdefault((name, via), []).append(value)

    def boot(via: str, i: int) -> Sandbox:
        sb = Sandbox.up(
            f"bench-tr-{via}-{os.getpid() % 10000}-{i}",
            image=image.path,
            transport=via,
            extra_cmdline=["bulkhead.bench=1"],
        )
        assert sb.boot_seconds is not None
        return sb

    # Boot time: each transport a few times, alternately, one VM at a time.
    for i in range(max(1, min(opts.runs, 3))):
        for via in TRANSPORTS:
            sb = boot(via, i)
            keep("boot", via, sb.boot_seconds or 0.0)
            print(f"boot {via}: {sb.boot_seconds:.1f} s ({sb.transport})", flush=True)
            sb.down()

    sandboxes = {via: boot(via, 99) for via in TRANSPORTS}
    try:
        features = {via: sb.agent.guest_details().features for via, sb in sandboxes.items()}
        if "bench-raw" not in features["serial"] or "bench-raw-vsock" not in features["vsock"]:
            raise RuntimeError(f"the agents offer no raw source (features: {features})")
        measures: dict[str, Callable[[Sandbox], float]] = {
            "rtt": lambda sb: rtt_ms(sb, opts.rtt_calls),
            "raw": lambda sb: raw_rate(sb, size),
            "stdio": lambda sb: stdio_rate(sb, size),
            "copy": lambda sb: copy_rate(sb, data),
        }
        for i in range(opts.runs + 1):  # run 0 warms up and is not counted
            for name, measure in measures.items():
                for via, sb in sandboxes.items():
                    value = measure(sb)
                    if i > 0:
                        keep(name, via, value)
            print(f"run {i} done", flush=True)
    finally:
        for sb in sandboxes.values():
            sb.down()

    report(figures, opts)
    return 0


def report(figures: dict[tuple[str, str], list[float]], opts: argparse.Namespace) -> None:
    print()
    print(f"transport benchmark: {opts.runs} runs, {opts.mib} MiB per throughput run")
    print(f"  {'median':36} {'vsock':>12} {'serial':>12} {'vsock/serial':>13}")
    for name, label, unit, better in ROWS:
        vsock = statistics.median(figures[(name, "vsock")])
        serial = statistics.median(figures[(name, "serial")])
        ratio = vsock / serial
        wins = ratio < 1 if better == "lower" else ratio > 1
        print(
            f"  {label:36} {vsock:8.1f} {unit:<4}{serial:8.1f} {unit:<4} {ratio:8.2f}x  "
            f"({better} is better: {'vsock' if wins else 'serial'} wins)"
        )
    print()
    print("all runs:")
    for (name, via), values in figures.items():
        print(f"  {name:6} {via:7} " + " ".join(f"{v:8.1f}" for v in values))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
