"""The host's OCI spec builder, size and user parsing, and the CLI's argument handling."""

from __future__ import annotations

import json

import pytest

from bulkhead import cli_containers
from bulkhead.cli import _parser
from bulkhead.errors import SpecError
from bulkhead.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    dumps,
    make_exec_process,
    make_resources,
    make_spec,
    parse_size,
    parse_user,
)
from bulkhead_agent.oci import cgroups as agent_cgroups
from bulkhead_agent.oci import spec as agent_spec


def test_a_default_spec_is_valid_json_the_guest_accepts() -> None:
    spec = make_spec(["sh", "-c", "echo hi"])
    text = dumps(spec)
    assert json.loads(text) == spec
    parsed = agent_spec.loads(text)  # the guest agent's own validation
    assert parsed.process.args == ("sh", "-c", "echo hi")
    assert parsed.process.cwd == "/"
    assert (parsed.process.user.uid, parsed.process.user.gid) == (0, 0)
    assert parsed.root == agent_spec.Root("rootfs", False)
    assert parsed.oci_version.startswith("1.")


def test_namespaces_share_the_sandbox_network() -> None:
    spec = make_spec(["true"])
    types = [ns["type"] for ns in spec["linux"]["namespaces"]]
    assert sorted(types) == ["cgroup", "ipc", "mount", "pid", "uts"]
    assert "network" not in types and "user" not in types
    assert all("path" not in ns for ns in spec["linux"]["namespaces"])


