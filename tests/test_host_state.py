"""Sandbox state on disk: listing, liveness, dead-sandbox cleanup, and the CLI's errors."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bulkhead import ImageNotFound, Sandbox, SandboxError, SandboxExists, SandboxNotFound
from bulkhead.cli import main
from bulkhead.state import SandboxPaths, default_state_dir, write_state


def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def make_sandbox(root: Path, name: str, **state) -> SandboxPaths:
    paths = SandboxPaths(root / name)
    paths.dir.mkdir(parents=True)
    write_state(
        paths,
        {
            "name": name,
            "status": "running",
            "created": time.time(),
            "qemu": {"memory_mib": 256, "cpus": 1, "accel": "tcg", "cpu": "max"},
            **state,
        },
    )
    paths.console_log.write_text("[    0.000000] Linux version 6.12\n")
    return paths


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def live(root: Path) -> Iterator[SandboxPaths]:
    """A sandbox whose monitor is "running": this test holds its lock."""
    paths = make_sandbox(root, "live", monitor_pid=os.getpid())
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield paths
    os.close(fd)


def test_a_sandbox_whose_monitor_is_gone_is_dead(root: Path) -> None:
    make_sandbox(root, "ghost", monitor_pid=gone_pid())
    [info] = Sandbox.list(root)
    assert info.name == "ghost"
    assert info.status == "dead"
    assert not info.alive
    assert info.to_dict()["status"] == "dead"


def test_an_unlocked_lock_means_dead_even_if_the_pid_lives(root: Path) -> None:
    paths = make_sandbox(root, "stale", monitor_pid=os.getpid())  # a pid that surely runs
    paths.lock.touch()
    assert [i.status for i in Sandbox.list(root)] == ["dead"]


def test_a_held_lock_means_alive(root: Path, live: SandboxPaths) -> None:
    [info] = Sandbox.list(root)
    assert (info.name, info.status, info.memory_mib, info.accel) == ("live", "running", 256, "tcg")
    assert Sandbox.get("live", state_dir=root).alive


def test_cleanup_removes_only_the_dead(root: Path, live: SandboxPaths) -> None:
    make_sandbox(root, "ghost", monitor_pid=gone_pid())
    half = root / "half-created"  # an ``up`` that died before writing state.json
    half.mkdir()
    os.utime(half, (time.time() - 3600, time.time() - 3600))
    assert {i.name: i.status for i in Sandbox.list(root)} == {
        "ghost": "dead",
        "half-created": "dead",
        "live": "running",
    }
    assert sorted(Sandbox.cleanup_dead(root)) == ["ghost", "half-created"]
    assert [i.name for i in Sandbox.list(root)] == ["live"]
    assert live.dir.exists()


def test_cleanup_ends_a_qemu_left_behind(root: Path) -> None:
    orphan = subprocess.Popen(["sleep", "60"])
    try:
        make_sandbox(
            root,
            "orphaned",
            monitor_pid=gone_pid(),
            qemu_pid=orphan.pid,
            qemu_started=psutil.Process(orphan.pid).create_time(),
        )
        assert Sandbox.cleanup_dead(root) == ["orphaned"]
        assert orphan.wait(10) == -9
    finally:
        orphan.kill()
        orphan.wait()


def test_cleanup_never_kills_a_process_that_reused_the_pid(root: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(bystander.pid).create_time()
        make_sandbox(
            root, "old", monitor_pid=gone_pid(), qemu_pid=bystander.pid, qemu_started=started - 100
        )
        assert Sandbox.cleanup_dead(root) == ["old"]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_up_refuses_a_live_name(root: Path, live: SandboxPaths) -> None:
    with pytest.raises(SandboxExists, match="already exists"):
        Sandbox.up("live", state_dir=root)


def test_up_without_an_image_says_how_to_get_one(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BULKHEAD_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(ImageNotFound, match="image"):
        Sandbox.up("demo", state_dir=root)
    with pytest.raises(ImageNotFound):
        Sandbox.up("demo", state_dir=root, image=tmp_path / "no-such-image")
    assert not (root / "demo").exists()


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-x", "x" * 64, "with space"])
def test_bad_names_are_refused(root: Path, name: str) -> None:
    with pytest.raises(SandboxError, match="bad sandbox name"):
        Sandbox.up(name, state_dir=root)


def test_a_too_long_state_dir_is_refused_before_anything_starts(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    with pytest.raises(SandboxError, match="longer than 107 bytes"):
        Sandbox.up("demo", state_dir=deep)


def test_get_of_a_missing_sandbox(root: Path) -> None:
    with pytest.raises(SandboxNotFound, match="'nope'"):
        Sandbox.get("nope", state_dir=root)


def test_down_of_a_dead_sandbox_just_removes_it(root: Path) -> None:
    make_sandbox(root, "ghost", monitor_pid=gone_pid())
    sb = Sandbox.get("ghost", state_dir=root)
    assert "Linux version" in sb.console_log()
    with pytest.raises(SandboxError, match="not running"):
        sb.info()
    sb.down(timeout=1)
    assert not sb.dir.exists()


def test_default_state_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULKHEAD_STATE_DIR", "/tmp/elsewhere")
    assert default_state_dir() == Path("/tmp/elsewhere")
    monkeypatch.delenv("BULKHEAD_STATE_DIR")
    if os.geteuid() == 0:
        assert default_state_dir() == Path("/run/bulkhead")


# --- CLI ----------------------------------------------------------------------------


def test_cli_errors_are_one_line_and_exit_1(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--state-dir", str(root), "sandbox", "info", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bulkhead: error: ")
    assert "'nope'" in err
    assert "Traceback" not in err


def test_cli_up_of_a_live_name_fails(
    root: Path, live: SandboxPaths, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--state-dir", str(root), "sandbox", "up", "live"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["sandbox", "up"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        main(["sandbox", "up", "x", "--accel", "hvf"])
    assert caught.value.code == 2
    assert "bulkhead" in capsys.readouterr().err


def test_cli_ls_reports_and_cleans_dead_sandboxes(
    root: Path, live: SandboxPaths, capsys: pytest.CaptureFixture
) -> None:
    make_sandbox(root, "ghost", monitor_pid=gone_pid())
    assert main(["--state-dir", str(root), "sandbox", "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {s["name"]: s["status"] for s in listed} == {"ghost": "dead", "live": "running"}
    assert not (root / "ghost").exists()
    assert main(["--state-dir", str(root), "sandbox", "ls"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["NAME", "STATUS"]
    assert table[1].split()[:2] == ["live", "running"]


def test_cli_console_prints_the_log(root: Path, capsys: pytest.CaptureFixture) -> None:
    make_sandbox(root, "ghost", monitor_pid=gone_pid())
    assert main(["--state-dir", str(root), "sandbox", "console", "ghost"]) == 0
    assert "Linux version 6.12" in capsys.readouterr().out


def test_cli_runs_as_a_module(root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bulkhead.cli", "--state-dir", str(root), "sandbox", "ls", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
