"""Keep a child running (the agent, the debug shell): start it, notice its exit, restart it.

Back-off: the first restart waits 100 ms and each further one twice as long, up to a cap;
a child that ran for 10 s counts as healthy, so its next failure starts again at 100 ms.
"""

from __future__ import annotations

import sys
import time

from . import signals, spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .log import Logger

FIRST_DELAY_MS = 100
HEALTHY_S = 10.0
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_CODE = (
    "import sys; sys.path.insert(0, '/usr/lib/bulkhead'); "
    "from bulkhead_agent.main import main; main()"
)


class Respawner:
    """One supervised child. ``spawn(attempt)`` starts it and returns its pid."""

    def __init__(
        self,
        name: str,
        spawn: Callable[[int], int],
        log: Logger,
        max_delay_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.pid: int | None = None
        self.attempts = 0  # starts so far; the next start's restart count
        self.stopped = False
        self._spawn = spawn
        self._log = log
        self._max_ms = max(max_delay_ms, FIRST_DELAY_MS)
        self._clock = clock
        self._delay_ms = FIRST_DELAY_MS
        self._started_at = 0.0
        self._next_at: float | None = None

    def start(self) -> None:
        now = self._clock()
        attempt = self.attempts
        self.attempts += 1
        self._next_at = None
        try:
            pid = self._spawn(attempt)
        except OSError as exc:
            delay = self._schedule(now, ran_s=0.0)
            self._log.error(f"cannot start {self.name}: {exc}; retrying in {delay} ms")
            return
        self.pid = pid
        self._started_at = now
        self._log.info(f"{self.name} started pid {pid}")

    def exited(self, status: int) -> None:
        """Our child ended (already reaped): log it and schedule the restart."""
        ran = self._clock() - self._started_at
        self.pid = None
        what = f"{self.name} exited ({signals.describe(status)}) after {ran:.1f} s"
        if self.stopped:
            self._log.info(what)
            return
        delay = self._schedule(self._clock(), ran)
        self._log.warning(f"{what}; restarting in {delay} ms")

    def _schedule(self, now: float, ran_s: float) -> int:
        if ran_s >= HEALTHY_S:
            self._delay_ms = FIRST_DELAY_MS
        delay = self._delay_ms
        self._delay_ms = min(delay * 2, self._max_ms)
        self._next_at = now + delay / 1000.0
        return delay

    def timeout(self) -> float | None:
        """Seconds until a restart is due, or None if none is pending."""
        if self._next_at is None or self.stopped:
            return None
        return max(self._next_at - self._clock(), 0.0)

    def poll(self) -> None:
        """Start the child if its back-off has run out."""
        if self._next_at is not None and not self.stopped and self._clock() >= self._next_at:
            self.start()

    def stop(self) -> None:
        """No more restarts (power-off); a running child is left to the shutdown sequence."""
        self.stopped = True
        self._next_at = None


def earliest(respawners: list[Respawner]) -> float | None:
    times = [t for t in (r.timeout() for r in respawners) if t is not None]
    return min(times) if times else None


def agent_command(env: Mapping[str, str], log: Logger) -> list[str]:
    """The agent's argv: the documented default, or ``BULKHEAD_AGENT_CMD`` (native tests)."""
    override = env.get("BULKHEAD_AGENT_CMD", "")
    if override:
        import shlex  # only tests set it: keep shlex (and re) off the boot path

        try:
            argv = shlex.split(override)
        except ValueError as exc:
            log.error(f"bad BULKHEAD_AGENT_CMD {override!r}: {exc}; using the default")
        else:
            if argv:
                return argv
    return [sys.executable or "/usr/bin/python3", "-I", "-S", "-c", AGENT_CODE]


def agent_environment(
    base: Mapping[str, str], *, started_ms: float, restarts: int, modules: list[str], log: str
) -> dict[str, str]:
    """The documented environment (internals.md, "Init <-> agent") over init's own."""
    env = dict(base)
    env.update(
        PATH=GUEST_PATH,
        BULKHEAD_INIT_STARTED_MS=f"{started_ms:.0f}",
        BULKHEAD_AGENT_RESTARTS=str(restarts),
        BULKHEAD_MODULES=",".join(modules),
        BULKHEAD_LOG=log,
    )
    return env


def spawn_agent(argv: list[str], env: Mapping[str, str], console_fd: int) -> int:
    """The agent daemon: own session, stdin /dev/null, stdout and stderr on the console."""
    return spawn.spawn(argv, env, output_fd=console_fd)
