"""bulkhead_shim.ttrpc over real unix sockets, and against Go's ttrpc inside containerd.

The unit tests check our server with our client, and the framing with hand-built frames
read back byte by byte (so a bug shared by our client and server cannot hide). The
containerd tests check both halves against the real Go implementation: our client calls
containerd's own ttrpc server, and containerd (a Go ttrpc client) drives our server
through a fake runtime shim.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2, timestamp_pb2

from bulkhead_shim import ttrpc
from bulkhead_shim.api import events_pb2, shim_pb2, ttrpc_events_pb2
from bulkhead_shim.api import ttrpc_request_pb2 as pb
from bulkhead_shim.publisher import pack_any
from bulkhead_shim.ttrpc import Client, Code, Server, TtrpcError

SVC = "test.v1.Probe"
Req = shim_pb2.StateRequest  # id, exec_id: strings, handy for test arguments
Resp = shim_pb2.StateResponse


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed sun_path's 108 bytes; a unix socket needs a short path.
    path = Path(tempfile.mkdtemp(prefix="tt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Probe:
    """Handlers for SVC, with hooks the tests use to hold calls open."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.contexts: dict[str, ttrpc.CallContext] = {}
        self.lock = threading.Lock()

    def gate(self, key: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(key, threading.Event())

    def entered_event(self, key: str) -> threading.Event:
        with self.lock:
            return self.entered.setdefault(key, threading.Event())

    def echo(self, req: Req, ctx: ttrpc.CallContext) -> Resp:
        meta = json.dumps(ctx.metadata, sort_keys=True)
        left = ctx.time_left()
        return Resp(id=req.id, exec_id=meta, bundle="none" if left is None else f"{left:.3f}")

    def block(self, req: Req, ctx: ttrpc.CallContext) -> Resp:
        # Hold until the test opens gate(req.exec_id) (or the caller goes away).
        self.contexts[req.id] = ctx
        self.entered_event(req.id).set()
        gate = self.gate(req.exec_id)
        while not gate.wait(0.05):
            if ctx.cancelled.is_set():
                return Resp(id="cancelled")
        return Resp(id=req.id)

    def fail(self, req: Req, ctx: ttrpc.CallContext) -> Resp:
        raise TtrpcError(Code.NOT_FOUND, f"no task {req.id}")

    def boom(self, req: Req, ctx: ttrpc.CallContext) -> Resp:
        raise RuntimeError(f"handler bug for {req.id}")

    def todo(self, req: Req, ctx: ttrpc.CallContext) -> Resp:
        raise NotImplementedError("checkpoints are not supported")

    def big(self, req: Req, ctx: ttrpc.CallContext) -> Resp:
        return Resp(id="x" * (ttrpc.MAX_MESSAGE + 1))

    def register(self, server: Server) -> None:
        for name in ("echo", "block", "fail", "boom", "todo", "big"):
            server.register(SVC, name.capitalize(), Req, getattr(self, name))


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def served(short_dir: Path, probe: Probe) -> Iterator[tuple[Server, Path]]:
    server = Server(max_workers=64)
    probe.register(server)
    path = short_dir / "s.sock"
    server.listen(path)
    server.start()
    try:
        yield server, path
    finally:
        for gate in list(probe.gates.values()):
            gate.set()
        server.shutdown(grace=2)


@pytest.fixture
def client(served: tuple[Server, Path]) -> Iterator[Client]:
    with Client(served[1]) as c:
        yield c


# --- raw frames -----------------------------------------------------------------------------


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_reply(sock: socket.socket) -> tuple[bytes, pb.Response]:
    header = recv_exact(sock, 10)
    (length,) = struct.unpack(">I", header[:4])
    return header, pb.Response.FromString(recv_exact(sock, length))


def request_frame(
    stream_id: int, method: str, payload: bytes = b"", service: str = SVC, msg_type: int = 1
) -> bytes:
    body = pb.Request(service=service, method=method, payload=payload).SerializeToString()
    return struct.pack(">IIBB", len(body), stream_id, msg_type, 0) + body


# --- our client and server ------------------------------------------------------------------


def test_round_trip(client: Client) -> None:
    resp = client.call(SVC, "Echo", Req(id="hello"), Resp)
    assert isinstance(resp, Resp)
    assert resp.id == "hello"


def test_metadata_and_timeout_reach_the_handler(client: Client) -> None:
    resp = client.call(
        SVC, "Echo", Req(id="m"), Resp, timeout=7.0, metadata={"Containerd-Namespace": "k8s"}
    )
    assert json.loads(resp.exec_id) == {"containerd-namespace": ["k8s"]}
    assert 6.0 < float(resp.bundle) <= 7.0  # deadline derived from timeout_nano
    # The client's default timeout (10 s) is sent when the call gives none ...
    assert 9.0 < float(client.call(SVC, "Echo", Req(), Resp).bundle) <= 10.0
    # ... and NO_TIMEOUT sends none at all.
    assert client.call(SVC, "Echo", Req(), Resp, timeout=ttrpc.NO_TIMEOUT).bundle == "none"


def test_repeated_metadata_keys(served: tuple[Server, Path]) -> None:
    sock = raw_connect(served[1])
    body = pb.Request(service=SVC, method="Echo", payload=Req(id="r").SerializeToString())
    body.metadata.add(key="k", value="1")
    body.metadata.add(key="k", value="2")
    data = body.SerializeToString()
    sock.sendall(struct.pack(">IIBB", len(data), 1, 1, 0) + data)
    _, reply = read_reply(sock)
    assert json.loads(Resp.FromString(reply.payload).exec_id) == {"k": ["1", "2"]}
    sock.close()


def test_fifty_calls_answered_out_of_order(client: Client, probe: Probe) -> None:
    """Call i is held until call i+1 has returned to the client: only a server that runs
    calls of one connection concurrently and answers them out of order gets through."""
    n = 50
    returned = [threading.Event() for _ in range(n)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            resp = client.call(SVC, "Block", Req(id=str(i), exec_id=f"after-{i + 1}"), Resp)
            results[i] = resp.id
            returned[i].set()
            probe.gate(f"after-{i}").set()  # releases call i-1
        except BaseException as e:
            errors.append(e)

    probe.gate(f"after-{n}").set()  # the last call returns at once
    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == {i: str(i) for i in range(n)}


def test_long_call_does_not_block_others(client: Client, probe: Probe) -> None:
    blocked: queue.Queue[Resp] = queue.Queue()
    t = threading.Thread(
        target=lambda: blocked.put(client.call(SVC, "Block", Req(id="w", exec_id="g"), Resp))
    )
    t.start()
    assert probe.entered_event("w").wait(10)
    for i in range(5):  # a State behind a Wait, on the same connection
        assert client.call(SVC, "Echo", Req(id=str(i)), Resp).id == str(i)
    assert blocked.empty()
    probe.gate("g").set()
    assert blocked.get(timeout=10).id == "w"
    t.join(10)


def test_several_connections(served: tuple[Server, Path]) -> None:
    server, path = served
    clients = [Client(path) for _ in range(5)]
    try:
        wait_until(lambda: server.connections == 5, what="5 connections")
        out: dict[int, str] = {}

        def run(i: int) -> None:
            for j in range(20):
                out[i * 100 + j] = clients[i].call(SVC, "Echo", Req(id=f"{i}-{j}"), Resp).id

        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert out == {i * 100 + j: f"{i}-{j}" for i in range(5) for j in range(20)}
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: server.connections == 0, what="connections to close")


def test_unknown_service_and_method(client: Client) -> None:
    with pytest.raises(TtrpcError) as err:
        client.call("no.such.Service", "Echo", Req(), Resp)
    assert err.value.code is Code.UNIMPLEMENTED
    assert "no.such.Service" in err.value.message
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Nope", Req(), Resp)
    assert err.value.code is Code.UNIMPLEMENTED
    assert "Nope" in err.value.message


def test_handler_errors(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Fail", Req(id="c9"), Resp)
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "no task c9")

    with (
        caplog.at_level(logging.ERROR, logger="bulkhead_shim.ttrpc"),
        pytest.raises(TtrpcError) as err,
    ):
        client.call(SVC, "Boom", Req(id="c1"), Resp)
    assert err.value.code is Code.UNKNOWN
    assert "handler bug for c1" in err.value.message
    assert any("Boom" in r.getMessage() and r.exc_info for r in caplog.records)

    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Todo", Req(), Resp)
    assert err.value.code is Code.UNIMPLEMENTED
    assert "checkpoints" in err.value.message

    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Big", Req(), Resp)
    assert err.value.code is Code.RESOURCE_EXHAUSTED
    # None of that hurt the server or the connection.
    assert client.call(SVC, "Echo", Req(id="still"), Resp).id == "still"


def test_undecodable_payload(served: tuple[Server, Path]) -> None:
    sock = raw_connect(served[1])
    sock.sendall(request_frame(1, "Echo", payload=b"\x0a\x05ab"))  # string cut short
    _, reply = read_reply(sock)
    assert reply.status.code == Code.INVALID_ARGUMENT
    assert "containerd.task.v2.StateRequest" in reply.status.message
    sock.sendall(b"\x00\x00\x00\x03\x00\x00\x00\x03\x01\x00\xff\xff\xff")  # not a Request
    _, reply = read_reply(sock)
    assert reply.status.code == Code.INVALID_ARGUMENT
    sock.close()


def test_reply_frame_bytes(served: tuple[Server, Path]) -> None:
    sock = raw_connect(served[1])
    sock.sendall(request_frame(3, "Echo", Req(id="raw").SerializeToString()))
    header, reply = read_reply(sock)
    body = reply.SerializeToString()
    assert header == struct.pack(">IIBB", len(body), 3, 2, 0)
    assert header[:4] == len(body).to_bytes(4, "big") and header[4:8] == b"\x00\x00\x00\x03"
    assert header[8:] == b"\x02\x00"  # type response, no flags
    assert reply.status.code == 0
    assert Resp.FromString(reply.payload).id == "raw"
    sock.close()


def test_even_stream_id_is_refused(served: tuple[Server, Path]) -> None:
    sock = raw_connect(served[1])
    sock.sendall(request_frame(2, "Echo"))
    header, reply = read_reply(sock)
    assert header[4:10] == b"\x00\x00\x00\x02\x02\x00"
    assert reply.status.code == Code.INVALID_ARGUMENT
    sock.close()


def test_unknown_message_types_are_skipped(served: tuple[Server, Path]) -> None:
    sock = raw_connect(served[1])
    sock.sendall(struct.pack(">IIBB", 3, 5, 3, 1) + b"abc")  # stream data: not for us
    sock.sendall(struct.pack(">IIBB", 2, 5, 0x7F, 0) + b"zz")  # a type from the future
    sock.sendall(request_frame(7, "Echo", Req(id="after").SerializeToString()))
    header, reply = read_reply(sock)
    assert header[4:8] == b"\x00\x00\x00\x07"
    assert Resp.FromString(reply.payload).id == "after"
    sock.close()


def test_oversized_frame(served: tuple[Server, Path]) -> None:
    sock = raw_connect(served[1])
    size = ttrpc.MAX_MESSAGE + 1
    sock.sendall(struct.pack(">IIBB", size, 9, 1, 0) + b"\0" * size)
    header, reply = read_reply(sock)
    assert header[4:10] == b"\x00\x00\x00\x09\x02\x00"
    assert reply.status.code == Code.RESOURCE_EXHAUSTED
    # The payload was skipped, not parsed: the next frame on the connection works.
    sock.sendall(request_frame(11, "Echo", Req(id="next").SerializeToString()))
    header, reply = read_reply(sock)
    assert header[4:8] == b"\x00\x00\x00\x0b"
    assert Resp.FromString(reply.payload).id == "next"
    sock.close()


def test_client_refuses_oversized_request(client: Client) -> None:
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Echo", Req(id="x" * ttrpc.MAX_MESSAGE), Resp)
    assert err.value.code is Code.RESOURCE_EXHAUSTED
    assert client.call(SVC, "Echo", Req(id="ok"), Resp).id == "ok"


def test_peer_disconnects_mid_call(served: tuple[Server, Path], probe: Probe) -> None:
    server, path = served
    sock = raw_connect(path)
    sock.sendall(request_frame(1, "Block", Req(id="gone", exec_id="never").SerializeToString()))
    assert probe.entered_event("gone").wait(10)
    wait_until(lambda: server.connections == 1, what="the raw connection")
    sock.close()
    ctx = probe.contexts["gone"]
    assert ctx.cancelled.wait(10)  # the handler learns that nobody waits for it
    wait_until(lambda: server.connections == 0, what="the connection to be dropped")
    with Client(path) as c:
        assert c.call(SVC, "Echo", Req(id="alive"), Resp).id == "alive"


def test_client_timeout(client: Client, probe: Probe) -> None:
    start = time.monotonic()
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Block", Req(id="slow", exec_id="late"), Resp, timeout=0.3)
    assert err.value.code is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    # The server saw the deadline; the late answer is dropped, the connection still works.
    left = probe.contexts["slow"].time_left()
    assert left is not None and left < 0.3
    probe.gate("late").set()
    assert client.call(SVC, "Echo", Req(id="on"), Resp).id == "on"


def test_connect_failure(short_dir: Path) -> None:
    with pytest.raises(TtrpcError) as err:
        Client(short_dir / "missing.sock")
    assert err.value.code is Code.UNAVAILABLE


def test_connection_lost_fails_pending_calls(short_dir: Path, probe: Probe) -> None:
    server = Server()
    probe.register(server)
    path = short_dir / "x.sock"
    server.listen(path)
    server.start()
    c = Client(path)
    errors: queue.Queue[TtrpcError] = queue.Queue()

    def call(i: int) -> None:
        try:
            c.call(SVC, "Block", Req(id=f"p{i}", exec_id="never"), Resp, timeout=30)
        except TtrpcError as e:
            errors.put(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for i in range(3):
        assert probe.entered_event(f"p{i}").wait(10)
    server.shutdown(grace=0)  # closes the connection under the calls
    codes = [errors.get(timeout=10).code for _ in range(3)]
    assert codes == [Code.UNAVAILABLE] * 3
    with pytest.raises(TtrpcError) as err:
        c.call(SVC, "Echo", Req(), Resp)
    assert err.value.code is Code.UNAVAILABLE
    c.close()
    for t in threads:
        t.join(10)


def test_shutdown_lets_in_flight_call_finish(short_dir: Path, probe: Probe) -> None:
    server = Server()
    probe.register(server)
    path = short_dir / "g.sock"
    server.listen(path)
    server.start()
    c = Client(path)
    result: queue.Queue[object] = queue.Queue()

    def call() -> None:
        try:
            result.put(c.call(SVC, "Block", Req(id="inflight", exec_id="release"), Resp))
        except TtrpcError as e:
            result.put(e)

    t = threading.Thread(target=call)
    t.start()
    assert probe.entered_event("inflight").wait(10)
    stopper = threading.Thread(target=server.shutdown, kwargs={"grace": 10})
    stopper.start()
    # No new connections while it drains; the socket file is gone at once.
    wait_until(lambda: not path.exists(), what="the socket to be unlinked")
    with pytest.raises(TtrpcError):
        Client(path)
    assert stopper.is_alive()  # still waiting for the call
    probe.gate("release").set()
    got = result.get(timeout=10)
    assert isinstance(got, Resp) and got.id == "inflight"
    stopper.join(10)
    assert not stopper.is_alive()
    assert server.connections == 0
    c.close()
    t.join(10)


def test_shutdown_from_a_handler(short_dir: Path) -> None:
    """A Shutdown method may stop the server itself: no wait on its own call, and its
    answer still reaches the caller."""
    server = Server()
    path = short_dir / "h.sock"

    def stop(req: Req, ctx: ttrpc.CallContext) -> Resp:
        server.shutdown(grace=10)
        return Resp(id="bye")

    server.register(SVC, "Stop", Req, stop)
    server.listen(path)
    server.start()
    with Client(path) as c:
        start = time.monotonic()
        assert c.call(SVC, "Stop", Req(), Resp).id == "bye"
        assert time.monotonic() - start < 5
        wait_until(lambda: c.closed, what="the connection to close after the answer")
    assert not path.exists()


def test_listen_replaces_stale_socket_and_is_private(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(path))
    old.close()  # a dead process's socket file
    server = Server()
    server.register(SVC, "Echo", Req, Probe().echo)
    server.listen(path)
    server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with Client(f"unix://{path}") as c:
            assert c.call(SVC, "Echo", Req(id="s"), Resp).id == "s"
    finally:
        server.shutdown()
    assert not path.exists()
    regular = short_dir / "file"
    regular.write_text("not a socket")
    with pytest.raises(FileExistsError):
        Server().listen(regular)


def test_adopt_and_serve_forever(short_dir: Path) -> None:
    path = short_dir / "a.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    server = Server()
    server.register(SVC, "Echo", Req, Probe().echo)
    server.adopt(listener)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    with Client(path) as c:
        assert c.call(SVC, "Echo", Req(id="adopted"), Resp).id == "adopted"
    server.shutdown()
    t.join(10)
    assert not t.is_alive()
    assert path.exists()  # not ours to unlink: the shim's start bound it


def test_error_type() -> None:
    e = TtrpcError(5, "gone")
    assert e.code is Code.NOT_FOUND and e.message == "gone" and "NOT_FOUND" in str(e)
    assert TtrpcError(99, "?").code is Code.UNKNOWN
    ctx = ttrpc.CallContext("s", "m", {}, None)
    assert ctx.time_left() is None


# --- the real Go ttrpc ----------------------------------------------------------------------

GO_REASON: str | None = None
if os.geteuid() != 0:
    GO_REASON = "containerd needs root"
elif not (shutil.which("containerd") and shutil.which("ctr")):
    GO_REASON = "containerd/ctr are not installed"


class MiniContainerd:
    """A containerd of our own: private root, state and sockets under a short dir.

    Just enough for ttrpc: no CRI, no images. `extra_path` is put first on its PATH so a
    runtime shim there can be found by name.
    """

    def __init__(self, base: Path, extra_path: Path | None = None) -> None:
        self.base = base
        self.address = base / "c.sock"
        self.ttrpc_address = base / "c.sock.ttrpc"
        self.log = base / "containerd.log"
        config = base / "config.toml"
        config.write_text(
            textwrap.dedent(
                f"""\
                version = 2
                root = "{base / "root"}"
                state = "{base / "state"}"
                disabled_plugins = ["io.containerd.grpc.v1.cri"]
                [grpc]
                  address = "{self.address}"
                [ttrpc]
                  address = "{self.ttrpc_address}"
                [plugins."io.containerd.internal.v1.opt"]
                  path = "{base / "opt"}"
                """
            )
        )
        env = dict(os.environ)
        if extra_path is not None:
            env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"containerd did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.address), *args]

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.ctr_argv(*args), capture_output=True, text=True, timeout=timeout, check=check
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class LineReader:
    """A child's stdout lines in a queue, so tests wait for output with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout
        threading.Thread(target=lambda: [self.lines.put(x) for x in stream], daemon=True).start()

    def wait_for(self, needle: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no output line with {needle!r}")
            with contextlib.suppress(queue.Empty):
                line = self.lines.get(timeout=left)
                if needle in line:
                    return line


@contextlib.contextmanager
def ctr_events(ctrd: MiniContainerd, ready: Callable[[int], None]) -> Iterator[LineReader]:
    """`ctr events` running and subscribed: ready(n) must publish a /tasks/oom probe for
    container "probe-<n>"; it is repeated until ctr prints one, which proves the
    subscription is live before the test's own events go out."""
    proc = subprocess.Popen(
        ctrd.ctr_argv("events"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    reader = LineReader(proc)
    try:
        deadline = time.monotonic() + 20
        n = 0
        while True:
            n += 1
            ready(n)
            try:
                reader.wait_for("probe-", timeout=0.5)
                break
            except AssertionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
        yield reader
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def containerd() -> Iterator[MiniContainerd]:
    if GO_REASON:
        pytest.skip(GO_REASON)
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    ctrd = MiniContainerd(base)
    try:
        yield ctrd
    finally:
        ctrd.stop()
        shutil.rmtree(base, ignore_errors=True)


def forward(client: Client, topic: str, event: object, namespace: str = "default") -> None:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    envelope = ttrpc_events_pb2.Envelope(
        timestamp=stamp,
        namespace=namespace,
        topic=topic,
        event=pack_any(event),  # type: ignore[arg-type]
    )
    client.call(
        "containerd.services.events.ttrpc.v1.Events",
        "Forward",
        ttrpc_events_pb2.ForwardRequest(envelope=envelope),
        empty_pb2.Empty,
    )


def test_go_server_forward_reaches_ctr_events(containerd: MiniContainerd) -> None:
    with Client(containerd.ttrpc_address) as c:
        probe = lambda n: forward(c, "/tasks/oom", events_pb2.TaskOOM(container_id=f"probe-{n}"))  # noqa: E731
        with ctr_events(containerd, probe) as out:
            event = events_pb2.TaskExit(container_id="ctr-sees-me", id="ctr-sees-me", pid=42)
            event.exit_status = 7
            forward(c, "/tasks/exit", event)
            line = out.wait_for("ctr-sees-me")
    # "<timestamp> <namespace> <topic> <event as JSON>": containerd decoded our Any.
    assert " default /tasks/exit " in line
    decoded = json.loads(line[line.index("{") :])
    assert decoded["container_id"] == "ctr-sees-me"
    assert decoded["pid"] == 42 and decoded["exit_status"] == 7


def test_go_server_errors(containerd: MiniContainerd) -> None:
    with Client(containerd.ttrpc_address) as c:
        with pytest.raises(TtrpcError) as err:
            c.call("no.such.Service", "Call", empty_pb2.Empty(), empty_pb2.Empty)
        assert err.value.code is Code.UNIMPLEMENTED
        assert "no.such.Service" in err.value.message
        with pytest.raises(TtrpcError) as err:
            c.call("containerd.services.events.ttrpc.v1.Events", "Nope", Req(), empty_pb2.Empty)
        assert err.value.code is Code.UNIMPLEMENTED
        with pytest.raises(TtrpcError) as err:
            forward(c, "no-slash", events_pb2.TaskOOM(container_id="x"))
        assert err.value.code is Code.INVALID_ARGUMENT  # containerd validates the topic


# Each raw exchange, sent to Go's server and to ours: the status codes and reply headers
# must agree.
RAW_CASES = {
    "unknown service": (request_frame(1, "M", service="no.such.Service"), 1),
    "even stream": (request_frame(2, "M", service="no.such.Service"), 2),
    "bad request": (b"\x00\x00\x00\x03\x00\x00\x00\x05\x01\x00\xff\xff\xff", 5),
    "oversized": (
        struct.pack(">IIBB", ttrpc.MAX_MESSAGE + 1, 7, 1, 0) + b"\0" * (ttrpc.MAX_MESSAGE + 1),
        7,
    ),
}


def raw_exchange(path: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    sock = raw_connect(path)
    try:
        sock.sendall(struct.pack(">IIBB", 3, 3, 3, 0) + b"abc")  # data frame: both ignore it
        for name, (frame, _) in RAW_CASES.items():
            sock.sendall(frame)
            header, reply = read_reply(sock)
            out[name] = (header[4:], reply.status.code)
    finally:
        sock.close()
    return out


def test_framing_matches_go(containerd: MiniContainerd, served: tuple[Server, Path]) -> None:
    go = raw_exchange(containerd.ttrpc_address)
    ours = raw_exchange(served[1])
    assert ours == go
    assert go["oversized"] == (struct.pack(">IBB", 7, 2, 0), Code.RESOURCE_EXHAUSTED)
    assert go["unknown service"][1] == Code.UNIMPLEMENTED
    assert go["even stream"][1] == Code.INVALID_ARGUMENT
    assert go["bad request"][1] == Code.INVALID_ARGUMENT


# A runtime v2 shim just real enough for containerd: containerd, a Go ttrpc client, drives
# our Server. It logs every call it gets, with metadata and deadline, for the asserts.
FAKE_SHIM = r"""#!{python}
import json, os, socket, subprocess, sys, threading
from google.protobuf import empty_pb2
from bulkhead_shim import ttrpc
from bulkhead_shim.api import cgroups_v2_pb2, shim_pb2, task_types_pb2
from bulkhead_shim.publisher import pack_any

LOG = {log!r}
args = sys.argv[1:]
flags = dict(zip(args[:-1:2], args[1:-1:2]))


def note(**entry):
    with open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


if args[-1] == "start":
    path = os.path.join(os.path.dirname(LOG), flags["-id"] + ".sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    proc = subprocess.Popen(
        [sys.executable, __file__, *args[:-1], "serve"], pass_fds=[listener.fileno()],
        env=dict(os.environ, FAKE_FD=str(listener.fileno())), start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(LOG + ".err", "a"))
    note(started=proc.pid)
    print("unix://" + path)
    sys.exit(0)
if args[-1] == "delete":
    sys.stdout.buffer.write(shim_pb2.DeleteResponse(exit_status=137).SerializeToString())
    sys.exit(0)

killed = threading.Event()
pid = os.getpid()


def status():
    return task_types_pb2.STOPPED if killed.is_set() else task_types_pb2.RUNNING


answers = {{
    "Create": (shim_pb2.CreateTaskRequest, lambda r: shim_pb2.CreateTaskResponse(pid=pid)),
    "Connect": (shim_pb2.ConnectRequest,
                lambda r: shim_pb2.ConnectResponse(shim_pid=pid, task_pid=pid)),
    "Start": (shim_pb2.StartRequest, lambda r: shim_pb2.StartResponse(pid=pid)),
    "State": (shim_pb2.StateRequest,
              lambda r: shim_pb2.StateResponse(id=r.id, pid=pid, status=status(),
                                               exit_status=137 if killed.is_set() else 0)),
    "Stats": (shim_pb2.StatsRequest, lambda r: shim_pb2.StatsResponse(stats=pack_any(
        cgroups_v2_pb2.Metrics(pids=cgroups_v2_pb2.PidsStat(current=3, limit=77),
                               memory=cgroups_v2_pb2.MemoryStat(usage=123456))))),
    "Pids": (shim_pb2.PidsRequest, lambda r: shim_pb2.PidsResponse(
        processes=[task_types_pb2.ProcessInfo(pid=pid)])),
    "Wait": (shim_pb2.WaitRequest, lambda r: (killed.wait(60), shim_pb2.WaitResponse(
        exit_status=137))[1]),
    "Kill": (shim_pb2.KillRequest, lambda r: (killed.set(), empty_pb2.Empty())[1]),
    "Delete": (shim_pb2.DeleteRequest,
               lambda r: shim_pb2.DeleteResponse(pid=pid, exit_status=137)),
    "Shutdown": (shim_pb2.ShutdownRequest,
                 lambda r: (threading.Timer(0.2, os._exit, (0,)).start(), empty_pb2.Empty())[1]),
}}


def handler(method, answer):
    def handle(req, ctx):
        note(method=method, metadata=ctx.metadata, time_left=ctx.time_left(), id=req.id)
        return answer(req)
    return handle


server = ttrpc.Server()
for method, (request_type, answer) in answers.items():
    server.register("containerd.task.v2.Task", method, request_type, handler(method, answer))
server.adopt(socket.socket(fileno=int(os.environ["FAKE_FD"])))
server.serve_forever()
"""


def test_go_client_drives_our_server(short_dir: Path) -> None:
    if GO_REASON:
        pytest.skip(GO_REASON)
    bin_dir = short_dir / "bin"
    bin_dir.mkdir()
    log = short_dir / "calls.jsonl"
    shim = bin_dir / "containerd-shim-ttrpcfake-v2"
    shim.write_text(FAKE_SHIM.format(python=sys.executable, log=str(log)))
    shim.chmod(0o755)
    rootfs = short_dir / "rootfs"
    rootfs.mkdir()
    (short_dir / "ctd").mkdir()
    # The shim is found by name on containerd's PATH.
    ctrd = MiniContainerd(short_dir / "ctd", extra_path=bin_dir)

    def calls() -> list[dict]:
        if not log.exists():
            return []
        return [json.loads(x) for x in log.read_text().splitlines()]

    runner = None
    try:
        # `ctr run` (attached) holds a Wait open on containerd's one connection to the
        # shim; State and Stats from other ctr commands must still be answered meanwhile.
        runner = subprocess.Popen(
            ctrd.ctr_argv(
                "run", "--null-io", "--runtime", "io.containerd.ttrpcfake.v2",
                "--rootfs", str(rootfs), "c1", "x",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        wait_until(lambda: any(c.get("method") == "Wait" for c in calls()), what="Wait")
        tasks = ctrd.ctr("task", "ls").stdout
        assert "c1" in tasks and "RUNNING" in tasks
        # `ctr task metrics` decodes our io.containerd.cgroups.v2.Metrics Any.
        metrics = ctrd.ctr("task", "metrics", "c1").stdout
        assert "pids.current" in metrics and "77" in metrics
        assert runner.poll() is None  # still waiting
        ctrd.ctr("task", "kill", "-s", "KILL", "c1")
        out, _ = runner.communicate(timeout=30)  # Wait answered: ctr run ends
        assert runner.returncode == 137, out
        # ctr run deletes the task once it has exited: Delete, then Shutdown of the shim.
        wait_until(lambda: any(c.get("method") == "Shutdown" for c in calls()), what="Shutdown")
    finally:
        if runner is not None and runner.poll() is None:
            runner.kill()
            runner.wait(10)
        ctrd.stop()
        for entry in calls():
            if "started" in entry:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry["started"], signal.SIGKILL)
    methods = [c["method"] for c in calls() if "method" in c]
    for expected in ("Create", "Start", "Wait", "State", "Stats", "Kill", "Delete", "Shutdown"):
        assert expected in methods
    assert methods.index("Create") < methods.index("Start") < methods.index("Delete")
    # What containerd 1.6 sends: no metadata at all, and a deadline only on some calls
    # (State: 2 s, Shutdown: 3 s); Create/Start/Kill/Delete come with none.
    by_method = {c["method"]: c for c in calls() if "method" in c}
    assert all(c["metadata"] == {} for c in calls() if "method" in c)
    assert by_method["Create"]["time_left"] is None
    assert all(c["id"] == "c1" for c in calls() if "method" in c)
