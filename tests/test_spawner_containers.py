"""Containers through the real spawner, natively, as root: a busybox rootfs in a temp dir.

Each test launches its own spawner (a fork of pytest), runs one or more containers through
create + start (or exec) and checks what the container saw and how its end was reported.
Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import re
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bulkhead_agent.linux.capabilities import mask_of
from bulkhead_agent.spawner.client import ExitEvent, Spawner, SpawnError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
    pytest.mark.timeout(60),
]

BUSYBOX_LINKS = (
    "sh", "echo", "cat", "id", "hostname", "ls", "sleep", "true", "false", "touch", "mkdir",
    "tty", "test", "grep",
)  # fmt: skip
STANDARD_NAMESPACES = ("pid", "mount", "uts", "ipc")
RO_BIND = ["rbind", "ro"]
TIMEOUT = 10.0


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> Iterator[str]:
    """A bundle whose rootfs is static busybox plus links; world-traversable for user namespaces."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static)")
    directory = tempfile.mkdtemp(prefix="bulkhead-bundle-")
    os.chmod(directory, 0o755)
    rootfs = os.path.join(directory, "rootfs")
    for sub in ("bin", "proc", "dev", "sys", "tmp", "etc/secret"):
        os.makedirs(os.path.join(rootfs, sub))
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    shutil.copy(busybox, os.path.join(rootfs, "bin", "busybox"))
    for name in BUSYBOX_LINKS:
        os.symlink("busybox", os.path.join(rootfs, "bin", name))
    with open(os.path.join(rootfs, "etc", "secret", "inside"), "w") as f:
        f.write("hidden dir content\n")
    with open(os.path.join(rootfs, "etc", "secret.txt"), "w") as f:
        f.write("hidden file content\n")
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    spawner = Spawner.launch()
    yield spawner
    spawner.close(kill=True)


def make_spec(
    args: list[str],
    *,
    namespaces: tuple[str, ...] = STANDARD_NAMESPACES,
    hostname: str = "",
    **process: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin", "HOME=/"], **process},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": t} for t in namespaces]},
    }
    if hostname:
        spec["hostname"] = hostname
    if "mount" in namespaces:
        spec["mounts"] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ]
    return spec


@dataclass
class Result:
    pid: int
    event: ExitEvent
    stdout: str
    stderr: str


def read_until_eof(fds: list[int], deadline: float) -> list[bytes]:
    """Everything written to the pipes ``fds`` until every writer closed them."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    open_fds = list(fds)
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"output still open after the deadline: {chunks}")
        for fd in select.select(open_fds, [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            if chunk:
                chunks[fd].append(chunk)
            else:
                open_fds.remove(fd)
    return [b"".join(chunks[fd]) for fd in fds]


async def next_exit(spawner: Spawner, timeout: float = TIMEOUT) -> ExitEvent:
    return await asyncio.wait_for(spawner.exits.get(), timeout)


class Pipes:
    """stdin/stdout/stderr pipes: the container's ends go to the spawner, ours stay here."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()

    @property
    def theirs(self) -> list[int]:
        return [self.stdin_r, self.out_w, self.err_w]

    def handed_over(self) -> None:
        for fd in (*self.theirs, self.stdin_w):  # stdin_w closed: the container reads EOF
            os.close(fd)

    def read(self, deadline: float) -> tuple[str, str]:
        out, err = read_until_eof([self.out_r, self.err_r], deadline)
        return out.decode(), err.decode()

    def close(self) -> None:
        for fd in (self.out_r, self.err_r):
            os.close(fd)


async def run(
    spawner: Spawner, bundle: str, spec: dict[str, Any], container_id: str = "c1"
) -> Result:
    """create + start + wait; stdout and stderr collected until EOF."""
    deadline = time.monotonic() + TIMEOUT
    pipes = Pipes()
    try:
        try:
            pid = await spawner.create(container_id, bundle=bundle, spec=spec, stdio=pipes.theirs)
        finally:
            pipes.handed_over()
        await spawner.start(container_id)
        stdout, stderr = pipes.read(deadline)
    finally:
        pipes.close()
    event = await next_exit(spawner, deadline - time.monotonic())
    assert event.pid == pid and event.container_id == container_id
    return Result(pid, event, stdout, stderr)


def run_sync(spawner: Spawner, bundle: str, spec: dict[str, Any]) -> Result:
    return asyncio.run(run(spawner, bundle, spec))


