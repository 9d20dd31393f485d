"""The ordered steps that turn a freshly forked spawner child into a container process.

The spawner forks, then runs ``CREATE_STEPS`` or ``EXEC_STEPS`` in the child through
:func:`run_steps`. Each step is a small function run in a fixed order; the first one that
fails stops the sequence with a :class:`StepError` naming the step, the errno and the message,
which the spawner passes back to the agent as a structured failure.

Creating a container (``CREATE_STEPS``), in the child the spawner forked:

1. signals and stdio: default signal dispositions, the given stdio on 0/1/2, oom_score_adj
   (through the guest's /proc: the container's may not be mounted, or never be)
2. the cgroup: join it before any cgroup namespace is made, so that it becomes its root
3. namespaces: join those given by path (user first), create a user namespace (the parent
   writes its id maps), create the others. A PID namespace only applies to the children of
   whoever enters it: the spawner enters it for the one fork that makes this process (PID 1
   inside), except with a user namespace, which must own the PID namespace; then this
   process makes it after the user namespace and forks once more, and its parent reports the
   child's pid to the spawner and exits. Then a new session (the pty as its terminal).
4. the root filesystem (with a mount namespace): mounts made slave so nothing leaks to the
   guest, the rootfs bound onto itself, the spec's mounts, default devices; the OCI hooks
   prestart and createRuntime (the spawner runs them in the runtime's namespaces while this
   process waits) and createContainer (run here); pivot_root (or, when the guest runs from
   its initramfs, which cannot be pivoted away from, a move + chroot)
5. the UTS names, sysctls, read-only and masked paths, a read-only root
6. the console, when the process wants a terminal and the agent asked for one made inside
   the container: a pty from the container's own devpts (so ``tty`` names it), whose master
   goes back to the agent; then rlimits, capability bounding set, user and groups,
   capabilities, no_new_privs, working directory, stray fds closed
7. report "ready" and hold until the spawner says "start" (the OCI create/start split), then
   run the startContainer hooks
8. seccomp (last, when no_new_privs allows it; otherwise before the privileges are dropped,
   while CAP_SYS_ADMIN still permits loading a filter) and exec

Exec into a running container (``EXEC_STEPS``) shares 1, 2 and 6 with creation and joins the
container's namespaces through ``/proc/<pid>/ns/*`` instead of making new ones.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import stat
import struct
import termios
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..linux import capabilities as caps
from ..linux import mounts as m
from ..linux import namespaces as ns
from ..linux import prctl
from ..linux.users import setgroups
from ..linux.uts import setdomainname, sethostname
from . import hooks
from .paths import make_mount_point, resolve_in_root
from .spec import Mount, Process, Seccomp, Spec

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Devices every container gets in a /dev it mounts itself, bound from the guest's /dev
# (binding works inside a user namespace, where mknod does not).
DEFAULT_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEFAULT_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
# Joined in this order: the user namespace first grants the capabilities the other joins
# need; the mount namespace last, because joining it changes our root and cwd.
JOIN_ORDER = ("user", "cgroup", "ipc", "uts", "network", "pid", "mount")
# Python ignores or handles these; a container must start with the defaults.
_RESET_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_RLIM_INFINITY_JSON = 2**64 - 1


class Channel(Protocol):
    """The child's end of its link to the spawner."""

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None: ...

    def recv(self) -> dict[str, Any] | None: ...  # None: the spawner went away

    def fileno(self) -> int: ...


class StepError(Exception):
    """Setup stopped at ``step`` with ``errno`` (0 when not a system error)."""

    def __init__(self, step: str, errno_: int, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.errno = errno_
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "errno": self.errno, "message": self.message}


