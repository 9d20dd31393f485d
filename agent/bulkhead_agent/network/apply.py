"""Applying a network request: check it against the kernel, change, roll back on failure.

One request at a time (a lock), in this order:

1. wait for every interface's MAC to be there (``hotplug``), else ``NOT_FOUND``;
2. snapshot the links, addresses, main routing table and neighbours;
3. plan against the snapshot (:func:`make_plan`, pure): which link is renamed, which
   addresses go and come, which routes are removed and replaced. Everything the kernel's
   state can tell is refused here (names and addresses taken by another link, routes and
   neighbours through a device that will not exist), before anything changes;
4. execute: addresses removed first (so one can move between NICs), renames (a link must
   be down to be renamed) and MTUs, addresses added, link states; routes removed, then
   replaced, directly connected ones first; neighbours; last the name files and hostname;
5. on any failure, put the snapshot back (``snapshot.restore``) and the files as they were,
   and report the failure naming the request field whose change the kernel refused.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from ..containers.errors import Failure
from . import files as name_files
from . import sysctl
from .hotplug import wait_for_macs
from .kernel import (
    NUD_PERMANENT,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTPROT_STATIC,
    Address,
    Kernel,
    KernelError,
    Link,
    Neighbour,
    RouteEntry,
)
from .snapshot import Snapshot, Touched, restore
from .spec import AF_INET, AF_INET6, InterfaceSpec, IPInterface, NetworkRequest, RouteSpec

# errno -> gRPC status name for changes the kernel refused.
_STATUS = {
    errno.ENODEV: "NOT_FOUND",
    errno.EPERM: "PERMISSION_DENIED",
    errno.EACCES: "PERMISSION_DENIED",
    errno.EBUSY: "FAILED_PRECONDITION",
}
_INVALID = {
    errno.EINVAL,
    errno.EEXIST,
    errno.ERANGE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.EADDRNOTAVAIL,
    errno.EADDRINUSE,
    errno.EOPNOTSUPP,
    errno.ESRCH,
    errno.ENOENT,
}


@dataclass
class LinkPlan:
    spec: InterfaceSpec
    link: Link
    remove: list[Address] = field(default_factory=list)
    add: list[tuple[int, Address]] = field(default_factory=list)  # (index in spec, address)

    @property
    def rename(self) -> bool:
        return bool(self.spec.name) and self.spec.name != self.link.name

    @property
    def mtu(self) -> bool:
        return bool(self.spec.mtu) and self.spec.mtu != self.link.mtu


@dataclass
class Plan:
    links: list[LinkPlan] = field(default_factory=list)
    route_removals: list[RouteEntry] = field(default_factory=list)
    routes: list[tuple[RouteSpec, RouteEntry]] = field(default_factory=list)
    neighbours: list[tuple[str, Neighbour]] = field(default_factory=list)  # (field, entry)
    touched: Touched = field(default_factory=Touched)


@dataclass(frozen=True)
class InterfaceView:
    link: Link
    addresses: tuple[Address, ...]


@dataclass(frozen=True)
class NetworkView:
    interfaces: tuple[InterfaceView, ...]
    routes: tuple[RouteEntry, ...]
    names: dict[int, str]  # link index -> name, for the routes' devices
    files: name_files.Files | None = None


def make_plan(request: NetworkRequest, snap: Snapshot, found: dict[str, Link]) -> Plan:
    """What to change for ``request``, refusing what the kernel's state rules out."""
    plan = Plan()
    names = {index: link.name for index, link in snap.links.items()}
    # Where each address will be once the interfaces are done.
    owner = {(a.address, a.family): a.index for a in snap.addresses if not a.kernel_managed}
    for spec in request.interfaces:
        link = found[spec.mac]
        if spec.name and spec.name != link.name:
            other = snap.link_named(spec.name)
            if other is not None and other.index != link.index:
                raise Failure(
                    "INVALID_ARGUMENT",
                    f"{spec.field}.name: {spec.name!r} is taken by the interface with MAC "
                    f"{other.mac or '(none)'}",
                )
            names[link.index] = spec.name
        had = snap.addresses_of(link.index)
        wanted = {_address(link.index, a): i for i, a in enumerate(spec.addresses)}
        plan.links.append(
            LinkPlan(
                spec,
                link,
                remove=sorted(had - wanted.keys(), key=lambda a: (a.family, a.address)),
                add=[(i, a) for a, i in wanted.items() if a not in had],
            )
        )
        for a in had - wanted.keys():
            owner.pop((a.address, a.family), None)
        plan.touched.links.add(link.index)
    for lp in plan.links:
        for i, a in lp.add:
            holder = owner.get((a.address, a.family))
            if holder is not None and holder != lp.link.index:
                raise Failure(
                    "INVALID_ARGUMENT",
                    f"{lp.spec.field}.addresses[{i}]: {a.address} is already on "
                    f"{names.get(holder, holder)}",
                )
            owner[(a.address, a.family)] = lp.link.index
    by_name = {name: index for index, name in names.items()}
    if request.routes is not None:
        plan.touched.routes = True
        wanted_keys = {r.key for r in request.routes}
        plan.route_removals = [r for r in snap.routes if r.ours and r.key not in wanted_keys]
        for route in sorted(request.routes, key=lambda r: r.gateway is not None):
            plan.routes.append((route, _route_entry(route, by_name)))
    for n in request.neighbors:
        index = by_name.get(n.device)
        if index is None:
            raise Failure("NOT_FOUND", f"{n.field}.device: no interface {n.device!r}")
        entry = Neighbour(n.family, index, str(n.address), n.mac, NUD_PERMANENT)
        plan.neighbours.append((n.field, entry))
        plan.touched.neighbours.add(entry.key)
    return plan


