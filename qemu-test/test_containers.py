"""Containers in the real guest, driven as a user would: the Python API first, then the CLI.

Every wait has a deadline, and every container is removed, so that a broken agent makes these
tests fail rather than hang or leak.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from bulkhead import Container, Process, Sandbox
from bulkhead.errors import AlreadyExists, InvalidArgument, NotFound
from bulkhead.spec import make_spec

DEADLINE = 120.0  # for one container's whole life, under TCG
BIG_DEADLINE = 900.0  # 100 MB through a software-emulated virtio-serial port


def within(seconds: float, what: str, fn: Callable[[], Any], proc: Process | None = None) -> Any:
    """``fn()`` in a thread; fail after ``seconds`` (closing ``proc`` so nothing is left)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if proc is not None:
            proc.close()
        raise AssertionError(f"{what} did not finish within {seconds:g}s")
    if errors:
        raise errors[0]
    return result[0]


def run(sb: Sandbox, args: list[str], **options: Any) -> tuple[bytes, bytes, Process]:
    """Run to the end; ``(stdout, stderr, process)``."""
    proc = sb.run(args, **options)
    out, err = within(DEADLINE, f"{args}", lambda: proc.communicate(timeout=DEADLINE), proc)
    return out, err, proc


def sha256_of(proc: Process, stream: str = "stdout") -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in getattr(proc, stream):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


@pytest.fixture
def keep(sandbox: Sandbox) -> Iterator[Callable[[Container], Container]]:
    """Register containers made by hand; they are removed after the test, whatever happens."""
    made: list[Container] = []
    yield lambda c: made.append(c) or c
    for container in made:
        try:
            container.remove(timeout=0)
        except NotFound:
            pass


# -- processes and exit status --


