"""The network half of ``Sandbox``: NICs at boot and hot-plugged, published ports, the spec.

``Sandbox.up(nics=..., publish=..., network=...)`` gives the VM virtio-net NICs from boot
(``prepare_nics``; the monitor puts them on QEMU's command line, ``nics.boot_args``) and,
once the agent is ready, applies the network spec: the one given, or the one the NICs imply
(each NIC's address, a default route and DNS through the first). ``add_nic`` hot-plugs one
more through QMP and has the agent wait for it by MAC and configure it; ``publish`` forwards
a host port to the guest on a user-mode NIC while the sandbox runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hotplug, netns
from .errors import BulkheadError, SandboxError
from .network import DEFAULT_WAIT, Interface, NetworkClient, NetworkSpec, NetworkState
from .nics import Nic, NicError, add_hostfwd, default_spec, plug
from .qemu import hotplug_port_id
from .qmp import Qmp
from .state import read_state, state_lock, update_state

if TYPE_CHECKING:
    from .client import AgentClient
    from .state import SandboxPaths

log = logging.getLogger(__name__)

NetworkArg = NetworkSpec | Mapping[str, Any] | str | os.PathLike[str] | bool | None


def parse_publish(text: str) -> str:
    """``[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|udp]`` as a hostfwd rule (host address default
    127.0.0.1: published ports stay on this machine unless an address says otherwise)."""
    rest, _, proto = text.partition("/")
    proto = proto or "tcp"
    parts = rest.split(":")
    if proto not in ("tcp", "udp") or len(parts) not in (2, 3):
        raise NicError(f"-p {text!r}: use [HOSTADDR:]HOSTPORT:CONTAINERPORT[/tcp|udp]")
    address = parts[0] if len(parts) == 3 else "127.0.0.1"
    host_port, guest_port = parts[-2:]
    for port in (host_port, guest_port):
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise NicError(f"-p {text!r}: {port!r} is not a port (1-65535)")
    return f"{proto}:{address}:{host_port}-:{guest_port}"


def prepare_nics(sandbox: str, nics: Iterable[Nic | str], publish: Iterable[str] = ()) -> list[Nic]:
    """The boot NICs, checked, named ``net0``, ``net1``...; published ports go on the first
    user-mode NIC (one is added if there is none)."""
    made: list[Nic] = []
    taps = 0
    for i, item in enumerate(nics):
        nic = (
            item
            if isinstance(item, Nic)
            else Nic.parse(item, name=f"net{i}", index=taps, sandbox=sandbox)
        )
        taps += nic.backend == "tap"
        made.append(nic)
    rules = [parse_publish(p) for p in publish]
    if rules:
        user = next((i for i, n in enumerate(made) if n.backend == "user"), None)
        if user is None:
            made.append(Nic.make("user", name=f"net{len(made)}"))
            user = len(made) - 1
        for rule in rules:
            made[user] = made[user].with_hostfwd(rule)
    names = [n.name for n in made]
    if len(set(names)) != len(names):
        raise NicError(f"NIC names must differ: {', '.join(names)}")
    return made


def create_namespaces(nics: Iterable[Nic]) -> None:
    """Make the namespaces the client owns for its taps (``cleanup_nics`` removes them)."""
    for nic in nics:
        if nic.backend == "tap":
            if nic.created_netns and not netns.exists(nic.netns):
                netns.create(nic.netns)
            elif not netns.exists(nic.netns):
                raise NicError(f"NIC {nic.name}: no network namespace {nic.netns!r}")


def resolve_network(network: NetworkArg, nics: list[Nic]) -> NetworkSpec | None:
    """The spec to apply after boot: ``None`` when there is nothing to apply."""
    if network is False:
        return None
    if network is None or network is True:
        return default_spec(nics) if nics else None
    if isinstance(network, NetworkSpec):
        return network
    if isinstance(network, Mapping):
        return NetworkSpec.from_dict(network)
    return NetworkSpec.load(network)


def cleanup_nics(state: Mapping[str, Any]) -> None:
    """Remove the namespaces the client made for this sandbox's taps, and the redirects of
    mirror taps from the interfaces they took over (QEMU is gone)."""
    for nic in _nics_of(state):
        if nic.mirror:
            try:
                netns.unredirect(nic.netns, nic.mirror)
            except BulkheadError as exc:
                log.warning("cannot undo the redirect of %s in %s: %s", nic.mirror, nic.netns, exc)
        if nic.backend == "tap" and nic.created_netns:
            try:
                netns.delete(nic.netns)
            except BulkheadError as exc:
                log.warning("cannot remove network namespace %s: %s", nic.netns, exc)


def _nics_of(state: Mapping[str, Any]) -> list[Nic]:
    return [Nic.from_dict(d) for d in state.get("nics", [])]


class SandboxNetwork:
    """Mixed into ``Sandbox``: needs ``paths``, ``agent``, ``qmp_socket`` and ``status()``."""

    paths: SandboxPaths
    agent: AgentClient
    qmp_socket: Path
    _network_client: NetworkClient | None = None

    @property
    def network(self) -> NetworkClient:
        """The agent's Network service (``apply``, ``update_interface``, ``routes``, ...)."""
        agent = self.agent
        # Made again after close(): the old one's channel is closed with the old agent client.
        if self._network_client is None or self._network_client.channel is not agent.channel:
            self._network_client = NetworkClient(agent.channel, timeout=agent.timeout)
        return self._network_client

    def nics(self) -> list[Nic]:
        """The sandbox's NICs, from boot and hot-plugged, with their published ports."""
        return _nics_of(read_state(self.paths))

    def apply_network(
        self,
        spec: NetworkSpec | Mapping[str, Any] | str | os.PathLike[str],
        *,
        wait: float = DEFAULT_WAIT,
    ) -> NetworkState:
        """Apply a network spec (object, dict or JSON file) all or nothing."""
        resolved = resolve_network(spec, self.nics())
        assert resolved is not None
        return self.network.apply(resolved, wait=wait)

    def add_nic(
        self,
        nic: Nic | str = "user",
        *,
        configure: bool = True,
        wait: float = DEFAULT_WAIT,
    ) -> tuple[Nic, Interface | None]:
        """Hot-plug a NIC (``"user"``, ``"tap,netns=..."`` or a ``Nic``) into a free port.

        With ``configure``, the agent waits up to ``wait`` seconds for it by MAC and gives it
        its address (no routes: those stay as they are). If the agent cannot, the NIC is
        unplugged again. Returns the NIC and the guest's view of it.
        """
        with state_lock(self.paths.root):
            existing = self.nics()
            if isinstance(nic, str):
                taps = sum(n.backend == "tap" for n in existing)
                nic = Nic.parse(nic, name=_free_name(existing), index=taps, sandbox=self.paths.name)
            if nic.name in {n.name for n in existing}:
                raise NicError(f"sandbox {self.paths.name!r} has a NIC named {nic.name} already")
            created = nic.backend == "tap" and nic.created_netns and not netns.exists(nic.netns)
            if created:
                netns.create(nic.netns)
            with Qmp(self.qmp_socket, timeout=5.0) as qmp:
                port = hotplug.free_port(qmp)
                plug(qmp, nic, hotplug_port_id(port))
            nic = Nic.from_dict({**nic.to_dict(), "port": port})
            update_state(self.paths, nics=[n.to_dict() for n in (*existing, nic)])
        if not configure:
            return nic, None
        try:
            state = self.network.apply(nic.spec(default_route=False), wait=wait)
        except BaseException:
            self._unplug_quietly(nic)
            raise
        return nic, state.interface(nic.mac)

    def remove_nic(self, name: str, *, timeout: float = hotplug.UNPLUG_TIMEOUT) -> None:
        """Unplug a hot-plugged NIC (``device_del``, waiting for the guest to let go)."""
        with state_lock(self.paths.root):
            existing = self.nics()
            nic = next((n for n in existing if n.name == name), None)
            if nic is None:
                raise SandboxError(f"sandbox {self.paths.name!r} has no NIC named {name!r}")
            if nic.port < 0:
                raise SandboxError(f"NIC {name} was there from boot: only hot-plugged NICs go")
            with Qmp(self.qmp_socket, timeout=5.0) as qmp:
                hotplug.unplug(qmp, nic.device_id, timeout=timeout)
                qmp.execute("netdev_del", {"id": nic.netdev_id})
            update_state(self.paths, nics=[n.to_dict() for n in existing if n.name != name])
        if (
            nic.backend == "tap"
            and nic.created_netns
            and not any(n.netns == nic.netns for n in existing if n.name != name)
        ):
            netns.delete(nic.netns)

    def publish(self, spec: str, *, nic: str | None = None) -> str:
        """Forward a host port to the guest while the sandbox runs: ``spec`` as ``-p`` takes it
        (``8080:80``, ``127.0.0.1:8080:80/tcp``), on the named user-mode NIC or the first.
        Containers share the guest's network, so a server in any of them is reached."""
        rule = parse_publish(spec)
        with state_lock(self.paths.root):
            existing = self.nics()
            users = [n for n in existing if n.backend == "user" and (nic is None or n.name == nic)]
            if not users:
                raise SandboxError(
                    f"sandbox {self.paths.name!r} has no user-mode NIC"
                    + (f" named {nic!r}" if nic else "")
                    + " to publish a port on (boot it with --net user, or -p)"
                )
            target = users[0]
            with Qmp(self.qmp_socket, timeout=5.0) as qmp:
                full = add_hostfwd(qmp, target, rule)
            updated = target.with_hostfwd(rule)
            update_state(
                self.paths,
                nics=[(updated if n.name == target.name else n).to_dict() for n in existing],
            )
        return full

    def _unplug_quietly(self, nic: Nic) -> None:
        try:
            self.remove_nic(nic.name)
        except BulkheadError as exc:
            log.warning("%s: could not unplug NIC %s again: %s", self.paths.name, nic.name, exc)


def _free_name(existing: list[Nic]) -> str:
    taken = {n.name for n in existing}
    i = 0
    while f"net{i}" in taken:
        i += 1
    return f"net{i}"
