"""CRI's pod network, carried into the pod's VM.

A CNI plugin sets the pod up in a network namespace on the host: a veth holding the pod's
address, routes towards the node. The VM has to be that pod on the network. For each of the
namespace's interfaces with an address, a tap in the namespace takes over its traffic (tc
redirects every frame both ways: ``bulkhead.nics`` ``mirror``), and the guest's NIC gets the
interface's MAC, addresses and MTU, and the namespace's routes. The namespace's own stack then
sees nothing on that interface; the guest answers for the pod's addresses (Kata's "tcfilter"
model). Kubernetes, CNI and the node's routing stay as they are for runc.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

from bulkhead import netns
from bulkhead.network import Interface, NetworkSpec, Route
from bulkhead.nics import Nic

log = logging.getLogger(__name__)


def network_namespace(spec: dict[str, Any]) -> str:
    """The host network namespace the spec puts the container in ("" for none)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return ""


def pod_network(path: str) -> tuple[list[Nic], NetworkSpec]:
    """The NICs that take over the namespace at ``path``, and the guest's spec to match it."""
    links = json.loads(netns.ip(path, "-j", "addr", "show") or "[]")
    routes = json.loads(netns.ip(path, "-j", "route", "show") or "[]")
    routes6 = json.loads(netns.ip(path, "-6", "-j", "route", "show") or "[]")
    nics: list[Nic] = []
    interfaces: list[Interface] = []
    for link in links:
        v4 = [a for a in link.get("addr_info", []) if a.get("family") == "inet"]
        if link.get("link_type") != "ether" or not v4:
            continue  # lo, and what the plugin left unaddressed
        name = link["ifname"]
        network = ipaddress.IPv4Interface(f"{v4[0]['local']}/{v4[0]['prefixlen']}").network
        gateway = next((r["gateway"] for r in routes if r.get("dst") == "default"
                        and r.get("dev") == name and "gateway" in r), "")  # fmt: skip
        in_net = gateway and ipaddress.IPv4Address(gateway) in network
        nics.append(Nic.make(
            "tap", name=f"pod{len(nics)}", mac=link["address"], subnet=str(network),
            guest_address=v4[0]["local"], host_address=gateway if in_net else "",
            netns_name=path, tap=f"bh-pod{len(nics)}", mirror=name,
        ))  # fmt: skip
        addresses = tuple(
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("family") in ("inet", "inet6") and a.get("scope") == "global"
        )
        interfaces.append(Interface(link["address"], addresses, name=name,
                                    mtu=int(link.get("mtu") or 0)))  # fmt: skip
    names = {i.name for i in interfaces}
    # The kernel makes the subnet routes of the addresses itself.
    guest_routes = tuple(
        _route(r, v6)
        for v6, table in ((False, routes), (True, routes6))
        for r in table
        if r.get("dev") in names and r.get("protocol") != "kernel"
    )
    spec = NetworkSpec(interfaces=tuple(interfaces), routes=guest_routes)
    log.info("pod network %s: %s", path, [(n.mirror, n.guest_interface) for n in nics])
    return nics, spec


def _route(r: dict[str, Any], v6: bool) -> Route:
    scope = r.get("scope", "")
    destination = "::/0" if v6 and r["dst"] == "default" else r["dst"]
    return Route(destination, gateway=r.get("gateway", ""), device=r.get("dev", ""),
                 scope="" if scope == "global" else scope)  # fmt: skip
