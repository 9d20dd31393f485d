"""A throwaway network (and UTS) namespace with an event loop in it, for native network tests.

Network and UTS namespaces belong to a thread, not a process: a thread that unshares them
gets a namespace of its own (empty but for ``lo``) while the rest of the test process keeps
the host's. ``NetnsLoop`` is such a thread running an asyncio loop; coroutines run on it
open their netlink sockets in the namespace. ``ip(...)`` runs iproute2 in the same namespace
through ``nsenter``, so tests check what the agent did with a tool that shares no code with
it. The namespace goes away with the thread.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from bulkhead_agent.linux import namespaces as ns

T = TypeVar("T")


class NetnsLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.tid = 0
        self._thread = threading.Thread(target=self._main, name="netns", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            ns.unshare(ns.CLONE_NEWNET | ns.CLONE_NEWUTS)
            self.tid = threading.get_native_id()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.tid}/ns/net"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def ip(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            ["nsenter", f"--net={self.netns_path}", "ip", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def ip_json(self, *args: str) -> Any:
        return json.loads(self.ip("-j", *args) or "[]")

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # --- what tests look at ---------------------------------------------------------------

    def add_veth(self, name: str, mac: str, peer: str) -> None:
        """A NIC stand-in: one end of a veth pair, with ``mac`` (the peer keeps a random one)."""
        self.ip("link", "add", name, "address", mac, "type", "veth", "peer", "name", peer)

    def addresses(self, dev: str) -> set[str]:
        """``addr/prefix`` on ``dev``, IPv6 link-local left out."""
        found = set()
        for link in self.ip_json("addr", "show", "dev", dev):
            for a in link.get("addr_info", []):
                if not a["local"].startswith("fe80:"):
                    found.add(f"{a['local']}/{a['prefixlen']}")
        return found

    def sysctl(self, path: str) -> str:
        """A /proc/sys value as seen in the namespace (``net/ipv6/conf/eth0/accept_ra``)."""
        result = subprocess.run(
            ["nsenter", f"--net={self.netns_path}", "cat", f"/proc/sys/{path}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout.strip()

    def link(self, dev: str) -> dict[str, Any]:
        return self.ip_json("link", "show", "dev", dev)[0]

    def names(self) -> set[str]:
        return {link["ifname"] for link in self.ip_json("link", "show")}

    def routes(self, family: str = "-4") -> set[tuple[str, str, str]]:
        """``(dst, gateway, dev)`` of the main table, kernel-made routes left out."""
        return {
            (r["dst"], r.get("gateway", ""), r.get("dev", ""))
            for r in self.ip_json(family, "route", "show", "table", "main")
            if r.get("protocol") != "kernel"
        }

    def state(self) -> tuple[Any, ...]:
        """Everything a rollback must put back, to compare before and after."""
        links = sorted(
            (link["ifname"], link["address"], link["mtu"], "UP" in link["flags"])
            for link in self.ip_json("link", "show")
        )
        addrs = sorted(
            (link["ifname"], a["local"], a["prefixlen"])
            for link in self.ip_json("addr", "show")
            for a in link.get("addr_info", [])
        )
        routes = sorted(
            json.dumps(_without_linkdown(r), sort_keys=True)
            for family in ("-4", "-6")
            for r in self.ip_json(family, "route", "show", "table", "main")
        )
        neigh = sorted(
            json.dumps(n, sort_keys=True)
            for n in self.ip_json("neigh", "show")
            if "PERMANENT" in n.get("state", [])
        )
        return (links, addrs, routes, neigh)


def _without_linkdown(route: dict[str, Any]) -> dict[str, Any]:
    # "linkdown" tells whether the device had a carrier when the kernel last looked (at the
    # route's creation, or the link's last up or down): the same route either way.
    flags = [f for f in route.get("flags", []) if f != "linkdown"]
    return {**route, "flags": flags}
