"""Task events from the shim to containerd, in order, surviving a containerd restart.

A runtime v2 shim reports what happens to its tasks (create, start, exit ...) by calling
``containerd.services.events.ttrpc.v1.Events/Forward`` on containerd's ttrpc socket (the
``TTRPC_ADDRESS`` containerd gives the shim). containerd acts on some of these (an exit
event ends a ``ctr run``, and CRI tracks containers by them), so an event must arrive, and
must arrive after the ones published before it: one thread sends them in order, and holds
an event, retrying, while containerd is unreachable.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TypeVar

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from bulkhead_shim.api import events_pb2, ttrpc_events_pb2
from bulkhead_shim.ttrpc import Client, Code, TtrpcError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
# containerd's namespaces package reads a ttrpc caller's namespace from this metadata key;
# Forward itself uses the envelope's, but containerd's own shims send both.
NAMESPACE_KEY = "containerd-namespace-ttrpc"

_TOPICS = {
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
_TOPIC_BY_NAME = {cls.DESCRIPTOR.full_name: topic for cls, topic in _TOPICS.items()}

# Worth another try: containerd is down or restarting (UNAVAILABLE), or slow (a deadline
# may also mean it got the event; containerd's own shims retry then as well).
_RETRYABLE = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)


def topic_of(event: Message) -> str:
    """The topic containerd files a task event under, e.g. TaskExit -> "/tasks/exit"."""
    try:
        return _TOPIC_BY_NAME[event.DESCRIPTOR.full_name]
    except KeyError:
        raise ValueError(f"no task topic for {event.DESCRIPTOR.full_name}") from None


def pack_any(message: Message) -> any_pb2.Any:
    """An Any as containerd's typeurl writes and reads it.

    typeurl looks the type up by the bare full message name ("containerd.events.TaskExit");
    protobuf's own Any.Pack adds "type.googleapis.com/", which containerd 1.x cannot
    resolve (`ctr events` then says "type with url ... not found"). Read such an Any back
    with unpack_any: protobuf's Any.Unpack refuses a type URL without a "/".
    """
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def unpack_any(packed: any_pb2.Any, message_type: type[M]) -> M | None:
    """The message in an Any if it is of message_type, else None.

    Accepts the bare name containerd writes ("containerd.runc.v1.Options" in
    CreateTaskRequest.options) as well as "host/name" URLs. JSON-encoded types from
    containerd's typeurl registry ("types.containerd.io/opencontainers/runtime-spec/1/
    Process" in ExecProcessRequest.spec) are not protobuf: read their value as JSON.
    """
    if packed.type_url.rpartition("/")[2] != message_type.DESCRIPTOR.full_name:
        return None
    return message_type.FromString(packed.value)


class EventPublisher:
    """Queue task events and forward them to containerd from one background thread.

    ttrpc_address: containerd's ttrpc socket, a path or "unix://path".
    timeout: the deadline of one Forward call, and of connecting.
    retry_for: how long one event is retried while containerd is unreachable before it is
    given up (and logged as lost).
    """

    def __init__(
        self,
        ttrpc_address: str,
        namespace: str,
        *,
        timeout: float = 5.0,
        retry_for: float = 60.0,
    ) -> None:
        self.address = ttrpc_address.removeprefix("unix://")
        self.namespace = namespace
        self.timeout = timeout
        self.retry_for = retry_for
        self._cond = threading.Condition()
        self._queue: collections.deque[ttrpc_events_pb2.Envelope] = collections.deque()
        self._busy = False  # an event taken off the queue is being sent
        self._closing = False
        self._give_up_at: float | None = None  # close()'s deadline for the flush
        self._client: Client | None = None
        self._thread = threading.Thread(target=self._run, name="event-publisher", daemon=True)
        self._thread.start()

    def publish(self, topic: str, event: Message) -> None:
        """Queue an event; never blocks. The envelope is stamped now, not when sent."""
        stamp = timestamp_pb2.Timestamp()
        stamp.GetCurrentTime()
        envelope = ttrpc_events_pb2.Envelope(
            timestamp=stamp, namespace=self.namespace, topic=topic, event=pack_any(event)
        )
        with self._cond:
            if self._closing:
                log.error("event %s published after close, not sent: %s", topic, _brief(event))
                return
            self._queue.append(envelope)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event published so far was sent (or given up); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, for at most timeout seconds, then stop. Events still unsent
        then are logged as lost."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._give_up_at = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + self.timeout + 1.0)

    # --- the sending thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return  # closing, all sent
                    envelope = self._queue[0]
                    self._busy = True
                try:
                    self._send(envelope)
                except Exception:  # a bug here must not stop all later events
                    log.exception("event %s lost: publisher error", envelope.topic)
                    self._drop_client()
                finally:
                    with self._cond:
                        self._queue.popleft()
                        self._busy = False
                        self._cond.notify_all()
        finally:
            self._drop_client()
            with self._cond:
                lost, self._queue = list(self._queue), collections.deque()
                self._cond.notify_all()
            for envelope in lost:
                log.error("event %s not sent before close: lost", envelope.topic)

    def _send(self, envelope: ttrpc_events_pb2.Envelope) -> None:
        request = ttrpc_events_pb2.ForwardRequest(envelope=envelope)
        give_up = time.monotonic() + self.retry_for
        backoff = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                client = self._connect()
                client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    request,
                    empty_pb2.Empty,
                    timeout=self.timeout,
                    metadata={NAMESPACE_KEY: self.namespace},
                )
                if attempt > 1:
                    log.info("event %s sent after %d attempts", envelope.topic, attempt)
                return
            except TtrpcError as e:
                if e.code not in _RETRYABLE:
                    log.error("containerd refused event %s: %s", envelope.topic, e)
                    return
                self._drop_client()
                now = time.monotonic()
                stop = min(give_up, self._close_deadline())
                if now + backoff > stop:
                    log.error("event %s lost after %d attempts: %s", envelope.topic, attempt, e)
                    return
                if attempt == 1:
                    log.warning("cannot send event %s (%s); retrying", envelope.topic, e)
            with self._cond:
                # close() notifies: the loop then re-checks its (maybe nearer) deadline.
                self._cond.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _close_deadline(self) -> float:
        with self._cond:
            return self._give_up_at if self._give_up_at is not None else float("inf")

    def _connect(self) -> Client:
        if self._client is None or self._client.closed:
            self._drop_client()
            self._client = Client(self.address, timeout=self.timeout)
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _brief(event: Message) -> str:
    return f"{event.DESCRIPTOR.name}{{{str(event).strip().replace(chr(10), ', ')}}}"
