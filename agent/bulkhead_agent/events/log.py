"""The agent's event log: numbered events, a bounded window of them, and followers.

Every event gets the next sequence number (1, 2, 3, ... with no holes). The log keeps the last
``window`` events (4096 by default) in memory and, when it has a journal file, on the run
directory's tmpfs too, so that an agent restarted by init goes on numbering where the old one
stopped and still serves what the old one recorded.

A follower names the last sequence number it saw and gets every later event once, in order
(:meth:`EventLog.follow`). When some of those are no longer kept (it came back too late, or
read too slowly while the window moved on) it is told so, never silently skipped: a
:class:`Gap` is raised, or with ``accept_gap`` one ``events_lost`` event stands in for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

WINDOW = 4096

CONTAINER_STARTED = "container_started"
CONTAINER_EXITED = "container_exited"
PROCESS_EXITED = "process_exited"
OOM_KILL = "oom_kill"
DEVICE_ADDED = "device_added"
DEVICE_REMOVED = "device_removed"
STORAGE_MOUNTED = "storage_mounted"
AGENT_RESTARTED = "agent_restarted"
EVENTS_LOST = "events_lost"  # made for one follower, never stored
KINDS = (
    CONTAINER_STARTED,
    CONTAINER_EXITED,
    PROCESS_EXITED,
    OOM_KILL,
    DEVICE_ADDED,
    DEVICE_REMOVED,
    STORAGE_MOUNTED,
    AGENT_RESTARTED,
    EVENTS_LOST,
)


class Event:
    """One event. Slots, not a dict per event: a full window is 4096 of them in every VM."""

    __slots__ = (
        "agent_restarts",
        "container_id",
        "details",
        "device",
        "exec_id",
        "exit",
        "kind",
        "lost_from",
        "lost_to",
        "mount_point",
        "oom_kills",
        "pid",
        "seq",
        "time_unix",
    )

    def __init__(
        self,
        seq: int,
        kind: str,
        time_unix: float,
        *,
        container_id: str = "",
        exec_id: str = "",
        pid: int = 0,
        exit: Mapping[str, Any] | None = None,  # ExitInfo fields (containers.process)
        oom_kills: int = 0,
        device: str = "",
        mount_point: str = "",
        agent_restarts: int = 0,
        lost_from: int = 0,
        lost_to: int = 0,
        details: Mapping[str, str] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        self.seq = seq
        self.kind = kind
        self.time_unix = time_unix
        self.container_id = container_id
        self.exec_id = exec_id
        self.pid = pid
        self.exit = exit
        self.oom_kills = oom_kills
        self.device = device
        self.mount_point = mount_point
        self.agent_restarts = agent_restarts
        self.lost_from = lost_from
        self.lost_to = lost_to
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (the journal's line, and what tests compare)."""
        out: dict[str, Any] = {"seq": self.seq, "kind": self.kind, "time_unix": self.time_unix}
        for name in self.__slots__:
            value = getattr(self, name)
            if name not in out and value:
                out[name] = dict(value) if isinstance(value, Mapping) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        fields = {k: v for k, v in data.items() if k not in ("seq", "kind", "time_unix")}
        return cls(int(data["seq"]), str(data["kind"]), float(data["time_unix"]), **fields)

    def __repr__(self) -> str:
        return f"Event({self.to_dict()!r})"


class Gap(Exception):
    """Events ``lost_from``..``lost_to`` are no longer kept; ``oldest`` is the first that is."""

    def __init__(self, lost_from: int, lost_to: int, oldest: int) -> None:
        self.lost_from = lost_from
        self.lost_to = lost_to
        self.oldest = oldest
        super().__init__(
            f"events {lost_from}..{lost_to} are no longer kept; the oldest kept is {oldest}"
        )


class Ahead(Exception):
    """A follower named a sequence number this log never issued (its journal was lost)."""

    def __init__(self, since: int, newest: int) -> None:
        self.since = since
        self.newest = newest
        super().__init__(
            f"since={since} is past the newest event {newest}: the agent's event log was reset"
        )


