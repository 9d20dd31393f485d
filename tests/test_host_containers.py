"""Container stdio on the host: Attachment and Process against a real in-process gRPC server.

The fake agent below implements Attach (and the few container calls ``run`` needs) over a unix
socket, with an in-memory process model that keeps output until it is acknowledged and blocks
its writer past a window, as the real agent does. Nothing of gRPC itself is mocked.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from bulkhead import AgentClient, containers
from bulkhead.details import ProcessExit
from bulkhead.errors import NotFound, ProcessTimeout, StdioError
from bulkhead.process import Attachment
from bulkhead_agent.oci import spec as agent_spec
from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

DEADLINE = 20.0


class FakeProcess:
    """Output kept from the last acknowledged offset on; the writer blocks past ``window``."""

    def __init__(self, window: int = 1 << 20) -> None:
        self.cond = threading.Condition()
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.acked = {"stdout": 0, "stderr": 0}
        self.window = window
        self.stdin = bytearray()
        self.stdin_eof = False
        self.exit: agent_pb2.ProcessExit | None = None
        self.ack_messages = 0
        self.attaches: list[tuple[int, int]] = []  # offsets each Attach asked for

    def write(self, stream: str, data: bytes) -> None:
        with self.cond:
            while len(self.out[stream]) - self.acked[stream] > self.window:
                if not self.cond.wait(DEADLINE):
                    raise AssertionError(f"{stream} writer starved: no acks")
            self.out[stream] += data
            self.cond.notify_all()

    def finish(self, **exit: object) -> None:
        with self.cond:
            self.exit = agent_pb2.ProcessExit(**exit)
            self.cond.notify_all()

    def read_stdin(self) -> bytes | None:
        """Wait for stdin bytes; ``None`` at EOF."""
        with self.cond:
            while not self.stdin and not self.stdin_eof:
                self.cond.wait(DEADLINE)
            data, self.stdin[:] = bytes(self.stdin), b""
            return data or None

    def apply(self, request: agent_pb2.AttachRequest) -> None:
        with self.cond:
            self.stdin += request.stdin
            self.stdin_eof |= request.stdin_eof
            if request.ack_stdout or request.ack_stderr:
                self.ack_messages += 1
            self.acked["stdout"] = max(self.acked["stdout"], request.ack_stdout)
            self.acked["stderr"] = max(self.acked["stderr"], request.ack_stderr)
            self.cond.notify_all()


def program(proc: FakeProcess, args: list[str]) -> None:
    """What the fake agent "runs": a few commands, enough to exercise the stdio machinery."""
    name = args[0]
    if name == "echo":
        proc.write("stdout", (" ".join(args[1:]) + "\n").encode())
        proc.finish(kind=agent_pb2.ProcessExit.EXITED, exit_code=0)
    elif name == "cat":  # stdin to stdout, upper-cased on stderr
        while (data := proc.read_stdin()) is not None:
            proc.write("stdout", data)
            proc.write("stderr", data.upper())
        proc.finish(kind=agent_pb2.ProcessExit.EXITED, exit_code=0)
    elif name == "gen":  # gen BYTES [CODE]: deterministic output, both streams
        total, code = int(args[1]), int(args[2]) if len(args) > 2 else 0
        for i, block in enumerate(blocks(total)):
            proc.write("stdout" if i % 3 else "stderr", block)
        proc.finish(kind=agent_pb2.ProcessExit.EXITED, exit_code=code)
    elif name == "say":  # say OUT ERR CODE
        proc.write("stdout", args[1].encode() + b"\n")
        proc.write("stderr", args[2].encode() + b"\n")
        proc.finish(kind=agent_pb2.ProcessExit.EXITED, exit_code=int(args[3]))
    elif name == "tty-cat":  # a terminal's raw bytes back, until Ctrl-D (as a byte)
        while (data := proc.read_stdin()) is not None:
            proc.write("stdout", data.replace(b"\x04", b""))
            if b"\x04" in data:
                break
        proc.finish(kind=agent_pb2.ProcessExit.EXITED, exit_code=0)
    elif name == "hang":
        with proc.cond:
            while proc.exit is None:
                proc.cond.wait()
    elif name == "missing":
        proc.finish(
            kind=agent_pb2.ProcessExit.START_FAILED,
            start_failure=agent_pb2.StartFailure(step="exec", errno=2, message="not found"),
        )
    else:
        raise AssertionError(f"unknown fake program {name}")


def blocks(total: int, size: int = 10_000) -> Iterator[bytes]:
    counter = 0
    while total > 0:
        block = hashlib.sha256(str(counter).encode()).digest() * (size // 32)
        yield block[:total]
        total -= len(block[:total])
        counter += 1


def expected_streams(total: int) -> dict[str, bytes]:
    out = {"stdout": bytearray(), "stderr": bytearray()}
    for i, block in enumerate(blocks(total)):
        out["stdout" if i % 3 else "stderr"] += block
    return {k: bytes(v) for k, v in out.items()}


class FakeAgent(agent_pb2_grpc.AgentServicer):
    def __init__(self) -> None:
        self.procs: dict[tuple[str, str], FakeProcess] = {}
        self.specs: dict[str, dict] = {}
        self.removed: list[str] = []
        self.started: list[str] = []
        self.chunk = 64 * 1024
        self.resend_from_acked = False  # resend what was not acked (the client must trim)
        self.skip_bytes = 0  # start this far past the asked offset (a gap: must be refused)
        self.window = 1 << 20
        self.resizes: list[tuple[int, int]] = []
        self.signals: list[int] = []

    # -- container calls --

    def CreateContainer(self, request, context):
        try:
            agent_spec.loads(request.oci_spec)  # the guest's own validation
        except agent_spec.SpecError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.specs[request.container_id] = json.loads(request.oci_spec)
        self.procs[(request.container_id, "")] = FakeProcess(self.window)
        return agent_pb2.CreateContainerResponse(pid=100)

    def StartContainer(self, request, context):
        proc = self._proc(request.container_id, "", context)
        args = self.specs[request.container_id]["process"]["args"]
        self.started.append(request.container_id)
        threading.Thread(target=program, args=(proc, args), daemon=True).start()
        return agent_pb2.StartContainerResponse()

    def ExecProcess(self, request, context):
        proc = FakeProcess(self.window)
        self.procs[(request.container_id, request.exec_id)] = proc
        args = json.loads(request.process)["args"]
        threading.Thread(target=program, args=(proc, args), daemon=True).start()
        return agent_pb2.ExecProcessResponse(pid=101)

    def SignalProcess(self, request, context):
        proc = self._proc(request.container_id, request.exec_id, context)
        self.signals.append(request.signal)
        proc.finish(kind=agent_pb2.ProcessExit.SIGNALED, signal=request.signal)
        return agent_pb2.SignalProcessResponse()

    def WaitProcess(self, request, context):
        proc = self._proc(request.container_id, request.exec_id, context)
        with proc.cond:
            while proc.exit is None and context.is_active():
                proc.cond.wait(0.1)
            return proc.exit

    def RemoveContainer(self, request, context):
        self._proc(request.container_id, "", context)
        for key in [k for k in self.procs if k[0] == request.container_id]:
            proc = self.procs.pop(key)
            if proc.exit is None:
                proc.finish(kind=agent_pb2.ProcessExit.SIGNALED, signal=9)
        self.removed.append(request.container_id)
        return agent_pb2.RemoveContainerResponse()

    def ResizeTerminal(self, request, context):
        self._proc(request.container_id, request.exec_id, context)
        self.resizes.append((request.rows, request.cols))
        return agent_pb2.ResizeTerminalResponse()

    def _proc(self, container_id: str, exec_id: str, context) -> FakeProcess:
        proc = self.procs.get((container_id, exec_id))
        if proc is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no process {container_id}/{exec_id}")
        return proc

    # -- stdio --

    def Attach(self, request_iterator, context):
        first = next(request_iterator)
        proc = self._proc(first.container_id, first.exec_id, context)
        proc.apply(first)
        proc.attaches.append((first.stdout_offset, first.stderr_offset))

        def read_requests() -> None:
            try:
                for request in request_iterator:
                    proc.apply(request)
            except grpc.RpcError:
                pass  # the client went away

        threading.Thread(target=read_requests, daemon=True).start()
        pos = {"stdout": first.stdout_offset, "stderr": first.stderr_offset}
        if self.resend_from_acked:
            pos = dict(proc.acked)
        pos = {k: v + self.skip_bytes for k, v in pos.items()}
        while context.is_active():
            with proc.cond:
                while context.is_active() and proc.exit is None and not self._pending(proc, pos):
                    proc.cond.wait(0.1)
                batch = []
                for stream in ("stdout", "stderr"):
                    data = bytes(proc.out[stream][pos[stream] : pos[stream] + self.chunk])
                    if data:
                        batch.append((stream, pos[stream], data))
                        pos[stream] += len(data)
                done = proc.exit is not None and not self._pending(proc, pos)
            for stream, offset, data in batch:
                yield agent_pb2.AttachResponse(
                    **{stream: agent_pb2.Output(offset=offset, data=data)}
                )
            if done:
                yield agent_pb2.AttachResponse(exit=proc.exit)
                return

    @staticmethod
    def _pending(proc: FakeProcess, pos: dict[str, int]) -> bool:
        return any(len(proc.out[s]) > pos[s] for s in pos)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[FakeAgent, AgentClient]]:
    fake = FakeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    agent_pb2_grpc.add_AgentServicer_to_server(fake, server)
    sock = tmp_path / "agent.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    client = AgentClient(sock, timeout=DEADLINE)
    try:
        yield fake, client
    finally:
        client.close()
        server.stop(0)


def start(fake: FakeAgent, args: list[str], container_id: str = "c1") -> FakeProcess:
    proc = FakeProcess(fake.window)
    fake.procs[(container_id, "")] = proc
    threading.Thread(target=program, args=(proc, args), daemon=True).start()
    return proc


def collect(attachment: Attachment, limit: int | None = None) -> dict[str, bytes]:
    """Read until the end (or until ``limit`` bytes in all, then stop reading)."""
    got = {"stdout": bytearray(), "stderr": bytearray()}
    last_offsets = {"stdout": attachment.stdout_offset, "stderr": attachment.stderr_offset}
    for out in attachment:
        # Offsets are contiguous: each piece starts where the previous one ended.
        assert out.offset == last_offsets[out.stream]
        last_offsets[out.stream] += len(out.data)
        got[out.stream] += out.data
        if limit is not None and sum(map(len, got.values())) >= limit:
            break
    return {k: bytes(v) for k, v in got.items()}


def within(seconds: float, what: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a thread and fail (not hang) if it takes longer than ``seconds``."""
    result: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} did not finish within {seconds}s"
    if errors:
        raise errors[0]
    return result[0]


