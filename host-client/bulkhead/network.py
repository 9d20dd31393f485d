"""The sandbox's network from the host's side: the spec (JSON file or Python) and its client.

A network spec says what the guest's network is to be; the agent applies it all or nothing::

    {
      "interfaces": [{"mac": "52:54:00:12:34:56", "name": "eth0", "mtu": 1500,
                      "addresses": ["10.0.2.15/24", "fd00::15/64"], "state": "up"}],
      "routes": [{"destination": "default", "gateway": "10.0.2.2"},
                 {"destination": "10.9.0.0/16", "device": "eth0", "scope": "link"}],
      "neighbors": [{"address": "10.0.2.7", "mac": "52:54:00:00:00:07", "device": "eth0"}],
      "dns": {"nameservers": ["10.0.2.3"], "search": ["example.test"], "options": ["ndots:2"]},
      "hosts": [{"address": "10.0.2.2", "names": ["gateway"]}],
      "hostname": "web"
    }

Interfaces are matched by MAC; their ``addresses`` are the complete set. ``routes``, when
present (even empty), replace every route not made by the kernel; absent, they are left
alone. ``dns``, ``hosts`` and ``hostname`` together are the name resolution every container
of the sandbox sees (``/etc/resolv.conf``, ``/etc/hosts``); any of them present rewrites all
three. The agent refuses what it cannot apply naming the field (``InvalidArgument``,
``NotFound``) and leaves the previous configuration in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from bulkhead_proto.v1 import network_pb2 as pb
from bulkhead_proto.v1 import network_pb2_grpc

from .errors import SpecError, from_rpc_error

_T = TypeVar("_T")
STATES = {"": pb.LINK_STATE_UNSPECIFIED, "up": pb.LINK_STATE_UP, "down": pb.LINK_STATE_DOWN}
SCOPES = {
    "": pb.ROUTE_SCOPE_UNSPECIFIED,
    "universe": pb.ROUTE_SCOPE_UNIVERSE,
    "global": pb.ROUTE_SCOPE_UNIVERSE,
    "link": pb.ROUTE_SCOPE_LINK,
    "host": pb.ROUTE_SCOPE_HOST,
}
_STATE_NAMES = {v: k for k, v in STATES.items()}
_SCOPE_NAMES = {
    pb.ROUTE_SCOPE_UNSPECIFIED: "",
    pb.ROUTE_SCOPE_UNIVERSE: "universe",
    pb.ROUTE_SCOPE_LINK: "link",
    pb.ROUTE_SCOPE_HOST: "host",
}
DEFAULT_WAIT = 30.0  # for a hot-plugged NIC to show up in the guest (TCG is slow)


@dataclass(frozen=True)
class Interface:
    mac: str
    addresses: tuple[str, ...] = ()
    name: str = ""  # "" keeps the guest's name
    mtu: int = 0  # 0 keeps the MTU
    state: str = "up"  # "up", "down" or "" (keep)
    index: int = 0  # replies only
    carrier: bool = False  # replies only

    def to_proto(self) -> pb.Interface:
        return pb.Interface(
            mac=self.mac,
            name=self.name,
            mtu=self.mtu,
            addresses=list(self.addresses),
            state=STATES[self.state],
        )

    @classmethod
    def from_proto(cls, msg: pb.Interface) -> Interface:
        return cls(
            mac=msg.mac,
            addresses=tuple(msg.addresses),
            name=msg.name,
            mtu=msg.mtu,
            state=_STATE_NAMES.get(msg.state, ""),
            index=msg.index,
            carrier=msg.carrier,
        )


@dataclass(frozen=True)
class Route:
    destination: str  # "default", "10.1.0.0/16", "::/0"
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: str = ""  # "", "universe", "link", "host"
    metric: int = 0
    protocol: str = ""  # replies only: "kernel", "static", ...

    def to_proto(self) -> pb.Route:
        return pb.Route(
            destination=self.destination,
            gateway=self.gateway,
            device=self.device,
            source=self.source,
            scope=SCOPES[self.scope],
            metric=self.metric,
        )

    @classmethod
    def from_proto(cls, msg: pb.Route) -> Route:
        return cls(
            destination=msg.destination,
            gateway=msg.gateway,
            device=msg.device,
            source=msg.source,
            scope=_SCOPE_NAMES.get(msg.scope, ""),
            metric=msg.metric,
            protocol=msg.protocol,
        )


@dataclass(frozen=True)
class Neighbor:
    address: str
    mac: str
    device: str

    def to_proto(self) -> pb.Neighbor:
        return pb.Neighbor(address=self.address, mac=self.mac, device=self.device)


@dataclass(frozen=True)
class HostEntry:
    address: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class NameResolution:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    hosts: tuple[HostEntry, ...] = ()
    hostname: str = ""  # "" keeps it

    def to_proto(self) -> pb.NameResolution:
        return pb.NameResolution(
            nameservers=list(self.nameservers),
            search=list(self.search),
            options=list(self.options),
            hosts=[pb.HostEntry(address=h.address, names=list(h.names)) for h in self.hosts],
            hostname=self.hostname,
        )


@dataclass(frozen=True)
class NetworkSpec:
    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] | None = None  # None: leave the guest's routes alone
    neighbors: tuple[Neighbor, ...] = ()
    name_resolution: NameResolution | None = None  # None: leave it alone

    def to_proto(self, wait: float = DEFAULT_WAIT) -> pb.ApplyNetworkRequest:
        request = pb.ApplyNetworkRequest(
            interfaces=[i.to_proto() for i in self.interfaces],
            neighbors=[n.to_proto() for n in self.neighbors],
            wait_ms=max(0, round(wait * 1000)),
        )
        if self.routes is not None:
            request.routes.CopyFrom(pb.RouteTable(routes=[r.to_proto() for r in self.routes]))
        if self.name_resolution is not None:
            request.name_resolution.CopyFrom(self.name_resolution.to_proto())
        return request

    def merged(self, other: NetworkSpec) -> NetworkSpec:
        """This spec with ``other``'s parts added (interfaces, neighbours) or put instead."""
        routes = self.routes
        if other.routes is not None:
            routes = (*(routes or ()), *other.routes)
        return NetworkSpec(
            interfaces=(*self.interfaces, *other.interfaces),
            routes=routes,
            neighbors=(*self.neighbors, *other.neighbors),
            name_resolution=other.name_resolution or self.name_resolution,
        )

    # -- JSON --

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        r = _Reader(data, "")
        r.only("interfaces", "routes", "neighbors", "dns", "hosts", "hostname")
        interfaces = tuple(_interface(o) for o in r.objects("interfaces"))
        routes = tuple(_route(o) for o in r.objects("routes")) if r.has("routes") else None
        neighbors = tuple(_neighbor(o) for o in r.objects("neighbors"))
        name_resolution = None
        if r.has("dns") or r.has("hosts") or r.has("hostname"):
            dns = r.object("dns")
            if dns is not None:
                dns.only("nameservers", "search", "options")
            hosts = []
            for o in r.objects("hosts"):
                o.only("address", "names")
                hosts.append(HostEntry(o.string("address", required=True), o.strings("names")))
            name_resolution = NameResolution(
                nameservers=dns.strings("nameservers") if dns else (),
                search=dns.strings("search") if dns else (),
                options=dns.strings("options") if dns else (),
                hosts=tuple(hosts),
                hostname=r.string("hostname"),
            )
        return cls(interfaces, routes, neighbors, name_resolution)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NetworkSpec:
        """A spec from a JSON file (``SpecError`` naming the file and the field when bad)."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SpecError(f"network spec {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise SpecError(f"network spec {path}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError(f"network spec {path}: must be a JSON object")
        try:
            return cls.from_dict(data)
        except SpecError as exc:
            raise SpecError(f"network spec {path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.interfaces:
            out["interfaces"] = [
                _compact(
                    {
                        "mac": i.mac,
                        "name": i.name,
                        "mtu": i.mtu,
                        "addresses": list(i.addresses),
                        "state": i.state,
                    }
                )
                for i in self.interfaces
            ]
        if self.routes is not None:
            out["routes"] = [
                _compact(
                    {
                        "destination": r.destination,
                        "gateway": r.gateway,
                        "device": r.device,
                        "source": r.source,
                        "scope": r.scope,
                        "metric": r.metric,
                    }
                )
                for r in self.routes
            ]
        if self.neighbors:
            out["neighbors"] = [
                {"address": n.address, "mac": n.mac, "device": n.device} for n in self.neighbors
            ]
        nr = self.name_resolution
        if nr is not None:
            out["dns"] = _compact(
                {
                    "nameservers": list(nr.nameservers),
                    "search": list(nr.search),
                    "options": list(nr.options),
                }
            )
            if nr.hosts:
                out["hosts"] = [{"address": h.address, "names": list(h.names)} for h in nr.hosts]
            if nr.hostname:
                out["hostname"] = nr.hostname
        return out


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v not in ("", 0, [], None) or k == "destination"}


class _Reader:
    """Typed access to a JSON object, errors naming the key path."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise SpecError(f"{path or 'the spec'}: must be an object")
        self.data = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def only(self, *keys: str) -> None:
        unknown = sorted(set(self.data) - set(keys))
        if unknown:
            where = self.path or "the spec"
            raise SpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(keys)})")

    def string(self, key: str, *, required: bool = False) -> str:
        value = self.data.get(key, "")
        if not isinstance(value, str):
            raise SpecError(f"{self.at(key)}: must be a string")
        if required and not value:
            raise SpecError(f"{self.at(key)}: is required")
        return value

    def integer(self, key: str) -> int:
        value = self.data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpecError(f"{self.at(key)}: must be a whole number >= 0")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(f"{self.at(key)}: must be a list of strings")
        return tuple(value)

    def choice(self, key: str, choices: Iterable[str], default: str = "") -> str:
        value = self.data.get(key, default)
        options = list(choices)
        if value not in options:
            names = ", ".join(repr(c) for c in options if c)
            raise SpecError(f"{self.at(key)}: must be one of {names}, not {value!r}")
        return value

    def object(self, key: str) -> _Reader | None:
        if key not in self.data:
            return None
        return _Reader(self.data[key], self.at(key))

    def objects(self, key: str) -> list[_Reader]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise SpecError(f"{self.at(key)}: must be a list")
        return [_Reader(v, f"{self.at(key)}[{i}]") for i, v in enumerate(value)]


