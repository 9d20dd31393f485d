"""The host side of metrics and events, against real agents started natively: ``AgentClient``,
``Sandbox`` shortcuts (reconnecting across an agent restart), the merged exposition that
``bulkhead metrics serve`` serves, and the CLI commands.

A "sandbox" here is a state directory whose lock the test holds (so it counts as running) and
whose ``agent.sock`` is a symlink to a native agent's socket.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_agent_support import Agent, short_tmpdir, start_agent, wait_for

from bulkhead import Sandbox
from bulkhead.client import AgentClient
from bulkhead.errors import AgentError, Cancelled, OutOfRange, Unavailable
from bulkhead.events import Event
from bulkhead.metrics import SandboxesCollector, labelled, merge, parse_listen, serve
from bulkhead_proto.v1 import agent_pb2

pytestmark = pytest.mark.timeout(120)


@dataclass
class FakeSandbox:
    name: str
    agent: Agent
    workdir: Path
    restarts: int = 0

    def restart_agent(self) -> None:
        """What init does: the agent dies and a new one starts with the same run directory."""
        assert self.agent.stop() == 0, self.agent.log()
        self.restarts += 1
        env = {"BULKHEAD_AGENT_RESTARTS": str(self.restarts)}
        self.agent = start_agent(self.workdir, tcp=False, env=env)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(f"/tmp/bh-tel-{os.getpid()}")
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandboxes(state_dir: Path) -> Iterator[list[FakeSandbox]]:
    """Two running fake sandboxes, each with its own native agent."""
    made: list[FakeSandbox] = []
    with ExitStack() as stack:
        for name in ("alpha", "beta"):
            workdir = stack.enter_context(short_tmpdir())
            agent = start_agent(workdir, tcp=False)
            sandbox = FakeSandbox(name, agent, workdir)
            made.append(sandbox)
            stack.callback(lambda s=sandbox: s.agent.stop())
            directory = state_dir / name
            directory.mkdir(mode=0o700)
            (directory / "state.json").write_text(json.dumps({"name": name, "status": "running"}))
            lock = os.open(directory / "monitor.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            stack.callback(os.close, lock)
            (directory / "agent.sock").symlink_to(agent.socket_path)
        yield made


def series(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_sandbox_metrics_are_labelled_with_its_name(
    sandboxes: list[FakeSandbox], state_dir: Path
) -> None:
    text = Sandbox.get("alpha", state_dir=state_dir).metrics()
    found = series(text)
    assert {dict(labels)["sandbox"] for _, labels in found} == {"alpha"}
    assert ("bulkhead_guest_uptime_seconds", frozenset({("sandbox", "alpha")})) in found


def test_events_resume_from_the_last_seq_across_an_agent_restart(
    sandboxes: list[FakeSandbox], state_dir: Path
) -> None:
    alpha = sandboxes[0]
    sandbox = Sandbox.get("alpha", state_dir=state_dir)
    got: list[Event] = []
    errors: list[BaseException] = []
    stream = sandbox.events(since=0)

    def read() -> None:
        try:
            for event in stream:
                got.append(event)
                if len(got) == 2:
                    return
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    alpha.restart_agent()  # the stream breaks; follow() dials again from what it had
    wait_for(lambda: len(got) >= 1 or errors, 60, "the first agent_restarted event")
    alpha.restart_agent()
    reader.join(60)
    assert not errors and not reader.is_alive(), errors
    assert [(e.seq, e.kind, e.agent_restarts) for e in got] == [
        (1, "agent_restarted", 1),
        (2, "agent_restarted", 2),
    ]
    stream.close()


def test_a_stream_dialled_as_the_agent_stops_ends_and_never_hangs(
    sandboxes: list[FakeSandbox], state_dir: Path
) -> None:
    """The race behind a stream that never returned: the call goes out while the agent is
    stopping. It must end (an event, or an error to dial again on), within a deadline."""
    alpha = sandboxes[0]
    for attempt in range(20):
        client = AgentClient(str(alpha.agent.socket_path))
        outcome: list[object] = []

        def read(client: AgentClient = client, outcome: list[object] = outcome) -> None:
            try:
                with client.events(since=0) as stream:
                    outcome.append(next(stream))
            except AgentError as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        alpha.restart_agent()
        reader.join(30)
        try:
            assert not reader.is_alive(), f"attempt {attempt}: the stream never ended"
            assert outcome and isinstance(outcome[0], Unavailable | Cancelled | Event), outcome
        finally:
            client.close()


def test_event_stream_positions_and_errors(sandboxes: list[FakeSandbox], state_dir: Path) -> None:
    beta = sandboxes[1]
    beta.restart_agent()
    beta.restart_agent()  # events 1 and 2
    agent = Sandbox.get("beta", state_dir=state_dir).agent
    with agent.events() as new_only:
        assert new_only.last_seq == 2  # nothing yet, but it knows where it stands
    with agent.events(since=1) as stream:
        event = next(stream)
        assert (event.seq, event.kind, stream.last_seq) == (2, "agent_restarted", 2)
    with pytest.raises(OutOfRange, match="past the newest"), agent.events(since=50) as stream:
        next(stream)


def test_event_to_dict_and_str() -> None:
    message = agent_pb2.Event(
        seq=7, kind=agent_pb2.Event.CONTAINER_EXITED, time_unix=1.7e9, container_id="web", pid=9
    )
    message.exit.kind = agent_pb2.ProcessExit.SIGNALED
    message.exit.signal = 9
    message.exit.oom_killed = True
    event = Event.from_proto(message)
    assert event.kind == "container_exited" and event.exit is not None
    data = event.to_dict()
    assert data["exit"]["returncode"] == 137 and data["container_id"] == "web"
    assert "exec_id" not in data
    assert "web killed by SIGKILL (out of memory)" in str(event)


def test_merging_expositions_keeps_one_family_per_name() -> None:
    text = (
        '# HELP x_total things\n# TYPE x_total counter\nx_total{sandbox="guest"} 1.0\n'
        "# HELP h seconds\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1.0\nh_bucket{le="+Inf"} 2.0\nh_count 2.0\nh_sum 3.0\n'
    )
    merged = merge([labelled(text, "a"), labelled(text, "b")])
    assert [m.name for m in merged] == ["x", "h"]
    sandboxes = {s.labels["sandbox"] for s in merged[0].samples}
    assert sandboxes == {"a", "b"}  # the host's name wins over what the guest said
    assert len(merged[1].samples) == 8


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen(":9464") == ("0.0.0.0", 9464)
    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_listen("host:port")


def test_serve_merges_every_running_sandbox(sandboxes: list[FakeSandbox], state_dir: Path) -> None:
    server, thread, collector = serve("127.0.0.1:0", state_dir, timeout=10)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            assert reply.status == 200
            text = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        collector.close()
        thread.join(10)
    found = series(text)
    uptime = "bulkhead_guest_uptime_seconds"
    assert (uptime, frozenset({("sandbox", "alpha")})) in found
    assert (uptime, frozenset({("sandbox", "beta")})) in found
    for name in ("alpha", "beta"):
        assert found[("bulkhead_sandbox_up", frozenset({("sandbox", name)}))] == 1
    assert text.count("# TYPE bulkhead_guest_uptime_seconds gauge") == 1
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_sandbox_that_does_not_answer_is_down_not_an_error(
    sandboxes: list[FakeSandbox], state_dir: Path
) -> None:
    sandboxes[1].agent.stop()
    collector = SandboxesCollector(state_dir, timeout=2)
    try:
        families = {f.name: f for f in collector.collect()}
    finally:
        collector.close()
    up = {s.labels["sandbox"]: s.value for s in families["bulkhead_sandbox_up"].samples}
    assert up == {"alpha": 1, "beta": 0}
    uptime = families["bulkhead_guest_uptime_seconds"].samples
    assert [s.labels["sandbox"] for s in uptime] == ["alpha"]


def bulkhead(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bulkhead.cli", "--state-dir", str(state_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_cli_metrics_and_events(sandboxes: list[FakeSandbox], state_dir: Path) -> None:
    done = bulkhead(state_dir, "metrics", "alpha")
    assert done.returncode == 0, done.stderr
    assert 'bulkhead_guest_uptime_seconds{sandbox="alpha"}' in done.stdout

    sandboxes[0].restart_agent()
    sandboxes[0].restart_agent()
    done = bulkhead(state_dir, "events", "alpha", "--no-follow", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["seq"], e["kind"]) for e in lines] == [
        (1, "agent_restarted"),
        (2, "agent_restarted"),
    ]
    done = bulkhead(state_dir, "events", "alpha", "--since", "1", "--no-follow")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and "agent restarted (restart #2)" in done.stdout
    done = bulkhead(state_dir, "events", "alpha", "--since", "9", "--no-follow")
    assert done.returncode == 1 and "past the newest event 2" in done.stderr


def test_cli_stats_without_a_sandbox_covers_every_running_one(
    sandboxes: list[FakeSandbox], state_dir: Path
) -> None:
    done = bulkhead(state_dir, "stats", "--no-stream")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no running containers"  # native agents here run none
    done = bulkhead(state_dir, "stats", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []
