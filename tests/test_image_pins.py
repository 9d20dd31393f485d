"""The guest's pinned packages and the host's dependencies agree (they share generated code,
and the host re-reads what the guest's prometheus_client writes)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from bulkhead_image import wheels

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# Needed in the guest only because pip runs there with --no-deps; the host's pip resolves it.
GUEST_ONLY = {"typing-extensions"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def host_pins() -> dict[str, str]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        name, sep, version = dep.partition("==")
        assert sep, f"pyproject.toml: {dep!r} is not pinned with =="
        out[_normal(name)] = version.strip()
    return out


def test_every_guest_package_is_pinned_alike_on_the_host() -> None:
    host = host_pins()
    guest = {_normal(n): v for n, v in wheels.pins().items()}
    for name, version in guest.items():
        if name in GUEST_ONLY:
            continue
        assert name in host, f"{name} is in the guest image but not in pyproject's dependencies"
        assert host[name] == version, f"{name}: guest {version}, host {host[name]}"


def test_prometheus_client_is_in_both() -> None:
    assert "prometheus-client" in host_pins()
    assert "prometheus-client" in {_normal(n) for n in wheels.pins()}