def _interface(r: _Reader) -> Interface:
    r.only("mac", "name", "mtu", "addresses", "state")
    return Interface(
        mac=r.string("mac", required=True),
        addresses=r.strings("addresses"),
        name=r.string("name"),
        mtu=r.integer("mtu"),
        state=r.choice("state", STATES, "up"),
    )


def _route(r: _Reader) -> Route:
    r.only("destination", "gateway", "device", "source", "scope", "metric")
    return Route(
        destination=r.string("destination", required=True),
        gateway=r.string("gateway"),
        device=r.string("device"),
        source=r.string("source"),
        scope=r.choice("scope", SCOPES),
        metric=r.integer("metric"),
    )


def _neighbor(r: _Reader) -> Neighbor:
    r.only("address", "mac", "device")
    return Neighbor(
        r.string("address", required=True), r.string("mac", required=True), r.string("device")
    )


# --- the agent's Network service -------------------------------------------------------------


@dataclass(frozen=True)
class NetworkState:
    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...]
    resolv_conf: str = ""  # when the request changed the name resolution
    hosts: str = ""

    def interface(self, mac: str) -> Interface:
        mac = mac.lower()
        return next(i for i in self.interfaces if i.mac == mac)

    def to_dict(self) -> dict[str, Any]:
        return {
            "interfaces": [
                {
                    "index": i.index,
                    "name": i.name,
                    "mac": i.mac,
                    "mtu": i.mtu,
                    "state": i.state,
                    "carrier": i.carrier,
                    "addresses": list(i.addresses),
                }
                for i in self.interfaces
            ],
            "routes": [
                {
                    "destination": r.destination,
                    "gateway": r.gateway,
                    "device": r.device,
                    "source": r.source,
                    "scope": r.scope,
                    "metric": r.metric,
                    "protocol": r.protocol,
                }
                for r in self.routes
            ],
        }