def test_echo_hostname_and_exit_codes(sandbox: Sandbox) -> None:
    out, err, proc = run(sandbox, ["sh", "-c", "echo hello from $(hostname); id -u"], name="hi")
    assert (out, err, proc.returncode) == (b"hello from hi\n0\n", b"", 0)
    out, err, proc = run(sandbox, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (out, err, proc.returncode) == (b"out\n", b"err\n", 7)
    assert proc.exit is not None and proc.exit.kind == "exited"
    # remove=True (the default): nothing is left once the exit is in.
    assert "hi" not in [c.container_id for c in sandbox.containers()]


def test_signals_give_128_plus_n(sandbox: Sandbox, keep) -> None:
    # The container's own process is the init of its pid namespace: like any init, it only
    # gets the signals it handles, and SIGKILL.
    proc = sandbox.run(["sleep", "60"])
    wait_for(lambda: _status(sandbox, proc.container_id) == "running", 30, "running")
    proc.kill()
    assert proc.wait(timeout=DEADLINE) == 128 + signal.SIGKILL
    assert proc.exit is not None
    assert (proc.exit.kind, proc.exit.signal, proc.exit.oom_killed) == ("signaled", 9, False)
    # Exec'd processes are ordinary ones: any signal ends them.
    container = keep(sandbox.create_container(["sleep", "300"]))
    container.start()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        proc = container.exec(["sleep", "60"])
        wait_for(lambda p=proc: len(container.processes()) >= 2, 30, "the exec to run")
        proc.signal(sig)
        assert proc.wait(timeout=DEADLINE) == 128 + sig
        assert proc.exit is not None and (proc.exit.kind, proc.exit.signal) == ("signaled", sig)
    # A signal the shell catches is its business: it exits as it likes.
    proc = sandbox.run(["sh", "-c", "trap 'exit 5' TERM; echo ready; while :; do sleep 1; done"])
    assert next(iter(proc.stdout)) == b"ready\n"
    proc.terminate()
    assert proc.wait(timeout=DEADLINE) == 5


def test_a_missing_command_is_127_and_says_so(sandbox: Sandbox) -> None:
    _, _, proc = run(sandbox, ["no-such-command"])
    assert proc.returncode == 127
    assert proc.exit is not None and proc.exit.kind == "start_failed"
    assert proc.exit.start_failure is not None
    assert proc.exit.start_failure.step == "exec"
    assert "no-such-command" in proc.exit.start_failure.message


def test_user_env_and_workdir(sandbox: Sandbox) -> None:
    script = 'echo "$(id -u):$(id -g) $(pwd) $GREETING"'
    out, _, proc = run(
        sandbox, ["sh", "-c", script], user="1000:100", cwd="/bin", env={"GREETING": "hej"}
    )
    assert out == b"1000:100 /bin hej\n", proc.exit


# -- stdio, checked by checksum --


def test_stdin_round_trip_binary(sandbox: Sandbox) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    proc = sandbox.run(["sh", "-c", "cat; echo done >&2"], stdin=True)
    out, err = within(DEADLINE, "cat", lambda: proc.communicate(payload, timeout=DEADLINE), proc)
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert (len(out), err, proc.returncode) == (len(payload), b"done\n", 0)


def test_ten_thousand_lines(sandbox: Sandbox) -> None:
    out, err, proc = run(sandbox, ["seq", "1", "10000"])
    assert out == "".join(f"{i}\n" for i in range(1, 10001)).encode()
    assert (err, proc.returncode) == (b"", 0)


def test_binary_output_checked_in_the_guest(sandbox: Sandbox) -> None:
    # Random bytes: the guest's own sha256sum (on stderr) must match what arrived.
    script = "head -c 4000000 /dev/urandom > /blob && sha256sum /blob >&2 && cat /blob"
    out, err, proc = run(sandbox, ["sh", "-c", script])
    assert proc.returncode == 0, err
    assert err.split()[0].decode() == hashlib.sha256(out).hexdigest()
    assert len(out) == 4_000_000


def test_one_hundred_megabytes(sandbox: Sandbox) -> None:
    total = 100_000_000
    line = b"abcdefghijklmnopqrstuvwxyz\n"
    want = hashlib.sha256()
    whole, rest = divmod(total, len(line))
    block = line * 10_000
    for _ in range(whole // 10_000):
        want.update(block)
    want.update(line * (whole % 10_000) + line[:rest])

    proc = sandbox.run(["sh", "-c", f"yes abcdefghijklmnopqrstuvwxyz | head -c {total}"])
    started = time.monotonic()
    digest, size = within(BIG_DEADLINE, "100 MB of stdout", lambda: sha256_of(proc), proc)
    seconds = time.monotonic() - started
    print(f"100 MB in {seconds:.1f} s: {total / seconds / 2**20:.1f} MiB/s")
    assert (size, digest) == (total, want.hexdigest())
    assert proc.wait(timeout=DEADLINE) == 0
    assert proc.stderr.read() == b""


def test_output_written_before_attach_is_kept(sandbox: Sandbox, keep) -> None:
    container = keep(sandbox.create_container(["sh", "-c", "seq 1 50000; echo bye >&2; exit 3"]))
    container.start()  # nobody attached: the agent keeps all of it
    exit = container.wait(timeout=DEADLINE)
    assert exit.returncode == 3
    proc = container.attach()
    out, err = within(DEADLINE, "late attach", lambda: proc.communicate(timeout=DEADLINE), proc)
    assert out == "".join(f"{i}\n" for i in range(1, 50001)).encode()
    assert (err, proc.returncode) == (b"bye\n", 3)


def test_a_slow_reader_loses_nothing(sandbox: Sandbox) -> None:
    # 6 MB: several times what the agent keeps unacknowledged, so the writer must wait for us.
    script = "head -c 6000000 /dev/urandom > /blob && sha256sum /blob >&2 && cat /blob"
    proc = sandbox.run(["sh", "-c", script])

    def slowly() -> tuple[bytes, bytes]:
        got = {"stdout": bytearray(), "stderr": bytearray()}
        for i, out in enumerate(proc.output()):
            got[out.stream] += out.data
            if i < 40:
                time.sleep(0.1)
        return bytes(got["stdout"]), bytes(got["stderr"])

    out, err = within(DEADLINE, "the slow reader", slowly, proc)
    assert proc.returncode == 0
    assert err.split()[0].decode() == hashlib.sha256(out).hexdigest()
    assert len(out) == 6_000_000


def test_detach_and_reattach_mid_stream(sandbox: Sandbox) -> None:
    proc = sandbox.run(["seq", "1", "200000"])  # ~1.3 MB
    got = bytearray()

    def some() -> None:
        for chunk in proc.stdout:
            got.extend(chunk)
            if len(got) > 300_000:
                return

    within(DEADLINE, "the first part", some, proc)
    proc.detach()
    time.sleep(0.5)
    proc.reattach()
    rest = within(DEADLINE, "the rest", proc.stdout.read, proc)
    assert bytes(got) + rest == "".join(f"{i}\n" for i in range(1, 200001)).encode()
    assert proc.wait(timeout=DEADLINE) == 0


def test_fifty_short_lived_containers_in_a_row(sandbox: Sandbox) -> None:
    started = time.monotonic()
    for i in range(50):
        out, err, proc = run(sandbox, ["echo", f"number {i}"])
        assert (out, err, proc.returncode) == (f"number {i}\n".encode(), b"", 0)
    print(f"50 containers in {time.monotonic() - started:.1f} s")
    assert not sandbox.containers()


# -- a long-running container: exec, ps, pause --


def test_exec_into_a_running_container(sandbox: Sandbox, keep) -> None:
    container = keep(sandbox.create_container(["sleep", "300"], name="execbox", env={"A": "1"}))
    container.start()
    proc = container.exec(["sh", "-c", "echo $A $(hostname); exit 4"])
    assert proc.communicate(timeout=DEADLINE) == (b"1 execbox\n", b"")
    assert proc.returncode == 4
    proc = container.exec(["sh", "-c", "cat; exit 9"], stdin=True)
    assert proc.communicate(b"piped in", timeout=DEADLINE) == (b"piped in", b"")
    assert proc.returncode == 9
    # Same pid namespace: the exec sees the container's sleep as its pid 1.
    out, _ = container.exec(["ps", "-o", "pid,args"]).communicate(timeout=DEADLINE)
    assert any(line.split()[:2] == [b"1", b"sleep"] for line in out.splitlines()), out
    info = container.info()
    assert info.status == "running" and info.args == ("sleep", "300")
    ps = container.processes()
    assert any(p.args[:1] == ("sleep",) for p in ps), ps
    with pytest.raises(AlreadyExists):
        sandbox.create_container(["true"], name="execbox")


def test_pause_stops_the_clock_and_resume_restarts_it(sandbox: Sandbox, keep) -> None:
    proc = sandbox.run(["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done"])
    container = keep(sandbox.container(proc.container_id))
    ticks: list[float] = []

    def count() -> None:
        for chunk in proc.stdout:
            ticks.extend(time.monotonic() for _ in range(chunk.count(b"\n")))

    reader = threading.Thread(target=count, daemon=True)
    reader.start()
    wait_for(lambda: len(ticks) >= 5, 30, "the counter to tick")
    container.pause()
    assert container.status == "paused"
    paused_at = time.monotonic()
    time.sleep(1.0)  # what was already in flight arrives
    before = len(ticks)
    time.sleep(2.0)
    assert len(ticks) == before, "the counter advanced while paused"
    assert all(t < paused_at + 1.0 for t in ticks)
    container.resume()
    assert container.status == "running"
    wait_for(lambda: len(ticks) >= before + 5, 30, "the counter to tick again after resume")
    proc.close()  # removes the container (run's default)
    reader.join(DEADLINE)


# -- terminals --


def test_a_pty_and_its_size(sandbox: Sandbox) -> None:
    out, _, proc = run(sandbox, ["tty"], tty=True)
    assert out.startswith(b"/dev/pts/"), out
    assert proc.returncode == 0

    proc = sandbox.run(["sh"], tty=True, stdin=True, console_size=(24, 80))
    screen = bytearray()
    chunks = iter(proc.stdout)

    def expect(text: bytes) -> None:
        def seen() -> None:
            while text not in screen:
                screen.extend(next(chunks))

        within(DEADLINE, f"{text!r} on the terminal", seen, proc)

    proc.stdin.write(b"stty size\n")
    expect(b"24 80")
    proc.resize(40, 132)
    proc.stdin.write(b"stty size\n")
    expect(b"40 132")
    proc.stdin.write(b"exit 3\n")
    assert proc.wait(timeout=DEADLINE) == 3


# -- limits that bite --


def test_cpu_limit_throttles(sandbox: Sandbox) -> None:
    proc = sandbox.run(["sh", "-c", "while :; do :; done"], cpus_limit=0.2)
    container = sandbox.container(proc.container_id)
    try:
        time.sleep(1.0)
        first = container.stats()
        time.sleep(4.0)
        second = container.stats()
    finally:
        proc.close()
    used = (second.cpu_usage_usec - first.cpu_usage_usec) / 1e6
    assert second.cpu_nr_throttled > first.cpu_nr_throttled > 0
    assert used < 0.5 * 4.0, f"used {used:.2f} s of CPU in 4 s with a 0.2 CPU limit"


def test_memory_limit_oom_kills_and_says_so(sandbox: Sandbox) -> None:
    # The shell keeps 100 MB of 'a' in a variable: far past the 32 MiB limit.
    script = "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived ${#x}"
    out, _, proc = run(sandbox, ["sh", "-c", script], memory_limit="32m")
    assert proc.exit is not None
    assert (proc.exit.kind, proc.exit.signal, proc.exit.oom_killed) == ("signaled", 9, True)
    assert proc.returncode == 137
    assert b"survived" not in out
    # The agent is unharmed and the sandbox still runs containers.
    assert sandbox.agent.health() == "SERVING"
    assert run(sandbox, ["echo", "still here"])[0] == b"still here\n"


def test_pids_limit_stops_a_fork_bomb(sandbox: Sandbox) -> None:
    bomb = "b() { b | b & }; b; exec sleep 30"
    proc = sandbox.run(["sh", "-c", bomb], pids_limit=20)
    container = sandbox.container(proc.container_id)
    try:
        highest = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            stats = container.stats()
            highest = max(highest, stats.pids_current)
            assert stats.pids_current <= 20
            assert len(container.processes()) <= 20
            time.sleep(0.5)
        assert stats.pids_max == 20
        assert highest >= 10, "the bomb never went off"
        assert sandbox.agent.health() == "SERVING"
    finally:
        started = time.monotonic()
        proc.close()  # remove: kills every process of the bomb
    assert time.monotonic() - started < 60
    assert proc.container_id not in [c.container_id for c in sandbox.containers()]
    assert run(sandbox, ["echo", "calm"])[0] == b"calm\n"


# -- specs from elsewhere, and bad ones --


def test_a_user_namespace_maps_container_root_to_an_unprivileged_guest_id(
    sandbox: Sandbox,
) -> None:
    from bulkhead.spec import make_spec

    script = (
        "id -u; cat /proc/self/uid_map; touch /mine && echo wrote;"
        # its cgroup mount shows its own cgroup, not the guest's tree
        " test -e /sys/fs/cgroup/memory.max && ls /sys/fs/cgroup | grep -qx bulkhead"
        " && echo guest-tree || echo own-cgroup;"
        " touch /sys/kernel/x 2>/dev/null && echo sys-writable || echo sys-read-only"
    )
    spec = make_spec(["sh", "-c", script])
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    proc = sandbox.run(spec=spec)
    out, err = within(
        DEADLINE, "the userns container", lambda: proc.communicate(timeout=DEADLINE), proc
    )
    assert proc.returncode == 0, (err, proc.exit)
    lines = out.decode().splitlines()
    assert lines[0] == "0"
    assert lines[1].split() == ["0", "200000", "65536"]
    assert lines[2] == "wrote"
    assert lines[3:] == ["own-cgroup", "sys-read-only"]


def test_a_crun_spec_bundle_runs_with_only_its_args_changed(sandbox: Sandbox, tmp_path) -> None:
    subprocess.run(["crun", "spec"], cwd=tmp_path, check=True, timeout=30)
    spec = json.loads((tmp_path / "config.json").read_text())
    spec["process"]["args"] = ["sh", "-c", "echo from a crun spec; id -u; hostname"]
    proc = sandbox.run(spec=spec)  # root.path "rootfs": the image's busybox root
    assert proc.tty  # crun's default spec asks for a terminal
    out = within(DEADLINE, "the crun spec", proc.stdout.read, proc)
    assert proc.wait(timeout=DEADLINE) == 0
    text = out.decode().replace("\r\n", "\n")
    assert text.startswith("from a crun spec\n0\n"), text
    assert spec["hostname"] in text


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["process"].update(cwd="relative"), r"process\.cwd"),
        (lambda s: s["process"].update(args=[]), r"process\.args"),
        (lambda s: s["linux"]["namespaces"].append({"type": "bogus"}), r"linux\.namespaces"),
        (lambda s: s.update(ociVersion="2.0"), "ociVersion"),
        (lambda s: s["linux"].update(resources={"pids": {"limit": "x"}}), r"pids\.limit"),
        (lambda s: s["mounts"].append({"destination": "rel"}), r"mounts\[7\]\.destination"),
    ],
)
def test_bad_specs_are_invalid_argument_naming_the_field(sandbox: Sandbox, change, field) -> None:
    spec = make_spec(["true"])
    change(spec)
    with pytest.raises(InvalidArgument, match=field):
        sandbox.run(spec=spec)
    assert not sandbox.containers()  # nothing half-created


