"""Storage: hot-plug latency, and sequential reads from a container on each kind of storage.

    python bench/storage.py [--runs 5] [--image DIR] [--accel auto] [--read-mib 64]

One sandbox (hot-plug ports, shared memory for virtio-fs), measured in that one run:

- hot-plug: from QMP ``device_add`` of a virtio-blk disk to the agent's reply that it is
  mounted (host clock), and the part of it the agent spent waiting for the device (guest
  clock, from the request to the disk in sysfs). Medians over the runs.
- sequential read: ``dd`` of one file of ``--read-mib`` MiB to /dev/null inside a container,
  the file on: a hot-plugged ext4 disk, a virtio-fs share (when the host has virtiofsd), a
  9p share (given at boot, mounted afresh each run), and the baseline, a tmpfs in guest
  memory. Every storage is mounted afresh for each run, so no read comes from a warm guest
  page cache. Timed in the guest (/proc/uptime, 10 ms); ratios against the tmpfs baseline.

This is a benchmark, not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bulkhead import Sandbox
from bulkhead.errors import BulkheadError
from bulkhead.qemu import choose_accel
from bulkhead.sandbox_storage import find_virtiofsd
from bulkhead.storage import volume
from bulkhead_image.build import build_image
from bulkhead_image.cache import load_image

MiB = 1024 * 1024
# busybox has neither dd's byte-rate line nor date's %N: time with /proc/uptime (10 ms).
_READ = (
    'read a _ </proc/uptime; dd if="$1" of=/dev/null bs=1M 2>/dev/null || exit 1; '
    'read b _ </proc/uptime; wc -c <"$1"; echo "$a $b"'
)


def read_mib_s(sb: Sandbox, storage_id: str, path: str) -> float:
    """MiB/s of one sequential read of ``path`` in storage ``storage_id`` from a container."""
    proc = sb.run(["sh", "-c", _READ, "sh", f"/s/{path}"], volumes=[volume(storage_id, "/s")])
    out, err = proc.communicate(timeout=600)
    try:
        size, times = out.decode().strip().splitlines()
        start, end = (float(t) for t in times.split())
    except ValueError:
        raise BulkheadError(f"reading from {storage_id} failed: {(out + err).decode()}") from None
    return int(size) / MiB / max(end - start, 0.01)


def make_disk(work: Path, data: Path, size_mib: int) -> Path:
    """An ext4 image holding ``data`` (made with mkfs.ext4 -d, no loop mount)."""
    image = work / "read.img"
    with open(image, "wb") as f:
        f.truncate((size_mib + 32) * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(data.parent), str(image)], check=True)
    return image


def median(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f}" if values else "     n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", type=Path, help="default: the newest cached image")
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--read-mib", type=int, default=64, help="file size for reads, MiB")
    opts = parser.parse_args()

    image = load_image(opts.image) if opts.image else build_image(progress=lambda m: None)
    accel = choose_accel(opts.accel, kernel=image.kernel)
    plug_ms: list[float] = []
    wait_ms: list[float] = []
    reads: dict[str, list[float]] = {
        "ext4 disk": [],
        "virtio-fs": [],
        "9p": [],
        "tmpfs (baseline)": [],
    }
    notes: dict[str, str] = {}
    virtiofsd = find_virtiofsd()
    if virtiofsd is None:
        notes["virtio-fs"] = "no virtiofsd on this host"

    with tempfile.TemporaryDirectory(prefix="bh-bench-storage-") as tmp:
        work = Path(tmp)
        data = work / "share" / "data.bin"
        data.parent.mkdir()
        with open(data, "wb") as f:
            for _ in range(opts.read_mib):
                f.write(os.urandom(MiB))
        disk = make_disk(work, data, opts.read_mib)
        state_dir = work / "state"
        state_dir.mkdir()
        sb = Sandbox.up(
            "bench-storage", image=image.path, memory_mib=512 + 2 * opts.read_mib, cpus=1,
            accel=accel.accel, state_dir=state_dir, hotplug_ports=4, shared_memory=True,
            ninep_shares=[f"{data.parent}:bench9p:ro"],
        )  # fmt: skip
        try:
            for run in range(opts.runs + 1):  # run 0 warms the host's caches up; not counted
                counted = run > 0
                info = sb.add_disk(disk, "disk", readonly=True, timeout=30)
                if counted:
                    plug_ms.append((info.hotplug_seconds or 0.0) * 1000)
                    wait_ms.append(info.device_wait_ms)
                speed = read_mib_s(sb, "disk", data.name)
                sb.remove_disk("disk")
                if counted:
                    reads["ext4 disk"].append(speed)

                if virtiofsd is not None:
                    sb.add_share(data.parent, "share", readonly=True, timeout=30)
                    speed = read_mib_s(sb, "share", data.name)
                    sb.remove_share("share")
                    if counted:
                        reads["virtio-fs"].append(speed)

                sb.add_9p("bench9p", "p9", timeout=30)
                speed = read_mib_s(sb, "p9", data.name)
                sb.storage.remove("p9")
                if counted:
                    reads["9p"].append(speed)

                sb.storage.add("mem", "tmpfs", options=[f"size={opts.read_mib + 8}m"])
                fill = f"dd if=/dev/zero of=/s/{data.name} bs=1M count={opts.read_mib} 2>/dev/null"
                sb.run(["sh", "-c", fill], volumes=[volume("mem", "/s")]).wait(timeout=600)
                speed = read_mib_s(sb, "mem", data.name)
                sb.storage.remove("mem")
                if counted:
                    reads["tmpfs (baseline)"].append(speed)
                print(f"run {run}: done", flush=True)
        finally:
            sb.down(timeout=30)

    print()
    print(f"accelerator: {accel.accel} ({accel.reason}); {opts.runs} runs, medians")
    print(f"hot-plug: QMP device_add -> mounted (host)   {median(plug_ms)} ms")
    print(f"          of which the agent waited (guest)  {median(wait_ms)} ms")
    print()
    baseline = statistics.median(reads["tmpfs (baseline)"]) if reads["tmpfs (baseline)"] else 0
    print(f"sequential read of {opts.read_mib} MiB from a container (cold guest cache):")
    for name, values in reads.items():
        if not values:
            print(f"  {name:<18} n/a  ({notes.get(name, 'not measured')})")
            continue
        ratio = statistics.median(values) / baseline if baseline else 0.0
        print(f"  {name:<18} {median(values)} MiB/s   {ratio:5.2f}x tmpfs")
    if notes.get("virtio-fs"):
        print(f"  (virtio-fs: {notes['virtio-fs']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
