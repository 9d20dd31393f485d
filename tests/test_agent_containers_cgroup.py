"""The agent on a cgroup2 hierarchy, natively: here the host's hybrid ``/sys/fs/cgroup/unified``.

That hierarchy has no controllers to speak of (this host mounts them on v1), but the core of
cgroup v2 is all there: moving processes, cgroup.procs, cgroup.freeze, cgroup.kill,
cgroup.events and cpu.stat. So this covers the agent's own subtree, container groups,
pause/resume, signal-all, listings and removal; limits that bite (memory, pids, cpu) and
OOM kills need the guest (qemu-test/).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_agent_containers import code_of, read_until
from test_agent_containers_support import AgentEnv, Attachment, make_spec, running_agent
from test_agent_support import wait_for

from bulkhead_proto.v1 import agent_pb2

pb = agent_pb2
# A hybrid host's v2 hierarchy, or the host's own when it is all v2.
HIERARCHIES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    found = [h for h in HIERARCHIES if (h / "cgroup.controllers").exists()]
    if not found:
        pytest.skip("no cgroup2 hierarchy on this host")
    directory = found[0] / f"bulkhead-test-{os.getpid()}"
    yield directory
    # The agent is gone by now: its groups are empty and can go.
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            path.rmdir()
    if directory.exists():
        directory.rmdir()


@pytest.fixture(scope="module")
def env(tree: Path) -> Iterator[AgentEnv]:
    with running_agent({"BULKHEAD_CGROUP_DIR": str(tree)}) as state:
        yield state


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid} has no cgroup2 line")


def has_controller(tree: Path, name: str) -> bool:
    return name in (tree / "containers" / "cgroup.subtree_control").read_text().split()


def events(group: Path) -> dict[str, int]:
    pairs = (line.split() for line in (group / "cgroup.events").read_text().splitlines())
    return {key: int(value) for key, value in pairs}


def test_the_agent_lives_in_its_own_leaf(env: AgentEnv, tree: Path) -> None:
    agent_pid = env.agent.proc.pid
    assert cgroup_of(agent_pid) == f"/{tree.name}/agent"
    spawner_pids = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    assert spawner_pids and all(cgroup_of(int(p)) == f"/{tree.name}/agent" for p in spawner_pids)
    # Groups that hand controllers down hold no process themselves.
    assert (tree / "cgroup.procs").read_text() == ""
    assert (tree / "containers" / "cgroup.procs").read_text() == ""
    details = env.client.stub.GetGuestDetails(pb.GetGuestDetailsRequest(), timeout=10)
    assert "cgroup2" in details.features and "containers" in details.features


def test_container_group_listing_signals_and_removal(env: AgentEnv, tree: Path) -> None:
    c = env.client
    group = tree / "containers" / "cg1"
    # A background child the agent does not track: the cgroup still finds it.
    script = "trap 'echo term; exit 3' TERM; sleep 1000 & echo ready; wait"
    pid = c.create("cg1", make_spec(["sh", "-c", script]))
    try:
        assert group.is_dir() and cgroup_of(pid) == f"/{tree.name}/containers/cg1"
        attachment = Attachment(c.stub, "cg1")
        c.start("cg1")
        read_until(attachment, b"ready\n")
        exec_pid = c.exec("cg1", "e", {"args": ["sleep", "999"]})
        listed = c.stub.ListProcesses(pb.ListProcessesRequest(container_id="cg1"), timeout=10)
        args = sorted(tuple(p.args) for p in listed.processes)
        assert args == [("sh", "-c", script), ("sleep", "1000"), ("sleep", "999")]
        assert {pid, exec_pid} <= {p.pid for p in listed.processes}
        stats = c.stub.GetContainerStats(pb.ContainerStatsRequest(container_id="cg1"), timeout=10)
        assert stats.cpu_usage_usec > 0 and stats.pids_current == 3

        # SIGTERM to all, through cgroup.procs: the shell's trap runs, sleep dies.
        c.signal("cg1", signal.SIGTERM, all_=True)
        out = attachment.collect()
        assert out.stdout == b"term\n" and out.exit is not None and out.exit.exit_code == 3
        # Its own SIGTERM, or the SIGKILL the kernel sends all of a PID namespace whose
        # PID 1 (the shell) ended first.
        assert c.wait("cg1", "e").signal in (signal.SIGTERM, signal.SIGKILL)
    finally:
        c.remove("cg1")
    assert not group.exists()


def test_signal_all_sigkill_uses_cgroup_kill(env: AgentEnv, tree: Path) -> None:
    c = env.client
    c.create("cg2", make_spec(["sh", "-c", "sleep 1000 & sleep 1000 & echo ready; wait"]))
    try:
        attachment = Attachment(c.stub, "cg2")
        c.start("cg2")
        read_until(attachment, b"ready\n")
        c.signal("cg2", signal.SIGKILL, all_=True)
        exit_ = c.wait("cg2")
        assert exit_.signal == signal.SIGKILL and not exit_.oom_killed
        group = tree / "containers" / "cg2"
        wait_for(lambda: events(group)["populated"] == 0, 10, "an empty group")
    finally:
        c.remove("cg2")


def test_pause_and_resume(env: AgentEnv, tree: Path) -> None:
    c = env.client
    stub = c.stub
    group = tree / "containers" / "frozen"
    pause = pb.PauseContainerRequest(container_id="frozen")
    resume = pb.ResumeContainerRequest(container_id="frozen")
    c.create("frozen", make_spec(["sh", "-c", "read x; echo got $x"]))
    try:
        code = code_of(stub.PauseContainer, pause, timeout=10)
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # created, not running
        attachment = Attachment(stub, "frozen")
        c.start("frozen")
        stub.PauseContainer(pause, timeout=10)
        assert events(group)["frozen"] == 1
        assert c.list()["frozen"].status == "paused"
        assert (
            code_of(stub.PauseContainer, pause, timeout=10) == grpc.StatusCode.FAILED_PRECONDITION
        )
        assert (
            code_of(c.exec, "frozen", "x", {"args": ["true"]})
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        # Input waits in the pipe; the frozen shell cannot answer.
        attachment.send(stdin=b"late\n")
        with pytest.raises(grpc.RpcError) as info:
            c.wait("frozen", timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stub.ResumeContainer(resume, timeout=10)
        assert events(group)["frozen"] == 0
        assert c.list()["frozen"].status in ("running", "stopped")
        out = attachment.collect()
        assert out.stdout == b"got late\n"
        assert (
            code_of(stub.ResumeContainer, resume, timeout=10) == grpc.StatusCode.FAILED_PRECONDITION
        )
    finally:
        c.remove("frozen")


def test_remove_a_paused_container(env: AgentEnv, tree: Path) -> None:
    c = env.client
    c.create("pausedrm", make_spec(["sh", "-c", "trap 'exit 4' TERM; sleep 1000 & wait"]))
    c.start("pausedrm")
    c.stub.PauseContainer(pb.PauseContainerRequest(container_id="pausedrm"), timeout=10)
    waiter = c.stub.WaitProcess.future(pb.WaitProcessRequest(container_id="pausedrm"), timeout=30)
    c.remove("pausedrm", timeout_ms=5000)  # thawed, so the SIGTERM is acted upon
    assert waiter.result().exit_code == 4
    assert not (tree / "containers" / "pausedrm").exists()


def test_failed_create_removes_its_group(env: AgentEnv, tree: Path) -> None:
    spec = make_spec(["true"])
    spec["mounts"].append({"destination": "/sys", "type": "no-such-fs", "source": "none"})
    assert code_of(env.client.create, "cgfail", spec) == grpc.StatusCode.FAILED_PRECONDITION
    assert not (tree / "containers" / "cgfail").exists()
    if has_controller(tree, "pids"):
        return  # an all-v2 host: the next part needs a hierarchy without it
    # Limits whose controller this hierarchy lacks: refused, nothing left either.
    spec = make_spec(["true"])
    spec["linux"]["resources"] = {"pids": {"limit": 10}}
    code = code_of(env.client.create, "cgfail", spec)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "pids.max" in code_of.details  # type: ignore[attr-defined]
    assert not (tree / "containers" / "cgfail").exists()
    assert "cgfail" not in env.client.list()


def test_update(env: AgentEnv, tree: Path) -> None:
    c = env.client
    c.create("upd", make_spec(["sleep", "1000"]))
    try:
        request = pb.UpdateContainerRequest(container_id="upd", resources=b'{"pids": {"limit": 5}}')
        if has_controller(tree, "pids"):
            c.stub.UpdateContainer(request, timeout=10)
            assert (tree / "containers" / "upd" / "pids.max").read_text() == "5\n"
            return
        assert (
            code_of(c.stub.UpdateContainer, request, timeout=10)
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "pids.max" in code_of.details  # type: ignore[attr-defined]
        c.stub.UpdateContainer(
            pb.UpdateContainerRequest(container_id="upd", resources=b"{}"), timeout=10
        )
    finally:
        c.remove("upd")
