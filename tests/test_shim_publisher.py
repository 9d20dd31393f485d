"""EventPublisher: ordered, retried delivery of task events, checked against a ttrpc
events server of our own (to stop and restart it at will) and against real containerd."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2, timestamp_pb2
from test_ttrpc import GO_REASON, MiniContainerd, ctr_events

from bulkhead_shim.api import events_pb2, ttrpc_events_pb2
from bulkhead_shim.publisher import EVENTS_SERVICE, EventPublisher, pack_any, topic_of
from bulkhead_shim.ttrpc import CallContext, Client, Code, Server, TtrpcError

TOPICS = {
    events_pb2.TaskCreate: "/tasks/create",
    events_pb2.TaskStart: "/tasks/start",
    events_pb2.TaskExit: "/tasks/exit",
    events_pb2.TaskDelete: "/tasks/delete",
    events_pb2.TaskExecAdded: "/tasks/exec-added",
    events_pb2.TaskExecStarted: "/tasks/exec-started",
    events_pb2.TaskOOM: "/tasks/oom",
    events_pb2.TaskPaused: "/tasks/paused",
    events_pb2.TaskResumed: "/tasks/resumed",
    events_pb2.TaskCheckpointed: "/tasks/checkpointed",
}


@pytest.mark.parametrize(("cls", "topic"), TOPICS.items())
def test_topic_of(cls: type, topic: str) -> None:
    assert topic_of(cls(container_id="c")) == topic


def test_topic_of_non_event() -> None:
    with pytest.raises(ValueError, match="TaskIO"):
        topic_of(events_pb2.TaskIO())


def test_pack_any_uses_bare_type_name() -> None:
    event = events_pb2.TaskStart(container_id="c", pid=9)
    packed = pack_any(event)
    assert packed.type_url == "containerd.events.TaskStart"  # no type.googleapis.com/
    assert events_pb2.TaskStart.FromString(packed.value) == event


class FakeEvents:
    """containerd's events ttrpc service, played by our Server, restartable on one path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[tuple[ttrpc_events_pb2.Envelope, dict[str, list[str]]]] = []
        self.cond = threading.Condition()
        self.refuse: set[str] = set()  # topics answered INVALID_ARGUMENT
        self.hold = threading.Event()
        self.hold.set()
        self.server: Server | None = None

    def forward(self, req: ttrpc_events_pb2.ForwardRequest, ctx: CallContext) -> empty_pb2.Empty:
        self.hold.wait(30)
        if req.envelope.topic in self.refuse:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"bad topic {req.envelope.topic}")
        with self.cond:
            self.received.append((req.envelope, ctx.metadata))
            self.cond.notify_all()
        return empty_pb2.Empty()

    def start(self) -> None:
        self.server = Server()
        self.server.register(
            EVENTS_SERVICE, "Forward", ttrpc_events_pb2.ForwardRequest, self.forward
        )
        self.server.listen(self.path)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown(grace=1)
            self.server = None

    def wait_for(self, count: int, timeout: float = 10) -> list[ttrpc_events_pb2.Envelope]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= count, timeout), (
                f"got {len(self.received)} of {count} events"
            )
            return [env for env, _ in self.received]

    def container_ids(self) -> list[str]:
        out = []
        with self.cond:
            for env, _ in self.received:
                cls = next(c for c in TOPICS if c.DESCRIPTOR.full_name == env.event.type_url)
                out.append(cls.FromString(env.event.value).container_id)
        return out


@pytest.fixture
def events_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pub-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(events_dir: Path) -> Iterator[FakeEvents]:
    f = FakeEvents(events_dir / "e.sock")
    f.start()
    try:
        yield f
    finally:
        f.hold.set()
        f.stop()