def test_requests_for_missing_containers_are_not_found(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        sandbox.agent.create_container("junk", b"{not json")
    missing = sandbox.container("nobody")
    for call in (missing.start, missing.pause, missing.stats, missing.processes, missing.remove):
        with pytest.raises(NotFound):
            call()


# -- the CLI --


def bulkhead(state_dir: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "bulkhead.cli", "--state-dir", str(state_dir), *args]
    return subprocess.run(cmd, capture_output=True, timeout=300, check=False, **kw)


def test_cli_run_in_a_sandbox(sandbox: Sandbox) -> None:
    state_dir = str(sandbox.paths.root)
    script = "echo out; echo err >&2; exit 7"
    done = bulkhead(state_dir, "run", "--sandbox", sandbox.name, "--", "sh", "-c", script)
    assert (done.stdout, done.stderr, done.returncode) == (b"out\n", b"err\n", 7)
    done = bulkhead(
        state_dir, "run", "-i", "--sandbox", sandbox.name, "--", "wc", "-c", input=b"x" * 12345
    )
    assert (done.stdout.split(), done.returncode) == ([b"12345"], 0)


def test_cli_container_session(sandbox: Sandbox) -> None:
    state_dir, name = str(sandbox.paths.root), sandbox.name
    started = bulkhead(
        state_dir, "run", "-d", "--sandbox", name, "--name", "clibox", "--", "sleep", "300"
    )
    assert started.returncode == 0, started.stderr
    try:
        assert started.stdout == b"clibox\n"
        ps = bulkhead(state_dir, "ps", name)
        assert b"clibox" in ps.stdout and b"running" in ps.stdout
        listed = json.loads(bulkhead(state_dir, "ps", name, "--json").stdout)
        assert [c["status"] for c in listed if c["container_id"] == "clibox"] == ["running"]
        procs = bulkhead(state_dir, "ps", name, "clibox")
        assert b"sleep 300" in procs.stdout
        done = bulkhead(state_dir, "exec", name, "clibox", "--", "sh", "-c", "exit 3")
        assert done.returncode == 3
        stats = json.loads(bulkhead(state_dir, "stats", name, "clibox", "--json").stdout)
        assert stats[0]["container_id"] == "clibox" and stats[0]["pids_current"] >= 1
        assert bulkhead(state_dir, "stats", name, "--no-stream").stdout.count(b"clibox") == 1
        assert bulkhead(state_dir, "pause", name, "clibox").returncode == 0
        assert b"paused" in bulkhead(state_dir, "ps", name).stdout
        assert bulkhead(state_dir, "resume", name, "clibox").returncode == 0
        refused = bulkhead(state_dir, "rm", name, "clibox")
        assert refused.returncode == 1 and b"running" in refused.stderr
        # sleep is PID 1 of its namespace and has no TERM handler: only KILL stops it.
        assert bulkhead(state_dir, "kill", name, "clibox", "-s", "KILL").returncode == 0
        wait_for(lambda: _status(sandbox, "clibox") == "stopped", 30, "the container to stop")
        assert bulkhead(state_dir, "rm", name, "clibox").returncode == 0
    finally:
        bulkhead(state_dir, "rm", "-f", name, "clibox")
    assert "clibox" not in [c.container_id for c in sandbox.containers()]
    missing = bulkhead(state_dir, "kill", name, "clibox")
    assert missing.returncode == 1 and missing.stderr.startswith(b"bulkhead: error: ")


def test_cli_run_rm_in_a_throwaway_sandbox(image, state_dir: Path) -> None:
    before = {s.name for s in Sandbox.list(state_dir)}
    done = bulkhead(state_dir, "run", "--rm", "--image", str(image.path), "--", "echo", "hi")
    assert (done.stdout, done.returncode) == (b"hi\n", 0), done.stderr
    assert {s.name for s in Sandbox.list(state_dir)} == before  # no sandbox left behind


def test_cli_run_tty_ctrl_c_reaches_the_process(sandbox: Sandbox) -> None:
    script = "trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 1; done"
    cmd = [
        sys.executable, "-m", "bulkhead.cli", "--state-dir", str(sandbox.paths.root),
        "run", "-it", "--rm", "--sandbox", sandbox.name, "--", "sh", "-c", script,
    ]  # fmt: skip
    pid, master = pty.fork()
    if pid == 0:  # the child: bulkhead on a real terminal
        os.execv(sys.executable, cmd)
    screen = b""

    def expect(text: bytes, seconds: float = DEADLINE) -> None:
        nonlocal screen
        deadline = time.monotonic() + seconds
        while text not in screen:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal: {screen!r}"
            if select.select([master], [], [], 0.2)[0]:
                try:
                    screen += os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
        assert text in screen, screen

    try:
        expect(b"ready")
        os.write(master, b"\x03")  # Ctrl-C, typed
        expect(b"got INT")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 42
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)


