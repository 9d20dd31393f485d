"""OCI runtime spec validation: typed results, and errors that name the JSON field."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from typing import Any

import pytest

from bulkhead_agent.oci.spec import Capabilities, Rlimit, SpecError, load, loads, parse

BASE: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "process": {"args": ["/bin/true"], "cwd": "/", "env": ["PATH=/bin"]},
    "root": {"path": "rootfs"},
    "hostname": "box",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]},
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """BASE with the value at a dotted path (list indexes as numbers) replaced or deleted."""
    spec = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return spec


DELETE = object()

BAD_SPECS = [
    ("ociVersion", DELETE, "ociVersion: is required"),
    ("ociVersion", "2.0.0", "ociVersion: unsupported version '2.0.0' (need 1.x)"),
    ("process", DELETE, "process: is required"),
    ("process", [], "process: must be an object"),
    ("process.args", [], "process.args: must be a non-empty list of strings"),
    ("process.args", ["sh", 1], "process.args: must be a non-empty list of strings"),
    ("process.args", DELETE, "process.args: is required"),
    ("process.cwd", "tmp", "process.cwd: must be an absolute path, not 'tmp'"),
    ("process.env", ["PATH"], "process.env[0]: must be KEY=VALUE, not 'PATH'"),
    ("process.terminal", "yes", "process.terminal: must be true or false"),
    ("process.user", {"uid": -1, "gid": 0}, "process.user.uid: must be between 0 and 4294967295"),
    ("process.user", {"uid": 0}, "process.user.gid: is required"),
    ("process.user", {"uid": True, "gid": 0}, "process.user.uid: must be an integer"),
    (
        "process.user",
        {"uid": 0, "gid": 0, "additionalGids": [1, "2"]},
        "process.user.additionalGids[1]: must be an integer",
    ),
    (
        "process.capabilities",
        {"bounding": ["CAP_KILL", "CAP_NOPE"]},
        "process.capabilities.bounding[1]: unknown capability 'CAP_NOPE'",
    ),
    (
        "process.rlimits",
        [{"type": "RLIMIT_NOPE", "soft": 1, "hard": 1}],
        "process.rlimits[0].type: unknown rlimit 'RLIMIT_NOPE'",
    ),
    (
        "process.rlimits",
        [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}],
        "process.rlimits[0].soft: must not exceed hard (10 > 5)",
    ),
    (
        "process.rlimits",
        [
            {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1},
            {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1},
        ],
        "process.rlimits[1].type: RLIMIT_NOFILE is given twice",
    ),
    ("process.oomScoreAdj", 1001, "process.oomScoreAdj: must be between -1000 and 1000"),
    ("root", DELETE, "root: is required"),
    ("root.path", DELETE, "root.path: is required"),
    ("root.readonly", 1, "root.readonly: must be true or false"),
    ("mounts.0.destination", "proc", "mounts[0].destination: must be an absolute path, not 'proc'"),
    ("mounts.0.destination", "/a/../b", "mounts[0].destination: must not contain '..': '/a/../b'"),
    ("mounts.0.options", "ro", "mounts[0].options: must be a list of strings"),
    ("linux.namespaces.2", {"type": "foo"}, "linux.namespaces[2].type: unknown namespace 'foo'"),
    (
        "linux.namespaces.2",
        {"type": "pid"},
        "linux.namespaces[2].type: namespace 'pid' is given twice",
    ),
    (
        "linux.namespaces.2",
        {"type": "uts", "path": "x"},
        "linux.namespaces[2].path: must be an absolute path, not 'x'",
    ),
    (
        "linux.namespaces.2",
        {"type": "time"},
        "linux.namespaces[2].type: namespace 'time' is not supported",
    ),
    ("linux.namespaces.2", {"type": "ipc"}, "hostname: needs a uts namespace in linux.namespaces"),
    ("linux.namespaces.1", {"type": "ipc"}, "mounts: needs a mount namespace in linux.namespaces"),
    (
        "linux.uidMappings",
        [{"containerID": 0, "hostID": 1000, "size": 1}],
        "linux.uidMappings: needs a new user namespace in linux.namespaces",
    ),
    (
        "linux.uidMappings",
        [{"containerID": 0, "hostID": 1000, "size": 0}],
        "linux.uidMappings[0].size: must be between 1 and 4294967295",
    ),
    (
        "linux.maskedPaths",
        ["proc/kcore"],
        "linux.maskedPaths[0]: must be an absolute path, not 'proc/kcore'",
    ),
    ("linux.readonlyPaths", "/proc/sys", "linux.readonlyPaths: must be a list of strings"),
    (
        "linux.rootfsPropagation",
        "sideways",
        "linux.rootfsPropagation: unknown propagation 'sideways'",
    ),
    ("linux.sysctl", {"net.ipv4.ip_forward": 1}, "linux.sysctl: must be an object of strings"),
    (
        "linux.resources",
        {"memory": {"limit": "1G"}},
        "linux.resources.memory.limit: must be an integer",
    ),
    ("linux.resources", {"pids": {}}, "linux.resources.pids.limit: is required"),
    (
        "linux.resources",
        {"devices": [{"access": "rwm"}]},
        "linux.resources.devices[0].allow: is required",
    ),
    (
        "linux.resources",
        {"devices": [{"allow": True, "access": "rwx"}]},
        "linux.resources.devices[0].access: must be letters of 'rwm', not 'rwx'",
    ),
    (
        "linux.resources",
        {"blockIO": {"weight": 5}},
        "linux.resources.blockIO.weight: must be between 10 and 1000",
    ),
    (
        "linux.resources",
        {"unified": {"../escape": "1"}},
        "linux.resources.unified.../escape: is not a cgroup interface file name",
    ),
    (
        "linux.seccomp",
        {"defaultAction": "SCMP_ACT_NOPE"},
        "linux.seccomp.defaultAction: unknown seccomp action 'SCMP_ACT_NOPE'",
    ),
    (
        "linux.seccomp",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}],
        },
        "linux.seccomp.syscalls[0].names: must be a non-empty list of strings",
    ),
    (
        "linux.seccomp",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {
                    "names": ["mkdir"],
                    "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}],
                }
            ],
        },
        "linux.seccomp.syscalls[0].args[0].index: must be between 0 and 5",
    ),
    (
        "linux.devices",
        [{"type": "x", "path": "/dev/x"}],
        "linux.devices[0].type: unknown device type 'x'",
    ),
    ("linux.devices", [{"type": "c", "path": "/dev/x"}], "linux.devices[0].major: is required"),
    (
        "hooks",
        {"prestart": [{"path": "hook"}]},
        "hooks.prestart[0].path: must be an absolute path, not 'hook'",
    ),
    ("annotations", {"a": 1}, "annotations: must be an object of strings"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    BAD_SPECS,
    ids=[f"{p}:{m.split(': ', 1)[1][:30]}" for p, _v, m in BAD_SPECS],
)
def test_errors_name_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(with_change(path, value))
    assert str(info.value) == message
    assert info.value.path == message.split(": ", 1)[0]


def test_not_an_object_or_not_json() -> None:
    with pytest.raises(SpecError, match=r"^\(spec\): must be an object$"):
        parse([])
    with pytest.raises(SpecError, match=r"^\(spec\): not valid JSON"):
        loads("{")


def test_good_spec_is_typed() -> None:
    spec = parse(
        with_change(
            "process",
            {
                "args": ["sh", "-c", "true"],
                "cwd": "/work",
                "env": ["PATH=/bin", "A=1=2", "A=3"],
                "user": {"uid": 1000, "gid": 100, "additionalGids": [10, 20], "umask": 0o27},
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}],
                "noNewPrivileges": True,
                "oomScoreAdj": 100,
            },
        )
    )
    process = spec.process
    assert process.args == ("sh", "-c", "true")
    assert process.env_dict() == {"PATH": "/bin", "A": "3"}
    assert (process.user.uid, process.user.gid, process.user.additional_gids) == (
        1000,
        100,
        (10, 20),
    )
    assert process.user.umask == 0o27
    assert process.capabilities == Capabilities(bounding=("CAP_KILL",), effective=("CAP_KILL",))
    assert process.rlimits == (Rlimit("RLIMIT_NOFILE", 1024, 4096),)
    assert process.no_new_privileges and process.oom_score_adj == 100
    assert spec.linux.namespace("pid") is not None and spec.linux.namespace("net") is None


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    spec = with_change("process.futureThing", {"x": 1})
    spec["vm"] = {"hypervisor": {}}
    assert parse(spec).process.args == ("/bin/true",)


def test_missing_capabilities_mean_leave_them_alone() -> None:
    assert parse(BASE).process.capabilities is None
    assert parse(with_change("process.capabilities", {})).process.capabilities == Capabilities()


CRUN_SPEC_KEYS = ["ociVersion", "process", "root", "hostname", "mounts", "linux"]


@pytest.fixture(scope="module")
def crun_spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    crun = shutil.which("crun")
    if crun is None:
        pytest.skip("crun is not installed (apt-get install crun)")
    directory = tmp_path_factory.mktemp("crun-spec")
    subprocess.run([crun, "spec"], cwd=directory, check=True, timeout=30)
    path = directory / "config.json"
    return str(path), json.loads(path.read_text())


def test_crun_spec_loads_unchanged(crun_spec: tuple[str, dict[str, Any]]) -> None:
    path, raw = crun_spec
    spec = load(path)
    process = raw["process"]
    assert spec.oci_version == raw["ociVersion"]
    assert list(spec.process.args) == process["args"]
    assert list(spec.process.env) == process["env"]
    assert spec.process.cwd == process["cwd"]
    assert spec.process.terminal == process["terminal"]
    assert (spec.process.user.uid, spec.process.user.gid) == (
        process["user"]["uid"],
        process["user"]["gid"],
    )
    for name, names in process["capabilities"].items():
        assert list(getattr(spec.process.capabilities, name)) == names
    assert [(r.type, r.hard, r.soft) for r in spec.process.rlimits] == [
        (r["type"], r["hard"], r["soft"]) for r in process["rlimits"]
    ]
    assert spec.process.no_new_privileges == process["noNewPrivileges"]
    assert (spec.root.path, spec.root.readonly) == (raw["root"]["path"], raw["root"]["readonly"])
    assert spec.hostname == raw["hostname"]
    assert [(m.destination, m.type, m.source, list(m.options)) for m in spec.mounts] == [
        (m["destination"], m["type"], m["source"], m.get("options", [])) for m in raw["mounts"]
    ]
    linux = raw["linux"]
    assert [ns.type for ns in spec.linux.namespaces] == [ns["type"] for ns in linux["namespaces"]]
    assert list(spec.linux.masked_paths) == linux["maskedPaths"]
    assert list(spec.linux.readonly_paths) == linux["readonlyPaths"]
    assert spec.linux.resources is not None
    assert [(d.allow, d.access) for d in spec.linux.resources.devices] == [
        (d["allow"], d["access"]) for d in linux["resources"]["devices"]
    ]
    # Every top-level section crun writes is one we read.
    assert sorted(raw) == sorted(CRUN_SPEC_KEYS)
