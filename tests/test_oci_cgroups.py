"""OCI linux.resources onto cgroup v2 files (pure), and the Cgroup class on a real cgroup2 mount."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bulkhead_agent.oci.cgroups import (
    Cgroup,
    cpu_weight_from_shares,
    io_weight_from_blkio,
    resources_to_v2,
)
from bulkhead_agent.oci.spec import SpecError, parse


def resources(value: dict[str, Any]) -> Any:
    spec = parse(
        {
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "linux": {"resources": value},
        }
    )
    return spec.linux.resources


def test_cpu_shares_to_weight_conversion() -> None:
    assert cpu_weight_from_shares(2) == 1
    assert cpu_weight_from_shares(1024) == 39
    assert cpu_weight_from_shares(262144) == 10000
    assert io_weight_from_blkio(10) == 1 and io_weight_from_blkio(1000) == 10000


@pytest.mark.parametrize(
    ("value", "files"),
    [
        ({}, {}),
        ({"cpu": {"quota": 50000, "period": 100000}}, {"cpu.max": "50000 100000"}),
        ({"cpu": {"quota": 20000}}, {"cpu.max": "20000 100000"}),
        ({"cpu": {"quota": -1, "period": 250000}}, {"cpu.max": "max 250000"}),
        ({"cpu": {"shares": 1024}}, {"cpu.weight": "39"}),
        ({"cpu": {"cpus": "0-1", "mems": "0"}}, {"cpuset.cpus": "0-1", "cpuset.mems": "0"}),
        ({"cpu": {"burst": 1000, "idle": 1}}, {"cpu.max.burst": "1000", "cpu.idle": "1"}),
        ({"memory": {"limit": 268435456}}, {"memory.max": "268435456"}),
        ({"memory": {"limit": -1}}, {"memory.max": "max"}),
        ({"memory": {"reservation": 1048576}}, {"memory.low": "1048576"}),
        # OCI swap is memory+swap; v2's swap.max is the swap alone.
        (
            {"memory": {"limit": 100 << 20, "swap": 300 << 20}},
            {"memory.max": str(100 << 20), "memory.swap.max": str(200 << 20)},
        ),
        (
            {"memory": {"limit": 100 << 20, "swap": 100 << 20}},
            {"memory.max": str(100 << 20), "memory.swap.max": "0"},
        ),
        (
            {"memory": {"limit": 100 << 20, "swap": -1}},
            {"memory.max": str(100 << 20), "memory.swap.max": "max"},
        ),
        ({"memory": {"kernel": 1, "kernelTCP": 1, "swappiness": 10}}, {}),  # not in v2: ignored
        ({"pids": {"limit": 100}}, {"pids.max": "100"}),
        ({"pids": {"limit": -1}}, {"pids.max": "max"}),
        ({"pids": {"limit": 0}}, {}),
        (
            {
                "blockIO": {
                    "weight": 500,
                    "weightDevice": [{"major": 8, "minor": 0, "weight": 1000}],
                    "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
                    "throttleWriteIOPSDevice": [
                        {"major": 8, "minor": 0, "rate": 100},
                        {"major": 253, "minor": 1, "rate": 0},
                    ],
                }
            },
            {
                "io.weight": "default 4950\n8:0 10000",
                "io.max": "8:0 rbps=1048576 wiops=100\n253:1 wiops=max",
            },
        ),
        (
            {"hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}]},
            {"hugetlb.2MB.max": "4194304"},
        ),
        (
            {"memory": {"limit": 1 << 30}, "unified": {"memory.max": "max", "memory.high": "123"}},
            {"memory.max": "max", "memory.high": "123"},
        ),
        ({"devices": [{"allow": False, "access": "rwm"}]}, {}),  # eBPF in v2: not a file
    ],
)
def test_resources_to_files(value: dict[str, Any], files: dict[str, str]) -> None:
    assert resources_to_v2(resources(value)) == files


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"memory": {"swap": 1 << 30}}, "linux.resources.memory.swap: needs memory.limit"),
        (
            {"memory": {"limit": 2 << 20, "swap": 1 << 20}},
            "linux.resources.memory.swap: must be at least",
        ),
        ({"cpu": {"realtimeRuntime": 1000}}, "linux.resources.cpu.realtimeRuntime: real-time"),
    ],
)
def test_what_v2_cannot_express_is_an_error(value: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        resources_to_v2(resources(value))
    assert str(info.value).startswith(message)


# --- native: a cgroup2 mount in a throwaway mount namespace ----------------------------------


def run_in_mount_namespace(body: Callable[[str], None], timeout: float = 20.0) -> None:
    """Run ``body(cgroup2 mount point)`` in a forked child with its own mount namespace.

    The mount stays private to the child; the cgroups it makes are real (the hierarchy is
    global) and the body removes them. A failure in the child fails the test with its
    traceback.
    """
    from bulkhead_agent.linux import mounts, namespaces

    where = tempfile.mkdtemp(prefix="bulkhead-cg2-")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            namespaces.unshare(namespaces.CLONE_NEWNS)
            mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
            try:
                mounts.mount("cgroup2", where, "cgroup2")
            except OSError as exc:
                os.write(write, f"SKIP cannot mount cgroup2 here: {exc}".encode())
                os._exit(0)
            body(where)
            os.write(write, b"OK")
        except BaseException:
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([read], [], [], remaining)[0]:
            os.kill(pid, signal.SIGKILL)  # stuck: the report below says so
            chunks.append(b"timed out")
            break
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    os.rmdir(where)  # the mount went with the child's namespace
    result = b"".join(chunks).decode()
    if result.startswith("SKIP "):
        pytest.skip(result[5:])
    assert result == "OK", result


def _cgroup_lifecycle(mount: str) -> None:
    root = os.path.join(mount, f"bulkhead-test-{os.getpid()}")
    cgroup = Cgroup("c1", root=root)
    sleeper = None
    # Only hugetlb reaches a cgroup2 mount on a v1 host (the guest has them all). Hand it
    # down from the top, as the guest's init does, and put things back afterwards.
    top_control = os.path.join(mount, "cgroup.subtree_control")
    has_hugetlb = "hugetlb" in Path(mount, "cgroup.controllers").read_text().split()
    enabled_here = False
    if has_hugetlb and "hugetlb" not in Path(top_control).read_text().split():
        with open(top_control, "w") as f:
            f.write("+hugetlb")
        enabled_here = True
    try:
        value: dict[str, Any] = {}
        if has_hugetlb and os.path.exists("/sys/kernel/mm/hugepages/hugepages-2048kB"):
            value = {"hugepageLimits": [{"pageSize": "2MB", "limit": 2 << 20}]}
        cgroup.create(resources(value))
        assert os.path.isdir(cgroup.path)
        if value:
            assert Path(cgroup.file("hugetlb.2MB.max")).read_text().strip() == str(2 << 20)
        assert cgroup.procs() == [] and not cgroup.populated

        sleeper = subprocess.Popen(["sleep", "30"])
        cgroup.add(sleeper.pid)
        assert cgroup.procs() == [sleeper.pid]
        assert cgroup.populated

        cgroup.freeze(timeout=5)
        assert cgroup.frozen
        cgroup.thaw(timeout=5)
        assert not cgroup.frozen

        stats = cgroup.stats()
        assert "usage_usec" in stats.cpu  # cpu.stat is core in v2
        assert stats.oom_kills == 0

        cgroup.kill(timeout=5)
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert cgroup.procs() == []

        # The fallback for kernels before cgroup.kill (5.14): freeze, SIGKILL each, thaw.
        sleeper = subprocess.Popen(["sleep", "30"])
        cgroup.add(sleeper.pid)
        cgroup._kill_one_by_one(timeout=5)
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        cgroup.wait_event("populated", 0, timeout=5)
        assert not cgroup.frozen

        os.mkdir(cgroup.file("nested"))  # as a container with a cgroup namespace might
        cgroup.remove(timeout=5)
        assert not os.path.exists(cgroup.path)
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(timeout=5)
        for path in (os.path.join(cgroup.path, "nested"), cgroup.path, root):
            if os.path.isdir(path):
                os.rmdir(path)
        if enabled_here:
            with open(top_control, "w") as f:
                f.write("-hugetlb")


def _missing_controller_is_enoent(mount: str) -> None:
    root = os.path.join(mount, f"bulkhead-test-{os.getpid()}")
    cgroup = Cgroup("c2", root=root)
    try:
        # memory never reaches cgroup2 on a v1 host; in the guest it always does.
        if "memory" in Path(mount, "cgroup.controllers").read_text().split():
            return
        with pytest.raises(OSError) as info:
            cgroup.create(resources({"memory": {"limit": 1 << 30}}))
        assert info.value.errno == errno.ENOENT
        assert "memory.max" in str(info.value)
        assert not os.path.exists(cgroup.path)  # a failed create leaves nothing behind
    finally:
        for path in (cgroup.path, root):
            if os.path.isdir(path):
                os.rmdir(path)


_PRINT_V2_CGROUP = (
    'while read line; do case $line in 0::*) echo "$line";; esac; done </proc/self/cgroup'
)


def _container_joins_its_cgroup(mount: str) -> None:
    import asyncio
    import shutil

    from bulkhead_agent.spawner.client import Spawner

    busybox = shutil.which("busybox")
    if busybox is None:
        return
    bundle = tempfile.mkdtemp(prefix="bulkhead-cg-bundle-")
    for sub in ("bin", "proc"):
        os.makedirs(os.path.join(bundle, "rootfs", sub))
    shutil.copy(busybox, os.path.join(bundle, "rootfs", "bin", "sh"))
    root = os.path.join(mount, f"bulkhead-test-{os.getpid()}")
    cgroup = Cgroup("c3", root=root)
    cgroup.create()
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/sh", "-c", _PRINT_V2_CGROUP], "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "cgroup")]},
    }
    spawner = Spawner.launch()

    async def scenario() -> None:
        read, write = os.pipe()
        try:
            pid = await spawner.create(
                "cg", bundle=bundle, spec=spec, stdio=[0, write, write], cgroup=cgroup.path
            )
            os.close(write)
            assert cgroup.procs() == [pid]  # in its cgroup before it runs
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
            assert f"0::/{os.path.basename(root)}/c3" in lines
            await spawner.start("cg")
            event = await asyncio.wait_for(spawner.exits.get(), 10)
            assert (event.pid, event.exit_code) == (pid, 0)
            # Inside its own cgroup namespace, its cgroup is the root.
            assert os.read(read, 100) == b"0::/\n"
        finally:
            os.close(read)

    try:
        asyncio.run(scenario())
        cgroup.remove(timeout=5)
    finally:
        spawner.close()
        shutil.rmtree(bundle)
        for path in (cgroup.path, root):
            if os.path.isdir(path):
                os.rmdir(path)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount cgroup2")
@pytest.mark.timeout(60)
def test_container_process_joins_its_cgroup_before_it_runs() -> None:
    run_in_mount_namespace(_container_joins_its_cgroup)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount cgroup2")
@pytest.mark.timeout(60)
def test_cgroup_create_add_freeze_kill_remove() -> None:
    run_in_mount_namespace(_cgroup_lifecycle)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount cgroup2")
@pytest.mark.timeout(60)
def test_cgroup_without_the_controller_fails_naming_the_file() -> None:
    run_in_mount_namespace(_missing_controller_is_enoent)


def test_cgroup_name_must_be_one_component() -> None:
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError):
            Cgroup(bad, root="/nonexistent")


def test_cgroup_outside_a_cgroup2_tree_is_refused(tmp_path) -> None:
    with pytest.raises(OSError, match="is not a cgroup2 directory"):
        Cgroup("c1", root=str(tmp_path / "bulkhead")).create()