def _status(sandbox: Sandbox, container_id: str) -> str | None:
    for info in sandbox.containers():
        if info.container_id == container_id:
            return info.status
    return None


# -- seccomp --


def test_seccomp_denies_the_listed_syscalls_in_the_process_and_its_execs(
    sandbox: Sandbox, keep
) -> None:
    spec = make_spec(["sleep", "300"])
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"},  # EPERM by default
            {"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        ],
    }
    container = keep(sandbox.create_container(spec=spec))
    container.start()
    out, err = container.exec(["mkdir", "/tmp/made"]).communicate(timeout=DEADLINE)
    assert b"Operation not permitted" in err, err
    out, err = container.exec(["chmod", "700", "/tmp"]).communicate(timeout=DEADLINE)
    assert b"Permission denied" in err, err  # EACCES: the profile's errnoRet
    proc = container.exec(["sh", "-c", "test -d /tmp/made || echo none; ls / | grep -x tmp"])
    assert proc.communicate(timeout=DEADLINE) == (b"none\ntmp\n", b"")
    assert proc.returncode == 0
    # The container's own process is filtered too, not just the execs.
    spec["process"]["args"] = ["sh", "-c", "mkdir /tmp/x; echo mkdir=$?; echo still here"]
    out, err, proc = _run_spec(sandbox, spec)
    assert (out, proc.returncode) == (b"mkdir=1\nstill here\n", 0), err