class Context:
    """What the steps need, and what they learn along the way."""

    __slots__ = (
        "bundle",
        "cgroup",
        "channel",
        "console",
        "container_id",
        "fork_for_pid_ns",
        "hold",
        "in_user_ns",
        "join_pid",
        "joined_mount_ns",
        "no_pivot",
        "pid_ns_ready",
        "process",
        "rootfs",
        "seccomp",
        "spec",
        "stdio",
    )

    def __init__(
        self,
        process: Process,
        stdio: list[int],
        *,
        spec: Spec | None = None,  # None for exec
        bundle: str = "",
        rootfs: str = "",  # absolute host path
        cgroup: str = "",  # cgroup directory to join; "" stays in the spawner's
        seccomp: Seccomp | None = None,
        no_pivot: bool = False,  # the guest root is the initramfs: move + chroot instead
        fork_for_pid_ns: bool = False,  # the spawner predicts it and waits for our "pid"
        pid_ns_ready: bool = False,  # the spawner forked us straight into the PID namespace
        join_pid: int = 0,  # exec: a process of the container to join
        hold: bool = False,  # create: wait for "start" before exec
        console: bool = False,  # make the pty inside the container; stdio is then empty
        container_id: str = "",  # create: for the OCI hooks' state
    ) -> None:
        self.process = process
        self.stdio = stdio  # 3 fds (stdin, stdout, stderr), 1 (a pty slave), or none (console)
        self.channel: Channel = cast(Channel, None)  # the spawner sets it in the child
        self.spec = spec
        self.bundle = bundle
        self.rootfs = rootfs
        self.cgroup = cgroup
        self.seccomp = seccomp
        self.no_pivot = no_pivot
        self.fork_for_pid_ns = fork_for_pid_ns
        self.pid_ns_ready = pid_ns_ready
        self.join_pid = join_pid
        self.hold = hold
        self.console = console
        self.container_id = container_id
        # learnt along the way
        self.in_user_ns = False
        self.joined_mount_ns = False


Step = Callable[[Context], None]


def _named(name: str) -> Callable[[Step], Step]:
    def mark(fn: Step) -> Step:
        fn.step_name = name  # type: ignore[attr-defined]
        return fn

    return mark


def run_steps(steps: tuple[Step, ...], ctx: Context) -> None:
    """Run ``steps`` in order; the first failure becomes a :class:`StepError`."""
    for step in steps:
        name = getattr(step, "step_name", step.__name__)
        try:
            step(ctx)
        except StepError:
            raise
        except OSError as exc:
            raise StepError(name, exc.errno or 0, _describe(exc)) from exc
        except Exception as exc:
            raise StepError(name, 0, f"{type(exc).__name__}: {exc}") from exc


def _describe(exc: OSError) -> str:
    if exc.strerror is None:
        return str(exc)
    if exc.filename is not None:
        return f"{exc.strerror}: {exc.filename!r}"
    return exc.strerror


# --- 1. signals and stdio --------------------------------------------------------------------


@_named("reset_signals")
def reset_signals(ctx: Context) -> None:
    # The spawner's SIGCHLD wake-up pipe must not hear about this process's own children.
    signal.set_wakeup_fd(-1)
    for signo in _RESET_SIGNALS:
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


@_named("setup_stdio")
def setup_stdio(ctx: Context) -> None:
    if not ctx.stdio:
        # The console comes later (open_console); until then nothing of the spawner's.
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        try:
            for target in range(3):
                os.dup2(null, target, inheritable=True)
        finally:
            os.close(null)
        return
    # Move the received fds out of the way first: one of them could be 0, 1 or 2 already.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in ctx.stdio]
    targets = high * 3 if len(high) == 1 else high
    for target, fd in enumerate(targets[:3]):
        os.dup2(fd, target, inheritable=True)
    for fd in {*high, *ctx.stdio}:
        if fd > 2:
            os.close(fd)


@_named("new_session")
def new_session(ctx: Context) -> None:
    # Its own session, so that "kill -TERM 0" in the container cannot reach the agent.
    # After the PID-namespace fork: a session leader that exits hangs up its terminal.
    os.setsid()
    if ctx.process.terminal and not ctx.console:
        _take_terminal(ctx)


