"""``linux.seccomp`` turned into a loaded filter, through libseccomp's Python bindings.

The bindings (Debian's ``python3-seccomp``, module ``seccomp``) are imported only when a spec
has a seccomp section: most containers in the guest never pay for them.
"""

from __future__ import annotations

import errno
from typing import Any

from .spec import Seccomp

_OPERATORS = {
    "SCMP_CMP_NE": "NE",
    "SCMP_CMP_LT": "LT",
    "SCMP_CMP_LE": "LE",
    "SCMP_CMP_EQ": "EQ",
    "SCMP_CMP_GE": "GE",
    "SCMP_CMP_GT": "GT",
    "SCMP_CMP_MASKED_EQ": "MASKED_EQ",
}


def bindings() -> Any:
    """The ``seccomp`` module; import it before a fork so children find it loaded.

    (A container's child cannot import anything once its root has been switched.)
    """
    try:
        import seccomp
    except ImportError as exc:
        raise OSError(
            errno.ENOSYS, f"linux.seccomp is set but libseccomp's Python module is missing: {exc}"
        ) from None
    return seccomp


def _action(lib: Any, name: str, errno_ret: int | None) -> Any:
    if name == "SCMP_ACT_ERRNO":
        return lib.ERRNO(errno.EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_TRACE":
        return lib.TRACE(errno.EPERM if errno_ret is None else errno_ret)
    simple = {
        "SCMP_ACT_ALLOW": "ALLOW",
        "SCMP_ACT_KILL": "KILL",
        "SCMP_ACT_KILL_THREAD": "KILL",
        "SCMP_ACT_KILL_PROCESS": "KILL_PROCESS",
        "SCMP_ACT_TRAP": "TRAP",
        "SCMP_ACT_LOG": "LOG",
    }
    if name not in simple:
        raise OSError(errno.EINVAL, f"seccomp action {name} is not supported")
    return getattr(lib, simple[name])


def build_filter(profile: Seccomp) -> Any:
    """A ``seccomp.SyscallFilter`` for ``profile``, not yet loaded.

    Syscalls the library does not know on this architecture are skipped, as other runtimes
    do, so one profile serves several kernels; rules whose action is the default are
    redundant (and refused by libseccomp) and skipped too.
    """
    lib = bindings()
    default = _action(lib, profile.default_action, profile.default_errno_ret)
    result = lib.SyscallFilter(default)
    # libseccomp would set no_new_privs itself on load; the spec decides that, not the filter.
    result.set_attr(lib.Attr.CTL_NNP, 0)
    if "SECCOMP_FILTER_FLAG_TSYNC" in profile.flags:
        result.set_attr(lib.Attr.CTL_TSYNC, 1)
    if "SECCOMP_FILTER_FLAG_LOG" in profile.flags:
        result.set_attr(lib.Attr.CTL_LOG, 1)
    if "SECCOMP_FILTER_FLAG_SPEC_ALLOW" in profile.flags:
        result.set_attr(lib.Attr.CTL_SSB, 1)
    for arch in profile.architectures:
        lib_arch = getattr(lib.Arch, arch.removeprefix("SCMP_ARCH_"), None)
        if lib_arch is None:
            raise OSError(errno.EINVAL, f"seccomp architecture {arch} is not known to libseccomp")
        try:
            result.add_arch(lib_arch)
        except RuntimeError:
            pass  # already present (the native architecture always is)
    for rule in profile.syscalls:
        action = _action(lib, rule.action, rule.errno_ret)
        if rule.action == profile.default_action and rule.errno_ret == profile.default_errno_ret:
            continue
        args = [
            lib.Arg(arg.index, getattr(lib, _OPERATORS[arg.op]), arg.value, arg.value_two)
            for arg in rule.args
        ]
        for name in rule.names:
            if lib.resolve_syscall(lib.Arch.NATIVE, name) == -1:
                continue  # unknown here (-1 is libseccomp's __NR_SCMP_ERROR)
            try:
                result.add_rule(action, name, *args)
            except RuntimeError as exc:
                raise OSError(errno.EINVAL, f"seccomp rule for {name}: {exc}") from None
    return result


def load(profile: Seccomp) -> None:
    """Install ``profile`` on this process (inherited by everything it execs)."""
    build_filter(profile).load()