def test_seccomp_with_a_docker_shaped_profile_runs_ordinary_commands(sandbox: Sandbox) -> None:
    spec = make_spec(["sh", "-c", "echo hello; ls /bin | grep -c . >/dev/null && echo forked"])
    spec["linux"]["seccomp"] = docker_shaped_profile()
    out, err, proc = _run_spec(sandbox, spec)
    assert (out, err, proc.returncode) == (b"hello\nforked\n", b"", 0)
    spec["process"]["args"] = ["echo", "plain echo"]
    assert _run_spec(sandbox, spec)[0] == b"plain echo\n"
    # Only the spawner, which forks the containers, loaded libseccomp's bindings; the agent
    # itself never imports them.
    assert _maps_seccomp(sandbox) == {"agent": False, "spawner": True}


def _run_spec(sb: Sandbox, spec: dict[str, Any]) -> tuple[bytes, bytes, Process]:
    proc = sb.run(spec=spec)
    out, err = within(DEADLINE, "the container", lambda: proc.communicate(timeout=DEADLINE), proc)
    return out, err, proc


def _maps_seccomp(sb: Sandbox) -> dict[str, bool]:
    """Whether the agent, and the spawner that forks containers, map the bindings.

    Read from a container in the guest's own pid namespace that may read others' maps: its
    parent is the spawner.
    """
    agent = next(p.pid for p in sb.agent.guest_details().processes if p.name == "agent")
    script = (
        f"test $PPID != {agent} || exit 3;"
        f" grep -q seccomp /proc/{agent}/maps && echo agent=1 || echo agent=0;"
        " grep -q seccomp /proc/$PPID/maps && echo spawner=1 || echo spawner=0"
    )
    spec = make_spec(["sh", "-c", script])
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    for kind in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][kind].append("CAP_SYS_PTRACE")
    out, err, proc = _run_spec(sb, spec)
    assert proc.returncode == 0, err
    lines = out.decode().split()
    return {"agent": "agent=1" in lines, "spawner": "spawner=1" in lines}


