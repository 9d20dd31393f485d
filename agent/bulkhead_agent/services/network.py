"""The ``bulkhead.v1.Network`` servicer: requests in, :class:`~bulkhead_agent.network.apply.Network`
calls, replies (or statuses) out.

Every change goes through ``Network.apply`` (UpdateInterface is an apply of one interface,
UpdateRoutes of routes alone, ...), so all of them share one path, one lock and one rollback.
Changes run shielded from cancellation: a host that gives up half-way still gets the change
made whole or undone whole, never a half-applied one.

Imported when the agent starts, this module brings in only the generated code and the name
files (whose binds containers need from the start): the request parsing, planning and netlink
modules (``ipaddress``, dataclasses, pyroute2) come with the first request, so the agent is
ready no later for having a network service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import ModuleType
from typing import TypeVar

import grpc

from bulkhead_agent.containers.errors import Failure
from bulkhead_agent.network import pyroute
from bulkhead_agent.network.files import Files, NameFiles
from bulkhead_init.log import Logger
from bulkhead_proto.v1 import network_pb2, network_pb2_grpc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bulkhead_agent.network import spec as specs
    from bulkhead_agent.network.apply import InterfaceView, Network, NetworkView
    from bulkhead_agent.network.kernel import RouteEntry

T = TypeVar("T")
pb = network_pb2
# Beside the agent's run dir, not in it: no container mount may come from the directory that
# holds the agent's socket (/run/bulkhead-network in the guest).
NETWORK_DIR_SUFFIX = "-network"
_SCOPES = {0: pb.ROUTE_SCOPE_UNIVERSE, 253: pb.ROUTE_SCOPE_LINK, 254: pb.ROUTE_SCOPE_HOST}


async def _call(context: grpc.aio.ServicerContext, work: Awaitable[T], log: Logger) -> T:
    first = not pyroute.loaded()
    try:
        return await asyncio.shield(work)
    except Failure as exc:
        await context.abort(grpc.StatusCode[exc.code], exc.message)
        raise  # abort raised already; this line is for the type checker
    except ImportError as exc:  # the image lacks pyroute2: say so rather than crash
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"network support missing: {exc}")
        raise
    finally:
        if first and pyroute.loaded():
            log.info(f"network: pyroute2 loaded in {pyroute.import_seconds * 1000:.0f} ms")


def create_files(run_dir: str, log: Logger) -> NameFiles:
    """The sandbox's name files, with the defaults written where missing."""
    files = NameFiles(run_dir.rstrip("/") + NETWORK_DIR_SUFFIX)
    try:
        files.prepare()
    except OSError as exc:  # containers then get no binds; UpdateNameResolution will say why
        log.error(f"cannot prepare {files.directory}: {exc}")
    return files


def _specs() -> ModuleType:
    from bulkhead_agent.network import spec

    return spec


