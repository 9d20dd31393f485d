"""A private containerd for tests and benchmarks, and a local busybox OCI image to run in it.

``Containerd(root)`` runs Debian's containerd 1.6 with everything under ``root``: its config,
content store, state, sockets and log. It never touches the system's ``/var/lib/containerd``
or ``/run/containerd`` itself and needs no systemd unit; ``ctr(...)`` talks to it with the right
``--address``/``--namespace``. ``build_busybox_image`` writes a reproducible OCI archive
(the host's static busybox) without network, ``import_image`` loads it.

What the runtime v2 shims do on their own, and this harness cannot redirect (containerd 1.6):

* ``containerd-shim-runc-v2`` puts its ttrpc socket in ``/run/containerd/s/<sha256>``, a
  compiled-in path (containerd#12444; the hash covers containerd's address, namespace and
  container id, so it never collides with a system containerd's shims). The shim removes it
  when it exits cleanly; ``stop()`` removes the then-empty directories if they were not there
  before and no other containerd runs.
* runc keeps its own state in ``/run/containerd/runc/<namespace>`` and ctr its stdio FIFOs in
  ``/run/containerd/fifo`` unless told otherwise: ``run_args`` passes ``--runc-root`` and
  ``--fifo-dir`` so that both live under ``root`` instead.
* runc creates cgroups ``/sys/fs/cgroup/<controller>/<namespace>/<id>`` (cgroup v1 here) and
  removes ``<id>`` on delete; the empty ``<namespace>`` directories stay.

Importable from qemu-test tests (``import containerd_support``) and from ``bench/`` with
``qemu-test/`` on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

RUNC_RUNTIME = "io.containerd.runc.v2"
DEFAULT_REF = "localhost/bulkhead/busybox:test"
# The usual root PATH, appended so that runc (/usr/sbin) is found even from a trimmed PATH.
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
BUSYBOX = Path("/bin/busybox")
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
# Where containerd-shim-runc-v2 puts its sockets whatever the config says (compiled in).
SHIM_SOCKET_DIR = Path("/run/containerd/s")

T = TypeVar("T")


class ContainerdError(RuntimeError):
    """containerd did not start or stop, or a ``ctr`` command failed."""


def containerd_available() -> str | None:
    """Why containerd tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "containerd, runc and overlay mounts need root"
    for tool in (CONTAINERD_BIN, CTR_BIN, "runc", "containerd-shim-runc-v2"):
        if shutil.which(tool, path=os.pathsep.join(SYSTEM_PATH)) is None:
            return f"{tool} is not installed (scripts/bootstrap.sh installs containerd and runc)"
    return None


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class ShimProcess:
    pid: int
    argv: tuple[str, ...]