def status_field(text: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(\S+)", text, re.MULTILINE)
    assert match, f"{name} not in {text!r}"
    return match.group(1)


# --- create, start, exit -------------------------------------------------------------------


def test_output_and_exit_code(spawner: Spawner, bundle: str) -> None:
    result = run_sync(spawner, bundle, make_spec(["/bin/sh", "-c", "echo hi; exit 3"]))
    assert result.stdout == "hi\n"
    assert (result.event.exit_code, result.event.signal) == (3, None)
    assert result.event.oom_killed is False


def test_stderr_and_stdin_are_wired(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["/bin/sh", "-c", "cat; echo oops >&2"])
    result = run_sync(spawner, bundle, spec)
    assert (result.stdout, result.stderr) == ("", "oops\n")  # stdin was at EOF
    assert result.event.exit_code == 0


def test_created_process_is_held_until_start(spawner: Spawner, bundle: str) -> None:
    async def scenario() -> None:
        pipes = Pipes()
        try:
            try:
                pid = await spawner.create(
                    "held", bundle=bundle, spec=make_spec(["echo", "started"]), stdio=pipes.theirs
                )
            finally:
                pipes.handed_over()
            # Created means set up and parked just before exec: still our Python, silent.
            assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(sys.executable)
            assert select.select([pipes.out_r], [], [], 0)[0] == []
            await spawner.ping()  # a round trip through the spawner changes nothing
            assert select.select([pipes.out_r], [], [], 0)[0] == []
            await spawner.start("held")
            stdout, _ = pipes.read(time.monotonic() + TIMEOUT)
        finally:
            pipes.close()
        assert stdout == "started\n"
        event = await next_exit(spawner)
        assert (event.pid, event.exit_code) == (pid, 0)

    asyncio.run(scenario())


def test_missing_command_fails_to_start_and_is_no_exit(spawner: Spawner, bundle: str) -> None:
    async def scenario() -> None:
        devnull = os.open("/dev/null", os.O_RDWR)
        try:
            await spawner.create(
                "missing", bundle=bundle, spec=make_spec(["nosuch"]), stdio=[devnull] * 3
            )
            with pytest.raises(SpawnError) as info:
                await spawner.start("missing")
        finally:
            os.close(devnull)
        assert info.value.step == "exec"
        assert info.value.errno == errno.ENOENT
        assert "nosuch" in info.value.message
        # The failed process is reaped without an exit event: the next event is the next
        # container's.
        result = await run(spawner, bundle, make_spec(["true"]), "after")
        assert result.event.container_id == "after"
        assert spawner.exits.empty()

    asyncio.run(scenario())


def test_setup_failure_names_the_step(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["true"])
    spec["mounts"].append({"destination": "/sys", "type": "nosuchfs", "source": "none"})

    async def scenario() -> None:
        devnull = os.open("/dev/null", os.O_RDWR)
        try:
            with pytest.raises(SpawnError) as info:
                await spawner.create("bad", bundle=bundle, spec=spec, stdio=[devnull] * 3)
        finally:
            os.close(devnull)
        assert info.value.step == "mount_spec_mounts"
        assert info.value.errno == errno.ENODEV
        assert "/sys" in info.value.message
        # The id is free again.
        result = await run(spawner, bundle, make_spec(["true"]), "bad")
        assert result.event.exit_code == 0

    asyncio.run(scenario())


def test_invalid_spec_is_refused_before_fork(spawner: Spawner, bundle: str) -> None:
    async def scenario() -> None:
        with pytest.raises(SpawnError) as info:
            await spawner.create("x", bundle=bundle, spec=make_spec([]), stdio=[0, 1, 2])
        assert info.value.step == "validate"
        assert info.value.message == "process.args: must be a non-empty list of strings"

    asyncio.run(scenario())


def test_killed_by_signal_is_reported_as_signal(spawner: Spawner, bundle: str) -> None:
    async def scenario() -> None:
        devnull = os.open("/dev/null", os.O_RDWR)
        try:
            spec = make_spec(["sleep", "30"], namespaces=())
            pid = await spawner.create("sleeper", bundle=bundle, spec=spec, stdio=[devnull] * 3)
        finally:
            os.close(devnull)
        await spawner.start("sleeper")
        await spawner.signal(pid, signal.SIGTERM)
        event = await next_exit(spawner)
        assert (event.pid, event.exit_code, event.signal) == (pid, None, signal.SIGTERM)
        with pytest.raises(SpawnError) as info:  # reaped: never signalled again
            await spawner.signal(pid, signal.SIGTERM)
        assert info.value.errno == errno.ESRCH

    asyncio.run(scenario())


def test_signal_reaches_a_handler_in_the_container(spawner: Spawner, bundle: str) -> None:
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 30 & wait"

    async def scenario() -> None:
        pipes = Pipes()
        try:
            try:
                pid = await spawner.create(
                    "trap", bundle=bundle, spec=make_spec(["sh", "-c", script]), stdio=pipes.theirs
                )
            finally:
                pipes.handed_over()
            await spawner.start("trap")
            ready = b""
            deadline = time.monotonic() + TIMEOUT
            while b"ready\n" not in ready:
                assert select.select([pipes.out_r], [], [], deadline - time.monotonic())[0]
                ready += os.read(pipes.out_r, 100)
            await spawner.signal(pid, signal.SIGTERM)  # to PID 1 of its namespace
            stdout, _ = pipes.read(deadline)
        finally:
            pipes.close()
        assert stdout == "got TERM\n"
        event = await next_exit(spawner)
        assert (event.pid, event.exit_code) == (pid, 7)

    asyncio.run(scenario())


# --- isolation -----------------------------------------------------------------------------


def test_pid_namespace_makes_it_pid_1(spawner: Spawner, bundle: str) -> None:
    result = run_sync(spawner, bundle, make_spec(["sh", "-c", "echo $$"]))
    assert result.stdout == "1\n"


def test_uts_namespace_hostname(spawner: Spawner, bundle: str) -> None:
    result = run_sync(spawner, bundle, make_spec(["hostname"], hostname="box-42"))
    assert result.stdout == "box-42\n"
    assert os.uname().nodename != "box-42"


def test_pivot_root_shows_only_the_rootfs(spawner: Spawner, bundle: str) -> None:
    result = run_sync(spawner, bundle, make_spec(["ls", "/"]))
    assert result.stdout.split() == ["bin", "dev", "etc", "proc", "sys", "tmp"]
    devices = run_sync(spawner, bundle, make_spec(["ls", "/dev"])).stdout.split()
    for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "fd"):
        assert name in devices


