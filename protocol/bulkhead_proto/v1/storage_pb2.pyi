from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StorageSpec(_message.Message):
    __slots__ = ("storage_id", "driver", "pci_path", "serial", "device", "tag", "fstype", "options", "mount_point", "timeout_ms", "lowers", "upper", "dax")
    class Driver(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DRIVER_UNSPECIFIED: _ClassVar[StorageSpec.Driver]
        BLOCK: _ClassVar[StorageSpec.Driver]
        VIRTIO_FS: _ClassVar[StorageSpec.Driver]
        NINE_P: _ClassVar[StorageSpec.Driver]
        PMEM: _ClassVar[StorageSpec.Driver]
        TMPFS: _ClassVar[StorageSpec.Driver]
        LOCAL: _ClassVar[StorageSpec.Driver]
        OVERLAY: _ClassVar[StorageSpec.Driver]
    DRIVER_UNSPECIFIED: StorageSpec.Driver
    BLOCK: StorageSpec.Driver
    VIRTIO_FS: StorageSpec.Driver
    NINE_P: StorageSpec.Driver
    PMEM: StorageSpec.Driver
    TMPFS: StorageSpec.Driver
    LOCAL: StorageSpec.Driver
    OVERLAY: StorageSpec.Driver
    STORAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    PCI_PATH_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LOWERS_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    DAX_FIELD_NUMBER: _ClassVar[int]
    storage_id: str
    driver: StorageSpec.Driver
    pci_path: str
    serial: str
    device: str
    tag: str
    fstype: str
    options: _containers.RepeatedScalarFieldContainer[str]
    mount_point: str
    timeout_ms: int
    lowers: _containers.RepeatedScalarFieldContainer[str]
    upper: str
    dax: bool
    def __init__(self, storage_id: _Optional[str] = ..., driver: _Optional[_Union[StorageSpec.Driver, str]] = ..., pci_path: _Optional[str] = ..., serial: _Optional[str] = ..., device: _Optional[str] = ..., tag: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., mount_point: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., lowers: _Optional[_Iterable[str]] = ..., upper: _Optional[str] = ..., dax: _Optional[bool] = ...) -> None: ...

class StorageInfo(_message.Message):
    __slots__ = ("storage_id", "driver", "mount_point", "source", "fstype", "options", "read_only", "users", "owner", "added_unix", "device_wait_ms", "device_path")
    STORAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ADDED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PATH_FIELD_NUMBER: _ClassVar[int]
    storage_id: str
    driver: StorageSpec.Driver
    mount_point: str
    source: str
    fstype: str
    options: _containers.RepeatedScalarFieldContainer[str]
    read_only: bool
    users: _containers.RepeatedScalarFieldContainer[str]
    owner: str
    added_unix: float
    device_wait_ms: float
    device_path: str
    def __init__(self, storage_id: _Optional[str] = ..., driver: _Optional[_Union[StorageSpec.Driver, str]] = ..., mount_point: _Optional[str] = ..., source: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., read_only: _Optional[bool] = ..., users: _Optional[_Iterable[str]] = ..., owner: _Optional[str] = ..., added_unix: _Optional[float] = ..., device_wait_ms: _Optional[float] = ..., device_path: _Optional[str] = ...) -> None: ...

class RemoveStorageRequest(_message.Message):
    __slots__ = ("storage_id",)
    STORAGE_ID_FIELD_NUMBER: _ClassVar[int]
    storage_id: str
    def __init__(self, storage_id: _Optional[str] = ...) -> None: ...

class RemoveStorageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStoragesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStoragesResponse(_message.Message):
    __slots__ = ("storages",)
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    storages: _containers.RepeatedCompositeFieldContainer[StorageInfo]
    def __init__(self, storages: _Optional[_Iterable[_Union[StorageInfo, _Mapping]]] = ...) -> None: ...

class CopyFileRequest(_message.Message):
    __slots__ = ("storage_id", "path", "mode", "uid", "gid", "size", "make_parents", "data")
    STORAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAKE_PARENTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    storage_id: str
    path: str
    mode: int
    uid: int
    gid: int
    size: int
    make_parents: bool
    data: bytes
    def __init__(self, storage_id: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., size: _Optional[int] = ..., make_parents: _Optional[bool] = ..., data: _Optional[bytes] = ...) -> None: ...

class CopyFileResponse(_message.Message):
    __slots__ = ("bytes_written", "path")
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    bytes_written: int
    path: str
    def __init__(self, bytes_written: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class VolumeStatsRequest(_message.Message):
    __slots__ = ("storage_id", "path")
    STORAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    storage_id: str
    path: str
    def __init__(self, storage_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class VolumeStats(_message.Message):
    __slots__ = ("capacity_bytes", "used_bytes", "available_bytes", "inodes", "inodes_used", "inodes_free", "read_only")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INODES_FIELD_NUMBER: _ClassVar[int]
    INODES_USED_FIELD_NUMBER: _ClassVar[int]
    INODES_FREE_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    inodes: int
    inodes_used: int
    inodes_free: int
    read_only: bool
    def __init__(self, capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., inodes: _Optional[int] = ..., inodes_used: _Optional[int] = ..., inodes_free: _Optional[int] = ..., read_only: _Optional[bool] = ...) -> None: ...
