"""The shim's copies of containerd's wire types keep containerd's names and numbers.

containerd decodes these by field number and finds Any payloads by full message name, so
a renumbered or renamed field would compile, pass every round trip of our own, and break
only against containerd. These tests pin what containerd 1.6 puts on the wire.
"""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from bulkhead_shim.api import (
    cgroups_v2_pb2,
    events_pb2,
    mount_pb2,
    runc_options_pb2,
    shim_pb2,
    task_types_pb2,
    ttrpc_events_pb2,
    ttrpc_request_pb2,
)
from bulkhead_shim.publisher import pack_any, unpack_any

F = FieldDescriptor
STRING, BOOL, UINT32, UINT64, INT32, INT64, BYTES = (
    F.TYPE_STRING,
    F.TYPE_BOOL,
    F.TYPE_UINT32,
    F.TYPE_UINT64,
    F.TYPE_INT32,
    F.TYPE_INT64,
    F.TYPE_BYTES,
)
MSG, ENUM = F.TYPE_MESSAGE, F.TYPE_ENUM


def fields(desc: Descriptor) -> dict[str, tuple[int, int, str | None, bool]]:
    """name -> (number, type, message/enum full name, repeated)."""
    out = {}
    for f in desc.fields:
        sub = f.message_type or f.enum_type
        out[f.name] = (
            f.number,
            f.type,
            sub.full_name if sub else None,
            f.is_repeated,
        )
    return out


def s(n: int) -> tuple[int, int, None, bool]:
    return (n, STRING, None, False)


def u32(n: int) -> tuple[int, int, None, bool]:
    return (n, UINT32, None, False)


def b(n: int) -> tuple[int, int, None, bool]:
    return (n, BOOL, None, False)


def m(n: int, name: str, repeated: bool = False) -> tuple[int, int, str, bool]:
    return (n, MSG, name, repeated)


TS = "google.protobuf.Timestamp"
ANY = "google.protobuf.Any"
MOUNT = "containerd.types.Mount"


# --- full names: what type URLs and service routing depend on ----------------------------


@pytest.mark.parametrize(
    ("cls", "full_name"),
    [
        (mount_pb2.Mount, "containerd.types.Mount"),
        (task_types_pb2.ProcessInfo, "containerd.v1.types.ProcessInfo"),
        (shim_pb2.CreateTaskRequest, "containerd.task.v2.CreateTaskRequest"),
        (events_pb2.TaskExit, "containerd.events.TaskExit"),
        (events_pb2.TaskCreate, "containerd.events.TaskCreate"),
        (ttrpc_events_pb2.Envelope, "containerd.services.events.ttrpc.v1.Envelope"),
        (ttrpc_events_pb2.ForwardRequest, "containerd.services.events.ttrpc.v1.ForwardRequest"),
        (ttrpc_request_pb2.Request, "ttrpc.Request"),
        (ttrpc_request_pb2.Response, "ttrpc.Response"),
        (cgroups_v2_pb2.Metrics, "io.containerd.cgroups.v2.Metrics"),
        (runc_options_pb2.ProcessDetails, "containerd.runc.v1.ProcessDetails"),
        (runc_options_pb2.Options, "containerd.runc.v1.Options"),
    ],
)
def test_full_names(cls: type, full_name: str) -> None:
    assert cls.DESCRIPTOR.full_name == full_name


def test_status_enum() -> None:
    enum = task_types_pb2.DESCRIPTOR.enum_types_by_name["Status"]
    assert enum.full_name == "containerd.v1.types.Status"
    assert {v.name: v.number for v in enum.values} == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }


def test_task_service_methods() -> None:
    service = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    empty = "google.protobuf.Empty"
    expected = {
        "State": ("StateRequest", "containerd.task.v2.StateResponse"),
        "Create": ("CreateTaskRequest", "containerd.task.v2.CreateTaskResponse"),
        "Start": ("StartRequest", "containerd.task.v2.StartResponse"),
        "Delete": ("DeleteRequest", "containerd.task.v2.DeleteResponse"),
        "Pids": ("PidsRequest", "containerd.task.v2.PidsResponse"),
        "Pause": ("PauseRequest", empty),
        "Resume": ("ResumeRequest", empty),
        "Checkpoint": ("CheckpointTaskRequest", empty),
        "Kill": ("KillRequest", empty),
        "Exec": ("ExecProcessRequest", empty),
        "ResizePty": ("ResizePtyRequest", empty),
        "CloseIO": ("CloseIORequest", empty),
        "Update": ("UpdateTaskRequest", empty),
        "Wait": ("WaitRequest", "containerd.task.v2.WaitResponse"),
        "Stats": ("StatsRequest", "containerd.task.v2.StatsResponse"),
        "Connect": ("ConnectRequest", "containerd.task.v2.ConnectResponse"),
        "Shutdown": ("ShutdownRequest", empty),
    }
    got = {
        meth.name: (meth.input_type.name, meth.output_type.full_name) for meth in service.methods
    }
    assert got == expected