class NetworkService(network_pb2_grpc.NetworkServicer):
    def __init__(self, files: NameFiles, log: Logger, network: Network | None = None) -> None:
        self.files = files
        self._log = log
        self._configurator = network

    @property
    def _network(self) -> Network:
        if self._configurator is None:
            from bulkhead_agent.network.apply import Network

            self._configurator = Network(self.files, self._log.warning)
        return self._configurator

    async def _apply(self, context: grpc.aio.ServicerContext, make: object) -> NetworkView:
        try:
            request = make()  # type: ignore[operator]
        except Failure as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
            raise
        return await _call(context, self._network.apply(request), self._log)

    async def UpdateInterface(
        self, request: pb.UpdateInterfaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.Interface:
        specs = _specs()

        def make() -> specs.NetworkRequest:
            interface = specs.parse_interface(request.interface, "interface")
            return specs.NetworkRequest(
                interfaces=(interface,), wait_s=specs.parse_wait(request.wait_ms, "wait_ms")
            )

        view = await self._apply(context, make)
        mac = specs.parse_mac(request.interface.mac, "interface.mac")
        match = next(i for i in view.interfaces if i.link.mac == mac)
        self._log.info(f"network: interface {match.link.name} ({mac}) updated")
        return _interface(match)

    async def UpdateRoutes(
        self, request: pb.UpdateRoutesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateRoutesResponse:
        specs = _specs()
        view = await self._apply(
            context,
            lambda: specs.NetworkRequest(routes=specs.parse_routes(request.routes, "routes")),
        )
        self._log.info(f"network: {len(request.routes)} routes set")
        return pb.UpdateRoutesResponse(routes=_routes(view))

    async def ListInterfaces(
        self, request: pb.ListInterfacesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListInterfacesResponse:
        view = await _call(context, self._network.view(routes=False), self._log)
        return pb.ListInterfacesResponse(interfaces=[_interface(i) for i in view.interfaces])

    async def ListRoutes(
        self, request: pb.ListRoutesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRoutesResponse:
        view = await _call(context, self._network.view(addresses=False), self._log)
        return pb.ListRoutesResponse(routes=_routes(view))

    async def AddNeighbors(
        self, request: pb.AddNeighborsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddNeighborsResponse:
        specs = _specs()
        await self._apply(
            context,
            lambda: specs.NetworkRequest(
                neighbors=specs.parse_neighbors(request.neighbors, "neighbors")
            ),
        )
        return pb.AddNeighborsResponse()

    async def UpdateNameResolution(
        self, request: pb.NameResolution, context: grpc.aio.ServicerContext
    ) -> pb.NameResolutionFiles:
        specs = _specs()
        view = await self._apply(
            context,
            lambda: specs.NetworkRequest(
                name_resolution=specs.parse_name_resolution(request, "name_resolution")
            ),
        )
        assert view.files is not None
        return _files(view.files)

    async def ApplyNetwork(
        self, request: pb.ApplyNetworkRequest, context: grpc.aio.ServicerContext
    ) -> pb.NetworkState:
        view = await self._apply(context, lambda: _specs().parse_apply(request))
        self._log.info(
            f"network: applied {len(request.interfaces)} interfaces, "
            f"{len(request.routes.routes) if request.HasField('routes') else 'no'} routes, "
            f"{len(request.neighbors)} neighbours"
        )
        return pb.NetworkState(
            interfaces=[_interface(i) for i in view.interfaces],
            routes=_routes(view),
            name_resolution=_files(view.files) if view.files is not None else None,
        )


def _interface(view: InterfaceView) -> pb.Interface:
    link = view.link
    return pb.Interface(
        mac=link.mac,
        name=link.name,
        mtu=link.mtu,
        addresses=[a.text for a in view.addresses],
        state=pb.LINK_STATE_UP if link.up else pb.LINK_STATE_DOWN,
        index=link.index,
        carrier=link.carrier,
    )


def _route(route: RouteEntry, names: dict[int, str]) -> pb.Route:
    from bulkhead_agent.network.kernel import PROTOCOLS

    # "default" reads back as IPv4 unless the gateway is IPv6: keep "::/0" when it is not.
    default = route.dst_len == 0 and (route.family == 2 or route.gateway)
    return pb.Route(
        destination="default" if default else route.destination,
        gateway=route.gateway,
        device=names.get(route.oif, ""),
        source=route.prefsrc,
        scope=_SCOPES.get(route.scope, pb.ROUTE_SCOPE_UNSPECIFIED),
        metric=route.priority,
        protocol=PROTOCOLS.get(route.protocol, str(route.protocol)),
    )


def _routes(view: NetworkView) -> list[pb.Route]:
    return [_route(r, view.names) for r in view.routes]


def _files(files: Files) -> pb.NameResolutionFiles:
    return pb.NameResolutionFiles(
        resolv_conf=files.resolv_conf, hosts=files.hosts, hostname=files.hostname.strip()
    )
