"""The shim's own life, as containerd drives it, without a VM: ``start`` prints only the
address and leaves a detached shim serving ttrpc there; a pod's second container gets the same
shim; ``Shutdown`` ends it and its files; ``delete`` prints only a DeleteResponse, again and again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from bulkhead_shim import cli
from bulkhead_shim.api import shim_pb2
from bulkhead_shim.pod_state import PodPaths
from bulkhead_shim.ttrpc import Client, Code, TtrpcError

TASK = "containerd.task.v2.Task"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    root = Path(f"/tmp/bh-shimt-{os.getpid()}")
    root.mkdir(exist_ok=True)
    values = {
        "BULKHEAD_SHIM_DIR": str(root),
        "TTRPC_ADDRESS": str(tmp_path / "no-containerd.sock.ttrpc"),  # events just queue
        "NAMESPACE": "testns",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    yield dict(os.environ)
    for pid_file in root.glob("*/shim.pid"):
        try:
            os.kill(int(pid_file.read_text()), 9)
        except (OSError, ValueError):
            pass
    subprocess.run(["rm", "-rf", str(root)], check=False)


def bundle(tmp_path: Path, name: str, annotations: dict[str, str] | None = None) -> Path:
    path = tmp_path / name
    (path / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": ["true"]}, "root": {"path": "rootfs"},
            "annotations": annotations or {}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(spec))
    return path


def shim(action: str, cid: str, where: Path, env: dict[str, str], *extra: str):
    argv = [sys.executable, "-m", "bulkhead_shim", "-namespace", "testns", "-address",
            "/tmp/bh-test-containerd.sock", "-publish-binary", "/usr/bin/containerd",
            "-id", cid, *extra, action]  # fmt: skip
    return subprocess.run(argv, cwd=where, env=env, capture_output=True, timeout=60, check=False)


def wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return  # exited; its parent (long gone) reaps it
        except OSError:
            return
        assert time.monotonic() < deadline, f"shim {pid} still running"
        time.sleep(0.05)


def test_start_prints_only_the_address_and_the_shim_serves_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    b = bundle(tmp_path, "c1")
    res = shim("start", "c1", b, env)
    assert res.returncode == 0, res.stderr
    address = res.stdout.decode()
    assert address.startswith("unix:///") and "\n" not in address
    assert (b / "address").read_text() == address
    path = address.removeprefix("unix://")
    with Client(path) as client:
        reply = client.call(TASK, "Connect", shim_pb2.ConnectRequest(id="c1"),
                            shim_pb2.ConnectResponse)  # fmt: skip
        assert reply.shim_pid > 0
        with pytest.raises(TtrpcError) as err:
            client.call(TASK, "State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse)
        assert err.value.code == Code.NOT_FOUND and "nope" in err.value.message
        with pytest.raises(TtrpcError) as err:
            client.call(TASK, "Create", shim_pb2.CreateTaskRequest(id="bad id!", bundle=str(b)),
                        shim_pb2.CreateTaskResponse)  # fmt: skip
        assert err.value.code == Code.INVALID_ARGUMENT and "id" in err.value.message
        client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id="c1"), empty_pb2.Empty)
    wait_gone(reply.shim_pid)
    assert not Path(path).parent.exists()  # socket, state, pid file and log all gone


def test_a_pod_s_containers_get_one_shim(tmp_path: Path, env: dict[str, str]) -> None:
    pod = {"io.kubernetes.cri.sandbox-id": "pod7"}
    first = shim("start", "a", bundle(tmp_path, "a", pod), env)
    second = shim("start", "b", bundle(tmp_path, "b", pod), env)
    alone = shim("start", "c", bundle(tmp_path, "c"), env)
    assert first.returncode == second.returncode == alone.returncode == 0
    assert first.stdout == second.stdout != alone.stdout
    assert len(list(Path(env["BULKHEAD_SHIM_DIR"]).glob("*/shim.sock"))) == 2


def test_delete_prints_a_delete_response_and_can_be_repeated(
    tmp_path: Path, env: dict[str, str]
) -> None:
    b = bundle(tmp_path, "gone")
    paths = PodPaths.of("/tmp/bh-test-containerd.sock", "testns", "gone")
    paths.dir.mkdir(parents=True)
    (paths.dir / "state.json").write_text(json.dumps(
        {"namespace": "testns", "pod": "gone", "sandbox": "",
         "containers": {"gone": {"bundle": str(b), "rootfs": "", "share": ""}}}
    ))  # fmt: skip
    for _ in range(2):
        res = shim("delete", "gone", b, env, "-bundle", str(b))
        assert res.returncode == 0, res.stderr
        reply = shim_pb2.DeleteResponse.FromString(res.stdout)
        assert reply.exit_status == 137 and reply.exited_at.seconds > 0
    assert not paths.dir.exists()  # a dead shim's pod with no containers left: cleaned


def test_delete_of_a_bundle_that_is_gone(tmp_path: Path, env: dict[str, str]) -> None:
    res = shim("delete", "never", tmp_path, env, "-bundle", str(tmp_path / "missing"))
    assert res.returncode == 0, res.stderr
    assert shim_pb2.DeleteResponse.FromString(res.stdout).exit_status == 137


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-namespace", "k8s.io", "-id", "x", "-address", "/a.sock", "start"],
         {"action": "start", "namespace": "k8s.io", "id": "x", "address": "/a.sock"}),
        (["-namespace=n", "-id=x", "-debug", "-bundle", "/b", "delete"],
         {"action": "delete", "debug": True, "bundle": "/b"}),
        (["--namespace", "n", "-debug=false", "-id", "x", "start"], {"debug": False}),
    ],
)  # fmt: skip
def test_flags_as_go_writes_them(argv: list[str], expected: dict[str, object]) -> None:
    flags = cli.parse(argv)
    for key, value in expected.items():
        assert getattr(flags, key) == value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-namespace", "n", "start"], "needs -id"),
        (["-id", "x", "-bogus", "1", "start"], "unknown flag -bogus"),
        (["-id", "x", "-namespace", "n", "frobnicate"], "unknown action"),
        (["-id"], "needs a value"),
    ],
)
def test_bad_flags_are_named(argv: list[str], message: str, monkeypatch) -> None:
    monkeypatch.delenv("NAMESPACE", raising=False)
    with pytest.raises(cli.UsageError, match=message):
        cli.parse(argv)
