"""Host and domain name of the current UTS namespace."""

from __future__ import annotations

from .libc import check, libc


def sethostname(name: str) -> None:
    raw = name.encode()
    check(libc().sethostname(raw, len(raw)), f"sethostname({name!r})")


def setdomainname(name: str) -> None:
    raw = name.encode()
    check(libc().setdomainname(raw, len(raw)), f"setdomainname({name!r})")