def test_default_mounts_env_and_capabilities() -> None:
    spec = make_spec(["true"])
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert set(mounts) == {
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    }
    assert mounts["/proc"]["type"] == "proc"
    assert "ro" in mounts["/sys"]["options"]
    assert "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert "newinstance" in mounts["/dev/pts"]["options"]
    process = spec["process"]
    assert f"PATH={DEFAULT_PATH}" in process["env"]
    assert "HOME=/root" in process["env"]
    caps = process["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps["bounding"]
    assert len(DEFAULT_CAPABILITIES) == 14
    assert "inheritable" not in caps and "ambient" not in caps
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert "/proc/sys" in spec["linux"]["readonlyPaths"]
    # only the device rule docker sets: everything but the standard devices is refused
    assert spec["linux"]["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    assert "hostname" not in spec


def test_options_land_where_the_runtime_reads_them() -> None:
    spec = make_spec(
        ["top"],
        env=["A=1", "PATH=/bin"],
        cwd="/tmp",
        user="1000:100",
        terminal=True,
        console_size=(40, 120),
        hostname="web",
        memory_limit="64m",
        cpus_limit=0.5,
        pids_limit=20,
        readonly_rootfs=True,
        rootfs="/srv/alpine",
    )
    parsed = agent_spec.loads(dumps(spec))
    env = parsed.process.env_dict()
    assert env["A"] == "1"
    assert env["PATH"] == "/bin"  # the caller's wins over the default
    assert env["TERM"] == "xterm"
    assert env["HOME"] == "/"
    assert parsed.process.cwd == "/tmp"
    assert (parsed.process.user.uid, parsed.process.user.gid) == (1000, 100)
    assert parsed.process.terminal is True
    assert parsed.process.console_size == (40, 120)
    assert parsed.hostname == "web"
    assert parsed.root == agent_spec.Root("/srv/alpine", True)
    res = parsed.linux.resources
    assert res is not None
    assert res.memory is not None and res.memory.limit == 64 * 2**20
    assert res.cpu is not None and (res.cpu.quota, res.cpu.period) == (50_000, 100_000)
    assert res.pids_limit == 20
    # And as cgroup v2 files, the way the guest writes them:
    files = agent_cgroups.resources_to_v2(res)
    assert files["memory.max"] == str(64 * 2**20)
    assert files["cpu.max"] == "50000 100000"
    assert files["pids.max"] == "20"


def test_env_as_a_mapping() -> None:
    spec = make_spec(["env"], env={"B": "2", "EMPTY": ""})
    assert "B=2" in spec["process"]["env"]
    assert "EMPTY=" in spec["process"]["env"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"args": []}, "non-empty"),
        ({"args": "sh -c true"}, "not the string"),
        ({"args": ["x"], "env": ["NOEQUALS"]}, "KEY=VALUE"),
        ({"args": ["x"], "cwd": "tmp"}, "absolute"),
        ({"args": ["x"], "user": "nobody"}, "numbers"),
        ({"args": ["x"], "memory_limit": "lots"}, "not a size"),
        ({"args": ["x"], "cpus_limit": 0}, "more than 0"),
        ({"args": ["x"], "pids_limit": 0}, "at least 1"),
        ({"args": ["x"], "rootfs": "relative/dir"}, "absolute"),
    ],
)
def test_bad_options_are_refused_with_the_reason(kwargs: dict, match: str) -> None:
    args = kwargs.pop("args")
    with pytest.raises(SpecError, match=match):
        make_spec(args, **kwargs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64m", 64 * 2**20),
        ("64M", 64 * 2**20),
        ("64mb", 64 * 2**20),
        ("64MiB", 64 * 2**20),
        ("1g", 2**30),
        ("1.5g", 3 * 2**29),
        ("512k", 512 * 1024),
        ("4096", 4096),
        ("100b", 100),
        (12345, 12345),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "m", "-1m", "0", "64x", "1e6", "six"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(SpecError):
        parse_size(text)


def test_parse_user() -> None:
    assert parse_user(None) == (0, 0)
    assert parse_user("root") == (0, 0)
    assert parse_user("1000") == (1000, 1000)
    assert parse_user("1000:50") == (1000, 50)
    assert parse_user(7) == (7, 7)
    for bad in ("alice", "1000:staff", "-1", "1:2:3"):
        with pytest.raises(SpecError):
            parse_user(bad)


def test_an_exec_process_carries_only_what_is_given() -> None:
    assert make_exec_process(["ps"]) == {"args": ["ps"], "terminal": False}
    full = make_exec_process(["sh"], env=["A=1"], cwd="/tmp", user="5:6", terminal=True)
    assert full == {
        "args": ["sh"],
        "terminal": True,
        "env": [f"PATH={DEFAULT_PATH}", "A=1"],
        "cwd": "/tmp",
        "user": {"uid": 5, "gid": 6},
    }


def test_resources_for_update() -> None:
    assert make_resources() == {}
    assert make_resources(memory_limit=2**20, pids_limit=5) == {
        "memory": {"limit": 2**20},
        "pids": {"limit": 5},
    }
    # The kernel refuses quotas under 1 ms.
    assert make_resources(cpus_limit=0.001)["cpu"]["quota"] == 1000


# -- the CLI's command line --


def parse(*argv: str):
    return cli_containers.parse_args(_parser, list(argv))


def test_run_command_after_double_dash() -> None:
    args = parse("run", "-i", "--rm", "-e", "A=1", "-e", "B=2", "--", "sh", "-c", "echo -n hi")
    assert args.command == ["sh", "-c", "echo -n hi"]
    assert args.interactive and args.rm and not args.tty
    assert args.env == ["A=1", "B=2"]
    assert args.error_status == 125


def test_run_command_without_double_dash_starts_at_the_first_word() -> None:
    args = parse("run", "-t", "sh", "-c", "ls -l")
    assert args.command == ["sh", "-c", "ls -l"]
    assert args.tty


def test_a_double_dash_inside_the_command_is_kept() -> None:
    assert parse("run", "--", "sh", "-c", "x", "--", "y").command == ["sh", "-c", "x", "--", "y"]
    assert parse("run", "sh", "-c", "x", "--", "y").command == ["sh", "-c", "x", "--", "y"]
    assert parse("run", "--", "--", "x").command == ["--", "x"]


def test_exec_options_may_follow_the_positionals_before_double_dash() -> None:
    args = parse("exec", "sb", "web", "-i", "-t", "-w", "/tmp", "--", "ls", "-l")
    assert (args.sandbox, args.container, args.command) == ("sb", "web", ["ls", "-l"])
    assert args.interactive and args.tty and args.workdir == "/tmp"
    args = parse("exec", "-u", "1000", "sb", "web", "id", "-u")
    assert args.command == ["id", "-u"] and args.user == "1000"


def test_limits_are_parsed_by_the_cli() -> None:
    args = parse(
        "--state-dir",
        "/tmp/x",
        "run",
        "--memory-limit",
        "64m",
        "--cpus-limit",
        "0.5",
        "--pids-limit",
        "20",
        "--sandbox",
        "sb",
        "--name",
        "c1",
        "--",
        "true",
    )
    assert (args.memory_limit, args.cpus_limit, args.pids_limit) == (64 * 2**20, 0.5, 20)
    assert (args.sandbox, args.name, str(args.state_dir)) == ("sb", "c1", "/tmp/x")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--memory-limit", "lots", "--", "true"],
        ["run", "--cpus-limit", "-1", "--", "true"],
        ["run", "--pids-limit", "0", "--", "true"],
        ["kill", "sb", "c", "-s", "SIGNOPE"],
    ],
)
def test_bad_cli_values_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2


def test_signals_by_name_or_number() -> None:
    assert parse("kill", "sb", "c").signal == 9
    assert parse("kill", "sb", "c", "-s", "TERM").signal == 15
    assert parse("kill", "sb", "c", "-s", "sigint").signal == 2
    assert parse("kill", "sb", "c", "--signal", "10", "--all").signal == 10


def test_other_commands_parse() -> None:
    assert parse("ps", "sb", "--json").json
    assert parse("ps", "sb", "web").container == "web"
    assert parse("rm", "sb", "a", "b", "-f").containers == ["a", "b"]
    assert parse("stats", "sb", "--no-stream").no_stream
    assert parse("pause", "sb", "web").func is cli_containers.cmd_pause
    assert getattr(parse("ps", "sb"), "error_status", 1) == 1
