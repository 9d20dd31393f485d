"""The shim's stdin relay against real FIFOs, written to the way containerd's clients do.

When a container's stdin ends decides whether ``echo hi | ctr run ... cat`` returns: ``ctr``
sends CloseIO only if its stdin ended after Create returned, so a writer's close before Start
must end stdin too, while after Start only CloseIO may (a detaching client must not).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead_shim.stdio import Relay, Stdio

DEADLINE = 10.0


class FakeAttachment:
    """Stands in for the agent's Attach stream: what reached the process's stdin."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = threading.Event()

    def write_stdin(self, data: bytes) -> None:
        assert not self.closed.is_set(), "stdin written after it was closed"
        self.data += data

    def close_stdin(self) -> None:
        self.closed.set()


class FakeProcess:
    """A process with no output that exits when the test says so."""

    def __init__(self) -> None:
        self.attachment = FakeAttachment()
        self.exit = None
        self.ended = threading.Event()

    def output(self) -> Iterator[object]:
        self.ended.wait(DEADLINE)
        return iter(())


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "stdin"
    os.mkfifo(path)
    return path


@pytest.fixture
def relay(fifo: Path) -> Iterator[tuple[Relay, FakeProcess]]:
    process = FakeProcess()
    done = threading.Event()
    r = Relay(process, Stdio(stdin=str(fifo)), container_id="c", namespace="ns",  # type: ignore[arg-type]
              on_done=lambda exit, error: done.set())  # fmt: skip
    r.start()  # as at Create: the FIFO's read end is open from here on
    yield r, process
    process.ended.set()
    assert done.wait(DEADLINE)


def write(path: Path, data: bytes) -> None:
    """A client's writer: open (blocks until our reader is there), write it all, close."""
    with open(path, "wb") as f:
        f.write(data)


def test_a_short_pipe_closed_before_start_ends_stdin(relay, fifo: Path) -> None:
    r, process = relay
    write(fifo, b"short\n")  # ctr read its stdin to the end during Create: no CloseIO will come
    r.started()
    assert process.attachment.closed.wait(DEADLINE), "stdin never ended"
    assert bytes(process.attachment.data) == b"short\n"


def test_after_start_a_writer_that_goes_does_not_end_stdin(relay, fifo: Path) -> None:
    r, process = relay
    first = os.open(fifo, os.O_WRONLY)
    r.started()
    os.write(first, b"one ")
    os.close(first)  # a client detaching (or containerd restarting)
    write(fifo, b"two")  # another attaches and writes
    assert not process.attachment.closed.wait(0.5), "a writer's close ended stdin after Start"
    r.close_stdin()  # containerd's CloseIO
    assert process.attachment.closed.wait(DEADLINE)
    assert bytes(process.attachment.data) == b"one two"


def test_a_large_stream_arrives_whole_and_ends_at_close_io(relay, fifo: Path) -> None:
    r, process = relay
    blob = os.urandom(2 * 1024 * 1024)  # far beyond a pipe's 64 KiB: the writer outlives Start
    writer = threading.Thread(target=write, args=(fifo, blob))
    writer.start()
    r.started()
    writer.join(DEADLINE)
    assert not writer.is_alive()
    r.close_stdin()
    assert process.attachment.closed.wait(DEADLINE)
    assert bytes(process.attachment.data) == blob


def test_no_writer_at_all_waits_for_close_io(relay) -> None:
    r, process = relay
    r.started()
    assert not process.attachment.closed.wait(0.5), "stdin ended with nobody having written"
    r.close_stdin()
    assert process.attachment.closed.wait(DEADLINE)
    assert process.attachment.data == b""


def test_close_io_before_start_keeps_what_was_written(relay, fifo: Path) -> None:
    r, process = relay
    writer = os.open(fifo, os.O_WRONLY)
    os.write(writer, b"early")
    r.close_stdin()
    assert process.attachment.closed.wait(DEADLINE)
    os.close(writer)
    assert bytes(process.attachment.data) == b"early"


def test_an_exec_fifo_opened_at_exec_sees_a_close_before_start(fifo: Path) -> None:
    from bulkhead_shim.stdio import open_stdin_fifo

    fd = open_stdin_fifo(str(fifo))  # at Exec
    write(fifo, b"to the exec")  # the client's copy ends before Exec returned
    process = FakeProcess()
    r = Relay(process, Stdio(stdin=str(fifo)), container_id="c", namespace="ns",  # type: ignore[arg-type]
              on_done=lambda exit, error: None, stdin_fd=fd)  # fmt: skip
    r.start()  # at Start
    r.started()
    assert process.attachment.closed.wait(DEADLINE)
    assert bytes(process.attachment.data) == b"to the exec"
    process.ended.set()
    assert r.done.wait(DEADLINE)