def test_forwards_in_order_with_envelope(fake: FakeEvents) -> None:
    pub = EventPublisher(f"unix://{fake.path}", "k8s.io")
    before = time.time()
    for i in range(30):
        pub.publish("/tasks/exec-added", events_pb2.TaskExecAdded(container_id=f"c{i}"))
    pub.close()
    envelopes = fake.wait_for(30)
    assert fake.container_ids() == [f"c{i}" for i in range(30)]
    env = envelopes[0]
    assert env.namespace == "k8s.io"
    assert env.topic == "/tasks/exec-added"
    assert env.event.type_url == "containerd.events.TaskExecAdded"
    assert before - 1 <= env.timestamp.ToDatetime().timestamp() <= time.time() + 1
    # Stamped at publish time, so the stamps keep publish order too.
    stamps = [e.timestamp.ToNanoseconds() for e in envelopes]
    assert stamps == sorted(stamps)
    # containerd's own shims name the namespace in metadata as well.
    assert fake.received[0][1] == {"containerd-namespace-ttrpc": ["k8s.io"]}


def test_publish_does_not_block(fake: FakeEvents) -> None:
    fake.hold.clear()  # containerd is slow: Forward hangs
    pub = EventPublisher(str(fake.path), "default", timeout=10)
    start = time.monotonic()
    for i in range(100):
        pub.publish("/tasks/oom", events_pb2.TaskOOM(container_id=str(i)))
    assert time.monotonic() - start < 1.0
    fake.hold.set()
    assert pub.flush(timeout=20)
    assert fake.container_ids() == [str(i) for i in range(100)]
    pub.close()


def test_waits_for_containerd_to_come_up(events_dir: Path) -> None:
    fake = FakeEvents(events_dir / "late.sock")
    pub = EventPublisher(str(fake.path), "default", retry_for=30)
    try:
        pub.publish("/tasks/start", events_pb2.TaskStart(container_id="early", pid=1))
        pub.publish("/tasks/exit", events_pb2.TaskExit(container_id="early", pid=1))
        time.sleep(0.3)  # some failed attempts first: nothing listens yet
        fake.start()
        envelopes = fake.wait_for(2)
        assert [e.topic for e in envelopes] == ["/tasks/start", "/tasks/exit"]
    finally:
        pub.close()
        fake.stop()


def test_survives_containerd_restart(fake: FakeEvents) -> None:
    pub = EventPublisher(str(fake.path), "default", retry_for=30)
    try:
        pub.publish("/tasks/create", events_pb2.TaskCreate(container_id="a"))
        fake.wait_for(1)
        fake.stop()  # containerd goes away; the publisher's connection breaks
        pub.publish("/tasks/start", events_pb2.TaskStart(container_id="b"))
        pub.publish("/tasks/exit", events_pb2.TaskExit(container_id="c"))
        time.sleep(0.3)
        fake.start()  # and comes back on the same socket
        fake.wait_for(3)
        assert fake.container_ids() == ["a", "b", "c"]
    finally:
        pub.close()


def test_refused_event_is_logged_and_skipped(
    fake: FakeEvents, caplog: pytest.LogCaptureFixture
) -> None:
    fake.refuse.add("/tasks/paused")
    pub = EventPublisher(str(fake.path), "default")
    with caplog.at_level(logging.ERROR, logger="bulkhead_shim.publisher"):
        pub.publish("/tasks/paused", events_pb2.TaskPaused(container_id="x"))
        pub.publish("/tasks/resumed", events_pb2.TaskResumed(container_id="y"))
        pub.close()
    assert fake.container_ids() == ["y"]
    assert any("/tasks/paused" in r.getMessage() for r in caplog.records)


