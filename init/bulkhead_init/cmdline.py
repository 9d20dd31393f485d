"""The documented ``bulkhead.*`` kernel command-line options.

Pure and tiny: PID 1 imports it before anything else, and the agent reuses it.
A bad option never stops the boot; it is reported and the default is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

LOG_LEVELS = ("debug", "info", "warning", "error")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_PORT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Config:
    log: str = "info"
    vsock_port: int = 1024  # 0: off
    serial_port: str = "bulkhead.agent"  # "": off
    tcp_port: int = 0  # 0: off (development only)
    debug_console: bool = False
    hostname: str = "bulkhead"
    agent_restart_max_ms: int = 5000


def _int(value: str) -> int:
    if not value.isdigit():
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
    if not _PORT_NAME.match(value):
        raise ValueError("expected a port name of letters, digits, '.', '_', '-'")
    return value


def _hostname(value: str) -> str:
    if not _HOSTNAME.match(value):
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
}
assert set(_PARSERS) == {f.name for f in fields(Config)}


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
