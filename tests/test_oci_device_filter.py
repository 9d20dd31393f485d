"""linux.resources.devices as a cgroup device program: the rules' meaning (pure, by running
the generated program on requests), its shape, loading it into this host's kernel, and the
verdicts a process in a cgroup2 group gets once it is attached (the host's hybrid hierarchy).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead_agent.oci import device_filter as df
from bulkhead_agent.oci.cgroups import Cgroup
from bulkhead_agent.oci.spec import DeviceRule, parse

DENY_ALL = {"allow": False, "access": "rwm"}
# What docker puts in every spec (moby's oci/defaults.go and its default devices).
DOCKER_RULES = [
    DENY_ALL,
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
    {"allow": False, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
]
STANDARD = {  # (type, major, minor) of the devices every container must be able to use
    "null": ("c", 1, 3),
    "zero": ("c", 1, 5),
    "full": ("c", 1, 7),
    "random": ("c", 1, 8),
    "urandom": ("c", 1, 9),
    "tty": ("c", 5, 0),
    "console": ("c", 5, 1),
    "ptmx": ("c", 5, 2),
    "pts/3": ("c", 136, 3),
}
SDA = ("b", 8, 0)
FUSE = ("c", 10, 229)


def rules(*values: dict[str, Any]) -> tuple[DeviceRule, ...]:
    spec = parse(
        {
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "linux": {"resources": {"devices": list(values)}},
        }
    )
    assert spec.linux.resources is not None
    return spec.linux.resources.devices


def verdict(program: list[df.Insn] | None, device: tuple[str, int, int], access: str) -> bool:
    return True if program is None else df.evaluate(program, *device, access)


# --- meaning ---------------------------------------------------------------------------------


def test_no_rules_no_program() -> None:
    assert df.compile_rules(()) is None


@pytest.mark.parametrize(
    "values",
    [
        [{"allow": True, "access": "rwm"}],
        [DENY_ALL, {"allow": True, "access": "rwm"}],
        [DENY_ALL, {"allow": True, "access": "rwm"}, {"allow": True, "type": "b", "access": "r"}],
    ],
    ids=["allow-all", "deny-then-allow-all", "allow-all-then-more-allows"],
)
def test_nothing_denied_no_program(values: list[dict[str, Any]]) -> None:
    assert df.compile_rules(rules(*values)) is None


def test_a_catch_all_makes_the_rules_before_it_moot() -> None:
    default, kept = df.effective_rules(
        rules({"allow": True, "type": "b", "access": "r"}, DENY_ALL, {"allow": True, "type": "c"})
    )
    assert default is False
    assert kept == [DeviceRule(True, "c", None, None, "rwm")]
    # Not catch-alls: numbers, or less than rwm.
    for partial in ({"allow": False, "access": "rw"}, {"allow": False, "major": 8}):
        assert df.effective_rules(rules(partial))[1] == list(rules(partial))


def test_crun_spec_deny_all_still_gives_the_standard_devices() -> None:
    program = df.compile_rules(rules(DENY_ALL))
    for name, device in STANDARD.items():
        assert verdict(program, device, "rw"), name
    assert not verdict(program, SDA, "r")
    assert not verdict(program, FUSE, "rw")
    # mknod of anything is the runtime's to do (linux.devices); opening it is not
    assert verdict(program, SDA, "m") and verdict(program, FUSE, "m")


def test_docker_rules() -> None:
    program = df.compile_rules(rules(*DOCKER_RULES))
    for name, device in STANDARD.items():
        assert verdict(program, device, "rwm"), name
    assert not verdict(program, SDA, "r")
    assert not verdict(program, FUSE, "r")  # denied again by the last rule
    assert not verdict(program, ("c", 4, 64), "w")  # a serial port: no rule allows it


def test_allow_needs_every_access_asked_for() -> None:
    program = df.compile_rules(
        rules(DENY_ALL, {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "r"})
    )
    assert verdict(program, SDA, "r")
    assert not verdict(program, SDA, "w")
    assert not verdict(program, SDA, "rw")  # an O_RDWR open asks for both
    assert not verdict(program, ("b", 8, 1), "r")
    assert not verdict(program, ("c", 8, 0), "r")  # a char device of the same numbers


def test_deny_refuses_any_access_it_names() -> None:
    program = df.compile_rules(
        rules(
            {"allow": True, "access": "rwm"},
            {"allow": False, "type": "b", "major": 8, "access": "w"},
        )
    )
    assert verdict(program, SDA, "r")
    assert not verdict(program, SDA, "w")
    assert not verdict(program, SDA, "rw")
    assert not verdict(program, ("b", 8, 16), "w")  # any minor
    assert verdict(program, ("b", 7, 0), "rw")  # the default: allow


def test_the_last_matching_rule_decides() -> None:
    sda_rw = {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "rw"}
    no_major_8 = {"allow": False, "type": "b", "major": 8, "access": "rwm"}
    program = df.compile_rules(rules(DENY_ALL, sda_rw, no_major_8))
    assert not verdict(program, SDA, "r")
    program = df.compile_rules(rules(DENY_ALL, no_major_8, sda_rw))
    assert verdict(program, SDA, "r")
    assert not verdict(program, ("b", 8, 1), "r")


def test_type_a_with_numbers_matches_both_types() -> None:
    program = df.compile_rules(
        rules(DENY_ALL, {"allow": True, "type": "a", "major": 42, "access": "r"})
    )
    assert verdict(program, ("c", 42, 1), "r") and verdict(program, ("b", 42, 7), "r")
    assert not verdict(program, ("b", 43, 7), "r")


def test_the_standard_devices_win_over_the_spec() -> None:
    program = df.compile_rules(
        rules(DENY_ALL, {"allow": False, "type": "c", "major": 1, "minor": 3})
    )
    assert verdict(program, STANDARD["null"], "rw")


# --- shape -----------------------------------------------------------------------------------


def _block_lengths(program: list[df.Insn]) -> list[int]:
    """Length of each verdict block (they end with an exit), the final default included."""
    lengths, start = [], len(df.PROLOGUE)
    for index, insn in enumerate(program):
        if insn.code == df.JMP_EXIT:
            lengths.append(index + 1 - start)
            start = index + 1
    return lengths


@pytest.mark.parametrize(
    ("rule", "length"),
    [
        # tests of type, major, minor, then "r0 = verdict; exit"
        ({"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}, 5),
        ({"allow": True, "type": "b", "access": "rwm"}, 3),  # type
        ({"allow": True, "type": "a", "major": 8, "access": "rwm"}, 3),  # major
        ({"allow": True, "type": "c", "major": 8, "minor": 1, "access": "r"}, 6),  # + one JSET
        ({"allow": False, "type": "c", "major": 8, "minor": 1, "access": "w"}, 7),  # + JSET, JA
    ],
)
def test_one_block_per_rule(rule: dict[str, Any], length: int) -> None:
    program = df.compile_rules(rules(DENY_ALL, rule))
    assert program is not None
    assert program[: len(df.PROLOGUE)] == list(df.PROLOGUE)
    lengths = _block_lengths(program)
    # the runtime's devices, the rule, then "r0 = default; exit"
    assert len(lengths) == len(df.RUNTIME_DEVICES) + 2
    assert lengths[len(df.RUNTIME_DEVICES)] == length
    assert lengths[-1] == 2 and program[-2] == df.Insn(df.ALU64_MOV_K, df.R0, imm=0)
    # Every jump lands inside the program, forwards.
    for index, insn in enumerate(program):
        if insn.code in (df.JMP_JNE_K, df.JMP_JSET_K, df.JMP_JA):
            assert 0 < index + 1 + insn.off < len(program)


def test_encoding() -> None:
    program = df.compile_rules(rules(DENY_ALL))
    assert program is not None
    raw = df.encode(program)
    assert len(raw) == 8 * len(program)
    # r2 = *(u32 *)(r1 + 0): code 0x61, dst 2 in the low nibble and src 1 in the high one
    # (little-endian bit-fields), off 0, imm 0
    if os.uname().machine in ("x86_64", "aarch64"):
        assert raw[:8] == bytes([0x61, 0x12, 0, 0, 0, 0, 0, 0])


# --- the kernel ------------------------------------------------------------------------------


def _load_or_skip(program: list[df.Insn]) -> int:
    try:
        return df.load(program)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSYS):
            pytest.skip(f"this host refuses bpf(BPF_PROG_LOAD): {exc}")
        raise


def test_the_program_loads_into_this_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (bpf)")
    program = df.compile_rules(rules(*DOCKER_RULES))
    assert program is not None
    fd = _load_or_skip(program)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog"
    finally:
        os.close(fd)


def test_a_refused_program_says_why() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (bpf)")
    with pytest.raises(OSError) as info:
        _load_or_skip([df.Insn(df.JMP_EXIT)])  # returns r0, which nothing set
    assert info.value.errno == errno.EACCES
    assert "BPF_PROG_LOAD" in str(info.value) and "verifier: " in str(info.value)
    assert "R0" in str(info.value)  # the verifier's own words


HIERARCHIES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


@pytest.fixture
def group() -> Iterator[Cgroup]:
    """A fresh group on the host's cgroup2 hierarchy (its device programs apply on a hybrid
    host too: the kernel asks them before the v1 devices controller)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    found = [h for h in HIERARCHIES if (h / "cgroup.controllers").exists()]
    if not found:
        pytest.skip("no cgroup2 hierarchy on this host")
    cgroup = Cgroup("devices", root=str(found[0] / f"bulkhead-test-dev-{os.getpid()}"))
    yield cgroup
    cgroup.remove()
    os.rmdir(cgroup.root)


