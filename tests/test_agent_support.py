"""Helpers for the agent's native tests: run the real agent, play init and the host.

No tests here; ``test_agent_*.py`` modules import it (pytest puts ``tests/`` on
sys.path). Every wait has a deadline, so a broken agent fails a test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import bulkhead_agent
import bulkhead_init
import bulkhead_proto
from bulkhead_proto import mux

T = TypeVar("T")
READY_TIMEOUT = 30.0


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="bh-agent-", dir="/tmp"))
    # Like /run in the guest: others may pass through (user-namespaced containers must).
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _source_root(package: object) -> str:
    return str(Path(package.__file__).resolve().parent.parent)  # type: ignore[attr-defined]


# Start the agent the way init does: ``python3 -I -S`` with an explicit sys.path
# (here: the source roots, then the packages grpc/protobuf come from).
_LAUNCHER = "import sys; sys.path[:0] = {path!r}; from bulkhead_agent.main import main; main()"


def agent_command() -> list[str]:
    path = [_source_root(m) for m in (bulkhead_agent, bulkhead_init, bulkhead_proto)]
    path += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER.format(path=list(dict.fromkeys(path)))]


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    run_dir: Path
    log_path: Path
    tcp_port: int
    started: float  # time.monotonic() before spawning
    ready_s: float = 0.0  # spawn to health SERVING, as seen by the test

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def health_status(target: str, service: str = "", timeout: float = 2.0) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status


def start_agent(
    workdir: Path,
    *,
    serial_device: str = "",
    tcp: bool = True,
    init_pid: int | None = None,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Agent:
    run_dir = workdir / "run"
    tcp_port = free_tcp_port() if tcp else 0
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BULKHEAD_RUN_DIR": str(run_dir),
        "BULKHEAD_VSOCK_PORT": "0",
        "BULKHEAD_SERIAL_PORT": "off",
        "BULKHEAD_SERIAL_DEVICE": serial_device,
        "BULKHEAD_TCP_PORT": str(tcp_port),
        "BULKHEAD_LOG": "debug",
    }
    if init_pid is not None:
        full_env["BULKHEAD_INIT_PID"] = str(init_pid)
    full_env.update(env or {})
    log_path = workdir / "agent.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(agent_command(), env=full_env, stderr=log, stdout=log)
    agent = Agent(proc, run_dir, log_path, tcp_port, started)
    if wait_ready:
        wait_serving(agent)
    return agent


def wait_serving(agent: Agent) -> None:
    def serving() -> bool:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.log()}")
        if not agent.socket_path.exists():
            return False
        return health_status(agent.target, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING

    try:
        wait_for(serving, READY_TIMEOUT, "the agent to be SERVING", interval=0.02)
    except AssertionError:
        agent.stop()
        raise AssertionError(f"agent not ready; its log:\n{agent.log()}") from None
    agent.ready_s = time.monotonic() - agent.started


# A stand-in for PID 1: reports the signals init would act on, one line each.
_FAKE_INIT = """
import signal, sys, time
def report(sig, frame):
    print(signal.Signals(sig).name, flush=True)
