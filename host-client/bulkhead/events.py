"""The agent's event stream from the host: ``Event`` and the ``EventStream`` iterator.

Events are numbered by the agent (1, 2, 3, ...). A stream started with ``since=N`` yields
every event after N once, in order; ``EventStream.last_seq`` is what to resume from after a
disconnection (for a stream of new events only, it starts at the newest event when the call
began, so even a stream that saw nothing resumes without a hole). The agent keeps the last
4096 events: asking for older ones fails with ``OutOfRange``, or with ``accept_gap=True``
yields one ``events_lost`` event (``lost_from``..``lost_to``) instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from bulkhead_proto.v1 import agent_pb2

from .details import ProcessExit
from .errors import Cancelled, Internal, Unavailable, Unknown, from_rpc_error

if TYPE_CHECKING:
    from .client import AgentClient
    from .sandbox import Sandbox

NEWEST_KEY = "bulkhead-events-newest"
METHOD = "bulkhead.v1.Telemetry/StreamEvents"


@dataclass(frozen=True)
class Event:
    """One event. ``kind`` is the lower-case name: ``container_started``, ``container_exited``,
    ``process_exited``, ``oom_kill``, ``device_added``, ``device_removed``,
    ``storage_mounted``, ``agent_restarted`` or ``events_lost``."""

    seq: int
    kind: str
    time_unix: float
    container_id: str = ""
    exec_id: str = ""
    pid: int = 0
    exit: ProcessExit | None = None
    oom_kills: int = 0
    device: str = ""
    mount_point: str = ""
    agent_restarts: int = 0
    lost_from: int = 0
    lost_to: int = 0
    details: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: agent_pb2.Event) -> Event:
        return cls(
            seq=msg.seq,
            kind=agent_pb2.Event.Kind.Name(msg.kind).lower(),
            time_unix=msg.time_unix,
            container_id=msg.container_id,
            exec_id=msg.exec_id,
            pid=msg.pid,
            exit=ProcessExit.from_proto(msg.exit) if msg.HasField("exit") else None,
            oom_kills=msg.oom_kills,
            device=msg.device,
            mount_point=msg.mount_point,
            agent_restarts=msg.agent_restarts,
            lost_from=msg.lost_from,
            lost_to=msg.lost_to,
            details=dict(msg.details),
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (and always seq, kind, time_unix), JSON-ready."""
        out: dict[str, Any] = {"seq": self.seq, "kind": self.kind, "time_unix": self.time_unix}
        for name in (
            "container_id",
            "exec_id",
            "pid",
            "oom_kills",
            "device",
            "mount_point",
            "agent_restarts",
            "lost_from",
            "lost_to",
            "details",
        ):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.exit is not None:
            out["exit"] = self.exit.to_dict()
        return out

    @property
    def process(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    def __str__(self) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.time_unix))
        what = {
            "container_started": lambda: f"{self.container_id} started (pid {self.pid})",
            "container_exited": lambda: f"{self.container_id} {self.exit}",
            "process_exited": lambda: f"{self.process} {self.exit}",
            "oom_kill": lambda: f"{self.container_id} OOM kill #{self.oom_kills}",
            "agent_restarted": lambda: f"agent restarted (restart #{self.agent_restarts})",
            "events_lost": lambda: f"events {self.lost_from}..{self.lost_to} were lost",
        }.get(self.kind, lambda: " ".join(f"{k}={v}" for k, v in self.to_dict().items()))()
        return f"{self.seq:>6}  {stamp}  {self.kind:<17} {what}"


class EventStream:
    """One StreamEvents call as an iterator of :class:`Event`; ``close()`` ends it."""

    def __init__(
        self,
        client: AgentClient,
        since: int | None,
        accept_gap: bool = False,
        timeout: float | None = None,
    ) -> None:
        request = agent_pb2.StreamEventsRequest(accept_gap=accept_gap)
        if since is not None:
            request.since = since
        self._call = client._telemetry.StreamEvents(request, timeout=timeout)
        self._last: int | None = since
        self._closed = False

    def _newest(self) -> int | None:
        """The call's ``bulkhead-events-newest`` (waits for the call's start); None if it
        ended without starting."""
        try:
            metadata = self._call.initial_metadata()
        except grpc.RpcError:
            return None
        value = dict(metadata or ()).get(NEWEST_KEY)
        return int(value) if value is not None else None

    @property
    def newest_at_start(self) -> int:
        """The newest event number when the call began (waits for the call's start)."""
        newest = self._newest()
        if newest is None:  # the call failed: say why
            raise from_rpc_error(self._call, METHOD)  # type: ignore[arg-type]
        return newest

    @property
    def position(self) -> int | None:
        """``last_seq`` if known already (never waits): None before the call started."""
        return self._last

    @property
    def last_seq(self) -> int:
        """The seq to resume from: the last event yielded, else where the stream began."""
        if self._last is None:
            self._last = self.newest_at_start
        return self._last

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._last is None:
            self._last = self._newest()  # before any event: resuming must not skip
        try:
            message = next(self._call)
        except grpc.RpcError as exc:
            if self._closed:
                raise StopIteration from None
            raise from_rpc_error(exc, METHOD) from exc
        event = Event.from_proto(message)
        self._last = event.seq
        return event

    def close(self) -> None:
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RECONNECT_DELAY = 0.5  # between attempts while the agent is away (it restarts in ~1 s)


def follow(
    sandbox: Sandbox, since: int | None, *, accept_gap: bool = False, reconnect: bool = True
) -> Iterator[Event]:
    """``Sandbox.events``: a stream that dials again from its last event when it breaks."""
    position = since
    while True:
        stream = sandbox.agent.events(position, accept_gap=accept_gap)
        try:
            yield from stream
        except (Unavailable, Cancelled, Unknown, Internal):  # the agent (or its VM) went away
            if not reconnect:
                raise
        finally:
            # What it got to, without waiting on a call that may be broken.
            position = stream.position if stream.position is not None else position
            stream.close()
        if not reconnect or not sandbox.alive:
            return
        time.sleep(RECONNECT_DELAY)
