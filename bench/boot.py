"""Boot to agent ready, side by side with the floor, plus image size and guest memory.

    python bench/boot.py [--runs 5] [--image DIR] [--accel tcg]

The floor is the same kernel, same QEMU machine and same command line booting a
static busybox ``/init`` that only prints the uptime and powers off: nothing can
boot faster than that on this machine. Both are measured in the same run, and
both in two ways:

- guest: milliseconds from kernel start (CLOCK_BOOTTIME, as the guest sees it)
  to ready. For Bulkhead, "ready" is the agent's health turning SERVING; for the
  floor it is busybox reading /proc/uptime (10 ms resolution).
- host: wall time from starting QEMU to ready as the host sees it.

This is a benchmark, not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bulkhead import Sandbox
from bulkhead.qemu import QemuConfig, build_command, choose_accel
from bulkhead_image import compress, cpio
from bulkhead_image.cache import latest_image, load_image

FLOOR_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
echo "FLOOR-READY $up"
/bin/busybox poweroff -f
"""


def build_floor(workdir: Path, method: str) -> Path:
    busybox = shutil.which("busybox") or "/bin/busybox"
    entries = [
        cpio.directory("bin"),
        cpio.directory("dev"),
        cpio.directory("proc"),
        cpio.char_device("dev/console", 5, 1, 0o600),
        cpio.file("bin/busybox", Path(busybox), 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.file("init", FLOOR_INIT, 0o755),
    ]
    raw = workdir / "floor.cpio"
    raw.write_bytes(cpio.pack(entries))
    out = workdir / "floor.img"
    compress.compress(raw, out, method)
    return out


def boot_floor(image, initrd: Path, accel: str, workdir: Path) -> tuple[float, float]:
    """One floor boot: (guest ms from kernel start, host wall ms)."""
    cfg = QemuConfig(
        kernel=image.kernel,
        initrd=initrd,
        cmdline=image.manifest["cmdline"],
        memory_mib=512,
        cpus=1,
        accel=accel.accel,
        cpu=accel.cpu,
    )
    cmd = [*build_command(cfg, vhost_vsock=False), "-serial", "stdio"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir)
    assert proc.stdout is not None
    deadline = started + 120
    try:
        for line in proc.stdout:
            if line.startswith(b"FLOOR-READY"):
                wall = (time.monotonic() - started) * 1000
                guest = float(line.split()[1]) * 1000
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                return guest, wall
            if time.monotonic() > deadline:
                break
        raise RuntimeError("the floor never printed FLOOR-READY")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def boot_bulkhead(image, accel: str, state_dir: Path, i: int):
    started = time.monotonic()
    sb = Sandbox.up(
        f"bench{i}",
        image=image.path,
        memory_mib=512,
        cpus=1,
        accel=accel.accel,
        state_dir=state_dir,
    )
    wall = (time.monotonic() - started) * 1000
    try:
        details = sb.agent.guest_details()
    finally:
        sb.down(timeout=30)
    return details, wall


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    opts = parser.parse_args()

    image = load_image(opts.image) if opts.image else latest_image()
    if image is None:
        print("no image: run `bulkhead image build` first", file=sys.stderr)
        return 1
    accel = choose_accel(opts.accel, kernel=image.kernel)
    method = image.manifest.get("compression", compress.DEFAULT)

    with tempfile.TemporaryDirectory(prefix="bh-bench-") as tmp:
        work = Path(tmp)
        floor_img = build_floor(work, method)
        floor_size = floor_img.stat().st_size
        floor = [boot_floor(image, floor_img, accel, work) for _ in range(opts.runs)]
        ours = [boot_bulkhead(image, accel, work, i) for i in range(opts.runs)]

    floor_guest = statistics.median(g for g, _ in floor)
    floor_wall = statistics.median(w for _, w in floor)
    ready = statistics.median(d.boot.agent_ready_ms for d, _ in ours)
    wall = statistics.median(w for _, w in ours)
    init_ms = statistics.median(d.boot.init_started_ms for d, _ in ours)
    agent_ms = statistics.median(d.boot.agent_started_ms for d, _ in ours)

    print(
        f"accelerator: {accel.accel} ({accel.reason}); runs: {opts.runs}; "
        f"kernel {image.manifest['kernel_release']}"
    )
    print(
        f"initramfs: {mib(image.initramfs.stat().st_size)} ({method}); "
        f"floor initramfs {mib(floor_size)}"
    )
    print()
    print(f"{'boot to ready (median)':32} {'bulkhead':>10} {'floor':>10} {'ratio':>7}")
    print(
        f"{'guest: kernel start -> ready':32} {ready:8.0f}ms {floor_guest:8.0f}ms "
        f"{ready / floor_guest:6.2f}x"
    )
    print(
        f"{'host: QEMU start -> ready':32} {wall:8.0f}ms {floor_wall:8.0f}ms "
        f"{wall / floor_wall:6.2f}x"
    )
    print()
    print("where Bulkhead's boot time goes (median, guest clock):")
    print(f"  kernel start -> init      {init_ms:8.0f} ms")
    print(f"  init -> agent started     {agent_ms - init_ms:8.0f} ms")
    print(f"  agent started -> ready    {ready - agent_ms:8.0f} ms")
    print()
    print("guest memory after boot (last run):")
    details = ours[-1][0]
    for p in details.processes:
        print(
            f"  {p.name:8} pid {p.pid:<5} RSS {mib(p.rss_bytes):>10}  USS {mib(p.uss_bytes):>10}"
            f"  PSS {mib(p.pss_bytes):>10}  threads {p.threads}"
        )
    print("  aims: within 1.3x of the floor, init USS <= 8 MiB, agent USS <= 20 MiB")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
