"""Fixtures that boot the real guest image under QEMU through the host client.

Each test reads like a user's session: bring a sandbox up, talk to its agent,
take it down. The image is built (or taken from the cache) once per run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bulkhead import Sandbox
from bulkhead.sandbox import tail_log
from bulkhead.state import SandboxPaths

pytestmark = pytest.mark.qemu

# Every sandbox these tests boot lives here. Unix socket paths are limited to
# 108 bytes: keep it short.
STATE_DIR = Path(f"/tmp/bh-qt-{os.getpid()}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "qemu-test" in str(item.path):
            item.add_marker(pytest.mark.qemu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failing test's report carries the logs of every sandbox still up.

    The fixtures take their sandboxes down (removing their logs) right after
    the test, so this is the only moment the guest's side of a rare failure
    (a kernel message, a backend's ring error) can still be read; CI keeps
    nothing else.
    """
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when not in ("setup", "call") or not STATE_DIR.is_dir():
        return
    for path in sorted(STATE_DIR.iterdir()):
        paths = SandboxPaths(path)
        for what, log, lines in (
            ("monitor", paths.monitor_log, 40),
            ("console", paths.console_log, 60),
        ):
            text = tail_log(log, lines)
            if text.strip():
                report.sections.append((f"sandbox {paths.name}: {what} log (tail)", text))


@pytest.fixture(scope="session")
def image():
    """The guest image: built here if the cache does not have it yet."""
    from bulkhead_image.build import build_image

    return build_image(progress=lambda msg: print(f"image: {msg}", flush=True))


@pytest.fixture(scope="session")
def state_dir() -> Path:
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    return STATE_DIR


@pytest.fixture
def boot(image, state_dir: Path) -> Iterator[Callable[..., Sandbox]]:
    """Factory: ``boot(name, **options)`` brings a sandbox up; all are downed afterwards."""
    started: list[Sandbox] = []

    def _boot(name: str, **options) -> Sandbox:
        options.setdefault("image", image.path)
        options.setdefault("memory_mib", 512)
        sb = Sandbox.up(name, state_dir=state_dir, **options)
        started.append(sb)
        return sb

    yield _boot
    for sb in started:
        try:
            sb.down(timeout=20)
        except Exception as exc:  # a test that downed it already is fine
            print(f"cleanup of {sb.name}: {exc}")


# The agent's channels every shared-sandbox test runs over: virtio-serial, and vsock
# (through the userspace vhost-user-vsock backend, as this host has no vhost-vsock).
# BULKHEAD_QEMU_TRANSPORTS=serial (say) narrows a local run to one.
TRANSPORTS = os.environ.get("BULKHEAD_QEMU_TRANSPORTS", "serial,vsock").split(",")


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def sandbox(image, state_dir: Path, transport: str) -> Iterator[Sandbox]:
    """One sandbox shared by the read-only tests of a module, once per transport."""
    name = f"shared-{transport[:6]}-{os.getpid() % 10000}-{int(time.monotonic() * 1000) % 10000}"
    sb = Sandbox.up(
        name, image=image.path, memory_mib=512, cpus=2, state_dir=state_dir, transport=transport
    )
    try:
        expected = ("serial",) if transport == "serial" else ("vhost-user-vsock", "vhost-vsock")
        assert sb.transport in expected, f"asked for {transport}, got {sb.transport}"
        yield sb
    finally:
        sb.down(timeout=20)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval=0.1):
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # keep polling; report the last failure
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")
