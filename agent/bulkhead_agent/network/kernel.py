"""Links, addresses, routes and neighbours over netlink, as plain values.

:class:`Kernel` wraps one pyroute2 ``AsyncIPRoute`` (a netlink socket in the caller's network
namespace, driven by the running event loop). Reads return the frozen dataclasses below, so
that snapshots compare with ``==`` and the rest of the package never sees a netlink message.
A failed change raises :class:`KernelError` with the errno and the kernel's own words.
"""

from __future__ import annotations

import errno as errno_
import os
from dataclasses import dataclass
from typing import Any

from . import pyroute

AF_INET, AF_INET6 = 2, 10
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_NOWHERE = 255
RTPROT_KERNEL, RTPROT_BOOT, RTPROT_STATIC = 2, 3, 4
NUD_PERMANENT = 0x80
PROTOCOLS = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 9: "ra", 16: "dhcp"}


class KernelError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code
        self.message = message


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str  # "" for links without one (tun)
    mtu: int
    up: bool  # IFF_UP: administratively up
    carrier: bool


@dataclass(frozen=True)
class Address:
    index: int
    family: int
    address: str
    prefixlen: int

    @property
    def text(self) -> str:
        return f"{self.address}/{self.prefixlen}"

    @property
    def kernel_managed(self) -> bool:
        """IPv6 link-local addresses come and go with the link; they are never ours."""
        return self.family == AF_INET6 and self.address.lower().startswith("fe80:")


@dataclass(frozen=True)
class RouteEntry:
    family: int
    dst: str  # the network address ("0.0.0.0" / "::" for default)
    dst_len: int
    gateway: str  # "" when directly connected
    oif: int  # 0 when unknown (multipath)
    prefsrc: str
    priority: int
    scope: int
    protocol: int
    type: int
    table: int

    @property
    def destination(self) -> str:
        return f"{self.dst}/{self.dst_len}"

    @property
    def key(self) -> tuple[int, str, int]:
        """Unique within a table: family, prefix and metric (see ``spec.RouteSpec.key``)."""
        return (self.family, self.destination, self.priority)

    @property
    def ours(self) -> bool:
        """Whether the host's route specs own it: unicast routes the kernel did not make."""
        return self.type == RTN_UNICAST and self.protocol != RTPROT_KERNEL


@dataclass(frozen=True)
class Neighbour:
    family: int
    ifindex: int
    dst: str
    lladdr: str
    state: int

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.family, self.ifindex, self.dst)

    @property
    def permanent(self) -> bool:
        return bool(self.state & NUD_PERMANENT)


def _link(msg: Any) -> Link:
    return Link(
        index=msg["index"],
        name=msg.get("ifname") or "",
        mac=(msg.get("address") or "").lower(),
        mtu=msg.get("mtu") or 0,
        up=bool(msg["flags"] & IFF_UP),
        carrier=bool(msg.get("carrier")),
    )


def _address(msg: Any) -> Address:
    # IFA_LOCAL is the address itself; IFA_ADDRESS is the peer's on point-to-point links.
    address = msg.get("local") or msg.get("address")
    return Address(msg["index"], msg["family"], address, msg["prefixlen"])


def _route(msg: Any) -> RouteEntry:
    family = msg["family"]
    dst = msg.get("dst") or ("0.0.0.0" if family == AF_INET else "::")
    return RouteEntry(
        family=family,
        dst=dst,
        dst_len=msg["dst_len"],
        gateway=msg.get("gateway") or "",
        oif=msg.get("oif") or 0,
        prefsrc=msg.get("prefsrc") or "",
        priority=msg.get("priority") or 0,
        scope=msg["scope"],
        protocol=msg["proto"],
        type=msg["type"],
        table=msg.get("table") or msg["table"],
    )


def _neighbour(msg: Any) -> Neighbour:
    return Neighbour(
        msg["family"],
        msg["ifindex"],
        msg.get("dst") or "",
        (msg.get("lladdr") or "").lower(),
        msg["state"],
    )


