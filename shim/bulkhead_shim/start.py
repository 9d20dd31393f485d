"""``start``: find or spawn the pod's long-running shim; print only its address.

containerd runs this in the new container's bundle directory. The first container of a pod
gets a new shim (the socket is bound here, before the shim runs, so containerd can connect
the moment this returns); the pod's later containers get the same address. The spawned shim
is in its own session with no tie to containerd's pipes: containerd reads ``start``'s stdout
to its end, which would never come if the shim inherited it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

from .cli import Flags
from .pod_state import PodPaths, pod_id, read_spec, shim_alive

SOCKET_FD_ENV = "BULKHEAD_SHIM_SOCKET_FD"


def start(flags: Flags) -> str:
    bundle = Path(flags.bundle or os.getcwd())
    spec = read_spec(bundle)
    pod = pod_id(flags.id, spec)
    paths = PodPaths.of(flags.address, flags.namespace, pod)
    paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(paths.lock, "w") as lock:
        # Two containers of one pod may start at once: one of them spawns the shim.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shim_alive(paths) is None:
            _spawn(flags, paths, pod, bundle)
    _write_address(bundle, paths.address)
    return paths.address


def _spawn(flags: Flags, paths: PodPaths, pod: str, bundle: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if paths.socket.exists():  # a dead shim's
            paths.socket.unlink()
        listener.bind(str(paths.socket))
        os.chmod(paths.socket, 0o600)
        listener.listen(64)
        argv = [sys.executable, "-m", "bulkhead_shim", "-namespace", flags.namespace]
        argv += ["-id", pod, "-address", flags.address, "-bundle", str(bundle)]
        if flags.publish_binary:
            argv += ["-publish-binary", flags.publish_binary]
        if flags.debug:
            argv.append("-debug")
        argv += ["-socket", str(paths.socket), "serve"]
        env = dict(os.environ, **{SOCKET_FD_ENV: str(listener.fileno())})
        with open(os.devnull, "rb") as null, open(paths.log, "ab") as log:
            shim = subprocess.Popen(
                argv,
                stdin=null,
                stdout=log,  # only what escapes logging (an interpreter crash) lands here
                stderr=log,
                cwd=paths.dir,
                env=env,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
        paths.pid_file.write_text(str(shim.pid))
    finally:
        listener.close()  # the shim has its own copy


def _write_address(bundle: Path, address: str) -> None:
    """containerd reads ``address`` in the bundle to reconnect after it restarts."""
    tmp = bundle / ".address.tmp"
    tmp.write_text(address)
    os.replace(tmp, bundle / "address")