class Containerd:
    """A containerd of our own under ``root`` (keep it short: unix socket paths <= 107 bytes).

    Layout: ``config.toml``, ``root/`` (content, snapshots, metadata), ``state/`` (bundles),
    ``containerd.sock`` (grpc), ``containerd.sock.ttrpc``, ``containerd.log`` (debug level),
    ``runc/`` (runc's state, see ``run_args``) and ``opt/`` (the opt plugin's directory, which
    would otherwise be ``/opt/containerd``).

    ``snapshotter=None`` picks ``overlayfs`` when containerd's own probe (a test mount at plugin
    load) accepts ``root``'s filesystem, else ``native``; ``ctr`` calls use it through
    ``CONTAINERD_SNAPSHOTTER`` so that imports unpack to the snapshotter that runs use.
    """

    def __init__(
        self,
        root: Path,
        *,
        namespace: str = "bulkhead-test",
        extra_path: Sequence[str] = (),
        snapshotter: str | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.namespace = namespace
        self.extra_path = tuple(str(p) for p in extra_path)
        self.config_path = self.root / "config.toml"
        self.data_dir = self.root / "root"
        self.state_dir = self.root / "state"
        self.address = self.root / "containerd.sock"
        self.ttrpc_address = self.root / "containerd.sock.ttrpc"
        self.log_path = self.root / "containerd.log"
        self.runc_root = self.root / "runc"
        self.opt_dir = self.root / "opt"
        self.fifo_dir = self.root / "fifo"
        self._requested_snapshotter = snapshotter
        self.snapshotter = snapshotter or "overlayfs"
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_dir_existed = True
        if len(os.fsencode(self.ttrpc_address)) > UNIX_PATH_MAX:
            raise ValueError(f"{self.root} is too long for unix sockets under it; use a short dir")

    # -- environment and configuration -------------------------------------------------

    @property
    def path(self) -> str:
        """containerd's PATH: shims are found by name (containerd-shim-<name>-v2) on it.

        The interpreter's directory is taken as is, not through symlinks: in a venv the console
        scripts (containerd-shim-bulkhead-v2) sit beside the venv's python symlink.
        """
        dirs = [*self.extra_path, os.path.dirname(sys.executable)]
        dirs += os.environ.get("PATH", "").split(os.pathsep) + list(SYSTEM_PATH)
        return os.pathsep.join(dict.fromkeys(d for d in dirs if d))

    def daemon_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = self.path
        # A client variable in the test process must not leak into containerd or the shims.
        for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"):
            env.pop(var, None)
        return env

    def ctr_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERD_SNAPSHOTTER"] = self.snapshotter
        env.update(extra or {})
        return env

    def config_text(self) -> str:
        def q(value: object) -> str:
            return json.dumps(str(value))  # a JSON string is a valid TOML basic string

        return "\n".join(
            [
                "version = 2",
                f"root = {q(self.data_dir)}",
                f"state = {q(self.state_dir)}",
                # CRI is for kubelet and wants CNI; the snapshotters below cannot work here and
                # only fill the log with load errors.
                "disabled_plugins = ["
                + ", ".join(
                    q(p)
                    for p in (
                        "io.containerd.grpc.v1.cri",
                        "io.containerd.snapshotter.v1.aufs",
                        "io.containerd.snapshotter.v1.btrfs",
                        "io.containerd.snapshotter.v1.devmapper",
                        "io.containerd.snapshotter.v1.zfs",
                    )
                )
                + "]",
                "",
                "[grpc]",
                f"  address = {q(self.address)}",
                "",
                "[ttrpc]",
                f"  address = {q(self.ttrpc_address)}",
                "",
                # containerd 1.6 has no log-file option: it logs to stderr, which start()
                # sends to log_path.
                "[debug]",
                '  level = "debug"',
                "",
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {q(self.opt_dir)}",
                "",
            ]
        )

    # -- lifecycle -----------------------------------------------------------------------

    def _dirs(self) -> tuple[Path, ...]:
        return (
            self.root,
            self.data_dir,
            self.state_dir,
            self.runc_root,
            self.opt_dir,
            self.fifo_dir,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running():
            return
        for d in self._dirs():
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._run_dir_existed = SHIM_SOCKET_DIR.parent.exists()
        # A containerd killed earlier may have left its sockets; ours to clear.
        self._remove_sockets()
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C meant for pytest must not kill containerd before stop().
            self._proc = subprocess.Popen(
                [CONTAINERD_BIN, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.daemon_env(),
                cwd=self.root,
                start_new_session=True,
            )
        try:
            wait_for(self._ready, timeout, f"containerd at {self.address}", interval=0.05)
            if self._requested_snapshotter is None:
                self.snapshotter = self._pick_snapshotter()
        except BaseException as exc:
            self.stop()
            raise ContainerdError(f"containerd did not start: {exc}\n{self.log_tail()}") from exc

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise ContainerdError(f"containerd exited with {self._proc and self._proc.returncode}")
        if not self.address.is_socket():
            return False
        return self.ctr("version", check=False, timeout=5).returncode == 0

    def _pick_snapshotter(self) -> str:
        """overlayfs where it works (it is what production uses, and what a shim is handed as
        rootfs mounts), else native (plain copies: e.g. when ``root`` is on overlayfs itself,
        which cannot be an overlay upper dir)."""
        out = self.ctr("plugins", "ls").stdout.decode()
        for line in out.splitlines():
            fields = line.split()
            if fields[:2] == ["io.containerd.snapshotter.v1", "overlayfs"]:
                return "overlayfs" if fields[-1] == "ok" else "native"
        return "native"

    def stop(self, timeout: float = 15.0) -> list[ShimProcess]:
        """SIGTERM, then SIGKILL after ``timeout``. Returns shims still serving this containerd
        (they outlive it by design, so a clean test expects an empty list); kills none."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        # containerd 1.6 removes its grpc socket on exit but not the ttrpc one.
        self._remove_sockets()
        leftovers = self.shims()
        if not leftovers:
            self._tidy_run_dir()
        return leftovers

    def _tidy_run_dir(self) -> None:
        """Remove /run/containerd{/s,} again if our runc shims created them and left them empty.

        rmdir only ever removes empty directories, so a system containerd's is never touched;
        and nothing is removed while any other containerd runs.
        """
        if self._run_dir_existed or any(_is_containerd(p.argv) for p in _processes()):
            return  # another daemon's shim may be between mkdir and bind there
        for d in (SHIM_SOCKET_DIR, SHIM_SOCKET_DIR.parent / "fifo", SHIM_SOCKET_DIR.parent):
            with contextlib.suppress(OSError):
                d.rmdir()

    def _remove_sockets(self) -> None:
        for sock in (self.address, self.ttrpc_address):
            if sock.is_socket():  # anything else there is not ours to delete
                sock.unlink()

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        leftovers = self.stop()
        if leftovers:
            print(f"containerd {self.root}: shims left running: {leftovers}", file=sys.stderr)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no containerd log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- ctr -----------------------------------------------------------------------------

    def ctr_argv(self, *args: str) -> list[str]:
        return [CTR_BIN, "--address", str(self.address), "--namespace", self.namespace, *args]

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120.0,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr`` against this containerd; ``env`` adds to the environment.

        Without ``input`` stdin is /dev/null, as ``ctr run`` would otherwise hand the test's
        own stdin to the container. Beware: ``ctr`` 1.6 sends CloseIO only when its stdin
        ends after the task was created, so with runc a short ``input`` (read to its end
        during Create) to a process that reads to EOF hangs until ``timeout``; our shim ends
        it (see ``bulkhead_shim.stdio``).
        """
        argv = self.ctr_argv(*args)
        try:
            res = subprocess.run(
                argv,
                input=input,
                stdin=subprocess.DEVNULL if input is None else None,
                capture_output=True,
                timeout=timeout,
                env=self.ctr_env(env),
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerdError(
                f"{_cmd(argv)} timed out after {timeout}s\n"
                f"stdout: {_text(exc.stdout)}\nstderr: {_text(exc.stderr)}"
            ) from exc
        if check and res.returncode != 0:
            raise ContainerdError(
                f"{_cmd(argv)} exited with {res.returncode}\n"
                f"stdout: {_text(res.stdout)}\nstderr: {_text(res.stderr)}"
            )
        return res

    def ctr_popen(self, *args: str, **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """``ctr`` as a child process, for ``run -t`` or long-running commands."""
        extra_env = popen_kwargs.pop("env", None)
        return subprocess.Popen(self.ctr_argv(*args), env=self.ctr_env(extra_env), **popen_kwargs)

    def run_args(
        self,
        ref: str,
        container_id: str,
        *command: str,
        runtime: str = RUNC_RUNTIME,
        rm: bool = True,
        options: Sequence[str] = (),
    ) -> list[str]:
        """Arguments for ``ctr(*run_args(...))``: ``run [--rm] --runtime R [opts] REF ID CMD``.

        ``--fifo-dir`` puts ctr's stdio FIFOs under ``root`` instead of /run/containerd/fifo;
        for runc, ``--runc-root`` keeps runc's state under ``root`` rather than
        /run/containerd/runc. ctr's exit status is the container's exit status.
        """
        argv = ["run"] + (["--rm"] if rm else [])
        argv += ["--runtime", runtime, "--fifo-dir", str(self.fifo_dir)]
        if runtime == RUNC_RUNTIME:
            argv += ["--runc-root", str(self.runc_root)]
        return [*argv, *options, ref, container_id, *command]

    def run(
        self,
        ref: str,
        container_id: str,
        *command: str,
        runtime: str = RUNC_RUNTIME,
        options: Sequence[str] = (),
        check: bool = True,
        timeout: float = 120.0,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr run --rm``: the container's output and, as returncode, its exit status."""
        argv = self.run_args(ref, container_id, *command, runtime=runtime, options=options)
        return self.ctr(*argv, check=check, timeout=timeout, input=input)

    # -- inspection ----------------------------------------------------------------------

    def containers(self) -> list[str]:
        return self.ctr("containers", "ls", "-q").stdout.decode().split()

    def task_status(self) -> dict[str, str]:
        """Task id -> status (RUNNING, STOPPED, ...) from ``ctr tasks ls``."""
        # `ctr tasks ls` has no -q: skip the header; columns are TASK PID STATUS.
        lines = self.ctr("tasks", "ls").stdout.decode().splitlines()[1:]
        return {f[0]: f[-1] for f in (line.split() for line in lines) if len(f) >= 3}

    def tasks(self) -> list[str]:
        return list(self.task_status())

    def remove(self, container_id: str, timeout: float = 10.0) -> None:
        """Kill and delete ``container_id``'s task and container, whatever state they are in:
        cleanup for a test that failed half way through a run."""
        if container_id in self.task_status():
            # Fails harmlessly when the task has stopped already.
            self.ctr("tasks", "kill", "--signal", "SIGKILL", container_id, check=False)
            wait_for(
                lambda: self.task_status().get(container_id, "STOPPED") == "STOPPED",
                timeout,
                f"task {container_id} to stop",
            )
            self.ctr("tasks", "delete", container_id, check=False)
        if container_id in self.containers():
            self.ctr("containers", "delete", container_id)

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.decode().split()

    def bundle_dir(self, container_id: str) -> Path:
        return self.state_dir / "io.containerd.runtime.v2.task" / self.namespace / container_id

    def shims(self) -> list[ShimProcess]:
        """Live processes started with ``-address <our grpc socket>`` (every v2 shim is)."""
        return [p for p in _processes() if _arg_after(p.argv, "-address") == str(self.address)]

    def shim_socket(self, container_id: str) -> Path:
        """The socket containerd-shim-runc-v2 serves for ``container_id`` (a compiled-in dir;
        the name hashes containerd's address, namespace and id: no clash with other daemons)."""
        key = os.path.join(str(self.address), self.namespace, container_id)
        return SHIM_SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()

    def cgroup_dirs(self, container_id: str) -> list[Path]:
        """Cgroups runc made for ``container_id`` (``ctr run`` uses ``/<namespace>/<id>``)."""
        base = Path("/sys/fs/cgroup")
        rel = Path(self.namespace) / container_id
        candidates = [base / rel, *(d / rel for d in base.iterdir() if d.is_dir())]
        return [c for c in candidates if c.is_dir()]

    def mounts(self) -> list[str]:
        """Mount points at or under ``root`` in this mount namespace."""
        return [m for m in mount_points() if m == str(self.root) or m.startswith(f"{self.root}/")]


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
    points = []
    for line in mountinfo.read_text().splitlines():
        raw = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), raw))
    return points


def _processes() -> Iterator[ShimProcess]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if raw:
            argv = tuple(os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0"))
            yield ShimProcess(int(entry.name), argv)


def _is_containerd(argv: Sequence[str]) -> bool:
    return os.path.basename(argv[0]) == CONTAINERD_BIN


def _arg_after(argv: Sequence[str], flag: str) -> str | None:
    # Exact match: shims get Go's single-dash "-address", ctr clients "--address".
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def _cmd(argv: Iterable[str]) -> str:
    return " ".join(argv)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def time_runs(
    ctrd: Containerd,
    ref: str,
    count: int = 5,
    *,
    runtime: str = RUNC_RUNTIME,
    command: Sequence[str] = ("/bin/true",),
    prefix: str = "bench",
) -> list[float]:
    """Wall-clock seconds of ``count`` sequential ``ctr run --rm`` of ``command``.

    Each run is a whole container lifecycle as a user sees it: ctr start-up, container and
    snapshot creation, shim start, task create/start/wait/delete, snapshot removal.
    """
    times = []
    for i in range(count):
        argv = ctrd.run_args(ref, f"{prefix}-{os.getpid()}-{i}", *command, runtime=runtime)
        start = time.perf_counter()
        ctrd.ctr(*argv)
        times.append(time.perf_counter() - start)
    return times


# -- the busybox OCI image ---------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# containerd names an imported image after io.containerd.image.name when present (full ref);
# org.opencontainers.image.ref.name is the OCI spec's (tag only, as `ctr export` writes it).
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _json_bytes(obj: object) -> bytes:
    # Sorted, compact: the same image always serialises to the same bytes, hence digest.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _sha256(data), "size": len(data), **extra}


class _ReproducibleTar:
    """Tar entries kept in the order given, with fixed owners and mtimes."""

    def __init__(self) -> None:
        self.entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _add(self, name: str, kind: bytes, mode: int, data: bytes | None = None) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 0
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.size = len(data) if data is not None else 0
        self.entries.append((info, data))
        return info

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._add(name, tarfile.DIRTYPE, mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, tarfile.REGTYPE, mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, tarfile.SYMTYPE, 0o777).linkname = target

    def getvalue(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in self.entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, check=True).stdout
    return sorted({a for a in out.decode().split() if a and a != "busybox" and "/" not in a})


def busybox_layer(busybox: Path = BUSYBOX) -> bytes:
    """The uncompressed root filesystem tar: /bin/busybox, /bin/<applet> symlinks, /etc."""
    t = _ReproducibleTar()
    for d in ("bin", "dev", "etc", "proc", "root", "sys"):
        t.dir(d, 0o700 if d == "root" else 0o755)
    t.dir("tmp", 0o1777)
    t.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        t.symlink(f"bin/{applet}", "busybox")
    t.file("etc/passwd", PASSWD.encode())
    t.file("etc/group", GROUP.encode())
    return t.getvalue()


def _gzip(data: bytes) -> bytes:
    # mtime=0 and no file name: the header carries nothing that changes between builds.
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def _image_blobs(layer_tar: bytes, ref: str) -> tuple[bytes, dict[str, bytes]]:
    """(index.json, {digest: blob}) of a one-layer image named ``ref``."""
    layer = _gzip(layer_tar)
    arch = GOARCH.get(platform.machine(), platform.machine())
    config = _json_bytes(
        {
            "architecture": arch,
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": [IMAGE_PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [_sha256(layer_tar)]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "containerd_support"}],
        }
    )
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [_descriptor(OCI_LAYER_GZIP, layer)],
        }
    )
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                _descriptor(
                    OCI_MANIFEST,
                    manifest,
                    platform={"architecture": arch, "os": "linux"},
                    annotations={ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: tag},
                )
            ],
        }
    )
    blobs = {_sha256(b): b for b in (layer, config, manifest)}
    return index, blobs


