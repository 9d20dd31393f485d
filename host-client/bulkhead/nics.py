"""A sandbox's virtio-net NICs: what backs them, their QEMU arguments and QMP hot-plug.

Two backends, both keeping traffic on this machine unless the operator says otherwise:

- ``user``: QEMU's user-mode network stack (slirp) with ``restrict=on``: the guest reaches
  nothing of the host or beyond but explicit ``guestfwd`` forwards, and the host reaches the
  guest only through ``hostfwd`` forwards (published ports). Defaults: subnet 10.0.2.0/24,
  host (gateway) .2, DNS .3, guest .15.
- ``tap``: a tap device whose host end is in a network namespace (``netns``); one the host
  client makes (``bh-<sandbox>``, removed with the sandbox) unless one is named. Defaults:
  subnet 10.88.N.0/24 for the sandbox's N-th tap NIC, host end .1, guest .2.
  With ``mirror=IFACE`` the tap gets no address: it takes over an interface that is already
  in the namespace (a CNI plugin's veth), every frame redirected both ways with tc, and the
  guest's NIC should carry that interface's MAC and addresses (as Kata's "tcfilter" model).

Option strings (``bulkhead sandbox up --net ...``, ``Nic.parse``)::

    user
    user,subnet=10.0.3.0/24,hostfwd=tcp:127.0.0.1:8080-:80,guestfwd=tcp:10.0.2.100:5000-127.0.0.1:5000
    tap,netns=testns,subnet=10.88.5.0/24,name=tap-web
    tap,netns=/run/netns/cni-1234,mirror=eth0,mac=0a:58:0a:58:00:05,subnet=10.88.0.0/16,guest=10.88.0.5,host=10.88.0.1

A ``guestfwd`` forwards the guest's connections to ``GUEST_ADDR:PORT`` to ``HOST:PORT`` on
the host, one relay process (``bulkhead.forward``) per connection.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import netns
from .errors import BulkheadError
from .network import Interface, NameResolution, NetworkSpec, Route
from .qmp import Qmp

BACKENDS = ("user", "tap")
USER_SUBNET = "10.0.2.0/24"
TAP_SUBNET = "10.88.{n}.0/24"
_NAME = re.compile(r"[a-z][a-z0-9-]{0,11}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_HOSTFWD = re.compile(r"(tcp|udp):([0-9.]*):(\d{1,5})-([0-9.]*):(\d{1,5})")
_GUESTFWD = re.compile(r"tcp:([0-9.]+):(\d{1,5})-([0-9.]+):(\d{1,5})")


class NicError(BulkheadError, ValueError):
    pass


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass(frozen=True)
class Nic:
    name: str  # ours: QEMU ids bh-net-NAME (netdev) and bh-nic-NAME (device)
    backend: str  # "user" or "tap"
    mac: str
    subnet: str  # the guest's network
    host_address: str = ""  # gateway (user) / the tap's host end (tap); default .2 / .1
    guest_address: str = ""  # what the guest's interface gets; default .15 / .2
    dns: str = ""  # user: slirp's DNS address (default .3)
    hostfwd: tuple[str, ...] = ()  # user: "tcp:HOSTADDR:PORT-GUESTADDR:PORT"
    guestfwd: tuple[str, ...] = ()  # user: "tcp:GUESTADDR:PORT-HOSTADDR:PORT"
    netns: str = ""  # tap: the host namespace (name or path)
    tap: str = ""  # tap: device name in that namespace
    created_netns: bool = False  # tap: the client made the namespace (and removes it)
    mirror: str = ""  # tap: the namespace's interface it takes over (no address of its own)
    port: int = -1  # hot-plug port it went into; -1 for NICs present from boot

    @property
    def netdev_id(self) -> str:
        return f"bh-net-{self.name}"

    @property
    def device_id(self) -> str:
        return f"bh-nic-{self.name}"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def guest_interface(self) -> str:
        return f"{self.guest_address}/{self.network.prefixlen}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hostfwd"], out["guestfwd"] = list(self.hostfwd), list(self.guestfwd)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Nic:
        values = dict(data)
        values["hostfwd"] = tuple(values.get("hostfwd", ()))
        values["guestfwd"] = tuple(values.get("guestfwd", ()))
        return cls(**values)

    @classmethod
    def make(
        cls,
        backend: str = "user",
        *,
        name: str,
        index: int = 0,
        sandbox: str = "",
        mac: str = "",
        subnet: str = "",
        host_address: str = "",
        guest_address: str = "",
        dns: str = "",
        hostfwd: Iterable[str] = (),
        guestfwd: Iterable[str] = (),
        netns_name: str = "",
        tap: str = "",
        mirror: str = "",
    ) -> Nic:
        """A checked NIC with its defaults filled in; ``index`` counts the sandbox's tap NICs."""
        if backend not in BACKENDS:
            raise NicError(f"NIC backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if not _NAME.fullmatch(name):
            raise NicError(f"NIC name {name!r}: 1-12 lower-case letters, digits or '-'")
        mac = (mac or random_mac()).lower().replace("-", ":")
        if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
            raise NicError(f"NIC {name}: {mac!r} is not a unicast MAC address")
        if backend == "user":
            subnet = subnet or USER_SUBNET
        else:
            subnet = subnet or TAP_SUBNET.format(n=index % 256)
        try:
            network = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise NicError(f"NIC {name}: subnet {subnet!r}: {exc}") from None
        if network.prefixlen > 29:
            raise NicError(f"NIC {name}: subnet {subnet} is too small (at most /29)")
        default_host, default_guest = (2, 15) if backend == "user" else (1, 2)
        host = _in(network, host_address, default_host, f"NIC {name}: host address")
        guest = _in(network, guest_address, default_guest, f"NIC {name}: guest address")
        dns_address = ""
        if backend == "user":
            dns_address = _in(network, dns, 3, f"NIC {name}: dns")
            for rule in hostfwd:
                if not _HOSTFWD.fullmatch(rule):
                    raise NicError(
                        f"NIC {name}: hostfwd {rule!r}: use tcp:HOSTADDR:PORT-GUESTADDR:PORT"
                    )
            for rule in guestfwd:
                if not _GUESTFWD.fullmatch(rule):
                    raise NicError(
                        f"NIC {name}: guestfwd {rule!r}: use tcp:GUESTADDR:PORT-HOSTADDR:PORT"
                    )
        elif hostfwd or guestfwd:
            raise NicError(f"NIC {name}: hostfwd and guestfwd are for user networking only")
        if mirror and (backend != "tap" or not netns_name):
            raise NicError(f"NIC {name}: mirror is for a tap in a named netns (netns=...)")
        if len(mirror) > 15:
            raise NicError(f"NIC {name}: mirror {mirror!r} is longer than 15 characters")
        created = False
        if backend == "tap":
            if not netns_name:
                netns_name, created = f"bh-{sandbox or name}"[:32], True
            tap = tap or f"tap-{name}"
            if len(tap) > 15:
                raise NicError(f"NIC {name}: tap name {tap!r} is longer than 15 characters")
        return cls(
            name=name,
            backend=backend,
            mac=mac,
            subnet=str(network),
            host_address=host,
            guest_address=guest,
            dns=dns_address,
            hostfwd=tuple(hostfwd),
            guestfwd=tuple(guestfwd),
            netns=netns_name,
            tap=tap,
            created_netns=created,
            mirror=mirror,
        )

    @classmethod
    def parse(cls, text: str, *, name: str, index: int = 0, sandbox: str = "") -> Nic:
        """From an option string: ``BACKEND[,key=value]...`` (see the module's doc)."""
        backend, *items = text.split(",")
        options: dict[str, Any] = {"hostfwd": [], "guestfwd": []}
        keys = {
            "name": "name",
            "mac": "mac",
            "subnet": "subnet",
            "host": "host_address",
            "guest": "guest_address",
            "dns": "dns",
            "hostfwd": "hostfwd",
            "guestfwd": "guestfwd",
            "netns": "netns_name",
            "tap": "tap",
            "mirror": "mirror",
        }
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in keys:
                raise NicError(f"--net {text!r}: unknown option {item!r} ({', '.join(keys)})")
            if key in ("hostfwd", "guestfwd"):
                options[key].append(value)
            else:
                options[keys[key]] = value
        options.setdefault("name", name)
        return cls.make(backend, index=index, sandbox=sandbox, **options)

    def with_hostfwd(self, rule: str) -> Nic:
        return replace(self, hostfwd=(*self.hostfwd, rule))

    # -- what the guest is told --

    def spec(self, *, default_route: bool) -> NetworkSpec:
        """The guest side of this NIC: its address, and a default route through the host."""
        routes: tuple[Route, ...] | None = None
        if default_route:
            routes = (Route("default", gateway=self.host_address),)
        names = NameResolution(nameservers=(self.dns,)) if self.dns else None
        return NetworkSpec(
            interfaces=(Interface(self.mac, (self.guest_interface,)),),
            routes=routes,
            name_resolution=names,
        )


def _in(network: ipaddress.IPv4Network, given: str, offset: int, what: str) -> str:
    if not given:
        return str(network.network_address + offset)
    try:
        address = ipaddress.IPv4Address(given)
    except ValueError:
        raise NicError(f"{what}: {given!r} is not an IPv4 address") from None
    if address not in network:
        raise NicError(f"{what}: {address} is not in {network}")
    return str(address)


def default_spec(nics: Iterable[Nic]) -> NetworkSpec:
    """Every NIC's address; the default route and DNS through the first one that has them."""
    spec = NetworkSpec()
    for i, nic in enumerate(nics):
        spec = spec.merged(nic.spec(default_route=i == 0))
    return spec


def hostfwd_rule(nic: Nic, rule: str) -> str:
    """A ``hostfwd`` with the guest address filled in where it was left out (``-:80``)."""
    match = _HOSTFWD.fullmatch(rule)
    if match is None:
        raise NicError(f"hostfwd {rule!r}: use tcp:HOSTADDR:PORT-GUESTADDR:PORT")
    proto, haddr, hport, gaddr, gport = match.groups()
    return f"{proto}:{haddr or '127.0.0.1'}:{hport}-{gaddr or nic.guest_address}:{gport}"


def guestfwd_rule(rule: str) -> str:
    """QEMU's form: the host end becomes a relay command run for each connection."""
    match = _GUESTFWD.fullmatch(rule)
    if match is None:
        raise NicError(f"guestfwd {rule!r}: use tcp:GUESTADDR:PORT-HOSTADDR:PORT")
    gaddr, gport, haddr, hport = match.groups()
    relay = shlex.join([sys.executable, "-m", "bulkhead.forward", haddr, hport])
    return f"tcp:{gaddr}:{gport}-cmd:{relay}"


def _opt(value: object) -> str:
    return str(value).replace(",", ",,")


def netdev_arg(nic: Nic, *, fd: int | None = None) -> str:
    """``-netdev`` for ``nic``; a tap needs its open ``fd`` (``netns.open_tap``)."""
    if nic.backend == "user":
        parts = [
            f"user,id={nic.netdev_id}",
            f"net={nic.subnet}",
            f"host={nic.host_address}",
            f"dns={nic.dns}",
            "restrict=on",
        ]
        parts += [f"hostfwd={_opt(hostfwd_rule(nic, r))}" for r in nic.hostfwd]
        parts += [f"guestfwd={_opt(guestfwd_rule(r))}" for r in nic.guestfwd]
        return ",".join(parts)
    if fd is None:
        raise NicError(f"NIC {nic.name}: a tap needs its file descriptor")
    # No vhost-net: the hosts this runs on have no /dev/vhost-net (HOST-NOTES).
    return f"tap,id={nic.netdev_id},fd={fd},vhost=off"


def device_arg(nic: Nic, *, machine: str = "q35") -> str:
    driver = "virtio-net-pci" if machine == "q35" else "virtio-net-device"
    return f"{driver},id={nic.device_id},netdev={nic.netdev_id},mac={nic.mac}"


def boot_args(nics: Iterable[Nic], *, machine: str = "q35") -> tuple[list[str], list[int]]:
    """QEMU arguments for the NICs present from boot, and the tap fds to pass (caller closes)."""
    args: list[str] = []
    fds: list[int] = []
    try:
        for nic in nics:
            fd = None
            if nic.backend == "tap":
                fd = open_tap(nic)
                fds.append(fd)
            args += ["-netdev", netdev_arg(nic, fd=fd), "-device", device_arg(nic, machine=machine)]
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return args, fds


def open_tap(nic: Nic) -> int:
    """The tap's file descriptor: the namespace's end addressed as the guest's gateway, or,
    with ``mirror``, taking over that interface's traffic."""
    if not nic.mirror:
        return netns.open_tap(nic.netns, nic.tap, f"{nic.host_address}/{nic.network.prefixlen}")
    fd = netns.open_tap(nic.netns, nic.tap)
    try:
        netns.redirect(nic.netns, nic.mirror, nic.tap)
    except BaseException:
        _close(fd)
        raise
    return fd


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# --- QMP -------------------------------------------------------------------------------------


def plug(qmp: Qmp, nic: Nic, port_id: str) -> None:
    """Hot-plug ``nic`` into hot-plug port ``port_id``: netdev first, then the device."""
    netdev: dict[str, Any]
    fd = None
    if nic.backend == "user":
        netdev = {
            "type": "user",
            "id": nic.netdev_id,
            "net": nic.subnet,
            "host": nic.host_address,
            "dns": nic.dns,
            "restrict": True,
        }
        if nic.hostfwd:
            netdev["hostfwd"] = [{"str": hostfwd_rule(nic, r)} for r in nic.hostfwd]
        if nic.guestfwd:
            netdev["guestfwd"] = [{"str": guestfwd_rule(r)} for r in nic.guestfwd]
    else:
        fd = open_tap(nic)
        fd_name = f"bh-fd-{nic.name}"
        try:
            qmp.send_fd(fd, fd_name)
        finally:
            _close(fd)  # QEMU has its own copy now (or none, and the tap is gone)
        netdev = {"type": "tap", "id": nic.netdev_id, "fd": fd_name, "vhost": False}
    qmp.execute("netdev_add", netdev)
    try:
        qmp.execute(
            "device_add",
            {
                "driver": "virtio-net-pci",
                "id": nic.device_id,
                "netdev": nic.netdev_id,
                "mac": nic.mac,
                "bus": port_id,
                "addr": "0",
            },
        )
    except BaseException:
        try:
            qmp.execute("netdev_del", {"id": nic.netdev_id})
        except BulkheadError:
            pass
        raise


def add_hostfwd(qmp: Qmp, nic: Nic, rule: str) -> str:
    """Publish a guest port on a running user-mode NIC; the rule as QEMU got it.

    QMP has no command for it; the human monitor's ``hostfwd_add`` does it, answering with
    an error text (or nothing when it worked).
    """
    if nic.backend != "user":
        raise NicError(f"NIC {nic.name} is a {nic.backend} NIC: ports are published on user ones")
    full = hostfwd_rule(nic, rule)
    answer = qmp.execute(
        "human-monitor-command", {"command-line": f"hostfwd_add {nic.netdev_id} {full}"}
    )
    if isinstance(answer, str) and answer.strip():
        raise NicError(f"publishing {full}: {answer.strip()}")
    return full
