"""Container and process RPCs of the real agent, natively as root (no cgroup v2 on this host:
the agent must work without it; test_agent_containers_cgroup.py covers a cgroup2 tree).

Every call has a deadline; waiting for a state is done through the agent (WaitProcess, the
Attach stream), never by sleeping.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from test_agent_containers_support import (
    RPC_TIMEOUT,
    STANDARD_NAMESPACES,
    AgentEnv,
    Attachment,
    make_spec,
    mounts_under,
    running_agent,
)

from bulkhead_proto.v1 import agent_pb2

pb = agent_pb2
pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def env() -> Iterator[AgentEnv]:
    with running_agent() as state:
        yield state


def code_of(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status code a call fails with (and its message on .details)."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    code_of.details = info.value.details()  # type: ignore[attr-defined]
    return info.value.code()


def read_until(attachment: Attachment, marker: bytes) -> bytes:
    """Stdout until ``marker`` appeared: the process reached that point."""
    seen = b""
    while marker not in seen:
        response = attachment.next()
        assert response is not None, f"stream ended before {marker!r}; got {seen!r}"
        seen += response.stdout.data
    return seen


def sleeper(env: AgentEnv, container_id: str, **spec_fields) -> int:  # type: ignore[no-untyped-def]
    spec = make_spec(["sleep", "1000"], **spec_fields)
    pid = env.client.create(container_id, spec)
    env.client.start(container_id)
    return pid


# --- lifecycle and errors -------------------------------------------------------------------


def test_create_start_wait_remove_and_listing(env: AgentEnv) -> None:
    c = env.client
    pid = c.create("life", make_spec(["sh", "-c", "read x; exit 5"]))
    info = c.list()["life"]
    assert (info.status, info.pid, list(info.args)) == (
        "created",
        pid,
        ["sh", "-c", "read x; exit 5"],
    )
    assert info.rootfs == str(env.rootfs) and info.created_unix > 0
    attachment = Attachment(c.stub, "life")
    c.start("life")
    assert c.list()["life"].status == "running"
    attachment.send(stdin=b"\n")
    out = attachment.collect()
    assert out.exit is not None and (out.exit.kind, out.exit.exit_code) == (
        pb.ProcessExit.EXITED,
        5,
    )
    assert c.list()["life"].status == "stopped"
    assert c.wait("life").exit_code == 5  # kept: a late waiter gets it at once
    c.remove("life")
    assert "life" not in c.list()
    assert mounts_under(env.containers_dir / "life") == []
    assert not (env.containers_dir / "life").exists()


def test_bad_container_ids(env: AgentEnv) -> None:
    for bad in ("", "-x", ".x", "a/b", "a b", "x" * 65, "ü"):
        assert (
            code_of(env.client.create, bad, make_spec(["true"])) == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "container_id" in code_of.details  # type: ignore[attr-defined]


def test_duplicate_id(env: AgentEnv) -> None:
    c = env.client
    c.create("dup", make_spec(["true"]))
    try:
        assert code_of(c.create, "dup", make_spec(["true"])) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        c.remove("dup")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (b"{not json", "oci_spec"),
        (b"", "oci_spec"),
        ({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}, "process"),
        (make_spec([]), "process.args"),
        ({**make_spec(["true"]), "process": {"args": ["true"], "cwd": "relative"}}, "process.cwd"),
        (
            {**make_spec(["true"]), "linux": {"namespaces": [{"type": "nope"}]}},
            "linux.namespaces[0].type",
        ),
        (
            {**make_spec(["true"]), "linux": {"resources": {"memory": {"limit": 100, "swap": 50}}}},
            "linux.resources.memory.swap",
        ),
        ({**make_spec(["true"]), "root": {"path": "/nonexistent"}}, "root.path"),
    ],
    ids=["not-json", "empty", "no-process", "no-args", "cwd", "namespace", "swap", "root"],
)
def test_bad_spec_names_the_field(env: AgentEnv, spec, field: str) -> None:  # type: ignore[no-untyped-def]
    assert code_of(env.client.create, "badspec", spec) == grpc.StatusCode.INVALID_ARGUMENT
    assert field in code_of.details  # type: ignore[attr-defined]
    assert "badspec" not in env.client.list()
    assert mounts_under(env.containers_dir / "badspec") == []


def test_bad_bundle_dir(env: AgentEnv) -> None:
    code = code_of(env.client.create, "badbundle", make_spec(["true"]), "relative/dir")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bundle_dir" in code_of.details  # type: ignore[attr-defined]


def test_start_twice_and_unknown_ids(env: AgentEnv) -> None:
    c = env.client
    c.create("twice", make_spec(["sleep", "1000"]))
    try:
        c.start("twice")
        assert code_of(c.start, "twice") == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        c.remove("twice")
    stub = c.stub
    for call, request in (
        (stub.StartContainer, pb.StartContainerRequest(container_id="nosuch")),
        (stub.WaitProcess, pb.WaitProcessRequest(container_id="nosuch")),
        (stub.SignalProcess, pb.SignalProcessRequest(container_id="nosuch", signal=15)),
        (stub.RemoveContainer, pb.RemoveContainerRequest(container_id="nosuch")),
        (stub.PauseContainer, pb.PauseContainerRequest(container_id="nosuch")),
        (stub.ResumeContainer, pb.ResumeContainerRequest(container_id="nosuch")),
        (stub.UpdateContainer, pb.UpdateContainerRequest(container_id="nosuch", resources=b"{}")),
        (stub.GetContainerStats, pb.ContainerStatsRequest(container_id="nosuch")),
        (stub.ListProcesses, pb.ListProcessesRequest(container_id="nosuch")),
        (
            stub.ExecProcess,
            pb.ExecProcessRequest(container_id="nosuch", exec_id="e", process=b"{}"),
        ),
    ):
        assert code_of(call, request, timeout=RPC_TIMEOUT) == grpc.StatusCode.NOT_FOUND, call
    assert code_of(Attachment(stub, "nosuch").collect) == grpc.StatusCode.NOT_FOUND


def test_failed_start_is_reported_and_leaves_nothing(env: AgentEnv) -> None:
    c = env.client
    c.create("nocmd", make_spec(["/bin/no-such-command"]))
    assert code_of(c.start, "nocmd") == grpc.StatusCode.FAILED_PRECONDITION
    exit_ = c.wait("nocmd")
    assert exit_.kind == pb.ProcessExit.START_FAILED
    assert (exit_.start_failure.step, exit_.start_failure.errno) == ("exec", errno.ENOENT)
    assert "no-such-command" in exit_.start_failure.message
    assert c.list()["nocmd"].status == "stopped"
    c.remove("nocmd")
    assert "nocmd" not in c.list()
    assert mounts_under(env.containers_dir / "nocmd") == []


def test_failed_create_leaves_no_mount_record_or_fd(env: AgentEnv) -> None:
    c = env.client
    fds_before = len(os.listdir(f"/proc/{env.agent.proc.pid}/fd"))
    spec = make_spec(["true"])
    spec["mounts"].append({"destination": "/sys", "type": "no-such-fs", "source": "none"})
    assert code_of(c.create, "halfmade", spec) == grpc.StatusCode.FAILED_PRECONDITION
    assert "mount_spec_mounts" in code_of.details  # type: ignore[attr-defined]
    assert "halfmade" not in c.list()
    assert mounts_under(env.containers_dir / "halfmade") == []
    assert not (env.containers_dir / "halfmade").exists()
    assert len(os.listdir(f"/proc/{env.agent.proc.pid}/fd")) == fds_before
    # The id is free again.
    out = c.run("halfmade", make_spec(["echo", "second try"]))
    assert out.stdout == b"second try\n"


def test_remove_timeouts(env: AgentEnv) -> None:
    c = env.client
    # Handles SIGTERM: removing with a grace period lets it finish its way.
    script = "trap 'echo bye; exit 7' TERM; echo ready; sleep 1000 & wait"
    c.create("graceful", make_spec(["sh", "-c", script]))
    attachment = Attachment(c.stub, "graceful")
    c.start("graceful")
    read_until(attachment, b"ready\n")
    waiter = c.stub.WaitProcess.future(pb.WaitProcessRequest(container_id="graceful"), timeout=30)
    c.remove("graceful", timeout_ms=10_000)
    assert waiter.result().exit_code == 7
    # Ignores SIGTERM: SIGKILL after the timeout.
    c.create("stubborn", make_spec(["sh", "-c", "trap '' TERM; echo ready; sleep 1000 & wait"]))
    attachment = Attachment(c.stub, "stubborn")
    c.start("stubborn")
    read_until(attachment, b"ready\n")
    waiter = c.stub.WaitProcess.future(pb.WaitProcessRequest(container_id="stubborn"), timeout=30)
    c.remove("stubborn", timeout_ms=200)
    exit_ = waiter.result()
    assert (exit_.kind, exit_.signal) == (pb.ProcessExit.SIGNALED, signal.SIGKILL)
    assert not exit_.oom_killed
    # Never started: removed all the same.
    c.create("neverstarted", make_spec(["true"]))
    c.remove("neverstarted", timeout_ms=1000)
    assert not {"graceful", "stubborn", "neverstarted"} & set(c.list())


# --- exec ----------------------------------------------------------------------------------------


def test_exec_into_a_running_container(env: AgentEnv) -> None:
    c = env.client
    spec = make_spec(
        ["sleep", "1000"],
        hostname="box-7",
        env=["PATH=/bin", "FOO=from-container"],
        cwd="/tmp",
        capabilities={
            "bounding": ["CAP_KILL", "CAP_CHOWN"],
            "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL"],
        },
        noNewPrivileges=True,
    )
    c.create("box", spec)
    try:
        c.start("box")
        c.exec("box", "e1", {"args": ["hostname"]})
        out = Attachment(c.stub, "box", "e1").collect()
        assert out.stdout == b"box-7\n" and out.exit is not None and out.exit.exit_code == 0

        # Left out: env, cwd, capabilities, noNewPrivileges come from the container's process.
        script = "echo $FOO; pwd; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status"
        c.exec("box", "e2", {"args": ["sh", "-c", script]})
        lines = Attachment(c.stub, "box", "e2").collect().stdout.decode().splitlines()
        assert lines[:2] == ["from-container", "/tmp"]
        status = dict(re.split(r":\s+", line) for line in lines[2:])
        assert int(status["CapEff"], 16) == 1 << 5  # CAP_KILL only, not root's full set
        assert int(status["CapBnd"], 16) == (1 << 5) | (1 << 0)
        assert status["NoNewPrivs"] == "1"

        # Given: they win.
        c.exec(
            "box", "e3", {"args": ["sh", "-c", "echo $FOO; pwd"], "env": ["FOO=mine"], "cwd": "/"}
        )
        assert Attachment(c.stub, "box", "e3").collect().stdout == b"mine\n/\n"

        assert code_of(c.exec, "box", "e1", {"args": ["true"]}) == grpc.StatusCode.ALREADY_EXISTS
        assert code_of(c.exec, "box", "", {"args": ["true"]}) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(c.exec, "box", "e4", {"cwd": "/"}) == grpc.StatusCode.INVALID_ARGUMENT
        assert "process.args" in code_of.details  # type: ignore[attr-defined]

        # A command that does not exist: the exec fails, and its waiters learn why.
        assert (
            code_of(c.exec, "box", "e5", {"args": ["nosuch"]})
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        failed = c.wait("box", "e5")
        assert failed.kind == pb.ProcessExit.START_FAILED
        assert (failed.start_failure.step, failed.start_failure.errno) == ("exec", errno.ENOENT)

        assert set(c.list()["box"].exec_ids) == {"e1", "e2", "e3", "e5"}
    finally:
        c.remove("box")


def test_exec_needs_a_running_container(env: AgentEnv) -> None:
    c = env.client
    c.create("notyet", make_spec(["true"]))
    try:
        code = code_of(c.exec, "notyet", "e", {"args": ["true"]})
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        c.remove("notyet")


def test_exec_with_a_terminal(env: AgentEnv) -> None:
    c = env.client
    sleeper(env, "ttybox")
    try:
        c.exec(
            "ttybox",
            "t",
            {"args": ["sh", "-c", "tty; test -t 0 && echo is-a-tty"], "terminal": True},
        )
        out = Attachment(c.stub, "ttybox", "t").collect()
    finally:
        c.remove("ttybox")
    lines = out.stdout.split(b"\r\n")
    assert re.fullmatch(rb"/dev/pts/\d+", lines[0]), out.stdout
    assert lines[1] == b"is-a-tty"


# --- signals and waiting -----------------------------------------------------------------------


def test_signal_one_process(env: AgentEnv) -> None:
    c = env.client
    script = "trap 'echo got-term; exit 7' TERM; echo ready; sleep 1000 & wait"
    c.create("sig", make_spec(["sh", "-c", script]))
    try:
        attachment = Attachment(c.stub, "sig")
        c.start("sig")
        read_until(attachment, b"ready\n")
        c.exec("sig", "other", {"args": ["sleep", "1000"]})
        c.signal("sig", signal.SIGTERM, exec_id="other")  # just that one
        other = c.wait("sig", "other")
        assert (other.kind, other.signal) == (pb.ProcessExit.SIGNALED, signal.SIGTERM)
        assert c.list()["sig"].status == "running"
        c.signal("sig", signal.SIGTERM)
        out = attachment.collect()
        assert out.stdout == b"got-term\n"
        assert out.exit is not None and out.exit.exit_code == 7
        # Ended: no more signals to it.
        assert code_of(c.signal, "sig", signal.SIGTERM) == grpc.StatusCode.FAILED_PRECONDITION
        for bad in (65, 1000):
            assert code_of(c.signal, "sig", bad) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(c.signal, "sig", 15, exec_id="nope") == grpc.StatusCode.NOT_FOUND
    finally:
        c.remove("sig")


def test_signal_all(env: AgentEnv) -> None:
    c = env.client
    sleeper(env, "all")
    try:
        c.exec("all", "x1", {"args": ["sleep", "1000"]})
        c.exec("all", "x2", {"args": ["sh", "-c", "sleep 1000 & sleep 1000 & wait"]})
        c.signal("all", 0, all_=True)  # signal 0: nothing happens
        c.signal("all", signal.SIGKILL, all_=True)
        for exec_id in ("", "x1", "x2"):
            exit_ = c.wait("all", exec_id)
            assert (exit_.kind, exit_.signal) == (pb.ProcessExit.SIGNALED, signal.SIGKILL), exec_id
        listed = c.stub.ListProcesses(pb.ListProcessesRequest(container_id="all"), timeout=10)
        assert list(listed.processes) == []
    finally:
        c.remove("all")


def test_several_waiters(env: AgentEnv) -> None:
    c = env.client
    sleeper(env, "waited")
    try:
        request = pb.WaitProcessRequest(container_id="waited")
        waiters = [c.stub.WaitProcess.future(request, timeout=30) for _ in range(5)]
        with ThreadPoolExecutor(3) as pool:  # blocking callers too
            blocking = [pool.submit(c.wait, "waited", "", 30) for _ in range(3)]
            # SIGKILL: as PID 1 of its namespace, sleep has no handler and ignores SIGTERM.
            c.signal("waited", signal.SIGKILL)
            results = [w.result() for w in waiters] + [b.result() for b in blocking]
        assert {(r.kind, r.signal) for r in results} == {(pb.ProcessExit.SIGNALED, signal.SIGKILL)}
        assert len({r.pid for r in results}) == 1
        assert c.wait("waited").signal == signal.SIGKILL  # and after the fact
    finally:
        c.remove("waited")


# --- listings, stats, what needs cgroup v2 --------------------------------------------------


def test_list_processes_and_stats(env: AgentEnv) -> None:
    c = env.client
    pid = sleeper(env, "ps")
    try:
        exec_pid = c.exec(
            "ps", "second", {"args": ["sleep", "999"], "user": {"uid": 1000, "gid": 1000}}
        )
        listed = c.stub.ListProcesses(pb.ListProcessesRequest(container_id="ps"), timeout=10)
        by_pid = {p.pid: p for p in listed.processes}
        assert set(by_pid) == {pid, exec_pid}
        assert list(by_pid[pid].args) == ["sleep", "1000"] and by_pid[pid].uid == 0
        assert list(by_pid[exec_pid].args) == ["sleep", "999"] and by_pid[exec_pid].uid == 1000
        assert by_pid[pid].state in ("S", "R")
        stats = c.stub.GetContainerStats(pb.ContainerStatsRequest(container_id="ps"), timeout=10)
        assert stats.pids_current == 2
        assert stats.memory_current_bytes > 0  # natively: the processes' RSS
    finally:
        c.remove("ps")


def test_without_cgroup_v2_pause_and_update_say_so(env: AgentEnv) -> None:
    c = env.client
    stub = c.stub
    sleeper(env, "nocg")
    try:
        code = code_of(
            stub.PauseContainer, pb.PauseContainerRequest(container_id="nocg"), timeout=10
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "cgroup" in code_of.details  # type: ignore[attr-defined]
        code = code_of(
            stub.ResumeContainer, pb.ResumeContainerRequest(container_id="nocg"), timeout=10
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        for raw, field in (
            (b"[", "resources"),
            (b'{"memory": {"limit": "x"}}', "resources.memory.limit"),
        ):
            request = pb.UpdateContainerRequest(container_id="nocg", resources=raw)
            assert (
                code_of(stub.UpdateContainer, request, timeout=10)
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            assert field in code_of.details  # type: ignore[attr-defined]
        request = pb.UpdateContainerRequest(
            container_id="nocg", resources=b'{"pids": {"limit": 5}}'
        )
        assert (
            code_of(stub.UpdateContainer, request, timeout=10)
            == grpc.StatusCode.FAILED_PRECONDITION
        )
    finally:
        c.remove("nocg")


# --- isolation ------------------------------------------------------------------------------


def test_agent_run_dir_is_invisible_inside(env: AgentEnv) -> None:
    run_dir = str(env.agent.run_dir)
    script = (
        f"ls /run/bulkhead; echo rc=$?; ls {run_dir}; echo rc=$?; "
        "find / -xdev -name agent.sock; cat /proc/self/mountinfo"
    )
    out = env.client.run("peek", make_spec(["sh", "-c", script]))
    check_nothing_of_the_agent(out.stdout.decode(), run_dir)
    # Without a mount namespace in its spec, a container still gets one.
    out = env.client.run("peek2", make_spec(["sh", "-c", script], namespaces=("pid",)))
    check_nothing_of_the_agent(out.stdout.decode(), run_dir)


def check_nothing_of_the_agent(text: str, run_dir: str) -> None:
    assert text.count("rc=1") == 2, text  # both ls failed
    assert "agent.sock" not in text  # find saw no socket
    # No mount reaches into the agent's directory: the root is the overlay (whose options
    # name its upper and work dirs, as text only), the rest is the container's own.
    lines = [line.split() for line in text.splitlines() if " - " in line]
    assert lines, text
    for fields in lines:
        assert fields[4] == "/" or not fields[4].startswith(run_dir), fields
        assert fields[3] == "/" or fields[4] in (
            # The sandbox's name files (from beside the run dir, never in it: see above).
            "/etc/resolv.conf",
            "/etc/hosts",
            "/etc/hostname",
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/random",
            "/dev/urandom",
            "/dev/tty",
        ), fields
    assert lines[0][4] == "/" and lines[0][lines[0].index("-") + 1] == "overlay"


def test_each_container_writes_to_its_own_overlay(env: AgentEnv) -> None:
    c = env.client
    out = c.run("writer", make_spec(["sh", "-c", "echo mine > /etc/written; cat /etc/written"]))
    assert out.stdout == b"mine\n"
    assert not (env.rootfs / "etc" / "written").exists()  # the shared rootfs is untouched
    out = c.run("reader", make_spec(["sh", "-c", "cat /etc/written; echo rc=$?"]))
    assert out.stdout == b"rc=1\n"
    spec = make_spec(["sh", "-c", "touch /x; echo rc=$?"])
    spec["root"]["readonly"] = True
    out = c.run("readonly", spec)
    assert out.stdout == b"rc=1\n" and b"Read-only file system" in out.stderr


def test_network_namespace_joined_or_new(env: AgentEnv) -> None:
    ours = os.stat("/proc/self/ns/net").st_ino
    out = env.client.run("net-shared", make_spec(["readlink", "/proc/self/ns/net"]))
    assert out.stdout.decode().strip() == f"net:[{ours}]"  # the sandbox's
    spec = make_spec(["readlink", "/proc/self/ns/net"], namespaces=("pid", "mount", "network"))
    out = env.client.run("net-own", spec)
    assert out.stdout.decode().strip() != f"net:[{ours}]"


def test_crun_spec_bundle_works(env: AgentEnv, tmp_path: Path) -> None:
    crun = shutil.which("crun")
    if crun is None:
        pytest.skip("crun is not installed")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run([crun, "spec"], cwd=bundle, check=True)
    os.symlink(env.rootfs, bundle / "rootfs")
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sh", "-c", "echo crun-spec; hostname; id -u; ls /proc/1/exe"]
    out = env.client.run("crunspec", json.loads(json.dumps(spec)), bundle_dir=str(bundle))
    assert out.stdout.decode().splitlines()[:3] == ["crun-spec", spec["hostname"], "0"], out
    assert out.exit is not None and out.exit.exit_code == 0, out.stderr


def test_stopping_the_agent_removes_what_it_ran() -> None:
    with running_agent() as state:  # its own agent: this one is stopped here
        c = state.client
        pid = c.create("leftover", make_spec(["sleep", "1000"]))
        c.start("leftover")
        c.create("leftover-created", make_spec(["true"]))
        assert mounts_under(state.containers_dir / "leftover")
        code = state.agent.stop()
        assert code == 0, state.agent.log()
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie_or_gone(pid)
        # running_agent checks that no mount is left under its directory.


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_user_namespace_maps_root_to_an_unprivileged_host_id(env: AgentEnv) -> None:
    spec = make_spec(
        ["sh", "-c", "id -u; cat /proc/self/uid_map; touch /made-by-mapped-root && echo wrote"],
        namespaces=(*STANDARD_NAMESPACES, "user"),
    )
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    out = env.client.run("userns", spec)
    assert out.exit is not None and out.exit.exit_code == 0, out.stderr
    lines = out.stdout.decode().split("\n")
    assert lines[0] == "0"  # root inside...
    assert lines[1].split() == ["0", "100000", "65536"]  # ...an unprivileged id outside
    assert lines[2] == "wrote"  # and it owns its own writable layer
