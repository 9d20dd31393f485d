"""The network commands of the ``bulkhead`` CLI, and the network options of ``sandbox up``.

bulkhead sandbox up web --net user -p 8080:80          # user-mode NIC, host 8080 -> guest 80
bulkhead sandbox up lab --net tap,netns=lab --network spec.json
bulkhead network ls web                                 # the guest's interfaces and routes
bulkhead network apply web spec.json                    # all or nothing
bulkhead network add-nic web tap,netns=lab              # hot-plug, configured by MAC
bulkhead network publish web 8081:81
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .network import DEFAULT_WAIT, NetworkSpec, NetworkState
from .sandbox import Sandbox


def add_up_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="BACKEND[,OPT=V]",
        help="a virtio-net NIC: user[,hostfwd=...,guestfwd=...] or tap[,netns=NS,subnet=...]",
    )
    p.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[ADDR:]HOSTPORT:PORT",
        help="forward a host port (on 127.0.0.1 unless ADDR) to the guest (user networking)",
    )
    p.add_argument(
        "--network",
        metavar="FILE",
        help="network spec (JSON) to apply once up; default: what the NICs imply",
    )


def up_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"nics": list(args.net), "publish": list(args.publish), "network": args.network}


def add_parsers(groups: Any) -> None:
    net = groups.add_parser("network", help="the sandbox's network").add_subparsers(
        metavar="COMMAND"
    )
    p = net.add_parser("ls", help="the guest's interfaces and routes")
    p.add_argument("sandbox")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = net.add_parser("apply", help="apply a network spec (JSON file), all or nothing")
    p.add_argument("sandbox")
    p.add_argument("file")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="S", help="for NICs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_apply)

    p = net.add_parser("nics", help="the sandbox's NICs as the host made them")
    p.add_argument("sandbox")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_nics)

    p = net.add_parser("add-nic", help="hot-plug a NIC and configure it in the guest")
    p.add_argument("sandbox")
    p.add_argument("nic", nargs="?", default="user", metavar="BACKEND[,OPT=V]")
    p.add_argument("--no-configure", action="store_true", help="plug it in, nothing more")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="S")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_add_nic)

    p = net.add_parser("rm-nic", help="unplug a hot-plugged NIC")
    p.add_argument("sandbox")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm_nic)

    p = net.add_parser("publish", help="forward a host port to the guest while it runs")
    p.add_argument("sandbox")
    p.add_argument("port", metavar="[ADDR:]HOSTPORT:PORT[/tcp|udp]")
    p.add_argument("--nic", metavar="NAME", help="user-mode NIC (default: the first)")
    p.set_defaults(func=cmd_publish)


def _sandbox(args: argparse.Namespace) -> Sandbox:
    return Sandbox.get(args.sandbox, state_dir=args.state_dir)


def cmd_ls(args: argparse.Namespace) -> int:
    sb = _sandbox(args)
    try:
        _print_state(sb.network.state(), args.json)
    finally:
        sb.close()
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    spec = NetworkSpec.load(args.file)
    sb = _sandbox(args)
    try:
        _print_state(sb.network.apply(spec, wait=args.wait), args.json)
    finally:
        sb.close()
    return 0


def cmd_nics(args: argparse.Namespace) -> int:
    nics = _sandbox(args).nics()
    if args.json:
        print(json.dumps([n.to_dict() for n in nics], indent=2))
        return 0
    rows = [("NAME", "BACKEND", "MAC", "GUEST", "HOST END", "FORWARDS")]
    for n in nics:
        where = f"{n.host_address} in {n.netns}" if n.backend == "tap" else n.host_address
        forwards = " ".join([*n.hostfwd, *(f"guest {g}" for g in n.guestfwd)]) or "-"
        rows.append((n.name, n.backend, n.mac, n.guest_interface, where, forwards))
    _table(rows)
    return 0


def cmd_add_nic(args: argparse.Namespace) -> int:
    sb = _sandbox(args)
    try:
        nic, interface = sb.add_nic(args.nic, configure=not args.no_configure, wait=args.wait)
    finally:
        sb.close()
    if args.json:
        out = nic.to_dict()
        if interface is not None:
            out["guest"] = {"name": interface.name, "addresses": list(interface.addresses)}
        print(json.dumps(out, indent=2))
        return 0
    guest = f" is {interface.name} ({', '.join(interface.addresses)})" if interface else ""
    print(f"{nic.name}: {nic.backend} NIC {nic.mac} plugged in{guest}")
    return 0


def cmd_rm_nic(args: argparse.Namespace) -> int:
    _sandbox(args).remove_nic(args.name)
    print(f"{args.name}: unplugged")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    rule = _sandbox(args).publish(args.port, nic=args.nic)
    print(f"published {rule}")
    return 0


def _print_state(state: NetworkState, as_json: bool) -> None:
    if as_json:
        print(json.dumps(state.to_dict(), indent=2))
        return
    rows = [("IF", "NAME", "MAC", "MTU", "STATE", "ADDRESSES")]
    for i in state.interfaces:
        state_text = i.state + ("" if i.carrier or i.state != "up" else " (no carrier)")
        rows.append((str(i.index), i.name, i.mac, str(i.mtu), state_text, " ".join(i.addresses)))
    _table(rows)
    print()
    rows = [("DESTINATION", "GATEWAY", "DEVICE", "SOURCE", "SCOPE", "METRIC", "PROTO")]
    for r in state.routes:
        rows.append(
            (r.destination, r.gateway or "-", r.device or "-", r.source or "-",
             r.scope, str(r.metric), r.protocol)
        )  # fmt: skip
    _table(rows)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