def docker_shaped_profile() -> dict[str, Any]:
    """The shape of docker's default profile: refuse by default, allow a long list.

    The names are docker's unconditional allow-list (some are unknown to this libseccomp
    or this architecture, and skipped, as docker's are), plus its clone rule without
    namespace flags and clone3 answered with ENOSYS so that libc falls back to clone.
    """
    allowed = DOCKER_ALLOWED_SYSCALLS.split()
    namespace_flags = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | ...
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": allowed, "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}],
            },
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {
                        "index": 0,
                        "value": namespace_flags,
                        "valueTwo": 0,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
        ],
    }


# docker's unconditional allow-list (moby profiles/seccomp/default.json), names only, plus
# the ones it allows on conditions that hold here (socket, arch_prctl, modify_ldt, chroot).
DOCKER_ALLOWED_SYSCALLS = """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown
chown32 clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect
copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr
flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64
fsync ftruncate ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv
futex_wake futimesat getcpu getcwd getdents getdents64 getegid getegid32 geteuid
geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32
getrlimit get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid
gettimeofday getuid getuid32 getxattr inotify_add_watch inotify_init inotify_init1
inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents
io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat
listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise
map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat
mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open
mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap
msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep
newfstatat _newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2
pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2
prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read
readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg
remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq
rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity
sched_getattr sched_getparam sched_get_priority_max sched_get_priority_min
sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget
semop semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto
setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer
setpgid setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32
setreuid setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area
set_tid_address setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack
signalfd signalfd4 sigprocmask sigreturn socket socketcall socketpair splice stat stat64
statfs statfs64 statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill
time timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64
timer_settime timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64
timerfd_settime timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname
unlink unlinkat utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid
waitpid write writev arch_prctl modify_ldt chroot
"""