def test_events_service() -> None:
    service = ttrpc_events_pb2.DESCRIPTOR.services_by_name["Events"]
    assert service.full_name == "containerd.services.events.ttrpc.v1.Events"
    forward = service.methods_by_name["Forward"]
    assert forward.input_type is ttrpc_events_pb2.ForwardRequest.DESCRIPTOR
    assert forward.output_type is empty_pb2.Empty.DESCRIPTOR


# --- field numbers and types -------------------------------------------------------------


def test_mount() -> None:
    assert fields(mount_pb2.Mount.DESCRIPTOR) == {
        "type": s(1),
        "source": s(2),
        "target": s(3),
        "options": (4, STRING, None, True),
    }


def test_process_info() -> None:
    assert fields(task_types_pb2.ProcessInfo.DESCRIPTOR) == {"pid": u32(1), "info": m(2, ANY)}
    assert fields(runc_options_pb2.ProcessDetails.DESCRIPTOR) == {"exec_id": s(1)}


def test_create_task_request() -> None:
    assert fields(shim_pb2.CreateTaskRequest.DESCRIPTOR) == {
        "id": s(1),
        "bundle": s(2),
        "rootfs": m(3, MOUNT, repeated=True),
        "terminal": b(4),
        "stdin": s(5),
        "stdout": s(6),
        "stderr": s(7),
        "checkpoint": s(8),
        "parent_checkpoint": s(9),
        "options": m(10, ANY),
        "oom_path": s(11),
    }


def test_state_response() -> None:
    assert fields(shim_pb2.StateResponse.DESCRIPTOR) == {
        "id": s(1),
        "bundle": s(2),
        "pid": u32(3),
        "status": (4, ENUM, "containerd.v1.types.Status", False),
        "stdin": s(5),
        "stdout": s(6),
        "stderr": s(7),
        "terminal": b(8),
        "exit_status": u32(9),
        "exited_at": m(10, TS),
        "exec_id": s(11),
    }


def test_other_task_messages() -> None:
    f = fields
    assert f(shim_pb2.DeleteRequest.DESCRIPTOR) == {"id": s(1), "exec_id": s(2)}
    assert f(shim_pb2.DeleteResponse.DESCRIPTOR) == {
        "pid": u32(1),
        "exit_status": u32(2),
        "exited_at": m(3, TS),
    }
    assert f(shim_pb2.ExecProcessRequest.DESCRIPTOR) == {
        "id": s(1),
        "exec_id": s(2),
        "terminal": b(3),
        "stdin": s(4),
        "stdout": s(5),
        "stderr": s(6),
        "spec": m(7, ANY),
    }
    assert f(shim_pb2.ResizePtyRequest.DESCRIPTOR) == {
        "id": s(1),
        "exec_id": s(2),
        "width": u32(3),
        "height": u32(4),
    }
    assert f(shim_pb2.KillRequest.DESCRIPTOR) == {
        "id": s(1),
        "exec_id": s(2),
        "signal": u32(3),
        "all": b(4),
    }
    assert f(shim_pb2.CloseIORequest.DESCRIPTOR) == {"id": s(1), "exec_id": s(2), "stdin": b(3)}
    assert f(shim_pb2.PidsResponse.DESCRIPTOR) == {
        "processes": m(1, "containerd.v1.types.ProcessInfo", repeated=True)
    }
    assert f(shim_pb2.CheckpointTaskRequest.DESCRIPTOR) == {
        "id": s(1),
        "path": s(2),
        "options": m(3, ANY),
    }
    update = f(shim_pb2.UpdateTaskRequest.DESCRIPTOR)
    assert update["id"] == s(1) and update["resources"] == m(2, ANY)
    assert update["annotations"][:2] == (3, MSG)
    assert (
        shim_pb2.UpdateTaskRequest.DESCRIPTOR.fields_by_name["annotations"]
        .message_type.GetOptions()
        .map_entry
    )
    for name in ("StartRequest", "WaitRequest", "StateRequest"):
        assert f(shim_pb2.DESCRIPTOR.message_types_by_name[name]) == {"id": s(1), "exec_id": s(2)}
    assert f(shim_pb2.StartResponse.DESCRIPTOR) == {"pid": u32(1)}
    assert f(shim_pb2.CreateTaskResponse.DESCRIPTOR) == {"pid": u32(1)}
    assert f(shim_pb2.WaitResponse.DESCRIPTOR) == {"exit_status": u32(1), "exited_at": m(2, TS)}
    assert f(shim_pb2.StatsResponse.DESCRIPTOR) == {"stats": m(1, ANY)}
    assert f(shim_pb2.ConnectResponse.DESCRIPTOR) == {
        "shim_pid": u32(1),
        "task_pid": u32(2),
        "version": s(3),
    }
    assert f(shim_pb2.ShutdownRequest.DESCRIPTOR) == {"id": s(1), "now": b(2)}
    for name in ("PidsRequest", "StatsRequest", "ConnectRequest", "PauseRequest", "ResumeRequest"):
        assert f(shim_pb2.DESCRIPTOR.message_types_by_name[name]) == {"id": s(1)}


