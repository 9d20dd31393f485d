"""GetMetrics latency and payload size with 0, 10 and 50 containers, beside a baseline.

    python bench/metrics.py [--runs 20] [--counts 0,10,50] [--image DIR] [--accel tcg]

One sandbox is booted; containers (``sleep``, each in its own cgroup) are added between
rounds. In each round the same channel times a health check (the cheapest RPC: the floor of
any call through the transport) and GetMetrics, alternately, ``--runs`` times each; the table
gives medians and GetMetrics as a multiple of the baseline. The agent's own time per
GetMetrics (from its RPC histogram) and the payload size (uncompressed, and gzipped as a
Prometheus server would fetch it) come beside it. The first GetMetrics of the sandbox is
reported apart: it imports prometheus_client in the guest.

Kata's figure for reference: about 3 ms and 135 KB (uncompressed) per sandbox.

This is a benchmark, not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bulkhead import Sandbox
from bulkhead_image.cache import latest_image

KATA_MS, KATA_KB = 3.0, 135.0
MiB = 1024 * 1024


def timed(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def agent_rss(sb: Sandbox) -> int:
    for p in sb.agent.guest_details().processes:
        if p.name == "agent":
            return p.rss_bytes
    return 0


def agent_side_ms(text: str) -> tuple[float, int]:
    """Total milliseconds and count of GetMetrics calls, from the agent's own histogram."""
    total, count = 0.0, 0
    for family in text_string_to_metric_families(text):
        if family.name != "bulkhead_agent_rpc_duration_seconds":
            continue
        for s in family.samples:
            if s.labels.get("method") != "bulkhead.v1.Telemetry/GetMetrics":
                continue
            if s.name.endswith("_sum"):
                total = s.value * 1000
            elif s.name.endswith("_count"):
                count = int(s.value)
    return total, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--counts", default="0,10,50", help="containers in each round")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB")
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.counts.split(","))
    image = args.image or (latest_image().path if latest_image() else None)
    if image is None:
        print("no image: run `bulkhead image build` first", file=sys.stderr)
        return 1

    name = f"bench-metrics-{os.getpid()}"
    sb = Sandbox.up(name, image=image, memory_mib=args.memory, cpus=args.cpus, accel=args.accel)
    try:
        status = sb.status()
        print(f"sandbox {name}: {status.accel}, {args.cpus} CPU, {args.memory} MiB; image {image}")
        rss_before = agent_rss(sb)
        first_ms, text = timed(sb.metrics)
        rss_after = agent_rss(sb)
        setup_s = next(
            s.value
            for f in text_string_to_metric_families(text)  # type: ignore[arg-type]
            for s in f.samples
            if s.name == "bulkhead_agent_metrics_setup_seconds"
        )
        print(
            f"first GetMetrics: {first_ms:.0f} ms, of which importing prometheus_client and "
            f"building the registry {setup_s * 1000:.0f} ms; agent RSS "
            f"{rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB"
        )
        print()
        header = (
            f"{'containers':>10} {'health ms':>10} {'metrics ms':>11} {'ratio':>6} "
            f"{'in agent ms':>12} {'KB':>7} {'gzip KB':>8} {'series':>7}"
        )
        print(header)
        made = 0
        rows = []
        for count in counts:
            while made < count:
                c = sb.create_container(["sleep", "1d"], name=f"m{made}")
                c.start()
                made += 1
            health, metrics = [], []
            before_ms, before_n = agent_side_ms(sb.metrics())
            for _ in range(args.runs):
                health.append(timed(sb.agent.health)[0])
                ms, text = timed(sb.metrics)
                metrics.append(ms)
            after_ms, after_n = agent_side_ms(text)  # type: ignore[arg-type]
            # The last scrape's own duration is not in its histogram yet: runs - 1 calls.
            in_agent = (after_ms - before_ms) / max(1, after_n - before_n)
            raw = text.encode()  # type: ignore[union-attr]
            lines = sum(1 for line in raw.splitlines() if line and not line.startswith(b"#"))
            h, m = statistics.median(health), statistics.median(metrics)
            rows.append((count, m, len(raw)))
            print(
                f"{count:>10} {h:>10.1f} {m:>11.1f} {m / h:>6.1f} {in_agent:>12.1f} "
                f"{len(raw) / 1000:>7.1f} {len(gzip.compress(raw)) / 1000:>8.1f} {lines:>7}"
            )
        if len(rows) > 1 and rows[-1][0] > rows[0][0]:
            (n0, m0, b0), (n1, m1, b1) = rows[0], rows[-1]
            per = n1 - n0
            print()
            print(
                f"per container: +{(m1 - m0) / per:.2f} ms, +{(b1 - b0) / per / 1000:.2f} KB "
                f"(Kata, per sandbox: ~{KATA_MS:g} ms, ~{KATA_KB:g} KB)"
            )
    finally:
        sb.down(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
