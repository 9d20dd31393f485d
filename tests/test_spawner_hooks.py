"""OCI hooks through the real spawner, natively, as root: each kind gets the container's state
on stdin in the namespaces it belongs in; failures and timeouts fail the create or the start
naming the hook; the spawner keeps serving while a hook runs.

The hooks are shell scripts (the host's /bin/sh, except startContainer's, which must be the
container's own) that write what they saw into a temp dir.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from test_spawner_containers import (  # the fixtures, too
    STANDARD_NAMESPACES,
    TIMEOUT,
    bundle,
    make_spec,
    next_exit,
    run,
    spawner,
)

from bulkhead_agent.oci import hooks
from bulkhead_agent.oci.spec import Hook
from bulkhead_agent.spawner.client import Spawner, SpawnError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
    pytest.mark.timeout(60),
]
__all__ = ["bundle", "spawner"]  # fixtures used by name
HOST_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def script(text: str, **fields: Any) -> dict[str, Any]:
    """A hook running ``sh -c text`` (the runtime's sh: for runtime-resolved paths)."""
    return {"path": "/bin/sh", "args": ["sh", "-c", text], "env": HOST_ENV, **fields}


def recorder(out: Path, name: str) -> dict[str, Any]:
    """A hook that saves its stdin, its uts namespace, and its turn in ``out/order``."""
    return script(
        f"cat > {out}/{name}.json; readlink /proc/self/ns/uts > {out}/{name}.uts;"
        f" echo {name} >> {out}/order"
    )


def own_ns(name: str, pid: int | str = "self") -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


async def create(spawner: Spawner, bundle: str, spec: dict[str, Any], container_id: str) -> int:
    devnull = os.open("/dev/null", os.O_RDWR)
    try:
        return await spawner.create(container_id, bundle=bundle, spec=spec, stdio=[devnull] * 3)
    finally:
        os.close(devnull)


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


# --- where and with what each kind runs -------------------------------------------------------


def test_each_kind_runs_in_order_where_it_belongs(
    spawner: Spawner, bundle: str, tmp_path: Path
) -> None:
    start_file = Path(bundle) / "rootfs" / "start.json"
    spec = make_spec(["sh", "-c", "cat /start.json"])
    spec["annotations"] = {"org.example.key": "value"}
    spec["hooks"] = {
        "createContainer": [recorder(tmp_path, "createContainer")],
        "createRuntime": [recorder(tmp_path, "createRuntime")],
        "prestart": [recorder(tmp_path, "prestart")],
        # Resolved in the container: its /bin/sh is the bundle's busybox, / its rootfs.
        "startContainer": [
            {
                "path": "/bin/sh",
                "args": ["sh", "-c", "cat > /start.json; echo $MARK"],
                "env": ["MARK=hello"],
            }
        ],
    }

    async def scenario() -> tuple[int, str]:
        result = await run(spawner, bundle, spec, "hooked")
        assert result.event.exit_code == 0, result.stderr
        return result.pid, result.stdout

    try:
        pid, stdout = asyncio.run(scenario())
        started = json.loads(start_file.read_text())
    finally:
        start_file.unlink(missing_ok=True)
    order = (tmp_path / "order").read_text().split()
    assert order == ["prestart", "createRuntime", "createContainer"]
    state = {
        "ociVersion": "1.0.2",
        "id": "hooked",
        "status": "creating",
        "bundle": bundle,
        "annotations": {"org.example.key": "value"},
    }
    # prestart and createRuntime: the runtime's namespaces, the pid as the runtime sees it
    for name in ("prestart", "createRuntime"):
        assert json.loads((tmp_path / f"{name}.json").read_text()) == {**state, "pid": pid}
        assert (tmp_path / f"{name}.uts").read_text().strip() == own_ns("uts")
    # createContainer: the container's namespaces (PID 1 of its own), the runtime's files
    assert json.loads((tmp_path / "createContainer.json").read_text()) == {**state, "pid": 1}
    container_uts = (tmp_path / "createContainer.uts").read_text().strip()
    assert container_uts != own_ns("uts")
    # startContainer: inside, just before the program (which found its file), its output
    # not the container's
    assert started == {**state, "status": "created", "pid": 1}
    assert json.loads(stdout) == started


def test_create_runtime_gets_the_runtime_pid_through_a_user_namespace_fork(
    spawner: Spawner, bundle: str
) -> None:
    # With a user namespace the container's process forks once more into its PID namespace:
    # the pid comes from its intermediate parent, maybe after the hooks were asked for.
    spec = make_spec(["true"], namespaces=("user", *STANDARD_NAMESPACES))
    mapping = [{"containerID": 0, "hostID": 300000, "size": 65536}]
    spec["linux"]["uidMappings"] = mapping
    spec["linux"]["gidMappings"] = mapping
    # createContainer runs as the container's root, host uid 300000: a dir it can write to
    out = Path(tempfile.mkdtemp(prefix="bulkhead-hooks-"))
    try:
        os.chmod(out, 0o777)
        (out / "order").touch(0o666)
        os.chmod(out / "order", 0o666)
        spec["hooks"] = {
            "createRuntime": [recorder(out, "createRuntime")],
            "createContainer": [recorder(out, "createContainer")],
        }
        result = asyncio.run(run(spawner, bundle, spec, "userns-hooked"))
        assert result.event.exit_code == 0, result.stderr
        assert json.loads((out / "createRuntime.json").read_text())["pid"] == result.pid
        assert json.loads((out / "createContainer.json").read_text())["pid"] == 1
        assert (out / "createContainer.json").stat().st_uid == 300000
    finally:
        shutil.rmtree(out)


def test_poststart_and_poststop_through_the_spawner(spawner: Spawner, tmp_path: Path) -> None:
    state = {"ociVersion": "1.0.2", "id": "c", "status": "stopped", "bundle": str(tmp_path)}
    good = hooks.encode([Hook("/bin/sh", ("sh", "-c", f"cat > {tmp_path}/poststop.json; pwd"))])
    bad = hooks.encode([Hook("/bin/true"), Hook("/bin/sh", ("sh", "-c", "echo no >&2; exit 4"))])

    async def scenario() -> SpawnError:
        await spawner.run_hooks("poststop", good, state)
        with pytest.raises(SpawnError) as info:
            await spawner.run_hooks("poststart", bad, state)
        return info.value

    error = asyncio.run(scenario())
    assert json.loads((tmp_path / "poststop.json").read_text()) == state
    assert (error.step, error.errno) == ("poststart_hooks", 0)
    assert error.message == "poststart hook 1 (/bin/sh): exited with code 4: no"


# --- failures ---------------------------------------------------------------------------------


def test_a_failing_create_runtime_hook_fails_the_create_naming_it(
    spawner: Spawner, bundle: str, tmp_path: Path
) -> None:
    spec = make_spec(["true"])
    spec["hooks"] = {
        "createRuntime": [{"path": "/bin/true"}, script("echo boom >&2; exit 3")],
        "createContainer": [recorder(tmp_path, "createContainer")],
    }

    async def scenario() -> SpawnError:
        with pytest.raises(SpawnError) as info:
            await create(spawner, bundle, spec, "failing")
        # Nothing is left: the id is free again, and no exit event comes for it.
        result = await run(spawner, bundle, make_spec(["true"]), "failing")
        assert result.event.exit_code == 0 and spawner.exits.empty()
        return info.value

    error = asyncio.run(scenario())
    assert error.step == "create_runtime_hooks"
    assert error.message == "createRuntime hook 1 (/bin/sh): exited with code 3: boom"
    assert not (tmp_path / "order").exists()  # the hooks after it did not run


def test_a_create_container_hook_that_cannot_run(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["true"])
    spec["hooks"] = {"createContainer": [{"path": "/no/such/hook"}]}

    async def scenario() -> SpawnError:
        with pytest.raises(SpawnError) as info:
            await create(spawner, bundle, spec, "missing-hook")
        return info.value

    error = asyncio.run(scenario())
    assert (error.step, error.errno) == ("create_container_hooks", errno.ENOENT)
    assert error.message.startswith("createContainer hook 0 (/no/such/hook): cannot run it")


def test_a_failing_start_container_hook_fails_the_start(spawner: Spawner, bundle: str) -> None:
    spec = make_spec(["sh", "-c", "echo must not run"])
    spec["hooks"] = {"startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 9"]}]}

    async def scenario() -> SpawnError:
        await create(spawner, bundle, spec, "no-start")
        with pytest.raises(SpawnError) as info:
            await spawner.start("no-start")
        result = await run(spawner, bundle, make_spec(["true"]), "after")  # no exit between
        assert result.event.container_id == "after" and spawner.exits.empty()
        return info.value

    error = asyncio.run(scenario())
    assert error.step == "start_container_hooks"
    assert error.message == "startContainer hook 0 (/bin/sh): exited with code 9"


