"""The container commands of the ``bulkhead`` CLI: run, exec, ps, kill, rm, pause, resume, stats.

``run`` and ``exec`` follow docker's conventions: they exit with the process's status (128+N
when signal N killed it, 126/127 when it could not start) and with 125 when bulkhead itself
fails. The other commands exit 1 on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from . import cli_storage, terminal
from .containers import Container, check_id
from .details import ContainerInfo, ContainerStats
from .errors import AgentError, BulkheadError, FailedPrecondition, NotFound, SandboxError
from .process import Process
from .sandbox import DEFAULT_HOTPLUG_PORTS, Sandbox
from .spec import SpecError, parse_size

RUN_ERROR = 125  # docker's status for "the runtime itself failed"
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
INTERRUPTS_TO_GIVE_UP = 3  # Ctrl-C this many times and bulkhead stops waiting


# -- parsing --


def parse_args(build: Any, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, splitting ``run``/``exec``'s command at the first ``--``.

    ``build(command_nargs)`` makes the parser. Options may then come after the positional
    arguments (``exec SANDBOX CONTAINER -i -- sh``); without ``--``, the command starts at
    the first argument that is not an option (``run sh -c 'echo hi'``), as with docker.
    """
    if "--" in argv:
        cut = argv.index("--")
        head, tail = argv[:cut], argv[cut + 1 :]
        if {"run", "exec"} & set(head):
            args, extra = build("*").parse_known_args(head)
            if not extra and getattr(args, "command", None) == []:
                args.command = tail
                return args
    args = build(argparse.REMAINDER).parse_args(argv)
    command = getattr(args, "command", None)
    if command and command[0] == "--":
        args.command = command[1:]
    return args


def add_parsers(groups: Any, command_nargs: Any) -> None:
    """Add the container commands to the CLI's subcommand ``groups``."""
    p = groups.add_parser(
        "run",
        help="run a command in a new container (in a throwaway sandbox unless --sandbox)",
        description="Run CMD in a new container and stream its stdio; exit with its status.",
    )
    _process_options(p)
    p.add_argument("--sandbox", metavar="NAME", help="use this running sandbox")
    p.add_argument("--name", metavar="ID", help="container id (default: random)")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="start it and print its id")
    p.add_argument(
        "--rootfs",
        metavar="DIR|IMAGE",
        help="root filesystem: a host image file (a disk) or directory (a share), else a "
        "directory in the guest (guest:DIR to be explicit)",
    )
    cli_storage.add_run_options(p)
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--hostname", metavar="NAME", help="default: the container id")
    p.add_argument("--memory-limit", type=_size, metavar="SIZE", help="e.g. 64m, 1g")
    p.add_argument("--cpus-limit", type=_cpus, metavar="CPUS", help="e.g. 0.5")
    p.add_argument("--pids-limit", type=_positive, metavar="N", help="most processes at once")
    p.add_argument("--image", metavar="DIR", help="guest image of the throwaway sandbox")
    p.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[ADDR:]HOSTPORT:PORT",
        help="publish a container port on the host (127.0.0.1 unless ADDR; user networking)",
    )
    p.add_argument("command", nargs=command_nargs, metavar="-- CMD")
    p.set_defaults(func=cmd_run, error_status=RUN_ERROR)

    p = groups.add_parser("exec", help="run a command in a running container")
    p.add_argument("sandbox")
    p.add_argument("container")
    _process_options(p)
    p.add_argument("command", nargs=command_nargs, metavar="-- CMD")
    p.set_defaults(func=cmd_exec, error_status=RUN_ERROR)

    p = groups.add_parser("ps", help="list containers, or the processes of one")
    p.add_argument("sandbox")
    p.add_argument("container", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)

    p = groups.add_parser("kill", help="send a signal to a container (default: KILL)")
    p.add_argument("sandbox")
    p.add_argument("container")
    p.add_argument("-s", "--signal", type=_signal, default=signal.SIGKILL, metavar="SIGNAL")
    p.add_argument("--all", action="store_true", help="every process in it, not just its own")
    p.set_defaults(func=cmd_kill)

    p = groups.add_parser("rm", help="remove containers")
    p.add_argument("sandbox")
    p.add_argument("containers", nargs="+", metavar="container")
    p.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    p.set_defaults(func=cmd_rm)

    for name, verb in (("pause", "freeze"), ("resume", "thaw")):
        p = groups.add_parser(name, help=f"{verb} every process of a container")
        p.add_argument("sandbox")
        p.add_argument("container")
        p.set_defaults(func=cmd_pause if name == "pause" else cmd_resume)

    p = groups.add_parser("stats", help="resource use of containers (a refreshing table)")
    p.add_argument("sandbox", nargs="?", help="default: every running sandbox")
    p.add_argument("container", nargs="?")
    p.add_argument("--no-stream", action="store_true", help="print once and exit")
    p.add_argument("--json", action="store_true", help="print once, as JSON")
    p.set_defaults(func=cmd_stats)