def test_task_events() -> None:
    f = fields
    assert f(events_pb2.TaskCreate.DESCRIPTOR) == {
        "container_id": s(1),
        "bundle": s(2),
        "rootfs": m(3, MOUNT, repeated=True),
        "io": m(4, "containerd.events.TaskIO"),
        "checkpoint": s(5),
        "pid": u32(6),
    }
    assert f(events_pb2.TaskIO.DESCRIPTOR) == {
        "stdin": s(1),
        "stdout": s(2),
        "stderr": s(3),
        "terminal": b(4),
    }
    assert f(events_pb2.TaskStart.DESCRIPTOR) == {"container_id": s(1), "pid": u32(2)}
    assert f(events_pb2.TaskExit.DESCRIPTOR) == {
        "container_id": s(1),
        "id": s(2),
        "pid": u32(3),
        "exit_status": u32(4),
        "exited_at": m(5, TS),
        "exit_reason": (6, ENUM, "containerd.v1.types.ExitReason", False),
    }
    assert f(events_pb2.TaskDelete.DESCRIPTOR) == {
        "container_id": s(1),
        "pid": u32(2),
        "exit_status": u32(3),
        "exited_at": m(4, TS),
        "id": s(5),
    }
    assert f(events_pb2.TaskExecAdded.DESCRIPTOR) == {"container_id": s(1), "exec_id": s(2)}
    assert f(events_pb2.TaskExecStarted.DESCRIPTOR) == {
        "container_id": s(1),
        "exec_id": s(2),
        "pid": u32(3),
    }
    assert f(events_pb2.TaskCheckpointed.DESCRIPTOR) == {"container_id": s(1), "checkpoint": s(2)}
    for cls in (events_pb2.TaskOOM, events_pb2.TaskPaused, events_pb2.TaskResumed):
        assert f(cls.DESCRIPTOR) == {"container_id": s(1)}


def test_envelope() -> None:
    assert fields(ttrpc_events_pb2.Envelope.DESCRIPTOR) == {
        "timestamp": m(1, TS),
        "namespace": s(2),
        "topic": s(3),
        "event": m(4, ANY),
    }
    assert fields(ttrpc_events_pb2.ForwardRequest.DESCRIPTOR) == {
        "envelope": m(1, "containerd.services.events.ttrpc.v1.Envelope")
    }


def test_ttrpc_envelope_messages() -> None:
    assert fields(ttrpc_request_pb2.Request.DESCRIPTOR) == {
        "service": s(1),
        "method": s(2),
        "payload": (3, BYTES, None, False),
        "timeout_nano": (4, INT64, None, False),
        "metadata": m(5, "ttrpc.KeyValue", repeated=True),
    }
    assert fields(ttrpc_request_pb2.Response.DESCRIPTOR) == {
        "status": m(1, "ttrpc.Status"),
        "payload": (2, BYTES, None, False),
    }
    assert fields(ttrpc_request_pb2.KeyValue.DESCRIPTOR) == {"key": s(1), "value": s(2)}
    # google.rpc.Status's layout, so Go's ttrpc reads ours as its own.
    assert fields(ttrpc_request_pb2.Status.DESCRIPTOR) == {
        "code": (1, INT32, None, False),
        "message": s(2),
        "details": m(3, ANY, repeated=True),
    }


