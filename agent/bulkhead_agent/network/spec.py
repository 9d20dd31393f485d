"""Network requests turned into checked, plain values, before anything touches the kernel.

Every check that needs no kernel state happens here, and each failure is a
:class:`Failure` (``INVALID_ARGUMENT``) whose message starts with the request field it is
about: ``interfaces[1].addresses[0]: '10.0.0.300/24' is not an address with a prefix``.
Checks against the kernel's state (which MAC exists, which names and addresses are taken)
are ``apply``'s. The parsers take the protobuf messages but only read their attributes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ..containers.errors import Failure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

AF_INET, AF_INET6 = 2, 10
# <linux/rtnetlink.h> rt_scope_t
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
# The proto enum RouteScope -> the kernel's scope; UNSPECIFIED (0) is decided per route.
SCOPES = {1: RT_SCOPE_UNIVERSE, 2: RT_SCOPE_LINK, 3: RT_SCOPE_HOST}
# The proto enum LinkState.
STATES = {0: "", 1: "up", 2: "down"}
# The kernel's default metric for IPv6 routes added without one (IP6_RT_PRIO_USER).
IPV6_DEFAULT_METRIC = 1024

MAX_WAIT_MS = 300_000
MTU_RANGE = (68, 65535)  # the IPv4 minimum; a device refuses what it cannot do itself
MAX_NAMESERVERS = 3  # glibc's MAXNS: more are ignored silently, so refuse them
MAX_HOSTNAME = 64  # HOST_NAME_MAX

_MAC = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_OPTION = re.compile(r"[a-z][a-z0-9-]*(:[0-9]{1,4})?")


def invalid(field: str, message: str) -> Failure:
    return Failure("INVALID_ARGUMENT", f"{field}: {message}")


@dataclass(frozen=True)
class InterfaceSpec:
    field: str  # where it came from in the request, for error messages
    mac: str  # lower case, colon separated
    name: str  # "" keeps the name
    mtu: int  # 0 keeps the MTU
    addresses: tuple[IPInterface, ...]  # the complete set (IPv6 link-local aside)
    state: str  # "up", "down" or "" (keep)


@dataclass(frozen=True)
class RouteSpec:
    field: str
    family: int
    destination: IPNetwork
    gateway: IPAddress | None
    device: str  # "" lets the kernel find it from the gateway
    source: IPAddress | None
    scope: int  # the kernel's RT_SCOPE_*
    metric: int  # as the kernel will store it (IPv6 0 -> 1024)

    @property
    def key(self) -> tuple[int, str, int]:
        """What makes a route unique in a table (no multipath): family, prefix, metric."""
        return (self.family, str(self.destination), self.metric)


@dataclass(frozen=True)
class NeighborSpec:
    field: str
    family: int
    address: IPAddress
    mac: str
    device: str


@dataclass(frozen=True)
class HostEntrySpec:
    address: IPAddress
    names: tuple[str, ...]


@dataclass(frozen=True)
class NameResolutionSpec:
    nameservers: tuple[IPAddress, ...]
    search: tuple[str, ...]
    options: tuple[str, ...]
    hosts: tuple[HostEntrySpec, ...]
    hostname: str  # "" keeps it


@dataclass(frozen=True)
class NetworkRequest:
    """One change, all or nothing: ``None`` routes or name resolution mean "leave alone"."""

    interfaces: tuple[InterfaceSpec, ...] = ()
    routes: tuple[RouteSpec, ...] | None = None
    neighbors: tuple[NeighborSpec, ...] = ()
    name_resolution: NameResolutionSpec | None = None
    wait_s: float = 0.0


# --- single values ---------------------------------------------------------------------------


def parse_mac(text: str, field: str) -> str:
    if not _MAC.fullmatch(text):
        raise invalid(field, f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
    return text.lower().replace("-", ":")


def check_ifname(name: str, field: str) -> str:
    """The kernel's rules (dev_valid_name): 1-15 bytes, not . or .., no / : or whitespace."""
    if (
        not name
        or len(name.encode()) > 15
        or name in (".", "..")
        or any(c in name for c in "/:")
        or any(c.isspace() for c in name)
    ):
        raise invalid(field, f"{name!r} is not an interface name (1-15 bytes, no / : or space)")
    return name


