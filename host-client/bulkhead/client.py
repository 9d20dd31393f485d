"""``AgentClient``: the guest agent's API as typed Python calls.

Every method takes an optional ``timeout`` (seconds; the client's default
otherwise) and raises an ``AgentError`` subclass named after the gRPC status
(``InvalidArgument``, ``Unavailable``, ...) carrying the server's message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

from .details import GuestDetails
from .errors import AgentError, DeadlineExceeded, from_rpc_error

_T = TypeVar("_T")

# Without these, a channel that failed once (the sandbox still booting) backs
# off for up to two minutes before it dials again.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Each client gets its own connection (and so its own agent session)
    # instead of sharing one with every channel to the same target.
    ("grpc.use_local_subchannel_pool", 1),
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
    ``with``) when done.
    """

    def __init__(self, target: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.target = grpc_target(target)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._agent = agent_pb2_grpc.AgentStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

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

    def _call(self, method: str, rpc: Callable[..., _T], request: Any, timeout: float | None) -> _T:
        if "/" not in method:
            method = f"bulkhead.v1.Agent/{method}"
        try:
            return rpc(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method) from exc
