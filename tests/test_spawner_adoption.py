"""A listening spawner outlives its agent: processes, exit statuses and stdio survive, natively.

The "agent" here is the test process: it drops its connection without a shutdown (as a
SIGKILLed agent would), then adopts the spawner again through its socket. Every wait has a
deadline; the one negative check (stdin stays open while the spawner holds a copy) is
bounded and says so.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import test_spawner_containers
from test_spawner_containers import TIMEOUT, make_spec, read_until_eof

from bulkhead_agent.spawner.client import Adopted, ExitEvent, Spawner

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
    pytest.mark.timeout(60),
]


bundle = test_spawner_containers.bundle  # the busybox bundle fixture, shared


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="bh-spawner-")
    yield os.path.join(directory, "spawner.sock")
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


@pytest.fixture(autouse=True)
def no_spawner_left() -> Iterator[None]:
    """A failed test must not leave an orphaned spawner (and its processes) running."""
    before = set(_children(os.getpid()))
    yield
    for pid in set(_children(os.getpid())) - before:
        for victim in [*_descendants(pid), pid]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


class Stdio:
    """Pipes for one process: its ends go to the spawner, ours (to keep) stay here."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()

    @property
    def theirs(self) -> list[int]:
        return [self.stdin_r, self.out_w, self.err_w]

    @property
    def ours(self) -> dict[str, int]:
        return {"stdin": self.stdin_w, "stdout": self.out_r, "stderr": self.err_r}

    def handed_over(self) -> None:
        for fd in self.theirs:
            os.close(fd)

    def close(self) -> None:
        """What an agent that dies does to them."""
        for fd in self.ours.values():
            os.close(fd)


async def create(spawner: Spawner, bundle: str, name: str, args: list[str]) -> tuple[int, Stdio]:
    stdio = Stdio()
    try:
        pid = await spawner.create(
            name, bundle=bundle, spec=make_spec(args), stdio=stdio.theirs, keep=stdio.ours
        )
    finally:
        stdio.handed_over()
    return pid, stdio


def read_line(fd: int, deadline: float) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no whole line yet: {line!r}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 1)
            assert chunk, f"end of stream after {line!r}"
            line += chunk
    return line


def wait_gone(pid: int, deadline: float) -> None:
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.01)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def by_name(adopted: list[Adopted]) -> dict[str, Adopted]:
    return {(c.exec_id or c.container_id): c for c in adopted}


def test_processes_exits_and_stdio_survive_the_agent(bundle: str, socket_path: str) -> None:
    async def before() -> tuple[Spawner, dict[str, int]]:
        spawner = Spawner.launch(listen=socket_path)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        held_pid, held = await create(spawner, bundle, "held", ["echo", "held-ran"])
        talker_pid, talker = await create(
            spawner, bundle, "talker", ["sh", "-c", "echo one; read x; echo two:$x; exit 5"]
        )
        await spawner.start("talker")
        assert read_line(talker.out_r, time.monotonic() + TIMEOUT) == b"one\n"
        quick_pid, quick = await create(
            spawner, bundle, "quick", ["sh", "-c", "read x; echo got:$x; exit 7"]
        )
        await spawner.start("quick")
        # An exec, which ends while no agent is there; its output waits in the pipe.
        ex = Stdio()
        try:
            exec_pid = await spawner.exec(
                "talker",
                {"args": ["sh", "-c", "read x; echo exec:$x; exit 9"], "cwd": "/"},
                stdio=ex.theirs,
                exec_id="ex",
                keep=ex.ours,
            )
        finally:
            ex.handed_over()
        spawner.detach()  # the agent dies: no shutdown
        os.write(quick.stdin_w, b"a\n")
        os.write(ex.stdin_w, b"b\n")
        deadline = time.monotonic() + TIMEOUT
        wait_gone(quick_pid, deadline)  # reaped by the orphaned spawner: nobody got its exit
        wait_gone(exec_pid, deadline)
        for stdio in (held, talker, quick, ex):
            stdio.close()
        pids = {"held": held_pid, "talker": talker_pid, "quick": quick_pid, "ex": exec_pid}
        return spawner, pids

    async def after(old: Spawner, pids: dict[str, int]) -> None:
        found = Spawner.connect(socket_path, timeout=TIMEOUT)
        assert found is not None
        spawner, adopted = found
        assert spawner.pid == old.pid
        spawner.listen()
        try:
            children = by_name(adopted)
            assert set(children) == {"held", "talker", "quick", "ex"}
            held, talker, quick, ex = (children[n] for n in ("held", "talker", "quick", "ex"))
            assert (held.state, held.pid, held.kind) == ("created", pids["held"], "container")
            assert (talker.state, talker.pid) == ("running", pids["talker"])
            assert (quick.state, quick.exit) == (
                "exited",
                ExitEvent(pids["quick"], 7, None, "quick", ""),
            )
            assert (ex.state, ex.kind, ex.container_id, ex.exit) == (
                "exited",
                "exec",
                "talker",
                ExitEvent(pids["ex"], 9, None, "talker", "ex"),
            )
            # A running process keeps all three; an ended one its output only.
            assert set(talker.fds) == {"stdin", "stdout", "stderr"}
            assert set(quick.fds) == set(ex.fds) == {"stdout", "stderr"}
            deadline = time.monotonic() + TIMEOUT
            # Output written while no agent was there is still in the pipes.
            assert read_until_eof([quick.fds["stdout"], quick.fds["stderr"]], deadline) == [
                b"got:a\n",
                b"",
            ]
            assert read_until_eof([ex.fds["stdout"]], deadline) == [b"exec:b\n"]
            # The running one goes on with its adopted stdio; its exit is an event again.
            os.write(talker.fds["stdin"], b"x\n")
            assert read_line(talker.fds["stdout"], deadline) == b"two:x\n"
            event = await asyncio.wait_for(spawner.exits.get(), TIMEOUT)
            assert (event.container_id, event.exit_code) == ("talker", 5)
            # The held one can still be started.
            await spawner.start("held")
            assert read_line(held.fds["stdout"], deadline) == b"held-ran\n"
            event = await asyncio.wait_for(spawner.exits.get(), TIMEOUT)
            assert (event.container_id, event.exit_code) == ("held", 0)
            # Forgetting a container closes what the spawner still kept of it.
            before_forget = fd_count(spawner.pid)
            await spawner.forget("quick")
            assert fd_count(spawner.pid) == before_forget - 2
            await spawner.release("talker", "ex")
            assert fd_count(spawner.pid) == before_forget - 4
        finally:
            for child in adopted:
                for fd in child.fds.values():
                    os.close(fd)
            spawner.close(kill=True)
        assert not os.path.exists(socket_path)  # an orderly end: nobody is to find it

    spawner, pids = asyncio.run(before())
    asyncio.run(after(spawner, pids))


