"""What the container manager reports to the rest of the agent, and the events made from it.

The manager calls its ``observer`` at a few points (:class:`ContainerObserver`, which does
nothing, is the default); :class:`ContainerEvents` turns those calls into events and also
keeps the started containers at hand for the metrics (their stdio byte counts).

OOM kills: a container's ``memory.events`` is watched from its start (``events.oom``), and
its ``oom_kill`` count is compared with the last one reported whenever the file changes,
whenever one of its processes exits (before that exit's event, so that the kill comes first)
and when it is removed. One event per kill, however it was noticed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import log as events
from .log import EventLog
from .oom import MEMORY_EVENTS, OomWatcher, oom_kills

if TYPE_CHECKING:
    from ..containers.manager import Container
    from ..containers.process import ProcessRecord


class ContainerObserver:
    """The manager's hooks; this one ignores them."""

    def started(self, container: Container) -> None:
        """Its own process was let run."""

    def exited(self, container: Container, record: ProcessRecord) -> None:
        """One of its processes (``record``, whose ``exit`` is set) ended or failed to start."""

    def removed(self, container: Container) -> None:
        """Its processes are gone and it is about to be unmounted and forgotten."""

    def adopted(self, container: Container) -> None:
        """A restarted agent took it over, running (its start was reported before)."""


class ContainerEvents(ContainerObserver):
    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.containers: dict[str, Container] = {}  # started and not yet removed
        self._oom_reported: dict[str, int] = {}
        self._exits_in_log: set[tuple[str, str, int]] | None = None  # for adopted()
        self.oom = OomWatcher(self._check_oom)

    def started(self, container: Container) -> None:
        if container.id in self.containers:
            return
        self._track(container)
        init = container.init
        self.log.emit(
            events.CONTAINER_STARTED, container_id=container.id, pid=init.pid if init else 0
        )

    def adopted(self, container: Container) -> None:
        # Its start was reported by the agent that started it. Exits that agent did not get
        # to report (they happened while no agent ran) are reported now: any exit of it that
        # the log does not hold. OOM kills from before now are not reported (the count
        # is the baseline), nor, alas, those while no agent was there.
        if container.id not in self.containers:
            self._track(container)
        if self._exits_in_log is None:
            self._exits_in_log = {
                (e.container_id, e.exec_id, e.pid)
                for e in self.log.after(self.log.oldest - 1)
                if e.kind in (events.CONTAINER_EXITED, events.PROCESS_EXITED)
            }
        for record in container.records():
            info = record.exit
            if info is not None and (container.id, record.exec_id, info.pid) not in (
                self._exits_in_log
            ):
                self.exited(container, record)

    def _track(self, container: Container) -> None:
        self.containers[container.id] = container
        if container.cgroup is not None:
            path = os.path.join(container.cgroup.path, MEMORY_EVENTS)
            self._oom_reported[container.id] = oom_kills(path) or 0
            self.oom.watch(container.id, path)

    def exited(self, container: Container, record: ProcessRecord) -> None:
        info = record.exit
        if info is None:
            return
        is_init = record is container.init
        if is_init and info.kind != "start_failed":
            # The exit can be read before the reply to "start" is: started comes first anyway.
            self.started(container)
        self._check_oom(container.id)
        self.log.emit(
            events.CONTAINER_EXITED if is_init else events.PROCESS_EXITED,
            container_id=container.id,
            exec_id=record.exec_id,
            pid=info.pid,
            exit=info._asdict(),
        )

    def removed(self, container: Container) -> None:
        self._check_oom(container.id)
        self.oom.unwatch(container.id)
        self._oom_reported.pop(container.id, None)
        self.containers.pop(container.id, None)

    def _check_oom(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        if container is None or container.cgroup is None:
            return
        count = oom_kills(os.path.join(container.cgroup.path, MEMORY_EVENTS))
        reported = self._oom_reported.get(container_id, 0)
        if count is None or count <= reported:
            return
        for n in range(reported + 1, count + 1):
            self.log.emit(events.OOM_KILL, container_id=container_id, oom_kills=n)
        self._oom_reported[container_id] = count

    def close(self) -> None:
        self.oom.close()
