"""The guest's PID 1: boot steps, then one loop that waits for signals, reaps and restarts.

``main()`` never raises or returns while it is PID 1 (the kernel panics when init exits):
each boot step is fenced off, the loop survives its own errors, and if everything else
fails init falls back to reaping forever.

Native-test hooks (environment; the guest sets none of them):
- ``BULKHEAD_INIT_SKIP``: comma list of steps to leave out: mounts, cgroups, modules,
  entropy, network. ``mounts`` also leaves out unmounting at power-off.
- ``BULKHEAD_AGENT_CMD``: the agent command line, shell words.
- ``BULKHEAD_CMDLINE``: parsed instead of /proc/cmdline.
- ``BULKHEAD_CONSOLE``: the console device for logs, the agent's output and the debug
  shell, instead of /dev/console; empty means init's own stderr (no debug shell).
"""

from __future__ import annotations

import os
import sys
import time

# Every step module is imported before the first mount: each runs on every boot anyway,
# and a mount over the directory init was started from (a test running init from /tmp)
# must not make a later import fail.
from . import (
    __version__,
    cgroups,
    cmdline,
    console,
    entropy,
    log,
    modules,
    mounts,
    network,
    reaper,
    shutdown,
    signals,
    supervisor,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

STEPS = ("mounts", "cgroups", "modules", "entropy", "network")
CONSOLE = "/dev/console"
CONSOLE_MAX_DELAY_MS = 5000


class Init:
    """What the loop needs to know: the logger, the config and the supervised children."""

    def __init__(self, started_ms: float, logger: log.Logger, console_fd: int, tty: str) -> None:
        self.started_ms = started_ms
        self.log = logger
        self.console_fd = console_fd
        self.tty = tty  # "" when there is no console device to give a shell
        self.env = dict(os.environ)
        self.skip: set[str] = set()
        self.config = cmdline.Config()
        self.modules: list[str] = []
        self.children: list[supervisor.Respawner] = []

    # --- boot -------------------------------------------------------------------------

    def boot(self) -> None:
        lg = self.log
        lg.info(f"bulkhead-init {__version__} starting (python {sys.version.split()[0]})")
        self.skip = self._skip_list()
        if "mounts" not in self.skip:
            # Before the command line: /proc/cmdline is on /proc.
            self._step("mount /proc", self._mount_proc)
        self._step("kernel command line", self._read_config)
        if "mounts" not in self.skip:
            self._step("mounts", self._mounts)
        if "cgroups" not in self.skip:
            self._step("cgroups", self._cgroups)
        if "modules" not in self.skip:
            self._step("modules", self._modules)
        if "entropy" not in self.skip:
            self._step("entropy", self._entropy)
        if "network" not in self.skip:
            self._step("network", self._network)
        self._step("agent", self._start_agent)
        if self.config.debug_console:
            self._step("debug console", self._start_console)
        took = log.boottime_ms() - self.started_ms
        lg.info(f"boot steps done in {took:.0f} ms (init started at {self.started_ms:.0f} ms)")

    def _step(self, what: str, fn: Callable[[], None]) -> None:
        """Run one boot step; a failure is logged and the boot goes on without it."""
        try:
            fn()
        except Exception as exc:
            self.log.error(f"{what} failed: {_explain(exc)}")

    def _skip_list(self) -> set[str]:
        raw = self.env.get("BULKHEAD_INIT_SKIP", "")
        skip = {s.strip() for s in raw.split(",") if s.strip()}
        for bad in sorted(skip - set(STEPS)):
            known = ", ".join(STEPS)
            self.log.warning(f"BULKHEAD_INIT_SKIP: unknown step {bad!r} (known: {known})")
        if skip:
            self.log.warning(f"skipping boot steps: {', '.join(sorted(skip & set(STEPS)))}")
        return skip & set(STEPS)

    def _read_config(self) -> None:
        text = self.env.get("BULKHEAD_CMDLINE")
        config, warnings = cmdline.read() if text is None else cmdline.parse(text)
        self.config = config
        self.log.set_level(config.log)
        for warning in warnings:
            self.log.warning(warning)
        self.log.debug(f"config {config!r}")

    def _mount_proc(self) -> None:
        mounts.mount_proc(self.log)

    def _mounts(self) -> None:
        mounts.setup(self.log)

    def _cgroups(self) -> None:
        cgroups.mount(self.log)
        cgroups.enable_controllers(self.log)

    def _modules(self) -> None:
        self.modules = modules.load(self.log)

    def _entropy(self) -> None:
        try:
            with open("/proc/cmdline", "rb") as f:
                extra = f.read()
        except OSError:
            extra = b""
        entropy.stir(self.log, extra)

    def _network(self) -> None:
        network.setup(self.log, self.config.hostname)

    def _start_agent(self) -> None:
        argv = supervisor.agent_command(self.env, self.log)
        self.log.debug(f"agent command {argv!r}")

        def spawn(attempt: int) -> int:
            env = supervisor.agent_environment(
                self.env,
                started_ms=self.started_ms,
                restarts=attempt,
                modules=self.modules,
                log=self.config.log,
            )
            return supervisor.spawn_agent(argv, env, self.console_fd)

        agent = supervisor.Respawner("agent", spawn, self.log, self.config.agent_restart_max_ms)
        self.children.append(agent)
        agent.start()

    def _start_console(self) -> None:
        if not self.tty:
            self.log.warning("debug console requested, but there is no console device")
            return
        self.log.warning(
            f"debug console is ON: an unauthenticated root shell ({console.SHELL}) runs on "
            f"{self.tty}"
        )
        env = dict(self.env, PATH=supervisor.GUEST_PATH)
        env.setdefault("HOME", "/")
        env.setdefault("TERM", "linux")

        def spawn(attempt: int) -> int:
            return console.spawn_shell(self.tty, env)

        shell = supervisor.Respawner("debug console shell", spawn, self.log, CONSOLE_MAX_DELAY_MS)
        self.children.append(shell)
        shell.start()

    # --- the loop ---------------------------------------------------------------------

    def serve(self) -> None:
        """Wait for a signal or a restart deadline, act, reap; forever."""
        failures = 0
        while True:
            try:
                signo = signals.wait(supervisor.earliest(self.children))
                if signo is not None:
                    self._on_signal(signo)
                self._reap()
                for child in self.children:
                    child.poll()
                failures = 0
            except Exception as exc:
                failures += 1
                self.log.error(f"main loop: {_explain(exc)}")
                if failures > 3:
                    time.sleep(1.0)  # an error that repeats must not spin the CPU

    def _on_signal(self, signo: int) -> None:
        if signo in (signals.SIGTERM, signals.SIGUSR2):
            self._shutdown(shutdown.POWER_OFF, signo)
        elif signo == signals.SIGINT:
            self._shutdown(shutdown.REBOOT, signo)
        elif signo == signals.SIGHUP:
            self.log.info("SIGHUP: nothing to reload; ignored")

    def _reap(self) -> None:
        exited, _ = reaper.reap()
        for pid, status in exited:
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        for child in self.children:
            if child.pid == pid:
                child.exited(status)
                return
        self.log.debug(f"reaped orphan pid {pid} ({signals.describe(status)})")

    def _shutdown(self, kind: str, signo: int) -> None:
        self.log.info(f"{signals.name(signo)}: {kind}; no more agent restarts")
        for child in self.children:
            child.stop()
        shutdown.run(kind, self.log, self._on_exit, unmount="mounts" not in self.skip)
        # Still here: reboot(2) failed. Keep reaping; another signal may try again.
        self.log.error(f"{kind} did not happen; init keeps running")


def _explain(exc: BaseException) -> str:
    """The exception and where it came from, on one line (the console is all we have)."""
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
    return f"{type(exc).__name__}: {exc}{where}"


def _open_console(env: dict[str, str]) -> tuple[int, str]:
    """The console fd for logs (and the agent's output) and the tty path for a shell."""
    path = env.get("BULKHEAD_CONSOLE", CONSOLE)
    if path:
        try:
            return os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC), path
        except OSError:
            pass
    return 2, ""


