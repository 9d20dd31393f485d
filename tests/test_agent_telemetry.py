"""GetMetrics and StreamEvents of the real agent, natively (as root, no cgroup v2 controllers
here: cgroup figures and OOM kills are checked in the guest, qemu-test/test_metrics.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_agent_containers_support import AgentEnv, Attachment, make_spec, running_agent
from test_agent_support import short_tmpdir, start_agent

from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

pb = agent_pb2
Kind = pb.Event.Kind
pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
RPC_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def env() -> Iterator[AgentEnv]:
    with running_agent() as state:
        yield state


def telemetry(env: AgentEnv) -> agent_pb2_grpc.TelemetryStub:
    return agent_pb2_grpc.TelemetryStub(env.channel)


def scrape(stub: agent_pb2_grpc.TelemetryStub, sandbox: str = "") -> str:
    return stub.GetMetrics(pb.GetMetricsRequest(sandbox=sandbox), timeout=RPC_TIMEOUT).text


def series(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def newest(stub: agent_pb2_grpc.TelemetryStub) -> int:
    """The newest seq, from a stream's initial metadata (the stream is then cancelled)."""
    call = stub.StreamEvents(pb.StreamEventsRequest(), timeout=RPC_TIMEOUT)
    try:
        return int(dict(call.initial_metadata())["bulkhead-events-newest"])
    finally:
        call.cancel()


def events_after(
    stub: agent_pb2_grpc.TelemetryStub, since: int, count: int, **request
) -> list[pb.Event]:
    """The next ``count`` events after ``since``; the stream is cancelled after them."""
    call = stub.StreamEvents(pb.StreamEventsRequest(since=since, **request), timeout=RPC_TIMEOUT)
    got = []
    try:
        for event in call:
            got.append(event)
            if len(got) == count:
                break
    finally:
        call.cancel()
    return got


def test_container_lifecycle_events_in_order(env: AgentEnv) -> None:
    stub, c = telemetry(env), env.client
    start = newest(stub)
    c.run("ev-exit", make_spec(["sh", "-c", "exit 7"]))  # create, start, wait, remove
    c.create("ev-exec", make_spec(["sleep", "1000"]))
    c.start("ev-exec")
    c.exec("ev-exec", "job", {"args": ["sh", "-c", "exit 3"]})
    assert c.wait("ev-exec", "job").exit_code == 3
    c.remove("ev-exec")  # SIGKILL: its own process's exit comes with the removal

    got = events_after(stub, start, 5)
    assert [e.seq for e in got] == list(range(start + 1, start + 6))
    assert [(Kind.Name(e.kind), e.container_id, e.exec_id) for e in got] == [
        ("CONTAINER_STARTED", "ev-exit", ""),
        ("CONTAINER_EXITED", "ev-exit", ""),
        ("CONTAINER_STARTED", "ev-exec", ""),
        ("PROCESS_EXITED", "ev-exec", "job"),
        ("CONTAINER_EXITED", "ev-exec", ""),
    ]
    exited = got[1].exit
    assert (exited.kind, exited.exit_code) == (pb.ProcessExit.EXITED, 7)
    assert got[1].pid == exited.pid and got[0].pid == exited.pid > 0
    assert got[3].exit.exit_code == 3
    killed = got[4].exit
    assert (killed.kind, killed.signal, killed.oom_killed) == (pb.ProcessExit.SIGNALED, 9, False)
    assert all(e.time_unix > 0 for e in got)


def test_a_failed_start_is_an_exit_event(env: AgentEnv) -> None:
    stub, c = telemetry(env), env.client
    start = newest(stub)
    c.create("ev-bad", make_spec(["/no/such/program"]))
    with pytest.raises(grpc.RpcError):
        c.start("ev-bad")
    c.remove("ev-bad")
    (event,) = events_after(stub, start, 1)
    assert Kind.Name(event.kind) == "CONTAINER_EXITED"
    assert event.exit.kind == pb.ProcessExit.START_FAILED and event.exit.start_failure.step


def test_reconnecting_with_the_last_seq_misses_and_repeats_nothing(env: AgentEnv) -> None:
    stub, c = telemetry(env), env.client
    start = newest(stub)
    live: list[pb.Event] = []
    call = stub.StreamEvents(pb.StreamEventsRequest(since=start), timeout=60)
    reader_done = threading.Event()

    def read() -> None:
        try:
            for event in call:
                live.append(event)
                if len(live) == 2:
                    call.cancel()  # the client goes away mid-stream
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED
        finally:
            reader_done.set()

    threading.Thread(target=read, daemon=True).start()
    for i in range(4):  # 8 events: started and exited each
        c.run(f"ev-re{i}", make_spec(["true"]))
    assert reader_done.wait(RPC_TIMEOUT)
    assert len(live) == 2
    rest = events_after(stub, live[-1].seq, 6)
    seqs = [e.seq for e in live + rest]
    assert seqs == list(range(start + 1, start + 9))
    assert [e.container_id for e in live + rest] == [f"ev-re{i}" for i in range(4) for _ in (0, 1)]


