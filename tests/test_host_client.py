"""AgentClient against a real in-process gRPC server on a unix socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bulkhead import AgentClient, errors
from bulkhead.client import grpc_target
from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc


class FakeAgent(agent_pb2_grpc.AgentServicer):
    """Answers like the real agent; ``AddEntropy(b"abort:CODE")`` fails with CODE."""

    def __init__(self) -> None:
        self.clock = 1_000_000_000
        self.shutdowns: list[bool] = []
        self.release = threading.Event()

    def GetGuestDetails(self, request, context):
        return agent_pb2.GuestDetails(
            agent_version="0.1.0",
            protocol_version=1,
            kernel_release="6.12.0-test",
            cpus=2,
            memory_total_bytes=5 * 2**40,  # beyond 32 bits: must stay a number in JSON
            cgroup_version=2,
            features=["serial"],
            boot=agent_pb2.BootTimeline(
                init_started_ms=2700.0, agent_started_ms=2800.5, agent_ready_ms=5100.25
            ),
            agent_pid=42,
            processes=[agent_pb2.ProcessMemory(pid=1, name="init", rss_bytes=10 << 20)],
        )

    def SetGuestTime(self, request, context):
        if request.unix_nanos <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unix_nanos must be > 0")
        previous, self.clock = self.clock, request.unix_nanos
        return agent_pb2.SetGuestTimeResponse(previous_unix_nanos=previous)

    def AddEntropy(self, request, context):
        if request.data == b"slow":
            self.release.wait(10)
        elif request.data.startswith(b"abort:"):
            name = request.data.removeprefix(b"abort:").decode()
            context.abort(grpc.StatusCode[name], f"told to fail with {name}")
        return agent_pb2.AddEntropyResponse()

    def Shutdown(self, request, context):
        self.shutdowns.append(request.reboot)
        return agent_pb2.ShutdownResponse()


class Server:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.agent = FakeAgent()
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        agent_pb2_grpc.add_AgentServicer_to_server(self.agent, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.grpc.add_insecure_port(f"unix:{path}")
        self.grpc.start()

    def stop(self) -> None:
        self.agent.release.set()
        self.grpc.stop(0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "agent.sock")
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[AgentClient]:
    with AgentClient(server.path, timeout=5) as c:
        yield c


CODES = [
    ("INVALID_ARGUMENT", errors.InvalidArgument),
    ("NOT_FOUND", errors.NotFound),
    ("ALREADY_EXISTS", errors.AlreadyExists),
    ("FAILED_PRECONDITION", errors.FailedPrecondition),
    ("PERMISSION_DENIED", errors.PermissionDenied),
    ("RESOURCE_EXHAUSTED", errors.ResourceExhausted),
    ("UNIMPLEMENTED", errors.Unimplemented),
    ("INTERNAL", errors.Internal),
    ("UNAVAILABLE", errors.Unavailable),
    ("ABORTED", errors.Aborted),
]


@pytest.mark.parametrize(("name", "cls"), CODES)
def test_status_codes_become_exception_classes(client: AgentClient, name: str, cls) -> None:
    with pytest.raises(cls) as caught:
        client.add_entropy(f"abort:{name}".encode())
    err = caught.value
    assert isinstance(err, errors.AgentError)
    assert isinstance(err, errors.BulkheadError)
    assert err.code == grpc.StatusCode[name]
    assert err.details == f"told to fail with {name}"
    assert err.method == "bulkhead.v1.Agent/AddEntropy"
    assert f"told to fail with {name}" in str(err)


def test_every_call_takes_a_timeout(client: AgentClient) -> None:
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as caught:
        client.add_entropy(b"slow", timeout=0.3)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


class _NeverDone(grpc.Future):
    """A call gRPC never completes (what a lost completion looks like to the caller)."""

    def __init__(self) -> None:
        self.cancelled_by_caller = False

    def result(self, timeout=None):
        time.sleep(timeout)
        raise grpc.FutureTimeoutError()

    def cancel(self) -> bool:
        self.cancelled_by_caller = True
        return True

    cancelled = running = done = exception = traceback = add_done_callback = None


def test_a_call_grpc_never_completes_still_ends_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bulkhead import client as client_module

    monkeypatch.setattr(client_module, "LOST_CALL_GRACE", 0.2)
    lost = _NeverDone()

    class Rpc:
        def future(self, request, timeout):
            assert timeout == 0.3  # gRPC still gets the deadline itself
            return lost

    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match="abandoned") as caught:
        client_module.call("bulkhead.v1.Agent/AddEntropy", Rpc(), None, 0.3)
    assert 0.5 <= time.monotonic() - started < 3
    assert caught.value.method == "bulkhead.v1.Agent/AddEntropy" and lost.cancelled_by_caller


def test_no_server_is_unavailable_naming_the_socket(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    with AgentClient(missing, timeout=2) as c, pytest.raises(errors.Unavailable) as caught:
        c.health()
    assert "nobody.sock" in str(caught.value)


def test_health_and_wait_ready(server: Server, client: AgentClient) -> None:
    assert client.health() == "SERVING"
    client.wait_ready(timeout=5)
    server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert client.health() == "NOT_SERVING"
    with pytest.raises(errors.DeadlineExceeded) as caught:
        client.wait_ready(timeout=0.5)
    message = str(caught.value)
    assert str(server.path) in message
    assert "NOT_SERVING" in message


def test_wait_ready_waits_for_a_server_that_comes_later(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    servers: list[Server] = []
    timer = threading.Timer(0.5, lambda: servers.append(Server(path)))
    timer.start()
    try:
        with AgentClient(path) as c:
            c.wait_ready(timeout=15)
            assert c.health() == "SERVING"
    finally:
        timer.join()
        for s in servers:
            s.stop()


def test_guest_details_are_typed_and_dump_to_json(client: AgentClient) -> None:
    d = client.guest_details()
    assert d.kernel_release == "6.12.0-test"
    assert d.cpus == 2
    assert d.features == ("serial",)
    assert d.boot.agent_ready_ms == 5100.25
    assert d.agent_pid == 42
    assert d.processes[0].name == "init"
    assert d.boot.phases() == {
        "kernel → init": 2700.0,
        "init → agent start": 100.5,
        "agent start → agent ready": 2299.75,
    }
    data = d.to_dict()
    assert data["memory_total_bytes"] == 5 * 2**40  # a number, not protobuf-JSON's string
    assert data["boot"] == {
        "init_started_ms": 2700.0,
        "agent_started_ms": 2800.5,
        "agent_ready_ms": 5100.25,
    }
    assert data["kernel_modules"] == []
    assert data["processes"][0]["rss_bytes"] == 10 << 20
    # Fields the dataclass does not list are still reachable from the message.
    assert d.init_version == ""
    with pytest.raises(AttributeError):
        _ = d.no_such_field


def test_set_guest_time_defaults_to_now(server: Server, client: AgentClient) -> None:
    before = time.time_ns()
    assert client.set_guest_time() == 1_000_000_000
    assert before <= server.agent.clock <= time.time_ns()
    now = server.agent.clock
    assert client.set_guest_time(123) == now
    assert server.agent.clock == 123
    with pytest.raises(errors.InvalidArgument, match="unix_nanos"):
        client.set_guest_time(0)


def test_shutdown_and_entropy(server: Server, client: AgentClient) -> None:
    client.add_entropy(b"\x01" * 64, credit=True)
    client.shutdown()
    client.shutdown(reboot=True)
    assert server.agent.shutdowns == [False, True]


def test_targets() -> None:
    assert grpc_target(Path("/run/x/agent.sock")) == "unix:/run/x/agent.sock"
    assert grpc_target("/run/x/agent.sock") == "unix:/run/x/agent.sock"
    assert grpc_target("unix:/run/x/agent.sock") == "unix:/run/x/agent.sock"
    assert grpc_target("127.0.0.1:5000") == "127.0.0.1:5000"
    assert grpc_target("tcp://10.0.0.2:5000") == "10.0.0.2:5000"
    assert grpc_target("agent.sock").startswith("unix:/")