def _process_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--interactive", action="store_true", help="send our stdin to it")
    p.add_argument("-t", "--tty", action="store_true", help="give it a terminal")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument("-u", "--user", metavar="UID[:GID]", help="numeric ids, or root")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of CPUs: {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return int(text)


def _signal(text: str) -> int:
    """A signal by number, or by name with or without ``SIG`` (``KILL``, ``sigterm``)."""
    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {text!r}") from None


def _env(items: list[str]) -> list[str]:
    """``K=V`` as given; a bare ``K`` takes its value from our environment, as docker does."""
    env = []
    for item in items:
        if "=" in item:
            env.append(item)
        elif item in os.environ:
            env.append(f"{item}={os.environ[item]}")
    return env


def _command(args: argparse.Namespace) -> list[str]:
    if not args.command:
        raise BulkheadError("no command given: put it after --, e.g. `-- sh -c 'echo hi'`")
    return list(args.command)


# -- run and exec --


def cmd_run(args: argparse.Namespace) -> int:
    command = _command(args)
    if args.name:
        check_id(args.name)
    if args.detach and not args.sandbox:
        raise BulkheadError("--detach needs --sandbox NAME (a throwaway sandbox would go away)")
    storage = cli_storage.RunStorage.from_args(args)  # may turn --rootfs into a disk or share
    tty_size = terminal.window_size(sys.stdin.fileno()) if args.tty else None
    options: dict[str, Any] = {
        "env": _env(args.env),
        "cwd": args.workdir or "/",
        "user": args.user,
        "tty": args.tty,
        "console_size": tty_size,
        "memory_limit": args.memory_limit,
        "cpus_limit": args.cpus_limit,
        "pids_limit": args.pids_limit,
        "rootfs": args.rootfs,
        "readonly_rootfs": args.read_only,
        "hostname": args.hostname,
        "name": args.name,
    }
    if args.tty and tty_size:
        options["env"] = [f"TERM={os.environ.get('TERM', 'xterm')}", *options["env"]]

    with _cleanup_shield() as shield:
        sandbox, throwaway = _run_sandbox(args, storage)
        shield.on_exit(sandbox.close)
        if throwaway:
            shield.on_exit(lambda: sandbox.down(timeout=20))
        elif args.rm and not args.detach:
            # Last-registered runs first: after the container is gone, its disks go too.
            shield.on_exit(lambda: storage.teardown(sandbox))
        options.update(storage.setup(sandbox, args.read_only))
        if args.detach:
            container = sandbox.create_container(command, **options)
            container.start()
            print(container.id)
            return 0
        # A throwaway sandbox takes its containers with it: no need to remove them one by one.
        remove = args.rm and not throwaway
        proc = sandbox.run(command, stdin=args.interactive, remove=remove, **options)
        shield.on_exit(proc.close)
        return _stream(proc, interactive=args.interactive, initial_size=tty_size)


def cmd_exec(args: argparse.Namespace) -> int:
    command = _command(args)
    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    tty_size = terminal.window_size(sys.stdin.fileno()) if args.tty else None
    env = _env(args.env)
    if args.tty and tty_size and not any(e.startswith("TERM=") for e in env):
        env.insert(0, f"TERM={os.environ.get('TERM', 'xterm')}")
    with _cleanup_shield() as shield:
        shield.on_exit(sandbox.close)
        try:
            proc = Container(sandbox.agent, args.container).exec(
                command,
                env=env,
                cwd=args.workdir,
                user=args.user,
                tty=args.tty,
                stdin=args.interactive,
            )
        except FailedPrecondition as exc:
            # The agent reports an exec that could not start as a failed call whose message
            # starts with the setup step: "exec: ... (ENOENT)". Report it as a shell would.
            if not exc.details.startswith("exec:"):
                raise
            print(f"bulkhead: {args.container}: failed to start: {exc.details}", file=sys.stderr)
            return 127 if "ENOENT" in exc.details else 126
        shield.on_exit(proc.close)
        return _stream(proc, interactive=args.interactive, initial_size=tty_size)


def _run_sandbox(args: argparse.Namespace, storage: cli_storage.RunStorage) -> tuple[Sandbox, bool]:
    if args.sandbox:
        sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
        if not sandbox.alive:
            raise BulkheadError(f"sandbox {args.sandbox!r} is not running")
        # Containers share the sandbox's network: a port is published for the sandbox, and
        # stays so after this container ends.
        for port in args.publish:
            sandbox.publish(port)
        return sandbox, False
    name = f"run-{secrets.token_hex(4)}"
    sandbox = Sandbox.up(
        name,
        state_dir=args.state_dir,
        image=args.image,
        hotplug_ports=max(DEFAULT_HOTPLUG_PORTS, storage.ports),
        shared_memory=storage.needs_shared_memory,
        publish=args.publish,
    )
    return sandbox, True


class _Shield:
    def __init__(self) -> None:
        self.actions: list[Any] = []

    def on_exit(self, action: Any) -> None:
        self.actions.append(action)


@contextlib.contextmanager
def _cleanup_shield() -> Iterator[_Shield]:
    """Run the registered clean-ups (last first) however the block ends, Ctrl-C included,
    with Ctrl-C and SIGTERM ignored meanwhile: a half-done teardown would leak a VM."""
    shield = _Shield()
    try:
        yield shield
    finally:
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            for action in reversed(shield.actions):
                try:
                    action()
                except (BulkheadError, OSError) as exc:
                    print(f"bulkhead: warning: clean-up failed: {exc}", file=sys.stderr)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _stream(proc: Process, *, interactive: bool, initial_size: tuple[int, int] | None) -> int:
    """Connect our stdio to the process's until it exits; its shell-style status."""
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    raw = proc.tty and interactive and terminal.is_terminal(stdin_fd)
    with contextlib.ExitStack() as stack:
        if raw:
            # Keys reach the guest's terminal as bytes; its line discipline makes Ctrl-C a
            # SIGINT there. Signals sent to us (kill) end the session instead.
            stack.enter_context(terminal.raw_mode(stdin_fd))
            stack.enter_context(_signals_end_session())
        else:
            stack.enter_context(_forward_signals(proc))
        if proc.tty:
            stack.enter_context(_forward_resizes(proc, stdout_fd, initial_size))
        if interactive:
            threading.Thread(target=_pump_stdin, args=(proc, stdin_fd), daemon=True).start()
        writer = _Writer()
        for out in proc.output():
            writer.write(stdout_fd if out.stream == "stdout" else sys.stderr.fileno(), out.data)
    exit = proc.exit
    if exit is None:  # the stream ended without it (the agent went away mid-way): ask
        proc.wait()
        exit = proc.exit
    assert exit is not None
    if exit.kind == "start_failed":
        print(f"bulkhead: {proc.container_id}: {exit}", file=sys.stderr)
    return exit.returncode


class _Writer:
    """Unbuffered, binary-safe writes; a closed pipe (``| head``) just stops that stream."""

    def __init__(self) -> None:
        self.closed: set[int] = set()

    def write(self, fd: int, data: bytes) -> None:
        if fd in self.closed:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except BrokenPipeError:
            self.closed.add(fd)
        except OSError as exc:
            if exc.errno != errno.EIO:  # our terminal went away
                raise
            self.closed.add(fd)


def _pump_stdin(proc: Process, fd: int) -> None:
    try:
        while data := os.read(fd, 65536):
            proc.stdin.write(data)
        proc.stdin.close()  # our EOF becomes the process's EOF
    except (OSError, ValueError, BulkheadError):
        pass  # the process exited, or our stdin went away: nothing more to send


@contextlib.contextmanager
def _forward_signals(proc: Process) -> Iterator[None]:
    """Signals sent to us go to the process, as docker's sig-proxy does.

    The handler only queues the signal (a handler must not make RPCs in the middle of
    whatever the main thread was doing); a thread sends it. Ctrl-C pressed
    ``INTERRUPTS_TO_GIVE_UP`` times stops waiting, for a process that ignores it.
    """
    pending: queue.Queue[int | None] = queue.Queue()
    interrupts = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts >= INTERRUPTS_TO_GIVE_UP:
                raise KeyboardInterrupt
        pending.put(signum)

    def send() -> None:
        while (signum := pending.get()) is not None:
            try:
                proc.signal(signum)
            except BulkheadError:
                pass  # it has just exited

    sender = threading.Thread(target=send, name="bulkhead-signals", daemon=True)
    sender.start()
    previous = {sig: signal.signal(sig, handler) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        pending.put(None)


class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_end_session() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    sigs = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _forward_resizes(proc: Process, fd: int, initial: tuple[int, int] | None) -> Iterator[None]:
    """Send our window size now and on every SIGWINCH (from a thread, as with signals)."""
    changed = threading.Event()
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            if changed.wait(0.5):
                changed.clear()
                size = terminal.window_size(fd) or terminal.window_size(sys.stdin.fileno())
                if size:
                    with contextlib.suppress(BulkheadError):
                        proc.resize(*size)

    if initial:
        with contextlib.suppress(BulkheadError):
            proc.resize(*initial)
    thread = threading.Thread(target=send, name="bulkhead-resize", daemon=True)
    thread.start()
    with terminal.on_resize(changed.set):
        try:
            yield
        finally:
            stop.set()


def terminated_status(exc: BaseException) -> int | None:
    """The status for a session ended by a signal to bulkhead itself (128+N), else ``None``."""
    return 128 + exc.signum if isinstance(exc, _Terminated) else None


# -- the other commands --


def _container(args: argparse.Namespace) -> Container:
    return Sandbox.get(args.sandbox, state_dir=args.state_dir).container(args.container)


def cmd_ps(args: argparse.Namespace) -> int:
    from .cli import _age, _print_json, _table

    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    if args.container:
        procs = sandbox.container(args.container).processes()
        if args.json:
            _print_json([p.to_dict() for p in procs])
            return 0
        rows = [("PID", "PPID", "UID", "STATE", "COMMAND")]
        rows += [(str(p.pid), str(p.ppid), str(p.uid), p.state, " ".join(p.args)) for p in procs]
        _table(rows)
        return 0
    infos = sandbox.containers()
    if args.json:
        _print_json([i.to_dict() for i in infos])
        return 0
    rows = [("CONTAINER", "STATUS", "PID", "CREATED", "EXECS", "COMMAND")]
    for i in infos:
        rows.append(
            (
                i.container_id,
                i.status,
                str(i.pid or "-"),
                _age(i.created_unix),
                str(len(i.exec_ids)),
                _shorten(" ".join(i.args), 40),
            )
        )
    _table(rows)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    _container(args).kill(args.signal, all=args.all)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    status = {i.container_id: i.status for i in sandbox.containers()}
    failed = False
    for container_id in args.containers:
        try:
            if container_id not in status:
                raise NotFound(f"no container {container_id!r} in sandbox {args.sandbox!r}")
            if status[container_id] in ("running", "paused") and not args.force:
                raise FailedPrecondition(
                    f"container {container_id!r} is {status[container_id]}: "
                    "kill it first or use rm -f"
                )
            sandbox.container(container_id).remove(timeout=0 if args.force else 10)
            print(container_id)
        except BulkheadError as exc:
            print(f"bulkhead: error: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def cmd_pause(args: argparse.Namespace) -> int:
    _container(args).pause()
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _container(args).resume()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .cli import _print_json

    if args.sandbox is not None:
        sandboxes = [Sandbox.get(args.sandbox, state_dir=args.state_dir)]
    else:  # like `docker stats`: everything that runs, with a SANDBOX column
        infos = Sandbox.list(args.state_dir)
        sandboxes = [Sandbox.get(i.name, state_dir=args.state_dir) for i in infos if i.alive]
    once = args.no_stream or args.json
    clear = sys.stdout.isatty() and not once
    before = _sample_all(sandboxes, args.container)
    try:
        while True:
            time.sleep(0.5 if once else 1.0)
            after = _sample_all(sandboxes, args.container)
            rows = _stats_rows(before, after)
            if args.json:
                _print_json(rows)
                return 0
            if clear:
                sys.stdout.write("\x1b[H\x1b[J")  # home, then clear: a refreshing table
            _print_stats(rows, with_sandbox=args.sandbox is None)
            sys.stdout.flush()
            if once:
                return 0
            before = after
    except KeyboardInterrupt:
        return 0  # the way to stop a streaming table


_Sample = tuple[float, dict[tuple[str, str], tuple[ContainerInfo, ContainerStats]]]


def _sample_all(sandboxes: list[Sandbox], only: str | None) -> _Sample:
    """One sample of every sandbox's containers, keyed by (sandbox, container)."""
    stats = {}
    for sandbox in sandboxes:
        try:
            _, found = _sample(sandbox, only)
        except (AgentError, SandboxError):
            if len(sandboxes) == 1:
                raise
            continue  # one of many went away (or is not up yet): the others still show
        stats.update(found)
    return time.monotonic(), stats


def _sample(sandbox: Sandbox, only: str | None) -> _Sample:
    infos = sandbox.containers()
    if only is not None:
        infos = [i for i in infos if i.container_id == only]
        if not infos:
            raise NotFound(f"no container {only!r} in sandbox {sandbox.name!r}")
    stats = {}
    for info in infos:
        if info.status in ("running", "paused"):
            with contextlib.suppress(NotFound):  # it went away meanwhile
                figures = sandbox.agent.container_stats(info.container_id)
                stats[(sandbox.name, info.container_id)] = (info, figures)
    return time.monotonic(), stats


def _stats_rows(before: _Sample, after: _Sample) -> list[dict[str, Any]]:
    elapsed_usec = max(1.0, (after[0] - before[0]) * 1e6)
    rows = []
    for key, (info, now) in after[1].items():
        then = before[1].get(key)
        used = now.cpu_usage_usec - then[1].cpu_usage_usec if then else 0
        rows.append(
            {
                "sandbox": key[0],
                "container_id": key[1],
                "status": info.status,
                "cpu_percent": round(100.0 * max(0, used) / elapsed_usec, 2),
                **now.to_dict(),
            }
        )
    return rows


def _print_stats(rows: list[dict[str, Any]], with_sandbox: bool = False) -> None:
    from .cli import _table

    table = [("CONTAINER", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS", "THROTTLED", "IO R / W")]
    if with_sandbox:
        table[0] = ("SANDBOX", *table[0])
    for r in rows:
        limit = r["memory_max_bytes"]
        mem_pct = f"{100.0 * r['memory_current_bytes'] / limit:.1f}%" if limit else "-"
        pids = f"{r['pids_current']}" + (f" / {r['pids_max']}" if r["pids_max"] else "")
        row = (
            r["container_id"],
            f"{r['cpu_percent']:.1f}%",
            f"{_bytes(r['memory_current_bytes'])} / {_bytes(limit) if limit else '-'}",
            mem_pct,
            pids,
            str(r["cpu_nr_throttled"]),
            f"{_bytes(r['io_read_bytes'])} / {_bytes(r['io_write_bytes'])}",
        )
        table.append((r["sandbox"], *row) if with_sandbox else row)
    if len(table) == 1:
        print("no running containers")
        return
    _table(table)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
