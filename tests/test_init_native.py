"""Native tests of the real PID 1: bulkhead-init runs as PID 1 of a throwaway namespace set.

Each test starts `unshare --pid --fork --mount --uts --net --ipc` with init inside, and a
small stub agent (BULKHEAD_AGENT_CMD) that reports what it sees to files in a scratch
directory. Power-off inside a PID namespace is real too: reboot(2) there ends the
namespace, and its init is reported killed by SIGINT (power off) or SIGHUP (restart).
Every wait has a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)"),
]

INIT_DIR = Path(__file__).resolve().parents[1] / "init"
# The guest runs Debian's python3.11 with -I -S; use the same here when the host has it.
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3.11").exists() else sys.executable
LAUNCHER = (
    f"import sys; sys.path.insert(0, {str(INIT_DIR)!r}); "
    "from bulkhead_init.main import main; main()"
)
NAMESPACES = [
    "unshare",
    "--pid",
    "--fork",
    "--mount",
    "--uts",
    "--net",
    "--ipc",
    "--propagation",
    "private",
]
DEFAULT_SKIP = "mounts,cgroups,modules"

STUB = r"""
import json, os, signal, socket, sys, time

out, mode = sys.argv[1], sys.argv[2]
restarts = os.environ.get("BULKHEAD_AGENT_RESTARTS", "?")


def put(name, data):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, os.path.join(out, name))


def on_term(signo, frame):
    put(f"term-{restarts}", {"signal": signo})
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)

status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        status[key] = value.strip()


def loopback_works():
    try:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli = socket.create_connection(srv.getsockname(), timeout=2)
        cli.close()
        srv.close()
        return True
    except OSError:
        return False


def pty_name():
    try:
        master, slave = os.openpty()
        return os.ttyname(slave)
    except OSError as exc:
        return repr(exc)


info = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "sid": os.getsid(0),
    "env": dict(os.environ),
    "boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
    "hostname": socket.gethostname(),
    "loopback": loopback_works(),
    "stdin": os.readlink("/proc/self/fd/0"),
}
if mode == "inspect":
    with open("/proc/self/mounts") as f:
        info["mounts"] = f.read().splitlines()
    with open("/proc/1/cmdline", "rb") as f:
        info["init_cmdline"] = f.read().decode(errors="replace")
    info["pty"] = pty_name()

if mode == "stubborn":
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(60)
    info["stubborn"] = child

if mode == "orphans":
    parent = os.getpid()
    for i in range(int(sys.argv[3])):
        mid = os.fork()
        if mid == 0:
            if os.fork() == 0:
                # Grandchild: wait to be reparented to init, then exit as its orphan.
                deadline = time.monotonic() + 10
                while os.getppid() != 1 and time.monotonic() < deadline:
                    time.sleep(0.005)
                put(f"orphan-{os.getpid()}", {"ppid": os.getppid()})
                os._exit(0)
            os._exit(0)
        os.waitpid(mid, 0)

put(f"start-{restarts}", info)
if mode == "exit":
    sys.exit(3)
while True:
    time.sleep(60)