def _reap_forever(logger: log.Logger | None) -> None:
    """Last resort after an impossible error: stay alive, reap, honour power-off."""
    if logger is None:
        logger = log.Logger("init", "info", 2)
    while True:
        try:
            signo = signals.wait(None)
            reaper.reap()
            if signo in (signals.SIGTERM, signals.SIGUSR2, signals.SIGINT):
                kind = shutdown.REBOOT if signo == signals.SIGINT else shutdown.POWER_OFF
                shutdown.run(kind, logger, lambda pid, status: None)
        except BaseException:
            time.sleep(1.0)


def main() -> None:
    started_ms = log.boottime_ms()
    if os.getpid() != 1:
        # As anything but PID 1, power-off would kill(-1) the whole host: refuse.
        sys.stderr.write(
            "bulkhead-init: must run as PID 1 (natively: unshare --pid --fork --mount "
            "--uts --net --propagation private ...)\n"
        )
        raise SystemExit(2)
    logger: log.Logger | None = None
    try:
        signals.block()  # first: a power-off signal during boot waits for the loop
        console_fd, tty = _open_console(dict(os.environ))
        logger = log.Logger("init", "info", console_fd)
        init = Init(started_ms, logger, console_fd, tty)
        init.boot()
        init.serve()
    except BaseException as exc:
        try:
            if logger is not None:
                logger.error(f"init failed: {_explain(exc)}; reaping forever")
        except BaseException:
            pass
    _reap_forever(logger)
