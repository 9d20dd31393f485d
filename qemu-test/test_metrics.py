"""Metrics and events in the real guest: figures that match what containers do, OOM kills
counted and reported once, exit events, and an event stream that loses nothing across a
disconnection.

Every wait has a deadline; every container is removed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families

from bulkhead import Sandbox
from bulkhead.errors import DeadlineExceeded
from bulkhead.events import Event

DEADLINE = 120.0  # one container's life under TCG
MiB = 1024 * 1024
HELD = 64 * MiB
# What a container holding 64 MiB may show on top: busybox sh, dd and sleep, their page tables
# and kernel stacks, the pipe between them. Measured: 0.6 MiB.
OVERHEAD = 8 * MiB


def series(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def container_value(sb: Sandbox, name: str, container: str) -> float | None:
    labels = frozenset({"sandbox": sb.name, "container": container}.items())
    return series(sb.metrics()).get((name, labels))


def newest_seq(sb: Sandbox) -> int:
    with sb.agent.events(timeout=DEADLINE) as stream:
        return stream.last_seq


def read_events(sb: Sandbox, since: int, until: callable, timeout: float = DEADLINE) -> list[Event]:  # type: ignore[valid-type]
    """Events after ``since`` up to the first for which ``until(event)`` is true."""
    got = []
    with sb.agent.events(since, timeout=timeout) as stream:
        for event in stream:
            got.append(event)
            if until(event):
                return got
    raise AssertionError(f"the stream ended before the awaited event; got {got}")


@pytest.fixture
def cleanup(sandbox: Sandbox) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        try:
            sandbox.container(name).remove(timeout=0)
        except Exception as exc:  # removed by the test already
            print(f"cleanup of {name}: {exc}")


def test_the_exposition_is_valid_and_labelled(sandbox: Sandbox) -> None:
    started = time.perf_counter()
    text = sandbox.metrics()
    first_s = time.perf_counter() - started
    found = series(text)
    assert {dict(labels)["sandbox"] for _, labels in found} == {sandbox.name}
    details = sandbox.agent.guest_details()
    total = found[("bulkhead_guest_memory_total_bytes", frozenset({("sandbox", sandbox.name)}))]
    assert total == details.memory_total_bytes
    agent = frozenset({"sandbox": sandbox.name, "process": "agent"}.items())
    assert found[("bulkhead_process_resident_memory_bytes", agent)] > 10 * MiB
    init = frozenset({"sandbox": sandbox.name, "process": "init"}.items())
    assert found[("bulkhead_process_threads", init)] >= 1
    setup = found[("bulkhead_agent_metrics_setup_seconds", frozenset({("sandbox", sandbox.name)}))]
    print(f"first GetMetrics {first_s * 1000:.0f} ms, of which the import {setup * 1000:.0f} ms")
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_container_holding_64_mib_shows_it(sandbox: Sandbox, cleanup: list[str]) -> None:
    # dd's 64 MiB buffer, filled from /dev/zero, stays resident while dd waits to write it
    # into a pipe that sleep never reads.
    name = "hold64"
    cleanup.append(name)
    container = sandbox.create_container(
        ["sh", "-c", "dd if=/dev/zero bs=64M count=1 | sleep 1000"], name=name
    )
    container.start()
    usage = wait_for(
        lambda: (
            (v := container_value(sandbox, "bulkhead_container_memory_usage_bytes", name))
            and v >= HELD
            and v
        ),
        DEADLINE,
        "the container's memory to reach 64 MiB",
        interval=0.5,
    )
    print(f"container holding 64 MiB: memory.current {usage / MiB:.2f} MiB")
    assert HELD <= usage <= HELD + OVERHEAD, f"{usage / MiB:.1f} MiB"
    peak = container_value(sandbox, "bulkhead_container_memory_peak_bytes", name)
    assert peak is not None and usage <= peak <= HELD + OVERHEAD
    assert container_value(sandbox, "bulkhead_container_pids", name) == 3  # sh, dd, sleep
    # The same figure the stats RPC reports (both read memory.current).
    stats = container.stats()
    assert abs(stats.memory_current_bytes - usage) <= OVERHEAD
    container.remove(timeout=0)
    cleanup.remove(name)
    assert container_value(sandbox, "bulkhead_container_memory_usage_bytes", name) is None


def test_an_oom_kill_is_counted_and_reported_once(sandbox: Sandbox, cleanup: list[str]) -> None:
    since = newest_seq(sandbox)
    name = "oom32"
    cleanup.append(name)
    container = sandbox.create_container(
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], memory_limit="32m", name=name
    )
    container.start()
    exit = container.wait(timeout=DEADLINE)
    assert (exit.kind, exit.signal, exit.oom_killed) == ("signaled", 9, True)
    assert container_value(sandbox, "bulkhead_container_oom_kills_total", name) == 1
    assert container_value(sandbox, "bulkhead_container_memory_limit_bytes", name) == 32 * MiB
    container.remove(timeout=0)
    cleanup.remove(name)
    # A marker after it: every event about the OOM container came before this one's exit.
    marker = sandbox.run(["true"], name="oom-marker")
    marker.wait(timeout=DEADLINE)
    got = read_events(
        sandbox,
        since,
        lambda e: e.kind == "container_exited" and e.container_id == "oom-marker",
    )
    mine = [(e.kind, e.oom_kills) for e in got if e.container_id == name]
    assert mine == [("container_started", 0), ("oom_kill", 1), ("container_exited", 0)]
    exited = next(e for e in got if e.container_id == name and e.kind == "container_exited")
    assert exited.exit is not None and exited.exit.oom_killed and exited.exit.returncode == 137


def test_an_exit_event_carries_the_exit_code(sandbox: Sandbox) -> None:
    since = newest_seq(sandbox)
    proc = sandbox.run(["sh", "-c", "exit 42"], name="exit42")
    assert proc.wait(timeout=DEADLINE) == 42
    got = read_events(sandbox, since, lambda e: e.kind == "container_exited")
    started, exited = got
    assert (started.kind, started.container_id) == ("container_started", "exit42")
    assert (exited.container_id, exited.seq) == ("exit42", started.seq + 1)
    assert exited.exit is not None
    assert (exited.exit.kind, exited.exit.exit_code) == ("exited", 42)
    assert exited.pid == started.pid == exited.exit.pid > 0


def test_events_resume_after_a_disconnection_without_loss_or_repeat(sandbox: Sandbox) -> None:
    since = newest_seq(sandbox)
    names = [f"ev{i}" for i in range(6)]
    for name in names[:3]:
        sandbox.run(["true"], name=name).wait(timeout=DEADLINE)
    seen: list[Event] = []
    with sandbox.agent.events(since, timeout=DEADLINE) as stream:
        for event in stream:
            seen.append(event)
            if len(seen) == 4:  # mid-way through what happened: disconnect
                break
        last = stream.last_seq
    assert last == seen[-1].seq
    for name in names[3:]:  # more happens while nobody listens
        sandbox.run(["true"], name=name).wait(timeout=DEADLINE)
    seen += read_events(
        sandbox, last, lambda e: e.kind == "container_exited" and e.container_id == names[-1]
    )
    assert [e.seq for e in seen] == list(range(since + 1, since + 13))
    assert [(e.container_id, e.kind) for e in seen] == [
        (name, kind) for name in names for kind in ("container_started", "container_exited")
    ]
    # Nothing more after it: the stream waits (and here times out) rather than repeating.
    with pytest.raises(DeadlineExceeded), sandbox.agent.events(seen[-1].seq, timeout=3) as more:
        next(more)
