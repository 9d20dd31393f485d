"""The gRPC server on the agent's private unix socket.

grpcio can only serve sockets it binds itself (no vsock, no connected fds), so
this is the one place gRPC lives; every transport is relayed to this socket.
"""

from __future__ import annotations

import contextlib
import os
import stat

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bulkhead_agent.containers.manager import Manager
from bulkhead_agent.services.agent import AgentService
from bulkhead_agent.services.network import NetworkService, create_files
from bulkhead_agent.services.storage import StorageService
from bulkhead_agent.services.telemetry import Telemetry, TelemetryService
from bulkhead_agent.state import AgentState
from bulkhead_agent.storage.events import StorageEvents
from bulkhead_agent.storage.manager import StorageManager
from bulkhead_init.log import Logger
from bulkhead_proto.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
TELEMETRY_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["Telemetry"].full_name
STORAGE_SERVICE = storage_pb2.DESCRIPTOR.services_by_name["Storage"].full_name
NETWORK_SERVICE = network_pb2.DESCRIPTOR.services_by_name["Network"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_OPTIONS = [
    # Room for AddEntropy's 1 MiB plus framing; the default 4 MiB also covers it,
    # but say it so a future lower default cannot break the API.
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # One local socket, relayed: port sharing would only hide a second agent.
    ("grpc.so_reuseport", 0),
    # The host client pings during open calls to notice a channel gone silent. By
    # default gRPC answers pings more often than every 5 minutes on a call with no
    # data (a quiet process's stdio) with GOAWAY, which would cut that stream off.
    # The only peer is the host, which owns the channel: bear its pings at any rate.
    ("grpc.http2.max_ping_strikes", 0),
]


def prepare_run_dir(run_dir: str, socket_path: str) -> None:
    """Create the run dir and remove a socket left by a previous agent.

    0711: search-only for others, so that a user-namespaced container's root (an
    unprivileged id here) can reach its rootfs below; the socket itself is 0600.
    """
    os.makedirs(run_dir, mode=0o711, exist_ok=True)
    os.chmod(run_dir, 0o711)  # also when it existed with looser bits
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{socket_path} exists and is not a socket")
    # init restarts the agent after it died, so a socket here is stale.
    os.unlink(socket_path)


class AgentServer:
    def __init__(
        self,
        state: AgentState,
        log: Logger,
        containers: Manager,
        storages: StorageManager | None = None,
    ) -> None:
        self.socket_path = state.settings.socket_path
        self._log = log
        # Metrics and events (services.telemetry); its interceptor counts every RPC.
        self.telemetry = Telemetry(state, log, containers)
        self._server = grpc.aio.server(options=_OPTIONS, interceptors=[self.telemetry.interceptor])
        self._health = health.aio.HealthServicer()
        agent_pb2_grpc.add_AgentServicer_to_server(
            AgentService(state, log, containers, storages), self._server
        )
        if storages is not None:
            storage_pb2_grpc.add_StorageServicer_to_server(StorageService(storages), self._server)
            storages.observer = StorageEvents(self.telemetry.events)
        agent_pb2_grpc.add_TelemetryServicer_to_server(
            TelemetryService(self.telemetry), self._server
        )
        # The sandbox's network (services.network): pyroute2 comes with its first request.
        self.network_files = create_files(state.settings.run_dir, log)
        network_pb2_grpc.add_NetworkServicer_to_server(
            NetworkService(self.network_files, log), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (
                AGENT_SERVICE,
                TELEMETRY_SERVICE,
                STORAGE_SERVICE,
                NETWORK_SERVICE,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )

    async def start(self) -> None:
        # HealthServicer starts with "" SERVING; nothing is ready yet.
        for service in ("", AGENT_SERVICE):
            await self._health.set(service, _NOT_SERVING)
        prepare_run_dir(os.path.dirname(self.socket_path), self.socket_path)
        # grpc binds inside add_insecure_port; a 0177 umask means the socket is
        # never reachable by others, even before the chmod below.
        old = os.umask(0o177)
        try:
            self._server.add_insecure_port("unix:" + self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        await self._server.start()

    async def set_serving(self) -> None:
        for service in ("", AGENT_SERVICE):
            await self._health.set(service, _SERVING)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING, let in-flight calls finish for ``grace`` seconds, remove the socket."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
