"""One process of a container (its own, or an exec) as the agent tracks it, from creation
until the container is removed: pid, stdio, exit information, who is attached.

A process is *finished* once its exit is known AND both output streams reached end of file,
so everything it wrote is in the buffers: WaitProcess and the Attach ``exit`` message wait
for that, never for the exit alone. The record, with its exit, is kept until its container is
removed, so a waiter that comes late gets the answer at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from .stdio import ProcessStdio

EXITED = "exited"
SIGNALED = "signaled"
START_FAILED = "start_failed"


class ExitInfo(NamedTuple):
    kind: str  # EXITED, SIGNALED or START_FAILED
    pid: int
    exit_code: int = 0
    signal: int = 0
    oom_killed: bool = False
    step: str = ""  # START_FAILED: the setup step, its errno and message
    errno: int = 0
    message: str = ""


class Pulse:
    """Wakes every coroutine waiting at the moment it fires; later waiters wait for the next.

    Waiters check their condition, then wait, with no ``await`` in between, so on one
    event loop no pulse can slip through that gap.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event.clear()

    async def wait(self) -> None:
        await self._event.wait()


class Session(Protocol):
    """What the record needs from whoever is attached to the stdio (see services.attach)."""

    def replaced(self) -> None: ...


class ProcessRecord:
    def __init__(
        self,
        container_id: str,
        exec_id: str,
        terminal: bool,
        *,
        console: bool = False,
        offsets_path: str = "",
        adopted: dict[str, int] | None = None,
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.terminal = terminal
        self.pid = 0
        self.exit: ExitInfo | None = None
        self.exited = asyncio.Event()  # the exit is known
        self.finished = asyncio.Event()  # ... and all output is in the buffers
        self.forgotten = False  # its container was removed
        self.changed = Pulse()  # output, acknowledgement, stdin progress, exit, removal
        self.session: Session | None = None
        self.oom_kills_at_start = 0  # memory.events oom_kill when it started
        self.started_unix = time.time()
        self.console = console  # a terminal the process makes in its container
        self.on_finished: Callable[[], None] | None = None  # once, when finished is set
        self.stdio = ProcessStdio(
            terminal,
            self.on_stdio_change,
            console=console,
            offsets_path=offsets_path,
            adopted=adopted,
        )

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def running(self) -> bool:
        return self.pid > 0 and self.exit is None

    def on_stdio_change(self) -> None:
        self._check_finished()
        self.changed.fire()

    def set_exit(self, info: ExitInfo) -> None:
        if self.exit is not None:
            return
        self.exit = info
        self.exited.set()
        self._check_finished()
        self.changed.fire()

    def _check_finished(self) -> None:
        if self.exit is None or not self.stdio.eof or self.finished.is_set():
            return
        self.stdio.output_done()
        # Nobody can read stdin any more; what the host still sends is dropped.
        self.stdio.stdin.close()
        self.finished.set()
        if self.on_finished is not None:
            self.on_finished()

    def take_stdio(self, session: Session) -> None:
        """``session`` is now the one attached; a previous one is told it was replaced."""
        previous, self.session = self.session, session
        if previous is not None and previous is not session:
            previous.replaced()
        self.changed.fire()

    def release_stdio(self, session: Session) -> None:
        if self.session is session:
            self.session = None

    def forget(self) -> None:
        """The container is being removed: close everything and wake every waiter."""
        self.forgotten = True
        self.stdio.close()
        self.finished.set()
        self.exited.set()
        self.changed.fire()