# -- Attachment --


def test_output_in_order_then_the_exit_last(agent) -> None:
    fake, client = agent
    start(fake, ["gen", "300000", "3"])
    attachment = client.attach("c1")
    exits_seen_early = []

    def read() -> dict[str, bytes]:
        got = {"stdout": bytearray(), "stderr": bytearray()}
        for out in attachment:
            exits_seen_early.append(attachment.exit)
            got[out.stream] += out.data
        return {k: bytes(v) for k, v in got.items()}

    got = within(DEADLINE, "reading the stream", read)
    assert got == expected_streams(300000)
    assert set(exits_seen_early) == {None}  # the exit only once all output is read
    assert attachment.exit is not None
    assert (attachment.exit.kind, attachment.exit.returncode) == ("exited", 3)
    assert not attachment.attached


def test_acks_let_the_writer_go_past_its_window(agent) -> None:
    fake, client = agent
    fake.window = 100_000  # the writer blocks once this much is unacknowledged
    proc = start(fake, ["gen", "3000000"])
    attachment = client.attach("c1", ack_bytes=32 * 1024, ack_interval=5.0)
    got = within(DEADLINE, "reading 3 MB through a 100 kB window", lambda: collect(attachment))
    assert got == expected_streams(3_000_000)
    # Acks by size (the timer is 5 s): many messages, and everything read was acknowledged.
    assert proc.ack_messages > 10
    assert attachment.acks_sent > 10