def test_ttrpc_request_bytes() -> None:
    # Hand-encoded: field 1 "S", field 2 "M", field 3 b"\x01", field 4 varint 5,
    # field 5 {key "k", value "v"}.
    wire = b"\x0a\x01S\x12\x01M\x1a\x01\x01\x20\x05\x2a\x06\x0a\x01k\x12\x01v"
    req = ttrpc_request_pb2.Request.FromString(wire)
    assert (req.service, req.method, req.payload, req.timeout_nano) == ("S", "M", b"\x01", 5)
    assert [(kv.key, kv.value) for kv in req.metadata] == [("k", "v")]
    assert req.SerializeToString() == wire


def test_cgroups_v2_metrics() -> None:
    top = fields(cgroups_v2_pb2.Metrics.DESCRIPTOR)
    assert top["pids"] == m(1, "io.containerd.cgroups.v2.PidsStat")
    assert top["cpu"] == m(2, "io.containerd.cgroups.v2.CPUStat")
    assert top["memory"] == m(4, "io.containerd.cgroups.v2.MemoryStat")
    assert top["io"] == m(6, "io.containerd.cgroups.v2.IOStat")
    assert top["hugetlb"] == m(7, "io.containerd.cgroups.v2.HugeTlbStat", repeated=True)
    assert top["memory_events"] == m(8, "io.containerd.cgroups.v2.MemoryEvents")
    assert fields(cgroups_v2_pb2.PidsStat.DESCRIPTOR) == {
        "current": (1, UINT64, None, False),
        "limit": (2, UINT64, None, False),
    }
    cpu = {name: v[0] for name, v in fields(cgroups_v2_pb2.CPUStat.DESCRIPTOR).items()}
    assert cpu == {
        "usage_usec": 1,
        "user_usec": 2,
        "system_usec": 3,
        "nr_periods": 4,
        "nr_throttled": 5,
        "throttled_usec": 6,
    }
    memory = fields(cgroups_v2_pb2.MemoryStat.DESCRIPTOR)
    names = [
        "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
        "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file",
        "active_file", "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault",
        "pgmajfault", "workingset_refault", "workingset_activate", "workingset_nodereclaim",
        "pgrefill", "pgscan", "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree",
        "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc", "usage", "usage_limit",
        "swap_usage", "swap_limit", "max_usage", "swap_max_usage",
    ]  # fmt: skip
    assert memory == {name: (i, UINT64, None, False) for i, name in enumerate(names, start=1)}
    assert {n: v[0] for n, v in fields(cgroups_v2_pb2.MemoryEvents.DESCRIPTOR).items()} == {
        "low": 1,
        "high": 2,
        "max": 3,
        "oom": 4,
        "oom_kill": 5,
    }


def test_runc_options_numbers() -> None:
    opts = {n: v[0] for n, v in fields(runc_options_pb2.Options.DESCRIPTOR).items()}
    assert opts["binary_name"] == 6 and opts["root"] == 7 and opts["systemd_cgroup"] == 9


def test_round_trip_through_any() -> None:
    # The Task service packs a Metrics for Stats and a ProcessDetails per exec in Pids.
    metrics = cgroups_v2_pb2.Metrics(
        pids=cgroups_v2_pb2.PidsStat(current=3, limit=10),
        memory=cgroups_v2_pb2.MemoryStat(usage=1 << 20, anon=4096),
    )
    packed = pack_any(metrics)
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    # protobuf's own Unpack refuses containerd's bare-name URL; unpack_any takes it.
    assert not packed.Unpack(cgroups_v2_pb2.Metrics())
    assert unpack_any(packed, cgroups_v2_pb2.Metrics) == metrics
    assert unpack_any(packed, runc_options_pb2.Options) is None
    prefixed = any_pb2.Any()
    prefixed.Pack(metrics)
    assert unpack_any(prefixed, cgroups_v2_pb2.Metrics) == metrics
    stamp = timestamp_pb2.Timestamp(seconds=5)
    resp = shim_pb2.StateResponse(id="c", exit_status=137, exited_at=stamp)
    assert shim_pb2.StateResponse.FromString(resp.SerializeToString()).exit_status == 137
