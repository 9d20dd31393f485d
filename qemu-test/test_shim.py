"""containerd drives Bulkhead sandboxes through ``containerd-shim-bulkhead-v2``.

Debian's containerd 1.6 and ``ctr``, run privately by ``containerd_support``, are the client:
each test is what a user of ``ctr`` would type, and checks what they would see, then that
nothing (shim, QEMU, mounts, sockets, state) is left behind.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import containerd_support as cs
import pytest

from bulkhead import Sandbox

RUNTIME = "io.containerd.bulkhead.v2"
POD_ANNOTATION = "io.kubernetes.cri.sandbox-id"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or cs.containerd_available() is not None,
    reason=f"needs root and Debian's containerd: {cs.containerd_available()}",
)


@pytest.fixture(scope="module")
def ctrd(image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[cs.Containerd]:
    """A private containerd whose shims boot our image, with their state in test dirs."""
    short = Path(f"/tmp/bh-ctrd-{os.getpid()}")
    env = {
        "BULKHEAD_IMAGE": str(image.path),
        "BULKHEAD_STATE_DIR": f"/tmp/bh-shsb-{os.getpid()}",
        "BULKHEAD_SHIM_DIR": f"/tmp/bh-shim-{os.getpid()}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with cs.Containerd(short) as daemon:
            archive = cs.build_busybox_image(tmp_path_factory.mktemp("oci"))
            daemon.ref = cs.import_image(daemon, archive)  # type: ignore[attr-defined]
            yield daemon
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for path in (short, env["BULKHEAD_STATE_DIR"], env["BULKHEAD_SHIM_DIR"]):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clean(ctrd: cs.Containerd) -> Iterator[cs.Containerd]:
    """The test's containerd; afterwards nothing of any container may be left."""
    yield ctrd
    assert_nothing_left(ctrd)


def assert_nothing_left(ctrd: cs.Containerd, timeout: float = 30.0) -> None:
    def leftovers() -> list[str]:
        found = []
        if ctrd.shims():
            found.append(f"shims {ctrd.shims()}")
        if ctrd.containers():
            found.append(f"containers {ctrd.containers()}")
        sandboxes = [s.name for s in Sandbox.list()]
        if sandboxes:
            found.append(f"sandboxes {sandboxes}")
        shim_dir = Path(os.environ["BULKHEAD_SHIM_DIR"])
        if shim_dir.exists() and list(shim_dir.iterdir()):
            found.append(f"shim state {list(shim_dir.iterdir())}")
        mounts = [m for m in ctrd.mounts() if "/rootfs" in m]
        if mounts:
            found.append(f"mounts {mounts}")
        qemus = [p for p in _qemu_pids()]
        if qemus:
            found.append(f"qemu {qemus}")
        return found

    deadline = time.monotonic() + timeout
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {left}\n{ctrd.log_tail()}"


def _qemu_pids() -> list[int]:
    state = os.environ["BULKHEAD_STATE_DIR"]
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and state.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def run(ctrd: cs.Containerd, cid: str, *command: str, options: tuple[str, ...] = (), **kw):
    return ctrd.run(ctrd.ref, cid, *command, runtime=RUNTIME, options=options, check=False, **kw)


