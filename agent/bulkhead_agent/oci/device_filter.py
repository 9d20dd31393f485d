"""``linux.resources.devices`` as a cgroup v2 device program: compiled to eBPF, loaded with
bpf(2) and attached to the container's cgroup before its process runs.

cgroup v2 has no devices.allow file: the kernel asks a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program
attached to the group (and to each ancestor) on every mknod and every open of a device node;
0 means EPERM. The program here is generated from the rule list:

- The list is an allowlist, as runc and crun read it: what no rule allows is denied. A
  catch-all rule (type ``a``, no major or minor, access ``rwm``) sets the default instead
  and makes every rule before it moot; docker and ``crun spec`` start with a deny-all one.
- Of the rules after it, the last that matches a request decides (they apply in order, each
  over the ones before). An allow rule matches a request whose every access it grants (an
  ``rw`` open needs both), a deny rule one that asks for any access it names: as cgroup v1
  treats its exceptions, so that "deny w" refuses a read-write open too.
- The devices every container is given (null, zero, full, random, urandom, tty, console,
  ptmx, the pty slaves, tun; mknod of any node) stay allowed whatever the list says, as
  runc and crun do: the runtime spec requires them.
- No rules at all: no program, the container's devices are not restricted (as before this
  existed; the VM is the boundary).

The program only reads its context and never calls a helper, so the kernel's licence check
(which only guards GPL-only helpers) does not apply; it still wants a licence string.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..linux.libc import check, libc, syscall_number
from .spec import DeviceRule

# <linux/bpf.h>
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # attach type
BPF_F_ALLOW_MULTI = 2
# struct bpf_cgroup_dev_ctx: access_type (access << 16 | type), major, minor; all u32
BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE = 1, 2, 4
BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR = 1, 2
ACCESS_BITS = {"m": BPF_DEVCG_ACC_MKNOD, "r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE}
ALL_ACCESS = 7
TYPE_BITS = {"b": BPF_DEVCG_DEV_BLOCK, "c": BPF_DEVCG_DEV_CHAR}

# Opcodes (class | op | source) of the few instructions used.
LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: dst &= imm (32 bit)
ALU_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K: dst >>= imm (32 bit)
ALU64_MOV_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
JMP_JA = 0x05  # BPF_JMP | BPF_JA: pc += off
JMP_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K: if dst != imm: pc += off
JMP_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K: if dst & imm: pc += off
JMP_EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0
R0, R1, R2, R3, R4, R5 = range(6)
# Registers the prologue fills from the context (R1).
TYPE_REG, ACCESS_REG, MAJOR_REG, MINOR_REG = R2, R3, R4, R5

LICENSE = b"GPL"
PROGRAM_NAME = b"bulkhead_dev"  # what bpftool shows (at most 15 bytes)
LOG_SIZE = 1 << 16
ATTR_SIZE = 128  # of union bpf_attr we fill; the kernel takes any size, zeros beyond ours

# Always allowed once there is a program: the runtime spec's default devices (the pty
# slaves are major 136), tun as runc and crun add it, and mknod of any node (opening one
# still needs a rule of its own): the runtime's own mknod of linux.devices happens after
# the process joined the group.
RUNTIME_DEVICES = (
    DeviceRule(True, "c", None, None, "m"),
    DeviceRule(True, "b", None, None, "m"),
    DeviceRule(True, "c", 1, 3, "rwm"),  # null
    DeviceRule(True, "c", 1, 5, "rwm"),  # zero
    DeviceRule(True, "c", 1, 7, "rwm"),  # full
    DeviceRule(True, "c", 1, 8, "rwm"),  # random
    DeviceRule(True, "c", 1, 9, "rwm"),  # urandom
    DeviceRule(True, "c", 5, 0, "rwm"),  # tty
    DeviceRule(True, "c", 5, 1, "rwm"),  # console
    DeviceRule(True, "c", 5, 2, "rwm"),  # ptmx
    DeviceRule(True, "c", 136, None, "rwm"),  # pts/*
    DeviceRule(True, "c", 10, 200, "rwm"),  # net/tun
)


class Insn(NamedTuple):
    """One eBPF instruction (struct bpf_insn)."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0


# --- rules -> program (pure) ---------------------------------------------------------------


def _access(rule: DeviceRule) -> int:
    bits = 0
    for letter in rule.access:
        bits |= ACCESS_BITS[letter]
    return bits


def is_catch_all(rule: DeviceRule) -> bool:
    """Type ``a``, any major and minor, ``rwm``: matches every request there is."""
    wildcard = rule.major is None and rule.minor is None
    return rule.type == "a" and wildcard and _access(rule) == ALL_ACCESS