# -- device rules (a cgroup device program) and OCI hooks --

DENY_ALL_DEVICES = {"allow": False, "access": "rwm"}
LOOP0_NODE = {"path": "/dev/xblk", "type": "b", "major": 7, "minor": 0, "fileMode": 0o600}
GUEST_TMP = {"destination": "/hooks", "type": "bind", "source": "/tmp", "options": ["rbind"]}


def _run_spec(sandbox: Sandbox, spec: dict[str, Any]) -> tuple[bytes, bytes, Process]:
    proc = sandbox.run(spec=spec)
    out, err = within(DEADLINE, "the container", lambda: proc.communicate(timeout=DEADLINE), proc)
    return out, err, proc


def test_device_rules_refuse_a_node_no_rule_allows(sandbox: Sandbox) -> None:
    # The spec makes a node for the guest's loop0 (the loop module is loaded); docker and
    # "crun spec" start their rules with a deny-all, which leaves the standard devices.
    script = (
        "head -c1 /dev/xblk >/dev/null; echo xblk=$?;"
        " for d in null zero urandom full; do head -c1 /dev/$d >/dev/null && echo $d; done"
    )

    def spec_with(rules: list[dict[str, Any]]) -> dict[str, Any]:
        spec = make_spec(["sh", "-c", script])
        spec["linux"]["devices"] = [LOOP0_NODE]
        spec["linux"]["resources"] = {"devices": rules}
        return spec

    out, err, _ = _run_spec(sandbox, spec_with([DENY_ALL_DEVICES]))
    assert out.decode().split() == ["xblk=1", "null", "zero", "urandom", "full"], err
    assert b"Operation not permitted" in err
    allow = {"allow": True, "type": "b", "major": 7, "minor": 0, "access": "r"}
    out, err, _ = _run_spec(sandbox, spec_with([DENY_ALL_DEVICES, allow]))
    assert out.decode().split() == ["xblk=0", "null", "zero", "urandom", "full"], err


def test_oci_hooks_run_where_and_when_they_belong(sandbox: Sandbox, keep) -> None:
    from bulkhead.errors import FailedPrecondition

    tag = f"hooks{os.getpid() % 100000}"

    def in_guest(kind: str, then: str = "") -> dict[str, Any]:
        # the guest's own sh (busybox, whose applets need their name)
        text = f"busybox cat > /tmp/{tag}-{kind}.json{then}"
        return {"path": "/bin/sh", "args": ["sh", "-c", text], "env": ["PATH=/bin"]}

    spec = make_spec(["sleep", "300"])
    spec["mounts"].append(GUEST_TMP)  # the guest's /tmp, to read what the hooks wrote
    spec["hooks"] = {
        kind: [in_guest(kind)]
        for kind in ("prestart", "createRuntime", "createContainer", "poststart", "poststop")
    }
    # the container's sh, its /hooks: resolved inside
    start_text = f"cat > /hooks/{tag}-startContainer.json"
    spec["hooks"]["startContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", start_text]}]
    container = keep(sandbox.create_container(spec=spec))
    container.start()

    def state(kind: str) -> dict[str, Any]:
        proc = container.exec(["cat", f"/hooks/{tag}-{kind}.json"])
        out, err = within(DEADLINE, kind, lambda: proc.communicate(timeout=DEADLINE), proc)
        assert proc.returncode == 0, err
        return json.loads(out)

    created = state("createRuntime")
    assert (created["id"], created["status"], created["bundle"]) == (container.id, "creating", "/")
    assert created["pid"] in [p.pid for p in container.processes()]  # the guest's pid
    assert state("prestart") == created
    assert state("createContainer") == {**created, "pid": 1}  # in its PID namespace
    assert state("startContainer") == {**created, "status": "created", "pid": 1}
    assert state("poststart") == {**created, "status": "running"}
    container.remove(timeout=0)
    reader = make_spec(["cat", f"/hooks/{tag}-poststop.json"])
    reader["mounts"].append(GUEST_TMP)
    out, err, proc = _run_spec(sandbox, reader)
    assert proc.returncode == 0, err
    stopped = {**created, "status": "stopped"}
    del stopped["pid"]  # none once stopped
    assert json.loads(out) == stopped

    # A failing createContainer hook fails the create, named, and leaves nothing.
    spec["hooks"] = {"createContainer": [in_guest("failing", then="; echo broken >&2; exit 3")]}
    with pytest.raises(FailedPrecondition, match=r"createContainer hook 0 \(/bin/sh\)") as info:
        sandbox.create_container(spec=spec, name=f"{tag}-failing")
    assert "exited with code 3: broken" in str(info.value)
    assert f"{tag}-failing" not in [c.container_id for c in sandbox.containers()]


