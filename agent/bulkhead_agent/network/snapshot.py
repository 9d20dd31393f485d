"""The kernel's network state before a change, and putting it back after a failed one.

Restoring compares what is there now with the snapshot and undoes the differences, for the
links and neighbours the change touched and for the whole main routing table (a link going
down takes its IPv4 routes with it, wherever they came from). It is best effort by nature:
each step that fails is reported and the others still run, so one stubborn route cannot
keep an address or a name from coming back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import sysctl
from .kernel import RTN_UNICAST, Address, Kernel, KernelError, Link, Neighbour, RouteEntry


@dataclass(frozen=True)
class Snapshot:
    links: dict[int, Link]
    addresses: tuple[Address, ...]
    routes: tuple[RouteEntry, ...]  # the main table
    neighbours: dict[tuple[int, int, str], Neighbour]

    @classmethod
    async def take(cls, kernel: Kernel) -> Snapshot:
        links = {link.index: link for link in await kernel.links()}
        addresses = tuple(await kernel.addresses())
        routes = tuple(await kernel.routes())
        neighbours = {n.key: n for n in await kernel.neighbours()}
        return cls(links, addresses, routes, neighbours)

    def addresses_of(self, index: int) -> set[Address]:
        return {a for a in self.addresses if a.index == index and not a.kernel_managed}

    def link_named(self, name: str) -> Link | None:
        return next((link for link in self.links.values() if link.name == name), None)


@dataclass
class Touched:
    """What a change may have altered, so that only that is put back."""

    links: set[int] = field(default_factory=set)
    neighbours: set[tuple[int, int, str]] = field(default_factory=set)
    routes: bool = False
    flapped: set[int] = field(default_factory=set)  # links taken down to be renamed
    sysctls: dict[int, dict[str, str]] = field(default_factory=dict)  # link -> IPv6 settings


async def restore(
    kernel: Kernel, snap: Snapshot, touched: Touched, report: Callable[[str], None]
) -> None:
    """Undo every difference between now and ``snap`` in what ``touched`` names."""
    await _restore_links(kernel, snap, touched.links, report)
    for index, values in touched.sysctls.items():
        name = snap.links[index].name  # its name again, after the links are restored
        try:
            sysctl.write(name, values)
        except OSError as exc:
            report(f"rollback: IPv6 settings of {name}: {exc}")
    if touched.routes or touched.links:
        await _restore_routes(kernel, snap, report)
    # A link taken down loses its neighbours, permanent ones included.
    lost = {k for k, n in snap.neighbours.items() if n.ifindex in touched.links and n.permanent}
    await _restore_neighbours(kernel, snap, touched.neighbours | lost, report)


async def _attempt(step: str, work: object, report: Callable[[str], None]) -> bool:
    try:
        await work  # type: ignore[misc]
        return True
    except KernelError as exc:
        report(f"rollback: {step}: {exc.message}")
        return False


async def _restore_links(
    kernel: Kernel, snap: Snapshot, indexes: Iterable[int], report: Callable[[str], None]
) -> None:
    now = {link.index: link for link in await kernel.links()}
    addresses = await kernel.addresses()
    for index in sorted(indexes):
        before, current = snap.links.get(index), now.get(index)
        if before is None or current is None:
            continue  # made or unplugged meanwhile: nothing to put back
        up = current.up
        if current.name != before.name:
            if up:
                await _attempt(f"{current.name} down", kernel.set_link(index, up=False), report)
                up = False
            await _attempt(
                f"rename {current.name} to {before.name}",
                kernel.set_link(index, name=before.name),
                report,
            )
        if current.mtu != before.mtu:
            await _attempt(
                f"{before.name} mtu {before.mtu}", kernel.set_link(index, mtu=before.mtu), report
            )
        had = snap.addresses_of(index)
        has = {a for a in addresses if a.index == index and not a.kernel_managed}
        for a in sorted(has - had, key=_address_order):
            await _attempt(
                f"remove {a.text} from {before.name}",
                kernel.del_address(index, a.family, a.address, a.prefixlen),
                report,
            )
        for a in sorted(had - has, key=_address_order):
            await _attempt(
                f"add {a.text} to {before.name}",
                kernel.add_address(index, a.family, a.address, a.prefixlen),
                report,
            )
        if up != before.up:
            state = "up" if before.up else "down"
            await _attempt(f"{before.name} {state}", kernel.set_link(index, up=before.up), report)


async def _restore_routes(kernel: Kernel, snap: Snapshot, report: Callable[[str], None]) -> None:
    then = {r for r in snap.routes if r.type == RTN_UNICAST}
    now = {r for r in await kernel.routes() if r.type == RTN_UNICAST}
    for route in sorted(now - then, key=_route_order):
        await _attempt(f"remove route {route.destination}", kernel.del_route(route), report)
    # Directly connected routes first: a gateway must be reachable before a route uses it.
    # A second pass catches gateways reached through another restored route.
    missing = sorted(then - now, key=_route_order)
    for _pass in range(2):
        failed = []
        for route in missing:
            try:
                await kernel.add_route(route)
            except KernelError as exc:
                failed.append((route, exc))
        missing = [route for route, _ in failed]
        if not missing:
            return
    for route, exc in failed:
        report(f"rollback: route {route.destination}: {exc.message}")


async def _restore_neighbours(
    kernel: Kernel,
    snap: Snapshot,
    keys: Iterable[tuple[int, int, str]],
    report: Callable[[str], None],
) -> None:
    for key in sorted(keys):
        before = snap.neighbours.get(key)
        if before is not None:
            if before.permanent:  # learnt ones come back by themselves
                await _attempt(f"neighbour {before.dst}", kernel.replace_neighbour(before), report)
            continue
        family, ifindex, dst = key
        try:
            await kernel.del_neighbour(Neighbour(family, ifindex, dst, "", 0))
        except KernelError as exc:
            if exc.errno != 2:  # ENOENT: it was never added
                report(f"rollback: remove neighbour {dst}: {exc.message}")


def _address_order(a: Address) -> tuple[int, str, int]:
    return (a.family, a.address, a.prefixlen)


def _route_order(r: RouteEntry) -> tuple[bool, int, str, int]:
    return (bool(r.gateway), r.family, r.destination, r.priority)
