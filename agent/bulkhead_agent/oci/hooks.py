"""OCI hooks: programs run at points of a container's life, its state as JSON on their stdin.

Who runs each kind, and where (runtime spec, config.md "POSIX-platform Hooks"):

- ``prestart`` (deprecated) then ``createRuntime``: in the runtime's namespaces, while the
  container's process waits between its mounts and pivot_root (setup step
  ``create_runtime_hooks``). The spawner forks a runner for them (:func:`start_runner`) and
  tells the process the verdict; its own loop goes on serving meanwhile.
- ``createContainer``: right after, by the container's process itself, in the container's
  namespaces; still before pivot_root, so the path resolves in the runtime's file system.
- ``startContainer``: by the container's process once started, just before it execs the
  user's program: in the container (path resolved there), as the process's user.
- ``poststart`` (the program runs) and ``poststop`` (the container is gone): the agent asks
  the spawner (``Spawner.run_hooks``), which forks a runner again.

Never the agent itself: it is multi-threaded, so it must not fork to run Python. Its
subprocess module would be fork-safe (C between fork and exec), but asyncio would wait for
each hook on a thread of its own (DESIGN decision 9), and hooks would inherit the agent's
OOM protection. The spawner is single-threaded and reaps whatever its children leave behind.

Failures: a prestart, createRuntime, createContainer or startContainer hook that fails (exit
status, signal, cannot be executed, timeout) fails the create or the start, with a message
naming the hook; poststart and poststop failures are logged only (runtime spec, lifecycle
steps 9 and 13). A hook still running at its timeout is killed with its process group.
Without a timeout it may run as long as it likes, as the spec has it.

A hook gets exactly the environment the spec gives it (none when ``env`` is absent), stdin
the state, stdout and stderr collected (the end of them is quoted when it fails), all
signals at their defaults and no other fd. Runtime-namespace hooks run in the bundle
directory.

The spawner imports this module before it forks, and it may only use modules loaded by
then: a container's process cannot import anything once its root has moved.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .spec import Hook, Hooks, Spec

# The spec's name of each kind -> its field in spec.Hooks
KINDS = {
    "prestart": "prestart",
    "createRuntime": "create_runtime",
    "createContainer": "create_container",
    "startContainer": "start_container",
    "poststart": "poststart",
    "poststop": "poststop",
}
OUTPUT_QUOTED = 512  # characters of a failed hook's output quoted in the error
_OUTPUT_KEPT = 4096  # bytes kept while reading it
_MAX_FD = 1 << 20
Batch = tuple[str, Sequence[Hook]]  # (kind, hooks), run in order


class HookError(OSError):
    """A hook failed, could not be run or timed out; ``strerror`` names it and says how.

    ``errno`` is the exec error, ETIMEDOUT, or 0 for a hook that ran and failed.
    """


def of(hooks: Hooks, kind: str) -> tuple[Hook, ...]:
    return getattr(hooks, KINDS[kind])


def state(spec: Spec, container_id: str, bundle: str, status: str, pid: int = 0) -> dict[str, Any]:
    """The container's state (runtime spec, runtime.md "State") as hooks get it."""
    result: dict[str, Any] = {
        "ociVersion": spec.oci_version,
        "id": container_id,
        "status": status,
        "bundle": bundle,
        "annotations": dict(spec.annotations),
    }
    if pid:
        result["pid"] = pid
    return result


def encode(hooks: Iterable[Hook]) -> list[dict[str, Any]]:
    """Hooks as JSON objects (the spec's own shape), for the spawner's protocol."""
    result = []
    for hook in hooks:
        value: dict[str, Any] = {"path": hook.path, "args": list(hook.args), "env": list(hook.env)}
        if hook.timeout is not None:
            value["timeout"] = hook.timeout
        result.append(value)
    return result


def decode(value: Any) -> tuple[Hook, ...]:
    """What :func:`encode` made; raises ValueError on anything else."""
    if not isinstance(value, list):
        raise ValueError("must be a list")
    hooks = []
    for item in value:
        if not isinstance(item, dict):
            raise ValueError("each hook must be an object")
        path, args, env = item.get("path"), item.get("args", []), item.get("env", [])
        timeout = item.get("timeout")
        if not (isinstance(path, str) and path.startswith("/")):
            raise ValueError(f"bad path in {item!r}")
        if not (_strings(args) and _strings(env)):
            raise ValueError(f"args and env must be lists of strings in {item!r}")
        if timeout is not None and (not isinstance(timeout, int) or timeout < 1):
            raise ValueError(f"bad timeout {timeout!r}")
        hooks.append(Hook(path, tuple(args), tuple(env), timeout))
    return tuple(hooks)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# --- running hooks (in a single-threaded process) ---------------------------------------------