def _oci_archive(index: bytes, blobs: dict[str, bytes]) -> bytes:
    t = _ReproducibleTar()
    t.file("oci-layout", _json_bytes({"imageLayoutVersion": "1.0.0"}))
    t.file("index.json", index)
    t.dir("blobs")
    t.dir("blobs/sha256")
    for digest in sorted(blobs):
        t.file(f"blobs/sha256/{digest.removeprefix('sha256:')}", blobs[digest])
    return t.getvalue()


def build_busybox_image(out_dir: Path, ref: str = DEFAULT_REF) -> Path:
    """An OCI archive (``ctr images import`` input) of the host's static busybox, named ``ref``.

    Reproducible: the same busybox and ref give the same bytes. The file is named after the
    archive's content digest, so a cached one is reused and a changed busybox gets a new file.
    """
    index, blobs = _image_blobs(busybox_layer(), ref)
    archive = _oci_archive(index, blobs)
    out_dir = Path(out_dir)
    path = out_dir / f"busybox-{hashlib.sha256(archive).hexdigest()[:16]}.oci.tar"
    if path.is_file() and path.stat().st_size == len(archive):
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    # Write-and-rename: a concurrent build or an interrupted one never leaves a torn archive.
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".busybox-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(archive)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def archive_ref(archive: Path) -> str:
    """The name ``ctr images import`` gives the image in an archive from build_busybox_image."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    return index["manifests"][0]["annotations"][ANNOTATION_CONTAINERD_NAME]


def image_manifest_digest(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        return json.load(member)["manifests"][0]["digest"]


def import_image(ctrd: Containerd, archive: Path, ref: str | None = None) -> str:
    """``ctr images import`` (unpacked into ctrd's snapshotter); returns the ref for ``ctr run``.

    The archive's io.containerd.image.name annotation names the image, so no ``--base-name``
    is needed. A different ``ref`` is added with ``ctr images tag``.
    """
    ctrd.ctr("images", "import", str(archive))
    name = archive_ref(archive)
    if ref is not None and ref != name:
        ctrd.ctr("images", "tag", "--force", name, ref)
        name = ref
    return name
