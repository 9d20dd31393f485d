"""The Storage service of the real agent, natively as root: tmpfs, local and overlay storages,
a disk (a loop device over an ext4 image, found by its kernel name), containers on them,
file copies, volume statistics, and every way out refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_agent_containers_support import (
    RPC_TIMEOUT,
    AgentEnv,
    build_busybox_rootfs,
    make_spec,
    mounts_under,
    running_agent,
)

from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc, storage_pb2, storage_pb2_grpc

pb = storage_pb2
S = pb.StorageSpec
pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def env() -> Iterator[AgentEnv]:
    with running_agent() as state:
        yield state


@pytest.fixture(scope="module")
def stub(env: AgentEnv) -> storage_pb2_grpc.StorageStub:
    return storage_pb2_grpc.StorageStub(env.channel)


def storage_dir(env: AgentEnv) -> Path:
    return env.agent.run_dir / "storage"


def add(stub: storage_pb2_grpc.StorageStub, **fields) -> pb.StorageInfo:  # type: ignore[no-untyped-def]
    return stub.AddStorage(S(**fields), timeout=RPC_TIMEOUT)


def remove(stub: storage_pb2_grpc.StorageStub, storage_id: str) -> None:
    stub.RemoveStorage(pb.RemoveStorageRequest(storage_id=storage_id), timeout=RPC_TIMEOUT)


def failure(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def copy_file(stub, data: bytes, chunk: int = 256 * 1024, **header) -> pb.CopyFileResponse:  # type: ignore[no-untyped-def]
    def messages() -> Iterator[pb.CopyFileRequest]:
        yield pb.CopyFileRequest(size=len(data), data=data[:chunk], **header)
        for offset in range(chunk, len(data), chunk):
            yield pb.CopyFileRequest(data=data[offset : offset + chunk])

    return stub.CopyFile(messages(), timeout=RPC_TIMEOUT)


def run(env: AgentEnv, name: str, args: list[str], **request) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """Create (with storage fields), run to the end, remove: (stdout, exit code)."""
    from test_agent_containers_support import Attachment

    spec = request.pop("spec", None) or make_spec(args)
    mounts = request.pop("mounts", [])
    spec["mounts"] = spec["mounts"] + mounts
    env.client.stub.CreateContainer(
        agent_pb2.CreateContainerRequest(
            container_id=name, oci_spec=json.dumps(spec).encode(), **request
        ),
        timeout=RPC_TIMEOUT,
    )
    try:
        attachment = Attachment(env.client.stub, name)
        env.client.start(name)
        out = attachment.collect()
    finally:
        env.client.remove(name)
    assert out.exit is not None
    return bytes(out.stdout) + bytes(out.stderr), out.exit.exit_code


def test_tmpfs_storage_life(env: AgentEnv, stub: storage_pb2_grpc.StorageStub) -> None:
    info = add(stub, storage_id="scratch", driver=S.TMPFS, options=["size=8m", "mode=0700"])
    assert info.mount_point == str(storage_dir(env) / "scratch")
    assert (info.source, info.fstype, info.read_only) == ("tmpfs", "tmpfs", False)
    assert info.mount_point in mounts_under(storage_dir(env))
    listed = stub.ListStorages(pb.ListStoragesRequest(), timeout=RPC_TIMEOUT).storages
    assert [s.storage_id for s in listed] == ["scratch"]
    stats = stub.GetVolumeStats(pb.VolumeStatsRequest(storage_id="scratch"), timeout=RPC_TIMEOUT)
    assert stats.capacity_bytes == 8 * 1024 * 1024
    assert stats.inodes > 0 and stats.inodes_used >= 1
    code, message = failure(add, stub, storage_id="scratch", driver=S.TMPFS)
    assert code == grpc.StatusCode.ALREADY_EXISTS, message
    remove(stub, "scratch")
    assert mounts_under(storage_dir(env)) == [str(storage_dir(env))]
    assert not (storage_dir(env) / "scratch").exists()
    code, _ = failure(remove, stub, "scratch")
    assert code == grpc.StatusCode.NOT_FOUND


def test_copy_file_with_mode_owner_and_stats(env: AgentEnv, stub) -> None:  # type: ignore[no-untyped-def]
    add(stub, storage_id="copies", driver=S.TMPFS)
    try:
        data = os.urandom(3 * 1024 * 1024 + 17)
        reply = copy_file(
            stub, data, storage_id="copies", path="etc/app/conf", mode=0o640, uid=1000,
            gid=2000, make_parents=True,
        )  # fmt: skip
        target = storage_dir(env) / "copies" / "etc" / "app" / "conf"
        assert reply.path == str(target) and reply.bytes_written == len(data)
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
        st = target.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 1000, 2000)
        assert (target.parent.stat().st_uid, target.parent.stat().st_gid) == (1000, 2000)
        stats = stub.GetVolumeStats(
            pb.VolumeStatsRequest(storage_id="copies", path="etc"), timeout=RPC_TIMEOUT
        )
        assert stats.used_bytes >= len(data)
        # The agent's own file area when no storage is named.
        reply = copy_file(stub, b"hello", path="motd", mode=0o644)
        assert reply.path == str(env.agent.run_dir / "files" / "motd")
    finally:
        remove(stub, "copies")


def test_escapes_are_refused(env: AgentEnv, stub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    outside.mkdir()
    for mount_point in ("../evil", "/etc/evil", "a/../../evil"):
        code, message = failure(add, stub, storage_id="e", driver=S.TMPFS, mount_point=mount_point)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    # A symlink planted where a mount point's parent would be: never followed.
    (storage_dir(env) / "planted").symlink_to(outside)
    try:
        code, message = failure(add, stub, storage_id="e", driver=S.TMPFS, mount_point="planted/x")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "symlink" in message, message
    finally:
        (storage_dir(env) / "planted").unlink()
    assert list(outside.iterdir()) == []

    add(stub, storage_id="vol", driver=S.LOCAL)
    try:
        (storage_dir(env) / "vol" / "out").symlink_to(outside)
        code, message = failure(add, stub, storage_id="e", driver=S.TMPFS, mount_point="vol/in")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "overlaps" in message, message
        for path in ("../x", "/x", "out/x"):
            code, message = failure(
                copy_file, stub, b"evil", storage_id="vol", path=path, make_parents=True
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, message)
        code, message = failure(
            run, env, "escape", ["true"],
            mounts=[{"destination": "/v", "type": "bind", "source": "storage:vol/out"}],
        )  # fmt: skip
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "mounts[3].source" in message
        assert list(outside.iterdir()) == []
    finally:
        remove(stub, "vol")


def test_volumes_in_containers_and_in_use_refusal(env: AgentEnv, stub) -> None:  # type: ignore[no-untyped-def]
    add(stub, storage_id="data", driver=S.LOCAL)
    add(stub, storage_id="frozen", driver=S.TMPFS, options=["ro"])
    try:
        os.makedirs(storage_dir(env) / "data" / "sub")
        spec = make_spec(["sleep", "60"])
        spec["mounts"] += [
            {"destination": "/data", "source": "storage:data/sub", "options": ["rw"]},
            {"destination": "/frozen", "source": "storage:frozen"},
        ]
        env.client.create("user", spec)
        try:
            code, message = failure(remove, stub, "data")
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "in use by user" in message
            listed = {
                s.storage_id: s
                for s in stub.ListStorages(pb.ListStoragesRequest(), timeout=RPC_TIMEOUT).storages
            }
            assert list(listed["data"].users) == ["user"]
        finally:
            env.client.remove("user")
        assert (
            not stub.ListStorages(pb.ListStoragesRequest(), timeout=RPC_TIMEOUT).storages[0].users
        )

        output, code = run(
            env, "writer",
            ["sh", "-c", "echo made >/data/f && cat /data/f; touch /frozen/x || echo frozen-ro"],
            mounts=[
                {"destination": "/data", "source": "storage:data/sub"},
                {"destination": "/frozen", "source": "storage:frozen"},
            ],
        )  # fmt: skip
        assert code == 0, output
        assert b"made" in output and b"frozen-ro" in output
        assert (storage_dir(env) / "data" / "sub" / "f").read_text() == "made\n"
    finally:
        remove(stub, "frozen")
        remove(stub, "data")


def test_overlay_writes_never_reach_the_lower_layer(env: AgentEnv, stub) -> None:  # type: ignore[no-untyped-def]
    add(stub, storage_id="lower", driver=S.TMPFS)
    copy_file(stub, b"original\n", storage_id="lower", path="file", mode=0o644)
    info = add(stub, storage_id="ovl", driver=S.OVERLAY, lowers=["lower"])
    try:
        assert info.fstype == "overlay"
        code, message = failure(remove, stub, "lower")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "storage:ovl" in message
        output, code = run(
            env, "ovl-writer",
            ["sh", "-c", "cat /o/file; echo changed >/o/file; echo new >/o/other; cat /o/file"],
            mounts=[{"destination": "/o", "source": "storage:ovl"}],
        )  # fmt: skip
        assert (code, output) == (0, b"original\nchanged\n")
        assert (storage_dir(env) / "ovl" / "file").read_text() == "changed\n"
        assert (storage_dir(env) / "lower" / "file").read_text() == "original\n"
        assert not (storage_dir(env) / "lower" / "other").exists()
    finally:
        remove(stub, "ovl")
        remove(stub, "lower")
    assert mounts_under(storage_dir(env)) == [str(storage_dir(env))]
    assert os.listdir(env.agent.run_dir / "storage-private" / "overlay") == []


def test_container_root_filesystem_from_a_disk(env: AgentEnv, stub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rootfs = tmp_path / "rootfs"
    build_busybox_rootfs(rootfs)
    (rootfs / "etc" / "disk-marker").write_text("from the disk\n")
    image = tmp_path / "root.ext4"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(rootfs), str(image)], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        capture_output=True, text=True,
    )  # fmt: skip
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        code, message = failure(
            add, stub, storage_id="disk", driver=S.BLOCK, device=os.path.basename(device)
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "read-only" in message, message
        info = add(
            stub, storage_id="disk", driver=S.BLOCK, device=os.path.basename(device), options=["ro"]
        )
        assert (info.fstype, info.read_only) == ("ext4", True)
        output, code = run(
            env, "on-disk",
            ["sh", "-c", "cat /etc/disk-marker; echo scribble >/etc/disk-marker; cat /etc/*marker"],
            rootfs_storage="disk",
        )  # fmt: skip
        assert (code, output) == (0, b"from the disk\nscribble\n")
    finally:
        try:
            remove(stub, "disk")
        finally:
            subprocess.run(["losetup", "--detach", device], check=False)
    dumped = subprocess.run(
        ["debugfs", "-R", "cat /etc/disk-marker", str(image)], capture_output=True, check=True
    )
    assert dumped.stdout == b"from the disk\n"


def test_storages_added_with_a_container_go_with_it(env: AgentEnv, stub) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["sh", "-c", "echo hi >/scratch/f && cat /scratch/f"])
    spec["mounts"].append({"destination": "/scratch", "source": "storage:own-scratch"})
    output, code = run(
        env, "owner", [], spec=spec,
        storages=[S(storage_id="own-scratch", driver=S.TMPFS, options=["size=1m"])],
    )  # fmt: skip
    assert (code, output) == (0, b"hi\n")
    assert list(stub.ListStorages(pb.ListStoragesRequest(), timeout=RPC_TIMEOUT).storages) == []
    # A create that fails leaves none of its storages behind.
    bad = make_spec(["true"])
    bad["mounts"].append({"destination": "/x", "source": "storage:nothing-here"})
    code, message = failure(
        run, env, "owner2", [], spec=bad, storages=[S(storage_id="s2", driver=S.TMPFS)]
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nothing-here" in message
    assert list(stub.ListStorages(pb.ListStoragesRequest(), timeout=RPC_TIMEOUT).storages) == []


def test_missing_devices_time_out_naming_them(stub) -> None:  # type: ignore[no-untyped-def]
    code, message = failure(
        add, stub, storage_id="ghost", driver=S.BLOCK, pci_path="1e/00", timeout_ms=400
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, message
    assert "timed out after 0.4 s waiting for a disk at PCI path 1e/00" in message
    assert "disks seen:" in message
    code, message = failure(
        add, stub, storage_id="ghost", driver=S.BLOCK, serial="no-such", timeout_ms=200
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "serial 'no-such'" in message


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"driver": S.BLOCK}, "give exactly one of"),
        ({"driver": S.BLOCK, "pci_path": "zz"}, "pci_path"),
        ({"driver": S.TMPFS, "tag": "x"}, "tag: not used"),
        ({"driver": S.VIRTIO_FS}, "mount tag"),
        ({"driver": S.OVERLAY}, "at least one lower"),
        ({"driver": S.DRIVER_UNSPECIFIED}, "driver"),
        ({"driver": S.BLOCK, "serial": "x", "fstype": "ntfs"}, "fstype"),
        ({"driver": S.TMPFS, "options": ["bind"]}, "not storage options"),
    ],
)
def test_bad_requests_name_the_field(stub, fields: dict, text: str) -> None:  # type: ignore[no-untyped-def]
    code, message = failure(add, stub, storage_id="bad", **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and text in message, message
    code, message = failure(add, stub, storage_id="../bad", driver=S.TMPFS)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "storage_id" in message


def test_storage_events(env: AgentEnv, stub) -> None:  # type: ignore[no-untyped-def]
    telemetry = agent_pb2_grpc.TelemetryStub(env.channel)
    add(stub, storage_id="evented", driver=S.TMPFS)
    remove(stub, "evented")
    stream = telemetry.StreamEvents(agent_pb2.StreamEventsRequest(since=0), timeout=RPC_TIMEOUT)
    try:
        for event in stream:
            if event.kind == agent_pb2.Event.STORAGE_MOUNTED and (
                event.details["storage_id"] == "evented"
            ):
                assert event.mount_point == str(storage_dir(env) / "evented")
                assert (event.device, event.details["driver"]) == ("tmpfs", "tmpfs")
                break
    finally:
        stream.cancel()
