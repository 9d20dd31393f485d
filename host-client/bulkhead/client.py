"""``AgentClient``: the guest agent's API as typed Python calls.

Every method takes an optional ``timeout`` (seconds; the client's default
otherwise) and raises an ``AgentError`` subclass named after the gRPC status
(``InvalidArgument``, ``Unavailable``, ...) carrying the server's message.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc, storage_pb2

from .details import ContainerInfo, ContainerStats, GuestDetails, ProcessExit, ProcessInfo
from .errors import AgentError, DeadlineExceeded, ProcessTimeout, from_rpc_error

if TYPE_CHECKING:
    from .events import EventStream
    from .process import Attachment

_T = TypeVar("_T")

# Without these, a channel that failed once (the sandbox still booting) backs
# off for up to two minutes before it dials again. The minimum is also gRPC's
# connect timeout (until the server's SETTINGS frame): a handshake through the
# relay and a vsock or serial channel to an emulated guest takes far more than
# the retry interval when many connect at once, so it keeps gRPC's 20 s.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 20000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Each client gets its own connection (and so its own agent session)
    # instead of sharing one with every channel to the same target.
    ("grpc.use_local_subchannel_pool", 1),
    # No transparent retries. A server-streaming call started as the agent stops
    # (its GOAWAY, then the socket gone) was retried by gRPC core dozens of times
    # on the dying connection and then never completed at the surface: the
    # caller's next() waited forever (grpcio 1.85, about 1 in 10 restarts under
    # load). Without them it fails with UNAVAILABLE, which is what
    # Sandbox.events() and reattaching already handle by dialling again; a retry
    # would have gone to a socket with no agent behind it anyway.
    ("grpc.enable_retries", 0),
]

# While a call is open, the channel pings the agent every KEEPALIVE seconds and gives
# the connection up when a ping is not answered within as long again. Unary calls
# have deadlines; a stream (a process's stdio, the event feed) has none, so without
# pings a channel that went silent (a guest that hangs, a vsock ring that broke)
# would keep a reader waiting for ever. With them the stream fails with UNAVAILABLE
# within 2 x KEEPALIVE and the caller can reattach. The agent accepts pings at any
# rate (its server options), so a long silent stream is not cut off for pinging.
KEEPALIVE = 30.0


def _channel_options(keepalive: float) -> list[tuple[str, int]]:
    ms = max(1, round(keepalive * 1000))
    return [
        *_CHANNEL_OPTIONS,
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        # grpcio 1.85 waits for a ping's answer this long, not the keepalive timeout
        # (60 s by default), before it gives the connection up.
        ("grpc.http2.ping_timeout_ms", ms),
        # Ping a stream that sends nothing either way (a quiet process): that is the case.
        ("grpc.http2.max_pings_without_data", 0),
    ]


_GRPC_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


def grpc_target(target: str | os.PathLike[str]) -> str:
    """A gRPC target string for a socket path, ``unix:...``, ``host:port`` or ``tcp://host:port``."""
    if isinstance(target, os.PathLike):
        return f"unix:{Path(target).absolute()}"
    if target.startswith(_GRPC_SCHEMES):
        return target
    if target.startswith("tcp://"):
        return target.removeprefix("tcp://")
    if target.startswith(("/", ".")) or ":" not in target:
        return f"unix:{Path(target).absolute()}"
    return target


