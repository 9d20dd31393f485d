from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LinkState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINK_STATE_UNSPECIFIED: _ClassVar[LinkState]
    LINK_STATE_UP: _ClassVar[LinkState]
    LINK_STATE_DOWN: _ClassVar[LinkState]

class RouteScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_SCOPE_UNSPECIFIED: _ClassVar[RouteScope]
    ROUTE_SCOPE_UNIVERSE: _ClassVar[RouteScope]
    ROUTE_SCOPE_LINK: _ClassVar[RouteScope]
    ROUTE_SCOPE_HOST: _ClassVar[RouteScope]
LINK_STATE_UNSPECIFIED: LinkState
LINK_STATE_UP: LinkState
LINK_STATE_DOWN: LinkState
ROUTE_SCOPE_UNSPECIFIED: RouteScope
ROUTE_SCOPE_UNIVERSE: RouteScope
ROUTE_SCOPE_LINK: RouteScope
ROUTE_SCOPE_HOST: RouteScope

class Interface(_message.Message):
    __slots__ = ("mac", "name", "mtu", "addresses", "state", "index", "carrier")
    MAC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    mac: str
    name: str
    mtu: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    state: LinkState
    index: int
    carrier: bool
    def __init__(self, mac: _Optional[str] = ..., name: _Optional[str] = ..., mtu: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[LinkState, str]] = ..., index: _Optional[int] = ..., carrier: _Optional[bool] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("destination", "gateway", "device", "source", "scope", "metric", "protocol")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    destination: str
    gateway: str
    device: str
    source: str
    scope: RouteScope
    metric: int
    protocol: str
    def __init__(self, destination: _Optional[str] = ..., gateway: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., scope: _Optional[_Union[RouteScope, str]] = ..., metric: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("address", "mac", "device")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    address: str
    mac: str
    device: str
    def __init__(self, address: _Optional[str] = ..., mac: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class HostEntry(_message.Message):
    __slots__ = ("address", "names")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    address: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, address: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class NameResolution(_message.Message):
    __slots__ = ("nameservers", "search", "options", "hosts", "hostname")
    NAMESERVERS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    nameservers: _containers.RepeatedScalarFieldContainer[str]
    search: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.RepeatedScalarFieldContainer[str]
    hosts: _containers.RepeatedCompositeFieldContainer[HostEntry]
    hostname: str
    def __init__(self, nameservers: _Optional[_Iterable[str]] = ..., search: _Optional[_Iterable[str]] = ..., options: _Optional[_Iterable[str]] = ..., hosts: _Optional[_Iterable[_Union[HostEntry, _Mapping]]] = ..., hostname: _Optional[str] = ...) -> None: ...

class NameResolutionFiles(_message.Message):
    __slots__ = ("resolv_conf", "hosts", "hostname")
    RESOLV_CONF_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    resolv_conf: str
    hosts: str
    hostname: str
    def __init__(self, resolv_conf: _Optional[str] = ..., hosts: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class UpdateInterfaceRequest(_message.Message):
    __slots__ = ("interface", "wait_ms")
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    interface: Interface
    wait_ms: int
    def __init__(self, interface: _Optional[_Union[Interface, _Mapping]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class UpdateRoutesRequest(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class UpdateRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class ListInterfacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInterfacesResponse(_message.Message):
    __slots__ = ("interfaces",)
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class AddNeighborsRequest(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class AddNeighborsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouteTable(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class ApplyNetworkRequest(_message.Message):
    __slots__ = ("interfaces", "routes", "neighbors", "name_resolution", "wait_ms")
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    NAME_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    routes: RouteTable
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    name_resolution: NameResolution
    wait_ms: int
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ..., routes: _Optional[_Union[RouteTable, _Mapping]] = ..., neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., name_resolution: _Optional[_Union[NameResolution, _Mapping]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class NetworkState(_message.Message):
    __slots__ = ("interfaces", "routes", "name_resolution")
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    NAME_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    name_resolution: NameResolutionFiles
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., name_resolution: _Optional[_Union[NameResolutionFiles, _Mapping]] = ...) -> None: ...