def test_ctr_run_prints_the_output_and_returns_the_exit_code(clean: cs.Containerd) -> None:
    res = run(clean, "hello", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout == b"out\n"
    assert res.stderr == b"err\n"


def test_output_is_lossless(clean: cs.Containerd) -> None:
    big = run(clean, "seq", "seq", "1", "100000")
    assert big.returncode == 0, big.stderr
    assert big.stdout == b"".join(b"%d\n" % i for i in range(1, 100001))


def test_piped_stdin_reaches_the_container_and_ends(clean: cs.Containerd) -> None:
    # Large: ctr is still writing when the task starts, and ends it with CloseIO.
    data = os.urandom(300_000).hex().encode()
    res = run(clean, "wc", "sh", "-c", "wc -c; exit 0", input=data, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(len(data)).encode()
    # Small: ctr reads it to its end during Create and never sends CloseIO; the FIFO's close
    # alone must end the container's stdin (as with runc), or `cat` waits for ever.
    res = run(clean, "cat", "cat", input=b"short\n", timeout=300)
    assert (res.returncode, res.stdout) == (0, b"short\n"), res.stderr
    # An exec gets the same: a short pipe ends its stdin.
    args = clean.run_args(clean.ref, "svc", "sleep", "600", runtime=RUNTIME, rm=False,
                          options=("-d",))  # fmt: skip
    clean.ctr(*args)
    try:
        res = clean.ctr("task", "exec", "--exec-id", "e1", "svc", "cat", input=b"to exec\n",
                        check=False, timeout=120)  # fmt: skip
        assert (res.returncode, res.stdout) == (0, b"to exec\n"), res.stderr
    finally:
        clean.remove("svc")


def test_a_command_that_cannot_run_fails_the_start(clean: cs.Containerd) -> None:
    res = run(clean, "missing", "/no/such-command")
    assert res.returncode != 0
    assert b"start: " in res.stderr and b"such-command" in res.stderr, res.stderr


def test_interactive_terminal(clean: cs.Containerd) -> None:
    main, sub = pty.openpty()
    argv = clean.run_args(clean.ref, "tty", "sh", runtime=RUNTIME, options=("-t",))
    proc = clean.ctr_popen(*argv, stdin=sub, stdout=sub, stderr=sub, start_new_session=True)
    os.close(sub)
    try:
        seen = _read_until(main, b"# ", 120)  # busybox sh's root prompt: the terminal works
        os.write(main, b"tty; echo $((6*7)); exit 5\r")
        seen += _read_until(main, b"42", 30)
        assert proc.wait(30) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    assert b"/dev/pts/0" in seen or b"/dev/console" in seen, seen


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    seen = b""
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_exec_ps_and_kill_a_running_container(clean: cs.Containerd) -> None:
    args = clean.run_args(clean.ref, "svc", "sleep", "600", runtime=RUNTIME, rm=False,
                          options=("-d",))  # fmt: skip
    clean.ctr(*args)
    try:
        res = clean.ctr("task", "exec", "--exec-id", "e1", "svc", "sh", "-c",
                        "echo in-exec; exit 4", check=False)  # fmt: skip
        assert res.returncode == 4, res.stderr
        assert res.stdout == b"in-exec\n"
        ps = clean.ctr("task", "ps", "svc").stdout.decode().splitlines()
        assert ps[0].split()[0] == "PID" and len(ps) >= 2, ps
        assert clean.tasks() == ["svc"]
        status = clean.ctr("task", "ls").stdout.decode()
        assert "RUNNING" in status, status
        clean.ctr("task", "kill", "-s", "SIGKILL", "svc")
        cs.wait_for(lambda: "STOPPED" in clean.ctr("task", "ls").stdout.decode(), timeout=30,
                    what="the killed task to be STOPPED")  # fmt: skip
    finally:
        clean.ctr("task", "delete", "-f", "svc", check=False)
        clean.ctr("container", "delete", "svc", check=False)


def test_a_pod_s_containers_share_one_vm(clean: cs.Containerd) -> None:
    pod = ("--annotation", f"{POD_ANNOTATION}=pod1")
    names = ("pod-a", "pod-b")
    try:
        for name in names:
            clean.ctr(*clean.run_args(clean.ref, name, "sleep", "600", runtime=RUNTIME, rm=False,
                                      options=("-d", *pod)))  # fmt: skip
        assert len(Sandbox.list()) == 1
        boot_id = ("cat", "/proc/sys/kernel/random/boot_id")
        boot_ids = {clean.ctr("task", "exec", "--exec-id", "b", n, *boot_id).stdout for n in names}
        assert len(boot_ids) == 1, boot_ids  # one kernel: one VM
        assert len(clean.shims()) == 1
    finally:
        for name in names:
            clean.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        for name in names:
            cs.wait_for(lambda n=name: _stopped(clean, n), timeout=30, what=f"{name} stopped")
            clean.ctr("task", "delete", name, check=False)
            clean.ctr("container", "delete", name, check=False)


def _stopped(ctrd: cs.Containerd, name: str) -> bool:
    for line in ctrd.ctr("task", "ls").stdout.decode().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[-1] == "STOPPED"
    return True


@pytest.fixture
def cni_netns() -> Iterator[tuple[str, str]]:
    """What a CNI plugin leaves for a pod: a namespace with a veth holding the pod's address
    and a default route, its peer on the "node" (a namespace of its own here, so that the
    test never touches the host's network). Yields (pod namespace path, node namespace)."""
    pod, node = f"bh-pod-{os.getpid()}", f"bh-node-{os.getpid()}"
    steps = [
        ["ip", "netns", "add", pod], ["ip", "netns", "add", node],
        ["ip", "-n", pod, "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name",
         "node0", "netns", node],
        ["ip", "-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0"],
        ["ip", "-n", pod, "link", "set", "eth0", "up"],
        ["ip", "-n", pod, "route", "add", "default", "via", NODE_IP],
        ["ip", "-n", pod, "addr", "add", "fd00:89::5/64", "dev", "eth0", "nodad"],
        ["ip", "-n", pod, "-6", "route", "add", "default", "via", "fd00:89::1", "dev", "eth0"],
        ["ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "node0"],
        ["ip", "-n", node, "link", "set", "node0", "up"],
        ["ip", "-n", node, "link", "set", "lo", "up"],
    ]  # fmt: skip
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield f"/run/netns/{pod}", node
    finally:
        for ns in (pod, node):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


POD_IP, NODE_IP = "10.89.0.5", "10.89.0.1"


def test_a_cni_network_namespace_becomes_the_pod_vm_network(
    clean: cs.Containerd, cni_netns: tuple[str, str]
) -> None:
    pod_path, node = cni_netns
    pod = Path(pod_path).name
    # The node answers one connection on its side of the veth.
    server = subprocess.Popen(
        ["ip", "netns", "exec", node, "busybox", "nc", "-l", "-p", "5000", "-e", "echo",
         "hello from the node"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        script = f"ip -o link; ip -o addr; ip route; ip -6 route; nc {NODE_IP} 5000"
        res = run(clean, "cni", "sh", "-c", script, options=("--with-ns", f"network:{pod_path}"))
        assert res.returncode == 0, res.stderr
        out = res.stdout.decode()
        assert f"inet {POD_IP}/24" in out, out  # the pod's address, in the guest
        assert f"default via {NODE_IP}" in out, out
        assert "inet6 fd00:89::5/64" in out and "default via fd00:89::1" in out, out
        assert "eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400" in out, out  # the veth's
        assert "hello from the node" in out, out  # through the tap, tc and the veth
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # The node saw the guest's MAC as the pod's: the veth's own, which the VM took over.
    pod_mac = subprocess.run(["ip", "-n", pod, "-j", "link", "show", "eth0"],
                             capture_output=True, check=True).stdout  # fmt: skip
    neighbours = subprocess.run(["ip", "-n", node, "neigh", "show", POD_IP],
                                capture_output=True, check=True, text=True).stdout  # fmt: skip
    assert json.loads(pod_mac)[0]["address"] in neighbours, neighbours
    # With the VM gone, the pod's veth is its own again: no redirect is left on it.
    qdiscs = subprocess.run(["ip", "netns", "exec", pod, "tc", "qdisc", "show", "dev", "eth0"],
                            capture_output=True, text=True).stdout  # fmt: skip
    assert "ingress" not in qdiscs, qdiscs


def test_host_bind_mounts_reach_the_container(clean: cs.Containerd, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "in.txt").write_text("from the host\n")
    conf = tmp_path / "resolv.conf"  # a file bind, as CRI's /etc/resolv.conf
    conf.write_text("nameserver 10.0.0.53\n")
    script = ("cat /data/in.txt; echo from the container > /data/out.txt; cat /etc/test.conf; "
              "echo x 2>/dev/null > /etc/test.conf || echo refused")  # fmt: skip
    mounts = ("--mount", f"type=bind,src={volume},dst=/data,options=rbind:rw",
              "--mount", f"type=bind,src={conf},dst=/etc/test.conf,options=rbind:ro")  # fmt: skip
    res = run(clean, "binds", "sh", "-c", script, options=mounts)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"from the host\nnameserver 10.0.0.53\nrefused\n", res.stdout
    assert (volume / "out.txt").read_text() == "from the container\n"  # written through
    assert conf.read_text() == "nameserver 10.0.0.53\n"
    shim_dir = os.environ["BULKHEAD_SHIM_DIR"]
    assert not [m for m in cs.mount_points() if m.startswith(shim_dir)]


def test_killing_qemu_reports_the_exit_to_containerd(clean: cs.Containerd) -> None:
    events = clean.ctr_popen("events", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    args = clean.run_args(clean.ref, "doomed", "sleep", "600", runtime=RUNTIME, rm=False,
                          options=("-d",))  # fmt: skip
    try:
        clean.ctr(*args)
        (qemu,) = _qemu_pids()
        os.kill(qemu, signal.SIGKILL)
        cs.wait_for(lambda: _stopped(clean, "doomed"), timeout=30, what="doomed to be STOPPED")
        status = clean.ctr("task", "ls").stdout.decode()
        assert "STOPPED" in status, status
    finally:
        clean.ctr("task", "delete", "doomed", check=False)
        clean.ctr("container", "delete", "doomed", check=False)
        events.terminate()
    lines = events.communicate(timeout=10)[0].decode().splitlines()
    tasks = [line for line in lines if "doomed" in line and "/tasks/" in line]
    topics = [_topic(line) for line in tasks]
    assert topics[:3] == ["/tasks/create", "/tasks/start", "/tasks/exit"], topics
    assert "/tasks/delete" in topics, topics
    assert '"exit_status":255' in tasks[2], tasks[2]  # nobody saw the exit: containerd's 255


def _topic(line: str) -> str:
    """``ctr events`` prints ``TIME NAMESPACE TOPIC EVENT``; the topic is the /tasks/ word."""
    return next((word for word in line.split() if word.startswith("/tasks/")), line)


def _detached(ctrd: cs.Containerd, cid: str, *command: str, options: tuple[str, ...] = ()) -> None:
    ctrd.ctr(*ctrd.run_args(ctrd.ref, cid, *command, runtime=RUNTIME, rm=False,
                            options=("-d", *options)))  # fmt: skip


def _remove(ctrd: cs.Containerd, cid: str) -> None:
    ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    cs.wait_for(lambda: _stopped(ctrd, cid), timeout=30, what=f"{cid} stopped")
    ctrd.ctr("task", "delete", cid, check=False)
    ctrd.ctr("container", "delete", cid, check=False)


def test_log_uri_file_pause_resume_and_metrics(clean: cs.Containerd, tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    script = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"
    _detached(clean, "ticker", "sh", "-c", script, options=("--log-uri", f"file://{log}"))
    try:
        cs.wait_for(lambda: log.exists() and b"tick 2" in log.read_bytes(), timeout=30,
                    what="output in the log file")  # fmt: skip
        clean.ctr("task", "pause", "ticker")
        assert "PAUSED" in clean.ctr("task", "ls").stdout.decode()
        size = log.stat().st_size
        time.sleep(1.0)  # a paused container must not write: give it the time to show it does
        assert log.stat().st_size == size
        clean.ctr("task", "resume", "ticker")
        cs.wait_for(lambda: log.stat().st_size > size, timeout=30, what="output after resume")
        metrics = clean.ctr("task", "metrics", "ticker").stdout.decode()
        values = dict(line.split()[:2] for line in metrics.splitlines() if "." in line[:20])
        assert int(values["pids.current"]) >= 1, metrics  # sh (and a sleep, now and then)
        assert int(values["memory.usage"]) > 0 and int(values["cpu.usage_usec"]) > 0, metrics
    finally:
        _remove(clean, "ticker")


def test_oom_kill_is_reported(clean: cs.Containerd) -> None:
    events = clean.ctr_popen("events", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        res = run(clean, "hog", "sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' x)",
                  options=("--memory-limit", str(32 << 20)))  # fmt: skip
        assert res.returncode != 0
    finally:
        events.terminate()
    lines = events.communicate(timeout=10)[0].decode().splitlines()
    assert any("/tasks/oom" in line and "hog" in line for line in lines), lines


def test_several_waits_end_together_after_the_output(clean: cs.Containerd) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from bulkhead_shim.api import shim_pb2
    from bulkhead_shim.ttrpc import Client

    _detached(clean, "waited", "sh", "-c", "read x; seq 1 20000; exit 7")
    try:
        address = (clean.bundle_dir("waited") / "address").read_text()
        with Client(address.removeprefix("unix://"), timeout=None) as client:
            wait = shim_pb2.WaitRequest(id="waited")
            with ThreadPoolExecutor(4) as pool:
                waits = [pool.submit(client.call, "containerd.task.v2.Task", "Wait", wait,
                                     shim_pb2.WaitResponse) for _ in range(4)]  # fmt: skip
                time.sleep(0.5)
                assert not any(w.done() for w in waits)  # nobody returns before the exit
                clean.ctr("task", "kill", "-s", "SIGKILL", "waited")
                statuses = {w.result(timeout=60).exit_status for w in waits}
        assert statuses == {137}
    finally:
        _remove(clean, "waited")


def test_a_killed_shim_is_cleaned_up_by_delete(clean: cs.Containerd) -> None:
    _detached(clean, "orphan", "sleep", "600")
    (shim,) = clean.shims()
    os.kill(shim.pid, signal.SIGKILL)
    # containerd sees the shim go, runs `delete`, which takes the VM down and unmounts.
    cs.wait_for(lambda: not _qemu_pids(), timeout=60, what="the orphaned VM to go")
    cs.wait_for(lambda: _stopped(clean, "orphan"), timeout=30, what="the task to be gone")
    clean.ctr("task", "delete", "orphan", check=False)
    clean.ctr("container", "delete", "orphan", check=False)


def test_log_uri_binary_gets_stdout_and_stderr_apart(clean: cs.Containerd, tmp_path: Path) -> None:
    # containerd's logging-binary contract: stdout on fd 3, stderr on fd 4, fd 5 closed when
    # ready, the container named in the environment.
    logger = tmp_path / "logger.sh"
    logger.write_text(
        "#!/bin/sh\n"
        'echo "$CONTAINER_NAMESPACE/$CONTAINER_ID" > "$1.who"\n'
        'cat <&3 > "$1.out" & cat <&4 > "$1.err" & exec 5>&-; wait\n'
    )
    logger.chmod(0o755)
    base = tmp_path / "log"
    _detached(clean, "logged", "sh", "-c", "echo to-out; echo to-err >&2",
              options=("--log-uri", f"binary://{logger}?{base}"))  # fmt: skip
    try:
        cs.wait_for(lambda: _stopped(clean, "logged"), timeout=30, what="logged to exit")
        cs.wait_for(lambda: all(_nonempty(Path(f"{base}.{s}")) for s in ("out", "err", "who")),
                    timeout=30, what="the logger's files")  # fmt: skip
        assert Path(f"{base}.out").read_bytes() == b"to-out\n"
        assert Path(f"{base}.err").read_bytes() == b"to-err\n"
        assert Path(f"{base}.who").read_text() == f"{clean.namespace}/logged\n"
    finally:
        _remove(clean, "logged")


def _nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0