def test_a_seq_never_issued_is_out_of_range(env: AgentEnv) -> None:
    stub = telemetry(env)
    call = stub.StreamEvents(pb.StreamEventsRequest(since=newest(stub) + 100), timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "past the newest event" in info.value.details()


def test_metrics_name_the_sandbox_and_count_stdio_and_rpcs(env: AgentEnv) -> None:
    stub, c = telemetry(env), env.client
    c.create("m-out", make_spec(["sh", "-c", "head -c 5000 /dev/zero; echo err >&2; sleep 1000"]))
    try:
        attachment = Attachment(c.stub, "m-out")
        c.start("m-out")
        received = 0
        while received < 5000:
            received += len(attachment.next().stdout.data)
        with pytest.raises(grpc.RpcError):  # counted as NOT_FOUND
            c.wait("no-such-container")
        found = series(scrape(stub, "sb-native"))
        assert {dict(k[1])["sandbox"] for k in found} == {"sb-native"}
        stdio = "bulkhead_container_stdio_bytes_total"
        out = {"sandbox": "sb-native", "container": "m-out"}
        assert found[(stdio, frozenset({**out, "stream": "stdout"}.items()))] == 5000
        assert found[(stdio, frozenset({**out, "stream": "stdin"}.items()))] == 0
        rpcs = "bulkhead_agent_rpcs_total"
        wait = {"sandbox": "sb-native", "method": "bulkhead.v1.Agent/WaitProcess"}
        assert found[(rpcs, frozenset({**wait, "code": "NOT_FOUND"}.items()))] >= 1
        create = {"sandbox": "sb-native", "method": "bulkhead.v1.Agent/CreateContainer"}
        assert found[(rpcs, frozenset({**create, "code": "OK"}.items()))] >= 1
        running = {"sandbox": "sb-native", "status": "running"}
        assert found[("bulkhead_containers", frozenset(running.items()))] == 1
        agent = {"sandbox": "sb-native", "process": "agent"}
        assert found[("bulkhead_process_resident_memory_bytes", frozenset(agent.items()))] > 1e6
        spawner = {"sandbox": "sb-native", "process": "spawner"}
        assert found[("bulkhead_process_threads", frozenset(spawner.items()))] == 1
    finally:
        c.remove("m-out")
    # Gone with its container.
    assert not any(dict(k[1]).get("container") == "m-out" for k in series(scrape(stub)))


def test_the_default_sandbox_label_is_the_hostname(env: AgentEnv) -> None:
    import socket

    found = series(scrape(telemetry(env)))
    assert {dict(k[1])["sandbox"] for k in found} == {socket.gethostname()}


def test_promtool_accepts_the_agents_exposition(env: AgentEnv) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    env.client.run("m-promtool", make_spec(["true"]))
    text = scrape(telemetry(env))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_numbering_goes_on_after_an_agent_restart() -> None:
    """What init does when the agent dies: start it again, same run dir, restarts counted."""
    with short_tmpdir() as tmp:
        first = start_agent(tmp, tcp=False, env={"BULKHEAD_AGENT_RESTARTS": "1"})
        try:
            with grpc.insecure_channel(first.target) as channel:
                stub = agent_pb2_grpc.TelemetryStub(channel)
                assert [e.agent_restarts for e in events_after(stub, 0, 1)] == [1]
        finally:
            assert first.stop() == 0, first.log()
        journal = (tmp / "run" / "events.jsonl").read_text().splitlines()
        assert [json.loads(line)["seq"] for line in journal] == [1]

        second = start_agent(tmp, tcp=False, env={"BULKHEAD_AGENT_RESTARTS": "2"})
        try:
            with grpc.insecure_channel(second.target) as channel:
                stub = agent_pb2_grpc.TelemetryStub(channel)
                got = events_after(stub, 0, 2)
                assert [(e.seq, Kind.Name(e.kind), e.agent_restarts) for e in got] == [
                    (1, "AGENT_RESTARTED", 1),
                    (2, "AGENT_RESTARTED", 2),
                ]
                found = series(scrape(stub))
                restarts = [v for k, v in found.items() if k[0] == "bulkhead_agent_restarts_total"]
                assert restarts == [2]
        finally:
            assert second.stop() == 0, second.log()