class Kernel:
    """One netlink session; ``async with Kernel() as k: ...``."""

    def __init__(self) -> None:
        self._pr = pyroute.load()
        # No multicast groups: this socket only asks and answers (hotplug listens on its own).
        self._ipr = self._pr.AsyncIPRoute(groups=0, ext_ack=True, strict_check=False)

    async def __aenter__(self) -> Kernel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._ipr.close()

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except self._pr.NetlinkError as exc:
            code = exc.code or errno_.EINVAL
            # ext_ack gives the kernel's reason ("Nexthop has invalid gateway"); else strerror.
            detail = exc.args[1] if len(exc.args) > 1 and exc.args[1] else os.strerror(code)
            raise KernelError(code, f"{what}: {detail}") from None

    # --- reads -----------------------------------------------------------------------------

    async def links(self) -> list[Link]:
        return [_link(m) async for m in await self._call("list links", self._ipr.link("dump"))]

    async def addresses(self) -> list[Address]:
        dump = await self._call("list addresses", self._ipr.addr("dump"))
        return [_address(m) async for m in dump]

    async def routes(self, table: int = RT_TABLE_MAIN) -> list[RouteEntry]:
        dump = await self._call("list routes", self._ipr.route("dump", table=table))
        return [r for r in [_route(m) async for m in dump] if r.table == table]

    async def neighbours(self) -> list[Neighbour]:
        dump = await self._call("list neighbours", self._ipr.neigh("dump"))
        return [_neighbour(m) async for m in dump]

    # --- changes ---------------------------------------------------------------------------

    async def set_link(
        self,
        index: int,
        *,
        name: str | None = None,
        mtu: int | None = None,
        up: bool | None = None,
    ) -> None:
        changes: dict[str, Any] = {}
        if name is not None:
            changes["ifname"] = name
        if mtu is not None:
            changes["mtu"] = mtu
        if up is not None:
            changes["state"] = "up" if up else "down"
        if changes:
            what = ", ".join(f"{k} {v}" for k, v in changes.items())
            request = self._ipr.link("set", index=index, **changes)
            await self._call(f"set link {index} {what}", request)

    async def add_address(self, index: int, family: int, address: str, prefixlen: int) -> None:
        extra: dict[str, Any] = {}
        if family == AF_INET6:
            # The host assigned it: no duplicate address detection (which would keep the
            # address "tentative", unusable, for a second or more).
            extra["flags"] = IFA_F_NODAD
        await self._call(
            f"add {address}/{prefixlen}",
            self._ipr.addr("add", index=index, address=address, prefixlen=prefixlen, **extra),
        )

    async def del_address(self, index: int, family: int, address: str, prefixlen: int) -> None:
        await self._call(
            f"remove {address}/{prefixlen}",
            self._ipr.addr("del", index=index, address=address, prefixlen=prefixlen),
        )

    async def replace_route(self, route: RouteEntry) -> None:
        await self._call(
            f"route {route.destination}", self._ipr.route("replace", **_route_args(route))
        )

    async def add_route(self, route: RouteEntry) -> None:
        await self._call(f"route {route.destination}", self._ipr.route("add", **_route_args(route)))

    async def del_route(self, route: RouteEntry) -> None:
        args = {
            "family": route.family,
            "dst": route.dst,
            "dst_len": route.dst_len,
            "priority": route.priority,
            "table": route.table,
            "scope": RT_SCOPE_NOWHERE,  # any scope: what iproute2 sends to delete
        }
        if route.type != RTN_UNICAST:
            args["type"] = route.type
        await self._call(f"remove route {route.destination}", self._ipr.route("del", **args))

    async def replace_neighbour(self, n: Neighbour) -> None:
        await self._call(
            f"neighbour {n.dst}",
            self._ipr.neigh(
                "replace",
                family=n.family,
                dst=n.dst,
                lladdr=n.lladdr,
                ifindex=n.ifindex,
                state=n.state,
            ),
        )

    async def del_neighbour(self, n: Neighbour) -> None:
        await self._call(
            f"remove neighbour {n.dst}",
            self._ipr.neigh("del", family=n.family, dst=n.dst, ifindex=n.ifindex),
        )


def _route_args(route: RouteEntry) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": route.family,
        "dst": route.dst,
        "dst_len": route.dst_len,
        "table": route.table,
        "scope": route.scope,
        "proto": route.protocol,
        "type": route.type,
    }
    if route.priority:
        args["priority"] = route.priority
    if route.gateway:
        args["gateway"] = route.gateway
    if route.oif:
        args["oif"] = route.oif
    if route.prefsrc:
        args["prefsrc"] = route.prefsrc
    return args
