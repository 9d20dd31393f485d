"""Stdio of container processes through the real agent: exact, in order, never lost, never hung.

Natively, as root: the agent is a subprocess with a busybox default rootfs; the test plays the
host through the generated stub. Output is checked byte for byte (or by sha256), offsets of
every chunk are checked as they arrive (test_agent_containers_support.Attachment).
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_agent_containers_support import (
    AgentEnv,
    Attachment,
    Output,
    make_spec,
    running_agent,
    sha256,
)
from test_agent_support import wait_for

from bulkhead_proto.v1 import agent_pb2

pb = agent_pb2
LIMIT = 1024 * 1024  # the agent's unacknowledged bytes per stream (containers.buffer.LIMIT)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def env() -> Iterator[AgentEnv]:
    with running_agent() as state:
        data = state.rootfs / "data"
        data.mkdir()
        (data / "bytes.bin").write_bytes(bytes(range(256)) * 1000)
        yield state


def expected_yes(line: bytes, size: int) -> bytes:
    """What ``yes LINE | head -c SIZE`` prints."""
    whole = line + b"\n"
    return (whole * (size // len(whole) + 1))[:size]


def yes_spec(line: str, size: int, then: str = "") -> dict:
    return make_spec(["sh", "-c", f"yes {line} | head -c {size}{then}"])


# --- the basics --------------------------------------------------------------------------------


def test_output_and_exit_code(env: AgentEnv) -> None:
    out = env.client.run("basic", make_spec(["sh", "-c", "echo hi; echo oops >&2; exit 3"]))
    assert (out.stdout, out.stderr) == (b"hi\n", b"oops\n")
    assert out.exit is not None
    assert (out.exit.kind, out.exit.exit_code) == (pb.ProcessExit.EXITED, 3)
    assert out.exit.pid > 0 and not out.exit.oom_killed


def test_output_written_before_attach_is_kept(env: AgentEnv) -> None:
    c = env.client
    # 300 KB: several pipe-fulls, written and exited before anyone attaches.
    spec = make_spec(["sh", "-c", "echo early; yes early-bird | head -c 300000 >&2; exit 4"])
    c.create("early", spec)
    try:
        c.start("early")
        exit_ = c.wait("early")  # exited, and all output is in the agent's buffers
        assert exit_.exit_code == 4
        out = Attachment(c.stub, "early").collect()
        assert out.stdout == b"early\n"
        assert out.stderr == expected_yes(b"early-bird", 300000)
        assert out.exit is not None and out.exit.exit_code == 4
        # Everything was acknowledged? No: only what collect acked. Attaching again from 0
        # replays what is still kept, from the first unacknowledged byte.
    finally:
        c.remove("early")


def test_ten_thousand_lines(env: AgentEnv) -> None:
    out = env.client.run("lines", make_spec(["seq", "1", "10000"]))
    expected = "".join(f"{i}\n" for i in range(1, 10001)).encode()
    assert out.stdout.count(b"\n") == 10000
    assert sha256(out.stdout) == sha256(expected)
    assert out.exit is not None and out.exit.exit_code == 0


def test_binary_data_is_exact(env: AgentEnv) -> None:
    out = env.client.run("binary", make_spec(["cat", "/data/bytes.bin"]))
    assert out.stdout == bytes(range(256)) * 1000


def test_binary_stdin_round_trip(env: AgentEnv) -> None:
    c = env.client
    payload = bytes(range(256)) * 64
    c.create("binin", make_spec(["cat"]))
    try:
        attachment = Attachment(c.stub, "binin")
        c.start("binin")
        for i in range(0, len(payload), 1000):
            attachment.send(stdin=payload[i : i + 1000])
        attachment.send(stdin_eof=True)
        out = attachment.collect()
    finally:
        c.remove("binin")
    assert out.stdout == payload
    assert out.exit is not None and out.exit.exit_code == 0


# --- volume and back-pressure --------------------------------------------------------------------


def test_hundred_megabytes_exact(env: AgentEnv) -> None:
    size = 100_000_000
    line = "bulkhead-stdio-0123456789abcdefghijklmnopqrstuvwxyz"
    c = env.client
    c.create("big", yes_spec(line, size))
    try:
        attachment = Attachment(c.stub, "big", timeout=120)
        started = time.perf_counter()
        c.start("big")
        digest = hashlib.sha256()
        total = chunks = 0
        exit_ = None
        while (response := attachment.next()) is not None:
            kind = response.WhichOneof("event")
            if kind == "exit":
                exit_ = response.exit
                continue
            assert kind == "stdout"
            data = response.stdout.data
            digest.update(data)
            total += len(data)
            chunks += 1
            if total - attachment.acked["stdout"] >= 256 * 1024:
                attachment.ack()
        elapsed = time.perf_counter() - started
    finally:
        c.remove("big")
    assert total == size
    assert digest.hexdigest() == sha256(expected_yes(line.encode(), size))
    assert exit_ is not None and exit_.exit_code == 0
    print(
        f"\n100 MB container stdout -> gRPC client: {elapsed:.2f} s, "
        f"{size / elapsed / 1e6:.0f} MB/s ({chunks} chunks, {size / chunks / 1024:.0f} KiB average)"
    )


def test_throughput_with_a_fast_writer(env: AgentEnv) -> None:
    # busybox's yes | head manages ~100 MB/s by itself here: to see what the agent's stdio
    # path does, a writer that is not the bottleneck (dd in 64 KiB blocks).
    blocks = 1526  # 100 MB
    size = blocks * 65536
    c = env.client
    c.create("fast", make_spec(["dd", "if=/dev/zero", "bs=65536", f"count={blocks}"]))
    try:
        attachment = Attachment(c.stub, "fast", timeout=120)
        started = time.perf_counter()
        c.start("fast")
        out = attachment.collect()
        elapsed = time.perf_counter() - started
    finally:
        c.remove("fast")
    assert sha256(out.stdout) == sha256(bytes(size))
    assert out.exit is not None and out.exit.exit_code == 0
    print(f"\n100 MB from dd -> gRPC client: {elapsed:.2f} s, {size / elapsed / 1e6:.0f} MB/s")


class BackgroundReader:
    """Reads an Attachment on a thread, acknowledging only when told to."""

    def __init__(self, attachment: Attachment) -> None:
        self.attachment = attachment
        self.out = Output()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (response := self.attachment.next()) is not None:
                kind = response.WhichOneof("event")
                with self.lock:
                    if kind == "exit":
                        self.out.exit = response.exit
                    elif kind == "stdout":
                        self.out.stdout += response.stdout.data
                    else:
                        self.out.stderr += response.stderr.data
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    @property
    def received(self) -> int:
        with self.lock:
            return len(self.out.stdout)


def test_slow_reader_stalls_the_writer_and_loses_nothing(env: AgentEnv) -> None:
    size = 8 * 1024 * 1024
    line = "slow-reader-line"
    c = env.client
    c.create("slow", yes_spec(line, size, "; echo wrote-all >&2"))
    try:
        reader = BackgroundReader(Attachment(c.stub, "slow", timeout=120))
        c.start("slow")
        # No acknowledgement yet: the agent keeps (and sends) exactly its limit, then stops
        # reading the pipe; the writer blocks there.
        wait_for(lambda: reader.received >= LIMIT, 20, "the first MiB")
        with pytest.raises(grpc.RpcError) as info:
            c.wait("slow", timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # blocked, not done
        assert reader.received == LIMIT
        assert b"wrote-all" not in reader.out.stderr
        # Now acknowledge slowly, lagging: each ack frees 128 KiB the writer may then fill.
        acked = 0
        while not reader.done.is_set():
            received = reader.received
            if received - acked >= 128 * 1024 or (received == size and acked < size):
                acked = received - (received % (128 * 1024)) if received < size else received
                reader.attachment.send(ack_stdout=acked)
                time.sleep(0.005)
            else:
                reader.done.wait(0.01)
        assert reader.error is None, reader.error
    finally:
        c.remove("slow")
    assert reader.out.stdout == expected_yes(line.encode(), size)
    assert reader.out.stderr == b"wrote-all\n"
    assert reader.out.exit is not None and reader.out.exit.exit_code == 0


def test_detach_and_reattach_misses_and_repeats_nothing(env: AgentEnv) -> None:
    size = 4 * 1024 * 1024
    line = "reattach"
    expected = expected_yes(line.encode(), size)
    c = env.client
    c.create("reattach", yes_spec(line, size))
    try:
        first = Attachment(c.stub, "reattach")
        c.start("reattach")
        part = first.collect(limit=1536 * 1024)  # acks every 256 KiB as it goes
        assert part.exit is None and len(part.stdout) >= 1536 * 1024
        first.cancel()  # the host goes away mid-stream, acks lagging what it received

        second = Attachment(c.stub, "reattach", stdout_offset=len(part.stdout))
        response = second.next()  # the resume offset was applied (and acknowledged) by now
        assert response is not None
        head = response.stdout.data

        # Resuming below what was acknowledged cannot be served (that data is gone), nor
        # beyond what was produced; a refused Attach does not take over the stdio.
        for offset in (len(part.stdout) - 1, size + 1):
            with pytest.raises(grpc.RpcError) as info:
                Attachment(c.stub, "reattach", stdout_offset=offset).collect()
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        rest = second.collect()
    finally:
        c.remove("reattach")
    assert part.stdout + head + rest.stdout == expected
    assert rest.exit is not None and rest.exit.exit_code == 0


def test_a_new_attach_takes_over(env: AgentEnv) -> None:
    c = env.client
    c.create("takeover", make_spec(["sh", "-c", "echo one; read x; echo two $x"]))
    try:
        first = Attachment(c.stub, "takeover")
        c.start("takeover")
        response = first.next()
        assert response is not None and response.stdout.data == b"one\n"
        second = Attachment(c.stub, "takeover", stdout_offset=4)
        second.send(stdin=b"2nd\n")
        with pytest.raises(grpc.RpcError) as info:
            first.collect()
        assert info.value.code() == grpc.StatusCode.ABORTED
        out = second.collect()
    finally:
        c.remove("takeover")
    assert out.stdout == b"two 2nd\n"
    assert out.exit is not None and out.exit.exit_code == 0


# --- stdin and the end of the stream -------------------------------------------------------------


def test_stdin_reaches_cat_and_eof_ends_it(env: AgentEnv) -> None:
    c = env.client
    c.create("cat", make_spec(["cat"]))
    try:
        attachment = Attachment(c.stub, "cat")
        c.start("cat")
        attachment.send(stdin=b"hello\n")
        response = attachment.next()
        assert response is not None and response.stdout.data == b"hello\n"  # echoed live
        attachment.send(stdin=b"world\n", stdin_eof=True)
        out = attachment.collect()
    finally:
        c.remove("cat")
    assert out.stdout == b"world\n"
    assert out.exit is not None and out.exit.exit_code == 0


def test_stdin_and_output_both_large_do_not_deadlock(env: AgentEnv) -> None:
    # 6 MB pushed at once, acknowledgements queued behind it: the agent must keep reading
    # requests to reach them while cat is blocked on its full stdout.
    payload = expected_yes(b"through-cat", 6 * 1024 * 1024)
    c = env.client
    c.create("catbig", make_spec(["cat"]))
    try:
        attachment = Attachment(c.stub, "catbig", timeout=120)
        c.start("catbig")
        for i in range(0, len(payload), 64 * 1024):
            attachment.send(stdin=payload[i : i + 64 * 1024])
        attachment.send(stdin_eof=True)
        out = attachment.collect()
    finally:
        c.remove("catbig")
    assert sha256(out.stdout) == sha256(payload)
    assert out.exit is not None and out.exit.exit_code == 0


def test_exit_comes_only_after_all_output(env: AgentEnv) -> None:
    size = 3 * 1024 * 1024
    c = env.client
    c.create("order", yes_spec("order", size, "; exit 9"))
    try:
        c.start("order")
        # More than the agent keeps unacknowledged: the process cannot finish writing, so
        # it is not done (WaitProcess waits for all output too).
        with pytest.raises(grpc.RpcError) as info:
            c.wait("order", timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        out = Attachment(c.stub, "order").collect()  # exit is checked to be last
        assert len(out.stdout) == size and out.exit is not None and out.exit.exit_code == 9
        assert c.wait("order").exit_code == 9  # now at once
    finally:
        c.remove("order")


# --- terminals -----------------------------------------------------------------------------------


def test_pty_process_and_resize(env: AgentEnv) -> None:
    c = env.client
    spec = make_spec(["sh", "-c", "tty; read x; stty size"], terminal=True)
    c.create("pty", spec)
    try:
        attachment = Attachment(c.stub, "pty")
        c.start("pty")
        c.stub.ResizeTerminal(
            pb.ResizeTerminalRequest(container_id="pty", rows=33, cols=77), timeout=10
        )
        attachment.send(stdin=b"go\n")
        out = attachment.collect()
    finally:
        c.remove("pty")
    lines = out.stdout.split(b"\r\n")
    assert lines[0].startswith(b"/dev/pts/"), out.stdout
    assert b"33 77" in lines, out.stdout  # after the echoed "go"
    assert out.stderr == b""  # a terminal has one stream
    assert out.exit is not None and out.exit.exit_code == 0


def test_pty_stdin_eof_is_end_of_file_for_the_reader(env: AgentEnv) -> None:
    c = env.client
    c.create("ptycat", make_spec(["cat"], terminal=True))
    try:
        attachment = Attachment(c.stub, "ptycat")
        c.start("ptycat")
        attachment.send(stdin=b"abc\n")
        attachment.send(stdin_eof=True)  # ^D at the start of a line
        out = attachment.collect()
    finally:
        c.remove("ptycat")
    assert out.stdout == b"abc\r\nabc\r\n"  # the terminal's echo, then cat's copy
    assert out.exit is not None and out.exit.exit_code == 0


def test_pty_without_a_devpts_in_the_container(env: AgentEnv) -> None:
    # No devpts of its own: the agent makes the pty and hands the slave over. A terminal
    # all the same (only its name is not to be found inside).
    spec = make_spec(
        ["sh", "-c", "test -t 0 && test -t 1 && echo tty-ok; stty size"], terminal=True
    )
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/pts"]
    spec["process"]["consoleSize"] = {"height": 24, "width": 100}
    out = env.client.run("agentpty", spec)
    assert out.stdout == b"tty-ok\r\n24 100\r\n"
    assert out.exit is not None and out.exit.exit_code == 0


def test_resize_errors(env: AgentEnv) -> None:
    c = env.client
    c.create("nopty", make_spec(["sleep", "1000"]))
    try:
        for request, code in (
            (pb.ResizeTerminalRequest(container_id="nopty", rows=1, cols=1), "FAILED_PRECONDITION"),
            (pb.ResizeTerminalRequest(container_id="nosuch", rows=1, cols=1), "NOT_FOUND"),
            (
                pb.ResizeTerminalRequest(container_id="nopty", exec_id="x", rows=1, cols=1),
                "NOT_FOUND",
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                c.stub.ResizeTerminal(request, timeout=10)
            assert info.value.code() == grpc.StatusCode[code]
    finally:
        c.remove("nopty")


# --- many in a row -------------------------------------------------------------------------------


def test_many_short_lived_containers_all_exact(env: AgentEnv) -> None:
    c = env.client
    durations = []
    for i in range(100):
        started = time.perf_counter()
        out = c.run(f"short{i}", make_spec(["sh", "-c", f"echo out-{i}; echo err-{i} >&2"]))
        durations.append(time.perf_counter() - started)
        assert (out.stdout, out.stderr) == (f"out-{i}\n".encode(), f"err-{i}\n".encode())
        assert out.exit is not None and out.exit.exit_code == 0
    assert not any(name.startswith("short") for name in c.list())
    assert list(env.containers_dir.iterdir()) == []

    # The latency figure: create + start + WaitProcess of /bin/true, no attach.
    latencies = []
    for i in range(50):
        started = time.perf_counter()
        c.create(f"true{i}", make_spec(["/bin/true"]))
        c.start(f"true{i}")
        assert c.wait(f"true{i}").exit_code == 0
        latencies.append(time.perf_counter() - started)
        c.remove(f"true{i}")
    print(
        f"\nrun (create+attach+start+collect+remove) median "
        f"{statistics.median(durations) * 1000:.1f} ms; create+start+wait /bin/true median "
        f"{statistics.median(latencies) * 1000:.1f} ms, "
        f"p90 {sorted(latencies)[int(len(latencies) * 0.9)] * 1000:.1f} ms"
    )


def test_many_at_once_all_exact(env: AgentEnv) -> None:
    def one(i: int) -> Output:
        spec = yes_spec(f"parallel-{i}", 1_500_000 + i, f"; echo done-{i} >&2; exit {i}")
        return env.client.run(f"par{i}", spec)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    for i, out in enumerate(results):
        assert out.stdout == expected_yes(f"parallel-{i}".encode(), 1_500_000 + i)
        assert out.stderr == f"done-{i}\n".encode()
        assert out.exit is not None and out.exit.exit_code == i
