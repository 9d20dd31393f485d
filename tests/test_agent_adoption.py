"""A SIGKILLed agent's containers live on, and the agent init starts next adopts them, natively.

The agent runs as a subprocess on a run dir that outlives it (as /run does in the guest).
Each test kills it hard while containers run, starts a new one on the same run dir, and
checks what a host would: the containers are listed, output written meanwhile arrives,
exits that happened meanwhile are reported, stdin (and its end) still gets through, and
every RPC works on them. Waits have deadlines; flags the containers wait for are files the
test creates through their root filesystems, so nothing depends on timing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_agent_containers_support import (
    _ATTACHMENTS,
    RPC_TIMEOUT,
    Attachment,
    Client,
    build_busybox_rootfs,
    make_spec,
    mounts_under,
)
from test_agent_support import Agent, short_tmpdir, start_agent, wait_for

from bulkhead_proto.v1 import agent_pb2

pb = agent_pb2
pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
HIERARCHIES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
DEADLINE = 20.0


class Restartable:
    """The agent on one run dir: killed hard, started again, stopped in order at the end."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.starts = 0
        self.spawner_pid = 0
        self.agent: Agent | None = None
        self.channel: grpc.Channel | None = None
        self.client: Client
        self.start()

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    def start(self) -> None:
        log = self.workdir / "agent.log"
        if log.exists():  # keep the previous agent's log (its spawner still writes there)
            log.rename(self.workdir / f"agent-{self.starts}.log")
        self.starts += 1
        self.agent = start_agent(self.workdir, tcp=False, env=self.env)
        self.channel = grpc.insecure_channel(self.agent.target)
        self.client = Client(self.channel)

    def kill(self) -> None:
        """SIGKILL the agent, as a crash or the OOM killer would; its spawner stays."""
        assert self.agent is not None
        self._end_attachments()
        children = _children(self.agent.proc.pid)
        if not self.spawner_pid:  # else this agent adopted it (and has no child)
            assert len(children) == 1, f"the agent's children: {children}"
            self.spawner_pid = children[0]
        self.agent.proc.kill()
        self.agent.proc.wait(10)
        self.agent = None

    def stop(self) -> int:
        assert self.agent is not None
        self._end_attachments()
        code = self.agent.stop()
        self.agent = None
        return code

    def log(self) -> str:
        logs = sorted(self.workdir.glob("agent*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)

    def _end_attachments(self) -> None:
        while _ATTACHMENTS:
            _ATTACHMENTS.pop().cancel()
        if self.channel is not None:
            self.channel.close()
            self.channel = None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def wait_gone(pid: int, what: str) -> None:
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), DEADLINE, what)


