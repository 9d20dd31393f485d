"""The per-sandbox monitor: ``python -m bulkhead.monitor NAME --state-dir DIR``.

One process per sandbox, detached from whoever started it. It runs QEMU as its
child (in its own process group), checks it through QMP, opens the agent
channel (AF_VSOCK through the kernel's vhost-vsock; hybrid vsock through the
userspace vhost-user-vsock backend, which it starts before QEMU and stops after
it; or the virtio-serial mux) and serves it on ``agent.sock`` through a
``UnixRelay``, so any number of host clients can talk to the agent at once. It
keeps ``state.json`` current, asks QEMU to quit on SIGTERM, and exits when QEMU
does, removing its sockets.

``Sandbox.up`` writes ``state.json`` (with the QEMU configuration) and the
locked ``monitor.lock`` before starting it; the lock is held for the monitor's
whole life and is what marks the sandbox alive.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from .nics import Nic
from .nics import boot_args as nic_boot_args
from .qemu import (
    VIA_SERIAL,
    VIA_VHOST_USER,
    VIA_VHOST_VSOCK,
    QemuConfig,
    build_command,
    vhost_vsock_available,
)
from .qmp import Qmp
from .relay import UnixRelay
from .state import SandboxPaths, read_state, update_state
from .transport import HybridVsockTransport, SerialMuxTransport, Transport, VsockTransport

log = logging.getLogger("bulkhead.monitor")

QMP_READY_TIMEOUT = 15.0
QUIT_GRACE = 5.0
RELAY_CONNECT_TIMEOUT = 30.0
BACKEND_READY_TIMEOUT = 15.0
AGENT_VSOCK_PORT = 1024


class Monitor:
    def __init__(self, paths: SandboxPaths) -> None:
        self.paths = paths
        self.qemu: subprocess.Popen[bytes] | None = None
        self.backend: subprocess.Popen[bytes] | None = None  # the vhost-user-vsock backend
        self.stopping = threading.Event()
        self._stop_thread: threading.Thread | None = None

    def run(self) -> int:
        state = read_state(self.paths)
        cfg = QemuConfig.from_dict(state["qemu"])
        via = _transport(state, cfg)
        cmd = build_command(cfg, vhost_vsock=via == VIA_VHOST_VSOCK)
        # The NICs from boot; a tap's device is opened here, in its namespace, and QEMU
        # inherits the descriptor (nics.boot_args).
        boot_nics = [Nic.from_dict(d) for d in state.get("nics", [])]
        nic_args, nic_fds = nic_boot_args(boot_nics, machine=cfg.machine)
        cmd += nic_args
        log.info("starting QEMU: %s", shlex.join(cmd))
        if self.stopping.is_set():
            _close_all(nic_fds)
            return self._finish(None)
        if via == VIA_VHOST_USER:
            try:
                self._start_backend(cfg)
            except BaseException:
                _close_all(nic_fds)
                raise
        # QEMU's own messages (e.g. "KVM internal error") go to monitor.log.
        try:
            self.qemu = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr,
                stderr=sys.stderr,
                start_new_session=True,
                pass_fds=nic_fds,
            )
        finally:
            _close_all(nic_fds)  # QEMU has its copies
        started = _create_time(self.qemu.pid)
        update_state(
            self.paths,
            status="booting",
            qemu_pid=self.qemu.pid,
            qemu_started=started,
            qemu_command=cmd,
            vsock=via != VIA_SERIAL,
            transport=via,
        )
        if self.stopping.is_set():  # SIGTERM arrived while QEMU was starting
            self._request_stop()
        self._check_qmp()

        transport: Transport
        if via == VIA_VHOST_VSOCK:
            assert cfg.vsock_cid is not None
            transport = VsockTransport(cfg.vsock_cid, AGENT_VSOCK_PORT)
        elif via == VIA_VHOST_USER:
            transport = HybridVsockTransport(self.paths.vsock_uds, AGENT_VSOCK_PORT)
        else:
            transport = SerialMuxTransport(self.paths.serial_sock)
        relay = UnixRelay(transport, self.paths.agent_sock, connect_timeout=RELAY_CONNECT_TIMEOUT)
        try:
            relay.start()
            if not self.stopping.is_set():
                update_state(self.paths, status="running")
            log.info("serving the agent on %s through %r", self.paths.agent_sock, transport)
            code = self.qemu.wait()
        finally:
            relay.close()
            transport.close()
        return self._finish(code)

    def _start_backend(self, cfg: QemuConfig) -> None:
        """Start ``bulkhead.vhost_vsock`` and wait for its socket: QEMU connects at startup."""
        assert cfg.vhost_user_vsock_socket is not None and cfg.vsock_cid is not None
        for sock in (cfg.vhost_user_vsock_socket, self.paths.vsock_uds):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()  # a dead predecessor's, or the backend cannot bind
        cmd = [
            sys.executable,
            "-m",
            "bulkhead.vhost_vsock",
            "--socket",
            str(cfg.vhost_user_vsock_socket),
            "--cid",
            str(cfg.vsock_cid),
            "--uds-path",
            str(self.paths.vsock_uds),
        ]
        log.info("starting the vsock backend: %s", shlex.join(cmd))
        # Its own session, like QEMU's: a ^C meant for whoever ran `up` must not reach it.
        self.backend = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            stderr=sys.stderr,
            start_new_session=True,
        )
        update_state(self.paths, vsock_backend_pid=self.backend.pid)
        threading.Thread(target=self._watch_backend, name="vsock-backend", daemon=True).start()
        deadline = time.monotonic() + BACKEND_READY_TIMEOUT
        while not (cfg.vhost_user_vsock_socket.exists() and self.paths.vsock_uds.exists()):
            if self.backend.poll() is not None:
                raise RuntimeError(
                    f"the vsock backend exited with status {self.backend.returncode}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the vsock backend did not listen within {BACKEND_READY_TIMEOUT}s"
                )
            time.sleep(0.02)

    def _watch_backend(self) -> None:
        assert self.backend is not None
        code = self.backend.wait()
        if self.qemu is not None and self.qemu.poll() is None and not self.stopping.is_set():
            # QEMU's vhost-user chardev does not reconnect: the agent is out of reach now.
            log.error("the vsock backend exited with status %s: the agent's channel is gone", code)
            with contextlib.suppress(Exception):
                update_state(self.paths, vsock_backend_exit=code)

    def _stop_backend(self) -> None:
        backend = self.backend
        if backend is None or backend.poll() is not None:
            return
        backend.terminate()
        try:
            backend.wait(QUIT_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("the vsock backend ignored SIGTERM: SIGKILL")
            backend.kill()
            backend.wait()

    def _check_qmp(self) -> None:
        """Wait until QEMU answers QMP (or exits): proof that it really started."""
        assert self.qemu is not None
        deadline = time.monotonic() + QMP_READY_TIMEOUT
        last: Exception | None = None
        while self.qemu.poll() is None and time.monotonic() < deadline:
            if self.paths.qmp_sock.exists():
                try:
                    with Qmp(self.paths.qmp_sock, timeout=2.0) as qmp:
                        log.info("QEMU is up, VM status %s", qmp.status())
                    return
                except Exception as exc:
                    last = exc
            time.sleep(0.05)
        if self.qemu.poll() is None:
            log.warning("QMP did not answer within %ss: %s", QMP_READY_TIMEOUT, last)

    def _finish(self, code: int | None) -> int:
        if code is not None:
            log.info("QEMU exited with status %s", code)
        self._stop_backend()  # after QEMU: it serves the guest's rings until the end
        for sock in self.paths.sockets():
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        with contextlib.suppress(Exception):
            update_state(self.paths, status="exited", exit_code=code, finished=time.time())
        return 0

    # -- stopping --

    def on_signal(self, signum: int, _frame: object) -> None:
        log.info("got %s: stopping QEMU", signal.Signals(signum).name)
        self.stopping.set()
        if self.qemu is not None:
            self._request_stop()

    def _request_stop(self) -> None:
        if self._stop_thread is None:
            # Not in the signal handler itself: QMP takes a while and may block.
            self._stop_thread = threading.Thread(target=self._stop_qemu, name="stop", daemon=True)
            self._stop_thread.start()

    def _stop_qemu(self) -> None:
        qemu = self.qemu
        assert qemu is not None
        with contextlib.suppress(Exception):
            update_state(self.paths, status="stopping")
        try:
            with Qmp(self.paths.qmp_sock, timeout=2.0) as qmp:
                qmp.quit()
        except Exception as exc:
            log.warning("QMP quit failed (%s): sending SIGTERM", exc)
            with contextlib.suppress(ProcessLookupError):
                qemu.terminate()
        try:
            qemu.wait(QUIT_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("QEMU still running %ss after quit: SIGKILL", QUIT_GRACE)
            with contextlib.suppress(ProcessLookupError):
                qemu.kill()


def _transport(state: dict, cfg: QemuConfig) -> str:
    """The channel ``up`` chose; a state from before "transport" existed had only "vsock"."""
    via = state.get("transport")
    if via is None:
        vhost = bool(state.get("vsock")) and cfg.vsock_cid is not None
        via = VIA_VHOST_VSOCK if vhost else VIA_SERIAL
    if via == VIA_VHOST_VSOCK and not vhost_vsock_available():
        raise RuntimeError("the sandbox was made for vhost-vsock, which this host lacks")
    return via


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _detach() -> None:
    """Fork once more so the monitor is nobody's child but init's (no zombie in the caller)."""
    if os.fork() > 0:
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bulkhead.monitor")
    parser.add_argument("name")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--lock-fd", type=int, help="inherited, already locked monitor.lock")
    parser.add_argument("--detach", action="store_true", help="fork into the background")
    args = parser.parse_args(argv)
    paths = SandboxPaths(args.state_dir / args.name)

    if args.lock_fd is not None:
        lock_fd = args.lock_fd
    else:
        lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # Already ours when inherited from ``up`` (same open file): a no-op then.
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"monitor: sandbox {args.name} already has a monitor", file=sys.stderr)
        return 1
    os.set_inheritable(lock_fd, False)  # QEMU must not keep the sandbox "alive"

    if args.detach:
        _detach()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    monitor = Monitor(paths)
    signal.signal(signal.SIGTERM, monitor.on_signal)
    signal.signal(signal.SIGINT, monitor.on_signal)
    update_state(paths, monitor_pid=os.getpid(), monitor_started=_create_time(os.getpid()))
    log.info("monitor %d for sandbox %s", os.getpid(), args.name)
    try:
        return monitor.run()
    except Exception:
        log.exception("monitor failed")
        if monitor.qemu is not None and monitor.qemu.poll() is None:
            monitor.qemu.kill()
            monitor.qemu.wait()
        monitor._stop_backend()
        with contextlib.suppress(Exception):
            update_state(paths, status="exited", error="monitor failed; see monitor.log")
        return 1


if __name__ == "__main__":
    sys.exit(main())