class Journal:
    """The window on disk (tmpfs): one JSON line per event, appended as it happens.

    The file is rewritten with just the window once it holds a quarter more lines than that,
    so it stays bounded. A line cut short by a crash is skipped on loading.
    """

    def __init__(self, path: str, window: int) -> None:
        self.path = path
        self._window = window
        self._lines = 0
        self._fd = -1

    def load(self) -> list[Event]:
        """The events of the file's last unbroken run of sequence numbers (at most a window)."""
        events: list[Event] = []
        try:
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        event = Event.from_dict(json.loads(raw))
                    except (ValueError, KeyError, TypeError):
                        continue
                    if events and event.seq != events[-1].seq + 1:
                        events.clear()  # a restart of the numbering: only what follows counts
                    events.append(event)
        except FileNotFoundError:
            pass
        return events[-self._window :]

    def open(self, events: Iterable[Event]) -> None:
        """Start the file over with ``events`` (atomically), then append to it."""
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            lines = [_line(e) for e in events]
            os.write(fd, b"".join(lines))
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lines = len(lines)

    def append(self, event: Event, window: Iterable[Event]) -> None:
        if self._fd < 0:
            return
        os.write(self._fd, _line(event))
        self._lines += 1
        if self._lines > self._window + self._window // 4:
            self.open(window)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(event: Event) -> bytes:
    return json.dumps(event.to_dict(), separators=(",", ":")).encode() + b"\n"


class EventLog:
    def __init__(
        self,
        window: int = WINDOW,
        journal: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.window = window
        self._events: deque[Event] = deque(maxlen=window)
        self._next = 1
        self._clock = clock
        self._on_error = on_error
        self._waiter: asyncio.Event | None = None  # set (and dropped) at each new event
        self.counts: Counter[str] = Counter()  # emitted by this process, by kind
        self.followers = 0
        self._journal: Journal | None = None
        if journal:
            self._open_journal(journal)

    def _open_journal(self, path: str) -> None:
        journal = Journal(path, self.window)
        try:
            kept = journal.load()
            journal.open(kept)
        except OSError as exc:
            self._error(f"events: no journal at {path} ({exc}); events start over after a restart")
            return
        self._events.extend(kept)
        if kept:
            self._next = kept[-1].seq + 1
        self._journal = journal

    def _error(self, message: str) -> None:
        if self._on_error is not None:
            self._on_error(message)

    @property
    def newest(self) -> int:
        """The last sequence number issued (0 before the first event)."""
        return self._next - 1

    @property
    def oldest(self) -> int:
        """The first sequence number still kept (``newest + 1`` when nothing is)."""
        return self._events[0].seq if self._events else self._next

    def emit(self, kind: str, **fields: Any) -> Event:
        """Record an event now; followers wake up."""
        if kind == EVENTS_LOST:
            raise ValueError("events_lost is made for a follower, not recorded")
        event = Event(self._next, kind, self._clock(), **fields)
        self._next += 1
        self._events.append(event)
        self.counts[kind] += 1
        if self._journal is not None:
            try:
                self._journal.append(event, self._events)
            except OSError as exc:  # a full tmpfs: keep going in memory, say so once
                self._journal.close()
                self._journal = None
                self._error(f"events: journal write failed ({exc}); kept in memory only")
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()
        return event

    def after(self, seq: int, limit: int | None = None) -> list[Event]:
        """The kept events with a sequence number above ``seq`` (at most ``limit``).

        :class:`Gap` if some of them are no longer kept; :class:`Ahead` if ``seq`` was
        never issued.
        """
        if seq > self.newest:
            raise Ahead(seq, self.newest)
        oldest = self.oldest
        if seq + 1 < oldest:
            raise Gap(seq + 1, oldest - 1, oldest)
        start = seq + 1 - oldest
        stop = None if limit is None else start + limit
        return list(itertools.islice(self._events, start, stop))

    async def wait_newer(self, seq: int) -> None:
        """Return once an event above ``seq`` exists."""
        while self.newest <= seq:
            if self._waiter is None:
                self._waiter = asyncio.Event()
            await self._waiter.wait()

    async def follow(
        self, since: int | None, *, accept_gap: bool = False, batch: int = 256
    ) -> AsyncIterator[Event]:
        """Every event after ``since`` (``None``: after the newest now), as they come, forever.

        Raises :class:`Ahead` at once for a ``since`` never issued, and :class:`Gap` when
        events it should yield are gone, then or later (a follower slower than the window);
        with ``accept_gap`` an ``events_lost`` event (its seq is the last lost one) is yielded
        instead and following goes on.
        """
        position = self.newest if since is None else since
        if position > self.newest:
            raise Ahead(position, self.newest)
        self.followers += 1
        try:
            while True:
                try:
                    events = self.after(position, batch)
                except Gap as gap:
                    if not accept_gap:
                        raise
                    yield Event(
                        gap.lost_to,
                        EVENTS_LOST,
                        self._clock(),
                        lost_from=gap.lost_from,
                        lost_to=gap.lost_to,
                    )
                    position = gap.lost_to
                    continue
                if not events:
                    await self.wait_newer(position)
                    continue
                for event in events:
                    yield event
                    position = event.seq
        finally:
            self.followers -= 1

    def close(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()
            self._journal = None
