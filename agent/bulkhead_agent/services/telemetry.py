"""The ``bulkhead.v1.Telemetry`` servicer: GetMetrics and StreamEvents, and their wiring.

:class:`Telemetry` is made with the gRPC server: the event log (journaled in the run
directory, so numbering survives an agent restart), the container manager's observer that
feeds it, and the RPC interceptor's tallies. Metrics cost nothing until the first GetMetrics,
which imports prometheus_client and builds the registry (the time it took is itself a metric,
``bulkhead_agent_metrics_setup_seconds``); every scrape after that reads the figures afresh.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

import grpc

from bulkhead_agent import __version__
from bulkhead_agent.containers.process import ExitInfo
from bulkhead_agent.events import log as events
from bulkhead_agent.events.containers import ContainerEvents
from bulkhead_agent.events.log import Ahead, Event, EventLog, Gap
from bulkhead_agent.metrics import procfs
from bulkhead_agent.metrics.rpc import RpcInterceptor, RpcStats
from bulkhead_agent.services.attach import exit_message
from bulkhead_agent.services.guest_facts import env_count
from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    from bulkhead_agent.containers.manager import Manager
    from bulkhead_agent.metrics.collectors import Exposition, Stdio
    from bulkhead_agent.state import AgentState
    from bulkhead_init.log import Logger

pb = agent_pb2
JOURNAL = "events.jsonl"  # in the run directory (tmpfs in the guest)
NEWEST_KEY = "bulkhead-events-newest"  # initial metadata of StreamEvents


class Telemetry:
    def __init__(self, state: AgentState, log: Logger, containers: Manager) -> None:
        settings = state.settings
        self.state = state
        self.log = log
        self.containers = containers
        try:
            os.makedirs(settings.run_dir, 0o711, exist_ok=True)
        except OSError:
            pass  # the journal says why it cannot open
        self.events = EventLog(
            journal=os.path.join(settings.run_dir, JOURNAL), on_error=log.warning
        )
        self.observer = ContainerEvents(self.events)
        containers.observer = self.observer
        for info in containers.list():  # adopted from an agent before us (made before this)
            self.observer.adopted(containers.container(info.container_id))
        self.rpc = RpcStats()
        self.interceptor = RpcInterceptor(self.rpc)
        self.restarts = env_count(os.environ, "BULKHEAD_AGENT_RESTARTS")
        self.cgroup_containers = os.path.join(settings.cgroup_dir, "containers")
        self._exposition: Exposition | None = None
        self.setup_seconds = 0.0
        if self.restarts:
            self.events.emit(events.AGENT_RESTARTED, agent_restarts=self.restarts)

    # --- metrics ---------------------------------------------------------------------------

    def exposition(self) -> Exposition:
        if self._exposition is None:
            started = time.perf_counter()
            self._exposition = self._build()
            self.setup_seconds = time.perf_counter() - started
            self.log.info(f"metrics: registry ready in {self.setup_seconds * 1000:.0f} ms")
        return self._exposition

    def _build(self) -> Exposition:
        from bulkhead_agent.metrics import collectors as c

        labels = c.Labels()
        return c.Exposition(
            labels,
            [
                c.GuestCollector(labels),
                c.ProcessCollector(
                    labels,
                    self._pids,
                    restarts=self.restarts,
                    version=__version__,
                    setup_seconds=lambda: self.setup_seconds,
                ),
                c.ContainerCollector(
                    labels,
                    self.cgroup_containers,
                    statuses=lambda: [i.status for i in self.containers.list()],
                    stdio=self._stdio,
                ),
                c.RpcCollector(labels, self.rpc),
                c.EventCollector(labels, self.events),
            ],
        )

    def _pids(self) -> dict[str, int]:
        me = os.getpid()
        pids = {"init": self.state.settings.init_pid, "agent": me}
        spawner = procfs.children(me)  # the agent forks nothing else
        if spawner:
            pids["spawner"] = spawner[0]
        return pids

    def _stdio(self) -> dict[str, Stdio]:
        from bulkhead_agent.metrics.collectors import Stdio

        out = {}
        for container_id, container in self.observer.containers.items():
            stdin = stdout = stderr = 0
            for record in container.records():
                stdio = record.stdio
                stdin += stdio.stdin.written
                stdout += stdio.stdout.end
                stderr += stdio.stderr.end
            out[container_id] = Stdio(stdin, stdout, stderr)
        return out

    def close(self) -> None:
        self.observer.close()
        self.events.close()


class TelemetryService(agent_pb2_grpc.TelemetryServicer):
    def __init__(self, telemetry: Telemetry) -> None:
        self._t = telemetry

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        # Synchronous on the loop: reading /proc and cgroup files is quick (see bench/metrics.py)
        # and a thread per scrape would cost more than it saves.
        text = self._t.exposition().render(request.sandbox or os.uname().nodename)
        return pb.GetMetricsResponse(text=text)

    async def StreamEvents(
        self, request: pb.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        log = self._t.events
        since = request.since if request.HasField("since") else None
        await context.send_initial_metadata(((NEWEST_KEY, str(log.newest)),))
        try:
            # aclosing: a follower that goes away stops counting at once, not when collected.
            async with contextlib.aclosing(log.follow(since, accept_gap=request.accept_gap)) as it:
                async for event in it:
                    await context.write(to_proto(event))
        except (Gap, Ahead) as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))


_KINDS = {kind: pb.Event.Kind.Value(kind.upper()) for kind in events.KINDS}


def to_proto(event: Event) -> pb.Event:
    message = pb.Event(
        seq=event.seq,
        time_unix=event.time_unix,
        kind=_KINDS[event.kind],
        container_id=event.container_id,
        exec_id=event.exec_id,
        pid=event.pid,
        oom_kills=event.oom_kills,
        device=event.device,
        mount_point=event.mount_point,
        agent_restarts=event.agent_restarts,
        lost_from=event.lost_from,
        lost_to=event.lost_to,
        details=event.details or {},
    )
    if event.exit:
        message.exit.CopyFrom(exit_message(ExitInfo(**event.exit)))
    return message
