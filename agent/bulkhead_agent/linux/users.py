"""Supplementary groups: ``setgroups(2)`` (setuid/setgid are in ``os``)."""

from __future__ import annotations

from .libc import check, libc


def setgroups(gids: list[int] | tuple[int, ...]) -> None:
    """Replace the supplementary groups; an empty list drops them all."""
    import ctypes

    array = (ctypes.c_uint32 * len(gids))(*gids)
    check(libc().setgroups(len(gids), array), f"setgroups({list(gids)})")