def test_acks_are_sent_on_a_timer_when_output_is_small(agent) -> None:
    fake, client = agent
    proc = start(fake, ["cat"])
    attachment = client.attach("c1", ack_interval=0.05)
    attachment.write_stdin(b"hello\n")
    stream = iter(attachment)
    first = next(stream)
    assert first.data in (b"hello\n", b"HELLO\n")

    def acked() -> bool:
        with proc.cond:
            return proc.acked[first.stream] == len(first.data)

    deadline = time.monotonic() + DEADLINE
    while not acked():
        assert time.monotonic() < deadline, "the small output was never acknowledged"
        time.sleep(0.01)
    attachment.detach()


def test_stdin_and_eof_reach_the_process(agent) -> None:
    fake, client = agent
    proc = start(fake, ["cat"])
    attachment = client.attach("c1")
    payload = bytes(range(256)) * 4000  # binary, 1 MB: several stdin messages
    attachment.write_stdin(payload)
    attachment.close_stdin()
    got = within(DEADLINE, "cat to finish after EOF", lambda: collect(attachment))
    assert got["stdout"] == payload
    assert got["stderr"] == payload.upper()
    assert proc.stdin_eof
    assert attachment.exit is not None and attachment.exit.ok
    with pytest.raises(ValueError, match="closed"):
        attachment.write_stdin(b"more")


