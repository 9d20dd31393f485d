"""The OCI hook runner on its own (oci.hooks), in this process: what a hook gets, how its end
is told, and that running one leaves nothing behind. The spawner and the agent are covered in
test_spawner_hooks.py and test_agent_containers_hooks.py.
"""

from __future__ import annotations

import json
import os
import select
from pathlib import Path

import pytest

from bulkhead_agent.oci import hooks
from bulkhead_agent.oci.spec import Hook, parse

STATE = {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "bundle": "/b"}


def sh(text: str, *, env: tuple[str, ...] = (), timeout: int | None = None) -> Hook:
    return Hook("/bin/sh", ("sh", "-c", text), env, timeout)


def test_a_hook_gets_the_state_exactly_its_env_and_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = sh(f"cat > {out}.json; env > {out}.env; pwd > {out}.pwd", env=("A=1", "B=x=y"))
    hooks.run_all("createRuntime", [hook], STATE, cwd=str(tmp_path))
    assert json.loads(Path(f"{out}.json").read_text()) == STATE
    env = dict(line.split("=", 1) for line in Path(f"{out}.env").read_text().splitlines())
    env.pop("PWD", None)  # the shell's own
    assert env == {"A": "1", "B": "x=y"}
    assert Path(f"{out}.pwd").read_text().strip() == str(tmp_path)


@pytest.mark.parametrize(
    ("hook", "errno_", "message"),
    [
        (sh("echo out; echo err >&2; exit 2"), 0, "exited with code 2: out\nerr"),
        (sh("kill -USR1 $$"), 0, "killed by signal 10"),
        (Hook("/no/such"), 2, "cannot run it: No such file or directory"),
        (Hook("/etc/passwd"), 13, "cannot run it: Permission denied"),
    ],
)
def test_how_a_failure_is_told(hook: Hook, errno_: int, message: str) -> None:
    with pytest.raises(hooks.HookError) as info:
        hooks.run_all("poststop", [Hook("/bin/true"), hook], STATE)
    assert info.value.errno == errno_
    assert info.value.strerror == f"poststop hook 1 ({hook.path}): {message}"


def test_a_hook_that_ignores_its_stdin_is_fine() -> None:
    big = {**STATE, "annotations": {"k": "v" * 1_000_000}}  # more than a pipe holds
    hooks.run_all("poststart", [Hook("/bin/true"), sh("exec 0<&-; sleep 0.1")], big)


def test_long_output_is_quoted_by_its_end() -> None:
    with pytest.raises(hooks.HookError) as info:
        hooks.run_all("createRuntime", [sh("seq 1 100000; echo last; exit 1")], STATE)
    text = info.value.strerror or ""
    assert text.endswith("\nlast") and "..." in text, text
    assert len(text) < hooks.OUTPUT_QUOTED + 100


def children() -> set[int]:
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def test_running_hooks_leaves_no_fd_or_process() -> None:
    fds, kids = sorted(os.listdir("/proc/self/fd")), children()
    hooks.run_all("createRuntime", [sh("cat >/dev/null")], STATE)
    with pytest.raises(hooks.HookError):
        hooks.run_all("createRuntime", [sh("sleep 5", timeout=1)], STATE)
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert children() == kids  # every hook reaped (no zombie either)


def test_a_runner_reports_its_verdict_in_one_piece() -> None:
    noisy = sh("head -c 100000 /dev/zero | tr '\\0' '\\351'; exit 1")  # non-ASCII: escaped
    kids = children()
    batches = [("prestart", [Hook("/bin/true")]), ("createRuntime", [noisy])]
    fd = hooks.start_runner(batches, STATE, "/")
    (runner,) = children() - kids
    assert select.select([fd], [], [], 30)[0]
    ok, errno_, message = hooks.read_verdict(fd)
    os.waitpid(runner, 0)
    assert (ok, errno_) == (False, 0)
    assert message.startswith("createRuntime hook 0 (/bin/sh): exited with code 1: ")


def test_hooks_cross_the_protocol_unchanged() -> None:
    spec = parse(
        {
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "hooks": {
                "poststop": [
                    {"path": "/bin/a", "args": ["a", "-x"], "env": ["K=V"], "timeout": 3},
                    {"path": "/bin/b"},
                ]
            },
        }
    )
    todo = hooks.of(spec.hooks, "poststop")
    assert hooks.decode(json.loads(json.dumps(hooks.encode(todo)))) == todo
    bad_ones = (
        [{"path": "relative"}],
        [{"path": "/x", "args": [1]}],
        [{"path": "/x", "timeout": 0}],
        {"path": "/x"},
    )
    for bad in bad_ones:
        with pytest.raises(ValueError):
            hooks.decode(bad)