def _take_terminal(ctx: Context) -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    if ctx.process.console_size:
        height, width = ctx.process.console_size
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


# --- 2. cgroup -------------------------------------------------------------------------------


@_named("join_cgroup")
def join_cgroup(ctx: Context) -> None:
    if ctx.cgroup:
        with open(os.path.join(ctx.cgroup, "cgroup.procs"), "w") as f:
            f.write("0")  # the writer itself, whatever its pid in the namespace it is in


# --- 3. namespaces ---------------------------------------------------------------------------


def _flag(type_: str) -> int:
    return ns.OCI_NAMESPACES[type_][0]


@_named("join_namespaces")
def join_namespaces(ctx: Context) -> None:
    """setns() into every namespace the spec gives a path for."""
    assert ctx.spec is not None
    by_type = {n.type: n.path for n in ctx.spec.linux.namespaces if n.path}
    if ctx.pid_ns_ready:
        by_type.pop("pid", None)
    # Open them all first: joining one (mount, user) can change what a path means.
    opened = []
    try:
        for type_ in JOIN_ORDER:
            if type_ in by_type:
                path = by_type[type_]
                opened.append((type_, os.open(path, os.O_RDONLY | os.O_CLOEXEC), path))
        for type_, fd, path in opened:
            try:
                ns.setns(fd, _flag(type_))
            except OSError as exc:
                raise OSError(exc.errno, f"join {type_} namespace {path}: {exc.strerror}") from None
            if type_ == "user":
                ctx.in_user_ns = True
            elif type_ == "mount":
                ctx.joined_mount_ns = True
    finally:
        for _type, fd, _path in opened:
            os.close(fd)


@_named("create_user_namespace")
def create_user_namespace(ctx: Context) -> None:
    assert ctx.spec is not None
    user = ctx.spec.linux.namespace("user")
    if user is None or user.path:
        return
    ns.unshare(ns.CLONE_NEWUSER)
    # Only a process with privileges in the parent namespace may write our maps.
    ctx.channel.send({"userns": True})
    reply = ctx.channel.recv()
    if reply is None or "error" in reply:
        message = reply["error"] if reply else "the spawner went away"
        raise OSError(errno.EPERM, f"writing the uid/gid maps: {message}")
    ctx.in_user_ns = True
    # Become the container's root (when mapped), so that what setup creates is owned by it.
    if any(r.container_id == 0 for r in ctx.spec.linux.gid_mappings):
        os.setresgid(0, 0, 0)
    if any(r.container_id == 0 for r in ctx.spec.linux.uid_mappings):
        os.setresuid(0, 0, 0)


@_named("create_namespaces")
def create_namespaces(ctx: Context) -> None:
    assert ctx.spec is not None
    flags = 0
    for namespace in ctx.spec.linux.namespaces:
        if namespace.path or namespace.type == "user":
            continue
        if namespace.type == "pid" and ctx.pid_ns_ready:
            continue
        flags |= _flag(namespace.type)
    if flags:
        ns.unshare(flags)


@_named("enter_pid_namespace")
def enter_pid_namespace(ctx: Context) -> None:
    """Fork so that the rest runs in the new (or joined) PID namespace, as PID 1 if new.

    The parent reports its child's pid to the spawner and exits; the spawner, a child
    subreaper, inherits and reaps the child.
    """
    if not ctx.fork_for_pid_ns:
        return
    pid = os.fork()
    if pid:
        try:
            ctx.channel.send({"pid": pid})
        finally:
            os._exit(0)