def test_detach_and_reattach_miss_and_repeat_nothing(agent) -> None:
    fake, client = agent
    start(fake, ["gen", "2000000", "0"])
    attachment = client.attach("c1", ack_bytes=50_000)
    parts = [within(DEADLINE, "first part", lambda: collect(attachment, limit=300_000))]
    attachment.detach()
    assert not attachment.attached and attachment.exit is None
    for _ in range(4):  # several more round trips, each reading a little
        attachment.reattach()
        parts.append(within(DEADLINE, "a middle part", lambda: collect(attachment, 200_000)))
        attachment.detach()
    attachment.reattach()
    parts.append(within(DEADLINE, "the rest", lambda: collect(attachment)))
    joined = {s: b"".join(p[s] for p in parts) for s in ("stdout", "stderr")}
    assert joined == expected_streams(2_000_000)
    assert attachment.exit is not None and attachment.exit.ok
    proc = fake.procs[("c1", "")]
    # Each reattach asked to resume exactly where the reader had got to.
    assert proc.attaches[0] == (0, 0)
    assert len(proc.attaches) == 6 and len(set(proc.attaches)) == 6


def test_a_resend_of_old_output_is_trimmed(agent) -> None:
    fake, client = agent
    fake.resend_from_acked = True  # the server starts from the last ack, before the reader
    start(fake, ["gen", "500000"])
    # Acks only on a long timer: the reader is well ahead of what the server has freed.
    attachment = client.attach("c1", ack_bytes=10**9, ack_interval=30)
    first = within(DEADLINE, "first part", lambda: collect(attachment, limit=200_000))
    attachment.detach()
    attachment.reattach()
    rest = within(DEADLINE, "the rest", lambda: collect(attachment))
    joined = {s: first[s] + rest[s] for s in first}
    assert joined == expected_streams(500_000)


def test_a_gap_in_the_stream_is_an_error_not_silence(agent) -> None:
    fake, client = agent
    fake.skip_bytes = 10
    start(fake, ["gen", "1000"])
    attachment = client.attach("c1")
    with pytest.raises(StdioError, match="missing"):
        within(DEADLINE, "reading", lambda: collect(attachment))


def test_detach_from_another_thread_ends_the_reader(agent) -> None:
    fake, client = agent
    start(fake, ["hang"])
    attachment = client.attach("c1")
    reader = threading.Thread(target=lambda: collect(attachment), daemon=True)
    reader.start()
    time.sleep(0.2)
    attachment.detach()
    reader.join(DEADLINE)
    assert not reader.is_alive()
    assert attachment.exit is None


def test_attaching_to_a_missing_process_is_not_found(agent) -> None:
    _, client = agent
    attachment = client.attach("nope")
    with pytest.raises(NotFound):
        within(DEADLINE, "reading", lambda: collect(attachment))


# -- Process and run() --


def test_run_communicate_and_remove(agent) -> None:
    fake, client = agent
    proc = containers.run(client, ["echo", "hi", "there"], name="web")
    out, err = within(DEADLINE, "communicate", proc.communicate)
    assert (out, err) == (b"hi there\n", b"")
    assert proc.returncode == 0
    assert fake.removed == ["web"]  # remove=True, done before wait() returned
    spec = fake.specs["web"]
    assert spec["hostname"] == "web"
    assert spec["process"]["args"] == ["echo", "hi", "there"]


