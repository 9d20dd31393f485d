"""Blocking helpers over QEMU's asyncio QMP library (``qemu.qmp``).

Sessions are meant to be short: QEMU serves one QMP client at a time on a
socket, so whoever holds it blocks everyone else (the monitor, ``down``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecInterruptedError, QMPClient, QMPError

from .errors import QemuError

_T = TypeVar("_T")


class Qmp:
    """A QMP session on ``path``, driven from synchronous code.

    ``qemu.qmp`` is asyncio; the session runs its own event loop on a private
    thread so that callers need neither a loop nor to avoid one.

    >>> with Qmp("/run/bulkhead/demo/qmp.sock") as qmp:
    ...     qmp.status()
    'running'
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._thread.start()
        self._client: QMPClient | None = None

    def __enter__(self) -> Qmp:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        async def connect() -> QMPClient:
            client = QMPClient(f"bulkhead:{self.path.parent.name}")
            await client.connect(str(self.path))
            return client

        try:
            self._client = self._run(connect(), self.timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            self.close()
            raise QemuError(f"cannot open QMP on {self.path}: {_describe(exc)}") from exc

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value."""
        if self._client is None:
            raise QemuError(f"QMP on {self.path} is not connected")
        client = self._client
        try:
            return self._run(client.execute(command, arguments), timeout or self.timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise QemuError(f"QMP {command} on {self.path}: {_describe(exc)}") from exc

    def execute_until_event(
        self,
        command: str,
        arguments: Mapping[str, object] | None,
        event: str,
        match: Mapping[str, object],
        *,
        timeout: float,
    ) -> dict[str, Any]:
        """Run ``command``, then wait up to ``timeout`` seconds for ``event`` whose data has
        every item of ``match`` (listening from before the command, so it cannot be missed).

        ``device_del`` is the case in point: it returns at once, and the device is gone only
        when the guest has let go of it and QEMU says ``DEVICE_DELETED``.
        """
        if self._client is None:
            raise QemuError(f"QMP on {self.path} is not connected")
        client = self._client

        async def run() -> dict[str, Any]:
            with client.listener(event) as listener:
                await asyncio.wait_for(client.execute(command, arguments), self.timeout)
                while True:
                    message = await listener.get()
                    data = message.get("data", {})
                    if all(data.get(k) == v for k, v in match.items()):
                        return dict(message)

        try:
            return self._run(run(), timeout)
        except TimeoutError:
            raise QemuError(
                f"QMP {command} on {self.path}: no {event} {dict(match)} within {timeout:g}s"
            ) from None
        except (QMPError, OSError) as exc:
            raise QemuError(f"QMP {command} on {self.path}: {_describe(exc)}") from exc

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a copy of ``fd`` under ``name`` (``getfd``), for ``netdev_add``'s ``fd``."""
        if self._client is None:
            raise QemuError(f"QMP on {self.path} is not connected")
        client = self._client

        async def run() -> None:
            client.send_fd_scm(fd)  # rides along with the next command, which is getfd
            await client.execute("getfd", {"fdname": name})

        try:
            self._run(run(), self.timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise QemuError(f"QMP getfd on {self.path}: {_describe(exc)}") from exc

    def status(self) -> str:
        """The VM's run state (``running``, ``paused``, ``shutdown``, ...)."""
        return str(self.execute("query-status")["status"])

    def quit(self) -> None:
        """End QEMU at once (as if the power cord was pulled)."""
        try:
            self.execute("quit")
        except QemuError as exc:
            # QEMU may hang up before its reply is read: that is the goal anyway.
            if not isinstance(exc.__cause__, ExecInterruptedError | EOFError | ConnectionError):
                raise

    def system_powerdown(self) -> None:
        """Press the (ACPI) power button; the guest decides what to do."""
        self.execute("system_powerdown")

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            # A QEMU that already hung up makes disconnect() re-raise why.
            with contextlib.suppress(Exception):
                self._run(client.disconnect(), self.timeout)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout)
        if not self._loop.is_running():
            self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        async def bounded() -> _T:
            return await asyncio.wait_for(coro, timeout)

        return asyncio.run_coroutine_threadsafe(bounded(), self._loop).result()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time (is another QMP client connected?)"
    return str(exc) or type(exc).__name__