def parse_ip(text: str, field: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise invalid(field, f"{text!r} is not an IPv4 or IPv6 address") from None
    if address.is_unspecified or address.is_multicast:
        raise invalid(field, f"{text} cannot be used here (unspecified or multicast)")
    return address


def parse_interface_address(text: str, field: str) -> IPInterface:
    if "/" not in text:
        raise invalid(field, f"{text!r} has no prefix length (write it as 10.0.2.15/24)")
    try:
        value = ipaddress.ip_interface(text)
    except ValueError:
        raise invalid(field, f"{text!r} is not an address with a prefix length") from None
    ip = value.ip
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise invalid(field, f"{text} cannot be a NIC's address (unspecified, multicast, loopback)")
    if ip.version == 6 and ip.is_link_local:
        raise invalid(field, f"{text}: IPv6 link-local addresses are the kernel's to assign")
    return value


def parse_destination(text: str, gateway: IPAddress | None, field: str) -> IPNetwork:
    if text == "default":
        return ipaddress.ip_network("::/0" if gateway and gateway.version == 6 else "0.0.0.0/0")
    if not text:
        raise invalid(field, "is empty (use 'default' for the default route)")
    try:
        return ipaddress.ip_network(text)  # strict: 10.1.0.5/16 has host bits set
    except ValueError as exc:
        raise invalid(field, f"{text!r} is not a network: {exc}") from None


def check_domain(name: str, field: str, *, what: str = "domain name") -> str:
    if len(name) > 253 or not _DOMAIN.fullmatch(name):
        raise invalid(field, f"{name!r} is not a valid {what}")
    return name


# --- messages --------------------------------------------------------------------------------


def parse_interface(msg: Any, field: str) -> InterfaceSpec:
    mac = parse_mac(msg.mac, f"{field}.mac")
    if mac == "00:00:00:00:00:00":
        raise invalid(f"{field}.mac", "00:00:00:00:00:00 does not name a NIC")
    name = check_ifname(msg.name, f"{field}.name") if msg.name else ""
    mtu = int(msg.mtu)
    if mtu and not MTU_RANGE[0] <= mtu <= MTU_RANGE[1]:
        raise invalid(f"{field}.mtu", f"{mtu} is not in {MTU_RANGE[0]}..{MTU_RANGE[1]}")
    addresses: list[IPInterface] = []
    seen: dict[IPAddress, int] = {}
    for i, text in enumerate(msg.addresses):
        where = f"{field}.addresses[{i}]"
        value = parse_interface_address(text, where)
        if value.ip in seen:
            raise invalid(where, f"{value.ip} is also addresses[{seen[value.ip]}]")
        seen[value.ip] = i
        addresses.append(value)
    state = STATES.get(int(msg.state))
    if state is None:
        raise invalid(f"{field}.state", f"unknown link state {msg.state}")
    return InterfaceSpec(field, mac, name, mtu, tuple(addresses), state)


def parse_route(msg: Any, field: str) -> RouteSpec:
    gateway = parse_ip(msg.gateway, f"{field}.gateway") if msg.gateway else None
    destination = parse_destination(msg.destination, gateway, f"{field}.destination")
    family = AF_INET if destination.version == 4 else AF_INET6
    if gateway is not None and gateway.version != destination.version:
        raise invalid(f"{field}.gateway", f"{gateway} is not of {destination}'s family")
    device = check_ifname(msg.device, f"{field}.device") if msg.device else ""
    if not device and gateway is None:
        raise invalid(field, "needs a device, a gateway or both")
    source = parse_ip(msg.source, f"{field}.source") if msg.source else None
    if source is not None and source.version != destination.version:
        raise invalid(f"{field}.source", f"{source} is not of {destination}'s family")
    scope_value = int(msg.scope)
    if scope_value == 0:
        scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
    elif scope_value in SCOPES:
        scope = SCOPES[scope_value]
    else:
        raise invalid(f"{field}.scope", f"unknown route scope {scope_value}")
    if gateway is not None and scope == RT_SCOPE_HOST:
        raise invalid(f"{field}.scope", "a host-scope route cannot have a gateway")
    metric = int(msg.metric)
    if family == AF_INET6 and metric == 0:
        metric = IPV6_DEFAULT_METRIC
    return RouteSpec(field, family, destination, gateway, device, source, scope, metric)


def parse_routes(msgs: Any, field: str) -> tuple[RouteSpec, ...]:
    routes: list[RouteSpec] = []
    seen: dict[tuple[int, str, int], str] = {}
    for i, msg in enumerate(msgs):
        route = parse_route(msg, f"{field}[{i}]")
        if route.key in seen:
            raise invalid(
                route.field,
                f"{route.destination} with metric {route.metric} is also {seen[route.key]}",
            )
        seen[route.key] = route.field
        routes.append(route)
    return tuple(routes)


def parse_neighbors(msgs: Any, field: str) -> tuple[NeighborSpec, ...]:
    neighbors: list[NeighborSpec] = []
    seen: dict[tuple[str, IPAddress], str] = {}
    for i, msg in enumerate(msgs):
        where = f"{field}[{i}]"
        address = parse_ip(msg.address, f"{where}.address")
        mac = parse_mac(msg.mac, f"{where}.mac")
        if not msg.device:
            raise invalid(f"{where}.device", "is empty: name the interface it is reached on")
        device = check_ifname(msg.device, f"{where}.device")
        if (device, address) in seen:
            raise invalid(where, f"{address} on {device} is also {seen[(device, address)]}")
        seen[(device, address)] = where
        family = AF_INET if address.version == 4 else AF_INET6
        neighbors.append(NeighborSpec(where, family, address, mac, device))
    return tuple(neighbors)


def parse_name_resolution(msg: Any, field: str) -> NameResolutionSpec:
    if len(msg.nameservers) > MAX_NAMESERVERS:
        raise invalid(
            f"{field}.nameservers",
            f"{len(msg.nameservers)} given; resolvers read at most {MAX_NAMESERVERS}",
        )
    nameservers = tuple(
        parse_ip(text, f"{field}.nameservers[{i}]") for i, text in enumerate(msg.nameservers)
    )
    search = tuple(check_domain(name, f"{field}.search[{i}]") for i, name in enumerate(msg.search))
    options = []
    for i, option in enumerate(msg.options):
        if not _OPTION.fullmatch(option):
            raise invalid(f"{field}.options[{i}]", f"{option!r} is not a resolv.conf option")
        options.append(option)
    hosts = []
    for i, entry in enumerate(msg.hosts):
        where = f"{field}.hosts[{i}]"
        address = parse_ip(entry.address, f"{where}.address")
        if not entry.names:
            raise invalid(f"{where}.names", "is empty: give at least one name")
        names = tuple(
            check_domain(name, f"{where}.names[{j}]", what="host name")
            for j, name in enumerate(entry.names)
        )
        hosts.append(HostEntrySpec(address, names))
    hostname = msg.hostname
    if hostname:
        if len(hostname) > MAX_HOSTNAME:
            raise invalid(f"{field}.hostname", f"longer than {MAX_HOSTNAME} characters")
        check_domain(hostname, f"{field}.hostname", what="host name")
    return NameResolutionSpec(nameservers, search, tuple(options), tuple(hosts), hostname)


def parse_wait(wait_ms: int, field: str) -> float:
    if wait_ms > MAX_WAIT_MS:
        raise invalid(field, f"{wait_ms} ms is longer than the {MAX_WAIT_MS} ms allowed")
    return wait_ms / 1000


def parse_apply(msg: Any) -> NetworkRequest:
    """``ApplyNetworkRequest``: every part checked, and the parts checked against each other."""
    interfaces = tuple(parse_interface(m, f"interfaces[{i}]") for i, m in enumerate(msg.interfaces))
    macs: dict[str, str] = {}
    names: dict[str, str] = {}
    owners: dict[IPAddress, str] = {}
    for spec in interfaces:
        if spec.mac in macs:
            raise invalid(f"{spec.field}.mac", f"{spec.mac} is also {macs[spec.mac]}.mac")
        macs[spec.mac] = spec.field
        if spec.name:
            if spec.name in names:
                where = names[spec.name]
                raise invalid(f"{spec.field}.name", f"{spec.name!r} is also {where}.name")
            names[spec.name] = spec.field
        for i, address in enumerate(spec.addresses):
            if address.ip in owners:
                raise invalid(
                    f"{spec.field}.addresses[{i}]", f"{address.ip} is also on {owners[address.ip]}"
                )
            owners[address.ip] = spec.field
    routes = parse_routes(msg.routes.routes, "routes") if msg.HasField("routes") else None
    neighbors = parse_neighbors(msg.neighbors, "neighbors")
    name_resolution = (
        parse_name_resolution(msg.name_resolution, "name_resolution")
        if msg.HasField("name_resolution")
        else None
    )
    return NetworkRequest(
        interfaces, routes, neighbors, name_resolution, parse_wait(msg.wait_ms, "wait_ms")
    )
