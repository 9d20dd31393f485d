"""Keep randomness from ever blocking the boot.

Python itself reads /dev/urandom (the image ships the node) when getrandom() is not ready,
and virtio_rng, once loaded, lets the kernel credit the host's entropy by itself. Init adds
what is cheap: it mixes a few per-boot values into the pool (uncredited, so no false
claims), and reports how ready the pool is. Nothing here can block.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .log import Logger

ENTROPY_AVAIL = "/proc/sys/kernel/random/entropy_avail"
HWRNG_CURRENT = "/sys/class/misc/hw_random/rng_current"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def crng_ready() -> bool:
    """Whether getrandom() would return at once (6.1 blocks until the pool is initialised)."""
    try:
        os.getrandom(1, os.GRND_NONBLOCK)
    except BlockingIOError:
        return False
    except OSError:
        return False
    return True


def stir(log: Logger, extra: bytes = b"") -> bool:
    """Mix per-boot values into the pool and log its state; return whether it is ready."""
    seed = b"%d %d %d %d " % (
        time.time_ns(),
        time.clock_gettime_ns(time.CLOCK_BOOTTIME),
        time.perf_counter_ns(),
        os.getpid(),
    )
    try:
        # A write to /dev/urandom mixes without crediting and never blocks.
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, seed + extra)
        finally:
            os.close(fd)
    except OSError as exc:
        log.debug(f"cannot write /dev/urandom: {exc}")
    ready = crng_ready()
    hwrng = _read(HWRNG_CURRENT)
    log.debug(f"entropy: pool ready {ready}, entropy_avail {_read(ENTROPY_AVAIL)}, hwrng {hwrng}")
    if not ready:
        log.info(f"kernel random pool not initialised yet (hwrng: {hwrng}); getrandom() may block")
    return ready
