"""The container, process and stdio RPCs of ``bulkhead.v1.Agent``.

A mixin of the one registered servicer (``services.agent.AgentService``): each method turns
a request into a call on ``containers.manager.Manager`` and its answer (or
:class:`~bulkhead_agent.containers.errors.Failure`) into the reply (or status).

Lifecycle calls run shielded from cancellation: a host that gives up on CreateContainer
half-way gets a container that is fully created (or fully undone), never a half-made one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from bulkhead_agent.containers.errors import Failure
from bulkhead_agent.containers.manager import Manager
from bulkhead_agent.services import storage as storage_rpcs
from bulkhead_agent.services.attach import AttachSession, exit_message
from bulkhead_agent.storage.manager import StorageManager
from bulkhead_proto.v1 import agent_pb2

T = TypeVar("T")
pb = agent_pb2


async def _call(context: grpc.aio.ServicerContext, work: Awaitable[T], shield: bool = False) -> T:
    try:
        if shield:
            return await asyncio.shield(work)
        return await work
    except Failure as exc:
        await context.abort(grpc.StatusCode[exc.code], exc.message)
        raise  # abort raised already; this line is for the type checker


class ContainerRpcs:
    """Needs ``self._containers``, the agent's :class:`Manager`."""

    _containers: Manager
    _storages: StorageManager | None = None

    async def CreateContainer(
        self, request: pb.CreateContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateContainerResponse:
        # Through the storage service: it adds the container's storages and resolves its
        # storage references first (and undoes that if the create fails).
        work = storage_rpcs.create_container(
            self._storages,
            self._containers,
            request.container_id,
            request.oci_spec,
            request.bundle_dir,
            request.rootfs_storage,
            list(request.storages),
        )
        pid = await _call(context, work, shield=True)
        return pb.CreateContainerResponse(pid=pid)

    async def StartContainer(
        self, request: pb.StartContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartContainerResponse:
        await _call(context, self._containers.start(request.container_id), shield=True)
        return pb.StartContainerResponse()

    async def ExecProcess(
        self, request: pb.ExecProcessRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecProcessResponse:
        work = self._containers.exec(request.container_id, request.exec_id, request.process)
        pid = await _call(context, work, shield=True)
        return pb.ExecProcessResponse(pid=pid)

    async def SignalProcess(
        self, request: pb.SignalProcessRequest, context: grpc.aio.ServicerContext
    ) -> pb.SignalProcessResponse:
        work = self._containers.signal(
            request.container_id, request.exec_id, request.signal, request.all
        )
        await _call(context, work)
        return pb.SignalProcessResponse()

    async def WaitProcess(
        self, request: pb.WaitProcessRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProcessExit:
        info = await _call(context, self._containers.wait(request.container_id, request.exec_id))
        return exit_message(info)

    async def RemoveContainer(
        self, request: pb.RemoveContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveContainerResponse:
        work = storage_rpcs.remove_container(
            self._storages, self._containers, request.container_id, request.timeout_ms
        )
        await _call(context, work, shield=True)
        return pb.RemoveContainerResponse()

    async def PauseContainer(
        self, request: pb.PauseContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseContainerResponse:
        await _call(context, self._containers.pause(request.container_id), shield=True)
        return pb.PauseContainerResponse()

    async def ResumeContainer(
        self, request: pb.ResumeContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeContainerResponse:
        await _call(context, self._containers.resume(request.container_id), shield=True)
        return pb.ResumeContainerResponse()

    async def UpdateContainer(
        self, request: pb.UpdateContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateContainerResponse:
        work = self._containers.update(request.container_id, request.resources)
        await _call(context, work, shield=True)
        return pb.UpdateContainerResponse()

    async def GetContainerStats(
        self, request: pb.ContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContainerStats:
        stats = await _call(context, _now(self._containers.stats, request.container_id))
        return pb.ContainerStats(**stats._asdict())

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContainersResponse:
        return pb.ListContainersResponse(
            containers=[
                pb.ContainerInfo(
                    container_id=c.container_id,
                    status=c.status,
                    pid=c.pid,
                    created_unix=c.created_unix,
                    args=c.args,
                    rootfs=c.rootfs,
                    exec_ids=c.exec_ids,
                )
                for c in self._containers.list()
            ]
        )

    async def ListProcesses(
        self, request: pb.ListProcessesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListProcessesResponse:
        found = await _call(context, _now(self._containers.processes, request.container_id))
        return pb.ListProcessesResponse(
            processes=[
                pb.ProcessInfo(pid=p.pid, ppid=p.ppid, uid=p.uid, args=p.args, state=p.state)
                for p in found
            ]
        )

    async def Attach(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        # context.read()/write() rather than the iterator: requests (acknowledgements, stdin)
        # are read by a task of their own while this one sends output.
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        try:
            record = self._containers.find_process(first.container_id, first.exec_id)
            await AttachSession(record, context).run(first)
        except Failure as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)

    async def ResizeTerminal(
        self, request: pb.ResizeTerminalRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResizeTerminalResponse:
        work = _now(
            self._containers.resize,
            request.container_id,
            request.exec_id,
            request.rows,
            request.cols,
        )
        await _call(context, work)
        return pb.ResizeTerminalResponse()


async def _now(fn, *args):  # type: ignore[no-untyped-def]
    """A synchronous manager call as an awaitable, so _call maps its Failure the same way."""
    return fn(*args)