def test_readonly_root(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["sh", "-c", "touch /x; echo $?; touch /tmp/y && echo tmp-ok"])
    spec["root"]["readonly"] = True
    result = run_sync(spawner, bundle, spec)
    assert result.stdout == "1\ntmp-ok\n"  # the tmpfs on /tmp stays writable
    assert "Read-only file system" in result.stderr
    assert not os.path.exists(os.path.join(bundle, "rootfs", "x"))


def test_masked_and_readonly_paths(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["sh", "-c", "ls /etc/secret; cat /etc/secret.txt; touch /etc/new; echo $?"])
    spec["linux"]["maskedPaths"] = ["/etc/secret", "/etc/secret.txt", "/proc/kcore", "/nope"]
    spec["linux"]["readonlyPaths"] = ["/etc", "/proc/sys"]
    result = run_sync(spawner, bundle, spec)
    assert result.stdout == "1\n"  # an empty dir, an empty file, a failed touch
    assert "Read-only file system" in result.stderr
    assert result.event.exit_code == 0


def test_capabilities_are_the_specs(spawner: Spawner, bundle: str) -> None:
    wanted = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    capabilities = {"bounding": wanted, "effective": wanted, "permitted": wanted}
    spec = make_spec(["cat", "/proc/self/status"], capabilities=capabilities)
    status = run_sync(spawner, bundle, spec).stdout
    for name in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status_field(status, name), 16) == mask_of(wanted), name
    assert int(status_field(status, "CapInh"), 16) == 0
    assert int(status_field(status, "CapAmb"), 16) == 0


def test_user_and_additional_groups(spawner: Spawner, bundle: str) -> None:
    user = {"uid": 1000, "gid": 1001, "additionalGids": [10, 20]}
    result = run_sync(spawner, bundle, make_spec(["id"], user=user))
    assert re.match(r"uid=1000 gid=1001 groups=(1001,)?10,20$", result.stdout.strip())
    capabilities = run_sync(
        spawner, bundle, make_spec(["grep", "CapEff", "/proc/self/status"], user=user)
    )
    assert int(capabilities.stdout.split()[1], 16) == 0  # not root: no capabilities


def test_rlimits(spawner: Spawner, bundle: str) -> None:
    rlimits = [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]
    result = run_sync(
        spawner, bundle, make_spec(["sh", "-c", "ulimit -n; ulimit -Hn"], rlimits=rlimits)
    )
    assert result.stdout == "123\n456\n"


