"""The ``bulkhead.v1.Agent`` servicer: guest details, time, entropy, shutdown here; the
container, process and stdio RPCs come from the ``services.containers`` mixin.

Every handler runs on the event loop. They only touch small kernel files and
syscalls, so none of them needs a worker thread (threads cost memory in every VM).
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time

import grpc

import bulkhead_proto
from bulkhead_agent import __version__
from bulkhead_agent.containers.manager import Manager
from bulkhead_agent.services import guest_facts
from bulkhead_agent.services.containers import ContainerRpcs
from bulkhead_agent.state import AgentState
from bulkhead_agent.storage.manager import StorageManager
from bulkhead_init.log import Logger
from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

MAX_ENTROPY = 1024 * 1024
# _IOW('R', 0x03, int[2]) from <linux/random.h>: mix in and credit the pool.
RNDADDENTROPY = 0x40085203
# Long enough for the reply to leave through the bridge before init starts
# tearing the guest down (it SIGTERMs the agent first).
SHUTDOWN_DELAY_S = 0.2


class AgentService(ContainerRpcs, agent_pb2_grpc.AgentServicer):
    def __init__(
        self,
        state: AgentState,
        log: Logger,
        containers: Manager,
        storages: StorageManager | None = None,
    ) -> None:
        self._state = state
        self._log = log
        self._containers = containers
        self._storages = storages  # CreateContainer's storages and storage references

    async def GetGuestDetails(
        self, request: agent_pb2.GetGuestDetailsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GuestDetails:
        env = os.environ
        uname = os.uname()
        return agent_pb2.GuestDetails(
            agent_version=__version__,
            protocol_version=bulkhead_proto.PROTOCOL_VERSION,
            kernel_release=uname.release,
            cpus=os.cpu_count() or 0,
            memory_total_bytes=guest_facts.memory_total_bytes(),
            cgroup_version=guest_facts.cgroup_version(),
            features=self._state.features,
            boot=agent_pb2.BootTimeline(
                init_started_ms=guest_facts.env_ms(env, "BULKHEAD_INIT_STARTED_MS"),
                agent_started_ms=self._state.started_ms,
                agent_ready_ms=self._state.ready_ms,
            ),
            agent_restarts=guest_facts.env_count(env, "BULKHEAD_AGENT_RESTARTS"),
            hostname=uname.nodename,
            uptime_seconds=guest_facts.uptime_seconds(),
            kernel_modules=guest_facts.env_list(env, "BULKHEAD_MODULES"),
            init_version=guest_facts.init_version(__version__),
            agent_pid=os.getpid(),
            processes=self._processes(),
        )

    def _processes(self) -> list[agent_pb2.ProcessMemory]:
        # Named by role: both are "python3" to the kernel.
        found = []
        for pid, role in ((self._state.settings.init_pid, "init"), (os.getpid(), "agent")):
            figures = guest_facts.process_memory(pid)
            if figures is None:
                continue
            rss, uss, pss, threads = figures
            found.append(
                agent_pb2.ProcessMemory(
                    pid=pid, name=role, rss_bytes=rss, uss_bytes=uss, pss_bytes=pss, threads=threads
                )
            )
        return found

    async def SetGuestTime(
        self, request: agent_pb2.SetGuestTimeRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.SetGuestTimeResponse:
        if request.unix_nanos <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unix_nanos must be > 0 (got {request.unix_nanos})",
            )
        previous = time.clock_gettime_ns(time.CLOCK_REALTIME)
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, request.unix_nanos)
        except PermissionError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"cannot set the clock: {exc}")
        except OSError as exc:
            # EINVAL: unix_nanos beyond what the kernel accepts (e.g. past 2262 on 64 bits).
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unix_nanos rejected: {exc}")
        self._log.info(f"guest clock set (moved by {(request.unix_nanos - previous) / 1e9:+.3f} s)")
        return agent_pb2.SetGuestTimeResponse(previous_unix_nanos=previous)

    async def AddEntropy(
        self, request: agent_pb2.AddEntropyRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.AddEntropyResponse:
        size = len(request.data)
        if not 1 <= size <= MAX_ENTROPY:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"data must be 1..{MAX_ENTROPY} bytes (got {size})",
            )
        try:
            if request.credit:
                _add_and_credit(request.data)
            else:
                # A write mixes the bytes in without crediting them: safe for any caller.
                with open("/dev/urandom", "wb", buffering=0) as f:
                    f.write(request.data)
        except PermissionError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"cannot add entropy: {exc}")
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"cannot add entropy: {exc}")
        return agent_pb2.AddEntropyResponse()

    async def Shutdown(
        self, request: agent_pb2.ShutdownRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ShutdownResponse:
        # Init's contract: SIGTERM powers off, SIGINT reboots.
        sig = signal.SIGINT if request.reboot else signal.SIGTERM
        pid = self._state.settings.init_pid
        what = "reboot" if request.reboot else "power off"
        self._log.info(f"shutdown requested ({what}): signalling pid {pid} in {SHUTDOWN_DELAY_S}s")
        asyncio.get_running_loop().call_later(SHUTDOWN_DELAY_S, self._signal_init, pid, sig)
        return agent_pb2.ShutdownResponse()

    def _signal_init(self, pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            self._log.error(f"cannot send {sig.name} to pid {pid}: {exc}")


def _add_and_credit(data: bytes) -> None:
    # struct rand_pool_info { int entropy_count (bits); int buf_size (bytes); __u32 buf[]; }
    # A mutable buffer lets fcntl.ioctl pass it through without its 1 KiB copy limit.
    import fcntl

    info = bytearray(struct.pack("ii", len(data) * 8, len(data)))
    info += data
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info, True)
    finally:
        os.close(fd)