def test_run_streams_stdout_and_stderr_separately(agent) -> None:
    fake, client = agent
    proc = containers.run(client, ["gen", "400000", "5"], remove=False)
    got: dict[str, bytes] = {}

    def read(stream: str) -> None:
        got[stream] = getattr(proc, stream).read()

    threads = [threading.Thread(target=read, args=(s,)) for s in ("stdout", "stderr")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert got == expected_streams(400000)
    assert proc.wait(timeout=DEADLINE) == 5
    assert fake.removed == []


def test_reading_one_stream_does_not_deadlock_on_the_other(agent) -> None:
    _fake, client = agent
    proc = containers.run(client, ["gen", "2000000"])
    proc.read_buffer = 50_000  # small host buffers: stderr overflows while we read stdout
    stdout = within(DEADLINE, "reading stdout only", proc.stdout.read)
    assert stdout == expected_streams(2_000_000)["stdout"]
    assert proc.wait(DEADLINE) == 0
    assert proc.stderr.read() == expected_streams(2_000_000)["stderr"]


def test_wait_without_reading_keeps_the_output(agent) -> None:
    _fake, client = agent
    proc = containers.run(client, ["gen", "3000000", "1"])
    proc.read_buffer = 10_000
    assert within(DEADLINE, "wait", lambda: proc.wait(DEADLINE)) == 1
    assert proc.stdout.read() == expected_streams(3_000_000)["stdout"]


def test_output_in_order_through_process(agent) -> None:
    _fake, client = agent
    proc = containers.run(client, ["cat"], stdin=True)
    proc.stdin.write(b"abc")
    proc.stdin.close()
    pieces = within(DEADLINE, "output()", lambda: [(o.stream, o.data) for o in proc.output()])
    assert sorted(pieces) == [("stderr", b"ABC"), ("stdout", b"abc")]
    assert proc.wait(1) == 0


def test_stdin_false_means_eof_at_once(agent) -> None:
    _fake, client = agent
    proc = containers.run(client, ["cat"])  # without stdin, cat sees EOF and exits
    assert within(DEADLINE, "wait", lambda: proc.wait(DEADLINE)) == 0


def test_wait_timeout_and_signal(agent) -> None:
    _fake, client = agent
    proc = containers.run(client, ["hang"], name="hangs")
    with pytest.raises(ProcessTimeout):
        proc.wait(timeout=0.3)
    proc.signal(15)
    assert proc.wait(DEADLINE) == 128 + 15
    assert proc.exit is not None and proc.exit.kind == "signaled"


def test_wait_after_detach_asks_the_agent(agent) -> None:
    fake, client = agent
    proc = containers.run(client, ["hang"], remove=False)
    proc.detach()
    fake.procs[(proc.container_id, "")].finish(kind=agent_pb2.ProcessExit.EXITED, exit_code=4)
    assert proc.wait(DEADLINE) == 4


def test_a_start_failure_is_127(agent) -> None:
    _fake, client = agent
    proc = containers.run(client, ["missing"])
    assert proc.wait(DEADLINE) == 127
    assert proc.exit is not None
    assert proc.exit.start_failure is not None and proc.exit.start_failure.step == "exec"


def test_exec_into_a_container(agent) -> None:
    fake, client = agent
    container = containers.create(client, ["hang"], name="box")
    container.start()
    proc = container.exec(["echo", "inside"], exec_id="e1")
    assert proc.communicate(timeout=DEADLINE) == (b"inside\n", b"")
    container.remove()
    assert fake.removed == ["box"]


def test_a_bad_spec_is_refused_before_anything_runs(agent) -> None:
    fake, client = agent
    from bulkhead.errors import InvalidArgument

    spec = containers.specs.make_spec(["true"])
    spec["process"]["cwd"] = "relative"
    with pytest.raises(InvalidArgument, match=r"process\.cwd"):
        containers.run(client, spec=spec)
    assert fake.started == []


def test_process_exit_returncodes() -> None:
    def exit_of(**fields: object) -> ProcessExit:
        return ProcessExit.from_proto(agent_pb2.ProcessExit(**fields))

    E = agent_pb2.ProcessExit
    assert exit_of(kind=E.EXITED, exit_code=0).returncode == 0
    assert exit_of(kind=E.EXITED, exit_code=7).returncode == 7
    killed = exit_of(kind=E.SIGNALED, signal=9, oom_killed=True)
    assert (killed.returncode, killed.oom_killed) == (137, True)
    assert str(killed) == "killed by SIGKILL (out of memory)"
    assert exit_of(kind=E.SIGNALED, signal=2).returncode == 130
    not_found = agent_pb2.StartFailure(step="exec", errno=2, message="sh: not found")
    assert exit_of(kind=E.START_FAILED, start_failure=not_found).returncode == 127
    denied = agent_pb2.StartFailure(step="exec", errno=13, message="permission denied")
    assert exit_of(kind=E.START_FAILED, start_failure=denied).returncode == 126
    mount = agent_pb2.StartFailure(step="mount", errno=22, message="bad option")
    failed = exit_of(kind=E.START_FAILED, start_failure=mount)
    assert failed.returncode == 126
    assert "mount" in str(failed)
    assert failed.to_dict()["kind"] == "start_failed"
    assert exit_of().returncode == 125  # unclassified