def test_a_hook_past_its_timeout_is_killed_with_what_it_started(
    spawner: Spawner, bundle: str
) -> None:
    marker = f"bulkhead-hook-{os.getpid()}"
    spec = make_spec(["true"])
    spec["hooks"] = {"createRuntime": [script(f"sleep 30 & sleep 30; : {marker}", timeout=1)]}

    async def scenario() -> SpawnError:
        with pytest.raises(SpawnError) as info:
            await create(spawner, bundle, spec, "slow")
        return info.value

    started = time.monotonic()
    error = asyncio.run(scenario())
    assert time.monotonic() - started < 10
    assert (error.step, error.errno) == ("create_runtime_hooks", errno.ETIMEDOUT)
    assert error.message == "createRuntime hook 0 (/bin/sh): still running after 1 s, killed"
    assert processes_with(marker) == []


def test_the_spawner_serves_others_while_a_hook_runs(
    spawner: Spawner, bundle: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    spec = make_spec(["true"])
    spec["hooks"] = {"createRuntime": [script(f"read line < {gate}")]}

    async def scenario() -> None:
        waiting = asyncio.create_task(create(spawner, bundle, spec, "gated"))
        await asyncio.sleep(0)  # the request is out
        # Meanwhile another container comes and goes.
        result = await asyncio.wait_for(run(spawner, bundle, make_spec(["true"]), "other"), TIMEOUT)
        assert result.event.exit_code == 0
        assert not waiting.done()
        fd = os.open(gate, os.O_WRONLY)  # the hook has it open for reading: no wait
        os.write(fd, b"go\n")
        os.close(fd)
        pid = await asyncio.wait_for(waiting, TIMEOUT)
        await spawner.start("gated")
        event = await next_exit(spawner)
        assert (event.pid, event.exit_code) == (pid, 0)

    asyncio.run(scenario())
