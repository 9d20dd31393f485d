"""The bench-only raw byte source: off unless asked for, and then beside gRPC on the same mux.

The test plays the host on the serial port's unix socket, as ``test_agent_serial`` does;
``serve_clients`` relays each connection over a new mux connection, like the host's relay.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from test_agent_support import Agent, HostMux, health_status, short_tmpdir, start_agent

from bulkhead_agent.bridge.bench_raw import RAW_MAGIC, SOCKET_NAME
from bulkhead_agent.settings import from_config
from bulkhead_init import cmdline
from bulkhead_proto import mux
from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc


@contextmanager
def agent_on_mux(bench: bool) -> Iterator[tuple[Agent, HostMux, str]]:
    with short_tmpdir() as tmp:
        host = HostMux(tmp / "serial.sock")
        env = {"BULKHEAD_BENCH": "1"} if bench else {}
        agent = start_agent(tmp, serial_device=str(tmp / "serial.sock"), tcp=False, env=env)
        try:
            host.accept()
            host.hello()
            host.wait_hellos(2)
            yield agent, host, host.serve_clients(tmp / "host.sock")
        finally:
            code = agent.stop()
            host.close()
        assert code == 0, agent.log()


def raw_request(target: str, size: int) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(target.removeprefix("unix:"))
        sock.sendall(RAW_MAGIC + b"%d\n" % size)
        chunks = []
        while data := sock.recv(1 << 20):
            chunks.append(data)
        return b"".join(chunks)


def test_bench_mode_serves_raw_bytes_beside_grpc() -> None:
    with agent_on_mux(bench=True) as (agent, host, target):
        size = 3 * mux.WINDOW + 5  # only gets through if the host's credit keeps coming
        assert raw_request(target, size) == bytes(size)
        assert raw_request(target, 0) == b""
        # gRPC connections still reach the gRPC server.
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health_status(target, "bulkhead.v1.Agent", timeout=10) == serving
        with grpc.insecure_channel(target) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            details = stub.GetGuestDetails(agent_pb2.GetGuestDetailsRequest(), timeout=10)
        assert "bench-raw" in details.features
        assert (agent.run_dir / SOCKET_NAME).stat().st_mode & 0o777 == 0o600
        assert not host.violations, host.violations


def test_without_bench_mode_there_is_no_raw_source() -> None:
    with agent_on_mux(bench=False) as (agent, _host, target):
        # The request goes to the gRPC server, which answers it as HTTP/2, not with zeros.
        assert raw_request(target, 4096) != bytes(4096)
        assert not Path(agent.run_dir / SOCKET_NAME).exists()
        with grpc.insecure_channel(target) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            details = stub.GetGuestDetails(agent_pb2.GetGuestDetailsRequest(), timeout=10)
        assert "bench-raw" not in details.features


def test_the_kernel_option_turns_it_on_and_is_off_by_default() -> None:
    assert cmdline.Config().bench is False
    assert cmdline.parse("quiet bulkhead.bench=1")[0].bench is True
    assert cmdline.parse("bulkhead.bench=off")[0].bench is False
    config, warnings = cmdline.parse("bulkhead.bench=maybe")
    assert config.bench is False and "bulkhead.bench=maybe" in warnings[0]
    assert from_config(cmdline.parse("bulkhead.bench=on")[0], env={})[0].bench
    assert not from_config(cmdline.Config(), env={})[0].bench
