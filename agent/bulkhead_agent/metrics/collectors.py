"""Prometheus collectors that read their figures when scraped, into a registry of our own.

Imported on the first GetMetrics only (prometheus_client pulls in http.server, urllib, email
and more: see ``services.telemetry``). Each collector reads what it needs once per scrape,
with no thread and no cache: the guest from /proc, the agent's processes from /proc/PID,
each container from its cgroup's files (``cgroupfs``: one read per file),
RPCs and events from the tallies the agent keeps anyway.

Every series carries a ``sandbox`` label (``Labels.sandbox``, set for each scrape) and
per-container series a ``container`` label too. Names follow Prometheus conventions: base
units (seconds, bytes), ``_total`` on counters; ``promtool check metrics`` passes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from ..events.log import KINDS, EventLog
from . import cgroupfs, procfs
from .rpc import BUCKETS, RpcStats

# /proc/meminfo key -> metric name part
MEMINFO = {
    "MemTotal": "memory_total",
    "MemFree": "memory_free",
    "MemAvailable": "memory_available",
    "Buffers": "memory_buffers",
    "Cached": "memory_cached",
    "Shmem": "memory_shmem",
    "AnonPages": "memory_anon",
    "Slab": "memory_slab",
    "SwapTotal": "swap_total",
    "SwapFree": "swap_free",
}


class Labels:
    """The constant labels of the scrape in progress (one at a time: scrapes are sync)."""

    def __init__(self, sandbox: str = "") -> None:
        self.sandbox = sandbox


class Stdio(NamedTuple):
    stdin: int
    stdout: int
    stderr: int


class _Base:
    def __init__(self, labels: Labels) -> None:
        self._labels = labels

    def _family(
        self, kind: type[Metric], name: str, doc: str, labels: Iterable[str] = ()
    ) -> Family:
        return Family(kind(name, doc, labels=["sandbox", *labels]), self._labels.sandbox)


class Family:
    """A metric family whose samples all get the sandbox label first."""

    def __init__(self, metric: Metric, sandbox: str) -> None:
        self.metric = metric
        self._sandbox = sandbox

    def add(self, value: float, *labels: str) -> None:
        self.metric.add_metric([self._sandbox, *labels], value)  # type: ignore[attr-defined]


class GuestCollector(_Base):
    """The guest as a whole: CPU, memory, load, PSI, disks, network, uptime."""

    def __init__(self, labels: Labels, proc: str = procfs.PROC) -> None:
        super().__init__(labels)
        self._proc = proc

    def collect(self) -> Iterator[Metric]:
        proc = self._proc
        g, c = GaugeMetricFamily, CounterMetricFamily
        st = procfs.stat(proc)
        f = self._family(c, "bulkhead_guest_cpu_seconds", "CPU time of all CPUs by mode", ["mode"])
        for mode, seconds in st.cpu_seconds.items():
            f.add(seconds, mode)
        yield f.metric
        for kind, name, doc, value in (
            (g, "bulkhead_guest_cpus", "Online CPUs", st.cpus),
            (c, "bulkhead_guest_context_switches", "Context switches", st.context_switches),
            (c, "bulkhead_guest_forks", "Processes and threads created", st.forks),
            (g, "bulkhead_guest_procs_running", "Runnable tasks", st.procs_running),
            (g, "bulkhead_guest_procs_blocked", "Tasks blocked on I/O", st.procs_blocked),
        ):
            f = self._family(kind, name, doc)
            f.add(value)
            yield f.metric

        mem = procfs.meminfo(proc)
        for key, part in MEMINFO.items():
            if key in mem:
                f = self._family(g, f"bulkhead_guest_{part}_bytes", f"{key} of /proc/meminfo")
                f.add(mem[key])
                yield f.metric

        load = procfs.loadavg(proc)
        if load is not None:
            for minutes, value in zip((1, 5, 15), load, strict=True):
                f = self._family(g, f"bulkhead_guest_load{minutes}", f"{minutes}-minute load")
                f.add(value)
                yield f.metric

        psi = procfs.pressure(proc)
        if psi:
            f = self._family(
                c,
                "bulkhead_guest_pressure_stalled_seconds",
                "Time some or all non-idle tasks stalled on a resource (PSI)",
                ["resource", "kind"],
            )
            for (resource, kind), seconds in psi.items():
                f.add(seconds, resource, kind)
            yield f.metric

        yield from self._disks(procfs.diskstats(proc))
        yield from self._network(procfs.netdev(proc))

        up = procfs.uptime(proc)
        if up is not None:
            f = self._family(g, "bulkhead_guest_uptime_seconds", "Time since the guest booted")
            f.add(up)
            yield f.metric

    def _disks(self, disks: list[procfs.Disk]) -> Iterator[Metric]:
        if not disks:
            return
        c = CounterMetricFamily
        for field, name, doc in (
            ("reads", "disk_reads_completed", "Reads completed"),
            ("read_bytes", "disk_read_bytes", "Bytes read"),
            ("read_seconds", "disk_read_time_seconds", "Time spent reading"),
            ("writes", "disk_writes_completed", "Writes completed"),
            ("written_bytes", "disk_written_bytes", "Bytes written"),
            ("write_seconds", "disk_write_time_seconds", "Time spent writing"),
            ("io_seconds", "disk_io_time_seconds", "Time the device was busy"),
        ):
            f = self._family(c, f"bulkhead_guest_{name}", doc, ["device"])
            for disk in disks:
                f.add(getattr(disk, field), disk.name)
            yield f.metric

    def _network(self, devices: list[procfs.NetDevice]) -> Iterator[Metric]:
        if not devices:
            return
        c = CounterMetricFamily
        for field in procfs.NetDevice._fields[1:]:
            direction, what = field.split("_")
            doc = f"{what.capitalize()} {'received' if direction == 'receive' else 'sent'}"
            f = self._family(c, f"bulkhead_guest_network_{field}", doc, ["device"])
            for device in devices:
                f.add(getattr(device, field), device.name)
            yield f.metric


class ProcessCollector(_Base):
    """The agent, the spawner and init: memory, CPU, fds, threads; restarts of the agent."""

    def __init__(
        self,
        labels: Labels,
        pids: Callable[[], Mapping[str, int]],
        *,
        restarts: int,
        version: str,
        setup_seconds: Callable[[], float],
        proc: str = procfs.PROC,
    ) -> None:
        super().__init__(labels)
        self._pids = pids
        self._restarts = restarts
        self._version = version
        self._setup_seconds = setup_seconds
        self._proc = proc

    def collect(self) -> Iterator[Metric]:
        g, c = GaugeMetricFamily, CounterMetricFamily
        boot = procfs.stat(self._proc).boot_time
        rss = self._family(g, "bulkhead_process_resident_memory_bytes", "RSS", ["process"])
        cpu = self._family(c, "bulkhead_process_cpu_seconds", "CPU time", ["process", "mode"])
        fds = self._family(g, "bulkhead_process_open_fds", "Open file descriptors", ["process"])
        threads = self._family(g, "bulkhead_process_threads", "Threads", ["process"])
        start = self._family(
            g, "bulkhead_process_start_time_seconds", "Start time (unix)", ["process"]
        )
        for role, pid in self._pids().items():
            p = procfs.process(pid, self._proc)
            if p is None:
                continue
            rss.add(p.rss_bytes, role)
            cpu.add(p.user_seconds, role, "user")
            cpu.add(p.system_seconds, role, "system")
            fds.add(p.open_fds, role)
            threads.add(p.threads, role)
            start.add(boot + p.start_seconds, role)
        for f in (rss, cpu, fds, threads, start):
            yield f.metric

        f = self._family(c, "bulkhead_agent_restarts", "Times init restarted the agent since boot")
        f.add(self._restarts)
        yield f.metric
        f = self._family(g, "bulkhead_agent_info", "The agent's version", ["version"])
        f.add(1, self._version)
        yield f.metric
        f = self._family(
            g,
            "bulkhead_agent_metrics_setup_seconds",
            "Time the first scrape spent importing prometheus_client and making the registry",
        )
        f.add(self._setup_seconds())
        yield f.metric


class ContainerCollector(_Base):
    """Each container from its cgroup (one pass over its files), and its stdio bytes."""

    def __init__(
        self,
        labels: Labels,
        cgroup_root: str | None,
        *,
        statuses: Callable[[], Iterable[str]],
        stdio: Callable[[], Mapping[str, Stdio]],
        proc: str = procfs.PROC,
    ) -> None:
        super().__init__(labels)
        self._root = cgroup_root
        self._statuses = statuses
        self._stdio = stdio
        self._proc = proc

    def _groups(self) -> list[str]:
        if self._root is None:
            return []
        try:
            return sorted(e.name for e in os.scandir(self._root) if e.is_dir())
        except OSError:
            return []

    def collect(self) -> Iterator[Metric]:
        g, c = GaugeMetricFamily, CounterMetricFamily
        counts: dict[str, int] = {}
        for status in self._statuses():
            counts[status] = counts.get(status, 0) + 1
        f = self._family(g, "bulkhead_containers", "Containers by status", ["status"])
        for status in ("created", "running", "paused", "stopped"):
            f.add(counts.get(status, 0), status)
        yield f.metric

        def family(kind: type[Metric], name: str, doc: str, *labels: str) -> Family:
            return self._family(kind, f"bulkhead_container_{name}", doc, ["container", *labels])

        usage = family(c, "cpu_usage_seconds", "CPU time (cpu.stat usage_usec)")
        user = family(c, "cpu_user_seconds", "CPU time in user mode")
        system = family(c, "cpu_system_seconds", "CPU time in kernel mode")
        periods = family(c, "cpu_periods", "Enforcement periods of its CPU limit (absent: none)")
        throttled = family(c, "cpu_throttled_periods", "Periods in which it was throttled")
        throttled_s = family(c, "cpu_throttled_seconds", "Time it was throttled")
        memory = family(g, "memory_usage_bytes", "Memory in use (memory.current)")
        peak = family(g, "memory_peak_bytes", "Most memory ever in use (memory.peak)")
        limit = family(g, "memory_limit_bytes", "memory.max (absent: unlimited)")
        ooms = family(c, "oom_kills", "Processes the OOM killer killed in it")
        pids = family(g, "pids", "Processes and threads in it (pids.current)")
        io_read = family(c, "io_read_bytes", "Bytes read from block devices", "device")
        io_written = family(c, "io_written_bytes", "Bytes written to block devices", "device")
        io_reads = family(c, "io_reads", "Read operations on block devices", "device")
        io_writes = family(c, "io_writes", "Write operations on block devices", "device")
        devices: dict[str, str] | None = None

        for name in self._groups():
            s = cgroupfs.read_group(os.path.join(self._root or "", name))
            if s is None:
                continue  # removed meanwhile
            cpu = s.cpu
            if "usage_usec" in cpu:
                usage.add(cpu["usage_usec"] / 1e6, name)
                user.add(cpu.get("user_usec", 0) / 1e6, name)
                system.add(cpu.get("system_usec", 0) / 1e6, name)
            if cpu.get("nr_periods"):  # only with a CPU limit (periods count only then)
                periods.add(cpu["nr_periods"], name)
                throttled.add(cpu.get("nr_throttled", 0), name)
                throttled_s.add(cpu.get("throttled_usec", 0) / 1e6, name)
            if s.memory_current is not None:
                memory.add(s.memory_current, name)
            if s.oom_kills is not None:
                ooms.add(s.oom_kills, name)
            if s.memory_peak is not None:
                peak.add(s.memory_peak, name)
            if s.memory_max is not None:
                limit.add(s.memory_max, name)
            if s.pids is not None:
                pids.add(s.pids, name)
            for dev, figures in s.io.items():
                if devices is None:
                    devices = {f"{d.major}:{d.minor}": d.name for d in procfs.diskstats(self._proc)}
                label = devices.get(dev, dev)
                io_read.add(figures.get("rbytes", 0), name, label)
                io_written.add(figures.get("wbytes", 0), name, label)
                io_reads.add(figures.get("rios", 0), name, label)
                io_writes.add(figures.get("wios", 0), name, label)
        for f in (usage, user, system, periods, throttled, throttled_s, memory, peak, limit):
            yield f.metric
        for f in (ooms, pids, io_read, io_written, io_reads, io_writes):
            yield f.metric

        f = family(c, "stdio_bytes", "Bytes moved between its processes and the agent", "stream")
        for container_id, moved in sorted(self._stdio().items()):
            for stream, value in moved._asdict().items():
                f.add(value, container_id, stream)
        yield f.metric


class RpcCollector(_Base):
    """Calls by method and status code, latency histograms, calls in flight."""

    def __init__(self, labels: Labels, stats: RpcStats) -> None:
        super().__init__(labels)
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        calls = self._family(
            CounterMetricFamily,
            "bulkhead_agent_rpcs",
            "RPCs handled, by method and status code",
            ["method", "code"],
        )
        in_flight = self._family(
            GaugeMetricFamily, "bulkhead_agent_rpcs_in_flight", "RPCs in progress", ["method"]
        )
        latency = HistogramMetricFamily(
            "bulkhead_agent_rpc_duration_seconds",
            "Time from an RPC's start to its end (a stream's whole life)",
            labels=["sandbox", "method"],
        )
        bounds = [_bound(b) for b in BUCKETS] + ["+Inf"]
        for method, stats in sorted(self._stats.methods.items()):
            for code, n in sorted(stats.codes.items()):
                calls.add(n, method, code)
            in_flight.add(stats.in_flight, method)
            cumulative, running = [], 0
            for bound, n in zip(bounds, stats.buckets, strict=True):
                running += n
                cumulative.append((bound, running))
            if running:
                latency.add_metric([self._labels.sandbox, method], cumulative, stats.seconds)
        yield calls.metric
        yield in_flight.metric
        yield latency


def _bound(value: float) -> str:
    return repr(float(value))


class EventCollector(_Base):
    def __init__(self, labels: Labels, log: EventLog) -> None:
        super().__init__(labels)
        self._log = log

    def collect(self) -> Iterator[Metric]:
        f = self._family(
            CounterMetricFamily,
            "bulkhead_agent_events",
            "Events recorded by this agent process, by kind",
            ["kind"],
        )
        for kind in KINDS[:-1]:  # not events_lost: made per follower, never recorded
            f.add(self._log.counts.get(kind, 0), kind)
        yield f.metric
        f = self._family(GaugeMetricFamily, "bulkhead_agent_event_seq", "Newest event number")
        f.add(self._log.newest)
        yield f.metric
        f = self._family(
            GaugeMetricFamily, "bulkhead_agent_event_followers", "StreamEvents calls open"
        )
        f.add(self._log.followers)
        yield f.metric


class Exposition:
    """Our own registry with the collectors above; ``render`` is one scrape."""

    def __init__(self, labels: Labels, collectors: Iterable[object]) -> None:
        self.labels = labels
        # auto_describe off: registering must not scrape; our names never clash anyway.
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            self.registry.register(collector)  # type: ignore[arg-type]

    def render(self, sandbox: str) -> str:
        self.labels.sandbox = sandbox
        return generate_latest(self.registry).decode()
