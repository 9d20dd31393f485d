"""Load the image's kernel modules, in the order the image builder wrote down.

The list (``/lib/modules/bulkhead-load.txt``) is already dependency-sorted and the
modules are plain .ko files, so there is no modprobe, no depmod data and no decompression:
one open() and one finit_module() each.
"""

from __future__ import annotations

import errno
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .log import Logger

LOAD_LIST = "/lib/modules/bulkhead-load.txt"
MODULES_DIR = "/lib/modules"


def module_name(path: str) -> str:
    """The kernel's name for a module file: basename, no .ko, '-' spelled '_'."""
    base = os.path.basename(path)
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def read_list(path: str = LOAD_LIST) -> list[str]:
    with open(path) as f:
        return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]


def load(
    log: Logger,
    listing: str = LOAD_LIST,
    base: str | None = None,
    loader: Callable[[int], None] | None = None,
) -> list[str]:
    """Load every listed module; return the names that are now loaded.

    A module the kernel already has (EEXIST) counts as loaded. A failure is logged and
    the rest still load: a missing driver costs one feature, never the boot.
    """
    if loader is None:
        from .libc import finit_module as loader
    if base is None:
        base = os.path.join(MODULES_DIR, os.uname().release)
    try:
        paths = read_list(listing)
    except FileNotFoundError:
        log.debug(f"no {listing}: no modules to load")
        return []
    except OSError as exc:
        log.error(f"cannot read {listing}: {exc}")
        return []
    start = time.monotonic()
    loaded: list[str] = []
    for rel in paths:
        name = module_name(rel)
        try:
            fd = os.open(os.path.join(base, rel), os.O_RDONLY | os.O_CLOEXEC)
            try:
                loader(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                log.warning(f"cannot load module {name} ({rel}): {exc.strerror or exc}")
                continue
        loaded.append(name)
    took = (time.monotonic() - start) * 1000
    log.info(f"loaded {len(loaded)}/{len(paths)} modules in {took:.0f} ms: {' '.join(loaded)}")
    return loaded