def run_all(kind: str, hooks: Sequence[Hook], state_: dict[str, Any], cwd: str = "") -> None:
    """Run ``hooks`` in order, ``state_`` on their stdin; the first that fails raises
    :class:`HookError`. Only for a single-threaded caller: it forks."""
    data = json.dumps(state_).encode()
    for index, hook in enumerate(hooks):
        run_one(f"{kind} hook {index} ({hook.path})", hook, data, cwd)


def run_one(name: str, hook: Hook, stdin: bytes, cwd: str = "") -> None:
    """Run one hook to its end (or its timeout) with ``stdin``; raise HookError if it fails.

    ``cwd`` "" keeps ours.
    """
    argv = list(hook.args) or [hook.path]
    env = dict(entry.split("=", 1) for entry in hook.env if "=" in entry)
    deadline = None if hook.timeout is None else time.monotonic() + hook.timeout
    fds: dict[str, int] = {}
    # Ignored while the hook runs: one that exits without reading its stdin must not kill
    # us (a container's process has SIGPIPE at its default) when we write to it.
    old_sigpipe = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    pid = 0
    try:
        fds["stdin_r"], fds["stdin_w"] = os.pipe()
        fds["out_r"], fds["out_w"] = os.pipe()
        fds["report_r"], fds["report_w"] = os.pipe()  # close-on-exec: EOF when exec worked
        pid = os.fork()
        if pid == 0:
            _exec_hook(hook.path, argv, env, cwd, fds["stdin_r"], fds["out_w"], fds["report_w"])
        for key in ("stdin_r", "out_w", "report_w"):
            os.close(fds.pop(key))
        try:
            os.setpgid(pid, pid)  # the child does it too: whichever comes first
        except OSError:
            pass
        report = _read_to_end(fds["report_r"])
        if report:
            os.waitpid(pid, 0)
            pid = 0
            code, _, text = report.decode(errors="replace").partition(":")
            raise HookError(int(code) if code.isdigit() else 0, f"{name}: cannot run it: {text}")
        status, output, timed_out = _wait(pid, fds, stdin, deadline)
        pid = 0
    finally:
        if pid > 0:  # something above failed with the hook running: do not leave it
            _kill(pid)
            os.waitpid(pid, 0)
        for fd in fds.values():
            os.close(fd)
        signal.signal(signal.SIGPIPE, old_sigpipe)
    quoted = _quote(output)
    if timed_out:
        raise HookError(errno.ETIMEDOUT, f"{name}: still running after {hook.timeout} s, killed")
    if os.WIFSIGNALED(status):
        raise HookError(0, f"{name}: killed by signal {os.WTERMSIG(status)}{quoted}")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise HookError(0, f"{name}: exited with code {code}{quoted}")


