"""The documented ``bulkhead.*`` kernel command-line options.

Pure and tiny: PID 1 imports it before anything else, and the agent reuses it.
A bad option never stops the boot; it is reported and the default is kept.
"""

from __future__ import annotations

LOG_LEVELS = ("debug", "info", "warning", "error")
# Validation by hand and a plain class, not ``re`` and ``dataclasses``: PID 1 imports this
# module on the boot path, and those two (``dataclasses`` pulls in ``inspect``) made it cost
# ~30 ms natively instead of ~0.6 ms; imports run some 25 times slower under TCG.
_ASCII_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_HOSTNAME_CHARS = _ASCII_ALNUM | {"-"}
_PORT_NAME_CHARS = _ASCII_ALNUM | {".", "_", "-"}


# In declaration order: positional arguments, repr and comparison follow it.
_FIELDS = (
    "log",
    "vsock_port",
    "serial_port",
    "tcp_port",
    "debug_console",
    "hostname",
    "agent_restart_max_ms",
    "bench",
)


class Config:
    """The parsed options: immutable, and compared and printed by value like a dataclass."""

    __slots__ = _FIELDS

    log: str
    vsock_port: int  # 0: off
    serial_port: str  # "": off
    tcp_port: int  # 0: off (development only)
    debug_console: bool
    hostname: str
    agent_restart_max_ms: int
    bench: bool  # benchmark aids in the agent (bench/containers.py); never in production

    def __init__(
        self,
        log: str = "info",
        vsock_port: int = 1024,
        serial_port: str = "bulkhead.agent",
        tcp_port: int = 0,
        debug_console: bool = False,
        hostname: str = "bulkhead",
        agent_restart_max_ms: int = 5000,
        bench: bool = False,
    ) -> None:
        values = (
            log,
            vsock_port,
            serial_port,
            tcp_port,
            debug_console,
            hostname,
            agent_restart_max_ms,
            bench,
        )
        for name, value in zip(_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Config is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Config is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"Config({inner})"


def _int(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError("expected a decimal number")
    return int(value, 10)


def _port(value: str) -> int:
    port = _int(value)
    if port > 0xFFFFFFFF:
        raise ValueError("out of range 0..4294967295")
    return port


def _tcp_port(value: str) -> int:
    port = _port(value)
    if port > 65535:
        raise ValueError("out of range 0..65535")
    return port


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("on", "1", "yes", "true"):
        return True
    if v in ("off", "0", "no", "false"):
        return False
    raise ValueError("expected on or off")


def _log(value: str) -> str:
    v = value.lower()
    if v not in LOG_LEVELS:
        raise ValueError("expected one of " + ", ".join(LOG_LEVELS))
    return v


def _serial(value: str) -> str:
    if value.lower() == "off":
        return ""
    if not (1 <= len(value) <= 64 and set(value) <= _PORT_NAME_CHARS):
        raise ValueError("expected a port name of letters, digits, '.', '_', '-'")
    return value


def _hostname(value: str) -> str:
    ok = (
        1 <= len(value) <= 63
        and set(value) <= _HOSTNAME_CHARS
        and not value.startswith("-")
        and not value.endswith("-")
    )
    if not ok:
        raise ValueError("expected a hostname label (letters, digits, '-', at most 63)")
    return value


def _restart_ms(value: str) -> int:
    ms = _int(value)
    if not 100 <= ms <= 600_000:
        raise ValueError("out of range 100..600000")
    return ms


_PARSERS = {
    "log": _log,
    "vsock_port": _port,
    "serial_port": _serial,
    "tcp_port": _tcp_port,
    "debug_console": _bool,
    "hostname": _hostname,
    "agent_restart_max_ms": _restart_ms,
    "bench": _bool,
}
assert set(_PARSERS) == set(_FIELDS)


def parse(cmdline: str) -> tuple[Config, list[str]]:
    """Parse ``/proc/cmdline`` text; return the config and human-readable warnings."""
    values: dict[str, object] = {}
    warnings: list[str] = []
    for word in cmdline.split():
        if not word.startswith("bulkhead."):
            continue
        key, sep, value = word[len("bulkhead.") :].partition("=")
        parser = _PARSERS.get(key)
        if parser is None:
            known = ", ".join("bulkhead." + k for k in _PARSERS)
            warnings.append(f"bad kernel option {word!r}: unknown option (known: {known})")
            continue
        if not sep:
            warnings.append(f"bad kernel option {word!r}: missing '=value'")
            continue
        try:
            values[key] = parser(value)
        except ValueError as exc:
            warnings.append(f"bad kernel option {word!r}: {exc}; keeping the default")
    return Config(**values), warnings  # type: ignore[arg-type]


def read() -> tuple[Config, list[str]]:
    """Parse the running kernel's command line."""
    try:
        with open("/proc/cmdline") as f:
            return parse(f.read())
    except OSError as exc:
        return Config(), [f"cannot read /proc/cmdline: {exc}; using defaults"]
