"""The ctypes wrappers raise OSError with the errno and a message naming call and arguments."""

from __future__ import annotations

import errno
import os
import time

import pytest

from bulkhead_agent.linux import mounts, namespaces, prctl
from bulkhead_agent.linux.users import setgroups
from bulkhead_agent.linux.uts import sethostname


def test_setns_on_a_bad_fd() -> None:
    with pytest.raises(OSError) as info:
        namespaces.setns(-1, namespaces.CLONE_NEWNS)
    assert info.value.errno == errno.EBADF
    assert "setns(-1, CLONE_NEWNS)" in str(info.value)


def test_unshare_with_a_bad_flag() -> None:
    with pytest.raises(OSError) as info:
        namespaces.unshare(0x1)  # not an unshare flag
    assert info.value.errno == errno.EINVAL
    assert "unshare(0x1)" in str(info.value)


def test_umount_of_something_not_mounted(tmp_path) -> None:
    with pytest.raises(OSError) as info:
        mounts.umount2(str(tmp_path / "nothing"), mounts.MNT_DETACH)
    assert info.value.errno in (errno.ENOENT, errno.EINVAL, errno.EPERM)
    assert f"umount2('{tmp_path}/nothing', 0x2)" in str(info.value)


def test_mount_names_all_arguments(tmp_path) -> None:
    with pytest.raises(OSError) as info:
        mounts.mount("none", str(tmp_path / "missing"), "nosuchfs", mounts.MS_NOSUID, "a=b")
    assert info.value.errno in (errno.ENODEV, errno.ENOENT, errno.EPERM)
    assert f"mount('none', '{tmp_path}/missing', 'nosuchfs', MS_NOSUID, 'a=b')" in str(info.value)


def test_pivot_root_error_names_its_arguments(tmp_path) -> None:
    with pytest.raises(OSError) as info:
        mounts.pivot_root(str(tmp_path / "a"), str(tmp_path / "b"))
    assert "pivot_root(" in str(info.value)


def test_prctl_round_trip_in_a_child() -> None:
    # no_new_privs cannot be undone: try it in a child.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            before = prctl.get_no_new_privs()
            prctl.set_no_new_privs()
            os.write(write, f"{int(before)}{int(prctl.get_no_new_privs())}".encode())
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 2) == b"01"
    os.close(read)
    os.waitpid(pid, 0)


def test_subreaper_adopts_orphaned_grandchildren() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            prctl.set_child_subreaper(True)
            middle = os.fork()
            if middle == 0:
                middle = os.getpid()
                if os.fork() == 0:
                    # Wait (bounded) for the middle process to die, then say who adopted us.
                    deadline = time.monotonic() + 5
                    while os.getppid() == middle and time.monotonic() < deadline:
                        time.sleep(0.001)
                    os.write(write, str(os.getppid()).encode())
                os._exit(0)
            os.waitpid(middle, 0)
            os.close(write)
            adopted = int(os.read(read, 32))
            os.wait()  # the grandchild is ours to reap
            code = 0 if adopted == os.getpid() else 2
        finally:
            os._exit(code)
    os.close(write)
    os.close(read)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root may set groups and hostnames")
def test_privileged_calls_fail_cleanly_without_root() -> None:
    with pytest.raises(OSError) as info:
        setgroups([1, 2])
    assert info.value.errno == errno.EPERM and "setgroups([1, 2])" in str(info.value)
    with pytest.raises(OSError) as info:
        sethostname("x")
    assert "sethostname('x')" in str(info.value)