def opens(cgroup: Cgroup, path: Path | str, mode: str = "r") -> str:
    """Open ``path`` from a process in ``cgroup``: "ok" or the error's name."""
    flags = {"r": "os.O_RDONLY", "w": "os.O_WRONLY", "rw": "os.O_RDWR"}[mode]
    code = (
        "import os, sys, errno\n"
        f"open({cgroup.file('cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
        f"try:\n    os.close(os.open({str(path)!r}, {flags}))\n    print('ok')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )
    done = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_attached_to_a_group(group: Cgroup, tmp_path: Path) -> None:
    loop = tmp_path / "loop0"  # a block device node of our own: loop0's numbers
    os.mknod(loop, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    group.create(None)
    try:
        group.set_devices(rules(DENY_ALL))
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSYS, errno.EINVAL):
            pytest.skip(f"this host refuses a cgroup device program: {exc}")
        raise
    fd = os.open(group.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = df.attached(fd)
        assert len(first) == 1
        assert opens(group, loop) == "EPERM"
        assert opens(group, "/dev/null", "rw") == "ok"
        assert opens(group, "/dev/urandom") == "ok"
        # An update replaces the program: read allowed now, write not.
        group.set_devices(
            rules(DENY_ALL, {"allow": True, "type": "b", "major": 7, "minor": 0, "access": "r"})
        )
        second = df.attached(fd)
        assert len(second) == 1 and second != first
        assert opens(group, loop) in ("ok", "ENXIO")  # allowed: what loop0 says is its own
        assert opens(group, loop, "w") == "EPERM"
        # Allow-all needs no program: the old one comes off.
        group.set_devices(rules({"allow": True, "access": "rwm"}))
        assert df.attached(fd) == []
        # An update that says nothing about devices keeps them.
        group.set_devices(rules(DENY_ALL))
        group.set_devices(())
        assert len(df.attached(fd)) == 1
    finally:
        os.close(fd)
