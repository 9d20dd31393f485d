"""Waiting for NICs by MAC address: at once when they are there, with a deadline when not.

A NIC the host hot-plugs a moment before asking for it to be configured shows up when
virtio-net has probed it; the kernel then announces the new link (RTM_NEWLINK) to the
link multicast group. The waiter subscribes to that group *before* it lists the links, so a
link that appears in between still wakes it, and lists again on every announcement until
each MAC is found or the deadline passes. Never a sleep-and-look loop.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

from .kernel import Link

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1


async def wait_for_macs(
    list_links: Callable[[], Awaitable[list[Link]]],
    macs: Iterable[str],
    timeout: float,
) -> tuple[dict[str, Link], list[str]]:
    """``(found by MAC, missing MACs)`` once all are there or ``timeout`` seconds have passed."""
    wanted = set(macs)
    found = _match(await list_links(), wanted)
    if len(found) == len(wanted) or timeout <= 0:
        return found, sorted(wanted - found.keys())
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    events = _subscribe()
    try:
        # Listed again after subscribing: an announcement before it would have been missed.
        found = _match(await list_links(), wanted)
        while len(found) < len(wanted):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(loop.sock_recv(events, 65536), remaining)
            except TimeoutError:
                break
            except OSError:
                pass  # ENOBUFS: announcements were lost; listing below catches up anyway
            _drain(events)
            found = _match(await list_links(), wanted)
    finally:
        events.close()
    return found, sorted(wanted - found.keys())


def _subscribe() -> socket.socket:
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        NETLINK_ROUTE,
    )  # fmt: skip
    try:
        sock.bind((0, RTMGRP_LINK))
    except OSError:
        sock.close()
        raise
    return sock


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue  # ENOBUFS again: keep draining


def _match(links: list[Link], wanted: set[str]) -> dict[str, Link]:
    return {link.mac: link for link in links if link.mac in wanted}
