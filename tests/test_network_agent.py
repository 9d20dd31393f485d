"""The agent's network configurator natively, in throwaway network namespaces.

veth ends with chosen MACs stand in for the guest's NICs. Requests are built as the host
sends them (protobuf messages) and go through the same parsing, planning, netlink and
rollback code as in the guest; ``ip`` in the same namespace checks the result.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from netns_support import NetnsLoop

from bulkhead_agent.containers.errors import Failure
from bulkhead_agent.network import spec as specs
from bulkhead_agent.network.apply import Network
from bulkhead_agent.network.files import NameFiles
from bulkhead_proto.v1 import network_pb2 as pb
from bulkhead_proto.v1 import network_pb2_grpc

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("network namespaces need root", allow_module_level=True)

A, R, NR = pb.ApplyNetworkRequest, pb.Route, pb.NameResolution
MAC1, MAC2, MAC3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"
UP, DOWN = pb.LINK_STATE_UP, pb.LINK_STATE_DOWN


@pytest.fixture
def netns() -> Iterator[NetnsLoop]:
    loop = NetnsLoop()
    yield loop
    loop.close()


@pytest.fixture
def network(tmp_path: Path) -> Network:
    files = NameFiles(str(tmp_path / "network"))
    files.prepare()
    reports: list[str] = []
    net = Network(files, reports.append)
    net.reports = reports  # type: ignore[attr-defined]
    return net


def apply(netns: NetnsLoop, network: Network, request: pb.ApplyNetworkRequest):
    return netns.run(network.apply(specs.parse_apply(request)))


def failure(netns: NetnsLoop, network: Network, request: pb.ApplyNetworkRequest) -> Failure:
    with pytest.raises(Failure) as err:
        apply(netns, network, request)
    return err.value


def nic(mac: str, *addresses: str, **fields) -> pb.Interface:
    return pb.Interface(mac=mac, addresses=list(addresses), **fields)


def routes(*items: pb.Route) -> pb.RouteTable:
    return pb.RouteTable(routes=list(items))


# --- checks before the kernel ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [
        (A(interfaces=[nic("52:54:00", "10.0.0.2/24")]), "interfaces[0].mac", "MAC"),
        (
            A(interfaces=[nic(MAC1, "10.0.0.300/24")]),
            "interfaces[0].addresses[0]",
            "not an address",
        ),
        (A(interfaces=[nic(MAC1, "10.0.0.2")]), "interfaces[0].addresses[0]", "prefix"),
        (A(interfaces=[nic(MAC1, "fe80::1/64")]), "interfaces[0].addresses[0]", "link-local"),
        (A(interfaces=[nic(MAC1, name="a/b")]), "interfaces[0].name", "interface name"),
        (A(interfaces=[nic(MAC1, mtu=20)]), "interfaces[0].mtu", "68..65535"),
        (
            A(interfaces=[nic(MAC1, "10.0.0.2/24"), nic(MAC2, "10.0.0.2/16")]),
            "interfaces[1].addresses[0]",
            "also on interfaces[0]",
        ),
        (A(interfaces=[nic(MAC1), nic(MAC1.upper())]), "interfaces[1].mac", "also"),
        (
            A(routes=routes(R(destination="10.1.0.5/16", device="eth0"))),
            "routes[0].destination",
            "host bits",
        ),
        (A(routes=routes(R(destination="10.1.0.0/16"))), "routes[0]", "device, a gateway"),
        (
            A(routes=routes(R(destination="10.1.0.0/16", gateway="fd00::1"))),
            "routes[0].gateway",
            "family",
        ),
        (
            A(
                routes=routes(
                    R(destination="default", gateway="10.0.0.1"),
                    R(destination="0.0.0.0/0", gateway="10.0.0.9"),
                )
            ),
            "routes[1]",
            "also routes[0]",
        ),
        (
            A(neighbors=[pb.Neighbor(address="10.0.0.7", mac="zz", device="eth0")]),
            "neighbors[0].mac",
            "MAC",
        ),
        (A(neighbors=[pb.Neighbor(address="10.0.0.7", mac=MAC1)]), "neighbors[0].device", "empty"),
        (
            A(name_resolution=NR(nameservers=["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"])),
            "name_resolution.nameservers",
            "at most 3",
        ),
        (
            A(name_resolution=NR(nameservers=["dns.example"])),
            "name_resolution.nameservers[0]",
            "not an IPv4",
        ),
        (A(name_resolution=NR(search=["bad domain"])), "name_resolution.search[0]", "domain"),
        (
            A(name_resolution=NR(options=["ndots:2\nnameserver 6.6.6.6"])),
            "name_resolution.options[0]",
            "option",
        ),
        (
            A(name_resolution=NR(hosts=[pb.HostEntry(address="10.0.0.9")])),
            "name_resolution.hosts[0].names",
            "empty",
        ),
        (A(name_resolution=NR(hostname="-x")), "name_resolution.hostname", "host name"),
        (A(wait_ms=10_000_000), "wait_ms", "longer"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(request_, field: str, words: str) -> None:
    with pytest.raises(Failure) as err:
        specs.parse_apply(request_)
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.message.startswith(f"{field}: "), err.value.message
    assert words in err.value.message


def test_route_defaults() -> None:
    request = pb.ApplyNetworkRequest(
        routes=routes(
            pb.Route(destination="default", gateway="fd00::1"),
            pb.Route(destination="10.2.0.0/16", device="eth0"),
            pb.Route(destination="10.3.0.0/16", gateway="10.2.0.1", metric=5),
        )
    )
    v6, link, via = specs.parse_apply(request).routes
    assert (v6.family, str(v6.destination), v6.metric) == (10, "::/0", 1024)
    assert link.scope == specs.RT_SCOPE_LINK and link.gateway is None
    assert via.scope == specs.RT_SCOPE_UNIVERSE and via.metric == 5


# --- applied in a namespace ------------------------------------------------------------------


def test_interface_by_mac_gets_name_mtu_addresses_and_state(
    netns: NetnsLoop, network: Network
) -> None:
    netns.add_veth("veth-a", MAC1, "peer-a")
    netns.add_veth("veth-b", MAC2, "peer-b")
    view = apply(
        netns,
        network,
        pb.ApplyNetworkRequest(
            interfaces=[
                nic(MAC1.upper(), "10.0.0.2/24", "fd00::2/64", name="eth7", mtu=1400, state=UP),
                nic(MAC2, "10.9.0.2/24", state=DOWN),
            ]
        ),
    )
    assert "veth-a" not in netns.names()
    link = netns.link("eth7")
    assert (link["address"], link["mtu"], "UP" in link["flags"]) == (MAC1, 1400, True)
    assert netns.addresses("eth7") == {"10.0.0.2/24", "fd00::2/64"}
    assert netns.addresses("veth-b") == {"10.9.0.2/24"}
    assert "UP" not in netns.link("veth-b")["flags"]
    # The spec's addresses are all there is: no IPv6 autoconfiguration on top.
    assert netns.sysctl("net/ipv6/conf/eth7/accept_ra") == "0"
    assert netns.sysctl("net/ipv6/conf/eth7/autoconf") == "0"
    by_mac = {i.link.mac: i for i in view.interfaces}
    assert by_mac[MAC1].link.name == "eth7" and by_mac[MAC1].link.up
    # The addresses are the complete set: applying again with fewer removes the others.
    apply(netns, network, pb.ApplyNetworkRequest(interfaces=[nic(MAC1, "10.0.0.3/16")]))
    assert netns.addresses("eth7") == {"10.0.0.3/16"}
    assert "UP" in netns.link("eth7")["flags"]  # state unspecified: kept


def test_an_address_can_move_between_nics_in_one_request(
    netns: NetnsLoop, network: Network
) -> None:
    netns.add_veth("veth-a", MAC1, "peer-a")
    netns.add_veth("veth-b", MAC2, "peer-b")
    apply(netns, network, pb.ApplyNetworkRequest(interfaces=[nic(MAC1, "10.0.0.2/24")]))
    apply(
        netns,
        network,
        pb.ApplyNetworkRequest(interfaces=[nic(MAC2, "10.0.0.2/24"), nic(MAC1, "10.0.1.2/24")]),
    )
    assert netns.addresses("veth-a") == {"10.0.1.2/24"}
    assert netns.addresses("veth-b") == {"10.0.0.2/24"}


def test_routes_are_replaced_and_kernel_routes_kept(netns: NetnsLoop, network: Network) -> None:
    netns.add_veth("veth-a", MAC1, "peer-a")
    netns.ip("link", "set", "peer-a", "up")
    apply(
        netns,
        network,
        pb.ApplyNetworkRequest(
            interfaces=[nic(MAC1, "10.0.0.2/24", "fd00::2/64", name="eth0", state=UP)]
        ),
    )
    netns.ip("route", "add", "10.50.0.0/16", "via", "10.0.0.50")  # someone else's: goes
    view = apply(
        netns,
        network,
        pb.ApplyNetworkRequest(
            routes=routes(
                pb.Route(destination="default", gateway="10.0.0.1"),
                pb.Route(destination="10.8.0.0/16", device="eth0"),
                pb.Route(destination="10.9.0.0/16", gateway="10.0.0.9", source="10.0.0.2"),
                pb.Route(destination="fd01::/64", gateway="fd00::1"),
            )
        ),
    )
    assert netns.routes("-4") == {
        ("default", "10.0.0.1", "eth0"),
        ("10.8.0.0/16", "", "eth0"),
        ("10.9.0.0/16", "10.0.0.9", "eth0"),
    }
    assert ("fd01::/64", "fd00::1", "eth0") in netns.routes("-6")
    kernel = netns.ip_json("-4", "route", "show", "proto", "kernel")
    assert [r["dst"] for r in kernel] == ["10.0.0.0/24"]
    assert {r.protocol for r in view.routes} == {2, 4}  # kernel, static
    # Replace semantics: what is not listed goes, what is stays.
    apply(
        netns,
        network,
        pb.ApplyNetworkRequest(
            routes=routes(pb.Route(destination="default", gateway="10.0.0.254"))
        ),
    )
    assert netns.routes("-4") == {("default", "10.0.0.254", "eth0")}
    assert netns.routes("-6") == set()
    apply(netns, network, pb.ApplyNetworkRequest(routes=routes()))
    assert netns.routes("-4") == set()


def test_neighbours_are_permanent(netns: NetnsLoop, network: Network) -> None:
    netns.add_veth("veth-a", MAC1, "peer-a")
    apply(
        netns,
        network,
        pb.ApplyNetworkRequest(
            interfaces=[nic(MAC1, "10.0.0.2/24", "fd00::2/64", name="eth0", state=UP)],
            neighbors=[
                pb.Neighbor(address="10.0.0.7", mac=MAC3, device="eth0"),
                pb.Neighbor(address="fd00::7", mac=MAC3, device="eth0"),
            ],
        ),
    )
    found = {
        (n["dst"], n["lladdr"], tuple(n["state"]))
        for n in netns.ip_json("neigh", "show", "dev", "eth0")
    }
    assert ("10.0.0.7", MAC3, ("PERMANENT",)) in found
    assert ("fd00::7", MAC3, ("PERMANENT",)) in found


def _configured(netns: NetnsLoop, network: Network) -> tuple:
    netns.add_veth("veth-a", MAC1, "peer-a")
    netns.add_veth("veth-b", MAC2, "peer-b")
    netns.ip("link", "set", "peer-a", "up")
    apply(
        netns,
        network,
        pb.ApplyNetworkRequest(
            interfaces=[
                nic(MAC1, "10.0.0.2/24", "fd00::2/64", name="eth0", state=UP),
                nic(MAC2, "10.1.0.2/24", name="eth1", state=UP),
            ],
            routes=routes(
                pb.Route(destination="default", gateway="10.0.0.1"),
                pb.Route(destination="10.7.0.0/16", gateway="10.1.0.1"),
            ),
            neighbors=[pb.Neighbor(address="10.0.0.7", mac=MAC3, device="eth0")],
            name_resolution=pb.NameResolution(nameservers=["10.0.0.3"], hostname="before"),
        ),
    )
    return netns.state()


def test_a_refused_route_leaves_everything_as_it_was(netns: NetnsLoop, network: Network) -> None:
    before = _configured(netns, network)
    files_before = network.files.read()
    err = failure(
        netns,
        network,
        pb.ApplyNetworkRequest(
            # Everything here is fine but the last route: its gateway is on no subnet.
            interfaces=[
                nic(MAC1, "10.5.0.2/24", name="lan0", mtu=1300, state=UP),
                nic(MAC2, "10.1.0.2/24", "10.1.1.2/24", name="eth1", state=DOWN),
            ],
            routes=routes(
                pb.Route(destination="default", gateway="10.5.0.1"),
                pb.Route(destination="10.8.0.0/16", gateway="192.0.2.1"),
            ),
            neighbors=[pb.Neighbor(address="10.5.0.8", mac=MAC3, device="lan0")],
            name_resolution=pb.NameResolution(nameservers=["10.5.0.3"], hostname="after"),
        ),
    )
    assert err.code == "INVALID_ARGUMENT"
    assert err.message.startswith("routes[1]: "), err.message
    assert netns.state() == before
    assert network.files.read() == files_before
    assert netns.run(_hostname()) == "before"


async def _hostname() -> str:
    return os.uname().nodename


def test_a_fresh_nic_gets_everything_back(netns: NetnsLoop, network: Network) -> None:
    netns.add_veth("veth-a", MAC1, "peer-a")
    netns.ip("link", "set", "veth-a", "up")
    before = netns.state()
    assert netns.sysctl("net/ipv6/conf/veth-a/accept_ra") == "1"
    err = failure(
        netns,
        network,
        pb.ApplyNetworkRequest(
            interfaces=[nic(MAC1, "10.0.0.2/24", "fd00::2/64", name="eth0", mtu=9000)],
            routes=routes(pb.Route(destination="default", gateway="10.1.0.1")),
        ),
    )
    assert err.message.startswith("routes[0]: "), err.message
    assert netns.state() == before
    assert netns.sysctl("net/ipv6/conf/veth-a/accept_ra") == "1"
    assert netns.sysctl("net/ipv6/conf/veth-a/autoconf") == "1"


def test_conflicts_are_refused_before_any_change(netns: NetnsLoop, network: Network) -> None:
    before = _configured(netns, network)
    err = failure(
        netns, network, pb.ApplyNetworkRequest(interfaces=[nic(MAC2, "10.0.0.2/24", name="x0")])
    )
    assert err.code == "INVALID_ARGUMENT"
    assert err.message == "interfaces[0].addresses[0]: 10.0.0.2 is already on eth0"
    err = failure(netns, network, pb.ApplyNetworkRequest(interfaces=[nic(MAC2, name="eth0")]))
    assert err.code == "INVALID_ARGUMENT"
    assert err.message.startswith("interfaces[0].name: 'eth0' is taken by the interface with MAC")
    err = failure(
        netns,
        network,
        pb.ApplyNetworkRequest(
            neighbors=[pb.Neighbor(address="10.0.0.8", mac=MAC3, device="eth9")]
        ),
    )
    assert (err.code, err.message) == ("NOT_FOUND", "neighbors[0].device: no interface 'eth9'")
    err = failure(
        netns,
        network,
        pb.ApplyNetworkRequest(
            interfaces=[nic(MAC2, "10.1.0.9/24", name="renamed", state=UP)],
            routes=routes(pb.Route(destination="10.99.0.0/16", device="eth1")),
        ),
    )
    # eth1 is being renamed away: a route through it names a device that will not exist.
    assert (err.code, err.message) == ("NOT_FOUND", "routes[0].device: no interface 'eth1'")
    assert netns.state() == before


def test_kernel_refusal_midway_rolls_back_renames_and_addresses(
    netns: NetnsLoop, network: Network
) -> None:
    before = _configured(netns, network)
    # The kernel takes the rename, the MTU and the new address, then refuses the route's
    # source (no interface has it): all of it must be undone, the flushed routes too.
    err = failure(
        netns,
        network,
        pb.ApplyNetworkRequest(
            interfaces=[nic(MAC1, "10.0.0.9/24", name="renamed0", mtu=1280, state=UP)],
            routes=routes(
                pb.Route(destination="default", gateway="10.0.0.1"),
                pb.Route(destination="10.6.0.0/16", device="renamed0", source="10.200.0.1"),
            ),
        ),
    )
    assert err.code == "INVALID_ARGUMENT"
    assert err.message.startswith("routes[1]: "), err.message
    assert netns.state() == before
    assert "renamed0" not in netns.names()


def test_unknown_mac_is_not_found_after_the_wait(netns: NetnsLoop, network: Network) -> None:
    err = failure(
        netns, network, pb.ApplyNetworkRequest(interfaces=[nic(MAC3, "10.0.0.2/24")], wait_ms=300)
    )
    assert err.code == "NOT_FOUND"
    assert err.message == f"interfaces[0].mac: no interface with MAC {MAC3} (waited 0.3 s)"


def test_a_nic_that_appears_later_is_awaited(netns: NetnsLoop, network: Network) -> None:
    async def plug_later() -> None:
        await asyncio.sleep(0.3)
        proc = await asyncio.create_subprocess_exec(
            "ip", "link", "add", "late0", "address", MAC3, "type", "veth", "peer", "name", "late1"
        )
        await proc.wait()

    async def both():
        request = specs.parse_apply(
            pb.ApplyNetworkRequest(interfaces=[nic(MAC3, "10.3.0.2/24", state=UP)], wait_ms=10_000)
        )
        plug = asyncio.ensure_future(plug_later())
        loop = asyncio.get_running_loop()
        started = loop.time()
        view = await network.apply(request)
        await plug
        return view, loop.time() - started

    # ``ip`` runs in the thread's namespace: a child of a thread inherits its namespaces.
    view, seconds = netns.run(both())
    assert 0.3 <= seconds < 5
    assert netns.addresses("late0") == {"10.3.0.2/24"}
    assert any(i.link.mac == MAC3 and i.link.up for i in view.interfaces)


def test_name_resolution_files_and_hostname(netns: NetnsLoop, network: Network) -> None:
    view = apply(
        netns,
        network,
        pb.ApplyNetworkRequest(
            name_resolution=pb.NameResolution(
                nameservers=["10.0.2.3", "fd00::3"],
                search=["example.test", "corp.test"],
                options=["ndots:2", "edns0"],
                hosts=[pb.HostEntry(address="10.0.2.2", names=["gateway", "gw.example.test"])],
                hostname="web-1",
            )
        ),
    )
    resolv = Path(network.files.path("resolv.conf")).read_text()
    assert "nameserver 10.0.2.3\nnameserver fd00::3\n" in resolv
    assert "search example.test corp.test\noptions ndots:2 edns0\n" in resolv
    hosts = Path(network.files.path("hosts")).read_text()
    assert "127.0.0.1\tlocalhost\n" in hosts and "10.0.2.2\tgateway gw.example.test\n" in hosts
    assert "127.0.1.1\tweb-1\n" in hosts
    assert Path(network.files.path("hostname")).read_text() == "web-1\n"
    assert view.files is not None and view.files.resolv_conf == resolv
    assert netns.run(_hostname()) == "web-1"
    assert os.uname().nodename != "web-1"  # the test process's own UTS namespace is untouched


# --- the gRPC service ------------------------------------------------------------------------


def test_service_maps_failures_to_statuses(
    netns: NetnsLoop, network: Network, tmp_path: Path
) -> None:
    from bulkhead_agent.services.network import NetworkService
    from bulkhead_init.log import Logger

    netns.add_veth("veth-a", MAC1, "peer-a")
    socket_path = tmp_path / "net.sock"

    async def serve() -> grpc.aio.Server:
        server = grpc.aio.server()
        network_pb2_grpc.add_NetworkServicer_to_server(
            NetworkService(network.files, Logger("test", "error", fd=2), network), server
        )
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        return server

    server = netns.run(serve())
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = network_pb2_grpc.NetworkStub(channel)
            reply = stub.UpdateInterface(
                pb.UpdateInterfaceRequest(
                    interface=nic(MAC1, "10.0.0.2/24", name="eth0", state=UP), wait_ms=1000
                ),
                timeout=30,
            )
            assert (reply.name, reply.mac, list(reply.addresses)) == ("eth0", MAC1, ["10.0.0.2/24"])
            assert reply.state == UP and reply.index > 0
            reply = stub.UpdateRoutes(
                pb.UpdateRoutesRequest(
                    routes=[pb.Route(destination="default", gateway="10.0.0.1")]
                ),
                timeout=30,
            )
            by_dst = {r.destination: r for r in reply.routes}
            assert by_dst["default"].gateway == "10.0.0.1" and by_dst["default"].device == "eth0"
            assert by_dst["default"].protocol == "static"
            assert by_dst["10.0.0.0/24"].protocol == "kernel"
            assert by_dst["10.0.0.0/24"].scope == pb.ROUTE_SCOPE_LINK
            listed = stub.ListInterfaces(pb.ListInterfacesRequest(), timeout=30).interfaces
            assert {"lo", "eth0", "peer-a"} <= {i.name for i in listed}
            assert stub.ListRoutes(pb.ListRoutesRequest(), timeout=30).routes == reply.routes
            with pytest.raises(grpc.RpcError) as err:
                stub.UpdateInterface(pb.UpdateInterfaceRequest(interface=nic(MAC1, "10.0.0.2")))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("interface.addresses[0]: ")
            with pytest.raises(grpc.RpcError) as err:
                stub.UpdateInterface(pb.UpdateInterfaceRequest(interface=nic(MAC3)))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == f"interface.mac: no interface with MAC {MAC3}"
            with pytest.raises(grpc.RpcError) as err:
                stub.UpdateRoutes(
                    pb.UpdateRoutesRequest(
                        routes=[pb.Route(destination="10.8.0.0/16", gateway="192.0.2.1")]
                    )
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "routes[0]: " in err.value.details()
            assert ("default", "10.0.0.1", "eth0") in netns.routes()  # still there
            stub.AddNeighbors(
                pb.AddNeighborsRequest(
                    neighbors=[pb.Neighbor(address="10.0.0.7", mac=MAC3, device="eth0")]
                ),
                timeout=30,
            )
            files = stub.UpdateNameResolution(
                pb.NameResolution(nameservers=["10.0.0.3"]), timeout=30
            )
            assert "nameserver 10.0.0.3\n" in files.resolv_conf
    finally:
        netns.run(server.stop(0))


# --- lazy pyroute2 ---------------------------------------------------------------------------


def test_agent_starts_without_pyroute2_and_loads_only_iproute() -> None:
    code = (
        "import sys\n"
        "import bulkhead_agent.server, bulkhead_agent.services.network\n"
        "assert 'pyroute2' not in sys.modules, 'imported at start'\n"
        "late = [m for m in ('bulkhead_agent.network.apply', 'bulkhead_agent.network.spec',"
        " 'bulkhead_agent.network.kernel') if m in sys.modules]\n"
        "assert not late, f'imported at start: {late}'\n"
        "from bulkhead_agent.network import pyroute\n"
        "pyroute.load()\n"
        "heavy = [m for m in ('pyroute2.ndb', 'pyroute2.ipdb', 'sqlite3', 'pyroute2.nftables')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(round(pyroute.import_seconds * 1000))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
