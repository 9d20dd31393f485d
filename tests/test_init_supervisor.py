"""Unit tests of the agent supervision: back-off, the agent's command and environment,
spawning with a clean signal state, and how exits are described."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from bulkhead_init import log, signals, spawn, supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logger(tmp_path: Path) -> tuple[log.Logger, Path]:
    path = tmp_path / "console.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    yield log.Logger("init", "debug", fd), path
    os.close(fd)


def _exit_status(code: int) -> int:
    return code << 8


def _signal_status(signo: int) -> int:
    return signo


def test_backoff_doubles_caps_and_resets_after_healthy_run(logger) -> None:
    lg, path = logger
    clock = Clock()
    pids = iter(range(100, 200))
    attempts: list[int] = []

    def fake_spawn(attempt: int) -> int:
        attempts.append(attempt)
        return next(pids)

    r = supervisor.Respawner("agent", fake_spawn, lg, max_delay_ms=700, clock=clock)
    assert r.timeout() is None
    r.start()
    assert r.pid == 100

    delays = []
    for _ in range(5):
        clock.now += 1.0  # ran for a second: not healthy
        r.exited(_exit_status(1))
        delays.append(r.timeout())
        r.poll()
        assert r.pid is None  # not due yet
        clock.now += r.timeout()
        r.poll()
        assert r.pid is not None
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.7, 0.7])

    clock.now += supervisor.HEALTHY_S  # a healthy run resets the back-off
    r.exited(_signal_status(signal.SIGKILL))
    assert r.timeout() == pytest.approx(0.1)
    assert attempts == [0, 1, 2, 3, 4, 5]

    text = path.read_text()
    assert "agent started pid 100" in text
    assert "agent exited (exit code 1) after 1.0 s; restarting in 100 ms" in text
    assert "restarting in 700 ms" in text
    assert "agent exited (killed by SIGKILL) after 10.0 s; restarting in 100 ms" in text


def test_stop_prevents_restarts(logger) -> None:
    lg, path = logger
    clock = Clock()
    r = supervisor.Respawner("agent", lambda attempt: 42, lg, 5000, clock=clock)
    r.start()
    r.stop()
    r.exited(_signal_status(signal.SIGTERM))
    clock.now += 100
    r.poll()
    assert r.pid is None and r.timeout() is None
    assert "restarting" not in path.read_text()


def test_spawn_failure_is_retried_with_backoff(logger) -> None:
    lg, path = logger
    clock = Clock()
    calls = []

    def failing(attempt: int) -> int:
        calls.append(attempt)
        if attempt < 2:
            raise FileNotFoundError(2, "No such file or directory")
        return 7

    r = supervisor.Respawner("agent", failing, lg, 5000, clock=clock)
    r.start()
    assert r.pid is None and r.timeout() == pytest.approx(0.1)
    clock.now += 0.1
    r.poll()
    assert r.timeout() == pytest.approx(0.2)
    clock.now += 0.2
    r.poll()
    assert r.pid == 7 and calls == [0, 1, 2]
    assert "cannot start agent: [Errno 2] No such file or directory; retrying in 100 ms" in (
        path.read_text()
    )


def test_earliest_deadline() -> None:
    class Fake:
        def __init__(self, t: float | None) -> None:
            self.t = t

        def timeout(self) -> float | None:
            return self.t

    assert supervisor.earliest([]) is None
    assert supervisor.earliest([Fake(None), Fake(0.5), Fake(0.2)]) == 0.2  # type: ignore[list-item]


def test_agent_command_default_and_override(logger) -> None:
    lg, path = logger
    default = supervisor.agent_command({}, lg)
    assert default[1:4] == ["-I", "-S", "-c"]
    assert "sys.path.insert(0, '/usr/lib/bulkhead')" in default[4]
    assert "from bulkhead_agent.main import main; main()" in default[4]

    env = {"BULKHEAD_AGENT_CMD": "/bin/agent --flag 'two words'"}
    assert supervisor.agent_command(env, lg) == ["/bin/agent", "--flag", "two words"]

    assert supervisor.agent_command({"BULKHEAD_AGENT_CMD": "'unclosed"}, lg) == default
    assert "bad BULKHEAD_AGENT_CMD" in path.read_text()


def test_agent_environment_is_the_documented_one() -> None:
    env = supervisor.agent_environment(
        {"HOME": "/", "PATH": "/host/bin", "TERM": "linux"},
        started_ms=1234.6,
        restarts=3,
        modules=["vsock", "virtio_rng"],
        log="debug",
    )
    assert env == {
        "HOME": "/",
        "TERM": "linux",
        "PATH": supervisor.GUEST_PATH,
        "BULKHEAD_INIT_STARTED_MS": "1235",
        "BULKHEAD_AGENT_RESTARTS": "3",
        "BULKHEAD_MODULES": "vsock,virtio_rng",
        "BULKHEAD_LOG": "debug",
    }


def test_spawn_reports_exec_failure_and_reaps_the_child(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        spawn.spawn([str(tmp_path / "missing")], {"PATH": "/bin"})
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # the failed child was collected already


def _run_spawned(argv: list[str], out: Path) -> str:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        pid = spawn.spawn(argv, {"PATH": "/usr/bin:/bin"}, output_fd=fd)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out.read_text()


def test_spawn_gives_a_clean_slate(tmp_path: Path) -> None:
    # Give the parent a blocked and an ignored signal that the child must not inherit.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    old_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        status = _run_spawned(["cat", "/proc/self/status"], tmp_path / "status")
        stdin = _run_spawned(["readlink", "/proc/self/fd/0"], tmp_path / "stdin")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        signal.signal(signal.SIGQUIT, old_quit)
    fields = dict(line.split(":\t", 1) for line in status.splitlines())
    assert int(fields["SigBlk"], 16) == 0
    assert int(fields["SigIgn"], 16) == 0
    assert fields["Tgid"] == fields["NSsid"].split()[-1]  # session leader
    assert stdin.strip() == "/dev/null"


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (0, "exit code 0"),
        (3 << 8, "exit code 3"),
        (signal.SIGKILL, "killed by SIGKILL"),
        (signal.SIGSEGV | 0x80, "killed by SIGSEGV (core dumped)"),
    ],
)
def test_describe(status: int, text: str) -> None:
    assert signals.describe(status) == text