def test_gives_up_after_retry_for_and_logs(
    events_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pub = EventPublisher(str(events_dir / "nobody.sock"), "default", retry_for=0.5)
    with caplog.at_level(logging.WARNING, logger="bulkhead_shim.publisher"):
        pub.publish("/tasks/exit", events_pb2.TaskExit(container_id="lost"))
        assert pub.flush(timeout=10)
    assert any(
        r.levelno == logging.ERROR and "/tasks/exit" in r.getMessage() and "lost" in r.getMessage()
        for r in caplog.records
    )
    pub.close()


def test_close_is_bounded_and_logs_unsent(
    events_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pub = EventPublisher(str(events_dir / "nobody.sock"), "default", retry_for=60)
    with caplog.at_level(logging.ERROR, logger="bulkhead_shim.publisher"):
        for i in range(3):
            pub.publish("/tasks/oom", events_pb2.TaskOOM(container_id=str(i)))
        start = time.monotonic()
        pub.close(timeout=0.5)
        assert time.monotonic() - start < 5
        pub.publish("/tasks/oom", events_pb2.TaskOOM(container_id="late"))
    lost = [r.getMessage() for r in caplog.records if "/tasks/oom" in r.getMessage()]
    assert len(lost) == 4  # the three queued, and the one published after close


# --- real containerd ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containerd() -> Iterator[MiniContainerd]:
    if GO_REASON:
        pytest.skip(GO_REASON)
    base = Path(tempfile.mkdtemp(prefix="ctp-", dir="/tmp"))
    ctrd = MiniContainerd(base)
    try:
        yield ctrd
    finally:
        ctrd.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_ctr_events_sees_our_events_in_order(containerd: MiniContainerd) -> None:
    pub = EventPublisher(f"unix://{containerd.ttrpc_address}", "default")
    try:
        probe = lambda n: pub.publish(  # noqa: E731
            "/tasks/oom", events_pb2.TaskOOM(container_id=f"probe-{n}")
        )
        with ctr_events(containerd, probe) as out:
            exited = timestamp_pb2.Timestamp(seconds=1_700_000_000)
            cid = "pub-order-1"
            pub.publish(
                "/tasks/create",
                events_pb2.TaskCreate(
                    container_id=cid, bundle="/run/b/pub-order-1", pid=101,
                    io=events_pb2.TaskIO(stdout="/fifo/out"),
                ),
            )  # fmt: skip
            pub.publish("/tasks/start", events_pb2.TaskStart(container_id=cid, pid=101))
            exit_event = events_pb2.TaskExit(
                container_id=cid, id=cid, pid=101, exit_status=3, exited_at=exited
            )
            pub.publish(topic_of(exit_event), exit_event)
            lines = [out.wait_for(cid) for _ in range(3)]
    finally:
        pub.close()
    topics = [line.split()[5] for line in lines]  # date time +0000 UTC namespace topic json
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    assert all(line.split()[4] == "default" for line in lines)
    create, start, exit_ = (json.loads(line[line.index("{") :]) for line in lines)
    assert create["container_id"] == cid and create["pid"] == 101
    assert create["bundle"] == "/run/b/pub-order-1" and create["io"]["stdout"] == "/fifo/out"
    assert start == {"container_id": cid, "pid": 101}
    assert exit_["exit_status"] == 3 and exit_["id"] == cid
    assert exit_["exited_at"].startswith("2023-11-14T22:13:20")


def test_ctr_events_needs_the_bare_type_url(containerd: MiniContainerd) -> None:
    """Why pack_any drops protobuf's usual prefix: containerd 1.6 cannot resolve it."""
    pub = EventPublisher(str(containerd.ttrpc_address), "default")
    probe = lambda n: pub.publish("/tasks/oom", events_pb2.TaskOOM(container_id=f"probe-{n}"))  # noqa: E731
    try:
        with ctr_events(containerd, probe) as out:
            with Client(containerd.ttrpc_address) as c:
                stamp = timestamp_pb2.Timestamp()
                stamp.GetCurrentTime()
                envelope = ttrpc_events_pb2.Envelope(
                    timestamp=stamp, namespace="default", topic="/tasks/oom"
                )
                envelope.event.Pack(events_pb2.TaskOOM(container_id="prefixed"))
                c.call(
                    EVENTS_SERVICE,
                    "Forward",
                    ttrpc_events_pb2.ForwardRequest(envelope=envelope),
                    empty_pb2.Empty,
                )
            line = out.wait_for("type.googleapis.com/containerd.events.TaskOOM")
    finally:
        pub.close()
    assert "not found" in line
