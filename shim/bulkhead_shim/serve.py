"""The long-running shim: a ttrpc server for the pod's Task service until containerd shuts it
down (or SIGTERM). Its files go with it; a VM it leaves behind is taken down on the way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from . import host_mounts
from .cli import Flags
from .pod_state import PodPaths, PodState
from .start import SOCKET_FD_ENV

log = logging.getLogger("bulkhead_shim")

SHUTDOWN_GRACE = 5.0


def serve(flags: Flags) -> int:
    paths = PodPaths(Path(flags.socket).parent) if flags.socket else None
    if paths is None or SOCKET_FD_ENV not in os.environ:
        raise RuntimeError("serve is started by `start` (it needs -socket and the socket's fd)")
    _setup_logging(paths, Path(flags.bundle) if flags.bundle else None, flags.debug)
    listener = socket.socket(fileno=int(os.environ.pop(SOCKET_FD_ENV)))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a reader that leaves is an EPIPE, not death

    from .publisher import EventPublisher
    from .task import TaskService
    from .ttrpc import Server

    state = PodState.load(paths)
    if state is not None and state.containers:
        # An earlier shim of this pod died with containers: whatever it left is stale now
        # (containerd runs `delete` for each; this catches what it could not reach).
        from .delete import clean_pod

        clean_pod(paths, state)
    state = PodState(namespace=flags.namespace, pod=flags.id)
    state.save(paths)
    paths.pid_file.write_text(str(os.getpid()))

    stop = threading.Event()
    publisher = EventPublisher(flags.ttrpc_address, flags.namespace)
    service = TaskService(paths, state, publisher, namespace=flags.namespace,
                          on_shutdown=stop.set)  # fmt: skip
    server = Server()
    service.register(server)
    server.adopt(listener)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("shim for pod %s (namespace %s) serving on %s", flags.id, flags.namespace,
             paths.socket)  # fmt: skip
    stop.wait()
    log.info("shutting down")
    server.shutdown(SHUTDOWN_GRACE)
    service.close()
    publisher.close()
    _remove(paths)
    return 0


def _remove(paths: PodPaths) -> None:
    with contextlib.suppress(OSError):
        paths.socket.unlink()
    with contextlib.suppress(OSError):
        paths.state_file.unlink()
        paths.pid_file.unlink()
    logging.shutdown()
    host_mounts.remove_tree(paths.dir)


def _setup_logging(paths: PodPaths, bundle: Path | None, debug: bool) -> None:
    """To shim.log in the pod's directory, and to the bundle's ``log`` FIFO, which containerd
    reads into its own log (opened in the background: containerd opens its end when it likes)."""
    level = logging.DEBUG if debug else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    file_handler = logging.FileHandler(paths.log)
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    # qemu.qmp logs every QMP message at DEBUG: the shim's -debug is about the shim.
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    fifo = bundle / "log" if bundle else None
    if fifo is None or not fifo.exists():
        return

    def open_fifo() -> None:
        with contextlib.suppress(OSError):
            stream = open(fifo, "w", buffering=1)  # noqa: SIM115 (lives as long as the shim)
            handler = logging.StreamHandler(stream)
            handler.setFormatter(fmt)
            root.addHandler(handler)

    threading.Thread(target=open_fifo, name="log-fifo", daemon=True).start()