# --- a restarted agent adopts the containers -------------------------------------------------


class _RawAttach:
    """One Attach stream driven by hand, acknowledging as it reads. A gap message is data
    here (the host client's Attachment refuses any jump in offsets)."""

    def __init__(self, client: Any, container_id: str, offset: int) -> None:
        import queue

        from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

        self._pb = agent_pb2
        self.requests: queue.Queue[Any] = queue.Queue()
        self.requests.put(
            agent_pb2.AttachRequest(
                container_id=container_id, stdout_offset=offset, ack_stdout=offset
            )
        )
        stub = agent_pb2_grpc.AgentStub(client.channel)
        self.call = stub.Attach(iter(self.requests.get, None), timeout=DEADLINE)
        self.offset = offset
        self.out = b""
        self.gaps: list[Any] = []
        self.exit: Any = None

    def read(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` or the end of the stream (an error ends it too: raised)."""
        for response in self.call:
            kind = response.WhichOneof("event")
            if kind == "gap":
                assert (response.gap.stream, response.gap.from_offset) == ("stdout", self.offset)
                assert not self.out, "a gap comes first"
                self.gaps.append(response.gap)
                self.offset = response.gap.to_offset
            elif kind == "stdout":
                assert response.stdout.offset == self.offset, "offsets follow on"
                self.out += response.stdout.data
                self.offset += len(response.stdout.data)
                self.requests.put(self._pb.AttachRequest(ack_stdout=self.offset))
            elif kind == "exit":
                self.exit = response.exit
            if done():
                return

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def test_a_restarted_agent_adopts_a_running_container(boot) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from bulkhead import AgentClient

    sb = boot("adopt", debug_console=True)
    script = "i=0; while [ $i -lt 30 ]; do echo $i; i=$((i+1)); sleep 0.2; done; exit 7"
    expected = b"".join(f"{i}\n".encode() for i in range(30))
    container = sb.create_container(["sh", "-c", script], name="counter")
    before = _RawAttach(sb.agent, "counter", 0)
    container.start()
    within(DEADLINE, "the first lines", lambda: before.read(lambda: b"3\n" in before.out))
    # The spawner's socket, like the agent's, is nowhere in the container's view.
    look = container.exec(["sh", "-c", "find / -name '*.sock' 2>/dev/null; ls -a /run"])
    seen, _ = within(DEADLINE, "a look around", lambda: look.communicate(timeout=DEADLINE), look)
    assert look.returncode == 0 and b"spawner.sock" not in seen and b"bulkhead" not in seen, seen
    agent_pid = sb.agent.guest_details().agent_pid
    sb.console_send(f"kill -9 {agent_pid}\n")  # through the debug console's shell

    def drain_old() -> None:
        try:
            before.read(lambda: False)
        except grpc.RpcError:
            pass  # the agent died under it: what arrived until then is ours

    within(DEADLINE, "the old stream to break", drain_old)
    before.close()
    assert before.exit is None, "the counter cannot have ended yet"

    def restarted() -> AgentClient | None:
        client = AgentClient(sb.agent_socket, timeout=5)
        try:
            if client.guest_details().agent_restarts >= 1:
                return client
        except Exception:
            pass
        client.close()
        return None

    client = wait_for(restarted, DEADLINE, "the agent to be restarted by init")
    try:
        assert client.guest_details().agent_pid != agent_pid
        listed = {c.container_id: c.status for c in client.list_containers()}
        assert listed["counter"] in ("running", "stopped")  # stopped: it ended meanwhile
        after = _RawAttach(client, "counter", before.offset)
        within(DEADLINE, "the rest of the output", lambda: after.read(lambda: False))
        after.close()
        assert after.exit is not None and after.exit.exit_code == 7
        assert before.out == expected[: len(before.out)]
        if not after.gaps:  # nothing lost: the stream simply went on
            assert before.out + after.out == expected
        else:  # the agent died holding a few lines: said so, and no more than that is missing
            (gap,) = after.gaps
            assert after.out == expected[len(expected) - len(after.out) :]
            missing = len(expected) - len(before.out) - len(after.out)
            assert 0 < missing <= gap.to_offset - gap.from_offset
        assert client.wait_process("counter").exit_code == 7
        client.remove_container("counter")
        assert "counter" not in [c.container_id for c in client.list_containers()]
    finally:
        client.close()
    assert "adopted the spawner" in sb.console_log()