def _exec_hook(
    path: str, argv: list[str], env: dict[str, str], cwd: str, stdin: int, output: int, report: int
) -> None:
    """In the forked child: the hook's stdio, signals, group and directory, then exec."""
    try:
        # Out of the way of 0, 1 and 2 first: any of ours could be one of them.
        stdin, output, report = (
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (stdin, output, report)
        )
        os.setpgid(0, 0)  # its own group: a timeout kills whatever it started, too
        signal.set_wakeup_fd(-1)
        for signo in signal.valid_signals():
            if signo not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(signo, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass  # the C library's own (32, 33)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.dup2(stdin, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.closerange(3, report)
        os.closerange(report + 1, _MAX_FD)
        if cwd:
            os.chdir(cwd)
        os.execve(path, argv, env)
    except BaseException as exc:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            os.write(report, f"{code}:{text}".encode())
        except BaseException:
            pass
    finally:
        os._exit(127)


def _wait(
    pid: int, fds: dict[str, int], stdin: bytes, deadline: float | None
) -> tuple[int, bytes, bool]:
    """Feed stdin, collect output, until the hook exits or the deadline passes.

    Returns (wait status, the end of the output, timed out). The exit is watched on a pidfd,
    not on the output's EOF: something the hook left running may hold its stdout forever.
    """
    output = bytearray()
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        os.set_blocking(fds["out_r"], False)
        poller.register(fds["out_r"], select.POLLIN)
        pending = memoryview(stdin)
        os.set_blocking(fds["stdin_w"], False)
        poller.register(fds["stdin_w"], select.POLLOUT)
        exited = False
        while not exited:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            events = poller.poll(timeout)
            if not events and deadline is not None and time.monotonic() >= deadline:
                _kill(pid)
                _, status = os.waitpid(pid, 0)
                return status, bytes(output), True
            for fd, _mask in events:
                if fd == pidfd:
                    exited = True
                elif fd == fds.get("stdin_w"):
                    try:
                        pending = pending[os.write(fd, pending) :]
                    except BlockingIOError:
                        continue
                    except OSError:
                        pending = pending[:0]  # it closed its stdin: it has what it wanted
                    if not pending:
                        poller.unregister(fd)
                        os.close(fds.pop("stdin_w"))  # EOF: the whole state is there
                elif fd == fds["out_r"] and not _read_some(fd, output):
                    poller.unregister(fd)
        while _read_some(fds["out_r"], output):  # what it wrote just before it exited
            pass
        _, status = os.waitpid(pid, 0)
        return status, bytes(output), False
    finally:
        os.close(pidfd)


def _read_some(fd: int, output: bytearray) -> bool:
    """Read what is there into ``output`` (its last bytes only); False at EOF or when empty."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return False
    output += chunk
    del output[:-_OUTPUT_KEPT]
    return bool(chunk)


def _read_to_end(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _quote(output: bytes) -> str:
    text = output.decode(errors="replace").strip()
    if not text:
        return ""
    if len(text) > OUTPUT_QUOTED:
        text = "..." + text[-OUTPUT_QUOTED:]
    return f": {text}"


# --- the spawner's runner -------------------------------------------------------------------


def start_runner(batches: Sequence[Batch], state_: dict[str, Any], cwd: str) -> int:
    """Fork a process that runs ``batches`` in order; returns the fd its verdict comes on.

    For the spawner, whose loop must go on serving meanwhile: it watches the fd and, once
    readable, calls :func:`read_verdict`. The runner is an ordinary child of the spawner,
    which reaps it like any other.
    """
    verdict_r, verdict_w = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        os.close(verdict_r)
        os.close(verdict_w)
        raise
    if pid == 0:
        code = 0
        try:
            _become_runner(verdict_w)
            try:
                for kind, hooks in batches:
                    run_all(kind, hooks, state_, cwd)
                verdict: dict[str, Any] = {"ok": True}
            except HookError as exc:
                verdict = {"ok": False, "errno": exc.errno or 0, "message": exc.strerror}
            except Exception as exc:
                verdict = {"ok": False, "errno": 0, "message": f"{type(exc).__name__}: {exc}"}
            os.write(verdict_w, _verdict_bytes(verdict))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(verdict_w)
    return verdict_r


def _verdict_bytes(verdict: dict[str, Any]) -> bytes:
    """At most PIPE_BUF (4096) bytes, which one write() delivers whole: the message shrinks."""
    message = str(verdict.get("message", ""))
    while True:
        data = json.dumps({**verdict, "message": message}).encode()
        if len(data) <= 4096:
            return data
        message = "..." + message[len(message) // 4 :]


def _become_runner(keep: int) -> None:
    """Drop everything of the spawner's but ``keep``: its sockets, pipes, other processes'
    stdio (a write end held here would keep a reader from its EOF), its signal handling."""
    signal.set_wakeup_fd(-1)
    for signo in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(signo, signal.SIG_DFL)
    os.closerange(3, keep)
    os.closerange(keep + 1, _MAX_FD)
    try:
        # The agent protects itself from the OOM killer (and the spawner inherited that);
        # hooks are no part of it. Raising one's own score needs no privilege.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")
    except OSError:
        pass


def read_verdict(fd: int) -> tuple[bool, int, str]:
    """(ok, errno, message) from a runner's fd, which is closed; call once it is readable."""
    try:
        raw = os.read(fd, 8192)
    except OSError as exc:
        raw = b""
        reason = str(exc)
    else:
        reason = "it ended without a verdict"
    finally:
        os.close(fd)
    try:
        verdict = json.loads(raw) if raw else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        return False, 0, f"the hook runner failed: {reason}"
    return bool(verdict.get("ok")), int(verdict.get("errno") or 0), str(verdict.get("message", ""))
