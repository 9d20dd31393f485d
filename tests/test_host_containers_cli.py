"""The container CLI (`bulkhead run/exec/ps/...`) as a subprocess, against a fake sandbox.

The sandbox is a state directory whose lock this test holds (so it counts as alive) and whose
``agent.sock`` is the fake agent of ``test_host_containers`` serving over a real unix socket.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from test_host_containers import DEADLINE, FakeAgent, expected_streams

from bulkhead.state import SandboxPaths
from bulkhead_proto.v1 import agent_pb2_grpc

SANDBOX = "fake"


@pytest.fixture
def fake_sandbox() -> Iterator[tuple[FakeAgent, Path]]:
    # Unix socket paths are short (108 bytes): not under pytest's tmp_path.
    state_dir = Path(f"/tmp/bh-cli-{os.getpid()}")
    paths = SandboxPaths(state_dir / SANDBOX)
    paths.dir.mkdir(parents=True, mode=0o700)
    (paths.dir / "state.json").write_text(json.dumps({"name": SANDBOX, "status": "running"}))
    lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    fake = FakeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    agent_pb2_grpc.add_AgentServicer_to_server(fake, server)
    server.add_insecure_port(f"unix:{paths.agent_sock}")
    server.start()
    try:
        yield fake, state_dir
    finally:
        server.stop(0)
        os.close(lock_fd)
        shutil.rmtree(state_dir, ignore_errors=True)


def cli(state_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bulkhead.cli", "--state-dir", str(state_dir), *args]


def bulkhead(state_dir: Path, *args: str, input: bytes | None = None):
    return subprocess.run(
        cli(state_dir, *args), input=input, capture_output=True, timeout=60, check=False
    )


def test_run_prints_both_streams_and_exits_with_the_status(fake_sandbox) -> None:
    _fake, state_dir = fake_sandbox
    done = bulkhead(state_dir, "run", "--sandbox", SANDBOX, "--", "say", "out", "err", "7")
    assert done.returncode == 7, done.stderr
    assert done.stdout == b"out\n"
    assert done.stderr == b"err\n"


def test_run_streams_binary_output_exactly(fake_sandbox) -> None:
    fake, state_dir = fake_sandbox
    done = bulkhead(
        state_dir, "run", "--sandbox", SANDBOX, "--rm", "--name", "gen", "gen", "3000000"
    )
    assert done.returncode == 0, done.stderr[-500:]
    want = expected_streams(3_000_000)
    assert done.stdout == want["stdout"]
    assert done.stderr == want["stderr"]
    assert fake.removed == ["gen"]


def test_run_interactive_sends_stdin_and_its_eof(fake_sandbox) -> None:
    _fake, state_dir = fake_sandbox
    payload = os.urandom(300_000)
    done = bulkhead(state_dir, "run", "-i", "--sandbox", SANDBOX, "--", "cat", input=payload)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout == payload


def test_run_without_i_gives_eof_on_stdin(fake_sandbox) -> None:
    _fake, state_dir = fake_sandbox
    done = bulkhead(state_dir, "run", "--sandbox", SANDBOX, "--", "cat", input=b"ignored")
    assert done.returncode == 0
    assert done.stdout == b""


def test_a_signal_to_bulkhead_reaches_the_container(fake_sandbox) -> None:
    fake, state_dir = fake_sandbox
    proc = subprocess.Popen(
        cli(state_dir, "run", "--sandbox", SANDBOX, "--rm", "--name", "sleeper", "--", "hang"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + DEADLINE
    while ("sleeper", "") not in fake.procs or not fake.started:
        assert time.monotonic() < deadline, "the container never started"
        time.sleep(0.05)
    time.sleep(0.3)  # let the CLI install its signal handlers after start
    proc.send_signal(signal.SIGINT)
    assert proc.wait(DEADLINE) == 128 + signal.SIGINT
    assert fake.signals == [signal.SIGINT]
    assert fake.removed == ["sleeper"]


def test_a_start_failure_is_127_with_a_message(fake_sandbox) -> None:
    _fake, state_dir = fake_sandbox
    done = bulkhead(state_dir, "run", "--sandbox", SANDBOX, "--", "missing")
    assert done.returncode == 127
    assert b"failed to start: exec: not found" in done.stderr


def test_bulkhead_errors_are_125_for_run_and_1_for_the_rest(fake_sandbox) -> None:
    _fake, state_dir = fake_sandbox
    bad_spec = bulkhead(state_dir, "run", "--sandbox", SANDBOX, "-w", "relative", "--", "true")
    assert bad_spec.returncode == 125
    assert bad_spec.stderr.startswith(b"bulkhead: error: ")
    assert b"absolute" in bad_spec.stderr
    no_sandbox = bulkhead(state_dir, "run", "--sandbox", "nosuch", "--", "true")
    assert no_sandbox.returncode == 125
    assert b"nosuch" in no_sandbox.stderr
    no_command = bulkhead(state_dir, "run", "--sandbox", SANDBOX)
    assert no_command.returncode == 125
    assert b"no command" in no_command.stderr
    pause = bulkhead(state_dir, "pause", SANDBOX, "nosuch")
    assert pause.returncode == 1
    assert pause.stderr.startswith(b"bulkhead: error: ")


def test_run_detached_then_exec(fake_sandbox) -> None:
    _fake, state_dir = fake_sandbox
    started = bulkhead(state_dir, "run", "-d", "--sandbox", SANDBOX, "--name", "box", "--", "hang")
    assert started.returncode == 0, started.stderr
    assert started.stdout == b"box\n"
    done = bulkhead(state_dir, "exec", SANDBOX, "box", "--", "say", "in", "side", "3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"in\n", b"side\n")


def test_run_tty_in_raw_mode_with_resize(fake_sandbox) -> None:
    """Under a real pty: raw mode (Ctrl-C is a byte for the guest), the size sent, mode restored."""
    fake, state_dir = fake_sandbox
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        cli(state_dir, "run", "-it", "--sandbox", SANDBOX, "--", "tty-cat"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while not fake.resizes:
            assert time.monotonic() < deadline, "no ResizeTerminal after start"
            time.sleep(0.05)
        assert fake.resizes[0] == (33, 101)
        # Raw mode by now: \x03 is not a local SIGINT but a byte for the container.
        assert not termios.tcgetattr(slave)[3] & termios.ISIG
        os.write(master, b"abc\x03def")
        got = b""
        while b"def" not in got:
            assert time.monotonic() < deadline, f"no echo, got {got!r}"
            if select.select([master], [], [], 0.1)[0]:
                got += os.read(master, 1024)
        assert b"abc\x03def" in got
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        os.killpg(proc.pid, signal.SIGWINCH)
        while (50, 160) not in fake.resizes:
            assert time.monotonic() < deadline, f"resize not forwarded: {fake.resizes}"
            time.sleep(0.05)
        os.write(master, b"\x04")
        assert proc.wait(DEADLINE) == 0
        assert termios.tcgetattr(slave) == before  # the terminal is as it was
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)
    spec = next(iter(fake.specs.values()))
    assert spec["process"]["terminal"] is True
    assert spec["process"]["consoleSize"] == {"height": 33, "width": 101}