"""

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, log: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n--- console ---\n{log()}")
        time.sleep(0.01)


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


class Guest:
    """One init in its namespaces, with the stub agent in ``mode``."""

    def __init__(
        self,
        scratch: Path,
        mode: str,
        *,
        cmdline: str = "bulkhead.log=debug",
        skip: str = DEFAULT_SKIP,
        console: str = "",
        stub_args: tuple[str, ...] = (),
        prelude: str = "",
    ) -> None:
        self.dir = scratch
        stub = scratch / "stub.py"
        stub.write_text(STUB)
        self.console_log = scratch / "console.log"
        agent = shlex.join([PYTHON, str(stub), str(scratch), mode, *stub_args])
        # A shell first records the signal state init handed over, before Python (which
        # ignores SIGPIPE itself) starts; cat inherits the shell's ignores and mask.
        record = f"cat /proc/self/status > {scratch}/exec-status-$BULKHEAD_AGENT_RESTARTS"
        env = dict(
            os.environ,
            BULKHEAD_AGENT_CMD=shlex.join(["/bin/sh", "-c", f"{record}; exec {agent}"]),
            BULKHEAD_CMDLINE=cmdline,
            BULKHEAD_INIT_SKIP=skip,
            BULKHEAD_CONSOLE=console,
        )
        init = [PYTHON, "-I", "-S", "-c", LAUNCHER]
        if prelude:  # shell commands in the namespace, then exec init (still PID 1)
            init = ["/bin/sh", "-c", f"{prelude}; exec {shlex.join(init)}"]
        with open(self.console_log, "wb") as out:
            self.proc = subprocess.Popen(
                [*NAMESPACES, *init],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        children = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        self.init_pid = int(
            wait_for("init to start", lambda: _read(children).split(), 10, self.log)[0]
        )
        self.pidns = os.readlink(f"/proc/{self.init_pid}/ns/pid")

    def log(self) -> str:
        return self.console_log.read_text(errors="replace")

    def wait_file(self, name: str, timeout: float = 10.0) -> dict:
        path = self.dir / name
        wait_for(name, path.exists, timeout, self.log)
        return json.loads(path.read_text())

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(repr(text), lambda: text in self.log(), timeout, self.log)

    def processes(self) -> list[dict[str, str]]:
        """Every process in the guest's PID namespace, seen from the host."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != self.pidns:
                    continue
                found.append(_status(int(entry)) | {"host_pid": entry})
            except OSError:
                continue  # exited meanwhile
        return found

    def host_pid(self, ns_pid: int) -> int:
        for proc in self.processes():
            if int(proc["NSpid"].split()[-1]) == ns_pid:
                return int(proc["host_pid"])
        raise LookupError(f"no pid {ns_pid} in the guest\n{self.log()}")

    def exit_status(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"init did not end within {timeout} s\n--- console ---\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.init_pid, signal.SIGKILL)  # ends the whole namespace
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Not under /tmp: init mounts a tmpfs there when the mounts step runs.
    path = Path(tempfile.mkdtemp(prefix="bulkhead-init-test-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guests(scratch: Path) -> Iterator[Callable[..., Guest]]:
    started: list[Guest] = []

    def start(mode: str, **kwargs: object) -> Guest:
        guest = Guest(scratch, mode, **kwargs)  # type: ignore[arg-type]
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.close()


def _stamp(log: str, text: str) -> float:
    """The console timestamp (seconds since boot) of the first line containing ``text``."""
    for line in log.splitlines():
        if text in line:
            return float(line[1 : line.index("]")])
    raise AssertionError(f"no {text!r} in the console log:\n{log}")


def _unshare_killed_by(status: int, signo: int) -> bool:
    # util-linux unshare re-raises the signal its child died of; older ones exit 128+n.
    return status in (-signo, 128 + signo)


def test_agent_gets_documented_environment(guests: Callable[..., Guest]) -> None:
    guest = guests("sleep", cmdline="bulkhead.log=debug bulkhead.bogus=1 bulkhead.hostname")
    info = guest.wait_file("start-0")
    env = info["env"]
    now_ms = time.clock_gettime(time.CLOCK_BOOTTIME) * 1000

    assert info["ppid"] == 1
    assert 0 < float(env["BULKHEAD_INIT_STARTED_MS"]) <= now_ms
    assert env["BULKHEAD_AGENT_RESTARTS"] == "0"
    assert env["BULKHEAD_MODULES"] == ""  # modules skipped: none loaded
    assert env["BULKHEAD_LOG"] == "debug"
    assert env["PATH"].split(":")[-1] == "/bin"
    # A clean start: own session, nothing blocked, nothing ignored.
    assert info["sid"] == info["pid"]
    exec_status = {}
    for line in (guest.dir / "exec-status-0").read_text().splitlines():
        key, _, value = line.partition(":")
        exec_status[key] = value.strip()
    assert int(exec_status["SigBlk"], 16) == 0
    assert int(exec_status["SigIgn"], 16) == 0
    assert info["stdin"] == "/dev/null"
    # Network step ran in the fresh net/uts namespaces.
    assert info["loopback"] is True
    assert info["hostname"] == "bulkhead"

    log = guest.log()
    assert "INFO    init: bulkhead-init " in log
    assert f"agent started pid {info['pid']}" in log
    assert "WARNING init: bad kernel option 'bulkhead.bogus=1'" in log
    assert "WARNING init: bad kernel option 'bulkhead.hostname'" in log


def test_killed_agent_is_restarted(guests: Callable[..., Guest]) -> None:
    guest = guests("sleep")
    first = guest.wait_file("start-0")
    os.kill(guest.host_pid(first["pid"]), signal.SIGKILL)

    second = guest.wait_file("start-1")
    assert second["env"]["BULKHEAD_AGENT_RESTARTS"] == "1"
    assert second["pid"] != first["pid"]
    assert second["boottime"] - first["boottime"] >= 0.1  # the 100 ms back-off
    assert "agent exited (killed by SIGKILL)" in guest.log()
    assert "restarting in 100 ms" in guest.log()


def test_restart_backoff_doubles_up_to_the_cap(guests: Callable[..., Guest]) -> None:
    guest = guests("exit", cmdline="bulkhead.log=debug bulkhead.agent_restart_max_ms=300")
    starts = [guest.wait_file(f"start-{n}") for n in range(5)]
    delays = [b["boottime"] - a["boottime"] for a, b in itertools.pairwise(starts)]
    for waited, planned in zip(delays, (0.1, 0.2, 0.3, 0.3), strict=True):
        assert waited >= planned
    guest.wait_log("restarting in 300 ms")
    log = guest.log()
    order = [log.index(f"restarting in {ms} ms") for ms in (100, 200, 300)]
    assert order == sorted(order)
    assert "restarting in 400 ms" not in log
    assert "agent exited (exit code 3)" in log


def test_orphans_are_reaped(guests: Callable[..., Guest]) -> None:
    count = 20
    guest = guests("orphans", stub_args=(str(count),))
    guest.wait_file("start-0")

    def orphans() -> list[Path]:
        # Only finished files: each is written as "<name>.tmp" and then renamed.
        found = [f for f in guest.dir.glob("orphan-*") if not f.name.endswith(".tmp")]
        return found if len(found) == count else []

    files = wait_for("all orphans to exit", orphans, 15, guest.log)
    orphan_pids = {int(f.name.split("-")[1]) for f in files}
    assert all(json.loads(f.read_text())["ppid"] == 1 for f in files)

    def settled() -> bool:
        procs = guest.processes()
        zombies = [p for p in procs if p["State"].startswith("Z")]
        left = {int(p["NSpid"].split()[-1]) for p in procs} & orphan_pids
        return not zombies and not left

    wait_for("no zombies in the guest", settled, 10, guest.log)
    # Only init and the agent are left.
    assert len(guest.processes()) == 2
    assert "reaped orphan pid" in guest.log()


@pytest.mark.parametrize(
    ("signo", "kind", "ns_end"),
    [
        (signal.SIGTERM, "power-off", signal.SIGINT),
        (signal.SIGUSR2, "power-off", signal.SIGINT),
        (signal.SIGINT, "reboot", signal.SIGHUP),
    ],
)
def test_signal_stops_agent_and_ends_the_guest(
    guests: Callable[..., Guest], signo: int, kind: str, ns_end: int
) -> None:
    guest = guests("sleep")
    guest.wait_file("start-0")
    os.kill(guest.init_pid, signo)

    status = guest.exit_status(timeout=15)
    # reboot(2) in a PID namespace ends it as if its init were killed by SIGINT / SIGHUP.
    assert _unshare_killed_by(status, ns_end), f"status {status}\n{guest.log()}"
    assert (guest.dir / "term-0").exists(), "the agent never saw SIGTERM"
    log = guest.log()
    # A deadline loop, not a 3 s sleep: everything exited at once, so did the wait.
    took = _stamp(log, f"{kind}: all processes exited") - _stamp(log, "sending SIGTERM")
    assert took < 1.0, f"waited {took:.2f} s although everything exited at once"
    for step in (
        f"{kind}: sending SIGTERM to all processes",
        "agent exited (exit code 0)",
        f"{kind}: all processes exited",
        f"{kind}: syncing filesystems",
        "powering off" if kind == "power-off" else "rebooting",
    ):
        assert step in log
    assert "restarting in" not in log


def test_sighup_is_ignored(guests: Callable[..., Guest]) -> None:
    guest = guests("sleep")
    first = guest.wait_file("start-0")
    os.kill(guest.init_pid, signal.SIGHUP)
    guest.wait_log("SIGHUP: nothing to reload; ignored")
    assert guest.proc.poll() is None
    assert guest.host_pid(first["pid"])  # the agent is untouched
    assert not (guest.dir / "term-0").exists()


def test_sigterm_ignorers_get_sigkill_after_grace(guests: Callable[..., Guest]) -> None:
    guest = guests("stubborn")
    guest.wait_file("start-0")
    os.kill(guest.init_pid, signal.SIGTERM)

    status = guest.exit_status(timeout=20)
    assert _unshare_killed_by(status, signal.SIGINT), f"status {status}\n{guest.log()}"
    log = guest.log()
    grace = _stamp(log, "sending SIGKILL") - _stamp(log, "sending SIGTERM")
    assert 3.0 <= grace < 3.5
    assert "processes still running after 3 s; sending SIGKILL" in log
    assert "reaped orphan pid" in log  # the stubborn child, orphaned by the agent


def test_mounts_network_and_hostname(guests: Callable[..., Guest]) -> None:
    # Like a fresh guest, apart from /dev (the host's devtmpfs) and /proc (the host's PID
    # namespace's, which init must replace with its own).
    guest = guests(
        "inspect",
        skip="cgroups,modules",
        cmdline="bulkhead.log=debug bulkhead.hostname=box-1",
        prelude=(
            "for m in /sys /dev/pts /dev/shm /run /tmp; do"
            " while umount -l $m 2>/dev/null; do :; done; done"
        ),
    )
    info = guest.wait_file("start-0")
    mounts = {}
    for line in info["mounts"]:
        _source, target, fstype, options = line.split()[:4]
        mounts.setdefault(target, []).append((fstype, set(options.split(","))))

    def top(target: str) -> tuple[str, set[str]]:
        return mounts[target][-1]  # the last one is the visible one

    assert top("/proc")[0] == "proc" and {"nosuid", "nodev", "noexec"} <= top("/proc")[1]
    assert "bulkhead_init" in info["init_cmdline"]  # /proc belongs to the guest's PID ns
    assert top("/sys")[0] == "sysfs"
    fstype, opts = top("/dev/pts")
    assert fstype == "devpts" and {"ptmxmode=666", "mode=620", "gid=5"} <= opts
    assert info["pty"] == "/dev/pts/0"  # a fresh devpts instance of our own
    assert top("/dev/shm") == ("tmpfs", top("/dev/shm")[1]) and "nosuid" in top("/dev/shm")[1]
    assert top("/run")[0] == "tmpfs" and {"nosuid", "nodev", "mode=755"} <= top("/run")[1]
    assert top("/tmp")[0] == "tmpfs"
    assert len(mounts["/dev"]) == 1  # already mounted: left alone
    assert "(already mounted: /dev)" in guest.log()
    assert info["hostname"] == "box-1", guest.log()
    assert info["loopback"] is True

    os.kill(guest.init_pid, signal.SIGTERM)
    assert _unshare_killed_by(guest.exit_status(timeout=10), signal.SIGINT)
    assert "power-off: unmounted " in guest.log()


def test_debug_console_shell(guests: Callable[..., Guest]) -> None:
    master, slave = pty.openpty()
    tty = os.ttyname(slave)
    seen = bytearray()

    def expect(text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {text!r} on the console; got:\n{seen.decode(errors='replace')}")
            if select.select([master], [], [], left)[0]:
                seen.extend(os.read(master, 4096))

    try:
        guest = guests("sleep", console=tty, cmdline="bulkhead.log=debug bulkhead.debug_console=on")
        os.close(slave)
        guest.wait_file("start-0")
        expect("debug console is ON")
        # The shell is a session leader with the console as its controlling terminal.
        os.write(master, b"( : </dev/tty ) 2>/dev/null && echo CTTY-$((40+2)) || echo NO-CTTY\n")
        expect("CTTY-42")
        os.write(master, b"exit\n")
        expect("debug console shell exited (exit code 0)")
        os.write(master, b"echo again-$((2+3))\n")
        expect("again-5")
        os.kill(guest.init_pid, signal.SIGTERM)
        assert _unshare_killed_by(guest.exit_status(timeout=10), signal.SIGINT)
    finally:
        os.close(master)


def test_init_memory_is_small(guests: Callable[..., Guest]) -> None:
    guest = guests("sleep")
    guest.wait_file("start-0")
    private_kb = 0
    with open(f"/proc/{guest.init_pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private_kb += int(line.split()[1])
    assert private_kb <= 8 * 1024, f"init USS {private_kb} kB"
