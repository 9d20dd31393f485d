"""``ctr run --rm /bin/true`` through containerd-shim-bulkhead-v2 against Debian's runc.

    python bench/shim.py [--runs 5]

Runs a private containerd (``qemu-test/containerd_support.py``) with a local busybox image,
and times, runs interleaved, the whole ``ctr run --rm`` of ``/bin/true`` with each runtime,
as a user of ``ctr`` waits for it. Where Bulkhead's time goes comes from the shim's own
timing lines in containerd's log (``create ID timings: ...`` and ``delete ID timings: ...``):
the rootfs mount, the VM's boot, the virtio-fs share of the rootfs, the container's creation
in the guest, and taking the VM down; the rest is containerd, ctr, the shim's start and the
task's start, wait and delete calls.

This is a benchmark, not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qemu-test"))

import containerd_support as cs

RUNTIME = "io.containerd.bulkhead.v2"
TIMINGS = re.compile(r"(create|delete) (\S+) timings: ([^\"\n]*)")
PHASES = ("rootfs", "vm_boot", "share", "container", "vm_down")


def timed_run(ctrd: cs.Containerd, ref: str, cid: str, runtime: str) -> float:
    started = time.monotonic()
    res = ctrd.run(ref, cid, "/bin/true", runtime=runtime, check=False, timeout=300)
    elapsed = (time.monotonic() - started) * 1000
    if res.returncode != 0:
        raise SystemExit(f"{runtime}: ctr run failed ({res.returncode}): {res.stderr.decode()}")
    return elapsed


def phases(log: str, cid: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for match in TIMINGS.finditer(log):
        if match[2] == cid:
            for item in match[3].split():
                name, _, value = item.partition("=")
                found[name] = float(value.removesuffix("ms"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    if (why := cs.containerd_available()) is not None:
        raise SystemExit(f"cannot run: {why}")
    work = Path(tempfile.mkdtemp(prefix="bh-bshim-", dir="/tmp"))
    os.environ.setdefault("BULKHEAD_STATE_DIR", str(work / "sb"))
    os.environ.setdefault("BULKHEAD_SHIM_DIR", str(work / "shim"))
    try:
        report(*measure(work, opts.runs), opts.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def measure(work: Path, runs: int) -> tuple[list[float], list[float], dict[str, list[float]]]:
    ours: list[float] = []
    runc: list[float] = []
    breakdown: dict[str, list[float]] = {p: [] for p in PHASES}
    with cs.Containerd(work / "c") as ctrd:
        ref = cs.import_image(ctrd, cs.build_busybox_image(work / "oci"))
        timed_run(ctrd, ref, "warm-runc", cs.RUNC_RUNTIME)  # page cache, first-run costs
        for i in range(runs):
            runc.append(timed_run(ctrd, ref, f"runc-{i}", cs.RUNC_RUNTIME))
            ours.append(timed_run(ctrd, ref, f"bh-{i}", RUNTIME))
            cs.wait_for(lambda i=i: f"delete bh-{i} timings" in ctrd.log_path.read_text(),
                        timeout=30, what="the shim's timings in containerd's log")  # fmt: skip
            got = phases(ctrd.log_path.read_text(errors="replace"), f"bh-{i}")
            for name in PHASES:
                breakdown[name].append(got.get(name, 0.0))
    return ours, runc, breakdown


def report(
    ours: list[float], runc: list[float], breakdown: dict[str, list[float]], runs: int
) -> None:
    total, base = statistics.median(ours), statistics.median(runc)
    print(f"\nctr run --rm /bin/true, {runs} runs each, medians")
    print(f"  {'':28} {'bulkhead':>10} {'runc':>10} {'ratio':>7}")
    print(f"  {'whole run':28} {total:8.0f}ms {base:8.0f}ms {total / base:6.2f}x")
    print("\nwhere bulkhead's time goes (median ms, share of the whole run)")
    accounted = 0.0
    for name in PHASES:
        value = statistics.median(breakdown[name])
        accounted += value
        print(f"  {name:28} {value:8.0f}ms {value / total:6.0%}")
    rest = total - accounted
    print(f"  {'containerd, ctr, shim, RPCs':28} {rest:8.0f}ms {rest / total:6.0%}")
    print("\nall runs (ms)")
    print("  bulkhead " + " ".join(f"{v:7.0f}" for v in ours))
    print("  runc     " + " ".join(f"{v:7.0f}" for v in runc))


if __name__ == "__main__":
    raise SystemExit(main())