def effective_rules(rules: Sequence[DeviceRule]) -> tuple[bool, list[DeviceRule]]:
    """(default allow?, the rules that still matter, in the order given).

    Everything up to the last catch-all rule is moot: that rule matches every request.
    """
    default_allow = False
    kept: list[DeviceRule] = []
    for rule in rules:
        if is_catch_all(rule):
            default_allow = rule.allow
            kept = []
        else:
            kept.append(rule)
    return default_allow, kept


def _block(rule: DeviceRule) -> list[Insn]:
    """Instructions that return the rule's verdict when it matches, else fall through."""
    # Each test is a jump to the end of the block; the offsets are filled in below, once
    # the block's length is known (None: "to the end").
    tests: list[tuple[int, int, int | None, int]] = []  # (code, dst, off, imm)
    if rule.type in TYPE_BITS:
        tests.append((JMP_JNE_K, TYPE_REG, None, TYPE_BITS[rule.type]))
    if rule.major is not None:
        tests.append((JMP_JNE_K, MAJOR_REG, None, rule.major))
    if rule.minor is not None:
        tests.append((JMP_JNE_K, MINOR_REG, None, rule.minor))
    access = _access(rule)
    if access != ALL_ACCESS:
        if rule.allow:
            # Every access asked for must be granted: skip if any other bit is set.
            tests.append((JMP_JSET_K, ACCESS_REG, None, ALL_ACCESS & ~access))
        else:
            # Any access named is refused: skip unless one of them is asked for.
            tests.append((JMP_JSET_K, ACCESS_REG, 1, access))
            tests.append((JMP_JA, 0, None, 0))
    length = len(tests) + 2
    block = [
        Insn(code, dst, off=(length - i - 1) if off is None else off, imm=imm)
        for i, (code, dst, off, imm) in enumerate(tests)
    ]
    block.append(Insn(ALU64_MOV_K, R0, imm=1 if rule.allow else 0))
    block.append(Insn(JMP_EXIT))
    return block


PROLOGUE = (
    Insn(LDX_MEM_W, TYPE_REG, R1, off=0),
    Insn(ALU_AND_K, TYPE_REG, imm=0xFFFF),
    Insn(LDX_MEM_W, ACCESS_REG, R1, off=0),
    Insn(ALU_RSH_K, ACCESS_REG, imm=16),
    Insn(LDX_MEM_W, MAJOR_REG, R1, off=4),
    Insn(LDX_MEM_W, MINOR_REG, R1, off=8),
)


def compile_rules(rules: Sequence[DeviceRule]) -> list[Insn] | None:
    """The device program for ``rules``; None when it would allow everything anyway."""
    if not rules:
        return None
    default_allow, kept = effective_rules(rules)
    if default_allow and all(rule.allow for rule in kept):
        return None
    program = list(PROLOGUE)
    # First match wins in the program: the runtime's devices first, then the spec's rules
    # from the last to the first (the last matching one decides), then the default.
    for rule in (*RUNTIME_DEVICES, *reversed(kept)):
        program.extend(_block(rule))
    program.append(Insn(ALU64_MOV_K, R0, imm=1 if default_allow else 0))
    program.append(Insn(JMP_EXIT))
    return program


def encode(program: Iterable[Insn]) -> bytes:
    """struct bpf_insn[]: code, dst_reg:4 + src_reg:4 (bit-field order follows the byte
    order), s16 off, s32 imm, in the machine's byte order."""
    little = sys.byteorder == "little"
    out = bytearray()
    for insn in program:
        regs = (insn.src << 4 | insn.dst) if little else (insn.dst << 4 | insn.src)
        out += struct.pack("=BBhi", insn.code, regs, insn.off, insn.imm)
    return bytes(out)