@dataclass
class NetworkClient:
    """The agent's ``bulkhead.v1.Network`` service, on an ``AgentClient``'s channel."""

    channel: grpc.Channel
    timeout: float = 10.0
    _stub: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._stub = network_pb2_grpc.NetworkStub(self.channel)

    def apply(
        self, spec: NetworkSpec, *, wait: float = DEFAULT_WAIT, timeout: float | None = None
    ) -> NetworkState:
        """Apply ``spec`` all or nothing, waiting up to ``wait`` s for each interface's NIC."""
        reply = self._call(
            "ApplyNetwork", self._stub.ApplyNetwork, spec.to_proto(wait), timeout, wait
        )
        return NetworkState(
            tuple(Interface.from_proto(i) for i in reply.interfaces),
            tuple(Route.from_proto(r) for r in reply.routes),
            reply.name_resolution.resolv_conf,
            reply.name_resolution.hosts,
        )

    def update_interface(
        self, interface: Interface, *, wait: float = DEFAULT_WAIT, timeout: float | None = None
    ) -> Interface:
        request = pb.UpdateInterfaceRequest(
            interface=interface.to_proto(), wait_ms=max(0, round(wait * 1000))
        )
        reply = self._call("UpdateInterface", self._stub.UpdateInterface, request, timeout, wait)
        return Interface.from_proto(reply)

    def update_routes(
        self, routes: Iterable[Route], *, timeout: float | None = None
    ) -> tuple[Route, ...]:
        request = pb.UpdateRoutesRequest(routes=[r.to_proto() for r in routes])
        reply = self._call("UpdateRoutes", self._stub.UpdateRoutes, request, timeout)
        return tuple(Route.from_proto(r) for r in reply.routes)

    def interfaces(self, *, timeout: float | None = None) -> tuple[Interface, ...]:
        reply = self._call(
            "ListInterfaces", self._stub.ListInterfaces, pb.ListInterfacesRequest(), timeout
        )
        return tuple(Interface.from_proto(i) for i in reply.interfaces)

    def routes(self, *, timeout: float | None = None) -> tuple[Route, ...]:
        reply = self._call("ListRoutes", self._stub.ListRoutes, pb.ListRoutesRequest(), timeout)
        return tuple(Route.from_proto(r) for r in reply.routes)

    def add_neighbors(self, neighbors: Iterable[Neighbor], *, timeout: float | None = None) -> None:
        request = pb.AddNeighborsRequest(neighbors=[n.to_proto() for n in neighbors])
        self._call("AddNeighbors", self._stub.AddNeighbors, request, timeout)

    def update_name_resolution(
        self, names: NameResolution, *, timeout: float | None = None
    ) -> tuple[str, str, str]:
        """``(resolv.conf, hosts, hostname)`` as the agent wrote them."""
        reply = self._call(
            "UpdateNameResolution", self._stub.UpdateNameResolution, names.to_proto(), timeout
        )
        return reply.resolv_conf, reply.hosts, reply.hostname

    def state(self, *, timeout: float | None = None) -> NetworkState:
        return NetworkState(self.interfaces(timeout=timeout), self.routes(timeout=timeout))

    def _call(
        self,
        method: str,
        rpc: Callable[..., _T],
        request: Any,
        timeout: float | None,
        wait: float = 0.0,
    ) -> _T:
        if timeout is None:
            timeout = self.timeout + wait  # the agent may wait that long for a NIC
        try:
            return rpc(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"bulkhead.v1.Network/{method}") from exc
