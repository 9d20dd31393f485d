"""pyroute2, imported at the first network request, and only the parts the agent uses.

``import pyroute2`` runs the package's ``__init__``, which imports every API it has (NDB and
with it sqlite3, IPVS, nl80211, WireGuard, 9p, ...): ~300 ms and ~12 MiB natively, several
times that under emulation. The agent needs ``AsyncIPRoute`` alone. So the package is
registered as a bare namespace (its ``__init__`` not run) and only ``pyroute2.iproute.linux``
and what it imports itself are loaded: about a third of the time and half the memory.
pyroute2's own modules import their siblings by full name, never from the package's
top-level names, so nothing they need is missing.

Nothing else in the agent imports pyroute2 (the guest's other code gets this same module); if
something ever imports the full package first, that is used as it is.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from typing import Any

_loaded: types.SimpleNamespace | None = None
import_seconds = 0.0  # how long the first load took (GetGuestDetails-style facts for the bench)


def load() -> types.SimpleNamespace:
    """``AsyncIPRoute`` and ``NetlinkError``, importing them the first time."""
    global _loaded, import_seconds
    if _loaded is not None:
        return _loaded
    started = time.perf_counter()
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("pyroute2 is not installed")
        package = types.ModuleType("pyroute2")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        sys.modules["pyroute2"] = package
    from pyroute2.iproute.linux import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    _loaded = types.SimpleNamespace(AsyncIPRoute=AsyncIPRoute, NetlinkError=NetlinkError)
    import_seconds = time.perf_counter() - started
    return _loaded


def loaded() -> bool:
    return _loaded is not None


def open_rtnl() -> Any:
    """A new ``AsyncIPRoute`` (a netlink socket in the caller's network namespace)."""
    return load().AsyncIPRoute()