def evaluate(program: Sequence[Insn], dev_type: str, major: int, minor: int, access: str) -> bool:
    """Run ``program`` on one request, as the kernel would (the subset of eBPF used here).

    For tests and for explaining a verdict; the kernel runs the real thing.
    """
    access_bits = sum(ACCESS_BITS[letter] for letter in set(access))
    ctx = (access_bits << 16 | TYPE_BITS[dev_type], major, minor)
    regs = [0] * 11
    pc = 0
    while True:
        insn = program[pc]
        pc += 1
        if insn.code == LDX_MEM_W:
            regs[insn.dst] = ctx[insn.off // 4]
        elif insn.code == ALU_AND_K:
            regs[insn.dst] &= insn.imm
        elif insn.code == ALU_RSH_K:
            regs[insn.dst] >>= insn.imm
        elif insn.code == ALU64_MOV_K:
            regs[insn.dst] = insn.imm
        elif insn.code == JMP_JA:
            pc += insn.off
        elif insn.code == JMP_JNE_K:
            if regs[insn.dst] != insn.imm:
                pc += insn.off
        elif insn.code == JMP_JSET_K:
            if regs[insn.dst] & insn.imm:
                pc += insn.off
        elif insn.code == JMP_EXIT:
            return regs[R0] != 0
        else:
            raise ValueError(f"opcode {insn.code:#x} is not one of ours")


# --- the kernel ------------------------------------------------------------------------------


def _bpf(command: int, attr: bytearray, what: str) -> int:
    import ctypes

    buffer = (ctypes.c_char * len(attr)).from_buffer(attr)
    result = libc().syscall(
        ctypes.c_long(syscall_number("bpf")),
        ctypes.c_long(command),
        ctypes.byref(buffer),
        ctypes.c_uint(len(attr)),
    )
    return check(result, f"bpf({what})")


def load(program: Sequence[Insn]) -> int:
    """Load ``program``; returns its fd. A refusal comes with the verifier's log."""
    import ctypes

    code = ctypes.create_string_buffer(encode(program))
    license_ = ctypes.create_string_buffer(LICENSE)

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = bytearray(ATTR_SIZE)
        struct.pack_into(
            "=IIQQ",
            attr,
            0,
            BPF_PROG_TYPE_CGROUP_DEVICE,
            len(program),
            ctypes.addressof(code),
            ctypes.addressof(license_),
        )
        if log is not None:
            struct.pack_into("=IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
        attr[48 : 48 + len(PROGRAM_NAME)] = PROGRAM_NAME  # prog_name
        return _bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")

    try:
        return attempt(None)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES, errno.E2BIG):
            raise
    # Again with the verifier's log, to say why (the first try skips it: it costs).
    log = ctypes.create_string_buffer(LOG_SIZE)
    try:
        return attempt(log)
    except OSError as exc:
        text = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}; verifier: {text or '(no log)'}") from None


def attached(cgroup_fd: int) -> list[int]:
    """Ids of the device programs attached to the group itself (not its ancestors')."""
    import ctypes

    size = 64
    while True:
        ids = (ctypes.c_uint32 * size)()
        attr = bytearray(ATTR_SIZE)
        struct.pack_into("=IIII", attr, 0, cgroup_fd, BPF_CGROUP_DEVICE, 0, 0)
        struct.pack_into("=QI", attr, 16, ctypes.addressof(ids), size)
        try:
            _bpf(BPF_PROG_QUERY, attr, "BPF_PROG_QUERY")
        except OSError as exc:
            if exc.errno == errno.ENOSPC and size < 1 << 16:
                size *= 4
                continue
            raise
        count = struct.unpack_from("=I", attr, 24)[0]
        return list(ids[:count])


def attach(cgroup_fd: int, program_fd: int) -> None:
    attr = bytearray(ATTR_SIZE)
    # ALLOW_MULTI, as runc and crun: a group may hold several programs (all must allow), so
    # a new one can go on before the old one comes off.
    struct.pack_into("=IIII", attr, 0, cgroup_fd, program_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
    _bpf(BPF_PROG_ATTACH, attr, "BPF_PROG_ATTACH")


def detach(cgroup_fd: int, program_id: int) -> None:
    """Take program ``program_id`` off the group; gone already is fine."""
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=I", attr, 0, program_id)
    try:
        program_fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr, "BPF_PROG_GET_FD_BY_ID")
    except FileNotFoundError:
        return
    try:
        attr = bytearray(ATTR_SIZE)
        struct.pack_into("=III", attr, 0, cgroup_fd, program_fd, BPF_CGROUP_DEVICE)
        try:
            _bpf(BPF_PROG_DETACH, attr, "BPF_PROG_DETACH")
        except FileNotFoundError:
            pass
    finally:
        os.close(program_fd)


def apply(cgroup_dir: str, rules: Sequence[DeviceRule]) -> None:
    """Make ``rules`` the device rules of the group at ``cgroup_dir``, replacing earlier ones.

    The new program goes on before the old ones come off: in between both apply (a request
    needs every program's yes), so there is no moment with neither. Its fd is closed once
    attached: the group holds the program until it is removed.
    """
    program = compile_rules(rules)
    where = "linux.resources.devices"
    group = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            old = attached(group)
            if program is not None:
                program_fd = load(program)
                try:
                    attach(group, program_fd)
                finally:
                    os.close(program_fd)
            for program_id in old:
                detach(group, program_id)
        except OSError as exc:
            raise OSError(exc.errno, f"{where}: {exc.strerror}") from None
    finally:
        os.close(group)