@_named("join_container_namespaces")
def join_container_namespaces(ctx: Context) -> None:
    """Exec: join each namespace in which the container's process differs from us."""
    proc = f"/proc/{ctx.join_pid}"
    opened = []
    try:
        # Our root before a possible mount-namespace join: a container made without a mount
        # namespace lives in a chroot, which setns() does not give us.
        root_fd = os.open(f"{proc}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        opened.append(("", root_fd))
        for type_ in JOIN_ORDER:
            name = ns.OCI_NAMESPACES[type_][1]
            theirs = os.stat(f"{proc}/ns/{name}")
            ours = os.stat(f"/proc/self/ns/{name}")
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                opened.append((type_, os.open(f"{proc}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)))
        for type_, fd in opened[1:]:
            try:
                ns.setns(fd, _flag(type_))
            except OSError as exc:
                message = f"join {type_} namespace of {proc}: {exc.strerror}"
                raise OSError(exc.errno, message) from None
            ctx.in_user_ns |= type_ == "user"
            ctx.joined_mount_ns |= type_ == "mount"
        if not ctx.joined_mount_ns:
            os.fchdir(root_fd)
            os.chroot(".")
    finally:
        for _type, fd in opened:
            os.close(fd)


# --- 4. root filesystem ----------------------------------------------------------------------


def _sets_up_rootfs(ctx: Context) -> bool:
    # With no mount namespace, or someone else's, the mount table is not ours to change.
    assert ctx.spec is not None
    mount_ns = ctx.spec.linux.namespace("mount")
    return mount_ns is not None and not mount_ns.path


@_named("make_mounts_private")
def make_mounts_private(ctx: Context) -> None:
    assert ctx.spec is not None
    if not _sets_up_rootfs(ctx):
        return
    # Slave: the guest's later mounts still show up, ours never go back. pivot_root also
    # refuses shared mounts. "private" in the spec asks for no propagation at all.
    private = ctx.spec.linux.rootfs_propagation in ("private", "rprivate")
    m.mount(None, "/", None, m.MS_REC | (m.MS_PRIVATE if private else m.MS_SLAVE))


@_named("bind_rootfs")
def bind_rootfs(ctx: Context) -> None:
    if not _sets_up_rootfs(ctx):
        return
    # pivot_root needs the new root to be a mount point.
    m.mount(ctx.rootfs, ctx.rootfs, None, m.MS_BIND | m.MS_REC)


@_named("mount_spec_mounts")
def mount_spec_mounts(ctx: Context) -> None:
    assert ctx.spec is not None
    if not _sets_up_rootfs(ctx):
        return
    for mount in ctx.spec.mounts:
        try:
            _mount_one(ctx, mount)
        except OSError as exc:
            raise OSError(exc.errno, f"{mount.destination}: {exc.strerror}") from None


def _mount_one(ctx: Context, mount: Mount) -> None:
    options = mount.parsed_options
    if mount.is_bind:
        source = mount.source
        if not source.startswith("/"):
            source = os.path.join(ctx.bundle, source)
        is_dir = stat.S_ISDIR(os.stat(source).st_mode)
        target = make_mount_point(ctx.rootfs, mount.destination, directory=is_dir)
        m.mount(source, target, None, m.MS_BIND | (options.flags & m.MS_REC))
        extra = options.flags & ~(m.MS_BIND | m.MS_REC)
        if extra:
            # Bind mounts ignore flags; a remount applies them (keeping those the kernel
            # locked when the source came from a more privileged namespace).
            locked = m.mount_flags_of(target) if ctx.in_user_ns else 0
            m.mount(None, target, None, m.MS_BIND | m.MS_REMOUNT | extra | locked)
    else:
        fstype = mount.type
        if fstype in ("proc", "sysfs"):
            # A symlink here could aim these at a place the container should not see into.
            where = resolve_in_root(ctx.rootfs, mount.destination)
            if os.path.islink(where):
                raise OSError(errno.ELOOP, f"{fstype} mount point is a symlink")
        if fstype == "cgroup":
            fstype = "cgroup2"  # the guest is cgroup v2 only (DESIGN decision 6)
        target = make_mount_point(ctx.rootfs, mount.destination)
        try:
            m.mount(mount.source or fstype, target, fstype, options.flags, options.data or None)
        except OSError as exc:
            if fstype == "cgroup2" and ctx.in_user_ns and ctx.cgroup:
                # Under the read-only /sys bound below, /sys/fs/cgroup is the guest's own
                # cgroup2 mount, locked there: the kernel refuses the same filesystem over
                # its own root (EBUSY); without a cgroup namespace of its own the mount is
                # refused outright (EPERM). The container's cgroup directory bound in its
                # place shows what a cgroup namespace would.
                _bind_cgroup(ctx, target, options.flags)
            elif fstype == "sysfs" and ctx.in_user_ns and isinstance(exc, PermissionError):
                # The kernel lets a user namespace mount sysfs only together with a network
                # namespace of its own; one that shares the sandbox's network gets the
                # guest's /sys bound read-only instead (what other OCI runtimes do too).
                m.mount("/sys", target, None, m.MS_BIND | m.MS_REC)
                locked = m.mount_flags_of(target)
                ro = m.MS_RDONLY | m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC
                m.mount(None, target, None, m.MS_BIND | m.MS_REMOUNT | ro | locked)
            else:
                raise
    if options.propagation:
        m.mount(None, target, None, options.propagation)


def _mounts_dev(ctx: Context) -> bool:
    assert ctx.spec is not None
    return any(mt.destination.rstrip("/") == "/dev" and not mt.is_bind for mt in ctx.spec.mounts)


def _bind_cgroup(ctx: Context, target: str, flags: int) -> None:
    m.mount(ctx.cgroup, target, None, m.MS_BIND | m.MS_REC)
    extra = flags & (m.MS_RDONLY | m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC)
    m.mount(None, target, None, m.MS_BIND | m.MS_REMOUNT | extra | m.mount_flags_of(target))


@_named("create_devices")
def create_devices(ctx: Context) -> None:
    assert ctx.spec is not None
    if not _sets_up_rootfs(ctx):
        return
    if _mounts_dev(ctx):
        # Only into a /dev we mounted: never write into the image's own /dev.
        for name in DEFAULT_DEVICES:
            target = make_mount_point(ctx.rootfs, f"/dev/{name}", directory=False)
            m.mount(f"/dev/{name}", target, None, m.MS_BIND)
        for name, link in DEFAULT_LINKS:
            where = resolve_in_root(ctx.rootfs, f"/dev/{name}")
            if not os.path.lexists(where):
                os.symlink(link, where)
    for device in ctx.spec.linux.devices:
        _create_device(ctx, device)


def _create_device(ctx: Context, device: Any) -> None:
    kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
    mode = device.file_mode if device.file_mode is not None else 0o666
    if ctx.in_user_ns:
        # mknod is not allowed in a user namespace: bind the guest's node instead.
        target = make_mount_point(ctx.rootfs, device.path, directory=False)
        m.mount(device.path, target, None, m.MS_BIND)
        return
    target = resolve_in_root(ctx.rootfs, device.path)
    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
    if os.path.lexists(target):
        os.unlink(target)
    os.mknod(target, kinds[device.type] | mode, os.makedev(device.major, device.minor))
    os.chmod(target, mode)  # mknod applied our umask
    if device.uid is not None or device.gid is not None:
        uid = device.uid if device.uid is not None else -1
        os.chown(target, uid, device.gid if device.gid is not None else -1)


@_named("create_runtime_hooks")
def run_create_runtime_hooks(ctx: Context) -> None:
    """prestart, then createRuntime: they belong in the runtime's namespaces, which this
    process has left, so the spawner runs them (see ``oci.hooks``) while it waits here."""
    assert ctx.spec is not None
    if not (ctx.spec.hooks.prestart or ctx.spec.hooks.create_runtime):
        return
    state = hooks.state(ctx.spec, ctx.container_id, ctx.bundle, "creating")
    ctx.channel.send({"hooks": "createRuntime", "state": state})  # the spawner adds our pid
    reply = ctx.channel.recv()
    if reply is None:
        os._exit(1)  # the spawner is gone: nobody waits for this container any more
    if not reply.get("hooks_done"):
        raise hooks.HookError(reply.get("errno") or 0, reply.get("message") or "failed")


@_named("create_container_hooks")
def run_create_container_hooks(ctx: Context) -> None:
    """In the container's namespaces but before pivot_root: the path resolves in the
    runtime's file system; the pid in the state is ours as the container sees it."""
    assert ctx.spec is not None
    if ctx.spec.hooks.create_container:
        state = hooks.state(ctx.spec, ctx.container_id, ctx.bundle, "creating", os.getpid())
        hooks.run_all("createContainer", ctx.spec.hooks.create_container, state)


@_named("pivot_root")
def pivot_root(ctx: Context) -> None:
    if not _sets_up_rootfs(ctx):
        return
    os.chdir(ctx.rootfs)
    if ctx.no_pivot:
        # The initramfs cannot be pivoted away from: move the rootfs over "/" and chroot.
        m.mount(ctx.rootfs, "/", None, m.MS_MOVE)
        os.chroot(".")
    else:
        # pivot_root(".", ".") stacks the old root on top of the new one at "/"; made a
        # slave, it can be detached without the unmount propagating to the guest.
        m.pivot_root(".", ".")
        m.mount(None, ".", None, m.MS_SLAVE | m.MS_REC)
        m.umount2(".", m.MNT_DETACH)
    os.chdir("/")


@_named("chroot_rootfs")
def chroot_rootfs(ctx: Context) -> None:
    """Without a mount namespace of our own, the rootfs is only a chroot."""
    if _sets_up_rootfs(ctx) or ctx.joined_mount_ns:
        return
    if os.path.realpath(ctx.rootfs) != "/":
        os.chroot(ctx.rootfs)
    os.chdir("/")


@_named("set_rootfs_propagation")
def set_rootfs_propagation(ctx: Context) -> None:
    assert ctx.spec is not None
    propagation = ctx.spec.linux.rootfs_propagation
    if propagation and _sets_up_rootfs(ctx):
        m.mount(None, "/", None, m.PROPAGATION_OPTIONS[propagation] | m.MS_REC)


# --- 5. names, sysctls, read-only and masked paths -------------------------------------------


@_named("set_hostname")
def set_hostname(ctx: Context) -> None:
    assert ctx.spec is not None
    if ctx.spec.hostname:
        sethostname(ctx.spec.hostname)
    if ctx.spec.domainname:
        setdomainname(ctx.spec.domainname)


@_named("write_sysctls")
def write_sysctls(ctx: Context) -> None:
    assert ctx.spec is not None
    for key, value in ctx.spec.linux.sysctl.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            raise OSError(exc.errno, f"sysctl {key}={value}: {exc.strerror}") from None


@_named("make_paths_readonly")
def make_paths_readonly(ctx: Context) -> None:
    assert ctx.spec is not None
    for path in ctx.spec.linux.readonly_paths:
        if not os.path.lexists(path):
            continue
        try:
            m.mount(path, path, None, m.MS_BIND | m.MS_REC)
            flags = m.mount_flags_of(path) | m.MS_RDONLY
            m.mount(None, path, None, m.MS_BIND | m.MS_REMOUNT | flags)
        except OSError as exc:
            raise OSError(exc.errno, f"{path}: {exc.strerror}") from None


@_named("mask_paths")
def mask_paths(ctx: Context) -> None:
    assert ctx.spec is not None
    for path in ctx.spec.linux.masked_paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                m.mount("tmpfs", path, "tmpfs", m.MS_RDONLY)
            elif os.path.lexists(path):
                m.mount("/dev/null", path, None, m.MS_BIND)
        except OSError as exc:
            raise OSError(exc.errno, f"{path}: {exc.strerror}") from None


@_named("make_root_readonly")
def make_root_readonly(ctx: Context) -> None:
    assert ctx.spec is not None
    if ctx.spec.root.readonly:
        flags = m.mount_flags_of("/") | m.MS_RDONLY
        m.mount(None, "/", None, m.MS_BIND | m.MS_REMOUNT | flags)


# --- 6. the console, the process ------------------------------------------------------------


@_named("open_console")
def open_console(ctx: Context) -> None:
    """A pty from the container's devpts: stdio and controlling terminal; master to the agent.

    After the mounts (or the joins), so /dev/ptmx is the container's and the slave has a
    name there. Before the user switch, like the rest of setup, but the slave is handed to
    the process's user, so that it can open its own terminal again by name.
    """
    if not ctx.console:
        return
    master, slave = os.openpty()  # /dev/ptmx, then /dev/pts/N: both the container's now
    try:
        for target in range(3):
            os.dup2(slave, target, inheritable=True)
        _take_terminal(ctx)
        try:
            os.fchown(slave, ctx.process.user.uid, -1)
        except OSError:
            pass  # the uid is not mapped in a user namespace: the terminal still works
        ctx.channel.send({"console": True}, [master])
    finally:
        os.close(master)
        os.close(slave)


@_named("set_rlimits")
def set_rlimits(ctx: Context) -> None:
    # Before the user switch: raising a hard limit needs CAP_SYS_RESOURCE.
    for rlimit in ctx.process.rlimits:
        number = getattr(resource, rlimit.type)
        soft, hard = (
            resource.RLIM_INFINITY if v == _RLIM_INFINITY_JSON else v
            for v in (rlimit.soft, rlimit.hard)
        )
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as exc:
            code = getattr(exc, "errno", None) or errno.EINVAL
            raise OSError(code, f"setrlimit({rlimit.type}, {soft}, {hard}): {exc}") from None


@_named("set_oom_score_adj")
def set_oom_score_adj(ctx: Context) -> None:
    # Unset means 0, not inherited: the agent protects itself with a low score (DESIGN
    # decision 3), and its containers must not share that protection.
    value = ctx.process.oom_score_adj or 0
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


def _seccomp_early(ctx: Context) -> bool:
    # Loading a filter needs no_new_privs or CAP_SYS_ADMIN; without no_new_privs it must
    # happen before the capabilities go.
    return ctx.seccomp is not None and not ctx.process.no_new_privileges


@_named("seccomp")
def install_seccomp_early(ctx: Context) -> None:
    if _seccomp_early(ctx):
        from . import seccomp_filter

        seccomp_filter.load(ctx.seccomp)  # type: ignore[arg-type]


@_named("drop_bounding_capabilities")
def drop_bounding_capabilities(ctx: Context) -> None:
    capabilities = ctx.process.capabilities
    if capabilities is not None:
        caps.limit_bounding_set(caps.mask_of(capabilities.bounding))


@_named("switch_user")
def switch_user(ctx: Context) -> None:
    user = ctx.process.user
    # Keep the permitted set across a setuid away from root; set_capabilities then trims it
    # to the spec. With no capabilities in the spec the kernel's usual rules apply.
    keep = ctx.process.capabilities is not None
    if keep:
        prctl.set_keepcaps(True)
    setgroups(user.additional_gids)
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if keep:
        prctl.set_keepcaps(False)
    os.umask(user.umask if user.umask is not None else 0o022)


@_named("set_capabilities")
def set_capabilities(ctx: Context) -> None:
    capabilities = ctx.process.capabilities
    if capabilities is None:
        return
    known = (1 << (caps.last_cap() + 1)) - 1
    permitted = caps.mask_of(capabilities.permitted) & known
    inheritable = caps.mask_of(capabilities.inheritable) & known
    effective = caps.mask_of(capabilities.effective) & known
    caps.capset(effective, permitted, inheritable)
    # The kernel only lets a capability be ambient if it is permitted and inheritable;
    # others are skipped, as other runtimes do, rather than failing the container.
    caps.set_ambient(caps.mask_of(capabilities.ambient) & permitted & inheritable)


@_named("set_no_new_privileges")
def set_no_new_privileges(ctx: Context) -> None:
    if ctx.process.no_new_privileges:
        prctl.set_no_new_privs()


@_named("change_directory")
def change_directory(ctx: Context) -> None:
    # After the user switch, so that the user's own permissions decide.
    os.chdir(ctx.process.cwd)


@_named("close_fds")
def close_fds(ctx: Context) -> None:
    # Whatever the spawner had open must not reach the container; the channel closes
    # itself at exec (close-on-exec), which is how the spawner learns exec succeeded.
    keep = ctx.channel.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)


# --- 7. hold, 8. seccomp and exec ------------------------------------------------------------


@_named("wait_for_start")
def wait_for_start(ctx: Context) -> None:
    if not ctx.hold:
        return
    ctx.channel.send({"ready": True})
    message = ctx.channel.recv()
    if message is None:
        os._exit(1)  # the spawner is gone: nobody will ever start us
    if not message.get("start"):
        raise OSError(errno.EPROTO, f"expected start, got {message!r}")


@_named("start_container_hooks")
def run_start_container_hooks(ctx: Context) -> None:
    """In the container, as the process's user, just before its program: paths resolve in
    the container. Not for exec (no spec)."""
    if ctx.spec is not None and ctx.spec.hooks.start_container:
        state = hooks.state(ctx.spec, ctx.container_id, ctx.bundle, "created", os.getpid())
        hooks.run_all("startContainer", ctx.spec.hooks.start_container, state)


@_named("seccomp")
def install_seccomp(ctx: Context) -> None:
    if ctx.seccomp is not None and not _seccomp_early(ctx):
        from . import seccomp_filter

        seccomp_filter.load(ctx.seccomp)


def find_executable(name: str, path: str) -> str:
    """Resolve ``args[0]`` the way execvp does, but with the container's PATH."""
    if "/" in name:
        return name
    denied = False
    for directory in (path or DEFAULT_PATH).split(":"):
        candidate = os.path.join(directory or ".", name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        denied = True
    if denied:
        raise OSError(errno.EACCES, f"{name}: found in PATH but not executable")
    raise OSError(errno.ENOENT, f"{name}: not found in PATH {path or DEFAULT_PATH}")


@_named("exec")
def exec_process(ctx: Context) -> None:
    env = ctx.process.env_dict()
    executable = find_executable(ctx.process.args[0], env.get("PATH", DEFAULT_PATH))
    try:
        os.execve(executable, list(ctx.process.args), env)
    except OSError as exc:
        raise OSError(exc.errno, f"execve {executable!r}: {exc.strerror}") from None


# --- the sequences ---------------------------------------------------------------------------

_PROCESS_STEPS: tuple[Step, ...] = (
    open_console,
    set_rlimits,
    install_seccomp_early,
    drop_bounding_capabilities,
    switch_user,
    set_capabilities,
    set_no_new_privileges,
    change_directory,
    close_fds,
    wait_for_start,
    run_start_container_hooks,
    install_seccomp,
    exec_process,
)

CREATE_STEPS: tuple[Step, ...] = (
    reset_signals,
    setup_stdio,
    set_oom_score_adj,
    join_cgroup,
    join_namespaces,
    create_user_namespace,
    create_namespaces,
    enter_pid_namespace,
    new_session,
    make_mounts_private,
    bind_rootfs,
    mount_spec_mounts,
    create_devices,
    run_create_runtime_hooks,
    run_create_container_hooks,
    pivot_root,
    chroot_rootfs,
    set_rootfs_propagation,
    set_hostname,
    write_sysctls,
    make_paths_readonly,
    mask_paths,
    make_root_readonly,
    *_PROCESS_STEPS,
)

EXEC_STEPS: tuple[Step, ...] = (
    reset_signals,
    setup_stdio,
    set_oom_score_adj,
    join_cgroup,
    join_container_namespaces,
    enter_pid_namespace,
    new_session,
    *_PROCESS_STEPS,
)


def step_names(steps: tuple[Step, ...]) -> list[str]:
    return [getattr(s, "step_name", s.__name__) for s in steps]