class AgentClient:
    """A connection to one guest agent.

    ``target`` is the sandbox's ``agent.sock`` (a path), or any gRPC target
    string (``unix:/path``, ``host:port`` for an agent's development TCP port).
    The channel connects lazily and reconnects by itself; ``close()`` it (or use
    ``with``) when done. ``keepalive`` is how often an open call pings the agent (and
    how long a ping may go unanswered before the call fails with ``Unavailable``).
    """

    def __init__(
        self, target: str | os.PathLike[str], timeout: float = 10.0, *, keepalive: float = KEEPALIVE
    ) -> None:
        self.target = grpc_target(target)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target, options=_channel_options(keepalive))
        self._agent = agent_pb2_grpc.AgentStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._telemetry = agent_pb2_grpc.TelemetryStub(self._channel)

    def __repr__(self) -> str:
        return f"AgentClient({self.target!r})"

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel(self) -> grpc.Channel:
        """The underlying gRPC channel, for services this class does not wrap."""
        return self._channel

    def close(self) -> None:
        self._channel.close()

    # -- health --

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health status name: ``"SERVING"``, ``"NOT_SERVING"``, ``"SERVICE_UNKNOWN"``..."""
        reply = self._call(
            "grpc.health.v1.Health/Check",
            self._health.Check,
            health_pb2.HealthCheckRequest(service=service),
            timeout,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 60.0, *, service: str = "") -> None:
        """Poll health until it is SERVING; ``DeadlineExceeded`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"the agent at {self.target} was not ready within {timeout:g}s (last: {last})",
                    method="wait_ready",
                )
            try:
                status = self.health(service, timeout=min(remaining, self.timeout))
            except AgentError as exc:
                last = str(exc)
            else:
                if status == "SERVING":
                    return
                last = f"health is {status}"
            # The channel reports a failed dial at once; pause briefly before
            # asking again rather than spinning.
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    # -- bulkhead.v1.Agent --

    def guest_details(self, *, timeout: float | None = None) -> GuestDetails:
        """Facts about the guest and the agent, with the boot timeline."""
        reply = self._call(
            "GetGuestDetails",
            self._agent.GetGuestDetails,
            agent_pb2.GetGuestDetailsRequest(),
            timeout,
        )
        return GuestDetails.from_proto(reply)

    def set_guest_time(self, unix_nanos: int | None = None, *, timeout: float | None = None) -> int:
        """Set the guest's clock (default: the host's now); returns the guest's previous time."""
        if unix_nanos is None:
            unix_nanos = time.time_ns()
        reply = self._call(
            "SetGuestTime",
            self._agent.SetGuestTime,
            agent_pb2.SetGuestTimeRequest(unix_nanos=unix_nanos),
            timeout,
        )
        return reply.previous_unix_nanos

    def add_entropy(
        self, data: bytes, credit: bool = False, *, timeout: float | None = None
    ) -> None:
        """Mix ``data`` into the guest's entropy pool; ``credit`` also counts it as entropy."""
        self._call(
            "AddEntropy",
            self._agent.AddEntropy,
            agent_pb2.AddEntropyRequest(data=bytes(data), credit=credit),
            timeout,
        )

    def shutdown(self, reboot: bool = False, *, timeout: float | None = None) -> None:
        """Ask the guest to power off (or reboot); returns once the agent has accepted."""
        self._call(
            "Shutdown",
            self._agent.Shutdown,
            agent_pb2.ShutdownRequest(reboot=reboot),
            timeout,
        )

    # -- containers --

    def create_container(
        self,
        container_id: str,
        spec: dict[str, Any] | bytes,
        bundle_dir: str = "",
        *,
        rootfs_storage: str = "",
        storages: Sequence[storage_pb2.StorageSpec] = (),
        timeout: float | None = None,
    ) -> int:
        """Create a container from an OCI runtime spec; its process is held until started.

        ``spec`` is a ``config.json`` as a dict or as bytes (see ``bulkhead.spec``).
        ``bundle_dir`` is the guest directory a relative ``root.path`` is resolved
        in; ``""`` means the image's default busybox root filesystem. Returns
        the held process's guest pid. ``rootfs_storage`` (``"ID[/sub]"``) takes the
        root from a storage instead; ``storages`` (``bulkhead.storage.storage_spec``)
        are added for this container and removed with it (see ``bulkhead.storage``).
        """
        reply = self._call(
            "CreateContainer",
            self._agent.CreateContainer,
            agent_pb2.CreateContainerRequest(
                container_id=container_id,
                oci_spec=_json(spec),
                bundle_dir=bundle_dir,
                rootfs_storage=rootfs_storage,
                storages=list(storages),
            ),
            timeout,
        )
        return reply.pid

    def start_container(self, container_id: str, *, timeout: float | None = None) -> None:
        """Let a created container's process run its command."""
        self._call(
            "StartContainer",
            self._agent.StartContainer,
            agent_pb2.StartContainerRequest(container_id=container_id),
            timeout,
        )

    def exec_process(
        self,
        container_id: str,
        exec_id: str,
        process: dict[str, Any] | bytes,
        *,
        timeout: float | None = None,
    ) -> int:
        """Start a new process in a running container; returns its guest pid.

        ``process`` is an OCI ``process`` object; fields left out are the
        container's (see ``bulkhead.spec.make_exec_process``).
        """
        reply = self._call(
            "ExecProcess",
            self._agent.ExecProcess,
            agent_pb2.ExecProcessRequest(
                container_id=container_id, exec_id=exec_id, process=_json(process)
            ),
            timeout,
        )
        return reply.pid

    def signal_process(
        self,
        container_id: str,
        exec_id: str = "",
        signal: int = 15,
        all: bool = False,
        *,
        timeout: float | None = None,
    ) -> None:
        """Send ``signal`` to one process, or with ``all`` to every process of the container."""
        self._call(
            "SignalProcess",
            self._agent.SignalProcess,
            agent_pb2.SignalProcessRequest(
                container_id=container_id, exec_id=exec_id, signal=int(signal), all=all
            ),
            timeout,
        )

    def wait_process(
        self, container_id: str, exec_id: str = "", timeout: float | None = None
    ) -> ProcessExit:
        """Block until the process has exited and all its output is out; how it ended.

        ``timeout=None`` waits as long as it takes; otherwise ``ProcessTimeout``
        after ``timeout`` seconds (the process keeps running).
        """
        try:
            reply = self._call(
                "WaitProcess",
                self._agent.WaitProcess,
                agent_pb2.WaitProcessRequest(container_id=container_id, exec_id=exec_id),
                math.inf if timeout is None else timeout,
            )
        except DeadlineExceeded as exc:
            what = f"{container_id}/{exec_id}" if exec_id else container_id
            raise ProcessTimeout(f"{what} did not exit within {timeout:g}s") from exc
        return ProcessExit.from_proto(reply)

    def remove_container(
        self, container_id: str, timeout: float = 10, *, rpc_timeout: float | None = None
    ) -> None:
        """Kill every process (SIGTERM, SIGKILL after ``timeout`` s; 0: SIGKILL at once), unmount
        and remove the cgroup. The call itself may take ``timeout`` plus the client's default."""
        self._call(
            "RemoveContainer",
            self._agent.RemoveContainer,
            agent_pb2.RemoveContainerRequest(
                container_id=container_id, timeout_ms=max(0, round(timeout * 1000))
            ),
            rpc_timeout if rpc_timeout is not None else timeout + self.timeout,
        )

    def pause_container(self, container_id: str, *, timeout: float | None = None) -> None:
        """Freeze every process of the container (cgroup.freeze)."""
        self._call(
            "PauseContainer",
            self._agent.PauseContainer,
            agent_pb2.PauseContainerRequest(container_id=container_id),
            timeout,
        )

    def resume_container(self, container_id: str, *, timeout: float | None = None) -> None:
        """Thaw a paused container."""
        self._call(
            "ResumeContainer",
            self._agent.ResumeContainer,
            agent_pb2.ResumeContainerRequest(container_id=container_id),
            timeout,
        )

    def update_container(
        self,
        container_id: str,
        resources: dict[str, Any] | bytes,
        *,
        timeout: float | None = None,
    ) -> None:
        """Change a container's limits; ``resources`` is an OCI ``linux.resources`` object."""
        self._call(
            "UpdateContainer",
            self._agent.UpdateContainer,
            agent_pb2.UpdateContainerRequest(container_id=container_id, resources=_json(resources)),
            timeout,
        )

    def container_stats(self, container_id: str, *, timeout: float | None = None) -> ContainerStats:
        """CPU, memory, pids and io use of a container, from its cgroup."""
        reply = self._call(
            "GetContainerStats",
            self._agent.GetContainerStats,
            agent_pb2.ContainerStatsRequest(container_id=container_id),
            timeout,
        )
        return ContainerStats.from_proto(reply)

    def list_containers(self, *, timeout: float | None = None) -> list[ContainerInfo]:
        """Every container the agent knows, in any status."""
        reply = self._call(
            "ListContainers",
            self._agent.ListContainers,
            agent_pb2.ListContainersRequest(),
            timeout,
        )
        return [ContainerInfo.from_proto(c) for c in reply.containers]

    def list_processes(
        self, container_id: str, *, timeout: float | None = None
    ) -> list[ProcessInfo]:
        """The processes in a container's cgroup, with guest pids."""
        reply = self._call(
            "ListProcesses",
            self._agent.ListProcesses,
            agent_pb2.ListProcessesRequest(container_id=container_id),
            timeout,
        )
        return [ProcessInfo.from_proto(p) for p in reply.processes]

    def resize_terminal(
        self,
        container_id: str,
        exec_id: str,
        rows: int,
        cols: int,
        *,
        timeout: float | None = None,
    ) -> None:
        """Set the window size of a process's terminal (its shell gets SIGWINCH)."""
        self._call(
            "ResizeTerminal",
            self._agent.ResizeTerminal,
            agent_pb2.ResizeTerminalRequest(
                container_id=container_id, exec_id=exec_id, rows=rows, cols=cols
            ),
            timeout,
        )

    def attach(
        self,
        container_id: str,
        exec_id: str = "",
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        **options: Any,
    ) -> Attachment:
        """Open the stdio stream of a process: its output in order, then its exit.

        Returns a connected ``bulkhead.process.Attachment``; the offsets resume
        a stream another attachment left off. ``options`` go to ``Attachment``
        (``ack_bytes``, ``ack_interval``).
        """
        from .process import Attachment

        attachment = Attachment(
            self,
            container_id,
            exec_id,
            stdout_offset=stdout_offset,
            stderr_offset=stderr_offset,
            **options,
        )
        attachment.connect()
        return attachment

    def _open_attach(self, requests: Iterator[agent_pb2.AttachRequest]) -> Any:
        """The raw bidirectional Attach call (no deadline: it lasts as long as the process)."""
        return self._agent.Attach(requests)

    # -- telemetry --

    def metrics(self, sandbox: str = "", *, timeout: float | None = None) -> str:
        """The guest's Prometheus text exposition; every series labelled ``sandbox`` (by default
        the guest's hostname, which ``Sandbox.up`` sets to the sandbox's name)."""
        reply = self._call(
            "bulkhead.v1.Telemetry/GetMetrics",
            self._telemetry.GetMetrics,
            agent_pb2.GetMetricsRequest(sandbox=sandbox),
            timeout,
        )
        return reply.text

    def events(
        self, since: int | None = None, *, accept_gap: bool = False, timeout: float | None = None
    ) -> EventStream:
        """Follow the agent's events: those after ``since`` (None: only new ones).

        Returns a ``bulkhead.events.EventStream`` (iterate it; ``last_seq`` is where to resume;
        ``close()`` it). Events the agent no longer keeps raise ``OutOfRange``, or with
        ``accept_gap`` come as one ``events_lost`` event. The stream lasts until closed, or
        ``timeout`` seconds (then ``DeadlineExceeded``).
        """
        from .events import EventStream

        return EventStream(self, since, accept_gap, timeout)

    def _call(self, method: str, rpc: Callable[..., _T], request: Any, timeout: float | None) -> _T:
        if "/" not in method:
            method = f"bulkhead.v1.Agent/{method}"
        return call(method, rpc, request, self.timeout if timeout is None else timeout)


# How long past its deadline a call may take to come back before it is abandoned.
LOST_CALL_GRACE = 5.0


def call(method: str, rpc: Any, request: Any, timeout: float) -> Any:
    """One unary (or stream-unary) call with a deadline of ``timeout`` seconds that holds even
    if gRPC never completes the call; ``math.inf``: no deadline at all (a wait that lasts as
    long as a process runs).

    gRPC enforces the deadline itself, but twice now a call has been seen never to come back
    to its caller (see ``_CHANNEL_OPTIONS``; once with a 10 s deadline, blocked for minutes
    after the guest's vsock ring broke). So the caller waits for the call's future, not for
    gRPC: a call still open ``LOST_CALL_GRACE`` after its deadline is cancelled and raises
    ``DeadlineExceeded``, and its caller can go on.
    """
    if timeout == math.inf:
        try:
            return rpc(request)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method) from exc
    future = rpc.future(request, timeout=timeout)
    try:
        return future.result(timeout=timeout + LOST_CALL_GRACE)
    except grpc.FutureTimeoutError:
        future.cancel()
        raise DeadlineExceeded(
            f"no answer {timeout + LOST_CALL_GRACE:g}s after the call began (its deadline "
            f"was {timeout:g}s); abandoned",
            method=method,
        ) from None
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, method) from exc


def _json(value: dict[str, Any] | bytes) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return json.dumps(value, separators=(",", ":")).encode()