def _address(index: int, value: IPInterface) -> Address:
    family = AF_INET if value.version == 4 else AF_INET6
    return Address(index, family, str(value.ip), value.network.prefixlen)


def _route_entry(route: RouteSpec, by_name: dict[str, int]) -> RouteEntry:
    oif = 0
    if route.device:
        index = by_name.get(route.device)
        if index is None:
            raise Failure("NOT_FOUND", f"{route.field}.device: no interface {route.device!r}")
        oif = index
    return RouteEntry(
        family=route.family,
        dst=str(route.destination.network_address),
        dst_len=route.destination.prefixlen,
        gateway=str(route.gateway) if route.gateway else "",
        oif=oif,
        prefsrc=str(route.source) if route.source else "",
        priority=route.metric,
        scope=route.scope,
        protocol=RTPROT_STATIC,
        type=RTN_UNICAST,
        table=RT_TABLE_MAIN,
    )


def _failure(where: str, exc: KernelError) -> Failure:
    if exc.errno in _STATUS:
        code = _STATUS[exc.errno]
    elif exc.errno in _INVALID:
        code = "INVALID_ARGUMENT"
    else:
        code = "INTERNAL"
    return Failure(code, f"{where}: {exc.message}")


class Network:
    """The agent's network configurator; one request at a time."""

    def __init__(self, files: name_files.NameFiles, report: Callable[[str], None]) -> None:
        self.files = files
        self._report = report
        self._lock = asyncio.Lock()

    async def apply(self, request: NetworkRequest) -> NetworkView:
        async with self._lock, Kernel() as kernel:
            found, missing = await wait_for_macs(
                kernel.links, [i.mac for i in request.interfaces], request.wait_s
            )
            if missing:
                spec = next(i for i in request.interfaces if i.mac == missing[0])
                waited = f" (waited {request.wait_s:g} s)" if request.wait_s else ""
                raise Failure(
                    "NOT_FOUND", f"{spec.field}.mac: no interface with MAC {spec.mac}{waited}"
                )
            snap = await Snapshot.take(kernel)
            plan = make_plan(request, snap, found)
            files_before = self.files.read() if request.name_resolution else None
            hostname_before = name_files.current_hostname()
            written = None
            try:
                await self._execute(kernel, plan, snap, request)
                if request.name_resolution is not None:
                    written = self._write_files(request)
            except BaseException:
                await restore(kernel, snap, plan.touched, self._report)
                if files_before is not None:
                    self._restore_files(files_before, hostname_before)
                raise
            return await self._view(kernel, written)

    async def view(self, *, addresses: bool = True, routes: bool = True) -> NetworkView:
        """The links with their ``addresses`` and/or the main table's ``routes``: only what
        is asked for is dumped (each dump costs, under emulation most of all)."""
        async with self._lock, Kernel() as kernel:
            return await self._view(kernel, None, addresses=addresses, routes=routes)

    async def _view(
        self,
        kernel: Kernel,
        written: name_files.Files | None,
        *,
        addresses: bool = True,
        routes: bool = True,
    ) -> NetworkView:
        links = await kernel.links()
        found = await kernel.addresses() if addresses else []
        table = await kernel.routes() if routes else []
        interfaces = tuple(
            InterfaceView(link, tuple(a for a in found if a.index == link.index))
            for link in sorted(links, key=lambda link: link.index)
        )
        names = {link.index: link.name for link in links}
        return NetworkView(interfaces, tuple(table), names, written)

    async def _execute(
        self, kernel: Kernel, plan: Plan, snap: Snapshot, request: NetworkRequest
    ) -> None:
        for lp in plan.links:
            # First: an advertisement must not add an address after the old ones are gone.
            before = sysctl.read(lp.link.name)
            if before is not None and before != sysctl.OFF:
                plan.touched.sysctls[lp.link.index] = before
                try:
                    sysctl.write(lp.link.name, sysctl.OFF)
                except OSError as exc:
                    raise Failure(
                        "INTERNAL", f"{lp.spec.field}: turning IPv6 autoconfiguration off: {exc}"
                    ) from None
        for lp in plan.links:
            for a in lp.remove:
                await self._do(
                    f"{lp.spec.field}.addresses",
                    kernel.del_address(lp.link.index, a.family, a.address, a.prefixlen),
                )
        for lp in plan.links:
            index, where = lp.link.index, lp.spec.field
            if lp.rename:
                if lp.link.up:
                    await self._do(f"{where}.name", kernel.set_link(index, up=False))
                    plan.touched.flapped.add(index)
                await self._do(f"{where}.name", kernel.set_link(index, name=lp.spec.name))
            if lp.mtu:
                await self._do(f"{where}.mtu", kernel.set_link(index, mtu=lp.spec.mtu))
        for lp in plan.links:
            for i, a in lp.add:
                await self._do(
                    f"{lp.spec.field}.addresses[{i}]",
                    kernel.add_address(lp.link.index, a.family, a.address, a.prefixlen),
                )
        for lp in plan.links:
            up = {"up": True, "down": False}.get(lp.spec.state, lp.link.up)
            if up != lp.link.up or lp.link.index in plan.touched.flapped:
                await self._do(f"{lp.spec.field}.state", kernel.set_link(lp.link.index, up=up))
        if plan.touched.flapped:
            await self._readd_flapped(kernel, snap, plan, request.routes is None)
        for route in plan.route_removals:
            try:
                await kernel.del_route(route)
            except KernelError as exc:
                # ESRCH: gone already, with the link that went down or lost its address.
                if exc.errno != errno.ESRCH:
                    raise _failure(f"routes: removing {route.destination}", exc) from None
        for spec, entry in plan.routes:
            await self._do(spec.field, kernel.replace_route(entry))
        for where, entry in plan.neighbours:
            await self._do(where, kernel.replace_neighbour(entry))

    async def _readd_flapped(
        self, kernel: Kernel, snap: Snapshot, plan: Plan, routes: bool
    ) -> None:
        """A renamed link went down for a moment, taking its IPv4 routes and its neighbours:
        bring back those that were the host's (best effort: an address change may have made
        a gateway unreachable). Routes only when the request leaves the routes alone."""
        flapped = plan.touched.flapped
        if routes:
            present = set(await kernel.routes())
            for route in snap.routes:
                if route.ours and route.oif in flapped and route not in present:
                    try:
                        await kernel.add_route(route)
                    except KernelError as exc:
                        self._report(f"route {route.destination} lost in a rename: {exc.message}")
        present_neighbours = {n.key for n in await kernel.neighbours()}
        for key, n in snap.neighbours.items():
            if n.permanent and n.ifindex in flapped and key not in present_neighbours:
                try:
                    await kernel.replace_neighbour(n)
                except KernelError as exc:
                    self._report(f"neighbour {n.dst} lost in a rename: {exc.message}")

    async def _do(self, where: str, work: object) -> None:
        try:
            await work  # type: ignore[misc]
        except KernelError as exc:
            raise _failure(where, exc) from None

    def _write_files(self, request: NetworkRequest) -> name_files.Files:
        spec = request.name_resolution
        assert spec is not None
        hostname = spec.hostname or name_files.current_hostname()
        rendered = name_files.render(spec, hostname)
        try:
            self.files.write(rendered)
            if spec.hostname and spec.hostname != name_files.current_hostname():
                name_files.set_hostname(spec.hostname)
        except OSError as exc:
            raise Failure("INTERNAL", f"name_resolution: writing the files: {exc}") from None
        return rendered

    def _restore_files(self, before: name_files.Files, hostname: str) -> None:
        try:
            self.files.write(before)
            if name_files.current_hostname() != hostname:
                name_files.set_hostname(hostname)
        except OSError as exc:
            self._report(f"rollback: name files: {exc}")
