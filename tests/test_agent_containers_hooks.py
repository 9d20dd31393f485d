"""OCI hooks and device rules through the real agent, natively, as root, on the host's cgroup2
hierarchy (hybrid hosts have one; its device programs apply there too).

Hooks: every kind runs at its point of the lifecycle with the state it should see;
poststart and poststop failures are only logged; a failing create hook fails the create and
leaves nothing behind. Devices: a node the spec creates is refused unless a rule allows it,
the standard devices work, and UpdateContainer replaces the rules of a running container.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_agent_containers import code_of
from test_agent_containers_support import AgentEnv, make_spec, mounts_under, running_agent

from bulkhead_proto.v1 import agent_pb2

pb = agent_pb2
pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
HIERARCHIES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
HOST_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
DENY_ALL = {"allow": False, "access": "rwm"}
LOOP0 = {"path": "/dev/xblk", "type": "b", "major": 7, "minor": 0, "fileMode": 0o600}


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    found = [h for h in HIERARCHIES if (h / "cgroup.controllers").exists()]
    if not found:
        pytest.skip("no cgroup2 hierarchy on this host")
    directory = found[0] / f"bulkhead-test-hooks-{os.getpid()}"
    yield directory
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            path.rmdir()
    if directory.exists():
        directory.rmdir()


@pytest.fixture(scope="module")
def env(tree: Path) -> Iterator[AgentEnv]:
    with running_agent({"BULKHEAD_CGROUP_DIR": str(tree)}) as state:
        yield state


@pytest.fixture
def out() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="bulkhead-hooks-"))
    yield directory
    shutil.rmtree(directory)


def recorder(out: Path, name: str, then: str = "") -> dict[str, Any]:
    return {
        "path": "/bin/sh",
        "args": ["sh", "-c", f"cat > {out}/{name}.json; echo {name} >> {out}/order; {then}"],
        "env": HOST_ENV,
    }


def state_of(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


# --- hooks -----------------------------------------------------------------------------------


def test_every_hook_at_its_point_of_the_lifecycle(env: AgentEnv, out: Path) -> None:
    c = env.client
    spec = make_spec(["sleep", "1000"])
    spec["hooks"] = {
        kind: [recorder(out, kind)]
        for kind in ("prestart", "createRuntime", "createContainer", "poststart", "poststop")
    }
    # A failing poststart hook only gets logged: the container runs all the same.
    spec["hooks"]["poststart"].append({"path": "/bin/sh", "args": ["sh", "-c", "exit 5"]})
    pid = c.create("hooked", spec)
    order = ["prestart", "createRuntime", "createContainer"]
    assert (out / "order").read_text().split() == order
    assert state_of(out, "createRuntime") == {
        "ociVersion": "1.0.2",
        "id": "hooked",
        "status": "creating",
        "pid": pid,
        "bundle": "/",  # no bundle_dir: the image's rootfs
        "annotations": {},
    }
    c.start("hooked")
    assert (out / "order").read_text().split() == [*order, "poststart"]
    assert (state_of(out, "poststart")["status"], state_of(out, "poststart")["pid"]) == (
        "running",
        pid,
    )
    assert c.list()["hooked"].status == "running"
    assert "poststart hook 1 (/bin/sh): exited with code 5" in env.agent.log()
    c.remove("hooked")
    assert (out / "order").read_text().split() == [*order, "poststart", "poststop"]
    poststop = state_of(out, "poststop")
    assert poststop["status"] == "stopped" and "pid" not in poststop


def test_a_failing_create_hook_fails_the_create_and_leaves_nothing(
    env: AgentEnv, tree: Path, out: Path
) -> None:
    c = env.client
    spec = make_spec(["true"])
    spec["hooks"] = {
        "createContainer": [recorder(out, "createContainer", then="echo broken >&2; exit 1")],
        "poststop": [recorder(out, "poststop")],
    }
    code = code_of(c.create, "hookfail", spec)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    details = code_of.details  # type: ignore[attr-defined]
    assert details.startswith("create_container_hooks: createContainer hook 0 (/bin/sh)")
    assert "exited with code 1: broken" in details
    assert "hookfail" not in c.list()
    assert mounts_under(env.containers_dir / "hookfail") == []
    assert not (tree / "containers" / "hookfail").exists()
    # It ends as a removal would: poststop runs once all is undone.
    assert (out / "order").read_text().split() == ["createContainer", "poststop"]
    out_ = c.run("hookfail", make_spec(["echo", "the id is free"]))
    assert out_.stdout == b"the id is free\n"


# --- devices ---------------------------------------------------------------------------------


def device_spec(args: list[str], rules: list[dict[str, Any]]) -> dict[str, Any]:
    spec = make_spec(args)
    spec["linux"]["devices"] = [LOOP0]
    spec["linux"]["resources"] = {"devices": rules}
    return spec


READ_ALL = (
    "head -c1 /dev/xblk >/dev/null; echo xblk=$?;"
    " for d in null zero urandom full; do head -c1 /dev/$d >/dev/null && echo $d; done"
)


def test_a_created_node_is_refused_unless_a_rule_allows_it(env: AgentEnv) -> None:
    c = env.client
    out = c.run("denied", device_spec(["sh", "-c", READ_ALL], [DENY_ALL]))
    assert out.stdout.decode().split() == ["xblk=1", "null", "zero", "urandom", "full"]
    assert b"Operation not permitted" in out.stderr
    allow = {"allow": True, "type": "b", "major": 7, "minor": 0, "access": "r"}
    out = c.run("allowed", device_spec(["sh", "-c", READ_ALL], [DENY_ALL, allow]))
    assert out.stdout.decode().split()[0] == "xblk=0", out.stderr
    # Read only: opening it for writing is refused.
    out = c.run("readonly", device_spec(["sh", "-c", "echo x > /dev/xblk"], [DENY_ALL, allow]))
    assert b"Operation not permitted" in out.stderr


def test_update_replaces_the_rules_of_a_running_container(env: AgentEnv) -> None:
    c = env.client
    allow = {"allow": True, "type": "b", "major": 7, "minor": 0, "access": "r"}

    def update(rules: list[dict[str, Any]]) -> None:
        resources = json.dumps({"devices": rules}).encode()
        request = pb.UpdateContainerRequest(container_id="devupd", resources=resources)
        c.stub.UpdateContainer(request, timeout=10)

    def probe(exec_id: str) -> int:
        c.exec("devupd", exec_id, {"args": ["head", "-c1", "/dev/xblk"], "cwd": "/"})
        return c.wait("devupd", exec_id).exit_code

    c.create("devupd", device_spec(["sleep", "1000"], [DENY_ALL]))
    c.start("devupd")
    try:
        assert probe("denied") == 1
        update([DENY_ALL, allow])
        assert probe("allowed") == 0
        update([{"allow": True, "type": "c", "major": 1, "minor": 3}])  # no catch-all: deny
        assert probe("denied-again") == 1
    finally:
        c.remove("devupd")
