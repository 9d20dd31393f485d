"""Boot the real guest and use it through the host client, as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
from conftest import TRANSPORTS, wait_for

from bulkhead import AgentClient, Sandbox
from bulkhead.errors import BulkheadError, InvalidArgument

WANTED_MODULES = {"virtio_console", "vmw_vsock_virtio_transport", "virtio_blk", "overlay"}


def test_agent_serves_and_describes_the_guest(sandbox: Sandbox, image) -> None:
    assert sandbox.agent.health() == "SERVING"
    d = sandbox.agent.guest_details()
    assert d.cpus == 2
    assert 400 * 2**20 < d.memory_total_bytes <= 512 * 2**20
    assert d.cgroup_version == 2
    assert d.kernel_release == image.manifest["kernel_release"]
    assert set(d.kernel_modules) >= WANTED_MODULES
    # Every module the image carries loaded: one that fails (a missing soft dependency, say)
    # takes a filesystem or a device with it.
    assert set(d.kernel_modules) >= set(image.manifest["modules"])
    assert d.agent_restarts == 0
    assert "serial" in d.features
    # The agent listens on vsock exactly when the sandbox has a vsock device.
    assert ("vsock" in d.features) == (sandbox.transport != "serial")
    # The boot timeline is measured in the guest, from kernel start.
    b = d.boot
    assert 0 < b.init_started_ms < b.agent_started_ms < b.agent_ready_ms
    assert b.agent_ready_ms < d.uptime_seconds * 1000


def test_standard_grpc_tools_see_health_and_reflection(sandbox: Sandbox) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"unix:{sandbox.agent_socket}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"bulkhead.v1.Agent", "grpc.health.v1.Health"} <= services
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service="bulkhead.v1.Agent"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_requests_name_the_field(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgument, match="unix_nanos"):
        sandbox.agent.set_guest_time(0)
    with pytest.raises(InvalidArgument, match="data"):
        sandbox.agent.add_entropy(b"")
    with pytest.raises(InvalidArgument, match="data"):
        sandbox.agent.add_entropy(b"x" * (2 << 20))
    # And the agent is still fine afterwards.
    assert sandbox.agent.health() == "SERVING"


def test_guest_clock_and_entropy_from_the_host(sandbox: Sandbox) -> None:
    previous = sandbox.agent.set_guest_time()
    # The guest had some clock before (its RTC), which the reply reports.
    assert previous > 0
    sandbox.agent.add_entropy(os.urandom(4096), credit=True)


def test_a_client_disconnects_and_a_new_one_gets_a_fresh_session(sandbox: Sandbox) -> None:
    first = AgentClient(sandbox.agent_socket)
    assert first.health() == "SERVING"
    first.close()

    # A client that goes away mid-handshake must not disturb anyone.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(sandbox.agent_socket))
    raw.sendall(b"PRI * HTTP/2.0\r\n")  # half an HTTP/2 preface, then gone
    raw.close()

    with AgentClient(sandbox.agent_socket) as second:
        assert second.guest_details().agent_restarts == 0


def test_two_clients_use_one_sandbox_at_once(sandbox: Sandbox) -> None:
    errors: list[BaseException] = []
    counts = [0, 0]

    def work(i: int) -> None:
        try:
            with AgentClient(sandbox.agent_socket) as client:
                for _ in range(15):
                    assert client.guest_details().cpus == 2
                    counts[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert counts == [15, 15]


def test_many_clients_at_once(sandbox: Sandbox) -> None:
    # Twelve clients, each its own connection through the relay and the channel, all
    # handshaking at once and then calling in parallel.
    errors: list[BaseException] = []
    done = [0] * 12

    def work(i: int) -> None:
        try:
            with AgentClient(sandbox.agent_socket, timeout=60) as client:
                for _ in range(5):
                    assert client.guest_details().cpus == 2
                    done[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(done))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert done == [5] * len(done)


@pytest.mark.parametrize("channel", TRANSPORTS)
def test_init_brings_back_a_killed_agent(boot, channel: str) -> None:
    sb = boot(f"agentkill-{channel}", debug_console=True, transport=channel)
    before = sb.agent.guest_details()
    # A stream that is open when the agent dies: the guest resets its connection.
    follower_client = AgentClient(sb.agent_socket, timeout=5)
    stream = follower_client.events(timeout=300)
    assert stream.newest_at_start >= 0  # the agent has begun the call: the stream is open
    stream_end: list[BaseException | None] = []

    def follow() -> None:
        try:
            for _ in stream:
                pass
            stream_end.append(None)
        except BaseException as exc:
            stream_end.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    # SIGKILL the agent from inside the guest, through the debug console shell.
    sb.console_send(f"kill -9 {before.agent_pid}\n")

    def restarted():
        with AgentClient(sb.agent_socket, timeout=5) as client:
            d = client.guest_details()
            return d if d.agent_restarts >= 1 else None

    after = wait_for(restarted, 60, "the agent to be restarted by init")
    # The stream that was open ended with an error (not a hang, not a clean end).
    follower.join(60)
    assert stream_end, "the event stream still hangs after the agent died"
    assert isinstance(stream_end[0], BulkheadError), stream_end
    follower_client.close()
    assert after.agent_pid != before.agent_pid
    assert after.boot.init_started_ms == pytest.approx(before.boot.init_started_ms)
    assert "agent exited" in sb.console_log()
    # The VM stayed up the whole time: the same QEMU process serves the new agent.
    assert psutil.pid_exists(sb.qemu_pid)


def test_a_bad_kernel_option_is_reported_not_fatal(boot) -> None:
    sb = boot("badopt", extra_cmdline=["bulkhead.bogus=1", "bulkhead.vsock_port=abc"])
    assert sb.agent.health() == "SERVING"
    log = sb.console_log()
    assert "bad kernel option 'bulkhead.bogus=1'" in log
    assert "bad kernel option 'bulkhead.vsock_port=abc'" in log
    assert "Kernel panic" not in log


def test_down_leaves_no_qemu_and_no_state(boot, state_dir) -> None:
    sb = boot("downme")
    qemu_pid, sandbox_dir = sb.qemu_pid, sb.dir
    assert psutil.Process(qemu_pid).name().startswith("qemu")
    sb.down(timeout=30)
    wait_for(lambda: not psutil.pid_exists(qemu_pid), 10, "QEMU to be gone")
    assert not sandbox_dir.exists()
    assert "downme" not in [s.name for s in Sandbox.list(state_dir=state_dir)]


def test_cli_session(image, state_dir) -> None:
    def bulkhead(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "bulkhead.cli", "--state-dir", str(state_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)

    up = bulkhead("sandbox", "up", "clisb", "--memory", "384", "--image", str(image.path))
    assert up.returncode == 0, up.stderr
    try:
        listed = json.loads(bulkhead("sandbox", "ls", "--json").stdout)
        assert [s["name"] for s in listed if s["name"] == "clisb"] == ["clisb"]
        info = bulkhead("sandbox", "info", "clisb", "--json")
        assert info.returncode == 0, info.stderr
        details = json.loads(info.stdout)
        assert details["guest"]["cgroup_version"] == 2
        assert details["guest"]["boot"]["agent_ready_ms"] > 0
        human = bulkhead("sandbox", "info", "clisb")
        assert "agent ready" in human.stdout
        again = bulkhead("sandbox", "up", "clisb", "--image", str(image.path))
        assert again.returncode == 1
        assert "already" in again.stderr
    finally:
        started = time.monotonic()
        down = bulkhead("sandbox", "down", "clisb")
    assert down.returncode == 0, down.stderr
    assert time.monotonic() - started < 60
    missing = bulkhead("sandbox", "info", "clisb")
    assert missing.returncode == 1
    assert "clisb" in missing.stderr