def test_no_new_privileges(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["cat", "/proc/self/status"], noNewPrivileges=True)
    assert status_field(run_sync(spawner, bundle, spec).stdout, "NoNewPrivs") == "1"
    spec = make_spec(["cat", "/proc/self/status"])
    assert status_field(run_sync(spawner, bundle, spec).stdout, "NoNewPrivs") == "0"


def test_oom_score_adj(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["cat", "/proc/self/oom_score_adj"], oomScoreAdj=500)
    assert run_sync(spawner, bundle, spec).stdout == "500\n"


def test_user_namespace_maps_root(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(
        ["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g"],
        namespaces=("user", *STANDARD_NAMESPACES),
    )
    mapping = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["uidMappings"] = mapping
    spec["linux"]["gidMappings"] = mapping
    result = run_sync(spawner, bundle, spec)
    assert result.stderr == ""
    assert result.stdout.split() == ["0", "100000", "65536", "0", "100000", "65536", "0", "0"]


def test_terminal(spawner: Spawner, bundle: str) -> None:
    async def scenario() -> tuple[int, bytes]:
        master, slave = os.openpty()
        try:
            try:
                spec = make_spec(
                    ["sh", "-c", "test -t 0 && test -t 1 && echo a-tty"], terminal=True
                )
                pid = await spawner.create("tty", bundle=bundle, spec=spec, stdio=[slave])
            finally:
                os.close(slave)
            await spawner.start("tty")
            event = await next_exit(spawner)
            assert event.pid == pid
            output = b""
            while select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 1024)
                except OSError:  # EIO: the last slave is gone
                    break
                if not chunk:
                    break
                output += chunk
            return event.exit_code or 0, output
        finally:
            os.close(master)

    code, output = asyncio.run(scenario())
    assert (code, output) == (0, b"a-tty\r\n")


# --- exec ----------------------------------------------------------------------------------


def test_exec_joins_a_running_container(spawner: Spawner, bundle: str) -> None:
    async def scenario() -> None:
        devnull = os.open("/dev/null", os.O_RDWR)
        try:
            spec = make_spec(["sleep", "30"], hostname="inside")
            pid = await spawner.create("box", bundle=bundle, spec=spec, stdio=[devnull] * 3)
        finally:
            os.close(devnull)
        await spawner.start("box")

        pipes = Pipes()
        try:
            try:
                process = {
                    "args": ["sh", "-c", "hostname; ls /; echo $$; exit 5"],
                    "cwd": "/tmp",
                    "env": ["PATH=/bin"],
                }
                exec_pid = await spawner.exec("box", process, stdio=pipes.theirs, exec_id="e1")
            finally:
                pipes.handed_over()
            stdout, _ = pipes.read(time.monotonic() + TIMEOUT)
        finally:
            pipes.close()
        lines = stdout.split("\n")
        assert lines[0] == "inside"
        assert lines[1:7] == ["bin", "dev", "etc", "proc", "sys", "tmp"]
        assert 1 < int(lines[7]) < 1000  # a small pid: inside the container's namespace
        event = await next_exit(spawner)
        assert (event.pid, event.exit_code, event.exec_id, event.container_id) == (
            exec_pid,
            5,
            "e1",
            "box",
        )

        with pytest.raises(SpawnError) as info:
            await spawner.exec("box", {"args": ["nosuch"], "cwd": "/"}, stdio=[0, 1, 2])
        assert (info.value.step, info.value.errno) == ("exec", errno.ENOENT)

        await spawner.signal(pid, signal.SIGKILL)
        event = await next_exit(spawner)
        assert (event.pid, event.signal, event.container_id) == (pid, signal.SIGKILL, "box")

        with pytest.raises(SpawnError) as info:
            await spawner.exec("box", {"args": ["true"], "cwd": "/"}, stdio=[0, 1, 2])
        assert info.value.errno == errno.ESRCH

    asyncio.run(scenario())


# --- seccomp -------------------------------------------------------------------------------