@contextlib.contextmanager
def restartable_agent(extra_env: dict[str, str] | None = None) -> Iterator[Restartable]:
    """As running_agent: and in the end, whatever happened, no agent, spawner or mount left."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts)")
    with short_tmpdir() as tmp:
        rootfs = tmp / "rootfs"
        build_busybox_rootfs(rootfs)
        env = {
            "BULKHEAD_DEFAULT_ROOTFS": str(rootfs),
            "BULKHEAD_CGROUP_DIR": str(tmp / "no-cgroup" / "bulkhead"),
            **(extra_env or {}),
        }
        state = Restartable(tmp, env)
        try:
            yield state
            if state.agent is None:  # a test that failed after a kill: adopt, to clean up
                state.start()
            spawner = state.spawner_pid or _children(state.agent.proc.pid)[0]  # type: ignore[union-attr]
            assert state.stop() == 0, state.log()
            wait_gone(spawner, "the spawner to end with an orderly stop")
            assert not (state.run_dir / "spawner.sock").exists()
            assert mounts_under(tmp) == [], state.log()
        finally:
            if state.agent is not None:
                state.agent.proc.kill()
                state.agent.proc.wait(10)
            if state.spawner_pid:
                for pid in [*_descendants(state.spawner_pid), state.spawner_pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for target in reversed(mounts_under(tmp)):
                subprocess.run(["umount", "-l", target], check=False)


def read_until(attachment: Attachment, marker: bytes, stream: str = "stdout") -> bytes:
    seen = b""
    while marker not in seen:
        response = attachment.next()
        assert response is not None, f"stream ended before {marker!r}; got {seen!r}"
        if response.WhichOneof("event") == stream:
            seen += getattr(response, stream).data
    return seen


def rest_of(attachment: Attachment) -> tuple[list[pb.OutputGap], bytes, pb.ProcessExit]:
    """Gaps, stdout and the exit, checking offsets (a gap moves them on)."""
    gaps, out = [], b""
    while True:
        response = attachment.next()
        assert response is not None, f"stream ended without an exit; got {out!r}"
        kind = response.WhichOneof("event")
        if kind == "gap":
            assert not out, "a gap comes before any output"
            gaps.append(response.gap)
            attachment.received[response.gap.stream] = response.gap.to_offset
        elif kind == "stdout":
            out += response.stdout.data
        elif kind == "exit":
            assert attachment.next() is None, "nothing may follow the exit"
            return gaps, out, response.exit


def flag(env: Restartable, container_id: str) -> None:
    """Create /tmp/go in the container (through its overlay, as mounted for the agent)."""
    (env.run_dir / "containers" / container_id / "rootfs" / "tmp" / "go").touch()


WAITS_THEN_COUNTS = (
    "echo start; while [ ! -e /tmp/go ]; do sleep 0.02; done;"
    " i=0; while [ $i -lt 20 ]; do echo $i; i=$((i+1)); done;"
    " cat; echo cat-done; exit 3"
)


def test_a_killed_agent_is_succeeded_by_one_that_adopts_its_containers() -> None:
    with restartable_agent() as env:
        c = env.client
        # a: attached, says "start", then waits for its flag to write more.
        c.create("a", make_spec(["sh", "-c", WAITS_THEN_COUNTS]))
        attachment = Attachment(c.stub, "a")
        c.start("a")
        read_until(attachment, b"start\n")
        # b: an exec in a that ends while no agent is there.
        exec_script = (
            "echo b-start; while [ ! -e /tmp/go ]; do sleep 0.02; done; echo b-end; exit 4"
        )
        b_pid = c.exec("a", "b", {"args": ["sh", "-c", exec_script]})
        read_until(Attachment(c.stub, "a", "b"), b"b-start\n")
        # d: output the agent holds, unacknowledged, when it dies: that is lost with it.
        c.create("d", make_spec(["sh", "-c", "echo before; read x; echo after:$x"]))
        held_back = Attachment(c.stub, "d")
        c.start("d")
        read_until(held_back, b"before\n")
        # h: created, never started; s: a sleeper.
        c.create("h", make_spec(["echo", "h-ran"]))
        c.create("s", make_spec(["sleep", "1000"]))
        c.start("s")
        assert os.stat(env.run_dir / "spawner.sock").st_mode & 0o777 == 0o600

        env.kill()
        flag(env, "a")  # a counts, b ends: with no agent to read or reap for them
        wait_gone(b_pid, "the exec to end while the agent is dead")
        env.start()
        c = env.client
        assert _children(env.agent.proc.pid) == [], "it adopted, it did not fork a spawner"  # type: ignore[union-attr]

        listed = c.list()
        assert {k: v.status for k, v in listed.items()} == {
            "a": "running",
            "d": "running",
            "h": "created",
            "s": "running",
        }
        assert list(listed["a"].exec_ids) == ["b"]

        # The exit that happened meanwhile, and the output written before it.
        assert c.wait("a", "b").exit_code == 4
        gaps, out, exit_ = rest_of(Attachment(c.stub, "a", "b", stdout_offset=len(b"b-start\n")))
        assert (gaps, out, exit_.exit_code) == ([], b"b-end\n", 4)

        # a: what it wrote meanwhile follows on seamlessly (nothing was lost);
        # exec works; its stdin, and the end of it, get through.
        a = Attachment(c.stub, "a", stdout_offset=len(b"start\n"))
        counted = b"".join(f"{i}\n".encode() for i in range(20))
        assert read_until(a, counted) == counted
        c.exec("a", "later", {"args": ["echo", "exec-after"]})
        _gaps, out, exit_ = rest_of(Attachment(c.stub, "a", "later"))
        assert (out, exit_.exit_code) == (b"exec-after\n", 0)
        a.send(stdin=b"xyz\n", stdin_eof=True)
        gaps, out, exit_ = rest_of(a)
        assert (gaps, out, exit_.exit_code) == ([], b"xyz\ncat-done\n", 3)
        assert c.list()["a"].status == "stopped"

        # d: the agent had "before\n" and died: resuming from 0 says so, then goes on.
        d = Attachment(c.stub, "d")
        d.send(stdin=b"hi\n")
        gaps, out, exit_ = rest_of(d)
        assert [(g.stream, g.from_offset, g.to_offset) for g in gaps] == [
            ("stdout", 0, len(b"before\n"))
        ]
        assert (out, exit_.exit_code) == (b"after:hi\n", 0)

        # h: still held, and starts.
        h = Attachment(c.stub, "h")
        c.start("h")
        _gaps, out, exit_ = rest_of(h)
        assert (out, exit_.exit_code) == (b"h-ran\n", 0)

        # s: signals reach it.
        c.signal("s", signal.SIGKILL)
        assert c.wait("s").signal == signal.SIGKILL

        for container_id in ("a", "d", "h", "s"):
            c.remove(container_id)
        assert c.list() == {}
        assert mounts_under(env.run_dir / "containers") == [str(env.run_dir / "containers")]
        assert os.listdir(env.run_dir / "records") == []


def test_exits_and_start_failures_survive_more_than_one_restart() -> None:
    with restartable_agent() as env:
        c = env.client
        c.create("gone", make_spec(["sh", "-c", "exit 6"]))
        c.start("gone")
        c.create("nocmd", make_spec(["/bin/no-such-command"]))
        with pytest.raises(grpc.RpcError):
            c.start("nocmd")
        c.create("q", make_spec(["sh", "-c", "echo q-out; read x; exit 2"]))
        c.start("q")
        assert c.wait("gone").exit_code == 6
        for _ in range(2):
            env.kill()
            env.start()
            c = env.client
        assert c.wait("gone").exit_code == 6
        failed = c.wait("nocmd")
        assert failed.kind == pb.ProcessExit.START_FAILED
        assert failed.start_failure.step == "exec"
        q = Attachment(c.stub, "q")
        q.send(stdin=b"\n")
        gaps, out, exit_ = rest_of(q)
        # Both agents before had read "q-out\n" (never acknowledged): the offset says it.
        assert [(g.from_offset, g.to_offset) for g in gaps] == [(0, len(b"q-out\n"))]
        assert (out, exit_.exit_code) == (b"", 2)
        for container_id in ("gone", "nocmd", "q"):
            c.remove(container_id)


def test_a_terminal_survives_the_agent() -> None:
    with restartable_agent() as env:
        c = env.client
        c.create("t", make_spec(["sh", "-c", "tty; read x; echo got:$x"], terminal=True))
        t = Attachment(c.stub, "t")
        c.start("t")
        read_until(t, b"/dev/pts/")
        env.kill()
        env.start()
        c = env.client
        c.stub.ResizeTerminal(
            pb.ResizeTerminalRequest(container_id="t", rows=30, cols=90), timeout=RPC_TIMEOUT
        )
        t = Attachment(c.stub, "t", stdout_offset=t.received["stdout"])
        t.send(stdin=b"hi\n")
        gaps, out, exit_ = rest_of(t)
        assert b"got:hi" in out and exit_.exit_code == 0, (gaps, out)
        c.remove("t")


def test_a_container_half_made_when_the_agent_died_is_undone() -> None:
    with restartable_agent() as env:
        c = env.client
        c.create("kept", make_spec(["sleep", "1000"]))
        # What a create interrupted after the spawner made the process leaves: a process
        # and a records directory, but no record. (Removing the record makes one.)
        c.create("half", make_spec(["sleep", "1000"]))
        half_pid = c.list()["half"].pid
        (env.run_dir / "records" / "half" / "container.json").unlink()
        env.kill()
        env.start()
        c = env.client
        assert set(c.list()) == {"kept"}
        wait_gone(half_pid, "the half-made container's process to be killed")
        assert not (env.run_dir / "records" / "half").exists()
        assert mounts_under(env.run_dir / "containers" / "half") == []
        c.remove("kept")


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    found = [h for h in HIERARCHIES if (h / "cgroup.controllers").exists()]
    if not found:
        pytest.skip("no cgroup2 hierarchy on this host")
    directory = found[0] / f"bulkhead-adopt-{os.getpid()}"
    yield directory
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            path.rmdir()
    if directory.exists():
        directory.rmdir()


def test_pause_resume_stats_and_remove_after_adoption(tree: Path) -> None:
    with restartable_agent({"BULKHEAD_CGROUP_DIR": str(tree)}) as env:
        c = env.client
        c.create("p", make_spec(["sleep", "1000"]))
        c.start("p")
        c.create("r", make_spec(["sleep", "1000"]))
        c.start("r")
        c.stub.PauseContainer(pb.PauseContainerRequest(container_id="p"), timeout=RPC_TIMEOUT)
        env.kill()
        env.start()
        c = env.client
        assert {k: v.status for k, v in c.list().items()} == {"p": "paused", "r": "running"}
        c.stub.ResumeContainer(pb.ResumeContainerRequest(container_id="p"), timeout=RPC_TIMEOUT)
        assert c.list()["p"].status == "running"
        stats = c.stub.GetContainerStats(
            pb.ContainerStatsRequest(container_id="r"), timeout=RPC_TIMEOUT
        )
        assert stats.pids_current == 1 and stats.cpu_usage_usec > 0
        processes = c.stub.ListProcesses(
            pb.ListProcessesRequest(container_id="r"), timeout=RPC_TIMEOUT
        )
        assert [list(p.args) for p in processes.processes] == [["sleep", "1000"]]
        c.signal("r", signal.SIGKILL, all_=True)  # cgroup.kill
        assert c.wait("r").signal == signal.SIGKILL
        c.remove("p")
        c.remove("r")
        assert not (tree / "containers" / "p").exists()
        assert not (tree / "containers" / "r").exists()


def test_without_its_spawner_the_next_agent_cleans_up(tree: Path) -> None:
    with restartable_agent({"BULKHEAD_CGROUP_DIR": str(tree)}) as env:
        c = env.client
        c.create("x", make_spec(["sleep", "1000"]))
        c.start("x")
        pid = c.list()["x"].pid
        env.kill()
        # The spawner dies too (its processes, re-parented, are beyond anyone's reach).
        os.kill(env.spawner_pid, signal.SIGKILL)
        wait_gone(env.spawner_pid, "the spawner to die")
        env.spawner_pid = 0
        env.start()
        assert env.client.list() == {}
        wait_gone(pid, "the container's process, killed through its cgroup")
        assert not (tree / "containers" / "x").exists()
        assert mounts_under(env.run_dir / "containers" / "x") == []