def test_stdin_reaches_its_end_only_once_the_kept_copy_is_dropped(
    bundle: str, socket_path: str
) -> None:
    async def scenario() -> None:
        spawner = Spawner.launch(listen=socket_path)
        try:
            _pid, stdio = await create(spawner, bundle, "cat", ["sh", "-c", "cat; echo done"])
            await spawner.start("cat")
            os.write(stdio.stdin_w, b"hi\n")
            os.close(stdio.stdin_w)
            deadline = time.monotonic() + TIMEOUT
            assert read_line(stdio.out_r, deadline) == b"hi\n"
            # Bounded negative check: the spawner's copy keeps the pipe open.
            assert select.select([stdio.out_r], [], [], 0.3)[0] == []
            await spawner.drop_stdin("cat")
            assert read_until_eof([stdio.out_r], deadline) == [b"done\n"]
            event = await asyncio.wait_for(spawner.exits.get(), TIMEOUT)
            assert event.exit_code == 0
            os.close(stdio.out_r)
            os.close(stdio.err_r)
        finally:
            spawner.close(kill=True)

    asyncio.run(scenario())


def test_only_a_process_of_our_mount_namespace_may_adopt(bundle: str, socket_path: str) -> None:
    # What a container process would be: its own mount namespace (same uid, root).
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.settimeout(10)\n"
        f"s.connect({socket_path!r})\n"
        "try:\n"
        '    s.send(b\'{"op":"adopt","id":1}\')\n'
        "    data = s.recv(65536)\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    data = b''\n"
        "print(repr(data))\n"
    )

    async def scenario() -> None:
        spawner = Spawner.launch(listen=socket_path)
        pid, stdio = await create(spawner, bundle, "s", ["sleep", "1000"])
        await spawner.start("s")
        stdio.close()
        spawner.detach()
        outsider = subprocess.run(
            ["unshare", "--mount", sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert outsider.stdout.strip() == "b''", outsider  # closed on it, nothing told
        found = Spawner.connect(socket_path, timeout=TIMEOUT)
        assert found is not None
        adopted_spawner, adopted = found
        assert [(c.container_id, c.pid, c.state) for c in adopted] == [("s", pid, "running")]
        for child in adopted:
            for fd in child.fds.values():
                os.close(fd)
        adopted_spawner.close(kill=True)
        wait_gone(pid, time.monotonic() + TIMEOUT)

    asyncio.run(scenario())


def test_without_a_socket_the_spawner_ends_with_its_agent(bundle: str) -> None:
    async def scenario() -> None:
        spawner = Spawner.launch()
        await spawner.ping()
        pidfd = os.pidfd_open(spawner.pid)
        try:
            spawner.detach()
            assert select.select([pidfd], [], [], TIMEOUT)[0], "the spawner did not exit"
        finally:
            os.close(pidfd)
        os.waitpid(spawner.pid, 0)

    asyncio.run(scenario())


def test_nobody_listening_is_no_adoption(socket_path: str) -> None:
    assert Spawner.connect(socket_path, timeout=1) is None  # no socket at all
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(socket_path)
    stale.close()  # a socket file nobody listens on: a previous spawner's
    assert Spawner.connect(socket_path, timeout=1) is None
    assert not os.path.exists(socket_path)
