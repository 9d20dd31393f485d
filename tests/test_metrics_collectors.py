"""The metrics collectors on fake /proc and cgroup trees: what the figures become, labels, units,
and an exposition that ``promtool check metrics`` accepts. Pure logic, no agent process."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulkhead_agent.events import log as ev
from bulkhead_agent.events.log import EventLog
from bulkhead_agent.metrics import collectors as c
from bulkhead_agent.metrics import procfs
from bulkhead_agent.metrics.rpc import RpcStats

TICKS = procfs.clock_ticks()
PAGE = procfs.page_size()
AGENT_PID, INIT_PID, SPAWNER_PID = 300, 1, 301


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))


def pid_stat(
    pid: int, comm: str, utime: int, stime: int, threads: int, start: int, rss: int
) -> str:
    # proc(5) fields 1..24; everything we do not read is 0
    fields = ["S", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"]  # 3..13
    fields += [str(utime), str(stime), "0", "0", "0", "0", str(threads), "0", str(start)]  # 14..22
    fields += ["0", str(rss)]  # 23 (vsize), 24 (rss pages)
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    write(
        root,
        {
            "stat": f"""
                cpu  {2 * TICKS} {1 * TICKS} {3 * TICKS} {50 * TICKS} {4 * TICKS} 0 {TICKS} 0 0 0
                cpu0 1 1 1 1 1 0 0 0 0 0
                cpu1 1 1 1 1 1 0 0 0 0 0
                intr 12345 0 0
                ctxt 9000
                btime 1700000000
                processes 420
                procs_running 2
                procs_blocked 1
                """,
            "meminfo": """
                MemTotal:         524288 kB
                MemFree:          262144 kB
                MemAvailable:     393216 kB
                Buffers:            1024 kB
                Cached:            65536 kB
                Shmem:              2048 kB
                HugePages_Total:       0
                """,
            "loadavg": "0.50 0.25 0.10 1/80 1234\n",
            "uptime": "12.34 20.00\n",
            "pressure/cpu": """
                some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000
                full avg10=0.00 avg60=0.00 avg300=0.00 total=0
                """,
            "pressure/memory": """
                some avg10=0.00 avg60=0.00 avg300=0.00 total=250000
                full avg10=0.00 avg60=0.00 avg300=0.00 total=125000
                """,
            "diskstats": """
                   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
                 254       0 vda 100 0 2048 30 50 0 4096 70 0 90 100 0 0 0 0 0 0
                 254      16 vdb 1 0 8 1 0 0 0 0 0 1 1 0 0 0 0 0 0
                """,
            # The kernel's columns, narrower: rx bytes packets errs drop fifo frame compressed
            # multicast, then tx bytes packets errs drop fifo colls carrier compressed.
            "net/dev": """
                Inter-|   Receive |  Transmit
                 face |bytes packets ... |bytes packets ...
                    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0
                  eth0: 5000 50 1 2 0 0 0 0 7000 70 3 4 0 0 0 0
                """,
            f"{AGENT_PID}/stat": pid_stat(
                AGENT_PID, "python3 (agent)", TICKS, TICKS // 2, 5, 200, 1000
            ),
            f"{INIT_PID}/stat": pid_stat(INIT_PID, "python3", 3 * TICKS, 0, 1, 10, 500),
            f"{SPAWNER_PID}/stat": pid_stat(SPAWNER_PID, "python3", 0, 0, 1, 201, 800),
        },
    )
    for pid, fds in ((AGENT_PID, 4), (INIT_PID, 2), (SPAWNER_PID, 3)):
        (root / str(pid) / "fd").mkdir()
        for n in range(fds):
            (root / str(pid) / "fd" / str(n)).touch()
    return root


@pytest.fixture
def cgroups(tmp_path: Path) -> Path:
    root = tmp_path / "containers"
    write(
        root,
        {
            "web/cpu.stat": """
                usage_usec 2500000
                user_usec 2000000
                system_usec 500000
                nr_periods 40
                nr_throttled 10
                throttled_usec 750000
                """,
            "web/memory.current": "67108864\n",
            "web/memory.peak": "70000000\n",
            "web/memory.max": "134217728\n",
            "web/memory.events": "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n",
            "web/pids.current": "3\n",
            "web/io.stat": "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
            # No controllers enabled for this one: only cpu.stat's basics.
            "bare/cpu.stat": "usage_usec 1000\nuser_usec 600\nsystem_usec 400\n",
            "bare/memory.max": "max\n",
        },
    )
    return root


def exposition(proc: Path, cgroups: Path | None, **extra) -> c.Exposition:  # type: ignore[no-untyped-def]
    labels = c.Labels()
    rpc = extra.get("rpc") or RpcStats()
    log = extra.get("log") or EventLog()
    return c.Exposition(
        labels,
        [
            c.GuestCollector(labels, proc=str(proc)),
            c.ProcessCollector(
                labels,
                lambda: {"init": INIT_PID, "agent": AGENT_PID, "spawner": SPAWNER_PID, "gone": 999},
                restarts=2,
                version="9.9",
                setup_seconds=lambda: 0.05,
                proc=str(proc),
            ),
            c.ContainerCollector(
                labels,
                str(cgroups) if cgroups else None,
                statuses=lambda: ["running", "running", "stopped"],
                stdio=lambda: {"web": c.Stdio(5, 100, 7)},
                proc=str(proc),
            ),
            c.RpcCollector(labels, rpc),
            c.EventCollector(labels, log),
        ],
    )


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    labels.setdefault("sandbox", "sb1")
    return found[(name, frozenset(labels.items()))]


def test_guest_figures_in_base_units(proc: Path) -> None:
    found = samples(exposition(proc, None).render("sb1"))
    assert value(found, "bulkhead_guest_cpu_seconds_total", mode="user") == 2
    assert value(found, "bulkhead_guest_cpu_seconds_total", mode="idle") == 50
    assert value(found, "bulkhead_guest_cpu_seconds_total", mode="softirq") == 1
    assert value(found, "bulkhead_guest_cpus") == 2
    assert value(found, "bulkhead_guest_context_switches_total") == 9000
    assert value(found, "bulkhead_guest_forks_total") == 420
    assert value(found, "bulkhead_guest_procs_blocked") == 1
    assert value(found, "bulkhead_guest_memory_total_bytes") == 512 * 1024 * 1024
    assert value(found, "bulkhead_guest_memory_available_bytes") == 384 * 1024 * 1024
    assert value(found, "bulkhead_guest_load1") == 0.5
    assert value(found, "bulkhead_guest_load15") == 0.1
    assert value(found, "bulkhead_guest_uptime_seconds") == 12.34
    psi = "bulkhead_guest_pressure_stalled_seconds_total"
    assert value(found, psi, resource="cpu", kind="some") == 1.5
    assert value(found, psi, resource="memory", kind="full") == 0.125
    assert not any(k[0] == psi and ("resource", "io") in k[1] for k in found)  # no file, no series
    assert value(found, "bulkhead_guest_disk_read_bytes_total", device="vda") == 2048 * 512
    assert value(found, "bulkhead_guest_disk_written_bytes_total", device="vda") == 4096 * 512
    assert value(found, "bulkhead_guest_disk_io_time_seconds_total", device="vda") == 0.09
    assert not any(("device", "ram0") in k[1] for k in found)
    net = "bulkhead_guest_network_"
    assert value(found, net + "receive_bytes_total", device="eth0") == 5000
    assert value(found, net + "transmit_drops_total", device="eth0") == 4
    assert value(found, net + "receive_packets_total", device="lo") == 10


def test_agent_init_and_spawner_processes(proc: Path) -> None:
    found = samples(exposition(proc, None).render("sb1"))
    rss = "bulkhead_process_resident_memory_bytes"
    assert value(found, rss, process="agent") == 1000 * PAGE
    assert value(found, rss, process="spawner") == 800 * PAGE
    cpu = "bulkhead_process_cpu_seconds_total"
    assert value(found, cpu, process="agent", mode="user") == 1
    assert value(found, cpu, process="agent", mode="system") == 0.5
    assert value(found, cpu, process="init", mode="user") == 3
    assert value(found, "bulkhead_process_open_fds", process="agent") == 4
    assert value(found, "bulkhead_process_threads", process="agent") == 5
    start = value(found, "bulkhead_process_start_time_seconds", process="agent")
    assert start == pytest.approx(1700000000 + 200 / TICKS)
    assert not any(("process", "gone") in k[1] for k in found)  # a pid that is gone: skipped
    assert value(found, "bulkhead_agent_restarts_total") == 2
    assert value(found, "bulkhead_agent_info", version="9.9") == 1
    assert value(found, "bulkhead_agent_metrics_setup_seconds") == 0.05


def test_containers_from_their_cgroup_files(proc: Path, cgroups: Path) -> None:
    found = samples(exposition(proc, cgroups).render("sb1"))
    web = {"container": "web"}
    assert value(found, "bulkhead_containers", status="running") == 2
    assert value(found, "bulkhead_containers", status="paused") == 0
    assert value(found, "bulkhead_container_cpu_usage_seconds_total", **web) == 2.5
    assert value(found, "bulkhead_container_cpu_system_seconds_total", **web) == 0.5
    assert value(found, "bulkhead_container_cpu_throttled_periods_total", **web) == 10
    assert value(found, "bulkhead_container_cpu_throttled_seconds_total", **web) == 0.75
    assert value(found, "bulkhead_container_memory_usage_bytes", **web) == 64 * 1024 * 1024
    assert value(found, "bulkhead_container_memory_peak_bytes", **web) == 70000000
    assert value(found, "bulkhead_container_memory_limit_bytes", **web) == 128 * 1024 * 1024
    assert value(found, "bulkhead_container_oom_kills_total", **web) == 1
    assert value(found, "bulkhead_container_pids", **web) == 3
    # io.stat names devices by number; the exposition by name, from /proc/diskstats
    assert value(found, "bulkhead_container_io_read_bytes_total", device="vda", **web) == 4096
    assert value(found, "bulkhead_container_io_writes_total", device="vda", **web) == 2
    assert value(found, "bulkhead_container_stdio_bytes_total", stream="stdout", **web) == 100
    assert value(found, "bulkhead_container_stdio_bytes_total", stream="stdin", **web) == 5
    bare = {"container": "bare"}
    assert value(found, "bulkhead_container_cpu_usage_seconds_total", **bare) == 0.001
    for absent in ("memory_usage_bytes", "memory_limit_bytes", "cpu_periods_total", "pids"):
        assert (
            f"bulkhead_container_{absent}",
            frozenset({"sandbox": "sb1", **bare}.items()),
        ) not in (found)


def test_rpcs_and_events(proc: Path) -> None:
    rpc = RpcStats()
    for code, seconds in (("OK", 0.002), ("OK", 0.3), ("NOT_FOUND", 20.0)):
        rpc.end(rpc.begin("bulkhead.v1.Agent/WaitProcess"), code, seconds)
    rpc.begin("bulkhead.v1.Agent/Attach")  # still running
    log = EventLog()
    log.emit(ev.CONTAINER_STARTED, container_id="web")
    log.emit(ev.OOM_KILL, container_id="web", oom_kills=1)
    found = samples(exposition(proc, None, rpc=rpc, log=log).render("sb1"))
    wait = {"method": "bulkhead.v1.Agent/WaitProcess"}
    assert value(found, "bulkhead_agent_rpcs_total", code="OK", **wait) == 2
    assert value(found, "bulkhead_agent_rpcs_total", code="NOT_FOUND", **wait) == 1
    hist = "bulkhead_agent_rpc_duration_seconds"
    assert value(found, hist + "_bucket", le="0.001", **wait) == 0
    assert value(found, hist + "_bucket", le="0.0025", **wait) == 1
    assert value(found, hist + "_bucket", le="0.5", **wait) == 2
    assert value(found, hist + "_bucket", le="10.0", **wait) == 2
    assert value(found, hist + "_bucket", le="+Inf", **wait) == 3
    assert value(found, hist + "_count", **wait) == 3
    assert value(found, hist + "_sum", **wait) == pytest.approx(20.302)
    attach = {"method": "bulkhead.v1.Agent/Attach"}
    assert value(found, "bulkhead_agent_rpcs_in_flight", **attach) == 1
    assert value(found, "bulkhead_agent_events_total", kind="oom_kill") == 1
    assert value(found, "bulkhead_agent_events_total", kind="device_added") == 0
    assert value(found, "bulkhead_agent_event_seq") == 2


def test_every_series_is_labelled_with_the_sandbox_of_the_scrape(proc: Path, cgroups: Path) -> None:
    e = exposition(proc, cgroups)
    for name in ("first", "second"):
        found = samples(e.render(name))
        assert found and all(dict(labels)["sandbox"] == name for _, labels in found)


def test_missing_files_give_fewer_series_not_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    text = exposition(empty, tmp_path / "no-such-dir").render("sb1")
    found = samples(text)
    assert value(found, "bulkhead_containers", status="running") == 2
    assert not any(k[0].startswith("bulkhead_guest_memory") for k in found)


def test_promtool_accepts_the_exposition(proc: Path, cgroups: Path, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rpc = RpcStats()
    rpc.end(rpc.begin("bulkhead.v1.Agent/CreateContainer"), "OK", 0.01)
    text = exposition(proc, cgroups, rpc=rpc).render("sb1")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""  # no lint warnings either