signal.signal(signal.SIGTERM, report)
signal.signal(signal.SIGINT, report)
print("ready", flush=True)
time.sleep(120)
"""


class FakeInit:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FAKE_INIT], stdout=subprocess.PIPE
        )
        assert self.next_line(10) == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def has_output(self) -> bool:
        assert self.proc.stdout is not None
        return bool(select.select([self.proc.stdout], [], [], 0)[0])

    def next_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"fake init printed nothing within {timeout}s")
        return self.proc.stdout.readline().decode().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------------
# The host end of the serial mux, for tests only.
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class HostConn:
    id: int
    writer: asyncio.StreamWriter | None = None  # the local client (None for raw conns)
    credit: mux.Credit = field(default_factory=mux.Credit)
    window: mux.ReceiveWindow = field(default_factory=mux.ReceiveWindow)
    credit_changed: asyncio.Event = field(default_factory=asyncio.Event)
    received: bytearray = field(default_factory=bytearray)  # raw conns keep what came
    unacked: int = 0  # guest bytes received and not yet credited back
    closed_by_guest: bool = False


class HostMux:
    """Plays the host on the unix socket the agent uses as its serial port.

    Runs an asyncio loop on a thread. Raw tests send frames and look at what
    came back; gRPC tests dial ``serve_clients()``'s unix socket, whose every
    connection becomes a mux connection (like the real host's relay).
    With ``stingy`` set, credit goes back only once the guest has used up its
    whole window: the guest must stop there, then resume.
    """

    def __init__(self, port_path: Path) -> None:
        self.port_path = port_path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(port_path))
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lock = threading.Lock()
        self.frames: list[mux.Frame] = []
        self.guest_sessions: list[int] = []
        self.violations: list[str] = []
        self.conns: dict[int, HostConn] = {}
        self.stingy = False
        self.peak_unacked = 0  # the most guest bytes ever unacknowledged on one conn
        self.session = mux.new_session()
        self._next_id = 1
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._client_server: asyncio.AbstractServer | None = None
        self.port_closed = threading.Event()

    def _run(self, coro, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- the port connection --

    def accept(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the agent to connect to the port."""
        self._run(self._accept(), timeout)

    async def _accept(self) -> None:
        sock, _ = await self.loop.sock_accept(self.listener)
        reader, self._writer = await asyncio.open_connection(sock=sock)
        self.port_closed.clear()
        self._reader_task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = mux.Parser()
        try:
            while data := await reader.read(65536):
                for frame in parser.feed(data):
                    self._on_frame(frame)
        except Exception as exc:
            with self.lock:
                self.violations.append(f"port read failed: {exc!r}")
        finally:
            self.port_closed.set()

    def disconnect(self) -> None:
        """Close the port connection, as a host that goes away."""

        async def close() -> None:
            if self._writer is not None:
                self._writer.close()
            for c in list(self.conns.values()):
                if c.writer is not None:
                    c.writer.close()
            self.conns.clear()

        self._run(close())
        self.port_closed.wait(10)

    def send(self, data: bytes) -> None:
        def write() -> None:
            assert self._writer is not None
            self._writer.write(data)

        self.loop.call_soon_threadsafe(write)

    def hello(self, session: int | None = None) -> None:
        if session is not None:
            self.session = session
        self.send(mux.hello(self.session))

    def open_raw(self, conn: int) -> None:
        def opened() -> None:
            self.conns[conn] = HostConn(conn)

        self.loop.call_soon_threadsafe(opened)
        self.send(mux.encode(mux.FrameType.OPEN, conn))

    def frames_of(self, kind: mux.FrameType, conn: int | None = None) -> list[mux.Frame]:
        with self.lock:
            return [f for f in self.frames if f.type is kind and (conn is None or f.conn == conn)]

    def received(self, conn: int) -> bytes:
        with self.lock:
            c = self.conns.get(conn)
            return bytes(c.received) if c else b""

    def wait_hellos(self, n: int, timeout: float = 10.0) -> list[int]:
        return wait_for(
            lambda: list(self.guest_sessions) if len(self.guest_sessions) >= n else None,
            timeout,
            f"{n} HELLO(s) from the guest",
        )

    def _on_frame(self, frame: mux.Frame) -> None:
        with self.lock:
            self.frames.append(frame)
        if frame.type is mux.FrameType.HELLO:
            with self.lock:
                self.guest_sessions.append(mux.hello_session(frame))
            return
        c = self.conns.get(frame.conn)
        if c is None:
            return
        if frame.type is mux.FrameType.DATA:
            n = len(frame.payload)
            c.unacked += n
            self.peak_unacked = max(self.peak_unacked, c.unacked)
            if c.unacked > mux.WINDOW:
                with self.lock:
                    self.violations.append(f"conn {c.id}: {c.unacked} unacknowledged bytes")
            if c.writer is None:
                with self.lock:
                    c.received += frame.payload
            else:
                c.writer.write(frame.payload)
            if self.stingy:
                grant = c.unacked if c.unacked >= mux.WINDOW else 0
            else:
                grant = c.window.consume(n)
            if grant:
                c.unacked -= grant
                self._writer.write(mux.credit(c.id, grant))  # type: ignore[union-attr]
        elif frame.type is mux.FrameType.CREDIT:
            c.credit.grant(mux.credit_amount(frame))
            c.credit_changed.set()
        elif frame.type is mux.FrameType.CLOSE:
            c.closed_by_guest = True
            c.credit_changed.set()
            if c.writer is not None:
                c.writer.close()

    # -- local clients (gRPC) relayed over the mux --

    def serve_clients(self, path: Path) -> str:
        """Listen on ``path``; each connection is relayed over a new mux connection."""

        async def start() -> None:
            self._client_server = await asyncio.start_unix_server(self._client, str(path))

        self._run(start())
        return f"unix:{path}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid, self._next_id = self._next_id + 1000, self._next_id + 1
        c = HostConn(cid, writer)
        self.conns[cid] = c
        assert self._writer is not None
        self._writer.write(mux.encode(mux.FrameType.OPEN, cid))
        try:
            while not c.closed_by_guest:
                while c.credit.available == 0 and not c.closed_by_guest:
                    c.credit_changed.clear()
                    await c.credit_changed.wait()
                data = await reader.read(min(c.credit.available, 65536))
                if not data or c.closed_by_guest:
                    break
                c.credit.take(len(data))
                for frame in mux.encode_data(cid, data):
                    self._writer.write(frame)
        except (ConnectionError, OSError):
            pass
        finally:
            if not c.closed_by_guest and self.conns.get(cid) is c:
                self._writer.write(mux.encode(mux.FrameType.CLOSE, cid))
            self.conns.pop(cid, None)
            writer.close()

    def close(self) -> None:
        async def shutdown() -> None:
            if self._client_server is not None:
                self._client_server.close()
            if self._writer is not None:
                self._writer.close()

        with contextlib.suppress(Exception):
            self._run(shutdown(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.listener.close()