def _import_seccomp() -> bool:
    """libseccomp's bindings, from Debian's python3-seccomp if this Python lacks them.

    The package is built for Debian's python3.11; the guest uses exactly that Python. Here it
    is loaded by path into the test process, and the spawner's fork inherits it.
    """
    try:
        import seccomp  # noqa: F401

        return True
    except ImportError:
        pass
    candidates = (
        [
            os.path.join("/usr/lib/python3/dist-packages", name)
            for name in os.listdir("/usr/lib/python3/dist-packages")
            if name.startswith("seccomp.cpython-311")
        ]
        if os.path.isdir("/usr/lib/python3/dist-packages")
        else []
    )
    for path in candidates:
        spec = importlib.util.spec_from_file_location("seccomp", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError:
            continue
        sys.modules["seccomp"] = module
        return True
    return False


@pytest.mark.parametrize("no_new_privileges", [True, False], ids=["nnp", "caps"])
def test_seccomp_denies_a_syscall(bundle: str, no_new_privileges: bool) -> None:
    if not _import_seccomp():
        pytest.skip("libseccomp's Python bindings are missing (apt-get install python3-seccomp)")
    spec = make_spec(["sh", "-c", "mkdir /tmp/d; echo $?; touch /tmp/f && echo touched"])
    spec["process"]["noNewPrivileges"] = no_new_privileges
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [
            {
                "names": ["mkdir", "mkdirat", "no_such_syscall"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 1,
            }
        ],
    }
    spawner = Spawner.launch()  # after the import: the spawner inherits the module
    try:
        result = run_sync(spawner, bundle, spec)
    finally:
        spawner.close()
    assert result.stdout == "1\ntouched\n"
    assert "Operation not permitted" in result.stderr


def test_seccomp_without_bindings_is_a_clear_error(
    bundle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "seccomp", None)  # "import seccomp" now fails
    spec = make_spec(["true"])
    spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW"}
    spawner = Spawner.launch()
    try:
        with pytest.raises(SpawnError) as info:
            run_sync(spawner, bundle, spec)
    finally:
        spawner.close()
    assert info.value.step == "seccomp"
    assert "libseccomp's Python module is missing" in info.value.message


# --- many in a row -------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("namespaces", [(), STANDARD_NAMESPACES], ids=["plain", "namespaces"])
def test_many_short_lived_processes(
    spawner: Spawner, bundle: str, namespaces: tuple[str, ...]
) -> None:
    count = 200

    async def scenario() -> list[float]:
        devnull = os.open("/dev/null", os.O_RDWR)
        spec = make_spec(["/bin/true"], namespaces=namespaces)
        durations = []
        try:
            for i in range(count):
                started = time.perf_counter()
                pid = await spawner.create(f"t{i}", bundle=bundle, spec=spec, stdio=[devnull] * 3)
                await spawner.start(f"t{i}")
                event = await next_exit(spawner)
                durations.append(time.perf_counter() - started)
                assert (event.pid, event.exit_code, event.container_id) == (pid, 0, f"t{i}")
        finally:
            os.close(devnull)
        return durations

    durations = asyncio.run(scenario())
    assert len(durations) == count
    assert _children_of(spawner.pid) == []  # every one reaped: no zombies, no strays
    print(
        f"\n{count} x create+start+wait /bin/true ({'+'.join(namespaces) or 'no namespaces'}): "
        f"median {statistics.median(durations) * 1000:.2f} ms, "
        f"p90 {sorted(durations)[int(count * 0.9)] * 1000:.2f} ms"
    )


# --- more of the spec ------------------------------------------------------------------------


def test_bind_mounts_and_sysctls(spawner: Spawner, bundle: str, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "file").write_text("from the host\n")
    (tmp_path / "single").write_text("one file\n")
    spec = make_spec(
        [
            "sh",
            "-c",
            "cat /tmp/data/file /tmp/single; touch /tmp/data/new; echo $?; "
            "cat /proc/sys/kernel/shmmax",
        ]
    )
    # Below the /tmp tmpfs, so the mount points are not left in the shared rootfs.
    spec["mounts"] += [
        {
            "destination": "/tmp/data",
            "type": "bind",
            "source": str(data),
            "options": ["rbind", "ro"],
        },
        {"destination": "/tmp/single", "source": str(tmp_path / "single"), "options": ["bind"]},
    ]
    spec["linux"]["sysctl"] = {"kernel.shmmax": "123456789"}  # namespaced by the ipc namespace
    result = run_sync(spawner, bundle, spec)
    assert result.stdout == "from the host\none file\n1\n123456789\n"
    assert "Read-only file system" in result.stderr
    assert not (data / "new").exists()
    assert Path("/proc/sys/kernel/shmmax").read_text().strip() != "123456789"


def test_concurrent_creates(spawner: Spawner, bundle: str) -> None:
    async def scenario() -> None:
        devnull = os.open("/dev/null", os.O_RDWR)
        try:
            spec = make_spec(["sh", "-c", "exit 4"])
            ids = [f"p{i}" for i in range(10)]
            pids = await asyncio.gather(
                *(spawner.create(i, bundle=bundle, spec=spec, stdio=[devnull] * 3) for i in ids)
            )
        finally:
            os.close(devnull)
        assert len(set(pids)) == 10
        await asyncio.gather(*(spawner.start(i) for i in ids))
        events = [await next_exit(spawner) for _ in ids]
        assert sorted(e.pid for e in events) == sorted(pids)
        assert {e.exit_code for e in events} == {4}
        assert sorted(e.container_id for e in events) == sorted(ids)

    asyncio.run(scenario())


def test_exec_into_a_user_namespace_container(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["sleep", "30"], namespaces=("user", *STANDARD_NAMESPACES))
    mapping = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    spec["linux"]["uidMappings"] = mapping
    spec["linux"]["gidMappings"] = mapping

    async def scenario() -> None:
        devnull = os.open("/dev/null", os.O_RDWR)
        try:
            pid = await spawner.create("userns", bundle=bundle, spec=spec, stdio=[devnull] * 3)
        finally:
            os.close(devnull)
        await spawner.start("userns")
        assert os.stat(f"/proc/{pid}").st_uid == 200000  # container root is host 200000
        pipes = Pipes()
        try:
            try:
                process = {"args": ["sh", "-c", "id -u; cat /proc/self/uid_map"], "cwd": "/"}
                await spawner.exec("userns", process, stdio=pipes.theirs)
            finally:
                pipes.handed_over()
            stdout, stderr = pipes.read(time.monotonic() + TIMEOUT)
        finally:
            pipes.close()
        assert stdout.split() == ["0", "0", "200000", "65536"], stderr
        assert (await next_exit(spawner)).exit_code == 0
        await spawner.signal(pid, signal.SIGKILL)
        assert (await next_exit(spawner)).pid == pid

    asyncio.run(scenario())


def test_many_execs_in_a_row_and_at_once(spawner: Spawner, bundle: str) -> None:
    # Exits and ends of stream arrive together here, in every order: the loop must cope with
    # a channel that handling another event already closed.
    async def scenario() -> None:
        devnull = os.open("/dev/null", os.O_RDWR)
        try:
            spec = make_spec(["sleep", "30"])
            pid = await spawner.create("busy", bundle=bundle, spec=spec, stdio=[devnull] * 3)
            await spawner.start("busy")
            process = {"args": ["true"], "cwd": "/", "env": ["PATH=/bin"]}
            for i in range(100):
                exec_pid = await spawner.exec("busy", process, stdio=[devnull] * 3, exec_id=f"s{i}")
                event = await next_exit(spawner)
                assert (event.pid, event.exit_code, event.exec_id) == (exec_pid, 0, f"s{i}")
            exec_pids = await asyncio.gather(
                *(
                    spawner.exec("busy", process, stdio=[devnull] * 3, exec_id=f"g{i}")
                    for i in range(20)
                )
            )
            events = [await next_exit(spawner) for _ in exec_pids]
            assert sorted(e.pid for e in events) == sorted(exec_pids)
            assert {e.exit_code for e in events} == {0}
        finally:
            os.close(devnull)
        await spawner.signal(pid, signal.SIGKILL)
        assert (await next_exit(spawner)).pid == pid
        await spawner.ping()  # still serving

    asyncio.run(scenario())


def test_initramfs_guest_moves_the_root_instead_of_pivoting(
    bundle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The guest runs from its initramfs, which pivot_root cannot leave; pretend we do too.
    from bulkhead_agent.linux import mounts

    monkeypatch.setattr(mounts, "root_is_initramfs", lambda: True)

    def no_pivot(new_root: str, put_old: str) -> None:
        raise OSError(errno.EINVAL, "pivot_root from an initramfs")

    monkeypatch.setattr(mounts, "pivot_root", no_pivot)  # as the guest kernel would refuse
    spawner = Spawner.launch()
    try:
        spec = make_spec(["sh", "-c", "ls /; echo $$"])
        result = run_sync(spawner, bundle, spec)
    finally:
        spawner.close()
    assert result.stdout.split() == ["bin", "dev", "etc", "proc", "sys", "tmp", "1"]
    assert result.event.exit_code == 0
