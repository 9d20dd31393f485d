"""The real agent as a subprocess, driven over its unix socket and the dev TCP listener."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from test_agent_support import (
    Agent,
    FakeInit,
    health_status,
    short_tmpdir,
    start_agent,
)

import bulkhead_proto
from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
INIT_STARTED_MS = 1234.5


@pytest.fixture(scope="module")
def fake_init() -> Iterator[FakeInit]:
    init = FakeInit()
    yield init
    init.close()


@pytest.fixture(scope="module")
def agent(fake_init: FakeInit) -> Iterator[Agent]:
    with short_tmpdir() as tmp:
        env = {
            "BULKHEAD_INIT_STARTED_MS": str(INIT_STARTED_MS),
            "BULKHEAD_AGENT_RESTARTS": "3",
            "BULKHEAD_MODULES": "virtio_blk,overlay",
        }
        a = start_agent(tmp, init_pid=fake_init.pid, env=env)
        yield a
        assert a.stop() == 0, a.log()


@pytest.fixture
def stub(agent: Agent) -> Iterator[agent_pb2_grpc.AgentStub]:
    with grpc.insecure_channel(agent.target) as channel:
        yield agent_pb2_grpc.AgentStub(channel)


def test_health_is_serving_over_unix_and_tcp(agent: Agent) -> None:
    for target in (agent.target, f"127.0.0.1:{agent.tcp_port}"):
        assert health_status(target) == SERVING
        assert health_status(target, "bulkhead.v1.Agent") == SERVING
    with pytest.raises(grpc.RpcError) as err:
        health_status(agent.target, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(agent: Agent) -> None:
    with grpc.insecure_channel(agent.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"bulkhead.v1.Agent", "grpc.health.v1.Health"} <= services


def test_socket_is_private(agent: Agent) -> None:
    assert stat.S_IMODE(agent.run_dir.stat().st_mode) == 0o711
    mode = agent.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_guest_details_are_sane(agent: Agent, stub: agent_pb2_grpc.AgentStub, fake_init) -> None:
    d = stub.GetGuestDetails(agent_pb2.GetGuestDetailsRequest(), timeout=5)
    assert d.agent_version == "0.1.0"
    assert d.protocol_version == bulkhead_proto.PROTOCOL_VERSION
    assert d.kernel_release == os.uname().release
    assert d.cpus == os.cpu_count()
    assert d.memory_total_bytes > 0
    assert d.cgroup_version in (1, 2)
    assert {"health", "reflection", "tcp"} <= set(d.features)
    assert "serial" not in d.features and "vsock" not in d.features
    assert d.hostname == socket.gethostname()
    assert d.uptime_seconds > 0
    assert d.agent_restarts == 3
    assert list(d.kernel_modules) == ["virtio_blk", "overlay"]
    assert d.init_version  # the manifest's, else the agent's version
    assert d.agent_pid == agent.proc.pid

    b = d.boot
    assert b.init_started_ms == INIT_STARTED_MS
    assert b.init_started_ms < b.agent_started_ms < b.agent_ready_ms
    assert b.agent_ready_ms <= d.uptime_seconds * 1000 + 1000  # uptime has 10 ms resolution

    by_name = {p.name: p for p in d.processes}
    assert by_name["agent"].pid == agent.proc.pid
    assert by_name["init"].pid == fake_init.pid
    for p in d.processes:
        assert 0 < p.uss_bytes <= p.rss_bytes
        assert p.pss_bytes > 0
        assert p.threads >= 1


def test_set_guest_time_rejects_zero(stub: agent_pb2_grpc.AgentStub) -> None:
    # Only the error path: the success path would set this machine's clock.
    for bad in (0, -5):
        with pytest.raises(grpc.RpcError) as err:
            stub.SetGuestTime(agent_pb2.SetGuestTimeRequest(unix_nanos=bad), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unix_nanos" in err.value.details()


def test_add_entropy_checks_size(stub: agent_pb2_grpc.AgentStub) -> None:
    for data in (b"", b"x" * (2 << 20), b"x" * ((1 << 20) + 1)):
        with pytest.raises(grpc.RpcError) as err:
            stub.AddEntropy(agent_pb2.AddEntropyRequest(data=data), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "data" in err.value.details()


def test_add_entropy_mixes_without_credit(stub: agent_pb2_grpc.AgentStub) -> None:
    stub.AddEntropy(agent_pb2.AddEntropyRequest(data=os.urandom(64)), timeout=5)
    stub.AddEntropy(agent_pb2.AddEntropyRequest(data=os.urandom(1 << 20)), timeout=10)


def test_add_entropy_with_credit_is_allowed_or_refused_cleanly(
    stub: agent_pb2_grpc.AgentStub,
) -> None:
    # Crediting needs CAP_SYS_ADMIN: as root it works, otherwise PERMISSION_DENIED,
    # never a crash of the ioctl's argument handling.
    try:
        stub.AddEntropy(agent_pb2.AddEntropyRequest(data=os.urandom(2048), credit=True), timeout=5)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()


def test_shutdown_signals_init(stub: agent_pb2_grpc.AgentStub, fake_init: FakeInit) -> None:
    stub.Shutdown(agent_pb2.ShutdownRequest(), timeout=5)
    # The reply comes before the signal: init must not tear the guest down under it.
    assert not fake_init.has_output()
    assert fake_init.next_line(10) == "SIGTERM"
    stub.Shutdown(agent_pb2.ShutdownRequest(reboot=True), timeout=5)
    assert fake_init.next_line(10) == "SIGINT"


def test_sigterm_stops_gracefully_and_replaces_a_stale_socket() -> None:
    with short_tmpdir() as tmp:
        run = tmp / "run"
        run.mkdir(mode=0o755)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(run / "agent.sock"))  # bound, never listening: a dead agent's socket
        stale.close()

        agent = start_agent(tmp, tcp=False)
        assert stat.S_IMODE(run.stat().st_mode) == 0o711  # tightened
        assert agent.stop() == 0
        log = agent.log()
        assert "INFO    agent: ready in" in log
        assert "stopped" in log
        assert not agent.socket_path.exists()


def test_bad_environment_is_reported_not_fatal() -> None:
    with short_tmpdir() as tmp:
        agent = start_agent(tmp, tcp=False, env={"BULKHEAD_TCP_PORT": "http"})
        try:
            assert "WARNING agent: bad environment BULKHEAD_TCP_PORT='http'" in agent.log()
        finally:
            agent.stop()


def test_agent_ready_quickly_and_idle_cheaply(agent: Agent) -> None:
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process(agent.proc.pid)
    # Loose bounds that catch regressions (a thread pool, a busy loop), not tuning.
    assert agent.ready_s < 10
    before = proc.cpu_times()
    time.sleep(1.0)
    after = proc.cpu_times()
    busy = (after.user - before.user) + (after.system - before.system)
    assert busy < 0.05, f"idle agent used {busy:.3f}s CPU in 1s"
    assert proc.num_threads() <= 12
    print(
        f"\nagent: ready {agent.ready_s * 1000:.0f} ms after spawn, "
        f"USS {proc.memory_full_info().uss / 2**20:.1f} MiB, {proc.num_threads()} threads"
    )


def test_tcp_listener_warns(agent: Agent) -> None:
    assert "WITHOUT authentication" in agent.log()
